//! A cluster's last upload as converted, so that its next one, which nearly always carries the
//! same series with new values and timestamps, is converted by comparing and patching instead of
//! reading every label again.
//!
//! A family of gauges, counters or untyped series stored the usual way ([`super::convert`]'s
//! simple series) becomes entries that depend on its stored bytes alone, and each series' value
//! and timestamp bytes are copied unchanged into its entry: the double as it is, the timestamp's
//! varint as it is when it is the shortest one (what the conversion writes). So when a family's
//! bytes equal the cached family's everywhere but in those value and timestamp bytes, and those
//! are of the same shape (a double that is not zero, which the conversion would leave out; a
//! shortest varint of the same length), its entries are the cached entries with the new bytes
//! written over the old: the conversion would read the same framing and labels and write the same
//! bytes around them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Where one series' value (a double) or timestamp (a varint) is: in its family's stored bytes,
/// from the family's first byte (its length), and in its entries, from the family's first entry.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    input_at: u32,
    output_at: u32,
    len: u8,
    kind: Kind,
}

/// What a slot holds, and how its entry holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A double, copied.
    Double,
    /// A timestamp's varint, copied.
    Stamp,
    /// A count's varint (a histogram's bucket, sample count, a summary's sample count), written
    /// as the double of its value.
    Count,
}

impl Slot {
    /// Whether `bytes` (this slot's length) convert to bytes of the same length: a double that is
    /// not ±0 (a zero value is left out of its sample), or a varint of exactly this length that is
    /// the shortest one and not zero (a zero timestamp or count is left out).
    #[inline]
    fn fits(&self, bytes: &[u8]) -> bool {
        match self.kind {
            Kind::Stamp | Kind::Count => match bytes.split_last() {
                Some((&last, init)) => last != 0 && last < 0x80 && init.iter().all(|&b| b >= 0x80),
                None => false,
            },
            Kind::Double => match bytes.first_chunk::<8>() {
                Some(&double) => u64::from_le_bytes(double) << 1 != 0,
                None => false,
            },
        }
    }

    /// Writes what `bytes` (which [`Slot::fits`]) convert to at the start of `to`.
    #[inline]
    fn write(&self, bytes: &[u8], to: &mut [u8]) {
        match self.kind {
            Kind::Double | Kind::Stamp => {
                if let Some(to) = to.get_mut(..bytes.len()) {
                    to.copy_from_slice(bytes);
                }
            }
            Kind::Count => {
                let count = bytes
                    .iter()
                    .rev()
                    .fold(0u64, |v, &b| (v << 7) | u64::from(b & 0x7f));
                if let Some(to) = to.get_mut(..8) {
                    to.copy_from_slice(&(count as f64).to_le_bytes());
                }
            }
        }
    }
}

/// One family of a cached upload: its bytes, its entries, its slots and where each entry ends.
#[derive(Clone, Copy, Debug, Default)]
struct Family {
    input: (u32, u32),
    output: (u32, u32),
    slots: (u32, u32),
    entries: (u32, u32),
    /// False when something in it is not a slot the conversion copies (a series read the general
    /// way, one without a timestamp): it is then always converted.
    cacheable: bool,
}

/// The last upload of a cluster that was not wholly converted from the cache, as converted.
#[derive(Default)]
pub(super) struct ClusterCache {
    input: Vec<u8>,
    output: Vec<u8>,
    families: Vec<Family>,
    slots: Vec<Slot>,
    /// Where each entry of a family ends, from the family's first entry, and its sample field's
    /// bytes.
    entries: Vec<(u32, u8)>,
    used: Option<Instant>,
}

impl ClusterCache {
    /// The bytes it holds allocated.
    fn bytes(&self) -> usize {
        self.input.capacity()
            + self.output.capacity()
            + self.families.capacity() * std::mem::size_of::<Family>()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.entries.capacity() * std::mem::size_of::<(u32, u8)>()
    }

    fn clear(&mut self) {
        self.input.clear();
        self.output.clear();
        self.families.clear();
        self.slots.clear();
        self.entries.clear();
    }

    /// When family `index` of the cached upload is the family `rest` starts with but for its
    /// slots' bytes: its entries, with those bytes, appended to `out`, where each ends (and its
    /// sample field's bytes) to `pending`; returns the family's length in `rest`. `None`, with
    /// nothing written, otherwise.
    pub(super) fn convert(
        &self,
        index: usize,
        rest: &[u8],
        out: &mut Vec<u8>,
        pending: &mut Vec<(usize, u8)>,
    ) -> Option<usize> {
        let family = self.families.get(index).filter(|f| f.cacheable)?;
        let then = range(&self.input, family.input)?;
        let now = rest.get(..then.len())?;
        let slots = range(&self.slots, family.slots)?;
        let mut at = 0;
        // In the order of their bytes; a timestamp or a count written to several entries is as
        // many slots of the same bytes.
        for slot in slots {
            let from = slot.input_at as usize;
            let to = from + usize::from(slot.len);
            if from >= at {
                if now.get(at..from)? != then.get(at..from)? {
                    return None;
                }
                at = to;
            } else if to != at {
                return None;
            }
            if !slot.fits(now.get(from..to)?) {
                return None;
            }
        }
        if now.get(at..)? != then.get(at..)? {
            return None;
        }
        let entries = range(&self.output, family.output)?;
        let base = out.len();
        out.extend_from_slice(entries);
        let written = out.get_mut(base..).unwrap_or_default();
        for slot in slots {
            let (from, len) = (slot.input_at as usize, usize::from(slot.len));
            if let (Some(to), Some(from)) = (
                written.get_mut(slot.output_at as usize..),
                now.get(from..from + len),
            ) {
                slot.write(from, to);
            }
        }
        let ends = range(&self.entries, family.entries)?;
        pending.extend(
            ends.iter()
                .map(|&(end, sample)| (base + end as usize, sample)),
        );
        Some(now.len())
    }
}

fn range<T>(all: &[T], (start, len): (u32, u32)) -> Option<&[T]> {
    all.get(start as usize..start as usize + len as usize)
}

/// What one upload's conversion found out for its cluster's cache, family by family.
#[derive(Default)]
pub(super) struct Recording {
    /// In order; a family converted from the cache keeps the cached family's slots and entries
    /// (`from_cache`, their ranges in the cache), another has its own here.
    families: Vec<(Family, bool)>,
    slots: Vec<Slot>,
    entries: Vec<(u32, u8)>,
    /// Whether families past the last recorded ones were read the general way (not recorded).
    stopped: bool,
    /// The family being converted: where it starts in the upload and in its entries, its first
    /// slot, and whether it is cacheable so far.
    current: Option<(u32, u32, usize, bool)>,
    /// The slots of one histogram or summary, before they are put in order.
    found: Vec<Slot>,
}

/// The slots of a histogram's or summary's `Metric` `message` (see [`Recording::metric`]) pushed
/// to `found`, from its family's start (`family`: in the upload, in `out`); `None` when the
/// message holds anything else, or its entries do not hold its values and timestamp where
/// expected.
fn metric_slots(
    message_at: usize,
    message: &[u8],
    out: &[u8],
    ends: &[(usize, u8)],
    family: (usize, usize),
    found: &mut Vec<Slot>,
) -> Option<()> {
    use telemeter_common::wire::short_varint;
    // Where a part of `message` starts in the upload.
    let at = |part: &[u8]| message_at + (part.as_ptr() as usize - message.as_ptr() as usize);
    let mut rest = message;
    // Bounded: each turn consumes a label field.
    while let [0x0a, ref tail @ ..] = *rest {
        let (len, tail) = short_varint(tail)?;
        rest = tail.get(usize::try_from(len).ok()?..)?;
    }
    // Its value's field (a summary's or a histogram's) and its timestamp, in either order (prost
    // writes the timestamp, field 6, before a histogram, field 7), and nothing else. The
    // timestamp is of at most nine bytes and the shortest varint (as it is written).
    let stamp_of = |rest: &'_ [u8]| -> Option<(usize, usize)> {
        let [0x30, ref stamp @ ..] = *rest else {
            return None;
        };
        let (_, after) = short_varint(stamp)?;
        let len = stamp.len() - after.len();
        (stamp.get(len - 1) != Some(&0)).then_some((at(stamp), len))
    };
    /// The key, message and field length of the value field `rest` starts with.
    fn value_of(rest: &[u8]) -> Option<(u8, &[u8], usize)> {
        let [key @ (0x22 | 0x3a), ref tail @ ..] = *rest else {
            return None;
        };
        let (len, tail) = telemeter_common::wire::short_varint(tail)?;
        let len = usize::try_from(len).ok()?;
        Some((key, tail.get(..len)?, rest.len() - tail.len() + len))
    }
    let (key, value, stamp) = match stamp_of(rest) {
        Some((stamp_at, stamp_len)) => {
            let after = rest.get(1 + stamp_len..)?;
            let (key, value, len) = value_of(after)?;
            (after.len() == len).then_some((key, value, (stamp_at, stamp_len)))?
        }
        None => {
            let (key, value, len) = value_of(rest)?;
            let after = rest.get(len..)?;
            let (stamp_at, stamp_len) = stamp_of(after)?;
            (after.len() == 1 + stamp_len).then_some((key, value, (stamp_at, stamp_len)))?
        }
    };
    let stamp_bytes = message.get(stamp.0 - message_at..stamp.0 - message_at + stamp.1)?;
    // Where each count, double and the values' sources are: (at, len, kind, value's bits).
    let mut sources: Vec<Option<(usize, usize, Kind, u64)>> = Vec::new();
    let mut rest = value;
    let varint_field = |rest: &mut &[u8], key: u8| -> Option<Option<(usize, usize, Kind, u64)>> {
        match **rest {
            [k, ref tail @ ..] if k == key => {
                let (v, after) = short_varint(tail)?;
                *rest = after;
                Some(Some((at(tail), tail.len() - after.len(), Kind::Count, v)))
            }
            _ => Some(None),
        }
    };
    let double_field = |rest: &mut &[u8], key: u8| -> Option<Option<(usize, usize, Kind, u64)>> {
        match **rest {
            [k, ref tail @ ..] if k == key => {
                let bits = u64::from_le_bytes(*tail.first_chunk::<8>()?);
                *rest = tail.get(8..)?;
                Some(Some((at(tail), 8, Kind::Double, bits)))
            }
            _ => Some(None),
        }
    };
    let count = varint_field(&mut rest, 0x08)?;
    let sum = double_field(&mut rest, 0x11)?;
    // Bounded: each turn consumes a bucket or quantile field.
    while let [0x1a, ref tail @ ..] = *rest {
        let (len, tail) = short_varint(tail)?;
        let (mut item, after) = tail.split_at_checked(usize::try_from(len).ok()?)?;
        rest = after;
        let source = match key {
            // A histogram's bucket: its count, then its bound (part of its entry's labels).
            0x3a => {
                let count = varint_field(&mut item, 0x08)?;
                double_field(&mut item, 0x11)?;
                count
            }
            // A summary's quantile: its rank (a label), then its value.
            0x22 => {
                double_field(&mut item, 0x09)?;
                double_field(&mut item, 0x11)?
            }
            _ => return None,
        };
        if !item.is_empty() {
            return None;
        }
        sources.push(source);
    }
    if !rest.is_empty() {
        return None;
    }
    // A histogram's entries: its buckets, the `+Inf` one if it was missing, `_sum`, `_count`; a
    // summary's: its quantiles, `_sum`, `_count`.
    let added = ends.len().checked_sub(sources.len() + 2)?;
    match (key, added) {
        (0x3a, 1) => sources.push(count),
        (_, 0) => {}
        _ => return None,
    }
    sources.push(sum);
    sources.push(count);
    let stamp_len = stamp.1;
    for (&(end, _), source) in ends.iter().zip(&sources) {
        let stamp_at = end.checked_sub(stamp_len)?;
        if out.get(stamp_at..end)? != stamp_bytes || out.get(stamp_at.checked_sub(1)?)? != &0x10 {
            return None;
        }
        found.push(Slot {
            input_at: (stamp.0 - family.0) as u32,
            output_at: (stamp_at - family.1) as u32,
            len: stamp_len as u8,
            kind: Kind::Stamp,
        });
        // A zero value is left out of its entry: its bytes are compared, not a slot.
        let Some((from, len, kind, bits)) = *source else {
            continue;
        };
        let double = match kind {
            Kind::Count => (bits as f64).to_bits(),
            _ => bits,
        };
        if double << 1 == 0 {
            continue;
        }
        let value_at = stamp_at.checked_sub(9)?;
        if out.get(value_at..value_at + 8)? != double.to_le_bytes()
            || out.get(value_at.checked_sub(1)?)? != &0x09
            || len > 9
        {
            return None;
        }
        found.push(Slot {
            input_at: (from - family.0) as u32,
            output_at: (value_at - family.1) as u32,
            len: len as u8,
            kind,
        });
    }
    Some(())
}

impl Recording {
    pub(super) fn clear(&mut self) {
        self.families.clear();
        self.slots.clear();
        self.entries.clear();
        self.stopped = false;
        self.current = None;
    }

    /// The next family recorded, family `index` of the cache, was converted from it: at `input`
    /// in the upload and `output` in its entries (from the upload's first).
    pub(super) fn cached_family(
        &mut self,
        cache: &ClusterCache,
        index: usize,
        input: usize,
        output: usize,
    ) {
        match cache.families.get(index) {
            Some(family) => self.families.push((
                Family {
                    input: (input as u32, family.input.1),
                    output: (output as u32, family.output.1),
                    ..*family
                },
                true,
            )),
            None => self.stopped = true,
        }
    }

    /// A family starts, at `input` in the upload and `output` in its entries.
    pub(super) fn start(&mut self, input: usize, output: usize) {
        self.current = Some((input as u32, output as u32, self.slots.len(), true));
    }

    /// The family being converted holds something that is not in a slot.
    pub(super) fn not_cacheable(&mut self) {
        if let Some(current) = &mut self.current {
            current.3 = false;
        }
    }

    /// A simple series of the family being converted was written, its entry ending at `end` in
    /// the entries (from the upload's first): its double at `value_at` in the upload (a value of
    /// zero is left out of the entry, and its bytes are then compared, not patched) and its
    /// timestamp's varint of `stamp_len` bytes just after, the last bytes of its entry.
    pub(super) fn simple(&mut self, value_at: usize, value: f64, stamp_len: usize, end: usize) {
        let Some((input, output, _, true)) = self.current else {
            return;
        };
        let (Some(input_at), Some(stamp_at)) = (
            value_at.checked_sub(input as usize),
            end.checked_sub(output as usize + stamp_len),
        ) else {
            self.not_cacheable();
            return;
        };
        if stamp_len == 0 || stamp_len > 9 {
            self.not_cacheable();
            return;
        }
        if value != 0.0 {
            let Some(value_out) = stamp_at.checked_sub(9) else {
                self.not_cacheable();
                return;
            };
            self.slots.push(Slot {
                input_at: input_at as u32,
                // The entry ends with the double, the timestamp's key and its varint.
                output_at: value_out as u32,
                len: 8,
                kind: Kind::Double,
            });
        }
        self.slots.push(Slot {
            input_at: (input_at + 9) as u32,
            output_at: stamp_at as u32,
            len: stamp_len as u8,
            kind: Kind::Stamp,
        });
    }

    /// A histogram or summary of the family being converted was written, its `Metric` message
    /// at `message_at` in the upload, its entries ending at `ends` in `out` (from `base`, where
    /// the upload's first entry starts): its counts, sum, bucket counts or quantile values and
    /// timestamp become slots when the message holds nothing else (labels first) and its entries
    /// hold them where they should; else the family is not cacheable.
    pub(super) fn metric(
        &mut self,
        message_at: usize,
        message: &[u8],
        out: &[u8],
        ends: &[(usize, u8)],
        base: usize,
    ) {
        let Some((input, output, _, true)) = self.current else {
            return;
        };
        let mut found = std::mem::take(&mut self.found);
        found.clear();
        let family = (input as usize, base + output as usize);
        if metric_slots(message_at, message, out, ends, family, &mut found).is_some() {
            found.sort_by_key(|slot| slot.input_at);
            self.slots.extend_from_slice(&found);
        } else {
            self.not_cacheable();
        }
        self.found = found;
    }

    /// The family being converted ends at `input` in the upload, `output` in its entries, where
    /// `ends` (from `base`, where the upload's first entry starts) are its entries.
    pub(super) fn end(&mut self, input: usize, output: usize, ends: &[(usize, u8)], base: usize) {
        let Some((input_start, output_start, slots, cacheable)) = self.current.take() else {
            return;
        };
        let entries = self.entries.len();
        self.entries.extend(
            ends.iter()
                .map(|&(end, sample)| ((end - base - output_start as usize) as u32, sample)),
        );
        self.families.push((
            Family {
                input: (input_start, input as u32 - input_start),
                output: (output_start, output as u32 - output_start),
                slots: (slots as u32, (self.slots.len() - slots) as u32),
                entries: (entries as u32, (self.entries.len() - entries) as u32),
                cacheable,
            },
            false,
        ));
    }

    /// The rest of the upload is read the general way, not recorded.
    pub(super) fn stop(&mut self) {
        if let Some((_, _, slots, _)) = self.current.take() {
            self.slots.truncate(slots);
        }
        self.stopped = true;
    }
}

/// Cached uploads, one a cluster, of one shard: at most [`CACHE_BYTES`], each at most
/// [`CACHE_UPLOAD_BYTES`].
#[derive(Default)]
pub(super) struct Caches {
    clusters: HashMap<String, ClusterCache>,
    /// What a cache is rebuilt in, then swapped with it.
    spare: ClusterCache,
    bytes: usize,
    swept: Option<Instant>,
}

/// The most bytes a shard's caches hold (and a spare of at most twice [`CACHE_UPLOAD_BYTES`]):
/// about 150 KB a cluster for the usual upload of 500 samples, so 54 clusters a shard, 64 MiB
/// for the default 8 shards. Past it, other clusters are converted without one (never
/// evicting: a cache filled again for every upload would cost without saving).
pub(super) const CACHE_BYTES: usize = 8 << 20;
/// An upload larger than this (as decompressed, or as converted) is not cached.
pub(super) const CACHE_UPLOAD_BYTES: usize = 512 << 10;
/// A cluster's cache unused for this long is freed (a cluster that stopped uploading).
const CACHE_IDLE: Duration = Duration::from_secs(600);

impl Caches {
    /// The cache of `cluster` and the spare, unless it has none and there is no room for one.
    pub(super) fn get(&mut self, cluster: &str) -> Option<(&mut ClusterCache, &mut ClusterCache)> {
        let now = Instant::now();
        if self
            .swept
            .is_none_or(|at| now.duration_since(at) >= CACHE_IDLE / 10)
        {
            self.swept = Some(now);
            let before = self.clusters.len();
            self.clusters.retain(|_, cache| {
                cache
                    .used
                    .is_some_and(|at| now.duration_since(at) < CACHE_IDLE)
            });
            if self.clusters.len() != before {
                self.bytes = self.clusters.values().map(ClusterCache::bytes).sum();
            }
        }
        if !self.clusters.contains_key(cluster) {
            if self.bytes + CACHE_UPLOAD_BYTES / 2 > CACHE_BYTES {
                return None;
            }
            self.clusters
                .insert(cluster.to_string(), ClusterCache::default());
        }
        let cache = self.clusters.get_mut(cluster)?;
        cache.used = Some(now);
        Some((cache, &mut self.spare))
    }

    /// Accounts for `cluster`'s cache after an upload, whose size changed from `before` bytes;
    /// frees it if it outgrew [`CACHE_UPLOAD_BYTES`] twice over.
    pub(super) fn resized(&mut self, cluster: &str, before: usize) {
        let Some(cache) = self.clusters.get(cluster) else {
            return;
        };
        let after = cache.bytes();
        if after > 2 * CACHE_UPLOAD_BYTES {
            self.clusters.remove(cluster);
            self.bytes = self.bytes.saturating_sub(before);
        } else {
            self.bytes = (self.bytes + after).saturating_sub(before);
        }
        if self.spare.bytes() > 2 * CACHE_UPLOAD_BYTES {
            self.spare = ClusterCache::default();
        }
    }

    /// The bytes `cluster`'s cache holds.
    pub(super) fn bytes_of(&self, cluster: &str) -> usize {
        self.clusters.get(cluster).map_or(0, ClusterCache::bytes)
    }
}

/// Whether `cache` serves the next upload as well as one rebuilt from `recording`'s: it has as
/// many families, and each was taken from it or is cacheable in neither (a histogram's, which is
/// converted every time: rebuilding the cache for it at every upload, a copy of the upload and
/// its entries, cost a third of what the cache saved).
fn serves_as_it_is(cache: &ClusterCache, recording: &Recording) -> bool {
    recording.families.len() == cache.families.len()
        && recording
            .families
            .iter()
            .zip(&cache.families)
            .all(|(&(now, from_cache), then)| from_cache || !(now.cacheable || then.cacheable))
}

/// Makes `cache` what `recording` found of an upload (`payload`, converted to `entries`), built
/// in `spare`, unless the cache serves as well as it is ([`serves_as_it_is`]). A cache of an
/// upload too large is emptied.
pub(super) fn commit(
    cache: &mut ClusterCache,
    spare: &mut ClusterCache,
    payload: &[u8],
    entries: &[u8],
    recording: &Recording,
) {
    if serves_as_it_is(cache, recording) {
        return;
    }
    if payload.len() > CACHE_UPLOAD_BYTES || entries.len() > CACHE_UPLOAD_BYTES {
        *cache = ClusterCache {
            used: cache.used,
            ..ClusterCache::default()
        };
        return;
    }
    spare.clear();
    spare.input.extend_from_slice(payload);
    spare.output.extend_from_slice(entries);
    for &(family, from_cache) in &recording.families {
        let (slots, ends) = match from_cache {
            true => (&cache.slots, &cache.entries),
            false => (&recording.slots, &recording.entries),
        };
        let (Some(slots), Some(ends)) = (range(slots, family.slots), range(ends, family.entries))
        else {
            break;
        };
        let (slots_at, ends_at) = (spare.slots.len() as u32, spare.entries.len() as u32);
        spare.slots.extend_from_slice(slots);
        spare.entries.extend_from_slice(ends);
        spare.families.push(Family {
            slots: (slots_at, family.slots.1),
            entries: (ends_at, family.entries.1),
            ..family
        });
    }
    spare.used = cache.used;
    std::mem::swap(cache, spare);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote_write::convert::{encode_payload_cached, encode_payload_with, Scratch};
    use telemeter_common::delimited;
    use telemeter_common::model::{
        Gauge, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary,
    };
    use testkit::fuzz::Rng;

    /// The entries (and where each ends, its sample's bytes) the conversion writes of `payload`.
    type Converted = Result<(Vec<u8>, Vec<(usize, u8)>), String>;

    fn plain(payload: &[u8]) -> Converted {
        let (mut out, mut ends) = (vec![7u8; 3], Vec::new());
        encode_payload_with(
            payload,
            42,
            &mut out,
            |e| ends.extend_from_slice(e),
            &mut Scratch::default(),
        )
        .map_err(|e| e.to_string())?;
        Ok((out, ends))
    }

    /// As [`plain`], through `cache`; and whether any family was converted, not taken from it.
    fn cached(
        payload: &[u8],
        cache: &mut ClusterCache,
        spare: &mut ClusterCache,
        scratch: &mut Scratch,
    ) -> (Converted, bool) {
        let (mut out, mut ends) = (vec![7u8; 3], Vec::new());
        let written = encode_payload_cached(
            payload,
            42,
            &mut out,
            |e| ends.extend_from_slice(e),
            scratch,
            cache,
            spare,
        );
        let converted = scratch_converted(scratch);
        (
            written.map(|()| (out, ends)).map_err(|e| e.to_string()),
            converted,
        )
    }

    fn scratch_converted(scratch: &Scratch) -> bool {
        scratch
            .recording()
            .families
            .iter()
            .any(|&(_, from_cache)| !from_cache)
    }

    fn gauges(id: &str, values: &[f64], timestamp_ms: i64) -> Vec<MetricFamily> {
        vec![MetricFamily {
            name: Some("g".into()),
            help: Some("help".into()),
            r#type: Some(MetricType::Gauge as i32),
            metric: values
                .iter()
                .enumerate()
                .map(|(i, &v)| Metric {
                    label: vec![
                        LabelPair::new("_id", id),
                        LabelPair::new("instance", &format!("node-{i}")),
                        LabelPair::new("job", "x"),
                    ],
                    gauge: Some(Gauge { value: Some(v) }),
                    timestamp_ms: Some(timestamp_ms),
                    ..Default::default()
                })
                .collect(),
        }]
    }

    #[test]
    fn an_upload_of_the_same_series_is_taken_from_the_cache_and_written_as_converted() {
        let (mut cache, mut spare, mut scratch) = Default::default();
        let first = delimited::encode(&gauges("a", &[1.0, 2.0, 0.0], 1_700_000_000_000));
        let (got, converted) = cached(&first, &mut cache, &mut spare, &mut scratch);
        assert_eq!(got, plain(&first));
        assert!(converted, "nothing cached yet");
        // New values (the zero stays zero, its bytes compared), a later timestamp of the same
        // length: from the cache.
        let next = delimited::encode(&gauges("a", &[3.5, f64::NAN, 0.0], 1_700_000_000_999));
        let (got, converted) = cached(&next, &mut cache, &mut spare, &mut scratch);
        assert_eq!(got, plain(&next));
        assert!(!converted, "every family from the cache");
        // A value becoming zero (left out of its sample), a timestamp of another length, another
        // label: converted again, and right.
        for families in [
            gauges("a", &[0.0, 1.0, 0.0], 1_700_000_000_000),
            gauges("a", &[-0.0, 1.0, 0.0], 1_700_000_000_000),
            gauges("a", &[1.0, 1.0, 1.0], 1_700_000_000_000),
            gauges("a", &[1.0, 1.0, 1.0], 17),
            gauges("b", &[1.0, 1.0, 1.0], 17),
            gauges("b", &[1.0, 1.0], 17),
        ] {
            let payload = delimited::encode(&families);
            let (got, converted) = cached(&payload, &mut cache, &mut spare, &mut scratch);
            assert_eq!(got, plain(&payload));
            assert!(converted, "{families:?}");
        }
    }

    #[test]
    fn a_cache_that_serves_as_it_is_is_not_rebuilt_for_a_family_converted_every_time() {
        let (mut cache, mut spare, mut scratch) = Default::default();
        // A family of series without a timestamp (they take the upload's receive time) is not
        // cacheable.
        let upload = |timestamp_ms| {
            let mut families = testkit::payload::families("cluster-a", timestamp_ms);
            let mut untimed = gauges("cluster-a", &[1.0, 2.0], 0);
            for metric in &mut untimed[0].metric {
                metric.timestamp_ms = None;
            }
            families.extend(untimed);
            delimited::encode(&families)
        };
        let first = upload(1_700_000_000_000);
        assert_eq!(
            cached(&first, &mut cache, &mut spare, &mut scratch).0,
            plain(&first)
        );
        let kept = cache.input.as_ptr();
        for timestamp_ms in [1_700_000_015_000, 1_700_000_030_000] {
            let next = upload(timestamp_ms);
            let (got, converted) = cached(&next, &mut cache, &mut spare, &mut scratch);
            assert_eq!(got, plain(&next));
            assert!(converted, "the family without timestamps");
            let recording = scratch.recording();
            assert_eq!(
                recording.families.iter().filter(|f| !f.1).count(),
                1,
                "the others from the cache, histograms too"
            );
            assert!(serves_as_it_is(&cache, recording));
            assert_eq!(cache.input.as_ptr(), kept, "not rebuilt");
        }
    }

    #[test]
    fn realistic_uploads_convert_alike_through_the_cache() {
        let (mut cache, mut spare, mut scratch) = Default::default();
        let mut rng = Rng::new(testkit::fuzz::base_seed());
        let (mut taken, mut other_kinds) = (0, 0);
        for round in 0..40 {
            let mut families = testkit::payload::families("cluster-a", 1_700_000_000_000);
            // Counts of another length and zeros (left out of their entries) in some rounds,
            // in the others new counts and values of the same shape.
            let zeros = round % 4 == 0;
            let count = |rng: &mut Rng| match zeros {
                true => rng.below(1 << (round % 20)) as u64,
                false => 1000 + rng.below(1000) as u64,
            };
            let summary = |i: usize, rng: &mut Rng| Metric {
                label: vec![
                    LabelPair::new("_id", "c"),
                    LabelPair::new("n", &i.to_string()),
                ],
                summary: Some(Summary {
                    sample_count: Some(count(&mut *rng)),
                    sample_sum: Some(if zeros && rng.one_in(4) { 0.0 } else { 2.5 }),
                    quantile: (0..i)
                        .map(|q| Quantile {
                            quantile: Some(q as f64 / 4.0),
                            value: Some(if zeros && rng.one_in(4) {
                                0.0
                            } else {
                                rng.below(9) as f64
                            }),
                        })
                        .collect(),
                }),
                timestamp_ms: Some(1_700_000_000_000),
                ..Default::default()
            };
            families.push(MetricFamily {
                name: Some("s".into()),
                help: None,
                r#type: Some(MetricType::Summary as i32),
                metric: (0..4).map(|i| summary(i, &mut rng)).collect(),
            });
            for family in &mut families {
                for metric in &mut family.metric {
                    if let Some(gauge) = &mut metric.gauge {
                        gauge.value = Some(match rng.below(8) {
                            0 => 0.0,
                            1 => -0.0,
                            _ => rng.next_u64() as f64 / 3.0,
                        });
                    }
                    if let Some(counter) = &mut metric.counter {
                        counter.value = Some(rng.below(1000) as f64);
                    }
                    if let Some(histogram) = &mut metric.histogram {
                        for bucket in &mut histogram.bucket {
                            bucket.cumulative_count = Some(count(&mut rng));
                        }
                    }
                    if rng.one_in(50) {
                        metric.timestamp_ms = Some(rng.below(1 << 40) as i64);
                    }
                }
            }
            let payload = delimited::encode(&families);
            let (got, converted) = cached(&payload, &mut cache, &mut spare, &mut scratch);
            assert_eq!(got, plain(&payload), "round {round}");
            let recording = scratch.recording();
            taken += usize::from(recording.families.iter().any(|f| f.1));
            // The histograms' and the summary's families among them.
            let kinds = [28, 29, 30].map(|i| recording.families.get(i).is_some_and(|f| f.1));
            other_kinds += usize::from(kinds.iter().any(|&k| k));
            let _ = converted;
        }
        assert!(
            other_kinds > 5,
            "histograms or summaries from the cache in {other_kinds} rounds"
        );
        assert!(
            taken > 10,
            "families were taken from the cache in {taken} rounds"
        );
    }

    #[test]
    fn damaged_uploads_convert_alike_through_the_cache() {
        let base = delimited::encode(&testkit::payload::families("cluster-a", 1_700_000_000_000));
        let mut rng = Rng::new(testkit::fuzz::base_seed() ^ 0x5eed);
        let (mut cache, mut spare, mut scratch) = Default::default();
        for round in 0..3000 {
            let mut payload = base.clone();
            if rng.one_in(3) {
                testkit::fuzz::mutate(&mut rng, &mut payload, &[], &[]);
            } else {
                // Bytes overwritten in place, as a value or timestamp changes (or the framing).
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(payload.len());
                    let len = rng.len(9).min(payload.len() - at);
                    for byte in &mut payload[at..at + len] {
                        *byte = match rng.below(4) {
                            0 => 0,
                            1 => 0x80,
                            _ => rng.next_u64() as u8,
                        };
                    }
                }
            }
            if rng.one_in(5) {
                // The cache starts again from the undamaged upload.
                let _ = cached(&base, &mut cache, &mut spare, &mut scratch);
            }
            let (got, _) = cached(&payload, &mut cache, &mut spare, &mut scratch);
            assert_eq!(
                got.as_ref().map(|g| g.0.clone()).ok(),
                plain(&payload).map(|g| g.0).ok(),
                "round {round}: {}",
                testkit::fuzz::hex(&payload)
            );
            assert_eq!(got.ok(), plain(&payload).ok(), "round {round}");
        }
    }

    #[test]
    fn a_shards_caches_stay_within_their_bound() {
        let mut caches = Caches::default();
        let payload =
            delimited::encode(&testkit::payload::families("cluster-a", 1_700_000_000_000));
        let mut scratch = Scratch::default();
        let mut cached_clusters = 0;
        for i in 0..200 {
            let cluster = format!("cluster-{i}");
            let before = caches.bytes_of(&cluster);
            if let Some((cache, spare)) = caches.get(&cluster) {
                cached_clusters += 1;
                let _ = cached(&payload, cache, spare, &mut scratch);
            }
            caches.resized(&cluster, before);
            assert!(caches.bytes <= CACHE_BYTES, "{} bytes", caches.bytes);
            assert_eq!(
                caches.bytes,
                caches
                    .clusters
                    .values()
                    .map(ClusterCache::bytes)
                    .sum::<usize>()
            );
        }
        assert!((10..200).contains(&cached_clusters), "{cached_clusters}");
    }
}
