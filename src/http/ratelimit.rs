//! Per-source rate limit: a token bucket kept as one atomic number (GCRA, the
//! "generic cell rate algorithm"), so checking it takes no lock.
//!
//! The bucket holds `burst` tokens and refills at `per_sec` tokens a second; each
//! request takes one. Instead of a token count the limiter stores the theoretical
//! arrival time (TAT) of the next request: a request at `now` is allowed when
//! `max(TAT, now) + interval - now <= burst * interval`, and moves TAT forward by
//! one interval. Pure: the caller passes the clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket of `burst` requests refilled at `per_sec` requests a second.
#[derive(Debug)]
pub struct RateLimiter {
    /// Nanoseconds between two tokens.
    interval_ns: u64,
    /// `burst * interval_ns`: how far TAT may run ahead of the clock.
    window_ns: u64,
    /// Theoretical arrival time, in nanoseconds since `epoch`.
    tat_ns: AtomicU64,
    /// Origin of the nanosecond clock.
    epoch: Instant,
}

impl RateLimiter {
    /// A full bucket at `now`. `per_sec` and `burst` are at least 1 (zero is treated as 1).
    pub fn new(per_sec: u32, burst: u32, now: Instant) -> Self {
        let interval_ns = 1_000_000_000 / u64::from(per_sec.max(1));
        RateLimiter {
            interval_ns,
            window_ns: interval_ns.saturating_mul(u64::from(burst.max(1))),
            tat_ns: AtomicU64::new(0),
            epoch: now,
        }
    }

    /// Takes a token at `now`, or says how long until one is available.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        let now_ns = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let mut tat = self.tat_ns.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now_ns).saturating_add(self.interval_ns);
            let ahead = next - now_ns;
            if ahead > self.window_ns {
                return Err(Duration::from_nanos(ahead - self.window_ns));
            }
            match self.tat_ns.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }
}

/// Whole seconds for a `Retry-After` header: the wait rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_full_bucket_allows_the_burst_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(10, 5, t0);
        for i in 0..5 {
            assert_eq!(limiter.check(t0), Ok(()), "request {i} of the burst");
        }
        let wait = limiter.check(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // One token comes back every 100 ms.
        assert!(limiter.check(t0 + Duration::from_millis(99)).is_err());
        assert_eq!(limiter.check(t0 + Duration::from_millis(100)), Ok(()));
        assert!(limiter.check(t0 + Duration::from_millis(100)).is_err());
        // After a long pause the bucket is full again, never fuller.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(limiter.check(later), Ok(()));
        }
        assert!(limiter.check(later).is_err());
    }

    #[test]
    fn refused_requests_take_no_token() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(1, 1, t0);
        assert_eq!(limiter.check(t0), Ok(()));
        for _ in 0..1000 {
            assert!(limiter.check(t0 + Duration::from_millis(500)).is_err());
        }
        assert_eq!(limiter.check(t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn concurrent_checks_never_exceed_the_burst() {
        let t0 = Instant::now();
        let limiter = Arc::new(RateLimiter::new(1, 100, t0));
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let limiter = limiter.clone();
                    s.spawn(move || (0..1000).filter(|_| limiter.check(t0).is_ok()).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allowed, 100);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }
}
