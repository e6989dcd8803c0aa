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
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            StoreError::Locked { .. } | StoreError::Format { .. } | StoreError::Closed => None,
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
