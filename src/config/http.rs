//! The `[http]` (ingest listener) and `[admin]` sections and their validation.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, parse_addr, positive, positive_ms};

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

impl HttpSettings {
    pub(super) fn validate(self) -> Result<HttpConfig, ConfigError> {
        Ok(HttpConfig {
            listen: parse_addr("http.listen", &self.listen)?,
            max_body_bytes: positive("http.max_body_bytes", self.max_body_bytes)?,
            header_read_timeout: positive_ms("http.header_read_timeout_ms", self.header_read_timeout_ms)?,
            request_timeout: positive_ms("http.request_timeout_ms", self.request_timeout_ms)?,
            max_connections: positive("http.max_connections", self.max_connections as u64)? as usize,
            retry_after_secs: self.retry_after_secs,
        })
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

impl AdminSettings {
    pub(super) fn validate(self) -> Result<SocketAddr, ConfigError> {
        parse_addr("admin.listen", &self.listen)
    }
}
