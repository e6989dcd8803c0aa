//! Series selectors: `name{a="b",c!="d",e=~"re",f!~"re"}`, as in PromQL and `/federate?match[]=`.
//!
//! Semantics follow Prometheus: a missing label matches as the empty string, and regular expressions
//! are fully anchored.

use crate::model::LabelPair;
use std::fmt;
use std::str::FromStr;

/// How a matcher compares a label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchOp {
    /// `=`
    Equal,
    /// `!=`
    NotEqual,
    /// `=~`
    RegexMatch,
    /// `!~`
    RegexNoMatch,
}

/// One label matcher.
#[derive(Clone, Debug)]
pub struct Matcher {
    /// The label name (`__name__` for the metric name).
    pub name: String,
    /// The comparison.
    pub op: MatchOp,
    /// The value or the regular expression, unescaped.
    pub value: String,
    regex: Option<regex::Regex>,
}

/// A series selector: matchers that must all match.
#[derive(Clone, Debug)]
pub struct Selector {
    /// The matchers; a leading metric name becomes a `__name__` equality matcher.
    pub matchers: Vec<Matcher>,
    /// The text the selector was parsed from, kept to send on as `match[]`.
    pub source: String,
}

/// Why a selector could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError {
    /// The selector text.
    pub selector: String,
    /// What was wrong.
    pub reason: String,
}

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl std::error::Error for SelectorError {}

impl Matcher {
    /// A matcher; fails when `op` is a regex one and `value` is not a valid regular expression.
    pub fn new(name: &str, op: MatchOp, value: &str) -> Result<Matcher, SelectorError> {
        todo!()
    }

    /// Whether a label value (`None` when the series lacks the label) satisfies this matcher.
    pub fn matches(&self, value: Option<&str>) -> bool {
        todo!()
    }
}

impl Selector {
    /// Parses a selector. Like Prometheus, it refuses a selector whose matchers all match the empty
    /// string (it would select every series).
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        todo!()
    }

    /// Whether the series `metric_name{labels}` is selected.
    pub fn matches(&self, metric_name: &str, labels: &[LabelPair]) -> bool {
        todo!()
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Parses a selector file: one selector per line; blank lines and lines starting with `#` are skipped.
pub fn parse_file(contents: &str) -> Result<Vec<Selector>, SelectorError> {
    todo!()
}

/// Whether any of `selectors` selects the series.
pub fn any_matches(selectors: &[Selector], metric_name: &str, labels: &[LabelPair]) -> bool {
    selectors.iter().any(|s| s.matches(metric_name, labels))
}
