//! The durable store: one file per cluster, replaced atomically on every accepted upload.
//!
//! `DIR/<hex SHA-256 of the cluster id>` holds a small header (magic, format version, cluster id,
//! receive time, payload length, checksum) and the validated families as protobuf-delimited bytes.
//! A put is first made durable in a write-ahead journal (the `journal` module): a single committer
//! thread appends every pending upload to the current segment `DIR/journal-<n>` with one write and
//! one `fdatasync`, and only then wakes each caller (group commit). Reads find uploads in the
//! segment until a checkpoint (when a segment is full, and on close) writes each cluster's newest
//! upload to its file the durable way (`DIR/.tmp-…`, synced, renamed over the cluster's file, one
//! directory sync) and deletes the segment. On ext4 that is several times cheaper than syncing one
//! file per upload (figures in the `journal` module).
//!
//! The directory is locked (fs2) so a second server on it refuses to start. On open, temp files are
//! removed and files that fail their checksum are moved to `DIR/corrupt/` and never served.
//!
//! # The TTL counts from the newest sample
//!
//! As upstream meant it (it dropped samples older than now − TTL at read time): a cluster is
//! listed and served only while the newest sample timestamp of its upload is younger than the TTL,
//! whenever the upload arrived; the sweeper removes the others. A push of samples taken 20 minutes
//! ago is stored (they are within `--max-sample-age`) but never served with a 10 minute TTL. The
//! index keeps each cluster's newest sample time, read from the payload when it is put (one pass
//! over the series' fields, by the caller, not the committer), kept in the file header from
//! version 2, and read from the payload again when a journal record is replayed or a version 1
//! file is opened. A payload with no sample timestamp (validation accepts none such) counts from
//! its receive time.
//!
//! # File format (version 2)
//!
//! All integers little endian.
//!
//! | bytes        | field                                                          |
//! |--------------|----------------------------------------------------------------|
//! | 8            | magic `TLMSTORE`                                               |
//! | 2            | format version, u16 (2)                                        |
//! | 2            | cluster id length `n`, u16                                     |
//! | n            | cluster id, UTF-8                                              |
//! | 8            | receive time, u64 milliseconds since the Unix epoch            |
//! | 8            | newest sample timestamp, i64 milliseconds since the Unix epoch |
//! | 8            | payload length `p`, u64                                        |
//! | 32           | SHA-256 of every header byte above + the payload               |
//! | p            | payload: protobuf-delimited families                           |
//!
//! Version 1 (written before the TTL counted from samples) is the same without the newest sample
//! timestamp; it is still read, and rewritten as version 2 when its cluster is next written.
//!
//! A file is served only if the magic and a known version match, `p` is exactly what follows the header
//! (nothing is allocated from a declared length before that is checked against the file's size),
//! the checksum matches and the name is the hash of the id inside. Any other file is moved to
//! `DIR/corrupt/<name>.<unix seconds>` with a warning.
//!
//! # Layout of the directory
//!
//! - `.lock`: held (fs2 exclusive lock) for the store's lifetime.
//! - `<64 hex digits>`: one cluster's file.
//! - `journal-<n>`: a journal segment not yet checkpointed; replayed in order on open, then
//!   removed.
//! - `.tmp-<n>`: a checkpoint in progress; removed on open (its data is still in the journal).
//! - `corrupt/`: files set aside.
//!
//! Memory holds only the index (cluster id → receive time, payload size, where it is), never
//! payloads.
//!
//! # Durability
//!
//! A put is answered `Ok` only after its journal record is synced (and, for a new segment, the
//! directory holding it). A failed append answers every caller of the batch with the error and
//! the next batch starts a new segment (what follows the failed write is unknown); a record that
//! a crash cut short is ignored by the replay, as it was never answered Ok (a record written but
//! not answered may survive: the client retries, which is harmless). A removal is journaled too,
//! so a replay does not bring a removed cluster back. A failed checkpoint keeps its segment (and
//! every later one) for the next open to replay; reads keep using it meanwhile.

mod commit;
mod file;
mod journal;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use fs2::FileExt;
use telemeter_common::{sync as handoff, wire};

use commit::{JournalState, Mode, Request};
use file::ReadError;
use journal::Segment;

/// The lock file inside the storage directory.
const LOCK_FILE: &str = ".lock";
/// Where files that fail verification are moved.
const CORRUPT_DIR: &str = "corrupt";
/// Temp files start with this.
const TEMP_PREFIX: &str = ".tmp-";
/// The sweeper never runs more often than this, however short the TTL.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Nor less often than this.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// How the store runs.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The storage directory (created if missing).
    pub dir: PathBuf,
    /// A cluster whose newest sample is older than this is no longer served, and its file is
    /// removed.
    pub ttl: Duration,
    /// Most uploads one group commit takes.
    pub max_batch: usize,
}

/// Why the store could not open or write.
#[derive(Debug)]
pub enum StoreError {
    /// Another process holds the directory's lock.
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// A file system operation failed (disk full, read-only, permissions...).
    Io {
        /// What was being done, e.g. "writing /var/lib/telemeter/.tmp-1".
        context: String,
        /// The error.
        source: io::Error,
    },
    /// The committer thread has stopped (the store is shutting down).
    Closed,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Locked { dir } => write!(
                f,
                "{}: another telemeter-server is using this storage directory (it holds {}); \
                 stop it or choose another --storage-path",
                dir.display(),
                dir.join(LOCK_FILE).display()
            ),
            StoreError::Io { context, source } => write!(f, "{context}: {source}"),
            StoreError::Closed => write!(f, "the store is closed"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            StoreError::Locked { .. } | StoreError::Closed => None,
        }
    }
}

impl StoreError {
    fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

/// One cluster's stored upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredUpload {
    /// The cluster id.
    pub cluster_id: String,
    /// When the server accepted the upload.
    pub received: SystemTime,
    /// The validated families, protobuf-delimited.
    pub payload: Vec<u8>,
}

/// What the store knows of one cluster without reading its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterEntry {
    /// The cluster id.
    pub cluster_id: String,
    /// When the stored upload was accepted.
    pub received: SystemTime,
    /// The size of the payload in bytes.
    pub payload_bytes: u64,
}

/// Counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Clusters stored now.
    pub clusters: u64,
    /// Bytes of payload stored now.
    pub bytes: u64,
    /// Group commits done since start.
    pub commits: u64,
    /// Uploads written since start.
    pub writes: u64,
    /// Files moved aside as corrupt since start.
    pub corrupt_files: u64,
    /// Files removed by the sweeper since start.
    pub expired: u64,
}

/// The store. Cheap to clone; all clones share one directory and one committer.
#[derive(Clone)]
pub struct Store {
    handle: Arc<Handle>,
}

/// What the clones share. Dropping the last clone closes the store.
struct Handle {
    shared: Arc<Shared>,
    /// `None` once closed; the committer stops when every sender is gone.
    requests: Mutex<Option<Sender<Request>>>,
    /// Dropping it wakes and stops the sweeper.
    stop_sweeper: Mutex<Option<Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The state the committer, the sweeper and the callers share.
struct Shared {
    dir: PathBuf,
    ttl: Duration,
    /// The directory itself, for `syncfs` and the directory fsync.
    dir_file: File,
    /// Held only for its fs2 lock, released when the store is gone.
    _lock_file: File,
    /// Cluster id → what is on disk. Sorted, so listings are stable.
    index: Mutex<BTreeMap<String, Entry>>,
    /// Serializes changes to the directory's cluster files (rename, remove, set aside) with the
    /// index updates that follow them.
    mutation: Mutex<()>,
    /// Number of the next temp file.
    next_temp: AtomicU64,
    /// The journal's writing end. Lock order: `mutation`, then `journal`, then `index`.
    journal: Mutex<JournalState>,
    /// A segment this full is closed ([`journal::SEGMENT_BYTES`]; tests lower it).
    segment_bytes: AtomicU64,
    counters: Counters,
}

/// One indexed cluster.
#[derive(Clone, Debug)]
struct Entry {
    received_millis: u64,
    /// The TTL counts from this: the newest sample's timestamp (see [`newest_sample_ms`]).
    newest_sample_ms: i64,
    payload_bytes: u64,
    location: Location,
}

/// Where a cluster's newest upload is.
#[derive(Clone, Debug)]
enum Location {
    /// In its cluster file.
    File,
    /// In a journal segment, not yet checkpointed; `offset` is where its record's image starts.
    Journal { segment: Arc<Segment>, offset: u64 },
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    writes: AtomicU64,
    corrupt_files: AtomicU64,
    expired: AtomicU64,
}

/// A poisoned lock only means another thread panicked while holding it; the data it guards (an
/// index, or nothing) is still consistent enough to go on, and the store must not panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether an upload whose newest sample is stamped `newest_sample_ms` is still served at `now`.
fn is_live(newest_sample_ms: i64, now: SystemTime, ttl: Duration) -> bool {
    let now_ms = i64::try_from(file::to_millis(now)).unwrap_or(i64::MAX);
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    // A sample from the future (within the allowed skew, or the clock stepped back) is live.
    newest_sample_ms >= now_ms.saturating_sub(ttl_ms)
}

/// The time the TTL of `payload`, received at `received_millis`, counts from: its newest sample's
/// timestamp; its receive time when it has none or does not decode (then it is not served anyway).
fn newest_sample_ms(payload: &[u8], received_millis: u64) -> i64 {
    match wire::newest_timestamp(payload) {
        Ok(Some(newest)) => newest,
        Ok(None) | Err(_) => i64::try_from(received_millis).unwrap_or(i64::MAX),
    }
}

impl Store {
    /// Locks the directory, recovers it (temp files removed, corrupt files set aside), indexes the
    /// clusters it holds, and starts the committer and the TTL sweeper threads.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io(format!("creating directory {}", dir.display()), e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| StoreError::io(format!("opening {}", lock_path.display()), e))?;
        if let Err(error) = lock_file.try_lock_exclusive() {
            if error.raw_os_error() == fs2::lock_contended_error().raw_os_error() {
                return Err(StoreError::Locked { dir });
            }
            return Err(StoreError::io(
                format!("locking {}", lock_path.display()),
                error,
            ));
        }
        let dir_file = File::open(&dir)
            .map_err(|e| StoreError::io(format!("opening directory {}", dir.display()), e))?;

        let shared = Arc::new(Shared {
            dir,
            ttl: config.ttl,
            dir_file,
            _lock_file: lock_file,
            index: Mutex::new(BTreeMap::new()),
            mutation: Mutex::new(()),
            next_temp: AtomicU64::new(0),
            journal: Mutex::new(JournalState {
                segment: None,
                len: 0,
                broken: false,
                next_number: 0,
                retired: None,
            }),
            segment_bytes: AtomicU64::new(journal::SEGMENT_BYTES),
            counters: Counters::default(),
        });
        shared.recover()?;

        let (retire, retired) = crossbeam_channel::unbounded();
        lock(&shared.journal).retired = Some(retire);
        let checkpointer = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("store-checkpointer".to_string())
                .spawn(move || commit::checkpoint_until_closed(&shared, &retired))
                .map_err(|e| StoreError::io("starting the store's checkpointer thread", e))?
        };
        let (requests, queue) = crossbeam_channel::unbounded();
        let (stop_sweeper, stopped) = crossbeam_channel::bounded::<()>(0);
        let committer = {
            let shared_clone = Arc::clone(&shared);
            let max_batch = config.max_batch;
            let spawned = thread::Builder::new()
                .name("store-committer".to_string())
                .spawn(move || commit::run(shared_clone, queue, max_batch));
            match spawned {
                Ok(committer) => committer,
                Err(error) => {
                    lock(&shared.journal).retired = None;
                    let _ = checkpointer.join();
                    return Err(StoreError::io(
                        "starting the store's committer thread",
                        error,
                    ));
                }
            }
        };
        let sweeper = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("store-sweeper".to_string())
                .spawn(move || sweep_until_stopped(&shared, &stopped))
        };
        let sweeper = match sweeper {
            Ok(sweeper) => sweeper,
            Err(error) => {
                drop(requests);
                let _ = committer.join();
                let _ = checkpointer.join();
                return Err(StoreError::io("starting the store's sweeper thread", error));
            }
        };
        Ok(Store {
            handle: Arc::new(Handle {
                shared,
                requests: Mutex::new(Some(requests)),
                stop_sweeper: Mutex::new(Some(stop_sweeper)),
                // Joined in this order: the committer hands its last segment to the checkpointer.
                threads: Mutex::new(vec![committer, checkpointer, sweeper]),
            }),
        })
    }

    /// Stores `payload` as `cluster_id`'s upload received at `received`, replacing the previous one.
    /// Returns only once the data and the rename are durable on disk.
    pub fn put(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<(), StoreError> {
        self.submit(cluster_id, payload, received, Mode::Replace)
            .map(|_| ())
    }

    /// Like [`Store::put`], but keeps the stored upload when it is newer than `received` (used when
    /// ownership moves between servers). Returns whether `payload` was written.
    pub fn put_if_newer(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<bool, StoreError> {
        self.submit(cluster_id, payload, received, Mode::IfNewer)
    }

    /// Hands one upload to the committer and waits for its answer.
    fn submit(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
        mode: Mode,
    ) -> Result<bool, StoreError> {
        // Cloned so the lock is not held while waiting; a clone keeps the committer alive until
        // this request is queued, so a racing close() still commits it.
        let requests = lock(&self.handle.requests)
            .clone()
            .ok_or(StoreError::Closed)?;
        let (reply, answer) = handoff::oneshot();
        let received_millis = file::to_millis(received);
        // Read here, on the caller's thread, so the committer's batches do not wait for it.
        let newest_sample_ms = newest_sample_ms(&payload, received_millis);
        requests
            .send(Request {
                cluster_id: cluster_id.to_string(),
                payload,
                received_millis,
                newest_sample_ms,
                mode,
                reply,
            })
            .map_err(|_| StoreError::Closed)?;
        drop(requests);
        // The committer answers every request it takes; if it died instead, the reply sender is
        // dropped and this returns.
        answer.recv().ok_or(StoreError::Closed)?
    }

    /// The clusters served now (newest sample within the TTL), in a stable order (by cluster id).
    pub fn clusters(&self) -> Vec<ClusterEntry> {
        let shared = &self.handle.shared;
        let now = SystemTime::now();
        lock(&shared.index)
            .iter()
            .filter(|(_, entry)| is_live(entry.newest_sample_ms, now, shared.ttl))
            .map(|(cluster_id, entry)| ClusterEntry {
                cluster_id: cluster_id.clone(),
                received: file::from_millis(entry.received_millis),
                payload_bytes: entry.payload_bytes,
            })
            .collect()
    }

    /// Reads one cluster's upload, verifying its checksum. `Ok(None)` when it is absent, expired, or
    /// (after being moved aside) corrupt.
    pub fn get(&self, cluster_id: &str) -> Result<Option<StoredUpload>, StoreError> {
        self.handle.shared.get(cluster_id)
    }

    /// Removes a cluster's file (used when another server took ownership of it).
    pub fn remove(&self, cluster_id: &str) -> Result<(), StoreError> {
        self.handle.shared.remove(cluster_id)
    }

    /// Removes every cluster whose newest sample is older than `now - ttl`; returns how many.
    pub fn sweep(&self, now: SystemTime) -> usize {
        self.handle.shared.sweep(now)
    }

    /// The store's counters now.
    pub fn stats(&self) -> StoreStats {
        let shared = &self.handle.shared;
        let (clusters, bytes) = {
            let index = lock(&shared.index);
            let bytes = index.values().map(|entry| entry.payload_bytes).sum();
            (index.len() as u64, bytes)
        };
        let counters = &shared.counters;
        StoreStats {
            clusters,
            bytes,
            commits: counters.commits.load(Ordering::Relaxed),
            writes: counters.writes.load(Ordering::Relaxed),
            corrupt_files: counters.corrupt_files.load(Ordering::Relaxed),
            expired: counters.expired.load(Ordering::Relaxed),
        }
    }

    /// The storage directory.
    pub fn dir(&self) -> &Path {
        &self.handle.shared.dir
    }

    /// Stops the committer and the sweeper after the pending writes are done.
    pub fn close(&self) {
        self.handle.close();
    }
}

impl Handle {
    fn close(&self) {
        drop(lock(&self.requests).take());
        drop(lock(&self.stop_sweeper).take());
        let threads = std::mem::take(&mut *lock(&self.threads));
        for thread in threads {
            // Neither thread holds a Handle, so none of them can be the one closing it; the check
            // only guards against a deadlock should that ever change.
            if thread.thread().id() != thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.close();
    }
}

/// The sweeper thread's loop: sweep every min(ttl/4, 60 s) until the store closes.
fn sweep_until_stopped(shared: &Shared, stopped: &Receiver<()>) {
    let interval = (shared.ttl / 4).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL);
    loop {
        match stopped.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {
                shared.sweep(SystemTime::now());
            }
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Shared {
    fn path_of(&self, cluster_id: &str) -> PathBuf {
        self.dir.join(file::file_name(cluster_id))
    }

    /// Removes temp files, verifies every cluster file, sets aside the bad ones and indexes the rest.
    fn recover(&self) -> Result<(), StoreError> {
        let context = || format!("listing directory {}", self.dir.display());
        let entries = fs::read_dir(&self.dir).map_err(|e| StoreError::io(context(), e))?;
        let mut index = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(context(), e))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                log::warn!("{}: unexpected file in the store, ignored", path.display());
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                // A write that never completed, and so was never answered Ok.
                fs::remove_file(&path)
                    .map_err(|e| StoreError::io(format!("removing {}", path.display()), e))?;
                continue;
            }
            if name == LOCK_FILE || name == CORRUPT_DIR || journal::is_segment_name(&name) {
                continue;
            }
            if !file::is_cluster_file_name(&name) {
                log::warn!("{}: unexpected file in the store, ignored", path.display());
                continue;
            }
            match file::read(&path, false) {
                Ok((header, payload)) if file::file_name(&header.cluster_id) == name => {
                    // Version 1 files do not record it: they hand their payload out instead.
                    let newest_sample_ms = header.newest_sample_ms.unwrap_or_else(|| {
                        newest_sample_ms(
                            payload.as_deref().unwrap_or_default(),
                            header.received_millis,
                        )
                    });
                    index.insert(
                        header.cluster_id,
                        Entry {
                            received_millis: header.received_millis,
                            newest_sample_ms,
                            payload_bytes: header.payload_len,
                            location: Location::File,
                        },
                    );
                }
                Ok((header, _)) => self.set_aside(
                    &name,
                    &format!(
                        "holds cluster {:?}, whose file has another name",
                        header.cluster_id
                    ),
                ),
                Err(ReadError::Corrupt(reason)) => self.set_aside(&name, &reason),
                Err(ReadError::Io(error)) => {
                    return Err(StoreError::io(format!("reading {}", path.display()), error))
                }
            }
        }
        *lock(&self.index) = index;
        self.replay_journal()
    }

    /// Applies the journal's segments, in order, to the cluster files, syncs them and deletes the
    /// segments. Every acknowledged upload not yet checkpointed is in a segment.
    fn replay_journal(&self) -> Result<(), StoreError> {
        let numbers = journal::list(&self.dir)
            .map_err(|e| StoreError::io(format!("listing directory {}", self.dir.display()), e))?;
        let Some(&last) = numbers.last() else {
            return Ok(());
        };
        let mut applied = 0u64;
        for &number in &numbers {
            let path = self.dir.join(format!("{}{number}", journal::PREFIX));
            let torn = journal::replay(&path, |record| {
                applied += 1;
                self.apply(record)
            })
            .map_err(|e| StoreError::io(format!("replaying {}", path.display()), e))?;
            if let Some((bytes, reason)) = torn {
                // An append a crash cut off; it was never answered Ok.
                log::info!(
                    "{}: the last {bytes} bytes are no whole record ({reason}); ignored",
                    path.display()
                );
            }
        }
        // Durable before the segments go: a crash now replays them again, which is harmless.
        if !sync_file_system(self) {
            for entry in lock(&self.index).keys() {
                let path = self.path_of(entry);
                if let Ok(file) = File::open(&path) {
                    file.sync_data()
                        .map_err(|e| StoreError::io(format!("syncing {}", path.display()), e))?;
                }
            }
        }
        let sync_dir = |what: &str| {
            self.dir_file.sync_all().map_err(|e| {
                StoreError::io(
                    format!("syncing directory {} ({what})", self.dir.display()),
                    e,
                )
            })
        };
        sync_dir("after replaying the journal")?;
        for number in &numbers {
            let path = self.dir.join(format!("{}{number}", journal::PREFIX));
            fs::remove_file(&path)
                .map_err(|e| StoreError::io(format!("removing {}", path.display()), e))?;
        }
        sync_dir("after removing the journal")?;
        lock(&self.journal).next_number = last + 1;
        log::info!(
            "replayed {applied} journal records from {} segment(s)",
            numbers.len()
        );
        Ok(())
    }

    /// Applies one replayed journal record to the directory and the index.
    fn apply(&self, record: journal::Record) -> io::Result<()> {
        let cluster_id = record.header.cluster_id;
        let target = self.path_of(&cluster_id);
        if record.kind == journal::REMOVE {
            match fs::remove_file(&target) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
            lock(&self.index).remove(&cluster_id);
            return Ok(());
        }
        let temp = self.dir.join(format!(
            "{TEMP_PREFIX}{}",
            self.next_temp.fetch_add(1, Ordering::Relaxed)
        ));
        let newest_sample_ms = newest_sample_ms(&record.payload, record.header.received_millis);
        let header = file::encode_header(
            &cluster_id,
            record.header.received_millis,
            newest_sample_ms,
            &record.payload,
        )
        .map_err(|reason| io::Error::new(io::ErrorKind::InvalidData, reason))?;
        let mut out = File::options().write(true).create_new(true).open(&temp)?;
        out.write_all(&header)?;
        out.write_all(&record.payload)?;
        drop(out);
        fs::rename(&temp, &target)?;
        lock(&self.index).insert(
            cluster_id,
            Entry {
                received_millis: record.header.received_millis,
                newest_sample_ms,
                payload_bytes: record.payload.len() as u64,
                location: Location::File,
            },
        );
        Ok(())
    }

    /// Moves a damaged file to `corrupt/` so it is never served again, but kept for inspection.
    fn set_aside(&self, name: &str, reason: &str) {
        let path = self.dir.join(name);
        let corrupt = self.dir.join(CORRUPT_DIR);
        let seconds = file::to_millis(SystemTime::now()) / 1000;
        let mut target = corrupt.join(format!("{name}.{seconds}"));
        let mut n = 1;
        while target.exists() {
            target = corrupt.join(format!("{name}.{seconds}.{n}"));
            n += 1;
        }
        let moved = fs::create_dir_all(&corrupt).and_then(|()| fs::rename(&path, &target));
        self.counters.corrupt_files.fetch_add(1, Ordering::Relaxed);
        match moved {
            Ok(()) => log::warn!(
                "{} {reason}; moved to {} and no longer served",
                path.display(),
                target.display()
            ),
            Err(error) => log::warn!(
                "{} {reason}; not served, and could not be moved to {}: {error}",
                path.display(),
                target.display()
            ),
        }
    }

    fn get(&self, cluster_id: &str) -> Result<Option<StoredUpload>, StoreError> {
        let Some(entry) = lock(&self.index).get(cluster_id).cloned() else {
            return Ok(None);
        };
        if !is_live(entry.newest_sample_ms, SystemTime::now(), self.ttl) {
            return Ok(None);
        }
        if let Location::Journal { segment, offset } = &entry.location {
            let context = || format!("reading {} at {offset}", segment.path.display());
            return match segment.read_put(cluster_id, *offset, entry.payload_bytes) {
                Ok((header, payload)) if header.cluster_id == cluster_id => {
                    Ok(Some(StoredUpload {
                        cluster_id: header.cluster_id,
                        received: file::from_millis(header.received_millis),
                        payload,
                    }))
                }
                Ok((header, _)) => Err(StoreError::io(
                    context(),
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("holds cluster {:?}", header.cluster_id),
                    ),
                )),
                Err(ReadError::Corrupt(reason)) => Err(StoreError::io(
                    context(),
                    io::Error::new(io::ErrorKind::InvalidData, reason),
                )),
                Err(ReadError::Io(error)) => Err(StoreError::io(context(), error)),
            };
        }
        let path = self.path_of(cluster_id);
        match self.read_upload(cluster_id, &path) {
            Ok(upload) => Ok(Some(upload)),
            Err(ReadError::Io(error)) if error.kind() == io::ErrorKind::NotFound => {
                // Removed or swept since the index was read.
                Ok(None)
            }
            Err(ReadError::Io(error)) => {
                Err(StoreError::io(format!("reading {}", path.display()), error))
            }
            Err(ReadError::Corrupt(_)) => {
                // Read again under the mutation lock: the committer may have replaced the file
                // in between, and a good new file must not be set aside.
                let _mutation = lock(&self.mutation);
                match self.read_upload(cluster_id, &path) {
                    Ok(upload) => Ok(Some(upload)),
                    Err(ReadError::Io(error)) if error.kind() == io::ErrorKind::NotFound => {
                        Ok(None)
                    }
                    Err(ReadError::Io(error)) => {
                        Err(StoreError::io(format!("reading {}", path.display()), error))
                    }
                    Err(ReadError::Corrupt(reason)) => {
                        lock(&self.index).remove(cluster_id);
                        self.set_aside(&file::file_name(cluster_id), &reason);
                        Ok(None)
                    }
                }
            }
        }
    }

    /// Reads and verifies `cluster_id`'s file.
    fn read_upload(&self, cluster_id: &str, path: &Path) -> Result<StoredUpload, ReadError> {
        let (header, payload) = file::read(path, true)?;
        if header.cluster_id != cluster_id {
            return Err(ReadError::Corrupt(format!(
                "holds cluster {:?}, whose file has another name",
                header.cluster_id
            )));
        }
        Ok(StoredUpload {
            cluster_id: header.cluster_id,
            received: file::from_millis(header.received_millis),
            payload: payload.unwrap_or_default(),
        })
    }

    fn remove(&self, cluster_id: &str) -> Result<(), StoreError> {
        let path = self.path_of(cluster_id);
        let _mutation = lock(&self.mutation);
        // A removal record first, or a replay of the journal could bring the cluster back.
        let mut record = Vec::new();
        journal::encode(journal::REMOVE, cluster_id, 0, b"", &mut record).map_err(|reason| {
            StoreError::io(
                format!("removing cluster {cluster_id:?}"),
                io::Error::new(io::ErrorKind::InvalidInput, reason),
            )
        })?;
        self.append(&record, |_, _| {
            lock(&self.index).remove(cluster_id);
        })?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(StoreError::io(
                    format!("removing {}", path.display()),
                    error,
                ))
            }
        }
        lock(&self.index).remove(cluster_id);
        // Otherwise a crash could bring the file back, and this server would serve a cluster
        // another server now owns.
        self.dir_file
            .sync_all()
            .map_err(|e| StoreError::io(format!("syncing directory {}", self.dir.display()), e))
    }

    fn sweep(&self, now: SystemTime) -> usize {
        let _mutation = lock(&self.mutation);
        let expired: Vec<String> = lock(&self.index)
            .iter()
            .filter(|(_, entry)| !is_live(entry.newest_sample_ms, now, self.ttl))
            .map(|(cluster_id, _)| cluster_id.clone())
            .collect();
        let mut removed = 0;
        for cluster_id in expired {
            let path = self.path_of(&cluster_id);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    // Still hidden by the TTL; the next sweep tries again.
                    log::warn!("removing expired {}: {error}", path.display());
                    continue;
                }
            }
            // A put since the listing (the committer does not take the mutation lock) made the
            // cluster live again: its upload is in the journal, and its entry must stay.
            let mut index = lock(&self.index);
            if index
                .get(&cluster_id)
                .is_some_and(|entry| is_live(entry.newest_sample_ms, now, self.ttl))
            {
                continue;
            }
            index.remove(&cluster_id);
            removed += 1;
        }
        // No directory sync: a file that comes back after a crash is still expired and is swept
        // again.
        self.counters
            .expired
            .fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }
}

/// Flushes the whole file system holding the directory; false when that failed or is unavailable.
#[cfg(target_os = "linux")]
fn sync_file_system(shared: &Shared) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: syncfs only reads the descriptor, which `shared.dir_file` keeps open.
    let status = unsafe { libc::syncfs(shared.dir_file.as_raw_fd()) };
    if status != 0 {
        log::warn!(
            "syncfs on {} failed ({}); syncing each file instead",
            shared.dir.display(),
            io::Error::last_os_error()
        );
    }
    status == 0
}

#[cfg(not(target_os = "linux"))]
fn sync_file_system(_shared: &Shared) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A fresh directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("telemeter-store-{}-{name}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn config(dir: &TempDir) -> StoreConfig {
        StoreConfig {
            dir: dir.0.clone(),
            ttl: Duration::from_secs(3600),
            max_batch: 64,
        }
    }

    fn open(dir: &TempDir) -> Store {
        Store::open(config(dir)).unwrap()
    }

    /// A receive time the file format keeps exactly (whole milliseconds), near now.
    fn at(offset_ms: i64) -> SystemTime {
        let now = file::to_millis(SystemTime::now()) as i64;
        file::from_millis((now + offset_ms) as u64)
    }

    fn file_of(store: &Store, cluster_id: &str) -> PathBuf {
        store.dir().join(file::file_name(cluster_id))
    }

    /// Checkpoints the current journal segment now, as a full one would be.
    fn checkpoint_now(store: &Store) {
        let shared = &store.handle.shared;
        let segment = lock(&shared.journal).segment.take();
        if let Some(segment) = segment {
            assert!(commit::checkpoint(shared, &segment, false));
        }
    }

    /// Every record in the journal's segments, read straight from disk: (kind, cluster, payload).
    fn journal_records(dir: &Path) -> Vec<(u8, String, Vec<u8>)> {
        let mut records = Vec::new();
        for number in journal::list(dir).unwrap() {
            let torn = journal::replay(&dir.join(format!("{}{number}", journal::PREFIX)), |r| {
                records.push((r.kind, r.header.cluster_id, r.payload));
                Ok(())
            })
            .unwrap();
            assert!(torn.is_none());
        }
        records
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn put_then_get_round_trips() {
        let dir = TempDir::new("roundtrip");
        let store = open(&dir);
        let received = at(0);
        store
            .put("cluster-a", b"payload-a".to_vec(), received)
            .unwrap();

        let upload = store.get("cluster-a").unwrap().unwrap();
        assert_eq!(
            upload,
            StoredUpload {
                cluster_id: "cluster-a".to_string(),
                received,
                payload: b"payload-a".to_vec(),
            }
        );
        assert_eq!(store.get("cluster-b").unwrap(), None);
        assert_eq!(
            store.clusters(),
            vec![ClusterEntry {
                cluster_id: "cluster-a".to_string(),
                received,
                payload_bytes: 9,
            }]
        );
        let stats = store.stats();
        assert_eq!(
            (stats.clusters, stats.bytes, stats.writes, stats.commits),
            (1, 9, 1, 1)
        );
    }

    #[test]
    fn put_replaces_the_previous_upload() {
        let dir = TempDir::new("replace");
        let store = open(&dir);
        store.put("c", b"first".to_vec(), at(-10)).unwrap();
        store.put("c", b"second, longer".to_vec(), at(0)).unwrap();
        let upload = store.get("c").unwrap().unwrap();
        assert_eq!(upload.payload, b"second, longer");
        assert_eq!(store.stats().bytes, 14);
        assert_eq!(store.clusters().len(), 1);
        checkpoint_now(&store);
        assert_eq!(store.get("c").unwrap().unwrap().payload, b"second, longer");
        // One cluster file and the lock: the old file was replaced, no temp file or segment left.
        assert_eq!(
            names_in(store.dir()),
            vec![".lock".to_string(), file::file_name("c")]
        );
    }

    #[test]
    fn put_returns_only_after_the_file_holds_the_new_content() {
        let dir = TempDir::new("durable");
        let store = open(&dir);
        for round in 0..5u8 {
            let payload = vec![round; 1000 + usize::from(round)];
            store.put("c", payload.clone(), at(0)).unwrap();
            // Read straight from disk, bypassing the store: the journal holds it...
            let records = journal_records(store.dir());
            assert_eq!(
                records.last().unwrap(),
                &(journal::PUT, "c".to_string(), payload.clone())
            );
            // ...and after a checkpoint, the cluster file.
            if round % 2 == 1 {
                checkpoint_now(&store);
                let (header, on_disk) = file::read(&file_of(&store, "c"), true).unwrap();
                assert_eq!(header.cluster_id, "c");
                assert_eq!(on_disk.unwrap(), payload);
            }
        }
    }

    #[test]
    fn acknowledged_uploads_in_the_journal_are_replayed_on_open() {
        let dir = TempDir::new("replay");
        let d_received = at(0);
        {
            let store = open(&dir);
            store.put("a", b"a-first".to_vec(), at(-30)).unwrap();
            store.put("b", b"b-only".to_vec(), at(-20)).unwrap();
            checkpoint_now(&store);
            store.put("a", b"a-second".to_vec(), at(-10)).unwrap();
            store.put("c", b"c-gone".to_vec(), at(-10)).unwrap();
            store.remove("c").unwrap();
            store
                .put("d", b"d-journal-only".to_vec(), d_received)
                .unwrap();
            // A crash: nothing checkpoints the segment (taken away from the closing store), which
            // ends in a record cut short.
            let shared = &store.handle.shared;
            let segment = lock(&shared.journal).segment.take().unwrap();
            let len = segment.file.metadata().unwrap().len();
            std::os::unix::fs::FileExt::write_all_at(
                &segment.file,
                &[journal::PUT, b'T', b'L', b'M'],
                len,
            )
            .unwrap();
            drop(store);
            assert!(dir
                .0
                .join(format!("{}{}", journal::PREFIX, segment.number))
                .exists());
        }
        let store = open(&dir);
        assert_eq!(store.get("a").unwrap().unwrap().payload, b"a-second");
        assert_eq!(store.get("b").unwrap().unwrap().payload, b"b-only");
        assert_eq!(store.get("c").unwrap(), None);
        let d = store.get("d").unwrap().unwrap();
        assert_eq!(
            (d.payload, d.received),
            (b"d-journal-only".to_vec(), d_received)
        );
        // Replayed into cluster files, and the segments are gone.
        let mut expected = vec![".lock".to_string()];
        expected.extend(["a", "b", "d"].map(file::file_name));
        expected.sort();
        assert_eq!(names_in(store.dir()), expected);
        let (_, on_disk) = file::read(&file_of(&store, "a"), true).unwrap();
        assert_eq!(on_disk.unwrap(), b"a-second");
    }

    #[test]
    fn full_segments_are_checkpointed_and_reads_follow() {
        let dir = TempDir::new("segments");
        let store = open(&dir);
        // Every commit starts a new segment and retires the previous one.
        store
            .handle
            .shared
            .segment_bytes
            .store(1, Ordering::Relaxed);
        for round in 0..20u8 {
            for id in ["x", "y"] {
                store.put(id, vec![round; 100], at(0)).unwrap();
                assert_eq!(store.get(id).unwrap().unwrap().payload, vec![round; 100]);
            }
        }
        drop(store);
        // A clean close checkpoints everything: only cluster files remain.
        let mut expected = vec![".lock".to_string()];
        expected.extend(["x", "y"].map(file::file_name));
        expected.sort();
        assert_eq!(names_in(&dir.0), expected);
        let store = open(&dir);
        assert_eq!(store.get("y").unwrap().unwrap().payload, vec![19u8; 100]);
    }

    #[test]
    fn concurrent_puts_are_all_stored_and_share_commits() {
        let dir = TempDir::new("concurrent");
        let store = open(&dir);
        const THREADS: usize = 64;
        const ROUNDS: usize = 10;
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                thread::spawn(move || {
                    for round in 0..ROUNDS {
                        let own = format!("own-{t}");
                        store
                            .put(&own, format!("{t}/{round}").into_bytes(), at(0))
                            .unwrap();
                        // Shared ids: several threads replace the same cluster.
                        let shared = format!("shared-{}", t % 4);
                        let received = at(round as i64);
                        store
                            .put(&shared, format!("{t}/{round}").into_bytes(), received)
                            .unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }

        for t in 0..THREADS {
            let upload = store.get(&format!("own-{t}")).unwrap().unwrap();
            assert_eq!(upload.payload, format!("{t}/{}", ROUNDS - 1).into_bytes());
        }
        for s in 0..4 {
            let upload = store.get(&format!("shared-{s}")).unwrap().unwrap();
            let text = String::from_utf8(upload.payload).unwrap();
            let (t, round) = text.split_once('/').unwrap();
            assert_eq!(t.parse::<usize>().unwrap() % 4, s);
            assert!(round.parse::<usize>().unwrap() < ROUNDS);
        }
        let stats = store.stats();
        assert_eq!(stats.clusters, THREADS as u64 + 4);
        assert_eq!(stats.writes, (THREADS * ROUNDS * 2) as u64);
        assert!(
            stats.commits < stats.writes,
            "no group commit: {} commits for {} writes",
            stats.commits,
            stats.writes
        );
        assert!(!names_in(store.dir())
            .iter()
            .any(|n| n.starts_with(TEMP_PREFIX)));
    }

    #[test]
    fn uploads_answered_ok_are_served_after_reopening() {
        let dir = TempDir::new("reopen");
        let received = at(-5);
        {
            let store = open(&dir);
            let clone = store.clone();
            for i in 0..20 {
                clone
                    .put(&format!("c{i}"), vec![i as u8; 100 + i], received)
                    .unwrap();
            }
            // Dropping every clone closes the store and releases the lock (else reopening fails).
        }
        let store = open(&dir);
        assert_eq!(store.clusters().len(), 20);
        for i in 0..20 {
            let upload = store.get(&format!("c{i}")).unwrap().unwrap();
            assert_eq!(upload.payload, vec![i as u8; 100 + i]);
            assert_eq!(upload.received, received);
        }
        assert_eq!(
            store.stats().bytes,
            (0..20).map(|i| 100 + i as u64).sum::<u64>()
        );
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused() {
        let dir = TempDir::new("locked");
        let first = open(&dir);
        match Store::open(config(&dir)) {
            Err(error @ StoreError::Locked { .. }) => {
                assert!(
                    error.to_string().contains("another telemeter-server"),
                    "{error}"
                );
            }
            Err(other) => panic!("expected Locked, got {other}"),
            Ok(_) => panic!("a second store opened a locked directory"),
        }
        drop(first);
        open(&dir);
    }

    #[test]
    fn open_removes_leftover_temp_files() {
        let dir = TempDir::new("leftover");
        fs::create_dir_all(&dir.0).unwrap();
        fs::write(dir.0.join(".tmp-7"), b"half a write").unwrap();
        fs::write(dir.0.join(".tmp-junk"), b"").unwrap();
        let store = open(&dir);
        assert_eq!(names_in(store.dir()), vec![".lock".to_string()]);
        assert!(store.clusters().is_empty());
    }

    /// Where the payload-length field of `cluster_id`'s file is.
    fn payload_len_offset(cluster_id: &str) -> usize {
        (file::PREFIX_LEN + file::NEWEST_LEN) as usize + cluster_id.len() + 8
    }

    fn corrupt_names(dir: &Path) -> Vec<String> {
        names_in(&dir.join(CORRUPT_DIR))
    }

    #[test]
    fn corrupt_files_are_set_aside_on_open_and_never_served() {
        let dir = TempDir::new("corrupt");
        {
            let store = open(&dir);
            for id in ["flipped", "truncated", "magic", "huge", "good", "renamed"] {
                store.put(id, vec![7u8; 300], at(0)).unwrap();
            }
            store.close();
        }
        let path = |id: &str| dir.0.join(file::file_name(id));

        let mut bytes = fs::read(path("flipped")).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(path("flipped"), &bytes).unwrap();

        let bytes = fs::read(path("truncated")).unwrap();
        fs::write(path("truncated"), &bytes[..bytes.len() - 10]).unwrap();

        let mut bytes = fs::read(path("magic")).unwrap();
        bytes[..8].copy_from_slice(b"NOTSTORE");
        fs::write(path("magic"), &bytes).unwrap();

        let mut bytes = fs::read(path("huge")).unwrap();
        let at_len = payload_len_offset("huge");
        bytes[at_len..at_len + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        fs::write(path("huge"), &bytes).unwrap();

        // A valid file under the wrong name.
        fs::rename(path("renamed"), dir.0.join(file::file_name("elsewhere"))).unwrap();

        let store = open(&dir);
        for id in [
            "flipped",
            "truncated",
            "magic",
            "huge",
            "elsewhere",
            "renamed",
        ] {
            assert_eq!(store.get(id).unwrap(), None, "{id} was served");
        }
        assert_eq!(store.get("good").unwrap().unwrap().payload, vec![7u8; 300]);
        let listed: Vec<String> = store.clusters().into_iter().map(|c| c.cluster_id).collect();
        assert_eq!(listed, vec!["good".to_string()]);
        assert_eq!(store.stats().corrupt_files, 5);
        let set_aside = corrupt_names(store.dir());
        assert_eq!(set_aside.len(), 5);
        for id in ["flipped", "truncated", "magic", "huge", "elsewhere"] {
            let prefix = format!("{}.", file::file_name(id));
            assert!(
                set_aside.iter().any(|n| n.starts_with(&prefix)),
                "{id} not in corrupt/"
            );
            assert!(!path(id).exists());
        }
    }

    #[test]
    fn a_file_damaged_while_running_is_set_aside_on_read() {
        let dir = TempDir::new("damaged");
        let store = open(&dir);
        store.put("a", b"aaaa".to_vec(), at(0)).unwrap();
        store.put("b", b"bbbb".to_vec(), at(0)).unwrap();
        checkpoint_now(&store);
        let path = file_of(&store, "a");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).unwrap();

        assert_eq!(store.get("a").unwrap(), None);
        assert_eq!(store.get("b").unwrap().unwrap().payload, b"bbbb");
        assert_eq!(store.clusters().len(), 1);
        assert_eq!(store.stats().corrupt_files, 1);
        assert_eq!(corrupt_names(store.dir()).len(), 1);
        // The cluster can be written again afterwards.
        store.put("a", b"again".to_vec(), at(0)).unwrap();
        assert_eq!(store.get("a").unwrap().unwrap().payload, b"again");
    }

    #[test]
    fn expired_clusters_are_hidden_then_swept() {
        let dir = TempDir::new("ttl");
        let store = open(&dir);
        store
            .put("old", b"old".to_vec(), at(-2 * 3600 * 1000))
            .unwrap();
        store.put("fresh", b"fresh".to_vec(), at(0)).unwrap();
        checkpoint_now(&store);

        let listed: Vec<String> = store.clusters().into_iter().map(|c| c.cluster_id).collect();
        assert_eq!(listed, vec!["fresh".to_string()]);
        assert_eq!(store.get("old").unwrap(), None);
        assert!(file_of(&store, "old").exists());

        assert_eq!(store.sweep(SystemTime::now()), 1);
        assert!(!file_of(&store, "old").exists());
        assert!(file_of(&store, "fresh").exists());
        let stats = store.stats();
        assert_eq!((stats.clusters, stats.expired), (1, 1));
        // Later, the fresh one expires too.
        assert_eq!(
            store.sweep(SystemTime::now() + Duration::from_secs(7200)),
            1
        );
        assert!(store.clusters().is_empty());
    }

    /// A payload of one gauge series stamped `ms_ago` milliseconds before now.
    fn sampled(ms_ago: i64) -> Vec<u8> {
        use telemeter_common::model::{Gauge, Metric, MetricFamily, MetricType};
        let now = file::to_millis(SystemTime::now()) as i64;
        telemeter_common::delimited::encode(&[MetricFamily {
            name: Some("up".into()),
            help: None,
            r#type: Some(MetricType::Gauge as i32),
            metric: vec![Metric {
                gauge: Some(Gauge { value: Some(1.0) }),
                timestamp_ms: Some(now - ms_ago),
                ..Default::default()
            }],
        }])
    }

    fn listed(store: &Store) -> Vec<String> {
        store.clusters().into_iter().map(|c| c.cluster_id).collect()
    }

    #[test]
    fn the_ttl_counts_from_the_newest_sample_not_the_receive_time() {
        let dir = TempDir::new("ttl-samples");
        // A 10 minute TTL; everything received just now.
        let ttl = Duration::from_secs(600);
        let store = Store::open(StoreConfig {
            ttl,
            ..config(&dir)
        })
        .unwrap();
        let minute = 60_000;
        store.put("stale", sampled(20 * minute), at(0)).unwrap();
        store.put("fresh", sampled(9 * minute), at(0)).unwrap();
        // Samples in the future (within the skew validation allows) are fresh.
        store.put("ahead", sampled(-4 * minute), at(0)).unwrap();
        assert_eq!(listed(&store), ["ahead", "fresh"]);
        assert_eq!(store.get("stale").unwrap(), None);
        assert!(store.get("fresh").unwrap().is_some());
        // The sweeper removes the stale one now, the fresh one a minute later (9 + 1 = 10).
        assert_eq!(store.sweep(SystemTime::now()), 1);
        assert!(!file_of(&store, "stale").exists());
        assert_eq!(store.sweep(SystemTime::now() + Duration::from_secs(50)), 0);
        assert_eq!(store.sweep(SystemTime::now() + Duration::from_secs(70)), 1);
        assert_eq!(listed(&store), ["ahead"]);
        // A later upload of older samples replaces a fresh one, and is not served: as upstream,
        // which kept the latest upload and dropped its old samples at read time.
        store.put("ahead", sampled(11 * minute), at(0)).unwrap();
        assert!(listed(&store).is_empty());
    }

    #[test]
    fn the_newest_sample_survives_a_checkpoint_a_replay_and_a_restart() {
        let dir = TempDir::new("ttl-restart");
        let ttl = Duration::from_secs(600);
        let minute = 60_000;
        {
            let store = Store::open(StoreConfig {
                ttl,
                ..config(&dir)
            })
            .unwrap();
            // In a cluster file (checkpointed), and left in the journal (replayed at the next open).
            store
                .put("stale-file", sampled(20 * minute), at(0))
                .unwrap();
            store.put("fresh-file", sampled(minute), at(0)).unwrap();
            checkpoint_now(&store);
            store
                .put("stale-journal", sampled(20 * minute), at(0))
                .unwrap();
            store.put("fresh-journal", sampled(minute), at(0)).unwrap();
            // A crash: nothing checkpoints the segment (taken away from the closing store).
            let segment = lock(&store.handle.shared.journal).segment.take().unwrap();
            drop(store);
            assert!(segment.path.exists());
        }
        let store = Store::open(StoreConfig {
            ttl,
            ..config(&dir)
        })
        .unwrap();
        assert_eq!(listed(&store), ["fresh-file", "fresh-journal"]);
        // The replayed clusters were written as version 2 files, with their newest sample.
        drop(store);
        let store = Store::open(StoreConfig {
            ttl,
            ..config(&dir)
        })
        .unwrap();
        assert_eq!(listed(&store), ["fresh-file", "fresh-journal"]);
        let (header, _) = file::read(&file_of(&store, "stale-journal"), false).unwrap();
        assert!(header.newest_sample_ms.is_some());
    }

    #[test]
    fn a_version_1_file_is_read_and_its_newest_sample_taken_from_its_payload() {
        let dir = TempDir::new("ttl-v1");
        fs::create_dir_all(&dir.0).unwrap();
        let minute = 60_000;
        for (id, payload) in [("old", sampled(20 * minute)), ("new", sampled(minute))] {
            let received = file::to_millis(SystemTime::now());
            let header = file::tests::encode_header_v1(id, received, &payload);
            fs::write(dir.0.join(file::file_name(id)), [header, payload].concat()).unwrap();
        }
        let ttl = Duration::from_secs(600);
        let store = Store::open(StoreConfig {
            ttl,
            ..config(&dir)
        })
        .unwrap();
        assert_eq!(listed(&store), ["new"]);
        assert_eq!(
            store.get("new").unwrap().unwrap().payload,
            sampled_like(&store, "new")
        );
        assert_eq!(store.stats().corrupt_files, 0);
        // Rewritten as version 2 when its cluster is next written.
        store.put("new", sampled(0), at(0)).unwrap();
        checkpoint_now(&store);
        let (header, _) = file::read(&file_of(&store, "new"), false).unwrap();
        assert!(header.newest_sample_ms.is_some());
    }

    /// The payload `store` holds for `id` (read from its file directly).
    fn sampled_like(store: &Store, id: &str) -> Vec<u8> {
        file::read(&file_of(store, id), true).unwrap().1.unwrap()
    }

    #[test]
    fn put_if_newer_keeps_the_newer_upload() {
        let dir = TempDir::new("ifnewer");
        let store = open(&dir);
        // Taken together: a put can take over 100 ms on a loaded machine, and a time taken after
        // it would then not be older at all.
        let (first, older, newest) = (at(-100), at(-200), at(0));
        assert!(store.put_if_newer("c", b"first".to_vec(), first).unwrap());
        assert!(!store.put_if_newer("c", b"older".to_vec(), older).unwrap());
        assert_eq!(store.get("c").unwrap().unwrap().payload, b"first");
        assert!(store.put_if_newer("c", b"newer".to_vec(), newest).unwrap());
        let upload = store.get("c").unwrap().unwrap();
        assert_eq!(
            (upload.payload, upload.received),
            (b"newer".to_vec(), newest)
        );
    }

    #[test]
    fn a_batch_writes_each_cluster_once_and_answers_everyone() {
        let dir = TempDir::new("batch");
        let store = open(&dir);
        let shared = &store.handle.shared;
        store.put("kept", b"stored".to_vec(), at(0)).unwrap();
        let mut answers = Vec::new();
        let mut batch = Vec::new();
        for (id, payload, received, mode) in [
            ("c", "one", at(-30), Mode::Replace),
            ("c", "two", at(-20), Mode::Replace),
            ("d", "three", at(-10), Mode::Replace),
            ("kept", "stale", at(-1000), Mode::IfNewer),
        ] {
            let (reply, answer) = handoff::oneshot();
            answers.push(answer);
            batch.push(Request {
                cluster_id: id.to_string(),
                payload: payload.as_bytes().to_vec(),
                received_millis: file::to_millis(received),
                newest_sample_ms: file::to_millis(received) as i64,
                mode,
                reply,
            });
        }
        let records_before = journal_records(store.dir()).len();
        commit::commit(shared, batch);
        let results: Vec<bool> = answers
            .into_iter()
            .map(|a| a.recv().unwrap().unwrap())
            .collect();
        assert_eq!(results, vec![true, true, true, false]);
        // Two records written ("c" once, "d"), none for the skipped one.
        let records = journal_records(store.dir());
        assert_eq!(records.len() - records_before, 2);
        assert_eq!(records[records_before].2, b"two");
        assert_eq!(store.get("c").unwrap().unwrap().payload, b"two");
        assert_eq!(store.get("d").unwrap().unwrap().payload, b"three");
        assert_eq!(store.get("kept").unwrap().unwrap().payload, b"stored");
    }

    #[test]
    fn remove_deletes_the_file_and_the_entry() {
        let dir = TempDir::new("remove");
        let store = open(&dir);
        store.put("c", b"x".to_vec(), at(0)).unwrap();
        store.remove("c").unwrap();
        assert_eq!(store.get("c").unwrap(), None);
        assert!(!file_of(&store, "c").exists());
        assert!(store.clusters().is_empty());
        // Removing what is not there is fine.
        store.remove("never").unwrap();
    }

    #[test]
    fn a_failed_write_is_an_error_and_leaves_the_old_upload() {
        let dir = TempDir::new("ioerror");
        let store = open(&dir);
        let old = at(-10);
        store.put("c", b"old".to_vec(), old).unwrap();

        checkpoint_now(&store);

        // Root ignores permissions, so make the next journal segments impossible to create: a
        // directory stands where each would go (the same create failure a full or read-only
        // disk gives).
        let next = lock(&store.handle.shared.journal).next_number;
        let blockers: Vec<PathBuf> = (next..next + 4)
            .map(|n| store.dir().join(format!("{}{n}", journal::PREFIX)))
            .collect();
        for blocker in &blockers {
            fs::create_dir(blocker).unwrap();
        }
        match store.put("c", b"new".to_vec(), at(0)) {
            Err(StoreError::Io { context, .. }) => {
                assert!(context.contains(journal::PREFIX), "{context}");
                assert!(context.contains(&dir.0.display().to_string()), "{context}");
            }
            other => panic!("expected an Io error, got {other:?}"),
        }
        let upload = store.get("c").unwrap().unwrap();
        assert_eq!((upload.payload, upload.received), (b"old".to_vec(), old));
        let (_, on_disk) = file::read(&file_of(&store, "c"), true).unwrap();
        assert_eq!(on_disk.unwrap(), b"old");

        // Once the cause is gone, the next put works: no sticky failure.
        for blocker in &blockers {
            fs::remove_dir(blocker).unwrap();
        }
        store.put("c", b"newer".to_vec(), at(0)).unwrap();
        assert_eq!(store.get("c").unwrap().unwrap().payload, b"newer");
    }

    #[test]
    fn a_read_only_directory_is_an_error_when_permissions_apply() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Root writes through 0555; the previous test covers the failure path instead.
            return;
        }
        let dir = TempDir::new("readonly");
        let store = open(&dir);
        store.put("c", b"old".to_vec(), at(-10)).unwrap();
        fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o555)).unwrap();
        let result = store.put("c", b"new".to_vec(), at(0));
        fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(result, Err(StoreError::Io { .. })), "{result:?}");
        assert_eq!(store.get("c").unwrap().unwrap().payload, b"old");
        store.put("c", b"new".to_vec(), at(0)).unwrap();
    }

    #[test]
    fn a_closed_store_refuses_puts_and_drop_does_not_hang() {
        let dir = TempDir::new("closed");
        let store = open(&dir);
        let clone = store.clone();
        store.put("c", b"x".to_vec(), at(0)).unwrap();
        store.close();
        assert!(matches!(
            clone.put("c", b"y".to_vec(), at(0)),
            Err(StoreError::Closed)
        ));
        // Reads still work from the index and the files.
        assert_eq!(clone.get("c").unwrap().unwrap().payload, b"x");
        drop(store);
        drop(clone);
        open(&dir);
    }

    /// Not a test: compares group commit with a naive write + fsync + rename + dir fsync per put.
    /// `cargo test -p telemeter-server store::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_group_commit_against_naive_fsync() {
        const THREADS: usize = 64;
        const PUTS: usize = 200;
        let payload = vec![0x5au8; 20 * 1024];

        let dir = TempDir::new("bench-group");
        let store = open(&dir);
        let started = std::time::Instant::now();
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                let payload = payload.clone();
                thread::spawn(move || {
                    for _ in 0..PUTS {
                        store
                            .put(&format!("bench-{t}"), payload.clone(), at(0))
                            .unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let group = started.elapsed();
        let stats = store.stats();
        drop(store);

        let naive_dir = TempDir::new("bench-naive");
        fs::create_dir_all(&naive_dir.0).unwrap();
        let started = std::time::Instant::now();
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let dir = naive_dir.0.clone();
                let payload = payload.clone();
                thread::spawn(move || {
                    use std::io::Write;
                    for i in 0..PUTS {
                        let id = format!("bench-{t}");
                        let header = file::encode_header(&id, 0, 0, &payload).unwrap();
                        let temp = dir.join(format!(".tmp-{t}-{i}"));
                        let mut out = File::create(&temp).unwrap();
                        out.write_all(&header).unwrap();
                        out.write_all(&payload).unwrap();
                        out.sync_data().unwrap();
                        fs::rename(&temp, dir.join(file::file_name(&id))).unwrap();
                        File::open(&dir).unwrap().sync_all().unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let naive = started.elapsed();

        // The same, one put at a time (a single writer, as without group commit in one thread).
        const SERIAL_PUTS: usize = 25;
        let serial_lock = Arc::new(Mutex::new(()));
        let started = std::time::Instant::now();
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let dir = naive_dir.0.clone();
                let payload = payload.clone();
                let serial_lock = Arc::clone(&serial_lock);
                thread::spawn(move || {
                    use std::io::Write;
                    for i in 0..SERIAL_PUTS {
                        let _one_at_a_time = lock(&serial_lock);
                        let id = format!("bench-{t}");
                        let header = file::encode_header(&id, 0, 0, &payload).unwrap();
                        let temp = dir.join(format!(".tmp-s{t}-{i}"));
                        let mut out = File::create(&temp).unwrap();
                        out.write_all(&header).unwrap();
                        out.write_all(&payload).unwrap();
                        out.sync_data().unwrap();
                        fs::rename(&temp, dir.join(file::file_name(&id))).unwrap();
                        File::open(&dir).unwrap().sync_all().unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let serial = started.elapsed();

        let total = (THREADS * PUTS) as f64;
        println!(
            "group commit: {:.0} puts/s ({} puts in {} commits, {:.2?}); \
             naive fsync per put, 64 threads at once: {:.0} puts/s ({:.2?}); \
             naive, one put at a time: {:.0} puts/s ({} puts in {:.2?})",
            total / group.as_secs_f64(),
            stats.writes,
            stats.commits,
            group,
            total / naive.as_secs_f64(),
            naive,
            (THREADS * SERIAL_PUTS) as f64 / serial.as_secs_f64(),
            THREADS * SERIAL_PUTS,
            serial
        );
    }
}
