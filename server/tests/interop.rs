//! Uploads from real HTTP clients that send their bodies chunked (RFC 9112 §7.1), against the real
//! binary: a Go program using only net/http (what the upstream telemeter-client is built on: its
//! `/upload` body is a reader of unknown length, so net/http always chunks it), curl, and Python's
//! `http.client` with several chunk sizes. Each must get 200 and its series must appear on
//! `/federate`; each also shows, from its own side, that the body really went chunked.
//!
//! Go, curl and python3 are installed by `make setup` (`tests/setup.sh`); without them these tests
//! fail, they do not skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use telemeter_common::delimited;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::snappy;

/// A server accepting any client token, without a rate limit (every test pushes once per cluster).
fn start(dir: &TempDir) -> ServerProcess {
    ServerProcess::setup(dir).any_token().start()
}

/// Runs `command`, failing the test with `setup` advice when the program is not installed.
fn run(command: &mut Command, program: &str) -> Output {
    match command.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} is not installed: run `make setup` (tests/setup.sh installs it): {e}")
        }
        Err(e) => panic!("running {program}: {e}"),
    }
}

/// Asserts that `id`'s `series` series (plus its `up`) are served on `/federate`.
fn assert_served(s: &ServerProcess, id: &str, series: usize) {
    let text = s.federate();
    let lines = series_lines(&text)
        .iter()
        .filter(|l| l.contains(&format!("_id=\"{id}\"")))
        .count();
    assert_eq!(lines, series + 1, "cluster {id} on /federate:\n{text}");
}

/// A snappy-framed protobuf-delimited upload of `n` series, written to `dir/name`.
fn body_file(dir: &TempDir, name: &str, n: usize) -> PathBuf {
    let body = snappy::encode_framed(&delimited::encode(&families(None, n, now_ms())));
    let path = dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    path
}

/// Builds `tests/fixtures/go-upload` into `dir` with the Go toolchain (caches kept under the
/// target directory, so nothing is written to the home directory).
fn build_go_upload(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/go-upload/main.go");
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go");
    let binary = dir.join("go-upload");
    let output = run(
        Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&binary)
            .arg(&source)
            .env("GOCACHE", cache.join("cache"))
            .env("GOPATH", cache.join("path"))
            .env("CGO_ENABLED", "0"),
        "go",
    );
    assert!(
        output.status.success(),
        "go build failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    binary
}

#[test]
fn go_net_http_uploads_chunked_like_the_upstream_client() {
    let dir = TempDir::new("interop-go");
    let binary = build_go_upload(dir.path());
    let s = start(&dir);
    let body = body_file(&dir, "body", 30);
    let output = run(
        Command::new(&binary)
            .arg(format!("http://{}", s.external))
            .arg("any-client-token")
            .arg("go")
            .arg(&body),
        "go-upload",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "go-upload failed: {stdout}{stderr}"
    );
    assert!(stdout.contains("authorize: 200"), "{stdout}");
    let upload = stdout
        .lines()
        .find(|l| l.starts_with("upload: "))
        .unwrap_or_else(|| panic!("no upload line: {stdout}"));
    assert!(upload.starts_with("upload: 200 "), "{upload}");
    // net/http did not know the length (0 with a body means unknown to it) and chunked the body.
    assert!(
        upload.contains("content_length=0 ") || upload.contains("content_length=-1 "),
        "{upload}"
    );
    assert!(
        upload.contains(r#"wire="Transfer-Encoding: chunked""#),
        "{upload}"
    );
    assert_served(&s, "go", 30);
}

#[test]
fn curl_uploads_a_chunked_body() {
    let dir = TempDir::new("interop-curl");
    let s = start(&dir);
    let token = s.upload_token("any-client-token", "curl");
    let body = body_file(&dir, "body", 40);
    let output = run(
        Command::new("curl")
            .args(["--silent", "--show-error", "--verbose", "--max-time", "30"])
            .args(["--output", "/dev/null", "--write-out", "%{http_code}"])
            .args(["-H", "Transfer-Encoding: chunked"])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", &format!("Content-Type: {PROTO_DELIMITED}")])
            .args(["-H", "Content-Encoding: snappy"])
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg(s.url("/upload")),
        "curl",
    );
    let status = String::from_utf8_lossy(&output.stdout);
    let trace = String::from_utf8_lossy(&output.stderr);
    assert_eq!(status, "200", "{trace}");
    // curl's own trace of the request it sent.
    assert!(trace.contains("> Transfer-Encoding: chunked"), "{trace}");
    assert!(!trace.contains("> Content-Length"), "{trace}");
    assert_served(&s, "curl", 40);
}

/// Uploads `body` (a file) to `url` with `http.client`, in chunks of `chunk` bytes, with
/// `encode_chunked=True`; prints a JSON line: the status, and the chunk sizes read back from
/// the bytes the connection sent.
const PYTHON_UPLOAD: &str = r#"
import http.client, json, sys, urllib.parse

url, token, path, chunk, encoding = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
body = open(path, "rb").read()

class Recording(http.client.HTTPConnection):
    sent = b""
    def send(self, data):
        Recording.sent += data
        super().send(data)

parts = urllib.parse.urlsplit(url)
conn = Recording(parts.hostname, parts.port, timeout=30)
pieces = (body[i:i + chunk] for i in range(0, len(body), chunk))
conn.request("POST", parts.path, body=pieces, encode_chunked=True, headers={
    "Authorization": "Bearer " + token,
    "Content-Type": "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited",
    "Content-Encoding": encoding,
    "Transfer-Encoding": "chunked",
})
response = conn.getresponse()
reply = response.read().decode()

head, _, rest = Recording.sent.partition(b"\r\n\r\n")
sizes = []
while rest:
    line, _, rest = rest.partition(b"\r\n")
    size = int(line, 16)
    sizes.append(size)
    rest = rest[size + 2:]
    if size == 0:
        break
print(json.dumps({
    "status": response.status,
    "reply": reply,
    "chunked": b"\r\ntransfer-encoding: chunked" in head.lower(),
    "content_length": b"content-length" in head.lower(),
    "sizes": sizes,
}))
"#;

#[test]
fn python_http_client_uploads_in_chunks_of_1_7_and_65536_bytes() {
    let dir = TempDir::new("interop-python");
    let s = start(&dir);
    let script = dir.file("upload.py", PYTHON_UPLOAD);
    // Small snappy bodies for the tiny chunks; a larger identity body (several 64 KiB chunks).
    let cases = [
        (1usize, "py1", 10usize, "snappy"),
        (7, "py7", 20, "snappy"),
        (65536, "py64k", 4000, "identity"),
    ];
    for (chunk, id, series, encoding) in cases {
        let token = s.upload_token("any-client-token", id);
        let pd = delimited::encode(&families(None, series, now_ms()));
        let body = if encoding == "snappy" {
            snappy::encode_framed(&pd)
        } else {
            pd
        };
        let path = dir.path().join(id);
        std::fs::write(&path, &body).unwrap();
        let output = run(
            Command::new("python3")
                .arg(&script)
                .arg(s.url("/upload"))
                .arg(&token)
                .arg(&path)
                .arg(chunk.to_string())
                .arg(encoding),
            "python3",
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{id}: {stdout}{stderr}");
        let result: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{id}: {e}: {stdout}{stderr}"));
        assert_eq!(result["status"], 200, "{id}: {result}");
        assert_eq!(result["chunked"], true, "{id}: {result}");
        assert_eq!(result["content_length"], false, "{id}: {result}");
        // Every chunk but the last data chunk is `chunk` bytes; then the terminating 0.
        let sizes: Vec<usize> = result["sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let expected: Vec<usize> = body
            .chunks(chunk)
            .map(<[u8]>::len)
            .chain(std::iter::once(0))
            .collect();
        assert_eq!(sizes, expected, "{id}");
        assert!(sizes.len() > 2, "{id}: only {} chunks", sizes.len());
        println!(
            "python http.client, {chunk}-byte chunks: {} chunks, {} body bytes → 200",
            sizes.len() - 1,
            body.len()
        );
        assert_served(&s, id, series);
    }
}
