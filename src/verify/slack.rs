//! Slack: `X-Slack-Signature: v0=<hex>`, HMAC-SHA256 of
//! `v0:{X-Slack-Request-Timestamp}:{raw body}` keyed with the app's signing secret,
//! the timestamp within the tolerance.
//!
//! Events API bodies are JSON: an `event_callback` is named `event.{event.type}`, any
//! other by its `type`, and `event_id` is the delivery id (kept on retries, which
//! carry `X-Slack-Retry-Num` and a fresh timestamp). Slash commands and interactivity
//! are form posts, relayed as bytes: `command` when the form has a `command` field,
//! else `interaction`. A signed `url_verification` is answered with its challenge.

use std::borrow::Cow;
use std::sync::LazyLock;
use std::time::SystemTime;

use super::event::{self, EventSource};
use super::keyed::{Keyed, KnownEvents, Layout, lines};
use super::keys::{hex_digest, mac};
use super::{
    Data, HeaderLines, HeaderMap, Kind, Outcome, Provider, ProviderSettings, SettingError, SignInput,
    SignatureError, Verified, VerifyError, check_timestamp, data_for, header, json,
};

/// Header carrying `v0=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
/// Header carrying the signed Unix timestamp.
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";

const PREFIX: &[u8] = b"v0=";
const URL_VERIFICATION: &str = "url_verification";

/// The `slack` kind.
pub const KIND: Kind =
    Kind { name: "slack", default_type_prefix: Some("com.slack"), build, sign: sign_headers };

/// Event names counted by name (the `event` label); others count as `other`.
pub static KNOWN_EVENTS: KnownEvents = LazyLock::new(|| lines(include_str!("known_events/slack.txt")));

fn build(settings: &ProviderSettings<'_>) -> Result<Box<dyn Provider>, SettingError> {
    let layout = Layout {
        kind: KIND.name,
        names: [SIGNATURE_HEADER, TIMESTAMP_HEADER],
        event: None,
        known: &KNOWN_EVENTS,
    };
    Keyed::build(settings, settings.secrets.iter().copied(), layout, verify)
}

fn verify<'a>(source: &Keyed<2>, headers: &'a HeaderMap, body: &'a [u8], now: SystemTime) -> Outcome<'a> {
    let [signature, timestamp] = &source.names;
    let sig = header(headers, signature).ok_or(SignatureError::Missing)?.trim_ascii();
    let digest = sig.strip_prefix(PREFIX).and_then(hex_digest::<32>).ok_or(SignatureError::Malformed)?;
    let ts = header(headers, timestamp).map(<[u8]>::trim_ascii);
    check_timestamp(ts, now, None)?;
    let ts = ts.unwrap_or_default();
    source.check(&[b"v0:", ts, b":", body], &[digest])?;
    check_timestamp(Some(ts), now, source.tolerance)?;
    match data_for(headers) {
        Data::Json => json_event(body, source.known()),
        binary @ Data::Binary { .. } => {
            let name = if form_has_field(body, b"command") { "command" } else { "interaction" };
            Ok(Verified::new(body, Cow::Borrowed(name), event::label(name, source.known())).with_data(binary))
        }
    }
}

/// Names an Events API body, and answers its URL verification.
fn json_event<'a>(body: &'a [u8], known: &'static [&'static str]) -> Result<Verified<'a>, VerifyError> {
    let [kind, inner, event_id, challenge, ..] =
        json::scan(body, &[&["type"], &["event", "type"], &["event_id"], &["challenge"]])?;
    let kind = event::check_text(kind.and_then(json::Found::into_str), EventSource::Body("type"))?;
    let name = if kind == "event_callback" {
        let inner = inner
            .and_then(json::Found::into_str)
            .ok_or(event::EventError::Missing(EventSource::Body("event.type")))?;
        let full = format!("event.{inner}");
        event::check(Some(full.as_bytes()), EventSource::Body("event.type"))?;
        Cow::Owned(full)
    } else {
        kind
    };
    let label = event::label(&name, known);
    let verified = Verified::new(body, name, label)
        .with_delivery_id(event::delivery_id(event_id.and_then(json::Found::into_str)));
    if verified.event() == URL_VERIFICATION {
        let challenge = challenge.and_then(json::Found::into_str).unwrap_or_default();
        let reply = serde_json::json!({ "challenge": challenge }).to_string().into_bytes();
        return Ok(verified.with_reply(reply));
    }
    Ok(verified)
}

/// Whether a form body (`a=1&b=2`) has a field named `name` (names are compared as
/// sent: Slack does not encode its own field names).
fn form_has_field(body: &[u8], name: &[u8]) -> bool {
    body.split(|&b| b == b'&').any(|pair| pair.split(|&b| b == b'=').next() == Some(name))
}

/// The `X-Slack-Signature` value a request of `body` at `timestamp` carries.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let t = timestamp.to_string();
    format!(
        "v0={}",
        hex::encode(mac::<hmac::Hmac<sha2::Sha256>>(secret, &[b"v0:", t.as_bytes(), b":", body]))
    )
}

fn sign_headers(input: &SignInput<'_>) -> Result<HeaderLines, SettingError> {
    input.options.refuse_all(KIND.name)?;
    Ok(vec![
        ("X-Slack-Request-Timestamp".into(), input.timestamp.to_string()),
        ("X-Slack-Signature".into(), sign(input.secret, input.timestamp, input.body)),
    ])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::verify::testing::{at, build, headers, vector, vector_body, vector_headers};

    const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

    #[test]
    fn official_vector() {
        let v = vector("slack-official");
        let body = vector_body(&v);
        let secret = v["secret"].as_str().unwrap();
        assert_eq!(
            sign(secret.as_bytes(), 1_531_420_618, &body),
            v["headers"]["X-Slack-Signature"].as_str().unwrap()
        );
        let p = build(&KIND, &[secret]);
        let h = vector_headers(&v, &[FORM]);
        let ok = p.verify(&h, &body, at(1_531_420_678)).unwrap();
        assert_eq!(ok.event(), "command");
        assert_eq!(ok.data(), Data::Binary { content_type: FORM.1 });
        assert_eq!(ok.delivery_id(), None);
        assert_eq!(
            p.verify(&h, &body, at(1_531_420_919)).unwrap_err(),
            VerifyError::Signature(SignatureError::Stale)
        );
        assert_eq!(
            p.verify(&h, &body, at(1_531_420_000)).unwrap_err(),
            VerifyError::Signature(SignatureError::Stale)
        );
    }

    fn signed(body: &[u8], ts: u64, extra: &[(&str, &str)]) -> HeaderMap {
        let sig = sign(b"k", ts, body);
        let t = ts.to_string();
        let mut pairs = vec![("x-slack-signature", sig.as_str()), ("x-slack-request-timestamp", t.as_str())];
        pairs.extend_from_slice(extra);
        headers(&pairs)
    }

    #[test]
    fn events_api_names_and_ids() {
        let p = build(&KIND, &["k"]);
        let body =
            br#"{"type":"event_callback","event_id":"Ev08","event":{"type":"app_mention","text":"hi"}}"#;
        let h = signed(body, 1000, &[]);
        let first = p.verify(&h, body, at(1000)).unwrap();
        assert_eq!((first.event(), first.label()), ("event.app_mention", "event.app_mention"));
        assert_eq!(first.delivery_id(), Some("Ev08"));
        let retry_headers = signed(body, 1100, &[("x-slack-retry-num", "1")]);
        let retry = p.verify(&retry_headers, body, at(1100)).unwrap();
        assert_eq!(retry.delivery_id(), first.delivery_id());
        let body = br#"{"type":"app_rate_limited","minute_rate_limited":1}"#;
        let h = signed(body, 1000, &[]);
        let ok = p.verify(&h, body, at(1000)).unwrap();
        assert_eq!(ok.event(), "app_rate_limited");
        let body = br#"{"type":"event_callback","event":{"type":"x y"}}"#;
        assert!(matches!(p.verify(&signed(body, 1000, &[]), body, at(1000)), Err(VerifyError::Event(_))));
        let body = br#"{"type":"event_callback"}"#;
        assert!(matches!(p.verify(&signed(body, 1000, &[]), body, at(1000)), Err(VerifyError::Event(_))));
    }

    #[test]
    fn url_verification_is_answered() {
        let p = build(&KIND, &["k"]);
        let body = br#"{"token":"t","challenge":"3eZbrw1aBm\"2r","type":"url_verification"}"#;
        let h = signed(body, 1000, &[]);
        let ok = p.verify(&h, body, at(1000)).unwrap();
        let reply: serde_json::Value = serde_json::from_slice(ok.reply().unwrap()).unwrap();
        assert_eq!(reply, serde_json::json!({ "challenge": "3eZbrw1aBm\"2r" }));
        let wrong = sign(b"other", 1000, body);
        let h = headers(&[("x-slack-signature", &wrong), ("x-slack-request-timestamp", "1000")]);
        assert_eq!(
            p.verify(&h, body, at(1000)).unwrap_err(),
            VerifyError::Signature(SignatureError::Mismatch)
        );
    }

    #[test]
    fn forms_and_refusals() {
        let p = build(&KIND, &["k"]);
        let body = b"payload=%7B%22type%22%3A%22block_actions%22%7D";
        let h = signed(body, 1000, &[FORM]);
        let ok = p.verify(&h, body, at(1000)).unwrap();
        assert_eq!(ok.event(), "interaction");
        let sig = |e| VerifyError::Signature(e);
        let h = headers(&[("x-slack-request-timestamp", "1000")]);
        assert_eq!(p.verify(&h, body, at(1000)).unwrap_err(), sig(SignatureError::Missing));
        let good = sign(b"k", 1000, body);
        let h = headers(&[("x-slack-signature", &good)]);
        assert_eq!(p.verify(&h, body, at(1000)).unwrap_err(), sig(SignatureError::Missing));
        let h = headers(&[("x-slack-signature", &good[3..]), ("x-slack-request-timestamp", "1000")]);
        assert_eq!(p.verify(&h, body, at(1000)).unwrap_err(), sig(SignatureError::Malformed));
        let h = headers(&[("x-slack-signature", &good), ("x-slack-request-timestamp", "1e3")]);
        assert_eq!(p.verify(&h, body, at(1000)).unwrap_err(), sig(SignatureError::Malformed));
        assert!(form_has_field(b"a=1&command=%2Fx", b"command"));
        assert!(!form_has_field(b"a=command", b"command"));
    }
}
