//! A remote-write request's series → the validated families this server stores.
//!
//! Per series, in order: labels with an empty value dropped (empty means absent), a label named
//! twice refused, `__name__` required and a valid metric name, every other name valid and not
//! `__`-prefixed (reserved: Prometheus would refuse the `/federate` line), `--elide-label` names
//! dropped, the partition label required and equal to the bearer's cluster id (400 otherwise,
//! naming the series, as upstream), the whitelist applied, `--label` pairs set, labels sorted.
//! Samples are held to the same age and future-skew limits as uploads. Every sample becomes one
//! series of an UNTYPED family named after its metric: remote write 1.0 carries no type with the
//! samples (metadata comes in separate requests, if at all), and untyped is what Prometheus
//! itself calls a series whose type it does not know; calling them gauges would tell the central
//! Prometheus something the sender never said.

use std::collections::BTreeMap;
use std::time::SystemTime;

use telemeter_common::labels;
use telemeter_common::model::{LabelPair, MetricFamily, MetricType};
use telemeter_common::selector::{self, Selector};

use super::merge::untyped_series;
use crate::remote_write::proto::{TimeSeries, WriteRequest};

/// What the conversion enforces.
pub struct SeriesRules<'a> {
    /// The label naming the cluster.
    pub partition_label: &'a str,
    /// The cluster id of the bearer.
    pub cluster_id: &'a str,
    /// Labels removed from every series (`--elide-label`).
    pub elide: &'a [String],
    /// Labels set on every series (`--label`).
    pub extra_labels: &'a [(String, String)],
    /// Keep only series matching one of these; empty keeps all.
    pub whitelist: &'a [Selector],
    /// Oldest sample accepted, ms.
    pub oldest_ms: i64,
    /// Newest sample accepted, ms.
    pub newest_ms: i64,
    /// Most samples in one request.
    pub max_samples: usize,
}

/// A request's families, and what became of its series.
#[derive(Debug, Default)]
pub struct Converted {
    /// Families of untyped series, one per sample, by metric name.
    pub families: Vec<MetricFamily>,
    /// Samples kept.
    pub samples: usize,
    /// Series dropped by the whitelist.
    pub filtered: usize,
}

/// Why a request was refused: the status (400 or 413) and the one-line reason.
#[derive(Debug, PartialEq, Eq)]
pub struct SeriesError {
    /// 400 or 413.
    pub status: u16,
    /// The reason, naming the series.
    pub message: String,
}

fn bad(message: String) -> SeriesError {
    SeriesError {
        status: 400,
        message,
    }
}

/// The series as Prometheus prints it, for messages (bounded: at most the first 10 labels).
fn describe(series: &TimeSeries) -> String {
    let mut name = "";
    let mut pairs = Vec::new();
    for label in &series.labels {
        if label.name == "__name__" {
            name = &label.value;
        } else if pairs.len() < 10 {
            pairs.push(format!("{}={:?}", label.name, label.value));
        }
    }
    let mut text = format!("{name}{{{}}}", pairs.join(", "));
    if text.len() > 512 {
        let mut cut = 512;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Converts `request` under `rules`; `now` only names the time in messages.
pub fn convert(
    request: WriteRequest,
    rules: &SeriesRules<'_>,
    _now: SystemTime,
) -> Result<Converted, SeriesError> {
    let samples: usize = request.timeseries.iter().map(|s| s.samples.len()).sum();
    if samples > rules.max_samples {
        return Err(SeriesError {
            status: 413,
            message: format!(
                "{samples} samples in one request, more than {}",
                rules.max_samples
            ),
        });
    }
    let mut by_name: BTreeMap<String, MetricFamily> = BTreeMap::new();
    let mut out = Converted::default();
    for series in request.timeseries {
        let mut name = None;
        let mut pairs: Vec<LabelPair> = Vec::with_capacity(series.labels.len() + 2);
        let mut names_seen = std::collections::HashSet::with_capacity(series.labels.len());
        for label in &series.labels {
            if !names_seen.insert(label.name.as_str()) {
                return Err(bad(format!(
                    "series {} has label {:?} more than once",
                    describe(&series),
                    label.name
                )));
            }
        }
        for label in &series.labels {
            if label.value.is_empty() {
                continue;
            }
            if label.name == "__name__" {
                name = Some(label.value.clone());
                continue;
            }
            if label.name.starts_with("__") {
                return Err(bad(format!(
                    "series {} has label {:?}: names starting with __ are reserved",
                    describe(&series),
                    label.name
                )));
            }
            if rules.elide.contains(&label.name) {
                continue;
            }
            pairs.push(LabelPair::new(&label.name, &label.value));
        }
        let Some(name) = name.filter(|n| labels::check_metric_name(n).is_ok()) else {
            return Err(bad(format!(
                "series {} has no valid metric name (__name__)",
                describe(&series)
            )));
        };
        match pairs
            .iter()
            .find(|p| p.name.as_deref() == Some(rules.partition_label))
            .and_then(|p| p.value.as_deref())
        {
            Some(id) if id == rules.cluster_id => {}
            Some(id) => {
                return Err(bad(format!(
                    "series {} has {}={id:?}, not the cluster id {:?} of the token",
                    describe(&series),
                    rules.partition_label,
                    rules.cluster_id
                )))
            }
            None => {
                return Err(bad(format!(
                    "series {} lacks the label {}={:?}",
                    describe(&series),
                    rules.partition_label,
                    rules.cluster_id
                )))
            }
        }
        if !rules.whitelist.is_empty() && !selector::any_matches(rules.whitelist, &name, &pairs) {
            out.filtered += 1;
            continue;
        }
        for (label, value) in rules.extra_labels {
            match pairs.iter_mut().find(|p| p.name.as_deref() == Some(label)) {
                Some(pair) => pair.value = Some(value.clone()),
                None => pairs.push(LabelPair::new(label, value)),
            }
        }
        pairs.sort_by(|a, b| a.name.cmp(&b.name));
        let probe = untyped_series(pairs, 0.0, 0);
        labels::check_series_labels(&probe)
            .map_err(|e| bad(format!("series {}: {e}", describe(&series))))?;
        for sample in &series.samples {
            if sample.timestamp < rules.oldest_ms {
                return Err(bad(format!(
                    "series {} has a sample at {} ms, older than --max-sample-age",
                    describe(&series),
                    sample.timestamp
                )));
            }
            if sample.timestamp > rules.newest_ms {
                return Err(bad(format!(
                    "series {} has a sample at {} ms, further in the future than --max-future-skew",
                    describe(&series),
                    sample.timestamp
                )));
            }
        }
        if series.samples.is_empty() {
            continue;
        }
        let family = by_name.entry(name.clone()).or_insert_with(|| MetricFamily {
            name: Some(name),
            help: Some(super::merge::REMOTE_WRITE_HELP.to_string()),
            r#type: Some(MetricType::Untyped as i32),
            metric: Vec::new(),
        });
        let last = series.samples.len() - 1;
        let mut labels_for = Some(probe.label);
        for (i, sample) in series.samples.iter().enumerate() {
            let labels = if i == last {
                labels_for.take().unwrap_or_default()
            } else {
                labels_for.clone().unwrap_or_default()
            };
            family
                .metric
                .push(untyped_series(labels, sample.value, sample.timestamp));
            out.samples += 1;
        }
    }
    out.families = by_name.into_values().collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote_write::proto::{Label, Sample};

    fn series(labels: &[(&str, &str)], samples: &[(f64, i64)]) -> TimeSeries {
        TimeSeries {
            labels: labels
                .iter()
                .map(|(n, v)| Label {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            samples: samples
                .iter()
                .map(|(value, timestamp)| Sample {
                    value: *value,
                    timestamp: *timestamp,
                })
                .collect(),
        }
    }

    fn rules<'a>(elide: &'a [String], extra: &'a [(String, String)]) -> SeriesRules<'a> {
        SeriesRules {
            partition_label: "_id",
            cluster_id: "c1",
            elide,
            extra_labels: extra,
            whitelist: &[],
            oldest_ms: 0,
            newest_ms: 10_000,
            max_samples: 100,
        }
    }

    fn convert_one(ts: TimeSeries) -> Result<Converted, SeriesError> {
        convert(
            WriteRequest {
                timeseries: vec![ts],
            },
            &rules(&[], &[]),
            SystemTime::now(),
        )
    }

    #[test]
    fn sorts_drops_empty_elides_and_adds_labels() {
        let elide = vec!["pod".to_string()];
        let extra = vec![("region".to_string(), "eu".to_string())];
        let converted = convert(
            WriteRequest {
                timeseries: vec![series(
                    &[
                        ("__name__", "up"),
                        ("z", "1"),
                        ("_id", "c1"),
                        ("empty", ""),
                        ("pod", "p"),
                    ],
                    &[(1.0, 5), (2.0, 6)],
                )],
            },
            &rules(&elide, &extra),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(converted.samples, 2);
        let family = &converted.families[0];
        assert_eq!(family.name.as_deref(), Some("up"));
        assert_eq!(family.r#type, Some(MetricType::Untyped as i32));
        let names: Vec<_> = family.metric[0]
            .label
            .iter()
            .map(|l| l.name.clone().unwrap())
            .collect();
        assert_eq!(names, vec!["_id", "region", "z"]);
        assert_eq!(family.metric[1].timestamp_ms, Some(6));
    }

    #[test]
    fn refusals_name_the_series() {
        let e = convert_one(series(&[("__name__", "up")], &[(1.0, 5)])).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains("up{}") && e.message.contains("lacks the label _id"),
            "{}",
            e.message
        );
        let e = convert_one(series(&[("__name__", "up"), ("_id", "c2")], &[(1.0, 5)])).unwrap_err();
        assert!(e.message.contains("not the cluster id"), "{}", e.message);
        let e = convert_one(series(
            &[("__name__", "up"), ("_id", "c1"), ("a", "1"), ("a", "2")],
            &[(1.0, 5)],
        ))
        .unwrap_err();
        assert!(e.message.contains("more than once"), "{}", e.message);
        let e = convert_one(series(
            &[("__name__", "up"), ("_id", "c1"), ("__x", "1")],
            &[(1.0, 5)],
        ))
        .unwrap_err();
        assert!(e.message.contains("reserved"), "{}", e.message);
        let e = convert_one(series(&[("_id", "c1")], &[(1.0, 5)])).unwrap_err();
        assert!(e.message.contains("metric name"), "{}", e.message);
        let e = convert_one(series(
            &[("__name__", "up"), ("_id", "c1")],
            &[(1.0, 50_000)],
        ))
        .unwrap_err();
        assert!(e.message.contains("future"), "{}", e.message);
        let e = convert_one(series(
            &[("__name__", "up"), ("_id", "c1"), ("bad-name", "1")],
            &[(1.0, 5)],
        ))
        .unwrap_err();
        assert_eq!(e.status, 400);
    }
}
