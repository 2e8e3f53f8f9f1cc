//! Configuration parsing and validation on arbitrary TOML text and environment.
//!
//! Input layout: `toml \0 KEY=VALUE\n…`; each KEY is prefixed with `HOOKRELAY_`.
//! Checks that loading and validation never panic, and that neither `Debug` output
//! nor a validation error repeats a configured secret (a webhook secret or the AMQP
//! URL, which may hold a password).
#![no_main]

use std::collections::HashMap;

use hookrelay::config::OneOrMany;
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;

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
    let Ok(mut settings) = hookrelay::config::load(Some(text), &env) else {
        return;
    };
    // Secret files are read from disk; the fuzzer must not open arbitrary paths.
    for source in settings.sources.values_mut() {
        source.secret_files = Default::default();
    }
    // Secrets that can only have come from a secret position of the input: long,
    // written literally in quotes exactly once (or as a whole environment value), and
    // nowhere else, so finding one in the output is a leak, not a coincidence.
    let mut secrets: Vec<String> = vec![settings.amqp.url.expose_secret().to_owned()];
    for source in settings.sources.values() {
        match &source.secrets {
            OneOrMany::One(s) => secrets.push(s.expose_secret().to_owned()),
            OneOrMany::Many(many) => secrets.extend(many.iter().map(|s| s.expose_secret().to_owned())),
        }
    }
    let input = format!("{text}\n{}", env.values().cloned().collect::<Vec<_>>().join("\n"));
    let traceable = |s: &&String| {
        s.len() >= 12
            && input.matches(s.as_str()).count() == 1
            && (input.contains(&format!("\"{s}\""))
                || input.contains(&format!("'{s}'"))
                || env.values().any(|v| v == *s))
    };
    let secrets: Vec<String> = secrets.iter().filter(traceable).cloned().collect();
    let check = |shown: &str, what: &str| {
        for s in &secrets {
            assert!(!shown.contains(s.as_str()), "a secret reached {what}: {shown}");
        }
    };
    check(&format!("{settings:?}"), "Debug of Settings");
    match settings.validate() {
        Ok(config) => {
            check(&format!("{config:?}"), "Debug of Config");
            assert!(!config.sources.is_empty());
        }
        Err(e) => check(&e.to_string(), "an error"),
    }
});
