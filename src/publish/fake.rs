//! A scripted [`Broker`] for unit tests: each publish takes the next scripted
//! answer, and what was published is recorded. Real-broker tests live in `tests/`.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::{Broker, Delivered, Outgoing, PublishError};
use crate::envelope::Envelope;

/// What the fake does and has seen.
#[derive(Debug)]
pub struct Script {
    /// Answers to single publishes, in order; [`Self::then`] once they run out.
    pub answers: VecDeque<Result<Delivered, PublishError>>,
    /// The answer after the scripted ones.
    pub then: Result<Delivered, PublishError>,
    /// How many envelopes of each in-order batch are confirmed (the rest are not).
    pub in_order_confirms: usize,
    /// Ids the broker refuses (nacks) wherever and however often they are sent.
    pub refused: HashSet<String>,
    /// Whether there is a connection.
    pub ready: bool,
    /// Whether the broker blocks publishing.
    pub blocked: bool,
    /// Ids of single publishes, in call order.
    pub published: Vec<String>,
    /// Ids confirmed by in-order publishes, in order.
    pub confirmed_in_order: Vec<String>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            answers: VecDeque::new(),
            then: Ok(Delivered::Confirmed),
            in_order_confirms: usize::MAX,
            refused: HashSet::new(),
            ready: true,
            blocked: false,
            published: Vec::new(),
            confirmed_in_order: Vec::new(),
        }
    }
}

/// The fake broker; clones share one script.
#[derive(Debug, Clone, Default)]
pub struct FakeBroker {
    script: Arc<Mutex<Script>>,
}

impl FakeBroker {
    /// A broker that answers `answers` in order, then confirms.
    pub fn answering(answers: impl IntoIterator<Item = Result<Delivered, PublishError>>) -> Self {
        let fake = FakeBroker::default();
        fake.script().answers = answers.into_iter().collect();
        fake
    }

    /// The script, to change or to read what was published.
    pub fn script(&self) -> MutexGuard<'_, Script> {
        match self.script.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn answer(&self, event: &Outgoing<'_>) -> Result<Delivered, PublishError> {
        let mut s = self.script();
        s.published.push(event.envelope.id.clone());
        if s.refused.contains(&event.envelope.id) {
            return Err(PublishError::Nacked);
        }
        let then = s.then;
        s.answers.pop_front().unwrap_or(then)
    }
}

impl Broker for FakeBroker {
    async fn publish(&self, event: Outgoing<'_>) -> Result<Delivered, PublishError> {
        self.answer(&event)
    }

    async fn publish_until(
        &self,
        event: Outgoing<'_>,
        _deadline: Instant,
    ) -> Result<Delivered, PublishError> {
        self.answer(&event)
    }

    async fn publish_in_order(&self, batch: &[&Envelope], _deadline: Instant) -> usize {
        let mut s = self.script();
        let refused = batch.iter().position(|e| s.refused.contains(&e.id)).unwrap_or(batch.len());
        let n = refused.min(s.in_order_confirms);
        s.confirmed_in_order.extend(batch[..n].iter().map(|e| e.id.clone()));
        n
    }

    fn is_ready(&self) -> bool {
        self.script().ready
    }

    fn is_blocked(&self) -> bool {
        self.script().blocked
    }

    async fn wait_ready(&self, deadline: Instant) -> bool {
        // Polls: tests flip `ready` from outside.
        while !self.is_ready() && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        self.is_ready()
    }
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, unique, not yet existing directory path.
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        TempDir(std::env::temp_dir().join(format!("hookrelay-{name}-{}-{n}", std::process::id())))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An envelope with id `id`, as the ingest handler would build it.
pub fn envelope(id: &str) -> Envelope {
    Envelope {
        id: id.to_owned(),
        source: "/webhooks/patreon".into(),
        ce_type: "com.patreon.members.create".into(),
        time: "2024-07-01T12:00:00.000000Z".into(),
        unix_seconds: 1_719_835_200,
        subject: None,
        delivery_id: None,
        routing_key: "patreon.members.create".into(),
        body: bytes::Bytes::from(format!(r#"{{"id":"{id}"}}"#)),
    }
}
