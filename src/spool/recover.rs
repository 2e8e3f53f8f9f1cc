//! What `open` does to a directory after a crash, in three steps (see "Recovery"
//! in the module docs):
//!
//! 1. [`scan`]: read every segment from the cursor on and find where its records
//!    stop being valid. Reads only.
//! 2. [`repair`]: set aside segments that are not ours, rewrite a torn header of
//!    the newest segment, cut a torn or corrupt tail off it, and count what was
//!    skipped. Older segments are left as they are (their bad rest is skipped).
//! 3. [`choose_head`]: the oldest pending record, written back to the cursor when
//!    it moved; consumed segments below it are deleted.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

use super::OpenReport;
use super::cursor::CursorFile;
use super::segment::{
    SEGMENT_HEADER_LEN, SEGMENT_MAGIC, Scan, corrupt_path, create_segment, list_segments,
    remove_consumed_segment, scan_segment, segment_path, sync_dir,
};
use super::state::{Head, SegInfo, State, normalize_head};
use super::writer::Active;

/// What `open` starts from.
pub(super) struct Recovered {
    /// Segments, head and tail as found.
    pub(super) state: State,
    /// The segment appends continue in, positioned at its valid end.
    pub(super) active: Active,
    /// Sequence number of the next segment to create (above every one seen, set
    /// aside, or named by the cursor).
    pub(super) next_seq: u64,
    /// The cursor file, open for the drainer's writes.
    pub(super) cursor: CursorFile,
    /// What was found and repaired.
    pub(super) report: OpenReport,
}

/// Scans the directory and repairs it; see the module docs.
pub(super) fn recover(dir: &Path) -> io::Result<Recovered> {
    fs::create_dir_all(dir)?;
    let (mut cursor_file, cursor) = CursorFile::open(dir)?;
    let (seqs, max_corrupt) = list_segments(dir)?;
    let mut next_seq = seqs.last().copied().unwrap_or(0).max(max_corrupt).max(cursor.map_or(0, |c| c.0)) + 1;
    let seqs = forget_consumed(dir, seqs, cursor);
    let first_start = cursor_start(dir, cursor, &seqs);

    let mut report = OpenReport::default();
    let scans = scan(dir, &seqs, first_start)?;
    let Repaired { kept, mut cursor_dirty } = repair(dir, scans, &mut report)?;

    // Index the kept segments: the newest one takes appends, the others are sealed.
    let mut segments = BTreeMap::new();
    let (mut index, mut byte) = (0u64, 0u64);
    let mut first: Option<Head> = None;
    let mut active = None;
    for k in &kept {
        first.get_or_insert(Head { seg: k.seq, off: k.start, index, byte });
        index += k.records;
        byte += k.bytes;
        segments.insert(k.seq, SegInfo { len: k.len, end_index: index, end_byte: byte, sealed: !k.is_tail });
        if k.is_tail {
            let mut file = OpenOptions::new().write(true).open(segment_path(dir, k.seq))?;
            file.seek(SeekFrom::Start(k.len))?;
            // Whether the segment holds any record at all (not just pending ones)
            // only matters for rolling: compare against the header.
            let records = u64::from(k.len > SEGMENT_HEADER_LEN);
            active = Some(Active { seq: k.seq, file, len: k.len, records, dirty: false });
        }
    }
    let active = match active {
        Some(a) => a,
        None => {
            // No segment, or the newest one was moved aside: start a new one.
            let seq = next_seq;
            next_seq += 1;
            let file = create_segment(dir, seq)?;
            file.sync_all()?;
            segments.insert(
                seq,
                SegInfo { len: SEGMENT_HEADER_LEN, end_index: index, end_byte: byte, sealed: false },
            );
            if first.is_none() {
                cursor_dirty = cursor.is_some();
            }
            Active { seq, file, len: SEGMENT_HEADER_LEN, records: 0, dirty: false }
        }
    };
    let first = first.unwrap_or(Head { seg: active.seq, off: SEGMENT_HEADER_LEN, index, byte });

    let (head, write_cursor) = choose_head(first, &segments, cursor, cursor_dirty);
    if write_cursor {
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

/// Deletes segments below the cursor's: they were fully consumed, but a crash
/// may have kept them from being deleted. Returns the rest.
fn forget_consumed(dir: &Path, mut seqs: Vec<u64>, cursor: Option<(u64, u64)>) -> Vec<u64> {
    if let Some((cseg, _)) = cursor {
        for seq in seqs.iter().filter(|s| **s < cseg) {
            remove_consumed_segment(dir, *seq);
        }
        seqs.retain(|s| *s >= cseg);
    }
    seqs
}

/// Where reading the oldest segment starts: the cursor's offset when the cursor
/// points into it, else just after its header.
fn cursor_start(dir: &Path, cursor: Option<(u64, u64)>, seqs: &[u64]) -> u64 {
    match (cursor, seqs.first()) {
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
    }
}

/// One segment as step 1 found it.
struct Scanned {
    seq: u64,
    /// The offset asked for (the cursor's, for the oldest segment).
    asked: u64,
    scan: Scan,
}

/// Step 1: scans every segment, the oldest from `first_start`, the others from
/// their header on. Writes nothing.
fn scan(dir: &Path, seqs: &[u64], first_start: u64) -> io::Result<Vec<Scanned>> {
    seqs.iter()
        .enumerate()
        .map(|(i, &seq)| {
            let asked = if i == 0 { first_start } else { SEGMENT_HEADER_LEN };
            Ok(Scanned { seq, asked, scan: scan_segment(&segment_path(dir, seq), asked)? })
        })
        .collect()
}

const CUT_TAIL: &str = "spool: torn or corrupt tail record; truncating after the last good record";
const SKIP_REST: &str = "spool: corrupt record inside a sealed segment; skipping the rest of that segment";

/// A segment recovery keeps, after repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kept {
    seq: u64,
    /// Where its pending records start.
    start: u64,
    /// Valid length (after any cut).
    len: u64,
    records: u64,
    bytes: u64,
    /// The newest segment: appends continue in it.
    is_tail: bool,
}

/// What step 2 leaves.
struct Repaired {
    kept: Vec<Kept>,
    /// The cursor no longer points where the head will be.
    cursor_dirty: bool,
}

/// Step 2: repairs what a crash or corruption left, segment by segment (see the
/// module docs), and counts it in `report`.
fn repair(dir: &Path, scans: Vec<Scanned>, report: &mut OpenReport) -> io::Result<Repaired> {
    let n = scans.len();
    let mut out = Repaired { kept: Vec::with_capacity(n), cursor_dirty: false };
    for (i, Scanned { seq, asked, scan }) in scans.into_iter().enumerate() {
        let is_tail = i + 1 == n;
        let is_head = out.kept.is_empty();
        let path = segment_path(dir, seq);
        if !scan.header_ok {
            if is_tail && scan.file_len < SEGMENT_HEADER_LEN {
                // Torn creation of the newest segment: it holds nothing.
                let mut f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(0)?;
                f.seek(SeekFrom::Start(0))?;
                f.write_all(&SEGMENT_MAGIC)?;
                f.sync_all()?;
                tracing::warn!(segment = seq, "spool: repaired torn segment header");
                let len = SEGMENT_HEADER_LEN;
                out.kept.push(Kept { seq, start: len, len, records: 0, bytes: 0, is_tail });
                continue;
            }
            let aside = corrupt_path(dir, seq);
            tracing::warn!(
                segment = seq,
                moved_to = %aside.display(),
                "spool: segment header is not a spool header; moving the file aside"
            );
            fs::rename(&path, &aside)?;
            report.corrupt_records_skipped += 1;
            out.cursor_dirty |= is_head;
            continue;
        }
        if is_head && scan.start != asked {
            tracing::warn!(
                segment = seq,
                cursor_offset = asked,
                file_len = scan.file_len,
                "spool: cursor offset outside its segment; clamped"
            );
            out.cursor_dirty = true;
        }
        if let Some(err) = scan.error {
            let lost = scan.file_len - scan.valid_len;
            report.corrupt_records_skipped += 1;
            report.truncated_bytes += lost;
            let (segment, offset, reason) = (seq, scan.valid_len, err.as_str());
            if is_tail {
                tracing::warn!(segment, offset, cut_bytes = lost, reason, "{CUT_TAIL}");
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(scan.valid_len)?;
                f.sync_all()?;
            } else {
                tracing::warn!(segment, offset, skipped_bytes = lost, reason, "{SKIP_REST}");
            }
        }
        out.kept.push(Kept {
            seq,
            start: scan.start,
            len: scan.valid_len,
            records: scan.records,
            bytes: scan.bytes,
            is_tail,
        });
    }
    Ok(out)
}

/// Step 3: the head is the first pending record, moved past sealed segments it
/// has reached the end of. Returns it and whether the cursor must be written
/// (it moved, or the stored one differs).
fn choose_head(
    first: Head,
    segments: &BTreeMap<u64, SegInfo>,
    cursor: Option<(u64, u64)>,
    cursor_dirty: bool,
) -> (Head, bool) {
    let head = normalize_head(first, segments);
    let write = cursor_dirty || head != first || cursor.is_some_and(|c| c != (head.seg, head.off));
    (head, write)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::spool::segment::{CORRUPT_SUFFIX, FRAME_HEADER_LEN, FrameError};
    use crate::spool::testing::*;
    use crate::spool::{Spool, SpoolOptions};

    /// A segment file holding the frames of `records`, then `tail` bytes.
    fn write_segment(dir: &Path, seq: u64, records: std::ops::Range<usize>, tail: &[u8]) -> u64 {
        fs::create_dir_all(dir).unwrap();
        let mut data = SEGMENT_MAGIC.to_vec();
        for i in records {
            data.extend(rec(i).encode_frame().unwrap());
        }
        let valid = data.len() as u64;
        data.extend_from_slice(tail);
        fs::write(segment_path(dir, seq), data).unwrap();
        valid
    }

    #[test]
    fn scan_finds_where_records_stop_and_writes_nothing() {
        let tmp = TempDir::new("step-scan");
        let valid = write_segment(tmp.path(), 1, 0..3, &[1, 0, 0]);
        write_segment(tmp.path(), 2, 3..5, b"");
        let second = SEGMENT_HEADER_LEN + frame_len(&rec(0));
        let scans = scan(tmp.path(), &[1, 2], second).unwrap();
        assert_eq!(scans[0].scan.start, second);
        assert_eq!((scans[0].scan.records, scans[0].scan.valid_len), (2, valid));
        assert_eq!(scans[0].scan.error, Some(FrameError::TornHeader));
        assert_eq!(
            (scans[1].asked, scans[1].scan.records, scans[1].scan.error),
            (SEGMENT_HEADER_LEN, 2, None)
        );
        assert_eq!(fs::metadata(segment_path(tmp.path(), 1)).unwrap().len(), valid + 3);
    }

    #[test]
    fn repair_cuts_only_the_tail_and_sets_foreign_files_aside() {
        let tmp = TempDir::new("step-repair");
        let sealed_valid = write_segment(tmp.path(), 1, 0..2, b"\xff\xff\xff\xff junk");
        fs::write(segment_path(tmp.path(), 2), b"GARBAGE!garbage").unwrap();
        let tail_valid = write_segment(tmp.path(), 3, 2..4, &[0; 100]);
        let scans = scan(tmp.path(), &[1, 2, 3], SEGMENT_HEADER_LEN).unwrap();
        let mut report = OpenReport::default();
        let repaired = repair(tmp.path(), scans, &mut report).unwrap();
        assert_eq!(
            repaired.kept.iter().map(|k| (k.seq, k.records, k.is_tail)).collect::<Vec<_>>(),
            [(1, 2, false), (3, 2, true)]
        );
        assert!(!repaired.cursor_dirty);
        assert_eq!(report.corrupt_records_skipped, 3);
        assert_eq!(report.truncated_bytes, 9 + 100);
        // The sealed segment keeps its bytes (skipped, not cut); the tail is cut.
        assert_eq!(fs::metadata(segment_path(tmp.path(), 1)).unwrap().len(), sealed_valid + 9);
        assert_eq!(fs::metadata(segment_path(tmp.path(), 3)).unwrap().len(), tail_valid);
        assert!(tmp.path().join(format!("{:020}{CORRUPT_SUFFIX}", 2)).exists());
    }

    #[test]
    fn repair_rewrites_a_torn_header_of_the_newest_segment_only() {
        let tmp = TempDir::new("step-header");
        write_segment(tmp.path(), 1, 0..1, b"");
        fs::write(segment_path(tmp.path(), 2), &SEGMENT_MAGIC[..3]).unwrap();
        let scans = scan(tmp.path(), &[1, 2], SEGMENT_HEADER_LEN).unwrap();
        let mut report = OpenReport::default();
        let repaired = repair(tmp.path(), scans, &mut report).unwrap();
        let tail = repaired.kept[1];
        assert_eq!((tail.seq, tail.len, tail.records, tail.is_tail), (2, SEGMENT_HEADER_LEN, 0, true));
        assert_eq!(fs::read(segment_path(tmp.path(), 2)).unwrap(), SEGMENT_MAGIC);
        assert_eq!(report, OpenReport::default());
    }

    #[test]
    fn choose_head_skips_drained_sealed_segments_and_says_when_to_write_the_cursor() {
        let one = FRAME_HEADER_LEN + 10;
        let end = SEGMENT_HEADER_LEN + one;
        let segments = BTreeMap::from([
            (1, SegInfo { len: end, end_index: 1, end_byte: one, sealed: true }),
            (2, SegInfo { len: end, end_index: 2, end_byte: 2 * one, sealed: false }),
        ]);
        // At the end of sealed segment 1: the head moves to segment 2.
        let at_end = Head { seg: 1, off: end, index: 1, byte: one };
        let moved = Head { seg: 2, off: SEGMENT_HEADER_LEN, index: 1, byte: one };
        assert_eq!(choose_head(at_end, &segments, Some((1, end)), false), (moved, true));
        assert_eq!(choose_head(at_end, &segments, None, false), (moved, true));
        // Where the cursor already points: nothing to write.
        let inside = Head { seg: 1, off: SEGMENT_HEADER_LEN, index: 0, byte: 0 };
        assert_eq!(choose_head(inside, &segments, Some((1, SEGMENT_HEADER_LEN)), false), (inside, false));
        assert_eq!(choose_head(inside, &segments, None, false), (inside, false));
        assert_eq!(choose_head(inside, &segments, Some((1, 20)), false), (inside, true));
        assert_eq!(choose_head(inside, &segments, None, true), (inside, true));
        // The end of the active (unsealed) segment is a valid head.
        let active_end = Head { seg: 2, off: end, index: 2, byte: 2 * one };
        assert_eq!(choose_head(active_end, &segments, Some((2, end)), false), (active_end, false));
    }

    #[tokio::test]
    async fn torn_tail_at_any_cut_point_is_truncated_and_counted() {
        let last = frame_len(&rec(4));
        // Cuts inside the frame header and inside the payload of the last record.
        for cut in [1, 3, 4, 7, 8, 9, last / 2, last - 1] {
            let tmp = TempDir::new("torn");
            filled(tmp.path(), SpoolOptions::default(), 0..5).await.close().await;
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
        drop(filled(tmp.path(), SpoolOptions::default(), 0..5).await);
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
        drop(filled(tmp.path(), SpoolOptions::default(), 0..3).await);
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
    async fn corrupt_record_in_sealed_segment_skips_to_next_segment_at_open() {
        let tmp = TempDir::new("mid-open");
        drop(filled(tmp.path(), opts(1 << 20, 512), 0..30).await);
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
    async fn torn_segment_header_and_foreign_segment_are_handled() {
        let tmp = TempDir::new("header");
        drop(filled(tmp.path(), SpoolOptions::default(), 0..3).await);
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
}
