//! End-to-end tests of the real `telemeter-client` binary against an in-test receiver standing in
//! for telemeter-server, and a real Prometheus.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;
use telemeter_client::anonymize::anonymize;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::model::MetricFamily;

const WAIT: Duration = Duration::from_secs(60);

fn label_map(m: &telemeter_common::model::Metric) -> BTreeMap<String, String> {
    m.label
        .iter()
        .map(|l| {
            (
                l.name.clone().unwrap_or_default(),
                l.value.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn names(families: &[MetricFamily]) -> BTreeSet<String> {
    families
        .iter()
        .map(|f| f.name.clone().unwrap_or_default())
        .collect()
}

/// Starts the client as a daemon with `args`, its output dropped; killed if the test fails.
fn start_daemon(args: &[&str]) -> Guard {
    let child = Command::new(CLIENT)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start client");
    Guard(child)
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The args of a `--once` run scraping the receiver's own `/metrics`.
fn once_args<'a>(receiver: &'a Receiver, from: &'a str) -> Vec<&'a str> {
    vec![
        "--once",
        "--from",
        from,
        "--to",
        &receiver.url,
        "--to-token",
        "client-secret",
        "--id",
        "cluster-x",
        "--match",
        r#"{__name__=~"source_up|ALERTS"}"#,
    ]
}

#[test]
fn real_prometheus_two_matches_without_match_file() {
    let prom = Prometheus::start(1);
    let receiver = Receiver::start(Behaviour::default());
    let instance = format!("127.0.0.1:{}", prom.port);
    let out = run_client(
        &[
            "--once",
            "--from",
            &prom.url,
            "--to",
            &receiver.url,
            "--to-token",
            "client-secret",
            "--id",
            "cluster-a",
            // Two --match and no --match-file: upstream ignored both in this case.
            "--match",
            r#"{__name__="up"}"#,
            "--match",
            "prometheus_build_info",
            "--rename",
            "prometheus_build_info=build_info",
            "--label",
            "site=lab",
            "--elide-label",
            "goversion",
            "--anonymize-labels",
            "instance",
            "--anonymize-salt",
            "s1",
        ],
        WAIT,
    );
    assert!(out.status.success(), "client failed: {}", stderr_of(&out));

    let authorizes = receiver.seen("/authorize");
    assert_eq!(authorizes.len(), 1);
    assert_eq!(authorizes[0].method, "POST");
    assert_eq!(authorizes[0].query, "id=cluster-a");
    assert_eq!(
        authorizes[0].header("authorization"),
        Some("Bearer client-secret")
    );

    let uploads = receiver.seen("/upload");
    assert_eq!(uploads.len(), 1);
    let upload = &uploads[0];
    assert_eq!(upload.method, "POST");
    assert_eq!(upload.header("content-type"), Some(PROTO_DELIMITED));
    assert_eq!(upload.header("content-encoding"), Some("snappy"));
    assert_eq!(
        upload.header("authorization"),
        Some("Bearer upload-token-1")
    );

    let families = upload.families();
    assert_eq!(
        names(&families),
        BTreeSet::from(["up".to_string(), "build_info".to_string()]),
        "exactly the two matched metrics, one renamed"
    );
    let anonymized = anonymize("s1", &instance);
    for family in &families {
        assert!(!family.metric.is_empty());
        for m in &family.metric {
            let labels = label_map(m);
            assert_eq!(labels.get("_id").map(String::as_str), Some("cluster-a"));
            assert_eq!(labels.get("site").map(String::as_str), Some("lab"));
            assert_eq!(labels.get("instance"), Some(&anonymized));
            assert!(!labels.contains_key("goversion"), "{labels:?}");
            assert!(m.timestamp_ms.is_some());
        }
    }
    let build_info = families
        .iter()
        .find(|f| f.name.as_deref() == Some("build_info"))
        .expect("build_info");
    assert!(label_map(&build_info.metric[0]).contains_key("version"));
}

#[test]
fn plain_metrics_url_is_selected_stamped_and_renamed() {
    let receiver = Receiver::start(Behaviour::default());
    let from = format!("{}/metrics", receiver.url);
    let out = run_client(&once_args(&receiver, &from), WAIT);
    assert!(out.status.success(), "client failed: {}", stderr_of(&out));

    let scrapes = receiver.seen("/metrics");
    assert_eq!(scrapes.len(), 1);
    assert!(
        scrapes[0].query.starts_with("match%5B%5D="),
        "{}",
        scrapes[0].query
    );
    assert!(scrapes[0]
        .header("accept")
        .is_some_and(|a| a.starts_with("application/vnd.google.protobuf")));

    let families = receiver.seen("/upload")[0].families();
    // /metrics ignores match[]: the client applies the selectors itself; ALERTS is renamed by
    // default like upstream.
    assert_eq!(
        names(&families),
        BTreeSet::from(["source_up".to_string(), "alerts".to_string()])
    );
    for m in families.iter().flat_map(|f| f.metric.iter()) {
        assert!(m.timestamp_ms.is_some(), "timestamps are filled in");
        assert_eq!(m.label_value("_id"), Some("cluster-x"));
    }
}

#[test]
fn comma_lists_work_like_repeated_flags_and_empty_values_stay_unhashed() {
    let receiver = Receiver::start(Behaviour {
        metrics_body: concat!(
            "# TYPE source_up gauge\n",
            "source_up{instance=\"host-1:9100\",job=\"node\"} 1\n",
            // What Prometheus's /federate writes for an alert: instance="" because it has none.
            "# TYPE ALERTS gauge\n",
            "ALERTS{alertname=\"Down\",instance=\"\"} 1\n",
        )
        .to_string(),
        ..Behaviour::default()
    });
    // What a Prometheus federates (the ALERTS line is its form): from /metrics, the client would
    // treat instance="" as absent and fill in the exporter's host:port, as a scrape does.
    let from = format!("{}/federate", receiver.url);
    let mut args = once_args(&receiver, &from);
    args.extend_from_slice(&[
        "--label",
        "site=lab,env=prod",
        "--rename",
        "source_up=su,ALERTS=alerts_renamed",
        "--anonymize-labels",
        "instance,job",
        "--anonymize-salt",
        "s1",
    ]);
    let out = run_client(&args, WAIT);
    assert!(out.status.success(), "client failed: {}", stderr_of(&out));
    let families = receiver.seen("/upload")[0].families();
    assert_eq!(
        names(&families),
        BTreeSet::from(["su".to_string(), "alerts_renamed".to_string()])
    );
    for family in &families {
        let labels = label_map(&family.metric[0]);
        assert_eq!(labels.get("site").map(String::as_str), Some("lab"));
        assert_eq!(labels.get("env").map(String::as_str), Some("prod"));
        if family.name.as_deref() == Some("su") {
            assert_eq!(
                labels.get("instance"),
                Some(&anonymize("s1", "host-1:9100"))
            );
            assert_eq!(labels.get("job"), Some(&anonymize("s1", "node")));
        } else {
            assert_eq!(labels.get("instance").map(String::as_str), Some(""));
            assert_eq!(labels.get("alertname").map(String::as_str), Some("Down"));
        }
    }
}

#[test]
fn once_fails_with_one_line_when_server_is_down() {
    let source = Receiver::start(Behaviour::default());
    let from = format!("{}/metrics", source.url);
    let down = format!("http://127.0.0.1:{}", free_port());
    let out = run_client(
        &[
            "--once",
            "--from",
            &from,
            "--to",
            &down,
            "--to-token",
            "t",
            "--id",
            "c",
            "--match",
            "source_up",
        ],
        WAIT,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("/authorize"), "{err}");
}

#[test]
fn once_fails_when_authorize_refuses() {
    let receiver = Receiver::start(Behaviour {
        authorize_status: 401,
        ..Behaviour::default()
    });
    let from = format!("{}/metrics", receiver.url);
    let out = run_client(&once_args(&receiver, &from), WAIT);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("401"), "{err}");
    assert!(receiver.seen("/upload").is_empty());
}

#[test]
fn scrape_failure_names_the_status() {
    let receiver = Receiver::start(Behaviour::default());
    let from = format!("{}/nothing-here", receiver.url);
    let out = run_client(&once_args(&receiver, &from), WAIT);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("404"), "{err}");
}

#[test]
fn upload_401_reauthorizes_and_retries() {
    let receiver = Receiver::start(Behaviour {
        upload_replies: [(401, None)].into(),
        ..Behaviour::default()
    });
    let from = format!("{}/metrics", receiver.url);
    let out = run_client(&once_args(&receiver, &from), WAIT);
    assert!(out.status.success(), "client failed: {}", stderr_of(&out));
    assert_eq!(receiver.seen("/authorize").len(), 2);
    let uploads = receiver.seen("/upload");
    assert_eq!(uploads.len(), 2);
    assert_eq!(
        uploads[0].header("authorization"),
        Some("Bearer upload-token-1")
    );
    assert_eq!(
        uploads[1].header("authorization"),
        Some("Bearer upload-token-2")
    );
}

#[test]
fn token_cache_skips_authorize_on_the_next_run() {
    use std::os::unix::fs::PermissionsExt;
    let receiver = Receiver::start(Behaviour::default());
    let dir = TempDir::new("cache");
    let cache = dir.path().join("token.json");
    let from = format!("{}/metrics", receiver.url);
    let mut args = once_args(&receiver, &from);
    let cache_str = cache.to_str().expect("utf-8 path");
    args.extend_from_slice(&["--token-cache", cache_str]);
    for _ in 0..2 {
        let out = run_client(&args, WAIT);
        assert!(out.status.success(), "client failed: {}", stderr_of(&out));
    }
    assert_eq!(receiver.seen("/authorize").len(), 1);
    let uploads = receiver.seen("/upload");
    assert_eq!(uploads.len(), 2);
    assert_eq!(
        uploads[1].header("authorization"),
        Some("Bearer upload-token-1")
    );
    let mode = std::fs::metadata(&cache)
        .expect("cache file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Another cluster id does not reuse it.
    let mut other = args.clone();
    let id_at = other.iter().position(|a| *a == "cluster-x").expect("id");
    other[id_at] = "cluster-y";
    let out = run_client(&other, WAIT);
    assert!(out.status.success(), "client failed: {}", stderr_of(&out));
    assert_eq!(receiver.seen("/authorize").len(), 2);
}

#[test]
fn limit_bytes_too_small_is_a_clear_error() {
    let receiver = Receiver::start(Behaviour::default());
    let from = format!("{}/metrics", receiver.url);
    let mut args = once_args(&receiver, &from);
    args.extend_from_slice(&["--limit-bytes", "64"]);
    let out = run_client(&args, WAIT);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("--limit-bytes"), "{err}");
    assert!(receiver.seen("/upload").is_empty());
}

#[test]
fn version_prints_version_and_revision() {
    // The binary cargo built for this test, so built from this checkout.
    let text = testkit::process::version_line(CLIENT);
    testkit::process::assert_version_line("telemeter-client", env!("CARGO_PKG_VERSION"), &text);
}

#[test]
fn usage_errors_exit_2() {
    let out = run_client(&["--once", "--from", "http://127.0.0.1:1"], WAIT);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("--to"), "{}", stderr_of(&out));
    let out = run_client(&["--no-such-flag"], WAIT);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn daemon_honours_retry_after_serves_metrics_and_stops_on_sigterm() {
    let receiver = Receiver::start(Behaviour {
        upload_replies: [(429, Some(1))].into(),
        ..Behaviour::default()
    });
    let from = format!("{}/metrics", receiver.url);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = start_daemon(&[
        "--from",
        &from,
        "--to",
        &receiver.url,
        "--to-token",
        "client-secret",
        "--id",
        "cluster-d",
        "--match",
        r#"{__name__=~"source_up|ALERTS"}"#,
        "--interval",
        "1h",
        "--listen",
        &listen,
    ]);

    let uploads = receiver.wait_for("/upload", 2, Duration::from_secs(30));
    assert_eq!(uploads.len(), 2, "a second attempt after the 429");
    let gap = uploads[1].at.duration_since(uploads[0].at);
    // Retry-After: 1 was honoured, and the 1h interval was not waited.
    assert!(gap >= Duration::from_millis(900), "{gap:?}");
    assert!(gap < Duration::from_secs(30), "{gap:?}");

    let health = get(&format!("http://{listen}/healthz"));
    assert_eq!(health.map(|(s, _)| s), Some(200));
    let ready = get(&format!("http://{listen}/healthz/ready"));
    assert_eq!(ready.map(|(s, _)| s), Some(200));
    let (status, metrics) = get(&format!("http://{listen}/metrics")).expect("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"telemeter_client_pushes_total{result="rate_limited"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"telemeter_client_pushes_total{result="success"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("telemeter_client_samples_sent_total 3"),
        "{metrics}"
    );

    sigterm(&child.0);
    let status = wait_exit(&mut child.0, Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exit 0 on SIGTERM");
}

/// With a spool, a rate-limited push is kept, and the next cycle still waits for what
/// `Retry-After` asked (6 s here, longer than the first backoff after a failure, 2.5-5 s).
#[test]
fn daemon_with_a_spool_honours_retry_after() {
    let receiver = Receiver::start(Behaviour {
        upload_replies: [(429, Some(6))].into(),
        ..Behaviour::default()
    });
    let dir = TempDir::new("retry-after-spool");
    let spool = dir.path().join("spool");
    let from = format!("{}/metrics", receiver.url);
    // Its own port: the default one is another daemon test's too.
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = start_daemon(&[
        "--listen",
        &listen,
        "--from",
        &from,
        "--to",
        &receiver.url,
        "--to-token",
        "client-secret",
        "--id",
        "cluster-s",
        "--match",
        "source_up",
        "--interval",
        "1h",
        "--spool-dir",
        spool.to_str().unwrap(),
    ]);
    let uploads = receiver.wait_for("/upload", 2, Duration::from_secs(30));
    assert!(uploads.len() >= 2, "no attempt after the 429");
    let gap = uploads[1].at.duration_since(uploads[0].at);
    assert!(
        gap >= Duration::from_millis(5900),
        "Retry-After not waited: {gap:?}"
    );
    assert!(gap < Duration::from_secs(30), "{gap:?}");
    // The next cycle sent the kept upload first, as a backfill.
    assert_eq!(uploads[1].header("x-telemeter-backfill"), Some("1"));
    assert_eq!(uploads[1].body, uploads[0].body);
    sigterm(&child.0);
    let status = wait_exit(&mut child.0, Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exit 0 on SIGTERM");
}

/// A `--once` run that finds its spool held by another client (here a daemon on the same
/// directory) waits for it, then exits 1 saying so (a timer runs it again, as after a failed
/// push), and pushes nothing.
#[test]
fn a_spool_held_by_another_client_is_exit_1_with_a_reason() {
    let receiver = Receiver::start(Behaviour::default());
    let dir = TempDir::new("spool-held");
    let spool = dir.path().join("spool");
    let from = format!("{}/metrics", receiver.url);
    // Its own port: the default one is another daemon test's too.
    let listen = format!("127.0.0.1:{}", free_port());
    let spool = spool.to_str().unwrap();
    let once = [once_args(&receiver, &from), vec!["--spool-dir", spool]].concat();
    // The same client as a daemon (`once_args` without its leading `--once`).
    let daemon = [&once[1..], &["--interval", "1h", "--listen", &listen]].concat();
    let mut daemon = start_daemon(&daemon);
    // The daemon has the spool once it pushed.
    receiver.wait_for("/upload", 1, Duration::from_secs(30));
    let out = run_client(&once, WAIT);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another telemeter-client uses this spool"),
        "{err}"
    );
    assert_eq!(receiver.seen("/upload").len(), 1, "the held run pushed");
    sigterm(&daemon.0);
    let status = wait_exit(&mut daemon.0, Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

#[test]
fn tls_with_ca_files_for_both_sides() {
    let receiver = Receiver::start_tls(Behaviour::default());
    let ca = tls_fixtures().join("ca.pem");
    let ca = ca.to_str().expect("utf-8 path");
    let from = format!("{}/metrics", receiver.url);
    let mut args = once_args(&receiver, &from);
    args.extend_from_slice(&["--from-ca-file", ca, "--to-ca-file", ca]);
    let out = run_client(&args, WAIT);
    assert!(out.status.success(), "client failed: {}", stderr_of(&out));
    assert_eq!(receiver.seen("/upload").len(), 1);

    // Without the CA the server's certificate is not trusted: a clear failure, nothing sent.
    let out = run_client(&once_args(&receiver, &from), WAIT);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("scraping"), "{err}");
    assert_eq!(receiver.seen("/upload").len(), 1);
}

/// `--once` prints its one-line summary without RUST_LOG (a timer's journal shows it), and a run
/// that leaves nothing to push exits with its own code, 3, so a misconfigured timer shows failed.
#[test]
fn once_prints_its_summary_and_nothing_to_push_has_its_own_exit_code() {
    let receiver = Receiver::start(Behaviour::default());
    let from = format!("{}/metrics", receiver.url);
    let out = run_client(&once_args(&receiver, &from), WAIT);
    assert!(out.status.success(), "client failed: {}", stderr_of(&out));
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains("telemeter-client: cluster cluster-x: pushed "),
        "{stderr}"
    );

    let mut args = once_args(&receiver, &from);
    let selector = args
        .iter()
        .position(|a| a.starts_with("{__name__"))
        .expect("the --match selector");
    args[selector] = r#"{__name__="selects_nothing"}"#;
    let out = run_client(&args, WAIT);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("telemeter-client: cluster cluster-x: nothing to push: "),
        "{stderr}"
    );
    // Nothing was uploaded by that run.
    assert_eq!(receiver.seen("/upload").len(), 1);
}
