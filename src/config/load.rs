//! Loading: built-in defaults ← optional TOML file ← `HOOKRELAY_…` environment, into
//! the unvalidated [`Settings`] tree.

use std::collections::HashMap;
use std::path::Path;

use super::{ConfigError, Settings};

/// Environment prefix; `HOOKRELAY_HTTP__LISTEN` sets `http.listen`.
pub const ENV_PREFIX: &str = "HOOKRELAY";
/// Environment variable naming the configuration file (not itself an option).
pub const CONFIG_FILE_ENV: &str = "HOOKRELAY_CONFIG";

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::tests::{MINIMAL, env};

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
}
