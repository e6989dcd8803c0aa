//! Tests of the text format: parsing, both writers and the float formatter, against Prometheus's
//! own fixtures.

use super::float::{write_float, NumBuf};
use super::parse::{parse, parse_float, Limits, ParseError};
use super::skip::{label_problem, SkipReason, Skipped};
use super::write::{encode, write_family_counted, write_family_view};
use crate::delimited;
use crate::labels;
use crate::model::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType, Quantile,
    Summary, Untyped,
};
use prost::Message;

const METRICS_TXT: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-metrics.txt");
const METRICS_PB: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-metrics.pb");
const FEDERATE_TXT: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-federate.txt");
const FEDERATE_PB: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-federate.pb");

fn parse_ok(text: &str) -> Vec<MetricFamily> {
    parse(text.as_bytes(), &Limits::default()).unwrap()
}

fn parse_err(text: &[u8], limits: &Limits) -> ParseError {
    parse(text, limits).unwrap_err()
}

fn encode_to_string(families: &[MetricFamily], timestamps: bool) -> String {
    let mut out = Vec::new();
    encode(&mut out, families, timestamps).unwrap();
    String::from_utf8(out).unwrap()
}

/// Families compared by their protobuf bytes, so NaN values compare equal to themselves.
fn same(a: &[MetricFamily], b: &[MetricFamily]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.encode_to_vec() == y.encode_to_vec())
}

fn float(f: f64) -> String {
    let mut out = Vec::new();
    write_float(&mut out, f).unwrap();
    String::from_utf8(out).unwrap()
}

/// Every type, escapes, special values and timestamps, in the exact bytes Go's encoder writes.
const CANONICAL: &str = r#"# HELP c_total A counter with \\ and \n in its help.
# TYPE c_total counter
c_total{path="/a\"b\\c\nd",code="200"} 1027 1395066363000
c_total{path="/",code="400"} 3 1395066363000
# TYPE g gauge
g NaN
g{x="inf"} +Inf
g{x="-inf"} -Inf
g{x="sci"} 1.234567e+06
g{x="small"} -6.6706e-05
g{x="plain"} 0.25 -5
# TYPE u untyped
u{a=""} 0
# HELP h A histogram.
# TYPE h histogram
h_bucket{le="0.05"} 24054
h_bucket{le="0.1"} 33444
h_bucket{le="+Inf"} 144320
h_sum 53423
h_count 144320
h_bucket{method="get",le="1"} 1 17
h_bucket{method="get",le="+Inf"} 2 17
h_sum{method="get"} 1.5 17
h_count{method="get"} 2 17
# TYPE s summary
s{quantile="0.5"} 4773
s{quantile="0.99"} 76656
s_sum 1.7560473e+07
s_count 2693
s{a="x",quantile="0"} NaN
s_sum{a="x"} 0
s_count{a="x"} 0
"#;

#[test]
fn text_round_trips_byte_for_byte() {
    let families = parse_ok(CANONICAL);
    assert_eq!(encode_to_string(&families, true), CANONICAL);
}

#[test]
fn parses_every_type_into_the_right_fields() {
    let families = parse_ok(CANONICAL);
    let names: Vec<_> = families.iter().map(|f| f.name.clone().unwrap()).collect();
    assert_eq!(names, ["c_total", "g", "u", "h", "s"]);

    let c = &families[0];
    assert_eq!(c.metric_type(), MetricType::Counter);
    assert_eq!(
        c.help.as_deref(),
        Some("A counter with \\ and \n in its help.")
    );
    assert_eq!(c.metric[0].label_value("path"), Some("/a\"b\\c\nd"));
    assert_eq!(c.metric[0].counter.unwrap().value, Some(1027.0));
    assert_eq!(c.metric[0].timestamp_ms, Some(1395066363000));

    let g = &families[1];
    assert!(g.metric[0].gauge.unwrap().value.unwrap().is_nan());
    assert_eq!(g.metric[1].gauge.unwrap().value, Some(f64::INFINITY));
    assert_eq!(g.metric[2].gauge.unwrap().value, Some(f64::NEG_INFINITY));
    assert_eq!(g.metric[3].gauge.unwrap().value, Some(1_234_567.0));
    assert_eq!(g.metric[5].timestamp_ms, Some(-5));
    assert_eq!(families[2].metric[0].untyped.unwrap().value, Some(0.0));

    let h = &families[3];
    assert_eq!(h.metric_type(), MetricType::Histogram);
    assert_eq!(h.metric.len(), 2);
    let plain = h.metric[0].histogram.as_ref().unwrap();
    assert_eq!(plain.sample_count, Some(144320));
    assert_eq!(plain.sample_sum, Some(53423.0));
    assert_eq!(plain.bucket.len(), 3);
    assert_eq!(plain.bucket[1].upper_bound, Some(0.1));
    assert_eq!(plain.bucket[1].cumulative_count, Some(33444));
    assert_eq!(h.metric[0].timestamp_ms, None);
    assert_eq!(h.metric[1].label, vec![LabelPair::new("method", "get")]);
    assert_eq!(h.metric[1].timestamp_ms, Some(17));

    let s = &families[4];
    assert_eq!(s.metric.len(), 2);
    let summary = s.metric[0].summary.as_ref().unwrap();
    assert_eq!(summary.quantile.len(), 2);
    assert_eq!(summary.quantile[1].quantile, Some(0.99));
    assert_eq!(summary.quantile[1].value, Some(76656.0));
    assert_eq!(summary.sample_count, Some(2693));
    assert_eq!(s.metric[1].label, vec![LabelPair::new("a", "x")]);
}

#[test]
fn leniencies_go_accepts() {
    let text = "  # a plain comment\n\n#\nm{a=\"1\",} 1e3\nm { b = \"2\" } Inf 5\nm{} -inf\n# TYPE t COUNTER   \nt 1.";
    let families = parse_ok(text);
    assert_eq!(families.len(), 2);
    let m = &families[0];
    assert_eq!(m.metric_type(), MetricType::Untyped);
    assert_eq!(m.metric.len(), 3);
    assert_eq!(m.metric[0].untyped.unwrap().value, Some(1000.0));
    assert_eq!(m.metric[1].label, vec![LabelPair::new("b", "2")]);
    assert_eq!(m.metric[1].untyped.unwrap().value, Some(f64::INFINITY));
    assert_eq!(m.metric[1].timestamp_ms, Some(5));
    assert_eq!(m.metric[2].untyped.unwrap().value, Some(f64::NEG_INFINITY));
    assert_eq!(families[1].metric_type(), MetricType::Counter);
    assert_eq!(families[1].metric[0].counter.unwrap().value, Some(1.0));
}

#[test]
fn groups_like_go_expfmt() {
    // Without a TYPE line, _bucket/_sum/_count are separate untyped families.
    let families = parse_ok("x_bucket{le=\"1\"} 1\nx_sum 2\nx_count 3\n");
    let names: Vec<_> = families
        .iter()
        .map(|f| f.name.as_deref().unwrap())
        .collect();
    assert_eq!(names, ["x_bucket", "x_sum", "x_count"]);
    assert_eq!(families[0].metric[0].label, vec![LabelPair::new("le", "1")]);

    // Interleaved series of one histogram still group by label set, regardless of label order.
    let text = "# TYPE x histogram\nx_bucket{a=\"1\",b=\"2\",le=\"+Inf\"} 1\nx_bucket{b=\"3\",le=\"+Inf\"} 4\nx_count{b=\"2\",a=\"1\"} 1\nx_count{b=\"3\"} 4\nx_total 7\n";
    let families = parse_ok(text);
    assert_eq!(families.len(), 2);
    assert_eq!(families[0].metric.len(), 2);
    assert_eq!(
        families[0].metric[0]
            .histogram
            .as_ref()
            .unwrap()
            .sample_count,
        Some(1)
    );
    assert_eq!(
        families[0].metric[1]
            .histogram
            .as_ref()
            .unwrap()
            .sample_count,
        Some(4)
    );
    assert_eq!(families[1].name.as_deref(), Some("x_total"));
    assert_eq!(families[1].metric_type(), MetricType::Untyped);

    // A summary's _bucket is not part of it; families without samples vanish.
    let text = "# TYPE s summary\n# HELP lonely nobody\ns_bucket 1\ns_sum 2\n";
    let families = parse_ok(text);
    let names: Vec<_> = families
        .iter()
        .map(|f| f.name.as_deref().unwrap())
        .collect();
    assert_eq!(names, ["s", "s_bucket"]);
    assert_eq!(
        families[0].metric[0].summary.as_ref().unwrap().sample_sum,
        Some(2.0)
    );
}

#[test]
fn model_round_trips_through_text() {
    let families = vec![
        MetricFamily {
            name: Some("weird".into()),
            help: Some("multi\nline \\ help \"quoted\"".into()),
            r#type: Some(MetricType::Gauge as i32),
            metric: [
                0.1,
                -0.0001,
                1e-5,
                123456.0,
                1e21,
                f64::MAX,
                f64::MIN_POSITIVE,
                5e-324,
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ]
            .iter()
            .enumerate()
            .map(|(i, &v)| Metric {
                label: vec![
                    LabelPair::new("i", &i.to_string()),
                    LabelPair::new("v", "\"\\\n\u{e9}"),
                ],
                gauge: Some(Gauge { value: Some(v) }),
                timestamp_ms: Some(i64::MIN + i as i64),
                ..Default::default()
            })
            .collect(),
        },
        MetricFamily {
            name: Some("h".into()),
            help: None,
            r#type: Some(MetricType::Histogram as i32),
            metric: vec![Metric {
                label: vec![LabelPair::new("a", "b")],
                histogram: Some(Histogram {
                    sample_count: Some(10),
                    sample_sum: Some(-2.5),
                    bucket: vec![
                        Bucket {
                            cumulative_count: Some(3),
                            upper_bound: Some(-1.0),
                        },
                        Bucket {
                            cumulative_count: Some(10),
                            upper_bound: Some(f64::INFINITY),
                        },
                    ],
                }),
                timestamp_ms: Some(42),
                ..Default::default()
            }],
        },
        MetricFamily {
            name: Some("s".into()),
            help: Some("summary".into()),
            r#type: Some(MetricType::Summary as i32),
            metric: vec![Metric {
                summary: Some(Summary {
                    sample_count: Some(7),
                    sample_sum: Some(f64::NAN),
                    quantile: vec![Quantile {
                        quantile: Some(0.999),
                        value: Some(1e-300),
                    }],
                }),
                ..Default::default()
            }],
        },
        MetricFamily {
            name: Some("c:total".into()),
            help: None,
            r#type: Some(MetricType::Counter as i32),
            metric: vec![Metric {
                counter: Some(Counter { value: Some(9e15) }),
                ..Default::default()
            }],
        },
        MetricFamily {
            name: Some("u".into()),
            help: None,
            r#type: Some(MetricType::Untyped as i32),
            metric: vec![Metric {
                untyped: Some(Untyped { value: Some(-1.0) }),
                ..Default::default()
            }],
        },
    ];
    let text = encode_to_string(&families, true);
    let back = parse(text.as_bytes(), &Limits::default()).unwrap();
    assert!(same(&families, &back), "{text}\n{back:#?}");

    // Without timestamps they are simply left out.
    let text = encode_to_string(&families, false);
    assert!(!text.contains("-9223372036854775808"));
    let back = parse(text.as_bytes(), &Limits::default()).unwrap();
    assert!(back
        .iter()
        .flat_map(|f| &f.metric)
        .all(|m| m.timestamp_ms.is_none()));
}

/// Found by the text fuzz target (seed 0x18ee55595f8c0f8a): an untyped `h_bucket` parsed before
/// `# TYPE h histogram` was written after `h`'s own lines as `# TYPE h_bucket untyped`, a second
/// TYPE for `h`'s bucket lines, and the whole encoding failed to parse.
#[test]
fn a_family_named_like_a_histograms_lines_is_left_out_so_the_text_parses() {
    let input = "h_bucket{a=\"1\",le=\"1\"} 1 7\nh_count{a=\"1\"} 1 7\n# TYPE h histogram\n\
                 h_bucket{le=\"0.5\"} 2\nh_bucket{le=\"+Inf\"} 5\nh_sum 1.5\nh_count 5\n\
                 # TYPE s summary\ns_sum 3\ns_count 2\ns_count{b=\"x\"} 1\n";
    let families = parse_ok(input);
    let names: Vec<_> = families.iter().filter_map(|f| f.name.as_deref()).collect();
    assert_eq!(names, ["h_bucket", "h_count", "h", "s"]);
    let text = encode_to_string(&families, true);
    let again = parse(text.as_bytes(), &Limits::default()).unwrap_or_else(|e| {
        panic!("the encoding does not parse: {e}\n{text}");
    });
    let names: Vec<_> = again.iter().filter_map(|f| f.name.as_deref()).collect();
    assert_eq!(names, ["h", "s"], "{text}");
}

#[test]
fn encoder_adds_the_inf_bucket_and_skips_what_it_cannot_write() {
    let families = vec![
        MetricFamily {
            name: Some("h".into()),
            help: Some(String::new()),
            r#type: Some(MetricType::Histogram as i32),
            metric: vec![Metric {
                histogram: Some(Histogram {
                    sample_count: Some(5),
                    sample_sum: Some(1.5),
                    bucket: vec![Bucket {
                        cumulative_count: Some(2),
                        upper_bound: Some(0.5),
                    }],
                }),
                ..Default::default()
            }],
        },
        MetricFamily {
            name: Some("empty".into()),
            ..Default::default()
        },
        MetricFamily {
            name: Some("mismatch".into()),
            r#type: Some(MetricType::Counter as i32),
            metric: vec![Metric {
                gauge: Some(Gauge { value: Some(1.0) }),
                ..Default::default()
            }],
            ..Default::default()
        },
    ];
    assert_eq!(
        encode_to_string(&families, true),
        "# TYPE h histogram\nh_bucket{le=\"0.5\"} 2\nh_bucket{le=\"+Inf\"} 5\nh_sum 1.5\nh_count 5\n"
    );
    let nameless = MetricFamily {
        metric: vec![Metric::default()],
        ..Default::default()
    };
    let mut skipped = Skipped::default();
    let mut out = Vec::new();
    write_family_counted(&mut out, &nameless, true, &mut skipped).unwrap();
    assert!(out.is_empty());
    assert_eq!(skipped.count(SkipReason::MetricName), 1);
}

/// A family of `metric_type` with one series per label set, each with the value its type
/// calls for.
fn family_of(metric_type: MetricType, series: &[&[(&str, &str)]]) -> MetricFamily {
    MetricFamily {
        name: Some("f".into()),
        help: Some("Help.".into()),
        r#type: Some(metric_type as i32),
        metric: series
            .iter()
            .map(|labels| {
                let mut m = Metric {
                    label: labels.iter().map(|(n, v)| LabelPair::new(n, v)).collect(),
                    timestamp_ms: Some(5),
                    ..Default::default()
                };
                match metric_type {
                    MetricType::Counter => m.counter = Some(Counter { value: Some(1.0) }),
                    MetricType::Gauge => m.gauge = Some(Gauge { value: Some(1.0) }),
                    MetricType::Untyped => m.untyped = Some(Untyped { value: Some(1.0) }),
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
                m
            })
            .collect(),
    }
}

/// The first family of a protobuf-delimited `body`, as `/federate` reads it.
fn first_family(body: &[u8]) -> crate::wire::FamilyView<'_> {
    crate::wire::families(body, &delimited::Limits::default())
        .next()
        .unwrap()
        .unwrap()
}

/// Writes `family` with both writers, asserting they agree; the text and what was skipped.
fn written(family: &MetricFamily) -> (String, Skipped) {
    let mut owned = Vec::new();
    let mut owned_skipped = Skipped::default();
    write_family_counted(&mut owned, family, false, &mut owned_skipped).unwrap();
    let body = delimited::encode(std::slice::from_ref(family));
    let view = first_family(&body);
    let mut viewed = Vec::new();
    let mut view_skipped = Skipped::default();
    write_family_view(&mut viewed, &view, false, &mut view_skipped).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&viewed),
        String::from_utf8_lossy(&owned)
    );
    assert_eq!(view_skipped, owned_skipped);
    // A part found plain is written the same with the labels copied unchecked.
    let mut part = Vec::new();
    let (mut skipped, mut header) = (Skipped::default(), false);
    let plain = super::write::write_family_view_part_plain(
        &mut part,
        &view,
        false,
        &mut skipped,
        &mut header,
        &mut |_| true,
        false,
    )
    .unwrap();
    assert_eq!(part, viewed);
    if plain {
        let mut known = Vec::new();
        let (mut skipped, mut header) = (Skipped::default(), false);
        super::write::write_family_view_part_plain(
            &mut known,
            &view,
            false,
            &mut skipped,
            &mut header,
            &mut |_| true,
            true,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&known),
            String::from_utf8_lossy(&owned)
        );
    }
    (String::from_utf8(owned).unwrap(), owned_skipped)
}

#[test]
fn the_writers_label_name_rule_is_the_validators() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let alphabet = b"aZ_09:-.\xc3\xa9 ";
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let name: Vec<u8> = (0..(x % 5))
            .map(|i| alphabet[((x >> (8 * i)) % alphabet.len() as u64) as usize])
            .collect();
        let Ok(text) = std::str::from_utf8(&name) else {
            assert_eq!(
                label_problem(MetricType::Gauge, &name),
                Some(SkipReason::LabelName)
            );
            continue;
        };
        assert_eq!(
            label_problem(MetricType::Gauge, &name) != Some(SkipReason::LabelName),
            labels::is_valid_label_name(text),
            "{text:?}"
        );
    }
}

#[test]
fn series_prometheus_would_refuse_are_left_out_and_counted() {
    let ok: &[(&str, &str)] = &[("a", "1")];
    for (metric_type, bad, reason) in [
        (
            MetricType::Histogram,
            &[("le", "1")][..],
            SkipReason::TypeLabel,
        ),
        (
            MetricType::GaugeHistogram,
            &[("le", "1")][..],
            SkipReason::TypeLabel,
        ),
        (
            MetricType::Summary,
            &[("quantile", "0.5")][..],
            SkipReason::TypeLabel,
        ),
        (
            MetricType::Gauge,
            &[("__name__", "x")][..],
            SkipReason::ReservedLabel,
        ),
        (
            MetricType::Counter,
            &[("a", "1"), ("__foo", "x")][..],
            SkipReason::ReservedLabel,
        ),
        (
            MetricType::Untyped,
            &[("a", "1"), ("b", "2"), ("a", "3")][..],
            SkipReason::DuplicateLabel,
        ),
        (
            MetricType::Gauge,
            &[("a-b", "1")][..],
            SkipReason::LabelName,
        ),
        (MetricType::Gauge, &[("", "1")][..], SkipReason::LabelName),
    ] {
        // Alone, the bad series leaves nothing behind, not even the header.
        let (text, skipped) = written(&family_of(metric_type, &[bad]));
        assert_eq!(text, "", "{metric_type:?} {bad:?}");
        assert_eq!(
            skipped.count(reason),
            1,
            "{metric_type:?} {bad:?}: {skipped}"
        );
        assert_eq!(skipped.total(), 1);
        // Between good ones, only it is left out, and what is written parses.
        let (text, skipped) = written(&family_of(metric_type, &[ok, bad, ok]));
        let (good, _) = written(&family_of(metric_type, &[ok, ok]));
        assert_eq!(text, good, "{metric_type:?} {bad:?}");
        assert_eq!(skipped.total(), 1);
        assert!(parse(text.as_bytes(), &Limits::default()).is_ok(), "{text}");
    }
    // `le` and `quantile` are ordinary labels on the other types.
    for metric_type in [MetricType::Gauge, MetricType::Counter, MetricType::Untyped] {
        let (text, skipped) = written(&family_of(
            metric_type,
            &[&[("le", "1"), ("quantile", "2")]],
        ));
        assert_eq!(skipped.total(), 0);
        assert!(text.contains("f{le=\"1\",quantile=\"2\"} 1\n"), "{text}");
    }
    // Past the names kept on the stack, a duplicate is still found.
    let names: Vec<String> = (0..40).map(|i| format!("l{i}")).collect();
    let mut many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let (_, skipped) = written(&family_of(MetricType::Gauge, &[&many]));
    assert_eq!(skipped.total(), 0);
    many.push(("l33", "w"));
    let (text, skipped) = written(&family_of(MetricType::Gauge, &[&many]));
    assert_eq!(
        (text.as_str(), skipped.count(SkipReason::DuplicateLabel)),
        ("", 1)
    );
    // An invalid family name leaves every series out.
    let mut bad_name = family_of(MetricType::Gauge, &[ok, ok]);
    bad_name.name = Some("a-b".into());
    let (text, skipped) = written(&bad_name);
    assert_eq!(
        (text.as_str(), skipped.count(SkipReason::MetricName)),
        ("", 2)
    );
    assert_eq!(skipped.to_string(), "metric_name: 2");
}

/// The view writer renders labels written the usual way by copying their bytes (see
/// `plain_labels`), and everything else the general way: random label sets that mix both (values
/// to escape, non-ASCII, 128 bytes or longer, names reserved, invalid, repeated or alike in
/// length, first, middle and last byte) write what the owned writer writes, and skip the same.
#[test]
fn labels_copied_from_their_bytes_write_what_the_general_way_writes() {
    let names = [
        "a", "_id", "job", "cpu", "abxc", "acxc", "instance", "le", "quantile", "__x", "a-b", "l0",
        "l1", "l2", "l3", "l4", "l5", "l6", "l7", "l8", "l9", "m0", "m1", "m2", "m3",
    ];
    let long = "v".repeat(130);
    let values = [
        "",
        "1",
        "GET",
        "10.0.0.1:9100",
        "a\\b",
        "a\nb",
        "say \"hi\"",
        "é",
        "0123456789abcdef",
        long.as_str(),
        "x\\",
    ];
    let mut rng = testkit::fuzz::Rng::new(0x2545_f491_4f6c_dd1d);
    let mut next = |n: usize| rng.below(n);
    for round in 0..3_000 {
        let metric_type = [
            MetricType::Counter,
            MetricType::Gauge,
            MetricType::Untyped,
            MetricType::Summary,
            MetricType::Histogram,
        ][round % 5];
        let series: Vec<Vec<(&str, &str)>> = (0..1 + next(4))
            .map(|_| {
                // Mostly distinct valid names, as real series have, up to past the 16 kept.
                let count = next(20);
                let start = next(names.len());
                (0..count)
                    .map(|i| {
                        let name = if next(8) == 0 {
                            names[next(names.len())]
                        } else {
                            names[(start + i) % names.len()]
                        };
                        (name, values[next(values.len())])
                    })
                    .collect()
            })
            .collect();
        let series: Vec<&[(&str, &str)]> = series.iter().map(Vec::as_slice).collect();
        let (text, _) = written(&family_of(metric_type, &series));
        assert!(parse(text.as_bytes(), &Limits::default()).is_ok(), "{text}");
    }
}

/// Series that each repeat the one before but for one label (a value, a name, one more or one
/// less: what the checks a series inherits from the one before must not let through) write
/// what the owned writer writes, and are found plain exactly when every series is written with
/// nothing to check or escape.
#[test]
fn series_alike_but_for_one_label_are_checked_as_if_alone() {
    use super::write::write_family_view_part_plain;
    let names = [
        "_id", "a", "b", "job", "cpu", "le", "quantile", "__x", "1a", "instance",
    ];
    let long = "v".repeat(130);
    let values = [
        "",
        "1",
        "idle",
        "bench-00000007",
        "a\\b",
        "a\nb",
        "x\"y",
        "é",
        long.as_str(),
    ];
    let clean_value =
        |v: &str| v.len() < 100 && v.bytes().all(|b| b < 0x80 && !b"\\\n\"".contains(&b));
    let mut rng = testkit::fuzz::Rng::new(0x5851_f42d_4c95_7f2d);
    let mut next = |n: usize| rng.below(n);
    let (mut plain_parts, mut unplain_parts) = (0, 0);
    for round in 0..4_000 {
        let metric_type = [
            MetricType::Counter,
            MetricType::Gauge,
            MetricType::Summary,
            MetricType::Histogram,
        ][round % 4];
        // Mostly clean labels to start from, so that a part is often plain.
        let mut labels: Vec<(&str, &str)> = vec![("_id", "bench-00000007"), ("job", "1")];
        let mut series: Vec<Vec<(&str, &str)>> = vec![labels.clone()];
        for _ in 0..1 + next(6) {
            let at = next(labels.len() + 1);
            let dirty = next(4) == 0;
            let name = if dirty {
                names[next(names.len())]
            } else {
                names[next(5)]
            };
            let value = if dirty {
                values[next(values.len())]
            } else {
                values[next(4)]
            };
            match (next(4), labels.get_mut(at)) {
                (0, Some(label)) => label.1 = value,
                (1, Some(label)) => label.0 = name,
                (2, Some(_)) => {
                    labels.remove(at);
                }
                _ => labels.insert(at.min(labels.len()), (name, value)),
            }
            series.push(labels.clone());
        }
        let series: Vec<&[(&str, &str)]> = series.iter().map(Vec::as_slice).collect();
        let family = family_of(metric_type, &series);
        let (_, skipped) = written(&family);
        let body = delimited::encode(std::slice::from_ref(&family));
        let view = first_family(&body);
        let mut out = Vec::new();
        let plain = write_family_view_part_plain(
            &mut out,
            &view,
            false,
            &mut Skipped::default(),
            &mut false,
            &mut |_| true,
            false,
        )
        .unwrap();
        let expected = skipped.total() == 0
            && series
                .iter()
                .all(|labels| labels.iter().all(|(_, v)| clean_value(v)));
        assert_eq!(plain, expected, "{series:?}");
        if plain {
            plain_parts += 1;
        } else {
            unplain_parts += 1;
        }
    }
    assert!(
        plain_parts > 500 && unplain_parts > 500,
        "{plain_parts} {unplain_parts}"
    );
}

/// A label message written otherwise than the usual way (its value's field first, its name's
/// twice) is read as prost reads it, beside labels written the usual way.
#[test]
fn labels_written_unusually_are_read_as_prost_reads_them() {
    let family = family_of(MetricType::Gauge, &[&[("a", "1"), ("b", "2")]]);
    let usual = delimited::encode(std::slice::from_ref(&family));
    // The second label, `0a 01 62 12 01 32` (b="2"), rewritten as `12 01 32 0a 01 63 0a 01 62`:
    // value first, then the name twice (the last, b, wins).
    let at = usual
        .windows(6)
        .position(|w| w == [0x0a, 0x01, b'b', 0x12, 0x01, b'2'])
        .unwrap();
    let mut body = usual[..at - 1].to_vec();
    body.push(9);
    body.extend_from_slice(&[0x12, 0x01, b'2', 0x0a, 0x01, b'c', 0x0a, 0x01, b'b']);
    body.extend_from_slice(&usual[at + 6..]);
    // Two more lengths grow by three: the family's prefix and its series' field.
    let family_len = body[0] as usize;
    body[0] = (family_len + 3) as u8;
    // The series' field follows the type's (`18 01`, a gauge).
    let metric_at = body
        .windows(3)
        .position(|w| w == [0x18, 0x01, 0x22])
        .unwrap()
        + 2;
    body[metric_at + 1] += 3;
    let view = first_family(&body);
    let mut out = Vec::new();
    let mut skipped = Skipped::default();
    write_family_view(&mut out, &view, false, &mut skipped).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "# HELP f Help.\n# TYPE f gauge\nf{a=\"1\",b=\"2\"} 1\n"
    );
    assert_eq!(skipped.total(), 0);
}

/// Found by fuzzing (`common/tests/fuzz.rs`): a histogram family whose series all lacked a
/// histogram still wrote its `# TYPE` line, so the untyped `x_count` family after it read as a
/// second TYPE line for `x` and the whole body failed to parse.
#[test]
fn a_family_with_nothing_to_write_leaves_no_header_behind() {
    let families = vec![
        MetricFamily {
            name: Some("x".into()),
            help: Some("dangling".into()),
            r#type: Some(MetricType::Histogram as i32),
            metric: vec![Metric {
                untyped: Some(Untyped { value: Some(1.0) }),
                ..Default::default()
            }],
        },
        MetricFamily {
            name: Some("x_count".into()),
            r#type: Some(MetricType::Untyped as i32),
            metric: vec![Metric {
                untyped: Some(Untyped { value: Some(6.0) }),
                ..Default::default()
            }],
            ..Default::default()
        },
    ];
    let text = encode_to_string(&families, true);
    assert_eq!(text, "# TYPE x_count untyped\nx_count 6\n");
    let back = parse(text.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].name.as_deref(), Some("x_count"));
}

#[test]
fn floats_format_like_go() {
    let cases = [
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (-1.0, "-1"),
        (0.1, "0.1"),
        (0.25, "0.25"),
        (100.5, "100.5"),
        (123456.0, "123456"),
        (999999.0, "999999"),
        (1e6, "1e+06"),
        (1234567.0, "1.234567e+06"),
        (9.531768e6, "9.531768e+06"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (6.6706e-05, "6.6706e-05"),
        (1e21, "1e+21"),
        (1e100, "1e+100"),
        (5e-324, "5e-324"),
        (f64::MAX, "1.7976931348623157e+308"),
        (9007199254740991.0, "9.007199254740991e+15"),
        (9007199254740992.0, "9.007199254740992e+15"),
        (f64::NAN, "NaN"),
        (f64::INFINITY, "+Inf"),
        (f64::NEG_INFINITY, "-Inf"),
    ];
    for (f, want) in cases {
        assert_eq!(float(f), want, "formatting {f:?}");
    }
}

#[test]
fn random_floats_round_trip_exactly() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..200_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Mix raw bit patterns with integers, which take the formatter's fast path.
        let f = if i % 2 == 0 {
            f64::from_bits(x)
        } else {
            (x >> (i % 64)) as f64
        };
        if f.is_nan() {
            continue;
        }
        let s = float(f);
        assert_eq!(
            parse_float(&s).map(f64::to_bits),
            Some(f.to_bits()),
            "{f:?} -> {s}"
        )
    }
    assert_eq!(float(-0.0), "0");
    assert_eq!(integer(i64::MIN), "-9223372036854775808");
    assert_eq!(integer(0), "0");
    assert_eq!(integer(i64::MAX), "9223372036854775807");
}

fn integer(n: i64) -> String {
    let mut b = NumBuf::new();
    b.push_i64(n);
    String::from_utf8(b.as_bytes().to_vec()).unwrap()
}

#[test]
fn value_syntax_follows_go_parse_float() {
    for (s, want) in [
        ("NaN", f64::NAN),
        ("nan", f64::NAN),
        ("+Inf", f64::INFINITY),
        ("Inf", f64::INFINITY),
        ("-Inf", f64::NEG_INFINITY),
        ("+inf", f64::INFINITY),
        ("1e3", 1000.0),
        ("1E-3", 0.001),
        ("-2.5e+06", -2.5e6),
        (".5", 0.5),
        ("+7", 7.0),
    ] {
        let got = parse_float(s).unwrap_or_else(|| panic!("{s} rejected"));
        assert_eq!(got.to_bits(), want.to_bits(), "{s}");
    }
    for s in ["", "0x10", "0x1p3", "1_000", "1e999", "abc", "1,5", "--1"] {
        assert_eq!(parse_float(s), None, "{s} accepted");
    }
}

#[test]
fn hostile_text_is_an_error_naming_the_line() {
    let d = Limits::default();
    let cases: &[(&[u8], usize, &str)] = &[
        (
            b"ok 1\nm{a=\"unterminated} 1\n",
            2,
            "unterminated label value",
        ),
        (b"m{a=\"x\\q\"} 1\n", 1, "invalid escape sequence"),
        (b"m{a=\"x\\", 1, "unterminated label value"),
        (b"m{a=x} 1\n", 1, "expected '\"'"),
        (b"m{a} 1\n", 1, "expected '='"),
        (b"m{a=\"1\" b=\"2\"} 1\n", 1, "expected ',' or '}'"),
        (b"m{1a=\"1\"} 1\n", 1, "invalid label name"),
        (b"m{__name__=\"x\"} 1\n", 1, "reserved"),
        (b"m{a=\"1\",a=\"2\"} 1\n", 1, "duplicate label name"),
        (b"\n\n1m 1\n", 3, "invalid metric name"),
        (b"m abc\n", 1, "expected float as value, got \"abc\""),
        (b"m\n", 1, "expected float as value"),
        (b"m 1 2.5\n", 1, "expected integer as timestamp"),
        (b"m 1 2 3\n", 1, "spurious string after timestamp"),
        (b"m 1\r\n", 1, "expected float as value"),
        (b"# TYPE m gauge\n# TYPE m counter\n", 2, "second TYPE line"),
        (b"m 1\n# TYPE m gauge\n", 2, "TYPE after samples"),
        (b"# HELP m a\n# HELP m b\n", 2, "second HELP line"),
        (b"# HELP m a\\tb\n", 1, "invalid escape sequence"),
        (b"# TYPE m gauge_histogram\n", 1, "unknown metric type"),
        (b"# TYPE m-x gauge\n", 1, "invalid metric name in comment"),
        (b"# TYPE h histogram\nh_bucket{le=\"x\"} 1\n", 2, "le label"),
        (b"a 1\nb 2\nc \xff\xfe 3\n", 3, "invalid UTF-8"),
    ];
    for &(text, line, reason) in cases {
        let err = parse_err(text, &d);
        assert_eq!(err.line, line, "{:?}: {err}", String::from_utf8_lossy(text));
        assert!(
            err.reason.contains(reason),
            "{:?}: {err}",
            String::from_utf8_lossy(text)
        );
        assert!(!err.to_string().contains('\n'));
    }
    let long_token = format!("m {}\n", "9".repeat(1000));
    let err = parse_err(long_token.as_bytes(), &d);
    assert!(err.to_string().len() < 120, "{err}");
}

#[test]
fn limits_are_enforced() {
    let limits = Limits {
        max_families: 2,
        max_series: 3,
        max_line_bytes: 20,
    };
    let err = parse_err(b"a 1\n# TYPE a counter\n", &limits);
    assert_eq!(err.line, 2);
    assert!(parse(b"a 1\nb 1\nb{x=\"1\"} 2\n", &limits).is_ok());
    let err = parse_err(b"a 1\nb 1\nb{x=\"1\"} 2\nb{x=\"2\"} 2\n", &limits);
    assert_eq!((err.line, err.reason.as_str()), (4, "more than 3 series"));
    let err = parse_err(b"a 1\nb 1\nc 1\n", &limits);
    assert_eq!(
        (err.line, err.reason.as_str()),
        (3, "more than 2 metric families")
    );
    let err = parse_err(b"a 1\na{x=\"12345678901234\"} 1\n", &limits);
    assert_eq!(
        (err.line, err.reason.as_str()),
        (2, "line longer than 20 bytes")
    );
    // Buckets of one histogram series are one series.
    let mut text = String::from("# TYPE h histogram\n");
    for i in 0..10 {
        text.push_str(&format!("h_bucket{{le=\"{i}\"}} {i}\n"));
    }
    let limits = Limits {
        max_series: 1,
        ..Limits::default()
    };
    assert_eq!(parse(text.as_bytes(), &limits).unwrap()[0].metric.len(), 1);
}

#[test]
fn garbage_never_panics() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let alphabet = b"ab_:{}=\",\\n \t#HELPTYPEhistogramsummary01.e+-InfNaN\n\xff";
    for _ in 0..3000 {
        // Mutations of the real fixture, and random strings over the grammar's alphabet.
        let mut body = METRICS_TXT.to_vec();
        for _ in 0..(next() % 8) {
            let at = (next() as usize) % body.len();
            body[at] = alphabet[(next() as usize) % alphabet.len()];
        }
        let _ = parse(&body, &Limits::default());
        let random: Vec<u8> = (0..(next() % 200))
            .map(|_| alphabet[(next() as usize) % alphabet.len()])
            .collect();
        let _ = parse(&random, &Limits::default());
    }
}

#[test]
fn prometheus_metrics_fixture_parses_typed_and_grouped() {
    let families = parse(METRICS_TXT, &Limits::default()).unwrap();
    let by_name = |n: &str| {
        families
            .iter()
            .find(|f| f.name.as_deref() == Some(n))
            .unwrap()
    };

    let gc = by_name("go_gc_duration_seconds");
    assert_eq!(gc.metric_type(), MetricType::Summary);
    assert_eq!(gc.metric.len(), 1);
    let summary = gc.metric[0].summary.as_ref().unwrap();
    let ranks: Vec<_> = summary
        .quantile
        .iter()
        .map(|q| q.quantile.unwrap())
        .collect();
    assert_eq!(ranks, [0.0, 0.25, 0.5, 0.75, 1.0]);
    assert!(summary.sample_count.is_some() && summary.sample_sum.is_some());

    let http = by_name("prometheus_http_request_duration_seconds");
    assert_eq!(http.metric_type(), MetricType::Histogram);
    assert!(http.metric.len() >= 2, "one series per handler");
    for m in &http.metric {
        assert!(m.label_value("handler").is_some());
        assert!(m.label_value("le").is_none());
        let h = m.histogram.as_ref().unwrap();
        let last = h.bucket.last().unwrap();
        assert_eq!(last.upper_bound, Some(f64::INFINITY));
        assert_eq!(last.cumulative_count, h.sample_count);
    }
    assert!(families
        .iter()
        .all(|f| f.metric_type() != MetricType::Untyped));
    assert!(families
        .iter()
        .all(|f| !f.name.as_deref().unwrap().ends_with("_bucket")));
    let types = |t| families.iter().filter(|f| f.metric_type() == t).count();
    assert_eq!(types(MetricType::Histogram), 7);
    assert_eq!(types(MetricType::Summary), 10);

    // Our encoding of what we parsed is a fixed point of parse-then-encode.
    let text = encode_to_string(&families, true);
    let again = parse(text.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(encode_to_string(&again, true), text);
}

#[test]
fn prometheus_text_and_protobuf_agree() {
    let text = parse(METRICS_TXT, &Limits::default()).unwrap();
    let pd = delimited::decode(METRICS_PB, &delimited::Limits::default()).unwrap();
    let shape = |fs: &[MetricFamily]| {
        let mut v: Vec<_> = fs
            .iter()
            .map(|f| (f.name.clone().unwrap(), f.metric_type(), f.metric.len()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(shape(&text), shape(&pd));
    // Static families agree on everything, labels and value included.
    let find = |fs: &[MetricFamily], n: &str| {
        fs.iter()
            .find(|f| f.name.as_deref() == Some(n))
            .cloned()
            .unwrap()
    };
    for name in [
        "prometheus_build_info",
        "go_info",
        "prometheus_config_last_reload_successful",
    ] {
        assert!(same(&[find(&text, name)], &[find(&pd, name)]), "{name}");
    }
    // The protobuf families, written by us, read back as what Go's encoder would have written.
    let ours = encode_to_string(&pd, true);
    let back = parse(ours.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(encode_to_string(&back, true), ours);
    assert_eq!(shape(&back), shape(&pd));
}

#[test]
fn prometheus_federate_fixtures_parse_and_agree() {
    let text = parse(FEDERATE_TXT, &Limits::default()).unwrap();
    let pd = delimited::decode(FEDERATE_PB, &delimited::Limits::default()).unwrap();
    assert!(text.len() > 100);
    // Federation serves everything untyped, one family per metric name, with timestamps.
    for f in text.iter().chain(&pd) {
        assert_eq!(f.metric_type(), MetricType::Untyped);
        assert!(f
            .metric
            .iter()
            .all(|m| m.timestamp_ms.is_some() && m.label_value("job") == Some("prometheus")));
    }
    let names = |fs: &[MetricFamily]| {
        let mut v: Vec<_> = fs.iter().map(|f| f.name.clone().unwrap()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&text), names(&pd));
    // Federate text is in Go's format already, so it round-trips byte for byte.
    assert_eq!(encode_to_string(&text, true).as_bytes(), FEDERATE_TXT);
}

#[test]
fn promtool_accepts_our_encoding() {
    // promtool 2.42 exits 0 when clean, 3 when it only has lint complaints (no help text,
    // units, counter names) and 1 when the text does not parse.
    let pd = delimited::decode(METRICS_PB, &delimited::Limits::default()).unwrap();
    let text = parse(METRICS_TXT, &Limits::default()).unwrap();
    for families in [pd, text] {
        let mut ours = Vec::new();
        encode(&mut ours, &families, true).unwrap();
        let (code, stderr) = crate::promtool::check_metrics(ours);
        // Prometheus's own /metrics is lint-clean, so our rendering of it must be too.
        assert_eq!(code, 0, "{stderr}");
    }
    let synthetic = parse_ok(CANONICAL);
    let mut ours = Vec::new();
    encode(&mut ours, &synthetic, true).unwrap();
    let (code, stderr) = crate::promtool::check_metrics(ours);
    assert!(code == 0 || code == 3, "exit {code}: {stderr}");
    assert!(!stderr.contains("error while linting"), "{stderr}");
}

/// Throughput of the encoder, for measuring by hand (no assertion on speed):
/// `CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test -p telemeter-common encode_throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn encode_throughput() {
    let families: Vec<MetricFamily> = (0..1000)
        .map(|f| MetricFamily {
            name: Some(format!("some_subsystem_metric_number_{f}_total")),
            help: Some("Help text that is about this long.".into()),
            r#type: Some(MetricType::Counter as i32),
            metric: (0..100)
                .map(|m| Metric {
                    label: vec![
                        LabelPair::new("_id", "f6d3a5c3-6c1f-4ab9-9c0b-5b3a1c2b1e2d"),
                        LabelPair::new("instance", "10.0.12.34:9100"),
                        LabelPair::new("job", "node-exporter"),
                        LabelPair::new("namespace", "openshift-monitoring"),
                        LabelPair::new("pod", &format!("node-exporter-{m}")),
                    ],
                    counter: Some(Counter {
                        value: Some(if m % 2 == 0 {
                            m as f64 * 1234.0
                        } else {
                            m as f64 * 0.123
                        }),
                    }),
                    timestamp_ms: Some(1_700_000_000_000 + m),
                    ..Default::default()
                })
                .collect(),
        })
        .collect();
    let series: usize = families.iter().map(|f| f.metric.len()).sum();
    let mut out = Vec::with_capacity(64 << 20);
    let rounds = 10;
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        out.clear();
        encode(&mut out, &families, true).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "text encode: {:.2} M series/s, {:.0} MB/s ({} bytes per round)",
        (series * rounds) as f64 / secs / 1e6,
        (out.len() * rounds) as f64 / secs / 1e6,
        out.len()
    );
    let start = std::time::Instant::now();
    let mut pd = Vec::new();
    for _ in 0..rounds {
        pd.clear();
        for f in &families {
            delimited::encode_family(f, &mut pd);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "pd encode: {:.2} M series/s",
        (series * rounds) as f64 / secs / 1e6
    );
    let start = std::time::Instant::now();
    let parsed = parse(&out, &Limits::default()).unwrap();
    println!(
        "text parse: {:.2} M series/s",
        series as f64 / start.elapsed().as_secs_f64() / 1e6
    );
    assert_eq!(parsed.len(), families.len());
}

/// A family part is plain only when every series is written with its labels the usual way and
/// nothing checked about them could fail; written as known plain, a plain part is the same bytes.
#[test]
fn a_part_is_plain_only_when_every_label_needs_no_check_and_known_plain_writes_the_same() {
    use super::write::write_family_view_part_plain;
    let write = |family: &MetricFamily, known: bool, keep_all: bool| {
        let body = delimited::encode(std::slice::from_ref(family));
        let view = first_family(&body);
        let mut out = Vec::new();
        let mut skipped = Skipped::default();
        let mut first = true;
        let mut keep = |_: &crate::wire::MetricView<'_>| {
            let keep = keep_all || first;
            first = false;
            keep
        };
        let plain = write_family_view_part_plain(
            &mut out,
            &view,
            false,
            &mut skipped,
            &mut false,
            &mut keep,
            known,
        )
        .unwrap();
        (String::from_utf8(out).unwrap(), plain, skipped.total())
    };
    let clean: &[&[(&str, &str)]] = &[&[("_id", "c"), ("a", "1")], &[("_id", "c"), ("b", "2")]];
    for kind in [
        MetricType::Gauge,
        MetricType::Histogram,
        MetricType::Summary,
    ] {
        let family = family_of(kind, clean);
        let (checked, plain, _) = write(&family, false, true);
        assert!(plain, "{checked}");
        assert_eq!(write(&family, true, true), (checked, true, 0));
        // A series left out by `keep` was not checked: not plain.
        assert!(!write(&family, false, false).1);
    }
    // Anything the checks or the escaping would act on makes the part not plain, and written
    // as before.
    let unplain: &[&[&[(&str, &str)]]] = &[
        &[&[("a", "1")], &[("a", "x\"y")]],
        &[&[("a", "1")], &[("a", "x\\y")]],
        &[&[("a", "1")], &[("a", "é")]],
        &[&[("a", "1")], &[("a", "1"), ("a", "2")]],
        &[&[("a", "1")], &[("1a", "1")]],
        &[&[("a", "1")], &[("__name__", "x")]],
    ];
    for series in unplain {
        let family = family_of(MetricType::Gauge, series);
        let (text, plain, _) = write(&family, false, true);
        assert!(!plain, "{text}");
    }
    let le = family_of(MetricType::Histogram, &[&[("a", "1")], &[("le", "1")]]);
    let (text, plain, skipped) = write(&le, false, true);
    assert!(!plain && skipped == 1, "{text}");
    // A series without its value.
    let mut missing = family_of(MetricType::Gauge, clean);
    missing.metric[1].gauge = None;
    assert!(!write(&missing, false, true).1);
}

/// [`write_family_view_part_plain`](super::write::write_family_view_part_plain) of every series
/// of `family`, without timestamps, as the first part written: what `/federate` writes of a
/// family without selectors.
fn write_whole_part(
    out: &mut Vec<u8>,
    family: &crate::wire::FamilyView<'_>,
    skipped: &mut Skipped,
    known_plain: bool,
) -> std::io::Result<bool> {
    super::write::write_family_view_part_plain(
        out,
        family,
        false,
        skipped,
        &mut false,
        &mut |_| true,
        known_plain,
    )
}

/// Wherever the writer calls a family part plain, writing it again as known plain (a later
/// scrape of the same payload, its labels copied unchecked) gives the same bytes: over bodies
/// with each byte in turn replaced by each byte the checks or the escaping act on (a quote, a
/// backslash, a newline, DEL, bytes that are not ASCII or not UTF-8) or that frame fields, so
/// that label messages and lengths are damaged too. The damaged parts the writer still calls
/// plain are the ones a later scrape copies; not one may come out otherwise.
#[test]
fn known_plain_writes_what_the_checked_writer_wrote_wherever_it_found_a_part_plain() {
    let write = |family: &crate::wire::FamilyView<'_>, known: bool| {
        let mut out = Vec::new();
        let mut skipped = Skipped::default();
        let plain = write_whole_part(&mut out, family, &mut skipped, known);
        (out, plain.ok(), skipped)
    };
    let families = [
        family_of(
            MetricType::Counter,
            &[
                &[("_id", "c"), ("cpu", "0"), ("mode", "idle")],
                &[("_id", "c"), ("cpu", "0"), ("mode", "user")],
                &[("_id", "c"), ("cpu", "1"), ("mode", "idle")],
            ],
        ),
        family_of(
            MetricType::Histogram,
            &[&[("_id", "c"), ("path", "/api/v1")]],
        ),
        family_of(MetricType::Summary, &[&[("rpc", "get"), ("_id", "c")]]),
        family_of(MetricType::Gauge, &[&[("_id", "c"), ("le", "0.5")]]),
    ];
    let body = delimited::encode(&families);
    let limits = delimited::Limits::default();
    let (mut plain, mut parts) = (0usize, 0usize);
    for at in 0..body.len() {
        for b in [
            b'\\', b'"', b'\n', 0x7f, 0x80, 0xc3, 0xff, b'a', b'_', 0, 0x12,
        ] {
            let mut damaged = body.clone();
            damaged[at] = b;
            for family in crate::wire::families(&damaged, &limits) {
                let Ok(family) = family else {
                    break;
                };
                parts += 1;
                let (checked, found, skipped) = write(&family, false);
                if found != Some(true) {
                    continue;
                }
                plain += 1;
                let (copied, again, copied_skipped) = write(&family, true);
                assert_eq!(again, Some(true), "byte {at} set to {b:#x}");
                assert_eq!(
                    copied_skipped.total(),
                    skipped.total(),
                    "byte {at} set to {b:#x}"
                );
                assert!(
                    copied == checked,
                    "byte {at} set to {b:#x}: {:?} written known plain, {:?} checked",
                    String::from_utf8_lossy(&copied),
                    String::from_utf8_lossy(&checked)
                );
            }
        }
    }
    // Not vacuous: most damaged parts that still read are plain, and many are not.
    assert!(
        plain > 1000 && parts > plain + 100,
        "{plain} plain of {parts}"
    );
}

/// Time per series of the view writer over the bench's realistic upload, checked (a payload's
/// first scrape) and known plain (later scrapes), for measuring by hand (no assertion on speed):
/// `cargo test --release -p telemeter-common --lib view_writer_throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn view_writer_throughput() {
    let bodies: Vec<Vec<u8>> = (0..200)
        .map(|i| {
            let upload = testkit::payload::upload_body(&format!("bench-{i:08}"), 1_700_000_000_000);
            crate::snappy::decode_framed(&upload, 1 << 24).unwrap()
        })
        .collect();
    let limits = delimited::Limits::default();
    let families: Vec<crate::wire::FamilyView<'_>> = bodies
        .iter()
        .flat_map(|body| crate::wire::families(body, &limits).map(Result::unwrap))
        .collect();
    let mut out = Vec::with_capacity(64 << 20);
    let run = |out: &mut Vec<u8>, known: bool| {
        out.clear();
        let mut skipped = Skipped::default();
        for family in &families {
            let plain = write_whole_part(out, family, &mut skipped, known).unwrap();
            assert!(plain);
        }
    };
    run(&mut out, false);
    let checked = out.clone();
    run(&mut out, true);
    assert_eq!(out, checked);
    let lines = out.iter().filter(|&&b| b == b'\n').count();
    // The best of many short rounds, both ways alternately: the machine is shared.
    let mut best = [f64::MAX; 2];
    for _ in 0..30 {
        for known in [false, true] {
            let start = std::time::Instant::now();
            for _ in 0..4 {
                run(&mut out, known);
            }
            let ns = start.elapsed().as_secs_f64() * 1e9 / (lines * 4) as f64;
            best[usize::from(known)] = best[usize::from(known)].min(ns);
        }
    }
    println!(
        "checked: {:.1} ns/line, known plain: {:.1} ns/line (best of 30)",
        best[0], best[1]
    );
}
