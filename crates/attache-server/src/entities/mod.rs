//! The entities face, in the wire format of Electric Agents
//! (`/_electric/entities`), one file per part: `spawn` (and the lineage a
//! child goes under), `read` (one entity, the list), `lifecycle` (stop,
//! purge), `signal`, `send` (inbox messages), `tags`, `grants`. What they
//! share is here: the entity's JSON, the JSON size bound on args and tags,
//! and generated row keys. The fork route is `crate::fork`.

use attache_storage::EntityRecord;
use serde_json::{json, Value};

use crate::access::now_ms;

mod grants;
mod lifecycle;
mod read;
mod send;
mod signal;
mod spawn;
mod tags;

pub use grants::{add_grant, grant_json, list_grants, remove_grant, GrantBody};
pub use lifecycle::{purge_entity, stop, stop_entity, StopQuery};
pub use read::{get_entity, list, ListQuery};
pub use send::{send, send_message, SendBody};
pub use signal::{signal, SignalBody};
pub use spawn::{
    copy_grants_to_child, data_room, entity_room, lineage_under, spawn, spawn_entity, Lineage, SpawnBody,
    MAX_LINEAGE_DEPTH, TOO_MANY_ENTITIES,
};
pub use tags::{delete_tag, set_tag, TagBody};

/// Runs `step`, a change of an entity in more than one step (its registry
/// record and rows on its main stream, or its streams and its record), to
/// its end on a task of its own, and waits for its answer
/// (`tasks::Writers::run_to_end`, whose tracker shutdown waits for). The
/// caller takes the entity's life lock first and moves it into `step`: so at
/// most one such step per entity runs at a time, and a client that resets
/// its connections piles up no more work than its requests hold. Awaited
/// inline, a request dropped midway (its client closed the connection) left
/// the change half done: a tag in the record with no row, a closed main
/// stream under a record still running, a purge with the record left. The
/// fork route runs its streams, record and copied grants here too (`fork`).
pub(crate) async fn run_to_end<T: Send + 'static>(
    state: &crate::AppState,
    step: impl std::future::Future<Output = crate::error::ApiResult<T>> + Send + 'static,
) -> crate::error::ApiResult<T> {
    state.tasks.run_to_end(step).await
}

pub use crate::http::json_size;

/// The public JSON of an entity.
pub fn entity_json(e: &EntityRecord) -> Value {
    let mut v = json!({
        "url": e.url,
        "type": e.entity_type,
        "instance_id": e.instance_id,
        "status": e.status,
        "streams": { "main": format!("{}/main", e.url) },
        "tags": e.tags,
        "created_by": e.created_by,
        "created_at": e.created_at_ms,
        "updated_at": e.updated_at_ms,
    });
    if let Some(args) = &e.args {
        v["spawn_args"] = args.parse().unwrap_or(Value::Null);
    }
    if let Some(parent) = &e.parent {
        v["parent"] = json!(parent);
    }
    v
}

fn generated_key(prefix: &str) -> String {
    let n: u32 = rand::random();
    format!("{prefix}-{}-{}", now_ms(), radix36(n as u64))
}

fn radix36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}
