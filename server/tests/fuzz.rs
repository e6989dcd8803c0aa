//! Fuzz targets of the server crate's own parser: gossip heartbeat datagrams, which arrive over
//! UDP from anyone who can reach `--listen-cluster`. Reuses the workspace's mutation harness
//! (`testkit::fuzz`; `FUZZ_SECONDS`, `FUZZ_SEED` apply).

use testkit::fuzz as harness;

use telemeter_common::keys::{KeyPurpose, SharedKey};
use telemeter_server::cluster::packet::{Heartbeat, Keyring, VERSION};

fn heartbeats() -> Vec<Heartbeat> {
    let hb = |name: &str, members: &[&str], addr: &str| Heartbeat {
        name: name.into(),
        boot_id: 0x0123_4567_89ab_cdef,
        seq: 42,
        sent_ms: 1_700_000_000_000,
        internal_addr: addr.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
    };
    vec![
        hb("a", &["a"], "127.0.0.1:9004"),
        hb("node-b", &["node-a", "node-b", "node-c"], "10.0.0.2:9004"),
        hb("ü-node", &[], "[::1]:9004"),
        hb(&"n".repeat(200), &["x"; 40], "host.example:1"),
    ]
}

/// Whole datagrams: a mutation must never authenticate (only an untouched seed may), nor panic.
#[test]
fn gossip_packet() {
    let key = Keyring::derive(
        &[SharedKey::from_bytes(&[7; 32]).unwrap()],
        KeyPurpose::GossipSeal,
    )
    .unwrap();
    let seeds: Vec<Vec<u8>> = heartbeats()
        .iter()
        .map(|hb| hb.encode(&key).unwrap())
        .collect();
    let valid = seeds.clone();
    harness::run(
        harness::Target {
            name: "gossip_packet",
            dict: &[b"\x01", b"\x00\x00", b"\xff\xff", b"127.0.0.1:9004"],
            seeds,
        },
        |input| match Heartbeat::decode(input, &key) {
            Ok(hb) if !valid.iter().any(|v| v == input) => {
                Err(format!("a mutated packet authenticated: {hb:?}"))
            }
            _ => Ok(()),
        },
    );
}

/// The part behind the seal: each mutated plaintext is sealed again before decoding, so the field
/// parser sees hostile fields from a key holder. It must not panic, and what it accepts must
/// encode back to the same plaintext (nothing is silently dropped or reinterpreted).
#[test]
fn gossip_packet_fields() {
    let key = Keyring::derive(
        &[SharedKey::from_bytes(&[7; 32]).unwrap()],
        KeyPurpose::GossipSeal,
    )
    .unwrap();
    let plaintext = |datagram: Vec<u8>| key.open(VERSION, &[], datagram).map(|(p, _)| p);
    let seeds: Vec<Vec<u8>> = heartbeats()
        .iter()
        .map(|hb| plaintext(hb.encode(&key).unwrap()).unwrap())
        .collect();
    harness::run(
        harness::Target {
            name: "gossip_packet_fields",
            dict: &[b"\x01", b"\x00\x00", b"\xff\xff", b"\x00\x01a"],
            seeds,
        },
        |body| {
            let Ok(datagram) = key.seal(VERSION, &[], body) else {
                return Ok(());
            };
            match Heartbeat::decode(&datagram, &key) {
                Ok((hb, _)) => match hb.encode(&key).map(plaintext) {
                    Ok(Ok(again)) if again == body => Ok(()),
                    Ok(again) => Err(format!(
                        "{hb:?} decoded, but encodes to other bytes: {again:?}"
                    )),
                    Err(e) => Err(format!("{hb:?} decoded, but does not encode: {e}")),
                },
                Err(_) => Ok(()),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// /federate bodies built from accepted uploads

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use telemeter_common::delimited;
use telemeter_common::labels;
use telemeter_common::media::Format;
use telemeter_common::model::{
    Bucket, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary,
};
use telemeter_common::text;
use telemeter_server::federate;
use telemeter_server::validate::{Rules, WireCheck};

const NOW_MS: i64 = 1_700_000_000_000;

/// Rules that refuse nothing on time, so mutated timestamps do not hide what labels do.
fn rules() -> Rules {
    Rules {
        partition_label: "_id".into(),
        extra_labels: vec![],
        whitelist: telemeter_common::sync::Swap::new(std::sync::Arc::new(vec![])),
        max_sample_age: Duration::from_secs(u64::MAX / 4),
        max_future_skew: Duration::from_secs(u64::MAX / 4),
        max_samples: 100_000,
    }
}

/// [`rules`] with a whitelist of family names (some of the seeds' families, not all) and one
/// selector on a label.
fn listed_rules() -> Rules {
    let r = rules();
    let selectors = ["g0", "{__name__=~\"[gh][1-3]\"}", "s1{job=\"x\"}"];
    r.whitelist.replace(std::sync::Arc::new(
        selectors
            .iter()
            .map(|s| telemeter_common::selector::Selector::parse(s).expect("a valid selector"))
            .collect(),
    ));
    r
}

fn token() -> BTreeMap<String, String> {
    BTreeMap::from([("_id".to_string(), "a".to_string())])
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(NOW_MS as u64)
}

fn fuzz_limits() -> delimited::Limits {
    delimited::Limits {
        max_message_bytes: 16 << 10,
        max_total_bytes: 64 << 10,
        max_families: 64,
        max_series: 512,
    }
}

/// The label names of one sample line, read as Prometheus's text parser reads them, checked as
/// its scrape checks them: a valid metric name, valid label names, none given twice (the metric
/// name counting as `__name__`). Comments and blank lines are skipped.
fn check_line(line: &str) -> Result<(), String> {
    if line.is_empty() || line.starts_with('#') {
        return Ok(());
    }
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if !labels::is_valid_metric_name(name) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut seen: HashSet<String> = HashSet::from(["__name__".to_string()]);
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = rest
                .split_once("=\"")
                .ok_or_else(|| format!("no label value in {rest:?}"))?;
            if !labels::is_valid_label_name(label) {
                return Err(format!("invalid label name {label:?}"));
            }
            if !seen.insert(label.to_string()) {
                return Err(format!("label name {label:?} is not unique"));
            }
            // The value, through its closing quote; only \\, \" and \n are escapes.
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\' | '"' | 'n')) => {}
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some((_, '\n')) => return Err("raw newline in a value".into()),
                    Some(_) => {}
                    None => return Err("unterminated label value".into()),
                }
            };
            rest = &after[end + 1..];
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                return Err(format!("expected , or }} at {rest:?}"));
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("no value in {line:?}"))?;
    if value.is_empty() || value.contains(' ') {
        return Err(format!("value {value:?} (no timestamps on /federate)"));
    }
    Ok(())
}

/// The property: a stored (accepted) payload's `/federate` text has only lines Prometheus
/// accepts; the writer never needed to leave a series out (validation and the writer agree);
/// each family's text parses with our parser into series whose label names are unique and none
/// the exposition reserves.
fn served_validly(stored: &[u8]) -> Result<(), String> {
    let mut body = Vec::new();
    let skipped = federate::write_cluster(stored, Format::Text, &mut body)
        .map_err(|e| format!("an accepted payload is not served: {e}"))?;
    if skipped.total() > 0 {
        return Err(format!("the writer left out accepted series: {skipped}"));
    }
    // Protobuf (what a Prometheus asks for with native histograms on) leaves nothing out either,
    // and every series it serves has unique, unreserved label names.
    let mut pd = Vec::new();
    let pd_skipped = federate::write_cluster(stored, Format::ProtoDelimited, &mut pd)
        .map_err(|e| format!("an accepted payload is not served as protobuf: {e}"))?;
    if pd_skipped.total() > 0 {
        return Err(format!("protobuf left out accepted series: {pd_skipped}"));
    }
    for family in delimited::decode(&pd, &delimited::Limits::default())
        .map_err(|e| format!("served protobuf does not decode: {e}"))?
    {
        let kind = family.metric_type();
        for m in &family.metric {
            let names = m
                .label
                .iter()
                .map(|l| l.name.as_deref().unwrap_or("").as_bytes());
            if let Some(problem) = text::unservable_labels(kind, names) {
                return Err(format!("protobuf served {problem:?} in {:?}", family.name));
            }
        }
    }
    let text = std::str::from_utf8(&body).map_err(|e| format!("not UTF-8: {e}"))?;
    for line in text.lines() {
        check_line(line).map_err(|e| format!("{e}\nline: {line:?}"))?;
    }
    for family in telemeter_common::wire::families(stored, &delimited::Limits::default()) {
        let family = family.map_err(|e| format!("stored family: {e}"))?;
        let mut one = Vec::new();
        text::write_family_view(&mut one, &family, false, &mut Default::default())
            .map_err(|e| format!("family {}: {e}", family.name))?;
        let parsed = text::parse(&one, &text::Limits::default()).map_err(|e| {
            format!(
                "family {} does not parse: {e}\n{}",
                family.name,
                harness::escape(&one)
            )
        })?;
        for f in &parsed {
            let kind = f.metric_type();
            for m in &f.metric {
                let mut names = HashSet::new();
                for l in &m.label {
                    let n = l.name.as_deref().unwrap_or("");
                    if !names.insert(n) || text::reserved_label(kind, n).is_some() {
                        return Err(format!("family {}: label {n:?} served", family.name));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Validates `body` as an upload of `format` on every path the server has, and checks what each
/// path would store with [`served_validly`]; counts in `accepted` the payloads checked.
fn accepted_then_federated(body: &[u8], format: Format, accepted: &mut u64) -> harness::Verdict {
    let r = rules();
    let families = match format {
        Format::ProtoDelimited => {
            if let WireCheck::Unchanged {
                series, samples, ..
            } = r.check_wire(body, &fuzz_limits(), &token(), now())
            {
                fast_path_agrees(&r, body, series, samples)?;
                served_validly(body).map_err(|e| format!("fast path: {e}"))?;
                *accepted += 1;
            }
            // Under a whitelist of family names, which the fast path decides per family.
            let listed = listed_rules();
            if let WireCheck::Unchanged {
                series, samples, ..
            } = listed.check_wire(body, &fuzz_limits(), &token(), now())
            {
                fast_path_agrees(&listed, body, series, samples)
                    .map_err(|e| format!("under a whitelist: {e}"))?;
            }
            match delimited::decode(body, &fuzz_limits()) {
                Ok(families) => families,
                Err(_) => return Ok(()),
            }
        }
        Format::Text => match text::parse(body, &text::Limits::default()) {
            Ok(families) => families,
            Err(_) => return Ok(()),
        },
    };
    let Ok(validated) = r.apply(families, &token(), now()) else {
        return Ok(());
    };
    if validated.families.is_empty() {
        return Ok(());
    }
    *accepted += 1;
    served_validly(&delimited::encode(&validated.families)).map_err(|e| format!("owned path: {e}"))
}

/// The differential check of the fast path: a body it takes unchanged must be one the owned
/// path accepts and stores exactly as decoded (no series dropped, no label stamped), with the
/// same counts, so storing the body's bytes as they came is what the owned path would store.
fn fast_path_agrees(r: &Rules, body: &[u8], series: usize, samples: usize) -> harness::Verdict {
    let decoded = delimited::decode(body, &fuzz_limits())
        .map_err(|e| format!("fast path took a body the decoder refuses: {e}"))?;
    let validated = r
        .apply(decoded.clone(), &token(), now())
        .map_err(|e| format!("fast path took a body the owned path refuses: {e}"))?;
    // Compared as bytes: a NaN sample is never equal to itself as an f64, though kept exactly
    // (tests/fixtures/fuzz/delimited/regression-nan-gauge-fast-path.pb is such a body).
    if delimited::encode(&validated.families) != delimited::encode(&decoded) {
        return Err("fast path took a body the owned path rewrites".into());
    }
    let counted: usize = decoded.iter().map(MetricFamily::sample_count).sum();
    if (validated.series, validated.filtered, counted) != (series, 0, samples) {
        return Err(format!(
            "fast path counted {series} series and {samples} samples, the owned path {} ({} filtered) and {counted}",
            validated.series, validated.filtered
        ));
    }
    Ok(())
}

/// Families with every label the exposition reserves, and the partition label, in every type.
fn label_seeds() -> Vec<MetricFamily> {
    let labels = |extra: &[(&str, &str)]| -> Vec<LabelPair> {
        let mut l: Vec<LabelPair> = extra.iter().map(|(n, v)| LabelPair::new(n, v)).collect();
        l.push(LabelPair::new("_id", "a"));
        l
    };
    let sets: [&[(&str, &str)]; 6] = [
        &[("job", "x")],
        &[("le", "1")],
        &[("quantile", "0.5")],
        &[("__name__", "m")],
        &[("__x", "1"), ("b", "2")],
        &[("b", "1"), ("b", "2")],
    ];
    let metric = |extra: &[(&str, &str)]| Metric {
        label: labels(extra),
        timestamp_ms: Some(NOW_MS),
        ..Default::default()
    };
    let mut families = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        families.push(MetricFamily {
            name: Some(format!("g{i}")),
            help: Some("g".into()),
            r#type: Some(MetricType::Gauge as i32),
            metric: vec![Metric {
                gauge: Some(Gauge { value: Some(1.0) }),
                ..metric(set)
            }],
        });
        families.push(MetricFamily {
            name: Some(format!("h{i}")),
            help: None,
            r#type: Some(MetricType::Histogram as i32),
            metric: vec![Metric {
                histogram: Some(Histogram {
                    sample_count: Some(2),
                    sample_sum: Some(1.0),
                    bucket: vec![Bucket {
                        cumulative_count: Some(1),
                        upper_bound: Some(0.5),
                    }],
                }),
                ..metric(set)
            }],
        });
        families.push(MetricFamily {
            name: Some(format!("s{i}")),
            help: None,
            r#type: Some(MetricType::Summary as i32),
            metric: vec![Metric {
                summary: Some(Summary {
                    sample_count: Some(2),
                    sample_sum: Some(1.0),
                    quantile: vec![Quantile {
                        quantile: Some(0.5),
                        value: Some(1.0),
                    }],
                }),
                ..metric(set)
            }],
        });
    }
    families
}

/// Label names worth inserting: the reserved ones and the partition label, as protobuf
/// `LabelPair` fields and as text.
const LABEL_DICT: &[&[u8]] = &[
    b"\x0a\x08\x0a\x02le\x12\x011",
    b"\x0a\x0e\x0a\x08quantile\x12\x011",
    b"\x0a\x0e\x0a\x08__name__\x12\x01m",
    b"\x0a\x08\x0a\x03_id\x12\x01a",
    b"\x0a\x07\x0a\x02_x\x12\x01a",
    b"\x18\x04",
    b"\x18\x02",
    b"\x18\x05",
    b"le=\"1\",",
    b"quantile=\"0.5\",",
    b"__name__=\"x\",",
    b"__x=\"1\",",
    b"_id=\"a\",",
    b"# TYPE h histogram\n",
    b"# TYPE s summary\n",
    b"_bucket{",
    b" 1 1700000000000\n",
];

#[test]
fn federate_from_accepted_protobuf_uploads() {
    let families = label_seeds();
    let mut seeds: Vec<Vec<u8>> = families
        .iter()
        .map(|f| delimited::encode(std::slice::from_ref(f)))
        .collect();
    seeds.push(delimited::encode(&families));
    seeds.extend(harness::load_corpus("delimited"));
    let mut accepted = 0;
    harness::run(
        harness::Target {
            name: "federate_accepted_pd",
            dict: LABEL_DICT,
            seeds,
        },
        |body| accepted_then_federated(body, Format::ProtoDelimited, &mut accepted),
    );
    println!("federate_accepted_pd: {accepted} accepted payloads served and checked");
    assert!(accepted > 0);
}

#[test]
fn federate_from_accepted_text_uploads() {
    let families = label_seeds();
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for f in &families {
        let mut out = Vec::new();
        text::encode(&mut out, std::slice::from_ref(f), true).unwrap();
        seeds.push(out);
    }
    // Written by hand: what the writer would not write (reserved labels, duplicates).
    for extra in [
        "le=\"1\",",
        "quantile=\"1\",",
        "__x=\"1\",",
        "b=\"1\",b=\"2\",",
    ] {
        seeds.push(
            format!(
                "# TYPE h histogram\nh_bucket{{{extra}le=\"1\",_id=\"a\"}} 1 {NOW_MS}\nh_count{{{extra}_id=\"a\"}} 1 {NOW_MS}\n# TYPE s summary\ns{{{extra}quantile=\"0.5\",_id=\"a\"}} 1 {NOW_MS}\ng{{{extra}_id=\"a\"}} 1 {NOW_MS}\n"
            )
            .into_bytes(),
        );
    }
    seeds.extend(harness::load_corpus("text"));
    let mut accepted = 0;
    harness::run(
        harness::Target {
            name: "federate_accepted_text",
            dict: LABEL_DICT,
            seeds,
        },
        |body| accepted_then_federated(body, Format::Text, &mut accepted),
    );
    println!("federate_accepted_text: {accepted} accepted payloads served and checked");
    assert!(accepted > 0);
}

/// The line check itself refuses what Prometheus refuses, or the property above could not fail.
#[test]
fn the_line_check_refuses_what_prometheus_refuses() {
    for good in [
        "m 1",
        "m{a=\"1\",b=\"x\\\"y\\\\z\\n\"} NaN",
        "h_bucket{_id=\"a\",le=\"+Inf\"} 2",
        "# TYPE m gauge",
    ] {
        assert_eq!(check_line(good), Ok(()), "{good}");
    }
    for bad in [
        "m{a=\"1\",a=\"2\"} 1",
        "m{__name__=\"x\"} 1",
        "h_bucket{le=\"1\",le=\"+Inf\"} 2",
        "m{a-b=\"1\"} 1",
        "1m 1",
        "m{a=\"\\q\"} 1",
        "m 1 1700000000000",
    ] {
        assert!(check_line(bad).is_err(), "{bad}");
    }
}
