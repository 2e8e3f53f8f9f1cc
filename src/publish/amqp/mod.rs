//! RabbitMQ publishing with publisher confirms: [`AmqpPublisher`] answers once the
//! broker confirmed an event (or dead-lettered it), or says why it could not.
//!
//! Each concern has its own file, the way vector's AMQP sink separates service,
//! encoding and request building:
//! - `connection`: the supervisor task that keeps one connection up;
//! - `nodes`: the cluster nodes it may connect to and the order it tries them in;
//! - `pool`: that connection's confirm-mode channels, shared round-robin;
//! - `message`: envelope → AMQP properties and headers (pure);
//! - `policy`: retry, dead-letter and reconnect decisions (pure);
//! - `declare`: the topology as AMQP declarations.
//!
//! Requests pipeline their publishes on the pooled channels and each awaits only its
//! own confirm, bounded by the publish deadline. A publish that failed on a dead
//! channel is retried on a fresh one while the deadline allows.

mod connection;
mod declare;
mod message;
mod nodes;
mod policy;
mod pool;

use std::future::Future;
use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::time::{Instant, sleep, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use self::connection::Link;
use self::connection::{LinkState, supervise};
pub use self::declare::declare;
pub use self::message::{
    APP_ID, ATTEMPTS_HEADER, Message, REASON_HEADER, ROUTING_KEY_HEADER, dead_letter_properties, properties,
};
use self::message::{is_return_of, returned_id};
use self::policy::{Attempt, Next, after_failure, nack_pause, retry_pause};
use super::topology::Topology;
use super::{Broker, Delivered, Outgoing, PublishError};
use crate::config::AmqpConfig;
use crate::envelope::Envelope;
use crate::metrics::Metrics;

/// What the publisher and its supervisor share.
struct Inner {
    cfg: AmqpConfig,
    topology: Topology,
    metrics: Metrics,
    state: LinkState,
}

/// Publishes envelopes to RabbitMQ and answers once they are confirmed.
#[derive(Clone)]
pub struct AmqpPublisher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("exchange", &self.inner.cfg.exchange)
            .field("ready", &Broker::is_ready(self))
            .finish()
    }
}

/// Mandatory publishes: an unroutable one comes back instead of vanishing.
const PUBLISH_OPTIONS: BasicPublishOptions = BasicPublishOptions { mandatory: true, immediate: false };

/// Why waiting on the broker stopped early.
enum Stop {
    /// The deadline passed.
    Deadline,
    /// The connection was condemned meanwhile.
    Condemned,
}

/// Awaits `fut` until `deadline`, or until `link` is condemned.
async fn on_link<F: Future>(link: &Link, deadline: Instant, fut: F) -> Result<F::Output, Stop> {
    tokio::select! {
        biased;
        out = timeout_at(deadline, fut) => out.map_err(|_| Stop::Deadline),
        _ = link.condemned() => Err(Stop::Condemned),
    }
}

/// Hands `msg` to the channel; resolves once it is written, to the broker's confirm.
fn send<'c>(
    ch: &'c Channel,
    msg: &Message<'c>,
    properties: BasicProperties,
) -> impl Future<Output = lapin::Result<PublisherConfirm>> + 'c {
    ch.basic_publish(msg.exchange.into(), msg.routing_key.into(), PUBLISH_OPTIONS, msg.body, properties)
}

/// A client error on a channel (`what`: `Publish`, `Confirm`) is a channel error.
fn channel_error(what: &str, error: &lapin::Error) -> Attempt {
    debug!(%error, "{what} failed on its channel.");
    Attempt::ChannelError
}

impl AmqpPublisher {
    /// Starts the connection supervisor. Publishing works as soon as the first
    /// connection is up; until then publishes wait (within their deadline).
    /// The supervisor closes the connection and ends when `shutdown` is cancelled.
    pub fn start(
        cfg: AmqpConfig,
        topology: Topology,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let inner = Arc::new(Inner { cfg, topology, metrics, state: LinkState::new() });
        let task = tokio::spawn(supervise(inner.clone(), shutdown));
        (AmqpPublisher { inner }, task)
    }

    /// The live connection, if any.
    pub fn link(&self) -> Option<Arc<Link>> {
        self.inner.state.current()
    }

    /// The configured main exchange.
    pub fn exchange(&self) -> &str {
        &self.inner.cfg.exchange
    }

    /// The live link and a connected confirm-mode channel of it, replacing a dead one.
    async fn channel(&self, deadline: Instant) -> Result<(Arc<Link>, Arc<Channel>), Attempt> {
        let link = self.inner.state.wait(deadline).await?;
        match on_link(&link, deadline, link.pool().channel(link.connection(), deadline)).await {
            Ok(Ok(ch)) => Ok((link, ch)),
            Ok(Err(Attempt::Timeout)) | Err(Stop::Deadline) => Err(self.timed_out(&link)),
            Ok(Err(other)) => Err(other),
            Err(Stop::Condemned) => Err(Attempt::Timeout),
        }
    }

    /// A wait on `link` ran out: if nothing at all was confirmed on it for a good
    /// part of the publish deadline, the connection is silent, not slow, and is
    /// condemned. Always an [`Attempt::Timeout`] for the caller.
    fn timed_out(&self, link: &Arc<Link>) -> Attempt {
        let quiet = self.inner.state.quiet_for(link);
        // A broker that blocked publishing (memory or disk alarm) said why it is
        // quiet; another connection would be blocked too.
        if quiet >= self.inner.cfg.publish_timeout / 2 && !self.inner.state.is_blocked() {
            debug!(quiet_ms = quiet.as_millis() as u64, "No confirm on the connection; condemning it.");
            self.inner.state.condemn(link);
        }
        Attempt::Timeout
    }

    /// The attempt a stopped wait on `link` amounts to.
    fn stopped(&self, link: &Arc<Link>, stop: Stop) -> Attempt {
        match stop {
            Stop::Deadline => self.timed_out(link),
            Stop::Condemned => Attempt::Timeout,
        }
    }

    /// One publish and its confirm, bounded by `deadline`. The channel, the publish
    /// and the confirm share one deadline timer and one watch on the link: this runs
    /// for every event, and each timer or watch is a registration and a lock.
    async fn attempt(
        &self,
        source: &str,
        msg: Message<'_>,
        properties: BasicProperties,
        deadline: Instant,
    ) -> Result<(), Attempt> {
        let link = self.inner.state.wait(deadline).await?;
        let exchange = on_link(&link, deadline, async {
            let ch = link.pool().channel(link.connection(), deadline).await?;
            let started = Instant::now();
            let confirm = send(&ch, &msg, properties).await.map_err(|e| channel_error("Publish", &e))?;
            let confirmation = confirm.await.map_err(|e| channel_error("Confirm", &e))?;
            Ok((ch, started, confirmation))
        });
        let (ch, started, confirmation) = match exchange.await {
            Ok(Ok(done)) => done,
            Ok(Err(Attempt::Timeout)) => return Err(self.timed_out(&link)),
            Ok(Err(other)) => return Err(other),
            Err(stop) => return Err(self.stopped(&link, stop)),
        };
        self.inner.state.confirmed(&link);
        self.inner.metrics.confirm_latency(source, started.elapsed());
        if let Confirmation::Nack(_) = confirmation {
            if link.pool().nacked(link.connection(), &ch, deadline).await {
                self.inner.metrics.channel_replaced();
            }
        } else {
            link.pool().acked(&ch);
        }
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                self.inner.metrics.unrouted(source);
                if is_return_of(&returned, msg.message_id) {
                    Err(Attempt::Unroutable)
                } else {
                    // The client can attach a return to the wrong confirm when several are
                    // in flight; the alternate exchange makes returns an alarm only.
                    warn!(
                        returned_id = returned_id(&returned).unwrap_or(""),
                        "The broker returned a message as unroutable; check the alternate exchange."
                    );
                    Ok(())
                }
            }
            Confirmation::Nack(_) => Err(Attempt::Nacked),
            Confirmation::NotRequested => Err(Attempt::ChannelError),
        }
    }

    /// Publishes to the dead-letter exchange with headers saying why.
    async fn dead_letter(
        &self,
        event: &Outgoing<'_>,
        reason: &'static str,
        attempts: u32,
        deadline: Instant,
    ) -> Result<Delivered, Attempt> {
        let Some(dlx) = self.inner.cfg.dead_letter_exchange.as_deref() else {
            return Err(Attempt::Unavailable);
        };
        let env = event.envelope;
        let props = dead_letter_properties(env, reason, attempts);
        self.attempt(event.source, Message::of(dlx, env), props, deadline).await?;
        self.inner.metrics.dead_lettered(event.source, reason);
        warn!(event_id = %env.id, reason, "Event dead-lettered.");
        Ok(Delivered::DeadLettered)
    }

    /// Publishes an already-built message body with its own properties to an
    /// exchange (the retry router uses this).
    pub async fn publish_raw(
        &self,
        source: &str,
        msg: Message<'_>,
        properties: BasicProperties,
        deadline: Instant,
    ) -> Result<(), PublishError> {
        self.attempt(source, msg, properties, deadline).await.map_err(Attempt::error)
    }
}

impl Broker for AmqpPublisher {
    async fn publish(&self, event: Outgoing<'_>) -> Result<Delivered, PublishError> {
        let deadline = Instant::now() + self.inner.cfg.publish_timeout;
        self.publish_until(event, deadline).await
    }

    /// Publishes with retries until `deadline`: dead channels and lost connections
    /// are retried on fresh ones; nacks up to `max_publish_attempts` times, spread over
    /// a third of the deadline (on a fresh channel once one nacks repeatedly: see `pool`),
    /// then the event is dead-lettered; an unroutable event is dead-lettered at once.
    async fn publish_until(&self, event: Outgoing<'_>, deadline: Instant) -> Result<Delivered, PublishError> {
        let env = event.envelope;
        // Built once; later attempts (rare) build their own instead of cloning.
        let mut first_props = Some(properties(env));
        let mut attempts: u32 = 0;
        let mut nacks: u32 = 0;
        let patience = deadline.saturating_duration_since(Instant::now()) / 3;
        loop {
            attempts += 1;
            let msg = Message::of(&self.inner.cfg.exchange, env);
            let props = first_props.take().unwrap_or_else(|| properties(env));
            let failed = match self.attempt(event.source, msg, props, deadline).await {
                Ok(()) => return Ok(Delivered::Confirmed),
                Err(failed) => failed,
            };
            if failed == Attempt::Nacked {
                nacks += 1;
            }
            match after_failure(failed, nacks, self.inner.cfg.max_publish_attempts) {
                Next::GiveUp => return Err(failed.error()),
                Next::DeadLetter(reason) => {
                    return self
                        .dead_letter(&event, reason, attempts, deadline)
                        .await
                        .map_err(|_| failed.error());
                }
                Next::Retry => {}
            }
            if Instant::now() >= deadline {
                return Err(failed.error());
            }
            self.inner.metrics.publish_retried(event.source, failed.error().label());
            let pause = match failed {
                Attempt::Nacked => nack_pause(patience, self.inner.cfg.max_publish_attempts),
                _ => retry_pause(attempts),
            };
            if timeout_at(deadline, sleep(pause)).await.is_err() {
                return Err(failed.error());
            }
        }
    }

    /// Publishes envelopes in order on one channel, pipelined, and returns how many
    /// from the start of `batch` were confirmed (the rest are to be tried again).
    async fn publish_in_order(&self, batch: &[&Envelope], deadline: Instant) -> usize {
        let Ok((link, ch)) = self.channel(deadline).await else {
            return 0;
        };
        let mut pending = Vec::with_capacity(batch.len());
        for env in batch {
            let publish = send(&ch, &Message::of(&self.inner.cfg.exchange, env), properties(env));
            match on_link(&link, deadline, publish).await {
                Ok(Ok(confirm)) => pending.push(confirm),
                Ok(Err(_)) => break,
                Err(stop) => {
                    self.stopped(&link, stop);
                    break;
                }
            }
        }
        let mut confirmed = 0;
        for (env, confirm) in batch.iter().zip(pending) {
            match on_link(&link, deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => confirmed += 1,
                Ok(Ok(Confirmation::Ack(Some(returned)))) if !is_return_of(&returned, &env.id) => {
                    confirmed += 1
                }
                Ok(_) => break,
                Err(stop) => {
                    self.stopped(&link, stop);
                    break;
                }
            }
            self.inner.state.confirmed(&link);
        }
        confirmed
    }

    fn is_ready(&self) -> bool {
        self.inner.state.current().is_some()
    }

    fn is_blocked(&self) -> bool {
        self.inner.state.is_blocked()
    }

    async fn wait_ready(&self, deadline: Instant) -> bool {
        self.inner.state.wait(deadline).await.is_ok()
    }
}
