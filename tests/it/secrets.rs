//! Secrets never leak: the real binary, at the most verbose log level (`trace` in the
//! file and in `RUST_LOG`), driven through every answer it can give, never writes a
//! webhook secret (inline, from a file or from the environment), the AMQP password, a
//! signature it was sent or a body it was sent to stdout, stderr or `/metrics`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_hookrelay");

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

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

/// The binary running with trace logging; stdout and stderr go to files.
struct Proc {
    child: Child,
    ingest: SocketAddr,
    admin: SocketAddr,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(dir: &Path, name: &str, secrets: &Secrets, amqp_url: &str, exchange: &str) -> Proc {
        let ingest = free_addr();
        let admin = free_addr();
        let secret_file = dir.join(format!("{name}.secret"));
        std::fs::write(&secret_file, format!("{}\n", secrets.file)).unwrap();
        // World-readable on purpose: the relay must warn, naming the file, not the secret.
        set_mode(&secret_file, 0o644);
        let toml = format!(
            r#"
[http]
listen = "{ingest}"
max_body_bytes = 4096
request_timeout_ms = 1000
[admin]
listen = "{admin}"
[amqp]
url = "{amqp_url}"
exchange = "{exchange}"
publish_timeout_ms = 1500
reconnect_initial_ms = 50
reconnect_max_ms = 500
[spool]
enabled = false
[log]
level = "trace"
[sources.patreon]
kind = "patreon"
secrets = ["{inline}"]
[sources.filed]
kind = "patreon"
secret_files = ["{file}"]
[sources.limited]
kind = "patreon"
secrets = "{limited}"
rate_limit_per_sec = 1
rate_limit_burst = 1
[sources.locked]
kind = "patreon"
secrets = "{locked}"
allowed_cidrs = ["10.0.0.0/8"]
"#,
            inline = secrets.inline,
            file = secret_file.display(),
            limited = secrets.limited,
            locked = secrets.locked,
        );
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "trace")
            .env("HOOKRELAY_SOURCES__ENVSRC__KIND", "patreon")
            .env("HOOKRELAY_SOURCES__ENVSRC__SECRETS", &secrets.env)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Proc { child, ingest, admin, stdout, stderr }
    }

    fn output(&self) -> String {
        let out = std::fs::read(&self.stdout).unwrap_or_default();
        let err = std::fs::read(&self.stderr).unwrap_or_default();
        format!("{}\n{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err))
    }

    /// Waits for the admin listener (and, if asked, readiness).
    async fn wait_up(&mut self, ready: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("relay exited with {status}: {}", self.output());
            }
            if TcpStream::connect(self.admin).await.is_ok() {
                let path = if ready { "/readyz" } else { "/healthz" };
                if get(self.admin, path).await.0 == 200 {
                    return;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "relay not up: {}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(&mut self) {
        let sent = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(sent.success());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit {status}: {}", self.output());
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "relay did not stop: {}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
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
        let sig = hookrelay::verify::patreon::sign(secret.as_bytes(), &body);
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
        let text = String::from_utf8_lossy(&out);
        let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
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
    let mut relay = Proc::spawn(&dir, "up", &secrets, &amqp_url(), &exchange);
    relay.wait_up(true).await;
    let ingest = relay.ingest;
    let mut sent = Sent::default();
    let s = &secrets;
    let expect = [
        (
            "valid, inline secret",
            sent.post(ingest, "valid inline", "/webhooks/patreon", &s.inline, "members:create").await,
            200,
        ),
        (
            "valid, file secret",
            sent.post(ingest, "valid file", "/webhooks/filed", &s.file, "members:create").await,
            200,
        ),
        (
            "valid, environment secret",
            sent.post(ingest, "valid env", "/webhooks/envsrc", &s.env, "posts:publish").await,
            200,
        ),
        (
            "wrong secret",
            sent.post(ingest, "wrong secret", "/webhooks/patreon", &s.file, "members:create").await,
            401,
        ),
        (
            "bad event",
            sent.post(ingest, "bad event", "/webhooks/patreon", &s.inline, "Members Create").await,
            400,
        ),
        (
            "unknown source",
            sent.post(ingest, "unknown", "/webhooks/nobody", &s.inline, "members:create").await,
            404,
        ),
        (
            "rate limit: first",
            sent.post(ingest, "limited 1", "/webhooks/limited", &s.limited, "members:create").await,
            200,
        ),
        (
            "rate limit: second",
            sent.post(ingest, "limited 2", "/webhooks/limited", &s.limited, "members:create").await,
            429,
        ),
        (
            "denied address",
            sent.post(ingest, "locked", "/webhooks/locked", &s.locked, "members:create").await,
            403,
        ),
    ];
    let not_json = b"not json, body-marker-notjson".to_vec();
    sent.bodies.push("body-marker-notjson".into());
    let sig = hookrelay::verify::patreon::sign(s.inline.as_bytes(), &not_json);
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
    let big_sig = hookrelay::verify::patreon::sign(s.inline.as_bytes(), &big);
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
    let slow_sig = hookrelay::verify::patreon::sign(s.inline.as_bytes(), &slow);
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
    let mut down = Proc::spawn(&dir, "down", &secrets, &url, &exchange);
    down.wait_up(false).await;
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
