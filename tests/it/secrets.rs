//! Secrets never leak: the real binary, at the most verbose log level (`trace` in the
//! file and in `RUST_LOG`), driven through every answer it can give, never writes a
//! webhook secret (inline, from a file or from the environment), the AMQP password, a
//! signature it was sent or a body it was sent to stdout, stderr or `/metrics`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Every secret one run configures, all unique to the run.
struct Secrets {
    inline: String,
    file: String,
    env: String,
    limited: String,
    locked: String,
    amqp_password: String,
}

impl Secrets {
    fn new() -> Secrets {
        let s = |what: &str| unique(&format!("{what}-secret-NOT-REAL"));
        Secrets {
            inline: s("inline"),
            file: s("file"),
            env: s("env"),
            limited: s("limited"),
            locked: s("locked"),
            amqp_password: s("amqp-pw"),
        }
    }

    fn all(&self) -> [(&'static str, &str); 6] {
        [
            ("inline secret", &self.inline),
            ("file secret", &self.file),
            ("environment secret", &self.env),
            ("rate-limited source's secret", &self.limited),
            ("allowlisted source's secret", &self.locked),
            ("AMQP password", &self.amqp_password),
        ]
    }
}

/// The binary with trace logging (file and `RUST_LOG`), four sources from the file
/// (inline secret, secret file, rate limit, allowlist) and one from the environment.
fn spawn(dir: &Path, name: &str, secrets: &Secrets, amqp_url: &str, exchange: &str) -> Child {
    let secret_file = dir.join(format!("{name}.secret"));
    std::fs::write(&secret_file, format!("{}\n", secrets.file)).unwrap();
    // World-readable on purpose: the relay must warn, naming the file, not the secret.
    set_mode(&secret_file, 0o644);
    let config = RelayConfig::new()
        .http("max_body_bytes", 4096)
        .http("request_timeout_ms", 1000)
        .amqp_url(amqp_url)
        .amqp("exchange", exchange)
        .amqp("publish_timeout_ms", 1500)
        .set("log", "level", "trace")
        .source("secrets", [&secrets.inline])
        .set("sources.filed", "kind", "patreon")
        .set("sources.filed", "secret_files", [&secret_file])
        .set("sources.limited", "kind", "patreon")
        .set("sources.limited", "secrets", &secrets.limited)
        .set("sources.limited", "rate_limit_per_sec", 1)
        .set("sources.limited", "rate_limit_burst", 1)
        .set("sources.locked", "kind", "patreon")
        .set("sources.locked", "secrets", &secrets.locked)
        .set("sources.locked", "allowed_cidrs", ["10.0.0.0/8"]);
    let env = [
        ("RUST_LOG", "trace"),
        ("HOOKRELAY_SOURCES__ENVSRC__KIND", "patreon"),
        ("HOOKRELAY_SOURCES__ENVSRC__SECRETS", secrets.env.as_str()),
    ];
    Child::spawn(dir, name, config, &env)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) {}

/// Everything one run sent that must not come back out.
#[derive(Default)]
struct Sent {
    signatures: Vec<String>,
    bodies: Vec<String>,
    statuses: Vec<(String, u16)>,
}

impl Sent {
    /// A body that is unique to this request and easy to search for.
    fn body(&mut self, what: &str) -> Vec<u8> {
        let marker = unique(&format!("body-marker-{}", what.replace(' ', "-")));
        self.bodies.push(marker.clone());
        format!(r#"{{"data":{{"id":"1","type":"member","attributes":{{"note":"{marker}"}}}}}}"#).into_bytes()
    }

    async fn post(&mut self, ingest: SocketAddr, what: &str, path: &str, secret: &str, event: &str) -> u16 {
        let body = self.body(what);
        let sig = sign_with(secret, &body);
        self.signatures.push(sig.clone());
        let (status, _, _) =
            post(ingest, path, &[("X-Patreon-Event", event), ("X-Patreon-Signature", &sig)], body).await;
        self.statuses.push((what.to_owned(), status));
        status
    }

    async fn raw(&mut self, ingest: SocketAddr, what: &str, wire: Vec<u8>) -> u16 {
        let mut s = TcpStream::connect(ingest).await.unwrap();
        let _ = s.write_all(&wire).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let status = status_of(&out);
        self.statuses.push((what.to_owned(), status));
        status
    }
}

/// Asserts that nothing secret or sent appears in `text` (named `what`).
fn assert_clean(what: &str, text: &str, secrets: &Secrets, sent: &Sent) {
    for (name, secret) in secrets.all() {
        assert!(!text.contains(secret), "the {name} appears in {what}");
    }
    for sig in &sent.signatures {
        assert!(!text.to_lowercase().contains(sig), "a signature ({sig}) appears in {what}");
    }
    for marker in &sent.bodies {
        assert!(!text.contains(marker), "a body ({marker}) appears in {what}");
    }
    assert!(!text.contains("guest:guest"), "the broker credentials appear in {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_signature_or_body_reaches_logs_or_metrics() {
    let dir = std::env::temp_dir().join(unique("hookrelay-secrets"));
    std::fs::create_dir_all(&dir).unwrap();
    let secrets = Secrets::new();
    let exchange = unique("hr-test");

    // Run 1: the real broker; every answer but 503.
    let mut relay = spawn(&dir, "up", &secrets, &amqp_url(), &exchange);
    relay.wait_for("/readyz").await;
    let ingest = relay.ingest;
    let mut sent = Sent::default();
    let s = &secrets;
    // What is sent (in this order: the rate limit counts), and the status expected.
    let rows: [(&str, &str, &str, &str, &str, u16); 9] = [
        ("valid, inline secret", "valid inline", "/webhooks/patreon", &s.inline, "members:create", 200),
        ("valid, file secret", "valid file", "/webhooks/filed", &s.file, "members:create", 200),
        ("valid, environment secret", "valid env", "/webhooks/envsrc", &s.env, "posts:publish", 200),
        ("wrong secret", "wrong secret", "/webhooks/patreon", &s.file, "members:create", 401),
        ("bad event", "bad event", "/webhooks/patreon", &s.inline, "Members Create", 400),
        ("unknown source", "unknown", "/webhooks/nobody", &s.inline, "members:create", 404),
        ("rate limit: first", "limited 1", "/webhooks/limited", &s.limited, "members:create", 200),
        ("rate limit: second", "limited 2", "/webhooks/limited", &s.limited, "members:create", 429),
        ("denied address", "locked", "/webhooks/locked", &s.locked, "members:create", 403),
    ];
    let mut expect = Vec::new();
    for (what, label, path, secret, event, want) in rows {
        expect.push((what, sent.post(ingest, label, path, secret, event).await, want));
    }
    let not_json = b"not json, body-marker-notjson".to_vec();
    sent.bodies.push("body-marker-notjson".into());
    let sig = sign_with(&s.inline, &not_json);
    sent.signatures.push(sig.clone());
    let (bad_json, _, _) = post(
        ingest,
        "/webhooks/patreon",
        &[("X-Patreon-Event", "members:create"), ("X-Patreon-Signature", &sig)],
        not_json,
    )
    .await;
    let (method, _, _) = request(ingest, "GET", "/webhooks/patreon").await;
    let big = sent.body("too large").into_iter().chain(vec![b' '; 5000]).collect::<Vec<u8>>();
    let big_sig = sign_with(&s.inline, &big);
    sent.signatures.push(big_sig.clone());
    let mut wire = format!(
        "POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\nx-patreon-event: members:create\r\n\
         x-patreon-signature: {big_sig}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
        big.len()
    )
    .into_bytes();
    wire.extend(&big);
    wire.extend(b"\r\n0\r\n\r\n");
    let too_large = sent.raw(ingest, "too large", wire).await;
    let slow = sent.body("slow");
    let slow_sig = sign_with(&s.inline, &slow);
    sent.signatures.push(slow_sig.clone());
    let mut wire = format!(
        "POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\nx-patreon-event: members:create\r\n\
         x-patreon-signature: {slow_sig}\r\ncontent-length: {}\r\n\r\n",
        slow.len() + 10
    )
    .into_bytes();
    wire.extend(&slow);
    let timeout = sent.raw(ingest, "timeout", wire).await;
    for (what, got, want) in expect.iter().chain(&[
        ("not JSON", bad_json, 400),
        ("wrong method", method, 405),
        ("too large", too_large, 413),
        ("body too slow", timeout, 408),
    ]) {
        assert_eq!(got, want, "{what}");
    }
    let (_, _, metrics) = get(relay.admin, "/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    relay.stop().await;
    let output = relay.output();

    // Run 2: the broker is unreachable and its URL carries a password: 503.
    let dead = free_addr();
    let url = format!("amqp://relay-user:{}@{dead}/%2f", secrets.amqp_password);
    let mut down = spawn(&dir, "down", &secrets, &url, &exchange);
    down.wait_for("/healthz").await;
    let unavailable =
        sent.post(down.ingest, "broker down", "/webhooks/patreon", &s.inline, "members:create").await;
    assert_eq!(unavailable, 503);
    let unauthorized =
        sent.post(down.ingest, "down, wrong", "/webhooks/patreon", &s.env, "members:create").await;
    assert_eq!(unauthorized, 401);
    let (_, _, down_metrics) = get(down.admin, "/metrics").await;
    let down_metrics = String::from_utf8_lossy(&down_metrics).into_owned();
    down.stop().await;
    let down_output = down.output();

    // The logs really were verbose, and the paths really ran.
    for (what, text) in [("run 1", &output), ("run 2", &down_output)] {
        let trace_lines = text.lines().filter(|l| l.contains("TRACE")).count();
        assert!(trace_lines >= 20, "{what} logged only {trace_lines} trace lines");
        assert!(text.contains("readable by every user"), "{what}: no warning about the secret file");
    }
    // Positive controls: the refusals' own log lines are there, so silence about the
    // secrets is not silence about everything.
    for line in ["Signature refused.", "Rate limit reached.", "Address not allowed", "Answered."] {
        assert!(output.contains(line), "run 1 did not log {line:?}");
    }
    assert!(down_output.contains("Event not durable"), "run 2 did not log the 503");
    assert!(
        metrics.contains(r#"hookrelay_webhooks_rejected_total{reason="ip_denied",source="locked"} 1"#),
        "{metrics}"
    );
    for (what, text) in [
        ("run 1's output", &output),
        ("run 1's /metrics", &metrics),
        ("run 2's output", &down_output),
        ("run 2's /metrics", &down_metrics),
    ] {
        assert_clean(what, text, &secrets, &sent);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    // The topology of both runs, the environment's source included.
    let mut topology = format!("[amqp]\nexchange = \"{exchange}\"\n");
    for source in ["envsrc", "filed", "limited", "locked", "patreon"] {
        topology.push_str(&format!("[sources.{source}]\nkind = \"patreon\"\nsecrets = \"x\"\n"));
    }
    cleanup(&topology).await;
}
