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
//! Caps: the series count is capped by the decoder (413, see `decode`); this module caps samples at
//! ten per allowed series (413), which bounds histogram and summary uploads as well.
//!
//! Two paths, one set of rules: [`Rules::apply`] here on decoded families (the owned path), and
//! [`Rules::check_wire`] in `wire_check.rs` on the body's wire views (the fast path, which stores
//! a body as it came when the owned path would not change it).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use telemeter_common::labels::{self, LabelError};
use telemeter_common::model::{Metric, MetricFamily, MetricType};
use telemeter_common::selector::{self, Selector};
use telemeter_common::sync::Swap;
use telemeter_common::text::{self, SkipReason};

mod wire_check;

pub use wire_check::WireCheck;

/// What the validator enforces.
#[derive(Clone, Debug)]
pub struct Rules {
    /// The label naming the cluster (`_id`).
    pub partition_label: String,
    /// Labels added to every series after validation (`--label`).
    pub extra_labels: Vec<(String, String)>,
    /// Keep only series matching one of these; empty keeps all. Shared with the reloader, which
    /// replaces it when `--whitelist-file` is read again.
    pub whitelist: Swap<Vec<Selector>>,
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
        let now_ms = telemeter_common::time::sample_millis(now);
        // One whitelist for the whole upload, even if a reload replaces it meanwhile.
        let whitelist = self.whitelist.current();
        let oldest =
            now_ms.saturating_sub(telemeter_common::time::duration_millis(self.max_sample_age));
        let newest = now_ms.saturating_add(telemeter_common::time::duration_millis(
            self.max_future_skew,
        ));
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
            if !whitelist.is_empty() {
                family
                    .metric
                    .retain(|m| selector::any_matches(&whitelist, &name, &m.label));
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

#[cfg(test)]
mod tests;
