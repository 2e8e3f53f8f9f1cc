//! A real HTTP/1.1 client over a socket, raw request bytes for what a client
//! library will not send, and reading `/metrics`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Reads one metric sample from exposition text.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let all =
            labels.iter().all(|(k, v)| label_text.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
        if all {
            return value.parse().ok();
        }
    }
    None
}

/// An HTTP answer: status, headers, body.
pub type Response = (u16, HashMap<String, String>, Bytes);

async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response {
    // A relay that never answers fails the test here, with what it was asked, instead
    // of hanging the whole run.
    let what = format!("{} {}", req.method(), req.uri());
    tokio::time::timeout(Duration::from_secs(30), exchange(addr, req))
        .await
        .unwrap_or_else(|_| panic!("{what} on {addr}: no complete answer within 30 s"))
}

async fn exchange(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (status, headers, body)
}

/// `GET path` on `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    let req = Request::get(path).header("host", "localhost").body(Full::new(Bytes::new())).unwrap();
    send(addr, req).await
}

/// `POST path` with headers and body on `addr`; `Content-Type: application/json`
/// unless `headers` name another.
pub async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Response {
    let mut req = Request::post(path).header("host", "localhost");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(addr, req.body(Full::new(Bytes::from(body))).unwrap()).await
}

/// Any method.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Response {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(addr, req).await
}

/// Waits up to `limit` until the sample `name{labels}` on the admin listener at
/// `admin` reads `value`.
pub async fn wait_for_metric(
    admin: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    value: f64,
    limit: Duration,
) {
    let what = format!("{name}{labels:?} to read {value}");
    super::eventually(&what, limit, || async move {
        let (_, _, text) = get(admin, "/metrics").await;
        (metric_value(&String::from_utf8_lossy(&text), name, labels) == Some(value)).then_some(())
    })
    .await;
}

/// `POST path` as bytes: the given header lines, `Content-Length`, `Connection: close`.
pub fn post_wire(path: &str, headers: &[String], body: &[u8]) -> Vec<u8> {
    let mut out = format!("POST {path} HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str(&format!("content-length: {}\r\nconnection: close\r\n\r\n", body.len()));
    let mut wire = out.into_bytes();
    wire.extend_from_slice(body);
    wire
}

/// The status of a raw HTTP/1.1 answer (`HTTP/1.1 200 OK...`); 0 when there is none.
pub fn status_of(answer: &[u8]) -> u16 {
    answer.get(9..12).and_then(|s| std::str::from_utf8(s).ok()?.parse().ok()).unwrap_or(0)
}

/// Waits until the relay at `admin` reports `hookrelay_broker_connected` as `up`
/// (with a spool, `/readyz` is 200 before the first connection).
pub async fn broker_connected(admin: SocketAddr, up: bool) {
    let want = if up { 1.0 } else { 0.0 };
    let what = if up { "the broker connection" } else { "the broker connection to drop" };
    super::eventually(what, Duration::from_secs(15), || async move {
        let (_, _, text) = get(admin, "/metrics").await;
        (metric_value(&String::from_utf8_lossy(&text), "hookrelay_broker_connected", &[]) == Some(want))
            .then_some(())
    })
    .await;
}
