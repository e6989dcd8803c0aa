//! Several endpoints in one push, end to end with the real binaries: a node-exporter-like and an
//! app endpoint (python3 http.server) plus a dead one, in one `--once` run of the real client
//! against the real server. `/federate` shows both live endpoints' series with distinct `job` and
//! `instance`, a label the app sets itself kept (honor_labels), and `up` 1, 1, 0; the exit code
//! says that one endpoint did not answer.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;
use testkit::wait_until;

/// Serves argv[2] as text exposition on /metrics.
const EXPORTER: &str = r##"
import http.server, sys
body = sys.argv[2].encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"##;

const NODE: &str = "# TYPE node_load1 gauge\nnode_load1 0.5\n# TYPE node_cpu_seconds_total counter\nnode_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 12.5\n";
const APP: &str = "# TYPE http_requests_total counter\nhttp_requests_total{path=\"/\"} 7\n# TYPE app_info gauge\napp_info{job=\"own\",version=\"1.2\"} 1\n";

fn exporter(body: &str) -> (Guard, u16) {
    let port = free_port();
    let guard = Guard(
        Command::new("python3")
            .args(["-c", EXPORTER, &port.to_string(), body])
            .stdin(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let url = format!("http://127.0.0.1:{port}/metrics");
    assert!(
        wait_until(Duration::from_secs(20), || get(&url).is_some()),
        "python exporter not up"
    );
    (guard, port)
}

/// The /federate lines of metric `name` (`name{...} value`).
fn lines<'a>(body: &'a str, name: &str) -> Vec<&'a str> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .collect()
}

#[test]
fn two_live_endpoints_and_a_dead_one_in_one_push() {
    let dir = TempDir::new("endpoints");
    let (_node, node_port) = exporter(NODE);
    let (_app, app_port) = exporter(APP);
    // Bound then released: nothing listens there.
    let dead_port = free_port();

    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"[{"token": "edge-token", "clusters": ["edge"]}]"#,
    )
    .unwrap();
    let external = format!("127.0.0.1:{}", free_port());
    let internal = format!("127.0.0.1:{}", free_port());
    let _server = Guard(
        Command::new(server_binary())
            .args(["--listen", &external, "--listen-internal", &internal])
            .arg("--storage-path")
            .arg(dir.path().join("data"))
            .arg("--tokens-file")
            .arg(&tokens)
            .args(["--ratelimit", "0s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start telemeter-server"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || get(&format!(
            "http://{external}/healthz"
        ))
        .is_some_and(|(s, _)| s == 200)),
        "server not healthy"
    );

    let to = format!("http://{external}");
    let node = format!("node=http://127.0.0.1:{node_port}/metrics");
    let app = format!("app=http://127.0.0.1:{app_port}/metrics");
    let dead = format!("dead=http://127.0.0.1:{dead_port}/metrics");
    let run = |from: &[&str]| {
        let mut args = vec!["--once"];
        for f in from {
            args.extend_from_slice(&["--from", f]);
        }
        args.extend_from_slice(&[
            "--to",
            &to,
            "--to-token",
            "edge-token",
            "--id",
            "edge",
            // `up` is not selected: it is pushed all the same.
            "--match",
            r#"{__name__=~"node_.*|http_.*|app_.*"}"#,
        ]);
        run_client(&args, Duration::from_secs(60))
    };

    let out = run(&[&node, &app, &dead]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains(&format!("--from http://127.0.0.1:{dead_port}/metrics"))
            && stderr.contains("1 --from endpoints did not answer"),
        "{stderr}"
    );

    let (status, body) = get(&format!("http://{internal}/federate")).expect("federate");
    assert_eq!(status, 200);
    let node_instance = format!("instance=\"127.0.0.1:{node_port}\"");
    let app_instance = format!("instance=\"127.0.0.1:{app_port}\"");
    let dead_instance = format!("instance=\"127.0.0.1:{dead_port}\"");
    let has = |line: &str, labels: &[&str]| labels.iter().all(|l| line.contains(l));
    for name in ["node_load1", "node_cpu_seconds_total"] {
        let got = lines(&body, name);
        assert_eq!(got.len(), 1, "{body}");
        assert!(
            has(got[0], &["job=\"node\"", &node_instance, "_id=\"edge\""]),
            "{body}"
        );
    }
    let got = lines(&body, "http_requests_total");
    assert_eq!(got.len(), 1, "{body}");
    assert!(has(got[0], &["job=\"app\"", &app_instance]), "{body}");
    // The app's own job label wins (honor_labels); the instance is added.
    let got = lines(&body, "app_info");
    assert_eq!(got.len(), 1, "{body}");
    assert!(has(got[0], &["job=\"own\"", &app_instance]), "{body}");

    let mut up: Vec<(String, f64)> = lines(&body, "up")
        .iter()
        .map(|l| {
            let job = ["node", "app", "dead"]
                .into_iter()
                .find(|j| l.contains(&format!("job=\"{j}\"")))
                .unwrap_or_else(|| panic!("up without a known job: {l}"));
            let instance = match job {
                "node" => &node_instance,
                "app" => &app_instance,
                _ => &dead_instance,
            };
            assert!(l.contains(instance.as_str()), "{l}");
            (
                job.to_string(),
                l.rsplit(' ').next().unwrap().parse().unwrap(),
            )
        })
        .collect();
    up.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        up,
        vec![
            ("app".to_string(), 1.0),
            ("dead".to_string(), 0.0),
            ("node".to_string(), 1.0)
        ],
        "{body}"
    );

    // Every endpoint answering is exit 0; none answering is a failed run (1), nothing pushed.
    let out = run(&[&node, &app]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[&dead]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
