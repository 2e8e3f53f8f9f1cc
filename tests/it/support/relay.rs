//! One builder for the configuration of a test relay ([`RelayConfig`]), and the
//! relay itself running in this process ([`Relay`]), wired exactly as the binary
//! wires it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;

/// A value as TOML writes it.
pub trait TomlValue {
    /// The TOML text of the value.
    fn toml(&self) -> String;
}

macro_rules! toml_as_display {
    ($($t:ty),*) => {$(
        impl TomlValue for $t {
            fn toml(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
toml_as_display!(i32, u16, u32, u64, usize, i64, bool);

impl TomlValue for str {
    fn toml(&self) -> String {
        // A JSON string is a valid TOML basic string.
        serde_json::to_string(self).unwrap()
    }
}

impl TomlValue for String {
    fn toml(&self) -> String {
        self.as_str().toml()
    }
}

impl TomlValue for Path {
    fn toml(&self) -> String {
        self.display().to_string().toml()
    }
}

impl TomlValue for PathBuf {
    fn toml(&self) -> String {
        self.as_path().toml()
    }
}

impl TomlValue for SocketAddr {
    fn toml(&self) -> String {
        self.to_string().toml()
    }
}

impl<T: TomlValue + ?Sized> TomlValue for &T {
    fn toml(&self) -> String {
        (**self).toml()
    }
}

impl<T: TomlValue> TomlValue for [T] {
    fn toml(&self) -> String {
        format!("[{}]", self.iter().map(TomlValue::toml).collect::<Vec<_>>().join(", "))
    }
}

impl<T: TomlValue, const N: usize> TomlValue for [T; N] {
    fn toml(&self) -> String {
        self[..].toml()
    }
}

impl<T: TomlValue> TomlValue for Vec<T> {
    fn toml(&self) -> String {
        self[..].toml()
    }
}

/// The configuration of a test relay: a unique exchange on the test broker, fast
/// reconnects, no spool, and source `patreon` with the three fixture secrets. Each
/// setter puts one key into one table, replacing the default; a key the relay does
/// not know fails at start-up (`deny_unknown_fields`) instead of being dropped.
///
/// ```text
/// let relay = RelayConfig::new().http("max_body_bytes", 4096).source("rate_limit_per_sec", 1).start().await;
/// ```
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The main exchange, unique to this relay.
    pub exchange: String,
    /// Table name → key → TOML value, written in table-name order.
    tables: BTreeMap<String, BTreeMap<String, String>>,
    wait_ready: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig::new()
    }
}

impl RelayConfig {
    /// The defaults above.
    pub fn new() -> RelayConfig {
        let exchange = unique("hr-test");
        let cfg = RelayConfig { exchange: exchange.clone(), tables: BTreeMap::new(), wait_ready: true };
        cfg.http("listen", "127.0.0.1:0")
            .set("admin", "listen", "127.0.0.1:0")
            .amqp("url", amqp_url())
            .amqp("exchange", exchange)
            .amqp("publish_timeout_ms", 3000)
            .amqp("reconnect_initial_ms", 50)
            .amqp("reconnect_max_ms", 500)
            .set("spool", "enabled", false)
            .set("shutdown", "grace_period_ms", 5000)
            .source("kind", "patreon")
            .source("secrets", [V1_SECRET, V2_SECRET, POSTS_SECRET])
    }

    /// Sets `key` in `[table]` (a dotted table name such as `sources.other` works).
    pub fn set(mut self, table: &str, key: &str, value: impl TomlValue) -> RelayConfig {
        self.tables.entry(table.to_owned()).or_default().insert(key.to_owned(), value.toml());
        self
    }

    /// Sets a key of `[http]`.
    pub fn http(self, key: &str, value: impl TomlValue) -> RelayConfig {
        self.set("http", key, value)
    }

    /// Sets a key of `[amqp]`.
    pub fn amqp(self, key: &str, value: impl TomlValue) -> RelayConfig {
        self.set("amqp", key, value)
    }

    /// Sets a key of `[sources.patreon]`.
    pub fn source(self, key: &str, value: impl TomlValue) -> RelayConfig {
        self.set("sources.patreon", key, value)
    }

    /// Connects to `url` instead of the test broker (a fault proxy, a dead port).
    pub fn amqp_url(self, url: impl TomlValue) -> RelayConfig {
        self.amqp("url", url)
    }

    /// Enables the spool in `dir`.
    pub fn spool(self, dir: &Path) -> RelayConfig {
        self.set("spool", "enabled", true).set("spool", "dir", dir)
    }

    /// Listens on these addresses (a child process binds them itself).
    pub fn listen(self, ingest: SocketAddr, admin: SocketAddr) -> RelayConfig {
        self.http("listen", ingest).set("admin", "listen", admin)
    }

    /// `start` returns without waiting for `/readyz` (the broker may be away).
    pub fn not_waiting_for_ready(mut self) -> RelayConfig {
        self.wait_ready = false;
        self
    }

    /// The configuration file.
    pub fn toml(&self) -> String {
        let mut out = String::new();
        for (table, keys) in &self.tables {
            out.push_str(&format!("[{table}]\n"));
            for (key, value) in keys {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        out
    }

    /// Starts the relay in this process (and waits until it is ready, unless told not to).
    pub async fn start(self) -> Relay {
        Relay::start_config(self).await
    }
}

/// A relay running in this process on 127.0.0.1 ephemeral ports.
pub struct Relay {
    pub ingest: SocketAddr,
    pub admin: SocketAddr,
    pub exchange: String,
    /// The configuration the relay runs with (for cleanup).
    pub toml: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// Set once [`Relay::stop_and_cleanup`] has deleted the topology.
    cleaned: bool,
}

impl Relay {
    /// A relay with the default test configuration, ready.
    pub async fn start() -> Relay {
        RelayConfig::new().start().await
    }

    async fn start_config(cfg: RelayConfig) -> Relay {
        let (exchange, toml, wait_ready) = (cfg.exchange.clone(), cfg.toml(), cfg.wait_ready);
        // Logs only when asked for (RUST_LOG=hookrelay=debug cargo test -- --nocapture).
        if std::env::var_os("RUST_LOG").is_some() {
            hookrelay::telemetry::init(hookrelay::config::LogFormat::Plain, "warn");
        }
        let config = hookrelay::config::load(Some(&toml), &HashMap::new()).unwrap().validate().unwrap();
        let ingest_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest = ingest_l.local_addr().unwrap();
        let admin = admin_l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(hookrelay::run(config, ingest_l, admin_l, async move {
            let _ = rx.await;
        }));
        let relay =
            Relay { ingest, admin, exchange, toml, shutdown: Some(tx), task: Some(task), cleaned: false };
        if wait_ready {
            // Fail with the broker's own message if it is not there at all.
            drop(broker().await);
            let admin = relay.admin;
            eventually("the relay to become ready", Duration::from_secs(15), || async move {
                (get(admin, "/readyz").await.0 == 200).then_some(())
            })
            .await;
        }
        relay
    }

    /// Name of a source's queue.
    pub fn queue(&self, source: &str) -> String {
        format!("{}.{source}", self.exchange)
    }

    /// Posts a fixture to `/webhooks/patreon` with its own headers.
    pub async fn post_fixture(&self, f: &Fixture) -> Response {
        post(
            self.ingest,
            "/webhooks/patreon",
            &[("X-Patreon-Event", f.event.as_str()), ("X-Patreon-Signature", f.signature.as_str())],
            f.body.clone(),
        )
        .await
    }

    /// The value of one metric sample, e.g. `hookrelay_signature_failures_total{reason="missing",source="patreon"}`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (status, _, body) = get(self.admin, "/metrics").await;
        assert_eq!(status, 200);
        metric_value(&String::from_utf8_lossy(&body), name, labels).unwrap_or(0.0)
    }

    /// The sample `name{source="patreon",reason}` (rejections, failures, retries).
    pub async fn by_reason(&self, name: &str, reason: &str) -> f64 {
        self.metric(name, &[("source", "patreon"), ("reason", reason)]).await
    }

    /// Unbinds the `patreon` queue from the main exchange, so its events are unroutable.
    pub async fn unbind_source_queue(&self) {
        let conn = broker().await;
        let ch = conn.create_channel().await.unwrap();
        let (queue, exchange) = (self.queue("patreon"), self.exchange.as_str());
        let args = lapin::types::FieldTable::default();
        ch.queue_unbind(queue.as_str().into(), exchange.into(), "patreon.#".into(), args).await.unwrap();
        close(conn, "unbound").await;
    }

    /// Asks the relay to stop and waits for it.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("relay did not stop in time")
                .unwrap()
                .unwrap();
        }
    }

    /// Sends the shutdown signal without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the relay and deletes everything its topology declared.
    pub async fn stop_and_cleanup(mut self) {
        self.stop().await;
        cleanup(&self.toml).await;
        self.cleaned = true;
    }
}

/// A test that fails never reaches its `stop_and_cleanup`: delete the relay's queues and
/// exchanges while it unwinds, so failed runs leave nothing on the shared broker. Only
/// on a panic: a passing test may hand its exchange on to another relay on purpose.
impl Drop for Relay {
    fn drop(&mut self) {
        if self.cleaned || !std::thread::panicking() {
            return;
        }
        let toml = std::mem::take(&mut self.toml);
        // Drop cannot await, and the test's runtime may be the one unwinding: clean up
        // on a thread of its own with a runtime of its own, bounded in time.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), cleanup(&toml)).await })
                    .ok();
            }
        })
        .join();
    }
}
