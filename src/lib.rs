//! hookrelay: verified webhooks in, CloudEvents on RabbitMQ out, a 2xx only once an
//! event is durable.
//!
//! This file is the composition root: the only place that names concrete types and
//! wires them together. Everything else depends on traits and plain data.

pub mod config;
pub mod envelope;
pub mod http;
pub mod metrics;
pub mod publish;
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
use crate::publish::topology::{Topology, topology};

impl Readiness for AmqpPublisher {
    fn ready(&self) -> bool {
        Publisher::is_ready(self)
    }
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
    let (publisher, supervisor) =
        AmqpPublisher::start(config.amqp.clone(), topology_for(&config), metrics.clone(), broker_stop_rx);
    let publisher = Arc::new(publisher);
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
