//! The provider cases beyond the common matrix: Stripe's body-borne delivery id,
//! Slack's handshake, form posts and retries, generic HMAC defaults, repeated headers.

use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use super::*;
use crate::support::*;

/// Stripe's delivery id is the body's `id`: a retry with a new `t=` keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_retries_keep_the_event_id() {
    let source = "stripe";
    let relay = start_source(source, &format!("kind = \"stripe\"\nsecrets = \"whsec_{NEW}\"")).await;
    let d = Delivery { event: "invoice.paid".into(), id: unique("d"), at: now() };
    let body = stripe_body(&d);
    let secret = format!("whsec_{NEW}");
    let mut ids = Vec::new();
    for at in [d.at - 120, d.at] {
        let sig = stripe::sign(secret.as_bytes(), at, &body);
        let (status, _, answer) =
            post(relay.ingest, "/webhooks/stripe", &[("Stripe-Signature", &sig)], body.clone()).await;
        assert_eq!(status, 200);
        ids.push(answer_id(&answer));
    }
    let evt = format!("evt_{}", d.id.replace('-', ""));
    assert_eq!(ids, [delivery_event_id(source, &evt), delivery_event_id(source, &evt)]);
    let conn = broker().await;
    let got = take_messages(&conn, &relay.queue(source), 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2);
    assert_eq!(header_str(&got[0], "cloudEvents_deliveryid").as_deref(), Some(evt.as_str()));
    assert_eq!(got[0].properties.kind().as_ref().unwrap().as_str(), "com.stripe.invoice.paid");
    let ce: Value = serde_json::from_slice(&got[0].data).unwrap();
    assert_eq!(ce["subject"], "invoice/in_1");
    relay.stop_and_cleanup().await;
}

/// Slack's URL verification is answered and publishes nothing; slash commands are
/// form posts relayed as `data_base64`; a retry (`X-Slack-Retry-Num`) keeps its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_handshake_forms_and_retries() {
    let relay = start_source("slack", &format!("kind = \"slack\"\nsecrets = \"{NEW}\"")).await;
    let conn = broker().await;
    let queue = relay.queue("slack");
    let d = Delivery { event: String::new(), id: String::new(), at: now() };

    let challenge = br#"{"token":"t","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
    let h = slack_headers(NEW, &d, challenge);
    let (status, headers, answer) =
        post(relay.ingest, "/webhooks/slack", &pairs(&h), challenge.to_vec()).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-type").map(String::as_str), Some("application/json"));
    let v: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(v, serde_json::json!({"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}));
    let wrong = slack_headers("wrong-NOT-REAL", &d, challenge);
    assert_eq!(post(relay.ingest, "/webhooks/slack", &pairs(&wrong), challenge.to_vec()).await.0, 401);
    assert_eq!(post(relay.ingest, "/webhooks/slack", &[], challenge.to_vec()).await.0, 401);

    let form = b"token=x&team_id=T1&command=%2Fdeploy&text=now&trigger_id=1.2.3".to_vec();
    let mut h = slack_headers(NEW, &d, &form);
    h.push(("Content-Type".into(), "application/x-www-form-urlencoded".into()));
    let (status, _, answer) = post(relay.ingest, "/webhooks/slack", &pairs(&h), form.clone()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));

    let body = br#"{"type":"event_callback","event_id":"Ev0RETRY","event":{"type":"message"}}"#.to_vec();
    let first = slack_headers(NEW, &d, &body);
    let mut retry = slack_headers(NEW, &Delivery { at: d.at + 30, ..d.clone() }, &body);
    retry.push(("X-Slack-Retry-Num".into(), "1".into()));
    retry.push(("X-Slack-Retry-Reason".into(), "http_timeout".into()));
    let a = post(relay.ingest, "/webhooks/slack", &pairs(&first), body.clone()).await;
    let b = post(relay.ingest, "/webhooks/slack", &pairs(&retry), body.clone()).await;
    assert_eq!((a.0, b.0), (200, 200));
    assert_eq!(answer_id(&a.2), answer_id(&b.2));
    assert_eq!(answer_id(&a.2), delivery_event_id("slack", "Ev0RETRY"));

    // Nothing of the handshake was published: the command first, then the two events.
    let got = take_messages(&conn, &queue, 3, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].routing_key.as_str(), "slack.command");
    let ce: Value = serde_json::from_slice(&got[0].data).unwrap();
    assert_eq!(ce["datacontenttype"], "application/x-www-form-urlencoded");
    assert_eq!(data_base64(&ce), form);
    assert!(ce.get("data").is_none());
    assert_eq!(got[1].routing_key.as_str(), "slack.event.message");
    assert!(take_messages(&conn, &queue, 1, Duration::from_millis(300)).await.is_empty());
    relay.stop_and_cleanup().await;
}

/// Without an event header every event is `webhook`; a form body is relayed as bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_hmac_defaults_relay_forms_as_bytes() {
    use hmac_generic::{Algorithm, Encoding};
    let table = format!("kind = \"hmac\"\nsecrets = \"{NEW}\"\nsignature_header = \"X-Sig\"");
    let relay = start_source("plain", &table).await;
    let form = b"a=1&b=%C3%A9".to_vec();
    let sig = hmac_generic::sign(NEW.as_bytes(), Algorithm::Sha256, Encoding::Hex, "", &form);
    let headers = [("X-Sig", sig.as_str()), ("Content-Type", "application/x-www-form-urlencoded")];
    let (status, _, answer) = post(relay.ingest, "/webhooks/plain", &headers, form.clone()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let conn = broker().await;
    let got = take_messages(&conn, &relay.queue("plain"), 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].routing_key.as_str(), "plain.webhook");
    let ce: Value = serde_json::from_slice(&got[0].data).unwrap();
    assert_eq!(ce["type"], "plain.webhook");
    assert_eq!(data_base64(&ce), form);
    assert_eq!(
        relay.metric("hookrelay_events_published_total", &[("source", "plain"), ("event", "webhook")]).await,
        1.0
    );
    // A JSON-typed body that is not JSON is refused.
    let sig = hmac_generic::sign(NEW.as_bytes(), Algorithm::Sha256, Encoding::Hex, "", b"nope");
    assert_eq!(post(relay.ingest, "/webhooks/plain", &[("X-Sig", &sig)], b"nope".to_vec()).await.0, 400);
    relay.stop_and_cleanup().await;
}

/// A repeated signature or event header is refused from the head, whatever the kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_provider_headers_are_refused() {
    let s = github_scheme();
    let relay = start_source(s.source, &s.toml).await;
    let d = Delivery { event: "push".into(), id: unique("d"), at: now() };
    let body = (s.body)(&d);
    let signed = (s.sign)(NEW, &d, &body);
    for (name, status) in [("X-Hub-Signature-256", 401), ("X-GitHub-Event", 400)] {
        let mut h = signed.clone();
        h.extend(signed.iter().filter(|(k, _)| k == name).cloned());
        assert_eq!(post(relay.ingest, "/webhooks/gh", &pairs(&h), body.clone()).await.0, status, "{name}");
    }
    relay.stop_and_cleanup().await;
}

/// Runs `hookrelay sign` with `args`, the body on stdin; returns the header lines
/// (exit 0) or the error text (exit 2).
fn sign_cli(args: &[&str], secret: &str, body: &[u8]) -> Result<Vec<(String, String)>, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = temp_dir("sign");
    let file = dir.join("secret");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let mut child = Command::new(BIN)
        .arg("sign")
        .args(args)
        .arg("--secret-file")
        .arg(&file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(2));
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(text.lines().map(|l| l.split_once(": ").unwrap()).map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
}

/// `hookrelay sign --kind K` prints what a sender of K would send: the official
/// vectors come out, and its output for a GitHub delivery is accepted by a relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_prints_any_kinds_headers() {
    let sw = sign_cli(
        &["--kind", "standard-webhooks", "--id", "msg_p5jXN8AQM9LWM0D4loKWxJek", "--timestamp", "1614265330"],
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        br#"{"test": 2432232314}"#,
    )
    .unwrap();
    assert_eq!(sw[2], ("webhook-signature".into(), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".into()));
    let gh =
        sign_cli(&["--kind", "github", "--id", "x"], "It's a Secret to Everybody", b"Hello, World!").unwrap();
    let want = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    assert!(gh.contains(&("X-Hub-Signature-256".into(), want.into())), "{gh:?}");
    let err = sign_cli(&["--kind", "nope"], "s", b"{}").unwrap_err();
    assert!(err.contains("unknown kind `nope`") && err.contains("standard-webhooks"), "{err}");
    assert!(sign_cli(&["--kind", "hmac"], "s", b"{}").unwrap_err().contains("signature_header"));

    let relay = start_source("gh", &format!("kind = \"github\"\nsecrets = \"{NEW}\"")).await;
    let body = br#"{"action":"created","zen":"Keep it logically awesome."}"#.to_vec();
    let headers = sign_cli(&["--kind", "github", "--event", "star", "--id", "d-42"], NEW, &body).unwrap();
    let (status, _, answer) = post(relay.ingest, "/webhooks/gh", &pairs(&headers), body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(answer_id(&answer), delivery_event_id("gh", "d-42"));
    relay.stop_and_cleanup().await;
}

/// The bytes of an envelope's `data_base64`.
fn data_base64(envelope: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(envelope["data_base64"].as_str().unwrap()).unwrap()
}

/// An unknown kind stops `check-config` (and start-up) with exit 2 naming the key; a
/// configuration with every kind passes.
#[test]
fn check_config_refuses_an_unknown_kind_and_accepts_every_kind() {
    let dir = temp_dir("hr-kinds");
    let out = check_config(&dir, "bad", "[sources.pay]\nkind = \"strype\"\nsecrets = \"s-NOT-REAL\"\n");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sources.pay.kind") && err.contains("strype") && err.contains("stripe"), "{err}");
    assert!(!err.contains("s-NOT-REAL"), "{err}");

    let text = [
        "[sources.a]\nkind = \"patreon\"\nsecrets = \"s\"\n",
        "[sources.b]\nkind = \"github\"\nsecrets = \"s\"\n",
        "[sources.c]\nkind = \"stripe\"\nsecrets = \"whsec_s\"\ntolerance_secs = 0\n",
        "[sources.d]\nkind = \"shopify\"\nsecrets = \"s\"\n",
        "[sources.e]\nkind = \"slack\"\nsecrets = \"s\"\ntolerance_secs = 60\n",
        &format!("[sources.f]\nkind = \"standard-webhooks\"\nsecrets = \"{SW_NEW}\"\ntype_prefix = \"com.example\"\n"),
        "[sources.g]\nkind = \"hmac\"\nsecrets = \"s\"\nsignature_header = \"X-Sig\"\nalgorithm = \"md5\"\n",
    ]
    .concat();
    let out = check_config(&dir, "good", &text);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("7 source(s)"), "{said}");
    std::fs::remove_dir_all(dir).unwrap();
}
