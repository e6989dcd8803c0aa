//! Per-cluster rate limit: one stored upload per window, and a small budget of uploads that are
//! read but not stored.
//!
//! Upstream used a token bucket that an empty upload also drained, and never pruned its map. Here a
//! slot is reserved before the store write and kept only when the write succeeded ([`Slot::commit`]);
//! a dropped slot gives the window back, so rejected or failed uploads never cost the client its turn.
//!
//! Reading an upload (decompressing, decoding, validating up to 16 MiB) is the expensive part, and
//! a refused one used no slot, so one valid token could have the server read maximum-size uploads
//! that fail at their last series as fast as it could send them. So every read is paid for before
//! it starts ([`RateLimiter::admit`]): with a refusal, taken from a budget of
//! [`REFUSALS_PER_WINDOW`] per cluster that comes back one every window / [`REFUSALS_PER_WINDOW`];
//! an upload that ends stored gives it back ([`Decode::stored`]), having used the slot instead.
//! So per cluster (per upload token) the server reads at most `1 + REFUSALS_PER_WINDOW` uploads per
//! window, and at most that many at once; past that, 429 before any byte is read.
//!
//! Why a budget of its own rather than the slot: a client whose upload is refused (a series its
//! exporter got wrong, a body over a cap) can retry at once after fixing it instead of losing its
//! turn for a whole window, and an empty upload (all filtered out by the whitelist) does not
//! delay the next real one. Nothing locks a client out for good: a 429 costs nothing and moves no
//! window, the budget comes back with time alone (never only after a stored upload), so a client
//! that only ever sends empty uploads, or keeps retrying through 429s, is read again at the latest
//! one window / [`REFUSALS_PER_WINDOW`] after its last read.
//!
//! # The client's own schedule is tolerated
//!
//! The slot is a generic cell rate algorithm too: each cluster has a time its next upload is due
//! (one window after the last one was due, or after it arrived if that was later), and an upload
//! up to [`SCHEDULE_TOLERANCE`] of a window *early* is accepted. A client pushing every window
//! (the default client `--interval` equals the default `--ratelimit`, 4m30s) arrives a little
//! early or late each time, by its scrape's duration and the network; with a plain "one window
//! since the last" rule about a third of such on-time pushes got 429 in the trial. Early pushes
//! do not move the schedule earlier, so over any long period a cluster still stores at most one
//! upload per window (plus the one the tolerance lets in at the start).
//!
//! Entries that carry no information any more (a window passed, a budget back to full) are pruned,
//! so the state stays bounded by the clusters that pushed within one window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One accepted upload per cluster per window.
#[derive(Debug)]
pub struct RateLimiter {
    window: Duration,
    state: Mutex<State>,
}

/// Uploads read but not stored that a cluster may have per window.
pub const REFUSALS_PER_WINDOW: u32 = 3;

/// How early (as a fraction of the window, 1/4) an upload may come before it is due and still
/// be stored: a quarter of the default 4m30s is 67s, more than a client's scrape and push take.
pub const SCHEDULE_TOLERANCE: u32 = 4;

#[derive(Debug, Default)]
struct State {
    /// When each cluster's next upload is due: one window after the last accepted (or
    /// reserved) upload was due, or after it arrived when it came late.
    last: HashMap<String, Instant>,
    /// Each cluster's refusal budget as the time it is whole again (a generic cell rate
    /// algorithm: every read moves it one window / [`REFUSALS_PER_WINDOW`] later, and a read is
    /// allowed while it stays within one window of now). Absent: whole.
    refused_until: HashMap<String, Instant>,
    /// When the maps were last pruned.
    pruned: Option<Instant>,
}

/// A reserved upload slot. Dropping it without [`Slot::commit`] gives the window back.
#[must_use = "a slot is given back when dropped; commit it once the upload is stored"]
pub struct Slot {
    limiter: Arc<RateLimiter>,
    cluster_id: String,
    /// What the cluster's entry was before the reservation, restored on drop.
    previous: Option<Instant>,
    reserved_at: Option<Instant>,
    committed: bool,
}

/// Why a read was not admitted, with the time until it would be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The cluster stored an upload within the window.
    Slot(Duration),
    /// The cluster's refusal budget is spent.
    Refusals(Duration),
}

impl Wait {
    /// The time until a read would be admitted.
    pub fn duration(self) -> Duration {
        match self {
            Wait::Slot(wait) | Wait::Refusals(wait) => wait,
        }
    }
}

/// A read of one upload, paid for with a refusal from its cluster's budget (see the module doc).
/// Dropped, the refusal stays spent; [`Decode::stored`] gives it back.
#[must_use = "a read is charged as a refusal unless it is marked stored"]
pub struct Decode {
    limiter: Arc<RateLimiter>,
    cluster_id: String,
    charged: bool,
}

impl RateLimiter {
    /// A limiter allowing one upload per `window`; a zero window allows everything.
    pub fn new(window: Duration) -> RateLimiter {
        RateLimiter {
            window,
            state: Mutex::new(State::default()),
        }
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether [`RateLimiter::admit`] would admit `cluster_id` at `now`, taking nothing: the
    /// HTTP front asks from the request head, so a cluster that would get 429 is answered before
    /// its body is read.
    pub fn peek(&self, cluster_id: &str, now: Instant) -> Result<(), Wait> {
        if self.window.is_zero() {
            return Ok(());
        }
        let state = self.lock();
        if let Some(&last) = state.last.get(cluster_id) {
            self.wait(last, now).map_err(Wait::Slot)?;
        }
        let whole_at = state
            .refused_until
            .get(cluster_id)
            .map_or(now, |&until| until.max(now));
        let after = whole_at + self.refusal_interval();
        if after > now + self.window {
            return Err(Wait::Refusals(after - now - self.window));
        }
        Ok(())
    }

    /// Admits reading one upload of `cluster_id` at `now`: when its slot is free (see
    /// [`RateLimiter::check`]) and its refusal budget has one left, which this takes. `Err(wait)`
    /// otherwise, with the time until it would be admitted; that costs nothing.
    pub fn admit(self: &Arc<Self>, cluster_id: &str, now: Instant) -> Result<Decode, Wait> {
        let free = Decode {
            limiter: self.clone(),
            cluster_id: String::new(),
            charged: false,
        };
        if self.window.is_zero() {
            return Ok(free);
        }
        let mut state = self.lock();
        self.prune(&mut state, now);
        if let Some(&last) = state.last.get(cluster_id) {
            self.wait(last, now).map_err(Wait::Slot)?;
        }
        let step = self.refusal_interval();
        let whole_at = state
            .refused_until
            .get(cluster_id)
            .map_or(now, |&until| until.max(now));
        let after = whole_at + step;
        if after > now + self.window {
            return Err(Wait::Refusals(after - now - self.window));
        }
        state.refused_until.insert(cluster_id.to_string(), after);
        Ok(Decode {
            cluster_id: cluster_id.to_string(),
            charged: true,
            ..free
        })
    }

    /// What one refusal costs: the time the budget takes to get it back.
    fn refusal_interval(&self) -> Duration {
        self.window / REFUSALS_PER_WINDOW
    }

    /// Whether `cluster_id` could upload at `now`: `Err(wait)` with the time until its next slot.
    /// Reserves nothing.
    pub fn check(&self, cluster_id: &str, now: Instant) -> Result<(), Duration> {
        if self.window.is_zero() {
            return Ok(());
        }
        let state = self.lock();
        match state.last.get(cluster_id) {
            Some(&last) => self.wait(last, now),
            None => Ok(()),
        }
    }

    /// Reserves `cluster_id`'s slot at `now`, or `Err(wait)` with the time until the next one.
    pub fn try_acquire(self: &Arc<Self>, cluster_id: &str, now: Instant) -> Result<Slot, Duration> {
        if self.window.is_zero() {
            return Ok(Slot {
                limiter: self.clone(),
                // Never read: a slot reserved nothing to give back (`reserved_at` is `None`), so
                // the unlimited path copies no id (it ran once an upload).
                cluster_id: String::new(),
                previous: None,
                reserved_at: None,
                committed: false,
            });
        }
        let mut state = self.lock();
        self.prune(&mut state, now);
        let previous = state.last.get(cluster_id).copied();
        if let Some(due) = previous {
            self.wait(due, now)?;
        }
        // Early (within the tolerance) does not move the schedule earlier.
        let next_due = previous.map_or(now, |due| due.max(now)) + self.window;
        state.last.insert(cluster_id.to_string(), next_due);
        Ok(Slot {
            limiter: self.clone(),
            cluster_id: cluster_id.to_string(),
            previous,
            reserved_at: Some(next_due),
            committed: false,
        })
    }

    /// How many clusters the limiter remembers now (slots and budgets).
    pub fn tracked(&self) -> usize {
        let state = self.lock();
        state.last.len() + state.refused_until.len()
    }

    /// Whether an upload due at `due` may be stored at `now`: from [`SCHEDULE_TOLERANCE`] of a
    /// window before it.
    fn wait(&self, due: Instant, now: Instant) -> Result<(), Duration> {
        let tolerance = self.window / SCHEDULE_TOLERANCE;
        let earliest = due.checked_sub(tolerance).unwrap_or(due);
        if now >= earliest {
            Ok(())
        } else {
            Err(earliest - now)
        }
    }

    /// Drops entries whose window has passed and budgets whole again, at most once per window
    /// (amortized O(1) per call).
    fn prune(&self, state: &mut State, now: Instant) {
        if let Some(at) = state.pruned {
            if now.saturating_duration_since(at) < self.window {
                return;
            }
        }
        // Due by now: the next upload is due one window after it arrives, as without an entry.
        state.last.retain(|_, due| *due > now);
        state.refused_until.retain(|_, until| *until > now);
        state.pruned = Some(now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one insert/remove.
        telemeter_common::sync::lock(&self.state)
    }
}

impl Decode {
    /// The upload was stored: it used the cluster's slot, so the refusal is given back.
    pub fn stored(mut self) {
        self.refund();
    }

    fn refund(&mut self) {
        if !std::mem::replace(&mut self.charged, false) {
            return;
        }
        let step = self.limiter.refusal_interval();
        let mut state = self.limiter.lock();
        if let Some(until) = state.refused_until.get_mut(&self.cluster_id) {
            // A later read may have moved it on meanwhile; the refund only takes back this one.
            match until.checked_sub(step) {
                Some(earlier) => *until = earlier,
                None => {
                    state.refused_until.remove(&self.cluster_id);
                }
            }
        }
    }
}

impl Slot {
    /// Keeps the slot: the upload was stored.
    pub fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let Some(reserved_at) = self.reserved_at else {
            return;
        };
        let mut state = self.limiter.lock();
        // Only undo our own reservation; a later one (after a prune) is left alone.
        if state.last.get(&self.cluster_id) == Some(&reserved_at) {
            match self.previous {
                Some(previous) => {
                    state.last.insert(self.cluster_id.clone(), previous);
                }
                None => {
                    state.last.remove(&self.cluster_id);
                }
            }
        }
    }
}

/// Seconds to put in `Retry-After` for a wait: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(270);

    #[test]
    fn one_upload_per_window() {
        let l = Arc::new(RateLimiter::new(W));
        let t0 = Instant::now();
        l.try_acquire("a", t0).unwrap().commit();
        // Due again at t0 + W; accepted from a quarter of a window before that.
        let early = W - W / SCHEDULE_TOLERANCE;
        let wait = l.try_acquire("a", t0 + Duration::from_secs(10)).err();
        assert_eq!(wait, Some(early - Duration::from_secs(10)));
        assert_eq!(
            l.check("a", t0 + Duration::from_secs(10)),
            Err(early - Duration::from_secs(10))
        );
        // Another cluster is independent.
        l.try_acquire("b", t0 + Duration::from_secs(10))
            .unwrap()
            .commit();
        // After the window the cluster may upload again.
        l.try_acquire("a", t0 + W).unwrap().commit();
    }

    #[test]
    fn a_dropped_slot_gives_the_window_back() {
        let l = Arc::new(RateLimiter::new(W));
        let t0 = Instant::now();
        drop(l.try_acquire("a", t0).unwrap());
        assert_eq!(l.check("a", t0), Ok(()));
        assert_eq!(l.tracked(), 0);
        // With an earlier committed upload, a failed one restores the earlier time.
        l.try_acquire("a", t0).unwrap().commit();
        let later = t0 + W + Duration::from_secs(5);
        drop(l.try_acquire("a", later).unwrap());
        assert_eq!(l.check("a", later), Ok(()));
        l.try_acquire("a", later).unwrap().commit();
        assert!(l.check("a", later + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_reserved_slot_blocks_a_concurrent_upload() {
        let l = Arc::new(RateLimiter::new(W));
        let t0 = Instant::now();
        let slot = l.try_acquire("a", t0).unwrap();
        assert!(l.try_acquire("a", t0).is_err());
        slot.commit();
        assert!(l.try_acquire("a", t0).is_err());
    }

    #[test]
    fn state_is_pruned_after_a_window() {
        let l = Arc::new(RateLimiter::new(W));
        let t0 = Instant::now();
        for i in 0..100 {
            l.try_acquire(&format!("c{i}"), t0).unwrap().commit();
        }
        assert_eq!(l.tracked(), 100);
        l.try_acquire("new", t0 + W).unwrap().commit();
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn zero_window_is_off() {
        let l = Arc::new(RateLimiter::new(Duration::ZERO));
        let t0 = Instant::now();
        for _ in 0..3 {
            l.try_acquire("a", t0).unwrap().commit();
        }
        for _ in 0..10 {
            drop(l.admit("a", t0).unwrap());
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn reads_not_stored_have_a_budget_that_comes_back_with_time() {
        let l = Arc::new(RateLimiter::new(W));
        let step = W / REFUSALS_PER_WINDOW;
        let t0 = Instant::now();
        // Three refusals at once, held together (concurrent reads count too), then no more.
        let held: Vec<_> = (0..REFUSALS_PER_WINDOW)
            .map(|_| l.admit("a", t0).unwrap())
            .collect();
        assert_eq!(l.admit("a", t0).err(), Some(Wait::Refusals(step)));
        drop(held);
        assert_eq!(l.admit("a", t0).err(), Some(Wait::Refusals(step)));
        // Another cluster has its own budget.
        drop(l.admit("b", t0).unwrap());
        // Asking again costs nothing and moves nothing: one comes back after one step.
        for i in 1..100 {
            assert!(l.admit("a", t0 + step * i / 100).is_err());
        }
        drop(l.admit("a", t0 + step).unwrap());
        assert!(l.admit("a", t0 + step).is_err());
        // After a whole window the budget is whole again, and its entry is pruned.
        let later = t0 + step + W;
        let held: Vec<_> = (0..REFUSALS_PER_WINDOW)
            .map(|_| l.admit("a", later).unwrap())
            .collect();
        assert!(l.admit("a", later).is_err());
        drop(held);
        let _ = l.admit("new", later + W * 2);
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn a_stored_upload_gives_its_refusal_back_and_uses_the_slot() {
        let l = Arc::new(RateLimiter::new(W));
        let t0 = Instant::now();
        for _ in 0..10 {
            let read = l.admit("a", t0).unwrap();
            read.stored();
        }
        // Once the slot is used, no read is admitted before the window passes, budget or not.
        let read = l.admit("a", t0).unwrap();
        l.try_acquire("a", t0).unwrap().commit();
        read.stored();
        assert_eq!(
            l.admit("a", t0).err(),
            Some(Wait::Slot(W - W / SCHEDULE_TOLERANCE))
        );
        let read = l.admit("a", t0 + W).unwrap();
        read.stored();
        // The refunds left the budget whole.
        let held: Vec<_> = (0..REFUSALS_PER_WINDOW)
            .map(|_| l.admit("a", t0 + W).unwrap())
            .collect();
        assert!(l.admit("a", t0 + W).is_err());
        drop(held);
    }

    /// A client on its own schedule (a cycle every window, as the client's loop runs), each push
    /// arriving after its cycle starts by up to a fifth of a window (its scrape and the upload
    /// take that long), is never refused, however those delays follow each other; one pushing twice as often still stores no more
    /// than one upload per window over a long run.
    #[test]
    fn the_clients_own_schedule_with_jitter_is_tolerated_but_not_a_faster_one() {
        let l = Arc::new(RateLimiter::new(W));
        let t0 = Instant::now();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for k in 1..=200u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // The scrape and upload take up to W/5 (54 s of the default 4m30s).
            let jitter = W / 5 * (seed % 1000) as u32 / 1000;
            let at = t0 + W * k + jitter;
            let slot = l.try_acquire("on-time", at);
            assert!(
                slot.is_ok(),
                "push {k} at jitter {jitter:?} refused: {:?}",
                slot.err()
            );
            if let Ok(slot) = slot {
                slot.commit();
            }
        }
        let mut stored = 0;
        for k in 0..400u32 {
            if let Ok(slot) = l.try_acquire("eager", t0 + W * k / 2) {
                slot.commit();
                stored += 1;
            }
        }
        // 200 windows: one per window, and the one the tolerance lets in at the start.
        assert!(stored <= 201, "{stored} stored in 200 windows");
        assert!(stored >= 199, "{stored} stored in 200 windows");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
