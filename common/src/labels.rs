//! Label and metric name rules, and the checks every stored series passes.

use crate::model::Metric;
use std::fmt;

/// Longest metric or label name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest label value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 2048;
/// Most labels one series may carry.
pub const MAX_LABELS: usize = 64;

/// What is wrong with a series' name or labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelError {
    /// The metric name is empty or has a character outside `[a-zA-Z0-9_:]` (or starts with a digit).
    InvalidMetricName(String),
    /// A label name is empty or has a character outside `[a-zA-Z0-9_]` (or starts with a digit).
    InvalidLabelName(String),
    /// A name is longer than [`MAX_NAME_BYTES`].
    NameTooLong(String),
    /// The value of the named label is longer than [`MAX_VALUE_BYTES`].
    ValueTooLong(String),
    /// The same label name appears twice in one series.
    DuplicateLabel(String),
    /// More than [`MAX_LABELS`] labels.
    TooManyLabels(usize),
    /// A label pair has no value (the name is given).
    MissingValue(String),
}

impl fmt::Display for LabelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl std::error::Error for LabelError {}

/// True for a valid metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn is_valid_metric_name(name: &str) -> bool {
    todo!()
}

/// True for a valid label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn is_valid_label_name(name: &str) -> bool {
    todo!()
}

/// Checks a metric name: valid characters and length.
pub fn check_metric_name(name: &str) -> Result<(), LabelError> {
    todo!()
}

/// Checks every label of a series: valid names, values present, lengths, no duplicates, count.
/// (Values are Rust strings, so they are valid UTF-8 already.)
pub fn check_series_labels(metric: &Metric) -> Result<(), LabelError> {
    todo!()
}
