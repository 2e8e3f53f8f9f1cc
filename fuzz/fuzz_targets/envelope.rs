//! Envelope building from arbitrary (signed) bodies, through Patreon's verifier (the
//! JSON check is the verifier's) and the slack kind's for bodies that are not JSON.
//!
//! Input layout: `event \n body`. Invariants: nothing panics; a body is accepted iff
//! it is UTF-8 JSON nested at most 126 deep; then the envelope is JSON a consumer's
//! parser accepts, its `data` bytes equal the body exactly, the id is stable, and the
//! routing key is `{source}.{dotted event}`. A form body (Slack) comes back exactly
//! from `data_base64`.
#![no_main]

use std::time::{Duration, SystemTime};

use base64::Engine;
use hookrelay::envelope::{self, MAX_JSON_DEPTH, Target};
use hookrelay::verify::patreon::{PatreonVerifier, sign};
use hookrelay::verify::{HeaderMap, HeaderValue, JsonError, Provider, VerifyError, slack};
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
    let now = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_374_400_123_456);
    let target =
        Target { source_name: "patreon", ce_source: "/webhooks/patreon", type_prefix: "com.patreon" };
    // The relay checks JSON syntax only (numbers need not fit an f64), as IgnoredAny does.
    let syntax_ok = std::str::from_utf8(body).is_ok() && serde_json::from_slice::<IgnoredAny>(body).is_ok();
    match verifier.verify(Some(sig.as_bytes()), Some(event), body) {
        Ok(verified) => {
            let env = envelope::build(&verified, &target, now);
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
            assert_eq!(env.id, envelope::event_id(verified.event(), body));
            assert_eq!(env.routing_key, format!("patreon.{}", verified.event().replace(':', ".")));
        }
        Err(VerifyError::Json(JsonError::TooDeep)) => {
            assert!(depth(body) > MAX_JSON_DEPTH, "refused as too deep at depth {}", depth(body));
        }
        Err(VerifyError::Json(JsonError::Invalid)) => {
            assert!(!syntax_ok || depth(body) > MAX_JSON_DEPTH, "refused a body that is JSON");
        }
        Err(VerifyError::Event(_)) => {}
        Err(VerifyError::Signature(e)) => panic!("the real digest was refused: {e:?}"),
    }

    // Any body posted as a form is relayed byte for byte as data_base64.
    let slack = slack_provider();
    let mut headers = HeaderMap::new();
    let ts = "1764374400";
    let Ok(sig) = HeaderValue::from_str(&slack::sign(SECRET, 1_764_374_400, body)) else { return };
    headers.insert("x-slack-signature", sig);
    headers.insert("x-slack-request-timestamp", HeaderValue::from_static(ts));
    headers.insert("content-type", HeaderValue::from_static("application/x-www-form-urlencoded"));
    let verified =
        slack.verify(&headers, body, now).unwrap_or_else(|e| panic!("a signed form was refused: {e:?}"));
    let env = envelope::build(&verified, &target, now);
    let value: serde_json::Value =
        serde_json::from_slice(&env.body).unwrap_or_else(|e| panic!("form envelope is not JSON: {e}"));
    let encoded = value["data_base64"].as_str().unwrap_or_else(|| panic!("no data_base64"));
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap_or_default();
    assert_eq!(decoded, body, "data_base64 does not give the body back");
});

fn slack_provider() -> Box<dyn Provider> {
    let options = hookrelay::verify::KindOptions::default();
    let settings = hookrelay::verify::ProviderSettings {
        secrets: vec![SECRET],
        tolerance: Some(Duration::from_secs(300)),
        options: &options,
    };
    (slack::KIND.build)(&settings).unwrap_or_else(|e| panic!("{e}"))
}

/// Deepest bracket nesting outside strings (the envelope's own measure), worked out
/// apart from the relay's code: strings are cut out first, then the brackets summed.
fn depth(raw: &[u8]) -> usize {
    let mut outside = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        if b != b'"' {
            outside.push(b);
            continue;
        }
        // Up to the closing quote, stepping over each escaped byte.
        while let Some(&c) = bytes.next() {
            match c {
                b'\\' => {
                    bytes.next();
                }
                b'"' => break,
                _ => {}
            }
        }
    }
    let running = outside.iter().scan(0usize, |depth, &b| {
        match b {
            b'[' | b'{' => *depth += 1,
            b']' | b'}' => *depth = depth.saturating_sub(1),
            _ => {}
        }
        Some(*depth)
    });
    running.max().unwrap_or(0)
}
