//! Helpers shared by the spool's unit tests: temporary directories, records,
//! and reading the directory as a test sees it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::segment::FRAME_HEADER_LEN;
use super::{Spool, SpoolOptions, SpoolRecord};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A directory under the system temp dir, removed on drop (even when a test fails).
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "hookrelay-spool-{name}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        Self(p)
    }
    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(super) fn rec(i: usize) -> SpoolRecord {
    SpoolRecord {
        source: "github".into(),
        routing_key: format!("webhooks.github.push.{i}"),
        event_id: format!("evt-{i:06}"),
        envelope: Bytes::from(format!("{{\"specversion\":\"1.0\",\"n\":{i}}}")),
    }
}

pub(super) fn frame_len(r: &SpoolRecord) -> u64 {
    FRAME_HEADER_LEN + r.payload_len() as u64
}

pub(super) fn opts(max_bytes: u64, segment_bytes: u64) -> SpoolOptions {
    SpoolOptions { max_bytes, segment_bytes }
}

pub(super) fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

/// Peeks and removes everything, returning the records in order.
pub(super) async fn drain_all(spool: &Spool, batch: usize) -> Vec<SpoolRecord> {
    let mut out = Vec::new();
    loop {
        let items = spool.peek_batch(batch).await.unwrap();
        let Some((last, _)) = items.last() else { break };
        let last = *last;
        out.extend(items.into_iter().map(|(_, r)| r));
        spool.remove_through(last).await.unwrap();
    }
    out
}

pub(super) async fn peek_all(spool: &Spool) -> Vec<SpoolRecord> {
    spool.peek_batch(usize::MAX).await.unwrap().into_iter().map(|(_, r)| r).collect()
}

pub(super) fn flip_byte(path: &Path, at: u64) {
    let mut data = fs::read(path).unwrap();
    data[at as usize] ^= 0x5a;
    fs::write(path, data).unwrap();
}

/// Opens the spool in `dir` and appends `rec(i)` for each `i` of `records`.
pub(super) async fn filled(dir: &Path, opts: SpoolOptions, records: std::ops::Range<usize>) -> Spool {
    let (spool, _) = Spool::open(dir, opts).await.unwrap();
    for i in records {
        spool.append(rec(i)).await.unwrap();
    }
    spool
}

/// A new spool with default options in a new directory named after `name`.
pub(super) async fn fresh(name: &str) -> (TempDir, Spool) {
    let tmp = TempDir::new(name);
    let (spool, _) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
    (tmp, spool)
}
