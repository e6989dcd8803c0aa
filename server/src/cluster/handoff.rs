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
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::forward::{ForwardError, ForwardKind};
use super::Cluster;
use crate::store::Store;

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
    use super::super::testing::{closed_addr, id_owned_by, node, pair, TempStore};
    use super::*;
    use std::time::SystemTime;

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
