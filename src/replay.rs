//! `hookrelay replay`: moves messages from a dead-letter or parking queue, or events
//! from the spool quarantine, back to the main exchange with their original routing
//! key. Each message is removed from where it was only after the broker confirmed
//! the republished copy, so a replay killed half-way duplicates at most, never loses.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, ShortString};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};

use crate::publish::amqp::{ATTEMPTS_HEADER, REASON_HEADER, properties};
use crate::publish::drain::envelope_of;
use crate::publish::quarantine::Quarantine;
use crate::publish::retry::{RETRIES_HEADER, original_routing_key};

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Messages republished and acked (or, in a dry run, listed).
    pub moved: u64,
    /// Messages left in place because the broker did not confirm the copy.
    pub failed: u64,
}

/// One replayed message as printed.
#[derive(Debug, Clone)]
pub struct ReplayLine {
    /// Event id (`message_id`).
    pub event_id: String,
    /// The routing key it is published with.
    pub routing_key: String,
    /// Why it was dead-lettered, if the relay said.
    pub reason: String,
}

fn header_text(headers: &lapin::types::FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Replays up to `limit` messages of `queue` to `exchange`, connected to the first of
/// `urls` (one per cluster node) that accepts; `dry_run` only lists them (they stay in
/// the queue). `print` is called once per message.
pub async fn replay(
    urls: &[&str],
    exchange: &str,
    queue: &str,
    limit: Option<u64>,
    dry_run: bool,
    mut print: impl FnMut(&ReplayLine),
) -> anyhow::Result<ReplayReport> {
    let (conn, ch) = connect(urls).await?;
    let mut report = ReplayReport::default();
    // In a dry run, messages are held unacked until the end so each is listed once.
    let mut held = Vec::new();
    while limit.is_none_or(|l| report.moved + report.failed < l) {
        let Some(msg) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .with_context(|| format!("cannot read queue {queue}"))?
        else {
            break;
        };
        let delivery = msg.delivery;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let routing_key = original_routing_key(&headers, delivery.routing_key.as_str());
        let line = ReplayLine {
            event_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::to_string)
                .unwrap_or_default(),
            reason: header_text(&headers, REASON_HEADER).unwrap_or_else(|| "rejected by consumers".into()),
            routing_key: routing_key.clone(),
        };
        print(&line);
        if dry_run {
            report.moved += 1;
            held.push(delivery);
            continue;
        }
        // A replayed event starts over: fresh retries, no relay verdict.
        let mut kept = lapin::types::FieldTable::default();
        for (k, v) in headers.inner() {
            if ![RETRIES_HEADER, REASON_HEADER, ATTEMPTS_HEADER].contains(&k.as_str()) {
                kept.insert(k.clone(), v.clone());
            }
        }
        let headers = kept;
        let props = delivery.properties.clone().with_headers(headers);
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let confirm = ch
            .basic_publish(exchange.into(), routing_key.as_str().into(), options, &delivery.data, props)
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => {
                delivery.ack(BasicAckOptions::default()).await?;
                report.moved += 1;
            }
            _ => {
                delivery.reject(BasicRejectOptions { requeue: true }).await?;
                report.failed += 1;
                // The same message would come back first and fail again.
                break;
            }
        }
    }
    for delivery in held {
        delivery.reject(BasicRejectOptions { requeue: true }).await?;
    }
    let _ = conn.close(200, "replay done".into()).await;
    if report.failed > 0 {
        bail!(
            "{} message(s) could not be replayed (the broker did not confirm); they stay in {queue}",
            report.failed
        );
    }
    Ok(report)
}

/// A connection to the first of `urls` that accepts, and a confirm-mode channel.
async fn connect(urls: &[&str]) -> anyhow::Result<(Connection, Channel)> {
    let mut connected = None;
    for url in urls {
        let props = ConnectionProperties::default().with_connection_name("hookrelay-replay".into());
        match tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, props)).await {
            Ok(Ok(conn)) => {
                connected = Some(conn);
                break;
            }
            Ok(Err(_)) | Err(_) => continue,
        }
    }
    let Some(conn) = connected else {
        bail!("cannot connect to the broker ({} URL(s) tried; none accepted within 10 s)", urls.len());
    };
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

/// Replays up to `limit` events of the spool quarantine in `spool_dir` to
/// `exchange`, oldest first; `dry_run` only lists them. Each leaves the quarantine
/// only once the broker confirmed it; the first one still refused stops the replay
/// (it and those behind it stay). Works while the relay runs: the quarantine has its
/// own lock, which the relay takes only for a moment per quarantined event.
pub async fn replay_quarantine(
    urls: &[&str],
    exchange: &str,
    spool_dir: &std::path::Path,
    limit: Option<u64>,
    dry_run: bool,
    mut print: impl FnMut(&ReplayLine),
) -> anyhow::Result<ReplayReport> {
    let quarantine = Quarantine::new(spool_dir);
    let mut report = ReplayReport::default();
    if !quarantine.dir().exists() {
        return Ok(report);
    }
    let (conn, ch) =
        if dry_run { (None, None) } else { connect(urls).await.map(|(c, h)| (Some(c), Some(h)))? };
    let held = quarantine.open(Duration::from_secs(10)).await.context("opening the spool quarantine")?;
    let max = usize::try_from(limit.unwrap_or(u64::MAX)).unwrap_or(usize::MAX);
    let batch = held.spool.peek_batch(max).await.context("reading the spool quarantine")?;
    let mut last_done = None;
    for (pos, record) in &batch {
        print(&ReplayLine {
            event_id: record.event_id.clone(),
            routing_key: record.routing_key.clone(),
            reason: "refused while draining the spool".into(),
        });
        let Some(ch) = &ch else {
            report.moved += 1;
            continue;
        };
        let env = envelope_of(record);
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let confirm = ch
            .basic_publish(
                exchange.into(),
                env.routing_key.as_str().into(),
                options,
                &env.body,
                properties(&env),
            )
            .await?
            .await?;
        if !matches!(confirm, Confirmation::Ack(None)) {
            report.failed += 1;
            break;
        }
        report.moved += 1;
        last_done = Some(*pos);
    }
    if let Some(pos) = last_done {
        held.spool.remove_through(pos).await.context("removing replayed events from the quarantine")?;
    }
    held.close().await;
    if let Some(conn) = conn {
        let _ = conn.close(200, "replay done".into()).await;
    }
    if report.failed > 0 {
        bail!(
            "an event is still refused by the broker; it and the {} behind it stay in {}",
            batch.len() as u64 - report.moved - 1,
            quarantine.dir().display()
        );
    }
    Ok(report)
}
