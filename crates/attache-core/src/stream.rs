//! Stream configuration as it arrives in headers: path, content type, TTL,
//! absolute expiry. Parsing is strict, as PROTOCOL.md §5.1 asks.

use chrono::{DateTime, FixedOffset};

use crate::error::{Error, Result};

/// Whether `s` holds a control character (`char::is_control`), by bytes
/// when it is all ASCII (as nearly every path is).
fn has_control(s: &str) -> bool {
    if s.is_ascii() {
        s.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        s.chars().any(char::is_control)
    }
}

/// The URL path a stream lives at, e.g. `/v1/stream/chat-1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamPath(String);

impl StreamPath {
    pub const MAX_LEN: usize = 1024;

    pub fn new(path: impl Into<String>) -> Result<StreamPath> {
        let path = path.into();
        if !path.starts_with('/') || path.len() < 2 {
            return Err(Error::InvalidPath(path, "a stream path starts with '/' and names something"));
        }
        if path.len() > Self::MAX_LEN {
            return Err(Error::InvalidPath(path, "a stream path is at most 1024 bytes"));
        }
        if has_control(&path) {
            return Err(Error::InvalidPath(path, "a stream path has no control characters"));
        }
        // Every segment follows a '/': without "/." there is none to look at
        // (this runs on every request to a stream).
        if path.contains("/.") && path.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(Error::InvalidPath(path, "a stream path has no '.' or '..' segments"));
        }
        Ok(StreamPath(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StreamPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stream's content type: the value as given, compared by media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentType(String);

impl ContentType {
    pub const OCTET_STREAM: &'static str = "application/octet-stream";

    pub fn parse(raw: &str) -> Result<ContentType> {
        let trimmed = raw.trim();
        // Kept with the stream and echoed on every read: a short text (RFC
        // 6838 names are at most 127 characters each; parameters fit beside).
        // Before, a 60 KB `Content-Type` was kept per stream, 134 KB of
        // memory a stream across restarts (session 16's third attack pass).
        if trimmed.len() > Self::MAX_LEN {
            return Err(Error::InvalidContentType(format!(
                "{}... ({} bytes; a content type is at most {})",
                prefix(trimmed, 64),
                trimmed.len(),
                Self::MAX_LEN
            )));
        }
        let media = trimmed.split(';').next().unwrap_or("").trim();
        let valid = media.split_once('/').is_some_and(|(a, b)| {
            !a.is_empty() && !b.is_empty() && !b.contains('/') && media.bytes().all(|c| c.is_ascii_graphic())
        });
        if !valid {
            return Err(Error::InvalidContentType(raw.to_owned()));
        }
        Ok(ContentType(trimmed.to_owned()))
    }

    /// The longest content type a stream keeps.
    pub const MAX_LEN: usize = 256;

    pub fn octet_stream() -> ContentType {
        ContentType(Self::OCTET_STREAM.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The media type, lowercased, without parameters.
    pub fn media_type(&self) -> String {
        media_type_of(&self.0)
    }

    pub fn matches(&self, other: &ContentType) -> bool {
        self.matches_raw(&other.0)
    }

    /// [`ContentType::matches`] against a stored content type, as written. A
    /// stream that keeps bytes as they come also takes
    /// `application/octet-stream`, the type it is advertised as when its own
    /// is JSON ([`advertised_media`]).
    pub fn matches_raw(&self, raw: &str) -> bool {
        // The same text is the same media type: nearly every append names
        // its stream's type as the stream was created with it.
        if self.0 == raw {
            return true;
        }
        let media = media_of(&self.0);
        media.eq_ignore_ascii_case(media_of(raw))
            || (media.eq_ignore_ascii_case(Self::OCTET_STREAM) && has_bytes_param(raw))
    }

    /// JSON mode (PROTOCOL.md §9.1): message boundaries are kept.
    pub fn is_json(&self) -> bool {
        is_json_media(&self.0)
    }

    /// This type with the parameter that makes a stream keep bytes as they
    /// come, whatever the media type (a resumable attachment of any type is
    /// a file: its chunks split JSON anywhere, and a read must give back the
    /// bytes uploaded). Appends still match it by media type.
    pub fn stored_as_bytes(&self) -> ContentType {
        if has_bytes_param(&self.0) {
            return self.clone();
        }
        ContentType(format!("{}; {BYTES_PARAM}", self.0))
    }

    /// Text and JSON travel as UTF-8 in SSE; everything else as base64.
    pub fn is_sse_text(&self) -> bool {
        let m = media_of(&self.0);
        m.get(..5).is_some_and(|t| t.eq_ignore_ascii_case("text/")) || m.eq_ignore_ascii_case("application/json")
    }
}

pub fn media_type_of(raw: &str) -> String {
    media_of(raw).to_ascii_lowercase()
}

/// The media type as written (any case), without parameters: compared with
/// `eq_ignore_ascii_case`, so the checks on every append allocate nothing.
fn media_of(raw: &str) -> &str {
    raw.split(';').next().unwrap_or("").trim()
}

/// The content type a stream is advertised as (the `Content-Type` of its
/// reads and `HEAD`): as stored, except that a stream of a JSON type that
/// keeps bytes as they come (`bytes`: a resumable attachment's, or a blob's)
/// is `application/octet-stream`. Durable Streams clients take
/// `application/json` for JSON mode: they would send each chunk of the file
/// framed as a JSON array, which a bytes stream stores as it comes, and
/// parse its reads as messages.
pub fn advertised_media(raw: &str, bytes: bool) -> &str {
    if media_of(raw).eq_ignore_ascii_case("application/json") && (bytes || has_bytes_param(raw)) {
        ContentType::OCTET_STREAM
    } else {
        raw
    }
}

/// The content-type parameter of a stream that keeps bytes as they come ([`ContentType::stored_as_bytes`]).
pub const BYTES_PARAM: &str = "attache-store=bytes";

fn has_bytes_param(raw: &str) -> bool {
    raw.split(';').skip(1).any(|p| p.trim().eq_ignore_ascii_case(BYTES_PARAM))
}

/// Whether a stream of this content type runs in JSON mode.
pub fn is_json_media(raw: &str) -> bool {
    // Nearly every JSON stream names its type exactly so: no parameters to look through.
    if raw == "application/json" {
        return true;
    }
    media_of(raw).eq_ignore_ascii_case("application/json") && !has_bytes_param(raw)
}

/// A sliding time-to-live in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(pub u64);

impl Ttl {
    /// The longest TTL accepted: 100 years. Beyond it a deadline in
    /// milliseconds would no longer fit (an overflow once made such a stream
    /// expire at once); a stream meant to live for ever sets no TTL.
    pub const MAX_SECS: u64 = 100 * 365 * 24 * 3600;

    /// Non-negative decimal without sign, leading zeros, point or exponent, at most [`Ttl::MAX_SECS`].
    pub fn parse(raw: &str) -> Result<Ttl> {
        let ok = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) && (raw == "0" || !raw.starts_with('0'));
        if !ok {
            return Err(Error::InvalidTtl(raw.to_owned()));
        }
        match raw.parse::<u64>() {
            Ok(secs) if secs <= Ttl::MAX_SECS => Ok(Ttl(secs)),
            _ => Err(Error::TtlOutOfRange(raw.to_owned())),
        }
    }

    /// The TTL in milliseconds, saturating: any u64 a client sends stays a
    /// far-future deadline, never an overflow (a panic, or a wrap into the past).
    pub fn as_millis(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX).saturating_mul(1000)
    }
}

/// An absolute expiry, kept as the client wrote it so it can be echoed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiresAt {
    pub raw: String,
    pub unix_ms: i64,
}

impl ExpiresAt {
    /// The longest timestamp text kept (RFC 3339 with nanoseconds and an
    /// offset is 35 characters). chrono's parser takes any number of
    /// fractional digits, and the text is kept and echoed as given: a
    /// 60 KB `Stream-Expires-At` was kept per stream, a 1 MiB grant
    /// `expires_at` per grant (session 16's third attack pass).
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Result<ExpiresAt> {
        if raw.trim().len() > Self::MAX_LEN {
            return Err(Error::InvalidExpiresAt(format!(
                "{}... ({} bytes; an RFC 3339 timestamp is at most {})",
                prefix(raw.trim(), 40),
                raw.trim().len(),
                Self::MAX_LEN
            )));
        }
        let at: DateTime<FixedOffset> =
            DateTime::parse_from_rfc3339(raw.trim()).map_err(|_| Error::InvalidExpiresAt(raw.to_owned()))?;
        Ok(ExpiresAt { raw: raw.trim().to_owned(), unix_ms: at.timestamp_millis() })
    }
}

/// The first `n` bytes of `s` (or fewer, at a character boundary), to name a long input in an error.
fn prefix(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// When a stream stops existing, given its expiry settings and last access.
pub fn expiry_deadline_ms(ttl: Option<Ttl>, expires_at: Option<&ExpiresAt>, last_access_ms: i64) -> Option<i64> {
    match (ttl, expires_at) {
        (_, Some(at)) => Some(at.unix_ms),
        (Some(ttl), None) => Some(last_access_ms.saturating_add(ttl.as_millis())),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn long_content_types_and_expiry_texts_are_refused_without_echoing_them() {
        let long_ct = format!("text/plain; x={}", "a".repeat(60_000));
        let err = ContentType::parse(&long_ct).unwrap_err().to_string();
        assert!(err.contains("at most 256") && err.len() < 300, "{err}");
        assert!(ContentType::parse(&format!("text/plain; x={}", "a".repeat(200))).is_ok());
        let long_at = format!("2099-01-01T00:00:00.{}Z", "0".repeat(60_000));
        let err = ExpiresAt::parse(&long_at).unwrap_err().to_string();
        assert!(err.contains("at most 64") && err.len() < 300, "{err}");
        assert!(ExpiresAt::parse("2099-01-01T00:00:00.123456789+05:30").is_ok());
    }

    #[test]
    fn ttl_accepts_plain_decimals_only() {
        assert_eq!(Ttl::parse("0").unwrap(), Ttl(0));
        assert_eq!(Ttl::parse("3600").unwrap(), Ttl(3600));
        assert_eq!(Ttl::parse(&Ttl::MAX_SECS.to_string()).unwrap(), Ttl(Ttl::MAX_SECS));
        assert!(Ttl::parse(&(Ttl::MAX_SECS + 1).to_string()).is_err());
        assert!(Ttl::parse("18446744073709551615").is_err());
        // Even a TTL built by hand never makes a deadline in the past.
        assert!(expiry_deadline_ms(Some(Ttl(u64::MAX)), None, 1_000).unwrap() > 1_000);
        for bad in ["", "+3600", "03600", "3600.0", "3.6e3", "-1", " 1", "abc", "99999999999999999999999"] {
            assert!(Ttl::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expires_at_needs_rfc3339() {
        assert!(ExpiresAt::parse("2030-01-01T00:00:00Z").is_ok());
        assert!(ExpiresAt::parse("2030-01-01T00:00:00+02:00").is_ok());
        assert!(ExpiresAt::parse("tomorrow").is_err());
        assert!(ExpiresAt::parse("2030-01-01").is_err());
    }

    #[test]
    fn a_json_stream_that_keeps_bytes_is_advertised_and_appended_to_as_octet_stream() {
        let bytes = ContentType::parse("application/json").unwrap().stored_as_bytes();
        assert_eq!(advertised_media(bytes.as_str(), false), ContentType::OCTET_STREAM);
        assert!(ContentType::octet_stream().matches_raw(bytes.as_str()));
        assert_eq!(advertised_media("application/json", true), ContentType::OCTET_STREAM, "a blob");
        assert_eq!(advertised_media("application/json", false), "application/json");
        assert_eq!(advertised_media("image/png; attache-store=bytes", false), "image/png; attache-store=bytes");
        assert!(!ContentType::octet_stream().matches_raw("application/json"), "a JSON-mode stream takes only JSON");
    }

    #[test]
    fn a_json_type_stored_as_bytes_is_not_json_mode_but_still_matches_json() {
        let json = ContentType::parse("application/json").unwrap();
        let bytes = json.stored_as_bytes();
        assert!(!bytes.is_json());
        assert!(bytes.matches(&json));
        assert_eq!(bytes.stored_as_bytes(), bytes);
        assert!(ContentType::parse(bytes.as_str()).unwrap().stored_as_bytes() == bytes);
    }

    #[test]
    fn content_types_compare_by_media_type() {
        let a = ContentType::parse("application/json").unwrap();
        let b = ContentType::parse("Application/JSON; charset=utf-8").unwrap();
        assert!(a.matches(&b) && a.is_json() && b.is_json());
        assert!(!a.matches(&ContentType::parse("text/plain").unwrap()));
        assert!(ContentType::parse("nonsense").is_err());
        assert!(ContentType::parse("").is_err());
    }

    #[test]
    fn paths_refuse_traversal_and_control_characters() {
        assert!(StreamPath::new("/a/b").is_ok());
        for bad in ["", "/", "a", "/a/../b", "/a/./b", "/a\nb"] {
            assert!(StreamPath::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_largest_ttl_is_a_far_future_deadline() {
        // Parsing refuses TTLs past MAX_SECS; one stored before that rule still must not overflow.
        assert_eq!(expiry_deadline_ms(Some(Ttl(u64::MAX)), None, 1_000), Some(i64::MAX));
        assert_eq!(Ttl(i64::MAX as u64 / 1000 + 1).as_millis(), i64::MAX);
    }

    proptest! {
        #[test]
        fn ttl_parser_agrees_with_canonical_decimal(n in any::<u32>()) {
            let parsed = Ttl::parse(&n.to_string());
            if u64::from(n) <= Ttl::MAX_SECS {
                prop_assert_eq!(parsed.unwrap(), Ttl(u64::from(n)));
            } else {
                prop_assert!(parsed.is_err());
            }
            let padded = format!("0{n}");
            prop_assert!(Ttl::parse(&padded).is_err());
        }

        #[test]
        fn header_parsers_never_panic(s in ".{0,64}") {
            let _ = Ttl::parse(&s);
            let _ = ExpiresAt::parse(&s);
            let _ = ContentType::parse(&s);
            let _ = StreamPath::new(s);
        }

        /// The path check's shortcuts (bytes for ASCII, no segment walk
        /// without "/.") refuse exactly what the plain rules refuse.
        #[test]
        fn stream_paths_are_refused_exactly_by_the_plain_rules(
            s in "/[a-z./\\u{0}-\\u{1f}\\u{7f}\\u{80}-\\u{9f}é]{0,24}"
        ) {
            let plain = s.len() >= 2
                && !s.chars().any(char::is_control)
                && !s.split('/').any(|seg| seg == "." || seg == "..");
            prop_assert_eq!(StreamPath::new(s.clone()).is_ok(), plain, "{:?}", s);
        }

        /// Two content types match alike whether or not their texts are equal.
        #[test]
        fn a_content_type_matches_its_own_text(s in "[a-zA-Z]{1,8}/[a-zA-Z+.-]{1,12}(; ?[a-z]{1,6}(=[a-z0-9]{1,4})?){0,2}") {
            if let Ok(ct) = ContentType::parse(&s) {
                prop_assert!(ct.matches_raw(ct.as_str()));
                let media = media_of(ct.as_str());
                prop_assert!(ct.matches_raw(&media.to_ascii_uppercase()));
            }
        }
    }
}
