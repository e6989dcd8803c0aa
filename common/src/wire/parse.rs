//! Reading each message of the schema into its view: a family's header, a series, a label, a
//! value. Each checks what prost would check of that message's own fields.

use crate::model::MetricType;

use super::fields::{utf8, Bad, Fields};
use super::{
    FamilyHead, FamilyView, HistogramView, MetricView, SummaryView, Value, COUNTER_FIELD,
    FAMILY_DEPTH, GAUGE_FIELD, HISTOGRAM_FIELD, ITEM_FIELD, LABEL_FIELD, LABEL_KEY, METRIC_DEPTH,
    METRIC_FIELD, METRIC_KEY, SUMMARY_FIELD, TIMESTAMP_FIELD, UNTYPED_FIELD, VALUE_DEPTH,
};

// One bit per value field of a metric.
pub(super) const GAUGE: u8 = 1;
pub(super) const COUNTER: u8 = 2;
pub(super) const UNTYPED: u8 = 4;
pub(super) const SUMMARY: u8 = 8;
pub(super) const HISTOGRAM: u8 = 16;
pub(super) const ALL_KINDS: u8 = GAUGE | COUNTER | UNTYPED | SUMMARY | HISTOGRAM;

pub(super) fn kind_of(metric_type: MetricType) -> u8 {
    match metric_type {
        MetricType::Counter => COUNTER,
        MetricType::Gauge => GAUGE,
        MetricType::Untyped => UNTYPED,
        MetricType::Summary => SUMMARY,
        MetricType::Histogram | MetricType::GaugeHistogram => HISTOGRAM,
    }
}

pub(super) fn value_kind(value: &Value<'_>) -> u8 {
    match value {
        Value::Missing | Value::Several => 0,
        Value::Gauge(_) => GAUGE,
        Value::Counter(_) => COUNTER,
        Value::Untyped(_) => UNTYPED,
        Value::Summary(_) => SUMMARY,
        Value::Histogram(_) => HISTOGRAM,
    }
}

pub(super) fn family_header(message: &[u8]) -> Result<FamilyView<'_>, Bad> {
    let mut view = FamilyView::unread(message);
    let mut fields = Fields::new(message, FAMILY_DEPTH);
    loop {
        // The series, checked here only for their framing, passed over without the general
        // field reader when written the usual way.
        if fields.next_bytes(METRIC_KEY).is_some() {
            continue;
        }
        let Some((tag, wire)) = fields.next()? else {
            break;
        };
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

/// Reads a family's fields up to its first series (all of them when it has none): the view
/// they give, and the message from that series on. The fields after it are not read.
pub(super) fn family_head(message: &[u8]) -> Result<FamilyHead<'_>, Bad> {
    let mut family = FamilyView::unread(message);
    let mut fields = Fields::new(message, FAMILY_DEPTH);
    loop {
        let at = message.len() - fields.remaining();
        let Some((tag, wire)) = fields.next()? else {
            return Ok(FamilyHead {
                family,
                series: &[],
            });
        };
        match tag {
            1 => family.name = wire.str()?,
            2 => family.help = wire.str()?,
            3 => family.raw_type = Some(wire.varint()? as i32),
            METRIC_FIELD => {
                return Ok(FamilyHead {
                    family,
                    series: message.get(at..).unwrap_or_default(),
                })
            }
            _ => {}
        }
    }
}

/// Reads a metric's own fields; value fields whose kind is not in `kinds` are passed over.
pub(super) fn parse_metric(message: &[u8], kinds: u8) -> Result<MetricView<'_>, Bad> {
    parse_metric_inline(message, kinds)
}

/// [`parse_metric`], inlined into the series iterator: called, its view of a hundred bytes was
/// copied out twice per series on the way to the upload's check, a tenth of the check (`perf`).
#[inline(always)]
pub(super) fn parse_metric_inline(message: &[u8], kinds: u8) -> Result<MetricView<'_>, Bad> {
    let mut fields = Fields::new(message, METRIC_DEPTH);
    // The labels, written first, passed over without the general field reader (they are read
    // when asked for).
    while fields.next_short(LABEL_KEY).is_some() {}
    parse_metric_after_labels(message, fields, kinds)
}

/// [`parse_metric_inline`] from the end of the run of labels the series starts with, which
/// `fields` has passed over already.
#[inline(always)]
pub(super) fn parse_metric_after_labels<'a>(
    message: &'a [u8],
    mut fields: Fields<'a>,
    kinds: u8,
) -> Result<MetricView<'a>, Bad> {
    let mut timestamp_ms = None;
    let mut seen = 0u8;
    let mut last = 0u8;
    let mut simple = 0.0;
    let mut summary = Distribution::default();
    let mut histogram = Distribution::default();
    // Where the labels' readers may stop: after this run, unless a label comes later.
    let mut labels = message
        .get(..message.len() - fields.remaining())
        .unwrap_or(message);
    // Then, as every encoder writes a scalar series, its value and timestamp: read here in a few
    // comparisons what the general reader below would find in them (the value's field with its
    // double, the timestamp's varint), a third of the series' reading (measured). Any other
    // layout, or anything after them, goes through the general reader.
    if let Some((key, bits)) = fields.next_simple_value() {
        let kind = match key {
            GAUGE_KEY => GAUGE,
            COUNTER_KEY => COUNTER,
            _ => UNTYPED,
        };
        // A kind not asked for is passed over, as below: its bytes are valid either way.
        if kinds & kind != 0 {
            simple = f64::from_le_bytes(bits);
            seen = kind;
            last = kind;
        }
    }
    if let Some(timestamp) = fields.next_varint(TIMESTAMP_KEY) {
        timestamp_ms = Some(timestamp as i64);
    }
    while let Some((tag, wire)) = fields.next()? {
        let kind = match tag {
            LABEL_FIELD => {
                wire.bytes()?;
                labels = message;
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
        labels,
    })
}

/// The merged own fields of a summary's or histogram's occurrences.
#[derive(Default)]
pub(super) struct Distribution<'a> {
    count: u64,
    sum: f64,
    last: &'a [u8],
    occurrences: usize,
}

impl<'a> Distribution<'a> {
    fn merge(&mut self, message: &'a [u8]) -> Result<(), Bad> {
        let mut fields = Fields::new(message, VALUE_DEPTH);
        loop {
            // The buckets or quantiles, checked as they are read, passed over without the
            // general field reader when written the usual way.
            if fields.next_short(ITEM_KEY).is_some() {
                continue;
            }
            let Some((tag, wire)) = fields.next()? else {
                break;
            };
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
pub(super) fn simple_value(message: &[u8]) -> Result<Option<f64>, Bad> {
    // As every encoder writes it: the value's key (field 1, a double) and its eight bytes.
    if let [VALUE_DOUBLE_KEY, ref value @ ..] = *message {
        if let Ok(bits) = <[u8; 8]>::try_from(value) {
            return Ok(Some(f64::from_le_bytes(bits)));
        }
    }
    let mut value = None;
    let mut fields = Fields::new(message, VALUE_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        if tag == 1 {
            value = Some(wire.double()?);
        }
    }
    Ok(value)
}

#[inline(always)]
pub(super) fn parse_label(message: &[u8]) -> Result<(&str, &str), Bad> {
    if let Some((name, value)) = short_label(message) {
        return Ok((utf8(name)?, utf8(value)?));
    }
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

/// As [`parse_label`], leaving the name unchecked for UTF-8 when the label is written the usual
/// way (see [`super::label_unchecked_name`]); any other way, every name field is
/// checked, as prost checks each occurrence.
#[inline(always)]
pub(super) fn parse_label_unchecked_name(message: &[u8]) -> Result<(&[u8], &str), Bad> {
    if let Some((name, value)) = short_label(message) {
        return Ok((name, utf8(value)?));
    }
    parse_label(message).map(|(name, value)| (name.as_bytes(), value))
}

/// The name and value of a label message written as every encoder writes it: the name's field
/// then the value's, each with a one-byte key and length, and nothing else. What the general
/// reading of the fields would find in such a message, read in a few comparisons; `None` for
/// any other message, which the general reading then takes (or refuses).
#[inline(always)]
fn short_label(message: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut fields = Fields::new(message, VALUE_DEPTH);
    let name = fields.next_short(NAME_KEY)?;
    let value = fields.next_short(VALUE_KEY)?;
    fields.is_empty().then_some((name, value))
}

/// The one-byte key of a summary's quantile or a histogram's bucket field (3, length-delimited).
const ITEM_KEY: u8 = ((ITEM_FIELD as u8) << 3) | 2;

/// The key of a gauge's, counter's or untyped value's field 1, a double.
pub(super) const VALUE_DOUBLE_KEY: u8 = (1 << 3) | 1;

/// The one-byte keys of a metric's gauge, counter and untyped fields (length-delimited) and of its
/// timestamp (a varint).
pub(super) const GAUGE_KEY: u8 = ((GAUGE_FIELD as u8) << 3) | 2;
pub(super) const COUNTER_KEY: u8 = ((COUNTER_FIELD as u8) << 3) | 2;
pub(super) const UNTYPED_KEY: u8 = ((UNTYPED_FIELD as u8) << 3) | 2;
const TIMESTAMP_KEY: u8 = (TIMESTAMP_FIELD as u8) << 3;

/// The one-byte keys of a label's name (field 1) and value (field 2), both length-delimited.
const NAME_KEY: u8 = (1 << 3) | 2;
const VALUE_KEY: u8 = (2 << 3) | 2;

/// As [`parse_label`], as bytes: for writers, which need no `&str`. The UTF-8 check is the same;
/// ASCII (nearly every label) is settled by a quicker scan first.
#[inline]
pub(super) fn parse_label_bytes(message: &[u8]) -> Result<(&[u8], &[u8]), Bad> {
    if let Some((name, value)) = short_label(message) {
        return Ok((utf8_bytes(name)?, utf8_bytes(value)?));
    }
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
pub(super) fn utf8_bytes(bytes: &[u8]) -> Result<&[u8], Bad> {
    if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
        Ok(bytes)
    } else {
        Err(Bad("string is not UTF-8"))
    }
}
