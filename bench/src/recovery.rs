//! The store's recovery time: how long `Store::open` takes on a directory of 10,000 clusters'
//! files plus a full journal segment that was never checkpointed, as a server finds it after a
//! crash (or `kill -9`) under load.
//!
//! [`fill`] builds that directory with the real store: one upload per cluster (the benchmark's
//! 500 samples) and a close, which checkpoints every cluster's file; then, opened again, more
//! uploads of the same clusters until the journal segment is nearly full, and then the process
//! ends without closing the store (the caller exits at once), so nothing is checkpointed on the way
//! out. [`measure`] opens that directory in a fresh process and times the open.
//!
//! With `packed` clusters, the segment is filled instead with uploads of only that many clusters
//! journaled as they arrive from `telemeter-client` (snappy framed, packed records): ~8 KB a
//! record, so ~6× more records to replay, and the few clusters keep the packed payloads the index
//! finds in the segment under the journal's budget (64 MiB decompressed), past which it would
//! roll.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use telemeter_common::{delimited, snappy};
use telemeter_server::store::{Store, StoreConfig};

use crate::payload;
use crate::report::{cpu_seconds, Report};

/// The store's journal segment size (`SEGMENT_BYTES` in `server/src/store/journal.rs`).
const SEGMENT_BYTES: u64 = 256 << 20;

/// Filling stops once the current segment holds this much: the writers in flight then cannot
/// push it over [`SEGMENT_BYTES`] (which would roll it and have it checkpointed).
const FULL_BYTES: u64 = SEGMENT_BYTES - (8 << 20);

/// Concurrent writers while filling (group commits make it fast).
const WRITERS: usize = 32;

/// How long filling may take in all.
const FILL_LIMIT: Duration = Duration::from_secs(240);

/// What a store's directory holds.
#[derive(Default)]
struct Listing {
    /// Journal segments.
    segments: usize,
    /// Their bytes in all.
    journal_bytes: u64,
    /// The number of the newest (highest-numbered) segment.
    newest: u64,
    /// Its bytes.
    newest_bytes: u64,
    /// Every other entry but the lock file: cluster files, mostly.
    others: usize,
}

fn list(dir: &Path) -> Result<Listing, String> {
    let mut listing = Listing::default();
    let mut newest = None::<u64>;
    for entry in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        match name.strip_prefix("journal-") {
            Some(number) => {
                let len = entry.metadata().map_err(|e| e.to_string())?.len();
                listing.segments += 1;
                listing.journal_bytes += len;
                let number: u64 = number.parse().unwrap_or(0);
                if newest.is_none_or(|n| number > n) {
                    newest = Some(number);
                    listing.newest = number;
                    listing.newest_bytes = len;
                }
            }
            None if name == ".lock" => {}
            None => listing.others += 1,
        }
    }
    Ok(listing)
}

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        ttl: Duration::from_secs(3600),
        max_batch: 256,
    }
}

/// Puts uploads of clusters `0..clusters` (round robin) from [`WRITERS`] threads until `done`
/// says so (asked every 20 ms with the puts so far) or [`FILL_LIMIT`] passes; the puts made.
fn put_until(
    store: &Store,
    clusters: usize,
    packed: bool,
    started: Instant,
    mut done: impl FnMut(usize) -> Result<bool, String>,
) -> Result<usize, String> {
    let now_ms = payload::now_ms();
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(std::sync::Mutex::new(None::<String>));
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (store, next, stop, failed) =
                (store.clone(), next.clone(), stop.clone(), failed.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let cluster = payload::cluster_id(i % clusters.max(1));
                    let body = delimited::encode(&payload::families(&cluster, now_ms));
                    let put = match packed {
                        false => store.put(&cluster, body, SystemTime::now()),
                        true => {
                            let frames = snappy::encode_framed(&body);
                            store
                                .put_unless_older_packed(&cluster, body, frames, SystemTime::now())
                                .map(|_| ())
                        }
                    };
                    if let Err(e) = put {
                        *telemeter_common::sync::lock(&failed) = Some(e.to_string());
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let mut outcome = Ok(());
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(20));
        if started.elapsed() > FILL_LIMIT {
            outcome = Err(format!(
                "filling the store took too long ({} puts)",
                next.load(Ordering::Relaxed)
            ));
            break;
        }
        match done(next.load(Ordering::Relaxed)) {
            Ok(false) => {}
            Ok(true) => break,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let _ = writer.join();
    }
    if let Some(e) = telemeter_common::sync::lock(&failed).take() {
        return Err(format!("a put failed: {e}"));
    }
    outcome.map(|()| next.load(Ordering::Relaxed))
}

/// Builds the directory (see the module); returns one line of figures and the store, which the
/// caller must leave open and end the process right after. With `packed` (> 0) the segment holds
/// packed uploads of that many clusters.
pub fn fill(dir: &Path, clusters: usize, packed: usize) -> Result<(String, Store), String> {
    let started = Instant::now();
    // First every cluster once, then a close, which checkpoints them all: one file each.
    let store = Store::open(config(dir)).map_err(|e| e.to_string())?;
    let first = put_until(
        &store,
        clusters,
        false,
        started,
        |puts| Ok(puts >= clusters),
    )?;
    store.close();
    drop(store);
    // Then the same clusters again until the journal's segment is nearly full (not rolled).
    let store = Store::open(config(dir)).map_err(|e| e.to_string())?;
    let (clusters, packed) = match packed {
        0 => (clusters, false),
        n => (n.min(clusters), true),
    };
    let second = put_until(&store, clusters, packed, started, |_| {
        let listing = list(dir)?;
        if listing.segments > 1 {
            return Err("the journal segment rolled while filling".into());
        }
        Ok(listing.newest_bytes >= FULL_BYTES)
    })?;
    let stats = store.stats();
    let listing = list(dir)?;
    let mut report = Report::new();
    report
        .int("puts", (first + second) as u64)
        .int("clusters", stats.clusters)
        .int("journal_segments", listing.segments as u64)
        .int("journal_bytes", listing.journal_bytes)
        .float("seconds", started.elapsed().as_secs_f64(), 1);
    Ok((report.to_string(), store))
}

/// Opens the store in `dir` (filled by [`fill`] in another process) and reports how long that
/// took: wall time and this process's CPU time.
pub fn measure(dir: &Path) -> Result<String, String> {
    let listing = list(dir)?;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let store = Store::open(config(dir)).map_err(|e| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let clusters = store.stats().clusters;
    store.close();
    let mut report = Report::new();
    report
        .int("clusters", clusters)
        .int("cluster_files", listing.others as u64)
        .int("journal_segments", listing.segments as u64)
        .int("journal_bytes", listing.journal_bytes)
        .float("open_seconds", seconds, 3)
        .float("open_cpu_s", cpu, 3);
    Ok(report.to_string())
}
