//! Merging a remote-write request's samples into what a cluster has stored.
//!
//! A remote-write request carries some of a cluster's series (a shard's batch), so storing it
//! would erase the others from `/federate`: it is merged instead. Series are identified by family
//! name and label set (order-independent); the newer sample wins; a Prometheus staleness marker
//! newer than the stored sample removes the series (Prometheus sends one when a series ends);
//! series whose sample is older than the TTL are dropped, so a cluster's payload does not grow
//! with every series it ever sent.
//!
//! Read, merge and put of one cluster run under one of the [`Merger`]'s stripe locks chosen by
//! its id, so two requests of a cluster cannot both read the same payload and each write back only
//! their own series. Striped (not one lock per cluster) so the locks take fixed memory whatever
//! the number of cluster ids; two clusters sharing a stripe only wait for each other's merge.
//!
//! The [`Merger`] (stripes and the merge cache, [`super::cache`]) is built once per store by the
//! server's wiring and handed to whatever stores pushes (the receive handler, the placements,
//! the forward endpoint, `import`). Whether a cluster uses remote write at all is the store's to
//! answer ([`Store::newest_received`], from its index), so an upload of a cluster that never did
//! takes none of the merger's locks. Since such an upload and a cluster's first merge do not
//! wait for each other, the store checks both where it commits: a merge is stored only over the
//! payload it read (else it is made again over what is stored now), an upload as sent only while
//! its cluster has no remote-write series (else it is handed back and merged). Whichever
//! commits second is merged into the other.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, int32, WireType};
use prost::Message;
use telemeter_common::delimited::{DecodeError, Limits};
use telemeter_common::model::{Counter, Gauge, LabelPair, Metric, MetricType, Untyped};
use telemeter_common::selector::Selector;
use telemeter_common::wire::{self, MetricView, Value};

use super::cache::{Cache, CachedCluster, RawRules};
use crate::ingest::placement::store_merged;
use crate::store::{Committed, Ship, Store, StoreError};

/// Locks around read-merge-put, chosen by cluster id. A lock is held through the store's commit
/// (an fdatasync), so two clusters on one stripe wait for each other's: with 64 stripes, 64
/// senders of different clusters met on one most of the time (a futex sleep and wake-up each).
/// 1,024 take 4 KiB, whatever the number of cluster ids.
const STRIPE_COUNT: usize = 1024;

/// Attempts of one merge when its cluster's stored payload keeps changing under it. Each needs a
/// put of another path of the same cluster between the merge's read and its commit; once the
/// first merge of a cluster is stored, its uploads are merged too (under the same lock).
const MERGE_ATTEMPTS: usize = 8;

/// The bit pattern Prometheus writes as a staleness marker (`value.StaleNaN`).
const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// Whether `value` is Prometheus's staleness marker.
pub fn is_stale_marker(value: f64) -> bool {
    value.to_bits() == STALE_NAN_BITS
}

/// The help text of every family remote write builds. It is what makes "this cluster has
/// remote-write series" readable from a payload alone: it travels in the stored payload (journal,
/// checkpoint, handoff to another owner) and disappears with the last such series when the TTL
/// drops it, so a store or a peer that did not record the marker beside the payload learns it
/// from the payload itself ([`crate::store::newest_received_in`]).
pub use crate::store::REMOTE_WRITE_HELP;

/// Whether `cluster_id` has remote-write series within the TTL: then its uploads are merged
/// into its series (like remote write) rather than replacing them. Asks the store's index (no
/// payload read, but once for a cluster last written before the store recorded the marker) and
/// takes no lock of the merger's.
pub fn uses_remote_write(store: &Store, cluster_id: &str, now: SystemTime) -> bool {
    let now = telemeter_common::time::unix_millis(now);
    match store.newest_received(cluster_id) {
        // The store's rule: it checks it again where the upload is committed.
        Ok(newest) => {
            newest.is_some_and(|newest| crate::store::is_recent(newest, now, store.ttl()))
        }
        // Unreadable now: stored as sent; asked again next time.
        Err(_) => false,
    }
}

/// The remote-write merge of one store: its stripe locks and its cache. Cheap to clone; clones
/// share both. Built once by the server's wiring, so two stores (tests open several in one
/// process) never share state.
#[derive(Clone)]
pub struct Merger {
    store: Store,
    shared: Arc<Shared>,
    /// The most series a cluster holds once an upload is merged into its remote-write series
    /// ([`Merger::store_accepted`]).
    max_series: usize,
}

/// What clones of a [`Merger`] share.
struct Shared {
    stripes: [Mutex<()>; STRIPE_COUNT],
    cache: Cache,
    /// Locks of this merger's taken (stripes and cache), for tests that show a path takes none.
    #[cfg(test)]
    locks_taken: std::sync::atomic::AtomicU64,
}

impl Merger {
    /// The merge of `store`'s remote-write series, with an empty cache, and no cap on the series
    /// an upload merges into ([`Merger::with_max_series`]).
    pub fn new(store: Store) -> Merger {
        Merger {
            store,
            max_series: usize::MAX,
            shared: Arc::new(Shared {
                stripes: [const { Mutex::new(()) }; STRIPE_COUNT],
                cache: Cache::new(),
                #[cfg(test)]
                locks_taken: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// This merger, refusing an upload merged into a cluster's remote-write series when the
    /// cluster would then hold more than `max_series` (`--max-series`, which caps what remote
    /// write merges too): else a tenant mixing both paths grows its payload past it.
    pub fn with_max_series(mut self, max_series: usize) -> Merger {
        self.max_series = max_series;
        self
    }

    /// The store it merges into.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether `cluster_id` is cached now, as a copy of what the store holds (for tests and the
    /// debug log).
    pub fn is_cached(&self, cluster_id: &str) -> bool {
        let version = self.store.version(cluster_id);
        self.count_lock();
        self.shared.cache.is_cached(cluster_id, version)
    }

    /// How many of its locks were taken so far.
    #[cfg(test)]
    pub fn locks_taken(&self) -> u64 {
        self.shared
            .locks_taken
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_lock(&self) {
        #[cfg(test)]
        self.shared
            .locks_taken
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The stripe lock of `cluster_id`, taken.
    fn stripe(&self, cluster_id: &str) -> MutexGuard<'_, ()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        cluster_id.hash(&mut hasher);
        self.count_lock();
        telemeter_common::sync::lock(
            &self.shared.stripes[(hasher.finish() as usize) % STRIPE_COUNT],
        )
    }

    /// `cluster_id`'s cached entry, if it is still a copy of what the store holds, and the
    /// store's version it copies.
    fn cached(&self, cluster_id: &str) -> Option<(CachedCluster, u64)> {
        // Taken out even when the store has no entry (removed, swept): a stale copy is dropped.
        let version = self.store.version(cluster_id);
        self.count_lock();
        let entry = self.shared.cache.take(cluster_id, version)?;
        Some((entry, version?))
    }

    /// What the store journals to ship for a merge whose payload is `merged`: copied only where
    /// there is egress (without, nothing shipped is journaled).
    fn ship(&self, shipping: Shipping<'_>, merged: &[u8]) -> Ship {
        match (self.store.is_shipping(), shipping) {
            (false, _) | (true, Shipping::Nothing) => Ship::Nothing,
            (true, Shipping::Delta(delta)) => Ship::Payload(delta.to_vec()),
            (true, Shipping::Merged) => Ship::Payload(merged.to_vec()),
        }
    }

    /// Stores `entry`'s payload (with its newest remote-write sample), made over the stored
    /// payload of version `base`, and ships what `shipping` says; caches `entry`
    /// as what the store now holds, unless a later put replaced it in the same commit. When the
    /// stored payload is no longer that of `base` ([`Committed::Moved`]) nothing is stored and
    /// `entry` is handed back.
    fn store_and_keep(
        &self,
        cluster_id: &str,
        mut entry: CachedCluster,
        shipping: Shipping<'_>,
        received: SystemTime,
        base: Option<u64>,
    ) -> Result<Option<CachedCluster>, StoreError> {
        let ship = self.ship(shipping, entry.payload());
        // Merged in place: the store may journal only what changed (the delta is shipped in the
        // same batch, as `store_merged` does).
        let committed = match entry.take_patch() {
            Some(patch) => {
                let newest_sample = entry.newest_sample().unwrap_or_else(|| {
                    i64::try_from(telemeter_common::time::unix_millis(received)).unwrap_or(i64::MAX)
                });
                self.store.put_patched(
                    cluster_id,
                    patch,
                    || entry.payload().to_vec(),
                    ship,
                    received,
                    newest_sample,
                    entry.newest_received(),
                )?
            }
            None => store_merged(
                &self.store,
                cluster_id,
                entry.payload().to_vec(),
                ship,
                received,
                entry.newest_received(),
                base,
            )?,
        };
        match committed {
            Committed::Current(version) => {
                self.count_lock();
                self.shared.cache.keep(cluster_id, entry, version);
                Ok(None)
            }
            Committed::Superseded => Ok(None),
            Committed::Moved => Ok(Some(entry)),
        }
    }

    /// Merges `delta` (validated families, protobuf-delimited) into `cluster_id`'s stored payload
    /// and stores the result durably, then ships `delta` (only the request's samples: re-shipping
    /// stored ones would make the receiver refuse them as out of order). Refused when the merged
    /// series would pass `max_series`. `converted` is the whitelist `delta` was converted under
    /// when this process converted it from a request of `cluster_id` (then its series are marked
    /// for [`Merger::store_raw`]).
    pub fn store_received(
        &self,
        cluster_id: &str,
        delta: Vec<u8>,
        received: SystemTime,
        max_series: usize,
        converted: Option<&Arc<Vec<Selector>>>,
    ) -> Result<(), MergeError> {
        self.merge(
            cluster_id,
            delta,
            received,
            converted,
            Source::Received,
            |series| match series > max_series {
                true => Err(MergeError::TooManySeries { limit: max_series }),
                false => Ok(()),
            },
        )
        .map_err(MergeError::from)
    }

    /// As [`Merger::store_received`] for an upload (validated families of a cluster that
    /// [`uses_remote_write`]) that this server, or a peer that forwarded it, accepted: merged
    /// into the cluster's series, within this merger's cap on them ([`Merger::with_max_series`]).
    pub fn store_accepted(
        &self,
        cluster_id: &str,
        upload: Vec<u8>,
        received: SystemTime,
    ) -> Result<(), MergeError> {
        self.store_received(cluster_id, upload, received, self.max_series, None)
    }

    /// Merges `payload`, a cluster's series handed off by the member that stored them before (its
    /// owner until the ring changed), with `cluster_id`'s stored series: per series the newer
    /// sample wins, so neither the requests merged here since nor what the handoff carries is
    /// lost ([`Source::HandedOff`] says how it differs from a request's merge). Not held to
    /// `--max-series`: each side was accepted within it, and a handoff refused would be lost
    /// with its member's copy at the TTL. A cluster it takes past the cap still takes requests
    /// that do not grow its count of series: the cap bounds the count, not the samples.
    pub fn store_handed_off(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<(), StoreError> {
        self.merge(
            cluster_id,
            payload,
            received,
            None,
            Source::HandedOff,
            |_| Ok::<(), std::convert::Infallible>(()),
        )
        .map_err(|e| match e {
            Capped::Store(e) => e,
            Capped::Refused(never) => match never {},
        })
    }

    /// The merge itself: `admit` sees the merged series count before anything that adds series is
    /// stored (a merge in place adds none); `source` says what `delta` is. Made again over what
    /// is stored when a put of another path (an upload that found no remote-write series, a
    /// handoff) committed between the read and the commit: a merge never erases what another
    /// path stored.
    fn merge<E>(
        &self,
        cluster_id: &str,
        mut delta: Vec<u8>,
        received: SystemTime,
        converted: Option<&Arc<Vec<Selector>>>,
        source: Source,
        admit: impl Fn(usize) -> Result<(), E>,
    ) -> Result<(), Capped<E>> {
        let _stripe = self.stripe(cluster_id);
        for _ in 0..MERGE_ATTEMPTS {
            if self.merge_once(cluster_id, &mut delta, received, converted, source, &admit)? {
                return Ok(());
            }
            log::debug!("cluster {cluster_id:?} changed while merging into it; merging again");
        }
        Err(Capped::Store(StoreError::Contended {
            cluster_id: cluster_id.to_string(),
        }))
    }

    /// One attempt of [`Merger::merge`]: whether it stored the merge (false: the stored payload
    /// moved on, nothing stored, `delta` as it was).
    fn merge_once<E>(
        &self,
        cluster_id: &str,
        delta: &mut Vec<u8>,
        received: SystemTime,
        converted: Option<&Arc<Vec<Selector>>>,
        source: Source,
        admit: &impl Fn(usize) -> Result<(), E>,
    ) -> Result<bool, Capped<E>> {
        let mut received = received;
        let ttl_ms = telemeter_common::time::duration_millis(self.store.ttl());
        let oldest =
            |received| telemeter_common::time::sample_millis(received).saturating_sub(ttl_ms);
        // Out of the cache until the store has the merged payload: only then is it cached again.
        let in_place = match (self.cached(cluster_id), source) {
            (Some((mut entry, version)), Source::Received) => {
                // What it writes in place is what the store journals (`Store::put_patched`).
                entry.record_patch(version);
                match entry.merge_in_place(delta, oldest(received)) {
                    true => Ok((entry, version)),
                    false => Err(Some((entry.into_payload(), version))),
                }
            }
            // A handoff is merged whole, under the stored series (below).
            (Some((entry, version)), Source::HandedOff) => {
                Err(Some((entry.into_payload(), version)))
            }
            (None, _) => Err(None),
        };
        let (mut entry, base) = match in_place {
            // No series added: within the cap even when the cluster is past it (a handoff, or a
            // cap lowered since), so its known series keep taking samples.
            Ok((entry, version)) => (entry, Some(version)),
            Err(cached) => {
                let (stored, base) = match cached {
                    Some((payload, version)) => (Some(payload), Some(version)),
                    None => {
                        // The version before the read: a put between the two makes the commit
                        // merge again rather than erase it.
                        let base = self.store.version(cluster_id);
                        let stored = self.store.get(cluster_id)?.map(|upload| upload.payload);
                        (stored, base)
                    }
                };
                // A handoff stands for both receipts: the later is kept. Read after the base, so
                // that a put since makes the commit merge again (`Committed::Moved`) rather than
                // store an older receipt over it.
                if source == Source::HandedOff {
                    received = self
                        .store
                        .received(cluster_id)
                        .map_or(received, |here| here.max(received));
                }
                let oldest_ms = oldest(received);
                // A cluster's first request: its converted series alone are the payload.
                if let (None, Some(whitelist)) = (&stored, converted) {
                    let taken = std::mem::take(delta);
                    match CachedCluster::build_converted(taken, oldest_ms, whitelist) {
                        Ok(entry) => {
                            admit(entry.series()).map_err(Capped::Refused)?;
                            // The payload is the delta's bytes, shipped as they are.
                            return match self.store_and_keep(
                                cluster_id,
                                entry,
                                Shipping::Merged,
                                received,
                                base,
                            )? {
                                None => Ok(true),
                                Some(entry) => {
                                    *delta = entry.into_payload();
                                    Ok(false)
                                }
                            };
                        }
                        Err(back) => *delta = back,
                    }
                }
                let merged = match source {
                    Source::Received => {
                        merge_stored(cluster_id, stored.as_deref(), delta, oldest_ms)?
                    }
                    Source::HandedOff => {
                        merge_handed(cluster_id, delta, stored.as_deref(), oldest_ms)?
                    }
                };
                drop(stored);
                // A merge that does not grow the cluster is within the cap even past it, as one
                // in place: the cap stops new series, not samples.
                if merged.series > merged.stored {
                    admit(merged.series).map_err(Capped::Refused)?;
                }
                match CachedCluster::build(merged.payload, merged.newest_received) {
                    Ok(entry) => (entry, base),
                    Err(payload) => {
                        // Not indexable (over 4 GiB): stored, not cached.
                        let ship = self.ship(source.shipping(delta), &payload);
                        let committed = store_merged(
                            &self.store,
                            cluster_id,
                            payload,
                            ship,
                            received,
                            merged.newest_received,
                            base,
                        )?;
                        return Ok(committed != Committed::Moved);
                    }
                }
            }
        };
        if let Some(whitelist) = converted {
            entry.mark_converted(delta, whitelist);
        }
        Ok(self
            .store_and_keep(cluster_id, entry, source.shipping(delta), received, base)?
            .is_none())
    }

    /// Merges a request (`body`, decompressed) of series this process converted before straight
    /// into `cluster_id`'s cached payload ([`CachedCluster::merge_raw`]) and stores it.
    /// [`Raw::Declined`] (with the body) when the cluster is not cached or the request is not all
    /// such series: nothing was stored, and the request takes the full conversion. Only for a
    /// local store without remote-write egress (no converted delta is made here to ship or
    /// forward). The body is dropped once merged, before the store's commit is waited for.
    pub fn store_raw<B: std::ops::Deref<Target = [u8]>>(
        &self,
        cluster_id: &str,
        body: B,
        rules: &RawRules<'_>,
        received: SystemTime,
    ) -> Result<Raw<B>, MergeError> {
        let _stripe = self.stripe(cluster_id);
        let oldest_ms = telemeter_common::time::sample_millis(received)
            .saturating_sub(telemeter_common::time::duration_millis(self.store.ttl()));
        let Some((mut entry, version)) = self.cached(cluster_id) else {
            return Ok(Raw::Declined(body));
        };
        entry.record_patch(version);
        let Some(samples) = entry.merge_raw(&body, rules, oldest_ms) else {
            entry.take_patch();
            // Unchanged: still a copy of the store's `version` (if the store moved on since,
            // the next merge sees it).
            self.count_lock();
            self.shared.cache.keep(cluster_id, entry, version);
            return Ok(Raw::Declined(body));
        };
        // Not read again: a pooled body goes back to its pool now rather than after the commit
        // (an fdatasync away), so the requests waiting for theirs hold none, and the next
        // requests find one there instead of zeroing (and faulting in) a fresh one.
        drop(body);
        // Nothing shipped: the raw path runs without egress (no converted delta to ship).
        match self.store_and_keep(
            cluster_id,
            entry,
            Shipping::Nothing,
            received,
            Some(version),
        )? {
            None => Ok(Raw::Stored(samples)),
            // Another path stored the cluster since it was cached (rare: an upload or a handoff
            // in the same moment). The body is gone: nothing is stored, and the sender tries
            // again (a 5xx), rather than have that put erased.
            Some(_) => Err(MergeError::Store(StoreError::Contended {
                cluster_id: cluster_id.to_string(),
            })),
        }
    }
}

/// What [`Merger::store_raw`] did with a request.
pub enum Raw<B> {
    /// Merged and stored durably: the samples.
    Stored(usize),
    /// Not merged, nothing stored: the body, for the full conversion.
    Declined(B),
}

/// What a merge merges into a cluster's stored series.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A remote-write request or an upload received here, or forwarded by the member that
    /// received it: merged over the stored series (its samples win a tie, its types and help
    /// win), shipped by egress, and its receipt is the cluster's newest.
    Received,
    /// A handoff: series another member stored (and shipped) before the ring changed. The stored
    /// series are merged over it, nothing is shipped, and the later of its receipt and the
    /// stored one's is kept.
    HandedOff,
}

impl Source {
    /// What a merge of `delta` from here has egress ship: a request's own samples, or nothing
    /// of a handoff.
    fn shipping(self, delta: &[u8]) -> Shipping<'_> {
        match self {
            Source::Received => Shipping::Delta(delta),
            Source::HandedOff => Shipping::Nothing,
        }
    }
}

/// What a stored merge has egress ship.
#[derive(Clone, Copy)]
enum Shipping<'a> {
    /// The request's own samples (re-shipping stored ones would make the receiver refuse them
    /// as out of order).
    Delta(&'a [u8]),
    /// The merged payload: a cluster's first request, whose converted series are all of it.
    Merged,
    /// Nothing: shipped where it was received (a handoff), or no egress (the raw path).
    Nothing,
}

/// Why [`Merger::merge`] stored nothing: the store failed, or `admit` refused.
enum Capped<E> {
    Store(StoreError),
    Refused(E),
}

impl<E> From<StoreError> for Capped<E> {
    fn from(e: StoreError) -> Self {
        Capped::Store(e)
    }
}

impl From<Capped<MergeError>> for MergeError {
    fn from(e: Capped<MergeError>) -> Self {
        match e {
            Capped::Store(e) => MergeError::Store(e),
            Capped::Refused(e) => e,
        }
    }
}

/// Decoding limits for payloads this server wrote itself.
const UNLIMITED: Limits = Limits {
    max_message_bytes: usize::MAX,
    max_total_bytes: usize::MAX,
    max_families: usize::MAX,
    max_series: usize::MAX,
};

/// Why a merge could not be stored.
#[derive(Debug)]
pub enum MergeError {
    /// Reading or writing the store failed.
    Store(StoreError),
    /// The merged series would pass the per-cluster cap.
    TooManySeries {
        /// The cap.
        limit: usize,
    },
}

impl std::fmt::Display for MergeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MergeError::Store(e) => write!(f, "{e}"),
            MergeError::TooManySeries { limit } => write!(
                f,
                "the cluster would hold more than {limit} series (--max-series)"
            ),
        }
    }
}

impl std::error::Error for MergeError {}

impl From<StoreError> for MergeError {
    fn from(e: StoreError) -> Self {
        MergeError::Store(e)
    }
}

/// `delta` merged into `stored` (the cluster's payload, None when it has none).
fn merge_stored(
    cluster_id: &str,
    stored: Option<&[u8]>,
    delta: &[u8],
    oldest_ms: i64,
) -> Result<Merged, StoreError> {
    match merge_payloads(stored.unwrap_or_default(), delta, oldest_ms) {
        Ok(merged) => Ok(merged),
        // Only this server's own validated payloads are read here (a sealed forward's too): a
        // failure means corruption the store's checksum missed, and the cluster starts over from
        // the request rather than being stuck.
        Err(e) => {
            log::warn!(
                "cluster {cluster_id:?}: stored payload unreadable ({e}); merging into nothing"
            );
            merge_payloads(&[], delta, oldest_ms).map_err(|e| StoreError::Format {
                context: format!("merging a remote-write request of cluster {cluster_id:?}"),
                reason: e.to_string(),
            })
        }
    }
}

/// The stored series (`stored`, None when the cluster has none) merged over `handed`, a handoff's
/// payload: the owner's types and help win, and its sample on a tie. When one side does not
/// decode: an unreadable handoff is refused (its member keeps it, and says so each pass), an
/// unreadable stored payload is replaced by the handed series, as a request's merge replaces it.
fn merge_handed(
    cluster_id: &str,
    handed: &[u8],
    stored: Option<&[u8]>,
    oldest_ms: i64,
) -> Result<Merged, StoreError> {
    let stored = stored.unwrap_or_default();
    let refused = |side: &str, e: DecodeError| StoreError::Format {
        context: format!("merging a handoff of cluster {cluster_id:?}"),
        reason: format!("{side} does not decode: {e}"),
    };
    match merge_payloads(handed, stored, oldest_ms) {
        Ok(merged) => Ok(merged),
        // Blamed on the stored payload only when it fails alone: a handed series can fail only
        // in the merge (converted to the owner's type), and the owner's series must not go.
        Err(e) if merge_payloads(stored, &[], oldest_ms).is_err() => {
            let alone = merge_payloads(handed, &[], oldest_ms)
                .map_err(|e| refused("the handed payload", e))?;
            log::warn!(
                "cluster {cluster_id:?}: stored payload unreadable ({e}); taking the handed series"
            );
            Ok(alone)
        }
        Err(e) => Err(refused("the handed payload", e)),
    }
}

/// What [`merge_payloads`] made.
pub struct Merged {
    /// The merged families, protobuf-delimited.
    pub payload: Vec<u8>,
    /// Series in it.
    pub series: usize,
    /// Series in the payload merged into (`stored`; for a handoff, the handed one).
    pub stored: usize,
    /// Its newest remote-write sample (ms), `i64::MIN` when none.
    pub newest_received: i64,
}

/// One series of the merge: the source's encoded `Metric` (re-encoded only when its family
/// changed type), its timestamp, and whether its value is a staleness marker.
struct Series<'a> {
    /// Where its identity bytes are in the merge's key arena (to confirm a hash match).
    key: std::ops::Range<usize>,
    message: std::borrow::Cow<'a, [u8]>,
    timestamp_ms: i64,
    stale: bool,
}

/// One family of the merge.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    raw_type: Option<i32>,
    series: Vec<Series<'a>>,
    /// Identity hash → position in `series`; `overflow` holds series whose hash was taken by
    /// another label set (found by comparing labels).
    index: HashMap<u64, usize>,
    overflow: Vec<usize>,
}

/// Writes `metric`'s identity into `key`: its labels sorted, each name and value followed by a
/// 0xff byte (which UTF-8 never contains, so different label sets never give the same bytes).
/// One flat buffer so that it is hashed in one call; `pairs` is scratch space.
fn identity<'a>(
    metric: &MetricView<'a>,
    pairs: &mut Vec<(&'a str, &'a str)>,
    key: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    pairs.clear();
    for label in metric.labels() {
        pairs.push(label?);
    }
    pairs.sort_unstable();
    key.clear();
    for (name, value) in pairs.iter() {
        key.extend_from_slice(name.as_bytes());
        key.push(0xff);
        key.extend_from_slice(value.as_bytes());
        key.push(0xff);
    }
    Ok(())
}

/// The plain value (counter, gauge, untyped) of a series.
fn plain(value: &Value<'_>) -> Option<f64> {
    match value {
        Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => Some(*v),
        _ => None,
    }
}

/// Whether a family of this type holds one plain value per series (so series can move between
/// these types by carrying their value over).
fn is_plain(kind: MetricType) -> bool {
    matches!(
        kind,
        MetricType::Counter | MetricType::Gauge | MetricType::Untyped
    )
}

fn kind(raw_type: Option<i32>) -> MetricType {
    raw_type
        .and_then(|t| MetricType::try_from(t).ok())
        .unwrap_or(MetricType::Untyped)
}

/// `message` (an encoded plain `Metric`) re-encoded as a series of a `kind` family.
fn converted(message: &[u8], kind: MetricType) -> Result<Vec<u8>, DecodeError> {
    let mut metric = Metric::decode(message).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    if let Some(value) = plain_value(&metric) {
        set_plain(&mut metric, kind, value);
    }
    Ok(metric.encode_to_vec())
}

/// Merges `delta` into `stored` (both protobuf-delimited families) on the wire, copying each
/// series' bytes rather than decoding it: per series (family name and label set, in any order)
/// the newer sample wins (a staleness marker that wins removes the series), then series older
/// than `oldest_ms` are dropped, and empty families with them. When a family changes type, the
/// delta's type wins: plain series carry their value over, and a histogram or summary family is
/// replaced whole (its series cannot be mixed with others).
pub fn merge_payloads(stored: &[u8], delta: &[u8], oldest_ms: i64) -> Result<Merged, DecodeError> {
    let keys = RandomState::new();
    let mut families: Vec<Family<'_>> = Vec::new();
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    let mut key: Vec<u8> = Vec::new();
    // Every kept series' identity bytes, one after the other: read once per series, and no
    // allocation per series.
    let mut arena: Vec<u8> = Vec::new();
    let mut stored_series = 0;
    for (from_delta, body) in [(false, stored), (true, delta)] {
        for view in wire::families(body, &UNLIMITED) {
            let view = view?;
            let at = match by_name.get(view.name) {
                Some(&at) => at,
                None => {
                    by_name.insert(view.name, families.len());
                    families.push(Family {
                        name: view.name,
                        help: view.help,
                        raw_type: view.raw_type,
                        series: Vec::new(),
                        index: HashMap::new(),
                        overflow: Vec::new(),
                    });
                    families.len() - 1
                }
            };
            let family = &mut families[at];
            if from_delta {
                let (old, new) = (kind(family.raw_type), kind(view.raw_type));
                if old != new {
                    if is_plain(old) && is_plain(new) {
                        for series in &mut family.series {
                            series.message = converted(&series.message, new)?.into();
                        }
                    } else {
                        family.series.clear();
                        family.index.clear();
                        family.overflow.clear();
                    }
                    family.raw_type = view.raw_type;
                }
                if view.help == REMOTE_WRITE_HELP || family.help != REMOTE_WRITE_HELP {
                    family.help = view.help;
                }
            }
            for metric in view.metrics() {
                let metric = metric?;
                stored_series += usize::from(!from_delta);
                identity(&metric, &mut pairs, &mut key)?;
                let hash = keys.hash_one(key.as_slice());
                let mut series = Series {
                    key: 0..0,
                    message: metric.message.into(),
                    timestamp_ms: metric.timestamp_ms.unwrap_or(i64::MIN),
                    stale: plain(&metric.value).is_some_and(is_stale_marker),
                };
                // The same series already in the family: the index's, or one of the overflow.
                let mut found = None;
                let candidates = family.index.get(&hash).copied().into_iter();
                for i in candidates.chain(family.overflow.iter().copied()) {
                    let Some(existing) = family.series.get(i) else {
                        continue;
                    };
                    if arena.get(existing.key.clone()) == Some(key.as_slice()) {
                        found = Some(i);
                        break;
                    }
                }
                match found {
                    Some(i) => {
                        if series.timestamp_ms >= family.series[i].timestamp_ms {
                            series.key = family.series[i].key.clone();
                            family.series[i] = series;
                        }
                    }
                    None => {
                        series.key = arena.len()..arena.len() + key.len();
                        arena.extend_from_slice(&key);
                        let i = family.series.len();
                        match family.index.entry(hash) {
                            std::collections::hash_map::Entry::Occupied(_) => {
                                family.overflow.push(i)
                            }
                            std::collections::hash_map::Entry::Vacant(slot) => {
                                slot.insert(i);
                            }
                        }
                        family.series.push(series);
                    }
                }
            }
        }
    }
    let mut out = Merged {
        payload: Vec::with_capacity(stored.len() + delta.len()),
        series: 0,
        stored: stored_series,
        newest_received: i64::MIN,
    };
    for family in &families {
        let kept = |series: &&Series<'_>| series.timestamp_ms >= oldest_ms && !series.stale;
        // Sized first, then written straight into the payload (no intermediate copy).
        let mut len = 0;
        let mut count = 0;
        for series in family.series.iter().filter(kept) {
            len += 1 + encoded_len_varint(series.message.len() as u64) + series.message.len();
            count += 1;
        }
        if count == 0 {
            continue;
        }
        let name = family.name.as_bytes();
        let help = family.help.as_bytes();
        len += 1 + encoded_len_varint(name.len() as u64) + name.len();
        if !help.is_empty() {
            len += 1 + encoded_len_varint(help.len() as u64) + help.len();
        }
        if let Some(t) = family.raw_type {
            len += int32::encoded_len(3, &t);
        }
        let payload = &mut out.payload;
        encode_varint(len as u64, payload);
        encode_key(1, WireType::LengthDelimited, payload);
        encode_varint(name.len() as u64, payload);
        payload.extend_from_slice(name);
        if !help.is_empty() {
            encode_key(2, WireType::LengthDelimited, payload);
            encode_varint(help.len() as u64, payload);
            payload.extend_from_slice(help);
        }
        if let Some(t) = family.raw_type {
            int32::encode(3, &t, payload);
        }
        for series in family.series.iter().filter(kept) {
            encode_key(4, WireType::LengthDelimited, payload);
            encode_varint(series.message.len() as u64, payload);
            payload.extend_from_slice(&series.message);
            if family.help == REMOTE_WRITE_HELP {
                out.newest_received = out.newest_received.max(series.timestamp_ms);
            }
        }
        out.series += count;
    }
    Ok(out)
}

/// The plain value of a counter, gauge or untyped series.
fn plain_value(metric: &Metric) -> Option<f64> {
    metric
        .untyped
        .and_then(|v| v.value)
        .or_else(|| metric.gauge.and_then(|v| v.value))
        .or_else(|| metric.counter.and_then(|v| v.value))
}

/// Makes `metric` carry `value` as a series of a `kind` family.
fn set_plain(metric: &mut Metric, kind: MetricType, value: f64) {
    metric.untyped = None;
    metric.gauge = None;
    metric.counter = None;
    match kind {
        MetricType::Counter => metric.counter = Some(Counter { value: Some(value) }),
        MetricType::Gauge => metric.gauge = Some(Gauge { value: Some(value) }),
        _ => metric.untyped = Some(Untyped { value: Some(value) }),
    }
}

/// One series of a remote-write family: sorted `labels` (without `__name__`), `value` at
/// `timestamp_ms`.
pub fn untyped_series(labels: Vec<LabelPair>, value: f64, timestamp_ms: i64) -> Metric {
    Metric {
        label: labels,
        untyped: Some(Untyped { value: Some(value) }),
        timestamp_ms: Some(timestamp_ms),
        ..Metric::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use telemeter_common::delimited;
    use telemeter_common::model::MetricFamily;

    fn family(name: &str, kind: MetricType, series: &[(&str, f64, i64)]) -> MetricFamily {
        MetricFamily {
            name: Some(name.into()),
            help: None,
            r#type: Some(kind as i32),
            metric: series
                .iter()
                .map(|(job, v, ts)| {
                    let mut m = untyped_series(vec![LabelPair::new("job", job)], *v, *ts);
                    set_plain(&mut m, kind, *v);
                    m
                })
                .collect(),
        }
    }

    fn merge(
        stored: Vec<MetricFamily>,
        delta: Vec<MetricFamily>,
        oldest: i64,
    ) -> Vec<MetricFamily> {
        let merged = merge_payloads(
            &delimited::encode(&stored),
            &delimited::encode(&delta),
            oldest,
        )
        .unwrap();
        let families = delimited::decode(&merged.payload, &UNLIMITED).unwrap();
        assert_eq!(
            merged.series,
            families.iter().map(|f| f.metric.len()).sum::<usize>()
        );
        families
    }

    fn values(families: &[MetricFamily]) -> Vec<(String, String, f64, i64)> {
        let mut out: Vec<_> = families
            .iter()
            .flat_map(|f| {
                f.metric.iter().map(move |m| {
                    (
                        f.name.clone().unwrap(),
                        m.label_value("job").unwrap().to_string(),
                        plain_value(m).unwrap(),
                        m.timestamp_ms.unwrap(),
                    )
                })
            })
            .collect();
        out.sort_by(|a, b| a.partial_cmp(b).unwrap());
        out
    }

    #[test]
    fn disjoint_series_are_both_kept_and_newer_samples_win() {
        let stored = vec![family(
            "up",
            MetricType::Untyped,
            &[("a", 1.0, 100), ("b", 1.0, 100)],
        )];
        let delta = vec![
            family(
                "up",
                MetricType::Untyped,
                &[("b", 0.0, 200), ("c", 1.0, 200)],
            ),
            family("x", MetricType::Untyped, &[("a", 5.0, 200)]),
        ];
        let merged = merge(stored, delta, 0);
        assert_eq!(
            values(&merged),
            vec![
                ("up".into(), "a".into(), 1.0, 100),
                ("up".into(), "b".into(), 0.0, 200),
                ("up".into(), "c".into(), 1.0, 200),
                ("x".into(), "a".into(), 5.0, 200),
            ]
        );
        // An older sample does not replace a newer one.
        let merged = merge(
            merged,
            vec![family("up", MetricType::Untyped, &[("b", 9.0, 150)])],
            0,
        );
        assert!(values(&merged).contains(&("up".into(), "b".into(), 0.0, 200)));
    }

    #[test]
    fn ttl_and_staleness_markers_drop_series() {
        let stored = vec![family(
            "up",
            MetricType::Untyped,
            &[("a", 1.0, 100), ("b", 1.0, 300)],
        )];
        let stale = f64::from_bits(STALE_NAN_BITS);
        let merged = merge(
            stored,
            vec![family("up", MetricType::Untyped, &[("b", stale, 400)])],
            200,
        );
        assert!(merged.is_empty(), "{merged:?}");
    }

    #[test]
    fn the_delta_type_wins() {
        let stored = vec![family("up", MetricType::Gauge, &[("a", 1.0, 100)])];
        let merged = merge(
            stored,
            vec![family("up", MetricType::Untyped, &[("b", 2.0, 100)])],
            0,
        );
        assert_eq!(merged[0].metric_type(), MetricType::Untyped);
        assert_eq!(values(&merged).len(), 2);
        assert!(merged[0]
            .metric
            .iter()
            .all(|m| m.untyped.is_some() && m.gauge.is_none()));
    }

    #[test]
    fn a_payload_written_past_the_merge_replaces_the_cached_one() {
        use crate::store::StoreConfig;
        use std::time::Duration;
        let dir =
            std::env::temp_dir().join(format!("telemeter-merge-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(StoreConfig {
            dir: dir.clone(),
            ttl: Duration::from_secs(3600),
            max_batch: 8,
        })
        .unwrap();
        let merger = Merger::new(store.clone());
        let now = SystemTime::now();
        let before = now - Duration::from_secs(90 * 60);
        merger
            .store_received(
                "c",
                one_series(REMOTE_WRITE_HELP, "rw", before),
                before,
                usize::MAX,
                None,
            )
            .unwrap();
        assert!(merger.is_cached("c"));
        // An upload once the remote-write series is past the TTL: stored as sent, not merged.
        crate::ingest::placement::store_push(&merger, "c", one_series("up", "upload", now), now)
            .unwrap();
        assert!(
            !merger.is_cached("c"),
            "the upload made the cached series stale"
        );
        // The next request merges into the upload, not into what was cached before it.
        merger
            .store_received(
                "c",
                one_series(REMOTE_WRITE_HELP, "rw", now),
                now,
                usize::MAX,
                None,
            )
            .unwrap();
        let stored = store.get("c").unwrap().unwrap().payload;
        let jobs: Vec<String> = delimited::decode(&stored, &UNLIMITED)
            .unwrap()
            .iter()
            .flat_map(|f| f.metric.iter())
            .map(|m| m.label_value("job").unwrap().to_string())
            .collect();
        assert_eq!(jobs, vec!["upload", "rw"]);
        assert!(merger.is_cached("c"));
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store in a fresh directory (removed by the caller) with a one-hour TTL.
    fn temp_store(tag: &str) -> (Store, std::path::PathBuf) {
        use crate::store::StoreConfig;
        let dir =
            std::env::temp_dir().join(format!("telemeter-merge-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(StoreConfig {
            dir: dir.clone(),
            ttl: std::time::Duration::from_secs(3600),
            max_batch: 8,
        })
        .unwrap();
        (store, dir)
    }

    fn one_series(help: &str, job: &str, at: SystemTime) -> Vec<u8> {
        delimited::encode(&[MetricFamily {
            name: Some("up".into()),
            help: Some(help.into()),
            r#type: Some(MetricType::Untyped as i32),
            metric: vec![untyped_series(
                vec![LabelPair::new("_id", "c"), LabelPair::new("job", job)],
                1.0,
                telemeter_common::time::sample_millis(at),
            )],
        }])
    }

    #[test]
    fn a_raw_merge_lets_go_of_its_body_before_the_store_commits() {
        use super::super::cache::RawRules;
        use crate::remote_write::proto::{Label, Sample, TimeSeries, WriteRequest};
        let (store, dir) = temp_store("raw-body");
        let merger = Merger::new(store.clone());
        let now = SystemTime::now();
        let ms = telemeter_common::time::sample_millis(now);
        let request = |timestamp: i64| {
            let labels = [("__name__", "up"), ("_id", "c"), ("job", "a")];
            let series = TimeSeries {
                labels: labels
                    .iter()
                    .map(|(name, value)| Label {
                        name: name.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
                samples: vec![Sample {
                    value: 1.0,
                    timestamp,
                }],
            };
            let timeseries = vec![series];
            prost::Message::encode_to_vec(&WriteRequest { timeseries })
        };
        let whitelist = Arc::new(Vec::new());
        let series_rules = super::super::series::SeriesRules {
            partition_label: "_id",
            cluster_id: "c",
            elide: &[],
            extra_labels: &[],
            required_labels: &[],
            whitelist: &[],
            oldest_ms: 0,
            newest_ms: i64::MAX,
            max_series: 10,
            max_samples: 100,
        };
        let delta = super::super::series::convert(&request(ms - 1), &series_rules)
            .unwrap()
            .payload;
        merger
            .store_received("c", delta, now, 10, Some(&whitelist))
            .unwrap();
        let stored = store.version("c");
        /// A body that notes the store's version of the cluster when it is dropped.
        struct Noted<'a> {
            bytes: Vec<u8>,
            store: &'a Store,
            seen: &'a std::cell::Cell<Option<Option<u64>>>,
        }
        impl std::ops::Deref for Noted<'_> {
            type Target = [u8];
            fn deref(&self) -> &[u8] {
                &self.bytes
            }
        }
        impl Drop for Noted<'_> {
            fn drop(&mut self) {
                self.seen.set(Some(self.store.version("c")));
            }
        }
        let seen = std::cell::Cell::new(None);
        let body = Noted {
            bytes: request(ms),
            store: &store,
            seen: &seen,
        };
        let rules = RawRules {
            oldest_ms: 0,
            newest_ms: i64::MAX,
            max_series: 10,
            whitelist: &whitelist,
        };
        let merged = merger.store_raw("c", body, &rules, now).unwrap();
        assert!(matches!(merged, Raw::Stored(1)));
        assert_ne!(store.version("c"), stored, "stored");
        assert_eq!(
            seen.get(),
            Some(stored),
            "dropped before the put was committed"
        );
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The jobs of the series `store` serves for `cluster_id`, sorted.
    pub(crate) fn jobs_of(store: &Store, cluster_id: &str) -> Vec<String> {
        let mut jobs: Vec<String> =
            delimited::decode(&store.get(cluster_id).unwrap().unwrap().payload, &UNLIMITED)
                .unwrap()
                .iter()
                .flat_map(|f| f.metric.iter())
                .map(|m| m.label_value("job").unwrap().to_string())
                .collect();
        jobs.sort();
        jobs
    }

    /// Two series of `job` and `also` (an upload that differs from another one by a series).
    pub(crate) fn two_series(job: &str, also: &str, at: SystemTime) -> Vec<u8> {
        let series = |job: &str| {
            untyped_series(
                vec![LabelPair::new("_id", "c"), LabelPair::new("job", job)],
                1.0,
                telemeter_common::time::sample_millis(at),
            )
        };
        delimited::encode(&[MetricFamily {
            name: Some("up".into()),
            help: Some("up".into()),
            r#type: Some(MetricType::Untyped as i32),
            metric: vec![series(job), series(also)],
        }])
    }

    #[test]
    fn an_upload_stored_between_a_merges_read_and_its_commit_is_merged_into_not_erased() {
        use crate::ingest::placement::store_push;
        let (store, dir) = temp_store("merge-moved");
        let merger = Merger::new(store.clone());
        let now = SystemTime::now();
        store_push(&merger, "c", two_series("old", "gone", now), now).unwrap();
        // The cluster's first remote-write request reads the upload, and stops there.
        let (reached, go_on) = store.pause_once_at("payload read");
        let merging = {
            let merger = merger.clone();
            std::thread::spawn(move || {
                let rw = one_series(REMOTE_WRITE_HELP, "rw", now);
                merger.store_received("c", rw, now, 10, None)
            })
        };
        reached.recv().unwrap();
        // An upload comes now: the cluster uses no remote write yet, so it replaces.
        store_push(&merger, "c", two_series("new", "old", now), now).unwrap();
        go_on.send(()).unwrap();
        merging.join().unwrap().unwrap();
        // Merged over the upload acknowledged meanwhile, not over the one it read.
        assert_eq!(jobs_of(&store, "c"), ["new", "old", "rw"]);
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Runs `op` on another thread while an upload of "c" is committed each time a store read
    /// reaches "payload read", `times` times (each pause is set before the last one lets go, so
    /// none is missed). Returns what `op` returned.
    pub(crate) fn overtaken<T: Send + 'static>(
        store: &Store,
        merger: &Merger,
        times: usize,
        op: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        use crate::ingest::placement::store_push;
        let now = SystemTime::now();
        let (mut reached, mut go_on) = store.pause_once_at("payload read");
        let thread = std::thread::spawn(op);
        for n in 0..times {
            reached.recv().unwrap();
            let upload = two_series(&format!("upload-{n}"), "old", now);
            store_push(merger, "c", upload, now).unwrap();
            let (next_reached, next_go_on) = store.pause_once_at("payload read");
            go_on.send(()).unwrap();
            (reached, go_on) = (next_reached, next_go_on);
        }
        // A last read (the attempt after the last upload) goes on at once.
        store.unpause();
        drop((reached, go_on));
        thread.join().unwrap()
    }

    #[test]
    fn a_merge_overtaken_every_time_stores_nothing_and_says_so() {
        use crate::ingest::placement::store_push;
        let (store, dir) = temp_store("merge-contended");
        let merger = Merger::new(store.clone());
        let now = SystemTime::now();
        store_push(&merger, "c", two_series("old", "gone", now), now).unwrap();
        for (times, stored) in [(MERGE_ATTEMPTS - 1, true), (MERGE_ATTEMPTS, false)] {
            let merging = merger.clone();
            let rw = one_series(REMOTE_WRITE_HELP, "rw", now);
            let result = overtaken(&store, &merger, times, move || {
                merging.store_received("c", rw, now, 10, None)
            });
            match result {
                Ok(()) => assert!(stored, "{times}"),
                Err(MergeError::Store(StoreError::Contended { cluster_id })) => {
                    assert!(!stored, "{times}");
                    assert_eq!(cluster_id, "c");
                }
                Err(e) => panic!("{e}"),
            }
            // Merged over the last upload when stored; else that upload alone, as it came.
            let last = format!("upload-{}", times - 1);
            let mut expected = vec!["old", last.as_str()];
            if stored {
                expected.insert(1, "rw");
            }
            assert_eq!(jobs_of(&store, "c"), expected, "{times}");
            // Uploads are merged from now on: the rest of the test starts as sent again.
            store.remove("c").unwrap();
            store_push(&merger, "c", two_series("old", "gone", now), now).unwrap();
        }
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_upload_that_found_no_remote_write_is_merged_when_the_first_request_commits_first() {
        use crate::ingest::placement::{store_push, LocalPlacement, Placement};
        let (store, dir) = temp_store("upload-unmet");
        let merger = Merger::new(store.clone());
        let now = SystemTime::now();
        // Waiting for its commit (`store_push`, cluster "c"), and answered where the commit ends
        // (the wire fast path, `place_unchanged_then`, cluster "d": the merge runs on a thread
        // of its own).
        for (id, answered_later) in [("c", false), ("d", true)] {
            store_push(&merger, id, two_series("old", "gone", now), now).unwrap();
            let (reached, go_on) = store.pause_once_at("put handed over");
            let uploading = {
                let merger = merger.clone();
                std::thread::spawn(move || {
                    let upload = two_series("new", "old", now);
                    if !answered_later {
                        return store_push(&merger, id, upload, now).map_err(|e| e.to_string());
                    }
                    let (answer, answered) = crossbeam_channel::bounded(1);
                    let newest = telemeter_common::time::sample_millis(now);
                    let mut payload = upload;
                    LocalPlacement::new(merger).place_unchanged_then(
                        id,
                        &mut payload,
                        None,
                        newest,
                        now,
                        Box::new(move |placed| {
                            let _ = answer.send(placed.map_err(|e| e.to_string()));
                        }),
                    );
                    answered.recv().unwrap()
                })
            };
            // It found the cluster without remote write, and stops before its commit; the
            // cluster's first request is merged and stored meanwhile.
            reached.recv().unwrap();
            merger
                .store_received(id, one_series(REMOTE_WRITE_HELP, "rw", now), now, 10, None)
                .unwrap();
            go_on.send(()).unwrap();
            uploading.join().unwrap().unwrap();
            // Neither request's series erased: the upload was merged.
            assert_eq!(jobs_of(&store, id), ["gone", "new", "old", "rw"], "{id}");
        }
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_upload_of_a_cluster_that_never_used_remote_write_takes_no_lock_of_the_merger() {
        use crate::ingest::placement::store_push;
        let (store, dir) = temp_store("no-lock");
        let merger = Merger::new(store.clone());
        let now = SystemTime::now();
        // Uploads only, the first of a cluster too.
        for n in 0..20 {
            let id = format!("plain-{}", n % 4);
            store_push(&merger, &id, one_series("up", "upload", now), now).unwrap();
        }
        assert_eq!(merger.locks_taken(), 0);
        // One whose payload names remote write's help itself is still a plain upload.
        store_push(
            &merger,
            "spoof",
            one_series(REMOTE_WRITE_HELP, "x", now),
            now,
        )
        .unwrap();
        store_push(
            &merger,
            "spoof",
            one_series(REMOTE_WRITE_HELP, "x", now),
            now,
        )
        .unwrap();
        assert_eq!(merger.locks_taken(), 0);
        assert_eq!(store.newest_received("spoof").unwrap(), Some(i64::MIN));
        // The probe counts: a cluster that used remote write has its uploads merged.
        merger
            .store_received(
                "rw",
                one_series(REMOTE_WRITE_HELP, "rw", now),
                now,
                10,
                None,
            )
            .unwrap();
        let after_merge = merger.locks_taken();
        assert!(after_merge > 0);
        store_push(&merger, "rw", one_series("up", "upload", now), now).unwrap();
        assert!(merger.locks_taken() > after_merge);
        let jobs: Vec<String> =
            delimited::decode(&store.get("rw").unwrap().unwrap().payload, &UNLIMITED)
                .unwrap()
                .iter()
                .flat_map(|f| f.metric.iter())
                .map(|m| m.label_value("job").unwrap().to_string())
                .collect();
        assert_eq!(jobs, ["rw", "upload"], "merged, not replaced");
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_put_or_a_removal_makes_the_cached_copy_stale_without_telling_the_merger() {
        let (store, dir) = temp_store("stale");
        let merger = Merger::new(store.clone());
        let now = SystemTime::now();
        let jobs = |store: &Store| -> Vec<String> {
            delimited::decode(&store.get("c").unwrap().unwrap().payload, &UNLIMITED)
                .unwrap()
                .iter()
                .flat_map(|f| f.metric.iter())
                .map(|m| m.label_value("job").unwrap().to_string())
                .collect()
        };
        merger
            .store_received("c", one_series(REMOTE_WRITE_HELP, "a", now), now, 10, None)
            .unwrap();
        assert!(merger.is_cached("c"));
        // A put that replaces the payload, the store told and not the merger (a handoff merges
        // through the merger now; a put replaces as an upload of another path would).
        let later = now + std::time::Duration::from_secs(1);
        store
            .put("c", one_series(REMOTE_WRITE_HELP, "handed", now), later)
            .unwrap();
        assert!(!merger.is_cached("c"));
        merger
            .store_received(
                "c",
                one_series(REMOTE_WRITE_HELP, "b", now),
                later,
                10,
                None,
            )
            .unwrap();
        assert_eq!(
            jobs(&store),
            ["handed", "b"],
            "merged into the handoff, not the copy"
        );
        // A removal: the next request starts from nothing.
        assert!(merger.is_cached("c"));
        store.remove("c").unwrap();
        assert!(!merger.is_cached("c"));
        merger
            .store_received(
                "c",
                one_series(REMOTE_WRITE_HELP, "d", now),
                later,
                10,
                None,
            )
            .unwrap();
        assert_eq!(jobs(&store), ["d"]);
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn two_stores_in_one_process_have_their_own_merge_state() {
        let (one, one_dir) = temp_store("state-one");
        let (two, two_dir) = temp_store("state-two");
        let (first, second) = (Merger::new(one.clone()), Merger::new(two.clone()));
        let now = SystemTime::now();
        first
            .store_received("c", one_series(REMOTE_WRITE_HELP, "a", now), now, 10, None)
            .unwrap();
        assert!(first.is_cached("c") && !second.is_cached("c"));
        // The same cluster id in the other store merges into that store's payload alone.
        second
            .store_received("c", one_series(REMOTE_WRITE_HELP, "b", now), now, 10, None)
            .unwrap();
        assert!(first.is_cached("c") && second.is_cached("c"));
        for (store, job) in [(&one, "a"), (&two, "b")] {
            let families =
                delimited::decode(&store.get("c").unwrap().unwrap().payload, &UNLIMITED).unwrap();
            assert_eq!(families[0].metric.len(), 1);
            assert_eq!(families[0].metric[0].label_value("job"), Some(job));
        }
        // Over the cap: refused, nothing stored.
        let wider = [
            one_series(REMOTE_WRITE_HELP, "x", now),
            one_series(REMOTE_WRITE_HELP, "y", now),
        ]
        .concat();
        assert!(matches!(
            first.store_received("c", wider, now, 2, None),
            Err(MergeError::TooManySeries { limit: 2 })
        ));
        let stored = delimited::decode(&one.get("c").unwrap().unwrap().payload, &UNLIMITED);
        assert_eq!(stored.unwrap()[0].metric.len(), 1, "nothing stored");
        one.close();
        two.close();
        let _ = std::fs::remove_dir_all(&one_dir);
        let _ = std::fs::remove_dir_all(&two_dir);
    }

    #[test]
    fn label_order_does_not_change_identity_and_the_marker_is_kept() {
        let mut one = untyped_series(
            vec![LabelPair::new("a", "1"), LabelPair::new("b", "2")],
            1.0,
            100,
        );
        let stored = vec![MetricFamily {
            name: Some("m".into()),
            r#type: Some(MetricType::Untyped as i32),
            metric: vec![one.clone()],
            help: Some(REMOTE_WRITE_HELP.into()),
        }];
        one.label.reverse();
        one.timestamp_ms = Some(200);
        let delta = vec![MetricFamily {
            name: Some("m".into()),
            r#type: Some(MetricType::Untyped as i32),
            metric: vec![one],
            help: Some("from an upload".into()),
        }];
        let merged = merge(stored, delta, 0);
        assert_eq!(merged[0].metric.len(), 1);
        assert_eq!(merged[0].metric[0].timestamp_ms, Some(200));
        assert_eq!(merged[0].help.as_deref(), Some(REMOTE_WRITE_HELP));
        assert_eq!(
            crate::store::newest_received_in(&delimited::encode(&merged)),
            200,
            "the newest remote-write sample is read back from the payload"
        );
    }
}
