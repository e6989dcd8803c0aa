//! The store's public types: its configuration, its errors, and what it hands out.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::LOCK_FILE;

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
    /// Bytes the store wrote or is asked to write do not have the expected form (a journal
    /// record that does not verify, an id too long to encode).
    Format {
        /// What was being done, e.g. "reading /var/lib/telemeter/journal-3 at 4096".
        context: String,
        /// What is wrong with them.
        reason: String,
    },
    /// The committer thread has stopped (the store is shutting down).
    Closed,
    /// An upload as sent was not stored: by its commit its cluster had remote-write series
    /// within the TTL, which replacing the payload would erase. Nothing of it was journaled; its
    /// payload is handed back, to be merged instead ([`Returned::into_families`]).
    UsesRemoteWrite(Returned),
    /// A merge's payload was not stored: its cluster's stored payload changed each time the
    /// merge was made over it (a put of another path committed between the read and the
    /// commit). Nothing of it was journaled; the sender may try again.
    Contended {
        /// The cluster.
        cluster_id: String,
    },
}

/// An upload the store handed back ([`StoreError::UsesRemoteWrite`]).
#[derive(Debug)]
pub struct Returned {
    /// The cluster it was put for.
    pub cluster_id: String,
    pub(super) payload: Vec<u8>,
    /// `Some(families' length)` when `payload` is the upload as it arrived (snappy framed)
    /// rather than its families.
    pub(super) packed: Option<u64>,
}

impl Returned {
    /// Whether it was handed to the store as it arrived (snappy framed): then a caller that lent
    /// its families ([`super::Store::put_unchanged_lent`]) has them back already.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The upload's families, protobuf-delimited (decompressed when it was handed to the store
    /// as it arrived).
    pub fn into_families(self) -> Result<Vec<u8>, StoreError> {
        let Some(plain_len) = self.packed else {
            return Ok(self.payload);
        };
        let plain_len = usize::try_from(plain_len).unwrap_or(usize::MAX);
        telemeter_common::snappy::decode_framed(&self.payload, plain_len).map_err(|e| {
            StoreError::format(
                format!("decompressing an upload of cluster {:?}", self.cluster_id),
                e.to_string(),
            )
        })
    }
}

/// What became of a merge's payload put over one stored payload ([`super::Store::put_merged`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Durable and served: the [`super::Store::version`] the index gave it.
    Current(u64),
    /// Durable, and replaced by a later put of the same commit.
    Superseded,
    /// Not stored, nothing journaled: the stored payload is no longer the one it was made over.
    /// The caller merges again over what is stored now.
    Moved,
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
            StoreError::Format { context, reason } => write!(f, "{context}: {reason}"),
            StoreError::Closed => write!(f, "the store is closed"),
            StoreError::UsesRemoteWrite(returned) => write!(
                f,
                "cluster {:?} pushes by remote write now: its upload is merged, not stored as sent",
                returned.cluster_id
            ),
            StoreError::Contended { cluster_id } => write!(
                f,
                "cluster {cluster_id:?} changed under every attempt to merge into it; try again"
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            StoreError::Locked { .. }
            | StoreError::Format { .. }
            | StoreError::Closed
            | StoreError::UsesRemoteWrite(_)
            | StoreError::Contended { .. } => None,
        }
    }
}

impl StoreError {
    /// An I/O failure while doing `context`.
    pub(super) fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }

    /// Bytes of the wrong form met while doing `context`.
    pub(super) fn format(context: impl Into<String>, reason: impl Into<String>) -> StoreError {
        StoreError::Format {
            context: context.into(),
            reason: reason.into(),
        }
    }

    /// An equal error, for each caller that shares one failure (`io::Error` is not `Clone`).
    pub(super) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Locked { dir } => StoreError::Locked { dir: dir.clone() },
            StoreError::Io { context, source } => StoreError::Io {
                context: context.clone(),
                source: match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            StoreError::Format { context, reason } => StoreError::Format {
                context: context.clone(),
                reason: reason.clone(),
            },
            StoreError::Closed => StoreError::Closed,
            // Never shared: said of one request alone. Its payload stays with it.
            StoreError::UsesRemoteWrite(returned) => StoreError::UsesRemoteWrite(Returned {
                cluster_id: returned.cluster_id.clone(),
                payload: Vec::new(),
                packed: None,
            }),
            StoreError::Contended { cluster_id } => StoreError::Contended {
                cluster_id: cluster_id.clone(),
            },
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
    /// Microseconds the checkpointer waited for `/federate` scrapes to end since start.
    pub checkpoint_yielded_micros: u64,
}
