//! One measurement's figures, latency percentiles, and medians across rounds.

use std::time::Duration;

use tokio::time::Instant;

use crate::window::Window;

/// Completions recorded by one worker.
#[derive(Debug, Default)]
pub struct WorkerLog {
    /// Latency of each success that completed inside the measured window.
    pub latencies: Vec<Duration>,
    /// Successes (confirmed, or answered 200) over the whole run, warm-up included.
    pub succeeded: u64,
    /// Failures over the whole run: nacks, returns, non-200 answers, broken connections.
    pub failed: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
}

impl WorkerLog {
    /// Records a success sent at `began` and completed at `done`; its latency counts
    /// when `window` does.
    pub fn succeed(&mut self, window: &Window, began: Instant, done: Instant) {
        self.succeeded += 1;
        if window.counts(done) {
            self.latencies.push(done - began);
        }
    }

    /// Records a failure, keeping the first message.
    pub fn fail(&mut self, what: impl FnOnce() -> String) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }
}

/// Figures of one measurement (one setting, one round).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Successes completed inside the window, per second.
    pub events_per_sec: f64,
    /// Latency percentiles over the window.
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    /// CPU µs per event of the relay under test (hookrelay or the bare relay) over the
    /// window; none for raw runs.
    pub relay_cpu_us: Option<f64>,
    /// The bench process's own CPU µs per event (load generator or publisher).
    pub bench_cpu_us: Option<f64>,
    /// The broker's CPU µs per event.
    pub broker_cpu_us: Option<f64>,
    /// Relay peak RSS during this setting, bytes (hookrelay runs only).
    pub relay_peak_rss: Option<u64>,
    /// Successes over the whole run (the count the queue must hold).
    pub succeeded: u64,
    /// Failures over the whole run.
    pub failed: u64,
    /// Messages found in the queue afterwards.
    pub in_queue: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

impl Sample {
    /// Whether the queue holds fewer messages than were acknowledged to the sender.
    pub fn lost(&self) -> u64 {
        self.succeeded.saturating_sub(self.in_queue)
    }
}

/// Merges worker logs into latency percentiles and counts.
pub fn merge(logs: Vec<WorkerLog>, window: Duration) -> Sample {
    let mut lat: Vec<Duration> = Vec::new();
    let mut s = Sample::default();
    for log in logs {
        lat.extend(log.latencies);
        s.succeeded += log.succeeded;
        s.failed += log.failed;
        if s.first_error.is_none() {
            s.first_error = log.first_error;
        }
    }
    lat.sort_unstable();
    s.events_per_sec = lat.len() as f64 / window.as_secs_f64().max(1e-9);
    s.p50 = percentile(&lat, 0.50);
    s.p99 = percentile(&lat, 0.99);
    s.p999 = percentile(&lat, 0.999);
    s
}

/// The `q` quantile of sorted values (nearest rank); zero when empty.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Median of some numbers (mean of the middle two when even); `None` when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// CPU µs per event from two readings of CPU seconds.
pub fn us_per_event(before: Option<f64>, after: Option<f64>, events: f64) -> Option<f64> {
    let (b, a) = (before?, after?);
    (events > 0.0).then(|| (a - b) / events * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let v: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_micros(500));
        assert_eq!(percentile(&v, 0.99), Duration::from_micros(990));
        assert_eq!(percentile(&v, 0.999), Duration::from_micros(999));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
