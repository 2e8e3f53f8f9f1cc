//! The registry of provider kinds ([`KINDS`]) and what a kind is built from: the
//! source's secrets, tolerance and kind-specific options, and what `hookrelay sign`
//! needs to produce a delivery's headers.

use std::time::Duration;

use super::{Provider, github, hmac_generic, patreon, shopify, slack, standard, stripe};

/// The per-kind settings a source may carry (only the `hmac` kind reads the optional
/// ones; every other kind refuses them).
#[derive(Debug, Default, Clone)]
pub struct KindOptions {
    /// `hmac`: header carrying the signature (required).
    pub signature_header: Option<String>,
    /// `hmac`: `md5`, `sha1`, `sha256` (default) or `sha512`.
    pub algorithm: Option<String>,
    /// `hmac`: `hex` (default) or `base64`.
    pub encoding: Option<String>,
    /// `hmac`: text before the digest in the header, e.g. `sha256=`.
    pub signature_prefix: Option<String>,
    /// `hmac`: header naming the event.
    pub event_header: Option<String>,
    /// `hmac`: header carrying the delivery id.
    pub id_header: Option<String>,
}

impl KindOptions {
    /// The options that are set, with their key names.
    fn set(&self) -> impl Iterator<Item = &'static str> + '_ {
        [
            ("signature_header", &self.signature_header),
            ("algorithm", &self.algorithm),
            ("encoding", &self.encoding),
            ("signature_prefix", &self.signature_prefix),
            ("event_header", &self.event_header),
            ("id_header", &self.id_header),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| k)
    }

    /// Refuses every option: for kinds that take none.
    pub(crate) fn refuse_all(&self, kind: &str) -> Result<(), SettingError> {
        match self.set().next() {
            Some(key) => {
                Err(SettingError { key, problem: format!("is only for kind \"hmac\", not \"{kind}\"") })
            }
            None => Ok(()),
        }
    }
}

/// What a kind's constructor gets from the source's configuration.
#[derive(Debug)]
pub struct ProviderSettings<'s> {
    /// The secrets that may sign (several during a rotation), as configured.
    pub secrets: Vec<&'s [u8]>,
    /// How far a signed timestamp may be from now; `None` turns the check off.
    pub tolerance: Option<Duration>,
    /// Kind-specific options.
    pub options: &'s KindOptions,
}

/// A setting a kind refuses, with the key (relative to the source) at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct SettingError {
    /// The key under `sources.<name>`, e.g. `secrets` or `algorithm`.
    pub key: &'static str,
    /// What is wrong (never a secret value).
    pub problem: String,
}

/// Header names and values, in the order a sender writes them.
pub type HeaderLines = Vec<(String, String)>;

/// What `hookrelay sign` signs: a body as a sender of this kind would deliver it.
#[derive(Debug)]
pub struct SignInput<'a> {
    /// The secret as configured (e.g. `whsec_…` for Stripe and Standard Webhooks).
    pub secret: &'a [u8],
    /// The exact body.
    pub body: &'a [u8],
    /// The event name, for kinds that carry it in a header (default per kind).
    pub event: Option<&'a str>,
    /// The delivery id, for kinds that send one.
    pub id: &'a str,
    /// The signed timestamp (Unix seconds), for kinds that sign one.
    pub timestamp: u64,
    /// The `hmac` kind's options (the others take none).
    pub options: &'a KindOptions,
}

/// One registered provider kind.
pub struct Kind {
    /// The value of `sources.<name>.kind`.
    pub name: &'static str,
    /// The default CloudEvents type prefix; `None` means the source's name.
    pub default_type_prefix: Option<&'static str>,
    /// Builds the source's verifier.
    pub build: fn(&ProviderSettings<'_>) -> Result<Box<dyn Provider>, SettingError>,
    /// The headers (name, value) a delivery carries: what `hookrelay sign` prints.
    pub sign: fn(&SignInput<'_>) -> Result<HeaderLines, SettingError>,
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every provider kind: the one place kinds are registered.
pub const KINDS: &[Kind] = &[
    patreon::KIND,
    github::KIND,
    stripe::KIND,
    shopify::KIND,
    slack::KIND,
    standard::KIND,
    hmac_generic::KIND,
];

/// The kind `hookrelay sign` uses when none is named (the relay's first provider).
pub const DEFAULT_KIND: &str = super::patreon::KIND.name;

/// The kind registered under `name`.
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// The headers a delivery of `input` by a sender of kind `name` carries (what
/// `hookrelay sign` prints), or why it cannot be made.
pub fn sign(name: &str, input: &SignInput<'_>) -> Result<HeaderLines, String> {
    let kinds: Vec<&str> = kind_names().collect();
    let kind =
        kind(name).ok_or_else(|| format!("unknown kind `{name}`; use one of: {}", kinds.join(", ")))?;
    (kind.sign)(input).map_err(|e| e.to_string())
}

/// The names of every kind, for error messages and documentation.
pub fn kind_names() -> impl Iterator<Item = &'static str> {
    KINDS.iter().map(|k| k.name)
}
