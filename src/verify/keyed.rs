//! The verifier the HMAC-SHA256 kinds share (GitHub, Stripe, Shopify, Slack, Standard
//! Webhooks): what a source keeps (its pre-keyed secrets, the timestamp tolerance, the
//! header names it reads, its shape), with each kind's rule as a plain function.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use super::event::EventSource;
use super::keys::Sha256Keys;
use super::{
    HeaderLines, HeaderMap, HeaderName, Outcome, Provider, ProviderSettings, SettingError, Shape, SignInput,
    SignatureError,
};

/// A kind's rule: reads `source`'s headers from the request, checks the MAC with
/// [`Keyed::check`], then names the event.
pub(crate) type Rule<const N: usize> =
    for<'a> fn(&Keyed<N>, &'a HeaderMap, &'a [u8], SystemTime) -> Outcome<'a>;

/// A kind's documented event names (the `event` metric label is one of them or
/// `other`), read once from a list beside its module, one name per line.
pub(crate) type KnownEvents = LazyLock<Vec<&'static str>>;

/// The names in `list`, one per line (blank lines are skipped).
pub(crate) fn lines(list: &'static str) -> Vec<&'static str> {
    list.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// The headers (event, delivery id, signature, named as `names` says) of a delivery
/// whose signature covers its body alone (GitHub, Shopify): what `hookrelay sign`
/// prints for such a kind. `sign` makes the signature header's value from the secret
/// and the body.
pub(crate) fn body_signed_headers(
    input: &SignInput<'_>,
    kind: &'static str,
    [event, id, signature]: [&str; 3],
    default_event: &str,
    sign: fn(&[u8], &[u8]) -> String,
) -> Result<HeaderLines, SettingError> {
    input.options.refuse_all(kind)?;
    Ok(vec![
        (event.into(), input.event.unwrap_or(default_event).into()),
        (id.into(), input.id.into()),
        (signature.into(), sign(input.secret, input.body)),
    ])
}

/// What one source of an HMAC-SHA256 kind keeps. `Debug` shows no key material.
pub(crate) struct Keyed<const N: usize> {
    /// The secrets, keyed once (checked through [`Keyed::check`]).
    keys: Sha256Keys,
    /// How far a signed timestamp may be from now (`None`: not checked).
    pub tolerance: Option<Duration>,
    /// The headers the rule reads, in the order the kind listed them.
    pub names: [HeaderName; N],
    shape: Shape,
    rule: Rule<N>,
}

/// What a kind says about its headers and events when it builds a [`Keyed`].
pub(crate) struct Layout<const N: usize> {
    /// The kind's name, for refusing options it does not take.
    pub kind: &'static str,
    /// The single headers the rule reads.
    pub names: [&'static str; N],
    /// Which of them names the event (an index into `names`), and how refusals call it.
    pub event: Option<(usize, EventSource)>,
    /// The event labels the kind documents.
    pub known: &'static [&'static str],
}

impl<const N: usize> Keyed<N> {
    /// A source of the kind `layout` describes, signed with `secrets` (as the kind
    /// reads them; most use the configured text as is).
    pub(crate) fn build<'s>(
        settings: &ProviderSettings<'_>,
        secrets: impl IntoIterator<Item = &'s [u8]>,
        layout: Layout<N>,
        rule: Rule<N>,
    ) -> Result<Box<dyn Provider>, SettingError> {
        settings.options.refuse_all(layout.kind)?;
        let keys = Sha256Keys::new(secrets);
        let names = layout.names.map(HeaderName::from_static);
        let shape = Shape::new(&names, layout.event, layout.known, keys.len());
        Ok(Box::new(Keyed { keys, tolerance: settings.tolerance, names, shape, rule }))
    }

    /// The known event labels.
    pub(crate) fn known(&self) -> &'static [&'static str] {
        self.shape.known_events
    }

    /// Whether any secret's MAC over the concatenated `parts` is one of `candidates`
    /// (compared in constant time); a mismatch otherwise.
    pub(crate) fn check<C: AsRef<[u8]>>(
        &self,
        parts: &[&[u8]],
        candidates: &[C],
    ) -> Result<(), SignatureError> {
        self.keys.check(parts, candidates)
    }
}

impl<const N: usize> std::fmt::Debug for Keyed<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyed")
            .field("keys", &self.keys)
            .field("tolerance", &self.tolerance)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl<const N: usize> Provider for Keyed<N> {
    fn shape(&self) -> &Shape {
        &self.shape
    }

    fn verify<'a>(&self, headers: &'a HeaderMap, body: &'a [u8], now: SystemTime) -> Outcome<'a> {
        (self.rule)(self, headers, body, now)
    }
}
