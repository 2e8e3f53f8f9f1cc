//! Every provider kind end to end, over real sockets and the real broker: a valid
//! delivery lands in `{exchange}.{source}` with its routing key, type, id and exact
//! body; wrong, missing, malformed and stale signatures get 401 with their reason
//! counted; the second secret of a rotation verifies; an unknown event is relayed as
//! `other`; a malicious event name gets 400; a retry re-signed later keeps its id.

mod special;

use std::time::{Duration, SystemTime};

use lapin::types::AMQPValue;
use serde_json::Value;

use crate::support::*;

use hookrelay::envelope::delivery_event_id;
use hookrelay::verify::{github, hmac_generic, shopify, slack, standard, stripe};

const OLD: &str = "old-secret-NOT-REAL";
const NEW: &str = "new-secret-NOT-REAL";
/// Standard Webhooks secrets are base64 after `whsec_`.
const SW_OLD: &str = "whsec_b2xkLXNlY3JldC1OT1QtUkVBTA==";
const SW_NEW: &str = "whsec_bmV3LXNlY3JldC1OT1QtUkVBTA==";
const SW_WRONG: &str = "whsec_d3Jvbmctc2VjcmV0LU5PVC1SRUFM";

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What one delivery is: the event the sender means, its id, its time.
#[derive(Clone)]
struct Delivery {
    event: String,
    id: String,
    at: u64,
}

/// Request headers as name/value pairs.
type Headers = Vec<(String, String)>;

/// One provider kind as a test drives it.
struct Scheme {
    /// The `[sources.<name>]` table's body, secrets included.
    toml: String,
    source: &'static str,
    /// The body of `d` (providers that name the event in the body put it there).
    body: fn(&Delivery) -> Vec<u8>,
    /// The headers of `d` with `body`, signed with `secret`.
    sign: fn(&str, &Delivery, &[u8]) -> Headers,
    /// The secret that signs valid deliveries, the older one of the rotation, a wrong one.
    secrets: [&'static str; 3],
    /// An event the provider documents: (what the sender sends, the relayed name dotted, its label).
    known: (&'static str, &'static str, &'static str),
    /// An event it does not: (sent, dotted).
    unknown: (&'static str, &'static str),
    /// A name that must not become a routing key, and the reason it is counted under.
    malicious: (&'static str, &'static str),
    /// The signature header and a malformed value of it.
    malformed: (&'static str, &'static str),
    /// CloudEvents type prefix.
    prefix: &'static str,
    /// Whether the scheme signs a timestamp (stale deliveries are refused).
    timestamped: bool,
    /// Whether the delivery id is the event id's source.
    delivery_ids: bool,
}

fn pairs(list: &[(String, String)]) -> Vec<(&str, &str)> {
    list.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn header_str(d: &lapin::message::Delivery, key: &str) -> Option<String> {
    match d.properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

fn answer_id(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

/// A TOML value written as it is.
struct Raw(String);

impl TomlValue for Raw {
    fn toml(&self) -> String {
        self.0.clone()
    }
}

/// A relay with the Patreon source of every test relay plus `[sources.<source>]`,
/// given as `key = value` lines.
async fn start_source(source: &str, table: &str) -> Relay {
    let name = format!("sources.{source}");
    let mut cfg = RelayConfig::new();
    for line in table.lines() {
        let (key, value) = line.split_once(" = ").unwrap_or_else(|| panic!("not `key = value`: {line}"));
        cfg = cfg.set(&name, key, Raw(value.to_owned()));
    }
    cfg.start().await
}

/// Posts `d` signed with `secret`; returns the answer.
async fn deliver(relay: &Relay, s: &Scheme, d: &Delivery, secret: &str) -> Response {
    let body = (s.body)(d);
    let headers = (s.sign)(secret, d, &body);
    post(relay.ingest, &format!("/webhooks/{}", s.source), &pairs(&headers), body).await
}

/// The whole matrix for one scheme.
async fn exercise(s: Scheme) {
    let relay = start_source(s.source, &s.toml).await;
    let conn = broker().await;
    let queue = relay.queue(s.source);
    let metric = |name: &'static str, labels: Vec<(&'static str, &'static str)>| {
        let relay = &relay;
        async move {
            let mut all = vec![("source", s.source)];
            all.extend(labels);
            relay.metric(name, &all).await
        }
    };
    let d = Delivery { event: s.known.0.into(), id: unique("d"), at: now() };

    // Valid: 200, then the message with its key, type, id and exact body.
    let (status, _, answer) = deliver(&relay, &s, &d, s.secrets[0]).await;
    assert_eq!(status, 200, "{}: {}", s.source, String::from_utf8_lossy(&answer));
    let id = answer_id(&answer);
    let got = take_messages(&conn, &queue, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{}: no message in {queue}", s.source);
    let m = &got[0];
    assert_eq!(m.routing_key.as_str(), format!("{}.{}", s.source, s.known.1));
    assert_eq!(m.properties.kind().as_ref().unwrap().as_str(), format!("{}.{}", s.prefix, s.known.1));
    assert_eq!(m.properties.message_id().as_ref().unwrap().as_str(), id);
    let ce: Value = serde_json::from_slice(&m.data).unwrap();
    assert_eq!(ce["id"], id.as_str());
    assert_eq!(ce["type"], format!("{}.{}", s.prefix, s.known.1));
    assert_eq!(ce["source"], format!("/webhooks/{}", s.source));
    assert_eq!(envelope_data(&m.data), (s.body)(&d).as_slice(), "{}: data is not byte-exact", s.source);
    if s.delivery_ids {
        assert_eq!(id, delivery_event_id(s.source, &d.id));
        assert_eq!(ce["deliveryid"], d.id.as_str());
        assert_eq!(header_str(m, "cloudEvents_deliveryid").as_deref(), Some(d.id.as_str()));
    }
    assert_eq!(metric("hookrelay_events_published_total", vec![("event", s.known.2)]).await, 1.0);

    // The same delivery retried later (and re-signed when the scheme has a time): same id.
    let later = Delivery { at: d.at + 60, ..d.clone() };
    let (status, _, answer) = deliver(&relay, &s, &later, s.secrets[0]).await;
    assert_eq!(status, 200);
    if s.delivery_ids || !s.timestamped {
        assert_eq!(answer_id(&answer), id, "{}: a retry got a new id", s.source);
    }
    if s.delivery_ids {
        // Another delivery with the very same body is another event.
        let twin = Delivery { id: unique("d"), ..d.clone() };
        let (status, _, answer) = deliver(&relay, &s, &twin, s.secrets[0]).await;
        assert_eq!(status, 200);
        assert_ne!(answer_id(&answer), id);
    }

    // The older secret of a rotation still verifies.
    let rotated = Delivery { id: unique("d"), ..d.clone() };
    assert_eq!(deliver(&relay, &s, &rotated, s.secrets[1]).await.0, 200);

    // An unknown event is relayed, counted as `other`.
    let other_before = metric("hookrelay_events_published_total", vec![("event", "other")]).await;
    let odd = Delivery { event: s.unknown.0.into(), id: unique("d"), at: now() };
    let (status, _, answer) = deliver(&relay, &s, &odd, s.secrets[0]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(
        metric("hookrelay_events_published_total", vec![("event", "other")]).await,
        other_before + 1.0
    );

    // A malicious event name: 400, counted.
    let bad = Delivery { event: s.malicious.0.into(), id: unique("d"), at: now() };
    let (status, _, _) = deliver(&relay, &s, &bad, s.secrets[0]).await;
    assert_eq!(status, 400, "{}: {:?} was accepted", s.source, s.malicious.0);
    assert_eq!(metric("hookrelay_webhooks_rejected_total", vec![("reason", s.malicious.1)]).await, 1.0);

    // Signatures: wrong secret, missing, malformed, stale both ways.
    let fresh = Delivery { id: unique("d"), ..d.clone() };
    assert_eq!(deliver(&relay, &s, &fresh, s.secrets[2]).await.0, 401);
    let body = (s.body)(&fresh);
    let signed = (s.sign)(s.secrets[0], &fresh, &body);
    let unsigned: Vec<_> =
        signed.iter().filter(|(k, _)| !k.eq_ignore_ascii_case(s.malformed.0)).cloned().collect();
    let path = format!("/webhooks/{}", s.source);
    assert_eq!(post(relay.ingest, &path, &pairs(&unsigned), body.clone()).await.0, 401);
    let mut malformed = unsigned.clone();
    malformed.push((s.malformed.0.into(), s.malformed.1.into()));
    assert_eq!(post(relay.ingest, &path, &pairs(&malformed), body.clone()).await.0, 401);
    let mut expect = vec![("mismatch", 1.0), ("missing", 1.0), ("malformed", 1.0)];
    if s.timestamped {
        for at in [now() - 3600, now() + 3600] {
            let stale = Delivery { at, ..fresh.clone() };
            assert_eq!(deliver(&relay, &s, &stale, s.secrets[0]).await.0, 401);
        }
        expect.push(("stale", 2.0));
    }
    for (reason, count) in expect {
        let got = metric("hookrelay_signature_failures_total", vec![("reason", reason)]).await;
        assert_eq!(got, count, "{}: signature failures {reason}", s.source);
    }
    relay.stop_and_cleanup().await;
}

fn github_scheme() -> Scheme {
    Scheme {
        toml: format!("kind = \"github\"\nsecrets = [\"{NEW}\", \"{OLD}\"]"),
        source: "gh",
        body: |d| format!(r#"{{"action":"opened","number":7,"tag":"{}"}}"#, d.id).into_bytes(),
        sign: |secret, d, body| {
            vec![
                ("X-Hub-Signature-256".into(), github::sign(secret.as_bytes(), body)),
                ("X-GitHub-Event".into(), d.event.clone()),
                ("X-GitHub-Delivery".into(), d.id.clone()),
            ]
        },
        secrets: [NEW, OLD, "wrong-NOT-REAL"],
        known: ("pull_request", "pull_request.opened", "pull_request"),
        unknown: ("brand_new_event", "brand_new_event.opened"),
        malicious: ("push#", "bad_event_header"),
        malformed: ("X-Hub-Signature-256", "sha256=zz"),
        prefix: "com.github",
        timestamped: false,
        delivery_ids: true,
    }
}

fn stripe_body(d: &Delivery) -> Vec<u8> {
    let evt = d.id.replace('-', "");
    format!(
        r#"{{"id":"evt_{evt}","object":"event","type":"{}","data":{{"object":{{"object":"invoice","id":"in_1"}}}}}}"#,
        d.event
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_deliveries() {
    exercise(github_scheme()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_deliveries() {
    exercise(Scheme {
        toml: format!("kind = \"stripe\"\nsecrets = [\"whsec_{NEW}\", \"whsec_{OLD}\"]"),
        source: "stripe",
        body: stripe_body,
        sign: |secret, d, body| {
            let secret = format!("whsec_{secret}");
            vec![("Stripe-Signature".into(), stripe::sign(secret.as_bytes(), d.at, body))]
        },
        secrets: [NEW, OLD, "wrong-NOT-REAL"],
        known: ("invoice.paid", "invoice.paid", "invoice.paid"),
        unknown: ("treasury.brand_new", "treasury.brand_new"),
        malicious: ("invoice paid", "bad_event"),
        malformed: ("Stripe-Signature", "t=abc,v1=00"),
        prefix: "com.stripe",
        timestamped: true,
        // The id is in the body: the checks below compare it by the body's `id`.
        delivery_ids: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shopify_deliveries() {
    exercise(Scheme {
        toml: format!("kind = \"shopify\"\nsecrets = [\"{NEW}\", \"{OLD}\"]"),
        source: "shop",
        body: |d| {
            format!(r#"{{"id":820982911946154508,"email":"jon@example.com","n":"{}"}}"#, d.id).into_bytes()
        },
        sign: |secret, d, body| {
            vec![
                ("X-Shopify-Hmac-Sha256".into(), shopify::sign(secret.as_bytes(), body)),
                ("X-Shopify-Topic".into(), d.event.clone()),
                ("X-Shopify-Webhook-Id".into(), d.id.clone()),
                ("X-Shopify-Shop-Domain".into(), "fixture-shop.myshopify.com".into()),
            ]
        },
        secrets: [NEW, OLD, "wrong-NOT-REAL"],
        known: ("orders/create", "orders.create", "orders/create"),
        unknown: ("orders/brand_new", "orders.brand_new"),
        malicious: ("orders/create*", "bad_event_header"),
        malformed: ("X-Shopify-Hmac-Sha256", "not base64!"),
        prefix: "com.shopify",
        timestamped: false,
        delivery_ids: true,
    })
    .await;
}

fn slack_headers(secret: &str, d: &Delivery, body: &[u8]) -> Vec<(String, String)> {
    vec![
        ("X-Slack-Signature".into(), slack::sign(secret.as_bytes(), d.at, body)),
        ("X-Slack-Request-Timestamp".into(), d.at.to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_deliveries() {
    exercise(Scheme {
        toml: format!("kind = \"slack\"\nsecrets = [\"{NEW}\", \"{OLD}\"]"),
        source: "slack",
        body: |d| {
            format!(
                r#"{{"type":"event_callback","team_id":"T1","event_id":"{}","event":{{"type":"{}","text":"hi"}}}}"#,
                d.id, d.event
            )
            .into_bytes()
        },
        sign: slack_headers,
        secrets: [NEW, OLD, "wrong-NOT-REAL"],
        known: ("app_mention", "event.app_mention", "event.app_mention"),
        unknown: ("brand_new", "event.brand_new"),
        malicious: ("app mention", "bad_event"),
        malformed: ("X-Slack-Signature", "v1=00"),
        prefix: "com.slack",
        timestamped: true,
        delivery_ids: true,
    })
    .await;
}

fn standard_headers(names: [&str; 3], secret: &str, d: &Delivery, body: &[u8]) -> Vec<(String, String)> {
    let sig = standard::sign(secret.as_bytes(), &d.id, d.at, body).unwrap();
    vec![(names[0].into(), d.id.clone()), (names[1].into(), d.at.to_string()), (names[2].into(), sig)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_webhooks_deliveries() {
    exercise(Scheme {
        toml: format!("kind = \"standard-webhooks\"\nsecrets = [\"{SW_NEW}\", \"{SW_OLD}\"]"),
        source: "sw",
        body: |d| {
            format!(r#"{{"type":"{}","timestamp":"2025-01-01T00:00:00Z","data":{{"n":1}}}}"#, d.event)
                .into_bytes()
        },
        sign: |secret, d, body| {
            standard_headers(["webhook-id", "webhook-timestamp", "webhook-signature"], secret, d, body)
        },
        secrets: [SW_NEW, SW_OLD, SW_WRONG],
        // Standard Webhooks names no events of its own: every one counts as `other`.
        known: ("invoice.paid", "invoice.paid", "other"),
        unknown: ("contact.created", "contact.created"),
        malicious: ("invoice paid", "bad_event"),
        malformed: ("webhook-signature", "v1,not-base64"),
        prefix: "sw",
        timestamped: true,
        delivery_ids: true,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svix_named_headers_work_the_same() {
    exercise(Scheme {
        toml: format!("kind = \"standard-webhooks\"\nsecrets = [\"{SW_NEW}\", \"{SW_OLD}\"]\ntype_prefix = \"com.example\""),
        source: "svix",
        body: |d| format!(r#"{{"type":"{}","data":{{}}}}"#, d.event).into_bytes(),
        sign: |secret, d, body| standard_headers(["svix-id", "svix-timestamp", "svix-signature"], secret, d, body),
        secrets: [SW_NEW, SW_OLD, SW_WRONG],
        known: ("user.created", "user.created", "other"),
        unknown: ("user.deleted", "user.deleted"),
        malicious: ("", "bad_event"),
        malformed: ("svix-signature", "v1,"),
        prefix: "com.example",
        timestamped: true,
        delivery_ids: true,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_hmac_deliveries() {
    exercise(Scheme {
        toml: format!(
            "kind = \"hmac\"\nsecrets = [\"{NEW}\", \"{OLD}\"]\nsignature_header = \"X-Signature\"\n\
             algorithm = \"sha512\"\nencoding = \"base64\"\nsignature_prefix = \"sha512=\"\n\
             event_header = \"X-Event\"\nid_header = \"X-Delivery\""
        ),
        source: "acme",
        body: |d| format!(r#"{{"thing":"{}"}}"#, d.id).into_bytes(),
        sign: |secret, d, body| {
            use hmac_generic::{Algorithm, Encoding};
            vec![
                (
                    "X-Signature".into(),
                    hmac_generic::sign(
                        secret.as_bytes(),
                        Algorithm::Sha512,
                        Encoding::Base64,
                        "sha512=",
                        body,
                    ),
                ),
                ("X-Event".into(), d.event.clone()),
                ("X-Delivery".into(), d.id.clone()),
            ]
        },
        secrets: [NEW, OLD, "wrong-NOT-REAL"],
        // With an event header the names are the sender's own: all count as `other`.
        known: ("invoice:paid", "invoice.paid", "other"),
        unknown: ("x/y", "x.y"),
        malicious: ("a.#", "bad_event_header"),
        malformed: ("X-Signature", "sha512=abc"),
        prefix: "acme",
        timestamped: false,
        delivery_ids: true,
    })
    .await;
}
