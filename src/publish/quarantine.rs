//! The spool quarantine: spooled events the broker refused again and again (on the
//! main exchange and on the dead-letter exchange) are moved here so the records
//! behind them keep draining. It is a spool of its own in `{spool.dir}/quarantine`,
//! so a quarantined event is as durable as a spooled one, and it stays there until
//! an operator runs `hookrelay replay --spool-quarantine`.
//!
//! The relay opens it only for a moment per quarantined event, under its own lock
//! file, so the replay command can empty it while the relay runs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::{Instant, sleep};

use crate::spool::{Spool, SpoolError, SpoolOptions, SpoolRecord};

/// The quarantine's directory inside the spool directory.
pub const QUARANTINE_DIR: &str = "quarantine";
/// Longest a writer waits for the quarantine lock (the replay command may hold it).
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Why the quarantine could not be used.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    /// Another process (a running replay) holds the lock.
    #[error("the spool quarantine is in use by another process")]
    Busy,
    /// Creating or locking the directory failed.
    #[error("spool quarantine I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The quarantine spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// The quarantine of one spool directory.
#[derive(Debug, Clone)]
pub struct Quarantine {
    dir: PathBuf,
}

/// The quarantine opened under its lock; closes on [`Held::close`].
#[derive(Debug)]
pub struct Held {
    /// The quarantined events, oldest first.
    pub spool: Spool,
    _lock: File,
}

impl Held {
    /// Flushes and closes the quarantine, then releases the lock.
    pub async fn close(self) {
        self.spool.close().await;
    }
}

impl Quarantine {
    /// The quarantine of the spool in `spool_dir`.
    pub fn new(spool_dir: &Path) -> Self {
        Quarantine { dir: spool_dir.join(QUARANTINE_DIR) }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens it under its lock, waiting up to `wait` for another holder.
    pub async fn open(&self, wait: Duration) -> Result<Held, QuarantineError> {
        std::fs::create_dir_all(&self.dir)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))?;
        let deadline = Instant::now() + wait;
        while lock.try_lock().is_err() {
            if Instant::now() >= deadline {
                return Err(QuarantineError::Busy);
            }
            sleep(Duration::from_millis(50)).await;
        }
        let (spool, _) = Spool::open(&self.dir, SpoolOptions::default()).await?;
        Ok(Held { spool, _lock: lock })
    }

    /// Moves `record` in durably (fsync'd); returns how many events wait there now.
    pub async fn put(&self, record: SpoolRecord) -> Result<u64, QuarantineError> {
        let held = self.open(LOCK_WAIT).await?;
        let appended = held.spool.append(record).await;
        let waiting = held.spool.depth().events;
        held.close().await;
        appended?;
        Ok(waiting)
    }

    /// How many events wait there (0 when it was never used).
    pub async fn waiting(&self) -> Result<u64, QuarantineError> {
        if !self.dir.exists() {
            return Ok(0);
        }
        let held = self.open(LOCK_WAIT).await?;
        let waiting = held.spool.depth().events;
        held.close().await;
        Ok(waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::fake::TempDir;

    fn record(id: &str) -> SpoolRecord {
        SpoolRecord {
            source: "patreon".into(),
            routing_key: "patreon.members.create".into(),
            event_id: id.into(),
            envelope: bytes::Bytes::from(format!(r#"{{"id":"{id}"}}"#)),
        }
    }

    #[tokio::test]
    async fn quarantined_records_persist_in_order_and_the_lock_keeps_others_out() {
        let dir = TempDir::new("quarantine");
        let q = Quarantine::new(dir.path());
        assert_eq!(q.waiting().await.unwrap(), 0);
        assert_eq!(q.put(record("a")).await.unwrap(), 1);
        assert_eq!(q.put(record("b")).await.unwrap(), 2);
        let held = q.open(Duration::ZERO).await.unwrap();
        assert!(matches!(q.open(Duration::from_millis(100)).await, Err(QuarantineError::Busy)));
        let batch = held.spool.peek_batch(10).await.unwrap();
        let ids: Vec<&str> = batch.iter().map(|(_, r)| r.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        held.close().await;
        assert_eq!(q.waiting().await.unwrap(), 2, "kept until someone removes them");
    }
}
