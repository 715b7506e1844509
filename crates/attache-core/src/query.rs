//! Query strings as they arrive on read routes (`?offset=..&live=..&cursor=..`):
//! `application/x-www-form-urlencoded` pairs, decoded leniently the way
//! browsers and `URLSearchParams` do (a malformed escape is kept as text).

/// `application/x-www-form-urlencoded` pairs, percent-decoded, in order.
pub fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Decodes `%XX` escapes and `+` (a space); anything else, including a `%`
/// not followed by two hex digits, is kept as it is.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', pair @ Some(_)) => crate::principal::hex_pair(pair),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_decode_escapes_and_plus() {
        assert_eq!(
            form_pairs("offset=-1&live=long-poll&&cursor=a%2Bb+c&flag"),
            vec![
                ("offset".into(), "-1".into()),
                ("live".into(), "long-poll".into()),
                ("cursor".into(), "a+b c".into()),
                ("flag".into(), String::new()),
            ]
        );
    }

    #[test]
    fn a_percent_without_two_hex_digits_is_kept_as_text() {
        assert_eq!(percent_decode("%+1%-1%zz%4"), "% 1%-1%zz%4");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%41%e9"), "A\u{fffd}");
    }
}
