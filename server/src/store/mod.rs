//! The durable store: every accepted upload made durable in a write-ahead journal, then kept in
//! one file per cluster.
//!
//! One file per job: this one is the facade ([`Store`]: open, put, read, list, remove) and the
//! TTL sweeper; `types` (config, errors, what it hands out), `state` (what its threads share),
//! `commit` (the group committer), `journal` (the segments: record format, append + `fdatasync`,
//! replay), `checkpoint` (segments into cluster files), `recover` (opening a directory), `read`
//! (one cluster's upload) and `file` (a cluster file's format).
//!
//! `DIR/<hex SHA-256 of the cluster id>` holds a small header (magic, format version, cluster id,
//! receive time, payload length, checksum) and the validated families as protobuf-delimited bytes.
//! A put is first made durable in a write-ahead journal (the `journal` module): one commit at a
//! time appends every pending upload to the current segment `DIR/journal-<n>` with one write and
//! one `fdatasync`, and only then answers each caller (group commit; a caller that finds the
//! journal idle commits on its own thread, the committer thread takes what queues meanwhile).
//! Reads find uploads in the segment until a checkpoint (when a segment is full, and on close)
//! writes each cluster's newest upload to its file the durable way (`DIR/.tmp-…`, synced, renamed
//! over the cluster's file, one directory sync) and deletes the segment. On ext4 that is several
//! times cheaper than syncing one file per upload (figures in the `journal` module). An upload
//! stored unchanged as it arrived (snappy framed) is journaled so, *packed* (~6× fewer bytes; the
//! `journal` module's "Packed records"); every read gets the families decompressed, and the
//! checkpointer writes cluster files plain, in the format below, so `/federate` reads each
//! family's range from them as before.
//!
//! The directory is locked (fs2) so a second server on it refuses to start. On open, temp files are
//! removed, cluster files are indexed from their headers alone (a header that does not hold up
//! sets its file aside in `DIR/corrupt/`), and the journal is replayed into the index: open reads
//! ~100 bytes per cluster file and the segments, and writes nothing. The replayed segments are
//! served from until the checkpointer, started with the store, has written their cluster files in
//! the background (as for a full segment). A payload's checksum is checked by the first read of
//! each version of its file, which the index remembers (by inode), so `/federate` scrapes do not
//! hash every file again; a file that fails then is set aside and never served. (A file damaged
//! in place after its first read is not noticed until the next open.)
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
//! # The remote-write marker
//!
//! Beside the newest sample, the index keeps each cluster's newest *remote-write* sample
//! (`i64::MIN`: none; [`Store::newest_received`]), which decides whether the cluster's uploads are
//! merged (`receive::merge`). The caller of the put says it: the merge, which made the payload,
//! through [`Store::put_merged`]; an upload stored as sent ([`Store::put`],
//! [`Store::put_unless_older`]) has none, whatever help its families carry. It is kept in each
//! journal record of a served payload (version 3 records) and, from version 3, in the cluster
//! file's header, and restored from them on open. Where a put, a record or a file carries none (a
//! handoff from a peer, [`Store::put_if_newer`]; a record written before version 3; a version 1
//! file), it is read from the payload's families with [`REMOTE_WRITE_HELP`]
//! ([`newest_received_in`]): they are in memory then anyway. A version 2 file is indexed from
//! its header alone, so its marker is learned from its payload lazily, once, at the first
//! [`Store::newest_received`] of its cluster: open stays ~100 bytes per file with 10,000 clusters,
//! and only the clusters that push after an upgrade pay one read each, until their next
//! checkpoint writes them as version 3. The sweeper forgets it with the entry.
//!
//! # Patches
//!
//! A remote-write request merged in place changes only some bytes of its cluster's payload;
//! [`Store::put_patched`] journals those (a patch record) after the cluster's image in the same
//! segment, and the index keeps the chain; reads and checkpoints rebuild the payload from it (the
//! `patch` module says when a full image is written instead, and why a chain never crosses a
//! segment). A read of a chain holds the payload it rebuilds, so a segment is closed once the
//! chains in it would rebuild to 128 MiB (as packed records are bounded): the clusters' next
//! requests start new chains, with an image, in the next one.
//!
//! Every payload the index takes gets a new [`Store::version`] (a checkpoint keeps it: same
//! payload, another place), so the merge's cache knows whether its copy is still what is stored.
//!
//! # File format (version 4)
//!
//! All integers little endian.
//!
//! | bytes        | field                                                          |
//! |--------------|----------------------------------------------------------------|
//! | 8            | magic `TLMSTORE`                                               |
//! | 2            | format version, u16 (4)                                        |
//! | 2            | cluster id length `n`, u16                                     |
//! | n            | cluster id, UTF-8                                              |
//! | 8            | receive time, u64 milliseconds since the Unix epoch            |
//! | 8            | newest sample timestamp, i64 milliseconds since the Unix epoch |
//! | 8            | newest remote-write sample, i64 ms (`i64::MIN`: none)          |
//! | 8            | payload length `p`, u64                                        |
//! | 4            | CRC-32C of every header byte above + the payload, u32          |
//! | p            | payload: protobuf-delimited families                           |
//!
//! Version 3 is the same with a 32-byte SHA-256 as the checksum: its check was a tenth of the
//! first `/federate` after a checkpoint (each file's first read checks it), the CRC (which the
//! journal's records use too) a hundredth; both catch damage, neither stops someone who can write
//! the directory. Version 2 (written before the remote-write marker was recorded) is version 3
//! without the newest remote-write sample; version 1 (written before the TTL counted from
//! samples) is version 2 without the newest sample timestamp. All three are still read, and
//! rewritten as version 4 when their cluster is next written.
//!
//! A file is served only if the magic and a known version match, `p` is exactly what follows the header
//! (nothing is allocated from a declared length before that is checked against the file's size),
//! the checksum matches (checked by the first read of the payload, see above) and the name is the
//! hash of the id inside. Any other file is moved to `DIR/corrupt/<name>.<unix seconds>` with a
//! warning.
//!
//! # Layout of the directory
//!
//! - `.lock`: held (fs2 exclusive lock) for the store's lifetime.
//! - `<64 hex digits>`: one cluster's file.
//! - `journal-<n>`: a journal segment not yet checkpointed; replayed into the index in order on
//!   open, and removed by the checkpointer once its cluster files are written.
//! - `.tmp-<n>`: a checkpoint in progress; removed on open (its data is still in the journal).
//! - `corrupt/`: files set aside.
//! - `egress/`: with `--remote-write-url`, checkpointed segments not yet shipped and the egress
//!   cursor (the `egress` module); never replayed into the store.
//!
//! Memory holds only the index (cluster id → receive time, payload size, where it is and, in the
//! journal, whether packed), never payloads, but while a read pins a packed record or a chain
//! (`/federate` pins every cluster): the pin holds the families decompressed or rebuilt, at most
//! what the journal's budgets (64 MiB of packed payloads and 128 MiB of chained ones per segment
//! not yet checkpointed) let the index point to.
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

mod checkpoint;
mod commit;
mod egress;
mod file;
mod journal;
mod patch;
mod read;
mod recover;
mod state;
mod types;

use std::collections::BTreeMap;

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use fs2::FileExt;
use telemeter_common::sync as handoff;

use commit::{Answer, Condition, Mode, Outcome, Queue, Request};
pub use egress::{Backlog, BacklogReader, Position, ShipRecord};
use journal::{Encoding, JournalState};
pub use patch::{Patch, PatchMark};
pub use read::{PinVersion, PinnedUpload};
pub use state::is_recent;
use state::{is_live, lock, newest_sample_ms, Counters, Entry, Location, Scrapes, Shared};
use telemeter_common::delimited::Limits;
use telemeter_common::wire;
pub use types::{
    ClusterEntry, Committed, Returned, StoreConfig, StoreError, StoreStats, StoredUpload,
};

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

/// The help text of every family remote write builds (`receive`): what marks a stored series as
/// received by remote write. It travels in the payload (journal, cluster file, handoff to another
/// owner), so a store, a file or a peer that does not record the marker beside the payload learns
/// it from the payload ([`newest_received_in`]).
pub const REMOTE_WRITE_HELP: &str = "Received by remote write.";

/// The newest sample (ms) of `payload`'s remote-write families ([`REMOTE_WRITE_HELP`]), `i64::MIN`
/// when it has none (or does not decode past some point: what was read counts). For payloads this
/// server wrote; what a client sent says nothing (an upload may name a family with that help).
pub fn newest_received_in(payload: &[u8]) -> i64 {
    const UNLIMITED: Limits = Limits {
        max_message_bytes: usize::MAX,
        max_total_bytes: usize::MAX,
        max_families: usize::MAX,
        max_series: usize::MAX,
    };
    let mut newest = i64::MIN;
    for family in wire::families(payload, &UNLIMITED) {
        let Ok(family) = family else {
            break;
        };
        if family.help != REMOTE_WRITE_HELP {
            continue;
        }
        for metric in family.metrics() {
            let Ok(metric) = metric else {
                break;
            };
            newest = newest.max(metric.timestamp_ms.unwrap_or(i64::MIN));
        }
    }
    newest
}

/// Applies `patch`'s ranges to `payload` (for the tests of whoever records patches: what a
/// replay does with it).
#[cfg(test)]
pub fn apply_patch(payload: &mut [u8], patch: &Patch) -> Result<(), String> {
    let mut sealed = patch.clone();
    sealed.seal(payload.len() as u64, 0, 0);
    patch::apply(payload, &sealed.bytes)
}

/// Segments are closed at [`journal::SEGMENT_BYTES`], or at what the environment variable
/// [`SEGMENT_BYTES_ENV`] says: a test hook, so end-to-end tests cross segment boundaries (and
/// checkpoints) within a few requests.
fn segment_bytes() -> u64 {
    std::env::var(SEGMENT_BYTES_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&bytes| bytes > 0)
        .unwrap_or(journal::SEGMENT_BYTES)
}

/// The environment variable that lowers the journal's segment size (tests only; see
/// [`segment_bytes`]).
pub const SEGMENT_BYTES_ENV: &str = "TELEMETER_TEST_SEGMENT_BYTES";

/// What egress ships of a put (when the store was opened with [`Store::open_shipping`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ship {
    /// The payload put, whether or not it is served (a late upload is shipped, not served).
    Served,
    /// This payload instead (the delta of a remote-write request whose merged view is served).
    Payload(Vec<u8>),
    /// Nothing (a handoff of a cluster's file between servers: shipped where it was received).
    Nothing,
}

impl Ship {
    /// Bytes of a separate payload.
    fn len(&self) -> usize {
        match self {
            Ship::Payload(payload) => payload.len(),
            Ship::Served | Ship::Nothing => 0,
        }
    }
}

/// The store. Cheap to clone; all clones share one directory and one committer.
#[derive(Clone)]
pub struct Store {
    handle: Arc<Handle>,
}

/// What the clones share. Dropping the last clone closes the store.
struct Handle {
    shared: Arc<Shared>,
    /// Where puts are committed; closing it stops the committer thread once it is drained.
    queue: Arc<Queue>,
    /// Dropping it wakes and stops the sweeper.
    stop_sweeper: Mutex<Option<Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// One put, as the `put` functions hand it to `submit`.
struct Put {
    /// What to serve, if anything.
    serve: Option<Vec<u8>>,
    /// `serve` as it arrived, snappy framed (then the record is packed).
    frames: Option<Vec<u8>>,
    /// What egress ships.
    ship: Ship,
    received: SystemTime,
    mode: Mode,
    /// `serve`'s newest remote-write sample; `None`: read from the payload.
    newest_received_ms: Option<i64>,
    /// The request is this patch alone (with the patched payload's newest sample).
    patch: Option<(Patch, i64)>,
    /// `serve`'s newest sample, when the caller knows it; `None`: read from the payload.
    newest_sample_ms: Option<i64>,
    /// What must hold of the stored payload for it to be committed.
    condition: Condition,
}

/// What a merge's put came to.
fn committed(outcome: Outcome) -> Committed {
    match outcome {
        Outcome::Stored(version) => Committed::Current(version),
        Outcome::Superseded | Outcome::Kept => Committed::Superseded,
        // A patch that cannot be journaled is put whole: never answered so to a caller.
        Outcome::Unpatchable | Outcome::Moved => Committed::Moved,
    }
}

impl Put {
    /// An upload as sent (it holds no remote-write series), put unless older than the stored
    /// one, packed with its `frames` if any.
    fn upload(
        payload: Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: Option<i64>,
        received: SystemTime,
    ) -> Put {
        Put {
            serve: Some(payload),
            frames,
            ship: Ship::Served,
            received,
            mode: Mode::UnlessOlder,
            newest_received_ms: Some(i64::MIN),
            patch: None,
            newest_sample_ms,
            condition: Condition::NoRemoteWrite,
        }
    }
}

impl Store {
    /// Locks the directory, recovers it (temp files removed, corrupt files set aside), indexes the
    /// clusters it holds, and starts the committer and the TTL sweeper threads.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        Store::open_as(config, false)
    }

    /// As [`Store::open`], keeping the journal as the egress backlog ([`Store::backlog`]):
    /// checkpointed segments go to `DIR/egress/` until shipped, and what must be shipped but not
    /// served is journaled too.
    pub fn open_shipping(config: StoreConfig) -> Result<Store, StoreError> {
        Store::open_as(config, true)
    }

    fn open_as(config: StoreConfig, shipping: bool) -> Result<Store, StoreError> {
        Store::open_checkpointing(config, shipping, true)
    }

    /// Opens the store; without `checkpointing` (tests modelling a crash right after open) the
    /// checkpointer writes nothing.
    fn open_checkpointing(
        config: StoreConfig,
        shipping: bool,
        checkpointing: bool,
    ) -> Result<Store, StoreError> {
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
        // Unique in this process however many stores it opens (tests, a reopen): see
        // [`Shared::identity`].
        static IDENTITIES: AtomicU64 = AtomicU64::new(0);
        let identity = IDENTITIES.fetch_add(1, Ordering::Relaxed);
        let dir_for_egress = dir.clone();

        let shared = Arc::new(Shared {
            dir,
            ttl: config.ttl,
            dir_file,
            identity,
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
                packed_bytes: 0,
                packed_budget: journal::PACKED_BUDGET,
                chained_bytes: 0,
                chain_budget: journal::CHAIN_BUDGET,
                batch_buffer: Vec::new(),
            }),
            segment_bytes: AtomicU64::new(segment_bytes()),
            counters: Counters::default(),
            checkpointing: AtomicBool::new(checkpointing),
            egress: match shipping {
                false => None,
                true => Some(egress::EgressShared::new(
                    egress::load_cursor(&dir_for_egress)?.map_or(0, |c| c.segment),
                )),
            },
            versions: AtomicU64::new(0),
            packed_unsettled: AtomicU64::new(0),
            packed_unsettled_budget: AtomicU64::new(journal::PACKED_UNSETTLED_BUDGET),
            scrapes: Mutex::new(Scrapes::default()),
            scrapes_done: Condvar::new(),
            max_yield_ms: AtomicU64::new(checkpoint::MAX_YIELD_PER_SEGMENT.as_millis() as u64),
            #[cfg(test)]
            pause: Mutex::new(None),
        });
        if !shipping && dir_for_egress.join(egress::EGRESS_DIR).exists() {
            log::warn!(
                "{}: segments kept for --remote-write-url, which is off; they stay until it is on again",
                dir_for_egress.join(egress::EGRESS_DIR).display()
            );
        }
        let replayed = shared.recover()?;

        let (retire, retired) = crossbeam_channel::unbounded();
        // The replayed segments are checkpointed first, in order, in the background: open
        // returns without writing their cluster files (reads find the records in them).
        for segment in replayed {
            let _ = retire.send(segment);
        }
        lock(&shared.journal).retired = Some(retire);
        let checkpointer = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("store-checkpointer".to_string())
                .spawn(move || checkpoint::checkpoint_until_closed(&shared, &retired))
                .map_err(|e| StoreError::io("starting the store's checkpointer thread", e))?
        };
        let queue = Arc::new(Queue::new(config.max_batch));
        let (stop_sweeper, stopped) = crossbeam_channel::bounded::<()>(0);
        let committer = {
            let shared_clone = Arc::clone(&shared);
            let queue = Arc::clone(&queue);
            let spawned = thread::Builder::new()
                .name("store-committer".to_string())
                .spawn(move || commit::run(shared_clone, queue));
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
                queue.close();
                let _ = committer.join();
                let _ = checkpointer.join();
                return Err(StoreError::io("starting the store's sweeper thread", error));
            }
        };
        Ok(Store {
            handle: Arc::new(Handle {
                shared,
                queue,
                stop_sweeper: Mutex::new(Some(stop_sweeper)),
                // Joined in this order: the committer hands its last segment to the checkpointer.
                threads: Mutex::new(vec![committer, checkpointer, sweeper]),
            }),
        })
    }

    /// Stores `payload` as `cluster_id`'s upload received at `received`, replacing the previous one.
    /// Returns only once its journal record is durable on disk (synced; for a new segment, its
    /// directory too). An upload as sent: it holds no remote-write series.
    pub fn put(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<(), StoreError> {
        self.submit(
            cluster_id,
            Put {
                serve: Some(payload),
                frames: None,
                ship: Ship::Served,
                received,
                mode: Mode::Replace,
                newest_received_ms: Some(i64::MIN),
                patch: None,
                newest_sample_ms: None,
                condition: Condition::Always,
            },
        )
        .map(|_| ())
    }

    /// Stores `serve` (if any) as `cluster_id`'s upload received at `received`, replacing the
    /// previous one, and has egress ship `ship`, both in one journal batch: durable together
    /// before this returns. Without egress ([`Store::open`]) `ship` is ignored. Returns whether a
    /// payload was stored to be served.
    pub fn put_shipping(
        &self,
        cluster_id: &str,
        serve: Option<Vec<u8>>,
        ship: Ship,
        received: SystemTime,
    ) -> Result<bool, StoreError> {
        // Nobody said whether `serve` holds remote-write series: its families say.
        self.submit(
            cluster_id,
            Put {
                serve,
                frames: None,
                ship,
                received,
                mode: Mode::Replace,
                newest_received_ms: None,
                patch: None,
                newest_sample_ms: None,
                condition: Condition::Always,
            },
        )
        .map(Outcome::written)
    }

    /// As [`Store::put_shipping`] for a payload made by a merge over the stored payload of
    /// [`Store::version`] `base` (`None`: the cluster had none), whose newest remote-write sample
    /// the caller knows (`newest_received_ms`, `i64::MIN` when none). Stored only if that is
    /// still the stored payload when the put is committed, so that a merge never erases a put of
    /// another path (an upload, a handoff) that came between its read and its commit: otherwise
    /// [`Committed::Moved`] with nothing journaled, and the caller merges again.
    pub fn put_merged(
        &self,
        cluster_id: &str,
        merged: Vec<u8>,
        ship: Ship,
        received: SystemTime,
        newest_received_ms: i64,
        base: Option<u64>,
    ) -> Result<Committed, StoreError> {
        let outcome = self.submit(
            cluster_id,
            Put {
                serve: Some(merged),
                frames: None,
                ship,
                received,
                mode: Mode::Replace,
                newest_received_ms: Some(newest_received_ms),
                patch: None,
                newest_sample_ms: None,
                condition: Condition::Version(base),
            },
        )?;
        Ok(committed(outcome))
    }

    /// As [`Store::put_merged`] for a payload made by editing the stored payload of
    /// [`Store::version`] `patch.base_version` in place, where `patch` says what changed: the
    /// journal then holds only that (the `patch` module), and `whole` (the edited payload) is
    /// asked for only when the patch cannot be journaled (the chain is full, the segment
    /// changed). `newest_sample_ms` and `newest_received_ms` are the edited payload's. Either way
    /// what is served is the edited payload, durable before this returns, and `ship` is
    /// shipped once; or, when the stored payload is no longer the one edited, nothing is
    /// ([`Committed::Moved`]).
    #[allow(clippy::too_many_arguments)]
    pub fn put_patched(
        &self,
        cluster_id: &str,
        patch: Patch,
        whole: impl FnOnce() -> Vec<u8>,
        ship: Ship,
        received: SystemTime,
        newest_sample_ms: i64,
        newest_received_ms: i64,
    ) -> Result<Committed, StoreError> {
        let base = patch.base_version;
        // Most refusals are known from the index already (another version, a full chain): then
        // the whole payload at once, rather than after a commit that refuses the patch.
        let hopeful = lock(&self.handle.shared.index)
            .get(cluster_id)
            .is_some_and(|entry| {
                let (patches, patch_bytes) = match &entry.location {
                    Location::Journal {
                        encoding: Encoding::Plain,
                        ..
                    } => (0, 0),
                    // An upload as sent (packed) is never a merge's payload.
                    Location::Journal { .. } => return false,
                    Location::Chain {
                        patches,
                        patch_bytes,
                        ..
                    } => (patches.len(), *patch_bytes),
                    Location::File { .. } => return false,
                };
                entry.version == base
                    && patches < patch::MAX_PATCHES
                    && patch_bytes + patch.len() as u64 <= entry.payload_bytes
            });
        if hopeful {
            // Without egress the delta goes nowhere; with it, a refused patch journals nothing
            // (its ship record neither), so the retry below ships it.
            let shipped = match self.handle.shared.egress {
                Some(_) => ship.clone(),
                None => Ship::Nothing,
            };
            let outcome = self.submit(
                cluster_id,
                Put {
                    serve: Some(Vec::new()),
                    frames: None,
                    ship: shipped,
                    received,
                    mode: Mode::Replace,
                    newest_received_ms: Some(newest_received_ms),
                    patch: Some((patch, newest_sample_ms)),
                    newest_sample_ms: None,
                    // A patch holds only over the payload it edits (`commit::extendable`).
                    condition: Condition::Always,
                },
            )?;
            if outcome != Outcome::Unpatchable {
                return Ok(committed(outcome));
            }
        }
        let outcome = self.submit(
            cluster_id,
            Put {
                serve: Some(whole()),
                frames: None,
                ship,
                received,
                mode: Mode::Replace,
                newest_received_ms: Some(newest_received_ms),
                patch: None,
                // Said by the caller, as for the patch: no pass over the whole payload.
                newest_sample_ms: Some(newest_sample_ms),
                condition: Condition::Version(Some(base)),
            },
        )?;
        Ok(committed(outcome))
    }

    /// Tests: the first store call to reach the point named `at` (a `Shared::pause_at` of the
    /// store's) stops there, once. Returns where it says it got there, and where to tell it to
    /// go on.
    #[cfg(test)]
    pub(crate) fn pause_once_at(
        &self,
        at: &'static str,
    ) -> (
        crossbeam_channel::Receiver<()>,
        crossbeam_channel::Sender<()>,
    ) {
        let (reached, stopped) = crossbeam_channel::bounded(0);
        let (go_on, waits) = crossbeam_channel::bounded(0);
        *lock(&self.handle.shared.pause) = Some(state::Pause {
            at,
            reached,
            go_on: waits,
        });
        (stopped, go_on)
    }

    /// Tests: takes back a pause no store call reached ([`Store::pause_once_at`]).
    #[cfg(test)]
    pub(crate) fn unpause(&self) {
        *lock(&self.handle.shared.pause) = None;
    }

    /// Whether the store was opened with [`Store::open_shipping`]: only then is what a put
    /// ships journaled.
    pub fn is_shipping(&self) -> bool {
        self.handle.shared.egress.is_some()
    }

    /// The egress backlog, when the store was opened with [`Store::open_shipping`].
    pub fn backlog(&self) -> Option<Backlog> {
        self.handle.shared.egress.as_ref().map(|_| Backlog {
            shared: Arc::clone(&self.handle.shared),
        })
    }

    /// Like [`Store::put`], but keeps the stored upload when it is newer (used when ownership
    /// moves between servers): its newest sample is newer than `payload`'s, or the same and it
    /// was received after `received`. Returns whether `payload` was written. Held, like an upload
    /// as sent, to the cluster having no remote-write series (within the TTL, counting the
    /// puts committed before it): otherwise it would replace their merged view, and the payload
    /// is handed back ([`StoreError::UsesRemoteWrite`]) to be merged into it.
    pub fn put_if_newer(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<bool, StoreError> {
        // The server that received it shipped it. A handoff carries no marker (a peer sends the
        // payload alone): the payload's families say whether it holds remote-write series.
        self.submit(
            cluster_id,
            Put {
                serve: Some(payload),
                frames: None,
                ship: Ship::Nothing,
                received,
                mode: Mode::IfNewer,
                newest_received_ms: None,
                patch: None,
                newest_sample_ms: None,
                condition: Condition::NoRemoteWrite,
            },
        )
        .map(Outcome::written)
    }

    /// Like [`Store::put`], but keeps the stored upload when its newest sample is newer than
    /// `payload`'s: an upload sent late (spooled through an outage, imported across an air gap)
    /// never replaces fresher values. Egress ships it either way (the receiver keeps history).
    /// Returns whether `payload` was written to be served.
    pub fn put_unless_older(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<bool, StoreError> {
        self.put_upload(cluster_id, payload, None, None, received, None)
    }

    /// As [`Store::put_unless_older`], for a payload that arrived as `frames` (snappy framed,
    /// decompressing to exactly `payload`, which passed validation unchanged): the journal keeps
    /// the frames (packed, ~6× fewer bytes than the families), every read gets `payload` back.
    /// `payload` is only read here (its newest sample) and dropped before the commit. An upload
    /// as sent: it holds no remote-write series.
    pub fn put_unless_older_packed(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        frames: Vec<u8>,
        received: SystemTime,
    ) -> Result<bool, StoreError> {
        self.put_upload(cluster_id, payload, Some(frames), None, received, None)
    }

    /// As [`Store::put_unless_older`] (with `frames`: [`Store::put_unless_older_packed`]), for
    /// a payload whose newest sample the caller read already (`newest_sample_ms`, exactly what
    /// `wire::newest_timestamp` of `payload` gives): the store does not walk the payload for it.
    /// `payload` is lent rather than given: when the record is journaled packed (the store keeps
    /// only the frames and the payload's length), `payload` is handed back as it was, so the
    /// caller can decompress its next upload into the same buffer instead of allocating and
    /// zeroing one (~4 µs of a 51 KB upload); otherwise it is taken and left empty.
    pub fn put_unchanged_lent(
        &self,
        cluster_id: &str,
        payload: &mut Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: i64,
        received: SystemTime,
    ) -> Result<bool, StoreError> {
        let taken = std::mem::take(payload);
        self.put_upload(
            cluster_id,
            taken,
            frames,
            Some(newest_sample_ms),
            received,
            Some(payload),
        )
    }

    /// As [`Store::put_unchanged_lent`], without waiting: `then` is run with the answer once the
    /// upload is durable (or failed), where the commit ends: on the committer thread, or on
    /// this one when it commits alone (then before this returns). So the caller's thread need
    /// not sleep until the commit (an upload answered from there: one wake-up less an upload).
    /// `then` runs exactly once, also when the store closes first (with [`StoreError::Closed`]);
    /// it runs while the committer holds no lock, but should be short: the next batch waits.
    pub fn put_unchanged_then(
        &self,
        cluster_id: &str,
        payload: &mut Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: i64,
        received: SystemTime,
        then: impl FnOnce(Result<bool, StoreError>) + Send + 'static,
    ) {
        let taken = std::mem::take(payload);
        self.enqueue(
            cluster_id,
            Put::upload(taken, frames, Some(newest_sample_ms), received),
            Some(payload),
            Answer::then(Box::new(then)),
        );
    }

    /// An upload as sent (it holds no remote-write series), put unless older than the stored
    /// one, packed with its `frames` if any; `newest_sample_ms` when the caller knows it. With
    /// `lent`, a payload journaled packed is handed back there ([`Store::submit_lending`]).
    fn put_upload(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: Option<i64>,
        received: SystemTime,
        lent: Option<&mut Vec<u8>>,
    ) -> Result<bool, StoreError> {
        self.submit_lending(
            cluster_id,
            Put::upload(payload, frames, newest_sample_ms, received),
            lent,
        )
        .map(Outcome::written)
    }

    /// Commits one upload (here, or through the committer thread) and waits for its answer. With
    /// `frames` (the served payload as it arrived, snappy framed) the record is packed.
    /// `newest_received_ms` is the payload's newest remote-write sample; `None`: read from the
    /// payload. With `patch` (and the edited payload's newest sample beside it) the request is
    /// that patch alone.
    fn submit(&self, cluster_id: &str, put: Put) -> Result<Outcome, StoreError> {
        self.submit_lending(cluster_id, put, None)
    }

    /// [`Store::submit`]; a served payload journaled packed (only its length is needed) is
    /// handed back in `lent` rather than dropped.
    fn submit_lending(
        &self,
        cluster_id: &str,
        put: Put,
        lent: Option<&mut Vec<u8>>,
    ) -> Result<Outcome, StoreError> {
        let (reply, answer) = handoff::oneshot();
        self.enqueue(cluster_id, put, lent, Answer::Wait(reply));
        // Whoever commits answers every request it takes (a commit on this thread already has);
        // if the committer thread died instead, or the store is closed, the reply sender is
        // dropped and this returns.
        answer.recv().ok_or(StoreError::Closed)?
    }

    /// Hands one put to whoever commits; `answer` hears what became of it (also when it is
    /// refused: a closed store drops the request, and with it the answer, which then says
    /// [`StoreError::Closed`]).
    fn enqueue(&self, cluster_id: &str, put: Put, lent: Option<&mut Vec<u8>>, answer: Answer) {
        #[cfg(test)]
        self.handle.shared.pause_at("put handed over");
        let Put {
            serve,
            frames,
            ship,
            received,
            mode,
            newest_received_ms,
            patch,
            newest_sample_ms: known_newest_sample_ms,
            condition,
        } = put;
        let shipping = self.handle.shared.egress.is_some()
            && !matches!((&serve, &ship), (None, Ship::Served) | (_, Ship::Nothing));
        if serve.is_none() && !shipping {
            answer.send(Ok(Outcome::Kept));
            return;
        }
        let received_millis = telemeter_common::time::unix_millis(received);
        // Read here, on the caller's thread, so the committer's batches do not wait for it.
        let serving = serve.is_some();
        let payload = serve.unwrap_or_default();
        let newest_received_ms = newest_received_ms.unwrap_or_else(|| newest_received_in(&payload));
        // A patch says the payload's length and newest sample itself (its caller knows them:
        // no pass over the payload, which is not here).
        let (newest_sample_ms, patch) = match patch {
            Some((mut patch, newest_sample_ms)) => {
                let len = patch.base_len;
                patch.seal(len, newest_sample_ms, newest_received_ms);
                (newest_sample_ms, Some(patch))
            }
            None => (
                known_newest_sample_ms
                    .unwrap_or_else(|| newest_sample_ms(&payload, received_millis)),
                None,
            ),
        };
        // Packed: the families are not needed past this point, only their length. Plain while
        // the packed payloads awaiting their checkpoint are over budget, so that what reads of
        // them hold in memory stays bounded.
        let shared = &self.handle.shared;
        let settled = shared.packed_unsettled.load(Ordering::Relaxed)
            < shared.packed_unsettled_budget.load(Ordering::Relaxed);
        let (payload, packed) = match frames {
            Some(frames) if serving && settled => {
                let len = payload.len() as u64;
                if let Some(lent) = lent {
                    *lent = payload;
                }
                (frames, Some(len))
            }
            _ => (payload, None),
        };
        // Refused only when the store is closed: the request is dropped then, and its answer
        // with it says so.
        let _ = self.handle.queue.submit(
            &self.handle.shared,
            Request {
                cluster_id: cluster_id.to_string(),
                payload,
                packed,
                serve: serving,
                ship,
                received_millis,
                newest_sample_ms,
                newest_received_ms,
                patch,
                mode,
                condition,
                reply: answer,
            },
        );
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
                received: telemeter_common::time::from_unix_millis(entry.received_millis),
                payload_bytes: entry.payload_bytes,
            })
            .collect()
    }

    /// Reads one cluster's upload, verifying its checksum. `Ok(None)` when it is absent, expired, or
    /// (after being moved aside) corrupt.
    pub fn get(&self, cluster_id: &str) -> Result<Option<StoredUpload>, StoreError> {
        self.handle.shared.get(cluster_id)
    }

    /// As [`Store::get`], keeping the file read open so the payload can be read again in parts
    /// ([`PinnedUpload::read_range`]) without being held in memory.
    pub fn get_pinned(&self, cluster_id: &str) -> Result<Option<PinnedUpload>, StoreError> {
        self.handle.shared.get_pinned(cluster_id, false, None)
    }

    /// As [`Store::get_pinned`], except that a payload whose [`PinVersion`] is `known` (the
    /// caller knows where its families are from an earlier pin of it) is pinned without reading
    /// it where that is safe ([`PinnedUpload::payload_read`] is false): a cluster file a read has
    /// verified before (only its header is read), a file not yet verified (its checksum is
    /// checked streaming, the payload not kept), a plain journal record (not read at all: it was
    /// checked by the read that gave it its version, and a segment's records are never
    /// rewritten). `/federate` then reads only the families' ranges.
    pub fn get_pinned_lazily(
        &self,
        cluster_id: &str,
        known: Option<PinVersion>,
    ) -> Result<Option<PinnedUpload>, StoreError> {
        self.handle.shared.get_pinned(cluster_id, true, known)
    }

    /// Checkpoints the current journal segment now, as a full one would be (for tests outside
    /// the store: what a scrape keeps across a checkpoint).
    #[cfg(test)]
    pub(crate) fn checkpoint_now(&self) {
        let shared = &self.handle.shared;
        let segment = lock(&shared.journal).segment.take();
        if let Some(segment) = segment {
            assert!(checkpoint::checkpoint(shared, &segment, false));
        }
    }

    /// Marks a scrape of the whole store in progress until the guard is dropped: meanwhile
    /// the checkpointer waits before each cluster file it would write (within
    /// `checkpoint::MAX_YIELD_PER_SEGMENT` a segment), so the scrape has the CPU and the
    /// directory to itself; the journal holds the uploads durably meanwhile.
    pub fn scrape(&self) -> ScrapeInProgress {
        lock(&self.handle.shared.scrapes).in_progress += 1;
        ScrapeInProgress {
            store: self.clone(),
        }
    }

    /// The newest remote-write sample (ms) of `cluster_id`'s stored payload, `i64::MIN` when it has
    /// none; `None` when the cluster has no entry (never pushed, removed, or swept). Answered from
    /// the index, which keeps it beside the newest sample, except once for a cluster indexed from
    /// a version 2 file (written before the marker was recorded): that payload is read then, and
    /// what it says is kept until the cluster is next written (as version 3). Expired but not yet
    /// swept entries answer too: the caller compares with the TTL.
    pub fn newest_received(&self, cluster_id: &str) -> Result<Option<i64>, StoreError> {
        let shared = &self.handle.shared;
        let version = match lock(&shared.index).get(cluster_id) {
            None => return Ok(None),
            Some(Entry {
                newest_received_ms: Some(newest),
                ..
            }) => return Ok(Some(*newest)),
            Some(entry) => entry.version,
        };
        let newest = match shared.get(cluster_id)? {
            Some(upload) => newest_received_in(&upload.payload),
            // Expired (so nothing of it is served or merged into) or gone meanwhile.
            None => return Ok(Some(i64::MIN)),
        };
        // Only into the entry that was read: a put since has its own marker.
        if let Some(entry) = lock(&shared.index).get_mut(cluster_id) {
            if entry.version == version {
                entry.newest_received_ms = Some(newest);
            }
        }
        Ok(Some(newest))
    }

    /// Which put `cluster_id`'s stored payload is: a number that changes with every payload the
    /// store takes for it (not with a checkpoint, which moves the same payload), so whoever keeps
    /// a copy of a payload it stored ([`Store::put_merged`]) knows whether it is still the one
    /// stored. `None` when the cluster has no entry.
    pub fn version(&self, cluster_id: &str) -> Option<u64> {
        lock(&self.handle.shared.index)
            .get(cluster_id)
            .map(|entry| entry.version)
    }

    /// When `cluster_id`'s stored payload was received; `None` when the cluster has no entry.
    pub fn received(&self, cluster_id: &str) -> Option<SystemTime> {
        lock(&self.handle.shared.index)
            .get(cluster_id)
            .map(|entry| telemeter_common::time::from_unix_millis(entry.received_millis))
    }

    /// Removes a cluster's file (used when another server took ownership of it).
    pub fn remove(&self, cluster_id: &str) -> Result<(), StoreError> {
        self.handle.shared.remove(cluster_id, Only::Any).map(|_| ())
    }

    /// As [`Store::remove`], only while the cluster's upload was received no later than
    /// `received` (decided under the journal's lock, as [`Store::remove_if_version`]): a removal
    /// asked at that time by another server. Sent again later (a replay), it removes nothing
    /// stored since. Returns whether it removed it.
    pub fn remove_if_received_by(
        &self,
        cluster_id: &str,
        received: SystemTime,
    ) -> Result<bool, StoreError> {
        let received = telemeter_common::time::unix_millis(received);
        self.handle
            .shared
            .remove(cluster_id, Only::ReceivedBy(received))
    }

    /// As [`Store::remove`], only while the cluster's upload is still the one of `version`
    /// ([`Store::version`]): decided under the journal's lock, so no put is committed between the
    /// check and the removal. The handoff removes what it handed off so, never a newer upload
    /// stored here meanwhile. Returns whether it removed it.
    pub fn remove_if_version(&self, cluster_id: &str, version: u64) -> Result<bool, StoreError> {
        self.handle
            .shared
            .remove(cluster_id, Only::Version(version))
    }

    /// How long a cluster's newest sample keeps it served (`--ttl`): remote write's merge drops
    /// series older than this.
    pub fn ttl(&self) -> std::time::Duration {
        self.handle.shared.ttl
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
            checkpoint_yielded_micros: counters.checkpoint_yielded_micros.load(Ordering::Relaxed),
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

/// A scrape in progress ([`Store::scrape`]), which the checkpointer yields to until dropped.
pub struct ScrapeInProgress {
    store: Store,
}

impl Drop for ScrapeInProgress {
    fn drop(&mut self) {
        let shared = &self.store.handle.shared;
        let mut scrapes = lock(&shared.scrapes);
        scrapes.in_progress = scrapes.in_progress.saturating_sub(1);
        if scrapes.in_progress == 0 {
            shared.scrapes_done.notify_all();
        }
    }
}

impl Handle {
    fn close(&self) {
        // The last segment is checkpointed now, whatever scrape is still running.
        lock(&self.shared.scrapes).closing = true;
        self.shared.scrapes_done.notify_all();
        // What was queued before is still committed: the committer thread drains the queue.
        self.queue.close();
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

/// Which of a cluster's uploads a removal removes.
#[derive(Clone, Copy)]
enum Only {
    /// Whichever is stored.
    Any,
    /// Only that of this version ([`Store::version`]).
    Version(u64),
    /// Only one received no later than this (Unix ms).
    ReceivedBy(u64),
}

impl Shared {
    /// Removes `cluster_id` when its entry is what `only` says; returns whether it did.
    fn remove(&self, cluster_id: &str, only: Only) -> Result<bool, StoreError> {
        let path = self.path_of(cluster_id);
        let _mutation = lock(&self.mutation);
        // A removal record first, or a replay of the journal could bring the cluster back.
        let mut record = Vec::new();
        journal::encode(journal::REMOVE, cluster_id, 0, b"", &mut record).map_err(|reason| {
            StoreError::format(format!("removing cluster {cluster_id:?}"), reason)
        })?;
        // The entry goes with the record, under the journal's lock: a put committed after it
        // (the committer does not take the mutation lock) makes an entry of its own, which
        // nothing below may touch; its upload is in the journal, not in the file unlinked here.
        // Dropped when this returns, not under the journal's and index's locks: a kept mapping
        // of the file is unmapped then.
        let mut journal = lock(&self.journal);
        // Under the journal's lock: the committer indexes a put with it held.
        let wanted = match only {
            Only::Any => true,
            Only::Version(version) => {
                lock(&self.index).get(cluster_id).map(|entry| entry.version) == Some(version)
            }
            Only::ReceivedBy(received) => lock(&self.index)
                .get(cluster_id)
                .is_some_and(|entry| entry.received_millis <= received),
        };
        if !wanted {
            return Ok(false);
        }
        let _removed = self.append_locked(&mut journal, &record, |_, _| {
            (
                lock(&self.index).remove(cluster_id),
                journal::Held::default(),
            )
        })?;
        drop(journal);
        #[cfg(test)]
        self.pause_at("removal recorded");
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
        // Otherwise a crash could bring the file back, and this server would serve a cluster
        // another server now owns.
        self.dir_file
            .sync_all()
            .map_err(|e| StoreError::io(format!("syncing directory {}", self.dir.display()), e))?;
        Ok(true)
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
            let entry = index.remove(&cluster_id);
            // Its kept mapping, if any, is unmapped with the lock let go.
            drop(index);
            drop(entry);
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

#[cfg(test)]
mod tests;
