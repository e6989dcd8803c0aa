//! Helpers for tests that run the real `telemeter-server` binary, built on `testkit` (temp dirs,
//! ports, bounded waits, processes): starting the binary on free ports with the flags most tests
//! share and waiting for it (bounded), a cluster's convergence, the real Prometheus and promtool,
//! an HTTP client, and metric bodies like the upstream Go client sends.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use telemeter_common::delimited;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::model::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
use telemeter_common::snappy;
// Each test binary uses some of these; the rest would warn as unused.
#[allow(unused_imports)]
pub use testkit::{free_port, wait_until, Logs, Signal, TempDir};

pub const BIN: &str = env!("CARGO_BIN_EXE_telemeter-server");
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `telemeter-server`, killed on drop.
pub struct ServerProcess {
    pub child: Child,
    pub external: SocketAddr,
    pub internal: SocketAddr,
    pub logs: Logs,
}

/// The default tokens file of the tests: `secret` for cluster `test` and `other`, `wild` for any.
pub const TOKENS: &str = "secret test,other\nwild *\n";

fn command(storage: &Path, args: &[&str]) -> Command {
    // TELEMETER_SERVER_BIN runs another build (e.g. release, for the throughput probe).
    let bin = std::env::var("TELEMETER_SERVER_BIN").unwrap_or_else(|_| BIN.to_string());
    let mut cmd = Command::new(bin);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--listen-internal",
        "127.0.0.1:0",
        "--storage-path",
    ])
    .arg(storage)
    .args(args)
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

impl ServerProcess {
    /// Starts the server on free ports with `storage` and `args`; waits (bounded) until it serves.
    pub fn start(storage: &Path, args: &[&str]) -> ServerProcess {
        let server = ServerProcess::spawn(&mut command(storage, args));
        assert!(
            wait_until(START_TIMEOUT, || get(&server.url_internal("/healthz"), &[])
                .status
                == 200),
            "server never became healthy"
        );
        server
    }

    /// The usual start in `dir` (see [`Setup`]), to adjust before [`Setup::start`].
    pub fn setup(dir: &TempDir) -> Setup {
        Setup::new(dir)
    }

    /// Runs `command` (a `telemeter-server` whose stderr is piped) and waits (bounded) until it
    /// logs the addresses it listens on; an unspecified address (`0.0.0.0`) is reached on
    /// loopback.
    pub fn spawn(command: &mut Command) -> ServerProcess {
        let mut child = command.spawn().expect("start telemeter-server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let logs = testkit::capture_lines(stderr, "server", move |line| {
            if let Some(rest) = line.split("listening external=").nth(1) {
                let mut parts = rest.split(" internal=");
                let ext = parts.next().unwrap_or("").trim().to_string();
                let int = parts.next().unwrap_or("").trim().to_string();
                let _ = tx.send((ext, int));
            }
        });
        let (ext, int) = match rx.recv_timeout(START_TIMEOUT) {
            Ok(pair) => pair,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not report its addresses: {:?}",
                    logs.lock().unwrap()
                );
            }
        };
        let loopback = |addr: String| -> SocketAddr {
            let mut addr: SocketAddr = addr.parse().expect("address");
            if addr.ip().is_unspecified() {
                addr.set_ip([127, 0, 0, 1].into());
            }
            addr
        };
        ServerProcess {
            child,
            external: loopback(ext),
            internal: loopback(int),
            logs,
        }
    }

    /// Runs the server expecting it to fail at start: its exit status and standard error.
    pub fn run_failing(storage: &Path, args: &[&str]) -> (ExitStatus, String) {
        let mut child = command(storage, args)
            .spawn()
            .expect("start telemeter-server");
        let status = wait_bounded(&mut child, START_TIMEOUT).expect("server should exit");
        let mut stderr = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (status, stderr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.external)
    }

    pub fn url_internal(&self, path: &str) -> String {
        format!("http://{}{path}", self.internal)
    }

    /// Sends `signal` and waits (bounded) for the exit.
    pub fn signal_and_wait(&mut self, signal: Signal) -> ExitStatus {
        testkit::kill(self.child.id(), signal).expect("signal the server");
        wait_bounded(&mut self.child, Duration::from_secs(20)).expect("server should exit")
    }

    /// Authorizes `token` for `id` and returns the upload token.
    pub fn upload_token(&self, token: &str, id: &str) -> String {
        let r = post(
            &self.url(&format!("/authorize?id={id}")),
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        );
        assert_eq!(r.status, 200, "authorize: {}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    /// Uploads families as the upstream client does (PD, snappy framed).
    pub fn upload(&self, upload_token: &str, families: &[MetricFamily]) -> Reply {
        post(
            &self.url("/upload"),
            &[
                ("Authorization", &format!("Bearer {upload_token}")),
                ("Content-Type", PROTO_DELIMITED),
                ("Content-Encoding", "snappy"),
            ],
            &snappy::encode_framed(&delimited::encode(families)),
        )
    }

    pub fn federate(&self) -> String {
        let r = get(&self.url_internal("/federate"), &[]);
        assert_eq!(r.status, 200, "federate: {}", r.body);
        r.body
    }
}

/// How a test starts its server, with the flags most tests share written once: storage in
/// `dir/data`, `--tokens-file` with [`TOKENS`] written to `dir/tokens` (or
/// `--insecure-accept-any-token`), optionally `--shared-key` with a key written to `dir/key`,
/// `--ratelimit 0s` (tests push when they like), then the test's own flags, in that order.
pub struct Setup {
    dir: PathBuf,
    storage: PathBuf,
    tokens: Option<PathBuf>,
    any_token: bool,
    key: Option<PathBuf>,
    ratelimit: Option<String>,
    args: Vec<String>,
}

impl Setup {
    fn new(dir: &TempDir) -> Setup {
        Setup {
            dir: dir.path().to_path_buf(),
            storage: dir.path().join("data"),
            tokens: Some(dir.file("tokens", TOKENS)),
            any_token: false,
            key: None,
            ratelimit: Some("0s".into()),
            args: Vec::new(),
        }
    }

    /// Stores in `storage` instead of `dir/data`.
    pub fn storage(mut self, storage: &Path) -> Setup {
        self.storage = storage.to_path_buf();
        self
    }

    /// `tokens` in `dir/tokens` instead of [`TOKENS`].
    pub fn tokens(mut self, tokens: &str) -> Setup {
        let path = self.dir.join("tokens");
        std::fs::write(&path, tokens).expect("write the tokens file");
        self.tokens = Some(path);
        self
    }

    /// `--insecure-accept-any-token` instead of a tokens file.
    pub fn any_token(mut self) -> Setup {
        self.tokens = None;
        self.any_token = true;
        self
    }

    /// `--shared-key` with `key` written to `dir/key`.
    pub fn key(mut self, key: &str) -> Setup {
        let path = self.dir.join("key");
        std::fs::write(&path, key).expect("write the key file");
        self.key = Some(path);
        self
    }

    /// `--ratelimit window`, or the server's default for `None`.
    pub fn ratelimit(mut self, window: Option<&str>) -> Setup {
        self.ratelimit = window.map(String::from);
        self
    }

    /// Adds `args` after the shared flags.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Setup {
        self.args
            .extend(args.iter().map(|arg| arg.as_ref().to_string()));
        self
    }

    /// Where the server stores.
    pub fn storage_path(&self) -> &Path {
        &self.storage
    }

    /// The flags, in order.
    pub fn flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        let path = |p: &PathBuf| p.display().to_string();
        if let Some(tokens) = &self.tokens {
            flags.extend(["--tokens-file".to_string(), path(tokens)]);
        }
        if self.any_token {
            flags.push("--insecure-accept-any-token".to_string());
        }
        if let Some(key) = &self.key {
            flags.extend(["--shared-key".to_string(), path(key)]);
        }
        if let Some(window) = &self.ratelimit {
            flags.extend(["--ratelimit".to_string(), window.clone()]);
        }
        flags.extend(self.args.iter().cloned());
        flags
    }

    /// Starts it (see [`ServerProcess::start`]); again after a stop, on the same storage.
    pub fn start(&self) -> ServerProcess {
        let flags = self.flags();
        let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        ServerProcess::start(&self.storage, &refs)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) for `child` to exit, killing it when the bound passes.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    testkit::wait_or_kill(child, timeout)
}

/// An HTTP reply.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    )
}

fn reply(mut r: ureq::http::Response<ureq::Body>) -> Reply {
    let status = r.status().as_u16();
    let headers = r
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let bytes = r
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_vec()
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    }
}

pub fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut req = agent().post(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    reply(req.send(body).expect("POST"))
}

pub fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = agent().get(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    match req.call() {
        Ok(r) => reply(r),
        Err(e) => Reply {
            status: 0,
            headers: vec![],
            body: e.to_string(),
            bytes: vec![],
        },
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `n` gauge series `test_metric{i="0".."n"}` at `ts`, each with `_id=id` when given, plus an `up`
/// series; as the upstream client sends them (with timestamps).
pub fn families(id: Option<&str>, n: usize, ts: i64) -> Vec<MetricFamily> {
    let series = |extra: Vec<LabelPair>, value: f64| {
        let mut label = extra;
        if let Some(id) = id {
            label.push(LabelPair::new("_id", id));
        }
        Metric {
            label,
            gauge: Some(Gauge { value: Some(value) }),
            timestamp_ms: Some(ts),
            ..Default::default()
        }
    };
    vec![
        MetricFamily {
            name: Some("up".into()),
            help: Some("Whether the target is up.".into()),
            r#type: Some(MetricType::Gauge as i32),
            metric: vec![series(vec![LabelPair::new("job", "prometheus")], 1.0)],
        },
        MetricFamily {
            name: Some("test_metric".into()),
            help: None,
            r#type: Some(MetricType::Gauge as i32),
            metric: (0..n)
                .map(|i| series(vec![LabelPair::new("i", &i.to_string())], i as f64))
                .collect(),
        },
    ]
}

/// The series lines (not comments) of a text body, but for `/federate`'s own
/// `telemeter_last_push_timestamp_seconds` (one per cluster, not pushed): tests count what was
/// pushed.
pub fn series_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            !l.starts_with('#')
                && !l.is_empty()
                && !l.starts_with("telemeter_last_push_timestamp_seconds{")
        })
        .collect()
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Sends `request` as raw bytes on a fresh connection to `addr` and reads the reply (bounded by a
/// 30 s timeout); for requests an HTTP client would refuse to send (huge heads, bad framing).
/// Status 0 when the server closed the connection without a reply.
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> Reply {
    raw_exchange(addr, request, true)
}

/// [`raw_request`] without closing the sending side: the server sees a peer that stalls after
/// `request` rather than one that has finished.
pub fn raw_request_then_stall(addr: SocketAddr, request: &[u8]) -> Reply {
    raw_exchange(addr, request, false)
}

fn raw_exchange(addr: SocketAddr, request: &[u8], finish: bool) -> Reply {
    use std::io::{Read, Write};
    let no_reply = |why: String| Reply {
        status: 0,
        headers: vec![],
        body: why,
        bytes: vec![],
    };
    let mut tcp = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
        Ok(tcp) => tcp,
        Err(e) => return no_reply(format!("connect: {e}")),
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(30)));
    // The server may answer (and close) before reading everything: a failed write is not fatal.
    let _ = tcp.write_all(request);
    if finish {
        let _ = tcp.shutdown(std::net::Shutdown::Write);
    }
    let mut raw = Vec::new();
    let _ = tcp.read_to_end(&mut raw);
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return no_reply(String::from_utf8_lossy(&raw).into_owned());
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let bytes = raw[end + 4..].to_vec();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    }
}

/// A value of `/metrics` text: the sum of every series of `name` whose labels contain all of
/// `matching` (`k="v"` fragments); 0 when there is none.
pub fn metric_value(metrics_text: &str, name: &str, matching: &[&str]) -> f64 {
    metrics_text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))
        })
        .filter(|l| matching.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Not `sum()`: its empty sum is -0.0, which prints oddly.
        .fold(0.0, |total, v| total + v)
}

/// How many series `/federate` left out for `reason` so far, from a `/metrics` text.
pub fn federate_skipped(metrics_text: &str, reason: &str) -> f64 {
    metric_value(
        metrics_text,
        "telemeter_server_federate_series_skipped_total",
        &[&format!("reason=\"{reason}\"")],
    )
}

/// An upload whose series `/federate` could not serve: Prometheus would refuse its line, and with
/// it the whole scrape. Validation must refuse it (400).
pub struct Unservable {
    /// What it tries.
    pub name: &'static str,
    /// Its Content-Type (PD or text).
    pub content_type: &'static str,
    /// The body, not compressed.
    pub body: Vec<u8>,
    /// A fragment the one-line reason must contain: the family and the label.
    pub reason: &'static str,
}

/// The text Content-Type.
pub const TEXT: &str = "text/plain; version=0.0.4";

/// Every kind of [`Unservable`] upload, as protobuf (stamped with `_id` = `cluster`, as upstream
/// clients send, so the wire fast path has to see the problem itself) and as text.
pub fn unservable_uploads(cluster: &str) -> Vec<Unservable> {
    use telemeter_common::model::{Bucket, Histogram, Quantile, Summary};
    let ts = now_ms();
    let series = |labels: &[(&str, &str)]| {
        let mut label: Vec<LabelPair> = labels.iter().map(|(n, v)| LabelPair::new(n, v)).collect();
        label.push(LabelPair::new("_id", cluster));
        Metric {
            label,
            timestamp_ms: Some(ts),
            ..Default::default()
        }
    };
    let family = |name: &str, kind: MetricType, metric: Metric| {
        delimited::encode(&[MetricFamily {
            name: Some(name.into()),
            help: Some("Hostile.".into()),
            r#type: Some(kind as i32),
            metric: vec![metric],
        }])
    };
    let gauge = |labels: &[(&str, &str)]| Metric {
        gauge: Some(Gauge { value: Some(1.0) }),
        ..series(labels)
    };
    let histogram = Metric {
        histogram: Some(Histogram {
            sample_count: Some(2),
            sample_sum: Some(1.5),
            bucket: vec![Bucket {
                cumulative_count: Some(1),
                upper_bound: Some(0.5),
            }],
        }),
        ..series(&[("le", "0.5")])
    };
    let summary = Metric {
        summary: Some(Summary {
            sample_count: Some(2),
            sample_sum: Some(1.5),
            quantile: vec![Quantile {
                quantile: Some(0.5),
                value: Some(1.0),
            }],
        }),
        ..series(&[("quantile", "0.5")])
    };
    let pd = |name, body, reason| Unservable {
        name,
        content_type: PROTO_DELIMITED,
        body,
        reason,
    };
    let text = |name, body: String, reason| Unservable {
        name,
        content_type: TEXT,
        body: body.into_bytes(),
        reason,
    };
    vec![
        pd(
            "le on a histogram series (protobuf)",
            family("h", MetricType::Histogram, histogram),
            "series of h has label \"le\"",
        ),
        pd(
            "quantile on a summary series (protobuf)",
            family("s", MetricType::Summary, summary),
            "series of s has label \"quantile\"",
        ),
        pd(
            "__name__ label (protobuf)",
            family("m", MetricType::Gauge, gauge(&[("__name__", "other")])),
            "series of m has label \"__name__\"",
        ),
        pd(
            "__foo label (protobuf)",
            family("m", MetricType::Gauge, gauge(&[("__foo", "x")])),
            "series of m has label \"__foo\"",
        ),
        pd(
            "one label name twice, stamped (protobuf)",
            family("m", MetricType::Gauge, gauge(&[("a", "1"), ("a", "2")])),
            "series of m has invalid labels: label \"a\" appears more than once",
        ),
        text(
            "le twice on a histogram bucket (text)",
            format!("# TYPE h histogram\nh_bucket{{le=\"0.5\",le=\"1\",_id=\"{cluster}\"}} 1 {ts}\nh_sum{{_id=\"{cluster}\"}} 1 {ts}\nh_count{{_id=\"{cluster}\"}} 1 {ts}\n"),
            "duplicate label name \"le\" in a series of \"h\"",
        ),
        text(
            "quantile twice on a summary (text)",
            format!("# TYPE s summary\ns{{quantile=\"0.5\",quantile=\"0.9\",_id=\"{cluster}\"}} 1 {ts}\n"),
            "duplicate label name \"quantile\" in a series of \"s\"",
        ),
        text(
            "__name__ label (text)",
            format!("m{{__name__=\"other\",_id=\"{cluster}\"}} 1 {ts}\n"),
            "\"__name__\" is reserved (a series of \"m\")",
        ),
        text(
            "__foo label (text)",
            format!("m{{__foo=\"x\",_id=\"{cluster}\"}} 1 {ts}\n"),
            "series of m has label \"__foo\"",
        ),
        text(
            "one label name twice (text)",
            format!("m{{a=\"1\",a=\"2\",_id=\"{cluster}\"}} 1 {ts}\n"),
            "duplicate label name \"a\" in a series of \"m\"",
        ),
    ]
}

/// Posts `body` to `/upload` with `upload_token` and `content_type`, not compressed.
pub fn upload_as(
    server: &ServerProcess,
    upload_token: &str,
    content_type: &str,
    body: &[u8],
) -> Reply {
    post(
        &server.url("/upload"),
        &[
            ("Authorization", &format!("Bearer {upload_token}")),
            ("Content-Type", content_type),
        ],
        body,
    )
}

/// A UDP port on loopback free now (bound, then released): a node's `--listen-cluster`.
pub fn free_udp_port() -> u16 {
    free_udp_port_on("127.0.0.1")
}

/// A UDP port on `ip` free now (bound, then released).
pub fn free_udp_port_on(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the server says of its cluster on `/debug/cluster`.
pub fn debug_cluster(server: &ServerProcess) -> serde_json::Value {
    let r = get(&server.url_internal("/debug/cluster"), &[]);
    assert_eq!(r.status, 200, "/debug/cluster: {}", r.body);
    serde_json::from_str(&r.body).expect("/debug/cluster is JSON")
}

/// Whether a `/debug/cluster` view has exactly the nodes `alive` alive (in any order) and
/// agrees with its peers.
pub fn converged_on<S: AsRef<str>>(view: &serde_json::Value, alive: &[S]) -> bool {
    let mut want: Vec<&str> = alive.iter().map(AsRef::as_ref).collect();
    want.sort_unstable();
    let seen: Option<Vec<&str>> = view["alive"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect());
    seen.as_deref() == Some(&want[..]) && view["converged"] == true
}

/// Polls the `/debug/cluster` URLs `urls` until each view has exactly `alive` alive and
/// agrees (see [`converged_on`]); how long that took. Fails the test after `within`, with the
/// views.
pub fn wait_converged<S: AsRef<str>>(urls: &[String], alive: &[S], within: Duration) -> Duration {
    let started = Instant::now();
    let view = |url: &String| -> serde_json::Value {
        serde_json::from_str(&get(url, &[]).body).unwrap_or_default()
    };
    let names: Vec<&str> = alive.iter().map(AsRef::as_ref).collect();
    let done = wait_until(within, || {
        urls.iter().all(|url| converged_on(&view(url), &names))
    });
    assert!(
        done,
        "cluster did not converge on {names:?}: {:?}",
        urls.iter().map(view).collect::<Vec<_>>()
    );
    started.elapsed()
}

/// Where Debian's `prometheus` package puts the binary.
pub const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Where it puts promtool.
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// Fails the test (tests against the real Prometheus exist to run: they never skip) when
/// `program` is not installed.
pub fn need(program: &str) {
    assert!(
        Path::new(program).exists(),
        "{program} is not installed: run `make setup` (Debian package prometheus)"
    );
}

/// A scrape job (YAML, as an item of `scrape_configs`) of a central Prometheus: `/federate` of
/// `target` with `honor_labels`, restricted to `selector` (`match[]`) when given.
pub fn federate_job(name: &str, target: &str, selector: Option<&str>) -> String {
    let params = selector
        .map(|m| format!("    params:\n      'match[]': ['{m}']\n"))
        .unwrap_or_default();
    format!(
        "  - job_name: {name}\n    honor_labels: true\n    metrics_path: /federate\n{params}    static_configs:\n      - targets: ['{target}']\n"
    )
}

/// A real Prometheus on loopback, killed on drop.
pub struct Prometheus {
    child: Option<Child>,
    /// Its web port.
    pub port: u16,
}

impl Prometheus {
    /// Starts one scraping every second with `scrape_configs` (a YAML list, indented under its
    /// key), on a free port; waits (bounded) until it is ready.
    pub fn scraping(dir: &TempDir, scrape_configs: &str) -> Prometheus {
        Prometheus::start(
            dir,
            "prometheus",
            &format!("global:\n  scrape_interval: 1s\nscrape_configs:\n{scrape_configs}"),
            free_port(),
            &[],
        )
    }

    /// Starts one receiving remote write (see [`Prometheus::write_url`]) on `port`, scraping
    /// nothing; waits (bounded) until it is ready. Again on the same `dir` and `port` after a
    /// [`Prometheus::stop`], it keeps what it had received.
    pub fn receiver(dir: &TempDir, port: u16) -> Prometheus {
        Prometheus::start(
            dir,
            "prometheus",
            "global:\n  scrape_interval: 1m\n",
            port,
            &["--web.enable-remote-write-receiver"],
        )
    }

    /// Starts one with `config` (YAML) written to `dir/NAME.yml`, its TSDB in `dir/NAME` (so a
    /// restart under the same name keeps it), on `port`, with `flags` added; waits (bounded)
    /// until it is ready.
    pub fn start(dir: &TempDir, name: &str, config: &str, port: u16, flags: &[&str]) -> Prometheus {
        let storage = format!("--storage.tsdb.path={}", dir.path().join(name).display());
        Prometheus::launch(dir, name, config, port, &storage, flags)
    }

    /// As [`Prometheus::start`], in agent mode (`--enable-feature=agent`): its write-ahead log in
    /// `dir/NAME` (agent mode refuses the TSDB flags).
    pub fn agent(dir: &TempDir, name: &str, config: &str, port: u16) -> Prometheus {
        let storage = format!("--storage.agent.path={}", dir.path().join(name).display());
        Prometheus::launch(
            dir,
            name,
            config,
            port,
            &storage,
            &["--enable-feature=agent"],
        )
    }

    fn launch(
        dir: &TempDir,
        name: &str,
        config: &str,
        port: u16,
        storage: &str,
        flags: &[&str],
    ) -> Prometheus {
        need(PROMETHEUS);
        let config = dir.file(&format!("{name}.yml"), config);
        // Its log, kept (appended to across restarts) to say why it did not start.
        let log_path = dir.path().join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open prometheus's log");
        let mut child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(storage)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        let mut exited = None;
        let up = wait_until(Duration::from_secs(60), || {
            exited = child.try_wait().ok().flatten();
            exited.is_some() || get(&ready, &[]).status == 200
        });
        if !up || exited.is_some() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "prometheus on port {port} never became ready ({}); the end of {}:\n{}",
                exited.map_or("still running after 60 s".to_string(), |s| format!("{s}")),
                log_path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Prometheus {
            child: Some(child),
            port,
        }
    }

    /// The URL of `path` on it.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Where a [`Prometheus::receiver`] takes remote write.
    pub fn write_url(&self) -> String {
        self.url("/api/v1/write")
    }

    /// Its process id (`None` once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops it (SIGTERM, bounded wait).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            testkit::kill(child.id(), Signal::Term).expect("signal prometheus");
            assert!(
                wait_bounded(&mut child, Duration::from_secs(20)).is_some(),
                "prometheus did not stop"
            );
        }
    }

    /// The results of the instant `query` (at `time`, seconds since the epoch, or now); `None`
    /// while it does not answer one.
    pub fn query_at(&self, query: &str, time: Option<f64>) -> Option<Vec<serde_json::Value>> {
        let mut url = self.url(&format!(
            "/api/v1/query?query={}",
            telemeter_common::http::percent_encode(query)
        ));
        if let Some(time) = time {
            url.push_str(&format!("&time={time}"));
        }
        let r = get(&url, &[]);
        if r.status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        v["data"]["result"].as_array().cloned()
    }

    /// Polls the instant `query` at `time` until it has at least `n` results (bounded: 60 s,
    /// then the test fails); them.
    pub fn wait_results(&self, query: &str, time: f64, n: usize) -> Vec<serde_json::Value> {
        let mut results = Vec::new();
        assert!(
            wait_until(Duration::from_secs(60), || {
                results = self.query_at(query, Some(time)).unwrap_or_default();
                results.len() >= n
            }),
            "{query} at {time}: {} results, wanted {n}",
            results.len()
        );
        results
    }

    /// The results of the instant `query` now (see [`Prometheus::query_at`]).
    pub fn query(&self, query: &str) -> Option<Vec<serde_json::Value>> {
        self.query_at(query, None)
    }

    /// The value of the instant `query` now, when it has exactly one result.
    pub fn query_one(&self, query: &str) -> Option<String> {
        let results = self.query(query)?;
        match results.as_slice() {
            [one] => one["value"][1].as_str().map(String::from),
            _ => None,
        }
    }

    /// The health and last error of the scrape target of `job`, once it has been scraped.
    pub fn target(&self, job: &str) -> Option<(String, String)> {
        let r = get(&self.url("/api/v1/targets"), &[]);
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        v["data"]["activeTargets"]
            .as_array()?
            .iter()
            .find(|t| t["labels"]["job"] == job && t["health"] != "unknown")
            .map(|t| {
                (
                    t["health"].as_str().unwrap_or("").to_string(),
                    t["lastError"].as_str().unwrap_or("").to_string(),
                )
            })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `promtool check metrics` on `body`: `Err` with what it printed when it refuses it (a
/// parse error, or a lint).
pub fn promtool_check(body: &str) -> Result<(), String> {
    need(PROMTOOL);
    let mut promtool = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    let mut stdin = promtool.stdin.take().expect("promtool's stdin");
    let body = body.as_bytes().to_vec();
    // From another thread, so a large body cannot fill both pipes at once.
    let writer = std::thread::spawn(move || stdin.write_all(&body));
    let out = promtool.wait_with_output().expect("run promtool");
    let _ = writer.join();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
