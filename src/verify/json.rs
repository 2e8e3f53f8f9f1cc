//! One pass over a JSON body that validates it and picks out the few values a
//! provider needs (`type`, `id`, `event.type`, `data.id`…), without building a tree
//! and without copying strings that have no escapes.

use std::borrow::Cow;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Deepest nesting of arrays and objects accepted in a payload. The envelope puts the
/// payload one level deeper, and serde_json's default recursion limit (128) parses at
/// most 127 levels into a `Value`: 126 keeps every envelope parseable by consumers
/// with default settings (found by the envelope fuzz target's invariants).
pub const MAX_JSON_DEPTH: usize = 126;

/// Most paths one scan looks for.
pub const MAX_PATHS: usize = 8;

/// Why a body that must be JSON was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The body is not a JSON document in UTF-8 (includes an empty body).
    #[error("body is not valid JSON")]
    Invalid,
    /// The body nests arrays and objects deeper than [`MAX_JSON_DEPTH`]; no provider
    /// sends that, and consumers' parsers could fail on it.
    #[error("body nests JSON too deeply")]
    TooDeep,
}

/// A value found at a path: a string, or an integer written as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found<'de> {
    /// A JSON string (borrowed when it has no escapes).
    Str(Cow<'de, str>),
    /// A JSON integer, as decimal text.
    Int(String),
}

impl<'de> Found<'de> {
    /// The value as text, whatever it was.
    pub fn into_text(self) -> Cow<'de, str> {
        match self {
            Found::Str(s) => s,
            Found::Int(n) => Cow::Owned(n),
        }
    }

    /// The value only when it was a JSON string.
    pub fn into_str(self) -> Option<Cow<'de, str>> {
        match self {
            Found::Str(s) => Some(s),
            Found::Int(_) => None,
        }
    }
}

/// What a scan found: one slot per path asked for, in the same order.
pub type Values<'de> = [Option<Found<'de>>; MAX_PATHS];

/// Validates `raw` as JSON (UTF-8, syntax, depth at most [`MAX_JSON_DEPTH`]) and
/// returns the string or integer at each of `paths` (object keys from the top, at most
/// [`MAX_PATHS`]; a longer list is cut). Other values (null, floats, objects) and
/// absent paths give `None`.
pub fn scan<'de>(raw: &'de [u8], paths: &[&[&str]]) -> Result<Values<'de>, JsonError> {
    if too_deep(raw, MAX_JSON_DEPTH) {
        return Err(JsonError::TooDeep);
    }
    // JSON text is UTF-8, and the parser does not check the strings it skips:
    // check it here so that no consumer's strict parser can choke on the envelope.
    let text = std::str::from_utf8(raw).map_err(|_| JsonError::Invalid)?;
    let paths = &paths[..paths.len().min(MAX_PATHS)];
    let mut out: Values<'de> = Default::default();
    let all = (1u16 << paths.len()) - 1;
    let mut de = serde_json::Deserializer::from_str(text);
    let seeded = Level { paths, depth: 0, active: all, out: &mut out }.deserialize(&mut de);
    match seeded.and_then(|()| de.end()) {
        Ok(()) => Ok(out),
        // Valid JSON all the same when only a wanted value could not be decoded, e.g.
        // a number beyond f64 (syntax is all the relay checks elsewhere): relay it
        // without the values. Only this rare path parses twice.
        Err(_) if serde_json::from_str::<IgnoredAny>(text).is_ok() => Ok(Default::default()),
        Err(_) => Err(JsonError::Invalid),
    }
}

/// Whether brackets outside strings nest deeper than `max`. No allocation; run before
/// parsing so the parser never walks an absurd document.
pub fn too_deep(raw: &[u8], max: usize) -> bool {
    // Nesting can never exceed the number of opening brackets. Counting them is
    // branch-free and vectorises, and real payloads have a few dozen (Patreon's: at
    // most 32), so the byte-by-byte walk below only runs for documents that could be
    // too deep. Counted in byte lanes, 255 bytes at a time so that a lane cannot
    // overflow: 0.1 µs per 4 KiB, where `filter().count()` widened every byte to
    // 64 bits and took 1.4 µs.
    let openers: usize = raw
        .chunks(255)
        .map(|chunk| usize::from(chunk.iter().map(|&b| u8::from(b == b'[' || b == b'{')).sum::<u8>()))
        .sum();
    if openers <= max {
        return false;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in raw {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// One nesting level of the scan: which paths are still live here (a bit each) and
/// how deep we are along them.
struct Level<'p, 'f, 'de> {
    paths: &'p [&'p [&'p str]],
    depth: usize,
    active: u16,
    out: &'f mut Values<'de>,
}

impl<'de> DeserializeSeed<'de> for Level<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Level<'_, '_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Level { paths, depth, active, out } = self;
        while let Some(hit) = map.next_key_seed(KeyMatch { paths, depth, active })? {
            match hit {
                Hit::Leaf(i) => {
                    let value = map.next_value::<Scalar<'de>>()?.0;
                    if let Some(slot) = out.get_mut(i) {
                        *slot = value;
                    }
                }
                Hit::Deeper(next) => {
                    // A repeated key: the last value wins, whole (as a parser building a
                    // tree would see it), so forget what an earlier one gave.
                    for (i, slot) in out.iter_mut().enumerate() {
                        if next & (1 << i) != 0 {
                            *slot = None;
                        }
                    }
                    map.next_value_seed(Level { paths, depth: depth + 1, active: next, out: &mut *out })?
                }
                Hit::Nothing => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// What an object key means for the live paths.
enum Hit {
    /// Path `i` ends here: its value is wanted.
    Leaf(usize),
    /// These paths continue inside the value.
    Deeper(u16),
    /// No live path goes through this key.
    Nothing,
}

/// Compares a key with the live paths in place: serde's own `Cow<str>` would
/// allocate a `String` for every key of the payload.
struct KeyMatch<'p> {
    paths: &'p [&'p [&'p str]],
    depth: usize,
    active: u16,
}

impl<'de> DeserializeSeed<'de> for KeyMatch<'_> {
    type Value = Hit;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Hit, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyMatch<'_> {
    type Value = Hit;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E>(self, key: &str) -> Result<Hit, E> {
        let mut deeper = 0u16;
        for (i, path) in self.paths.iter().enumerate() {
            if self.active & (1 << i) == 0 || path.get(self.depth) != Some(&key) {
                continue;
            }
            if path.len() == self.depth + 1 {
                return Ok(Hit::Leaf(i));
            }
            deeper |= 1 << i;
        }
        Ok(if deeper == 0 { Hit::Nothing } else { Hit::Deeper(deeper) })
    }
}

/// A string or integer; anything else (null, objects…) as `None`. A string
/// without escapes borrows from the body.
struct Scalar<'de>(Option<Found<'de>>);

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar(Some(Found::Str(Cow::Borrowed(v)))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar(Some(Found::Str(Cow::Owned(v.to_owned())))))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar(Some(Found::Int(v.to_string()))))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
                Ok(Scalar(Some(Found::Int(v.to_string()))))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Scalar<'de>, E> {
                Ok(Scalar(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar(None))
            }
            fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn text(v: &Option<Found<'_>>) -> Option<String> {
        v.clone().map(|f| f.into_text().into_owned())
    }

    #[test]
    fn finds_nested_and_top_level_values_in_one_pass() {
        let body =
            br#"{"type":"event_callback","event":{"type":"app_mention","n":1},"event_id":"Ev1","id":7}"#;
        let got = scan(body, &[&["type"], &["event", "type"], &["event_id"], &["id"], &["missing"]]).unwrap();
        assert_eq!(text(&got[0]).as_deref(), Some("event_callback"));
        assert_eq!(text(&got[1]).as_deref(), Some("app_mention"));
        assert_eq!(text(&got[2]).as_deref(), Some("Ev1"));
        assert_eq!(got[3], Some(Found::Int("7".into())));
        assert_eq!(got[4], None);
        assert!(matches!(got[0], Some(Found::Str(Cow::Borrowed(_)))));
    }

    #[test]
    fn wrong_shapes_find_nothing() {
        let paths: &[&[&str]] = &[&["data", "type"], &["data", "id"]];
        for body in
            [&br#"{"data":[1,2]}"#[..], br#"{"data":null}"#, br#"[{"data":{"id":"1"}}]"#, b"3", br#""s""#]
        {
            let got = scan(body, paths).unwrap();
            assert!(got.iter().all(Option::is_none), "{}", String::from_utf8_lossy(body));
        }
        let got = scan(br#"{"data":{"id":null,"type":1.5,"x":{"id":"no"}}}"#, paths).unwrap();
        assert!(got.iter().all(Option::is_none));
    }

    #[test]
    fn non_json_is_refused() {
        for body in [&b""[..], b"{", b"not json", b"{\"a\":1} x", b"\xff", b"{\"a\":\"\xff\"}", b"a=b&c=d"] {
            assert_eq!(scan(body, &[]), Err(JsonError::Invalid), "{}", String::from_utf8_lossy(body));
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(scan(deep.as_bytes(), &[]), Err(JsonError::TooDeep));
        let ok = format!("{}{}", "[".repeat(MAX_JSON_DEPTH), "]".repeat(MAX_JSON_DEPTH));
        assert!(scan(ok.as_bytes(), &[]).is_ok());
        let in_string = format!("{{\"a\":\"{}\\\"\"}}", "[".repeat(1000));
        assert!(scan(in_string.as_bytes(), &[]).is_ok());
    }

    #[test]
    fn numbers_beyond_f64_are_valid_json() {
        let got = scan(br#"{"type":"x","n":1e999999}"#, &[&["type"]]).unwrap();
        assert_eq!(text(&got[0]).as_deref(), Some("x"));
        let got = scan(br#"{"id":1e999999,"type":"x"}"#, &[&["id"], &["type"]]).unwrap();
        assert!(got.iter().all(Option::is_none));
        assert_eq!(scan(br#"{"id":1e}"#, &[&["id"]]), Err(JsonError::Invalid));
    }

    #[test]
    fn a_repeated_key_counts_with_its_last_value() {
        let paths: &[&[&str]] = &[&["data", "type"], &["data", "id"], &["type"]];
        let got = scan(br#"{"data":{"type":"a","id":"1"},"data":{"id":"2"},"type":"x","type":"y"}"#, paths)
            .unwrap();
        assert_eq!((text(&got[0]), text(&got[1]), text(&got[2])), (None, Some("2".into()), Some("y".into())));
        let got = scan(br#"{"data":{"type":"a","id":"1"},"data":null}"#, paths).unwrap();
        assert!(got.iter().all(Option::is_none));
    }

    #[test]
    fn escaped_keys_and_values_are_read_like_plain_ones() {
        let got = scan(br#"{"d\u0061ta":{"\u0074ype":"p\u006fst"}}"#, &[&["data", "type"]]).unwrap();
        assert_eq!(text(&got[0]).as_deref(), Some("post"));
    }

    #[test]
    fn many_shallow_brackets_are_not_too_deep() {
        assert!(!too_deep(b"[[]]", 2));
        assert!(too_deep(b"[[[]]]", 2));
        assert!(!too_deep(br#"[["[[["]]"#, 2));
        let wide = format!("[{}[]]", "[],".repeat(2 * MAX_JSON_DEPTH));
        assert!(scan(wide.as_bytes(), &[]).is_ok());
    }
}
