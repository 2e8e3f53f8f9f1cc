//! The durable drain cursor: where the oldest pending record starts, advanced in
//! place with one `fdatasync` per removal.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::segment::sync_dir;

const CURSOR_MAGIC: [u8; 8] = *b"HRSPCUR2";
/// One cursor slot: magic, generation, segment, offset, crc32.
const CURSOR_SLOT_LEN: usize = 36;
/// The two slots live in different 512-byte sectors.
pub(super) const CURSOR_SLOT_STRIDE: u64 = 512;
pub(super) const CURSOR_FILE_LEN: u64 = 2 * CURSOR_SLOT_STRIDE;
pub(super) const CURSOR_FILE: &str = "cursor";

/// The durable drain cursor: two slots written alternately in place, each
/// `[b"HRSPCUR2"][u64 LE generation][u64 LE segment][u64 LE offset][u32 LE
/// crc32 of the previous 32 bytes]`, at offsets 0 and 512. The valid slot with
/// the highest generation wins, so a torn slot write falls back to the
/// previous cursor (duplicates, never loss). One `fdatasync` per write, no
/// metadata change.
pub(super) struct CursorFile {
    file: File,
    generation: u64,
}

impl CursorFile {
    /// Opens (creating if needed) the cursor file; returns the cursor it
    /// holds, `None` if new or unreadable.
    pub(super) fn open(dir: &Path) -> io::Result<(CursorFile, Option<(u64, u64)>)> {
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
    pub(super) fn write(&mut self, seg: u64, off: u64) -> io::Result<()> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::fs;

    use super::*;
    use crate::spool::testing::*;
    use crate::spool::{Spool, SpoolOptions};

    #[tokio::test]
    async fn torn_cursor_slot_falls_back_then_replays_from_oldest() {
        let tmp = TempDir::new("cursor");
        {
            let spool = filled(tmp.path(), SpoolOptions::default(), 0..6).await;
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
}
