//! The two HTTP applications: the external port (clients) and the internal port (scrapers, operators).

use std::sync::{Arc, Mutex};

use telemeter_common::http::{Handler, Request, Response, ServerHandle, Stats};

use crate::authorize::{AuthorizeHandler, MAX_BODY_BYTES};
use crate::federate;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::upload::UploadHandler;

/// The paths the external port serves, listed by `GET /`.
pub const EXTERNAL_PATHS: &[&str] = &["/", "/authorize", "/upload", "/healthz", "/healthz/ready"];
/// The paths the internal port serves, listed by `GET /`.
pub const INTERNAL_PATHS: &[&str] = &["/", "/federate", "/metrics", "/healthz", "/healthz/ready"];

/// Body cap for requests that carry none worth reading.
const SMALL_BODY: usize = 4 << 10;

/// The external port: `/authorize`, `/upload`, health.
pub struct External {
    /// `/authorize`.
    pub authorize: AuthorizeHandler,
    /// `/upload`.
    pub upload: UploadHandler,
}

impl Handler for External {
    fn handle(&self, request: Request) -> Response {
        match request.path.as_str() {
            "/authorize" => self.authorize.handle(&request),
            "/upload" => self.upload.handle(&request),
            "/healthz" | "/healthz/ready" => Response::text(200, "ok"),
            "/" => Response::json(200, &serde_json::json!({ "paths": EXTERNAL_PATHS })),
            _ => not_found(),
        }
    }

    fn body_limit(&self, _method: &str, path: &str) -> usize {
        match path {
            "/upload" => self.upload.body_limit(),
            "/authorize" => MAX_BODY_BYTES,
            _ => SMALL_BODY,
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
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The internal port: `/federate`, `/metrics`, health.
pub struct Internal {
    /// The store `/federate` reads.
    pub store: Store,
    /// The metrics `/metrics` renders.
    pub metrics: Metrics,
    /// The HTTP fronts, for their counters.
    pub fronts: Arc<Fronts>,
}

impl Handler for Internal {
    fn handle(&self, request: Request) -> Response {
        match request.path.as_str() {
            "/federate" => federate::handle(&request, &self.store, &self.metrics),
            "/metrics" => {
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
            "/" => Response::json(200, &serde_json::json!({ "paths": INTERNAL_PATHS })),
            _ => not_found(),
        }
    }

    fn body_limit(&self, _method: &str, _path: &str) -> usize {
        SMALL_BODY
    }
}

fn not_found() -> Response {
    Response::text(404, "not found")
}
