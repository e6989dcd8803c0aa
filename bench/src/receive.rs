//! Remote write to `/metrics/v1/receive` as a Prometheus sends it: a snappy-block
//! `prometheus.WriteRequest` of [`SAMPLES_PER_REQUEST`] samples (Prometheus-sized batches), one
//! sample per series, with the base64 JSON bearer of a client token and the cluster id.

use prost::Message;
use telemeter_common::model::LabelPair;
use telemeter_server::receive::auth::bearer_for;
use telemeter_server::remote_write::convert::to_series;
use telemeter_server::remote_write::proto::WriteRequest;

use crate::http::{Request, Target};
use crate::load::Workload;
use crate::payload;

/// Samples per request: 4 instances of the realistic 500-sample payload.
pub const SAMPLES_PER_REQUEST: usize = 4 * payload::SAMPLES_PER_UPLOAD;

/// The body of one cluster's request at `timestamp_ms`.
pub fn body(cluster: &str, timestamp_ms: i64) -> Vec<u8> {
    let mut timeseries = Vec::with_capacity(SAMPLES_PER_REQUEST);
    for instance in 0..4 {
        let mut families = payload::families(cluster, timestamp_ms);
        for family in &mut families {
            for metric in &mut family.metric {
                metric
                    .label
                    .push(LabelPair::new("replica", &instance.to_string()));
            }
        }
        timeseries.extend(to_series(&families, timestamp_ms));
    }
    telemeter_common::snappy::encode_block(&WriteRequest { timeseries }.encode_to_vec())
}

/// The remote-write workload against one server.
pub struct Receive {
    /// The server's external URL.
    pub target: Target,
    /// The client token (its tokens file must allow every cluster id sent).
    pub client_token: String,
}

impl Workload for Receive {
    fn request(&self, cluster: usize) -> Result<Request, String> {
        let id = payload::cluster_id(cluster);
        Ok(Request {
            method: "POST",
            path: self.target.path("/metrics/v1/receive"),
            headers: vec![
                (
                    "Authorization",
                    format!("Bearer {}", bearer_for(&self.client_token, &id)),
                ),
                ("Content-Type", "application/x-protobuf".to_string()),
                ("Content-Encoding", "snappy".to_string()),
                ("X-Prometheus-Remote-Write-Version", "0.1.0".to_string()),
            ],
            body: body(&id, payload::now_ms()),
        })
    }

    fn body_size_hint(&self) -> usize {
        body(&payload::cluster_id(0), 0).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_2000_samples_of_one_cluster_within_the_default_cap() {
        let bytes = body("bench-00000001", 1_000);
        assert!(bytes.len() < 128 << 10, "{} bytes", bytes.len());
        let raw = telemeter_common::snappy::decode_block(&bytes, 16 << 20).unwrap_or_default();
        let request = WriteRequest::decode(&raw[..]).unwrap_or_default();
        let samples: usize = request.timeseries.iter().map(|s| s.samples.len()).sum();
        assert_eq!(samples, SAMPLES_PER_REQUEST);
        assert!(request.timeseries.iter().all(|s| s
            .labels
            .iter()
            .any(|l| l.name == "_id" && l.value == "bench-00000001")));
    }
}
