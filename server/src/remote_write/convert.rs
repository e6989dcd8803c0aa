//! Our stored families → remote-write series, the way Prometheus itself would have scraped them.
//!
//! Counters, gauges and untyped metrics are one series each; a histogram is `_bucket{le}` series
//! (with the `+Inf` bucket added when missing, as the text format does), `_sum` and `_count`; a
//! summary is `{quantile}` series, `_sum` and `_count`. `le` and `quantile` values are written as
//! Go formats floats, so the series are the same ones a scrape of `/federate` produces.

use telemeter_common::delimited::{self, DecodeError};
use telemeter_common::model::{LabelPair, MetricFamily, MetricType};
use telemeter_common::wire::{self, series_field, short_varint};

use super::cache::{self, ClusterCache, Recording};
use super::proto::{Label, Sample, TimeSeries};

/// The series of `families`, each with its one sample at the metric's own timestamp (`fallback_ms`
/// for a metric without one, which validation does not let through).
pub fn to_series(families: &[MetricFamily], fallback_ms: i64) -> Vec<TimeSeries> {
    let mut out = Vec::new();
    for family in families {
        let Some(name) = family.name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        let metric_type = family.metric_type();
        for metric in &family.metric {
            let timestamp = metric.timestamp_ms.unwrap_or(fallback_ms);
            let pushed = metric.try_for_each_sample(metric_type, |suffix, extra, value| {
                out.push(series(name, suffix, &metric.label, extra, value, timestamp));
                Ok::<(), std::convert::Infallible>(())
            });
            let Ok(()) = pushed;
        }
    }
    out
}

/// How many samples `to_series` makes of `families` (one per series).
pub fn sample_count(series: &[TimeSeries]) -> usize {
    series.iter().map(|s| s.samples.len()).sum()
}

/// One series: `__name__`, the metric's labels and the extra one, sorted by name as remote write
/// requires; labels with an empty name or value are left out (empty means absent).
fn series(
    name: &str,
    suffix: &str,
    labels: &[LabelPair],
    extra: Option<(&str, f64)>,
    value: f64,
    timestamp: i64,
) -> TimeSeries {
    let mut out = Vec::with_capacity(labels.len() + 2);
    out.push(Label {
        name: "__name__".into(),
        value: format!("{name}{suffix}"),
    });
    for pair in labels {
        let (Some(n), Some(v)) = (pair.name.as_deref(), pair.value.as_deref()) else {
            continue;
        };
        if n.is_empty() || v.is_empty() || n == "__name__" {
            continue;
        }
        out.push(Label {
            name: n.to_string(),
            value: v.to_string(),
        });
    }
    if let Some((n, v)) = extra {
        // The bound or rank replaces a label of the same name the series might carry.
        out.retain(|l| l.name != n);
        out.push(Label {
            name: n.to_string(),
            value: format_float(v),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    TimeSeries {
        labels: out,
        samples: vec![Sample { value, timestamp }],
    }
}

/// The series of `families`, as [`to_series`] makes them, written straight into `out` as the
/// entries of a `WriteRequest` (field 1, length-delimited `TimeSeries`), with no allocation per
/// label: the entries of a request are just concatenated, so a request body is any run of them.
/// `each` gets the offset in `out` where each entry ends. Egress converts every shipped sample, so
/// this is its hot path (building [`TimeSeries`] spent half its CPU in the allocator).
pub fn encode_series(
    families: &[MetricFamily],
    fallback_ms: i64,
    out: &mut Vec<u8>,
    mut each: impl FnMut(usize),
) {
    let mut name = String::new();
    let mut extra_value = String::new();
    let mut base: Vec<(&str, &str)> = Vec::new();
    for family in families {
        let Some(family_name) = family.name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        let metric_type = family.metric_type();
        for metric in &family.metric {
            let timestamp = metric.timestamp_ms.unwrap_or(fallback_ms);
            base.clear();
            for pair in &metric.label {
                let (Some(n), Some(v)) = (pair.name.as_deref(), pair.value.as_deref()) else {
                    continue;
                };
                if n.is_empty() || v.is_empty() || n == "__name__" {
                    continue;
                }
                base.push((n, v));
            }
            base.sort_by(|a, b| a.0.cmp(b.0));
            let base = &base;
            let pushed = metric.try_for_each_sample(metric_type, |suffix, extra, value| {
                name.clear();
                name.push_str(family_name);
                name.push_str(suffix);
                let extra = extra.map(|(n, v)| {
                    extra_value = format_float(v);
                    (n, extra_value.as_str())
                });
                let labels = Labels {
                    base,
                    name: &name,
                    extra,
                };
                write_series(&labels, value, timestamp, out);
                each(out.len());
                Ok::<(), std::convert::Infallible>(())
            });
            let Ok(()) = pushed;
        }
    }
}

/// As [`encode_series`], reading the protobuf-delimited `payload` in place
/// ([`telemeter_common::wire`]) instead of decoding it: nothing is allocated per series or label.
/// On an error, what was written for the payload stays in `out`: the caller cuts it off. `each`
/// gets, a family at a time, where each entry ends in `out` and the bytes of its sample field,
/// its last (so that where its labels end is known without reading it again).
///
/// Every sample is its own entry with its series' full label set (remote write 1.0 has no other
/// way), and a histogram or summary metric makes many series that share the metric's labels. So
/// each metric's labels are encoded once, sorted, into `labels.bytes`; each of its series is then
/// those bytes copied in at most three runs around `__name__` and the bound or rank. Per sample
/// that is a few `memcpy`s instead of two walks over the labels writing varints (which cost about
/// a third of egress's CPU).
pub fn encode_payload(
    payload: &[u8],
    fallback_ms: i64,
    out: &mut Vec<u8>,
    each: impl FnMut(&[(usize, u8)]),
) -> Result<(), DecodeError> {
    encode_payload_with(payload, fallback_ms, out, each, &mut Scratch::default())
}

/// The working space of [`encode_payload_with`], kept from one payload to the next: a dozen
/// vectors and strings allocated, grown and freed for every record were a twentieth of egress's
/// CPU in perf (malloc, realloc, free). Bounded: each vector holds what one payload needed, and
/// one that grew past [`SCRATCH_KEEP_BYTES`] is freed after it.
#[derive(Default)]
pub struct Scratch {
    /// Emptied after each payload, whose labels they borrowed ([`recycle`]).
    base: Vec<(&'static str, &'static str)>,
    found: Vec<(&'static [u8], &'static str, &'static [u8])>,
    stored: Vec<(u64, &'static [u8], usize)>,
    layout: Vec<(u64, &'static [u8])>,
    order: Vec<usize>,
    runs: Vec<(usize, usize)>,
    labels: EncodedLabels,
    /// Kept whole: the next payload's histograms mostly have the same bounds, already formatted.
    bounds: Bounds,
    names: NameFields,
    /// The entries of the family being read (where each ends, its sample field's bytes), handed
    /// to `each` once the family is read whole: a family found framed otherwise midway is read
    /// again the general way.
    pending: Vec<(usize, u8)>,
    /// What a payload's conversion finds out for its cluster's cache ([`encode_payload_cached`]).
    recording: Recording,
}

/// The most bytes a [`Scratch`] vector keeps allocated between payloads (a family of thousands
/// of series, or a metric of thousands of labels, is rare: its space is not kept for the next).
pub const SCRATCH_KEEP_BYTES: usize = 256 << 10;

/// An empty vector in `v`'s allocation, for elements of another lifetime: `v`'s borrowed from a
/// payload that is gone. (Collecting an empty `IntoIter` into a vector of elements of the same
/// size and alignment reuses its allocation.) A vector over [`SCRATCH_KEEP_BYTES`] is freed.
fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    if v.capacity() * std::mem::size_of::<T>() > SCRATCH_KEEP_BYTES {
        return Vec::new();
    }
    v.into_iter().filter_map(|_| None).collect()
}

impl Scratch {
    /// What the last payload converted through a cache found out.
    #[cfg(test)]
    pub(super) fn recording(&self) -> &Recording {
        &self.recording
    }

    /// Frees what grew past [`SCRATCH_KEEP_BYTES`].
    fn trim(&mut self) {
        self.order = recycle(std::mem::take(&mut self.order));
        self.runs = recycle(std::mem::take(&mut self.runs));
        self.pending = recycle(std::mem::take(&mut self.pending));
        let labels = &self.labels;
        if (labels.bytes.capacity() + 8 * labels.starts.capacity() + 16 * labels.names.capacity())
            > SCRATCH_KEEP_BYTES
        {
            self.labels = EncodedLabels::default();
        }
        if self.bounds.formatted.len() > SCRATCH_KEEP_BYTES / 64 {
            self.bounds = Bounds::default();
        }
    }
}

/// As [`encode_payload`], its working space kept in `scratch` for the next payload.
pub fn encode_payload_with(
    payload: &[u8],
    fallback_ms: i64,
    out: &mut Vec<u8>,
    each: impl FnMut(&[(usize, u8)]),
    scratch: &mut Scratch,
) -> Result<(), DecodeError> {
    encode_payload_inner(payload, fallback_ms, out, each, scratch, None)
}

/// As [`encode_payload_with`], the families that are `cache`'s but for their series' values and
/// timestamps written from it ([`cache`]), and `cache` made this payload's (rebuilt in `spare`)
/// unless it served every family as it is. A cluster's uploads nearly always carry the same
/// series: reading and writing their labels again was most of a shard's conversion.
pub(super) fn encode_payload_cached(
    payload: &[u8],
    fallback_ms: i64,
    out: &mut Vec<u8>,
    each: impl FnMut(&[(usize, u8)]),
    scratch: &mut Scratch,
    cache: &mut ClusterCache,
    spare: &mut ClusterCache,
) -> Result<(), DecodeError> {
    if payload.len() > cache::CACHE_UPLOAD_BYTES {
        return encode_payload_with(payload, fallback_ms, out, each, scratch);
    }
    let start = out.len();
    let mut recording = std::mem::take(&mut scratch.recording);
    recording.clear();
    let written = encode_payload_inner(
        payload,
        fallback_ms,
        out,
        each,
        scratch,
        Some((&*cache, &mut recording)),
    );
    if written.is_ok() {
        let entries = out.get(start..).unwrap_or_default();
        cache::commit(cache, spare, payload, entries, &recording);
    }
    scratch.recording = recording;
    written
}

fn encode_payload_inner(
    payload: &[u8],
    fallback_ms: i64,
    out: &mut Vec<u8>,
    mut each: impl FnMut(&[(usize, u8)]),
    scratch: &mut Scratch,
    cached: Option<(&ClusterCache, &mut Recording)>,
) -> Result<(), DecodeError> {
    let mut work = Work {
        base: std::mem::take(&mut scratch.base),
        found: std::mem::take(&mut scratch.found),
        fields: StoredFields {
            stored: std::mem::take(&mut scratch.stored),
            layout: std::mem::take(&mut scratch.layout),
            order: std::mem::take(&mut scratch.order),
            runs: std::mem::take(&mut scratch.runs),
            ..Default::default()
        },
        scratch,
    };
    let written = encode_families(payload, fallback_ms, out, &mut each, &mut work, cached);
    let Work {
        base,
        found,
        fields,
        scratch,
    } = work;
    scratch.base = recycle(base);
    scratch.found = recycle(found);
    scratch.stored = recycle(fields.stored);
    scratch.layout = recycle(fields.layout);
    scratch.order = fields.order;
    scratch.runs = fields.runs;
    scratch.trim();
    written
}

/// The working space of one payload's conversion: the vectors of [`Scratch`] that borrow from
/// it, lent for it, and the rest.
struct Work<'a, 's> {
    base: Vec<(&'a str, &'a str)>,
    found: Vec<(&'a [u8], &'a str, &'a [u8])>,
    fields: StoredFields<'a>,
    scratch: &'s mut Scratch,
}

/// The body of [`encode_payload_with`].
fn encode_families<'a>(
    payload: &'a [u8],
    fallback_ms: i64,
    out: &mut Vec<u8>,
    each: &mut impl FnMut(&[(usize, u8)]),
    work: &mut Work<'a, '_>,
    mut cached: Option<(&ClusterCache, &mut Recording)>,
) -> Result<(), DecodeError> {
    let limits = delimited::Limits {
        max_message_bytes: payload.len(),
        max_total_bytes: payload.len(),
        max_families: usize::MAX,
        max_series: usize::MAX,
    };
    let Work {
        base,
        found,
        fields,
        scratch,
    } = work;
    let Scratch {
        labels,
        bounds,
        names,
        pending,
        ..
    } = &mut **scratch;
    let mut rest = payload;
    // The timestamp of the series before, encoded.
    let mut stamp = Stamp::new(0);
    // Once a family is framed otherwise: the general reader, from that family on.
    let mut general: Option<wire::Families<'_>> = None;
    // Where this payload's entries start, and the number of the next family read the usual way.
    let record_out = out.len();
    let mut family_index = 0;
    let at = |rest: &[u8]| payload.len() - rest.len();
    // Bounded: each turn consumes a family of the payload, or leaves it to the general reader
    // (which happens once).
    'families: loop {
        let family_start = rest;
        let family = match &mut general {
            Some(families) => match families.next() {
                Some(family) => family?,
                None => break,
            },
            None if rest.is_empty() => break,
            None => {
                if let Some((cache, recording)) = &mut cached {
                    pending.clear();
                    let (input, output) = (at(rest), out.len() - record_out);
                    if let Some(len) = cache.convert(family_index, rest, out, pending) {
                        recording.cached_family(cache, family_index, input, output);
                        family_index += 1;
                        rest = rest.get(len..).unwrap_or_default();
                        each(pending);
                        continue;
                    }
                }
                match usual_family(rest) {
                    Some((family, after)) => {
                        if let Some((_, recording)) = &mut cached {
                            recording.start(at(rest), out.len() - record_out);
                        }
                        family_index += 1;
                        rest = after;
                        family
                    }
                    None => {
                        if let Some((_, recording)) = &mut cached {
                            recording.stop();
                        }
                        general = Some(wire::families(rest, &limits));
                        continue;
                    }
                }
            }
        };
        if family.name.is_empty() {
            if let Some((_, recording)) = &mut cached {
                recording.end(at(rest), out.len() - record_out, &[], record_out);
            }
            continue;
        }
        names.clear();
        pending.clear();
        let entries_start = out.len();
        let metric_type = family.metric_type();
        let mut walk = Walk::new(&family, general.is_none());
        // Bounded: each turn consumes a series' field of the family's message.
        while let Some(next) = walk.next(fields) {
            let metric = match next? {
                // Most series are a gauge's or a counter's: one entry, its stored label fields
                // copied straight in (see [`StoredFields`]).
                Next::Simple { value, timestamp } => {
                    stamp.set(timestamp.unwrap_or(fallback_ms));
                    let name = names.get(family.name, Suffix::None);
                    let sample = fields.write_series(name, value, &stamp, out);
                    pending.push((out.len(), sample));
                    if let Some((_, recording)) = &mut cached {
                        // The stored varint is the one written when it is the shortest.
                        match timestamp {
                            Some(_) if stamp.len == fields.stamp_len + 1 => {
                                let message = fields.message.as_ptr() as usize;
                                let value_at =
                                    message - payload.as_ptr() as usize + fields.value_at;
                                let end = out.len() - record_out;
                                recording.simple(value_at, value, fields.stamp_len, end);
                            }
                            _ => recording.not_cacheable(),
                        }
                    }
                    continue;
                }
                Next::Unusual => {
                    if let Some((_, recording)) = &mut cached {
                        recording.stop();
                    }
                    out.truncate(entries_start);
                    general = Some(wire::families(family_start, &limits));
                    continue 'families;
                }
                Next::View(metric) => metric,
            };
            let first = pending.len();
            stamp.set(metric.timestamp_ms.unwrap_or(fallback_ms));
            let timestamp = &stamp;
            let value = metric.value_for(metric_type)?;
            if !labels.copy_from(&metric, found)? {
                base.clear();
                for label in metric.labels() {
                    let (n, v) = label?;
                    if n.is_empty() || v.is_empty() || n == "__name__" {
                        continue;
                    }
                    base.push((n, v));
                }
                base.sort_by(|a, b| name_order(a.0, b.0));
                labels.set(base);
            }
            let mut one = |suffix: Suffix, extra: Option<(&'static str, &str)>, value: f64| {
                let name = names.get(family.name, suffix);
                let sample = labels.write_series(name, extra, value, timestamp, out);
                pending.push((out.len(), sample));
            };
            // The walk of `Metric::try_for_each_sample`, on the borrowed view.
            match value {
                wire::Value::Gauge(v) | wire::Value::Counter(v) | wire::Value::Untyped(v) => {
                    one(Suffix::None, None, v)
                }
                wire::Value::Summary(summary) => {
                    for (i, quantile) in summary.quantiles().enumerate() {
                        let (rank, value) = quantile?;
                        one(Suffix::None, Some(("quantile", bounds.get(i, rank))), value);
                    }
                    one(Suffix::Sum, None, summary.sample_sum);
                    one(Suffix::Count, None, summary.sample_count as f64);
                }
                wire::Value::Histogram(histogram) => {
                    let count = histogram.sample_count as f64;
                    let mut inf_seen = false;
                    let mut buckets = 0;
                    for (i, bucket) in histogram.buckets().enumerate() {
                        let (le, cumulative) = bucket?;
                        inf_seen |= le == f64::INFINITY;
                        one(
                            Suffix::Bucket,
                            Some(("le", bounds.get(i, le))),
                            cumulative as f64,
                        );
                        buckets = i + 1;
                    }
                    if !inf_seen {
                        let inf = bounds.get(buckets, f64::INFINITY);
                        one(Suffix::Bucket, Some(("le", inf)), count);
                    }
                    one(Suffix::Sum, None, histogram.sample_sum);
                    one(Suffix::Count, None, count);
                }
                wire::Value::Missing | wire::Value::Several => {}
            }
            if let Some((_, recording)) = &mut cached {
                let at = (metric.message.as_ptr() as usize).wrapping_sub(payload.as_ptr() as usize);
                match payload.get(at..at + metric.message.len()) {
                    Some(_) => {
                        let ends = pending.get(first..).unwrap_or_default();
                        recording.metric(at, metric.message, out, ends, record_out);
                    }
                    None => recording.not_cacheable(),
                }
            }
        }
        each(pending);
        if let Some((_, recording)) = &mut cached {
            recording.end(at(rest), out.len() - record_out, pending, record_out);
        }
    }
    Ok(())
}

/// What a series' name adds to its family's name.
#[derive(Clone, Copy)]
enum Suffix {
    None,
    Bucket,
    Sum,
    Count,
}

impl Suffix {
    fn text(self) -> &'static str {
        match self {
            Suffix::None => "",
            Suffix::Bucket => "_bucket",
            Suffix::Sum => "_sum",
            Suffix::Count => "_count",
        }
    }
}

/// The `__name__` label fields of one family's series (`name`, `name_bucket`, `name_sum`,
/// `name_count`), each encoded once per family rather than once per series.
#[derive(Default)]
struct NameFields {
    /// By [`Suffix`].
    fields: [Vec<u8>; 4],
}

impl NameFields {
    /// For the next family.
    fn clear(&mut self) {
        for field in &mut self.fields {
            field.clear();
        }
    }

    /// The `TimeSeries.labels` field of `__name__` = `name` + `suffix`.
    fn get(&mut self, name: &str, suffix: Suffix) -> &[u8] {
        let field = &mut self.fields[suffix as usize];
        if field.is_empty() {
            let suffix = suffix.text();
            let len = name.len() + suffix.len();
            field.push(0x0a); // TimeSeries.labels
            prost::encoding::encode_varint(label_payload_len(8, len) as u64, field);
            field.push(0x0a);
            field.push(8);
            field.extend_from_slice(b"__name__");
            field.push(0x12);
            prost::encoding::encode_varint(len as u64, field);
            field.extend_from_slice(name.as_bytes());
            field.extend_from_slice(suffix.as_bytes());
        }
        field
    }
}

/// A metric's timestamp as its series' samples write it (`Sample.timestamp`, left out when 0 as
/// proto3 does), encoded once per metric rather than once per series.
struct Stamp {
    timestamp: i64,
    bytes: [u8; 11],
    len: usize,
}

impl Stamp {
    /// Encodes `timestamp` unless it is already the one encoded: the series of an upload nearly
    /// all carry the same (encoding it anew for each simple series was a twentieth of egress's
    /// conversion, in perf).
    #[inline]
    fn set(&mut self, timestamp: i64) {
        if timestamp != self.timestamp {
            *self = Stamp::new(timestamp);
        }
    }

    fn new(timestamp: i64) -> Stamp {
        let mut stamp = Stamp {
            timestamp,
            bytes: [0; 11],
            len: 0,
        };
        if timestamp != 0 {
            stamp.bytes[0] = 0x10; // Sample.timestamp, varint
            let mut v = timestamp as u64;
            let mut len = 1;
            while v >= 0x80 {
                stamp.bytes[len] = v as u8 | 0x80;
                v >>= 7;
                len += 1;
            }
            stamp.bytes[len] = v as u8;
            stamp.len = len + 1;
        }
        stamp
    }

    /// The length of a `Sample` of `value` at this timestamp (zeros are left out, as prost does).
    fn sample_len(&self, value: f64) -> usize {
        (if value != 0.0 { 9 } else { 0 }) + self.len
    }

    /// A `TimeSeries.samples` field of `value` at this timestamp, which ends a series' entry;
    /// returns its bytes (under 128: at most 21).
    ///
    /// Composed in a fixed array and appended whole, then cut to its length: copies of a known
    /// size are a few moves, where five pushes and a copy of the timestamp's length (a call to
    /// memcpy) were a twentieth of a shard's conversion and request bodies.
    fn write_sample(&self, value: f64, out: &mut Vec<u8>) -> u8 {
        let sample_len = self.sample_len(value);
        let mut field = [0u8; 32];
        field[0] = 0x12; // TimeSeries.samples
        field[1] = sample_len as u8; // at most 20
        let mut len = 2;
        if value != 0.0 {
            field[2] = 0x09; // Sample.value, 64-bit
            field[3..11].copy_from_slice(&value.to_le_bytes());
            len = 11;
        }
        field[len..len + 11].copy_from_slice(&self.bytes);
        len += self.len;
        let end = out.len() + len;
        out.extend_from_slice(&field);
        out.truncate(end);
        len as u8
    }
}

/// The bounds and ranks of the previous histogram or summary, formatted, by position: the metrics
/// of a family share them, so each is formatted (which allocates) once per record, not per series.
#[derive(Default)]
struct Bounds {
    formatted: Vec<(u64, String)>,
}

impl Bounds {
    /// `value` formatted as the `index`-th bound of a metric.
    fn get(&mut self, index: usize, value: f64) -> &str {
        let bits = value.to_bits();
        if index >= self.formatted.len() {
            self.formatted.resize(index + 1, (0, String::new()));
        }
        let slot = &mut self.formatted[index];
        if slot.0 != bits || slot.1.is_empty() {
            *slot = (bits, format_float(value));
        }
        &slot.1
    }
}

/// The series of one family as conversion reads them. A gauge, counter or untyped family's
/// message framed the usual way (its name, help and type, then its series, each in a field of
/// a one-byte key and a length of one or two bytes) is walked here, each series written the
/// usual way read in one pass by [`StoredFields::read`]; any other series is read by the
/// general reader ([`wire::FamilyView::metrics`]), and the rest of a family framed otherwise
/// too. For the stored families (validated before they were journaled) that is what the general
/// reading reads, without its second pass over each series' labels (a fifth of a shard's CPU).
enum Walk<'a> {
    Usual {
        family: wire::FamilyView<'a>,
        /// The series' fields still to read.
        rest: &'a [u8],
        /// The key of the value field the family's type reads.
        value_key: u8,
        /// Whether its fields are checked as they are read ([`usual_family`] did not): one
        /// framed otherwise is then [`Next::Unusual`].
        unchecked: bool,
    },
    General(wire::Metrics<'a>),
}

/// One series of a [`Walk`].
enum Next<'a> {
    /// Its labels are in the [`StoredFields`] given to [`Walk::next`].
    Simple {
        value: f64,
        timestamp: Option<i64>,
    },
    View(wire::MetricView<'a>),
    /// A field of an unchecked family ([`usual_family`]) is not a series field framed the usual
    /// way: the family is to be read again the general way (nothing of it is used).
    Unusual,
}

impl<'a> Walk<'a> {
    fn new(family: &wire::FamilyView<'a>, unchecked: bool) -> Walk<'a> {
        let value_key = match family.metric_type() {
            MetricType::Gauge => 0x12,
            MetricType::Counter => 0x1a,
            MetricType::Untyped => 0x2a,
            _ => return Walk::General(family.metrics()),
        };
        match series_start(family.message) {
            Some(rest) => Walk::Usual {
                family: *family,
                rest,
                value_key,
                unchecked,
            },
            None => Walk::General(family.metrics()),
        }
    }

    fn next(&mut self, fields: &mut StoredFields<'a>) -> Option<Result<Next<'a>, DecodeError>> {
        let (family, rest, value_key, unchecked) = match self {
            Walk::General(metrics) => return metrics.next().map(|item| item.map(Next::View)),
            Walk::Usual {
                family,
                rest,
                value_key,
                unchecked,
            } => (*family, rest, *value_key, *unchecked),
        };
        if rest.is_empty() {
            return None;
        }
        let Some((message, after)) = series_field(rest) else {
            if unchecked {
                return Some(Ok(Next::Unusual));
            }
            // Framed otherwise: the general reading, from this field on.
            let from_here = wire::FamilyView {
                message: rest,
                ..family
            };
            *self = Walk::General(from_here.metrics());
            return self.next(fields);
        };
        if let Some((value, timestamp)) = fields.read(message, value_key) {
            *rest = after;
            return Some(Ok(Next::Simple { value, timestamp }));
        }
        // This series the general way (it may report an error), then on with the walk.
        let field = &rest[..rest.len() - after.len()];
        *rest = after;
        wire::FamilyView {
            message: field,
            ..family
        }
        .metrics()
        .next()
        .map(|item| item.map(Next::View))
    }
}

/// The first family of a protobuf-delimited `payload` and what follows it, when it is framed
/// the usual way: a length of at most nine bytes, then its name (UTF-8), help and type, each at
/// most once and in that order, then nothing but series fields of a one-byte key and a length of
/// one or two bytes (for a gauge, counter or untyped family, only its first is checked here, the
/// others as they are read). `None` for anything else, left to the general reader ([`wire::families`]),
/// whose reading of a family's header walks every field of it through the general field reader
/// (a twentieth of egress's CPU). Its help is not read: conversion does not use it.
fn usual_family(payload: &[u8]) -> Option<(wire::FamilyView<'_>, &[u8])> {
    let (len, tail) = short_varint(payload)?;
    let (message, after) = tail.split_at_checked(usize::try_from(len).ok()?)?;
    let mut rest = message;
    let mut name: &[u8] = &[];
    if let [0x0a, ref tail @ ..] = *rest {
        let (len, tail) = short_varint(tail)?;
        (name, rest) = tail.split_at_checked(usize::try_from(len).ok()?)?;
    }
    if let [0x12, ref tail @ ..] = *rest {
        let (len, tail) = short_varint(tail)?;
        rest = tail.get(usize::try_from(len).ok()?..)?;
    }
    let mut raw_type = None;
    if let [0x18, ref tail @ ..] = *rest {
        let (value, tail) = short_varint(tail)?;
        // An enum is an int32 on the wire: prost keeps the varint's low 32 bits.
        raw_type = Some(value as i32);
        rest = tail;
    }
    let family = wire::FamilyView {
        name: std::str::from_utf8(name).ok()?,
        help: "",
        raw_type,
        message,
    };
    if matches!(
        family.metric_type(),
        MetricType::Gauge | MetricType::Counter | MetricType::Untyped
    ) {
        // Its series fields are checked as [`Walk`] reads them ([`Next::Unusual`]): walking them
        // here first as well was 7 % of converting and writing request bodies, in perf.
        return matches!(rest.first(), None | Some(&0x22)).then_some((family, after));
    }
    // Bounded: each turn consumes a series' field.
    while !rest.is_empty() {
        (_, rest) = series_field(rest)?;
    }
    Some((family, after))
}

/// Where the series' fields of a `MetricFamily` message start: after its name, help and type,
/// each at most once and in that order (any may be absent); `None` when that is not all before.
fn series_start(message: &[u8]) -> Option<&[u8]> {
    let mut rest = message;
    for key in [0x0a, 0x12] {
        if let [k, ref tail @ ..] = *rest {
            if k == key {
                let (len, tail) = short_varint(tail)?;
                rest = tail.get(usize::try_from(len).ok()?..)?;
            }
        }
    }
    if let [0x18, ref tail @ ..] = *rest {
        let (_, tail) = short_varint(tail)?;
        rest = tail;
    }
    match rest.first() {
        None | Some(&0x22) => Some(rest),
        Some(_) => None,
    }
}

/// The label fields of a gauge's, counter's or untyped series stored the usual way, in name
/// order: each `Metric.label` field is byte for byte a `TimeSeries.labels` field (the same field
/// number; a `LabelPair` of a non-empty name and value, each under 128 bytes, is a `Label`), so
/// its entry is these fields copied from the stored message, with `__name__` among them, and the
/// sample. Neither the labels' general reader nor an intermediate copy ([`EncodedLabels`]) is
/// needed: for the one entry a simple series makes they were two thirds of its conversion.
#[derive(Default)]
struct StoredFields<'a> {
    /// The `Metric` message just read, whose label fields come first, back to back.
    message: &'a [u8],
    /// Its fields (its name's [`name_key`], name, where the field ends in `message`), in the
    /// order they are stored.
    stored: Vec<(u64, &'a [u8], usize)>,
    /// Their bytes in all.
    len: usize,
    /// The names of the last series sorted, in the order they were stored, the stored index of
    /// each of its fields in name order, and how many sort before `__name__`: the series of a
    /// family nearly always carry the same names in the same order, so one sort serves them
    /// all (sorting each series was a fifth of converting it, in perf: the client's `_id`,
    /// stored last, moved to the front).
    layout: Vec<(u64, &'a [u8])>,
    order: Vec<usize>,
    layout_at_name: usize,
    /// `order` as runs of fields stored one after the other (`from..to`, stored indices), so
    /// copied at once: the first `runs_at_name` of them before `__name__`. Labels stored in name
    /// order but for `_id` (which clients add) are two or three copies, not one per label (each
    /// a call to memcpy: a sixth of a simple series' conversion, in perf).
    runs: Vec<(usize, usize)>,
    runs_at_name: usize,
    /// Where the value's double is in `message`, and the bytes of the timestamp's varint after
    /// it (0 for none): what a cluster's cache patches ([`super::cache`]).
    value_at: usize,
    stamp_len: usize,
}

impl<'a> StoredFields<'a> {
    /// Reads the label fields of the `Metric` `message`, and its value and timestamp: `Some`
    /// when every label is written the usual way, first, none named `__name__`, followed only
    /// by the value field `value_key` holding its double and at most a timestamp of at most
    /// nine bytes (so no label comes later, and the value is the one the family's type reads).
    /// `None` leaves the series to the general reader.
    fn read(&mut self, message: &'a [u8], value_key: u8) -> Option<(f64, Option<i64>)> {
        self.stored.clear();
        self.len = 0;
        self.message = message;
        let mut rest = message;
        // Bounded: each turn consumes at least two bytes.
        while let [0x0a, len, ref tail @ ..] = *rest {
            let len = usize::from(len);
            let label = tail.get(..len)?;
            let [0x0a, name_len, ref after_key @ ..] = *label else {
                return None;
            };
            let name_len = usize::from(name_len);
            let (Some(name), Some(&[0x12, value_len])) = (
                after_key.get(..name_len),
                after_key.get(name_len..name_len + 2),
            ) else {
                return None;
            };
            // Both under 128 (one-byte lengths, within the label's 127 bytes), neither empty.
            if name_len == 0 || value_len == 0 || 4 + name_len + usize::from(value_len) != len {
                return None;
            }
            if name == b"__name__" {
                return None;
            }
            self.len += 2 + len;
            self.stored
                .push((name_key_at(after_key, name_len), name, self.len));
            rest = &tail[len..];
        }
        // The value (`09` and its double), then a timestamp or nothing: any other field might be
        // a label after them.
        let [key, 9, 0x09, b0, b1, b2, b3, b4, b5, b6, b7, ref tail @ ..] = *rest else {
            return None;
        };
        if key != value_key {
            return None;
        }
        let value = f64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
        self.value_at = message.len() - rest.len() + 3;
        self.stamp_len = tail.len().saturating_sub(1);
        let timestamp = match *tail {
            [] => None,
            // As the general reader and prost read an int64: the varint's 64 bits.
            [0x30, ref varint @ ..] => match short_varint(varint)? {
                (timestamp, []) => Some(timestamp as i64),
                _ => return None,
            },
            _ => return None,
        };
        if !self.same_layout() {
            self.sort_layout();
        }
        Some((value, timestamp))
    }

    /// Whether the series just read carries the names of the last one sorted, in the same order.
    fn same_layout(&self) -> bool {
        self.stored.len() == self.layout.len()
            && self
                .stored
                .iter()
                .zip(&self.layout)
                .all(|(&(key, name, _), &(was_key, was))| {
                    // Of two names of one length, at most eight bytes, the keys differ if they do.
                    key == was_key
                        && name.len() == was.len()
                        && (name.len() <= 8 || name.get(8..) == was.get(8..))
                })
    }

    /// Finds the name order of the series just read, for it and the next ones of its layout.
    fn sort_layout(&mut self) {
        let stored = &self.stored;
        self.layout.clear();
        self.layout
            .extend(stored.iter().map(|&(key, name, _)| (key, name)));
        self.order.clear();
        self.order.extend(0..stored.len());
        let key = |i: usize| stored.get(i).map(|&(k, name, _)| (k, name));
        // Stored in the order the client sent them (validation checks, it does not sort; clients
        // that stamp `_id` append it): a few labels are put in order by insertion, comparing
        // their names' first eight bytes at once (the library's sort, its check that they are
        // sorted and the comparisons' calls to memcmp were a sixth of a shard's CPU).
        let order = &mut self.order;
        if order.len() <= 16 {
            for i in 1..order.len() {
                // Bounded: at most i turns.
                let mut j = i;
                while j > 0 && key_before(key(order[j]), key(order[j - 1])) {
                    order.swap(j, j - 1);
                    j -= 1;
                }
            }
        } else {
            order.sort_by(|&a, &b| match (key(a), key(b)) {
                (Some(a), Some(b)) => name_order_bytes(a.1, b.1),
                _ => std::cmp::Ordering::Equal,
            });
        }
        let name = Some((name_key(b"__name__"), &b"__name__"[..]));
        self.layout_at_name = order.partition_point(|&i| key_before(key(i), name));
        let (before, after) = order.split_at(self.layout_at_name.min(order.len()));
        self.runs.clear();
        runs_of(before, &mut self.runs);
        self.runs_at_name = self.runs.len();
        runs_of(after, &mut self.runs);
    }

    /// The fields `from..to` (stored indices), as they are stored.
    fn fields(&self, from: usize, to: usize) -> &'a [u8] {
        let start = match from.checked_sub(1) {
            Some(before) => self.stored.get(before).map_or(usize::MAX, |f| f.2),
            None => 0,
        };
        let end = to
            .checked_sub(1)
            .and_then(|last| self.stored.get(last))
            .map_or(0, |f| f.2);
        self.message.get(start..end).unwrap_or_default()
    }

    /// One `WriteRequest.timeseries` entry of these labels, `__name__` (its field `name`) and
    /// one sample, as [`write_series`] writes it; returns the bytes of its sample field.
    fn write_series(&self, name: &[u8], value: f64, timestamp: &Stamp, out: &mut Vec<u8>) -> u8 {
        let sample_len = timestamp.sample_len(value);
        let series_len = self.len + name.len() + field_len(sample_len);
        out.reserve(field_len(series_len));
        out.push(0x0a); // WriteRequest.timeseries, length-delimited
        put_len(series_len, out);
        // In name order: `runs` are the layout's, which `read` found to be this series'.
        let (before, after) = self.runs.split_at(self.runs_at_name.min(self.runs.len()));
        for &(from, to) in before {
            out.extend_from_slice(self.fields(from, to));
        }
        out.extend_from_slice(name);
        for &(from, to) in after {
            out.extend_from_slice(self.fields(from, to));
        }
        timestamp.write_sample(value, out)
    }
}

/// The varint of a length, its one- and two-byte forms (every sample's and nearly every series'
/// length) written inline rather than by prost's loop, a call per series (3-4 % of a shard's
/// conversion and request bodies, in perf).
#[inline]
fn put_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x4000 {
        out.extend_from_slice(&[len as u8 | 0x80, (len >> 7) as u8]);
    } else {
        prost::encoding::encode_varint(len as u64, out);
    }
}

/// Appends `order` (stored indices) to `runs` as runs of consecutive indices, `from..to`.
fn runs_of(order: &[usize], runs: &mut Vec<(usize, usize)>) {
    let mut run: Option<(usize, usize)> = None;
    for &i in order {
        run = match run {
            Some((from, to)) if to == i => Some((from, i + 1)),
            Some(done) => {
                runs.push(done);
                Some((i, i + 1))
            }
            None => Some((i, i + 1)),
        };
    }
    runs.extend(run);
}

/// [`name_key`] of the name of `len` bytes that `bytes` starts with, read as one eight-byte word
/// when `bytes` holds that many (in a label field, the name is followed by the value's key,
/// length and value), rather than a byte at a time.
#[inline]
fn name_key_at(bytes: &[u8], len: usize) -> u64 {
    match bytes.first_chunk::<8>() {
        Some(&word) if len >= 8 => u64::from_be_bytes(word),
        Some(&word) => u64::from_be_bytes(word) & !(u64::MAX >> (8 * len)),
        None => name_key(bytes.get(..len).unwrap_or(bytes)),
    }
}

/// A label name's first eight bytes, big-endian, zeros after a shorter name: names whose keys
/// differ sort as their keys do.
#[inline]
fn name_key(name: &[u8]) -> u64 {
    let mut key = 0u64;
    for (i, &b) in name.iter().take(8).enumerate() {
        key |= u64::from(b) << (56 - 8 * i);
    }
    key
}

/// Whether the label name `a` (its [`name_key`] and bytes) sorts before `b`, byte order.
#[inline]
fn key_before(a: Option<(u64, &[u8])>, b: Option<(u64, &[u8])>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.0 < b.0 || (a.0 == b.0 && a.1 < b.1),
        _ => false,
    }
}

/// One metric's labels (sorted, none named `__name__`), each already encoded as a
/// `TimeSeries.labels` field, back to back.
#[derive(Default)]
struct EncodedLabels {
    bytes: Vec<u8>,
    /// Where each label's field starts in `bytes`, and its name.
    starts: Vec<usize>,
    names: Vec<(usize, usize)>,
    /// Where `__name__` goes; where the last bound or rank label went, and the label it replaces.
    at_name: usize,
    extra_at: Option<(&'static str, usize, usize)>,
}

impl EncodedLabels {
    fn set(&mut self, base: &[(&str, &str)]) {
        self.clear();
        for &(n, v) in base {
            let start = self.bytes.len();
            self.starts.push(start);
            write_label(n, v, &mut self.bytes);
            self.name_written(start, n.len(), v.len());
        }
        self.done();
    }

    /// As [`EncodedLabels::set`] with `metric`'s labels, copying each label's bytes as they are
    /// stored: a stored `LabelPair` written the usual way (name, then value, each non-empty and
    /// shorter than 128 bytes) is byte for byte a remote-write `Label`, in a field of the same
    /// number. `found` is scratch space, reused from one metric to the next. False (and nothing
    /// usable set) when a name is not ASCII, which the label-name rule makes it: the caller then
    /// reads the labels as `set` takes them.
    fn copy_from<'a>(
        &mut self,
        metric: &wire::MetricView<'a>,
        found: &mut Vec<(&'a [u8], &'a str, &'a [u8])>,
    ) -> Result<bool, DecodeError> {
        self.clear();
        found.clear();
        for message in metric.label_messages() {
            let message = message?;
            let (n, v) = wire::label_unchecked_name(message)?;
            if n.is_empty() || v.is_empty() || n == b"__name__" {
                continue;
            }
            if !n.is_ascii() {
                return Ok(false);
            }
            found.push((n, v, message));
        }
        // Stored in the order the client sent them (validation checks, it does not sort), which
        // is name order when the client sorts them (Prometheus does).
        if !found.is_sorted_by(|a, b| name_order_bytes(a.0, b.0).is_le()) {
            found.sort_by(|a, b| name_order_bytes(a.0, b.0));
        }
        for &(n, v, message) in found.iter() {
            let start = self.bytes.len();
            self.starts.push(start);
            let usual = n.len() < 128
                && v.len() < 128
                && message.len() == 4 + n.len() + v.len()
                && message[0] == 0x0a
                && message[1] == n.len() as u8
                && message[2 + n.len()] == 0x12
                && message[3 + n.len()] == v.len() as u8;
            if usual {
                self.bytes.push(0x0a); // TimeSeries.labels
                prost::encoding::encode_varint(message.len() as u64, &mut self.bytes);
                self.bytes.extend_from_slice(message);
            } else {
                // ASCII, checked above.
                let n = std::str::from_utf8(n).unwrap_or_default();
                write_label(n, v, &mut self.bytes);
            }
            self.name_written(start, n.len(), v.len());
        }
        self.done();
        Ok(true)
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.starts.clear();
        self.names.clear();
    }

    /// Notes where the name of the label just written from `start` is.
    fn name_written(&mut self, start: usize, name_len: usize, value_len: usize) {
        // The name's bytes follow the field's key and length, then the name's key and length.
        let name_at = start
            + 1
            + varint_len(label_payload_len(name_len, value_len) as u64)
            + 1
            + varint_len(name_len as u64);
        self.names.push((name_at, name_len));
    }

    fn done(&mut self) {
        self.starts.push(self.bytes.len());
        // Once per metric, not per series: comparing names is a call to memcmp each.
        self.at_name = self.position("__name__");
        self.extra_at = None;
    }

    /// Where the label `name` goes, and past which label (the one it replaces, if any).
    fn extra_position(&mut self, name: &'static str) -> (usize, usize) {
        match self.extra_at {
            Some((cached, at, past)) if cached == name => (at, past),
            _ => {
                let at = self.position(name);
                let past =
                    at + usize::from(at < self.names.len() && self.name(at) == name.as_bytes());
                self.extra_at = Some((name, at, past));
                (at, past)
            }
        }
    }

    fn name(&self, i: usize) -> &[u8] {
        let (at, len) = self.names[i];
        &self.bytes[at..at + len]
    }

    /// The index of the first label whose name sorts after `name` (labels before it sort before).
    fn position(&self, name: &str) -> usize {
        let (mut low, mut high) = (0, self.names.len());
        while low < high {
            let mid = (low + high) / 2;
            if name_order_bytes(self.name(mid), name.as_bytes()).is_lt() {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low
    }

    /// The encoded labels `from..to`.
    fn run(&self, from: usize, to: usize) -> &[u8] {
        &self.bytes[self.starts[from]..self.starts[to]]
    }

    /// One `WriteRequest.timeseries` entry: these labels with `__name__` (its encoded field
    /// `name`) and `extra` (replacing a label of its name) merged in, as [`write_series`] writes
    /// it; returns the bytes of its sample field, which ends it (under 128: at most 21).
    fn write_series(
        &mut self,
        name: &[u8],
        extra: Option<(&'static str, &str)>,
        value: f64,
        timestamp: &Stamp,
        out: &mut Vec<u8>,
    ) -> u8 {
        let count = self.names.len();
        // Up to two inserted labels, in name order, each with where it goes and what it skips.
        let at_name = self.at_name;
        let mut cuts: [(usize, usize); 2] = [(at_name, at_name); 2];
        let mut extra_first = false;
        if let Some((n, _)) = extra {
            cuts[1] = self.extra_position(n);
            if n < "__name__" {
                extra_first = true;
                cuts.swap(0, 1);
            }
        }
        let extra_field = extra.map_or(0, |(n, v)| field_len(label_payload_len(n.len(), v.len())));
        let sample_len = timestamp.sample_len(value);
        let runs = if extra.is_some() {
            [(0, cuts[0].0), (cuts[0].1, cuts[1].0), (cuts[1].1, count)]
        } else {
            [(0, at_name), (at_name, count), (count, count)]
        };
        let series_len = runs
            .iter()
            .map(|&(from, to)| self.run(from, to).len())
            .sum::<usize>()
            + name.len()
            + extra_field
            + field_len(sample_len);
        out.reserve(field_len(series_len));
        out.push(0x0a); // WriteRequest.timeseries, length-delimited
        put_len(series_len, out);
        out.extend_from_slice(self.run(runs[0].0, runs[0].1));
        match extra {
            None => {
                out.extend_from_slice(name);
                out.extend_from_slice(self.run(runs[1].0, runs[1].1));
            }
            Some((n, v)) => {
                if extra_first {
                    write_label(n, v, out);
                } else {
                    out.extend_from_slice(name);
                }
                out.extend_from_slice(self.run(runs[1].0, runs[1].1));
                if extra_first {
                    out.extend_from_slice(name);
                } else {
                    write_label(n, v, out);
                }
                out.extend_from_slice(self.run(runs[2].0, runs[2].1));
            }
        }
        timestamp.write_sample(value, out)
    }
}

/// Byte order of label names, deciding on the first byte where it can: label names mostly differ
/// there, and comparing slices calls memcmp (5% of egress's CPU went to it).
fn name_order(a: &str, b: &str) -> std::cmp::Ordering {
    name_order_bytes(a.as_bytes(), b.as_bytes())
}

fn name_order_bytes(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    match (a.first(), b.first()) {
        (Some(x), Some(y)) if x != y => x.cmp(y),
        _ => a.cmp(b),
    }
}

/// Bytes of a `Label` message with a name and value of these lengths (proto3: an empty string is
/// left out).
fn label_payload_len(name: usize, value: usize) -> usize {
    (if name == 0 { 0 } else { field_len(name) }) + (if value == 0 { 0 } else { field_len(value) })
}

/// One `TimeSeries.labels` field.
fn write_label(n: &str, v: &str, out: &mut Vec<u8>) {
    out.push(0x0a); // TimeSeries.labels
    prost::encoding::encode_varint(label_payload_len(n.len(), v.len()) as u64, out);
    for (key, text) in [(0x0a, n), (0x12, v)] {
        if !text.is_empty() {
            out.push(key); // Label.name, Label.value
            prost::encoding::encode_varint(text.len() as u64, out);
            out.extend_from_slice(text.as_bytes());
        }
    }
}

/// The `TimeSeries.samples` field of one sample, `sample_len` bytes of payload.
fn write_sample(value: f64, timestamp: i64, sample_len: usize, out: &mut Vec<u8>) {
    out.push(0x12); // TimeSeries.samples
    prost::encoding::encode_varint(sample_len as u64, out);
    if value != 0.0 {
        out.push(0x09); // Sample.value, 64-bit
        out.extend_from_slice(&value.to_le_bytes());
    }
    if timestamp != 0 {
        out.push(0x10); // Sample.timestamp, varint
        prost::encoding::encode_varint(timestamp as u64, out);
    }
}

/// A series' labels in name order, as [`series`] sorts them: the metric's own (sorted), with
/// `__name__` and the bound or rank merged in (replacing a label of the same name).
struct Labels<'a> {
    base: &'a [(&'a str, &'a str)],
    name: &'a str,
    extra: Option<(&'a str, &'a str)>,
}

impl Labels<'_> {
    fn for_each(&self, mut f: impl FnMut(&str, &str)) {
        let mut pending: [Option<(&str, &str)>; 2] = [Some(("__name__", self.name)), self.extra];
        if pending[1].is_some_and(|(n, _)| n < "__name__") {
            pending.swap(0, 1);
        }
        let mut next = 0;
        for &(n, v) in self.base {
            if self.extra.is_some_and(|(e, _)| e == n) {
                continue;
            }
            while let Some(Some((pn, pv))) = pending.get(next) {
                if *pn > n {
                    break;
                }
                f(pn, pv);
                next += 1;
            }
            f(n, v);
        }
        for (pn, pv) in pending.iter().skip(next).flatten() {
            f(pn, pv);
        }
    }
}

/// Bytes of a varint.
fn varint_len(v: u64) -> usize {
    prost::encoding::encoded_len_varint(v)
}

/// Bytes of a length-delimited field of `len` bytes with a one-byte key.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// One `WriteRequest.timeseries` entry, encoded as prost encodes [`TimeSeries`] (proto3: zero
/// values and empty strings left out).
fn write_series(labels: &Labels<'_>, value: f64, timestamp: i64, out: &mut Vec<u8>) {
    let label_len = |n: &str, v: &str| {
        (if n.is_empty() { 0 } else { field_len(n.len()) })
            + (if v.is_empty() { 0 } else { field_len(v.len()) })
    };
    let sample_len = (if value != 0.0 { 9 } else { 0 })
        + (if timestamp != 0 {
            1 + varint_len(timestamp as u64)
        } else {
            0
        });
    let mut series_len = field_len(sample_len);
    labels.for_each(|n, v| series_len += field_len(label_len(n, v)));
    out.reserve(field_len(series_len));
    out.push(0x0a); // WriteRequest.timeseries, length-delimited
    prost::encoding::encode_varint(series_len as u64, out);
    labels.for_each(|n, v| {
        out.push(0x0a); // TimeSeries.labels
        prost::encoding::encode_varint(label_len(n, v) as u64, out);
        for (key, text) in [(0x0a, n), (0x12, v)] {
            if !text.is_empty() {
                out.push(key); // Label.name, Label.value
                prost::encoding::encode_varint(text.len() as u64, out);
                out.extend_from_slice(text.as_bytes());
            }
        }
    });
    write_sample(value, timestamp, sample_len, out);
}

/// `f` as Go's `strconv.FormatFloat(f, 'g', -1, 64)` writes it (what Prometheus puts in `le` and
/// `quantile`): the shortest digits that read back as `f`, in exponent form below 1e-4 and from
/// 1e6 up, and `NaN`, `+Inf`, `-Inf`.
pub fn format_float(f: f64) -> String {
    telemeter_common::text::format_float(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemeter_common::model::{Bucket, Counter, Gauge, Histogram, Quantile, Summary, Untyped};
    use telemeter_common::model::{Metric, MetricType};

    fn family(name: &str, t: MetricType, metric: Metric) -> MetricFamily {
        MetricFamily {
            name: Some(name.into()),
            help: None,
            r#type: Some(t as i32),
            metric: vec![metric],
        }
    }

    type Pairs = Vec<(String, String)>;

    fn labels_of(s: &TimeSeries) -> Pairs {
        s.labels
            .iter()
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Pairs {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn encoded_series_are_the_bytes_prost_writes_for_to_series() {
        use prost::Message;
        let labels = vec![
            LabelPair::new("zone", "a"),
            LabelPair::new("Job", "x"),
            LabelPair::new("_id", "c1"),
            LabelPair::new("le", "shadowed"),
            LabelPair::new("empty", ""),
        ];
        let families = vec![
            family(
                "g",
                MetricType::Gauge,
                Metric {
                    label: labels.clone(),
                    gauge: Some(Gauge { value: Some(-2.5) }),
                    timestamp_ms: Some(1_700_000_000_123),
                    ..Default::default()
                },
            ),
            // Zero value and zero timestamp: proto3 leaves them out.
            family(
                "z",
                MetricType::Counter,
                Metric {
                    counter: Some(Counter { value: Some(0.0) }),
                    timestamp_ms: Some(0),
                    ..Default::default()
                },
            ),
            family(
                "h",
                MetricType::Histogram,
                Metric {
                    label: labels.clone(),
                    histogram: Some(Histogram {
                        sample_count: Some(10),
                        sample_sum: Some(4.5),
                        bucket: vec![Bucket {
                            cumulative_count: Some(3),
                            upper_bound: Some(0.005),
                        }],
                    }),
                    timestamp_ms: Some(-5),
                    ..Default::default()
                },
            ),
            family(
                "s",
                MetricType::Summary,
                Metric {
                    label: labels,
                    summary: Some(Summary {
                        sample_count: Some(4),
                        sample_sum: Some(2.0),
                        quantile: vec![Quantile {
                            quantile: Some(0.99),
                            value: Some(f64::NAN),
                        }],
                    }),
                    ..Default::default()
                },
            ),
        ];
        let want = crate::remote_write::proto::WriteRequest {
            timeseries: to_series(&families, 42),
        }
        .encode_to_vec();
        let mut got = Vec::new();
        let mut ends = Vec::new();
        encode_series(&families, 42, &mut got, |end| ends.push(end));
        assert_eq!(got, want);
        // Read in place from the stored bytes: the same request.
        let mut in_place = Vec::new();
        let mut in_place_ends = Vec::new();
        let mut samples = Vec::new();
        encode_payload(
            &telemeter_common::delimited::encode(&families),
            42,
            &mut in_place,
            |entries| {
                for &(end, sample) in entries {
                    in_place_ends.push(end);
                    samples.push(end - usize::from(sample));
                }
            },
        )
        .unwrap();
        assert_eq!((&in_place, &in_place_ends), (&got, &ends));
        // Each entry's last field is its sample, of the length said.
        for (&at, &end) in samples.iter().zip(&ends) {
            assert_eq!(in_place[at], 0x12, "TimeSeries.samples");
            assert_eq!(usize::from(in_place[at + 1]) + 2, end - at);
        }
        assert_eq!(ends.len(), to_series(&families, 42).len());
        assert_eq!(ends.last(), Some(&got.len()));
        // Each entry on its own is a request with that one series.
        let first = crate::remote_write::proto::WriteRequest::decode(&got[..ends[0]]).unwrap();
        assert_eq!(first.timeseries, to_series(&families, 42)[..1].to_vec());
    }

    /// The request bytes prost writes for `families`, and those `encode_payload` writes from
    /// `payload` (which holds them).
    fn both(families: &[MetricFamily], payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
        use prost::Message;
        let want = crate::remote_write::proto::WriteRequest {
            timeseries: to_series(families, 42),
        }
        .encode_to_vec();
        let mut got = Vec::new();
        encode_payload(payload, 42, &mut got, |_| {}).unwrap();
        (got, want)
    }

    #[test]
    fn a_scratch_kept_from_payload_to_payload_changes_nothing_written_and_keeps_its_space() {
        use prost::Message;
        let histogram = |id: &str, bounds: &[f64]| Metric {
            label: vec![LabelPair::new("_id", id), LabelPair::new("a", "1")],
            histogram: Some(Histogram {
                sample_count: Some(9),
                sample_sum: Some(1.5),
                bucket: bounds
                    .iter()
                    .map(|&b| Bucket {
                        cumulative_count: Some(1),
                        upper_bound: Some(b),
                    })
                    .collect(),
            }),
            timestamp_ms: Some(5),
            ..Default::default()
        };
        let gauge = |labels: &[(&str, &str)]| Metric {
            label: labels.iter().map(|&(n, v)| LabelPair::new(n, v)).collect(),
            gauge: Some(Gauge { value: Some(2.0) }),
            ..Default::default()
        };
        // Payloads one after another whose bounds, label layouts and names differ from those of
        // the one before: nothing of the one before may show in the next.
        let payloads: Vec<Vec<MetricFamily>> = vec![
            testkit::payload::families("cluster-a", 1_700_000_000_000),
            vec![
                family("h", MetricType::Histogram, histogram("x", &[0.1, 1.0])),
                family("g", MetricType::Gauge, gauge(&[("b", "2"), ("a", "1")])),
            ],
            vec![
                family("h", MetricType::Histogram, histogram("y", &[0.5, 2.0, 3.0])),
                family("g", MetricType::Gauge, gauge(&[("c", "3"), ("_id", "y")])),
                family("gg", MetricType::Gauge, gauge(&[("b", "2"), ("a", "1")])),
            ],
            testkit::payload::families("cluster-b", 1_700_000_000_001),
        ];
        let mut scratch = Scratch::default();
        let mut space = None;
        for families in &payloads {
            let want = crate::remote_write::proto::WriteRequest {
                timeseries: to_series(families, 42),
            }
            .encode_to_vec();
            let payload = telemeter_common::delimited::encode(families);
            let mut got = Vec::new();
            encode_payload_with(&payload, 42, &mut got, |_| {}, &mut scratch).unwrap();
            assert_eq!(got, want);
            // The same allocations serve every payload (each no larger than the first's).
            let now = (scratch.pending.as_ptr(), scratch.stored.as_ptr());
            assert!(scratch.pending.capacity() > 0 && scratch.stored.capacity() > 0);
            assert!(scratch.stored.is_empty() && scratch.base.is_empty());
            assert_eq!(*space.get_or_insert(now), now);
        }
    }

    #[test]
    fn a_name_key_read_as_one_word_is_the_key_of_the_name() {
        let bytes = b"instance_name\x12\x01v";
        for len in 0..=13 {
            let name = &bytes[..len];
            assert_eq!(name_key_at(bytes, len), name_key(name), "{len}");
            // Too short for a word: byte by byte.
            assert_eq!(name_key_at(name, len), name_key(name), "{len}");
        }
    }

    #[test]
    fn a_sample_field_is_written_as_prost_writes_it() {
        use prost::Message;
        for timestamp in [0, 1, 127, 128, 1_700_000_000_000, -1, i64::MIN, i64::MAX] {
            for value in [0.0, -0.0, 1.5, f64::NAN, f64::INFINITY] {
                let series = TimeSeries {
                    labels: Vec::new(),
                    samples: vec![Sample { value, timestamp }],
                };
                let mut got = vec![7];
                // Set after another timestamp, or as the first.
                let mut stamp = Stamp::new(timestamp ^ 1);
                stamp.set(timestamp);
                let len = stamp.write_sample(value, &mut got);
                assert_eq!(
                    Stamp::new(timestamp).write_sample(value, &mut Vec::new()),
                    len
                );
                assert_eq!(got[1..], series.encode_to_vec()[..], "{timestamp} {value}");
                assert_eq!(usize::from(len), got.len() - 1);
            }
        }
    }

    #[test]
    fn each_series_carries_its_own_timestamp_when_they_change_from_one_to_the_next() {
        let gauge = |id: &str, timestamp_ms: Option<i64>| Metric {
            label: vec![LabelPair::new("_id", id)],
            gauge: Some(Gauge { value: Some(2.0) }),
            timestamp_ms,
            ..Default::default()
        };
        let stamps = [
            Some(5),
            Some(5),
            Some(300),
            None,
            Some(0),
            Some(-1),
            Some(5),
            None,
        ];
        let simple = MetricFamily {
            name: Some("g".into()),
            help: None,
            r#type: Some(MetricType::Gauge as i32),
            metric: stamps.iter().map(|&t| gauge("c", t)).collect(),
        };
        let summary = |timestamp_ms| Metric {
            summary: Some(Summary {
                sample_count: Some(1),
                sample_sum: Some(1.0),
                quantile: Vec::new(),
            }),
            timestamp_ms,
            ..Default::default()
        };
        let general = MetricFamily {
            name: Some("s".into()),
            help: None,
            r#type: Some(MetricType::Summary as i32),
            metric: stamps.iter().map(|&t| summary(t)).collect(),
        };
        let families = [simple.clone(), general, simple];
        let payload = telemeter_common::delimited::encode(&families);
        let (got, want) = both(&families, &payload);
        assert_eq!(got, want);
    }

    #[test]
    fn lengths_are_the_varints_prost_writes() {
        for len in [
            0,
            1,
            127,
            128,
            129,
            300,
            16383,
            16384,
            16385,
            1 << 21,
            usize::MAX >> 1,
        ] {
            let (mut got, mut want) = (vec![7], vec![7]);
            put_len(len, &mut got);
            prost::encoding::encode_varint(len as u64, &mut want);
            assert_eq!(got, want, "{len}");
        }
    }

    #[test]
    fn stored_labels_are_copied_in_runs_of_fields_stored_one_after_the_other() {
        let mut runs = Vec::new();
        runs_of(&[0, 3, 1, 2, 4], &mut runs);
        assert_eq!(runs, [(0, 1), (3, 4), (1, 3), (4, 5)]);
        runs.clear();
        runs_of(&[0, 1, 2], &mut runs);
        runs_of(&[], &mut runs);
        runs_of(&[4, 3], &mut runs);
        assert_eq!(runs, [(0, 3), (4, 5), (3, 4)]);
        // A layout as the bench's clients store it (`_id` first, the family's own labels last)
        // and one stored in name order with `_id` appended: the fields go in as few runs as
        // their stored order allows, `__name__` between them, each series as prost writes it.
        let label = |n: &[u8], v: &[u8]| {
            let mut f = vec![0x0a, (4 + n.len() + v.len()) as u8, 0x0a, n.len() as u8];
            f.extend_from_slice(n);
            f.extend_from_slice(&[0x12, v.len() as u8]);
            f.extend_from_slice(v);
            f
        };
        let gauge = [0x12, 9, 0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f];
        for (labels, want) in [
            (
                vec![
                    label(b"_id", b"c"),
                    label(b"instance", b"i"),
                    label(b"job", b"j"),
                    label(b"cpu", b"0"),
                    label(b"mode", b"idle"),
                ],
                vec![(0, 1), (3, 4), (1, 3), (4, 5)],
            ),
            (
                vec![
                    label(b"A", b"1"),
                    label(b"instance", b"i"),
                    label(b"job", b"j"),
                    label(b"_id", b"c"),
                ],
                vec![(0, 1), (3, 4), (1, 3)],
            ),
        ] {
            let message = [labels.concat(), gauge.to_vec()].concat();
            let mut fields = StoredFields::default();
            assert_eq!(fields.read(&message, 0x12), Some((1.0, None)));
            assert_eq!(fields.runs, want);
            let mut family = vec![0x0a, 1, b'g', 0x18, 1, 0x22, message.len() as u8];
            family.extend_from_slice(&message);
            let payload = [vec![family.len() as u8], family].concat();
            let families =
                telemeter_common::delimited::decode(&payload, &Default::default()).unwrap();
            let (got, want) = both(&families, &payload);
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_scratch_vector_grown_past_its_bound_is_freed() {
        let mut scratch = Scratch {
            pending: Vec::with_capacity(SCRATCH_KEEP_BYTES),
            order: Vec::with_capacity(16),
            ..Default::default()
        };
        scratch.trim();
        assert_eq!(scratch.pending.capacity(), 0);
        assert_eq!(scratch.order.capacity(), 16);
    }

    #[test]
    fn labels_copied_as_stored_are_the_labels_prost_writes_however_they_were_stored() {
        // An empty value, a `__name__` label, a value of 128 bytes and more (a two-byte length:
        // written, not copied), a name sorting before `__name__`; in name order and not.
        let long = "v".repeat(300);
        let labels = vec![
            LabelPair::new("A", "x"),
            LabelPair::new("__name__", "shadowed"),
            LabelPair::new("_id", "c1"),
            LabelPair::new("empty", ""),
            LabelPair::new("long", &long),
            LabelPair::new("z", &"w".repeat(127)),
        ];
        let metric = |labels: Vec<LabelPair>| Metric {
            label: labels,
            gauge: Some(Gauge { value: Some(3.0) }),
            timestamp_ms: Some(1_700_000_000_000),
            ..Default::default()
        };
        let families = vec![
            family("g", MetricType::Gauge, metric(labels.clone())),
            family("h", MetricType::Gauge, metric(vec![])),
            family(
                "u",
                MetricType::Gauge,
                metric(labels.iter().rev().cloned().collect()),
            ),
        ];
        let (got, want) = both(&families, &telemeter_common::delimited::encode(&families));
        assert_eq!(got, want);
        // A label stored value first (valid protobuf, not how prost writes it): the same series.
        let plain = vec![family(
            "g",
            MetricType::Gauge,
            metric(vec![LabelPair::new("a", "b"), LabelPair::new("c", "d")]),
        )];
        let mut payload = telemeter_common::delimited::encode(&plain);
        let usual = [0x0a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b'];
        let at = payload
            .windows(usual.len())
            .position(|w| w == usual)
            .expect("the label as prost writes it");
        payload[at + 2..at + 8].copy_from_slice(&[0x12, 0x01, b'b', 0x0a, 0x01, b'a']);
        let (got, want) = both(&plain, &payload);
        assert_eq!(got, want);
        // A name that is not ASCII (the label-name rule refuses it, the wire does not).
        let odd = vec![family(
            "g",
            MetricType::Gauge,
            metric(vec![LabelPair::new("a", "2"), LabelPair::new("é", "1")]),
        )];
        let (got, want) = both(&odd, &telemeter_common::delimited::encode(&odd));
        assert_eq!(got, want);
    }

    #[test]
    fn a_simple_series_of_up_to_and_over_sixteen_labels_is_written_in_name_order() {
        // Up to 16 stored labels are put in order by insertion, more by the library's sort (3,
        // 4, 16, 17 and 42 here): both, stored in reverse order and shuffled, with names alike in
        // their first eight bytes and one sorting before `__name__`; each as prost writes it.
        for count in [1, 2, 14, 15, 40] {
            let mut names: Vec<String> = (0..count).map(|i| format!("label_name_{i:02}")).collect();
            names.push("A".into());
            names.push("_id".into());
            let reversed: Vec<LabelPair> = names
                .iter()
                .rev()
                .map(|n| LabelPair::new(n, &format!("v-{n}")))
                .collect();
            let mut shuffled = reversed.clone();
            // A fixed interleaving: odd positions first, then even ones.
            shuffled.sort_by_key(|l| {
                let i = names
                    .iter()
                    .position(|n| Some(n.as_str()) == l.name.as_deref());
                i.map(|i| (i % 2 == 0, i))
            });
            for labels in [reversed, shuffled] {
                let families = vec![family(
                    "g",
                    MetricType::Gauge,
                    Metric {
                        label: labels,
                        gauge: Some(Gauge { value: Some(1.0) }),
                        timestamp_ms: Some(1_700_000_000_000),
                        ..Default::default()
                    },
                )];
                let (got, want) = both(&families, &telemeter_common::delimited::encode(&families));
                assert_eq!(got, want, "{count} labels");
            }
        }
    }

    #[test]
    fn series_of_one_family_in_other_label_layouts_are_each_written_in_name_order() {
        // One sort serves the series that follow with the same names in the same order: a
        // series with the same names in another order, names alike in their first eight bytes
        // swapped, other names, more of them, and the next family, each as prost writes it.
        let layouts: [&[&str]; 9] = [
            &["b", "a"],
            &["b", "a"],
            &["a", "b"],
            &["instance_b", "instance_a"],
            &["instance_a", "instance_b"],
            &["instance_a", "instance_c"],
            &["a", "c"],
            &["b", "a", "_id"],
            &["b", "a"],
        ];
        let metrics: Vec<Metric> = layouts
            .iter()
            .enumerate()
            .map(|(i, names)| Metric {
                label: names
                    .iter()
                    .map(|n| LabelPair::new(n, &format!("{n}-{i}")))
                    .collect(),
                gauge: Some(Gauge {
                    value: Some(i as f64),
                }),
                timestamp_ms: Some(1_700_000_000_000),
                ..Default::default()
            })
            .collect();
        let mut families = vec![family("g", MetricType::Gauge, metrics[0].clone())];
        families[0].metric = metrics.clone();
        families.push(family("h", MetricType::Counter, metrics[2].clone()));
        families[1].metric[0].counter = Some(Counter { value: Some(2.0) });
        families[1].metric[0].gauge = None;
        let (got, want) = both(&families, &telemeter_common::delimited::encode(&families));
        assert_eq!(got, want);
    }

    #[test]
    fn a_simple_series_stored_otherwise_than_usual_is_read_whole() {
        // Hand-written `Metric` messages the stored-fields path must leave to the general reader:
        // a label after the value (which it would miss), a second value field, an empty gauge
        // message, a timestamp then a label, and for contrast the usual layout with an unsorted
        // label; each family gauge, as prost's model of the same bytes sees it.
        let label = |n: &[u8], v: &[u8]| {
            let mut f = vec![0x0a, (4 + n.len() + v.len()) as u8, 0x0a, n.len() as u8];
            f.extend_from_slice(n);
            f.extend_from_slice(&[0x12, v.len() as u8]);
            f.extend_from_slice(v);
            f
        };
        let gauge = |v: f64| {
            let mut f = vec![0x12, 9, 0x09];
            f.extend_from_slice(&v.to_le_bytes());
            f
        };
        let stamp = vec![0x30, 0xe8, 0x07]; // 1000
        let metrics: Vec<Vec<u8>> = vec![
            [
                label(b"b", b"2"),
                gauge(1.5),
                label(b"a", b"1"),
                stamp.clone(),
            ]
            .concat(),
            [label(b"a", b"1"), gauge(1.5), gauge(2.5)].concat(),
            [label(b"a", b"1"), vec![0x12, 0], stamp.clone()].concat(),
            [
                label(b"a", b"1"),
                gauge(3.5),
                stamp.clone(),
                label(b"c", b"3"),
            ]
            .concat(),
            [
                label(b"z", b"9"),
                label(b"a", b"1"),
                gauge(4.5),
                stamp.clone(),
            ]
            .concat(),
            // Usual, in name order once sorted: names sharing their first eight bytes or more,
            // one sorting before `__name__`; and more labels than are sorted by insertion.
            [
                label(b"instance_b", b"2"),
                label(b"instance", b"1"),
                label(b"A", b"0"),
                label(b"_id", b"c"),
                label(b"instance_a", b"3"),
                label(b"instanc", b"4"),
                gauge(5.5),
                stamp.clone(),
            ]
            .concat(),
            [
                (0..20u8)
                    .rev()
                    .flat_map(|i| label(&[b'a' + i, b'x', b'A' + i], &[b'v', i]))
                    .collect(),
                gauge(6.5),
            ]
            .concat(),
        ];
        let varint = |n: usize| match n {
            0..128 => vec![n as u8],
            _ => vec![0x80 | (n & 0x7f) as u8, (n >> 7) as u8],
        };
        for metric in metrics {
            let mut family = [vec![0x0a, 1, b'g', 0x18, 1, 0x22], varint(metric.len())].concat();
            family.extend_from_slice(&metric);
            let mut payload = varint(family.len());
            payload.extend_from_slice(&family);
            let families =
                telemeter_common::delimited::decode(&payload, &Default::default()).unwrap();
            let (got, want) = both(&families, &payload);
            assert_eq!(got, want, "metric {metric:02x?}");
            assert!(!got.is_empty());
        }
        // Families framed otherwise (read the general way from there on) and of each simple
        // type, with a value of the type or another.
        let usual = [label(b"a", b"1"), gauge(1.5), stamp.clone()].concat();
        let counter = [label(b"a", b"1"), vec![0x1a], gauge(2.5)[1..].to_vec()].concat();
        let untyped = [label(b"a", b"1"), vec![0x2a], gauge(3.5)[1..].to_vec()].concat();
        let series = |m: &[u8]| [vec![0x22, m.len() as u8], m.to_vec()].concat();
        let help = vec![0x12, 2, b'h', b'i'];
        let name = vec![0x0a, 1, b'g'];
        let long = [label(&[b'x'; 60], &[b'y'; 60]), gauge(9.5)].concat();
        let long_series = [
            vec![
                0x22,
                0x80 | (long.len() as u8 & 0x7f),
                (long.len() >> 7) as u8,
            ],
            long,
        ]
        .concat();
        let families: Vec<(Vec<u8>, usize)> = vec![
            // A help after the first series, then an unknown field, then a series.
            (
                [
                    name.clone(),
                    vec![0x18, 1],
                    series(&usual),
                    help.clone(),
                    series(&usual),
                    vec![0x28, 7],
                    series(&counter),
                ]
                .concat(),
                2,
            ),
            // The type after the series; a series field of a two-byte length (long labels).
            (
                [
                    name.clone(),
                    series(&usual),
                    vec![0x18, 1],
                    long_series.clone(),
                ]
                .concat(),
                2,
            ),
            // A counter family: its counters, not its gauges; untyped, with no type field.
            (
                [
                    name.clone(),
                    help.clone(),
                    vec![0x18, 0],
                    series(&usual),
                    series(&counter),
                ]
                .concat(),
                1,
            ),
            (
                [
                    name.clone(),
                    series(&untyped),
                    series(&usual),
                    series(&untyped),
                ]
                .concat(),
                2,
            ),
        ];
        // A family renamed after its series (the last name is its name), between usual ones,
        // and all of them in one payload: each read as the general reader reads it.
        let renamed = [name.clone(), series(&untyped), vec![0x0a, 1, b'h']].concat();
        let plain = [name.clone(), vec![0x18, 1], series(&usual)].concat();
        let mut all = (
            families
                .iter()
                .map(|(f, n)| (f.clone(), *n))
                .collect::<Vec<_>>(),
            0,
        );
        all.0.insert(1, (renamed.clone(), 1));
        all.0.insert(0, (plain.clone(), 1));
        let framed = |family: &[u8]| {
            let mut payload = vec![
                0x80 | (family.len() as u8 & 0x7f),
                (family.len() >> 7) as u8,
            ];
            payload.extend_from_slice(family);
            payload
        };
        let many: Vec<u8> = all.0.iter().flat_map(|(f, _)| framed(f)).collect();
        all.1 = all.0.iter().map(|(_, n)| n).sum();
        let decoded = telemeter_common::delimited::decode(&many, &Default::default()).unwrap();
        let (got, want) = both(&decoded, &many);
        assert_eq!(got, want);
        assert!(got.windows(3).any(|w| w == [0x12, 1, b'h']), "renamed");
        let mut ends = 0;
        encode_payload(&many, 42, &mut Vec::new(), |entries| ends += entries.len()).unwrap();
        assert_eq!(ends, all.1);
        for (family, entries) in families {
            let payload = framed(&family);
            let families =
                telemeter_common::delimited::decode(&payload, &Default::default()).unwrap();
            let (got, want) = both(&families, &payload);
            assert_eq!(got, want, "family {family:02x?}");
            let mut ends = 0;
            encode_payload(&payload, 42, &mut Vec::new(), |entries| {
                ends += entries.len()
            })
            .unwrap();
            assert_eq!(ends, entries, "family {family:02x?}");
        }
    }

    #[test]
    fn in_place_encoding_matches_prost_on_realistic_and_varied_payloads() {
        use prost::Message;
        let histogram = |labels: Vec<LabelPair>, bounds: &[f64]| Metric {
            label: labels,
            histogram: Some(Histogram {
                sample_count: Some(9),
                sample_sum: Some(1.5),
                bucket: bounds
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| Bucket {
                        cumulative_count: Some(i as u64),
                        upper_bound: Some(b),
                    })
                    .collect(),
            }),
            timestamp_ms: Some(77),
            ..Default::default()
        };
        // Metrics of one family whose bounds differ in number and value (the formatted bounds
        // are reused by position only while they are the same), labels unsorted and sorted, one
        // sorting before `__name__`, one named as the bound it is replaced by.
        let varied = MetricFamily {
            name: Some("lat".into()),
            help: None,
            r#type: Some(MetricType::Histogram as i32),
            metric: vec![
                histogram(
                    vec![LabelPair::new("z", "1"), LabelPair::new("A", "2")],
                    &[0.1, 1.0],
                ),
                histogram(vec![LabelPair::new("le", "x")], &[0.1, 2.0, f64::INFINITY]),
                histogram(vec![], &[0.5]),
                histogram(vec![LabelPair::new("_id", "c")], &[]),
            ],
        };
        for families in [
            testkit::payload::families("cluster-a", 1_700_000_000_000),
            vec![varied],
        ] {
            let want = crate::remote_write::proto::WriteRequest {
                timeseries: to_series(&families, 42),
            }
            .encode_to_vec();
            let mut got = Vec::new();
            let mut ends = Vec::new();
            encode_payload(
                &telemeter_common::delimited::encode(&families),
                42,
                &mut got,
                |entries| ends.extend(entries.iter().map(|&(end, _)| end)),
            )
            .unwrap();
            assert_eq!(got, want);
            assert_eq!(ends.len(), to_series(&families, 42).len());
        }
    }

    #[test]
    fn simple_types_are_one_series_with_sorted_labels() {
        let metric = Metric {
            label: vec![
                LabelPair::new("zone", "a"),
                LabelPair::new("_id", "c1"),
                LabelPair::new("Job", "x"),
                LabelPair::new("empty", ""),
            ],
            gauge: Some(Gauge { value: Some(2.5) }),
            counter: Some(Counter { value: Some(9.0) }),
            untyped: Some(Untyped { value: Some(7.0) }),
            timestamp_ms: Some(1234),
            ..Default::default()
        };
        for (t, want) in [
            (MetricType::Gauge, 2.5),
            (MetricType::Counter, 9.0),
            (MetricType::Untyped, 7.0),
        ] {
            let s = to_series(&[family("m", t, metric.clone())], 0);
            assert_eq!(s.len(), 1);
            // Byte order: uppercase before `_`, so `Job` precedes `__name__`.
            assert_eq!(
                labels_of(&s[0]),
                pairs(&[
                    ("Job", "x"),
                    ("__name__", "m"),
                    ("_id", "c1"),
                    ("zone", "a")
                ])
            );
            assert_eq!(
                s[0].samples,
                vec![Sample {
                    value: want,
                    timestamp: 1234
                }]
            );
        }
    }

    #[test]
    fn a_histogram_is_buckets_sum_and_count() {
        let metric = Metric {
            label: vec![LabelPair::new("_id", "c")],
            histogram: Some(Histogram {
                sample_count: Some(10),
                sample_sum: Some(4.5),
                bucket: vec![
                    Bucket {
                        cumulative_count: Some(3),
                        upper_bound: Some(0.005),
                    },
                    Bucket {
                        cumulative_count: Some(8),
                        upper_bound: Some(1.0),
                    },
                ],
            }),
            timestamp_ms: Some(5),
            ..Default::default()
        };
        let s = to_series(&[family("h", MetricType::Histogram, metric)], 0);
        let got: Vec<(Pairs, f64)> = s
            .iter()
            .map(|s| (labels_of(s), s.samples[0].value))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    pairs(&[("__name__", "h_bucket"), ("_id", "c"), ("le", "0.005")]),
                    3.0
                ),
                (
                    pairs(&[("__name__", "h_bucket"), ("_id", "c"), ("le", "1")]),
                    8.0
                ),
                (
                    pairs(&[("__name__", "h_bucket"), ("_id", "c"), ("le", "+Inf")]),
                    10.0
                ),
                (pairs(&[("__name__", "h_sum"), ("_id", "c")]), 4.5),
                (pairs(&[("__name__", "h_count"), ("_id", "c")]), 10.0),
            ]
        );
        assert!(s.iter().all(|s| s.samples[0].timestamp == 5));
        assert_eq!(sample_count(&s), 5);
    }

    #[test]
    fn a_summary_is_quantiles_sum_and_count() {
        let metric = Metric {
            label: vec![],
            summary: Some(Summary {
                sample_count: Some(4),
                sample_sum: Some(2.0),
                quantile: vec![Quantile {
                    quantile: Some(0.99),
                    value: Some(0.7),
                }],
            }),
            ..Default::default()
        };
        let s = to_series(&[family("s", MetricType::Summary, metric)], 77);
        let got: Vec<(Pairs, f64, i64)> = s
            .iter()
            .map(|s| (labels_of(s), s.samples[0].value, s.samples[0].timestamp))
            .collect();
        assert_eq!(
            got,
            vec![
                (pairs(&[("__name__", "s"), ("quantile", "0.99")]), 0.7, 77),
                (pairs(&[("__name__", "s_sum")]), 2.0, 77),
                (pairs(&[("__name__", "s_count")]), 4.0, 77),
            ]
        );
    }

    #[test]
    fn a_metric_without_its_types_value_makes_no_series() {
        let metric = Metric {
            gauge: Some(Gauge { value: Some(1.0) }),
            ..Default::default()
        };
        assert!(to_series(&[family("c", MetricType::Counter, metric)], 0).is_empty());
    }

    #[test]
    fn floats_are_formatted_like_go() {
        for (f, want) in [
            (1.0, "1"),
            (0.005, "0.005"),
            (2.5, "2.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (100000.0, "100000"),
            (1e6, "1e+06"),
            (1234567.0, "1.234567e+06"),
            (1.5e300, "1.5e+300"),
            (-0.25, "-0.25"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
        ] {
            assert_eq!(format_float(f), want, "{f}");
        }
    }
}
