//! RabbitMQ publishing with publisher confirms over a small pool of channels.
//!
//! A supervisor task owns the connection: it connects with capped, jittered
//! exponential backoff, declares the topology, opens the confirm-mode channels, and
//! watches the connection (errors, `connection.blocked`) until it dies, then starts
//! over. Requests share the channels round-robin and pipeline their publishes; each
//! awaits only its own confirm, bounded by the publish deadline. A channel found
//! closed is replaced on the spot, so a publish that failed on a dead channel is
//! retried on a fresh one while the deadline allows.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event, ExchangeKind};
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout_at};
use tracing::{debug, info, warn};

use super::topology::{Arg, Topology};
use super::{Delivered, Outgoing, PublishError, Publisher};
use crate::config::AmqpConfig;
use crate::envelope::{CONTENT_TYPE, Envelope, SPEC_VERSION};
use crate::metrics::Metrics;

/// `app_id` written on every message.
pub const APP_ID: &str = "hookrelay";
/// Header naming why the relay dead-lettered a message.
pub const REASON_HEADER: &str = "x-hookrelay-reason";
/// Header counting the publish attempts before dead-lettering.
pub const ATTEMPTS_HEADER: &str = "x-hookrelay-attempts";
/// Header keeping the original routing key of a dead-lettered message.
pub const ROUTING_KEY_HEADER: &str = "x-hookrelay-routing-key";

/// Longest the connect handshake may take before it counts as a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Frame size asked of the broker unless the URL says otherwise (bytes).
const DEFAULT_FRAME_MAX: u32 = 16 * 1024;
/// How often the supervisor checks the connection besides its events.
const LIVENESS_TICK: Duration = Duration::from_millis(250);

/// A connection with its confirm-mode channels.
pub struct Link {
    conn: Connection,
    slots: Vec<Slot>,
}

impl Link {
    /// The underlying connection, for components that consume (replay, retry router).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// One pooled channel and the lock that serialises its replacement.
struct Slot {
    channel: Mutex<Channel>,
    repair: tokio::sync::Mutex<()>,
}

impl Slot {
    fn get(&self) -> Channel {
        match self.channel.lock() {
            Ok(ch) => ch.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, ch: Channel) {
        match self.channel.lock() {
            Ok(mut slot) => *slot = ch,
            Err(poisoned) => *poisoned.into_inner() = ch,
        }
    }
}

struct Inner {
    cfg: AmqpConfig,
    topology: Topology,
    metrics: Metrics,
    link: watch::Sender<Option<Arc<Link>>>,
    next: AtomicUsize,
    blocked: AtomicBool,
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
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// One message to publish: where it goes and what it carries.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// Exchange to publish to.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body bytes.
    pub body: &'a [u8],
    /// `message_id`, used to match a returned message to its publish.
    pub message_id: &'a str,
}

/// One failed attempt, before the retry policy decides what to do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Nacked,
    Unroutable,
    Timeout,
    Unavailable,
    ChannelError,
}

impl Attempt {
    fn error(self) -> PublishError {
        match self {
            Attempt::Nacked => PublishError::Nacked,
            Attempt::Unroutable => PublishError::Unroutable,
            Attempt::Timeout => PublishError::Timeout,
            Attempt::Unavailable => PublishError::Unavailable,
            Attempt::ChannelError => PublishError::ChannelError,
        }
    }
}

impl AmqpPublisher {
    /// Starts the connection supervisor. Publishing works as soon as the first
    /// connection is up; until then publishes wait (within their deadline).
    /// The supervisor stops and closes the connection when `shutdown` turns true.
    pub fn start(
        cfg: AmqpConfig,
        topology: Topology,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (link, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            cfg,
            topology,
            metrics,
            link,
            next: AtomicUsize::new(0),
            blocked: AtomicBool::new(false),
        });
        let task = tokio::spawn(supervise(inner.clone(), shutdown));
        (AmqpPublisher { inner }, task)
    }

    /// Waits until the broker connection is up, or `deadline`. True when up.
    pub async fn wait_ready(&self, deadline: Instant) -> bool {
        self.current_link(deadline).await.is_ok()
    }

    /// The live connection, if any.
    pub fn link(&self) -> Option<Arc<Link>> {
        self.inner.link.borrow().clone()
    }

    /// Whether the broker has blocked the connection.
    pub fn is_blocked(&self) -> bool {
        self.inner.blocked.load(Ordering::Relaxed)
    }

    async fn current_link(&self, deadline: Instant) -> Result<Arc<Link>, Attempt> {
        if let Some(link) = self.inner.link.borrow().clone() {
            return Ok(link);
        }
        let mut rx = self.inner.link.subscribe();
        loop {
            if let Some(link) = rx.borrow_and_update().clone() {
                return Ok(link);
            }
            match timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(Attempt::Unavailable),
            }
        }
    }

    /// A connected confirm-mode channel from the pool, replacing a dead one.
    async fn channel(&self, deadline: Instant) -> Result<Channel, Attempt> {
        let link = self.current_link(deadline).await?;
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % link.slots.len();
        let slot = &link.slots[i];
        let ch = slot.get();
        if ch.status().connected() {
            return Ok(ch);
        }
        let _guard = timeout_at(deadline, slot.repair.lock()).await.map_err(|_| Attempt::Timeout)?;
        let ch = slot.get();
        if ch.status().connected() {
            return Ok(ch);
        }
        if !link.conn.status().connected() {
            return Err(Attempt::Unavailable);
        }
        let fresh = timeout_at(deadline, open_confirm_channel(&link.conn))
            .await
            .map_err(|_| Attempt::Timeout)?
            .map_err(|error| {
                debug!(%error, "Cannot open a replacement channel.");
                Attempt::ChannelError
            })?;
        debug!(slot = i, "Replaced a closed channel.");
        slot.set(fresh.clone());
        Ok(fresh)
    }

    /// One publish and its confirm, bounded by `deadline`.
    async fn attempt(
        &self,
        source: &str,
        msg: Message<'_>,
        properties: BasicProperties,
        deadline: Instant,
    ) -> Result<(), Attempt> {
        let ch = self.channel(deadline).await?;
        let started = Instant::now();
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let confirm = match timeout_at(
            deadline,
            ch.basic_publish(msg.exchange.into(), msg.routing_key.into(), options, msg.body, properties),
        )
        .await
        {
            Err(_) => return Err(Attempt::Timeout),
            Ok(Err(error)) => {
                debug!(%error, "Publish failed on its channel.");
                return Err(Attempt::ChannelError);
            }
            Ok(Ok(confirm)) => confirm,
        };
        let confirmation = match timeout_at(deadline, confirm).await {
            Err(_) => return Err(Attempt::Timeout),
            Ok(Err(error)) => {
                debug!(%error, "Confirm failed on its channel.");
                return Err(Attempt::ChannelError);
            }
            Ok(Ok(c)) => c,
        };
        self.inner.metrics.confirm_latency(source, started.elapsed());
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                let theirs = returned.delivery.properties.message_id().as_ref().map(ShortString::as_str);
                if theirs == Some(msg.message_id) {
                    self.inner.metrics.unrouted(source);
                    Err(Attempt::Unroutable)
                } else {
                    // The client can attach a return to the wrong confirm when several are
                    // in flight; the alternate exchange makes returns an alarm only.
                    self.inner.metrics.unrouted(source);
                    warn!(
                        returned_id = theirs.unwrap_or(""),
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
        let mut headers = envelope_headers(env);
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(attempts.min(i32::MAX as u32) as i32));
        headers.insert(ROUTING_KEY_HEADER.into(), AMQPValue::LongString(env.routing_key.as_str().into()));
        let props = base_properties(env).with_headers(headers);
        let msg =
            Message { exchange: dlx, routing_key: &env.routing_key, body: &env.body, message_id: &env.id };
        self.attempt(event.source, msg, props, deadline).await?;
        self.inner.metrics.dead_lettered(event.source, reason);
        warn!(event_id = %env.id, reason, "Event dead-lettered.");
        Ok(Delivered::DeadLettered)
    }

    /// Publishes an already-built message body with its own properties to an
    /// exchange (replay and the spool drainer use this).
    pub async fn publish_raw(
        &self,
        source: &str,
        msg: Message<'_>,
        properties: BasicProperties,
        deadline: Instant,
    ) -> Result<(), PublishError> {
        self.attempt(source, msg, properties, deadline).await.map_err(Attempt::error)
    }

    /// The configured main exchange.
    pub fn exchange(&self) -> &str {
        &self.inner.cfg.exchange
    }

    /// Publishes envelopes in order on one channel, pipelined, and returns how many
    /// from the start of `batch` were confirmed (the rest are to be tried again).
    /// Used by the spool drainer, which must keep the spool's order.
    pub async fn publish_in_order(&self, batch: &[&Envelope], deadline: Instant) -> usize {
        let Ok(ch) = self.channel(deadline).await else {
            return 0;
        };
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let mut pending = Vec::with_capacity(batch.len());
        for env in batch {
            let publish = ch.basic_publish(
                self.inner.cfg.exchange.as_str().into(),
                env.routing_key.as_str().into(),
                options,
                &env.body,
                properties(env),
            );
            match timeout_at(deadline, publish).await {
                Ok(Ok(confirm)) => pending.push(confirm),
                _ => break,
            }
        }
        let mut confirmed = 0;
        for (env, confirm) in batch.iter().zip(pending) {
            match timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => confirmed += 1,
                Ok(Ok(Confirmation::Ack(Some(returned))))
                    if returned.delivery.properties.message_id().as_ref().map(ShortString::as_str)
                        != Some(env.id.as_str()) =>
                {
                    confirmed += 1
                }
                _ => break,
            }
        }
        confirmed
    }
}

impl Publisher for AmqpPublisher {
    async fn publish(&self, event: Outgoing<'_>) -> Result<Delivered, PublishError> {
        let deadline = Instant::now() + self.inner.cfg.publish_timeout;
        self.publish_until(event, deadline).await
    }

    fn is_ready(&self) -> bool {
        self.inner.link.borrow().is_some()
    }
}

impl AmqpPublisher {
    /// Publishes with retries until `deadline`: dead channels and lost connections
    /// are retried on fresh ones; nacks up to `max_publish_attempts` times, then the
    /// event is dead-lettered; an unroutable event is dead-lettered at once.
    pub async fn publish_until(
        &self,
        event: Outgoing<'_>,
        deadline: Instant,
    ) -> Result<Delivered, PublishError> {
        let env = event.envelope;
        // Built once; later attempts (rare) build their own instead of cloning.
        let mut first_props = Some(properties(env));
        let mut attempts: u32 = 0;
        let mut nacks: u32 = 0;
        loop {
            attempts += 1;
            let msg = Message {
                exchange: &self.inner.cfg.exchange,
                routing_key: &env.routing_key,
                body: &env.body,
                message_id: &env.id,
            };
            let props = first_props.take().unwrap_or_else(|| properties(env));
            let failed = match self.attempt(event.source, msg, props, deadline).await {
                Ok(()) => return Ok(Delivered::Confirmed),
                Err(failed) => failed,
            };
            let dead_letter_reason = match failed {
                Attempt::Unroutable => Some("unroutable"),
                Attempt::Nacked => {
                    nacks += 1;
                    (nacks >= self.inner.cfg.max_publish_attempts).then_some("nacked")
                }
                Attempt::Timeout => return Err(PublishError::Timeout),
                Attempt::Unavailable | Attempt::ChannelError => None,
            };
            if let Some(reason) = dead_letter_reason {
                return match self.dead_letter(&event, reason, attempts, deadline).await {
                    Ok(delivered) => Ok(delivered),
                    Err(_) => Err(failed.error()),
                };
            }
            if Instant::now() >= deadline {
                return Err(failed.error());
            }
            self.inner.metrics.publish_retried(event.source, failed.error().label());
            // A short pause so a dying connection is noticed before the next try.
            let pause = Duration::from_millis(5u64 << attempts.min(6));
            if timeout_at(deadline, sleep(pause)).await.is_err() {
                return Err(failed.error());
            }
        }
    }
}

/// Message properties without headers.
fn base_properties(env: &Envelope) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(env.id.as_str().into())
        .with_timestamp(env.unix_seconds)
        .with_type(env.ce_type.as_str().into())
        .with_app_id(APP_ID.into())
}

/// The CloudEvents AMQP binding's application properties, so consumers can filter
/// without parsing the body.
fn envelope_headers(env: &Envelope) -> FieldTable {
    let mut h = FieldTable::default();
    let mut put = |k: &str, v: &str| {
        h.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    };
    put("cloudEvents_specversion", SPEC_VERSION);
    put("cloudEvents_id", &env.id);
    put("cloudEvents_source", &env.source);
    put("cloudEvents_type", &env.ce_type);
    put("cloudEvents_time", &env.time);
    if let Some(subject) = &env.subject {
        put("cloudEvents_subject", subject);
    }
    h
}

/// Full message properties for an envelope.
pub fn properties(env: &Envelope) -> BasicProperties {
    base_properties(env).with_headers(envelope_headers(env))
}

async fn open_confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

fn field_table(args: &[(&'static str, Arg)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        let v = match v {
            Arg::Str(s) => AMQPValue::LongString(s.as_str().into()),
            Arg::Int(i) => AMQPValue::LongLongInt(*i),
        };
        t.insert((*k).into(), v);
    }
    t
}

/// Declares every exchange, queue and binding of `topology` on `ch`.
pub async fn declare(ch: &Channel, topology: &Topology) -> lapin::Result<()> {
    let durable_exchange = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    for e in &topology.exchanges {
        let kind = match e.kind {
            "fanout" => ExchangeKind::Fanout,
            "direct" => ExchangeKind::Direct,
            "headers" => ExchangeKind::Headers,
            _ => ExchangeKind::Topic,
        };
        ch.exchange_declare(e.name.as_str().into(), kind, durable_exchange, field_table(&e.arguments))
            .await?;
    }
    let durable_queue = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    for q in &topology.queues {
        ch.queue_declare(q.name.as_str().into(), durable_queue, field_table(&q.arguments)).await?;
    }
    for b in &topology.bindings {
        ch.queue_bind(
            b.queue.as_str().into(),
            b.exchange.as_str().into(),
            b.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// Connects, declares the topology and opens the channel pool.
/// The connection's event stream.
type Events = std::pin::Pin<Box<dyn futures_util::Stream<Item = Event> + Send>>;

async fn connect(inner: &Inner) -> Result<(Arc<Link>, Events), String> {
    let props = ConnectionProperties::default().with_connection_name("hookrelay".into());
    let mut uri: AMQPUri =
        inner.cfg.url.expose_secret().parse().map_err(|_| "invalid amqp.url".to_owned())?;
    // lapin sizes its buffers from frame_max (32 frames each way): RabbitMQ's 128 KiB
    // default costs 8 MiB per connection. Our messages fit 16 KiB frames; a URL's own
    // `?frame_max=` still wins.
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
    }
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let events: Events = Box::pin(conn.events_listener());
    if inner.cfg.declare_topology {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        declare(&ch, &inner.topology).await.map_err(|e| format!("declaring the topology failed: {e}"))?;
        let _ = ch.close(200, "topology declared".into()).await;
    }
    let mut slots = Vec::with_capacity(inner.cfg.channels);
    for _ in 0..inner.cfg.channels {
        let ch = open_confirm_channel(&conn).await.map_err(|e| e.to_string())?;
        slots.push(Slot { channel: Mutex::new(ch), repair: tokio::sync::Mutex::new(()) });
    }
    Ok((Arc::new(Link { conn, slots }), events))
}

/// Full jitter: a delay drawn from [base/2, base].
fn jittered(base: Duration) -> Duration {
    let ms = base.as_millis() as u64;
    Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2))
}

async fn supervise(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut delay = inner.cfg.reconnect_initial;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let connected = tokio::select! {
            r = connect(&inner) => r,
            _ = shutdown.changed() => break,
        };
        match connected {
            Ok((link, events)) => {
                delay = inner.cfg.reconnect_initial;
                inner.link.send_replace(Some(link.clone()));
                inner.metrics.broker_connected(true);
                info!(exchange = %inner.cfg.exchange, channels = link.slots.len(), "Connected to the broker.");
                let stopping = watch_link(&inner, &link, events, &mut shutdown).await;
                inner.link.send_replace(None);
                inner.metrics.broker_connected(false);
                inner.blocked.store(false, Ordering::Relaxed);
                inner.metrics.broker_blocked(false);
                if stopping {
                    if let Err(error) = link.conn.close(200, "hookrelay shutting down".into()).await {
                        debug!(%error, "Closing the broker connection failed.");
                    }
                    info!("Closed the broker connection.");
                    return;
                }
                warn!("Lost the broker connection; reconnecting.");
            }
            Err(error) => {
                warn!(%error, retry_in_ms = delay.as_millis() as u64, "Cannot connect to the broker.");
            }
        }
        tokio::select! {
            _ = sleep(jittered(delay)) => {}
            _ = shutdown.changed() => break,
        }
        delay = (delay * 2).min(inner.cfg.reconnect_max);
    }
    inner.link.send_replace(None);
    inner.metrics.broker_connected(false);
}

/// Follows the connection until it dies (false) or shutdown is asked (true).
async fn watch_link(
    inner: &Inner,
    link: &Link,
    mut events: Events,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut tick = tokio::time::interval(LIVENESS_TICK);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return true,
            _ = tick.tick() => {
                if !link.conn.status().connected() {
                    return false;
                }
            }
            event = events.next() => match event {
                None => return false,
                Some(Event::ConnectionBlocked(reason)) => {
                    inner.blocked.store(true, Ordering::Relaxed);
                    inner.metrics.broker_blocked(true);
                    warn!(%reason, "The broker blocked publishing (memory or disk alarm).");
                }
                Some(Event::ConnectionUnblocked) => {
                    inner.blocked.store(false, Ordering::Relaxed);
                    inner.metrics.broker_blocked(false);
                    info!("The broker unblocked publishing.");
                }
                Some(Event::Error(error)) => {
                    if !link.conn.status().connected() {
                        return false;
                    }
                    debug!(%error, "Channel error; the channel is replaced on next use.");
                }
                Some(_) => {}
            }
        }
    }
}
