//! The bare relay: the least an HTTP → RabbitMQ relay can do with confirms, as the
//! yardstick for hookrelay's own cost. hyper's HTTP/1.1 server, one confirm-mode
//! channel, each request's body published as it is (persistent, mandatory, no other
//! property) and answered 200 once the broker confirms it. No verification, no
//! envelope, no metrics, no logs.
//!
//! It runs as a child process (this binary with `--serve-bare`), so /proc gives its
//! CPU time apart from the load generator's, as it does for the relay.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::broker;
use crate::relay::KillOnDrop;

/// Routing key of every bare publish (matches the `patreon` source queue's `patreon.#` binding).
const ROUTING_KEY: &str = "patreon.bare";
/// Longest the bare relay may take to say where it listens.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves until SIGTERM (the child-process side). Prints `listening ADDR` once bound.
pub async fn serve(url: &str, exchange: &str) -> anyhow::Result<()> {
    let conn = broker::connect(url, "hookrelay-bench-bare").await?;
    let ch = conn.create_channel().await.context("opening the bare relay's channel")?;
    ch.confirm_select(ConfirmSelectOptions::default()).await.context("confirm.select")?;
    let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the bare relay")?;
    println!("listening {}", listener.local_addr()?);
    let shared: Arc<(Channel, String)> = Arc::new((ch, exchange.to_owned()));
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted.context("accepting")?,
            _ = term.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, shared.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
    let _ = conn.close(200, "bare relay done".into()).await;
    Ok(())
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<(Channel, String)>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (ch, exchange) = &*shared;
    let answer = |status: StatusCode| {
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = status;
        Ok(resp)
    };
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return answer(StatusCode::BAD_REQUEST);
    };
    let options = BasicPublishOptions { mandatory: true, immediate: false };
    let props = BasicProperties::default().with_delivery_mode(2);
    let confirmed = async {
        ch.basic_publish(exchange.as_str().into(), ROUTING_KEY.into(), options, &body, props).await?.await
    };
    match confirmed.await {
        Ok(Confirmation::Ack(None)) => answer(StatusCode::OK),
        _ => answer(StatusCode::SERVICE_UNAVAILABLE),
    }
}

/// A running bare relay child. Dropping it kills the process if it still runs.
pub struct BareProcess {
    child: KillOnDrop,
    /// Process id.
    pub pid: u32,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Starts `bench_bin --serve-bare` publishing to `exchange` and waits until it listens.
pub async fn start(bench_bin: &Path, url: &str, exchange: &str) -> anyhow::Result<BareProcess> {
    let mut child = Command::new(bench_bin)
        .args(["--serve-bare", "--amqp-url", url, "--bare-exchange", exchange])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting the bare relay ({})", bench_bin.display()))?;
    let stdout = child.stdout.take().context("the bare relay's stdout")?;
    let pid = child.id();
    let mut bare = BareProcess { child: KillOnDrop(child), pid, addr: SocketAddr::from(([127, 0, 0, 1], 0)) };
    let line = tokio::time::timeout(
        START_TIMEOUT,
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        }),
    )
    .await
    .context("the bare relay did not start in time")?
    .context("reading the bare relay's address")??;
    let Some(addr) = line.trim().strip_prefix("listening ").and_then(|a| a.parse().ok()) else {
        bail!("the bare relay did not start (it said {:?})", line.trim());
    };
    bare.addr = addr;
    Ok(bare)
}

impl BareProcess {
    /// SIGTERM, then a kill if it has not exited within 5 s.
    pub async fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if !matches!(self.child.0.try_wait(), Ok(None)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Drop kills it.
    }
}
