//! The transform pipeline, one small function per step, in DESIGN order:
//! select → add `--label` → rename → elide → drop invalid/too-old → sort → anonymize → stamp the
//! `/authorize` labels.
//!
//! Selection comes first because Prometheus's `/federate` honours `match[]` but a plain `/metrics`
//! endpoint (or a `/federate` that ignores `match[]`) does not; applying the selectors here too
//! means only what was asked for ever leaves the site.
//!
//! Timestamps: Prometheus's `/federate` stamps every sample, a plain `/metrics` endpoint does not.
//! A sample without a timestamp is given the scrape time (upstream dropped it, which made `/metrics`
//! URLs useless), so the server, which requires timestamps, accepts it.

use std::collections::BTreeMap;
use std::time::Duration;
use telemeter_common::labels;
use telemeter_common::model::{MetricFamily, MetricType};
use telemeter_common::selector::{self, Selector};

/// Samples older than this are dropped (the server refuses them).
pub const MAX_SAMPLE_AGE: Duration = Duration::from_secs(24 * 3600);
/// Samples further than this in the future are dropped (clock skew the server tolerates).
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(5 * 60);

/// Everything the steps before the push need.
#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    /// Series selectors; a series must match one.
    pub matches: Vec<Selector>,
    /// Labels added to every series.
    pub labels: Vec<(String, String)>,
    /// Metric renames, old to new.
    pub renames: Vec<(String, String)>,
    /// Labels removed.
    pub elide_labels: Vec<String>,
    /// Labels anonymized.
    pub anonymize_labels: Vec<String>,
    /// The anonymization salt.
    pub anonymize_salt: String,
}

/// What the pipeline removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filtered {
    /// Series no selector matched.
    pub unselected: usize,
    /// Series dropped as invalid or too old/new.
    pub invalid: usize,
}

impl Pipeline {
    /// Runs every step but the last (the `/authorize` labels are stamped by the push, which knows
    /// them). `now_ms` is the scrape time in milliseconds since the epoch.
    pub fn apply(&self, families: &mut Vec<MetricFamily>, now_ms: i64) -> Filtered {
        let unselected = select(families, &self.matches);
        add_labels(families, &self.labels);
        rename(families, &self.renames);
        elide_labels(families, &self.elide_labels);
        let invalid = drop_invalid(families, now_ms);
        sort_by_timestamp(families);
        anonymize(families, &self.anonymize_salt, &self.anonymize_labels);
        Filtered {
            unselected,
            invalid,
        }
    }
}

/// Keeps the series at least one of `selectors` matches (all when there are none); drops families
/// left empty. Returns how many series were dropped.
pub fn select(families: &mut Vec<MetricFamily>, selectors: &[Selector]) -> usize {
    if selectors.is_empty() {
        return 0;
    }
    let mut dropped = 0;
    for family in families.iter_mut() {
        let name = family.name.clone().unwrap_or_default();
        let before = family.metric.len();
        family
            .metric
            .retain(|m| selector::any_matches(selectors, &name, &m.label));
        dropped += before - family.metric.len();
    }
    families.retain(|f| !f.metric.is_empty());
    dropped
}

/// Sets each `(name, value)` on every series, replacing a scraped value.
pub fn add_labels(families: &mut [MetricFamily], labels: &[(String, String)]) {
    if labels.is_empty() {
        return;
    }
    for metric in families.iter_mut().flat_map(|f| f.metric.iter_mut()) {
        for (name, value) in labels {
            metric.set_label(name, value);
        }
    }
}

/// Renames families named `old` to `new`.
pub fn rename(families: &mut [MetricFamily], renames: &[(String, String)]) {
    for family in families.iter_mut() {
        if let Some((_, new)) = renames
            .iter()
            .find(|(old, _)| family.name.as_deref() == Some(old.as_str()))
        {
            family.name = Some(new.clone());
        }
    }
}

/// Removes the labels named in `names` from every series.
pub fn elide_labels(families: &mut [MetricFamily], names: &[String]) {
    if names.is_empty() {
        return;
    }
    for metric in families.iter_mut().flat_map(|f| f.metric.iter_mut()) {
        metric
            .label
            .retain(|l| !names.iter().any(|n| l.name.as_deref() == Some(n.as_str())));
    }
}

fn value_matches_type(metric: &telemeter_common::model::Metric, kind: MetricType) -> bool {
    match kind {
        MetricType::Counter => metric.counter.is_some_and(|c| c.value.is_some()),
        MetricType::Gauge => metric.gauge.is_some_and(|g| g.value.is_some()),
        MetricType::Untyped => metric.untyped.is_some_and(|u| u.value.is_some()),
        MetricType::Summary => metric.summary.is_some(),
        MetricType::Histogram | MetricType::GaugeHistogram => metric.histogram.is_some(),
    }
}

/// Drops what the server would refuse: families with an invalid name or unknown type, series with
/// invalid labels or a value that does not fit the type, samples older than [`MAX_SAMPLE_AGE`] or
/// more than [`MAX_FUTURE_SKEW`] ahead of `now_ms`. Samples without a timestamp get `now_ms`.
/// Returns how many series were dropped.
pub fn drop_invalid(families: &mut Vec<MetricFamily>, now_ms: i64) -> usize {
    let oldest = now_ms.saturating_sub(MAX_SAMPLE_AGE.as_millis() as i64);
    let newest = now_ms.saturating_add(MAX_FUTURE_SKEW.as_millis() as i64);
    let mut dropped = 0;
    families.retain_mut(|family| {
        let name_ok = family
            .name
            .as_deref()
            .is_some_and(|n| labels::check_metric_name(n).is_ok());
        let kind = match family.r#type {
            None => Some(MetricType::Untyped),
            Some(t) => MetricType::try_from(t).ok(),
        };
        let Some(kind) = kind.filter(|_| name_ok) else {
            dropped += family.metric.len();
            return false;
        };
        let before = family.metric.len();
        family.metric.retain_mut(|m| {
            let ts = *m.timestamp_ms.get_or_insert(now_ms);
            value_matches_type(m, kind)
                && ts >= oldest
                && ts <= newest
                && labels::check_series_labels(m).is_ok()
        });
        dropped += before - family.metric.len();
        !family.metric.is_empty()
    });
    dropped
}

/// Orders the series of each family by timestamp (stable, so equal timestamps keep their order):
/// the server requires non-decreasing timestamps within a family.
pub fn sort_by_timestamp(families: &mut [MetricFamily]) {
    for family in families.iter_mut() {
        family.metric.sort_by_key(|m| m.timestamp_ms.unwrap_or(0));
    }
}

/// Replaces the values of the labels in `names` with their salted hash (upstream's algorithm);
/// empty values, which mean the label is absent, stay empty as upstream leaves them.
pub fn anonymize(families: &mut [MetricFamily], salt: &str, names: &[String]) {
    if names.is_empty() {
        return;
    }
    crate::anonymize::anonymize_labels(families, salt, names);
}

/// Sets the labels `/authorize` returned on every series, replacing existing values (the server
/// refuses a series whose partition label disagrees with the token).
pub fn stamp_labels(families: &mut [MetricFamily], labels: &BTreeMap<String, String>) {
    if labels.is_empty() {
        return;
    }
    for metric in families.iter_mut().flat_map(|f| f.metric.iter_mut()) {
        for (name, value) in labels {
            metric.set_label(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemeter_common::model::{Counter, Gauge, LabelPair, Metric};

    const NOW: i64 = 1_700_000_000_000;

    fn gauge(labels: &[(&str, &str)], ts: Option<i64>) -> Metric {
        Metric {
            label: labels.iter().map(|(n, v)| LabelPair::new(n, v)).collect(),
            gauge: Some(Gauge { value: Some(1.0) }),
            timestamp_ms: ts,
            ..Default::default()
        }
    }

    fn family(name: &str, metrics: Vec<Metric>) -> MetricFamily {
        MetricFamily {
            name: Some(name.into()),
            r#type: Some(MetricType::Gauge as i32),
            metric: metrics,
            ..Default::default()
        }
    }

    fn labels_of(m: &Metric) -> Vec<(String, String)> {
        m.label
            .iter()
            .map(|l| {
                (
                    l.name.clone().unwrap_or_default(),
                    l.value.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn add_labels_sets_and_overrides() {
        let mut f = vec![family(
            "up",
            vec![gauge(&[("a", "1"), ("env", "old")], None)],
        )];
        add_labels(
            &mut f,
            &[("env".into(), "prod".into()), ("b".into(), "2".into())],
        );
        assert_eq!(
            labels_of(&f[0].metric[0]),
            vec![
                ("a".into(), "1".into()),
                ("env".into(), "prod".into()),
                ("b".into(), "2".into())
            ]
        );
    }

    #[test]
    fn rename_changes_only_the_named_family() {
        let mut f = vec![family("ALERTS", vec![]), family("up", vec![])];
        rename(&mut f, &[("ALERTS".into(), "alerts".into())]);
        assert_eq!(f[0].name.as_deref(), Some("alerts"));
        assert_eq!(f[1].name.as_deref(), Some("up"));
    }

    #[test]
    fn elide_removes_labels() {
        let mut f = vec![family("up", vec![gauge(&[("a", "1"), ("pod", "x")], None)])];
        elide_labels(&mut f, &["pod".into(), "absent".into()]);
        assert_eq!(labels_of(&f[0].metric[0]), vec![("a".into(), "1".into())]);
    }

    #[test]
    fn drop_invalid_filters_and_stamps() {
        let old = NOW - MAX_SAMPLE_AGE.as_millis() as i64 - 1;
        let future = NOW + MAX_FUTURE_SKEW.as_millis() as i64 + 1;
        let mut wrong_value = gauge(&[], Some(NOW));
        wrong_value.gauge = None;
        wrong_value.counter = Some(Counter { value: Some(1.0) });
        let mut f = vec![
            family(
                "up",
                vec![
                    gauge(&[("a", "ok")], Some(NOW - 1000)),
                    gauge(&[("a", "old")], Some(old)),
                    gauge(&[("a", "future")], Some(future)),
                    gauge(&[("a", "none")], None),
                    gauge(&[("1bad", "x")], Some(NOW)),
                    wrong_value,
                ],
            ),
            family("bad name", vec![gauge(&[], Some(NOW))]),
            family("all_old", vec![gauge(&[], Some(old))]),
        ];
        let dropped = drop_invalid(&mut f, NOW);
        assert_eq!(dropped, 6);
        assert_eq!(f.len(), 1);
        let kept: Vec<_> = f[0]
            .metric
            .iter()
            .map(|m| (m.label_value("a").unwrap_or("").to_string(), m.timestamp_ms))
            .collect();
        assert_eq!(
            kept,
            vec![("ok".into(), Some(NOW - 1000)), ("none".into(), Some(NOW))]
        );
    }

    #[test]
    fn unknown_type_drops_the_family() {
        let mut fam = family("x", vec![gauge(&[], Some(NOW))]);
        fam.r#type = Some(42);
        let mut f = vec![fam];
        assert_eq!(drop_invalid(&mut f, NOW), 1);
        assert!(f.is_empty());
    }

    #[test]
    fn sort_is_by_timestamp_and_stable() {
        let mut f = vec![family(
            "up",
            vec![
                gauge(&[("i", "a")], Some(3)),
                gauge(&[("i", "b")], Some(1)),
                gauge(&[("i", "c")], Some(3)),
                gauge(&[("i", "d")], Some(2)),
            ],
        )];
        sort_by_timestamp(&mut f);
        let order: Vec<_> = f[0]
            .metric
            .iter()
            .map(|m| m.label_value("i").unwrap_or(""))
            .collect();
        assert_eq!(order, vec!["b", "d", "a", "c"]);
    }

    #[test]
    fn anonymize_matches_upstream_vectors() {
        let mut f = vec![family(
            "up",
            vec![gauge(&[("instance", "localhost:9005"), ("job", "j")], None)],
        )];
        anonymize(&mut f, "a-unique-value", &["instance".into()]);
        assert_eq!(f[0].metric[0].label_value("instance"), Some("pzMPIS6aBuSI"));
        assert_eq!(f[0].metric[0].label_value("job"), Some("j"));
    }

    #[test]
    fn anonymize_leaves_the_empty_instance_of_alerts_alone() {
        let mut f = vec![family(
            "ALERTS",
            vec![gauge(&[("alertname", "A"), ("instance", "")], None)],
        )];
        anonymize(&mut f, "a-unique-value", &["instance".into()]);
        assert_eq!(f[0].metric[0].label_value("instance"), Some(""));
    }

    #[test]
    fn stamp_overrides_existing_values() {
        let mut f = vec![family("up", vec![gauge(&[("_id", "forged")], None)])];
        let labels = BTreeMap::from([("_id".to_string(), "real".to_string())]);
        stamp_labels(&mut f, &labels);
        assert_eq!(
            labels_of(&f[0].metric[0]),
            vec![("_id".into(), "real".into())]
        );
    }

    #[test]
    fn select_keeps_only_matched_series() {
        let sel = vec![
            Selector::parse(r#"{__name__="up"}"#).unwrap(),
            Selector::parse(r#"b{x="1"}"#).unwrap(),
        ];
        let mut f = vec![
            family("up", vec![gauge(&[], None)]),
            family(
                "b",
                vec![gauge(&[("x", "1")], None), gauge(&[("x", "2")], None)],
            ),
            family("c", vec![gauge(&[], None)]),
        ];
        assert_eq!(select(&mut f, &sel), 2);
        let names: Vec<_> = f.iter().map(|f| f.name.as_deref().unwrap_or("")).collect();
        assert_eq!(names, vec!["up", "b"]);
        assert_eq!(f[1].metric.len(), 1);
    }

    #[test]
    fn pipeline_runs_in_design_order() {
        // --label then rename then elide: a label added and then elided is gone; anonymize sees
        // the added label's value.
        let p = Pipeline {
            matches: vec![],
            labels: vec![("site".into(), "s1".into()), ("tmp".into(), "x".into())],
            renames: vec![("ALERTS".into(), "alerts".into())],
            elide_labels: vec!["tmp".into()],
            anonymize_labels: vec!["site".into()],
            anonymize_salt: "salt".into(),
        };
        let mut f = vec![family("ALERTS", vec![gauge(&[], None)])];
        let filtered = p.apply(&mut f, NOW);
        assert_eq!(filtered, Filtered::default());
        assert_eq!(f[0].name.as_deref(), Some("alerts"));
        let m = &f[0].metric[0];
        assert_eq!(m.label_value("tmp"), None);
        assert_eq!(
            m.label_value("site").map(str::to_string),
            Some(crate::anonymize::anonymize("salt", "s1"))
        );
        assert_eq!(m.timestamp_ms, Some(NOW));
    }
}
