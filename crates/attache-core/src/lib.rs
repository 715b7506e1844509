//! attache's rules, without I/O.
//!
//! Everything here is pure: parsing and validating what arrives on the wire
//! (offsets, stream headers, producer headers, JSON bodies, principals,
//! entity URLs, manifest rows) and the decisions that follow from it
//! (producer fencing, TTL expiry). The storage engine and the HTTP faces
//! both call into this crate, so a rule is written once and tested without
//! a server.

pub mod entity;
pub mod error;
pub mod json;
pub mod manifest;
pub mod offset;
pub mod principal;
pub mod producer;
pub mod query;
pub mod state;
pub mod stream;
pub mod task;

pub use entity::{EntityStream, EntityUrl, GrantSubject, Permission, Propagation};
pub use error::{Error, Result};
pub use offset::{Cursor, Offset, ReadOffset};
pub use principal::{PrincipalKey, PrincipalKind};
pub use producer::{ProducerCheck, ProducerHeaders, ProducerState};
pub use stream::{ContentType, ExpiresAt, StreamPath, Ttl};

/// Milliseconds since the Unix epoch, the unit of every time attache stores
/// (expiry, grants, rows): the one clock read the crates share.
pub fn now_ms() -> i64 {
    // Straight from the system clock: `chrono::Utc::now()` works out the
    // calendar date on every call, and this runs several times a request.
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod clock_tests {
    #[test]
    fn now_ms_reads_the_same_clock_as_chrono() {
        let before = chrono::Utc::now().timestamp_millis();
        let now = super::now_ms();
        let after = chrono::Utc::now().timestamp_millis();
        assert!(before <= now && now <= after, "{before} <= {now} <= {after}");
    }
}
