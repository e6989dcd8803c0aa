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
mod tests;
