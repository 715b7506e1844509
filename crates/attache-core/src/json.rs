//! JSON mode bodies (PROTOCOL.md §9.1): validate, flatten one array level,
//! and keep each message's bytes exactly as sent (no re-serialisation).

use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// Which request the body came with: an append rejects `[]`, a create accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonBodyUse {
    Create,
    Append,
}

/// Splits a JSON body into its messages, each the exact bytes of one value.
pub fn split_messages(body: &[u8], usage: JsonBodyUse) -> Result<Vec<&[u8]>> {
    split_messages_at_most(body, usage, usize::MAX)
}

/// [`split_messages`], refusing a body of more than `max` messages
/// ([`Error::TooManyMessages`]) once it has seen `max + 1` of them: what it
/// holds meanwhile is bounded by `max`, not by the body (a 15 MiB body of
/// `[1,1,...]` is 7.8 million messages).
pub fn split_messages_at_most(body: &[u8], usage: JsonBodyUse, max: usize) -> Result<Vec<&[u8]>> {
    let text = std::str::from_utf8(body).map_err(|_| Error::InvalidJson("body is not UTF-8".into()))?;
    let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
    if trimmed.is_empty() {
        return match usage {
            JsonBodyUse::Create => Ok(Vec::new()),
            JsonBodyUse::Append => Err(Error::InvalidJson("body is empty".into())),
        };
    }
    if trimmed.starts_with('[') {
        let mut de = serde_json::Deserializer::from_str(trimmed);
        let items = serde::Deserializer::deserialize_seq(&mut de, AtMost { max })
            .and_then(|items| de.end().map(|()| items))
            .map_err(|e| match e.to_string() {
                m if m.starts_with(TOO_MANY) => Error::TooManyMessages { max },
                m => Error::InvalidJson(m),
            })?;
        if items.is_empty() && usage == JsonBodyUse::Append {
            return Err(Error::EmptyJsonArray);
        }
        Ok(items)
    } else {
        let one: &RawValue = serde_json::from_str(trimmed).map_err(|e| Error::InvalidJson(e.to_string()))?;
        Ok(vec![one.get().as_bytes()])
    }
}

/// How many JSON values `body` holds, and how many of them are objects,
/// counted from its structure without parsing it (each `[`, `{`, `,` and `:`
/// outside strings starts or separates one), so a caller can tell what a tree
/// of it would cost before it builds one: 4 MiB of `[1,1,...]` is two million
/// values, a tree of ~130 MB, where 4 MiB of one string is one. An estimate
/// for malformed JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    pub values: usize,
    pub objects: usize,
    pub arrays: usize,
}

/// [`Shape`] of `body`.
pub fn shape_of(body: &[u8]) -> Shape {
    let (mut shape, mut in_string, mut escaped) = (Shape { values: 1, objects: 0, arrays: 0 }, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'{' => {
                    shape.values += 1;
                    shape.objects += 1;
                }
                b'[' => {
                    shape.values += 1;
                    shape.arrays += 1;
                }
                b',' | b':' => shape.values += 1,
                _ => {}
            }
        }
    }
    shape
}

/// How many JSON values `body` holds ([`shape_of`]).
pub fn values_in(body: &[u8]) -> usize {
    shape_of(body).values
}

/// The custom error [`AtMost`] stops with (serde's errors carry text only).
const TOO_MANY: &str = "attache: too many messages";

/// A JSON array's items as the exact bytes of each, at most `max` of them.
struct AtMost {
    max: usize,
}

impl<'de> serde::de::Visitor<'de> for AtMost {
    type Value = Vec<&'de [u8]>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max).min(1024));
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            if items.len() == self.max {
                return Err(serde::de::Error::custom(TOO_MANY));
            }
            items.push(raw.get().as_bytes());
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(s: &str) -> Vec<String> {
        split_messages(s.as_bytes(), JsonBodyUse::Append)
            .unwrap()
            .into_iter()
            .map(|m| String::from_utf8(m.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn a_body_of_more_messages_than_allowed_is_refused_and_one_within_is_split_whole() {
        let body = br#"[1, {"a":[2,3]}, "x"]"#;
        let three = split_messages_at_most(body, JsonBodyUse::Append, 3).unwrap();
        assert_eq!(three, vec![&b"1"[..], br#"{"a":[2,3]}"#, br#""x""#]);
        assert_eq!(split_messages_at_most(body, JsonBodyUse::Append, 2), Err(Error::TooManyMessages { max: 2 }));
        // A single value is one message; malformed JSON is still said to be malformed.
        assert_eq!(split_messages_at_most(b"{}", JsonBodyUse::Append, 1).unwrap().len(), 1);
        assert!(matches!(split_messages_at_most(b"[1,", JsonBodyUse::Append, 1), Err(Error::InvalidJson(_))));
        assert!(matches!(split_messages_at_most(b"[1] x", JsonBodyUse::Append, 5), Err(Error::InvalidJson(_))));
    }

    #[test]
    fn values_are_counted_from_structure_and_strings_hide_theirs() {
        assert_eq!(values_in(b"1"), 1);
        assert_eq!(shape_of(br#"[{"":0},{"a":{}}]"#).objects, 3);
        assert_eq!(shape_of(br#"[[0],[[]],"[["]"#).arrays, 4);
        assert_eq!(shape_of(br#""{{{""#).objects, 0, "braces inside a string are text");
        assert!(values_in(b"[1,1,1,1]") >= 4);
        assert_eq!(values_in(br#""a,b:[c{""#), 1, "separators inside a string are text");
        assert_eq!(values_in(br#""a\"[,""#), 1, "an escaped quote does not end the string");
        let wide = format!("[{}]", vec!["1"; 1000].join(","));
        assert!(values_in(wide.as_bytes()) >= 1000);
    }

    #[test]
    fn arrays_flatten_exactly_one_level() {
        assert_eq!(split(r#"{"event": "created"}"#), vec![r#"{"event": "created"}"#]);
        assert_eq!(split(r#"[{"a":1}, {"b":2}]"#), vec![r#"{"a":1}"#, r#"{"b":2}"#]);
        assert_eq!(split("[[1,2], [3,4]]"), vec!["[1,2]", "[3,4]"]);
        assert_eq!(split("[[[1,2,3]]]"), vec!["[[1,2,3]]"]);
        assert_eq!(split(" 0 "), vec!["0"]);
    }

    #[test]
    fn empty_arrays_are_rejected_on_append_but_create_empty_streams() {
        assert_eq!(split_messages(b"[]", JsonBodyUse::Append), Err(Error::EmptyJsonArray));
        assert!(split_messages(b"[ ]", JsonBodyUse::Create).unwrap().is_empty());
    }

    #[test]
    fn invalid_json_is_rejected() {
        for bad in ["{", "[1,", "nope", "{\"a\":1} {\"b\":2}", "\u{0}"] {
            assert!(split_messages(bad.as_bytes(), JsonBodyUse::Append).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn splitting_keeps_every_value(values in proptest::collection::vec(any::<i64>(), 1..20)) {
            let body = serde_json::to_string(&values).unwrap();
            let parts = split_messages(body.as_bytes(), JsonBodyUse::Append).unwrap();
            let back: Vec<i64> = parts.iter().map(|p| serde_json::from_slice(p).unwrap()).collect();
            prop_assert_eq!(back, values);
        }

        #[test]
        fn splitter_never_panics(s in ".{0,64}") {
            let _ = split_messages(s.as_bytes(), JsonBodyUse::Append);
        }
    }
}
