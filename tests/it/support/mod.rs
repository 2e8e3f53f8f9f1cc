//! Test support: a relay started in-process exactly as the binary wires it (or the
//! binary itself as a child process), configured with one builder; a real HTTP/1.1
//! client over a socket; signed deliveries; a broker connection with a deadline;
//! fixtures; and polling helpers. Every relay gets a unique exchange so tests run in
//! parallel.
//!
//! - `relay`: [`RelayConfig`] (the one way to configure a test relay) and [`Relay`].
//! - `child`: [`Child`], the `hookrelay` binary as a process.
//! - `signed`: [`Signed`], a delivery signed as Patreon signs it, and [`post_signed`].
//! - `http`: the client ([`get`], [`post`], [`request`]), raw request bytes, metrics.
//! - `broker`: the test broker ([`broker`], [`take_messages`], [`cleanup`], ...).
//! - `fixtures`: the shared Patreon fixtures and their secrets.

// tests/broker_wide.rs includes this module too and uses only part of it.
#![allow(dead_code, unused_imports)]

mod broker;
mod child;
mod fixtures;
mod http;
mod relay;
mod signed;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub use self::broker::*;
pub use self::child::*;
pub use self::fixtures::*;
pub use self::http::*;
pub use self::relay::*;
pub use self::signed::*;

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}-{:04x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        fastrand::u16(..)
    )
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
