//! `/federate` as a central Prometheus and its tools see it: promtool accepts it with several
//! clusters sharing family names, `match[]` selects (also from a real Prometheus scrape job), and a
//! real Prometheus gets the same series with gzip as without.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use telemeter_common::model::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};

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
    let s = ServerProcess::setup(dir).start();
    for (id, n) in [("a", 4), ("b", 2), ("c", 3)] {
        let token = s.upload_token("wild", id);
        let r = s.upload(&token, &with_histogram(id, n));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    s
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
/// Prometheus that always asks for gzip; keeps the head of every response it passed on,
/// lowercased, in `heads`.
fn plain_proxy(upstream: std::net::SocketAddr, heads: Arc<Mutex<Vec<String>>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let heads = heads.clone();
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
                    heads
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(text[..end].to_string());
                }
                let _ = client.write_all(&response);
            });
        }
    });
    port
}

/// `/federate` as Prometheus asks for it, compressed (and that it was), decompressed by curl.
fn federate_gzip(s: &ServerProcess) -> String {
    let gz = Command::new("curl")
        .args([
            "-sS",
            "--compressed",
            "-D",
            "-",
            &s.url_internal("/federate"),
        ])
        .output()
        .expect("run curl");
    let gz = String::from_utf8_lossy(&gz.stdout).to_string();
    assert!(
        gz.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{gz}"
    );
    gz.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

#[test]
fn prometheus_gets_the_same_series_with_gzip_as_without_and_match_splits() {
    need(PROMETHEUS);
    let dir = TempDir::new("federate-gzip");
    let s = three_clusters(&dir);

    // What Prometheus asks for, compressed: gzip, and the same body once decompressed.
    let gz_body = federate_gzip(&s);
    let plain = s.federate();
    assert_eq!(series_lines(&gz_body), series_lines(&plain));

    let heads = Arc::new(Mutex::new(Vec::new()));
    let proxy = plain_proxy(s.internal, heads.clone());
    let jobs = [
        federate_job("gzip", &s.internal.to_string(), None),
        federate_job("plain", &format!("127.0.0.1:{proxy}"), None),
        federate_job(
            "split",
            &format!("localhost:{}", s.internal.port()),
            Some("{_id=\"b\"}"),
        ),
    ];
    let prom = Prometheus::scraping(&dir, &jobs.concat());
    // By instance: with honor_labels, the pushed `up` keeps its own job label.
    let gzip_target = s.internal.to_string();
    let plain_target = format!("127.0.0.1:{proxy}");
    let series = |instance: &str| -> Option<Vec<String>> {
        let mut out: Vec<String> = prom
            .query(&format!("{{instance=\"{instance}\",_id!=\"\"}}"))?
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
    let heads = heads.lock().unwrap().clone();
    assert!(!heads.is_empty());
    assert!(
        heads.iter().all(|h| !h.contains("content-encoding: gzip")),
        "the proxy passed gzip on: {heads:?}"
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

/// Three tenants whose family names collide across clusters in every way a text exposition
/// cares about: `a` has a histogram `h`, a summary `s`, a counter `x_total` and a gauge `y`;
/// `b` has an untyped `h_bucket`, gauges `h_count` and `s_sum` (named like a's lines), a gauge
/// `x_total` (another type), a gauge `y` with another help text, and a gauge `g`; `c` a gauge
/// `normal`. Uploaded as text, the way a tenant writes them.
fn colliding_tenants(dir: &TempDir) -> ServerProcess {
    let s = ServerProcess::setup(dir).start();
    let uploads = [
        (
            "a",
            "# HELP h A histogram.\n# TYPE h histogram\nh_bucket{le=\"0.5\"} 1 T\n\
             h_bucket{le=\"+Inf\"} 2 T\nh_sum 1.5 T\nh_count 2 T\n\
             # HELP s A summary.\n# TYPE s summary\ns{quantile=\"0.5\"} 1 T\ns_sum 3 T\n\
             s_count 2 T\n# HELP x_total A counter.\n# TYPE x_total counter\nx_total 5 T\n\
             # HELP y Help one.\n# TYPE y gauge\ny 1 T\n",
        ),
        (
            "b",
            "# HELP g A gauge.\n# TYPE g gauge\ng 7 T\n\
             # HELP h_bucket Like h's buckets.\n# TYPE h_bucket untyped\nh_bucket 3 T\n\
             # HELP h_count Like h's count.\n# TYPE h_count gauge\nh_count 3 T\n\
             # HELP s_sum Like s's sum.\n# TYPE s_sum gauge\ns_sum 7 T\n\
             # HELP x_total Another type.\n# TYPE x_total gauge\nx_total 2 T\n\
             # HELP y Help two.\n# TYPE y gauge\ny 2 T\n",
        ),
        (
            "c",
            "# HELP normal A bystander.\n# TYPE normal gauge\nnormal 1 T\n",
        ),
    ];
    for (id, text) in uploads {
        let token = s.upload_token("wild", id);
        let body = text.replace(" T\n", &format!(" {}\n", now_ms()));
        let r = upload_as(&s, &token, TEXT, body.as_bytes());
        assert_eq!(r.status, 200, "{id}: {}", r.body);
    }
    s
}

/// The series a central Prometheus must get from [`colliding_tenants`] (the last push but
/// for), as `name{_id}`: a's histogram and summary lines, `x_total` of the first cluster, both
/// `y`, and the families that collide with nothing.
const NOT_COLLIDING: [&str; 12] = [
    "g{b}",
    "h_bucket{a}",
    "h_bucket{a}",
    "h_count{a}",
    "h_sum{a}",
    "normal{c}",
    "s_count{a}",
    "s_sum{a}",
    "s{a}",
    "x_total{a}",
    "y{a}",
    "y{b}",
];

/// `name{_id}` of every series line of a text body (the last push but for), sorted.
fn text_series(body: &str) -> Vec<String> {
    let mut out: Vec<String> = series_lines(body)
        .iter()
        .map(|line| {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            let id = line
                .split("_id=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("");
            format!("{name}{{{id}}}")
        })
        .collect();
    out.sort();
    out
}

/// `name{_id}` of the series `prom` scraped in `job` (the last push but for), once it has
/// `want` of them (bounded wait); what it had last otherwise.
fn scraped(prom: &Prometheus, job: &str, want: usize) -> Result<Vec<String>, String> {
    let series = || {
        let selector = format!(
            "{{job=\"{job}\",_id!=\"\",__name__!=\"telemeter_last_push_timestamp_seconds\"}}"
        );
        let mut out: Vec<String> = prom
            .query(&selector)?
            .iter()
            .map(|r| {
                let label = |name: &str| r["metric"][name].as_str().unwrap_or("").to_string();
                format!("{}{{{}}}", label("__name__"), label("_id"))
            })
            .collect();
        out.sort();
        Some(out)
    };
    testkit::wait_for(Duration::from_secs(60), || {
        series().filter(|s| s.len() == want)
    })
    .ok_or_else(|| format!("{job}: never {want} series; last {:?}", series()))
}

/// The first round's lesson, across tenants: a family named like another cluster's histogram or
/// summary lines (an untyped `h_bucket` beside a histogram `h`) made a second TYPE for `h`'s
/// lines, and Go's parser (promtool, an upstream client, anything on `expfmt`) refused the whole
/// `/federate` text. Such a family is left out, counted and warned about; the same name with
/// another type, and another help text, keep the text parseable too. Checked with promtool (plain
/// and gzip, all of it and each kind of collision alone), with a real Prometheus scraping text
/// (gzip) in a job per kind, and with one scraping protobuf (gzip, and plain through a proxy
/// that shows the format), which must all get the same series.
#[test]
fn a_tenant_naming_a_family_like_anothers_lines_or_types_cannot_break_the_federate_text() {
    let dir = TempDir::new("federate-collide");
    let s = colliding_tenants(&dir);
    let enc = telemeter_common::http::percent_encode;

    // promtool: the whole text, plain and gzip (curl decompresses), then each kind alone.
    let plain = s.federate();
    promtool_check(&plain).unwrap_or_else(|e| panic!("promtool: {e}\n{plain}"));
    assert_eq!(text_series(&plain), NOT_COLLIDING, "{plain}");
    let gz_body = federate_gzip(&s);
    promtool_check(&gz_body).unwrap_or_else(|e| panic!("promtool (gzip): {e}\n{gz_body}"));
    assert_eq!(text_series(&gz_body), NOT_COLLIDING);
    // Each kind of collision alone: (match[], the series served).
    let kinds: [(&str, &[&str]); 3] = [
        (
            "{__name__=~\"h|s|g|normal|h_.+|s_.+\"}",
            &NOT_COLLIDING[..9],
        ),
        ("{__name__=\"x_total\"}", &["x_total{a}"]),
        ("{__name__=\"y\"}", &["y{a}", "y{b}"]),
    ];
    for (selector, want) in kinds {
        let r = get(
            &s.url_internal(&format!("/federate?match[]={}", enc(selector))),
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        promtool_check(&r.body).unwrap_or_else(|e| panic!("promtool {selector}: {e}\n{}", r.body));
        assert_eq!(text_series(&r.body), want, "{selector}: {}", r.body);
    }
    // The help of the first cluster, once.
    assert_eq!(plain.matches("# HELP y ").count(), 1, "{plain}");
    assert!(plain.contains("# HELP y Help one.\n"), "{plain}");

    // Protobuf: the same series (a collision is no parse problem there; the series served do
    // not depend on the format).
    let r = get(
        &s.url_internal("/federate"),
        &[("Accept", telemeter_common::media::PROTO_DELIMITED)],
    );
    assert_eq!(r.status, 200);
    let families =
        telemeter_common::delimited::decode(&r.bytes, &Default::default()).expect("protobuf");
    let mut pb_series: Vec<String> = Vec::new();
    for family in &families {
        let name = family.name.clone().unwrap_or_default();
        if name == "telemeter_last_push_timestamp_seconds" {
            continue;
        }
        for metric in &family.metric {
            let id = metric
                .label
                .iter()
                .find(|l| l.name.as_deref() == Some("_id"))
                .and_then(|l| l.value.clone())
                .unwrap_or_default();
            pb_series.push(format!("{name}{{{id}}}"));
        }
    }
    pb_series.sort();
    // A histogram or summary is one series in protobuf, its lines in text.
    assert_eq!(
        pb_series,
        [
            "g{b}",
            "h{a}",
            "normal{c}",
            "s{a}",
            "x_total{a}",
            "y{a}",
            "y{b}"
        ]
    );

    // The real Prometheus: text (with gzip, as it always asks), a job per kind of collision.
    let target = s.internal.to_string();
    let text_jobs = [
        federate_job("all", &target, None),
        federate_job("lines", &target, Some(kinds[0].0)),
        federate_job("types", &target, Some(kinds[1].0)),
        federate_job("help", &target, Some(kinds[2].0)),
    ];
    let text_prom = Prometheus::scraping(&dir, &text_jobs.concat());
    // Protobuf: Prometheus 2.42 asks for it first only with native histograms enabled. One job
    // straight (gzip), one through a proxy that drops Accept-Encoding and shows the format.
    let heads = Arc::new(Mutex::new(Vec::new()));
    let proxy = plain_proxy(s.internal, heads.clone());
    let pb_jobs = [
        federate_job("pb_gzip", &target, None),
        federate_job("pb_plain", &format!("127.0.0.1:{proxy}"), None),
    ];
    let pb_prom = Prometheus::start(
        &dir,
        "prometheus-pb",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n{}",
            pb_jobs.concat()
        ),
        free_port(),
        &["--enable-feature=native-histograms"],
    );

    let checks: [(&Prometheus, &str, &[&str]); 6] = [
        (&text_prom, "all", &NOT_COLLIDING),
        (&text_prom, "lines", &NOT_COLLIDING[..9]),
        (&text_prom, "types", &["x_total{a}"]),
        (&text_prom, "help", &["y{a}", "y{b}"]),
        (&pb_prom, "pb_gzip", &NOT_COLLIDING),
        (&pb_prom, "pb_plain", &NOT_COLLIDING),
    ];
    for (prom, job, want) in checks {
        let series = scraped(prom, job, want.len()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(series, want, "{job}");
        let health = prom.target(job);
        assert_eq!(
            health,
            Some(("up".to_string(), String::new())),
            "{job}: {health:?}"
        );
        assert_eq!(
            prom.query_one(&format!("up{{job=\"{job}\"}}")).as_deref(),
            Some("1"),
            "{job}"
        );
    }
    // Absent by name: b's families named like a's lines, and b's x_total of another type.
    for name in ["h_bucket", "h_count", "s_sum", "x_total"] {
        for prom in [&text_prom, &pb_prom] {
            assert_eq!(
                prom.query(&format!("{name}{{_id=\"b\"}}")),
                Some(vec![]),
                "{name} of b"
            );
        }
    }
    let heads = heads.lock().unwrap().clone();
    assert!(!heads.is_empty());
    assert!(
        heads.iter().all(
            |h| h.contains("content-type: application/vnd.google.protobuf")
                && !h.contains("content-encoding")
        ),
        "{heads:?}"
    );

    // Counted by reason, and warned about once per scrape.
    let metrics = get(&s.url_internal("/metrics"), &[]).body;
    let skipped = |reason: &str| federate_skipped(&metrics, reason);
    // At least the 3 of the first promtool scrape; every scrape since added as many.
    assert!(skipped("name_collision") >= 3.0, "{metrics}");
    assert_eq!(skipped("name_collision") % 3.0, 0.0, "{metrics}");
    assert!(skipped("type_conflict") >= 1.0, "{metrics}");
    let logs = s.logs.lock().unwrap();
    assert!(
        logs.iter().any(|l| l.contains("WARN")
            && l.contains("left out 3 series of families named like")
            && l.contains("\"h_bucket\", beside \"h\"")),
        "{logs:?}"
    );
}
