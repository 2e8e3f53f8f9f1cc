//! The broker objects the relay needs, described once as data. The AMQP side declares
//! them at start-up, and `hookrelay topology export` prints the same description as
//! RabbitMQ definitions JSON, so the two can never drift apart.

use serde_json::{Map, Value, json};

use crate::config::AmqpConfig;

/// An argument value in an `x-…` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// A string argument.
    Str(String),
    /// An integer argument.
    Int(i64),
}

/// A durable exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeDef {
    /// Name.
    pub name: String,
    /// `topic`, `fanout` or `direct`.
    pub kind: &'static str,
    /// Arguments (e.g. `alternate-exchange`).
    pub arguments: Vec<(&'static str, Arg)>,
}

/// A durable queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDef {
    /// Name.
    pub name: String,
    /// Arguments (`x-queue-type`, dead-lettering…).
    pub arguments: Vec<(&'static str, Arg)>,
}

/// A queue binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingDef {
    /// Exchange.
    pub exchange: String,
    /// Queue.
    pub queue: String,
    /// Binding key.
    pub routing_key: String,
}

/// Everything to declare, in dependency order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// Exchanges.
    pub exchanges: Vec<ExchangeDef>,
    /// Queues.
    pub queues: Vec<QueueDef>,
    /// Bindings.
    pub bindings: Vec<BindingDef>,
}

/// Name of a source's queue: `{exchange}.{source}`.
pub fn source_queue(exchange: &str, source: &str) -> String {
    format!("{exchange}.{source}")
}

/// The direct exchange of the consumer retry path: `{exchange}.retry`.
pub fn retry_exchange(exchange: &str) -> String {
    format!("{exchange}.retry")
}

/// Where a source queue dead-letters what consumers reject: `{exchange}.{source}.rejected`.
pub fn rejected_queue(exchange: &str, source: &str) -> String {
    format!("{exchange}.{source}.rejected")
}

/// A delay queue of the retry path: `{exchange}.{source}.delay.{ms}`.
pub fn delay_queue(exchange: &str, source: &str, delay_ms: u128) -> String {
    format!("{exchange}.{source}.delay.{delay_ms}")
}

/// Where messages rejected too often end: `{exchange}.{source}.parked`.
pub fn parked_queue(exchange: &str, source: &str) -> String {
    format!("{exchange}.{source}.parked")
}

/// Routing key on the retry exchange that leads back into the source queue only.
pub fn return_key(exchange: &str, source: &str) -> String {
    format!("{exchange}.{source}.return")
}

fn quorum() -> (&'static str, Arg) {
    ("x-queue-type", Arg::Str("quorum".into()))
}

/// The topology for an exchange configuration and a set of source names.
pub fn topology<'a>(cfg: &AmqpConfig, sources: impl IntoIterator<Item = &'a str>) -> Topology {
    let mut t = Topology::default();
    let mut main_args = Vec::new();
    if let Some(ae) = &cfg.unrouted_exchange {
        main_args.push(("alternate-exchange", Arg::Str(ae.clone())));
    }
    t.exchanges.push(ExchangeDef { name: cfg.exchange.clone(), kind: "topic", arguments: main_args });
    if let Some(ae) = &cfg.unrouted_exchange {
        t.exchanges.push(ExchangeDef { name: ae.clone(), kind: "fanout", arguments: Vec::new() });
        t.queues.push(QueueDef { name: ae.clone(), arguments: vec![quorum()] });
        t.bindings.push(BindingDef { exchange: ae.clone(), queue: ae.clone(), routing_key: String::new() });
    }
    if let Some(dlx) = &cfg.dead_letter_exchange {
        t.exchanges.push(ExchangeDef { name: dlx.clone(), kind: "topic", arguments: Vec::new() });
        t.queues.push(QueueDef { name: dlx.clone(), arguments: vec![quorum()] });
        t.bindings.push(BindingDef { exchange: dlx.clone(), queue: dlx.clone(), routing_key: "#".into() });
    }
    for source in sources {
        let queue = source_queue(&cfg.exchange, source);
        t.queues.push(QueueDef { name: queue.clone(), arguments: vec![quorum()] });
        t.bindings.push(BindingDef {
            exchange: cfg.exchange.clone(),
            queue,
            routing_key: format!("{source}.#"),
        });
    }
    t
}

fn args_json(args: &[(&'static str, Arg)]) -> Value {
    let mut m = Map::new();
    for (k, v) in args {
        let v = match v {
            Arg::Str(s) => Value::from(s.as_str()),
            Arg::Int(i) => Value::from(*i),
        };
        m.insert((*k).to_owned(), v);
    }
    Value::Object(m)
}

impl Topology {
    /// RabbitMQ definitions JSON (the format `load_definitions` and the management
    /// API import) for virtual host `vhost`.
    pub fn to_definitions(&self, vhost: &str) -> Value {
        let exchanges: Vec<Value> = self
            .exchanges
            .iter()
            .map(|e| {
                json!({"name": e.name, "vhost": vhost, "type": e.kind, "durable": true,
                       "auto_delete": false, "internal": false, "arguments": args_json(&e.arguments)})
            })
            .collect();
        let queues: Vec<Value> = self
            .queues
            .iter()
            .map(|q| {
                json!({"name": q.name, "vhost": vhost, "durable": true, "auto_delete": false,
                       "arguments": args_json(&q.arguments)})
            })
            .collect();
        let bindings: Vec<Value> = self
            .bindings
            .iter()
            .map(|b| {
                json!({"source": b.exchange, "vhost": vhost, "destination": b.queue,
                       "destination_type": "queue", "routing_key": b.routing_key, "arguments": {}})
            })
            .collect();
        json!({"exchanges": exchanges, "queues": queues, "bindings": bindings})
    }
}
