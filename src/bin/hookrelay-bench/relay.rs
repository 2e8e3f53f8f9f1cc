//! The relay under test: the release binary started as a child process with a
//! generated configuration (unique exchange, loopback ports, spool in a temp dir),
//! timed from spawn to `/readyz` 200, and stopped with SIGTERM.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use hookrelay::publish::topology::Topology;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use crate::messages::{SECRET, SOURCE};
use crate::procfs;

/// Longest the relay may take to answer `/readyz` 200.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Log line of the relay once its listeners are bound (the broker connect starts with it).
const STARTED: &str = "hookrelay started.";
/// Log line of the relay once the broker connection and channel pool are up.
const CONNECTED: &str = "Connected to the broker.";
/// Longest the relay may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How the bench configures the relay.
#[derive(Debug, Clone)]
pub struct RelaySetup {
    /// The `hookrelay` binary.
    pub bin: PathBuf,
    /// Broker URL.
    pub url: String,
    /// Main exchange (unique per bench run).
    pub exchange: String,
    /// `amqp.channels`.
    pub channels: usize,
    /// Rotation secrets configured besides [`SECRET`] (each costs one more HMAC per request).
    pub extra_secrets: usize,
    /// Enable the spool (in `dir`).
    pub spool: bool,
    /// Scratch directory for the configuration, the spool and the log.
    pub dir: PathBuf,
}

impl RelaySetup {
    /// The configuration file text for the given ports.
    pub fn toml(&self, ingest: u16, admin: u16) -> String {
        let mut secrets = format!("\"{SECRET}\"");
        for i in 0..self.extra_secrets {
            let _ = write!(secrets, ", \"hookrelay-bench-rotation-secret-{i}\"");
        }
        let spool = if self.spool {
            format!("enabled = true\ndir = \"{}\"", self.dir.join("spool").display())
        } else {
            "enabled = false".to_owned()
        };
        format!(
            r#"[http]
listen = "127.0.0.1:{ingest}"
[admin]
listen = "127.0.0.1:{admin}"
[amqp]
url = "{url}"
exchange = "{exchange}"
channels = {channels}
[spool]
{spool}
[log]
format = "json"
level = "info"
[sources.{SOURCE}]
kind = "patreon"
secrets = [{secrets}]
"#,
            url = self.url,
            exchange = self.exchange,
            channels = self.channels,
        )
    }

    /// The topology this relay declares, computed by the relay's own code.
    pub fn topology(&self) -> anyhow::Result<Topology> {
        let config = hookrelay::config::load(Some(&self.toml(1, 2)), &HashMap::new())
            .context("the bench's relay configuration does not load")?
            .validate()
            .context("the bench's relay configuration is invalid")?;
        Ok(hookrelay::topology_for(&config))
    }
}

/// Start-up figures of one relay start.
#[derive(Debug, Clone, Copy, Default)]
pub struct Startup {
    /// Spawn to the first `/readyz` 200 (polled every millisecond).
    pub to_ready: Duration,
    /// Spawn to the `hookrelay started.` log line (listeners bound; the broker connect
    /// begins at the same moment).
    pub to_started: Option<Duration>,
    /// Spawn to the `Connected to the broker.` log line (channel pool open: events
    /// go to the broker from here on).
    pub to_connected: Option<Duration>,
    /// `hookrelay started.` to `Connected to the broker.`: start-up after the broker
    /// connection begins (TCP connect, AMQP handshake, topology, confirm channels).
    pub connecting: Option<Duration>,
    /// RSS 200 ms after it became ready, bytes.
    pub idle_rss: Option<u64>,
    /// The anonymous (heap, stacks) part of `idle_rss`; the rest is mapped binary and libraries.
    pub idle_anon_rss: Option<u64>,
    /// Peak RSS by then, bytes.
    pub startup_peak_rss: Option<u64>,
}

/// A child process that is killed when dropped, if it still runs.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A running relay child process. Dropping it kills the process if it still runs.
pub struct RelayProcess {
    child: KillOnDrop,
    /// Process id.
    pub pid: u32,
    /// Ingest listener.
    pub ingest: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Its log (JSON lines on stderr).
    pub log_path: PathBuf,
}

/// A free loopback port (bound and released; the relay binds it right after).
fn free_port() -> anyhow::Result<u16> {
    let l = StdListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Starts the relay and waits for `/readyz` 200.
pub async fn start(setup: &RelaySetup, round: usize) -> anyhow::Result<(RelayProcess, Startup)> {
    let (ingest_port, admin_port) = (free_port()?, free_port()?);
    let config_path = setup.dir.join(format!("relay-{round}.toml"));
    std::fs::write(&config_path, setup.toml(ingest_port, admin_port))
        .with_context(|| format!("writing {}", config_path.display()))?;
    let log_path = setup.dir.join(format!("relay-{round}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

    let mut cmd = Command::new(&setup.bin);
    cmd.arg("--config").arg(&config_path).arg("run").stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("HOOKRELAY_") || k == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    let spawned_wall = SystemTime::now();
    let spawned = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {}", setup.bin.display()))?;
    let mut relay = RelayProcess {
        pid: child.id(),
        child: KillOnDrop(child),
        ingest: SocketAddr::from(([127, 0, 0, 1], ingest_port)),
        admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        log_path,
    };
    // Ready means both: `/readyz` answers 200 (with the spool on it may before the
    // broker is up) and the log says the broker connection is complete.
    let mut to_ready = None;
    let mut connected = None;
    while to_ready.is_none() || connected.is_none() {
        if let Some(status) = relay.child.0.try_wait().context("checking the relay process")? {
            bail!("the relay exited during start-up ({status}); its log:\n{}", tail(&relay.log_path));
        }
        if to_ready.is_none() && http_status(relay.admin, "/readyz").await == Some(200) {
            to_ready = Some(spawned.elapsed());
        }
        if connected.is_none() {
            connected = log_time(&relay.log_path, CONNECTED);
        }
        if spawned.elapsed() > READY_TIMEOUT {
            bail!(
                "the relay was not ready and connected within {READY_TIMEOUT:?}; its log:\n{}",
                tail(&relay.log_path)
            );
        }
        sleep(Duration::from_millis(1)).await;
    }
    let to_ready = to_ready.unwrap_or_default();
    let started = log_time(&relay.log_path, STARTED);
    let since_spawn = |t: Option<SystemTime>| t.and_then(|t| t.duration_since(spawned_wall).ok());
    let to_started = since_spawn(started);
    let to_connected = since_spawn(connected);
    let connecting = match (started, connected) {
        (Some(s), Some(c)) => c.duration_since(s).ok(),
        _ => None,
    };
    sleep(Duration::from_millis(200)).await;
    let startup = Startup {
        to_ready,
        to_started,
        to_connected,
        connecting,
        idle_rss: procfs::rss(relay.pid),
        idle_anon_rss: procfs::anon_rss(relay.pid),
        startup_peak_rss: procfs::peak_rss(relay.pid),
    };
    Ok((relay, startup))
}

impl RelayProcess {
    /// Sends SIGTERM and waits for a clean exit; returns how long the drain took.
    pub async fn stop(mut self) -> anyhow::Result<Duration> {
        let began = Instant::now();
        let signalled = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !signalled.success() {
            bail!("kill -TERM {} failed", self.pid);
        }
        while began.elapsed() < STOP_TIMEOUT {
            if let Some(status) = self.child.0.try_wait().context("waiting for the relay")? {
                if !status.success() {
                    bail!("the relay exited with {status}; its log:\n{}", tail(&self.log_path));
                }
                return Ok(began.elapsed());
            }
            sleep(Duration::from_millis(10)).await;
        }
        bail!("the relay did not stop within {STOP_TIMEOUT:?} of SIGTERM (killed)")
    }
}

/// The status code of `GET path`, or `None` when nothing answers within 250 ms.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 12 {
            let n = s.read(&mut buf[got..]).await.ok()?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let head = std::str::from_utf8(&buf[..got]).ok()?;
        head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    };
    timeout(Duration::from_millis(250), attempt).await.ok().flatten()
}

/// The time of the first JSON log line whose message is `message`.
fn log_time(path: &Path, message: &str) -> Option<SystemTime> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let found =
            v["message"].as_str() == Some(message) || v["fields"]["message"].as_str() == Some(message);
        if !found {
            return None;
        }
        humantime::parse_rfc3339_weak(v["timestamp"].as_str()?).ok()
    })
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
