//! Protobuf-delimited `MetricFamily` streams: each message prefixed by its length as a varint.
//!
//! The reader enforces hard limits before it allocates, so a hostile body can neither panic it nor
//! make it allocate more than the limits allow.

use crate::model::MetricFamily;
use crate::wire::fields::length_prefix;
use prost::Message;
use std::fmt;

/// Caps on what one decoded body may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest single message, in bytes.
    pub max_message_bytes: usize,
    /// Largest whole body, in bytes.
    pub max_total_bytes: usize,
    /// Most families in one body.
    pub max_families: usize,
    /// Most series (metrics) over all families in one body.
    pub max_series: usize,
}

impl Default for Limits {
    /// 4 MiB per message, 16 MiB in all, 10,000 families, 100,000 series.
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 << 20,
            max_total_bytes: 16 << 20,
            max_families: 10_000,
            max_series: 100_000,
        }
    }
}

/// Why a protobuf-delimited body could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// The body ends inside a length prefix or a message.
    Truncated,
    /// A length prefix is longer than 10 bytes or does not fit in 64 bits.
    VarintOverflow,
    /// A message is larger than `Limits::max_message_bytes`.
    MessageTooLarge {
        /// The declared size.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// The body is larger than `Limits::max_total_bytes`.
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// More families than `Limits::max_families`.
    TooManyFamilies {
        /// The limit.
        limit: usize,
    },
    /// More series than `Limits::max_series`.
    TooManySeries {
        /// The limit.
        limit: usize,
    },
    /// A message is not a valid `MetricFamily`.
    Invalid(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("body ends inside a message"),
            DecodeError::VarintOverflow => f.write_str("message length prefix overflows 64 bits"),
            DecodeError::MessageTooLarge { size, limit } => {
                write!(f, "message of {size} bytes exceeds the limit of {limit}")
            }
            DecodeError::TooLarge { limit } => write!(f, "body exceeds the limit of {limit} bytes"),
            DecodeError::TooManyFamilies { limit } => {
                write!(f, "more than {limit} metric families")
            }
            DecodeError::TooManySeries { limit } => write!(f, "more than {limit} series"),
            DecodeError::Invalid(why) => write!(f, "invalid MetricFamily message: {why}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes every family of a protobuf-delimited body, enforcing `limits`.
pub fn decode(body: &[u8], limits: &Limits) -> Result<Vec<MetricFamily>, DecodeError> {
    if body.len() > limits.max_total_bytes {
        return Err(DecodeError::TooLarge {
            limit: limits.max_total_bytes,
        });
    }
    let mut families = Vec::new();
    let mut series = 0usize;
    let mut rest = body;
    while !rest.is_empty() {
        let (size, prefix) = length_prefix(rest)?;
        // Every check happens on the declared size before prost sees (and allocates for) the message.
        if size > limits.max_message_bytes as u64 {
            return Err(DecodeError::MessageTooLarge {
                size,
                limit: limits.max_message_bytes,
            });
        }
        let after_prefix = rest.get(prefix..).ok_or(DecodeError::Truncated)?;
        let size = usize::try_from(size).map_err(|_| DecodeError::Truncated)?;
        let message = after_prefix.get(..size).ok_or(DecodeError::Truncated)?;
        if families.len() >= limits.max_families {
            return Err(DecodeError::TooManyFamilies {
                limit: limits.max_families,
            });
        }
        let family =
            MetricFamily::decode(message).map_err(|e| DecodeError::Invalid(e.to_string()))?;
        series = series.saturating_add(family.metric.len());
        if series > limits.max_series {
            return Err(DecodeError::TooManySeries {
                limit: limits.max_series,
            });
        }
        families.push(family);
        rest = after_prefix.get(size..).unwrap_or_default();
    }
    Ok(families)
}

/// Appends `family` to `out` as one length-prefixed message.
pub fn encode_family(family: &MetricFamily, out: &mut Vec<u8>) {
    // `encode_length_delimited` would size the message a second time; sizing once and writing the
    // prefix ourselves keeps this to one traversal for the length and one for the bytes.
    let len = family.encoded_len();
    out.reserve(len + prost::length_delimiter_len(len));
    // Writing into a Vec cannot run out of room, so neither call can fail.
    let _ = prost::encode_length_delimiter(len, out);
    family.encode_raw(out);
}

/// Encodes all `families` as one protobuf-delimited body.
pub fn encode(families: &[MetricFamily]) -> Vec<u8> {
    let mut out = Vec::new();
    for family in families {
        encode_family(family, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricType, Quantile, Summary,
        Untyped,
    };

    const METRICS_PB: &[u8] = include_bytes!("../../tests/fixtures/prometheus-metrics.pb");

    fn family(name: &str, t: MetricType, metric: Metric) -> MetricFamily {
        MetricFamily {
            name: Some(name.into()),
            help: Some(format!("help of {name} with \\ and \n")),
            r#type: Some(t as i32),
            metric: vec![metric],
        }
    }

    fn every_type() -> Vec<MetricFamily> {
        let labels = vec![LabelPair::new("a", "\"\\\n\u{e9}"), LabelPair::new("b", "")];
        vec![
            family(
                "c",
                MetricType::Counter,
                Metric {
                    label: labels.clone(),
                    counter: Some(Counter { value: Some(0.0) }),
                    timestamp_ms: Some(-1),
                    ..Default::default()
                },
            ),
            family(
                "g",
                MetricType::Gauge,
                Metric {
                    gauge: Some(Gauge {
                        value: Some(f64::NAN),
                    }),
                    ..Default::default()
                },
            ),
            family(
                "u",
                MetricType::Untyped,
                Metric {
                    untyped: Some(Untyped {
                        value: Some(f64::NEG_INFINITY),
                    }),
                    timestamp_ms: Some(i64::MAX),
                    ..Default::default()
                },
            ),
            family(
                "h",
                MetricType::Histogram,
                Metric {
                    label: labels.clone(),
                    histogram: Some(Histogram {
                        sample_count: Some(u64::MAX),
                        sample_sum: Some(f64::INFINITY),
                        bucket: vec![Bucket {
                            cumulative_count: Some(1),
                            upper_bound: Some(0.5),
                        }],
                    }),
                    ..Default::default()
                },
            ),
            family(
                "s",
                MetricType::Summary,
                Metric {
                    summary: Some(Summary {
                        sample_count: Some(3),
                        sample_sum: Some(1.5),
                        quantile: vec![Quantile {
                            quantile: Some(0.5),
                            value: Some(f64::NAN),
                        }],
                    }),
                    ..Default::default()
                },
            ),
        ]
    }

    fn bytes_of(families: &[MetricFamily]) -> Vec<Vec<u8>> {
        families.iter().map(Message::encode_to_vec).collect()
    }

    #[test]
    fn every_type_round_trips() {
        let families = every_type();
        let body = encode(&families);
        let back = decode(&body, &Limits::default()).unwrap();
        // Compared as protobuf bytes so NaN equals itself.
        assert_eq!(bytes_of(&back), bytes_of(&families));
        assert!(back[1].metric[0].gauge.unwrap().value.unwrap().is_nan());
        assert_eq!(back[0].metric[0].label, families[0].metric[0].label);
        // The wire form is a varint length, then the message, for each family.
        assert_eq!(body[0] as usize, families[0].encoded_len());
        assert_eq!(decode(&[], &Limits::default()).unwrap(), vec![]);
    }

    #[test]
    fn encode_family_appends_what_prost_would() {
        let mut out = vec![0xAA];
        for f in every_type() {
            encode_family(&f, &mut out);
        }
        let mut expected = vec![0xAA];
        for f in every_type() {
            f.encode_length_delimited(&mut expected).unwrap();
        }
        assert_eq!(out, expected);
    }

    #[test]
    fn prometheus_fixture_decodes_and_reencodes_identically() {
        let families = decode(METRICS_PB, &Limits::default()).unwrap();
        assert!(families.len() > 100);
        let build = families
            .iter()
            .find(|f| f.name.as_deref() == Some("prometheus_build_info"))
            .unwrap();
        assert_eq!(build.metric_type(), MetricType::Gauge);
        assert_eq!(build.metric[0].label_value("version"), Some("2.42.0+ds"));
        // Compared as protobuf bytes: the fixture has NaN quantiles, and NaN != NaN.
        let again = decode(&encode(&families), &Limits::default()).unwrap();
        assert_eq!(bytes_of(&again), bytes_of(&families));
        // Nothing the Go encoder wrote is lost, except what we do not model at all.
        assert_eq!(encode(&families), METRICS_PB);
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        let body = encode(&every_type());
        let mut boundaries = vec![0];
        let mut at = 0;
        for f in every_type() {
            let len = f.encoded_len();
            at += prost::length_delimiter_len(len) + len;
            boundaries.push(at);
        }
        for cut in 0..body.len() {
            let got = decode(&body[..cut], &Limits::default());
            if boundaries.contains(&cut) {
                assert!(got.is_ok(), "cut at {cut}");
            } else {
                assert_eq!(got, Err(DecodeError::Truncated), "cut at {cut}");
            }
        }
    }

    #[test]
    fn varint_overflow() {
        let d = Limits::default();
        assert_eq!(decode(&[0xff; 11], &d), Err(DecodeError::VarintOverflow));
        assert_eq!(decode(&[0x80; 12], &d), Err(DecodeError::VarintOverflow));
        let mut ten = [0xff; 10];
        ten[9] = 0x02;
        assert_eq!(decode(&ten, &d), Err(DecodeError::VarintOverflow));
        // The largest ten-byte varint is fine as a number, just far too large as a size.
        ten[9] = 0x01;
        assert_eq!(
            decode(&ten, &d),
            Err(DecodeError::MessageTooLarge {
                size: u64::MAX,
                limit: 4 << 20
            })
        );
        assert_eq!(decode(&[0x80, 0x80], &d), Err(DecodeError::Truncated));
    }

    #[test]
    fn huge_declared_length_is_not_allocated() {
        // 1 TiB declared, 3 bytes present: allocating the declared size would abort the test.
        let mut body = Vec::new();
        prost::encode_length_delimiter(1 << 40, &mut body).unwrap();
        body.extend_from_slice(b"abc");
        let unlimited = Limits {
            max_message_bytes: usize::MAX,
            ..Limits::default()
        };
        assert_eq!(decode(&body, &unlimited), Err(DecodeError::Truncated));
        let err = decode(&body, &Limits::default()).unwrap_err();
        assert_eq!(
            err,
            DecodeError::MessageTooLarge {
                size: 1 << 40,
                limit: 4 << 20
            }
        );
        assert_eq!(
            DecodeError::MessageTooLarge {
                size: 5_000_000,
                limit: 4_194_304
            }
            .to_string(),
            "message of 5000000 bytes exceeds the limit of 4194304"
        );
    }

    #[test]
    fn limits_are_enforced() {
        let families = every_type();
        let body = encode(&families);
        let limits = |max_families, max_series, max_total_bytes| Limits {
            max_message_bytes: 1 << 20,
            max_total_bytes,
            max_families,
            max_series,
        };
        assert!(decode(&body, &limits(5, 5, body.len())).is_ok());
        assert_eq!(
            decode(&body, &limits(4, 5, body.len())),
            Err(DecodeError::TooManyFamilies { limit: 4 })
        );
        assert_eq!(
            decode(&body, &limits(5, 4, body.len())),
            Err(DecodeError::TooManySeries { limit: 4 })
        );
        assert_eq!(
            decode(&body, &limits(5, 5, body.len() - 1)),
            Err(DecodeError::TooLarge {
                limit: body.len() - 1
            })
        );
        let first = families[0].encoded_len();
        let tight = Limits {
            max_message_bytes: first - 1,
            ..Limits::default()
        };
        assert_eq!(
            decode(&body, &tight),
            Err(DecodeError::MessageTooLarge {
                size: first as u64,
                limit: first - 1
            })
        );
        for e in [
            DecodeError::Truncated,
            DecodeError::VarintOverflow,
            DecodeError::TooManySeries { limit: 4 },
            DecodeError::Invalid("x".into()),
        ] {
            assert!(!e.to_string().is_empty() && !e.to_string().contains('\n'));
        }
    }

    #[test]
    fn invalid_messages_are_errors() {
        // Field 1 (name) declares 5 bytes but the message holds 1.
        let err = decode(&[3, 0x0a, 0x05, b'x'], &Limits::default()).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid(_)), "{err:?}");
        // Name that is not UTF-8.
        let err = decode(&[3, 0x0a, 0x01, 0xff], &Limits::default()).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid(_)), "{err:?}");
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x853c_49e6_748f_ea9bu64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = encode(&every_type());
        for _ in 0..5000 {
            let mut body = base.clone();
            for _ in 0..(next() % 6) {
                let at = (next() as usize) % body.len();
                body[at] = next() as u8;
            }
            let _ = decode(&body, &Limits::default());
            let random: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
            let _ = decode(&random, &Limits::default());
        }
    }
}
