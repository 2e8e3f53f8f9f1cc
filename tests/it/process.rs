//! The real binary as a process: restart after SIGKILL with a non-empty spool,
//! SIGTERM exit status, the spool lock, and `check-config`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::proxy::{FaultProxy, Mode};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_relay_drains_its_spool_after_restart() {
    let dir = temp_dir("hr-proc");
    let spool = dir.join("spool");
    let config = RelayConfig::new().spool(&spool);
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await.unwrap();
    proxy.set(Mode::Refuse);
    let mut first = Child::spawn(&dir, "first", config.clone().amqp_url(proxy.amqp_url()), &[]);
    first.wait_for("/readyz").await; // ready: the spool accepts while the broker is away
    let mut ids = Vec::new();
    for n in 0..25 {
        let (status, id) = post_signed(first.ingest, n).await;
        assert_eq!(status, 200);
        ids.push(id.unwrap());
    }
    first.signal("KILL");
    let status = first.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());

    let mut second = Child::spawn(&dir, "second", config.clone(), &[]);
    second.wait_for("/readyz").await;
    // Ready already means "the spool accepts"; the queue exists once connected.
    wait_for_metric(second.admin, "hookrelay_broker_connected", &[], 1.0, Duration::from_secs(20)).await;
    let conn = broker().await;
    let queue = format!("{}.patreon", config.exchange);
    let got = take_messages(&conn, &queue, ids.len(), Duration::from_secs(30)).await;
    let got_ids: Vec<String> =
        got.iter().map(|d| d.properties.message_id().as_ref().unwrap().to_string()).collect();
    assert_eq!(got_ids, ids, "every spooled event, in order, after SIGKILL and restart");
    second.stop().await;
    cleanup(&config.toml()).await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_a_second_relay_cannot_share_the_spool() {
    let dir = temp_dir("hr-proc");
    let spool = dir.join("spool");
    let config = RelayConfig::new().spool(&spool);
    let mut first = Child::spawn(&dir, "first", config.clone(), &[]);
    first.wait_for("/readyz").await;
    // Ready already means "the spool accepts"; the close below needs a connection.
    broker_connected(first.admin, true).await;
    let (status, _) = post_signed(first.ingest, 1).await;
    assert_eq!(status, 200);

    let mut second = Child::spawn(&dir, "second", config.clone(), &[]);
    let status = second.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(2));
    let log = second.output();
    assert!(log.contains("in use by another hookrelay process"), "{log}");

    first.stop().await;
    let log = first.output();
    assert!(log.contains("Closed the broker connection."), "{log}");
    cleanup(&config.toml()).await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_config_validates_and_names_the_key() {
    let dir = temp_dir("hr-cfg");
    let source = "[sources.patreon]\nkind = \"patreon\"\nsecrets = \"s-NOT-REAL\"\n";
    let out = check_config(&dir, "good", source);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok: 1 source(s)"));

    let out = check_config(&dir, "bad", &format!("{source}[amqp]\npublish_timeout_ms = 0\n"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("amqp.publish_timeout_ms"), "{err}");
    assert!(!err.contains("s-NOT-REAL"));

    let out = Command::new(BIN)
        .arg("check-config")
        .env("HOOKRELAY_CONFIG", dir.join("good.toml"))
        .env("HOOKRELAY_HTTP__LISTEN_ADDRESS", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_address"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn topology_export_matches_the_checked_in_definitions() {
    let out = Command::new(BIN)
        .args(["topology", "export"])
        .env("HOOKRELAY_SOURCES__PATREON__KIND", "patreon")
        // No secret and a URL that is no URL: the topology depends on neither.
        .env("HOOKRELAY_AMQP__URL", "not a url")
        .env_remove("HOOKRELAY_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let generated: Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rabbitmq/definitions.json");
    let checked_in: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for key in ["exchanges", "queues", "bindings"] {
        assert_eq!(
            generated[key], checked_in[key],
            "deploy/rabbitmq/definitions.json is stale: regenerate it with \
             `HOOKRELAY_SOURCES__PATREON__KIND=patreon hookrelay topology export`"
        );
    }
}
