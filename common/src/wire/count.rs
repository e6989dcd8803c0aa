//! Counting what decoding a protobuf-delimited upload would allocate, before decoding it.
//!
//! prost decodes a whole `MetricFamily` message at once, so the decoder's series cap is checked only
//! after every series of the family is in memory. An empty `Metric` is two bytes on the wire and
//! about 200 in memory: 16 MiB of them (about 800 KB snappy-compressed, within the default caps)
//! made the server allocate 1.6 GB before answering 413. Empty label pairs, quantiles and buckets
//! amplify less (24× or so) but the same way. This scan walks the wire format without allocating
//! and counts the repeated messages of the schema, so the caps hold before prost runs.
//!
//! The scan is lenient: on anything malformed it stops and returns what it counted; the real
//! decoder then reports the error. It walks messages with `Fields`, the reader prost's rules are
//! written down in once, so it skips exactly what prost skips (unknown groups included) and stops
//! where prost would refuse: what it counts is what decoding would build up to that point.
//!
//! (Moved from the server's `prescan.rs`, whose lenient third varint walker was never checked
//! against prost; the server switches to this one at merge.)

use std::mem::size_of;

use crate::model::{Bucket, LabelPair, Metric, Quantile};

use super::fields::{length_prefix, Fields, Wire};
use super::{FAMILY_DEPTH, METRIC_DEPTH, VALUE_DEPTH};

/// The heap a short string costs beyond its bytes: glibc's smallest chunk is 32 bytes.
const SMALL_STRING_BYTES: usize = 32;

/// The repeated messages a body holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// `MetricFamily.metric` elements (series).
    pub series: usize,
    /// `Metric.label` elements.
    pub labels: usize,
    /// `Summary.quantile` elements.
    pub quantiles: usize,
    /// `Histogram.bucket` elements.
    pub buckets: usize,
}

impl Counts {
    /// Bytes of the structs decoding would allocate for labels, quantiles and buckets (strings
    /// aside, which are bounded by the body's size): what the fast path's element cap counts.
    pub fn element_bytes(&self) -> usize {
        self.labels
            .saturating_mul(size_of::<LabelPair>())
            .saturating_add(self.quantiles.saturating_mul(size_of::<Quantile>()))
            .saturating_add(self.buckets.saturating_mul(size_of::<Bucket>()))
    }
}

impl Counts {
    /// Bytes decoding would allocate at most, strings' own bytes aside (they are bounded by the
    /// body's size): every element's struct twice (vectors grow by doubling), and a label's two
    /// strings at the allocator's smallest chunk each.
    pub fn decode_bytes(&self) -> usize {
        let label = 2 * size_of::<LabelPair>() + 2 * SMALL_STRING_BYTES;
        self.labels
            .saturating_mul(label)
            .saturating_add(self.series.saturating_mul(2 * size_of::<Metric>()))
            .saturating_add(self.quantiles.saturating_mul(2 * size_of::<Quantile>()))
            .saturating_add(self.buckets.saturating_mul(2 * size_of::<Bucket>()))
    }
}

/// Upper bounds of what the text parser would build from `body`: no more series than lines, no
/// more label pairs than `=` signs. One pass, no allocation.
pub fn count_text(body: &[u8]) -> Counts {
    let (mut lines, mut equals) = (1usize, 0usize);
    for &byte in body {
        lines += usize::from(byte == b'\n');
        equals += usize::from(byte == b'=');
    }
    Counts {
        series: lines,
        labels: equals,
        ..Counts::default()
    }
}

/// Field numbers of the repeated messages, per message type.
const FAMILY_METRIC: u32 = 4;
const METRIC_LABEL: u32 = 1;
const METRIC_SUMMARY: u32 = 4;
const METRIC_HISTOGRAM: u32 = 7;
const SUMMARY_QUANTILE: u32 = 3;
const HISTOGRAM_BUCKET: u32 = 3;

/// Counts the repeated messages of a protobuf-delimited body of `MetricFamily` messages.
pub fn count(body: &[u8]) -> Counts {
    let mut counts = Counts::default();
    let mut rest = body;
    while !rest.is_empty() {
        let Ok((size, prefix)) = length_prefix(rest) else {
            break;
        };
        let after = rest.get(prefix..).unwrap_or_default();
        let Some(message) = usize::try_from(size).ok().and_then(|n| after.get(..n)) else {
            break;
        };
        each_message_field(message, FAMILY_DEPTH, |field, sub| {
            if field == FAMILY_METRIC {
                counts.series += 1;
                metric(sub, &mut counts);
            }
        });
        rest = after.get(message.len()..).unwrap_or_default();
    }
    counts
}

fn metric(message: &[u8], counts: &mut Counts) {
    each_message_field(message, METRIC_DEPTH, |field, sub| match field {
        METRIC_LABEL => counts.labels += 1,
        METRIC_SUMMARY => each_message_field(sub, VALUE_DEPTH, |f, _| {
            if f == SUMMARY_QUANTILE {
                counts.quantiles += 1;
            }
        }),
        METRIC_HISTOGRAM => each_message_field(sub, VALUE_DEPTH, |f, _| {
            if f == HISTOGRAM_BUCKET {
                counts.buckets += 1;
            }
        }),
        _ => {}
    });
}

/// Calls `on_field(field number, bytes)` for every length-delimited field of `message` (read at
/// prost's recursion budget `depth`), skipping the others, unknown groups included; stops at the
/// first malformed byte.
fn each_message_field(message: &[u8], depth: u32, mut on_field: impl FnMut(u32, &[u8])) {
    let mut fields = Fields::new(message, depth);
    while let Ok(Some((field, wire))) = fields.next() {
        if let Wire::Bytes(bytes) = wire {
            on_field(field, bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delimited;
    use crate::model::{Gauge, Histogram, Metric, MetricFamily, MetricType, Summary};

    fn family(series: usize, labels: usize) -> MetricFamily {
        MetricFamily {
            name: Some("m".into()),
            help: Some("help".into()),
            r#type: Some(MetricType::Gauge as i32),
            metric: (0..series)
                .map(|i| Metric {
                    label: (0..labels)
                        .map(|l| LabelPair::new(&format!("l{l}"), &i.to_string()))
                        .collect(),
                    gauge: Some(Gauge { value: Some(1.0) }),
                    timestamp_ms: Some(1_700_000_000_000),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn counts_what_the_decoder_would_build() {
        let mut summary = family(1, 1);
        summary.metric[0].summary = Some(Summary {
            quantile: vec![Quantile::default(); 3],
            ..Default::default()
        });
        let mut histogram = family(2, 0);
        histogram.metric[1].histogram = Some(Histogram {
            bucket: vec![Bucket::default(); 5],
            ..Default::default()
        });
        let body = delimited::encode(&[family(3, 2), summary, histogram]);
        assert_eq!(
            count(&body),
            Counts {
                series: 6,
                labels: 7,
                quantiles: 3,
                buckets: 5
            }
        );
    }

    #[test]
    fn text_counts_bound_what_the_parser_builds() {
        let body = b"# HELP m help\n# TYPE m gauge\nm{a=\"1\",b=\"\"} 1\nm{a=\"2\"} 2\n";
        let counts = count_text(body);
        let parsed = crate::text::parse(body, &Default::default()).unwrap();
        let labels: usize = parsed
            .iter()
            .flat_map(|f| &f.metric)
            .map(|m| m.label.len())
            .sum();
        let series: usize = parsed.iter().map(|f| f.metric.len()).sum();
        assert!(
            counts.labels >= labels && counts.series >= series,
            "{counts:?}"
        );
        assert_eq!((counts.labels, counts.series), (3, 5));
    }

    #[test]
    fn decode_bytes_cover_the_structs_and_small_strings() {
        let counts = Counts {
            series: 1,
            labels: 2,
            quantiles: 0,
            buckets: 0,
        };
        assert!(
            counts.decode_bytes() >= 2 * size_of::<Metric>() + 4 * size_of::<LabelPair>() + 128
        );
    }

    #[test]
    fn empty_series_are_counted_without_being_built() {
        let mut message = vec![0x0a, 1, b'm'];
        for _ in 0..1000 {
            message.extend_from_slice(&[0x22, 0]);
        }
        let mut body = vec![0xd3, 0x0f]; // 2003 as a varint
        assert_eq!(message.len(), 2003);
        body.extend_from_slice(&message);
        let counts = count(&body);
        assert_eq!(counts.series, 1000);
    }

    #[test]
    fn labels_after_an_unknown_group_are_counted_as_prost_decodes_them() {
        // A series: an unknown field 15 as a group (holding a varint and a nested group), then
        // 200 labels. prost skips the group and decodes the labels.
        let mut metric = vec![0x7b, 0x08, 0x01, 0x1b, 0x1c, 0x7c];
        for _ in 0..200 {
            metric.extend_from_slice(&[0x0a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b'][..]);
        }
        let mut family = vec![0x0a, 1, b'm', 0x22];
        let mut len = Vec::new();
        let mut n = metric.len();
        while n >= 0x80 {
            len.push((n as u8) | 0x80);
            n >>= 7;
        }
        len.push(n as u8);
        family.extend_from_slice(&len);
        family.extend_from_slice(&metric);
        let mut body = Vec::new();
        let mut n = family.len();
        while n >= 0x80 {
            body.push((n as u8) | 0x80);
            n >>= 7;
        }
        body.push(n as u8);
        body.extend_from_slice(&family);
        let families = delimited::decode(&body, &Default::default()).unwrap();
        assert_eq!(families[0].metric[0].label.len(), 200);
        let counts = count(&body);
        assert_eq!((counts.series, counts.labels), (1, 200));
    }

    #[test]
    fn malformed_input_stops_the_scan_without_panicking() {
        let body = delimited::encode(&[family(4, 1)]);
        for cut in 0..body.len() {
            let counts = count(&body[..cut]);
            assert!(
                counts.series <= 4 && counts.labels <= 4,
                "{cut}: {counts:?}"
            );
        }
        assert_eq!(count(&[0xff; 11]), Counts::default());
        assert_eq!(count(&[0x05, 0x0b, 0, 0, 0, 0]), Counts::default());
        assert_eq!(count(b""), Counts::default());
    }

    #[test]
    fn counts_match_what_prost_decodes_from_prometheus_bodies() {
        for body in [
            &include_bytes!("../../../tests/fixtures/prometheus-metrics.pb")[..],
            &include_bytes!("../../../tests/fixtures/prometheus-federate.pb")[..],
        ] {
            let families = delimited::decode(body, &Default::default()).unwrap();
            let metrics = || families.iter().flat_map(|f| &f.metric);
            let want = Counts {
                series: metrics().count(),
                labels: metrics().map(|m| m.label.len()).sum(),
                quantiles: metrics()
                    .filter_map(|m| m.summary.as_ref())
                    .map(|s| s.quantile.len())
                    .sum(),
                buckets: metrics()
                    .filter_map(|m| m.histogram.as_ref())
                    .map(|h| h.bucket.len())
                    .sum(),
            };
            assert!(want.series > 0);
            assert_eq!(count(body), want);
        }
    }
}
