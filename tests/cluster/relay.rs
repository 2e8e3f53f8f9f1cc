//! A relay as a real process of the `hookrelay` binary: its own ports, spool, config
//! file (with the cluster's URL list) and log file; metrics read over its admin port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use crate::support::{get, metric_value};

const BIN: &str = env!("CARGO_BIN_EXE_hookrelay");

/// The webhook secret of the cluster tests' source `patreon`.
pub const SECRET: &str = "cluster-test-secret-NOT-REAL";

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("bound address")
}

/// One relay process.
pub struct RelayProc {
    child: Child,
    /// Public ingest address.
    pub ingest: SocketAddr,
    /// Admin address (metrics, readiness).
    pub admin: SocketAddr,
    /// Its stderr.
    pub log: PathBuf,
}

impl RelayProc {
    /// Starts a relay publishing to `exchange` through `urls` (a list, in this order), with
    /// its spool in `dir/name-spool`; `extra` is appended to the `[amqp]` table.
    pub fn spawn(dir: &Path, name: &str, exchange: &str, urls: &[String], extra: &str) -> RelayProc {
        let ingest = free_addr();
        let admin = free_addr();
        let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        let spool = dir.join(format!("{name}-spool"));
        let toml = format!(
            "[http]\nlisten = \"{ingest}\"\n[admin]\nlisten = \"{admin}\"\n\
             [amqp]\nurl = {}\nexchange = \"{exchange}\"\nreconnect_max_ms = 2000\n{extra}\n\
             [spool]\ndir = \"{}\"\n[log]\nlevel = \"info\"\n\
             [sources.patreon]\nkind = \"patreon\"\nsecrets = \"{SECRET}\"\n",
            list[0],
            spool.display()
        );
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).expect("config written");
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("HOOKRELAY_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("the relay binary starts");
        RelayProc { child, ingest, admin, log }
    }

    /// The process id (to find its broker connection).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One metric sample, if the relay answers.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        if tokio::net::TcpStream::connect(self.admin).await.is_err() {
            return None;
        }
        let (_, _, text) = get(self.admin, "/metrics").await;
        metric_value(&String::from_utf8_lossy(&text), name, labels)
    }

    /// Waits until the relay reports a broker connection; panics with its log after `limit`.
    pub async fn await_connected(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("relay exited with {status}: {}", self.log_text());
            }
            if self.metric("hookrelay_broker_connected", &[]).await == Some(1.0) {
                return;
            }
            assert!(Instant::now() < deadline, "relay not connected after {limit:?}: {}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the spool is empty and the relay is connected (all spooled events published).
    pub async fn await_drained(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let spooled = self.metric("hookrelay_spool_events", &[]).await;
            let connected = self.metric("hookrelay_broker_connected", &[]).await;
            if spooled == Some(0.0) && connected == Some(1.0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "spool not drained after {limit:?} (events {spooled:?}, connected {connected:?}): {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "relay exited with {status}: {}", self.log_text());
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("relay did not exit within 30 s of SIGTERM: {}", self.log_text());
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
