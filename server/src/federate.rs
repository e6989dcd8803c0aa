//! `GET /federate`: every live cluster's series, streamed one cluster at a time.
//!
//! Timestamps are left out (upstream behaviour): the central Prometheus stamps samples at scrape
//! time, so a cluster's series stay fresh until its next push. Only one cluster's payload is in
//! memory at a time, however many clusters are stored. A cluster whose file cannot be read or
//! decoded is skipped with a warning rather than failing the whole scrape.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Instant;

use log::warn;
use telemeter_common::delimited;
use telemeter_common::http::{Request, Response};
use telemeter_common::media::Format;
use telemeter_common::model::MetricFamily;
use telemeter_common::text;

use crate::metrics::Metrics;
use crate::store::Store;

/// Limits for decoding our own stored payloads: they were validated on the way in, so these only
/// guard against a damaged file the checksum missed.
fn stored_limits() -> delimited::Limits {
    delimited::Limits {
        max_message_bytes: 256 << 20,
        max_total_bytes: 1 << 30,
        max_families: usize::MAX,
        max_series: usize::MAX,
    }
}

/// Decides which stored clusters this server serves: in a cluster, only those it owns on the ring,
/// so each cluster's series come from exactly one server.
pub type ClusterFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Answers `/federate`: text by default, protobuf-delimited when `Accept` asks for it. With a
/// `filter`, only the clusters it accepts are served.
pub fn handle(
    request: &Request,
    store: &Store,
    metrics: &Metrics,
    filter: Option<ClusterFilter>,
) -> Response {
    if request.method != "GET" {
        return Response::text(405, "only GET is allowed").with_header("Allow", "GET");
    }
    let format = Format::negotiate(request.header("Accept"));
    let store = store.clone();
    let histogram = metrics.federate_seconds.with(&[]);
    Response::stream(
        200,
        format.content_type(),
        Box::new(move |w: &mut dyn Write| {
            let started = Instant::now();
            let result = write_all(&store, format, filter.as_ref(), w);
            histogram.observe(started.elapsed().as_secs_f64());
            result
        }),
    )
}

/// Writes every live cluster's families to `w` in `format`, without timestamps.
pub fn write_all(
    store: &Store,
    format: Format,
    filter: Option<&ClusterFilter>,
    w: &mut dyn Write,
) -> io::Result<()> {
    let mut buffer = Vec::new();
    for entry in store.clusters() {
        if filter.is_some_and(|serves| !serves(&entry.cluster_id)) {
            continue;
        }
        let upload = match store.get(&entry.cluster_id) {
            Ok(Some(upload)) => upload,
            // Expired or removed between listing and reading.
            Ok(None) => continue,
            Err(e) => {
                warn!("federate: skipping cluster {:?}: {e}", entry.cluster_id);
                continue;
            }
        };
        let families = match delimited::decode(&upload.payload, &stored_limits()) {
            Ok(families) => families,
            Err(e) => {
                warn!("federate: skipping cluster {:?}: {e}", entry.cluster_id);
                continue;
            }
        };
        drop(upload);
        buffer.clear();
        write_cluster(families, format, &mut buffer)?;
        w.write_all(&buffer)?;
    }
    w.flush()
}

/// Encodes one cluster's families in `format` without timestamps.
pub fn write_cluster(
    mut families: Vec<MetricFamily>,
    format: Format,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    match format {
        Format::Text => {
            for family in &families {
                text::write_family(out, family, false)?;
            }
        }
        Format::ProtoDelimited => {
            for family in &mut families {
                for metric in &mut family.metric {
                    metric.timestamp_ms = None;
                }
                delimited::encode_family(family, out);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemeter_common::model::{Counter, LabelPair, Metric, MetricType};

    fn families() -> Vec<MetricFamily> {
        vec![MetricFamily {
            name: Some("requests_total".into()),
            help: Some("Requests.".into()),
            r#type: Some(MetricType::Counter as i32),
            metric: vec![Metric {
                label: vec![LabelPair::new("_id", "a")],
                counter: Some(Counter { value: Some(3.0) }),
                timestamp_ms: Some(1_700_000_000_000),
                ..Default::default()
            }],
        }]
    }

    #[test]
    fn text_has_no_timestamps() {
        let mut out = Vec::new();
        write_cluster(families(), Format::Text, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("requests_total{_id=\"a\"} 3\n"), "{text}");
        assert!(!text.contains("1700000000000"), "{text}");
    }

    #[test]
    fn protobuf_has_no_timestamps() {
        let mut out = Vec::new();
        write_cluster(families(), Format::ProtoDelimited, &mut out).unwrap();
        let decoded = delimited::decode(&out, &delimited::Limits::default()).unwrap();
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].metric[0].timestamp_ms, None);
        assert_eq!(
            decoded[0].metric[0].counter,
            Some(Counter { value: Some(3.0) })
        );
    }
}
