//! The harness every provider's fuzz target shares.
//!
//! Input layout: `event \n id \n header lines (name: value) \n \n body`. Invariants,
//! beyond "no panic":
//! 1. Whatever the request, a delivery the verifier accepts is refused by the same
//!    kind keyed with another secret: acceptance always rests on the MAC.
//! 2. The same body and header lines, with the headers `hookrelay sign` makes for the
//!    input's event and id at the current time laid over them, never fail on the
//!    signature: the real signature always verifies (the body or the event may still
//!    be refused).

use std::time::{Duration, SystemTime};

use hookrelay::verify::{
    HeaderMap, HeaderName, HeaderValue, Kind, KindOptions, ProviderSettings, SignInput, VerifyError,
};

/// The clock of every run.
pub const NOW: u64 = 1_700_000_000;
const SECRET: &[u8] = b"fuzz-secret-NOT-REAL";
const OTHER: &[u8] = b"other-secret-NOT-REAL";
/// Standard Webhooks keys are base64 after `whsec_`.
const SW_SECRET: &[u8] = b"whsec_ZnV6ei1zZWNyZXQtTk9ULVJFQUw=";
const SW_OTHER: &[u8] = b"whsec_b3RoZXItc2VjcmV0LU5PVC1SRUFM";

/// The options the `hmac` target runs with (every optional header set).
pub fn hmac_options() -> KindOptions {
    KindOptions {
        signature_header: Some("x-signature".into()),
        algorithm: Some("sha1".into()),
        encoding: Some("hex".into()),
        signature_prefix: Some("sha1=".into()),
        event_header: Some("x-event".into()),
        id_header: Some("x-delivery".into()),
    }
}

fn lines(data: &[u8]) -> (&[u8], &[u8], Vec<(&[u8], &[u8])>, &[u8]) {
    let mut rest = data;
    let mut next_line = || {
        let at = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = &rest[..at];
        rest = rest.get(at + 1..).unwrap_or_default();
        line
    };
    let event = next_line();
    let id = next_line();
    let mut headers = Vec::new();
    loop {
        let line = next_line();
        if line.is_empty() {
            break;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            headers.push((&line[..colon], line[colon + 1..].trim_ascii()));
        }
    }
    (event, id, headers, rest)
}

/// Runs both invariants for `kind` on one input.
pub fn run(kind: &Kind, data: &[u8]) {
    let (event, id, pairs, body) = lines(data);
    let options = if kind.name == "hmac" { hmac_options() } else { KindOptions::default() };
    let (secret, other) =
        if kind.name == "standard-webhooks" { (SW_SECRET, SW_OTHER) } else { (SECRET, OTHER) };
    let build = |secret: &[u8]| {
        let settings = ProviderSettings {
            secrets: vec![secret],
            tolerance: Some(Duration::from_secs(300)),
            options: &options,
        };
        (kind.build)(&settings).unwrap_or_else(|e| panic!("{}: {e}", kind.name))
    };
    let (provider, stranger) = (build(secret), build(other));
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);

    let mut headers = HeaderMap::new();
    for (name, value) in &pairs {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    if let Ok(v) = provider.verify(&headers, body, now) {
        assert_eq!(v.body(), body);
        match stranger.verify(&headers, body, now) {
            Err(VerifyError::Signature(_)) => {}
            other => panic!("{}: accepted without the secret: {other:?}", kind.name),
        }
    }

    let (Ok(event), Ok(id)) = (std::str::from_utf8(event), std::str::from_utf8(id)) else { return };
    let input = SignInput {
        secret,
        body,
        event: (!event.is_empty()).then_some(event),
        id,
        timestamp: NOW,
        options: &options,
    };
    let Ok(signed) = (kind.sign)(&input) else { return };
    for (name, value) in signed {
        let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) else {
            return;
        };
        headers.insert(n, v);
    }
    match provider.verify(&headers, body, now) {
        Err(VerifyError::Signature(e)) => panic!("{}: the real signature was refused: {e:?}", kind.name),
        Ok(v) => assert_eq!(v.body(), body),
        Err(_) => {}
    }
}
