//! The secrets of one source as pre-keyed MAC states, and the constant-time check
//! every HMAC scheme shares: clone a keyed state per request (no re-keying), feed the
//! signed parts, compare with every candidate digest.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use subtle::{Choice, ConstantTimeEq};

use super::SignatureError;

/// Pre-keyed MAC states, one per secret. `Debug` never shows key material.
#[derive(Clone)]
pub(crate) struct Keys<M> {
    keyed: Vec<M>,
}

impl<M> std::fmt::Debug for Keys<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[REDACTED; {}]", self.keyed.len())
    }
}

impl<M: Mac + KeyInit + Clone> Keys<M> {
    /// Keys every non-empty secret (the configuration refuses empty ones).
    pub(crate) fn new<'s>(secrets: impl IntoIterator<Item = &'s [u8]>) -> Self {
        let keyed = secrets
            .into_iter()
            .filter(|s| !s.is_empty())
            // HMAC accepts keys of any length, so this never fails.
            .filter_map(|s| <M as Mac>::new_from_slice(s).ok())
            .collect();
        Keys { keyed }
    }

    /// How many secrets can sign.
    pub(crate) fn len(&self) -> usize {
        self.keyed.len()
    }

    /// Whether any secret's MAC over the concatenated `parts` equals any of
    /// `candidates`. Every pair is compared, in constant time, so timing reveals
    /// neither the digest nor which secret or candidate matched.
    pub(crate) fn any_matches<C: AsRef<[u8]>>(&self, parts: &[&[u8]], candidates: &[C]) -> bool {
        let mut matched = Choice::from(0);
        for keyed in &self.keyed {
            let mut mac = keyed.clone();
            for part in parts {
                mac.update(part);
            }
            let digest = mac.finalize().into_bytes();
            for candidate in candidates {
                matched |= digest.as_slice().ct_eq(candidate.as_ref());
            }
        }
        bool::from(matched)
    }

    /// [`Keys::any_matches`] as a verdict: a mismatch when no secret signed `parts`.
    pub(crate) fn check<C: AsRef<[u8]>>(
        &self,
        parts: &[&[u8]],
        candidates: &[C],
    ) -> Result<(), SignatureError> {
        if self.any_matches(parts, candidates) { Ok(()) } else { Err(SignatureError::Mismatch) }
    }
}

/// The MAC of the concatenated `parts` under `secret` (for `sign` helpers and tests).
pub(crate) fn mac<M: Mac + KeyInit>(secret: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    match <M as Mac>::new_from_slice(secret) {
        Ok(mut mac) => {
            for part in parts {
                mac.update(part);
            }
            mac.finalize().into_bytes().to_vec()
        }
        // Unreachable: HMAC takes keys of any length.
        Err(_) => Vec::new(),
    }
}

/// HMAC-SHA256, the scheme most providers use.
pub(crate) type Sha256Keys = Keys<Hmac<sha2::Sha256>>;

/// Decodes hex of exactly `N` bytes, either case, blanks around allowed.
pub(crate) fn hex_digest<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    let text = text.trim_ascii();
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Decodes standard base64 (padded) of exactly `N` bytes, blanks around allowed.
pub(crate) fn base64_digest<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    use base64::Engine;
    // Room for any digest (SHA-512 is 64 bytes) plus what a longer input decodes to,
    // so a wrong length is told apart from a short buffer.
    let mut buf = [0u8; 96];
    let text = text.trim_ascii();
    if text.len() > 128 {
        return None;
    }
    let n = base64::engine::general_purpose::STANDARD.decode_slice(text, &mut buf).ok()?;
    let mut out = [0u8; N];
    out.copy_from_slice(buf.get(..N).filter(|_| n == N)?);
    Some(out)
}

/// Standard base64 with padding.
pub(crate) fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// RFC 4231 test cases 1 and 2 (HMAC-SHA256).
    #[test]
    fn rfc4231_hmac_sha256_vectors() {
        let cases: [(&[u8], &[u8], &str); 2] = [
            (&[0x0b; 20], b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
            (
                b"Jefe",
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
        ];
        for (key, data, want) in cases {
            assert_eq!(hex::encode(mac::<Hmac<sha2::Sha256>>(key, &[data])), want);
            let keys = Sha256Keys::new([key]);
            let digest = hex_digest::<32>(want.as_bytes()).unwrap();
            assert!(keys.any_matches(&[&data[..2], &data[2..]], &[[0u8; 32], digest]));
            assert!(!keys.any_matches(&[data, b"x"], &[digest]));
        }
    }

    /// The HMAC primitive vectors of the shared file (RFC 2202 is Patreon's, in
    /// patreon.rs), and Twilio's worked example: HMAC-SHA1 over the URL and the sorted
    /// form parameters, base64. Twilio is not a kind (its signature covers the URL, which
    /// the relay does not know as the sender saw it); the vector checks the primitive.
    #[test]
    fn shared_primitive_vectors() {
        use crate::verify::testing::vector;
        for id in ["rfc4231-hmac-sha256-tc1", "rfc4231-hmac-sha256-tc2"] {
            let v = vector(id);
            let key = match v["key_hex"].as_str() {
                Some(h) => hex::decode(h).unwrap(),
                None => v["key_utf8"].as_str().unwrap().as_bytes().to_vec(),
            };
            let data = v["data_utf8"].as_str().unwrap().as_bytes();
            assert_eq!(hex::encode(mac::<Hmac<sha2::Sha256>>(&key, &[data])), v["expected_hex"], "{id}");
        }
        let v = vector("twilio-official");
        let mut signed = v["url"].as_str().unwrap().to_owned();
        let params = v["form_params"].as_object().unwrap();
        let mut names: Vec<&String> = params.keys().collect();
        names.sort();
        for name in names {
            signed.push_str(name);
            signed.push_str(params[name].as_str().unwrap());
        }
        let secret = v["secret"].as_str().unwrap().as_bytes();
        let got = base64(&mac::<Hmac<sha1::Sha1>>(secret, &[signed.as_bytes()]));
        assert_eq!(got, v["headers"]["X-Twilio-Signature"].as_str().unwrap());
    }

    #[test]
    fn digests_decode_only_at_their_length() {
        assert_eq!(hex_digest::<2>(b" aBcD "), Some([0xab, 0xcd]));
        assert_eq!(hex_digest::<2>(b"abc"), None);
        assert_eq!(hex_digest::<2>(b"zzzz"), None);
        assert_eq!(base64_digest::<2>(b"q80="), Some([0xab, 0xcd]));
        assert_eq!(base64_digest::<2>(b"q8"), None);
        assert_eq!(base64_digest::<2>(b"q80a"), None);
        assert_eq!(base64_digest::<3>(b"q80="), None);
        assert_eq!(base64(&[0xab, 0xcd]), "q80=");
    }

    #[test]
    fn debug_redacts() {
        let keys = Sha256Keys::new([&b"super-secret-value"[..]]);
        assert_eq!(format!("{keys:?}"), "[REDACTED; 1]");
        assert_eq!(keys.len(), 1);
    }
}
