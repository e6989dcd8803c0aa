//! Unit tests of `federate`, beside it so the module reads as the module.

use super::*;
use crate::store::StoreConfig;
use std::time::{Duration, SystemTime};
use telemeter_common::model::{
    Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

const METRICS_PB: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-metrics.pb");

/// Now, in milliseconds: stored samples older than the TTL are not served.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn families(id: &str) -> Vec<MetricFamily> {
    vec![
        MetricFamily {
            name: Some("requests_total".into()),
            help: Some("Requests.".into()),
            r#type: Some(MetricType::Counter as i32),
            metric: vec![Metric {
                label: vec![LabelPair::new("_id", id)],
                counter: Some(Counter { value: Some(3.0) }),
                timestamp_ms: Some(now_ms()),
                ..Default::default()
            }],
        },
        MetricFamily {
            name: Some("latency_seconds".into()),
            help: None,
            r#type: Some(MetricType::Histogram as i32),
            metric: vec![Metric {
                label: vec![LabelPair::new("_id", id)],
                histogram: Some(Histogram {
                    sample_count: Some(2),
                    sample_sum: Some(0.25),
                    bucket: vec![Bucket {
                        cumulative_count: Some(1),
                        upper_bound: Some(0.1),
                    }],
                }),
                timestamp_ms: Some(now_ms() + 1),
                ..Default::default()
            }],
        },
    ]
}

fn payload(id: &str) -> Vec<u8> {
    delimited::encode(&families(id))
}

#[test]
fn text_has_no_timestamps() {
    let mut out = Vec::new();
    write_cluster(&payload("a"), Format::Text, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("requests_total{_id=\"a\"} 3\n"), "{text}");
    assert!(
        text.contains("latency_seconds_bucket{_id=\"a\",le=\"+Inf\"} 2\n"),
        "{text}"
    );
    // No 13-digit number (a timestamp in milliseconds) anywhere.
    assert!(!text.contains(&now_ms().to_string()[..8]), "{text}");
}

#[test]
fn text_is_what_the_owned_decoding_writes() {
    for body in [METRICS_PB.to_vec(), payload("x")] {
        let mut ours = Vec::new();
        write_cluster(&body, Format::Text, &mut ours).unwrap();
        let owned = delimited::decode(&body, &stored_limits()).unwrap();
        let mut theirs = Vec::new();
        text::encode(&mut theirs, &owned, false).unwrap();
        assert_eq!(ours, theirs);
    }
}

#[test]
fn protobuf_has_no_timestamps() {
    for body in [METRICS_PB.to_vec(), payload("a")] {
        let mut out = Vec::new();
        write_cluster(&body, Format::ProtoDelimited, &mut out).unwrap();
        let decoded = delimited::decode(&out, &stored_limits()).unwrap();
        let mut expected = delimited::decode(&body, &stored_limits()).unwrap();
        for family in &mut expected {
            for metric in &mut family.metric {
                metric.timestamp_ms = None;
            }
        }
        assert_eq!(delimited::encode(&decoded), delimited::encode(&expected));
    }
    let mut out = Vec::new();
    write_cluster(&payload("a"), Format::ProtoDelimited, &mut out).unwrap();
    let decoded = delimited::decode(&out, &delimited::Limits::default()).unwrap();
    assert_eq!(decoded[0].metric[0].timestamp_ms, None);
    assert_eq!(
        decoded[0].metric[0].counter,
        Some(Counter { value: Some(3.0) })
    );
}

#[test]
fn a_payload_that_does_not_decode_is_an_error() {
    let mut body = payload("a");
    body.truncate(body.len() - 3);
    for format in [Format::Text, Format::ProtoDelimited] {
        let err = write_cluster(&body, format, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, ServeError::Decode(_)), "{err}");
    }
    // A label that is not UTF-8, deep inside an otherwise well-framed family.
    let mut body = payload("\u{e9}");
    let at = body
        .windows(2)
        .position(|w| w == "\u{e9}".as_bytes())
        .unwrap();
    body[at] = 0xff;
    for format in [Format::Text, Format::ProtoDelimited] {
        let err = write_cluster(&body, format, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, ServeError::Decode(_)), "{err}");
    }
}

#[test]
fn series_that_cannot_be_written_validly_are_left_out_and_counted() {
    // What validation refuses, stored anyway (an older server's file, or a peer's).
    let mut stored = families("a");
    stored[1].metric[0].label.push(LabelPair::new("le", "0.5"));
    let mut dup = stored[0].metric[0].clone();
    dup.label.push(LabelPair::new("_id", "again"));
    let mut name = stored[0].metric[0].clone();
    name.label.push(LabelPair::new("__name__", "other"));
    stored[0].metric.extend([dup, name]);
    stored.push(MetricFamily {
        name: None,
        ..families("a").remove(0)
    });
    let mut text = Vec::new();
    let skipped = write_cluster(&delimited::encode(&stored), Format::Text, &mut text).unwrap();
    // Protobuf leaves out the same series (but keeps a series without its value).
    let mut pd = Vec::new();
    let pd_skipped =
        write_cluster(&delimited::encode(&stored), Format::ProtoDelimited, &mut pd).unwrap();
    assert_eq!(pd_skipped, skipped);
    let served = delimited::decode(&pd, &stored_limits()).unwrap();
    assert_eq!(served.len(), 1, "{served:?}");
    assert_eq!(served[0].metric.len(), 1);
    assert_eq!(served[0].metric[0].label, vec![LabelPair::new("_id", "a")]);
    assert_eq!(served[0].metric[0].timestamp_ms, None);
    let text = String::from_utf8(text).unwrap();
    // Only the one valid series is served, with its header; the rest is counted.
    assert_eq!(
            text,
            "# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total{_id=\"a\"} 3\n"
        );
    assert_eq!(skipped.count(SkipReason::TypeLabel), 1);
    assert_eq!(skipped.count(SkipReason::DuplicateLabel), 1);
    assert_eq!(skipped.count(SkipReason::ReservedLabel), 1);
    assert_eq!(skipped.count(SkipReason::MetricName), 1);
    assert_eq!(skipped.total(), 4);

    let dir = std::env::temp_dir().join(format!("telemeter-federate-skip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(StoreConfig {
        dir: dir.clone(),
        ttl: Duration::from_secs(3600),
        max_batch: 8,
    })
    .unwrap();
    let now = SystemTime::now();
    store.put("good", payload("good"), now).unwrap();
    store.put("mixed", delimited::encode(&stored), now).unwrap();
    let mut out = Vec::new();
    let skips = write_all(&store, Format::Text, None, &mut out).unwrap();
    assert_eq!(skips.series, skipped);
    assert_eq!(skips.first_cluster.as_deref(), Some("mixed"));
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("requests_total{_id=\"good\"} 3\n"), "{out}");
    assert!(
        out.contains("latency_seconds_count{_id=\"good\"} 2\n"),
        "{out}"
    );
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serves_every_readable_cluster_the_filter_accepts() {
    let dir = std::env::temp_dir().join(format!("telemeter-federate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(StoreConfig {
        dir: dir.clone(),
        ttl: Duration::from_secs(3600),
        max_batch: 8,
    })
    .unwrap();
    let now = SystemTime::now();
    store.put("a", payload("a"), now).unwrap();
    store.put("bad", b"\x05\x0a\x03".to_vec(), now).unwrap();
    store.put("c", payload("c"), now).unwrap();
    store.put("d", payload("d"), now).unwrap();
    let filter: ClusterFilter = Arc::new(|id: &str| id != "d");
    for format in [Format::Text, Format::ProtoDelimited] {
        let mut out = Vec::new();
        write_all(&store, format, Some(&filter), &mut out).unwrap();
        let expected = merged(&["a", "c"], now);
        match format {
            Format::Text => assert_eq!(String::from_utf8(out).unwrap(), as_text(&expected)),
            Format::ProtoDelimited => {
                assert_eq!(delimited::decode(&out, &stored_limits()).unwrap(), expected)
            }
        }
    }
    // Many clusters, so that every worker takes several, in order.
    let ids: Vec<String> = (0..40).map(|i| format!("m{i:02}")).collect();
    for id in &ids {
        store.put(id, payload(id), now).unwrap();
    }
    let all: Vec<&str> = ["a", "c", "d"]
        .iter()
        .copied()
        .chain(ids.iter().map(String::as_str))
        .collect();
    let mut out = Vec::new();
    write_all(&store, Format::Text, None, &mut out).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), as_text(&merged(&all, now)));

    // A client that goes away stops the scrape with its error, without hanging.
    struct Fails(usize);
    impl Write for Fails {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"));
            }
            self.0 -= 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let err = write_all(&store, Format::Text, None, &mut Fails(1)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What `/federate` serves for clusters `ids` (each stored from [`payload`], received at
/// `received`): each family once in name order with every cluster's series in cluster order,
/// without timestamps, then the last-push family.
fn merged(ids: &[&str], received: SystemTime) -> Vec<MetricFamily> {
    let mut by_name: std::collections::BTreeMap<String, MetricFamily> = Default::default();
    for id in ids {
        for mut family in families(id) {
            for metric in &mut family.metric {
                metric.timestamp_ms = None;
            }
            let name = family.name.clone().unwrap();
            match by_name.get_mut(&name) {
                Some(merged) => merged.metric.extend(family.metric),
                None => {
                    by_name.insert(name, family);
                }
            }
        }
    }
    let seconds = received
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64
        / 1000.0;
    let mut out: Vec<MetricFamily> = by_name.into_values().collect();
    out.push(MetricFamily {
        name: Some(LAST_PUSH_FAMILY.into()),
        help: Some(
            "When this server accepted the cluster's stored upload, in seconds since the epoch."
                .into(),
        ),
        r#type: Some(MetricType::Gauge as i32),
        metric: ids
            .iter()
            .map(|id| Metric {
                label: vec![LabelPair::new("_id", id)],
                gauge: Some(telemeter_common::model::Gauge {
                    value: Some(seconds),
                }),
                ..Default::default()
            })
            .collect(),
    });
    out
}

/// Families in the text format, without timestamps.
fn as_text(families: &[MetricFamily]) -> String {
    let mut out = Vec::new();
    for family in families {
        text::write_family(&mut out, family, false).unwrap();
    }
    String::from_utf8(out).unwrap()
}

fn temp_store(name: &str) -> (Store, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("telemeter-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(StoreConfig {
        dir: dir.clone(),
        ttl: Duration::from_secs(3600),
        max_batch: 8,
    })
    .unwrap();
    (store, dir)
}

#[test]
fn a_family_whose_type_differs_from_the_first_clusters_is_left_out_and_counted() {
    let (store, dir) = temp_store("federate-conflict");
    let now = SystemTime::now();
    store.put("a", payload("a"), now).unwrap();
    let mut other = families("b");
    other[0].r#type = Some(MetricType::Gauge as i32);
    other[0].metric[0].gauge = Some(telemeter_common::model::Gauge { value: Some(1.0) });
    other[0].metric[0].counter = None;
    store.put("b", delimited::encode(&other), now).unwrap();
    let mut out = Vec::new();
    let skips = write_all(&store, Format::Text, None, &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(skips.series.count(SkipReason::TypeConflict), 1, "{out}");
    assert_eq!(skips.first_cluster.as_deref(), Some("b"));
    assert_eq!(out.matches("# TYPE requests_total").count(), 1, "{out}");
    assert!(out.contains("# TYPE requests_total counter\n"), "{out}");
    assert!(!out.contains("requests_total{_id=\"b\"}"), "{out}");
    // b's other family is still served.
    assert!(
        out.contains("latency_seconds_count{_id=\"b\"} 2\n"),
        "{out}"
    );
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pinned_upload_reads_the_version_indexed_after_a_newer_one_is_checkpointed() {
    let (store, dir) = temp_store("federate-pinned");
    let now = SystemTime::now();
    let first = payload("a");
    store.put("a", first.clone(), now).unwrap();
    // Once from its journal segment, once from its file after a checkpoint (on close).
    let from_journal = store.get_pinned("a").unwrap().unwrap();
    // Dropped, not only closed: the directory's lock goes with the last clone.
    drop(store);
    let store = Store::open(StoreConfig {
        dir: dir.clone(),
        ttl: Duration::from_secs(3600),
        max_batch: 8,
    })
    .unwrap();
    let from_file = store.get_pinned("a").unwrap().unwrap();
    let mut newer = families("a");
    newer.truncate(1);
    store.put("a", delimited::encode(&newer), now).unwrap();
    store.close();
    for pinned in [from_journal, from_file] {
        let mut bytes = Vec::new();
        pinned
            .read_range(0, first.len() as u64, &mut bytes)
            .unwrap();
        assert_eq!(bytes, first);
        assert!(pinned
            .read_range(0, first.len() as u64 + 1, &mut bytes)
            .is_err());
        // Reusing one buffer, as a scrape does: a shorter range after a longer one is only
        // its own bytes, and a range past the end is refused.
        let mut reused = Vec::new();
        let whole = pinned
            .read_range_reusing(0, first.len() as u64, &mut reused)
            .unwrap();
        assert_eq!(whole, first);
        let part = pinned.read_range_reusing(3, 10, &mut reused).unwrap();
        assert_eq!(part, &first[3..10]);
        assert!(pinned
            .read_range_reusing(5, first.len() as u64 + 1, &mut reused)
            .is_err());
        assert!(pinned.read_range_reusing(6, 5, &mut reused).is_err());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_family_larger_than_a_chunk_is_written_once_with_one_header() {
    let (store, dir) = temp_store("federate-chunks");
    let now = SystemTime::now();
    let ids: Vec<String> = (0..40).map(testkit::payload::cluster_id).collect();
    let mut expected: std::collections::BTreeMap<String, MetricFamily> = Default::default();
    for id in &ids {
        let families = testkit::payload::families(id, now_ms());
        store.put(id, delimited::encode(&families), now).unwrap();
        for mut family in families {
            for metric in &mut family.metric {
                metric.timestamp_ms = None;
            }
            match expected.get_mut(family.name.as_deref().unwrap()) {
                Some(merged) => merged.metric.extend(family.metric),
                None => {
                    expected.insert(family.name.clone().unwrap(), family);
                }
            }
        }
    }
    // Some family spans several chunks.
    let biggest: usize = expected
        .values()
        .map(|f| delimited::encode(std::slice::from_ref(f)).len())
        .max()
        .unwrap();
    assert!(biggest as u64 > 2 * CHUNK_BYTES, "{biggest}");

    let mut out = Vec::new();
    write_all(&store, Format::Text, None, &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    let expected: Vec<MetricFamily> = expected.into_values().collect();
    let expected_series: usize = expected.iter().map(|f| f.metric.len()).sum();
    let mut want = as_text(&expected);
    // Then the last push of each, checked apart.
    let at = out
        .find("# HELP telemeter_last_push_timestamp_seconds")
        .unwrap();
    assert_eq!(&out[..at], want.as_str());
    assert_eq!(out[at..].lines().count(), 2 + ids.len());
    want.clear();

    // Protobuf: the same series, a large family in several messages of the same name.
    let mut pd = Vec::new();
    write_all(&store, Format::ProtoDelimited, None, &mut pd).unwrap();
    let served = delimited::decode(&pd, &stored_limits()).unwrap();
    let series: usize = served
        .iter()
        .filter(|f| f.name.as_deref() != Some(LAST_PUSH_FAMILY))
        .map(|f| f.metric.len())
        .sum();
    assert_eq!(series, expected_series);
    assert!(
        served.len() > expected.len() + 1,
        "a family over a chunk comes in several messages"
    );
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chunks_cut_families_by_input_bytes_and_headers_are_measured() {
    let plan = |sizes: &[u64]| FamilyPlan {
        name: "f".into(),
        metric_type: MetricType::Gauge,
        parts: sizes
            .iter()
            .enumerate()
            .map(|(c, &n)| Part {
                cluster: c as u32,
                family: 0,
                plain: false,
                start: 0,
                end: n as u32,
            })
            .collect(),
        conflicting: Vec::new(),
    };
    let plans = vec![
        plan(&[CHUNK_BYTES / 2, CHUNK_BYTES / 2, 1, CHUNK_BYTES]),
        plan(&[]),
        plan(&[1]),
    ];
    let cut: Vec<(usize, std::ops::Range<usize>, bool)> = chunks(&plans, [0, 1, 2].into_iter())
        .into_iter()
        .map(|c| (c.family, c.parts, c.first))
        .collect();
    assert_eq!(
        cut,
        [
            (0, 0..2, true),
            (0, 2..4, false),
            (1, 0..0, true),
            (2, 0..1, true)
        ]
    );
    // The help's newline is escaped: `\n` is two bytes of one line.
    assert_eq!(header_len(b"# HELP a x\\ny\n# TYPE a gauge\na 1\n"), 29);
    assert_eq!(header_len(b"# TYPE a gauge\na 1\n"), 15);
    assert_eq!(header_len(b""), 0);
}

/// A family of `name` and `kind` with one series of cluster `id`, stamped now.
fn one_series(name: &str, kind: MetricType, id: &str) -> MetricFamily {
    use telemeter_common::model::{Gauge, Quantile, Summary};
    let mut metric = Metric {
        label: vec![LabelPair::new("_id", id)],
        timestamp_ms: Some(now_ms()),
        ..Default::default()
    };
    match kind {
        MetricType::Histogram => {
            metric.histogram = Some(Histogram {
                sample_count: Some(2),
                sample_sum: Some(1.5),
                bucket: vec![Bucket {
                    cumulative_count: Some(1),
                    upper_bound: Some(0.5),
                }],
            })
        }
        MetricType::Summary => {
            metric.summary = Some(Summary {
                sample_count: Some(2),
                sample_sum: Some(3.0),
                quantile: vec![Quantile {
                    quantile: Some(0.5),
                    value: Some(1.0),
                }],
            })
        }
        MetricType::Counter => metric.counter = Some(Counter { value: Some(5.0) }),
        MetricType::Untyped => {
            metric.untyped = Some(telemeter_common::model::Untyped { value: Some(3.0) })
        }
        _ => metric.gauge = Some(Gauge { value: Some(7.0) }),
    }
    MetricFamily {
        name: Some(name.into()),
        help: None,
        r#type: Some(kind as i32),
        metric: vec![metric],
    }
}

/// `a`: a histogram `h` and a summary `s`; `b`: an untyped `h_bucket`, gauges `h_count` and
/// `s_sum` (named like their lines) and a gauge `g`; `c`: a gauge `normal`.
fn colliding_store(name: &str) -> (Store, std::path::PathBuf) {
    let (store, dir) = temp_store(name);
    let now = SystemTime::now();
    let a = [
        one_series("h", MetricType::Histogram, "a"),
        one_series("s", MetricType::Summary, "a"),
    ];
    let b = [
        one_series("g", MetricType::Gauge, "b"),
        one_series("h_bucket", MetricType::Untyped, "b"),
        one_series("h_count", MetricType::Gauge, "b"),
        one_series("s_sum", MetricType::Gauge, "b"),
    ];
    let c = [one_series("normal", MetricType::Gauge, "c")];
    store.put("a", delimited::encode(&a), now).unwrap();
    store.put("b", delimited::encode(&b), now).unwrap();
    store.put("c", delimited::encode(&c), now).unwrap();
    (store, dir)
}

/// Every (family, cluster) of a served body, the last-push family but for.
fn served_series(families: &[MetricFamily]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = families
        .iter()
        .filter(|f| f.name.as_deref() != Some(LAST_PUSH_FAMILY))
        .flat_map(|f| {
            f.metric.iter().map(move |m| {
                let id = m.label.iter().find(|l| l.name.as_deref() == Some("_id"));
                (
                    f.name.clone().unwrap_or_default(),
                    id.and_then(|l| l.value.clone()).unwrap_or_default(),
                )
            })
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_family_named_like_another_clusters_histogram_lines_is_left_out_so_the_text_parses() {
    let (store, dir) = colliding_store("federate-collide");
    let mut out = Vec::new();
    let skips = write_all(&store, Format::Text, None, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    // Our parser refuses a second TYPE for a histogram's lines, as Go's does.
    let parsed = text::parse(text.as_bytes(), &text::Limits::default())
        .unwrap_or_else(|e| panic!("the text does not parse: {e}\n{text}"));
    let want = [("g", "b"), ("h", "a"), ("normal", "c"), ("s", "a")]
        .map(|(n, c)| (n.to_string(), c.to_string()));
    assert_eq!(served_series(&parsed), want, "{text}");
    assert_eq!(skips.name_collisions, 3, "{text}");
    assert_eq!(
        skips.first_collision,
        Some(("h_bucket".to_string(), "h".to_string()))
    );
    assert_eq!(skips.series.total(), 0);
    assert!(!text.contains("_id=\"b\"} 3"), "{text}");

    // Protobuf: the same series, the same count.
    let mut pd = Vec::new();
    let pd_skips = write_all(&store, Format::ProtoDelimited, None, &mut pd).unwrap();
    let served = delimited::decode(&pd, &stored_limits()).unwrap();
    assert_eq!(served_series(&served), want);
    assert_eq!(pd_skips, skips);
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_family_named_like_histogram_lines_stays_when_the_histogram_writes_nothing() {
    let (store, dir) = colliding_store("federate-collide-match");
    // Only b's series: a's histogram and summary are not written, so nothing collides.
    let selectors = [Selector::parse("{_id=\"b\"}").unwrap()];
    for format in [Format::Text, Format::ProtoDelimited] {
        let mut out = Vec::new();
        let skips = write_selected(&store, format, None, &selectors, "_id", &mut out).unwrap();
        let served = match format {
            Format::Text => text::parse(&out, &text::Limits::default()).unwrap(),
            Format::ProtoDelimited => delimited::decode(&out, &stored_limits()).unwrap(),
        };
        let want = ["g", "h_bucket", "h_count", "s_sum"].map(|n| (n.to_string(), "b".to_string()));
        assert_eq!(served_series(&served), want, "{format:?}");
        assert_eq!(skips.name_collisions, 0);
    }
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_clusters_family_named_like_its_own_histograms_lines_is_left_out() {
    let (store, dir) = temp_store("federate-collide-own");
    let families = [
        one_series("h", MetricType::Histogram, "a"),
        one_series("h_bucket", MetricType::Gauge, "a"),
        // A histogram named like h's lines is left out too; then its own lines collide with
        // nothing written, so a family named like them stays.
        one_series("h_sum", MetricType::Histogram, "a"),
        one_series("h_sum_count", MetricType::Gauge, "a"),
    ];
    store
        .put("a", delimited::encode(&families), SystemTime::now())
        .unwrap();
    let mut out = Vec::new();
    let skips = write_all(&store, Format::Text, None, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let parsed = text::parse(text.as_bytes(), &text::Limits::default())
        .unwrap_or_else(|e| panic!("the text does not parse: {e}\n{text}"));
    let want = [("h", "a"), ("h_sum_count", "a")].map(|(n, c)| (n.to_string(), c.to_string()));
    assert_eq!(served_series(&parsed), want, "{text}");
    assert_eq!(skips.name_collisions, 2);
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Closes `store` (its journal checkpointed into cluster files) and opens it again.
fn reopened(store: Store, dir: &std::path::Path) -> Store {
    store.close();
    drop(store);
    Store::open(StoreConfig {
        dir: dir.to_path_buf(),
        ttl: Duration::from_secs(3600),
        max_batch: 8,
    })
    .unwrap()
}

fn scrape(store: &Store) -> String {
    let mut out = Vec::new();
    write_all(store, Format::Text, None, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn a_file_verified_before_is_served_from_its_cached_family_index_until_a_new_version() {
    let (store, dir) = temp_store("federate-index-cache");
    let now = SystemTime::now();
    store.put("cache-a", payload("cache-a"), now).unwrap();
    store.put("cache-b", payload("cache-b"), now).unwrap();
    let store = reopened(store, &dir);
    // The first scrape verifies the files (and learns where their families are); after it, a
    // lazy pin reads no payload, and the scrape from the cached index writes the same text.
    assert!(store
        .get_pinned_lazily("cache-a", None)
        .unwrap()
        .unwrap()
        .payload_read());
    let first = scrape(&store);
    assert!(
        first.contains("requests_total{_id=\"cache-a\"} 3\n"),
        "{first}"
    );
    let known = cached_version(&store, "cache-a");
    let lazy = store.get_pinned_lazily("cache-a", known).unwrap().unwrap();
    assert!(!lazy.payload_read());
    assert!(lazy.upload.payload.is_empty());
    assert_eq!(lazy.payload_len(), payload("cache-a").len() as u64);
    assert_eq!(scrape(&store), first);

    // A new version of one cluster, of another length and layout: its families are found
    // again, the other cluster's still come from the cache.
    let mut newer = families("cache-a");
    newer.reverse();
    if let Some(counter) = newer[1].metric[0].counter.as_mut() {
        counter.value = Some(12345.0);
    }
    newer[0].help = Some("A longer help text than before.".into());
    store
        .put("cache-a", delimited::encode(&newer), now)
        .unwrap();
    let store = reopened(store, &dir);
    let third = scrape(&store);
    assert!(
        third.contains("requests_total{_id=\"cache-a\"} 12345\n"),
        "{third}"
    );
    assert!(
        !third.contains("requests_total{_id=\"cache-a\"} 3\n"),
        "{third}"
    );
    assert!(
        third.contains("requests_total{_id=\"cache-b\"} 3\n"),
        "{third}"
    );
    assert!(third.contains("# HELP latency_seconds A longer help text than before.\n"));
    assert_eq!(scrape(&store), third);

    // A removed cluster is served no more, and its entry goes with the next scrape.
    store.remove("cache-a").unwrap();
    let fourth = scrape(&store);
    assert!(!fourth.contains("cache-a"), "{fourth}");
    assert!(!IndexCache::with(|cache| cache
        .clusters
        .contains_key("cache-a")));
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Cluster `id`'s cached families, scraping again while another test's scrape (they share the
/// process's cache, and each drops the entries of clusters its store does not hold) has just
/// dropped them: at most a few times, since it takes that race.
fn cached_families(store: &Store, id: &str) -> FamilyRanges {
    for _ in 0..50 {
        let cached = IndexCache::with(|cache| cache.clusters.get(id).map(|(_, f)| Arc::clone(f)));
        if let Some(families) = cached {
            return families;
        }
        scrape(store);
    }
    panic!("cluster {id:?} never stayed in the index cache");
}

/// The version `id`'s families are cached under, as [`cached_families`] finds them.
fn cached_version(store: &Store, id: &str) -> Option<PinVersion> {
    for _ in 0..50 {
        let cached = IndexCache::with(|cache| cache.clusters.get(id).map(|(v, _)| *v));
        if cached.is_some() {
            return cached;
        }
        scrape(store);
    }
    panic!("cluster {id:?} never stayed in the index cache");
}

/// The plain flags of `families`, by family name.
fn plain_flags(families: &FamilyRanges) -> Vec<(String, bool)> {
    families
        .iter()
        .map(|f| (f.name.to_string(), f.plain.load(Ordering::Relaxed)))
        .collect()
}

#[test]
fn a_scrape_learns_which_families_are_plain_and_the_next_writes_the_same_text() {
    let (store, dir) = temp_store("federate-plain");
    let now = SystemTime::now();
    store.put("plain-a", payload("plain-a"), now).unwrap();
    // Cluster b's counter has a label value to escape: that family is not plain.
    let mut escaped = families("plain-b");
    escaped[0].metric[0]
        .label
        .push(LabelPair::new("path", "C:\\x \"y\""));
    store
        .put("plain-b", delimited::encode(&escaped), now)
        .unwrap();
    let store = reopened(store, &dir);
    let first = scrape(&store);
    assert!(
        first.contains("requests_total{_id=\"plain-b\",path=\"C:\\\\x \\\"y\\\"\"} 3\n"),
        "{first}"
    );
    // Every scrape learns (a scrape that re-indexes a cluster learns its flags as it writes it).
    let (a, b) = (
        cached_families(&store, "plain-a"),
        cached_families(&store, "plain-b"),
    );
    let all_plain = vec![
        ("requests_total".to_string(), true),
        ("latency_seconds".to_string(), true),
    ];
    assert_eq!(plain_flags(&a), all_plain);
    assert_eq!(
        plain_flags(&b),
        vec![
            ("requests_total".to_string(), false),
            ("latency_seconds".to_string(), true),
        ]
    );
    // Written from what was learnt: the same text.
    assert_eq!(scrape(&store), first);
    // A scrape with selectors leaves series out unchecked: it learns nothing, forgets nothing.
    let selectors = [Selector::parse("requests_total{_id=\"none\"}").unwrap()];
    let mut out = Vec::new();
    write_selected(&store, Format::Text, None, &selectors, "_id", &mut out).unwrap();
    assert_eq!(plain_flags(&a), all_plain);
    assert_eq!(scrape(&store), first);
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_family_at_another_place_or_another_name_at_a_place_joins_the_plan_of_its_name() {
    let name = |n: &str| -> Arc<str> { Arc::from(n) };
    let (a, b, c, ours) = (name("a"), name("b"), name("c"), name(LAST_PUSH_FAMILY));
    let ranges = |families: &[(&Arc<str>, MetricType)]| -> Vec<FamilyRange> {
        (0u32..)
            .zip(families)
            .map(|(f, (name, metric_type))| FamilyRange {
                name: Arc::clone(name),
                metric_type: *metric_type,
                start: f * 10,
                end: f * 10 + 5,
                plain: AtomicBool::new(false),
            })
            .collect()
    };
    let counter = MetricType::Counter;
    let clusters = [
        ranges(&[(&a, counter), (&b, counter), (&c, counter)]),
        // `c` where `b` was.
        ranges(&[(&a, counter), (&c, counter)]),
        // Every family at another place.
        ranges(&[(&c, counter), (&a, counter), (&b, counter)]),
        // The same names, other allocations (not shared).
        ranges(&[(&name("a"), counter), (&name("c"), counter)]),
        ranges(&[(&a, MetricType::Gauge)]),
        // Ours left out, the family after it still at its own place.
        ranges(&[(&a, counter), (&ours, counter), (&b, counter)]),
    ];
    let (mut plans, mut by_name, mut plan_at) = (Vec::new(), BTreeMap::new(), Vec::new());
    for (c, families) in (0u32..).zip(&clusters) {
        plan_cluster(c, families, &mut plans, &mut by_name, &mut plan_at);
    }
    // Each part's cluster, place in its cluster and start.
    type Places = Vec<(u32, u32, u32)>;
    let places = |parts: &[Part]| -> Places {
        parts
            .iter()
            .map(|p| (p.cluster, p.family, p.start))
            .collect()
    };
    let planned: Vec<(String, Places, Places)> = by_name
        .values()
        .map(|&at| {
            let plan = &plans[at];
            (
                plan.name.clone(),
                places(&plan.parts),
                places(&plan.conflicting),
            )
        })
        .collect();
    assert_eq!(
        planned,
        vec![
            (
                "a".to_string(),
                vec![(0, 0, 0), (1, 0, 0), (2, 1, 10), (3, 0, 0), (5, 0, 0)],
                vec![(4, 0, 0)]
            ),
            (
                "b".to_string(),
                vec![(0, 1, 10), (2, 2, 20), (5, 2, 20)],
                vec![]
            ),
            (
                "c".to_string(),
                vec![(0, 2, 20), (1, 1, 10), (2, 0, 0), (3, 1, 10)],
                vec![]
            ),
        ]
    );
    assert_eq!(plans.len(), 3);
}

#[test]
fn a_scrape_after_a_checkpoint_serves_the_same_bytes_from_the_index_learnt_in_the_journal() {
    let (store, dir) = temp_store("federate-checkpoint-cache");
    let now = SystemTime::now();
    store.put("ckpt-a", payload("ckpt-a"), now).unwrap();
    store.put("ckpt-b", payload("ckpt-b"), now).unwrap();
    // Both in the journal: the first scrape reads and indexes them there, the next takes the
    // records without reading them.
    let first = scrape(&store);
    assert!(
        first.contains("requests_total{_id=\"ckpt-a\"} 3\n"),
        "{first}"
    );
    let families = cached_families(&store, "ckpt-a");
    let known = cached_version(&store, "ckpt-a");
    let lazy = store.get_pinned_lazily("ckpt-a", known).unwrap().unwrap();
    assert!(!lazy.payload_read());
    assert_eq!(scrape(&store), first);
    // Checkpointed into files: the same payloads, so the same versions; what was learnt
    // of them (ranges and plain flags) stays, and the text is the same.
    store.checkpoint_now();
    let after = scrape(&store);
    assert_eq!(after, first);
    let kept = cached_families(&store, "ckpt-a");
    assert_eq!(plain_flags(&kept), plain_flags(&families));
    assert!(plain_flags(&kept).iter().all(|(_, plain)| *plain));
    let lazy = store.get_pinned_lazily("ckpt-a", known).unwrap().unwrap();
    assert!(!lazy.payload_read());
    assert_eq!(lazy.version(), known);
    assert_eq!(scrape(&store), first);
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}
