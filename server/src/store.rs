//! The durable store: one file per cluster, replaced atomically on every accepted upload.
//!
//! `DIR/<hex SHA-256 of the cluster id>` holds a small header (magic, format version, cluster id,
//! receive time, payload length, checksum) and the validated families as protobuf-delimited bytes.
//! A write goes to `DIR/.tmp-…`, is fsynced, renamed over the cluster's file, and the directory is
//! fsynced before [`Store::put`] returns. Concurrent puts share their syncs (group commit): a single
//! committer thread writes every pending upload's temp file, syncs them together, renames them, syncs
//! the directory once, and only then wakes each caller.
//!
//! The directory is locked (fs2) so a second server on it refuses to start. On open, temp files are
//! removed and files that fail their checksum are moved to `DIR/corrupt/` and never served. A cluster
//! not written for the TTL is no longer listed, and the sweeper removes its file.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How the store runs.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The storage directory (created if missing).
    pub dir: PathBuf,
    /// A cluster not written for this long is no longer served, and its file is removed.
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
        todo!()
    }
}

impl std::error::Error for StoreError {}

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
    _private: Arc<()>,
}

impl Store {
    /// Locks the directory, recovers it (temp files removed, corrupt files set aside), indexes the
    /// clusters it holds, and starts the committer and the TTL sweeper threads.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        todo!()
    }

    /// Stores `payload` as `cluster_id`'s upload received at `received`, replacing the previous one.
    /// Returns only once the data and the rename are durable on disk.
    pub fn put(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<(), StoreError> {
        todo!()
    }

    /// Like [`Store::put`], but keeps the stored upload when it is newer than `received` (used when
    /// ownership moves between servers). Returns whether `payload` was written.
    pub fn put_if_newer(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<bool, StoreError> {
        todo!()
    }

    /// The clusters served now (written within the TTL), in a stable order (by cluster id).
    pub fn clusters(&self) -> Vec<ClusterEntry> {
        todo!()
    }

    /// Reads one cluster's upload, verifying its checksum. `Ok(None)` when it is absent, expired, or
    /// (after being moved aside) corrupt.
    pub fn get(&self, cluster_id: &str) -> Result<Option<StoredUpload>, StoreError> {
        todo!()
    }

    /// Removes a cluster's file (used when another server took ownership of it).
    pub fn remove(&self, cluster_id: &str) -> Result<(), StoreError> {
        todo!()
    }

    /// Removes every cluster not written since `now - ttl`; returns how many.
    pub fn sweep(&self, now: SystemTime) -> usize {
        todo!()
    }

    /// The store's counters now.
    pub fn stats(&self) -> StoreStats {
        todo!()
    }

    /// The storage directory.
    pub fn dir(&self) -> &Path {
        todo!()
    }

    /// Stops the committer and the sweeper after the pending writes are done.
    pub fn close(&self) {
        todo!()
    }
}
