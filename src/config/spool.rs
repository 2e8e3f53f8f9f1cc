//! The `[spool]` section and its validation.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, invalid, positive};

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

/// Spool settings after validation.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory.
    pub dir: PathBuf,
    /// Size bound.
    pub max_bytes: u64,
}

impl SpoolSettings {
    /// `None` when the spool is disabled.
    pub(super) fn validate(self) -> Result<Option<SpoolConfig>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        if self.dir.as_os_str().is_empty() {
            return Err(invalid("spool.dir", "must name a directory when the spool is enabled"));
        }
        Ok(Some(SpoolConfig { dir: self.dir, max_bytes: positive("spool.max_bytes", self.max_bytes)? }))
    }
}
