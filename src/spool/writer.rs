//! The writer thread: owns the active segment, takes every queued append at once,
//! writes them with one `write_all` and one `sync_data` (group commit), rolls to a
//! new segment when the active one is full, and cuts a failed write back off.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};

use super::segment::{SEGMENT_HEADER_LEN, create_segment, sync_dir};
use super::state::SegInfo;
use super::{Core, SpoolError};

/// The writer stops collecting a group once it holds this many bytes.
const MAX_GROUP_BYTES: usize = 8 << 20;

/// What the handles send the writer.
pub(super) enum Command {
    Append(PendingAppend),
    Shutdown(oneshot::Sender<()>),
}

/// One encoded frame waiting for its group commit.
pub(super) struct PendingAppend {
    pub(super) frame: Vec<u8>,
    pub(super) reservation: Reservation,
    pub(super) ack: oneshot::Sender<Result<(), SpoolError>>,
}

/// Bytes counted against `max_bytes` while an append is in flight. Released on
/// drop unless the writer turned them into pending bytes.
pub(super) struct Reservation {
    pub(super) core: Arc<Core>,
    pub(super) bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut s = self.core.lock();
            s.reserved = s.reserved.saturating_sub(self.bytes);
        }
    }
}

/// The segment the writer appends to.
pub(super) struct Active {
    /// Its sequence number (file name).
    pub(super) seq: u64,
    /// Open for writing; every write seeks to `len` first.
    pub(super) file: File,
    /// Durable valid length.
    pub(super) len: u64,
    /// Records written to it (only compared with 0).
    pub(super) records: u64,
    /// A failed write may have left bytes after `len`.
    pub(super) dirty: bool,
}

pub(super) struct Writer {
    pub(super) core: Arc<Core>,
    pub(super) dir: PathBuf,
    pub(super) segment_bytes: u64,
    pub(super) active: Active,
    pub(super) next_seq: u64,
    pub(super) buf: Vec<u8>,
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<PendingAppend> = Vec::new();
        while let Some(cmd) = rx.blocking_recv() {
            #[cfg(test)]
            drop(self.core.writer_gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashSet;
    use std::fs;

    use bytes::Bytes;

    use crate::spool::testing::*;
    use crate::spool::{CHANNEL_CAPACITY, MAX_PAYLOAD_LEN, Spool, SpoolDepth, SpoolError};

    #[tokio::test]
    async fn full_when_over_max_bytes() {
        let tmp = TempDir::new("full");
        let one = frame_len(&rec(0));
        let spool = filled(tmp.path(), opts(3 * one + one / 2, 1 << 20), 0..3).await;
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
}
