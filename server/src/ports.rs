//! The HTTP applications on each listening port: the external port (clients), the internal port
//! (scrapers, operators) and the cluster port (peers).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use telemeter_common::http::{
    Admission, Defer, Handler, Head, Request, Response, ServerHandle, Stats,
};

use crate::authorize::{AuthorizeHandler, MAX_BODY_BYTES};
use crate::cluster::endpoint::handle_forward;
use crate::cluster::forward::FORWARD_PATH;
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::Cluster;
use crate::federate;
use crate::import::ImportHandler;
use crate::ingest::upload::UploadHandler;
use crate::metrics::Metrics;
use crate::receive::merge::Merger;
use crate::receive::{ReceiveHandler, RECEIVE_PATH};
use crate::reload::Reloader;
use crate::status::{self, Status};
use crate::store::Store;

/// The paths the external port serves, listed by `GET /`.
pub const EXTERNAL_PATHS: &[&str] = &[
    "/",
    "/authorize",
    "/upload",
    "/import",
    RECEIVE_PATH,
    "/healthz",
    "/healthz/ready",
];
/// The paths the internal port serves, listed by `GET /`.
pub const INTERNAL_PATHS: &[&str] = &[
    "/",
    "/federate",
    "/metrics",
    "/healthz",
    "/healthz/ready",
    "/-/reload",
    "/api/v1/clusters",
];
/// The paths the internal port serves besides [`INTERNAL_PATHS`] when clustered.
pub const CLUSTER_PATHS: &[&str] = &["/debug/cluster", FORWARD_PATH];

/// Body cap for requests that carry none worth reading.
const SMALL_BODY: usize = 4 << 10;

/// The external port: `/authorize`, `/upload`, `/metrics/v1/receive`, health.
pub struct External {
    /// `/authorize`.
    pub authorize: AuthorizeHandler,
    /// `/upload`.
    pub upload: Arc<UploadHandler>,
    /// `/import` (air-gap bundles; authenticated by their own tags).
    pub import: ImportHandler,
    /// `/metrics/v1/receive`.
    pub receive: ReceiveHandler,
}

impl Handler for External {
    fn handle(&self, request: Request) -> Response {
        match request.path.as_str() {
            "/authorize" => self.authorize.handle(&request),
            "/upload" => self.upload.handle(request),
            "/import" => self.import.handle(&request),
            RECEIVE_PATH => self.receive.handle(&request),
            "/healthz" | "/healthz/ready" => Response::text(200, "ok"),
            "/" => Response::json(200, &serde_json::json!({ "paths": EXTERNAL_PATHS })),
            _ => not_found(),
        }
    }

    fn handle_later(&self, request: Request, defer: Defer<'_>) -> Option<Response> {
        match request.path.as_str() {
            "/upload" => self.upload.handle_later(request, defer),
            _ => Some(self.handle(request)),
        }
    }

    fn body_limit(&self, _method: &str, path: &str) -> usize {
        match path {
            "/upload" => self.upload.body_limit(),
            "/import" => self.import.body_limit(),
            RECEIVE_PATH => self.receive.body_limit(),
            "/authorize" => MAX_BODY_BYTES,
            _ => SMALL_BODY,
        }
    }
    /// `/upload` and `/metrics/v1/receive` check their tokens before the body (see
    /// [`UploadHandler::admit`], [`ReceiveHandler::admit`]); the rest only cap their bodies. `/authorize` bodies stay allowed without a token: they are tiny.
    fn admit(&self, head: &Head, remote: SocketAddr) -> Result<Admission, Response> {
        match head.path.as_str() {
            "/upload" => self.upload.admit(head, remote),
            RECEIVE_PATH => self.receive.admit(head, remote).map(Admission::from),
            path => Ok(self.body_limit(&head.method, path).into()),
        }
    }

    fn body_too_large(&self, head: &Head, limit: usize, remote: SocketAddr) {
        if head.path == "/upload" {
            self.upload.body_too_large(head, limit, remote);
        } else if head.path == RECEIVE_PATH {
            self.receive.body_too_large(head, limit, remote);
        }
    }
}

/// The HTTP fronts whose counters `/metrics` reports, filled in once they run.
#[derive(Default)]
pub struct Fronts {
    handles: Mutex<Vec<(&'static str, ServerHandle)>>,
}

impl Fronts {
    /// Adds a running front named `port` (`external`, `internal`).
    pub fn add(&self, port: &'static str, handle: ServerHandle) {
        self.lock().push((port, handle));
    }

    /// Every front's counters now.
    pub fn stats(&self) -> Vec<(&'static str, Stats)> {
        self.lock().iter().map(|(p, h)| (*p, h.stats())).collect()
    }

    /// Takes the fronts out (to shut them down), leaving none.
    pub fn take(&self) -> Vec<(&'static str, ServerHandle)> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, ServerHandle)>> {
        telemeter_common::sync::lock(&self.handles)
    }
}

/// The internal port: `/federate`, `/metrics`, health; clustered, also `/debug/cluster` and the
/// peer-forward endpoint.
pub struct Internal {
    /// The store `/federate` reads.
    pub store: Store,
    /// The label naming the cluster (`_id`), on `/federate`'s last-push series.
    pub partition_label: String,
    /// What `POST /-/reload` runs.
    pub reloader: Arc<Reloader>,
    /// The status page and the clusters API.
    pub status: Status,
    /// The metrics `/metrics` renders.
    pub metrics: Metrics,
    /// The HTTP fronts, for their counters.
    pub fronts: Arc<Fronts>,
    /// The cluster, when clustering is on.
    pub cluster: Option<ClusterRoutes>,
    /// Body cap of forwarded pushes (the decompressed upload cap).
    pub max_forward_bytes: usize,
}

/// What the internal port needs of the cluster.
pub struct ClusterRoutes {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// Its metric families, refreshed at each `/metrics` scrape.
    pub metrics: ClusterMetrics,
    /// The store's remote-write merge, which forwarded pushes go through.
    pub merger: Merger,
    /// `--max-series`: a forwarded remote-write request is refused (413) when the cluster's
    /// series would pass it once merged, as one received here is.
    pub max_series: usize,
}

impl Handler for Internal {
    fn handle(&self, request: Request) -> Response {
        match request.path.as_str() {
            "/federate" => {
                let filter = self.cluster.as_ref().map(|c| {
                    let cluster = c.cluster.clone();
                    let serves: federate::ClusterFilter = Arc::new(move |id| cluster.serves(id));
                    serves
                });
                federate::handle(
                    &request,
                    &self.store,
                    &self.metrics,
                    filter,
                    &self.partition_label,
                )
            }
            "/-/reload" => match request.method.as_str() {
                // PUT too, as Prometheus accepts both.
                "POST" | "PUT" => match self.reloader.reload("POST /-/reload") {
                    Ok(()) => Response::text(200, "reloaded"),
                    Err(reason) => Response::text(
                        500,
                        &format!("reload failed, keeping the old configuration: {reason}"),
                    ),
                },
                _ => Response::text(405, "only POST or PUT").with_header("Allow", "POST, PUT"),
            },
            FORWARD_PATH => match &self.cluster {
                Some(c) => handle_forward(&c.cluster, &c.merger, c.max_series, request),
                None => not_found(),
            },
            "/debug/cluster" => match &self.cluster {
                Some(c) => Response::json(200, &c.cluster.debug_json()),
                None => Response::text(404, "clustering is off (no --listen-cluster)"),
            },
            "/metrics" => {
                if let Some(c) = &self.cluster {
                    c.metrics.refresh(&c.cluster.stats());
                }
                let fronts = self.fronts.stats();
                let refs: Vec<(&str, Stats)> = fronts.iter().map(|(p, s)| (*p, *s)).collect();
                let body = self.metrics.render(self.store.stats(), &refs);
                Response::bytes(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body.into_bytes(),
                )
            }
            "/healthz" | "/healthz/ready" => Response::text(200, "ok"),
            "/" => self.status.page(&request),
            path if path == status::CLUSTERS_PATH
                || path.starts_with(&format!("{}/", status::CLUSTERS_PATH)) =>
            {
                self.status.api(&request)
            }
            _ => not_found(),
        }
    }

    fn body_limit(&self, _method: &str, path: &str) -> usize {
        if path == FORWARD_PATH && self.cluster.is_some() {
            self.max_forward_bytes
        } else {
            SMALL_BODY
        }
    }
}

fn not_found() -> Response {
    Response::text(404, "not found")
}
