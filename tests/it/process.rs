//! The real binary as a process: restart after SIGKILL with a non-empty spool,
//! SIGTERM exit status, the spool lock, and `check-config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::proxy::{FaultProxy, Mode};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_hookrelay");

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A relay process with its own ports, config file and log file.
struct Proc {
    child: Child,
    ingest: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Proc {
    fn spawn(dir: &Path, name: &str, exchange: &str, url: &str, spool: &Path) -> Proc {
        let ingest = free_addr();
        let admin = free_addr();
        let toml = relay_toml_with(exchange, url, "", Some(spool), "")
            .replace("listen = \"127.0.0.1:0\"\n[admin]", &format!("listen = \"{ingest}\"\n[admin]"))
            .replace("[admin]\nlisten = \"127.0.0.1:0\"", &format!("[admin]\nlisten = \"{admin}\""));
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc { child, ingest, admin, log }
    }

    async fn wait_ready(&mut self) {
        let admin = self.admin;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "relay exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if tokio::net::TcpStream::connect(admin).await.is_ok() && get(admin, "/readyz").await.0 == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "relay not ready: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let ok =
            Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }

    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "relay did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_relay_drains_its_spool_after_restart() {
    let dir = temp_dir("hr-proc");
    let spool = dir.join("spool");
    let exchange = unique("hr-test");
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await.unwrap();
    proxy.set(Mode::Refuse);
    let mut first = Proc::spawn(&dir, "first", &exchange, &proxy.amqp_url(), &spool);
    first.wait_ready().await; // ready: the spool accepts while the broker is away
    let mut ids = Vec::new();
    for n in 0..25 {
        let (status, id) = post_signed(first.ingest, n).await;
        assert_eq!(status, 200);
        ids.push(id.unwrap());
    }
    first.signal("KILL");
    let status = first.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());

    let mut second = Proc::spawn(&dir, "second", &exchange, &amqp_url(), &spool);
    second.wait_ready().await;
    // Ready already means "the spool accepts"; the queue exists once connected.
    let admin = second.admin;
    eventually("the restarted relay to connect", Duration::from_secs(20), || async move {
        let (_, _, text) = get(admin, "/metrics").await;
        (metric_value(&String::from_utf8_lossy(&text), "hookrelay_broker_connected", &[]) == Some(1.0))
            .then_some(())
    })
    .await;
    let conn = broker().await;
    let queue = format!("{exchange}.patreon");
    let got = take_messages(&conn, &queue, ids.len(), Duration::from_secs(30)).await;
    let got_ids: Vec<String> =
        got.iter().map(|d| d.properties.message_id().as_ref().unwrap().to_string()).collect();
    assert_eq!(got_ids, ids, "every spooled event, in order, after SIGKILL and restart");
    second.signal("TERM");
    assert!(second.wait_exit(Duration::from_secs(20)).await.success());
    cleanup(&relay_toml(&exchange, &amqp_url(), "")).await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_a_second_relay_cannot_share_the_spool() {
    let dir = temp_dir("hr-proc");
    let spool = dir.join("spool");
    let exchange = unique("hr-test");
    let mut first = Proc::spawn(&dir, "first", &exchange, &amqp_url(), &spool);
    first.wait_ready().await;
    let (status, _) = post_signed(first.ingest, 1).await;
    assert_eq!(status, 200);

    let mut second = Proc::spawn(&dir, "second", &exchange, &amqp_url(), &spool);
    let status = second.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(2));
    let log = std::fs::read_to_string(&second.log).unwrap();
    assert!(log.contains("in use by another hookrelay process"), "{log}");

    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(&first.log).unwrap();
    assert!(log.contains("Closed the broker connection."), "{log}");
    cleanup(&relay_toml(&exchange, &amqp_url(), "")).await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_config_validates_and_names_the_key() {
    let dir = temp_dir("hr-cfg");
    let good = dir.join("good.toml");
    std::fs::write(&good, "[sources.patreon]\nkind = \"patreon\"\nsecrets = \"s-NOT-REAL\"\n").unwrap();
    let out = Command::new(BIN).arg("--config").arg(&good).arg("check-config").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok: 1 source(s)"));

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[sources.patreon]\nkind = \"patreon\"\nsecrets = \"s-NOT-REAL\"\n[amqp]\npublish_timeout_ms = 0\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("--config").arg(&bad).arg("check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("amqp.publish_timeout_ms"), "{err}");
    assert!(!err.contains("s-NOT-REAL"));

    let out = Command::new(BIN)
        .arg("check-config")
        .env("HOOKRELAY_CONFIG", &good)
        .env("HOOKRELAY_HTTP__LISTEN_ADDRESS", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_address"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn topology_export_matches_the_checked_in_definitions() {
    let out = Command::new(BIN)
        .args(["topology", "export"])
        .env("HOOKRELAY_SOURCES__PATREON__KIND", "patreon")
        // No secret and a URL that is no URL: the topology depends on neither.
        .env("HOOKRELAY_AMQP__URL", "not a url")
        .env_remove("HOOKRELAY_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let generated: Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rabbitmq/definitions.json");
    let checked_in: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for key in ["exchanges", "queues", "bindings"] {
        assert_eq!(
            generated[key], checked_in[key],
            "deploy/rabbitmq/definitions.json is stale: regenerate it with \
             `HOOKRELAY_SOURCES__PATREON__KIND=patreon hookrelay topology export`"
        );
    }
}
