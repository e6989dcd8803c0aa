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
//!
//! A reader that reads every series anyway (the upload's check) walks each family once:
//! [`family_heads`] reads a family only up to its first series, and [`Metrics::next_series`] gives
//! each series with its labels to read before its value, so the run of labels it starts with is
//! not passed over first.
//!
//! Where each part lives: this file holds the views and the schema's field numbers; `fields` the
//! one field reader everything walks messages with; `parse` each message read into its view;
//! `check` a whole family checked; `count` what decoding would allocate, counted first; `write` the one protobuf writer (timestamps dropped).

use crate::delimited::{DecodeError, Limits};
use crate::model::MetricType;

mod check;
pub mod count;
pub(crate) mod fields;
mod parse;
mod write;

use check::{check_family_message, Items};
use fields::{length_prefix, Bad, Fields};
use parse::{
    family_head, family_header, kind_of, parse_label, parse_label_bytes,
    parse_label_unchecked_name, parse_metric, parse_metric_after_labels, parse_metric_inline,
    value_kind, ALL_KINDS,
};

pub use write::write_family_without_timestamps;

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
    /// The next length-prefixed message, checked the way [`crate::delimited::decode`] checks it,
    /// and read into a view by `header`.
    #[inline(always)]
    fn frame<T>(
        &mut self,
        header: impl FnOnce(&'a [u8]) -> Result<T, Bad>,
    ) -> Result<T, DecodeError> {
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
        let view = header(message)?;
        self.seen += 1;
        self.rest = rest;
        Ok(view)
    }

    /// The next family read by `header`, the body's size checked first; `None` at the end and
    /// after an error.
    #[inline(always)]
    fn next_with<T>(
        &mut self,
        header: impl FnOnce(&'a [u8]) -> Result<T, Bad>,
    ) -> Option<Result<T, DecodeError>> {
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
        let item = self.frame(header);
        self.done = item.is_err();
        Some(item)
    }
}

impl<'a> Iterator for Families<'a> {
    type Item = Result<FamilyView<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_with(family_header)
    }
}

/// Iterates the families of a protobuf-delimited body as [`families`] does, each read only up to
/// its first series (see [`FamilyHead`]): for a caller that reads every series anyway, which
/// [`families`] would pass over once more to find the fields after them.
pub fn family_heads<'a>(body: &'a [u8], limits: &Limits) -> FamilyHeads<'a> {
    FamilyHeads {
        families: families(body, limits),
    }
}

/// An iterator over the families of a body, read up to their first series (see
/// [`family_heads`]). After an error it ends.
pub struct FamilyHeads<'a> {
    families: Families<'a>,
}

impl<'a> Iterator for FamilyHeads<'a> {
    type Item = Result<FamilyHead<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.families.next_with(family_head)
    }
}

/// A family whose fields were read up to its first series: its name, help and type as every
/// encoder writes them, before the series. The fields after it are read only by
/// [`FamilyHead::metrics`], which tells whether one of the family's own fields came among the
/// series (then the view's name, help or type may not be the family's: read it with
/// [`families`] instead).
#[derive(Clone, Copy, Debug)]
pub struct FamilyHead<'a> {
    /// The family's fields read before its first series (its whole message included).
    pub family: FamilyView<'a>,
    /// The message from its first series on.
    series: &'a [u8],
}

impl<'a> FamilyHead<'a> {
    /// The family's series, in order, as [`FamilyView::metrics`] reads them; once it has
    /// ended, [`Metrics::read_family_field`] says whether a name, help or type field came among
    /// them.
    pub fn metrics(&self) -> Metrics<'a> {
        Metrics {
            fields: Fields::new(self.series, FAMILY_DEPTH),
            done: false,
            family_field: false,
        }
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
    /// A family of `message` with none of its fields read yet.
    pub(super) fn unread(message: &'a [u8]) -> FamilyView<'a> {
        FamilyView {
            name: "",
            help: "",
            raw_type: None,
            message,
        }
    }

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
            family_field: false,
        }
    }
}

/// An iterator over the series of a family. After an error it ends.
pub struct Metrics<'a> {
    fields: Fields<'a>,
    done: bool,
    /// Whether a field of the family's own (name, help, type) was passed over.
    family_field: bool,
}

impl<'a> Metrics<'a> {
    /// Whether a field of the family's own (its name, help or type, valid or not) was passed
    /// over among the series read so far.
    pub fn read_family_field(&self) -> bool {
        self.family_field
    }

    /// The next series as [`Iterator::next`] reads it, for a caller that reads its labels
    /// first: the run of labels it starts with is then walked once, not passed over to find the
    /// value and read again (see [`Series`]).
    #[inline(always)]
    pub fn next_series(&mut self) -> Option<Result<Series<'a>, DecodeError>> {
        if self.done {
            return None;
        }
        // As in `Iterator::next`.
        if let Some(message) = self.fields.next_bytes(METRIC_KEY) {
            return Some(Ok(Series::new(message)));
        }
        self.next_by_fields(|message| Ok(Series::new(message)))
    }

    /// The next series through the general field reader (any layout), read by `read`; a field
    /// of the family's own among the series is noted ([`Metrics::read_family_field`]).
    fn next_by_fields<T>(
        &mut self,
        read: impl FnOnce(&'a [u8]) -> Result<T, Bad>,
    ) -> Option<Result<T, DecodeError>> {
        loop {
            let item = match self.fields.next() {
                Ok(None) => None,
                Ok(Some((METRIC_FIELD, wire))) => Some(wire.bytes().and_then(read)),
                Ok(Some((tag, _))) => {
                    self.family_field |= tag < METRIC_FIELD;
                    continue;
                }
                Err(bad) => Some(Err(bad)),
            };
            self.done = !matches!(item, Some(Ok(_)));
            return item.map(|r| r.map_err(DecodeError::from));
        }
    }
}

/// A series whose labels are read first: [`Series::next_label`] gives the labels of the run it
/// starts with (written the usual way), then [`Series::finish`] reads the rest into its view.
pub struct Series<'a> {
    message: &'a [u8],
    fields: Fields<'a>,
    /// Whether `finish` passed over labels of the run that `next_label` did not give.
    skipped: bool,
}

impl<'a> Series<'a> {
    fn new(message: &'a [u8]) -> Series<'a> {
        Series {
            message,
            fields: Fields::new(message, METRIC_DEPTH),
            skipped: false,
        }
    }

    /// The next label of the run the series starts with, still encoded (read it with
    /// [`label_unchecked_name`]); `None` where the run ends (at the first field that is not a
    /// label written the usual way, which [`Series::finish`] reads).
    #[inline(always)]
    pub fn next_label(&mut self) -> Option<&'a [u8]> {
        self.fields.next_short(LABEL_KEY)
    }

    /// The whole encoded series: for a caller that compares the label run it starts with to a
    /// series read before (see [`Series::pass_labels`]).
    #[inline(always)]
    pub fn message(&self) -> &'a [u8] {
        self.message
    }

    /// Passes over the first `bytes` bytes of the series, before any of it is read, as labels of
    /// the run it starts with: for a caller that found them byte for byte the same as whole label
    /// fields of a series it read (and checked) before, which it need not read again.
    /// [`Series::next_label`] goes on from there, and [`Series::finish`] counts them in the run.
    /// `bytes` past the message pass over all of it.
    #[inline(always)]
    pub fn pass_labels(&mut self, bytes: usize) {
        self.fields = Fields::new(self.message.get(bytes..).unwrap_or_default(), METRIC_DEPTH);
    }

    /// The series read whole, as [`Iterator::next`] of [`Metrics`] reads it, and whether its
    /// labels are exactly those [`Series::next_label`] gave (none left in the run, none after
    /// it): when not, read them from the view.
    #[inline(always)]
    pub fn finish(mut self) -> Result<(MetricView<'a>, bool), DecodeError> {
        while self.fields.next_short(LABEL_KEY).is_some() {
            self.skipped = true;
        }
        let run = self.message.len() - self.fields.remaining();
        let view = parse_metric_after_labels(self.message, self.fields, ALL_KINDS)?;
        let given = !self.skipped && view.labels.len() == run;
        Ok((view, given))
    }
}

impl<'a> Iterator for Metrics<'a> {
    type Item = Result<MetricView<'a>, DecodeError>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        // A series written the usual way (a one-byte key, a length of one or two bytes), without
        // the general field reader.
        if let Some(metric) = self.fields.next_bytes(METRIC_KEY) {
            let item = parse_metric_inline(metric, ALL_KINDS).map_err(DecodeError::from);
            self.done = item.is_err();
            return Some(item);
        }
        self.next_by_fields(|message| parse_metric(message, ALL_KINDS))
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
    /// The part of `message` that holds every label field: the run of labels it starts with when
    /// no label comes after its other fields (as every encoder writes a series), else all of it.
    /// The labels' readers walk only this, not the value and timestamp again.
    pub(crate) labels: &'a [u8],
}

impl<'a> MetricView<'a> {
    /// The series' labels in wire order, as `(name, value)`; an absent name or value reads as "".
    pub fn labels(&self) -> Labels<'a> {
        Labels {
            fields: Fields::new(self.labels, METRIC_DEPTH),
            done: false,
        }
    }

    /// The series' label messages in wire order, each still encoded: read one with
    /// [`label_unchecked_name`]. For a caller that can pass over a label it has read before (the
    /// same bytes read the same), as the upload's check does for the labels a series shares with
    /// the one before it.
    pub fn label_messages(&self) -> LabelMessages<'a> {
        LabelMessages {
            fields: Fields::new(self.labels, METRIC_DEPTH),
            done: false,
        }
    }

    /// As [`MetricView::labels`], as UTF-8-checked bytes (for the text writer).
    pub(crate) fn label_bytes(&self) -> LabelBytes<'a> {
        LabelBytes {
            fields: Fields::new(self.labels, METRIC_DEPTH),
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

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        // Encoders write a series' labels first, each short: read those without the general
        // field reader (the rest, and anything else, goes through it).
        if let Some(label) = self.fields.next_short(LABEL_KEY) {
            let item = parse_label(label).map_err(DecodeError::from);
            self.done = item.is_err();
            return Some(item);
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

/// An iterator over the encoded label messages of a series (see [`MetricView::label_messages`]).
/// After an error it ends.
pub struct LabelMessages<'a> {
    fields: Fields<'a>,
    done: bool,
}

impl<'a> Iterator for LabelMessages<'a> {
    type Item = Result<&'a [u8], DecodeError>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        // As in [`Labels::next`].
        if let Some(label) = self.fields.next_short(LABEL_KEY) {
            return Some(Ok(label));
        }
        let item = loop {
            match self.fields.next() {
                Ok(None) => return None,
                Ok(Some((LABEL_FIELD, wire))) => break wire.bytes(),
                Ok(Some(_)) => continue,
                Err(bad) => break Err(bad),
            }
        };
        self.done = item.is_err();
        Some(item.map_err(DecodeError::from))
    }
}

/// Reads one label message (from [`MetricView::label_messages`]) as `(name, value)`, as
/// [`MetricView::labels`] reads it, except that the name's bytes are not checked for UTF-8 when
/// the label is written the usual way (one name field and one value field, each short): for a
/// caller that holds every name to the label-name rule, which admits only ASCII, so that a name it
/// accepts is UTF-8 and the check would be paid twice. Written any other way, every name field
/// is checked, as prost checks each occurrence. A caller that accepts other names must check them.
#[inline(always)]
pub fn label_unchecked_name(message: &[u8]) -> Result<(&[u8], &str), DecodeError> {
    Ok(parse_label_unchecked_name(message)?)
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
        // As in [`Labels::next`].
        if let Some(label) = self.fields.next_short(LABEL_KEY) {
            let item = parse_label_bytes(label).map_err(DecodeError::from);
            self.done = item.is_err();
            return Some(item);
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

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.items.next(|item| {
            // As every encoder writes a quantile: both doubles, in order.
            if let [0x09, ref quantile @ .., 0x11, _, _, _, _, _, _, _, _] = *item {
                if let (Ok(quantile), Some(value)) =
                    (<[u8; 8]>::try_from(quantile), item.last_chunk::<8>())
                {
                    return Ok((f64::from_le_bytes(quantile), f64::from_le_bytes(*value)));
                }
            }
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

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.items.next(|item| {
            // As every encoder writes a bucket: the count's varint, then the bound's double.
            if let [0x08, ref rest @ ..] = *item {
                if let Some((count, [0x11, bound @ ..])) = short_varint(rest) {
                    if let Ok(bound) = <[u8; 8]>::try_from(bound) {
                        return Ok((f64::from_le_bytes(bound), count));
                    }
                }
            }
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

// ---------------------------------------------------------------------------------------------
// Field numbers (metrics.proto) and prost's recursion budget at each level.

pub(super) const METRIC_FIELD: u32 = 4;
pub(super) const METRIC_KEY: u8 = (4 << 3) | 2;
pub(super) const LABEL_FIELD: u32 = 1;
/// A label field's key when it fits one byte: field 1, length-delimited.
pub(super) const LABEL_KEY: u8 = (1 << 3) | 2;
pub(super) const GAUGE_FIELD: u32 = 2;
pub(super) const COUNTER_FIELD: u32 = 3;
pub(super) const SUMMARY_FIELD: u32 = 4;
pub(super) const UNTYPED_FIELD: u32 = 5;
pub(super) const TIMESTAMP_FIELD: u32 = 6;
pub(super) const HISTOGRAM_FIELD: u32 = 7;
pub(super) const ITEM_FIELD: u32 = 3;

// Prost decodes a family with a budget of 100 nested messages or groups: the family's own fields
// are read at 100, a metric's at 99, a label's or value's at 98, a quantile's or bucket's at 97.
// Only unknown groups can nest deeper, and they must stop where prost stops.
pub(super) const FAMILY_DEPTH: u32 = 100;
pub(super) const METRIC_DEPTH: u32 = 99;
pub(super) const VALUE_DEPTH: u32 = 98;
pub(super) const ITEM_DEPTH: u32 = 97;

#[cfg(test)]
mod tests;

/// One `MetricFamily.metric` field at the start of `bytes` with a length of one or two bytes (as
/// every encoder writes a series of under 16 KiB): the series' message and what follows it.
/// `None` for anything else. The fast readers of stored families (`/federate`'s text, remote
/// write's egress) take series this way and read anything else with [`families`].
#[inline(always)]
pub fn series_field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, tail) = match *bytes {
        [0x22, len, ref tail @ ..] if len < 0x80 => (usize::from(len), tail),
        [0x22, low, high, ref tail @ ..] if low >= 0x80 && high < 0x80 => {
            (usize::from(low & 0x7f) | usize::from(high) << 7, tail)
        }
        _ => return None,
    };
    tail.split_at_checked(len)
}

/// A varint of at most nine bytes (which cannot overflow 64 bits) at the start of `bytes`: its
/// value and what follows it. `None` for a longer one, or one cut short.
#[inline(always)]
pub fn short_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().take(9).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some((value, bytes.get(i + 1..)?));
        }
    }
    None
}
