//! `hookrelay-bench`: hookrelay end to end beside the broker's own limit, in one run.
//!
//! Against the local RabbitMQ, with the relay's own topology (durable quorum queues)
//! and the relay's own envelope bytes and properties, it alternates two measurements
//! at equal concurrency and repeats them:
//! - raw: a lapin publisher, persistent + mandatory + confirms, W in flight, on 1 and
//!   on N channels — what the broker can take on this machine;
//! - relay: the release `hookrelay` binary as a child process, driven by C keep-alive
//!   HTTP/1.1 connections posting signed Patreon deliveries.
//!
//! Every acknowledged event is counted in its queue afterwards (speed never from
//! dropped work), then the queue is purged; everything declared is deleted at the end.
//! It prints medians over the rounds, same-round ratios, start-up time and memory.
//!
//! A benchmark binary rather than a cargo example because it needs nothing the relay
//! does not already depend on, except hyper's client half (which the relay binary never
//! links), and `cargo run --release --bin hookrelay-bench` builds it beside the binary
//! it measures.

mod broker;
mod load;
mod messages;
mod procfs;
mod raw;
mod relay;
mod stats;
mod window;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use lapin::Connection;
use tokio::time::sleep_until;

use crate::messages::{SOURCE, SizeMix, Workload};
use crate::relay::{RelaySetup, Startup};
use crate::stats::{Sample, WorkerLog, median, per_10k};
use crate::window::Window;

/// Hard cap on events in one measurement, whatever the duration.
const MAX_EVENTS_PER_MEASUREMENT: u64 = 2_000_000;

#[derive(Parser, Debug)]
#[command(
    name = "hookrelay-bench",
    about = "hookrelay end to end beside the raw RabbitMQ publish-with-confirms limit.",
    after_help = "Build first: cargo build --release --bins. Or run bench/run.sh."
)]
struct Args {
    /// Broker to measure against (loopback only).
    #[arg(long, env = "HOOKRELAY_BENCH_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// The relay binary (default: `hookrelay` beside this binary, i.e. target/release).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// The `tests/fixtures` folder.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))]
    fixtures: PathBuf,
    /// Concurrency levels: HTTP connections C for the relay, publishes in flight W for raw.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    concurrency: Vec<usize>,
    /// Channels of the relay's pool (`amqp.channels`) and of the multi-channel raw run.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Rounds; each round starts a fresh relay and measures every setting once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured seconds per setting.
    #[arg(long, default_value_t = 3.0)]
    duration_secs: f64,
    /// Warm-up seconds per setting (sent and counted in the queue, not timed).
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Body sizes: `mixed` (fixtures as they are plus 1 KiB and 8 KiB variants) or a byte count.
    #[arg(long, default_value = "mixed")]
    size: SizeMix,
    /// Rotation secrets configured on the relay besides the signing one (one HMAC each).
    #[arg(long, default_value_t = 0)]
    extra_secrets: usize,
    /// Run the relay without its spool (default: spool enabled in a temp dir, as shipped).
    #[arg(long)]
    no_spool: bool,
    /// Smoke mode for CI (under 30 s): 1 round, C = 1,64, 1 s windows.
    #[arg(long)]
    quick: bool,
    /// Measure only one side (e.g. `relay` while profiling it); ratios need both.
    #[arg(long, value_enum, default_value_t = Only::Both)]
    only: Only,
    /// Keep the temp dir (relay configs and logs) and print its path.
    #[arg(long)]
    keep_temp: bool,
}

/// Which side(s) to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Only {
    Both,
    Raw,
    Relay,
}

/// What is measured in one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// The lapin publisher on this many channels.
    Raw(usize),
    /// hookrelay.
    Relay,
}

impl Kind {
    fn label(self, level: usize) -> String {
        match self {
            Kind::Raw(ch) => format!("raw   W={level:<3} ch={ch}"),
            Kind::Relay => format!("relay C={level:<3}"),
        }
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
    let mut args = Args::parse();
    if args.quick {
        args.rounds = 1;
        args.concurrency = vec![1, 64];
        args.duration_secs = 1.0;
        args.warmup_secs = 0.3;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hookrelay-bench: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("hookrelay-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// relay events/s over raw events/s, measured in the same round.
#[derive(Debug, Clone, Copy)]
struct Ratio {
    /// Against raw on as many channels as the relay's pool.
    vs_pool: Option<f64>,
    /// Against raw on one channel.
    vs_one: Option<f64>,
}

/// Everything one run records.
#[derive(Default)]
struct Results {
    samples: BTreeMap<(usize, Kind), Vec<Sample>>,
    /// Per level, one entry per round.
    ratios: BTreeMap<usize, Vec<Ratio>>,
    startups: Vec<Startup>,
    replays: Vec<broker::ConnectSteps>,
    stops: Vec<Duration>,
}

async fn run(args: Args) -> anyhow::Result<bool> {
    validate(&args)?;
    let relay_bin = match &args.relay_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this binary")?.with_file_name("hookrelay"),
    };
    if !relay_bin.is_file() {
        bail!("no relay binary at {}; build it with `cargo build --release --bins`", relay_bin.display());
    }
    warn_if_stale(&relay_bin);
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
    let relay_topology = setup.topology()?;
    let raw_topology = raw_setup.topology()?;
    let admin = broker::connect(&args.amqp_url, "hookrelay-bench").await?;
    broker::declare_topology(&admin, &raw_topology).await?;

    print_header(&args, &setup, &work);
    let mut results = Results::default();
    let mut startup_topologies = Vec::new();
    let outcome =
        measure_all(&args, &admin, &setup, &raw_setup, &work, &mut results, &mut startup_topologies).await;

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
    Ok(report(&args, &results))
}

fn validate(args: &Args) -> anyhow::Result<()> {
    if args.concurrency.is_empty() || args.concurrency.iter().any(|&c| c == 0 || c > 4096) {
        bail!("--concurrency takes levels from 1 to 4096");
    }
    if !(1..=64).contains(&args.channels) {
        bail!("--channels takes 1 to 64");
    }
    if !(1..=20).contains(&args.rounds) {
        bail!("--rounds takes 1 to 20");
    }
    if !(0.1..=60.0).contains(&args.duration_secs) || !(0.0..=30.0).contains(&args.warmup_secs) {
        bail!("--duration-secs takes 0.1 to 60, --warmup-secs 0 to 30");
    }
    let host = args.amqp_url.split('@').next_back().unwrap_or("");
    if !(host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")) {
        bail!("the bench only talks to a broker on this machine (127.0.0.0/8, localhost, [::1])");
    }
    Ok(())
}

/// Rounds × levels × kinds, raw and relay alternating, the order flipped every round.
async fn measure_all(
    args: &Args,
    admin: &Connection,
    setup: &RelaySetup,
    raw_setup: &RelaySetup,
    work: &Arc<Workload>,
    results: &mut Results,
    startup_topologies: &mut Vec<hookrelay::publish::topology::Topology>,
) -> anyhow::Result<()> {
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
                let mut kinds = vec![Kind::Raw(1)];
                if args.channels > 1 && level > 1 {
                    kinds.push(Kind::Raw(args.channels));
                }
                kinds.push(Kind::Relay);
                kinds.retain(|k| match args.only {
                    Only::Both => true,
                    Only::Raw => *k != Kind::Relay,
                    Only::Relay => *k == Kind::Relay,
                });
                if round % 2 == 1 {
                    kinds.reverse();
                }
                let mut this_round: BTreeMap<Kind, f64> = BTreeMap::new();
                for kind in kinds {
                    let window = Window::after(warmup, window_len);
                    let sample = match kind {
                        Kind::Raw(ch) => {
                            let mut sample = measure(watched_raw(watched), window, async {
                                let conn = broker::connect(&args.amqp_url, "hookrelay-bench-raw").await?;
                                let logs = raw::run(
                                    &conn,
                                    &raw_setup.exchange,
                                    ch,
                                    level,
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
                        Kind::Relay => {
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
                    println!("  {}", row(&kind.label(level), &sample, None));
                    this_round.insert(kind, sample.events_per_sec);
                    results.samples.entry((level, kind)).or_default().push(sample);
                }
                let relay_eps = this_round.get(&Kind::Relay).copied();
                let ratio = |k: Kind| Some(relay_eps? / this_round.get(&k).copied().filter(|&r| r > 0.0)?);
                let multi = if level > 1 { Kind::Raw(args.channels) } else { Kind::Raw(1) };
                results
                    .ratios
                    .entry(level)
                    .or_default()
                    .push(Ratio { vs_pool: ratio(multi), vs_one: ratio(Kind::Raw(1)) });
            }
            anyhow::Ok(())
        }
        .await;
        let stopped = relay.stop().await;
        measured?;
        results.stops.push(stopped?);
    }
    Ok(())
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
    sample.relay_cpu_per_10k = per_10k(before.0, after.0, events);
    sample.broker_cpu_per_10k = per_10k(before.1, after.1, events);
    sample.bench_cpu_per_10k = per_10k(before.2, after.2, events);
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

fn warn_if_stale(bin: &std::path::Path) {
    let newest_src = walk_newest(&PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src")), 0);
    // (The bench's own sources under src/bin do not make the relay stale.)
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    if let (Some(src), Some(built)) = (newest_src, built)
        && src > built
    {
        eprintln!(
            "warning: {} is older than the newest file under src/; rebuild with `cargo build --release --bins`",
            bin.display()
        );
    }
}

fn walk_newest(dir: &std::path::Path, depth: usize) -> Option<std::time::SystemTime> {
    if depth > 4 {
        return None;
    }
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            if path.ends_with("src/bin") {
                continue;
            }
            walk_newest(&path, depth + 1)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

fn print_header(args: &Args, setup: &RelaySetup, work: &Workload) {
    let (bmin, bmean, bmax) = work.body_sizes();
    let (emin, emean, emax) = work.envelope_sizes();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("hookrelay-bench");
    println!("  broker     {} (quorum queues, persistent, mandatory, confirms)", redact(&args.amqp_url));
    println!(
        "  relay      {} (amqp.channels = {}, spool {})",
        setup.bin.display(),
        setup.channels,
        if setup.spool { "on" } else { "off" }
    );
    println!(
        "  messages   {} bodies {}–{} B (mean {}), envelopes {}–{} B (mean {}); {} secret(s) on the relay",
        work.messages.len(),
        bmin,
        bmax,
        bmean,
        emin,
        emax,
        emean,
        1 + args.extra_secrets
    );
    println!(
        "  plan       {} round(s) × levels {:?}; {:.1} s warm-up + {:.1} s measured per setting; raw and relay alternate",
        args.rounds, args.concurrency, args.warmup_secs, args.duration_secs
    );
    println!(
        "  machine    {cpus} CPUs, load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!();
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1_048_576.0))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

const TABLE_HEAD: &str = "setting              events/s     p50 ms   p99 ms  p999 ms  relay CPU  bench CPU  broker CPU  relay peak  relay/raw";

fn row(label: &str, s: &Sample, ratio: Option<String>) -> String {
    let mut line = format!(
        "{label:<19} {:>9.0}  {:>8.2} {:>8.2} {:>8.2}  {:>9}  {:>9}  {:>10}  {:>10}  {:>9}",
        s.events_per_sec,
        ms(s.p50),
        ms(s.p99),
        ms(s.p999),
        opt(s.relay_cpu_per_10k, 2),
        opt(s.bench_cpu_per_10k, 2),
        opt(s.broker_cpu_per_10k, 2),
        s.relay_peak_rss.map_or("-".into(), |b| format!("{:.1}M", b as f64 / 1_048_576.0)),
        ratio.unwrap_or_else(|| "-".into()),
    );
    if s.failed > 0 || s.lost() > 0 {
        line.push_str(&format!(
            "  !! {} failed, {} acknowledged, {} in queue{}",
            s.failed,
            s.succeeded,
            s.in_queue,
            s.first_error.as_ref().map_or(String::new(), |e| format!(" (first: {e})"))
        ));
    } else {
        line.push_str(&format!("  ✓ {} in queue", s.in_queue));
    }
    line
}

/// Prints the medians, ratios, start-up and target checks; true when no event was lost
/// and nothing failed.
fn report(args: &Args, r: &Results) -> bool {
    println!(
        "\nMedians over {} round(s) (CPU columns: seconds per 10k events; ratio: median of same-round ratios, vs raw on {} channel(s) / vs 1 channel)",
        args.rounds, args.channels
    );
    println!("{TABLE_HEAD}");
    let mut clean = true;
    for ((level, kind), samples) in &r.samples {
        let m = median_sample(samples);
        for s in samples {
            clean &= s.failed == 0 && s.lost() == 0;
        }
        let ratio = (*kind == Kind::Relay).then(|| {
            let rs = r.ratios.get(level).cloned().unwrap_or_default();
            let a = median(rs.iter().filter_map(|x| x.vs_pool).collect());
            let b = median(rs.iter().filter_map(|x| x.vs_one).collect());
            format!("{}/{}", opt(a, 2), opt(b, 2))
        });
        let spread = {
            let eps: Vec<f64> = samples.iter().map(|s| s.events_per_sec).collect();
            let lo = eps.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = eps.iter().copied().fold(0.0, f64::max);
            format!("[{lo:.0}–{hi:.0}]")
        };
        println!("{}  {spread}", row(&kind.label(*level), &m, ratio));
    }

    println!(
        "\nStart-up (\"connect\" = the `hookrelay started.` log line: listeners bound, broker connect begins; \
         \"broker ready\" = `Connected to the broker.`: topology declared, channel pool open)"
    );
    println!(
        "round  topology  spawn→listening  spawn→/readyz 200  spawn→broker ready  connect→broker ready  \
         idle RSS (anon)     start-up peak  SIGTERM→exit"
    );
    for (i, s) in r.startups.iter().enumerate() {
        println!(
            "{:<5}  {:<8}  {:>12} ms  {:>14.1} ms  {:>15} ms  {:>17} ms  {:<18}  {:>13}  {:>9} ms",
            i + 1,
            if i == 0 { "fresh" } else { "existing" },
            opt(s.to_started.map(ms), 1),
            ms(s.to_ready),
            opt(s.to_connected.map(ms), 1),
            opt(s.connecting.map(ms), 1),
            format!("{} ({})", mib(s.idle_rss), mib(s.idle_anon_rss)),
            mib(s.startup_peak_rss),
            opt(r.stops.get(i).map(|d| ms(*d)), 0),
        );
    }
    let replay = |f: &dyn Fn(&broker::ConnectSteps) -> Duration| {
        opt(median(r.replays.iter().map(|x| ms(f(x))).collect()), 1)
    };
    println!(
        "the same broker steps timed by the bench (median): TCP + AMQP handshake {} ms, declare fresh topology {} ms \
         (existing {} ms), open {} confirm channels {} ms",
        replay(&|x| x.handshake),
        replay(&|x| x.declare),
        replay(&|x| x.declare_existing),
        args.channels,
        replay(&|x| x.channels),
    );

    println!("\nTargets");
    let med = |level: usize, kind: Kind| r.samples.get(&(level, kind)).map(|v| median_sample(v));
    if let Some(rs) = r.ratios.get(&64) {
        let a = median(rs.iter().filter_map(|x| x.vs_pool).collect());
        verdict(
            "C=64 events/s ≥ 0.8 × raw W=64 (same channels)",
            a.map(|a| a >= 0.8),
            &format!(
                "{} × (vs 1 channel: {})",
                opt(a, 2),
                opt(median(rs.iter().filter_map(|x| x.vs_one).collect()), 2)
            ),
        );
    }
    if let (Some(relay), Some(raw)) = (med(1, Kind::Relay), med(1, Kind::Raw(1))) {
        let limit = raw.p99 + Duration::from_millis(1);
        verdict(
            "C=1 p99 ≤ broker confirm p99 (raw W=1) + 1 ms",
            Some(relay.p99 <= limit),
            &format!("{:.2} ms vs {:.2} ms + 1 ms", ms(relay.p99), ms(raw.p99)),
        );
    }
    let top = args.concurrency.iter().copied().max().unwrap_or(0);
    if let Some(v) = r.samples.get(&(top, Kind::Relay)) {
        let peak = v.iter().filter_map(|s| s.relay_peak_rss).max();
        verdict(
            &format!("peak RSS at C={top} ≤ 32 MiB (worst round)"),
            peak.map(|p| p <= 32 * 1_048_576),
            &mib(peak),
        );
    }
    let idle = r.startups.iter().filter_map(|s| s.idle_rss).max();
    verdict("idle RSS ≤ 12 MiB (worst round)", idle.map(|p| p <= 12 * 1_048_576), &mib(idle));
    let fresh = r.startups.first().and_then(|s| s.connecting.map(ms));
    let later = median(r.startups.iter().skip(1).filter_map(|s| s.connecting.map(ms)).collect());
    verdict(
        "start-up ≤ 100 ms after the broker connect begins (existing topology, median)",
        later.or(fresh).map(|a| a <= 100.0),
        &format!("{} ms (fresh topology: {} ms)", opt(later, 1), opt(fresh, 1)),
    );
    println!("  (verify + envelope ≤ 5 µs per 4 KiB: cargo bench --bench verify_envelope)");
    if clean {
        println!("\nEvery acknowledged event was found in its queue; no request failed.");
    } else {
        println!("\nFAILED: some events were not acknowledged or are missing from the queue (see !! above).");
    }
    clean
}

fn verdict(what: &str, ok: Option<bool>, figure: &str) {
    let mark = match ok {
        Some(true) => "met ",
        Some(false) => "MISS",
        None => "n/a ",
    };
    println!("  [{mark}] {what}: {figure}");
}

/// Field-wise medians of several rounds of one setting.
fn median_sample(v: &[Sample]) -> Sample {
    let f = |get: &dyn Fn(&Sample) -> Option<f64>| median(v.iter().filter_map(get).collect());
    let d = |get: &dyn Fn(&Sample) -> Duration| {
        Duration::from_secs_f64(median(v.iter().map(|s| get(s).as_secs_f64()).collect()).unwrap_or(0.0))
    };
    Sample {
        events_per_sec: f(&|s| Some(s.events_per_sec)).unwrap_or(0.0),
        p50: d(&|s| s.p50),
        p99: d(&|s| s.p99),
        p999: d(&|s| s.p999),
        relay_cpu_per_10k: f(&|s| s.relay_cpu_per_10k),
        bench_cpu_per_10k: f(&|s| s.bench_cpu_per_10k),
        broker_cpu_per_10k: f(&|s| s.broker_cpu_per_10k),
        relay_peak_rss: f(&|s| s.relay_peak_rss.map(|b| b as f64)).map(|b| b as u64),
        succeeded: v.iter().map(|s| s.succeeded).sum(),
        failed: v.iter().map(|s| s.failed).sum(),
        in_queue: v.iter().map(|s| s.in_queue).sum(),
        first_error: v.iter().find_map(|s| s.first_error.clone()),
    }
}
