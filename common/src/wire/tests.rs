//! Tests of the zero-copy views, checked against prost on the same bytes.

use super::fields::read_varint;
use super::parse::{kind_of, COUNTER, GAUGE, HISTOGRAM, SUMMARY, UNTYPED};
use super::write::{put_varint, write_family_without_timestamps};
use super::*;
use crate::delimited;
use crate::model::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, Quantile, Summary, Untyped,
};
use prost::Message;

const METRICS_PB: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-metrics.pb");
const FEDERATE_PB: &[u8] = include_bytes!("../../../tests/fixtures/prometheus-federate.pb");

fn unlimited() -> Limits {
    Limits {
        max_message_bytes: usize::MAX,
        max_total_bytes: usize::MAX,
        max_families: usize::MAX,
        max_series: usize::MAX,
    }
}

/// The kinds of value an owned series sets, as bits.
fn owned_kinds(m: &Metric) -> u8 {
    let mut kinds = 0;
    for (set, kind) in [
        (m.gauge.is_some(), GAUGE),
        (m.counter.is_some(), COUNTER),
        (m.untyped.is_some(), UNTYPED),
        (m.summary.is_some(), SUMMARY),
        (m.histogram.is_some(), HISTOGRAM),
    ] {
        if set {
            kinds |= kind;
        }
    }
    kinds
}

/// Asserts that `view` reads exactly as the owned decoding of the value of `kind`.
fn assert_value(owned: &Metric, kind: u8, view: Value<'_>, at: &str) {
    let bits = |v: Option<f64>| v.unwrap_or(0.0).to_bits();
    match (kind, view) {
        (0, Value::Missing) => {}
        (GAUGE, Value::Gauge(v)) => {
            assert_eq!(bits(owned.gauge.and_then(|g| g.value)), v.to_bits(), "{at}")
        }
        (COUNTER, Value::Counter(v)) => {
            assert_eq!(
                bits(owned.counter.and_then(|g| g.value)),
                v.to_bits(),
                "{at}"
            )
        }
        (UNTYPED, Value::Untyped(v)) => {
            assert_eq!(
                bits(owned.untyped.and_then(|g| g.value)),
                v.to_bits(),
                "{at}"
            )
        }
        (SUMMARY, Value::Summary(s)) => {
            let o = owned.summary.as_ref().unwrap();
            assert_eq!(o.sample_count.unwrap_or(0), s.sample_count, "{at}");
            assert_eq!(bits(o.sample_sum), s.sample_sum.to_bits(), "{at}");
            let got: Vec<(u64, u64)> = s
                .quantiles()
                .map(|q| q.map(|(a, b)| (a.to_bits(), b.to_bits())))
                .collect::<Result<_, _>>()
                .unwrap();
            let want: Vec<(u64, u64)> = o
                .quantile
                .iter()
                .map(|q| (bits(q.quantile), bits(q.value)))
                .collect();
            assert_eq!(got, want, "{at}");
        }
        (HISTOGRAM, Value::Histogram(h)) => {
            let o = owned.histogram.as_ref().unwrap();
            assert_eq!(o.sample_count.unwrap_or(0), h.sample_count, "{at}");
            assert_eq!(bits(o.sample_sum), h.sample_sum.to_bits(), "{at}");
            let got: Vec<(u64, u64)> = h
                .buckets()
                .map(|b| b.map(|(a, c)| (a.to_bits(), c)))
                .collect::<Result<_, _>>()
                .unwrap();
            let want: Vec<(u64, u64)> = o
                .bucket
                .iter()
                .map(|b| (bits(b.upper_bound), b.cumulative_count.unwrap_or(0)))
                .collect();
            assert_eq!(got, want, "{at}");
        }
        (k, v) => panic!("{at}: kind {k} read as {v:?}"),
    }
}

/// Asserts that the views of `body` read exactly what `delimited::decode` decodes, and that
/// `count_series` agrees; returns the owned families.
fn assert_agree(body: &[u8]) -> Vec<MetricFamily> {
    let owned = delimited::decode(body, &unlimited()).expect("owned decode");
    let views: Vec<FamilyView<'_>> = families(body, &unlimited())
        .collect::<Result<_, _>>()
        .expect("views");
    assert_eq!(views.len(), owned.len());
    let series: usize = owned.iter().map(|f| f.metric.len()).sum();
    assert_eq!(count_series(body, &unlimited()), Ok((owned.len(), series)));
    for (o, v) in owned.iter().zip(&views) {
        let at = o.name.clone().unwrap_or_default();
        assert_eq!(o.name.as_deref().unwrap_or(""), v.name);
        assert_eq!(o.help.as_deref().unwrap_or(""), v.help, "{at}");
        assert_eq!(o.r#type, v.raw_type, "{at}");
        assert_eq!(o.metric_type(), v.metric_type(), "{at}");
        assert_eq!(check_family(v), Ok(o.metric.len()), "{at}");
        let metrics: Vec<MetricView<'_>> = v.metrics().collect::<Result<_, _>>().expect("metrics");
        assert_eq!(metrics.len(), o.metric.len(), "{at}");
        for (om, vm) in o.metric.iter().zip(&metrics) {
            assert_eq!(om.timestamp_ms, vm.timestamp_ms, "{at}");
            let labels: Vec<(&str, &str)> = vm.labels().collect::<Result<_, _>>().expect("labels");
            let want: Vec<(&str, &str)> = om
                .label
                .iter()
                .map(|l| {
                    (
                        l.name.as_deref().unwrap_or(""),
                        l.value.as_deref().unwrap_or(""),
                    )
                })
                .collect();
            assert_eq!(labels, want, "{at}");
            let kinds = owned_kinds(om);
            if kinds.count_ones() > 1 {
                assert!(matches!(vm.value, Value::Several), "{at}: {:?}", vm.value);
            } else {
                assert_value(om, kinds, vm.value, &at);
            }
            for t in [
                MetricType::Counter,
                MetricType::Gauge,
                MetricType::Summary,
                MetricType::Untyped,
                MetricType::Histogram,
                MetricType::GaugeHistogram,
            ] {
                let kind = kind_of(t) & kinds;
                assert_value(om, kind, vm.value_for(t).unwrap(), &at);
            }
        }
    }
    owned
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    fn float(&mut self) -> Option<f64> {
        Some(match self.below(9) {
            0 => return None,
            1 => f64::NAN,
            2 => f64::INFINITY,
            3 => f64::NEG_INFINITY,
            4 => -0.0,
            5 => self.below(1000) as f64,
            6 => f64::from_bits(self.next()),
            _ => self.below(1 << 40) as f64 / 7.0 - 1e6,
        })
    }
    fn string(&mut self) -> Option<String> {
        const PIECES: [&str; 8] = ["a", "_id", "\\", "\n", "\"", "é", "job", "le"];
        if self.chance(8) {
            return None;
        }
        Some(
            (0..self.below(4))
                .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
                .collect(),
        )
    }
}

fn generated_metric(r: &mut Rng, kind: MetricType) -> Metric {
    let mut m = Metric {
        label: (0..r.below(4))
            .map(|_| LabelPair {
                name: r.string(),
                value: r.string(),
            })
            .collect(),
        timestamp_ms: (!r.chance(3)).then(|| r.next() as i64),
        ..Default::default()
    };
    // Mostly the family's own kind; sometimes another, none, or several.
    let kinds = match r.below(10) {
        0 => 0,
        1 => 1 << r.below(5),
        2 => r.below(32) as u8,
        _ => kind_of(kind),
    };
    if kinds & GAUGE != 0 {
        m.gauge = Some(Gauge { value: r.float() });
    }
    if kinds & COUNTER != 0 {
        m.counter = Some(Counter { value: r.float() });
    }
    if kinds & UNTYPED != 0 {
        m.untyped = Some(Untyped { value: r.float() });
    }
    if kinds & SUMMARY != 0 {
        m.summary = Some(Summary {
            sample_count: (!r.chance(5)).then(|| r.next()),
            sample_sum: r.float(),
            quantile: (0..r.below(4))
                .map(|_| Quantile {
                    quantile: r.float(),
                    value: r.float(),
                })
                .collect(),
        });
    }
    if kinds & HISTOGRAM != 0 {
        m.histogram = Some(Histogram {
            sample_count: (!r.chance(5)).then(|| r.next()),
            sample_sum: r.float(),
            bucket: (0..r.below(5))
                .map(|_| Bucket {
                    cumulative_count: (!r.chance(5)).then(|| r.below(1000)),
                    upper_bound: if r.chance(3) {
                        Some(f64::INFINITY)
                    } else {
                        r.float()
                    },
                })
                .collect(),
        });
    }
    m
}

fn generated(seed: u64) -> Vec<MetricFamily> {
    let mut r = Rng(seed | 1);
    let types = [
        MetricType::Counter,
        MetricType::Gauge,
        MetricType::Summary,
        MetricType::Untyped,
        MetricType::Histogram,
        MetricType::GaugeHistogram,
    ];
    (0..1 + r.below(8))
        .map(|i| {
            let kind = types[r.below(types.len() as u64) as usize];
            MetricFamily {
                name: if r.chance(10) {
                    None
                } else {
                    Some(format!("family_{i}"))
                },
                help: r.string(),
                r#type: match r.below(10) {
                    0 => None,
                    1 => Some(r.next() as i32),
                    _ => Some(kind as i32),
                },
                metric: (0..r.below(5))
                    .map(|_| generated_metric(&mut r, kind))
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn varints_read_as_prost_reads_them() {
    for v in [0, 1, 127, 128, 300, 16_383, 16_384, 1 << 35, u64::MAX] {
        let mut encoded = Vec::new();
        put_varint(&mut encoded, v);
        encoded.push(0xAA);
        let mut buf = encoded.as_slice();
        assert_eq!(read_varint(&mut buf).unwrap(), v);
        assert_eq!(buf, [0xAA], "{v}");
        let mut prost_buf = encoded.as_slice();
        assert_eq!(prost::encoding::decode_varint(&mut prost_buf).unwrap(), v);
    }
    // Non-minimal encodings are fine; an eleventh byte, bits past 64, or an end is not.
    assert_eq!(read_varint(&mut &[0x80, 0x00][..]).unwrap(), 0);
    assert_eq!(read_varint(&mut &[0xff, 0x80, 0x00][..]).unwrap(), 127);
    assert!(read_varint(&mut &[0x80][..]).is_err());
    assert!(read_varint(&mut &[][..]).is_err());
    assert!(read_varint(&mut &[[0xff; 9].as_slice(), &[0x02]].concat()[..]).is_err());
    assert!(read_varint(&mut &[0x80; 11][..]).is_err());
}

/// The eight-bytes-at-once reading against prost's byte loop: every length from 1 to 10 bytes,
/// minimal or padded with continuation bytes, at the end of the buffer or followed by more bytes.
#[test]
fn every_varint_length_reads_as_prost_reads_it() {
    let mut r = 0x2545_f491_4f6c_dd1du64;
    let mut values: Vec<u64> = (0..64)
        .flat_map(|bit| [1u64 << bit, (1u64 << bit) - 1])
        .collect();
    for _ in 0..5000 {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        values.push(r >> (r % 64));
    }
    for v in values {
        let mut minimal = Vec::new();
        put_varint(&mut minimal, v);
        // The same value with a continuation byte of zero bits added, while within 10 bytes.
        let mut padded = minimal.clone();
        if padded.len() < 10 {
            let last = padded.len() - 1;
            padded[last] |= 0x80;
            padded.push(0);
        }
        for encoded in [minimal, padded] {
            for tail in [&[][..], &[0xAA][..], &[0xff; 12][..]] {
                let bytes = [encoded.as_slice(), tail].concat();
                let mut buf = bytes.as_slice();
                let mut prost_buf = bytes.as_slice();
                let ours = read_varint(&mut buf).map_err(|_| ());
                let theirs = prost::encoding::decode_varint(&mut prost_buf).map_err(|_| ());
                assert_eq!(ours, theirs, "{bytes:02x?}");
                assert_eq!(ours, Ok(v), "{bytes:02x?}");
                assert_eq!(buf, tail, "{bytes:02x?}");
            }
        }
    }
}

#[test]
fn prometheus_fixtures_read_as_the_owned_decoding() {
    for body in [METRICS_PB, FEDERATE_PB] {
        let owned = assert_agree(body);
        assert!(owned.len() > 10);
    }
    // A spot check by hand, not only agreement.
    let build = families(METRICS_PB, &Limits::default())
        .map(Result::unwrap)
        .find(|f| f.name == "prometheus_build_info")
        .unwrap();
    assert_eq!(build.metric_type(), MetricType::Gauge);
    let series = build.metrics().next().unwrap().unwrap();
    assert!(series
        .labels()
        .any(|l| l.unwrap() == ("version", "2.42.0+ds")));
    assert!(matches!(series.value, Value::Gauge(v) if v == 1.0));
}

#[test]
fn generated_families_of_every_type_read_as_the_owned_decoding() {
    for seed in 1..400u64 {
        let families = generated(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        assert_agree(&delimited::encode(&families));
    }
}

/// A field key.
fn key(tag: u32, wire_type: u8) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, u64::from(tag << 3 | u32::from(wire_type)));
    out
}

/// A length-delimited field.
fn ld(tag: u32, content: &[u8]) -> Vec<u8> {
    let mut out = key(tag, 2);
    put_varint(&mut out, content.len() as u64);
    out.extend_from_slice(content);
    out
}

fn double(tag: u32, v: f64) -> Vec<u8> {
    let mut out = key(tag, 1);
    out.extend_from_slice(&v.to_le_bytes());
    out
}

fn varint_field(tag: u32, v: u64) -> Vec<u8> {
    let mut out = key(tag, 0);
    put_varint(&mut out, v);
    out
}

fn label(name: &str, value: &str) -> Vec<u8> {
    ld(
        1,
        &[ld(1, name.as_bytes()), ld(2, value.as_bytes())].concat(),
    )
}

fn framed(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        put_varint(&mut out, m.len() as u64);
        out.extend_from_slice(m);
    }
    out
}

/// Unknown fields of every valid wire type, groups nested in groups included.
fn unknown_fields() -> Vec<u8> {
    [
        varint_field(15, 1 << 40),
        double(16, 1.5),
        ld(17, b"\xff\xfe not UTF-8, not looked at"),
        [key(18, 5), vec![1, 2, 3, 4]].concat(),
        [
            key(19, 3),
            varint_field(1, 7),
            key(20, 3),
            ld(2, b"x"),
            key(20, 4),
            key(19, 4),
        ]
        .concat(),
    ]
    .concat()
}

#[test]
fn interleaved_repeated_fields_and_unknown_fields_read_as_prost_reads_them() {
    let u = unknown_fields();
    let quantile = ld(3, &[double(1, 0.5), u.clone(), double(2, 3.0)].concat());
    let metric = [
        label("a", "1"),
        u.clone(),
        varint_field(6, 5),
        ld(2, &[u.clone(), double(1, 2.0)].concat()),
        label("b", "2"),
        // A second gauge without a value keeps the first one's (prost merges).
        ld(2, &u),
        varint_field(6, 9),
        label("c", "3"),
        // Two summaries merge: their quantiles add up, the last count wins.
        ld(
            4,
            &[varint_field(1, 1), quantile.clone(), u.clone()].concat(),
        ),
        ld(
            4,
            &[quantile.clone(), varint_field(1, 2), double(2, 4.0)].concat(),
        ),
    ]
    .concat();
    let histogram = [
        label("h", "x"),
        ld(
            7,
            &[
                ld(3, &[varint_field(1, 3), u.clone(), double(2, 1.0)].concat()),
                varint_field(1, 4),
            ]
            .concat(),
        ),
        ld(
            7,
            &ld(3, &[double(2, f64::INFINITY), varint_field(1, 4)].concat()),
        ),
    ]
    .concat();
    let family = [
        ld(4, &metric),
        ld(1, b"first_name"),
        u.clone(),
        ld(4, &metric),
        varint_field(3, 1),
        ld(2, b"help"),
        ld(1, b"name"),
        ld(4, &histogram),
        // An enum keeps the low 32 bits of its varint, as prost does.
        varint_field(3, (1 << 32) | 2),
    ]
    .concat();
    let body = framed(&[family.clone(), u.clone(), vec![]]);
    let owned = assert_agree(&body);
    assert_eq!(owned[0].name.as_deref(), Some("name"));
    assert_eq!(owned[0].r#type, Some(2));
    let views: Vec<_> = families(&body, &Limits::default()).collect();
    let v = views[0].as_ref().unwrap();
    assert_eq!((v.name, v.help, v.raw_type), ("name", "help", Some(2)));
    let m = v.metrics().next().unwrap().unwrap();
    assert_eq!(m.timestamp_ms, Some(9));
    assert!(matches!(m.value, Value::Several));
    assert!(matches!(m.value_for(MetricType::Gauge), Ok(Value::Gauge(v)) if v == 2.0));
    let Ok(Value::Summary(s)) = m.value_for(MetricType::Summary) else {
        panic!("no summary")
    };
    assert_eq!((s.sample_count, s.sample_sum), (2, 4.0));
    assert_eq!(s.quantiles().count(), 2);
    let labels: Vec<_> = m.labels().map(Result::unwrap).collect();
    assert_eq!(labels, [("a", "1"), ("b", "2"), ("c", "3")]);
    // An empty message and an unknown-only message are families with no name.
    assert_eq!(views.len(), 3);
    assert_eq!(views[2].as_ref().unwrap().name, "");
}

/// The error class: the variant, and the limit it names (not an invalid message's wording).
fn class(r: &Result<impl Sized, DecodeError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(DecodeError::Invalid(_)) => "invalid".into(),
        Err(e) => format!("{e:?}"),
    }
}

fn assert_same_class(body: &[u8], limits: &Limits) {
    let owned = delimited::decode(body, limits);
    let counted = count_series(body, limits);
    assert_eq!(class(&owned), class(&counted), "body {body:?}");
    if let Ok(families) = &owned {
        let series = families.iter().map(|f| f.metric.len()).sum::<usize>();
        assert_eq!(counted, Ok((families.len(), series)));
        // And the lazy views read the same bytes without error.
        if limits.max_series == usize::MAX {
            assert_agree(body);
        }
    }
}

#[test]
fn hostile_bodies_fail_with_the_owned_decoders_error_class() {
    let d = Limits::default();
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 11],
        vec![0x80; 12],
        [vec![0xff; 9], vec![0x02]].concat(),
        [vec![0xff; 9], vec![0x01]].concat(),
        vec![0x80, 0x80],
        vec![3, 0x0a, 0x05, b'x'],
        vec![3, 0x0a, 0x01, 0xff],
        // Field number 0, wire types 6 and 7, a stray end group, a group on a known field.
        framed(&[vec![0x00, 0x00]]),
        framed(&[vec![0x0e]]),
        framed(&[vec![0x0f]]),
        framed(&[vec![0x7c]]),
        framed(&[vec![0x0b, 0x0c]]),
        framed(&[vec![0x7b, 0x7c]]),
        framed(&[vec![0x7b, 0x84, 0x01]]),
        // A key over 32 bits; a non-minimal but valid key.
        framed(&[vec![0x80, 0x80, 0x80, 0x80, 0x10, 0]]),
        framed(&[vec![0x8a, 0x80, 0x00, 1, b'a']]),
        // Wrong wire types on known fields at every level.
        framed(&[varint_field(1, 1)]),
        framed(&[ld(3, b"")]),
        framed(&[varint_field(4, 1)]),
        framed(&[ld(4, &varint_field(1, 1))]),
        framed(&[ld(4, &ld(6, b""))]),
        framed(&[ld(4, &ld(2, &varint_field(1, 1)))]),
        framed(&[ld(4, &ld(1, &varint_field(2, 1)))]),
        framed(&[ld(4, &ld(1, &ld(1, b"\xc3")))]),
        framed(&[ld(4, &ld(4, &ld(3, &varint_field(2, 1))))]),
        framed(&[ld(4, &ld(7, &ld(3, &double(1, 1.0))))]),
        framed(&[ld(4, &ld(7, &ld(3, &varint_field(2, 1))))]),
        framed(&[ld(4, &ld(7, &double(1, 1.0)))]),
        // A field running past its message, and a message running past the body.
        framed(&[ld(4, &[ld(1, b"").as_slice(), &[0x12, 0x05]].concat())]),
        framed(&[ld(4, &[0x31, 1, 2, 3])]),
        framed(&[vec![0x0a, 0x03, b'a']]),
        vec![5, 0x0a, 0x03],
    ];
    for case in &cases {
        assert_same_class(case, &d);
    }
    // Limits, in the owned decoder's order of checks.
    let body = delimited::encode(&generated(7));
    let owned = delimited::decode(&body, &d).unwrap();
    let series: usize = owned.iter().map(|f| f.metric.len()).sum();
    for limits in [
        Limits {
            max_total_bytes: body.len() - 1,
            ..d
        },
        Limits {
            max_families: owned.len() - 1,
            ..d
        },
        Limits {
            max_series: series.saturating_sub(1),
            ..d
        },
        Limits {
            max_message_bytes: 3,
            ..d
        },
    ] {
        assert_same_class(&body, &limits);
        assert_ne!(class(&count_series(&body, &limits)), "ok");
    }
}

/// A body whose message at `level` (0 the family, 1 a metric, 2 a label or summary, 3 a
/// quantile) carries an unknown group nested `depth` deep.
fn nested_groups(level: usize, summary: bool, depth: usize) -> Vec<u8> {
    let mut message = Vec::new();
    for _ in 0..depth {
        message.extend(key(9, 3));
    }
    for _ in 0..depth {
        message.extend(key(9, 4));
    }
    let wrappers: [u32; 3] = if summary { [4, 4, 3] } else { [4, 1, 0] };
    for &tag in wrappers.iter().take(level).rev() {
        message = ld(tag, &message);
    }
    framed(&[message])
}

#[test]
fn unknown_groups_stop_at_prosts_recursion_limit() {
    // Prost's limit is 100 levels counted from the family; where it falls is the point.
    for (level, summary, deepest) in [
        (0, false, 100),
        (1, false, 99),
        (2, false, 98),
        (2, true, 98),
        (3, true, 97),
    ] {
        let mut accepted = None;
        for depth in 90..110 {
            let body = nested_groups(level, summary, depth);
            assert_same_class(&body, &Limits::default());
            if delimited::decode(&body, &Limits::default()).is_ok() {
                accepted = Some(depth);
            }
        }
        assert_eq!(accepted, Some(deepest), "level {level}");
    }
    let unterminated = framed(&[ld(4, &key(9, 3))]);
    assert_same_class(&unterminated, &Limits::default());
}

#[test]
fn mutated_bodies_never_panic_and_agree_with_the_owned_decoder() {
    let mut r = Rng(0x853c_49e6_748f_ea9b);
    let bases = [
        delimited::encode(&generated(3)),
        delimited::encode(&generated(11)),
        FEDERATE_PB.get(..2000).unwrap().to_vec(),
    ];
    let tight = Limits {
        max_message_bytes: 1 << 12,
        max_total_bytes: 1 << 14,
        max_families: 6,
        max_series: 12,
    };
    for i in 0..4000 {
        let mut body = bases[i % bases.len()].clone();
        for _ in 0..=r.below(4) {
            let at = r.below(body.len() as u64) as usize;
            match r.below(3) {
                0 => body[at] = r.next() as u8,
                1 => body.truncate(at),
                _ => body.insert(at, r.next() as u8),
            }
            if body.is_empty() {
                break;
            }
        }
        assert_same_class(&body, &unlimited());
        assert_same_class(&body, &tight);
        // Whatever the views are asked, they answer without panicking.
        for family in families(&body, &unlimited()).flatten() {
            let mut out = Vec::new();
            let _ = write_family_without_timestamps(&mut out, &family);
            for metric in family.metrics().flatten() {
                let _ = metric.labels().count();
                let _ = metric.value_for(MetricType::Summary);
                if let Value::Histogram(h) = metric.value {
                    let _ = h.buckets().count();
                }
            }
        }
    }
}

/// Decodes, clears every timestamp, encodes: what `/federate` served in protobuf before.
fn without_timestamps_by_prost(body: &[u8]) -> Vec<u8> {
    let mut families = delimited::decode(body, &unlimited()).unwrap();
    for family in &mut families {
        for metric in &mut family.metric {
            metric.timestamp_ms = None;
        }
    }
    delimited::encode(&families)
}

fn without_timestamps_by_views(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for family in families(body, &unlimited()) {
        write_family_without_timestamps(&mut out, &family.unwrap()).unwrap();
    }
    out
}

#[test]
fn dropping_timestamps_byte_by_byte_equals_prosts_decode_clear_encode() {
    let mut bodies = vec![METRICS_PB.to_vec(), FEDERATE_PB.to_vec()];
    for seed in 1..200u64 {
        bodies.push(delimited::encode(&generated(seed * 7919)));
    }
    for body in &bodies {
        let ours = without_timestamps_by_views(body);
        let prost = without_timestamps_by_prost(body);
        // Prost writes canonical bytes, so re-encoding ours must give exactly its bytes.
        assert_eq!(
            delimited::encode(&delimited::decode(&ours, &unlimited()).unwrap()),
            prost
        );
        // Canonical input (as stored uploads are) is rewritten to exactly prost's bytes.
        assert_eq!(ours, prost);
    }
    // Unknown fields are kept; the result still decodes to prost's families.
    let u = unknown_fields();
    let metric = [
        varint_field(6, 1),
        u.clone(),
        label("a", "b"),
        varint_field(6, 300),
    ]
    .concat();
    let body = framed(&[[ld(1, b"x"), ld(4, &metric), u, ld(4, &metric)].concat()]);
    let ours = without_timestamps_by_views(&body);
    assert_ne!(ours, without_timestamps_by_prost(&body));
    assert_eq!(
        delimited::encode(&delimited::decode(&ours, &unlimited()).unwrap()),
        without_timestamps_by_prost(&body)
    );
    assert!(count_series(&ours, &unlimited()).is_ok());
    // An invalid family is refused whole and nothing is written.
    let bad = framed(&[ld(4, &label("a", "\u{e9}").replace_last_byte(0xff))]);
    let family = families(&bad, &unlimited()).next().unwrap().unwrap();
    let mut out = vec![1];
    assert!(matches!(
        write_family_without_timestamps(&mut out, &family),
        Err(DecodeError::Invalid(_))
    ));
    assert_eq!(out, [1]);
}

/// Asserts that every family of `body` is written as text byte for byte as the owned
/// decoding is, with and without timestamps (errors included).
fn assert_same_text(body: &[u8]) {
    let owned = delimited::decode(body, &unlimited()).unwrap();
    let views: Vec<_> = families(body, &unlimited()).map(Result::unwrap).collect();
    for timestamps in [false, true] {
        for (o, v) in owned.iter().zip(&views) {
            let (mut want, mut got) = (Vec::new(), Vec::new());
            let (mut want_skipped, mut got_skipped) = Default::default();
            let w = crate::text::write_family_counted(&mut want, o, timestamps, &mut want_skipped);
            let g = crate::text::write_family_view(&mut got, v, timestamps, &mut got_skipped);
            assert_eq!(
                w.map_err(|e| e.kind()),
                g.map_err(|e| e.kind()),
                "{:?}",
                o.name
            );
            assert_eq!(want_skipped, got_skipped, "{:?}", o.name);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            );
            assert_eq!(got, want);
        }
    }
}

#[test]
fn text_from_views_is_byte_identical_to_text_from_the_owned_decoding() {
    assert_same_text(METRICS_PB);
    assert_same_text(FEDERATE_PB);
    for seed in 1..400u64 {
        assert_same_text(&delimited::encode(&generated(seed * 104_729)));
    }
    // Several value fields in one series: the family's own is written.
    let metric = [
        label("a", "x\"\\\n"),
        ld(3, &double(1, 1.0)),
        ld(2, &double(1, 2.5)),
    ]
    .concat();
    let body = framed(&[[ld(1, b"g"), varint_field(3, 1), ld(4, &metric)].concat()]);
    assert_same_text(&body);
    let family = families(&body, &unlimited()).next().unwrap().unwrap();
    let mut text = Vec::new();
    crate::text::write_family_view(&mut text, &family, false, &mut Default::default()).unwrap();
    assert_eq!(
        String::from_utf8(text).unwrap(),
        "# TYPE g gauge\ng{a=\"x\\\"\\\\\\n\"} 2.5\n"
    );
    // A label that is not UTF-8 is an error, not a panic or a lossy write.
    let bad = framed(&[[
        ld(1, b"g"),
        ld(
            4,
            &[label("a", "\u{e9}").replace_last_byte(0xff), ld(5, b"")].concat(),
        ),
    ]
    .concat()]);
    let family = families(&bad, &unlimited()).next().unwrap().unwrap();
    let err =
        crate::text::write_family_view(&mut Vec::new(), &family, false, &mut Default::default())
            .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn newest_timestamp_is_the_largest_the_owned_decoding_holds() {
    let mut bodies = vec![METRICS_PB.to_vec(), FEDERATE_PB.to_vec(), Vec::new()];
    for seed in 1..200u64 {
        bodies.push(delimited::encode(&generated(seed * 31)));
    }
    for body in &bodies {
        let owned = delimited::decode(body, &unlimited()).unwrap();
        let want = owned
            .iter()
            .flat_map(|f| &f.metric)
            .filter_map(|m| m.timestamp_ms)
            .max();
        assert_eq!(newest_timestamp(body).unwrap(), want);
    }
    // Series without one do not count; a repeated field counts its last value; a negative
    // timestamp is one too.
    let metric = [varint_field(6, 900), label("a", "b"), varint_field(6, 7)].concat();
    let body = framed(&[[ld(4, &metric), ld(4, &label("c", "d"))].concat()]);
    assert_eq!(newest_timestamp(&body).unwrap(), Some(7));
    let body = framed(&[ld(4, &varint_field(6, (-5i64) as u64))]);
    assert_eq!(newest_timestamp(&body).unwrap(), Some(-5));
    assert_eq!(
        newest_timestamp(&framed(&[ld(4, &label("a", "b"))])).unwrap(),
        None
    );
    // A body cut short is an error, not a guess.
    let whole = delimited::encode(&generated(3));
    assert!(newest_timestamp(&whole[..whole.len() - 1]).is_err());
}

trait ReplaceLastByte {
    fn replace_last_byte(self, b: u8) -> Vec<u8>;
}

impl ReplaceLastByte for Vec<u8> {
    fn replace_last_byte(mut self, b: u8) -> Vec<u8> {
        if let Some(last) = self.last_mut() {
            *last = b;
        }
        self
    }
}

#[test]
fn encoded_messages_are_unchanged_by_prost() {
    // The generator's families survive an encode/decode round trip, so agreement above is
    // about real content, not about what prost drops.
    let families = generated(42);
    let body = delimited::encode(&families);
    let back = delimited::decode(&body, &Limits::default()).unwrap();
    let bytes = |f: &[MetricFamily]| f.iter().map(Message::encode_to_vec).collect::<Vec<_>>();
    assert_eq!(bytes(&back), bytes(&families));
}

/// `label_unchecked_name` leaves a short label's name to its caller, and otherwise checks
/// every name field as prost does (an earlier name field that is not UTF-8 is refused even when
/// a later one replaces it).
#[test]
fn unchecked_names_are_only_those_written_the_usual_way() {
    fn labels_of(label: &[u8]) -> Vec<u8> {
        let mut metric = Vec::new();
        metric.push(0x0a);
        put_varint(&mut metric, label.len() as u64);
        metric.extend_from_slice(label);
        metric
    }
    let read = |metric: &[u8]| -> Vec<Result<(Vec<u8>, String), ()>> {
        let view = super::parse::parse_metric(metric, super::parse::ALL_KINDS).unwrap();
        view.label_messages()
            .map(|m| {
                m.and_then(|m| super::label_unchecked_name(m))
                    .map(|(n, v)| (n.to_vec(), v.to_string()))
                    .map_err(|_| ())
            })
            .collect()
    };
    // Short: the name as it is, the value checked.
    let short = labels_of(&[0x0a, 2, 0xff, b'a', 0x12, 1, b'v']);
    assert_eq!(read(&short), vec![Ok((vec![0xff, b'a'], "v".to_string()))]);
    let bad_value = labels_of(&[0x0a, 1, b'a', 0x12, 1, 0xff]);
    assert_eq!(read(&bad_value), vec![Err(())]);
    // The name given twice: the general reading, which checks each occurrence.
    let twice = labels_of(&[0x0a, 1, 0xff, 0x0a, 1, b'b', 0x12, 1, b'v']);
    assert_eq!(read(&twice), vec![Err(())]);
    let twice_ok = labels_of(&[0x0a, 1, b'a', 0x0a, 1, b'b', 0x12, 1, b'v']);
    assert_eq!(read(&twice_ok), vec![Ok((b"b".to_vec(), "v".to_string()))]);
    // Value first, then name: the general reading too; the same label as `labels` reads it.
    let swapped = labels_of(&[0x12, 1, b'v', 0x0a, 1, b'a']);
    assert_eq!(read(&swapped), vec![Ok((b"a".to_vec(), "v".to_string()))]);
    let view = super::parse::parse_metric(&swapped, super::parse::ALL_KINDS).unwrap();
    assert_eq!(view.labels().next().unwrap().unwrap(), ("a", "v"));
}

/// A series' value and timestamp are read without the general reader when written as every
/// encoder writes them, and its labels' readers stop after its leading run of labels: in any
/// other order of its fields (labels after the value or the timestamp, the timestamp first, a
/// value written another way, fields repeated, a kind the family does not call for, a bad
/// varint) every view still reads what prost decodes.
#[test]
fn a_series_reads_as_prost_decodes_it_in_any_field_order() {
    fn field(key: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![key];
        put_varint(&mut out, bytes.len() as u64);
        out.extend_from_slice(bytes);
        out
    }
    let label = |name: &str, value: &str| {
        let mut pair = field(0x0a, name.as_bytes());
        pair.extend(field(0x12, value.as_bytes()));
        field(0x0a, &pair)
    };
    let simple = |key: u8, v: f64| {
        let mut inner = vec![0x09];
        inner.extend_from_slice(&v.to_le_bytes());
        field(key, &inner)
    };
    let timestamp = |ms: u64| {
        let mut out = vec![0x30];
        put_varint(&mut out, ms);
        out
    };
    let (a, b) = (label("a", "1"), label("job", "node"));
    let (gauge, counter, untyped) = (simple(0x12, 1.5), simple(0x1a, 2.5), simple(0x2a, 3.5));
    let ts = timestamp(1_700_000_000_123);
    // A gauge whose double is given twice (the last wins), and one with no value at all.
    let mut twice = vec![0x09];
    twice.extend_from_slice(&4.5f64.to_le_bytes());
    twice.push(0x09);
    twice.extend_from_slice(&5.5f64.to_le_bytes());
    let gauge_twice = field(0x12, &twice);
    let gauge_empty = field(0x12, &[]);
    let histogram = field(0x3a, &[0x08, 3, 0x1a, 2, 0x08, 1]);
    let layouts: Vec<Vec<&[u8]>> = vec![
        vec![&a, &b, &gauge, &ts],
        vec![&a, &gauge, &ts, &b],
        vec![&a, &gauge, &b, &ts],
        vec![&ts, &gauge, &a, &b],
        vec![&a, &b, &ts, &gauge],
        vec![&gauge, &a, &ts],
        vec![&a, &counter, &ts],
        vec![&a, &untyped, &ts],
        vec![&a, &gauge, &gauge_empty, &ts],
        vec![&a, &gauge, &gauge_twice, &ts],
        vec![&a, &gauge_twice, &ts],
        vec![&a, &gauge, &counter, &ts],
        vec![&a, &gauge, &ts, &ts],
        vec![&a, &b, &gauge],
        vec![&a, &b, &ts],
        vec![&a, &b],
        vec![&a, &histogram, &ts, &b],
        vec![&gauge],
        vec![],
    ];
    for (i, layout) in layouts.iter().enumerate() {
        let metric = layout.concat();
        let mut family = field(0x0a, b"f");
        family.extend(field(0x22, &metric));
        let mut body = Vec::new();
        put_varint(&mut body, family.len() as u64);
        body.extend_from_slice(&family);
        let owned = assert_agree(&body);
        let view = super::parse::parse_metric(&metric, super::parse::ALL_KINDS).unwrap();
        let count = owned[0].metric[0].label.len();
        assert_eq!(view.label_messages().count(), count, "layout {i}");
        assert_eq!(view.label_bytes().count(), count, "layout {i}");
    }
    // Timestamps of every varint length, last in the series or not.
    for shift in 0..64 {
        for ms in [1u64 << shift, (1u64 << shift) - 1, u64::MAX >> shift] {
            for metric in [
                [&a[..], &gauge[..], &timestamp(ms)[..]].concat(),
                [&a[..], &gauge[..], &timestamp(ms)[..], &b[..]].concat(),
            ] {
                let mut family = field(0x0a, b"f");
                family.extend(field(0x22, &metric));
                let mut body = Vec::new();
                put_varint(&mut body, family.len() as u64);
                body.extend_from_slice(&family);
                assert_agree(&body);
            }
        }
    }
    // A timestamp whose varint runs past the series is refused, however it is reached.
    let mut bad = [&a[..], &gauge[..], &[0x30, 0x80, 0x80][..]].concat();
    assert!(super::parse::parse_metric(&bad, super::parse::ALL_KINDS).is_err());
    bad.truncate(a.len() + gauge.len() + 1);
    assert!(super::parse::parse_metric(&bad, super::parse::ALL_KINDS).is_err());
    // A varint of ten bytes that overflows 64 bits, as prost refuses it.
    let overflow = [&a[..], &gauge[..], &[0x30][..], &[0xff; 9][..], &[0x02][..]].concat();
    assert!(super::parse::parse_metric(&overflow, super::parse::ALL_KINDS).is_err());
    assert!(Metric::decode(&overflow[..]).is_err());
    // A value's message cut short is refused too.
    let cut = [&a[..], &gauge[..gauge.len() - 1]].concat();
    assert!(super::parse::parse_metric(&cut, super::parse::ALL_KINDS).is_err());
}

/// What [`family_heads`] and a full read of each family's series accept, [`families`] accepts
/// too, with the same name, help, type and series; and a family field among the series (which
/// [`families`] reads, and which may change the family) is always reported.
fn assert_heads_agree(body: &[u8], limits: &Limits) {
    let mut whole = families(body, limits);
    for head in family_heads(body, limits) {
        let view = whole.next();
        let Ok(head) = head else {
            return;
        };
        let mut metrics = head.metrics();
        let series: Vec<_> = metrics.by_ref().collect();
        if series.iter().any(Result::is_err) || metrics.read_family_field() {
            return;
        }
        let view = view.expect("a family").expect("a valid family");
        assert_eq!(
            (head.family.name, head.family.help, head.family.raw_type),
            (view.name, view.help, view.raw_type)
        );
        assert_eq!(head.family.message, view.message);
        let again: Vec<_> = view.metrics().collect::<Result<_, _>>().expect("series");
        assert_eq!(series.len(), again.len());
        for (a, b) in series.iter().flatten().zip(&again) {
            assert_eq!((a.message, a.timestamp_ms), (b.message, b.timestamp_ms));
        }
    }
    assert!(whole.next().is_none(), "families reads more families");
}

#[test]
fn family_heads_read_as_families_unless_a_family_field_comes_among_the_series() {
    for seed in 0..40 {
        let body = delimited::encode(&generated(seed));
        assert_heads_agree(&body, &unlimited());
        // Encoders write a family's own fields first: none is found among the series.
        for head in family_heads(&body, &unlimited()) {
            let mut metrics = head.expect("head").metrics();
            assert!(metrics.by_ref().all(|m| m.is_ok()));
            assert!(!metrics.read_family_field(), "{seed}");
        }
    }
    for fixture in [METRICS_PB, FEDERATE_PB] {
        assert_heads_agree(fixture, &unlimited());
    }
    // Each family field after a series, valid or not, is reported; unknown fields are not.
    let series = ld(
        4,
        &[label("a", "b"), ld(2, &double(1, 1.0)), varint_field(6, 5)].concat(),
    );
    let late = |after: Vec<u8>| {
        let body = framed(&[[ld(1, b"up"), varint_field(3, 1), series.clone(), after].concat()]);
        let head = family_heads(&body, &unlimited())
            .next()
            .expect("a family")
            .expect("a head");
        assert_eq!((head.family.name, head.family.raw_type), ("up", Some(1)));
        let mut metrics = head.metrics();
        assert_eq!(metrics.by_ref().filter(Result::is_ok).count(), 1);
        assert_heads_agree(&body, &unlimited());
        metrics.read_family_field()
    };
    assert!(late(ld(1, b"down")));
    assert!(late(ld(2, b"help")));
    assert!(late(varint_field(3, 2)));
    assert!(late(varint_field(1, 7)));
    assert!(late(ld(2, b"\xff")));
    assert!(!late(Vec::new()));
    assert!(!late(unknown_fields()));
    // Mutated bodies: whatever the heads and their series accept, `families` accepts alike.
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let bases = [
        delimited::encode(&generated(5)),
        framed(&[[ld(1, b"up"), series.clone(), ld(2, b"h"), series.clone()].concat()]),
    ];
    for i in 0..4000 {
        let mut body = bases[i % bases.len()].clone();
        for _ in 0..=r.below(4) {
            let at = r.below(body.len() as u64) as usize;
            match r.below(3) {
                0 => body[at] = r.next() as u8,
                1 => body.truncate(at),
                _ => body.insert(at, r.next() as u8),
            }
            if body.is_empty() {
                break;
            }
        }
        assert_heads_agree(&body, &unlimited());
    }
}

/// [`Metrics::next_series`] reads each series as [`Metrics::next`] does, and [`Series::finish`]
/// says the labels [`Series::next_label`] gave are all of them only when they are: not when the
/// caller stopped before the run's end, nor when a label comes after it or is written otherwise.
#[test]
fn series_read_labels_first_read_as_the_series_iterator_reads_them() {
    let check = |body: &[u8]| {
        for (family, stop) in families(body, &unlimited())
            .flatten()
            .zip([usize::MAX, 1].iter().cycle())
        {
            let mut series = family.metrics();
            for view in family.metrics() {
                let next = series.next_series().expect("as many series");
                let (Ok(view), Ok(mut next)) = (view, next) else {
                    continue;
                };
                let given: Vec<&[u8]> = std::iter::from_fn(|| next.next_label())
                    .take(*stop)
                    .collect();
                let (read, all_given) = next.finish().expect("the same series");
                assert_eq!(
                    (read.message, read.timestamp_ms),
                    (view.message, view.timestamp_ms)
                );
                assert_eq!(read.labels, view.labels);
                assert_eq!(format!("{:?}", read.value), format!("{:?}", view.value));
                let all: Vec<&[u8]> = view
                    .label_messages()
                    .collect::<Result<_, _>>()
                    .expect("labels");
                assert_eq!(all_given, given == all, "{given:?} {all:?}");
            }
            assert!(series.next_series().is_none());
        }
    };
    for seed in 0..40 {
        check(&delimited::encode(&generated(seed)));
    }
    check(FEDERATE_PB);
    // A label after the value, one too long for the run, one in another layout.
    let value = ld(2, &double(1, 1.0));
    let long = "v".repeat(200);
    for series in [
        [label("a", "b"), value.clone(), label("c", "d")].concat(),
        [label("a", "b"), label("c", &long), value.clone()].concat(),
        [
            label("a", "b"),
            ld(1, &[ld(2, b"d"), ld(1, b"c")].concat()),
            value.clone(),
        ]
        .concat(),
        [
            label("a", "b"),
            label("c", "d"),
            value.clone(),
            varint_field(6, 9),
        ]
        .concat(),
        [value.clone()].concat(),
    ] {
        check(&framed(&[
            [ld(1, b"up"), ld(4, &series), ld(4, &series)].concat()
        ]));
    }
}

/// Buckets and quantiles written the usual way are read without the general field reader; every
/// other layout (fields swapped, repeated, absent or unknown, varints of every length, a byte too
/// many or too few) still reads, or is refused, as prost decodes it.
#[test]
fn buckets_and_quantiles_read_as_prost_reads_them_in_any_layout() {
    let mut ten = Vec::new();
    put_varint(&mut ten, u64::MAX);
    let layouts = |first: u8| -> Vec<Vec<u8>> {
        let count = |v: u64| {
            if first == 1 {
                varint_field(1, v)
            } else {
                double(1, v as f64 / 3.0)
            }
        };
        vec![
            [count(7), double(2, 0.25)].concat(),
            [count(0), double(2, f64::INFINITY)].concat(),
            [count(1 << 62), double(2, -1.0)].concat(),
            [count(u64::MAX), double(2, 2.5)].concat(),
            [count(300), double(2, 1.0)].concat(),
            [double(2, 0.5), count(3)].concat(),
            [count(3)].concat(),
            [double(2, 0.5)].concat(),
            Vec::new(),
            [count(3), double(2, 0.5), count(4)].concat(),
            [count(3), double(2, 0.5), double(2, 0.75)].concat(),
            [count(3), varint_field(9, 1), double(2, 0.5)].concat(),
            [count(3), double(2, 0.5), varint_field(9, 1)].concat(),
            // Wrong wire types and cut or overlong bytes: refused by both.
            [double(1, 3.0), varint_field(2, 5)].concat(),
            [count(3), double(2, 0.5)].concat()[..8].to_vec(),
            [count(3), double(2, 0.5), vec![0x11]].concat(),
            [key(1, 0), ten.clone(), double(2, 0.5)].concat(),
            [key(1, 0), vec![0xff; 10], vec![0x01], double(2, 0.5)].concat(),
        ]
    };
    for (field, first) in [(7u32, 1u8), (4, 2)] {
        for item in layouts(first) {
            let value = [
                varint_field(1, 5),
                double(2, 1.5),
                ld(3, &item),
                ld(3, &item),
            ]
            .concat();
            let metric = [label("a", "b"), ld(field, &value), varint_field(6, 9)].concat();
            let kind = if field == 7 { 4 } else { 2 };
            let body = framed(&[[ld(1, b"h"), varint_field(3, kind), ld(4, &metric)].concat()]);
            assert_same_class(&body, &unlimited());
            if delimited::decode(&body, &unlimited()).is_ok() {
                assert_agree(&body);
            } else {
                // The views refuse it where its items are read.
                let family = families(&body, &unlimited()).next().unwrap().unwrap();
                let metric = family.metrics().next().unwrap().unwrap();
                let refused = match metric.value {
                    Value::Histogram(h) => h.buckets().any(|b| b.is_err()),
                    Value::Summary(s) => s.quantiles().any(|q| q.is_err()),
                    _ => true,
                };
                assert!(refused, "{item:?}");
            }
        }
    }
}
