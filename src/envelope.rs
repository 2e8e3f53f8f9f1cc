//! Wraps a verified delivery in a CloudEvents 1.0 structured-mode JSON envelope.
//!
//! Pure: the clock is an argument. The payload is embedded byte-for-byte as the last
//! member (`"data":<raw body>}`), never re-serialised, so a consumer holding the secret
//! can recompute the provider's signature from the envelope alone.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::SystemTime;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use sha2::{Digest, Sha256};

use crate::verify::Verified;

/// Media type of a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// CloudEvents spec version written in every envelope.
pub const SPEC_VERSION: &str = "1.0";
/// Prefix of the CloudEvents `type` for Patreon triggers.
pub const PATREON_TYPE_PREFIX: &str = "com.patreon.";

/// Why a verified body could not be wrapped (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The body is not a JSON document (includes an empty body).
    #[error("body is not valid JSON")]
    InvalidJson,
    /// The body nests arrays and objects deeper than [`MAX_JSON_DEPTH`]; no provider
    /// sends that, and consumers' parsers could fail on it.
    #[error("body nests JSON too deeply")]
    TooDeep,
}

/// Deepest nesting of arrays and objects accepted in a payload. The envelope puts the
/// payload one level deeper, and serde_json's default recursion limit (128) parses at
/// most 127 levels into a `Value`: 126 keeps every envelope parseable by consumers
/// with default settings (found by the envelope fuzz target's invariants).
pub const MAX_JSON_DEPTH: usize = 126;

/// Where an envelope goes and what it says about itself: the AMQP side copies these
/// into message properties and headers so consumers can route without parsing.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Stable event id: the same trigger and body always give the same id.
    pub id: String,
    /// CloudEvents `source`, e.g. `/webhooks/patreon`.
    pub source: String,
    /// CloudEvents `type`, e.g. `com.patreon.members.pledge.create`.
    pub ce_type: String,
    /// Receive time, RFC 3339 in UTC with microseconds.
    pub time: String,
    /// Receive time as whole seconds since the Unix epoch (AMQP `timestamp`).
    pub unix_seconds: u64,
    /// `{data.type}/{data.id}` when the payload names both.
    pub subject: Option<String>,
    /// AMQP routing key: `{source name}.{trigger with : as .}`.
    pub routing_key: String,
    /// The whole structured CloudEvent as JSON.
    pub body: Bytes,
}

/// Builds the envelope for a verified delivery to the source named `source_name`,
/// whose CloudEvents `source` attribute is `ce_source`, received at `now`.
pub fn build(
    verified: &Verified<'_>,
    source_name: &str,
    ce_source: &str,
    now: SystemTime,
) -> Result<Envelope, EnvelopeError> {
    let raw = verified.body();
    let subject = parse_subject(raw)?;
    let trigger = verified.trigger();
    let dotted = trigger.dotted();
    let id = event_id(trigger.as_str(), raw);
    let ce_type = format!("{PATREON_TYPE_PREFIX}{dotted}");
    let mut time = String::with_capacity(32);
    // Writing to a String cannot fail.
    let _ = write!(time, "{}", humantime::format_rfc3339_micros(now));
    let unix_seconds = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());

    let mut out = Vec::with_capacity(raw.len() + 256 + ce_source.len());
    out.extend_from_slice(br#"{"specversion":"1.0","id":"#);
    push_json_str(&mut out, &id);
    out.extend_from_slice(br#","source":"#);
    push_json_str(&mut out, ce_source);
    out.extend_from_slice(br#","type":"#);
    push_json_str(&mut out, &ce_type);
    out.extend_from_slice(br#","time":"#);
    push_json_str(&mut out, &time);
    out.extend_from_slice(br#","datacontenttype":"application/json""#);
    if let Some(subject) = &subject {
        out.extend_from_slice(br#","subject":"#);
        push_json_str(&mut out, subject);
    }
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(raw);
    out.push(b'}');

    Ok(Envelope {
        id,
        source: ce_source.to_owned(),
        ce_type,
        time,
        unix_seconds,
        subject,
        routing_key: format!("{source_name}.{dotted}"),
        body: Bytes::from(out),
    })
}

/// The attributes of an envelope this module wrote; other members (`data`) are
/// skipped by the parser without being copied.
#[derive(serde::Deserialize)]
struct Head {
    id: String,
    source: String,
    #[serde(rename = "type")]
    ce_type: String,
    time: String,
    #[serde(default)]
    subject: Option<String>,
}

/// Reads back an envelope this module built (e.g. from the spool), so it can be
/// published with the same properties. `data` is skipped, not copied.
pub fn parse(body: Bytes, routing_key: String) -> Result<Envelope, EnvelopeError> {
    let head: Head = serde_json::from_slice(&body).map_err(|_| EnvelopeError::InvalidJson)?;
    let unix_seconds = humantime::parse_rfc3339(&head.time)
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Ok(Envelope {
        id: head.id,
        source: head.source,
        ce_type: head.ce_type,
        time: head.time,
        unix_seconds,
        subject: head.subject,
        routing_key,
        body,
    })
}

/// A UUID (version 8, RFC 9562 custom) made from SHA-256 of the trigger, a zero
/// byte and the raw body. Patreon sends no delivery id but retries failures with the
/// same body, so a retry maps to the same id and consumers can drop it.
pub fn event_id(trigger: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(trigger.as_bytes());
    hasher.update([0u8]);
    hasher.update(body);
    let digest = hasher.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    uuid::Uuid::new_v8(first).to_string()
}

/// Appends `s` as a JSON string literal. Serialising a `&str` cannot fail.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// Validates the whole body as JSON and pulls out `data.type` and `data.id` in one
/// pass, without building a tree of the payload.
fn parse_subject(raw: &[u8]) -> Result<Option<String>, EnvelopeError> {
    if too_deep(raw, MAX_JSON_DEPTH) {
        return Err(EnvelopeError::TooDeep);
    }
    // JSON text is UTF-8, and the parser does not check the strings it skips:
    // check it here so that no consumer's strict parser can choke on the envelope.
    let text = std::str::from_utf8(raw).map_err(|_| EnvelopeError::InvalidJson)?;
    let top = match serde_json::from_str::<TopLevel<'_>>(text) {
        Ok(top) => top,
        // Valid JSON all the same when only the subject could not be decoded, e.g. a
        // `data.id` number beyond f64 (syntax is all the relay checks elsewhere):
        // relay it without a subject. Only this rare path parses twice.
        Err(_) if serde_json::from_str::<IgnoredAny>(text).is_ok() => TopLevel(None),
        Err(_) => return Err(EnvelopeError::InvalidJson),
    };
    Ok(match top.0 {
        Some(DataRef { kind: Some(kind), id: Some(id) }) if !kind.is_empty() && !id.is_empty() => {
            let mut subject = String::with_capacity(kind.len() + 1 + id.len());
            subject.push_str(&kind);
            subject.push('/');
            subject.push_str(&id);
            Some(subject)
        }
        _ => None,
    })
}

/// Whether brackets outside strings nest deeper than `max`. No allocation; run before
/// parsing so the parser never walks an absurd document.
fn too_deep(raw: &[u8], max: usize) -> bool {
    // Nesting can never exceed the number of opening brackets. Counting them is
    // branch-free and vectorises (about 0.3 µs per 4 KiB, against about 10 µs for the
    // byte-by-byte walk below), and real payloads have a few dozen (Patreon's: at most
    // 32), so the walk only runs for documents that could be too deep.
    let openers = raw.iter().filter(|&&b| b == b'[' || b == b'{').count();
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

/// The top-level document: only `data` is looked at; any other JSON value is fine.
/// Keys and values borrow from the body where they can, so reading a payload
/// allocates nothing until the subject is built.
struct TopLevel<'de>(Option<DataRef<'de>>);

/// `data.type` and `data.id` when they are a string (or, for the id, a number).
#[derive(Default)]
struct DataRef<'de> {
    kind: Option<Cow<'de, str>>,
    id: Option<Cow<'de, str>>,
}

/// An object key, sorted into the few names looked for. Compared in place: serde's
/// own `Cow<str>` would allocate a `String` for every key of the payload.
enum Key {
    Data,
    Type,
    Id,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "data" => Key::Data,
                    "type" => Key::Type,
                    "id" => Key::Id,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> de::Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON document")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel<'de>, A::Error> {
                let mut data = None;
                while let Some(key) = map.next_key::<Key>()? {
                    if let Key::Data = key {
                        data = Some(map.next_value::<DataRef<'de>>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(TopLevel(data))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<TopLevel<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TopLevel(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<TopLevel<'de>, E> {
                Ok(TopLevel(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<TopLevel<'de>, E> {
                Ok(TopLevel(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<TopLevel<'de>, E> {
                Ok(TopLevel(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<TopLevel<'de>, E> {
                Ok(TopLevel(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<TopLevel<'de>, E> {
                Ok(TopLevel(None))
            }
            fn visit_unit<E>(self) -> Result<TopLevel<'de>, E> {
                Ok(TopLevel(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> de::Deserialize<'de> for DataRef<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DataRef<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DataRef<'de>, A::Error> {
                let mut out = DataRef::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Type => out.kind = map.next_value::<Scalar<'de>>()?.0,
                        Key::Id => out.id = map.next_value::<Scalar<'de>>()?.0,
                        Key::Data | Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<DataRef<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(DataRef::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<DataRef<'de>, E> {
                Ok(DataRef::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<DataRef<'de>, E> {
                Ok(DataRef::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<DataRef<'de>, E> {
                Ok(DataRef::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<DataRef<'de>, E> {
                Ok(DataRef::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<DataRef<'de>, E> {
                Ok(DataRef::default())
            }
            fn visit_unit<E>(self) -> Result<DataRef<'de>, E> {
                Ok(DataRef::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// A string or integer as text; anything else (null, objects…) as `None`. A string
/// without escapes borrows from the body.
struct Scalar<'de>(Option<Cow<'de, str>>);

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
                Ok(Scalar(Some(Cow::Owned(v.to_string()))))
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
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
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
    use std::time::Duration;

    use super::*;
    use crate::verify::patreon::{PatreonVerifier, sign};

    fn build_for(trigger: &str, body: &[u8]) -> Result<Envelope, EnvelopeError> {
        let v = PatreonVerifier::new([&b"k"[..]]);
        let sig = sign(b"k", body);
        let verified = v.verify(Some(sig.as_bytes()), Some(trigger.as_bytes()), body).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_374_400_123_456);
        build(&verified, "patreon", "/webhooks/patreon", now)
    }

    #[test]
    fn envelope_is_cloudevents_with_byte_exact_data() {
        let body = br#"{"data":{"id":"42","type":"member","attributes":{"x":1.50}},"included":[]}"#;
        let env = build_for("members:pledge:create", body).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&env.body).unwrap();
        assert_eq!(value["specversion"], "1.0");
        assert_eq!(value["type"], "com.patreon.members.pledge.create");
        assert_eq!(value["source"], "/webhooks/patreon");
        assert_eq!(value["subject"], "member/42");
        assert_eq!(value["datacontenttype"], "application/json");
        assert_eq!(value["time"], "2025-11-29T00:00:00.123456Z");
        assert_eq!(value["id"], env.id.as_str());
        assert_eq!(env.routing_key, "patreon.members.pledge.create");
        assert_eq!(env.unix_seconds, 1_764_374_400);
        let marker = b"\"data\":";
        let at = env.body.windows(marker.len()).position(|w| w == marker).unwrap();
        assert_eq!(&env.body[at + marker.len()..env.body.len() - 1], body);
    }

    #[test]
    fn a_built_envelope_parses_back() {
        let body = br#"{"data":{"id":"42","type":"member"}}"#;
        let env = build_for("members:pledge:create", body).unwrap();
        let back = parse(env.body.clone(), env.routing_key.clone()).unwrap();
        assert_eq!(back.id, env.id);
        assert_eq!(back.source, env.source);
        assert_eq!(back.ce_type, env.ce_type);
        assert_eq!(back.time, env.time);
        assert_eq!(back.unix_seconds, env.unix_seconds);
        assert_eq!(back.subject, env.subject);
        assert!(parse(Bytes::from_static(b"{}"), String::new()).is_err());
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = build_for("members:create", b"{}").unwrap();
        let b = build_for("members:create", b"{}").unwrap();
        let c = build_for("members:update", b"{}").unwrap();
        let d = build_for("members:create", b"{ }").unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_ne!(a.id, d.id);
        let parsed = uuid::Uuid::parse_str(&a.id).unwrap();
        assert_eq!(parsed.get_version_num(), 8);
    }

    #[test]
    fn subject_rules() {
        let cases: [(&[u8], Option<&str>); 8] = [
            (br#"{"data":{"id":null,"type":"member"}}"#, None),
            (br#"{"data":{"type":"member"}}"#, None),
            (br#"{"data":{"id":"1"}}"#, None),
            (br#"{"data":{"id":7,"type":"pledge"}}"#, Some("pledge/7")),
            (br#"{"data":[1,2]}"#, None),
            (br#"{"data":null}"#, None),
            (br#"[{"data":{"id":"1","type":"x"}}]"#, None),
            (br#"{"data":{"type":"post","id":"9","attributes":{"id":"no"}}}"#, Some("post/9")),
        ];
        for (body, want) in cases {
            let env = build_for("posts:publish", body).unwrap();
            assert_eq!(env.subject.as_deref(), want, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn non_json_is_refused() {
        for body in [&b""[..], b"{", b"not json", b"{\"a\":1} x", b"\xff", b"{\"a\":\"\xff\"}"] {
            assert!(matches!(build_for("posts:publish", body), Err(EnvelopeError::InvalidJson)));
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(build_for("posts:publish", deep.as_bytes()), Err(EnvelopeError::TooDeep)));
        let ok = format!("{}{}", "[".repeat(MAX_JSON_DEPTH), "]".repeat(MAX_JSON_DEPTH));
        assert!(build_for("posts:publish", ok.as_bytes()).is_ok());
        let in_string = format!("{{\"a\":\"{}\\\"\"}}", "[".repeat(1000));
        assert!(build_for("posts:publish", in_string.as_bytes()).is_ok());
    }

    /// Found by the envelope fuzz target: numbers beyond f64 are valid JSON wherever
    /// they are, `data.id` included (they used to make the body "invalid").
    #[test]
    fn numbers_beyond_f64_are_relayed_even_in_data_id() {
        let cases: [(&[u8], Option<&str>); 3] = [
            (br#"{"data":{"id":1e999999,"type":"x"},"n":123456789012345678901234567890}"#, None),
            (br#"{"data":{"id":"1","type":"x"},"n":-1e999999}"#, Some("x/1")),
            (br#"{"data":{"type":-1e400,"id":"1"}}"#, None),
        ];
        for (body, subject) in cases {
            let env = build_for("posts:publish", body).unwrap();
            assert_eq!(env.subject.as_deref(), subject, "{}", String::from_utf8_lossy(body));
            assert!(env.body.ends_with(&[body, b"}"].concat()));
        }
        assert!(matches!(
            build_for("posts:publish", br#"{"data":{"id":1e}}"#),
            Err(EnvelopeError::InvalidJson)
        ));
    }

    #[test]
    fn the_deepest_accepted_payload_gives_an_envelope_serde_json_parses() {
        let deepest = format!("{}{}", "[".repeat(MAX_JSON_DEPTH), "]".repeat(MAX_JSON_DEPTH));
        let env = build_for("posts:publish", deepest.as_bytes()).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&env.body).unwrap();
        assert!(value["data"].is_array());
        let deeper = format!("[{deepest}]");
        assert!(matches!(build_for("posts:publish", deeper.as_bytes()), Err(EnvelopeError::TooDeep)));
    }

    #[test]
    fn escaped_keys_and_values_are_read_like_plain_ones() {
        let body = br#"{"d\u0061ta":{"\u0074ype":"p\u006fst","id":"9\/1"}}"#;
        let env = build_for("posts:publish", body).unwrap();
        assert_eq!(env.subject.as_deref(), Some("post/9/1"));
    }

    #[test]
    fn many_shallow_brackets_are_not_too_deep() {
        // More openers than the limit (so the exact walk runs), none nested deeply.
        let wide = format!("[{}[]]", "[],".repeat(2 * MAX_JSON_DEPTH));
        assert!(build_for("posts:publish", wide.as_bytes()).is_ok());
        let mut deep_in_wide = format!("[{}", "[],".repeat(2 * MAX_JSON_DEPTH));
        deep_in_wide.push_str(&"[".repeat(MAX_JSON_DEPTH));
        deep_in_wide.push_str(&"]".repeat(MAX_JSON_DEPTH + 1));
        assert!(matches!(build_for("posts:publish", deep_in_wide.as_bytes()), Err(EnvelopeError::TooDeep)));
        assert!(!too_deep(b"[[]]", 2));
        assert!(too_deep(b"[[[]]]", 2));
        assert!(!too_deep(br#"[["[[["]]"#, 2));
    }

    #[test]
    fn whitespace_around_the_document_stays_valid_json() {
        let env = build_for("posts:publish", b"\n {\"data\":{}}\n").unwrap();
        let _: serde_json::Value = serde_json::from_slice(&env.body).unwrap();
        assert!(env.body.ends_with(b"{\"data\":{}}\n}"));
    }
}
