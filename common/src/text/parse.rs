//! The text format parser: lines into [`MetricFamily`]s, grouping `_bucket`/`_sum`/`_count` and
//! quantile lines into histogram and summary series as the Go `expfmt` parser does.

use crate::model::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType, Quantile,
    Summary, Untyped,
};
use std::collections::HashMap;
use std::fmt;

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
pub(super) struct Parser<'a> {
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
pub(super) enum Part {
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
pub(super) fn parse_labels(
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
pub(super) fn parse_float(s: &str) -> Option<f64> {
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
pub(super) fn unescape_help(s: &str) -> Result<String, String> {
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
pub(super) fn quoted(s: &str) -> String {
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
pub(super) struct Cursor<'a> {
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
