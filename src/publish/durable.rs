//! The publisher the relay actually uses: the broker first, the local spool when the
//! broker cannot confirm in time, and a drainer that moves spooled events to the
//! broker, in order, once it is back.
//!
//! A 2xx is only ever answered for [`Delivered`] outcomes: confirmed by the broker,
//! dead-lettered and confirmed there, or fsync'd in the spool.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Broker, Delivered, Outgoing, PublishError, Publisher};
use crate::envelope::{self, Envelope};
use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolError, SpoolRecord};

/// Records the drainer publishes per round.
const DRAIN_BATCH: usize = 256;
/// Pause after a failed drain round before the next one.
const DRAIN_BACKOFF: Duration = Duration::from_millis(200);

/// Broker first, spool second.
pub struct DurablePublisher<B> {
    amqp: B,
    spool: Option<Spool>,
    spool_max_bytes: u64,
    /// False after the spool failed to write; true again after a good write.
    spool_healthy: Arc<AtomicBool>,
    metrics: Metrics,
}

impl<B> std::fmt::Debug for DurablePublisher<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurablePublisher").field("spool", &self.spool.is_some()).finish()
    }
}

impl<B: Broker> DurablePublisher<B> {
    /// Combines the broker publisher with an optional, already opened spool.
    pub fn new(amqp: B, spool: Option<Spool>, spool_max_bytes: u64, metrics: Metrics) -> Self {
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

    /// The drainer task, if there is a spool; it ends when `shutdown` is cancelled.
    pub fn drainer(&self, shutdown: CancellationToken) -> Option<impl Future<Output = ()> + Send + 'static> {
        let spool = self.spool.clone()?;
        Some(drain(spool, self.amqp.clone(), self.metrics.clone(), shutdown))
    }

    /// Flushes and closes the spool (after the drainer stopped).
    pub async fn close(&self) {
        if let Some(spool) = &self.spool {
            spool.close().await;
        }
    }
}

impl<B: Broker> Publisher for DurablePublisher<B> {
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
        self.spool(&event, spool).await
    }

    fn is_ready(&self) -> bool {
        self.amqp.is_ready() || self.spool_accepts()
    }
}

/// Publishes spooled events in spool order and removes each batch once confirmed.
async fn drain<B: Broker>(spool: Spool, amqp: B, metrics: Metrics, shutdown: CancellationToken) {
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
            _ = shutdown.cancelled() => return,
        }
        // Wait for a connection, checking for shutdown now and then.
        while !amqp.is_ready() {
            tokio::select! {
                _ = amqp.wait_ready(Instant::now() + Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        let batch = match spool.peek_batch(DRAIN_BATCH).await {
            Ok(batch) => batch,
            Err(error) => {
                warn!(%error, "Reading the spool failed.");
                if pause(&shutdown).await {
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
        if done < batch.len() && pause(&shutdown).await {
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
        delivery_id: None,
        routing_key: record.routing_key.clone(),
        body: record.envelope.clone(),
    }
}

/// Sleeps the drain backoff; true if shutdown was asked meanwhile.
async fn pause(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = sleep(DRAIN_BACKOFF) => false,
        _ = shutdown.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::fake::{FakeBroker, TempDir, envelope};
    use crate::spool::SpoolOptions;

    fn metrics() -> Metrics {
        Metrics::new([("patreon", &[] as &[&str])]).unwrap()
    }

    async fn durable(broker: &FakeBroker, dir: &TempDir, max_bytes: u64) -> DurablePublisher<FakeBroker> {
        let opts = SpoolOptions { max_bytes, ..SpoolOptions::default() };
        let (spool, _) = Spool::open(dir.path(), opts).await.unwrap();
        DurablePublisher::new(broker.clone(), Some(spool), max_bytes, metrics())
    }

    async fn publish(p: &DurablePublisher<FakeBroker>, id: &str) -> Result<Delivered, PublishError> {
        let env = envelope(id);
        p.publish(Outgoing { source: "patreon", event_label: "other", envelope: &env }).await
    }

    fn spooled(p: &DurablePublisher<FakeBroker>) -> u64 {
        p.spool.as_ref().map_or(0, |s| s.depth().events)
    }

    #[tokio::test]
    async fn a_confirmed_event_is_not_spooled() {
        let (broker, dir) = (FakeBroker::default(), TempDir::new("durable-ack"));
        let p = durable(&broker, &dir, 1 << 20).await;
        assert_eq!(publish(&p, "a").await, Ok(Delivered::Confirmed));
        let broker2 = FakeBroker::answering([Ok(Delivered::DeadLettered)]);
        let p2 = durable(&broker2, &TempDir::new("durable-dlx"), 1 << 20).await;
        assert_eq!(publish(&p2, "b").await, Ok(Delivered::DeadLettered));
        assert_eq!((spooled(&p), spooled(&p2)), (0, 0));
    }

    #[tokio::test]
    async fn every_broker_failure_falls_back_to_the_spool() {
        for error in [
            PublishError::Nacked,
            PublishError::Unroutable,
            PublishError::Timeout,
            PublishError::Unavailable,
            PublishError::ChannelError,
        ] {
            let (broker, dir) = (FakeBroker::answering([Err(error)]), TempDir::new("durable-fail"));
            let p = durable(&broker, &dir, 1 << 20).await;
            assert_eq!(publish(&p, "a").await, Ok(Delivered::Spooled), "{error:?}");
            assert_eq!(spooled(&p), 1, "{error:?}");
            assert_eq!(broker.script().published, ["a"], "{error:?}: the broker was asked first");
        }
    }

    #[tokio::test]
    async fn no_connection_or_a_blocked_broker_spools_without_asking_the_broker() {
        for (ready, blocked) in [(false, false), (true, true)] {
            let (broker, dir) = (FakeBroker::default(), TempDir::new("durable-down"));
            (broker.script().ready, broker.script().blocked) = (ready, blocked);
            let p = durable(&broker, &dir, 1 << 20).await;
            assert_eq!(publish(&p, "a").await, Ok(Delivered::Spooled));
            assert!(broker.script().published.is_empty(), "ready {ready}, blocked {blocked}");
            assert!(Publisher::is_ready(&p), "ready while the spool accepts");
        }
    }

    #[tokio::test]
    async fn a_full_spool_answers_spool_unavailable() {
        let (broker, dir) =
            (FakeBroker::answering([Err(PublishError::Timeout)]), TempDir::new("durable-full"));
        let p = durable(&broker, &dir, 16).await;
        assert_eq!(publish(&p, "a").await, Err(PublishError::SpoolUnavailable));
        assert_eq!(spooled(&p), 0);
    }

    #[tokio::test]
    async fn without_a_spool_the_broker_answer_is_the_answer() {
        let broker = FakeBroker::answering([Err(PublishError::Nacked), Err(PublishError::Timeout)]);
        let p = DurablePublisher::new(broker.clone(), None, 0, metrics());
        assert_eq!(publish(&p, "a").await, Err(PublishError::Nacked));
        assert_eq!(publish(&p, "b").await, Err(PublishError::Timeout));
        assert_eq!(publish(&p, "c").await, Ok(Delivered::Confirmed));
        broker.script().ready = false;
        assert!(!Publisher::is_ready(&p), "no broker and no spool: not ready");
    }

    #[tokio::test]
    async fn the_drainer_sends_spooled_events_in_order_once_the_broker_is_back() {
        let (broker, dir) = (FakeBroker::default(), TempDir::new("durable-drain"));
        broker.script().ready = false;
        let p = durable(&broker, &dir, 1 << 20).await;
        let ids: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();
        for id in &ids {
            assert_eq!(publish(&p, id).await, Ok(Delivered::Spooled));
        }
        // The first round confirms only two; the rest follow in order.
        broker.script().in_order_confirms = 2;
        let stop = CancellationToken::new();
        let drainer = tokio::spawn(p.drainer(stop.clone()).unwrap());
        broker.script().ready = true;
        let deadline = Instant::now() + Duration::from_secs(10);
        while spooled(&p) > 3 && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        broker.script().in_order_confirms = usize::MAX;
        while spooled(&p) > 0 && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        drainer.await.unwrap();
        assert_eq!(spooled(&p), 0, "drained within 10 s");
        let s = broker.script();
        let mut sent = s.confirmed_in_order.clone();
        sent.extend(s.published.iter().cloned());
        // The head of an unconfirmed rest may go through the single-publish path.
        sent.dedup();
        assert_eq!(&sent[..2], &ids[..2]);
        let mut all = sent.clone();
        all.sort();
        all.dedup();
        assert_eq!(all, ids, "every spooled event reached the broker");
    }
}
