//! `GET /federate`: every live cluster's series, streamed one cluster at a time.
//!
//! Timestamps are left out (upstream behaviour): the central Prometheus stamps samples at scrape
//! time, so a cluster's series stay fresh until its next push. Payloads are served straight from
//! their stored bytes through [`wire`]'s views (text transcoded, protobuf copied without the
//! timestamps), by a few workers, and only a few clusters are in memory at a time however many
//! are stored. A cluster whose file cannot be read or decoded is skipped with a warning rather
//! than failing the whole scrape.
//!
//! One line Prometheus refuses (a label named twice, `le` on a histogram series, `__name__`, an
//! invalid name) fails the whole scrape, and with it every cluster this server serves. Validation
//! refuses such series on the way in; as a second defence, `/federate` leaves out any series that
//! still cannot be served validly (from an older server's files, or a peer's), in text and in
//! protobuf alike, counts it in `telemeter_server_federate_series_skipped_total{reason}` and logs
//! one warning per scrape.

use std::fmt;
use std::io::{self, Write};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use log::warn;
use telemeter_common::delimited::{self, DecodeError};
use telemeter_common::http::{Request, Response};
use telemeter_common::media::Format;
use telemeter_common::model::{Metric, MetricFamily};
use telemeter_common::text::{SkipReason, Skipped};
use telemeter_common::{labels, text, wire};

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
    let skipped_series = metrics.federate_skipped.clone();
    Response::stream(
        200,
        format.content_type(),
        Box::new(move |w: &mut dyn Write| {
            let started = Instant::now();
            let result = write_all(&store, format, filter.as_ref(), w);
            histogram.observe(started.elapsed().as_secs_f64());
            let skips = result?;
            if skips.series.total() > 0 {
                for reason in SkipReason::ALL {
                    skipped_series
                        .with(&[reason.as_str()])
                        .add(skips.series.count(reason));
                }
                // Once per scrape, however many series: a scrape every few seconds must not
                // flood the log.
                warn!(
                    "federate: left out {} series that would have made the scrape invalid ({}); \
                     the first in cluster {:?}",
                    skips.series.total(),
                    skips.series,
                    skips.first_cluster.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }),
    )
}

/// The series one scrape left out because they could not be written validly.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Skips {
    /// How many, by reason.
    pub series: Skipped,
    /// The first cluster that had any, for the log.
    pub first_cluster: Option<String>,
}

impl Skips {
    fn add(&mut self, cluster_id: &str, skipped: &Skipped) {
        if skipped.total() > 0 && self.first_cluster.is_none() {
            self.first_cluster = Some(cluster_id.to_string());
        }
        self.series.merge(skipped);
    }
}

/// Most clusters a worker may have read and encoded ahead of the writer.
const AHEAD_PER_WORKER: usize = 2;
/// Most workers one scrape uses.
const MAX_WORKERS: usize = 4;

/// Writes every live cluster's families to `w` in `format`, without timestamps, in the store's
/// order; returns the series left out. Reading and encoding (nearly all the work) is spread over
/// one worker per core, each taking every n-th cluster and at most [`AHEAD_PER_WORKER`] ahead, so
/// memory stays a few clusters' worth however many are stored; this thread writes their buffers
/// in order.
pub fn write_all(
    store: &Store,
    format: Format,
    filter: Option<&ClusterFilter>,
    w: &mut dyn Write,
) -> io::Result<Skips> {
    let ids: Vec<String> = store
        .clusters()
        .into_iter()
        .map(|entry| entry.cluster_id)
        .filter(|id| filter.is_none_or(|serves| serves(id)))
        .collect();
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_WORKERS)
        .min(ids.len());
    let mut skips = Skips::default();
    if workers <= 1 {
        let mut buffer = Vec::new();
        for id in &ids {
            let skipped = encode_stored(store, id, format, &mut buffer);
            skips.add(id, &skipped);
            w.write_all(&buffer)?;
        }
        w.flush()?;
        return Ok(skips);
    }
    std::thread::scope(|scope| {
        let mut lanes = Vec::with_capacity(workers);
        for first in 0..workers {
            let (ready, from_worker) = mpsc::sync_channel::<(Vec<u8>, Skipped)>(AHEAD_PER_WORKER);
            let (to_worker, spares) = mpsc::channel::<Vec<u8>>();
            let ids = &ids;
            scope.spawn(move || {
                for id in ids.iter().skip(first).step_by(workers) {
                    let mut buffer = spares.try_recv().unwrap_or_default();
                    let skipped = encode_stored(store, id, format, &mut buffer);
                    // An error means the writer stopped (the client went away): stop too.
                    if ready.send((buffer, skipped)).is_err() {
                        break;
                    }
                }
            });
            lanes.push((from_worker, to_worker));
        }
        // Returning early (a write error) drops the lanes, which stops the workers.
        for (lane, id) in lanes.iter().cycle().zip(&ids) {
            let (from_worker, to_worker) = lane;
            let Ok((buffer, skipped)) = from_worker.recv() else {
                break;
            };
            skips.add(id, &skipped);
            w.write_all(&buffer)?;
            // Handed back for the worker's next cluster, so buffers are not reallocated.
            let _ = to_worker.send(buffer);
        }
        w.flush()?;
        Ok(skips)
    })
}

/// Replaces `buffer` with cluster `id`'s families in `format`, or with nothing when its file
/// cannot be read or decoded (skipped with a warning, so one bad file never fails a scrape); the
/// series left out. A cluster is written whole (but for those series) or not at all.
fn encode_stored(store: &Store, id: &str, format: Format, buffer: &mut Vec<u8>) -> Skipped {
    buffer.clear();
    let upload = match store.get(id) {
        Ok(Some(upload)) => upload,
        // Expired or removed between listing and reading.
        Ok(None) => return Skipped::default(),
        Err(e) => {
            warn!("federate: skipping cluster {id:?}: {e}");
            return Skipped::default();
        }
    };
    match write_cluster(&upload.payload, format, buffer) {
        Ok(skipped) => skipped,
        Err(e) => {
            warn!("federate: skipping cluster {id:?}: {e}");
            buffer.clear();
            Skipped::default()
        }
    }
}

/// Why a stored payload could not be served.
#[derive(Debug)]
pub enum ServeError {
    /// The payload does not decode.
    Decode(DecodeError),
    /// A family cannot be written as text (it has no name).
    Text(io::Error),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::Decode(e) => write!(f, "stored payload does not decode: {e}"),
            ServeError::Text(e) => write!(f, "stored payload cannot be written as text: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

/// Encodes one cluster's stored (protobuf-delimited) payload in `format` without timestamps,
/// appending to `out`, straight from the payload's bytes ([`wire`]): text is transcoded, protobuf
/// copied with the timestamps cut out. Either way the series that cannot be served validly are
/// left out, and counted. On error `out` holds part of the cluster.
pub fn write_cluster(
    payload: &[u8],
    format: Format,
    out: &mut Vec<u8>,
) -> Result<Skipped, ServeError> {
    let mut skipped = Skipped::default();
    for family in wire::families(payload, &stored_limits()) {
        let family = family.map_err(ServeError::Decode)?;
        match format {
            Format::Text => {
                text::write_family_view(out, &family, false, &mut skipped).map_err(|e| {
                    // A series that does not decode comes back as InvalidData wrapping the reason.
                    match e
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<DecodeError>())
                    {
                        Some(decode) => ServeError::Decode(decode.clone()),
                        None => ServeError::Text(e),
                    }
                })?
            }
            Format::ProtoDelimited => write_family_protobuf(out, &family, &mut skipped)?,
        }
    }
    Ok(skipped)
}

/// One family in protobuf without timestamps, leaving out (and counting in `skipped`) the series
/// Prometheus would refuse, by the rule the text writer applies ([`text::unservable_labels`]);
/// a series without the value of its type is valid protobuf and stays. Nearly every family has
/// none to leave out and is copied from its bytes; one that has is decoded, filtered and encoded
/// again.
fn write_family_protobuf(
    out: &mut Vec<u8>,
    family: &wire::FamilyView<'_>,
    skipped: &mut Skipped,
) -> Result<(), ServeError> {
    let kind = family.metric_type();
    let servable_name = labels::is_valid_metric_name(family.name);
    let problem = |metric: &Metric| {
        if !servable_name {
            return Some(SkipReason::MetricName);
        }
        let names = metric.label.iter();
        text::unservable_labels(
            kind,
            names.map(|l| l.name.as_deref().unwrap_or("").as_bytes()),
        )
    };
    // A family that does not decode is refused below, whichever way it is written: what
    // cannot be read here is passed over.
    let clean = servable_name
        && family.metrics().flatten().all(|metric| {
            let names = metric.labels().flatten().map(|(name, _)| name.as_bytes());
            text::unservable_labels(kind, names).is_none()
        });
    if clean {
        return wire::write_family_without_timestamps(out, family).map_err(ServeError::Decode);
    }
    let mut owned = <MetricFamily as prost::Message>::decode(family.message)
        .map_err(|e| ServeError::Decode(DecodeError::Invalid(e.to_string())))?;
    owned.metric.retain(|metric| match problem(metric) {
        Some(reason) => {
            skipped.add(reason);
            false
        }
        None => true,
    });
    if owned.metric.is_empty() {
        return Ok(());
    }
    for metric in &mut owned.metric {
        metric.timestamp_ms = None;
    }
    delimited::encode_family(&owned, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;
    use std::time::{Duration, SystemTime};
    use telemeter_common::model::{
        Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType,
    };

    const METRICS_PB: &[u8] = include_bytes!("../../tests/fixtures/prometheus-metrics.pb");

    /// Now, in milliseconds: stored samples older than the TTL are not served.
    fn now_ms() -> i64 {
        SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    fn families(id: &str) -> Vec<MetricFamily> {
        vec![
            MetricFamily {
                name: Some("requests_total".into()),
                help: Some("Requests.".into()),
                r#type: Some(MetricType::Counter as i32),
                metric: vec![Metric {
                    label: vec![LabelPair::new("_id", id)],
                    counter: Some(Counter { value: Some(3.0) }),
                    timestamp_ms: Some(now_ms()),
                    ..Default::default()
                }],
            },
            MetricFamily {
                name: Some("latency_seconds".into()),
                help: None,
                r#type: Some(MetricType::Histogram as i32),
                metric: vec![Metric {
                    label: vec![LabelPair::new("_id", id)],
                    histogram: Some(Histogram {
                        sample_count: Some(2),
                        sample_sum: Some(0.25),
                        bucket: vec![Bucket {
                            cumulative_count: Some(1),
                            upper_bound: Some(0.1),
                        }],
                    }),
                    timestamp_ms: Some(now_ms() + 1),
                    ..Default::default()
                }],
            },
        ]
    }

    fn payload(id: &str) -> Vec<u8> {
        delimited::encode(&families(id))
    }

    #[test]
    fn text_has_no_timestamps() {
        let mut out = Vec::new();
        write_cluster(&payload("a"), Format::Text, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("requests_total{_id=\"a\"} 3\n"), "{text}");
        assert!(
            text.contains("latency_seconds_bucket{_id=\"a\",le=\"+Inf\"} 2\n"),
            "{text}"
        );
        // No 13-digit number (a timestamp in milliseconds) anywhere.
        assert!(!text.contains(&now_ms().to_string()[..8]), "{text}");
    }

    #[test]
    fn text_is_what_the_owned_decoding_writes() {
        for body in [METRICS_PB.to_vec(), payload("x")] {
            let mut ours = Vec::new();
            write_cluster(&body, Format::Text, &mut ours).unwrap();
            let owned = delimited::decode(&body, &stored_limits()).unwrap();
            let mut theirs = Vec::new();
            text::encode(&mut theirs, &owned, false).unwrap();
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn protobuf_has_no_timestamps() {
        for body in [METRICS_PB.to_vec(), payload("a")] {
            let mut out = Vec::new();
            write_cluster(&body, Format::ProtoDelimited, &mut out).unwrap();
            let decoded = delimited::decode(&out, &stored_limits()).unwrap();
            let mut expected = delimited::decode(&body, &stored_limits()).unwrap();
            for family in &mut expected {
                for metric in &mut family.metric {
                    metric.timestamp_ms = None;
                }
            }
            assert_eq!(delimited::encode(&decoded), delimited::encode(&expected));
        }
        let mut out = Vec::new();
        write_cluster(&payload("a"), Format::ProtoDelimited, &mut out).unwrap();
        let decoded = delimited::decode(&out, &delimited::Limits::default()).unwrap();
        assert_eq!(decoded[0].metric[0].timestamp_ms, None);
        assert_eq!(
            decoded[0].metric[0].counter,
            Some(Counter { value: Some(3.0) })
        );
    }

    #[test]
    fn a_payload_that_does_not_decode_is_an_error() {
        let mut body = payload("a");
        body.truncate(body.len() - 3);
        for format in [Format::Text, Format::ProtoDelimited] {
            let err = write_cluster(&body, format, &mut Vec::new()).unwrap_err();
            assert!(matches!(err, ServeError::Decode(_)), "{err}");
        }
        // A label that is not UTF-8, deep inside an otherwise well-framed family.
        let mut body = payload("\u{e9}");
        let at = body
            .windows(2)
            .position(|w| w == "\u{e9}".as_bytes())
            .unwrap();
        body[at] = 0xff;
        for format in [Format::Text, Format::ProtoDelimited] {
            let err = write_cluster(&body, format, &mut Vec::new()).unwrap_err();
            assert!(matches!(err, ServeError::Decode(_)), "{err}");
        }
    }

    #[test]
    fn series_that_cannot_be_written_validly_are_left_out_and_counted() {
        // What validation refuses, stored anyway (an older server's file, or a peer's).
        let mut stored = families("a");
        stored[1].metric[0].label.push(LabelPair::new("le", "0.5"));
        let mut dup = stored[0].metric[0].clone();
        dup.label.push(LabelPair::new("_id", "again"));
        let mut name = stored[0].metric[0].clone();
        name.label.push(LabelPair::new("__name__", "other"));
        stored[0].metric.extend([dup, name]);
        stored.push(MetricFamily {
            name: None,
            ..families("a").remove(0)
        });
        let mut text = Vec::new();
        let skipped = write_cluster(&delimited::encode(&stored), Format::Text, &mut text).unwrap();
        // Protobuf leaves out the same series (but keeps a series without its value).
        let mut pd = Vec::new();
        let pd_skipped =
            write_cluster(&delimited::encode(&stored), Format::ProtoDelimited, &mut pd).unwrap();
        assert_eq!(pd_skipped, skipped);
        let served = delimited::decode(&pd, &stored_limits()).unwrap();
        assert_eq!(served.len(), 1, "{served:?}");
        assert_eq!(served[0].metric.len(), 1);
        assert_eq!(served[0].metric[0].label, vec![LabelPair::new("_id", "a")]);
        assert_eq!(served[0].metric[0].timestamp_ms, None);
        let text = String::from_utf8(text).unwrap();
        // Only the one valid series is served, with its header; the rest is counted.
        assert_eq!(
            text,
            "# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total{_id=\"a\"} 3\n"
        );
        assert_eq!(skipped.count(SkipReason::TypeLabel), 1);
        assert_eq!(skipped.count(SkipReason::DuplicateLabel), 1);
        assert_eq!(skipped.count(SkipReason::ReservedLabel), 1);
        assert_eq!(skipped.count(SkipReason::MetricName), 1);
        assert_eq!(skipped.total(), 4);

        let dir =
            std::env::temp_dir().join(format!("telemeter-federate-skip-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(StoreConfig {
            dir: dir.clone(),
            ttl: Duration::from_secs(3600),
            max_batch: 8,
        })
        .unwrap();
        let now = SystemTime::now();
        store.put("good", payload("good"), now).unwrap();
        store.put("mixed", delimited::encode(&stored), now).unwrap();
        let mut out = Vec::new();
        let skips = write_all(&store, Format::Text, None, &mut out).unwrap();
        assert_eq!(skips.series, skipped);
        assert_eq!(skips.first_cluster.as_deref(), Some("mixed"));
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("requests_total{_id=\"good\"} 3\n"), "{out}");
        assert!(
            out.contains("latency_seconds_count{_id=\"good\"} 2\n"),
            "{out}"
        );
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn serves_every_readable_cluster_the_filter_accepts() {
        let dir = std::env::temp_dir().join(format!("telemeter-federate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(StoreConfig {
            dir: dir.clone(),
            ttl: Duration::from_secs(3600),
            max_batch: 8,
        })
        .unwrap();
        let now = SystemTime::now();
        store.put("a", payload("a"), now).unwrap();
        store.put("bad", b"\x05\x0a\x03".to_vec(), now).unwrap();
        store.put("c", payload("c"), now).unwrap();
        store.put("d", payload("d"), now).unwrap();
        let filter: ClusterFilter = Arc::new(|id: &str| id != "d");
        for format in [Format::Text, Format::ProtoDelimited] {
            let mut out = Vec::new();
            write_all(&store, format, Some(&filter), &mut out).unwrap();
            let mut expected = Vec::new();
            for id in ["a", "c"] {
                write_cluster(&payload(id), format, &mut expected).unwrap();
            }
            assert_eq!(out, expected);
        }
        // Many clusters, so that every worker takes several, in order.
        let ids: Vec<String> = (0..40).map(|i| format!("m{i:02}")).collect();
        for id in &ids {
            store.put(id, payload(id), now).unwrap();
        }
        let mut out = Vec::new();
        write_all(&store, Format::Text, None, &mut out).unwrap();
        let mut expected = Vec::new();
        for id in ["a", "c", "d"]
            .iter()
            .copied()
            .chain(ids.iter().map(String::as_str))
        {
            write_cluster(&payload(id), Format::Text, &mut expected).unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            String::from_utf8(expected).unwrap()
        );

        // A client that goes away stops the scrape with its error, without hanging.
        struct Fails(usize);
        impl Write for Fails {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"));
                }
                self.0 -= 1;
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = write_all(&store, Format::Text, None, &mut Fails(3)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
