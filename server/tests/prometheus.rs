//! A real Prometheus scrapes our `/federate` (honor_labels) and answers queries over what was pushed.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

use testkit::Guard as Killed;

#[test]
fn prometheus_scrapes_federate() {
    need(PROMETHEUS);
    let dir = TempDir::new("prom");
    let s = ServerProcess::setup(&dir).start();
    let token = s.upload_token("secret", "test");
    let r = s.upload(&token, &families(Some("test"), 25, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);
    // A second cluster: its families repeat the first one's names (and HELP/TYPE lines) in the
    // same scrape, which Prometheus must accept.
    let other = s.upload_token("secret", "other");
    let r = s.upload(&other, &families(None, 5, now_ms()));
    assert_eq!(r.status, 200, "{}", r.body);

    let prom = Prometheus::scraping(
        &dir,
        &federate_job("telemeter", &s.internal.to_string(), None),
    );
    let count = |selector: &str| prom.query_one(&format!("count({selector})"));
    // Pushed series only: /federate adds each cluster's last push time beside them.
    let mut last = None;
    let counted = wait_until(Duration::from_secs(30), || {
        last = count("{_id=\"test\",__name__!=\"telemeter_last_push_timestamp_seconds\"}");
        last.as_deref() == Some("26")
    });
    assert!(
        counted,
        "Prometheus never counted 26 series with _id=\"test\"; last answer: {last:?}"
    );
    assert_eq!(
        count("{_id=\"other\",__name__!=\"telemeter_last_push_timestamp_seconds\"}").as_deref(),
        Some("6")
    );
    assert_eq!(count("up{job=\"prometheus\"}").as_deref(), Some("2"));
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

    let s = ServerProcess::setup(&dir).storage(&data).start();
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
    let prom = Prometheus::scraping(
        &dir,
        &format!(
            "{}  - job_name: control\n    metrics_path: /metrics.txt\n    static_configs:\n      - targets: ['127.0.0.1:{control_port}']\n",
            federate_job("telemeter", &s.internal.to_string(), None)
        ),
    );

    wait_for("the bystander's 6 series in Prometheus", || {
        prom.query_one(
            "count({_id=\"bystander\",__name__!=\"telemeter_last_push_timestamp_seconds\"})",
        )
        .filter(|n| n == "6")
    });
    assert_eq!(
        prom.query_one("up{job=\"telemeter\"}").as_deref(),
        Some("1")
    );
    let (health, error) = wait_for("a scrape of the telemeter target", || {
        prom.target("telemeter")
    });
    assert_eq!((health.as_str(), error.as_str()), ("up", ""));
    // The planted cluster: its servable series are there, the others are not.
    assert_eq!(
        prom.query_one(
            "count({_id=\"legacy\",__name__!=\"telemeter_last_push_timestamp_seconds\"})"
        )
        .as_deref(),
        Some("5"),
        "legacy_gauge{{ok}} and legacy_seconds{{ok}}: 2 buckets, sum and count"
    );
    assert_eq!(prom.query_one("count(legacy_gauge)").as_deref(), Some("1"));
    // Nothing of the hostile tenant was stored.
    assert_eq!(
        prom.query_one("count({_id=\"test\",__name__!=\"telemeter_last_push_timestamp_seconds\"})"),
        None
    );
    // The control: this Prometheus refuses a whole scrape for one such line.
    let (health, error) = wait_for("a scrape of the control target", || prom.target("control"));
    assert_eq!(health, "down", "{error}");
    assert!(error.contains("not unique"), "{error}");
    assert_eq!(prom.query_one("up{job=\"control\"}").as_deref(), Some("0"));

    // Left out, counted by reason, and warned about.
    let metrics = get(&s.url_internal("/metrics"), &[]).body;
    let skipped = |reason: &str| federate_skipped(&metrics, reason);
    assert!(skipped("reserved_label") >= 1.0, "{metrics}");
    assert!(skipped("duplicate_label") >= 1.0, "{metrics}");
    assert!(skipped("type_label") >= 1.0, "{metrics}");
    assert!(s.logs.lock().unwrap().iter().any(|l| l.contains("WARN")
        && l.contains("left out 3 series")
        && l.contains("\"legacy\"")));
}
