//! The shared Patreon fixtures (tests/fixtures, byte-exact) and their secrets.

use std::path::PathBuf;

use serde_json::Value;

/// Secrets of the shared fixtures (made up, see tests/fixtures/README.md).
pub const V1_SECRET: &str = "fixture-v1-webhook-secret-NOT-REAL-4f9c2e71";
pub const V2_SECRET: &str = "fixture-v2-webhook-secret-NOT-REAL-b7d31a08e6";
pub const POSTS_SECRET: &str = "fixture-posts-webhook-secret-NOT-REAL-5a2e9c";

/// One fixture body with its expected headers and outcome.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub name: String,
    pub body: Vec<u8>,
    pub event: String,
    pub signature: String,
    pub expect: String,
    pub secret: String,
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every Patreon fixture listed in INDEX.json.
pub fn patreon_fixtures() -> Vec<Fixture> {
    let dir = fixtures_dir();
    let index: Vec<Value> =
        serde_json::from_slice(&std::fs::read(dir.join("patreon/INDEX.json")).unwrap()).unwrap();
    index
        .iter()
        .map(|entry| {
            let body_file = entry["body_file"].as_str().unwrap();
            let meta: Value = serde_json::from_slice(
                &std::fs::read(dir.join(entry["meta_file"].as_str().unwrap())).unwrap(),
            )
            .unwrap();
            let body = std::fs::read(dir.join(body_file)).unwrap();
            assert_eq!(body.len() as u64, meta["body_bytes"].as_u64().unwrap(), "{body_file} was altered");
            Fixture {
                name: body_file.to_owned(),
                body,
                event: meta["headers"]["X-Patreon-Event"].as_str().unwrap().to_owned(),
                signature: meta["headers"]["X-Patreon-Signature"].as_str().unwrap().to_owned(),
                expect: meta["expect"].as_str().unwrap().to_owned(),
                secret: meta["secret"].as_str().unwrap().to_owned(),
            }
        })
        .collect()
}

/// Fixtures a relay must accept.
pub fn valid_fixtures() -> Vec<Fixture> {
    patreon_fixtures()
        .into_iter()
        .filter(|f| {
            matches!(
                f.expect.as_str(),
                "valid" | "valid-if-case-insensitive" | "valid-signature-header-unauthenticated"
            )
        })
        .collect()
}

/// The exact `data` bytes of an envelope: after `"data":`, up to the final `}`.
pub fn envelope_data(envelope: &[u8]) -> &[u8] {
    let marker = b"\"datacontenttype\":\"application/json\"";
    let start = envelope.windows(marker.len()).position(|w| w == marker).unwrap();
    let key = b"\"data\":";
    let rel = envelope[start..].windows(key.len()).position(|w| w == key).unwrap();
    &envelope[start + rel + key.len()..envelope.len() - 1]
}
