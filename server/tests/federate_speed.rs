//! A throughput probe of `GET /federate` (not a benchmark harness): loads 2,000 clusters of 500
//! series each (the `make bench` payload, `testkit::payload`: node-exporter counters and gauges
//! plus histograms, non-integer values) into a real server, then times one full scrape, counting the
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
use testkit::payload;

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
    telemeter_common::text::encode(
        &mut text,
        &payload::families(&payload::cluster_id(7), 1),
        false,
    )
    .unwrap();
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
    let s = Arc::new(ServerProcess::setup(&dir).start());
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
                let r = s.upload(&token, &payload::families(&id, now_ms()));
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
    let client_before = cpu_seconds(std::process::id());
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
    let client_cpu = cpu_seconds(std::process::id()) - client_before;
    if pd {
        println!(
            "federate (protobuf): {bytes} bytes in {secs:.3}s = {:.0} MB/s, {:.2}M series/s, server CPU {cpu:.2}s, client CPU {client_cpu:.2}s",
            bytes as f64 / secs / 1e6,
            (clusters * 500) as f64 / secs / 1e6,
        );
    } else {
        println!(
            "federate (text): {} series, {bytes} bytes in {secs:.3}s = {:.2}M series/s, {:.0} MB/s, server CPU {cpu:.2}s, client CPU {client_cpu:.2}s",
            counter.series,
            counter.series as f64 / secs / 1e6,
            bytes as f64 / secs / 1e6,
        );
        // Each cluster's 500, and its line of telemeter_last_push_timestamp_seconds.
        assert_eq!(counter.series, clusters * 500 + clusters);
    }
}

/// Counts the bytes written to it and throws them away.
struct Sink(usize);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The same scrape without HTTP, split into its parts: reading the files (with their checksums)
/// and transcoding. `nice cargo test --release -p telemeter-server --test federate_speed
/// in_process -- --ignored --nocapture`
#[test]
#[ignore]
fn in_process_parts_of_a_scrape() {
    use telemeter_common::delimited;
    use telemeter_common::media::Format;
    use telemeter_server::federate;
    use telemeter_server::store::{Store, StoreConfig};

    let clusters = 2000;
    let dir = TempDir::new("federate-parts");
    let store = Store::open(StoreConfig {
        dir: dir.path().join("data"),
        ttl: std::time::Duration::from_secs(3600),
        max_batch: 64,
    })
    .unwrap();
    let now = std::time::SystemTime::now();
    for i in 0..clusters {
        let id = format!("cluster-{i:06}");
        let families = payload::families(&id, now_ms());
        store.put(&id, delimited::encode(&families), now).unwrap();
    }
    let ids: Vec<String> = store.clusters().into_iter().map(|e| e.cluster_id).collect();
    // FEDERATE_ROUNDS=N repeats each part N times (for profiling one part with perf).
    let rounds: usize = std::env::var("FEDERATE_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);

    let started = Instant::now();
    let mut payloads = Vec::new();
    for _ in 0..rounds {
        payloads = ids
            .iter()
            .map(|id| store.get(id).unwrap().unwrap().payload)
            .collect();
    }
    let read = started.elapsed().as_secs_f64() / rounds as f64;
    let pd_bytes: usize = payloads.iter().map(Vec::len).sum();
    let started = Instant::now();
    for _ in 0..rounds {
        for p in &payloads {
            std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, p));
        }
    }
    let sha = started.elapsed().as_secs_f64() / rounds as f64;
    println!(
        "SHA-256 of the payloads alone: {sha:.3}s ({:.0} MB/s)",
        pd_bytes as f64 / sha / 1e6
    );

    for format in [Format::Text, Format::ProtoDelimited] {
        let started = Instant::now();
        let mut out = Vec::new();
        let mut bytes = 0;
        for _ in 0..rounds {
            for p in &payloads {
                out.clear();
                federate::write_cluster(p, format, &mut out).unwrap();
                bytes += out.len();
            }
        }
        let secs = started.elapsed().as_secs_f64() / rounds as f64;
        println!(
            "transcode {format:?}: {:.2}M series/s ({:.0} MB/s out)",
            (clusters * 500) as f64 / secs / 1e6,
            bytes as f64 / rounds as f64 / secs / 1e6
        );
    }
    let started = Instant::now();
    let mut sink = Sink(0);
    for _ in 0..rounds {
        federate::write_all(&store, Format::Text, None, &mut sink).unwrap();
    }
    let all = started.elapsed().as_secs_f64() / rounds as f64;
    println!(
        "store.get: {:.3}s for {clusters} clusters ({:.0} MB/s of payload, {:.0} µs each)",
        read,
        pd_bytes as f64 / read / 1e6,
        read / clusters as f64 * 1e6
    );
    println!(
        "write_all (text, to a sink): {:.2}M series/s",
        (clusters * 500) as f64 / all / 1e6
    );
    store.close();
}
