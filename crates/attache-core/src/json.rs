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
    let text = std::str::from_utf8(body).map_err(|_| Error::InvalidJson("body is not UTF-8".into()))?;
    let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
    if trimmed.is_empty() {
        return match usage {
            JsonBodyUse::Create => Ok(Vec::new()),
            JsonBodyUse::Append => Err(Error::InvalidJson("body is empty".into())),
        };
    }
    if trimmed.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(trimmed).map_err(|e| Error::InvalidJson(e.to_string()))?;
        if items.is_empty() && usage == JsonBodyUse::Append {
            return Err(Error::EmptyJsonArray);
        }
        Ok(items.into_iter().map(|raw| raw.get().as_bytes()).collect())
    } else {
        let one: &RawValue = serde_json::from_str(trimmed).map_err(|e| Error::InvalidJson(e.to_string()))?;
        Ok(vec![one.get().as_bytes()])
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
