//! Proves that a webhook is authentic and says what it is: one module per provider
//! kind behind the one [`Provider`] interface.
//!
//! Pure: takes the request headers, the raw body and the current time (injected,
//! never read here), returns typed results, and knows nothing of HTTP servers,
//! brokers or runtimes. A [`Verified`] value can only be made in this module tree, so
//! code that needs an authenticated body (the envelope) cannot be handed an
//! unverified one by mistake.
//!
//! # The interface
//!
//! ```text
//! trait Provider {
//!     fn shape(&self) -> &Shape;  // single headers (refused twice, from the head), the
//!                                 // event header, known events (bounded labels), secret count
//!     fn verify(&self, headers, body, now) -> Result<Verified, VerifyError>;
//! }
//! Verified { body, event name, label, delivery id?, subject?, data: Json | Binary, reply? }
//! VerifyError = Signature(missing | malformed | mismatch | stale)   → 401
//!             | Event(missing | malformed, from a header or the body) → 400
//!             | Json(invalid | too deep)                              → 400
//! ```
//!
//! A kind is registered once in [`KINDS`] with its name, its default CloudEvents
//! type prefix and a constructor from [`ProviderSettings`]. Adding a provider is one
//! new file here and one line in [`KINDS`]; nothing outside this module names one.

pub mod event;
pub mod github;
pub mod hmac_generic;
pub mod json;
mod keyed;
mod keys;
pub mod patreon;
mod registry;
pub mod shopify;
pub mod slack;
pub mod standard;
pub mod stripe;
pub mod trigger;

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

pub use event::{EventError, EventSource};
pub use http::{HeaderMap, HeaderName, HeaderValue};
pub use json::JsonError;
pub use registry::{
    DEFAULT_KIND, HeaderLines, KINDS, Kind, KindOptions, ProviderSettings, SettingError, SignInput, kind,
    kind_names, sign,
};
pub use trigger::{KnownTrigger, Trigger, TriggerError};

/// Why a signature was refused. Each variant is one bounded metric label; all of them
/// answer 401 with the same text, so a caller learns nothing about which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature header (or a header the scheme signs, like its timestamp) is absent.
    #[error("invalid signature")]
    Missing,
    /// A header is present but is not of the expected shape.
    #[error("invalid signature")]
    Malformed,
    /// The header is well formed but no configured secret produces it.
    #[error("invalid signature")]
    Mismatch,
    /// The signed timestamp is further from now than the source's tolerance (past or future).
    #[error("invalid signature")]
    Stale,
}

impl SignatureError {
    /// Every reason, for pre-registering metric series.
    pub const ALL: [SignatureError; 4] =
        [SignatureError::Missing, SignatureError::Malformed, SignatureError::Mismatch, SignatureError::Stale];

    /// The metric label value for this failure.
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing",
            SignatureError::Malformed => "malformed",
            SignatureError::Mismatch => "mismatch",
            SignatureError::Stale => "stale",
        }
    }
}

/// Everything that can stop a delivery at the verification stage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The signature is missing, malformed, wrong or stale (401).
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The event name is missing or not a safe name (400).
    #[error(transparent)]
    Event(#[from] EventError),
    /// A body that must be JSON is not (400).
    #[error(transparent)]
    Json(#[from] JsonError),
}

/// How the body goes into the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data<'a> {
    /// Valid JSON (already checked): embedded verbatim as `data`.
    Json,
    /// Anything else (form posts): embedded as `data_base64`, with this media type.
    Binary {
        /// The request's `Content-Type`, or `application/octet-stream` without one.
        content_type: &'a str,
    },
}

/// A delivery whose signature checked out, with what the provider says about it.
///
/// Only the verifiers in this module construct it.
#[derive(Debug)]
pub struct Verified<'a> {
    body: &'a [u8],
    event: Cow<'a, str>,
    label: &'static str,
    delivery_id: Option<Cow<'a, str>>,
    subject: Option<String>,
    data: Data<'a>,
    reply: Option<Vec<u8>>,
}

impl<'a> Verified<'a> {
    /// A verified JSON delivery named `event` (already checked with [`event::check`]).
    pub(crate) fn new(body: &'a [u8], event: Cow<'a, str>, label: &'static str) -> Self {
        Verified { body, event, label, delivery_id: None, subject: None, data: Data::Json, reply: None }
    }

    pub(crate) fn with_delivery_id(mut self, id: Option<Cow<'a, str>>) -> Self {
        self.delivery_id = id;
        self
    }

    pub(crate) fn with_subject(mut self, subject: Option<String>) -> Self {
        self.subject = subject;
        self
    }

    pub(crate) fn with_data(mut self, data: Data<'a>) -> Self {
        self.data = data;
        self
    }

    pub(crate) fn with_reply(mut self, reply: Vec<u8>) -> Self {
        self.reply = Some(reply);
        self
    }

    /// The raw body bytes exactly as received.
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The event name as the provider gives it (`members:pledge:create`,
    /// `orders/create`, `pull_request.opened`): safe characters only, at most
    /// [`event::MAX_EVENT_BYTES`].
    pub fn event(&self) -> &str {
        &self.event
    }

    /// The bounded metric label: a name the provider documents, or `other`.
    pub fn label(&self) -> &'static str {
        self.label
    }

    /// The provider's own id of this delivery, the same on its retries (printable
    /// ASCII, at most [`event::MAX_DELIVERY_ID_BYTES`]).
    pub fn delivery_id(&self) -> Option<&str> {
        self.delivery_id.as_deref()
    }

    /// What the event is about, when the provider says (`member/42`).
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// How the body is embedded.
    pub fn data(&self) -> Data<'a> {
        self.data
    }

    /// A handshake the provider expects answered with this JSON body and `200`, with
    /// nothing published (Slack's URL verification).
    pub fn reply(&self) -> Option<&[u8]> {
        self.reply.as_deref()
    }
}

/// What a source's verifier says about itself, fixed when it is built.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Headers refused when they appear more than once: a proxy might pick the other
    /// one. Checked on the head, before the body is read.
    pub single: Vec<HeaderName>,
    /// The one of them naming the event: a repeat of it is a bad event name (400), a
    /// repeat of any other a malformed signature (401).
    pub event_header: Option<(HeaderName, EventSource)>,
    /// Event labels the kind documents (the `event` metric label is one of these or
    /// `other`), pre-registered at zero.
    pub known_events: &'static [&'static str],
    /// How many secrets can sign (several during a rotation).
    pub secret_count: usize,
}

impl Shape {
    /// Single headers `names`; `event` says which of them names the event (an index
    /// into `names`) and how refusals call it.
    pub fn new(
        names: &[HeaderName],
        event: Option<(usize, EventSource)>,
        known_events: &'static [&'static str],
        secret_count: usize,
    ) -> Shape {
        let event_header = event.map(|(i, source)| (names[i].clone(), source));
        Shape { single: names.to_vec(), event_header, known_events, secret_count }
    }

    /// What a repeat of `name` (one of [`Shape::single`]) is refused as.
    pub fn repeated(&self, name: &HeaderName) -> VerifyError {
        match &self.event_header {
            Some((event, source)) if event == name => EventError::Malformed(*source).into(),
            _ => SignatureError::Malformed.into(),
        }
    }
}

/// One provider kind's verifier, built once per source with its keys precomputed.
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// Its single headers, event header, known events and secret count.
    fn shape(&self) -> &Shape;

    /// How many secrets can sign.
    fn secret_count(&self) -> usize {
        self.shape().secret_count
    }

    /// Checks the signature first (nothing of an unauthenticated body is examined),
    /// then reads the event name, delivery id and subject.
    fn verify<'a>(&self, headers: &'a HeaderMap, body: &'a [u8], now: SystemTime) -> Outcome<'a>;
}

/// What [`Provider::verify`] returns.
pub type Outcome<'a> = Result<Verified<'a>, VerifyError>;

/// A header's value when present exactly as bytes.
pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    headers.get(name).map(http::HeaderValue::as_bytes)
}

/// Checks a signed Unix timestamp (decimal seconds) against `now`, both ways.
pub(crate) fn check_timestamp(
    raw: Option<&[u8]>,
    now: SystemTime,
    tolerance: Option<Duration>,
) -> Result<u64, SignatureError> {
    let raw = raw.ok_or(SignatureError::Missing)?.trim_ascii();
    if raw.is_empty() || raw.len() > 12 || !raw.iter().all(u8::is_ascii_digit) {
        return Err(SignatureError::Malformed);
    }
    // At most 12 ASCII digits: fits in u64.
    let ts = raw.iter().fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
    if let Some(tolerance) = tolerance {
        let now = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now.abs_diff(ts) > tolerance.as_secs() {
            return Err(SignatureError::Stale);
        }
    }
    Ok(ts)
}

/// `Data::Json` when the request says its body is JSON (or says nothing), else the
/// body is embedded as bytes with the request's media type.
pub(crate) fn data_for<'a>(headers: &'a HeaderMap) -> Data<'a> {
    match headers.get(http::header::CONTENT_TYPE).map(|v| v.to_str()) {
        None => Data::Json,
        Some(Ok(ct)) if is_json_media_type(ct) => Data::Json,
        Some(Ok(ct)) if !ct.is_empty() => Data::Binary { content_type: ct },
        _ => Data::Binary { content_type: "application/octet-stream" },
    }
}

fn is_json_media_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.len() > 5
            && essence.get(essence.len() - 5..).is_some_and(|s| s.eq_ignore_ascii_case("+json"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod testing {
    //! Helpers for the providers' unit tests.

    use std::time::{Duration, SystemTime};

    use super::*;

    /// A header map from name/value pairs.
    pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        map
    }

    /// Unix seconds as a `SystemTime`.
    pub fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// Builds `kind` with `secrets` and the default tolerance.
    pub fn build(kind: &Kind, secrets: &[&str]) -> Box<dyn Provider> {
        build_with(kind, secrets, Some(Duration::from_secs(300)), &KindOptions::default())
    }

    /// Builds `kind` with everything given.
    pub fn build_with(
        kind: &Kind,
        secrets: &[&str],
        tolerance: Option<Duration>,
        options: &KindOptions,
    ) -> Box<dyn Provider> {
        let settings =
            ProviderSettings { secrets: secrets.iter().map(|s| s.as_bytes()).collect(), tolerance, options };
        (kind.build)(&settings).unwrap()
    }

    /// The vector of `id` from tests/fixtures/other_providers/test_vectors.json.
    pub fn vector(id: &str) -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/other_providers/test_vectors.json");
        let all: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let found = all["vectors"].as_array().unwrap().iter().find(|v| v["id"] == id).cloned();
        let v = found.unwrap_or_else(|| panic!("no vector {id}"));
        if v.get("body_bytes").is_some() {
            assert_eq!(vector_body(&v).len() as u64, v["body_bytes"].as_u64().unwrap(), "{id} was altered");
        }
        v
    }

    /// The exact body bytes of a vector.
    pub fn vector_body(v: &serde_json::Value) -> Vec<u8> {
        use base64::Engine;
        match v["body_base64"].as_str() {
            Some(b) => base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
            None => v["body_utf8"].as_str().unwrap().as_bytes().to_vec(),
        }
    }

    /// A vector's headers plus extra ones.
    pub fn vector_headers(v: &serde_json::Value, extra: &[(&str, &str)]) -> HeaderMap {
        let mut pairs: Vec<(String, String)> = v["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, val)| (k.clone(), val.as_str().unwrap().to_owned()))
            .collect();
        pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        headers(&refs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Every vector of tests/fixtures/other_providers/test_vectors.json is checked by
    /// a unit test: a vector added to the file fails here until one uses it.
    #[test]
    fn every_shared_vector_is_used() {
        const USED: [&str; 17] = [
            "rfc2202-hmac-md5-tc1",         // patreon::shared_vectors
            "rfc2202-hmac-md5-tc2",         // patreon::shared_vectors
            "rfc2202-hmac-md5-tc3",         // patreon::shared_vectors
            "rfc4231-hmac-sha256-tc1",      // keys::shared_primitive_vectors
            "rfc4231-hmac-sha256-tc2",      // keys::shared_primitive_vectors
            "patreon-apits-1",              // patreon::shared_vectors
            "patreon-apits-2",              // patreon::shared_vectors
            "github-official",              // github::official_vector
            "github-computed-sha1-legacy",  // github::sha1_alone_is_unsigned
            "github-computed-ping",         // github::computed_ping_vector, hmac_generic
            "stripe-computed",              // stripe::computed_vector
            "shopify-computed",             // shopify::computed_vector, hmac_generic
            "slack-official",               // slack::official_vector
            "standard-webhooks-official-1", // standard::official_vector_1_with_every_expectation
            "twilio-official",              // keys::shared_primitive_vectors
            "standard-webhooks-official-2", // standard::official_vector_2_and_svix_names
            "svix-branded-computed",        // standard::official_vector_2_and_svix_names
        ];
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/other_providers/test_vectors.json");
        let all: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        for v in all["vectors"].as_array().unwrap() {
            let id = v["id"].as_str().unwrap();
            assert!(USED.contains(&id), "vector {id} is not checked by any test");
        }
    }

    #[test]
    fn kinds_have_unique_names_and_are_found() {
        for k in KINDS {
            assert_eq!(kind(k.name).map(|f| f.name), Some(k.name));
            assert_eq!(KINDS.iter().filter(|o| o.name == k.name).count(), 1);
        }
        assert!(kind("Patreon").is_none());
        assert!(kind("").is_none());
    }

    /// What `hookrelay sign` prints for a kind is what its verifier accepts.
    #[test]
    fn every_kind_verifies_what_it_signs() {
        let set = |value: &str| Some(value.to_owned());
        let hmac = KindOptions {
            signature_header: set("X-Sig"),
            algorithm: set("sha1"),
            encoding: set("base64"),
            signature_prefix: set("sha1="),
            event_header: set("X-Event"),
            id_header: set("X-Id"),
        };
        let none = KindOptions::default();
        let body = br#"{"type":"thing.done","id":"evt_1","event_id":"Ev1"}"#;
        for kind in KINDS {
            let secret = if kind.name == "standard-webhooks" { "whsec_c2VjcmV0" } else { "secret" };
            let options = if kind.name == "hmac" { &hmac } else { &none };
            let input = SignInput {
                secret: secret.as_bytes(),
                body,
                event: None,
                id: "d-1",
                timestamp: 1000,
                options,
            };
            let lines = sign(kind.name, &input).unwrap();
            let pairs: Vec<(&str, &str)> = lines.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let headers = testing::headers(&pairs);
            let p = testing::build_with(kind, &[secret], Some(Duration::from_secs(300)), options);
            let verified = p.verify(&headers, body, testing::at(1000));
            assert!(verified.is_ok(), "{}: {:?}", kind.name, verified.err());
        }
        assert!(
            sign(
                "nope",
                &SignInput { secret: b"s", body, event: None, id: "", timestamp: 0, options: &none }
            )
            .unwrap_err()
            .contains("unknown kind")
        );
    }

    #[test]
    fn timestamps_are_checked_both_ways() {
        let now = testing::at(1_000_000);
        let tol = Some(Duration::from_secs(300));
        assert_eq!(check_timestamp(Some(b"1000000"), now, tol), Ok(1_000_000));
        assert_eq!(check_timestamp(Some(b"999700"), now, tol), Ok(999_700));
        assert_eq!(check_timestamp(Some(b"999699"), now, tol), Err(SignatureError::Stale));
        assert_eq!(check_timestamp(Some(b"1000301"), now, tol), Err(SignatureError::Stale));
        assert_eq!(check_timestamp(Some(b"1"), now, None), Ok(1));
        assert_eq!(check_timestamp(None, now, tol), Err(SignatureError::Missing));
        for bad in [&b""[..], b"-5", b"1e6", b"0x10", b"9999999999999", b"12 34"] {
            assert_eq!(check_timestamp(Some(bad), now, tol), Err(SignatureError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn json_or_binary_by_content_type() {
        use testing::headers;
        assert_eq!(data_for(&headers(&[])), Data::Json);
        assert_eq!(data_for(&headers(&[("content-type", "application/json; charset=utf-8")])), Data::Json);
        assert_eq!(data_for(&headers(&[("content-type", "application/vnd.x+JSON")])), Data::Json);
        let form = "application/x-www-form-urlencoded";
        assert_eq!(data_for(&headers(&[("content-type", form)])), Data::Binary { content_type: form });
        assert_eq!(
            data_for(&headers(&[("content-type", "")])),
            Data::Binary { content_type: "application/octet-stream" }
        );
    }
}
