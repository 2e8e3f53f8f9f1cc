//! Standard Webhooks (and Svix, which sends the same scheme under `svix-*` names):
//! `webhook-signature: v1,<base64> [v1,<base64> …]`, HMAC-SHA256 of
//! `{webhook-id}.{webhook-timestamp}.{raw body}` keyed with the base64-decoded secret
//! after `whsec_`; the timestamp within the tolerance both ways. The event is the
//! body's `type`, the delivery id `webhook-id` (kept on retries).

use std::time::SystemTime;

use hmac::Hmac;

use super::event::{self, EventSource};
use super::keyed::{Keyed, Layout};
use super::keys::{base64, base64_digest, mac};
use super::{
    HeaderLines, HeaderMap, Kind, Outcome, Provider, ProviderSettings, SettingError, SignInput,
    SignatureError, Verified, check_timestamp, header, json,
};

/// Most `v1` entries looked at in one header.
const MAX_V1: usize = 8;

/// The `standard-webhooks` kind.
pub const KIND: Kind =
    Kind { name: "standard-webhooks", default_type_prefix: None, build, sign: sign_headers };

/// The header names, Standard Webhooks' first, then Svix's.
const NAMES: [&str; 6] =
    ["webhook-id", "webhook-timestamp", "webhook-signature", "svix-id", "svix-timestamp", "svix-signature"];

/// The key a secret stands for: the base64 after `whsec_` (the prefix is optional).
pub fn decode_secret(secret: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let encoded = secret.strip_prefix(b"whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD.decode(encoded).ok().filter(|k| !k.is_empty())
}

fn build(settings: &ProviderSettings<'_>) -> Result<Box<dyn Provider>, SettingError> {
    // Options first, as every kind refuses them, then the secrets.
    settings.options.refuse_all(KIND.name)?;
    let mut keys = Vec::with_capacity(settings.secrets.len());
    for secret in &settings.secrets {
        // Never the secret in the message.
        keys.push(decode_secret(secret).ok_or_else(|| SettingError {
            key: "secrets",
            problem: "a standard-webhooks secret is `whsec_` followed by base64".into(),
        })?);
    }
    let layout = Layout { kind: KIND.name, names: NAMES, event: None, known: &[] };
    Keyed::build(settings, keys.iter().map(Vec::as_slice), layout, verify)
}

fn verify<'a>(source: &Keyed<6>, headers: &'a HeaderMap, body: &'a [u8], now: SystemTime) -> Outcome<'a> {
    // The `webhook-*` set when any of it is there, else the `svix-*` one.
    let [wid, wts, wsig, sid, sts, ssig] = &source.names;
    let standard = [wid, wts, wsig].iter().any(|n| headers.contains_key(*n));
    let (id, ts, sig) = if standard { (wid, wts, wsig) } else { (sid, sts, ssig) };
    let sig = header(headers, sig).ok_or(SignatureError::Missing)?;
    let id = header(headers, id).ok_or(SignatureError::Missing)?;
    let ts = header(headers, ts);
    check_timestamp(ts, now, None)?;
    let ts = ts.unwrap_or_default();
    let mut candidates = [[0u8; 32]; MAX_V1];
    let mut count = 0;
    for entry in sig.split(|&b| b == b' ').filter(|e| !e.is_empty()) {
        let Some(encoded) = entry.strip_prefix(b"v1,") else { continue };
        if let (Some(digest), Some(slot)) = (base64_digest::<32>(encoded), candidates.get_mut(count)) {
            *slot = digest;
            count += 1;
        }
    }
    if count == 0 {
        return Err(SignatureError::Malformed.into());
    }
    source.check(&[id, b".", ts, b".", body], &candidates[..count])?;
    check_timestamp(Some(ts), now, source.tolerance)?;
    let [kind, ..] = json::scan(body, &[&["type"]])?;
    let name = event::check_text(kind.and_then(json::Found::into_str), EventSource::Body("type"))?;
    let id = event::delivery_id_bytes(Some(id));
    Ok(Verified::new(body, name, "other").with_delivery_id(id))
}

/// The `webhook-signature` value a delivery carries (`secret` as configured).
pub fn sign(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> Option<String> {
    let key = decode_secret(secret)?;
    let t = timestamp.to_string();
    let digest = mac::<Hmac<sha2::Sha256>>(&key, &[id.as_bytes(), b".", t.as_bytes(), b".", body]);
    Some(format!("v1,{}", base64(&digest)))
}

fn sign_headers(input: &SignInput<'_>) -> Result<HeaderLines, SettingError> {
    input.options.refuse_all(KIND.name)?;
    let signature =
        sign(input.secret, input.id, input.timestamp, input.body).ok_or_else(|| SettingError {
            key: "secrets",
            problem: "a standard-webhooks secret is `whsec_` followed by base64".into(),
        })?;
    Ok(vec![
        ("webhook-id".into(), input.id.into()),
        ("webhook-timestamp".into(), input.timestamp.to_string()),
        ("webhook-signature".into(), signature),
    ])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::verify::EventError;
    use crate::verify::VerifyError;
    use crate::verify::testing::{at, build, headers, vector, vector_body, vector_headers};

    fn check(p: &dyn Provider, h: &HeaderMap, body: &[u8], now: u64) -> Result<(), VerifyError> {
        match p.verify(h, body, at(now)) {
            // The vectors' bodies have no `type`: a good signature gets that far.
            Err(VerifyError::Event(EventError::Missing(_))) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    #[test]
    fn official_vector_1_with_every_expectation() {
        let v = vector("standard-webhooks-official-1");
        let body = vector_body(&v);
        let secret = v["secret"].as_str().unwrap();
        let good = v["headers"]["webhook-signature"].as_str().unwrap();
        assert_eq!(
            sign(secret.as_bytes(), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, &body).unwrap(),
            good
        );
        let p = build(&KIND, &[secret]);
        let h = vector_headers(&v, &[]);
        assert_eq!(check(&*p, &h, &body, 1_614_265_340), Ok(()));
        let stale = Err(VerifyError::Signature(SignatureError::Stale));
        assert_eq!(check(&*p, &h, &body, 1_614_265_631), stale);
        assert_eq!(check(&*p, &h, &body, 1_614_265_029), stale);
        for bad in v["negative_signatures"].as_array().unwrap() {
            let h = vector_headers(&v, &[]);
            let mut h = h.clone();
            h.insert("webhook-signature", bad.as_str().unwrap().parse().unwrap());
            assert!(check(&*p, &h, &body, 1_614_265_340).is_err(), "{bad}");
        }
        let mut h = vector_headers(&v, &[]);
        h.insert(
            "webhook-signature",
            v["header_variants"]["multi_signature"].as_str().unwrap().parse().unwrap(),
        );
        assert_eq!(check(&*p, &h, &body, 1_614_265_340), Ok(()));
    }

    #[test]
    fn official_vector_2_and_svix_names() {
        let v = vector("standard-webhooks-official-2");
        let body = vector_body(&v);
        let p = build(&KIND, &[v["secret"].as_str().unwrap()]);
        assert_eq!(check(&*p, &vector_headers(&v, &[]), &body, 1_649_367_553), Ok(()));
        let mut h = vector_headers(&v, &[]);
        h.insert("webhook-signature", v["negative_signatures"][0].as_str().unwrap().parse().unwrap());
        assert_eq!(
            check(&*p, &h, &body, 1_649_367_553),
            Err(VerifyError::Signature(SignatureError::Mismatch))
        );
        let v = vector("svix-branded-computed");
        let body = vector_body(&v);
        let p = build(&KIND, &[v["secret"].as_str().unwrap()]);
        assert_eq!(check(&*p, &vector_headers(&v, &[]), &body, 1_614_265_340), Ok(()));
    }

    #[test]
    fn events_ids_and_retries() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let p = build(&KIND, &["whsec_b2xk", secret]);
        let body = br#"{"type":"invoice.paid","data":{}}"#;
        let at_t = |t: u64| {
            let sig = sign(secret.as_bytes(), "msg_1", t, body).unwrap();
            headers(&[
                ("webhook-id", "msg_1"),
                ("webhook-timestamp", &t.to_string()),
                ("webhook-signature", &sig),
            ])
        };
        let h = at_t(1000);
        let first = p.verify(&h, body, at(1000)).unwrap();
        assert_eq!(
            (first.event(), first.label(), first.delivery_id()),
            ("invoice.paid", "other", Some("msg_1"))
        );
        let retry_headers = at_t(5000);
        let retry = p.verify(&retry_headers, body, at(5000)).unwrap();
        assert_eq!(retry.delivery_id(), Some("msg_1"));
        let sig = |e| Err(VerifyError::Signature(e));
        assert_eq!(check(&*p, &headers(&[]), body, 1000), sig(SignatureError::Missing));
        let mut h = at_t(1000);
        h.remove("webhook-id");
        assert_eq!(check(&*p, &h, body, 1000), sig(SignatureError::Missing));
        let mut h = at_t(1000);
        h.insert("webhook-signature", "v1,AAAA".parse().unwrap());
        assert_eq!(check(&*p, &h, body, 1000), sig(SignatureError::Malformed));
    }

    #[test]
    fn secrets_must_be_base64() {
        let settings = ProviderSettings {
            secrets: vec![b"whsec_not base64!"],
            tolerance: None,
            options: &Default::default(),
        };
        let err = (KIND.build)(&settings).unwrap_err();
        assert_eq!(err.key, "secrets");
        assert!(!err.problem.contains("not base64!"));
    }
}
