//! What decoding a scrape reply would allocate, estimated before it is decoded.
//!
//! Both decoders build owned values, and a reply's size says little about their size: an empty
//! protobuf `Metric` is 2 bytes on the wire and about 200 in memory, an empty label pair 2 bytes and
//! 48. 8 MiB of empty series (under `--limit-bytes`) made the client allocate 830 MB; 8 MiB of empty
//! labels in one series, 210 MB, and then exit 0 with nothing pushed. The decoders' own caps (series,
//! families) are checked only after a whole family is built, or not at all for labels.
//!
//! So the reply is first walked without allocating, and the memory its decoded form (and the
//! transform steps after it) would take is estimated from what it holds: every struct, every heap
//! string with the allocator's rounding, every vector with its doubling slack. The estimate is an
//! upper bound of what the real decoder allocates for the same bytes; it is close for what
//! Prometheus sends and generous for hostile layouts. The caller refuses a reply whose estimate is
//! over its budget, before decoding it.
//!
//! Protobuf is walked with the zero-copy views of [`telemeter_common::wire`], which follow prost's
//! rules exactly (merged fields, skipped unknown fields and groups), so the counts are prost's; a body
//! they refuse, prost refuses with the same reason. Text is walked with a tokenizer shaped after
//! [`telemeter_common::text::parse`] that counts what each line would allocate; where it and the
//! parser could disagree, it counts more, never less (see [`text`]).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::mem::size_of;
use telemeter_common::delimited::{DecodeError, Limits};
use telemeter_common::model::{Bucket, LabelPair, Metric, MetricFamily, MetricType, Quantile};
use telemeter_common::wire::{self, Value};

/// Most labels one series of a reply may have. The server accepts 64
/// ([`telemeter_common::labels::MAX_LABELS`]) and the client drops series with more, so a series with
/// four times that is not a mistake but a reply built to hurt: its text form also costs the parser
/// time quadratic in its label count (duplicate names are looked for in a list), which no memory
/// budget catches.
pub const MAX_LABELS_PER_SERIES: usize = 4 * telemeter_common::labels::MAX_LABELS;

/// Bytes the allocator takes for a heap block of `n` bytes (glibc: 8 bytes of header, 16-byte
/// granules, 32 bytes at least); nothing for an empty `String` or `Vec`, which do not allocate.
pub fn heap(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        n.saturating_add(8 + 15).max(32) & !15
    }
}

/// Bytes a `Vec` of `len` elements of `size` bytes built by pushing one at a time takes: its
/// capacity doubles from 4, so up to twice what it holds.
pub fn vec_bytes(len: usize, size: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let capacity = len.max(4).checked_next_power_of_two().unwrap_or(usize::MAX);
    heap(capacity.saturating_mul(size))
}

/// Bytes of the scratch buffer the standard library's stable sort allocates for `len` elements of
/// `size` bytes (`sort_by_key` in the transform): all of them up to 8 MB, half of them beyond.
fn sort_scratch(len: usize, size: usize) -> usize {
    let full = 8_000_000 / size.max(1);
    len.min((len / 2).max(full)).saturating_mul(size)
}

/// The capacity of a `Vec` after `len` pushes from empty: doubling from 4.
fn vec_capacity(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        len.max(4).checked_next_power_of_two().unwrap_or(usize::MAX)
    }
}

/// What the transform adds to each series after decoding, for the estimate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transform {
    /// Labels it sets on every series: the `--label` pairs and the `/authorize` labels (`_id`,
    /// and room for one more). A series' label vector full to capacity is grown (doubled) for them,
    /// and the old one stays behind as a hole between the label strings around it.
    pub added_labels: usize,
    /// Heap bytes it adds to every series besides: the added labels' names and values, and the
    /// anonymized values that replace scraped ones.
    pub bytes_per_series: usize,
}

impl Transform {
    /// What the transform adds with `--label` pairs `labels`, cluster `id`, and `anonymized`
    /// `--anonymize-labels`.
    pub fn of(labels: &[(String, String)], id: &str, anonymized: usize) -> Transform {
        let strings: usize = labels
            .iter()
            .map(|(n, v)| heap(n.len()) + heap(v.len()))
            .sum();
        Transform {
            added_labels: labels.len() + 2,
            bytes_per_series: strings
                + heap("_id".len())
                + heap(id.len())
                + 2 * heap(32)
                + anonymized * heap(12),
        }
    }
}

/// What a reply holds and what decoding it would take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    /// Families, counted the way the decoder creates them (an upper bound for text).
    pub families: usize,
    /// Series (an upper bound for text).
    pub series: usize,
    /// Label pairs over all series.
    pub labels: usize,
    /// Most labels of one series.
    pub most_labels: usize,
    /// Most series of one family (for text: of the whole reply).
    pub largest_family: usize,
    /// Bytes the decoded families would take, an upper bound.
    pub decoded_bytes: usize,
    /// Bytes the transform would add to them (grown label vectors, added strings).
    pub transform_bytes: usize,
}

impl Estimate {
    /// The bytes the client would hold at most while it decodes the reply and runs the transform:
    /// the decoded families, what the transform adds, and the sort's scratch buffer.
    pub fn peak_bytes(&self) -> usize {
        self.decoded_bytes
            .saturating_add(self.transform_bytes)
            .saturating_add(sort_scratch(self.largest_family, size_of::<Metric>()))
    }

    fn family(&mut self, name_len: usize, help_len: usize) {
        self.families += 1;
        self.decoded_bytes = self
            .decoded_bytes
            .saturating_add(heap(name_len))
            .saturating_add(heap(help_len));
    }

    /// A series of `count` labels, and what `transform` adds to it.
    fn series(&mut self, count: usize, transform: &Transform) {
        self.series = self.series.saturating_add(1);
        self.labels = self.labels.saturating_add(count);
        self.most_labels = self.most_labels.max(count);
        let size = size_of::<LabelPair>();
        self.decoded_bytes = self.decoded_bytes.saturating_add(vec_bytes(count, size));
        let mut grown = transform.bytes_per_series;
        let wanted = count.saturating_add(transform.added_labels);
        let mut capacity = vec_capacity(count);
        while capacity < wanted {
            capacity = capacity.saturating_mul(2).max(4);
            grown = grown.saturating_add(heap(capacity.saturating_mul(size)));
        }
        self.transform_bytes = self.transform_bytes.saturating_add(grown);
    }

    fn add(&mut self, bytes: usize) {
        self.decoded_bytes = self.decoded_bytes.saturating_add(bytes);
    }

    /// Refuses a series with more than [`MAX_LABELS_PER_SERIES`] labels.
    fn check_labels(&self, count: usize) -> Result<(), Refusal> {
        if count > MAX_LABELS_PER_SERIES {
            return Err(Refusal::TooManyLabels { labels: count });
        }
        Ok(())
    }
}

/// Why a reply is refused before it is decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The body is not valid protobuf-delimited `MetricFamily` messages, or breaks a decoder limit.
    Decode(DecodeError),
    /// A series has more than [`MAX_LABELS_PER_SERIES`] labels.
    TooManyLabels {
        /// How many labels it has (at least).
        labels: usize,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Decode(e) => e.fmt(f),
            Refusal::TooManyLabels { labels } => write!(
                f,
                "a series has {labels} labels or more, over the {MAX_LABELS_PER_SERIES} a reply may have"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

impl From<DecodeError> for Refusal {
    fn from(e: DecodeError) -> Self {
        Refusal::Decode(e)
    }
}

/// Estimates what [`telemeter_common::delimited::decode`] would allocate for `body` under `limits`,
/// and `transform` after it, checking everything the decoder would check (framing, sizes, family and
/// series caps, every message). Allocates nothing.
pub fn protobuf(body: &[u8], limits: &Limits, transform: &Transform) -> Result<Estimate, Refusal> {
    let mut e = Estimate::default();
    for family in wire::families(body, limits) {
        let family = family?;
        e.family(family.name.len(), family.help.len());
        let mut series = 0usize;
        for metric in family.metrics() {
            let metric = metric?;
            series += 1;
            let mut count = 0usize;
            for label in metric.labels() {
                let (name, value) = label?;
                count += 1;
                e.check_labels(count)?;
                e.add(heap(name.len()).saturating_add(heap(value.len())));
            }
            e.series(count, transform);
            // prost decodes every value field whatever the family's type, so both are counted.
            if let Value::Summary(s) = metric.value_for(MetricType::Summary)? {
                let mut n = 0usize;
                for q in s.quantiles() {
                    q?;
                    n += 1;
                }
                e.add(vec_bytes(n, size_of::<Quantile>()));
            }
            if let Value::Histogram(h) = metric.value_for(MetricType::Histogram)? {
                let mut n = 0usize;
                for b in h.buckets() {
                    b?;
                    n += 1;
                }
                e.add(vec_bytes(n, size_of::<Bucket>()));
            }
        }
        // The owned decoder checks the series cap after each family; so does this.
        if e.series > limits.max_series {
            return Err(DecodeError::TooManySeries {
                limit: limits.max_series,
            }
            .into());
        }
        e.largest_family = e.largest_family.max(series);
        e.add(vec_bytes(series, size_of::<Metric>()));
    }
    e.add(vec_bytes(e.families, size_of::<MetricFamily>()));
    Ok(e)
}

/// A hash-map entry of the text parser: the key and value, with the table's slack (it grows by
/// doubling at 7/8 full) and its control byte.
fn map_entry(key_and_value: usize) -> usize {
    (key_and_value + 1) * 16 / 7
}

/// Bytes a new family costs the text parser: its struct in the families vector (with the vector's
/// slack), its name twice (the family's and the name index's key), and the index entry.
fn text_family(name_len: usize) -> usize {
    2 * size_of::<MetricFamily>()
        + 2 * heap(name_len)
        + map_entry(size_of::<String>() + size_of::<usize>())
}

/// A family's type as the text parser tracks it: unset until a `# TYPE` line or a sample sets it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Unset,
    Histogram,
    Summary,
    /// Counter, gauge or untyped: series are not grouped.
    Plain,
}

impl Kind {
    /// The label that carries a bucket bound or a quantile rank, not kept as a series label.
    fn special(self) -> Option<&'static [u8]> {
        match self {
            Kind::Histogram => Some(b"le"),
            Kind::Summary => Some(b"quantile"),
            Kind::Unset | Kind::Plain => None,
        }
    }
}

/// The text parser's index of families by name, mirrored with names borrowed from the body.
struct TextFamilies<'a> {
    by_name: HashMap<&'a [u8], Kind>,
    max_families: usize,
}

impl<'a> TextFamilies<'a> {
    /// The family a name belongs to, created when new, exactly as the parser's `family_for`
    /// resolves it: the name itself, then `x_sum`/`x_count` of a summary `x`, then
    /// `x_bucket`/`x_sum`/`x_count` of a histogram `x`.
    fn family_for(&mut self, name: &'a [u8], e: &mut Estimate) -> Result<&'a [u8], Refusal> {
        if self.by_name.contains_key(name) {
            return Ok(name);
        }
        let suffixed: [(&[u8], Kind); 5] = [
            (b"_sum", Kind::Summary),
            (b"_count", Kind::Summary),
            (b"_bucket", Kind::Histogram),
            (b"_sum", Kind::Histogram),
            (b"_count", Kind::Histogram),
        ];
        for (suffix, wanted) in suffixed {
            if let Some(base) = name.strip_suffix(suffix) {
                if self.by_name.get(base) == Some(&wanted) {
                    return Ok(base);
                }
            }
        }
        if self.by_name.len() >= self.max_families {
            return Err(DecodeError::TooManyFamilies {
                limit: self.max_families,
            }
            .into());
        }
        self.by_name.insert(name, Kind::Unset);
        e.families += 1;
        e.add(text_family(name.len()));
        Ok(name)
    }

    fn kind(&self, family: &[u8]) -> Kind {
        self.by_name.get(family).copied().unwrap_or(Kind::Unset)
    }

    /// Sets the type of a family that has none (a later `# TYPE` line is an error to the parser).
    fn set_kind(&mut self, family: &'a [u8], kind: Kind) {
        if let Some(k) = self.by_name.get_mut(family) {
            if *k == Kind::Unset {
                *k = kind;
            }
        }
    }
}

/// Estimates what [`telemeter_common::text::parse`] would allocate for `body` with `max_families`,
/// and `transform` after it.
///
/// Families are resolved and typed exactly as the parser does (the index borrows the names from the
/// body: at most `max_families` entries, as more makes the parser refuse the body). Then per line:
/// - a sample of a counter, gauge or untyped family: a series with its labels (each name and value
///   on the heap; values with escapes at twice their length, the most the parser's growing string
///   reaches);
/// - a sample of a histogram or summary family: a bucket or quantile, and a series plus the
///   parser's grouping key (a copy of the labels) whenever its labels differ from the previous such
///   line's. Prometheus writes a series' lines together; other orders are counted as new series,
///   which only overestimates. Labels are compared by a hash with a per-run random key, so a body
///   cannot be built to collide;
/// - `# HELP` text.
///
/// The tokenizer follows the parser's grammar. Where a line breaks it, the parser stops with an
/// error, so what is counted after that point only overestimates; the scan never stops early on a
/// line it cannot follow, since stopping where the parser goes on would underestimate.
pub fn text(body: &[u8], max_families: usize, transform: &Transform) -> Result<Estimate, Refusal> {
    let mut e = Estimate::default();
    let hasher = RandomState::new();
    let mut families = TextFamilies {
        by_name: HashMap::new(),
        max_families,
    };
    let mut previous_key: Option<u64> = None;
    for line in body.split(|&b| b == b'\n') {
        let mut c = Cursor { line, pos: 0 };
        c.skip_blanks();
        match c.peek() {
            None => {}
            Some(b'#') => {
                c.pos += 1;
                c.skip_blanks();
                let keyword = c.token();
                if keyword != b"HELP" && keyword != b"TYPE" {
                    continue;
                }
                c.skip_blanks();
                let name = c.name(true);
                if name.is_empty() {
                    continue;
                }
                let family = families.family_for(name, &mut e)?;
                c.skip_blanks();
                if keyword == b"HELP" {
                    e.add(heap(line.len().saturating_sub(c.pos)));
                    continue;
                }
                let rest = c.rest();
                let kind = if rest.eq_ignore_ascii_case(b"histogram") {
                    Kind::Histogram
                } else if rest.eq_ignore_ascii_case(b"summary") {
                    Kind::Summary
                } else if rest.is_empty() {
                    continue;
                } else {
                    Kind::Plain
                };
                families.set_kind(family, kind);
            }
            Some(_) => {
                let name = c.name(true);
                if name.is_empty() {
                    continue;
                }
                let family = families.family_for(name, &mut e)?;
                let kind = match families.kind(family) {
                    Kind::Unset => {
                        families.set_kind(family, Kind::Plain);
                        Kind::Plain
                    }
                    k => k,
                };
                c.skip_blanks();
                let mut labels = 0usize;
                let mut key = hasher.build_hasher();
                family.hash(&mut key);
                let mut label_bytes = 0usize;
                if c.peek() == Some(b'{') {
                    c.pos += 1;
                    let mut seen = 0usize;
                    while let Some((label, value, escaped)) = c.label() {
                        seen += 1;
                        e.check_labels(seen)?;
                        // The bucket bound or quantile rank is read as a number, not kept.
                        if kind.special() == Some(label) {
                            continue;
                        }
                        labels += 1;
                        let value_heap = if escaped {
                            heap(value.len().saturating_mul(2))
                        } else {
                            heap(value.len())
                        };
                        label_bytes += heap(label.len()) + value_heap;
                        label.hash(&mut key);
                        value.hash(&mut key);
                    }
                }
                if kind.special().is_none() {
                    e.series(labels, transform);
                    e.add(2 * size_of::<Metric>() + label_bytes);
                    continue;
                }
                // A bucket or quantile, in a vector with doubling slack.
                e.add(2 * size_of::<Bucket>().max(size_of::<Quantile>()));
                let key = key.finish();
                if previous_key != Some(key) {
                    previous_key = Some(key);
                    e.series(labels, transform);
                    // The series, and the grouping key: the labels copied as (name, value) pairs.
                    e.add(
                        2 * size_of::<Metric>()
                            + 2 * label_bytes
                            + map_entry(size_of::<(usize, Vec<(String, String)>, usize)>())
                            + heap(labels * size_of::<(String, String)>()),
                    );
                }
            }
        }
    }
    e.largest_family = e.series;
    e.add(vec_bytes(e.families, size_of::<MetricFamily>()));
    Ok(e)
}

/// A read position in one line of a text body, with the parser's token rules.
struct Cursor<'a> {
    line: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.line.get(self.pos).copied()
    }

    fn rest(&self) -> &'a [u8] {
        let rest = self.line.get(self.pos..).unwrap_or_default();
        let end = rest
            .iter()
            .rposition(|b| !matches!(b, b' ' | b'\t'))
            .map_or(0, |i| i + 1);
        rest.get(..end).unwrap_or_default()
    }

    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn token(&mut self) -> &'a [u8] {
        let start = self.pos;
        while !matches!(self.peek(), None | Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.line.get(start..self.pos).unwrap_or_default()
    }

    /// `[a-zA-Z_:][a-zA-Z0-9_:]*` with `colons`, `[a-zA-Z_][a-zA-Z0-9_]*` without.
    fn name(&mut self, colons: bool) -> &'a [u8] {
        let start = self.pos;
        while let Some(b) = self.peek() {
            let ok = b.is_ascii_alphabetic()
                || b == b'_'
                || (colons && b == b':')
                || (self.pos > start && b.is_ascii_digit());
            if !ok {
                break;
            }
            self.pos += 1;
        }
        self.line.get(start..self.pos).unwrap_or_default()
    }

    /// The next `name="value"` of a label set (after `{` or `,`): name, raw value, and whether the
    /// value has escapes. `None` at `}` or where the parser would fail.
    fn label(&mut self) -> Option<(&'a [u8], &'a [u8], bool)> {
        self.skip_blanks();
        let name = self.name(false);
        if name.is_empty() {
            return None;
        }
        self.skip_blanks();
        if self.peek() != Some(b'=') {
            return None;
        }
        self.pos += 1;
        self.skip_blanks();
        if self.peek() != Some(b'"') {
            return None;
        }
        self.pos += 1;
        let start = self.pos;
        let mut escaped = false;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    self.pos += 2;
                }
                _ => self.pos += 1,
            }
        }
        let value = self.line.get(start..self.pos).unwrap_or_default();
        self.pos += 1;
        self.skip_blanks();
        if self.peek() == Some(b',') {
            self.pos += 1;
        }
        Some((name, value, escaped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemeter_common::delimited;

    const NONE: Transform = Transform {
        added_labels: 0,
        bytes_per_series: 0,
    };
    use telemeter_common::model::{Gauge, Histogram, Summary};

    const FEDERATE_PB: &[u8] = include_bytes!("../../tests/fixtures/prometheus-federate.pb");
    const FEDERATE_TXT: &[u8] = include_bytes!("../../tests/fixtures/prometheus-federate.txt");
    const METRICS_PB: &[u8] = include_bytes!("../../tests/fixtures/prometheus-metrics.pb");
    const METRICS_TXT: &[u8] = include_bytes!("../../tests/fixtures/prometheus-metrics.txt");

    #[test]
    fn heap_rounds_like_the_allocator() {
        assert_eq!(heap(0), 0);
        assert_eq!(heap(1), 32);
        assert_eq!(heap(24), 32);
        assert_eq!(heap(25), 48);
        assert_eq!(heap(usize::MAX), usize::MAX & !15);
        assert_eq!(vec_bytes(0, 48), 0);
        assert_eq!(vec_bytes(1, 48), heap(4 * 48));
        assert_eq!(vec_bytes(5, 48), heap(8 * 48));
    }

    /// What the estimate says and what the real decoders hold, for what Prometheus sends: the
    /// estimate is above and not far above.
    #[test]
    fn estimates_bound_prometheus_replies_closely() {
        let limits = Limits::default();
        for (what, body) in [("federate", FEDERATE_PB), ("metrics", METRICS_PB)] {
            let e = protobuf(body, &limits, &NONE).unwrap();
            let decoded = delimited::decode(body, &limits).unwrap();
            assert_eq!(e.families, decoded.len(), "{what}");
            assert_eq!(
                e.series,
                decoded.iter().map(|f| f.metric.len()).sum::<usize>(),
                "{what}"
            );
            let held = held_bytes(&decoded);
            assert!(e.decoded_bytes >= held, "{what}: {e:?} < {held}");
            assert!(e.decoded_bytes <= 2 * held, "{what}: {e:?} > 2 × {held}");
        }
        for (what, body) in [("federate", FEDERATE_TXT), ("metrics", METRICS_TXT)] {
            let e = text(body, 10_000, &NONE).unwrap();
            let decoded =
                telemeter_common::text::parse(body, &telemeter_common::text::Limits::default())
                    .unwrap();
            assert_eq!(
                e.series,
                decoded.iter().map(|f| f.metric.len()).sum::<usize>(),
                "{what}"
            );
            let held = held_bytes(&decoded);
            assert!(e.decoded_bytes >= held, "{what}: {e:?} < {held}");
            assert!(e.decoded_bytes <= 3 * held, "{what}: {e:?} > 3 × {held}");
        }
    }

    /// The heap the decoded families hold, counted from the values (exact capacities).
    fn held_bytes(families: &[MetricFamily]) -> usize {
        let s = |s: &Option<String>| s.as_ref().map_or(0, |s| heap(s.capacity()));
        let mut total = heap(std::mem::size_of_val(families));
        for f in families {
            total += s(&f.name) + s(&f.help) + heap(f.metric.capacity() * size_of::<Metric>());
            for m in &f.metric {
                total += heap(m.label.capacity() * size_of::<LabelPair>());
                for l in &m.label {
                    total += s(&l.name) + s(&l.value);
                }
                if let Some(h) = &m.histogram {
                    total += heap(h.bucket.capacity() * size_of::<Bucket>());
                }
                if let Some(q) = &m.summary {
                    total += heap(q.quantile.capacity() * size_of::<Quantile>());
                }
            }
        }
        total
    }

    fn family_of(metrics: Vec<Metric>) -> MetricFamily {
        MetricFamily {
            name: Some("m".into()),
            r#type: Some(MetricType::Gauge as i32),
            metric: metrics,
            ..Default::default()
        }
    }

    #[test]
    fn empty_series_cost_what_prost_builds() {
        // One family of 100,000 empty series: 200 KB on the wire.
        let mut message = vec![0x0a, 1, b'm'];
        for _ in 0..100_000 {
            message.extend_from_slice(&[0x22, 0]);
        }
        let mut body = Vec::new();
        prost::encode_length_delimiter(message.len(), &mut body).unwrap();
        body.extend_from_slice(&message);
        let limits = Limits {
            max_message_bytes: 1 << 20,
            max_total_bytes: 1 << 20,
            ..Limits::default()
        };
        let e = protobuf(&body, &limits, &NONE).unwrap();
        assert_eq!(e.series, 100_000);
        assert!(e.decoded_bytes >= 100_000 * size_of::<Metric>(), "{e:?}");
        assert!(e.decoded_bytes > 50 * body.len(), "{e:?}");
        // One more and the decoder's series cap refuses it, here before anything is built.
        message.extend_from_slice(&[0x22, 0]);
        let mut body = Vec::new();
        prost::encode_length_delimiter(message.len(), &mut body).unwrap();
        body.extend_from_slice(&message);
        assert_eq!(
            protobuf(&body, &limits, &NONE),
            Err(Refusal::Decode(DecodeError::TooManySeries {
                limit: 100_000
            }))
        );
    }

    #[test]
    fn labels_per_series_are_capped_in_both_formats() {
        let labels = |n: usize| -> Vec<LabelPair> {
            (0..n)
                .map(|i| LabelPair::new(&format!("l{i}"), ""))
                .collect()
        };
        let series = |n: usize| Metric {
            label: labels(n),
            gauge: Some(Gauge { value: Some(1.0) }),
            ..Default::default()
        };
        let ok = delimited::encode(&[family_of(vec![series(MAX_LABELS_PER_SERIES)])]);
        let e = protobuf(&ok, &Limits::default(), &NONE).unwrap();
        assert_eq!(e.most_labels, MAX_LABELS_PER_SERIES);
        let bad = delimited::encode(&[family_of(vec![series(MAX_LABELS_PER_SERIES + 1)])]);
        assert_eq!(
            protobuf(&bad, &Limits::default(), &NONE),
            Err(Refusal::TooManyLabels {
                labels: MAX_LABELS_PER_SERIES + 1
            })
        );
        // The same label over and over is as many labels to prost.
        let same = Metric {
            label: vec![LabelPair::new("a", ""); 10_000],
            ..Default::default()
        };
        assert!(matches!(
            protobuf(
                &delimited::encode(&[family_of(vec![same])]),
                &Limits::default(),
                &NONE
            ),
            Err(Refusal::TooManyLabels { .. })
        ));

        let line = |n: usize| {
            let pairs: Vec<String> = (0..n).map(|i| format!("l{i}=\"\"")).collect();
            format!("m{{{}}} 1\n", pairs.join(","))
        };
        let e = text(line(MAX_LABELS_PER_SERIES).as_bytes(), 10_000, &NONE).unwrap();
        assert_eq!(e.most_labels, MAX_LABELS_PER_SERIES);
        assert!(matches!(
            text(line(MAX_LABELS_PER_SERIES + 1).as_bytes(), 10_000, &NONE),
            Err(Refusal::TooManyLabels { .. })
        ));
        assert!(Refusal::TooManyLabels { labels: 300 }
            .to_string()
            .contains("300 labels"));
    }

    #[test]
    fn labels_after_an_unknown_group_are_counted() {
        // prost skips an unknown group field and decodes what follows, so the scan must not stop
        // at it: a series opening with a group, then 200 empty labels.
        let mut metric = vec![0x7b, 0x08, 0x01, 0x7c]; // field 15: start group { field 1 = 1 } end
        for _ in 0..200 {
            metric.extend_from_slice(&[0x0a, 0]);
        }
        let mut message = vec![0x0a, 1, b'm', 0x22];
        prost::encode_length_delimiter(metric.len(), &mut message).unwrap();
        message.extend_from_slice(&metric);
        let mut body = Vec::new();
        prost::encode_length_delimiter(message.len(), &mut body).unwrap();
        body.extend_from_slice(&message);
        let decoded = delimited::decode(&body, &Limits::default()).unwrap();
        assert_eq!(decoded[0].metric[0].label.len(), 200);
        let e = protobuf(&body, &Limits::default(), &NONE).unwrap();
        assert_eq!(e.labels, 200);
        assert!(e.decoded_bytes >= held_bytes(&decoded), "{e:?}");
    }

    #[test]
    fn summaries_and_histograms_are_counted_whatever_the_type() {
        let mut m = Metric {
            summary: Some(Summary {
                quantile: vec![Quantile::default(); 100],
                ..Default::default()
            }),
            histogram: Some(Histogram {
                bucket: vec![Bucket::default(); 100],
                ..Default::default()
            }),
            ..Default::default()
        };
        m.label = vec![LabelPair::new("a", "b")];
        let body = delimited::encode(&[family_of(vec![m])]);
        let e = protobuf(&body, &Limits::default(), &NONE).unwrap();
        assert!(
            e.decoded_bytes
                >= 100 * size_of::<Quantile>() + 100 * size_of::<Bucket>() + size_of::<Metric>(),
            "{e:?}"
        );
    }

    #[test]
    fn protobuf_errors_are_the_decoders() {
        let limits = Limits::default();
        for body in [&[0xff; 11][..], &[0x80, 0x80], &[9, 0x0a]] {
            let want = delimited::decode(body, &limits).unwrap_err();
            assert_eq!(protobuf(body, &limits, &NONE), Err(Refusal::Decode(want)));
        }
        // Invalid messages: the same refusal, in the views' words.
        for body in [&[3, 0x0a, 0x05, b'x'][..], &[3, 0x0a, 0x01, 0xff]] {
            assert!(delimited::decode(body, &limits).is_err());
            assert!(matches!(
                protobuf(body, &limits, &NONE),
                Err(Refusal::Decode(DecodeError::Invalid(_)))
            ));
        }
        assert_eq!(protobuf(b"", &limits, &NONE), Ok(Estimate::default()));
    }

    #[test]
    fn text_counts_lines_series_and_grouping() {
        let body = concat!(
            "# HELP a Help.\n",
            "# TYPE a gauge\n",
            "a{x=\"1\",y=\"2\"} 1\n",
            "a{x=\"2\",y=\"2\"} 1 1000\n",
            "# TYPE h histogram\n",
            "h_bucket{x=\"1\",le=\"1\"} 1\n",
            "h_bucket{x=\"1\",le=\"+Inf\"} 1\n",
            "h_sum{x=\"1\"} 1\n",
            "h_count{x=\"1\"} 1\n",
            "h_bucket{x=\"2\",le=\"+Inf\"} 1\n",
            "h_sum{x=\"2\"} 1\n",
            "h_count{x=\"2\"} 1\n",
            "  \n",
            "b 1\n",
        );
        let e = text(body.as_bytes(), 10_000, &NONE).unwrap();
        let parsed = telemeter_common::text::parse(
            body.as_bytes(),
            &telemeter_common::text::Limits::default(),
        )
        .unwrap();
        assert_eq!(parsed.iter().map(|f| f.metric.len()).sum::<usize>(), 5);
        assert_eq!(e.series, 5, "{e:?}");
        assert_eq!(e.labels, 2 + 2 + 1 + 1, "{e:?}");
        assert_eq!(e.families, parsed.len(), "{e:?}");
    }

    #[test]
    fn text_overestimates_what_it_cannot_follow() {
        // Interleaved grouped lines: each counted as a new series (the parser builds 2).
        let body = concat!(
            "# TYPE h histogram\n",
            "h_bucket{x=\"1\",le=\"1\"} 1\n",
            "h_bucket{x=\"2\",le=\"1\"} 1\n",
            "h_bucket{x=\"1\",le=\"2\"} 1\n",
            "h_bucket{x=\"2\",le=\"2\"} 1\n",
        );
        assert_eq!(text(body.as_bytes(), 10_000, &NONE).unwrap().series, 4);
        // A broken line stops the parser; the scan goes on counting.
        let body = "a{x=\"1\" 1\nb{y=\"\\q\"} 1\nc 1\n";
        let e = text(body.as_bytes(), 10_000, &NONE).unwrap();
        assert_eq!(e.series, 3);
        assert!(telemeter_common::text::parse(
            body.as_bytes(),
            &telemeter_common::text::Limits::default()
        )
        .is_err());
        // An escaped quote does not end a value; an unterminated value ends the label set.
        let e = text(b"a{x=\"\\\"\",y=\"2\"} 1\nb{x=\"open} 1\n", 10_000, &NONE).unwrap();
        assert_eq!(e.labels, 2);
    }

    #[test]
    fn text_refuses_more_families_than_the_parser_takes() {
        let mut body = String::new();
        for i in 0..11 {
            body.push_str(&format!(
                "# TYPE h{i} histogram\nh{i}_count 1\nh{i}_bucket{{le=\"1\"}} 1\n"
            ));
        }
        let limits = |max_families| telemeter_common::text::Limits {
            max_families,
            ..telemeter_common::text::Limits::default()
        };
        assert!(telemeter_common::text::parse(body.as_bytes(), &limits(10)).is_err());
        assert_eq!(
            telemeter_common::text::parse(body.as_bytes(), &limits(11))
                .unwrap()
                .len(),
            11
        );
        assert_eq!(
            text(body.as_bytes(), 10, &NONE),
            Err(Refusal::Decode(DecodeError::TooManyFamilies { limit: 10 }))
        );
        assert!(text(body.as_bytes(), 11, &NONE).is_ok());
    }

    #[test]
    fn transform_cost_grows_with_labels() {
        let none = Transform::of(&[], "c", 0);
        assert_eq!(none.added_labels, 2);
        let labels = [("site".to_string(), "x".repeat(100))];
        let some = Transform::of(&labels, "c", 2);
        assert_eq!(some.added_labels, 3);
        assert_eq!(
            some.bytes_per_series,
            none.bytes_per_series + heap(4) + heap(100) + 2 * heap(12)
        );
        // A label vector full to capacity is grown for the added labels: the new block counts.
        let size = size_of::<LabelPair>();
        let mut e = Estimate::default();
        e.series(8, &none);
        assert_eq!(e.decoded_bytes, heap(8 * size));
        assert_eq!(e.transform_bytes, none.bytes_per_series + heap(16 * size));
        let mut e = Estimate::default();
        e.series(5, &none);
        assert_eq!(e.transform_bytes, none.bytes_per_series);
        let mut e = Estimate::default();
        e.series(
            0,
            &Transform {
                added_labels: 9,
                bytes_per_series: 0,
            },
        );
        assert_eq!(
            e.transform_bytes,
            heap(4 * size) + heap(8 * size) + heap(16 * size)
        );
    }

    #[test]
    fn peak_adds_the_transform() {
        let e = Estimate {
            series: 10,
            largest_family: 10,
            decoded_bytes: 1000,
            transform_bytes: 500,
            ..Estimate::default()
        };
        assert_eq!(e.peak_bytes(), 1500 + 10 * size_of::<Metric>());
        assert_eq!(sort_scratch(1000, 200), 1000 * 200);
        assert_eq!(sort_scratch(1_000_000, 200), 500_000 * 200);
    }
}
