//! Reading one cluster's upload: from the journal segment that holds it until the checkpoint,
//! then from its cluster file, verified by the first read of each file version (the index
//! remembers it, so later `/federate` scrapes skip the SHA-256); or pinned ([`PinnedUpload`]) for
//! `/federate`, which reads each family's bytes again later.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::file::{self, ReadError, Reading};
use super::journal::{self, Segment};
use super::patch;
use super::state::{is_live, lock, Entry, Location, Shared};
use super::{StoreError, StoredUpload};

/// A verified upload whose payload bytes stay readable, unchanged, for as long as this is held,
/// whatever the store does meanwhile (a newer upload, a checkpoint, a removal): it holds the
/// file or journal segment it was read from open, and those are only ever renamed or unlinked,
/// never rewritten in place. `/federate` indexes a payload's families, drops the payload, and
/// reads each family again when its turn comes, so a scrape holds one open file per cluster
/// rather than every payload.
pub struct PinnedUpload {
    /// The upload as read (payload included: the caller drops it when done indexing).
    pub upload: StoredUpload,
    pin: Pin,
    /// Where the payload starts in the pinned file.
    payload_offset: u64,
    payload_len: u64,
}

enum Pin {
    File(File),
    Segment(Arc<Segment>),
    /// A payload rebuilt from a chain (the `patch` module), which no file holds whole.
    Memory(Arc<[u8]>),
}

impl PinnedUpload {
    /// Replaces `buffer` with the payload bytes `start..end` (offsets into the payload, as
    /// [`StoredUpload::payload`] had them). The bytes were verified when pinned; a range past
    /// the payload's end is refused.
    pub fn read_range(&self, start: u64, end: u64, buffer: &mut Vec<u8>) -> io::Result<()> {
        if start > end || end > self.payload_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {start}..{end} outside a payload of {} bytes",
                    self.payload_len
                ),
            ));
        }
        let len = usize::try_from(end - start)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too long"))?;
        buffer.clear();
        buffer.resize(len, 0);
        let file = match &self.pin {
            Pin::File(file) => file,
            Pin::Segment(segment) => &segment.file,
            Pin::Memory(payload) => {
                // `end` is within the payload (checked above), so this range is too.
                let from = usize::try_from(start).unwrap_or(usize::MAX);
                let range = payload.get(from..).and_then(|rest| rest.get(..len));
                return match range {
                    Some(bytes) => {
                        buffer.copy_from_slice(bytes);
                        Ok(())
                    }
                    None => Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "range outside the payload",
                    )),
                };
            }
        };
        file.read_exact_at(buffer, self.payload_offset + start)
    }
}

impl Shared {
    /// `cluster_id`'s upload if it is live: from its journal record until that is checkpointed,
    /// then from its file, verified; a corrupt file is set aside and reads as absent.
    pub(super) fn get(&self, cluster_id: &str) -> Result<Option<StoredUpload>, StoreError> {
        Ok(self.get_pinned(cluster_id)?.map(|pinned| pinned.upload))
    }

    /// As [`Shared::get`], keeping the file it was read from open ([`PinnedUpload`]).
    pub(super) fn get_pinned(&self, cluster_id: &str) -> Result<Option<PinnedUpload>, StoreError> {
        let Some(entry) = lock(&self.index).get(cluster_id).cloned() else {
            return Ok(None);
        };
        if !is_live(entry.newest_sample_ms, SystemTime::now(), self.ttl) {
            return Ok(None);
        }
        if let Location::Chain {
            segment,
            image,
            patches,
            ..
        } = &entry.location
        {
            let context = || format!("reading {} at {image}", segment.path.display());
            return match patch::read_chain(
                segment,
                cluster_id,
                *image,
                patches,
                entry.payload_bytes,
            ) {
                Ok((received_millis, payload)) => Ok(Some(PinnedUpload {
                    payload_offset: 0,
                    payload_len: payload.len() as u64,
                    pin: Pin::Memory(Arc::from(payload.as_slice())),
                    upload: StoredUpload {
                        cluster_id: cluster_id.to_string(),
                        received: telemeter_common::time::from_unix_millis(received_millis),
                        payload,
                    },
                })),
                Err(ReadError::Corrupt(reason)) => Err(StoreError::format(context(), reason)),
                Err(ReadError::Io(error)) => Err(StoreError::io(context(), error)),
            };
        }
        if let Location::Journal { segment, offset } = &entry.location {
            let context = || format!("reading {} at {offset}", segment.path.display());
            return match segment.read_put(cluster_id, *offset, entry.payload_bytes) {
                Ok((header, payload)) if header.cluster_id == cluster_id => {
                    Ok(Some(PinnedUpload {
                        payload_offset: journal::payload_offset(*offset, cluster_id),
                        payload_len: payload.len() as u64,
                        pin: Pin::Segment(Arc::clone(segment)),
                        upload: StoredUpload {
                            cluster_id: header.cluster_id,
                            received: telemeter_common::time::from_unix_millis(
                                header.received_millis,
                            ),
                            payload,
                        },
                    }))
                }
                Ok((header, _)) => Err(StoreError::format(
                    context(),
                    format!("holds cluster {:?}", header.cluster_id),
                )),
                Err(ReadError::Corrupt(reason)) => Err(StoreError::format(context(), reason)),
                Err(ReadError::Io(error)) => Err(StoreError::io(context(), error)),
            };
        }
        let path = self.path_of(cluster_id);
        // The upload, or none; `Err` inside when the file is corrupt (with the reason).
        let read = || match self.read_upload(cluster_id, &path, &entry) {
            Ok(upload) => Ok(Ok(Some(upload))),
            // Removed or swept since the index was read.
            Err(ReadError::Io(error)) if error.kind() == io::ErrorKind::NotFound => Ok(Ok(None)),
            Err(ReadError::Io(error)) => {
                Err(StoreError::io(format!("reading {}", path.display()), error))
            }
            Err(ReadError::Corrupt(reason)) => Ok(Err(reason)),
        };
        if let Ok(found) = read()? {
            return Ok(found);
        }
        // Read again under the mutation lock: the committer may have replaced the file in
        // between, and a good new file must not be set aside.
        let _mutation = lock(&self.mutation);
        match read()? {
            Ok(found) => Ok(found),
            Err(reason) => {
                lock(&self.index).remove(cluster_id);
                self.set_aside(&file::file_name(cluster_id), &reason);
                Ok(None)
            }
        }
    }

    /// Reads `cluster_id`'s file, keeping it open: verified, unless it is the very file the index
    /// `entry` says a read has verified already (same inode, same receive time and payload
    /// length); a verified file is then marked so in the index.
    fn read_upload(
        &self,
        cluster_id: &str,
        path: &Path,
        entry: &Entry,
    ) -> Result<PinnedUpload, ReadError> {
        let mut opened = File::open(path).map_err(ReadError::Io)?;
        let metadata = opened.metadata().map_err(ReadError::Io)?;
        let (file_len, inode) = (metadata.len(), metadata.ino());
        let trusted = matches!(
            entry.location,
            Location::File { inode: known, verified: true } if known == inode
        );
        let mut read = file::read_as(
            &opened,
            file_len,
            if trusted {
                Reading::Trusted
            } else {
                Reading::Verified { keep_payload: true }
            },
        )?;
        let (header, _) = &read;
        if trusted
            && (header.received_millis != entry.received_millis
                || header.payload_len != entry.payload_bytes)
        {
            // Another file under a reused inode number: not the one verified.
            opened.seek(SeekFrom::Start(0)).map_err(ReadError::Io)?;
            read = file::read_as(&opened, file_len, Reading::Verified { keep_payload: true })?;
        }
        let (header, payload) = read;
        if header.cluster_id != cluster_id {
            return Err(ReadError::Corrupt(format!(
                "holds cluster {:?}, whose file has another name",
                header.cluster_id
            )));
        }
        if !trusted {
            // Only the entry of this very file: a checkpoint may have renamed a newer one over
            // it since, which its own first read verifies.
            if let Some(current) = lock(&self.index).get_mut(cluster_id) {
                if let Location::File {
                    inode: known,
                    verified,
                } = &mut current.location
                {
                    if *known == inode
                        && current.received_millis == header.received_millis
                        && current.payload_bytes == header.payload_len
                    {
                        *verified = true;
                    }
                }
            }
        }
        let payload = payload.unwrap_or_default();
        Ok(PinnedUpload {
            // The payload is the file's tail (`read_as` checked the lengths add up).
            payload_offset: file_len.saturating_sub(payload.len() as u64),
            payload_len: payload.len() as u64,
            pin: Pin::File(opened),
            upload: StoredUpload {
                cluster_id: header.cluster_id,
                received: telemeter_common::time::from_unix_millis(header.received_millis),
                payload,
            },
        })
    }
}
