//! The listeners: an accept loop shared by the ingest and admin ports, the webhook
//! handler (`ingest`) and the operator endpoints (`admin`).
//!
//! Free of broker types: the ingest handler sees only the [`crate::publish::Publisher`] trait.
//!
//! Both listeners speak HTTP/1.1 (and 1.0) only. HTTP/2 is not served: webhook
//! providers and the proxies in front of the relay send HTTP/1.1, and HTTP/2 would
//! bypass the protections below (hyper's header-read timeout is HTTP/1 only, and
//! hyper-util's version sniffing waits for the first bytes without any deadline).
//! A client that opens with the HTTP/2 preface has its connection closed.
//!
//! What bounds a connection:
//! - the request head must arrive within `header_read_timeout` (hyper starts that
//!   clock when it begins waiting for a head: on a new connection and again after
//!   every answer on a kept-alive one, so it is also the idle timeout), and may be
//!   at most [`MAX_HEAD_BYTES`] (else 431);
//! - the body must arrive within the handler's request timeout (408) and limit (413);
//! - at most `max_connections` connections are served at once; when all are taken,
//!   connections that are not inside a request (idle keep-alive, slow heads, silent
//!   openers) or are still waiting for a request body are closed after
//!   [`pool::IDLE_BEFORE_EVICTION`] (a new connection: [`pool::FRESH_GRACE`]),
//!   longest-idle first, to make room, so idle and slow clients cannot keep honest
//!   senders waiting in the backlog.

pub mod admin;
pub mod ingest;
pub mod pool;
pub mod ratelimit;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, TryAcquireError};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::pool::{ConnectionSlot, IDLE_BEFORE_EVICTION, Pool};

/// The response type of every handler.
pub type HttpResponse = Response<Full<Bytes>>;

/// Largest request head (request line and headers) accepted; larger ones get 431.
/// hyper also refuses more than 100 header fields (431).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How often the accept loop looks for idle connections to close while every
/// connection slot is taken.
const EVICTION_TICK: Duration = Duration::from_millis(50);

/// At most one warning per this period while connections are being evicted.
const EVICTION_WARN_EVERY: Duration = Duration::from_secs(10);

/// The address of the client that opened the connection, put into every request's
/// extensions by [`serve`]. It is the TCP peer, never a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Connection-level limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Connections served at once; idle ones are closed to make room for new ones.
    pub max_connections: usize,
    /// Time a client has to send a request head (HTTP/1), on a new connection and
    /// between requests on a kept-alive one.
    pub header_read_timeout: Duration,
    /// Time in-flight requests get to finish after shutdown is asked.
    pub grace_period: Duration,
}

/// Serves `handler` on `listener` until `shutdown` resolves, then stops accepting and
/// lets in-flight requests finish within the grace period.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    handler: H,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .keep_alive(true)
        .max_header_size(MAX_HEAD_BYTES)
        // The read buffer: bounds a connection's memory while a head or body arrives.
        .max_buf_size(2 * MAX_HEAD_BYTES);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let pool = Arc::new(Pool::default());
    let mut evictions = EvictionLog::default();
    let mut shutdown = std::pin::pin!(shutdown);
    'accept: loop {
        let permit = loop {
            match permits.clone().try_acquire_owned() {
                Ok(p) => break p,
                Err(TryAcquireError::Closed) => break 'accept,
                Err(TryAcquireError::NoPermits) => {}
            }
            // Every slot is taken: close connections that only hold one.
            evictions.record(pool.evict_idle(IDLE_BEFORE_EVICTION), opts.max_connections);
            tokio::select! {
                _ = &mut shutdown => break 'accept,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => break p,
                    Err(_) => break 'accept,
                },
                _ = tokio::time::sleep(EVICTION_TICK) => {}
            }
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    warn!(%error, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (slot, registration) = pool.register();
        let handler = handler.clone();
        let service_slot = slot.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let handler = handler.clone();
            let busy = service_slot.enter();
            req.extensions_mut().insert(PeerAddr(peer));
            req.extensions_mut().insert(ConnectionSlot(service_slot.clone()));
            async move {
                let _busy = busy;
                Ok::<_, Infallible>(handler(req).await)
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            slot.started();
            let mut watched = std::pin::pin!(watched);
            loop {
                tokio::select! {
                    // The connection first: a head already in the socket is read (and
                    // withdraws the choice) before the choice is acted on.
                    biased;
                    result = &mut watched => {
                        if let Err(error) = result {
                            debug!(%peer, %error, "Connection ended with an error.");
                        }
                        break;
                    }
                    // Unless a request head arrived meanwhile (the choice is withdrawn).
                    () = slot.evicted() => if slot.is_evicted() {
                        debug!(%peer, "Closed an idle connection to make room.");
                        break;
                    },
                }
            }
            drop(registration);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(opts.grace_period, graceful.shutdown()).await.is_err() {
        warn!(
            grace_ms = opts.grace_period.as_millis() as u64,
            "Grace period over; closing remaining connections."
        );
    } else {
        info!("All connections finished.");
    }
}

/// Warns about evictions at most once per [`EVICTION_WARN_EVERY`], with a count.
#[derive(Default)]
struct EvictionLog {
    last_warned: Option<Instant>,
    unreported: usize,
}

impl EvictionLog {
    fn record(&mut self, evicted: usize, max_connections: usize) {
        self.unreported += evicted;
        if self.unreported == 0 {
            return;
        }
        let now = Instant::now();
        if self.last_warned.is_none_or(|t| now.duration_since(t) >= EVICTION_WARN_EVERY) {
            warn!(
                max_connections,
                closed = self.unreported,
                "Every connection slot is taken; closed idle connections to make room."
            );
            self.last_warned = Some(now);
            self.unreported = 0;
        }
    }
}
