//! The Prometheus remote-write 1.0 messages (`prometheus.WriteRequest`, `types.proto`), hand-written
//! as prost messages so no protoc is needed.
//!
//! Only the fields remote write 1.0 requires are modelled (no metadata, exemplars or native
//! histograms); field numbers follow Prometheus's `prompb` exactly.

/// One remote-write request: the series to append.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    /// The series, each with its own samples.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// One series: its labels (sorted by name, `__name__` among them) and samples (oldest first).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// The labels, sorted by name.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// The samples, in increasing timestamp order.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// One label of a series.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
pub struct Label {
    /// The label name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The label value (never empty: an empty value means the label is absent).
    #[prost(string, tag = "2")]
    pub value: String,
}

/// One sample: a value at a time.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Sample {
    /// The value.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn encodes_with_the_prompb_field_numbers() {
        let request = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![Label {
                    name: "a".into(),
                    value: "b".into(),
                }],
                samples: vec![Sample {
                    value: 1.0,
                    timestamp: 2,
                }],
            }],
        };
        let bytes = request.encode_to_vec();
        // WriteRequest.timeseries (1, LEN) { labels (1, LEN) {name (1) "a", value (2) "b"},
        // samples (2, LEN) {value (1, I64) 1.0, timestamp (2, VARINT) 2} }
        let expected: Vec<u8> = vec![
            0x0a, 21, // timeseries
            0x0a, 6, 0x0a, 1, b'a', 0x12, 1, b'b', // label
            0x12, 11, 0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f, 0x10, 2, // sample
        ];
        assert_eq!(bytes, expected);
        assert_eq!(WriteRequest::decode(&bytes[..]).unwrap(), request);
    }
}
