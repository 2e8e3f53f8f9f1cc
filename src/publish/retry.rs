//! The consumer retry path's router. A consumer that rejects a message
//! (`basic.reject`/`nack` with `requeue=false`) makes its source queue dead-letter it
//! to `{exchange}.{source}.rejected`; this task counts the rejection in the
//! `x-hookrelay-retries` header and sends the message to the delay queue for that
//! count (it returns to the source queue when its TTL expires) or, past
//! `amqp.delivery_limit`, to `{exchange}.{source}.parked`. Each message is acked
//! only after the broker confirmed its next hop, so a crash duplicates, never loses.
//!
//! RabbitMQ cannot route on a count by itself; doing it here keeps consumers in any
//! language down to "reject to retry".

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, message::Delivery};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Broker;
use super::amqp::{AmqpPublisher, Message, ROUTING_KEY_HEADER};
use super::topology::{delay_queue, parked_queue, rejected_queue, retry_exchange};

/// Header counting how often consumers rejected a message.
pub const RETRIES_HEADER: &str = "x-hookrelay-retries";

/// Where one rejected message goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHop {
    /// A delay queue; back to the source queue after its TTL.
    Delay(String),
    /// The parking queue.
    Parked(String),
}

/// The decision, pure: `retries` counts this rejection too.
pub fn next_hop(
    exchange: &str,
    source: &str,
    delays: &[Duration],
    delivery_limit: u32,
    retries: u32,
) -> NextHop {
    if retries >= delivery_limit || delays.is_empty() {
        return NextHop::Parked(parked_queue(exchange, source));
    }
    let index = (retries.saturating_sub(1) as usize).min(delays.len() - 1);
    NextHop::Delay(delay_queue(exchange, source, delays[index].as_millis()))
}

fn header_u32(headers: &FieldTable, key: &str) -> Option<u32> {
    match headers.inner().get(key)? {
        AMQPValue::LongInt(v) => u32::try_from(*v).ok(),
        AMQPValue::LongLongInt(v) => u32::try_from(*v).ok(),
        AMQPValue::ShortInt(v) => u32::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(*v),
        _ => None,
    }
}

/// The routing key the message had when it entered the source queue: our header if
/// set, else the oldest `x-death` entry's first routing key.
pub fn original_routing_key(headers: &FieldTable, current: &str) -> String {
    if let Some(AMQPValue::LongString(k)) = headers.inner().get(ROUTING_KEY_HEADER) {
        return String::from_utf8_lossy(k.as_bytes()).into_owned();
    }
    if let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death")
        && let Some(AMQPValue::FieldTable(oldest)) = deaths.as_slice().last()
        && let Some(AMQPValue::FieldArray(keys)) = oldest.inner().get("routing-keys")
        && let Some(AMQPValue::LongString(k)) = keys.as_slice().first()
    {
        return String::from_utf8_lossy(k.as_bytes()).into_owned();
    }
    current.to_owned()
}

/// Routes rejected messages of one source until shutdown.
pub async fn run(
    amqp: AmqpPublisher,
    source: String,
    delays: Vec<Duration>,
    delivery_limit: u32,
    shutdown: CancellationToken,
) {
    let exchange = amqp.exchange().to_owned();
    let queue = rejected_queue(&exchange, &source);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        // Wait for a connection.
        let link = loop {
            if let Some(link) = amqp.link() {
                break link;
            }
            tokio::select! {
                _ = amqp.wait_ready(Instant::now() + Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
        };
        let consumer = async {
            let ch = link.connection().create_channel().await?;
            ch.basic_qos(64, BasicQosOptions::default()).await?;
            ch.basic_consume(
                queue.as_str().into(),
                "hookrelay-retry-router".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        };
        let consumer = tokio::select! {
            c = consumer => c,
            _ = link.retired() => continue,
            _ = shutdown.cancelled() => return,
        };
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(error) => {
                debug!(%error, queue = %queue, "Cannot consume the rejected queue yet.");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        info!(queue = %queue, "Routing rejected messages.");
        loop {
            let delivery = tokio::select! {
                d = consumer.next() => d,
                _ = link.retired() => break,
                _ = shutdown.cancelled() => return,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    route_one(&amqp, &exchange, &source, &delays, delivery_limit, delivery).await
                }
                Some(Err(error)) => {
                    debug!(%error, "The rejected-queue consumer failed; starting over.");
                    break;
                }
                None => break,
            }
        }
    }
}

async fn route_one(
    amqp: &AmqpPublisher,
    exchange: &str,
    source: &str,
    delays: &[Duration],
    delivery_limit: u32,
    delivery: Delivery,
) {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let retries = header_u32(&headers, RETRIES_HEADER).unwrap_or(0).saturating_add(1);
    let original = original_routing_key(&headers, delivery.routing_key.as_str());
    headers.insert(RETRIES_HEADER.into(), AMQPValue::LongInt(i32::try_from(retries).unwrap_or(i32::MAX)));
    headers.insert(ROUTING_KEY_HEADER.into(), AMQPValue::LongString(original.as_str().into()));
    let props: BasicProperties = delivery.properties.clone().with_headers(headers);
    let hop = next_hop(exchange, source, delays, delivery_limit, retries);
    let target = match &hop {
        NextHop::Delay(q) | NextHop::Parked(q) => q.as_str(),
    };
    let message_id = delivery.properties.message_id().as_ref().map(ShortString::as_str).unwrap_or("");
    let retry_x = retry_exchange(exchange);
    let msg = Message { exchange: &retry_x, routing_key: target, body: &delivery.data, message_id };
    let deadline = Instant::now() + Duration::from_secs(10);
    match amqp.publish_raw(source, msg, props, deadline).await {
        Ok(()) => {
            if let NextHop::Parked(_) = hop {
                warn!(event_id = message_id, retries, "Message parked after repeated rejections.");
            } else {
                debug!(event_id = message_id, retries, queue = target, "Rejected message delayed.");
            }
            if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
                debug!(%error, "Ack of a routed message failed; it will be routed again.");
            }
        }
        Err(error) => {
            debug!(error = error.label(), "Routing a rejected message failed; requeueing it.");
            let _ = delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_escalate_then_park() {
        let d = [Duration::from_secs(10), Duration::from_secs(60)];
        let hop = |n| next_hop("x", "s", &d, 4, n);
        assert_eq!(hop(1), NextHop::Delay("x.s.delay.10000".into()));
        assert_eq!(hop(2), NextHop::Delay("x.s.delay.60000".into()));
        assert_eq!(hop(3), NextHop::Delay("x.s.delay.60000".into()));
        assert_eq!(hop(4), NextHop::Parked("x.s.parked".into()));
        assert_eq!(next_hop("x", "s", &[], 4, 1), NextHop::Parked("x.s.parked".into()));
    }

    #[test]
    fn original_key_comes_from_our_header_or_the_first_death() {
        let mut h = FieldTable::default();
        assert_eq!(original_routing_key(&h, "cur"), "cur");
        let mut death = FieldTable::default();
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString("patreon.members.create".into())].into()),
        );
        h.insert("x-death".into(), AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()));
        assert_eq!(original_routing_key(&h, "cur"), "patreon.members.create");
        h.insert(ROUTING_KEY_HEADER.into(), AMQPValue::LongString("patreon.posts.publish".into()));
        assert_eq!(original_routing_key(&h, "cur"), "patreon.posts.publish");
    }
}
