//! The bench's command line: what to measure, against what, for how long; settled
//! (`--quick`, default channel counts) and checked before anything runs.

use std::path::PathBuf;

use anyhow::bail;
use clap::Parser;

use crate::messages::SizeMix;
use crate::raw::Variant;

#[derive(Parser, Debug)]
#[command(
    name = "hookrelay-bench",
    about = "hookrelay end to end beside the raw RabbitMQ publish-with-confirms limit.",
    after_help = "Build first: cargo build --release --bins. Or run bench/run.sh."
)]
pub struct Args {
    /// Broker to measure against (loopback only).
    #[arg(long, env = "HOOKRELAY_BENCH_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// The relay binary (default: `hookrelay` beside this binary, i.e. target/release).
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
    /// The `tests/fixtures` folder.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))]
    pub fixtures: PathBuf,
    /// Concurrency levels: HTTP connections C for the relay, publishes in flight W for raw.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    pub concurrency: Vec<usize>,
    /// Channels of the relay's pool (`amqp.channels`) and of the multi-channel raw run.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Channel counts of the raw publisher at W > 1 (default: 1 and `--channels`).
    #[arg(long, value_delimiter = ',')]
    pub raw_channels: Vec<usize>,
    /// What the raw publisher sends, one measurement each: `std` (the relay's envelope
    /// and properties; the reference for ratios, listed first), `nohdr` (without the
    /// `cloudEvents_*` headers), `nomand` (`mandatory` off), `body` (the request body
    /// instead of the envelope), `min` (only `delivery_mode = 2`), joined with `+`.
    #[arg(long, value_delimiter = ',', default_value = "std")]
    pub raw_variants: Vec<Variant>,
    /// Rounds; each round starts a fresh relay and measures every setting once.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measured seconds per setting.
    #[arg(long, default_value_t = 3.0)]
    pub duration_secs: f64,
    /// Warm-up seconds per setting (sent and counted in the queue, not timed).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Body sizes: `mixed` (fixtures as they are plus 1 KiB and 8 KiB variants) or a byte count.
    #[arg(long, default_value = "mixed")]
    pub size: SizeMix,
    /// Rotation secrets configured on the relay besides the signing one (one HMAC each).
    #[arg(long, default_value_t = 0)]
    pub extra_secrets: usize,
    /// Run the relay without its spool (default: spool enabled in a temp dir, as shipped).
    #[arg(long)]
    pub no_spool: bool,
    /// Smoke mode for CI (under 30 s): 1 round, C = 1,64, 1 s windows.
    #[arg(long)]
    pub quick: bool,
    /// Measure only these sides (e.g. `relay` while profiling it); comparisons need several.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "raw,bare,relay")]
    pub only: Vec<Side>,
    /// Keep the temp dir (relay configs and logs) and print its path.
    #[arg(long)]
    pub keep_temp: bool,
    /// A second relay measured beside the first in every round ("relay B"), for A/B
    /// comparisons of two builds in one run: its binary…
    #[arg(long)]
    pub b_bin: Option<PathBuf>,
    /// …and/or its `amqp.channels` (default: `--channels`).
    #[arg(long)]
    pub b_channels: Option<usize>,
    /// Internal: run as the bare relay (the bench starts it).
    #[arg(long, hide = true)]
    pub serve_bare: bool,
    /// Internal: the bare relay's exchange.
    #[arg(long, hide = true, default_value = "")]
    pub bare_exchange: String,
}

/// What can be measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    Raw,
    Bare,
    Relay,
}

impl Args {
    /// The command line, with `--quick` and the default `--raw-channels` applied.
    pub fn parse_settled() -> Args {
        let mut args = Args::parse();
        if args.raw_channels.is_empty() {
            args.raw_channels = vec![1, args.channels];
            args.raw_channels.dedup();
        }
        if args.quick {
            args.rounds = 1;
            args.concurrency = vec![1, 64];
            args.duration_secs = 1.0;
            args.warmup_secs = 0.3;
        }
        args
    }

    /// Refuses settings the bench cannot measure sensibly, and any broker off this machine.
    pub fn validate(&self) -> anyhow::Result<()> {
        let args = self;
        if args.concurrency.is_empty() || args.concurrency.iter().any(|&c| c == 0 || c > 4096) {
            bail!("--concurrency takes levels from 1 to 4096");
        }
        if !(1..=64).contains(&args.channels) || args.raw_channels.iter().any(|c| !(1..=64).contains(c)) {
            bail!("--channels and --raw-channels take 1 to 64");
        }
        if args.raw_variants.is_empty() {
            bail!("--raw-variants needs at least one variant");
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
}
