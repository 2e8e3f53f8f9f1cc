//! The confirm-mode channel pool of one connection: requests share the channels
//! round-robin and pipeline their publishes on them; a channel found closed is
//! replaced on the spot, once, by whichever request finds it first.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::policy::Attempt;

/// One pooled channel and the lock that serialises its replacement.
struct Slot {
    channel: Mutex<Channel>,
    repair: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new(channel: Channel) -> Self {
        Slot { channel: Mutex::new(channel), repair: tokio::sync::Mutex::new(()) }
    }

    fn get(&self) -> Channel {
        match self.channel.lock() {
            Ok(ch) => ch.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, ch: Channel) {
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

    /// The next channel round-robin, replacing it first if it was closed.
    pub async fn channel(&self, conn: &Connection, deadline: Instant) -> Result<Channel, Attempt> {
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
