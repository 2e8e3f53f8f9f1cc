//! Per-source rate limit (429 with Retry-After) and IP allowlist (403), both decided
//! from the request head before the body is read, and both counted.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::time::Instant;

use crate::support::*;

/// A signed request as bytes, with `extra_headers` lines.
fn signed_request(extra_headers: &[&str]) -> Vec<u8> {
    Signed::new().wire("/webhooks/patreon", extra_headers)
}

/// A head that promises a large body and sends none of it.
fn body_never_sent() -> Vec<u8> {
    format!(
        "POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\nx-patreon-event: members:create\r\n\
         x-patreon-signature: {}\r\ncontent-length: 100000\r\n\r\n",
        "0".repeat(32)
    )
    .into_bytes()
}

/// Sends `wire` from the local address `from` and returns the answer's status line,
/// headers and how long it took. The relay closes these connections itself.
async fn send_from(from: IpAddr, to: SocketAddr, wire: &[u8]) -> (String, Duration) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let t0 = Instant::now();
    let mut stream = socket.connect(to).await.unwrap();
    stream.write_all(wire).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the relay did not answer and close within 10 s")
        .unwrap();
    (String::from_utf8_lossy(&out).into_owned(), t0.elapsed())
}

fn localhost() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after_before_reading_the_body() {
    let relay =
        RelayConfig::new().source("rate_limit_per_sec", 1).source("rate_limit_burst", 3).start().await;
    for i in 0..3 {
        let (answer, _) = send_from(localhost(), relay.ingest, &signed_request(&[])).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i} of the burst: {answer}");
    }
    let (answer, _) = send_from(localhost(), relay.ingest, &signed_request(&[])).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("\r\nretry-after: 1\r\n"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    // Refused from the head: a body that never comes is not waited for (no 408).
    let (answer, took) = send_from(localhost(), relay.ingest, &body_never_sent()).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let rejected = |reason: &'static str| {
        let relay = &relay;
        async move {
            relay
                .metric("hookrelay_webhooks_rejected_total", &[("source", "patreon"), ("reason", reason)])
                .await
        }
    };
    assert_eq!(rejected("rate_limited").await, 2.0);
    assert_eq!(rejected("timeout").await, 0.0);
    assert_eq!(relay.metric("hookrelay_webhooks_received_total", &[("source", "patreon")]).await, 5.0);
    assert_eq!(relay.metric("hookrelay_request_duration_seconds_count", &[("status", "429")]).await, 2.0);
    // One token a second comes back.
    let addr = relay.ingest;
    eventually("the bucket to refill", Duration::from_secs(5), || async move {
        let (answer, _) = send_from(localhost(), addr, &signed_request(&[])).await;
        answer.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    relay.stop_and_cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_refuses_other_addresses_before_anything_else() {
    let relay = RelayConfig::new().source("allowed_cidrs", ["127.0.0.2/32", "10.0.0.0/8"]).start().await;
    let allowed = IpAddr::from([127, 0, 0, 2]);
    let (answer, _) = send_from(allowed, relay.ingest, &signed_request(&[])).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let (answer, _) = send_from(localhost(), relay.ingest, &signed_request(&[])).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.ends_with(r#"{"error":"forbidden"}"#), "{answer}");
    // Forwarding headers are not trusted.
    let spoofed = &["x-forwarded-for: 127.0.0.2", "forwarded: for=127.0.0.2", "x-real-ip: 127.0.0.2"];
    let (answer, _) = send_from(localhost(), relay.ingest, &signed_request(spoofed)).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // Before the method check and before the body: no 405, no 408.
    let get = b"GET /webhooks/patreon HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n";
    let (answer, _) = send_from(localhost(), relay.ingest, get).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let (answer, took) = send_from(localhost(), relay.ingest, &body_never_sent()).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    assert_eq!(relay.by_reason("hookrelay_webhooks_rejected_total", "ip_denied").await, 4.0);
    // Denied requests are not counted as received, nor did they reach the signature.
    assert_eq!(relay.metric("hookrelay_webhooks_received_total", &[("source", "patreon")]).await, 1.0);
    assert_eq!(relay.by_reason("hookrelay_signature_failures_total", "mismatch").await, 0.0);
    // Unknown paths are still 404 for everyone (the allowlist is per source).
    let (answer, _) = send_from(
        localhost(),
        relay.ingest,
        b"POST /webhooks/other HTTP/1.1\r\nhost: relay\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    relay.stop_and_cleanup().await;
}
