//! The bounded label values of the relay's metrics: refusal reasons, publish failure
//! reasons, dead-letter reasons, connection replacement causes, and HTTP statuses.
//! Everything here is pre-registered at zero.

pub use crate::verify::SignatureError as SignatureReason;

/// Source label for requests that named no configured source.
pub const UNKNOWN_SOURCE: &str = "_unknown";

/// Why a request was refused before or after verification (not its signature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// `/webhooks/{name}` names no configured source.
    UnknownSource,
    /// Not a POST.
    MethodNotAllowed,
    /// A path outside `/webhooks/`.
    NotFound,
    /// Over `http.max_body_bytes`.
    BodyTooLarge,
    /// The event header is missing, malformed or duplicated.
    BadEventHeader,
    /// The event name read from the body is missing or malformed.
    BadEvent,
    /// A body that must be JSON is not.
    InvalidJson,
    /// The body did not arrive in time.
    Timeout,
    /// The source's rate limit was reached.
    RateLimited,
    /// The peer address is outside the source's allowlist.
    IpDenied,
    /// The body could not be read.
    BodyUnreadable,
}

impl Reject {
    /// Every reason, for pre-registering metric series.
    pub const ALL: [Reject; 11] = [
        Reject::UnknownSource,
        Reject::MethodNotAllowed,
        Reject::NotFound,
        Reject::BodyTooLarge,
        Reject::BadEventHeader,
        Reject::BadEvent,
        Reject::InvalidJson,
        Reject::Timeout,
        Reject::RateLimited,
        Reject::IpDenied,
        Reject::BodyUnreadable,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::UnknownSource => "unknown_source",
            Reject::MethodNotAllowed => "method_not_allowed",
            Reject::NotFound => "not_found",
            Reject::BodyTooLarge => "body_too_large",
            Reject::BadEventHeader => "bad_event_header",
            Reject::BadEvent => "bad_event",
            Reject::InvalidJson => "invalid_json",
            Reject::Timeout => "timeout",
            Reject::RateLimited => "rate_limited",
            Reject::IpDenied => "ip_denied",
            Reject::BodyUnreadable => "body_unreadable",
        }
    }
}

/// Reasons a publish attempt fails.
pub const PUBLISH_FAILURE_REASONS: [&str; 6] =
    ["nack", "unroutable", "timeout", "unavailable", "channel_error", "spool_unavailable"];

/// Reasons an event is dead-lettered by the relay.
pub const DEAD_LETTER_REASONS: [&str; 2] = ["nacked", "unroutable"];

/// Why the relay replaced a broker connection: missed heartbeats, a confirm that
/// never came on a connection that looked open, or the connection closed under it.
pub const CONNECTION_REPLACEMENT_CAUSES: [&str; 3] = ["heartbeat", "confirm_timeout", "closed"];

/// HTTP statuses the ingest listener answers with (the `status` label).
pub const STATUSES: [u16; 11] = [200, 400, 401, 403, 404, 405, 408, 413, 429, 500, 503];
