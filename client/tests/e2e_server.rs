//! End to end with every real part: Prometheus → telemeter-client → telemeter-server → the server's
//! `/federate` shows the series with `_id` and the renamed and anonymized labels.
//!
//! The server binary belongs to another crate, so Cargo does not build it for this test: it is looked
//! up next to this test binary (`target/<profile>/telemeter-server`; `make test` builds it first) and
//! the test is skipped with a note when it is missing.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;
use telemeter_client::anonymize::anonymize;

#[test]
fn prometheus_client_server_federate() {
    let server_bin = server_binary();
    let prom = Prometheus::start(1);
    let dir = TempDir::new("server");
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, r#"[{"token": "e2e-token", "clusters": ["e2e"]}]"#)
        .expect("tokens file");
    let external = format!("127.0.0.1:{}", free_port());
    let internal = format!("127.0.0.1:{}", free_port());
    let storage = dir.path().join("data");
    let server = Command::new(&server_bin)
        .args(["--listen", &external, "--listen-internal", &internal])
        .arg("--storage-path")
        .arg(&storage)
        .arg("--tokens-file")
        .arg(&tokens)
        .args(["--ratelimit", "0s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start telemeter-server");
    let mut server = Guard(server);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&format!("http://{external}/healthz")).map(|(s, _)| s) != Some(200) {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!(
                "{} exited with {status} before serving /healthz (a stale build? run `make test`)",
                server_bin.display()
            );
        }
        assert!(Instant::now() < deadline, "server not healthy within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }

    let to = format!("http://{external}");
    let out = run_client(
        &[
            "--once",
            "--from",
            &prom.url,
            "--to",
            &to,
            "--to-token",
            "e2e-token",
            "--id",
            "e2e",
            "--match",
            r#"{__name__="up"}"#,
            "--match",
            "prometheus_build_info",
            "--rename",
            "prometheus_build_info=build_info",
            "--anonymize-labels",
            "instance",
            "--anonymize-salt",
            "s1",
        ],
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (status, body) =
        get(&format!("http://{internal}/federate")).expect("server /federate reachable");
    assert_eq!(status, 200);
    let anonymized = anonymize("s1", &format!("127.0.0.1:{}", prom.port));
    // What was pushed: the server adds each cluster's last push time beside it.
    assert!(
        body.contains("telemeter_last_push_timestamp_seconds{_id=\"e2e\"} "),
        "{body}"
    );
    let series: Vec<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("telemeter_last_push_timestamp_seconds"))
        .collect();
    assert!(
        series.iter().any(|l| l.starts_with("up{")),
        "up missing: {body}"
    );
    assert!(
        series.iter().any(|l| l.starts_with("build_info{")),
        "renamed build_info missing: {body}"
    );
    for line in &series {
        assert!(line.contains(r#"_id="e2e""#), "{line}");
        assert!(
            line.contains(&format!("instance=\"{anonymized}\"")),
            "{line}"
        );
        assert!(!line.starts_with("prometheus_build_info"), "{line}");
    }
}
