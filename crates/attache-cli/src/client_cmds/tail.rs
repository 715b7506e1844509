//! `tail`: follow a stream, or an entity's main stream, live.

use attache_client::streams::{LiveMode, TailOptions};
use attache_client::{EntityUrl, RuntimeServerClient};

use super::Conn;
use crate::output::{stdout_bytes, Output};

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub(super) conn: Conn,
    /// A stream path (/logs/a) or an entity (/chat/abc: its main stream)
    target: String,
    /// Where to start: -1 (the beginning), now (new data only), or an offset printed before
    #[arg(long, default_value = "-1", allow_hyphen_values = true)]
    offset: String,
    /// Wait for data by Server-Sent Events instead of long-poll
    #[arg(long)]
    sse: bool,
    /// Stop once caught up instead of following
    #[arg(long)]
    once: bool,
}

/// A stream path, or an entity whose main stream is meant.
async fn tail_target(client: &RuntimeServerClient, raw: &str) -> anyhow::Result<String> {
    let path = if raw.starts_with('/') { raw.to_owned() } else { format!("/{raw}") };
    let Ok(entity) = EntityUrl::parse(&path) else { return Ok(path) };
    // Two segments name an entity, unless a plain stream lives there.
    match client.head_stream(&path).await {
        Ok(_) => Ok(path),
        Err(e) if e.is_not_found() => Ok(entity.main_stream()),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn tail(a: TailArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let path = tail_target(&client, &a.target).await?;
    let live = if a.sse { LiveMode::Sse } else { LiveMode::LongPoll };
    let mut options = TailOptions::from_offset(a.offset.clone()).live(live);
    options.stop_when_up_to_date = a.once;
    let mut tail = client.tail(&path, options)?;
    let mut closed = false;
    while let Some(chunk) = tail.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            // Neither a stream nor an entity there: say both were looked for.
            Err(e) if e.is_not_found() => {
                return Err(anyhow::Error::from(e)
                    .context(format!("no stream and no entity your principal may read at {}", a.target)))
            }
            Err(e) => return Err(e.into()),
        };
        if chunk.json {
            for item in chunk.json_items()? {
                out.line(&serde_json::to_string(&item)?);
            }
        } else if !chunk.data.is_empty() {
            stdout_bytes(&chunk.data);
        }
        closed |= chunk.closed;
    }
    if closed {
        out.note(&format!("{path} is closed; its end is offset {}", tail.offset()));
    } else {
        out.note(&format!("caught up at offset {} (continue with --offset {})", tail.offset(), tail.offset()));
    }
    Ok(())
}
