use super::*;
use telemeter_common::delimited;

const NONE: Transform = Transform {
    added_labels: 0,
    bytes_per_series: 0,
};
use telemeter_common::model::{Gauge, Histogram, Summary};

const FEDERATE_PB: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-federate.pb");
const FEDERATE_TXT: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-federate.txt");
const METRICS_PB: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-metrics.pb");
const METRICS_TXT: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-metrics.txt");

#[test]
fn heap_rounds_like_the_allocator() {
    assert_eq!(heap(0), 0);
    assert_eq!(heap(1), 32);
    assert_eq!(heap(24), 32);
    assert_eq!(heap(25), 48);
    assert_eq!(heap(usize::MAX), usize::MAX & !15);
    assert_eq!(vec_bytes(0, 48), 0);
    assert_eq!(vec_bytes(1, 48), heap(4 * 48));
    assert_eq!(vec_bytes(5, 48), heap(8 * 48));
}

/// What the estimate says and what the real decoders hold, for what Prometheus sends: the
/// estimate is above and not far above.
#[test]
fn estimates_bound_prometheus_replies_closely() {
    let limits = Limits::default();
    for (what, body) in [("federate", FEDERATE_PB), ("metrics", METRICS_PB)] {
        let e = protobuf(body, &limits, &NONE).unwrap();
        let decoded = delimited::decode(body, &limits).unwrap();
        assert_eq!(e.families, decoded.len(), "{what}");
        assert_eq!(
            e.series,
            decoded.iter().map(|f| f.metric.len()).sum::<usize>(),
            "{what}"
        );
        let held = held_bytes(&decoded);
        assert!(e.decoded_bytes >= held, "{what}: {e:?} < {held}");
        assert!(e.decoded_bytes <= 2 * held, "{what}: {e:?} > 2 × {held}");
    }
    for (what, body) in [("federate", FEDERATE_TXT), ("metrics", METRICS_TXT)] {
        let e = text(body, 10_000, &NONE).unwrap();
        let decoded =
            telemeter_common::text::parse(body, &telemeter_common::text::Limits::default())
                .unwrap();
        assert_eq!(
            e.series,
            decoded.iter().map(|f| f.metric.len()).sum::<usize>(),
            "{what}"
        );
        let held = held_bytes(&decoded);
        assert!(e.decoded_bytes >= held, "{what}: {e:?} < {held}");
        assert!(e.decoded_bytes <= 3 * held, "{what}: {e:?} > 3 × {held}");
    }
}

/// The heap the decoded families hold, counted from the values (exact capacities).
fn held_bytes(families: &[MetricFamily]) -> usize {
    let s = |s: &Option<String>| s.as_ref().map_or(0, |s| heap(s.capacity()));
    let mut total = heap(std::mem::size_of_val(families));
    for f in families {
        total += s(&f.name) + s(&f.help) + heap(f.metric.capacity() * size_of::<Metric>());
        for m in &f.metric {
            total += heap(m.label.capacity() * size_of::<LabelPair>());
            for l in &m.label {
                total += s(&l.name) + s(&l.value);
            }
            if let Some(h) = &m.histogram {
                total += heap(h.bucket.capacity() * size_of::<Bucket>());
            }
            if let Some(q) = &m.summary {
                total += heap(q.quantile.capacity() * size_of::<Quantile>());
            }
        }
    }
    total
}

fn family_of(metrics: Vec<Metric>) -> MetricFamily {
    MetricFamily {
        name: Some("m".into()),
        r#type: Some(MetricType::Gauge as i32),
        metric: metrics,
        ..Default::default()
    }
}

#[test]
fn empty_series_cost_what_prost_builds() {
    // One family of 100,000 empty series: 200 KB on the wire.
    let mut message = vec![0x0a, 1, b'm'];
    for _ in 0..100_000 {
        message.extend_from_slice(&[0x22, 0]);
    }
    let mut body = Vec::new();
    prost::encode_length_delimiter(message.len(), &mut body).unwrap();
    body.extend_from_slice(&message);
    let limits = Limits {
        max_message_bytes: 1 << 20,
        max_total_bytes: 1 << 20,
        ..Limits::default()
    };
    let e = protobuf(&body, &limits, &NONE).unwrap();
    assert_eq!(e.series, 100_000);
    assert!(e.decoded_bytes >= 100_000 * size_of::<Metric>(), "{e:?}");
    assert!(e.decoded_bytes > 50 * body.len(), "{e:?}");
    // One more and the decoder's series cap refuses it, here before anything is built.
    message.extend_from_slice(&[0x22, 0]);
    let mut body = Vec::new();
    prost::encode_length_delimiter(message.len(), &mut body).unwrap();
    body.extend_from_slice(&message);
    assert_eq!(
        protobuf(&body, &limits, &NONE),
        Err(Refusal::Decode(DecodeError::TooManySeries {
            limit: 100_000
        }))
    );
}

#[test]
fn labels_per_series_are_capped_in_both_formats() {
    let labels = |n: usize| -> Vec<LabelPair> {
        (0..n)
            .map(|i| LabelPair::new(&format!("l{i}"), ""))
            .collect()
    };
    let series = |n: usize| Metric {
        label: labels(n),
        gauge: Some(Gauge { value: Some(1.0) }),
        ..Default::default()
    };
    let ok = delimited::encode(&[family_of(vec![series(MAX_LABELS_PER_SERIES)])]);
    let e = protobuf(&ok, &Limits::default(), &NONE).unwrap();
    assert_eq!(e.most_labels, MAX_LABELS_PER_SERIES);
    let bad = delimited::encode(&[family_of(vec![series(MAX_LABELS_PER_SERIES + 1)])]);
    assert_eq!(
        protobuf(&bad, &Limits::default(), &NONE),
        Err(Refusal::TooManyLabels {
            labels: MAX_LABELS_PER_SERIES + 1
        })
    );
    // The same label over and over is as many labels to prost.
    let same = Metric {
        label: vec![LabelPair::new("a", ""); 10_000],
        ..Default::default()
    };
    assert!(matches!(
        protobuf(
            &delimited::encode(&[family_of(vec![same])]),
            &Limits::default(),
            &NONE
        ),
        Err(Refusal::TooManyLabels { .. })
    ));

    let line = |n: usize| {
        let pairs: Vec<String> = (0..n).map(|i| format!("l{i}=\"\"")).collect();
        format!("m{{{}}} 1\n", pairs.join(","))
    };
    let e = text(line(MAX_LABELS_PER_SERIES).as_bytes(), 10_000, &NONE).unwrap();
    assert_eq!(e.most_labels, MAX_LABELS_PER_SERIES);
    assert!(matches!(
        text(line(MAX_LABELS_PER_SERIES + 1).as_bytes(), 10_000, &NONE),
        Err(Refusal::TooManyLabels { .. })
    ));
    assert!(Refusal::TooManyLabels { labels: 300 }
        .to_string()
        .contains("300 labels"));
}

#[test]
fn labels_after_an_unknown_group_are_counted() {
    // prost skips an unknown group field and decodes what follows, so the scan must not stop
    // at it: a series opening with a group, then 200 empty labels.
    let mut metric = vec![0x7b, 0x08, 0x01, 0x7c]; // field 15: start group { field 1 = 1 } end
    for _ in 0..200 {
        metric.extend_from_slice(&[0x0a, 0]);
    }
    let mut message = vec![0x0a, 1, b'm', 0x22];
    prost::encode_length_delimiter(metric.len(), &mut message).unwrap();
    message.extend_from_slice(&metric);
    let mut body = Vec::new();
    prost::encode_length_delimiter(message.len(), &mut body).unwrap();
    body.extend_from_slice(&message);
    let decoded = delimited::decode(&body, &Limits::default()).unwrap();
    assert_eq!(decoded[0].metric[0].label.len(), 200);
    let e = protobuf(&body, &Limits::default(), &NONE).unwrap();
    assert_eq!(e.labels, 200);
    assert!(e.decoded_bytes >= held_bytes(&decoded), "{e:?}");
}

#[test]
fn summaries_and_histograms_are_counted_whatever_the_type() {
    let mut m = Metric {
        summary: Some(Summary {
            quantile: vec![Quantile::default(); 100],
            ..Default::default()
        }),
        histogram: Some(Histogram {
            bucket: vec![Bucket::default(); 100],
            ..Default::default()
        }),
        ..Default::default()
    };
    m.label = vec![LabelPair::new("a", "b")];
    let body = delimited::encode(&[family_of(vec![m])]);
    let e = protobuf(&body, &Limits::default(), &NONE).unwrap();
    assert!(
        e.decoded_bytes
            >= 100 * size_of::<Quantile>() + 100 * size_of::<Bucket>() + size_of::<Metric>(),
        "{e:?}"
    );
}

#[test]
fn protobuf_errors_are_the_decoders() {
    let limits = Limits::default();
    for body in [&[0xff; 11][..], &[0x80, 0x80], &[9, 0x0a]] {
        let want = delimited::decode(body, &limits).unwrap_err();
        assert_eq!(protobuf(body, &limits, &NONE), Err(Refusal::Decode(want)));
    }
    // Invalid messages: the same refusal, in the views' words.
    for body in [&[3, 0x0a, 0x05, b'x'][..], &[3, 0x0a, 0x01, 0xff]] {
        assert!(delimited::decode(body, &limits).is_err());
        assert!(matches!(
            protobuf(body, &limits, &NONE),
            Err(Refusal::Decode(DecodeError::Invalid(_)))
        ));
    }
    assert_eq!(protobuf(b"", &limits, &NONE), Ok(Estimate::default()));
}

#[test]
fn text_counts_lines_series_and_grouping() {
    let body = concat!(
        "# HELP a Help.\n",
        "# TYPE a gauge\n",
        "a{x=\"1\",y=\"2\"} 1\n",
        "a{x=\"2\",y=\"2\"} 1 1000\n",
        "# TYPE h histogram\n",
        "h_bucket{x=\"1\",le=\"1\"} 1\n",
        "h_bucket{x=\"1\",le=\"+Inf\"} 1\n",
        "h_sum{x=\"1\"} 1\n",
        "h_count{x=\"1\"} 1\n",
        "h_bucket{x=\"2\",le=\"+Inf\"} 1\n",
        "h_sum{x=\"2\"} 1\n",
        "h_count{x=\"2\"} 1\n",
        "  \n",
        "b 1\n",
    );
    let e = text(body.as_bytes(), 10_000, &NONE).unwrap();
    let parsed =
        telemeter_common::text::parse(body.as_bytes(), &telemeter_common::text::Limits::default())
            .unwrap();
    assert_eq!(parsed.iter().map(|f| f.metric.len()).sum::<usize>(), 5);
    assert_eq!(e.series, 5, "{e:?}");
    assert_eq!(e.labels, 2 + 2 + 1 + 1, "{e:?}");
    assert_eq!(e.families, parsed.len(), "{e:?}");
}

#[test]
fn text_overestimates_what_it_cannot_follow() {
    // Interleaved grouped lines: each counted as a new series (the parser builds 2).
    let body = concat!(
        "# TYPE h histogram\n",
        "h_bucket{x=\"1\",le=\"1\"} 1\n",
        "h_bucket{x=\"2\",le=\"1\"} 1\n",
        "h_bucket{x=\"1\",le=\"2\"} 1\n",
        "h_bucket{x=\"2\",le=\"2\"} 1\n",
    );
    assert_eq!(text(body.as_bytes(), 10_000, &NONE).unwrap().series, 4);
    // A broken line stops the parser; the scan goes on counting.
    let body = "a{x=\"1\" 1\nb{y=\"\\q\"} 1\nc 1\n";
    let e = text(body.as_bytes(), 10_000, &NONE).unwrap();
    assert_eq!(e.series, 3);
    assert!(telemeter_common::text::parse(
        body.as_bytes(),
        &telemeter_common::text::Limits::default()
    )
    .is_err());
    // An escaped quote does not end a value; an unterminated value ends the label set.
    let e = text(b"a{x=\"\\\"\",y=\"2\"} 1\nb{x=\"open} 1\n", 10_000, &NONE).unwrap();
    assert_eq!(e.labels, 2);
}

#[test]
fn text_refuses_more_families_than_the_parser_takes() {
    let mut body = String::new();
    for i in 0..11 {
        body.push_str(&format!(
            "# TYPE h{i} histogram\nh{i}_count 1\nh{i}_bucket{{le=\"1\"}} 1\n"
        ));
    }
    let limits = |max_families| telemeter_common::text::Limits {
        max_families,
        ..telemeter_common::text::Limits::default()
    };
    assert!(telemeter_common::text::parse(body.as_bytes(), &limits(10)).is_err());
    assert_eq!(
        telemeter_common::text::parse(body.as_bytes(), &limits(11))
            .unwrap()
            .len(),
        11
    );
    assert_eq!(
        text(body.as_bytes(), 10, &NONE),
        Err(Refusal::Decode(DecodeError::TooManyFamilies { limit: 10 }))
    );
    assert!(text(body.as_bytes(), 11, &NONE).is_ok());
}

#[test]
fn transform_cost_grows_with_labels() {
    let none = Transform::of(&[], "c", 0);
    assert_eq!(none.added_labels, 2);
    let labels = [("site".to_string(), "x".repeat(100))];
    let some = Transform::of(&labels, "c", 2);
    assert_eq!(some.added_labels, 3);
    assert_eq!(
        some.bytes_per_series,
        none.bytes_per_series + heap(4) + heap(100) + 2 * heap(12)
    );
    // A label vector full to capacity is grown for the added labels: the new block counts.
    let size = size_of::<LabelPair>();
    let mut e = Estimate::default();
    e.series(8, &none);
    assert_eq!(e.decoded_bytes, heap(8 * size));
    assert_eq!(e.transform_bytes, none.bytes_per_series + heap(16 * size));
    let mut e = Estimate::default();
    e.series(5, &none);
    assert_eq!(e.transform_bytes, none.bytes_per_series);
    let mut e = Estimate::default();
    e.series(
        0,
        &Transform {
            added_labels: 9,
            bytes_per_series: 0,
        },
    );
    assert_eq!(
        e.transform_bytes,
        heap(4 * size) + heap(8 * size) + heap(16 * size)
    );
}

#[test]
fn peak_adds_the_transform() {
    let e = Estimate {
        series: 10,
        largest_family: 10,
        decoded_bytes: 1000,
        transform_bytes: 500,
        ..Estimate::default()
    };
    assert_eq!(e.peak_bytes(), 1500 + 10 * size_of::<Metric>());
    assert_eq!(sort_scratch(1000, 200), 1000 * 200);
    assert_eq!(sort_scratch(1_000_000, 200), 500_000 * 200);
}
