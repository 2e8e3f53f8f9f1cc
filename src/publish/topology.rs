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

/// The queue argument setting a quorum queue's members at creation.
pub const GROUP_SIZE_ARG: &str = "x-quorum-initial-group-size";

/// The arguments that make a queue a quorum queue, with its initial group size when
/// configured.
fn quorum(cfg: &AmqpConfig) -> Vec<(&'static str, Arg)> {
    let mut args = vec![("x-queue-type", Arg::Str("quorum".into()))];
    if let Some(n) = cfg.quorum_initial_group_size {
        args.push((GROUP_SIZE_ARG, Arg::Int(i64::from(n))));
    }
    args
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
        t.queues.push(QueueDef { name: ae.clone(), arguments: quorum(cfg) });
        t.bindings.push(BindingDef { exchange: ae.clone(), queue: ae.clone(), routing_key: String::new() });
    }
    if let Some(dlx) = &cfg.dead_letter_exchange {
        t.exchanges.push(ExchangeDef { name: dlx.clone(), kind: "topic", arguments: Vec::new() });
        t.queues.push(QueueDef { name: dlx.clone(), arguments: quorum(cfg) });
        t.bindings.push(BindingDef { exchange: dlx.clone(), queue: dlx.clone(), routing_key: "#".into() });
    }
    let x = cfg.exchange.as_str();
    let retry = retry_exchange(x);
    let mut sources = sources.into_iter().peekable();
    if sources.peek().is_some() {
        t.exchanges.push(ExchangeDef { name: retry.clone(), kind: "direct", arguments: Vec::new() });
    }
    let bind = |t: &mut Topology, queue: &str, key: &str| {
        t.bindings.push(BindingDef {
            exchange: retry.clone(),
            queue: queue.to_owned(),
            routing_key: key.to_owned(),
        });
    };
    // Quorum queues dead-letter at least once only with reject-publish overflow.
    let dead_letter_to = |key: String| {
        let mut args = quorum(cfg);
        args.extend([
            ("x-dead-letter-exchange", Arg::Str(retry.clone())),
            ("x-dead-letter-routing-key", Arg::Str(key)),
            ("x-dead-letter-strategy", Arg::Str("at-least-once".into())),
            ("x-overflow", Arg::Str("reject-publish".into())),
        ]);
        args
    };
    for source in sources {
        let queue = source_queue(x, source);
        let parked = parked_queue(x, source);
        let first_stop = if cfg.retry_delays.is_empty() { parked.clone() } else { rejected_queue(x, source) };
        let mut args = dead_letter_to(first_stop.clone());
        args.push(("x-delivery-limit", Arg::Int(i64::from(cfg.delivery_limit))));
        t.queues.push(QueueDef { name: queue.clone(), arguments: args });
        t.bindings.push(BindingDef {
            exchange: x.to_owned(),
            queue: queue.clone(),
            routing_key: format!("{source}.#"),
        });
        bind(&mut t, &queue, &return_key(x, source));
        if !cfg.retry_delays.is_empty() {
            t.queues.push(QueueDef { name: first_stop.clone(), arguments: quorum(cfg) });
            bind(&mut t, &first_stop, &first_stop);
        }
        for delay in &cfg.retry_delays {
            let name = delay_queue(x, source, delay.as_millis());
            let mut args = dead_letter_to(return_key(x, source));
            args.push(("x-message-ttl", Arg::Int(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))));
            t.queues.push(QueueDef { name: name.clone(), arguments: args });
            bind(&mut t, &name, &name);
        }
        t.queues.push(QueueDef { name: parked.clone(), arguments: quorum(cfg) });
        bind(&mut t, &parked, &parked);
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn cfg(extra: &str) -> AmqpConfig {
        let text =
            format!("[amqp]\nexchange = \"x\"\n{extra}\n[sources.s]\nkind = \"patreon\"\nsecrets = \"k\"\n");
        crate::config::load(Some(&text), &HashMap::new()).unwrap().validate().unwrap().amqp
    }

    fn queue<'a>(t: &'a Topology, name: &str) -> &'a QueueDef {
        t.queues.iter().find(|q| q.name == name).unwrap_or_else(|| panic!("no queue {name}"))
    }

    fn arg<'a>(q: &'a QueueDef, key: &str) -> Option<&'a Arg> {
        q.arguments.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    #[test]
    fn source_queue_dead_letters_into_the_retry_path() {
        let t = topology(&cfg("retry_delays_ms = [1000, 2000]\ndelivery_limit = 4"), ["s"]);
        let main = t.exchanges.iter().find(|e| e.name == "x").unwrap();
        assert_eq!(main.arguments, vec![("alternate-exchange", Arg::Str("x.unrouted".into()))]);
        let q = queue(&t, "x.s");
        assert_eq!(arg(q, "x-queue-type"), Some(&Arg::Str("quorum".into())));
        assert_eq!(arg(q, "x-dead-letter-exchange"), Some(&Arg::Str("x.retry".into())));
        assert_eq!(arg(q, "x-dead-letter-routing-key"), Some(&Arg::Str("x.s.rejected".into())));
        assert_eq!(arg(q, "x-dead-letter-strategy"), Some(&Arg::Str("at-least-once".into())));
        assert_eq!(arg(q, "x-overflow"), Some(&Arg::Str("reject-publish".into())));
        assert_eq!(arg(q, "x-delivery-limit"), Some(&Arg::Int(4)));
        let d = queue(&t, "x.s.delay.2000");
        assert_eq!(arg(d, "x-message-ttl"), Some(&Arg::Int(2000)));
        assert_eq!(arg(d, "x-dead-letter-routing-key"), Some(&Arg::Str("x.s.return".into())));
        queue(&t, "x.s.parked");
        queue(&t, "x.dead");
        let back =
            BindingDef { exchange: "x.retry".into(), queue: "x.s".into(), routing_key: "x.s.return".into() };
        assert!(t.bindings.contains(&back));
    }

    #[test]
    fn without_delays_rejections_go_straight_to_parking() {
        let t = topology(
            &cfg("retry_delays_ms = []\nunrouted_exchange = \"\"\ndead_letter_exchange = \"\""),
            ["s"],
        );
        let q = queue(&t, "x.s");
        assert_eq!(arg(q, "x-dead-letter-routing-key"), Some(&Arg::Str("x.s.parked".into())));
        assert!(
            t.queues.iter().all(|q| q.name != "x.s.rejected" && q.name != "x.dead" && q.name != "x.unrouted")
        );
        let defs = t.to_definitions("/");
        assert_eq!(defs["queues"].as_array().unwrap().len(), t.queues.len());
    }

    #[test]
    fn every_quorum_queue_gets_the_initial_group_size_only_when_set() {
        let t = topology(&cfg("quorum_initial_group_size = 3"), ["s"]);
        for q in &t.queues {
            assert_eq!(arg(q, "x-quorum-initial-group-size"), Some(&Arg::Int(3)), "{}", q.name);
        }
        let t = topology(&cfg(""), ["s"]);
        assert!(t.queues.iter().all(|q| arg(q, "x-quorum-initial-group-size").is_none()));
    }
}
