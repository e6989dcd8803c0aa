//! Merging a remote-write request's samples into what a cluster has stored.
//!
//! A remote-write request carries some of a cluster's series (a shard's batch), so storing it
//! would erase the others from `/federate`: it is merged instead. Series are identified by family
//! name and label set (order-independent); the newer sample wins; a Prometheus staleness marker
//! newer than the stored sample removes the series (Prometheus sends one when a series ends);
//! series whose sample is older than the TTL are dropped, so a cluster's payload does not grow
//! with every series it ever sent.
//!
//! Read, merge and put of one cluster run under one of [`STRIPES`] locks chosen by its id, so two
//! requests of a cluster cannot both read the same payload and each write back only their own
//! series. Striped (not one lock per cluster) so the locks take fixed memory whatever the number of
//! cluster ids; two clusters sharing a stripe only wait for each other's merge.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use telemeter_common::delimited::{self, Limits};
use telemeter_common::model::{
    Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType, Untyped,
};

use crate::ingest::placement::store_merged_then_ship;
use crate::remote_write::RemoteWriter;
use crate::store::{Store, StoreError};

/// Locks around read-merge-put, chosen by cluster id.
const STRIPE_COUNT: usize = 64;

/// The stripes; see the module documentation.
static STRIPES: [Mutex<()>; STRIPE_COUNT] = [const { Mutex::new(()) }; STRIPE_COUNT];

/// The bit pattern Prometheus writes as a staleness marker (`value.StaleNaN`).
const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// Whether `value` is Prometheus's staleness marker.
pub fn is_stale_marker(value: f64) -> bool {
    value.to_bits() == STALE_NAN_BITS
}

/// The help text of every family remote write builds. It is what makes "this cluster has
/// remote-write series" durable: it travels in the stored payload (journal, checkpoint, handoff
/// to another owner) and disappears with the last such series when the TTL drops it, so a restart
/// or a move learns it back from the payload itself ([`uses_remote_write`]).
pub const REMOTE_WRITE_HELP: &str = "Received by remote write.";

/// Per store directory, per cluster: the newest remote-write sample stored (ms), `i64::MIN` when
/// the stored payload has none. Learned from the payload at a cluster's first upload after start,
/// kept up to date by every merge, so an upload reads its cluster's payload at most once per
/// process unless the cluster uses remote write. One entry per cluster that pushed, as the
/// store's own index.
static NEWEST_RECEIVED: Mutex<Option<HashMap<PathBuf, HashMap<String, i64>>>> = Mutex::new(None);

/// Records what a merge stored (`learned` false), or what a payload read says (`learned` true:
/// then only if nothing is known yet, so a read that raced with a merge cannot undo it).
fn note_newest(store: &Store, cluster_id: &str, newest_ms: i64, learned: bool) {
    let mut all = telemeter_common::sync::lock(&NEWEST_RECEIVED);
    let clusters = all
        .get_or_insert_with(HashMap::new)
        .entry(store.dir().to_path_buf())
        .or_default();
    if learned {
        clusters.entry(cluster_id.to_string()).or_insert(newest_ms);
    } else {
        clusters.insert(cluster_id.to_string(), newest_ms);
    }
}

/// The newest remote-write sample in `families`, `i64::MIN` when none.
fn newest_received(families: &[MetricFamily]) -> i64 {
    families
        .iter()
        .filter(|f| f.help.as_deref() == Some(REMOTE_WRITE_HELP))
        .flat_map(|f| f.metric.iter().filter_map(|m| m.timestamp_ms))
        .max()
        .unwrap_or(i64::MIN)
}

/// Whether `cluster_id` has remote-write series within the TTL: then its uploads are merged
/// into its series (like remote write) rather than replacing them. Reads the stored payload
/// only the first time a cluster is asked about in this process.
pub fn uses_remote_write(store: &Store, cluster_id: &str, now: SystemTime) -> bool {
    let oldest = telemeter_common::time::sample_millis(now)
        .saturating_sub(telemeter_common::time::duration_millis(store.ttl()));
    let known = telemeter_common::sync::lock(&NEWEST_RECEIVED)
        .as_ref()
        .and_then(|all| all.get(store.dir()))
        .and_then(|clusters| clusters.get(cluster_id).copied());
    let newest = match known {
        Some(newest) => newest,
        None => {
            let newest = match store.get(cluster_id) {
                Ok(Some(upload)) => delimited::decode(&upload.payload, &UNLIMITED)
                    .map(|families| newest_received(&families))
                    .unwrap_or(i64::MIN),
                Ok(None) => i64::MIN,
                // Unreadable now: not remembered, asked again next time.
                Err(_) => return false,
            };
            note_newest(store, cluster_id, newest, true);
            newest
        }
    };
    newest >= oldest
}

/// Stores an upload of a cluster that [`uses_remote_write`]: merged into its series like a
/// remote-write request (so neither path erases the other's series), and shipped as it came.
pub fn store_upload_merged(
    store: &Store,
    remote_write: Option<&RemoteWriter>,
    cluster_id: &str,
    payload: Vec<u8>,
    received: SystemTime,
) -> Result<(), StoreError> {
    match store_received(
        store,
        remote_write,
        cluster_id,
        payload,
        None,
        received,
        usize::MAX,
    ) {
        Ok(()) | Err(MergeError::TooManySeries { .. }) => Ok(()),
        Err(MergeError::Store(e)) => Err(e),
    }
}

/// Decoding limits for payloads this server wrote itself.
const UNLIMITED: Limits = Limits {
    max_message_bytes: usize::MAX,
    max_total_bytes: usize::MAX,
    max_families: usize::MAX,
    max_series: usize::MAX,
};

/// Why a merge could not be stored.
#[derive(Debug)]
pub enum MergeError {
    /// Reading or writing the store failed.
    Store(StoreError),
    /// The merged series would pass the per-cluster cap.
    TooManySeries {
        /// The cap.
        limit: usize,
    },
}

impl std::fmt::Display for MergeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MergeError::Store(e) => write!(f, "{e}"),
            MergeError::TooManySeries { limit } => write!(
                f,
                "the cluster would hold more than {limit} series (--max-series)"
            ),
        }
    }
}

impl std::error::Error for MergeError {}

impl From<StoreError> for MergeError {
    fn from(e: StoreError) -> Self {
        MergeError::Store(e)
    }
}

/// Merges `delta` (validated families, protobuf-delimited) into `cluster_id`'s stored payload and
/// stores the result durably, then ships `delta` (only the request's samples: re-shipping stored
/// ones would make the receiver refuse them as out of order) to `remote_write`. Every path that
/// stores a remote-write request it owns (received here, forwarded here) goes through here.
/// `delta_families` are `delta` decoded, when the caller has them (else they are decoded here).
pub fn store_received(
    store: &Store,
    remote_write: Option<&RemoteWriter>,
    cluster_id: &str,
    delta: Vec<u8>,
    delta_families: Option<Vec<MetricFamily>>,
    received: SystemTime,
    max_series: usize,
) -> Result<(), MergeError> {
    let limits = UNLIMITED;
    // Only this server's own validated payloads are decoded here (a sealed forward's too); a
    // failure means corruption the store's checksum missed, and the cluster starts over rather
    // than being stuck.
    let delta_families = match delta_families {
        Some(families) => families,
        None => delimited::decode(&delta, &limits).unwrap_or_default(),
    };
    let _stripe = telemeter_common::sync::lock(stripe(cluster_id));
    let stored = match store.get(cluster_id)? {
        Some(upload) => delimited::decode(&upload.payload, &limits).unwrap_or_else(|e| {
            log::warn!(
                "cluster {cluster_id:?}: stored payload unreadable ({e}); merging into nothing"
            );
            Vec::new()
        }),
        None => Vec::new(),
    };
    let oldest_ms = telemeter_common::time::sample_millis(received)
        .saturating_sub(telemeter_common::time::duration_millis(store.ttl()));
    let merged = merge(stored, delta_families, oldest_ms);
    let series: usize = merged.iter().map(|f| f.metric.len()).sum();
    if series > max_series {
        return Err(MergeError::TooManySeries { limit: max_series });
    }
    let newest = newest_received(&merged);
    let payload = delimited::encode(&merged);
    store_merged_then_ship(store, remote_write, cluster_id, payload, delta, received)?;
    note_newest(store, cluster_id, newest, false);
    Ok(())
}

/// The stripe lock of `cluster_id`.
fn stripe(cluster_id: &str) -> &'static Mutex<()> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    cluster_id.hash(&mut hasher);
    &STRIPES[(hasher.finish() as usize) % STRIPE_COUNT]
}

/// A series' labels as sorted pairs of references (its identity within its family, whatever
/// order the labels came in).
fn sorted_labels(metric: &Metric) -> Vec<(&str, &str)> {
    let mut labels: Vec<(&str, &str)> = metric
        .label
        .iter()
        .map(|l| {
            (
                l.name.as_deref().unwrap_or_default(),
                l.value.as_deref().unwrap_or_default(),
            )
        })
        .collect();
    labels.sort_unstable();
    labels
}

/// The hash of a series' identity, keyed per merge (random keys: a sender cannot craft
/// collisions); equal hashes are confirmed by comparing the labels.
fn identity_hash(keys: &RandomState, metric: &Metric) -> u64 {
    keys.hash_one(sorted_labels(metric))
}

/// Whether a family of this type holds one plain value per series (so series can move between
/// these types by carrying their value over).
fn is_plain(kind: MetricType) -> bool {
    matches!(
        kind,
        MetricType::Counter | MetricType::Gauge | MetricType::Untyped
    )
}

fn kind_of(family: &MetricFamily) -> MetricType {
    family
        .r#type
        .and_then(|t| MetricType::try_from(t).ok())
        .unwrap_or(MetricType::Untyped)
}

/// The plain value of a counter, gauge or untyped series.
fn plain_value(metric: &Metric) -> Option<f64> {
    metric
        .untyped
        .and_then(|v| v.value)
        .or_else(|| metric.gauge.and_then(|v| v.value))
        .or_else(|| metric.counter.and_then(|v| v.value))
}

/// Makes `metric` carry `value` as a series of a `kind` family.
fn set_plain(metric: &mut Metric, kind: MetricType, value: f64) {
    metric.untyped = None;
    metric.gauge = None;
    metric.counter = None;
    match kind {
        MetricType::Counter => metric.counter = Some(Counter { value: Some(value) }),
        MetricType::Gauge => metric.gauge = Some(Gauge { value: Some(value) }),
        _ => metric.untyped = Some(Untyped { value: Some(value) }),
    }
}

/// Merges `delta` into `stored`: per series the newer sample wins (a staleness marker that wins
/// removes the series), then series older than `oldest_ms` are dropped, and empty families with
/// them. When a family changes type, the delta's type wins: plain series carry their value over,
/// and a histogram or summary family is replaced whole (its series cannot be mixed with others).
pub fn merge(
    stored: Vec<MetricFamily>,
    delta: Vec<MetricFamily>,
    oldest_ms: i64,
) -> Vec<MetricFamily> {
    let mut families = stored;
    let mut by_name: HashMap<String, usize> = families
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name.clone().unwrap_or_default(), i))
        .collect();
    // Per family, series identity hash → positions; built on first use.
    let keys = RandomState::new();
    let mut indexes: HashMap<usize, HashMap<u64, Vec<usize>>> = HashMap::new();
    for incoming in delta {
        let name = incoming.name.clone().unwrap_or_default();
        let kind = kind_of(&incoming);
        let Some(&at) = by_name.get(&name) else {
            by_name.insert(name, families.len());
            families.push(incoming);
            continue;
        };
        let existing_kind = kind_of(&families[at]);
        if existing_kind != kind {
            if is_plain(kind) && is_plain(existing_kind) {
                let family = &mut families[at];
                for metric in &mut family.metric {
                    if let Some(v) = plain_value(metric) {
                        set_plain(metric, kind, v);
                    }
                }
                family.r#type = incoming.r#type;
            } else {
                families[at] = incoming;
                indexes.remove(&at);
                continue;
            }
        }
        let family = &mut families[at];
        if incoming.help.as_deref() == Some(REMOTE_WRITE_HELP) {
            family.help = incoming.help.clone();
        }
        let index = indexes.entry(at).or_insert_with(|| {
            let mut index: HashMap<u64, Vec<usize>> = HashMap::with_capacity(family.metric.len());
            for (i, m) in family.metric.iter().enumerate() {
                index.entry(identity_hash(&keys, m)).or_default().push(i);
            }
            index
        });
        for metric in incoming.metric {
            let hash = identity_hash(&keys, &metric);
            let positions = index.entry(hash).or_default();
            let wanted = sorted_labels(&metric);
            let found = positions
                .iter()
                .copied()
                .find(|&i| sorted_labels(&family.metric[i]) == wanted);
            drop(wanted);
            match found {
                Some(i) => {
                    let current = &mut family.metric[i];
                    if metric.timestamp_ms.unwrap_or(i64::MIN)
                        >= current.timestamp_ms.unwrap_or(i64::MIN)
                    {
                        *current = metric;
                    }
                }
                None => {
                    positions.push(family.metric.len());
                    family.metric.push(metric);
                }
            }
        }
    }
    for family in &mut families {
        family.metric.retain(|m| {
            m.timestamp_ms.unwrap_or(i64::MIN) >= oldest_ms
                && !plain_value(m).is_some_and(is_stale_marker)
        });
    }
    families.retain(|f| !f.metric.is_empty());
    families
}

/// One series of a remote-write family: sorted `labels` (without `__name__`), `value` at
/// `timestamp_ms`.
pub fn untyped_series(labels: Vec<LabelPair>, value: f64, timestamp_ms: i64) -> Metric {
    Metric {
        label: labels,
        untyped: Some(Untyped { value: Some(value) }),
        timestamp_ms: Some(timestamp_ms),
        ..Metric::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family(name: &str, kind: MetricType, series: &[(&str, f64, i64)]) -> MetricFamily {
        MetricFamily {
            name: Some(name.into()),
            help: None,
            r#type: Some(kind as i32),
            metric: series
                .iter()
                .map(|(job, v, ts)| {
                    let mut m = untyped_series(vec![LabelPair::new("job", job)], *v, *ts);
                    set_plain(&mut m, kind, *v);
                    m
                })
                .collect(),
        }
    }

    fn values(families: &[MetricFamily]) -> Vec<(String, String, f64, i64)> {
        let mut out: Vec<_> = families
            .iter()
            .flat_map(|f| {
                f.metric.iter().map(move |m| {
                    (
                        f.name.clone().unwrap(),
                        m.label_value("job").unwrap().to_string(),
                        plain_value(m).unwrap(),
                        m.timestamp_ms.unwrap(),
                    )
                })
            })
            .collect();
        out.sort_by(|a, b| a.partial_cmp(b).unwrap());
        out
    }

    #[test]
    fn disjoint_series_are_both_kept_and_newer_samples_win() {
        let stored = vec![family(
            "up",
            MetricType::Untyped,
            &[("a", 1.0, 100), ("b", 1.0, 100)],
        )];
        let delta = vec![
            family(
                "up",
                MetricType::Untyped,
                &[("b", 0.0, 200), ("c", 1.0, 200)],
            ),
            family("x", MetricType::Untyped, &[("a", 5.0, 200)]),
        ];
        let merged = merge(stored, delta, 0);
        assert_eq!(
            values(&merged),
            vec![
                ("up".into(), "a".into(), 1.0, 100),
                ("up".into(), "b".into(), 0.0, 200),
                ("up".into(), "c".into(), 1.0, 200),
                ("x".into(), "a".into(), 5.0, 200),
            ]
        );
        // An older sample does not replace a newer one.
        let merged = merge(
            merged,
            vec![family("up", MetricType::Untyped, &[("b", 9.0, 150)])],
            0,
        );
        assert!(values(&merged).contains(&("up".into(), "b".into(), 0.0, 200)));
    }

    #[test]
    fn ttl_and_staleness_markers_drop_series() {
        let stored = vec![family(
            "up",
            MetricType::Untyped,
            &[("a", 1.0, 100), ("b", 1.0, 300)],
        )];
        let stale = f64::from_bits(STALE_NAN_BITS);
        let merged = merge(
            stored,
            vec![family("up", MetricType::Untyped, &[("b", stale, 400)])],
            200,
        );
        assert!(merged.is_empty(), "{merged:?}");
    }

    #[test]
    fn the_delta_type_wins() {
        let stored = vec![family("up", MetricType::Gauge, &[("a", 1.0, 100)])];
        let merged = merge(
            stored,
            vec![family("up", MetricType::Untyped, &[("b", 2.0, 100)])],
            0,
        );
        assert_eq!(kind_of(&merged[0]), MetricType::Untyped);
        assert_eq!(values(&merged).len(), 2);
        assert!(merged[0]
            .metric
            .iter()
            .all(|m| m.untyped.is_some() && m.gauge.is_none()));
    }

    #[test]
    fn label_order_does_not_change_identity() {
        let mut one = untyped_series(
            vec![LabelPair::new("a", "1"), LabelPair::new("b", "2")],
            1.0,
            100,
        );
        let stored = vec![MetricFamily {
            name: Some("m".into()),
            r#type: Some(MetricType::Untyped as i32),
            metric: vec![one.clone()],
            help: None,
        }];
        one.label.reverse();
        one.timestamp_ms = Some(200);
        let delta = vec![MetricFamily {
            name: Some("m".into()),
            r#type: Some(MetricType::Untyped as i32),
            metric: vec![one],
            help: None,
        }];
        let merged = merge(stored, delta, 0);
        assert_eq!(merged[0].metric.len(), 1);
        assert_eq!(merged[0].metric[0].timestamp_ms, Some(200));
    }
}
