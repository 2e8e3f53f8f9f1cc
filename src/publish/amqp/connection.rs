//! Connection supervision: one task connects with capped, jittered exponential
//! backoff, declares the topology, opens the channel pool, publishes the live
//! [`Link`] for requests to use, and watches the connection (errors,
//! `connection.blocked`) until it dies, then starts over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, Event};
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Inner;
use super::declare::declare;
use super::policy::{Attempt, Backoff};
use super::pool::ChannelPool;

/// Longest the connect handshake may take before it counts as a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Frame size asked of the broker unless the URL says otherwise (bytes).
const DEFAULT_FRAME_MAX: u32 = 16 * 1024;
/// How often the supervisor checks the connection besides its events.
const LIVENESS_TICK: Duration = Duration::from_millis(250);

/// A connection with its confirm-mode channels.
pub struct Link {
    conn: Connection,
    pool: ChannelPool,
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
}

/// What requests see of the supervisor's work: the live link, if any, and whether
/// the broker blocked publishing on it.
pub(super) struct LinkState {
    link: watch::Sender<Option<Arc<Link>>>,
    blocked: AtomicBool,
}

impl LinkState {
    pub(super) fn new() -> Self {
        LinkState { link: watch::channel(None).0, blocked: AtomicBool::new(false) }
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
}

/// The connection's event stream.
type Events = std::pin::Pin<Box<dyn futures_util::Stream<Item = Event> + Send>>;

/// Connects, declares the topology and opens the channel pool.
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
    let pool = ChannelPool::open(&conn, inner.cfg.channels).await.map_err(|e| e.to_string())?;
    Ok((Arc::new(Link { conn, pool }), events))
}

/// Keeps a connection up until `shutdown` is cancelled, then closes it.
pub(super) async fn supervise(inner: Arc<Inner>, shutdown: CancellationToken) {
    let state = &inner.state;
    let mut backoff = Backoff::new(inner.cfg.reconnect_initial, inner.cfg.reconnect_max);
    while !shutdown.is_cancelled() {
        let connected = tokio::select! {
            r = connect(&inner) => r,
            _ = shutdown.cancelled() => break,
        };
        match connected {
            Ok((link, events)) => {
                backoff.reset();
                state.link.send_replace(Some(link.clone()));
                inner.metrics.broker_connected(true);
                info!(exchange = %inner.cfg.exchange, channels = link.pool.size(), "Connected to the broker.");
                let stopping = watch_link(&inner, &link, events, &shutdown).await;
                state.link.send_replace(None);
                inner.metrics.broker_connected(false);
                state.set_blocked(&inner, false);
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
                let retry_in_ms = backoff.base().as_millis() as u64;
                warn!(%error, retry_in_ms, "Cannot connect to the broker.");
            }
        }
        tokio::select! {
            _ = sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    state.link.send_replace(None);
    inner.metrics.broker_connected(false);
}

/// Follows the connection until it dies (false) or shutdown is asked (true).
async fn watch_link(inner: &Inner, link: &Link, mut events: Events, shutdown: &CancellationToken) -> bool {
    let mut tick = tokio::time::interval(LIVENESS_TICK);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return true,
            _ = tick.tick() => {
                if !link.conn.status().connected() {
                    return false;
                }
            }
            event = events.next() => match event {
                None => return false,
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
                        return false;
                    }
                    debug!(%error, "Channel error; the channel is replaced on next use.");
                }
                Some(_) => {}
            }
        }
    }
}
