//! The naive durable-write ceiling of a disk: the same concurrency as an ingest run, each "upload"
//! written as the server stores one (temp file, write, fsync, rename over the cluster's file, fsync
//! the directory), with no HTTP, no decoding and no validation in the way.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use telemeter_common::delimited;

use crate::latency::Latencies;
use crate::payload;
use crate::report::{cpu_seconds, Report};

/// Why the ceiling could not be measured.
#[derive(Debug)]
pub enum DiskError {
    /// The directory could not be made or opened.
    Dir(PathBuf, io::Error),
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::Dir(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

impl std::error::Error for DiskError {}

/// How the ceiling is measured.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Where the files go (the same file system as the server's storage).
    pub dir: PathBuf,
    /// Writer threads.
    pub threads: usize,
    /// Writes in all (each thread stops after its share), bounded by `duration`.
    pub uploads: usize,
    /// Stop after this long even if `uploads` were not all written.
    pub duration: Duration,
    /// Distinct files (cluster ids); each is replaced over and over, as the server does.
    pub clusters: usize,
}

/// One durable replacement of `dir/name` with `bytes`.
fn write_durably(dir: &File, path: &Path, tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(tmp, path)?;
    dir.sync_all()
}

/// Runs the plan and reports writes/s, p50/p99 and failures.
pub fn run(plan: &Plan) -> Result<Report, DiskError> {
    fs::create_dir_all(&plan.dir).map_err(|e| DiskError::Dir(plan.dir.clone(), e))?;
    let threads = plan.threads.max(1);
    let clusters = plan.clusters.max(threads);
    let share = plan.uploads.div_ceil(threads);
    // The bytes the server would store for one upload: the families as protobuf-delimited.
    let stored = delimited::encode(&payload::families(
        &payload::cluster_id(0),
        payload::now_ms(),
    ));
    let stored = Arc::new(stored);
    let start = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let dir_file = File::open(&plan.dir).map_err(|e| DiskError::Dir(plan.dir.clone(), e))?;
        let (stored, start, dir, duration) = (
            stored.clone(),
            start.clone(),
            plan.dir.clone(),
            plan.duration,
        );
        let mine: Vec<PathBuf> = (t..clusters)
            .step_by(threads)
            .map(|c| dir.join(payload::cluster_id(c)))
            .collect();
        let tmp = dir.join(format!(".tmp-{t}"));
        handles.push(thread::spawn(move || {
            let mut latencies = Latencies::with_capacity(share);
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            start.wait();
            let started = Instant::now();
            for path in mine.iter().cycle().take(share) {
                if started.elapsed() >= duration {
                    break;
                }
                let t0 = Instant::now();
                match write_durably(&dir_file, path, &tmp, &stored) {
                    Ok(()) => latencies.record(t0.elapsed()),
                    Err(e) => *errors.entry(e.to_string()).or_insert(0) += 1,
                }
            }
            (latencies, errors)
        }));
    }
    start.wait();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut all = Latencies::default();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for h in handles {
        match h.join() {
            Ok((l, e)) => {
                all.merge(l);
                for (k, n) in e {
                    *errors.entry(k).or_insert(0) += n;
                }
            }
            Err(_) => *errors.entry("writer panicked".into()).or_insert(0) += 1,
        }
    }
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    let cpu = cpu_seconds() - cpu_before;
    let ok = all.len() as u64;
    let mut report = Report::new();
    report
        .int("threads", threads as u64)
        .int("bytes_per_write", stored.len() as u64)
        .int("ok", ok)
        .int("failed", errors.values().sum())
        .float("seconds", wall, 3)
        .float("uploads_per_s", ok as f64 / wall, 1)
        .float(
            "samples_per_s",
            ok as f64 * payload::SAMPLES_PER_UPLOAD as f64 / wall,
            0,
        )
        .float("p50_ms", all.quantile_ms(0.5).unwrap_or(f64::NAN), 2)
        .float("p99_ms", all.quantile_ms(0.99).unwrap_or(f64::NAN), 2)
        .float("cpu_s", cpu, 2);
    if let Some((e, _)) = errors.iter().next() {
        report.word("first_error", e);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_land_as_whole_files() {
        let dir = std::env::temp_dir().join(format!("telemeter-bench-disk-{}", std::process::id()));
        let report = run(&Plan {
            dir: dir.clone(),
            threads: 2,
            uploads: 8,
            duration: Duration::from_secs(30),
            clusters: 4,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.get("ok"), Some("8"));
        assert_eq!(report.get("failed"), Some("0"));
        let files: Vec<_> = fs::read_dir(&dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        // Four cluster files and the two writers' temp names renamed away.
        assert_eq!(files.len(), 4, "{files:?}");
        let _ = fs::remove_dir_all(&dir);
    }
}
