//! Zero-copy reading of protobuf-delimited `MetricFamily` bodies.
//!
//! [`crate::delimited::decode`] builds owned [`crate::model`] values: a `String` per name, label and
//! help text. The two hot paths of the server only need to look at those bytes: validating an upload
//! (and storing it unchanged when nothing needs rewriting) and transcoding stored files to text for
//! `/federate`. These views borrow from the body instead, so those paths allocate nothing per series.
//!
//! Same wire rules as prost: fields may come in any order, repeated fields may be interleaved with
//! others, unknown fields are skipped, the last value of a singular field wins. Strings are checked
//! to be UTF-8. Limits are the [`crate::delimited::Limits`] the owned decoder enforces, and errors are
//! its [`DecodeError`], so both paths refuse the same bodies with the same reasons.
//!
//! Prost's rules followed to the letter, so that a body one path accepts the other accepts too:
//! - a singular message field that appears more than once is *merged* (a later `gauge { }` without
//!   a value keeps the earlier value; the quantiles of two `summary` fields add up);
//! - unknown fields of any valid wire type are skipped, groups (wire types 3/4) included, within
//!   prost's recursion limit of 100; a group or a wrong wire type on a known field is invalid;
//! - a key must fit 32 bits and have a tag above 0, varints take at most 10 bytes.
//!
//! The views are lazy: [`families`] checks the framing and each family's own fields, a family's
//! [`FamilyView::metrics`] each series' own fields, and the inner messages (labels, quantiles,
//! buckets) are checked as they are read. [`count_series`] (or [`check_family`]) checks all of it,
//! as [`crate::delimited::decode`] does.

use crate::delimited::{DecodeError, Limits};
use crate::model::MetricType;

/// Iterates the families of a protobuf-delimited body, enforcing `limits` (message size, total size,
/// family count; series are counted by the caller through [`FamilyView::metrics`] or with
/// [`count_series`]).
pub fn families<'a>(body: &'a [u8], limits: &Limits) -> Families<'a> {
    Families {
        rest: body,
        whole_len: body.len(),
        limits: *limits,
        seen: 0,
        started: false,
        done: false,
    }
}

/// Validates the framing and every message of `body` and returns the number of families and series,
/// enforcing every limit (series included). Cheap: nothing is allocated.
pub fn count_series(body: &[u8], limits: &Limits) -> Result<(usize, usize), DecodeError> {
    let mut families_seen = 0usize;
    let mut series = 0usize;
    for family in families(body, limits) {
        let family = family?;
        // Checked in the owned decoder's order: the whole family is decoded, then its series count.
        series = series.saturating_add(check_family(&family)?);
        families_seen += 1;
        if series > limits.max_series {
            return Err(DecodeError::TooManySeries {
                limit: limits.max_series,
            });
        }
    }
    Ok((families_seen, series))
}

/// Checks everything in `family` that [`families`] left for later (every series, label, value,
/// quantile and bucket), as prost would decode it, and returns its number of series.
pub fn check_family(family: &FamilyView<'_>) -> Result<usize, DecodeError> {
    Ok(check_family_message(family.message)?)
}

/// An iterator over the families of a body (see [`families`]). After an error it ends.
pub struct Families<'a> {
    rest: &'a [u8],
    whole_len: usize,
    limits: Limits,
    seen: usize,
    started: bool,
    done: bool,
}

impl<'a> Families<'a> {
    /// The next length-prefixed message, checked the way [`crate::delimited::decode`] checks it.
    fn frame(&mut self) -> Result<FamilyView<'a>, DecodeError> {
        let (size, prefix) = length_prefix(self.rest)?;
        if size > self.limits.max_message_bytes as u64 {
            return Err(DecodeError::MessageTooLarge {
                size,
                limit: self.limits.max_message_bytes,
            });
        }
        let after_prefix = self.rest.get(prefix..).ok_or(DecodeError::Truncated)?;
        let size = usize::try_from(size).map_err(|_| DecodeError::Truncated)?;
        let (message, rest) = after_prefix
            .split_at_checked(size)
            .ok_or(DecodeError::Truncated)?;
        if self.seen >= self.limits.max_families {
            return Err(DecodeError::TooManyFamilies {
                limit: self.limits.max_families,
            });
        }
        let view = family_header(message)?;
        self.seen += 1;
        self.rest = rest;
        Ok(view)
    }
}

impl<'a> Iterator for Families<'a> {
    type Item = Result<FamilyView<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            if self.whole_len > self.limits.max_total_bytes {
                self.done = true;
                return Some(Err(DecodeError::TooLarge {
                    limit: self.limits.max_total_bytes,
                }));
            }
        }
        if self.rest.is_empty() {
            self.done = true;
            return None;
        }
        let item = self.frame();
        self.done = item.is_err();
        Some(item)
    }
}

/// One family, borrowed from the body.
#[derive(Clone, Copy, Debug)]
pub struct FamilyView<'a> {
    /// The metric name (empty when absent).
    pub name: &'a str,
    /// The help text (empty when absent).
    pub help: &'a str,
    /// The raw type field, if present.
    pub raw_type: Option<i32>,
    /// The whole encoded `MetricFamily` message, without its length prefix.
    pub message: &'a [u8],
}

impl<'a> FamilyView<'a> {
    /// Reads the family fields of one encoded `MetricFamily` message (without a length prefix),
    /// checking them; the series are checked as [`FamilyView::metrics`] reads them.
    pub fn parse(message: &'a [u8]) -> Result<FamilyView<'a>, DecodeError> {
        Ok(family_header(message)?)
    }

    /// The family's type; absent or unknown reads as untyped (as [`crate::model::MetricFamily::metric_type`]).
    pub fn metric_type(&self) -> MetricType {
        self.raw_type
            .and_then(|t| MetricType::try_from(t).ok())
            .unwrap_or(MetricType::Untyped)
    }

    /// The family's series, in order.
    pub fn metrics(&self) -> Metrics<'a> {
        Metrics {
            fields: Fields::new(self.message, FAMILY_DEPTH),
            done: false,
        }
    }
}

/// An iterator over the series of a family. After an error it ends.
pub struct Metrics<'a> {
    fields: Fields<'a>,
    done: bool,
}

impl<'a> Iterator for Metrics<'a> {
    type Item = Result<MetricView<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            let item = match self.fields.next() {
                Ok(None) => None,
                Ok(Some((METRIC_FIELD, wire))) => {
                    Some(wire.bytes().and_then(|m| parse_metric(m, ALL_KINDS)))
                }
                Ok(Some(_)) => continue,
                Err(bad) => Some(Err(bad)),
            };
            self.done = !matches!(item, Some(Ok(_)));
            return item.map(|r| r.map_err(DecodeError::from));
        }
    }
}

/// One series, borrowed from the body.
#[derive(Clone, Copy, Debug)]
pub struct MetricView<'a> {
    /// The whole encoded `Metric` message.
    pub message: &'a [u8],
    /// The timestamp, if present.
    pub timestamp_ms: Option<i64>,
    /// Which value fields are present, and the simple values.
    pub value: Value<'a>,
}

impl<'a> MetricView<'a> {
    /// The series' labels in wire order, as `(name, value)`; an absent name or value reads as "".
    pub fn labels(&self) -> Labels<'a> {
        Labels {
            fields: Fields::new(self.message, METRIC_DEPTH),
            done: false,
        }
    }

    /// As [`MetricView::labels`], as UTF-8-checked bytes (for the text writer).
    pub(crate) fn label_bytes(&self) -> LabelBytes<'a> {
        LabelBytes {
            fields: Fields::new(self.message, METRIC_DEPTH),
            done: false,
        }
    }

    /// The value a family of type `metric_type` is read from (a gauge histogram reads the
    /// histogram), or [`Value::Missing`] when the series does not set it; never [`Value::Several`].
    /// This is the value [`crate::text::write_family`] writes, whatever else the series sets.
    pub fn value_for(&self, metric_type: MetricType) -> Result<Value<'a>, DecodeError> {
        let kind = kind_of(metric_type);
        Ok(match self.value {
            Value::Several => parse_metric(self.message, kind)?.value,
            v if value_kind(&v) == kind => v,
            _ => Value::Missing,
        })
    }
}

/// The value of a series. When a message sets several value fields (invalid, but possible on the
/// wire), the one matching the family type should be used: [`MetricView::value`] holds the last
/// value field seen, and [`Value::Several`] says there was more than one; [`MetricView::value_for`]
/// finds the one a family type calls for.
///
/// A value field that appears more than once is merged as prost merges it: the last value wins,
/// and quantiles or buckets of every occurrence are read in order.
#[derive(Clone, Copy, Debug)]
pub enum Value<'a> {
    /// No value field.
    Missing,
    /// More than one value field is set.
    Several,
    /// `gauge { value }`.
    Gauge(f64),
    /// `counter { value }`.
    Counter(f64),
    /// `untyped { value }`.
    Untyped(f64),
    /// `summary { ... }`, the encoded `Summary` message.
    Summary(SummaryView<'a>),
    /// `histogram { ... }`, the encoded `Histogram` message.
    Histogram(HistogramView<'a>),
}

/// An iterator over the labels of a series. After an error it ends.
pub struct Labels<'a> {
    fields: Fields<'a>,
    done: bool,
}

impl<'a> Iterator for Labels<'a> {
    type Item = Result<(&'a str, &'a str), DecodeError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            let item = match self.fields.next() {
                Ok(None) => None,
                Ok(Some((LABEL_FIELD, wire))) => Some(wire.bytes().and_then(parse_label)),
                Ok(Some(_)) => continue,
                Err(bad) => Some(Err(bad)),
            };
            self.done = !matches!(item, Some(Ok(_)));
            return item.map(|r| r.map_err(DecodeError::from));
        }
    }
}

/// An iterator over the labels of a series as bytes (see [`MetricView::label_bytes`]).
pub(crate) struct LabelBytes<'a> {
    fields: Fields<'a>,
    done: bool,
}

impl<'a> Iterator for LabelBytes<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), DecodeError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            let item = match self.fields.next() {
                Ok(None) => None,
                Ok(Some((LABEL_FIELD, wire))) => Some(wire.bytes().and_then(parse_label_bytes)),
                Ok(Some(_)) => continue,
                Err(bad) => Some(Err(bad)),
            };
            self.done = !matches!(item, Some(Ok(_)));
            return item.map(|r| r.map_err(DecodeError::from));
        }
    }
}

/// A summary, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct SummaryView<'a> {
    /// `sample_count` (0 when absent).
    pub sample_count: u64,
    /// `sample_sum` (0 when absent).
    pub sample_sum: f64,
    /// The encoded `Summary` message (the last one, when the field appears more than once).
    pub message: &'a [u8],
    /// The whole `Metric` message when the summary field appears more than once.
    merged_from: Option<&'a [u8]>,
}

impl<'a> SummaryView<'a> {
    /// The quantiles as `(quantile, value)` (an absent field reads as 0).
    pub fn quantiles(&self) -> Quantiles<'a> {
        Quantiles {
            items: Items::new(self.message, self.merged_from, SUMMARY_FIELD),
        }
    }
}

/// An iterator over the quantiles of a summary. After an error it ends.
pub struct Quantiles<'a> {
    items: Items<'a>,
}

impl Iterator for Quantiles<'_> {
    type Item = Result<(f64, f64), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.items.next(|item| {
            let mut fields = Fields::new(item, ITEM_DEPTH);
            let (mut quantile, mut value) = (0.0, 0.0);
            while let Some((tag, wire)) = fields.next()? {
                match tag {
                    1 => quantile = wire.double()?,
                    2 => value = wire.double()?,
                    _ => {}
                }
            }
            Ok((quantile, value))
        })
    }
}

/// A classic histogram, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct HistogramView<'a> {
    /// `sample_count` (0 when absent).
    pub sample_count: u64,
    /// `sample_sum` (0 when absent).
    pub sample_sum: f64,
    /// The encoded `Histogram` message (the last one, when the field appears more than once).
    pub message: &'a [u8],
    /// The whole `Metric` message when the histogram field appears more than once.
    merged_from: Option<&'a [u8]>,
}

impl<'a> HistogramView<'a> {
    /// The buckets as `(upper_bound, cumulative_count)` (an absent field reads as 0).
    pub fn buckets(&self) -> Buckets<'a> {
        Buckets {
            items: Items::new(self.message, self.merged_from, HISTOGRAM_FIELD),
        }
    }
}

/// An iterator over the buckets of a histogram. After an error it ends.
pub struct Buckets<'a> {
    items: Items<'a>,
}

impl Iterator for Buckets<'_> {
    type Item = Result<(f64, u64), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.items.next(|item| {
            let mut fields = Fields::new(item, ITEM_DEPTH);
            let (mut upper_bound, mut cumulative_count) = (0.0, 0);
            while let Some((tag, wire)) = fields.next()? {
                match tag {
                    1 => cumulative_count = wire.varint()?,
                    2 => upper_bound = wire.double()?,
                    _ => {}
                }
            }
            Ok((upper_bound, cumulative_count))
        })
    }
}

/// Appends `family` to `out` as one length-prefixed message with every series' timestamp
/// (`Metric` field 6) dropped, copying every other byte: what prost would give for decode, clear
/// the timestamps, encode (but unknown fields are kept). The family is checked whole first
/// ([`check_family`]), so nothing invalid is ever copied; on error `out` is left as it was.
pub fn write_family_without_timestamps(
    out: &mut Vec<u8>,
    family: &FamilyView<'_>,
) -> Result<(), DecodeError> {
    check_family_message(family.message)?;
    // Two passes over the family's fields: sizes first (the length prefixes come first on the
    // wire), then the bytes.
    let mut size = 0usize;
    let mut fields = Fields::new(family.message, FAMILY_DEPTH);
    while let Some((tag, wire, span)) = fields.next_with_span()? {
        size += match (tag, wire) {
            (METRIC_FIELD, Wire::Bytes(metric)) => {
                let inner = size_without_timestamp(metric)?;
                1 + varint_len(inner as u64) + inner
            }
            _ => span.len(),
        };
    }
    out.reserve(size + varint_len(size as u64));
    put_varint(out, size as u64);
    let mut fields = Fields::new(family.message, FAMILY_DEPTH);
    while let Some((tag, wire, span)) = fields.next_with_span()? {
        match (tag, wire) {
            (METRIC_FIELD, Wire::Bytes(metric)) => {
                out.push(METRIC_KEY);
                put_varint(out, size_without_timestamp(metric)? as u64);
                let mut metric_fields = Fields::new(metric, METRIC_DEPTH);
                while let Some((tag, _, span)) = metric_fields.next_with_span()? {
                    if tag != TIMESTAMP_FIELD {
                        out.extend_from_slice(span);
                    }
                }
            }
            _ => out.extend_from_slice(span),
        }
    }
    Ok(())
}

/// The newest (largest) sample timestamp of a protobuf-delimited `body`, `None` when no series has
/// one. Reads only what leads to the timestamps (the framing, each family's and each series'
/// fields); labels and values are passed over unchecked, so use it on bodies checked already (the
/// store keeps it per cluster: the TTL counts from it). Cheap: nothing is allocated.
pub fn newest_timestamp(body: &[u8]) -> Result<Option<i64>, DecodeError> {
    let mut newest: Option<i64> = None;
    let mut rest = body;
    while !rest.is_empty() {
        let (size, prefix) = length_prefix(rest)?;
        let size = usize::try_from(size).map_err(|_| DecodeError::Truncated)?;
        let (message, after) = rest
            .get(prefix..)
            .and_then(|r| r.split_at_checked(size))
            .ok_or(DecodeError::Truncated)?;
        rest = after;
        let mut fields = Fields::new(message, FAMILY_DEPTH);
        while let Some((tag, wire)) = fields.next()? {
            if tag != METRIC_FIELD {
                continue;
            }
            let mut metric = Fields::new(wire.bytes()?, METRIC_DEPTH);
            // The last timestamp field of a series is its timestamp, as prost reads it.
            let mut timestamp = None;
            while let Some((tag, wire)) = metric.next()? {
                if tag == TIMESTAMP_FIELD {
                    timestamp = Some(wire.varint()? as i64);
                }
            }
            if let Some(ts) = timestamp {
                newest = Some(newest.map_or(ts, |n| n.max(ts)));
            }
        }
    }
    Ok(newest)
}

/// The size of a `Metric` message once its timestamp fields are dropped.
fn size_without_timestamp(metric: &[u8]) -> Result<usize, Bad> {
    let mut size = 0;
    let mut fields = Fields::new(metric, METRIC_DEPTH);
    while let Some((tag, _, span)) = fields.next_with_span()? {
        if tag != TIMESTAMP_FIELD {
            size += span.len();
        }
    }
    Ok(size)
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

// ---------------------------------------------------------------------------------------------
// Field numbers (metrics.proto) and prost's recursion budget at each level.

const METRIC_FIELD: u32 = 4;
const METRIC_KEY: u8 = (4 << 3) | 2;
const LABEL_FIELD: u32 = 1;
const GAUGE_FIELD: u32 = 2;
const COUNTER_FIELD: u32 = 3;
const SUMMARY_FIELD: u32 = 4;
const UNTYPED_FIELD: u32 = 5;
const TIMESTAMP_FIELD: u32 = 6;
const HISTOGRAM_FIELD: u32 = 7;
const ITEM_FIELD: u32 = 3;

// Prost decodes a family with a budget of 100 nested messages or groups: the family's own fields
// are read at 100, a metric's at 99, a label's or value's at 98, a quantile's or bucket's at 97.
// Only unknown groups can nest deeper, and they must stop where prost stops.
const FAMILY_DEPTH: u32 = 100;
const METRIC_DEPTH: u32 = 99;
const VALUE_DEPTH: u32 = 98;
const ITEM_DEPTH: u32 = 97;

// One bit per value field of a metric.
const GAUGE: u8 = 1;
const COUNTER: u8 = 2;
const UNTYPED: u8 = 4;
const SUMMARY: u8 = 8;
const HISTOGRAM: u8 = 16;
const ALL_KINDS: u8 = GAUGE | COUNTER | UNTYPED | SUMMARY | HISTOGRAM;

fn kind_of(metric_type: MetricType) -> u8 {
    match metric_type {
        MetricType::Counter => COUNTER,
        MetricType::Gauge => GAUGE,
        MetricType::Untyped => UNTYPED,
        MetricType::Summary => SUMMARY,
        MetricType::Histogram | MetricType::GaugeHistogram => HISTOGRAM,
    }
}

fn value_kind(value: &Value<'_>) -> u8 {
    match value {
        Value::Missing | Value::Several => 0,
        Value::Gauge(_) => GAUGE,
        Value::Counter(_) => COUNTER,
        Value::Untyped(_) => UNTYPED,
        Value::Summary(_) => SUMMARY,
        Value::Histogram(_) => HISTOGRAM,
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

/// Why a message is invalid. Static, so that reading never allocates until an error is reported.
#[derive(Clone, Copy, Debug)]
struct Bad(&'static str);

impl From<Bad> for DecodeError {
    fn from(bad: Bad) -> Self {
        DecodeError::Invalid(bad.0.to_string())
    }
}

fn family_header(message: &[u8]) -> Result<FamilyView<'_>, Bad> {
    let mut view = FamilyView {
        name: "",
        help: "",
        raw_type: None,
        message,
    };
    let mut fields = Fields::new(message, FAMILY_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => view.name = wire.str()?,
            2 => view.help = wire.str()?,
            // An enum is an int32 on the wire: prost keeps the low 32 bits of the varint.
            3 => view.raw_type = Some(wire.varint()? as i32),
            METRIC_FIELD => {
                wire.bytes()?;
            }
            _ => {}
        }
    }
    Ok(view)
}

/// Reads a metric's own fields; value fields whose kind is not in `kinds` are passed over.
fn parse_metric(message: &[u8], kinds: u8) -> Result<MetricView<'_>, Bad> {
    let mut timestamp_ms = None;
    let mut seen = 0u8;
    let mut last = 0u8;
    let mut simple = 0.0;
    let mut summary = Distribution::default();
    let mut histogram = Distribution::default();
    let mut fields = Fields::new(message, METRIC_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        let kind = match tag {
            LABEL_FIELD => {
                wire.bytes()?;
                continue;
            }
            TIMESTAMP_FIELD => {
                timestamp_ms = Some(wire.varint()? as i64);
                continue;
            }
            GAUGE_FIELD => GAUGE,
            COUNTER_FIELD => COUNTER,
            UNTYPED_FIELD => UNTYPED,
            SUMMARY_FIELD => SUMMARY,
            HISTOGRAM_FIELD => HISTOGRAM,
            _ => continue,
        };
        if kinds & kind == 0 {
            continue;
        }
        let bytes = wire.bytes()?;
        match kind {
            SUMMARY => summary.merge(bytes)?,
            HISTOGRAM => histogram.merge(bytes)?,
            // Gauge, counter, untyped: with several kinds set only `Several` is reported, so one
            // simple value suffices; merging keeps it when a later occurrence has none.
            _ => {
                if last != kind {
                    simple = 0.0;
                }
                if let Some(v) = simple_value(bytes)? {
                    simple = v;
                }
            }
        }
        seen |= kind;
        last = kind;
    }
    let value = if seen.count_ones() > 1 {
        Value::Several
    } else {
        match seen {
            GAUGE => Value::Gauge(simple),
            COUNTER => Value::Counter(simple),
            UNTYPED => Value::Untyped(simple),
            SUMMARY => Value::Summary(SummaryView {
                sample_count: summary.count,
                sample_sum: summary.sum,
                message: summary.last,
                merged_from: (summary.occurrences > 1).then_some(message),
            }),
            HISTOGRAM => Value::Histogram(HistogramView {
                sample_count: histogram.count,
                sample_sum: histogram.sum,
                message: histogram.last,
                merged_from: (histogram.occurrences > 1).then_some(message),
            }),
            _ => Value::Missing,
        }
    };
    Ok(MetricView {
        message,
        timestamp_ms,
        value,
    })
}

/// The merged own fields of a summary's or histogram's occurrences.
#[derive(Default)]
struct Distribution<'a> {
    count: u64,
    sum: f64,
    last: &'a [u8],
    occurrences: usize,
}

impl<'a> Distribution<'a> {
    fn merge(&mut self, message: &'a [u8]) -> Result<(), Bad> {
        let mut fields = Fields::new(message, VALUE_DEPTH);
        while let Some((tag, wire)) = fields.next()? {
            match tag {
                1 => self.count = wire.varint()?,
                2 => self.sum = wire.double()?,
                ITEM_FIELD => {
                    wire.bytes()?;
                }
                _ => {}
            }
        }
        self.last = message;
        self.occurrences += 1;
        Ok(())
    }
}

/// The `value` of a gauge, counter or untyped message, if it has one.
fn simple_value(message: &[u8]) -> Result<Option<f64>, Bad> {
    let mut value = None;
    let mut fields = Fields::new(message, VALUE_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        if tag == 1 {
            value = Some(wire.double()?);
        }
    }
    Ok(value)
}

#[inline]
fn parse_label(message: &[u8]) -> Result<(&str, &str), Bad> {
    let (mut name, mut value) = ("", "");
    let mut fields = Fields::new(message, VALUE_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => name = wire.str()?,
            2 => value = wire.str()?,
            _ => {}
        }
    }
    Ok((name, value))
}

/// As [`parse_label`], as bytes: for writers, which need no `&str`. The UTF-8 check is the same;
/// ASCII (nearly every label) is settled by a quicker scan first.
#[inline]
fn parse_label_bytes(message: &[u8]) -> Result<(&[u8], &[u8]), Bad> {
    let (mut name, mut value): (&[u8], &[u8]) = (b"", b"");
    let mut fields = Fields::new(message, VALUE_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 => name = utf8_bytes(wire.bytes()?)?,
            2 => value = utf8_bytes(wire.bytes()?)?,
            _ => {}
        }
    }
    Ok((name, value))
}

#[inline]
fn utf8_bytes(bytes: &[u8]) -> Result<&[u8], Bad> {
    if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
        Ok(bytes)
    } else {
        Err(Bad("string is not UTF-8"))
    }
}

/// Checks a whole family message, series and all, and counts its series.
fn check_family_message(message: &[u8]) -> Result<usize, Bad> {
    family_header(message)?;
    let mut series = 0;
    let mut fields = Fields::new(message, FAMILY_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        if tag == METRIC_FIELD {
            check_metric(wire.bytes()?)?;
            series += 1;
        }
    }
    Ok(series)
}

fn check_metric(message: &[u8]) -> Result<(), Bad> {
    let mut fields = Fields::new(message, METRIC_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            LABEL_FIELD => {
                parse_label(wire.bytes()?)?;
            }
            GAUGE_FIELD | COUNTER_FIELD | UNTYPED_FIELD => {
                simple_value(wire.bytes()?)?;
            }
            SUMMARY_FIELD | HISTOGRAM_FIELD => {
                // Quantile is {1: double, 2: double}; Bucket is {1: uint64, 2: double}.
                let count_first = tag == HISTOGRAM_FIELD;
                let mut fields = Fields::new(wire.bytes()?, VALUE_DEPTH);
                while let Some((tag, wire)) = fields.next()? {
                    match tag {
                        1 => {
                            wire.varint()?;
                        }
                        2 => {
                            wire.double()?;
                        }
                        ITEM_FIELD => check_item(wire.bytes()?, count_first)?,
                        _ => {}
                    }
                }
            }
            TIMESTAMP_FIELD => {
                wire.varint()?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_item(message: &[u8], count_first: bool) -> Result<(), Bad> {
    let mut fields = Fields::new(message, ITEM_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 if count_first => {
                wire.varint()?;
            }
            1 | 2 => {
                wire.double()?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The items (quantiles or buckets, field 3) of a summary or histogram; of every occurrence of the
/// field in the metric when it appears more than once.
struct Items<'a> {
    /// The metric's fields, still to be searched for further occurrences.
    outer: Option<Fields<'a>>,
    outer_tag: u32,
    inner: Fields<'a>,
    done: bool,
}

impl<'a> Items<'a> {
    fn new(message: &'a [u8], merged_from: Option<&'a [u8]>, outer_tag: u32) -> Items<'a> {
        match merged_from {
            Some(metric) => Items {
                outer: Some(Fields::new(metric, METRIC_DEPTH)),
                outer_tag,
                inner: Fields::new(&[], VALUE_DEPTH),
                done: false,
            },
            None => Items {
                outer: None,
                outer_tag,
                inner: Fields::new(message, VALUE_DEPTH),
                done: false,
            },
        }
    }

    fn next_item(&mut self) -> Result<Option<&'a [u8]>, Bad> {
        loop {
            while let Some((tag, wire)) = self.inner.next()? {
                if tag == ITEM_FIELD {
                    return Ok(Some(wire.bytes()?));
                }
            }
            let Some(outer) = &mut self.outer else {
                return Ok(None);
            };
            loop {
                match outer.next()? {
                    None => return Ok(None),
                    Some((tag, wire)) if tag == self.outer_tag => {
                        self.inner = Fields::new(wire.bytes()?, VALUE_DEPTH);
                        break;
                    }
                    Some(_) => {}
                }
            }
        }
    }

    fn next<T>(
        &mut self,
        parse: impl FnOnce(&'a [u8]) -> Result<T, Bad>,
    ) -> Option<Result<T, DecodeError>> {
        if self.done {
            return None;
        }
        let item = self
            .next_item()
            .and_then(|item| item.map(parse).transpose());
        self.done = !matches!(item, Ok(Some(_)));
        item.map_err(DecodeError::from).transpose()
    }
}

// ---------------------------------------------------------------------------------------------
// The wire format

/// One field's value as the wire carries it.
#[derive(Clone, Copy, Debug)]
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32,
    /// A group, already skipped: valid only as an unknown field.
    Group,
}

impl<'a> Wire<'a> {
    #[inline]
    fn bytes(self) -> Result<&'a [u8], Bad> {
        match self {
            Wire::Bytes(b) => Ok(b),
            _ => Err(Bad("wrong wire type for a length-delimited field")),
        }
    }

    #[inline]
    fn str(self) -> Result<&'a str, Bad> {
        let bytes = self.bytes()?;
        // Nearly every name and value is short ASCII, which the inlined scan settles without the
        // call into the general UTF-8 validator (a few percent of an upload's CPU, measured).
        if bytes.is_ascii() {
            // SAFETY: ASCII bytes are valid UTF-8.
            return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
        }
        std::str::from_utf8(bytes).map_err(|_| Bad("string is not UTF-8"))
    }

    #[inline]
    fn varint(self) -> Result<u64, Bad> {
        match self {
            Wire::Varint(v) => Ok(v),
            _ => Err(Bad("wrong wire type for a varint field")),
        }
    }

    #[inline]
    fn double(self) -> Result<f64, Bad> {
        match self {
            Wire::Fixed64(v) => Ok(f64::from_bits(v)),
            _ => Err(Bad("wrong wire type for a double field")),
        }
    }
}

/// The fields of one message, in wire order.
#[derive(Clone, Copy, Debug)]
struct Fields<'a> {
    rest: &'a [u8],
    /// Prost's remaining recursion budget for this message's fields.
    depth: u32,
}

impl<'a> Fields<'a> {
    fn new(message: &'a [u8], depth: u32) -> Fields<'a> {
        Fields {
            rest: message,
            depth,
        }
    }

    /// The next field's number and value; unknown groups are skipped and reported as [`Wire::Group`].
    // Always inlined: it is the innermost loop of every reader, and inlined its result stays in
    // registers.
    #[inline(always)]
    fn next(&mut self) -> Result<Option<(u32, Wire<'a>)>, Bad> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (tag, wire_type) = read_key(&mut self.rest)?;
        let wire = match wire_type {
            0 => Wire::Varint(read_varint(&mut self.rest)?),
            1 => Wire::Fixed64(u64::from_le_bytes(take::<8>(&mut self.rest)?)),
            2 => {
                let len = read_varint(&mut self.rest)?;
                let len = usize::try_from(len).map_err(|_| Bad(TRUNCATED))?;
                let (bytes, rest) = self.rest.split_at_checked(len).ok_or(Bad(TRUNCATED))?;
                self.rest = rest;
                Wire::Bytes(bytes)
            }
            5 => {
                take::<4>(&mut self.rest)?;
                Wire::Fixed32
            }
            3 => {
                skip_group(&mut self.rest, tag, self.depth)?;
                Wire::Group
            }
            _ => return Err(Bad("unexpected end group tag")),
        };
        Ok(Some((tag, wire)))
    }

    /// As [`Fields::next`], with the field's whole encoding (key included).
    fn next_with_span(&mut self) -> Result<Option<SpannedField<'a>>, Bad> {
        let before = self.rest;
        let Some((tag, wire)) = self.next()? else {
            return Ok(None);
        };
        let used = before.len() - self.rest.len();
        Ok(Some((tag, wire, before.get(..used).unwrap_or_default())))
    }
}

/// A field's number, value and whole encoding.
type SpannedField<'a> = (u32, Wire<'a>, &'a [u8]);

const TRUNCATED: &str = "field runs past the end of its message";

/// Reads a field key: its field number and wire type (0, 1, 2, 3, 4 or 5), as prost's
/// `decode_key` checks it.
#[inline(always)]
fn read_key(buf: &mut &[u8]) -> Result<(u32, u8), Bad> {
    let key = read_varint(buf)?;
    let key = u32::try_from(key).map_err(|_| Bad("field key does not fit 32 bits"))?;
    let wire_type = (key & 7) as u8;
    if wire_type > 5 {
        return Err(Bad("invalid wire type"));
    }
    let tag = key >> 3;
    if tag == 0 {
        return Err(Bad("field number 0"));
    }
    Ok((tag, wire_type))
}

/// Skips a group up to its end tag, as prost skips an unknown group (within its recursion limit).
fn skip_group(buf: &mut &[u8], tag: u32, depth: u32) -> Result<(), Bad> {
    if depth == 0 {
        return Err(Bad("recursion limit reached"));
    }
    loop {
        let (inner_tag, wire_type) = read_key(buf)?;
        if wire_type == 4 {
            return if inner_tag == tag {
                Ok(())
            } else {
                Err(Bad("unexpected end group tag"))
            };
        }
        skip_field(buf, inner_tag, wire_type, depth - 1)?;
    }
}

fn skip_field(buf: &mut &[u8], tag: u32, wire_type: u8, depth: u32) -> Result<(), Bad> {
    if depth == 0 {
        return Err(Bad("recursion limit reached"));
    }
    match wire_type {
        0 => {
            read_varint(buf)?;
        }
        1 => {
            take::<8>(buf)?;
        }
        2 => {
            let len = read_varint(buf)?;
            let len = usize::try_from(len).map_err(|_| Bad(TRUNCATED))?;
            *buf = buf.get(len..).ok_or(Bad(TRUNCATED))?;
        }
        5 => {
            take::<4>(buf)?;
        }
        3 => skip_group(buf, tag, depth)?,
        _ => return Err(Bad("unexpected end group tag")),
    }
    Ok(())
}

#[inline]
fn take<const N: usize>(buf: &mut &[u8]) -> Result<[u8; N], Bad> {
    let (head, rest) = buf.split_first_chunk::<N>().ok_or(Bad(TRUNCATED))?;
    *buf = rest;
    Ok(*head)
}

/// Reads a varint of at most 10 bytes whose tenth byte holds only bit 63 (prost's rule).
#[inline(always)]
fn read_varint(buf: &mut &[u8]) -> Result<u64, Bad> {
    match **buf {
        [byte, ref rest @ ..] if byte < 0x80 => {
            *buf = rest;
            Ok(u64::from(byte))
        }
        // Two bytes: the length of every series and family message of 128 bytes to 16 KiB.
        [low, high, ref rest @ ..] if high < 0x80 => {
            *buf = rest;
            Ok(u64::from(low & 0x7f) | u64::from(high) << 7)
        }
        _ => read_long_varint(buf),
    }
}

fn read_long_varint(buf: &mut &[u8]) -> Result<u64, Bad> {
    let bytes: &[u8] = buf;
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        if i == 9 && byte > 1 {
            return Err(Bad("varint overflows 64 bits"));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            *buf = bytes.get(i + 1..).unwrap_or_default();
            return Ok(value);
        }
    }
    Err(Bad("varint runs past the end of its message"))
}

/// Reads a body's length prefix as [`crate::delimited::decode`] does: its value and its length.
fn length_prefix(buf: &[u8]) -> Result<(u64, usize), DecodeError> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().enumerate() {
        if i == 9 && byte > 1 {
            return Err(DecodeError::VarintOverflow);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(DecodeError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delimited;
    use crate::model::{
        Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, Quantile, Summary,
        Untyped,
    };
    use prost::Message;

    const METRICS_PB: &[u8] = include_bytes!("../../tests/fixtures/prometheus-metrics.pb");
    const FEDERATE_PB: &[u8] = include_bytes!("../../tests/fixtures/prometheus-federate.pb");

    fn unlimited() -> Limits {
        Limits {
            max_message_bytes: usize::MAX,
            max_total_bytes: usize::MAX,
            max_families: usize::MAX,
            max_series: usize::MAX,
        }
    }

    /// The kinds of value an owned series sets, as bits.
    fn owned_kinds(m: &Metric) -> u8 {
        let mut kinds = 0;
        for (set, kind) in [
            (m.gauge.is_some(), GAUGE),
            (m.counter.is_some(), COUNTER),
            (m.untyped.is_some(), UNTYPED),
            (m.summary.is_some(), SUMMARY),
            (m.histogram.is_some(), HISTOGRAM),
        ] {
            if set {
                kinds |= kind;
            }
        }
        kinds
    }

    /// Asserts that `view` reads exactly as the owned decoding of the value of `kind`.
    fn assert_value(owned: &Metric, kind: u8, view: Value<'_>, at: &str) {
        let bits = |v: Option<f64>| v.unwrap_or(0.0).to_bits();
        match (kind, view) {
            (0, Value::Missing) => {}
            (GAUGE, Value::Gauge(v)) => {
                assert_eq!(bits(owned.gauge.and_then(|g| g.value)), v.to_bits(), "{at}")
            }
            (COUNTER, Value::Counter(v)) => {
                assert_eq!(
                    bits(owned.counter.and_then(|g| g.value)),
                    v.to_bits(),
                    "{at}"
                )
            }
            (UNTYPED, Value::Untyped(v)) => {
                assert_eq!(
                    bits(owned.untyped.and_then(|g| g.value)),
                    v.to_bits(),
                    "{at}"
                )
            }
            (SUMMARY, Value::Summary(s)) => {
                let o = owned.summary.as_ref().unwrap();
                assert_eq!(o.sample_count.unwrap_or(0), s.sample_count, "{at}");
                assert_eq!(bits(o.sample_sum), s.sample_sum.to_bits(), "{at}");
                let got: Vec<(u64, u64)> = s
                    .quantiles()
                    .map(|q| q.map(|(a, b)| (a.to_bits(), b.to_bits())))
                    .collect::<Result<_, _>>()
                    .unwrap();
                let want: Vec<(u64, u64)> = o
                    .quantile
                    .iter()
                    .map(|q| (bits(q.quantile), bits(q.value)))
                    .collect();
                assert_eq!(got, want, "{at}");
            }
            (HISTOGRAM, Value::Histogram(h)) => {
                let o = owned.histogram.as_ref().unwrap();
                assert_eq!(o.sample_count.unwrap_or(0), h.sample_count, "{at}");
                assert_eq!(bits(o.sample_sum), h.sample_sum.to_bits(), "{at}");
                let got: Vec<(u64, u64)> = h
                    .buckets()
                    .map(|b| b.map(|(a, c)| (a.to_bits(), c)))
                    .collect::<Result<_, _>>()
                    .unwrap();
                let want: Vec<(u64, u64)> = o
                    .bucket
                    .iter()
                    .map(|b| (bits(b.upper_bound), b.cumulative_count.unwrap_or(0)))
                    .collect();
                assert_eq!(got, want, "{at}");
            }
            (k, v) => panic!("{at}: kind {k} read as {v:?}"),
        }
    }

    /// Asserts that the views of `body` read exactly what `delimited::decode` decodes, and that
    /// `count_series` agrees; returns the owned families.
    fn assert_agree(body: &[u8]) -> Vec<MetricFamily> {
        let owned = delimited::decode(body, &unlimited()).expect("owned decode");
        let views: Vec<FamilyView<'_>> = families(body, &unlimited())
            .collect::<Result<_, _>>()
            .expect("views");
        assert_eq!(views.len(), owned.len());
        let series: usize = owned.iter().map(|f| f.metric.len()).sum();
        assert_eq!(count_series(body, &unlimited()), Ok((owned.len(), series)));
        for (o, v) in owned.iter().zip(&views) {
            let at = o.name.clone().unwrap_or_default();
            assert_eq!(o.name.as_deref().unwrap_or(""), v.name);
            assert_eq!(o.help.as_deref().unwrap_or(""), v.help, "{at}");
            assert_eq!(o.r#type, v.raw_type, "{at}");
            assert_eq!(o.metric_type(), v.metric_type(), "{at}");
            assert_eq!(check_family(v), Ok(o.metric.len()), "{at}");
            let metrics: Vec<MetricView<'_>> =
                v.metrics().collect::<Result<_, _>>().expect("metrics");
            assert_eq!(metrics.len(), o.metric.len(), "{at}");
            for (om, vm) in o.metric.iter().zip(&metrics) {
                assert_eq!(om.timestamp_ms, vm.timestamp_ms, "{at}");
                let labels: Vec<(&str, &str)> =
                    vm.labels().collect::<Result<_, _>>().expect("labels");
                let want: Vec<(&str, &str)> = om
                    .label
                    .iter()
                    .map(|l| {
                        (
                            l.name.as_deref().unwrap_or(""),
                            l.value.as_deref().unwrap_or(""),
                        )
                    })
                    .collect();
                assert_eq!(labels, want, "{at}");
                let kinds = owned_kinds(om);
                if kinds.count_ones() > 1 {
                    assert!(matches!(vm.value, Value::Several), "{at}: {:?}", vm.value);
                } else {
                    assert_value(om, kinds, vm.value, &at);
                }
                for t in [
                    MetricType::Counter,
                    MetricType::Gauge,
                    MetricType::Summary,
                    MetricType::Untyped,
                    MetricType::Histogram,
                    MetricType::GaugeHistogram,
                ] {
                    let kind = kind_of(t) & kinds;
                    assert_value(om, kind, vm.value_for(t).unwrap(), &at);
                }
            }
        }
        owned
    }

    /// A small deterministic generator (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
        fn float(&mut self) -> Option<f64> {
            Some(match self.below(9) {
                0 => return None,
                1 => f64::NAN,
                2 => f64::INFINITY,
                3 => f64::NEG_INFINITY,
                4 => -0.0,
                5 => self.below(1000) as f64,
                6 => f64::from_bits(self.next()),
                _ => self.below(1 << 40) as f64 / 7.0 - 1e6,
            })
        }
        fn string(&mut self) -> Option<String> {
            const PIECES: [&str; 8] = ["a", "_id", "\\", "\n", "\"", "é", "job", "le"];
            if self.chance(8) {
                return None;
            }
            Some(
                (0..self.below(4))
                    .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
                    .collect(),
            )
        }
    }

    fn generated_metric(r: &mut Rng, kind: MetricType) -> Metric {
        let mut m = Metric {
            label: (0..r.below(4))
                .map(|_| LabelPair {
                    name: r.string(),
                    value: r.string(),
                })
                .collect(),
            timestamp_ms: (!r.chance(3)).then(|| r.next() as i64),
            ..Default::default()
        };
        // Mostly the family's own kind; sometimes another, none, or several.
        let kinds = match r.below(10) {
            0 => 0,
            1 => 1 << r.below(5),
            2 => r.below(32) as u8,
            _ => kind_of(kind),
        };
        if kinds & GAUGE != 0 {
            m.gauge = Some(Gauge { value: r.float() });
        }
        if kinds & COUNTER != 0 {
            m.counter = Some(Counter { value: r.float() });
        }
        if kinds & UNTYPED != 0 {
            m.untyped = Some(Untyped { value: r.float() });
        }
        if kinds & SUMMARY != 0 {
            m.summary = Some(Summary {
                sample_count: (!r.chance(5)).then(|| r.next()),
                sample_sum: r.float(),
                quantile: (0..r.below(4))
                    .map(|_| Quantile {
                        quantile: r.float(),
                        value: r.float(),
                    })
                    .collect(),
            });
        }
        if kinds & HISTOGRAM != 0 {
            m.histogram = Some(Histogram {
                sample_count: (!r.chance(5)).then(|| r.next()),
                sample_sum: r.float(),
                bucket: (0..r.below(5))
                    .map(|_| Bucket {
                        cumulative_count: (!r.chance(5)).then(|| r.below(1000)),
                        upper_bound: if r.chance(3) {
                            Some(f64::INFINITY)
                        } else {
                            r.float()
                        },
                    })
                    .collect(),
            });
        }
        m
    }

    fn generated(seed: u64) -> Vec<MetricFamily> {
        let mut r = Rng(seed | 1);
        let types = [
            MetricType::Counter,
            MetricType::Gauge,
            MetricType::Summary,
            MetricType::Untyped,
            MetricType::Histogram,
            MetricType::GaugeHistogram,
        ];
        (0..1 + r.below(8))
            .map(|i| {
                let kind = types[r.below(types.len() as u64) as usize];
                MetricFamily {
                    name: if r.chance(10) {
                        None
                    } else {
                        Some(format!("family_{i}"))
                    },
                    help: r.string(),
                    r#type: match r.below(10) {
                        0 => None,
                        1 => Some(r.next() as i32),
                        _ => Some(kind as i32),
                    },
                    metric: (0..r.below(5))
                        .map(|_| generated_metric(&mut r, kind))
                        .collect(),
                }
            })
            .collect()
    }

    #[test]
    fn varints_read_as_prost_reads_them() {
        for v in [0, 1, 127, 128, 300, 16_383, 16_384, 1 << 35, u64::MAX] {
            let mut encoded = Vec::new();
            put_varint(&mut encoded, v);
            encoded.push(0xAA);
            let mut buf = encoded.as_slice();
            assert_eq!(read_varint(&mut buf).unwrap(), v);
            assert_eq!(buf, [0xAA], "{v}");
            let mut prost_buf = encoded.as_slice();
            assert_eq!(prost::encoding::decode_varint(&mut prost_buf).unwrap(), v);
        }
        // Non-minimal encodings are fine; an eleventh byte, bits past 64, or an end is not.
        assert_eq!(read_varint(&mut &[0x80, 0x00][..]).unwrap(), 0);
        assert_eq!(read_varint(&mut &[0xff, 0x80, 0x00][..]).unwrap(), 127);
        assert!(read_varint(&mut &[0x80][..]).is_err());
        assert!(read_varint(&mut &[][..]).is_err());
        assert!(read_varint(&mut &[[0xff; 9].as_slice(), &[0x02]].concat()[..]).is_err());
        assert!(read_varint(&mut &[0x80; 11][..]).is_err());
    }

    #[test]
    fn prometheus_fixtures_read_as_the_owned_decoding() {
        for body in [METRICS_PB, FEDERATE_PB] {
            let owned = assert_agree(body);
            assert!(owned.len() > 10);
        }
        // A spot check by hand, not only agreement.
        let build = families(METRICS_PB, &Limits::default())
            .map(Result::unwrap)
            .find(|f| f.name == "prometheus_build_info")
            .unwrap();
        assert_eq!(build.metric_type(), MetricType::Gauge);
        let series = build.metrics().next().unwrap().unwrap();
        assert!(series
            .labels()
            .any(|l| l.unwrap() == ("version", "2.42.0+ds")));
        assert!(matches!(series.value, Value::Gauge(v) if v == 1.0));
    }

    #[test]
    fn generated_families_of_every_type_read_as_the_owned_decoding() {
        for seed in 1..400u64 {
            let families = generated(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            assert_agree(&delimited::encode(&families));
        }
    }

    /// A field key.
    fn key(tag: u32, wire_type: u8) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, u64::from(tag << 3 | u32::from(wire_type)));
        out
    }

    /// A length-delimited field.
    fn ld(tag: u32, content: &[u8]) -> Vec<u8> {
        let mut out = key(tag, 2);
        put_varint(&mut out, content.len() as u64);
        out.extend_from_slice(content);
        out
    }

    fn double(tag: u32, v: f64) -> Vec<u8> {
        let mut out = key(tag, 1);
        out.extend_from_slice(&v.to_le_bytes());
        out
    }

    fn varint_field(tag: u32, v: u64) -> Vec<u8> {
        let mut out = key(tag, 0);
        put_varint(&mut out, v);
        out
    }

    fn label(name: &str, value: &str) -> Vec<u8> {
        ld(
            1,
            &[ld(1, name.as_bytes()), ld(2, value.as_bytes())].concat(),
        )
    }

    fn framed(messages: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            put_varint(&mut out, m.len() as u64);
            out.extend_from_slice(m);
        }
        out
    }

    /// Unknown fields of every valid wire type, groups nested in groups included.
    fn unknown_fields() -> Vec<u8> {
        [
            varint_field(15, 1 << 40),
            double(16, 1.5),
            ld(17, b"\xff\xfe not UTF-8, not looked at"),
            [key(18, 5), vec![1, 2, 3, 4]].concat(),
            [
                key(19, 3),
                varint_field(1, 7),
                key(20, 3),
                ld(2, b"x"),
                key(20, 4),
                key(19, 4),
            ]
            .concat(),
        ]
        .concat()
    }

    #[test]
    fn interleaved_repeated_fields_and_unknown_fields_read_as_prost_reads_them() {
        let u = unknown_fields();
        let quantile = ld(3, &[double(1, 0.5), u.clone(), double(2, 3.0)].concat());
        let metric = [
            label("a", "1"),
            u.clone(),
            varint_field(6, 5),
            ld(2, &[u.clone(), double(1, 2.0)].concat()),
            label("b", "2"),
            // A second gauge without a value keeps the first one's (prost merges).
            ld(2, &u),
            varint_field(6, 9),
            label("c", "3"),
            // Two summaries merge: their quantiles add up, the last count wins.
            ld(
                4,
                &[varint_field(1, 1), quantile.clone(), u.clone()].concat(),
            ),
            ld(
                4,
                &[quantile.clone(), varint_field(1, 2), double(2, 4.0)].concat(),
            ),
        ]
        .concat();
        let histogram = [
            label("h", "x"),
            ld(
                7,
                &[
                    ld(3, &[varint_field(1, 3), u.clone(), double(2, 1.0)].concat()),
                    varint_field(1, 4),
                ]
                .concat(),
            ),
            ld(
                7,
                &ld(3, &[double(2, f64::INFINITY), varint_field(1, 4)].concat()),
            ),
        ]
        .concat();
        let family = [
            ld(4, &metric),
            ld(1, b"first_name"),
            u.clone(),
            ld(4, &metric),
            varint_field(3, 1),
            ld(2, b"help"),
            ld(1, b"name"),
            ld(4, &histogram),
            // An enum keeps the low 32 bits of its varint, as prost does.
            varint_field(3, (1 << 32) | 2),
        ]
        .concat();
        let body = framed(&[family.clone(), u.clone(), vec![]]);
        let owned = assert_agree(&body);
        assert_eq!(owned[0].name.as_deref(), Some("name"));
        assert_eq!(owned[0].r#type, Some(2));
        let views: Vec<_> = families(&body, &Limits::default()).collect();
        let v = views[0].as_ref().unwrap();
        assert_eq!((v.name, v.help, v.raw_type), ("name", "help", Some(2)));
        let m = v.metrics().next().unwrap().unwrap();
        assert_eq!(m.timestamp_ms, Some(9));
        assert!(matches!(m.value, Value::Several));
        assert!(matches!(m.value_for(MetricType::Gauge), Ok(Value::Gauge(v)) if v == 2.0));
        let Ok(Value::Summary(s)) = m.value_for(MetricType::Summary) else {
            panic!("no summary")
        };
        assert_eq!((s.sample_count, s.sample_sum), (2, 4.0));
        assert_eq!(s.quantiles().count(), 2);
        let labels: Vec<_> = m.labels().map(Result::unwrap).collect();
        assert_eq!(labels, [("a", "1"), ("b", "2"), ("c", "3")]);
        // An empty message and an unknown-only message are families with no name.
        assert_eq!(views.len(), 3);
        assert_eq!(views[2].as_ref().unwrap().name, "");
    }

    /// The error class: the variant, and the limit it names (not an invalid message's wording).
    fn class(r: &Result<impl Sized, DecodeError>) -> String {
        match r {
            Ok(_) => "ok".into(),
            Err(DecodeError::Invalid(_)) => "invalid".into(),
            Err(e) => format!("{e:?}"),
        }
    }

    fn assert_same_class(body: &[u8], limits: &Limits) {
        let owned = delimited::decode(body, limits);
        let counted = count_series(body, limits);
        assert_eq!(class(&owned), class(&counted), "body {body:?}");
        if let Ok(families) = &owned {
            let series = families.iter().map(|f| f.metric.len()).sum::<usize>();
            assert_eq!(counted, Ok((families.len(), series)));
            // And the lazy views read the same bytes without error.
            if limits.max_series == usize::MAX {
                assert_agree(body);
            }
        }
    }

    #[test]
    fn hostile_bodies_fail_with_the_owned_decoders_error_class() {
        let d = Limits::default();
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0xff; 11],
            vec![0x80; 12],
            [vec![0xff; 9], vec![0x02]].concat(),
            [vec![0xff; 9], vec![0x01]].concat(),
            vec![0x80, 0x80],
            vec![3, 0x0a, 0x05, b'x'],
            vec![3, 0x0a, 0x01, 0xff],
            // Field number 0, wire types 6 and 7, a stray end group, a group on a known field.
            framed(&[vec![0x00, 0x00]]),
            framed(&[vec![0x0e]]),
            framed(&[vec![0x0f]]),
            framed(&[vec![0x7c]]),
            framed(&[vec![0x0b, 0x0c]]),
            framed(&[vec![0x7b, 0x7c]]),
            framed(&[vec![0x7b, 0x84, 0x01]]),
            // A key over 32 bits; a non-minimal but valid key.
            framed(&[vec![0x80, 0x80, 0x80, 0x80, 0x10, 0]]),
            framed(&[vec![0x8a, 0x80, 0x00, 1, b'a']]),
            // Wrong wire types on known fields at every level.
            framed(&[varint_field(1, 1)]),
            framed(&[ld(3, b"")]),
            framed(&[varint_field(4, 1)]),
            framed(&[ld(4, &varint_field(1, 1))]),
            framed(&[ld(4, &ld(6, b""))]),
            framed(&[ld(4, &ld(2, &varint_field(1, 1)))]),
            framed(&[ld(4, &ld(1, &varint_field(2, 1)))]),
            framed(&[ld(4, &ld(1, &ld(1, b"\xc3")))]),
            framed(&[ld(4, &ld(4, &ld(3, &varint_field(2, 1))))]),
            framed(&[ld(4, &ld(7, &ld(3, &double(1, 1.0))))]),
            framed(&[ld(4, &ld(7, &ld(3, &varint_field(2, 1))))]),
            framed(&[ld(4, &ld(7, &double(1, 1.0)))]),
            // A field running past its message, and a message running past the body.
            framed(&[ld(4, &[ld(1, b"").as_slice(), &[0x12, 0x05]].concat())]),
            framed(&[ld(4, &[0x31, 1, 2, 3])]),
            framed(&[vec![0x0a, 0x03, b'a']]),
            vec![5, 0x0a, 0x03],
        ];
        for case in &cases {
            assert_same_class(case, &d);
        }
        // Limits, in the owned decoder's order of checks.
        let body = delimited::encode(&generated(7));
        let owned = delimited::decode(&body, &d).unwrap();
        let series: usize = owned.iter().map(|f| f.metric.len()).sum();
        for limits in [
            Limits {
                max_total_bytes: body.len() - 1,
                ..d
            },
            Limits {
                max_families: owned.len() - 1,
                ..d
            },
            Limits {
                max_series: series.saturating_sub(1),
                ..d
            },
            Limits {
                max_message_bytes: 3,
                ..d
            },
        ] {
            assert_same_class(&body, &limits);
            assert_ne!(class(&count_series(&body, &limits)), "ok");
        }
    }

    /// A body whose message at `level` (0 the family, 1 a metric, 2 a label or summary, 3 a
    /// quantile) carries an unknown group nested `depth` deep.
    fn nested_groups(level: usize, summary: bool, depth: usize) -> Vec<u8> {
        let mut message = Vec::new();
        for _ in 0..depth {
            message.extend(key(9, 3));
        }
        for _ in 0..depth {
            message.extend(key(9, 4));
        }
        let wrappers: [u32; 3] = if summary { [4, 4, 3] } else { [4, 1, 0] };
        for &tag in wrappers.iter().take(level).rev() {
            message = ld(tag, &message);
        }
        framed(&[message])
    }

    #[test]
    fn unknown_groups_stop_at_prosts_recursion_limit() {
        // Prost's limit is 100 levels counted from the family; where it falls is the point.
        for (level, summary, deepest) in [
            (0, false, 100),
            (1, false, 99),
            (2, false, 98),
            (2, true, 98),
            (3, true, 97),
        ] {
            let mut accepted = None;
            for depth in 90..110 {
                let body = nested_groups(level, summary, depth);
                assert_same_class(&body, &Limits::default());
                if delimited::decode(&body, &Limits::default()).is_ok() {
                    accepted = Some(depth);
                }
            }
            assert_eq!(accepted, Some(deepest), "level {level}");
        }
        let unterminated = framed(&[ld(4, &key(9, 3))]);
        assert_same_class(&unterminated, &Limits::default());
    }

    #[test]
    fn mutated_bodies_never_panic_and_agree_with_the_owned_decoder() {
        let mut r = Rng(0x853c_49e6_748f_ea9b);
        let bases = [
            delimited::encode(&generated(3)),
            delimited::encode(&generated(11)),
            FEDERATE_PB.get(..2000).unwrap().to_vec(),
        ];
        let tight = Limits {
            max_message_bytes: 1 << 12,
            max_total_bytes: 1 << 14,
            max_families: 6,
            max_series: 12,
        };
        for i in 0..4000 {
            let mut body = bases[i % bases.len()].clone();
            for _ in 0..=r.below(4) {
                let at = r.below(body.len() as u64) as usize;
                match r.below(3) {
                    0 => body[at] = r.next() as u8,
                    1 => body.truncate(at),
                    _ => body.insert(at, r.next() as u8),
                }
                if body.is_empty() {
                    break;
                }
            }
            assert_same_class(&body, &unlimited());
            assert_same_class(&body, &tight);
            // Whatever the views are asked, they answer without panicking.
            for family in families(&body, &unlimited()).flatten() {
                let mut out = Vec::new();
                let _ = write_family_without_timestamps(&mut out, &family);
                for metric in family.metrics().flatten() {
                    let _ = metric.labels().count();
                    let _ = metric.value_for(MetricType::Summary);
                    if let Value::Histogram(h) = metric.value {
                        let _ = h.buckets().count();
                    }
                }
            }
        }
    }

    /// Decodes, clears every timestamp, encodes: what `/federate` served in protobuf before.
    fn without_timestamps_by_prost(body: &[u8]) -> Vec<u8> {
        let mut families = delimited::decode(body, &unlimited()).unwrap();
        for family in &mut families {
            for metric in &mut family.metric {
                metric.timestamp_ms = None;
            }
        }
        delimited::encode(&families)
    }

    fn without_timestamps_by_views(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for family in families(body, &unlimited()) {
            write_family_without_timestamps(&mut out, &family.unwrap()).unwrap();
        }
        out
    }

    #[test]
    fn dropping_timestamps_byte_by_byte_equals_prosts_decode_clear_encode() {
        let mut bodies = vec![METRICS_PB.to_vec(), FEDERATE_PB.to_vec()];
        for seed in 1..200u64 {
            bodies.push(delimited::encode(&generated(seed * 7919)));
        }
        for body in &bodies {
            let ours = without_timestamps_by_views(body);
            let prost = without_timestamps_by_prost(body);
            // Prost writes canonical bytes, so re-encoding ours must give exactly its bytes.
            assert_eq!(
                delimited::encode(&delimited::decode(&ours, &unlimited()).unwrap()),
                prost
            );
            // Canonical input (as stored uploads are) is rewritten to exactly prost's bytes.
            assert_eq!(ours, prost);
        }
        // Unknown fields are kept; the result still decodes to prost's families.
        let u = unknown_fields();
        let metric = [
            varint_field(6, 1),
            u.clone(),
            label("a", "b"),
            varint_field(6, 300),
        ]
        .concat();
        let body = framed(&[[ld(1, b"x"), ld(4, &metric), u, ld(4, &metric)].concat()]);
        let ours = without_timestamps_by_views(&body);
        assert_ne!(ours, without_timestamps_by_prost(&body));
        assert_eq!(
            delimited::encode(&delimited::decode(&ours, &unlimited()).unwrap()),
            without_timestamps_by_prost(&body)
        );
        assert!(count_series(&ours, &unlimited()).is_ok());
        // An invalid family is refused whole and nothing is written.
        let bad = framed(&[ld(4, &label("a", "\u{e9}").replace_last_byte(0xff))]);
        let family = families(&bad, &unlimited()).next().unwrap().unwrap();
        let mut out = vec![1];
        assert!(matches!(
            write_family_without_timestamps(&mut out, &family),
            Err(DecodeError::Invalid(_))
        ));
        assert_eq!(out, [1]);
    }

    /// Asserts that every family of `body` is written as text byte for byte as the owned
    /// decoding is, with and without timestamps (errors included).
    fn assert_same_text(body: &[u8]) {
        let owned = delimited::decode(body, &unlimited()).unwrap();
        let views: Vec<_> = families(body, &unlimited()).map(Result::unwrap).collect();
        for timestamps in [false, true] {
            for (o, v) in owned.iter().zip(&views) {
                let (mut want, mut got) = (Vec::new(), Vec::new());
                let (mut want_skipped, mut got_skipped) = Default::default();
                let w =
                    crate::text::write_family_counted(&mut want, o, timestamps, &mut want_skipped);
                let g = crate::text::write_family_view(&mut got, v, timestamps, &mut got_skipped);
                assert_eq!(
                    w.map_err(|e| e.kind()),
                    g.map_err(|e| e.kind()),
                    "{:?}",
                    o.name
                );
                assert_eq!(want_skipped, got_skipped, "{:?}", o.name);
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want)
                );
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn text_from_views_is_byte_identical_to_text_from_the_owned_decoding() {
        assert_same_text(METRICS_PB);
        assert_same_text(FEDERATE_PB);
        for seed in 1..400u64 {
            assert_same_text(&delimited::encode(&generated(seed * 104_729)));
        }
        // Several value fields in one series: the family's own is written.
        let metric = [
            label("a", "x\"\\\n"),
            ld(3, &double(1, 1.0)),
            ld(2, &double(1, 2.5)),
        ]
        .concat();
        let body = framed(&[[ld(1, b"g"), varint_field(3, 1), ld(4, &metric)].concat()]);
        assert_same_text(&body);
        let family = families(&body, &unlimited()).next().unwrap().unwrap();
        let mut text = Vec::new();
        crate::text::write_family_view(&mut text, &family, false, &mut Default::default()).unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "# TYPE g gauge\ng{a=\"x\\\"\\\\\\n\"} 2.5\n"
        );
        // A label that is not UTF-8 is an error, not a panic or a lossy write.
        let bad = framed(&[[
            ld(1, b"g"),
            ld(
                4,
                &[label("a", "\u{e9}").replace_last_byte(0xff), ld(5, b"")].concat(),
            ),
        ]
        .concat()]);
        let family = families(&bad, &unlimited()).next().unwrap().unwrap();
        let err = crate::text::write_family_view(
            &mut Vec::new(),
            &family,
            false,
            &mut Default::default(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn newest_timestamp_is_the_largest_the_owned_decoding_holds() {
        let mut bodies = vec![METRICS_PB.to_vec(), FEDERATE_PB.to_vec(), Vec::new()];
        for seed in 1..200u64 {
            bodies.push(delimited::encode(&generated(seed * 31)));
        }
        for body in &bodies {
            let owned = delimited::decode(body, &unlimited()).unwrap();
            let want = owned
                .iter()
                .flat_map(|f| &f.metric)
                .filter_map(|m| m.timestamp_ms)
                .max();
            assert_eq!(newest_timestamp(body).unwrap(), want);
        }
        // Series without one do not count; a repeated field counts its last value; a negative
        // timestamp is one too.
        let metric = [varint_field(6, 900), label("a", "b"), varint_field(6, 7)].concat();
        let body = framed(&[[ld(4, &metric), ld(4, &label("c", "d"))].concat()]);
        assert_eq!(newest_timestamp(&body).unwrap(), Some(7));
        let body = framed(&[ld(4, &varint_field(6, (-5i64) as u64))]);
        assert_eq!(newest_timestamp(&body).unwrap(), Some(-5));
        assert_eq!(
            newest_timestamp(&framed(&[ld(4, &label("a", "b"))])).unwrap(),
            None
        );
        // A body cut short is an error, not a guess.
        let whole = delimited::encode(&generated(3));
        assert!(newest_timestamp(&whole[..whole.len() - 1]).is_err());
    }

    trait ReplaceLastByte {
        fn replace_last_byte(self, b: u8) -> Vec<u8>;
    }

    impl ReplaceLastByte for Vec<u8> {
        fn replace_last_byte(mut self, b: u8) -> Vec<u8> {
            if let Some(last) = self.last_mut() {
                *last = b;
            }
            self
        }
    }

    #[test]
    fn encoded_messages_are_unchanged_by_prost() {
        // The generator's families survive an encode/decode round trip, so agreement above is
        // about real content, not about what prost drops.
        let families = generated(42);
        let body = delimited::encode(&families);
        let back = delimited::decode(&body, &Limits::default()).unwrap();
        let bytes = |f: &[MetricFamily]| f.iter().map(Message::encode_to_vec).collect::<Vec<_>>();
        assert_eq!(bytes(&back), bytes(&families));
    }
}
