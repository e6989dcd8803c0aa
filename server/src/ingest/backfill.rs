//! The backfill budget: uploads sent late (marked with the `X-Telemeter-Backfill: 1` header by a
//! client draining its spool) are not held to the fresh-push rate limit, which allows one stored
//! upload per window and would refuse the second of a spool's uploads. They get a budget of their
//! own instead: [`BACKFILLS_PER_WINDOW`] per cluster per `--ratelimit` window, coming back one every
//! window / [`BACKFILLS_PER_WINDOW`] (a generic cell rate algorithm, as the refusal budget).
//!
//! It opens no way around the rate limit: every backfill read is charged up front, whatever its
//! outcome, so one token has the server read at most `1 + REFUSALS_PER_WINDOW +
//! BACKFILLS_PER_WINDOW` uploads per window; and a backfill never replaces an upload with newer
//! samples on `/federate` (the store keeps the newer one), so marking fresh pushes as backfills
//! gains a client nothing but this bounded budget.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Backfilled uploads a cluster may send per rate-limit window (a day of 4m30s pushes spooled
/// through an outage drains in 27 windows).
pub const BACKFILLS_PER_WINDOW: u32 = 12;

/// Clusters tracked before entries whose budget is whole again are pruned.
const PRUNE_AT: usize = 4096;

/// The per-cluster backfill budget.
#[derive(Debug)]
pub struct BackfillBudget {
    window: Duration,
    /// Per cluster, when its budget is whole again; absent: whole.
    whole_at: Mutex<HashMap<String, Instant>>,
}

impl BackfillBudget {
    /// A budget of [`BACKFILLS_PER_WINDOW`] per `window`; a zero window allows everything.
    pub fn new(window: Duration) -> BackfillBudget {
        BackfillBudget {
            window,
            whole_at: Mutex::new(HashMap::new()),
        }
    }

    fn interval(&self) -> Duration {
        self.window / BACKFILLS_PER_WINDOW
    }

    /// The wait before `cluster_id` may send a backfill at `now`, taking nothing (asked from the
    /// request head, so a refused sender's body is not read).
    pub fn peek(&self, cluster_id: &str, now: Instant) -> Result<(), Duration> {
        if self.window.is_zero() {
            return Ok(());
        }
        let map = telemeter_common::sync::lock(&self.whole_at);
        let whole_at = map.get(cluster_id).map_or(now, |&t| t.max(now));
        self.check(whole_at, now).map(|_| ())
    }

    /// Takes one backfill from `cluster_id`'s budget, or the wait until one is available.
    pub fn take(&self, cluster_id: &str, now: Instant) -> Result<(), Duration> {
        if self.window.is_zero() {
            return Ok(());
        }
        let mut map = telemeter_common::sync::lock(&self.whole_at);
        if map.len() >= PRUNE_AT {
            map.retain(|_, whole_at| *whole_at > now);
        }
        let whole_at = map.get(cluster_id).map_or(now, |&t| t.max(now));
        let next = self.check(whole_at, now)?;
        map.insert(cluster_id.to_string(), next);
        Ok(())
    }

    /// The budget's new "whole at" after one more backfill, if that stays within a window of now.
    fn check(&self, whole_at: Instant, now: Instant) -> Result<Instant, Duration> {
        let next = whole_at + self.interval();
        let ahead = next.saturating_duration_since(now);
        if ahead > self.window {
            Err(ahead - self.window)
        } else {
            Ok(next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_allows_the_budget_then_one_per_interval() {
        let window = Duration::from_secs(120);
        let budget = BackfillBudget::new(window);
        let now = Instant::now();
        for _ in 0..BACKFILLS_PER_WINDOW {
            budget.take("c", now).unwrap();
        }
        let wait = budget.take("c", now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
        assert_eq!(budget.peek("c", now), Err(Duration::from_secs(10)));
        // Another cluster has its own budget.
        budget.take("d", now).unwrap();
        // One comes back per window / BACKFILLS_PER_WINDOW.
        budget.take("c", now + Duration::from_secs(10)).unwrap();
        assert!(budget.take("c", now + Duration::from_secs(10)).is_err());
        assert!(BackfillBudget::new(Duration::ZERO).take("c", now).is_ok());
    }
}
