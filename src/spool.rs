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
//! - Only one `Spool` (one process) may use a directory at a time; this is not
//!   enforced by a lock file.
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

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{Buf, Bytes};
use tokio::sync::{Notify, mpsc, oneshot};

/// Magic at the start of every segment file (also the format version).
const SEGMENT_MAGIC: [u8; 8] = *b"HRSPSEG1";
/// Length of the segment header (the magic).
const SEGMENT_HEADER_LEN: u64 = 8;
/// Length of a record frame header: payload length + crc32.
const FRAME_HEADER_LEN: u64 = 8;
/// Largest payload a record may have (and the sanity bound when reading).
pub const MAX_PAYLOAD_LEN: usize = 64 << 20;
const CURSOR_MAGIC: [u8; 8] = *b"HRSPCUR2";
/// One cursor slot: magic, generation, segment, offset, crc32.
const CURSOR_SLOT_LEN: usize = 36;
/// The two slots live in different 512-byte sectors.
const CURSOR_SLOT_STRIDE: u64 = 512;
const CURSOR_FILE_LEN: u64 = 2 * CURSOR_SLOT_STRIDE;
const CURSOR_FILE: &str = "cursor";
const SEGMENT_SUFFIX: &str = ".seg";
const CORRUPT_SUFFIX: &str = ".seg.corrupt";
const RECORD_VERSION: u8 = 1;
/// The writer stops collecting a group once it holds this many bytes.
const MAX_GROUP_BYTES: usize = 8 << 20;
/// `peek_batch` stops once it read this many payload bytes (after one record).
const MAX_PEEK_BYTES: u64 = 8 << 20;
/// Appends queued towards the writer before `append` waits for room.
const CHANNEL_CAPACITY: usize = 4096;
/// Smallest accepted `segment_bytes`.
const MIN_SEGMENT_BYTES: u64 = 64;

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

/// One spooled event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolRecord {
    /// Configured webhook source name.
    pub source: String,
    /// AMQP routing key to publish with.
    pub routing_key: String,
    /// CloudEvents id (for logs and dedup downstream).
    pub event_id: String,
    /// The encoded CloudEvents envelope (the AMQP message body).
    pub envelope: Bytes,
}

impl SpoolRecord {
    /// Length of [`Self::encode_payload`]'s output.
    pub fn payload_len(&self) -> usize {
        1 + 2
            + self.source.len()
            + 2
            + self.routing_key.len()
            + 2
            + self.event_id.len()
            + 4
            + self.envelope.len()
    }

    /// Encodes the record as a spool payload (format in the module docs).
    pub fn encode_payload(&self) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::with_capacity(self.payload_len());
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Decodes a spool payload.
    pub fn decode_payload(mut p: Bytes) -> Result<Self, SpoolError> {
        if p.remaining() < 1 {
            return Err(SpoolError::Corrupt("empty payload"));
        }
        if p.get_u8() != RECORD_VERSION {
            return Err(SpoolError::Corrupt("unknown record version"));
        }
        let source = take_str(&mut p)?;
        let routing_key = take_str(&mut p)?;
        let event_id = take_str(&mut p)?;
        if p.remaining() < 4 {
            return Err(SpoolError::Corrupt("short envelope length"));
        }
        let n = p.get_u32_le() as usize;
        if p.remaining() != n {
            return Err(SpoolError::Corrupt("envelope length mismatch"));
        }
        Ok(Self { source, routing_key, event_id, envelope: p })
    }

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), SpoolError> {
        let len = self.payload_len();
        if len > MAX_PAYLOAD_LEN {
            return Err(SpoolError::TooLarge { len, max: MAX_PAYLOAD_LEN });
        }
        out.reserve(len);
        out.push(RECORD_VERSION);
        put_str(out, "source", &self.source)?;
        put_str(out, "routing_key", &self.routing_key)?;
        put_str(out, "event_id", &self.event_id)?;
        // len <= MAX_PAYLOAD_LEN, so the envelope length fits in u32.
        out.extend_from_slice(&(self.envelope.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.envelope);
        Ok(())
    }

    /// The full on-disk frame: `[len][crc][payload]`.
    fn encode_frame(&self) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN as usize + self.payload_len());
        out.extend_from_slice(&[0u8; FRAME_HEADER_LEN as usize]);
        self.encode_into(&mut out)?;
        let payload = &out[FRAME_HEADER_LEN as usize..];
        let len = payload.len() as u32;
        let crc = crc32fast::hash(payload);
        out[0..4].copy_from_slice(&len.to_le_bytes());
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }
}

fn put_str(out: &mut Vec<u8>, field: &'static str, s: &str) -> Result<(), SpoolError> {
    let len = u16::try_from(s.len()).map_err(|_| SpoolError::FieldTooLong { field, len: s.len() })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn take_str(p: &mut Bytes) -> Result<String, SpoolError> {
    if p.remaining() < 2 {
        return Err(SpoolError::Corrupt("short string length"));
    }
    let n = p.get_u16_le() as usize;
    if p.remaining() < n {
        return Err(SpoolError::Corrupt("short string"));
    }
    let raw = p.split_to(n);
    String::from_utf8(raw.to_vec()).map_err(|_| SpoolError::Corrupt("string is not UTF-8"))
}

/// Where a record lies; returned by `peek_batch`, passed to `remove_through`.
/// Ordered by record order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpoolPosition {
    instance: u64,
    index: u64,
    segment: u64,
    offset: u64,
    end: u64,
    byte_end: u64,
}

impl SpoolPosition {
    /// Sequence number of the segment file holding the record.
    pub fn segment(&self) -> u64 {
        self.segment
    }
    /// Byte offset of the record's frame in its segment file.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Ordinal of the record since this spool was opened (first pending = 0).
    pub fn index(&self) -> u64 {
        self.index
    }
}

impl PartialOrd for SpoolPosition {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SpoolPosition {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.instance, self.index).cmp(&(other.instance, other.index))
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    seg: u64,
    off: u64,
    /// Ordinal of the first pending record.
    index: u64,
    /// Logical byte position (sum of frame sizes since open) of `off`.
    byte: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SegInfo {
    /// Durable, valid length of the file.
    len: u64,
    /// Ordinal after the segment's last durable record.
    end_index: u64,
    /// Logical byte position after it.
    end_byte: u64,
    /// No more appends go to this segment.
    sealed: bool,
}

struct State {
    segments: BTreeMap<u64, SegInfo>,
    head: Head,
    tail_index: u64,
    tail_byte: u64,
    reserved: u64,
}

impl State {
    fn depth(&self) -> SpoolDepth {
        SpoolDepth {
            events: self.tail_index.saturating_sub(self.head.index),
            bytes: self.tail_byte.saturating_sub(self.head.byte),
        }
    }
}

struct DrainState {
    /// The segment file last read from, kept open.
    file: Option<(u64, File)>,
    /// `None` only while a cursor write is in flight (or after it panicked).
    cursor: Option<CursorFile>,
}

enum Command {
    Append(PendingAppend),
    Shutdown(oneshot::Sender<()>),
}

struct PendingAppend {
    frame: Vec<u8>,
    reservation: Reservation,
    ack: oneshot::Sender<Result<(), SpoolError>>,
}

/// Bytes counted against `max_bytes` while an append is in flight. Released on
/// drop unless the writer turned them into pending bytes.
struct Reservation {
    core: Arc<Core>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut s = self.core.lock();
            s.reserved = s.reserved.saturating_sub(self.bytes);
        }
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
                drain: tokio::sync::Mutex::new(DrainState { file: None, cursor: Some(cursor) }),
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

    /// Up to `max` pending records, oldest first, without removing them.
    pub async fn peek_batch(&self, max: usize) -> Result<Vec<(SpoolPosition, SpoolRecord)>, SpoolError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut drain = self.inner.drain.lock().await;
        loop {
            let (head, segs) = {
                let s = self.inner.core.lock();
                if s.depth().events == 0 {
                    return Ok(Vec::new());
                }
                let segs: Vec<(u64, SegInfo)> =
                    s.segments.range(s.head.seg..).map(|(k, v)| (*k, *v)).collect();
                (s.head, segs)
            };
            let cached = drain.file.take();
            let dir = self.inner.dir.clone();
            let instance = self.inner.instance;
            let (cached, res) =
                tokio::task::spawn_blocking(move || read_batch(&dir, instance, cached, head, &segs, max))
                    .await
                    .map_err(join_error)?;
            drain.file = cached;
            let read = res?;
            if !read.items.is_empty() {
                return Ok(read.items);
            }
            let Some(bad) = read.bad else {
                return Ok(Vec::new());
            };
            tracing::warn!(
                dir = %self.inner.dir.display(),
                segment = bad.segment,
                offset = bad.offset,
                reason = bad.reason,
                "spool: skipping corrupt record{}",
                if bad.rest_of_segment { " and the rest of its segment" } else { "" }
            );
            self.inner.core.corrupt.fetch_add(1, Ordering::Relaxed);
            self.advance_head(&mut drain, bad.new_head).await?;
        }
    }

    /// Removes every record up to and including `pos`, durably.
    pub async fn remove_through(&self, pos: SpoolPosition) -> Result<(), SpoolError> {
        if pos.instance != self.inner.instance {
            return Err(SpoolError::InvalidPosition);
        }
        let mut drain = self.inner.drain.lock().await;
        {
            let s = self.inner.core.lock();
            if pos.index < s.head.index {
                return Ok(());
            }
            if pos.index >= s.tail_index {
                return Err(SpoolError::InvalidPosition);
            }
            match s.segments.get(&pos.segment) {
                Some(info) if pos.end <= info.len && pos.byte_end <= s.tail_byte => {}
                _ => return Err(SpoolError::InvalidPosition),
            }
        }
        let target = Head { seg: pos.segment, off: pos.end, index: pos.index + 1, byte: pos.byte_end };
        self.advance_head(&mut drain, target).await
    }

    /// Moves the head to `target` (a record boundary at or after the current
    /// head): writes the cursor durably, then deletes fully consumed segments.
    async fn advance_head(&self, drain: &mut DrainState, target: Head) -> Result<(), SpoolError> {
        let (target, doomed) = {
            let s = self.inner.core.lock();
            let target = normalize_head(target, &s.segments);
            let doomed: Vec<u64> = s.segments.range(..target.seg).map(|(k, _)| *k).collect();
            (target, doomed)
        };
        if let Some((seq, _)) = &drain.file
            && *seq < target.seg
        {
            drain.file = None;
        }
        let dir = self.inner.dir.clone();
        let del = doomed.clone();
        let cursor = drain.cursor.take();
        let (cursor, res) = tokio::task::spawn_blocking(move || {
            let mut cursor = match cursor {
                Some(c) => c,
                None => match CursorFile::open(&dir) {
                    Ok((c, _)) => c,
                    Err(e) => return (None, Err(e)),
                },
            };
            if let Err(e) = cursor.write(target.seg, target.off) {
                return (Some(cursor), Err(e));
            }
            for seq in del {
                remove_consumed_segment(&dir, seq);
            }
            (Some(cursor), Ok(()))
        })
        .await
        .map_err(join_error)?;
        drain.cursor = cursor;
        res?;
        let core = &self.inner.core;
        core.fsyncs.fetch_add(1, Ordering::Relaxed);
        core.cursor_writes.fetch_add(1, Ordering::Relaxed);
        let mut s = core.lock();
        if target.index >= s.head.index {
            s.head = target;
        }
        for seq in doomed {
            s.segments.remove(&seq);
        }
        Ok(())
    }
}

/// Moves a head that sits at the end of sealed segments to the start of the
/// next segment.
fn normalize_head(mut head: Head, segments: &BTreeMap<u64, SegInfo>) -> Head {
    loop {
        let Some(info) = segments.get(&head.seg) else {
            return head;
        };
        if !info.sealed || head.off < info.len {
            return head;
        }
        let Some((next, _)) = segments.range(head.seg + 1..).next() else {
            return head;
        };
        head = Head { seg: *next, off: SEGMENT_HEADER_LEN, index: info.end_index, byte: info.end_byte };
    }
}

fn join_error(e: tokio::task::JoinError) -> SpoolError {
    SpoolError::Io(io::Error::other(format!("spool blocking task failed: {e}")))
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{SEGMENT_SUFFIX}"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<u64> {
    File::open(dir)?.sync_all()?;
    Ok(1)
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<u64> {
    Ok(0)
}

/// The durable drain cursor: two slots written alternately in place, each
/// `[b"HRSPCUR2"][u64 LE generation][u64 LE segment][u64 LE offset][u32 LE
/// crc32 of the previous 32 bytes]`, at offsets 0 and 512. The valid slot with
/// the highest generation wins, so a torn slot write falls back to the
/// previous cursor (duplicates, never loss). One `fdatasync` per write, no
/// metadata change.
struct CursorFile {
    file: File,
    generation: u64,
}

impl CursorFile {
    /// Opens (creating if needed) the cursor file; returns the cursor it
    /// holds, `None` if new or unreadable.
    fn open(dir: &Path) -> io::Result<(CursorFile, Option<(u64, u64)>)> {
        let path = dir.join(CURSOR_FILE);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let len = file.metadata()?.len();
        if len < CURSOR_FILE_LEN {
            file.set_len(CURSOR_FILE_LEN)?;
            file.sync_all()?;
            sync_dir(dir)?;
        }
        let mut best: Option<(u64, u64, u64)> = None;
        for slot in 0..2u64 {
            let mut buf = [0u8; CURSOR_SLOT_LEN];
            (&file).seek(SeekFrom::Start(slot * CURSOR_SLOT_STRIDE))?;
            (&file).read_exact(&mut buf)?;
            if let Some((generation, seg, off)) = decode_cursor_slot(&buf)
                && best.is_none_or(|b| generation > b.0)
            {
                best = Some((generation, seg, off));
            }
        }
        if best.is_none() && len > 0 {
            tracing::warn!(
                dir = %dir.display(),
                "spool: cursor file is corrupt; replaying from the oldest segment (duplicates possible)"
            );
        }
        let generation = best.map_or(0, |b| b.0);
        Ok((CursorFile { file, generation }, best.map(|b| (b.1, b.2))))
    }

    /// Writes the cursor durably into the older slot.
    fn write(&mut self, seg: u64, off: u64) -> io::Result<()> {
        let generation = self.generation + 1;
        let mut buf = [0u8; CURSOR_SLOT_LEN];
        buf[0..8].copy_from_slice(&CURSOR_MAGIC);
        buf[8..16].copy_from_slice(&generation.to_le_bytes());
        buf[16..24].copy_from_slice(&seg.to_le_bytes());
        buf[24..32].copy_from_slice(&off.to_le_bytes());
        let crc = crc32fast::hash(&buf[0..32]);
        buf[32..36].copy_from_slice(&crc.to_le_bytes());
        (&self.file).seek(SeekFrom::Start((generation % 2) * CURSOR_SLOT_STRIDE))?;
        (&self.file).write_all(&buf)?;
        self.file.sync_data()?;
        self.generation = generation;
        Ok(())
    }
}

fn decode_cursor_slot(buf: &[u8; CURSOR_SLOT_LEN]) -> Option<(u64, u64, u64)> {
    if buf[0..8] != CURSOR_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes([buf[32], buf[33], buf[34], buf[35]]);
    if crc != crc32fast::hash(&buf[0..32]) {
        return None;
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[i..i + 8]);
        u64::from_le_bytes(b)
    };
    Some((u64_at(8), u64_at(16), u64_at(24)))
}

/// Why a frame is not valid.
#[derive(Debug, Clone, Copy)]
enum FrameError {
    TornHeader,
    BadLength,
    TornPayload,
    BadChecksum,
}

impl FrameError {
    fn as_str(self) -> &'static str {
        match self {
            FrameError::TornHeader => "short frame header",
            FrameError::BadLength => "invalid record length",
            FrameError::TornPayload => "short payload",
            FrameError::BadChecksum => "checksum mismatch",
        }
    }
}

/// Reads one frame at the reader's position, `remaining` bytes being
/// readable. `Ok(Err(_))` for an invalid frame, `Err` for an I/O error.
fn read_frame(r: &mut impl Read, remaining: u64, buf: &mut Vec<u8>) -> io::Result<Result<(), FrameError>> {
    if remaining < FRAME_HEADER_LEN {
        return Ok(Err(FrameError::TornHeader));
    }
    let mut hdr = [0u8; FRAME_HEADER_LEN as usize];
    match r.read_exact(&mut hdr) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(Err(FrameError::TornHeader));
        }
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    let crc = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    if len == 0 || len > MAX_PAYLOAD_LEN {
        return Ok(Err(FrameError::BadLength));
    }
    if len as u64 > remaining - FRAME_HEADER_LEN {
        return Ok(Err(FrameError::TornPayload));
    }
    buf.clear();
    buf.resize(len, 0);
    match r.read_exact(buf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(Err(FrameError::TornPayload));
        }
        Err(e) => return Err(e),
    }
    if crc32fast::hash(buf) != crc {
        return Ok(Err(FrameError::BadChecksum));
    }
    Ok(Ok(()))
}

struct Scan {
    file_len: u64,
    header_ok: bool,
    /// Where reading started (clamped to the file).
    start: u64,
    valid_len: u64,
    records: u64,
    bytes: u64,
    error: Option<FrameError>,
}

fn scan_segment(path: &Path, start: u64) -> io::Result<Scan> {
    let mut f = File::open(path)?;
    let file_len = f.metadata()?.len();
    let mut scan =
        Scan { file_len, header_ok: false, start, valid_len: 0, records: 0, bytes: 0, error: None };
    if file_len < SEGMENT_HEADER_LEN {
        return Ok(scan);
    }
    let mut magic = [0u8; SEGMENT_HEADER_LEN as usize];
    f.read_exact(&mut magic)?;
    if magic != SEGMENT_MAGIC {
        return Ok(scan);
    }
    scan.header_ok = true;
    let start = start.clamp(SEGMENT_HEADER_LEN, file_len);
    scan.start = start;
    f.seek(SeekFrom::Start(start))?;
    let mut r = BufReader::with_capacity(256 << 10, f);
    let mut pos = start;
    let mut buf = Vec::new();
    while pos < file_len {
        match read_frame(&mut r, file_len - pos, &mut buf)? {
            Ok(()) => {
                let size = FRAME_HEADER_LEN + buf.len() as u64;
                pos += size;
                scan.records += 1;
                scan.bytes += size;
            }
            Err(e) => {
                scan.error = Some(e);
                break;
            }
        }
    }
    scan.valid_len = pos;
    Ok(scan)
}

struct Recovered {
    state: State,
    active: Active,
    next_seq: u64,
    cursor: CursorFile,
    report: OpenReport,
}

fn list_segments(dir: &Path) -> io::Result<(Vec<u64>, u64)> {
    let mut seqs = Vec::new();
    let mut max_corrupt = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = parse_segment_name(name) {
            seqs.push(seq);
        } else if let Some(stem) = name.strip_suffix(".corrupt")
            && let Some(seq) = parse_segment_name(stem)
        {
            max_corrupt = max_corrupt.max(seq);
        }
    }
    seqs.sort_unstable();
    Ok((seqs, max_corrupt))
}

fn create_segment(dir: &Path, seq: u64) -> io::Result<File> {
    let path = segment_path(dir, seq);
    let res = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&path)?;
        f.write_all(&SEGMENT_MAGIC)?;
        Ok(f)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&path);
    }
    res
}

/// Deletes a fully consumed segment; failure is only logged (open deletes
/// segments below the cursor again).
fn remove_consumed_segment(dir: &Path, seq: u64) {
    if let Err(e) = fs::remove_file(segment_path(dir, seq))
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(segment = seq, error = %e, "spool: could not delete consumed segment");
    }
}

/// Scans the directory and repairs it; see the module docs.
fn recover(dir: &Path) -> io::Result<Recovered> {
    fs::create_dir_all(dir)?;
    let (mut cursor_file, cursor) = CursorFile::open(dir)?;
    let (mut seqs, max_corrupt) = list_segments(dir)?;
    let mut report = OpenReport::default();
    let mut next_seq = seqs.last().copied().unwrap_or(0).max(max_corrupt).max(cursor.map_or(0, |c| c.0)) + 1;

    // Segments below the cursor were fully consumed; a crash may have kept
    // them from being deleted.
    if let Some((cseg, _)) = cursor {
        for seq in seqs.iter().filter(|s| **s < cseg) {
            remove_consumed_segment(dir, *seq);
        }
        seqs.retain(|s| *s >= cseg);
    }
    let mut head_off = match (cursor, seqs.first()) {
        (Some((cseg, coff)), Some(first)) if cseg == *first => coff,
        (Some((cseg, _)), Some(first)) => {
            tracing::warn!(
                dir = %dir.display(),
                cursor_segment = cseg,
                first_segment = *first,
                "spool: cursor segment is missing; starting at the next segment"
            );
            SEGMENT_HEADER_LEN
        }
        _ => SEGMENT_HEADER_LEN,
    };
    let mut cursor_dirty = false;

    let mut segments = BTreeMap::new();
    let mut index = 0u64;
    let mut byte = 0u64;
    let mut head: Option<Head> = None;
    let mut active: Option<Active> = None;
    let n = seqs.len();
    for (i, &seq) in seqs.iter().enumerate() {
        let is_tail = i + 1 == n;
        let path = segment_path(dir, seq);
        let is_head_seg = head.is_none();
        let start = if is_head_seg { head_off } else { SEGMENT_HEADER_LEN };
        let scan = scan_segment(&path, start)?;
        if !scan.header_ok {
            if is_tail && scan.file_len < SEGMENT_HEADER_LEN {
                // Torn creation of the newest segment: it holds nothing.
                let mut f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(0)?;
                f.seek(SeekFrom::Start(0))?;
                f.write_all(&SEGMENT_MAGIC)?;
                f.sync_all()?;
                tracing::warn!(segment = seq, "spool: repaired torn segment header");
                if is_head_seg {
                    head_off = SEGMENT_HEADER_LEN;
                }
                let info =
                    SegInfo { len: SEGMENT_HEADER_LEN, end_index: index, end_byte: byte, sealed: false };
                if head.is_none() {
                    head = Some(Head { seg: seq, off: SEGMENT_HEADER_LEN, index, byte });
                }
                segments.insert(seq, info);
                active = Some(Active { seq, file: f, len: SEGMENT_HEADER_LEN, records: 0, dirty: false });
                continue;
            }
            let aside = dir.join(format!("{seq:020}{CORRUPT_SUFFIX}"));
            tracing::warn!(
                segment = seq,
                moved_to = %aside.display(),
                "spool: segment header is not a spool header; moving the file aside"
            );
            fs::rename(&path, &aside)?;
            report.corrupt_records_skipped += 1;
            if is_head_seg {
                head_off = SEGMENT_HEADER_LEN;
                cursor_dirty = true;
            }
            continue;
        }
        if is_head_seg && scan.start != head_off {
            tracing::warn!(
                segment = seq,
                cursor_offset = head_off,
                file_len = scan.file_len,
                "spool: cursor offset outside its segment; clamped"
            );
            head_off = scan.start;
            cursor_dirty = true;
        }
        if let Some(err) = scan.error {
            report.corrupt_records_skipped += 1;
            report.truncated_bytes += scan.file_len - scan.valid_len;
            if is_tail {
                tracing::warn!(
                    segment = seq,
                    offset = scan.valid_len,
                    cut_bytes = scan.file_len - scan.valid_len,
                    reason = err.as_str(),
                    "spool: torn or corrupt tail record; truncating after the last good record"
                );
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(scan.valid_len)?;
                f.sync_all()?;
            } else {
                tracing::warn!(
                    segment = seq,
                    offset = scan.valid_len,
                    skipped_bytes = scan.file_len - scan.valid_len,
                    reason = err.as_str(),
                    "spool: corrupt record inside a sealed segment; skipping the rest of that segment"
                );
            }
        }
        if head.is_none() {
            head = Some(Head { seg: seq, off: scan.start, index, byte });
        }
        index += scan.records;
        byte += scan.bytes;
        segments
            .insert(seq, SegInfo { len: scan.valid_len, end_index: index, end_byte: byte, sealed: !is_tail });
        if is_tail {
            let mut file = OpenOptions::new().write(true).open(&path)?;
            file.seek(SeekFrom::Start(scan.valid_len))?;
            active = Some(Active {
                seq,
                file,
                len: scan.valid_len,
                // Whether the segment holds any record at all (not just pending
                // ones) only matters for rolling: compare against the header.
                records: u64::from(scan.valid_len > SEGMENT_HEADER_LEN),
                dirty: false,
            });
        }
    }

    let active = match active {
        Some(a) => a,
        None => {
            // No segment, or the newest one was moved aside: start a new one.
            if let Some(last) = segments.values_mut().last() {
                last.sealed = true;
            }
            let seq = next_seq;
            next_seq += 1;
            let file = create_segment(dir, seq)?;
            file.sync_all()?;
            segments.insert(
                seq,
                SegInfo { len: SEGMENT_HEADER_LEN, end_index: index, end_byte: byte, sealed: false },
            );
            if head.is_none() {
                head = Some(Head { seg: seq, off: SEGMENT_HEADER_LEN, index, byte });
                cursor_dirty = cursor.is_some();
            }
            Active { seq, file, len: SEGMENT_HEADER_LEN, records: 0, dirty: false }
        }
    };
    let first = head.unwrap_or(Head { seg: active.seq, off: SEGMENT_HEADER_LEN, index, byte });
    let head = normalize_head(first, &segments);
    if head != first {
        cursor_dirty = true;
    }
    if cursor_dirty || cursor.is_some_and(|c| c != (head.seg, head.off)) {
        cursor_file.write(head.seg, head.off)?;
    }
    let doomed: Vec<u64> = segments.range(..head.seg).map(|(k, _)| *k).collect();
    for seq in doomed {
        remove_consumed_segment(dir, seq);
        segments.remove(&seq);
    }
    sync_dir(dir)?;

    let state = State { segments, head, tail_index: index, tail_byte: byte, reserved: 0 };
    let depth = state.depth();
    report.records = depth.events;
    report.bytes = depth.bytes;
    report.segments = state.segments.len();
    if report.corrupt_records_skipped > 0 {
        tracing::warn!(
            dir = %dir.display(),
            corrupt_records_skipped = report.corrupt_records_skipped,
            truncated_bytes = report.truncated_bytes,
            records = report.records,
            "spool: recovered with corrupt data skipped"
        );
    }
    Ok(Recovered { state, active, next_seq, cursor: cursor_file, report })
}

/// The segment the writer appends to.
struct Active {
    seq: u64,
    file: File,
    /// Durable valid length.
    len: u64,
    /// Records written to it (only compared with 0).
    records: u64,
    /// A failed write may have left bytes after `len`.
    dirty: bool,
}

struct Writer {
    core: Arc<Core>,
    dir: PathBuf,
    segment_bytes: u64,
    active: Active,
    next_seq: u64,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<PendingAppend> = Vec::new();
        while let Some(cmd) = rx.blocking_recv() {
            #[cfg(test)]
            drop(self.core.writer_gate.lock().unwrap_or_else(PoisonError::into_inner));
            let mut shutdown = None;
            let mut bytes = 0usize;
            match cmd {
                Command::Append(p) => {
                    bytes += p.frame.len();
                    batch.push(p);
                }
                Command::Shutdown(t) => shutdown = Some(t),
            }
            while shutdown.is_none() && bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(Command::Append(p)) => {
                        bytes += p.frame.len();
                        batch.push(p);
                    }
                    Ok(Command::Shutdown(t)) => shutdown = Some(t),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.write_group(std::mem::take(&mut batch));
            }
            if let Some(t) = shutdown {
                rx.close();
                let _ = t.send(());
                break;
            }
        }
        tracing::debug!(dir = %self.dir.display(), "spool writer stopped");
    }

    /// Cuts off whatever a failed write left after the durable length.
    fn repair(&mut self) -> io::Result<()> {
        if self.active.dirty {
            self.active.file.set_len(self.active.len)?;
            self.active.dirty = false;
        }
        Ok(())
    }

    fn roll(&mut self) -> io::Result<()> {
        let seq = self.next_seq;
        let file = create_segment(&self.dir, seq)?;
        let n = sync_dir(&self.dir)?;
        self.core.fsyncs.fetch_add(n, Ordering::Relaxed);
        self.next_seq += 1;
        let old = std::mem::replace(
            &mut self.active,
            Active { seq, file, len: SEGMENT_HEADER_LEN, records: 0, dirty: false },
        );
        let mut s = self.core.lock();
        if let Some(info) = s.segments.get_mut(&old.seq) {
            info.sealed = true;
        }
        let (end_index, end_byte) = (s.tail_index, s.tail_byte);
        s.segments.insert(seq, SegInfo { len: SEGMENT_HEADER_LEN, end_index, end_byte, sealed: false });
        drop(s);
        drop(old);
        Ok(())
    }

    fn write_group(&mut self, batch: Vec<PendingAppend>) {
        let mut rest = batch.into_iter().peekable();
        while let Some(first_len) = rest.peek().map(|p| p.frame.len() as u64) {
            if let Err(e) = self.repair() {
                fail_all(rest, &e);
                return;
            }
            if self.active.records > 0
                && self.active.len + first_len > self.segment_bytes
                && let Err(e) = self.roll()
            {
                tracing::warn!(error = %e, "spool: could not roll to a new segment");
                fail_all(rest, &e);
                return;
            }
            // One chunk: the records that fit in the active segment (at least one).
            let mut chunk = Vec::new();
            let mut size = 0u64;
            while let Some(len) = rest.peek().map(|p| p.frame.len() as u64) {
                if !chunk.is_empty() && self.active.len + size + len > self.segment_bytes {
                    break;
                }
                let Some(p) = rest.next() else { break };
                size += len;
                chunk.push(p);
            }
            self.buf.clear();
            for p in &chunk {
                self.buf.extend_from_slice(&p.frame);
            }
            let res = (|| {
                self.active.file.seek(SeekFrom::Start(self.active.len))?;
                self.active.file.write_all(&self.buf)?;
                self.core.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.active.file.sync_data()
            })();
            if let Err(e) = res {
                tracing::warn!(error = %e, records = chunk.len(), "spool: append failed");
                self.active.dirty = true;
                if let Err(e2) = self.repair() {
                    tracing::warn!(error = %e2, "spool: could not truncate after a failed append");
                }
                fail_all(chunk.into_iter().chain(rest), &e);
                return;
            }
            self.active.len += size;
            self.active.records += chunk.len() as u64;
            let n = chunk.len() as u64;
            {
                let mut s = self.core.lock();
                s.tail_index += n;
                s.tail_byte += size;
                let (tail_index, tail_byte) = (s.tail_index, s.tail_byte);
                if let Some(info) = s.segments.get_mut(&self.active.seq) {
                    info.len = self.active.len;
                    info.end_index = tail_index;
                    info.end_byte = tail_byte;
                }
                s.reserved = s.reserved.saturating_sub(size);
                for p in &mut chunk {
                    p.reservation.bytes = 0;
                }
            }
            self.core.commit_groups.fetch_add(1, Ordering::Relaxed);
            self.core.appends.fetch_add(n, Ordering::Relaxed);
            for p in chunk {
                let _ = p.ack.send(Ok(()));
            }
            self.core.nonempty.notify_waiters();
        }
    }
}

fn fail_all(items: impl Iterator<Item = PendingAppend>, e: &io::Error) {
    for p in items {
        let _ = p.ack.send(Err(SpoolError::Io(io::Error::new(e.kind(), e.to_string()))));
    }
}

struct BadRecord {
    segment: u64,
    offset: u64,
    reason: &'static str,
    rest_of_segment: bool,
    new_head: Head,
}

struct ReadOutcome {
    items: Vec<(SpoolPosition, SpoolRecord)>,
    /// A bad record found before any good one: the head to skip to.
    bad: Option<BadRecord>,
}

fn read_batch(
    dir: &Path,
    instance: u64,
    mut cached: Option<(u64, File)>,
    head: Head,
    segs: &[(u64, SegInfo)],
    max: usize,
) -> (Option<(u64, File)>, io::Result<ReadOutcome>) {
    let mut out = ReadOutcome { items: Vec::new(), bad: None };
    let mut index = head.index;
    let mut byte = head.byte;
    let mut read_bytes = 0u64;
    let mut buf = Vec::new();
    for &(seq, info) in segs {
        if out.items.len() >= max || read_bytes >= MAX_PEEK_BYTES {
            break;
        }
        let mut off = if seq == head.seg { head.off } else { SEGMENT_HEADER_LEN };
        if off >= info.len {
            continue;
        }
        let skip_segment = |reason: &'static str, off: u64| BadRecord {
            segment: seq,
            offset: off,
            reason,
            rest_of_segment: true,
            new_head: Head { seg: seq, off: info.len, index: info.end_index, byte: info.end_byte },
        };
        let file = match cached.take() {
            Some((s, f)) if s == seq => f,
            _ => match File::open(segment_path(dir, seq)) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if out.items.is_empty() {
                        out.bad = Some(skip_segment("segment file is missing", off));
                    }
                    return (None, Ok(out));
                }
                Err(e) => return (None, Err(e)),
            },
        };
        let res = (|| -> io::Result<bool> {
            (&file).seek(SeekFrom::Start(off))?;
            let mut r = BufReader::with_capacity(128 << 10, (&file).take(info.len - off));
            while off < info.len && out.items.len() < max && read_bytes < MAX_PEEK_BYTES {
                if let Err(fe) = read_frame(&mut r, info.len - off, &mut buf)? {
                    if out.items.is_empty() {
                        out.bad = Some(skip_segment(fe.as_str(), off));
                    }
                    return Ok(false);
                }
                let size = FRAME_HEADER_LEN + buf.len() as u64;
                let end = off + size;
                byte += size;
                let payload = Bytes::from(std::mem::take(&mut buf));
                match SpoolRecord::decode_payload(payload) {
                    Ok(rec) => {
                        let pos =
                            SpoolPosition { instance, index, segment: seq, offset: off, end, byte_end: byte };
                        read_bytes += size;
                        out.items.push((pos, rec));
                    }
                    Err(e) => {
                        if out.items.is_empty() {
                            let reason = match e {
                                SpoolError::Corrupt(r) => r,
                                _ => "undecodable record",
                            };
                            out.bad = Some(BadRecord {
                                segment: seq,
                                offset: off,
                                reason,
                                rest_of_segment: false,
                                new_head: Head { seg: seq, off: end, index: index + 1, byte },
                            });
                        }
                        return Ok(false);
                    }
                }
                index += 1;
                off = end;
            }
            Ok(true)
        })();
        cached = Some((seq, file));
        match res {
            Ok(true) => {}
            Ok(false) => return (cached, Ok(out)),
            Err(e) => return (cached, Err(e)),
        }
    }
    (cached, Ok(out))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "hookrelay-spool-{name}-{}-{}",
                std::process::id(),
                TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            Self(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn rec(i: usize) -> SpoolRecord {
        SpoolRecord {
            source: "github".into(),
            routing_key: format!("webhooks.github.push.{i}"),
            event_id: format!("evt-{i:06}"),
            envelope: Bytes::from(format!("{{\"specversion\":\"1.0\",\"n\":{i}}}")),
        }
    }

    fn frame_len(r: &SpoolRecord) -> u64 {
        FRAME_HEADER_LEN + r.payload_len() as u64
    }

    fn opts(max_bytes: u64, segment_bytes: u64) -> SpoolOptions {
        SpoolOptions { max_bytes, segment_bytes }
    }

    fn seg_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        v.sort();
        v
    }

    /// Peeks and removes everything, returning the records in order.
    async fn drain_all(spool: &Spool, batch: usize) -> Vec<SpoolRecord> {
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

    async fn peek_all(spool: &Spool) -> Vec<SpoolRecord> {
        spool.peek_batch(usize::MAX).await.unwrap().into_iter().map(|(_, r)| r).collect()
    }

    fn flip_byte(path: &Path, at: u64) {
        let mut data = fs::read(path).unwrap();
        data[at as usize] ^= 0x5a;
        fs::write(path, data).unwrap();
    }

    #[test]
    fn record_codec_roundtrip_and_limits() {
        let r = rec(7);
        let payload = r.encode_payload().unwrap();
        assert_eq!(payload.len(), r.payload_len());
        assert_eq!(SpoolRecord::decode_payload(Bytes::from(payload.clone())).unwrap(), r);
        for cut in 0..payload.len() {
            assert!(SpoolRecord::decode_payload(Bytes::copy_from_slice(&payload[..cut])).is_err());
        }
        let mut long = rec(1);
        long.routing_key = "x".repeat(70_000);
        assert!(matches!(long.encode_payload(), Err(SpoolError::FieldTooLong { field: "routing_key", .. })));
        let mut bad_version = payload;
        bad_version[0] = 9;
        assert!(SpoolRecord::decode_payload(Bytes::from(bad_version)).is_err());
    }

    #[tokio::test]
    async fn append_peek_remove_in_order() {
        let tmp = TempDir::new("order");
        let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
        assert_eq!(report.records, 0);
        assert_eq!(spool.depth(), SpoolDepth::default());
        assert!(spool.peek_batch(10).await.unwrap().is_empty());
        let mut bytes = 0;
        for i in 0..10 {
            spool.append(rec(i)).await.unwrap();
            bytes += frame_len(&rec(i));
        }
        assert_eq!(spool.depth(), SpoolDepth { events: 10, bytes });

        let first = spool.peek_batch(4).await.unwrap();
        let got: Vec<_> = first.iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(got, (0..4).map(rec).collect::<Vec<_>>());
        // Peeking does not consume.
        let again = spool.peek_batch(4).await.unwrap();
        assert_eq!(first, again);
        assert!(first.windows(2).all(|w| w[0].0 < w[1].0));

        spool.remove_through(first[1].0).await.unwrap();
        assert_eq!(spool.depth().events, 8);
        assert_eq!(spool.depth().bytes, bytes - frame_len(&rec(0)) - frame_len(&rec(1)));
        // Removing an already removed position is a no-op.
        spool.remove_through(first[0].0).await.unwrap();
        assert_eq!(spool.depth().events, 8);

        let rest = drain_all(&spool, 3).await;
        assert_eq!(rest, (2..10).map(rec).collect::<Vec<_>>());
        assert_eq!(spool.depth(), SpoolDepth::default());
        assert!(spool.peek_batch(10).await.unwrap().is_empty());
        assert_eq!(spool.stats().cursor_writes, 4);
    }

    #[tokio::test]
    async fn reopen_after_drop_finds_everything() {
        let tmp = TempDir::new("reopen");
        {
            let (spool, _) = Spool::open(tmp.path(), opts(1 << 20, 1024)).await.unwrap();
            for i in 0..40 {
                spool.append(rec(i)).await.unwrap();
            }
            let items = spool.peek_batch(5).await.unwrap();
            spool.remove_through(items[4].0).await.unwrap();
            // Dropped without close.
        }
        let (spool, report) = Spool::open(tmp.path(), opts(1 << 20, 1024)).await.unwrap();
        assert_eq!(report.records, 35);
        assert_eq!(report.corrupt_records_skipped, 0);
        assert_eq!(report.bytes, (5..40).map(|i| frame_len(&rec(i))).sum::<u64>());
        assert_eq!(spool.depth().events, 35);
        spool.append(rec(40)).await.unwrap();
        assert_eq!(peek_all(&spool).await, (5..41).map(rec).collect::<Vec<_>>());
        spool.close().await;
        drop(spool);
        let (spool, report) = Spool::open(tmp.path(), opts(1 << 20, 1024)).await.unwrap();
        assert_eq!(report.records, 36);
        assert_eq!(drain_all(&spool, 7).await, (5..41).map(rec).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn torn_tail_at_any_cut_point_is_truncated_and_counted() {
        let last = frame_len(&rec(4));
        // Cuts inside the frame header and inside the payload of the last record.
        for cut in [1, 3, 4, 7, 8, 9, last / 2, last - 1] {
            let tmp = TempDir::new("torn");
            {
                let (spool, _) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
                for i in 0..5 {
                    spool.append(rec(i)).await.unwrap();
                }
                spool.close().await;
            }
            let seg = seg_files(tmp.path()).pop().unwrap();
            let full = fs::metadata(&seg).unwrap().len();
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            f.set_len(full - cut).unwrap();
            drop(f);

            let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
            assert_eq!(report.records, 4, "cut {cut}");
            assert_eq!(report.corrupt_records_skipped, 1, "cut {cut}");
            assert_eq!(report.truncated_bytes, last - cut, "cut {cut}");
            assert_eq!(fs::metadata(&seg).unwrap().len(), full - last);
            assert_eq!(spool.stats().corrupt_records_skipped, 1);
            spool.append(rec(99)).await.unwrap();
            let mut want: Vec<_> = (0..4).map(rec).collect();
            want.push(rec(99));
            assert_eq!(peek_all(&spool).await, want);
            drop(spool);
            let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
            assert_eq!(report.corrupt_records_skipped, 0);
            assert_eq!(peek_all(&spool).await, want);
        }
    }

    #[tokio::test]
    async fn flipped_byte_in_last_record_is_skipped() {
        let tmp = TempDir::new("flip");
        {
            let (spool, _) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
            for i in 0..5 {
                spool.append(rec(i)).await.unwrap();
            }
        }
        let seg = seg_files(tmp.path()).pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        flip_byte(&seg, len - 3);
        let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
        assert_eq!(report.records, 4);
        assert_eq!(report.corrupt_records_skipped, 1);
        spool.append(rec(5)).await.unwrap();
        let got = drain_all(&spool, 2).await;
        assert_eq!(got, [0, 1, 2, 3, 5].map(rec).to_vec());
    }

    #[tokio::test]
    async fn zero_filled_tail_is_cut() {
        let tmp = TempDir::new("zeros");
        {
            let (spool, _) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
            for i in 0..3 {
                spool.append(rec(i)).await.unwrap();
            }
        }
        let seg = seg_files(tmp.path()).pop().unwrap();
        let mut data = fs::read(&seg).unwrap();
        data.extend_from_slice(&[0u8; 4096]);
        fs::write(&seg, data).unwrap();
        let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
        assert_eq!(report.records, 3);
        assert_eq!(report.corrupt_records_skipped, 1);
        assert_eq!(report.truncated_bytes, 4096);
        assert_eq!(peek_all(&spool).await, (0..3).map(rec).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn full_when_over_max_bytes() {
        let tmp = TempDir::new("full");
        let one = frame_len(&rec(0));
        let (spool, _) = Spool::open(tmp.path(), opts(3 * one + one / 2, 1 << 20)).await.unwrap();
        for i in 0..3 {
            spool.append(rec(i)).await.unwrap();
        }
        let seg = seg_files(tmp.path()).pop().unwrap();
        let before = fs::metadata(&seg).unwrap().len();
        assert!(matches!(spool.append(rec(3)).await, Err(SpoolError::Full)));
        assert_eq!(fs::metadata(&seg).unwrap().len(), before, "Full wrote nothing");
        assert_eq!(spool.depth().events, 3);
        let items = spool.peek_batch(1).await.unwrap();
        spool.remove_through(items[0].0).await.unwrap();
        spool.append(rec(3)).await.unwrap();
        assert!(matches!(spool.append(rec(4)).await, Err(SpoolError::Full)));
        assert_eq!(peek_all(&spool).await, (1..4).map(rec).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn too_large_and_bad_options_are_rejected() {
        let tmp = TempDir::new("opts");
        assert!(matches!(
            Spool::open(tmp.path(), opts(0, 1 << 20)).await,
            Err(SpoolError::InvalidOptions(_))
        ));
        assert!(matches!(
            Spool::open(tmp.path(), opts(1 << 20, 10)).await,
            Err(SpoolError::InvalidOptions(_))
        ));
        let (spool, _) = Spool::open(tmp.path(), opts(u64::MAX, 1 << 20)).await.unwrap();
        let mut big = rec(0);
        big.envelope = Bytes::from(vec![b'x'; MAX_PAYLOAD_LEN]);
        assert!(matches!(spool.append(big).await, Err(SpoolError::TooLarge { .. })));
        // A record larger than segment_bytes gets a segment of its own.
        let (spool, _) = {
            drop(spool);
            let tmp2 = TempDir::new("opts-big");
            let r = Spool::open(tmp2.path(), opts(u64::MAX, 128)).await.unwrap();
            let mut big = rec(1);
            big.envelope = Bytes::from(vec![b'y'; 1000]);
            r.0.append(rec(0)).await.unwrap();
            r.0.append(big.clone()).await.unwrap();
            r.0.append(rec(2)).await.unwrap();
            assert_eq!(seg_files(tmp2.path()).len(), 3);
            assert_eq!(peek_all(&r.0).await, vec![rec(0), big, rec(2)]);
            r
        };
        drop(spool);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::await_holding_lock)] // the gate is held on purpose
    async fn concurrent_appends_share_fsyncs() {
        let tmp = TempDir::new("concurrent");
        let (spool, _) = Spool::open(tmp.path(), opts(1 << 30, 64 << 10)).await.unwrap();
        // Hold the writer until every task's first append is queued, so at
        // least one group has 100 records however fast fsync is here.
        let gate = spool.inner.core.writer_gate.lock().unwrap();
        let mut tasks = Vec::new();
        for t in 0..100 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                for k in 0..10 {
                    spool.append(rec(t * 10 + k)).await.unwrap();
                }
            }));
        }
        // The writer holds the first one, the channel the other 99.
        while spool.inner.tx.capacity() > CHANNEL_CAPACITY - 99 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(gate);
        for t in tasks {
            t.await.unwrap();
        }
        let stats = spool.stats();
        assert_eq!(stats.appends, 1000);
        assert_eq!(spool.depth().events, 1000);
        assert!(stats.commit_groups < 1000, "groups {} for 1000 appends", stats.commit_groups);
        assert!(stats.fsyncs < 1000, "fsyncs {} for 1000 appends", stats.fsyncs);
        let all = drain_all(&spool, 128).await;
        assert_eq!(all.len(), 1000);
        let ids: HashSet<_> = all.iter().map(|r| r.event_id.clone()).collect();
        assert_eq!(ids.len(), 1000);
        // Each task appended sequentially, so its records keep their order.
        let mut last_k = vec![None; 100];
        for r in &all {
            let n: usize = r.event_id.trim_start_matches("evt-").parse().unwrap();
            let (t, k) = (n / 10, n % 10);
            assert!(last_k[t].is_none_or(|prev| prev < k));
            last_k[t] = Some(k);
        }
        assert_eq!(spool.depth(), SpoolDepth::default());
    }

    #[tokio::test]
    async fn removal_across_segments_deletes_old_segment_files() {
        let tmp = TempDir::new("segments");
        let (spool, _) = Spool::open(tmp.path(), opts(1 << 20, 256)).await.unwrap();
        for i in 0..30 {
            spool.append(rec(i)).await.unwrap();
        }
        let n_segs = seg_files(tmp.path()).len();
        assert!(n_segs >= 6, "{n_segs} segments");
        // Every segment holds at most 256 bytes unless it is a single record.
        for p in seg_files(tmp.path()) {
            assert!(fs::metadata(&p).unwrap().len() <= 256);
        }
        // Remove through a record in the third segment.
        let items = spool.peek_batch(30).await.unwrap();
        let third = seg_files(tmp.path())[2].clone();
        let third_seq = parse_segment_name(third.file_name().unwrap().to_str().unwrap()).unwrap();
        let (pos, _) = items.iter().find(|(p, _)| p.segment() == third_seq).unwrap();
        spool.remove_through(*pos).await.unwrap();
        let left = seg_files(tmp.path());
        assert_eq!(left.len(), n_segs - 2);
        assert_eq!(left[0], third);
        // Drain the rest: only the active segment stays.
        let rest = drain_all(&spool, 4).await;
        assert_eq!(rest.len() as u64 + pos.index() + 1, 30);
        // The last segment is the active one and stays; once the writer rolls
        // past it, the next removal deletes it.
        assert_eq!(seg_files(tmp.path()).len(), 1);
        drop(spool);
        let (spool, report) = Spool::open(tmp.path(), opts(1 << 20, 256)).await.unwrap();
        assert_eq!(report.records, 0);
        assert_eq!(report.segments, 1);
        for i in 0..10 {
            spool.append(rec(i)).await.unwrap();
        }
        assert_eq!(drain_all(&spool, 100).await, (0..10).map(rec).collect::<Vec<_>>());
        assert_eq!(seg_files(tmp.path()).len(), 1);
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    /// Takes a copy of the files while the spool is live (no close, no drop):
    /// what a crash would leave behind, plus the leftovers of crashes at the
    /// awkward moments (a torn cursor slot, a half-written frame, a consumed
    /// segment that was not deleted yet).
    #[tokio::test]
    async fn crash_snapshot_reopen_loses_nothing() {
        let tmp = TempDir::new("crash-live");
        let copy = TempDir::new("crash-copy");
        let (spool, _) = Spool::open(tmp.path(), opts(1 << 20, 512)).await.unwrap();
        for i in 0..50 {
            spool.append(rec(i)).await.unwrap();
        }
        let first_seg = seg_files(tmp.path())[0].clone();
        let first_seg_data = fs::read(&first_seg).unwrap();
        let items = spool.peek_batch(12).await.unwrap();
        spool.remove_through(items[11].0).await.unwrap();
        assert!(!first_seg.exists());
        copy_dir(tmp.path(), copy.path());
        // Crash leftovers.
        fs::write(copy.path().join(first_seg.file_name().unwrap()), first_seg_data).unwrap();
        let tail = seg_files(copy.path()).pop().unwrap();
        let mut data = fs::read(&tail).unwrap();
        let frame = rec(1000).encode_frame().unwrap();
        data.extend_from_slice(&frame[..frame.len() / 2]);
        fs::write(&tail, data).unwrap();

        let (spool2, report) = Spool::open(copy.path(), opts(1 << 20, 512)).await.unwrap();
        assert_eq!(report.records, 38);
        assert_eq!(report.corrupt_records_skipped, 1);
        assert!(!copy.path().join(first_seg.file_name().unwrap()).exists());
        assert_eq!(drain_all(&spool2, 10).await, (12..50).map(rec).collect::<Vec<_>>());
        // The live spool is untouched by all this.
        assert_eq!(spool.depth().events, 38);
    }

    #[tokio::test]
    async fn corrupt_record_in_sealed_segment_skips_to_next_segment_at_open() {
        let tmp = TempDir::new("mid-open");
        {
            let (spool, _) = Spool::open(tmp.path(), opts(1 << 20, 512)).await.unwrap();
            for i in 0..30 {
                spool.append(rec(i)).await.unwrap();
            }
        }
        let segs = seg_files(tmp.path());
        assert!(segs.len() >= 3);
        let in_first = (fs::metadata(&segs[0]).unwrap().len() - SEGMENT_HEADER_LEN) / frame_len(&rec(0));
        assert!(in_first >= 3);
        // Flip a payload byte of the second record of the first segment.
        let one = frame_len(&rec(0));
        flip_byte(&segs[0], SEGMENT_HEADER_LEN + one + FRAME_HEADER_LEN + 2);
        let (spool, report) = Spool::open(tmp.path(), opts(1 << 20, 512)).await.unwrap();
        assert_eq!(report.corrupt_records_skipped, 1);
        assert_eq!(report.records, 30 - (in_first - 1));
        let mut want = vec![rec(0)];
        want.extend((in_first as usize..30).map(rec));
        assert_eq!(drain_all(&spool, 3).await, want);
        assert_eq!(seg_files(tmp.path()).len(), 1);
    }

    #[tokio::test]
    async fn corrupt_record_found_while_reading_is_skipped() {
        let tmp = TempDir::new("mid-read");
        let (spool, _) = Spool::open(tmp.path(), opts(1 << 20, 256)).await.unwrap();
        for i in 0..20 {
            spool.append(rec(i)).await.unwrap();
        }
        let segs = seg_files(tmp.path());
        let one = frame_len(&rec(0));
        let in_first = (fs::metadata(&segs[0]).unwrap().len() - SEGMENT_HEADER_LEN) / one;
        // Corrupt the first record's payload while the spool is open.
        flip_byte(&segs[0], SEGMENT_HEADER_LEN + FRAME_HEADER_LEN + 1);
        let got = drain_all(&spool, 5).await;
        assert_eq!(got, (in_first as usize..20).map(rec).collect::<Vec<_>>());
        assert_eq!(spool.stats().corrupt_records_skipped, 1);
        assert_eq!(spool.depth(), SpoolDepth::default());
        // Corrupt the frame length of a record in a later, sealed segment.
        for i in 20..40 {
            spool.append(rec(i)).await.unwrap();
        }
        let segs = seg_files(tmp.path());
        let victim = segs[segs.len() - 2].clone();
        let head_items = spool.peek_batch(100).await.unwrap();
        let victim_seq = parse_segment_name(victim.file_name().unwrap().to_str().unwrap()).unwrap();
        let (before, _) = head_items.iter().rev().find(|(p, _)| p.segment() < victim_seq).unwrap();
        spool.remove_through(*before).await.unwrap();
        let mut data = fs::read(&victim).unwrap();
        data[SEGMENT_HEADER_LEN as usize..SEGMENT_HEADER_LEN as usize + 4]
            .copy_from_slice(&u32::MAX.to_le_bytes());
        fs::write(&victim, data).unwrap();
        let rest = drain_all(&spool, 5).await;
        assert_eq!(spool.stats().corrupt_records_skipped, 2);
        let last_seg_records = head_items.iter().filter(|(p, _)| p.segment() > victim_seq).count();
        assert_eq!(rest.len(), last_seg_records);
        assert_eq!(rest.last(), Some(&rec(39)));
    }

    #[tokio::test]
    async fn undecodable_record_with_good_crc_is_skipped_alone() {
        let tmp = TempDir::new("undecodable");
        fs::create_dir_all(tmp.path()).unwrap();
        let mut data = SEGMENT_MAGIC.to_vec();
        data.extend(rec(0).encode_frame().unwrap());
        let bad_payload = b"\x07not a record";
        data.extend((bad_payload.len() as u32).to_le_bytes());
        data.extend(crc32fast::hash(bad_payload).to_le_bytes());
        data.extend(bad_payload);
        data.extend(rec(2).encode_frame().unwrap());
        fs::write(segment_path(tmp.path(), 1), data).unwrap();
        let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
        assert_eq!(report.records, 3);
        assert_eq!(report.corrupt_records_skipped, 0);
        // The batch stops before the bad record; the next peek skips it.
        assert_eq!(peek_all(&spool).await, vec![rec(0)]);
        assert_eq!(drain_all(&spool, 10).await, vec![rec(0), rec(2)]);
        assert_eq!(spool.stats().corrupt_records_skipped, 1);
        assert_eq!(spool.depth(), SpoolDepth::default());
    }

    #[tokio::test]
    async fn torn_cursor_slot_falls_back_then_replays_from_oldest() {
        let tmp = TempDir::new("cursor");
        {
            let (spool, _) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
            for i in 0..6 {
                spool.append(rec(i)).await.unwrap();
            }
            let items = spool.peek_batch(4).await.unwrap();
            // Generation 1 goes to slot 1, generation 2 to slot 0.
            spool.remove_through(items[1].0).await.unwrap();
            spool.remove_through(items[3].0).await.unwrap();
        }
        let cursor = tmp.path().join(CURSOR_FILE);
        assert_eq!(fs::metadata(&cursor).unwrap().len(), CURSOR_FILE_LEN);
        {
            let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
            assert_eq!(report.records, 2);
            drop(spool);
        }
        // Tear the newest slot: the previous cursor is used (duplicates).
        flip_byte(&cursor, 20);
        {
            let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
            assert_eq!(report.records, 4);
            assert_eq!(peek_all(&spool).await, (2..6).map(rec).collect::<Vec<_>>());
        }
        // Both slots unreadable: replay from the oldest segment.
        flip_byte(&cursor, 20);
        flip_byte(&cursor, CURSOR_SLOT_STRIDE + 20);
        flip_byte(&cursor, 20);
        let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
        assert_eq!(report.records, 6);
        assert_eq!(drain_all(&spool, 4).await, (0..6).map(rec).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn torn_segment_header_and_foreign_segment_are_handled() {
        let tmp = TempDir::new("header");
        {
            let (spool, _) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
            for i in 0..3 {
                spool.append(rec(i)).await.unwrap();
            }
        }
        // A crash right after creating segment 2: 3 bytes of its header.
        fs::write(segment_path(tmp.path(), 2), &SEGMENT_MAGIC[..3]).unwrap();
        let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
        assert_eq!(report.records, 3);
        spool.append(rec(3)).await.unwrap();
        drop(spool);
        assert_eq!(fs::read(segment_path(tmp.path(), 2)).unwrap()[..8], SEGMENT_MAGIC);
        // A file that is not a segment at all, in the middle.
        fs::rename(segment_path(tmp.path(), 2), segment_path(tmp.path(), 3)).unwrap();
        fs::write(segment_path(tmp.path(), 2), b"GARBAGE!garbage").unwrap();
        let (spool, report) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
        assert_eq!(report.corrupt_records_skipped, 1);
        assert_eq!(report.records, 4);
        assert!(tmp.path().join(format!("{:020}{CORRUPT_SUFFIX}", 2)).exists());
        spool.append(rec(4)).await.unwrap();
        assert_eq!(drain_all(&spool, 2).await, (0..5).map(rec).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn wait_nonempty_wakes_on_append() {
        let tmp = TempDir::new("wait");
        let (spool, _) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
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
        let tmp = TempDir::new("close");
        let (spool, _) = Spool::open(tmp.path(), SpoolOptions::default()).await.unwrap();
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

    const CRASH_DIR_ENV: &str = "HOOKRELAY_SPOOL_CRASH_DIR";

    /// The child of `sigkill_child_loses_no_acked_record`: appends from 8
    /// tasks and drains from another until it is killed, printing what is
    /// durable ("ACK id") and what was removed ("DEL id").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run as a child process by sigkill_child_loses_no_acked_record"]
    async fn crash_child_writer() {
        let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
            return;
        };
        let (spool, _) = Spool::open(&dir, opts(1 << 30, 4096)).await.unwrap();
        for t in 0..8 {
            let spool = spool.clone();
            tokio::spawn(async move {
                for k in 0.. {
                    let r = rec(t * 1_000_000 + k);
                    let id = r.event_id.clone();
                    spool.append(r).await.unwrap();
                    println!("ACK {id}");
                }
            });
        }
        let drainer = spool.clone();
        tokio::spawn(async move {
            loop {
                drainer.wait_nonempty().await;
                let items = drainer.peek_batch(7).await.unwrap();
                if let Some((last, _)) = items.last() {
                    // Announced before the removal: a kill right after it
                    // must not make these look lost.
                    for (_, r) in &items {
                        println!("DEL {}", r.event_id);
                    }
                    drainer.remove_through(*last).await.unwrap();
                }
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
        });
        // Safety net should the parent never kill us.
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    }

    #[cfg(unix)]
    #[test]
    fn sigkill_child_loses_no_acked_record() {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let tmp = TempDir::new("sigkill");
        for round in 0..3 {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["crash_child_writer", "--ignored", "--nocapture", "--test-threads=1"])
                .env(CRASH_DIR_ENV, tmp.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let mut acked = HashSet::new();
            let mut removed = HashSet::new();
            let kill_after = 300 + round * 500;
            let mut killed = false;
            // Read to the end: lines the child wrote before it died still count
            // (a removal announced there may be durable).
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("ACK ") {
                    acked.insert(id.to_string());
                } else if let Some(id) = line.strip_prefix("DEL ") {
                    removed.insert(id.to_string());
                }
                if !killed && acked.len() >= kill_after {
                    child.kill().unwrap();
                    killed = true;
                }
            }
            child.wait().unwrap();
            assert!(acked.len() >= kill_after, "child died early");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (spool, _) = Spool::open(tmp.path(), opts(1 << 30, 4096)).await.unwrap();
                let found: HashSet<String> =
                    drain_all(&spool, 1000).await.into_iter().map(|r| r.event_id).collect();
                let lost: Vec<_> =
                    acked.iter().filter(|id| !removed.contains(*id) && !found.contains(*id)).collect();
                assert!(lost.is_empty(), "round {round}: lost {} acked records", lost.len());
            });
        }
    }
}
