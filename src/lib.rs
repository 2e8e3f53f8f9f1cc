//! hookrelay: verified webhooks in, CloudEvents on RabbitMQ out, a 2xx only once an
//! event is durable.
//!
//! This file is the composition root: the only place that names concrete types and
//! wires them together. Everything else depends on traits and plain data.

pub mod allowlist;
pub mod config;
pub mod envelope;
pub mod http;
pub mod metrics;
pub mod publish;
pub mod replay;
pub mod spool;
pub mod telemetry;
pub mod verify;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use crate::config::Config;
use crate::http::admin::{Admin, Readiness};
use crate::http::ingest::{Ingest, IngestSettings};
use crate::http::{ServeOptions, serve};
use crate::metrics::Metrics;
use crate::publish::amqp::AmqpPublisher;
use crate::publish::durable::DurablePublisher;
use crate::publish::topology::{Topology, topology};
use crate::publish::{Broker, Publisher};
use crate::spool::{Spool, SpoolOptions};

/// The publisher the relay answers from: RabbitMQ first, the spool second.
type RelayPublisher = DurablePublisher<AmqpPublisher>;

impl<B: Broker> Readiness for DurablePublisher<B> {
    fn ready(&self) -> bool {
        Publisher::is_ready(self)
    }
}

/// Admin connections served at once (operators and scrapers, not senders).
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// Time an admin request gets to finish at shutdown.
const ADMIN_GRACE: Duration = Duration::from_millis(500);

/// Runs the relay on already-bound listeners until `shutdown` resolves: the whole
/// life in two steps, [`Relay::build`] then [`Relay::serve`].
pub async fn run(
    config: Config,
    ingest_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    Relay::build(config).await?.serve(ingest_listener, admin_listener, shutdown).await
}

/// The stages of shutdown, one child token each of one root, cancelled in this order
/// by [`Relay::serve`]. Dropping the relay cancels the root, which stops them all.
struct Stages {
    /// Cancelled when shutdown is asked: `/readyz` turns 503, ingest stops accepting.
    ingest: CancellationToken,
    /// Cancelled once in-flight requests are done: drainer, retry routers, depth poll.
    background: CancellationToken,
    /// Cancelled once nothing publishes any more: the supervisor closes the connection.
    broker: CancellationToken,
    /// Cancelled last, so metrics and health stay readable during the whole drain.
    admin: CancellationToken,
    /// Cancels the root (all stages) if the relay is dropped without serving.
    _root: DropGuard,
}

impl Stages {
    fn new() -> Self {
        let root = CancellationToken::new();
        Stages {
            ingest: root.child_token(),
            background: root.child_token(),
            broker: root.child_token(),
            admin: root.child_token(),
            _root: root.drop_guard(),
        }
    }
}

/// A relay whose fallible start-up is done: configuration checked, metrics
/// registered, spool opened and locked, broker supervisor started. Only serving
/// remains.
pub struct Relay {
    config: Config,
    metrics: Metrics,
    /// The broker side, for the background tasks that publish or consume on it.
    broker: AmqpPublisher,
    /// What requests publish through.
    publisher: Arc<RelayPublisher>,
    /// The broker supervisor; it ends after closing the connection.
    supervisor: JoinHandle<()>,
    /// Holds the spool directory's lock for the relay's life.
    _spool_lock: Option<std::fs::File>,
    stages: Stages,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("sources", &self.config.sources.len()).finish()
    }
}

impl Relay {
    /// Does every fallible start-up step, in order: metrics registry, spool (opened
    /// and locked), then the broker supervisor, which cannot fail (it retries) and so
    /// comes last: nothing is left running when an earlier step fails.
    pub async fn build(config: Config) -> anyhow::Result<Relay> {
        for warning in &config.warnings {
            warn!(warning = %warning, "Configuration warning.");
        }
        let metrics =
            Metrics::new(config.sources.iter().map(|s| (s.name.as_str(), s.verifier.shape().known_events)))
                .context("metrics registry")?;
        let (spool, spool_lock) = match open_spool(&config, &metrics).await? {
            Some((spool, lock)) => (Some(spool), Some(lock)),
            None => (None, None),
        };
        let stages = Stages::new();
        let (broker, supervisor) = AmqpPublisher::start(
            config.amqp.clone(),
            topology_for(&config),
            metrics.clone(),
            stages.broker.clone(),
        );
        let spool_max_bytes = config.spool.as_ref().map_or(0, |s| s.max_bytes);
        let publisher =
            Arc::new(DurablePublisher::new(broker.clone(), spool, spool_max_bytes, metrics.clone()));
        Ok(Relay { config, metrics, broker, publisher, supervisor, _spool_lock: spool_lock, stages })
    }

    /// Serves webhooks on `ingest_listener` and health and metrics on
    /// `admin_listener` until `shutdown` resolves, then drains in order (see each
    /// step's comment).
    pub async fn serve(
        self,
        ingest_listener: TcpListener,
        admin_listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let Relay { config, metrics, broker, publisher, supervisor, _spool_lock, stages } = self;
        let ingest_addr = ingest_listener.local_addr().context("ingest address")?;
        let admin_addr = admin_listener.local_addr().context("admin address")?;

        let mut background = JoinSet::new();
        spawn_background(&mut background, &config, &broker, &publisher, &metrics, &stages.background);

        let admin = Arc::new(Admin::new(metrics.clone(), publisher.clone(), stages.ingest.clone()));
        let admin_opts = ServeOptions {
            max_connections: ADMIN_MAX_CONNECTIONS,
            header_read_timeout: config.http.header_read_timeout,
            grace_period: ADMIN_GRACE,
        };
        let admin_task = tokio::spawn(serve(
            admin_listener,
            move |req| admin.clone().handle(req),
            admin_opts,
            stages.admin.clone().cancelled_owned(),
        ));

        let ingest = Arc::new(Ingest::new(IngestSettings {
            sources: config.sources.clone(),
            publisher: publisher.clone(),
            metrics: metrics.clone(),
            max_body_bytes: config.http.max_body_bytes,
            request_timeout: config.http.request_timeout,
            retry_after_secs: config.http.retry_after_secs,
        }));
        let ingest_opts = ServeOptions {
            max_connections: config.http.max_connections,
            header_read_timeout: config.http.header_read_timeout,
            grace_period: config.grace_period,
        };
        info!(ingest = %ingest_addr, admin = %admin_addr, sources = config.sources.len(), "hookrelay started.");
        let stop_ingest = stages.ingest.clone();
        serve(ingest_listener, move |req| ingest.clone().handle(req), ingest_opts, async move {
            tokio::select! {
                _ = shutdown => {}
                _ = stop_ingest.cancelled() => {}
            }
            // Not ready first, so a load balancer stops sending before we stop accepting.
            stop_ingest.cancel();
            info!("Shutting down: no longer ready, finishing in-flight requests.");
        })
        .await;

        // In-flight requests are done. The background tasks stop next, before the
        // connection they publish on closes: a drain round cut by a closed connection
        // would send its batch again after restart.
        stages.background.cancel();
        while background.join_next().await.is_some() {}
        // Nothing writes to the spool any more: flush and close it.
        publisher.close().await;
        // Nothing publishes any more: close the broker connection cleanly.
        stages.broker.cancel();
        if let Err(error) = supervisor.await {
            warn!(%error, "Broker supervisor ended abnormally.");
        }
        // Last, so health and metrics stay readable during the whole drain.
        stages.admin.cancel();
        let _ = admin_task.await;
        info!("hookrelay stopped.");
        Ok(())
    }
}

/// The tasks that run beside the requests: the spool drainer, one retry router per
/// source, and the queue depth poll; all end when `stop` is cancelled.
fn spawn_background(
    tasks: &mut JoinSet<()>,
    config: &Config,
    broker: &AmqpPublisher,
    publisher: &RelayPublisher,
    metrics: &Metrics,
    stop: &CancellationToken,
) {
    if let Some(drainer) = publisher.drainer(stop.clone()) {
        tasks.spawn(drainer);
    }
    let amqp = &config.amqp;
    if !amqp.declare_topology {
        return;
    }
    if !amqp.retry_delays.is_empty() {
        for source in &config.sources {
            tasks.spawn(publish::retry::run(
                broker.clone(),
                source.name.clone(),
                amqp.retry_delays.clone(),
                amqp.delivery_limit,
                stop.clone(),
            ));
        }
    }
    tasks.spawn(publish::depths::run(
        broker.clone(),
        amqp.unrouted_exchange.clone(),
        amqp.dead_letter_exchange.clone(),
        config.sources.iter().map(|s| s.name.clone()).collect(),
        metrics.clone(),
        stop.clone(),
    ));
}

/// Opens the spool directory, taking an exclusive lock on it so that two relays
/// never share one spool. The returned file holds the lock while it lives.
pub async fn open_spool(
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<Option<(Spool, std::fs::File)>> {
    let Some(sc) = &config.spool else { return Ok(None) };
    std::fs::create_dir_all(&sc.dir)
        .with_context(|| format!("cannot create spool.dir {}", sc.dir.display()))?;
    let lock_path = sc.dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!("spool.dir {} is in use by another hookrelay process", sc.dir.display())
    })?;
    let opts = SpoolOptions { max_bytes: sc.max_bytes, ..SpoolOptions::default() };
    let (spool, report) = Spool::open(&sc.dir, opts)
        .await
        .with_context(|| format!("cannot open the spool in {}", sc.dir.display()))?;
    if report.corrupt_records_skipped > 0 {
        warn!(
            skipped = report.corrupt_records_skipped,
            truncated_bytes = report.truncated_bytes,
            "Skipped torn or corrupt spool records."
        );
        metrics.spool_corrupt(report.corrupt_records_skipped);
    }
    info!(dir = %sc.dir.display(), events = report.records, bytes = report.bytes, "Spool opened.");
    Ok(Some((spool, lock)))
}

/// The broker topology this configuration declares.
pub fn topology_for(config: &Config) -> Topology {
    topology(&config.amqp, config.sources.iter().map(|s| s.name.as_str()))
}

/// Binds both listeners named in `config`.
pub async fn bind(config: &Config) -> anyhow::Result<(TcpListener, TcpListener)> {
    let ingest = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot bind http.listen {}", config.http.listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot bind admin.listen {}", config.admin_listen))?;
    Ok((ingest, admin))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
