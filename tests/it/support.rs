//! Test support: a relay started in-process exactly as the binary wires it, a real
//! HTTP/1.1 client over a socket, a broker connection with a deadline, fixtures, and
//! polling helpers. Every relay gets a unique exchange so tests run in parallel.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Secrets of the shared fixtures (made up, see tests/fixtures/README.md).
pub const V1_SECRET: &str = "fixture-v1-webhook-secret-NOT-REAL-4f9c2e71";
pub const V2_SECRET: &str = "fixture-v2-webhook-secret-NOT-REAL-b7d31a08e6";
pub const POSTS_SECRET: &str = "fixture-posts-webhook-secret-NOT-REAL-5a2e9c";

/// The broker the tests use.
pub fn amqp_url() -> String {
    std::env::var("HOOKRELAY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}-{:04x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        fastrand::u16(..)
    )
}

/// Connects to the test broker or fails with instructions.
pub async fn broker() -> Connection {
    let url = amqp_url();
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await;
    match attempt {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!(
            "RabbitMQ is not reachable at {url} ({e}). Start one with \
             `rabbitmq-server -detached && rabbitmqctl await_startup`, or point \
             HOOKRELAY_TEST_AMQP_URL at a broker."
        ),
        Err(_) => panic!(
            "RabbitMQ at {url} did not answer within 10 s. Start one with \
             `rabbitmq-server -detached && rabbitmqctl await_startup`, or point \
             HOOKRELAY_TEST_AMQP_URL at a broker."
        ),
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One fixture body with its expected headers and outcome.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub name: String,
    pub body: Vec<u8>,
    pub event: String,
    pub signature: String,
    pub expect: String,
    pub secret: String,
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every Patreon fixture listed in INDEX.json.
pub fn patreon_fixtures() -> Vec<Fixture> {
    let dir = fixtures_dir();
    let index: Vec<Value> =
        serde_json::from_slice(&std::fs::read(dir.join("patreon/INDEX.json")).unwrap()).unwrap();
    index
        .iter()
        .map(|entry| {
            let body_file = entry["body_file"].as_str().unwrap();
            let meta: Value = serde_json::from_slice(
                &std::fs::read(dir.join(entry["meta_file"].as_str().unwrap())).unwrap(),
            )
            .unwrap();
            let body = std::fs::read(dir.join(body_file)).unwrap();
            assert_eq!(body.len() as u64, meta["body_bytes"].as_u64().unwrap(), "{body_file} was altered");
            Fixture {
                name: body_file.to_owned(),
                body,
                event: meta["headers"]["X-Patreon-Event"].as_str().unwrap().to_owned(),
                signature: meta["headers"]["X-Patreon-Signature"].as_str().unwrap().to_owned(),
                expect: meta["expect"].as_str().unwrap().to_owned(),
                secret: meta["secret"].as_str().unwrap().to_owned(),
            }
        })
        .collect()
}

/// Fixtures a relay must accept.
pub fn valid_fixtures() -> Vec<Fixture> {
    patreon_fixtures()
        .into_iter()
        .filter(|f| {
            matches!(
                f.expect.as_str(),
                "valid" | "valid-if-case-insensitive" | "valid-signature-header-unauthenticated"
            )
        })
        .collect()
}

/// How a test relay is configured beyond the defaults.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Extra TOML appended to the generated configuration.
    pub extra_toml: String,
    /// Broker URL; defaults to the test broker.
    pub amqp_url: Option<String>,
    /// Wait for `/readyz` before returning.
    pub wait_ready: bool,
    /// Extra lines for the `[amqp]` table.
    pub amqp_extra: String,
    /// Spool directory; `None` disables the spool.
    pub spool_dir: Option<PathBuf>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            extra_toml: String::new(),
            amqp_url: None,
            wait_ready: true,
            amqp_extra: String::new(),
            spool_dir: None,
        }
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
}

/// The TOML of a test relay with a unique exchange.
pub fn relay_toml(exchange: &str, url: &str, extra: &str) -> String {
    relay_toml_with(exchange, url, "", None, extra)
}

/// The TOML of a test relay, with lines for `[amqp]` and an optional spool directory.
pub fn relay_toml_with(
    exchange: &str,
    url: &str,
    amqp_extra: &str,
    spool: Option<&std::path::Path>,
    extra: &str,
) -> String {
    let spool = match spool {
        Some(dir) => format!("enabled = true\ndir = \"{}\"", dir.display()),
        None => "enabled = false".to_owned(),
    };
    format!(
        r#"
[http]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[amqp]
url = "{url}"
exchange = "{exchange}"
publish_timeout_ms = 3000
reconnect_initial_ms = 50
reconnect_max_ms = 500
{amqp_extra}
[spool]
{spool}
[shutdown]
grace_period_ms = 5000
[sources.patreon]
kind = "patreon"
secrets = ["{V1_SECRET}", "{V2_SECRET}", "{POSTS_SECRET}"]
{extra}
"#
    )
}

impl Relay {
    pub async fn start() -> Relay {
        Relay::start_with(RelayOptions::default()).await
    }

    pub async fn start_with(opts: RelayOptions) -> Relay {
        let exchange = unique("hr-test");
        let url = opts.amqp_url.clone().unwrap_or_else(amqp_url);
        let toml =
            relay_toml_with(&exchange, &url, &opts.amqp_extra, opts.spool_dir.as_deref(), &opts.extra_toml);
        Relay::start_toml(exchange, &toml, opts.wait_ready).await
    }

    pub async fn start_toml(exchange: String, toml: &str, wait_ready: bool) -> Relay {
        // Logs only when asked for (RUST_LOG=hookrelay=debug cargo test -- --nocapture).
        if std::env::var_os("RUST_LOG").is_some() {
            hookrelay::telemetry::init(hookrelay::config::LogFormat::Plain, "warn");
        }
        let config = hookrelay::config::load(Some(toml), &HashMap::new()).unwrap().validate().unwrap();
        let ingest_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest = ingest_l.local_addr().unwrap();
        let admin = admin_l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(hookrelay::run(config, ingest_l, admin_l, async move {
            let _ = rx.await;
        }));
        let relay =
            Relay { ingest, admin, exchange, toml: toml.to_owned(), shutdown: Some(tx), task: Some(task) };
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
    }
}

/// Deletes every queue and exchange the topology of configuration `toml` declares.
pub async fn cleanup(toml: &str) {
    let config = hookrelay::config::load(Some(toml), &HashMap::new()).unwrap().validate().unwrap();
    let topology = hookrelay::topology_for(&config);
    let conn = broker().await;
    for q in &topology.queues {
        // Deleting a queue that is gone closes the channel: use one per object.
        let ch = conn.create_channel().await.unwrap();
        let _ = ch.queue_delete(q.name.as_str().into(), QueueDeleteOptions::default()).await;
    }
    for e in &topology.exchanges {
        let ch = conn.create_channel().await.unwrap();
        let _ = ch.exchange_delete(e.name.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Reads one metric sample from exposition text.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let all =
            labels.iter().all(|(k, v)| label_text.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
        if all {
            return value.parse().ok();
        }
    }
    None
}

/// An HTTP answer: status, headers, body.
pub type Response = (u16, HashMap<String, String>, Bytes);

async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (status, headers, body)
}

/// `GET path` on `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    let req = Request::get(path).header("host", "localhost").body(Full::new(Bytes::new())).unwrap();
    send(addr, req).await
}

/// `POST path` with headers and body on `addr`.
pub async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Response {
    let mut req = Request::post(path).header("host", "localhost").header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(addr, req.body(Full::new(Bytes::from(body))).unwrap()).await
}

/// Posts a new signed `members:create` event (unique body, V2 secret) to
/// `/webhooks/patreon`; returns the status and, on 200, the event id.
pub async fn post_signed(addr: SocketAddr, n: u64) -> (u16, Option<String>) {
    let body = format!(r#"{{"data":{{"id":"{}","type":"member"}},"n":{n}}}"#, unique("m")).into_bytes();
    let sig = hookrelay::verify::patreon::sign(V2_SECRET.as_bytes(), &body);
    let headers = [("X-Patreon-Event", "members:create"), ("X-Patreon-Signature", sig.as_str())];
    let (status, _, answer) = post(addr, "/webhooks/patreon", &headers, body).await;
    let id = (status == 200)
        .then(|| serde_json::from_slice::<Value>(&answer).ok())
        .flatten()
        .and_then(|v| v["id"].as_str().map(str::to_owned));
    (status, id)
}

/// Any method.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Response {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(addr, req).await
}

/// Takes up to `n` messages from `queue`, acking them, waiting up to `limit` for them.
pub async fn take_messages(
    conn: &Connection,
    queue: &str,
    n: usize,
    limit: Duration,
) -> Vec<lapin::message::Delivery> {
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    while out.len() < n && Instant::now() < deadline {
        match ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            Some(msg) => out.push(msg.delivery),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    out
}

/// Declares `{exchange}.full` (one message at most, `reject-publish`), binds it to
/// every `patreon.#` event and fills it, so the broker nacks every such publish.
/// Returns its name; the caller deletes it.
pub async fn full_queue(conn: &Connection, exchange: &str) -> String {
    use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let ch = conn.create_channel().await.unwrap();
    let full = format!("{exchange}.full");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(full.as_str().into(), durable, args).await.unwrap();
    let bind = QueueBindOptions::default();
    ch.queue_bind(full.as_str().into(), exchange.into(), "patreon.#".into(), bind, FieldTable::default())
        .await
        .unwrap();
    let filler = lapin::BasicProperties::default();
    ch.basic_publish("".into(), full.as_str().into(), BasicPublishOptions::default(), b"filler", filler)
        .await
        .unwrap()
        .await
        .unwrap();
    full
}

/// Messages in a queue right now.
pub async fn queue_depth(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    q.message_count()
}

/// Drains a consumer stream helper (kept for tests that consume rather than get).
pub async fn next_delivery(
    consumer: &mut lapin::Consumer,
    limit: Duration,
) -> Option<lapin::message::Delivery> {
    tokio::time::timeout(limit, consumer.next()).await.ok().flatten().and_then(Result::ok)
}

/// The exact `data` bytes of an envelope: after `"data":`, up to the final `}`.
pub fn envelope_data(envelope: &[u8]) -> &[u8] {
    let marker = b"\"datacontenttype\":\"application/json\"";
    let start = envelope.windows(marker.len()).position(|w| w == marker).unwrap();
    let key = b"\"data\":";
    let rel = envelope[start..].windows(key.len()).position(|w| w == key).unwrap();
    &envelope[start + rel + key.len()..envelope.len() - 1]
}
