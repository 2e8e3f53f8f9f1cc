//! The `[sources.<name>]` sections: each source's provider kind and its keys,
//! secrets (inline or from files), rate limit and allowlist, validated into a
//! [`SourceConfig`] whose verifier the kind's registered constructor builds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, OneOrMany, invalid, split_commas};
use crate::allowlist::{Allowlist, Cidr};
use crate::verify::{self, KindOptions, Provider, ProviderSettings};

/// Default of `tolerance_secs`.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;

fn default_tolerance_secs() -> u64 {
    DEFAULT_TOLERANCE_SECS
}

/// `[sources.<name>]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// The provider kind: `patreon`, `github`, `stripe`, `shopify`, `slack`,
    /// `standard-webhooks` or `hmac` (README, "Providers"). Required; an unknown kind
    /// stops start-up.
    pub kind: String,
    /// Secrets that may sign, inline (any of them verifies a delivery).
    #[serde(default)]
    pub secrets: OneOrMany<SecretString>,
    /// Files holding one secret each (trailing newline ignored); a list or one path.
    #[serde(default)]
    pub secret_files: OneOrMany<PathBuf>,
    /// CloudEvents `source` attribute; defaults to `/webhooks/{name}`.
    #[serde(default)]
    pub cloudevents_source: Option<String>,
    /// CloudEvents `type` prefix (the type is `{type_prefix}.{event}`); defaults to
    /// the kind's (`com.patreon`, `com.github`, `com.stripe`, `com.shopify`,
    /// `com.slack`) or, for `standard-webhooks` and `hmac`, the source name.
    #[serde(default)]
    pub type_prefix: Option<String>,
    /// Timestamped schemes (`stripe`, `slack`, `standard-webhooks`): how far the signed
    /// timestamp may be from now, in seconds, past or future, before a delivery is
    /// refused as `stale`; `0` turns the check off.
    #[serde(default = "default_tolerance_secs")]
    pub tolerance_secs: u64,
    /// `hmac` kind: the header carrying the signature (required for that kind).
    #[serde(default)]
    pub signature_header: Option<String>,
    /// `hmac` kind: `md5`, `sha1`, `sha256` (default) or `sha512`.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// `hmac` kind: how the digest is written, `hex` (default; either case) or `base64`.
    #[serde(default)]
    pub encoding: Option<String>,
    /// `hmac` kind: text before the digest in the header, e.g. `sha256=`; default none.
    #[serde(default)]
    pub signature_prefix: Option<String>,
    /// `hmac` kind: the header naming the event; without it every event is `webhook`.
    #[serde(default)]
    pub event_header: Option<String>,
    /// `hmac` kind: the header carrying the sender's delivery id (the event id is then
    /// derived from it, so a retry keeps its id).
    #[serde(default)]
    pub id_header: Option<String>,
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
    pub allowed_cidrs: OneOrMany<String>,
}

/// One validated source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Name: the path segment and routing-key prefix.
    pub name: String,
    /// Provider kind, as configured.
    pub kind: String,
    /// CloudEvents `source`.
    pub cloudevents_source: String,
    /// CloudEvents `type` prefix (no trailing dot).
    pub type_prefix: String,
    /// The kind's keyed verifier holding the secrets (redacted `Debug`).
    pub verifier: Arc<dyn Provider>,
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

/// A CloudEvents type prefix that keeps the type a plain dotted name.
fn valid_type_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 128
        && !prefix.ends_with('.')
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The source names, checked: at least one, each usable everywhere a name goes.
pub(super) fn validate_names(sources: &BTreeMap<String, SourceSettings>) -> Result<Vec<String>, ConfigError> {
    if sources.is_empty() {
        return Err(no_sources());
    }
    sources.keys().map(|name| check_name(name).map(|()| name.clone())).collect()
}

fn no_sources() -> ConfigError {
    invalid("sources", "configure at least one source, e.g. [sources.patreon] kind = \"patreon\"")
}

fn check_name(name: &str) -> Result<(), ConfigError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(invalid(format!("sources.{name}"), "source names use 1-64 characters of [a-z0-9_-]"))
    }
}

/// Every source, in name order; non-fatal findings go to `warnings`.
pub(super) fn validate_all(
    sources: BTreeMap<String, SourceSettings>,
    warnings: &mut Vec<String>,
) -> Result<Vec<SourceConfig>, ConfigError> {
    if sources.is_empty() {
        return Err(no_sources());
    }
    sources.into_iter().map(|(name, settings)| settings.validate(name, warnings)).collect()
}

impl SourceSettings {
    fn validate(self, name: String, warnings: &mut Vec<String>) -> Result<SourceConfig, ConfigError> {
        check_name(&name)?;
        let key = format!("sources.{name}");
        let kind = verify::kind(&self.kind).ok_or_else(|| {
            let kinds: Vec<&str> = verify::kind_names().collect();
            invalid(
                format!("{key}.kind"),
                format!("unknown kind `{}`; use one of: {}", self.kind, kinds.join(", ")),
            )
        })?;
        let secrets = secrets(&key, self.secrets, &self.secret_files, warnings)?;
        let options = KindOptions {
            signature_header: self.signature_header,
            algorithm: self.algorithm,
            encoding: self.encoding,
            signature_prefix: self.signature_prefix,
            event_header: self.event_header,
            id_header: self.id_header,
        };
        let provider_settings = ProviderSettings {
            secrets: secrets.iter().map(|s| s.expose_secret().as_bytes()).collect(),
            tolerance: (self.tolerance_secs > 0).then(|| Duration::from_secs(self.tolerance_secs)),
            options: &options,
        };
        let verifier: Arc<dyn Provider> = Arc::from(
            (kind.build)(&provider_settings).map_err(|e| invalid(format!("{key}.{}", e.key), e.problem))?,
        );
        let type_prefix = match self.type_prefix {
            Some(prefix) if valid_type_prefix(&prefix) => prefix,
            Some(_) => {
                let problem = "use 1-128 characters of [A-Za-z0-9._-], not ending in a dot";
                return Err(invalid(format!("{key}.type_prefix"), problem));
            }
            None => kind.default_type_prefix.unwrap_or(&name).to_owned(),
        };
        let rate_limit = match (self.rate_limit_per_sec, self.rate_limit_burst) {
            (0, None) => None,
            (0, Some(_)) => {
                let problem = "needs rate_limit_per_sec greater than zero";
                return Err(invalid(format!("{key}.rate_limit_burst"), problem));
            }
            (_, Some(0)) => {
                return Err(invalid(format!("{key}.rate_limit_burst"), "must be greater than zero"));
            }
            (per_sec, burst) => Some(RateLimit { per_sec, burst: burst.unwrap_or(per_sec) }),
        };
        Ok(SourceConfig {
            allowlist: allowlist(&key, self.allowed_cidrs)?,
            cloudevents_source: self.cloudevents_source.unwrap_or_else(|| format!("/webhooks/{name}")),
            name,
            kind: self.kind,
            type_prefix,
            verifier,
            rate_limit,
        })
    }
}

/// Inline secrets, then those of the files; none empty, at least one.
fn secrets(
    key: &str,
    inline: OneOrMany<SecretString>,
    files: &OneOrMany<PathBuf>,
    warnings: &mut Vec<String>,
) -> Result<Vec<SecretString>, ConfigError> {
    let mut secrets = inline.into_vec();
    for (i, path) in files.as_slice().iter().enumerate() {
        secrets.push(read_secret_file(&format!("{key}.secret_files[{i}]"), path, warnings)?);
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
    Ok(secrets)
}

/// One string from the environment is a comma-separated list (blanks trimmed, empty
/// items dropped); a list from a file is taken as it is.
fn allowlist(key: &str, cidrs: OneOrMany<String>) -> Result<Allowlist, ConfigError> {
    let items: Vec<String> = match cidrs {
        OneOrMany::One(text) => split_commas(&text).map(str::to_owned).collect(),
        OneOrMany::Many(items) => items,
    };
    let networks = items
        .iter()
        .enumerate()
        .map(|(i, text)| {
            text.parse::<Cidr>().map_err(|e| invalid(format!("{key}.allowed_cidrs[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Allowlist::new(networks))
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
    use crate::config::load;
    use crate::config::tests::{MINIMAL, env, error_of};

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
            let err = error_of(Some(&text), &env(&[]));
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn kinds_are_validated_and_name_the_key() {
        let err = error_of(Some("[sources.x]\nkind = \"patron\"\nsecrets = \"s\"\n"), &env(&[]));
        assert!(err.contains("sources.x.kind") && err.contains("patron") && err.contains("github"), "{err}");
        let err = error_of(
            Some("[sources.x]\nkind = \"github\"\nsecrets = \"s\"\nalgorithm = \"md5\"\n"),
            &env(&[]),
        );
        assert!(err.contains("sources.x.algorithm") && err.contains("hmac"), "{err}");
        let err = error_of(Some("[sources.x]\nkind = \"hmac\"\nsecrets = \"s\"\n"), &env(&[]));
        assert!(err.contains("sources.x.signature_header"), "{err}");
        let err = error_of(
            Some("[sources.x]\nkind = \"standard-webhooks\"\nsecrets = \"whsec_not-base64-NOT-REAL!\"\n"),
            &env(&[]),
        );
        assert!(err.contains("sources.x.secrets") && !err.contains("NOT-REAL"), "{err}");
        let err = error_of(
            Some("[sources.x]\nkind = \"github\"\nsecrets = \"s\"\ntype_prefix = \"com.x.\"\n"),
            &env(&[]),
        );
        assert!(err.contains("sources.x.type_prefix"), "{err}");
        let err = error_of(
            None,
            &env(&[("HOOKRELAY_SOURCES__Y__KIND", "nope"), ("HOOKRELAY_SOURCES__Y__SECRETS", "s")]),
        );
        assert!(err.contains("sources.y.kind"), "{err}");
    }

    #[test]
    fn kinds_get_their_defaults_and_keys() {
        let text = concat!(
            "[sources.gh]\nkind = \"github\"\nsecrets = [\"a\", \"b\"]\n",
            "[sources.sw]\nkind = \"standard-webhooks\"\nsecrets = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\ntolerance_secs = 0\n",
            "[sources.generic]\nkind = \"hmac\"\nsecrets = \"s\"\nsignature_header = \"X-Sig\"\nalgorithm = \"sha1\"\n",
            "encoding = \"base64\"\nsignature_prefix = \"sha1=\"\nevent_header = \"X-Event\"\nid_header = \"X-Id\"\n",
            "type_prefix = \"org.example\"\n",
        );
        let cfg = load(Some(text), &env(&[])).unwrap().validate().unwrap();
        let by = |n: &str| cfg.sources.iter().find(|s| s.name == n).unwrap();
        assert_eq!(by("gh").type_prefix, "com.github");
        assert_eq!(by("gh").verifier.shape().secret_count, 2);
        assert_eq!(by("sw").type_prefix, "sw");
        assert_eq!(by("generic").type_prefix, "org.example");
        let names: Vec<&str> = by("generic").verifier.shape().single.iter().map(|h| h.as_str()).collect();
        assert_eq!(names, ["x-sig", "x-event", "x-id"]);
        let e = env(&[
            ("HOOKRELAY_SOURCES__ST__KIND", "stripe"),
            ("HOOKRELAY_SOURCES__ST__SECRETS", "whsec_x"),
            ("HOOKRELAY_SOURCES__ST__TOLERANCE_SECS", "60"),
        ]);
        let cfg = load(None, &e).unwrap().validate().unwrap();
        assert_eq!(cfg.sources[0].type_prefix, "com.stripe");
        assert_eq!(DEFAULT_TOLERANCE_SECS, 300);
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
