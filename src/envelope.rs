//! Wraps a verified delivery in a CloudEvents 1.0 structured-mode JSON envelope.
//!
//! Pure: the clock is an argument. A JSON payload is embedded byte-for-byte as the
//! last member (`"data":<raw body>}`), never re-serialised, and any other body (form
//! posts) as `"data_base64"` with its media type, so a consumer holding the secret can
//! recompute the provider's signature from the envelope alone. Names no provider: the
//! verifier says what the event is called, its delivery id, subject and embedding.

use std::fmt::Write as _;
use std::time::SystemTime;

use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};

pub use crate::verify::json::MAX_JSON_DEPTH;
use crate::verify::{Data, Verified};

/// Media type of a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// CloudEvents spec version written in every envelope.
pub const SPEC_VERSION: &str = "1.0";

/// Why a stored envelope could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The bytes are not an envelope this module wrote.
    #[error("body is not valid JSON")]
    InvalidJson,
}

/// Where an envelope goes and what it says about itself: the AMQP side copies these
/// into message properties and headers so consumers can route without parsing.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Stable event id: the same delivery always gives the same id (see [`build`]).
    pub id: String,
    /// CloudEvents `source`, e.g. `/webhooks/patreon`.
    pub source: String,
    /// CloudEvents `type`, e.g. `com.patreon.members.pledge.create`.
    pub ce_type: String,
    /// Receive time, RFC 3339 in UTC with microseconds.
    pub time: String,
    /// Receive time as whole seconds since the Unix epoch (AMQP `timestamp`).
    pub unix_seconds: u64,
    /// What the event is about when the provider says, e.g. `member/42`.
    pub subject: Option<String>,
    /// The provider's own delivery id, verbatim (extension attribute `deliveryid`).
    pub delivery_id: Option<String>,
    /// AMQP routing key: `{source name}.{event name with / and : as .}`.
    pub routing_key: String,
    /// The whole structured CloudEvent as JSON.
    pub body: Bytes,
}

/// Where a source's envelopes say they come from.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Configured source name: the routing-key prefix and part of delivery-id based ids.
    pub source_name: &'a str,
    /// CloudEvents `source` attribute.
    pub ce_source: &'a str,
    /// CloudEvents `type` prefix, e.g. `com.github` (no trailing dot).
    pub type_prefix: &'a str,
}

/// Builds the envelope for a verified delivery to `target`, received at `now`.
///
/// Ids: with a provider delivery id, a UUID of (source name, delivery id) only, so a
/// provider's retry of the same delivery (even re-signed later) gets the same id;
/// without one, a UUID of (event name, body), see [`event_id`].
pub fn build(verified: &Verified<'_>, target: &Target<'_>, now: SystemTime) -> Envelope {
    let raw = verified.body();
    let event = verified.event();
    let id = match verified.delivery_id() {
        Some(delivery) => delivery_event_id(target.source_name, delivery),
        None => event_id(event, raw),
    };
    let ce_type = dotted(target.type_prefix, event);
    let mut time = String::with_capacity(32);
    // Writing to a String cannot fail.
    let _ = write!(time, "{}", humantime::format_rfc3339_micros(now));
    let unix_seconds = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let subject = verified.subject().map(str::to_owned);
    let delivery_id = verified.delivery_id().map(str::to_owned);

    let data = verified.data();
    let data_len = match data {
        Data::Json => raw.len(),
        Data::Binary { .. } => raw.len().div_ceil(3) * 4,
    };
    let mut out = Vec::with_capacity(data_len + 256 + target.ce_source.len());
    out.extend_from_slice(br#"{"specversion":"1.0","id":"#);
    push_json_str(&mut out, &id);
    out.extend_from_slice(br#","source":"#);
    push_json_str(&mut out, target.ce_source);
    out.extend_from_slice(br#","type":"#);
    push_json_str(&mut out, &ce_type);
    out.extend_from_slice(br#","time":"#);
    push_json_str(&mut out, &time);
    out.extend_from_slice(br#","datacontenttype":"#);
    match data {
        Data::Json => out.extend_from_slice(br#""application/json""#),
        Data::Binary { content_type } => push_json_str(&mut out, content_type),
    }
    if let Some(subject) = &subject {
        out.extend_from_slice(br#","subject":"#);
        push_json_str(&mut out, subject);
    }
    if let Some(delivery_id) = &delivery_id {
        out.extend_from_slice(br#","deliveryid":"#);
        push_json_str(&mut out, delivery_id);
    }
    match data {
        Data::Json => {
            out.extend_from_slice(br#","data":"#);
            out.extend_from_slice(raw);
        }
        Data::Binary { .. } => {
            out.extend_from_slice(br#","data_base64":""#);
            let start = out.len();
            out.resize(start + data_len, 0);
            // The buffer is exactly the encoded length, so this cannot fail.
            let written =
                base64::engine::general_purpose::STANDARD.encode_slice(raw, &mut out[start..]).unwrap_or(0);
            out.truncate(start + written);
            out.push(b'"');
        }
    }
    out.push(b'}');

    let routing_key = dotted(target.source_name, event);
    Envelope {
        id,
        source: target.ce_source.to_owned(),
        ce_type,
        time,
        unix_seconds,
        subject,
        delivery_id,
        routing_key,
        body: Bytes::from(out),
    }
}

/// `{prefix}.{event}` with `/` and `:` in the event name as `.`, in one exact-size
/// allocation (the type and the routing key of every event).
fn dotted(prefix: &str, event: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1 + event.len());
    out.push_str(prefix);
    out.push('.');
    out.extend(event.chars().map(|c| if c == ':' || c == '/' { '.' } else { c }));
    out
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
    #[serde(default)]
    deliveryid: Option<String>,
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
        delivery_id: head.deliveryid,
        routing_key,
        body,
    })
}

/// A UUID (version 8, RFC 9562 custom) made from SHA-256 of the event name, a zero
/// byte and the raw body. Senders without a delivery id (Patreon) retry failures with
/// the same body, so a retry maps to the same id and consumers can drop it.
pub fn event_id(event: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(event.as_bytes());
    hasher.update([0u8]);
    hasher.update(body);
    uuid_of(hasher)
}

/// A UUID (version 8) made from SHA-256 of a domain tag, the source name and the
/// provider's delivery id: nothing else, so a re-signed retry keeps its id, and the
/// tag keeps these ids apart from [`event_id`]'s.
pub fn delivery_event_id(source_name: &str, delivery_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"hookrelay-delivery\0");
    hasher.update(source_name.as_bytes());
    hasher.update([0u8]);
    hasher.update(delivery_id.as_bytes());
    uuid_of(hasher)
}

fn uuid_of(hasher: Sha256) -> String {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::verify::patreon::{PatreonVerifier, sign};
    use crate::verify::testing::{at, build as provider, headers};
    use crate::verify::{github, slack};

    const PATREON: Target<'static> =
        Target { source_name: "patreon", ce_source: "/webhooks/patreon", type_prefix: "com.patreon" };

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_374_400_123_456)
    }

    fn build_for(trigger: &str, body: &[u8]) -> Envelope {
        let v = PatreonVerifier::new([&b"k"[..]]);
        let sig = sign(b"k", body);
        let verified = v.verify(Some(sig.as_bytes()), Some(trigger.as_bytes()), body).unwrap();
        build(&verified, &PATREON, now())
    }

    #[test]
    fn envelope_is_cloudevents_with_byte_exact_data() {
        let body = br#"{"data":{"id":"42","type":"member","attributes":{"x":1.50}},"included":[]}"#;
        let env = build_for("members:pledge:create", body);
        let value: serde_json::Value = serde_json::from_slice(&env.body).unwrap();
        assert_eq!(value["specversion"], "1.0");
        assert_eq!(value["type"], "com.patreon.members.pledge.create");
        assert_eq!(value["source"], "/webhooks/patreon");
        assert_eq!(value["subject"], "member/42");
        assert_eq!(value["datacontenttype"], "application/json");
        assert_eq!(value["time"], "2025-11-29T00:00:00.123456Z");
        assert_eq!(value["id"], env.id.as_str());
        assert!(value.get("deliveryid").is_none());
        assert_eq!(env.routing_key, "patreon.members.pledge.create");
        assert_eq!(env.unix_seconds, 1_764_374_400);
        let marker = b"\"data\":";
        let at = env.body.windows(marker.len()).position(|w| w == marker).unwrap();
        assert_eq!(&env.body[at + marker.len()..env.body.len() - 1], body);
    }

    /// The exact bytes a Patreon envelope had before providers existed: its shape,
    /// id and routing key must never change.
    #[test]
    fn patreon_envelopes_are_unchanged() {
        let env = build_for("members:create", br#"{"data":{"id":"1","type":"member"}}"#);
        let want = concat!(
            r#"{"specversion":"1.0","id":""#,
            "{ID}",
            r#"","source":"/webhooks/patreon","type":"com.patreon.members.create","#,
            r#""time":"2025-11-29T00:00:00.123456Z","datacontenttype":"application/json","#,
            r#""subject":"member/1","data":{"data":{"id":"1","type":"member"}}}"#
        );
        assert_eq!(String::from_utf8(env.body.to_vec()).unwrap(), want.replace("{ID}", &env.id));
        assert_eq!(env.id, event_id("members:create", br#"{"data":{"id":"1","type":"member"}}"#));
    }

    #[test]
    fn a_built_envelope_parses_back() {
        let body = br#"{"data":{"id":"42","type":"member"}}"#;
        let env = build_for("members:pledge:create", body);
        let back = parse(env.body.clone(), env.routing_key.clone()).unwrap();
        assert_eq!(back.id, env.id);
        assert_eq!(back.source, env.source);
        assert_eq!(back.ce_type, env.ce_type);
        assert_eq!(back.time, env.time);
        assert_eq!(back.unix_seconds, env.unix_seconds);
        assert_eq!(back.subject, env.subject);
        assert_eq!(back.delivery_id, None);
        assert!(parse(Bytes::from_static(b"{}"), String::new()).is_err());
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = build_for("members:create", b"{}");
        let b = build_for("members:create", b"{}");
        let c = build_for("members:update", b"{}");
        let d = build_for("members:create", b"{ }");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_ne!(a.id, d.id);
        let parsed = uuid::Uuid::parse_str(&a.id).unwrap();
        assert_eq!(parsed.get_version_num(), 8);
    }

    fn github(body: &[u8], delivery: &str) -> Envelope {
        let p = provider(&github::KIND, &["k"]);
        let sig = github::sign(b"k", body);
        let h = headers(&[
            ("x-hub-signature-256", &sig),
            ("x-github-event", "pull_request"),
            ("x-github-delivery", delivery),
        ]);
        let verified = p.verify(&h, body, at(0)).unwrap();
        let target = Target { source_name: "gh", ce_source: "/webhooks/gh", type_prefix: "com.github" };
        build(&verified, &target, now())
    }

    #[test]
    fn delivery_ids_make_the_event_id() {
        let a = github(br#"{"action":"opened"}"#, "d-1");
        let again = github(br#"{"action":"opened"}"#, "d-1");
        let other = github(br#"{"action":"opened"}"#, "d-2");
        assert_eq!(a.id, again.id);
        assert_ne!(a.id, other.id);
        assert_eq!(a.id, delivery_event_id("gh", "d-1"));
        assert_eq!(a.delivery_id.as_deref(), Some("d-1"));
        assert_eq!(a.routing_key, "gh.pull_request.opened");
        assert_eq!(a.ce_type, "com.github.pull_request.opened");
        let value: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(value["deliveryid"], "d-1");
        assert_eq!(parse(a.body.clone(), String::new()).unwrap().delivery_id.as_deref(), Some("d-1"));
    }

    #[test]
    fn form_bodies_are_embedded_as_base64() {
        let p = provider(&slack::KIND, &["k"]);
        for body in [&b"command=%2Fdeploy&text=now"[..], b"", b"a", b"ab", b"abc"] {
            let sig = slack::sign(b"k", 100, body);
            let h = headers(&[
                ("x-slack-signature", &sig),
                ("x-slack-request-timestamp", "100"),
                ("content-type", "application/x-www-form-urlencoded"),
            ]);
            let verified = p.verify(&h, body, at(100)).unwrap();
            let target = Target { source_name: "s", ce_source: "/webhooks/s", type_prefix: "com.slack" };
            let env = build(&verified, &target, now());
            let value: serde_json::Value = serde_json::from_slice(&env.body).unwrap();
            assert_eq!(value["datacontenttype"], "application/x-www-form-urlencoded");
            assert!(value.get("data").is_none());
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value["data_base64"].as_str().unwrap())
                .unwrap();
            assert_eq!(decoded, body);
        }
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
            let env = build_for("posts:publish", body);
            assert_eq!(env.subject.as_deref(), subject, "{}", String::from_utf8_lossy(body));
            assert!(env.body.ends_with(&[body, b"}"].concat()));
        }
    }

    #[test]
    fn the_deepest_accepted_payload_gives_an_envelope_serde_json_parses() {
        let deepest = format!("{}{}", "[".repeat(MAX_JSON_DEPTH), "]".repeat(MAX_JSON_DEPTH));
        let env = build_for("posts:publish", deepest.as_bytes());
        let value: serde_json::Value = serde_json::from_slice(&env.body).unwrap();
        assert!(value["data"].is_array());
    }

    #[test]
    fn whitespace_around_the_document_stays_valid_json() {
        let env = build_for("posts:publish", b"\n {\"data\":{}}\n");
        let _: serde_json::Value = serde_json::from_slice(&env.body).unwrap();
        assert!(env.body.ends_with(b"{\"data\":{}}\n}"));
    }
}
