//! The reader: reads the backlog in journal order, hands each record to its cluster's shard,
//! and advances and saves the cursor past what every shard has taken.

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};

use super::*;
use crate::store::{Backlog, BacklogReader, Position, ShipRecord};

/// One record on its way to a shard.
pub(super) struct Item {
    pub(super) seq: u64,
    pub(super) cluster_id: String,
    pub(super) received_ms: i64,
    /// Validated families, or, when `packed`, the record's packed payload, which the shard
    /// decompresses ([`crate::store::ShipRecord::unpack`]).
    pub(super) payload: Vec<u8>,
    pub(super) packed: bool,
}

/// The reader's view of one shard.
pub(super) struct ShardQueue {
    /// At most [`SHARD_QUEUE`] records, and at most [`SHARD_QUEUE_BYTES`] of payloads (one
    /// record alone may be larger).
    pub(super) queue: Sender<Item>,
    /// The payload bytes in `queue` (the shard takes off what it receives).
    pub(super) queued_bytes: Arc<AtomicUsize>,
    /// The shard's thread, woken once its queue is half full (it lingers to fill a request).
    pub(super) thread: std::thread::Thread,
    /// The records handed to the shard and not yet taken, oldest first.
    pub(super) sent: VecDeque<u64>,
}

impl ShardQueue {
    /// Whether `len` more payload bytes may be queued: within [`SHARD_QUEUE_BYTES`], or the
    /// queue is empty (a record larger than the bound goes alone).
    fn has_room_for(&self, len: usize) -> bool {
        let queued = self.queued_bytes.load(Ordering::Relaxed);
        queued == 0 || queued.saturating_add(len) <= SHARD_QUEUE_BYTES
    }

    /// Wakes the shard if what waits for it is worth a wake-up: half its queue, by count or bytes.
    fn nudge(&self) {
        if self.queue.len() >= SHARD_QUEUE / 2
            || self.queued_bytes.load(Ordering::Relaxed) >= SHARD_QUEUE_BYTES / 2
        {
            self.thread.unpark();
        }
    }

    /// The oldest record handed to this shard not yet taken; records below `dropped_below` count
    /// as taken (the shard drops them before it sends again).
    pub(super) fn pending_from(&self, dropped_below: u64) -> Option<u64> {
        self.sent.front().map(|&first| first.max(dropped_below))
    }
}

/// Reads the backlog, hands each record to its shard, advances and saves the cursor.
pub(super) struct Reader {
    pub(super) control: Arc<Control>,
    pub(super) backlog: Backlog,
    pub(super) reader: BacklogReader,
    pub(super) shards: Vec<ShardQueue>,
    /// (shard, n): shard `shard` has taken every record it was handed up to number `n`.
    pub(super) acked: Receiver<(usize, u64)>,
    /// Records read and not wholly taken: their number and where the next record starts.
    pub(super) in_flight: VecDeque<(u64, Position)>,
    pub(super) in_flight_gauge: Arc<AtomicU64>,
    pub(super) next_seq: u64,
    /// Everything before it is taken.
    pub(super) cursor: Position,
    pub(super) saved: Position,
    pub(super) last_save: Instant,
    /// Where the next packed record is read: a buffer from `pool`, handed back by the shard
    /// that converts it.
    pub(super) record_buffer: Vec<u8>,
    pub(super) pool: Arc<BufferPool>,
    pub(super) last_bound_check: Instant,
    pub(super) max_backlog_bytes: u64,
    /// While dropping for the bytes bound: when the episode started and how many were dropped.
    pub(super) dropping_since: Option<(Instant, u64)>,
    /// Uploads dropped for their age since the last log line, and when that was.
    pub(super) age_dropped: u64,
    pub(super) age_logged: Option<Instant>,
}

impl Reader {
    pub(super) fn run(mut self) {
        // Bounded by the shutdown deadline: every turn either reads, waits at most 200 ms, or
        // blocks on a shard's queue at most until the deadline.
        loop {
            self.take_acks();
            if self.control.deadline().is_some() {
                break;
            }
            self.check_bound();
            self.maybe_save(false);
            if self.record_buffer.capacity() == 0 {
                self.record_buffer = self.pool.take();
            }
            // A packed record (the usual upload) is handed over packed, in this buffer: its
            // shard decompresses it just before converting it, so this one thread does not
            // decompress for all the shards, and the queues hold ~8 KB an upload, not ~51 KB.
            match self.reader.next_record_packed(&mut self.record_buffer) {
                Ok(Some(record)) => {
                    if !self.hand_over(record) {
                        break;
                    }
                }
                Ok(None) => {
                    self.advance();
                    self.maybe_save(false);
                    if let Some((since, dropped)) = self.dropping_since.take() {
                        warn!(
                            "remote write: dropped {dropped} uploads over the last {:.1?} to keep the backlog within --remote-write-max-backlog-bytes",
                            since.elapsed()
                        );
                    }
                    self.wait();
                }
                Err(error) => {
                    warn!("remote write: reading the backlog: {error}; retrying in 1s");
                    if !self.control.sleep(Duration::from_secs(1)) {
                        break;
                    }
                }
            }
        }
        // Shutting down: what was handed over is still sent until the deadline.
        while self.shards.iter().any(|s| !s.sent.is_empty()) && !self.control.past_deadline() {
            if let Ok((shard, upto)) = self.acked.recv_timeout(Duration::from_millis(50)) {
                self.ack(shard, upto);
            }
        }
        self.take_acks();
        self.maybe_save(true);
        let left = self.in_flight.len();
        // Dropping the queues ends the shards.
        self.shards.clear();
        if left > 0 {
            info!(
                "remote write: stopped with {left} uploads not wholly shipped; they stay in the backlog for the next start"
            );
        } else {
            info!("remote write: stopped, nothing left to send");
        }
    }

    pub(super) fn take_acks(&mut self) {
        while let Ok((shard, upto)) = self.acked.try_recv() {
            self.ack(shard, upto);
        }
        self.advance();
    }

    pub(super) fn ack(&mut self, shard: usize, upto: u64) {
        if let Some(s) = self.shards.get_mut(shard) {
            while s.sent.front().is_some_and(|&seq| seq <= upto) {
                s.sent.pop_front();
            }
        }
    }

    /// Moves the cursor past every record wholly taken.
    pub(super) fn advance(&mut self) {
        let dropped_below = self.control.drop_below.load(Ordering::Relaxed);
        let pending = self
            .shards
            .iter()
            .filter_map(|s| s.pending_from(dropped_below))
            .min()
            .unwrap_or(self.next_seq);
        while let Some(&(seq, end)) = self.in_flight.front() {
            if seq >= pending {
                break;
            }
            self.cursor = end;
            self.in_flight.pop_front();
        }
        if self.in_flight.is_empty() {
            // Past the records that are not shipped too.
            self.cursor = self.reader.position();
        }
        self.in_flight_gauge
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
        self.control
            .metrics
            .queue_length
            .set(self.in_flight.len() as f64);
    }

    pub(super) fn maybe_save(&mut self, now: bool) {
        if self.cursor == self.saved || (!now && self.last_save.elapsed() < CURSOR_SAVE_INTERVAL) {
            return;
        }
        match self.backlog.save_cursor(self.cursor) {
            Ok(()) => self.saved = self.cursor,
            Err(error) => warn!("remote write: {error}; shipped records may be shipped again"),
        }
        self.last_save = Instant::now();
    }

    /// Hands `record` to the shard of its cluster, waiting while that shard's queue is full
    /// (taking acks meanwhile); false when the shutdown deadline passed first.
    pub(super) fn hand_over(&mut self, record: ShipRecord) -> bool {
        let received_ms = i64::try_from(record.received_millis).unwrap_or(i64::MAX);
        if self.control.too_old(received_ms) {
            self.control.metrics.drop("backlog_age");
            // One line per 10 s at most: after a long outage, every upload of it is this old.
            self.age_dropped += 1;
            if self
                .age_logged
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
            {
                warn!(
                    "remote write: dropped {} uploads received past --remote-write-max-backlog-age (the last of cluster {:?})",
                    self.age_dropped, record.cluster_id
                );
                self.age_dropped = 0;
                self.age_logged = Some(Instant::now());
            }
            self.advance();
            return true;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back((seq, record.end));
        let shard = shard_of(&record.cluster_id, self.shards.len());
        let mut item = Item {
            seq,
            cluster_id: record.cluster_id,
            received_ms,
            payload: record.payload,
            packed: record.packed,
        };
        let len = item.payload.len();
        loop {
            let Some(s) = self.shards.get(shard) else {
                return true;
            };
            let sent = if s.has_room_for(len) {
                // Counted before it is queued: the shard takes it off as soon as it receives it.
                s.queued_bytes.fetch_add(len, Ordering::Relaxed);
                let sent = s.queue.send_timeout(item, Duration::from_millis(100));
                if sent.is_err() {
                    s.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                }
                sent
            } else {
                // Full by bytes: the shard is woken (nudge), and the next ack or 10 ms ends the
                // wait, as a full queue's would.
                s.thread.unpark();
                if let Ok((shard, upto)) = self.acked.recv_timeout(Duration::from_millis(10)) {
                    self.ack(shard, upto);
                }
                Err(crossbeam_channel::SendTimeoutError::Timeout(item))
            };
            match sent {
                Ok(()) => {
                    if let Some(s) = self.shards.get_mut(shard) {
                        s.sent.push_back(seq);
                        s.nudge();
                    }
                    return true;
                }
                Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                    item = back;
                    if self.control.past_deadline() {
                        // Not handed over: the record stays in the backlog.
                        return false;
                    }
                    self.take_acks();
                    self.maybe_save(false);
                    self.check_bound();
                    if item.seq < self.control.drop_below.load(Ordering::Relaxed) {
                        // Dropped for the bytes bound while waiting.
                        self.advance();
                        return true;
                    }
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
            }
        }
    }

    /// Waits (at most 200 ms) for an append to the journal, then [`READ_LINGER`] more, so that
    /// one wake-up reads what several commits appended. The shards' acks are taken when it
    /// wakes, not waited for: they only move the cursor, saved at most every 250 ms anyway.
    /// Waking for each commit and each ack was most of the reader's context switches.
    pub(super) fn wait(&mut self) {
        let appended = self.backlog.appended();
        if appended.recv_timeout(Duration::from_millis(200)).is_ok() {
            self.control.sleep(READ_LINGER);
        }
    }

    /// Drops the oldest records while the backlog is over `--remote-write-max-backlog-bytes`.
    pub(super) fn check_bound(&mut self) {
        if self.last_bound_check.elapsed() < BOUND_CHECK_INTERVAL {
            return;
        }
        self.last_bound_check = Instant::now();
        let bytes = match self.backlog.bytes_after(self.cursor) {
            Ok(bytes) => bytes,
            Err(error) => {
                warn!("remote write: measuring the backlog: {error}");
                return;
            }
        };
        self.control.metrics.backlog_bytes.set(bytes as f64);
        if bytes <= self.max_backlog_bytes {
            return;
        }
        // The oldest go first, until what is left fits in half the bound (so the next drop is not
        // one upload later): records in hand (read, not taken), then unread ones.
        let target = self.max_backlog_bytes / 2;
        let in_hand: Vec<(u64, Position)> = self.in_flight.iter().copied().collect();
        // Binary search: the fewest records in hand whose dropping leaves at most `target`.
        let (mut low, mut high) = (0usize, in_hand.len());
        while low < high {
            let mid = (low + high) / 2;
            let left = in_hand
                .get(mid)
                .and_then(|&(_, end)| self.backlog.bytes_after(end).ok())
                .unwrap_or(u64::MAX);
            if left <= target {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        let drop_below = match in_hand.get(low) {
            Some(&(seq, _)) => seq + 1,
            None => self.next_seq,
        };
        let mut dropped = in_hand.iter().filter(|&&(seq, _)| seq < drop_below).count() as u64;
        self.control.drop_below.store(drop_below, Ordering::Relaxed);
        self.control.wake.notify_all();
        if in_hand.get(low).is_none() {
            // Bounded: each turn skips one record or ends.
            loop {
                let left = self
                    .backlog
                    .bytes_after(self.reader.position())
                    .unwrap_or(0);
                if left <= target {
                    break;
                }
                // Skipped as journaled: a packed record dropped here is never decompressed.
                match self.reader.next_record_packed(&mut Vec::new()) {
                    Ok(Some(_)) => dropped += 1,
                    Ok(None) | Err(_) => break,
                }
            }
        }
        self.control
            .metrics
            .dropped
            .with(&["backlog_bytes"])
            .add(dropped);
        let (since, total) = self.dropping_since.unwrap_or((Instant::now(), 0));
        self.dropping_since = Some((since, total + dropped));
        warn!(
            "remote write: the backlog holds {bytes} bytes, over --remote-write-max-backlog-bytes {}: dropped the oldest {dropped} uploads",
            self.max_backlog_bytes
        );
        self.advance();
    }
}

/// The shard of a cluster's uploads: a hash of its id. Every series carries its cluster's id, so
/// each series always goes through one shard, and its samples arrive in order.
pub(super) fn shard_of(cluster_id: &str, shards: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    cluster_id.hash(&mut hasher);
    (hasher.finish() % shards.max(1) as u64) as usize
}
