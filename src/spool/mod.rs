//! Durable local spool: the relay's fallback when RabbitMQ cannot confirm.
//!
//! A 2xx to a webhook sender means the event is durable. When the broker does
//! not confirm within the publish deadline, the relay appends the event here and
//! answers 2xx only once [`Spool::append`] returned `Ok`, i.e. once the record
//! is on disk and `fdatasync`'d. A background drainer reads records oldest
//! first ([`Spool::peek_batch`]), publishes them, and removes them
//! ([`Spool::remove_through`]) only after the broker confirmed.
//!
//! # API
//!
//! ```text
//! Spool::open(dir, SpoolOptions) -> Result<(Spool, OpenReport), SpoolError>   (async)
//! Spool::append(&self, SpoolRecord) -> Result<(), SpoolError>                 (async, durable on Ok)
//! Spool::peek_batch(&self, max) -> Result<Vec<(SpoolPosition, SpoolRecord)>, SpoolError> (async, oldest first)
//! Spool::remove_through(&self, SpoolPosition) -> Result<(), SpoolError>      (async, durable cursor advance)
//! Spool::wait_nonempty(&self)                                                 (async, drainer sleeps here)
//! Spool::depth(&self) -> SpoolDepth { events, bytes }                         (cheap, for gauges)
//! Spool::stats(&self) -> SpoolStats { fsyncs, commit_groups, appends, ... }   (counters)
//! Spool::close(&self)                                                         (async, stops the writer)
//! Spool::dir(&self) -> &Path
//! SpoolRecord { source, routing_key, event_id, envelope: Bytes }
//! SpoolRecord::encode_payload / SpoolRecord::decode_payload                   (the record codec)
//! ```
//!
//! `Spool` is a cheap `Clone` handle (an `Arc` inside). Errors are typed
//! ([`SpoolError`]): `Full` when the size bound would be exceeded (nothing is
//! written), `Io` for disk errors (disk full, EIO), `Closed` once the writer has
//! stopped. The relay should answer 503 on any of them.
//!
//! Semantics:
//! - `append` is cancel-safe in the sense that dropping its future never loses
//!   accounting; a record already handed to the writer may still be written
//!   (a later duplicate is acceptable, loss is not).
//! - `peek_batch` does not consume: calling it again without `remove_through`
//!   returns the same records. Only one drainer is expected; drain-side calls
//!   are serialized internally.
//! - `remove_through(pos)` removes every record up to and including `pos`
//!   (positions come from `peek_batch` of the same `Spool`; a position from an
//!   earlier open is rejected with `InvalidPosition`, an already removed one is
//!   a no-op). On `Ok` the removal is durable.
//! - After a crash (SIGKILL at any point) reopening the directory finds every
//!   record whose `append` returned `Ok` and that was not removed. Records that
//!   were published but whose removal was not yet durable come back
//!   (duplicates, never loss).
//! - Only one `Spool` (one process) may use a directory at a time. The spool
//!   itself does not check this: the relay takes an exclusive lock on
//!   `{dir}/lock` before opening it (`open_spool` in `lib.rs`).
//! - Size bound: `max_bytes` bounds the pending bytes (record frames not yet
//!   removed plus appends in flight). Disk use can exceed it by the consumed
//!   prefix of the oldest segment (at most `segment_bytes`) until that segment is
//!   fully drained and deleted.
//!
//! # Design
//!
//! One writer thread owns the active segment file. `append` encodes and
//! checksums the record in the caller's task, reserves its bytes against
//! `max_bytes`, and sends it over a bounded mpsc with a oneshot ack. The writer
//! takes everything queued (up to 8 MiB), writes it with one `write_all`, calls
//! `sync_data` once, then acks all of them: group commit, so many concurrent
//! appends share one fsync. A failed write or sync truncates the file back to
//! the last durable record and fails that group with `SpoolError::Io`.
//!
//! # On-disk format
//!
//! A directory holding:
//! - segment files `{seq:020}.seg` (e.g. `00000000000000000001.seg`), `seq`
//!   strictly increasing; a segment is rolled when the next record would push it
//!   past `segment_bytes` (a single larger record gets a segment of its own).
//!   Each segment starts with the 8-byte magic `HRSPSEG1`, followed by records:
//!   `[u32 LE payload length][u32 LE crc32 (IEEE) of payload][payload]`.
//!   A length of 0 or above 64 MiB is invalid (a zero-filled tail never parses
//!   as records).
//! - the record payload (see [`SpoolRecord::encode_payload`]):
//!   `[u8 version = 1][u16 LE len][source][u16 LE len][routing_key]`
//!   `[u16 LE len][event_id][u32 LE len][envelope]`, strings UTF-8.
//! - `cursor` (1024 bytes): two slots at offsets 0 and 512, each
//!   `[b"HRSPCUR2"][u64 LE generation][u64 LE segment][u64 LE offset][u32 LE
//!   crc32 of the previous 32 bytes]`: everything before (segment, offset) has
//!   been removed. Each advance writes the older slot in place with the next
//!   generation and `fdatasync`s it (one sync, no metadata change); the valid
//!   slot with the highest generation wins, so a torn write falls back to the
//!   previous cursor. Segments below the cursor's segment are deleted after the
//!   cursor is durable (and again at open if a crash came in between). No valid
//!   slot means "start of the oldest segment" (duplicates, never loss).
//!
//! # Recovery
//!
//! `open` scans every segment from the cursor on and checks each record's
//! length and CRC. A short or corrupt record in the last segment (a torn tail)
//! is logged with `tracing::warn!`, counted in
//! [`OpenReport::corrupt_records_skipped`], and the file is truncated at the
//! last good record so new appends follow good data. A corrupt record inside an
//! older segment ends that segment (the rest of it is skipped, counted and
//! logged; the file is left as it is and deleted once drained past); the
//! following segments are read normally. A segment whose header is not ours is
//! renamed to `*.seg.corrupt` and left alone. The same checks run when
//! `peek_batch` reads: a bad frame at the head skips the rest of its segment, a
//! frame with a good CRC that does not decode is skipped alone; both advance
//! the cursor durably and count in [`SpoolStats::corrupt_records_skipped`].
//!
//! # Layout
//!
//! This module depends on nothing else in the crate (a benchmark includes it by
//! path). `mod.rs` holds the handle, its public types and the append side;
//! `record` the record codec; `segment` segment files and frames; `cursor` the
//! durable cursor; `state` the in-memory index the handle and the writer share;
//! `recover` what `open` does to a directory (scan, repair the tail, choose the
//! head); `writer` the group-commit thread; `reader` the drain side
//! (`peek_batch`, `remove_through`). Segment-file helpers (`segment`) and the
//! head-advancing removal (`reader`) are what a new drain-side concern, such as
//! setting a poison record aside, builds on.

mod cursor;
mod reader;
mod record;
mod recover;
mod segment;
mod state;
mod writer;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod testing;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, mpsc, oneshot};

use self::reader::DrainState;
pub use self::reader::SpoolPosition;
pub use self::record::{MAX_PAYLOAD_LEN, SpoolRecord};
use self::recover::{Recovered, recover};
use self::state::State;
use self::writer::{Command, PendingAppend, Reservation, Writer};

/// Appends queued towards the writer before `append` waits for room.
const CHANNEL_CAPACITY: usize = 4096;
/// Smallest accepted `segment_bytes`.
const MIN_SEGMENT_BYTES: u64 = 64;

/// Tells positions of one open spool from those of another (see `remove_through`).
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// Errors of the spool. The relay answers 503 on any of them when appending.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Appending would push the pending bytes over `max_bytes`; nothing was written.
    #[error("spool is full")]
    Full,
    /// The encoded record is larger than [`MAX_PAYLOAD_LEN`].
    #[error("spool record too large: {len} bytes (max {max})")]
    TooLarge { len: usize, max: usize },
    /// A string field is longer than 65535 bytes.
    #[error("spool record field `{field}` too long: {len} bytes (max 65535)")]
    FieldTooLong { field: &'static str, len: usize },
    /// Disk or file system error (disk full, EIO, permissions...).
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
    /// The spool's writer has stopped (after `close`, or it died).
    #[error("spool is closed")]
    Closed,
    /// The position is not a pending record of this spool instance.
    #[error("position is not a pending record of this spool")]
    InvalidPosition,
    /// A payload that does not decode as a [`SpoolRecord`].
    #[error("corrupt spool record: {0}")]
    Corrupt(&'static str),
    /// Options out of range.
    #[error("invalid spool options: {0}")]
    InvalidOptions(&'static str),
}

/// Options of [`Spool::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Bound on pending bytes (record frames not yet removed + appends in flight).
    pub max_bytes: u64,
    /// A segment is rolled when the next record would make it larger than this.
    pub segment_bytes: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self { max_bytes: 1 << 30, segment_bytes: 16 << 20 }
    }
}

/// Pending records (appended, durable, not removed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolDepth {
    /// Number of pending records.
    pub events: u64,
    /// Their size on disk (frames: 8-byte header + payload).
    pub bytes: u64,
}

/// What `open` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Pending records found.
    pub records: u64,
    /// Their size on disk (frames).
    pub bytes: u64,
    /// Segment files in use after recovery.
    pub segments: usize,
    /// Corrupt or torn records (or corrupt segment headers) skipped.
    pub corrupt_records_skipped: u64,
    /// Bytes cut off torn/corrupt tails, plus bytes skipped after a corrupt record.
    pub truncated_bytes: u64,
}

/// Counters since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// fsync/fdatasync calls (data, directory and cursor).
    pub fsyncs: u64,
    /// Groups committed by the writer (one data sync each).
    pub commit_groups: u64,
    /// Records appended durably.
    pub appends: u64,
    /// Durable cursor writes.
    pub cursor_writes: u64,
    /// Corrupt records skipped at open and while reading.
    pub corrupt_records_skipped: u64,
}

/// Handle to an open spool. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.dir)
            .field("depth", &self.depth())
            .finish_non_exhaustive()
    }
}

struct Inner {
    dir: PathBuf,
    opts: SpoolOptions,
    instance: u64,
    core: Arc<Core>,
    tx: mpsc::Sender<Command>,
    closed: AtomicBool,
    drain: tokio::sync::Mutex<DrainState>,
}

/// State shared by the handles and the writer thread.
struct Core {
    state: Mutex<State>,
    nonempty: Notify,
    fsyncs: AtomicU64,
    commit_groups: AtomicU64,
    appends: AtomicU64,
    cursor_writes: AtomicU64,
    corrupt: AtomicU64,
    /// Tests hold this to stop the writer between receiving the first append
    /// of a group and collecting the rest (deterministic grouping even where
    /// fsync is free, e.g. tmpfs).
    #[cfg(test)]
    writer_gate: Mutex<()>,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovering from any crash.
    pub async fn open(dir: impl AsRef<Path>, opts: SpoolOptions) -> Result<(Spool, OpenReport), SpoolError> {
        if opts.max_bytes == 0 {
            return Err(SpoolError::InvalidOptions("max_bytes must be > 0"));
        }
        if opts.segment_bytes < MIN_SEGMENT_BYTES {
            return Err(SpoolError::InvalidOptions("segment_bytes must be >= 64"));
        }
        let dir = dir.as_ref().to_path_buf();
        let rec_dir = dir.clone();
        let recovered =
            tokio::task::spawn_blocking(move || recover(&rec_dir)).await.map_err(join_error)??;
        let Recovered { state, active, next_seq, cursor, report } = recovered;
        let core = Arc::new(Core {
            state: Mutex::new(state),
            nonempty: Notify::new(),
            fsyncs: AtomicU64::new(0),
            commit_groups: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            cursor_writes: AtomicU64::new(0),
            corrupt: AtomicU64::new(report.corrupt_records_skipped),
            #[cfg(test)]
            writer_gate: Mutex::new(()),
        });
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let writer = Writer {
            core: core.clone(),
            dir: dir.clone(),
            segment_bytes: opts.segment_bytes,
            active,
            next_seq,
            buf: Vec::new(),
        };
        std::thread::Builder::new().name("hookrelay-spool-writer".into()).spawn(move || writer.run(rx))?;
        let spool = Spool {
            inner: Arc::new(Inner {
                dir,
                opts,
                instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
                core,
                tx,
                closed: AtomicBool::new(false),
                drain: tokio::sync::Mutex::new(DrainState::new(cursor)),
            }),
        };
        Ok((spool, report))
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Appends a record; returns once it is durable (written and fdatasync'd,
    /// sharing the sync with concurrent appends).
    pub async fn append(&self, rec: SpoolRecord) -> Result<(), SpoolError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        let frame = rec.encode_frame()?;
        let reservation = self.reserve(frame.len() as u64)?;
        let (ack, done) = oneshot::channel();
        self.inner
            .tx
            .send(Command::Append(PendingAppend { frame, reservation, ack }))
            .await
            .map_err(|_| SpoolError::Closed)?;
        done.await.map_err(|_| SpoolError::Closed)?
    }

    fn reserve(&self, bytes: u64) -> Result<Reservation, SpoolError> {
        let core = &self.inner.core;
        let mut s = core.lock();
        let used = s.depth().bytes.saturating_add(s.reserved);
        if used.saturating_add(bytes) > self.inner.opts.max_bytes {
            return Err(SpoolError::Full);
        }
        s.reserved += bytes;
        Ok(Reservation { core: core.clone(), bytes })
    }

    /// Pending records and their bytes.
    pub fn depth(&self) -> SpoolDepth {
        self.inner.core.lock().depth()
    }

    /// Counters since open.
    pub fn stats(&self) -> SpoolStats {
        let c = &self.inner.core;
        SpoolStats {
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            commit_groups: c.commit_groups.load(Ordering::Relaxed),
            appends: c.appends.load(Ordering::Relaxed),
            cursor_writes: c.cursor_writes.load(Ordering::Relaxed),
            corrupt_records_skipped: c.corrupt.load(Ordering::Relaxed),
        }
    }

    /// Waits until at least one record is pending.
    pub async fn wait_nonempty(&self) {
        loop {
            let notified = self.inner.core.nonempty.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.depth().events > 0 {
                return;
            }
            notified.await;
        }
    }

    /// Stops the writer after the appends already queued; later appends fail
    /// with `Closed`. Drain-side calls keep working.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> SpoolError {
    SpoolError::Io(io::Error::other(format!("spool blocking task failed: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::testing::*;
    use super::*;

    #[tokio::test]
    async fn wait_nonempty_wakes_on_append() {
        let (_tmp, spool) = fresh("wait").await;
        let waiter = {
            let spool = spool.clone();
            tokio::spawn(async move { spool.wait_nonempty().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        spool.append(rec(0)).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
        // Returns at once when something is pending.
        spool.wait_nonempty().await;
    }

    #[tokio::test]
    async fn close_rejects_appends_and_positions_of_other_instances() {
        let (tmp, spool) = fresh("close").await;
        spool.append(rec(0)).await.unwrap();
        let items = spool.peek_batch(1).await.unwrap();
        spool.close().await;
        assert!(matches!(spool.append(rec(1)).await, Err(SpoolError::Closed)));
        // Drain side keeps working after close.
        assert_eq!(spool.peek_batch(5).await.unwrap(), items);
        drop(spool);
        let (spool, _) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
        assert!(matches!(spool.remove_through(items[0].0).await, Err(SpoolError::InvalidPosition)));
        assert_eq!(spool.depth().events, 1);
    }
}
