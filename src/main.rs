//! The `hookrelay` binary: command line → settings → telemetry → bind → library.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hookrelay::config::{self, CONFIG_FILE_ENV};
use hookrelay::verify::{self, KindOptions, SignInput};

#[derive(Parser)]
#[command(name = "hookrelay", version, about = "Verified webhooks in, CloudEvents on RabbitMQ out.")]
struct Cli {
    /// TOML configuration file (default: none; settings come from defaults and HOOKRELAY_* variables).
    #[arg(long, global = true, env = CONFIG_FILE_ENV)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Run,
    /// Validate the configuration and exit.
    CheckConfig,
    /// Move messages from a dead-letter or parking queue, or events from the spool
    /// quarantine, back to the exchange.
    Replay {
        /// Queue to take messages from, e.g. hookrelay.dead or hookrelay.patreon.parked.
        #[arg(long, required_unless_present = "spool_quarantine", conflicts_with = "spool_quarantine")]
        queue: Option<String>,
        /// Take the events the broker refused while the spool drained, from
        /// `{spool.dir}/quarantine` (the relay may keep running).
        #[arg(long)]
        spool_quarantine: bool,
        /// Move at most this many messages.
        #[arg(long)]
        limit: Option<u64>,
        /// List what would be moved; leave the queue as it is.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the broker topology as RabbitMQ definitions JSON.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Exit 0 if the admin endpoint answers 200 (for container health checks).
    Healthcheck {
        /// URL to probe.
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
    },
    /// Print the headers a delivery of the body on stdin would carry, for any kind.
    Sign(Box<SignArgs>),
}

#[derive(clap::Args)]
struct SignArgs {
    /// Provider kind, as in `sources.<name>.kind` (default: the first registered kind, patreon).
    #[arg(long)]
    kind: Option<String>,
    /// File holding the secret, as configured (trailing newline ignored).
    #[arg(long)]
    secret_file: PathBuf,
    /// Event name, for kinds that send it in a header (default: one per kind).
    #[arg(long)]
    event: Option<String>,
    /// Signed timestamp in Unix seconds, for kinds that sign one (default: now).
    #[arg(long)]
    timestamp: Option<u64>,
    /// Delivery id, for kinds that send one (default: a random UUID).
    #[arg(long)]
    id: Option<String>,
    /// `hmac` kind: the source's `signature_header`.
    #[arg(long)]
    signature_header: Option<String>,
    /// `hmac` kind: the source's `algorithm`.
    #[arg(long)]
    algorithm: Option<String>,
    /// `hmac` kind: the source's `encoding`.
    #[arg(long)]
    encoding: Option<String>,
    /// `hmac` kind: the source's `signature_prefix`.
    #[arg(long)]
    signature_prefix: Option<String>,
    /// `hmac` kind: the source's `event_header`.
    #[arg(long)]
    event_header: Option<String>,
    /// `hmac` kind: the source's `id_header`.
    #[arg(long)]
    id_header: Option<String>,
}

#[derive(Subcommand)]
enum TopologyAction {
    /// Print definitions JSON for `rabbitmqctl import_definitions` or `load_definitions`.
    Export {
        /// Virtual host the definitions are for.
        #[arg(long, default_value = "/")]
        vhost: String,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("hookrelay: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let config = config::load_from(cli.config.as_deref(), &env)?.validate()?;
            hookrelay::telemetry::init(config.log_format, &config.log_level);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(async move {
                let (ingest, admin) = hookrelay::bind(&config).await?;
                hookrelay::run(config, ingest, admin, hookrelay::shutdown_signal()).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig => {
            let config = config::load_from(cli.config.as_deref(), &env)?.validate()?;
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            println!(
                "configuration ok: {} source(s), ingest {}, admin {}",
                config.sources.len(),
                config.http.listen,
                config.admin_listen
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay { queue, spool_quarantine, limit, dry_run } => {
            let config = config::load_from(cli.config.as_deref(), &env)?.validate()?;
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let urls: Vec<&str> = config.amqp.urls.iter().map(secrecy::ExposeSecret::expose_secret).collect();
            let exchange = &config.amqp.exchange;
            let print = |line: &hookrelay::replay::ReplayLine| {
                println!("{} {} ({})", line.event_id, line.routing_key, line.reason)
            };
            let (report, from) = match queue {
                Some(queue) if !spool_quarantine => {
                    let replay = hookrelay::replay::replay(&urls, exchange, &queue, limit, dry_run, print);
                    (runtime.block_on(replay)?, queue)
                }
                _ => {
                    let spool = config.spool.as_ref().context("--spool-quarantine needs [spool] dir")?;
                    let replay = hookrelay::replay::replay_quarantine(
                        &urls, exchange, &spool.dir, limit, dry_run, print,
                    );
                    (runtime.block_on(replay)?, "the spool quarantine".to_owned())
                }
            };
            let verb = if dry_run { "would move" } else { "moved" };
            eprintln!("{verb} {} message(s) from {from} to {exchange}", report.moved);
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { action: TopologyAction::Export { vhost } } => {
            // Only what the topology depends on: no secret, no broker URL.
            let config = config::load_from(cli.config.as_deref(), &env)?.validate_topology()?;
            let sources = config.sources.iter().map(String::as_str);
            let defs = hookrelay::publish::topology::topology(&config.amqp, sources).to_definitions(&vhost);
            println!("{}", serde_json::to_string_pretty(&defs).context("encoding definitions")?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck { url } => {
            Ok(if healthcheck(&url) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Sign(args) => {
            let secret = std::fs::read_to_string(&args.secret_file)
                .with_context(|| format!("cannot read {}", args.secret_file.display()))?;
            let mut body = Vec::new();
            std::io::stdin().read_to_end(&mut body).context("reading the body from stdin")?;
            let options = KindOptions {
                signature_header: args.signature_header,
                algorithm: args.algorithm,
                encoding: args.encoding,
                signature_prefix: args.signature_prefix,
                event_header: args.event_header,
                id_header: args.id_header,
            };
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let id =
                args.id.unwrap_or_else(|| uuid::Uuid::new_v8(fastrand::u128(..).to_le_bytes()).to_string());
            let input = SignInput {
                secret: secret.trim_end_matches(['\n', '\r']).as_bytes(),
                body: &body,
                event: args.event.as_deref(),
                id: &id,
                timestamp: args.timestamp.unwrap_or(now),
                options: &options,
            };
            for (name, value) in verify::sign(args.kind.as_deref().unwrap_or(verify::DEFAULT_KIND), &input)
                .map_err(anyhow::Error::msg)?
            {
                println!("{name}: {value}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A minimal HTTP/1.1 GET over a plain socket: true on a 200 answer within 2 s.
fn healthcheck(url: &str) -> bool {
    use std::io::Write;
    use std::net::{TcpStream, ToSocketAddrs};
    use std::time::Duration;
    let Some(rest) = url.strip_prefix("http://") else { return false };
    let (authority, path) =
        rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let Some(addr) = authority.to_socket_addrs().ok().and_then(|mut a| a.next()) else { return false };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}
