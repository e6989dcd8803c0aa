//! `/upload`: the HTTP mapping of the push pipeline, and the order of its steps (see `ingest`).
//!
//! method → upload token → rate-limit admission → Content-Encoding → Content-Type → decode (with
//! caps before and after decompression) → validate and stamp → reserve the rate-limit slot → place
//! (store durably) → 200. Every refusal is one line of text with a status saying whose fault it is.
//!
//! Status choices: an absent Content-Type is read as protobuf-delimited (what every upstream client
//! sends); an unknown one is 415 (upstream parsed it as text). Too many series or samples is 413,
//! like a body over the byte caps. An upload left empty by the whitelist is answered 200, stores
//! nothing and does not use the cluster's rate-limit slot.
//!
//! What a read costs the sender: an upload that is stored uses the cluster's slot (one per
//! `--ratelimit` window); every other upload that passes the token check (refused as malformed or
//! invalid, left empty by the whitelist, an empty body, or not stored for want of a store: 503)
//! costs one of
//! [`REFUSALS_PER_WINDOW`] refusals per window instead, paid before the body is read (see
//! [`crate::ingest::ratelimit`]). A separate budget rather than the slot, so that one refused upload does
//! not cost a client a whole window (it can fix and retry at once), and an empty upload does not
//! delay the next real one. Over either: 429 with `Retry-After` before anything is read, so one
//! token makes the server read at most `1 + REFUSALS_PER_WINDOW` uploads per window. Clients that
//! send empty uploads (upstream ones may, and a whitelist can empty any upload) are never locked
//! out: an empty upload costs one refusal, refusals come back with time alone (one every window /
//! [`REFUSALS_PER_WINDOW`], whether or not anything is stored meanwhile), and a 429 costs nothing,
//! so retrying never pushes the next turn further away.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use log::{debug, info, warn};
use telemeter_common::delimited;
use telemeter_common::http::{Admission, Defer, Head, Note, Request, Response};
use telemeter_common::token::{CachedTokenError, TokenSigner, VerifiedTokens};

use crate::authorize::{bearer_in, check_cluster_id, unauthorized};
use crate::buffers::BufferPool;
use crate::ingest::backfill::{BackfillBudget, BACKFILLS_PER_WINDOW};
use crate::ingest::decode::{self, Decoded, Rejection};
use crate::ingest::gate::{run_as_batch, Gate, OwnedPermit, CPU_GATE_YIELD};
use crate::ingest::placement::{Placement, PlacementError};
use crate::ingest::ratelimit::{
    retry_after_secs, Decode, RateLimiter, Slot, Wait, REFUSALS_PER_WINDOW,
};
use crate::ingest::validate::Rules;
use crate::metrics::Metrics;

/// Memory an upload reserves per byte of its decompressed body before it is decompressed: the
/// body itself, the structs the owned path may decode it into, and the payload re-encoded from
/// them. A label pair of one-character name and value is 9 bytes on the wire and up to 160 in
/// memory (its slot in a vector that grows by doubling, and two heap strings of glibc's smallest
/// chunk), so valid uploads stay within 20×; hostile ones (runs of empty elements) are refused by
/// their counts before they are decoded.
const RESERVED_BYTES_PER_BODY_BYTE: usize = 24;

/// What every upload reserves besides its per-byte share: its small buffers and structs.
const RESERVED_BYTES_PER_UPLOAD: usize = 64 << 10;

/// What a client hears when its upload could not be stored (503).
const STORE_FAILED: &str = "the upload could not be stored now; retry later";

/// Byte and count caps on one upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadLimits {
    /// Largest body as sent.
    pub max_upload_bytes: usize,
    /// Largest body after decompression.
    pub max_decompressed_bytes: usize,
    /// Most series.
    pub max_series: usize,
}

/// The request header that marks an upload as sent late (from a client's spool): it is counted
/// against the backfill budget instead of the fresh-push rate limit.
pub const BACKFILL_HEADER: &str = "X-Telemeter-Backfill";

fn is_backfill(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim() == "1")
}

/// Upload tokens kept verified (see [`VerifiedTokens`] for why that is safe and how it is
/// bounded): one per cluster pushing, and a client keeps its token for its lifetime. A miss costs
/// only the ~4 µs of a verification, which matters only at hundreds of uploads a second, so
/// clusters beyond this many simply verify. Memory: a key of at most 1 KiB and an [`Admitted`]
/// made from at most that much of claims (every label string a heap chunk of ~32 bytes and a map
/// slot of ~48 at worst: under 11 KiB): under 11 MB at worst, ~0.5 MB for the usual ~300-byte
/// token with a few labels.
const VERIFIED_TOKENS: usize = 1024;

/// What an upload token that verified says for `/upload`: its cluster, and the labels every
/// series of the upload is stamped with (the token's, and the partition label naming the
/// cluster). Made once per token and shared by every upload sending it.
pub struct Admitted {
    cluster_id: String,
    labels: BTreeMap<String, String>,
}

/// Serves `/upload`.
pub struct UploadHandler {
    tokens: VerifiedTokens<Admitted>,
    partition_label: String,
    limits: UploadLimits,
    rules: Rules,
    limiter: Arc<RateLimiter>,
    backfill: BackfillBudget,
    placement: Arc<dyn Placement>,
    metrics: Metrics,
    cpu: Gate,
    memory: Arc<Gate>,
    /// Decompressed bodies kept for the next uploads (see [`BODY_BUFFERS`]).
    bodies: BufferPool,
    /// Throttles the log lines of 429s.
    rate_limited_log: LogThrottle,
}

/// Bytes that uploads may hold at once past the HTTP front (their decompressed bodies, what they
/// are decoded into, and their payloads until stored). Each upload reserves its share before it
/// is decompressed, from the length its snappy frames declare, and keeps it until the store has
/// answered: so however many workers there are, uploads hold at most this much besides their
/// bodies as sent (the front's own cap). One upload larger than this still runs, alone.
pub const MAX_UPLOAD_MEMORY_BYTES: usize = 256 << 20;

/// Decompression buffers kept for the next uploads: an upload stored packed (the store keeps only
/// its frames) hands its decompressed body's buffer back, so the next one decompresses into it
/// instead of allocating and zeroing ~51 KB (with the heap top trimmed after each free, its
/// pages faulted in again too): ~4 µs an upload. Bounded whoever sends what: at most this many
/// buffers, none over [`BODY_BUFFER_BYTES`] of capacity (a larger upload's is freed), at most
/// [`BODY_BUFFERS_BYTES`] in all; a buffer is taken only while an upload is decompressed and
/// stored, so what is kept is at most what that many concurrent uploads held anyway.
const BODY_BUFFERS: usize = 64;
/// The largest decompression buffer kept ([`BODY_BUFFERS`]).
const BODY_BUFFER_BYTES: usize = 256 << 10;
/// The capacity all kept decompression buffers may have in all ([`BODY_BUFFERS`]).
const BODY_BUFFERS_BYTES: usize = 8 << 20;

/// At most one log line a second for a kind of event that can come at line rate.
#[derive(Default)]
struct LogThrottle {
    /// The second (since `started`) of the last line, plus one; 0 before the first.
    last: std::sync::atomic::AtomicU64,
    /// Events not logged since the last line.
    suppressed: std::sync::atomic::AtomicU64,
    started: std::sync::OnceLock<Instant>,
}

impl LogThrottle {
    /// `Some(events not logged since the last line)` when this one should be logged.
    fn admit(&self, now: Instant) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let started = *self.started.get_or_init(|| now);
        let second = now.saturating_duration_since(started).as_secs() + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != second
            && self
                .last
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// A refused upload: status, one-line message, and for 429 the seconds to wait.
struct Refusal {
    status: u16,
    message: String,
    retry_after: Option<u64>,
}

impl From<Rejection> for Refusal {
    fn from(rejection: Rejection) -> Refusal {
        Refusal::new(rejection.status, rejection.message)
    }
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn rate_limited(wait: std::time::Duration) -> Refusal {
        let secs = retry_after_secs(wait);
        Refusal {
            status: 429,
            message: format!("rate limited: next upload accepted in {secs}s"),
            retry_after: Some(secs),
        }
    }

    fn backfill_spent(wait: std::time::Duration) -> Refusal {
        let secs = retry_after_secs(wait);
        Refusal {
            status: 429,
            message: format!(
                "rate limited: {BACKFILLS_PER_WINDOW} backfilled uploads of this cluster within the window; next one read in {secs}s"
            ),
            retry_after: Some(secs),
        }
    }

    fn not_admitted(wait: Wait) -> Refusal {
        match wait {
            Wait::Slot(wait) => Refusal::rate_limited(wait),
            Wait::Refusals(wait) => {
                let secs = retry_after_secs(wait);
                Refusal {
                    status: 429,
                    message: format!(
                        "rate limited: {REFUSALS_PER_WINDOW} uploads of this cluster were refused or empty within the window; next upload read in {secs}s"
                    ),
                    retry_after: Some(secs),
                }
            }
        }
    }
}

/// An upload ready to store.
struct Prepared {
    /// The protobuf-delimited families to store; `None` when the whitelist left nothing.
    payload: Option<Vec<u8>>,
    /// The body as it arrived (snappy framed), when `payload` is exactly what it decompressed
    /// to: the store journals these bytes instead.
    frames: Option<Vec<u8>>,
    /// Series kept.
    series: usize,
    /// Series dropped by the whitelist.
    filtered: usize,
    /// `payload`'s newest sample when the wire check read it (the body is stored unchanged);
    /// `None` on the owned path, where the store reads it from the payload.
    newest_sample_ms: Option<i64>,
}

/// What an accepted upload did.
enum Accepted {
    Stored,
    Empty,
}

/// What an upload stores, and what it holds until the store has answered.
struct ToStore {
    payload: Vec<u8>,
    frames: Option<Vec<u8>>,
    /// As [`Prepared::newest_sample_ms`]: `Some` when stored as it came.
    newest_sample_ms: Option<i64>,
    now: SystemTime,
    held: Held,
}

/// What an upload holds until the store has answered (see [`UploadHandler::stored`]).
struct Held {
    /// Its memory reservation, down to its payload and frames.
    memory: OwnedPermit,
    /// Its cluster's rate-limit slot (none for a backfill).
    slot: Option<Slot>,
    /// The refusal its read was charged (none for a backfill).
    read: Option<Decode>,
    series: usize,
    admitted: Arc<Admitted>,
}

impl UploadHandler {
    /// A handler verifying tokens with `signer`, enforcing `limits` and `rules`, one stored upload
    /// per cluster per `limiter` window (shared with the status page, which shows it), storing
    /// through `placement`.
    pub fn new(
        signer: TokenSigner,
        partition_label: &str,
        limits: UploadLimits,
        rules: Rules,
        limiter: Arc<RateLimiter>,
        placement: Arc<dyn Placement>,
        metrics: Metrics,
    ) -> UploadHandler {
        UploadHandler {
            tokens: VerifiedTokens::new(signer, VERIFIED_TOKENS),
            partition_label: partition_label.to_string(),
            limits,
            rules,
            backfill: BackfillBudget::new(limiter.window()),
            limiter,
            placement,
            metrics,
            cpu: Gate::yielding(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                CPU_GATE_YIELD,
            ),
            rate_limited_log: LogThrottle::default(),
            memory: Arc::new(Gate::new(MAX_UPLOAD_MEMORY_BYTES)),
            bodies: BufferPool::new(BODY_BUFFERS, BODY_BUFFER_BYTES, BODY_BUFFERS_BYTES),
        }
    }

    /// The body cap the HTTP front enforces before reading an upload.
    pub fn body_limit(&self) -> usize {
        self.limits.max_upload_bytes
    }

    /// Checks an `/upload` head before any of its body is read: a POST without a valid upload
    /// token is refused (401) here, so a peer without one holds no body memory and no worker; and
    /// one whose cluster would be rate limited gets its 429 here too, so a refused sender's bodies
    /// are not even read. The body cap when it passes. Other methods pass, to be answered 405 by
    /// [`UploadHandler::handle`].
    pub fn admit(&self, head: &Head, remote: SocketAddr) -> Result<Admission, Response> {
        if head.method == "POST" {
            let authorization = head.header("Authorization");
            let admitted = self
                .authenticate(authorization, SystemTime::now())
                .and_then(|admitted| {
                    if is_backfill(head.header(BACKFILL_HEADER)) {
                        self.backfill
                            .peek(&admitted.cluster_id, Instant::now())
                            .map_err(Refusal::backfill_spent)?;
                    } else {
                        self.limiter
                            .peek(&admitted.cluster_id, Instant::now())
                            .map_err(Refusal::not_admitted)?;
                    }
                    Ok(admitted)
                });
            return match admitted {
                // Carried to `accept` with the request, so the token is verified once.
                Ok(admitted) => Ok(Admission {
                    body_limit: self.body_limit(),
                    note: Some(Note::shared(admitted)),
                }),
                Err(refusal) => {
                    self.metrics.upload("rejected", refusal.status);
                    if refusal.status == 429 {
                        self.metrics.ratelimited.inc();
                    }
                    Err(self.refuse(refusal, remote))
                }
            };
        }
        Ok(self.body_limit().into())
    }

    /// Counts and logs an upload the HTTP front answered `413` because its body was over
    /// `limit` bytes as sent: this handler never sees that request.
    pub fn body_too_large(&self, head: &Head, limit: usize, remote: SocketAddr) {
        if head.method != "POST" {
            return;
        }
        self.metrics.upload("rejected", 413);
        info!("upload from {remote} refused: body over {limit} bytes (--max-upload-bytes)");
    }

    /// Answers one `/upload` request.
    pub fn handle(&self, mut request: Request) -> Response {
        run_as_batch();
        self.metrics.upload_bytes.add(request.body.len() as u64);
        let accepted = self.ready(&mut request).and_then(|ready| self.store(ready));
        self.respond(accepted, request.remote)
    }

    /// [`UploadHandler::handle`], answering through `later` where the store's commit ends
    /// rather than here: an upload stored as it came (the usual one) is handed to the store and
    /// this returns `None` at once, so the connection's thread goes back to reading the next
    /// request instead of sleeping until the commit and being woken for the answer (one
    /// wake-up less an upload). Everything else is answered here, as `handle` does (`Some`).
    pub fn handle_later(
        self: &Arc<Self>,
        mut request: Request,
        defer: Defer<'_>,
    ) -> Option<Response> {
        run_as_batch();
        self.metrics.upload_bytes.add(request.body.len() as u64);
        let (ready, newest_sample_ms) = match self.ready(&mut request) {
            Ok(Some(
                upload @ ToStore {
                    newest_sample_ms: Some(newest_sample_ms),
                    ..
                },
            )) => (upload, newest_sample_ms),
            ready => {
                let accepted = ready.and_then(|ready| self.store(ready));
                return Some(self.respond(accepted, request.remote));
            }
        };
        let ToStore {
            mut payload,
            frames,
            now,
            held,
            ..
        } = ready;
        let later = defer.later();
        let handler = self.clone();
        let remote = request.remote;
        let started = Instant::now();
        // A handle on the admission, not a copy of its id: `held` moves into the answer.
        let admitted = held.admitted.clone();
        self.placement.place_unchanged_then(
            &admitted.cluster_id,
            &mut payload,
            frames,
            newest_sample_ms,
            now,
            Box::new(move |stored| {
                let accepted = handler.stored(held, stored, started);
                later.send(handler.respond(accepted, remote));
            }),
        );
        // Lent: a body stored packed comes back, for the next upload to decompress into.
        self.bodies.give(payload);
        None
    }

    /// The response to an upload, counted in the metrics.
    fn respond(&self, accepted: Result<Accepted, Refusal>, remote: SocketAddr) -> Response {
        match accepted {
            Ok(Accepted::Stored) => {
                self.metrics.upload("stored", 200);
                Response::empty(200)
            }
            Ok(Accepted::Empty) => {
                self.metrics.upload("empty", 200);
                Response::empty(200)
            }
            Err(refusal) => {
                let result = if refusal.status >= 500 {
                    "failed"
                } else {
                    "rejected"
                };
                self.metrics.upload(result, refusal.status);
                if refusal.status == 429 {
                    self.metrics.ratelimited.inc();
                }
                self.refuse(refusal, remote)
            }
        }
    }

    /// The response of a refusal.
    fn refuse(&self, refusal: Refusal, remote: SocketAddr) -> Response {
        let mut response = if refusal.status == 401 {
            // A failed token check is worth a line: it may be an attack or a misconfigured client.
            info!("upload from {remote} refused: {}", refusal.message);
            unauthorized(&refusal.message)
        } else if refusal.status == 429 {
            // Worth a line too (a client pushing faster than --ratelimit is misconfigured), but a
            // client retrying in a loop gets its 429s from the head alone, at line rate: at most
            // one line a second, saying how many were not logged.
            if let Some(suppressed) = self.rate_limited_log.admit(Instant::now()) {
                let more = if suppressed > 0 {
                    format!(" ({suppressed} more 429s not logged since the last line)")
                } else {
                    String::new()
                };
                info!("upload from {remote} refused: {}{more}", refusal.message);
            }
            Response::text(refusal.status, &refusal.message)
        } else {
            Response::text(refusal.status, &refusal.message)
        };
        if let Some(secs) = refusal.retry_after {
            response = response.with_header("Retry-After", &secs.to_string());
        }
        if refusal.status == 405 {
            response = response.with_header("Allow", "POST");
        }
        response
    }

    /// What the upload token in `authorization` (an `Authorization` header value) admits: a
    /// cluster id that can be used, and the labels to stamp. From the cache of verified tokens
    /// when the token verified before and is still valid at `now`.
    fn authenticate(
        &self,
        authorization: Option<&str>,
        now: SystemTime,
    ) -> Result<Arc<Admitted>, Refusal> {
        let token = bearer_in(authorization).map_err(|reason| Refusal::new(401, reason))?;
        self.tokens
            .verify(token, now, |claims| {
                if check_cluster_id(&claims.cluster_id).is_err() {
                    return Err(Refusal::new(
                        401,
                        "Not authorized: the token names no valid cluster",
                    ));
                }
                let mut labels = claims.labels;
                labels.insert(self.partition_label.clone(), claims.cluster_id.clone());
                Ok(Admitted {
                    cluster_id: claims.cluster_id,
                    labels,
                })
            })
            .map_err(|e| match e {
                CachedTokenError::Token(e) => Refusal::new(401, format!("Not authorized: {e}")),
                CachedTokenError::Refused(refusal) => refusal,
            })
    }

    /// Everything of an upload up to storing it: admission, decode, validation, the slot;
    /// `None` when the whitelist left nothing to store. A snappy body stored unchanged is taken
    /// from `request` as its frames (its body is left empty).
    fn ready(&self, request: &mut Request) -> Result<Option<ToStore>, Refusal> {
        if request.method != "POST" {
            return Err(Refusal::new(405, "only POST is allowed"));
        }
        let now = SystemTime::now();
        // Verified when the head was admitted; a request that was not (a test, a caller other
        // than the front) verifies its own.
        let admitted = request
            .admitted
            .as_ref()
            .and_then(Note::get_shared::<Admitted>);
        let admitted = match admitted {
            Some(admitted) => admitted,
            None => self.authenticate(request.header("Authorization"), now)?,
        };
        let cluster_id = admitted.cluster_id.as_str();
        // A backfill pays its own budget up front, whatever becomes of it (see `backfill`).
        let backfill = is_backfill(request.header(BACKFILL_HEADER));
        // Paid for before the body costs any decoding: a read that does not end stored costs a
        // refusal from the cluster's budget, one that does gives it back for the slot.
        let read = if backfill {
            self.backfill
                .take(cluster_id, Instant::now())
                .map_err(Refusal::backfill_spent)?;
            None
        } else {
            Some(
                self.limiter
                    .admit(cluster_id, Instant::now())
                    .map_err(Refusal::not_admitted)?,
            )
        };

        let token_labels = &admitted.labels;
        let decompressed = decode::decompressed_len(request, &self.limits)?;
        let mut memory = self.memory.enter(
            decompressed
                .saturating_mul(RESERVED_BYTES_PER_BODY_BYTE)
                .saturating_add(RESERVED_BYTES_PER_UPLOAD),
        );
        let prepared = {
            let _cpu = self.cpu.enter(1);
            self.prepare(request, token_labels, now, memory.units())
        }
        .inspect_err(|refusal| {
            info!(
                "upload from cluster {cluster_id:?} refused: {}",
                refusal.message
            );
        })?;
        self.metrics.filtered_series.add(prepared.filtered as u64);
        let Some(payload) = prepared.payload else {
            debug!("upload from cluster {cluster_id:?} is empty after filtering");
            return Ok(None);
        };

        let slot = if backfill {
            None
        } else {
            Some(
                self.limiter
                    .try_acquire(cluster_id, Instant::now())
                    .map_err(Refusal::rate_limited)?,
            )
        };
        // Only the payload (and its frames) is held from here until the store answers.
        let frames = prepared.frames;
        memory.shrink_to(payload.len() + frames.as_ref().map_or(0, Vec::len));
        Ok(Some(ToStore {
            payload,
            frames,
            newest_sample_ms: prepared.newest_sample_ms,
            now,
            held: Held {
                memory: memory.into_owned(&self.memory),
                slot,
                read,
                series: prepared.series,
                admitted,
            },
        }))
    }

    /// Stores an upload made ready, here, waiting for the store.
    fn store(&self, ready: Option<ToStore>) -> Result<Accepted, Refusal> {
        let ToStore {
            mut payload,
            frames,
            newest_sample_ms,
            now,
            held,
        } = match ready {
            None => return Ok(Accepted::Empty),
            Some(upload) => upload,
        };
        let cluster_id = held.admitted.cluster_id.as_str();
        let started = Instant::now();
        let stored = match newest_sample_ms {
            Some(newest_sample_ms) => {
                // Lent: a body stored packed comes back, for the next upload to decompress into.
                let stored = self.placement.place_unchanged_lent(
                    cluster_id,
                    &mut payload,
                    frames,
                    newest_sample_ms,
                    now,
                );
                self.bodies.give(payload);
                stored
            }
            None => self.placement.place(cluster_id, payload, now),
        };
        self.stored(held, stored, started)
    }

    /// What the store's answer makes of an upload: the slot kept and the refusal given back
    /// when it was stored, both let go otherwise; what it held is let go either way.
    fn stored(
        &self,
        held: Held,
        stored: Result<(), PlacementError>,
        started: Instant,
    ) -> Result<Accepted, Refusal> {
        self.metrics.store_write(started.elapsed().as_secs_f64());
        let Held {
            memory,
            slot,
            read,
            series,
            admitted,
        } = held;
        drop(memory);
        let cluster_id = admitted.cluster_id.as_str();
        if let Err(e) = stored {
            // The slot is dropped unused: the client may retry at once.
            warn!("upload from cluster {cluster_id:?} not stored: {e}");
            // A store error names storage paths and OS errors: that stays in the log, the client
            // is on the other side of the security boundary.
            let message = match &e {
                PlacementError::Store(_) => STORE_FAILED.to_string(),
                PlacementError::Unavailable
                | PlacementError::Refused { .. }
                | PlacementError::Contended => e.to_string(),
            };
            return Err(Refusal::new(e.status(), message));
        }
        if let Some(slot) = slot {
            slot.commit();
        }
        if let Some(read) = read {
            read.stored();
        }
        self.metrics.upload_series.add(series as u64);
        debug!("stored {series} series for cluster {cluster_id:?}");
        Ok(Accepted::Stored)
    }

    /// The CPU part of an upload: decompress, decode, validate, stamp, encode what is stored,
    /// within `memory` bytes (what the upload reserved); the frames of a body stored unchanged
    /// are taken from `request`.
    fn prepare(
        &self,
        request: &mut Request,
        token_labels: &BTreeMap<String, String>,
        now: SystemTime,
        memory: usize,
    ) -> Result<Prepared, Refusal> {
        let mut spare = self.bodies.take();
        let decoded = decode::decode_into(
            request,
            &self.limits,
            &self.rules,
            token_labels,
            now,
            memory,
            &mut spare,
        );
        // Still here when the body was not snappy: kept for the next upload.
        self.bodies.give(spare);
        let families = match decoded? {
            Decoded::Families(families) => families,
            Decoded::Unchanged {
                body,
                frames,
                series,
                newest_sample_ms,
            } => {
                return Ok(Prepared {
                    payload: Some(body),
                    frames,
                    series,
                    filtered: 0,
                    newest_sample_ms: Some(newest_sample_ms),
                })
            }
        };
        let validated = self
            .rules
            .apply(families, token_labels, now)
            .map_err(|e| Refusal::new(e.status(), e.to_string()))?;
        let payload = if validated.families.is_empty() {
            None
        } else {
            Some(delimited::encode(&validated.families))
        };
        Ok(Prepared {
            payload,
            frames: None,
            series: validated.series,
            filtered: validated.filtered,
            newest_sample_ms: None,
        })
    }
}

#[cfg(test)]
mod tests;
