//! Handoff: moving the files of clusters this node no longer owns to their owner.
//!
//! Ownership moves when membership changes (a node joins, dies, comes back), and a file can also
//! land on a non-owner when the owner was unreachable and the push failed over. A thread scans the
//! store whenever the ring's generation changes, and every [`RESCAN`] anyway (failed-over files,
//! failed handoffs):
//! each cluster the ring gives to another live member is forwarded to it as a handoff (the owner
//! keeps whichever upload was received last) and then removed here.
//!
//! Files go only to the ring owner, never to a fallback: two nodes that each suspect the owner
//! would otherwise pass a file back and forth. While the owner is suspect the file stays (not
//! served: federate serves only owned clusters) until the owner is reachable or the TTL expires.

use std::fmt;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::forward::{ForwardError, ForwardKind};
use super::Cluster;
use crate::receive::merge::{uses_remote_write, Merger};
use crate::store::{Store, StoreError};

/// Files are rescanned at least this often even if the ring did not change.
pub const RESCAN: Duration = Duration::from_secs(10);

/// What one handoff pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Clusters handed to their owner and removed here.
    pub moved: usize,
    /// Clusters whose owner could not take them now (retried next pass).
    pub failed: usize,
    /// Clusters not owned here whose owner is not reachable (suspect): left for later.
    pub waiting: usize,
}

impl fmt::Display for PassReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} handed off, {} failed, {} waiting for their owner",
            self.moved, self.failed, self.waiting
        )
    }
}

/// Stores a cluster's payload handed off to this node, its owner now, by the member that stored
/// it before: whole when it is newer than what is stored here ([`Store::put_if_newer`]), unless
/// either holds remote-write series. Those are merged series by series, the newer sample winning
/// ([`Merger::store_handed_off`]): a remote-write request carries only some of a cluster's
/// series, so the payload the owner merged its requests into since the ring changed and the one
/// handed off each hold series the other lacks, and replacing either lost acknowledged samples.
/// Returns whether the payload was written.
pub fn store_handoff(
    merger: &Merger,
    cluster_id: &str,
    payload: Vec<u8>,
    received: SystemTime,
) -> Result<bool, StoreError> {
    let store = merger.store();
    // No remote-write series in it nor here: whole. Asked as an upload asks (which reads the
    // marker of a file written before the store kept it), and checked again where it commits:
    // handed back if the cluster's first request was merged meanwhile.
    let whole = crate::store::newest_received_in(&payload) == i64::MIN
        && !uses_remote_write(store, cluster_id, received);
    let payload = match whole {
        true => match store.put_if_newer(cluster_id, payload, received) {
            Err(StoreError::UsesRemoteWrite(returned)) => returned.into_families()?,
            stored => return stored,
        },
        false => payload,
    };
    merger
        .store_handed_off(cluster_id, payload, received)
        .map(|()| true)
}

/// Hands every stored cluster this node does not own to its owner, once.
pub fn handoff_pass(cluster: &Cluster, store: &Store) -> PassReport {
    let mut report = PassReport::default();
    for entry in store.clusters() {
        let id = &entry.cluster_id;
        if cluster.owns(id) {
            continue;
        }
        let Some(owner) = cluster.ring_owner(id) else {
            report.waiting += 1;
            continue;
        };
        // The version read with it: only that upload is removed once handed off.
        let version = store.version(id);
        let upload = match store.get(id) {
            Ok(Some(upload)) => upload,
            Ok(None) => continue,
            Err(err) => {
                log::warn!("cluster: handoff of cluster {id}: cannot read it: {err}");
                report.failed += 1;
                continue;
            }
        };
        match cluster.forward(
            &owner,
            id,
            upload.received,
            ForwardKind::Handoff,
            &upload.payload,
        ) {
            Ok(()) => {
                // A newer upload may have landed here meanwhile (a failover, a peer with an
                // older view of the ring forwarding here): kept, and handed off by a later
                // pass. Checked by version under the journal's lock, so none is committed
                // between the check and the removal.
                let removal = match version {
                    Some(version) => store.remove_if_version(id, version),
                    None => Ok(false),
                };
                if let Err(err) = removal {
                    log::warn!("cluster: handoff of cluster {id}: cannot remove it: {err}");
                }
                report.moved += 1;
                log::debug!("cluster: handed cluster {id} to {}", owner.name);
            }
            Err(err) => {
                report.failed += 1;
                if matches!(err, ForwardError::Unreachable(_)) {
                    cluster.mark_suspect(&owner.name);
                }
                log::warn!(
                    "cluster: handoff of cluster {id} to {} failed: {err}",
                    owner.name
                );
            }
        }
    }
    report
}

/// The handoff thread.
#[derive(Debug)]
pub struct Handoff {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Handoff {
    /// Starts the thread, checking the ring every `interval`.
    pub fn start(
        cluster: Arc<Cluster>,
        store: Store,
        interval: Duration,
    ) -> std::io::Result<Handoff> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = thread::Builder::new()
            .name("handoff".into())
            .spawn(move || run(&cluster, &store, interval, &stopped))?;
        Ok(Handoff {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread after the file it is handing off, if any.
    pub fn shutdown(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("handoff thread panicked");
            }
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(cluster: &Cluster, store: &Store, interval: Duration, stopped: &Receiver<()>) {
    let mut seen_generation = cluster.generation();
    let mut last_scan = Instant::now();
    loop {
        match stopped.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let generation = cluster.generation();
        if generation == seen_generation && last_scan.elapsed() < RESCAN {
            continue;
        }
        seen_generation = generation;
        last_scan = Instant::now();
        let report = handoff_pass(cluster, store);
        if report != PassReport::default() {
            log::info!("cluster: handoff pass at ring generation {generation}: {report}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{
        closed_addr, id_owned_by, node, pair, up_series as series, TempStore,
    };
    use super::*;
    use crate::receive::merge::tests::jobs_of as jobs;

    /// Now, to the millisecond the store keeps.
    fn now() -> SystemTime {
        telemeter_common::time::from_unix_millis(telemeter_common::time::unix_millis(
            SystemTime::now(),
        ))
    }

    #[test]
    fn a_handoff_and_remote_write_series_are_merged_never_replaced() {
        use crate::receive::merge::REMOTE_WRITE_HELP as RW;
        let store = TempStore::new("handoff-merged");
        let merger = Merger::new(store.store.clone());
        let now = now();
        let (earlier, later) = (now - Duration::from_secs(1), now + Duration::from_secs(1));
        // The new owner merged a request since the ring changed; the old owner hands over its
        // series, received later: each side holds series the other lacks.
        merger
            .store_received("c", series(RW, &["here"], now), now, 100, None)
            .unwrap();
        assert!(store_handoff(&merger, "c", series(RW, &["handed"], now), later).unwrap());
        assert_eq!(jobs(&store.store, "c"), ["handed", "here"]);
        assert_eq!(store.store.received("c"), Some(later));
        // An upload's payload handed to a remote-write cluster: merged too (the store hands it
        // back where it commits), the later receipt kept.
        assert!(store_handoff(&merger, "c", series("up", &["uploaded"], now), earlier).unwrap());
        assert_eq!(jobs(&store.store, "c"), ["handed", "here", "uploaded"]);
        assert_eq!(store.store.received("c"), Some(later));
        // Remote-write series handed to a cluster whose payload here is an upload: merged.
        store
            .store
            .put("d", series("up", &["upload"], now), later)
            .unwrap();
        assert!(store_handoff(&merger, "d", series(RW, &["handed"], now), earlier).unwrap());
        assert_eq!(jobs(&store.store, "d"), ["handed", "upload"]);
        assert_eq!(store.store.received("d"), Some(later));
        // Neither side remote write: whole, the newer one kept, as before.
        store
            .store
            .put("e", series("up", &["old"], now), now)
            .unwrap();
        assert!(store_handoff(&merger, "e", series("up", &["new"], now), later).unwrap());
        assert_eq!(jobs(&store.store, "e"), ["new"]);
        assert!(!store_handoff(&merger, "e", series("up", &["older"], now), earlier).unwrap());
        assert_eq!(jobs(&store.store, "e"), ["new"]);
    }

    #[test]
    fn a_merged_handoff_keeps_the_receipt_of_a_request_that_committed_while_it_waited() {
        use crate::receive::merge::REMOTE_WRITE_HELP as RW;
        let store = TempStore::new("handoff-receipt");
        let merger = Merger::new(store.store.clone());
        let now = now();
        let (r0, handed_at, request_at) = (
            now - Duration::from_secs(3),
            now - Duration::from_secs(2),
            now,
        );
        store
            .store
            .put("c", series("up", &["upload"], r0), r0)
            .unwrap();
        // A request merges (holding the cluster's stripe), paused after its read of the store.
        let (reached, go_on) = store.store.pause_once_at("payload read");
        let request = std::thread::spawn({
            let merger = merger.clone();
            move || merger.store_received("c", series(RW, &["request"], now), request_at, 100, None)
        });
        reached.recv().unwrap();
        // The handoff arrives meanwhile and waits for the stripe; the request then commits.
        let handoff = std::thread::spawn({
            let merger = merger.clone();
            move || store_handoff(&merger, "c", series(RW, &["handed"], now), handed_at)
        });
        std::thread::sleep(Duration::from_millis(100));
        go_on.send(()).unwrap();
        request.join().unwrap().unwrap();
        assert!(handoff.join().unwrap().unwrap());
        assert_eq!(jobs(&store.store, "c"), ["handed", "request", "upload"]);
        // The request's receipt, not the one the store had when the handoff arrived: a removal
        // asked before the request must not remove what it stored.
        assert_eq!(store.store.received("c"), Some(request_at));
        assert!(!store.store.remove_if_received_by("c", handed_at).unwrap());
    }

    #[test]
    fn a_cluster_a_handoff_took_past_the_cap_keeps_taking_samples_of_its_series() {
        use crate::receive::merge::{MergeError, REMOTE_WRITE_HELP as RW};
        let store = TempStore::new("handoff-cap");
        let merger = Merger::new(store.store.clone());
        let now = now();
        let cap = 2;
        merger
            .store_received("c", series(RW, &["a", "b"], now), now, cap, None)
            .unwrap();
        assert!(store_handoff(&merger, "c", series(RW, &["c", "d"], now), now).unwrap());
        assert_eq!(jobs(&store.store, "c"), ["a", "b", "c", "d"]);
        // Samples of series it has: merged in place (cached), and by a merger that has to read
        // the store (a restart): both within the cap, as they add no series.
        let later = now + Duration::from_secs(1);
        merger
            .store_received("c", series(RW, &["a", "c"], later), later, cap, None)
            .unwrap();
        let restarted = Merger::new(store.store.clone());
        restarted
            .store_received("c", series(RW, &["d"], later), later, cap, None)
            .unwrap();
        // Nor does a staleness marker of a series it does not hold (dropped by the merge).
        let stale = {
            use telemeter_common::model::{LabelPair, MetricFamily, MetricType};
            telemeter_common::delimited::encode(&[MetricFamily {
                name: Some("up".into()),
                help: Some(RW.into()),
                r#type: Some(MetricType::Untyped as i32),
                metric: ["a", "e"]
                    .iter()
                    .map(|job| {
                        let value = match *job {
                            "e" => f64::from_bits(0x7ff0_0000_0000_0002),
                            _ => 2.0,
                        };
                        crate::receive::merge::untyped_series(
                            vec![LabelPair::new("job", job)],
                            value,
                            telemeter_common::time::sample_millis(later),
                        )
                    })
                    .collect(),
            }])
        };
        Merger::new(store.store.clone())
            .store_received("c", stale, later, cap, None)
            .unwrap();
        // A new series is refused.
        match restarted.store_received("c", series(RW, &["e"], later), later, cap, None) {
            Err(MergeError::TooManySeries { limit: 2 }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(jobs(&store.store, "c"), ["a", "b", "c", "d"]);
    }

    #[test]
    fn a_handoff_that_does_not_decode_is_refused_and_the_owners_series_kept() {
        use crate::receive::merge::REMOTE_WRITE_HELP as RW;
        let store = TempStore::new("handoff-garbage");
        let merger = Merger::new(store.store.clone());
        let now = now();
        merger
            .store_received("c", series(RW, &["here"], now), now, 100, None)
            .unwrap();
        // Its member keeps it (the handoff fails) rather than have it dropped unseen.
        let garbage = vec![0x05, 0x0a, 0xff, 0xff, 0xff, 0xff];
        match store_handoff(&merger, "c", garbage, now) {
            Err(StoreError::Format { reason, .. }) => {
                assert!(reason.contains("the handed payload"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(jobs(&store.store, "c"), ["here"]);
    }

    #[test]
    fn the_owners_family_types_win_over_a_handoffs() {
        use telemeter_common::model::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
        let store = TempStore::new("handoff-types");
        let merger = Merger::new(store.store.clone());
        let now = now();
        let family = |kind: MetricType, job: &str, at: SystemTime| {
            let mut metric = crate::receive::merge::untyped_series(
                vec![LabelPair::new("job", job)],
                1.0,
                telemeter_common::time::sample_millis(at),
            );
            if kind == MetricType::Gauge {
                metric = Metric {
                    untyped: None,
                    gauge: Some(Gauge { value: Some(1.0) }),
                    ..metric
                };
            }
            telemeter_common::delimited::encode(&[MetricFamily {
                name: Some("x".into()),
                help: Some(crate::receive::merge::REMOTE_WRITE_HELP.into()),
                r#type: Some(kind as i32),
                metric: vec![metric],
            }])
        };
        // The owner learnt `x` is a gauge (remote write's metadata) after the ring changed; the
        // old owner still had it untyped.
        merger
            .store_received("c", family(MetricType::Gauge, "here", now), now, 10, None)
            .unwrap();
        let earlier = now - Duration::from_secs(1);
        let handed = family(MetricType::Untyped, "handed", earlier);
        assert!(store_handoff(&merger, "c", handed, earlier).unwrap());
        let families = telemeter_common::delimited::decode(
            &store.store.get("c").unwrap().unwrap().payload,
            &telemeter_common::delimited::Limits::default(),
        )
        .unwrap();
        assert_eq!(families.len(), 1);
        assert_eq!(families[0].r#type, Some(MetricType::Gauge as i32));
        assert_eq!(families[0].metric.len(), 2, "both series, as gauges");
        assert!(families[0].metric.iter().all(|m| m.gauge.is_some()));
    }

    #[test]
    fn a_merged_handoff_is_not_shipped_again() {
        use crate::receive::merge::REMOTE_WRITE_HELP as RW;
        let dir = TempStore::new("handoff-shipping");
        let config = crate::store::StoreConfig {
            dir: dir.dir().join("shipping"),
            ttl: Duration::from_secs(3600),
            max_batch: 16,
        };
        let store = Store::open_shipping(config).unwrap();
        let backlog = store.backlog().unwrap();
        let merger = Merger::new(store.clone());
        let now = now();
        // The cluster ids of the records egress ships from `from` on.
        let shipped = |from| {
            let mut reader = backlog.reader(from);
            let mut ids = Vec::new();
            while let Some(record) = reader.next_record().unwrap() {
                ids.push(record.cluster_id);
            }
            ids
        };
        let start = backlog.cursor().unwrap();
        merger
            .store_received("c", series(RW, &["here"], now), now, 100, None)
            .unwrap();
        assert_eq!(shipped(start), ["c"], "the request is shipped");
        // Merged in place into the merger's copy (journaled as a patch), then (d) into what
        // the store reads.
        for handed in ["handed", "again"] {
            assert!(store_handoff(&merger, "c", series(RW, &[handed], now), now).unwrap());
        }
        store.put("d", series("up", &["upload"], now), now).unwrap();
        assert!(store_handoff(&merger, "d", series(RW, &["handed"], now), now).unwrap());
        assert_eq!(jobs(&store, "c"), ["again", "handed", "here"]);
        assert_eq!(jobs(&store, "d"), ["handed", "upload"]);
        // Only the request and the upload: what a member received, it shipped itself.
        assert_eq!(shipped(start), ["c", "d"]);
        store.close();
    }

    #[test]
    fn owned_files_stay() {
        let store = TempStore::new("handoff-owned");
        let cluster = node("solo", "127.0.0.1:1", vec![]);
        store
            .store
            .put("c1", b"x".to_vec(), SystemTime::now())
            .unwrap();
        assert_eq!(handoff_pass(&cluster, &store.store), PassReport::default());
        assert!(store.store.get("c1").unwrap().is_some());
        cluster.shutdown();
    }

    #[test]
    fn failed_handoff_keeps_the_file_and_waits_while_suspect() {
        let store = TempStore::new("handoff-failed");
        let (a, b) = pair(&closed_addr());
        let id = id_owned_by(&a, "b");
        store
            .store
            .put(&id, b"x".to_vec(), SystemTime::now())
            .unwrap();
        let report = handoff_pass(&a, &store.store);
        assert_eq!(
            report,
            PassReport {
                moved: 0,
                failed: 1,
                waiting: 0
            }
        );
        assert!(store.store.get(&id).unwrap().is_some());
        // b is now suspect: the next pass waits instead of hammering it.
        let report = handoff_pass(&a, &store.store);
        assert_eq!(
            report,
            PassReport {
                moved: 0,
                failed: 0,
                waiting: 1
            }
        );
        a.shutdown();
        b.shutdown();
    }
}
