//! Every refusal over a real socket: its status and the metric it moves; broker
//! failures answered 503 with Retry-After; readiness and graceful shutdown.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitfall_fixtures_get_their_expected_status() {
    let relay = Relay::start().await;
    for f in patreon_fixtures() {
        let want = match f.expect.as_str() {
            "valid" | "valid-if-case-insensitive" | "valid-signature-header-unauthenticated" => 200,
            "invalid" => 401,
            "valid-signature-but-unparseable" => 400,
            other => panic!("unknown expectation {other}"),
        };
        let (status, _, body) = relay.post_fixture(&f).await;
        assert_eq!(status, want, "{}: {}", f.name, String::from_utf8_lossy(&body));
        if want == 401 {
            assert_eq!(&body[..], br#"{"error":"invalid signature"}"#);
        }
    }
    let mismatch = relay.by_reason("hookrelay_signature_failures_total", "mismatch").await;
    assert_eq!(mismatch, 4.0);
    let bad_json = relay.by_reason("hookrelay_webhooks_rejected_total", "invalid_json").await;
    assert_eq!(bad_json, 1.0);
    relay.stop_and_cleanup().await;
}

/// What is sent, with which headers and body, and the status and metric expected.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_get_their_status_and_metric() {
    let relay = Relay::start().await;
    let body = br#"{"data":{"id":"1","type":"member"}}"#.to_vec();
    let sig = sign(&body);
    let ev = ("X-Patreon-Event", "members:create");
    let cases: Vec<Case> = vec![
        ("no signature", vec![ev], body.clone(), 401, "hookrelay_signature_failures_total", "missing"),
        (
            "short signature",
            vec![ev, ("X-Patreon-Signature", "abc")],
            body.clone(),
            401,
            "hookrelay_signature_failures_total",
            "malformed",
        ),
        (
            "non-hex",
            vec![ev, ("X-Patreon-Signature", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz")],
            body.clone(),
            401,
            "hookrelay_signature_failures_total",
            "malformed",
        ),
        (
            "wrong",
            vec![ev, ("X-Patreon-Signature", "00000000000000000000000000000000")],
            body.clone(),
            401,
            "hookrelay_signature_failures_total",
            "mismatch",
        ),
        (
            "no event",
            vec![("X-Patreon-Signature", &sig)],
            body.clone(),
            400,
            "hookrelay_webhooks_rejected_total",
            "bad_event_header",
        ),
        (
            "bad event",
            vec![("X-Patreon-Event", "Members Create"), ("X-Patreon-Signature", &sig)],
            body.clone(),
            400,
            "hookrelay_webhooks_rejected_total",
            "bad_event_header",
        ),
    ];
    for (what, headers, body, status, metric, reason) in cases {
        let before = relay.metric(metric, &[("source", "patreon"), ("reason", reason)]).await;
        let (got, _, text) = post(relay.ingest, "/webhooks/patreon", &headers, body).await;
        assert_eq!(got, status, "{what}: {}", String::from_utf8_lossy(&text));
        let after = relay.metric(metric, &[("source", "patreon"), ("reason", reason)]).await;
        assert_eq!(after, before + 1.0, "{what}");
    }

    let not_json = b"not json".to_vec();
    let sig2 = sign(&not_json);
    let (got, _, _) =
        post(relay.ingest, "/webhooks/patreon", &[ev, ("X-Patreon-Signature", &sig2)], not_json).await;
    assert_eq!(got, 400);

    let (got, _, _) = post(relay.ingest, "/webhooks/nobody", &[ev], body.clone()).await;
    assert_eq!(got, 404);
    assert_eq!(
        relay
            .metric(
                "hookrelay_webhooks_rejected_total",
                &[("source", "_unknown"), ("reason", "unknown_source")]
            )
            .await,
        1.0
    );
    let (got, _, _) = post(relay.ingest, "/elsewhere", &[ev], body.clone()).await;
    assert_eq!(got, 404);
    let (got, headers, _) = request(relay.ingest, "GET", "/webhooks/patreon").await;
    assert_eq!(got, 405);
    assert_eq!(headers.get("allow").map(String::as_str), Some("POST"));
    assert_eq!(relay.by_reason("hookrelay_webhooks_rejected_total", "method_not_allowed").await, 1.0);
    let received = relay.metric("hookrelay_webhooks_received_total", &[("source", "patreon")]).await;
    assert_eq!(received, 7.0);
    relay.stop_and_cleanup().await;
}

async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let relay = Relay::start().await;
    // Declared too large: refused before reading.
    let head = b"POST /webhooks/patreon HTTP/1.1\r\nhost: x\r\ncontent-length: 1048577\r\nx-patreon-event: members:create\r\n\r\n";
    let answer = raw_exchange(relay.ingest, head).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Chunked, discovered while streaming.
    let mut req = b"POST /webhooks/patreon HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    let chunk = vec![b'a'; 64 * 1024];
    for _ in 0..17 {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(relay.ingest, &req).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{}", &answer[..answer.len().min(200)]);
    // Exactly at the limit is read (and then refused for its signature, not its size).
    let body = vec![b' '; 1024 * 1024];
    let (status, _, _) =
        post(relay.ingest, "/webhooks/patreon", &[("X-Patreon-Event", "members:create")], body).await;
    assert_eq!(status, 401);
    assert_eq!(relay.by_reason("hookrelay_webhooks_rejected_total", "body_too_large").await, 2.0);
    relay.stop_and_cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_without_alternate_exchange_is_503() {
    let relay2 =
        RelayConfig::new().amqp("unrouted_exchange", "").amqp("dead_letter_exchange", "").start().await;
    relay2.unbind_source_queue().await;
    let (status, headers, _) = Signed::new().post(relay2.ingest).await;
    assert_eq!(status, 503);
    assert_eq!(headers.get("retry-after").map(String::as_str), Some("5"));
    assert_eq!(relay2.by_reason("hookrelay_publish_failures_total", "unroutable").await, 1.0);
    relay2.stop_and_cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_without_dead_letter_exchange_is_503() {
    let relay = RelayConfig::new()
        .amqp("unrouted_exchange", "")
        .amqp("dead_letter_exchange", "")
        .amqp("max_publish_attempts", 2)
        .start()
        .await;
    let exchange = relay.exchange.clone();
    let conn = broker().await;
    let ch = conn.create_channel().await.unwrap();
    let full = full_queue(&conn, &exchange).await;
    let (status, headers, _) = Signed::new().post(relay.ingest).await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(relay.by_reason("hookrelay_publish_failures_total", "nack").await, 1.0);
    assert_eq!(relay.by_reason("hookrelay_publish_retries_total", "nack").await, 1.0);
    let _ = ch.queue_delete(full.as_str().into(), Default::default()).await;
    relay.stop_and_cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_when_the_broker_is_unreachable() {
    let relay = RelayConfig::new()
        .amqp_url("amqp://guest:guest@127.0.0.1:1/%2f")
        .not_waiting_for_ready()
        .start()
        .await;
    let (health, _, _) = get(relay.admin, "/healthz").await;
    assert_eq!(health, 200);
    let (ready, _, _) = get(relay.admin, "/readyz").await;
    assert_eq!(ready, 503);
    assert_eq!(relay.metric("hookrelay_broker_connected", &[]).await, 0.0);
    let (status, headers, _) = Signed::new().post(relay.ingest).await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    let mut relay = relay;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let mut relay = Relay::start().await;
    let Signed { body, event, signature: sig } = Signed::new();
    let mut s = TcpStream::connect(relay.ingest).await.unwrap();
    let head = format!(
        "POST /webhooks/patreon HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nx-patreon-event: {event}\r\nx-patreon-signature: {sig}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..5]).await.unwrap();
    wait_for_metric(relay.admin, "hookrelay_inflight_requests", &[], 1.0, Duration::from_secs(5)).await;
    relay.begin_shutdown();
    let admin = relay.admin;
    eventually("readiness to drop", Duration::from_secs(5), || async move {
        (get(admin, "/readyz").await.0 == 503).then_some(())
    })
    .await;
    s.write_all(&body[5..]).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    relay.stop().await;
    let conn = broker().await;
    let got = take_messages(&conn, &relay.queue("patreon"), 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    cleanup(&relay.toml).await;
}
