//! Opening a storage directory: temp files removed, every cluster file indexed from its header
//! (the bad headers set aside in `corrupt/`; a payload is verified by its first read), then the
//! journal replayed into the index. The replayed segments stay, served from, until the
//! checkpointer (started by the caller) has written their cluster files in the background and
//! removed them (or, with egress on, moved them to `egress/` until shipped), as it does for a
//! full segment: so open writes and syncs nothing, and a crash at any point of this leaves the
//! segments to be replayed again.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use super::file::{self, ReadError, Reading};
use super::journal::{self, Encoding, Segment};
use super::newest_received_in;
use super::patch;
use super::state::{lock, newest_sample_ms, Entry, Location, Shared};
use super::{StoreError, CORRUPT_DIR, LOCK_FILE, TEMP_PREFIX};

impl Shared {
    /// Removes temp files, indexes every cluster file by its header (setting aside the bad
    /// ones), then replays the journal into the index. Returns the replayed segments, oldest
    /// first, for the checkpointer.
    pub(super) fn recover(&self) -> Result<Vec<Arc<Segment>>, StoreError> {
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
            if name == LOCK_FILE
                || name == CORRUPT_DIR
                || name == super::egress::EGRESS_DIR
                || journal::is_segment_name(&name)
            {
                continue;
            }
            if !file::is_cluster_file_name(&name) {
                log::warn!("{}: unexpected file in the store, ignored", path.display());
                continue;
            }
            match index_file(&path) {
                Ok((cluster_id, _)) if file::file_name(&cluster_id) != name => self.set_aside(
                    &name,
                    &format!("holds cluster {cluster_id:?}, whose file has another name"),
                ),
                Ok((cluster_id, mut entry)) => {
                    entry.version = self.versions.fetch_add(1, Ordering::Relaxed);
                    index.insert(cluster_id, entry);
                }
                Err(ReadError::Corrupt(reason)) => self.set_aside(&name, &reason),
                Err(ReadError::Io(error)) => {
                    return Err(StoreError::io(format!("reading {}", path.display()), error))
                }
            }
        }
        *lock(&self.index) = index;
        self.replay_journal()
    }

    /// Applies the journal's segments, in order, to the index: reads find each cluster's newest
    /// record in its segment until the checkpointer has written it to the cluster's file. Every
    /// acknowledged upload not yet checkpointed is in a segment.
    fn replay_journal(&self) -> Result<Vec<Arc<Segment>>, StoreError> {
        let numbers = journal::list(&self.dir)
            .map_err(|e| StoreError::io(format!("listing directory {}", self.dir.display()), e))?;
        // Segments set aside for egress count too, and the replayed ones stay until
        // checkpointed: a new one must never take their numbers.
        let newest = super::egress::segment_numbers(&self.dir)?
            .last()
            .copied()
            .max(numbers.last().copied());
        if let Some(newest) = newest {
            lock(&self.journal).next_number = newest + 1;
        }
        let mut applied = 0u64;
        let mut segments = Vec::with_capacity(numbers.len());
        for &number in &numbers {
            let segment = Arc::new(Segment::open(&self.dir, number).map_err(|e| {
                StoreError::io(
                    format!(
                        "opening {}{number}",
                        self.dir.join(journal::PREFIX).display()
                    ),
                    e,
                )
            })?);
            let (end, torn) = journal::replay_to_end(&segment.path, |record| {
                applied += 1;
                self.apply(&segment, record)
            })
            .map_err(|e| StoreError::io(format!("replaying {}", segment.path.display()), e))?;
            // What a retirement cuts the segment to: the zeros written ahead (and a torn tail)
            // never reach egress.
            segment.set_written(end);
            if let Some((bytes, reason)) = torn {
                // An append a crash cut off; it was never answered Ok.
                log::info!(
                    "{}: the last {bytes} bytes are no whole record ({reason}); ignored",
                    segment.path.display()
                );
            }
            segments.push(segment);
        }
        if !numbers.is_empty() {
            log::info!(
                "replayed {applied} journal records from {} segment(s); their cluster files are \
                 written in the background",
                numbers.len()
            );
        }
        Ok(segments)
    }

    /// Applies one replayed journal record of `segment` to the index (and, for a removal, the
    /// directory).
    fn apply(&self, segment: &Arc<Segment>, record: journal::Record) -> io::Result<()> {
        let (encoding, payload_bytes, recorded_newest) = record.encoding();
        let cluster_id = record.header.cluster_id;
        if record.kind == journal::SHIP {
            // Shipped by egress from the segment; never served.
            return Ok(());
        }
        if record.kind == journal::REMOVE {
            // The removal may not have reached the file before the crash. Not synced here: the
            // segment holding this record is deleted only after the checkpoint syncs the
            // directory.
            let target = self.path_of(&cluster_id);
            match fs::remove_file(&target) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
            lock(&self.index).remove(&cluster_id);
            return Ok(());
        }
        if record.kind == journal::PATCH {
            let received_millis = record.header.received_millis;
            self.apply_patch(
                segment,
                &cluster_id,
                received_millis,
                &record.payload,
                record.offset,
            );
            return Ok(());
        }
        // A packed record says its decompressed length and newest sample: replay decompresses
        // nothing.
        let newest_sample_ms = recorded_newest
            .unwrap_or_else(|| newest_sample_ms(&record.payload, record.header.received_millis));
        // A record written before version 3 does not carry the marker: its payload says (the
        // payload is in memory now anyway). A packed record always carries "none" (it is a plain
        // upload), so its frames are never read as families here.
        let newest_received_ms = record
            .header
            .newest_received_ms
            .unwrap_or_else(|| newest_received_in(&record.payload));
        lock(&self.index).insert(
            cluster_id,
            Entry {
                received_millis: record.header.received_millis,
                newest_sample_ms,
                newest_received_ms: Some(newest_received_ms),
                payload_bytes,
                location: Location::Journal {
                    segment: Arc::clone(segment),
                    offset: record.offset,
                    encoding,
                },
                version: self.versions.fetch_add(1, Ordering::Relaxed),
            },
        );
        Ok(())
    }

    /// Extends `cluster_id`'s chain with the replayed patch `record` of `segment`: the index
    /// entry is the put (or chain) this patch was written over, earlier in the same segment (the
    /// committer never lets a chain cross a segment). Not applied here (that is a read's, or the
    /// checkpoint's), only checked against the entry and indexed. A patch that does not fit what
    /// the index holds (which the committer never writes) is left out with a warning: the
    /// cluster is served as before it.
    fn apply_patch(
        &self,
        segment: &Arc<Segment>,
        cluster_id: &str,
        received_millis: u64,
        payload: &[u8],
        offset: u64,
    ) {
        let header = patch::header(payload);
        let mut index = lock(&self.index);
        let entry = index.get_mut(cluster_id);
        let fits = match (&header, &entry) {
            (Ok((len, _, _)), Some(entry)) => {
                *len == entry.payload_bytes
                    && entry
                        .location
                        .newest_record()
                        .is_some_and(|(number, _)| number == segment.number)
                    // Only a plain image is patched (a packed one is an upload as sent, which
                    // the remote-write merge never patches).
                    && !matches!(
                        entry.location,
                        Location::Journal {
                            encoding: Encoding::Packed { .. },
                            ..
                        }
                    )
            }
            _ => false,
        };
        let (Ok((_, newest_sample_ms, newest_received_ms)), Some(entry), true) =
            (header, entry, fits)
        else {
            log::warn!(
                "{}: the patch of cluster {cluster_id:?} at {} does not follow its put in this \
                 segment; left out",
                segment.path.display(),
                offset
            );
            return;
        };
        let location = match std::mem::replace(
            &mut entry.location,
            Location::File {
                inode: 0,
                verified: false,
                mapped: None,
            },
        ) {
            Location::Journal {
                segment,
                offset: image,
                ..
            } => Location::Chain {
                segment,
                image,
                patches: vec![offset],
                patch_bytes: payload.len() as u64,
            },
            Location::Chain {
                segment,
                image,
                mut patches,
                patch_bytes,
            } => {
                patches.push(offset);
                Location::Chain {
                    segment,
                    image,
                    patches,
                    patch_bytes: patch_bytes + payload.len() as u64,
                }
            }
            file @ Location::File { .. } => file,
        };
        entry.location = location;
        entry.received_millis = received_millis;
        entry.newest_sample_ms = newest_sample_ms;
        entry.newest_received_ms = Some(newest_received_ms);
        entry.version = self.versions.fetch_add(1, Ordering::Relaxed);
    }

    /// Moves a damaged file to `corrupt/` so it is never served again, but kept for inspection.
    pub(super) fn set_aside(&self, name: &str, reason: &str) {
        let path = self.dir.join(name);
        let corrupt = self.dir.join(CORRUPT_DIR);
        let seconds = telemeter_common::time::unix_millis(SystemTime::now()) / 1000;
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
}

/// Indexes the cluster file at `path` from its header: its lengths are checked against its size,
/// its checksum is left to the first read of its payload (except in a version 1 file, read whole
/// for its newest sample's time, and so verified now). A version 2 file's newest remote-write
/// sample is left unknown, learned from its payload when first asked
/// ([`super::Store::newest_received`]), so open still reads headers only. The entry's version is
/// the caller's to set.
fn index_file(path: &Path) -> Result<(String, Entry), ReadError> {
    let opened = File::open(path).map_err(ReadError::Io)?;
    let metadata = opened.metadata().map_err(ReadError::Io)?;
    let (header, payload) = file::read_as(&opened, metadata.len(), Reading::HeaderOnly)?;
    let verified = payload.is_some();
    let newest_sample_ms = header.newest_sample_ms.unwrap_or_else(|| {
        newest_sample_ms(
            payload.as_deref().unwrap_or_default(),
            header.received_millis,
        )
    });
    // A version 1 payload was read whole anyway.
    let newest_received_ms = header
        .newest_received_ms
        .or_else(|| payload.as_deref().map(newest_received_in));
    Ok((
        header.cluster_id,
        Entry {
            received_millis: header.received_millis,
            newest_sample_ms,
            newest_received_ms,
            payload_bytes: header.payload_len,
            location: Location::File {
                inode: metadata.ino(),
                verified,
                mapped: None,
            },
            version: 0,
        },
    ))
}
