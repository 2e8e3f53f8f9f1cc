//! The `[log]` and `[shutdown]` sections: process-wide behaviour with nothing to
//! check beyond what serde already does.

use std::time::Duration;

use serde::Deserialize;

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

impl ShutdownSettings {
    pub(super) fn grace_period(&self) -> Duration {
        Duration::from_millis(self.grace_period_ms)
    }
}
