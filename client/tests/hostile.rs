//! The real client binary against peers that misbehave: a scrape source whose replies are built to
//! blow up the decoders (protobuf and text), and a server that redirects `/authorize` or `/upload`.
//!
//! Each hostile run must end with exit 1 and a one-line reason, and its peak memory (the child's
//! `ru_maxrss` from `wait4`, so no sampling race) must stay under [`bound`]: 8 × `--limit-bytes`
//! plus 32 MiB. That is the reply itself, its decoded form (the client refuses one that would take
//! over 4 × `--limit-bytes`, `scrape::DECODED_BYTES_PER_LIMIT_BYTE`), the upload body and its
//! compressed copy, plus the program. Replies just under the decode budget are accepted and pushed
//! within the same bound; just over it they are refused.
//!
//! The peers are a few lines of std `TcpListener` here, not the HTTP server of `telemeter-common`:
//! they must say things a correct server never says.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use telemeter_client::prescan;
use telemeter_client::scrape::DECODED_BYTES_PER_LIMIT_BYTE;
use telemeter_common::delimited;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::model::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
use testkit::wait_output;

const CLIENT: &str = env!("CARGO_BIN_EXE_telemeter-client");
/// The client's default `--limit-bytes`, which the hostile replies fill.
const LIMIT: usize = 8 << 20;
const ID: &str = "hostile";

/// The most memory a client run may take: 8 × `--limit-bytes` + 32 MiB.
fn bound(limit: usize) -> u64 {
    8 * limit as u64 + (32 << 20)
}

/// One canned reply.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Arc<Vec<u8>>,
}

impl Reply {
    fn new(status: u16, content_type: &str, body: Vec<u8>) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: Arc::new(body),
        }
    }

    fn redirect(status: u16, location: &str) -> Reply {
        Reply {
            status,
            headers: vec![("Location".into(), location.into())],
            body: Arc::new(Vec::new()),
        }
    }

    /// What `/authorize` answers when it gives a token.
    fn token() -> Reply {
        let json = format!(
            r#"{{"version":1,"token":"upload-token","expiresInSeconds":3600,"labels":{{"_id":"{ID}"}}}}"#
        );
        Reply::new(200, "application/json", json.into_bytes())
    }
}

type Routes = dyn Fn(&str) -> Reply + Send + Sync;

/// A peer answering every request by its path, one request per connection; it records
/// `(method, path, body length)`.
struct Peer {
    url: String,
    seen: Arc<Mutex<Vec<(String, String, usize)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Peer {
    fn start(routes: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let routes: Arc<Routes> = Arc::new(routes);
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = serve(stream, &*routes, &seen);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Peer {
            url,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<(String, String, usize)> {
        self.seen.lock().expect("seen").clone()
    }

    fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|(_, p, _)| p).collect()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    routes: &Routes,
    seen: &Mutex<Vec<(String, String, usize)>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("").to_string();
    let mut length = 0usize;
    for _ in 0..100 {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length.min(64 << 20)];
    reader.read_exact(&mut body)?;
    seen.lock()
        .expect("seen")
        .push((method, path.clone(), body.len()));
    let reply = routes(&path);
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = stream;
    stream.write_all(head.as_bytes())?;
    // The client may stop reading a reply it refuses: a failed write is its business.
    stream.write_all(&reply.body)?;
    stream.flush()
}

/// How a client run ended.
struct Run {
    code: Option<i32>,
    stderr: String,
    /// Peak resident memory, in bytes.
    max_rss: u64,
}

impl Run {
    fn one_line(&self) -> &str {
        let line = self.stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "not one line: {}", self.stderr);
        line
    }
}

/// Set in the environment of the helper process (see [`rusage_helper`]): the client's arguments,
/// separated by U+001F.
const HELPER_ENV: &str = "TELEMETER_HOSTILE_RUSAGE_OF";

/// Runs the client to completion (killed after 60 s) and measures its peak memory.
///
/// Linux charges a process started by `vfork` + `exec` (how `Command` starts one) with the peak
/// memory of the process it was started from, so a client started from this test process would
/// report the tests' own peak. It is started instead from a fresh copy of this test binary, which
/// is small, running only [`rusage_helper`]: that process reads the client's `ru_maxrss` from
/// `wait4` and prints it.
fn run_client(args: &[&str]) -> Run {
    let exe = std::env::current_exe().expect("test binary");
    let child = Command::new(exe)
        .args([
            "rusage_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(HELPER_ENV, args.join("\u{1f}"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the helper");
    // The helper kills the client after 60 s; 90 s bounds the helper itself.
    let out = wait_output(child, Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rusage: "))
        .unwrap_or_else(|| {
            panic!(
                "helper said: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let mut fields = line.split(' ');
    let code = fields.next().and_then(|c| c.parse().ok());
    let max_rss_kib: u64 = fields.next().and_then(|m| m.parse().ok()).expect("maxrss");
    Run {
        code,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        max_rss: max_rss_kib * 1024,
    }
}

/// Not a test: the helper process of [`run_client`]. Runs the client (its stderr is this process's),
/// waits for it with `wait4`, and prints `rusage: <exit code or -> <ru_maxrss in KiB>`. Without
/// [`HELPER_ENV`] it does nothing.
#[test]
#[ignore = "not a test: the helper process of run_client"]
#[allow(clippy::zombie_processes)] // reaped by wait4, which std's Child does not know about
fn rusage_helper() {
    let Some(args) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let args = args.into_string().expect("UTF-8 arguments");
    let mut child = Command::new(CLIENT)
        .args(args.split('\u{1f}'))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start telemeter-client");
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut status = 0;
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our child, not reaped yet (`Child` never waited on it); the pointers are
        // to live locals.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(reaped >= 0, "wait4: {}", std::io::Error::last_os_error());
        if reaped == pid {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            // SAFETY: as above; this blocks until the killed child is reaped.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            panic!("telemeter-client did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status).to_string()
    } else {
        "-".to_string()
    };
    println!("rusage: {code} {}", usage.ru_maxrss);
}

/// `--once` from `source` (a path of `peer`) to `peer`, with the default `--limit-bytes`.
fn once(peer: &Peer, source: &str) -> Run {
    let from = format!("{}{source}", peer.url);
    run_client(&[
        "--once",
        "--from",
        &from,
        "--to",
        &peer.url,
        "--to-token",
        "client-token",
        "--id",
        ID,
        "--match",
        "{__name__=~\".+\"}",
    ])
}

/// A source of one reply on `/source` (an exporter) and `/federate` (a Prometheus), that also
/// takes the push (token, then 200).
fn source(reply: Reply) -> Peer {
    Peer::start(move |path| match path {
        "/source" | "/federate" => reply.clone(),
        "/authorize" => Reply::token(),
        "/upload" => Reply::new(200, "text/plain", Vec::new()),
        _ => Reply::new(404, "text/plain", b"not found".to_vec()),
    })
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// One length-prefixed `MetricFamily` named `m` of type gauge, whose series are `series` (raw
/// encoded `Metric` fields, repeated until the body reaches `size`).
fn pd_family_of(series: &[u8], size: usize) -> Vec<u8> {
    let head = [0x0a, 1, b'm', 0x18, 1];
    let mut message = head.to_vec();
    // Room for the length prefix (at most 4 bytes at these sizes).
    while message.len() + series.len() + 4 <= size {
        message.extend_from_slice(series);
    }
    let mut body = Vec::with_capacity(message.len() + 4);
    varint(message.len(), &mut body);
    body.extend_from_slice(&message);
    body
}

fn assert_refused(run: &Run, reason: &str) {
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let line = run.one_line();
    assert!(line.contains(reason), "{line}");
    assert!(
        run.max_rss < bound(LIMIT),
        "peak {} MiB over the bound of {} MiB: {line}",
        run.max_rss >> 20,
        bound(LIMIT) >> 20
    );
    eprintln!(
        "peak {:.1} MiB: {line}",
        run.max_rss as f64 / f64::from(1 << 20)
    );
}

#[test]
fn millions_of_empty_protobuf_series_are_refused_before_decoding() {
    // The reply that took the client to 830 MB: 4 million empty series (2 bytes each).
    let body = pd_family_of(&[0x22, 0], LIMIT);
    assert!(body.len() <= LIMIT);
    let peer = source(Reply::new(200, PROTO_DELIMITED, body));
    let run = once(&peer, "/source");
    assert_refused(&run, "more than 100000 series");
    assert!(!peer.paths().contains(&"/upload".to_string()));
}

#[test]
fn millions_of_empty_protobuf_labels_are_refused() {
    // The variant that took 210 MB and exited 0: one series of 4 million empty labels.
    let labels = [0x0a, 0].repeat((LIMIT - 64) / 2);
    let mut series = vec![0x22];
    varint(labels.len(), &mut series);
    series.extend_from_slice(&labels);
    let body = pd_family_of(&series, LIMIT);
    let peer = source(Reply::new(200, PROTO_DELIMITED, body));
    let run = once(&peer, "/source");
    assert_refused(&run, "labels or more, over the 256 a reply may have");
}

#[test]
fn many_protobuf_series_of_many_labels_are_refused_by_the_memory_budget() {
    // 16,000 series of 256 empty labels: within every count cap, 200 MB decoded.
    let labels = [0x0a, 0].repeat(256);
    let mut series = vec![0x22];
    varint(labels.len(), &mut series);
    series.extend_from_slice(&labels);
    let body = pd_family_of(&series, LIMIT);
    let peer = source(Reply::new(200, PROTO_DELIMITED, body));
    let run = once(&peer, "/source");
    assert_refused(&run, "MiB to decode, over the 32.0 MiB allowed");
    assert!(run.stderr.contains("raise --limit-bytes"), "{}", run.stderr);
}

#[test]
fn text_of_empty_series_is_refused_by_the_memory_budget() {
    // Two million `a 1` lines: the parser's 100,000-series cap comes only after it built them.
    let body = b"a 1\n".repeat(LIMIT / 4);
    let peer = source(Reply::new(200, "text/plain; version=0.0.4", body));
    let run = once(&peer, "/source");
    assert_refused(&run, "MiB to decode");
}

#[test]
fn text_of_many_labels_is_refused_by_the_memory_budget() {
    let labels: Vec<String> = (0..200).map(|i| format!("l{i}=\"\"")).collect();
    let line = format!("m{{{}}} 1\n", labels.join(","));
    let body = line.repeat(LIMIT / line.len()).into_bytes();
    let peer = source(Reply::new(200, "text/plain; version=0.0.4", body));
    let run = once(&peer, "/source");
    assert_refused(&run, "MiB to decode");
}

#[test]
fn text_of_repeated_labels_is_refused() {
    // The same label over and over on 64 KiB lines: too many labels for one series.
    let line = format!("m{{{}}} 1\n", "a=\"\",".repeat(13_000));
    let body = line.repeat(LIMIT / line.len()).into_bytes();
    let peer = source(Reply::new(200, "text/plain; version=0.0.4", body));
    let run = once(&peer, "/source");
    assert_refused(&run, "labels or more");
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `n` valid gauge series of 64 labels each (the most the server takes): label-heavy, so they take
/// about 10 bytes decoded per byte on the wire.
fn pd_label_heavy(n: usize) -> Vec<u8> {
    use prost::Message;
    let mut metric = Metric {
        label: (1..64)
            .map(|l| LabelPair::new(&format!("l{l}"), &(l % 7).to_string()))
            .collect(),
        gauge: Some(Gauge { value: Some(1.0) }),
        timestamp_ms: Some(now_ms()),
        ..Default::default()
    };
    let head = MetricFamily {
        name: Some("label_heavy".into()),
        r#type: Some(MetricType::Gauge as i32),
        ..Default::default()
    };
    let mut message = head.encode_to_vec();
    for i in 0..n {
        metric.label.truncate(63);
        metric.label.push(LabelPair::new("s", &i.to_string()));
        let bytes = metric.encode_to_vec();
        message.push(0x22);
        varint(bytes.len(), &mut message);
        message.extend_from_slice(&bytes);
    }
    let mut body = Vec::with_capacity(message.len() + 4);
    varint(message.len(), &mut body);
    body.extend_from_slice(&message);
    body
}

fn text_label_heavy(n: usize) -> Vec<u8> {
    let labels: Vec<String> = (1..64).map(|l| format!("l{l}=\"{}\"", l % 7)).collect();
    let labels = labels.join(",");
    let mut body = String::from("# TYPE label_heavy gauge\n");
    for i in 0..n {
        body.push_str(&format!("label_heavy{{{labels},s=\"{i}\"}} 1\n"));
    }
    body.into_bytes()
}

/// The largest `n` whose body `make(n)` the client admits (by its own estimate), by bisection.
fn largest_admitted(make: impl Fn(usize) -> Vec<u8>, protobuf: bool) -> usize {
    let transform = prescan::Transform::of(&[], ID, 0);
    let budget = LIMIT * DECODED_BYTES_PER_LIMIT_BYTE;
    let limits = delimited::Limits {
        max_message_bytes: LIMIT,
        max_total_bytes: LIMIT,
        ..delimited::Limits::default()
    };
    let fits = |n: usize| {
        let body = make(n);
        if body.len() > LIMIT {
            return false;
        }
        let estimate = if protobuf {
            prescan::protobuf(&body, &limits, &transform)
        } else {
            prescan::text(&body, 10_000, &transform)
        };
        estimate.expect("valid body").peak_bytes() <= budget
    };
    let mut hi = 1024;
    while fits(hi) {
        hi *= 2;
    }
    let mut lo = hi / 2;
    assert!(fits(lo));
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// At the edge of the budget: the largest reply admitted is decoded, transformed, encoded,
/// compressed and pushed within the bound; a little more is refused.
fn edge_of_the_budget(content_type: &str, make: impl Fn(usize) -> Vec<u8>, protobuf: bool) {
    let n = largest_admitted(&make, protobuf);
    let body = make(n);
    assert!(body.len() <= LIMIT);
    let peer = source(Reply::new(200, content_type, body));
    // From /federate: an exporter's series would also get job and instance, which the client's
    // estimate counts and `largest_admitted` does not.
    let run = once(&peer, "/federate");
    assert_eq!(run.code, Some(0), "{n} series refused: {}", run.stderr);
    let uploads: Vec<_> = peer
        .seen()
        .into_iter()
        .filter(|(_, p, _)| p == "/upload")
        .collect();
    assert_eq!(uploads.len(), 1, "{:?}", peer.seen());
    assert!(
        run.max_rss < bound(LIMIT),
        "{n} series: peak {} MiB over the bound of {} MiB",
        run.max_rss >> 20,
        bound(LIMIT) >> 20
    );
    eprintln!(
        "{content_type}: {n} series admitted, peak {:.1} MiB, upload of {} bytes",
        run.max_rss as f64 / f64::from(1 << 20),
        uploads[0].2
    );

    let over = source(Reply::new(200, content_type, make(n + n / 20)));
    let run = once(&over, "/federate");
    assert_refused(&run, "MiB to decode");
}

#[test]
fn protobuf_at_the_edge_of_the_budget_is_pushed_within_the_bound() {
    edge_of_the_budget(PROTO_DELIMITED, pd_label_heavy, true);
}

#[test]
fn text_at_the_edge_of_the_budget_is_pushed_within_the_bound() {
    edge_of_the_budget("text/plain; version=0.0.4", text_label_heavy, false);
}

const METRICS: &str = "# TYPE up gauge\nup{job=\"a\"} 1\n";

#[test]
fn a_redirected_authorize_is_a_failure_and_is_not_followed() {
    for status in [301, 302, 307, 308] {
        let peer = Peer::start(move |path| match path {
            "/source" => Reply::new(200, "text/plain", METRICS.as_bytes().to_vec()),
            "/authorize" => Reply::redirect(status, "/elsewhere/authorize"),
            _ => Reply::token(),
        });
        let run = once(&peer, "/source");
        assert_eq!(run.code, Some(1), "{status}: {}", run.stderr);
        let line = run.one_line();
        assert!(
            line.contains(&format!(
                "authorize at {}/authorize answered {status}",
                peer.url
            )),
            "{line}"
        );
        assert!(line.contains("\"/elsewhere/authorize\""), "{line}");
        assert!(line.contains("redirects are not followed"), "{line}");
        assert_eq!(peer.paths(), ["/source", "/authorize"], "{status}");
    }
}

#[test]
fn a_redirected_upload_is_a_failure_and_is_not_followed() {
    for status in [301, 302, 303, 307, 308] {
        let peer = Peer::start(move |path| match path {
            "/source" => Reply::new(200, "text/plain", METRICS.as_bytes().to_vec()),
            "/authorize" => Reply::token(),
            "/upload" => Reply::redirect(status, "http://127.0.0.1:1/upload"),
            _ => Reply::new(200, "text/plain", Vec::new()),
        });
        let run = once(&peer, "/source");
        assert_eq!(run.code, Some(1), "{status}: {}", run.stderr);
        let line = run.one_line();
        assert!(
            line.contains(&format!("upload at {}/upload answered {status}", peer.url)),
            "{line}"
        );
        assert!(line.contains("\"http://127.0.0.1:1/upload\""), "{line}");
        let seen = peer.seen();
        assert_eq!(seen.len(), 3, "{status}: {seen:?}");
        assert_eq!(
            (seen[2].0.as_str(), seen[2].1.as_str()),
            ("POST", "/upload")
        );
        assert!(seen[2].2 > 0, "the upload carried its body");
    }
    // Without a Location the reason says so.
    let peer = Peer::start(|path| match path {
        "/source" => Reply::new(200, "text/plain", METRICS.as_bytes().to_vec()),
        "/authorize" => Reply::token(),
        _ => Reply::new(302, "text/plain", Vec::new()),
    });
    let run = once(&peer, "/source");
    assert_eq!(run.code, Some(1));
    assert!(
        run.one_line().contains("answered 302 with Location (none)"),
        "{}",
        run.stderr
    );
}
