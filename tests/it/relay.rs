//! End to end: signed fixtures in, confirmed CloudEvents out of the source queue.

use std::time::Duration;

use lapin::types::AMQPValue;
use serde_json::Value;

use crate::support::*;

fn header<'a>(d: &'a lapin::message::Delivery, key: &str) -> Option<&'a AMQPValue> {
    d.properties.headers().as_ref().and_then(|h| h.inner().get(key))
}

fn header_str(d: &lapin::message::Delivery, key: &str) -> Option<String> {
    match header(d, key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_valid_fixture_is_relayed_byte_exact() {
    let relay = Relay::start().await;
    let conn = broker().await;
    let fixtures = valid_fixtures();
    assert!(fixtures.len() >= 29, "expected the full fixture set, got {}", fixtures.len());
    let mut expected = Vec::new();
    for f in &fixtures {
        let (status, _, body) = relay.post_fixture(f).await;
        assert_eq!(status, 200, "{}: {}", f.name, String::from_utf8_lossy(&body));
        let answer: Value = serde_json::from_slice(&body).unwrap();
        let id = answer["id"].as_str().unwrap().to_owned();
        expected.push((id, f));
    }
    let got = take_messages(&conn, &relay.queue("patreon"), fixtures.len(), Duration::from_secs(10)).await;
    assert_eq!(got.len(), fixtures.len());
    // Fixtures that share body and trigger share an id; compare by id and body.
    for d in &got {
        let id = d.properties.message_id().as_ref().unwrap().as_str().to_owned();
        let (_, f) = expected
            .iter()
            .find(|(eid, f)| *eid == id && envelope_data(&d.data) == f.body.as_slice())
            .unwrap_or_else(|| panic!("unexpected message {id}"));
        let dotted = f.event.replace(':', ".");
        assert_eq!(d.routing_key.as_str(), format!("patreon.{dotted}"), "{}", f.name);
        assert_eq!(d.properties.delivery_mode(), &Some(2));
        assert_eq!(d.properties.content_type().as_ref().unwrap().as_str(), "application/cloudevents+json");
        assert_eq!(d.properties.app_id().as_ref().unwrap().as_str(), "hookrelay");
        assert_eq!(d.properties.kind().as_ref().unwrap().as_str(), format!("com.patreon.{dotted}"));
        assert!(d.properties.timestamp().is_some());
        let ce: Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], id.as_str());
        assert_eq!(ce["source"], "/webhooks/patreon");
        assert_eq!(ce["type"], format!("com.patreon.{dotted}"));
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(header_str(d, "cloudEvents_specversion").as_deref(), Some("1.0"));
        assert_eq!(header_str(d, "cloudEvents_id").as_deref(), Some(id.as_str()));
        assert_eq!(header_str(d, "cloudEvents_source").as_deref(), Some("/webhooks/patreon"));
        assert_eq!(header_str(d, "cloudEvents_type"), Some(format!("com.patreon.{dotted}")));
        assert_eq!(header_str(d, "cloudEvents_time").as_deref(), ce["time"].as_str());
        // The consumer can re-verify the provider signature from the envelope alone.
        let resigned = sign_with(&f.secret, envelope_data(&d.data));
        assert_eq!(resigned, f.signature.to_lowercase(), "{}", f.name);
        let data = &ce["data"]["data"];
        match (data["type"].as_str(), data["id"].as_str()) {
            (Some(t), Some(i)) => {
                assert_eq!(ce["subject"], format!("{t}/{i}"));
                assert_eq!(header_str(d, "cloudEvents_subject"), Some(format!("{t}/{i}")));
            }
            _ => {
                assert!(ce.get("subject").is_none(), "{}", f.name);
                assert!(header_str(d, "cloudEvents_subject").is_none());
            }
        }
    }
    let published = relay.metric("hookrelay_events_published_total", &[("source", "patreon")]).await;
    assert!(published >= 1.0);
    let send_test = fixtures.iter().find(|f| f.name.contains("send_test")).unwrap();
    assert!(send_test.body.windows(10).any(|w| w == b"\"id\": null"));
    relay.stop_and_cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_delivery_carries_the_same_event_id() {
    let relay = Relay::start().await;
    let f = &valid_fixtures()[0];
    let (s1, _, b1) = relay.post_fixture(f).await;
    let (s2, _, b2) = relay.post_fixture(f).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(b1, b2);
    let conn = broker().await;
    let got = take_messages(&conn, &relay.queue("patreon"), 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].properties.message_id(), got[1].properties.message_id());
    relay.stop_and_cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_triggers_are_relayed_and_counted_as_other() {
    let relay = Relay::start().await;
    let body = br#"{"data":{"id":"1","type":"member"}}"#.to_vec();
    let (status, _, _) = Signed::of(body).event("members:pledge:paused").post(relay.ingest).await;
    assert_eq!(status, 200);
    let other =
        relay.metric("hookrelay_events_published_total", &[("source", "patreon"), ("event", "other")]).await;
    assert_eq!(other, 1.0);
    let conn = broker().await;
    let got = take_messages(&conn, &relay.queue("patreon"), 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].routing_key.as_str(), "patreon.members.pledge.paused");
    relay.stop_and_cleanup().await;
}
