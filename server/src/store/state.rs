//! The state the committer, the checkpointer, the sweeper and the callers share: the index of
//! what is on disk and where, the journal's writing end, the counters.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use telemeter_common::wire;

use super::egress::EgressShared;
use super::file;
use super::journal::{Encoding, JournalState, Segment};
use super::read::MappedPayload;

/// The state the committer, the sweeper and the callers share.
pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) ttl: Duration,
    /// The directory itself, for `syncfs` and the directory fsync.
    pub(super) dir_file: File,
    /// Which store of this process this is (a number no other open of a store in this process
    /// has): a [`super::PinVersion`] names its store by it, since entry versions start again
    /// from 0 with every open, and `/federate`'s cache outlives a store (tests, a reopen).
    pub(super) identity: u64,
    /// Held only for its fs2 lock, released when the store is gone.
    pub(super) _lock_file: File,
    /// Cluster id → what is on disk. Sorted, so listings are stable.
    pub(super) index: Mutex<BTreeMap<String, Entry>>,
    /// Serializes changes to the directory's cluster files (rename, remove, set aside) with the
    /// index updates that follow them.
    pub(super) mutation: Mutex<()>,
    /// Number of the next temp file.
    pub(super) next_temp: AtomicU64,
    /// The journal's writing end. Lock order: `mutation`, then `journal`, then `index`.
    pub(super) journal: Mutex<JournalState>,
    /// A segment this full is closed ([`super::journal::SEGMENT_BYTES`]; tests lower it).
    pub(super) segment_bytes: AtomicU64,
    pub(super) counters: Counters,
    /// Cleared only by tests, to model a crash from then on: the checkpointer drops the
    /// segments it is handed instead of writing their cluster files.
    pub(super) checkpointing: AtomicBool,
    /// Set when the journal is also the egress backlog ([`super::Store::open_shipping`]).
    pub(super) egress: Option<EgressShared>,
    /// The next [`Entry::version`].
    pub(super) versions: AtomicU64,
    /// Decompressed bytes of the packed payloads indexed in segments not yet checkpointed (an
    /// upper bound; see `journal::PACKED_UNSETTLED_BUDGET`).
    pub(super) packed_unsettled: AtomicU64,
    /// `journal::PACKED_UNSETTLED_BUDGET` (tests lower it).
    pub(super) packed_unsettled_budget: AtomicU64,
    /// The scrapes in progress ([`super::Store::scrape`]), which the checkpointer yields to
    /// (`checkpoint::yield_to_scrapes`); and whether the store is closing (it yields no more).
    pub(super) scrapes: Mutex<Scrapes>,
    /// Signalled when the last scrape in progress ends, or the store closes.
    pub(super) scrapes_done: Condvar,
    /// The longest the checkpointer yields to scrapes in one segment, in milliseconds
    /// (`checkpoint::MAX_YIELD_PER_SEGMENT`; tests lower it).
    pub(super) max_yield_ms: AtomicU64,
    /// Tests: where a store thread stops ([`Shared::pause_at`]) until the test lets it go on.
    #[cfg(test)]
    pub(super) pause: Mutex<Option<Pause>>,
}

/// A point where a test stops the store ([`Shared::pause_at`]): to commit a put there, which the
/// committer does at any time (it does not take `mutation`).
#[cfg(test)]
pub(super) struct Pause {
    /// The point's name, as the code passes it to [`Shared::pause_at`].
    pub(super) at: &'static str,
    /// Told when a thread reaches it.
    pub(super) reached: crossbeam_channel::Sender<()>,
    /// Waited on there.
    pub(super) go_on: crossbeam_channel::Receiver<()>,
}

#[cfg(test)]
impl Shared {
    /// Stops here, at the point named `at`, when a test set a [`Pause`] for it: the first thread
    /// to get there, once (the pause is taken).
    pub(super) fn pause_at(&self, at: &'static str) {
        let pause = {
            let mut pause = lock(&self.pause);
            match pause.as_ref().is_some_and(|pause| pause.at == at) {
                true => pause.take(),
                false => None,
            }
        };
        if let Some(pause) = pause {
            let _ = pause.reached.send(());
            let _ = pause.go_on.recv();
        }
    }
}

/// What the checkpointer waits on while it yields.
#[derive(Default)]
pub(super) struct Scrapes {
    pub(super) in_progress: usize,
    pub(super) closing: bool,
}

/// One indexed cluster.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) received_millis: u64,
    /// The TTL counts from this: the newest sample's timestamp (see [`newest_sample_ms`]).
    pub(super) newest_sample_ms: i64,
    /// The payload's newest remote-write sample (`i64::MIN`: none), as the caller of the put said
    /// (see [`super::Store::newest_received`]); `None` until learned for a cluster indexed from
    /// a version 2 file, which does not record it.
    pub(super) newest_received_ms: Option<i64>,
    pub(super) payload_bytes: u64,
    pub(super) location: Location,
    /// Which put this is: a new number for every payload the index takes (a put, a replayed
    /// record, an indexed file), kept by a checkpoint (same payload, another place). Tells a
    /// caller that remembers a payload whether it is still the one stored
    /// ([`super::Store::version`]).
    pub(super) version: u64,
}

/// Where a cluster's newest upload is.
#[derive(Clone, Debug)]
pub(super) enum Location {
    /// In its cluster file, the one with this inode. `verified` once a read checked that file's
    /// checksum: open indexes files from their headers only, and a checkpoint's new file is
    /// unverified too, so each file version's payload is hashed by its first read, not by
    /// every `/federate` scrape.
    File {
        inode: u64,
        verified: bool,
        /// The payload's pages, mapped by the first pin taken for ranges of this file once it
        /// was verified, and kept for the pins of later scrapes while this entry names the file
        /// (`read`'s "Mappings kept").
        mapped: Option<MappedPayload>,
    },
    /// In a journal segment, not yet checkpointed; `offset` is where its record's image starts,
    /// `encoding` how the record keeps the payload (packed: read decompressed, its length is
    /// the entry's `payload_bytes`).
    Journal {
        segment: Arc<Segment>,
        offset: u64,
        encoding: Encoding,
    },
    /// In a journal segment as a chain (the `patch` module): the (plain) image record at
    /// `image`, then the patch records at `patches`, all in `segment`, applied in order.
    Chain {
        segment: Arc<Segment>,
        image: u64,
        patches: Vec<u64>,
        /// Bytes of the patches' payloads, so a read stays within twice the payload.
        patch_bytes: u64,
    },
}

impl Location {
    /// Whether this keeps a mapping of its file (unmapped when it is dropped, a system call best
    /// not made under the index's lock).
    pub(super) fn mapped(&self) -> bool {
        matches!(
            self,
            Location::File {
                mapped: Some(_),
                ..
            }
        )
    }

    /// Whether this holds the last reference to its journal segment, which dropping it closes
    /// (and unmaps, when a read mapped it): a segment retired while its checkpoint failed lives
    /// on only in the entries that point into it.
    pub(super) fn holds_last_segment(&self) -> bool {
        match self {
            Location::File { .. } => false,
            Location::Journal { segment, .. } | Location::Chain { segment, .. } => {
                Arc::strong_count(segment) == 1
            }
        }
    }

    /// The segment and offset of the newest record of a journal location (an image's, or a
    /// chain's last patch): a checkpoint writes a cluster's file only while this is unchanged.
    pub(super) fn newest_record(&self) -> Option<(u64, u64)> {
        match self {
            Location::File { .. } => None,
            Location::Journal {
                segment, offset, ..
            } => Some((segment.number, *offset)),
            Location::Chain {
                segment,
                image,
                patches,
                ..
            } => Some((segment.number, patches.last().copied().unwrap_or(*image))),
        }
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) commits: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) corrupt_files: AtomicU64,
    pub(super) expired: AtomicU64,
    /// Microseconds the checkpointer waited for scrapes to end.
    pub(super) checkpoint_yielded_micros: AtomicU64,
}

/// A poisoned lock only means another thread panicked while holding it; the data it guards (an
/// index, or nothing) is still consistent enough to go on, and the store must not panic.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    telemeter_common::sync::lock(mutex)
}

/// Whether an upload whose newest sample is stamped `newest_sample_ms` is still served at `now`.
pub(super) fn is_live(newest_sample_ms: i64, now: SystemTime, ttl: Duration) -> bool {
    let now_ms = i64::try_from(telemeter_common::time::unix_millis(now)).unwrap_or(i64::MAX);
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    // A sample from the future (within the allowed skew, or the clock stepped back) is live.
    newest_sample_ms >= now_ms.saturating_sub(ttl_ms)
}

/// Whether a sample stamped `sample_ms` is within `ttl` of `at_millis` (a receive time): how
/// the store, and the uploads that ask it, tell that a cluster's remote-write series are still
/// served, so that one rule decides it on both sides.
pub fn is_recent(sample_ms: i64, at_millis: u64, ttl: Duration) -> bool {
    let at_ms = i64::try_from(at_millis).unwrap_or(i64::MAX);
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    sample_ms >= at_ms.saturating_sub(ttl_ms)
}

/// The time the TTL of `payload`, received at `received_millis`, counts from: its newest sample's
/// timestamp; its receive time when it has none or does not decode (then it is not served anyway).
pub(super) fn newest_sample_ms(payload: &[u8], received_millis: u64) -> i64 {
    match wire::newest_timestamp(payload) {
        Ok(Some(newest)) => newest,
        Ok(None) | Err(_) => i64::try_from(received_millis).unwrap_or(i64::MAX),
    }
}

impl Shared {
    /// Where `cluster_id`'s file is.
    pub(super) fn path_of(&self, cluster_id: &str) -> PathBuf {
        self.dir.join(file::file_name(cluster_id))
    }
}

/// Flushes the whole file system holding the directory; false when that failed or is unavailable.
#[cfg(target_os = "linux")]
pub(super) fn sync_file_system(shared: &Shared) -> bool {
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
pub(super) fn sync_file_system(_shared: &Shared) -> bool {
    false
}
