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
mod tests {
    use super::*;
    use telemeter_common::model::{Counter, Gauge, Histogram, Summary};

    const NOW_MS: i64 = 1_700_000_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(NOW_MS as u64)
    }

    fn rules() -> Rules {
        Rules {
            partition_label: "_id".into(),
            extra_labels: vec![],
            whitelist: vec![],
            max_sample_age: Duration::from_secs(86_400),
            max_future_skew: Duration::from_secs(300),
            max_samples: 1000,
        }
    }

    fn token() -> BTreeMap<String, String> {
        BTreeMap::from([("_id".to_string(), "a".to_string())])
    }

    fn gauge(name: &str, series: &[(&[(&str, &str)], i64)]) -> MetricFamily {
        MetricFamily {
            name: Some(name.into()),
            help: None,
            r#type: Some(MetricType::Gauge as i32),
            metric: series
                .iter()
                .map(|(labels, ts)| Metric {
                    label: labels.iter().map(|(n, v)| LabelPair::new(n, v)).collect(),
                    gauge: Some(Gauge { value: Some(1.0) }),
                    timestamp_ms: Some(*ts),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn stamps_the_partition_label_and_extra_labels() {
        let mut r = rules();
        r.extra_labels = vec![("region".into(), "eu".into())];
        let v = r
            .apply(
                vec![gauge("up", &[(&[("job", "x")], NOW_MS)])],
                &token(),
                now(),
            )
            .unwrap();
        assert_eq!(v.series, 1);
        let m = &v.families[0].metric[0];
        assert_eq!(m.label_value("_id"), Some("a"));
        assert_eq!(m.label_value("region"), Some("eu"));
        assert_eq!(m.label_value("job"), Some("x"));
    }

    #[test]
    fn a_matching_partition_label_is_accepted() {
        let v = rules()
            .apply(
                vec![gauge("up", &[(&[("_id", "a")], NOW_MS)])],
                &token(),
                now(),
            )
            .unwrap();
        assert_eq!(v.families[0].metric[0].label.len(), 1);
    }

    #[test]
    fn another_partition_value_is_forbidden() {
        let err = rules()
            .apply(
                vec![gauge("up", &[(&[("_id", "b")], NOW_MS)])],
                &token(),
                now(),
            )
            .unwrap_err();
        assert_eq!(err.status(), 403);
        assert_eq!(
            err.to_string(),
            "series up carries _id=\"b\" but the token is for cluster \"a\""
        );
    }

    #[test]
    fn timestamps_are_checked() {
        let r = rules();
        let old = NOW_MS - 86_400_000 - 1;
        let err = r
            .apply(vec![gauge("up", &[(&[], old)])], &token(), now())
            .unwrap_err();
        assert!(matches!(err, ValidationError::TooOld { .. }), "{err}");
        let future = NOW_MS + 300_001;
        let err = r
            .apply(vec![gauge("up", &[(&[], future)])], &token(), now())
            .unwrap_err();
        assert!(matches!(err, ValidationError::InFuture { .. }), "{err}");
        let err = r
            .apply(
                vec![gauge(
                    "up",
                    &[(&[("a", "1")], NOW_MS), (&[("a", "2")], NOW_MS - 1)],
                )],
                &token(),
                now(),
            )
            .unwrap_err();
        assert_eq!(err, ValidationError::Decreasing("up".into()));
        let mut f = gauge("up", &[(&[], NOW_MS)]);
        f.metric[0].timestamp_ms = None;
        let err = r.apply(vec![f], &token(), now()).unwrap_err();
        assert_eq!(err, ValidationError::MissingTimestamp("up".into()));
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn names_types_and_values_are_checked() {
        let r = rules();
        let err = r
            .apply(vec![gauge("1bad", &[(&[], NOW_MS)])], &token(), now())
            .unwrap_err();
        assert_eq!(err, ValidationError::FamilyName("1bad".into()));
        let mut f = gauge("up", &[(&[], NOW_MS)]);
        f.r#type = Some(42);
        assert!(matches!(
            r.apply(vec![f], &token(), now()).unwrap_err(),
            ValidationError::UnknownType { value: 42, .. }
        ));
        let mut f = gauge("up", &[(&[], NOW_MS)]);
        f.metric[0].gauge = None;
        f.metric[0].counter = Some(Counter { value: Some(1.0) });
        assert!(matches!(
            r.apply(vec![f], &token(), now()).unwrap_err(),
            ValidationError::ValueMismatch {
                expected: "gauge",
                ..
            }
        ));
        let err = r
            .apply(
                vec![gauge("up", &[(&[("bad-name", "x")], NOW_MS)])],
                &token(),
                now(),
            )
            .unwrap_err();
        assert!(matches!(err, ValidationError::Labels { .. }), "{err}");
    }

    /// `family` as a family of `kind`, each series with the value that type calls for.
    fn typed(mut family: MetricFamily, kind: MetricType) -> MetricFamily {
        family.r#type = Some(kind as i32);
        for m in &mut family.metric {
            m.gauge = None;
            match kind {
                MetricType::Counter => m.counter = Some(Counter { value: Some(1.0) }),
                MetricType::Gauge => m.gauge = Some(Gauge { value: Some(1.0) }),
                MetricType::Untyped => {
                    m.untyped = Some(telemeter_common::model::Untyped { value: Some(1.0) })
                }
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
        }
        family
    }

    #[test]
    fn labels_the_exposition_cannot_carry_are_refused_on_both_paths() {
        let r = rules();
        for (kind, label, message) in [
            (
                MetricType::Histogram,
                "le",
                "a series of f has label \"le\", which the exposition of a histogram sets itself",
            ),
            (
                MetricType::GaugeHistogram,
                "le",
                "a series of f has label \"le\", which the exposition of a histogram sets itself",
            ),
            (
                MetricType::Summary,
                "quantile",
                "a series of f has label \"quantile\", which the exposition of a summary sets itself",
            ),
            (
                MetricType::Gauge,
                "__name__",
                "a series of f has label \"__name__\": names starting with \"__\" are reserved for Prometheus",
            ),
            (
                MetricType::Counter,
                "__foo",
                "a series of f has label \"__foo\": names starting with \"__\" are reserved for Prometheus",
            ),
        ] {
            // Stamped, so that the fast path would take it were the label fine.
            let family = typed(
                stamped("f", &[("_id", "a"), (label, "1")], &[NOW_MS]),
                kind,
            );
            assert_eq!(both_paths(&r, vec![family.clone()]), WireCheck::Owned, "{label}");
            let err = r.apply(vec![family], &token(), now()).unwrap_err();
            assert_eq!((err.status(), err.to_string().as_str()), (400, message));
        }
        // On the other types, le and quantile are ordinary labels, on both paths.
        for kind in [MetricType::Gauge, MetricType::Counter, MetricType::Untyped] {
            let family = typed(
                stamped(
                    "f",
                    &[("_id", "a"), ("le", "1"), ("quantile", "x")],
                    &[NOW_MS],
                ),
                kind,
            );
            assert!(
                matches!(both_paths(&r, vec![family]), WireCheck::Unchanged { .. }),
                "{kind:?}"
            );
        }
        // A name given twice names the family and the label.
        let err = r
            .apply(
                vec![stamped("f", &[("a", "1"), ("a", "2")], &[NOW_MS])],
                &token(),
                now(),
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a series of f has invalid labels: label \"a\" appears more than once"
        );
    }

    #[test]
    fn labels_the_server_adds_must_be_servable_on_every_series() {
        for fine in ["_id", "region", "cluster", "_x"] {
            assert_eq!(server_label_problem(fine), None, "{fine}");
        }
        for (bad, says) in [
            ("le", "histogram"),
            ("quantile", "summary"),
            ("__name__", "reserved"),
            ("__x", "reserved"),
        ] {
            let problem = server_label_problem(bad).unwrap();
            assert!(problem.contains(says) && problem.contains(bad), "{problem}");
        }
    }

    #[test]
    fn whitelist_keeps_matching_series_only() {
        let mut r = rules();
        r.whitelist = vec![Selector::parse("up{job=\"keep\"}").unwrap()];
        let v = r
            .apply(
                vec![
                    gauge(
                        "up",
                        &[(&[("job", "keep")], NOW_MS), (&[("job", "drop")], NOW_MS)],
                    ),
                    gauge("other", &[(&[("job", "keep")], NOW_MS)]),
                ],
                &token(),
                now(),
            )
            .unwrap();
        assert_eq!(v.series, 1);
        assert_eq!(v.filtered, 2);
        assert_eq!(v.families.len(), 1);
        assert_eq!(v.families[0].metric[0].label_value("job"), Some("keep"));
    }

    #[test]
    fn samples_are_capped() {
        let mut r = rules();
        r.max_samples = 1;
        let err = r
            .apply(
                vec![gauge(
                    "up",
                    &[(&[("a", "1")], NOW_MS), (&[("a", "2")], NOW_MS)],
                )],
                &token(),
                now(),
            )
            .unwrap_err();
        assert_eq!(err.status(), 413);
    }

    #[test]
    fn empty_families_are_dropped() {
        let v = rules()
            .apply(vec![gauge("up", &[])], &token(), now())
            .unwrap();
        assert!(v.families.is_empty());
        assert_eq!(v.series, 0);
    }

    /// Runs both paths on `families`; a fast-path `Unchanged` must be exactly what the owned path
    /// stores for the same body.
    fn both_paths(r: &Rules, families: Vec<MetricFamily>) -> WireCheck {
        let body = delimited::encode(&families);
        let limits = delimited::Limits::default();
        let check = r.check_wire(&body, &limits, &token(), now());
        if let WireCheck::Unchanged {
            series,
            samples,
            element_bytes,
        } = check
        {
            let counts = crate::prescan::count(&body);
            assert_eq!(
                (counts.series, counts.element_bytes()),
                (series, element_bytes)
            );
            let decoded = delimited::decode(&body, &limits).unwrap();
            let owned = r.apply(decoded.clone(), &token(), now()).unwrap();
            assert_eq!(owned.families, decoded, "the owned path would rewrite it");
            assert_eq!((owned.series, owned.filtered), (series, 0));
            let counted: usize = decoded.iter().map(MetricFamily::sample_count).sum();
            assert_eq!(samples, counted);
        }
        check
    }

    fn stamped(name: &str, labels: &[(&str, &str)], ts: &[i64]) -> MetricFamily {
        let series: Vec<(&[(&str, &str)], i64)> = ts.iter().map(|t| (labels, *t)).collect();
        gauge(name, &series)
    }

    #[test]
    fn the_fast_path_takes_stamped_valid_uploads_unchanged() {
        let r = rules();
        let ok = [("_id", "a"), ("job", "x")];
        assert!(matches!(
            both_paths(
                &r,
                vec![
                    stamped("up", &ok, &[NOW_MS, NOW_MS]),
                    stamped("b", &ok, &[NOW_MS])
                ]
            ),
            WireCheck::Unchanged {
                series: 3,
                samples: 3,
                ..
            }
        ));
        // Unsorted labels are fine, as long as none repeats.
        let unsorted = [("job", "x"), ("_id", "a")];
        assert!(matches!(
            both_paths(&r, vec![stamped("up", &unsorted, &[NOW_MS])]),
            WireCheck::Unchanged {
                series: 1,
                samples: 1,
                ..
            }
        ));
        let mut summary = stamped("s", &ok, &[NOW_MS]);
        summary.r#type = Some(MetricType::Summary as i32);
        summary.metric[0].gauge = None;
        summary.metric[0].summary = Some(Summary {
            sample_count: Some(3),
            sample_sum: Some(1.5),
            quantile: vec![Quantile {
                quantile: Some(0.5),
                value: Some(1.0),
            }],
        });
        let mut histogram = stamped("h", &ok, &[NOW_MS]);
        histogram.r#type = Some(MetricType::Histogram as i32);
        histogram.metric[0].gauge = None;
        histogram.metric[0].histogram = Some(Histogram {
            sample_count: Some(3),
            sample_sum: Some(1.5),
            bucket: vec![Bucket {
                cumulative_count: Some(3),
                upper_bound: Some(1.0),
            }],
        });
        assert!(matches!(
            both_paths(&r, vec![summary.clone(), histogram.clone()]),
            WireCheck::Unchanged {
                series: 2,
                samples: 6,
                ..
            }
        ));
        // Each of them carries 3 samples: a cap of 5 is over the limit, 6 is not.
        let mut capped = rules();
        capped.max_samples = 5;
        assert_eq!(
            both_paths(&capped, vec![summary.clone(), histogram.clone()]),
            WireCheck::Owned
        );
        capped.max_samples = 6;
        assert!(matches!(
            both_paths(&capped, vec![summary, histogram]),
            WireCheck::Unchanged {
                series: 2,
                samples: 6,
                ..
            }
        ));
    }

    #[test]
    fn the_fast_path_leaves_rewrites_and_refusals_to_the_owned_path() {
        let r = rules();
        let ok: &[(&str, &str)] = &[("_id", "a")];
        let owned = |r: &Rules, families: Vec<MetricFamily>| {
            assert_eq!(both_paths(r, families), WireCheck::Owned);
        };
        // Rewrites: the partition label to stamp, --label, a whitelist, an empty family.
        owned(&r, vec![stamped("up", &[("job", "x")], &[NOW_MS])]);
        let mut extra = rules();
        extra.extra_labels = vec![("region".into(), "eu".into())];
        owned(&extra, vec![stamped("up", ok, &[NOW_MS])]);
        let mut listed = rules();
        listed.whitelist = vec![Selector::parse("up").unwrap()];
        owned(&listed, vec![stamped("up", ok, &[NOW_MS])]);
        owned(&r, vec![stamped("up", ok, &[NOW_MS]), gauge("empty", &[])]);
        owned(&r, vec![]);
        // Refusals.
        owned(&r, vec![stamped("up", &[("_id", "b")], &[NOW_MS])]);
        owned(&r, vec![stamped("up", ok, &[NOW_MS - 86_400_000 - 1])]);
        owned(&r, vec![stamped("up", ok, &[NOW_MS + 300_001])]);
        owned(&r, vec![stamped("up", ok, &[NOW_MS, NOW_MS - 1])]);
        owned(&r, vec![stamped("1bad", ok, &[NOW_MS])]);
        owned(
            &r,
            vec![stamped("up", &[("_id", "a"), ("bad-name", "x")], &[NOW_MS])],
        );
        owned(
            &r,
            vec![stamped(
                "up",
                &[("_id", "a"), ("x", "1"), ("x", "2")],
                &[NOW_MS],
            )],
        );
        owned(
            &r,
            vec![stamped(
                "up",
                &[("x", "1"), ("_id", "a"), ("x", "1")],
                &[NOW_MS],
            )],
        );
        owned(
            &r,
            vec![stamped("up", &[("_id", "a"), ("x", "")], &[NOW_MS])],
        );
        // Many unsorted labels, with and without a duplicate (past the kept names).
        let names: Vec<String> = (0..20).rev().map(|i| format!("l{i:02}")).collect();
        let mut many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        many.push(("_id", "a"));
        assert!(matches!(
            both_paths(&r, vec![stamped("up", &many, &[NOW_MS])]),
            WireCheck::Unchanged { series: 1, .. }
        ));
        many.push(("l03", "w"));
        owned(&r, vec![stamped("up", &many, &[NOW_MS])]);
        // Unsorted and few: the kept names catch the duplicate.
        owned(
            &r,
            vec![stamped(
                "up",
                &[("x", "1"), ("_id", "a"), ("x", "2")],
                &[NOW_MS],
            )],
        );
        let long = "v".repeat(labels::MAX_VALUE_BYTES + 1);
        owned(
            &r,
            vec![stamped("up", &[("_id", "a"), ("x", &long)], &[NOW_MS])],
        );
        let mut f = stamped("up", ok, &[NOW_MS]);
        f.metric[0].timestamp_ms = None;
        owned(&r, vec![f]);
        let mut f = stamped("up", ok, &[NOW_MS]);
        f.r#type = Some(42);
        owned(&r, vec![f]);
        let mut f = stamped("up", ok, &[NOW_MS]);
        f.metric[0].gauge = None;
        f.metric[0].counter = Some(Counter { value: Some(1.0) });
        owned(&r, vec![f]);
        let mut f = stamped("up", ok, &[NOW_MS]);
        f.metric[0].counter = Some(Counter { value: Some(1.0) });
        owned(&r, vec![f]);
        let mut capped = rules();
        capped.max_samples = 1;
        owned(&capped, vec![stamped("up", ok, &[NOW_MS, NOW_MS])]);
        // A body that does not decode.
        let check = r.check_wire(
            &[0x05, 0x0a],
            &delimited::Limits::default(),
            &token(),
            now(),
        );
        assert_eq!(check, WireCheck::Owned);
    }

    #[test]
    fn the_fast_path_refuses_what_the_decoder_refuses_deep_inside() {
        fn varint(mut v: u64, out: &mut Vec<u8>) {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        fn field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
            out.push(tag);
            varint(bytes.len() as u64, out);
            out.extend_from_slice(bytes);
        }
        // A gauge series whose second label holds a field of wire type 7 (none exists).
        let body = |second_label: &[u8]| {
            let mut label = Vec::new();
            field(0x0a, b"_id", &mut label);
            field(0x12, b"a", &mut label);
            let mut gauge = vec![0x09];
            gauge.extend_from_slice(&1.0f64.to_le_bytes());
            let mut metric = Vec::new();
            field(0x0a, &label, &mut metric);
            field(0x0a, second_label, &mut metric);
            field(0x12, &gauge, &mut metric);
            metric.push(0x30);
            varint(NOW_MS as u64, &mut metric);
            let mut family = Vec::new();
            field(0x0a, b"up", &mut family);
            family.extend_from_slice(&[0x18, MetricType::Gauge as u8]);
            field(0x22, &metric, &mut family);
            let mut body = Vec::new();
            varint(family.len() as u64, &mut body);
            body.extend_from_slice(&family);
            body
        };
        let limits = delimited::Limits::default();
        let good = body(&[0x0a, 1, b'j', 0x12, 1, b'x']);
        assert!(delimited::decode(&good, &limits).is_ok());
        assert!(matches!(
            rules().check_wire(&good, &limits, &token(), now()),
            WireCheck::Unchanged { series: 1, .. }
        ));
        let bad = body(&[0x0a, 1, b'j', 0x0f, 0]);
        assert!(delimited::decode(&bad, &limits).is_err());
        assert_eq!(
            rules().check_wire(&bad, &limits, &token(), now()),
            WireCheck::Owned
        );
        // Over the series cap.
        let capped = delimited::Limits {
            max_series: 0,
            ..limits
        };
        assert_eq!(
            rules().check_wire(&good, &capped, &token(), now()),
            WireCheck::Owned
        );
    }
}
