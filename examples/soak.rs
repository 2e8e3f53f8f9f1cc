//! Soak: sends N signed webhooks through a relay whose broker connection is cut
//! again and again, then counts what arrived. Loopback only; bounded in count and
//! time; stops by itself.
//!
//! ```sh
//! cargo run --release --example soak -- --events 100000 --concurrency 32 --cut-every-ms 1000 \
//!     --blackhole-every-ms 3000 --blackhole-ms 2500
//! ```
//!
//! With `--blackhole-every-ms`, silent faults are mixed in: every so often the live
//! connection goes silent for good (or, every other time, half-open) for
//! `--blackhole-ms`, with no cut meanwhile, and new connections are held until the
//! path is back (see `tests/it/proxy.rs`).
//!
//! Prints: sent, answered 2xx, found, lost (2xx but not in the queue: must be 0),
//! duplicates (same event id twice; expected after cuts, dropped by consumers), the
//! cuts and silences, connection replacements by cause, and answer times.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/it/proxy.rs"]
mod proxy;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use proxy::{FaultProxy, Mode};
use tokio::net::TcpStream;
use tokio::time::Instant;

const SECRET: &str = "soak-secret-NOT-REAL";

struct Args {
    events: u64,
    concurrency: u64,
    cut_every: Duration,
    blackhole_every: Option<Duration>,
    blackhole: Duration,
    max_seconds: u64,
    amqp: String,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        events: 100_000,
        concurrency: 32,
        cut_every: Duration::from_millis(1000),
        blackhole_every: None,
        blackhole: Duration::from_millis(2500),
        max_seconds: 600,
        amqp: "127.0.0.1:5672".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => a.events = value.parse()?,
            "--concurrency" => a.concurrency = value.parse()?,
            "--cut-every-ms" => a.cut_every = Duration::from_millis(value.parse()?),
            "--blackhole-every-ms" => a.blackhole_every = Some(Duration::from_millis(value.parse()?)),
            "--blackhole-ms" => a.blackhole = Duration::from_millis(value.parse()?),
            "--max-seconds" => a.max_seconds = value.parse()?,
            "--broker" => a.amqp = value,
            other => anyhow::bail!(
                "unknown flag {other} (--events, --concurrency, --cut-every-ms, --blackhole-every-ms, \
                 --blackhole-ms, --max-seconds, --broker HOST:PORT)"
            ),
        }
    }
    Ok(a)
}

/// Runs `fault(n)` (n = 1, 2, …) every `every` while `sending` holds.
async fn periodically<F, Fut>(every: Duration, sending: Arc<AtomicBool>, mut fault: F)
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut n = 0u64;
    while sending.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        if !sending.load(Ordering::Relaxed) {
            break;
        }
        n += 1;
        fault(n).await;
    }
}

async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let text = get(admin, "/metrics").await.ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let stream = TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = tx.send_request(Request::get(path).header("host", "x").body(Full::new(Bytes::new()))?).await?;
    Ok(String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let upstream: SocketAddr = args.amqp.parse().context("--broker must be HOST:PORT on this machine")?;
    anyhow::ensure!(upstream.ip().is_loopback(), "the soak only targets loopback");
    let proxy = Arc::new(FaultProxy::start(upstream).await?);
    let exchange = format!("soak-{}", std::process::id());
    let spool = std::env::temp_dir().join(format!("hookrelay-soak-{}", std::process::id()));
    let toml = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\nmax_connections = 4096\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [amqp]\nurl = \"{}\"\nexchange = \"{exchange}\"\npublish_timeout_ms = 2000\nreconnect_initial_ms = 50\n\
         reconnect_max_ms = 1000\n[spool]\ndir = \"{}\"\n[log]\nlevel = \"error\"\n\
         [sources.patreon]\nkind = \"patreon\"\nsecrets = \"{SECRET}\"\n",
        proxy.amqp_url(),
        spool.display()
    );
    let config = hookrelay::config::load(Some(&toml), &HashMap::new())?.validate()?;
    hookrelay::telemetry::init(config.log_format, &config.log_level);
    let topology = hookrelay::topology_for(&config);
    let ingest_l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin_l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (ingest, admin) = (ingest_l.local_addr()?, admin_l.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(hookrelay::run(config, ingest_l, admin_l, async move {
        let _ = stop_rx.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    while metric(admin, "hookrelay_broker_connected").await != Some(1.0) {
        anyhow::ensure!(Instant::now() < deadline, "relay never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let sending = Arc::new(AtomicBool::new(true));
    // While a silence lasts, no cut.
    let silenced = Arc::new(tokio::sync::Mutex::new(()));
    let silencer = args.blackhole_every.map(|every| {
        let (proxy, silenced, length) = (proxy.clone(), silenced.clone(), args.blackhole);
        tokio::spawn(periodically(every, sending.clone(), move |n| {
            let (proxy, silenced) = (proxy.clone(), silenced.clone());
            async move {
                let _quiet = silenced.lock().await;
                if n.is_multiple_of(2) {
                    proxy.half_open_live()
                } else {
                    proxy.silence_live()
                }
                tokio::time::sleep(length).await;
                proxy.set(Mode::Pass);
            }
        }))
    });
    let cutter = {
        let (proxy, silenced, every) = (proxy.clone(), silenced.clone(), args.cut_every);
        tokio::spawn(periodically(every, sending.clone(), move |n| {
            let (proxy, silenced) = (proxy.clone(), silenced.clone());
            async move {
                // Skipped during a silence (a cut would end it early), not postponed to
                // its end, where it would only hit the relay's reconnect.
                let Ok(_cutting) = silenced.try_lock() else { return };
                if n.is_multiple_of(4) {
                    // Every fourth cut is an outage: refuse reconnects for a while.
                    proxy.set(Mode::Refuse);
                    proxy.drop_all();
                    tokio::time::sleep(every / 2).await;
                    proxy.set(Mode::Pass);
                } else {
                    proxy.drop_all();
                }
            }
        }))
    };
    let mut senders = Vec::new();
    for _ in 0..args.concurrency {
        let next = next.clone();
        let total = args.events;
        senders.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut other = 0u64;
            let mut latencies = Vec::new();
            let mut conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total || Instant::now() >= deadline {
                    break;
                }
                let body = format!(r#"{{"data":{{"id":"soak-{n}","type":"member"}},"n":{n}}}"#);
                let sig = hookrelay::verify::patreon::sign(SECRET.as_bytes(), body.as_bytes());
                if conn.as_ref().is_none_or(|c| c.is_closed()) {
                    let Ok(stream) = TcpStream::connect(ingest).await else {
                        other += 1;
                        continue;
                    };
                    let Ok((tx, c)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                    else {
                        other += 1;
                        continue;
                    };
                    tokio::spawn(c);
                    conn = Some(tx);
                }
                let Some(tx) = conn.as_mut() else { continue };
                let req = Request::post("/webhooks/patreon")
                    .header("host", "x")
                    .header("x-patreon-event", "members:create")
                    .header("x-patreon-signature", sig)
                    .body(Full::new(Bytes::from(body)))
                    .expect("valid request");
                let t0 = Instant::now();
                let answer = tx.send_request(req).await;
                latencies.push(t0.elapsed());
                match answer {
                    Ok(resp) if resp.status() == 200 => {
                        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        match v["id"].as_str() {
                            Some(id) => accepted.push(id.to_owned()),
                            None => other += 1,
                        }
                    }
                    _ => other += 1,
                }
            }
            (accepted, other, latencies)
        }));
    }
    let mut accepted = Vec::new();
    let mut other = 0;
    let mut latencies = Vec::new();
    for s in senders {
        let (a, o, l) = s.await?;
        accepted.extend(a);
        other += o;
        latencies.extend(l);
    }
    latencies.sort();
    let pct = |p: usize| latencies.get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)));
    let ms = |d: Option<&Duration>| d.map_or(0, Duration::as_millis);
    let (p50, p99, p999, max) =
        (ms(pct(50)), ms(pct(99)), ms(latencies.get(latencies.len() * 999 / 1000)), ms(latencies.last()));
    let send_secs = started.elapsed().as_secs_f64();
    sending.store(false, Ordering::Relaxed);
    cutter.await?;
    if let Some(silencer) = silencer {
        silencer.await?;
    }
    proxy.set(Mode::Pass);
    let cuts = proxy.cuts();
    let silences = proxy.silences();
    let sent = next.load(Ordering::Relaxed).min(args.events);

    // Let the spool drain, then count what arrived.
    while metric(admin, "hookrelay_spool_events").await != Some(0.0)
        || metric(admin, "hookrelay_broker_connected").await != Some(1.0)
    {
        anyhow::ensure!(Instant::now() < deadline + Duration::from_secs(120), "spool did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spooled = metric(admin, "hookrelay_spooled_total{source=\"patreon\"}").await.unwrap_or(0.0);
    let replaced = |cause: &'static str| {
        metric(
            admin,
            match cause {
                "heartbeat" => "hookrelay_broker_connection_replacements_total{cause=\"heartbeat\"}",
                "confirm_timeout" => {
                    "hookrelay_broker_connection_replacements_total{cause=\"confirm_timeout\"}"
                }
                _ => "hookrelay_broker_connection_replacements_total{cause=\"closed\"}",
            },
        )
    };
    let (by_heartbeat, by_confirm, by_close) =
        (replaced("heartbeat").await, replaced("confirm_timeout").await, replaced("closed").await);
    let quarantined = metric(admin, "hookrelay_spool_quarantined_total").await.unwrap_or(0.0);
    let conn =
        lapin::Connection::connect(&format!("amqp://guest:guest@{upstream}/%2f"), Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(2000, BasicQosOptions::default()).await?;
    let queue = format!("{exchange}.patreon");
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "soak".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let want: HashSet<&String> = accepted.iter().collect();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut found = 0usize;
    loop {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await else {
            break;
        };
        let id = d.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
        let count = seen.entry(id.clone()).or_default();
        *count += 1;
        if *count == 1 && want.contains(&id) {
            found += 1;
        }
        d.ack(BasicAckOptions::default()).await?;
    }
    let duplicates: u32 = seen.values().map(|c| c - 1).sum();
    let lost = want.len() - found;
    println!(
        "sent={sent} answered_2xx={} answered_other={other} found={found} lost={lost} duplicates={duplicates} \
         connection_cuts={cuts} silences={silences} replaced_confirm_timeout={} replaced_heartbeat={} \
         replaced_closed={} spooled={spooled} quarantined={quarantined} answer_ms_p50={p50} answer_ms_p99={p99} \
         answer_ms_p999={p999} answer_ms_max={max} send_seconds={send_secs:.1} events_per_second={:.0}",
        accepted.len(),
        by_confirm.unwrap_or(0.0),
        by_heartbeat.unwrap_or(0.0),
        by_close.unwrap_or(0.0),
        sent as f64 / send_secs
    );

    let _ = stop_tx.send(());
    relay.await??;
    let ch = conn.create_channel().await?;
    for q in &topology.queues {
        let _ = ch.queue_delete(q.name.as_str().into(), Default::default()).await;
    }
    for e in &topology.exchanges {
        let _ = ch.exchange_delete(e.name.as_str().into(), Default::default()).await;
    }
    let _ = std::fs::remove_dir_all(&spool);
    anyhow::ensure!(lost == 0, "{lost} accepted events were lost");
    Ok(())
}
