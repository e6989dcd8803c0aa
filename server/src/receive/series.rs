//! A remote-write request's series → the validated families this server stores.
//!
//! Per series, in order: labels with an empty value dropped (empty means absent), a label named
//! twice refused, `__name__` required and a valid metric name, every other name valid and not
//! `__`-prefixed (reserved: Prometheus would refuse the `/federate` line), `--elide-label` names
//! dropped, the partition label required and equal to the bearer's cluster id (400 otherwise,
//! naming the series, as upstream), `--required-label` pairs set (another value refused with 403,
//! as for an upload), the whitelist applied, `--label` pairs set, labels sorted.
//! Samples are held to the same age and future-skew limits as uploads. Every sample becomes one
//! series of an UNTYPED family named after its metric: remote write 1.0 carries no type with the
//! samples (metadata comes in separate requests, if at all), and untyped is what Prometheus
//! itself calls a series whose type it does not know; calling them gauges would tell the central
//! Prometheus something the sender never said.

use std::collections::BTreeMap;

use prost::encoding::{decode_varint, encode_key, encode_varint, encoded_len_varint, WireType};
use telemeter_common::labels;
use telemeter_common::model::{LabelPair, MetricType};
use telemeter_common::selector::{self, Selector};

use super::merge::REMOTE_WRITE_HELP;

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
    /// Labels every series carries with this value, or is given (`--required-label`, as an
    /// upload token carries them): a series with another value is refused (403).
    pub required_labels: &'a [(String, String)],
    /// Keep only series matching one of these; empty keeps all.
    pub whitelist: &'a [Selector],
    /// Oldest sample accepted, ms.
    pub oldest_ms: i64,
    /// Newest sample accepted, ms.
    pub newest_ms: i64,
    /// Most series in one request.
    pub max_series: usize,
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

/// Why a request was refused: the status (400 or 413), the counted result and the one-line
/// reason.
#[derive(Debug, PartialEq, Eq)]
pub struct SeriesError {
    /// 400 or 413.
    pub status: u16,
    /// `bad_protobuf`, `bad_series` or `too_large`.
    pub result: &'static str,
    /// The reason, naming the series.
    pub message: String,
}

fn bad(message: String) -> SeriesError {
    SeriesError {
        status: 400,
        result: "bad_series",
        message,
    }
}

fn bad_protobuf(reason: &str) -> SeriesError {
    SeriesError {
        status: 400,
        result: "bad_protobuf",
        message: format!("body is not a prometheus.WriteRequest: {reason}"),
    }
}

fn too_large(message: String) -> SeriesError {
    SeriesError {
        status: 413,
        result: "too_large",
        message,
    }
}

/// One `TimeSeries` as read from the body, borrowing its strings (refilled for each series, so a
/// request of thousands of series allocates nothing per series).
#[derive(Default)]
struct Parsed<'a> {
    labels: Vec<(&'a str, &'a str)>,
    samples: Vec<(f64, i64)>,
}

/// A field's value as the wire carries it.
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32,
}

/// The next field of a message: its number and value; `None` at the end. Prost's rules: a key
/// fits 32 bits with a number above 0; groups (never sent by remote write) are refused.
fn next_field<'a>(rest: &mut &'a [u8]) -> Result<Option<(u64, Field<'a>)>, &'static str> {
    if rest.is_empty() {
        return Ok(None);
    }
    let key = decode_varint(rest).map_err(|_| "bad field key")?;
    if key > u64::from(u32::MAX) || key >> 3 == 0 {
        return Err("bad field key");
    }
    let value = match key & 7 {
        0 => Field::Varint(decode_varint(rest).map_err(|_| "bad varint")?),
        1 => {
            let (bytes, after) = rest.split_first_chunk::<8>().ok_or("truncated")?;
            *rest = after;
            Field::Fixed64(u64::from_le_bytes(*bytes))
        }
        2 => {
            let len = decode_varint(rest).map_err(|_| "bad length")?;
            let len = usize::try_from(len).map_err(|_| "truncated")?;
            if len > rest.len() {
                return Err("truncated");
            }
            let (bytes, after) = rest.split_at(len);
            *rest = after;
            Field::Bytes(bytes)
        }
        5 => {
            *rest = rest.get(4..).ok_or("truncated")?;
            Field::Fixed32
        }
        _ => return Err("unsupported wire type"),
    };
    Ok(Some((key >> 3, value)))
}

fn utf8(bytes: &[u8]) -> Result<&str, &'static str> {
    std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8")
}

/// Reads one `TimeSeries` message into `into` (labels and samples; exemplars and native
/// histograms are skipped).
fn parse_series<'a>(message: &'a [u8], into: &mut Parsed<'a>) -> Result<(), &'static str> {
    into.labels.clear();
    into.samples.clear();
    let mut rest = message;
    while let Some((number, field)) = next_field(&mut rest)? {
        match (number, field) {
            (1, Field::Bytes(label)) => {
                let (mut name, mut value) = ("", "");
                let mut fields = label;
                while let Some((number, field)) = next_field(&mut fields)? {
                    match (number, field) {
                        (1, Field::Bytes(b)) => name = utf8(b)?,
                        (2, Field::Bytes(b)) => value = utf8(b)?,
                        (1 | 2, _) => return Err("wrong wire type for a label"),
                        _ => {}
                    }
                }
                into.labels.push((name, value));
            }
            (2, Field::Bytes(sample)) => {
                let (mut value, mut timestamp) = (0.0, 0);
                let mut fields = sample;
                while let Some((number, field)) = next_field(&mut fields)? {
                    match (number, field) {
                        (1, Field::Fixed64(v)) => value = f64::from_bits(v),
                        (2, Field::Varint(v)) => timestamp = v as i64,
                        (1 | 2, _) => return Err("wrong wire type for a sample"),
                        _ => {}
                    }
                }
                into.samples.push((value, timestamp));
            }
            (1 | 2, _) => return Err("wrong wire type for a series field"),
            _ => {}
        }
    }
    Ok(())
}

/// The series as Prometheus prints it, for messages (bounded: at most the first 10 labels).
fn describe(series: &Parsed<'_>) -> String {
    let mut name = "";
    let mut pairs = Vec::new();
    for (n, v) in &series.labels {
        if *n == "__name__" {
            name = v;
        } else if pairs.len() < 10 {
            pairs.push(format!("{n}={v:?}"));
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
fn check_label(series: &Parsed<'_>, name: &str, value: &str) -> Result<(), SeriesError> {
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

/// Reads the `prometheus.WriteRequest` in `body` (decompressed) and converts its series under
/// `rules`, reading strings in place (metadata, field 3, is skipped).
pub fn convert<'a>(body: &'a [u8], rules: &SeriesRules<'a>) -> Result<Converted, SeriesError> {
    // Metric name → its family's `metric` fields so far.
    let mut by_name: BTreeMap<&'a str, Vec<u8>> = BTreeMap::new();
    let mut out = Converted::default();
    let mut pairs: Vec<(&'a str, &'a str)> = Vec::new();
    let mut names_seen: Vec<&str> = Vec::new();
    let mut series = Parsed::default();
    let mut count = 0usize;
    let mut rest = body;
    while let Some((number, field)) = next_field(&mut rest).map_err(bad_protobuf)? {
        let message = match (number, field) {
            (1, Field::Bytes(message)) => message,
            (1, _) => return Err(bad_protobuf("wrong wire type for timeseries")),
            _ => continue,
        };
        count += 1;
        if count > rules.max_series {
            return Err(too_large(format!(
                "more than {} series in one request (--max-series)",
                rules.max_series
            )));
        }
        parse_series(message, &mut series).map_err(bad_protobuf)?;
        if out.samples + series.samples.len() > rules.max_samples {
            return Err(too_large(format!(
                "more than {} samples in one request",
                rules.max_samples
            )));
        }
        // Senders sort labels by name (remote write requires it), so a strictly increasing
        // list is the common case and has no duplicate; otherwise sort a copy to find one.
        if !series.labels.windows(2).all(|w| w[0].0 < w[1].0) {
            names_seen.clear();
            names_seen.extend(series.labels.iter().map(|(n, _)| *n));
            names_seen.sort_unstable();
            if let Some(w) = names_seen.windows(2).find(|w| w[0] == w[1]) {
                return Err(bad(format!(
                    "series {} has label {:?} more than once",
                    describe(&series),
                    w[0]
                )));
            }
        }
        let mut name = None;
        pairs.clear();
        for &(n, v) in &series.labels {
            if v.is_empty() {
                continue;
            }
            if n == "__name__" {
                name = Some(v);
                continue;
            }
            if n.starts_with("__") {
                return Err(bad(format!(
                    "series {} has label {n:?}: names starting with __ are reserved",
                    describe(&series)
                )));
            }
            if rules.elide.iter().any(|e| e == n) {
                continue;
            }
            pairs.push((n, v));
        }
        let Some(name) = name.filter(|n| labels::check_metric_name(n).is_ok()) else {
            return Err(bad(format!(
                "series {} has no valid metric name (__name__)",
                describe(&series)
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
        // Before the whitelist, as an upload's token labels are: it sees them.
        for (label, value) in rules.required_labels {
            match pairs.iter().find(|(n, _)| n == label) {
                Some((_, other)) if other != value => {
                    return Err(SeriesError {
                        status: 403,
                        result: "forbidden",
                        message: format!(
                            "series {} has {label}={other:?}, not {value:?} (--required-label)",
                            describe(&series)
                        ),
                    })
                }
                Some(_) => {}
                None => pairs.push((label, value)),
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
                describe(&series),
                pairs.len(),
                labels::MAX_LABELS
            )));
        }
        for (n, v) in &pairs {
            check_label(&series, n, v)?;
        }
        pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for &(_, timestamp) in &series.samples {
            if timestamp < rules.oldest_ms {
                return Err(bad(format!(
                    "series {} has a sample at {timestamp} ms, older than --max-sample-age",
                    describe(&series)
                )));
            }
            if timestamp > rules.newest_ms {
                return Err(bad(format!(
                    "series {} has a sample at {timestamp} ms, further in the future than --max-future-skew",
                    describe(&series)
                )));
            }
        }
        if series.samples.is_empty() {
            continue;
        }
        let family = by_name.entry(name).or_default();
        for &(value, timestamp) in &series.samples {
            encode_series(family, &pairs, value, timestamp);
            out.samples += 1;
        }
    }
    // Each family written straight into the payload (no intermediate copy), sized first.
    let header = |name: &str| {
        2 + encoded_len_varint(name.len() as u64)
            + name.len()
            + encoded_len_varint(REMOTE_WRITE_HELP.len() as u64)
            + REMOTE_WRITE_HELP.len()
            + 2
    };
    let total: usize = by_name
        .iter()
        .map(|(name, metrics)| {
            let len = header(name) + metrics.len();
            encoded_len_varint(len as u64) + len
        })
        .sum();
    out.payload.reserve_exact(total);
    for (name, metrics) in by_name {
        encode_varint((header(name) + metrics.len()) as u64, &mut out.payload);
        encode_key(1, WireType::LengthDelimited, &mut out.payload);
        encode_varint(name.len() as u64, &mut out.payload);
        out.payload.extend_from_slice(name.as_bytes());
        encode_key(2, WireType::LengthDelimited, &mut out.payload);
        encode_varint(REMOTE_WRITE_HELP.len() as u64, &mut out.payload);
        out.payload.extend_from_slice(REMOTE_WRITE_HELP.as_bytes());
        encode_key(3, WireType::Varint, &mut out.payload);
        encode_varint(MetricType::Untyped as u64, &mut out.payload);
        out.payload.extend_from_slice(&metrics);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote_write::proto::{Label, Sample, TimeSeries, WriteRequest};
    use prost::Message;

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
            required_labels: &[],
            whitelist: &[],
            oldest_ms: 0,
            newest_ms: 10_000,
            max_series: 10,
            max_samples: 100,
        }
    }

    fn convert_one(ts: TimeSeries) -> Result<Converted, SeriesError> {
        let body = WriteRequest {
            timeseries: vec![ts],
        }
        .encode_to_vec();
        convert(&body, &rules(&[], &[]))
    }

    #[test]
    fn a_required_label_is_set_and_another_value_refused_with_403() {
        let required = vec![("tenant".to_string(), "acme".to_string())];
        let rules = SeriesRules {
            required_labels: &required,
            ..rules(&[], &[])
        };
        let convert_labels = |labels: &[(&str, &str)]| {
            let body = WriteRequest {
                timeseries: vec![series(labels, &[(1.0, 5)])],
            }
            .encode_to_vec();
            convert(&body, &rules)
        };
        for labels in [
            &[("__name__", "up"), ("_id", "c1")][..],
            &[("__name__", "up"), ("_id", "c1"), ("tenant", "acme")][..],
        ] {
            let converted = convert_labels(labels).unwrap();
            let families =
                telemeter_common::delimited::decode(&converted.payload, &Default::default())
                    .unwrap();
            assert_eq!(
                families[0].metric[0].label_value("tenant"),
                Some("acme"),
                "{labels:?}"
            );
        }
        // Set before the whitelist, which sees it (as for an upload).
        let whitelist = vec![Selector::parse(r#"{tenant="acme"}"#).unwrap()];
        let filtering = SeriesRules {
            whitelist: &whitelist,
            ..rules
        };
        let body = WriteRequest {
            timeseries: vec![series(&[("__name__", "up"), ("_id", "c1")], &[(1.0, 5)])],
        }
        .encode_to_vec();
        let converted = convert(&body, &filtering).unwrap();
        assert_eq!((converted.samples, converted.filtered), (1, 0));
        let refused =
            convert_labels(&[("__name__", "up"), ("_id", "c1"), ("tenant", "evil")]).unwrap_err();
        assert_eq!((refused.status, refused.result), (403, "forbidden"));
        assert!(
            refused.message.contains("tenant=\"evil\", not \"acme\""),
            "{}",
            refused.message
        );
    }

    #[test]
    fn sorts_drops_empty_elides_and_adds_labels() {
        let elide = vec!["pod".to_string()];
        let extra = vec![("region".to_string(), "eu".to_string())];
        let body = WriteRequest {
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
        }
        .encode_to_vec();
        let converted = convert(&body, &rules(&elide, &extra)).unwrap();
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

    #[test]
    fn the_wire_reader_refuses_what_prost_would_and_skips_metadata() {
        let rules = rules(&[], &[]);
        // Metadata only (field 3): nothing to store.
        let converted = convert(b"\x1a\x03\x12\x01m", &rules).unwrap();
        assert!(converted.payload.is_empty());
        // A label name that is not UTF-8.
        let e = convert(b"\x0a\x06\x0a\x04\x0a\x02\xff\xfe", &rules).unwrap_err();
        assert_eq!((e.status, e.result), (400, "bad_protobuf"), "{}", e.message);
        // Truncated, and a timeseries field that is not length-delimited.
        for body in [&b"\x0a\x05\x0a"[..], b"\x08\x01"] {
            let e = convert(body, &rules).unwrap_err();
            assert_eq!(e.result, "bad_protobuf", "{}", e.message);
        }
        // More series than allowed.
        let many = WriteRequest {
            timeseries: (0..11)
                .map(|i| {
                    series(
                        &[("__name__", "m"), ("_id", "c1"), ("i", &i.to_string())],
                        &[(1.0, 5)],
                    )
                })
                .collect(),
        }
        .encode_to_vec();
        let e = convert(&many, &rules).unwrap_err();
        assert_eq!((e.status, e.result), (413, "too_large"), "{}", e.message);
    }
}
