//! Settings: built-in defaults ← optional TOML file ← `HOOKRELAY_…` environment,
//! validated once into the runtime [`Config`] the rest of the crate uses.
//!
//! Loading takes the file text and an environment map as arguments, so tests never
//! touch the process environment. Every field of a `…Settings` type is an option; its
//! `///` text is the reference in README.md.
//!
//! Layout: this file holds the tree, the runtime [`Config`] and the error; each section
//! lives in its own module with its validation next to its type (`http`, `amqp`,
//! `spool`, `log`, `source`); `load` reads the file and the environment.

mod amqp;
mod http;
mod load;
mod log;
mod one_or_many;
mod source;
mod spool;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

pub use self::amqp::{AmqpConfig, AmqpSettings};
pub use self::http::{AdminSettings, HttpConfig, HttpSettings};
pub use self::load::{CONFIG_FILE_ENV, ENV_PREFIX, load, load_from};
pub use self::log::{LogFormat, LogSettings, ShutdownSettings};
pub use self::one_or_many::{OneOrMany, split_commas};
pub use self::source::{DEFAULT_TOLERANCE_SECS, RateLimit, SourceConfig, SourceSettings};
pub use self::spool::{SpoolConfig, SpoolSettings};

/// The whole settings tree as written by the user.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The public ingest listener.
    pub http: HttpSettings,
    /// The private admin listener (metrics, health).
    pub admin: AdminSettings,
    /// The RabbitMQ connection and topology.
    pub amqp: AmqpSettings,
    /// The local spool used when the broker cannot confirm in time.
    pub spool: SpoolSettings,
    /// Log output.
    pub log: LogSettings,
    /// Shutdown behaviour.
    pub shutdown: ShutdownSettings,
    /// Webhook sources by name; the name is the `{source}` path segment.
    pub sources: BTreeMap<String, SourceSettings>,
}

/// Validated runtime configuration.
#[derive(Debug)]
pub struct Config {
    /// Ingest listener.
    pub http: HttpConfig,
    /// Admin listener address.
    pub admin_listen: SocketAddr,
    /// Broker settings.
    pub amqp: AmqpConfig,
    /// Spool settings; `None` when disabled.
    pub spool: Option<SpoolConfig>,
    /// Log settings.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Shutdown grace period.
    pub grace_period: Duration,
    /// Configured sources, sorted by name.
    pub sources: Vec<SourceConfig>,
    /// Non-fatal findings (e.g. a world-readable secret file) to log at start-up.
    pub warnings: Vec<String>,
}

/// What the broker topology depends on, and nothing else: the exchange settings and
/// the source names. `hookrelay topology export` needs no secret and no broker URL.
#[derive(Debug)]
pub struct TopologyConfig {
    /// Exchange names and the consumer retry path. Its `urls` are carried as given and
    /// never checked: nothing built from this connects.
    pub amqp: AmqpConfig,
    /// Source names, sorted.
    pub sources: Vec<String>,
}

/// A configuration error that names the key at fault. Never carries secret values.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or does not fit the settings tree.
    #[error("configuration: {0}")]
    Load(String),
    /// A value is present but invalid.
    #[error("configuration key `{key}`: {problem}")]
    Invalid {
        /// Dotted key, e.g. `sources.patreon.secrets`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| invalid(key, format!("`{value}` is not an address like 127.0.0.1:8080")))
}

fn positive(key: &str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 { Err(invalid(key, "must be greater than zero")) } else { Ok(value) }
}

fn positive_ms(key: &str, value: u64) -> Result<Duration, ConfigError> {
    positive(key, value).map(Duration::from_millis)
}

impl Settings {
    /// Checks every value and builds the runtime configuration. Sections are checked
    /// in file order, so the first error reported is the first one written.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let http = self.http.validate()?;
        let admin_listen = self.admin.validate()?;
        let amqp = self.amqp.validate()?;
        let spool = self.spool.validate()?;
        let mut warnings = Vec::new();
        let sources = source::validate_all(self.sources, &mut warnings)?;
        Ok(Config {
            http,
            admin_listen,
            amqp,
            spool,
            log_format: self.log.format,
            log_level: self.log.level,
            grace_period: self.shutdown.grace_period(),
            sources,
            warnings,
        })
    }

    /// Checks only what the broker topology depends on (exchange names, the retry
    /// path, source names) and returns it. Secrets, secret files and the broker URL
    /// are not read.
    pub fn validate_topology(self) -> Result<TopologyConfig, ConfigError> {
        Ok(TopologyConfig {
            amqp: self.amqp.validate_topology()?,
            sources: source::validate_names(&self.sources)?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    pub(crate) fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    pub(crate) const MINIMAL: &str = "[sources.patreon]\nkind = \"patreon\"\nsecrets = [\"s1\", \"s2\"]\n";

    /// The validation error of `text` as shown to the operator.
    pub(crate) fn error_of(text: Option<&str>, e: &HashMap<String, String>) -> String {
        load(text, e).unwrap().validate().unwrap_err().to_string()
    }

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let cfg = load(Some(MINIMAL), &env(&[])).unwrap().validate().unwrap();
        assert_eq!(cfg.http.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(cfg.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(cfg.http.max_body_bytes, 1_048_576);
        assert_eq!(cfg.amqp.exchange, "hookrelay");
        assert_eq!(cfg.amqp.unrouted_exchange.as_deref(), Some("hookrelay.unrouted"));
        assert_eq!(cfg.sources[0].name, "patreon");
        assert_eq!(cfg.sources[0].cloudevents_source, "/webhooks/patreon");
        assert_eq!(cfg.sources[0].verifier.secret_count(), 2);
    }

    #[test]
    fn errors_name_the_key() {
        let err = load(Some("[http]\nlisten_addr = \"x\"\n"), &env(&[])).unwrap_err().to_string();
        assert!(err.contains("listen_addr"), "{err}");
        let err = error_of(Some("[sources.p]\nkind = \"patreon\"\n"), &env(&[]));
        assert!(err.contains("sources.p.secrets"), "{err}");
        let text = format!("{MINIMAL}[amqp]\nurl = \"http://user:hunter2@host\"\n");
        let err = error_of(Some(&text), &env(&[]));
        assert!(err.contains("amqp.url") && !err.contains("hunter2"), "{err}");
        let err = error_of(Some("[sources.Bad]\nkind = \"patreon\"\nsecrets = \"x\"\n"), &env(&[]));
        assert!(err.contains("sources.Bad"), "{err}");
        let err = error_of(Some(MINIMAL), &env(&[("HOOKRELAY_HTTP__LISTEN", "nowhere")]));
        assert!(err.contains("http.listen"), "{err}");
        let err = error_of(None, &env(&[]));
        assert!(err.contains("sources"), "{err}");
    }

    #[test]
    fn the_topology_needs_neither_secrets_nor_a_broker_url() {
        let text = "[amqp]\nurl = \"not a url\"\nexchange = \"x\"\n[sources.a]\nkind = \"patreon\"\n\
                    secret_files = [\"/nonexistent/secret\"]\n[sources.b]\nkind = \"patreon\"\n";
        let topo = load(Some(text), &env(&[])).unwrap().validate_topology().unwrap();
        assert_eq!(topo.amqp.exchange, "x");
        assert_eq!(topo.sources, ["a", "b"]);
        // What the topology does depend on is still checked, by key.
        for (text, key) in [
            ("[amqp]\nexchange = \"a b\"\n[sources.a]\nkind = \"patreon\"\n", "amqp.exchange"),
            ("[sources.Bad]\nkind = \"patreon\"\n", "sources.Bad"),
            ("", "sources"),
        ] {
            let err = load(Some(text), &env(&[])).unwrap().validate_topology().unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
