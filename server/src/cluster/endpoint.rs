//! The internal `/internal/forward` endpoint: stores a push another server forwarded to us.
//!
//! Only signed requests are accepted (401 otherwise). A forwarded push is never forwarded again,
//! whoever the ring names as owner: the sender chose us, and if we do not own the cluster the
//! handoff thread moves the file on later. The reply is 200 only once the upload is durable.

use telemeter_common::http::{Request, Response};

use super::forward::{ForwardKind, FORWARD_METHOD};
use super::Cluster;
use crate::store::Store;

/// Answers one request to the forward endpoint.
pub fn handle_forward(cluster: &Cluster, store: &Store, request: Request) -> Response {
    if request.method != FORWARD_METHOD {
        return Response::text(405, "only POST is allowed").with_header("Allow", "POST");
    }
    let forwarded = match cluster.verify_forward(
        &request.method,
        &request.path,
        &request.headers,
        &request.body,
    ) {
        Ok(forwarded) => forwarded,
        Err(err) => {
            cluster.count_received_forward("unauthorized");
            log::warn!("cluster: refused a forward from {}: {err}", request.remote);
            return Response::text(401, &format!("forward refused: {err}"));
        }
    };
    let id = &forwarded.cluster_id;
    let bytes = request.body.len();
    let result = match forwarded.kind {
        ForwardKind::Push => store
            .put(id, request.body, forwarded.received)
            .map(|()| true),
        ForwardKind::Handoff => store.put_if_newer(id, request.body, forwarded.received),
    };
    match result {
        Ok(written) => {
            cluster.count_received_forward(forwarded.kind.as_str());
            log::debug!(
                "cluster: stored a forwarded {} for cluster {id} from {} ({bytes} bytes, written: {written})",
                forwarded.kind.as_str(),
                request.remote
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
