//! The checkpointer: for each full journal segment, writes the cluster files of the clusters whose
//! newest upload is in it (temp file, synced, renamed over the cluster's file, one directory sync
//! for all), then deletes the segment (or, with egress on, moves it to `egress/` until it is
//! shipped). A cluster uploaded many times per segment is written once.
//!
//! A packed record (the upload as it arrived, snappy framed) is decompressed into a plain file,
//! in the same format as before: `/federate` reads each family's byte range of every cluster's
//! file with one `pread` and holds no payload in memory, which a compressed file would not allow
//! (it would have to be decompressed whole, for every cluster at once, by every scrape). The
//! bytes saved by packing are the journal's: it takes every upload, the files one per cluster
//! and segment.
//!
//! While a `/federate` scrape runs ([`super::Store::scrape`]) the checkpointer waits before each
//! file it would write, within bounds (`MAX_YIELD_PER_SEGMENT`, `MAX_WAITING_TO_YIELD`): right
//! after a bulk load its 10,000 file creations took one of two cores and the directory from the
//! first scrape, which an operator's Prometheus (with its scrape timeout) needs more than the
//! compaction. The journal holds every upload durably meanwhile; only its disk space grows.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::file;
use super::journal::{Encoding, Segment};
use super::patch;
use super::state::{lock, sync_file_system, Location, Shared};
use super::TEMP_PREFIX;

/// The longest the checkpoint of one segment waits for scrapes in progress, in all: a scrape
/// of 10,000 clusters takes 1-2 s of the machine, and Prometheus's scrape timeout is 10 s by
/// default, so one scrape (or two back to back) finishes without the checkpointer; beyond it
/// the checkpointer goes on regardless, so scrapes every few seconds cannot starve it (a
/// segment is then checkpointed at most this much later than otherwise).
pub(super) const MAX_YIELD_PER_SEGMENT: Duration = Duration::from_secs(5);

/// Segments waiting behind the one being checkpointed past which the checkpointer yields no
/// more: each holds up to 256 MiB of journal on disk (and replay work at the next start), so
/// once it falls behind by more than one the journal's growth matters more than a scrape's pace.
pub(super) const MAX_WAITING_TO_YIELD: usize = 1;

/// Whether the checkpoint of a segment may yield to scrapes, and how long it still may.
pub(super) struct Yielding {
    left: Duration,
}

impl Yielding {
    /// No yielding: the checkpoint runs through.
    #[cfg(test)]
    fn never() -> Yielding {
        Yielding {
            left: Duration::ZERO,
        }
    }

    /// Up to the store's bound per segment, unless `waiting` segments wait behind.
    fn for_segment(shared: &Shared, waiting: usize) -> Yielding {
        let left = match waiting > MAX_WAITING_TO_YIELD {
            true => Duration::ZERO,
            false => Duration::from_millis(shared.max_yield_ms.load(Ordering::Relaxed)),
        };
        Yielding { left }
    }
}

/// Waits while a `/federate` scrape is in progress ([`super::Store::scrape`]), within what
/// `yielding` has left: the checkpointer's file creations and renames took one of the two cores
/// and the store directory from the first scrape after a bulk load (its 10,000 new files cost
/// 3-4 s of kernel time on ext4). It yields past the packed budget too
/// (`journal::PACKED_UNSETTLED_BUDGET`, which a bulk load always passes): the journal packs no
/// more uploads then, so the memory that reads of packed records hold stays bounded whatever
/// the checkpointer does, and yielding only keeps it journaling plain a few seconds longer.
fn yield_to_scrapes(shared: &Shared, yielding: &mut Yielding) {
    if yielding.left.is_zero() {
        return;
    }
    let scrapes = lock(&shared.scrapes);
    if scrapes.in_progress == 0 || scrapes.closing {
        return;
    }
    let started = Instant::now();
    let waited = shared
        .scrapes_done
        .wait_timeout_while(scrapes, yielding.left, |s| s.in_progress > 0 && !s.closing);
    // A poisoned lock only means a scrape panicked holding it; the count is still right.
    drop(waited);
    let waited = started.elapsed();
    yielding.left = yielding.left.saturating_sub(waited);
    shared
        .counters
        .checkpoint_yielded_micros
        .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
}

/// The checkpointer thread's loop: checkpoints each retired segment in turn.
pub(super) fn checkpoint_until_closed(shared: &Shared, retired: &Receiver<Arc<Segment>>) {
    // Once a segment could not be checkpointed it stays to be replayed, and so must every later
    // one: replaying it alone would put its older uploads over newer cluster files.
    let mut keep = false;
    for segment in retired {
        if !shared.checkpointing.load(Ordering::Relaxed) {
            // A test's crash: the segment stays on disk as it is, for the next open.
            continue;
        }
        let mut yielding = Yielding::for_segment(shared, retired.len());
        let done = checkpoint_yielding(shared, &segment, keep, &mut yielding);
        if done {
            settle(shared, &segment);
        }
        keep = !done || keep;
    }
}

/// Takes what reads of `segment`'s packed payloads held off [`Shared::packed_unsettled`]: its
/// clusters are read from their files now (or from later segments, which count their own).
fn settle(shared: &Shared, segment: &Segment) {
    let settled = segment.packed.load(Ordering::Relaxed);
    let _ = shared
        .packed_unsettled
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some(n.saturating_sub(settled))
        });
}

/// [`checkpoint_yielding`] without yielding, as tests checkpoint a segment.
#[cfg(test)]
pub(super) fn checkpoint(shared: &Shared, segment: &Arc<Segment>, keep: bool) -> bool {
    checkpoint_yielding(shared, segment, keep, &mut Yielding::never())
}

/// Writes the cluster files of the clusters whose newest upload is in `segment`, then deletes it.
/// On failure the segment stays: reads keep using it, and the next open replays it. With `keep`
/// the segment stays even on success. Returns whether it succeeded. Waits for the scrapes in
/// progress before each file it writes and before renaming them, as `yielding` allows.
fn checkpoint_yielding(
    shared: &Shared,
    segment: &Arc<Segment>,
    keep: bool,
    yielding: &mut Yielding,
) -> bool {
    if shared.egress.is_some() {
        // Egress reads it until shipped and counts its length as backlog: the zeros written
        // ahead after its records (and a torn tail a crash left) go first. Not synced: a crash
        // that undoes it leaves zeros, which every reader stops at.
        let cut = File::options()
            .write(true)
            .open(&segment.path)
            .and_then(|out| match out.metadata()?.len() > segment.written() {
                true => out.set_len(segment.written()),
                false => Ok(()),
            });
        if let Err(error) = cut {
            log::warn!("cutting {} to its records: {error}", segment.path.display());
        }
    }
    // (cluster, its newest record's offset, its location, payload bytes, newest sample, newest
    // remote-write sample)
    type InSegment = (String, u64, Location, u64, i64, Option<i64>);
    let in_segment: Vec<InSegment> = lock(&shared.index)
        .iter()
        .filter_map(|(id, entry)| match entry.location.newest_record() {
            Some((number, offset)) if number == segment.number => Some((
                id.clone(),
                offset,
                entry.location.clone(),
                entry.payload_bytes,
                entry.newest_sample_ms,
                entry.newest_received_ms,
            )),
            _ => None,
        })
        .collect();

    // (cluster, its record's offset, temp file, its inode, the temp file open)
    let mut written: Vec<(String, u64, PathBuf, u64, File)> = Vec::new();
    let mut failed = false;
    for (cluster_id, offset, location, payload_bytes, newest_sample_ms, newest_received_ms) in
        in_segment
    {
        yield_to_scrapes(shared, yielding);
        let temp = shared.dir.join(format!(
            "{}{}",
            TEMP_PREFIX,
            shared.next_temp.fetch_add(1, Ordering::Relaxed)
        ));
        // A chain is written as the payload it rebuilds, received when its last patch was.
        let read = match &location {
            Location::Chain { image, patches, .. } => {
                patch::read_chain(segment, &cluster_id, *image, patches, payload_bytes).map(
                    |(received_millis, payload)| (cluster_id.clone(), received_millis, payload),
                )
            }
            Location::Journal { encoding, .. } => segment
                .read_put(&cluster_id, offset, payload_bytes, *encoding)
                .map(|(header, payload)| (header.cluster_id, header.received_millis, payload)),
            Location::File { .. } => segment
                .read_put(&cluster_id, offset, payload_bytes, Encoding::Plain)
                .map(|(header, payload)| (header.cluster_id, header.received_millis, payload)),
        };
        let done = read
            .map_err(|e| match e {
                file::ReadError::Io(e) => e,
                file::ReadError::Corrupt(reason) => {
                    io::Error::new(io::ErrorKind::InvalidData, reason)
                }
            })
            .and_then(|(id, received_millis, payload)| {
                let image = file::encode_header(
                    &id,
                    received_millis,
                    newest_sample_ms,
                    // A journal entry always has it; the payload says otherwise.
                    newest_received_ms.unwrap_or_else(|| super::newest_received_in(&payload)),
                    &payload,
                )
                .map_err(|reason| io::Error::new(io::ErrorKind::InvalidInput, reason))?;
                let mut out = File::options().write(true).create_new(true).open(&temp)?;
                out.write_all(&image)?;
                out.write_all(&payload)?;
                // The rename keeps it: the index tells this version of the file by it.
                let inode = out.metadata()?.ino();
                Ok((inode, out))
            });
        match done {
            Ok((inode, out)) => written.push((cluster_id, offset, temp, inode, out)),
            Err(error) => {
                log::warn!(
                    "checkpointing {}: writing {} for cluster {cluster_id:?}: {error}",
                    segment.path.display(),
                    temp.display()
                );
                let _ = fs::remove_file(&temp);
                failed = true;
            }
        }
    }
    if !written.is_empty() && !sync_file_system(shared) {
        for (cluster_id, _, temp, _, out) in &written {
            if let Err(error) = out.sync_data() {
                log::warn!(
                    "checkpointing cluster {cluster_id:?}: syncing {}: {error}",
                    temp.display()
                );
                failed = true;
            }
        }
    }
    if failed {
        for (_, _, temp, _, _) in &written {
            let _ = fs::remove_file(temp);
        }
        log::warn!(
            "checkpointing {} failed; it stays and is replayed at the next start",
            segment.path.display()
        );
        return false;
    }

    yield_to_scrapes(shared, yielding);
    {
        // Rename under the mutation lock, and only files whose cluster still has this upload
        // as its newest: a later put, a remove or the sweeper may have moved on.
        let _mutation = lock(&shared.mutation);
        let mut renamed = Vec::new();
        for (cluster_id, offset, temp, inode, _) in &written {
            let current = lock(&shared.index)
                .get(cluster_id)
                .and_then(|e| e.location.newest_record())
                == Some((segment.number, *offset));
            if !current {
                let _ = fs::remove_file(temp);
                continue;
            }
            match fs::rename(temp, shared.path_of(cluster_id)) {
                Ok(()) => renamed.push((cluster_id, *offset, *inode)),
                Err(error) => {
                    log::warn!(
                        "checkpointing cluster {cluster_id:?}: renaming {}: {error}",
                        temp.display()
                    );
                    let _ = fs::remove_file(temp);
                    failed = true;
                }
            }
        }
        if let Err(error) = shared.dir_file.sync_all() {
            log::warn!(
                "checkpointing: syncing directory {}: {error}",
                shared.dir.display()
            );
            failed = true;
        }
        if !failed {
            let mut index = lock(&shared.index);
            for (cluster_id, offset, inode) in renamed {
                if let Some(entry) = index.get_mut(cluster_id.as_str()) {
                    if entry.location.newest_record() == Some((segment.number, offset)) {
                        // Verified by its first read, as every file version is: the bytes on
                        // disk are what that read checks, not what was meant to be written.
                        entry.location = Location::File {
                            inode,
                            verified: false,
                            mapped: None,
                        };
                    }
                }
            }
        }
    }
    if failed {
        log::warn!(
            "checkpointing {} failed; it stays and is replayed at the next start",
            segment.path.display()
        );
        return false;
    }
    if keep {
        return true;
    }
    // Synced, so a crash cannot bring the segment back to be replayed over newer files. With
    // egress on, it is set aside until shipped rather than deleted.
    let removed = shared
        .retire_segment(&segment.path, segment.number)
        .and_then(|()| shared.dir_file.sync_all());
    if let Err(error) = removed {
        // It may stay (or come back after a crash) to be replayed: every later segment must
        // stay too, or its older uploads would be replayed over their newer files.
        log::warn!(
            "removing checkpointed {}: {error}; it and every later segment stay and are replayed at the next start",
            segment.path.display()
        );
        // Its cluster files are written and indexed all the same: what reads of its packed
        // payloads held is settled (else one failed unlink kept the journal from packing for
        // the rest of the run).
        settle(shared, segment);
        return false;
    }
    true
}
