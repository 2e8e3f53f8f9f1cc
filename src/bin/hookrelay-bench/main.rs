//! `hookrelay-bench`: hookrelay end to end beside the broker's own limit, in one run.
//!
//! Against the local RabbitMQ, with the relay's own topology (durable quorum queues)
//! and the relay's own envelope bytes and properties, it alternates two measurements
//! at equal concurrency and repeats them:
//! - raw: a lapin publisher, persistent + mandatory + confirms, W in flight, on 1 and
//!   on N channels — what the broker can take on this machine;
//! - bare: a minimal hyper → lapin relay (this binary with `--serve-bare`, see
//!   `bare.rs`) publishing each body with confirms: the cost any relay pays;
//! - relay: the release `hookrelay` binary as a child process, driven by C keep-alive
//!   HTTP/1.1 connections posting signed Patreon deliveries.
//!
//! CPU per event (utime + stime from /proc over the measured window, divided by the
//! events in it) of the relay, the bare relay, the load generator and the broker is
//! the figure to judge changes by on a shared machine; events/s is noisier.
//!
//! Every acknowledged event is counted in its queue afterwards (speed never from
//! dropped work), then the queue is purged; everything declared is deleted at the end.
//! It prints medians over the rounds, same-round comparisons, start-up time and memory.
//!
//! A benchmark binary rather than a cargo example because it needs nothing the relay
//! does not already depend on, except hyper's client half (which the relay binary never
//! links), and `cargo run --release --bin hookrelay-bench` builds it beside the binary
//! it measures.

mod args;
mod bare;
mod broker;
mod load;
mod messages;
mod procfs;
mod raw;
mod relay;
mod report;
mod stats;
mod window;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use lapin::Connection;
use tokio::time::sleep_until;

use crate::args::{Args, Side};
use crate::messages::{SOURCE, Workload};
use crate::raw::Variant;
use crate::relay::{RelaySetup, Startup};
use crate::report::{mib, ms};
use crate::stats::{Sample, WorkerLog, us_per_event};
use crate::window::Window;

/// Hard cap on events in one measurement, whatever the duration.
const MAX_EVENTS_PER_MEASUREMENT: u64 = 2_000_000;

/// What is measured in one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// The lapin publisher sending `--raw-variants[variant]` on this many channels.
    Raw { variant: usize, channels: usize },
    /// The bare relay.
    Bare,
    /// hookrelay.
    Relay,
    /// The second relay (`--b-bin`, `--b-channels`).
    RelayB,
}

impl Kind {
    fn label(self, level: usize, variants: &[Variant]) -> String {
        match self {
            Kind::Raw { variant, channels } => {
                let name = variants.get(variant).map_or("?", |v| v.name.as_str());
                format!("raw {name} W={level} ch={channels}")
            }
            Kind::Bare => format!("bare  C={level}"),
            Kind::Relay => format!("relay C={level}"),
            Kind::RelayB => format!("relayB C={level}"),
        }
    }

    /// The raw reference at `level` for a given channel count.
    fn reference(level: usize, channels: usize) -> Kind {
        Kind::Raw { variant: 0, channels: if level > 1 { channels } else { 1 } }
    }
}

/// Processes whose CPU time a measurement records.
#[derive(Debug, Clone, Copy)]
struct Watched {
    relay: Option<u32>,
    broker: Option<u32>,
    me: u32,
}

fn main() -> ExitCode {
    let args = Args::parse_settled();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hookrelay-bench: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    if args.serve_bare {
        return match runtime.block_on(bare::serve(&args.amqp_url, &args.bare_exchange)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hookrelay-bench (bare relay): {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("hookrelay-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Everything one run records.
#[derive(Default)]
struct Results {
    samples: BTreeMap<(usize, Kind), Vec<Sample>>,
    /// Per level, one entry per round: every sample of that round, for same-round comparisons.
    rounds: BTreeMap<usize, Vec<BTreeMap<Kind, Sample>>>,
    startups: Vec<Startup>,
    replays: Vec<broker::ConnectSteps>,
    stops: Vec<Duration>,
}

async fn run(args: Args) -> anyhow::Result<bool> {
    args.validate()?;
    let relay_bin = match &args.relay_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this binary")?.with_file_name("hookrelay"),
    };
    if !relay_bin.is_file() {
        bail!("no relay binary at {}; build it with `cargo build --release --bins`", relay_bin.display());
    }
    report::warn_if_stale(&relay_bin);
    let work = Workload::load(&args.fixtures, args.size)?;
    let run_id = format!("hrbench-{}-{:04x}", std::process::id(), fastrand::u16(..));
    let temp = std::env::temp_dir().join(&run_id);
    std::fs::create_dir_all(&temp).with_context(|| format!("creating {}", temp.display()))?;

    let setup = RelaySetup {
        bin: relay_bin,
        url: args.amqp_url.clone(),
        exchange: format!("{run_id}-relay"),
        channels: args.channels,
        extra_secrets: args.extra_secrets,
        spool: !args.no_spool,
        dir: temp.clone(),
    };
    let raw_setup = RelaySetup { exchange: format!("{run_id}-raw"), ..setup.clone() };
    let setup_b = (args.b_bin.is_some() || args.b_channels.is_some()).then(|| RelaySetup {
        bin: args.b_bin.clone().unwrap_or_else(|| setup.bin.clone()),
        channels: args.b_channels.unwrap_or(args.channels),
        dir: temp.join("b"),
        ..setup.clone()
    });
    if let Some(b) = &setup_b {
        std::fs::create_dir_all(&b.dir).with_context(|| format!("creating {}", b.dir.display()))?;
    }
    let relay_topology = setup.topology()?;
    let raw_topology = raw_setup.topology()?;
    let admin = broker::connect(&args.amqp_url, "hookrelay-bench").await?;
    broker::declare_topology(&admin, &raw_topology).await?;

    report::print_header(&args, &setup, &work);
    let mut results = Results::default();
    let mut startup_topologies = Vec::new();
    let setups = Setups { relay: &setup, b: setup_b.as_ref(), raw: &raw_setup };
    let outcome = measure_all(&args, &admin, setups, &work, &mut results, &mut startup_topologies).await;

    // Clean up whatever happened above.
    let mut problems = broker::delete_topology(&admin, &raw_topology).await;
    problems.extend(broker::delete_topology(&admin, &relay_topology).await);
    for t in &startup_topologies {
        problems.extend(broker::delete_topology(&admin, t).await);
    }
    for p in &problems {
        eprintln!("cleanup: {p}");
    }
    let _ = admin.close(200, "bench done".into()).await;
    if args.keep_temp {
        println!("\nrelay configs and logs kept in {}", temp.display());
    } else {
        let _ = std::fs::remove_dir_all(&temp);
    }
    outcome?;
    Ok(report::report(&args, &results))
}

/// How each side is configured.
#[derive(Clone, Copy)]
struct Setups<'a> {
    relay: &'a RelaySetup,
    b: Option<&'a RelaySetup>,
    raw: &'a RelaySetup,
}

/// Rounds × levels × kinds, raw and relay alternating, the order flipped every round.
async fn measure_all(
    args: &Args,
    admin: &Connection,
    setups: Setups<'_>,
    work: &Arc<Workload>,
    results: &mut Results,
    startup_topologies: &mut Vec<hookrelay::publish::topology::Topology>,
) -> anyhow::Result<()> {
    let Setups { relay: setup, b: setup_b, raw: raw_setup } = setups;
    let broker_pid = broker_port(&args.amqp_url).and_then(procfs::listener_pid);
    let me = std::process::id();
    let window_len = Duration::from_secs_f64(args.duration_secs);
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let relay_queue = hookrelay::publish::topology::source_queue(&setup.exchange, SOURCE);
    let raw_queue = hookrelay::publish::topology::source_queue(&raw_setup.exchange, SOURCE);

    for round in 0..args.rounds {
        // The relay's broker steps, replayed by the bench on a fresh topology.
        let fresh = RelaySetup { exchange: format!("{}-startup{round}", setup.exchange), ..setup.clone() };
        let fresh_topology = fresh.topology()?;
        startup_topologies.push(fresh_topology.clone());
        results.replays.push(broker::replay_connect(&args.amqp_url, &fresh_topology, args.channels).await?);

        let (relay, startup) = relay::start(setup, round).await?;
        let relay_b = match setup_b {
            Some(b) => Some(relay::start(b, round).await?.0),
            None => None,
        };
        let bare = if args.only.contains(&Side::Bare) {
            let me = std::env::current_exe().context("locating this binary")?;
            Some(bare::start(&me, &args.amqp_url, &raw_setup.exchange).await?)
        } else {
            None
        };
        println!(
            "round {}: relay pid {} ready in {:.1} ms ({} topology), idle RSS {}",
            round + 1,
            relay.pid,
            ms(startup.to_ready),
            if round == 0 { "fresh" } else { "existing" },
            mib(startup.idle_rss)
        );
        results.startups.push(startup);
        broker::purge(admin, &relay_queue).await?;
        let watched = Watched { relay: Some(relay.pid), broker: broker_pid, me };

        let measured = async {
            for &level in &args.concurrency {
                let kinds = plan(args, level, round);
                let mut this_round: BTreeMap<Kind, Sample> = BTreeMap::new();
                for kind in kinds {
                    let window = Window::after(warmup, window_len);
                    let sample = match kind {
                        Kind::Raw { variant, channels } => {
                            let mut sample = measure(watched_raw(watched), window, async {
                                let conn = broker::connect(&args.amqp_url, "hookrelay-bench-raw").await?;
                                let setting = raw::Setting {
                                    exchange: &raw_setup.exchange,
                                    variant: &args.raw_variants[variant],
                                    channels,
                                    in_flight: level,
                                };
                                let logs = raw::run(
                                    &conn,
                                    setting,
                                    work.clone(),
                                    window,
                                    MAX_EVENTS_PER_MEASUREMENT,
                                )
                                .await;
                                let _ = conn.close(200, "measured".into()).await;
                                logs
                            })
                            .await?;
                            count_and_purge(admin, &raw_queue, &mut sample).await?;
                            sample
                        }
                        Kind::Bare => {
                            let Some(bare) = &bare else { continue };
                            let run =
                                load::run(bare.addr, level, work.clone(), window, MAX_EVENTS_PER_MEASUREMENT);
                            let watched = Watched { relay: Some(bare.pid), ..watched };
                            let mut sample = measure(watched, window, run).await?;
                            count_and_purge(admin, &raw_queue, &mut sample).await?;
                            sample
                        }
                        Kind::Relay | Kind::RelayB => {
                            let relay =
                                if kind == Kind::Relay { &relay } else { relay_b.as_ref().unwrap_or(&relay) };
                            let watched = Watched { relay: Some(relay.pid), ..watched };
                            let reset = procfs::reset_peak_rss(relay.pid);
                            let run = load::run(
                                relay.ingest,
                                level,
                                work.clone(),
                                window,
                                MAX_EVENTS_PER_MEASUREMENT,
                            );
                            let mut sample = measure(watched, window, run).await?;
                            sample.relay_peak_rss = if reset { procfs::peak_rss(relay.pid) } else { None };
                            count_and_purge(admin, &relay_queue, &mut sample).await?;
                            sample
                        }
                    };
                    println!("  {}", report::row(&kind.label(level, &args.raw_variants), &sample, None));
                    this_round.insert(kind, sample.clone());
                    results.samples.entry((level, kind)).or_default().push(sample);
                }
                results.rounds.entry(level).or_default().push(this_round);
            }
            anyhow::Ok(())
        }
        .await;
        if let Some(bare) = bare {
            bare.stop().await;
        }
        if let Some(b) = relay_b {
            let _ = b.stop().await;
        }
        let stopped = relay.stop().await;
        measured?;
        results.stops.push(stopped?);
    }
    Ok(())
}

/// The settings of one level in one round: raw variants × channel counts, bare, relay;
/// the order flips every other round.
fn plan(args: &Args, level: usize, round: usize) -> Vec<Kind> {
    let mut kinds = Vec::new();
    if args.only.contains(&Side::Raw) {
        for variant in 0..args.raw_variants.len() {
            let mut channels: Vec<usize> = if level > 1 { args.raw_channels.clone() } else { vec![1] };
            channels.dedup();
            kinds.extend(channels.into_iter().map(|channels| Kind::Raw { variant, channels }));
        }
    }
    if args.only.contains(&Side::Bare) {
        kinds.push(Kind::Bare);
    }
    if args.only.contains(&Side::Relay) {
        kinds.push(Kind::Relay);
        if args.b_bin.is_some() || args.b_channels.is_some() {
            kinds.push(Kind::RelayB);
        }
    }
    if round % 2 == 1 {
        kinds.reverse();
    }
    kinds
}

/// The raw publisher runs inside the bench: there is no relay process to watch.
fn watched_raw(w: Watched) -> Watched {
    Watched { relay: None, ..w }
}

/// Runs `work` and records CPU time of the watched processes across the window.
async fn measure<F>(watched: Watched, window: Window, work: F) -> anyhow::Result<Sample>
where
    F: std::future::Future<Output = anyhow::Result<Vec<WorkerLog>>>,
{
    let read = |pid: Option<u32>| pid.and_then(procfs::cpu_seconds);
    let sampler = async {
        sleep_until(window.start).await;
        let before = (read(watched.relay), read(watched.broker), read(Some(watched.me)));
        sleep_until(window.end).await;
        let after = (read(watched.relay), read(watched.broker), read(Some(watched.me)));
        (before, after)
    };
    let (logs, (before, after)) = tokio::join!(work, sampler);
    let mut sample = stats::merge(logs?, window.length());
    let events = sample.events_per_sec * window.length().as_secs_f64();
    sample.relay_cpu_us = us_per_event(before.0, after.0, events);
    sample.broker_cpu_us = us_per_event(before.1, after.1, events);
    sample.bench_cpu_us = us_per_event(before.2, after.2, events);
    Ok(sample)
}

/// Checks that the queue holds every acknowledged event, then empties it.
async fn count_and_purge(admin: &Connection, queue: &str, sample: &mut Sample) -> anyhow::Result<()> {
    sample.in_queue = broker::settle_depth(admin, queue, sample.succeeded).await?;
    broker::purge(admin, queue).await
}

fn broker_port(url: &str) -> Option<u16> {
    let host = url.split('@').next_back()?.split('/').next()?;
    Some(host.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(5672))
}
