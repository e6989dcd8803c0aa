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
mod tests;
