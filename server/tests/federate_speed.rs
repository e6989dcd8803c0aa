//! A throughput probe of `GET /federate` (not a benchmark harness): loads 2,000 clusters of 500
//! series each (shaped like the `make bench` payload: node-exporter counters and gauges plus
//! histograms, non-integer values) into a real server, then times one full scrape, counting the
//! series lines as they arrive. Run a release build with
//!
//! ```text
//! nice cargo test --release -p telemeter-server --test federate_speed -- --ignored --nocapture
//! ```
//!
//! `FEDERATE_CLUSTERS=N` changes the cluster count; `FEDERATE_FORMAT=pd` scrapes protobuf instead.

mod common;

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::model::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

/// A cheap deterministic value spread, so values format like real ones (mostly non-integers).
struct Values(u64);

impl Values {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 10_000_000) as f64 / 7.0
    }
}

fn push(families: &mut Vec<MetricFamily>, name: &str, kind: MetricType, metric: Metric) {
    if families.last().and_then(|f| f.name.as_deref()) != Some(name) {
        families.push(MetricFamily {
            name: Some(name.to_string()),
            help: Some(format!("{name} as the node exporter reports it.")),
            r#type: Some(kind as i32),
            metric: Vec::new(),
        });
    }
    if let Some(last) = families.last_mut() {
        last.metric.push(metric);
    }
}

/// 500 Prometheus series: 5 nodes × (32 cpu counters, 10 memory gauges, 15 filesystem gauges,
/// 10 disk and 8 network counters, 4 other gauges, one 10-bucket histogram), plus three 13-bucket
/// histograms. The server stamps `_id`.
fn payload(seed: u64, ts: i64) -> Vec<MetricFamily> {
    let mut v = Values(seed | 1);
    let mut out = Vec::new();
    let labels = |instance: &str, job: &str, extra: &[(&str, &str)]| {
        let mut l = vec![
            LabelPair::new("instance", instance),
            LabelPair::new("job", job),
        ];
        l.extend(extra.iter().map(|(k, v)| LabelPair::new(k, v)));
        l
    };
    let scalar = |label: Vec<LabelPair>, kind: MetricType, value: f64| Metric {
        label,
        counter: (kind == MetricType::Counter).then_some(Counter { value: Some(value) }),
        gauge: (kind == MetricType::Gauge).then_some(Gauge { value: Some(value) }),
        timestamp_ms: Some(ts),
        ..Default::default()
    };
    let instances: Vec<String> = (0..5).map(|n| format!("10.0.0.{}:9100", 10 + n)).collect();
    for i in &instances {
        for cpu in 0..4 {
            for mode in [
                "idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user",
            ] {
                let l = labels(
                    i,
                    "node-exporter",
                    &[("cpu", &cpu.to_string()), ("mode", mode)],
                );
                let m = scalar(l, MetricType::Counter, v.next());
                push(&mut out, "node_cpu_seconds_total", MetricType::Counter, m);
            }
        }
    }
    let simple: [(&str, MetricType, &[(&str, &str)]); 6] = [
        ("node_memory_bytes", MetricType::Gauge, &[]),
        (
            "node_filesystem_avail_bytes",
            MetricType::Gauge,
            &[("device", "/dev/nvme0n1p4"), ("fstype", "xfs")],
        ),
        (
            "node_disk_read_bytes_total",
            MetricType::Counter,
            &[("device", "nvme0n1")],
        ),
        (
            "node_network_receive_bytes_total",
            MetricType::Counter,
            &[("device", "ens3")],
        ),
        ("node_load1", MetricType::Gauge, &[]),
        ("node_uname_info", MetricType::Gauge, &[("release", "5.14")]),
    ];
    // 10 + 15 + 10 + 8 + 2 + 2 = 47 scalar series per node, spread over the families above.
    let per_node = [10, 15, 10, 8, 2, 2];
    for (f, (name, kind, extra)) in simple.iter().enumerate() {
        for i in &instances {
            for k in 0..per_node[f] {
                let mut l = labels(i, "node-exporter", extra);
                l.push(LabelPair::new("n", &k.to_string()));
                let m = scalar(l, *kind, v.next());
                push(&mut out, name, *kind, m);
            }
        }
    }
    let mut histogram = |out: &mut Vec<MetricFamily>, name: &str, label, bounds: &[f64]| {
        let mut count = 0u64;
        let bucket = bounds
            .iter()
            .map(|&upper| {
                count += (v.next() as u64) % 1000;
                Bucket {
                    cumulative_count: Some(count),
                    upper_bound: Some(upper),
                }
            })
            .collect();
        let m = Metric {
            label,
            histogram: Some(Histogram {
                sample_count: Some(count),
                sample_sum: Some(v.next()),
                bucket,
            }),
            timestamp_ms: Some(ts),
            ..Default::default()
        };
        push(out, name, MetricType::Histogram, m);
    };
    let node_buckets = [
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        f64::INFINITY,
    ];
    for i in &instances {
        let l = labels(i, "node-exporter", &[("handler", "/metrics")]);
        histogram(
            &mut out,
            "node_http_request_duration_seconds",
            l,
            &node_buckets,
        );
    }
    let api_buckets = [
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.2,
        0.4,
        0.6,
        0.8,
        1.0,
        2.0,
        5.0,
        f64::INFINITY,
    ];
    for verb in ["GET", "LIST", "WATCH"] {
        let l = labels("10.0.0.1:6443", "apiserver", &[("verb", verb)]);
        histogram(
            &mut out,
            "apiserver_request_duration_seconds",
            l,
            &api_buckets,
        );
    }
    out
}

/// Series lines (not comments) in a text body read in blocks.
struct LineCounter {
    series: usize,
    at_line_start: bool,
}

impl LineCounter {
    fn feed(&mut self, block: &[u8]) {
        for &b in block {
            if self.at_line_start && b != b'#' {
                self.series += 1;
            }
            self.at_line_start = b == b'\n';
        }
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

#[test]
fn series_per_line_count_of_the_payload_is_500() {
    let mut text = Vec::new();
    telemeter_common::text::encode(&mut text, &payload(7, 1), false).unwrap();
    let mut c = LineCounter {
        series: 0,
        at_line_start: true,
    };
    c.feed(&text);
    assert_eq!(c.series, 500);
}

#[test]
#[ignore]
fn full_federate_scrape() {
    let clusters: usize = std::env::var("FEDERATE_CLUSTERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let pd = std::env::var("FEDERATE_FORMAT").is_ok_and(|f| f == "pd");
    let dir = TempDir::new("federate-speed");
    let tokens = dir.file("tokens", TOKENS);
    let s = Arc::new(ServerProcess::start(
        &dir.path().join("data"),
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--ratelimit",
            "0s",
        ],
    ));
    let loaded = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (s, next) = (s.clone(), next.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= clusters {
                    break;
                }
                let id = format!("cluster-{i:06}");
                let token = s.upload_token("wild", &id);
                let r = s.upload(&token, &payload(i as u64 + 1, now_ms()));
                assert_eq!(r.status, 200, "upload {id}: {}", r.body);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    println!(
        "loaded {clusters} clusters in {:.1}s",
        loaded.elapsed().as_secs_f64()
    );

    let pid = s.child.id();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let accept = if pd { PROTO_DELIMITED } else { "text/plain" };
    let mut r = agent()
        .get(s.url_internal("/federate"))
        .header("Accept", accept)
        .call()
        .expect("GET /federate");
    assert_eq!(r.status(), 200);
    let mut reader = r.body_mut().with_config().limit(u64::MAX).reader();
    let mut counter = LineCounter {
        series: 0,
        at_line_start: true,
    };
    let mut bytes = 0usize;
    let mut block = vec![0u8; 256 << 10];
    loop {
        let n = reader.read(&mut block).expect("read /federate");
        if n == 0 {
            break;
        }
        bytes += n;
        if !pd {
            counter.feed(&block[..n]);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    if pd {
        println!(
            "federate (protobuf): {bytes} bytes in {secs:.3}s = {:.0} MB/s, {:.2}M series/s, server CPU {cpu:.2}s",
            bytes as f64 / secs / 1e6,
            (clusters * 500) as f64 / secs / 1e6,
        );
    } else {
        println!(
            "federate (text): {} series, {bytes} bytes in {secs:.3}s = {:.2}M series/s, {:.0} MB/s, server CPU {cpu:.2}s",
            counter.series,
            counter.series as f64 / secs / 1e6,
            bytes as f64 / secs / 1e6,
        );
        assert_eq!(counter.series, clusters * 500);
    }
}
