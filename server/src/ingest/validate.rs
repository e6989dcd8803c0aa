//! Validation and stamping of an upload's families.
//!
//! Every check upstream made (names, types, labels, value fields, timestamps present, not too old,
//! non-decreasing per family, required labels) answers a client error here instead of upstream's 500,
//! and future timestamps are refused too. The partition label is not trusted from the client: it is
//! set from the token on every series, and a series carrying another value is refused (403).
//!
//! A series whose `/federate` line Prometheus would refuse is refused too (400): a line with a
//! label named twice fails the whole scrape, and so blinds the central Prometheus to every cluster
//! on the server. Beyond duplicates within the series, that is a label the exposition adds itself
//! (`le` on a histogram, `quantile` on a summary) and any `__` name (reserved; `__name__` would
//! repeat the metric name). The rule is [`text::reserved_label`], the one the writer applies too;
//! the labels the server adds (partition, `--label`, `--required-label`) are held to it at start
//! ([`server_label_problem`]).
//!
//! Caps: the series count is capped by the decoder (413, see `upload`); this module caps samples at
//! ten per allowed series (413), which bounds histogram and summary uploads as well.

use std::collections::BTreeMap;
use std::fmt;
use std::mem::size_of;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use telemeter_common::delimited;
use telemeter_common::labels::{self, LabelError};
use telemeter_common::model::{Bucket, LabelPair, Metric, MetricFamily, MetricType, Quantile};
use telemeter_common::selector::{self, Selector};
use telemeter_common::text::{self, SkipReason};
use telemeter_common::wire::{self, FamilyView, MetricView, Value};

/// What the validator enforces.
#[derive(Clone, Debug)]
pub struct Rules {
    /// The label naming the cluster (`_id`).
    pub partition_label: String,
    /// Labels added to every series after validation (`--label`).
    pub extra_labels: Vec<(String, String)>,
    /// Keep only series matching one of these; empty keeps all.
    pub whitelist: Vec<Selector>,
    /// Samples older than now minus this are refused.
    pub max_sample_age: Duration,
    /// Samples newer than now plus this are refused.
    pub max_future_skew: Duration,
    /// Most samples one upload may carry.
    pub max_samples: usize,
}

/// An upload's families after validation, filtering and stamping.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// The families to store (none empty).
    pub families: Vec<MetricFamily>,
    /// Series kept.
    pub series: usize,
    /// Series dropped by the whitelist.
    pub filtered: usize,
}

/// Why an upload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidationError {
    /// A family's name is missing or invalid.
    FamilyName(String),
    /// A family's type is not one we know.
    UnknownType {
        /// The family.
        family: String,
        /// The type number.
        value: i32,
    },
    /// A series' labels are invalid.
    Labels {
        /// The family.
        family: String,
        /// What was wrong.
        error: LabelError,
    },
    /// A series carries a label its exposition cannot: reserved, or the one its type adds.
    UnservableLabel {
        /// The family.
        family: String,
        /// The family's type.
        kind: MetricType,
        /// The label.
        label: String,
        /// [`SkipReason::ReservedLabel`] or [`SkipReason::TypeLabel`].
        reason: SkipReason,
    },
    /// A series lacks the value field of its family's type.
    ValueMismatch {
        /// The family.
        family: String,
        /// The family's type.
        expected: &'static str,
    },
    /// A sample has no timestamp.
    MissingTimestamp(String),
    /// A sample is older than the cutoff.
    TooOld {
        /// The family.
        family: String,
        /// The sample's timestamp, ms.
        timestamp_ms: i64,
    },
    /// A sample is too far in the future.
    InFuture {
        /// The family.
        family: String,
        /// The sample's timestamp, ms.
        timestamp_ms: i64,
    },
    /// Timestamps go backwards within a family.
    Decreasing(String),
    /// A series carries a token label (the partition label included) with another value.
    LabelOverride {
        /// The family.
        family: String,
        /// The label.
        label: String,
        /// The value the series carries.
        value: String,
        /// The value the token requires.
        expected: String,
        /// Whether the label is the partition label.
        partition: bool,
    },
    /// More samples than allowed.
    TooManySamples {
        /// The limit.
        limit: usize,
    },
}

impl ValidationError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ValidationError::LabelOverride { .. } => 403,
            ValidationError::TooManySamples { .. } => 413,
            _ => 400,
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValidationError::FamilyName(name) => write!(f, "invalid metric family name {name:?}"),
            ValidationError::UnknownType { family, value } => {
                write!(f, "family {family} has unknown type {value}")
            }
            ValidationError::Labels { family, error } => {
                write!(f, "a series of {family} has invalid labels: {error}")
            }
            ValidationError::UnservableLabel {
                family,
                kind,
                label,
                reason: SkipReason::TypeLabel,
            } => write!(
                f,
                "a series of {family} has label {label:?}, which the exposition of a {} sets itself",
                type_name(*kind)
            ),
            ValidationError::UnservableLabel { family, label, .. } => write!(
                f,
                "a series of {family} has label {label:?}: names starting with \"__\" are reserved for Prometheus"
            ),
            ValidationError::ValueMismatch { family, expected } => {
                write!(f, "a series of {family} has no {expected} value")
            }
            ValidationError::MissingTimestamp(family) => {
                write!(f, "a sample of {family} has no timestamp")
            }
            ValidationError::TooOld {
                family,
                timestamp_ms,
            } => write!(
                f,
                "a sample of {family} is too old (timestamp {timestamp_ms} ms)"
            ),
            ValidationError::InFuture {
                family,
                timestamp_ms,
            } => write!(
                f,
                "a sample of {family} is in the future (timestamp {timestamp_ms} ms)"
            ),
            ValidationError::Decreasing(family) => {
                write!(f, "timestamps of {family} are not in increasing order")
            }
            ValidationError::LabelOverride {
                family,
                label,
                value,
                expected,
                partition: true,
            } => write!(
                f,
                "series {family} carries {label}={value:?} but the token is for cluster {expected:?}"
            ),
            ValidationError::LabelOverride {
                family,
                label,
                value,
                expected,
                partition: false,
            } => write!(
                f,
                "series {family} carries {label}={value:?} but the token requires {label}={expected:?}"
            ),
            ValidationError::TooManySamples { limit } => {
                write!(f, "the upload has more than {limit} samples")
            }
        }
    }
}

impl std::error::Error for ValidationError {}

impl Rules {
    /// Validates `families` pushed for a token whose labels are `token_labels` (the partition label
    /// included), at `now`; returns what to store.
    pub fn apply(
        &self,
        families: Vec<MetricFamily>,
        token_labels: &BTreeMap<String, String>,
        now: SystemTime,
    ) -> Result<Validated, ValidationError> {
        let now_ms = millis(now);
        let oldest = now_ms.saturating_sub(duration_ms(self.max_sample_age));
        let newest = now_ms.saturating_add(duration_ms(self.max_future_skew));
        let samples: usize = families.iter().map(MetricFamily::sample_count).sum();
        if samples > self.max_samples {
            return Err(ValidationError::TooManySamples {
                limit: self.max_samples,
            });
        }

        let mut out = Validated {
            families: Vec::with_capacity(families.len()),
            series: 0,
            filtered: 0,
        };
        for mut family in families {
            let name = family.name.clone().unwrap_or_default();
            if labels::check_metric_name(&name).is_err() {
                return Err(ValidationError::FamilyName(name));
            }
            let kind = match family.r#type {
                None => MetricType::Untyped,
                Some(value) => {
                    MetricType::try_from(value).map_err(|_| ValidationError::UnknownType {
                        family: name.clone(),
                        value,
                    })?
                }
            };
            let mut previous_ts = i64::MIN;
            for metric in &mut family.metric {
                labels::check_series_labels(metric).map_err(|error| ValidationError::Labels {
                    family: name.clone(),
                    error,
                })?;
                check_servable(&name, kind, metric)?;
                check_value(&name, kind, metric)?;
                let ts = metric
                    .timestamp_ms
                    .ok_or_else(|| ValidationError::MissingTimestamp(name.clone()))?;
                if ts < oldest {
                    return Err(ValidationError::TooOld {
                        family: name,
                        timestamp_ms: ts,
                    });
                }
                if ts > newest {
                    return Err(ValidationError::InFuture {
                        family: name,
                        timestamp_ms: ts,
                    });
                }
                if ts < previous_ts {
                    return Err(ValidationError::Decreasing(name));
                }
                previous_ts = ts;
                stamp_token_labels(&name, metric, token_labels, &self.partition_label)?;
            }
            let before = family.metric.len();
            if !self.whitelist.is_empty() {
                family
                    .metric
                    .retain(|m| selector::any_matches(&self.whitelist, &name, &m.label));
            }
            out.filtered += before - family.metric.len();
            if family.metric.is_empty() {
                continue;
            }
            for metric in &mut family.metric {
                for (label, value) in &self.extra_labels {
                    metric.set_label(label, value);
                }
            }
            out.series += family.metric.len();
            out.families.push(family);
        }
        Ok(out)
    }
}

/// What [`Rules::check_wire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireCheck {
    /// The body is valid and [`Rules::apply`] would store exactly its families, with the same
    /// series and labels: it can be stored as it is.
    Unchanged {
        /// Series in the body.
        series: usize,
        /// Samples in the body (counted as [`MetricFamily::sample_count`] counts them).
        samples: usize,
        /// Bytes decoding it would allocate for label, quantile and bucket structs (as the
        /// upload's pre-decode scan counts them, so the same cap can be applied without it).
        element_bytes: usize,
    },
    /// The body needs the owned path: it has to be rewritten (a token label to stamp, `--label`,
    /// a whitelist, an empty family), or it is refused, and the owned path says why in the very
    /// words it always has.
    Owned,
}

impl Rules {
    /// The fast path of an upload: validates a protobuf-delimited `body` on its wire views (no
    /// decoding into owned values) with `limits` (those the owned decoder would get), and says
    /// whether it can be stored unchanged. Upstream clients and ours stamp the partition label
    /// themselves, so a valid upload usually can.
    ///
    /// Only a `WireCheck::Unchanged` is a decision: it is given only when [`Rules::apply`] would
    /// accept the decoded body without changing a series. Anything else (including every kind of
    /// invalid body) is `WireCheck::Owned`, so refusals keep their statuses and messages exactly.
    pub fn check_wire(
        &self,
        body: &[u8],
        limits: &delimited::Limits,
        token_labels: &BTreeMap<String, String>,
        now: SystemTime,
    ) -> WireCheck {
        if !self.whitelist.is_empty() || !self.extra_labels.is_empty() {
            return WireCheck::Owned;
        }
        let now_ms = millis(now);
        let bounds = (
            now_ms.saturating_sub(duration_ms(self.max_sample_age)),
            now_ms.saturating_add(duration_ms(self.max_future_skew)),
        );
        // One pass reads every field the owned decoder would (the views check each message as it
        // is read, and every series, label, quantile and bucket is read below), so a body it
        // accepts decodes too.
        let mut total = Counted::default();
        for family in wire::families(body, limits) {
            let Ok(family) = family else {
                return WireCheck::Owned;
            };
            if self
                .check_wire_family(&family, token_labels, bounds, &mut total)
                .is_none()
            {
                return WireCheck::Owned;
            }
            if total.series > limits.max_series {
                return WireCheck::Owned;
            }
        }
        if total.samples > self.max_samples || total.series == 0 {
            return WireCheck::Owned;
        }
        WireCheck::Unchanged {
            series: total.series,
            samples: total.samples,
            element_bytes: total
                .labels
                .saturating_mul(size_of::<LabelPair>())
                .saturating_add(total.quantiles.saturating_mul(size_of::<Quantile>()))
                .saturating_add(total.buckets.saturating_mul(size_of::<Bucket>())),
        }
    }

    /// One family on the fast path: `Some` when it passes every check unchanged; what it holds
    /// is added to `total`.
    fn check_wire_family(
        &self,
        family: &FamilyView<'_>,
        token_labels: &BTreeMap<String, String>,
        (oldest, newest): (i64, i64),
        total: &mut Counted,
    ) -> Option<()> {
        labels::check_metric_name(family.name).ok()?;
        let kind = match family.raw_type {
            None => MetricType::Untyped,
            Some(value) => MetricType::try_from(value).ok()?,
        };
        let mut previous_ts = i64::MIN;
        let mut series = 0usize;
        for metric in family.metrics() {
            let metric = metric.ok()?;
            series += 1;
            count_wire_samples(&metric, kind, total)?;
            let ts = metric.timestamp_ms?;
            if ts < oldest || ts > newest || ts < previous_ts {
                return None;
            }
            previous_ts = ts;
            let labels = check_wire_labels(&metric, kind, token_labels)?;
            total.labels = total.labels.saturating_add(labels);
        }
        total.series = total.series.saturating_add(series);
        // An empty family is dropped by the owned path: the body would change.
        (series > 0).then_some(())
    }
}

/// What the fast path counted so far.
#[derive(Default)]
struct Counted {
    series: usize,
    samples: usize,
    labels: usize,
    quantiles: usize,
    buckets: usize,
}

/// Counts the samples (and quantiles or buckets) of one series whose value field is the one
/// `kind` calls for (and the only one); `None` otherwise.
fn count_wire_samples(
    metric: &MetricView<'_>,
    kind: MetricType,
    total: &mut Counted,
) -> Option<()> {
    let samples = match (metric.value, kind) {
        (Value::Gauge(_), MetricType::Gauge)
        | (Value::Counter(_), MetricType::Counter)
        | (Value::Untyped(_), MetricType::Untyped) => 1,
        (Value::Summary(summary), MetricType::Summary) => {
            let mut n = 0usize;
            for quantile in summary.quantiles() {
                quantile.ok()?;
                n += 1;
            }
            total.quantiles = total.quantiles.saturating_add(n);
            n + 2
        }
        (Value::Histogram(histogram), MetricType::Histogram | MetricType::GaugeHistogram) => {
            let mut n = 0usize;
            for bucket in histogram.buckets() {
                bucket.ok()?;
                n += 1;
            }
            total.buckets = total.buckets.saturating_add(n);
            n + 2
        }
        _ => return None,
    };
    total.samples = total.samples.saturating_add(samples);
    Some(())
}

/// Label names kept per series for the duplicate check without re-reading the labels.
const KEPT_NAMES: usize = 16;

/// [`labels::check_series_labels`], [`check_servable`] and the token labels on the wire: `Some`
/// when every label is valid and servable in a family of `kind`, and every token label is already
/// there with its value. An empty value is sent to the owned path, which alone can tell an
/// absent value (refused) from an empty one.
fn check_wire_labels(
    metric: &MetricView<'_>,
    kind: MetricType,
    token_labels: &BTreeMap<String, String>,
) -> Option<usize> {
    // The first names, kept for the duplicate check of unsorted labels (small, so cheap to set up).
    let mut names: [&str; KEPT_NAMES] = [""; KEPT_NAMES];
    let mut count = 0usize;
    let mut sorted = true;
    let mut previous = "";
    let mut found = 0usize;
    for label in metric.labels() {
        let (name, value) = label.ok()?;
        if name.len() > labels::MAX_NAME_BYTES
            || !labels::is_valid_label_name(name)
            || text::reserved_label(kind, name).is_some()
            || value.is_empty()
            || value.len() > labels::MAX_VALUE_BYTES
        {
            return None;
        }
        count += 1;
        if count > labels::MAX_LABELS {
            return None;
        }
        sorted &= count == 1 || previous < name;
        previous = name;
        if let Some(slot) = names.get_mut(count - 1) {
            *slot = name;
        }
        // A scan with the length compared first: the token has one or two labels, and most names
        // differ from them in length, so no string comparison runs for them.
        if let Some((_, expected)) = token_labels
            .iter()
            .find(|(k, _)| k.len() == name.len() && *k == name)
        {
            if expected != value {
                return None;
            }
            found += 1;
        }
    }
    // Sorted labels rule out duplicates at once. Clients that stamp `_id` append it, so unsorted
    // is common too: compare the kept names pairwise, or re-read the labels when there are more.
    if !sorted && count <= KEPT_NAMES {
        let kept = names.get(..count).unwrap_or_default();
        for (i, name) in kept.iter().enumerate() {
            if kept.get(i + 1..).unwrap_or_default().contains(name) {
                return None;
            }
        }
    } else if !sorted {
        for (i, label) in metric.labels().enumerate() {
            let (name, _) = label.ok()?;
            if metric
                .labels()
                .skip(i + 1)
                .any(|l| l.is_ok_and(|(n, _)| n == name))
            {
                return None;
            }
        }
    }
    // Every token label present (no duplicates, so each was counted once).
    (found == token_labels.len()).then_some(count)
}

/// Checks each token label against the series and sets it (the client may omit it; it may not
/// override it).
fn stamp_token_labels(
    family: &str,
    metric: &mut Metric,
    token_labels: &BTreeMap<String, String>,
    partition_label: &str,
) -> Result<(), ValidationError> {
    for (label, expected) in token_labels {
        match metric.label_value(label) {
            Some(value) if value == expected => {}
            Some(value) => {
                return Err(ValidationError::LabelOverride {
                    family: family.to_string(),
                    label: label.clone(),
                    value: value.to_string(),
                    expected: expected.clone(),
                    partition: label == partition_label,
                })
            }
            None => metric.set_label(label, expected),
        }
    }
    Ok(())
}

/// Refuses a series with a label its `/federate` line cannot carry ([`text::reserved_label`]).
fn check_servable(family: &str, kind: MetricType, metric: &Metric) -> Result<(), ValidationError> {
    for pair in &metric.label {
        let label = pair.name.as_deref().unwrap_or("");
        if let Some(reason) = text::reserved_label(kind, label) {
            return Err(ValidationError::UnservableLabel {
                family: family.to_string(),
                kind,
                label: label.to_string(),
                reason,
            });
        }
    }
    Ok(())
}

/// A type as the text format names it.
fn type_name(kind: MetricType) -> &'static str {
    match kind {
        MetricType::Counter => "counter",
        MetricType::Gauge => "gauge",
        MetricType::Summary => "summary",
        MetricType::Untyped => "untyped metric",
        MetricType::Histogram | MetricType::GaugeHistogram => "histogram",
    }
}

/// Why the server may not put label `name` on every series (`--partition-label`, `--label`,
/// `--required-label`): every histogram or summary, or every series, would then be refused or
/// left out of `/federate`. `None` when it may.
pub fn server_label_problem(name: &str) -> Option<String> {
    [MetricType::Histogram, MetricType::Summary]
        .into_iter()
        .find_map(|kind| Some((kind, text::reserved_label(kind, name)?)))
        .map(|(kind, reason)| match reason {
            SkipReason::TypeLabel => format!(
                "{name:?} is the label the exposition of a {} sets itself",
                type_name(kind)
            ),
            _ => format!("{name:?} starts with \"__\", which is reserved for Prometheus"),
        })
}

fn check_value(family: &str, kind: MetricType, metric: &Metric) -> Result<(), ValidationError> {
    let (present, expected) = match kind {
        MetricType::Counter => (metric.counter.is_some(), "counter"),
        MetricType::Gauge => (metric.gauge.is_some(), "gauge"),
        MetricType::Summary => (metric.summary.is_some(), "summary"),
        MetricType::Untyped => (metric.untyped.is_some(), "untyped"),
        MetricType::Histogram | MetricType::GaugeHistogram => {
            (metric.histogram.is_some(), "histogram")
        }
    };
    if present {
        Ok(())
    } else {
        Err(ValidationError::ValueMismatch {
            family: family.to_string(),
            expected,
        })
    }
}

fn millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
