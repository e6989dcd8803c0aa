//! One sender shard: converts its clusters' records and sends them in batches, retrying what
//! the receiver may take later and splitting what it refused as out of order.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, warn};

use super::backoff::Backoff;
use super::batch::{split, Batch};
use super::cache::Caches;
use super::reader::Item;
use super::*;
use crate::store::ShipRecord;

/// How long a shard waits for more records to fill a request before sending what it has.
const BATCH_LINGER: Duration = Duration::from_millis(20);

/// What became of one request.
pub(super) enum Outcome {
    Sent,
    /// Not to be sent again as it is; `out_of_order` when the receiver said a sample was older
    /// than its series' newest (or a duplicate): the rest of the request would be taken.
    Refused {
        reason: &'static str,
        out_of_order: bool,
    },
    Retry {
        retry_after: Option<Duration>,
    },
}

/// One sender thread: converts its clusters' records ([`convert`]) and sends them in batches.
pub(super) struct Shard {
    pub(super) number: usize,
    pub(super) control: Arc<Control>,
    pub(super) agent: ureq::Agent,
    pub(super) url: String,
    pub(super) bearer: Option<String>,
    pub(super) backoff: Backoff,
    pub(super) acks: Sender<(usize, u64)>,
    pub(super) max_samples: usize,
    /// A sent batch, emptied, whose buffers the next one reuses.
    pub(super) spare: Batch,
    /// The request body buffer, reused from one request to the next.
    pub(super) body: Vec<u8>,
    pub(super) body_len: usize,
    /// The payload bytes in this shard's queue, which the reader bounds.
    pub(super) queued_bytes: Arc<AtomicUsize>,
    /// Where converted payloads' buffers go back to the reader.
    pub(super) pool: Arc<BufferPool>,
    /// Where a packed record is decompressed, just before it is converted, reused from one
    /// record to the next; freed once it held more than [`POOL_BUFFER_BYTES`] (a rare large
    /// upload does not pin its size).
    pub(super) plain: Vec<u8>,
    /// Each cluster's last upload as converted, which its next one is converted from when it
    /// carries the same series ([`super::cache`]).
    pub(super) caches: Caches,
}

impl Shard {
    pub(super) fn run(mut self, items: Receiver<Item>) {
        let mut batch = Batch::default();
        // The newest record handed over, and the newest acknowledged to the reader.
        let (mut last_seq, mut acked) = (0, 0);
        // When the batch being filled is sent even if not full.
        let mut linger_until = Instant::now();
        // Ends when the reader drops its queue, or at the shutdown deadline.
        loop {
            if batch.is_empty() {
                // Idle: the reader's next record wakes us.
                match items.recv() {
                    Ok(item) => {
                        linger_until = Instant::now() + BATCH_LINGER;
                        last_seq = item.seq;
                        if !self.take(item, &mut batch) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            // Whatever was queued meanwhile, all of it at once: waking for each record as the
            // reader handed it over (a futex wake, sched_yield spins and a context switch each,
            // for 500 samples) was an eighth of egress's CPU in perf.
            let mut closed = false;
            loop {
                match items.try_recv() {
                    Ok(item) => {
                        last_seq = item.seq;
                        if !self.take(item, &mut batch) {
                            return;
                        }
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            let now = Instant::now();
            if !batch.is_empty() && (closed || now >= linger_until) {
                let all = std::mem::replace(&mut batch, std::mem::take(&mut self.spare));
                if !self.ship(all) {
                    return;
                }
            }
            // Every record before the first one still in the batch is wholly sent.
            let done = batch
                .first_record()
                .map_or(last_seq, |first| first.saturating_sub(1));
            if done > acked {
                acked = done;
                if self.acks.send((self.number, done)).is_err() {
                    return;
                }
            }
            if !batch.is_empty() {
                // A short wait for more fills the request: sending whatever is queued at each
                // instant made requests of ~2,000 samples instead of the 5,000 allowed (more
                // requests for us and the receiver). Bounded: at most BATCH_LINGER per request;
                // the reader wakes us sooner once our queue is half full, so it seldom finds the
                // queue full.
                std::thread::park_timeout(linger_until.saturating_duration_since(now));
            }
        }
    }

    /// Converts `item` into `batch` and sends the full requests it makes; false when the
    /// shutdown deadline passed first.
    fn take(&mut self, item: Item, batch: &mut Batch) -> bool {
        self.queued_bytes
            .fetch_sub(item.payload.len(), Ordering::Relaxed);
        self.convert(item, batch);
        while batch.len() >= self.max_samples {
            let spare = std::mem::take(&mut self.spare);
            let front = batch.take_front(self.max_samples, spare);
            if !self.ship(front) {
                return false;
            }
        }
        true
    }

    /// Decodes a record's payload into `batch`'s series, unless it was dropped; its buffer goes
    /// back to the reader's pool.
    pub(super) fn convert(&mut self, item: Item, batch: &mut Batch) {
        self.decode(&item, batch);
        self.pool.give(item.payload);
        keep_at_most(&mut self.plain, POOL_BUFFER_BYTES);
    }

    fn decode(&mut self, item: &Item, batch: &mut Batch) {
        let metrics = &self.control.metrics;
        if item.seq < self.control.drop_below.load(Ordering::Relaxed) {
            return;
        }
        if self.control.too_old(item.received_ms) {
            metrics.drop("backlog_age");
            return;
        }
        let payload = match item.packed {
            false => &item.payload,
            true => match ShipRecord::unpack(&item.payload, &mut self.plain) {
                Ok(()) => &self.plain,
                Err(e) => {
                    // Its checksum held when it was read: a bug, not input (as below).
                    warn!(
                        "remote write: cannot decompress an upload of cluster {:?}: {e}",
                        item.cluster_id
                    );
                    metrics.drop("invalid");
                    return;
                }
            },
        };
        let cluster = item.cluster_id.as_str();
        let before = self.caches.bytes_of(cluster);
        let cache = self.caches.get(cluster);
        let written = batch.extend_cached(payload, item.seq, item.received_ms, cache);
        self.caches.resized(cluster, before);
        match written {
            Ok(()) => {}
            Err(e) => {
                // The store journaled these bytes from validated families; a bug, not input.
                warn!(
                    "remote write: cannot decode an upload of cluster {:?}: {e}",
                    item.cluster_id
                );
                metrics.drop("invalid");
            }
        }
    }

    /// Sends one batch, retrying until it is taken, refused or dropped; false when the shutdown
    /// deadline passed first (its records are not acknowledged, so they stay in the backlog).
    ///
    /// A receiver that refuses a request for holding a sample older than its series' newest
    /// (Prometheus refuses the whole request, 400) would take every other sample in it: the
    /// request is split in halves, each sent in order, until only the refused samples are left.
    /// Such samples are what at-least-once re-ships after a crash, and late uploads.
    pub(super) fn ship(&mut self, batch: Batch) -> bool {
        let metrics = self.control.metrics.clone();
        // Oldest first: the front is sent next, so each series' samples keep their order.
        let mut parts: VecDeque<Batch> = VecDeque::from([batch]);
        while let Some(mut part) = parts.pop_front() {
            // Whether `self.body` holds this part's request body.
            let mut body = false;
            loop {
                // Records the reader dropped for the bytes bound (counted there, in uploads).
                let dropped = part.drop_below(self.control.drop_below.load(Ordering::Relaxed));
                if dropped > 0 {
                    metrics.samples.with(&["dropped"]).add(dropped);
                    body = false;
                }
                if part.is_empty() {
                    break;
                }
                let too_old = part.drop_received_before(self.control.age_cutoff_ms());
                if too_old > 0 {
                    body = false;
                    metrics.samples.with(&["dropped"]).add(too_old);
                    metrics.drop("backlog_age");
                    warn!(
                        "remote write: dropped {too_old} samples past --remote-write-max-backlog-age"
                    );
                    continue;
                }
                if self.control.past_deadline() {
                    return false;
                }
                let samples = part.len() as u64;
                if !body {
                    self.body_len = part.body_into(&mut self.body);
                    body = true;
                }
                let bytes = self.body.get(..self.body_len).unwrap_or_default();
                match self.send(bytes) {
                    Outcome::Sent => {
                        self.backoff.reset();
                        metrics.samples.with(&["sent"]).add(samples);
                        metrics.sent_bytes.with(&[]).add(bytes.len() as u64);
                        debug!("remote write: shard {} sent {samples} samples", self.number);
                        break;
                    }
                    Outcome::Refused {
                        out_of_order: true, ..
                    } if samples > 1 => {
                        let (first, second) = split(std::mem::take(&mut part));
                        parts.push_front(second);
                        parts.push_front(first);
                        break;
                    }
                    Outcome::Refused { reason, .. } => {
                        metrics.samples.with(&["rejected"]).add(samples);
                        metrics.drop(reason);
                        break;
                    }
                    Outcome::Retry { retry_after } => {
                        let wait = self.backoff.next(retry_after);
                        if !self.control.sleep(wait) {
                            return false;
                        }
                    }
                }
            }
            // Done with: its buffers serve the next batch (the largest kept).
            if part.capacity() > self.spare.capacity() {
                part.clear();
                self.spare = part;
            }
        }
        true
    }

    pub(super) fn send(&self, body: &[u8]) -> Outcome {
        let metrics = &self.control.metrics;
        let mut request = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/x-protobuf")
            .header("Content-Encoding", "snappy")
            .header("X-Prometheus-Remote-Write-Version", PROTOCOL_VERSION);
        if let Some(token) = &self.bearer {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let mut response = match request.send(body) {
            Ok(response) => response,
            Err(e) => {
                metrics.requests.with(&["error"]).inc();
                warn!("remote write to {}: {e}; retrying", self.url);
                return Outcome::Retry { retry_after: None };
            }
        };
        let status = response.status().as_u16();
        metrics.requests.with(&[&status.to_string()]).inc();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let reply = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .unwrap_or_default();
        let reply = first_line(&reply);
        match status {
            200..=299 => Outcome::Sent,
            429 | 500..=599 => {
                warn!(
                    "remote write to {}: status {status} {reply:?}; retrying",
                    self.url
                );
                Outcome::Retry { retry_after }
            }
            _ => {
                let reason = if (400..500).contains(&status) {
                    "rejected_4xx"
                } else {
                    "rejected_other"
                };
                warn!(
                    "remote write to {}: status {status} {reply:?}; dropping the batch",
                    self.url
                );
                Outcome::Refused {
                    reason,
                    out_of_order: (400..500).contains(&status) && is_out_of_order(&reply),
                }
            }
        }
    }
}

/// Frees `buffer` if it holds more than `max` bytes of capacity (a rare large upload's), so
/// that what a shard keeps between records stays within `max`.
fn keep_at_most(buffer: &mut Vec<u8>, max: usize) {
    if buffer.capacity() > max {
        *buffer = Vec::new();
    }
}

/// Whether a refusal's text says a sample came too late for its series: Prometheus ("out of
/// order sample", "duplicate sample for timestamp", "out of bounds"), Mimir and Cortex
/// ("out-of-order", "too old"), Thanos receive ("out of order").
pub(super) fn is_out_of_order(reply: &str) -> bool {
    let reply = reply.to_ascii_lowercase();
    [
        "out of order",
        "out-of-order",
        "duplicate sample",
        "out of bounds",
        "too old",
    ]
    .iter()
    .any(|needle| reply.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_buffer_grown_past_its_bound_is_freed() {
        let mut plain = Vec::with_capacity(POOL_BUFFER_BYTES);
        plain.extend_from_slice(&[1; 100]);
        keep_at_most(&mut plain, POOL_BUFFER_BYTES);
        assert!(plain.capacity() >= POOL_BUFFER_BYTES, "kept");
        plain.reserve(POOL_BUFFER_BYTES + 1);
        keep_at_most(&mut plain, POOL_BUFFER_BYTES);
        assert_eq!(plain.capacity(), 0);
    }
}
