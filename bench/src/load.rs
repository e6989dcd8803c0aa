//! The sender pool shared by the HTTP loads (our server and the Pushgateway): N threads, each with
//! one keep-alive connection, each looping over its own cluster ids (sender `s` of `N` owns clusters
//! `s`, `s + N`, `s + 2N`, …), for a fixed time or until every cluster was sent once.
//!
//! Every response that is not the expected status is counted by status and the first one kept,
//! so a failing run shows as failures, never as speed.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::http::{Connection, Request, Target};
use crate::latency::Latencies;
use crate::report::{cpu_seconds, Report};

/// Bodies are kept per sender only while all clusters' bodies fit in this many bytes in all;
/// beyond that each request is built when it is sent.
const CACHE_BUDGET: usize = 128 << 20;

/// How a load runs.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Sender threads.
    pub senders: usize,
    /// Distinct cluster ids over all senders.
    pub clusters: usize,
    /// Stop after this long.
    pub duration: Duration,
    /// Send each cluster exactly once, then stop (still bounded by `duration`).
    pub once: bool,
    /// Samples one request carries, for the samples/s figure.
    pub samples_per_request: usize,
    /// The status that counts as success.
    pub expected_status: u16,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// Builds the request for a cluster index; an error is counted as a failed request.
pub trait Workload: Sync {
    /// The request for cluster number `cluster`.
    fn request(&self, cluster: usize) -> Result<Request, String>;
    /// The size of one request body, to decide whether bodies can be kept.
    fn body_size_hint(&self) -> usize;
}

/// What one sender saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    statuses: BTreeMap<String, u64>,
    first_error: Option<String>,
    latencies: Latencies,
}

impl Tally {
    fn fail(&mut self, kind: String, detail: String) {
        *self.statuses.entry(kind).or_insert(0) += 1;
        if self.first_error.is_none() {
            self.first_error = Some(detail);
        }
    }
}

fn sender(
    index: usize,
    plan: &Plan,
    target: &Target,
    workload: &dyn Workload,
    start: &Barrier,
) -> Tally {
    // For `telemeter-allocs`, which runs the server in the same process.
    crate::alloc::mark_client_thread();
    let mine: Vec<usize> = (index..plan.clusters).step_by(plan.senders).collect();
    let cache_ok = plan.clusters.saturating_mul(workload.body_size_hint()) <= CACHE_BUDGET;
    let mut cache: Vec<Option<Request>> = vec![None; if cache_ok { mine.len() } else { 0 }];
    let mut tally = Tally {
        latencies: Latencies::with_capacity(64 * 1024),
        ..Tally::default()
    };
    let mut conn = Connection::new(target.clone(), plan.timeout);
    // Build every cached request before the clock starts: the load measures the server.
    if cache_ok {
        for (slot, &cluster) in cache.iter_mut().zip(&mine) {
            match workload.request(cluster) {
                Ok(r) => *slot = Some(r),
                Err(e) => tally.fail("build_error".into(), e),
            }
        }
    }
    start.wait();
    let started = Instant::now();
    if mine.is_empty() {
        return tally;
    }
    let mut i = 0usize;
    while started.elapsed() < plan.duration && !(plan.once && i >= mine.len()) {
        let slot = i % mine.len();
        i += 1;
        let built;
        let request = match cache.get(slot) {
            Some(Some(r)) => r,
            Some(None) => continue,
            None => match workload.request(mine[slot]) {
                Ok(r) => {
                    built = r;
                    &built
                }
                Err(e) => {
                    tally.fail("build_error".into(), e);
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match conn.send(request) {
            Ok(r) if r.status == plan.expected_status => {
                tally.latencies.record(sent.elapsed());
                tally.ok += 1;
            }
            Ok(r) => {
                let body = String::from_utf8_lossy(&r.body);
                let line = body.lines().next().unwrap_or("").to_string();
                tally.fail(
                    format!("status_{}", r.status),
                    format!("{} {}", r.status, line),
                );
            }
            Err(e) => {
                tally.fail("transport_error".into(), e.to_string());
                // A failed exchange leaves the connection unusable; the next send reopens it.
                conn = Connection::new(target.clone(), plan.timeout);
            }
        }
    }
    tally
}

/// Runs `plan` against `target` and reports uploads/s, samples/s, latency percentiles and failures.
pub fn run(plan: &Plan, target: &Target, workload: Arc<dyn Workload + Send>) -> Report {
    let senders = plan.senders.max(1);
    let plan = Arc::new(Plan {
        senders,
        ..plan.clone()
    });
    let start = Arc::new(Barrier::new(senders + 1));
    let handles: Vec<_> = (0..senders)
        .map(|index| {
            let (plan, target, workload, start) = (
                plan.clone(),
                target.clone(),
                workload.clone(),
                start.clone(),
            );
            thread::spawn(move || sender(index, &plan, &target, workload.as_ref(), &start))
        })
        .collect();
    start.wait();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut total = Tally::default();
    for handle in handles {
        match handle.join() {
            Ok(t) => {
                total.ok += t.ok;
                for (k, n) in t.statuses {
                    *total.statuses.entry(k).or_insert(0) += n;
                }
                if total.first_error.is_none() {
                    total.first_error = t.first_error;
                }
                total.latencies.merge(t.latencies);
            }
            Err(_) => total.fail("sender_panicked".into(), "a sender thread panicked".into()),
        }
    }
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    let cpu = cpu_seconds() - cpu_before;
    let failed: u64 = total.statuses.values().sum();
    let mut report = Report::new();
    report
        .int("senders", senders as u64)
        .int("clusters", plan.clusters as u64)
        .int("ok", total.ok)
        .int("failed", failed)
        .float("seconds", wall, 3)
        .float("uploads_per_s", total.ok as f64 / wall, 1)
        .float(
            "samples_per_s",
            (total.ok as f64 * plan.samples_per_request as f64) / wall,
            0,
        )
        .float(
            "p50_ms",
            total.latencies.quantile_ms(0.5).unwrap_or(f64::NAN),
            2,
        )
        .float(
            "p99_ms",
            total.latencies.quantile_ms(0.99).unwrap_or(f64::NAN),
            2,
        )
        .float("loadgen_cpu_s", cpu, 2);
    for (kind, n) in &total.statuses {
        report.int(kind, *n);
    }
    if let Some(e) = &total.first_error {
        report.word("first_error", e);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// Answers 200 for even cluster paths `/c/N` and 503 for odd ones, on keep-alive connections.
    fn serve() -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let odd = line
                            .split(' ')
                            .nth(1)
                            .and_then(|p| p.strip_prefix("/c/"))
                            .and_then(|n| n.parse::<usize>().ok())
                            .is_some_and(|n| n % 2 == 1);
                        let mut length = 0usize;
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            if h == "\r\n" {
                                break;
                            }
                            if let Some(v) = h.strip_prefix("Content-Length: ") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        let reply: &[u8] = if odd {
                            b"HTTP/1.1 503 Busy\r\nContent-Length: 9\r\n\r\nno owner\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                        };
                        if reader.get_mut().write_all(reply).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Target {
            authority: addr.to_string(),
            base_path: String::new(),
        }
    }

    struct Numbered;

    impl Workload for Numbered {
        fn request(&self, cluster: usize) -> Result<Request, String> {
            Ok(Request {
                method: "POST",
                path: format!("/c/{cluster}"),
                headers: vec![],
                body: vec![b'x'; 100],
            })
        }

        fn body_size_hint(&self) -> usize {
            100
        }
    }

    #[test]
    fn failures_are_counted_by_status_never_as_speed() {
        let plan = Plan {
            senders: 3,
            clusters: 10,
            duration: Duration::from_secs(30),
            once: true,
            samples_per_request: 500,
            expected_status: 200,
            timeout: Duration::from_secs(5),
        };
        let report = run(&plan, &serve(), Arc::new(Numbered));
        assert_eq!(report.get("ok"), Some("5"), "{report}");
        assert_eq!(report.get("failed"), Some("5"), "{report}");
        assert_eq!(report.get("status_503"), Some("5"), "{report}");
        assert_eq!(report.get("first_error"), Some("503_no_owner"), "{report}");
    }
}
