//! What a scenario proved: every event answered 2xx found in the broker (lost, and
//! duplicates by event id), the share answered 2xx during the fault, the longest answer
//! and how long until answers were back to normal; printed as one table row.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::time::Instant;

use crate::load::Sample;

/// Answers slower than this many times the pre-fault p99 count as "not normal".
const SLOW_FACTOR: u32 = 5;
/// ... and never a bound below this (a loaded 2-core box has jitter).
const SLOW_FLOOR: Duration = Duration::from_millis(250);

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub sent: usize,
    pub ok: usize,
    pub fault: Duration,
    pub ok_share_in_fault: f64,
    pub longest: Duration,
    pub normal_after: Duration,
    pub slow_bound: Duration,
    pub spooled: u64,
    pub nack_retries: u64,
    pub channels_replaced: usize,
    pub reconnects: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub dead_lettered: usize,
}

/// Counts of each event id found in some queues.
pub type Found = HashMap<String, usize>;

/// Connects to the first cluster node that accepts.
pub async fn connect_any(urls: &[String]) -> Connection {
    for url in urls {
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await;
        if let Ok(Ok(conn)) = attempt {
            return conn;
        }
    }
    panic!("no cluster node accepts a connection ({} tried)", urls.len());
}

/// Consumes (and so removes) every message of `queue`, counting message ids.
pub async fn drain_queue(conn: &Connection, queue: &str, found: &mut Found) -> usize {
    let ch = conn.create_channel().await.expect("a channel");
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let depth = ch.queue_declare(queue.into(), passive, FieldTable::default()).await.expect("queue exists");
    let expected = depth.message_count() as usize;
    ch.basic_qos(1000, BasicQosOptions::default()).await.expect("qos");
    let opts = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut consumer = ch
        .basic_consume(queue.into(), "cluster-check".into(), opts, FieldTable::default())
        .await
        .expect("consume");
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Everything counted, then a quiet second in case more arrived meanwhile.
    loop {
        let idle = if got >= expected { Duration::from_secs(1) } else { Duration::from_secs(10) };
        match tokio::time::timeout(idle, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let id = d.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
                *found.entry(id).or_default() += 1;
                got += 1;
            }
            Ok(Some(Err(error))) => panic!("consuming {queue} failed: {error}"),
            Ok(None) | Err(_) => break,
        }
        assert!(Instant::now() < deadline, "draining {queue} took over 120 s");
    }
    let _ = ch.close(200, "counted".into()).await;
    got
}

/// Lost and duplicated events: `accepted` are the ids answered 2xx.
pub fn losses(accepted: &[&str], found: &Found) -> (usize, usize) {
    let want: HashSet<&str> = accepted.iter().copied().collect();
    let lost = want.iter().filter(|id| !found.contains_key(**id)).count();
    let duplicates = found.values().map(|c| c.saturating_sub(1)).sum();
    (lost, duplicates)
}

/// The timing columns from the samples and the fault window `[from, to]`.
pub fn timing(samples: &[Sample], from: Duration, to: Duration) -> (f64, Duration, Duration, Duration) {
    let mut before: Vec<Duration> = samples.iter().filter(|s| s.end() < from).map(|s| s.took).collect();
    before.sort();
    let p99 = before.get(before.len().saturating_mul(99) / 100).copied().unwrap_or_default();
    let slow = (p99 * SLOW_FACTOR).max(SLOW_FLOOR);
    let during: Vec<&Sample> = samples.iter().filter(|s| s.at >= from && s.at <= to).collect();
    let share = if during.is_empty() {
        1.0
    } else {
        during.iter().filter(|s| s.ok()).count() as f64 / during.len() as f64
    };
    let longest = samples.iter().map(|s| s.took).max().unwrap_or_default();
    let last_abnormal =
        samples.iter().filter(|s| s.end() >= from && (!s.ok() || s.took > slow)).map(Sample::end).max();
    let normal_after = last_abnormal.map_or(Duration::ZERO, |end| end.saturating_sub(from));
    (share, longest, normal_after, slow)
}

/// Prints the table.
pub fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| scenario | sent | 2xx | fault lasted | 2xx during fault | longest answer | normal again after | \
         spooled | nack retries | channels replaced | reconnects | lost | duplicates | dead-lettered |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} s | {:.1}% | {:.2} s | {:.1} s (slow > {} ms) | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.sent,
            r.ok,
            r.fault.as_secs_f64(),
            r.ok_share_in_fault * 100.0,
            r.longest.as_secs_f64(),
            r.normal_after.as_secs_f64(),
            r.slow_bound.as_millis(),
            r.spooled,
            r.nack_retries,
            r.channels_replaced,
            r.reconnects,
            r.lost,
            r.duplicates,
            r.dead_lettered
        );
    }
    println!();
}
