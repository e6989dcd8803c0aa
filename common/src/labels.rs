//! Label and metric name rules, and the checks every stored series passes.

use crate::model::Metric;
use std::collections::HashSet;
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

/// At most this many characters of an offending name are echoed, so an error line stays short even
/// when the name is the problem because it is huge.
const ECHO_CHARS: usize = 64;

/// The name as it appears in an error: quoted, cut short when long.
struct Echo<'a>(&'a str);

impl fmt::Display for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(ECHO_CHARS) {
            Some((cut, _)) => write!(f, "{:?}...", &self.0[..cut]),
            None => write!(f, "{:?}", self.0),
        }
    }
}

impl fmt::Display for LabelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelError::InvalidMetricName(n) => write!(f, "metric name {} is invalid", Echo(n)),
            LabelError::InvalidLabelName(n) => write!(f, "label name {} is invalid", Echo(n)),
            LabelError::NameTooLong(n) => write!(
                f,
                "name {} is longer than {MAX_NAME_BYTES} bytes ({} bytes)",
                Echo(n),
                n.len()
            ),
            LabelError::ValueTooLong(n) => write!(
                f,
                "value of label {} is longer than {MAX_VALUE_BYTES} bytes",
                Echo(n)
            ),
            LabelError::DuplicateLabel(n) => write!(f, "label {} appears more than once", Echo(n)),
            LabelError::TooManyLabels(count) => {
                write!(f, "series has {count} labels, more than {MAX_LABELS}")
            }
            LabelError::MissingValue(n) => write!(f, "label {} has no value", Echo(n)),
        }
    }
}

impl std::error::Error for LabelError {}

/// The classes of each byte a name may hold, one bit each: a name's validity is then one table
/// load and one AND per byte, with no branch per byte (this runs for every label of every upload).
const LABEL_FIRST: u8 = 1;
const LABEL_REST: u8 = 2;
const METRIC_FIRST: u8 = 4;
const METRIC_REST: u8 = 8;

static NAME_CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        let c = b as u8;
        let alpha = c.is_ascii_alphabetic();
        let digit = c.is_ascii_digit();
        let mut class = 0;
        if alpha || c == b'_' {
            class |= LABEL_FIRST | LABEL_REST | METRIC_FIRST | METRIC_REST;
        }
        if digit {
            class |= LABEL_REST | METRIC_REST;
        }
        if c == b':' {
            class |= METRIC_FIRST | METRIC_REST;
        }
        table[b] = class;
        b += 1;
    }
    table
};

/// True when `name` is not empty, its first byte has class `first` and every later byte `rest`.
#[inline(always)]
fn name_in_classes(name: &[u8], first: u8, rest: u8) -> bool {
    let Some((&head, tail)) = name.split_first() else {
        return false;
    };
    // AND over every byte rather than a search for the first bad one: names are short, and a
    // loop without an early exit has no branch to mispredict.
    let classes = tail
        .iter()
        .fold(rest, |acc, &b| acc & NAME_CLASS[usize::from(b)]);
    classes != 0 && NAME_CLASS[usize::from(head)] & first != 0
}

/// True for a valid metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn is_valid_metric_name(name: &str) -> bool {
    name_in_classes(name.as_bytes(), METRIC_FIRST, METRIC_REST)
}

/// True for a valid label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
#[inline]
pub fn is_valid_label_name(name: &str) -> bool {
    is_valid_label_name_bytes(name.as_bytes())
}

/// [`is_valid_label_name`] on bytes: a name it accepts is ASCII, so it needs no UTF-8 check.
#[inline]
pub fn is_valid_label_name_bytes(name: &[u8]) -> bool {
    name_in_classes(name, LABEL_FIRST, LABEL_REST)
}

/// Checks a metric name: valid characters and length.
pub fn check_metric_name(name: &str) -> Result<(), LabelError> {
    // Length first: a huge name is reported as too long, whatever its characters.
    if name.len() > MAX_NAME_BYTES {
        return Err(LabelError::NameTooLong(name.to_string()));
    }
    if !is_valid_metric_name(name) {
        return Err(LabelError::InvalidMetricName(name.to_string()));
    }
    Ok(())
}

/// Checks every label of a series: valid names, values present, lengths, no duplicates, count.
/// (Values are Rust strings, so they are valid UTF-8 already.)
pub fn check_series_labels(metric: &Metric) -> Result<(), LabelError> {
    if metric.label.len() > MAX_LABELS {
        return Err(LabelError::TooManyLabels(metric.label.len()));
    }
    let mut seen = HashSet::with_capacity(metric.label.len());
    for pair in &metric.label {
        let name = pair.name.as_deref().unwrap_or("");
        if name.len() > MAX_NAME_BYTES {
            return Err(LabelError::NameTooLong(name.to_string()));
        }
        if !is_valid_label_name(name) {
            return Err(LabelError::InvalidLabelName(name.to_string()));
        }
        let value = match pair.value.as_deref() {
            Some(v) => v,
            None => return Err(LabelError::MissingValue(name.to_string())),
        };
        if value.len() > MAX_VALUE_BYTES {
            return Err(LabelError::ValueTooLong(name.to_string()));
        }
        if !seen.insert(name) {
            return Err(LabelError::DuplicateLabel(name.to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LabelPair;

    fn pair(name: &str, value: &str) -> LabelPair {
        LabelPair {
            name: Some(name.to_string()),
            value: Some(value.to_string()),
        }
    }

    fn series(labels: Vec<LabelPair>) -> Metric {
        Metric {
            label: labels,
            ..Default::default()
        }
    }

    #[test]
    fn metric_names() {
        for good in ["up", "_x", ":x", "a:b_c9", "ALERTS", "job:rate5m:sum", "a1"] {
            assert!(is_valid_metric_name(good), "{good}");
            assert_eq!(check_metric_name(good), Ok(()));
        }
        for bad in ["", "1abc", "a-b", "a b", "a.b", "é", "a{", "a\"b"] {
            assert!(!is_valid_metric_name(bad), "{bad}");
            assert_eq!(
                check_metric_name(bad),
                Err(LabelError::InvalidMetricName(bad.to_string()))
            );
        }
    }

    /// The rules as the format states them, byte by byte: the class table must agree with them on
    /// every byte in every position.
    fn label_name_by_rule(name: &[u8]) -> bool {
        match name.split_first() {
            Some((&b, rest)) => {
                (b.is_ascii_alphabetic() || b == b'_')
                    && rest.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_')
            }
            None => false,
        }
    }

    fn metric_name_by_rule(name: &[u8]) -> bool {
        match name.split_first() {
            Some((&b, rest)) => {
                (b.is_ascii_alphabetic() || b == b'_' || b == b':')
                    && rest
                        .iter()
                        .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
            }
            None => false,
        }
    }

    #[test]
    fn the_class_table_agrees_with_the_rules_on_every_byte() {
        let mut checked = 0;
        for first in 0..=255u8 {
            for second in 0..=255u8 {
                for name in [vec![first], vec![first, second], vec![b'a', first, second]] {
                    assert_eq!(
                        is_valid_label_name_bytes(&name),
                        label_name_by_rule(&name),
                        "{name:?}"
                    );
                    if let Ok(text) = std::str::from_utf8(&name) {
                        assert_eq!(is_valid_metric_name(text), metric_name_by_rule(&name));
                        assert_eq!(is_valid_label_name(text), label_name_by_rule(&name));
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 3 * 128 * 128, "{checked}");
        assert!(!is_valid_label_name_bytes(b""));
    }

    #[test]
    fn label_names() {
        for good in ["a", "_id", "__name__", "job", "A9_z"] {
            assert!(is_valid_label_name(good), "{good}");
        }
        for bad in ["", "1abc", "a:b", ":a", "a-b", "ä", "a b"] {
            assert!(!is_valid_label_name(bad), "{bad}");
        }
    }

    #[test]
    fn name_length_limit() {
        let max = "a".repeat(MAX_NAME_BYTES);
        let over = "a".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(check_metric_name(&max), Ok(()));
        assert_eq!(
            check_metric_name(&over),
            Err(LabelError::NameTooLong(over.clone()))
        );
        assert_eq!(check_series_labels(&series(vec![pair(&max, "v")])), Ok(()));
        assert_eq!(
            check_series_labels(&series(vec![pair(&over, "v")])),
            Err(LabelError::NameTooLong(over))
        );
    }

    #[test]
    fn value_length_limit() {
        let max = "v".repeat(MAX_VALUE_BYTES);
        let over = "v".repeat(MAX_VALUE_BYTES + 1);
        assert_eq!(check_series_labels(&series(vec![pair("a", &max)])), Ok(()));
        assert_eq!(
            check_series_labels(&series(vec![pair("a", &over)])),
            Err(LabelError::ValueTooLong("a".to_string()))
        );
    }

    #[test]
    fn valid_series_passes() {
        let m = series(vec![pair("job", "node"), pair("_id", "c1"), pair("e", "")]);
        assert_eq!(check_series_labels(&m), Ok(()));
        assert_eq!(check_series_labels(&series(vec![])), Ok(()));
    }

    #[test]
    fn invalid_label_name_is_named() {
        let m = series(vec![pair("job", "x"), pair("1abc", "y")]);
        let err = check_series_labels(&m).unwrap_err();
        assert_eq!(err, LabelError::InvalidLabelName("1abc".to_string()));
        assert_eq!(err.to_string(), "label name \"1abc\" is invalid");
    }

    #[test]
    fn missing_name_is_invalid() {
        let m = series(vec![LabelPair {
            name: None,
            value: Some("v".to_string()),
        }]);
        assert_eq!(
            check_series_labels(&m),
            Err(LabelError::InvalidLabelName(String::new()))
        );
    }

    #[test]
    fn missing_value() {
        let m = series(vec![LabelPair {
            name: Some("job".to_string()),
            value: None,
        }]);
        let err = check_series_labels(&m).unwrap_err();
        assert_eq!(err, LabelError::MissingValue("job".to_string()));
        assert_eq!(err.to_string(), "label \"job\" has no value");
    }

    #[test]
    fn duplicates() {
        let m = series(vec![pair("a", "1"), pair("b", "2"), pair("a", "3")]);
        let err = check_series_labels(&m).unwrap_err();
        assert_eq!(err, LabelError::DuplicateLabel("a".to_string()));
        assert_eq!(err.to_string(), "label \"a\" appears more than once");
    }

    #[test]
    fn label_count_limit() {
        let labels = |n: usize| (0..n).map(|i| pair(&format!("l{i}"), "v")).collect();
        assert_eq!(check_series_labels(&series(labels(MAX_LABELS))), Ok(()));
        let err = check_series_labels(&series(labels(MAX_LABELS + 1))).unwrap_err();
        assert_eq!(err, LabelError::TooManyLabels(MAX_LABELS + 1));
        assert_eq!(err.to_string(), "series has 65 labels, more than 64");
    }

    #[test]
    fn display_is_one_short_line() {
        let long = "x".repeat(1000);
        let errors = [
            LabelError::InvalidMetricName(long.clone()),
            LabelError::InvalidLabelName("a\nb".to_string()),
            LabelError::NameTooLong(long.clone()),
            LabelError::ValueTooLong(long),
        ];
        for e in errors {
            let s = e.to_string();
            assert!(!s.contains('\n'), "{s}");
            assert!(s.len() < 150, "{s}");
        }
        assert_eq!(
            LabelError::InvalidMetricName("a-b".to_string()).to_string(),
            "metric name \"a-b\" is invalid"
        );
        assert_eq!(
            LabelError::ValueTooLong("job".to_string()).to_string(),
            "value of label \"job\" is longer than 2048 bytes"
        );
    }
}
