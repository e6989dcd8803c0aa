//! Reading one cluster's upload: from the journal segment that holds it until the checkpoint
//! (decompressed when the record is packed), then from its cluster file, verified by the first
//! read of each file version (the index remembers it, so later `/federate` scrapes skip the
//! SHA-256); or pinned ([`PinnedUpload`]) for `/federate`, which reads each family's bytes again
//! later.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::file::{self, ReadError, Reading};
use super::journal::{self, Encoding, Segment};
use super::patch;
use super::state::{is_live, lock, Entry, Location, Shared};
use super::{StoreError, StoredUpload};

/// A verified upload whose payload bytes stay readable, unchanged, for as long as this is held,
/// whatever the store does meanwhile (a newer upload, a checkpoint, a removal): it holds the
/// file or journal segment it was read from open, and those are only ever renamed or unlinked,
/// never rewritten in place. `/federate` indexes a payload's families, drops the payload, and
/// reads each family again when its turn comes, so a scrape holds one open file per cluster
/// rather than every payload. A packed journal record (snappy framed as it arrived) cannot be
/// read in ranges: its pin holds the payload decompressed, and the journal bounds what those
/// can take (a segment is checkpointed into plain files once the packed payloads the index
/// finds in it pass `journal::PACKED_BUDGET` decompressed).
pub struct PinnedUpload {
    /// The upload as read (payload included: the caller drops it when done indexing).
    pub upload: StoredUpload,
    pin: Pin,
    /// Where the payload starts in the pinned file.
    payload_offset: u64,
    payload_len: u64,
    /// Whether `upload.payload` holds the payload: a lazy pin of a file verified before leaves
    /// it unread ([`Store::get_pinned_lazily`](super::Store::get_pinned_lazily)).
    payload_read: bool,
    /// Which file version this pins, for a pin of a cluster file.
    version: Option<PinVersion>,
}

/// Which version of a cluster's file a pin holds: two pins with equal versions hold the same
/// bytes, by the rule the store trusts a file it verified by (the same file, by device and inode,
/// with the same receive time and payload length), and the store's directory tells apart stores
/// open in one process. `/federate` keeps what it learnt from a payload (where its families are)
/// under it, and does not read that payload again while the version is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PinVersion {
    directory: (u64, u64),
    file: (u64, u64),
    received_millis: u64,
    payload_len: u64,
}

enum Pin {
    File(File),
    Segment(Arc<Segment>),
    /// A payload no file holds whole: a packed record's, decompressed, or one rebuilt from a
    /// chain (the `patch` module); empty when nothing will read ranges of it.
    Memory(Vec<u8>),
}

impl PinnedUpload {
    /// The payload's length, whether or not it was read.
    pub fn payload_len(&self) -> u64 {
        self.payload_len
    }

    /// Whether `upload.payload` holds the payload (always, except in a lazy pin of a file
    /// verified before: read it in ranges then).
    pub fn payload_read(&self) -> bool {
        self.payload_read
    }

    /// The file version this pins; `None` for a payload pinned from the journal.
    pub fn version(&self) -> Option<PinVersion> {
        self.version
    }

    /// The length of the payload range `start..end`; a range past the payload's end is refused.
    fn range_len(&self, start: u64, end: u64) -> io::Result<usize> {
        if start > end || end > self.payload_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {start}..{end} outside a payload of {} bytes",
                    self.payload_len
                ),
            ));
        }
        usize::try_from(end - start)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too long"))
    }

    /// Replaces `buffer` with the payload bytes `start..end` (offsets into the payload, as
    /// [`StoredUpload::payload`] had them). The bytes were verified when pinned; a range past
    /// the payload's end is refused.
    pub fn read_range(&self, start: u64, end: u64, buffer: &mut Vec<u8>) -> io::Result<()> {
        let len = self.range_len(start, end)?;
        buffer.clear();
        let file = match &self.pin {
            Pin::File(file) => file,
            Pin::Segment(segment) => &segment.file,
            Pin::Memory(payload) => {
                // `start..end` is within `payload_len`, its length.
                let range = usize::try_from(start).ok().zip(usize::try_from(end).ok());
                let bytes = range.and_then(|(start, end)| payload.get(start..end));
                return match bytes {
                    Some(bytes) => {
                        buffer.extend_from_slice(bytes);
                        Ok(())
                    }
                    None => Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the pinned payload is not held",
                    )),
                };
            }
        };
        buffer.resize(len, 0);
        file.read_exact_at(buffer, self.payload_offset + start)
    }
}

/// Opens a cluster file for reading without updating its access time where the kernel lets us
/// (`O_NOATIME`, for the files' owner): `/federate` reads each pinned file once per family, and
/// every read otherwise went through the access-time check. Opened plainly when refused (a
/// store directory owned by another user).
fn open_for_reading(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(path),
        opened => opened,
    }
}

impl PinnedUpload {
    /// The payload bytes `start..end`, as [`PinnedUpload::read_range`] reads them, read into the
    /// front of `buffer` (which only ever grows, so a scrape that reads every family of every
    /// cluster does not zero each range before reading it) or, when the pin holds them in
    /// memory, borrowed from there without a copy.
    pub fn read_range_reusing<'b>(
        &'b self,
        start: u64,
        end: u64,
        buffer: &'b mut Vec<u8>,
    ) -> io::Result<&'b [u8]> {
        let len = self.range_len(start, end)?;
        let file = match &self.pin {
            Pin::File(file) => file,
            Pin::Segment(segment) => &segment.file,
            Pin::Memory(payload) => {
                let range = usize::try_from(start).ok().zip(usize::try_from(end).ok());
                return range
                    .and_then(|(start, end)| payload.get(start..end))
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "the pinned payload is not held",
                        )
                    });
            }
        };
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        let bytes = buffer
            .get_mut(..len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range too long"))?;
        file.read_exact_at(bytes, self.payload_offset + start)?;
        Ok(bytes)
    }
}

impl Shared {
    /// `cluster_id`'s upload if it is live: from its journal record until that is checkpointed,
    /// then from its file, verified; a corrupt file is set aside and reads as absent.
    pub(super) fn get(&self, cluster_id: &str) -> Result<Option<StoredUpload>, StoreError> {
        Ok(self
            .read_pinned(cluster_id, false, false)?
            .map(|pinned| pinned.upload))
    }

    /// As [`Shared::get`], keeping the file it was read from open ([`PinnedUpload`]). With
    /// `lazy`, a cluster file verified before is pinned without reading its payload (only its
    /// header is read and checked): the caller reads what it needs in ranges.
    pub(super) fn get_pinned(
        &self,
        cluster_id: &str,
        lazy: bool,
    ) -> Result<Option<PinnedUpload>, StoreError> {
        self.read_pinned(cluster_id, true, lazy)
    }

    /// [`Shared::get_pinned`]; a packed record's pin holds a copy of its payload only when
    /// `ranges` (ranges will be read from it).
    fn read_pinned(
        &self,
        cluster_id: &str,
        ranges: bool,
        lazy: bool,
    ) -> Result<Option<PinnedUpload>, StoreError> {
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
                    payload_read: true,
                    version: None,
                    // The one copy the ranges need; the upload's own is the caller's.
                    pin: Pin::Memory(match ranges {
                        true => payload.clone(),
                        false => Vec::new(),
                    }),
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
        if let Location::Journal {
            segment,
            offset,
            encoding,
        } = &entry.location
        {
            let context = || format!("reading {} at {offset}", segment.path.display());
            return match segment.read_put(cluster_id, *offset, entry.payload_bytes, *encoding) {
                Ok((header, payload)) if header.cluster_id == cluster_id => {
                    let pin = match encoding {
                        Encoding::Plain => Pin::Segment(Arc::clone(segment)),
                        // The one copy the ranges need; the upload's own is the caller's.
                        Encoding::Packed { .. } if ranges => Pin::Memory(payload.clone()),
                        Encoding::Packed { .. } => Pin::Memory(Vec::new()),
                    };
                    Ok(Some(PinnedUpload {
                        payload_offset: match encoding {
                            Encoding::Plain => journal::payload_offset(*offset, cluster_id),
                            Encoding::Packed { .. } => 0,
                        },
                        payload_len: payload.len() as u64,
                        payload_read: true,
                        version: None,
                        pin,
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
        let read = || match self.read_upload(cluster_id, &path, &entry, lazy) {
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
    /// length); a verified file is then marked so in the index. With `lazy`, such a file's
    /// payload is not read (its header is, and checked against the file's length).
    fn read_upload(
        &self,
        cluster_id: &str,
        path: &Path,
        entry: &Entry,
        lazy: bool,
    ) -> Result<PinnedUpload, ReadError> {
        let mut opened = open_for_reading(path).map_err(ReadError::Io)?;
        let metadata = opened.metadata().map_err(ReadError::Io)?;
        let (file_len, inode) = (metadata.len(), metadata.ino());
        let trusted = matches!(
            entry.location,
            Location::File { inode: known, verified: true } if known == inode
        );
        let mut read = file::read_as(
            &opened,
            file_len,
            if trusted && lazy {
                Reading::HeaderOnly
            } else if trusted {
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
        let version = PinVersion {
            directory: self.dir_identity,
            file: (metadata.dev(), inode),
            received_millis: header.received_millis,
            payload_len: header.payload_len,
        };
        let payload_read = payload.is_some();
        let payload = payload.unwrap_or_default();
        Ok(PinnedUpload {
            // The payload is the file's tail (`read_as` checked the lengths add up).
            payload_offset: file_len.saturating_sub(header.payload_len),
            payload_len: header.payload_len,
            payload_read,
            version: Some(version),
            pin: Pin::File(opened),
            upload: StoredUpload {
                cluster_id: header.cluster_id,
                received: telemeter_common::time::from_unix_millis(header.received_millis),
                payload,
            },
        })
    }
}
