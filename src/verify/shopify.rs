//! Shopify: `X-Shopify-Hmac-Sha256: <base64>`, HMAC-SHA256 of the raw body keyed
//! with the app's client secret; the topic in `X-Shopify-Topic` (`orders/create`), the
//! delivery id in `X-Shopify-Event-Id` (the same on duplicates), else
//! `X-Shopify-Webhook-Id`. Bodies are always JSON.

use std::sync::LazyLock;
use std::time::SystemTime;

use super::event::{self, EventSource};
use super::keyed::{self, Keyed, KnownEvents, Layout, lines};
use super::keys::{base64, base64_digest, mac};
use super::{
    HeaderLines, HeaderMap, Kind, Outcome, Provider, ProviderSettings, SettingError, SignInput,
    SignatureError, Verified, header, json,
};

/// Header carrying the base64 digest.
pub const SIGNATURE_HEADER: &str = "x-shopify-hmac-sha256";
/// Header naming the topic.
pub const TOPIC_HEADER: &str = "x-shopify-topic";
/// Header carrying the event id (duplicates share it).
pub const EVENT_ID_HEADER: &str = "x-shopify-event-id";
/// Header carrying the webhook delivery id (older API versions).
pub const WEBHOOK_ID_HEADER: &str = "x-shopify-webhook-id";

const EVENT_SOURCE: EventSource = EventSource::Header("X-Shopify-Topic");

/// The `shopify` kind.
pub const KIND: Kind =
    Kind { name: "shopify", default_type_prefix: Some("com.shopify"), build, sign: sign_headers };

/// Topics counted by name (the `event` label, as Shopify writes them); others count
/// as `other`.
pub static KNOWN_EVENTS: KnownEvents = LazyLock::new(|| lines(include_str!("known_events/shopify.txt")));

fn build(settings: &ProviderSettings<'_>) -> Result<Box<dyn Provider>, SettingError> {
    let names = [SIGNATURE_HEADER, TOPIC_HEADER, EVENT_ID_HEADER, WEBHOOK_ID_HEADER];
    let layout = Layout { kind: KIND.name, names, event: Some((1, EVENT_SOURCE)), known: &KNOWN_EVENTS };
    Keyed::build(settings, settings.secrets.iter().copied(), layout, verify)
}

fn verify<'a>(source: &Keyed<4>, headers: &'a HeaderMap, body: &'a [u8], _now: SystemTime) -> Outcome<'a> {
    let [signature, topic, event_id, webhook_id] = &source.names;
    let sig = header(headers, signature).ok_or(SignatureError::Missing)?;
    let digest = base64_digest::<32>(sig).ok_or(SignatureError::Malformed)?;
    source.check(&[body], &[digest])?;
    let name = event::check(header(headers, topic), EVENT_SOURCE)?;
    json::scan(body, &[])?;
    let id = event::delivery_id_bytes(header(headers, event_id))
        .or_else(|| event::delivery_id_bytes(header(headers, webhook_id)));
    let label = event::label(name, source.known());
    Ok(Verified::new(body, name.into(), label).with_delivery_id(id))
}

/// The `X-Shopify-Hmac-Sha256` value a delivery of `body` carries.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    base64(&mac::<hmac::Hmac<sha2::Sha256>>(secret, &[body]))
}

fn sign_headers(input: &SignInput<'_>) -> Result<HeaderLines, SettingError> {
    let names = ["X-Shopify-Topic", "X-Shopify-Event-Id", "X-Shopify-Hmac-Sha256"];
    keyed::body_signed_headers(input, KIND.name, names, "orders/create", sign)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::verify::EventError;
    use crate::verify::VerifyError;
    use crate::verify::testing::{at, build, headers, vector, vector_body, vector_headers};

    #[test]
    fn computed_vector() {
        let v = vector("shopify-computed");
        let body = vector_body(&v);
        let secret = v["secret"].as_str().unwrap();
        assert_eq!(sign(secret.as_bytes(), &body), v["headers"]["X-Shopify-Hmac-Sha256"].as_str().unwrap());
        let p = build(&KIND, &["rotated-away", secret]);
        let h = vector_headers(&v, &[]);
        let ok = p.verify(&h, &body, at(0)).unwrap();
        assert_eq!(ok.event(), "orders/create");
        assert_eq!(ok.label(), "orders/create");
        assert_eq!(ok.delivery_id(), Some("b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"));
        let h = vector_headers(&v, &[("x-shopify-event-id", "evt-9")]);
        let ok = p.verify(&h, &body, at(0)).unwrap();
        assert_eq!(ok.delivery_id(), Some("evt-9"));
    }

    #[test]
    fn wrong_missing_and_malformed_are_told_apart() {
        let p = build(&KIND, &["k"]);
        let body = b"{}";
        let good = sign(b"k", body);
        let check =
            |pairs: &[(&str, &str)], body: &[u8]| p.verify(&headers(pairs), body, at(0)).map(|v| v.label());
        let topic = ("x-shopify-topic", "orders/brand_new");
        assert_eq!(check(&[("x-shopify-hmac-sha256", &good), topic], body), Ok("other"));
        let sig = |e| Err(VerifyError::Signature(e));
        assert_eq!(check(&[topic], body), sig(SignatureError::Missing));
        assert_eq!(
            check(&[("x-shopify-hmac-sha256", &hex::encode([0u8; 32])), topic], body),
            sig(SignatureError::Malformed)
        );
        assert_eq!(
            check(&[("x-shopify-hmac-sha256", &sign(b"x", body)), topic], body),
            sig(SignatureError::Mismatch)
        );
        assert_eq!(
            check(&[("x-shopify-hmac-sha256", &good)], body),
            Err(VerifyError::Event(EventError::Missing(EVENT_SOURCE)))
        );
        let not_json = sign(b"k", b"a=b");
        assert_eq!(
            check(&[("x-shopify-hmac-sha256", &not_json), topic], b"a=b"),
            Err(VerifyError::Json(json::JsonError::Invalid))
        );
    }
}
