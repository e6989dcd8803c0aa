//! Operations: /metrics is valid for promtool, health checks, clean SIGTERM, slow clients.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;

#[test]
fn metrics_health_and_sigterm() {
    let dir = TempDir::new("ops");
    let mut s = ServerProcess::setup(&dir).start();
    let token = s.upload_token("secret", "test");
    assert_eq!(s.upload(&token, &families(None, 3, now_ms())).status, 200);
    assert_eq!(s.upload("bad", &families(None, 3, now_ms())).status, 401);
    let _ = s.federate();

    for url in [
        s.url("/healthz"),
        s.url("/healthz/ready"),
        s.url_internal("/healthz"),
        s.url_internal("/healthz/ready"),
    ] {
        let r = get(&url, &[]);
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{url}");
    }
    let r = get(&s.url("/"), &[]);
    assert_eq!(r.status, 200);
    assert!(r.body.contains("/authorize"), "{}", r.body);
    assert_eq!(get(&s.url("/nope"), &[]).status, 404);
    // /federate is not on the external port.
    assert_eq!(get(&s.url("/federate"), &[]).status, 404);

    let r = get(&s.url_internal("/metrics"), &[]);
    assert_eq!(r.status, 200);
    for name in [
        "telemeter_server_uploads_total{result=\"stored\",status=\"200\"} 1",
        "telemeter_server_uploads_total{result=\"rejected\",status=\"401\"} 1",
        "telemeter_server_upload_series_total 4",
        "telemeter_server_authorize_total{result=\"ok\"} 1",
        "telemeter_server_stored_clusters 1",
        "telemeter_server_store_write_seconds_count 1",
        "telemeter_server_federate_seconds_count 1",
        "# TYPE process_cpu_seconds_total counter",
        "process_resident_memory_bytes ",
        "process_virtual_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
        "telemeter_server_build_info{version=\"",
    ] {
        assert!(r.body.contains(name), "missing {name}:\n{}", r.body);
    }
    if let Err(e) = promtool_check(&r.body) {
        panic!("promtool: {e}\n{}", r.body);
    }

    let status = s.signal_and_wait(Signal::Term);
    assert_eq!(status.code(), Some(0));
}

/// `--version` prints the version and the git revision baked in at build time, in both binaries.
#[test]
fn version_prints_version_and_revision() {
    // The binary cargo built for this test (the client's own tests check the client's).
    let text = testkit::process::version_line(BIN);
    testkit::process::assert_version_line("telemeter-server", env!("CARGO_PKG_VERSION"), &text);
}

#[test]
fn slow_clients_do_not_block_uploads() {
    let dir = TempDir::new("slow");
    let s = ServerProcess::setup(&dir).start();
    let token = s.upload_token("secret", "test");
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut c = TcpStream::connect(s.external).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"POST /upload HTTP/1.1\r\nHo").unwrap();
        slow.push(c);
    }
    // Trickle one more byte on each, as a slowloris would.
    for c in &mut slow {
        let _ = c.write_all(b"s");
    }
    let r = s.upload(&token, &families(None, 5, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(series_lines(&s.federate()).len(), 6);
    drop(slow);
}

#[test]
fn sigint_stops_cleanly_and_sighup_does_not() {
    let dir = TempDir::new("sigint");
    let mut s = ServerProcess::start(&dir.path().join("data"), &["--insecure-accept-any-token"]);
    testkit::kill(s.child.id(), Signal::Hup).unwrap();
    // Give a (wrongly) fatal SIGHUP time to act before checking the server is still there.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(get(&s.url("/healthz"), &[]).status, 200);
    assert_eq!(s.signal_and_wait(Signal::Int).code(), Some(0));
}

/// A 413 (from the HTTP front, which the upload handler never sees) is counted and logged with
/// the peer, a 429 is logged, and `/authorize` log lines name the peer.
#[test]
fn refusals_are_counted_and_logged_with_the_peer() {
    let dir = TempDir::new("ops-refusals");
    let s = ServerProcess::setup(&dir)
        .ratelimit(Some("1h"))
        .args(&["--max-upload-bytes", "2000"])
        .start();
    let logged = |needle: &str| {
        wait_until(Duration::from_secs(10), || {
            s.logs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|line| line.contains(needle))
        })
    };
    let token = s.upload_token("secret", "test");
    assert!(logged("authorized cluster \"test\" from 127.0.0.1:"));
    let denied = post(
        &s.url("/authorize?id=test"),
        &[("Authorization", "Bearer wrong")],
        b"",
    );
    assert_eq!(denied.status, 401);
    assert!(logged("authorize from 127.0.0.1:"));

    // Refused from its declared length, before any of it is read.
    let r = post(
        &s.url("/upload"),
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", telemeter_common::media::PROTO_DELIMITED),
            ("Content-Encoding", "snappy"),
        ],
        &[0u8; 5000],
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(logged("refused: body over 2000 bytes"));
    let metrics = get(&s.url_internal("/metrics"), &[]).body;
    assert_eq!(
        metric_value(
            &metrics,
            "telemeter_server_uploads_total",
            &["result=\"rejected\"", "status=\"413\""]
        ),
        1.0,
        "{metrics}"
    );

    assert_eq!(s.upload(&token, &families(None, 1, now_ms())).status, 200);
    let r = s.upload(&token, &families(None, 1, now_ms()));
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(logged("refused: rate limited: next upload accepted in "));
}
