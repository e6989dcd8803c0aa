//! A real Prometheus scrapes our `/federate` (honor_labels) and answers queries over what was pushed.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PROMETHEUS: &str = "/usr/bin/prometheus";

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn prometheus_scrapes_federate() {
    assert!(
        std::path::Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is not installed: run `make setup` (Debian package prometheus)"
    );
    let dir = TempDir::new("prom");
    let tokens = dir.file("tokens", TOKENS);
    let s = ServerProcess::start(
        &dir.path().join("data"),
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--ratelimit",
            "0s",
        ],
    );
    let token = s.upload_token("secret", "test");
    let r = s.upload(&token, &families(Some("test"), 25, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    // A second cluster: its families repeat the first one's names (and HELP/TYPE lines) in the
    // same scrape, which Prometheus must accept.
    let other = s.upload_token("secret", "other");
    let r = s.upload(&other, &families(None, 5, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);

    let config = dir.file(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: telemeter\n    honor_labels: true\n    metrics_path: /federate\n    static_configs:\n      - targets: ['{}']\n",
            s.internal
        ),
    );
    let port = free_port();
    let prom = Killed(
        Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("prom").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );

    let count = |selector: &str| -> Option<String> {
        let query = format!(
            "http://127.0.0.1:{port}/api/v1/query?query={}",
            telemeter_common::http::percent_encode(&format!("count({selector})"))
        );
        let r = get(&query, &[]);
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .map(String::from)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = count("{_id=\"test\"}");
        if last.as_deref() == Some("26") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never counted 26 series with _id=\"test\"; last answer: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(count("{_id=\"other\"}").as_deref(), Some("6"));
    assert_eq!(count("up{job=\"prometheus\"}").as_deref(), Some("2"));
    drop(prom);
}
