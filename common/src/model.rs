//! The `io.prometheus.client` metric model (`metrics.proto`), hand-written as prost messages.
//!
//! Field numbers and proto2 optionality follow the official schema exactly, so what we encode is what
//! the Go client library, Prometheus and the upstream telemeter read and write. Native-histogram and
//! exemplar fields are not modelled: prost skips unknown fields when decoding, and we never emit them.

/// The type of a metric family (`io.prometheus.client.MetricType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MetricType {
    /// A monotonically increasing value.
    Counter = 0,
    /// A value that can go up and down.
    Gauge = 1,
    /// Quantiles, a sum and a count.
    Summary = 2,
    /// A value of unknown type.
    Untyped = 3,
    /// Cumulative buckets, a sum and a count.
    Histogram = 4,
    /// A histogram whose buckets can go down (OpenMetrics gauge histogram).
    GaugeHistogram = 5,
}

/// One label of a series: a name and a value.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
pub struct LabelPair {
    /// The label name.
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// The label value.
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// The value of a gauge.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Gauge {
    /// The current value.
    #[prost(double, optional, tag = "1")]
    pub value: Option<f64>,
}

/// The value of a counter.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Counter {
    /// The current total.
    #[prost(double, optional, tag = "1")]
    pub value: Option<f64>,
}

/// One quantile of a summary.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Quantile {
    /// The quantile rank, between 0 and 1.
    #[prost(double, optional, tag = "1")]
    pub quantile: Option<f64>,
    /// The observed value at that rank.
    #[prost(double, optional, tag = "2")]
    pub value: Option<f64>,
}

/// The value of a summary.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// How many observations were made.
    #[prost(uint64, optional, tag = "1")]
    pub sample_count: Option<u64>,
    /// The sum of all observations.
    #[prost(double, optional, tag = "2")]
    pub sample_sum: Option<f64>,
    /// The quantiles.
    #[prost(message, repeated, tag = "3")]
    pub quantile: Vec<Quantile>,
}

/// The value of an untyped metric.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Untyped {
    /// The value.
    #[prost(double, optional, tag = "1")]
    pub value: Option<f64>,
}

/// The value of a (classic) histogram.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Histogram {
    /// How many observations were made.
    #[prost(uint64, optional, tag = "1")]
    pub sample_count: Option<u64>,
    /// The sum of all observations.
    #[prost(double, optional, tag = "2")]
    pub sample_sum: Option<f64>,
    /// The cumulative buckets, ordered by upper bound.
    #[prost(message, repeated, tag = "3")]
    pub bucket: Vec<Bucket>,
}

/// One cumulative bucket of a histogram.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Bucket {
    /// Observations less than or equal to `upper_bound`.
    #[prost(uint64, optional, tag = "1")]
    pub cumulative_count: Option<u64>,
    /// The inclusive upper bound (`le`).
    #[prost(double, optional, tag = "2")]
    pub upper_bound: Option<f64>,
}

/// One series of a family: its labels, one value of the family's type, and an optional timestamp.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    /// The labels, without the metric name.
    #[prost(message, repeated, tag = "1")]
    pub label: Vec<LabelPair>,
    /// Set when the family is a gauge.
    #[prost(message, optional, tag = "2")]
    pub gauge: Option<Gauge>,
    /// Set when the family is a counter.
    #[prost(message, optional, tag = "3")]
    pub counter: Option<Counter>,
    /// Set when the family is a summary.
    #[prost(message, optional, tag = "4")]
    pub summary: Option<Summary>,
    /// Set when the family is untyped.
    #[prost(message, optional, tag = "5")]
    pub untyped: Option<Untyped>,
    /// Set when the family is a histogram.
    #[prost(message, optional, tag = "7")]
    pub histogram: Option<Histogram>,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, optional, tag = "6")]
    pub timestamp_ms: Option<i64>,
}

/// A metric family: a name, help text, a type and its series.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricFamily {
    /// The metric name.
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// The help text.
    #[prost(string, optional, tag = "2")]
    pub help: Option<String>,
    /// The type, a [`MetricType`] value.
    #[prost(enumeration = "MetricType", optional, tag = "3")]
    pub r#type: Option<i32>,
    /// The series.
    #[prost(message, repeated, tag = "4")]
    pub metric: Vec<Metric>,
}

impl Metric {
    /// The value of label `name`, if the series has it.
    pub fn label_value(&self, name: &str) -> Option<&str> {
        self.label
            .iter()
            .find(|l| l.name.as_deref() == Some(name))
            .map(|l| l.value.as_deref().unwrap_or(""))
    }

    /// Sets label `name` to `value`, replacing an existing value.
    pub fn set_label(&mut self, name: &str, value: &str) {
        match self
            .label
            .iter_mut()
            .find(|l| l.name.as_deref() == Some(name))
        {
            Some(l) => l.value = Some(value.to_string()),
            None => self.label.push(LabelPair::new(name, value)),
        }
    }

    /// Calls `each` with every sample this series stands for in a family of `metric_type`, as
    /// Prometheus exposes them: the suffix to the family's name, the one label a summary or a
    /// histogram adds (`quantile`, `le`), and the value. A histogram gets its `+Inf` bucket when
    /// it lacks one; a series without the value its type is written from stands for none. The text
    /// writer and the remote-write conversion both walk series this way, so both see the same ones.
    pub fn try_for_each_sample<E>(
        &self,
        metric_type: MetricType,
        mut each: impl FnMut(&'static str, Option<(&'static str, f64)>, f64) -> Result<(), E>,
    ) -> Result<(), E> {
        match metric_type {
            MetricType::Counter | MetricType::Gauge | MetricType::Untyped => {
                let value = match metric_type {
                    MetricType::Counter => self.counter.map(|c| c.value),
                    MetricType::Gauge => self.gauge.map(|g| g.value),
                    _ => self.untyped.map(|u| u.value),
                };
                if let Some(value) = value {
                    each("", None, value.unwrap_or(0.0))?;
                }
            }
            MetricType::Summary => {
                if let Some(summary) = &self.summary {
                    for q in &summary.quantile {
                        let rank = q.quantile.unwrap_or(0.0);
                        each("", Some(("quantile", rank)), q.value.unwrap_or(0.0))?;
                    }
                    each("_sum", None, summary.sample_sum.unwrap_or(0.0))?;
                    each("_count", None, summary.sample_count.unwrap_or(0) as f64)?;
                }
            }
            MetricType::Histogram | MetricType::GaugeHistogram => {
                if let Some(histogram) = &self.histogram {
                    let count = histogram.sample_count.unwrap_or(0) as f64;
                    let mut inf_seen = false;
                    for b in &histogram.bucket {
                        let le = b.upper_bound.unwrap_or(0.0);
                        inf_seen |= le == f64::INFINITY;
                        each(
                            "_bucket",
                            Some(("le", le)),
                            b.cumulative_count.unwrap_or(0) as f64,
                        )?;
                    }
                    if !inf_seen {
                        each("_bucket", Some(("le", f64::INFINITY)), count)?;
                    }
                    each("_sum", None, histogram.sample_sum.unwrap_or(0.0))?;
                    each("_count", None, count)?;
                }
            }
        }
        Ok(())
    }
}

impl LabelPair {
    /// A label pair from a name and a value.
    pub fn new(name: &str, value: &str) -> Self {
        LabelPair {
            name: Some(name.to_string()),
            value: Some(value.to_string()),
        }
    }
}

impl MetricFamily {
    /// The family's type; an absent or unknown type reads as untyped.
    pub fn metric_type(&self) -> MetricType {
        self.r#type
            .and_then(|t| MetricType::try_from(t).ok())
            .unwrap_or(MetricType::Untyped)
    }

    /// The number of samples the family carries: one per gauge, counter or untyped series; for
    /// summaries and histograms one per quantile or bucket plus the sum and the count.
    pub fn sample_count(&self) -> usize {
        self.metric
            .iter()
            .map(|m| {
                if let Some(h) = &m.histogram {
                    h.bucket.len() + 2
                } else if let Some(s) = &m.summary {
                    s.quantile.len() + 2
                } else {
                    1
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn field_numbers_match_the_official_schema() {
        // A gauge family encoded by hand with the official field numbers, byte for byte.
        let family = MetricFamily {
            name: Some("up".into()),
            help: None,
            r#type: Some(MetricType::Gauge as i32),
            metric: vec![Metric {
                label: vec![LabelPair::new("a", "b")],
                gauge: Some(Gauge { value: Some(1.0) }),
                timestamp_ms: Some(5),
                ..Default::default()
            }],
        };
        let bytes = family.encode_to_vec();
        let expected: Vec<u8> = vec![
            0x0a, 2, b'u', b'p', // name = 1
            0x18, 1, // type = 3 (GAUGE)
            0x22, 21, // metric = 4
            0x0a, 6, 0x0a, 1, b'a', 0x12, 1, b'b', // label = 1 { name = 1, value = 2 }
            0x12, 9, 0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f, // gauge = 2 { value = 1 (double) }
            0x30, 5, // timestamp_ms = 6
        ];
        assert_eq!(bytes, expected);
        assert_eq!(MetricFamily::decode(&bytes[..]).unwrap(), family);
    }

    #[test]
    fn proto2_presence_keeps_zero_values() {
        let family = MetricFamily {
            name: Some("c".into()),
            r#type: Some(MetricType::Counter as i32),
            metric: vec![Metric {
                counter: Some(Counter { value: Some(0.0) }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let decoded = MetricFamily::decode(&family.encode_to_vec()[..]).unwrap();
        assert_eq!(decoded.r#type, Some(0));
        assert_eq!(decoded.metric[0].counter.unwrap().value, Some(0.0));
    }

    #[test]
    fn labels_read_and_set() {
        let mut m = Metric::default();
        m.set_label("_id", "a");
        m.set_label("_id", "b");
        assert_eq!(m.label_value("_id"), Some("b"));
        assert_eq!(m.label.len(), 1);
        assert_eq!(m.label_value("x"), None);
    }
}
