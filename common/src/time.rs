//! Conversions between [`SystemTime`] and the integers the wire formats carry: milliseconds since
//! the Unix epoch (Prometheus sample timestamps, journal and gossip fields) and whole seconds
//! (token claims).
//!
//! Why one module: the same conversion was written about nine times with small differences (a
//! truncating `as i64` here, a saturating `try_from` there, a clock before 1970 as an error in one
//! place and as the epoch in another). Here every conversion saturates and takes a clock set
//! before the epoch as the epoch, so no input can make one panic or wrap.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long after the Unix epoch `t` is; zero for a time before it.
pub fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Milliseconds since the Unix epoch, unsigned (saturating; the epoch for earlier times).
pub fn unix_millis(t: SystemTime) -> u64 {
    u64::try_from(since_epoch(t).as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch as a Prometheus sample timestamp (saturating; the epoch for
/// earlier times).
pub fn sample_millis(t: SystemTime) -> i64 {
    duration_millis(since_epoch(t))
}

/// The current time as a Prometheus sample timestamp.
pub fn now_millis() -> i64 {
    sample_millis(SystemTime::now())
}

/// The time `millis` milliseconds after the Unix epoch; the inverse of [`unix_millis`] (the epoch
/// for a value past what `SystemTime` can hold).
pub fn from_unix_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(millis))
        .unwrap_or(UNIX_EPOCH)
}

/// Whole seconds since the Unix epoch (the epoch for earlier times).
pub fn unix_seconds(t: SystemTime) -> u64 {
    since_epoch(t).as_secs()
}

/// A duration in whole milliseconds, as an `i64` to add to sample timestamps (saturating).
pub fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip() {
        let t = from_unix_millis(1_700_000_000_123);
        assert_eq!(unix_millis(t), 1_700_000_000_123);
        assert_eq!(sample_millis(t), 1_700_000_000_123);
        assert_eq!(unix_seconds(t), 1_700_000_000);
    }

    #[test]
    fn before_the_epoch_is_the_epoch() {
        let early = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(unix_millis(early), 0);
        assert_eq!(sample_millis(early), 0);
        assert_eq!(unix_seconds(early), 0);
        assert_eq!(since_epoch(early), Duration::ZERO);
    }

    #[test]
    fn conversions_saturate() {
        assert_eq!(duration_millis(Duration::MAX), i64::MAX);
        assert_eq!(duration_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(
            unix_millis(from_unix_millis(u64::MAX)),
            unix_millis(from_unix_millis(u64::MAX))
        );
    }

    #[test]
    fn now_is_after_2020() {
        assert!(now_millis() > 1_577_836_800_000);
    }
}
