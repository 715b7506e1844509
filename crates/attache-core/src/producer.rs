//! Idempotent producers (PROTOCOL.md §5.2.1): header parsing and the
//! epoch/sequence decision, as a pure function the storage engine applies
//! inside the same transaction as the append it guards.

use crate::error::{Error, Result};

/// The largest epoch or sequence a JavaScript client can send exactly.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProducerHeaders {
    pub id: String,
    pub epoch: u64,
    pub seq: u64,
}

impl ProducerHeaders {
    /// All three headers or none; anything else is a 400.
    pub fn parse(id: Option<&str>, epoch: Option<&str>, seq: Option<&str>) -> Result<Option<ProducerHeaders>> {
        match (id, epoch, seq) {
            (None, None, None) => Ok(None),
            (Some(id), Some(epoch), Some(seq)) => {
                if id.is_empty() {
                    return Err(Error::InvalidProducer("Producer-Id must not be empty".into()));
                }
                if id.len() > 256 || id.chars().any(|c| c.is_control()) {
                    return Err(Error::InvalidProducer("Producer-Id is at most 256 printable characters".into()));
                }
                Ok(Some(ProducerHeaders {
                    id: id.to_owned(),
                    epoch: parse_safe_integer("Producer-Epoch", epoch)?,
                    seq: parse_safe_integer("Producer-Seq", seq)?,
                }))
            }
            _ => {
                Err(Error::InvalidProducer("Producer-Id, Producer-Epoch and Producer-Seq must be sent together".into()))
            }
        }
    }
}

fn parse_safe_integer(name: &str, raw: &str) -> Result<u64> {
    let ok = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit());
    let value = if ok { raw.parse::<u64>().ok() } else { None };
    match value {
        Some(v) if v <= MAX_SAFE_INTEGER => Ok(v),
        _ => Err(Error::InvalidProducer(format!("{name} must be a non-negative integer up to 2^53-1, got {raw:?}"))),
    }
}

/// What the server remembers per (stream, producer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerState {
    pub epoch: u64,
    pub last_seq: u64,
}

/// The verdict on one producer request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerCheck {
    /// New data: append it and store `next` as the producer's state.
    Accept { next: ProducerState },
    /// Already appended: answer success without appending.
    Duplicate { state: ProducerState },
    /// A zombie from an older epoch: 403 with the current epoch.
    StaleEpoch { current: u64 },
    /// A new epoch must start at sequence 0: 400.
    EpochMustStartAtZero,
    /// A sequence gap: 409 with the expected and received sequences.
    Gap { expected: u64, received: u64 },
}

impl ProducerCheck {
    pub fn decide(state: Option<ProducerState>, req: &ProducerHeaders) -> ProducerCheck {
        let Some(state) = state else {
            return if req.seq == 0 {
                ProducerCheck::Accept { next: ProducerState { epoch: req.epoch, last_seq: 0 } }
            } else {
                ProducerCheck::Gap { expected: 0, received: req.seq }
            };
        };
        if req.epoch < state.epoch {
            return ProducerCheck::StaleEpoch { current: state.epoch };
        }
        if req.epoch > state.epoch {
            return if req.seq == 0 {
                ProducerCheck::Accept { next: ProducerState { epoch: req.epoch, last_seq: 0 } }
            } else {
                ProducerCheck::EpochMustStartAtZero
            };
        }
        if req.seq <= state.last_seq {
            ProducerCheck::Duplicate { state }
        } else if req.seq == state.last_seq + 1 {
            ProducerCheck::Accept { next: ProducerState { epoch: state.epoch, last_seq: req.seq } }
        } else {
            ProducerCheck::Gap { expected: state.last_seq + 1, received: req.seq }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(epoch: u64, seq: u64) -> ProducerHeaders {
        ProducerHeaders { id: "p".into(), epoch, seq }
    }

    #[test]
    fn headers_come_all_together_or_not_at_all() {
        assert_eq!(ProducerHeaders::parse(None, None, None).unwrap(), None);
        assert!(ProducerHeaders::parse(Some("p"), Some("0"), None).is_err());
        assert!(ProducerHeaders::parse(Some(""), Some("0"), Some("0")).is_err());
        assert!(ProducerHeaders::parse(Some("p"), Some("-1"), Some("0")).is_err());
        assert!(ProducerHeaders::parse(Some("p"), Some("1.5"), Some("0")).is_err());
        assert!(ProducerHeaders::parse(Some("p"), Some("9007199254740992"), Some("0")).is_err());
        assert!(ProducerHeaders::parse(Some("p"), Some("9007199254740991"), Some("0")).is_ok());
    }

    #[test]
    fn the_protocol_decision_table_holds() {
        let s = Some(ProducerState { epoch: 2, last_seq: 5 });
        assert_eq!(ProducerCheck::decide(s, &req(1, 0)), ProducerCheck::StaleEpoch { current: 2 });
        assert_eq!(ProducerCheck::decide(s, &req(3, 1)), ProducerCheck::EpochMustStartAtZero);
        assert!(matches!(ProducerCheck::decide(s, &req(3, 0)), ProducerCheck::Accept { .. }));
        assert!(matches!(ProducerCheck::decide(s, &req(2, 5)), ProducerCheck::Duplicate { .. }));
        assert!(matches!(ProducerCheck::decide(s, &req(2, 0)), ProducerCheck::Duplicate { .. }));
        assert!(matches!(ProducerCheck::decide(s, &req(2, 6)), ProducerCheck::Accept { .. }));
        assert_eq!(ProducerCheck::decide(s, &req(2, 8)), ProducerCheck::Gap { expected: 6, received: 8 });
        assert!(matches!(ProducerCheck::decide(None, &req(7, 0)), ProducerCheck::Accept { .. }));
    }

    proptest! {
        /// Replaying any request sequence never accepts the same (epoch, seq) twice.
        #[test]
        fn no_request_is_accepted_twice(reqs in proptest::collection::vec((0u64..3, 0u64..5), 0..60)) {
            let mut state = None;
            let mut accepted = std::collections::HashSet::new();
            for (epoch, seq) in reqs {
                if let ProducerCheck::Accept { next } = ProducerCheck::decide(state, &req(epoch, seq)) {
                    prop_assert!(accepted.insert((epoch, seq)));
                    state = Some(next);
                }
            }
        }
    }
}
