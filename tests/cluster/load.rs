//! The webhook stream: C keep-alive HTTP/1.1 connections split across the relays, each
//! posting unique signed Patreon events one after another and recording every answer
//! (when it was asked, how long it took, the status, the event id on 2xx).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::Signed;

/// Longest a request may take before the client gives up on it (status 0).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// One answered (or failed) request.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent, from the stream's start.
    pub at: Duration,
    /// How long the answer took.
    pub took: Duration,
    /// HTTP status; 0 when the connection failed or the client timed out.
    pub status: u16,
    /// The event id the relay answered with (2xx only).
    pub id: Option<String>,
}

impl Sample {
    /// When the answer arrived, from the stream's start.
    pub fn end(&self) -> Duration {
        self.at + self.took
    }

    /// Whether the relay answered 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A running stream; [`Stream::finish`] stops it once `min_events` were sent.
pub struct Stream {
    /// The stream's time origin.
    pub t0: Instant,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

impl Stream {
    /// Starts `concurrency` connections, connection `i` to `relays[i % relays.len()]`;
    /// `tag` makes the bodies (and so the event ids) unique to this stream.
    pub fn start(relays: &[SocketAddr], concurrency: usize, min_events: u64, tag: &str) -> Stream {
        let t0 = Instant::now();
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..concurrency)
            .map(|i| {
                let addr = relays[i % relays.len()];
                let (sent, stop, tag) = (sent.clone(), stop.clone(), tag.to_owned());
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
                    loop {
                        let n = sent.fetch_add(1, Ordering::Relaxed);
                        if n >= min_events && stop.load(Ordering::Relaxed) {
                            return samples;
                        }
                        let at = t0.elapsed();
                        let started = Instant::now();
                        let outcome =
                            tokio::time::timeout(CLIENT_TIMEOUT, post(addr, &mut conn, &tag, n)).await;
                        let (status, id) = match outcome {
                            Ok(Ok(answer)) => answer,
                            _ => {
                                conn = None;
                                (0, None)
                            }
                        };
                        samples.push(Sample { at, took: started.elapsed(), status, id });
                    }
                })
            })
            .collect();
        Stream { t0, sent, stop, tasks }
    }

    /// Requests sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Waits until `n` requests were sent.
    pub async fn await_sent(&self, n: u64) {
        while self.sent() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops after at least `min_events`, and returns every sample.
    pub async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("a sender task"));
        }
        all.sort_by_key(|s| s.at);
        all
    }
}

/// Posts event `n` on the kept-alive connection, opening one when needed.
async fn post(
    addr: SocketAddr,
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    tag: &str,
    n: u64,
) -> anyhow::Result<(u16, Option<String>)> {
    if conn.as_ref().is_none_or(SendRequest::is_closed) {
        let stream = TcpStream::connect(addr).await?;
        let (tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(c);
        *conn = Some(tx);
    }
    let Some(tx) = conn.as_mut() else { anyhow::bail!("no connection") };
    tx.ready().await?;
    let signed =
        Signed::of(format!(r#"{{"data":{{"id":"{tag}-{n}","type":"member"}},"n":{n}}}"#).into_bytes());
    let mut req =
        Request::post("/webhooks/patreon").header("host", "relay").header("content-type", "application/json");
    for (name, value) in signed.headers() {
        req = req.header(name, value);
    }
    let req = req.body(Full::new(Bytes::from(signed.body)))?;
    let resp = match tx.send_request(req).await {
        Ok(resp) => resp,
        Err(error) => {
            *conn = None;
            return Err(error.into());
        }
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    let id = if (200..300).contains(&status) {
        serde_json::from_slice::<serde_json::Value>(&body)?["id"].as_str().map(str::to_owned)
    } else {
        None
    };
    Ok((status, id))
}
