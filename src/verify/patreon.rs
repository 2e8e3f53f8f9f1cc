//! Patreon: HMAC-MD5 of the raw body, keyed with the webhook secret, as hex in
//! `X-Patreon-Signature`; the trigger in `X-Patreon-Event`.
//!
//! The signature covers the body only: not the event header and not the time, so a
//! valid signature proves who wrote the body, never when or under which trigger.

use std::borrow::Cow;
use std::time::SystemTime;

use hmac::Hmac;
use md5::Md5;

use super::event::{EventError, EventSource};
use super::keys::{Keys, hex_digest, mac};
use super::{
    HeaderLines, HeaderMap, HeaderName, Kind, Outcome, Provider, ProviderSettings, SettingError, Shape,
    SignInput, SignatureError, Trigger, TriggerError, Verified, VerifyError, header, json,
};

/// Header carrying the hex HMAC-MD5 digest.
pub const SIGNATURE_HEADER: &str = "x-patreon-signature";
/// Header carrying the trigger name.
pub const EVENT_HEADER: &str = "x-patreon-event";

const DIGEST_BYTES: usize = 16;
const EVENT_SOURCE: EventSource = EventSource::Header("X-Patreon-Event");

/// The `patreon` kind.
pub const KIND: Kind =
    Kind { name: "patreon", default_type_prefix: Some("com.patreon"), build, sign: sign_headers };

fn build(settings: &ProviderSettings<'_>) -> Result<Box<dyn Provider>, SettingError> {
    settings.options.refuse_all(KIND.name)?;
    Ok(Box::new(PatreonVerifier::new(settings.secrets.iter().copied())))
}

/// The keys that may sign one source's deliveries (several during a rotation).
///
/// Holds pre-keyed MAC states so a check costs one MAC per secret and no re-keying.
/// `Debug` never shows key material.
#[derive(Clone)]
pub struct PatreonVerifier {
    keys: Keys<Hmac<Md5>>,
    names: [HeaderName; 2],
    shape: Shape,
}

impl std::fmt::Debug for PatreonVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PatreonVerifier {{ secrets: {:?} }}", self.keys)
    }
}

impl PatreonVerifier {
    /// Builds a verifier from secrets given as raw bytes (Patreon uses the secret's
    /// UTF-8 text verbatim as the key). Empty secrets are skipped; the caller checks
    /// that at least one remains.
    pub fn new<'s>(secrets: impl IntoIterator<Item = &'s [u8]>) -> Self {
        let names = [SIGNATURE_HEADER, EVENT_HEADER].map(HeaderName::from_static);
        let keys: Keys<Hmac<Md5>> = Keys::new(secrets);
        let shape = Shape::new(&names, Some((1, EVENT_SOURCE)), &super::trigger::NAMES, keys.len());
        PatreonVerifier { keys, names, shape }
    }

    /// How many secrets can sign.
    pub fn secret_count(&self) -> usize {
        self.keys.len()
    }

    /// Checks the signature over `body`, then the trigger, then reads the body as
    /// JSON. The signature comes first so that nothing about an unauthenticated
    /// request is examined further.
    pub fn verify<'a>(
        &self,
        signature: Option<&[u8]>,
        event: Option<&[u8]>,
        body: &'a [u8],
    ) -> Result<Verified<'a>, VerifyError> {
        self.check_signature(signature, body)?;
        let trigger = Trigger::parse(event).map_err(|e| match e {
            TriggerError::Missing => EventError::Missing(EVENT_SOURCE),
            TriggerError::Malformed => EventError::Malformed(EVENT_SOURCE),
        })?;
        let [kind, id, ..] = json::scan(body, &[&["data", "type"], &["data", "id"]])?;
        let subject = match (kind, id) {
            // Strings or integers, as before providers existed.
            (Some(kind), Some(id)) => {
                let (kind, id) = (kind.into_text(), id.into_text());
                // One exact-size allocation (`format!` grows its buffer).
                (!kind.is_empty() && !id.is_empty()).then(|| [&*kind, "/", &*id].concat())
            }
            _ => None,
        };
        let label = trigger.label();
        Ok(Verified::new(body, Cow::Owned(trigger.into_name()), label).with_subject(subject))
    }

    /// Checks only the signature. Every secret is tried, and the comparison is
    /// constant time, so timing reveals neither the digest nor which secret matched.
    pub fn check_signature(&self, signature: Option<&[u8]>, body: &[u8]) -> Result<(), SignatureError> {
        let header = signature.ok_or(SignatureError::Missing)?;
        let expected = hex_digest::<DIGEST_BYTES>(header).ok_or(SignatureError::Malformed)?;
        self.keys.check(&[body], &[expected])
    }
}

impl Provider for PatreonVerifier {
    fn shape(&self) -> &Shape {
        &self.shape
    }

    fn verify<'a>(&self, headers: &'a HeaderMap, body: &'a [u8], _now: SystemTime) -> Outcome<'a> {
        let [signature, event] = &self.names;
        PatreonVerifier::verify(self, header(headers, signature), header(headers, event), body)
    }
}

/// Computes the lower-case hex signature a Patreon delivery of `body` carries.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    hex::encode(mac::<Hmac<Md5>>(secret, &[body]))
}

fn sign_headers(input: &SignInput<'_>) -> Result<HeaderLines, SettingError> {
    input.options.refuse_all(KIND.name)?;
    Ok(vec![
        ("X-Patreon-Event".into(), input.event.unwrap_or("members:pledge:create").into()),
        ("X-Patreon-Signature".into(), sign(input.secret, input.body)),
    ])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use crate::verify::testing;

    fn verifier(secrets: &[&str]) -> PatreonVerifier {
        PatreonVerifier::new(secrets.iter().map(|s| s.as_bytes()))
    }

    /// RFC 2202 section 2: HMAC-MD5 test cases 1-7.
    #[test]
    fn rfc2202_hmac_md5_vectors() {
        let cases: [(Vec<u8>, Vec<u8>, &str); 7] = [
            (vec![0x0b; 16], b"Hi There".to_vec(), "9294727a3638bb1c13f48ef8158bfc9d"),
            (b"Jefe".to_vec(), b"what do ya want for nothing?".to_vec(), "750c783e6ab0b503eaa86e310a5db738"),
            (vec![0xaa; 16], vec![0xdd; 50], "56be34521d144c88dbb8c733f0e8b3f6"),
            ((1..=25).collect(), vec![0xcd; 50], "697eaf0aca3a3aea3a75164746ffaa79"),
            (vec![0x0c; 16], b"Test With Truncation".to_vec(), "56461ef2342edc00f9bab995690efd4c"),
            (
                vec![0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                "6b1ab7fe4bd7bf8f0b62e6ce61b9d0cd",
            ),
            (
                vec![0xaa; 80],
                b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data".to_vec(),
                "6f630fad67cda0ee1fb1f562db3aa53e",
            ),
        ];
        for (key, data, digest) in cases {
            assert_eq!(sign(&key, &data), digest);
            let v = PatreonVerifier::new([key.as_slice()]);
            assert_eq!(v.check_signature(Some(digest.as_bytes()), &data), Ok(()));
        }
    }

    #[test]
    fn signatures_are_32_hex_digits_in_either_case() {
        let v = verifier(&["k"]);
        let good = sign(b"k", b"{}");
        assert_eq!(v.check_signature(None, b"{}"), Err(SignatureError::Missing));
        assert_eq!(v.check_signature(Some(b""), b"{}"), Err(SignatureError::Malformed));
        assert_eq!(v.check_signature(Some(&good.as_bytes()[..31]), b"{}"), Err(SignatureError::Malformed));
        assert_eq!(v.check_signature(Some(b"zz"), b"{}"), Err(SignatureError::Malformed));
        let non_hex = "g".repeat(32);
        assert_eq!(v.check_signature(Some(non_hex.as_bytes()), b"{}"), Err(SignatureError::Malformed));
        let upper = good.to_uppercase();
        assert_eq!(v.check_signature(Some(upper.as_bytes()), b"{}"), Ok(()));
        let padded = format!(" {good} ");
        assert_eq!(v.check_signature(Some(padded.as_bytes()), b"{}"), Ok(()));
        assert_eq!(v.check_signature(Some(good.as_bytes()), b"{} "), Err(SignatureError::Mismatch));
    }

    #[test]
    fn any_of_several_secrets_may_sign() {
        let v = verifier(&["old", "new"]);
        for secret in ["old", "new"] {
            let sig = sign(secret.as_bytes(), b"{}");
            assert_eq!(v.check_signature(Some(sig.as_bytes()), b"{}"), Ok(()));
        }
        let sig = sign(b"other", b"{}");
        assert_eq!(v.check_signature(Some(sig.as_bytes()), b"{}"), Err(SignatureError::Mismatch));
        assert_eq!(verifier(&[]).check_signature(Some(sig.as_bytes()), b"{}"), Err(SignatureError::Mismatch));
    }

    #[test]
    fn signature_is_checked_before_the_event_header() {
        let v = verifier(&["k"]);
        let err = v.verify(Some(b"00"), None, b"{}").unwrap_err();
        assert_eq!(err, VerifyError::Signature(SignatureError::Malformed));
        let sig = sign(b"k", b"{}");
        let err = v.verify(Some(sig.as_bytes()), None, b"{}").unwrap_err();
        assert_eq!(err, VerifyError::Event(EventError::Missing(EVENT_SOURCE)));
        let ok = v.verify(Some(sig.as_bytes()), Some(b"posts:publish"), b"{}").unwrap();
        assert_eq!(ok.event(), "posts:publish");
        assert_eq!(ok.label(), "posts:publish");
        assert_eq!(ok.body(), b"{}");
        assert_eq!(ok.delivery_id(), None);
        let sig = sign(b"k", b"nope");
        let err = v.verify(Some(sig.as_bytes()), Some(b"posts:publish"), b"nope").unwrap_err();
        assert_eq!(err, VerifyError::Json(json::JsonError::Invalid));
    }

    #[test]
    fn subject_is_data_type_and_id() {
        let v = verifier(&["k"]);
        let cases: [(&[u8], Option<&str>); 9] = [
            (br#"{"data":{"id":null,"type":"member"}}"#, None),
            (br#"{"data":{"type":"member"}}"#, None),
            (br#"{"data":{"id":"1"}}"#, None),
            (br#"{"data":{"id":7,"type":"pledge"}}"#, Some("pledge/7")),
            (br#"{"data":{"id":"","type":"pledge"}}"#, None),
            (br#"{"data":{"id":1,"type":2}}"#, Some("2/1")),
            (br#"{"data":null}"#, None),
            (br#"[{"data":{"id":"1","type":"x"}}]"#, None),
            (br#"{"data":{"type":"post","id":"9","attributes":{"id":"no"}}}"#, Some("post/9")),
        ];
        for (body, want) in cases {
            let sig = sign(b"k", body);
            let ok = v.verify(Some(sig.as_bytes()), Some(b"posts:publish"), body).unwrap();
            assert_eq!(ok.subject(), want, "{}", String::from_utf8_lossy(body));
        }
    }

    /// The vectors of tests/fixtures/other_providers/test_vectors.json, through the
    /// provider interface.
    #[test]
    fn shared_vectors() {
        let v = testing::vector("patreon-apits-1");
        let p = testing::build(&KIND, &["secret"]);
        let body = testing::vector_body(&v);
        let headers = testing::vector_headers(&v, &[("x-patreon-event", "posts:publish")]);
        // "testing" is not JSON: the signature passes, the body does not.
        assert_eq!(
            p.verify(&headers, &body, testing::at(0)).unwrap_err(),
            VerifyError::Json(json::JsonError::Invalid)
        );
        let sig = v["negative_signature"].as_str().unwrap();
        let headers = testing::headers(&[("x-patreon-signature", sig), ("x-patreon-event", "posts:publish")]);
        assert_eq!(
            p.verify(&headers, &body, testing::at(0)).unwrap_err(),
            VerifyError::Signature(SignatureError::Mismatch)
        );
        let v = testing::vector("patreon-apits-2");
        let body = testing::vector_body(&v);
        let h = testing::vector_headers(&v, &[]);
        let ok = p.verify(&h, &body, testing::at(0)).unwrap();
        assert_eq!(ok.event(), "posts:publish");
        for prim in ["rfc2202-hmac-md5-tc1", "rfc2202-hmac-md5-tc2", "rfc2202-hmac-md5-tc3"] {
            let v = testing::vector(prim);
            let key = match v["key_hex"].as_str() {
                Some(h) => hex::decode(h).unwrap(),
                None => v["key_utf8"].as_str().unwrap().as_bytes().to_vec(),
            };
            let data = match v["data_hex"].as_str() {
                Some(h) => hex::decode(h).unwrap(),
                None => v["data_utf8"].as_str().unwrap().as_bytes().to_vec(),
            };
            assert_eq!(sign(&key, &data), v["expected_hex"].as_str().unwrap(), "{prim}");
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        let v = verifier(&["super-secret-value"]);
        let shown = format!("{v:?}");
        assert!(!shown.contains("super-secret-value"));
        assert!(shown.contains("REDACTED"));
    }
}
