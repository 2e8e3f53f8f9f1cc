//! Retry and dead-letter policy, pure: what a failed publish attempt leads to, how
//! long to pause before the next attempt, and the reconnect backoff.

use std::time::Duration;

use crate::publish::PublishError;

/// One failed attempt, before the policy decides what to do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The broker nacked the publish.
    Nacked,
    /// The broker returned the publish as unroutable.
    Unroutable,
    /// No confirm within the deadline.
    Timeout,
    /// No connection.
    Unavailable,
    /// The channel failed under the publish.
    ChannelError,
}

impl Attempt {
    /// The error a caller sees when this attempt is the last one.
    pub fn error(self) -> PublishError {
        match self {
            Attempt::Nacked => PublishError::Nacked,
            Attempt::Unroutable => PublishError::Unroutable,
            Attempt::Timeout => PublishError::Timeout,
            Attempt::Unavailable => PublishError::Unavailable,
            Attempt::ChannelError => PublishError::ChannelError,
        }
    }
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try again (after [`retry_pause`]) while the deadline allows.
    Retry,
    /// Send it to the dead-letter exchange, saying why.
    DeadLetter(&'static str),
    /// Stop: the deadline is spent.
    GiveUp,
}

/// The policy: an unroutable event is dead-lettered at once; a nacked one after
/// `max_attempts` nacks (`nacks` counts this one); a timeout spends the deadline;
/// a lost connection or channel is retried on a fresh one.
pub fn after_failure(failed: Attempt, nacks: u32, max_attempts: u32) -> Next {
    match failed {
        Attempt::Unroutable => Next::DeadLetter("unroutable"),
        Attempt::Nacked if nacks >= max_attempts => Next::DeadLetter("nacked"),
        Attempt::Nacked => Next::Retry,
        Attempt::Timeout => Next::GiveUp,
        Attempt::Unavailable | Attempt::ChannelError => Next::Retry,
    }
}

/// A short pause before attempt `attempts + 1`, so a dying connection is noticed
/// before the next try: 10 ms doubling to 320 ms.
pub fn retry_pause(attempts: u32) -> Duration {
    Duration::from_millis(5u64 << attempts.clamp(1, 6))
}

/// The pause after a nack, so that an event's `max_attempts` nacks span `patience`
/// (a third of its publish deadline; the rest is left for the dead-letter publish):
/// a quorum queue whose leader died nacks for the second or so its election takes,
/// and the event should outlive that on the main exchange, while a queue that stays
/// full still sees it dead-lettered in time.
pub fn nack_pause(patience: Duration, max_attempts: u32) -> Duration {
    patience / max_attempts.saturating_sub(1).max(1)
}

/// Capped exponential reconnect backoff with "equal jitter": each delay is drawn
/// from `[base/2, base]`, so reconnecting relays spread out yet never retry at once.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    base: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles per failure up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, base: initial }
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.base = self.initial;
    }

    /// The current base delay (before jitter), for logs.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The next delay to wait, and doubles the base for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = equal_jitter(self.base);
        self.base = (self.base * 2).min(self.max);
        delay
    }
}

/// A delay drawn from `[base/2, base]`.
fn equal_jitter(base: Duration) -> Duration {
    let ms = base.as_millis() as u64;
    Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unroutable_is_dead_lettered_at_once() {
        assert_eq!(after_failure(Attempt::Unroutable, 0, 3), Next::DeadLetter("unroutable"));
    }

    #[test]
    fn nacks_are_retried_then_dead_lettered() {
        assert_eq!(after_failure(Attempt::Nacked, 1, 3), Next::Retry);
        assert_eq!(after_failure(Attempt::Nacked, 2, 3), Next::Retry);
        assert_eq!(after_failure(Attempt::Nacked, 3, 3), Next::DeadLetter("nacked"));
        assert_eq!(after_failure(Attempt::Nacked, 1, 1), Next::DeadLetter("nacked"));
    }

    #[test]
    fn a_timeout_ends_the_publish_and_lost_channels_are_retried() {
        assert_eq!(after_failure(Attempt::Timeout, 0, 3), Next::GiveUp);
        assert_eq!(after_failure(Attempt::Unavailable, 0, 3), Next::Retry);
        assert_eq!(after_failure(Attempt::ChannelError, 0, 3), Next::Retry);
    }

    #[test]
    fn every_attempt_names_its_error() {
        assert_eq!(Attempt::Nacked.error(), PublishError::Nacked);
        assert_eq!(Attempt::Unroutable.error(), PublishError::Unroutable);
        assert_eq!(Attempt::Timeout.error(), PublishError::Timeout);
        assert_eq!(Attempt::Unavailable.error(), PublishError::Unavailable);
        assert_eq!(Attempt::ChannelError.error(), PublishError::ChannelError);
    }

    #[test]
    fn retry_pauses_grow_and_stay_short() {
        assert_eq!(retry_pause(1), Duration::from_millis(10));
        assert_eq!(retry_pause(2), Duration::from_millis(20));
        assert_eq!(retry_pause(6), Duration::from_millis(320));
        assert_eq!(retry_pause(60), Duration::from_millis(320));
    }

    #[test]
    fn nacks_are_spread_over_the_patience() {
        let patience = Duration::from_millis(2500);
        assert_eq!(nack_pause(patience, 3), Duration::from_millis(1250));
        assert_eq!(nack_pause(patience, 2), patience);
        assert_eq!(nack_pause(patience, 1), patience);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_within_its_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        for base in [100, 200, 350, 350] {
            assert_eq!(b.base(), Duration::from_millis(base));
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(base / 2) && d <= Duration::from_millis(base), "{d:?}");
        }
        b.reset();
        assert_eq!(b.base(), Duration::from_millis(100));
    }
}
