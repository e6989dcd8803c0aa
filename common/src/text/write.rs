//! The text format writers: from decoded families ([`write_family`]) and from zero-copy protobuf
//! views ([`write_family_view`]), byte for byte as Go's `expfmt` writes them.

use crate::bytes::same_bytes;
use crate::delimited::DecodeError;
use crate::labels;
use crate::model::{LabelPair, Metric, MetricFamily, MetricType};
use crate::wire::{FamilyView, MetricView, Value};
use std::cell::RefCell;
use std::io::{self, Write};

use super::float::{write_float, FloatCache, NumBuf};
use super::skip::{label_problem, series_problem, SeenNames, SkipReason, Skipped, KEPT_NAMES};

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
        metric.try_for_each_sample(metric_type, |suffix, extra, value| {
            write_sample(w, name, suffix, &metric.label, extra, value, ts)
        })?;
    }
    Ok(())
}

/// The end of a `# TYPE` line: the type as Go's `expfmt` names it.
pub(super) fn type_line_end(metric_type: MetricType) -> &'static [u8] {
    match metric_type {
        MetricType::Counter => b" counter\n",
        MetricType::Gauge => b" gauge\n",
        MetricType::Summary => b" summary\n",
        MetricType::Untyped => b" untyped\n",
        MetricType::Histogram | MetricType::GaugeHistogram => b" histogram\n",
    }
}

/// Whether `metric` carries the value a family of type `metric_type` is written from.
pub(super) fn has_value_for(metric: &Metric, metric_type: MetricType) -> bool {
    match metric_type {
        MetricType::Counter => metric.counter.is_some(),
        MetricType::Gauge => metric.gauge.is_some(),
        MetricType::Untyped => metric.untyped.is_some(),
        MetricType::Summary => metric.summary.is_some(),
        MetricType::Histogram | MetricType::GaugeHistogram => metric.histogram.is_some(),
    }
}

/// One sample line: `name_suffix{labels,extra="x"} value [timestamp]`.
pub(super) fn write_sample<W: Write>(
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
pub(super) fn finish_sample<W: Write>(
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
    write_family_view_part(out, family, timestamps, skipped, &mut false, &mut |_| true)
}

/// As [`write_family_view`], for one part of a family written from several sources (the same
/// family from many clusters on `/federate`): the `# HELP`/`# TYPE` header is written only while
/// `header_written` is false (and then sets it), so the parts after the first add only series;
/// and only the series `keep` accepts are written (those it refuses are not counted as skipped).
pub fn write_family_view_part(
    out: &mut Vec<u8>,
    family: &FamilyView<'_>,
    timestamps: bool,
    skipped: &mut Skipped,
    header_written: &mut bool,
    keep: &mut dyn FnMut(&MetricView<'_>) -> bool,
) -> io::Result<()> {
    write_family_view_part_plain(
        out,
        family,
        timestamps,
        skipped,
        header_written,
        keep,
        false,
    )
    .map(|_| ())
}

/// As [`write_family_view_part`], also saying whether the part is *plain*: every one of its
/// series kept, written, and its labels written the usual way with nothing to check or escape
/// (a short label message each, a valid name that is neither reserved nor repeated, an ASCII
/// value with nothing to escape: nearly every series). With `known_plain`, the caller vouches
/// that these very bytes were found plain before (`/federate` remembers it per family of a file
/// version, as it remembers where the family is): each label is then copied without those
/// checks, the same bytes as checked (they were a fifth of rendering a line). A label that is
/// not a short message is still written the general way, checked, whatever the caller says.
pub fn write_family_view_part_plain(
    out: &mut Vec<u8>,
    family: &FamilyView<'_>,
    timestamps: bool,
    skipped: &mut Skipped,
    header_written: &mut bool,
    keep: &mut dyn FnMut(&MetricView<'_>) -> bool,
    known_plain: bool,
) -> io::Result<bool> {
    let mut plain = true;
    let name = family.name.as_bytes();
    let name_ok = labels::is_valid_metric_name(family.name);
    let metric_type = family.metric_type();
    let mut memo = LabelMemo::default();
    for metric in super::series::series(family) {
        let metric = metric.map_err(invalid_data)?;
        if !name_ok {
            skipped.add(SkipReason::MetricName);
            plain = false;
            continue;
        }
        if !keep(&metric) {
            plain = false;
            continue;
        }
        let value = metric.value_for(metric_type).map_err(invalid_data)?;
        if matches!(value, Value::Missing | Value::Several) {
            skipped.add(SkipReason::NoValue);
            plain = false;
            continue;
        }
        // The labels are checked as the series' first line renders them; a series that fails
        // is taken back out, with the header when it was the one to bring it.
        let start = out.len();
        let brought_header = !*header_written;
        if brought_header {
            *header_written = true;
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
            last_start: None,
            known_plain,
            memo: &mut memo,
            plain: true,
            timestamp: if timestamps {
                metric.timestamp_ms
            } else {
                None
            },
        };
        match lines.write_all(out, value) {
            Ok(()) => plain &= lines.plain,
            Err(LineError::Skip(reason)) => {
                out.truncate(start);
                *header_written = !brought_header;
                skipped.add(reason);
                plain = false;
            }
            Err(LineError::Io(e)) => return Err(e),
        }
    }
    Ok(plain)
}

pub(super) fn invalid_data(e: DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Why a series' lines stopped.
pub(super) enum LineError {
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
pub(super) struct SeriesLines<'a, 'b> {
    name: &'a [u8],
    /// What the series before in the family part left of its checks.
    memo: &'a mut LabelMemo<'b>,
    metric: &'a MetricView<'b>,
    metric_type: MetricType,
    /// Where the rendered `{a="b",c="d"` (without the closing brace) sits in `out`.
    labels: Option<std::ops::Range<usize>>,
    /// The suffix of the last line written and where its `name_suffix{a="b",c="d"` sits in
    /// `out`: a histogram's bucket lines all start the same, so each copies the one before.
    last_start: Option<(&'static [u8], std::ops::Range<usize>)>,
    /// The caller vouches that these labels were found plain before: copied unchecked.
    known_plain: bool,
    /// Whether the labels were written the usual way (false once written the general way).
    plain: bool,
    timestamp: Option<i64>,
}

impl<'b> SeriesLines<'_, 'b> {
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
        suffix: &'static [u8],
        extra: Option<(&[u8], f64)>,
        value: f64,
    ) -> Result<(), LineError> {
        let line = out.len();
        let labels = match &self.labels {
            Some(range) => {
                // Every line after the first: one reservation for the whole line, then copies.
                let range = range.clone();
                out.reserve(self.name.len() + suffix.len() + range.len() + MAX_LINE_TAIL);
                match &self.last_start {
                    Some((last, start)) if *last == suffix => out.extend_from_within(start.clone()),
                    _ => {
                        out.extend_from_slice(self.name);
                        out.extend_from_slice(suffix);
                        out.extend_from_within(range.clone());
                    }
                }
                range
            }
            None => {
                // The labels written the usual way are never longer than their messages: one
                // reservation for the line, then copies without growth checks.
                out.reserve(
                    self.name.len() + suffix.len() + self.metric.labels.len() + MAX_LINE_TAIL,
                );
                append(out, self.name);
                append(out, suffix);
                let start = out.len();
                let plain = match self.known_plain {
                    true => usual_labels::<false>(out, self.metric, self.metric_type, self.memo)
                        .or_else(|| known_plain_labels(out, self.metric)),
                    false => usual_labels::<true>(out, self.metric, self.metric_type, self.memo)
                        .or_else(|| {
                            out.truncate(start);
                            plain_labels(out, self.metric, self.metric_type)
                        }),
                };
                let range = match plain {
                    Some(range) => range,
                    None => {
                        out.truncate(start);
                        self.plain = false;
                        self.checked_labels(out)?
                    }
                };
                self.labels = Some(range.clone());
                range
            }
        };
        self.last_start = Some((suffix, line..out.len()));
        self.finish(out, labels, extra, value);
        Ok(())
    }

    /// Renders the series' labels (`{a="b",c="d"`, without the closing brace) into `out` the
    /// general way: each label decoded and checked, its value escaped. Returns where they are.
    fn checked_labels(&self, out: &mut Vec<u8>) -> Result<std::ops::Range<usize>, LineError> {
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
        Ok(start..out.len())
    }

    /// The rest of a line after its labels (in `out` at `labels`): the extra label, the closing
    /// brace, the value and timestamp.
    fn finish(
        &self,
        out: &mut Vec<u8>,
        labels: std::ops::Range<usize>,
        extra: Option<(&[u8], f64)>,
        value: f64,
    ) {
        let mut buf = NumBuf::new();
        let mut open = !labels.is_empty();
        if let Some((extra_name, extra_value)) = extra {
            buf.push(if open { b',' } else { b'{' });
            open = true;
            buf.push_slice(extra_name);
            buf.push_slice(b"=\"");
            let cached = EXTRA_VALUES.try_with(|cache| match cache.try_borrow_mut() {
                Ok(mut cache) => {
                    cache.push_float(&mut buf, extra_value);
                    true
                }
                Err(_) => false,
            });
            if !matches!(cached, Ok(true)) {
                buf.push_float(extra_value);
            }
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
        append(out, buf.as_bytes());
    }
}

/// Renders the labels of `metric` (`{a="b",c="d"`, without the closing brace) into `out` when
/// every label is written the usual way and needs nothing done to it: a short label message
/// (`0a <len> name 12 <len> value`, as every encoder writes it), a valid name that is neither
/// reserved nor repeated, an ASCII value without a character to escape. Then each label is one
/// copy of its message's bytes from the name on, its value's two-byte key and length overwritten
/// by `="`: the decoding, UTF-8 check and escaping of [`SeriesLines::checked_labels`] (which
/// renders the same bytes) come down to one scan of the value. `None` as soon as one label is
/// anything else, with part of the labels in `out`: the caller takes them back out and renders
/// them the general way, which also decides what is wrong with them. Returns where they are.
#[inline]
fn plain_labels(
    out: &mut Vec<u8>,
    metric: &MetricView<'_>,
    metric_type: MetricType,
) -> Option<std::ops::Range<usize>> {
    let start = out.len();
    let mut separator = b'{';
    // The names so far, for the duplicate check (`plain_new_label`).
    let mut names: [(u32, &[u8]); KEPT_NAMES] = [(0, &[]); KEPT_NAMES];
    for (count, message) in metric.label_messages().enumerate() {
        // A label that does not decode is reported by the general way, as it reports it.
        let (name, value, copied) = short_label_parts(message.ok()?)?;
        plain_new_label(metric_type, &mut names, count, name, value)?;
        push_short_label(out, separator, name, copied);
        separator = b',';
    }
    Some(start..out.len())
}

/// Writes `separator` and one short label as text: `copied` is its name, its value's key and
/// length, its value (see [`short_label_parts`]); the key and length become `="`.
#[inline(always)]
fn push_short_label(out: &mut Vec<u8>, separator: u8, name: &[u8], copied: &[u8]) {
    out.push(separator);
    let at = out.len() + name.len();
    out.extend_from_slice(copied);
    if let Some(key) = out.get_mut(at..at + 2) {
        key.copy_from_slice(b"=\"");
    }
    out.push(b'"');
}

/// As [`plain_labels`], for labels found plain before (see [`write_family_view_part_plain`]):
/// the same copies without the checks of names and values. `None` as soon as a label is not a
/// short message, with part of the labels in `out`, as [`plain_labels`].
#[inline]
fn known_plain_labels(
    out: &mut Vec<u8>,
    metric: &MetricView<'_>,
) -> Option<std::ops::Range<usize>> {
    let start = out.len();
    let mut separator = b'{';
    for message in metric.label_messages() {
        let (name, _, copied) = short_label_parts(message.ok()?)?;
        push_short_label(out, separator, name, copied);
        separator = b',';
    }
    Some(start..out.len())
}

/// Checks the `count`-th label `name="value"` of a series for the plain ways: a valid name for
/// `metric_type`, a value without escaping, a name not among `names` (the names so far, each with
/// a cheap signature, its length and three of its bytes, compared first: two names differ in it
/// nearly always), which it joins. `None` sends the series the general way, which reports the
/// problem (or counts names past [`KEPT_NAMES`]).
#[inline(always)]
fn plain_new_label<'m>(
    metric_type: MetricType,
    names: &mut [(u32, &'m [u8]); KEPT_NAMES],
    count: usize,
    name: &'m [u8],
    value: &[u8],
) -> Option<()> {
    if label_problem(metric_type, name).is_some() || needs_escaping_or_utf8(value) {
        return None;
    }
    let signature = name_signature(name);
    let kept = names.get(..count).unwrap_or_default();
    if kept
        .iter()
        .any(|&(other, bytes)| other == signature && bytes == name)
    {
        return None;
    }
    *names.get_mut(count)? = (signature, name);
    Some(())
}

/// As [`plain_labels`] (with `CHECKED`) or [`known_plain_labels`] (without), for a series whose
/// labels are all short messages framed the usual way (`0a <len> 0a <len> name 12 <len> value`,
/// one-byte lengths): written into `out`'s spare capacity, each label one inline copy of its
/// bytes from its name's length on (that length becomes the separator, the value's key and
/// length `="`), without a growth check or a call to `memcpy` for each of its four parts (those
/// were a tenth of rendering a line). `None` for any other series, with `out` as it was: the
/// caller renders it the way it did before this one.
#[inline]
fn usual_labels<'b, const CHECKED: bool>(
    out: &mut Vec<u8>,
    metric: &MetricView<'b>,
    metric_type: MetricType,
    memo: &mut LabelMemo<'b>,
) -> Option<std::ops::Range<usize>> {
    const LABEL_KEY: u8 = (1 << 3) | 2;
    let start = out.len();
    // Each label's text (its message's length, as `{`/`,`, name, `="`, value, `"`) is two
    // bytes shorter than its field: the labels fit in their own length.
    out.reserve(metric.labels.len());
    let mut spare = Spare {
        spare: out.spare_capacity_mut(),
        len: 0,
    };
    // The labels before the first that differs from the series before's are its labels: they
    // passed the checks there, and their signatures are still in the memo at their places.
    let before = std::mem::take(&mut memo.labels);
    let names_before = std::mem::take(&mut memo.count);
    let mut same = CHECKED;
    let mut same_names = CHECKED;
    let mut separator = b'{';
    let mut rest = metric.labels;
    let mut count = 0;
    while let [LABEL_KEY, len, ref tail @ ..] = *rest {
        if len >= 0x80 {
            return None;
        }
        let field = rest.get(..2 + usize::from(len))?;
        let (message, after) = tail.split_at_checked(usize::from(len))?;
        let (name, value, _) = short_label_parts(message)?;
        if CHECKED {
            let at = metric.labels.len() - rest.len();
            same = same
                && before
                    .get(at..at + field.len())
                    .is_some_and(|b| same_bytes(b, field));
            if !same {
                // The names up to this one are the series before's: this one is checked
                // already, and none before repeats it.
                same_names = same_names
                    && count < names_before
                    && memo.names.get(count).is_some_and(|b| same_bytes(b, name));
                if !same_names {
                    if label_problem(metric_type, name).is_some() {
                        return None;
                    }
                    // A name whose signature is among those before may repeat one:
                    // `plain_labels` compares the names themselves (two names alike in
                    // signature are rare).
                    let signature = name_signature(name);
                    if memo.signatures.get(..count)?.contains(&signature) {
                        return None;
                    }
                    *memo.signatures.get_mut(count)? = signature;
                    *memo.names.get_mut(count)? = name;
                }
                if needs_escaping_or_utf8(value) {
                    return None;
                }
            }
            count += 1;
        }
        rest = after;
        let at = spare.len;
        spare.copy(message.get(1..)?)?;
        spare.put(at, [separator])?;
        spare.put(at + 1 + name.len(), *b"=\"")?;
        spare.copy(b"\"")?;
        separator = b',';
    }
    if !rest.is_empty() {
        return None;
    }
    if CHECKED {
        memo.labels = metric.labels;
        memo.count = count;
    }
    let len = spare.len;
    // SAFETY: `spare` wrote every byte of the first `len` of `out`'s spare capacity (each copy
    // starts where the one before ended, the `put`s only overwrite bytes already written), so
    // the bytes up to `start + len` are initialized, and within the capacity.
    unsafe { out.set_len(start + len) };
    Some(start..out.len())
}

/// What the checks of a family part's last series left for the next (see [`usual_labels`]):
/// consecutive series of a family mostly begin with the same labels (the cluster's, the job's,
/// the instance's), which need no second check, and mostly have the same label names, which
/// need none either (only the values that differ are checked).
#[derive(Default)]
pub(super) struct LabelMemo<'b> {
    /// The label fields of the last series whose labels all passed the checks, written the usual
    /// way; empty when the last series' did not.
    labels: &'b [u8],
    /// How many labels that series has (0 when none passed).
    count: usize,
    /// That series' label names, in order (the first `count`; the same bytes, if not always
    /// from that series), and their signatures ([`name_signature`]).
    names: [&'b [u8]; KEPT_NAMES],
    signatures: [u32; KEPT_NAMES],
}

/// Appends `bytes` to `out`: into its spare capacity inline when it has room (the short parts of
/// a line, where a call to `memcpy` for each was a good part of their cost), else the usual way.
#[inline(always)]
fn append(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    let mut spare = Spare {
        spare: out.spare_capacity_mut(),
        len: 0,
    };
    if spare.copy(bytes).is_none() {
        return out.extend_from_slice(bytes);
    }
    // SAFETY: `spare.copy` wrote all of `bytes` at the start of the spare capacity.
    unsafe { out.set_len(start + bytes.len()) };
}

/// Bytes written at the start of a `Vec`'s spare capacity: `len` of them, every one written.
struct Spare<'a> {
    spare: &'a mut [std::mem::MaybeUninit<u8>],
    len: usize,
}

impl Spare<'_> {
    /// Writes `bytes` after those written; `None` (and nothing written) when they do not fit.
    #[inline(always)]
    fn copy(&mut self, bytes: &[u8]) -> Option<()> {
        let to = self.spare.get_mut(self.len..self.len + bytes.len())?;
        copy_short(to, bytes);
        self.len += bytes.len();
        Some(())
    }

    /// Overwrites bytes written before, at `at`; `None` when they were not all written.
    #[inline(always)]
    fn put<const N: usize>(&mut self, at: usize, bytes: [u8; N]) -> Option<()> {
        if at + N > self.len {
            return None;
        }
        put_word::<N>(self.spare, at, &bytes, 0);
        Some(())
    }
}

/// Copies `from` into `to` (of the same length) in a few overlapping words, as `memcpy` does,
/// but inline: the pieces of a line are a few to a few dozen bytes.
#[inline(always)]
fn copy_short(to: &mut [std::mem::MaybeUninit<u8>], from: &[u8]) {
    let len = from.len();
    if len >= 16 {
        let mut at = 0;
        while at + 16 < len {
            put_word::<16>(to, at, from, at);
            at += 16;
        }
        put_word::<16>(to, len - 16, from, len - 16);
    } else if len >= 8 {
        put_word::<8>(to, 0, from, 0);
        put_word::<8>(to, len - 8, from, len - 8);
    } else if len >= 4 {
        put_word::<4>(to, 0, from, 0);
        put_word::<4>(to, len - 4, from, len - 4);
    } else {
        for (to, &from) in to.iter_mut().zip(from) {
            *to = std::mem::MaybeUninit::new(from);
        }
    }
}

/// Copies the `N` bytes of `from` at `from_at` to `to` at `to_at` (nothing when either is out of
/// range, which the callers rule out).
#[inline(always)]
fn put_word<const N: usize>(
    to: &mut [std::mem::MaybeUninit<u8>],
    to_at: usize,
    from: &[u8],
    from_at: usize,
) {
    let word: Option<[u8; N]> = from
        .get(from_at..from_at + N)
        .and_then(|bytes| bytes.try_into().ok());
    if let (Some(word), Some(to)) = (word, to.get_mut(to_at..to_at + N)) {
        for (to, from) in to.iter_mut().zip(word) {
            *to = std::mem::MaybeUninit::new(from);
        }
    }
}

/// A cheap fingerprint of a (non-empty, valid) label name: equal names have equal ones.
#[inline(always)]
fn name_signature(name: &[u8]) -> u32 {
    let first = name.first().copied().unwrap_or(0);
    let last = name.last().copied().unwrap_or(0);
    let middle = name.get(name.len() / 2).copied().unwrap_or(0);
    u32::from_le_bytes([name.len() as u8, first, middle, last])
}

/// A label message written the usual way, `0a <name len> name 12 <value len> value` with both
/// lengths under 128 and nothing else: its name, its value, and its bytes from the name on.
#[inline(always)]
fn short_label_parts(message: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    const NAME_KEY: u8 = (1 << 3) | 2;
    const VALUE_KEY: u8 = (2 << 3) | 2;
    let [NAME_KEY, name_len, ref copied @ ..] = *message else {
        return None;
    };
    let name_len = usize::from(name_len);
    let (name, rest) = copied.split_at_checked(name_len)?;
    let [VALUE_KEY, value_len, ref value @ ..] = *rest else {
        return None;
    };
    (name_len < 0x80 && value_len < 0x80 && value.len() == usize::from(value_len))
        .then_some((name, value, copied))
}

/// Most bytes a line has after its labels: `,quantile="<float>"} <float> <i64>\n` (84).
const MAX_LINE_TAIL: usize = 96;

thread_local! {
    /// The `le` and `quantile` values this thread wrote last (see [`FloatCache`]).
    static EXTRA_VALUES: RefCell<FloatCache> = const { RefCell::new(FloatCache::new()) };
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether a byte of `word` equals `b`: the classic zero-byte test on `word ^ (b × ONES)`, which
/// can flag a byte above a real match but never flags a word without one.
#[inline(always)]
fn word_has(word: u64, b: u8) -> bool {
    let x = word ^ (u64::from(b) * ONES);
    x.wrapping_sub(ONES) & !x & HIGHS != 0
}

/// Whether any eight-byte word of `bytes` passes `word_test`, or any byte of the tail shorter
/// than a word passes `byte_test` (the same question asked of one byte).
///
/// Every byte is tested once at least, some twice: a tail shorter than a word is tested as the
/// last eight bytes (overlapping the word before it), and four to seven bytes as one word made
/// of the first four and the last four (the byte-wise tail was a loop of four tests a byte, for
/// most label values); asking of a byte twice gives the same answer.
#[inline(always)]
fn any_word(bytes: &[u8], word_test: impl Fn(u64) -> bool, byte_test: impl Fn(u8) -> bool) -> bool {
    let word = |at: usize| {
        let mut word = [0u8; 8];
        if let Some(chunk) = bytes.get(at..at + 8) {
            word.copy_from_slice(chunk);
        }
        u64::from_le_bytes(word)
    };
    let half = |at: usize| {
        let mut half = [0u8; 4];
        if let Some(chunk) = bytes.get(at..at + 4) {
            half.copy_from_slice(chunk);
        }
        u64::from(u32::from_le_bytes(half))
    };
    let len = bytes.len();
    if len < 4 {
        return bytes.iter().any(|&b| byte_test(b));
    }
    if len < 8 {
        return word_test(half(0) | half(len - 4) << 32);
    }
    let mut at = 0;
    while at + 8 <= len {
        if word_test(word(at)) {
            return true;
        }
        at += 8;
    }
    at < len && word_test(word(len - 8))
}

/// Whether `bytes` holds a `\\` or a newline (or, with `quotes`, a `"`). Almost no label value
/// does, and every label of every series `/federate` writes is asked: eight bytes at a time
/// (the byte-wise scan did not vectorize, and was a few percent of a scrape).
fn needs_escaping(bytes: &[u8], quotes: bool) -> bool {
    any_word(
        bytes,
        |word| word_has(word, b'\\') || word_has(word, b'\n') || (quotes && word_has(word, b'"')),
        |b| b == b'\\' || b == b'\n' || (quotes && b == b'"'),
    )
}

/// Whether `bytes` holds a byte [`escape_into`] would escape (with quotes), or any byte that is
/// not ASCII (which then needs the UTF-8 check): the one scan a label value written the usual
/// way gets, eight bytes at a time as [`needs_escaping`].
#[inline]
fn needs_escaping_or_utf8(bytes: &[u8]) -> bool {
    any_word(
        bytes,
        |word| {
            word & HIGHS != 0
                || word_has(word, b'\\')
                || word_has(word, b'\n')
                || word_has(word, b'"')
        },
        |b| b >= 0x80 || b == b'\\' || b == b'\n' || b == b'"',
    )
}

/// As [`write_escaped`], for bytes into a `Vec`.
pub(super) fn escape_into(out: &mut Vec<u8>, bytes: &[u8], quotes: bool) {
    if !needs_escaping(bytes, quotes) {
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
pub(super) fn write_escaped<W: Write>(w: &mut W, s: &str, quotes: bool) -> io::Result<()> {
    let bytes = s.as_bytes();
    if !needs_escaping(bytes, quotes) {
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

/// Writes all `families` in text format (see [`write_family`]).
pub fn encode<W: Write>(w: &mut W, families: &[MetricFamily], timestamps: bool) -> io::Result<()> {
    let parts = part_names(families);
    for family in families {
        // A family named like another's lines (an untyped `x_bucket` beside a histogram `x`)
        // would be a second TYPE for `x`'s lines, and a parser (Go's, ours) refuses the whole
        // text for it: left out, as a series that cannot be written is.
        if family.name.as_deref().is_some_and(|n| parts.contains(n)) {
            continue;
        }
        write_family(w, family, timestamps)?;
    }
    Ok(())
}

/// The names a histogram or summary family among `families` writes lines under besides its own
/// (`x_bucket`, `x_sum`, `x_count`; a summary has no `_bucket`), if it writes any series.
fn part_names(families: &[MetricFamily]) -> std::collections::HashSet<String> {
    let mut parts = std::collections::HashSet::new();
    for family in families {
        let kind = family.metric_type();
        let suffixes: &[&str] = match kind {
            MetricType::Histogram | MetricType::GaugeHistogram => &["_bucket", "_sum", "_count"],
            MetricType::Summary => &["_sum", "_count"],
            _ => continue,
        };
        if !family
            .metric
            .iter()
            .any(|m| series_problem(m, kind).is_none())
        {
            continue;
        }
        if let Some(name) = family
            .name
            .as_deref()
            .filter(|n| labels::is_valid_metric_name(n))
        {
            parts.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
        }
    }
    parts
}

#[cfg(test)]
mod escaping_tests {
    use super::{needs_escaping, needs_escaping_or_utf8};

    #[test]
    fn the_word_scan_for_plain_values_finds_what_the_byte_scan_finds() {
        let naive = |bytes: &[u8]| {
            bytes
                .iter()
                .any(|&b| b >= 0x80 || b == b'\\' || b == b'\n' || b == b'"')
        };
        let fillers = [b'a', b']', b'[', b'\x0b', b'#', b'!', b'\x7f', b'\x00'];
        for len in 0..40 {
            for &filler in &fillers {
                let mut bytes = vec![filler; len];
                assert_eq!(needs_escaping_or_utf8(&bytes), naive(&bytes));
                for at in 0..len {
                    for special in [b'\\', b'\n', b'"', b'\\' ^ 1, b'"' ^ 1, 0x80, 0xc3, 0xff] {
                        bytes[at] = special;
                        assert_eq!(needs_escaping_or_utf8(&bytes), naive(&bytes), "{bytes:?}");
                        bytes[at] = filler;
                    }
                }
            }
        }
    }

    #[test]
    fn the_word_scan_finds_what_the_byte_scan_finds() {
        let naive = |bytes: &[u8], quotes: bool| {
            bytes
                .iter()
                .any(|&b| b == b'\\' || b == b'\n' || (quotes && b == b'"'))
        };
        // Every special byte at every place of every length to 40, among bytes that are close
        // to them (one bit off: what the zero-byte test could confuse) or above 0x7f.
        let fillers = [
            b'a', b']', b'[', b'\x0b', b'\x08', b'#', b'!', 0x80, 0xdc, 0xff,
        ];
        for len in 0..40 {
            for &filler in &fillers {
                let mut bytes = vec![filler; len];
                for quotes in [false, true] {
                    assert_eq!(needs_escaping(&bytes, quotes), naive(&bytes, quotes));
                }
                for at in 0..len {
                    for special in [b'\\', b'\n', b'"', b'\\' ^ 1, b'\n' ^ 1, b'"' ^ 1] {
                        bytes[at] = special;
                        for quotes in [false, true] {
                            assert_eq!(
                                needs_escaping(&bytes, quotes),
                                naive(&bytes, quotes),
                                "{bytes:?} quotes={quotes}"
                            );
                        }
                        bytes[at] = filler;
                    }
                }
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes: Vec<u8> = x
                .to_le_bytes()
                .iter()
                .chain(&(x >> 3).to_le_bytes())
                .copied()
                .collect();
            for quotes in [false, true] {
                assert_eq!(needs_escaping(&bytes, quotes), naive(&bytes, quotes));
            }
        }
    }
}

#[cfg(test)]
mod copy_tests {
    use super::append;

    #[test]
    fn appended_bytes_are_the_bytes_at_every_length_with_room_or_without() {
        let source: Vec<u8> = (0..100u8).map(|b| b.wrapping_mul(37) ^ 0x5a).collect();
        for len in 0..source.len() {
            for room in [0, len / 2, len, len + 16] {
                let mut out = Vec::with_capacity(3 + room);
                out.extend_from_slice(b"abc");
                append(&mut out, &source[..len]);
                append(&mut out, b"!");
                let expected = [&b"abc"[..], &source[..len], b"!"].concat();
                assert_eq!(out, expected, "len {len} room {room}");
            }
        }
    }
}
