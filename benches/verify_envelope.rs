//! The per-request CPU work that is ours: Patreon signature verification and the
//! CloudEvents envelope, for a 4 KiB payload (target: both together ≤ 5 µs), then each
//! part on its own, and the AMQP properties the publisher builds from the envelope.
//!
//! Run: `cargo bench --bench verify_envelope` (add `-- --quick` for a fast pass).

#![allow(
    clippy::expect_used,
    reason = "a micro-benchmark over fixed inputs: a broken input should stop it loudly"
)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hookrelay::envelope;
use hookrelay::verify::Trigger;
use hookrelay::verify::patreon::{PatreonVerifier, sign};

const SECRET: &[u8] = b"fixture-v2-webhook-secret-NOT-REAL-b7d31a08e6";
const FIXTURE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/patreon/v2/members_pledge_delete.json");
const EVENT: &[u8] = b"members:pledge:delete";

/// A body of exactly `size` bytes: the fixture padded with a trailing `"pad"` member,
/// or, below the fixture's size, its `data` reference padded the same way.
fn body_of(size: usize) -> Vec<u8> {
    let fixture = std::fs::read(FIXTURE).unwrap_or_else(|e| panic!("reading {FIXTURE}: {e}"));
    let overhead = r#","pad":"""#.len();
    let base = if fixture.len() + overhead <= size {
        fixture
    } else {
        br#"{"data":{"id":"1f3e2a9c-7d41-4c55-9a0b-6e2f8d1c3b7a","type":"member"}}"#.to_vec()
    };
    assert!(base.len() + overhead <= size, "{size} bytes is too small for a body");
    let close = base.iter().rposition(|&b| b == b'}').expect("the fixture is a JSON object");
    let mut out = base[..close].to_vec();
    out.extend_from_slice(br#","pad":""#);
    out.resize(out.len() + size - base.len() - overhead, b'x');
    out.extend_from_slice(br#""}"#);
    out.extend_from_slice(&base[close + 1..]);
    assert_eq!(out.len(), size);
    out
}

const TARGET: envelope::Target<'static> =
    envelope::Target { source_name: "patreon", ce_source: "/webhooks/patreon", type_prefix: "com.patreon" };

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_374_400_123_456)
}

/// Verification plus envelope, as the ingest handler runs them, at 1, 4 and 8 KiB.
fn whole(c: &mut Criterion) {
    let verifier = PatreonVerifier::new([SECRET]);
    let mut group = c.benchmark_group("verify_envelope");
    for size in [1024usize, 4096, 8192] {
        let body = body_of(size);
        let sig = sign(SECRET, &body);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| {
                let verified = verifier
                    .verify(Some(black_box(sig.as_bytes())), Some(black_box(EVENT)), black_box(body))
                    .expect("signed");
                envelope::build(&verified, &TARGET, now())
            })
        });
    }
    group.finish();
}

/// Each part on its own at 4 KiB.
fn parts(c: &mut Criterion) {
    let body = body_of(4096);
    let sig = sign(SECRET, &body);
    let verifier = PatreonVerifier::new([SECRET]);
    let verified = verifier.verify(Some(sig.as_bytes()), Some(EVENT), &body).expect("signed");
    let env = envelope::build(&verified, &TARGET, now());

    let mut group = c.benchmark_group("parts_4KiB");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("hmac_md5_check", |b| {
        b.iter(|| verifier.check_signature(Some(black_box(sig.as_bytes())), black_box(&body)))
    });
    let rotation = PatreonVerifier::new([&b"old-secret"[..], SECRET]);
    group.bench_function("hmac_md5_check_2_secrets", |b| {
        b.iter(|| rotation.check_signature(Some(black_box(sig.as_bytes())), black_box(&body)))
    });
    group.bench_function("trigger_parse", |b| b.iter(|| Trigger::parse(Some(black_box(EVENT)))));
    group.bench_function("envelope_build", |b| {
        b.iter(|| envelope::build(black_box(&verified), &TARGET, now()))
    });
    group.bench_function("event_id_sha256", |b| {
        b.iter(|| envelope::event_id(black_box("members:pledge:delete"), black_box(&body)))
    });
    group.bench_function("json_skim_serde_ignored_any", |b| {
        b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&body)).is_ok())
    });
    group.bench_function("json_scan_patreon_paths", |b| {
        b.iter(|| {
            hookrelay::verify::json::scan(black_box(&body), &[&["data", "id"], &["data", "type"]]).is_ok()
        })
    });
    group.bench_function("utf8_validate", |b| b.iter(|| std::str::from_utf8(black_box(&body)).is_ok()));
    group.bench_function("rfc3339_time", |b| {
        b.iter(|| humantime::format_rfc3339_micros(black_box(now())).to_string())
    });
    group.finish();

    // Not ours to change, measured for the proposals: what the publisher does per event.
    let mut group = c.benchmark_group("publisher_per_event");
    group.bench_function("amqp_properties", |b| {
        b.iter(|| hookrelay::publish::amqp::properties(black_box(&env)))
    });
    let props = hookrelay::publish::amqp::properties(&env);
    group.bench_function("amqp_properties_clone", |b| b.iter(|| black_box(&props).clone()));
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! { name = benches; config = config(); targets = whole, parts }
criterion_main!(benches);
