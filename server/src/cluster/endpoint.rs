//! The internal `/internal/forward` endpoint: stores a push another server forwarded to us.
//!
//! Only requests sealed under one of our keys, fresh, and addressed to this node are accepted
//! (401 otherwise, counted as `unauthorized`). A forwarded push is never forwarded again,
//! whoever the ring names as owner: the sender chose us, and if we do not own the cluster the
//! handoff thread moves the file on later. The reply is 200 only once the upload is durable.
//! A forwarded remote-write request (`receive`), or a push of a cluster that uses remote write, is
//! merged into the cluster's series, and refused (413, which the sender passes on to its client,
//! trying no other member) when the cluster's series would pass `--max-series` once merged: only
//! the owner knows the merged count.

use telemeter_common::http::{Request, Response};

use super::forward::{ForwardKind, FORWARD_METHOD};
use super::placement::{CONTENDED_AT_OWNER, REFUSED_BY_OWNER};
use super::Cluster;
use crate::ingest::placement::{store_push, PlacementError};
use crate::receive::merge::{MergeError, Merger};
use crate::store::StoreError;

/// Answers one request to the forward endpoint, storing through `merger` (the server's, over its
/// store). A forwarded push is shipped to `remote_write` once stored (this node is its owner); a
/// handoff is not, its first owner shipped it already.
pub fn handle_forward(
    cluster: &Cluster,
    merger: &Merger,
    max_series: usize,
    request: Request,
) -> Response {
    if request.method != FORWARD_METHOD {
        return Response::text(405, "only POST is allowed").with_header("Allow", "POST");
    }
    let Request {
        method,
        path,
        body,
        remote,
        ..
    } = request;
    let (forwarded, families) = match cluster.open_forward(&method, &path, body) {
        Ok(opened) => opened,
        Err(err) => {
            cluster.count_received_forward("unauthorized");
            log::warn!("cluster: refused a forward from {remote}: {err}");
            return Response::text(401, &format!("forward refused: {err}"));
        }
    };
    let id = &forwarded.cluster_id;
    let bytes = families.len();
    let store = merger.store();
    let merged = |stored: Result<(), MergeError>| match stored {
        Ok(()) => Ok(Ok(true)),
        Err(MergeError::Store(e)) => Ok(Err(e)),
        Err(refused) => Err(refused),
    };
    let result = match forwarded.kind {
        // Merged when the cluster uses remote write, within the cap on its merged series.
        ForwardKind::Push => merged(store_push(merger, id, families, forwarded.received)),
        // Kept whole if newer; merged into (or with) the cluster's remote-write series.
        ForwardKind::Handoff => Ok(super::handoff::store_handoff(
            merger,
            id,
            families,
            forwarded.received,
        )),
        // Only what was received by the time the removal was asked (`status`'s DELETE sends
        // its time): a removal sent again later (a replay) removes nothing stored since.
        ForwardKind::Remove => Ok(store.remove_if_received_by(id, forwarded.received)),
        // Merged into the cluster's series (never forwarded again, like a push), within the
        // cap on the merged series.
        ForwardKind::Receive => merged(crate::receive::store_forwarded(
            merger,
            id,
            families,
            forwarded.received,
            max_series,
        )),
    };
    let result = match result {
        // Overtaken every time: the sender tells its client to retry, and suspects no one.
        Ok(Err(StoreError::Contended { .. })) => {
            cluster.count_received_forward("contended");
            log::info!(
                "cluster: a forwarded {} for cluster {id} was overtaken by other writes of it; the client retries",
                forwarded.kind.as_str()
            );
            return Response::text(CONTENDED_AT_OWNER, &PlacementError::Contended.to_string());
        }
        Ok(result) => result,
        Err(refused) => {
            cluster.count_received_forward("refused");
            log::info!(
                "cluster: refused a forwarded {} for cluster {id}: {refused}",
                forwarded.kind.as_str()
            );
            return Response::text(REFUSED_BY_OWNER, &refused.to_string());
        }
    };
    match result {
        Ok(written) => {
            cluster.count_received_forward(forwarded.kind.as_str());
            log::debug!(
                "cluster: stored a forwarded {} for cluster {id} from {remote} ({bytes} bytes, written: {written}, key id {})",
                forwarded.kind.as_str(),
                forwarded.key_id
            );
            Response::empty(200)
        }
        Err(err) => {
            cluster.count_received_forward("store_error");
            log::error!("cluster: storing a forwarded push for cluster {id} failed: {err}");
            Response::text(503, "storing the forwarded upload failed; retry")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::forward::{Sealer, FORWARD_PATH};
    use super::super::testing::{key, node, TempStore};
    use super::*;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    use telemeter_common::http::Headers;

    fn request(method: &str, body: Vec<u8>) -> Request {
        Request {
            method: method.into(),
            path: FORWARD_PATH.into(),
            query: String::new(),
            headers: Headers::new(),
            body,
            remote: "127.0.0.1:5555".parse().unwrap(),
            admitted: None,
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn sealed_forwards_are_stored_others_refused() {
        let store = TempStore::new("endpoint");
        let merger = Merger::new(store.store.clone());
        let cluster = node("solo", "127.0.0.1:1", vec![]);
        let sealer = Sealer::new(&[key()]).unwrap();
        let now = SystemTime::now();
        let recent = now - Duration::from_secs(5);

        let body = sealer
            .seal("solo", "c1", recent, ForwardKind::Push, b"new", now)
            .unwrap();
        let reply = handle_forward(&cluster, &merger, usize::MAX, request("POST", body));
        assert_eq!(reply.status, 200);
        let stored = store.store.get("c1").unwrap().unwrap();
        assert_eq!(stored.payload, b"new".to_vec());

        // A handoff of an older upload does not replace it, but is acknowledged.
        let body = sealer
            .seal("solo", "c1", at(1_000), ForwardKind::Handoff, b"old", now)
            .unwrap();
        let reply = handle_forward(&cluster, &merger, usize::MAX, request("POST", body));
        assert_eq!(reply.status, 200);
        assert_eq!(
            store.store.get("c1").unwrap().unwrap().payload,
            b"new".to_vec()
        );

        // Not sealed, tampered, addressed to another node, wrong method.
        let reply = handle_forward(
            &cluster,
            &merger,
            usize::MAX,
            request("POST", b"x".to_vec()),
        );
        assert_eq!(reply.status, 401);
        let mut body = sealer
            .seal("solo", "c2", recent, ForwardKind::Push, b"a", now)
            .unwrap();
        let last = body.len() - 1;
        body[last] ^= 1;
        let reply = handle_forward(&cluster, &merger, usize::MAX, request("POST", body));
        assert_eq!(reply.status, 401);
        let body = sealer
            .seal("other", "c2", recent, ForwardKind::Push, b"a", now)
            .unwrap();
        let reply = handle_forward(&cluster, &merger, usize::MAX, request("POST", body));
        assert_eq!(reply.status, 401);
        match &reply.body {
            telemeter_common::http::Body::Bytes(body) => assert!(
                String::from_utf8_lossy(body).contains("addressed to node \"other\""),
                "{body:?}"
            ),
            _ => panic!("a 401 carries its reason"),
        }
        let reply = handle_forward(&cluster, &merger, usize::MAX, request("GET", Vec::new()));
        assert_eq!(reply.status, 405);
        assert!(store.store.get("c2").unwrap().is_none());

        let stats = cluster.stats();
        assert_eq!(
            stats.received_forwards,
            vec![
                ("push", 1),
                ("handoff", 1),
                ("unauthorized", 3),
                ("store_error", 0),
                ("receive", 0),
                ("refused", 0),
                ("contended", 0),
            ]
        );
        // The two stored were accepted under our key; refused ones are not counted by key.
        let id = key()
            .derive(telemeter_common::keys::KeyPurpose::ForwardSeal)
            .id()
            .to_string();
        assert_eq!(stats.forwards_opened, vec![(id, 2)]);
        cluster.shutdown();
    }

    /// Families of `n` gauge series of one family, sampled now.
    /// `n` series of one family, as a peer forwards a remote-write request (converted: remote
    /// write's help text).
    fn series(n: usize) -> Vec<u8> {
        series_with(n, Some(crate::receive::merge::REMOTE_WRITE_HELP))
    }

    /// `n` series of one family with `help`.
    fn series_with(n: usize, help: Option<&str>) -> Vec<u8> {
        use telemeter_common::model::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
        let now = telemeter_common::time::unix_millis(SystemTime::now()) as i64;
        telemeter_common::delimited::encode(&[MetricFamily {
            name: Some("requests".into()),
            help: help.map(str::to_string),
            r#type: Some(MetricType::Gauge as i32),
            metric: (0..n)
                .map(|i| Metric {
                    label: vec![LabelPair {
                        name: Some("path".into()),
                        value: Some(format!("/{i}")),
                    }],
                    gauge: Some(Gauge { value: Some(1.0) }),
                    timestamp_ms: Some(now),
                    ..Default::default()
                })
                .collect(),
        }])
    }

    #[test]
    fn a_forwarded_receive_or_push_past_max_series_merged_is_refused_with_413() {
        let store = TempStore::new("endpoint-receive-cap");
        let merger = Merger::new(store.store.clone()).with_max_series(4);
        let cluster = node("solo", "127.0.0.1:1", vec![]);
        let sealer = Sealer::new(&[key()]).unwrap();
        let now = SystemTime::now();
        let seal = |body: &[u8]| {
            sealer
                .seal("solo", "rw", now, ForwardKind::Receive, body, now)
                .unwrap()
        };
        // Two series, then three more of the same family: five merged, over a cap of four.
        let reply = handle_forward(&cluster, &merger, 4, request("POST", seal(&series(2))));
        assert_eq!(reply.status, 200);
        let reply = handle_forward(&cluster, &merger, 4, request("POST", seal(&series(5))));
        assert_eq!(reply.status, 413);
        match &reply.body {
            telemeter_common::http::Body::Bytes(body) => {
                assert!(String::from_utf8_lossy(body).contains("4"), "{body:?}")
            }
            _ => panic!("a streamed refusal"),
        }
        let refused = || {
            cluster
                .stats()
                .received_forwards
                .iter()
                .find(|(result, _)| *result == "refused")
                .map(|(_, n)| *n)
        };
        assert_eq!(refused(), Some(1), "the refusal is counted");
        let stored_series = || {
            let stored = store.store.get("rw").unwrap().unwrap().payload;
            let families =
                telemeter_common::delimited::decode(&stored, &Default::default()).unwrap();
            families.iter().map(|f| f.metric.len()).sum::<usize>()
        };
        // What was stored is as before the refused request.
        assert_eq!(stored_series(), 2);
        // A push (an upload) of the cluster is merged into its remote-write series: within the
        // same cap.
        let push = |body: &[u8]| {
            let sealed = sealer
                .seal("solo", "rw", now, ForwardKind::Push, body, now)
                .unwrap();
            handle_forward(&cluster, &merger, 4, request("POST", sealed))
        };
        assert_eq!(push(&series_with(3, None)).status, 200);
        assert_eq!(stored_series(), 3, "merged, the series named alike as one");
        assert_eq!(push(&series_with(5, None)).status, 413);
        assert_eq!(stored_series(), 3);
        assert_eq!(refused(), Some(2), "the refusal is counted");
        cluster.shutdown();
    }

    #[test]
    fn a_handoff_of_remote_write_series_is_merged_into_the_owners() {
        use crate::receive::merge::{untyped_series, REMOTE_WRITE_HELP};
        use telemeter_common::model::{LabelPair, MetricFamily, MetricType};
        let store = TempStore::new("endpoint-handoff-merged");
        let merger = Merger::new(store.store.clone());
        let cluster = node("solo", "127.0.0.1:1", vec![]);
        let sealer = Sealer::new(&[key()]).unwrap();
        let now = SystemTime::now();
        let forward = |kind, payload: &[u8], received| {
            let sealed = sealer
                .seal("solo", "c", received, kind, payload, now)
                .unwrap();
            handle_forward(&cluster, &merger, 10, request("POST", sealed)).status
        };
        // The old owner's series, received before the ring changed; this node, the owner now,
        // merged a request of other series of the cluster since.
        let handed = telemeter_common::delimited::encode(&[MetricFamily {
            name: Some("handed".into()),
            help: Some(REMOTE_WRITE_HELP.into()),
            r#type: Some(MetricType::Untyped as i32),
            metric: vec![untyped_series(
                vec![LabelPair::new("job", "old-owner")],
                1.0,
                telemeter_common::time::sample_millis(now),
            )],
        }]);
        assert_eq!(forward(ForwardKind::Receive, &series(2), now), 200);
        let before = now - Duration::from_secs(1);
        assert_eq!(forward(ForwardKind::Handoff, &handed, before), 200);
        let payload = store.store.get("c").unwrap().unwrap().payload;
        let mut families: Vec<(String, usize)> = telemeter_common::delimited::decode(
            &payload,
            &telemeter_common::delimited::Limits::default(),
        )
        .unwrap()
        .into_iter()
        .map(|family| (family.name.unwrap_or_default(), family.metric.len()))
        .collect();
        families.sort();
        assert_eq!(
            families,
            [("handed".to_string(), 1), ("requests".to_string(), 2)]
        );
        cluster.shutdown();
    }

    #[test]
    fn a_forwarded_merge_overtaken_every_time_is_answered_409_and_counted() {
        use crate::receive::merge::tests::{overtaken, two_series};
        let store = TempStore::new("endpoint-contended");
        let merger = Merger::new(store.store.clone());
        let cluster = std::sync::Arc::new(node("solo", "127.0.0.1:1", vec![]));
        let sealer = Sealer::new(&[key()]).unwrap();
        let now = SystemTime::now();
        // "c" holds an upload as sent; its first remote-write request, forwarded here, is
        // overtaken by another upload after each of its reads.
        crate::ingest::placement::store_push(&merger, "c", two_series("old", "gone", now), now)
            .unwrap();
        let body = sealer
            .seal("solo", "c", now, ForwardKind::Receive, &series(1), now)
            .unwrap();
        let reply = {
            let (cluster, merger) = (cluster.clone(), merger.clone());
            overtaken(&store.store, &merger.clone(), 8, move || {
                handle_forward(&cluster, &merger, 10, request("POST", body))
            })
        };
        assert_eq!(reply.status, CONTENDED_AT_OWNER);
        let contended = cluster
            .stats()
            .received_forwards
            .iter()
            .find(|(result, _)| *result == "contended")
            .map(|(_, n)| *n);
        assert_eq!(contended, Some(1));
        cluster.shutdown();
    }

    #[test]
    fn a_removal_replayed_to_a_node_restarted_since_is_refused() {
        let store = TempStore::new("endpoint-replay");
        let merger = Merger::new(store.store.clone());
        let sealer = Sealer::new(&[key()]).unwrap();
        let before = node("solo", "127.0.0.1:1", vec![]);
        let now = SystemTime::now();
        let removal = sealer
            .seal("solo", "c", now, ForwardKind::Remove, b"", now)
            .unwrap();
        store.store.put("c", b"old".to_vec(), now).unwrap();
        let reply = handle_forward(&before, &merger, 10, request("POST", removal.clone()));
        assert_eq!(reply.status, 200);
        assert!(store.store.get("c").unwrap().is_none());
        before.shutdown();
        // The node restarts (a new process: an empty replay cache) and stores a new upload;
        // the captured removal, sent again within the seal's window, removes nothing.
        std::thread::sleep(Duration::from_millis(5));
        let after = node("solo", "127.0.0.1:1", vec![]);
        store
            .store
            .put("c", b"new".to_vec(), SystemTime::now())
            .unwrap();
        let reply = handle_forward(&after, &merger, 10, request("POST", removal));
        assert_eq!(reply.status, 401);
        assert_eq!(store.store.get("c").unwrap().unwrap().payload, b"new");
        after.shutdown();
    }

    #[test]
    fn a_removal_removes_only_what_was_received_by_its_time() {
        // A removal whose nonce the replay cache no longer holds (evicted under load, or a clock
        // that let it past the start check) is opened again; it still removes only what was
        // received by the time the removal was asked.
        let store = TempStore::new("endpoint-remove-time");
        let merger = Merger::new(store.store.clone());
        let cluster = node("solo", "127.0.0.1:1", vec![]);
        let sealer = Sealer::new(&[key()]).unwrap();
        let now = SystemTime::now();
        store
            .store
            .put("c", b"after".to_vec(), now + Duration::from_secs(1))
            .unwrap();
        let removal = sealer
            .seal("solo", "c", now, ForwardKind::Remove, b"", now)
            .unwrap();
        let reply = handle_forward(&cluster, &merger, 10, request("POST", removal));
        assert_eq!(reply.status, 200);
        assert_eq!(store.store.get("c").unwrap().unwrap().payload, b"after");
        let removal = sealer
            .seal(
                "solo",
                "c",
                now + Duration::from_secs(1),
                ForwardKind::Remove,
                b"",
                now,
            )
            .unwrap();
        let reply = handle_forward(&cluster, &merger, 10, request("POST", removal));
        assert_eq!(reply.status, 200);
        assert!(store.store.get("c").unwrap().is_none());
        cluster.shutdown();
    }
}
