//! The HTTP/1.1 load generator: C keep-alive connections (hyper's client connection
//! API), each posting one signed delivery at a time and waiting for its answer. An
//! answer counts as a success only when it is 200.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::messages::{SOURCE, Workload};
use crate::stats::WorkerLog;
use crate::window::Window;

/// Longest one request may take before it counts as failed (the relay's own publish
/// deadline is shorter).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Pre-built header values of one message.
struct Prepared {
    event: HeaderValue,
    signature: HeaderValue,
    body: Bytes,
}

/// Posts to `addr` over `connections` keep-alive connections until the window ends,
/// at most `cap` requests in all.
pub async fn run(
    addr: SocketAddr,
    connections: usize,
    work: Arc<Workload>,
    window: Window,
    cap: u64,
) -> anyhow::Result<Vec<WorkerLog>> {
    let mut prepared = Vec::with_capacity(work.messages.len());
    for m in &work.messages {
        prepared.push(Prepared {
            event: HeaderValue::from_str(&m.event).context("event header")?,
            signature: HeaderValue::from_str(&m.signature).context("signature header")?,
            body: m.body.clone(),
        });
    }
    let prepared = Arc::new(prepared);
    let host = HeaderValue::from_str(&addr.to_string()).context("host header")?;
    let per_worker = (cap / connections.max(1) as u64).max(1);
    let mut tasks = Vec::with_capacity(connections);
    for k in 0..connections {
        let prepared = prepared.clone();
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            connection(addr, host, k, connections, &prepared, window, per_worker).await
        }));
    }
    let mut logs = Vec::with_capacity(connections);
    for t in tasks {
        logs.push(t.await.context("a load task panicked")?);
    }
    Ok(logs)
}

async fn connection(
    addr: SocketAddr,
    host: HeaderValue,
    first: usize,
    stride: usize,
    prepared: &[Prepared],
    window: Window,
    cap: u64,
) -> WorkerLog {
    let mut log = WorkerLog::default();
    let event_header = HeaderName::from_static(hookrelay::verify::patreon::EVENT_HEADER);
    let signature_header = HeaderName::from_static(hookrelay::verify::patreon::SIGNATURE_HEADER);
    let json = HeaderValue::from_static("application/json");
    let path = format!("/webhooks/{SOURCE}");

    let stream = match timeout(REQUEST_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            log.fail(|| format!("connect to {addr}: {e}"));
            return log;
        }
        Err(_) => {
            log.fail(|| format!("connect to {addr} timed out"));
            return log;
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => {
            log.fail(|| format!("HTTP handshake: {e}"));
            return log;
        }
    };
    let driver = tokio::spawn(conn);

    let mut i = first;
    let mut sent = 0u64;
    while sent < cap && Instant::now() < window.end {
        let p = &prepared[i % prepared.len()];
        i += stride;
        sent += 1;
        let built = Request::post(path.as_str())
            .header(HOST, host.clone())
            .header(CONTENT_TYPE, json.clone())
            .header(event_header.clone(), p.event.clone())
            .header(signature_header.clone(), p.signature.clone())
            .body(Full::new(p.body.clone()));
        let req = match built {
            Ok(r) => r,
            Err(e) => {
                log.fail(|| format!("building a request: {e}"));
                break;
            }
        };
        let began = Instant::now();
        let answer = timeout(REQUEST_TIMEOUT, async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        })
        .await;
        let done = Instant::now();
        // A broken connection or a missing answer ends this connection's loop.
        let fatal = match answer {
            Ok(Ok((200, _))) => {
                log.succeed(&window, began, done);
                continue;
            }
            Ok(Ok((status, body))) => {
                log.fail(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()));
                continue;
            }
            Ok(Err(e)) => format!("request failed: {e}"),
            Err(_) => format!("no answer within {REQUEST_TIMEOUT:?}"),
        };
        log.fail(|| fatal);
        break;
    }
    drop(sender);
    let _ = timeout(Duration::from_secs(2), driver).await;
    log
}
