//! Segment files and their frames: naming, creation, deletion, reading one frame
//! and scanning a whole segment. Everything here works on one file at a time.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::record::MAX_PAYLOAD_LEN;

/// Magic at the start of every segment file (also the format version).
pub(super) const SEGMENT_MAGIC: [u8; 8] = *b"HRSPSEG1";
/// Length of the segment header (the magic).
pub(super) const SEGMENT_HEADER_LEN: u64 = 8;
/// Length of a record frame header: payload length + crc32.
pub(super) const FRAME_HEADER_LEN: u64 = 8;
const SEGMENT_SUFFIX: &str = ".seg";
pub(super) const CORRUPT_SUFFIX: &str = ".seg.corrupt";

pub(super) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{SEGMENT_SUFFIX}"))
}

/// Where a segment whose header is not ours is moved aside.
pub(super) fn corrupt_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{CORRUPT_SUFFIX}"))
}

pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Makes the directory's entries durable; returns the number of syncs done.
#[cfg(unix)]
pub(super) fn sync_dir(dir: &Path) -> io::Result<u64> {
    File::open(dir)?.sync_all()?;
    Ok(1)
}

#[cfg(not(unix))]
pub(super) fn sync_dir(_dir: &Path) -> io::Result<u64> {
    Ok(0)
}

/// Why a frame is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FrameError {
    TornHeader,
    BadLength,
    TornPayload,
    BadChecksum,
}

impl FrameError {
    pub(super) fn as_str(self) -> &'static str {
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
pub(super) fn read_frame(
    r: &mut impl Read,
    remaining: u64,
    buf: &mut Vec<u8>,
) -> io::Result<Result<(), FrameError>> {
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

/// One segment file as read from a start offset: how far its records are valid.
pub(super) struct Scan {
    /// Length of the file as found.
    pub(super) file_len: u64,
    /// The file starts with [`SEGMENT_MAGIC`].
    pub(super) header_ok: bool,
    /// Where reading started (clamped to the file).
    pub(super) start: u64,
    /// End of the last valid record (where a torn tail is cut).
    pub(super) valid_len: u64,
    /// Valid records from `start` on.
    pub(super) records: u64,
    /// Their frames' bytes (headers included).
    pub(super) bytes: u64,
    /// What stopped the scan before the end of the file, if anything.
    pub(super) error: Option<FrameError>,
}

/// Reads every frame of the segment at `path` from `start` on; never writes.
pub(super) fn scan_segment(path: &Path, start: u64) -> io::Result<Scan> {
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

/// The segment sequence numbers in `dir`, sorted, and the highest one moved aside
/// as corrupt (new segments must not reuse it).
pub(super) fn list_segments(dir: &Path) -> io::Result<(Vec<u64>, u64)> {
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

/// Creates segment `seq` holding only its header; the caller syncs it.
pub(super) fn create_segment(dir: &Path, seq: u64) -> io::Result<File> {
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
pub(super) fn remove_consumed_segment(dir: &Path, seq: u64) {
    if let Err(e) = fs::remove_file(segment_path(dir, seq))
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(segment = seq, error = %e, "spool: could not delete consumed segment");
    }
}
