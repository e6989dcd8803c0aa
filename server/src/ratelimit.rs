//! Per-cluster rate limit: one stored upload per window.
//!
//! Upstream used a token bucket that an empty upload also drained, and never pruned its map. Here a
//! slot is reserved before the store write and kept only when the write succeeded ([`Slot::commit`]);
//! a dropped slot gives the window back, so rejected or failed uploads never cost the client its turn.
//! Entries older than the window carry no information and are pruned, so the state stays bounded by
//! the clusters that pushed within one window.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One accepted upload per cluster per window.
#[derive(Debug)]
pub struct RateLimiter {
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When each cluster's last upload was accepted (or reserved).
    last: HashMap<String, Instant>,
    /// When the map was last pruned.
    pruned: Option<Instant>,
}

/// A reserved upload slot. Dropping it without [`Slot::commit`] gives the window back.
#[must_use = "a slot is given back when dropped; commit it once the upload is stored"]
pub struct Slot<'a> {
    limiter: &'a RateLimiter,
    cluster_id: String,
    /// What the cluster's entry was before the reservation, restored on drop.
    previous: Option<Instant>,
    reserved_at: Option<Instant>,
    committed: bool,
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

    /// Whether `cluster_id` could upload at `now`: `Err(wait)` with the time until its next slot.
    /// Reserves nothing; a cheap early refusal before decoding a body.
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
    pub fn try_acquire(&self, cluster_id: &str, now: Instant) -> Result<Slot<'_>, Duration> {
        if self.window.is_zero() {
            return Ok(Slot {
                limiter: self,
                cluster_id: cluster_id.to_string(),
                previous: None,
                reserved_at: None,
                committed: false,
            });
        }
        let mut state = self.lock();
        self.prune(&mut state, now);
        let previous = state.last.get(cluster_id).copied();
        if let Some(last) = previous {
            self.wait(last, now)?;
        }
        state.last.insert(cluster_id.to_string(), now);
        Ok(Slot {
            limiter: self,
            cluster_id: cluster_id.to_string(),
            previous,
            reserved_at: Some(now),
            committed: false,
        })
    }

    /// How many clusters the limiter remembers now.
    pub fn tracked(&self) -> usize {
        self.lock().last.len()
    }

    fn wait(&self, last: Instant, now: Instant) -> Result<(), Duration> {
        let next = last + self.window;
        if now >= next {
            Ok(())
        } else {
            Err(next - now)
        }
    }

    /// Drops entries whose window has passed, at most once per window (amortized O(1) per call).
    fn prune(&self, state: &mut State, now: Instant) {
        if let Some(at) = state.pruned {
            if now.saturating_duration_since(at) < self.window {
                return;
            }
        }
        let window = self.window;
        state
            .last
            .retain(|_, last| now.saturating_duration_since(*last) < window);
        state.pruned = Some(now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one insert/remove.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Slot<'_> {
    /// Keeps the slot: the upload was stored.
    pub fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Slot<'_> {
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
        let l = RateLimiter::new(W);
        let t0 = Instant::now();
        l.try_acquire("a", t0).unwrap().commit();
        let wait = l.try_acquire("a", t0 + Duration::from_secs(10)).err();
        assert_eq!(wait, Some(Duration::from_secs(260)));
        assert_eq!(
            l.check("a", t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(260))
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
        let l = RateLimiter::new(W);
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
        let l = RateLimiter::new(W);
        let t0 = Instant::now();
        let slot = l.try_acquire("a", t0).unwrap();
        assert!(l.try_acquire("a", t0).is_err());
        slot.commit();
        assert!(l.try_acquire("a", t0).is_err());
    }

    #[test]
    fn state_is_pruned_after_a_window() {
        let l = RateLimiter::new(W);
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
        let l = RateLimiter::new(Duration::ZERO);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.try_acquire("a", t0).unwrap().commit();
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
