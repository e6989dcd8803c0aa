//! `--remote-write-url`: ships every upload this node stores, with its original timestamps, as
//! Prometheus remote-write 1.0 to any engine that speaks it (Prometheus with
//! `--web.enable-remote-write-receiver`, Thanos receive, Mimir, Cortex, VictoriaMetrics).
//!
//! The request path only enqueues the stored payload (protobuf-delimited families, already
//! validated and stamped with `_id`); one sender thread decodes, converts ([`convert`]) and sends.
//! The queue holds at most `--remote-write-queue` uploads; when it is full the oldest is dropped
//! and counted, so a receiver that is down for long costs bounded memory and never slows uploads.
//! A batch that fails with a transport error, 5xx or 429 is retried with backoff ([`backoff`]) until
//! it is taken; a batch refused with another status is dropped and counted (sending it again would
//! be refused again).

pub mod backoff;
pub mod convert;
pub mod proto;

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use prost::Message;
use telemeter_common::delimited;
use telemeter_common::instrument::{CounterVec, Gauge, Registry};
use telemeter_common::snappy;

use self::backoff::Backoff;
use self::proto::{TimeSeries, WriteRequest};
use telemeter_common::agent::{self, first_line, parse_retry_after};

/// Most series one remote-write request carries; larger uploads are sent in parts.
pub const MAX_SERIES_PER_REQUEST: usize = 5000;
/// The remote-write protocol version sent in `X-Prometheus-Remote-Write-Version`.
pub const PROTOCOL_VERSION: &str = "0.1.0";
/// Most bytes of a receiver's reply read (for the log line).
const MAX_REPLY_BYTES: u64 = 4096;
/// Why a batch was dropped, as counted in `telemeter_server_remote_write_dropped_total`.
const DROP_REASONS: [&str; 5] = [
    "queue_full",
    "rejected_4xx",
    "rejected_other",
    "invalid",
    "shutdown",
];

/// Where and how to ship uploads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteWriteConfig {
    /// The receiver's remote-write endpoint (`http://` or `https://`).
    pub url: String,
    /// Most uploads waiting to be sent.
    pub queue_capacity: usize,
    /// Time allowed for one request, connect to reply.
    pub timeout: Duration,
    /// CA certificates trusted for an `https://` receiver (the system roots when `None`).
    pub ca_file: Option<PathBuf>,
    /// A file holding a bearer token sent to the receiver.
    pub bearer_token_file: Option<PathBuf>,
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
}

impl RemoteWriteMetrics {
    fn register(registry: &Registry) -> RemoteWriteMetrics {
        let m = RemoteWriteMetrics {
            samples: registry.counter(
                "telemeter_server_remote_write_samples_total",
                "Samples handed to the remote-write receiver, by result (sent, rejected).",
                &["result"],
            ),
            requests: registry.counter(
                "telemeter_server_remote_write_requests_total",
                "Remote-write requests, by HTTP status (error: no reply).",
                &["status"],
            ),
            dropped: registry.counter(
                "telemeter_server_remote_write_dropped_total",
                "Uploads (or parts of a large one) dropped unsent, by reason.",
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
                    "Uploads waiting to be sent to the remote-write receiver.",
                    &[],
                )
                .with(&[]),
        };
        // Present from the start, so "nothing dropped" reads as 0 rather than as absent.
        for reason in DROP_REASONS {
            m.dropped.with(&[reason]);
        }
        for result in ["sent", "rejected"] {
            m.samples.with(&[result]);
        }
        m.sent_bytes.with(&[]);
        m
    }

    fn drop(&self, reason: &str) {
        self.dropped.with(&[reason]).inc();
    }
}

/// One stored upload waiting to be shipped.
struct Pending {
    cluster_id: String,
    payload: Vec<u8>,
    received_ms: i64,
}

struct State {
    queue: VecDeque<Pending>,
    /// Set by shutdown: the sender stops taking new work and gives up at this instant.
    deadline: Option<Instant>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
    metrics: RemoteWriteMetrics,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        telemeter_common::sync::lock(&self.state)
    }
}

/// A handle on the sender thread: enqueue stored uploads, shut down. Cheap to clone.
#[derive(Clone)]
pub struct RemoteWriter {
    shared: Arc<Shared>,
    done: Arc<Mutex<Option<mpsc::Receiver<()>>>>,
}

impl fmt::Debug for RemoteWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteWriter")
            .field("capacity", &self.shared.capacity)
            .finish()
    }
}

impl RemoteWriter {
    /// Starts the sender thread for `config`, registering its metrics in `registry`.
    pub fn start(
        config: &RemoteWriteConfig,
        registry: &Registry,
    ) -> Result<RemoteWriter, RemoteWriteError> {
        let agent = build_agent(config)?;
        let bearer = match &config.bearer_token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                deadline: None,
            }),
            wake: Condvar::new(),
            capacity: config.queue_capacity.max(1),
            metrics: RemoteWriteMetrics::register(registry),
        });
        let sender = Sender {
            shared: shared.clone(),
            agent,
            url: config.url.clone(),
            bearer,
            backoff: Backoff::new(),
        };
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("remote-write".into())
            .spawn(move || {
                sender.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| RemoteWriteError::Thread(e.to_string()))?;
        info!(
            "remote write to {} (queue of {} uploads)",
            config.url, shared.capacity
        );
        Ok(RemoteWriter {
            shared,
            done: Arc::new(Mutex::new(Some(done_rx))),
        })
    }

    /// Queues `cluster_id`'s stored upload (validated families, protobuf-delimited), received at
    /// `received`, for shipping. Never blocks: a full queue drops its oldest upload.
    pub fn enqueue(&self, cluster_id: &str, payload: Vec<u8>, received: SystemTime) {
        let metrics = &self.shared.metrics;
        let mut state = self.shared.lock();
        if state.deadline.is_some() {
            metrics.drop("shutdown");
            return;
        }
        if state.queue.len() >= self.shared.capacity {
            if let Some(oldest) = state.queue.pop_front() {
                metrics.drop("queue_full");
                warn!(
                    "remote write: queue full ({} uploads), dropped the oldest (cluster {:?})",
                    self.shared.capacity, oldest.cluster_id
                );
            }
        }
        state.queue.push_back(Pending {
            cluster_id: cluster_id.to_string(),
            payload,
            received_ms: telemeter_common::time::sample_millis(received),
        });
        metrics.queue_length.set(state.queue.len() as f64);
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Uploads waiting now.
    pub fn queue_length(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// Sends what is queued for at most `grace`, then stops the sender; what is left is logged and
    /// counted as dropped (`shutdown`). Only the first call waits.
    pub fn shutdown(&self, grace: Duration) {
        {
            let mut state = self.shared.lock();
            if state.deadline.is_none() {
                state.deadline = Some(Instant::now() + grace);
            }
        }
        self.shared.wake.notify_all();
        let done = telemeter_common::sync::lock(&self.done).take();
        if let Some(done) = done {
            // A request in flight may outlast the grace by its own timeout; do not wait for that.
            if done.recv_timeout(grace + Duration::from_secs(1)).is_err() {
                warn!("remote write: the sender is still busy with a request; not waiting for it");
            }
        }
    }
}

/// What became of one request.
enum Outcome {
    Sent,
    Refused { reason: &'static str },
    Retry { retry_after: Option<Duration> },
}

struct Sender {
    shared: Arc<Shared>,
    agent: ureq::Agent,
    url: String,
    bearer: Option<String>,
    backoff: Backoff,
}

impl Sender {
    fn run(mut self) {
        while let Some(pending) = self.next() {
            if !self.ship(pending) {
                break;
            }
        }
        let left = {
            let mut state = self.shared.lock();
            let left = state.queue.len();
            for _ in state.queue.drain(..) {
                self.shared.metrics.drop("shutdown");
            }
            self.shared.metrics.queue_length.set(0.0);
            left
        };
        if left > 0 {
            warn!("remote write: stopped with {left} uploads unsent");
        } else {
            info!("remote write: stopped, nothing left to send");
        }
    }

    /// The next upload to send; `None` once shutting down with nothing left, or past the deadline.
    fn next(&self) -> Option<Pending> {
        let mut state = self.shared.lock();
        loop {
            if let Some(deadline) = state.deadline {
                if Instant::now() >= deadline {
                    return None;
                }
            }
            if let Some(pending) = state.queue.pop_front() {
                self.shared
                    .metrics
                    .queue_length
                    .set(state.queue.len() as f64);
                return Some(pending);
            }
            if state.deadline.is_some() {
                return None;
            }
            state = telemeter_common::sync::unpoison(self.shared.wake.wait(state));
        }
    }

    /// Sends one upload, in parts if large, retrying each until it is taken or refused. False when
    /// the shutdown deadline passed first (the rest of the upload is counted as dropped).
    fn ship(&mut self, pending: Pending) -> bool {
        let metrics = self.shared.metrics.clone();
        let limits = delimited::Limits {
            max_message_bytes: pending.payload.len(),
            max_total_bytes: pending.payload.len(),
            max_families: usize::MAX,
            max_series: usize::MAX,
        };
        let families = match delimited::decode(&pending.payload, &limits) {
            Ok(families) => families,
            Err(e) => {
                // The store wrote these bytes from validated families; this is a bug, not input.
                warn!(
                    "remote write: cannot decode the upload of cluster {:?}: {e}",
                    pending.cluster_id
                );
                metrics.drop("invalid");
                return true;
            }
        };
        let series = convert::to_series(&families, pending.received_ms);
        drop(families);
        for part in series.chunks(MAX_SERIES_PER_REQUEST) {
            let samples = convert::sample_count(part) as u64;
            let body = encode(part);
            loop {
                match self.send(&body) {
                    Outcome::Sent => {
                        self.backoff.reset();
                        metrics.samples.with(&["sent"]).add(samples);
                        metrics.sent_bytes.with(&[]).add(body.len() as u64);
                        debug!(
                            "remote write: sent {samples} samples of cluster {:?}",
                            pending.cluster_id
                        );
                        break;
                    }
                    Outcome::Refused { reason } => {
                        metrics.samples.with(&["rejected"]).add(samples);
                        metrics.drop(reason);
                        break;
                    }
                    Outcome::Retry { retry_after } => {
                        let wait = self.backoff.next(retry_after);
                        if !self.sleep(wait) {
                            metrics.drop("shutdown");
                            return false;
                        }
                    }
                }
            }
        }
        true
    }

    /// Sleeps `wait`, cut short by the shutdown deadline: false if it passed.
    fn sleep(&self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        let mut state = self.shared.lock();
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
            state = self
                .shared
                .wake
                .wait_timeout(state, left)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn send(&self, body: &[u8]) -> Outcome {
        let metrics = &self.shared.metrics;
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
                Outcome::Refused { reason }
            }
        }
    }
}

/// A remote-write request body: the protobuf `WriteRequest`, snappy block-compressed.
pub fn encode(series: &[TimeSeries]) -> Vec<u8> {
    let request = WriteRequest {
        timeseries: series.to_vec(),
    };
    snappy::encode_block(&request.encode_to_vec())
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
