//! How long the sender waits before retrying a batch the receiver could not take.

use std::time::Duration;

/// The first wait after a failure.
pub const INITIAL: Duration = Duration::from_millis(500);
/// The longest wait between two attempts at one batch.
pub const MAX: Duration = Duration::from_secs(30);
/// The longest `Retry-After` honoured; a receiver asking for more is retried sooner.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Exponential backoff: [`INITIAL`], doubled after each failure, capped at [`MAX`]; back to the start
/// after a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// A backoff at its first step.
    pub fn new() -> Backoff {
        Backoff { next: INITIAL }
    }

    /// The wait before the next attempt, given the receiver's `Retry-After` if it sent one.
    pub fn next(&mut self, retry_after: Option<Duration>) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(MAX);
        match retry_after {
            // The receiver knows best when it can take more; only absurd requests are shortened.
            Some(asked) => asked.min(MAX_RETRY_AFTER),
            None => wait,
        }
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = INITIAL;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..9).map(|_| b.next(None).as_millis() as u64).collect();
        assert_eq!(
            waits,
            vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        b.reset();
        assert_eq!(b.next(None), INITIAL);
    }

    #[test]
    fn retry_after_is_honoured_but_capped() {
        let mut b = Backoff::new();
        assert_eq!(b.next(Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(b.next(Some(Duration::from_secs(86_400))), MAX_RETRY_AFTER);
        // The backoff still advanced underneath.
        assert_eq!(b.next(None), Duration::from_secs(2));
    }
}
