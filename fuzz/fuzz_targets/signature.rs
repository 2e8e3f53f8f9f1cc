//! Patreon's signature header parsing and verification on arbitrary bytes.
//!
//! Input layout: `header \n event \n body`. Checks that nothing panics, that a
//! header is accepted only when it is the digest the secret gives (in either case,
//! with surrounding blanks), and that the verifier agrees with `sign`.
#![no_main]

use hookrelay::verify::patreon::{PatreonVerifier, sign};
use hookrelay::verify::{SignatureError, VerifyError};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret-NOT-REAL";

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let header = parts.next().unwrap_or_default();
    let event = parts.next();
    let body = parts.next().unwrap_or_default();
    let verifier = PatreonVerifier::new([SECRET, b"second-NOT-REAL".as_slice()]);

    let expected = sign(SECRET, body);
    let result = verifier.check_signature(Some(header), body);
    let header_is_digest = header.trim_ascii().eq_ignore_ascii_case(expected.as_bytes());
    let other_is_digest = header.trim_ascii().eq_ignore_ascii_case(sign(b"second-NOT-REAL", body).as_bytes());
    assert_eq!(
        result.is_ok(),
        header_is_digest || other_is_digest,
        "accepted a header that is not the digest"
    );
    if let Err(e) = result {
        // A malformed header is never 32 hex digits; a mismatch always is.
        let shaped = header.trim_ascii().len() == 32 && header.trim_ascii().iter().all(u8::is_ascii_hexdigit);
        assert_eq!(e == SignatureError::Mismatch, shaped, "wrong failure reason {e:?}");
    }
    assert_eq!(verifier.check_signature(None, body), Err(SignatureError::Missing));

    // The real digest always verifies; the event header decides the rest.
    match verifier.verify(Some(expected.as_bytes()), event, body) {
        Ok(v) => {
            assert_eq!(v.body(), body);
            assert_eq!(Some(v.event().as_bytes()), event);
        }
        Err(VerifyError::Event(_) | VerifyError::Json(_)) => {}
        Err(VerifyError::Signature(e)) => panic!("the real digest was refused: {e:?}"),
    }
});
