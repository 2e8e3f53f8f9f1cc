//! The one place that owns the Prometheus registry. Call sites use intent-named
//! methods (`signature_failed(source, reason)`) and stay one line long.
//!
//! Label values only ever come from bounded sets: configured source names (or
//! `_unknown`), each source's provider's documented event names (or `other`), and the
//! reason enums and lists in `reasons`, whose `ALL` is what gets pre-registered.

mod reasons;

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub use self::reasons::*;

/// All relay metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    received: IntCounterVec,
    signature_failures: IntCounterVec,
    rejected: IntCounterVec,
    published: IntCounterVec,
    publish_failures: IntCounterVec,
    publish_retries: IntCounterVec,
    dead_lettered: IntCounterVec,
    unrouted: IntCounterVec,
    confirm_duration: HistogramVec,
    request_duration: HistogramVec,
    broker_connected: IntGauge,
    broker_blocked: IntGauge,
    connection_replacements: IntCounterVec,
    channel_replacements: IntCounter,
    last_confirm_age: prometheus::Gauge,
    spool_events: IntGauge,
    spool_bytes: IntGauge,
    spooled: IntCounterVec,
    spool_drained: IntCounter,
    spool_corrupt: IntCounter,
    spool_quarantined: IntCounter,
    spool_quarantine_events: IntGauge,
    inflight: IntGauge,
    unrouted_messages: IntGauge,
    dead_letter_messages: IntGauge,
    parked_messages: prometheus::IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Registers `collector` and hands it back.
fn registered<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> prometheus::Result<C> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    registered(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn single_counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    registered(registry, IntCounter::new(name, help)?)
}

/// A latency histogram (seconds, [`LATENCY_BUCKETS`]) with one label.
fn latency(registry: &Registry, name: &str, help: &str, label: &str) -> prometheus::Result<HistogramVec> {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    registered(registry, HistogramVec::new(opts, &[label])?)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    registered(registry, IntGauge::new(name, help)?)
}

/// Latency buckets from 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Metrics {
    /// Creates the registry with every series of every configured source at zero, so
    /// dashboards and alerts see them before the first event. Each source comes with
    /// the event labels its provider documents (`other` is always added).
    pub fn new<'a>(
        sources: impl IntoIterator<Item = (&'a str, &'static [&'static str])>,
    ) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let m = Metrics {
            received: counter(
                &registry,
                "hookrelay_webhooks_received_total",
                "Webhook requests received, by source.",
                &["source"],
            )?,
            signature_failures: counter(
                &registry,
                "hookrelay_signature_failures_total",
                "Requests refused with 401, by source and reason (missing, malformed, mismatch, stale).",
                &["source", "reason"],
            )?,
            rejected: counter(
                &registry,
                "hookrelay_webhooks_rejected_total",
                "Requests refused for reasons other than the signature, by source and reason.",
                &["source", "reason"],
            )?,
            published: counter(
                &registry,
                "hookrelay_events_published_total",
                "Events the broker confirmed, by source and event (a name the provider documents, or other).",
                &["source", "event"],
            )?,
            publish_failures: counter(
                &registry,
                "hookrelay_publish_failures_total",
                "Events that could not be confirmed in time, by source and reason of the last attempt.",
                &["source", "reason"],
            )?,
            publish_retries: counter(
                &registry,
                "hookrelay_publish_retries_total",
                "Publish attempts after the first, by source and reason of the failed attempt.",
                &["source", "reason"],
            )?,
            dead_lettered: counter(
                &registry,
                "hookrelay_dead_lettered_total",
                "Events the relay published to the dead-letter exchange, by source and reason.",
                &["source", "reason"],
            )?,
            unrouted: counter(
                &registry,
                "hookrelay_unrouted_total",
                "Events the broker returned as unroutable (the alternate exchange was missing), by source.",
                &["source"],
            )?,
            confirm_duration: latency(
                &registry,
                "hookrelay_confirm_duration_seconds",
                "Time from publish to broker confirm, by source.",
                "source",
            )?,
            request_duration: latency(
                &registry,
                "hookrelay_request_duration_seconds",
                "Time from request head to answer on the ingest listener, by status.",
                "status",
            )?,
            broker_connected: gauge(
                &registry,
                "hookrelay_broker_connected",
                "1 while the relay holds an open broker connection with its channels, else 0.",
            )?,
            broker_blocked: gauge(
                &registry,
                "hookrelay_broker_blocked",
                "1 while the broker has blocked the connection (memory or disk alarm), else 0.",
            )?,
            connection_replacements: counter(
                &registry,
                "hookrelay_broker_connection_replacements_total",
                "Broker connections the relay declared dead and replaced, by cause (heartbeat, confirm_timeout, closed).",
                &["cause"],
            )?,
            channel_replacements: single_counter(
                &registry,
                "hookrelay_broker_channel_replacements_total",
                "Publishing channels replaced after nacking publishes in a row (e.g. a quorum queue leader lost).",
            )?,
            last_confirm_age: registered(
                &registry,
                prometheus::Gauge::new(
                    "hookrelay_broker_seconds_since_last_confirm",
                    "Seconds since the broker last confirmed a publish (since start-up if none yet).",
                )?,
            )?,
            spool_events: gauge(&registry, "hookrelay_spool_events", "Events waiting in the local spool.")?,
            spool_bytes: gauge(
                &registry,
                "hookrelay_spool_bytes",
                "Bytes of events waiting in the local spool.",
            )?,
            spooled: counter(
                &registry,
                "hookrelay_spooled_total",
                "Events written to the local spool, by source.",
                &["source"],
            )?,
            spool_drained: single_counter(
                &registry,
                "hookrelay_spool_drained_total",
                "Spooled events published and confirmed by the drainer.",
            )?,
            spool_corrupt: single_counter(
                &registry,
                "hookrelay_spool_corrupt_records_total",
                "Torn or corrupt spool records skipped on recovery.",
            )?,
            spool_quarantined: single_counter(
                &registry,
                "hookrelay_spool_quarantined_total",
                "Spooled events the broker refused repeatedly, moved aside to the spool quarantine.",
            )?,
            spool_quarantine_events: gauge(
                &registry,
                "hookrelay_spool_quarantine_events",
                "Events waiting in the spool quarantine for an operator (hookrelay replay --spool-quarantine).",
            )?,
            inflight: gauge(&registry, "hookrelay_inflight_requests", "Ingest requests being handled.")?,
            unrouted_messages: gauge(
                &registry,
                "hookrelay_unrouted_messages",
                "Messages in the unrouted queue (no binding matched), read every 5 s.",
            )?,
            dead_letter_messages: gauge(
                &registry,
                "hookrelay_dead_letter_messages",
                "Messages in the relay's dead-letter queue, read every 5 s.",
            )?,
            parked_messages: registered(
                &registry,
                prometheus::IntGaugeVec::new(
                    Opts::new(
                        "hookrelay_parked_messages",
                        "Messages in a source's parking queue (rejected too often), read every 5 s.",
                    ),
                    &["source"],
                )?,
            )?,
            registry,
        };
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;

        let none: &'static [&'static str] = &[];
        for (source, events) in sources.into_iter().chain([(UNKNOWN_SOURCE, none)]) {
            m.received.with_label_values(&[source]);
            for reason in Reject::ALL {
                m.rejected.with_label_values(&[source, reason.as_str()]);
            }
            if source == UNKNOWN_SOURCE {
                continue;
            }
            for reason in SignatureReason::ALL {
                m.signature_failures.with_label_values(&[source, reason.as_str()]);
            }
            for event in events {
                m.published.with_label_values(&[source, event]);
            }
            m.published.with_label_values(&[source, "other"]);
            for reason in PUBLISH_FAILURE_REASONS {
                m.publish_failures.with_label_values(&[source, reason]);
                m.publish_retries.with_label_values(&[source, reason]);
            }
            for reason in DEAD_LETTER_REASONS {
                m.dead_lettered.with_label_values(&[source, reason]);
            }
            m.unrouted.with_label_values(&[source]);
            m.spooled.with_label_values(&[source]);
            m.parked_messages.with_label_values(&[source]);
            m.confirm_duration.with_label_values(&[source]);
        }
        for cause in CONNECTION_REPLACEMENT_CAUSES {
            m.connection_replacements.with_label_values(&[cause]);
        }
        for status in STATUSES {
            m.request_duration.with_label_values(&[status_label(status)]);
        }
        Ok(m)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on a broken metric family, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// A webhook request for a configured source arrived.
    pub fn webhook_received(&self, source: &str) {
        self.received.with_label_values(&[source]).inc();
    }

    /// A signature check failed.
    pub fn signature_failed(&self, source: &str, reason: SignatureReason) {
        self.signature_failures.with_label_values(&[source, reason.as_str()]).inc();
    }

    /// A request was refused for a reason other than its signature.
    pub fn rejected(&self, source: &str, reason: Reject) {
        self.rejected.with_label_values(&[source, reason.as_str()]).inc();
    }

    /// The broker confirmed an event.
    pub fn published(&self, source: &str, event: &'static str) {
        self.published.with_label_values(&[source, event]).inc();
    }

    /// An event could not be confirmed within its deadline.
    pub fn publish_failed(&self, source: &str, reason: &'static str) {
        self.publish_failures.with_label_values(&[source, reason]).inc();
    }

    /// A publish attempt failed and another follows.
    pub fn publish_retried(&self, source: &str, reason: &'static str) {
        self.publish_retries.with_label_values(&[source, reason]).inc();
    }

    /// An event went to the dead-letter exchange.
    pub fn dead_lettered(&self, source: &str, reason: &'static str) {
        self.dead_lettered.with_label_values(&[source, reason]).inc();
    }

    /// The broker returned an event as unroutable.
    pub fn unrouted(&self, source: &str) {
        self.unrouted.with_label_values(&[source]).inc();
    }

    /// Time from publish to confirm.
    pub fn confirm_latency(&self, source: &str, elapsed: Duration) {
        self.confirm_duration.with_label_values(&[source]).observe(elapsed.as_secs_f64());
    }

    /// An ingest request was answered.
    pub fn request_finished(&self, status: u16, elapsed: Duration) {
        self.request_duration.with_label_values(&[status_label(status)]).observe(elapsed.as_secs_f64());
    }

    /// The broker connection came up or went down.
    pub fn broker_connected(&self, up: bool) {
        self.broker_connected.set(i64::from(up));
    }

    /// The broker blocked or unblocked the connection.
    pub fn broker_blocked(&self, blocked: bool) {
        self.broker_blocked.set(i64::from(blocked));
    }

    /// The relay declared a broker connection dead, for a cause in
    /// [`CONNECTION_REPLACEMENT_CAUSES`].
    pub fn connection_replaced(&self, cause: &'static str) {
        self.connection_replacements.with_label_values(&[cause]).inc();
    }

    /// A publishing channel nacked publishes in a row and was replaced.
    pub fn channel_replaced(&self) {
        self.channel_replacements.inc();
    }

    /// Time since the broker last confirmed a publish.
    pub fn last_confirm_age(&self, age: Duration) {
        self.last_confirm_age.set(age.as_secs_f64());
    }

    /// Spooled events were moved to the quarantine; `waiting` are there now.
    pub fn spool_quarantined(&self, count: u64, waiting: u64) {
        self.spool_quarantined.inc_by(count);
        self.spool_quarantine_depth(waiting);
    }

    /// Events waiting in the spool quarantine.
    pub fn spool_quarantine_depth(&self, waiting: u64) {
        self.spool_quarantine_events.set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    /// Current spool depth.
    pub fn spool_depth(&self, events: u64, bytes: u64) {
        self.spool_events.set(i64::try_from(events).unwrap_or(i64::MAX));
        self.spool_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// An event was written to the spool.
    pub fn spooled(&self, source: &str) {
        self.spooled.with_label_values(&[source]).inc();
    }

    /// Spooled events were published and removed.
    pub fn spool_drained(&self, count: u64) {
        self.spool_drained.inc_by(count);
    }

    /// Corrupt spool records were skipped.
    pub fn spool_corrupt(&self, count: u64) {
        self.spool_corrupt.inc_by(count);
    }

    /// Depth of the unrouted queue.
    pub fn unrouted_depth(&self, messages: u32) {
        self.unrouted_messages.set(i64::from(messages));
    }

    /// Depth of the dead-letter queue.
    pub fn dead_letter_depth(&self, messages: u32) {
        self.dead_letter_messages.set(i64::from(messages));
    }

    /// Depth of a source's parking queue.
    pub fn parked_depth(&self, source: &str, messages: u32) {
        self.parked_messages.with_label_values(&[source]).set(i64::from(messages));
    }

    /// The in-flight request gauge; hold the guard while a request is handled.
    pub fn inflight(&self) -> InflightGuard {
        self.inflight.inc();
        InflightGuard(self.inflight.clone())
    }
}

/// Decrements the in-flight gauge when dropped.
pub struct InflightGuard(IntGauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        429 => "429",
        503 => "503",
        _ => "500",
    }
}
