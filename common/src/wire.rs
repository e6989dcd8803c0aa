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

use crate::delimited::{DecodeError, Limits};
use crate::model::MetricType;

/// Iterates the families of a protobuf-delimited body, enforcing `limits` (message size, total size,
/// family count; series are counted by the caller through [`FamilyView::metrics`] or with
/// [`count_series`]).
pub fn families<'a>(body: &'a [u8], limits: &Limits) -> Families<'a> {
    let _ = (body, limits);
    todo!()
}

/// Validates the framing and every message of `body` and returns the number of families and series,
/// enforcing every limit (series included). Cheap: nothing is allocated.
pub fn count_series(body: &[u8], limits: &Limits) -> Result<(usize, usize), DecodeError> {
    let _ = (body, limits);
    todo!()
}

/// An iterator over the families of a body (see [`families`]).
pub struct Families<'a> {
    _body: &'a [u8],
}

impl<'a> Iterator for Families<'a> {
    type Item = Result<FamilyView<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        todo!()
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
    /// The family's type; absent or unknown reads as untyped (as [`crate::model::MetricFamily::metric_type`]).
    pub fn metric_type(&self) -> MetricType {
        self.raw_type
            .and_then(|t| MetricType::try_from(t).ok())
            .unwrap_or(MetricType::Untyped)
    }

    /// The family's series, in order.
    pub fn metrics(&self) -> Metrics<'a> {
        todo!()
    }
}

/// An iterator over the series of a family.
pub struct Metrics<'a> {
    _message: &'a [u8],
}

impl<'a> Iterator for Metrics<'a> {
    type Item = Result<MetricView<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        todo!()
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
        todo!()
    }
}

/// The value of a series. When a message sets several value fields (invalid, but possible on the
/// wire), the one matching the family type should be used: [`MetricView::value`] holds the last
/// value field seen, and [`Value::Several`] says there was more than one.
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

/// An iterator over the labels of a series.
pub struct Labels<'a> {
    _message: &'a [u8],
}

impl<'a> Iterator for Labels<'a> {
    type Item = Result<(&'a str, &'a str), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        todo!()
    }
}

/// A summary, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct SummaryView<'a> {
    /// `sample_count` (0 when absent).
    pub sample_count: u64,
    /// `sample_sum` (0 when absent).
    pub sample_sum: f64,
    /// The encoded `Summary` message.
    pub message: &'a [u8],
}

impl<'a> SummaryView<'a> {
    /// The quantiles as `(quantile, value)`.
    pub fn quantiles(&self) -> impl Iterator<Item = Result<(f64, f64), DecodeError>> + 'a {
        std::iter::empty()
    }
}

/// A classic histogram, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct HistogramView<'a> {
    /// `sample_count` (0 when absent).
    pub sample_count: u64,
    /// `sample_sum` (0 when absent).
    pub sample_sum: f64,
    /// The encoded `Histogram` message.
    pub message: &'a [u8],
}

impl<'a> HistogramView<'a> {
    /// The buckets as `(upper_bound, cumulative_count)`.
    pub fn buckets(&self) -> impl Iterator<Item = Result<(f64, u64), DecodeError>> + 'a {
        std::iter::empty()
    }
}
