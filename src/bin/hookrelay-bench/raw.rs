//! The broker's own limit: a lapin publisher sending the relay's envelope bytes with
//! the relay's properties (persistent, mandatory, confirms), keeping exactly W
//! publishes in flight, spread over N confirm-mode channels. Each in-flight slot awaits
//! only its own confirm, as a relay request does.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection};
use tokio::time::{Instant, timeout};

use crate::messages::Workload;
use crate::stats::WorkerLog;
use crate::window::Window;

/// Longest one publish and its confirm may take before it counts as failed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes to `exchange` with `in_flight` publishes outstanding over `channels`
/// channels until the window ends, at most `cap` publishes in all.
pub async fn run(
    conn: &Connection,
    exchange: &str,
    channels: usize,
    in_flight: usize,
    work: Arc<Workload>,
    window: Window,
    cap: u64,
) -> anyhow::Result<Vec<WorkerLog>> {
    let mut pool: Vec<Channel> = Vec::with_capacity(channels);
    for _ in 0..channels.max(1) {
        let ch = conn.create_channel().await.context("opening a publisher channel")?;
        ch.confirm_select(ConfirmSelectOptions::default()).await.context("confirm.select")?;
        pool.push(ch);
    }
    let exchange: Arc<str> = Arc::from(exchange);
    let per_worker = (cap / in_flight.max(1) as u64).max(1);
    let mut tasks = Vec::with_capacity(in_flight);
    for k in 0..in_flight {
        let ch = pool[k % pool.len()].clone();
        let work = work.clone();
        let exchange = exchange.clone();
        tasks.push(tokio::spawn(async move {
            worker(ch, &exchange, k, in_flight, &work, window, per_worker).await
        }));
    }
    let mut logs = Vec::with_capacity(in_flight);
    for t in tasks {
        logs.push(t.await.context("a publisher task panicked")?);
    }
    for ch in pool {
        let _ = ch.close(200, "measured".into()).await;
    }
    Ok(logs)
}

async fn worker(
    ch: Channel,
    exchange: &str,
    first: usize,
    stride: usize,
    work: &Workload,
    window: Window,
    cap: u64,
) -> WorkerLog {
    let mut log = WorkerLog::default();
    let options = BasicPublishOptions { mandatory: true, immediate: false };
    let mut i = first;
    let mut sent = 0u64;
    while sent < cap && Instant::now() < window.end {
        let m = &work.messages[i % work.messages.len()];
        i += stride;
        sent += 1;
        let began = Instant::now();
        let outcome = timeout(CONFIRM_TIMEOUT, async {
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    m.envelope.routing_key.as_str().into(),
                    options,
                    &m.envelope.body,
                    m.properties.clone(),
                )
                .await?;
            confirm.await
        })
        .await;
        let done = Instant::now();
        match outcome {
            Ok(Ok(Confirmation::Ack(None))) => {
                log.succeeded += 1;
                if window.counts(done) {
                    log.latencies.push(done - began);
                }
            }
            Ok(Ok(Confirmation::Ack(Some(_)))) => log.fail(|| "the broker returned a message".into()),
            Ok(Ok(Confirmation::Nack(_))) => log.fail(|| "the broker nacked a message".into()),
            Ok(Ok(Confirmation::NotRequested)) => log.fail(|| "the channel is not in confirm mode".into()),
            Ok(Err(e)) => {
                log.fail(|| format!("publish failed: {e}"));
                break;
            }
            Err(_) => {
                log.fail(|| format!("no confirm within {CONFIRM_TIMEOUT:?}"));
                break;
            }
        }
    }
    log
}
