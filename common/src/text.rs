//! The Prometheus text exposition format, version 0.0.4: parser and encoder.
//!
//! The parser groups `_bucket`/`_sum`/`_count` and quantile lines into histogram and summary
//! series the way the Go `expfmt` parser does, so a text body and the protobuf body of the same
//! metrics decode to the same families.

use crate::model::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType, Quantile,
    Summary, Untyped,
};
use std::collections::HashMap;
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
            parse_labels(&mut c, &mut labels, special, &mut special_value)?;
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
/// (`le` or `quantile`) is parsed as a float into `special_value` instead.
fn parse_labels(
    c: &mut Cursor<'_>,
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
            return Err("label name __name__ is reserved".to_string());
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
            return Err(format!("duplicate label name {}", quoted(name)));
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

/// Writes one family in text format: `# HELP` (when there is help text), `# TYPE`, then one line per
/// sample. With `timestamps` false, sample timestamps are left out.
///
/// The output is byte for byte what Go's `expfmt.MetricFamilyToText` writes, except that a family
/// without series writes nothing, empty help is left out, a gauge histogram is written as a
/// histogram, and a series lacking the value its family's type calls for is skipped.
pub fn write_family<W: Write>(
    w: &mut W,
    family: &MetricFamily,
    timestamps: bool,
) -> io::Result<()> {
    let name = family.name.as_deref().unwrap_or("");
    if family.metric.is_empty() {
        return Ok(());
    }
    if name.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "metric family without a name",
        ));
    }
    if let Some(help) = family.help.as_deref().filter(|h| !h.is_empty()) {
        w.write_all(b"# HELP ")?;
        w.write_all(name.as_bytes())?;
        w.write_all(b" ")?;
        write_escaped(w, help, false)?;
        w.write_all(b"\n")?;
    }
    let metric_type = family.metric_type();
    let type_name: &[u8] = match metric_type {
        MetricType::Counter => b" counter\n",
        MetricType::Gauge => b" gauge\n",
        MetricType::Summary => b" summary\n",
        MetricType::Untyped => b" untyped\n",
        MetricType::Histogram | MetricType::GaugeHistogram => b" histogram\n",
    };
    w.write_all(b"# TYPE ")?;
    w.write_all(name.as_bytes())?;
    w.write_all(type_name)?;

    for metric in &family.metric {
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
    if let Some((extra_name, extra_value)) = extra {
        w.write_all(separator)?;
        separator = b",";
        w.write_all(extra_name.as_bytes())?;
        w.write_all(b"=\"")?;
        write_float(w, extra_value)?;
        w.write_all(b"\"")?;
    }
    if separator == b"," {
        w.write_all(b"}")?;
    }
    w.write_all(b" ")?;
    write_float(w, value)?;
    if let Some(ts) = timestamp {
        let mut buf = NumBuf::new();
        buf.push(b' ');
        buf.push_i64(ts);
        w.write_all(buf.as_bytes())?;
    }
    w.write_all(b"\n")
}

/// Writes `s` with `\` and newline escaped, and `"` too in label values.
fn write_escaped<W: Write>(w: &mut W, s: &str, quotes: bool) -> io::Result<()> {
    let bytes = s.as_bytes();
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

/// A small stack buffer numbers are formatted into, so formatting never touches the heap.
struct NumBuf {
    bytes: [u8; 48],
    len: usize,
}

impl NumBuf {
    fn new() -> Self {
        NumBuf {
            bytes: [0; 48],
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
