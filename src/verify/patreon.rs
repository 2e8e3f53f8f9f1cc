//! Patreon: HMAC-MD5 of the raw body, keyed with the webhook secret, as hex in
//! `X-Patreon-Signature`; the trigger in `X-Patreon-Event`.
//!
//! The signature covers the body only: not the event header and not the time, so a
//! valid signature proves who wrote the body, never when or under which trigger.

use hmac::{Hmac, Mac};
use md5::Md5;
use subtle::{Choice, ConstantTimeEq};

use super::{SignatureError, Trigger, Verified, VerifyError};

/// Header carrying the hex HMAC-MD5 digest.
pub const SIGNATURE_HEADER: &str = "x-patreon-signature";
/// Header carrying the trigger name.
pub const EVENT_HEADER: &str = "x-patreon-event";

const DIGEST_BYTES: usize = 16;

/// The keys that may sign one source's deliveries (several during a rotation).
///
/// Holds pre-keyed MAC states so a check costs one MAC per secret and no re-keying.
/// `Debug` never shows key material.
#[derive(Clone)]
pub struct PatreonVerifier {
    keyed: Vec<Hmac<Md5>>,
}

impl std::fmt::Debug for PatreonVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PatreonVerifier {{ secrets: [REDACTED; {}] }}", self.keyed.len())
    }
}

impl PatreonVerifier {
    /// Builds a verifier from secrets given as raw bytes (Patreon uses the secret's
    /// UTF-8 text verbatim as the key). Empty secrets are skipped; the caller checks
    /// that at least one remains.
    pub fn new<'s>(secrets: impl IntoIterator<Item = &'s [u8]>) -> Self {
        let keyed = secrets
            .into_iter()
            .filter(|s| !s.is_empty())
            // HMAC accepts keys of any length, so this never fails.
            .filter_map(|s| Hmac::<Md5>::new_from_slice(s).ok())
            .collect();
        PatreonVerifier { keyed }
    }

    /// How many secrets can sign.
    pub fn secret_count(&self) -> usize {
        self.keyed.len()
    }

    /// Checks the signature over `body`, then the trigger. The signature comes first
    /// so that nothing about an unauthenticated request is examined further.
    pub fn verify<'a>(
        &self,
        signature: Option<&[u8]>,
        event: Option<&[u8]>,
        body: &'a [u8],
    ) -> Result<Verified<'a>, VerifyError> {
        self.check_signature(signature, body)?;
        let trigger = Trigger::parse(event)?;
        Ok(Verified::new(body, trigger))
    }

    /// Checks only the signature. Every secret is tried, and the comparison is
    /// constant time, so timing reveals neither the digest nor which secret matched.
    pub fn check_signature(&self, signature: Option<&[u8]>, body: &[u8]) -> Result<(), SignatureError> {
        let header = signature.ok_or(SignatureError::Missing)?;
        let expected = decode_hex_digest(header).ok_or(SignatureError::Malformed)?;
        let mut matched = Choice::from(0);
        for keyed in &self.keyed {
            let mut mac = keyed.clone();
            mac.update(body);
            let digest = mac.finalize().into_bytes();
            matched |= digest.as_slice().ct_eq(&expected);
        }
        if bool::from(matched) { Ok(()) } else { Err(SignatureError::Mismatch) }
    }
}

/// Computes the lower-case hex signature a Patreon delivery of `body` carries.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = match Hmac::<Md5>::new_from_slice(secret) {
        Ok(mac) => mac,
        // Unreachable: HMAC takes keys of any length.
        Err(_) => return String::new(),
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Decodes exactly 32 hex digits, either case, with surrounding blanks allowed.
fn decode_hex_digest(header: &[u8]) -> Option<[u8; DIGEST_BYTES]> {
    let text = header.trim_ascii();
    if text.len() != DIGEST_BYTES * 2 {
        return None;
    }
    let mut out = [0u8; DIGEST_BYTES];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::verify::TriggerError;

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
    fn header_shapes() {
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
        assert_eq!(err, VerifyError::Trigger(TriggerError::Missing));
        let ok = v.verify(Some(sig.as_bytes()), Some(b"posts:publish"), b"{}").unwrap();
        assert_eq!(ok.trigger().as_str(), "posts:publish");
        assert_eq!(ok.body(), b"{}");
    }

    #[test]
    fn debug_redacts_secrets() {
        let v = verifier(&["super-secret-value"]);
        let shown = format!("{v:?}");
        assert!(!shown.contains("super-secret-value"));
        assert!(shown.contains("REDACTED"));
    }
}
