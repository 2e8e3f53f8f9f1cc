//! Deliveries signed the way Patreon signs them: one helper for every test that needs
//! a valid request, over the client or as raw bytes.

use std::net::SocketAddr;

use serde_json::Value;

use super::*;

/// The signature Patreon would send for `body` under `secret`.
pub fn sign_with(secret: &str, body: &[u8]) -> String {
    hookrelay::verify::patreon::sign(secret.as_bytes(), body)
}

/// The signature under the V2 fixture secret (one of the test relay's secrets).
pub fn sign(body: &[u8]) -> String {
    sign_with(V2_SECRET, body)
}

/// A `member` event body no other delivery has.
pub fn fresh_body() -> Vec<u8> {
    format!(r#"{{"data":{{"id":"{}","type":"member"}}}}"#, unique("m")).into_bytes()
}

/// A signed delivery: its body, `X-Patreon-Event` and `X-Patreon-Signature`.
#[derive(Debug, Clone)]
pub struct Signed {
    pub body: Vec<u8>,
    pub event: String,
    pub signature: String,
}

impl Signed {
    /// `members:create` with a fresh body.
    pub fn new() -> Signed {
        Signed::of(fresh_body())
    }

    /// `members:create` with this body.
    pub fn of(body: Vec<u8>) -> Signed {
        Signed { signature: sign(&body), body, event: "members:create".into() }
    }

    /// The same delivery with another event (the signature covers only the body).
    pub fn event(mut self, event: &str) -> Signed {
        self.event = event.to_owned();
        self
    }

    /// The two Patreon headers, for [`post`].
    pub fn headers(&self) -> [(&str, &str); 2] {
        [("X-Patreon-Event", &self.event), ("X-Patreon-Signature", &self.signature)]
    }

    /// The two Patreon headers as raw header lines.
    pub fn header_lines(&self) -> [String; 2] {
        [format!("x-patreon-event: {}", self.event), format!("x-patreon-signature: {}", self.signature)]
    }

    /// `POST path` as bytes ([`post_wire`]), with `extra` header lines after the Patreon ones.
    pub fn wire(&self, path: &str, extra: &[&str]) -> Vec<u8> {
        let mut headers = self.header_lines().to_vec();
        headers.extend(extra.iter().map(|h| (*h).to_owned()));
        post_wire(path, &headers, &self.body)
    }

    /// Posts it to `/webhooks/patreon`.
    pub async fn post(&self, addr: SocketAddr) -> Response {
        post(addr, "/webhooks/patreon", &self.headers(), self.body.clone()).await
    }
}

impl Default for Signed {
    fn default() -> Self {
        Signed::new()
    }
}

/// Posts a new signed `members:create` event (unique body numbered `n`) to
/// `/webhooks/patreon`; returns the status and, on 200, the event id.
pub async fn post_signed(addr: SocketAddr, n: u64) -> (u16, Option<String>) {
    let body = format!(r#"{{"data":{{"id":"{}","type":"member"}},"n":{n}}}"#, unique("m")).into_bytes();
    let (status, _, answer) = Signed::of(body).post(addr).await;
    let id = (status == 200)
        .then(|| serde_json::from_slice::<Value>(&answer).ok())
        .flatten()
        .and_then(|v| v["id"].as_str().map(str::to_owned));
    (status, id)
}
