//! The air gap, end to end with the real binaries: three `--once --to-file` runs of the real
//! client against a real scrape source write three bundles; on the connected side the first two
//! are imported by `telemeter-server import` (server stopped) and the third by `POST /import`
//! (server running, with curl). A token removed from the tokens file (then a reload) has its
//! bundles refused from then on. A bundle with a flipped byte, a truncated one and one made with a revoked
//! token are each refused with their reason, by both ways, and store nothing. `/federate` shows
//! the newest value (an older bundle imported after it does not replace it), and a real
//! Prometheus behind `--remote-write-url` has exactly the three samples with the timestamps the
//! client gave them.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;
use telemeter_common::{bundle, delimited, snappy};
use testkit::wait_until;

fn post(url: &str, body: &[u8]) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let mut r = agent
        .post(url)
        .header("Content-Type", "application/octet-stream")
        .send(body)
        .expect("POST /import");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (status, text)
}

/// The sample timestamp (ms) inside a bundle written by the client.
fn sample_time(path: &Path) -> i64 {
    let bytes = std::fs::read(path).unwrap();
    let b = bundle::parse(&bytes, 1 << 20)
        .unwrap()
        .verify([&bundle::key_of("edge-token")])
        .unwrap();
    let raw = snappy::decode_framed(&b.body, 1 << 20).unwrap();
    let families = delimited::decode(&raw, &delimited::Limits::default()).unwrap();
    families[0].metric[0].timestamp_ms.unwrap()
}

#[test]
fn three_bundles_cross_the_gap_and_bad_ones_are_refused() {
    let dir = TempDir::new("airgap");
    let (_source, source) = counter_source();
    // Probing scraped once: the client's runs see 2, 3, 4.

    // The isolated side: three runs, no server anywhere.
    let bundles = dir.path().join("bundles");
    let client = |token: &str, out: &Path| {
        let out = run_client(
            &[
                "--once",
                "--from",
                &source,
                "--to-file",
                out.to_str().unwrap(),
                "--to-token",
                token,
                "--id",
                "edge",
                "--match",
                "edge_runs_total",
            ],
            Duration::from_secs(60),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("wrote bundle "), "{stderr}");
        // Distinct scrape times (ms) whatever the machine's speed.
        std::thread::sleep(Duration::from_millis(20));
        stderr
    };
    for _ in 0..3 {
        client("edge-token", &bundles);
    }
    let mut written: Vec<PathBuf> = std::fs::read_dir(&bundles)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    written.sort();
    assert_eq!(written.len(), 3, "{written:?}");
    for path in &written {
        assert!(path.to_str().unwrap().ends_with("-edge.bundle"), "{path:?}");
    }
    let times: Vec<i64> = written.iter().map(|p| sample_time(p)).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");

    // The bad ones: a flipped byte in the upload, a truncated file, a revoked token's bundle.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let mut bytes = std::fs::read(&written[0]).unwrap();
    let i = bytes.len() - bundle::TAG_BYTES - 3;
    bytes[i] ^= 0x01;
    let flipped = bad.join("flipped.bundle");
    std::fs::write(&flipped, &bytes).unwrap();
    let bytes = std::fs::read(&written[1]).unwrap();
    let truncated = bad.join("truncated.bundle");
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    let revoked_dir = dir.path().join("revoked");
    client("revoked-token", &revoked_dir);
    let revoked = std::fs::read_dir(&revoked_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();

    // The receiver: a real Prometheus.
    let receiver = Prometheus::receiver();
    let prom = receiver.url.clone();

    // The connected side. The revoked token is no longer in the tokens file.
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"[{"token": "edge-token", "clusters": ["edge"]}]"#,
    )
    .unwrap();
    let data = dir.path().join("data");
    let remote_write = format!("{prom}/api/v1/write");
    let server_flags = |cmd: &mut Command| {
        cmd.arg("--storage-path")
            .arg(&data)
            .arg("--tokens-file")
            .arg(&tokens)
            .args(["--remote-write-url", &remote_write]);
    };
    let import = |files: &[&Path]| {
        let mut cmd = Command::new(server_binary());
        cmd.arg("import");
        server_flags(&mut cmd);
        cmd.args(files)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        wait_output(cmd.spawn().expect("import"), Duration::from_secs(120))
    };

    // By the command, server stopped: the first two bundles and the three bad ones.
    let out = import(&[&written[0], &flipped, &written[1], &truncated, &revoked]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = |path: &Path| {
        let name = path.display().to_string();
        stderr
            .lines()
            .find(|l| l.contains(&name))
            .unwrap_or_else(|| panic!("no line for {name}: {stderr}"))
            .to_string()
    };
    assert!(
        line(&written[0]).contains("imported 1 series of cluster \"edge\""),
        "{stderr}"
    );
    assert!(line(&written[1]).contains("imported 1 series"), "{stderr}");
    assert!(
        line(&flipped).contains("refused, nothing stored: bundle tag does not verify"),
        "{stderr}"
    );
    assert!(
        line(&truncated).contains("refused, nothing stored")
            && line(&truncated).contains("truncated"),
        "{stderr}"
    );
    assert!(
        line(&revoked).contains("refused, nothing stored: bundle tag does not verify"),
        "{stderr}"
    );
    assert!(
        stderr.contains("3 of 5 bundles refused; the others are imported"),
        "{stderr}"
    );

    // The server, running on the same directory.
    let external = format!("127.0.0.1:{}", free_port());
    let internal = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(server_binary());
    cmd.args(["--listen", &external, "--listen-internal", &internal]);
    server_flags(&mut cmd);
    let _server = Guard(
        cmd.stdin(Stdio::null())
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
    let federate = || {
        let (status, body) = get(&format!("http://{internal}/federate")).expect("federate");
        assert_eq!(status, 200);
        let values: Vec<String> = body
            .lines()
            .filter(|l| l.starts_with("edge_runs_total{"))
            .map(str::to_string)
            .collect();
        assert_eq!(values.len(), 1, "{body}");
        assert!(values[0].contains("_id=\"edge\""), "{body}");
        values[0].split(' ').nth(1).unwrap().parse::<f64>().unwrap()
    };
    let second = federate();

    // The command refuses to share the directory with the running server, in one line.
    let out = import(&[&written[2]]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("in use by a running telemeter-server") && stderr.lines().count() == 1,
        "{stderr}"
    );

    // By HTTP: the bad ones, each with its status and reason, then the third.
    let url = format!("http://{external}/import");
    let (status, reason) = post(&url, &std::fs::read(&flipped).unwrap());
    assert_eq!(
        (status, reason.contains("bundle tag does not verify")),
        (403, true),
        "{reason}"
    );
    let (status, reason) = post(&url, &std::fs::read(&truncated).unwrap());
    assert_eq!(
        (status, reason.contains("truncated")),
        (400, true),
        "{reason}"
    );
    let (status, reason) = post(&url, &std::fs::read(&revoked).unwrap());
    assert_eq!(
        (status, reason.contains("bundle tag does not verify")),
        (403, true),
        "{reason}"
    );
    assert_eq!(federate(), second, "a refused bundle changed /federate");
    // The third by curl, as the README does it.
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--data-binary"])
        .arg(format!("@{}", written[2].display()))
        .arg(&url)
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    let reason = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{reason}");
    assert!(
        reason.contains("imported 1 series of cluster \"edge\""),
        "{reason}"
    );
    let newest = federate();
    assert_eq!(newest, second + 1.0);
    // An older bundle imported again does not replace the newest value.
    let (status, reason) = post(&url, &std::fs::read(&written[0]).unwrap());
    assert_eq!(status, 200, "{reason}");
    assert_eq!(federate(), newest);

    // Revoking the token (removed from the file, then a reload) refuses its bundles from now on.
    std::fs::write(
        &tokens,
        r#"[{"token": "other-token", "clusters": ["edge"]}]"#,
    )
    .unwrap();
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let reload = agent
        .post(&format!("http://{internal}/-/reload"))
        .send(&[][..])
        .expect("reload");
    assert_eq!(reload.status().as_u16(), 200);
    let (status, reason) = post(&url, &std::fs::read(&written[2]).unwrap());
    assert_eq!(
        (status, reason.contains("bundle tag does not verify")),
        (403, true),
        "{reason}"
    );

    // The receiver has the three samples, with the timestamps the client gave them.
    let query = format!(
        "{prom}/api/v1/query?query={}",
        telemeter_common::http::percent_encode(r#"edge_runs_total{_id="edge"}[1h]"#)
    );
    let mut samples: Vec<(i64, f64)> = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let Some((200, body)) = get(&query) else {
                return false;
            };
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            samples = v["data"]["result"][0]["values"]
                .as_array()
                .map(|values| {
                    values
                        .iter()
                        .map(|p| {
                            (
                                (p[0].as_f64().unwrap() * 1000.0).round() as i64,
                                p[1].as_str().unwrap().parse().unwrap(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            samples.len() >= 3
        }),
        "receiver has {samples:?}"
    );
    let got: Vec<i64> = samples.iter().map(|s| s.0).collect();
    assert_eq!(got, times, "{samples:?}");
    assert_eq!(samples[2].1, newest, "{samples:?}");
}
