//! Configuration parsing and validation on arbitrary TOML text and environment.
//!
//! Input layout: `toml \0 KEY=VALUE\n…`; each KEY is prefixed with `HOOKRELAY_`.
//! Checks that loading and validation never panic, and that no `Debug` output and no
//! validation error depends on a webhook secret's value: the same input with every
//! secret replaced by another of the same length must print exactly the same (a
//! differential check, so text that merely looks like a secret is no false alarm).
//! The AMQP URL, which may hold a password, is checked by search where it is
//! unmistakable.
#![no_main]

use std::collections::HashMap;

use hookrelay::config::{OneOrMany, Settings};
use libfuzzer_sys::fuzz_target;
use secrecy::{ExposeSecret, SecretString};

fn load(text: &str, env: &HashMap<String, String>) -> Option<Settings> {
    let mut settings = hookrelay::config::load(Some(text), env).ok()?;
    // Secret files are read from disk; the fuzzer must not open arbitrary paths.
    for source in settings.sources.values_mut() {
        source.secret_files = Default::default();
    }
    Some(settings)
}

/// Replaces every webhook secret with `Q`s of the same length (emptiness, and so
/// validity, unchanged).
fn substitute(settings: &mut Settings) {
    let q = |s: &SecretString| SecretString::from("Q".repeat(s.expose_secret().len()));
    for source in settings.sources.values_mut() {
        source.secrets = match &source.secrets {
            OneOrMany::One(s) => OneOrMany::One(q(s)),
            OneOrMany::Many(many) => OneOrMany::Many(many.iter().map(q).collect()),
        };
    }
}

/// `Debug` of the validated config, or the error text.
fn outcome(settings: Settings) -> String {
    match settings.validate() {
        Ok(config) => {
            assert!(!config.sources.is_empty());
            format!("ok: {config:?}")
        }
        Err(e) => format!("error: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let (text, env_part) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b""[..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let env: HashMap<String, String> = String::from_utf8_lossy(env_part)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (format!("HOOKRELAY_{k}"), v.to_owned()))
        .collect();
    let (Some(original), Some(mut other)) = (load(text, &env), load(text, &env)) else {
        return;
    };
    substitute(&mut other);
    // One URL or several: the check below needs one to look for.
    let url = original.amqp.url.as_slice().first().map(|u| u.expose_secret().to_owned()).unwrap_or_default();
    let shown = format!("{original:?}");
    assert_eq!(shown, format!("{other:?}"), "Debug of Settings depends on a secret");
    let (a, b) = (outcome(original), outcome(other));
    assert_eq!(a, b, "validation output depends on a secret");

    // The URL: only when it carries credentials and appears once in the input, so
    // finding it can only mean it was echoed.
    let input = format!("{text}\n{}", env.values().cloned().collect::<Vec<_>>().join("\n"));
    if url.contains("://") && url.contains('@') && input.matches(url.as_str()).count() == 1 {
        assert!(!shown.contains(&url), "the AMQP URL reached Debug of Settings");
        assert!(!a.contains(&url), "the AMQP URL reached the validation output: {a}");
    }
});
