//! GitHub: `X-Hub-Signature-256: sha256=<hex>`, HMAC-SHA256 of the raw body keyed
//! with the webhook secret; the event in `X-GitHub-Event` (plus `.{action}` from a JSON
//! body), the delivery GUID in `X-GitHub-Delivery` (kept on redeliveries).
//!
//! The legacy SHA-1 `X-Hub-Signature` header is not accepted on its own: without the
//! SHA-256 header a delivery counts as unsigned.

use std::borrow::Cow;
use std::sync::LazyLock;
use std::time::SystemTime;

use super::event::{self, EventSource};
use super::keyed::{self, Keyed, KnownEvents, Layout, lines};
use super::keys::{hex_digest, mac};
use super::{
    Data, HeaderLines, HeaderMap, Kind, Outcome, Provider, ProviderSettings, SettingError, SignInput,
    SignatureError, Verified, data_for, header, json,
};

/// Header carrying `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Header naming the event (`push`, `pull_request`).
pub const EVENT_HEADER: &str = "x-github-event";
/// Header carrying the delivery GUID.
pub const DELIVERY_HEADER: &str = "x-github-delivery";

const PREFIX: &[u8] = b"sha256=";
const EVENT_SOURCE: EventSource = EventSource::Header("X-GitHub-Event");

/// The `github` kind.
pub const KIND: Kind =
    Kind { name: "github", default_type_prefix: Some("com.github"), build, sign: sign_headers };

/// GitHub's commonly subscribed events (the `event` label is the `X-GitHub-Event`
/// value when listed here, without the action, else `other`).
pub static KNOWN_EVENTS: KnownEvents = LazyLock::new(|| lines(include_str!("known_events/github.txt")));

fn build(settings: &ProviderSettings<'_>) -> Result<Box<dyn Provider>, SettingError> {
    let names = [SIGNATURE_HEADER, EVENT_HEADER, DELIVERY_HEADER];
    let layout = Layout { kind: KIND.name, names, event: Some((1, EVENT_SOURCE)), known: &KNOWN_EVENTS };
    Keyed::build(settings, settings.secrets.iter().copied(), layout, verify)
}

fn verify<'a>(source: &Keyed<3>, headers: &'a HeaderMap, body: &'a [u8], _now: SystemTime) -> Outcome<'a> {
    let [signature, event, delivery] = &source.names;
    let sig = header(headers, signature).ok_or(SignatureError::Missing)?.trim_ascii();
    let digest = sig.strip_prefix(PREFIX).and_then(hex_digest::<32>).ok_or(SignatureError::Malformed)?;
    source.check(&[body], &[digest])?;
    let base = event::check(header(headers, event), EVENT_SOURCE)?;
    let data = data_for(headers);
    let name = match data {
        Data::Json => {
            let [action, ..] = json::scan(body, &[&["action"]])?;
            match action.and_then(json::Found::into_str) {
                Some(action) => {
                    let full = format!("{base}.{action}");
                    event::check(Some(full.as_bytes()), EventSource::Body("action"))?;
                    Cow::Owned(full)
                }
                None => Cow::Borrowed(base),
            }
        }
        // A form post (`payload=…`): relayed as bytes, named by the header alone.
        Data::Binary { .. } => Cow::Borrowed(base),
    };
    let label = event::label(base, source.known());
    let id = event::delivery_id_bytes(header(headers, delivery));
    Ok(Verified::new(body, name, label).with_delivery_id(id).with_data(data))
}

/// The `X-Hub-Signature-256` value a delivery of `body` carries.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(mac::<hmac::Hmac<sha2::Sha256>>(secret, &[body])))
}

fn sign_headers(input: &SignInput<'_>) -> Result<HeaderLines, SettingError> {
    let names = ["X-GitHub-Event", "X-GitHub-Delivery", "X-Hub-Signature-256"];
    keyed::body_signed_headers(input, KIND.name, names, "ping", sign)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::verify::EventError;
    use crate::verify::VerifyError;
    use crate::verify::testing::{at, build, headers, vector, vector_body, vector_headers};

    fn bad_action() -> VerifyError {
        EventError::Malformed(EventSource::Body("action")).into()
    }

    const SECRET: &str = "It's a Secret to Everybody";

    /// Vector `id`: itself, its body, its headers as a `ping`, and a verifier keyed
    /// with [`SECRET`].
    fn ping(id: &str) -> (serde_json::Value, Vec<u8>, HeaderMap, Box<dyn Provider>) {
        let v = vector(id);
        let body = vector_body(&v);
        let h = vector_headers(&v, &[("x-github-event", "ping")]);
        (v, body, h, build(&KIND, &[SECRET]))
    }

    #[test]
    fn official_vector() {
        let (v, body, h, p) = ping("github-official");
        let ok = p.verify(&h, &body, at(0));
        // "Hello, World!" is not JSON, but a GitHub form post need not be.
        assert_eq!(ok.unwrap_err(), VerifyError::Json(json::JsonError::Invalid));
        let h = vector_headers(&v, &[("x-github-event", "ping"), ("content-type", "text/plain")]);
        let ok = p.verify(&h, &body, at(0)).unwrap();
        assert_eq!(ok.data(), Data::Binary { content_type: "text/plain" });
        assert_eq!(sign(SECRET.as_bytes(), &body), v["headers"]["X-Hub-Signature-256"].as_str().unwrap());
    }

    #[test]
    fn sha1_alone_is_unsigned() {
        let (_, body, h, p) = ping("github-computed-sha1-legacy");
        assert_eq!(p.verify(&h, &body, at(0)).unwrap_err(), VerifyError::Signature(SignatureError::Missing));
    }

    #[test]
    fn computed_ping_vector() {
        let v = vector("github-computed-ping");
        let body = vector_body(&v);
        let p = build(&KIND, &["fixture-github-secret-NOT-REAL"]);
        let h = vector_headers(&v, &[]);
        let ok = p.verify(&h, &body, at(0)).unwrap();
        assert_eq!(ok.event(), "ping");
        assert_eq!(ok.label(), "ping");
        assert_eq!(ok.delivery_id(), Some("6f1f3c40-0a4e-11f0-8e8f-2d1c5a9b7e31"));
        assert_eq!(ok.data(), Data::Json);
    }

    #[test]
    fn action_extends_the_event_name() {
        let p = build(&KIND, &["k"]);
        let body = br#"{"action":"opened","number":1}"#;
        let sig = sign(b"k", body);
        let h = headers(&[("x-hub-signature-256", &sig), ("x-github-event", "pull_request")]);
        let ok = p.verify(&h, body, at(0)).unwrap();
        assert_eq!(ok.event(), "pull_request.opened");
        assert_eq!(ok.label(), "pull_request");
        let body = br#"{"action":"op ened"}"#;
        let sig = sign(b"k", body);
        let h = headers(&[("x-hub-signature-256", &sig), ("x-github-event", "pull_request")]);
        assert_eq!(p.verify(&h, body, at(0)).unwrap_err(), bad_action());
        let body = br#"{"action":5}"#;
        let sig = sign(b"k", body);
        let h = headers(&[("x-hub-signature-256", &sig), ("x-github-event", "brand_new")]);
        let ok = p.verify(&h, body, at(0)).unwrap();
        assert_eq!((ok.event(), ok.label()), ("brand_new", "other"));
    }

    #[test]
    fn wrong_missing_and_malformed_are_told_apart() {
        let p = build(&KIND, &["old", "new"]);
        let body = b"{}";
        let good = sign(b"new", body);
        let check =
            |pairs: &[(&str, &str)]| p.verify(&headers(pairs), body, at(0)).map(|v| v.event().to_owned());
        assert_eq!(check(&[("x-hub-signature-256", &good), ("x-github-event", "push")]).unwrap(), "push");
        let old = sign(b"old", body);
        assert!(check(&[("x-hub-signature-256", &old), ("x-github-event", "push")]).is_ok());
        let sig = |e| Err(VerifyError::Signature(e));
        assert_eq!(check(&[("x-github-event", "push")]), sig(SignatureError::Missing));
        assert_eq!(check(&[("x-hub-signature-256", &good[7..])]), sig(SignatureError::Malformed));
        assert_eq!(check(&[("x-hub-signature-256", "sha256=abc")]), sig(SignatureError::Malformed));
        let wrong = sign(b"other", body);
        assert_eq!(check(&[("x-hub-signature-256", &wrong)]), sig(SignatureError::Mismatch));
        let ev = |e| Err(VerifyError::Event(e));
        assert_eq!(check(&[("x-hub-signature-256", &good)]), ev(EventError::Missing(EVENT_SOURCE)));
        assert_eq!(
            check(&[("x-hub-signature-256", &good), ("x-github-event", "push#")]),
            ev(EventError::Malformed(EVENT_SOURCE))
        );
    }
}
