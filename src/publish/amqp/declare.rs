//! Topology declaration: turns the [`Topology`] description into exchange, queue and
//! binding declarations on a channel.
//!
//! Declarations are idempotent, so relays starting together may all declare. One
//! difference is tolerated: a quorum queue's initial group size only applies when the
//! queue is created, yet RabbitMQ refuses a redeclaration whose
//! `x-quorum-initial-group-size` differs; such a queue is taken as it is, with a
//! warning. Any other difference stays an error.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use tracing::warn;

use crate::publish::topology::{Arg, GROUP_SIZE_ARG, QueueDef, Topology};

/// An `x-…` argument list as an AMQP field table.
fn field_table(args: &[(&'static str, Arg)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        let v = match v {
            Arg::Str(s) => AMQPValue::LongString(s.as_str().into()),
            Arg::Int(i) => AMQPValue::LongLongInt(*i),
        };
        t.insert((*k).into(), v);
    }
    t
}

/// The exchange kind named in the topology (`topic` unless it says otherwise).
fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "fanout" => ExchangeKind::Fanout,
        "direct" => ExchangeKind::Direct,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Topic,
    }
}

/// Declares every exchange, queue and binding of `topology` on `ch`.
pub async fn declare(ch: &Channel, topology: &Topology) -> lapin::Result<()> {
    declare_exchanges(ch, topology).await?;
    for q in &topology.queues {
        declare_queue(ch, q).await?;
    }
    declare_bindings(ch, topology).await
}

/// [`declare`] over `conn`, taking a quorum queue that exists with another initial
/// group size as it is (the failed declaration closes its channel: a new one goes on).
pub async fn declare_on(conn: &Connection, topology: &Topology) -> lapin::Result<()> {
    let mut ch = conn.create_channel().await?;
    declare_exchanges(&ch, topology).await?;
    for q in &topology.queues {
        match declare_queue(&ch, q).await {
            Ok(()) => {}
            Err(error) if differs_in_group_size(&error) => {
                warn!(
                    queue = %q.name,
                    "The queue exists with another initial group size; using it as it is \
                     (rabbitmq-queues grow adds members)."
                );
                ch = conn.create_channel().await?;
                let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
                ch.queue_declare(q.name.as_str().into(), passive, FieldTable::default()).await?;
            }
            Err(error) => return Err(error),
        }
    }
    declare_bindings(&ch, topology).await?;
    let _ = ch.close(200, "topology declared".into()).await;
    Ok(())
}

/// RabbitMQ's refusal of a redeclaration that differs only where it may.
fn differs_in_group_size(error: &lapin::Error) -> bool {
    error.to_string().contains(&format!("inequivalent arg '{GROUP_SIZE_ARG}'"))
}

async fn declare_exchanges(ch: &Channel, topology: &Topology) -> lapin::Result<()> {
    let durable_exchange = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    for e in &topology.exchanges {
        ch.exchange_declare(
            e.name.as_str().into(),
            exchange_kind(e.kind),
            durable_exchange,
            field_table(&e.arguments),
        )
        .await?;
    }
    Ok(())
}

async fn declare_queue(ch: &Channel, q: &QueueDef) -> lapin::Result<()> {
    let durable_queue = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    ch.queue_declare(q.name.as_str().into(), durable_queue, field_table(&q.arguments)).await?;
    Ok(())
}

async fn declare_bindings(ch: &Channel, topology: &Topology) -> lapin::Result<()> {
    for b in &topology.bindings {
        ch.queue_bind(
            b.queue.as_str().into(),
            b.exchange.as_str().into(),
            b.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_keep_their_types() {
        let t = field_table(&[("x-queue-type", Arg::Str("quorum".into())), ("x-max-length", Arg::Int(10))]);
        assert_eq!(t.inner().get("x-queue-type"), Some(&AMQPValue::LongString("quorum".into())));
        assert_eq!(t.inner().get("x-max-length"), Some(&AMQPValue::LongLongInt(10)));
    }

    #[test]
    fn unknown_kinds_are_topic() {
        assert_eq!(exchange_kind("fanout"), ExchangeKind::Fanout);
        assert_eq!(exchange_kind("direct"), ExchangeKind::Direct);
        assert_eq!(exchange_kind("headers"), ExchangeKind::Headers);
        assert_eq!(exchange_kind("topic"), ExchangeKind::Topic);
        assert_eq!(exchange_kind("x"), ExchangeKind::Topic);
    }
}
