//! A quick throughput probe (not a benchmark harness): 32 senders pushing 500-series uploads for
//! distinct clusters for a few seconds. Run with
//! `cargo test -p telemeter-server --test bench -- --ignored --nocapture`
//! (`TELEMETER_SERVER_BIN=target/release/telemeter-server` to probe a release build).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use telemeter_common::delimited;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::snappy;

#[test]
#[ignore]
fn uploads_per_second() {
    let dir = TempDir::new("bench");
    let s = ServerProcess::setup(&dir).start();
    let senders = 32;
    let run = Duration::from_secs(10);
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..senders)
        .map(|i| {
            let token = s.upload_token("wild", &format!("bench-{i}"));
            let url = s.url("/upload");
            let (ok, failed) = (ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let auth = format!("Bearer {token}");
                // Encoded once: the probe measures the server, not the senders.
                let body =
                    snappy::encode_framed(&delimited::encode(&families(None, 499, now_ms())));
                while started.elapsed() < run {
                    let r = agent
                        .post(&url)
                        .header("Authorization", &auth)
                        .header("Content-Type", PROTO_DELIMITED)
                        .header("Content-Encoding", "snappy")
                        .send(&body[..]);
                    match r {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "{senders} senders, 500 series/upload: {ok} uploads in {secs:.1}s = {:.0} uploads/s ({} failed)",
        ok as f64 / secs,
        failed.load(Ordering::Relaxed)
    );
    let metrics = get(&s.url_internal("/metrics"), &[]).body;
    for line in metrics.lines().filter(|l| {
        l.starts_with("telemeter_server_store_write_seconds_sum")
            || l.starts_with("telemeter_server_store_write_seconds_count")
            || l.starts_with("telemeter_server_store_commits_total")
    }) {
        println!("{line}");
    }
    assert!(ok > 0);
}
