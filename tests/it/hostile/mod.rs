//! Hostile requests over a raw socket: every row is bytes on the wire, the answer
//! expected (a status, several for pipelined requests, or a closed connection) and
//! the metric that must move. No row may get a 5xx, and the relay must still relay a
//! signed event afterwards.

mod rows;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use self::rows::rows;
use crate::support::*;

/// The body limit and timeouts of the relay under test, small so rows stay fast.
const LIMIT: usize = 64 * 1024;
const HEADER_TIMEOUT_MS: u64 = 1_000;
const REQUEST_TIMEOUT_MS: u64 = 1_500;

/// What a row expects back.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// One response with this status.
    Status(u16),
    /// Several responses on one connection, in order.
    Statuses(Vec<u16>),
    /// No response at all; the relay closes the connection.
    Closed,
}

/// Which metric a row moves.
#[derive(Debug, Clone)]
pub enum Moves {
    /// `hookrelay_webhooks_rejected_total{source,reason}` by one.
    Rejected(&'static str, &'static str),
    /// `hookrelay_signature_failures_total{source="patreon",reason}` by one.
    Signature(&'static str),
    /// `hookrelay_events_published_total{source="patreon"}` summed over events, by `n`.
    Published(f64),
    /// Nothing reaches the handler: hyper answers (or closes) on its own, and the
    /// request-duration histogram does not move.
    Nothing,
}

/// One hostile request.
pub struct Row {
    pub name: &'static str,
    pub wire: Vec<u8>,
    pub answer: Answer,
    pub moves: Moves,
}

/// What came back on one connection.
#[derive(Debug)]
pub struct Exchange {
    /// Status of every response seen, in order.
    pub statuses: Vec<u16>,
    /// The peer closed the connection (EOF or reset) within the deadline.
    pub closed: bool,
    /// When the connection closed (or the deadline passed), from the first write.
    pub elapsed: Duration,
    /// Everything read.
    pub text: String,
}

/// Writes `wire` (ignoring write errors: the relay may refuse before reading it all)
/// and reads until the relay closes the connection or `limit` passes.
pub async fn exchange(addr: SocketAddr, wire: &[u8], limit: Duration) -> Exchange {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.split();
    let write = async {
        for part in wire.chunks(16 * 1024) {
            if writer.write_all(part).await.is_err() {
                break;
            }
        }
    };
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let (_, closed) = tokio::join!(write, tokio::time::timeout(limit, read));
    let closed = closed.unwrap_or(false);
    let text = String::from_utf8_lossy(&out).into_owned();
    let statuses = text
        .match_indices("HTTP/1.")
        .filter(|(at, _)| *at == 0 || text[..*at].ends_with('\n') || text[..*at].ends_with('}'))
        .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
        .collect();
    Exchange { statuses, closed, elapsed: started.elapsed(), text }
}

/// Total answers the handler gave, over every status.
async fn answered(relay: &Relay) -> f64 {
    let (_, _, body) = get(relay.admin, "/metrics").await;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .filter(|l| l.starts_with("hookrelay_request_duration_seconds_count"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn published(relay: &Relay) -> f64 {
    let (_, _, body) = get(relay.admin, "/metrics").await;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .filter(|l| l.starts_with("hookrelay_events_published_total{") && l.contains("source=\"patreon\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn moved(relay: &Relay, moves: &Moves) -> f64 {
    match moves {
        Moves::Rejected(source, reason) => {
            relay.metric("hookrelay_webhooks_rejected_total", &[("source", source), ("reason", reason)]).await
        }
        Moves::Signature(reason) => {
            relay
                .metric("hookrelay_signature_failures_total", &[("source", "patreon"), ("reason", reason)])
                .await
        }
        Moves::Published(_) => published(relay).await,
        Moves::Nothing => answered(relay).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_request_gets_its_answer_and_metric_and_never_a_5xx() {
    let relay = RelayConfig::new()
        .http("max_body_bytes", LIMIT)
        .http("header_read_timeout_ms", HEADER_TIMEOUT_MS)
        .http("request_timeout_ms", REQUEST_TIMEOUT_MS)
        .start()
        .await;
    let rows = rows();
    assert!(rows.len() >= 30, "the matrix has {} rows", rows.len());
    let mut failures = Vec::new();
    for row in &rows {
        let before = moved(&relay, &row.moves).await;
        let limit = Duration::from_millis(REQUEST_TIMEOUT_MS + 3_000);
        let got = exchange(relay.ingest, &row.wire, limit).await;
        let answer = match got.statuses.as_slice() {
            [] if got.closed => Answer::Closed,
            [one] => Answer::Status(*one),
            many => Answer::Statuses(many.to_vec()),
        };
        if answer != row.answer {
            failures.push(format!(
                "{}: expected {:?}, got {answer:?} (closed: {}) {:?}",
                row.name,
                row.answer,
                got.closed,
                &got.text[..got.text.len().min(300)]
            ));
            continue;
        }
        assert!(got.statuses.iter().all(|s| *s < 500), "{}: a 5xx: {}", row.name, got.text);
        // Every answer that refuses without reading the body also ends the connection,
        // and nothing hangs: the slowest row ends within the request timeout.
        assert!(got.closed, "{}: the connection stayed open: {}", row.name, got.text);
        assert!(got.elapsed < limit, "{}: took {:?}", row.name, got.elapsed);
        let want = match &row.moves {
            Moves::Published(n) => before + n,
            Moves::Nothing => before,
            _ => before + 1.0,
        };
        // Publishing is confirmed before the answer, so the counter is already there.
        let after = moved(&relay, &row.moves).await;
        println!("{:<70} {:<20} {:?} in {:?}", row.name, format!("{answer:?}"), row.moves, got.elapsed);
        if after != want {
            failures.push(format!(
                "{}: {:?} went from {before} to {after}, expected {want}",
                row.name, row.moves
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );

    for status in ["500", "503"] {
        let fives = relay.metric("hookrelay_request_duration_seconds_count", &[("status", status)]).await;
        assert_eq!(fives, 0.0, "the relay answered {status}");
    }
    // Still alive and relaying after all of it.
    let (status, _, text) = Signed::new().post(relay.ingest).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&text));
    assert_eq!(relay.metric("hookrelay_inflight_requests", &[]).await, 0.0);
    relay.stop_and_cleanup().await;
}
