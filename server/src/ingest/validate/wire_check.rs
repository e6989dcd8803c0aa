//! The fast path of validation: a protobuf-delimited body checked on its wire views, without
//! decoding it into owned values, to tell whether it can be stored exactly as it came.

use std::collections::BTreeMap;
use std::mem::size_of;
use std::time::SystemTime;

use telemeter_common::delimited;
use telemeter_common::labels;
use telemeter_common::model::{Bucket, LabelPair, MetricType, Quantile};
use telemeter_common::text;
use telemeter_common::wire::{self, FamilyView, MetricView, Value};

use super::Rules;

/// What [`Rules::check_wire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireCheck {
    /// The body is valid and [`Rules::apply`] would store exactly its families, with the same
    /// series and labels: it can be stored as it is.
    Unchanged {
        /// Series in the body.
        series: usize,
        /// Samples in the body (counted as `MetricFamily::sample_count` counts them).
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
        if !self.whitelist.current().is_empty() || !self.extra_labels.is_empty() {
            return WireCheck::Owned;
        }
        let now_ms = telemeter_common::time::sample_millis(now);
        let bounds = (
            now_ms.saturating_sub(telemeter_common::time::duration_millis(self.max_sample_age)),
            now_ms.saturating_add(telemeter_common::time::duration_millis(
                self.max_future_skew,
            )),
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
