//! `--remote-write-url`: ships every upload this node stores, with its original timestamps, as
//! Prometheus remote-write 1.0 to any engine that speaks it (Prometheus with
//! `--web.enable-remote-write-receiver`, Thanos receive, Mimir, Cortex, VictoriaMetrics).
//!
//! # A durable backlog, shipped at least once
//!
//! Nothing is queued in memory by the request path: the store's journal already holds every
//! acknowledged upload durably, and with egress on it keeps each segment until it is shipped
//! (`store::Backlog`). One reader thread (`reader`) reads the records to ship in journal order from
//! a persisted cursor and hands each to one of `--remote-write-shards` sender threads (`shard`),
//! chosen by a hash of its cluster id; every series carries that id, so each series' samples reach
//! the receiver in order (receivers refuse out-of-order samples) while the shards send in
//! parallel. A shard converts its records ([`convert`]) and sends batches of up to `--remote-write-max-samples-per-send` samples; a batch that fails with a
//! transport error, 5xx or 429 is retried with backoff ([`backoff`]) until it is taken; one refused
//! with another status is dropped and counted (sending it again would be refused again).
//!
//! A cluster's uploads nearly always carry the same series, with new values and timestamps: each
//! shard keeps its clusters' last upload as converted (`cache`), and converts the families of
//! the next one that differ only in those bytes by comparing and patching, not by reading every
//! label again. Bounded: at most 8 MiB a shard (about 54 clusters of the usual 500-sample upload;
//! the others are converted the usual way), a cluster's cache freed after 10 minutes unused.
//!
//! The cursor advances only past records whose series every shard has had taken (or refused), and
//! is saved at most every [`CURSOR_SAVE_INTERVAL`] and at shutdown. So a crash (`kill -9`) or a
//! restart re-ships at most what was shipped since the last save: at least once, never lost. An
//! outage of the receiver makes the backlog grow on disk; only its bounds drop data, oldest first:
//! `--remote-write-max-backlog-bytes` (journal bytes from the cursor to the newest record) and
//! `--remote-write-max-backlog-age` (an upload received longer ago is not sent). Both are counted
//! in `telemeter_server_remote_write_dropped_total{reason}` and logged.

pub mod backoff;
mod batch;
mod cache;
pub mod convert;
pub mod proto;
mod reader;
mod shard;

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};
use telemeter_common::instrument::{CounterVec, Gauge, Registry};
use telemeter_common::snappy;

use self::backoff::Backoff;
use self::proto::TimeSeries;
use self::reader::{Reader, ShardQueue};
use self::shard::Shard;
use crate::buffers::BufferPool;
use crate::store::Backlog;
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
/// How long the reader lets appends gather after one wakes it (the shards linger four times as
/// long to fill a request anyway).
const READ_LINGER: Duration = Duration::from_millis(5);
/// How often the backlog's size is checked against its bound.
const BOUND_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// Records waiting per shard. A shard lingers to fill a request and takes everything queued at
/// once, so its queue holds more than a request's worth of the usual uploads (500 samples each);
/// the reader wakes it at half of this. Memory stays bounded by shards × (this many records or
/// [`SHARD_QUEUE_BYTES`], whichever is less, + a batch's worth).
const SHARD_QUEUE: usize = 32;
/// Payload bytes waiting per shard, at most (a record larger than this goes alone): 32 uploads
/// of the largest size `--max-decompressed-bytes` lets through would be 512 MiB a shard.
const SHARD_QUEUE_BYTES: usize = 16 << 20;
/// Record buffers kept for the reader ([`crate::store::BacklogReader::next_record_packed`]),
/// at most: as many as two shards' queues hold, enough for the reader to find one nearly always
/// (8 shards take them back about as fast as it reads). A fresh zeroed buffer for each upload,
/// allocated by the reader and freed on a shard's thread, cost egress 3 % of its CPU.
const POOL_BUFFERS: usize = 2 * SHARD_QUEUE;
/// A buffer of more capacity than this is freed, not kept: the usual uploads are far smaller
/// (about 8 KB as journaled, 51 KB decompressed on a shard, for 500 samples), and a few large
/// ones must not pin memory. With [`POOL_BUFFERS`], 16 MiB kept at most (about 0.5 MiB for the
/// usual packed uploads, 3 MiB for plain ones).
const POOL_BUFFER_BYTES: usize = 256 << 10;
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
        let pool = Arc::new(BufferPool::new(
            POOL_BUFFERS,
            POOL_BUFFER_BYTES,
            POOL_BUFFERS * POOL_BUFFER_BYTES,
        ));
        let mut threads = Vec::with_capacity(shard_count + 1);
        let mut queues = Vec::with_capacity(shard_count);
        let stop = |threads: Vec<JoinHandle<()>>, control: &Control| {
            control.lock().deadline = Some(Instant::now());
            control.wake.notify_all();
            threads
        };
        for number in 0..shard_count {
            let (queue, items) = crossbeam_channel::bounded(SHARD_QUEUE);
            let queued_bytes = Arc::new(AtomicUsize::new(0));
            let shard = Shard {
                number,
                control: control.clone(),
                agent: agent.clone(),
                url: config.url.clone(),
                bearer: bearer.clone(),
                backoff: Backoff::new(),
                acks: acks.clone(),
                max_samples: config.max_samples_per_send.max(1),
                spare: batch::Batch::default(),
                body: Vec::new(),
                body_len: 0,
                queued_bytes: queued_bytes.clone(),
                pool: pool.clone(),
                plain: Vec::new(),
                caches: cache::Caches::default(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("remote-write-{number}"))
                .spawn(move || shard.run(items));
            match spawned {
                Ok(thread) => {
                    queues.push((queue, queued_bytes, thread.thread().clone()));
                    threads.push(thread);
                }
                Err(e) => {
                    drop(queues);
                    for thread in stop(threads, &control) {
                        let _ = thread.join();
                    }
                    return Err(RemoteWriteError::Thread(e.to_string()));
                }
            }
        }
        drop(acks);
        let in_flight = Arc::new(AtomicU64::new(0));
        let reader = Reader {
            control: control.clone(),
            reader: backlog.reader(cursor),
            backlog,
            shards: queues
                .into_iter()
                .map(|(queue, queued_bytes, thread)| ShardQueue {
                    queue,
                    queued_bytes,
                    thread,
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
            record_buffer: Vec::new(),
            pool,
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
    // A redirected POST may come back as a GET without its body: report the 3xx instead. Each
    // shard keeps a connection: with ureq's 3 idle connections a peer, 5 of the 8 shards opened
    // (and the receiver accepted) a new one for most requests.
    agent::build_pooled(
        config.ca_file.as_deref(),
        config.timeout,
        agent::Redirects::Refuse,
        concat!("telemeter-server/", env!("CARGO_PKG_VERSION")),
        config.shards,
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
