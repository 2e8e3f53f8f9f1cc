//! The broker's own limit: a lapin publisher sending the relay's envelope bytes with
//! the relay's properties (persistent, mandatory, confirms), keeping exactly W
//! publishes in flight, spread over N confirm-mode channels. Each in-flight slot awaits
//! only its own confirm, as a relay request does.
//!
//! A [`Variant`] changes one thing about what is published (headers, `mandatory`, the
//! payload), so the broker's cost of each can be measured alone, in the same run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::time::{Instant, timeout};

use crate::messages::Workload;
use crate::stats::WorkerLog;
use crate::window::Window;

/// Longest one publish and its confirm may take before it counts as failed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// What the raw publisher sends, relative to what the relay sends (`std`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    /// The name given on the command line, e.g. `nohdr+nomand`.
    pub name: String,
    /// Without the `cloudEvents_*` application headers.
    pub no_headers: bool,
    /// With `mandatory` off.
    pub no_mandatory: bool,
    /// The request body instead of the envelope.
    pub body: bool,
    /// Only `delivery_mode = 2`, no other property (what the bare relay sends).
    pub minimal: bool,
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut v = Variant {
            name: s.to_owned(),
            no_headers: false,
            no_mandatory: false,
            body: false,
            minimal: false,
        };
        for part in s.split('+') {
            match part {
                "std" => {}
                "nohdr" => v.no_headers = true,
                "nomand" => v.no_mandatory = true,
                "body" => v.body = true,
                "min" => v.minimal = true,
                other => {
                    return Err(format!(
                        "`{other}`: raw variants are std, nohdr, nomand, body, min, joined with +"
                    ));
                }
            }
        }
        Ok(v)
    }
}

impl Variant {
    /// The payload and properties of message `m` in this variant.
    fn message<'a>(&self, m: &'a crate::messages::Message) -> (&'a [u8], BasicProperties) {
        let payload = if self.body { &m.body[..] } else { &m.envelope.body[..] };
        let props = if self.minimal {
            BasicProperties::default().with_delivery_mode(2)
        } else if self.no_headers {
            // The relay's properties (publish::amqp::properties) without the headers table.
            let env = &m.envelope;
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(hookrelay::envelope::CONTENT_TYPE.into())
                .with_message_id(env.id.as_str().into())
                .with_timestamp(env.unix_seconds)
                .with_type(env.ce_type.as_str().into())
                .with_app_id(hookrelay::publish::amqp::APP_ID.into())
        } else {
            m.properties.clone()
        };
        (payload, props)
    }
}

/// One raw measurement's setting.
pub struct Setting<'a> {
    /// Exchange to publish to.
    pub exchange: &'a str,
    /// What to send.
    pub variant: &'a Variant,
    /// Confirm-mode channels, shared round-robin by the in-flight slots.
    pub channels: usize,
    /// Publishes outstanding at any time (W).
    pub in_flight: usize,
}

/// What every worker of one measurement shares.
struct Shared {
    exchange: String,
    options: BasicPublishOptions,
    /// Payload, routing key and properties of each message, in sending order.
    messages: Vec<(Vec<u8>, String, BasicProperties)>,
}

/// Publishes as `setting` says until the window ends, at most `cap` publishes in all.
pub async fn run(
    conn: &Connection,
    setting: Setting<'_>,
    work: Arc<Workload>,
    window: Window,
    cap: u64,
) -> anyhow::Result<Vec<WorkerLog>> {
    let Setting { exchange, variant, channels, in_flight } = setting;
    let mut pool: Vec<Channel> = Vec::with_capacity(channels);
    for _ in 0..channels.max(1) {
        let ch = conn.create_channel().await.context("opening a publisher channel")?;
        ch.confirm_select(ConfirmSelectOptions::default()).await.context("confirm.select")?;
        pool.push(ch);
    }
    let shared = Arc::new(Shared {
        exchange: exchange.to_owned(),
        options: BasicPublishOptions { mandatory: !variant.no_mandatory, immediate: false },
        messages: work
            .messages
            .iter()
            .map(|m| {
                let (payload, props) = variant.message(m);
                (payload.to_vec(), m.envelope.routing_key.clone(), props)
            })
            .collect(),
    });
    let per_worker = (cap / in_flight.max(1) as u64).max(1);
    let mut tasks = Vec::with_capacity(in_flight);
    for k in 0..in_flight {
        let ch = pool[k % pool.len()].clone();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move { worker(ch, &shared, k, in_flight, window, per_worker).await }));
    }
    let mut logs = Vec::with_capacity(in_flight);
    for t in tasks {
        logs.push(t.await.context("a publisher task panicked")?);
    }
    for ch in pool {
        let _ = ch.close(200, "measured".into()).await;
    }
    Ok(logs)
}

async fn worker(
    ch: Channel,
    shared: &Shared,
    first: usize,
    stride: usize,
    window: Window,
    cap: u64,
) -> WorkerLog {
    let mut log = WorkerLog::default();
    let Shared { exchange, options, messages } = shared;
    let mut i = first;
    let mut sent = 0u64;
    while sent < cap && Instant::now() < window.end {
        let (payload, routing_key, props) = &messages[i % messages.len()];
        i += stride;
        sent += 1;
        let began = Instant::now();
        let outcome = timeout(CONFIRM_TIMEOUT, async {
            let confirm = ch
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    *options,
                    payload,
                    props.clone(),
                )
                .await?;
            confirm.await
        })
        .await;
        let done = Instant::now();
        // A failed publish or a missing confirm ends this publisher's loop; a return or
        // a nack is counted and the loop goes on.
        let (problem, fatal): (String, bool) = match outcome {
            Ok(Ok(Confirmation::Ack(None))) => {
                log.succeed(&window, began, done);
                continue;
            }
            Ok(Ok(Confirmation::Ack(Some(_)))) => ("the broker returned a message".into(), false),
            Ok(Ok(Confirmation::Nack(_))) => ("the broker nacked a message".into(), false),
            Ok(Ok(Confirmation::NotRequested)) => ("the channel is not in confirm mode".into(), false),
            Ok(Err(e)) => (format!("publish failed: {e}"), true),
            Err(_) => (format!("no confirm within {CONFIRM_TIMEOUT:?}"), true),
        };
        log.fail(|| problem);
        if fatal {
            break;
        }
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_and_combine() {
        let std: Variant = "std".parse().unwrap();
        assert!(!std.no_headers && !std.no_mandatory && !std.body && !std.minimal);
        let both: Variant = "nohdr+nomand".parse().unwrap();
        assert!(both.no_headers && both.no_mandatory && !both.body && !both.minimal);
        assert_eq!(both.name, "nohdr+nomand");
        let min: Variant = "body+min".parse().unwrap();
        assert!(min.body && min.minimal);
        assert!("nohdr+bogus".parse::<Variant>().is_err());
        assert!("".parse::<Variant>().is_err());
    }
}
