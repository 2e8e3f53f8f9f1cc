//! The `[amqp]` section: the broker connection, the publish policy and the exchange
//! names the topology is built from, with their validation.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, OneOrMany, invalid, positive, positive_ms, split_commas};

/// `[amqp]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// Broker URL (`amqp://user:password@host:port/vhost`), or a list of them, one per
    /// node of a RabbitMQ cluster; one string (as from the environment) may hold several,
    /// comma-separated. The relay starts at a random one and tries the others in turn.
    /// Each is a secret: logs show host:port only.
    pub url: OneOrMany<SecretString>,
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
    /// AMQP heartbeat interval asked of the broker; a connection silent for about two
    /// intervals is declared dead even with no traffic. A URL's `?heartbeat=` wins.
    pub heartbeat_secs: u64,
    /// Declare the exchanges and queues at start-up.
    pub declare_topology: bool,
    /// Delays of the consumer retry path, one TTL queue each.
    pub retry_delays_ms: Vec<u64>,
    /// Deliveries of one message to consumers before it is parked.
    pub delivery_limit: u32,
    /// Members each quorum queue is created with (`x-quorum-initial-group-size`), e.g. 3
    /// on a cluster of three or more nodes; unset lets the broker decide.
    pub quorum_initial_group_size: Option<u32>,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            url: OneOrMany::One(SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f")),
            exchange: "hookrelay".into(),
            unrouted_exchange: None,
            dead_letter_exchange: None,
            channels: 4,
            publish_timeout_ms: 5_000,
            max_publish_attempts: 3,
            reconnect_initial_ms: 100,
            reconnect_max_ms: 10_000,
            // In RabbitMQ's recommended 5-20 s range: an idle dead connection is found in
            // 20-25 s (one with traffic sooner, by its confirm timeout), while a loaded
            // host's pauses stay far from false alarms.
            heartbeat_secs: 10,
            declare_topology: true,
            retry_delays_ms: vec![10_000, 60_000, 600_000],
            delivery_limit: 5,
            quorum_initial_group_size: None,
        }
    }
}

/// Broker settings after validation.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// Broker URLs, one per node, in the configured order (secrets: may hold passwords).
    pub urls: Vec<SecretString>,
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
    /// Heartbeat interval to negotiate (seconds).
    pub heartbeat_secs: u16,
    /// Declare topology at start-up.
    pub declare_topology: bool,
    /// Consumer retry delays.
    pub retry_delays: Vec<Duration>,
    /// Deliveries before parking.
    pub delivery_limit: u32,
    /// Quorum queue members at creation; `None` lets the broker decide.
    pub quorum_initial_group_size: Option<u32>,
}

const EXCHANGE_RULE: &str = "use 1-200 characters of [A-Za-z0-9._:-]";

fn valid_exchange(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl AmqpSettings {
    /// The whole section, the URLs first.
    pub(super) fn validate(self) -> Result<AmqpConfig, ConfigError> {
        let config = self.validate_topology()?;
        if config.urls.is_empty() {
            return Err(invalid("amqp.url", "give at least one broker URL"));
        }
        for (i, url) in config.urls.iter().enumerate() {
            if url.expose_secret().parse::<lapin::uri::AMQPUri>().is_err() {
                // The URL may hold a password: never echo it.
                let key =
                    if config.urls.len() == 1 { "amqp.url".to_owned() } else { format!("amqp.url[{i}]") };
                return Err(invalid(
                    key,
                    "not a valid AMQP URL (expected amqp://user:password@host:port/vhost)",
                ));
            }
        }
        Ok(config)
    }

    /// Everything but the URL, which is carried unchecked: enough to describe the
    /// topology without a broker.
    pub(super) fn validate_topology(self) -> Result<AmqpConfig, ConfigError> {
        if !valid_exchange(&self.exchange) {
            return Err(invalid("amqp.exchange", EXCHANGE_RULE));
        }
        // Unset: derived from the main exchange; empty: disabled.
        let derived = |key: &str, given: Option<String>, suffix: &str| match given {
            None => Ok(Some(format!("{}.{suffix}", self.exchange))),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) if valid_exchange(&s) => Ok(Some(s)),
            Some(_) => Err(invalid(key, EXCHANGE_RULE)),
        };
        let config = AmqpConfig {
            unrouted_exchange: derived("amqp.unrouted_exchange", self.unrouted_exchange, "unrouted")?,
            dead_letter_exchange: derived("amqp.dead_letter_exchange", self.dead_letter_exchange, "dead")?,
            channels: positive("amqp.channels", self.channels as u64)? as usize,
            publish_timeout: positive_ms("amqp.publish_timeout_ms", self.publish_timeout_ms)?,
            max_publish_attempts: positive("amqp.max_publish_attempts", u64::from(self.max_publish_attempts))?
                as u32,
            reconnect_initial: positive_ms("amqp.reconnect_initial_ms", self.reconnect_initial_ms)?,
            reconnect_max: positive_ms("amqp.reconnect_max_ms", self.reconnect_max_ms)?,
            heartbeat_secs: match self.heartbeat_secs {
                1..=3600 => self.heartbeat_secs as u16,
                _ => return Err(invalid("amqp.heartbeat_secs", "use 1 to 3600 seconds")),
            },
            declare_topology: self.declare_topology,
            retry_delays: self.retry_delays_ms.iter().map(|&ms| Duration::from_millis(ms)).collect(),
            delivery_limit: positive("amqp.delivery_limit", u64::from(self.delivery_limit))? as u32,
            quorum_initial_group_size: match self.quorum_initial_group_size {
                Some(n) => Some(positive("amqp.quorum_initial_group_size", u64::from(n))? as u32),
                None => None,
            },
            urls: url_list(self.url),
            exchange: self.exchange,
        };
        if self.retry_delays_ms.contains(&0) {
            return Err(invalid("amqp.retry_delays_ms", "delays must be greater than zero"));
        }
        Ok(config)
    }
}

/// The URLs in order; one string may hold several, comma-separated (a comma inside a
/// password is written `%2C`).
fn url_list(url: OneOrMany<SecretString>) -> Vec<SecretString> {
    url.into_vec()
        .iter()
        .flat_map(|u| split_commas(u.expose_secret()).map(SecretString::from).collect::<Vec<_>>())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use secrecy::ExposeSecret;

    use crate::config::load;
    use crate::config::tests::{MINIMAL, env, error_of};

    fn urls(text: &str, vars: &[(&str, &str)]) -> Vec<String> {
        let cfg = load(Some(text), &env(vars)).unwrap().validate().unwrap();
        cfg.amqp.urls.iter().map(|u| u.expose_secret().to_owned()).collect()
    }

    #[test]
    fn the_url_is_one_or_a_list_and_the_environment_separates_with_commas() {
        let one = "amqp://u:p@a:5672/%2f";
        assert_eq!(urls(MINIMAL, &[]), ["amqp://guest:guest@127.0.0.1:5672/%2f"]);
        assert_eq!(urls(&format!("{MINIMAL}[amqp]\nurl = \"{one}\"\n"), &[]), [one]);
        let list = format!("{MINIMAL}[amqp]\nurl = [\"amqp://u:p@a/%2f\", \"amqp://u:p@b/%2f\"]\n");
        assert_eq!(urls(&list, &[]), ["amqp://u:p@a/%2f", "amqp://u:p@b/%2f"]);
        let vars = [("HOOKRELAY_AMQP__URL", "amqp://u:p@a/%2f, amqp://u:p@b/%2f,amqp://u:p@c/%2f,")];
        assert_eq!(urls(MINIMAL, &vars), ["amqp://u:p@a/%2f", "amqp://u:p@b/%2f", "amqp://u:p@c/%2f"]);
    }

    #[test]
    fn a_bad_url_in_a_list_is_named_by_position_and_never_shown() {
        let vars = [("HOOKRELAY_AMQP__URL", "amqp://u:p@a/%2f,http://u:hunter2@b")];
        let err = error_of(Some(MINIMAL), &env(&vars));
        assert!(err.contains("amqp.url[1]") && !err.contains("hunter2"), "{err}");
        let err = error_of(Some(&format!("{MINIMAL}[amqp]\nurl = []\n")), &env(&[]));
        assert!(err.contains("amqp.url"), "{err}");
    }

    #[test]
    fn the_quorum_group_size_is_unset_by_default_and_positive_when_set() {
        let cfg = load(Some(MINIMAL), &env(&[])).unwrap().validate().unwrap();
        assert_eq!(cfg.amqp.quorum_initial_group_size, None);
        let vars = [("HOOKRELAY_AMQP__QUORUM_INITIAL_GROUP_SIZE", "3")];
        let cfg = load(Some(MINIMAL), &env(&vars)).unwrap().validate().unwrap();
        assert_eq!(cfg.amqp.quorum_initial_group_size, Some(3));
        let err = error_of(Some(&format!("{MINIMAL}[amqp]\nquorum_initial_group_size = 0\n")), &env(&[]));
        assert!(err.contains("amqp.quorum_initial_group_size"), "{err}");
    }
}
