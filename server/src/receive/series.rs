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

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use telemeter_common::labels;
use telemeter_common::model::{LabelPair, MetricType};
use telemeter_common::selector::{self, Selector};

use super::merge::REMOTE_WRITE_HELP;
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

/// A request's samples as the store keeps them, and what became of its series.
#[derive(Debug, Default)]
pub struct Converted {
    /// Protobuf-delimited families of untyped series, one series per sample, by metric name
    /// (empty when no sample is left: metadata only, or all filtered).
    pub payload: Vec<u8>,
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

/// Appends one `Metric` message (labels, `untyped { value }`, timestamp) as a `metric` field of
/// a family being built in `family`. Encoded here rather than through owned structs: a request
/// is thousands of series, and each owned label would be two allocations.
fn encode_series(family: &mut Vec<u8>, labels: &[(&str, &str)], value: f64, timestamp_ms: i64) {
    let label_len = |(n, v): &(&str, &str)| {
        let inner = 1
            + encoded_len_varint(n.len() as u64)
            + n.len()
            + 1
            + encoded_len_varint(v.len() as u64)
            + v.len();
        1 + encoded_len_varint(inner as u64) + inner
    };
    // untyped { value }: key + len + (key + 8); timestamp: key + varint.
    let len: usize = labels.iter().map(label_len).sum::<usize>()
        + 1
        + 1
        + 9
        + 1
        + encoded_len_varint(timestamp_ms as u64);
    encode_key(4, WireType::LengthDelimited, family);
    encode_varint(len as u64, family);
    for (n, v) in labels {
        let inner = 1
            + encoded_len_varint(n.len() as u64)
            + n.len()
            + 1
            + encoded_len_varint(v.len() as u64)
            + v.len();
        encode_key(1, WireType::LengthDelimited, family);
        encode_varint(inner as u64, family);
        encode_key(1, WireType::LengthDelimited, family);
        encode_varint(n.len() as u64, family);
        family.extend_from_slice(n.as_bytes());
        encode_key(2, WireType::LengthDelimited, family);
        encode_varint(v.len() as u64, family);
        family.extend_from_slice(v.as_bytes());
    }
    encode_key(5, WireType::LengthDelimited, family);
    encode_varint(9, family);
    encode_key(1, WireType::SixtyFourBit, family);
    family.extend_from_slice(&value.to_le_bytes());
    encode_key(6, WireType::Varint, family);
    encode_varint(timestamp_ms as u64, family);
}

/// Checks one label as `/upload` does (valid name, lengths).
fn check_label(series: &TimeSeries, name: &str, value: &str) -> Result<(), SeriesError> {
    if name.len() > labels::MAX_NAME_BYTES {
        return Err(bad(format!(
            "series {}: label name {name:?} is too long",
            describe(series)
        )));
    }
    if !labels::is_valid_label_name(name) {
        return Err(bad(format!(
            "series {}: invalid label name {name:?}",
            describe(series)
        )));
    }
    if value.len() > labels::MAX_VALUE_BYTES {
        return Err(bad(format!(
            "series {}: the value of label {name:?} is longer than {} bytes",
            describe(series),
            labels::MAX_VALUE_BYTES
        )));
    }
    Ok(())
}

/// Converts `request` under `rules`.
pub fn convert(request: &WriteRequest, rules: &SeriesRules<'_>) -> Result<Converted, SeriesError> {
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
    // Metric name → its family's `metric` fields so far.
    let mut by_name: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    let mut out = Converted::default();
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    let mut names_seen = std::collections::HashSet::new();
    for series in &request.timeseries {
        names_seen.clear();
        for label in &series.labels {
            if !names_seen.insert(label.name.as_str()) {
                return Err(bad(format!(
                    "series {} has label {:?} more than once",
                    describe(series),
                    label.name
                )));
            }
        }
        let mut name = None;
        pairs.clear();
        for label in &series.labels {
            if label.value.is_empty() {
                continue;
            }
            if label.name == "__name__" {
                name = Some(label.value.as_str());
                continue;
            }
            if label.name.starts_with("__") {
                return Err(bad(format!(
                    "series {} has label {:?}: names starting with __ are reserved",
                    describe(series),
                    label.name
                )));
            }
            if rules.elide.contains(&label.name) {
                continue;
            }
            pairs.push((&label.name, &label.value));
        }
        let Some(name) = name.filter(|n| labels::check_metric_name(n).is_ok()) else {
            return Err(bad(format!(
                "series {} has no valid metric name (__name__)",
                describe(series)
            )));
        };
        match pairs
            .iter()
            .find(|(n, _)| *n == rules.partition_label)
            .map(|(_, v)| *v)
        {
            Some(id) if id == rules.cluster_id => {}
            Some(id) => {
                return Err(bad(format!(
                    "series {} has {}={id:?}, not the cluster id {:?} of the token",
                    describe(series),
                    rules.partition_label,
                    rules.cluster_id
                )))
            }
            None => {
                return Err(bad(format!(
                    "series {} lacks the label {}={:?}",
                    describe(series),
                    rules.partition_label,
                    rules.cluster_id
                )))
            }
        }
        if !rules.whitelist.is_empty() {
            let owned: Vec<LabelPair> = pairs.iter().map(|(n, v)| LabelPair::new(n, v)).collect();
            if !selector::any_matches(rules.whitelist, name, &owned) {
                out.filtered += 1;
                continue;
            }
        }
        for (label, value) in rules.extra_labels {
            match pairs.iter_mut().find(|(n, _)| n == label) {
                Some(pair) => pair.1 = value,
                None => pairs.push((label, value)),
            }
        }
        if pairs.len() > labels::MAX_LABELS {
            return Err(bad(format!(
                "series {} has {} labels, more than {}",
                describe(series),
                pairs.len(),
                labels::MAX_LABELS
            )));
        }
        for (n, v) in &pairs {
            check_label(series, n, v)?;
        }
        pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for sample in &series.samples {
            if sample.timestamp < rules.oldest_ms {
                return Err(bad(format!(
                    "series {} has a sample at {} ms, older than --max-sample-age",
                    describe(series),
                    sample.timestamp
                )));
            }
            if sample.timestamp > rules.newest_ms {
                return Err(bad(format!(
                    "series {} has a sample at {} ms, further in the future than --max-future-skew",
                    describe(series),
                    sample.timestamp
                )));
            }
        }
        if series.samples.is_empty() {
            continue;
        }
        let family = by_name.entry(name).or_default();
        for sample in &series.samples {
            encode_series(family, &pairs, sample.value, sample.timestamp);
            out.samples += 1;
        }
    }
    let mut message = Vec::new();
    for (name, metrics) in by_name {
        message.clear();
        encode_key(1, WireType::LengthDelimited, &mut message);
        encode_varint(name.len() as u64, &mut message);
        message.extend_from_slice(name.as_bytes());
        encode_key(2, WireType::LengthDelimited, &mut message);
        encode_varint(REMOTE_WRITE_HELP.len() as u64, &mut message);
        message.extend_from_slice(REMOTE_WRITE_HELP.as_bytes());
        encode_key(3, WireType::Varint, &mut message);
        encode_varint(MetricType::Untyped as u64, &mut message);
        message.extend_from_slice(&metrics);
        encode_varint(message.len() as u64, &mut out.payload);
        out.payload.extend_from_slice(&message);
    }
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
            &WriteRequest {
                timeseries: vec![ts],
            },
            &rules(&[], &[]),
        )
    }

    #[test]
    fn sorts_drops_empty_elides_and_adds_labels() {
        let elide = vec!["pod".to_string()];
        let extra = vec![("region".to_string(), "eu".to_string())];
        let converted = convert(
            &WriteRequest {
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
        )
        .unwrap();
        assert_eq!(converted.samples, 2);
        let families =
            telemeter_common::delimited::decode(&converted.payload, &Default::default()).unwrap();
        let family = &families[0];
        assert_eq!(family.help.as_deref(), Some(REMOTE_WRITE_HELP));
        assert_eq!(family.metric[0].untyped.and_then(|u| u.value), Some(1.0));
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
