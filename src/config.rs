//! Settings: built-in defaults ← optional TOML file ← `HOOKRELAY_…` environment,
//! validated once into the runtime [`Config`] the rest of the crate uses.
//!
//! Loading takes the file text and an environment map as arguments, so tests never
//! touch the process environment. Every field below is an option; its `///` text is
//! the reference in README.md.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::http::allowlist::{Allowlist, Cidr};
use crate::verify::patreon::PatreonVerifier;

/// Environment prefix; `HOOKRELAY_HTTP__LISTEN` sets `http.listen`.
pub const ENV_PREFIX: &str = "HOOKRELAY";
/// Environment variable naming the configuration file (not itself an option).
pub const CONFIG_FILE_ENV: &str = "HOOKRELAY_CONFIG";

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

/// `[http]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address the ingest listener binds.
    pub listen: String,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: u64,
    /// Time allowed for a client to send a request head, on a new connection and
    /// between requests on a kept-alive one (so it is also the idle timeout); then
    /// the connection is closed.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send the whole request body; then 408. The publish has its
    /// own deadline (`amqp.publish_timeout_ms`).
    pub request_timeout_ms: u64,
    /// Connections served at once. When all are taken, connections that are not
    /// inside a request (idle, or still trickling a head) are closed to make room;
    /// new ones wait in the kernel backlog meanwhile.
    pub max_connections: usize,
    /// Seconds sent in `Retry-After` with 503 answers (a 429 carries the time until the
    /// source's rate limit admits the next request, rounded up to whole seconds).
    pub retry_after_secs: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: "0.0.0.0:8080".into(),
            max_body_bytes: 1024 * 1024,
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 15_000,
            max_connections: 1024,
            retry_after_secs: 5,
        }
    }
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`). Keep it private.
    pub listen: String,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings { listen: "127.0.0.1:9090".into() }
    }
}

/// `[amqp]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// Broker URL (`amqp://user:password@host:port/vhost`); treated as a secret.
    pub url: SecretString,
    /// Durable topic exchange events are published to.
    pub exchange: String,
    /// Alternate exchange that keeps messages no binding routes; empty disables it.
    /// Defaults to `{exchange}.unrouted`.
    pub unrouted_exchange: Option<String>,
    /// Dead-letter exchange for messages the broker refuses; empty disables it.
    /// Defaults to `{exchange}.dead`.
    pub dead_letter_exchange: Option<String>,
    /// Confirm-mode channels shared by all requests.
    pub channels: usize,
    /// Time the broker has to confirm one event before the relay spools it or answers 503.
    pub publish_timeout_ms: u64,
    /// Times a nacked event is published again before it is dead-lettered.
    pub max_publish_attempts: u32,
    /// First reconnect delay; doubles per failure up to `reconnect_max_ms`, with jitter.
    pub reconnect_initial_ms: u64,
    /// Longest reconnect delay.
    pub reconnect_max_ms: u64,
    /// Declare the exchanges and queues at start-up.
    pub declare_topology: bool,
    /// Delays of the consumer retry path, one TTL queue each.
    pub retry_delays_ms: Vec<u64>,
    /// Deliveries of one message to consumers before it is parked.
    pub delivery_limit: u32,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            exchange: "hookrelay".into(),
            unrouted_exchange: None,
            dead_letter_exchange: None,
            channels: 4,
            publish_timeout_ms: 5_000,
            max_publish_attempts: 3,
            reconnect_initial_ms: 100,
            reconnect_max_ms: 10_000,
            declare_topology: true,
            retry_delays_ms: vec![10_000, 60_000, 600_000],
            delivery_limit: 5,
        }
    }
}

/// `[spool]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    /// Spool events to disk when the broker cannot confirm in time.
    pub enabled: bool,
    /// Directory of the spool segments.
    pub dir: PathBuf,
    /// Largest spool on disk; when full, requests get 503.
    pub max_bytes: u64,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings { enabled: true, dir: PathBuf::from("hookrelay-spool"), max_bytes: 1024 * 1024 * 1024 }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `plain` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `hookrelay=debug,lapin=warn`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { format: LogFormat::Plain, level: "info".into() }
    }
}

/// `[shutdown]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    /// Time in-flight requests get to finish after SIGTERM/SIGINT.
    pub grace_period_ms: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings { grace_period_ms: 10_000 }
    }
}

/// The kinds of source the relay can verify.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Patreon: HMAC-MD5 in `X-Patreon-Signature`.
    Patreon,
}

/// One string or a list of them (an environment variable can only give one).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single secret.
    One(SecretString),
    /// Several secrets.
    Many(Vec<SecretString>),
}

/// One path or a list of them (an environment variable can only give one).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PathList {
    /// A single path.
    One(PathBuf),
    /// Several paths.
    Many(Vec<PathBuf>),
}

impl Default for PathList {
    fn default() -> Self {
        PathList::Many(Vec::new())
    }
}

impl PathList {
    fn as_slice(&self) -> &[PathBuf] {
        match self {
            PathList::One(p) => std::slice::from_ref(p),
            PathList::Many(v) => v,
        }
    }
}

impl Default for OneOrMany {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

/// `[sources.<name>]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// The signature scheme: `patreon`.
    pub kind: SourceKind,
    /// Secrets that may sign, inline (any of them verifies a delivery).
    #[serde(default)]
    pub secrets: OneOrMany,
    /// Files holding one secret each (trailing newline ignored); a list or one path.
    #[serde(default)]
    pub secret_files: PathList,
    /// CloudEvents `source` attribute; defaults to `/webhooks/{name}`.
    #[serde(default)]
    pub cloudevents_source: Option<String>,
    /// Requests per second this source accepts before answering 429 with `Retry-After`;
    /// `0` (the default) turns the limit off. Checked before the body is read or the
    /// signature computed, so a flood is refused cheaply (and forged requests use the
    /// budget up too: pair it with `allowed_cidrs`).
    #[serde(default)]
    pub rate_limit_per_sec: u32,
    /// Requests accepted at once above the steady rate (the token bucket's size, in
    /// requests); defaults to `rate_limit_per_sec`. Needs `rate_limit_per_sec`.
    #[serde(default)]
    pub rate_limit_burst: Option<u32>,
    /// Client networks that may post to this source, as CIDRs (`10.0.0.0/8`,
    /// `2001:db8::/32`) or single addresses; from the environment, one comma-separated
    /// string. Empty (the default) allows every address. Matched against the TCP peer
    /// address before anything else is done (403); `X-Forwarded-For` is never trusted.
    #[serde(default)]
    pub allowed_cidrs: StringList,
}

/// One string (from the environment, comma-separated) or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StringList {
    /// `"a, b"`: split on commas, blanks trimmed, empty items dropped.
    One(String),
    /// `["a", "b"]`.
    Many(Vec<String>),
}

impl Default for StringList {
    fn default() -> Self {
        StringList::Many(Vec::new())
    }
}

impl StringList {
    /// The items, in order.
    pub fn items(&self) -> Vec<String> {
        match self {
            StringList::One(text) => {
                text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
            }
            StringList::Many(items) => items.clone(),
        }
    }
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

/// Loads settings from optional TOML text and an environment map. Only
/// `HOOKRELAY_<SECTION>__<KEY>` entries are read: every option lives in a section, so
/// a variable without `__` (`HOOKRELAY_CONFIG`, a script's `HOOKRELAY_BIN`) is not
/// an option and is left alone.
pub fn load(file_toml: Option<&str>, env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
    let env: config::Map<String, String> = env
        .iter()
        .filter(|(k, _)| k.strip_prefix("HOOKRELAY_").is_some_and(|rest| rest.contains("__")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    refuse_conflicting_variables(env.keys())?;
    let mut builder = config::Config::builder();
    if let Some(text) = file_toml {
        builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(env)),
    );
    let raw = builder.build().map_err(|e| ConfigError::Load(e.to_string()))?;
    raw.try_deserialize::<Settings>().map_err(|e| ConfigError::Load(e.to_string()))
}

/// Refuses two variables that set the same key (names differ only in case) or a key
/// and something inside it (`…__P` and `…__P__SECRETS`): which one wins would depend
/// on hash order, so the same environment could give different settings (found by the
/// config fuzz target). Names only in the message: values may be secrets.
fn refuse_conflicting_variables<'a>(names: impl Iterator<Item = &'a String>) -> Result<(), ConfigError> {
    let mut keys: Vec<(String, &String)> = names.map(|n| (n.to_lowercase(), n)).collect();
    keys.sort();
    for (i, (a, name_a)) in keys.iter().enumerate() {
        for (b, name_b) in &keys[i + 1..] {
            if a == b || b.strip_prefix(a.as_str()).is_some_and(|rest| rest.starts_with("__")) {
                return Err(ConfigError::Load(format!(
                    "environment variables {name_a} and {name_b} set the same setting; keep one"
                )));
            }
        }
    }
    Ok(())
}

/// Reads the file named by `path` (if any) and loads settings with `env`.
pub fn load_from(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
    let text = match path {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| ConfigError::Load(format!("cannot read {}: {e}", p.display())))?,
        ),
        None => None,
    };
    load(text.as_deref(), env)
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

/// Ingest listener limits.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Bind address.
    pub listen: SocketAddr,
    /// Body limit in bytes.
    pub max_body_bytes: u64,
    /// Header read timeout.
    pub header_read_timeout: Duration,
    /// Whole-request timeout.
    pub request_timeout: Duration,
    /// Concurrent connections.
    pub max_connections: usize,
    /// `Retry-After` seconds.
    pub retry_after_secs: u64,
}

/// Broker settings after validation.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// Broker URL (secret: may hold a password).
    pub url: SecretString,
    /// Main exchange.
    pub exchange: String,
    /// Alternate exchange, if any.
    pub unrouted_exchange: Option<String>,
    /// Dead-letter exchange, if any.
    pub dead_letter_exchange: Option<String>,
    /// Channel pool size.
    pub channels: usize,
    /// Confirm deadline per event.
    pub publish_timeout: Duration,
    /// Publish attempts before dead-lettering.
    pub max_publish_attempts: u32,
    /// First reconnect delay.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Declare topology at start-up.
    pub declare_topology: bool,
    /// Consumer retry delays.
    pub retry_delays: Vec<Duration>,
    /// Deliveries before parking.
    pub delivery_limit: u32,
}

/// Spool settings after validation.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory.
    pub dir: PathBuf,
    /// Size bound.
    pub max_bytes: u64,
}

/// One validated source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Name: the path segment and routing-key prefix.
    pub name: String,
    /// Signature scheme.
    pub kind: SourceKind,
    /// CloudEvents `source`.
    pub cloudevents_source: String,
    /// Keyed verifier holding the secrets (redacted `Debug`).
    pub verifier: PatreonVerifier,
    /// Per-source rate limit; `None` when off.
    pub rate_limit: Option<RateLimit>,
    /// Networks allowed to post; empty allows every address.
    pub allowlist: Allowlist,
}

/// A token bucket: `burst` requests at once, refilled at `per_sec` a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Steady rate, requests per second (at least 1).
    pub per_sec: u32,
    /// Bucket size, requests (at least 1).
    pub burst: u32,
}

/// A name usable in a path, a routing key, a queue name and a metric label.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| invalid(key, format!("`{value}` is not an address like 127.0.0.1:8080")))
}

fn positive(key: &str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 { Err(invalid(key, "must be greater than zero")) } else { Ok(value) }
}

impl Settings {
    /// Checks every value and builds the runtime configuration.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut warnings = Vec::new();
        let http = HttpConfig {
            listen: parse_addr("http.listen", &self.http.listen)?,
            max_body_bytes: positive("http.max_body_bytes", self.http.max_body_bytes)?,
            header_read_timeout: Duration::from_millis(positive(
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            )?),
            request_timeout: Duration::from_millis(positive(
                "http.request_timeout_ms",
                self.http.request_timeout_ms,
            )?),
            max_connections: positive("http.max_connections", self.http.max_connections as u64)? as usize,
            retry_after_secs: self.http.retry_after_secs,
        };
        let admin_listen = parse_addr("admin.listen", &self.admin.listen)?;

        let a = self.amqp;
        let url = a.url.expose_secret();
        if url.parse::<lapin::uri::AMQPUri>().is_err() {
            // The URL may hold a password: never echo it.
            return Err(invalid(
                "amqp.url",
                "not a valid AMQP URL (expected amqp://user:password@host:port/vhost)",
            ));
        }
        if !valid_exchange(&a.exchange) {
            return Err(invalid("amqp.exchange", "use 1-200 characters of [A-Za-z0-9._:-]"));
        }
        let derived =
            |key: &str, given: Option<String>, suffix: &str| -> Result<Option<String>, ConfigError> {
                match given {
                    None => Ok(Some(format!("{}.{suffix}", a.exchange))),
                    Some(s) if s.is_empty() => Ok(None),
                    Some(s) if valid_exchange(&s) => Ok(Some(s)),
                    Some(_) => Err(invalid(key, "use 1-200 characters of [A-Za-z0-9._:-]")),
                }
            };
        let amqp = AmqpConfig {
            url: a.url.clone(),
            unrouted_exchange: derived("amqp.unrouted_exchange", a.unrouted_exchange, "unrouted")?,
            dead_letter_exchange: derived("amqp.dead_letter_exchange", a.dead_letter_exchange, "dead")?,
            exchange: a.exchange,
            channels: positive("amqp.channels", a.channels as u64)? as usize,
            publish_timeout: Duration::from_millis(positive(
                "amqp.publish_timeout_ms",
                a.publish_timeout_ms,
            )?),
            max_publish_attempts: positive("amqp.max_publish_attempts", u64::from(a.max_publish_attempts))?
                as u32,
            reconnect_initial: Duration::from_millis(positive(
                "amqp.reconnect_initial_ms",
                a.reconnect_initial_ms,
            )?),
            reconnect_max: Duration::from_millis(positive("amqp.reconnect_max_ms", a.reconnect_max_ms)?),
            declare_topology: a.declare_topology,
            retry_delays: a.retry_delays_ms.iter().map(|&ms| Duration::from_millis(ms)).collect(),
            delivery_limit: positive("amqp.delivery_limit", u64::from(a.delivery_limit))? as u32,
        };
        if a.retry_delays_ms.contains(&0) {
            return Err(invalid("amqp.retry_delays_ms", "delays must be greater than zero"));
        }

        let spool = if self.spool.enabled {
            if self.spool.dir.as_os_str().is_empty() {
                return Err(invalid("spool.dir", "must name a directory when the spool is enabled"));
            }
            Some(SpoolConfig {
                dir: self.spool.dir,
                max_bytes: positive("spool.max_bytes", self.spool.max_bytes)?,
            })
        } else {
            None
        };

        if self.sources.is_empty() {
            return Err(invalid(
                "sources",
                "configure at least one source, e.g. [sources.patreon] kind = \"patreon\"",
            ));
        }
        let mut sources = Vec::with_capacity(self.sources.len());
        for (name, s) in self.sources {
            let key = format!("sources.{name}");
            if !valid_name(&name) {
                return Err(invalid(&key, "source names use 1-64 characters of [a-z0-9_-]"));
            }
            let mut secrets: Vec<SecretString> = match s.secrets {
                OneOrMany::One(one) => vec![one],
                OneOrMany::Many(many) => many,
            };
            for (i, path) in s.secret_files.as_slice().iter().enumerate() {
                let file_key = format!("{key}.secret_files[{i}]");
                secrets.push(read_secret_file(&file_key, path, &mut warnings)?);
            }
            if secrets.iter().any(|s| s.expose_secret().is_empty()) {
                return Err(invalid(format!("{key}.secrets"), "a secret is empty"));
            }
            if secrets.is_empty() {
                return Err(invalid(
                    format!("{key}.secrets"),
                    "a source needs at least one secret (secrets or secret_files)",
                ));
            }
            let verifier = PatreonVerifier::new(secrets.iter().map(|s| s.expose_secret().as_bytes()));
            let rate_limit = match (s.rate_limit_per_sec, s.rate_limit_burst) {
                (0, None) => None,
                (0, Some(_)) => {
                    return Err(invalid(
                        format!("{key}.rate_limit_burst"),
                        "needs rate_limit_per_sec greater than zero",
                    ));
                }
                (_, Some(0)) => {
                    return Err(invalid(format!("{key}.rate_limit_burst"), "must be greater than zero"));
                }
                (per_sec, burst) => Some(RateLimit { per_sec, burst: burst.unwrap_or(per_sec) }),
            };
            let mut networks = Vec::new();
            for (i, text) in s.allowed_cidrs.items().iter().enumerate() {
                let cidr = text
                    .parse::<Cidr>()
                    .map_err(|e| invalid(format!("{key}.allowed_cidrs[{i}]"), e.to_string()))?;
                networks.push(cidr);
            }
            sources.push(SourceConfig {
                cloudevents_source: s.cloudevents_source.unwrap_or_else(|| format!("/webhooks/{name}")),
                name,
                kind: s.kind,
                verifier,
                rate_limit,
                allowlist: Allowlist::new(networks),
            });
        }

        Ok(Config {
            http,
            admin_listen,
            amqp,
            spool,
            log_format: self.log.format,
            log_level: self.log.level,
            grace_period: Duration::from_millis(self.shutdown.grace_period_ms),
            sources,
            warnings,
        })
    }
}

fn valid_exchange(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Reads one secret from a file; warns (does not fail) when others may read it.
fn read_secret_file(key: &str, path: &Path, warnings: &mut Vec<String>) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {}", path.display(), e.kind())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o004 != 0
        {
            warnings.push(format!(
                "{key}: {} is readable by every user; restrict it (chmod 600 or 640)",
                path.display()
            ));
        }
    }
    let trimmed = text.trim_end_matches(['\n', '\r']);
    Ok(SecretString::from(trimmed.to_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const MINIMAL: &str = "[sources.patreon]\nkind = \"patreon\"\nsecrets = [\"s1\", \"s2\"]\n";

    #[test]
    fn defaults_and_file() {
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
    fn environment_overrides_file() {
        let e = env(&[
            ("HOOKRELAY_HTTP__LISTEN", "127.0.0.1:1234"),
            ("HOOKRELAY_AMQP__PUBLISH_TIMEOUT_MS", "250"),
            ("HOOKRELAY_SOURCES__OTHER__KIND", "patreon"),
            ("HOOKRELAY_SOURCES__OTHER__SECRETS", "only-one"),
            ("HOOKRELAY_CONFIG", "/ignored.toml"),
            ("HOOKRELAY_BIN", "/not/an/option"),
            ("PATH", "/bin"),
        ]);
        let cfg = load(Some(MINIMAL), &e).unwrap().validate().unwrap();
        assert_eq!(cfg.http.listen.to_string(), "127.0.0.1:1234");
        assert_eq!(cfg.amqp.publish_timeout, Duration::from_millis(250));
        let other = cfg.sources.iter().find(|s| s.name == "other").unwrap();
        assert_eq!(other.verifier.secret_count(), 1);
    }

    #[test]
    fn errors_name_the_key() {
        let err = load(Some("[http]\nlisten_addr = \"x\"\n"), &env(&[])).unwrap_err().to_string();
        assert!(err.contains("listen_addr"), "{err}");
        let err = load(Some("[sources.p]\nkind = \"patreon\"\n"), &env(&[]))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("sources.p.secrets"), "{err}");
        let text = format!("{MINIMAL}[amqp]\nurl = \"http://user:hunter2@host\"\n");
        let err = load(Some(&text), &env(&[])).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("amqp.url") && !err.contains("hunter2"), "{err}");
        let err = load(Some("[sources.Bad]\nkind = \"patreon\"\nsecrets = \"x\"\n"), &env(&[]))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("sources.Bad"), "{err}");
        let err = load(Some(MINIMAL), &env(&[("HOOKRELAY_HTTP__LISTEN", "nowhere")]))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("http.listen"), "{err}");
        let err = load(None, &env(&[])).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("sources"), "{err}");
    }

    #[test]
    fn secrets_from_files_and_redacted_debug() {
        let dir = std::env::temp_dir().join(format!("hookrelay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "file-secret-NOT-REAL\n").unwrap();
        let text = format!(
            "[sources.patreon]\nkind = \"patreon\"\nsecrets = \"inline-secret-NOT-REAL\"\nsecret_files = [\"{}\"]\n",
            path.display()
        );
        let settings = load(Some(&text), &env(&[])).unwrap();
        assert!(!format!("{settings:?}").contains("inline-secret-NOT-REAL"));
        let cfg = settings.validate().unwrap();
        assert_eq!(cfg.sources[0].verifier.secret_count(), 2);
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("NOT-REAL"), "{shown}");
        // One path from the environment.
        let e = env(&[
            ("HOOKRELAY_SOURCES__ENVONLY__KIND", "patreon"),
            ("HOOKRELAY_SOURCES__ENVONLY__SECRET_FILES", path.to_str().unwrap()),
        ]);
        let cfg = load(None, &e).unwrap().validate().unwrap();
        assert_eq!(cfg.sources[0].verifier.secret_count(), 1);
        assert!(!shown.contains("guest:guest"), "{shown}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rate_limit_and_allowlist_are_off_by_default_and_validated() {
        let cfg = load(Some(MINIMAL), &env(&[])).unwrap().validate().unwrap();
        assert_eq!(cfg.sources[0].rate_limit, None);
        assert!(cfg.sources[0].allowlist.allows_all());

        let text = format!("{MINIMAL}rate_limit_per_sec = 5\nallowed_cidrs = [\"10.0.0.0/8\", \"::1\"]\n");
        let cfg = load(Some(&text), &env(&[])).unwrap().validate().unwrap();
        assert_eq!(cfg.sources[0].rate_limit, Some(RateLimit { per_sec: 5, burst: 5 }));
        let shown: Vec<String> = cfg.sources[0].allowlist.networks().iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "::1/128"]);

        // From the environment: one comma-separated string.
        let e = env(&[
            ("HOOKRELAY_SOURCES__PATREON__RATE_LIMIT_PER_SEC", "2"),
            ("HOOKRELAY_SOURCES__PATREON__RATE_LIMIT_BURST", "10"),
            ("HOOKRELAY_SOURCES__PATREON__ALLOWED_CIDRS", "192.0.2.0/24, 2001:db8::/32"),
        ]);
        let cfg = load(Some(MINIMAL), &e).unwrap().validate().unwrap();
        assert_eq!(cfg.sources[0].rate_limit, Some(RateLimit { per_sec: 2, burst: 10 }));
        assert_eq!(cfg.sources[0].allowlist.networks().len(), 2);

        for (extra, key) in [
            ("rate_limit_burst = 3\n", "sources.patreon.rate_limit_burst"),
            ("rate_limit_per_sec = 1\nrate_limit_burst = 0\n", "sources.patreon.rate_limit_burst"),
            ("allowed_cidrs = [\"10.0.0.0/8\", \"10.0.0.1/8\"]\n", "sources.patreon.allowed_cidrs[1]"),
            ("allowed_cidrs = [\"example.com\"]\n", "sources.patreon.allowed_cidrs[0]"),
        ] {
            let text = format!("{MINIMAL}{extra}");
            let err = load(Some(&text), &env(&[])).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn conflicting_environment_variables_are_refused_by_name() {
        for pair in [
            [("HOOKRELAY_SOURCES__P", ""), ("HOOKRELAY_SOURCES__P__SECRETS", "env-secret-NOT-REAL")],
            [("HOOKRELAY_HTTP__LISTEN", "127.0.0.1:1"), ("HOOKRELAY_http__listen", "127.0.0.1:2")],
        ] {
            let err = load(Some(MINIMAL), &env(&pair)).unwrap_err().to_string();
            assert!(err.contains(pair[0].0) && err.contains(pair[1].0), "{err}");
            assert!(!err.contains("NOT-REAL") && !err.contains("127.0.0.1"), "{err}");
        }
        // A common prefix alone is no conflict.
        let e = env(&[("HOOKRELAY_SOURCES__P__KIND", "patreon"), ("HOOKRELAY_SOURCES__PA__KIND", "patreon")]);
        assert!(load(Some(MINIMAL), &e).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn a_world_readable_secret_file_warns_without_the_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hookrelay-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "perm-secret-NOT-REAL\n").unwrap();
        let text =
            format!("[sources.patreon]\nkind = \"patreon\"\nsecret_files = [\"{}\"]\n", path.display());
        for (mode, warns) in [(0o644, true), (0o604, true), (0o640, false), (0o600, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let cfg = load(Some(&text), &env(&[])).unwrap().validate().unwrap();
            assert_eq!(cfg.warnings.len(), usize::from(warns), "mode {mode:o}: {:?}", cfg.warnings);
            for w in &cfg.warnings {
                assert!(
                    w.contains("sources.patreon.secret_files[0]") && w.contains("readable by every user"),
                    "{w}"
                );
                assert!(!w.contains("perm-secret-NOT-REAL"), "{w}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
