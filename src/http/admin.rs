//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz`
//! (the relay can make events durable and is not shutting down). Bind it privately.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;

use super::HttpResponse;
use crate::metrics::Metrics;

/// Anything that can say whether events can currently be made durable.
pub trait Readiness: Send + Sync + 'static {
    /// True when a publish can succeed now.
    fn ready(&self) -> bool;
}

/// What the admin handler needs.
pub struct Admin {
    metrics: Metrics,
    readiness: Arc<dyn Readiness>,
    draining: CancellationToken,
}

impl Admin {
    /// Builds the admin handler; `draining` is cancelled when shutdown begins.
    pub fn new(metrics: Metrics, readiness: Arc<dyn Readiness>, draining: CancellationToken) -> Self {
        Admin { metrics, readiness, draining }
    }

    /// Answers one admin request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> HttpResponse {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let mut resp = Response::new(Full::new(Bytes::from(self.metrics.render())));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                if self.draining.is_cancelled() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                } else if self.readiness.ready() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable\n")
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
