//! The publisher the relay actually uses: the broker first, the local spool when the
//! broker could not confirm in time or could not be reached. The drainer (`drain`)
//! moves spooled events to the broker, in order, once it is back.
//!
//! A 2xx is only ever answered for [`Delivered`] outcomes: confirmed by the broker,
//! dead-lettered and confirmed there, or fsync'd in the spool. A refusal the relay
//! cannot dead-letter (a nack or an unroutable return) is not an outage: the event is
//! not spooled, where it would block the events behind it, but answered 503 so the
//! sender keeps it and tries again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::drain::drain;
use super::{Broker, Delivered, Outgoing, PublishError, Publisher};
use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolError, SpoolRecord};

/// Broker first, spool second.
pub struct DurablePublisher<B> {
    amqp: B,
    spool: Option<Spool>,
    spool_max_bytes: u64,
    /// False after the spool failed to write; true again after a good write.
    spool_healthy: Arc<AtomicBool>,
    /// Refusals already logged: nack, unroutable (each is logged once).
    refusals_logged: [AtomicBool; 2],
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
            refusals_logged: [AtomicBool::new(false), AtomicBool::new(false)],
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

    /// Logs the first refusal of each kind: a full queue refuses every event for it,
    /// and the counter says how many.
    fn refused(&self, error: PublishError) {
        let slot = match error {
            PublishError::Nacked => &self.refusals_logged[0],
            PublishError::Unroutable => &self.refusals_logged[1],
            _ => return,
        };
        if !slot.swap(true, Ordering::Relaxed) {
            warn!(
                reason = error.label(),
                "The broker refused an event and it could not be dead-lettered; answering 503 \
                 (logged once per reason; hookrelay_publish_failures_total counts them)."
            );
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

/// Whether a broker failure is a refusal (not an outage): the broker answered, no.
fn is_refusal(error: PublishError) -> bool {
    matches!(error, PublishError::Nacked | PublishError::Unroutable)
}

impl<B: Broker> Publisher for DurablePublisher<B> {
    async fn publish(&self, event: Outgoing<'_>) -> Result<Delivered, PublishError> {
        let Some(spool) = &self.spool else {
            let answer = self.amqp.publish(event).await;
            if let Err(error) = answer {
                self.refused(error);
            }
            return answer;
        };
        // No connection (or one just declared dead), or the broker blocks publishing:
        // don't make the sender wait the whole deadline for an answer the spool can
        // give now.
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
        if is_refusal(broker_error) {
            self.refused(broker_error);
            return Err(broker_error);
        }
        debug!(reason = broker_error.label(), "Broker did not confirm; spooling.");
        self.spool(&event, spool).await
    }

    fn is_ready(&self) -> bool {
        self.amqp.is_ready() || self.spool_accepts()
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
    async fn outages_fall_back_to_the_spool() {
        for error in [PublishError::Timeout, PublishError::Unavailable, PublishError::ChannelError] {
            let (broker, dir) = (FakeBroker::answering([Err(error)]), TempDir::new("durable-fail"));
            let p = durable(&broker, &dir, 1 << 20).await;
            assert_eq!(publish(&p, "a").await, Ok(Delivered::Spooled), "{error:?}");
            assert_eq!(spooled(&p), 1, "{error:?}");
            assert_eq!(broker.script().published, ["a"], "{error:?}: the broker was asked first");
        }
    }

    #[tokio::test]
    async fn refusals_are_answered_not_spooled() {
        for error in [PublishError::Nacked, PublishError::Unroutable] {
            let broker = FakeBroker::answering([Err(error), Err(error)]);
            let dir = TempDir::new("durable-refused");
            let p = durable(&broker, &dir, 1 << 20).await;
            assert_eq!(publish(&p, "a").await, Err(error));
            assert_eq!(publish(&p, "b").await, Err(error), "logged once, answered every time");
            assert_eq!(publish(&p, "c").await, Ok(Delivered::Confirmed), "later events are unaffected");
            assert_eq!(spooled(&p), 0, "{error:?}: nothing spooled for a refusal");
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
}
