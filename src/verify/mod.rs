//! Proves that a webhook is authentic, one file per signature scheme.
//!
//! Pure: takes bytes and header values, returns typed results, knows nothing of HTTP
//! servers, brokers or runtimes. A [`Verified`] value can only be made by a verifier,
//! so code that needs an authenticated body (the envelope) cannot be handed an
//! unverified one by mistake.

pub mod patreon;
pub mod trigger;

pub use trigger::{KnownTrigger, Trigger, TriggerError};

/// Why a signature was refused. Each variant is one bounded metric label; all of them
/// answer 401 with the same text, so a caller learns nothing about which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature header is absent.
    #[error("invalid signature")]
    Missing,
    /// The header is present but is not a digest of the expected shape.
    #[error("invalid signature")]
    Malformed,
    /// The header is well formed but no configured secret produces it.
    #[error("invalid signature")]
    Mismatch,
}

impl SignatureError {
    /// The metric label value for this failure.
    pub fn label(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing",
            SignatureError::Malformed => "malformed",
            SignatureError::Mismatch => "mismatch",
        }
    }
}

/// A request body whose signature checked out, together with its event trigger.
///
/// Only the verifiers in this module construct it.
#[derive(Debug)]
pub struct Verified<'a> {
    body: &'a [u8],
    trigger: Trigger,
}

impl<'a> Verified<'a> {
    pub(crate) fn new(body: &'a [u8], trigger: Trigger) -> Self {
        Verified { body, trigger }
    }

    /// The raw body bytes exactly as received.
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The event trigger named by the delivery.
    pub fn trigger(&self) -> &Trigger {
        &self.trigger
    }
}

/// Everything that can stop a delivery at the verification stage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The signature is missing, malformed or wrong (401).
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The event header is missing or malformed (400).
    #[error(transparent)]
    Trigger(#[from] TriggerError),
}
