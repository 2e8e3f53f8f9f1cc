//! The bench's own broker connection: the relay's topology (declared with the relay's
//! own code, so the queue type is the one it uses), message counts by passive declare,
//! purges between measurements, and deletion at the end.

use std::time::Duration;

use anyhow::Context;
use hookrelay::publish::amqp::declare;
use hookrelay::publish::topology::Topology;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::time::{Instant, sleep, timeout};

/// Longest any single broker operation of the bench may take.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects with a deadline and a clear error.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    timeout(OP_TIMEOUT, Connection::connect(url, props))
        .await
        .with_context(|| format!("RabbitMQ at {url} did not answer within {OP_TIMEOUT:?}"))?
        .with_context(|| format!("cannot connect to RabbitMQ at {url}"))
}

/// Declares `topology` exactly as the relay does.
pub async fn declare_topology(conn: &Connection, topology: &Topology) -> anyhow::Result<()> {
    let ch = conn.create_channel().await.context("opening a channel")?;
    timeout(OP_TIMEOUT, declare(&ch, topology))
        .await
        .context("declaring the topology timed out")?
        .context("declaring the topology")?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Messages ready in `queue` (passive declare on a fresh channel).
pub async fn depth(conn: &Connection, queue: &str) -> anyhow::Result<u64> {
    let ch = conn.create_channel().await.context("opening a channel")?;
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let q = timeout(OP_TIMEOUT, ch.queue_declare(queue.into(), passive, FieldTable::default()))
        .await
        .with_context(|| format!("passive declare of {queue} timed out"))?
        .with_context(|| format!("passive declare of {queue}"))?;
    let _ = ch.close(200, "counted".into()).await;
    Ok(u64::from(q.message_count()))
}

/// Waits (up to 5 s) for `queue` to hold `expected` messages and returns what it holds
/// then; a quorum queue's count can trail the confirm by a moment.
pub async fn settle_depth(conn: &Connection, queue: &str, expected: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = depth(conn, queue).await?;
        if n >= expected || Instant::now() >= deadline {
            return Ok(n);
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Empties `queue`.
pub async fn purge(conn: &Connection, queue: &str) -> anyhow::Result<()> {
    let ch = conn.create_channel().await.context("opening a channel")?;
    timeout(OP_TIMEOUT, ch.queue_purge(queue.into(), QueuePurgeOptions::default()))
        .await
        .with_context(|| format!("purging {queue} timed out"))?
        .with_context(|| format!("purging {queue}"))?;
    let _ = ch.close(200, "purged".into()).await;
    Ok(())
}

/// Deletes every queue and exchange of `topology`; failures are reported, not fatal.
pub async fn delete_topology(conn: &Connection, topology: &Topology) -> Vec<String> {
    let queues = topology.queues.iter().map(|q| ("queue", q.name.as_str()));
    let exchanges = topology.exchanges.iter().map(|e| ("exchange", e.name.as_str()));
    let mut problems = Vec::new();
    for (what, name) in queues.chain(exchanges) {
        let result = async {
            let ch = conn.create_channel().await?;
            if what == "queue" {
                ch.queue_delete(name.into(), QueueDeleteOptions::default()).await?;
            } else {
                ch.exchange_delete(name.into(), ExchangeDeleteOptions::default()).await?;
            }
            ch.close(200, "deleted".into()).await
        };
        match timeout(OP_TIMEOUT, result).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("{what} {name}: {e}")),
            Err(_) => problems.push(format!("{what} {name}: timed out")),
        }
    }
    problems
}

/// How long the relay's start-up broker steps take when the bench does them itself:
/// TCP connect + AMQP handshake, declaring the topology, and opening the confirm
/// channels. Explains the relay's "after connect" start-up figure.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectSteps {
    /// TCP connect and the AMQP handshake (`Connection::connect`).
    pub handshake: Duration,
    /// Declaring exchanges, quorum queues and bindings that do not exist yet.
    pub declare: Duration,
    /// Declaring them again once they exist (a restart).
    pub declare_existing: Duration,
    /// Opening the channel pool with `confirm.select` on each.
    pub channels: Duration,
}

/// Replays the relay's connect sequence for `topology` with `channels` channels.
pub async fn replay_connect(url: &str, topology: &Topology, channels: usize) -> anyhow::Result<ConnectSteps> {
    let t0 = Instant::now();
    let conn = connect(url, "hookrelay-bench-startup").await?;
    let handshake = t0.elapsed();
    let t1 = Instant::now();
    declare_topology(&conn, topology).await?;
    let declare = t1.elapsed();
    let t1 = Instant::now();
    declare_topology(&conn, topology).await?;
    let declare_existing = t1.elapsed();
    let t2 = Instant::now();
    for _ in 0..channels {
        let ch = conn.create_channel().await.context("opening a channel")?;
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.context("confirm.select")?;
    }
    let channels = t2.elapsed();
    let _ = conn.close(200, "replayed".into()).await;
    Ok(ConnectSteps { handshake, declare, declare_existing, channels })
}
