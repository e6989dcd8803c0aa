//! The per-cluster rate limit of remote write: a token bucket per cluster id.
//!
//! `/upload`'s limit (one upload per `--ratelimit` window) cannot serve remote write: a Prometheus
//! sends a batch every few seconds from each of its shards, and after an outage it replays its WAL
//! as fast as it is answered. So each cluster gets `rate` requests a second, with a burst of
//! [`BURST_SECONDS`] seconds' worth; over it, 429 with the seconds until the next token, which a
//! Prometheus retries after (`Retry-After`) without dropping anything.
//!
//! Buckets exist only for clusters that authenticated, and at most `MAX_BUCKETS` of them: past
//! that, full buckets (idle clusters, which lose nothing by being forgotten) are dropped first,
//! then all of them (the only effect is one burst allowed again).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The burst: this many seconds of the rate.
pub const BURST_SECONDS: f64 = 10.0;
/// Most clusters tracked at once.
const MAX_BUCKETS: usize = 100_000;

/// One cluster's bucket.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-cluster token buckets; a rate of 0 admits everything.
pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    /// `rate` requests a second per cluster (0: no limit).
    pub fn new(rate: f64) -> Limiter {
        Limiter {
            rate,
            burst: (rate * BURST_SECONDS).max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, bucket: Option<&Bucket>, now: Instant) -> Bucket {
        match bucket {
            None => Bucket {
                tokens: self.burst,
                at: now,
            },
            Some(b) => Bucket {
                tokens: (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.rate)
                    .min(self.burst),
                at: now,
            },
        }
    }

    fn wait(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - tokens) / self.rate).max(0.0))
    }

    /// Whether `cluster_id` has a token now, without taking it (for the request head).
    pub fn peek(&self, cluster_id: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let buckets = telemeter_common::sync::lock(&self.buckets);
        let bucket = self.refilled(buckets.get(cluster_id), now);
        if bucket.tokens >= 1.0 {
            Ok(())
        } else {
            Err(self.wait(bucket.tokens))
        }
    }

    /// Takes one of `cluster_id`'s tokens, or says how long until there is one.
    pub fn take(&self, cluster_id: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = telemeter_common::sync::lock(&self.buckets);
        let mut bucket = self.refilled(buckets.get(cluster_id), now);
        if bucket.tokens < 1.0 {
            return Err(self.wait(bucket.tokens));
        }
        bucket.tokens -= 1.0;
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(cluster_id) {
            buckets.retain(|_, b| self.refilled(Some(b), now).tokens < self.burst);
            if buckets.len() >= MAX_BUCKETS {
                buckets.clear();
            }
        }
        buckets.insert(cluster_id.to_string(), bucket);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = Limiter::new(2.0);
        let now = Instant::now();
        for _ in 0..20 {
            limiter.take("c", now).unwrap();
        }
        let wait = limiter.take("c", now).unwrap_err();
        assert!(
            wait <= Duration::from_millis(500) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(limiter.peek("c", now).is_err());
        // Another cluster is not affected.
        limiter.take("d", now).unwrap();
        let later = now + Duration::from_millis(500);
        limiter.peek("c", later).unwrap();
        limiter.take("c", later).unwrap();
        assert!(limiter.take("c", later).is_err());
    }

    #[test]
    fn zero_is_no_limit() {
        let limiter = Limiter::new(0.0);
        let now = Instant::now();
        for _ in 0..1000 {
            limiter.take("c", now).unwrap();
        }
    }
}
