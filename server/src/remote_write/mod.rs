//! `--remote-write-url`: ships every upload this node stores, with its original timestamps, as
//! Prometheus remote-write 1.0 to any engine that speaks it (Prometheus with
//! `--web.enable-remote-write-receiver`, Thanos receive, Mimir, Cortex, VictoriaMetrics).
//!
//! # A durable backlog, shipped at least once
//!
//! Nothing is queued in memory by the request path: the store's journal already holds every
//! acknowledged upload durably, and with egress on it keeps each segment until it is shipped
//! (`store::Backlog`). One reader thread reads the records to ship in journal order from a
//! persisted cursor, converts them ([`convert`]) and hands each series to one of `--remote-write-shards`
//! sender threads, chosen by a hash of its labels, so every series' samples reach the receiver
//! in order (receivers refuse out-of-order samples) while the shards send in parallel. Each shard
//! sends batches of up to `--remote-write-max-samples-per-send` samples; a batch that fails with a
//! transport error, 5xx or 429 is retried with backoff ([`backoff`]) until it is taken; one refused
//! with another status is dropped and counted (sending it again would be refused again).
//!
//! The cursor advances only past records whose series every shard has had taken (or refused), and
//! is saved at most every [`CURSOR_SAVE_INTERVAL`] and at shutdown. So a crash (`kill -9`) or a
//! restart re-ships at most what was shipped since the last save: at least once, never lost. An
//! outage of the receiver makes the backlog grow on disk; only its bounds drop data, oldest first:
//! `--remote-write-max-backlog-bytes` (journal bytes from the cursor to the newest record) and
//! `--remote-write-max-backlog-age` (an upload received longer ago is not sent). Both are counted
//! in `telemeter_server_remote_write_dropped_total{reason}` and logged.

pub mod backoff;
pub mod convert;
pub mod proto;

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};
use telemeter_common::instrument::{CounterVec, Gauge, Registry};
use telemeter_common::snappy;

use self::backoff::Backoff;
use self::proto::TimeSeries;
use crate::store::{Backlog, BacklogReader, Position, ShipRecord};
use telemeter_common::agent::{self, first_line, parse_retry_after};

/// Most series one remote-write request carries, whatever their samples.
pub const MAX_SERIES_PER_REQUEST: usize = 5000;
/// The remote-write protocol version sent in `X-Prometheus-Remote-Write-Version`.
pub const PROTOCOL_VERSION: &str = "0.1.0";
/// Sender shards without `--remote-write-shards`.
pub const DEFAULT_SHARDS: usize = 8;
/// Samples per request without `--remote-write-max-samples-per-send`.
pub const DEFAULT_MAX_SAMPLES_PER_SEND: usize = 5000;
/// `--remote-write-max-backlog-bytes` by default.
pub const DEFAULT_MAX_BACKLOG_BYTES: u64 = 4 << 30;
/// `--remote-write-max-backlog-age` by default (as `--max-sample-age`).
pub const DEFAULT_MAX_BACKLOG_AGE: Duration = Duration::from_secs(24 * 3600);
/// The cursor is saved at most this often (each save is a file write and two syncs).
pub const CURSOR_SAVE_INTERVAL: Duration = Duration::from_millis(250);
/// How often the backlog's size is checked against its bound.
const BOUND_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// Uploads waiting per shard: memory stays bounded by shards × (this + a batch's worth).
const SHARD_QUEUE: usize = 8;
/// Most bytes of a receiver's reply read (for the log line).
const MAX_REPLY_BYTES: u64 = 4096;
/// Why an upload or a batch was dropped, as counted in `telemeter_server_remote_write_dropped_total`.
const DROP_REASONS: [&str; 5] = [
    "backlog_bytes",
    "backlog_age",
    "rejected_4xx",
    "rejected_other",
    "invalid",
];

/// Where and how to ship uploads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteWriteConfig {
    /// The receiver's remote-write endpoint (`http://` or `https://`).
    pub url: String,
    /// `--remote-write-queue`, kept for compatibility: no effect since the backlog is on disk.
    pub queue_capacity: usize,
    /// Time allowed for one request, connect to reply.
    pub timeout: Duration,
    /// CA certificates trusted for an `https://` receiver (the system roots when `None`).
    pub ca_file: Option<PathBuf>,
    /// A file holding a bearer token sent to the receiver.
    pub bearer_token_file: Option<PathBuf>,
    /// Sender threads; each series always goes through the same one.
    pub shards: usize,
    /// Most samples in one request.
    pub max_samples_per_send: usize,
    /// Most journal bytes waiting to be shipped; beyond, the oldest are dropped.
    pub max_backlog_bytes: u64,
    /// Uploads received longer ago than this are dropped unsent.
    pub max_backlog_age: Duration,
}

impl RemoteWriteConfig {
    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: &str) -> RemoteWriteConfig {
        RemoteWriteConfig {
            url: url.to_string(),
            queue_capacity: 1000,
            timeout: Duration::from_secs(30),
            ca_file: None,
            bearer_token_file: None,
            shards: DEFAULT_SHARDS,
            max_samples_per_send: DEFAULT_MAX_SAMPLES_PER_SEND,
            max_backlog_bytes: DEFAULT_MAX_BACKLOG_BYTES,
            max_backlog_age: DEFAULT_MAX_BACKLOG_AGE,
        }
    }
}

/// Why the sender could not start.
#[derive(Debug)]
pub enum RemoteWriteError {
    /// The CA file is unusable.
    CaFile(String),
    /// The sender thread could not be started.
    Thread(String),
    /// The bearer token file is unusable.
    TokenFile {
        /// The path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The store was not opened to keep a backlog, or its cursor is unreadable.
    Backlog(String),
}

impl fmt::Display for RemoteWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteWriteError::CaFile(reason) => write!(f, "--remote-write-ca-file: {reason}"),
            RemoteWriteError::Thread(reason) => {
                write!(f, "starting the remote-write sender: {reason}")
            }
            RemoteWriteError::TokenFile { path, reason } => write!(
                f,
                "--remote-write-bearer-token-file: {}: {reason}",
                path.display()
            ),
            RemoteWriteError::Backlog(reason) => write!(f, "remote-write backlog: {reason}"),
        }
    }
}

impl std::error::Error for RemoteWriteError {}

/// The sender's own metrics.
#[derive(Clone)]
struct RemoteWriteMetrics {
    samples: CounterVec,
    requests: CounterVec,
    dropped: CounterVec,
    sent_bytes: CounterVec,
    queue_length: Gauge,
    backlog_bytes: Gauge,
}

impl RemoteWriteMetrics {
    fn register(registry: &Registry) -> RemoteWriteMetrics {
        let m = RemoteWriteMetrics {
            samples: registry.counter(
                "telemeter_server_remote_write_samples_total",
                "Samples handed to the remote-write receiver, by result (sent, rejected, dropped).",
                &["result"],
            ),
            requests: registry.counter(
                "telemeter_server_remote_write_requests_total",
                "Remote-write requests, by HTTP status (error: no reply).",
                &["status"],
            ),
            dropped: registry.counter(
                "telemeter_server_remote_write_dropped_total",
                "Uploads skipped in the backlog, or requests given up, unsent, by reason.",
                &["reason"],
            ),
            sent_bytes: registry.counter(
                "telemeter_server_remote_write_sent_bytes_total",
                "Remote-write request bodies taken by the receiver, compressed.",
                &[],
            ),
            queue_length: registry
                .gauge(
                    "telemeter_server_remote_write_queue_length",
                    "Uploads read from the backlog whose series are not all taken yet.",
                    &[],
                )
                .with(&[]),
            backlog_bytes: registry
                .gauge(
                    "telemeter_server_remote_write_backlog_bytes",
                    "Journal bytes from the egress cursor to the newest record (what waits to be shipped).",
                    &[],
                )
                .with(&[]),
        };
        // Present from the start, so "nothing dropped" reads as 0 rather than as absent.
        for reason in DROP_REASONS {
            m.dropped.with(&[reason]);
        }
        for result in ["sent", "rejected", "dropped"] {
            m.samples.with(&[result]);
        }
        m.sent_bytes.with(&[]);
        m
    }

    fn drop(&self, reason: &str) {
        self.dropped.with(&[reason]).inc();
    }
}

/// What the reader and the shards share.
struct Control {
    state: Mutex<ControlState>,
    wake: Condvar,
    metrics: RemoteWriteMetrics,
    /// Batches holding only records numbered below this are dropped (the backlog bound).
    drop_below: AtomicU64,
    /// Uploads received before this (ms since the epoch) are dropped (the age bound).
    max_age: Duration,
}

struct ControlState {
    /// Set by shutdown: work stops at this instant.
    deadline: Option<Instant>,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        telemeter_common::sync::lock(&self.state)
    }

    fn deadline(&self) -> Option<Instant> {
        self.lock().deadline
    }

    fn past_deadline(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Sleeps `wait`, cut short by the shutdown deadline or a drop: false if the deadline passed.
    fn sleep(&self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            if let Some(deadline) = state.deadline {
                if now >= deadline {
                    return false;
                }
            }
            if now >= until {
                return true;
            }
            let mut left = until - now;
            if let Some(deadline) = state.deadline {
                left = left.min(deadline - now);
            }
            let (next, timeout) = self
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner());
            state = next;
            if !timeout.timed_out() {
                // Woken: by shutdown or by a drop; the caller looks again.
                return state.deadline.is_none_or(|d| Instant::now() < d);
            }
        }
    }

    /// Uploads received before this (ms since the epoch) are past the age bound now.
    fn age_cutoff_ms(&self) -> i64 {
        let now = telemeter_common::time::sample_millis(SystemTime::now());
        let max = i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX);
        now.saturating_sub(max)
    }

    /// Whether an upload received at `received_ms` is past the age bound now.
    fn too_old(&self, received_ms: i64) -> bool {
        received_ms < self.age_cutoff_ms()
    }
}

/// A handle on the sender threads: shut them down. Cheap to clone.
#[derive(Clone)]
pub struct RemoteWriter {
    control: Arc<Control>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    in_flight: Arc<AtomicU64>,
}

impl fmt::Debug for RemoteWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteWriter").finish()
    }
}

impl RemoteWriter {
    /// Starts the reader and the sender shards for `config`, shipping from `backlog`, registering
    /// their metrics in `registry`.
    pub fn start(
        config: &RemoteWriteConfig,
        registry: &Registry,
        backlog: Backlog,
    ) -> Result<RemoteWriter, RemoteWriteError> {
        let agent = build_agent(config)?;
        let bearer = match &config.bearer_token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        let cursor = backlog
            .cursor()
            .map_err(|e| RemoteWriteError::Backlog(e.to_string()))?;
        let control = Arc::new(Control {
            state: Mutex::new(ControlState { deadline: None }),
            wake: Condvar::new(),
            metrics: RemoteWriteMetrics::register(registry),
            drop_below: AtomicU64::new(0),
            max_age: config.max_backlog_age,
        });
        let shard_count = config.shards.max(1);
        let (acks, acked) = crossbeam_channel::unbounded();
        let mut threads = Vec::with_capacity(shard_count + 1);
        let mut queues = Vec::with_capacity(shard_count);
        let stop = |threads: Vec<JoinHandle<()>>, control: &Control| {
            control.lock().deadline = Some(Instant::now());
            control.wake.notify_all();
            threads
        };
        for number in 0..shard_count {
            let (queue, items) = crossbeam_channel::bounded(SHARD_QUEUE);
            let shard = Shard {
                number,
                control: control.clone(),
                agent: agent.clone(),
                url: config.url.clone(),
                bearer: bearer.clone(),
                backoff: Backoff::new(),
                acks: acks.clone(),
                max_samples: config.max_samples_per_send.max(1),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("remote-write-{number}"))
                .spawn(move || shard.run(items));
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    drop(queues);
                    for thread in stop(threads, &control) {
                        let _ = thread.join();
                    }
                    return Err(RemoteWriteError::Thread(e.to_string()));
                }
            }
            queues.push(queue);
        }
        drop(acks);
        let in_flight = Arc::new(AtomicU64::new(0));
        let reader = Reader {
            control: control.clone(),
            reader: backlog.reader(cursor),
            backlog,
            shards: queues
                .into_iter()
                .map(|queue| ShardQueue {
                    queue,
                    sent: VecDeque::new(),
                })
                .collect(),
            acked,
            in_flight: VecDeque::new(),
            in_flight_gauge: in_flight.clone(),
            next_seq: 1,
            cursor,
            saved: cursor,
            last_save: Instant::now(),
            last_bound_check: Instant::now() - BOUND_CHECK_INTERVAL,
            max_backlog_bytes: config.max_backlog_bytes,
            dropping_since: None,
            age_dropped: 0,
            age_logged: None,
        };
        let spawned = std::thread::Builder::new()
            .name("remote-write-reader".into())
            .spawn(move || reader.run());
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                for thread in stop(threads, &control) {
                    let _ = thread.join();
                }
                return Err(RemoteWriteError::Thread(e.to_string()));
            }
        }
        info!(
            "remote write to {} from the journal at segment {} offset {} ({shard_count} shards, up to {} samples per request, backlog bounded by {} bytes and {:?})",
            config.url,
            cursor.segment,
            cursor.offset,
            config.max_samples_per_send,
            config.max_backlog_bytes,
            config.max_backlog_age
        );
        Ok(RemoteWriter {
            control,
            threads: Arc::new(Mutex::new(threads)),
            in_flight,
        })
    }

    /// Uploads read from the backlog and not wholly shipped yet.
    pub fn queue_length(&self) -> usize {
        usize::try_from(self.in_flight.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    /// Keeps shipping for at most `grace`, then stops the threads and saves the cursor. Nothing is
    /// lost: what was not shipped stays in the backlog for the next start. Only the first call
    /// waits.
    pub fn shutdown(&self, grace: Duration) {
        {
            let mut state = self.control.lock();
            if state.deadline.is_none() {
                state.deadline = Some(Instant::now() + grace);
            }
        }
        self.control.wake.notify_all();
        let threads = std::mem::take(&mut *telemeter_common::sync::lock(&self.threads));
        // Each thread checks the deadline between requests; one in a request may outlast the
        // grace by the request's timeout: it is not waited for (the cursor is saved by the
        // reader, which never sends).
        let wait_until = Instant::now() + grace + Duration::from_secs(1);
        for thread in threads {
            while !thread.is_finished() && Instant::now() < wait_until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                warn!("remote write: a sender is still busy with a request; not waiting for it");
            }
        }
    }
}

/// Series on their way to the receiver, in the order their records were read, already encoded
/// as the entries of a `WriteRequest` ([`convert::encode_series`]): a request body is any run of
/// them, snappy-compressed. Each series carries one sample.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// Where each series' entry ends in `bytes`.
    ends: Vec<usize>,
    /// The number of the record each series comes from (non-decreasing).
    seqs: Vec<u64>,
    /// The receive time of each series' record, ms since the epoch.
    received: Vec<i64>,
}

impl Batch {
    /// Series (and samples: one each).
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Appends the series of `payload` (protobuf-delimited families) of record `seq`; on a
    /// decoding error nothing of it stays.
    fn extend(
        &mut self,
        payload: &[u8],
        seq: u64,
        received_ms: i64,
    ) -> Result<(), telemeter_common::delimited::DecodeError> {
        let (bytes, series) = (self.bytes.len(), self.ends.len());
        let (ends, seqs, received) = (&mut self.ends, &mut self.seqs, &mut self.received);
        let written = convert::encode_payload(payload, received_ms, &mut self.bytes, |end| {
            ends.push(end);
            seqs.push(seq);
            received.push(received_ms);
        });
        if written.is_err() {
            self.bytes.truncate(bytes);
            self.ends.truncate(series);
            self.seqs.truncate(series);
            self.received.truncate(series);
        }
        written
    }

    /// Splits off the series from index `at` on.
    fn split_off(&mut self, at: usize) -> Batch {
        let offset = match at.checked_sub(1) {
            Some(last) => self.ends.get(last).copied().unwrap_or(self.bytes.len()),
            None => 0,
        };
        let mut ends = self.ends.split_off(at);
        for end in &mut ends {
            *end -= offset;
        }
        Batch {
            bytes: self.bytes.split_off(offset),
            ends,
            seqs: self.seqs.split_off(at),
            received: self.received.split_off(at),
        }
    }

    /// Removes the series of records numbered below `seq` (a prefix); returns how many.
    fn drop_below(&mut self, seq: u64) -> u64 {
        let cut = self.seqs.partition_point(|&s| s < seq);
        if cut > 0 {
            let rest = self.split_off(cut);
            *self = rest;
        }
        cut as u64
    }

    /// Removes the leading series of records received before `cutoff_ms` (records are read in
    /// about the order they were received); returns how many.
    fn drop_received_before(&mut self, cutoff_ms: i64) -> u64 {
        let cut = self.received.iter().take_while(|&&r| r < cutoff_ms).count();
        if cut > 0 {
            let rest = self.split_off(cut);
            *self = rest;
        }
        cut as u64
    }

    /// Takes the first `max_samples` series (at least one).
    fn take_front(&mut self, max_samples: usize) -> Batch {
        let count = max_samples.clamp(1, MAX_SERIES_PER_REQUEST).min(self.len());
        let rest = self.split_off(count);
        std::mem::replace(self, rest)
    }

    /// The request body: the entries, snappy block-compressed.
    fn body(&self) -> Vec<u8> {
        snappy::encode_block(&self.bytes)
    }
}

/// One record on its way to a shard.
struct Item {
    seq: u64,
    cluster_id: String,
    received_ms: i64,
    payload: Vec<u8>,
}

/// The reader's view of one shard.
struct ShardQueue {
    queue: Sender<Item>,
    /// The records handed to the shard and not yet taken, oldest first.
    sent: VecDeque<u64>,
}

impl ShardQueue {
    /// The oldest record handed to this shard not yet taken; records below `dropped_below` count
    /// as taken (the shard drops them before it sends again).
    fn pending_from(&self, dropped_below: u64) -> Option<u64> {
        self.sent.front().map(|&first| first.max(dropped_below))
    }
}

/// Reads the backlog, hands each record to its shard, advances and saves the cursor.
struct Reader {
    control: Arc<Control>,
    backlog: Backlog,
    reader: BacklogReader,
    shards: Vec<ShardQueue>,
    /// (shard, n): shard `shard` has taken every record it was handed up to number `n`.
    acked: Receiver<(usize, u64)>,
    /// Records read and not wholly taken: their number and where the next record starts.
    in_flight: VecDeque<(u64, Position)>,
    in_flight_gauge: Arc<AtomicU64>,
    next_seq: u64,
    /// Everything before it is taken.
    cursor: Position,
    saved: Position,
    last_save: Instant,
    last_bound_check: Instant,
    max_backlog_bytes: u64,
    /// While dropping for the bytes bound: when the episode started and how many were dropped.
    dropping_since: Option<(Instant, u64)>,
    /// Uploads dropped for their age since the last log line, and when that was.
    age_dropped: u64,
    age_logged: Option<Instant>,
}

impl Reader {
    fn run(mut self) {
        // Bounded by the shutdown deadline: every turn either reads, waits at most 200 ms, or
        // blocks on a shard's queue at most until the deadline.
        loop {
            self.take_acks();
            if self.control.deadline().is_some() {
                break;
            }
            self.check_bound();
            self.maybe_save(false);
            match self.reader.next_record() {
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

    fn take_acks(&mut self) {
        while let Ok((shard, upto)) = self.acked.try_recv() {
            self.ack(shard, upto);
        }
        self.advance();
    }

    fn ack(&mut self, shard: usize, upto: u64) {
        if let Some(s) = self.shards.get_mut(shard) {
            while s.sent.front().is_some_and(|&seq| seq <= upto) {
                s.sent.pop_front();
            }
        }
    }

    /// Moves the cursor past every record wholly taken.
    fn advance(&mut self) {
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

    fn maybe_save(&mut self, now: bool) {
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
    fn hand_over(&mut self, record: ShipRecord) -> bool {
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
        };
        loop {
            let Some(s) = self.shards.get_mut(shard) else {
                return true;
            };
            match s.queue.send_timeout(item, Duration::from_millis(100)) {
                Ok(()) => {
                    s.sent.push_back(seq);
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

    /// Waits (at most 200 ms) for an append to the journal or a shard's ack.
    fn wait(&mut self) {
        let appended = self.backlog.appended();
        crossbeam_channel::select! {
            recv(self.acked) -> ack => {
                if let Ok((shard, upto)) = ack {
                    self.ack(shard, upto);
                }
            }
            recv(appended) -> _ => {}
            default(Duration::from_millis(200)) => {}
        }
    }

    /// Drops the oldest records while the backlog is over `--remote-write-max-backlog-bytes`.
    fn check_bound(&mut self) {
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
                match self.reader.next_record() {
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
fn shard_of(cluster_id: &str, shards: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    cluster_id.hash(&mut hasher);
    (hasher.finish() % shards.max(1) as u64) as usize
}

/// What became of one request.
enum Outcome {
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
struct Shard {
    number: usize,
    control: Arc<Control>,
    agent: ureq::Agent,
    url: String,
    bearer: Option<String>,
    backoff: Backoff,
    acks: Sender<(usize, u64)>,
    max_samples: usize,
}

impl Shard {
    fn run(mut self, items: Receiver<Item>) {
        let mut batch = Batch::default();
        // The newest record handed over, and the newest acknowledged to the reader.
        let (mut last_seq, mut acked) = (0, 0);
        // Ends when the reader drops its queue, or at the shutdown deadline.
        loop {
            // Fill the batch with what is queued; send when full, or when nothing more waits.
            let item = if batch.is_empty() {
                match items.recv() {
                    Ok(item) => Some(item),
                    Err(_) => return,
                }
            } else {
                items.try_recv().ok()
            };
            match item {
                Some(item) => {
                    last_seq = item.seq;
                    self.convert(item, &mut batch);
                    while batch.len() >= self.max_samples {
                        let front = batch.take_front(self.max_samples);
                        if !self.ship(front) {
                            return;
                        }
                    }
                }
                None => {
                    let all = std::mem::take(&mut batch);
                    if !self.ship(all) {
                        return;
                    }
                }
            }
            // Every record before the first one still in the batch is wholly sent.
            let done = batch
                .seqs
                .first()
                .map_or(last_seq, |&first| first.saturating_sub(1));
            if done > acked {
                acked = done;
                if self.acks.send((self.number, done)).is_err() {
                    return;
                }
            }
        }
    }

    /// Decodes a record's payload into `batch`'s series, unless it was dropped.
    fn convert(&self, item: Item, batch: &mut Batch) {
        let metrics = &self.control.metrics;
        if item.seq < self.control.drop_below.load(Ordering::Relaxed) {
            return;
        }
        if self.control.too_old(item.received_ms) {
            metrics.drop("backlog_age");
            return;
        }
        match batch.extend(&item.payload, item.seq, item.received_ms) {
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
    fn ship(&mut self, batch: Batch) -> bool {
        let metrics = self.control.metrics.clone();
        // Oldest first: the front is sent next, so each series' samples keep their order.
        let mut parts: VecDeque<Batch> = VecDeque::from([batch]);
        while let Some(mut part) = parts.pop_front() {
            let mut body = None;
            loop {
                // Records the reader dropped for the bytes bound (counted there, in uploads).
                let dropped = part.drop_below(self.control.drop_below.load(Ordering::Relaxed));
                if dropped > 0 {
                    metrics.samples.with(&["dropped"]).add(dropped);
                    body = None;
                }
                if part.is_empty() {
                    break;
                }
                let too_old = part.drop_received_before(self.control.age_cutoff_ms());
                if too_old > 0 {
                    body = None;
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
                let bytes = body.get_or_insert_with(|| part.body());
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
                        let (first, second) = split(part);
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
        }
        true
    }

    fn send(&self, body: &[u8]) -> Outcome {
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

/// Whether a refusal's text says a sample came too late for its series: Prometheus ("out of
/// order sample", "duplicate sample for timestamp", "out of bounds"), Mimir and Cortex
/// ("out-of-order", "too old"), Thanos receive ("out of order").
fn is_out_of_order(reply: &str) -> bool {
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

/// `batch` in two halves, in order.
fn split(mut batch: Batch) -> (Batch, Batch) {
    let second = batch.split_off(batch.len() / 2);
    (batch, second)
}

/// A remote-write request body: the protobuf `WriteRequest`, snappy block-compressed.
pub fn encode(series: &[TimeSeries]) -> Vec<u8> {
    // Field 1 of `WriteRequest`, repeated, written from the slice: no copy of the series.
    let len: usize = series
        .iter()
        .map(|s| prost::encoding::message::encoded_len(1, s))
        .sum();
    let mut bytes = Vec::with_capacity(len);
    for one in series {
        prost::encoding::message::encode(1, one, &mut bytes);
    }
    snappy::encode_block(&bytes)
}

fn build_agent(config: &RemoteWriteConfig) -> Result<ureq::Agent, RemoteWriteError> {
    // A redirected POST may come back as a GET without its body: report the 3xx instead.
    agent::build(
        config.ca_file.as_deref(),
        config.timeout,
        agent::Redirects::Refuse,
        concat!("telemeter-server/", env!("CARGO_PKG_VERSION")),
    )
    .map_err(|e| RemoteWriteError::CaFile(e.0))
}

fn read_token(path: &PathBuf) -> Result<String, RemoteWriteError> {
    let text = std::fs::read_to_string(path).map_err(|e| RemoteWriteError::TokenFile {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let token = text.trim();
    if token.is_empty() || token.contains(['\r', '\n']) {
        return Err(RemoteWriteError::TokenFile {
            path: path.clone(),
            reason: "must hold one non-empty line".into(),
        });
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests;
