//! `--remote-write-url` against a real Prometheus (`--web.enable-remote-write-receiver`) and a stub
//! receiver: series arrive with `_id` at their original timestamps, a receiver that goes down and
//! comes back loses nothing that was queued, retries honour 429/5xx, and refusals are counted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use prost::Message;
use telemeter_common::http::{self as http, Handler, Request, Response};
use telemeter_common::model::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use telemeter_common::snappy;
use telemeter_server::remote_write::proto::WriteRequest;

const WAIT: Duration = Duration::from_secs(60);

/// The value of the server's own metric line `series` (exact name and labels), if present.
fn own_metric(s: &ServerProcess, series: &str) -> Option<f64> {
    let r = get(&s.url_internal("/metrics"), &[]);
    assert_eq!(r.status, 200);
    r.body.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// Polls the server's metric `series` until it reaches `want` (bounded).
fn wait_own_metric(s: &ServerProcess, series: &str, want: f64) {
    let mut got = None;
    assert!(
        wait_until(WAIT, || {
            got = own_metric(s, series);
            got == Some(want)
        }),
        "{series}: {got:?}, wanted {want}"
    );
}

fn start_server(dir: &TempDir, url: &str) -> ServerProcess {
    start_server_with(dir, url, &[])
}

/// [`start_server`] with `extra` flags; the same storage directory each time.
fn start_server_with(dir: &TempDir, url: &str, extra: &[&str]) -> ServerProcess {
    ServerProcess::setup(dir)
        .args(&["--remote-write-url", url])
        .args(extra)
        .start()
}

/// `families` plus a histogram `rw_latency_seconds` with two buckets, all at `ts`.
fn upload_families(n: usize, ts: i64) -> Vec<MetricFamily> {
    let mut f = families(None, n, ts);
    f.push(MetricFamily {
        name: Some("rw_latency_seconds".into()),
        help: Some("A histogram.".into()),
        r#type: Some(MetricType::Histogram as i32),
        metric: vec![Metric {
            label: vec![LabelPair::new("path", "/x")],
            histogram: Some(Histogram {
                sample_count: Some(7),
                sample_sum: Some(1.25),
                bucket: vec![
                    Bucket {
                        cumulative_count: Some(3),
                        upper_bound: Some(0.1),
                    },
                    Bucket {
                        cumulative_count: Some(7),
                        upper_bound: Some(1.0),
                    },
                ],
            }),
            timestamp_ms: Some(ts),
            ..Default::default()
        }],
    });
    f
}

#[test]
fn series_arrive_in_prometheus_with_id_and_their_original_timestamps() {
    need(PROMETHEUS);
    let dir = TempDir::new("rw-prom");
    let prom = Prometheus::receiver(&dir, free_port());
    let s = start_server(&dir, &prom.write_url());

    // A minute in the past: Prometheus must store this time, not its receive time.
    let ts = now_ms() - 60_000;
    let token = s.upload_token("secret", "test");
    let r = s.upload(&token, &upload_families(3, ts));
    assert_eq!(r.status, 200, "{}", r.body);

    // A range selector returns the raw samples with their own timestamps.
    let at = ts as f64 / 1000.0 + 1.0;
    let result = prom.wait_results(r#"test_metric{_id="test"}[10s]"#, at, 3);
    assert_eq!(result.len(), 3, "{result:?}");
    for series in &result {
        assert_eq!(series["metric"]["_id"], "test");
        let i: f64 = series["metric"]["i"].as_str().unwrap().parse().unwrap();
        let values = series["values"].as_array().unwrap();
        assert_eq!(values.len(), 1, "{series}");
        assert_eq!(values[0][0].as_f64().unwrap(), ts as f64 / 1000.0);
        assert_eq!(values[0][1].as_str().unwrap().parse::<f64>().unwrap(), i);
    }
    let up = prom.wait_results(r#"up{_id="test",job="prometheus"}"#, at, 1);
    assert_eq!(up[0]["value"][1], "1");
    // Histograms arrive as the series a scrape would have made, `le` written as Prometheus does.
    let inf = prom.wait_results(r#"rw_latency_seconds_bucket{_id="test",le="+Inf"}"#, at, 1);
    assert_eq!(inf[0]["value"][1], "7");
    let bucket = prom.wait_results(r#"rw_latency_seconds_bucket{_id="test",le="0.1"}"#, at, 1);
    assert_eq!(bucket[0]["value"][1], "3");
    let sum = prom.wait_results(r#"rw_latency_seconds_sum{_id="test"}"#, at, 1);
    assert_eq!(sum[0]["value"][1], "1.25");
    // Nothing at all was stamped at receive time: an instant query just before the original
    // timestamp sees nothing.
    assert!(prom
        .query_at(r#"test_metric{_id="test"}"#, Some(ts as f64 / 1000.0 - 1.0))
        .unwrap_or_default()
        .is_empty());

    // 3 test_metric + up + 3 buckets (+Inf added) + sum + count.
    wait_own_metric(
        &s,
        r#"telemeter_server_remote_write_samples_total{result="sent"}"#,
        9.0,
    );
    // One request per shard that got series, none retried.
    let requests = own_metric(
        &s,
        r#"telemeter_server_remote_write_requests_total{status="204"}"#,
    )
    .unwrap_or(0.0);
    assert!((1.0..=9.0).contains(&requests), "{requests}");
    assert_eq!(
        own_metric(
            &s,
            r#"telemeter_server_remote_write_requests_total{status="error"}"#
        ),
        None
    );
}

#[test]
fn a_receiver_that_goes_down_and_comes_back_loses_nothing_queued() {
    need(PROMETHEUS);
    let dir = TempDir::new("rw-down");
    let port = free_port();
    let mut prom = Prometheus::receiver(&dir, port);
    let s = start_server(&dir, &prom.write_url());
    let ts = now_ms() - 30_000;
    let at = ts as f64 / 1000.0 + 1.0;

    let token = s.upload_token("wild", "rw-first");
    assert_eq!(s.upload(&token, &families(None, 2, ts)).status, 200);
    prom.wait_results(r#"test_metric{_id="rw-first"}"#, at, 2);

    prom.stop();
    let ids: Vec<String> = (0..5).map(|i| format!("rw-{i}")).collect();
    for id in &ids {
        let token = s.upload_token("wild", id);
        // Accepted and stored although the receiver is down: the queue holds the upload.
        let r = s.upload(&token, &families(None, 2, ts));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // The sender is retrying with backoff: its failed attempts show, nothing is dropped.
    let deadline = Instant::now() + WAIT;
    while own_metric(
        &s,
        r#"telemeter_server_remote_write_requests_total{status="error"}"#,
    )
    .unwrap_or(0.0)
        < 2.0
    {
        assert!(Instant::now() < deadline, "no failed retry counted");
        std::thread::sleep(Duration::from_millis(100));
    }

    let prom = Prometheus::receiver(&dir, port);
    // Each upload's series may come through different shards: wait for all of them.
    let query = r#"count by (_id) (test_metric{_id=~"rw-[0-9]"})"#;
    let mut result = Vec::new();
    wait_until(WAIT, || {
        result = prom.query_at(query, Some(at)).unwrap_or_default();
        result.len() == 5 && result.iter().all(|r| r["value"][1] == "2")
    });
    let mut got: Vec<String> = result
        .iter()
        .map(|r| {
            assert_eq!(r["value"][1], "2", "{r}");
            r["metric"]["_id"].as_str().unwrap().to_string()
        })
        .collect();
    got.sort();
    assert_eq!(got, ids);
    wait_own_metric(&s, "telemeter_server_remote_write_queue_length", 0.0);
    for reason in ["backlog_bytes", "backlog_age", "rejected_4xx"] {
        assert_eq!(
            own_metric(
                &s,
                &format!(r#"telemeter_server_remote_write_dropped_total{{reason="{reason}"}}"#)
            ),
            Some(0.0),
            "{reason}"
        );
    }
    // (1 + 5 uploads) × (2 test_metric + up).
    wait_own_metric(
        &s,
        r#"telemeter_server_remote_write_samples_total{result="sent"}"#,
        18.0,
    );
}

/// A receiver answering from a script of statuses (the last one repeats), recording every request.
struct Stub {
    script: Mutex<Vec<(u16, Option<&'static str>)>>,
    seen: Mutex<Vec<Request>>,
}

struct StubHandler(Arc<Stub>);

impl Handler for StubHandler {
    fn handle(&self, request: Request) -> Response {
        self.0.seen.lock().unwrap().push(request);
        let mut script = self.0.script.lock().unwrap();
        let (status, retry_after) = if script.len() > 1 {
            script.remove(0)
        } else {
            script[0]
        };
        let mut r = Response::text(status, &format!("stub says {status}"));
        if let Some(secs) = retry_after {
            r = r.with_header("Retry-After", secs);
        }
        r
    }

    fn body_limit(&self, _method: &str, _path: &str) -> usize {
        16 << 20
    }
}

fn stub(script: Vec<(u16, Option<&'static str>)>) -> (Arc<Stub>, http::ServerHandle) {
    let stub = Arc::new(Stub {
        script: Mutex::new(script),
        seen: Mutex::new(vec![]),
    });
    let server = http::Server::bind(
        "127.0.0.1:0",
        http::Config {
            name: "stub".into(),
            ..http::Config::default()
        },
        Arc::new(StubHandler(stub.clone())),
    )
    .unwrap();
    (stub, server.spawn())
}

#[test]
fn retries_on_429_and_5xx_then_counts_a_4xx_refusal_as_dropped() {
    let (stub, handle) = stub(vec![
        (429, Some("1")),
        (503, None),
        (204, None),
        (400, None),
    ]);
    let dir = TempDir::new("rw-stub");
    let url = format!("http://{}/api/v1/write", handle.local_addr());
    // One shard: each upload is one request, so the script answers them in turn.
    let s = start_server_with(&dir, &url, &["--remote-write-shards", "1"]);
    let ts = now_ms() - 5_000;

    let token = s.upload_token("secret", "test");
    assert_eq!(s.upload(&token, &families(None, 2, ts)).status, 200);
    wait_own_metric(
        &s,
        r#"telemeter_server_remote_write_samples_total{result="sent"}"#,
        3.0,
    );
    for (status, n) in [("429", 1.0), ("503", 1.0), ("204", 1.0)] {
        let series =
            format!(r#"telemeter_server_remote_write_requests_total{{status="{status}"}}"#);
        assert_eq!(own_metric(&s, &series), Some(n), "{status}");
    }

    // The next upload is refused with 400: dropped and counted, never retried.
    assert_eq!(s.upload(&token, &families(None, 1, ts)).status, 200);
    wait_own_metric(
        &s,
        r#"telemeter_server_remote_write_dropped_total{reason="rejected_4xx"}"#,
        1.0,
    );
    assert_eq!(
        own_metric(
            &s,
            r#"telemeter_server_remote_write_samples_total{result="rejected"}"#
        ),
        Some(2.0)
    );
    std::thread::sleep(Duration::from_millis(1500));
    let seen = stub.seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        4,
        "one request per attempt, the refused batch sent once"
    );

    // Every attempt is the same well-formed remote-write request.
    for request in seen.iter() {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/api/v1/write");
        assert_eq!(
            request.header("Content-Type"),
            Some("application/x-protobuf")
        );
        assert_eq!(request.header("Content-Encoding"), Some("snappy"));
        assert_eq!(
            request.header("X-Prometheus-Remote-Write-Version"),
            Some("0.1.0")
        );
        assert!(request
            .header("User-Agent")
            .unwrap_or("")
            .starts_with("telemeter-server/"));
    }
    assert_eq!(seen[0].body, seen[2].body, "a retry sends the same batch");
    let write =
        WriteRequest::decode(&snappy::decode_block(&seen[2].body, 1 << 20).unwrap()[..]).unwrap();
    assert_eq!(write.timeseries.len(), 3);
    for series in &write.timeseries {
        let names: Vec<&str> = series.labels.iter().map(|l| l.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "labels sorted by name");
        assert!(series
            .labels
            .iter()
            .any(|l| l.name == "_id" && l.value == "test"));
        assert_eq!(series.samples.len(), 1);
        assert_eq!(series.samples[0].timestamp, ts);
    }
    drop(seen);
    handle.shutdown(Duration::from_secs(1));
}

#[test]
fn shutdown_sends_what_is_queued() {
    let (stub, handle) = stub(vec![(200, None)]);
    let dir = TempDir::new("rw-flush");
    let url = format!("http://{}/api/v1/write", handle.local_addr());
    let mut s = start_server(&dir, &url);
    let token = s.upload_token("secret", "test");
    assert_eq!(s.upload(&token, &families(None, 1, now_ms())).status, 200);
    let status = s.signal_and_wait(Signal::Term);
    assert!(status.success(), "{status:?}");
    // test_metric and up, in one request or one per shard.
    let shipped: usize = stub
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|request| {
            WriteRequest::decode(&snappy::decode_block(&request.body, 1 << 20).unwrap()[..])
                .unwrap()
                .timeseries
                .len()
        })
        .sum();
    assert_eq!(shipped, 2);
    // The log reader may still be draining the pipe after the exit.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = s.logs.lock().unwrap().join("\n");
        if logs.contains("remote write: stopped, nothing left to send") {
            break;
        }
        assert!(Instant::now() < deadline, "{logs}");
        std::thread::sleep(Duration::from_millis(50));
    }
    handle.shutdown(Duration::from_secs(1));
}

/// The value of the instant query `query` at `time_s` when it returns one sample, else `None`.
fn scalar(prom: &Prometheus, query: &str, time_s: f64) -> Option<f64> {
    let result = prom.query_at(query, Some(time_s)).unwrap_or_default();
    match result.as_slice() {
        [one] => one["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

/// Polls `query` at `time_s` until its one sample is `want` (bounded); returns the last value.
fn wait_scalar(prom: &Prometheus, query: &str, time_s: f64, want: f64) -> Option<f64> {
    let mut got = None;
    wait_until(WAIT, || {
        got = scalar(prom, query, time_s);
        got == Some(want)
    });
    got
}

/// Issue 17 point 4: the receiver is down while 1,000 uploads are acknowledged, then our server
/// is killed (-9) and restarted, and only then does the receiver come up: every acknowledged
/// sample arrives. Nothing was shipped before the kill, so the at-least-once rule allows no
/// duplicate here: exactly 2,000 samples are sent (1,000 × test_metric and up), none refused.
#[test]
fn every_acknowledged_sample_survives_a_receiver_outage_and_kill_9() {
    need(PROMETHEUS);
    const UPLOADS: i64 = 1000;
    let dir = TempDir::new("rw-loss");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/api/v1/write");
    let mut s = start_server(&dir, &url);
    let token = s.upload_token("secret", "test");
    // Distinct timestamps 100 ms apart, so each sample counts once in the receiver.
    let base = now_ms() - 300_000;
    for n in 0..UPLOADS {
        let r = s.upload(&token, &families(None, 1, base + n * 100));
        assert_eq!(r.status, 200, "upload {n}: {}", r.body);
    }
    let status = s.signal_and_wait(Signal::Kill);
    assert!(!status.success(), "{status:?}");

    let s = start_server(&dir, &url);
    let prom = Prometheus::receiver(&dir, port);
    let at = (base + UPLOADS * 100) as f64 / 1000.0;
    for series in [r#"test_metric{_id="test",i="0"}"#, r#"up{_id="test"}"#] {
        let query = format!("count_over_time({series}[10m])");
        let got = wait_scalar(&prom, &query, at, UPLOADS as f64);
        assert_eq!(got, Some(UPLOADS as f64), "{query}");
    }
    wait_own_metric(
        &s,
        r#"telemeter_server_remote_write_samples_total{result="sent"}"#,
        2.0 * UPLOADS as f64,
    );
    for (series, want) in [
        (
            r#"telemeter_server_remote_write_samples_total{result="rejected"}"#,
            0.0,
        ),
        (
            r#"telemeter_server_remote_write_samples_total{result="dropped"}"#,
            0.0,
        ),
    ] {
        assert_eq!(own_metric(&s, series), Some(want), "{series}");
    }
    // The backlog is drained: the cursor is at the end.
    wait_own_metric(&s, "telemeter_server_remote_write_backlog_bytes", 0.0);
}

/// At least once, with duplicates: killed (-9) while shipping into a live Prometheus, then
/// restarted: the receiver holds every acknowledged sample, once (a TSDB keeps one sample per
/// series and timestamp). What was shipped after the last cursor save is sent again; Prometheus
/// refuses those samples as out of order (counted as rejected), and the split of refused requests
/// lets every fresh sample batched with them through: nothing is dropped.
#[test]
fn a_kill_9_while_shipping_re_ships_and_loses_nothing() {
    need(PROMETHEUS);
    const UPLOADS: i64 = 300;
    const SERIES: usize = 20;
    let dir = TempDir::new("rw-reship");
    let prom = Prometheus::receiver(&dir, free_port());
    let mut s = start_server(&dir, &prom.write_url());
    let token = s.upload_token("secret", "test");
    let base = now_ms() - 300_000;
    for n in 0..UPLOADS {
        let r = s.upload(&token, &families(None, SERIES, base + n * 100));
        assert_eq!(r.status, 200, "upload {n}: {}", r.body);
    }
    let sent = r#"telemeter_server_remote_write_samples_total{result="sent"}"#;
    let sent_before = own_metric(&s, sent).unwrap_or(0.0);
    let status = s.signal_and_wait(Signal::Kill);
    assert!(!status.success(), "{status:?}");

    let s = start_server(&dir, &prom.write_url());
    let total = (UPLOADS * (SERIES as i64 + 1)) as f64;
    let at = (base + UPLOADS * 100) as f64 / 1000.0;
    let query = r#"sum(count_over_time({_id="test"}[10m]))"#;
    assert_eq!(wait_scalar(&prom, query, at, total), Some(total), "{query}");
    wait_own_metric(&s, "telemeter_server_remote_write_backlog_bytes", 0.0);
    wait_own_metric(&s, "telemeter_server_remote_write_queue_length", 0.0);
    let sent_after = own_metric(&s, sent).unwrap_or(0.0);
    let rejected = own_metric(
        &s,
        r#"telemeter_server_remote_write_samples_total{result="rejected"}"#,
    )
    .unwrap_or(0.0);
    assert_eq!(
        own_metric(
            &s,
            r#"telemeter_server_remote_write_samples_total{result="dropped"}"#
        ),
        Some(0.0)
    );
    // Everything was handed over at least once; what went twice was refused or taken again.
    assert!(
        sent_before + sent_after + rejected >= total,
        "sent {sent_before} + {sent_after}, rejected {rejected}, of {total}"
    );
    eprintln!(
        "shipped before the kill {sent_before}, after {sent_after}, refused as already held {rejected}, of {total}"
    );
}

/// Issue 17 point 4: only `--remote-write-max-backlog-bytes` drops data while the receiver is
/// down: the oldest uploads, counted and logged; every upload is still acknowledged, and what is
/// left is shipped when the receiver comes back.
#[test]
fn a_backlog_over_its_bound_drops_the_oldest_counted_and_logged() {
    need(PROMETHEUS);
    const UPLOADS: i64 = 60;
    const BOUND: f64 = 200_000.0;
    let dir = TempDir::new("rw-bound");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/api/v1/write");
    let s = start_server_with(&dir, &url, &["--remote-write-max-backlog-bytes", "200000"]);
    let token = s.upload_token("secret", "test");
    let base = now_ms() - 120_000;
    // About 8 KB of journal each: 60 are well over the bound.
    for n in 0..UPLOADS {
        let r = s.upload(&token, &families(None, 100, base + n * 1000));
        assert_eq!(r.status, 200, "upload {n}: {}", r.body);
    }
    let dropped = r#"telemeter_server_remote_write_dropped_total{reason="backlog_bytes"}"#;
    assert!(
        wait_until(WAIT, || own_metric(&s, dropped).unwrap_or(0.0) > 0.0),
        "nothing dropped"
    );
    assert!(
        wait_until(WAIT, || own_metric(
            &s,
            "telemeter_server_remote_write_backlog_bytes"
        )
        .is_some_and(|b| b <= BOUND)),
        "the backlog stays over its bound"
    );
    let logs = s.logs.lock().unwrap().join("\n");
    assert!(
        logs.contains("over --remote-write-max-backlog-bytes 200000: dropped the oldest "),
        "{logs}"
    );

    // The receiver comes back: the newest upload arrives, the oldest never does.
    let prom = Prometheus::receiver(&dir, port);
    let last = (base + (UPLOADS - 1) * 1000) as f64 / 1000.0;
    prom.wait_results(r#"test_metric{_id="test",i="0"}"#, last, 1);
    let kept = scalar(
        &prom,
        r#"count_over_time(test_metric{_id="test",i="0"}[10m])"#,
        last,
    )
    .unwrap();
    assert!(kept >= 1.0 && kept < UPLOADS as f64, "{kept}");
    assert!(
        prom.query_at(
            r#"test_metric{_id="test",i="0"}"#,
            Some(base as f64 / 1000.0 + 0.5)
        )
        .unwrap_or_default()
        .is_empty(),
        "the oldest upload was dropped"
    );
}

/// `--remote-write-max-backlog-age`: an upload that waited longer than that for a receiver that
/// was down is dropped, counted and logged; a fresh one is still shipped.
#[test]
fn an_upload_older_than_the_backlog_age_is_dropped_counted_and_logged() {
    need(PROMETHEUS);
    let dir = TempDir::new("rw-age");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/api/v1/write");
    let s = start_server_with(&dir, &url, &["--remote-write-max-backlog-age", "2s"]);
    let token = s.upload_token("secret", "test");
    let old = now_ms() - 20_000;
    assert_eq!(s.upload(&token, &families(None, 1, old)).status, 200);
    let dropped = r#"telemeter_server_remote_write_dropped_total{reason="backlog_age"}"#;
    assert!(
        wait_until(WAIT, || own_metric(&s, dropped).unwrap_or(0.0) >= 1.0),
        "nothing dropped for its age"
    );
    let logs = s.logs.lock().unwrap().join("\n");
    assert!(
        logs.contains("past --remote-write-max-backlog-age"),
        "{logs}"
    );
    let prom = Prometheus::receiver(&dir, port);
    let fresh = now_ms() - 1_000;
    assert_eq!(s.upload(&token, &families(None, 1, fresh)).status, 200);
    prom.wait_results(r#"test_metric{_id="test"}"#, fresh as f64 / 1000.0 + 0.5, 1);
    assert!(
        prom.query_at(
            r#"test_metric{_id="test"}"#,
            Some(old as f64 / 1000.0 + 0.5)
        )
        .unwrap_or_default()
        .is_empty(),
        "the upload past the age bound was never shipped"
    );
}

/// Issue 19's gap, closed: an upload older than what `/federate` serves is not served, but it is
/// journaled to be shipped, so it reaches the receiver even across a `kill -9`.
#[test]
fn a_late_upload_is_journaled_and_shipped_after_kill_9() {
    need(PROMETHEUS);
    let dir = TempDir::new("rw-late");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/api/v1/write");
    let mut s = start_server(&dir, &url);
    let token = s.upload_token("secret", "test");
    let fresh = now_ms() - 10_000;
    let late = now_ms() - 60_000;
    assert_eq!(s.upload(&token, &families(None, 1, fresh)).status, 200);
    let late_families = vec![MetricFamily {
        name: Some("late_metric".into()),
        help: None,
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            gauge: Some(telemeter_common::model::Gauge { value: Some(42.0) }),
            timestamp_ms: Some(late),
            ..Default::default()
        }],
    }];
    let r = s.upload(&token, &late_families);
    assert_eq!(r.status, 200, "{}", r.body);
    let served = s.federate();
    assert!(served.contains("test_metric{"), "{served}");
    assert!(!served.contains("late_metric"), "{served}");
    let status = s.signal_and_wait(Signal::Kill);
    assert!(!status.success(), "{status:?}");

    let _s = start_server(&dir, &url);
    let prom = Prometheus::receiver(&dir, port);
    let got = prom.wait_results(r#"late_metric{_id="test"}"#, late as f64 / 1000.0 + 1.0, 1);
    assert_eq!(got[0]["value"][1], "42");
    prom.wait_results(r#"test_metric{_id="test"}"#, fresh as f64 / 1000.0 + 1.0, 1);
}

#[test]
fn in_a_cluster_only_the_owner_ships_each_upload_once() {
    use telemeter_server::cluster::ring::{HashRing, DEFAULT_VNODES};

    let (stub, handle) = stub(vec![(200, None)]);
    let url = format!("http://{}/api/v1/write", handle.local_addr());
    let dir = TempDir::new("rw-cluster");
    let key = dir.file(
        "shared.key",
        "0123456789abcdef0123456789abcdef-rw-cluster-key",
    );
    let names = ["rw-a", "rw-b"];
    let udp: Vec<String> = names
        .iter()
        .map(|_| format!("127.0.0.1:{}", free_udp_port()))
        .collect();
    let nodes: Vec<(TempDir, ServerProcess)> = (0..2)
        .map(|i| {
            let storage = TempDir::new(&format!("rw-cluster-{i}"));
            let args = [
                "--insecure-accept-any-token",
                "--ratelimit",
                "0s",
                "--shared-key",
                key.to_str().unwrap(),
                "--name",
                names[i],
                "--listen-cluster",
                &udp[i],
                "--join",
                &udp[1 - i],
                "--gossip-interval",
                "200ms",
                "--peer-timeout",
                "1s",
                "--remote-write-url",
                &url,
            ];
            let process = ServerProcess::start(storage.path(), &args);
            (storage, process)
        })
        .collect();
    let urls: Vec<String> = nodes
        .iter()
        .map(|(_, p)| p.url_internal("/debug/cluster"))
        .collect();
    wait_converged(&urls, &names, WAIT);

    // Every push goes to node a; the ring sends about half of them on to node b.
    let ids: Vec<String> = (0..20).map(|i| format!("rw-cluster-{i:02}")).collect();
    let a = &nodes[0].1;
    for id in &ids {
        let token = a.upload_token("any", id);
        let r = a.upload(&token, &families(None, 2, now_ms() - 1_000));
        assert_eq!(r.status, 200, "{id}: {}", r.body);
    }
    let ring = HashRing::new(&names, DEFAULT_VNODES);
    for (i, (_, p)) in nodes.iter().enumerate() {
        let owned = ids
            .iter()
            .filter(|id| ring.owner(id) == Some(names[i]))
            .count();
        // 2 test_metric + up per upload, from the node that owns (and stores) it.
        wait_own_metric(
            p,
            r#"telemeter_server_remote_write_samples_total{result="sent"}"#,
            (owned * 3) as f64,
        );
    }
    let seen = stub.seen.lock().unwrap();
    // Requests batch series of several uploads: count each upload's series instead.
    let mut shipped: std::collections::BTreeMap<String, usize> = Default::default();
    for request in seen.iter() {
        let write =
            WriteRequest::decode(&snappy::decode_block(&request.body, 1 << 20).unwrap()[..])
                .unwrap();
        for series in &write.timeseries {
            let id = series.labels.iter().find(|l| l.name == "_id").unwrap();
            *shipped.entry(id.value.clone()).or_default() += 1;
        }
    }
    assert_eq!(
        shipped.keys().cloned().collect::<Vec<_>>(),
        ids,
        "every upload shipped"
    );
    assert!(
        shipped.values().all(|&n| n == 3),
        "each series once: {shipped:?}"
    );
    drop(seen);
    handle.shutdown(Duration::from_secs(1));
}

/// A throughput probe, not a test: 200 uploads of 1,000 series queue up while Prometheus is paused
/// (SIGSTOP), then drain into it; prints the drain rate. Run with `cargo test -p telemeter-server
/// --test remote_write -- --ignored --nocapture` (`TELEMETER_SERVER_BIN=target/static/telemeter-server`
/// to probe a release build).
#[test]
#[ignore]
fn remote_write_throughput() {
    need(PROMETHEUS);
    const UPLOADS: usize = 200;
    const SERIES: usize = 1000;
    let dir = TempDir::new("rw-probe");
    let prom = Prometheus::receiver(&dir, free_port());
    let s = start_server(&dir, &prom.write_url());
    let tokens: Vec<String> = (0..UPLOADS)
        .map(|i| s.upload_token("wild", &format!("probe-{i}")))
        .collect();
    let ts = now_ms() - 10_000;
    let pid = prom.pid().expect("prometheus runs");
    testkit::kill(pid, Signal::Stop).unwrap();
    let started = Instant::now();
    for token in &tokens {
        let r = s.upload(token, &families(None, SERIES, ts));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let pushed = started.elapsed();
    let queued = own_metric(&s, "telemeter_server_remote_write_queue_length").unwrap_or(0.0);
    let resumed = Instant::now();
    testkit::kill(pid, Signal::Cont).unwrap();
    let samples = (UPLOADS * (SERIES + 1)) as f64;
    wait_own_metric(
        &s,
        r#"telemeter_server_remote_write_samples_total{result="sent"}"#,
        samples,
    );
    let drained = resumed.elapsed();
    let bytes = own_metric(&s, "telemeter_server_remote_write_sent_bytes_total").unwrap_or(0.0);
    eprintln!(
        "{UPLOADS} uploads of {} samples pushed in {pushed:.1?} with the receiver paused ({queued} queued); \
         drained into Prometheus in {drained:.1?} = {:.0} samples/s, {:.1} bytes/sample on the wire",
        SERIES + 1,
        samples / drained.as_secs_f64(),
        bytes / samples
    );
    let count = prom.wait_results(
        r#"count(test_metric{_id=~"probe-.*"})"#,
        ts as f64 / 1000.0 + 1.0,
        1,
    );
    assert_eq!(count[0]["value"][1], (UPLOADS * SERIES).to_string());
}
