//! `POST /metrics/v1/receive`: Prometheus remote write 1.0 from the edge (upstream telemeter v2).
//!
//! The order of a request: method → bearer (base64 JSON of the client token and cluster id, checked
//! by the `/authorize` authorizer) → the cluster's rate limit → Content-Encoding (snappy block) and
//! Content-Type → the body caps (as sent, then snappy's declared length before decompressing) →
//! protobuf → series rules ([`series`]) → merge into the cluster's stored series and store durably
//! (on the cluster's owner when clustered) → ship the request's own samples → 200. A request of
//! series this server converted before is merged from its bytes without converting them again
//! ([`cache`]; a local store without egress only), with the same result.
//!
//! Admission from the head, as `/upload` does: with a tokens file (or any-token) the bearer is
//! checked and the rate limit peeked before any of the body is read, so a peer without a valid
//! token holds no body memory. With `--authorize` a call to the service does not run on the
//! head: a cached answer is used there, and a bearer not seen within the cache time is checked
//! after its body (capped by `--receive-max-bytes`) is read. The request then runs on its
//! connection's thread (an inline path, as `/upload`), under SCHED_BATCH, behind its own memory
//! gate; its conversion, when it needs one, behind its own CPU gate too (decompression and the
//! raw merge run without: see `accept`).
//!
//! Status codes follow the remote-write spec so a sender neither retries a refusal forever nor
//! drops data during an overload: 400/401/403/413/415 are never retried by Prometheus; 429 (with
//! `Retry-After`) and 5xx are retried. Every answer is counted in
//! `telemeter_server_receive_requests_total{result}`, and every refusal but 429 is logged once
//! with the cluster id (429s at debug: a sender retrying can make them come at line rate).

pub mod auth;
pub mod cache;
pub mod limit;
pub mod merge;
pub mod series;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use telemeter_common::http::{Head, Request, Response};
use telemeter_common::instrument::{Counter, CounterVec};
use telemeter_common::selector::Selector;
use telemeter_common::sync::Swap;

use crate::authorize::{AuthorizeError, ClientAuthorizer};
use crate::buffers::BufferPool;
use crate::cluster::forward::ForwardKind;
use crate::cluster::placement::NotStoredHere;
use crate::cluster::Cluster;
use crate::ingest::gate::{run_as_batch, Gate, CPU_GATE_YIELD};
use crate::ingest::placement::PlacementError;
use crate::ingest::ratelimit::retry_after_secs;
use crate::metrics::Metrics;
use crate::store::StoreError;

use auth::{Authenticator, Credentials};
use cache::RawRules;
use limit::Limiter;
use merge::{MergeError, Merger, Raw};
use series::SeriesRules;

/// The path.
pub const RECEIVE_PATH: &str = "/metrics/v1/receive";

/// Memory a request reserves per byte of its decompressed body: the body (read in place, no
/// decoded copy), the request's encoded series (about the body's size), and the cluster's stored
/// and merged payloads (each about the size of a batch carrying all its series), with room to
/// spare; a cluster holding many batches' worth of series costs more, bounded by `--max-series`.
const RESERVED_BYTES_PER_BODY_BYTE: usize = 8;
/// Memory all requests past the front may reserve at once (see `ingest::upload`'s equivalent).
const MAX_MEMORY_BYTES: usize = 256 << 20;
/// Decompression buffers kept for the next requests ([`BufferPool`]), the largest kept, and the
/// most bytes kept in all: a fresh buffer per request cost its zeroing and, above the allocator's
/// mmap threshold, a page fault per 4 KiB (a tenth of remote-write ingest's CPU). Bounded by bytes
/// rather than by a count of 8: requests run on their connections' threads, so as many bodies
/// as senders are alive at once (64 in the bench), and 8 buffers missed most of the time (the
/// zeroing's page faults were back at ~9% of the CPU). At most 8 MiB, outside
/// `MAX_MEMORY_BYTES`: ~40 bodies of a Prometheus-sized 2,000-sample batch.
const POOLED_BUFFERS: usize = 64;
const POOLED_BUFFER_BYTES: usize = 1 << 20;
const POOLED_BYTES: usize = 8 << 20;

/// The pool of decompression buffers, with the bounds above.
fn new_pool() -> BufferPool {
    BufferPool::new(POOLED_BUFFERS, POOLED_BUFFER_BYTES, POOLED_BYTES)
}

/// Every `result` label value of the requests counter, created at start so an alert on an
/// increase sees the first one.
pub const RESULTS: &[&str] = &[
    "stored",
    "empty",
    "unauthorized",
    "forbidden",
    "rate_limited",
    "too_large",
    "bad_encoding",
    "bad_snappy",
    "bad_protobuf",
    "bad_series",
    "method",
    "auth_unavailable",
    "store_failed",
    "contended",
];

/// The flags of the endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceiveConfig {
    /// Largest body as sent (snappy-compressed), bytes.
    pub max_bytes: usize,
    /// Largest body after decompression, bytes (from snappy's declared length).
    pub max_decompressed_bytes: usize,
    /// Requests a second per cluster (0: no limit).
    pub rate: f64,
    /// Labels removed from every series.
    pub elide_labels: Vec<String>,
}

/// Where a received request's families are stored.
pub enum Route {
    /// In this server's store.
    Local,
    /// On the cluster id's owner in the ring (here or forwarded).
    Cluster(Arc<Cluster>),
}

/// Why a request was refused: status, counted result, reason, and for 429 the wait.
#[derive(Debug)]
struct Refusal {
    status: u16,
    result: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl From<PlacementError> for Refusal {
    /// An owner's refusal of the content as it answered it, its merge overtaken (the client
    /// retries), or no member able to store it.
    fn from(e: PlacementError) -> Refusal {
        let result = match e {
            PlacementError::Refused { .. } => "too_large",
            PlacementError::Contended => "contended",
            PlacementError::Store(_) | PlacementError::Unavailable => "store_failed",
        };
        Refusal::new(e.status(), result, e.to_string())
    }
}

impl Refusal {
    fn new(status: u16, result: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            result,
            message: message.into(),
            retry_after: None,
        }
    }

    fn rate_limited(wait: Duration) -> Refusal {
        let secs = retry_after_secs(wait);
        Refusal {
            retry_after: Some(secs),
            ..Refusal::new(
                429,
                "rate_limited",
                format!("rate limited (--receive-ratelimit): retry in {secs}s"),
            )
        }
    }

    fn from_authorize(e: AuthorizeError) -> Refusal {
        let status = e.status();
        let message = e.to_string();
        match e {
            AuthorizeError::UnknownToken => Refusal::new(401, "unauthorized", message),
            AuthorizeError::NotAllowed { .. } => Refusal::new(403, "forbidden", message),
            AuthorizeError::RateLimited { retry_after } | AuthorizeError::Busy { retry_after } => {
                Refusal {
                    retry_after: Some(retry_after),
                    ..Refusal::new(status, "auth_unavailable", message)
                }
            }
            _ => Refusal::new(status, "auth_unavailable", message),
        }
    }
}

/// Serves `POST /metrics/v1/receive`.
pub struct ReceiveHandler {
    config: ReceiveConfig,
    auth: Authenticator,
    limiter: Limiter,
    partition_label: String,
    extra_labels: Vec<(String, String)>,
    required_labels: Vec<(String, String)>,
    whitelist: Swap<Vec<Selector>>,
    max_sample_age: Duration,
    max_future_skew: Duration,
    max_series: usize,
    merger: Merger,
    route: Route,
    memory: Gate,
    cpu: Gate,
    buffers: BufferPool,
    requests: CounterVec,
    samples: Counter,
}

/// A request's decompressed body, in a buffer that goes back to the handler's pool when dropped.
struct Body<'a> {
    pool: &'a BufferPool,
    buffer: Vec<u8>,
    len: usize,
}

impl std::ops::Deref for Body<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.buffer.get(..self.len).unwrap_or_default()
    }
}

impl Drop for Body<'_> {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buffer));
    }
}

/// What [`ReceiveHandler::new`] needs besides the flags.
pub struct ReceiveParts {
    /// Checks client tokens (the `/authorize` one, reloaded with it).
    pub authorizer: Arc<dyn ClientAuthorizer>,
    /// Whether `authorizer` is local (tokens file or any-token): checked on the request head.
    pub local_authorizer: bool,
    /// `--partition-label`.
    pub partition_label: String,
    /// `--label`.
    pub extra_labels: Vec<(String, String)>,
    /// `--required-label`.
    pub required_labels: Vec<(String, String)>,
    /// The whitelist, shared with the reloader.
    pub whitelist: Swap<Vec<Selector>>,
    /// `--max-sample-age`.
    pub max_sample_age: Duration,
    /// `--max-future-skew`.
    pub max_future_skew: Duration,
    /// `--max-series`: per request, and per cluster after merging.
    pub max_series: usize,
    /// The store's remote-write merge (the server's one).
    pub merger: Merger,
    /// Local or clustered.
    pub route: Route,
    /// The server's metrics (the counters are registered there).
    pub metrics: Metrics,
}

impl ReceiveHandler {
    /// A handler under `config`.
    pub fn new(config: ReceiveConfig, parts: ReceiveParts) -> ReceiveHandler {
        let requests = parts.metrics.registry.counter(
            "telemeter_server_receive_requests_total",
            "Remote-write requests to /metrics/v1/receive, by result (stored, empty, or the refusal).",
            &["result"],
        );
        for result in RESULTS {
            requests.with(&[result]);
        }
        let samples = parts
            .metrics
            .registry
            .counter(
                "telemeter_server_receive_samples_total",
                "Samples stored from remote-write requests.",
                &[],
            )
            .with(&[]);
        ReceiveHandler {
            limiter: Limiter::new(config.rate),
            config,
            auth: Authenticator::new(parts.authorizer, parts.local_authorizer),
            partition_label: parts.partition_label,
            extra_labels: parts.extra_labels,
            required_labels: parts.required_labels,
            whitelist: parts.whitelist,
            max_sample_age: parts.max_sample_age,
            max_future_skew: parts.max_future_skew,
            max_series: parts.max_series,
            merger: parts.merger,
            route: parts.route,
            memory: Gate::new(MAX_MEMORY_BYTES),
            cpu: Gate::yielding(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                CPU_GATE_YIELD,
            ),
            buffers: new_pool(),
            requests,
            samples,
        }
    }

    /// The body cap as sent.
    pub fn body_limit(&self) -> usize {
        self.config.max_bytes
    }

    /// Decides on the head: a POST whose bearer is not valid (or, with a local authorizer or a
    /// cached answer, not allowed) is refused before its body is read; so is one whose cluster is
    /// over its rate. Other methods pass, to be answered 405.
    pub fn admit(&self, head: &Head, remote: SocketAddr) -> Result<usize, Response> {
        if head.method != "POST" {
            return Ok(self.body_limit());
        }
        let checked = auth::credentials(head.header("Authorization"))
            .map_err(|reason| Refusal::new(401, "unauthorized", reason))
            .and_then(|creds| {
                if let Some(answer) = self.auth.known(&creds, Instant::now()) {
                    answer.map_err(Refusal::from_authorize)?;
                    self.limiter
                        .peek(&creds.cluster_id, Instant::now())
                        .map_err(Refusal::rate_limited)?;
                }
                Ok(creds)
            });
        match checked {
            Ok(_) => Ok(self.body_limit()),
            Err(refusal) => {
                let id = auth::credentials(head.header("Authorization"))
                    .ok()
                    .map(|c| c.cluster_id);
                Err(self.refuse(refusal, id.as_deref(), remote))
            }
        }
    }

    /// Counts and logs a request the front answered 413 (body over `limit` as sent).
    pub fn body_too_large(&self, head: &Head, limit: usize, remote: SocketAddr) {
        if head.method != "POST" {
            return;
        }
        self.requests.with(&["too_large"]).inc();
        let id = auth::credentials(head.header("Authorization"))
            .ok()
            .map(|c| c.cluster_id);
        info!(
            "remote write from {remote} (cluster {:?}) refused: body over {limit} bytes (--receive-max-bytes)",
            id.unwrap_or_default()
        );
    }

    /// Answers one request, on the connection's thread (see `server.rs`'s inline paths).
    pub fn handle(&self, request: &Request) -> Response {
        run_as_batch();
        let mut cluster_id = None;
        match self.accept(request, &mut cluster_id) {
            Ok(result) => {
                self.requests.with(&[result]).inc();
                Response::empty(200)
            }
            Err(refusal) => self.refuse(refusal, cluster_id.as_deref(), request.remote),
        }
    }

    fn refuse(&self, refusal: Refusal, cluster_id: Option<&str>, remote: SocketAddr) -> Response {
        self.requests.with(&[refusal.result]).inc();
        let line = format!(
            "remote write from {remote} (cluster {:?}) refused: {} {}",
            cluster_id.unwrap_or_default(),
            refusal.status,
            refusal.message
        );
        match refusal.status {
            429 => debug!("{line}"),
            500.. => warn!("{line}"),
            _ => info!("{line}"),
        }
        let mut response = Response::text(refusal.status, &refusal.message);
        match refusal.status {
            401 => response = response.with_header("WWW-Authenticate", "Bearer"),
            405 => response = response.with_header("Allow", "POST"),
            _ => {}
        }
        if let Some(secs) = refusal.retry_after {
            response = response.with_header("Retry-After", &secs.to_string());
        }
        response
    }

    fn accept(
        &self,
        request: &Request,
        cluster_id: &mut Option<String>,
    ) -> Result<&'static str, Refusal> {
        if request.method != "POST" {
            return Err(Refusal::new(405, "method", "only POST is allowed"));
        }
        let creds: Credentials = auth::credentials(request.header("Authorization"))
            .map_err(|reason| Refusal::new(401, "unauthorized", reason))?;
        *cluster_id = Some(creds.cluster_id.clone());
        self.auth
            .check(&creds, Instant::now())
            .map_err(Refusal::from_authorize)?;
        self.limiter
            .take(&creds.cluster_id, Instant::now())
            .map_err(Refusal::rate_limited)?;
        check_encoding(request)?;
        let declared = snap::raw::decompress_len(&request.body).map_err(|e| {
            Refusal::new(
                400,
                "bad_snappy",
                format!("body is not snappy block data: {e}"),
            )
        })?;
        if declared > self.config.max_decompressed_bytes {
            return Err(Refusal::new(
                413,
                "too_large",
                format!(
                    "body decompresses to {declared} bytes, more than {} (--receive-max-decompressed-bytes)",
                    self.config.max_decompressed_bytes
                ),
            ));
        }
        let mut memory = self.memory.enter(
            declared
                .saturating_mul(RESERVED_BYTES_PER_BODY_BYTE)
                .saturating_add(64 << 10),
        );
        let now = SystemTime::now();
        let whitelist = self.whitelist.current();
        // Outside the CPU gate, as the raw merge that most often follows it is: behind the gate
        // (two units, 64 senders in the bench) nearly every request waited, yielded or slept
        // and was woken for ~40 µs of decompression, while the merge after it ran ungated.
        let mut body = decompress(&self.buffers, &request.body, declared)?;
        let raw = self.raw_path(&whitelist);
        if let Some(whitelist) = raw {
            let (oldest_ms, newest_ms) = self.sample_bounds(now);
            let rules = RawRules {
                oldest_ms,
                newest_ms,
                max_series: self.max_series,
                whitelist,
            };
            let stored = self
                .merger
                .store_raw(&creds.cluster_id, body, &rules, now)
                .map_err(|e| self.store_refusal(&creds.cluster_id, e))?;
            match stored {
                Raw::Stored(samples) => {
                    self.samples.add(samples as u64);
                    return Ok("stored");
                }
                Raw::Declined(declined) => body = declined,
            }
        }
        let (delta, samples) = {
            let _cpu = self.cpu.enter(1);
            self.prepare(&body, &creds.cluster_id, now, &whitelist)?
        };
        drop(body);
        let Some(delta) = delta else {
            return Ok("empty");
        };
        memory.shrink_to(delta.len().saturating_mul(4));
        self.place(&creds.cluster_id, delta, now, raw)?;
        self.samples.add(samples as u64);
        Ok("stored")
    }

    /// The whitelist, when a request may be merged without converting it ([`merge::store_raw`]):
    /// stored here, nothing shipped (egress ships the converted delta), and the whitelist does
    /// not see labels that `--label` rewrote (it is matched before they are set, so a rewritten
    /// series might not match again). `--required-label` pairs are set before it: it sees them.
    fn raw_path<'w>(&self, whitelist: &'w Arc<Vec<Selector>>) -> Option<&'w Arc<Vec<Selector>>> {
        let local = matches!(self.route, Route::Local) && self.merger.store().backlog().is_none();
        (local && (whitelist.is_empty() || self.extra_labels.is_empty())).then_some(whitelist)
    }

    /// The oldest and newest sample timestamps accepted at `now`, ms.
    fn sample_bounds(&self, now: SystemTime) -> (i64, i64) {
        let now_ms = telemeter_common::time::sample_millis(now);
        (
            now_ms.saturating_sub(telemeter_common::time::duration_millis(self.max_sample_age)),
            now_ms.saturating_add(telemeter_common::time::duration_millis(
                self.max_future_skew,
            )),
        )
    }

    /// Decodes and converts the decompressed body: the delta to store (None when the request
    /// holds no samples: metadata only, or all filtered) and its sample count.
    fn prepare(
        &self,
        body: &[u8],
        cluster_id: &str,
        now: SystemTime,
        whitelist: &[Selector],
    ) -> Result<(Option<Vec<u8>>, usize), Refusal> {
        let (oldest_ms, newest_ms) = self.sample_bounds(now);
        let rules = SeriesRules {
            partition_label: &self.partition_label,
            cluster_id,
            elide: &self.config.elide_labels,
            extra_labels: &self.extra_labels,
            required_labels: &self.required_labels,
            whitelist,
            oldest_ms,
            newest_ms,
            max_series: self.max_series,
            max_samples: self.max_series.saturating_mul(10),
        };
        let converted = series::convert(body, &rules).map_err(|e| Refusal {
            status: e.status,
            result: e.result,
            message: e.message,
            retry_after: None,
        })?;
        if converted.payload.is_empty() {
            return Ok((None, 0));
        }
        Ok((Some(converted.payload), converted.samples))
    }

    fn place(
        &self,
        cluster_id: &str,
        delta: Vec<u8>,
        received: SystemTime,
        converted: Option<&Arc<Vec<Selector>>>,
    ) -> Result<(), Refusal> {
        let started = Instant::now();
        let result = match &self.route {
            Route::Local => self.store_here(cluster_id, delta, received, converted),
            Route::Cluster(cluster) => crate::cluster::placement::place_on_owner(
                cluster,
                cluster_id,
                ForwardKind::Receive,
                delta,
                received,
                |bytes| {
                    self.store_here(cluster_id, bytes, received, None)
                        .map_err(|refusal| {
                            // Refused for its content, or overtaken: the client's answer, not
                            // a reason to try the next member.
                            if refusal.status < 500 || refusal.result == "contended" {
                                NotStoredHere::Answer(refusal)
                            } else {
                                NotStoredHere::Failed(refusal.message)
                            }
                        })
                },
            ),
        };
        debug!(
            "remote write for cluster {cluster_id:?} stored in {:?}",
            started.elapsed()
        );
        result
    }

    fn store_here(
        &self,
        cluster_id: &str,
        delta: Vec<u8>,
        received: SystemTime,
        converted: Option<&Arc<Vec<Selector>>>,
    ) -> Result<(), Refusal> {
        self.merger
            .store_received(cluster_id, delta, received, self.max_series, converted)
            .map_err(|e| self.store_refusal(cluster_id, e))
    }

    fn store_refusal(&self, cluster_id: &str, e: MergeError) -> Refusal {
        match e {
            MergeError::TooManySeries { .. } => Refusal::new(413, "too_large", e.to_string()),
            // Overtaken by other writes of the cluster every time (rare: its first merge against
            // a run of uploads): nothing stored, and Prometheus retries a 5xx.
            MergeError::Store(StoreError::Contended { .. }) => {
                Refusal::new(503, "contended", PlacementError::Contended.to_string())
            }
            MergeError::Store(e) => {
                // Storage paths and OS errors stay in the log.
                warn!("remote write for cluster {cluster_id:?} not stored: {e}");
                Refusal::new(
                    503,
                    "store_failed",
                    "the samples could not be stored now; retry later",
                )
            }
        }
    }
}

/// `compressed` (a snappy block of `declared` bytes, within the cap) decompressed into a buffer
/// of `pool`, which gets it back when the body is dropped. Only the bytes snappy wrote are read:
/// nothing of an earlier request shows.
fn decompress<'p>(
    pool: &'p BufferPool,
    compressed: &[u8],
    declared: usize,
) -> Result<Body<'p>, Refusal> {
    let buffer = pool.take();
    let mut body = Body {
        pool,
        buffer,
        len: 0,
    };
    if body.buffer.len() < declared {
        body.buffer.resize(declared, 0);
    }
    let out = body.buffer.get_mut(..declared).unwrap_or_default();
    body.len = snap::raw::Decoder::new()
        .decompress(compressed, out)
        .map_err(|e| {
            let e = telemeter_common::snappy::SnappyError::Corrupt(e.to_string());
            Refusal::new(
                400,
                "bad_snappy",
                format!("body is not snappy block data: {e}"),
            )
        })?;
    Ok(body)
}

/// Content-Encoding must be snappy (remote write 1.0 has no other); Content-Type, when given,
/// protobuf (a remote-write 2.0 sender gets 415 and, per the spec, falls back to 1.0).
fn check_encoding(request: &Request) -> Result<(), Refusal> {
    match request.header("Content-Encoding").map(str::trim) {
        Some(e) if e.eq_ignore_ascii_case("snappy") => {}
        other => {
            return Err(Refusal::new(
                415,
                "bad_encoding",
                format!(
                    "Content-Encoding must be snappy (remote write 1.0), not {:?}",
                    other.unwrap_or("")
                ),
            ))
        }
    }
    if let Some(content_type) = request.header("Content-Type") {
        let media = content_type.split(';').next().unwrap_or("").trim();
        let proto = content_type
            .split(';')
            .skip(1)
            .filter_map(|p| p.trim().strip_prefix("proto="))
            .next();
        let v1 = proto.is_none_or(|p| p == "prometheus.WriteRequest");
        if !media.eq_ignore_ascii_case("application/x-protobuf") || !v1 {
            return Err(Refusal::new(
                415,
                "bad_encoding",
                format!("Content-Type must be application/x-protobuf (remote write 1.0), not {content_type:?}"),
            ));
        }
    }
    Ok(())
}

/// Stores a remote-write request another server forwarded here (its validated families): merged
/// into the cluster's series like one received here, refused when they would pass `max_series`
/// (`--max-series`) merged. The sender held the request itself to its caps; only the owner
/// knows the merged count, and without this a tenant sending to any other member of the
/// cluster grew its series past the cap without bound.
pub fn store_forwarded(
    merger: &Merger,
    cluster_id: &str,
    delta: Vec<u8>,
    received: SystemTime,
    max_series: usize,
) -> Result<(), MergeError> {
    merger.store_received(cluster_id, delta, received, max_series, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pooled_buffer_shows_only_the_request_it_holds() {
        let pool = new_pool();
        let long: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let short = b"a short body".to_vec();
        for data in [&long, &short, &long] {
            let compressed = telemeter_common::snappy::encode_block(data);
            let declared = snap::raw::decompress_len(&compressed).unwrap();
            let body = decompress(&pool, &compressed, declared).unwrap();
            assert_eq!(&body[..], &data[..]);
            drop(body);
            assert_eq!(pool.kept().0, 1, "given back");
        }
        // Corrupt data: the same answer as before pooling, and the buffer still given back.
        let corrupt = [0x10, 0xff, 0xff, 0xff];
        let declared = snap::raw::decompress_len(&corrupt).unwrap();
        let refusal = decompress(&pool, &corrupt, declared).err().unwrap();
        let expected = telemeter_common::snappy::decode_block(&corrupt, 1 << 20).unwrap_err();
        assert_eq!(refusal.status, 400);
        assert_eq!(refusal.result, "bad_snappy");
        assert_eq!(
            refusal.message,
            format!("body is not snappy block data: {expected}")
        );
        assert_eq!(pool.kept().0, 1);
    }

    #[test]
    fn the_pool_is_bounded_in_buffers_and_bytes() {
        let pool = new_pool();
        let small = telemeter_common::snappy::encode_block(&[7u8; 1000]);
        let bodies: Vec<Body<'_>> = (0..POOLED_BUFFERS + 3)
            .map(|_| decompress(&pool, &small, 1000).unwrap())
            .collect();
        drop(bodies);
        assert_eq!(pool.kept().0, POOLED_BUFFERS);
        let pool = new_pool();
        let big = vec![1u8; POOLED_BUFFER_BYTES + 1];
        let compressed = telemeter_common::snappy::encode_block(&big);
        let body = decompress(&pool, &compressed, big.len()).unwrap();
        assert_eq!(&body[..], &big[..]);
        drop(body);
        assert_eq!(pool.kept().0, 0, "not kept");
        // Buffers of the largest kept size: only as many as fit in the bytes bound.
        let largest = vec![1u8; POOLED_BUFFER_BYTES];
        let compressed = telemeter_common::snappy::encode_block(&largest);
        let bodies: Vec<Body<'_>> = (0..POOLED_BYTES / POOLED_BUFFER_BYTES + 3)
            .map(|_| decompress(&pool, &compressed, largest.len()).unwrap())
            .collect();
        drop(bodies);
        let (buffers, bytes) = pool.kept();
        assert_eq!(buffers, POOLED_BYTES / POOLED_BUFFER_BYTES);
        assert!(bytes <= POOLED_BYTES);
    }
}
