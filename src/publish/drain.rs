//! The spool drainer: publishes spooled events to the broker in spool order once it
//! is reachable, and removes each run of them only after its confirms, so a crash
//! repeats events at worst and never loses one.
//!
//! A record the broker refuses (nack or unroutable return, on the main exchange and
//! on the dead-letter exchange) must not hold back the records behind it: after
//! [`QUARANTINE_AFTER`] refused rounds it is moved to the spool quarantine (durably,
//! before it leaves the spool), counted, and draining goes on in order. Outages
//! (timeouts, no connection) never count against a record.

use std::time::Duration;

use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::quarantine::Quarantine;
use super::{Broker, Outgoing, PublishError};
use crate::envelope::{self, Envelope};
use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolPosition, SpoolRecord};

/// Records the drainer publishes per round.
const DRAIN_BATCH: usize = 256;
/// Pause after a failed drain round before the next one.
const DRAIN_BACKOFF: Duration = Duration::from_millis(200);
/// Deadline of one in-order round.
const ROUND_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of the full-policy publish of a round's failed head.
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// How often a non-empty quarantine is counted again (an operator may empty it
/// with `hookrelay replay --spool-quarantine` while the relay runs).
const QUARANTINE_RECOUNT: Duration = Duration::from_secs(30);
/// Refused rounds (each with the full retry and dead-letter policy) before the head
/// record is moved to the quarantine.
pub const QUARANTINE_AFTER: u32 = 3;

/// Publishes spooled events in spool order until `shutdown` is cancelled.
pub async fn drain<B: Broker>(spool: Spool, amqp: B, metrics: Metrics, shutdown: CancellationToken) {
    let quarantine = Quarantine::new(spool.dir());
    let mut quarantined = recount(&quarantine, &metrics, 0).await;
    if quarantined > 0 {
        warn!(
            waiting = quarantined,
            dir = %quarantine.dir().display(),
            "Events wait in the spool quarantine; see `hookrelay replay --spool-quarantine`."
        );
    }
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
    // Consecutive refused rounds of the current head.
    let mut refusals: u32 = 0;
    loop {
        tokio::select! {
            _ = spool.wait_nonempty() => {}
            _ = sleep(QUARANTINE_RECOUNT), if quarantined > 0 => {
                quarantined = recount(&quarantine, &metrics, quarantined).await;
                continue;
            }
            _ = shutdown.cancelled() => return,
        }
        // Wait for a connection, checking for shutdown now and then.
        while !amqp.is_ready() {
            tokio::select! {
                _ = amqp.wait_ready(Instant::now() + Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        // While the head is being refused, send it alone: the records behind it would
        // be confirmed, then sent again after it.
        let size = if refusals > 0 { 1 } else { DRAIN_BATCH };
        let batch = match spool.peek_batch(size).await {
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
        let envelopes: Vec<Envelope> = batch.iter().map(|(_, record)| envelope_of(record)).collect();
        let refs: Vec<&Envelope> = envelopes.iter().collect();
        // A round may be cut short at shutdown: records leave the spool only after
        // their confirms.
        let mut done = tokio::select! {
            done = amqp.publish_in_order(&refs, Instant::now() + ROUND_DEADLINE) => done,
            _ = shutdown.cancelled() => return,
        };
        if done > 0 {
            refusals = 0;
        }
        if done < batch.len() {
            // The head of the rest failed; give it the full policy (retries, then the
            // dead-letter exchange) before it can count as refused.
            let (pos, record) = &batch[done];
            let outgoing =
                Outgoing { source: &record.source, event_label: "other", envelope: &envelopes[done] };
            let head = tokio::select! {
                head = amqp.publish_until(outgoing, Instant::now() + HEAD_DEADLINE) => head,
                _ = shutdown.cancelled() => return,
            };
            match head {
                Ok(_) => {
                    done += 1;
                    refusals = 0;
                }
                Err(error @ (PublishError::Nacked | PublishError::Unroutable)) => {
                    refusals += 1;
                    debug!(event_id = %record.event_id, refusals, reason = error.label(), "Spooled event refused.");
                    if refusals >= QUARANTINE_AFTER
                        && set_aside(&spool, &quarantine, *pos, record, done, &metrics).await
                    {
                        refusals = 0;
                        quarantined += 1;
                        continue;
                    }
                }
                Err(_) => {}
            }
        }
        if done > 0 {
            let (pos, _) = &batch[done - 1];
            removed(&spool, *pos, done as u64, &metrics).await;
        }
        if done < batch.len() && pause(&shutdown).await {
            return;
        }
    }
}

/// Moves the refused record at `pos` to the quarantine, after removing the `done`
/// confirmed records before it. True when it is out of the spool.
async fn set_aside(
    spool: &Spool,
    quarantine: &Quarantine,
    pos: SpoolPosition,
    record: &SpoolRecord,
    done: usize,
    metrics: &Metrics,
) -> bool {
    // Durable in the quarantine first: a crash in between duplicates, never loses.
    let waiting = match quarantine.put(record.clone()).await {
        Ok(waiting) => waiting,
        Err(error) => {
            warn!(%error, event_id = %record.event_id, "Cannot move a refused event to the spool quarantine.");
            return false;
        }
    };
    metrics.spool_quarantined(1, waiting);
    warn!(
        event_id = %record.event_id,
        routing_key = %record.routing_key,
        waiting,
        "The broker refused a spooled event {QUARANTINE_AFTER} times; moved it to the spool quarantine \
         (hookrelay replay --spool-quarantine)."
    );
    // The quarantined record leaves with the confirmed ones before it; it is not
    // counted as drained.
    removed(spool, pos, done as u64, metrics).await
}

/// Counts the events waiting in the quarantine into the gauge; `known` stands when
/// it cannot be read (a replay may hold its lock).
async fn recount(quarantine: &Quarantine, metrics: &Metrics, known: u64) -> u64 {
    match quarantine.waiting().await {
        Ok(waiting) => {
            metrics.spool_quarantine_depth(waiting);
            waiting
        }
        Err(error) => {
            debug!(%error, "Cannot count the spool quarantine.");
            known
        }
    }
}

/// Removes the records through `pos`, `drained` of which were published.
async fn removed(spool: &Spool, pos: SpoolPosition, drained: u64, metrics: &Metrics) -> bool {
    match spool.remove_through(pos).await {
        Ok(()) => {
            metrics.spool_drained(drained);
            let depth = spool.depth();
            metrics.spool_depth(depth.events, depth.bytes);
            debug!(events = drained, left = depth.events, "Drained spooled events.");
            true
        }
        Err(error) => {
            warn!(%error, "Removing drained events from the spool failed; they will be sent again.");
            false
        }
    }
}

/// The envelope of a spooled record. One that cannot be read back (written by us,
/// so damaged) is still published as it is, so it lands where a person can look at
/// it instead of blocking the spool.
pub fn envelope_of(record: &SpoolRecord) -> Envelope {
    envelope::parse(record.envelope.clone(), record.routing_key.clone()).unwrap_or_else(|_| Envelope {
        id: record.event_id.clone(),
        source: String::new(),
        ce_type: String::new(),
        time: String::new(),
        unix_seconds: 0,
        subject: None,
        delivery_id: None,
        routing_key: record.routing_key.clone(),
        body: record.envelope.clone(),
    })
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
    use crate::publish::fake::{FakeBroker, TempDir};
    use crate::spool::SpoolOptions;

    fn metrics() -> Metrics {
        Metrics::new([("patreon", &[] as &[&str])]).unwrap()
    }

    /// A spool in `dir` holding one record per id, in order.
    async fn spool_of(dir: &TempDir, ids: &[String]) -> Spool {
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).await.unwrap();
        for id in ids {
            let env = crate::publish::fake::envelope(id);
            let record = SpoolRecord {
                source: "patreon".into(),
                routing_key: env.routing_key.clone(),
                event_id: env.id.clone(),
                envelope: env.body.clone(),
            };
            spool.append(record).await.unwrap();
        }
        spool
    }

    /// Polls `done` every 5 ms for up to 10 s.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_refused_record_is_quarantined_and_the_rest_drain_in_order() {
        let (broker, dir) = (FakeBroker::default(), TempDir::new("drain-poison"));
        let ids: Vec<String> = ["a", "poison", "b", "c"].map(String::from).to_vec();
        broker.script().refused.insert("poison".into());
        let spool = spool_of(&dir, &ids).await;
        let m = metrics();
        let stop = CancellationToken::new();
        let drainer = tokio::spawn(drain(spool.clone(), broker.clone(), m.clone(), stop.clone()));
        until("the spool to empty", || spool.depth().events == 0).await;
        stop.cancel();
        drainer.await.unwrap();
        let (in_order, published) = {
            let s = broker.script();
            (s.confirmed_in_order.clone(), s.published.clone())
        };
        assert_eq!(in_order, ["a", "b", "c"], "the others drained, in order");
        let refused_rounds = published.iter().filter(|id| *id == "poison").count();
        assert_eq!(
            refused_rounds, QUARANTINE_AFTER as usize,
            "moved aside after {QUARANTINE_AFTER} refusals"
        );
        let quarantine = Quarantine::new(dir.path());
        assert_eq!(quarantine.waiting().await.unwrap(), 1);
        let held = quarantine.open(Duration::ZERO).await.unwrap();
        let kept = held.spool.peek_batch(10).await.unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].1.event_id, "poison");
        held.close().await;
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("hookrelay_spool_quarantined_total 1"), "counted");
        assert!(text.contains("hookrelay_spool_drained_total 3"), "drained counts the three only");
    }

    #[tokio::test]
    async fn an_outage_never_quarantines() {
        let (broker, dir) = (FakeBroker::default(), TempDir::new("drain-outage"));
        (broker.script().in_order_confirms, broker.script().then) = (0, Err(PublishError::Timeout));
        let ids: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let spool = spool_of(&dir, &ids).await;
        let stop = CancellationToken::new();
        let drainer = tokio::spawn(drain(spool.clone(), broker.clone(), metrics(), stop.clone()));
        let rounds = QUARANTINE_AFTER as usize + 2;
        until("several failed rounds", || broker.script().published.len() >= rounds).await;
        stop.cancel();
        drainer.await.unwrap();
        assert_eq!(spool.depth().events, 2, "both still spooled");
        assert_eq!(Quarantine::new(dir.path()).waiting().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_drainer_sends_spooled_events_in_order_once_the_broker_is_back() {
        let (broker, dir) = (FakeBroker::default(), TempDir::new("drain-order"));
        broker.script().ready = false;
        let ids: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();
        let p = spool_of(&dir, &ids).await;
        // The first round confirms only two; the rest follow in order.
        broker.script().in_order_confirms = 2;
        let stop = CancellationToken::new();
        let drainer = tokio::spawn(drain(p.clone(), broker.clone(), metrics(), stop.clone()));
        broker.script().ready = true;
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.depth().events > 3 && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        broker.script().in_order_confirms = usize::MAX;
        while p.depth().events > 0 && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        drainer.await.unwrap();
        assert_eq!(p.depth().events, 0, "drained within 10 s");
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
