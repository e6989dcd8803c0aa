//! Fuzz tests of the parsers that read bytes from the network or disk: text exposition,
//! protobuf-delimited, snappy (framed and block), upload tokens and their claims, selectors,
//! durations, base64, the HTTP request helpers, and the HTTP front's request head and chunked body
//! reader.
//!
//! The zero-copy views (`wire`) are checked against the protobuf-delimited decoder on the same
//! corpus.
//!
//! Each test mutates a committed seed corpus (`tests/fixtures/fuzz/<target>/`) for a bounded time and
//! fails on the first panic or broken round-trip property, printing the input. The default budget
//! is 3 s per target so CI stays quick; for a longer run:
//!
//! ```text
//! FUZZ_SECONDS=60 cargo test -p telemeter-common --test fuzz -- --nocapture
//! FUZZ_SEED=0x1234 FUZZ_SECONDS=60 cargo test -p telemeter-common --test fuzz text -- --nocapture
//! ```
//!
//! The seed corpus can be rebuilt from the Prometheus fixtures with
//! `cargo test -p telemeter-common --test fuzz -- --ignored regenerate_seed_corpus`.
//!
//! The harness is `testkit::fuzz`, shared with other crates; the gossip packet decoder, which lives
//! in the server crate, gets its target there: see "Gossip packets" below for the code to add.

use testkit::fuzz as harness;

use harness::{escape, Target, Verdict};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use telemeter_common::http::{self, ChunkedDecoder, Framing, Head, RequestError};
use telemeter_common::keys::{KeyPurpose, SharedKey};
use telemeter_common::model::{Bucket, LabelPair, Metric, MetricFamily, MetricType};
use telemeter_common::token::TokenSigner;
use telemeter_common::{base64, delimited, duration, labels, selector, snappy, text};

// ---------------------------------------------------------------------------------------------
// Text exposition

const TEXT_DICT: &[&[u8]] = &[
    b"# HELP ",
    b"# TYPE ",
    b" counter\n",
    b" gauge\n",
    b" histogram\n",
    b" summary\n",
    b" untyped\n",
    b"_bucket",
    b"_sum",
    b"_count",
    b"_total",
    b"{le=\"",
    b",le=\"+Inf\"}",
    b"{quantile=\"",
    b"quantile=\"0.5\"",
    b"=\"",
    b"\",",
    b"\"}",
    b"{}",
    b"{,}",
    b" 1\n",
    b" 1 1700000000000\n",
    b" -1e-05",
    b" 0x1p-3",
    b" 1_000",
    b"__name__",
    b"a:b",
];

fn text_limits() -> text::Limits {
    text::Limits {
        max_families: 200,
        max_series: 2000,
        max_line_bytes: 16 << 10,
    }
}

/// Families as protobuf bytes, with what the text format cannot carry made the way the encoder
/// writes it, so families that read the same give equal bytes:
/// - a NaN's payload, and the sign of zero (the encoder writes `-0.0` as `0`, as Go does);
/// - the type as the encoder names it, and empty help as none;
/// - a summary's or histogram's missing `_sum`/`_count` (written as 0) and a histogram's missing
///   `+Inf` bucket (written with the count), as Go's `expfmt` writes them.
fn canonical(families: &[MetricFamily]) -> Vec<u8> {
    fn float(v: &mut Option<f64>) {
        let f = v.get_or_insert(0.0);
        if f.is_nan() {
            *f = f64::NAN;
        } else if *f == 0.0 {
            *f = 0.0;
        }
    }
    let mut families = families.to_vec();
    for family in &mut families {
        // The text format has no gauge histogram, spells an unknown type `untyped`, and leaves
        // empty help out.
        let written = match family.metric_type() {
            MetricType::GaugeHistogram => MetricType::Histogram,
            other => other,
        };
        family.r#type = Some(written as i32);
        if family.help.as_deref() == Some("") {
            family.help = None;
        }
        for metric in &mut family.metric {
            if let Some(g) = &mut metric.gauge {
                float(&mut g.value);
            }
            if let Some(c) = &mut metric.counter {
                float(&mut c.value);
            }
            if let Some(u) = &mut metric.untyped {
                float(&mut u.value);
            }
            if let Some(s) = &mut metric.summary {
                float(&mut s.sample_sum);
                s.sample_count.get_or_insert(0);
                for q in &mut s.quantile {
                    float(&mut q.quantile);
                    float(&mut q.value);
                }
            }
            if let Some(h) = &mut metric.histogram {
                float(&mut h.sample_sum);
                let count = *h.sample_count.get_or_insert(0);
                for b in &mut h.bucket {
                    float(&mut b.upper_bound);
                    b.cumulative_count.get_or_insert(0);
                }
                if !h
                    .bucket
                    .iter()
                    .any(|b| b.upper_bound == Some(f64::INFINITY))
                {
                    h.bucket.push(Bucket {
                        cumulative_count: Some(count),
                        upper_bound: Some(f64::INFINITY),
                    });
                }
            }
        }
    }
    delimited::encode(&families)
}

/// Whether a family is named like a part of a summary or histogram family (`x_sum` beside summary
/// `x`). Text cannot say which family such lines belong to: the parser, like Go's, gives them to
/// the family with the exact name, so the round trip may regroup them. Not a bug, an ambiguity of
/// the format; such bodies are still parsed, encoded and re-parsed, only not compared.
fn shadows_a_part(families: &[MetricFamily]) -> bool {
    let grouped: std::collections::HashSet<&str> = families
        .iter()
        .filter(|f| {
            matches!(
                f.metric_type(),
                MetricType::Summary | MetricType::Histogram | MetricType::GaugeHistogram
            )
        })
        .filter_map(|f| f.name.as_deref())
        .collect();
    families
        .iter()
        .filter_map(|f| f.name.as_deref())
        .any(|name| {
            ["_sum", "_count", "_bucket"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| grouped.contains(base))
            })
        })
}

/// `families` without the series the text writers leave out (see [`writer_leaves_out`]; the
/// parser reads only valid names, but a `__` prefix among them), and without families left empty.
fn written_part(families: &[MetricFamily]) -> Vec<MetricFamily> {
    let mut out = families.to_vec();
    for family in &mut out {
        let kind = family.metric_type();
        family.metric.retain(|m| !writer_leaves_out(kind, m));
    }
    out.retain(|f| !f.metric.is_empty());
    out
}

/// Parse; what parses must encode, and the encoding must parse back to the same families (but
/// the series the writers leave out).
fn text_exec(input: &[u8]) -> Verdict {
    let Ok(families) = text::parse(input, &text_limits()) else {
        return Ok(());
    };
    let mut encoded = Vec::new();
    text::encode(&mut encoded, &families, true)
        .map_err(|e| format!("parsed families do not encode: {e}\nfamilies: {families:?}"))?;
    // Escaping can lengthen a line; the round trip is about content, not limits.
    let again = text::parse(&encoded, &text::Limits::default()).map_err(|e| {
        format!(
            "re-encoded text does not parse: {e}\nre-encoded: {}",
            escape(&encoded)
        )
    })?;
    if !shadows_a_part(&families) && canonical(&written_part(&families)) != canonical(&again) {
        return Err(format!(
            "families differ after encode + parse\nre-encoded: {}\nfirst:  {families:?}\nsecond: {again:?}",
            escape(&encoded)
        ));
    }
    Ok(())
}

#[test]
fn text_exposition() {
    harness::run(
        Target {
            name: "text",
            dict: TEXT_DICT,
            seeds: Vec::new(),
        },
        text_exec,
    );
}

// ---------------------------------------------------------------------------------------------
// Protobuf-delimited

fn delimited_limits() -> delimited::Limits {
    delimited::Limits {
        max_message_bytes: 16 << 10,
        max_total_bytes: 64 << 10,
        max_families: 64,
        max_series: 512,
    }
}

const DELIMITED_DICT: &[&[u8]] = &[
    // MetricFamily: name, help, type, metric.
    b"\x0a\x03abc",
    b"\x12\x00",
    b"\x18\x04",
    b"\x18\x7f",
    b"\x18\xff\xff\xff\xff\x0f",
    b"\x22\x00",
    // Metric: label, gauge, counter, summary, untyped, timestamp, histogram.
    b"\x0a\x06\x0a\x01a\x12\x01b",
    b"\x12\x09\x09\x00\x00\x00\x00\x00\x00\xf8\x7f",
    b"\x1a\x09\x09\x00\x00\x00\x00\x00\x00\xf0\x7f",
    b"\x22\x00",
    b"\x2a\x00",
    b"\x30\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x3a\x00",
    // An unknown field, and a group (wire type 3) prost must reject.
    b"\x78\x01",
    b"\x0b",
    b"\x0c",
];

/// Decode with small limits; what decodes must encode and decode back to the same bytes. The text
/// encoder gets the decoded families too: they come from a client, so it must not panic on them.
fn delimited_exec(input: &[u8]) -> Verdict {
    let Ok(families) = delimited::decode(input, &delimited_limits()) else {
        return Ok(());
    };
    let encoded = delimited::encode(&families);
    let again = delimited::decode(&encoded, &delimited::Limits::default()).map_err(|e| {
        format!(
            "re-encoded families do not decode: {e}\nre-encoded: {}",
            escape(&encoded)
        )
    })?;
    let twice = delimited::encode(&again);
    if encoded != twice {
        return Err(format!(
            "families differ after encode + decode\nfirst:  {families:?}\nsecond: {again:?}"
        ));
    }
    pushed_then_federated(&families)
}

/// Whether the text writers leave `metric` out of a family of `kind` for its labels: an invalid
/// name, a reserved one (`__`, or the type's own `le`/`quantile`), or a name given twice.
fn writer_leaves_out(kind: MetricType, metric: &Metric) -> bool {
    let mut seen = std::collections::HashSet::new();
    metric.label.iter().any(|l| {
        let name = l.name.as_deref().unwrap_or("");
        !labels::is_valid_label_name(name)
            || text::reserved_label(kind, name).is_some()
            || !seen.insert(name)
    })
}

/// What `families` (as pushed, protobuf) should read as once served as text and parsed again:
/// each series reduced to the value its family's type calls for (the encoder skips series without
/// one), help without leading blanks, and without what the writers leave out (families with an
/// invalid name, series with labels Prometheus would refuse). `None` when the server would refuse
/// the families on length limits, or text cannot say them unambiguously: repeated family names,
/// two histogram or summary series with one label set (text merges them), or [`shadows_a_part`].
fn as_text_carries(families: &[MetricFamily]) -> Option<Vec<MetricFamily>> {
    let mut names = std::collections::HashSet::new();
    let mut out = Vec::new();
    for family in families {
        let name = family.name.as_deref().unwrap_or("");
        if !labels::is_valid_metric_name(name) {
            continue;
        }
        if labels::check_metric_name(name).is_err() || !names.insert(name) {
            return None;
        }
        let kind = family.metric_type();
        // Blanks between the name and the help text are separators, in Go's parser as in ours.
        let help = family
            .help
            .as_deref()
            .map(|h| h.trim_start_matches([' ', '\t']))
            .filter(|h| !h.is_empty());
        let mut carried = MetricFamily {
            help: help.map(str::to_string),
            metric: Vec::new(),
            ..family.clone()
        };
        let mut label_sets = std::collections::HashSet::new();
        for metric in &family.metric {
            if writer_leaves_out(kind, metric) {
                continue;
            }
            labels::check_series_labels(metric).ok()?;
            let mut series = Metric {
                label: metric.label.clone(),
                timestamp_ms: metric.timestamp_ms,
                ..Metric::default()
            };
            let grouped = match kind {
                MetricType::Counter => {
                    let Some(v) = metric.counter else { continue };
                    series.counter = Some(v);
                    false
                }
                MetricType::Gauge => {
                    let Some(v) = metric.gauge else { continue };
                    series.gauge = Some(v);
                    false
                }
                MetricType::Untyped => {
                    let Some(v) = metric.untyped else { continue };
                    series.untyped = Some(v);
                    false
                }
                MetricType::Summary => {
                    let Some(v) = &metric.summary else { continue };
                    series.summary = Some(v.clone());
                    true
                }
                MetricType::Histogram | MetricType::GaugeHistogram => {
                    let Some(v) = &metric.histogram else { continue };
                    series.histogram = Some(v.clone());
                    true
                }
            };
            if grouped {
                let mut set: Vec<_> = metric.label.clone();
                set.sort();
                if !label_sets.insert(set) {
                    return None;
                }
            }
            carried.metric.push(series);
        }
        if !carried.metric.is_empty() {
            out.push(carried);
        }
    }
    if shadows_a_part(&out) {
        return None;
    }
    Some(out)
}

/// The server's path: families pushed as protobuf are served as text on `/federate` and read by
/// a Prometheus. The encoder must never panic on them, and what passes validation must read back
/// as pushed.
fn pushed_then_federated(families: &[MetricFamily]) -> Verdict {
    let mut served = Vec::new();
    let written = text::encode(&mut served, families, true);
    let Some(expected) = as_text_carries(families) else {
        return Ok(());
    };
    written.map_err(|e| format!("valid families do not encode as text: {e}"))?;
    let read = text::parse(&served, &text::Limits::default()).map_err(|e| {
        format!(
            "valid families, served as text, do not parse: {e}\nserved: {}",
            escape(&served)
        )
    })?;
    if canonical(&expected) != canonical(&read) {
        return Err(format!(
            "valid families read back differently from text\nserved: {}\npushed: {expected:?}\nread:   {read:?}",
            escape(&served)
        ));
    }
    Ok(())
}

#[test]
fn protobuf_delimited() {
    harness::run(
        Target {
            name: "delimited",
            dict: DELIMITED_DICT,
            seeds: Vec::new(),
        },
        delimited_exec,
    );
}

// ---------------------------------------------------------------------------------------------
// Zero-copy views of protobuf-delimited bodies (`wire`)

/// Extra tokens for the views: unknown fields of every wire type, groups, repeated value messages.
const WIRE_DICT: &[&[u8]] = &[
    b"\x7b\x7c",
    b"\x7b\x08\x01\x7c",
    b"\x4b\x4b\x4c\x4c",
    b"\x7d\x00\x00\x00\x00",
    b"\x79\x00\x00\x00\x00\x00\x00\x00\x00",
    b"\x82\x01\x00",
    b"\x8a\x80\x00",
    b"\x22\x0b\x12\x09\x09\x00\x00\x00\x00\x00\x00\xf0\x3f",
    b"\x22\x04\x12\x00\x12\x00",
    b"\x22\x0d\x22\x0b\x1a\x09\x09\x00\x00\x00\x00\x00\x00\xe0\x3f",
    b"\x3a\x05\x1a\x03\x08\x01\x7c",
    b"\x30\x01",
];

/// The families the views read, as owned values in a normal form: absent names, help, labels and
/// values read as empty or 0 (as the views read them); a value field is present when
/// `value_for` finds it.
fn rebuilt_from_views(body: &[u8]) -> Result<Vec<MetricFamily>, String> {
    use telemeter_common::model::{Counter, Gauge, Histogram, Quantile, Summary, Untyped};
    use telemeter_common::wire::{self, Value};
    let mut out = Vec::new();
    for family in wire::families(body, &delimited::Limits::default()) {
        let family = family.map_err(|e| format!("family: {e}"))?;
        let mut rebuilt = MetricFamily {
            name: Some(family.name.to_string()),
            help: Some(family.help.to_string()),
            r#type: family.raw_type,
            metric: Vec::new(),
        };
        for metric in family.metrics() {
            let metric = metric.map_err(|e| format!("metric: {e}"))?;
            let mut m = Metric {
                timestamp_ms: metric.timestamp_ms,
                ..Metric::default()
            };
            for label in metric.labels() {
                let (name, value) = label.map_err(|e| format!("label: {e}"))?;
                m.label.push(LabelPair::new(name, value));
            }
            let mut kinds = 0;
            for t in [
                MetricType::Counter,
                MetricType::Gauge,
                MetricType::Summary,
                MetricType::Untyped,
                MetricType::Histogram,
            ] {
                match metric.value_for(t).map_err(|e| format!("value: {e}"))? {
                    Value::Missing => continue,
                    Value::Gauge(v) => m.gauge = Some(Gauge { value: Some(v) }),
                    Value::Counter(v) => m.counter = Some(Counter { value: Some(v) }),
                    Value::Untyped(v) => m.untyped = Some(Untyped { value: Some(v) }),
                    Value::Summary(s) => {
                        let mut quantile = Vec::new();
                        for q in s.quantiles() {
                            let (q, v) = q.map_err(|e| format!("quantile: {e}"))?;
                            quantile.push(Quantile {
                                quantile: Some(q),
                                value: Some(v),
                            });
                        }
                        m.summary = Some(Summary {
                            sample_count: Some(s.sample_count),
                            sample_sum: Some(s.sample_sum),
                            quantile,
                        });
                    }
                    Value::Histogram(h) => {
                        let mut bucket = Vec::new();
                        for b in h.buckets() {
                            let (le, count) = b.map_err(|e| format!("bucket: {e}"))?;
                            bucket.push(Bucket {
                                cumulative_count: Some(count),
                                upper_bound: Some(le),
                            });
                        }
                        m.histogram = Some(Histogram {
                            sample_count: Some(h.sample_count),
                            sample_sum: Some(h.sample_sum),
                            bucket,
                        });
                    }
                    Value::Several => return Err("value_for gave Several".into()),
                }
                kinds += 1;
            }
            if (kinds > 1) != matches!(metric.value, Value::Several) {
                return Err(format!("{kinds} value kinds read as {:?}", metric.value));
            }
            rebuilt.metric.push(m);
        }
        out.push(rebuilt);
    }
    Ok(out)
}

/// The owned decoding in the views' normal form (see [`rebuilt_from_views`]).
fn normal_form(mut families: Vec<MetricFamily>) -> Vec<MetricFamily> {
    fn value(v: &mut Option<f64>) {
        v.get_or_insert(0.0);
    }
    for f in &mut families {
        f.name.get_or_insert_with(String::new);
        f.help.get_or_insert_with(String::new);
        for m in &mut f.metric {
            for l in &mut m.label {
                l.name.get_or_insert_with(String::new);
                l.value.get_or_insert_with(String::new);
            }
            if let Some(g) = &mut m.gauge {
                value(&mut g.value);
            }
            if let Some(c) = &mut m.counter {
                value(&mut c.value);
            }
            if let Some(u) = &mut m.untyped {
                value(&mut u.value);
            }
            if let Some(s) = &mut m.summary {
                s.sample_count.get_or_insert(0);
                value(&mut s.sample_sum);
                for q in &mut s.quantile {
                    value(&mut q.quantile);
                    value(&mut q.value);
                }
            }
            if let Some(h) = &mut m.histogram {
                h.sample_count.get_or_insert(0);
                value(&mut h.sample_sum);
                for b in &mut h.bucket {
                    b.cumulative_count.get_or_insert(0);
                    value(&mut b.upper_bound);
                }
            }
        }
    }
    families
}

/// The views must never panic; they must refuse what `delimited::decode` refuses (same error
/// class) and, when it succeeds, read exactly what it decodes, write exactly its text, and drop
/// timestamps exactly as decode + clear + encode does.
fn wire_exec(input: &[u8]) -> Verdict {
    use telemeter_common::wire;
    let limits = delimited_limits();
    let owned = delimited::decode(input, &limits);
    let counted = wire::count_series(input, &limits);
    let class = |e: &delimited::DecodeError| match e {
        delimited::DecodeError::Invalid(_) => "Invalid".to_string(),
        other => format!("{other:?}"),
    };
    let families = match (&owned, &counted) {
        (Ok(families), Ok((n, series))) => {
            let want = families.iter().map(|f| f.metric.len()).sum::<usize>();
            if (*n, *series) != (families.len(), want) {
                return Err(format!(
                    "count_series says {n} families, {series} series; decode {} and {want}",
                    families.len()
                ));
            }
            families
        }
        (Err(a), Err(b)) if class(a) == class(b) => {
            // Refused alike. Reading lazily must still never panic.
            for family in wire::families(input, &limits).flatten() {
                let _ = text::write_family_view(
                    &mut Vec::new(),
                    &family,
                    true,
                    &mut Default::default(),
                );
                let _ = wire::write_family_without_timestamps(&mut Vec::new(), &family);
                for metric in family.metrics().flatten() {
                    let _ = metric.labels().count();
                }
            }
            return Ok(());
        }
        (a, b) => {
            return Err(format!(
                "decode: {a:?}\ncount_series: {b:?}",
                a = a.as_ref().map(|f| f.len())
            ))
        }
    };
    let rebuilt = rebuilt_from_views(input)?;
    let bytes = |f: &[MetricFamily]| delimited::encode(f);
    if bytes(&rebuilt) != bytes(&normal_form(families.clone())) {
        return Err(format!(
            "views read differently\nviews:  {rebuilt:?}\ndecode: {families:?}"
        ));
    }
    let views: Vec<_> = wire::families(input, &limits)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("families: {e}"))?;
    for timestamps in [false, true] {
        for (owned, view) in families.iter().zip(&views) {
            let (mut want, mut got) = (Vec::new(), Vec::new());
            let (mut want_skipped, mut got_skipped) = Default::default();
            let w = text::write_family_counted(&mut want, owned, timestamps, &mut want_skipped)
                .map_err(|e| e.kind());
            let g = text::write_family_view(&mut got, view, timestamps, &mut got_skipped)
                .map_err(|e| e.kind());
            if w != g || want != got || want_skipped != got_skipped {
                return Err(format!(
                    "text differs ({w:?} / {g:?}; skipped {want_skipped} / {got_skipped})\nowned: {}\nviews: {}",
                    escape(&want),
                    escape(&got)
                ));
            }
        }
    }
    let mut ours = Vec::new();
    for view in &views {
        wire::write_family_without_timestamps(&mut ours, view)
            .map_err(|e| format!("dropping timestamps: {e}"))?;
    }
    let mut cleared = families.clone();
    for f in &mut cleared {
        for m in &mut f.metric {
            m.timestamp_ms = None;
        }
    }
    let reread = delimited::decode(&ours, &delimited::Limits::default())
        .map_err(|e| format!("timestamp-free body does not decode: {e}"))?;
    if bytes(&reread) != bytes(&cleared) {
        return Err(format!(
            "timestamp-free body differs from decode + clear + encode: {}",
            escape(&ours)
        ));
    }
    Ok(())
}

/// Bodies whose series repeat their value fields: concatenated encodings of a message merge in
/// protobuf, so each series here is two series' bytes back to back (histograms with buckets,
/// summaries with quantiles, gauges), with labels and timestamps from both.
fn merged_seeds() -> Vec<Vec<u8>> {
    use prost::Message;
    use telemeter_common::model::{Gauge, Histogram, Quantile, Summary};
    let histogram = |le: f64, label: &str| Metric {
        label: vec![LabelPair::new("a", label)],
        histogram: Some(Histogram {
            sample_count: Some(3),
            sample_sum: Some(le),
            bucket: vec![Bucket {
                cumulative_count: Some(1),
                upper_bound: Some(le),
            }],
        }),
        timestamp_ms: Some(7),
        ..Metric::default()
    };
    let summary = |q: f64| Metric {
        summary: Some(Summary {
            sample_count: Some(2),
            sample_sum: None,
            quantile: vec![Quantile {
                quantile: Some(q),
                value: Some(1.0),
            }],
        }),
        ..Metric::default()
    };
    let gauge = |v: Option<f64>| Metric {
        label: vec![LabelPair::new("g", "1")],
        gauge: Some(Gauge { value: v }),
        ..Metric::default()
    };
    let family = |name: &str, t: MetricType, merged: &[Vec<u8>]| {
        let mut message = MetricFamily {
            name: Some(name.into()),
            help: Some("h".into()),
            r#type: Some(t as i32),
            metric: vec![],
        }
        .encode_to_vec();
        for m in merged {
            message.push(0x22);
            prost::encode_length_delimiter(m.len(), &mut message).unwrap();
            message.extend_from_slice(m);
        }
        let mut body = Vec::new();
        prost::encode_length_delimiter(message.len(), &mut body).unwrap();
        body.extend(message);
        body
    };
    let two = |a: Metric, b: Metric| [a.encode_to_vec(), b.encode_to_vec()].concat();
    vec![
        family(
            "h",
            MetricType::Histogram,
            &[two(histogram(0.5, "x"), histogram(1.0, "y"))],
        ),
        family("s", MetricType::Summary, &[two(summary(0.5), summary(0.9))]),
        family(
            "g",
            MetricType::Gauge,
            &[
                two(gauge(Some(2.0)), gauge(None)),
                two(gauge(Some(1.0)), histogram(0.1, "z")),
            ],
        ),
    ]
}

#[test]
fn wire_views() {
    let mut dict = DELIMITED_DICT.to_vec();
    dict.extend_from_slice(WIRE_DICT);
    harness::run(
        Target {
            name: "wire",
            dict: &dict,
            // The protobuf-delimited corpus: the same bodies, read the other way.
            seeds: [harness::load_corpus("delimited"), merged_seeds()].concat(),
        },
        wire_exec,
    );
}

// ---------------------------------------------------------------------------------------------
// Snappy

const SNAPPY_CAP: usize = 64 << 10;

const SNAPPY_DICT: &[&[u8]] = &[
    b"\xff\x06\x00\x00sNaPpY",
    b"\x00\x08\x00\x00",
    b"\x01\x08\x00\x00",
    b"\xfe\x00\x00\x00",
    b"\x80\x03\x00\x00abc",
    b"\x02\x00\x00\x00",
    b"\xff\xff\xff",
    // Block: a literal tag, copies with 1-, 2- and 4-byte offsets.
    b"\x00",
    b"\xfc\xff\xff\xff\xff",
    b"\x01\x00",
    b"\x02\x00\x00",
    b"\x03\x00\x00\x00\x00",
    b"\xfe\xff\x03",
];

/// The Castagnoli CRC-32 the snappy framing format checksums chunks with, bit by bit (speed does
/// not matter here).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Rewrites the checksums of a framed stream's data chunks so they match, where the chunk can be
/// read: mutations that only break a checksum then reach the block decoder behind it. Returns
/// `None` if nothing was fixed.
fn fix_checksums(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = input.to_vec();
    let mut at = 0;
    let mut fixed = false;
    while at + 4 <= out.len() {
        let kind = out[at];
        let len = usize::from(out[at + 1])
            | usize::from(out[at + 2]) << 8
            | usize::from(out[at + 3]) << 16;
        let body = at + 4;
        let end = body.checked_add(len).filter(|&e| e <= out.len())?;
        if (kind == 0x00 || kind == 0x01) && len >= 4 {
            let data = &out[body + 4..end];
            let plain = if kind == 0x00 {
                snappy::decode_block(data, SNAPPY_CAP).ok()
            } else {
                Some(data.to_vec())
            };
            if let Some(plain) = plain {
                out[body..body + 4].copy_from_slice(&masked_crc(&plain).to_le_bytes());
                fixed = true;
            }
        }
        at = end;
    }
    fixed.then_some(out)
}

fn snappy_decode_within_cap(input: &[u8]) -> Verdict {
    if let Ok(out) = snappy::decode_framed(input, SNAPPY_CAP) {
        if out.len() > SNAPPY_CAP {
            return Err(format!(
                "framed decode returned {} bytes past the cap {SNAPPY_CAP}",
                out.len()
            ));
        }
    }
    if let Ok(out) = snappy::decode_block(input, SNAPPY_CAP) {
        if out.len() > SNAPPY_CAP {
            return Err(format!(
                "block decode returned {} bytes past the cap {SNAPPY_CAP}",
                out.len()
            ));
        }
    }
    Ok(())
}

/// Decoders never panic nor pass the cap, on the input as is and with its checksums repaired; the
/// input itself, compressed either way, decodes back to itself, and not under a cap one byte short.
fn snappy_exec(input: &[u8]) -> Verdict {
    snappy_decode_within_cap(input)?;
    if let Some(fixed) = fix_checksums(input) {
        snappy_decode_within_cap(&fixed)?;
    }
    let framed = snappy::encode_framed(input);
    match snappy::decode_framed(&framed, input.len()) {
        Ok(out) if out == input => {}
        Ok(_) => return Err("framed round trip changed the data".to_string()),
        Err(e) => return Err(format!("framed round trip failed: {e}")),
    }
    let block = snappy::encode_block(input);
    match snappy::decode_block(&block, input.len()) {
        Ok(out) if out == input => {}
        Ok(_) => return Err("block round trip changed the data".to_string()),
        Err(e) => return Err(format!("block round trip failed: {e}")),
    }
    if let Some(short) = input.len().checked_sub(1) {
        if snappy::decode_framed(&framed, short).is_ok() {
            return Err(format!(
                "framed decode of {} bytes passed a cap of {short}",
                input.len()
            ));
        }
        if snappy::decode_block(&block, short).is_ok() {
            return Err(format!(
                "block decode of {} bytes passed a cap of {short}",
                input.len()
            ));
        }
    }
    Ok(())
}

#[test]
fn snappy_framed_and_block() {
    harness::run(
        Target {
            name: "snappy",
            dict: SNAPPY_DICT,
            seeds: Vec::new(),
        },
        snappy_exec,
    );
}

// ---------------------------------------------------------------------------------------------
// Upload tokens

/// The key the committed token seeds were minted with.
const TOKEN_KEY: [u8; 32] = *b"telemeter-fuzz-fixed-test-key-01";
/// The time the committed tokens were issued at; they are valid for an hour from it.
const TOKEN_NOW: u64 = 1_700_000_000;

fn token_signer() -> TokenSigner {
    TokenSigner::new(&SharedKey::from_bytes(&TOKEN_KEY).expect("a 32-byte key is long enough"))
}

fn token_now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(TOKEN_NOW + 60)
}

const TOKEN_DICT: &[&[u8]] = &[
    b".",
    b"..",
    b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9",
    b"eyJhbGciOiJub25lIn0",
    b"eyJ9",
    b"AA",
    b"A",
    b"==",
    b"+/",
    b"-_",
];

#[test]
fn token_verify() {
    let signer = token_signer();
    let corpus = harness::load_corpus("token");
    // The seeds that verify: the only tokens a mutation may leave verifying.
    let valid: Vec<String> = corpus
        .iter()
        .filter_map(|t| std::str::from_utf8(t).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| signer.verify(t, token_now()).is_ok())
        .collect();
    assert!(
        valid.len() >= 2,
        "the token corpus should hold tokens valid at {TOKEN_NOW} under the fixed key; found {}",
        valid.len()
    );
    harness::run(
        Target {
            name: "token",
            dict: TOKEN_DICT,
            seeds: Vec::new(),
        },
        |input| {
            let token = String::from_utf8_lossy(input);
            let Ok(claims) = signer.verify(&token, token_now()) else {
                return Ok(());
            };
            // Signing covers header.payload, and base64url decoding accepts one spelling per byte
            // string, so a token that verifies must be one of the valid seeds, byte for byte.
            let signed = |t: &str| {
                t.rsplit_once('.')
                    .map(|(s, _)| s.to_string())
                    .unwrap_or_default()
            };
            match valid.iter().find(|v| signed(v) == signed(&token)) {
                None => Err(format!("a token whose signed part no valid seed has verified: {claims:?}")),
                Some(v) if *v != token => Err(format!(
                    "a valid token with a different signature spelling verified\nseed:   {v}\ntoken: {token}"
                )),
                Some(_) => Ok(()),
            }
        },
    );
}

const CLAIMS_DICT: &[&[u8]] = &[
    b"\"iss\":\"telemeter.selfsigned\"",
    b"\"aud\":[\"federate\"]",
    b"\"aud\":\"federate\"",
    b"\"exp\":",
    b"\"nbf\":",
    b"\"iat\":",
    b"\"sub\":",
    b"\"cluster_id\":",
    b"\"telemeter.openshift.io\":{\"labels\":{\"_id\":\"x\"}}",
    b"1700003600",
    b"1700000000",
    b"18446744073709551616",
    b"-1",
    b"1e400",
    b"1.5",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"\\u0000",
    b"\\ud800",
    b"\\\"",
    b",",
    b":",
];

/// Claims JSON signed with the fixed key, then verified: the claims parser sees hostile JSON behind a
/// good signature (as a leaked or upstream-issued token would carry). It must not panic, and what
/// it accepts must satisfy every check `verify` promises.
fn claims_exec(signer: &TokenSigner, input: &[u8]) -> Verdict {
    let key = SharedKey::from_bytes(&TOKEN_KEY)
        .map_err(|e| e.to_string())?
        .derive(KeyPurpose::UploadToken);
    let signed = format!(
        "{}.{}",
        base64::encode_url(br#"{"alg":"HS256","typ":"JWT"}"#),
        base64::encode_url(input)
    );
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.0),
        signed.as_bytes(),
    );
    let token = format!("{signed}.{}", base64::encode_url(tag.as_ref()));
    let now = TOKEN_NOW + 60;
    let Ok(claims) = signer.verify(&token, token_now()) else {
        return Ok(());
    };
    let leeway = telemeter_common::token::LEEWAY.as_secs();
    let problems = [
        (claims.issuer != telemeter_common::token::ISSUER, "issuer"),
        (
            claims.audience != telemeter_common::token::AUDIENCE,
            "audience",
        ),
        (claims.not_before > now + leeway, "not yet valid"),
        (claims.expires_at.saturating_add(leeway) < now, "expired"),
    ];
    match problems.iter().find(|(bad, _)| *bad) {
        Some((_, what)) => Err(format!(
            "verify accepted claims that fail the {what} check: {claims:?}"
        )),
        None => Ok(()),
    }
}

#[test]
fn token_claims() {
    let signer = token_signer();
    harness::run(
        Target {
            name: "token_claims",
            dict: CLAIMS_DICT,
            seeds: Vec::new(),
        },
        |input| claims_exec(&signer, input),
    );
}

// ---------------------------------------------------------------------------------------------
// Selectors

const SELECTOR_DICT: &[&[u8]] = &[
    b"{",
    b"}",
    b"=",
    b"!=",
    b"=~",
    b"!~",
    b"\"",
    b"'",
    b"`",
    b",",
    b"__name__",
    b".*",
    b".+",
    b"(",
    b")",
    b"[",
    b"]",
    b"\\x41",
    b"\\u00e9",
    b"\\U0001F4A9",
    b"\\777",
    b"\\",
    b"(?i)",
    b"a{1000}{1000}",
    b"\\p{L}",
];

/// Parse; what parses must parse again from its source to the same matchers, and match labels
/// without panicking.
fn selector_exec(input: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(input);
    let Ok(selector) = selector::Selector::parse(&text) else {
        return Ok(());
    };
    let again = selector::Selector::parse(&selector.to_string())
        .map_err(|e| format!("the source of a parsed selector does not parse: {e}"))?;
    let key = |s: &selector::Selector| {
        s.matchers
            .iter()
            .map(|m| (m.name.clone(), m.op, m.value.clone()))
            .collect::<Vec<_>>()
    };
    if key(&selector) != key(&again) {
        return Err(format!(
            "re-parsed selector differs: {selector:?} vs {again:?}"
        ));
    }
    let labels = [
        LabelPair::new("job", "prometheus"),
        LabelPair::new("a", ""),
        LabelPair::new("__name__", "ignored"),
    ];
    let _ = selector.matches("up", &labels);
    let _ = selector.matches("", &[]);
    Ok(())
}

#[test]
fn selector_parse() {
    harness::run(
        Target {
            name: "selector",
            dict: SELECTOR_DICT,
            seeds: Vec::new(),
        },
        selector_exec,
    );
}

// ---------------------------------------------------------------------------------------------
// Durations

const DURATION_DICT: &[&[u8]] = &[
    b"ms",
    b"s",
    b"m",
    b"h",
    b"d",
    b"w",
    b"y",
    b"0",
    b"1",
    b"292y",
    b"106751d",
    b"9223372036854775807",
    b"18446744073709551615",
    b"-",
    b"+",
    b".5",
    b"\xd9\xa3",
];

/// Prometheus keeps durations as int64 nanoseconds.
const MAX_DURATION_MILLIS: u64 = i64::MAX as u64 / 1_000_000;

/// Parse; what parses formats to text that parses to the same duration. The first bytes also make
/// a duration that must survive format + parse (truncated to milliseconds).
fn duration_exec(input: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(input);
    if let Ok(d) = duration::parse(&text) {
        let formatted = duration::format(d);
        match duration::parse(&formatted) {
            Ok(back) if back == d => {}
            other => {
                return Err(format!(
                "{text:?} parsed to {d:?}, formatted as {formatted:?}, which parsed to {other:?}"
            ))
            }
        }
    }
    let mut raw = [0u8; 8];
    for (slot, byte) in raw.iter_mut().zip(input) {
        *slot = *byte;
    }
    let millis = u64::from_le_bytes(raw) % (MAX_DURATION_MILLIS + 1);
    let d = Duration::from_millis(millis);
    let formatted = duration::format(d);
    match duration::parse(&formatted) {
        Ok(back) if back == d => Ok(()),
        other => Err(format!(
            "{d:?} formatted as {formatted:?} parsed to {other:?}"
        )),
    }
}

#[test]
fn duration_parse() {
    harness::run(
        Target {
            name: "duration",
            dict: DURATION_DICT,
            seeds: Vec::new(),
        },
        duration_exec,
    );
}

// ---------------------------------------------------------------------------------------------
// Base64url

const BASE64_DICT: &[&[u8]] = &[
    b"A", b"AA", b"AAA", b"AAAA", b"_", b"-", b"+", b"/", b"=", b"==",
];

/// What decodes re-encodes to the same text (one spelling per byte string); any bytes encode and
/// decode back.
fn base64_exec(input: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(input);
    if let Some(bytes) = base64::decode_url(&text) {
        let again = base64::encode_url(&bytes);
        if again != text {
            return Err(format!(
                "{text:?} decoded to {bytes:?}, which encodes as {again:?}"
            ));
        }
    }
    let encoded = base64::encode_url(input);
    match base64::decode_url(&encoded) {
        Some(back) if back == input => Ok(()),
        other => Err(format!("encoded as {encoded:?}, decoded to {other:?}")),
    }
}

#[test]
fn base64_round_trip() {
    harness::run(
        Target {
            name: "base64",
            dict: BASE64_DICT,
            seeds: Vec::new(),
        },
        base64_exec,
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP request fields: query strings, form bodies, Authorization, Accept, Content-Type

const HTTP_DICT: &[&[u8]] = &[
    b"%",
    b"%2",
    b"%25",
    b"%5B%5D",
    b"%ff",
    b"%c3%a9",
    b"%00",
    b"+",
    b"&",
    b"=",
    b"match[]=",
    b"Bearer ",
    b"bearer\t",
    b"application/vnd.google.protobuf",
    b";proto=io.prometheus.client.MetricFamily",
    b";encoding=delimited",
    b";q=0",
    b";q=0.5",
    b"text/plain;version=0.0.4",
    b"\xc4\xb0",
    b"\xe2\x84\xaa",
];

/// The request helpers on hostile text: no panics; percent-encoding round-trips any text, and a
/// query built from encoded values gives those values back; a bearer token is never empty nor
/// padded with blanks.
fn http_exec(input: &[u8]) -> Verdict {
    use telemeter_common::http::{percent_decode, percent_encode, Request};
    use telemeter_common::media::Format;
    let text = String::from_utf8_lossy(input);
    if let Some(decoded) = percent_decode(&text) {
        let again = percent_decode(&percent_encode(&decoded));
        if again.as_deref() != Some(decoded.as_str()) {
            return Err(format!("{decoded:?} encoded and decoded to {again:?}"));
        }
    }
    let encoded = percent_encode(&text);
    if percent_decode(&encoded).as_deref() != Some(&*text) {
        return Err(format!(
            "{text:?} encoded as {encoded:?} does not decode back"
        ));
    }
    let request = Request {
        method: "POST".into(),
        path: "/upload".into(),
        query: format!("match%5B%5D={encoded}&{text}&match[]=up"),
        headers: vec![
            (
                "content-type".to_string(),
                "application/x-www-form-urlencoded".to_string(),
            ),
            ("Authorization".to_string(), text.to_string()),
            ("Accept".to_string(), text.to_string()),
        ]
        .into(),
        body: input.to_vec(),
        remote: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
        admitted: None,
    };
    let values = request.query_params("match[]");
    if values.first().map(String::as_str) != Some(&*text)
        || values.last().map(String::as_str) != Some("up")
    {
        return Err(format!(
            "query {:?} gave match[] values {values:?}",
            request.query
        ));
    }
    let _ = request.form_param("a");
    if let Ok(token) = request.bearer_token() {
        if token.is_empty() || token != token.trim() {
            return Err(format!("bearer token {token:?} from {text:?}"));
        }
    }
    if let Ok(token) = telemeter_common::http::bearer(Some(&text)) {
        if token.is_empty() || token != token.trim() {
            return Err(format!("bearer token {token:?} from {text:?}"));
        }
    }
    let _ = Format::negotiate(Some(&text));
    let _ = Format::from_content_type(&text);
    Ok(())
}

#[test]
fn http_request_fields() {
    harness::run(
        Target {
            name: "http",
            dict: HTTP_DICT,
            seeds: Vec::new(),
        },
        http_exec,
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP request heads and chunked bodies, as the server's connections read them

const REQUEST_DICT: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"\r",
    b"POST /upload HTTP/1.1\r\n",
    b"GET / HTTP/1.0\r\n",
    b"HTTP/1.1",
    b"HTTP/2.0",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"transfer-encoding: CHUNKED\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 18446744073709551616\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b": ",
    b"\r\n ",
    b"\t",
    b"0\r\n\r\n",
    b"0\r\nX-Trailer: 1\r\n\r\n",
    b"5\r\nhello\r\n",
    b";ext=\"v\"",
    b";",
    b"ffffffffffffffff\r\n",
    b"10000000000000000\r\n",
    b"00000000000000001\r\n",
    b"\x00",
    b"\x7f",
    b"\x1b",
    b"\xff",
];

/// What the front makes of one input: the head's end, the parsed head or its refusal, the
/// framing, and a chunked body's bytes or refusal, with how much of the input it used.
#[derive(Debug, PartialEq)]
struct RequestOutcome {
    head_end: Result<Option<usize>, RequestError>,
    head: Option<Result<Head, RequestError>>,
    framing: Option<Result<Framing, RequestError>>,
    body: Option<ChunkedOutcome>,
}

#[derive(Debug, PartialEq)]
struct ChunkedOutcome {
    body: Vec<u8>,
    consumed: usize,
    done: bool,
    error: Option<RequestError>,
}

const FUZZ_MAX_HEAD: usize = 4096;
const FUZZ_BODY_LIMIT: usize = 16 << 10;
const FUZZ_MAX_OVERHEAD: usize = 1024;

/// Decodes a chunked body from `input`, offered to the decoder in pieces of `pieces` bytes
/// (cycled; at least 1), the way the connection does: steps over what has arrived, then more.
fn decode_chunked(input: &[u8], pieces: &[usize]) -> ChunkedOutcome {
    let mut decoder = ChunkedDecoder::new(FUZZ_BODY_LIMIT, FUZZ_MAX_OVERHEAD);
    let mut body = Vec::new();
    let mut consumed = 0;
    let mut arrived = 0;
    let mut sizes = pieces.iter().cycle();
    loop {
        loop {
            let available = &input[consumed..arrived];
            match decoder.step(available) {
                Ok(step) if step.consumed == 0 => break,
                Ok(step) => {
                    assert!(step.consumed <= available.len(), "consumed past the input");
                    body.extend_from_slice(&available[step.data]);
                    consumed += step.consumed;
                }
                Err(error) => {
                    return ChunkedOutcome {
                        body,
                        consumed,
                        done: false,
                        error: Some(error),
                    }
                }
            }
        }
        if decoder.is_done() || arrived == input.len() {
            return ChunkedOutcome {
                body,
                consumed,
                done: decoder.is_done(),
                error: None,
            };
        }
        arrived = (arrived + sizes.next().copied().unwrap_or(1).max(1)).min(input.len());
    }
}

/// Reads a request from `input` arriving in pieces of `pieces` bytes, as a connection does.
fn read_request(input: &[u8], pieces: &[usize]) -> RequestOutcome {
    let mut scanned = 0;
    let mut arrived = 0;
    let mut sizes = pieces.iter().cycle();
    let head_end = loop {
        arrived = (arrived + sizes.next().copied().unwrap_or(1).max(1)).min(input.len());
        match http::head_end(&input[..arrived], &mut scanned, FUZZ_MAX_HEAD) {
            Ok(None) if arrived < input.len() => continue,
            other => break other,
        }
    };
    let mut outcome = RequestOutcome {
        head_end: head_end.clone(),
        head: None,
        framing: None,
        body: None,
    };
    let Ok(Some(end)) = head_end else {
        return outcome;
    };
    let head = http::parse_head(&input[..end]);
    outcome.head = Some(head.clone());
    let Ok(head) = head else {
        return outcome;
    };
    let framing = http::framing(&head);
    outcome.framing = Some(framing.clone());
    if framing == Ok(Framing::Chunked) {
        outcome.body = Some(decode_chunked(&input[end..], pieces));
    }
    outcome
}

/// Chunk sizes from the input itself, so each input is also read a few bytes at a time.
fn pieces_of(input: &[u8]) -> Vec<usize> {
    let mut sizes: Vec<usize> = input
        .iter()
        .take(8)
        .map(|b| usize::from(b % 7) + 1)
        .collect();
    sizes.push(1);
    sizes
}

/// The head and chunked-body reader the connections run (`head_end`, `parse_head`, `framing`,
/// `ChunkedDecoder`) on hostile bytes: no panics; the same outcome whether the bytes arrive at
/// once, a byte at a time, or in uneven pieces; a parsed head holds no control character, lone
/// LF nor folded line; a chunked body stays under its cap, and once complete it is what our own
/// chunked encoding of it decodes to.
fn request_exec(input: &[u8]) -> Verdict {
    let whole = read_request(input, &[input.len().max(1)]);
    for pieces in [vec![1], pieces_of(input)] {
        let split = read_request(input, &pieces);
        if split != whole {
            return Err(format!(
                "read in pieces of {pieces:?}: {split:?}\nread at once: {whole:?}"
            ));
        }
    }
    if let Some(Ok(head)) = &whole.head {
        for (name, value) in &head.headers {
            if name.is_empty() || value.bytes().any(|b| b < b' ' && b != b'\t' || b == 0x7f) {
                return Err(format!("accepted header {name:?}: {value:?}"));
            }
        }
    }
    // Also drive the decoder with the whole input as a body, which mutation reaches far more often
    // than a body behind a head.
    let bodies = [
        whole.body,
        Some(decode_chunked(input, &[input.len().max(1)])),
    ];
    for outcome in bodies.into_iter().flatten() {
        if outcome.body.len() > FUZZ_BODY_LIMIT {
            return Err(format!(
                "a body of {} bytes passed the cap",
                outcome.body.len()
            ));
        }
        if outcome.done {
            let mut again = Vec::new();
            for chunk in outcome.body.chunks(100) {
                again.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                again.extend_from_slice(chunk);
                again.extend_from_slice(b"\r\n");
            }
            again.extend_from_slice(b"0\r\n\r\n");
            let decoded = decode_chunked(&again, &[1]);
            if !decoded.done || decoded.body != outcome.body || decoded.consumed != again.len() {
                return Err(format!("re-encoded body decoded to {decoded:?}"));
            }
        }
    }
    Ok(())
}

#[test]
fn http_request_head_and_chunked_body() {
    let seeds: Vec<Vec<u8>> = [
        &b"GET /federate?match[]=up HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"[..],
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:9003\r\nUser-Agent: Go-http-client/1.1\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer x.y.z\r\nContent-Encoding: snappy\r\nAccept-Encoding: gzip\r\n\r\n1f\r\n\xff\x06\x00\x00sNaPpY\x01\x0d\x00\x00abcdefghijklm\r\n0\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n5;ext=1\r\nhello\r\n0000A\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        b"\r\nPOST / HTTP/1.0\r\nConnection: keep-alive\r\nX-A: a\tb\r\n\r\n",
        b"1\r\na\r\n7\r\nabcdefg\r\n0\r\n\r\n",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect();
    harness::run(
        Target {
            name: "http_request",
            dict: REQUEST_DICT,
            seeds,
        },
        request_exec,
    );
}

// ---------------------------------------------------------------------------------------------
// Gossip packets: the target to add in the server crate
//
// The decoder, `fn decode(bytes: &[u8], key: &DerivedKey) -> Result<Heartbeat, PacketError>` in
// `server/src/cluster/packet.rs`, is out of this crate's sight. Its target belongs in
// `server/tests/fuzz.rs`, reusing this harness; seeds are real packets from the encoder (plus any
// files under `tests/fixtures/fuzz/gossip_packet/`):
//
//     use testkit::fuzz as harness;
//     use telemeter_common::token::{KeyPurpose, SharedKey};
//     use telemeter_server::cluster::packet;
//
//     #[test]
//     fn gossip_packet() {
//         let key = SharedKey::from_bytes(&[7; 32]).unwrap().derive(KeyPurpose::Gossip);
//         let seeds: Vec<Vec<u8>> = vec![/* packet::encode(&heartbeat, &key) for a few heartbeats */];
//         let valid = seeds.clone();
//         harness::run(
//             harness::Target { name: "gossip_packet", dict: &[], seeds },
//             |input| match packet::decode(input, &key) {
//                 // The MAC covers the packet: only an untouched packet may authenticate.
//                 Ok(hb) if !valid.iter().any(|v| v == input) => {
//                     Err(format!("a mutated packet authenticated: {hb:?}"))
//                 }
//                 _ => Ok(()),
//             },
//         );
//     }
//
// As with `token_claims` above, a second target that re-MACs the mutated body before decoding
// reaches the field parser behind the MAC, which byte mutations of whole packets never do.

// ---------------------------------------------------------------------------------------------
// The helpers of the targets above

#[test]
fn crc32c_matches_the_snappy_test_vector() {
    // RFC 3720 B.4: 32 bytes of zeros.
    assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
}

// ---------------------------------------------------------------------------------------------
// Seed corpus

/// Rebuilds the derived seed files (pieces of the Prometheus fixtures, snappy streams, tokens).
/// Hand-written edge cases (files named `edge-*`) are left alone.
#[test]
#[ignore = "writes the committed seed corpus; run by hand"]
fn regenerate_seed_corpus() {
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = harness::corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };

    // Text: runs of whole families from the Prometheus fixtures.
    let mut text_pieces = Vec::new();
    for file in ["prometheus-metrics.txt", "prometheus-federate.txt"] {
        let body = std::fs::read_to_string(fixtures.join(file)).unwrap();
        let blocks: Vec<&str> = body.split_inclusive("\n# HELP ").collect();
        let blocks = if blocks.len() > 1 {
            blocks
        } else {
            body.split_inclusive("\n# TYPE ").collect()
        };
        for (i, chunk) in blocks.chunks(blocks.len().div_ceil(6)).enumerate() {
            let mut piece = chunk.concat();
            // Cut at a line end, so each piece parses and reaches the round-trip property.
            if piece.len() > 3000 {
                let end = piece[..3000].rfind('\n').map_or(0, |i| i + 1);
                piece.truncate(end);
            }
            text_pieces.push(piece.clone());
            write(
                "text",
                &format!("{}-{i}.txt", file.trim_end_matches(".txt")),
                piece.as_bytes(),
            );
        }
    }

    // Delimited: a few families at a time from the Prometheus fixtures.
    for file in ["prometheus-metrics.pb", "prometheus-federate.pb"] {
        let body = std::fs::read(fixtures.join(file)).unwrap();
        let families = delimited::decode(&body, &delimited::Limits::default()).unwrap();
        let step = families.len().div_ceil(6);
        for (i, chunk) in families.chunks(step).enumerate() {
            let mut piece = Vec::new();
            for family in chunk.iter().take(4) {
                delimited::encode_family(family, &mut piece);
            }
            write(
                "delimited",
                &format!("{}-{i}.pb", file.trim_end_matches(".pb")),
                &piece,
            );
        }
    }

    // Snappy: framed and block compressions of text and protobuf pieces.
    for (i, piece) in text_pieces.iter().take(3).enumerate() {
        write(
            "snappy",
            &format!("framed-text-{i}.sz"),
            &snappy::encode_framed(piece.as_bytes()),
        );
        write(
            "snappy",
            &format!("block-text-{i}.sz"),
            &snappy::encode_block(piece.as_bytes()),
        );
    }
    let repeated = "a".repeat(70_000);
    write(
        "snappy",
        "framed-two-chunks.sz",
        &snappy::encode_framed(repeated.as_bytes()),
    );

    // Tokens: valid ones at TOKEN_NOW, and signed ones with claims verify must refuse.
    let signer = token_signer();
    let issue = |cluster: &str, labels: &[(&str, &str)]| {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        signer.issue(
            cluster,
            "account-7",
            &labels,
            Duration::from_secs(3600),
            SystemTime::UNIX_EPOCH + Duration::from_secs(TOKEN_NOW),
        )
    };
    write(
        "token",
        "valid-labels.jwt",
        issue("cluster-1", &[("_id", "cluster-1"), ("region", "eu")]).as_bytes(),
    );
    write("token", "valid-empty.jwt", issue("", &[]).as_bytes());
    write(
        "token",
        "valid-escapes.jwt",
        issue("c\"\\\u{e9}", &[("_id", "x\ny")]).as_bytes(),
    );
    let key = SharedKey::from_bytes(&TOKEN_KEY)
        .unwrap()
        .derive(KeyPurpose::UploadToken);
    let forge = |header: &str, claims: &str| {
        let signed = format!(
            "{}.{}",
            base64::encode_url(header.as_bytes()),
            base64::encode_url(claims.as_bytes())
        );
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.0),
            signed.as_bytes(),
        );
        format!("{signed}.{}", base64::encode_url(tag.as_ref()))
    };
    let hs256 = r#"{"alg":"HS256","typ":"JWT"}"#;
    let forged = [
        (
            "forged-alg-none.jwt",
            r#"{"alg":"none"}"#,
            r#"{"iss":"telemeter.selfsigned","aud":"federate","exp":1700003600}"#,
        ),
        (
            "forged-aud-string.jwt",
            hs256,
            r#"{"iss":"telemeter.selfsigned","aud":"federate","exp":1700003600,"nbf":1700000000}"#,
        ),
        (
            "forged-wrong-iss.jwt",
            hs256,
            r#"{"iss":"x","aud":["federate"],"exp":1700003600}"#,
        ),
        (
            "forged-expired.jwt",
            hs256,
            r#"{"iss":"telemeter.selfsigned","aud":["federate"],"exp":1}"#,
        ),
        (
            "forged-future.jwt",
            hs256,
            r#"{"iss":"telemeter.selfsigned","aud":["federate"],"nbf":18446744073709551615,"exp":18446744073709551615}"#,
        ),
        (
            "forged-upstream-id.jwt",
            hs256,
            r#"{"iss":"telemeter.selfsigned","aud":["federate"],"exp":1700003600,"telemeter.openshift.io":{"labels":{"_id":"u"}}}"#,
        ),
        ("forged-not-json.jwt", hs256, "not json"),
    ];
    for (name, header, claims) in forged {
        write("token", name, forge(header, claims).as_bytes());
        let claims_name = name.trim_start_matches("forged-").replace(".jwt", ".json");
        write("token_claims", &claims_name, claims.as_bytes());
    }
    for name in ["valid-labels.jwt", "valid-empty.jwt", "valid-escapes.jwt"] {
        let token = std::fs::read_to_string(harness::corpus_dir("token").join(name)).unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let claims = base64::decode_url(payload).unwrap();
        write("token_claims", &name.replace(".jwt", ".json"), &claims);
    }
}

#[test]
fn fixing_checksums_lets_a_chunk_reach_the_decoder() {
    let bad = b"\xff\x06\x00\x00sNaPpY\x01\x07\x00\x00\x00\x00\x00\x00abc";
    assert!(snappy::decode_framed(bad, 16).is_err());
    let fixed = fix_checksums(bad).expect("the uncompressed chunk is readable");
    assert_eq!(snappy::decode_framed(&fixed, 16).unwrap(), b"abc");
}
