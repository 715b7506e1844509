//! Offsets: opaque, lexicographically sortable positions in a stream.
//!
//! attache's offset is a position in the stream's logical position space,
//! written `RRRRRRRRRRRRRRRR_PPPPPPPPPPPPPPPP`: two 16-digit zero-padded
//! decimals, so string order equals numeric order. The first part is reserved
//! (always zero today; a future compaction epoch); the second is the position.
//! This is also the shape the Node reference server mints, so offsets that
//! clients built against it (the start offset `0000000000000000_0000000000000000`)
//! mean the same here. The sentinels `-1` and `now` are read, never minted.

use std::fmt;

use crate::error::{Error, Result};

/// A server-minted position in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);

impl Offset {
    pub const ZERO: Offset = Offset(0);
    const PART: usize = 16;
    /// Positions must fit in 16 decimal digits.
    pub const MAX: u64 = 9_999_999_999_999_999;

    pub fn parse(s: &str) -> Result<Offset> {
        let bad = || Error::MalformedOffset(s.to_owned());
        let (reserved, pos) = s.split_once('_').ok_or_else(bad)?;
        let digits = |p: &str| p.len() == Self::PART && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(reserved) || !digits(pos) || reserved.bytes().any(|b| b != b'0') {
            return Err(bad());
        }
        pos.parse::<u64>().map(Offset).map_err(|_| bad())
    }
}

impl Offset {
    /// Appends the offset's text to `out`, as `Display` writes it but
    /// without the formatter (SSE control events carry one per reader).
    pub fn push_to(self, out: &mut String) {
        match self.digits() {
            Some(text) => out.push_str(std::str::from_utf8(&text).unwrap_or_default()),
            None => {
                use fmt::Write as _;
                let _ = write!(out, "{self}");
            }
        }
    }

    /// The offset's text as ASCII bytes, digit by digit into a fixed buffer
    /// (every answer carries an offset, in a header; the formatter's padding
    /// cost ~1k instructions an append). `None` past [`Offset::MAX`], whose
    /// text only `Display` writes.
    pub fn digits(self) -> Option<[u8; 2 * Self::PART + 1]> {
        if self.0 > Self::MAX {
            return None;
        }
        let mut text = *b"0000000000000000_0000000000000000";
        let mut rest = self.0;
        for digit in text[Self::PART + 1..].iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        Some(text)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.digits() {
            Some(text) => f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?),
            None => write!(f, "0000000000000000_{:016}", self.0),
        }
    }
}

/// The `offset` a reader asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOffset {
    /// `-1` or no offset: the start of the stream.
    Start,
    /// `now`: the current tail, skipping what exists.
    Now,
    At(Offset),
}

impl ReadOffset {
    /// Parses the `offset` query parameter; `None` (absent) means the start.
    pub fn parse(raw: Option<&str>) -> Result<ReadOffset> {
        match raw {
            None | Some("-1") => Ok(ReadOffset::Start),
            Some("now") => Ok(ReadOffset::Now),
            Some(s) => Offset::parse(s).map(ReadOffset::At),
        }
    }
}

/// Live-read cursors (PROTOCOL.md §10.1): the number of 20-second intervals
/// since 2024-10-09T00:00:00Z, always moving forward past what the client echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor(pub u64);

impl Cursor {
    const EPOCH_UNIX_SECS: i64 = 1_728_432_000;
    const INTERVAL_SECS: i64 = 20;

    /// The cursor to return at `now_unix_secs`, given the cursor the client echoed.
    /// `jitter_secs` (1..=3600) is drawn by the caller so this stays pure.
    pub fn next(now_unix_secs: i64, echoed: Option<&str>, jitter_secs: u64) -> Cursor {
        let current = ((now_unix_secs - Self::EPOCH_UNIX_SECS).max(0) / Self::INTERVAL_SECS) as u64;
        match echoed.and_then(|c| c.parse::<u64>().ok()) {
            Some(client) if client >= current => {
                let bump = jitter_secs.div_ceil(Self::INTERVAL_SECS as u64).max(1);
                // A client may echo any number, up to u64::MAX: saturate, never wrap back.
                Cursor(client.saturating_add(bump))
            }
            _ => Cursor(current),
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sentinels_parse_and_are_never_minted() {
        assert_eq!(ReadOffset::parse(None).unwrap(), ReadOffset::Start);
        assert_eq!(ReadOffset::parse(Some("-1")).unwrap(), ReadOffset::Start);
        assert_eq!(ReadOffset::parse(Some("now")).unwrap(), ReadOffset::Now);
        assert_ne!(Offset(0).to_string(), "-1");
    }

    #[test]
    fn malformed_offsets_are_rejected() {
        for bad in [
            "",
            "abc",
            "0,1",
            "0 1",
            "-2",
            "0000000000000000_000000000000000x",
            "0000000000000001_0000000000000000",
            "0000000000000000_+000000000000001",
            "0000000000000000",
        ] {
            assert!(ReadOffset::parse(Some(bad)).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn cursor_moves_past_an_echoed_current_cursor() {
        let now = Cursor::EPOCH_UNIX_SECS + 20 * 1000 + 5;
        assert_eq!(Cursor::next(now, None, 1), Cursor(1000));
        assert_eq!(Cursor::next(now, Some("999"), 1), Cursor(1000));
        assert!(Cursor::next(now, Some("1000"), 1) > Cursor(1000));
        assert!(Cursor::next(now, Some("5000"), 3600) > Cursor(5000));
    }

    #[test]
    fn the_largest_echoed_cursor_saturates_instead_of_overflowing() {
        let now = Cursor::EPOCH_UNIX_SECS + 20 * 1000;
        assert_eq!(Cursor::next(now, Some(&u64::MAX.to_string()), 3600), Cursor(u64::MAX));
        assert_eq!(Cursor::next(now, Some(&(u64::MAX - 1).to_string()), 1), Cursor(u64::MAX));
    }

    proptest! {
        #[test]
        fn offsets_round_trip_and_sort_like_numbers(a in 0..=Offset::MAX, b in 0..=Offset::MAX) {
            let (sa, sb) = (Offset(a).to_string(), Offset(b).to_string());
            prop_assert_eq!(Offset::parse(&sa).unwrap(), Offset(a));
            prop_assert_eq!(sa.cmp(&sb), a.cmp(&b));
        }

        #[test]
        fn offsets_are_written_as_two_zero_padded_16_digit_parts(a in prop_oneof![0..=Offset::MAX, any::<u64>()]) {
            prop_assert_eq!(Offset(a).to_string(), format!("0000000000000000_{a:016}"));
        }

        #[test]
        fn offset_parser_never_panics(s in ".{0,40}") {
            let _ = ReadOffset::parse(Some(&s));
        }
    }
}
