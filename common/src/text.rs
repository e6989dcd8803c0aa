//! The Prometheus text exposition format, version 0.0.4: parser and encoder.
//!
//! The parser groups `_bucket`/`_sum`/`_count` and quantile lines into histogram and summary
//! series the way the Go `expfmt` parser does, so a text body and the protobuf body of the same
//! metrics decode to the same families.

use crate::delimited::DecodeError;
use crate::labels;
use crate::model::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType, Quantile,
    Summary, Untyped,
};
use crate::wire::{FamilyView, MetricView, Value};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, Write};

/// Caps on what one parsed body may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most families.
    pub max_families: usize,
    /// Most series over all families.
    pub max_series: usize,
    /// Longest line, in bytes.
    pub max_line_bytes: usize,
}

impl Default for Limits {
    /// 10,000 families, 100,000 series, 64 KiB lines.
    fn default() -> Self {
        Limits {
            max_families: 10_000,
            max_series: 100_000,
            max_line_bytes: 64 << 10,
        }
    }
}

/// Why a text body could not be parsed: the 1-based line and what was wrong there.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// The 1-based line number (0 for errors about the whole body).
    pub line: usize,
    /// What was wrong, in a few words.
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.reason)
        } else {
            write!(f, "line {}: {}", self.line, self.reason)
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses a text exposition body into families, enforcing `limits`. The body must be UTF-8.
pub fn parse(body: &[u8], limits: &Limits) -> Result<Vec<MetricFamily>, ParseError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        let valid = body.get(..e.valid_up_to()).unwrap_or_default();
        ParseError {
            line: 1 + valid.iter().filter(|&&b| b == b'\n').count(),
            reason: "invalid UTF-8".to_string(),
        }
    })?;
    let mut parser = Parser {
        limits,
        families: Vec::new(),
        by_name: HashMap::new(),
        grouped: HashMap::new(),
        series: 0,
    };
    for (i, line) in text.split('\n').enumerate() {
        let number = i + 1;
        if line.len() > limits.max_line_bytes {
            return Err(ParseError {
                line: number,
                reason: format!("line longer than {} bytes", limits.max_line_bytes),
            });
        }
        parser.line(line).map_err(|reason| ParseError {
            line: number,
            reason,
        })?;
    }
    // Like Go's parser: HELP or TYPE lines without samples leave no family behind.
    let mut families = parser.families;
    families.retain(|f| !f.metric.is_empty());
    Ok(families)
}

/// The state of one parse: families in order of first appearance, and indexes into them.
struct Parser<'a> {
    limits: &'a Limits,
    families: Vec<MetricFamily>,
    by_name: HashMap<String, usize>,
    /// Histogram and summary series by family and label set (sorted, without `le`/`quantile`), so
    /// their bucket, quantile, sum and count lines land in one `Metric`.
    grouped: HashMap<(usize, Vec<(String, String)>), usize>,
    series: usize,
}

/// Which part of a histogram or summary a sample line carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Value,
    Sum,
    Count,
}

impl Parser<'_> {
    fn line(&mut self, line: &str) -> Result<(), String> {
        let mut c = Cursor::new(line);
        c.skip_blanks();
        match c.peek() {
            None => Ok(()),
            Some(b'#') => {
                c.bump();
                self.comment(c)
            }
            Some(_) => self.sample(c),
        }
    }

    /// `# HELP name text`, `# TYPE name type`; any other comment is ignored.
    fn comment(&mut self, mut c: Cursor<'_>) -> Result<(), String> {
        c.skip_blanks();
        let keyword = c.token();
        if keyword != "HELP" && keyword != "TYPE" {
            return Ok(());
        }
        c.skip_blanks();
        let name = c.metric_name();
        if name.is_empty() {
            return Err("invalid metric name in comment".to_string());
        }
        let (index, _) = self.family_for(name)?;
        if c.at_end() {
            return Ok(());
        }
        if !c.skip_blanks() {
            return Err("invalid metric name in comment".to_string());
        }
        if c.at_end() {
            return Ok(());
        }
        let family = self
            .families
            .get_mut(index)
            .ok_or_else(|| "internal: family index".to_string())?;
        if keyword == "HELP" {
            if family.help.is_some() {
                return Err(format!("second HELP line for {}", quoted(name)));
            }
            family.help = Some(unescape_help(c.rest())?);
            return Ok(());
        }
        if family.r#type.is_some() {
            return Err(format!(
                "second TYPE line for {}, or TYPE after samples",
                quoted(name)
            ));
        }
        let type_name = c.rest().trim_end_matches([' ', '\t']);
        let metric_type = match type_name.to_ascii_lowercase().as_str() {
            "counter" => MetricType::Counter,
            "gauge" => MetricType::Gauge,
            "histogram" => MetricType::Histogram,
            "summary" => MetricType::Summary,
            "untyped" => MetricType::Untyped,
            _ => return Err(format!("unknown metric type {}", quoted(type_name))),
        };
        family.r#type = Some(metric_type as i32);
        Ok(())
    }

    /// `name{label="value",...} value [timestamp]`.
    fn sample(&mut self, mut c: Cursor<'_>) -> Result<(), String> {
        let name = c.metric_name();
        if name.is_empty() {
            return Err("invalid metric name".to_string());
        }
        let (index, part) = self.family_for(name)?;
        let family = self
            .families
            .get_mut(index)
            .ok_or_else(|| "internal: family index".to_string())?;
        let metric_type = match family.r#type {
            Some(t) => MetricType::try_from(t).unwrap_or(MetricType::Untyped),
            None => {
                family.r#type = Some(MetricType::Untyped as i32);
                MetricType::Untyped
            }
        };
        // The label that carries a bucket bound or quantile rank, and is not a series label.
        let special = match metric_type {
            MetricType::Histogram => Some("le"),
            MetricType::Summary => Some("quantile"),
            _ => None,
        };
        c.skip_blanks();
        let mut labels = Vec::new();
        let mut special_value: Option<f64> = None;
        if c.peek() == Some(b'{') {
            c.bump();
            let family_name = family.name.as_deref().unwrap_or(name);
            parse_labels(
                &mut c,
                family_name,
                &mut labels,
                special,
                &mut special_value,
            )?;
        }
        c.skip_blanks();
        let token = c.token();
        let value = parse_float(token)
            .ok_or_else(|| format!("expected float as value, got {}", quoted(token)))?;
        c.skip_blanks();
        let timestamp = if c.at_end() {
            None
        } else {
            let token = c.token();
            let ts = token
                .parse::<i64>()
                .map_err(|_| format!("expected integer as timestamp, got {}", quoted(token)))?;
            c.skip_blanks();
            if !c.at_end() {
                return Err(format!(
                    "spurious string after timestamp: {}",
                    quoted(c.rest())
                ));
            }
            Some(ts)
        };

        let metric = match special {
            None => {
                let metric = Metric {
                    label: labels,
                    timestamp_ms: timestamp,
                    ..Default::default()
                };
                self.push_metric(index, metric)?
            }
            Some(_) => {
                let mut key: Vec<(String, String)> = labels
                    .iter()
                    .map(|l| {
                        (
                            l.name.clone().unwrap_or_default(),
                            l.value.clone().unwrap_or_default(),
                        )
                    })
                    .collect();
                key.sort_unstable();
                let key = (index, key);
                match self.grouped.get(&key).copied() {
                    Some(m) => self
                        .families
                        .get_mut(index)
                        .and_then(|f| f.metric.get_mut(m))
                        .ok_or_else(|| "internal: series index".to_string())?,
                    None => {
                        let m = self.families.get(index).map_or(0, |f| f.metric.len());
                        self.grouped.insert(key, m);
                        let metric = Metric {
                            label: labels,
                            ..Default::default()
                        };
                        self.push_metric(index, metric)?
                    }
                }
            }
        };
        match metric_type {
            MetricType::Counter => metric.counter = Some(Counter { value: Some(value) }),
            MetricType::Gauge => metric.gauge = Some(Gauge { value: Some(value) }),
            MetricType::Summary => {
                metric.timestamp_ms = timestamp.or(metric.timestamp_ms);
                let summary = metric.summary.get_or_insert_with(Summary::default);
                match (part, special_value) {
                    (Part::Count, _) => summary.sample_count = Some(value as u64),
                    (Part::Sum, _) => summary.sample_sum = Some(value),
                    (Part::Value, Some(q)) => summary.quantile.push(Quantile {
                        quantile: Some(q),
                        value: Some(value),
                    }),
                    (Part::Value, None) => {}
                }
            }
            MetricType::Histogram => {
                metric.timestamp_ms = timestamp.or(metric.timestamp_ms);
                let histogram = metric.histogram.get_or_insert_with(Histogram::default);
                match (part, special_value) {
                    (Part::Count, _) => histogram.sample_count = Some(value as u64),
                    (Part::Sum, _) => histogram.sample_sum = Some(value),
                    (Part::Value, Some(le)) => histogram.bucket.push(Bucket {
                        cumulative_count: Some(value as u64),
                        upper_bound: Some(le),
                    }),
                    (Part::Value, None) => {}
                }
            }
            _ => metric.untyped = Some(Untyped { value: Some(value) }),
        }
        Ok(())
    }

    fn push_metric(&mut self, index: usize, metric: Metric) -> Result<&mut Metric, String> {
        if self.series >= self.limits.max_series {
            return Err(format!("more than {} series", self.limits.max_series));
        }
        self.series += 1;
        let family = self
            .families
            .get_mut(index)
            .ok_or_else(|| "internal: family index".to_string())?;
        family.metric.push(metric);
        family
            .metric
            .last_mut()
            .ok_or_else(|| "internal: series index".to_string())
    }

    /// The family a metric name belongs to, created when new, as Go's `setOrCreateCurrentMF` does:
    /// the exact name first, then `x_sum`/`x_count` of a summary `x`, then `x_bucket`/`x_sum`/
    /// `x_count` of a histogram `x`.
    fn family_for(&mut self, name: &str) -> Result<(usize, Part), String> {
        if let Some(&i) = self.by_name.get(name) {
            return Ok((i, Part::Value));
        }
        let typed = |families: &[MetricFamily], by_name: &HashMap<String, usize>, base: &str| {
            by_name.get(base).and_then(|&i| {
                families
                    .get(i)
                    .and_then(|f| f.r#type)
                    .and_then(|t| MetricType::try_from(t).ok())
                    .map(|t| (i, t))
            })
        };
        let suffixed = [
            ("_sum", Part::Sum, MetricType::Summary),
            ("_count", Part::Count, MetricType::Summary),
            ("_bucket", Part::Value, MetricType::Histogram),
            ("_sum", Part::Sum, MetricType::Histogram),
            ("_count", Part::Count, MetricType::Histogram),
        ];
        for (suffix, part, wanted) in suffixed {
            if let Some(base) = name.strip_suffix(suffix) {
                if let Some((i, t)) = typed(&self.families, &self.by_name, base) {
                    if t == wanted {
                        return Ok((i, part));
                    }
                }
            }
        }
        if self.families.len() >= self.limits.max_families {
            return Err(format!(
                "more than {} metric families",
                self.limits.max_families
            ));
        }
        let i = self.families.len();
        self.families.push(MetricFamily {
            name: Some(name.to_string()),
            ..Default::default()
        });
        self.by_name.insert(name.to_string(), i);
        Ok((i, Part::Value))
    }
}

/// Parses `name="value",...}` (the `{` already consumed) into `labels`. The `special` label
/// (`le` or `quantile`) is parsed as a float into `special_value` instead. `family` names the
/// series' family in errors.
fn parse_labels(
    c: &mut Cursor<'_>,
    family: &str,
    labels: &mut Vec<LabelPair>,
    special: Option<&str>,
    special_value: &mut Option<f64>,
) -> Result<(), String> {
    let mut special_seen = false;
    loop {
        c.skip_blanks();
        if c.peek() == Some(b'}') {
            c.bump();
            return Ok(());
        }
        let name = c.label_name();
        if name.is_empty() {
            return Err("invalid label name".to_string());
        }
        if name == "__name__" {
            return Err(format!(
                "label name \"__name__\" is reserved (a series of {})",
                quoted(family)
            ));
        }
        c.skip_blanks();
        if c.peek() != Some(b'=') {
            return Err(format!("expected '=' after label name {}", quoted(name)));
        }
        c.bump();
        c.skip_blanks();
        if c.peek() != Some(b'"') {
            return Err(format!(
                "expected '\"' to start the value of label {}",
                quoted(name)
            ));
        }
        c.bump();
        let value = c.label_value()?;
        let duplicate = if special == Some(name) {
            let v = parse_float(&value)
                .ok_or_else(|| format!("expected float as value of {name} label"))?;
            *special_value = Some(v);
            std::mem::replace(&mut special_seen, true)
        } else {
            let seen = labels.iter().any(|l| l.name.as_deref() == Some(name));
            labels.push(LabelPair {
                name: Some(name.to_string()),
                value: Some(value),
            });
            seen
        };
        if duplicate {
            return Err(format!(
                "duplicate label name {} in a series of {}",
                quoted(name),
                quoted(family)
            ));
        }
        c.skip_blanks();
        match c.peek() {
            Some(b',') => c.bump(),
            Some(b'}') => {
                c.bump();
                return Ok(());
            }
            _ => return Err("expected ',' or '}' after label value".to_string()),
        }
    }
}

/// A float as Go's `strconv.ParseFloat` reads it (`NaN`, `+Inf`, `-Inf`, `Inf`, decimal and
/// scientific notation), without hex floats or digit separators, which Prometheus rejects.
fn parse_float(s: &str) -> Option<f64> {
    if s.is_empty()
        || s.bytes()
            .any(|b| matches!(b, b'p' | b'P' | b'_' | b'x' | b'X'))
    {
        return None;
    }
    let v = s.parse::<f64>().ok()?;
    // Go reports an out-of-range literal (1e999) as an error where Rust rounds it to infinity.
    if v.is_infinite() && !s.bytes().any(|b| b == b'i' || b == b'I') {
        return None;
    }
    Some(v)
}

/// HELP text with `\\` and `\n` unescaped.
fn unescape_help(s: &str) -> Result<String, String> {
    if !s.contains('\\') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        if ch != '\\' {
            out.push(ch);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some(other) => return Err(format!("invalid escape sequence '\\{other}' in HELP")),
            None => return Err("HELP text ends in a lone backslash".to_string()),
        }
    }
    Ok(out)
}

/// A token for an error message: quoted, and cut short when long.
fn quoted(s: &str) -> String {
    const MAX: usize = 40;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}...", s.get(..end).unwrap_or_default())
}

/// A read position in one line.
struct Cursor<'a> {
    line: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(line: &'a str) -> Self {
        Cursor { line, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.line.as_bytes().get(self.pos).copied()
    }

    fn bump(&mut self) {
        self.pos += 1;
    }

    fn at_end(&self) -> bool {
        self.pos >= self.line.len()
    }

    fn rest(&self) -> &'a str {
        self.line.get(self.pos..).unwrap_or_default()
    }

    /// Skips spaces and tabs; true when there were any.
    fn skip_blanks(&mut self) -> bool {
        let start = self.pos;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.pos > start
    }

    /// Everything up to the next blank or the end of the line.
    fn token(&mut self) -> &'a str {
        let start = self.pos;
        while !matches!(self.peek(), None | Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.line.get(start..self.pos).unwrap_or_default()
    }

    /// A name matching `[a-zA-Z_:][a-zA-Z0-9_:]*` (with `colons`) or `[a-zA-Z_][a-zA-Z0-9_]*`;
    /// empty when none starts here.
    fn name(&mut self, colons: bool) -> &'a str {
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

    fn metric_name(&mut self) -> &'a str {
        self.name(true)
    }

    fn label_name(&mut self) -> &'a str {
        self.name(false)
    }

    /// A label value after its opening quote, through the closing quote, unescaped.
    fn label_value(&mut self) -> Result<String, String> {
        let rest = self.rest();
        // Fast path: no escapes before the closing quote.
        let end = rest
            .bytes()
            .position(|b| b == b'"' || b == b'\\')
            .ok_or_else(|| "unterminated label value".to_string())?;
        if rest.as_bytes().get(end) == Some(&b'"') {
            self.pos += end + 1;
            return Ok(rest.get(..end).unwrap_or_default().to_string());
        }
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, ch)) = chars.next() {
            match ch {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, '"')) => out.push('"'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, other)) => {
                        return Err(format!(
                            "invalid escape sequence '\\{other}' in label value"
                        ))
                    }
                    None => return Err("unterminated label value".to_string()),
                },
                _ => out.push(ch),
            }
        }
        Err("unterminated label value".to_string())
    }
}

/// Why a text writer left a series out. Written, it would be a line Prometheus refuses, and one
/// refused line fails the whole scrape: every cluster on the server would vanish centrally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The family's name is not a valid metric name (or is empty).
    MetricName,
    /// A label name is not a valid label name.
    LabelName,
    /// A label name starts with `__`, which Prometheus reserves (`__name__` would name the
    /// series twice).
    ReservedLabel,
    /// The series carries the label the exposition of its family's type adds to its lines itself
    /// (`le` on a histogram, `quantile` on a summary; see [`type_label`]).
    TypeLabel,
    /// A label name appears twice in the series.
    DuplicateLabel,
    /// The series lacks the value its family's type calls for: there is nothing to write.
    NoValue,
}

impl SkipReason {
    /// Every reason, in a stable order.
    pub const ALL: [SkipReason; 6] = [
        SkipReason::MetricName,
        SkipReason::LabelName,
        SkipReason::ReservedLabel,
        SkipReason::TypeLabel,
        SkipReason::DuplicateLabel,
        SkipReason::NoValue,
    ];

    /// The reason as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::MetricName => "metric_name",
            SkipReason::LabelName => "label_name",
            SkipReason::ReservedLabel => "reserved_label",
            SkipReason::TypeLabel => "type_label",
            SkipReason::DuplicateLabel => "duplicate_label",
            SkipReason::NoValue => "no_value",
        }
    }
}

/// Series a writer left out, by [`SkipReason`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped([u64; SkipReason::ALL.len()]);

impl Skipped {
    /// Counts one series left out for `reason`.
    pub fn add(&mut self, reason: SkipReason) {
        if let Some(n) = self.0.get_mut(reason as usize) {
            *n += 1;
        }
    }

    /// Series left out for `reason`.
    pub fn count(&self, reason: SkipReason) -> u64 {
        self.0.get(reason as usize).copied().unwrap_or(0)
    }

    /// Series left out for any reason.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &Skipped) {
        for (n, more) in self.0.iter_mut().zip(other.0) {
            *n += more;
        }
    }
}

impl fmt::Display for Skipped {
    /// `type_label: 2, reserved_label: 1`: the reasons that occurred, with their counts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut separator = "";
        for reason in SkipReason::ALL {
            let n = self.count(reason);
            if n > 0 {
                write!(f, "{separator}{}: {n}", reason.as_str())?;
                separator = ", ";
            }
        }
        Ok(())
    }
}

/// The label the exposition of a family of `metric_type` adds to its series' lines: `le` on a
/// histogram's buckets, `quantile` on a summary's quantiles. A series carrying it already would
/// repeat it.
pub fn type_label(metric_type: MetricType) -> Option<&'static str> {
    match metric_type {
        MetricType::Histogram | MetricType::GaugeHistogram => Some("le"),
        MetricType::Summary => Some("quantile"),
        MetricType::Counter | MetricType::Gauge | MetricType::Untyped => None,
    }
}

/// Whether label `name` (a valid name) still cannot be written on a series of `metric_type`:
/// [`SkipReason::ReservedLabel`] for a `__` prefix, [`SkipReason::TypeLabel`] for the type's own
/// label. One rule for both ends: validation refuses such series on the way in, and the writers
/// leave out any that got into the store some other way.
pub fn reserved_label(metric_type: MetricType, name: &str) -> Option<SkipReason> {
    reserved_label_bytes(metric_type, name.as_bytes())
}

fn reserved_label_bytes(metric_type: MetricType, name: &[u8]) -> Option<SkipReason> {
    if name.starts_with(b"__") {
        Some(SkipReason::ReservedLabel)
    } else if type_label(metric_type).is_some_and(|own| own.as_bytes() == name) {
        Some(SkipReason::TypeLabel)
    } else {
        None
    }
}

/// Why label `name` cannot be written on a series of `metric_type`, duplicates aside.
#[inline]
fn label_problem(metric_type: MetricType, name: &[u8]) -> Option<SkipReason> {
    // [`labels::is_valid_label_name`]'s rule, on the bytes: it admits only ASCII, so they need no
    // UTF-8 check first (this runs for every label `/federate` writes).
    let valid = match name.split_first() {
        Some((&first, rest)) => {
            (first.is_ascii_alphabetic() || first == b'_')
                && rest.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_')
        }
        None => false,
    };
    if !valid {
        return Some(SkipReason::LabelName);
    }
    reserved_label_bytes(metric_type, name)
}

/// Label names kept on the stack per series for the duplicate check; a series with more (rare:
/// validation allows 64) moves them to a set.
const KEPT_NAMES: usize = 16;

/// The label names of one series seen so far.
struct SeenNames<'a> {
    kept: [&'a [u8]; KEPT_NAMES],
    len: usize,
    more: Option<HashSet<&'a [u8]>>,
}

impl<'a> SeenNames<'a> {
    fn new() -> Self {
        SeenNames {
            kept: [&[]; KEPT_NAMES],
            len: 0,
            more: None,
        }
    }

    /// Adds `name`; false when the series had it already.
    #[inline]
    fn insert(&mut self, name: &'a [u8]) -> bool {
        if let Some(more) = &mut self.more {
            return more.insert(name);
        }
        if self
            .kept
            .get(..self.len)
            .unwrap_or_default()
            .contains(&name)
        {
            return false;
        }
        match self.kept.get_mut(self.len) {
            Some(slot) => {
                *slot = name;
                self.len += 1;
            }
            None => {
                let mut set: HashSet<&[u8]> = self.kept.iter().copied().collect();
                set.insert(name);
                self.more = Some(set);
            }
        }
        true
    }
}

/// Why a series whose label names are `names` (in order) cannot be served in a family of
/// `metric_type`, in text or protobuf, if it cannot: an invalid, reserved or repeated name
/// ([`SkipReason::LabelName`], [`SkipReason::ReservedLabel`], [`SkipReason::TypeLabel`],
/// [`SkipReason::DuplicateLabel`]). The first problem in label order is reported.
pub fn unservable_labels<'a>(
    metric_type: MetricType,
    names: impl IntoIterator<Item = &'a [u8]>,
) -> Option<SkipReason> {
    let mut seen = SeenNames::new();
    for name in names {
        if let Some(problem) = label_problem(metric_type, name) {
            return Some(problem);
        }
        if !seen.insert(name) {
            return Some(SkipReason::DuplicateLabel);
        }
    }
    None
}

/// Why `metric` cannot be written in a family of `metric_type`, if it cannot; checked in the
/// order [`write_family_view`] finds the same problems, so both count them alike.
fn series_problem(metric: &Metric, metric_type: MetricType) -> Option<SkipReason> {
    if !has_value_for(metric, metric_type) {
        return Some(SkipReason::NoValue);
    }
    unservable_labels(
        metric_type,
        metric
            .label
            .iter()
            .map(|l| l.name.as_deref().unwrap_or("").as_bytes()),
    )
}

/// Writes one family in text format: `# HELP` (when there is help text), `# TYPE`, then one line per
/// sample. With `timestamps` false, sample timestamps are left out.
///
/// The output is byte for byte what Go's `expfmt.MetricFamilyToText` writes, except that a family
/// without series writes nothing, empty help is left out, a gauge histogram is written as a
/// histogram, and a series that cannot be written as lines Prometheus accepts is left out (a
/// family left with none writes nothing): see [`SkipReason`] and [`write_family_counted`].
pub fn write_family<W: Write>(
    w: &mut W,
    family: &MetricFamily,
    timestamps: bool,
) -> io::Result<()> {
    write_family_counted(w, family, timestamps, &mut Skipped::default())
}

/// As [`write_family`], counting each series left out in `skipped`.
pub fn write_family_counted<W: Write>(
    w: &mut W,
    family: &MetricFamily,
    timestamps: bool,
    skipped: &mut Skipped,
) -> io::Result<()> {
    let name = family.name.as_deref().unwrap_or("");
    if !labels::is_valid_metric_name(name) {
        for _ in &family.metric {
            skipped.add(SkipReason::MetricName);
        }
        return Ok(());
    }
    let metric_type = family.metric_type();
    // The header waits for the first series written: a dangling `# TYPE x histogram` makes a
    // following `# TYPE x_count ...` a second TYPE line for `x`, which Go's parser and ours
    // refuse, failing the whole body.
    let mut header_written = false;
    for metric in &family.metric {
        if let Some(problem) = series_problem(metric, metric_type) {
            skipped.add(problem);
            continue;
        }
        if !header_written {
            header_written = true;
            if let Some(help) = family.help.as_deref().filter(|h| !h.is_empty()) {
                w.write_all(b"# HELP ")?;
                w.write_all(name.as_bytes())?;
                w.write_all(b" ")?;
                write_escaped(w, help, false)?;
                w.write_all(b"\n")?;
            }
            w.write_all(b"# TYPE ")?;
            w.write_all(name.as_bytes())?;
            w.write_all(type_line_end(metric_type))?;
        }
        let ts = if timestamps {
            metric.timestamp_ms
        } else {
            None
        };
        let sample = |w: &mut W, suffix: &str, extra: Option<(&str, f64)>, value: f64| {
            write_sample(w, name, suffix, &metric.label, extra, value, ts)
        };
        match metric_type {
            MetricType::Counter | MetricType::Gauge | MetricType::Untyped => {
                let value = match metric_type {
                    MetricType::Counter => metric.counter.map(|c| c.value),
                    MetricType::Gauge => metric.gauge.map(|g| g.value),
                    _ => metric.untyped.map(|u| u.value),
                };
                if let Some(value) = value {
                    sample(w, "", None, value.unwrap_or(0.0))?;
                }
            }
            MetricType::Summary => {
                let Some(summary) = &metric.summary else {
                    continue;
                };
                for q in &summary.quantile {
                    let rank = q.quantile.unwrap_or(0.0);
                    sample(w, "", Some(("quantile", rank)), q.value.unwrap_or(0.0))?;
                }
                sample(w, "_sum", None, summary.sample_sum.unwrap_or(0.0))?;
                let count = summary.sample_count.unwrap_or(0) as f64;
                sample(w, "_count", None, count)?;
            }
            MetricType::Histogram | MetricType::GaugeHistogram => {
                let Some(histogram) = &metric.histogram else {
                    continue;
                };
                let count = histogram.sample_count.unwrap_or(0) as f64;
                let mut inf_seen = false;
                for b in &histogram.bucket {
                    let le = b.upper_bound.unwrap_or(0.0);
                    inf_seen |= le == f64::INFINITY;
                    let cumulative = b.cumulative_count.unwrap_or(0) as f64;
                    sample(w, "_bucket", Some(("le", le)), cumulative)?;
                }
                if !inf_seen {
                    sample(w, "_bucket", Some(("le", f64::INFINITY)), count)?;
                }
                sample(w, "_sum", None, histogram.sample_sum.unwrap_or(0.0))?;
                sample(w, "_count", None, count)?;
            }
        }
    }
    Ok(())
}

/// The end of a `# TYPE` line: the type as Go's `expfmt` names it.
fn type_line_end(metric_type: MetricType) -> &'static [u8] {
    match metric_type {
        MetricType::Counter => b" counter\n",
        MetricType::Gauge => b" gauge\n",
        MetricType::Summary => b" summary\n",
        MetricType::Untyped => b" untyped\n",
        MetricType::Histogram | MetricType::GaugeHistogram => b" histogram\n",
    }
}

/// Whether `metric` carries the value a family of type `metric_type` is written from.
fn has_value_for(metric: &Metric, metric_type: MetricType) -> bool {
    match metric_type {
        MetricType::Counter => metric.counter.is_some(),
        MetricType::Gauge => metric.gauge.is_some(),
        MetricType::Untyped => metric.untyped.is_some(),
        MetricType::Summary => metric.summary.is_some(),
        MetricType::Histogram | MetricType::GaugeHistogram => metric.histogram.is_some(),
    }
}

/// One sample line: `name_suffix{labels,extra="x"} value [timestamp]`.
fn write_sample<W: Write>(
    w: &mut W,
    name: &str,
    suffix: &str,
    labels: &[LabelPair],
    extra: Option<(&str, f64)>,
    value: f64,
    timestamp: Option<i64>,
) -> io::Result<()> {
    w.write_all(name.as_bytes())?;
    w.write_all(suffix.as_bytes())?;
    let mut separator = b"{";
    for label in labels {
        w.write_all(separator)?;
        separator = b",";
        w.write_all(label.name.as_deref().unwrap_or("").as_bytes())?;
        w.write_all(b"=\"")?;
        write_escaped(w, label.value.as_deref().unwrap_or(""), true)?;
        w.write_all(b"\"")?;
    }
    finish_sample(w, separator, extra, value, timestamp)
}

/// The rest of a sample line after its labels (`separator` is `{` when none was written).
fn finish_sample<W: Write>(
    w: &mut W,
    mut separator: &[u8; 1],
    extra: Option<(&str, f64)>,
    value: f64,
    timestamp: Option<i64>,
) -> io::Result<()> {
    if let Some((extra_name, extra_value)) = extra {
        w.write_all(separator)?;
        separator = b",";
        w.write_all(extra_name.as_bytes())?;
        w.write_all(b"=\"")?;
        write_float(w, extra_value)?;
        w.write_all(b"\"")?;
    }
    // The value (and timestamp) are formatted on the stack and written at once.
    let mut buf = NumBuf::new();
    if separator == b"," {
        buf.push(b'}');
    }
    buf.push(b' ');
    buf.push_float(value);
    if let Some(ts) = timestamp {
        buf.push(b' ');
        buf.push_i64(ts);
    }
    buf.push(b'\n');
    w.write_all(buf.as_bytes())
}

/// Writes one family read from a protobuf body without decoding it (see [`crate::wire`]): the
/// bytes [`write_family`] writes for the same family decoded, with nothing allocated per series
/// (`out` grows, nothing else); each series left out is counted in `skipped`, as
/// [`write_family_counted`] counts it.
///
/// The family's series are checked as they are written, not before: on a message that does not
/// decode, an [`io::ErrorKind::InvalidData`] error (wrapping the [`DecodeError`]) is returned and
/// part of the family may already be in `out`; throw it away when that matters. (A series whose
/// value is not the family's is skipped unread, so its labels are not checked.)
pub fn write_family_view(
    out: &mut Vec<u8>,
    family: &FamilyView<'_>,
    timestamps: bool,
    skipped: &mut Skipped,
) -> io::Result<()> {
    let name = family.name.as_bytes();
    let name_ok = labels::is_valid_metric_name(family.name);
    let metric_type = family.metric_type();
    let mut header_written = false;
    for metric in family.metrics() {
        let metric = metric.map_err(invalid_data)?;
        if !name_ok {
            skipped.add(SkipReason::MetricName);
            continue;
        }
        let value = metric.value_for(metric_type).map_err(invalid_data)?;
        if matches!(value, Value::Missing | Value::Several) {
            skipped.add(SkipReason::NoValue);
            continue;
        }
        // The labels are checked as the series' first line renders them; a series that fails
        // is taken back out, with the header when it was the one to bring it.
        let start = out.len();
        let brought_header = !header_written;
        if brought_header {
            header_written = true;
            if !family.help.is_empty() {
                out.extend_from_slice(b"# HELP ");
                out.extend_from_slice(name);
                out.push(b' ');
                write_escaped(out, family.help, false)?;
                out.push(b'\n');
            }
            out.extend_from_slice(b"# TYPE ");
            out.extend_from_slice(name);
            out.extend_from_slice(type_line_end(metric_type));
        }
        let mut lines = SeriesLines {
            name,
            metric: &metric,
            metric_type,
            labels: None,
            timestamp: if timestamps {
                metric.timestamp_ms
            } else {
                None
            },
        };
        match lines.write_all(out, value) {
            Ok(()) => {}
            Err(LineError::Skip(reason)) => {
                out.truncate(start);
                header_written = !brought_header;
                skipped.add(reason);
            }
            Err(LineError::Io(e)) => return Err(e),
        }
    }
    Ok(())
}

fn invalid_data(e: DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Why a series' lines stopped.
enum LineError {
    /// A label cannot be written: the series is left out.
    Skip(SkipReason),
    /// A message does not decode: the family fails.
    Io(io::Error),
}

impl From<io::Error> for LineError {
    fn from(e: io::Error) -> Self {
        LineError::Io(e)
    }
}

/// The sample lines of one borrowed series. Its labels are decoded, checked and escaped for the
/// first line only; later lines (a histogram has a dozen) copy that first rendering from `out`.
struct SeriesLines<'a, 'b> {
    name: &'a [u8],
    metric: &'a MetricView<'b>,
    metric_type: MetricType,
    /// Where the rendered `{a="b",c="d"` (without the closing brace) sits in `out`.
    labels: Option<std::ops::Range<usize>>,
    timestamp: Option<i64>,
}

impl SeriesLines<'_, '_> {
    /// Every line of the series, whose value is `value`.
    fn write_all(&mut self, out: &mut Vec<u8>, value: Value<'_>) -> Result<(), LineError> {
        match value {
            Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => {
                self.write(out, b"", None, v)?
            }
            Value::Summary(summary) => {
                for q in summary.quantiles() {
                    let (rank, value) = q.map_err(invalid_data)?;
                    self.write(out, b"", Some((b"quantile", rank)), value)?;
                }
                self.write(out, b"_sum", None, summary.sample_sum)?;
                self.write(out, b"_count", None, summary.sample_count as f64)?;
            }
            Value::Histogram(histogram) => {
                let count = histogram.sample_count as f64;
                let mut inf_seen = false;
                for b in histogram.buckets() {
                    let (le, cumulative) = b.map_err(invalid_data)?;
                    inf_seen |= le == f64::INFINITY;
                    self.write(out, b"_bucket", Some((b"le", le)), cumulative as f64)?;
                }
                if !inf_seen {
                    self.write(out, b"_bucket", Some((b"le", f64::INFINITY)), count)?;
                }
                self.write(out, b"_sum", None, histogram.sample_sum)?;
                self.write(out, b"_count", None, count)?;
            }
            Value::Missing | Value::Several => {}
        }
        Ok(())
    }

    /// One line: `name_suffix{labels,extra="x"} value [timestamp]`.
    fn write(
        &mut self,
        out: &mut Vec<u8>,
        suffix: &[u8],
        extra: Option<(&[u8], f64)>,
        value: f64,
    ) -> Result<(), LineError> {
        out.extend_from_slice(self.name);
        out.extend_from_slice(suffix);
        let labels = match &self.labels {
            Some(range) => {
                let range = range.clone();
                out.extend_from_within(range.clone());
                range
            }
            None => {
                let start = out.len();
                let mut separator = b'{';
                let mut seen = SeenNames::new();
                for label in self.metric.label_bytes() {
                    let (label_name, label_value) = label.map_err(invalid_data)?;
                    if let Some(problem) = label_problem(self.metric_type, label_name) {
                        return Err(LineError::Skip(problem));
                    }
                    if !seen.insert(label_name) {
                        return Err(LineError::Skip(SkipReason::DuplicateLabel));
                    }
                    out.push(separator);
                    separator = b',';
                    out.extend_from_slice(label_name);
                    out.extend_from_slice(b"=\"");
                    escape_into(out, label_value, true);
                    out.push(b'"');
                }
                let range = start..out.len();
                self.labels = Some(range.clone());
                range
            }
        };
        let mut buf = NumBuf::new();
        let mut open = !labels.is_empty();
        if let Some((extra_name, extra_value)) = extra {
            buf.push(if open { b',' } else { b'{' });
            open = true;
            buf.push_slice(extra_name);
            buf.push_slice(b"=\"");
            buf.push_float(extra_value);
            buf.push(b'"');
        }
        if open {
            buf.push(b'}');
        }
        buf.push(b' ');
        buf.push_float(value);
        if let Some(ts) = self.timestamp {
            buf.push(b' ');
            buf.push_i64(ts);
        }
        buf.push(b'\n');
        out.extend_from_slice(buf.as_bytes());
        Ok(())
    }
}

/// As [`write_escaped`], for bytes into a `Vec`.
fn escape_into(out: &mut Vec<u8>, bytes: &[u8], quotes: bool) {
    let special = bytes.iter().fold(false, |acc, &b| {
        acc | (b == b'\\') | (b == b'\n') | (quotes & (b == b'"'))
    });
    if !special {
        return out.extend_from_slice(bytes);
    }
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'"' if quotes => out.extend_from_slice(b"\\\""),
            _ => out.push(b),
        }
    }
}

/// Writes `s` with `\` and newline escaped, and `"` too in label values.
fn write_escaped<W: Write>(w: &mut W, s: &str, quotes: bool) -> io::Result<()> {
    let bytes = s.as_bytes();
    // Almost no value needs escaping; a branch-free scan (which vectorizes) settles that first.
    let special = bytes.iter().fold(false, |acc, &b| {
        acc | (b == b'\\') | (b == b'\n') | (quotes & (b == b'"'))
    });
    if !special {
        return w.write_all(bytes);
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'"' if quotes => b"\\\"",
            _ => continue,
        };
        w.write_all(bytes.get(start..i).unwrap_or_default())?;
        w.write_all(escaped)?;
        start = i + 1;
    }
    w.write_all(bytes.get(start..).unwrap_or_default())
}

/// Writes `f` as Go's `strconv.FormatFloat(f, 'g', -1, 64)` does (the shortest digits that read
/// back as `f`, in exponent form below 1e-4 and from 1e6 up), with `NaN`, `+Inf` and `-Inf`.
fn write_float<W: Write>(w: &mut W, f: f64) -> io::Result<()> {
    let mut buf = NumBuf::new();
    buf.push_float(f);
    w.write_all(buf.as_bytes())
}

/// A small stack buffer numbers are formatted into, so formatting never touches the heap. Room
/// for the longest line tail: `,quantile="<float>"} <float> <i64>\n` is at most 84 bytes.
struct NumBuf {
    bytes: [u8; 128],
    len: usize,
}

impl NumBuf {
    fn new() -> Self {
        NumBuf {
            bytes: [0; 128],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }

    fn push(&mut self, b: u8) {
        // Every caller stays far below the capacity; dropping would be the safe failure anyway.
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    fn push_slice(&mut self, s: &[u8]) {
        for &b in s {
            self.push(b);
        }
    }

    fn push_u64(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                *d = b'0' + (n % 10) as u8;
            }
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        self.push_slice(digits.get(i..).unwrap_or_default());
    }

    fn push_i64(&mut self, n: i64) {
        if n < 0 {
            self.push(b'-');
        }
        self.push_u64(n.unsigned_abs());
    }

    fn push_float(&mut self, f: f64) {
        if f.is_nan() {
            return self.push_slice(b"NaN");
        }
        if f.is_infinite() {
            return self.push_slice(if f > 0.0 { b"+Inf" } else { b"-Inf" });
        }
        if f == 0.0 {
            // Go writes negative zero as "0" too.
            return self.push(b'0');
        }
        // Shortest round-trip digits and the decimal exponent of the first one.
        let mut digits = [0u8; 24];
        let mut nd = 0;
        let exp: i32;
        let abs = f.abs();
        if abs < 9_007_199_254_740_992.0 && abs.fract() == 0.0 {
            // Integers below 2^53 are exact, so their digits are their shortest form: skip fmt.
            let mut tmp = NumBuf::new();
            tmp.push_u64(abs as u64);
            let all = tmp.as_bytes();
            exp = all.len() as i32 - 1;
            let significant = all.iter().rposition(|&b| b != b'0').map_or(1, |p| p + 1);
            for &b in all.get(..significant).unwrap_or_default() {
                if let Some(d) = digits.get_mut(nd) {
                    *d = b;
                    nd += 1;
                }
            }
        } else {
            // `{:e}` gives the shortest round-trip digits as `d.ddddde-7`.
            let mut sci = NumBuf::new();
            if fmt::write(&mut sci, format_args!("{abs:e}")).is_err() {
                return self.push_slice(b"NaN");
            }
            let text = sci.as_bytes();
            let e_at = text.iter().position(|&b| b == b'e').unwrap_or(text.len());
            for &b in text.get(..e_at).unwrap_or_default() {
                if b.is_ascii_digit() {
                    if let Some(d) = digits.get_mut(nd) {
                        *d = b;
                        nd += 1;
                    }
                }
            }
            exp = std::str::from_utf8(text.get(e_at + 1..).unwrap_or_default())
                .ok()
                .and_then(|e| e.parse().ok())
                .unwrap_or(0);
        }
        let digits = digits.get(..nd).unwrap_or_default();
        if f < 0.0 {
            self.push(b'-');
        }
        if !(-4..6).contains(&exp) {
            let (first, rest) = digits.split_first().unwrap_or((&b'0', &[]));
            self.push(*first);
            if !rest.is_empty() {
                self.push(b'.');
                self.push_slice(rest);
            }
            self.push(b'e');
            self.push(if exp < 0 { b'-' } else { b'+' });
            if exp.unsigned_abs() < 10 {
                self.push(b'0');
            }
            self.push_u64(u64::from(exp.unsigned_abs()));
        } else if exp < 0 {
            self.push_slice(b"0.");
            for _ in 0..(-exp - 1) {
                self.push(b'0');
            }
            self.push_slice(digits);
        } else {
            let int_len = exp as usize + 1;
            for i in 0..int_len {
                self.push(digits.get(i).copied().unwrap_or(b'0'));
            }
            if let Some(frac) = digits.get(int_len..).filter(|f| !f.is_empty()) {
                self.push(b'.');
                self.push_slice(frac);
            }
        }
    }
}

impl fmt::Write for NumBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > self.bytes.len() {
            return Err(fmt::Error);
        }
        self.push_slice(s.as_bytes());
        Ok(())
    }
}

/// Writes all `families` in text format (see [`write_family`]).
pub fn encode<W: Write>(w: &mut W, families: &[MetricFamily], timestamps: bool) -> io::Result<()> {
    for family in families {
        write_family(w, family, timestamps)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delimited;
    use prost::Message;

    const METRICS_TXT: &[u8] = include_bytes!("../../tests/fixtures/prometheus-metrics.txt");
    const METRICS_PB: &[u8] = include_bytes!("../../tests/fixtures/prometheus-metrics.pb");
    const FEDERATE_TXT: &[u8] = include_bytes!("../../tests/fixtures/prometheus-federate.txt");
    const FEDERATE_PB: &[u8] = include_bytes!("../../tests/fixtures/prometheus-federate.pb");

    fn parse_ok(text: &str) -> Vec<MetricFamily> {
        parse(text.as_bytes(), &Limits::default()).unwrap()
    }

    fn parse_err(text: &[u8], limits: &Limits) -> ParseError {
        parse(text, limits).unwrap_err()
    }

    fn encode_to_string(families: &[MetricFamily], timestamps: bool) -> String {
        let mut out = Vec::new();
        encode(&mut out, families, timestamps).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Families compared by their protobuf bytes, so NaN values compare equal to themselves.
    fn same(a: &[MetricFamily], b: &[MetricFamily]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.encode_to_vec() == y.encode_to_vec())
    }

    fn float(f: f64) -> String {
        let mut out = Vec::new();
        write_float(&mut out, f).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Every type, escapes, special values and timestamps, in the exact bytes Go's encoder writes.
    const CANONICAL: &str = r#"# HELP c_total A counter with \\ and \n in its help.
# TYPE c_total counter
c_total{path="/a\"b\\c\nd",code="200"} 1027 1395066363000
c_total{path="/",code="400"} 3 1395066363000
# TYPE g gauge
g NaN
g{x="inf"} +Inf
g{x="-inf"} -Inf
g{x="sci"} 1.234567e+06
g{x="small"} -6.6706e-05
g{x="plain"} 0.25 -5
# TYPE u untyped
u{a=""} 0
# HELP h A histogram.
# TYPE h histogram
h_bucket{le="0.05"} 24054
h_bucket{le="0.1"} 33444
h_bucket{le="+Inf"} 144320
h_sum 53423
h_count 144320
h_bucket{method="get",le="1"} 1 17
h_bucket{method="get",le="+Inf"} 2 17
h_sum{method="get"} 1.5 17
h_count{method="get"} 2 17
# TYPE s summary
s{quantile="0.5"} 4773
s{quantile="0.99"} 76656
s_sum 1.7560473e+07
s_count 2693
s{a="x",quantile="0"} NaN
s_sum{a="x"} 0
s_count{a="x"} 0
"#;

    #[test]
    fn text_round_trips_byte_for_byte() {
        let families = parse_ok(CANONICAL);
        assert_eq!(encode_to_string(&families, true), CANONICAL);
    }

    #[test]
    fn parses_every_type_into_the_right_fields() {
        let families = parse_ok(CANONICAL);
        let names: Vec<_> = families.iter().map(|f| f.name.clone().unwrap()).collect();
        assert_eq!(names, ["c_total", "g", "u", "h", "s"]);

        let c = &families[0];
        assert_eq!(c.metric_type(), MetricType::Counter);
        assert_eq!(
            c.help.as_deref(),
            Some("A counter with \\ and \n in its help.")
        );
        assert_eq!(c.metric[0].label_value("path"), Some("/a\"b\\c\nd"));
        assert_eq!(c.metric[0].counter.unwrap().value, Some(1027.0));
        assert_eq!(c.metric[0].timestamp_ms, Some(1395066363000));

        let g = &families[1];
        assert!(g.metric[0].gauge.unwrap().value.unwrap().is_nan());
        assert_eq!(g.metric[1].gauge.unwrap().value, Some(f64::INFINITY));
        assert_eq!(g.metric[2].gauge.unwrap().value, Some(f64::NEG_INFINITY));
        assert_eq!(g.metric[3].gauge.unwrap().value, Some(1_234_567.0));
        assert_eq!(g.metric[5].timestamp_ms, Some(-5));
        assert_eq!(families[2].metric[0].untyped.unwrap().value, Some(0.0));

        let h = &families[3];
        assert_eq!(h.metric_type(), MetricType::Histogram);
        assert_eq!(h.metric.len(), 2);
        let plain = h.metric[0].histogram.as_ref().unwrap();
        assert_eq!(plain.sample_count, Some(144320));
        assert_eq!(plain.sample_sum, Some(53423.0));
        assert_eq!(plain.bucket.len(), 3);
        assert_eq!(plain.bucket[1].upper_bound, Some(0.1));
        assert_eq!(plain.bucket[1].cumulative_count, Some(33444));
        assert_eq!(h.metric[0].timestamp_ms, None);
        assert_eq!(h.metric[1].label, vec![LabelPair::new("method", "get")]);
        assert_eq!(h.metric[1].timestamp_ms, Some(17));

        let s = &families[4];
        assert_eq!(s.metric.len(), 2);
        let summary = s.metric[0].summary.as_ref().unwrap();
        assert_eq!(summary.quantile.len(), 2);
        assert_eq!(summary.quantile[1].quantile, Some(0.99));
        assert_eq!(summary.quantile[1].value, Some(76656.0));
        assert_eq!(summary.sample_count, Some(2693));
        assert_eq!(s.metric[1].label, vec![LabelPair::new("a", "x")]);
    }

    #[test]
    fn leniencies_go_accepts() {
        let text = "  # a plain comment\n\n#\nm{a=\"1\",} 1e3\nm { b = \"2\" } Inf 5\nm{} -inf\n# TYPE t COUNTER   \nt 1.";
        let families = parse_ok(text);
        assert_eq!(families.len(), 2);
        let m = &families[0];
        assert_eq!(m.metric_type(), MetricType::Untyped);
        assert_eq!(m.metric.len(), 3);
        assert_eq!(m.metric[0].untyped.unwrap().value, Some(1000.0));
        assert_eq!(m.metric[1].label, vec![LabelPair::new("b", "2")]);
        assert_eq!(m.metric[1].untyped.unwrap().value, Some(f64::INFINITY));
        assert_eq!(m.metric[1].timestamp_ms, Some(5));
        assert_eq!(m.metric[2].untyped.unwrap().value, Some(f64::NEG_INFINITY));
        assert_eq!(families[1].metric_type(), MetricType::Counter);
        assert_eq!(families[1].metric[0].counter.unwrap().value, Some(1.0));
    }

    #[test]
    fn groups_like_go_expfmt() {
        // Without a TYPE line, _bucket/_sum/_count are separate untyped families.
        let families = parse_ok("x_bucket{le=\"1\"} 1\nx_sum 2\nx_count 3\n");
        let names: Vec<_> = families
            .iter()
            .map(|f| f.name.as_deref().unwrap())
            .collect();
        assert_eq!(names, ["x_bucket", "x_sum", "x_count"]);
        assert_eq!(families[0].metric[0].label, vec![LabelPair::new("le", "1")]);

        // Interleaved series of one histogram still group by label set, regardless of label order.
        let text = "# TYPE x histogram\nx_bucket{a=\"1\",b=\"2\",le=\"+Inf\"} 1\nx_bucket{b=\"3\",le=\"+Inf\"} 4\nx_count{b=\"2\",a=\"1\"} 1\nx_count{b=\"3\"} 4\nx_total 7\n";
        let families = parse_ok(text);
        assert_eq!(families.len(), 2);
        assert_eq!(families[0].metric.len(), 2);
        assert_eq!(
            families[0].metric[0]
                .histogram
                .as_ref()
                .unwrap()
                .sample_count,
            Some(1)
        );
        assert_eq!(
            families[0].metric[1]
                .histogram
                .as_ref()
                .unwrap()
                .sample_count,
            Some(4)
        );
        assert_eq!(families[1].name.as_deref(), Some("x_total"));
        assert_eq!(families[1].metric_type(), MetricType::Untyped);

        // A summary's _bucket is not part of it; families without samples vanish.
        let text = "# TYPE s summary\n# HELP lonely nobody\ns_bucket 1\ns_sum 2\n";
        let families = parse_ok(text);
        let names: Vec<_> = families
            .iter()
            .map(|f| f.name.as_deref().unwrap())
            .collect();
        assert_eq!(names, ["s", "s_bucket"]);
        assert_eq!(
            families[0].metric[0].summary.as_ref().unwrap().sample_sum,
            Some(2.0)
        );
    }

    #[test]
    fn model_round_trips_through_text() {
        let families = vec![
            MetricFamily {
                name: Some("weird".into()),
                help: Some("multi\nline \\ help \"quoted\"".into()),
                r#type: Some(MetricType::Gauge as i32),
                metric: [
                    0.1,
                    -0.0001,
                    1e-5,
                    123456.0,
                    1e21,
                    f64::MAX,
                    f64::MIN_POSITIVE,
                    5e-324,
                    f64::NAN,
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                ]
                .iter()
                .enumerate()
                .map(|(i, &v)| Metric {
                    label: vec![
                        LabelPair::new("i", &i.to_string()),
                        LabelPair::new("v", "\"\\\n\u{e9}"),
                    ],
                    gauge: Some(Gauge { value: Some(v) }),
                    timestamp_ms: Some(i64::MIN + i as i64),
                    ..Default::default()
                })
                .collect(),
            },
            MetricFamily {
                name: Some("h".into()),
                help: None,
                r#type: Some(MetricType::Histogram as i32),
                metric: vec![Metric {
                    label: vec![LabelPair::new("a", "b")],
                    histogram: Some(Histogram {
                        sample_count: Some(10),
                        sample_sum: Some(-2.5),
                        bucket: vec![
                            Bucket {
                                cumulative_count: Some(3),
                                upper_bound: Some(-1.0),
                            },
                            Bucket {
                                cumulative_count: Some(10),
                                upper_bound: Some(f64::INFINITY),
                            },
                        ],
                    }),
                    timestamp_ms: Some(42),
                    ..Default::default()
                }],
            },
            MetricFamily {
                name: Some("s".into()),
                help: Some("summary".into()),
                r#type: Some(MetricType::Summary as i32),
                metric: vec![Metric {
                    summary: Some(Summary {
                        sample_count: Some(7),
                        sample_sum: Some(f64::NAN),
                        quantile: vec![Quantile {
                            quantile: Some(0.999),
                            value: Some(1e-300),
                        }],
                    }),
                    ..Default::default()
                }],
            },
            MetricFamily {
                name: Some("c:total".into()),
                help: None,
                r#type: Some(MetricType::Counter as i32),
                metric: vec![Metric {
                    counter: Some(Counter { value: Some(9e15) }),
                    ..Default::default()
                }],
            },
            MetricFamily {
                name: Some("u".into()),
                help: None,
                r#type: Some(MetricType::Untyped as i32),
                metric: vec![Metric {
                    untyped: Some(Untyped { value: Some(-1.0) }),
                    ..Default::default()
                }],
            },
        ];
        let text = encode_to_string(&families, true);
        let back = parse(text.as_bytes(), &Limits::default()).unwrap();
        assert!(same(&families, &back), "{text}\n{back:#?}");

        // Without timestamps they are simply left out.
        let text = encode_to_string(&families, false);
        assert!(!text.contains("-9223372036854775808"));
        let back = parse(text.as_bytes(), &Limits::default()).unwrap();
        assert!(back
            .iter()
            .flat_map(|f| &f.metric)
            .all(|m| m.timestamp_ms.is_none()));
    }

    #[test]
    fn encoder_adds_the_inf_bucket_and_skips_what_it_cannot_write() {
        let families = vec![
            MetricFamily {
                name: Some("h".into()),
                help: Some(String::new()),
                r#type: Some(MetricType::Histogram as i32),
                metric: vec![Metric {
                    histogram: Some(Histogram {
                        sample_count: Some(5),
                        sample_sum: Some(1.5),
                        bucket: vec![Bucket {
                            cumulative_count: Some(2),
                            upper_bound: Some(0.5),
                        }],
                    }),
                    ..Default::default()
                }],
            },
            MetricFamily {
                name: Some("empty".into()),
                ..Default::default()
            },
            MetricFamily {
                name: Some("mismatch".into()),
                r#type: Some(MetricType::Counter as i32),
                metric: vec![Metric {
                    gauge: Some(Gauge { value: Some(1.0) }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ];
        assert_eq!(
            encode_to_string(&families, true),
            "# TYPE h histogram\nh_bucket{le=\"0.5\"} 2\nh_bucket{le=\"+Inf\"} 5\nh_sum 1.5\nh_count 5\n"
        );
        let nameless = MetricFamily {
            metric: vec![Metric::default()],
            ..Default::default()
        };
        let mut skipped = Skipped::default();
        let mut out = Vec::new();
        write_family_counted(&mut out, &nameless, true, &mut skipped).unwrap();
        assert!(out.is_empty());
        assert_eq!(skipped.count(SkipReason::MetricName), 1);
    }

    /// A family of `metric_type` with one series per label set, each with the value its type
    /// calls for.
    fn family_of(metric_type: MetricType, series: &[&[(&str, &str)]]) -> MetricFamily {
        MetricFamily {
            name: Some("f".into()),
            help: Some("Help.".into()),
            r#type: Some(metric_type as i32),
            metric: series
                .iter()
                .map(|labels| {
                    let mut m = Metric {
                        label: labels.iter().map(|(n, v)| LabelPair::new(n, v)).collect(),
                        timestamp_ms: Some(5),
                        ..Default::default()
                    };
                    match metric_type {
                        MetricType::Counter => m.counter = Some(Counter { value: Some(1.0) }),
                        MetricType::Gauge => m.gauge = Some(Gauge { value: Some(1.0) }),
                        MetricType::Untyped => m.untyped = Some(Untyped { value: Some(1.0) }),
                        MetricType::Summary => {
                            m.summary = Some(Summary {
                                sample_count: Some(1),
                                sample_sum: Some(1.0),
                                quantile: vec![Quantile {
                                    quantile: Some(0.5),
                                    value: Some(1.0),
                                }],
                            })
                        }
                        MetricType::Histogram | MetricType::GaugeHistogram => {
                            m.histogram = Some(Histogram {
                                sample_count: Some(1),
                                sample_sum: Some(1.0),
                                bucket: vec![Bucket {
                                    cumulative_count: Some(1),
                                    upper_bound: Some(1.0),
                                }],
                            })
                        }
                    }
                    m
                })
                .collect(),
        }
    }

    /// Writes `family` with both writers, asserting they agree; the text and what was skipped.
    fn written(family: &MetricFamily) -> (String, Skipped) {
        let mut owned = Vec::new();
        let mut owned_skipped = Skipped::default();
        write_family_counted(&mut owned, family, false, &mut owned_skipped).unwrap();
        let body = delimited::encode(std::slice::from_ref(family));
        let view = crate::wire::families(&body, &delimited::Limits::default())
            .next()
            .unwrap()
            .unwrap();
        let mut viewed = Vec::new();
        let mut view_skipped = Skipped::default();
        write_family_view(&mut viewed, &view, false, &mut view_skipped).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&viewed),
            String::from_utf8_lossy(&owned)
        );
        assert_eq!(view_skipped, owned_skipped);
        (String::from_utf8(owned).unwrap(), owned_skipped)
    }

    #[test]
    fn the_writers_label_name_rule_is_the_validators() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let alphabet = b"aZ_09:-.\xc3\xa9 ";
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let name: Vec<u8> = (0..(x % 5))
                .map(|i| alphabet[((x >> (8 * i)) % alphabet.len() as u64) as usize])
                .collect();
            let Ok(text) = std::str::from_utf8(&name) else {
                assert_eq!(
                    label_problem(MetricType::Gauge, &name),
                    Some(SkipReason::LabelName)
                );
                continue;
            };
            assert_eq!(
                label_problem(MetricType::Gauge, &name) != Some(SkipReason::LabelName),
                labels::is_valid_label_name(text),
                "{text:?}"
            );
        }
    }

    #[test]
    fn series_prometheus_would_refuse_are_left_out_and_counted() {
        let ok: &[(&str, &str)] = &[("a", "1")];
        for (metric_type, bad, reason) in [
            (
                MetricType::Histogram,
                &[("le", "1")][..],
                SkipReason::TypeLabel,
            ),
            (
                MetricType::GaugeHistogram,
                &[("le", "1")][..],
                SkipReason::TypeLabel,
            ),
            (
                MetricType::Summary,
                &[("quantile", "0.5")][..],
                SkipReason::TypeLabel,
            ),
            (
                MetricType::Gauge,
                &[("__name__", "x")][..],
                SkipReason::ReservedLabel,
            ),
            (
                MetricType::Counter,
                &[("a", "1"), ("__foo", "x")][..],
                SkipReason::ReservedLabel,
            ),
            (
                MetricType::Untyped,
                &[("a", "1"), ("b", "2"), ("a", "3")][..],
                SkipReason::DuplicateLabel,
            ),
            (
                MetricType::Gauge,
                &[("a-b", "1")][..],
                SkipReason::LabelName,
            ),
            (MetricType::Gauge, &[("", "1")][..], SkipReason::LabelName),
        ] {
            // Alone, the bad series leaves nothing behind, not even the header.
            let (text, skipped) = written(&family_of(metric_type, &[bad]));
            assert_eq!(text, "", "{metric_type:?} {bad:?}");
            assert_eq!(
                skipped.count(reason),
                1,
                "{metric_type:?} {bad:?}: {skipped}"
            );
            assert_eq!(skipped.total(), 1);
            // Between good ones, only it is left out, and what is written parses.
            let (text, skipped) = written(&family_of(metric_type, &[ok, bad, ok]));
            let (good, _) = written(&family_of(metric_type, &[ok, ok]));
            assert_eq!(text, good, "{metric_type:?} {bad:?}");
            assert_eq!(skipped.total(), 1);
            assert!(parse(text.as_bytes(), &Limits::default()).is_ok(), "{text}");
        }
        // `le` and `quantile` are ordinary labels on the other types.
        for metric_type in [MetricType::Gauge, MetricType::Counter, MetricType::Untyped] {
            let (text, skipped) = written(&family_of(
                metric_type,
                &[&[("le", "1"), ("quantile", "2")]],
            ));
            assert_eq!(skipped.total(), 0);
            assert!(text.contains("f{le=\"1\",quantile=\"2\"} 1\n"), "{text}");
        }
        // Past the names kept on the stack, a duplicate is still found.
        let names: Vec<String> = (0..40).map(|i| format!("l{i}")).collect();
        let mut many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        let (_, skipped) = written(&family_of(MetricType::Gauge, &[&many]));
        assert_eq!(skipped.total(), 0);
        many.push(("l33", "w"));
        let (text, skipped) = written(&family_of(MetricType::Gauge, &[&many]));
        assert_eq!(
            (text.as_str(), skipped.count(SkipReason::DuplicateLabel)),
            ("", 1)
        );
        // An invalid family name leaves every series out.
        let mut bad_name = family_of(MetricType::Gauge, &[ok, ok]);
        bad_name.name = Some("a-b".into());
        let (text, skipped) = written(&bad_name);
        assert_eq!(
            (text.as_str(), skipped.count(SkipReason::MetricName)),
            ("", 2)
        );
        assert_eq!(skipped.to_string(), "metric_name: 2");
    }

    /// Found by fuzzing (`common/tests/fuzz.rs`): a histogram family whose series all lacked a
    /// histogram still wrote its `# TYPE` line, so the untyped `x_count` family after it read as a
    /// second TYPE line for `x` and the whole body failed to parse.
    #[test]
    fn a_family_with_nothing_to_write_leaves_no_header_behind() {
        let families = vec![
            MetricFamily {
                name: Some("x".into()),
                help: Some("dangling".into()),
                r#type: Some(MetricType::Histogram as i32),
                metric: vec![Metric {
                    untyped: Some(Untyped { value: Some(1.0) }),
                    ..Default::default()
                }],
            },
            MetricFamily {
                name: Some("x_count".into()),
                r#type: Some(MetricType::Untyped as i32),
                metric: vec![Metric {
                    untyped: Some(Untyped { value: Some(6.0) }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ];
        let text = encode_to_string(&families, true);
        assert_eq!(text, "# TYPE x_count untyped\nx_count 6\n");
        let back = parse(text.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].name.as_deref(), Some("x_count"));
    }

    #[test]
    fn floats_format_like_go() {
        let cases = [
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (-1.0, "-1"),
            (0.1, "0.1"),
            (0.25, "0.25"),
            (100.5, "100.5"),
            (123456.0, "123456"),
            (999999.0, "999999"),
            (1e6, "1e+06"),
            (1234567.0, "1.234567e+06"),
            (9.531768e6, "9.531768e+06"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (6.6706e-05, "6.6706e-05"),
            (1e21, "1e+21"),
            (1e100, "1e+100"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (9007199254740991.0, "9.007199254740991e+15"),
            (9007199254740992.0, "9.007199254740992e+15"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
        ];
        for (f, want) in cases {
            assert_eq!(float(f), want, "formatting {f:?}");
        }
    }

    #[test]
    fn random_floats_round_trip_exactly() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mix raw bit patterns with integers, which take the formatter's fast path.
            let f = if i % 2 == 0 {
                f64::from_bits(x)
            } else {
                (x >> (i % 64)) as f64
            };
            if f.is_nan() {
                continue;
            }
            let s = float(f);
            assert_eq!(
                parse_float(&s).map(f64::to_bits),
                Some(f.to_bits()),
                "{f:?} -> {s}"
            )
        }
        assert_eq!(float(-0.0), "0");
        assert_eq!(integer(i64::MIN), "-9223372036854775808");
        assert_eq!(integer(0), "0");
        assert_eq!(integer(i64::MAX), "9223372036854775807");
    }

    fn integer(n: i64) -> String {
        let mut b = NumBuf::new();
        b.push_i64(n);
        String::from_utf8(b.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn value_syntax_follows_go_parse_float() {
        for (s, want) in [
            ("NaN", f64::NAN),
            ("nan", f64::NAN),
            ("+Inf", f64::INFINITY),
            ("Inf", f64::INFINITY),
            ("-Inf", f64::NEG_INFINITY),
            ("+inf", f64::INFINITY),
            ("1e3", 1000.0),
            ("1E-3", 0.001),
            ("-2.5e+06", -2.5e6),
            (".5", 0.5),
            ("+7", 7.0),
        ] {
            let got = parse_float(s).unwrap_or_else(|| panic!("{s} rejected"));
            assert_eq!(got.to_bits(), want.to_bits(), "{s}");
        }
        for s in ["", "0x10", "0x1p3", "1_000", "1e999", "abc", "1,5", "--1"] {
            assert_eq!(parse_float(s), None, "{s} accepted");
        }
    }

    #[test]
    fn hostile_text_is_an_error_naming_the_line() {
        let d = Limits::default();
        let cases: &[(&[u8], usize, &str)] = &[
            (
                b"ok 1\nm{a=\"unterminated} 1\n",
                2,
                "unterminated label value",
            ),
            (b"m{a=\"x\\q\"} 1\n", 1, "invalid escape sequence"),
            (b"m{a=\"x\\", 1, "unterminated label value"),
            (b"m{a=x} 1\n", 1, "expected '\"'"),
            (b"m{a} 1\n", 1, "expected '='"),
            (b"m{a=\"1\" b=\"2\"} 1\n", 1, "expected ',' or '}'"),
            (b"m{1a=\"1\"} 1\n", 1, "invalid label name"),
            (b"m{__name__=\"x\"} 1\n", 1, "reserved"),
            (b"m{a=\"1\",a=\"2\"} 1\n", 1, "duplicate label name"),
            (b"\n\n1m 1\n", 3, "invalid metric name"),
            (b"m abc\n", 1, "expected float as value, got \"abc\""),
            (b"m\n", 1, "expected float as value"),
            (b"m 1 2.5\n", 1, "expected integer as timestamp"),
            (b"m 1 2 3\n", 1, "spurious string after timestamp"),
            (b"m 1\r\n", 1, "expected float as value"),
            (b"# TYPE m gauge\n# TYPE m counter\n", 2, "second TYPE line"),
            (b"m 1\n# TYPE m gauge\n", 2, "TYPE after samples"),
            (b"# HELP m a\n# HELP m b\n", 2, "second HELP line"),
            (b"# HELP m a\\tb\n", 1, "invalid escape sequence"),
            (b"# TYPE m gauge_histogram\n", 1, "unknown metric type"),
            (b"# TYPE m-x gauge\n", 1, "invalid metric name in comment"),
            (b"# TYPE h histogram\nh_bucket{le=\"x\"} 1\n", 2, "le label"),
            (b"a 1\nb 2\nc \xff\xfe 3\n", 3, "invalid UTF-8"),
        ];
        for &(text, line, reason) in cases {
            let err = parse_err(text, &d);
            assert_eq!(err.line, line, "{:?}: {err}", String::from_utf8_lossy(text));
            assert!(
                err.reason.contains(reason),
                "{:?}: {err}",
                String::from_utf8_lossy(text)
            );
            assert!(!err.to_string().contains('\n'));
        }
        let long_token = format!("m {}\n", "9".repeat(1000));
        let err = parse_err(long_token.as_bytes(), &d);
        assert!(err.to_string().len() < 120, "{err}");
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_families: 2,
            max_series: 3,
            max_line_bytes: 20,
        };
        let err = parse_err(b"a 1\n# TYPE a counter\n", &limits);
        assert_eq!(err.line, 2);
        assert!(parse(b"a 1\nb 1\nb{x=\"1\"} 2\n", &limits).is_ok());
        let err = parse_err(b"a 1\nb 1\nb{x=\"1\"} 2\nb{x=\"2\"} 2\n", &limits);
        assert_eq!((err.line, err.reason.as_str()), (4, "more than 3 series"));
        let err = parse_err(b"a 1\nb 1\nc 1\n", &limits);
        assert_eq!(
            (err.line, err.reason.as_str()),
            (3, "more than 2 metric families")
        );
        let err = parse_err(b"a 1\na{x=\"12345678901234\"} 1\n", &limits);
        assert_eq!(
            (err.line, err.reason.as_str()),
            (2, "line longer than 20 bytes")
        );
        // Buckets of one histogram series are one series.
        let mut text = String::from("# TYPE h histogram\n");
        for i in 0..10 {
            text.push_str(&format!("h_bucket{{le=\"{i}\"}} {i}\n"));
        }
        let limits = Limits {
            max_series: 1,
            ..Limits::default()
        };
        assert_eq!(parse(text.as_bytes(), &limits).unwrap()[0].metric.len(), 1);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"ab_:{}=\",\\n \t#HELPTYPEhistogramsummary01.e+-InfNaN\n\xff";
        for _ in 0..3000 {
            // Mutations of the real fixture, and random strings over the grammar's alphabet.
            let mut body = METRICS_TXT.to_vec();
            for _ in 0..(next() % 8) {
                let at = (next() as usize) % body.len();
                body[at] = alphabet[(next() as usize) % alphabet.len()];
            }
            let _ = parse(&body, &Limits::default());
            let random: Vec<u8> = (0..(next() % 200))
                .map(|_| alphabet[(next() as usize) % alphabet.len()])
                .collect();
            let _ = parse(&random, &Limits::default());
        }
    }

    #[test]
    fn prometheus_metrics_fixture_parses_typed_and_grouped() {
        let families = parse(METRICS_TXT, &Limits::default()).unwrap();
        let by_name = |n: &str| {
            families
                .iter()
                .find(|f| f.name.as_deref() == Some(n))
                .unwrap()
        };

        let gc = by_name("go_gc_duration_seconds");
        assert_eq!(gc.metric_type(), MetricType::Summary);
        assert_eq!(gc.metric.len(), 1);
        let summary = gc.metric[0].summary.as_ref().unwrap();
        let ranks: Vec<_> = summary
            .quantile
            .iter()
            .map(|q| q.quantile.unwrap())
            .collect();
        assert_eq!(ranks, [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert!(summary.sample_count.is_some() && summary.sample_sum.is_some());

        let http = by_name("prometheus_http_request_duration_seconds");
        assert_eq!(http.metric_type(), MetricType::Histogram);
        assert!(http.metric.len() >= 2, "one series per handler");
        for m in &http.metric {
            assert!(m.label_value("handler").is_some());
            assert!(m.label_value("le").is_none());
            let h = m.histogram.as_ref().unwrap();
            let last = h.bucket.last().unwrap();
            assert_eq!(last.upper_bound, Some(f64::INFINITY));
            assert_eq!(last.cumulative_count, h.sample_count);
        }
        assert!(families
            .iter()
            .all(|f| f.metric_type() != MetricType::Untyped));
        assert!(families
            .iter()
            .all(|f| !f.name.as_deref().unwrap().ends_with("_bucket")));
        let types = |t| families.iter().filter(|f| f.metric_type() == t).count();
        assert_eq!(types(MetricType::Histogram), 7);
        assert_eq!(types(MetricType::Summary), 10);

        // Our encoding of what we parsed is a fixed point of parse-then-encode.
        let text = encode_to_string(&families, true);
        let again = parse(text.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(encode_to_string(&again, true), text);
    }

    #[test]
    fn prometheus_text_and_protobuf_agree() {
        let text = parse(METRICS_TXT, &Limits::default()).unwrap();
        let pd = delimited::decode(METRICS_PB, &delimited::Limits::default()).unwrap();
        let shape = |fs: &[MetricFamily]| {
            let mut v: Vec<_> = fs
                .iter()
                .map(|f| (f.name.clone().unwrap(), f.metric_type(), f.metric.len()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(shape(&text), shape(&pd));
        // Static families agree on everything, labels and value included.
        let find = |fs: &[MetricFamily], n: &str| {
            fs.iter()
                .find(|f| f.name.as_deref() == Some(n))
                .cloned()
                .unwrap()
        };
        for name in [
            "prometheus_build_info",
            "go_info",
            "prometheus_config_last_reload_successful",
        ] {
            assert!(same(&[find(&text, name)], &[find(&pd, name)]), "{name}");
        }
        // The protobuf families, written by us, read back as what Go's encoder would have written.
        let ours = encode_to_string(&pd, true);
        let back = parse(ours.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(encode_to_string(&back, true), ours);
        assert_eq!(shape(&back), shape(&pd));
    }

    #[test]
    fn prometheus_federate_fixtures_parse_and_agree() {
        let text = parse(FEDERATE_TXT, &Limits::default()).unwrap();
        let pd = delimited::decode(FEDERATE_PB, &delimited::Limits::default()).unwrap();
        assert!(text.len() > 100);
        // Federation serves everything untyped, one family per metric name, with timestamps.
        for f in text.iter().chain(&pd) {
            assert_eq!(f.metric_type(), MetricType::Untyped);
            assert!(f
                .metric
                .iter()
                .all(|m| m.timestamp_ms.is_some() && m.label_value("job") == Some("prometheus")));
        }
        let names = |fs: &[MetricFamily]| {
            let mut v: Vec<_> = fs.iter().map(|f| f.name.clone().unwrap()).collect();
            v.sort();
            v
        };
        assert_eq!(names(&text), names(&pd));
        // Federate text is in Go's format already, so it round-trips byte for byte.
        assert_eq!(encode_to_string(&text, true).as_bytes(), FEDERATE_TXT);
    }

    #[test]
    fn promtool_accepts_our_encoding() {
        // promtool 2.42 exits 0 when clean, 3 when it only has lint complaints (no help text,
        // units, counter names) and 1 when the text does not parse.
        let pd = delimited::decode(METRICS_PB, &delimited::Limits::default()).unwrap();
        let text = parse(METRICS_TXT, &Limits::default()).unwrap();
        for families in [pd, text] {
            let mut ours = Vec::new();
            encode(&mut ours, &families, true).unwrap();
            let (code, stderr) = crate::promtool::check_metrics(ours);
            // Prometheus's own /metrics is lint-clean, so our rendering of it must be too.
            assert_eq!(code, 0, "{stderr}");
        }
        let synthetic = parse_ok(CANONICAL);
        let mut ours = Vec::new();
        encode(&mut ours, &synthetic, true).unwrap();
        let (code, stderr) = crate::promtool::check_metrics(ours);
        assert!(code == 0 || code == 3, "exit {code}: {stderr}");
        assert!(!stderr.contains("error while linting"), "{stderr}");
    }

    /// Throughput of the encoder, for measuring by hand (no assertion on speed):
    /// `CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test -p telemeter-common encode_throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn encode_throughput() {
        let families: Vec<MetricFamily> = (0..1000)
            .map(|f| MetricFamily {
                name: Some(format!("some_subsystem_metric_number_{f}_total")),
                help: Some("Help text that is about this long.".into()),
                r#type: Some(MetricType::Counter as i32),
                metric: (0..100)
                    .map(|m| Metric {
                        label: vec![
                            LabelPair::new("_id", "f6d3a5c3-6c1f-4ab9-9c0b-5b3a1c2b1e2d"),
                            LabelPair::new("instance", "10.0.12.34:9100"),
                            LabelPair::new("job", "node-exporter"),
                            LabelPair::new("namespace", "openshift-monitoring"),
                            LabelPair::new("pod", &format!("node-exporter-{m}")),
                        ],
                        counter: Some(Counter {
                            value: Some(if m % 2 == 0 {
                                m as f64 * 1234.0
                            } else {
                                m as f64 * 0.123
                            }),
                        }),
                        timestamp_ms: Some(1_700_000_000_000 + m),
                        ..Default::default()
                    })
                    .collect(),
            })
            .collect();
        let series: usize = families.iter().map(|f| f.metric.len()).sum();
        let mut out = Vec::with_capacity(64 << 20);
        let rounds = 10;
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            out.clear();
            encode(&mut out, &families, true).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "text encode: {:.2} M series/s, {:.0} MB/s ({} bytes per round)",
            (series * rounds) as f64 / secs / 1e6,
            (out.len() * rounds) as f64 / secs / 1e6,
            out.len()
        );
        let start = std::time::Instant::now();
        let mut pd = Vec::new();
        for _ in 0..rounds {
            pd.clear();
            for f in &families {
                delimited::encode_family(f, &mut pd);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "pd encode: {:.2} M series/s",
            (series * rounds) as f64 / secs / 1e6
        );
        let start = std::time::Instant::now();
        let parsed = parse(&out, &Limits::default()).unwrap();
        println!(
            "text parse: {:.2} M series/s",
            series as f64 / start.elapsed().as_secs_f64() / 1e6
        );
        assert_eq!(parsed.len(), families.len());
    }
}
