//! Envelope building from arbitrary (signed) bodies.
//!
//! Input layout: `event \n body`. Invariants: building never panics; when it succeeds
//! the envelope is JSON a consumer's parser accepts, its `data` bytes equal the body
//! exactly, the id is stable, and the routing key is `{source}.{dotted trigger}`;
//! when it fails the body really is not JSON or is nested too deeply.
#![no_main]

use std::time::{Duration, SystemTime};

use hookrelay::envelope::{self, EnvelopeError, MAX_JSON_DEPTH};
use hookrelay::verify::patreon::{PatreonVerifier, sign};
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;

const SECRET: &[u8] = b"fuzz-secret-NOT-REAL";

fuzz_target!(|data: &[u8]| {
    let (event, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b"members:pledge:create"[..], data),
    };
    let verifier = PatreonVerifier::new([SECRET]);
    let sig = sign(SECRET, body);
    let Ok(verified) = verifier.verify(Some(sig.as_bytes()), Some(event), body) else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_374_400_123_456);
    // The relay checks JSON syntax only (numbers need not fit an f64), as IgnoredAny does.
    let syntax_ok = std::str::from_utf8(body).is_ok() && serde_json::from_slice::<IgnoredAny>(body).is_ok();
    match envelope::build(&verified, "patreon", "/webhooks/patreon", now) {
        Ok(env) => {
            assert!(syntax_ok, "accepted a body that is not JSON");
            if let Err(e) = serde_json::from_slice::<IgnoredAny>(&env.body) {
                panic!("envelope is not JSON a consumer can parse: {e}");
            }
            // Where the body maps to a value (every number fits an f64), so does the
            // whole envelope, with that value as its data: a consumer using serde_json's
            // defaults can read every envelope whose payload it could read.
            if let Ok(data) = serde_json::from_slice::<serde_json::Value>(body) {
                let value = match serde_json::from_slice::<serde_json::Value>(&env.body) {
                    Ok(v) => v,
                    Err(e) => panic!("the body parses into a Value but the envelope does not: {e}"),
                };
                assert_eq!(value["specversion"], "1.0");
                assert_eq!(value["id"], env.id.as_str());
                assert_eq!(value.get("data"), Some(&data));
            }
            let marker = b"\"datacontenttype\":\"application/json\"";
            let start = env.body.windows(marker.len()).position(|w| w == marker).unwrap_or(0);
            let key = b"\"data\":";
            let at =
                env.body[start..].windows(key.len()).position(|w| w == key).map(|p| start + p + key.len());
            let at = at.unwrap_or_else(|| panic!("no data member"));
            assert_eq!(&env.body[at..env.body.len() - 1], body, "data bytes differ from the body");
            assert_eq!(env.id, envelope::event_id(verified.trigger().as_str(), body));
            assert_eq!(env.routing_key, format!("patreon.{}", verified.trigger().dotted()));
        }
        Err(EnvelopeError::TooDeep) => {
            assert!(depth(body) > MAX_JSON_DEPTH, "refused as too deep at depth {}", depth(body));
        }
        Err(EnvelopeError::InvalidJson) => {
            assert!(!syntax_ok || depth(body) > MAX_JSON_DEPTH, "refused a body that is JSON");
        }
    }
});

/// Deepest bracket nesting outside strings (the envelope's own measure).
fn depth(raw: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in raw {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}
