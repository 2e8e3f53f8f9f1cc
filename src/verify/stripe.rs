//! Stripe: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`, HMAC-SHA256 of
//! `{t}.{raw body}` keyed with the whole `whsec_…` endpoint secret (its UTF-8 text, not
//! base64-decoded); any `v1` may match (Stripe sends several while a secret rolls).
//! The event is the body's `type`, the delivery id its `id` (`evt_…`, the same on
//! every retry even though `t` changes).
//!
//! Tolerance: Stripe's own libraries refuse only timestamps older than the tolerance;
//! hookrelay refuses both directions (a clock far ahead is no more trustworthy).

use std::sync::LazyLock;
use std::time::SystemTime;

use super::event::{self, EventSource};
use super::keyed::{Keyed, KnownEvents, Layout, lines};
use super::keys::{hex_digest, mac};
use super::{
    HeaderLines, HeaderMap, Kind, Outcome, Provider, ProviderSettings, SettingError, SignInput,
    SignatureError, Verified, check_timestamp, header, json,
};

/// Header carrying `t=…,v1=…`.
pub const SIGNATURE_HEADER: &str = "stripe-signature";

/// Most `v1` entries looked at in one header.
const MAX_V1: usize = 8;

/// The `stripe` kind.
pub const KIND: Kind =
    Kind { name: "stripe", default_type_prefix: Some("com.stripe"), build, sign: sign_headers };

/// Stripe event types counted by name (the `event` label); others count as `other`.
pub static KNOWN_EVENTS: KnownEvents = LazyLock::new(|| lines(include_str!("known_events/stripe.txt")));

fn build(settings: &ProviderSettings<'_>) -> Result<Box<dyn Provider>, SettingError> {
    let layout = Layout { kind: KIND.name, names: [SIGNATURE_HEADER], event: None, known: &KNOWN_EVENTS };
    Keyed::build(settings, settings.secrets.iter().copied(), layout, verify)
}

/// The parts of a `Stripe-Signature` header.
struct Parsed<'h> {
    timestamp: &'h [u8],
    v1: [[u8; 32]; MAX_V1],
    count: usize,
}

/// Splits the header; one `t`, at least one `v1` of 64 hex digits, other schemes
/// (`v0`) ignored.
fn parse(value: &[u8]) -> Result<Parsed<'_>, SignatureError> {
    let mut parsed = Parsed { timestamp: b"", v1: [[0; 32]; MAX_V1], count: 0 };
    let mut seen_t = false;
    for item in value.split(|&b| b == b',') {
        let item = item.trim_ascii();
        let Some(eq) = item.iter().position(|&b| b == b'=') else { return Err(SignatureError::Malformed) };
        let (key, val) = (&item[..eq], &item[eq + 1..]);
        match key {
            b"t" if !seen_t => {
                seen_t = true;
                parsed.timestamp = val;
            }
            b"t" => return Err(SignatureError::Malformed),
            b"v1" => {
                let digest = hex_digest::<32>(val).ok_or(SignatureError::Malformed)?;
                if let Some(slot) = parsed.v1.get_mut(parsed.count) {
                    *slot = digest;
                    parsed.count += 1;
                }
            }
            _ => {}
        }
    }
    if !seen_t || parsed.count == 0 {
        return Err(SignatureError::Malformed);
    }
    Ok(parsed)
}

fn verify<'a>(source: &Keyed<1>, headers: &'a HeaderMap, body: &'a [u8], now: SystemTime) -> Outcome<'a> {
    let [name] = &source.names;
    let value = header(headers, name).ok_or(SignatureError::Missing)?;
    let parsed = parse(value)?;
    // Shape first (a malformed `t` is malformed, not stale), then the MAC, then the
    // time: a forged request with an old `t` counts as a mismatch.
    check_timestamp(Some(parsed.timestamp), now, None)?;
    source.check(&[parsed.timestamp, b".", body], &parsed.v1[..parsed.count])?;
    check_timestamp(Some(parsed.timestamp), now, source.tolerance)?;
    let [kind, id, object, object_id, ..] =
        json::scan(body, &[&["type"], &["id"], &["data", "object", "object"], &["data", "object", "id"]])?;
    let name = event::check_text(kind.and_then(json::Found::into_str), EventSource::Body("type"))?;
    let label = event::label(&name, source.known());
    let subject = match (object.and_then(json::Found::into_str), object_id.and_then(json::Found::into_str)) {
        (Some(o), Some(i)) if !o.is_empty() && !i.is_empty() => Some(format!("{o}/{i}")),
        _ => None,
    };
    let id = event::delivery_id(id.and_then(json::Found::into_str));
    Ok(Verified::new(body, name, label).with_delivery_id(id).with_subject(subject))
}

/// The `Stripe-Signature` value a delivery of `body` at `timestamp` carries.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let t = timestamp.to_string();
    let digest = mac::<hmac::Hmac<sha2::Sha256>>(secret, &[t.as_bytes(), b".", body]);
    format!("t={t},v1={}", hex::encode(digest))
}

fn sign_headers(input: &SignInput<'_>) -> Result<HeaderLines, SettingError> {
    input.options.refuse_all(KIND.name)?;
    Ok(vec![("Stripe-Signature".into(), sign(input.secret, input.timestamp, input.body))])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::verify::EventError;
    use crate::verify::VerifyError;
    use crate::verify::testing::{at, build, build_with, headers, vector, vector_body};

    fn check(p: &dyn Provider, sig: &str, body: &[u8], now: u64) -> Result<String, VerifyError> {
        p.verify(&headers(&[("stripe-signature", sig)]), body, at(now)).map(|v| v.event().to_owned())
    }

    /// Every expectation of the `stripe-computed` vector.
    #[test]
    fn computed_vector() {
        let v = vector("stripe-computed");
        let body = vector_body(&v);
        let secret = v["secret"].as_str().unwrap();
        let p = build(&KIND, &[secret]);
        let good = v["headers"]["Stripe-Signature"].as_str().unwrap();
        assert_eq!(sign(secret.as_bytes(), 1_735_689_600, &body), good);
        let h = headers(&[("stripe-signature", good)]);
        let ok = p.verify(&h, &body, at(1_735_689_610)).unwrap();
        assert_eq!(ok.event(), "payment_intent.succeeded");
        assert_eq!(ok.label(), "payment_intent.succeeded");
        assert_eq!(ok.delivery_id(), Some("evt_1FixtureNotReal000001"));
        assert_eq!(ok.subject(), Some("payment_intent/pi_3FixtureNotReal000001"));
        let stale = Err(VerifyError::Signature(SignatureError::Stale));
        assert_eq!(check(&*p, good, &body, 1_735_689_901), stale);
        // stripe-python accepts a timestamp an hour ahead; hookrelay refuses it within
        // the tolerance and accepts it only with the check off (tolerance_secs = 0).
        assert_eq!(check(&*p, good, &body, 1_735_686_000), stale);
        let off = build_with(&KIND, &[secret], None, &Default::default());
        assert!(check(&*off, good, &body, 1_735_686_000).is_ok());
        let variants = &v["header_variants"];
        let no_v1 = variants["no_v1_scheme"].as_str().unwrap();
        assert_eq!(
            check(&*p, no_v1, &body, 1_735_689_610),
            Err(VerifyError::Signature(SignatureError::Malformed))
        );
        let rotation = variants["with_rotation_extra_bad_v1_and_v0"].as_str().unwrap();
        assert!(check(&*p, rotation, &body, 1_735_689_610).is_ok());
    }

    #[test]
    fn a_header_needs_one_t_and_a_v1_of_64_hex_digits() {
        let p = build(&KIND, &["whsec_k"]);
        let body = br#"{"id":"evt_1","type":"invoice.paid"}"#;
        let good = sign(b"whsec_k", 1000, body);
        assert_eq!(check(&*p, &good, body, 1000).unwrap(), "invoice.paid");
        let malformed = Err(VerifyError::Signature(SignatureError::Malformed));
        for bad in ["", "t=1000", "v1=00", "t=1000,v1=zz", "t=abc,v1=", "garbage", "t=1,t=1000,v1=00"] {
            assert_eq!(check(&*p, bad, body, 1000), malformed, "{bad}");
        }
        let digest = &good[good.find("v1=").unwrap() + 3..];
        assert_eq!(check(&*p, &format!("t=x1000,v1={digest}"), body, 1000), malformed);
        assert_eq!(
            check(&*p, &format!("t=1001,v1={digest}"), body, 1000),
            Err(VerifyError::Signature(SignatureError::Mismatch))
        );
        assert_eq!(
            p.verify(&headers(&[]), body, at(1000)).unwrap_err(),
            VerifyError::Signature(SignatureError::Missing)
        );
        let retried = sign(b"whsec_k", 2000, body);
        let h = headers(&[("stripe-signature", &good)]);
        let first = p.verify(&h, body, at(1000)).unwrap();
        let retry_headers = headers(&[("stripe-signature", &retried)]);
        let again = p.verify(&retry_headers, body, at(2000)).unwrap();
        assert_eq!(first.delivery_id(), again.delivery_id());
    }

    #[test]
    fn event_names_come_from_the_body() {
        let p = build(&KIND, &["whsec_k"]);
        for (body, want) in [
            (&br#"{"id":"evt_1"}"#[..], Err(EventError::Missing(EventSource::Body("type")))),
            (br#"{"type":"a b"}"#, Err(EventError::Malformed(EventSource::Body("type")))),
            (br#"{"type":7}"#, Err(EventError::Missing(EventSource::Body("type")))),
            (br#"{"type":"brand.new"}"#, Ok("brand.new".to_owned())),
        ] {
            let sig = sign(b"whsec_k", 1000, body);
            assert_eq!(check(&*p, &sig, body, 1000), want.map_err(VerifyError::Event));
        }
        let sig = sign(b"whsec_k", 1000, b"nope");
        assert_eq!(check(&*p, &sig, b"nope", 1000), Err(VerifyError::Json(json::JsonError::Invalid)));
    }
}
