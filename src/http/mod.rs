//! The listeners: an accept loop shared by the ingest and admin ports, the webhook
//! handler (`ingest`) and the operator endpoints (`admin`).
//!
//! Free of broker types: the ingest handler sees only the [`crate::publish::Publisher`] trait.

pub mod admin;
pub mod ingest;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// The response type of every handler.
pub type HttpResponse = Response<Full<Bytes>>;

/// Connection-level limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Connections served at once; more wait in the kernel backlog.
    pub max_connections: usize,
    /// Time a client has to send the request head (HTTP/1).
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(opts.header_read_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(256);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
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
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = watched.await {
                debug!(%peer, %error, "Connection ended with an error.");
            }
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
