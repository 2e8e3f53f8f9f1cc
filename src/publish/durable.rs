//! The publisher the relay actually uses: the broker first, the local spool when the
//! broker cannot confirm in time, and a drainer that moves spooled events to the
//! broker, in order, once it is back.
//!
//! A 2xx is only ever answered for [`Delivered`] outcomes: confirmed by the broker,
//! dead-lettered and confirmed there, or fsync'd in the spool.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep};
use tracing::{debug, info, warn};

use super::amqp::AmqpPublisher;
use super::{Delivered, Outgoing, PublishError, Publisher};
use crate::envelope::{self, Envelope};
use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolError, SpoolRecord};

/// Records the drainer publishes per round.
const DRAIN_BATCH: usize = 256;
/// Pause after a failed drain round before the next one.
const DRAIN_BACKOFF: Duration = Duration::from_millis(200);

/// Broker first, spool second.
pub struct DurablePublisher {
    amqp: AmqpPublisher,
    spool: Option<Spool>,
    spool_max_bytes: u64,
    /// False after the spool failed to write; true again after a good write.
    spool_healthy: Arc<AtomicBool>,
    metrics: Metrics,
}

impl std::fmt::Debug for DurablePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurablePublisher").field("spool", &self.spool.is_some()).finish()
    }
}

impl DurablePublisher {
    /// Combines the broker publisher with an optional, already opened spool.
    pub fn new(amqp: AmqpPublisher, spool: Option<Spool>, spool_max_bytes: u64, metrics: Metrics) -> Self {
        if let Some(spool) = &spool {
            let depth = spool.depth();
            metrics.spool_depth(depth.events, depth.bytes);
        }
        DurablePublisher {
            amqp,
            spool,
            spool_max_bytes,
            spool_healthy: Arc::new(AtomicBool::new(true)),
            metrics,
        }
    }

    /// Whether the spool would take an event now.
    fn spool_accepts(&self) -> bool {
        match &self.spool {
            Some(spool) => {
                self.spool_healthy.load(Ordering::Relaxed) && spool.depth().bytes < self.spool_max_bytes
            }
            None => false,
        }
    }

    async fn spool(&self, event: &Outgoing<'_>, spool: &Spool) -> Result<Delivered, PublishError> {
        let env = event.envelope;
        let record = SpoolRecord {
            source: event.source.to_owned(),
            routing_key: env.routing_key.clone(),
            event_id: env.id.clone(),
            envelope: env.body.clone(),
        };
        match spool.append(record).await {
            Ok(()) => {
                self.spool_healthy.store(true, Ordering::Relaxed);
                self.metrics.spooled(event.source);
                let depth = spool.depth();
                self.metrics.spool_depth(depth.events, depth.bytes);
                Ok(Delivered::Spooled)
            }
            Err(error) => {
                if !matches!(error, SpoolError::Full) {
                    self.spool_healthy.store(false, Ordering::Relaxed);
                }
                warn!(%error, "The spool did not take the event.");
                Err(PublishError::SpoolUnavailable)
            }
        }
    }

    /// Starts the drainer; it stops when `shutdown` turns true.
    pub fn start_drainer(&self, shutdown: watch::Receiver<bool>) -> Option<tokio::task::JoinHandle<()>> {
        let spool = self.spool.clone()?;
        Some(tokio::spawn(drain(spool, self.amqp.clone(), self.metrics.clone(), shutdown)))
    }

    /// Flushes and closes the spool (after the drainer stopped).
    pub async fn close(&self) {
        if let Some(spool) = &self.spool {
            spool.close().await;
        }
    }
}

impl Publisher for DurablePublisher {
    async fn publish(&self, event: Outgoing<'_>) -> Result<Delivered, PublishError> {
        let Some(spool) = &self.spool else {
            return self.amqp.publish(event).await;
        };
        // No connection, or the broker blocks publishing: don't make the sender wait
        // the whole deadline for an answer the spool can give now.
        let broker_error = if !self.amqp.is_ready() {
            PublishError::Unavailable
        } else if self.amqp.is_blocked() {
            PublishError::Timeout
        } else {
            match self.amqp.publish(event.clone()).await {
                Ok(delivered) => return Ok(delivered),
                Err(error) => error,
            }
        };
        debug!(reason = broker_error.label(), "Broker did not confirm; spooling.");
        match self.spool(&event, spool).await {
            Ok(delivered) => Ok(delivered),
            Err(_) => Err(broker_error),
        }
    }

    fn is_ready(&self) -> bool {
        self.amqp.is_ready() || self.spool_accepts()
    }
}

/// Publishes spooled events in spool order and removes each batch once confirmed.
async fn drain(spool: Spool, amqp: AmqpPublisher, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    // Corrupt records found while reading count too (those found at open already did).
    let mut corrupt_seen = spool.stats().corrupt_records_skipped;
    let depth = spool.depth();
    if depth.events > 0 {
        info!(
            events = depth.events,
            bytes = depth.bytes,
            "Spooled events found; draining once the broker is up."
        );
    }
    loop {
        tokio::select! {
            _ = spool.wait_nonempty() => {}
            _ = shutdown.changed() => return,
        }
        // Wait for a connection, checking for shutdown now and then.
        while !amqp.is_ready() {
            tokio::select! {
                _ = amqp.wait_ready(Instant::now() + Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
        let batch = match spool.peek_batch(DRAIN_BATCH).await {
            Ok(batch) => batch,
            Err(error) => {
                warn!(%error, "Reading the spool failed.");
                if pause(&mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        let corrupt = spool.stats().corrupt_records_skipped;
        if corrupt > corrupt_seen {
            metrics.spool_corrupt(corrupt - corrupt_seen);
            corrupt_seen = corrupt;
        }
        let mut envelopes = Vec::with_capacity(batch.len());
        for (_, record) in &batch {
            match envelope::parse(record.envelope.clone(), record.routing_key.clone()) {
                Ok(env) => envelopes.push(env),
                // Written by us, so unreadable means damaged: keep it out of the way.
                Err(_) => envelopes.push(unparseable(record)),
            }
        }
        let refs: Vec<&Envelope> = envelopes.iter().collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut done = amqp.publish_in_order(&refs, deadline).await;
        if done < batch.len() {
            // The head of the rest failed; give it the full policy (retries, then
            // the dead-letter exchange) so one refused event cannot block the spool.
            let (_, record) = &batch[done];
            let outgoing =
                Outgoing { source: &record.source, event_label: "other", envelope: &envelopes[done] };
            if amqp.publish_until(outgoing, Instant::now() + Duration::from_secs(5)).await.is_ok() {
                done += 1;
            }
        }
        if done > 0 {
            let (pos, _) = &batch[done - 1];
            match spool.remove_through(*pos).await {
                Ok(()) => {
                    metrics.spool_drained(done as u64);
                    let depth = spool.depth();
                    metrics.spool_depth(depth.events, depth.bytes);
                    debug!(events = done, left = depth.events, "Drained spooled events.");
                }
                Err(error) => {
                    warn!(%error, "Removing drained events from the spool failed; they will be sent again.")
                }
            }
        }
        if done < batch.len() && pause(&mut shutdown).await {
            return;
        }
    }
}

/// An envelope that could not be read back is still published as it is, so it lands
/// where a person can look at it instead of blocking the spool.
fn unparseable(record: &SpoolRecord) -> Envelope {
    Envelope {
        id: record.event_id.clone(),
        source: String::new(),
        ce_type: String::new(),
        time: String::new(),
        unix_seconds: 0,
        subject: None,
        routing_key: record.routing_key.clone(),
        body: record.envelope.clone(),
    }
}

/// Sleeps the drain backoff; true if shutdown was asked meanwhile.
async fn pause(shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = sleep(DRAIN_BACKOFF) => false,
        _ = shutdown.changed() => true,
    }
}
