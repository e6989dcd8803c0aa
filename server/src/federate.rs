//! `GET /federate`: every live cluster's series, each family once with the series of every
//! cluster that has it together (what `promtool check metrics` and Prometheus's metadata expect),
//! then `telemeter_last_push_timestamp_seconds{_id}` per cluster served.
//!
//! Timestamps are left out (upstream behaviour): the central Prometheus stamps samples at scrape
//! time, so a cluster's series stay fresh until its next push. A scrape is two passes. First each
//! cluster's upload is *pinned* ([`PinnedUpload`]: its file stays open, so the version read stays
//! readable whatever is stored meanwhile) and only an index of its families (name, type, byte
//! range) is kept. A file's first read verifies it and indexes its payload, which is dropped;
//! the index is kept for that payload's version (the store's, which a checkpoint keeps: the same
//! index serves the journal record and then the file), so later scrapes read only the file's
//! header (or nothing of a journal record) in this
//! pass (not a second copy of every payload, which was a quarter of a scrape's reading). Then
//! the families are written in
//! name order, each from the byte ranges of every cluster that has it, read again from the pinned
//! files, straight through [`wire`]'s views (text transcoded, protobuf copied without the
//! timestamps). A family is encoded in chunks of a few hundred KB of input, by a few workers, and
//! written in order (the header once, from the first chunk with a series), so memory is the
//! indexes plus a few chunks in flight, however many clusters are stored or share a family. In
//! protobuf each chunk is a message of its own: a family shared by many clusters comes as several
//! messages of the same name (each with the family's name, help and type). A scrape holds one open
//! file per cluster (the server raises its soft descriptor limit to the hard one for that).
//!
//! `match[]` (Prometheus series selectors, any of them matching) restricts the series, as on
//! Prometheus's own `/federate`, so a central Prometheus can split the fleet over scrape jobs;
//! without `match[]` everything is served (upstream behaviour). A selector on `__name__` matches a
//! family's name, and for a histogram or summary also its `_bucket`, `_sum` and `_count` names.
//! With `Accept-Encoding: gzip` (Prometheus always sends it) the body is gzip-compressed at the
//! fast level as it is written.
//!
//! A cluster whose file cannot be read, or a family part that cannot be decoded, is skipped with
//! a warning rather than failing the whole scrape. When two clusters have a family of the same
//! name with different types, the type of the first cluster (by id) wins and the other's series
//! are left out (counted as `type_conflict`). A family named like the lines of a histogram or
//! summary this response writes (an untyped `h_bucket` or a gauge `h_count` beside a histogram
//! `h`, from any cluster) is left out too (counted as `name_collision`): in text its `# TYPE`
//! would be a second TYPE for the histogram's lines, and Go's parser (`promtool`, `expfmt`, an
//! upstream client scraping us) and ours refuse the whole text for it. Protobuf has no such
//! problem, but both formats serve the same series. The histogram or summary always wins: it
//! sorts first (its name is a prefix), so whether it wrote any series is known by then.
//!
//! One line Prometheus refuses (a label named twice, `le` on a histogram series, `__name__`, an
//! invalid name) fails the whole scrape, and with it every cluster this server serves. Validation
//! refuses such series on the way in; as a second defence, `/federate` leaves out any series that
//! still cannot be served validly (from an older server's files, or a peer's), in text and in
//! protobuf alike, counts it in `telemeter_server_federate_series_skipped_total{reason}` and logs
//! one warning per scrape.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Instant, UNIX_EPOCH};

use flate2::write::GzEncoder;
use flate2::Compression;
use log::warn;
use telemeter_common::delimited::{self, DecodeError};
use telemeter_common::http::{Request, Response};
use telemeter_common::media::Format;
use telemeter_common::model::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
use telemeter_common::selector::Selector;
use telemeter_common::text::{SkipReason, Skipped};
use telemeter_common::{labels, text, wire};

use crate::metrics::Metrics;
use crate::store::{PinVersion, PinnedUpload, Store};

/// The family `/federate` adds: when each cluster served last pushed (like pushgateway's
/// `push_time_seconds`), so a silent cluster can be alerted on long before the TTL drops it.
pub const LAST_PUSH_FAMILY: &str = "telemeter_last_push_timestamp_seconds";

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
    id_label: &str,
) -> Response {
    if request.method != "GET" {
        return Response::text(405, "only GET is allowed").with_header("Allow", "GET");
    }
    let format = Format::negotiate(request.header("Accept"));
    let mut selectors = Vec::new();
    for text in request.query_params("match[]") {
        match Selector::parse(&text) {
            Ok(selector) => selectors.push(selector),
            Err(e) => return Response::text(400, &format!("bad match[] selector {text:?}: {e}")),
        }
    }
    let gzip = accepts_gzip(request.header("Accept-Encoding"));
    let store = store.clone();
    let id_label = id_label.to_string();
    let histogram = metrics.federate_seconds.with(&[]);
    let skipped_series = metrics.federate_skipped.clone();
    let response = Response::stream(
        200,
        format.content_type(),
        Box::new(move |w: &mut dyn Write| {
            let started = Instant::now();
            let result = if gzip {
                let mut encoder = GzEncoder::new(w, Compression::fast());
                write_selected(
                    &store,
                    format,
                    filter.as_ref(),
                    &selectors,
                    &id_label,
                    &mut encoder,
                )
                .and_then(|skips| encoder.finish().map(|_| skips))
            } else {
                write_selected(&store, format, filter.as_ref(), &selectors, &id_label, w)
            };
            histogram.observe(started.elapsed().as_secs_f64());
            let skips = result?;
            if skips.name_collisions > 0 {
                skipped_series
                    .with(&[NAME_COLLISION])
                    .add(skips.name_collisions);
                let (family, owner) = skips.first_collision.clone().unwrap_or_default();
                // Once per scrape, as below.
                warn!(
                    "federate: left out {} series of families named like a histogram's or \
                     summary's lines, which would have made the text unparsable; the first: \
                     {family:?}, beside {owner:?}",
                    skips.name_collisions
                );
            }
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
    );
    let response = response.with_header("Vary", "Accept-Encoding");
    if gzip {
        response.with_header("Content-Encoding", "gzip")
    } else {
        response
    }
}

/// Whether an `Accept-Encoding` value takes gzip (named, or `*`, without `q=0`).
pub fn accepts_gzip(accept_encoding: Option<&str>) -> bool {
    accept_encoding.is_some_and(|value| {
        value.split(',').any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f64>().is_ok_and(|q| q <= 0.0))
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
    })
}

/// The label value of `telemeter_server_federate_series_skipped_total` for the series of a
/// family named like a histogram's or summary's lines (see the module doc).
pub const NAME_COLLISION: &str = "name_collision";

/// The series one scrape left out because they could not be written validly.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Skips {
    /// How many, by reason.
    pub series: Skipped,
    /// The first cluster that had any, for the log.
    pub first_cluster: Option<String>,
    /// Series of families named like the lines of a histogram or summary written before them.
    pub name_collisions: u64,
    /// The first such family and the histogram or summary it collided with, for the log.
    pub first_collision: Option<(String, String)>,
}

impl Skips {
    fn add(&mut self, cluster_id: &str, skipped: &Skipped) {
        if skipped.total() > 0 && self.first_cluster.is_none() {
            self.first_cluster = Some(cluster_id.to_string());
        }
        self.series.merge(skipped);
    }
}

/// Most items (clusters to index, families to encode) a worker may have done ahead of the writer.
const AHEAD_PER_WORKER: usize = 2;
/// Most workers one scrape uses.
const MAX_WORKERS: usize = 4;
/// Most clusters one item of pass 1 pins: handing each cluster over on its own (a channel
/// message, mostly a futex wake and a context switch, for ~12 µs of pinning) was a third of
/// pass 1's CPU (`perf`, 10,000 clusters).
const CLUSTERS_PER_ITEM: usize = 64;

/// Writes every live cluster's families to `w` in `format`, without timestamps, each family once;
/// returns the series left out. As [`write_selected`] without selectors, with the default
/// partition label.
pub fn write_all(
    store: &Store,
    format: Format,
    filter: Option<&ClusterFilter>,
    w: &mut dyn Write,
) -> io::Result<Skips> {
    write_selected(store, format, filter, &[], "_id", w)
}

/// One cluster's pinned upload.
struct ClusterIndex {
    cluster_id: String,
    /// Seconds since the epoch of the upload's receipt.
    received_seconds: f64,
    pinned: PinnedUpload,
    /// Where its families are, for what a scrape learns of them ([`FamilyRange::plain`]).
    families: FamilyRanges,
}

/// Where one family is in a cluster's payload: its name, type and the byte range of its message
/// without the prefix.
struct FamilyRange {
    name: Arc<str>,
    metric_type: MetricType,
    start: u32,
    end: u32,
    /// Whether a scrape without selectors found this family's bytes plain as text (every series
    /// written, each label a short message needing no check or escape:
    /// [`text::write_family_view_part_plain`]): later scrapes of the same payload version (these
    /// ranges are kept under it) copy its labels without those checks. One byte in the range's
    /// padding; set and read by the scrapes' workers, so atomic.
    plain: AtomicBool,
}

// The flag fits the range's padding: still the 32 bytes [`IndexCache`]'s doc counts a family.
const _: () = assert!(std::mem::size_of::<FamilyRange>() == 32);

/// Where one cluster's families are in its payload. Merged into the [`FamilyPlan`]s as each
/// cluster is indexed; kept between scrapes in [`INDEXES`] (the names shared, so held once per
/// family name, not once per cluster).
type FamilyRanges = Arc<[FamilyRange]>;

/// Each cluster's [`FamilyRanges`] under the payload version they were read from, so that a scrape
/// reads a file verified before only in its families' ranges (pass 2), not whole again to find
/// them (pass 1 read every payload, a second copy of the whole store's bytes per scrape). One
/// entry per stored cluster at most: each scrape drops those of clusters no longer stored. About
/// 32 bytes a family of a cluster (300,000 of them, ~10 MB, for 10,000 clusters of 30 families).
struct IndexCache {
    clusters: HashMap<String, (PinVersion, FamilyRanges)>,
    /// Every family name the entries hold, each once.
    names: HashSet<Arc<str>>,
}

static INDEXES: Mutex<Option<IndexCache>> = Mutex::new(None);

impl IndexCache {
    /// Runs `f` on the cache, made on first use.
    fn with<R>(f: impl FnOnce(&mut IndexCache) -> R) -> R {
        let mut cache = telemeter_common::sync::lock(&INDEXES);
        f(cache.get_or_insert_with(|| IndexCache {
            clusters: HashMap::new(),
            names: HashSet::new(),
        }))
    }

    /// The shared copy of family name `name`.
    fn intern(&mut self, name: &str) -> Arc<str> {
        match self.names.get(name) {
            Some(name) => Arc::clone(name),
            None => {
                let name: Arc<str> = Arc::from(name);
                self.names.insert(Arc::clone(&name));
                name
            }
        }
    }

    /// Drops the entries of clusters not in `stored`, and the names no entry holds any more.
    fn retain(&mut self, stored: &HashSet<&str>) {
        self.clusters.retain(|id, _| stored.contains(id.as_str()));
        self.names.retain(|name| Arc::strong_count(name) > 1);
    }
}

/// One family to write: its type (the first cluster's) and its parts, in cluster order.
struct FamilyPlan {
    name: String,
    metric_type: MetricType,
    parts: Vec<Part>,
    /// Series of clusters whose family of this name has another type (left out).
    conflicting: Vec<Part>,
}

/// One cluster's part of a family. 20 bytes, one per family of a cluster (the plans of a
/// scrape of 10,000 clusters of 30 families hold ~6 MB of them): its offsets in 32 bits, as
/// [`FamilyRange`] keeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Part {
    /// The cluster, an index into the scrape's [`ClusterIndex`]es.
    cluster: u32,
    /// The family's place in that cluster's [`FamilyRanges`].
    family: u32,
    /// [`FamilyRange::plain`] as pass 1 found it: copied while it read the range anyway, since
    /// reaching back into 10,000 clusters' ranges from pass 2 missed the cache once a part (7%
    /// of a scrape's CPU in `perf`).
    plain: bool,
    /// The family's message in the payload, without its prefix.
    start: u32,
    end: u32,
}

// The size its doc (and the memory of a scrape) counts on.
const _: () = assert!(std::mem::size_of::<Part>() == 20);

/// Writes the live clusters (those `filter` accepts) to `w` in `format`: each family once, in
/// name order, with the series of every cluster that has it (in cluster order), only the series
/// some selector matches (every series without selectors), then the last-push family. Returns
/// the series left out because they could not be written validly.
pub fn write_selected(
    store: &Store,
    format: Format,
    filter: Option<&ClusterFilter>,
    selectors: &[Selector],
    id_label: &str,
    w: &mut dyn Write,
) -> io::Result<Skips> {
    // The checkpointer waits for this scrape (within its bounds): see [`Store::scrape`].
    let _scrape = store.scrape();
    let stored: Vec<String> = store
        .clusters()
        .into_iter()
        .map(|entry| entry.cluster_id)
        .collect();
    let ids: Vec<String> = stored
        .iter()
        .filter(|id| filter.is_none_or(|serves| serves(id)))
        .cloned()
        .collect();
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_WORKERS);

    // Pass 1: pin and index every cluster, keeping no payload; the families in name order, each
    // with its parts from every cluster.
    let mut clusters: Vec<ClusterIndex> = Vec::with_capacity(ids.len());
    let mut by_name: BTreeMap<Arc<str>, usize> = BTreeMap::new();
    let mut plans: Vec<FamilyPlan> = Vec::new();
    // The plan of each family of the clusters before, by its place in its cluster: clusters
    // mostly have the same families in the same order, and the names are shared (interned by
    // the IndexCache), so a family is mostly found by comparing one pointer, not by searching
    // `by_name` (a third of the writer's pass 1 in `perf`).
    let mut plan_at: Vec<Option<(Arc<str>, usize)>> = Vec::new();
    // A few items per worker at least, so a small store is still pinned in parallel.
    let per_item = ids.len().div_ceil(workers * 8).clamp(1, CLUSTERS_PER_ITEM);
    let batches: Vec<&[String]> = ids.chunks(per_item).collect();
    in_order(
        &batches,
        workers,
        |batch: &&[String], _: &mut Vec<u8>| {
            batch
                .iter()
                .filter_map(|id| index_cluster(store, id))
                .collect::<Vec<_>>()
        },
        |_, _, indexed| {
            for (cluster, families) in indexed {
                // Fewer clusters than 2^32 are ever stored; past that, not served.
                let Ok(c) = u32::try_from(clusters.len()) else {
                    return Ok(());
                };
                clusters.push(cluster);
                plan_cluster(c, &families, &mut plans, &mut by_name, &mut plan_at);
            }
            Ok(())
        },
    )?;
    let chunks = chunks(&plans, by_name.into_values());

    // Pass 2: each family from the pinned files, in name order, a chunk of clusters at a time.
    let mut skips = Skips::default();
    // The family whose header is out: later chunks of it drop theirs.
    let mut header_out: Option<usize> = None;
    // The names the histograms and summaries written so far write lines under besides their
    // own (`h_bucket`, `h_sum`, `h_count` of `h`), with the family's name: a family of one of
    // these names comes later (the owner's name is a prefix of it) and is left out. At most
    // three names per family already planned, so no more than the plans themselves hold.
    let mut line_names: HashMap<String, usize> = HashMap::new();
    in_order(
        &chunks,
        workers,
        |chunk: &Chunk, buffer: &mut Vec<u8>| {
            let mut chunk_skips = Skips::default();
            buffer.clear();
            let (header_len, written) = match plans.get(chunk.family) {
                Some(plan) => encode_chunk(
                    plan,
                    chunk,
                    &clusters,
                    format,
                    selectors,
                    buffer,
                    &mut chunk_skips,
                ),
                None => (0, 0),
            };
            (chunk_skips, header_len, written)
        },
        |chunk, buffer, (chunk_skips, header_len, written)| {
            skips.series.merge(&chunk_skips.series);
            if skips.first_cluster.is_none() {
                skips.first_cluster = chunk_skips.first_cluster;
            }
            if buffer.is_empty() {
                return Ok(());
            }
            let Some(plan) = plans.get(chunk.family) else {
                return Ok(());
            };
            if let Some(&owner) = line_names.get(&plan.name) {
                skips.name_collisions += written as u64;
                if skips.first_collision.is_none() {
                    let owner = plans.get(owner).map(|p| p.name.clone()).unwrap_or_default();
                    skips.first_collision = Some((plan.name.clone(), owner));
                }
                return Ok(());
            }
            if header_out != Some(chunk.family) {
                for suffix in line_suffixes(plan.metric_type) {
                    line_names.insert(format!("{}{suffix}", plan.name), chunk.family);
                }
            }
            if header_out == Some(chunk.family) {
                w.write_all(buffer.get(header_len..).unwrap_or_default())
            } else {
                header_out = Some(chunk.family);
                w.write_all(buffer)
            }
        },
    )?;

    let stored: HashSet<&str> = stored.iter().map(String::as_str).collect();
    IndexCache::with(|cache| cache.retain(&stored));

    let mut last_push = Vec::new();
    write_last_push(&clusters, format, selectors, id_label, &mut last_push);
    w.write_all(&last_push)?;
    w.flush()?;
    drop_elsewhere((clusters, plans, chunks));
    Ok(skips)
}

/// Drops `scrape` (its pins and plans) on a thread of its own: closing one file per cluster
/// (~10 ms for 10,000) here would hold back the response's last chunk, which is written when
/// this returns. Dropped here when no thread can be started.
fn drop_elsewhere<T: Send + 'static>(scrape: T) {
    // A failed spawn drops the closure, and `scrape` with it, here.
    let _ = std::thread::Builder::new()
        .name("federate-drop".to_string())
        .spawn(move || drop(scrape));
}

/// Adds cluster `c`'s `families` to the `plans` (in name order through `by_name`), each as a
/// part of the plan of its name, or a conflicting part when that plan has another type.
/// `plan_at` remembers the plan of each place in the clusters before: a family at the same
/// place under the same shared name is in the same plan.
fn plan_cluster(
    c: u32,
    families: &[FamilyRange],
    plans: &mut Vec<FamilyPlan>,
    by_name: &mut BTreeMap<Arc<str>, usize>,
    plan_at: &mut Vec<Option<(Arc<str>, usize)>>,
) {
    for (f, family) in families.iter().enumerate() {
        // Ours: a payload's family of this name would make it a second TYPE line.
        if &*family.name == LAST_PUSH_FAMILY {
            continue;
        }
        let metric_type = family.metric_type;
        let part = Part {
            cluster: c,
            // At most a payload's families, which fit 32 bits as their offsets do.
            family: u32::try_from(f).unwrap_or(u32::MAX),
            plain: family.plain.load(Ordering::Relaxed),
            start: family.start,
            end: family.end,
        };
        let at = match plan_at.get(f) {
            // The same allocation, so the same name.
            Some(Some((name, at))) if Arc::ptr_eq(name, &family.name) => *at,
            _ => {
                let at = match by_name.get(&*family.name) {
                    Some(&at) => at,
                    None => {
                        plans.push(FamilyPlan {
                            name: family.name.to_string(),
                            metric_type,
                            parts: Vec::new(),
                            conflicting: Vec::new(),
                        });
                        by_name.insert(Arc::clone(&family.name), plans.len() - 1);
                        plans.len() - 1
                    }
                };
                if plan_at.len() <= f {
                    plan_at.resize_with(f + 1, || None);
                }
                if let Some(slot) = plan_at.get_mut(f) {
                    *slot = Some((Arc::clone(&family.name), at));
                }
                at
            }
        };
        if let Some(plan) = plans.get_mut(at) {
            if plan.metric_type == metric_type {
                plan.parts.push(part);
            } else {
                plan.conflicting.push(part);
            }
        }
    }
}

/// Most input bytes (stored protobuf) one chunk of a family reads: its text is about three times
/// that, and a few chunks per worker are in memory at once, so a scrape's memory stays a few MB
/// however many clusters share a family.
const CHUNK_BYTES: u64 = 256 << 10;

/// Part of one family for a worker: its parts `parts` (indexes into [`FamilyPlan::parts`]);
/// the first chunk of a family also counts its conflicting parts.
struct Chunk {
    family: usize,
    parts: std::ops::Range<usize>,
    first: bool,
}

/// The families `order` (indexes into `plans`) cut into chunks of at most [`CHUNK_BYTES`] of
/// input (at least one part each), in order.
fn chunks(plans: &[FamilyPlan], order: impl Iterator<Item = usize>) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    for family in order {
        let Some(plan) = plans.get(family) else {
            continue;
        };
        let mut start = 0;
        let mut bytes = 0u64;
        for (i, part) in plan.parts.iter().enumerate() {
            bytes += u64::from(part.end.saturating_sub(part.start));
            if bytes >= CHUNK_BYTES {
                chunks.push(Chunk {
                    family,
                    parts: start..i + 1,
                    first: start == 0,
                });
                start = i + 1;
                bytes = 0;
            }
        }
        if start < plan.parts.len() || start == 0 {
            chunks.push(Chunk {
                family,
                parts: start..plan.parts.len(),
                first: start == 0,
            });
        }
    }
    chunks
}

/// Runs `work` on every item, spread over up to `workers` threads (each taking every n-th item,
/// at most [`AHEAD_PER_WORKER`] ahead), and hands the results to `sink` on this thread in the
/// items' order, with the buffer `work` filled (handed back to the worker for reuse). Stops at
/// the first error of `sink` (the client went away), which stops the workers.
fn in_order<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    work: impl Fn(&T, &mut Vec<u8>) -> R + Sync,
    mut sink: impl FnMut(&T, &[u8], R) -> io::Result<()>,
) -> io::Result<()> {
    let workers = workers.min(items.len());
    if workers <= 1 {
        let mut buffer = Vec::new();
        for item in items {
            let result = work(item, &mut buffer);
            sink(item, &buffer, result)?;
        }
        return Ok(());
    }
    let work = &work;
    std::thread::scope(|scope| {
        let mut lanes = Vec::with_capacity(workers);
        for first in 0..workers {
            let (ready, from_worker) = mpsc::sync_channel::<(Vec<u8>, R)>(AHEAD_PER_WORKER);
            let (to_worker, spares) = mpsc::channel::<Vec<u8>>();
            scope.spawn(move || {
                for item in items.iter().skip(first).step_by(workers) {
                    let mut buffer = spares.try_recv().unwrap_or_default();
                    let result = work(item, &mut buffer);
                    // An error means the writer stopped: stop too.
                    if ready.send((buffer, result)).is_err() {
                        break;
                    }
                }
            });
            lanes.push((from_worker, to_worker));
        }
        // Returning early (a write error) drops the lanes, which stops the workers.
        for (lane, item) in lanes.iter().cycle().zip(items) {
            let (from_worker, to_worker) = lane;
            let Ok((buffer, result)) = from_worker.recv() else {
                break;
            };
            sink(item, &buffer, result)?;
            // Handed back for the worker's next item, so buffers are not reallocated.
            let _ = to_worker.send(buffer);
        }
        Ok(())
    })
}

/// Pins cluster `id`'s upload and indexes its families (from the cache when the payload version is
/// the one they were found in); `None` (with a warning) when it cannot be read or its families
/// cannot be listed, so one bad file never fails a scrape.
fn index_cluster(store: &Store, id: &str) -> Option<(ClusterIndex, FamilyRanges)> {
    // What an earlier scrape learnt of this cluster's payload, if it is still the one stored
    // (the store then pins it without reading it).
    let known = IndexCache::with(|cache| {
        cache
            .clusters
            .get(id)
            .map(|(version, families)| (*version, Arc::clone(families)))
    });
    let mut pinned = match store.get_pinned_lazily(id, known.as_ref().map(|(version, _)| *version))
    {
        Ok(Some(pinned)) => pinned,
        // Expired or removed between listing and reading.
        Ok(None) => return None,
        Err(e) => {
            warn!("federate: skipping cluster {id:?}: {e}");
            return None;
        }
    };
    let received_seconds = pinned
        .upload
        .received
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    // Ranges are kept in 32 bits: a longer payload (none validation lets in) is not cached.
    let version = pinned
        .version()
        .filter(|_| pinned.payload_len() <= u64::from(u32::MAX));
    let cached = match (version, known) {
        (Some(version), Some((known, families))) if version == known => Some(families),
        _ => None,
    };
    let families = match cached {
        Some(families) => families,
        None => {
            let payload = if pinned.payload_read() {
                std::mem::take(&mut pinned.upload.payload)
            } else {
                let mut payload = Vec::new();
                if let Err(e) = pinned.read_range(0, pinned.payload_len(), &mut payload) {
                    warn!("federate: skipping cluster {id:?}: {e}");
                    return None;
                }
                payload
            };
            let families = index_payload(id, &payload)?;
            let families: Vec<FamilyRange> = IndexCache::with(|cache| {
                families
                    .into_iter()
                    .map(|(name, metric_type, start, end)| FamilyRange {
                        name: cache.intern(name),
                        metric_type,
                        start,
                        end,
                        plain: AtomicBool::new(false),
                    })
                    .collect()
            });
            let families: FamilyRanges = families.into();
            if let Some(version) = version {
                IndexCache::with(|cache| {
                    cache
                        .clusters
                        .insert(id.to_string(), (version, Arc::clone(&families)))
                });
            }
            families
        }
    };
    // Dropped whether read or not: pass 2 reads the ranges again from the pinned file.
    pinned.upload.payload = Vec::new();
    Some((
        ClusterIndex {
            // The pin's own copy (the store checked it is `id`): one allocation less a cluster.
            cluster_id: std::mem::take(&mut pinned.upload.cluster_id),
            received_seconds,
            pinned,
            families: Arc::clone(&families),
        },
        families,
    ))
}

/// Where `payload`'s families are: (name, type, byte range of the message without its prefix);
/// `None` (with a warning) when they cannot be listed or a range does not fit 32 bits.
fn index_payload<'p>(id: &str, payload: &'p [u8]) -> Option<Vec<(&'p str, MetricType, u32, u32)>> {
    let base = payload.as_ptr() as usize;
    let mut families = Vec::new();
    for family in wire::families(payload, &stored_limits()) {
        match family {
            Ok(family) => {
                // The view borrows from `payload`: its offset there is the pointer difference.
                let start = (family.message.as_ptr() as usize).saturating_sub(base);
                let end = start + family.message.len();
                let (Ok(start), Ok(end)) = (u32::try_from(start), u32::try_from(end)) else {
                    warn!("federate: skipping cluster {id:?}: its payload passes 4 GiB");
                    return None;
                };
                families.push((family.name, family.metric_type(), start, end));
            }
            Err(e) => {
                warn!("federate: skipping cluster {id:?}: stored payload does not decode: {e}");
                return None;
            }
        }
    }
    Some(families)
}

/// Whether a series of family `name` (of `metric_type`) with `labels` is selected: always without
/// selectors, else when any selector matches the family name (or, for a histogram or summary, one
/// of the names its lines carry).
fn selected(
    selectors: &[Selector],
    name: &str,
    metric_type: MetricType,
    labels: &[LabelPair],
) -> bool {
    if selectors.is_empty() {
        return true;
    }
    if telemeter_common::selector::any_matches(selectors, name, labels) {
        return true;
    }
    line_suffixes(metric_type).iter().any(|suffix| {
        telemeter_common::selector::any_matches(selectors, &format!("{name}{suffix}"), labels)
    })
}

/// The suffixes of the names a family of `metric_type` writes lines under besides its own.
fn line_suffixes(metric_type: MetricType) -> &'static [&'static str] {
    match metric_type {
        MetricType::Histogram | MetricType::GaugeHistogram => &["_bucket", "_sum", "_count"],
        MetricType::Summary => &["_sum", "_count"],
        _ => &[],
    }
}

/// A borrowed series' labels, owned, for the selectors; `None` when they do not decode.
fn owned_labels(metric: &wire::MetricView<'_>) -> Option<Vec<LabelPair>> {
    metric
        .labels()
        .map(|label| {
            label.ok().map(|(name, value)| LabelPair {
                name: Some(name.to_string()),
                value: Some(value.to_string()),
            })
        })
        .collect()
}

/// Appends one chunk of family `plan` to `out` in `format`: in text, the header, then the
/// selected series of each of the chunk's parts, read from the pinned files; in protobuf, one
/// message of them. A part that cannot be read or decoded is left out with a warning; the first
/// chunk counts the series of the conflicting parts. Returns the length of the text header `out`
/// starts with (0 in protobuf, or without series) and how many series it wrote.
fn encode_chunk(
    plan: &FamilyPlan,
    chunk: &Chunk,
    clusters: &[ClusterIndex],
    format: Format,
    selectors: &[Selector],
    out: &mut Vec<u8>,
    skips: &mut Skips,
) -> (usize, usize) {
    let mut bytes = Vec::new();
    let mut header_written = false;
    // Protobuf: the family's message body, then written with its length prefix.
    let mut message = Vec::new();
    // Series written, in either format.
    let mut series = 0usize;
    let parts = plan.parts.get(chunk.parts.clone()).unwrap_or_default();
    for &Part {
        cluster: c,
        family: f,
        plain: known_plain,
        start,
        end,
    } in parts
    {
        let (start, end) = (u64::from(start), u64::from(end));
        let Some(cluster) = clusters.get(c as usize) else {
            continue;
        };
        let id = cluster.cluster_id.as_str();
        let read = match cluster.pinned.read_range_reusing(start, end, &mut bytes) {
            Ok(read) => read,
            Err(e) => {
                warn!(
                    "federate: skipping family {:?} of cluster {id:?}: {e}",
                    plan.name
                );
                continue;
            }
        };
        let family = match parse_family(read) {
            Ok(family) => family,
            Err(e) => {
                warn!(
                    "federate: skipping family {:?} of cluster {id:?}: {e}",
                    plan.name
                );
                continue;
            }
        };
        let mut skipped = Skipped::default();
        let result = match format {
            Format::Text => {
                let mark = out.len();
                let header_before = header_written;
                let mut kept = 0usize;
                let mut keep = |metric: &wire::MetricView<'_>| {
                    let keep = selectors.is_empty()
                        || owned_labels(metric).is_some_and(|labels| {
                            selected(selectors, family.name, plan.metric_type, &labels)
                        });
                    kept += usize::from(keep);
                    keep
                };
                let result = text::write_family_view_part_plain(
                    out,
                    &family,
                    false,
                    &mut skipped,
                    &mut header_written,
                    &mut keep,
                    known_plain,
                );
                if result.is_err() {
                    out.truncate(mark);
                    header_written = header_before;
                } else {
                    // Every series `keep` accepted is written or counted as skipped; the only
                    // skip before `keep` (an invalid family name) comes with none accepted.
                    series += kept.saturating_sub(skipped.total() as usize);
                }
                // Learnt only from a scrape that kept every series (selectors leave some out,
                // unchecked).
                if let Ok(plain) = result {
                    if selectors.is_empty() && plain != known_plain {
                        if let Some(range) = cluster.families.get(f as usize) {
                            range.plain.store(plain, Ordering::Relaxed);
                        }
                    }
                }
                result.map(|_| ()).map_err(|e| e.to_string())
            }
            Format::ProtoDelimited => {
                let mark = message.len();
                let result = protobuf_part(&family, selectors, &mut message, &mut skipped);
                match result {
                    Ok(n) => {
                        series += n;
                        Ok(())
                    }
                    Err(e) => {
                        message.truncate(mark);
                        Err(e.to_string())
                    }
                }
            }
        };
        if let Err(e) = result {
            warn!(
                "federate: skipping family {:?} of cluster {id:?}: {e}",
                plan.name
            );
        }
        skips.add(id, &skipped);
    }
    let conflicting: &[Part] = if chunk.first { &plan.conflicting } else { &[] };
    for &Part {
        cluster: c,
        start,
        end,
        ..
    } in conflicting
    {
        let (start, end) = (u64::from(start), u64::from(end));
        let Some(cluster) = clusters.get(c as usize) else {
            continue;
        };
        let mut skipped = Skipped::default();
        if let Ok(read) = cluster.pinned.read_range_reusing(start, end, &mut bytes) {
            if let Ok(family) = parse_family(read) {
                for _ in family.metrics() {
                    skipped.add(SkipReason::TypeConflict);
                }
            }
        }
        skips.add(&cluster.cluster_id, &skipped);
    }
    if format == Format::ProtoDelimited && series > 0 {
        prost::encoding::encode_varint(message.len() as u64, out);
        out.extend_from_slice(&message);
    }
    match format {
        Format::Text => (header_len(out), series),
        // A chunk is a message of its own (see the module doc): nothing to drop.
        Format::ProtoDelimited => (0, series),
    }
}

/// A stored family part as [`wire::FamilyView::parse`] reads it: the quick way when it is framed
/// as encoders frame it ([`text::usual_family`]: every family of every cluster is parsed once a
/// scrape, and the general reader's walk of its series was a few percent of it).
fn parse_family(message: &[u8]) -> Result<wire::FamilyView<'_>, DecodeError> {
    match text::usual_family(message) {
        Some(family) => Ok(family),
        None => wire::FamilyView::parse(message),
    }
}

/// The length of the `# HELP`/`# TYPE` lines a text chunk starts with (0 without series): a
/// later chunk of a family whose header is out already is written without them. Help text has
/// its newlines escaped, so each is one line.
fn header_len(text: &[u8]) -> usize {
    let mut at = 0;
    for prefix in [&b"# HELP "[..], &b"# TYPE "[..]] {
        let rest = text.get(at..).unwrap_or_default();
        if rest.starts_with(prefix) {
            at += rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |end| end + 1);
        }
    }
    at
}

/// Appends one cluster's part of a family to `message` as protobuf fields without timestamps:
/// concatenated, the parts of a family form one message (repeated `metric` fields append; the
/// name, help and type repeat with the same values). Returns how many series it holds.
fn protobuf_part(
    family: &wire::FamilyView<'_>,
    selectors: &[Selector],
    message: &mut Vec<u8>,
    skipped: &mut Skipped,
) -> Result<usize, ServeError> {
    let mut part = Vec::new();
    if selectors.is_empty() {
        write_family_protobuf(&mut part, family, skipped)?;
    } else {
        let mut owned = <MetricFamily as prost::Message>::decode(family.message)
            .map_err(|e| ServeError::Decode(DecodeError::Invalid(e.to_string())))?;
        let metric_type = family.metric_type();
        owned
            .metric
            .retain(|metric| selected(selectors, family.name, metric_type, &metric.label));
        if owned.metric.is_empty() {
            return Ok(0);
        }
        let mut filtered = Vec::new();
        delimited::encode_family(&owned, &mut filtered);
        let Ok(view) = wire::FamilyView::parse(strip_prefix(&filtered)) else {
            return Ok(0);
        };
        write_family_protobuf(&mut part, &view, skipped)?;
    }
    if part.is_empty() {
        return Ok(0);
    }
    let body = strip_prefix(&part);
    let series = wire::FamilyView::parse(body)
        .map(|view| view.metrics().count())
        .unwrap_or(0);
    message.extend_from_slice(body);
    Ok(series)
}

/// A length-prefixed message without its prefix (empty when the prefix does not read).
fn strip_prefix(framed: &[u8]) -> &[u8] {
    let mut rest = framed;
    match prost::encoding::decode_varint(&mut rest) {
        Ok(_) => rest,
        Err(_) => &[],
    }
}

/// Appends the last-push family: one gauge per cluster served (and selected), its value the time
/// the server accepted the cluster's stored upload.
fn write_last_push(
    clusters: &[ClusterIndex],
    format: Format,
    selectors: &[Selector],
    id_label: &str,
    out: &mut Vec<u8>,
) {
    let metric = clusters
        .iter()
        .map(|cluster| Metric {
            label: vec![LabelPair {
                name: Some(id_label.to_string()),
                value: Some(cluster.cluster_id.clone()),
            }],
            gauge: Some(Gauge {
                value: Some(cluster.received_seconds),
            }),
            ..Metric::default()
        })
        .filter(|metric| {
            selected(
                selectors,
                LAST_PUSH_FAMILY,
                MetricType::Gauge,
                &metric.label,
            )
        })
        .collect::<Vec<_>>();
    if metric.is_empty() {
        return;
    }
    let family = MetricFamily {
        name: Some(LAST_PUSH_FAMILY.to_string()),
        help: Some(
            "When this server accepted the cluster's stored upload, in seconds since the epoch."
                .to_string(),
        ),
        r#type: Some(MetricType::Gauge as i32),
        metric,
    };
    match format {
        Format::Text => {
            // Writing to a Vec cannot fail.
            let _ = text::write_family(out, &family, false);
        }
        Format::ProtoDelimited => delimited::encode_family(&family, out),
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
