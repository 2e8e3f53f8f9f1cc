//! The drain side: reading the oldest pending records in batches (skipping corrupt
//! ones durably) and removing them by advancing the durable cursor, then deleting
//! segments that are fully consumed.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::cursor::CursorFile;
use super::record::SpoolRecord;
use super::segment::{
    FRAME_HEADER_LEN, SEGMENT_HEADER_LEN, read_frame, remove_consumed_segment, segment_path,
};
use super::state::{Head, SegInfo, normalize_head};
use super::{Spool, SpoolError, join_error};

/// `peek_batch` stops once it read this many payload bytes (after one record).
const MAX_PEEK_BYTES: u64 = 8 << 20;

/// Where a record lies; returned by `peek_batch`, passed to `remove_through`.
/// Ordered by record order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpoolPosition {
    /// The [`Spool`] instance that read it (positions do not survive a reopen).
    pub(super) instance: u64,
    index: u64,
    segment: u64,
    offset: u64,
    /// End of the record's frame in its segment file.
    end: u64,
    /// Logical byte position after the record.
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

/// The drainer's resources, behind one async mutex: drain-side calls are serialized.
pub(super) struct DrainState {
    /// The segment file last read from, kept open.
    file: Option<(u64, File)>,
    /// `None` only while a cursor write is in flight (or after it panicked).
    cursor: Option<CursorFile>,
}

impl DrainState {
    pub(super) fn new(cursor: CursorFile) -> Self {
        DrainState { file: None, cursor: Some(cursor) }
    }
}

impl Spool {
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

/// A bad record found before any good one.
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
    use std::fs;

    use super::*;
    use crate::spool::SpoolDepth;
    use crate::spool::SpoolOptions;
    use crate::spool::segment::{SEGMENT_MAGIC, parse_segment_name};
    use crate::spool::testing::*;

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
    async fn removal_across_segments_deletes_old_segment_files() {
        let tmp = TempDir::new("segments");
        let spool = filled(tmp.path(), opts(1 << 20, 256), 0..30).await;
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

    #[tokio::test]
    async fn corrupt_record_found_while_reading_is_skipped() {
        let tmp = TempDir::new("mid-read");
        let spool = filled(tmp.path(), opts(1 << 20, 256), 0..20).await;
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
}
