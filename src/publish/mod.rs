//! Getting an envelope durable: the [`Publisher`] trait the HTTP layer sees, the
//! [`Broker`] trait the durable publisher sees, and their implementations. `amqp`
//! talks to RabbitMQ; `durable` adds the spool; `topology` describes what `amqp`
//! declares; `retry` and `depths` are the broker-side background tasks.
//!
//! The HTTP layer knows only [`Publisher`] and its result types; no broker client
//! type crosses this boundary.

pub mod amqp;
pub mod depths;
pub mod drain;
pub mod durable;
pub mod quarantine;
pub mod retry;
pub mod topology;

#[cfg(test)]
pub(crate) mod fake;

use std::future::Future;

use tokio::time::Instant;

use crate::envelope::Envelope;

/// How an event became durable. Every variant means the sender may get 2xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The broker confirmed it on the main exchange.
    Confirmed,
    /// The broker refused it on the main exchange but confirmed a copy on the
    /// dead-letter exchange.
    DeadLettered,
    /// The broker could not confirm in time; it is fsync'd in the local spool.
    Spooled,
}

/// Why an event is not durable. Every variant answers 503 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The broker nacked the message.
    #[error("broker refused the event")]
    Nacked,
    /// The broker returned the message as unroutable.
    #[error("event was unroutable")]
    Unroutable,
    /// No confirm arrived within the publish deadline.
    #[error("broker did not confirm in time")]
    Timeout,
    /// There is no broker connection.
    #[error("broker unavailable")]
    Unavailable,
    /// The channel failed under the publish.
    #[error("broker channel failed")]
    ChannelError,
    /// The spool is full or could not be written.
    #[error("spool unavailable")]
    SpoolUnavailable,
}

impl PublishError {
    /// Every variant, so the metric series can be registered up front.
    pub const ALL: [PublishError; 6] = [
        PublishError::Nacked,
        PublishError::Unroutable,
        PublishError::Timeout,
        PublishError::Unavailable,
        PublishError::ChannelError,
        PublishError::SpoolUnavailable,
    ];

    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            PublishError::Nacked => "nack",
            PublishError::Unroutable => "unroutable",
            PublishError::Timeout => "timeout",
            PublishError::Unavailable => "unavailable",
            PublishError::ChannelError => "channel_error",
            PublishError::SpoolUnavailable => "spool_unavailable",
        }
    }
}

/// What an event is published as: the envelope plus the bounded labels that its
/// metrics use.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Configured source name (a bounded label).
    pub source: &'a str,
    /// Known trigger or `other` (a bounded label).
    pub event_label: &'static str,
    /// The envelope to publish.
    pub envelope: &'a Envelope,
}

/// Makes envelopes durable. Implementations answer only once the event is durable,
/// or with the reason it is not.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes one event; resolves when it is durable or has failed.
    fn publish(&self, event: Outgoing<'_>) -> impl Future<Output = Result<Delivered, PublishError>> + Send;

    /// Whether a publish can currently succeed (drives `/readyz`).
    fn is_ready(&self) -> bool;
}

/// What the durable publisher needs of a broker: publish with the full policy,
/// publish a batch in order, and say whether publishing can work now. The AMQP
/// publisher implements it; unit tests script a fake.
pub trait Broker: Clone + Send + Sync + 'static {
    /// Publishes one event with retries and dead-lettering, within the broker's
    /// own publish deadline.
    fn publish(&self, event: Outgoing<'_>) -> impl Future<Output = Result<Delivered, PublishError>> + Send;

    /// The same, until `deadline`.
    fn publish_until(
        &self,
        event: Outgoing<'_>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Delivered, PublishError>> + Send;

    /// Publishes `batch` to the main exchange in order and returns how many from its
    /// start were confirmed (the rest are to be tried again).
    fn publish_in_order(&self, batch: &[&Envelope], deadline: Instant) -> impl Future<Output = usize> + Send;

    /// Whether there is a connection to publish on.
    fn is_ready(&self) -> bool;

    /// Whether the broker blocks publishing (memory or disk alarm).
    fn is_blocked(&self) -> bool;

    /// Waits until [`Self::is_ready`] or `deadline`; true when ready.
    fn wait_ready(&self, deadline: Instant) -> impl Future<Output = bool> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::PUBLISH_FAILURE_REASONS;

    #[test]
    fn every_failure_label_is_registered_up_front() {
        let labels: Vec<&str> = PublishError::ALL.iter().map(|e| e.label()).collect();
        assert_eq!(labels, PUBLISH_FAILURE_REASONS);
    }
}
