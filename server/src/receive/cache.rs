//! The merged series of recently received clusters, kept in memory so that a remote-write request
//! does not read, re-check and re-parse its cluster's whole stored payload.
//!
//! A request carries a batch of a cluster's series; without this cache each one read the stored
//! payload (file read and checksum), parsed and hashed every stored series, merged and re-encoded
//! them. A cached cluster keeps the payload exactly as last stored and where each series sits in
//! it, so a request whose series are all known (the steady state of a Prometheus sending the same
//! series every interval) overwrites each winning series' bytes in place — same length, so the
//! family layout is unchanged — and the result is byte for byte what
//! [`super::merge::merge_payloads`] makes from the same inputs. A series this process converted
//! itself is marked, so the next request carrying it the same way is merged straight from the
//! request's bytes, without converting it again ([`CachedCluster::merge_raw`]). Anything else (a
//! new series, a staleness marker, a type or help change, a length change, a series past the TTL,
//! any refusal) takes the full conversion and merge from the cached payload, and only a cluster
//! not cached reads the store.
//!
//! The store stays the truth. Each entry remembers which put of the store it is a copy of (the
//! [`Store::version`] that [`Store::put_merged`] answered), and is used only while the store
//! still holds that very put: any other write of the cluster (an upload stored without merging,
//! a handoff, a removal, the sweeper) changes the version, so no other path has to tell the cache
//! anything. An entry is only read and replaced under the cluster's stripe lock (as the merge
//! is), taken out while a request works on it so a failed write leaves nothing stale, and put
//! back only after the store wrote the payload. A restart starts empty. Bounded by
//! [`CACHE_BYTES`], least recently used evicted first; a cluster bigger than a quarter of that is
//! not cached. Only authenticated clusters' merges fill it. Owned by the server's
//! [`super::merge::Merger`], one per store: nothing here is global.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use telemeter_common::delimited::Limits;
use telemeter_common::model::MetricType;
use telemeter_common::selector::Selector;
use telemeter_common::wire::{self, Value};

use super::merge::{is_stale_marker, REMOTE_WRITE_HELP};
use crate::store::Patch;
#[cfg(doc)]
use crate::store::Store;

/// Memory the cache of one store may hold: half of what requests in flight may reserve
/// (`RESERVED_BYTES_PER_BODY_BYTE` in `receive`), enough for a few hundred clusters of a few
/// thousand series each.
pub const CACHE_BYTES: usize = 128 << 20;

/// Decoding limits for payloads this server wrote itself.
const UNLIMITED: Limits = Limits {
    max_message_bytes: usize::MAX,
    max_total_bytes: usize::MAX,
    max_families: usize::MAX,
    max_series: usize::MAX,
};

/// The merged series of recently received clusters of one store (see the module documentation).
#[derive(Default)]
pub struct Cache {
    lru: Mutex<Lru>,
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Cache {
        Cache::default()
    }

    /// Takes `cluster_id`'s entry out, if it is a copy of what the store holds now (`version`,
    /// the store's [`Store::version`] of the cluster); an entry of another version is dropped.
    /// The caller holds the cluster's stripe lock, so one merge at a time works on an entry.
    pub fn take(&self, cluster_id: &str, version: Option<u64>) -> Option<CachedCluster> {
        let (cached, entry) = telemeter_common::sync::lock(&self.lru).take(cluster_id)?;
        (Some(cached) == version).then_some(entry)
    }

    /// Caches `entry` as the copy of the store's put `version` of `cluster_id` (the caller wrote
    /// it); evicts the least recently used clusters past [`CACHE_BYTES`]. A cluster bigger than a
    /// quarter of that is not cached.
    pub fn keep(&self, cluster_id: &str, entry: CachedCluster, version: u64) {
        if entry.bytes() <= CACHE_BYTES / 4 {
            telemeter_common::sync::lock(&self.lru).put(cluster_id, version, entry, CACHE_BYTES);
        }
    }

    /// Whether `cluster_id` is cached now as a copy of the store's `version` of it (for tests
    /// and the debug log).
    pub fn is_cached(&self, cluster_id: &str, version: Option<u64>) -> bool {
        telemeter_common::sync::lock(&self.lru)
            .entries
            .get(cluster_id)
            .is_some_and(|(_, cached, _)| Some(*cached) == version)
    }
}

/// The cached clusters, least recently used first out.
#[derive(Default)]
struct Lru {
    /// Cluster id → (use tick, the store's version it copies, the entry).
    entries: HashMap<String, (u64, u64, CachedCluster)>,
    /// Use tick → cluster id: the first is the least recently used.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: usize,
}

impl Lru {
    fn take(&mut self, cluster_id: &str) -> Option<(u64, CachedCluster)> {
        let (tick, version, entry) = self.entries.remove(cluster_id)?;
        self.order.remove(&tick);
        self.bytes = self.bytes.saturating_sub(entry.bytes());
        Some((version, entry))
    }

    fn put(&mut self, cluster_id: &str, version: u64, entry: CachedCluster, limit: usize) {
        self.take(cluster_id);
        self.tick += 1;
        self.bytes += entry.bytes();
        self.order.insert(self.tick, cluster_id.to_string());
        self.entries
            .insert(cluster_id.to_string(), (self.tick, version, entry));
        while self.bytes > limit {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, _, evicted)) = self.entries.remove(&oldest) {
                self.bytes = self.bytes.saturating_sub(evicted.bytes());
            }
        }
    }
}

/// Hashes the index's keys, which are already hashes.
#[derive(Default)]
struct PassHasher(u64);

impl Hasher for PassHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; kept total for any other use.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One family of a cached payload.
struct CachedFamily {
    name: Box<str>,
    help: Box<str>,
    raw_type: Option<i32>,
    /// Untyped with remote write's help: what a converted request's series land in, decided
    /// once here rather than per series ([`CachedCluster::merge_raw`]; neither changes in place).
    remote_write: bool,
}

/// Where one series is in the payload.
#[derive(Clone, Copy)]
struct Slot {
    /// Its encoded `Metric` message: start and length.
    start: u32,
    len: u32,
    /// The length of the message's leading labels (its identity bytes; see [`label_prefix`]).
    labels: u32,
    family: u32,
    timestamp_ms: i64,
    /// Whether its labels are what this process's conversion made of a request's series under
    /// the cache's `whitelist`: then a request carrying `__name__` and exactly these label bytes
    /// converts to them again, and is merged without converting ([`CachedCluster::merge_raw`]).
    converted: bool,
    /// The slot of the series that followed this one in the last raw request ([`NO_SLOT`]: none
    /// yet). A Prometheus sends a shard's series in a stable order, so the next series of a
    /// request is most often this one, checked by its bytes: found without hashing its labels,
    /// looking its family up by name or probing the index. A guess only: a wrong one costs the
    /// lookup it would have saved, and changes no result.
    next: u32,
}

/// No slot: a [`Slot::next`] not known yet.
const NO_SLOT: u32 = u32::MAX;

/// How many series ahead of the one being merged [`CachedCluster::merge_raw`] asks for the
/// payload bytes of (a few hundred nanoseconds of memory latency, a few dozen of work a series).
/// 16 was tried at 64 senders: 0.163-0.201 us of server CPU a sample against 8's 0.163-0.192,
/// alternating (9 rounds each), about 1 % less on average and within the noise, so not kept.
const PREFETCH_AHEAD: usize = 8;

/// How many series ahead [`CachedCluster::merge_raw`] asks for the slot of (read then to know
/// where its payload bytes are, [`PREFETCH_AHEAD`] series on).
const SLOT_AHEAD: usize = 2 * PREFETCH_AHEAD;

/// Asks the CPU to bring the cache line at the start of `bytes` in; does nothing elsewhere than
/// x86-64, or for no bytes.
#[inline]
fn prefetch(bytes: &[u8]) {
    if let Some(first) = bytes.first() {
        prefetch_item(first);
    }
}

/// Asks the CPU to bring the cache line of `item` in; does nothing elsewhere than x86-64.
#[inline]
fn prefetch_item<T>(item: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint to the cache: it reads nothing into the program, never
        // faults, and the pointer is to a live value.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((item as *const T).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = item;
}

/// Identity hash → slot.
type SlotIndex = HashMap<u64, u32, BuildHasherDefault<PassHasher>>;

/// What [`CachedCluster::index`] reads from a payload: families, their names, slots, the index
/// and its hash keys.
type Indexed = (
    Vec<CachedFamily>,
    HashMap<Box<str>, u32>,
    Vec<Slot>,
    SlotIndex,
    u64,
);

/// A cluster's payload as stored, with where each series is in it.
pub struct CachedCluster {
    payload: Vec<u8>,
    families: Vec<CachedFamily>,
    by_name: HashMap<Box<str>, u32>,
    slots: Vec<Slot>,
    /// Hash of (family, identity bytes) → slot. A series whose hash another took, or whose
    /// message does not start with its labels, is not indexed: a request naming it takes the full
    /// merge.
    index: SlotIndex,
    /// The seed of [`key_hash`].
    keys: u64,
    series: usize,
    newest_received: i64,
    /// The newest sample timestamp of the slots (ms, `i64::MIN`: none): kept as the merges
    /// write (a slot's timestamp only grows), so a request does not read every slot for it.
    newest_sample: i64,
    /// At most the oldest sample timestamp of the slots (ms): a slot's timestamp only grows, so
    /// what was once the oldest stays a bound below. While it is within the TTL, no series can
    /// have passed it and a raw merge does not read every slot to know.
    oldest_bound: i64,
    /// Series of the last raw merge: room for a request's writes is made once, at that size.
    last_raw: usize,
    /// The slots of the last raw request, in its order: what the next is expected to name, series
    /// by series, to ask memory for ahead ([`CachedCluster::prefetch_ahead`]). At most a
    /// request's series (`RawRules::max_series`), and counted in [`CachedCluster::bytes`].
    order: Vec<u32>,
    /// The whitelist the `converted` marks were set under (kept alive, so compared by identity).
    whitelist: Option<Arc<Vec<Selector>>>,
    /// What the in-place merges wrote since [`CachedCluster::record_patch`], so the store can
    /// journal that rather than the whole payload.
    patch: Option<Patch>,
}

impl CachedCluster {
    /// Indexes `payload` (a merge's output: families with distinct names, `newest_received` its
    /// newest remote-write sample). Gives it back when it cannot be indexed (over 4 GiB,
    /// unreadable).
    pub fn build(mut payload: Vec<u8>, newest_received: i64) -> Result<CachedCluster, Vec<u8>> {
        match Self::index(&payload) {
            Some((families, by_name, mut slots, mut index, keys)) => {
                // The merge reserves room for the stored payload and the whole request: up to
                // twice what it writes, which the cache would hold (and count) for as long as
                // the cluster is cached. With that, 256 clusters of 2,000 series (the bench)
                // passed [`CACHE_BYTES`], so the least recently used were evicted in turn and
                // a tenth of the requests took the full merge.
                payload.shrink_to_fit();
                slots.shrink_to_fit();
                index.shrink_to_fit();
                let timestamps = slots.iter().map(|slot| slot.timestamp_ms);
                let newest_sample = timestamps.clone().max().unwrap_or(i64::MIN);
                let oldest_bound = timestamps.min().unwrap_or(i64::MAX);
                Ok(CachedCluster {
                    series: slots.len(),
                    newest_sample,
                    oldest_bound,
                    last_raw: 0,
                    order: Vec::new(),
                    payload,
                    families,
                    by_name,
                    slots,
                    index,
                    keys,
                    newest_received,
                    whitelist: None,
                    patch: None,
                })
            }
            None => Err(payload),
        }
    }

    /// Indexes `delta` (what this process's conversion made of a request: sorted label sets,
    /// one encoding of each) as the whole payload of a cluster that has none, and marks its
    /// series converted under `whitelist`, when that payload is what
    /// [`super::merge::merge_payloads`] makes of `delta` alone: every series named once in its
    /// family, none a staleness marker, none older than `oldest_ms`. Then merging it into
    /// nothing (hashing and re-encoding every series) and marking it (walking it again) would
    /// give the same entry: that was most of a cluster's first request, and the bench's first
    /// second. Gives `delta` back otherwise.
    pub fn build_converted(
        delta: Vec<u8>,
        oldest_ms: i64,
        whitelist: &Arc<Vec<Selector>>,
    ) -> Result<CachedCluster, Vec<u8>> {
        let mut entry = Self::build(delta, i64::MIN)?;
        let alone = (0..entry.slots.len() as u32).all(|s| {
            let slot = entry.slots[s as usize];
            let at = (slot.start + slot.labels) as usize;
            // Identity bytes and the hash index decide "named once": a label set sent twice has
            // the same bytes (the conversion sorts and encodes them one way), so its second
            // series is not what the index answers; nor is a series whose hash another took,
            // which then takes the merge.
            entry.find(slot.family, entry.identity(s)) == Some(s)
                && slot.timestamp_ms >= oldest_ms
                && entry
                    .payload
                    .get(at..at + 11)
                    .and_then(|tail| tail.strip_prefix(&VALUE_KEYS[..]))
                    .and_then(|value| <[u8; 8]>::try_from(value).ok())
                    .is_some_and(|value| !is_stale_marker(f64::from_le_bytes(value)))
        });
        if !alone {
            return Err(entry.into_payload());
        }
        // As the merge reads it: the newest sample of remote write's families.
        entry.newest_received = entry
            .slots
            .iter()
            .filter(|slot| entry.families[slot.family as usize].help.as_ref() == REMOTE_WRITE_HELP)
            .map(|slot| slot.timestamp_ms)
            .max()
            .unwrap_or(i64::MIN);
        let last = entry.slots.len().saturating_sub(1) as u32;
        for (s, slot) in (0u32..).zip(&mut entry.slots) {
            slot.converted = true;
            // The next request's order is not known yet; the series after each in the request
            // (the conversion keeps their order within a family) is the best guess.
            if s < last {
                slot.next = s + 1;
            }
        }
        entry.whitelist = Some(Arc::clone(whitelist));
        Ok(entry)
    }

    /// The families, slots and index of `payload`.
    fn index(payload: &[u8]) -> Option<Indexed> {
        u32::try_from(payload.len()).ok()?;
        // Random per entry, as a `RandomState` is.
        let keys = RandomState::new().hash_one(payload.len());
        let mut families = Vec::new();
        let mut by_name: HashMap<Box<str>, u32> = HashMap::new();
        let mut slots = Vec::new();
        let mut index: SlotIndex = HashMap::default();
        let base = payload.as_ptr() as usize;
        for family in wire::families(payload, &UNLIMITED) {
            let family = family.ok()?;
            let f = u32::try_from(families.len()).ok()?;
            if by_name.insert(family.name.into(), f).is_some() {
                return None;
            }
            families.push(CachedFamily {
                name: family.name.into(),
                help: family.help.into(),
                raw_type: family.raw_type,
                remote_write: kind(family.raw_type) == MetricType::Untyped
                    && family.help == REMOTE_WRITE_HELP,
            });
            for metric in family.metrics() {
                let metric = metric.ok()?;
                let start = metric.message.as_ptr() as usize - base;
                let s = u32::try_from(slots.len()).ok()?;
                let labels = label_prefix(metric.message);
                slots.push(Slot {
                    start: start as u32,
                    len: metric.message.len() as u32,
                    labels: labels.unwrap_or(0) as u32,
                    family: f,
                    timestamp_ms: metric.timestamp_ms.unwrap_or(i64::MIN),
                    converted: false,
                    next: NO_SLOT,
                });
                if let Some(labels) = labels {
                    let hash = key_hash(keys, f, &metric.message[..labels]);
                    index.entry(hash).or_insert(s);
                }
            }
        }
        Some((families, by_name, slots, index, keys))
    }

    /// Starts recording what the in-place merges write over the payload, which is the store's
    /// `version` of the cluster ([`Store::put_patched`]).
    pub fn record_patch(&mut self, version: u64) {
        self.patch = Some(Patch::new(version, self.payload.len()));
    }

    /// What was recorded since [`CachedCluster::record_patch`], if that was called.
    pub fn take_patch(&mut self) -> Option<Patch> {
        self.patch.take()
    }

    /// The newest sample timestamp of the payload (ms), as the store reads it from a payload
    /// (`wire::newest_timestamp`), from the slots rather than the bytes; `None` when no series
    /// has one.
    pub fn newest_sample(&self) -> Option<i64> {
        (self.newest_sample != i64::MIN).then_some(self.newest_sample)
    }

    /// The payload as stored.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload, the index dropped.
    pub fn into_payload(self) -> Vec<u8> {
        self.payload
    }

    /// Series in the payload.
    pub fn series(&self) -> usize {
        self.series
    }

    /// The newest remote-write sample in the payload (ms), `i64::MIN` when none.
    pub fn newest_received(&self) -> i64 {
        self.newest_received
    }

    /// Memory it holds, roughly.
    pub fn bytes(&self) -> usize {
        self.payload.capacity()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.order.capacity() * std::mem::size_of::<u32>()
            + self.index.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
            + self
                .families
                .iter()
                .map(|f| f.name.len() + f.help.len() + std::mem::size_of::<CachedFamily>() + 48)
                .sum::<usize>()
            + self.by_name.keys().map(|n| n.len()).sum::<usize>()
            + 256
    }

    /// Merges `delta` in place when every series of it is already here with the same encoded
    /// length, none is a staleness marker, no family changes type or help, and no series ends up
    /// older than `oldest_ms`: then the result is exactly [`super::merge::merge_payloads`]'s.
    /// Returns false (and leaves everything unchanged) otherwise.
    pub fn merge_in_place(&mut self, delta: &[u8], oldest_ms: i64) -> bool {
        let Some(patches) = self.patches(delta, oldest_ms) else {
            return false;
        };
        for (s, message, timestamp_ms) in patches {
            let slot = &mut self.slots[s as usize];
            let start = slot.start as usize;
            self.payload[start..start + slot.len as usize].copy_from_slice(message);
            if let Some(patch) = &mut self.patch {
                // The labels are the same bytes (that is how the slot was found): only the rest.
                let labels = slot.labels as usize;
                patch.push(
                    slot.start + slot.labels,
                    message.get(labels..).unwrap_or_default(),
                );
            }
            slot.timestamp_ms = timestamp_ms;
            self.newest_sample = self.newest_sample.max(timestamp_ms);
            // Written by whoever made `delta`: converted here only if the caller marks it so.
            slot.converted = false;
            if &*self.families[slot.family as usize].help == REMOTE_WRITE_HELP {
                self.newest_received = self.newest_received.max(timestamp_ms);
            }
        }
        true
    }

    /// What [`CachedCluster::merge_in_place`] writes: (slot, message, timestamp) in order; None
    /// when `delta` needs the full merge.
    fn patches<'d>(&self, delta: &'d [u8], oldest_ms: i64) -> Option<Vec<(u32, &'d [u8], i64)>> {
        // Each series' timestamp as the merge goes (a request may name a series twice).
        let mut newest: Vec<i64> = self.slots.iter().map(|s| s.timestamp_ms).collect();
        let mut patches = Vec::new();
        for family in wire::families(delta, &UNLIMITED) {
            let family = family.ok()?;
            let f = *self.by_name.get(family.name)?;
            let cached = &self.families[f as usize];
            if kind(cached.raw_type) != kind(family.raw_type) {
                return None;
            }
            // The merge takes the request's help unless that would replace remote write's own:
            // any other help change needs it.
            if family.help != &*cached.help
                && (family.help == REMOTE_WRITE_HELP || &*cached.help != REMOTE_WRITE_HELP)
            {
                return None;
            }
            for metric in family.metrics() {
                let metric = metric.ok()?;
                if plain(&metric.value).is_some_and(is_stale_marker) {
                    return None;
                }
                let labels = label_prefix(metric.message)?;
                let identity = &metric.message[..labels];
                let s = *self.index.get(&key_hash(self.keys, f, identity))?;
                let slot = self.slots[s as usize];
                let start = slot.start as usize;
                if slot.family != f
                    || slot.labels as usize != labels
                    || self.payload.get(start..start + labels) != Some(identity)
                {
                    return None;
                }
                let timestamp_ms = metric.timestamp_ms.unwrap_or(i64::MIN);
                if timestamp_ms >= newest[s as usize] {
                    if metric.message.len() != slot.len as usize {
                        return None;
                    }
                    newest[s as usize] = timestamp_ms;
                    patches.push((s, metric.message, timestamp_ms));
                }
            }
        }
        if newest.iter().any(|&t| t < oldest_ms) {
            return None;
        }
        Some(patches)
    }
}

/// What a request merged without converting ([`CachedCluster::merge_raw`]) is held to: the same
/// limits [`super::series::convert`] applies.
pub struct RawRules<'a> {
    /// Oldest sample accepted, ms.
    pub oldest_ms: i64,
    /// Newest sample accepted, ms.
    pub newest_ms: i64,
    /// Most series in one request.
    pub max_series: usize,
    /// The whitelist in force.
    pub whitelist: &'a Arc<Vec<Selector>>,
}

impl CachedCluster {
    /// Marks the series of `delta` (what this process's conversion made of a request, under
    /// `whitelist`) as converted; every mark set under another whitelist is dropped first.
    pub fn mark_converted(&mut self, delta: &[u8], whitelist: &Arc<Vec<Selector>>) {
        if !self
            .whitelist
            .as_ref()
            .is_some_and(|w| Arc::ptr_eq(w, whitelist))
        {
            for slot in &mut self.slots {
                slot.converted = false;
            }
            self.whitelist = Some(Arc::clone(whitelist));
        }
        for family in wire::families(delta, &UNLIMITED) {
            let Ok(family) = family else {
                return;
            };
            let Some(&f) = self.by_name.get(family.name) else {
                continue;
            };
            for metric in family.metrics() {
                let Ok(metric) = metric else {
                    return;
                };
                let Some(labels) = label_prefix(metric.message) else {
                    continue;
                };
                if let Some(s) = self.find(f, &metric.message[..labels]) {
                    self.slots[s as usize].converted = true;
                }
            }
        }
    }

    /// Asks memory ahead of use for the series the last raw request had `i` series on from
    /// series `at`: the slot of the one at `at + SLOT_AHEAD`, the payload bytes of the one at
    /// `at + PREFETCH_AHEAD` (whose slot was asked for before). From the last request's order
    /// rather than along the [`Slot::next`] hints, whose walk waited for each slot in turn: the
    /// order is read in sequence, so the slots are asked for all at once.
    fn prefetch_ahead(&self, order: &[u32], at: usize) {
        if let Some(&s) = order.get(at + SLOT_AHEAD) {
            self.prefetch_slot(s);
        }
        if let Some(&s) = order.get(at + PREFETCH_AHEAD) {
            self.prefetch_payload(s);
        }
    }

    /// Asks memory for slot `s` (any number).
    fn prefetch_slot(&self, s: u32) {
        if let Some(slot) = self.slots.get(s as usize) {
            prefetch_item(slot);
        }
    }

    /// Asks memory for the payload bytes of slot `s` (any number).
    fn prefetch_payload(&self, s: u32) {
        let Some(slot) = self.slots.get(s as usize) else {
            return;
        };
        let end = (slot.start as usize).saturating_add(slot.len as usize);
        let mut line = slot.start as usize;
        while line < end {
            prefetch(self.payload.get(line..).unwrap_or_default());
            line += 64;
        }
    }

    /// The identity bytes of slot `s` (any number: empty when there is no such slot).
    fn identity(&self, s: u32) -> &[u8] {
        self.slots
            .get(s as usize)
            .and_then(|slot| {
                let start = slot.start as usize;
                self.payload.get(start..start + slot.labels as usize)
            })
            .unwrap_or_default()
    }

    /// Whether slot `s` (any number) is a series of the family named `name`: with its identity
    /// bytes, the check [`CachedCluster::find`] makes of what the index answers.
    fn family_named(&self, s: u32, name: &[u8]) -> bool {
        self.slots
            .get(s as usize)
            .and_then(|slot| self.families.get(slot.family as usize))
            .is_some_and(|family| same(family.name.as_bytes(), name))
    }

    /// The slot of the series with identity bytes `identity` in family `f`.
    fn find(&self, f: u32, identity: &[u8]) -> Option<u32> {
        let s = *self.index.get(&key_hash(self.keys, f, identity))?;
        let slot = self.slots[s as usize];
        let start = slot.start as usize;
        (slot.family == f
            && slot.labels as usize == identity.len()
            && self
                .payload
                .get(start..start + identity.len())
                .is_some_and(|stored| same(stored, identity)))
        .then_some(s)
    }

    /// Merges a decompressed `prometheus.WriteRequest` without converting it, when every series
    /// in it is one sample of a series marked converted, sent as `__name__` then exactly the
    /// stored label bytes: such a request converts to those same series (labels already valid,
    /// sorted, elided, with the partition label; the whitelist unchanged), so only its samples
    /// are checked (age, skew, staleness) and written in place. Returns the samples merged, or
    /// None (nothing changed but the order hints, [`Slot::next`]) for anything else, which the
    /// full conversion then decides, refusals included.
    pub fn merge_raw(
        &mut self,
        body: &[u8],
        rules: &RawRules<'_>,
        oldest_ms: i64,
    ) -> Option<usize> {
        if !self
            .whitelist
            .as_ref()
            .is_some_and(|w| Arc::ptr_eq(w, rules.whitelist))
        {
            return None;
        }
        let mut writes = Vec::with_capacity(self.last_raw);
        let mut order = std::mem::take(&mut self.order);
        let mark = self.patch.as_mut().map(|patch| {
            patch.reserve(self.last_raw * (8 + 12 + 10));
            patch.mark()
        });
        let mut newest_ms = i64::MIN;
        let merged = self.raw_writes(body, rules, &mut writes, &mut order, &mut newest_ms);
        self.order = order;
        let merged = merged.filter(|_| {
            if self.oldest_bound >= oldest_ms {
                return true;
            }
            // Past the bound: the slots themselves say whether a series would now be dropped.
            let oldest = self.slots.iter().map(|slot| slot.timestamp_ms).min();
            let oldest = oldest.unwrap_or(i64::MAX);
            // The true oldest once these writes stand (they do when it passes); on a refusal
            // they are set back, and what was read here is no bound.
            let passes = oldest >= oldest_ms;
            if passes {
                self.oldest_bound = oldest;
            }
            passes
        });
        let Some(count) = merged else {
            // Not merged after all: each write's bytes and slot timestamp back as they were,
            // the last first (a series named twice was written twice), and its patch ranges
            // dropped.
            for write in writes.iter().rev() {
                let at = write.at as usize;
                let len = usize::from(write.len);
                if let Some(stored) = self.payload.get_mut(at..at + len) {
                    stored.copy_from_slice(&write.before[..len]);
                }
                if let Some(slot) = self.slots.get_mut(write.slot as usize) {
                    slot.timestamp_ms = write.before_ms;
                }
            }
            if let (Some(patch), Some(mark)) = (&mut self.patch, mark) {
                patch.rewind(mark);
            }
            return None;
        };
        self.last_raw = writes.len();
        self.order.truncate(count);
        self.newest_received = self.newest_received.max(newest_ms);
        self.newest_sample = self.newest_sample.max(newest_ms);
        Some(count)
    }

    /// The series of a raw request (see [`CachedCluster::merge_raw`]) and what each writes, in
    /// order, into `writes`: each winning slot's timestamp is set as it goes (so a series named
    /// twice is compared with its first sample), and the caller sets them back when this answers
    /// None. The series count. `order` holds the slots of the last raw request in its order
    /// (for [`CachedCluster::prefetch_ahead`]), and is rewritten with this one's as it goes.
    fn raw_writes(
        &mut self,
        body: &[u8],
        rules: &RawRules<'_>,
        writes: &mut Vec<RawWrite>,
        order: &mut Vec<u32>,
        newest_ms: &mut i64,
    ) -> Option<usize> {
        let mut count = 0usize;
        // As `series::encode_series` writes it: untyped { value }, timestamp_ms; the timestamp's
        // varint encoded once for the series that share it (most often all of a request's).
        let mut tail = [0u8; TAIL_MAX];
        tail[..3].copy_from_slice(&VALUE_KEYS);
        tail[11] = 0x30;
        let mut tail_len = 0;
        let mut encoded_ms = None;
        let mut rest = body;
        // The slot of the request's previous series, whose hint guesses this one's.
        let mut previous = NO_SLOT;
        // Its `__name__`, as sent.
        let mut previous_name: &[u8] = &[];
        // The payload bytes of the series ahead are asked for before they are compared and
        // written: the cached payloads are many times the CPU's caches and a request's series
        // are not in payload order, so each series waited for memory.
        for (at, &s) in order.iter().enumerate().take(SLOT_AHEAD) {
            match at < PREFETCH_AHEAD {
                true => self.prefetch_payload(s),
                false => self.prefetch_slot(s),
            }
        }
        while !rest.is_empty() {
            let (key, field) = next_field(&mut rest)?;
            if key >> 3 != 1 {
                continue;
            }
            let series = field.filter(|_| key & 7 == 2)?;
            count += 1;
            if count > rules.max_series {
                return None;
            }
            let guess = match self.slots.get(previous as usize) {
                Some(slot) => slot.next,
                None => NO_SLOT,
            };
            let RawSeries {
                name,
                identity,
                value,
                timestamp_ms,
                expected,
            } = raw_series(series, self.identity(guess))?;
            if timestamp_ms < rules.oldest_ms
                || timestamp_ms > rules.newest_ms
                || is_stale_marker(value)
            {
                return None;
            }
            let s = match expected && self.family_named(guess, name) {
                true => guess,
                false => {
                    // A series of the family before it (most are: a sender writes a family's
                    // series together) is of that family: no UTF-8 check and hashing of its
                    // name, as a request without hints yet (a cluster's second) did per series.
                    let f = match self.slots.get(previous as usize) {
                        Some(slot) if same(previous_name, name) => slot.family,
                        _ => *self.by_name.get(std::str::from_utf8(name).ok()?)?,
                    };
                    let s = self.find(f, identity)?;
                    if let Some(slot) = self.slots.get_mut(previous as usize) {
                        slot.next = s;
                    }
                    s
                }
            };
            self.prefetch_ahead(order, count - 1);
            match order.get_mut(count - 1) {
                Some(at) => *at = s,
                None => order.push(s),
            }
            previous = s;
            previous_name = name;
            let slot = &mut self.slots[s as usize];
            if !slot.converted || !self.families[slot.family as usize].remote_write {
                return None;
            }
            if timestamp_ms >= slot.timestamp_ms {
                if encoded_ms != Some(timestamp_ms) {
                    tail_len = 12 + encode_varint_into(timestamp_ms as u64, &mut tail[12..]);
                    encoded_ms = Some(timestamp_ms);
                }
                if (slot.len - slot.labels) as usize != tail_len {
                    return None;
                }
                tail[3..11].copy_from_slice(&value.to_le_bytes());
                // Written here, while the series' bytes are in the CPU's cache from its
                // comparison, rather than in a pass of its own once the request was walked (whose
                // reads of the slots and payload waited for memory again); set back from
                // `writes` when the request is not merged after all.
                let at = slot.start + slot.labels;
                let stored = self.payload.get_mut(at as usize..at as usize + tail_len)?;
                let mut write = RawWrite {
                    slot: s,
                    at,
                    len: 0,
                    before: [0; TAIL_MAX],
                    before_ms: slot.timestamp_ms,
                };
                // Only the bytes that differ are written and journaled: the keys are there
                // already, a value that did not change since the last sample (a constant gauge,
                // an idle counter) keeps its 8 bytes, and two timestamps a scrape interval apart
                // differ in their low varint bytes only. The range of a series sharing its
                // timestamp with the one before then ends like it, so the patch takes its offset
                // and length alone.
                if let Some((from, to)) = changed(stored, &tail[..tail_len]) {
                    write.at = at + from as u32;
                    write.len = (to - from) as u8;
                    write.before[..to - from].copy_from_slice(&stored[from..to]);
                    stored[from..to].copy_from_slice(&tail[from..to]);
                    if let Some(patch) = &mut self.patch {
                        patch.push(write.at, &tail[from..to]);
                    }
                }
                writes.push(write);
                slot.timestamp_ms = timestamp_ms;
                *newest_ms = (*newest_ms).max(timestamp_ms);
            }
        }
        (count > 0).then_some(count)
    }
}

/// What a raw request wrote over one slot ([`CachedCluster::raw_writes`]): what to set back
/// when the request is not merged after all.
struct RawWrite {
    slot: u32,
    /// The payload bytes written: from `at`, `len` of them (none when the sample was there
    /// already), and what they were before.
    at: u32,
    len: u8,
    before: [u8; TAIL_MAX],
    /// The slot's timestamp before.
    before_ms: i64,
}

/// Most bytes of a converted series' value and timestamp fields: 12 bytes of keys and value,
/// a timestamp varint of up to 10.
const TAIL_MAX: usize = 12 + 10;

/// The keys before a converted series' value: `untyped` (field 5, 9 bytes), its `value`.
const VALUE_KEYS: [u8; 3] = [0x2a, 0x09, 0x09];

/// Writes `n` as a varint at the start of `out` (10 bytes or more); the bytes written.
fn encode_varint_into(mut n: u64, out: &mut [u8]) -> usize {
    let mut i = 0;
    while n >= 0x80 && i + 1 < out.len() {
        out[i] = (n as u8) | 0x80;
        n >>= 7;
        i += 1;
    }
    out[i] = n as u8;
    i + 1
}

/// Whether `a` and `b` are the same bytes: `a == b`, a name shorter than a word compared in
/// line. A branch-free word loop (differences gathered by or) was tried for the longer ones and
/// took 5-10 % more of the raw merge's time than `memcmp` in a bench of the merge alone.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    match a.len() {
        0..8 => a.iter().zip(b).all(|(x, y)| x == y),
        _ => a == b,
    }
}

/// The bytes where `old` and `new` (of one length) differ: from the first that differs to after
/// the last; None when they are the same bytes. Comparing 8 bytes at a time (zero-padded words,
/// the first and last differing byte from the xor's trailing and leading zeros) was tried and
/// took more server CPU a sample, not less: 0.183-0.197 us against the byte loop's 0.163-0.202,
/// more in 5 of 6 rounds alternating in the same minutes.
#[inline]
fn changed(old: &[u8], new: &[u8]) -> Option<(usize, usize)> {
    let pairs = || old.iter().zip(new);
    let from = pairs().position(|(a, b)| a != b)?;
    let to = pairs()
        .rposition(|(a, b)| a != b)
        .map_or(from, |last| last + 1);
    Some((from, to))
}

/// What [`raw_series`] reads of one `TimeSeries`.
struct RawSeries<'s> {
    /// The `__name__` label's value, as sent.
    name: &'s [u8],
    /// The other labels' bytes: the series' identity within its family.
    identity: &'s [u8],
    value: f64,
    timestamp_ms: i64,
    /// Whether `identity` is the caller's `expected` identity.
    expected: bool,
}

/// One `TimeSeries` in the form [`CachedCluster::merge_raw`] takes: first the `__name__` label,
/// then the other labels, then one sample (exemplars and histograms skipped, as the conversion
/// skips them). `expected` (whole label fields: a slot's identity bytes; empty for none) is the
/// identity the caller guesses: when the labels start with those bytes they are compared at once
/// rather than walked label by label, with the same result.
fn raw_series<'s>(series: &'s [u8], expected: &[u8]) -> Option<RawSeries<'s>> {
    const NAME: &[u8] = b"\x0a\x08__name__\x12";
    let mut rest = series;
    let (key, first) = next_field(&mut rest)?;
    let first = first.filter(|_| key == 0x0a)?;
    let after = first.strip_prefix(NAME)?;
    let (len, n) = varint(after)?;
    // Bytes: compared with a family's name, which is UTF-8, or checked before a lookup by name.
    let name = after.get(n..).filter(|v| v.len() as u64 == len)?;
    let labels_start = series.len() - rest.len();
    let mut labels_end = labels_start;
    let skipped = !expected.is_empty()
        && rest
            .get(..expected.len())
            .is_some_and(|sent| same(sent, expected));
    if skipped {
        // Whole label fields: walking them would have moved `labels_end` exactly here.
        rest = rest.get(expected.len()..).unwrap_or_default();
        labels_end += expected.len();
    }
    let mut in_labels = true;
    let mut sample = None;
    // As senders write a series of one sample: that sample's field (under 128 bytes) is all
    // that is left once the labels are skipped, read without the field loop.
    if let [0x12, len, one @ ..] = rest {
        if *len < 0x80 && usize::from(*len) == one.len() {
            sample = Some(one);
            rest = &[];
        }
    }
    while !rest.is_empty() {
        let (key, field) = next_field(&mut rest)?;
        match (key >> 3, key & 7) {
            (1, 2) if in_labels => labels_end = series.len() - rest.len(),
            (1, _) => return None,
            (2, 2) => {
                in_labels = false;
                if sample.replace(field?).is_some() {
                    return None;
                }
            }
            (2, _) => return None,
            _ => in_labels = false,
        }
    }
    let (value, timestamp_ms) = raw_sample(sample?)?;
    let identity = series.get(labels_start..labels_end)?;
    Some(RawSeries {
        name,
        identity,
        value,
        timestamp_ms,
        // More labels after the expected ones: another series.
        expected: skipped && identity.len() == expected.len(),
    })
}

/// A `Sample`'s value and timestamp, read as the conversion reads them (absent: 0).
#[inline]
fn raw_sample(sample: &[u8]) -> Option<(f64, i64)> {
    // As every sender writes it: the value, then the timestamp (a varint of up to 8 bytes: ms
    // until the year 6429), nothing else.
    if let (Some(&0x09), Some(value), Some(&0x10), Some(timestamp)) = (
        sample.first(),
        sample.get(1..9),
        sample.get(9),
        sample.get(10..).filter(|t| (1..=8).contains(&t.len())),
    ) {
        if let (Some(value), Some(last)) = (value.first_chunk::<8>(), sample.last_chunk::<8>()) {
            // The timestamp's bytes, read at once from the last 8 of the sample.
            let n = timestamp.len();
            let word = u64::from_le_bytes(*last) >> (8 * (8 - n));
            if let Some(timestamp_ms) = exact_varint(word, n) {
                return Some((f64::from_le_bytes(*value), timestamp_ms as i64));
            }
        }
    }
    raw_sample_fields(sample)
}

/// The varint of exactly `n` bytes (1 to 8) held in the low bytes of `word`, little endian;
/// None when its last byte is not the `n`th. Without a loop a byte: a timestamp is 6.
#[inline]
fn exact_varint(word: u64, n: usize) -> Option<u64> {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The continuation bit set in every byte before the last, in none from it on.
    let marks = match n {
        2..=8 => HIGH >> (8 * (9 - n)),
        _ => 0,
    };
    if !(1..=8).contains(&n) || word & HIGH != marks {
        return None;
    }
    let mut value = 0;
    for i in 0..8 {
        value |= ((word >> (8 * i)) & 0x7f) << (7 * i);
    }
    Some(value)
}

/// [`raw_sample`] of a sample in any other layout: field by field.
#[cold]
fn raw_sample_fields(sample: &[u8]) -> Option<(f64, i64)> {
    let (mut value, mut timestamp_ms) = (0.0, 0);
    let mut rest = sample;
    while !rest.is_empty() {
        let before = rest;
        let (key, _) = next_field(&mut rest)?;
        match key {
            0x09 => {
                let bytes = before.get(1..9)?;
                value = f64::from_bits(u64::from_le_bytes(bytes.try_into().ok()?));
            }
            0x10 => timestamp_ms = varint(&before[1..])?.0 as i64,
            k if k >> 3 == 1 || k >> 3 == 2 => return None,
            _ => {}
        }
    }
    Some((value, timestamp_ms))
}

/// Reads one field at the start of `rest` (a key that fits 32 bits with a number above 0, and
/// wire type 0, 1, 2 or 5) and moves past it: the key, and a length-delimited field's bytes.
#[inline(always)]
fn next_field<'a>(rest: &mut &'a [u8]) -> Option<(u64, Option<&'a [u8]>)> {
    let (key, n) = varint(rest)?;
    if key > u64::from(u32::MAX) || key >> 3 == 0 {
        return None;
    }
    let body = rest.get(n..)?;
    let (bytes, used) = match key & 7 {
        0 => (None, varint(body)?.1),
        1 => (None, 8),
        2 => {
            let (len, m) = varint(body)?;
            let len = usize::try_from(len).ok()?;
            (Some(body.get(m..m.checked_add(len)?)?), m + len)
        }
        5 => (None, 4),
        _ => return None,
    };
    *rest = body.get(used..)?;
    Some((key, bytes))
}

/// The hash of one series' identity within family `family`.
///
/// Keyed by `seed` (random per entry) and fast (multiply-rotate over 8-byte words): SipHash over
/// every request series' ~100 label bytes cost remote-write ingest a twentieth of its CPU. Not
/// collision resistant, and it need not be: a series whose hash another took is left out of the
/// index and found by nobody, so a request naming it takes the full merge, which costs its own
/// cluster's sender time, no one else's.
fn key_hash(seed: u64, family: u32, identity: &[u8]) -> u64 {
    const P1: u64 = 0x9E37_79B9_7F4A_7C15;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let mut h = seed ^ (u64::from(family).wrapping_mul(P1)) ^ (identity.len() as u64);
    let mut words = identity.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(P2).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    let rest = words.remainder();
    tail.get_mut(..rest.len())
        .unwrap_or_default()
        .copy_from_slice(rest);
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(P1);
    h ^ (h >> 32)
}

/// The length of the leading `label` fields (field 1) of an encoded `Metric` message: its
/// identity bytes. Two messages with the same identity bytes have the same label set (so are the
/// same series to the merge). None when a label field comes after another field (its labels are
/// not a prefix) or the message cannot be walked.
fn label_prefix(message: &[u8]) -> Option<usize> {
    let mut at = 0;
    let mut prefix = 0;
    let mut in_labels = true;
    while at < message.len() {
        let (key, n) = varint(&message[at..])?;
        at += n;
        let number = key >> 3;
        match key & 7 {
            0 => at += varint(message.get(at..)?)?.1,
            1 => at += 8,
            2 => {
                let (len, n) = varint(message.get(at..)?)?;
                at = at.checked_add(n)?.checked_add(usize::try_from(len).ok()?)?;
            }
            5 => at += 4,
            _ => return None,
        }
        if at > message.len() {
            return None;
        }
        if number == 1 {
            if !in_labels || key & 7 != 2 {
                return None;
            }
            prefix = at;
        } else {
            in_labels = false;
        }
    }
    Some(prefix)
}

/// A protobuf varint at the start of `bytes`: its value and length.
#[inline]
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    // Keys, label lengths and most values are one byte: no loop for them.
    if let Some(&b) = bytes.first().filter(|&&b| b < 0x80) {
        return Some((u64::from(b), 1));
    }
    // Nor for two: a series' length (a hundred bytes or more).
    if let [low, high, ..] = *bytes {
        if high < 0x80 {
            return Some((u64::from(low & 0x7f) | u64::from(high) << 7, 2));
        }
    }
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some((value, i + 1));
        }
    }
    None
}

fn kind(raw_type: Option<i32>) -> MetricType {
    raw_type
        .and_then(|t| MetricType::try_from(t).ok())
        .unwrap_or(MetricType::Untyped)
}

fn plain(value: &Value<'_>) -> Option<f64> {
    match value {
        Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => Some(*v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receive::merge::{merge_payloads, untyped_series};
    use telemeter_common::delimited;
    use telemeter_common::model::{LabelPair, MetricFamily};

    fn family(name: &str, help: &str, series: &[(&str, f64, i64)]) -> MetricFamily {
        MetricFamily {
            name: Some(name.into()),
            help: Some(help.into()),
            r#type: Some(MetricType::Untyped as i32),
            metric: series
                .iter()
                .map(|(job, v, ts)| {
                    untyped_series(
                        vec![LabelPair::new("_id", "c"), LabelPair::new("job", job)],
                        *v,
                        *ts,
                    )
                })
                .collect(),
        }
    }

    fn rw(name: &str, series: &[(&str, f64, i64)]) -> Vec<u8> {
        delimited::encode(&[family(name, REMOTE_WRITE_HELP, series)])
    }

    /// The cached entry after `delta`, by the in-place path when it applies (says which), checked
    /// byte for byte against the full merge of the same inputs.
    fn merged(entry: &mut CachedCluster, delta: &[u8], oldest_ms: i64) -> bool {
        let full = merge_payloads(entry.payload(), delta, oldest_ms).unwrap();
        let in_place = entry.merge_in_place(delta, oldest_ms);
        if in_place {
            assert_eq!(entry.payload(), &full.payload[..]);
            assert_eq!(entry.series(), full.series);
            assert_eq!(entry.newest_received(), full.newest_received);
        }
        in_place
    }

    fn cached(payload: Vec<u8>) -> CachedCluster {
        let full = merge_payloads(&[], &payload, 0).unwrap();
        CachedCluster::build(full.payload, full.newest_received).unwrap_or_else(|_| panic!())
    }

    /// The raw-merge rules of these tests: samples from 1000 ms on, at most `max_series`.
    fn raw_rules(whitelist: &Arc<Vec<Selector>>, max_series: usize) -> RawRules<'_> {
        RawRules {
            oldest_ms: 1000,
            newest_ms: 1 << 40,
            max_series,
            whitelist,
        }
    }

    /// A cluster of series A and B (one sample each at 2000 ms), cached and marked as this
    /// process's conversion under `whitelist`.
    fn a_and_b_marked(whitelist: &Arc<Vec<Selector>>) -> CachedCluster {
        let first = convert(&request(&[(A, &[(1.0, 2000)]), (B, &[(1.0, 2000)])]));
        let mut entry = cached(first.clone());
        entry.mark_converted(&first, whitelist);
        entry
    }

    #[test]
    fn known_series_merge_in_place_exactly_as_the_full_merge() {
        let mut payload = rw("up", &[("a", 1.0, 1000), ("b", 1.0, 1000)]);
        payload.extend(rw("x", &[("a", 1.0, 1000)]));
        let mut entry = cached(payload);
        // Newer samples win, an older one is ignored, a series named twice takes the last.
        let mut delta = rw("up", &[("b", 2.0, 2000), ("a", 7.0, 500)]);
        delta.extend(rw("x", &[("a", 3.0, 1500), ("a", 4.0, 1500)]));
        assert!(merged(&mut entry, &delta, 0));
        let families = delimited::decode(entry.payload(), &UNLIMITED).unwrap();
        let values: Vec<(f64, i64)> = families
            .iter()
            .flat_map(|f| f.metric.iter())
            .map(|m| (m.untyped.unwrap().value.unwrap(), m.timestamp_ms.unwrap()))
            .collect();
        assert_eq!(values, vec![(1.0, 1000), (2.0, 2000), (4.0, 1500)]);
        assert_eq!(entry.newest_received(), 2000);
        // What the store would read from the payload, from the slots.
        assert_eq!(
            entry.newest_sample(),
            wire::newest_timestamp(entry.payload()).unwrap()
        );
        assert_eq!(entry.newest_sample(), Some(2000));
        // The patch recorded (over the payload before) rebuilds the payload after.
        let mut before = rw("up", &[("a", 1.0, 1000), ("b", 1.0, 1000)]);
        before.extend(rw("x", &[("a", 1.0, 1000)]));
        let mut entry = cached(before.clone());
        entry.record_patch(1);
        assert!(merged(&mut entry, &delta, 0));
        let patch = entry.take_patch().unwrap();
        assert!(!patch.is_empty() && patch.len() < entry.payload().len());
        assert_eq!(crate::store::apply_patch(&mut before, &patch), Ok(()));
        assert_eq!(before, entry.payload());
    }

    #[test]
    fn anything_else_takes_the_full_merge_and_changes_nothing() {
        let payload = rw("up", &[("a", 1.0, 1000), ("b", 1.0, 1000)]);
        let stale = f64::from_bits(0x7ff0_0000_0000_0002);
        let upload = delimited::encode(&[family("up", "from an upload", &[("a", 1.0, 3000)])]);
        let mut gauge = family("up", REMOTE_WRITE_HELP, &[("a", 1.0, 3000)]);
        gauge.r#type = Some(MetricType::Gauge as i32);
        let cases: Vec<(&str, Vec<u8>, i64)> = vec![
            ("a new series", rw("up", &[("c", 1.0, 2000)]), 0),
            ("a new family", rw("down", &[("a", 1.0, 2000)]), 0),
            ("a staleness marker", rw("up", &[("a", stale, 2000)]), 0),
            // A longer timestamp varint: the message changes length.
            ("a longer message", rw("up", &[("a", 1.0, 1 << 40)]), 0),
            ("a series past the TTL", rw("up", &[("a", 1.0, 2000)]), 1500),
            ("a type change", delimited::encode(&[gauge]), 0),
        ];
        for (what, delta, oldest_ms) in cases {
            let mut entry = cached(payload.clone());
            let before = entry.payload().to_vec();
            assert!(!merged(&mut entry, &delta, oldest_ms), "{what}");
            assert_eq!(entry.payload(), &before[..], "{what}");
        }
        // Remote write's help replaces an upload's: a help change.
        let mut entry = cached(upload);
        assert!(!merged(&mut entry, &rw("up", &[("a", 1.0, 3000)]), 0));
        // The other way round: an upload's help is kept under remote write's, in place.
        let mut entry = cached(payload);
        let upload = delimited::encode(&[family("up", "from an upload", &[("a", 1.0, 3000)])]);
        assert!(merged(&mut entry, &upload, 0));
    }

    #[test]
    fn labels_in_another_order_are_not_matched_in_place() {
        let mut entry = cached(rw("up", &[("a", 1.0, 1000)]));
        let mut reversed = family("up", REMOTE_WRITE_HELP, &[("a", 2.0, 2000)]);
        reversed.metric[0].label.reverse();
        // The same series to the full merge, not byte-equal labels: the full merge decides.
        assert!(!merged(&mut entry, &delimited::encode(&[reversed]), 0));
    }

    /// One series of a test request: its labels (in the order given) and samples.
    type RawSeries<'a> = (&'a [(&'a str, &'a str)], &'a [(f64, i64)]);

    /// A remote-write body.
    fn request(series: &[RawSeries<'_>]) -> Vec<u8> {
        use crate::remote_write::proto::{Label, Sample, TimeSeries, WriteRequest};
        let timeseries = series
            .iter()
            .map(|(labels, samples)| TimeSeries {
                labels: labels
                    .iter()
                    .map(|(n, v)| Label {
                        name: n.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                samples: samples
                    .iter()
                    .map(|&(value, timestamp)| Sample { value, timestamp })
                    .collect(),
            })
            .collect();
        prost::Message::encode_to_vec(&WriteRequest { timeseries })
    }

    fn convert(body: &[u8]) -> Vec<u8> {
        let rules = crate::receive::series::SeriesRules {
            partition_label: "_id",
            cluster_id: "c",
            elide: &[],
            extra_labels: &[],
            required_labels: &[],
            whitelist: &[],
            oldest_ms: 1000,
            newest_ms: 1 << 40,
            max_series: 100,
            max_samples: 1000,
        };
        crate::receive::series::convert(body, &rules)
            .unwrap()
            .payload
    }

    const A: &[(&str, &str)] = &[("__name__", "up"), ("_id", "c"), ("job", "a")];
    const B: &[(&str, &str)] = &[("__name__", "up"), ("_id", "c"), ("job", "b")];

    #[test]
    fn a_first_request_is_its_own_payload_exactly_as_merged_into_nothing() {
        let whitelist = Arc::new(Vec::new());
        let c: &[(&str, &str)] = &[("__name__", "down"), ("_id", "c"), ("job", "c")];
        let first = convert(&request(&[
            (A, &[(1.0, 2000)]),
            (c, &[(2.0, 2500)]),
            (B, &[(3.0, 2000)]),
        ]));
        let entry = CachedCluster::build_converted(first.clone(), 1000, &whitelist)
            .unwrap_or_else(|_| panic!("built"));
        let full = merge_payloads(&[], &first, 1000).unwrap();
        assert_eq!(entry.payload(), &full.payload[..]);
        assert_eq!(entry.series(), full.series);
        assert_eq!(entry.newest_received(), full.newest_received);
        assert_eq!(entry.newest_sample(), Some(2500));
        // Marked as `mark_converted` would: the next request of these series merges raw.
        let mut marked = cached(first.clone());
        marked.mark_converted(&first, &whitelist);
        assert!(entry.slots.iter().all(|slot| slot.converted));
        assert_eq!(marked.slots.len(), entry.slots.len());
        assert!(marked.slots.iter().all(|slot| slot.converted));
        let mut entry = entry;
        let next = request(&[
            (A, &[(4.0, 3000)]),
            (c, &[(5.0, 3000)]),
            (B, &[(6.0, 3000)]),
        ]);
        let full = merge_payloads(entry.payload(), &convert(&next), 0).unwrap();
        assert_eq!(
            entry.merge_raw(&next, &raw_rules(&whitelist, 100), 0),
            Some(3)
        );
        assert_eq!(entry.payload(), &full.payload[..]);
        // What the merge would change is left to it: a series named twice, a staleness marker,
        // a series past the TTL.
        let stale = f64::from_bits(0x7ff0_0000_0000_0002);
        for (what, delta, oldest_ms) in [
            (
                "named twice",
                convert(&request(&[(A, &[(1.0, 2000)]), (A, &[(2.0, 3000)])])),
                0,
            ),
            (
                "a staleness marker",
                convert(&request(&[(A, &[(1.0, 2000)]), (B, &[(stale, 2000)])])),
                0,
            ),
            (
                "past the TTL",
                convert(&request(&[(A, &[(1.0, 2000)]), (B, &[(1.0, 3000)])])),
                2500,
            ),
        ] {
            let merged = merge_payloads(&[], &delta, oldest_ms).unwrap();
            assert_ne!(merged.payload, delta, "{what}");
            let back = CachedCluster::build_converted(delta.clone(), oldest_ms, &whitelist);
            assert_eq!(back.err(), Some(delta), "{what}");
        }
    }

    #[test]
    fn a_request_of_converted_series_merges_raw_exactly_as_converted() {
        let whitelist = Arc::new(Vec::new());
        let rules = raw_rules(&whitelist, 100);
        let first = convert(&request(&[(A, &[(1.0, 2000)]), (B, &[(1.0, 2000)])]));
        let mut entry = cached(first.clone());
        let next = request(&[(B, &[(2.0, 3000)]), (A, &[(3.0, 1500)])]);
        assert_eq!(entry.merge_raw(&next, &rules, 0), None, "not marked yet");
        entry.mark_converted(&first, &whitelist);
        let full = merge_payloads(entry.payload(), &convert(&next), 0).unwrap();
        assert_eq!(entry.merge_raw(&next, &rules, 0), Some(2));
        assert_eq!(entry.payload(), &full.payload[..]);
        assert_eq!(entry.newest_received(), full.newest_received);

        // Anything else is left to the conversion, and changes nothing.
        let reordered: &[(&str, &str)] = &[("__name__", "up"), ("job", "a"), ("_id", "c")];
        let stale = f64::from_bits(0x7ff0_0000_0000_0002);
        let other = &[("__name__", "up"), ("_id", "d"), ("job", "a")][..];
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("labels to sort", request(&[(reordered, &[(1.0, 4000)])])),
            ("a new series", request(&[(other, &[(1.0, 4000)])])),
            ("too old", request(&[(A, &[(1.0, 999)])])),
            ("too new", request(&[(A, &[(1.0, (1 << 40) + 1)])])),
            ("a staleness marker", request(&[(A, &[(stale, 4000)])])),
            ("two samples", request(&[(A, &[(1.0, 4000), (1.0, 4001)])])),
            ("no sample", request(&[(A, &[])])),
            ("no series", request(&[])),
            (
                "one known, one not",
                request(&[(A, &[(1.0, 4000)]), (other, &[(1.0, 4000)])]),
            ),
        ];
        for (what, body) in cases {
            let before = entry.payload().to_vec();
            assert_eq!(entry.merge_raw(&body, &rules, 0), None, "{what}");
            assert_eq!(entry.payload(), &before[..], "{what}");
        }
        let body = request(&[(A, &[(1.0, 4000)])]);
        let reloaded = Arc::new(Vec::new());
        let reloaded_rules = RawRules {
            whitelist: &reloaded,
            ..rules
        };
        assert_eq!(
            entry.merge_raw(&body, &reloaded_rules, 0),
            None,
            "whitelist reloaded"
        );
        assert_eq!(entry.merge_raw(&body, &rules, 3500), None, "B past the TTL");
        assert_eq!(entry.merge_raw(&body, &rules, 0), Some(1));
        // A series written by another path (an upload merged in place) is not converted any more.
        let upload = delimited::encode(&[family("up", "from an upload", &[("a", 5.0, 5000)])]);
        assert!(merged(&mut entry, &upload, 0));
        let body = request(&[(A, &[(1.0, 6000)])]);
        assert_eq!(
            entry.merge_raw(&body, &rules, 0),
            None,
            "written by an upload"
        );
    }

    /// Merges `body` raw into `entry` and checks it against the full merge of its conversion:
    /// payload, newest samples (kept as the merges go, against the payload's own).
    fn merged_raw(entry: &mut CachedCluster, body: &[u8], rules: &RawRules<'_>, oldest_ms: i64) {
        let full = merge_payloads(entry.payload(), &convert(body), oldest_ms).unwrap();
        assert!(entry.merge_raw(body, rules, oldest_ms).is_some());
        assert_eq!(entry.payload(), &full.payload[..]);
        assert_eq!(entry.newest_received(), full.newest_received);
        assert_eq!(
            entry.newest_sample(),
            wire::newest_timestamp(entry.payload()).unwrap()
        );
    }

    #[test]
    fn a_raw_request_refused_half_way_leaves_every_timestamp_as_it_was() {
        let whitelist = Arc::new(Vec::new());
        let rules = raw_rules(&whitelist, 100);
        let mut entry = a_and_b_marked(&whitelist);
        // A's sample would win, then a series not cached refuses the request: A is as it was, so
        // an older sample of A than the refused one still wins next.
        let other = &[("__name__", "up"), ("_id", "d"), ("job", "a")][..];
        let refused = request(&[(A, &[(9.0, 5000)]), (other, &[(1.0, 5000)])]);
        assert_eq!(entry.merge_raw(&refused, &rules, 0), None);
        merged_raw(&mut entry, &request(&[(A, &[(2.0, 4000)])]), &rules, 0);
        // The same when only the TTL refuses it (B would be dropped): then A is set back too.
        let refused = request(&[(A, &[(9.0, 6000)])]);
        assert_eq!(
            entry.merge_raw(&refused, &rules, 3000),
            None,
            "B past the TTL"
        );
        merged_raw(&mut entry, &request(&[(A, &[(3.0, 5000)])]), &rules, 0);
        // A series named twice: compared with its first sample, the newer (or later equal) wins.
        for twice in [
            request(&[
                (A, &[(4.0, 7000)]),
                (A, &[(5.0, 6500)]),
                (B, &[(1.0, 7000)]),
            ]),
            request(&[
                (A, &[(6.0, 8000)]),
                (A, &[(7.0, 8000)]),
                (B, &[(1.0, 8000)]),
            ]),
        ] {
            merged_raw(&mut entry, &twice, &rules, 0);
        }
    }

    #[test]
    fn the_oldest_bound_never_lets_a_series_past_the_ttl_be_kept() {
        let whitelist = Arc::new(Vec::new());
        let rules = raw_rules(&whitelist, 100);
        let mut entry = a_and_b_marked(&whitelist);
        assert_eq!(entry.oldest_bound, 2000);
        // Both moved on: the bound, still under the TTL's start, is not read again.
        let both = request(&[(A, &[(1.0, 5000)]), (B, &[(1.0, 5000)])]);
        merged_raw(&mut entry, &both, &rules, 0);
        assert_eq!(entry.oldest_bound, 2000);
        // Past the bound: the slots are read, and the bound moves up to what they hold.
        merged_raw(&mut entry, &request(&[(A, &[(1.0, 6000)])]), &rules, 3000);
        assert_eq!(entry.oldest_bound, 5000);
        // B (5000) is past a TTL that starts at 5500, whatever A does: the full merge drops it.
        let a = request(&[(A, &[(1.0, 7000)])]);
        assert_eq!(entry.merge_raw(&a, &rules, 5500), None);
        assert_eq!(
            entry.oldest_bound, 5000,
            "a refused merge's reads are no bound"
        );
        assert_eq!(entry.merge_raw(&a, &rules, 5500), None);
    }

    #[test]
    fn a_series_of_one_sample_reads_as_the_field_loop_reads_it() {
        let labels = b"\x0a\x0b\x0a\x03_id\x12\x04c-01";
        let sample = |value: f64, ts: u8| {
            let mut field = vec![0x12, 11, 0x09];
            field.extend_from_slice(&value.to_le_bytes());
            field.extend_from_slice(&[0x10, ts]);
            field
        };
        let series = |fields: &[&[u8]]| {
            let mut out = b"\x0a\x0e\x0a\x08__name__\x12\x02up".to_vec();
            out.extend_from_slice(labels);
            fields.iter().for_each(|f| out.extend_from_slice(f));
            out
        };
        let exemplar: &[u8] = b"\x1a\x02\x10\x05";
        for (expected, what) in [(&labels[..], "labels skipped"), (&b""[..], "labels walked")] {
            let one = series(&[&sample(2.5, 7)]);
            let read = raw_series(&one, expected).unwrap();
            assert_eq!(
                (read.value, read.timestamp_ms, read.identity),
                (2.5, 7, &labels[..])
            );
            // Anything after the sample: the loop reads it, with the same answer or a refusal.
            let then_exemplar = series(&[&sample(2.5, 7), exemplar]);
            let read = raw_series(&then_exemplar, expected).unwrap();
            assert_eq!((read.value, read.timestamp_ms), (2.5, 7), "{what}");
            let two = series(&[&sample(2.5, 7), &sample(3.5, 8)]);
            assert!(raw_series(&two, expected).is_none(), "{what}");
            // A samples field of the wrong wire type (which would read as the sample's
            // timestamp, were the bytes after the first sample taken as part of it).
            let wrong_type = series(&[&sample(2.5, 7), b"\x10\x09"]);
            assert!(raw_series(&wrong_type, expected).is_none(), "{what}");
        }
    }

    #[test]
    fn the_order_kept_for_prefetching_is_the_last_request_and_counted() {
        let whitelist = Arc::new(Vec::new());
        let rules = raw_rules(&whitelist, 2);
        let mut entry = a_and_b_marked(&whitelist);
        let bytes = entry.bytes();
        merged_raw(
            &mut entry,
            &request(&[(B, &[(1.0, 3000)]), (A, &[(1.0, 3000)])]),
            &rules,
            0,
        );
        let (a, b) = (
            entry.find(0, entry.identity(0)),
            entry.find(0, entry.identity(1)),
        );
        assert_eq!(entry.order, [b.unwrap(), a.unwrap()]);
        assert!(
            entry.bytes() >= bytes + 2 * 4,
            "counted in the cache's bytes"
        );
        merged_raw(&mut entry, &request(&[(A, &[(1.0, 4000)])]), &rules, 0);
        assert_eq!(entry.order, [a.unwrap()], "the last request's, no more");
        // Over the request's series cap: refused before the order passes it.
        let over = request(&[
            (A, &[(1.0, 5000)]),
            (B, &[(1.0, 5000)]),
            (A, &[(1.0, 5000)]),
        ]);
        assert_eq!(entry.merge_raw(&over, &rules, 0), None);
        assert!(entry.order.len() <= rules.max_series);
    }

    #[test]
    fn same_is_byte_equality() {
        let bytes: Vec<u8> = (0..40u8).collect();
        for len in 0..=bytes.len() {
            let a = &bytes[..len];
            // Another buffer of the same bytes, not the same slice.
            let copy = a.to_vec();
            assert!(same(a, &copy), "{len}");
            assert!(
                !same(a, &bytes[..len.saturating_sub(1)]) || len == 0,
                "{len}"
            );
            for at in 0..len {
                let mut b = a.to_vec();
                b[at] ^= 0x80;
                assert!(!same(a, &b), "{len} differs at {at}");
            }
        }
    }

    #[test]
    fn a_raw_merge_journals_only_the_bytes_that_changed() {
        let whitelist = Arc::new(Vec::new());
        let rules = raw_rules(&whitelist, 100);
        let first = request(&[(A, &[(1.0, 2000)]), (B, &[(2.0, 2000)])]);
        let mut entry = cached(convert(&first));
        entry.mark_converted(&convert(&first), &whitelist);
        // Each step: the payload is the full merge's, and the patch rebuilds it from the last.
        let step = |entry: &mut CachedCluster, body: &[u8]| {
            let full = merge_payloads(entry.payload(), &convert(body), 0).unwrap();
            let mut rebuilt = entry.payload().to_vec();
            entry.record_patch(1);
            assert_eq!(entry.merge_raw(body, &rules, 0), Some(2));
            assert_eq!(entry.payload(), &full.payload[..]);
            let patch = entry.take_patch().unwrap();
            assert_eq!(crate::store::apply_patch(&mut rebuilt, &patch), Ok(()));
            assert_eq!(rebuilt, entry.payload());
            patch
        };
        // Same values, the next timestamp (2000 and 3000 differ in both their varint bytes): the
        // timestamps' 2 bytes once, then only where B's range is (it ends as A's does). With the
        // whole value and timestamp, 11 bytes of A's and 8 of B's besides.
        let patch = step(
            &mut entry,
            &request(&[(A, &[(1.0, 3000)]), (B, &[(2.0, 3000)])]),
        );
        assert!(
            patch.len() <= 24 + (3 + 1 + 2) + (3 + 1),
            "{} bytes",
            patch.len()
        );
        // The same samples again: nothing written, nothing journaled.
        let patch = step(
            &mut entry,
            &request(&[(A, &[(1.0, 3000)]), (B, &[(2.0, 3000)])]),
        );
        assert!(patch.is_empty());
        // A new value: its changed bytes through the timestamp's.
        let patch = step(
            &mut entry,
            &request(&[(A, &[(5.0, 4000)]), (B, &[(2.0, 4000)])]),
        );
        assert!(!patch.is_empty());
        // Refused after A was read, once or twice (B is a staleness marker): nothing of it
        // stays, in the payload, the patch or the slots' timestamps (the next step compares).
        let stale = f64::from_bits(0x7ff0_0000_0000_0002);
        for refused in [
            request(&[(A, &[(7.0, 5000)]), (B, &[(stale, 5000)])]),
            request(&[
                (A, &[(7.0, 5000)]),
                (A, &[(8.0, 6000)]),
                (B, &[(stale, 6000)]),
            ]),
        ] {
            let before = entry.payload().to_vec();
            entry.record_patch(1);
            assert_eq!(entry.merge_raw(&refused, &rules, 0), None);
            assert_eq!(entry.payload(), &before[..]);
            assert!(entry.take_patch().unwrap().is_empty());
        }
        step(
            &mut entry,
            &request(&[(A, &[(7.0, 4000)]), (B, &[(2.0, 4500)])]),
        );
        assert_eq!(changed(b"abcd", b"abcd"), None);
        assert_eq!(changed(b"abcd", b"xbcd"), Some((0, 1)));
        assert_eq!(changed(b"abcd", b"abxd"), Some((2, 3)));
        assert_eq!(changed(b"abcd", b"xbcy"), Some((0, 4)));
    }

    #[test]
    fn a_request_in_the_order_of_the_last_finds_its_series_by_the_hints() {
        let whitelist = Arc::new(Vec::new());
        let rules = raw_rules(&whitelist, 100);
        let c: &[(&str, &str)] = &[("__name__", "down"), ("_id", "c"), ("job", "c")];
        let first = request(&[
            (A, &[(1.0, 2000)]),
            (c, &[(1.0, 2000)]),
            (B, &[(1.0, 2000)]),
        ]);
        let mut entry = cached(convert(&first));
        entry.mark_converted(&convert(&first), &whitelist);
        assert_eq!(entry.merge_raw(&first, &rules, 0), Some(3), "hints set");
        // With only A in the index, only the hints can find the series after it.
        let up = entry.by_name["up"];
        let a = entry.slots.iter().position(|s| s.family == up).unwrap() as u32;
        let index = entry.index.clone();
        entry.index.retain(|_, s| *s == a);
        let same = request(&[
            (A, &[(2.0, 3000)]),
            (c, &[(3.0, 3000)]),
            (B, &[(4.0, 3000)]),
        ]);
        let full = merge_payloads(entry.payload(), &convert(&same), 0).unwrap();
        let mut rebuilt = entry.payload().to_vec();
        entry.record_patch(1);
        assert_eq!(entry.merge_raw(&same, &rules, 0), Some(3));
        assert_eq!(entry.payload(), &full.payload[..]);
        // The patch rebuilds it, and carries each series' value and timestamp without the keys
        // that were there already: up to 3 bytes of range, 8 of value, 1 key, 2 of timestamp
        // (with the keys, at least 2 + 14).
        let patch = entry.take_patch().unwrap();
        assert_eq!(crate::store::apply_patch(&mut rebuilt, &patch), Ok(()));
        assert_eq!(rebuilt, entry.payload());
        assert!(
            patch.len() <= 24 + 3 * (3 + 8 + 1 + 2),
            "after the 24-byte header"
        );
        // Another order misses a hint, and the index cannot answer: the conversion decides.
        let other = request(&[(A, &[(2.0, 4000)]), (B, &[(4.0, 4000)])]);
        let before = entry.payload().to_vec();
        assert_eq!(entry.merge_raw(&other, &rules, 0), None);
        assert_eq!(entry.payload(), &before[..]);
        // With the index back, a wrong hint costs the lookup and changes no result.
        entry.index = index;
        for order in [
            request(&[(A, &[(2.0, 4000)]), (B, &[(4.0, 4000)])]),
            request(&[
                (A, &[(5.0, 5000)]),
                (c, &[(6.0, 5000)]),
                (B, &[(7.0, 5000)]),
            ]),
            request(&[(c, &[(1.0, 6000)]), (A, &[(1.0, 6000)])]),
        ] {
            let full = merge_payloads(entry.payload(), &convert(&order), 0).unwrap();
            assert!(entry.merge_raw(&order, &rules, 0).is_some());
            assert_eq!(entry.payload(), &full.payload[..]);
        }
        // A's labels under c's name: the hint after c points at A, whose identity bytes are the
        // same, but it is another family's series, not taken for this one.
        let twin: &[(&str, &str)] = &[("__name__", "down"), ("_id", "c"), ("job", "a")];
        let body = request(&[(c, &[(1.0, 7000)]), (twin, &[(1.0, 7000)])]);
        let before = entry.payload().to_vec();
        assert_eq!(
            entry.merge_raw(&body, &rules, 0),
            None,
            "not a known series"
        );
        assert_eq!(entry.payload(), &before[..]);
        // A's labels and one more, where the hint expects A: another series too.
        let longer: &[(&str, &str)] = &[
            ("__name__", "up"),
            ("_id", "c"),
            ("job", "a"),
            ("zone", "z"),
        ];
        let body = request(&[(c, &[(1.0, 7000)]), (longer, &[(1.0, 7000)])]);
        assert_eq!(
            entry.merge_raw(&body, &rules, 0),
            None,
            "not a known series"
        );
        assert_eq!(entry.payload(), &before[..]);
    }

    #[test]
    fn a_timestamp_read_at_once_is_the_varint_read_byte_by_byte() {
        let mut values = vec![0u64, 1, 127, 128, 1000, (1 << 56) - 1];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x >> (x % 64));
        }
        for value in values {
            let mut sample = vec![0x09];
            sample.extend_from_slice(&1.5f64.to_le_bytes());
            sample.push(0x10);
            prost::encoding::encode_varint(value, &mut sample);
            let expected = match sample.len() - 10 {
                1..=8 => Some((1.5, value as i64)),
                _ => raw_sample_fields(&sample),
            };
            assert_eq!(raw_sample(&sample), expected, "{value}");
            assert_eq!(raw_sample_fields(&sample), Some((1.5, value as i64)));
            // Each varint of 1 to 8 bytes, read as longer or shorter than it is: refused.
            let bytes = &sample[10..];
            let n = bytes.len();
            if n <= 8 {
                let mut word = [0u8; 8];
                word[..n].copy_from_slice(bytes);
                let word = u64::from_le_bytes(word);
                assert_eq!(exact_varint(word, n), Some(value));
                for m in (1..=8).filter(|&m| m != n) {
                    let masked = match m {
                        8 => word,
                        _ => word & ((1u64 << (8 * m)) - 1),
                    };
                    assert_eq!(exact_varint(masked, m), None, "{value} as {m} bytes");
                }
            }
        }
    }

    #[test]
    fn a_sample_reads_the_same_in_any_layout() {
        let v = 2.5f64.to_le_bytes();
        let mut usual = vec![0x09];
        usual.extend_from_slice(&v);
        usual.extend_from_slice(&[0x10, 0xe8, 0x07]);
        assert_eq!(raw_sample(&usual), Some((2.5, 1000)));
        let mut reversed = vec![0x10, 0xe8, 0x07, 0x09];
        reversed.extend_from_slice(&v);
        assert_eq!(raw_sample(&reversed), Some((2.5, 1000)));
        assert_eq!(raw_sample(&usual[..9]), Some((2.5, 0)), "no timestamp");
        let mut more = usual.clone();
        more.extend_from_slice(&[0x18, 0x01]);
        assert_eq!(
            raw_sample(&more),
            Some((2.5, 1000)),
            "an unknown field skipped"
        );
        assert_eq!(raw_sample(&usual[..usual.len() - 1]), None, "cut short");
        let mut twice = usual.clone();
        twice.extend_from_slice(&[0x10, 0x01]);
        assert_eq!(
            raw_sample(&twice),
            Some((2.5, 1)),
            "the last one, as prost reads it"
        );
    }

    #[test]
    fn label_prefix_is_the_leading_labels_only() {
        let m = untyped_series(vec![LabelPair::new("a", "1")], 1.0, 5);
        let bytes = prost::Message::encode_to_vec(&m);
        let prefix = label_prefix(&bytes).unwrap();
        assert_eq!(prefix, 8, "key, length, then name and value: 2 + 2 + 2 + 2");
        // A label after the value: not a prefix.
        let mut late = bytes.clone();
        late.extend_from_slice(&bytes[..prefix]);
        assert_eq!(label_prefix(&late), None);
        assert_eq!(label_prefix(&[0x0a, 0x05, 0x01]), None, "truncated");
    }

    #[test]
    fn an_entry_holds_no_spare_room_of_the_merge() {
        let series: Vec<(String, f64, i64)> =
            (0..500).map(|i| (format!("job-{i}"), 1.0, 1000)).collect();
        let series: Vec<(&str, f64, i64)> = series
            .iter()
            .map(|(j, v, t)| (j.as_str(), *v, *t))
            .collect();
        let request = rw("up", &series);
        let full = merge_payloads(&request, &request, 0).unwrap();
        assert!(
            full.payload.capacity() >= 2 * full.payload.len(),
            "the merge's reserve"
        );
        let len = full.payload.len();
        let entry =
            CachedCluster::build(full.payload, full.newest_received).unwrap_or_else(|_| panic!());
        assert_eq!(entry.payload.capacity(), len);
        // What the cache counts: the payload, 32 bytes a slot and the index.
        assert!(
            entry.bytes() < len + 500 * (32 + 40),
            "{} for {len}",
            entry.bytes()
        );
    }

    #[test]
    fn the_lru_is_bounded_by_bytes() {
        let mut lru = Lru::default();
        let one = cached(rw("up", &[("a", 1.0, 1000)]));
        let size = one.bytes();
        lru.put("one", 1, one, size * 2);
        lru.put("two", 2, cached(rw("up", &[("a", 1.0, 1000)])), size * 2);
        lru.put("three", 3, cached(rw("up", &[("a", 1.0, 1000)])), size * 2);
        assert!(!lru.entries.contains_key("one"), "least recently used out");
        assert!(lru.entries.contains_key("two") && lru.entries.contains_key("three"));
        assert!(lru.bytes <= size * 2);
    }
}
