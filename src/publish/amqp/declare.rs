//! Topology declaration: turns the [`Topology`] description into exchange, queue and
//! binding declarations on a channel.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::publish::topology::{Arg, Topology};

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
    let durable_queue = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    for q in &topology.queues {
        ch.queue_declare(q.name.as_str().into(), durable_queue, field_table(&q.arguments)).await?;
    }
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
