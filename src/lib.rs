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
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::http::admin::{Admin, Readiness};
use crate::http::ingest::Ingest;
use crate::http::{ServeOptions, serve};
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::publish::amqp::AmqpPublisher;
use crate::publish::durable::DurablePublisher;
use crate::publish::topology::{Topology, topology};
use crate::spool::{Spool, SpoolOptions};

impl Readiness for DurablePublisher {
    fn ready(&self) -> bool {
        Publisher::is_ready(self)
    }
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

/// Runs the relay on already-bound listeners until `shutdown` resolves, then drains
/// in order: not ready → stop accepting → in-flight requests finish (and get their
/// confirms) → broker connection closed → admin listener closed.
pub async fn run(
    config: Config,
    ingest_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    for warning in &config.warnings {
        warn!(warning = %warning, "Configuration warning.");
    }
    let metrics = Metrics::new(config.sources.iter().map(|s| s.name.as_str())).context("metrics registry")?;
    let (stop_broker, broker_stop_rx) = watch::channel(false);
    // Drainer and retry routers stop before the connection they publish on closes.
    let (stop_background, background_stop_rx) = watch::channel(false);
    let (publisher, supervisor) =
        AmqpPublisher::start(config.amqp.clone(), topology_for(&config), metrics.clone(), broker_stop_rx);
    let spool = open_spool(&config, &metrics).await?;
    let spool_max_bytes = config.spool.as_ref().map_or(0, |s| s.max_bytes);
    let (spool, _spool_lock) = match spool {
        Some((spool, lock)) => (Some(spool), Some(lock)),
        None => (None, None),
    };
    let mut routers = Vec::new();
    if config.amqp.declare_topology && !config.amqp.retry_delays.is_empty() {
        for source in &config.sources {
            routers.push(tokio::spawn(publish::retry::run(
                publisher.clone(),
                source.name.clone(),
                config.amqp.retry_delays.clone(),
                config.amqp.delivery_limit,
                background_stop_rx.clone(),
            )));
        }
    }
    if config.amqp.declare_topology {
        routers.push(tokio::spawn(publish::depths::run(
            publisher.clone(),
            config.amqp.unrouted_exchange.clone(),
            config.amqp.dead_letter_exchange.clone(),
            config.sources.iter().map(|s| s.name.clone()).collect(),
            metrics.clone(),
            background_stop_rx.clone(),
        )));
    }
    let publisher = Arc::new(DurablePublisher::new(publisher, spool, spool_max_bytes, metrics.clone()));
    let drainer = publisher.start_drainer(background_stop_rx.clone());
    let draining = Arc::new(AtomicBool::new(false));

    let admin = Arc::new(Admin::new(metrics.clone(), publisher.clone(), draining.clone()));
    let admin_opts = ServeOptions {
        max_connections: 64,
        header_read_timeout: config.http.header_read_timeout,
        grace_period: std::time::Duration::from_millis(500),
    };
    let (stop_admin, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin_task =
        tokio::spawn(serve(admin_listener, move |req| admin.clone().handle(req), admin_opts, async move {
            let _ = admin_stop_rx.await;
        }));

    let ingest = Arc::new(Ingest::new(
        config.sources.iter().cloned(),
        publisher.clone(),
        metrics.clone(),
        config.http.max_body_bytes,
        config.http.request_timeout,
        config.http.retry_after_secs,
    ));
    let ingest_opts = ServeOptions {
        max_connections: config.http.max_connections,
        header_read_timeout: config.http.header_read_timeout,
        grace_period: config.grace_period,
    };
    info!(
        ingest = %ingest_listener.local_addr().context("ingest address")?,
        admin = %admin_listener_addr(&config),
        sources = config.sources.len(),
        "hookrelay started."
    );
    let draining_flag = draining.clone();
    serve(ingest_listener, move |req| ingest.clone().handle(req), ingest_opts, async move {
        shutdown.await;
        draining_flag.store(true, Ordering::Relaxed);
        info!("Shutting down: no longer ready, finishing in-flight requests.");
    })
    .await;

    // In-flight requests are done: stop the background publishers, flush the spool,
    // then close the broker connection.
    let _ = stop_background.send(true);
    if let Some(drainer) = drainer {
        let _ = drainer.await;
    }
    for router in routers {
        let _ = router.await;
    }
    publisher.close().await;
    let _ = stop_broker.send(true);
    if let Err(error) = supervisor.await {
        warn!(%error, "Broker supervisor ended abnormally.");
    }
    let _ = stop_admin.send(());
    let _ = admin_task.await;
    info!("hookrelay stopped.");
    Ok(())
}

fn admin_listener_addr(config: &Config) -> String {
    config.admin_listen.to_string()
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
