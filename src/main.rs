//! The `hookrelay` binary: command line → settings → telemetry → bind → library.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hookrelay::config::{self, CONFIG_FILE_ENV};

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
    /// Print the headers a Patreon delivery of the body on stdin would carry.
    Sign {
        /// File holding the webhook secret.
        #[arg(long)]
        secret_file: PathBuf,
        /// Trigger to put in X-Patreon-Event.
        #[arg(long, default_value = "members:pledge:create")]
        event: String,
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
        Command::Sign { secret_file, event } => {
            let secret = std::fs::read_to_string(&secret_file)
                .with_context(|| format!("cannot read {}", secret_file.display()))?;
            let secret = secret.trim_end_matches(['\n', '\r']);
            let mut body = Vec::new();
            std::io::stdin().read_to_end(&mut body).context("reading the body from stdin")?;
            println!("X-Patreon-Event: {event}");
            println!("X-Patreon-Signature: {}", hookrelay::verify::patreon::sign(secret.as_bytes(), &body));
            Ok(ExitCode::SUCCESS)
        }
    }
}
