//! Ids the face mints (tasks, attachments, events) and the addresses derived
//! from a task id (its entity URL, its main stream).

use attache_core::EntityUrl;

use super::TASK_TYPE;
use crate::access::now_ms;

pub(super) fn radix36(n: u64, width: usize) -> String {
    let mut out = String::with_capacity(width);
    push_radix36(&mut out, n, width);
    out
}

/// `n`'s last `width` (at most 16) base-36 digits, zero-padded, appended to `out`.
fn push_radix36(out: &mut String, mut n: u64, width: usize) {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut digits = [b'0'; 16];
    let width = width.min(digits.len());
    for slot in digits[..width].iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    out.extend(digits[..width].iter().map(|&d| char::from(d)));
}

/// `{prefix}{ms}-{9 base36}`, written into one buffer of its size (an event id is minted on every task write).
fn minted(prefix: &str) -> String {
    use std::fmt::Write as _;
    let mut id = String::with_capacity(prefix.len() + 20 + 1 + 9);
    id.push_str(prefix);
    let _ = write!(id, "{}-", now_ms());
    push_radix36(&mut id, rand::random::<u64>(), 9);
    id
}

/// `t-<ms>-<6 base36>`: unlike `t-<ms>`, two tasks created in one millisecond get different ids.
pub fn new_task_id() -> String {
    format!("t-{}-{}", now_ms(), radix36(rand::random::<u64>(), 6))
}

/// `ta-<ms>-<9 base36>`, as ClaudeBench mints them.
pub fn new_attachment_id() -> String {
    minted("ta-")
}

pub(super) fn new_event_id() -> String {
    minted("evt-")
}

pub(super) fn task_url(task_id: &str) -> Option<EntityUrl> {
    EntityUrl::new(TASK_TYPE, task_id).ok()
}

pub(super) fn main_path(task_id: &str) -> String {
    // Joined, not formatted: every task call asks for it.
    ["/", TASK_TYPE, "/", task_id, "/main"].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_within_a_millisecond() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_task_id()).collect();
        assert_eq!(ids.len(), 1000);
        let a = new_attachment_id();
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts[0], "ta");
        assert!(parts[1].parse::<i64>().is_ok());
        assert_eq!(parts[2].len(), 9);
        let e = new_event_id();
        let parts: Vec<&str> = e.split('-').collect();
        assert!(parts[0] == "evt" && parts[1].parse::<i64>().is_ok() && parts[2].len() == 9, "{e}");
        assert!(parts[2].bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()), "{e}");
        assert_eq!(radix36(36 * 36 + 35, 4), "010z");
        assert_eq!(radix36(u64::MAX, 3), radix36(u64::MAX % (36 * 36 * 36), 3));
    }

    #[test]
    fn a_tasks_main_stream_is_its_entity_url_and_main() {
        assert_eq!(main_path("t-1"), "/task/t-1/main");
        assert_eq!(main_path("t-1"), task_url("t-1").unwrap().main_stream());
    }
}
