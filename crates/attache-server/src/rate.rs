//! A fixed-window rate limit per key, below the faces: per principal for
//! JSON-RPC and MCP calls (`rpc::check_rate`), per entity for signals
//! recorded as rows (`entities::signal`).

use std::collections::HashMap;

#[derive(Default)]
pub struct RateLimiter {
    windows: parking_lot::Mutex<HashMap<String, (i64, u32)>>,
}

impl RateLimiter {
    /// Counts one use by `key`; past `limit` in the current window, `Err`
    /// with the milliseconds until the window ends (at least 1).
    pub fn hit(&self, key: &str, limit: u32, window_ms: u64) -> Result<(), u64> {
        let now = crate::access::now_ms();
        let window = window_ms.max(1) as i64;
        let start = now - now.rem_euclid(window);
        let mut windows = self.windows.lock();
        // Keys of past windows hold nothing worth keeping.
        if windows.len() > 100_000 {
            windows.retain(|_, (s, _)| *s == start);
        }
        let slot = windows.entry(key.to_owned()).or_insert((start, 0));
        if slot.0 != start {
            *slot = (start, 0);
        }
        if slot.1 >= limit {
            return Err((start + window - now).max(1) as u64);
        }
        slot.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_past_its_limit_waits_what_is_left_of_the_window() {
        let rl = RateLimiter::default();
        assert!(rl.hit("e", 1, 60_000).is_ok());
        assert!(matches!(rl.hit("e", 1, 60_000), Err(ms) if (1..=60_000).contains(&ms)));
        assert!(rl.hit("f", 1, 60_000).is_ok(), "another key has its own count");
    }
}
