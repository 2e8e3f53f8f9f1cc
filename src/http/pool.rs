//! The connections of one listener and whether each is inside a request, so that
//! when every connection slot is taken the accept loop can close the ones that are
//! only holding a slot (idle keep-alive, a head trickled byte by byte, nothing sent
//! at all) instead of leaving honest senders in the kernel backlog.
//!
//! A connection is *busy* from the moment its request head has been parsed until the
//! handler has answered, except while the handler waits for the request body (see
//! [`ConnectionSlot::reading_body`]). Only connections that have not been busy for at
//! least [`IDLE_BEFORE_EVICTION`] can be closed: a silent opener, a head or body
//! trickled byte by byte, an idle keep-alive. Never one whose handler has the whole
//! body (it may be waiting for a broker confirm that the sender must hear about).
//!
//! Fairness to a sender that has just connected: a connection that has not sent a
//! request yet only counts as idle after [`FRESH_GRACE`] (on a loaded machine its head
//! may take a while to be sent or read), the longest-idle connections are closed first
//! and at most a quarter of the pool per round, and a request head that arrives after
//! its connection was chosen is served (the choice is withdrawn) instead of refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a connection must have been outside any request before it may be closed
/// to free its slot. An honest client sends its next head within milliseconds of the
/// previous answer; this also covers flushing an answer.
pub const IDLE_BEFORE_EVICTION: Duration = Duration::from_millis(100);

/// How long a new connection may go without a request head before it may be closed
/// to free its slot (instead of [`IDLE_BEFORE_EVICTION`]). Measured: under a flood
/// on a loaded 2-core machine, an honest sender's head was not yet read 100 ms after
/// its connection's task first ran, and the connection was closed under it. A
/// longer grace only slows how fast silent openers are cycled out
/// (`max_connections` per grace).
pub const FRESH_GRACE: Duration = Duration::from_millis(300);

/// Set in [`Slot::state`] once the slot has been chosen for closing; the low bits
/// count requests inside the handler.
const EVICTED: u64 = 1 << 63;
/// Set in [`Slot::state`] while the handler is only waiting for the request body.
const READING: u64 = 1 << 62;
/// The request count in [`Slot::state`].
const BUSY: u64 = READING - 1;
/// [`Slot::idle_from_ms`] of a connection whose task has not run yet: not evictable.
/// On a starved machine an accepted connection may wait for its task with an honest
/// head already in the socket; its idle clock starts when the task first runs (and
/// on that first poll hyper reads the head, making the connection busy at once).
const NOT_STARTED: u64 = u64::MAX;

/// One connection's bookkeeping.
#[derive(Debug)]
pub struct Slot {
    /// `EVICTED` | `READING` | number of requests inside the handler.
    state: AtomicU64,
    /// When the connection's idle clock started, in milliseconds since the pool's
    /// epoch: when it last became idle, or, for a new connection, when its task first
    /// ran plus the part of [`FRESH_GRACE`] beyond [`IDLE_BEFORE_EVICTION`] (so the
    /// longest-idle-first order holds across both); [`NOT_STARTED`] until then.
    idle_from_ms: AtomicU64,
    /// Wakes the connection task to close the connection.
    evict: Notify,
    /// The pool's clock origin.
    epoch: Instant,
}

impl Slot {
    /// Marks a request as inside the handler. A head that arrived after the
    /// connection was chosen for closing withdraws that choice: the sender was not
    /// idle, and the accept loop frees another slot on its next round.
    pub fn enter(self: &Arc<Self>) -> BusyGuard {
        let _ = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some((s & !EVICTED) + 1));
        BusyGuard { slot: self.clone() }
    }

    /// Call when the connection's task first runs: starts its idle clock, with the
    /// grace a new connection gets to send its first head.
    pub fn started(&self) {
        let grace = FRESH_GRACE.saturating_sub(IDLE_BEFORE_EVICTION);
        let from = self.now_ms().saturating_add(millis(grace));
        let _ = self.idle_from_ms.compare_exchange(NOT_STARTED, from, Ordering::AcqRel, Ordering::Acquire);
    }

    /// True while the connection is chosen for closing (the choice not withdrawn).
    pub fn is_evicted(&self) -> bool {
        self.state.load(Ordering::Acquire) & EVICTED != 0
    }

    fn now_ms(&self) -> u64 {
        millis_since(self.epoch, Instant::now())
    }

    /// Resolves once the accept loop has chosen this connection for closing.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// When this connection's idle clock started, if it has been idle for at least
    /// `min_idle_ms` by `now_ms`.
    fn idle_from(&self, now_ms: u64, min_idle_ms: u64) -> Option<u64> {
        let from = self.idle_from_ms.load(Ordering::Acquire);
        (from != NOT_STARTED && from <= now_ms && now_ms - from >= min_idle_ms).then_some(from)
    }

    fn try_evict(&self) -> bool {
        // Only a slot that is idle (no request) or only waiting for a body, and not
        // yet evicted, can be evicted.
        let evictable = |s: u64| s & EVICTED == 0 && (s & BUSY == 0 || s & READING != 0);
        if self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| evictable(s).then_some(s | EVICTED))
            .is_err()
        {
            return false;
        }
        self.evict.notify_one();
        true
    }
}

/// A connection's slot as the handler sees it (in the request's extensions).
#[derive(Debug, Clone)]
pub struct ConnectionSlot(pub(crate) Arc<Slot>);

impl ConnectionSlot {
    /// Marks the request as only waiting for its body, so the connection may be closed
    /// to free its slot if every slot is taken and the body is slow to arrive. Call
    /// [`ReadingBody::finish`] once the body is in.
    pub fn reading_body(&self) -> ReadingBody {
        self.0.idle_from_ms.store(self.0.now_ms(), Ordering::Release);
        self.0.state.fetch_or(READING, Ordering::AcqRel);
        ReadingBody { slot: self.0.clone(), done: false }
    }
}

/// The body-reading phase of one request; see [`ConnectionSlot::reading_body`].
#[derive(Debug)]
pub struct ReadingBody {
    slot: Arc<Slot>,
    done: bool,
}

impl ReadingBody {
    /// Ends the phase. False when the connection was chosen for closing meanwhile: the
    /// handler must then stop (its answer would never arrive anyway).
    pub fn finish(mut self) -> bool {
        self.done = true;
        self.slot
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| (s & EVICTED == 0).then_some(s & !READING))
            .is_ok()
    }
}

impl Drop for ReadingBody {
    fn drop(&mut self) {
        if !self.done {
            self.slot.state.fetch_and(!READING, Ordering::AcqRel);
        }
    }
}

/// Held while a request is inside the handler; marks the connection idle on drop
/// (also when the handler future is dropped because the client went away).
#[derive(Debug)]
pub struct BusyGuard {
    slot: Arc<Slot>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.slot.idle_from_ms.store(self.slot.now_ms(), Ordering::Release);
        self.slot.state.fetch_sub(1, Ordering::AcqRel);
    }
}

fn millis_since(epoch: Instant, now: Instant) -> u64 {
    millis(now.saturating_duration_since(epoch))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Every open connection of one listener.
#[derive(Debug)]
pub struct Pool {
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

impl Default for Pool {
    fn default() -> Self {
        Pool { slots: Mutex::new(HashMap::new()), next_id: AtomicU64::new(0), epoch: Instant::now() }
    }
}

impl Pool {
    /// Registers a newly accepted connection; it counts as idle once its task calls
    /// [`Slot::started`]. Dropping the returned guard deregisters it.
    pub fn register(self: &Arc<Self>) -> (Arc<Slot>, Registration) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            state: AtomicU64::new(0),
            idle_from_ms: AtomicU64::new(NOT_STARTED),
            evict: Notify::new(),
            epoch: self.epoch,
        });
        self.lock().insert(id, slot.clone());
        (slot, Registration { pool: self.clone(), id })
    }

    /// Closes connections that have been idle for at least `min_idle`, longest-idle
    /// first, at most a quarter of the pool (at least one); returns how many were
    /// chosen. Called again as long as every slot stays taken, so a flood is still
    /// cycled through quickly while a connection accepted a moment ago is the last
    /// to go.
    pub fn evict_idle(&self, min_idle: Duration) -> usize {
        self.evict_idle_at(Instant::now(), min_idle)
    }

    fn evict_idle_at(&self, now: Instant, min_idle: Duration) -> usize {
        let now_ms = millis_since(self.epoch, now);
        let min_idle_ms = millis(min_idle);
        let mut idle: Vec<(u64, Arc<Slot>)> = {
            let slots = self.lock();
            slots.values().filter_map(|s| Some((s.idle_from(now_ms, min_idle_ms)?, s.clone()))).collect()
        };
        let most = (self.len() / 4).max(1);
        idle.sort_unstable_by_key(|(from, _)| *from);
        idle.iter().filter(|(_, slot)| slot.try_evict()).take(most).count()
    }

    /// Connections currently registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        // The map stays consistent even if a holder panicked: every critical section
        // is a single insert, remove or scan.
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes a connection from its pool when dropped.
#[derive(Debug)]
pub struct Registration {
    pool: Arc<Pool>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.pool.lock().remove(&self.id);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    /// `after` from now: the tests look at the pool at chosen moments.
    fn at(after: Duration) -> Instant {
        Instant::now() + after
    }

    #[tokio::test]
    async fn only_connections_idle_long_enough_are_evicted() {
        let pool = Arc::new(Pool::default());
        let (idle, _r1) = pool.register();
        let (busy, _r2) = pool.register();
        assert_eq!(
            pool.evict_idle_at(at(LONG), Duration::ZERO),
            0,
            "tasks that have not run are never evicted"
        );
        idle.started();
        busy.started();
        let guard = busy.enter();
        assert_eq!(pool.evict_idle_at(at(FRESH_GRACE), LONG), 0, "nothing has been idle for an hour");
        assert_eq!(
            pool.evict_idle_at(at(FRESH_GRACE), Duration::ZERO),
            1,
            "only the idle one, never the busy one"
        );
        // The evicted connection is told.
        tokio::time::timeout(Duration::from_secs(1), idle.evicted()).await.unwrap();
        assert!(idle.is_evicted());
        // The busy one becomes idle when its handler finishes, and only ages from then.
        drop(guard);
        assert_eq!(pool.evict_idle_at(at(Duration::ZERO), LONG), 0);
        assert_eq!(pool.evict_idle_at(at(Duration::ZERO), Duration::ZERO), 1);
        assert_eq!(pool.evict_idle_at(at(LONG), Duration::ZERO), 0, "evicted once only");
    }

    #[tokio::test]
    async fn a_new_connection_gets_a_grace_and_the_longest_idle_go_first() {
        let pool = Arc::new(Pool::default());
        // Eight connections that served a request and went idle, then a new one.
        let old: Vec<_> = (0..8).map(|_| pool.register()).collect();
        for (slot, _) in &old {
            slot.started();
            drop(slot.enter());
        }
        let (new, _r) = pool.register();
        new.started();
        // Under load the accept loop may look only after the new sender's head was due:
        // the old ones are idle long enough, the new one is still within its grace.
        let later = at(IDLE_BEFORE_EVICTION + Duration::from_millis(50));
        assert_eq!(pool.evict_idle_at(later, IDLE_BEFORE_EVICTION), 2, "a quarter of the pool per round");
        assert_eq!(pool.evict_idle_at(later, IDLE_BEFORE_EVICTION), 2);
        assert_eq!(pool.evict_idle_at(later, IDLE_BEFORE_EVICTION), 2);
        assert_eq!(pool.evict_idle_at(later, IDLE_BEFORE_EVICTION), 2);
        assert_eq!(pool.evict_idle_at(later, IDLE_BEFORE_EVICTION), 0, "the new one is within its grace");
        assert!(old.iter().all(|(slot, _)| slot.is_evicted()));
        assert!(!new.is_evicted());
        // Past its grace it is evictable like any other.
        assert_eq!(pool.evict_idle_at(at(FRESH_GRACE + Duration::from_millis(50)), IDLE_BEFORE_EVICTION), 1);
    }

    #[tokio::test]
    async fn a_head_that_arrives_after_the_choice_is_served() {
        let pool = Arc::new(Pool::default());
        let (slot, _r) = pool.register();
        slot.started();
        assert_eq!(pool.evict_idle_at(at(FRESH_GRACE), Duration::ZERO), 1);
        assert!(slot.is_evicted());
        // The head was parsed before the connection task saw the choice: serve it.
        let busy = slot.enter();
        assert!(!slot.is_evicted(), "choice withdrawn");
        assert_eq!(pool.evict_idle_at(at(LONG), Duration::ZERO), 0, "busy");
        drop(busy);
        assert_eq!(pool.evict_idle_at(at(LONG), Duration::ZERO), 1, "idle again afterwards");
    }

    #[tokio::test]
    async fn a_request_waiting_for_its_body_is_evictable_and_then_stops() {
        let pool = Arc::new(Pool::default());
        let (slot, _r) = pool.register();
        slot.started();
        let handle = ConnectionSlot(slot.clone());
        // Body arrives in time: the request is busy again and cannot be evicted.
        let busy = slot.enter();
        let reading = handle.reading_body();
        assert!(reading.finish());
        assert_eq!(pool.evict_idle_at(at(LONG), Duration::ZERO), 0);
        // A reader that gives up (timeout, client gone) leaves the request busy too.
        drop(handle.reading_body());
        assert_eq!(pool.evict_idle_at(at(LONG), Duration::ZERO), 0);
        // Evicted while waiting for the body: the handler is told to stop.
        let reading = handle.reading_body();
        assert_eq!(pool.evict_idle_at(at(Duration::ZERO), LONG), 0, "only after the idle threshold");
        assert_eq!(pool.evict_idle_at(at(Duration::ZERO), Duration::ZERO), 1);
        assert!(!reading.finish());
        drop(busy);
        assert!(slot.is_evicted());
    }

    #[tokio::test]
    async fn registrations_deregister_on_drop() {
        let pool = Arc::new(Pool::default());
        let (_a, ra) = pool.register();
        let (_b, rb) = pool.register();
        assert_eq!(pool.len(), 2);
        drop(ra);
        drop(rb);
        assert!(pool.is_empty());
    }
}
