//! The printed report: the per-setting table, same-round comparisons (hookrelay against
//! the bare relay and raw variants against `std`), start-up, and the targets.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::args::Args;
use crate::messages::Workload;
use crate::relay::RelaySetup;
use crate::stats::{Sample, median};
use crate::{Kind, Results, broker};

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1_048_576.0))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

const TABLE_HEAD: &str = "setting                     events/s    p50 ms   p99 ms  p999 ms  relay µs/ev  load µs/ev  broker µs/ev  relay peak  ÷raw";

/// One table line; `ratio` is events/s over the raw reference's, same round.
pub fn row(label: &str, s: &Sample, ratio: Option<String>) -> String {
    let mut line = format!(
        "{label:<26} {:>9.0}  {:>8.2} {:>8.2} {:>8.2}  {:>11}  {:>10}  {:>12}  {:>10}  {:>4}",
        s.events_per_sec,
        ms(s.p50),
        ms(s.p99),
        ms(s.p999),
        opt(s.relay_cpu_us, 1),
        opt(s.bench_cpu_us, 1),
        opt(s.broker_cpu_us, 1),
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
pub fn report(args: &Args, r: &Results) -> bool {
    println!(
        "\nMedians over {} round(s). CPU: utime+stime from /proc over the window ÷ events in it (relay = the \
         process under test: hookrelay or the bare relay; load = this bench's load generator or publisher). \
         ÷raw: events/s over raw {} on {} channel(s) (1 at level 1), median of same-round ratios.",
        args.rounds, args.raw_variants[0].name, args.channels
    );
    println!("{TABLE_HEAD}");
    let mut clean = true;
    for ((level, kind), samples) in &r.samples {
        let m = median_sample(samples);
        for s in samples {
            clean &= s.failed == 0 && s.lost() == 0;
        }
        let reference = Kind::reference(*level, args.channels);
        let ratio = (*kind != reference).then(|| {
            opt(same_round(r, *level, *kind, reference, |a, b| ratio(a.events_per_sec, b.events_per_sec)), 2)
        });
        let spread = {
            let eps: Vec<f64> = samples.iter().map(|s| s.events_per_sec).collect();
            let lo = eps.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = eps.iter().copied().fold(0.0, f64::max);
            format!("[{lo:.0}–{hi:.0}]")
        };
        println!("{}  {spread}", row(&kind.label(*level, &args.raw_variants), &m, ratio));
    }
    comparisons(args, r);

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
    if r.rounds.contains_key(&64) {
        let vs_raw = same_round(r, 64, Kind::Relay, Kind::reference(64, args.channels), |a, b| {
            ratio(a.events_per_sec, b.events_per_sec)
        });
        verdict(
            "C=64 events/s ≥ 0.8 × raw W=64 (issue 4)",
            vs_raw.map(|a| a >= 0.8),
            &format!("{} ×", opt(vs_raw, 2)),
        );
        let vs_bare =
            same_round(r, 64, Kind::Relay, Kind::Bare, |a, b| ratio(a.events_per_sec, b.events_per_sec));
        verdict(
            "C=64 events/s ≥ 0.8 × bare (issue 13)",
            vs_bare.map(|a| a >= 0.8),
            &format!("{} ×", opt(vs_bare, 2)),
        );
        let extra =
            same_round(r, 64, Kind::Relay, Kind::Bare, |a, b| Some(a.relay_cpu_us? - b.relay_cpu_us?));
        verdict(
            "C=64 relay CPU per event ≤ bare + 12 µs (issue 13)",
            extra.map(|x| x <= 12.0),
            &format!("+{} µs", opt(extra, 1)),
        );
        let broker =
            same_round(r, 64, Kind::Relay, Kind::Bare, |a, b| ratio(a.broker_cpu_us?, b.broker_cpu_us?));
        verdict(
            "C=64 broker CPU per event behind the relay ≤ 1.15 × behind bare (issue 13)",
            broker.map(|x| x <= 1.15),
            &format!("{} ×", opt(broker, 2)),
        );
    }
    if let (Some(relay), Some(raw)) = (med(1, Kind::Relay), med(1, Kind::reference(1, 1))) {
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

/// `a / b` when `b` is positive.
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// The median over rounds of `f(sample of a, sample of b)` where both ran in the same round.
fn same_round(
    r: &Results,
    level: usize,
    a: Kind,
    b: Kind,
    f: impl Fn(&Sample, &Sample) -> Option<f64>,
) -> Option<f64> {
    let rounds = r.rounds.get(&level)?;
    median(rounds.iter().filter_map(|m: &BTreeMap<Kind, Sample>| f(m.get(&a)?, m.get(&b)?)).collect())
}

/// hookrelay against the bare relay, and each raw variant against `std` on as many
/// channels: medians of same-round figures.
fn comparisons(args: &Args, r: &Results) {
    println!("\nSame round, median over rounds (CPU in µs per event):");
    for (&level, rounds) in &r.rounds {
        let kinds: Vec<Kind> = rounds.iter().flat_map(|m| m.keys().copied()).collect();
        let has = |k: Kind| kinds.contains(&k);
        for (a, b, what) in [
            (Kind::Relay, Kind::Bare, "relay vs bare"),
            (Kind::RelayB, Kind::Bare, "relayB vs bare"),
            (Kind::RelayB, Kind::Relay, "relayB vs relay"),
        ] {
            if !(has(a) && has(b)) {
                continue;
            }
            let cpu = |get: fn(&Sample) -> Option<f64>| {
                (
                    same_round(r, level, a, b, |x, y| Some(get(x)? - get(y)?)),
                    same_round(r, level, a, b, |x, y| ratio(get(x)?, get(y)?)),
                )
            };
            let (relay_extra, _) = cpu(|s| s.relay_cpu_us);
            let (_, broker_ratio) = cpu(|s| s.broker_cpu_us);
            let eps = same_round(r, level, a, b, |x, y| ratio(x.events_per_sec, y.events_per_sec));
            println!(
                "  C={level:<4} {what}: events/s {} ×, relay CPU {} µs, broker CPU {} ×",
                opt(eps, 2),
                relay_extra.map_or("-".into(), |x| format!("{x:+.1}")),
                opt(broker_ratio, 2),
            );
        }
        for k in kinds.iter().copied().collect::<std::collections::BTreeSet<_>>() {
            let Kind::Raw { variant, channels } = k else { continue };
            let base = if variant == 0 {
                if channels == 1 {
                    continue;
                }
                Kind::Raw { variant: 0, channels: 1 }
            } else {
                Kind::Raw { variant: 0, channels }
            };
            if !has(base) {
                continue;
            }
            let broker = same_round(r, level, k, base, |x, y| ratio(x.broker_cpu_us?, y.broker_cpu_us?));
            let eps = same_round(r, level, k, base, |x, y| ratio(x.events_per_sec, y.events_per_sec));
            let name = |k: Kind| match k {
                Kind::Raw { variant, channels } => {
                    format!(
                        "{} ch={channels}",
                        args.raw_variants.get(variant).map_or("?", |v| v.name.as_str())
                    )
                }
                _ => String::new(),
            };
            println!(
                "  W={level:<4} raw {} vs {}: broker CPU {} ×, events/s {} ×",
                name(k),
                name(base),
                opt(broker, 2),
                opt(eps, 2),
            );
        }
    }
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
        relay_cpu_us: f(&|s| s.relay_cpu_us),
        bench_cpu_us: f(&|s| s.bench_cpu_us),
        broker_cpu_us: f(&|s| s.broker_cpu_us),
        relay_peak_rss: f(&|s| s.relay_peak_rss.map(|b| b as f64)).map(|b| b as u64),
        succeeded: v.iter().map(|s| s.succeeded).sum(),
        failed: v.iter().map(|s| s.failed).sum(),
        in_queue: v.iter().map(|s| s.in_queue).sum(),
        first_error: v.iter().find_map(|s| s.first_error.clone()),
    }
}

/// Warns when the relay binary is older than the newest relay source file.
pub fn warn_if_stale(bin: &std::path::Path) {
    let newest_src = walk_newest(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")), 0);
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

/// The newest modification time under `dir` (src/bin excluded), `depth` levels down at most.
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

/// The run's settings and the machine, printed before the first measurement.
pub fn print_header(args: &Args, setup: &RelaySetup, work: &Workload) {
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
    let variants: Vec<&str> = args.raw_variants.iter().map(|v| v.name.as_str()).collect();
    println!(
        "  plan       {} round(s) × levels {:?}; {:.1} s warm-up + {:.1} s measured per setting; raw ({} on {:?} channels), bare and relay alternate",
        args.rounds,
        args.concurrency,
        args.warmup_secs,
        args.duration_secs,
        variants.join(", "),
        args.raw_channels
    );
    println!(
        "  machine    {cpus} CPUs, load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!();
}

/// `url` without its user and password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}
