//! `/federate` as a central Prometheus and its tools see it: promtool accepts it with several
//! clusters sharing family names, `match[]` selects (also from a real Prometheus scrape job), and a
//! real Prometheus gets the same series with gzip as without.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use telemeter_common::model::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

/// [`families`] plus a histogram, so a family with suffixed lines is merged too.
fn with_histogram(id: &str, n: usize) -> Vec<MetricFamily> {
    let mut out = families(None, n, now_ms());
    // promtool's lint wants help text on every family.
    out[1].help = Some("A test metric.".into());
    out.push(MetricFamily {
        name: Some("request_seconds".into()),
        help: Some("Request latency.".into()),
        r#type: Some(MetricType::Histogram as i32),
        metric: vec![Metric {
            label: vec![LabelPair::new("path", &format!("/{id}"))],
            histogram: Some(Histogram {
                sample_count: Some(3),
                sample_sum: Some(0.5),
                bucket: vec![Bucket {
                    cumulative_count: Some(2),
                    upper_bound: Some(0.1),
                }],
            }),
            timestamp_ms: Some(now_ms()),
            ..Default::default()
        }],
    });
    out
}

/// A server holding clusters `a` (4 series), `b` (2) and `c` (3), all with the same family names.
fn three_clusters(dir: &TempDir) -> ServerProcess {
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
    for (id, n) in [("a", 4), ("b", 2), ("c", 3)] {
        let token = s.upload_token("wild", id);
        let r = s.upload(&token, &with_histogram(id, n));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    s
}

fn promtool_check(body: &str) -> Result<(), String> {
    assert!(
        std::path::Path::new(PROMTOOL).exists(),
        "{PROMTOOL} is not installed: run `make setup` (Debian package prometheus)"
    );
    let mut promtool = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn promtool_accepts_federate_with_three_clusters_sharing_family_names() {
    let dir = TempDir::new("federate-promtool");
    let s = three_clusters(&dir);
    let body = s.federate();
    promtool_check(&body).unwrap_or_else(|e| panic!("promtool: {e}\n{body}"));
    // Each family once, its series together: the TYPE lines name distinct families, and every
    // series line of a family follows its own TYPE line before the next one.
    let types: Vec<&str> = body.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    assert_eq!(
        types,
        [
            "# TYPE request_seconds histogram",
            "# TYPE test_metric gauge",
            "# TYPE up gauge",
            "# TYPE telemeter_last_push_timestamp_seconds gauge",
        ],
        "{body}"
    );
    let test_metric: Vec<&str> = body
        .lines()
        .skip_while(|l| *l != "# TYPE test_metric gauge")
        .skip(1)
        .take_while(|l| !l.starts_with('#'))
        .collect();
    assert_eq!(test_metric.len(), 4 + 2 + 3, "{body}");
    for id in ["a", "b", "c"] {
        assert!(
            body.contains(&format!(
                "telemeter_last_push_timestamp_seconds{{_id=\"{id}\"}} "
            )),
            "{body}"
        );
    }
    // The control: the same bodies one cluster after another, as served before, are refused.
    let mut repeated = String::new();
    for id in ["a", "b"] {
        let r = get(
            &s.url_internal(&format!("/federate?match[]={{_id=\"{id}\"}}")),
            &[],
        );
        repeated.push_str(&r.body);
    }
    assert!(promtool_check(&repeated).is_err(), "{repeated}");
}

#[test]
fn match_selects_series() {
    let dir = TempDir::new("federate-match");
    let s = three_clusters(&dir);
    let federate = |query: &str| {
        let r = get(&s.url_internal(&format!("/federate?{query}")), &[]);
        (r.status, r.body)
    };
    let enc = telemeter_common::http::percent_encode;

    let (status, body) = federate(&format!("match[]={}", enc("{_id=\"b\"}")));
    assert_eq!(status, 200, "{body}");
    let lines = series_lines(&body);
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|l| l.contains("_id=\"b\"")), "{body}");
    // up, 2 × test_metric, the histogram's 4 lines (and the last push, not counted here).
    assert_eq!(lines.len(), 1 + 2 + 4, "{body}");
    assert!(
        body.contains("telemeter_last_push_timestamp_seconds{_id=\"b\"} "),
        "{body}"
    );
    assert!(
        !body.contains("telemeter_last_push_timestamp_seconds{_id=\"a\"}"),
        "{body}"
    );

    // Two selectors: either matches; a histogram is selected by its _bucket name.
    let (status, body) = federate(&format!(
        "match[]={}&match[]={}",
        enc("up{_id=~\"a|c\"}"),
        enc("request_seconds_bucket{_id=\"c\"}")
    ));
    assert_eq!(status, 200, "{body}");
    let mut lines = series_lines(&body);
    lines.sort();
    assert_eq!(
        lines,
        [
            "request_seconds_bucket{path=\"/c\",_id=\"c\",le=\"+Inf\"} 3",
            "request_seconds_bucket{path=\"/c\",_id=\"c\",le=\"0.1\"} 2",
            "request_seconds_count{path=\"/c\",_id=\"c\"} 3",
            "request_seconds_sum{path=\"/c\",_id=\"c\"} 0.5",
            "up{job=\"prometheus\",_id=\"a\"} 1",
            "up{job=\"prometheus\",_id=\"c\"} 1",
        ],
        "{body}"
    );
    promtool_check(&body).unwrap();

    let (status, body) = federate(&format!("match[]={}", enc("{_id=")));
    assert_eq!(status, 400, "{body}");
    assert!(body.starts_with("bad match[] selector"), "{body}");
}

/// A loopback proxy in front of `upstream` that drops the request's `Accept-Encoding`, for a
/// Prometheus that always asks for gzip; counts the responses it saw with `Content-Encoding`.
fn plain_proxy(upstream: std::net::SocketAddr, encoded: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let encoded = encoded.clone();
            std::thread::spawn(move || {
                let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    if client.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let mut request = String::new();
                for line in head.split("\r\n").filter(|l| !l.is_empty()) {
                    let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
                    if name == "accept-encoding" || name == "connection" {
                        continue;
                    }
                    request.push_str(line);
                    request.push_str("\r\n");
                }
                request.push_str("Connection: close\r\n\r\n");
                let Ok(mut server) = TcpStream::connect(upstream) else {
                    return;
                };
                let _ = server.set_read_timeout(Some(Duration::from_secs(10)));
                if server.write_all(request.as_bytes()).is_err() {
                    return;
                }
                let mut response = Vec::new();
                let _ = server.read_to_end(&mut response);
                let text = String::from_utf8_lossy(&response).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    if text[..end].contains("content-encoding: gzip") {
                        encoded.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = client.write_all(&response);
            });
        }
    });
    port
}

#[test]
fn prometheus_gets_the_same_series_with_gzip_as_without_and_match_splits() {
    assert!(
        std::path::Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is not installed: run `make setup` (Debian package prometheus)"
    );
    let dir = TempDir::new("federate-gzip");
    let s = three_clusters(&dir);

    // What Prometheus asks for, compressed: gzip, and the same body once decompressed.
    let gz = Command::new("curl")
        .args([
            "-sS",
            "--compressed",
            "-D",
            "-",
            &s.url_internal("/federate"),
        ])
        .output()
        .unwrap();
    let gz = String::from_utf8_lossy(&gz.stdout).to_string();
    assert!(
        gz.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{gz}"
    );
    let plain = s.federate();
    let gz_body = gz.split("\r\n\r\n").nth(1).unwrap_or("");
    assert_eq!(series_lines(gz_body), series_lines(&plain));

    let encoded = Arc::new(AtomicUsize::new(0));
    let proxy = plain_proxy(s.internal, encoded.clone());
    let config = dir.file(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gzip\n    honor_labels: true\n    metrics_path: /federate\n    static_configs:\n      - targets: ['{}']\n  - job_name: plain\n    honor_labels: true\n    metrics_path: /federate\n    static_configs:\n      - targets: ['127.0.0.1:{proxy}']\n  - job_name: split\n    honor_labels: true\n    metrics_path: /federate\n    params:\n      'match[]': ['{{_id=\"b\"}}']\n    static_configs:\n      - targets: ['localhost:{}']\n",
            s.internal,
            s.internal.port()
        ),
    );
    let port = free_port();
    let _prom = testkit::Guard(
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
    // By instance: with honor_labels, the pushed `up` keeps its own job label.
    let gzip_target = s.internal.to_string();
    let plain_target = format!("127.0.0.1:{proxy}");
    let series = |instance: &str| -> Option<Vec<String>> {
        let query = telemeter_common::http::percent_encode(&format!(
            "{{instance=\"{instance}\",_id!=\"\"}}"
        ));
        let r = get(
            &format!("http://127.0.0.1:{port}/api/v1/query?query={query}"),
            &[],
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        let mut out: Vec<String> = v["data"]["result"]
            .as_array()?
            .iter()
            .map(|r| {
                let mut metric = r["metric"].as_object().cloned().unwrap_or_default();
                metric.remove("job");
                metric.remove("instance");
                format!("{:?} {}", metric, r["value"][1])
            })
            .collect();
        out.sort();
        Some(out)
    };
    // 9 test_metric, 3 up, 3 × 4 histogram series, 3 last push.
    let expected = 9 + 3 + 12 + 3;
    let gzip = testkit::wait_for(Duration::from_secs(30), || {
        series(&gzip_target).filter(|s| s.len() == expected)
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never saw {expected} series via gzip: {:?}",
            series(&gzip_target)
        )
    });
    let plain = testkit::wait_for(Duration::from_secs(30), || {
        series(&plain_target).filter(|s| s.len() == expected)
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never saw {expected} series plain: {:?}",
            series(&plain_target)
        )
    });
    // The values are the same too, but for the last push time (the same pushes: equal).
    assert_eq!(gzip, plain);
    assert_eq!(
        encoded.load(Ordering::Relaxed),
        0,
        "the proxy passed gzip on"
    );

    // A scrape job with match[] (as a central Prometheus splits the fleet) gets cluster b only:
    // up, 2 test_metric, 4 histogram series, its last push.
    let split_target = format!("localhost:{}", s.internal.port());
    let split = testkit::wait_for(Duration::from_secs(30), || {
        series(&split_target).filter(|s| s.len() == 8)
    })
    .unwrap_or_else(|| {
        panic!(
            "the match[] job never saw 8 series: {:?}",
            series(&split_target)
        )
    });
    assert!(
        split.iter().all(|s| s.contains("\"_id\": String(\"b\")")),
        "{split:?}"
    );
}
