//! Example hookrelay consumer: RabbitMQ -> CloudEvent -> (re-verify) -> ack.
//!
//! Reads the CloudEvents that hookrelay publishes (structured mode: the whole
//! event is the JSON message body, content type `application/cloudevents+json`),
//! checks the required CloudEvents attributes, takes the webhook body's exact
//! bytes (the raw `data` member of a JSON body, or `data_base64` decoded), for a
//! Patreon event optionally recomputes the webhook's HMAC-MD5 over them, drops
//! duplicates by source and id, acks, and prints one line per delivery:
//!
//! ```text
//! event id=<id> type=<type> subject=<subject|-> deliveryid=<id|-> data=<json|base64> bytes=<n> sha256=<hex> verified=<true|false|skipped|n/a> duplicate=<true|false> hmac=<hex|->
//! ```
//!
//! and, when it stops, `consumed=<N> duplicates=<M>`. A message that is not a
//! valid CloudEvent is rejected without requeue (the broker dead-letters it) and
//! printed as `invalid delivery=<tag> message_id=<id|-> error=<reason>`.
//!
//! Run with `cargo run --example consumer -- --help`; see
//! examples/consumers/rust/README.md.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use clap::Parser;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use md5::Md5;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The Patreon kind's default type prefix: only these events are re-verified
/// (Patreon signs the body alone; other kinds sign timestamps or ids too, or use
/// other algorithms, and this example does not pretend to check them).
const PATREON_TYPE_PREFIX: &str = "com.patreon.";

#[derive(Parser)]
#[command(name = "consumer", about = "Consume hookrelay CloudEvents from RabbitMQ.")]
struct Args {
    /// AMQP URL.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Queue to consume.
    #[arg(long, env = "QUEUE_NAME", default_value = "hookrelay.patreon")]
    queue: String,
    /// File holding the Patreon webhook secret, to recompute the HMAC (or give
    /// the secret itself in WEBHOOK_SECRET).
    #[arg(long, env = "WEBHOOK_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// Known X-Patreon-Signature values, one per line; a Patreon event is
    /// verified=true when its recomputed HMAC is among them.
    #[arg(long, env = "SIGNATURES_FILE")]
    signatures_file: Option<PathBuf>,
    /// Stop after this many deliveries; 0 = no limit.
    #[arg(long, env = "MAX_MESSAGES", default_value_t = 0)]
    max_messages: u64,
    /// Stop after this many seconds without a delivery; 0 = never.
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 0.0)]
    idle_timeout: f64,
    /// Unacked deliveries in flight.
    #[arg(long, default_value_t = 20)]
    prefetch: u16,
}

/// The CloudEvents 1.0 attributes this consumer reads. There is no CloudEvents
/// SDK among the crate's dependencies, so the structured-mode JSON is checked
/// here against the spec's required attributes.
#[derive(Deserialize)]
struct CloudEvent {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    ty: String,
    subject: Option<String>,
    /// hookrelay's extension attribute: the provider's delivery id, if it sent one.
    deliveryid: Option<String>,
    /// A body that is not JSON (a Slack form post), base64; a JSON body is the
    /// `data` member, which [`webhook_body`] takes from the raw bytes instead.
    data_base64: Option<String>,
}

impl CloudEvent {
    fn parse(body: &[u8]) -> Result<CloudEvent, String> {
        let event: CloudEvent = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if event.specversion != "1.0" {
            return Err(format!("unsupported specversion {:?}", event.specversion));
        }
        if event.id.is_empty() || event.source.is_empty() || event.ty.is_empty() {
            return Err("id, source and type must not be empty".into());
        }
        Ok(event)
    }
}

// --- the exact bytes of the webhook body --------------------------------------
//
// hookrelay embeds a JSON webhook body in the envelope's `data` member byte for
// byte. Parsing and re-serialising `data` would change those bytes (key order,
// spacing, escapes), so we locate the member in the raw message body instead: a
// small scanner walks the top-level object and returns everything between the
// colon after "data" and the comma or closing brace that ends the member. Any
// other body (a Slack form post) is in `data_base64`.

fn skip_ws(buf: &[u8], mut i: usize) -> usize {
    while i < buf.len() && matches!(buf[i], b' ' | b'\t' | b'\r' | b'\n') {
        i += 1;
    }
    i
}

/// `buf[i]` is an opening quote; the index just past the closing one.
fn end_of_string(buf: &[u8], mut i: usize) -> Result<usize, String> {
    i += 1;
    while i < buf.len() {
        match buf[i] {
            b'\\' => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err("unterminated string".into())
}

/// The index just past the JSON value starting at `buf[i]`.
fn end_of_value(buf: &[u8], mut i: usize) -> Result<usize, String> {
    match buf.get(i) {
        Some(b'"') => end_of_string(buf, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            while i < buf.len() {
                match buf[i] {
                    b'"' => {
                        i = end_of_string(buf, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            Err("unterminated object or array".into())
        }
        Some(_) => {
            while i < buf.len() && !matches!(buf[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n') {
                i += 1;
            }
            Ok(i)
        }
        None => Err("truncated JSON".into()),
    }
}

/// The raw bytes of the top-level `"data"` member's value, if there is one.
fn data_member_bytes(body: &[u8]) -> Result<Option<&[u8]>, String> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return Err("not a JSON object".into());
    }
    i += 1;
    loop {
        i = skip_ws(body, i);
        if i >= body.len() || body[i] == b'}' {
            return Ok(None);
        }
        let key_end = end_of_string(body, i)?;
        let key = &body[i..key_end];
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return Err("expected ':'".into());
        }
        let value_start = i + 1;
        i = skip_ws(body, end_of_value(body, skip_ws(body, value_start))?);
        if key == b"\"data\"" {
            return Ok(Some(&body[value_start..i]));
        }
        if body.get(i) == Some(&b',') {
            i += 1;
        }
    }
}

/// The webhook body's exact bytes and the member that carries them.
fn webhook_body<'a>(body: &'a [u8], event: &CloudEvent) -> Result<(Cow<'a, [u8]>, &'static str), String> {
    if let Some(data) = data_member_bytes(body)? {
        return Ok((Cow::Borrowed(data), "json"));
    }
    let encoded = event.data_base64.as_deref().ok_or("neither data nor data_base64")?;
    let decoded =
        base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|e| format!("data_base64: {e}"))?;
    Ok((Cow::Owned(decoded), "base64"))
}

fn hmac_md5_hex(secret: &[u8], data: &[u8]) -> Result<String, String> {
    let mut mac = Hmac::<Md5>::new_from_slice(secret).map_err(|e| e.to_string())?;
    mac.update(data);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

fn read_secret(args: &Args) -> Result<Option<Vec<u8>>, String> {
    if let Some(path) = &args.secret_file {
        let mut secret = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        // One secret per file; a trailing newline is not part of it.
        while matches!(secret.last(), Some(b'\n' | b'\r')) {
            secret.pop();
        }
        return Ok(Some(secret));
    }
    Ok(std::env::var("WEBHOOK_SECRET").ok().filter(|s| !s.is_empty()).map(String::into_bytes))
}

fn read_signatures(args: &Args) -> Result<Option<HashSet<String>>, String> {
    let Some(path) = &args.signatures_file else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Some(
        text.lines()
            .map(|l| l.trim().to_ascii_lowercase())
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect(),
    ))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("consumer: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<ExitCode, String> {
    let secret = read_secret(args)?;
    let known_signatures = read_signatures(args)?;
    // In-memory only, so it forgets across restarts and grows without bound:
    // fine for an example. A real consumer records processed ids durably (e.g.
    // a unique key in its database, written in the same transaction as the
    // effect) because RabbitMQ delivers at least once.
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let (mut consumed, mut duplicates) = (0u64, 0u64);

    let conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let channel = conn.create_channel().await.map_err(|e| format!("cannot open a channel: {e}"))?;
    channel.basic_qos(args.prefetch, BasicQosOptions::default()).await.map_err(|e| e.to_string())?;
    let mut consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot consume from {}: {e}", args.queue))?;

    let idle = (args.idle_timeout > 0.0).then(|| Duration::from_secs_f64(args.idle_timeout));
    let mut code = ExitCode::SUCCESS;
    loop {
        let next = async {
            match idle {
                Some(d) => tokio::time::timeout(d, consumer.next()).await.ok(),
                None => Some(consumer.next().await),
            }
        };
        let delivery = tokio::select! {
            d = next => d,
            _ = tokio::signal::ctrl_c() => None,
        };
        let delivery = match delivery {
            None => break, // idle timeout or Ctrl-C
            Some(None) => {
                eprintln!("consumer: the broker cancelled the consumer");
                code = ExitCode::FAILURE;
                break;
            }
            Some(Some(Err(e))) => {
                eprintln!("consumer: {e}");
                code = ExitCode::FAILURE;
                break;
            }
            Some(Some(Ok(d))) => d,
        };
        consumed += 1;

        let parsed = CloudEvent::parse(&delivery.data).and_then(|event| {
            let (data, carried_as) = webhook_body(&delivery.data, &event)?;
            Ok((event, data, carried_as))
        });
        let (event, data, carried_as) = match parsed {
            Ok(v) => v,
            Err(reason) => {
                let mid = delivery.properties.message_id().as_ref().map_or("-", |m| m.as_str());
                println!("invalid delivery={} message_id={mid} error={reason:?}", delivery.delivery_tag);
                delivery
                    .nack(BasicNackOptions { multiple: false, requeue: false })
                    .await
                    .map_err(|e| e.to_string())?;
                if args.max_messages > 0 && consumed >= args.max_messages {
                    break;
                }
                continue;
            }
        };

        // Ids are unique per source (CloudEvents: source + id).
        let duplicate = !seen.insert((event.source.clone(), event.id.clone()));
        if duplicate {
            duplicates += 1;
        }
        let patreon = event.ty.starts_with(PATREON_TYPE_PREFIX);
        let digest = match &secret {
            Some(s) if patreon => Some(hmac_md5_hex(s, &data)?),
            _ => None,
        };
        let verified = match (&digest, &known_signatures) {
            _ if !patreon => "n/a",
            (Some(d), Some(known)) => {
                if known.contains(d) {
                    "true"
                } else {
                    "false"
                }
            }
            _ => "skipped",
        };

        // A real consumer does its work here, for non-duplicates only, and acks
        // after the work is durable.
        println!(
            "event id={} type={} subject={} deliveryid={} data={carried_as} bytes={} sha256={} verified={verified} \
             duplicate={duplicate} hmac={}",
            event.id,
            event.ty,
            event.subject.as_deref().unwrap_or("-"),
            event.deliveryid.as_deref().unwrap_or("-"),
            data.len(),
            hex::encode(Sha256::digest(&data)),
            digest.as_deref().unwrap_or("-"),
        );
        delivery.ack(BasicAckOptions::default()).await.map_err(|e| e.to_string())?;
        if args.max_messages > 0 && consumed >= args.max_messages {
            break;
        }
    }

    println!("consumed={consumed} duplicates={duplicates}");
    // Closing returns unacked prefetched messages to the queue.
    let _ = conn.close(200, "bye".into()).await;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_member_is_sliced_byte_exact() {
        let body = br#"{"id":"x","subject":"a \"data\": trap","data": {"b":[1,{"c":"}"}], "a" : 2 } }"#;
        assert_eq!(data_member_bytes(body), Ok(Some(&br#" {"b":[1,{"c":"}"}], "a" : 2 } "#[..])));
        assert_eq!(data_member_bytes(br#"{"id":"x"}"#), Ok(None));
        assert_eq!(data_member_bytes(br#"{"data":null,"x":1}"#), Ok(Some(&b"null"[..])));
    }

    #[test]
    fn data_base64_is_decoded_to_the_exact_bytes() {
        let body = br#"{"specversion":"1.0","id":"x","source":"/webhooks/slack","type":"com.slack.command","deliveryid":"d-1","data_base64":"dD14CgD/"}"#;
        let event = CloudEvent::parse(body).unwrap();
        assert_eq!(event.deliveryid.as_deref(), Some("d-1"));
        let (data, carried_as) = webhook_body(body, &event).unwrap();
        assert_eq!((&data[..], carried_as), (&b"t=x\n\x00\xff"[..], "base64"));

        let bare = br#"{"specversion":"1.0","id":"x","source":"s","type":"t","data_base64":"!!"}"#;
        let event = CloudEvent::parse(bare).unwrap();
        assert!(webhook_body(bare, &event).is_err());
        let event = CloudEvent { data_base64: None, ..event };
        assert_eq!(webhook_body(bare, &event).err().as_deref(), Some("neither data nor data_base64"));
    }
}
