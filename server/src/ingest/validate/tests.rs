//! Unit tests of `validate`, beside it so the module reads as the module.

use super::*;
use std::time::UNIX_EPOCH;
use telemeter_common::delimited;
use telemeter_common::model::{Bucket, LabelPair, Quantile};
use telemeter_common::model::{Counter, Gauge, Histogram, Summary};

const NOW_MS: i64 = 1_700_000_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(NOW_MS as u64)
}

fn rules() -> Rules {
    Rules {
        partition_label: "_id".into(),
        extra_labels: vec![],
        whitelist: telemeter_common::sync::Swap::new(std::sync::Arc::new(vec![])),
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
    r.whitelist = telemeter_common::sync::Swap::new(std::sync::Arc::new(vec![Selector::parse(
        "up{job=\"keep\"}",
    )
    .unwrap()]));
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
        newest_sample_ms,
    } = check
    {
        let counts = telemeter_common::wire::count::count(&body);
        assert_eq!(
            (counts.series, counts.element_bytes()),
            (series, element_bytes)
        );
        assert_eq!(
            telemeter_common::wire::newest_timestamp(&body).unwrap(),
            Some(newest_sample_ms)
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
    // Rewrites: the partition label to stamp, --label, a whitelist that drops a family, an
    // empty family.
    owned(&r, vec![stamped("up", &[("job", "x")], &[NOW_MS])]);
    let mut extra = rules();
    extra.extra_labels = vec![("region".into(), "eu".into())];
    owned(&extra, vec![stamped("up", ok, &[NOW_MS])]);
    let mut listed = rules();
    listed.whitelist =
        telemeter_common::sync::Swap::new(std::sync::Arc::new(
            vec![Selector::parse("up").unwrap()],
        ));
    owned(
        &listed,
        vec![stamped("up", ok, &[NOW_MS]), stamped("down", ok, &[NOW_MS])],
    );
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

/// The fast path compares names by their first eight bytes first: names that share them (or are
/// prefixes of one another) must still be told apart, ordered and matched exactly as the owned
/// path does.
#[test]
fn names_alike_in_their_first_eight_bytes_are_told_apart() {
    let r = rules();
    let unchanged = |labels: &[(&str, &str)], kind: MetricType| {
        let family = typed(stamped("f", labels, &[NOW_MS]), kind);
        matches!(both_paths(&r, vec![family]), WireCheck::Unchanged { .. })
    };
    // Sorted, unsorted, and names that are prefixes of others: all distinct, all taken.
    for labels in [
        &[
            ("_id", "a"),
            ("instance", "1"),
            ("instance_a", "2"),
            ("instance_b", "3"),
        ][..],
        &[
            ("instance_b", "3"),
            ("_id", "a"),
            ("instance_a", "2"),
            ("instance", "1"),
        ],
        &[
            ("_id", "a"),
            ("i", "1"),
            ("in", "2"),
            ("ins", "3"),
            ("instanc", "4"),
        ],
        &[("ins", "3"), ("in", "2"), ("_id", "a"), ("i", "1")],
        &[
            ("_id", "a"),
            ("abcdefgh", "1"),
            ("abcdefghi", "2"),
            ("abcdefgi", "3"),
        ],
    ] {
        assert!(unchanged(labels, MetricType::Gauge), "{labels:?}");
    }
    // A repeat whose first eight bytes other names share too, unsorted: refused as the owned path
    // refuses it.
    for labels in [
        &[
            ("instance_a", "1"),
            ("_id", "a"),
            ("instance_b", "2"),
            ("instance_a", "3"),
        ][..],
        &[("instance", "1"), ("_id", "a"), ("instance", "2")],
        &[("_id", "a"), ("b", "1"), ("a", "1"), ("b", "2")],
    ] {
        assert!(!unchanged(labels, MetricType::Gauge), "{labels:?}");
        let family = stamped("f", labels, &[NOW_MS]);
        let err = r.apply(vec![family], &token(), now()).unwrap_err();
        assert!(err.to_string().contains("appears more than once"), "{err}");
    }
    // The type's own label is refused, names that only start like it are not.
    assert!(!unchanged(
        &[("_id", "a"), ("le", "1")],
        MetricType::Histogram
    ));
    assert!(unchanged(
        &[("_id", "a"), ("lex", "1"), ("l", "2")],
        MetricType::Histogram
    ));
    assert!(!unchanged(
        &[("_id", "a"), ("quantile", "1")],
        MetricType::Summary
    ));
    assert!(unchanged(
        &[("_id", "a"), ("quantile_x", "1"), ("quantil", "2")],
        MetricType::Summary
    ));
    // Reserved: two leading underscores, not one.
    assert!(!unchanged(&[("_id", "a"), ("__", "1")], MetricType::Gauge));
    assert!(unchanged(&[("_id", "a"), ("_x_", "1")], MetricType::Gauge));
    // A token label is matched on the whole name: `_id_x` is not `_id`.
    assert!(!unchanged(&[("_id_x", "a")], MetricType::Gauge));
    assert!(unchanged(
        &[("_id_x", "b"), ("_id", "a")],
        MetricType::Gauge
    ));
}

/// Label names are read on the fast path without a UTF-8 check of their own (the label-name rule
/// admits only ASCII): a name that is not UTF-8, or not ASCII, is still never taken.
#[test]
fn names_that_are_not_ascii_are_never_taken_unchanged() {
    let good = delimited::encode(&[stamped("up", &[("_id", "a"), ("job", "x")], &[NOW_MS])]);
    let limits = delimited::Limits::default();
    assert!(matches!(
        rules().check_wire(&good, &limits, &token(), now()),
        WireCheck::Unchanged { series: 1, .. }
    ));
    // Same length, so every length prefix stays right: "job" becomes invalid UTF-8, then
    // valid UTF-8 that is not ASCII ("é" and one letter).
    for replacement in [&[0xff, b'o', b'b'][..], "éb".as_bytes()] {
        let at = good.windows(3).position(|w| w == b"job").unwrap();
        let mut bad = good.clone();
        bad[at..at + 3].copy_from_slice(replacement);
        assert_eq!(
            rules().check_wire(&bad, &limits, &token(), now()),
            WireCheck::Owned
        );
    }
}

/// The fast path passes over a label byte for byte the same as one at the same position of the
/// family's previous series: what differs from it, or sits elsewhere, is still checked, and
/// nothing carries over from one family to the next.
#[test]
fn labels_repeated_from_the_series_before_are_still_held_to_every_rule() {
    let r = rules();
    fn series<'a>(labels: &[&'a [(&'a str, &'a str)]]) -> Vec<(&'a [(&'a str, &'a str)], i64)> {
        labels.iter().map(|l| (*l, NOW_MS)).collect()
    }
    let first: &[(&str, &str)] = &[("_id", "a"), ("job", "x")];
    let taken = |second: &[(&str, &str)]| {
        matches!(
            both_paths(&r, vec![gauge("up", &series(&[first, second]))]),
            WireCheck::Unchanged { series: 2, .. }
        )
    };
    assert!(taken(first));
    assert!(taken(&[("job", "x"), ("_id", "a")]));
    assert!(taken(&[("_id", "a"), ("job", "y"), ("mode", "z")]));
    // Repeats, other values, a missing token label, an empty value, an invalid name.
    assert!(!taken(&[("_id", "a"), ("job", "x"), ("job", "x")]));
    assert!(!taken(&[("_id", "a"), ("job", "x"), ("_id", "a")]));
    assert!(!taken(&[("_id", "b"), ("job", "x")]));
    assert!(!taken(&[("job", "x"), ("job", "x")]));
    assert!(!taken(&[("job", "x")]));
    assert!(!taken(&[("_id", "a"), ("job", "")]));
    assert!(!taken(&[("_id", "a"), ("jo-b", "x")]));
    // `le` is an ordinary label on a gauge, the type's own on the histogram that follows.
    let labelled: &[(&str, &str)] = &[("_id", "a"), ("le", "1")];
    let histogram = typed(gauge("h", &series(&[labelled])), MetricType::Histogram);
    assert!(matches!(
        both_paths(&r, vec![gauge("g", &series(&[labelled]))]),
        WireCheck::Unchanged { .. }
    ));
    assert_eq!(
        both_paths(&r, vec![gauge("g", &series(&[labelled])), histogram]),
        WireCheck::Owned
    );
}

/// A series that starts with the bytes of the one before (the labels the fast path passes over
/// as checked already) is still checked whole: whatever follows, or differs within a label, is
/// checked against everything before it (repeats, order, the token's labels), and each series
/// against its own predecessor, however many labels it has.
#[test]
fn a_series_that_starts_as_the_one_before_is_still_checked_whole() {
    let r = rules();
    let family = |series: &[&[(&str, &str)]]| {
        let mut f = gauge(
            "up",
            &series.iter().map(|l| (*l, NOW_MS)).collect::<Vec<_>>(),
        );
        // Values that differ, so the series differ past their labels too.
        for (i, m) in f.metric.iter_mut().enumerate() {
            m.gauge = Some(Gauge {
                value: Some(i as f64),
            });
        }
        f
    };
    let taken = |series: &[&[(&str, &str)]]| match both_paths(&r, vec![family(series)]) {
        WireCheck::Unchanged { series: n, .. } => {
            assert_eq!(n, series.len());
            true
        }
        WireCheck::Owned => false,
    };
    let base: &[(&str, &str)] = &[("_id", "a"), ("job", "x"), ("mode", "a")];
    assert!(taken(&[base, &[("_id", "a"), ("job", "x"), ("mode", "b")]]));
    assert!(taken(&[
        base,
        &[("_id", "a"), ("job", "x"), ("mode", "ab")]
    ]));
    assert!(taken(&[base, &[("_id", "a"), ("job", "x")], base]));
    assert!(taken(&[
        base,
        &[("_id", "a"), ("job", "x"), ("mode", "a"), ("z", "1")]
    ]));
    // Unsorted after the shared labels, with no repeat: taken.
    assert!(taken(&[
        base,
        &[("_id", "a"), ("job", "x"), ("mode", "a"), ("b", "1")]
    ]));
    // A repeat of a shared label after them, right after or further on.
    assert!(!taken(&[
        base,
        &[("_id", "a"), ("job", "x"), ("mode", "a"), ("job", "y")]
    ]));
    assert!(!taken(&[
        base,
        &[("_id", "a"), ("job", "x"), ("mode", "a"), ("_id", "a")]
    ]));
    assert!(!taken(&[
        base,
        &[("_id", "a"), ("job", "x"), ("mode", "b"), ("mode", "c")]
    ]));
    assert!(!taken(&[
        base,
        base,
        &[("_id", "a"), ("job", "x"), ("job", "x")]
    ]));
    // Each series against its own predecessor: the third shares its start with the second only.
    assert!(!taken(&[
        base,
        &[("_id", "a"), ("job", "y"), ("mode", "a")],
        &[("_id", "a"), ("job", "y"), ("mode", "a"), ("job", "z")],
    ]));
    // The token's label after the shared part, in it, or missing from the second series.
    let late: &[(&str, &str)] = &[("job", "x"), ("mode", "a"), ("_id", "a")];
    assert!(taken(&[
        late,
        &[("job", "x"), ("mode", "a"), ("_id", "a"), ("z", "1")]
    ]));
    assert!(taken(&[late, &[("job", "x"), ("mode", "b"), ("_id", "a")]]));
    assert!(!taken(&[late, &[("job", "x"), ("mode", "a")]]));
    assert!(!taken(&[
        late,
        &[("job", "x"), ("mode", "a"), ("_id", "b")]
    ]));
    assert!(!taken(&[
        base,
        &[("_id", "b"), ("job", "x"), ("mode", "a")]
    ]));
    // A shared label whose value only starts alike: checked again (an empty value is not taken).
    assert!(!taken(&[base, &[("_id", "a"), ("job", ""), ("mode", "a")]]));
    // More labels than the state is kept for: the labels past it are checked, repeats included.
    let names: Vec<String> = (0..20).map(|i| format!("l{i:02}")).collect();
    let many: Vec<(&str, &str)> = std::iter::once(("_id", "a"))
        .chain(names.iter().map(|n| (n.as_str(), "v")))
        .collect();
    let mut more = many.clone();
    more.push(("z", "1"));
    assert!(taken(&[&many, &many, &more]));
    for repeated in ["_id", "l00", "l15", "l16", "l19"] {
        let mut again = many.clone();
        again.push((repeated, "v"));
        assert!(!taken(&[&many, &again]), "{repeated}");
        assert!(!taken(&[&many, &many, &again]), "{repeated}");
    }
}

/// Unsorted labels whose names are, position by position, those of the series before (found
/// distinct) skip the duplicate check: a series that differs in one name, or has one more, is
/// still checked, and a repeat in it refused, however many alike series came before.
#[test]
fn unsorted_names_as_the_series_before_are_checked_for_repeats_when_they_differ() {
    let r = rules();
    let taken = |series: &[&[(&str, &str)]]| {
        let series: Vec<(&[(&str, &str)], i64)> = series.iter().map(|l| (*l, NOW_MS)).collect();
        matches!(
            both_paths(&r, vec![gauge("up", &series)]),
            WireCheck::Unchanged { .. }
        )
    };
    // As the benchmark's series: `_id` after other names, the last name's value changing.
    let node = |mode| [("job", "x"), ("_id", "a"), ("cpu", "0"), ("mode", mode)];
    let (idle, user) = (node("idle"), node("user"));
    assert!(taken(&[&idle, &user, &idle, &user]));
    let repeats: [&[(&str, &str)]; 5] = [
        // The last name another series' name (`job`, `_id`, `cpu`), its value the same or not.
        &[("job", "x"), ("_id", "a"), ("cpu", "0"), ("job", "x")],
        &[("job", "x"), ("_id", "a"), ("cpu", "0"), ("job", "y")],
        &[("job", "x"), ("_id", "a"), ("cpu", "0"), ("cpu", "1")],
        // One name more, repeating one.
        &[
            ("job", "x"),
            ("_id", "a"),
            ("cpu", "0"),
            ("mode", "idle"),
            ("mode", "user"),
        ],
        // Another value where the name is the same, and a repeat after it.
        &[("job", "y"), ("_id", "a"), ("job", "0"), ("mode", "idle")],
    ];
    for repeat in repeats {
        assert!(!taken(&[&idle, &user, repeat]), "{repeat:?}");
        assert!(!taken(&[&idle, repeat, &user]), "{repeat:?}");
    }
    // The series after a refused one is not reached; one after a series with other names is
    // checked on its own.
    let other: &[(&str, &str)] = &[("job", "x"), ("_id", "a"), ("device", "sda"), ("z", "1")];
    assert!(taken(&[&idle, other, &user]));
    assert!(!taken(&[
        &idle,
        other,
        &[("job", "x"), ("_id", "a"), ("z", "0"), ("z", "1")]
    ]));
}

/// A label whose name is the one checked before at its position (in this family or the one
/// before), with another value, has only its value checked again: that value is still held to
/// every rule, the token's value is still compared, and the type's own label is still refused
/// in the family whose type sets it, whichever family the name was first checked in.
#[test]
fn a_name_checked_at_the_same_position_before_still_has_its_value_and_type_checked() {
    let r = rules();
    fn at(value: &str) -> Vec<(&str, &str)> {
        vec![("_id", "a"), ("job", "x"), ("mode", value)]
    }
    let one_family = |second: &[(&str, &str)]| {
        let first = at("a");
        both_paths(&r, vec![gauge("up", &[(&first, NOW_MS), (second, NOW_MS)])])
    };
    let two_families = |second: &[(&str, &str)]| {
        let first = at("a");
        both_paths(
            &r,
            vec![
                gauge("up", &[(&first, NOW_MS)]),
                gauge("down", &[(second, NOW_MS)]),
            ],
        )
    };
    for check in [
        &one_family as &dyn Fn(&[(&str, &str)]) -> WireCheck,
        &two_families,
    ] {
        assert!(matches!(check(&at("b")), WireCheck::Unchanged { .. }));
        assert!(matches!(check(&at("ab")), WireCheck::Unchanged { .. }));
        let longest = "v".repeat(labels::MAX_VALUE_BYTES);
        assert!(matches!(check(&at(&longest)), WireCheck::Unchanged { .. }));
        let too_long = "v".repeat(labels::MAX_VALUE_BYTES + 1);
        assert_eq!(check(&at(&too_long)), WireCheck::Owned);
        assert_eq!(check(&at("")), WireCheck::Owned);
        // The token's label with another value, where the name was checked before.
        assert_eq!(
            check(&[("_id", "b"), ("job", "x"), ("mode", "a")]),
            WireCheck::Owned
        );
        // A name that only starts as the one before is checked whole.
        assert_eq!(
            check(&[("_id", "a"), ("job", "x"), ("mode-", "a")]),
            WireCheck::Owned
        );
        assert_eq!(
            check(&[("_id", "a"), ("job", "x"), ("__mode", "a")]),
            WireCheck::Owned
        );
    }
    // `le` checked on a gauge, then at the same position with another value (or the same) in a
    // histogram, whose own label it is.
    let gauge_le: &[(&str, &str)] = &[("_id", "a"), ("le", "1")];
    for value in ["2", "1"] {
        let histogram_le: &[(&str, &str)] = &[("_id", "a"), ("le", value)];
        let histogram = typed(gauge("h", &[(histogram_le, NOW_MS)]), MetricType::Histogram);
        assert_eq!(
            both_paths(&r, vec![gauge("g", &[(gauge_le, NOW_MS)]), histogram]),
            WireCheck::Owned,
            "{value}"
        );
    }
}

/// The fast path reads each family's own fields up to its first series only: a name, help or
/// type written after a series (which would be the one that counts) leaves the body to the owned
/// path, valid or not.
#[test]
fn a_family_field_after_a_series_is_left_to_the_owned_path() {
    let r = rules();
    let limits = delimited::Limits::default();
    let family = gauge("up", &[(&[("_id", "a")], NOW_MS)]);
    let body = delimited::encode(std::slice::from_ref(&family));
    assert!(matches!(
        r.check_wire(&body, &limits, &token(), now()),
        WireCheck::Unchanged { series: 1, .. }
    ));
    // One family message, length-prefixed by one byte, with a field appended to it.
    let appended = |field: &[u8]| {
        let message = [body.get(1..).unwrap(), field].concat();
        assert!(message.len() < 0x80);
        [&[message.len() as u8][..], &message].concat()
    };
    for field in [
        &b"\x0a\x04down"[..],
        b"\x12\x01h",
        b"\x18\x01",
        b"\x18\x02",
        b"\x0a\x02up",
    ] {
        let body = appended(field);
        assert!(delimited::decode(&body, &limits).is_ok());
        assert_eq!(
            r.check_wire(&body, &limits, &token(), now()),
            WireCheck::Owned,
            "{field:?}"
        );
    }
    // An unknown field there changes nothing.
    assert!(matches!(
        r.check_wire(&appended(b"\x78\x01"), &limits, &token(), now()),
        WireCheck::Unchanged { series: 1, .. }
    ));
}

/// Tokens with several labels (held inline up to four, in a list beyond): a series is taken
/// unchanged only with every one of them, each with the token's value.
#[test]
fn every_token_label_is_required_however_many_the_token_has() {
    let r = rules();
    let limits = delimited::Limits::default();
    for n in [1usize, 2, 4, 5, 7] {
        let token: BTreeMap<String, String> = (0..n)
            .map(|i| match i {
                0 => ("_id".to_string(), "a".to_string()),
                i => (format!("t{i}"), format!("v{i}")),
            })
            .collect();
        let all: Vec<(String, String)> = token.clone().into_iter().collect();
        let check = |labels: &[(String, String)]| {
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let body = delimited::encode(&[stamped("up", &labels, &[NOW_MS])]);
            r.check_wire(&body, &limits, &token, now())
        };
        assert!(
            matches!(check(&all), WireCheck::Unchanged { series: 1, .. }),
            "{n}"
        );
        for i in 0..n {
            let mut missing = all.clone();
            missing.remove(i);
            assert_eq!(check(&missing), WireCheck::Owned, "{n} without {i}");
            let mut other = all.clone();
            other[i].1.push('x');
            assert_eq!(check(&other), WireCheck::Owned, "{n} with {i} changed");
        }
    }
}

/// A whitelist whose selectors name families (`up`, `{__name__=~"node_.*"}`, as upstream's do)
/// is decided once per family on the fast path: a body whose every family it selects is taken
/// unchanged; one with a family it does not select, or under selectors on other labels (which
/// only the owned path can apply per series), is left to the owned path.
#[test]
fn the_fast_path_decides_a_whitelist_of_family_names_once_per_family() {
    let listed = |selectors: &[&str]| {
        let mut r = rules();
        r.whitelist = telemeter_common::sync::Swap::new(std::sync::Arc::new(
            selectors
                .iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect(),
        ));
        r
    };
    let ok: &[(&str, &str)] = &[("_id", "a"), ("job", "x")];
    let body = || {
        vec![
            stamped("up", ok, &[NOW_MS, NOW_MS]),
            stamped("node_load1", ok, &[NOW_MS]),
        ]
    };
    for selectors in [
        &["up", "node_load1"][..],
        &["up", "{__name__=~\"node_.*\"}"],
        &["{__name__=~\"up|node_load1\"}", "other{job=\"y\"}"],
        &["{__name__!=\"down\", __name__=~\".+\"}"],
    ] {
        assert!(
            matches!(
                both_paths(&listed(selectors), body()),
                WireCheck::Unchanged { series: 3, .. }
            ),
            "{selectors:?}"
        );
    }
    for selectors in [
        // A family no selector names: the owned path drops it.
        &["up"][..],
        &["{__name__=~\"node_.*\"}"],
        // Selectors on other labels: kept or dropped per series, by the owned path.
        &["up{job=\"x\"}", "node_load1"],
        &["{job=\"x\"}"],
    ] {
        assert_eq!(
            both_paths(&listed(selectors), body()),
            WireCheck::Owned,
            "{selectors:?}"
        );
    }
    // What the owned path then does with them: the same whitelist, applied per series.
    let v = listed(&["up"]).apply(body(), &token(), now()).unwrap();
    assert_eq!((v.series, v.filtered), (2, 1));
}

/// The newest sample the wire check reports for a body it takes unchanged is exactly what
/// `wire::newest_timestamp` reads from it (the store's TTL counts from it, and the store no
/// longer reads it itself): on bodies built with the newest series anywhere (first, middle or
/// last family, every value type, a series with its timestamp written twice), on random ones, and
/// on a deterministic run of mutations of them.
#[test]
fn the_newest_sample_of_an_unchanged_body_is_the_one_the_store_would_read() {
    use prost::Message;
    use telemeter_common::wire::newest_timestamp;
    use testkit::fuzz::{mutate, Rng};

    // No time bounds: a mutated timestamp is still taken, so mutations move the newest one.
    let r = Rules {
        max_sample_age: Duration::from_secs(u64::MAX / 4),
        max_future_skew: Duration::from_secs(u64::MAX / 4),
        max_samples: 100_000,
        ..rules()
    };
    let limits = delimited::Limits::default();
    // `Some(newest)` when the fast path takes `body`, after checking it against the store's read.
    let check = |body: &[u8]| -> Option<i64> {
        match r.check_wire(body, &limits, &token(), now()) {
            WireCheck::Unchanged {
                newest_sample_ms, ..
            } => {
                assert_eq!(
                    newest_timestamp(body),
                    Ok(Some(newest_sample_ms)),
                    "body {:02x?}",
                    body
                );
                Some(newest_sample_ms)
            }
            WireCheck::Owned => None,
        }
    };
    let ok: &[(&str, &str)] = &[("_id", "a"), ("job", "x")];
    let typed_as = |mut family: MetricFamily, kind: MetricType| {
        family.r#type = Some(kind as i32);
        for metric in &mut family.metric {
            let value = metric.gauge.take().and_then(|g| g.value);
            match kind {
                MetricType::Counter => metric.counter = Some(Counter { value }),
                MetricType::Untyped => {
                    metric.untyped = Some(telemeter_common::model::Untyped { value })
                }
                MetricType::Summary => {
                    metric.summary = Some(Summary {
                        sample_count: Some(2),
                        sample_sum: Some(1.0),
                        quantile: vec![Quantile {
                            quantile: Some(0.5),
                            value: Some(1.0),
                        }],
                    })
                }
                MetricType::Histogram => {
                    metric.histogram = Some(Histogram {
                        sample_count: Some(2),
                        sample_sum: Some(1.0),
                        bucket: vec![Bucket {
                            cumulative_count: Some(1),
                            upper_bound: Some(0.5),
                        }],
                    })
                }
                _ => metric.gauge = Some(Gauge { value }),
            }
        }
        family
    };
    let t = NOW_MS;
    let mut seeds: Vec<(Vec<u8>, i64)> = vec![
        // Newest in the first family, in the middle one, in the last one.
        (
            delimited::encode(&[
                stamped("a", ok, &[t - 5, t + 9]),
                stamped("b", ok, &[t - 100, t - 1]),
            ]),
            t + 9,
        ),
        (
            delimited::encode(&[
                stamped("a", ok, &[t - 5]),
                typed_as(stamped("h", ok, &[t, t + 7]), MetricType::Histogram),
                typed_as(stamped("s", ok, &[t - 3]), MetricType::Summary),
            ]),
            t + 7,
        ),
        (
            delimited::encode(&[
                typed_as(stamped("c", ok, &[t - 9, t - 9]), MetricType::Counter),
                typed_as(stamped("u", ok, &[t - 2]), MetricType::Untyped),
                typed_as(stamped("s", ok, &[t - 8, t + 1]), MetricType::Summary),
            ]),
            t + 1,
        ),
        // Before 1970 (a negative varint, ten bytes on the wire).
        (
            delimited::encode(&[stamped("a", ok, &[-7_000, -5]), stamped("b", ok, &[-9])]),
            -5,
        ),
    ];
    // A series whose timestamp is written twice: the last one is its timestamp, for both.
    let mut twice = stamped("a", ok, &[t + 50]).metric.remove(0).encode_to_vec();
    twice.push(0x30);
    prost::encoding::encode_varint((t - 50) as u64, &mut twice);
    let mut family = MetricFamily {
        name: Some("a".into()),
        help: None,
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![],
    }
    .encode_to_vec();
    family.push(0x22);
    prost::encoding::encode_varint(twice.len() as u64, &mut family);
    family.extend_from_slice(&twice);
    let mut body = Vec::new();
    prost::encoding::encode_varint(family.len() as u64, &mut body);
    body.extend_from_slice(&family);
    body.extend(delimited::encode(&[stamped("b", ok, &[t - 60])]));
    seeds.push((body, t - 50));
    for (body, newest) in &seeds {
        assert_eq!(check(body), Some(*newest), "seed {:02x?}", body);
    }

    // Random bodies: 1 to 6 families of 1 to 5 series, timestamps not decreasing in a family
    // (as the fast path requires) but in any order across families.
    let mut rng = Rng::new(0x6e65_7765_7374);
    let kinds = [
        MetricType::Gauge,
        MetricType::Counter,
        MetricType::Untyped,
        MetricType::Summary,
        MetricType::Histogram,
    ];
    for _ in 0..300 {
        let mut families = Vec::new();
        let mut newest = i64::MIN;
        for f in 0..1 + rng.below(6) {
            let mut ts: Vec<i64> = (0..1 + rng.below(5))
                .map(|_| t - 1_000_000 + rng.below(2_000_000) as i64)
                .collect();
            ts.sort_unstable();
            newest = newest.max(*ts.last().unwrap());
            let name = format!("f{f}");
            families.push(typed_as(stamped(&name, ok, &ts), *rng.pick(&kinds)));
        }
        let body = delimited::encode(&families);
        assert_eq!(check(&body), Some(newest), "families {families:?}");
        seeds.push((body, newest));
    }

    // Mutations of all of them: whatever the fast path still takes, it reads as the store would.
    let corpus: Vec<Vec<u8>> = seeds.into_iter().map(|(body, _)| body).collect();
    let dict: &[&[u8]] = &[
        b"\x30\x00",
        b"\x30\x01",
        b"\x30\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        b"\x30\x80\xd0\xac\xf3\xbc\x31",
        b"\x22\x00",
        b"\x0a\x08\x0a\x03_id\x12\x01a",
    ];
    let (mut taken, mut moved) = (0usize, 0usize);
    for _ in 0..20_000 {
        let mut input = rng.pick(&corpus).clone();
        let before = newest_timestamp(&input);
        mutate(&mut rng, &mut input, &corpus, dict);
        if let Some(newest) = check(&input) {
            taken += 1;
            moved += usize::from(before != Ok(Some(newest)));
        }
    }
    println!("{taken} of 20000 mutated bodies taken unchanged, {moved} with another newest sample");
    // The run reaches bodies taken unchanged, and mutations that move their newest sample.
    assert!(taken > 1_000 && moved > 100, "{taken} taken, {moved} moved");
}
