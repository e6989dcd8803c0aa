//! Helpers of the client's end-to-end tests, built on `testkit`: an in-test telemeter-server
//! stand-in that records what the client sends, a real Prometheus, and running the real client
//! binary with bounded waits.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use telemeter_common::http::{Handler, Request, Response, Server, ServerHandle};
use telemeter_common::model::MetricFamily;
use telemeter_common::{delimited, snappy};
// Each test binary uses some of these; the rest would warn as unused.
#[allow(unused_imports)]
pub use testkit::{free_port, wait_exit, wait_output, Guard, Signal, TempDir};

/// The client binary under test.
pub const CLIENT: &str = env!("CARGO_BIN_EXE_telemeter-client");

/// The directory of the test TLS certificates.
pub fn tls_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tls")
}

/// One request the receiver saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The upload body decoded: snappy framed, then protobuf-delimited.
    pub fn families(&self) -> Vec<MetricFamily> {
        let raw = snappy::decode_framed(&self.body, 64 << 20).expect("snappy framed body");
        delimited::decode(&raw, &delimited::Limits::default()).expect("protobuf-delimited body")
    }
}

/// How the receiver behaves.
pub struct Behaviour {
    /// Status of `/authorize` (200 gives a token).
    pub authorize_status: u16,
    /// Lifetime of the tokens given.
    pub expires_in: i64,
    /// Replies of the next uploads, in order: status and optional Retry-After; 200 once empty.
    pub upload_replies: VecDeque<(u16, Option<u64>)>,
    /// The body served on `GET /metrics` (a plain exporter to scrape) and `GET /federate`.
    pub metrics_body: String,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            authorize_status: 200,
            expires_in: 3600,
            upload_replies: VecDeque::new(),
            metrics_body: concat!(
                "# HELP source_up A gauge.\n",
                "# TYPE source_up gauge\n",
                "source_up{instance=\"host-1:9100\",job=\"node\"} 1\n",
                "source_up{instance=\"host-2:9100\",job=\"node\"} 0\n",
                "# TYPE ALERTS gauge\n",
                "ALERTS{alertname=\"Down\",instance=\"host-2:9100\"} 1\n",
                "# TYPE other_metric counter\n",
                "other_metric 5\n",
            )
            .to_string(),
        }
    }
}

struct State {
    behaviour: Behaviour,
    seen: Vec<Seen>,
    tokens_issued: u32,
}

struct Recorder(Arc<Mutex<State>>);

impl Handler for Recorder {
    fn handle(&self, request: Request) -> Response {
        let Ok(mut state) = self.0.lock() else {
            return Response::text(500, "poisoned");
        };
        state.seen.push(Seen {
            method: request.method.to_string(),
            path: request.path.to_string(),
            query: request.query.clone(),
            headers: request
                .headers
                .iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
            body: request.body.clone(),
            at: Instant::now(),
        });
        match request.path.as_str() {
            // /federate too, for bodies that stand for what a Prometheus federates: the client
            // adds job and instance only to an exporter's series.
            "/metrics" | "/federate" => Response::bytes(
                200,
                "text/plain; version=0.0.4",
                state.behaviour.metrics_body.clone().into_bytes(),
            ),
            "/authorize" => {
                if state.behaviour.authorize_status != 200 {
                    return Response::text(state.behaviour.authorize_status, "unauthorized");
                }
                state.tokens_issued += 1;
                let id = request.query_param("id").unwrap_or_default();
                Response::json(
                    200,
                    &serde_json::json!({
                        "version": 1,
                        "token": format!("upload-token-{}", state.tokens_issued),
                        "expiresInSeconds": state.behaviour.expires_in,
                        "labels": {"_id": id},
                    }),
                )
            }
            "/upload" => match state.behaviour.upload_replies.pop_front() {
                None | Some((200, _)) => Response::empty(200),
                Some((status, retry_after)) => {
                    let r = Response::text(status, "refused by the test");
                    match retry_after {
                        Some(s) => r.with_header("Retry-After", &s.to_string()),
                        None => r,
                    }
                }
            },
            _ => Response::text(404, "not found"),
        }
    }

    fn body_limit(&self, _method: &str, _path: &str) -> usize {
        64 << 20
    }
}

/// An in-test stand-in for telemeter-server (and a plain `/metrics` source).
pub struct Receiver {
    state: Arc<Mutex<State>>,
    handle: Option<ServerHandle>,
    pub url: String,
}

impl Receiver {
    pub fn start(behaviour: Behaviour) -> Receiver {
        Receiver::start_with(behaviour, None)
    }

    /// A receiver serving HTTPS with the test certificate of `tests/fixtures/tls` (signed by its
    /// `ca.pem`, valid for 127.0.0.1).
    pub fn start_tls(behaviour: Behaviour) -> Receiver {
        let dir = tls_fixtures();
        let tls = telemeter_common::tls::server_config(
            &dir.join("server.pem"),
            &dir.join("server-key.pem"),
        )
        .expect("test TLS config");
        Receiver::start_with(behaviour, Some(tls))
    }

    fn start_with(behaviour: Behaviour, tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let state = Arc::new(Mutex::new(State {
            behaviour,
            seen: Vec::new(),
            tokens_issued: 0,
        }));
        let config = telemeter_common::http::Config {
            name: "test-receiver".into(),
            tls,
            ..telemeter_common::http::Config::default()
        };
        let server = Server::bind("127.0.0.1:0", config, Arc::new(Recorder(state.clone())))
            .expect("bind receiver");
        let url = format!("{scheme}://{}", server.local_addr());
        Receiver {
            state,
            handle: Some(server.spawn()),
            url,
        }
    }

    /// Changes what `/authorize` answers from now on.
    pub fn set_authorize_status(&self, status: u16) {
        if let Ok(mut state) = self.state.lock() {
            state.behaviour.authorize_status = status;
        }
    }

    pub fn seen(&self, path: &str) -> Vec<Seen> {
        self.state
            .lock()
            .expect("state")
            .seen
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }

    /// Waits (bounded) until `n` requests to `path` were seen.
    pub fn wait_for(&self, path: &str, n: usize, within: Duration) -> Vec<Seen> {
        testkit::wait_until(within, || self.seen(path).len() >= n);
        self.seen(path)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown(Duration::from_secs(2));
        }
    }
}

/// Runs the client to completion, killing it after `within`.
pub fn run_client(args: &[&str], within: Duration) -> Output {
    let child = Command::new(CLIENT)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start telemeter-client");
    wait_output(child, within)
}

/// Sends SIGTERM to a child.
pub fn sigterm(child: &Child) {
    testkit::kill(child.id(), Signal::Term).expect("kill");
}

/// An HTTP GET with a short timeout: status and body.
pub fn get(url: &str) -> Option<(u16, String)> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    let mut r = agent.get(url).call().ok()?;
    let status = r.status().as_u16();
    let mut body = String::new();
    r.body_mut().as_reader().read_to_string(&mut body).ok()?;
    Some((status, body))
}

/// A real Prometheus scraping itself every second, killed on drop.
pub struct Prometheus {
    child: Child,
    _dir: TempDir,
    pub url: String,
    pub port: u16,
}

pub const PROMETHEUS: &str = "/usr/bin/prometheus";

impl Prometheus {
    /// Starts Prometheus with `jobs` scrape jobs of itself (distinct job names) and waits (bounded)
    /// until `/federate` returns `up` for all of them. Panics when Prometheus is not installed:
    /// these tests exist to run against the real one.
    pub fn start(jobs: usize) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is not installed: run `make setup` (Debian package prometheus)"
        );
        let dir = TempDir::new("prom");
        let port = free_port();
        let mut config = String::from("global:\n  scrape_interval: 1s\nscrape_configs:\n");
        for j in 0..jobs {
            config.push_str(&format!(
                "  - job_name: self-{j}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let prom = Prometheus {
            child,
            _dir: dir,
            url: format!("http://127.0.0.1:{port}"),
            port,
        };
        let probe = format!(
            "{}/federate?match%5B%5D=%7B__name__%3D%22up%22%7D",
            prom.url
        );
        assert!(
            testkit::wait_until(Duration::from_secs(60), || {
                matches!(get(&probe), Some((200, body))
                    if body.lines().filter(|l| l.starts_with("up{")).count() >= jobs)
            }),
            "Prometheus did not have data within 60 s"
        );
        // One more scrape interval so every job's series are in the head block.
        std::thread::sleep(Duration::from_millis(1500));
        prom
    }
}

impl Prometheus {
    /// Starts Prometheus as a remote-write receiver only (`--web.enable-remote-write-receiver`,
    /// no scrape jobs) and waits (bounded) until it is ready. Panics when Prometheus is not
    /// installed.
    pub fn receiver() -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is not installed: run `make setup` (Debian package prometheus)"
        );
        let dir = TempDir::new("prom-receiver");
        let port = free_port();
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, "global:\n  scrape_interval: 1m\n")
            .expect("write prometheus.yml");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-remote-write-receiver")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let prom = Prometheus {
            child,
            _dir: dir,
            url: format!("http://127.0.0.1:{port}"),
            port,
        };
        let ready = format!("{}/-/ready", prom.url);
        assert!(
            testkit::wait_until(Duration::from_secs(60), || {
                get(&ready).is_some_and(|(s, _)| s == 200)
            }),
            "prometheus not ready"
        );
        prom
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The telemeter-server binary built next to the test binary
/// (`target/<profile>/deps/<test>-<hash>` → `target/<profile>/telemeter-server`).
pub fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("telemeter-server");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// A python3 http.server exposing `edge_runs_total`, a counter that goes up by one per scrape.
const COUNTER_SOURCE: &str = r##"
import http.server, sys
runs = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global runs
        runs += 1
        body = ("# TYPE edge_runs_total counter\nedge_runs_total %d\n" % runs).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"##;

/// Starts the counter source (see `COUNTER_SOURCE`) on a free port and waits until it answers.
/// Returns its process (killed on drop) and its `/metrics` URL.
pub fn counter_source() -> (Guard, String) {
    let port = free_port();
    let guard = Guard(
        Command::new("python3")
            .args(["-c", COUNTER_SOURCE, &port.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let url = format!("http://127.0.0.1:{port}/metrics");
    assert!(
        testkit::wait_until(Duration::from_secs(20), || get(&url).is_some()),
        "python source not up"
    );
    (guard, url)
}
