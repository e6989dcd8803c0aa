//! The spool through an outage, end to end with the real binaries: the server is down during five
//! `--once` runs, each run's upload is kept in `--spool-dir`; the server comes up and the sixth run
//! sends all six, oldest first. `/federate` shows the newest value (the late uploads never replace
//! it), and a real Prometheus behind `--remote-write-url` has all six samples with their original
//! timestamps (the history the outage would otherwise have lost).
//!
//! The scrape source is a small python3 http.server whose counter goes up by one per scrape.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;
use testkit::wait_until;

#[test]
fn an_outage_of_five_runs_loses_nothing() {
    let dir = TempDir::new("spool-outage");
    let (_source, source) = counter_source();

    // The remote-write receiver: a real Prometheus.
    let receiver = Prometheus::receiver();
    let prom = receiver.url.clone();

    let external = format!("127.0.0.1:{}", free_port());
    let internal = format!("127.0.0.1:{}", free_port());
    let spool = dir.path().join("spool");
    let to = format!("http://{external}");
    let client_args = [
        "--once",
        "--from",
        &source,
        "--to",
        &to,
        "--to-token",
        "edge-token",
        "--id",
        "edge",
        "--match",
        "edge_runs_total",
        "--spool-dir",
        spool.to_str().unwrap(),
    ];
    // Five runs while nothing listens on the server's port.
    for run in 1..=5 {
        let out = run_client(&client_args, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "run {run} succeeded with no server");
        assert!(stderr.contains("kept in the spool"), "run {run}: {stderr}");
        // Distinct scrape times (ms) for every run, whatever the machine's speed.
        std::thread::sleep(Duration::from_millis(20));
    }
    let spooled = kept(&spool);
    assert_eq!(spooled, 5);

    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"[{"token": "edge-token", "clusters": ["edge"]}]"#,
    )
    .unwrap();
    // The default --ratelimit (4m30s): the five late uploads must not be refused by it.
    let server = Command::new(server_binary())
        .args(["--listen", &external, "--listen-internal", &internal])
        .arg("--storage-path")
        .arg(dir.path().join("data"))
        .arg("--tokens-file")
        .arg(&tokens)
        .args(["--remote-write-url", &format!("{prom}/api/v1/write")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start telemeter-server");
    let _server = Guard(server);
    assert!(
        wait_until(Duration::from_secs(30), || get(&format!(
            "http://{external}/healthz"
        ))
        .is_some_and(|(s, _)| s == 200)),
        "server not healthy"
    );

    let out = run_client(&client_args, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "sixth run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kept(&spool), 0, "spool not empty");

    // /federate serves the newest value: the sixth scrape's.
    let (status, body) = get(&format!("http://{internal}/federate")).expect("federate");
    assert_eq!(status, 200);
    let values: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("edge_runs_total{"))
        .collect();
    assert_eq!(values.len(), 1, "{body}");
    let newest: f64 = values[0].split(' ').nth(1).unwrap().parse().unwrap();

    // The receiver has all six samples, in order, ending with the newest.
    let query = format!(
        "{prom}/api/v1/query?query={}",
        telemeter_common::http::percent_encode(r#"edge_runs_total{_id="edge"}[1h]"#)
    );
    let mut samples: Vec<f64> = Vec::new();
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
                        .map(|p| p[1].as_str().unwrap().parse().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            samples.len() >= 6
        }),
        "receiver has {samples:?}"
    );
    assert_eq!(samples.len(), 6, "{samples:?}");
    assert!(
        samples.windows(2).all(|w| w[1] == w[0] + 1.0),
        "{samples:?}"
    );
    assert_eq!(samples[5], newest, "{samples:?} vs /federate {newest}");
}

/// A 503 is spooled and the next run sends the exact same bytes, marked as a backfill; a 400 (it
/// would be refused again) is not spooled.
#[test]
fn a_5xx_is_spooled_byte_for_byte_and_a_4xx_is_not() {
    use std::collections::VecDeque;
    let dir = TempDir::new("spool-status");
    let spool = dir.path().join("spool");
    let receiver = Receiver::start(Behaviour {
        upload_replies: VecDeque::from([(503, None), (200, None), (400, None)]),
        ..Behaviour::default()
    });
    let from = format!("{}/metrics", receiver.url);
    let args = once_args(&receiver, &from, &spool);
    let out = run_client(&args, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("status 503") && stderr.contains("kept in the spool"),
        "{stderr}"
    );
    assert_eq!(kept(&spool), 1);

    let out = run_client(&args, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("status 400") && !stderr.contains("spool"),
        "{stderr}"
    );
    assert_eq!(kept(&spool), 0);

    let uploads = receiver.seen("/upload");
    assert_eq!(uploads.len(), 3);
    assert_eq!(
        uploads[1].body, uploads[0].body,
        "the spooled upload was not sent as kept"
    );
    assert_eq!(uploads[0].header("x-telemeter-backfill"), None);
    assert_eq!(uploads[1].header("x-telemeter-backfill"), Some("1"));
    assert_eq!(uploads[2].header("x-telemeter-backfill"), None);
    assert_ne!(uploads[2].body, uploads[0].body);
}

/// An `/authorize` refusal (a token check failing for a while, a proxy's answer) says nothing
/// about the spooled uploads: they stay for a later run, which sends them once `/authorize`
/// answers again.
#[test]
fn an_authorize_refusal_keeps_the_spool() {
    use std::collections::VecDeque;
    let dir = TempDir::new("spool-authorize");
    let spool = dir.path().join("spool");
    let receiver = Receiver::start(Behaviour {
        upload_replies: VecDeque::from([(503, None), (503, None), (503, None)]),
        ..Behaviour::default()
    });
    let from = format!("{}/metrics", receiver.url);
    let args = once_args(&receiver, &from, &spool);
    // Two uploads kept.
    for _ in 0..2 {
        let out = run_client(&args, Duration::from_secs(60));
        assert!(!out.status.success());
    }
    assert_eq!(kept(&spool), 2);

    receiver.set_authorize_status(403);
    let out = run_client(&args, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("2 uploads left for the next run"),
        "{stderr}"
    );
    assert_eq!(
        kept(&spool),
        2,
        "the spool was dropped for an /authorize refusal: {stderr}"
    );
    // One /authorize a run, not one per spooled upload.
    assert_eq!(receiver.seen("/authorize").len(), 4, "{stderr}");

    receiver.set_authorize_status(200);
    let before = receiver.seen("/upload").len();
    let out = run_client(&args, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kept(&spool), 0);
    let uploads = receiver.seen("/upload");
    let backfills = uploads[before..]
        .iter()
        .filter(|u| u.header("x-telemeter-backfill") == Some("1"))
        .count();
    assert_eq!(backfills, 2, "the kept uploads were not sent");
}

/// The uploads kept in the spool directory `spool` (not its lock file).
fn kept(spool: &std::path::Path) -> usize {
    std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".upload"))
        .count()
}

/// The args of a `--once` run of cluster `c1` scraping the receiver's own `/metrics` (`from`),
/// spooling in `spool`.
fn once_args<'a>(
    receiver: &'a Receiver,
    from: &'a str,
    spool: &'a std::path::Path,
) -> Vec<&'a str> {
    vec![
        "--once",
        "--from",
        from,
        "--to",
        &receiver.url,
        "--to-token",
        "client-secret",
        "--id",
        "c1",
        "--match",
        "source_up",
        "--spool-dir",
        spool.to_str().unwrap(),
    ]
}
