//! Bounded waits on a condition: a test never sleeps for a time it assumes is long enough, it
//! polls for what it needs, and gives up (failing) after a bound.

use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it holds (true) or `timeout` passes (false). `cond` runs at least once.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    wait_for(timeout, || cond().then_some(())).is_some()
}

/// Polls `check` until it gives a value or `timeout` passes (None). `check` runs at least once,
/// and once more at the deadline, so a slow first poll still gets its answer.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_holds_later_is_seen() {
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            n += 1;
            n == 3
        }));
        assert_eq!(n, 3);
    }

    #[test]
    fn a_condition_that_never_holds_gives_up_after_the_bound() {
        let started = Instant::now();
        assert!(!wait_until(Duration::from_millis(100), || false));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn wait_for_returns_the_value() {
        assert_eq!(wait_for(Duration::from_secs(1), || Some(7)), Some(7));
    }
}
