//! The confirm-mode channel pool of one connection: requests share the channels
//! round-robin and pipeline their publishes on them; a channel found closed is
//! replaced on the spot, once, by whichever request finds it first. So is a channel
//! that nacks [`NACKS_BEFORE_REPLACING`] publishes in a row: RabbitMQ 3.10 can nack
//! every publish, forever, on a channel whose first publish to a quorum queue met a
//! dead leader, while a fresh channel works as soon as a new leader is elected.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use tokio::time::{Instant, timeout_at};
use tracing::{debug, warn};

use super::policy::Attempt;

/// Nacks in a row after which a channel is replaced rather than used again.
pub const NACKS_BEFORE_REPLACING: u32 = 3;
/// How long a replaced channel stays open for the confirms still in flight on it.
const REPLACED_CHANNEL_GRACE: Duration = Duration::from_secs(10);

/// One pooled channel, the lock that serialises its replacement, and its nacks in a row.
/// The channel sits in an `Arc`: every publish takes it, and cloning a lapin `Channel`
/// itself touches a dozen reference counts.
struct Slot {
    channel: Mutex<Arc<Channel>>,
    repair: tokio::sync::Mutex<()>,
    /// The channel's id, to match a confirm to its slot without the lock.
    id: AtomicU16,
    /// Nacks since the channel last acked anything (or was opened).
    nacks: AtomicU32,
}

impl Slot {
    fn new(channel: Channel) -> Self {
        Slot {
            id: AtomicU16::new(channel.id()),
            channel: Mutex::new(Arc::new(channel)),
            repair: tokio::sync::Mutex::new(()),
            nacks: AtomicU32::new(0),
        }
    }

    fn get(&self) -> Arc<Channel> {
        match self.channel.lock() {
            Ok(ch) => ch.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, ch: Arc<Channel>) {
        self.id.store(ch.id(), Ordering::Relaxed);
        self.nacks.store(0, Ordering::Relaxed);
        match self.channel.lock() {
            Ok(mut slot) => *slot = ch,
            Err(poisoned) => *poisoned.into_inner() = ch,
        }
    }
}

/// The confirm-mode channels of one connection.
pub struct ChannelPool {
    slots: Vec<Slot>,
    next: AtomicUsize,
}

impl ChannelPool {
    /// Opens `size` confirm-mode channels on `conn`.
    pub async fn open(conn: &Connection, size: usize) -> lapin::Result<Self> {
        let mut slots = Vec::with_capacity(size);
        for _ in 0..size {
            slots.push(Slot::new(open_confirm_channel(conn).await?));
        }
        Ok(ChannelPool { slots, next: AtomicUsize::new(0) })
    }

    /// How many channels the pool holds.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// The slot currently holding `ch`, if any (a replaced channel has none).
    fn slot_of(&self, ch: &Channel) -> Option<&Slot> {
        self.slots.iter().find(|s| s.id.load(Ordering::Relaxed) == ch.id())
    }

    /// The broker acked a publish on `ch`: its nacks in a row start over.
    pub fn acked(&self, ch: &Channel) {
        if let Some(slot) = self.slot_of(ch)
            && slot.nacks.load(Ordering::Relaxed) != 0
        {
            slot.nacks.store(0, Ordering::Relaxed);
        }
    }

    /// The broker nacked a publish on `ch`. After [`NACKS_BEFORE_REPLACING`] in a row
    /// the channel is replaced by a fresh one (within `deadline`); the old one stays
    /// open a while for the confirms still in flight on it, then is closed. True when
    /// this call replaced it.
    pub async fn nacked(&self, conn: &Connection, ch: &Channel, deadline: Instant) -> bool {
        let Some(slot) = self.slot_of(ch) else { return false };
        if slot.nacks.fetch_add(1, Ordering::Relaxed) + 1 < NACKS_BEFORE_REPLACING {
            return false;
        }
        let Ok(_guard) = timeout_at(deadline, slot.repair.lock()).await else { return false };
        if slot.get().id() != ch.id() || !conn.status().connected() {
            return false; // replaced meanwhile, or the whole connection is going
        }
        match timeout_at(deadline, open_confirm_channel(conn)).await {
            Ok(Ok(fresh)) => {
                slot.set(Arc::new(fresh));
                warn!(
                    nacks = NACKS_BEFORE_REPLACING,
                    "A channel nacked publishes in a row; replaced it with a fresh one."
                );
                let old = ch.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(REPLACED_CHANNEL_GRACE).await;
                    let _ = old.close(200, "replaced after repeated nacks".into()).await;
                });
                true
            }
            Ok(Err(error)) => {
                debug!(%error, "Cannot open a channel to replace a nacking one.");
                false
            }
            Err(_) => false,
        }
    }

    /// The next channel round-robin, replacing it first if it was closed.
    pub async fn channel(&self, conn: &Connection, deadline: Instant) -> Result<Arc<Channel>, Attempt> {
        if self.slots.is_empty() {
            return Err(Attempt::Unavailable);
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[i];
        let ch = slot.get();
        if ch.status().connected() {
            return Ok(ch);
        }
        let _guard = timeout_at(deadline, slot.repair.lock()).await.map_err(|_| Attempt::Timeout)?;
        let ch = slot.get();
        if ch.status().connected() {
            return Ok(ch);
        }
        if !conn.status().connected() {
            return Err(Attempt::Unavailable);
        }
        let fresh = timeout_at(deadline, open_confirm_channel(conn))
            .await
            .map_err(|_| Attempt::Timeout)?
            .map_err(|error| {
                debug!(%error, "Cannot open a replacement channel.");
                Attempt::ChannelError
            })?;
        debug!(slot = i, "Replaced a closed channel.");
        let fresh = Arc::new(fresh);
        slot.set(fresh.clone());
        Ok(fresh)
    }
}

/// A fresh channel in publisher-confirm mode.
async fn open_confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}
