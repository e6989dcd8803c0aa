//! Where an upload is stored in a cluster: on the node that owns its cluster id (a [`Placement`]).
//!
//! The owner is the first live member of the ring's preference order for the cluster id. This
//! node stores locally when that is itself; otherwise it forwards synchronously and answers the
//! client only after the owner has the upload on disk. A failed owner is marked suspect (skipped
//! by later pushes until it heartbeats again after a peer timeout) and the next member in the
//! order is tried; when none can store it the client gets 503 and retries. Never 200 for data
//! that was not stored.

use std::sync::Arc;
use std::time::SystemTime;

use super::forward::{ForwardError, ForwardKind};
use super::Cluster;
use crate::ingest::placement::{store_push, store_upload, Placement, PlacementError};
use crate::receive::merge::{MergeError, Merger};
use crate::store::StoreError;

/// Routes uploads through the ring.
pub struct ClusterPlacement {
    cluster: Arc<Cluster>,
    merger: Merger,
}

impl ClusterPlacement {
    /// A placement storing locally, through `merger` (the server's, over its store), what
    /// `cluster` says this node owns.
    pub fn new(cluster: Arc<Cluster>, merger: Merger) -> ClusterPlacement {
        ClusterPlacement { cluster, merger }
    }
}

impl Placement for ClusterPlacement {
    fn place(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<(), PlacementError> {
        place_on_owner(
            &self.cluster,
            cluster_id,
            ForwardKind::Push,
            payload,
            received,
            |bytes| here(store_push(&self.merger, cluster_id, bytes, received)),
        )
    }

    fn place_unchanged(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: i64,
        received: SystemTime,
    ) -> Result<(), PlacementError> {
        // Stored here, the upload keeps its frames and newest sample, as on a single server; a
        // forward sends the payload, and the owner reads both from it. Only one member of the
        // preference order is this node, so the frames are taken at most once.
        let mut frames = frames;
        place_on_owner(
            &self.cluster,
            cluster_id,
            ForwardKind::Push,
            payload,
            received,
            |bytes| {
                here(store_upload(
                    &self.merger,
                    cluster_id,
                    bytes,
                    frames.take(),
                    Some(newest_sample_ms),
                    received,
                ))
            },
        )
    }
}

/// What storing an upload on this node came to, for [`place_on_owner`]: a refusal of the content
/// (an upload that would take its cluster's merged series past `--max-series`), or a merge
/// overtaken every time ([`StoreError::Contended`], which the client retries), is the answer, as
/// an owner's 413 or 409 is; any other failure passes the upload to the next member.
fn here(stored: Result<(), MergeError>) -> Result<(), NotStoredHere<PlacementError>> {
    stored.map_err(|e| match e {
        answer @ (MergeError::TooManySeries { .. }
        | MergeError::Store(StoreError::Contended { .. })) => {
            NotStoredHere::Answer(PlacementError::from(answer))
        }
        failure => NotStoredHere::Failed(failure.to_string()),
    })
}

/// Why [`place_on_owner`]'s `store_here` did not store: what it says decides whether another
/// member is tried.
#[derive(Debug)]
pub enum NotStoredHere<E> {
    /// The client's answer (the content refused, or the merge overtaken): no other member is
    /// tried, as for an owner's [`REFUSED_BY_OWNER`] or [`CONTENDED_AT_OWNER`].
    Answer(E),
    /// This node failed to store it (logged with the reason): the next member is tried.
    Failed(String),
}

/// The status an owner refuses a forward's content with (`endpoint`: a remote-write request over
/// `--max-series` merged), passed on to the client rather than tried elsewhere.
pub const REFUSED_BY_OWNER: u16 = 413;

/// The status an owner answers a forward whose merge was overtaken by other writes of its cluster
/// every time ([`StoreError::Contended`]): the client is told to retry (503), and the owner,
/// which is well, is neither suspected nor passed over.
pub const CONTENDED_AT_OWNER: u16 = 409;

/// Stores `payload` on `cluster_id`'s owner: `store_here` when that is this node, else forwarded
/// as `kind` (the owner stores it durably before answering); a failed owner is marked suspect and
/// the next in the ring's preference order is tried. Shared by uploads and remote write. An
/// owner's refusal of the content ([`REFUSED_BY_OWNER`]), or its merge overtaken
/// ([`CONTENDED_AT_OWNER`]), is the answer, as is this node's own ([`NotStoredHere::Answer`]): no
/// other is tried. The caller's error `E` is made from the [`PlacementError`]s here.
pub fn place_on_owner<E: From<PlacementError>>(
    cluster: &Cluster,
    cluster_id: &str,
    kind: ForwardKind,
    payload: Vec<u8>,
    received: SystemTime,
    mut store_here: impl FnMut(Vec<u8>) -> Result<(), NotStoredHere<E>>,
) -> Result<(), E> {
    let candidates = cluster.owner_preference(cluster_id);
    let mut failures = Vec::new();
    let last = candidates.len().saturating_sub(1);
    let mut payload = Some(payload);
    for (i, owner) in candidates.iter().enumerate() {
        let result = if owner.is_self {
            // Keep a copy only if a later member may still need it.
            let bytes = if i == last {
                payload.take().unwrap_or_default()
            } else {
                payload.clone().unwrap_or_default()
            };
            match store_here(bytes) {
                Err(NotStoredHere::Answer(answer)) => return Err(answer),
                Err(NotStoredHere::Failed(reason)) => Err(reason),
                Ok(()) => Ok(()),
            }
        } else {
            let bytes = payload.as_deref().unwrap_or_default();
            match cluster.forward(owner, cluster_id, received, kind, bytes) {
                // The owner refused the data itself: another member would take it past the
                // owner's cap, and the owner is well.
                Err(ForwardError::Rejected {
                    status: REFUSED_BY_OWNER,
                    reason,
                }) => {
                    return Err(E::from(PlacementError::Refused {
                        status: REFUSED_BY_OWNER,
                        reason,
                    }))
                }
                Err(ForwardError::Rejected {
                    status: CONTENDED_AT_OWNER,
                    ..
                }) => return Err(E::from(PlacementError::Contended)),
                Err(e) => {
                    cluster.mark_suspect(&owner.name);
                    Err(e.to_string())
                }
                Ok(()) => Ok(()),
            }
        };
        match result {
            Ok(()) => {
                if i > 0 {
                    log::info!(
                        "cluster {cluster_id}: stored on {} after {} failed",
                        owner.name,
                        failures.join("; ")
                    );
                }
                return Ok(());
            }
            Err(err) => {
                log::warn!(
                    "cluster {cluster_id}: storing on {} failed: {err}",
                    owner.name
                );
                failures.push(format!("{}: {err}", owner.name));
            }
        }
    }
    log::error!(
        "cluster {cluster_id}: no server could store the {}: {}",
        kind.as_str(),
        failures.join("; ")
    );
    Err(E::from(PlacementError::Unavailable))
}

#[cfg(test)]
mod tests {
    use super::super::membership::MemberState;
    use super::super::testing::{closed_addr, id_owned_by, node, pair, up_series, TempStore};
    use super::*;

    #[test]
    fn an_upload_refused_here_for_its_content_is_the_answer() {
        use crate::receive::merge::REMOTE_WRITE_HELP;
        let store = TempStore::new("placement-refused-here");
        let cluster = Arc::new(node("solo", "127.0.0.1:1", vec![]));
        let merger = Merger::new(store.store.clone()).with_max_series(2);
        let now = SystemTime::now();
        let payload = |help: &str, jobs: &[&str]| up_series(help, jobs, now);
        merger
            .store_received("c1", payload(REMOTE_WRITE_HELP, &["rw"]), now, 2, None)
            .unwrap();
        let placement = ClusterPlacement::new(cluster.clone(), merger);
        // One series more, merged into the remote-write one: within the cap of two.
        placement.place("c1", payload("up", &["a"]), now).unwrap();
        // Two more: over it, refused as the client's answer (413), not a failure of this node.
        match placement.place("c1", payload("up", &["b", "c"]), now) {
            Err(PlacementError::Refused {
                status: 413,
                reason,
            }) => {
                assert!(reason.contains("more than 2 series"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let stored = store.store.get("c1").unwrap().unwrap().payload;
        let families = telemeter_common::delimited::decode(&stored, &Default::default()).unwrap();
        assert_eq!(families.iter().map(|f| f.metric.len()).sum::<usize>(), 2);
        cluster.shutdown();
    }

    #[test]
    fn alone_stores_locally() {
        let store = TempStore::new("placement-alone");
        let cluster = Arc::new(node("solo", "127.0.0.1:1", vec![]));
        let placement = ClusterPlacement::new(cluster.clone(), Merger::new(store.store.clone()));
        placement
            .place("c1", b"payload".to_vec(), SystemTime::now())
            .unwrap();
        assert_eq!(
            store.store.get("c1").unwrap().unwrap().payload,
            b"payload".to_vec()
        );
        cluster.shutdown();
    }

    /// An unchanged upload this node owns is journaled as it arrived (its frames, not the
    /// families) and served whole, as on a single server.
    #[test]
    fn an_unchanged_upload_stored_here_keeps_its_frames() {
        let store = TempStore::new("placement-unchanged");
        let cluster = Arc::new(node("solo", "127.0.0.1:1", vec![]));
        let placement = ClusterPlacement::new(cluster.clone(), Merger::new(store.store.clone()));
        let payload = b"not a family, the store does not read it; ".repeat(64);
        let frames = telemeter_common::snappy::encode_framed(&payload);
        let now = SystemTime::now();
        let newest = telemeter_common::time::unix_millis(now) as i64;
        placement
            .place_unchanged("c1", payload.clone(), Some(frames.clone()), newest, now)
            .unwrap();
        assert_eq!(store.store.get("c1").unwrap().unwrap().payload, payload);
        let journal: Vec<u8> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().contains("journal-"))
            .flat_map(|path| std::fs::read(path).unwrap())
            .collect();
        let holds = |needle: &[u8]| journal.windows(needle.len()).any(|w| w == needle);
        assert!(holds(&frames) && !holds(&payload));
        cluster.shutdown();
    }

    #[test]
    fn nobody_able_to_store_is_unavailable() {
        let store = TempStore::new("placement-none");
        let (a, b) = pair(&closed_addr());
        let a = Arc::new(a);
        let id = id_owned_by(&a, "b");
        store.store.close();
        let placement = ClusterPlacement::new(a.clone(), Merger::new(store.store.clone()));
        let err = placement
            .place(&id, b"payload".to_vec(), SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, PlacementError::Unavailable));
        assert_eq!(err.status(), 503);
        assert_eq!(err.to_string(), "no server could store the upload; retry");
        a.shutdown();
        b.shutdown();
    }

    /// An internal port whose every answer is `status`.
    struct Answers(u16);

    impl telemeter_common::http::Handler for Answers {
        fn handle(&self, _: telemeter_common::http::Request) -> telemeter_common::http::Response {
            telemeter_common::http::Response::text(self.0, "over --max-series (4) once merged")
        }

        fn body_limit(&self, _: &str, _: &str) -> usize {
            1 << 20
        }
    }

    #[test]
    fn an_owner_refusing_the_content_is_the_answer_and_no_other_member_stores_it() {
        // Its content refused (413, passed on), or its merge overtaken every time (409: the
        // client retries, 503).
        for (answer, status, reason) in [
            (REFUSED_BY_OWNER, 413, "over --max-series (4) once merged"),
            (
                CONTENDED_AT_OWNER,
                503,
                "the cluster's series changed while they were merged into; retry",
            ),
        ] {
            let store = TempStore::new("placement-refused");
            let owner = telemeter_common::http::Server::bind(
                "127.0.0.1:0",
                telemeter_common::http::Config::default(),
                Arc::new(Answers(answer)),
            )
            .unwrap();
            let (a, b) = pair(&owner.local_addr().to_string());
            let _owner = owner.spawn();
            let a = Arc::new(a);
            let id = id_owned_by(&a, "b");
            let placement = ClusterPlacement::new(a.clone(), Merger::new(store.store.clone()));
            let err = placement
                .place(&id, b"payload".to_vec(), SystemTime::now())
                .unwrap_err();
            assert_eq!(err.status(), status);
            assert_eq!(err.to_string(), reason);
            // Not stored here instead, and the owner is not suspected for answering.
            assert!(store.store.get(&id).unwrap().is_none());
            let state = super::super::gossip::lock(a.membership())
                .member("b")
                .map(|m| m.state);
            assert_eq!(state, Some(MemberState::Alive), "{answer}");
            a.shutdown();
            b.shutdown();
        }
    }

    #[test]
    fn unreachable_owner_is_suspected_and_the_next_stores() {
        let store = TempStore::new("placement-failover");
        let (a, b) = pair(&closed_addr());
        let a = Arc::new(a);
        let id = id_owned_by(&a, "b");
        let placement = ClusterPlacement::new(a.clone(), Merger::new(store.store.clone()));
        placement
            .place(&id, b"payload".to_vec(), SystemTime::now())
            .unwrap();
        // Stored here, b suspect, ownership unchanged.
        assert!(store.store.get(&id).unwrap().is_some());
        let state = super::super::gossip::lock(a.membership())
            .member("b")
            .map(|m| m.state);
        assert_eq!(state, Some(MemberState::Suspect));
        assert!(!a.owns(&id));
        let unreachable = a
            .stats()
            .forwards
            .iter()
            .find(|(k, r, _)| *k == "push" && *r == "unreachable")
            .map(|(_, _, n)| *n);
        assert_eq!(unreachable, Some(1));
        // The next push does not try b again while it is suspect.
        placement
            .place(&id, b"second".to_vec(), SystemTime::now())
            .unwrap();
        assert_eq!(
            store.store.get(&id).unwrap().unwrap().payload,
            b"second".to_vec()
        );
        let unreachable = a
            .stats()
            .forwards
            .iter()
            .find(|(k, r, _)| *k == "push" && *r == "unreachable")
            .map(|(_, _, n)| *n);
        assert_eq!(unreachable, Some(1));
        a.shutdown();
        b.shutdown();
    }
}
