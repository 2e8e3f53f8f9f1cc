//! The rows of the hostile-request matrix: bytes on the wire, the answer expected and
//! the metric that moves.

use super::{Answer, LIMIT, Moves, Row};
use crate::support::*;

/// `POST path` of `body` signed as event `event`, as bytes.
fn signed_wire(path: &str, event: &str, body: &[u8]) -> Vec<u8> {
    Signed::of(body.to_vec()).event(event).wire(path, &[])
}

/// Drops `connection: close` from a head, so the connection would stay open.
trait KeepOpen {
    fn replace_connection_close(self) -> Vec<u8>;
}

impl KeepOpen for Vec<u8> {
    fn replace_connection_close(self) -> Vec<u8> {
        String::from_utf8(self).unwrap().replace("connection: close\r\n", "").into_bytes()
    }
}

/// A head with raw bytes spliced in, for bytes `format!` cannot carry.
fn raw_head(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn chunked_head(extra: &str) -> Vec<u8> {
    format!(
        "POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\nx-patreon-event: members:create\r\n\
         x-patreon-signature: {}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n{extra}\r\n",
        "0".repeat(32)
    )
    .into_bytes()
}

fn chunks(total: usize, chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk);
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend(std::iter::repeat_n(b'a', n));
        out.extend_from_slice(b"\r\n");
        left -= n;
    }
    out
}

pub(super) fn rows() -> Vec<Row> {
    use Answer::*;
    use Moves::*;
    let ev = "x-patreon-event: members:create".to_owned();
    let good_body = fresh_body();
    let good_sig = format!("x-patreon-signature: {}", sign(&good_body));
    let zeros = format!("x-patreon-signature: {}", "0".repeat(32));
    let deep = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels)).into_bytes();
    let pipelined = {
        let (a, b) = (fresh_body(), fresh_body());
        let mut wire = signed_wire("/webhooks/patreon", "members:create", &a);
        // The first request must keep the connection open for the second one.
        let at = wire.windows(19).position(|w| w == b"connection: close\r\n").unwrap();
        wire.drain(at..at + 19);
        wire.extend(signed_wire("/webhooks/patreon", "members:update", &b));
        wire
    };
    let http10 = {
        let body = fresh_body();
        format!(
            "POST /webhooks/patreon HTTP/1.0\r\nhost: relay\r\nx-patreon-event: members:create\r\n\
             x-patreon-signature: {}\r\ncontent-length: {}\r\n\r\n",
            sign(&body),
            body.len()
        )
        .into_bytes()
        .into_iter()
        .chain(body)
        .collect()
    };
    let many_headers: Vec<String> = (0..120).map(|i| format!("x-filler-{i}: {i}")).collect();

    let mut rows = Vec::new();
    rows.extend([
        // --- signature and event headers -------------------------------------------
        Row {
            name: "missing signature",
            wire: post_wire("/webhooks/patreon", std::slice::from_ref(&ev), &good_body),
            answer: Status(401),
            moves: Signature("missing"),
        },
        Row {
            name: "non-hex signature",
            wire: post_wire(
                "/webhooks/patreon",
                &[ev.clone(), format!("x-patreon-signature: {}", "z".repeat(32))],
                &good_body,
            ),
            answer: Status(401),
            moves: Signature("malformed"),
        },
        Row {
            name: "signature one digit short",
            wire: post_wire(
                "/webhooks/patreon",
                &[ev.clone(), format!("x-patreon-signature: {}", "a".repeat(31))],
                &good_body,
            ),
            answer: Status(401),
            moves: Signature("malformed"),
        },
        Row {
            name: "signature twice as long (SHA-256 sized)",
            wire: post_wire(
                "/webhooks/patreon",
                &[ev.clone(), format!("x-patreon-signature: {}", "a".repeat(64))],
                &good_body,
            ),
            answer: Status(401),
            moves: Signature("malformed"),
        },
        Row {
            name: "well-formed but wrong signature",
            wire: post_wire("/webhooks/patreon", &[ev.clone(), zeros.clone()], &good_body),
            answer: Status(401),
            moves: Signature("mismatch"),
        },
        Row {
            name: "signature of invalid UTF-8 bytes",
            wire: raw_head(&[
                b"POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\nx-patreon-event: members:create\r\n",
                b"x-patreon-signature: ",
                &[0xff; 32],
                b"\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
            ]),
            answer: Status(401),
            moves: Signature("malformed"),
        },
        Row {
            name: "signature duplicated (both valid)",
            wire: post_wire("/webhooks/patreon", &[ev.clone(), good_sig.clone(), good_sig.clone()], &good_body),
            answer: Status(401),
            moves: Signature("malformed"),
        },
        Row {
            name: "event header duplicated",
            wire: post_wire(
                "/webhooks/patreon",
                &[ev.clone(), "x-patreon-event: members:delete".into(), good_sig.clone()],
                &good_body,
            ),
            answer: Status(400),
            moves: Rejected("patreon", "bad_event_header"),
        },
        Row {
            name: "event header of invalid UTF-8",
            wire: raw_head(&[
                b"POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\nx-patreon-event: members:cr\xc3\x28ate\r\n",
                good_sig.as_bytes(),
                b"\r\n",
                format!("content-length: {}\r\nconnection: close\r\n\r\n", good_body.len()).as_bytes(),
                &good_body,
            ]),
            answer: Status(400),
            moves: Rejected("patreon", "bad_event_header"),
        },
        Row {
            name: "NUL byte in a header value",
            wire: raw_head(&[
                b"POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\nx-patreon-event: members\0create\r\n",
                b"content-length: 2\r\nconnection: close\r\n\r\n{}",
            ]),
            answer: Status(400),
            moves: Nothing,
        },
        Row {
            name: "oversized header (70 KiB value)",
            wire: post_wire("/webhooks/patreon", &[format!("x-junk: {}", "j".repeat(70 * 1024))], b"{}"),
            answer: Status(431),
            moves: Nothing,
        },
        Row {
            name: "120 header fields",
            wire: post_wire("/webhooks/patreon", &many_headers, b"{}"),
            answer: Status(431),
            moves: Nothing,
        },
        Row {
            name: "obsolete line folding in a header",
            wire: raw_head(&[
                b"POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\nx-patreon-event: members:\r\n create\r\n",
                b"content-length: 2\r\nconnection: close\r\n\r\n{}",
            ]),
            answer: Status(400),
            moves: Nothing,
        },
        // --- bodies ----------------------------------------------------------------
        Row {
            name: "empty body, validly signed",
            wire: post_wire(
                "/webhooks/patreon",
                &[ev.clone(), format!("x-patreon-signature: {}", sign(b""))],
                b"",
            ),
            answer: Status(400),
            moves: Rejected("patreon", "invalid_json"),
        },
        Row {
            name: "empty body, unsigned",
            wire: post_wire("/webhooks/patreon", std::slice::from_ref(&ev), b""),
            answer: Status(401),
            moves: Signature("missing"),
        },
        Row {
            name: "Content-Length one byte over the limit",
            wire: post_wire("/webhooks/patreon", &[ev.clone(), zeros.clone()], &vec![b' '; LIMIT + 1]),
            answer: Status(413),
            moves: Rejected("patreon", "body_too_large"),
        },
        Row {
            name: "Content-Length far over the limit, no body sent",
            wire: format!(
                "POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\n{ev}\r\ncontent-length: 10737418240\r\n\r\n"
            )
            .into_bytes(),
            answer: Status(413),
            moves: Rejected("patreon", "body_too_large"),
        },
        Row {
            name: "Expect: 100-continue over the limit (refused without reading)",
            wire: format!(
                "POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\n{ev}\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
                LIMIT * 100
            )
            .into_bytes(),
            answer: Status(413),
            moves: Rejected("patreon", "body_too_large"),
        },
        Row {
            name: "chunked, one byte over the limit",
            wire: [chunked_head(""), chunks(LIMIT + 1, 8 * 1024), b"0\r\n\r\n".to_vec()].concat(),
            answer: Status(413),
            moves: Rejected("patreon", "body_too_large"),
        },
        Row {
            name: "chunked, far over the limit",
            wire: [chunked_head(""), chunks(LIMIT * 16, 64 * 1024), b"0\r\n\r\n".to_vec()].concat(),
            answer: Status(413),
            moves: Rejected("patreon", "body_too_large"),
        },
        Row {
            name: "chunked body that never ends",
            wire: [chunked_head(""), chunks(100, 100)].concat(),
            answer: Status(408),
            moves: Rejected("patreon", "timeout"),
        },
        Row {
            name: "Content-Length body that never completes",
            wire: format!(
                "POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\n{ev}\r\ncontent-length: 100\r\n\r\n{{\"a\":"
            )
            .into_bytes(),
            answer: Status(408),
            moves: Rejected("patreon", "timeout"),
        },
        Row {
            name: "absurd Content-Length (beyond u64)",
            wire: format!(
                "POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\n{ev}\r\ncontent-length: 99999999999999999999999999\r\n\r\n"
            )
            .into_bytes(),
            answer: Status(400),
            moves: Nothing,
        },
        Row {
            name: "negative Content-Length",
            wire: format!("POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\n{ev}\r\ncontent-length: -1\r\n\r\n")
                .into_bytes(),
            answer: Status(400),
            moves: Nothing,
        },
        Row {
            name: "two different Content-Lengths",
            wire: format!(
                "POST /webhooks/patreon HTTP/1.1\r\nhost: relay\r\n{ev}\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{{}}"
            )
            .into_bytes(),
            answer: Status(400),
            moves: Nothing,
        },
        Row {
            // RFC 9112 6.3: chunked wins, Content-Length is dropped, and the connection
            // closes after the answer, so the request hidden behind it is never read.
            name: "Content-Length and chunked together, a request smuggled behind",
            wire: [
                chunked_head("content-length: 5\r\n").replace_connection_close(),
                b"2\r\n{}\r\n0\r\n\r\n".to_vec(),
                signed_wire("/webhooks/patreon", "members:create", &fresh_body()),
            ]
            .concat(),
            answer: Status(401),
            moves: Signature("mismatch"),
        },
        Row {
            name: "deeply nested JSON (129 levels), validly signed",
            wire: signed_wire("/webhooks/patreon", "members:create", &deep(129)),
            answer: Status(400),
            moves: Rejected("patreon", "invalid_json"),
        },
        Row {
            name: "deeply nested JSON (30000 levels), validly signed",
            wire: signed_wire("/webhooks/patreon", "members:create", &deep(30_000)),
            answer: Status(400),
            moves: Rejected("patreon", "invalid_json"),
        },
        Row {
            // Valid JSON grammar; the relay checks syntax only and relays the bytes.
            name: "number beyond f64, validly signed (relayed byte for byte)",
            wire: signed_wire(
                "/webhooks/patreon",
                "members:create",
                format!(r#"{{"data":{{"id":"{}","type":"x"}},"n":-1e999999}}"#, unique("huge")).as_bytes(),
            ),
            answer: Status(200),
            moves: Published(1.0),
        },
        Row {
            // Found by the envelope fuzz target: used to be refused as invalid JSON.
            name: "data.id beyond f64, validly signed (relayed without a subject)",
            wire: signed_wire(
                "/webhooks/patreon",
                "members:create",
                format!(r#"{{"data":{{"id":1e999999,"type":"x"}},"u":"{}"}}"#, unique("huge-id")).as_bytes(),
            ),
            answer: Status(200),
            moves: Published(1.0),
        },
        Row {
            name: "300-digit integer, validly signed (relayed byte for byte)",
            wire: signed_wire(
                "/webhooks/patreon",
                "members:create",
                format!(r#"{{"data":{{"id":"{}","type":"x"}},"n":{}}}"#, unique("big"), "9".repeat(300)).as_bytes(),
            ),
            answer: Status(200),
            moves: Published(1.0),
        },
        Row {
            name: "duplicate JSON keys, validly signed (relayed byte for byte)",
            wire: signed_wire(
                "/webhooks/patreon",
                "members:create",
                format!(r#"{{"data":{{"id":"1","type":"a"}},"data":{{"id":"{}","type":"b"}}}}"#, unique("dup"))
                    .as_bytes(),
            ),
            answer: Status(200),
            moves: Published(1.0),
        },
    ]);
    // --- paths: a signed request to a path that is not exactly /webhooks/patreon ---------
    let paths: [(&'static str, &str, &'static str); 6] = [
        ("path traversal /webhooks/../webhooks/patreon", "/webhooks/../webhooks/patreon", "unknown_source"),
        ("encoded slash /webhooks/patreon%2F..", "/webhooks/patreon%2F..", "unknown_source"),
        ("percent-encoded name /webhooks/%70atreon", "/webhooks/%70atreon", "unknown_source"),
        ("upper-case name /webhooks/PATREON", "/webhooks/PATREON", "unknown_source"),
        ("trailing slash /webhooks/patreon/", "/webhooks/patreon/", "unknown_source"),
        ("double leading slash //webhooks/patreon", "//webhooks/patreon", "not_found"),
    ];
    rows.extend(paths.map(|(name, path, reason)| Row {
        name,
        wire: post_wire(path, &[ev.clone(), good_sig.clone()], &good_body),
        answer: Status(404),
        moves: Rejected("_unknown", reason),
    }));
    rows.extend([
        Row {
            name: "NUL byte in the path",
            wire: raw_head(&[b"POST /webhooks/patreon\0 HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n"]),
            answer: Status(400),
            moves: Nothing,
        },
        Row {
            name: "invalid UTF-8 in the path",
            wire: raw_head(&[b"POST /webhooks/patr\xc3\x28eon HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n"]),
            answer: Status(400),
            moves: Nothing,
        },
        Row {
            name: "query string on a signed delivery (ignored, relayed)",
            wire: signed_wire("/webhooks/patreon?redeliver=1&x=%00", "members:create", &fresh_body()),
            answer: Status(200),
            moves: Published(1.0),
        },
        Row {
            name: "lower-case method `post`",
            wire: b"post /webhooks/patreon HTTP/1.1\r\nhost: relay\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                .to_vec(),
            answer: Status(405),
            moves: Rejected("patreon", "method_not_allowed"),
        },
        Row {
            name: "garbage request line",
            wire: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n".to_vec(),
            answer: Status(400),
            moves: Nothing,
        },
        // --- protocol versions and framing ------------------------------------------
        Row { name: "HTTP/1.0, validly signed", wire: http10, answer: Status(200), moves: Published(1.0) },
        Row {
            name: "two pipelined signed requests",
            wire: pipelined,
            answer: Statuses(vec![200, 200]),
            moves: Published(2.0),
        },
        Row {
            name: "HTTP/2 prior-knowledge preface (not served: closed)",
            wire: [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat(),
            answer: Closed,
            moves: Nothing,
        },
        Row {
            name: "h2c upgrade request (ignored, answered as HTTP/1.1)",
            wire: post_wire(
                "/webhooks/patreon",
                &["upgrade: h2c".into(), "http2-settings: AAMAAABkAAQCAAAAAAIAAAAA".into(), ev.clone()],
                b"{}",
            ),
            answer: Status(401),
            moves: Signature("missing"),
        },
    ]);
    rows
}
