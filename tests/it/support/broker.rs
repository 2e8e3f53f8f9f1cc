//! The test broker: connecting with a deadline (failing with how to start one),
//! reading queues, and deleting what a test relay declared.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use tokio::time::Instant;

use super::unique;

/// The broker the tests use.
pub fn amqp_url() -> String {
    std::env::var("HOOKRELAY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
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

/// Deletes every queue and exchange the topology of configuration `toml` declares.
pub async fn cleanup(toml: &str) {
    let conn = broker().await;
    // A broker that stalls a delete fails the test instead of hanging the run.
    tokio::time::timeout(Duration::from_secs(30), cleanup_on(&conn, toml))
        .await
        .expect("the broker did not delete the test's queues and exchanges within 30 s");
    close(conn, "cleanup").await;
}

/// Closes a test's own connection, waiting 5 s at most: lapin's `close` can wait for
/// ever when one of the connection's channels is itself closing (it logs "invalid
/// channel state: Closing"), and a test must not hang on its way out: after 5 s the
/// connection is dropped unclosed and the broker closes it when its socket goes.
pub async fn close(conn: Connection, why: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, why.into())).await;
}

/// Deletes the queues and exchanges a relay with `toml` declares, over `conn`.
pub async fn cleanup_on(conn: &Connection, toml: &str) {
    let config = hookrelay::config::load(Some(toml), &HashMap::new()).unwrap().validate().unwrap();
    let topology = hookrelay::topology_for(&config);
    for q in &topology.queues {
        // Deleting a queue that is gone closes the channel: use one per object.
        let ch = conn.create_channel().await.unwrap();
        let _ = ch.queue_delete(q.name.as_str().into(), QueueDeleteOptions::default()).await;
    }
    for e in &topology.exchanges {
        let ch = conn.create_channel().await.unwrap();
        let _ = ch.exchange_delete(e.name.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
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
        // Bounded too: a get the broker never answers ends the wait like an empty queue.
        let get = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true });
        match tokio::time::timeout_at(deadline, get).await {
            Ok(got) => match got.unwrap() {
                Some(msg) => out.push(msg.delivery),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            Err(_) => break,
        }
    }
    out
}

/// Declares `{exchange}.full` (one message at most, `reject-publish`), binds it to
/// every `patreon.#` event and fills it, so the broker nacks every such publish.
/// Returns its name; the caller deletes it.
pub async fn full_queue(conn: &Connection, exchange: &str) -> String {
    full_queue_for(conn, exchange, "patreon.#").await
}

/// A queue holding at most one message that refuses the rest (`reject-publish`),
/// bound to `exchange` with `key` and filled, so the broker nacks what routes to it.
/// Returns its name; the caller deletes it.
pub async fn full_queue_for(conn: &Connection, exchange: &str, key: &str) -> String {
    use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let ch = conn.create_channel().await.unwrap();
    let full = format!("{exchange}.full.{}", unique("q"));
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(full.as_str().into(), durable, args).await.unwrap();
    let bind = QueueBindOptions::default();
    ch.queue_bind(full.as_str().into(), exchange.into(), key.into(), bind, FieldTable::default())
        .await
        .unwrap();
    // Confirmed, so the queue is full before the caller publishes on another connection.
    ch.confirm_select(Default::default()).await.unwrap();
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
