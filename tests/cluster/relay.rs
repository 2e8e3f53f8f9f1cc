//! A relay as a real process of the `hookrelay` binary (the shared test [`Child`]),
//! configured with the cluster's URL list and its own spool; what the cluster tests ask
//! of it: its broker connection, its spool drained, its metrics.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use crate::support::{Child, RelayConfig, get, metric_value};

/// One relay process.
pub struct RelayProc {
    /// The process (ingest and admin addresses, output, signals).
    pub child: Child,
}

impl RelayProc {
    /// Starts a relay publishing to `exchange` through `urls` (a list, in this order), with
    /// its spool in `dir/name-spool`; `amqp` sets more keys of `[amqp]`.
    pub fn spawn(dir: &Path, name: &str, exchange: &str, urls: &[String], amqp: &[(&str, u64)]) -> RelayProc {
        let mut config = RelayConfig::new()
            .amqp_url(urls)
            .amqp("exchange", exchange)
            // The relay's own defaults, not the fast ones of the other tests.
            .amqp("publish_timeout_ms", 5000)
            .amqp("reconnect_max_ms", 2000)
            .spool(&dir.join(format!("{name}-spool")))
            .set("log", "level", "info");
        config.exchange = exchange.to_owned();
        for (key, value) in amqp {
            config = config.amqp(key, *value);
        }
        RelayProc { child: Child::spawn(dir, name, config, &[]) }
    }

    /// The process id (to find its broker connection).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// One metric sample, if the relay answers.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        tokio::net::TcpStream::connect(self.child.admin).await.ok()?;
        let (_, _, text) = get(self.child.admin, "/metrics").await;
        metric_value(&String::from_utf8_lossy(&text), name, labels)
    }

    /// Waits until the relay reports a broker connection; fails with its output after `limit`.
    pub async fn await_connected(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.metric("hookrelay_broker_connected", &[]).await != Some(1.0) {
            assert!(
                Instant::now() < deadline,
                "relay not connected after {limit:?}: {}",
                self.child.output()
            );
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
                self.child.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
