//! A real Prometheus scrapes our `/federate` (honor_labels) and answers queries over what was pushed.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PROMETHEUS: &str = "/usr/bin/prometheus";

use testkit::Guard as Killed;

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
    // Pushed series only: /federate adds each cluster's last push time beside them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = count("{_id=\"test\",__name__!=\"telemeter_last_push_timestamp_seconds\"}");
        if last.as_deref() == Some("26") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never counted 26 series with _id=\"test\"; last answer: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        count("{_id=\"other\",__name__!=\"telemeter_last_push_timestamp_seconds\"}").as_deref(),
        Some("6")
    );
    assert_eq!(count("up{job=\"prometheus\"}").as_deref(), Some("2"));
    drop(prom);
}

/// Starts the real Prometheus with `scrape_configs` (YAML, indented as a list under the key),
/// scraping every second; its port.
fn start_prometheus(dir: &TempDir, scrape_configs: &str) -> (Killed, u16) {
    assert!(
        std::path::Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is not installed: run `make setup` (Debian package prometheus)"
    );
    let config = dir.file(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{scrape_configs}"
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
    (prom, port)
}

/// The value of the instant `query` on the Prometheus at `port`, when it has one result.
fn query_one(port: u16, query: &str) -> Option<String> {
    let url = format!(
        "http://127.0.0.1:{port}/api/v1/query?query={}",
        telemeter_common::http::percent_encode(query)
    );
    let v: serde_json::Value = serde_json::from_str(&get(&url, &[]).body).ok()?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str().map(String::from)
}

/// The `lastError` of the scrape target of `job`, once it has been scraped (health not unknown).
fn last_scrape(port: u16, job: &str) -> Option<(String, String)> {
    let r = get(&format!("http://127.0.0.1:{port}/api/v1/targets"), &[]);
    let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    v["data"]["activeTargets"]
        .as_array()?
        .iter()
        .find(|t| t["labels"]["job"] == job && t["health"] != "unknown")
        .map(|t| {
            (
                t["health"].as_str().unwrap_or("").to_string(),
                t["lastError"].as_str().unwrap_or("").to_string(),
            )
        })
}

/// Waits (bounded) until `check` gives `Some`; its value.
fn wait_for<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    testkit::wait_for(Duration::from_secs(30), check)
        .unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// One tenant tries every upload whose line would make Prometheus refuse the whole scrape (a
/// label named twice, `le` on a histogram, `__name__`...): each gets 400, and the central
/// Prometheus keeps scraping the server and sees the bystander. Such series planted in the store
/// anyway (as an older server might have left them) are left out of `/federate`, and counted.
/// A control target serving one such line shows that this Prometheus does refuse the whole scrape
/// for it.
#[test]
fn a_hostile_tenant_cannot_blind_the_central_prometheus() {
    use telemeter_common::delimited;
    use telemeter_common::model::MetricType;
    use telemeter_common::model::{Bucket, Gauge, Histogram, LabelPair, Metric, MetricFamily};
    use telemeter_server::store::{Store, StoreConfig};

    let dir = TempDir::new("prom-hostile");
    let data = dir.path().join("data");
    // What an older server may have stored: one servable series beside each unservable one.
    let ts = now_ms();
    let series = |labels: &[(&str, &str)]| Metric {
        label: labels.iter().map(|(n, v)| LabelPair::new(n, v)).collect(),
        gauge: Some(Gauge { value: Some(1.0) }),
        timestamp_ms: Some(ts),
        ..Default::default()
    };
    let histogram = |labels: &[(&str, &str)]| Metric {
        gauge: None,
        histogram: Some(Histogram {
            sample_count: Some(2),
            sample_sum: Some(1.0),
            bucket: vec![Bucket {
                cumulative_count: Some(1),
                upper_bound: Some(0.5),
            }],
        }),
        ..series(labels)
    };
    let legacy = vec![
        MetricFamily {
            name: Some("legacy_gauge".into()),
            help: None,
            r#type: Some(MetricType::Gauge as i32),
            metric: vec![
                series(&[("_id", "legacy"), ("ok", "1")]),
                series(&[("_id", "legacy"), ("__name__", "evil")]),
                series(&[("_id", "legacy"), ("a", "1"), ("a", "2")]),
            ],
        },
        MetricFamily {
            name: Some("legacy_seconds".into()),
            help: None,
            r#type: Some(MetricType::Histogram as i32),
            metric: vec![
                histogram(&[("_id", "legacy"), ("ok", "1")]),
                histogram(&[("_id", "legacy"), ("le", "0.5")]),
            ],
        },
    ];
    let store = Store::open(StoreConfig {
        dir: data.clone(),
        ttl: Duration::from_secs(3600),
        max_batch: 8,
    })
    .unwrap();
    store
        .put(
            "legacy",
            delimited::encode(&legacy),
            std::time::SystemTime::now(),
        )
        .unwrap();
    store.close();
    drop(store);

    let tokens = dir.file("tokens", TOKENS);
    let s = ServerProcess::start(
        &data,
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--ratelimit",
            "0s",
        ],
    );
    let bystander = s.upload_token("wild", "bystander");
    let r = s.upload(&bystander, &families(Some("bystander"), 5, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    let hostile = s.upload_token("secret", "test");
    for upload in unservable_uploads("test") {
        let r = upload_as(&s, &hostile, upload.content_type, &upload.body);
        assert_eq!(
            (r.status, r.body.contains(upload.reason)),
            (400, true),
            "{}: {}",
            upload.name,
            r.body
        );
    }

    // The control: a line with a label named twice, served by a plain file server.
    let control_dir = dir.path().join("control");
    std::fs::create_dir_all(&control_dir).unwrap();
    std::fs::write(
        control_dir.join("metrics.txt"),
        "# TYPE m gauge\nm{a=\"1\",a=\"2\"} 1\nfine 1\n",
    )
    .unwrap();
    let control_port = free_port();
    let _control = Killed(
        Command::new("python3")
            .args(["-m", "http.server", &control_port.to_string()])
            .args(["--bind", "127.0.0.1", "--directory"])
            .arg(&control_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m http.server"),
    );
    let (_prom, port) = start_prometheus(
        &dir,
        &format!(
            "  - job_name: telemeter\n    honor_labels: true\n    metrics_path: /federate\n    static_configs:\n      - targets: ['{}']\n  - job_name: control\n    metrics_path: /metrics.txt\n    static_configs:\n      - targets: ['127.0.0.1:{control_port}']\n",
            s.internal
        ),
    );

    wait_for("the bystander's 6 series in Prometheus", || {
        query_one(
            port,
            "count({_id=\"bystander\",__name__!=\"telemeter_last_push_timestamp_seconds\"})",
        )
        .filter(|n| n == "6")
    });
    assert_eq!(
        query_one(port, "up{job=\"telemeter\"}").as_deref(),
        Some("1")
    );
    let (health, error) = wait_for("a scrape of the telemeter target", || {
        last_scrape(port, "telemeter")
    });
    assert_eq!((health.as_str(), error.as_str()), ("up", ""));
    // The planted cluster: its servable series are there, the others are not.
    assert_eq!(
        query_one(
            port,
            "count({_id=\"legacy\",__name__!=\"telemeter_last_push_timestamp_seconds\"})"
        )
        .as_deref(),
        Some("5"),
        "legacy_gauge{{ok}} and legacy_seconds{{ok}}: 2 buckets, sum and count"
    );
    assert_eq!(query_one(port, "count(legacy_gauge)").as_deref(), Some("1"));
    // Nothing of the hostile tenant was stored.
    assert_eq!(
        query_one(
            port,
            "count({_id=\"test\",__name__!=\"telemeter_last_push_timestamp_seconds\"})"
        ),
        None
    );
    // The control: this Prometheus refuses a whole scrape for one such line.
    let (health, error) = wait_for("a scrape of the control target", || {
        last_scrape(port, "control")
    });
    assert_eq!(health, "down", "{error}");
    assert!(error.contains("not unique"), "{error}");
    assert_eq!(query_one(port, "up{job=\"control\"}").as_deref(), Some("0"));

    // Left out, counted by reason, and warned about.
    let metrics = get(&s.url_internal("/metrics"), &[]).body;
    let skipped = |reason: &str| {
        metric_value(
            &metrics,
            "telemeter_server_federate_series_skipped_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    assert!(skipped("reserved_label") >= 1.0, "{metrics}");
    assert!(skipped("duplicate_label") >= 1.0, "{metrics}");
    assert!(skipped("type_label") >= 1.0, "{metrics}");
    assert!(s.logs.lock().unwrap().iter().any(|l| l.contains("WARN")
        && l.contains("left out 3 series")
        && l.contains("\"legacy\"")));
}
