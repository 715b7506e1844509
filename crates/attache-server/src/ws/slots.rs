//! The `/ws` WebSockets open, all together and by principal: taken at the
//! upgrade, after authentication and before the `101`, and given back when
//! the socket's task ends ([`Slot`] on drop).
//!
//! A WebSocket keeps its connection (a place of `--max-connections`) for as
//! long as its client answers pings. Without these bounds one principal
//! opening 200 sockets took every place of `--max-connections 200`: every
//! other client and `/healthz` got 503 until they closed (session 17's
//! attack pass).

use std::collections::HashMap;
use std::sync::Arc;

use attache_core::PrincipalKey;
use axum::http::{header, StatusCode};

use crate::error::ApiError;

/// The refusal code of a WebSocket past either bound.
pub const TOO_MANY_WEBSOCKETS: &str = "TOO_MANY_WEBSOCKETS";

/// How long a refused client is asked to wait before it tries again.
const RETRY_AFTER_SECS: u64 = 5;

/// The sockets open: how many in all, and how many each principal holds.
pub struct Slots {
    max: usize,
    per_principal: usize,
    open: Arc<parking_lot::Mutex<Open>>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_principal: HashMap<PrincipalKey, usize>,
}

/// One open socket's place; given back on drop.
pub struct Slot {
    open: Arc<parking_lot::Mutex<Open>>,
    who: PrincipalKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(mine) = open.by_principal.get_mut(&self.who) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                open.by_principal.remove(&self.who);
            }
        }
    }
}

impl Slots {
    /// At most `max` sockets open at once, `per_principal` of them one principal's.
    pub fn new(max: usize, per_principal: usize) -> Slots {
        Slots { max: max.max(1), per_principal: per_principal.max(1), open: Arc::default() }
    }

    /// Sockets open now.
    pub fn open(&self) -> usize {
        self.open.lock().total
    }

    /// A place for one more socket of `who`, or the refusal: 429 when `who`
    /// holds its most, 503 when the server does.
    pub fn take(&self, who: &PrincipalKey) -> Result<Slot, ApiError> {
        let mut open = self.open.lock();
        let mine = open.by_principal.get(who).copied().unwrap_or(0);
        if mine >= self.per_principal {
            let most = self.per_principal;
            return Err(refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{who} holds {mine} open WebSockets, at most {most} at once \
                     (max_websockets_per_principal, --max-websockets-per-principal): close one and retry"
                ),
            ));
        }
        if open.total >= self.max {
            let most = self.max;
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the server holds its most open WebSockets, {most} \
                     (max_websockets, --max-websockets): retry later"
                ),
            ));
        }
        open.total += 1;
        *open.by_principal.entry(who.clone()).or_default() += 1;
        Ok(Slot { open: self.open.clone(), who: who.clone() })
    }
}

fn refuse(status: StatusCode, message: String) -> ApiError {
    ApiError::new(status, TOO_MANY_WEBSOCKETS, message).with_header(header::RETRY_AFTER, RETRY_AFTER_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_holds_at_most_its_sockets_and_all_together_at_most_the_server_s_until_one_is_dropped() {
        let slots = Slots::new(3, 2);
        let who = |k: &str| PrincipalKey::parse(k).unwrap();
        let (mallory, alice) = (who("user:mallory"), who("user:alice"));
        let first = slots.take(&mallory).unwrap();
        let _second = slots.take(&mallory).unwrap();
        assert_eq!(slots.take(&mallory).err().map(|e| e.status()), Some(StatusCode::TOO_MANY_REQUESTS));
        let _alices = slots.take(&alice).unwrap();
        assert_eq!(slots.take(&alice).err().map(|e| e.status()), Some(StatusCode::SERVICE_UNAVAILABLE));
        drop(first);
        assert_eq!(slots.open(), 2);
        let _again = slots.take(&mallory).unwrap();
    }
}
