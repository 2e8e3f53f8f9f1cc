//! The time frame of one measurement: a warm-up that is not counted, then the measured
//! window. Workers stop starting work at the window's end and finish what they started.

use std::time::Duration;

use tokio::time::Instant;

/// When a measurement begins, starts counting, and ends.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Counting starts here (after the warm-up).
    pub start: Instant,
    /// No new work starts at or after this instant.
    pub end: Instant,
}

impl Window {
    /// A window that starts counting after `warmup` from now and lasts `duration`.
    pub fn after(warmup: Duration, duration: Duration) -> Window {
        let start = Instant::now() + warmup;
        Window { start, end: start + duration }
    }

    /// Whether a completion at `t` counts.
    pub fn counts(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }

    /// The measured length.
    pub fn length(&self) -> Duration {
        self.end - self.start
    }
}
