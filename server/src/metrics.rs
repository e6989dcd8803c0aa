//! The server's own metrics, served on the internal port's `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use telemeter_common::http::Stats;
use telemeter_common::instrument::{
    Counter, CounterVec, GaugeVec, Histogram, HistogramVec, Registry, LATENCY_BUCKETS,
};

use crate::store::StoreStats;

/// Every metric the server keeps, registered once at start.
#[derive(Clone)]
pub struct Metrics {
    /// The registry they render from.
    pub registry: Registry,
    /// Uploads by result (`stored`, `empty`, `rejected`, `failed`) and status code.
    pub uploads: CounterVec,
    /// Upload body bytes received, as sent (compressed).
    pub upload_bytes: Counter,
    /// Series stored from uploads.
    pub upload_series: Counter,
    /// Series dropped by the whitelist.
    pub filtered_series: Counter,
    /// `/authorize` calls by result (`ok`, `denied`, `error`).
    pub authorize: CounterVec,
    /// Store write latency.
    pub store_write_seconds: HistogramVec,
    /// `/federate` duration, whole response streamed.
    pub federate_seconds: HistogramVec,
    /// Series `/federate` left out because they could not be written validly, by reason.
    pub federate_skipped: CounterVec,
    /// Uploads refused by the rate limit (the slot, or the budget of refusals).
    pub ratelimited: Counter,
    /// Clusters stored now.
    pub stored_clusters: GaugeVec,
    /// Payload bytes stored now.
    pub stored_bytes: GaugeVec,
    store_commits: CounterVec,
    store_writes: CounterVec,
    store_corrupt: CounterVec,
    store_expired: CounterVec,
    /// Seconds the checkpointer waited for `/federate` scrapes, as the store last counted them
    /// (f64 bits): the registry's counters hold whole numbers, this one is read at render time.
    store_checkpoint_yielded: Arc<AtomicU64>,
    http_open: GaugeVec,
    http_accepted: CounterVec,
    http_rejected: CounterVec,
    http_evicted: CounterVec,
    http_protocol_errors: CounterVec,
    http_peer_rejected: CounterVec,
    http_refused_heads: CounterVec,
    http_body_bytes: GaugeVec,
    // The front counters are copied in as deltas; the lock keeps two concurrent scrapes from both
    // adding the same delta.
    refresh: std::sync::Arc<Mutex<()>>,
    /// What almost every upload counts, looked up once.
    per_upload: Arc<PerUpload>,
}

/// The children of the vectors almost every upload counts, each looked up at its first use (so
/// /metrics shows it from then on, as before): a `with` takes the registry's lock, which the
/// uploads of every connection would contend for, and allocates its label values.
#[derive(Default)]
struct PerUpload {
    /// `uploads{result="stored",status="200"}`.
    stored: OnceLock<Counter>,
    /// `uploads{result="empty",status="200"}`.
    empty: OnceLock<Counter>,
    /// `store_write_seconds`.
    store_write: OnceLock<Histogram>,
}

impl Metrics {
    /// Registers every metric in a new registry.
    pub fn new() -> Metrics {
        let r = Registry::new();
        telemeter_common::process::register_process_metrics(&r);
        telemeter_common::process::register_build_info(
            &r,
            "telemeter_server_build_info",
            crate::BUILD,
        );
        Metrics {
            uploads: r.counter(
                "telemeter_server_uploads_total",
                "Uploads received, by result and HTTP status.",
                &["result", "status"],
            ),
            upload_bytes: r
                .counter(
                    "telemeter_server_upload_bytes_total",
                    "Upload body bytes received, as sent (compressed).",
                    &[],
                )
                .with(&[]),
            upload_series: r
                .counter(
                    "telemeter_server_upload_series_total",
                    "Series stored from accepted uploads.",
                    &[],
                )
                .with(&[]),
            filtered_series: r
                .counter(
                    "telemeter_server_filtered_series_total",
                    "Series dropped because they matched no whitelist selector.",
                    &[],
                )
                .with(&[]),
            authorize: r.counter(
                "telemeter_server_authorize_total",
                "Calls of /authorize, by result.",
                &["result"],
            ),
            store_write_seconds: r.histogram(
                "telemeter_server_store_write_seconds",
                "Time to store an upload durably.",
                &[],
                LATENCY_BUCKETS,
            ),
            federate_seconds: r.histogram(
                "telemeter_server_federate_seconds",
                "Time to stream a whole /federate response.",
                &[],
                LATENCY_BUCKETS,
            ),
            federate_skipped: {
                let skipped = r.counter(
                    "telemeter_server_federate_series_skipped_total",
                    "Stored series /federate left out because Prometheus would refuse their line (and with it the whole scrape), by reason.",
                    &["reason"],
                );
                // Every reason from the start, so an alert on an increase sees the first one.
                for reason in telemeter_common::text::SkipReason::ALL {
                    skipped.with(&[reason.as_str()]);
                }
                skipped.with(&[crate::federate::NAME_COLLISION]);
                skipped
            },
            ratelimited: r
                .counter(
                    "telemeter_server_ratelimited_total",
                    "Uploads refused (429) before being read: the cluster stored an upload within the window, or had its budget of uploads read but not stored spent.",
                    &[],
                )
                .with(&[]),
            stored_clusters: r.gauge(
                "telemeter_server_stored_clusters",
                "Clusters stored and served now.",
                &[],
            ),
            stored_bytes: r.gauge(
                "telemeter_server_stored_bytes",
                "Payload bytes stored now.",
                &[],
            ),
            store_commits: r.counter(
                "telemeter_server_store_commits_total",
                "Group commits of the store (one directory sync each).",
                &[],
            ),
            store_writes: r.counter(
                "telemeter_server_store_writes_total",
                "Uploads written by the store.",
                &[],
            ),
            store_corrupt: r.counter(
                "telemeter_server_store_corrupt_files_total",
                "Stored files set aside because their checksum failed.",
                &[],
            ),
            store_expired: r.counter(
                "telemeter_server_store_expired_total",
                "Stored files removed because their cluster was not pushed within the TTL.",
                &[],
            ),
            store_checkpoint_yielded: {
                let seconds = Arc::new(AtomicU64::new(0f64.to_bits()));
                let read = Arc::clone(&seconds);
                r.counter_fn(
                    "telemeter_server_store_checkpoint_yielded_seconds_total",
                    "Seconds the store's checkpointer waited for /federate scrapes in progress before writing cluster files (bounded per journal segment).",
                    Box::new(move || f64::from_bits(read.load(Ordering::Relaxed))),
                );
                seconds
            },
            http_open: r.gauge(
                "telemeter_server_http_open_connections",
                "Connections open now, by port.",
                &["port"],
            ),
            http_accepted: r.counter(
                "telemeter_server_http_accepted_connections_total",
                "Connections accepted, by port.",
                &["port"],
            ),
            http_rejected: r.counter(
                "telemeter_server_http_rejected_connections_total",
                "Connections refused because the connection cap was reached, by port.",
                &["port"],
            ),
            http_evicted: r.counter(
                "telemeter_server_http_evicted_connections_total",
                "Connections closed at the connection cap to make room: the one that had waited longest without completing a request, by port.",
                &["port"],
            ),
            http_protocol_errors: r.counter(
                "telemeter_server_http_protocol_errors_total",
                "Requests the HTTP front answered itself with a protocol error, by port.",
                &["port"],
            ),
            http_peer_rejected: r.counter(
                "telemeter_server_http_peer_rejected_total",
                "Connections and request bodies (what) refused because their client address held its share (--max-connections-per-peer, --max-body-bytes-per-peer), by port.",
                &["port", "what"],
            ),
            http_refused_heads: r.counter(
                "telemeter_server_http_refused_heads_total",
                "Requests refused from their head alone, before any body was read (an upload without a valid token), by port.",
                &["port"],
            ),
            http_body_bytes: r.gauge(
                "telemeter_server_http_body_bytes_in_flight",
                "Request body bytes held in memory now, by port.",
                &["port"],
            ),
            registry: r,
            refresh: Default::default(),
            per_upload: Default::default(),
        }
    }

    /// Counts one upload answered with `status`.
    pub fn upload(&self, result: &str, status: u16) {
        let cell = match (result, status) {
            ("stored", 200) => &self.per_upload.stored,
            ("empty", 200) => &self.per_upload.empty,
            _ => return self.uploads.with(&[result, &status.to_string()]).inc(),
        };
        cell.get_or_init(|| self.uploads.with(&[result, "200"]))
            .inc();
    }

    /// Records the time an upload took to be stored.
    pub fn store_write(&self, seconds: f64) {
        self.per_upload
            .store_write
            .get_or_init(|| self.store_write_seconds.with(&[]))
            .observe(seconds);
    }

    /// Copies the store's and the HTTP fronts' counters in, then renders everything.
    pub fn render(&self, store: StoreStats, fronts: &[(&str, Stats)]) -> String {
        {
            let _guard = telemeter_common::sync::lock(&self.refresh);
            self.stored_clusters.with(&[]).set(store.clusters as f64);
            self.stored_bytes.with(&[]).set(store.bytes as f64);
            catch_up(&self.store_commits.with(&[]), store.commits);
            catch_up(&self.store_writes.with(&[]), store.writes);
            catch_up(&self.store_corrupt.with(&[]), store.corrupt_files);
            catch_up(&self.store_expired.with(&[]), store.expired);
            self.store_checkpoint_yielded.store(
                (store.checkpoint_yielded_micros as f64 / 1e6).to_bits(),
                Ordering::Relaxed,
            );
            for (port, stats) in fronts {
                self.http_open
                    .with(&[port])
                    .set(stats.open_connections as f64);
                catch_up(
                    &self.http_accepted.with(&[port]),
                    stats.accepted_connections,
                );
                catch_up(
                    &self.http_rejected.with(&[port]),
                    stats.rejected_connections,
                );
                catch_up(&self.http_evicted.with(&[port]), stats.evicted_connections);
                catch_up(
                    &self.http_protocol_errors.with(&[port]),
                    stats.protocol_errors,
                );
                catch_up(
                    &self.http_peer_rejected.with(&[port, "connection"]),
                    stats.peer_rejected_connections,
                );
                catch_up(
                    &self.http_peer_rejected.with(&[port, "body"]),
                    stats.peer_rejected_bodies,
                );
                catch_up(&self.http_refused_heads.with(&[port]), stats.refused_heads);
                self.http_body_bytes
                    .with(&[port])
                    .set(stats.body_bytes_in_flight as f64);
            }
        }
        self.registry.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Raises a counter to a monotonic total kept elsewhere.
fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.add(total - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkpointers_yield_is_rendered_in_seconds() {
        let metrics = Metrics::new();
        let line = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("telemeter_server_store_checkpoint_yielded_seconds_total "))
                .map(str::to_string)
        };
        let before = metrics.render(StoreStats::default(), &[]);
        assert!(before
            .contains("# TYPE telemeter_server_store_checkpoint_yielded_seconds_total counter"));
        assert_eq!(
            line(&before).as_deref(),
            Some("telemeter_server_store_checkpoint_yielded_seconds_total 0")
        );
        let stats = StoreStats {
            checkpoint_yielded_micros: 1_250_000,
            ..StoreStats::default()
        };
        let after = metrics.render(stats, &[]);
        assert_eq!(
            line(&after).as_deref(),
            Some("telemeter_server_store_checkpoint_yielded_seconds_total 1.25")
        );
    }
}
