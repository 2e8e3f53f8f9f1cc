//! `POST /webhooks/{source}`: allowlist → method → rate limit → limits → the source's
//! provider (signature → event name → JSON) → envelope → publish → answer. Nothing
//! about an unauthenticated request is parsed beyond its headers, and the answer is
//! 2xx only once the publisher says the event is durable. Names no provider: each
//! source's verifier says which headers must be single and what a delivery is.
//!
//! Cost of a refusal: an address outside the allowlist, a wrong method, an exhausted
//! rate limit, a declared `Content-Length` over the limit and a duplicated signature
//! or event header (any header the provider names) are all refused from the head
//! alone, before a byte of the body is
//! read. A bad signature costs reading the body (at most `max_body_bytes`, within the
//! request timeout) and one HMAC per configured secret, since the signature covers
//! the body; the body is never parsed before the signature checks out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, field, info, warn};

use super::pool::ConnectionSlot;
use super::ratelimit::{RateLimiter, retry_after_secs};
use super::{HttpResponse, PeerAddr};
use crate::config::SourceConfig;
use crate::envelope::{self, Target};
use crate::metrics::{Metrics, Reject, UNKNOWN_SOURCE};
use crate::publish::{Delivered, Outgoing, PublishError, Publisher};
use crate::verify::{EventSource, VerifyError};

/// Path prefix of the webhook route.
pub const ROUTE_PREFIX: &str = "/webhooks/";

/// A configured source with its runtime state.
struct Source {
    config: SourceConfig,
    /// The source's token bucket, when it has a rate limit.
    limiter: Option<RateLimiter>,
}

/// What the ingest handler needs, shared by all connections.
pub struct Ingest<P> {
    sources: HashMap<String, Source>,
    publisher: Arc<P>,
    metrics: Metrics,
    max_body_bytes: u64,
    request_timeout: Duration,
    retry_after: HeaderValue,
}

impl<P> std::fmt::Debug for Ingest<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").field("sources", &self.sources.keys().collect::<Vec<_>>()).finish()
    }
}

/// Everything the ingest handler is built from.
#[derive(Debug)]
pub struct IngestSettings<P> {
    /// The configured sources.
    pub sources: Vec<SourceConfig>,
    /// Where verified events go.
    pub publisher: Arc<P>,
    /// The relay's metrics.
    pub metrics: Metrics,
    /// Largest body read; larger ones get 413.
    pub max_body_bytes: u64,
    /// Time a client has to send the whole body; then 408.
    pub request_timeout: Duration,
    /// Seconds sent in `Retry-After` with 503.
    pub retry_after_secs: u64,
}

impl<P: Publisher> Ingest<P> {
    /// Builds the handler state.
    pub fn new(settings: IngestSettings<P>) -> Self {
        let IngestSettings { sources, publisher, metrics, max_body_bytes, request_timeout, retry_after_secs } =
            settings;
        Ingest {
            sources: sources
                .into_iter()
                .map(|config| {
                    let limiter =
                        config.rate_limit.map(|r| RateLimiter::new(r.per_sec, r.burst, Instant::now()));
                    (config.name.clone(), Source { config, limiter })
                })
                .collect(),
            publisher,
            metrics,
            max_body_bytes,
            request_timeout,
            retry_after: HeaderValue::from(retry_after_secs),
        }
    }

    /// Handles one request; never fails, never panics on input.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> HttpResponse {
        let started = Instant::now();
        let _inflight = self.metrics.inflight();
        let source = self.source_for(req.uri().path());
        // At `debug` only: at the default `info` a disabled span costs nothing, while an
        // enabled one is formatted (and re-formatted on every `record`) per request. The
        // few events logged at `info` or above carry `source` and `peer` themselves.
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
        let span = debug_span!(
            "webhook",
            source = source.map_or(UNKNOWN_SOURCE, |s| s.config.name.as_str()),
            peer = peer.map(field::display),
            event = field::Empty,
            event_id = field::Empty,
        );
        let response = self.route(req, source).instrument(span.clone()).await;
        let status = response.status().as_u16();
        self.metrics.request_finished(status, started.elapsed());
        span.in_scope(|| debug!(status, elapsed_us = started.elapsed().as_micros() as u64, "Answered."));
        response
    }

    /// The source named by the path: exactly `/webhooks/{name}`, compared byte for
    /// byte (no decoding, no case folding, no trailing slash), so traversal and
    /// percent-encoding tricks find nothing.
    fn source_for(&self, path: &str) -> Option<&Source> {
        let name = path.strip_prefix(ROUTE_PREFIX)?;
        self.sources.get(name)
    }

    async fn route(&self, req: Request<Incoming>, source: Option<&Source>) -> HttpResponse {
        let Some(Source { config: source, limiter }) = source else {
            let reason = if req.uri().path().starts_with(ROUTE_PREFIX) {
                Reject::UnknownSource
            } else {
                Reject::NotFound
            };
            self.metrics.rejected(UNKNOWN_SOURCE, reason);
            return error(StatusCode::NOT_FOUND, "not found");
        };
        // Before anything else: a denied address learns nothing more, costs nothing more.
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
        if !source.allowlist.allows(peer) {
            self.metrics.rejected(&source.name, Reject::IpDenied);
            debug!("Address not allowed for this source.");
            return closing(error(StatusCode::FORBIDDEN, "forbidden"));
        }
        if req.method() != Method::POST {
            self.metrics.rejected(&source.name, Reject::MethodNotAllowed);
            let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            resp.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        self.metrics.webhook_received(&source.name);
        // Before reading the body or computing a signature, so a flood is cheap to
        // refuse; forged requests spend the budget too (see SECURITY.md).
        if let Some(limiter) = limiter
            && let Err(wait) = limiter.check(Instant::now())
        {
            self.metrics.rejected(&source.name, Reject::RateLimited);
            debug!(wait_ms = wait.as_millis() as u64, "Rate limit reached.");
            let mut resp = closing(error(StatusCode::TOO_MANY_REQUESTS, "rate limit reached"));
            resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
            return resp;
        }
        self.receive(req, source).await
    }

    async fn receive(&self, req: Request<Incoming>, source: &SourceConfig) -> HttpResponse {
        let name = source.name.as_str();
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body_bytes) {
            self.metrics.rejected(name, Reject::BodyTooLarge);
            return too_large();
        }
        // Two signatures or two event names are ambiguous (a proxy may pick the other
        // one): refuse them from the head, before reading the body.
        let verifier = &source.verifier;
        let shape = verifier.shape();
        for single in &shape.single {
            if req.headers().get_all(single).iter().nth(1).is_some() {
                debug!(header = %single, "Header repeated.");
                let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
                return closing(self.refuse(name, peer, shape.repeated(single)));
            }
        }
        let (parts, body) = req.into_parts();
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        // While the body trickles in, the connection may be closed to make room.
        let reading = parts.extensions.get::<ConnectionSlot>().map(ConnectionSlot::reading_body);
        let collected = tokio::time::timeout(self.request_timeout, Limited::new(body, limit).collect()).await;
        if reading.is_some_and(|r| !r.finish()) {
            // Chosen for closing while the body was slow: the sender will not hear back.
            self.metrics.rejected(name, Reject::Timeout);
            return closing(error(StatusCode::REQUEST_TIMEOUT, "request body not received in time"));
        }
        let body: Bytes = match collected {
            Err(_) => {
                self.metrics.rejected(name, Reject::Timeout);
                let mut resp = error(StatusCode::REQUEST_TIMEOUT, "request body not received in time");
                resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
            Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                self.metrics.rejected(name, Reject::BodyTooLarge);
                return too_large();
            }
            Ok(Err(e)) => {
                // The client went away or sent a broken body; it will not read this answer.
                debug!(error = %e, "Reading the body failed.");
                self.metrics.rejected(name, Reject::BodyUnreadable);
                return error(StatusCode::BAD_REQUEST, "request body could not be read");
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };

        let now = SystemTime::now();
        let verified = match verifier.verify(&parts.headers, &body, now) {
            Ok(v) => v,
            Err(e) => {
                let peer = parts.extensions.get::<PeerAddr>().map(|p| p.0.ip());
                return self.refuse(name, peer, e);
            }
        };
        let span = tracing::Span::current();
        span.record("event", verified.event());
        if let Some(reply) = verified.reply() {
            // A handshake the provider expects answered (a URL verification): nothing is published.
            info!(source = name, "Handshake answered.");
            return json_response(StatusCode::OK, reply.to_vec());
        }

        let target = Target {
            source_name: name,
            ce_source: &source.cloudevents_source,
            type_prefix: &source.type_prefix,
        };
        let envelope = envelope::build(&verified, &target, now);
        span.record("event_id", envelope.id.as_str());
        let event_label = verified.label();

        let outgoing = Outgoing { source: name, event_label, envelope: &envelope };
        match self.publisher.publish(outgoing).await {
            Ok(delivered) => {
                if delivered == Delivered::Confirmed {
                    self.metrics.published(name, event_label);
                }
                debug!(?delivered, "Event is durable.");
                accepted(&envelope.id)
            }
            Err(e) => {
                self.metrics.publish_failed(name, e.label());
                if matches!(e, PublishError::Nacked | PublishError::Unroutable) {
                    // A refusal repeats for every event of its kind: the publisher logs
                    // the first, the counter counts them all.
                    debug!(reason = e.label(), "Event refused by the broker; asking the sender to retry.");
                } else {
                    warn!(
                        source = name,
                        event_id = %envelope.id,
                        reason = e.label(),
                        "Event not durable; asking the sender to retry."
                    );
                }
                self.unavailable(e)
            }
        }
    }

    /// Counts and answers a delivery the source's verifier refused.
    fn refuse(&self, name: &str, peer: Option<IpAddr>, e: VerifyError) -> HttpResponse {
        match e {
            VerifyError::Signature(reason) => {
                self.metrics.signature_failed(name, reason);
                info!(
                    source = name,
                    peer = peer.map(field::display),
                    reason = reason.as_str(),
                    "Signature refused."
                );
                error(StatusCode::UNAUTHORIZED, "invalid signature")
            }
            VerifyError::Event(e) => {
                let reason = match e.source() {
                    EventSource::Header(_) => Reject::BadEventHeader,
                    EventSource::Body(_) => Reject::BadEvent,
                };
                self.metrics.rejected(name, reason);
                error(StatusCode::BAD_REQUEST, &e.to_string())
            }
            VerifyError::Json(e) => {
                self.metrics.rejected(name, Reject::InvalidJson);
                error(StatusCode::BAD_REQUEST, &e.to_string())
            }
        }
    }

    fn unavailable(&self, e: PublishError) -> HttpResponse {
        let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
        resp.headers_mut().insert(RETRY_AFTER, self.retry_after.clone());
        resp
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `{"error": text}` with `status`.
pub fn error(status: StatusCode, text: &str) -> HttpResponse {
    let body = serde_json::json!({ "error": text }).to_string().into_bytes();
    json_response(status, body)
}

fn accepted(id: &str) -> HttpResponse {
    // The id is a UUID: nothing in it needs escaping. One exact-size buffer.
    let body = [r#"{"id":""#, id, r#""}"#].concat().into_bytes();
    json_response(StatusCode::OK, body)
}

fn too_large() -> HttpResponse {
    // The rest of the body is not read; the connection cannot be reused.
    closing(error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"))
}

/// Marks an answer given before the body was read: the connection is not reused
/// (hyper would close it anyway unless the whole body happened to be buffered).
fn closing(mut resp: HttpResponse) -> HttpResponse {
    resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}
