//! Connection supervision: one task connects, trying the configured nodes in turn
//! (see `nodes`) with capped, jittered exponential backoff between full rounds,
//! declares the topology, opens the channel pool, publishes the live [`Link`] for
//! requests to use, and watches the connection until it dies, then replaces it.
//!
//! A connection dies three ways, each counted by cause: the broker or the network
//! closes it (`closed`); nothing, not even a heartbeat, arrives for about two
//! heartbeat intervals (`heartbeat`, noticed by lapin); or a publish finds no confirm
//! within its deadline while the connection looks open and nothing else was
//! confirmed on it meanwhile (`confirm_timeout`). The last is evidence of a silent
//! path (a lost NAT entry, a frozen broker, a half-open socket): the connection is
//! condemned at once, requests stop being handed to it, those waiting on it give up
//! (their events go to the spool), and it is closed in the background without
//! waiting on the dead socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, ErrorKind, Event};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Inner;
use super::declare::declare_on;
use super::nodes::Nodes;
use super::policy::{Attempt, Backoff};
use super::pool::ChannelPool;

/// Longest the connect handshake may take before it counts as a failure: a healthy
/// broker answers in milliseconds, and a handshake caught by a silent path must not
/// hold up the next attempt for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest declaring the topology and opening the channels may take (many quorum
/// queues in a cluster take a while; a silent path must not take forever).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a clean close may take: at shutdown, or of a condemned connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Frame size asked of the broker unless the URL says otherwise (bytes).
const DEFAULT_FRAME_MAX: u32 = 16 * 1024;
/// How often the supervisor checks the connection besides its events.
const LIVENESS_TICK: Duration = Duration::from_millis(250);

/// Why the relay gave up a connection (the `cause` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// Nothing arrived for about two heartbeat intervals.
    Heartbeat,
    /// A confirm did not come on a connection that looked open.
    ConfirmTimeout,
    /// The broker or the network closed it.
    Closed,
}

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Cause::Heartbeat => "heartbeat",
            Cause::ConfirmTimeout => "confirm_timeout",
            Cause::Closed => "closed",
        }
    }
}

/// A connection with its confirm-mode channels.
pub struct Link {
    conn: Connection,
    pool: ChannelPool,
    /// Cancelled when the relay condemns this connection.
    dead: CancellationToken,
    /// Cancelled when the relay stops using this connection, whatever the cause.
    retired: CancellationToken,
    /// When the broker last confirmed on this connection (ms on the state's clock);
    /// when it opened, until the first confirm.
    last_confirm_ms: AtomicU64,
}

impl Link {
    /// The underlying connection, for components that consume (replay, retry router).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The confirm-mode channels publishes use.
    pub(super) fn pool(&self) -> &ChannelPool {
        &self.pool
    }

    /// Resolves when the relay condemns this connection.
    pub(super) async fn condemned(&self) {
        self.dead.cancelled().await
    }

    /// Resolves when the relay stops using this connection (it died, was condemned,
    /// or the relay shuts down): consumers on it should start over on the next one,
    /// since a silent connection never tells them.
    pub async fn retired(&self) {
        self.retired.cancelled().await
    }
}

/// What requests see of the supervisor's work: the live link, if any, whether the
/// broker blocked publishing on it, and when it last confirmed anything.
pub(super) struct LinkState {
    link: watch::Sender<Option<Arc<Link>>>,
    blocked: AtomicBool,
    /// Origin of the millisecond clock below.
    epoch: Instant,
    /// When the broker last confirmed anything (ms on this clock).
    last_confirm_ms: AtomicU64,
}

impl LinkState {
    pub(super) fn new() -> Self {
        LinkState {
            link: watch::channel(None).0,
            blocked: AtomicBool::new(false),
            epoch: Instant::now(),
            last_confirm_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The live link, if any.
    pub(super) fn current(&self) -> Option<Arc<Link>> {
        self.link.borrow().clone()
    }

    /// The live link, waiting for one until `deadline`.
    pub(super) async fn wait(&self, deadline: Instant) -> Result<Arc<Link>, Attempt> {
        if let Some(link) = self.current() {
            return Ok(link);
        }
        let mut rx = self.link.subscribe();
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

    /// Whether the broker has blocked the connection.
    pub(super) fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    fn set_blocked(&self, inner: &Inner, blocked: bool) {
        self.blocked.store(blocked, Ordering::Relaxed);
        inner.metrics.broker_blocked(blocked);
    }

    /// The broker confirmed a publish on `link`.
    pub(super) fn confirmed(&self, link: &Link) {
        let now = self.now_ms();
        link.last_confirm_ms.store(now, Ordering::Relaxed);
        self.last_confirm_ms.store(now, Ordering::Relaxed);
    }

    /// Time since the broker last confirmed anything.
    fn since_last_confirm(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.last_confirm_ms.load(Ordering::Relaxed)))
    }

    /// Time `link` has gone without a confirm (since it opened, if it never had one).
    pub(super) fn quiet_for(&self, link: &Link) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(link.last_confirm_ms.load(Ordering::Relaxed)))
    }

    /// Declares `link` dead: it is no longer handed out (new requests see no
    /// connection and go to the spool at once), requests waiting on it give up,
    /// and the supervisor replaces it.
    pub(super) fn condemn(&self, link: &Arc<Link>) {
        link.dead.cancel();
        self.link.send_if_modified(|current| {
            let is_it = current.as_ref().is_some_and(|c| Arc::ptr_eq(c, link));
            if is_it {
                *current = None;
            }
            is_it
        });
    }
}

/// The connection's event stream.
type Events = std::pin::Pin<Box<dyn futures_util::Stream<Item = Event> + Send>>;

/// One round over the nodes: the first that accepts (its index) with its link.
async fn connect_any(inner: &Inner, nodes: &mut Nodes) -> Result<(Arc<Link>, Events, usize), String> {
    let mut last = "no amqp.url".to_owned();
    for i in nodes.round() {
        match connect(inner, nodes.url(i)).await {
            Ok((link, events)) => {
                nodes.connected(i);
                return Ok((link, events, i));
            }
            Err(error) => {
                if nodes.len() > 1 {
                    warn!(node = nodes.label(i), %error, "Cannot connect to this broker node; trying the next.");
                }
                last = error;
            }
        }
    }
    Err(last)
}

/// Connects to one node, declares the topology and opens the channel pool.
async fn connect(inner: &Inner, url: &SecretString) -> Result<(Arc<Link>, Events), String> {
    let props = ConnectionProperties::default().with_connection_name("hookrelay".into());
    let mut uri: AMQPUri = url.expose_secret().parse().map_err(|_| "invalid amqp.url".to_owned())?;
    // lapin sizes its buffers from frame_max (32 frames each way): RabbitMQ's 128 KiB
    // default costs 8 MiB per connection. Our messages fit 16 KiB frames; a URL's own
    // `?frame_max=` still wins.
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
    }
    // The lower of ours and the broker's is used (RabbitMQ proposes 60 s).
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(inner.cfg.heartbeat_secs);
    }
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let events: Events = Box::pin(conn.events_listener());
    let setup = async {
        if inner.cfg.declare_topology {
            declare_on(&conn, &inner.topology)
                .await
                .map_err(|e| format!("declaring the topology failed: {e}"))?;
        }
        ChannelPool::open(&conn, inner.cfg.channels).await.map_err(|e| e.to_string())
    };
    let pool = match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(pool) => pool?,
        Err(_) => {
            // Do not leave a half-set-up connection behind on a path that went silent.
            tokio::spawn(async move {
                drop(timeout(CLOSE_TIMEOUT, conn.close(200, "setup timed out".into())).await)
            });
            return Err("declaring the topology or opening the channels timed out".to_owned());
        }
    };
    let link = Link {
        conn,
        pool,
        dead: CancellationToken::new(),
        retired: CancellationToken::new(),
        last_confirm_ms: AtomicU64::new(inner.state.now_ms()),
    };
    Ok((Arc::new(link), events))
}

/// How watching a connection ended.
enum End {
    /// Shutdown was asked.
    Shutdown,
    /// The connection is dead.
    Lost(Cause),
}

/// Keeps a connection up until `shutdown` is cancelled, then closes it.
pub(super) async fn supervise(inner: Arc<Inner>, shutdown: CancellationToken) {
    let state = &inner.state;
    let mut backoff = Backoff::new(inner.cfg.reconnect_initial, inner.cfg.reconnect_max);
    // A random first node, so that replicas given the same list spread over the cluster.
    let mut nodes = Nodes::new(inner.cfg.urls.clone(), fastrand::usize(..));
    while !shutdown.is_cancelled() {
        let connected = tokio::select! {
            r = connect_any(&inner, &mut nodes) => r,
            _ = shutdown.cancelled() => break,
        };
        match connected {
            Ok((link, events, node)) => {
                backoff.reset();
                state.link.send_replace(Some(link.clone()));
                inner.metrics.broker_connected(true);
                info!(
                    node = nodes.label(node),
                    exchange = %inner.cfg.exchange,
                    channels = link.pool.size(),
                    heartbeat_secs = link.conn.configuration().heartbeat(),
                    "Connected to the broker."
                );
                let end = watch_link(&inner, &link, events, &shutdown).await;
                state.link.send_replace(None);
                link.retired.cancel();
                inner.metrics.broker_connected(false);
                state.set_blocked(&inner, false);
                match end {
                    End::Shutdown => {
                        close(&link, "hookrelay shutting down").await;
                        info!("Closed the broker connection.");
                        return;
                    }
                    End::Lost(cause) => {
                        inner.metrics.connection_replaced(cause.label());
                        warn!(
                            cause = cause.label(),
                            quiet_ms = state.quiet_for(&link).as_millis() as u64,
                            "Broker connection declared dead; replacing it."
                        );
                        if cause == Cause::ConfirmTimeout {
                            // The socket may never answer: close it on the side.
                            tokio::spawn(async move { close(&link, "no confirms; replacing").await });
                        }
                    }
                }
            }
            Err(error) => {
                let retry_in_ms = backoff.base().as_millis() as u64;
                warn!(%error, nodes = nodes.len(), retry_in_ms, "Cannot connect to the broker.");
            }
        }
        inner.metrics.last_confirm_age(state.since_last_confirm());
        tokio::select! {
            _ = sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    state.link.send_replace(None);
    inner.metrics.broker_connected(false);
}

/// A clean close, bounded: a dead socket never answers.
async fn close(link: &Link, why: &str) {
    match timeout(CLOSE_TIMEOUT, link.conn.close(200, why.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(%error, "Closing the broker connection failed."),
        Err(_) => debug!("The broker did not answer the close in time."),
    }
}

/// Follows the connection until it dies or shutdown is asked.
async fn watch_link(inner: &Inner, link: &Link, mut events: Events, shutdown: &CancellationToken) -> End {
    let mut tick = tokio::time::interval(LIVENESS_TICK);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return End::Shutdown,
            _ = link.condemned() => return End::Lost(Cause::ConfirmTimeout),
            _ = tick.tick() => {
                inner.metrics.last_confirm_age(inner.state.since_last_confirm());
                if !link.conn.status().connected() {
                    return End::Lost(cause_in(&mut events));
                }
            }
            event = events.next() => match event {
                None => return End::Lost(Cause::Closed),
                Some(Event::ConnectionBlocked(reason)) => {
                    inner.state.set_blocked(inner, true);
                    warn!(%reason, "The broker blocked publishing (memory or disk alarm).");
                }
                Some(Event::ConnectionUnblocked) => {
                    inner.state.set_blocked(inner, false);
                    info!("The broker unblocked publishing.");
                }
                Some(Event::Error(error)) => {
                    if !link.conn.status().connected() {
                        return End::Lost(cause_of(&error));
                    }
                    debug!(%error, "Channel error; the channel is replaced on next use.");
                }
                Some(_) => {}
            }
        }
    }
}

/// The cause among the events already queued when the connection was found closed.
fn cause_in(events: &mut Events) -> Cause {
    while let Some(Some(event)) = events.next().now_or_never() {
        if let Event::Error(error) = event {
            return cause_of(&error);
        }
    }
    Cause::Closed
}

fn cause_of(error: &lapin::Error) -> Cause {
    match error.kind() {
        ErrorKind::MissingHeartbeatError => Cause::Heartbeat,
        _ => Cause::Closed,
    }
}
