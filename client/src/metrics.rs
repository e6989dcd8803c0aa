//! The daemon's own metrics and its `/healthz`, `/healthz/ready` and `/metrics` endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use telemeter_common::http::{Handler, Request, Response};
use telemeter_common::instrument::{Counter, CounterVec, Gauge, Registry};

/// Counters of scrapes and pushes, rendered on `/metrics`.
pub struct Metrics {
    registry: Registry,
    scrapes: CounterVec,
    pushes: CounterVec,
    samples_sent: Counter,
    last_push_success: Gauge,
    series_filtered: CounterVec,
    ready: AtomicBool,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        telemeter_common::process::register_process_metrics(&registry);
        telemeter_common::process::register_build_info(
            &registry,
            "telemeter_client_build_info",
            crate::BUILD,
        );
        let scrapes = registry.counter(
            "telemeter_client_scrapes_total",
            "Scrapes of the source Prometheus, by result (success or error).",
            &["result"],
        );
        let pushes = registry.counter(
            "telemeter_client_pushes_total",
            "Pushes to telemeter-server, by result (success, rate_limited or error).",
            &["result"],
        );
        let samples_sent = registry
            .counter(
                "telemeter_client_samples_sent_total",
                "Samples accepted by telemeter-server.",
                &[],
            )
            .with(&[]);
        let last_push_success = registry
            .gauge(
                "telemeter_client_last_push_success_timestamp_seconds",
                "Unix time of the last accepted push (0 before the first).",
                &[],
            )
            .with(&[]);
        let series_filtered = registry.counter(
            "telemeter_client_series_filtered_total",
            "Series scraped but not sent, by reason (unselected: no --match selector matched; invalid: bad labels or value, too old or in the future).",
            &["reason"],
        );
        Metrics {
            registry,
            scrapes,
            pushes,
            samples_sent,
            last_push_success,
            series_filtered,
            ready: AtomicBool::new(false),
        }
    }

    /// Counts a scrape.
    pub fn scrape(&self, ok: bool) {
        self.scrapes
            .with(&[if ok { "success" } else { "error" }])
            .inc();
    }

    /// Counts a failed push (`rate_limited` or `error`).
    pub fn push_failed(&self, result: &str) {
        self.pushes.with(&[result]).inc();
    }

    /// Counts an accepted push of `samples` at `unix_seconds`, and marks the client ready.
    pub fn push_succeeded(&self, samples: usize, unix_seconds: f64) {
        self.pushes.with(&["success"]).inc();
        self.samples_sent.add(samples as u64);
        self.last_push_success.set(unix_seconds);
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Counts series filtered out.
    pub fn filtered(&self, unselected: usize, invalid: usize) {
        self.series_filtered
            .with(&["unselected"])
            .add(unselected as u64);
        self.series_filtered.with(&["invalid"]).add(invalid as u64);
    }

    /// Whether a push has succeeded since start.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Everything in text format.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The daemon's HTTP endpoints.
pub struct Endpoints {
    /// The metrics served.
    pub metrics: Arc<Metrics>,
}

impl Handler for Endpoints {
    fn handle(&self, request: Request) -> Response {
        if request.method != "GET" && request.method != "HEAD" {
            return Response::text(405, "only GET is allowed here");
        }
        match request.path.as_str() {
            "/healthz" => Response::text(200, "ok"),
            "/healthz/ready" if self.metrics.ready() => Response::text(200, "ok"),
            "/healthz/ready" => Response::text(503, "no push has succeeded yet"),
            "/metrics" => Response::bytes(
                200,
                telemeter_common::media::TEXT,
                self.metrics.render().into_bytes(),
            ),
            _ => Response::text(404, "not found: try /healthz, /healthz/ready or /metrics"),
        }
    }

    fn body_limit(&self, _method: &str, _path: &str) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// The client's `/metrics` has the standard process metrics and its build info, and
    /// Prometheus's own linter accepts it.
    #[test]
    fn metrics_have_process_and_build_info_and_pass_promtool() {
        let text = Metrics::new().render();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
            "# TYPE process_cpu_seconds_total counter",
        ] {
            assert!(text.contains(name), "missing {name}:\n{text}");
        }
        let build = format!(
            "telemeter_client_build_info{{version=\"{}\",revision=\"{}\",rustc=\"{}\"}} 1",
            crate::BUILD.version,
            crate::BUILD.revision,
            crate::BUILD.rustc
        );
        assert!(text.contains(&build), "missing {build}:\n{text}");
        let promtool = "/usr/bin/promtool";
        assert!(
            std::path::Path::new(promtool).exists(),
            "{promtool} is not installed: run `make setup` (Debian package prometheus)"
        );
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
