//! Scenarios that act on the whole broker (closing every connection, a memory
//! alarm). Cargo runs test binaries one at a time, so these never overlap the main
//! integration suite; inside this binary a lock runs them one after another.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "it/support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::sync::Mutex;
use tokio::time::Instant;

static SERIAL: Mutex<()> = Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) {
    let out =
        Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl must be on PATH for these tests");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Restores the default memory watermark even if the test fails.
struct WatermarkGuard;

impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["set_vm_memory_high_watermark", "0.4"]).output();
    }
}

async fn metric_is(relay: &Relay, name: &str, want: f64, limit: Duration) {
    let admin = relay.admin;
    let name = name.to_owned();
    eventually(&format!("{name} == {want}"), limit, || {
        let name = name.clone();
        async move {
            let (_, _, text) = get(admin, "/metrics").await;
            (metric_value(&String::from_utf8_lossy(&text), &name, &[]) == Some(want)).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_every_broker_connection_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let spool = temp_dir("hr-spool");
    let relay = Arc::new(RelayConfig::new().spool(&spool).start().await);
    let mut senders = Vec::new();
    for s in 0..4u64 {
        let relay = relay.clone();
        senders.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            for i in 0..100u64 {
                if let (200, Some(id)) = post_signed(relay.ingest, s * 1000 + i).await {
                    ok.push(id);
                }
            }
            ok
        }));
    }
    // Cut once the stream is flowing.
    metric_is_at_least(&relay, "hookrelay_webhooks_received_total", 50.0).await;
    rabbitmqctl(&["close_all_connections", "hookrelay test: closing every connection"]);
    let mut accepted = Vec::new();
    for s in senders {
        accepted.extend(s.await.unwrap());
    }
    assert_eq!(accepted.len(), 400, "every request is accepted (broker or spool)");
    metric_is(&relay, "hookrelay_spool_events", 0.0, Duration::from_secs(30)).await;
    metric_is(&relay, "hookrelay_broker_connected", 1.0, Duration::from_secs(30)).await;
    let conn = broker().await;
    let got = take_messages(&conn, &relay.queue("patreon"), accepted.len() * 2, Duration::from_secs(5)).await;
    let ids: std::collections::HashSet<String> =
        got.iter().map(|d| d.properties.message_id().as_ref().unwrap().to_string()).collect();
    let lost = accepted.iter().filter(|id| !ids.contains(*id)).count();
    eprintln!(
        "accepted={} found={} lost={lost} duplicates={}",
        accepted.len(),
        ids.len(),
        got.len() - ids.len()
    );
    assert_eq!(lost, 0);
    let relay = Arc::try_unwrap(relay).ok().unwrap();
    relay.stop_and_cleanup().await;
    std::fs::remove_dir_all(spool).unwrap();
}

async fn metric_is_at_least(relay: &Relay, name: &str, min: f64) {
    let admin = relay.admin;
    let name = name.to_owned();
    eventually(&format!("{name} >= {min}"), Duration::from_secs(20), || {
        let name = name.clone();
        async move {
            let (_, _, text) = get(admin, "/metrics").await;
            metric_value(&String::from_utf8_lossy(&text), &name, &[("source", "patreon")])
                .filter(|v| *v >= min)
                .map(|_| ())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_publishing_without_hanging_requests() {
    let _serial = SERIAL.lock().await;
    let spool = temp_dir("hr-spool");
    let with_spool = RelayConfig::new().spool(&spool).start().await;
    let without_spool = Relay::start().await;
    let guard = WatermarkGuard;
    rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
    // The broker announces the block once a connection publishes.
    let started = Instant::now();
    let (status, _) = post_signed(without_spool.ingest, 1).await;
    assert_eq!(status, 503, "no spool: the deadline answers, the request does not hang");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    metric_is(&without_spool, "hookrelay_broker_blocked", 1.0, Duration::from_secs(10)).await;
    let (status, _) = post_signed(with_spool.ingest, 2).await;
    assert_eq!(status, 200);
    metric_is(&with_spool, "hookrelay_broker_blocked", 1.0, Duration::from_secs(10)).await;
    // Once blocked is known, the spool answers at once.
    let started = Instant::now();
    let (status, id) = post_signed(with_spool.ingest, 3).await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "below the 3 s deadline: took {:?}",
        started.elapsed()
    );
    drop(guard);
    metric_is(&with_spool, "hookrelay_broker_blocked", 0.0, Duration::from_secs(20)).await;
    metric_is(&with_spool, "hookrelay_spool_events", 0.0, Duration::from_secs(30)).await;
    let conn = broker().await;
    let got = take_messages(&conn, &with_spool.queue("patreon"), 10, Duration::from_secs(3)).await;
    let id = id.unwrap();
    assert!(got.iter().any(|d| d.properties.message_id().as_ref().unwrap().as_str() == id));
    with_spool.stop_and_cleanup().await;
    without_spool.stop_and_cleanup().await;
    std::fs::remove_dir_all(spool).unwrap();
}
