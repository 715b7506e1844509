//! Ids the face mints (tasks, attachments, events) and the addresses derived
//! from a task id (its entity URL, its main stream).

use attache_core::EntityUrl;

use super::TASK_TYPE;
use crate::access::now_ms;

pub(super) fn radix36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).unwrap_or_default()
}

/// `t-<ms>-<6 base36>`: unlike `t-<ms>`, two tasks created in one millisecond get different ids.
pub fn new_task_id() -> String {
    format!("t-{}-{}", now_ms(), radix36(rand::random::<u64>(), 6))
}

/// `ta-<ms>-<9 base36>`, as ClaudeBench mints them.
pub fn new_attachment_id() -> String {
    format!("ta-{}-{}", now_ms(), radix36(rand::random::<u64>(), 9))
}

pub(super) fn new_event_id() -> String {
    format!("evt-{}-{}", now_ms(), radix36(rand::random::<u64>(), 9))
}

pub(super) fn task_url(task_id: &str) -> Option<EntityUrl> {
    EntityUrl::new(TASK_TYPE, task_id).ok()
}

pub(super) fn main_path(task_id: &str) -> String {
    // Pushed, not formatted: every task call asks for it.
    let mut path = String::with_capacity(TASK_TYPE.len() + task_id.len() + 7);
    for part in ["/", TASK_TYPE, "/", task_id, "/main"] {
        path.push_str(part);
    }
    path
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
    }

    #[test]
    fn a_tasks_main_stream_is_its_entity_url_and_main() {
        assert_eq!(main_path("t-1"), "/task/t-1/main");
        assert_eq!(main_path("t-1"), task_url("t-1").unwrap().main_stream());
    }
}
