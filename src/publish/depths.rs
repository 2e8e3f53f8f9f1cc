//! Polls the depth of the queues an operator must look at (unrouted, dead-letter,
//! parked) and exposes them as gauges. Messages routed through the alternate
//! exchange are confirmed like any other, so the broker sends no return for them:
//! inspecting the queue is how the relay sees them.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Broker;
use super::amqp::AmqpPublisher;
use super::topology::parked_queue;
use crate::metrics::Metrics;

/// How often the depths are read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Reads queue depths every [`POLL_INTERVAL`] until shutdown.
pub async fn run(
    amqp: AmqpPublisher,
    unrouted: Option<String>,
    dead: Option<String>,
    sources: Vec<String>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let parked: Vec<(String, String)> =
        sources.iter().map(|s| (s.clone(), parked_queue(amqp.exchange(), s))).collect();
    loop {
        if let Some(link) = amqp.link() {
            let conn = link.connection();
            let read = async {
                if let Some(q) = &unrouted
                    && let Some(n) = depth(conn, q).await
                {
                    metrics.unrouted_depth(n);
                }
                if let Some(q) = &dead
                    && let Some(n) = depth(conn, q).await
                {
                    metrics.dead_letter_depth(n);
                }
                for (source, q) in &parked {
                    if let Some(n) = depth(conn, q).await {
                        metrics.parked_depth(source, n);
                    }
                }
            };
            // A silent connection would hold the reads forever.
            tokio::select! {
                _ = read => {}
                _ = link.retired() => {}
                _ = shutdown.cancelled() => return,
            }
        } else {
            tokio::select! {
                _ = amqp.wait_ready(Instant::now() + POLL_INTERVAL) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Message count of a queue, or `None` if it cannot be read (a missing queue closes
/// the channel, so each read uses its own).
async fn depth(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    let ch = conn.create_channel().await.ok()?;
    let opts = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let result = ch.queue_declare(queue.into(), opts, FieldTable::default()).await;
    let _ = ch.close(200, "depth read".into()).await;
    match result {
        Ok(q) => Some(q.message_count()),
        Err(error) => {
            debug!(%error, queue, "Cannot read a queue depth.");
            None
        }
    }
}
