//! Reading one cluster's upload: from the journal segment that holds it until the checkpoint
//! (decompressed when the record is packed), then from its cluster file, verified by the first
//! read of each file version (the index remembers it, so later `/federate` scrapes skip the
//! SHA-256); or pinned ([`PinnedUpload`]) for `/federate`, which reads each family's bytes again
//! later.
//!
//! # Pins read through a mapping
//!
//! `/federate` reads each family of each pinned payload again (~30 ranges a cluster, ~300,000 a
//! scrape of 10,000 clusters), and a `pread` apiece put a quarter of the server's scrape CPU in
//! the kernel (the descriptor's reference count, the page cache walk, the copy). So a pin taken
//! for ranges ([`Shared::get_pinned`]) reads its payload's pages through a read-only mapping, and
//! its ranges are copied out of that mapping with no system call
//! ([`PinnedUpload::read_range_reusing`]). A cluster file's pin maps the pages of its payload; a
//! journal record's pin reads through the mapping of its whole segment ([`Segment::mapping`],
//! made once and shared by the pins of all its records, unmapped with the segment). When the
//! mapping fails, or [`MAX_MAPPINGS`] are already mapped, the pin reads by `pread` as before.
//!
//! # Mappings kept
//!
//! Mapping and unmapping each file, and the page faults that fill each new mapping's page table,
//! were a fifth of the server's CPU in a scrape of 10,000 unchanged clusters (`perf`): most
//! clusters push every few minutes, a central Prometheus scrapes every minute or less. So the
//! mapping of a verified cluster file is kept by its index entry ([`Location::File`]) after the
//! first pin that made it, and a later pin of the same payload by a caller that knows it
//! ([`Store::get_pinned_lazily`](super::Store::get_pinned_lazily) with its version) reads
//! through that mapping without opening the file. The mapping goes when the entry lets go of the
//! file: a newer upload (unmapped by the committer once it has let go of its locks), the TTL
//! sweep, a removal. A mapping holds no descriptor, but it holds the file's inode (and its
//! blocks, if the file was unlinked) and its pages count in the server's RSS (page cache, clean
//! and shared) for as long as it is kept: ~520 MB at 10,000 clusters of 500 series, the same as
//! during a scrape.
//!
//! A mapping is only safe while the bytes read through it stay in the file: a page past a file's
//! end raises `SIGBUS`, which kills the server. A segment's mapping reaches past its end (up to
//! [`SEGMENT_MAPPING_BYTES`]); only the payloads of its records are ever read through it. What
//! the store does to the files it maps:
//! - cluster files are written whole to a temp file, synced and renamed over the cluster's file
//!   (`checkpoint`), removed (`Store::remove`, the TTL sweep) or renamed aside (a corrupt one);
//!   never opened for writing once renamed, so never truncated or rewritten in place. A rename
//!   or an unlink leaves the pinned inode, and its pages, as they were.
//! - journal segments are appended to (`Shared::append_locked`) from a fresh page past every
//!   record already in them; the bytes of a record are never written again. They are cut short
//!   only past their records: the zeros written ahead, by the append whose zeros failed
//!   (`set_len` to where its own record ends or further) and by a checkpoint for egress
//!   (`set_len` to [`Segment::written`], where the last synced record ends, or for a segment an
//!   earlier run left, where its replay found the records end: a torn tail is never cut
//!   shorter). A segment left by an earlier run is only read (appends start a new segment),
//!   and a failed append starts a new one too. A patch is a record of its own, appended; the
//!   payload it patches is read into memory, never mapped.
//!
//! So the pages holding a pinned payload are never past the file's end: its last page starts
//! before the payload's end, which is at or before every length the file is cut to. That rests on
//! the store being the only writer of its directory (its lock file keeps a second server out);
//! a file cut short by hand under a running server, or a read error of the disk beneath a page
//! not in the page cache, raises `SIGBUS` where `pread` returned an error.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
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
    /// Which payload this pins; `None` for a cluster file that is not the index entry's.
    version: Option<PinVersion>,
    /// The payload's pages of the pinned file, mapped for a pin taken for ranges (see "Pins
    /// read through a mapping"); `None` reads by `pread`. Shared with the index entry of a
    /// verified cluster file, which keeps it for the next scrape ("Mappings kept").
    mapped: Option<MappedPayload>,
}

/// Which payload a pin holds, wherever it was read from (a journal record, a cluster file):
/// two pins with equal versions hold the same bytes. It is the index entry's
/// [`Entry::version`], which every payload the index takes gets anew and a checkpoint keeps
/// (same payload, another place), with the store's identity ([`Shared::identity`]: versions
/// start again from 0 with every open). A pin of a cluster file has it only when the file is
/// the entry's (same inode, receive time and payload length). `/federate` keeps what it learnt
/// from a payload (where its families are) under it, and does not read that payload again while
/// the version is unchanged, before or after the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PinVersion {
    store: u64,
    payload: u64,
}

enum Pin {
    File(File),
    Segment(Arc<Segment>),
    /// A payload no file holds whole: a packed record's, decompressed, or one rebuilt from a
    /// chain (the `patch` module); empty when nothing will read ranges of it.
    Memory(Vec<u8>),
    /// A cluster file's payload held by the mapping its index entry kept (`mapped` is it): the
    /// mapping keeps the file's pages, so no descriptor is needed.
    Mapped,
}

/// How many pins may hold a mapping at once, process-wide. Each mapping is an area of the
/// process's address space, and the kernel allows 65,530 of those by default
/// (`vm.max_map_count`): past it every `mmap` fails, the allocator's for large buffers and thread
/// stacks too. A quarter of that leaves the rest of the server plenty; the pins past it (a scrape
/// of more clusters, or concurrent scrapes) read by `pread`.
pub(super) const MAX_MAPPINGS: usize = 16_384;

/// Mappings held now, against [`MAX_MAPPINGS`].
static MAPPINGS: AtomicUsize = AtomicUsize::new(0);

#[cfg(test)]
thread_local! {
    /// Tests: mappings this thread asks for fail, as past [`MAX_MAPPINGS`] (a thread's own, so
    /// the tests running beside it still map).
    pub(super) static REFUSE_MAPPINGS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A read-only, shared mapping of pages of a store file (a cluster file's payload, or the whole
/// of a journal segment), unmapped when dropped.
pub(super) struct Mapping {
    /// Where the mapping starts: a page boundary of the file.
    base: NonNull<libc::c_void>,
    /// Bytes mapped from `base`.
    len: usize,
}

// SAFETY: a `Mapping` is an address range of the process that only this value unmaps (in its
// drop), read-only, so sending it to another thread is sending ownership of that range.
unsafe impl Send for Mapping {}
// SAFETY: shared references only read the mapped bytes (`Mapping::bytes`), which no one
// writes (PROT_READ here, and see "Pins read through a mapping" for the file's side).
unsafe impl Sync for Mapping {}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("len", &self.len).finish()
    }
}

impl Mapping {
    /// Maps `len` bytes of `file` from `offset`, a multiple of the page size; `None` for no
    /// bytes, past [`MAX_MAPPINGS`], or when `mmap` fails (reads fall back to `pread`). Only the
    /// bytes the caller reads ([`Mapping::bytes`]) must be in the file, for as long as it is
    /// mapped ("Pins read through a mapping"): the rest may lie past the file's end.
    fn new(file: &File, offset: u64, len: usize) -> Option<Mapping> {
        if len == 0 {
            return None;
        }
        #[cfg(test)]
        if REFUSE_MAPPINGS.with(std::cell::Cell::get) {
            return None;
        }
        let offset = libc::off_t::try_from(offset).ok()?;
        if MAPPINGS.fetch_add(1, Ordering::Relaxed) >= MAX_MAPPINGS {
            MAPPINGS.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        // SAFETY: a new mapping at an address the kernel picks, so no existing memory is
        // touched; the descriptor is open for reading (it is only read through the mapping).
        // Reading the mapping is safe for the pages within the file, which are the only ones
        // read (see the module doc's "Pins read through a mapping").
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            MAPPINGS.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let Some(base) = NonNull::new(base) else {
            MAPPINGS.fetch_sub(1, Ordering::Relaxed);
            return None;
        };
        Some(Mapping { base, len })
    }

    /// Maps the pages of `file` holding `len` bytes from `offset`: the mapping, and where those
    /// bytes start in it; `None` for no bytes, as [`Mapping::new`].
    fn of_range(file: &File, offset: u64, len: u64) -> Option<MappedPayload> {
        if len == 0 {
            return None;
        }
        let page = page_size()?;
        let start = offset - offset % page;
        let at = usize::try_from(offset - start).ok()?;
        let mapping = Mapping::new(file, start, at.checked_add(usize::try_from(len).ok()?)?)?;
        Some(MappedPayload {
            mapping: Arc::new(mapping),
            at,
        })
    }

    /// The mapped bytes `start..end`; `None` past the mapping. The caller asks only for bytes
    /// of a pinned payload, which are in the file while it is pinned ("Pins read through a
    /// mapping"): a page past the file's end would raise `SIGBUS`.
    fn bytes(&self, start: usize, end: usize) -> Option<&[u8]> {
        if start > end || end > self.len {
            return None;
        }
        // SAFETY: `base..base + len` is mapped readable for as long as `self` lives (unmapped
        // only in its drop) and `start..end` lies within it; those bytes are a pinned payload's,
        // within the file and never written (see "Pins read through a mapping"), so they
        // neither fault nor change while borrowed. No reference to the rest of the mapping
        // (which may lie past the file's end) is made.
        unsafe {
            Some(std::slice::from_raw_parts(
                self.base.as_ptr().cast::<u8>().add(start),
                end - start,
            ))
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base + len` is the mapping `Mapping::new` made, unmapped only here, and
        // no borrow of it (`Mapping::bytes`) outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr(), self.len);
        }
        MAPPINGS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pinned payload in a mapping: a cluster file's own, or its record's place in the mapping of
/// a whole journal segment ([`Segment::mapping`]).
#[derive(Clone, Debug)]
pub(super) struct MappedPayload {
    mapping: Arc<Mapping>,
    /// Where the payload starts in the mapping.
    at: usize,
}

/// How much of a journal segment its one mapping covers: its records usually end by
/// [`journal::SEGMENT_BYTES`] and a little; one past this is mapped on its own.
pub(super) const SEGMENT_MAPPING_BYTES: usize = 1 << 30;

/// The mapping of segment `file`'s first [`SEGMENT_MAPPING_BYTES`], shared by the pins of its
/// records; `None` when `mmap` fails or [`MAX_MAPPINGS`] are held.
pub(super) fn map_segment(file: &File) -> Option<Arc<Mapping>> {
    Mapping::new(file, 0, SEGMENT_MAPPING_BYTES).map(Arc::new)
}

/// The size of a page, which a mapping's file offset must be a multiple of.
fn page_size() -> Option<u64> {
    static PAGE: OnceLock<Option<u64>> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(page).ok().filter(|&page| page > 0)
    })
}

impl PinnedUpload {
    /// Maps the payload's pages when the pin holds a file (not a payload in memory), for reading
    /// ranges without a system call each; left reading by `pread` when that fails.
    fn with_mapping(mut self) -> PinnedUpload {
        self.mapped = match &self.pin {
            Pin::File(file) => Mapping::of_range(file, self.payload_offset, self.payload_len),
            // The segment's one mapping when the record lies in it, else a mapping of its own.
            Pin::Segment(segment) => {
                let end = self.payload_offset.saturating_add(self.payload_len);
                match (segment.mapping(), usize::try_from(self.payload_offset)) {
                    (Some(mapping), Ok(at))
                        if self.payload_len > 0 && end <= SEGMENT_MAPPING_BYTES as u64 =>
                    {
                        Some(MappedPayload { mapping, at })
                    }
                    _ => Mapping::of_range(&segment.file, self.payload_offset, self.payload_len),
                }
            }
            Pin::Memory(_) | Pin::Mapped => return self,
        };
        self
    }

    /// The pin, mapped ([`PinnedUpload::with_mapping`]) when `ranges` will be read from it.
    fn mapped_if(self, ranges: bool) -> PinnedUpload {
        match ranges {
            true => self.with_mapping(),
            false => self,
        }
    }

    /// The payload's bytes `start..end` (checked by [`PinnedUpload::range_len`]) from the
    /// mapping, when the pin has one.
    fn mapped_range(&self, start: u64, end: u64) -> Option<io::Result<&[u8]>> {
        let mapped = self.mapped.as_ref()?;
        // Checked against the payload's length by the caller, so never past the payload.
        let range = usize::try_from(start).ok().zip(usize::try_from(end).ok());
        Some(
            range
                .and_then(|(start, end)| {
                    let start = mapped.at.checked_add(start)?;
                    let end = mapped.at.checked_add(end)?;
                    mapped.mapping.bytes(start, end)
                })
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range too long")),
        )
    }

    /// Whether this pin reads through the very mapping `other` reads through.
    #[cfg(test)]
    pub(super) fn shares_mapping_with(&self, other: &PinnedUpload) -> bool {
        match (&self.mapped, &other.mapped) {
            (Some(mine), Some(theirs)) => Arc::ptr_eq(&mine.mapping, &theirs.mapping),
            _ => false,
        }
    }

    /// The pin as it is when mapping fails: its ranges read by `pread`.
    #[cfg(test)]
    pub(super) fn without_mapping(mut self) -> PinnedUpload {
        self.mapped = None;
        self
    }

    /// Whether ranges are read from a mapping of the pinned file rather than by `pread`.
    pub fn mapped(&self) -> bool {
        self.mapped.is_some()
    }

    /// The payload's length, whether or not it was read.
    pub fn payload_len(&self) -> u64 {
        self.payload_len
    }

    /// Whether `upload.payload` holds the payload (always, except in a lazy pin of a file
    /// verified before: read it in ranges then).
    pub fn payload_read(&self) -> bool {
        self.payload_read
    }

    /// The payload this pins; `None` for a cluster file the index has moved past while it was
    /// read (a newer upload checkpointed over it).
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
        if let Some(mapped) = self.mapped_range(start, end) {
            buffer.extend_from_slice(mapped?);
            return Ok(());
        }
        let file = match &self.pin {
            Pin::File(file) => file,
            Pin::Segment(segment) => &segment.file,
            Pin::Mapped => return Err(only_mapped()),
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

/// A read by `pread` of a pin that holds no file (its mapping was all it held, and a test dropped
/// it).
fn only_mapped() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "the pinned payload was held only by its mapping",
    )
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
    /// The payload bytes `start..end`, as [`PinnedUpload::read_range`] reads them, read (or
    /// copied from the pin's mapping) into the front of `buffer` (which only ever grows, so a
    /// scrape that reads every family of every cluster does not zero each range before reading
    /// it) or, when the pin holds them in memory, borrowed from there without a copy.
    pub fn read_range_reusing<'b>(
        &'b self,
        start: u64,
        end: u64,
        buffer: &'b mut Vec<u8>,
    ) -> io::Result<&'b [u8]> {
        let len = self.range_len(start, end)?;
        if let Some(mapped) = self.mapped_range(start, end) {
            // Copied, not borrowed: `/federate`'s decoder walking the family straight from the
            // mapping measured ~10% more server CPU a scrape than this copy and a walk of the
            // (cache-hot) buffer; the copy streams the cold page-cache lines in, the decoder's
            // dependent reads took their misses one at a time.
            let mapped = mapped?;
            if buffer.len() < len {
                buffer.resize(len, 0);
            }
            let bytes = buffer
                .get_mut(..len)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range too long"))?;
            bytes.copy_from_slice(mapped);
            return Ok(bytes);
        }
        let file = match &self.pin {
            Pin::File(file) => file,
            Pin::Segment(segment) => &segment.file,
            Pin::Mapped => return Err(only_mapped()),
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
    /// The version of the payload `entry` indexes, in this open of the store.
    fn pin_version(&self, entry: &Entry) -> PinVersion {
        PinVersion {
            store: self.identity,
            payload: entry.version,
        }
    }

    /// `cluster_id`'s upload if it is live: from its journal record until that is checkpointed,
    /// then from its file, verified; a corrupt file is set aside and reads as absent.
    pub(super) fn get(&self, cluster_id: &str) -> Result<Option<StoredUpload>, StoreError> {
        let upload = self
            .read_pinned(cluster_id, false, false, None)?
            .map(|pinned| pinned.upload);
        #[cfg(test)]
        self.pause_at("payload read");
        Ok(upload)
    }

    /// As [`Shared::get`], keeping the file it was read from open ([`PinnedUpload`]). With
    /// `lazy`, a payload is pinned without reading it where that is safe and the caller knows
    /// it (`known` is its version; see [`super::Store::get_pinned_lazily`]): the caller reads
    /// what it needs in ranges.
    pub(super) fn get_pinned(
        &self,
        cluster_id: &str,
        lazy: bool,
        known: Option<PinVersion>,
    ) -> Result<Option<PinnedUpload>, StoreError> {
        self.read_pinned(cluster_id, true, lazy, known)
    }

    /// [`Shared::get_pinned`]; a packed record's pin holds a copy of its payload only when
    /// `ranges` (ranges will be read from it).
    fn read_pinned(
        &self,
        cluster_id: &str,
        ranges: bool,
        lazy: bool,
        known: Option<PinVersion>,
    ) -> Result<Option<PinnedUpload>, StoreError> {
        let Some(entry) = lock(&self.index).get(cluster_id).cloned() else {
            return Ok(None);
        };
        if !is_live(entry.newest_sample_ms, SystemTime::now(), self.ttl) {
            return Ok(None);
        }
        let version = self.pin_version(&entry);
        // The caller knows this very payload: a lazy pin need not read it.
        let known = lazy && known == Some(version);
        if let Location::File {
            verified: true,
            mapped: Some(mapping),
            ..
        } = &entry.location
        {
            // A verified file that an earlier pin mapped: neither opened nor mapped again
            // ("Mappings kept").
            if known && ranges {
                return Ok(Some(PinnedUpload {
                    payload_offset: 0,
                    payload_len: entry.payload_bytes,
                    payload_read: false,
                    version: Some(version),
                    mapped: Some(mapping.clone()),
                    pin: Pin::Mapped,
                    upload: StoredUpload {
                        cluster_id: cluster_id.to_string(),
                        received: telemeter_common::time::from_unix_millis(entry.received_millis),
                        payload: Vec::new(),
                    },
                }));
            }
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
                    version: Some(version),
                    mapped: None,
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
            // A known plain record is not read again: it was checked by the read that gave the
            // caller this version, and a segment's records are never rewritten (the module doc).
            let (id, received_millis, payload, payload_read) = match (known, encoding) {
                (true, Encoding::Plain) => (
                    cluster_id.to_string(),
                    entry.received_millis,
                    Vec::new(),
                    false,
                ),
                _ => {
                    let context = || format!("reading {} at {offset}", segment.path.display());
                    match segment.read_put(cluster_id, *offset, entry.payload_bytes, *encoding) {
                        Ok((header, payload)) if header.cluster_id == cluster_id => {
                            (header.cluster_id, header.received_millis, payload, true)
                        }
                        Ok((header, _)) => {
                            return Err(StoreError::format(
                                context(),
                                format!("holds cluster {:?}", header.cluster_id),
                            ))
                        }
                        Err(ReadError::Corrupt(reason)) => {
                            return Err(StoreError::format(context(), reason))
                        }
                        Err(ReadError::Io(error)) => return Err(StoreError::io(context(), error)),
                    }
                }
            };
            // Only a plain record's pin holds the segment (a packed one holds memory).
            let pin = match encoding {
                Encoding::Plain => Pin::Segment(Arc::clone(segment)),
                // The one copy the ranges need; the upload's own is the caller's.
                Encoding::Packed { .. } if ranges => Pin::Memory(payload.clone()),
                Encoding::Packed { .. } => Pin::Memory(Vec::new()),
            };
            let pinned = PinnedUpload {
                payload_offset: match encoding {
                    Encoding::Plain => journal::payload_offset(*offset, cluster_id),
                    Encoding::Packed { .. } => 0,
                },
                payload_len: match payload_read {
                    true => payload.len() as u64,
                    false => entry.payload_bytes,
                },
                payload_read,
                version: Some(version),
                mapped: None,
                pin,
                upload: StoredUpload {
                    cluster_id: id,
                    received: telemeter_common::time::from_unix_millis(received_millis),
                    payload,
                },
            };
            return Ok(Some(pinned.mapped_if(ranges)));
        }
        let path = self.path_of(cluster_id);
        // The upload, or none; `Err` inside when the file is corrupt (with the reason).
        let read = || match self.read_upload(cluster_id, &path, &entry, lazy, known) {
            Ok(upload) => {
                let upload = upload.mapped_if(ranges);
                self.keep_mapping(cluster_id, &entry, &upload);
                Ok(Ok(Some(upload)))
            }
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
                #[cfg(test)]
                self.pause_at("corrupt file found");
                // The entry read goes, and only it: a put committed since (the committer does
                // not take the mutation lock) has an entry of its own, and its upload is in the
                // journal, not in the file set aside. Dropped with the index's lock let go (a
                // kept mapping is unmapped then).
                let mut index = lock(&self.index);
                let removed = match index.get(cluster_id) {
                    Some(current) if current.version == entry.version => index.remove(cluster_id),
                    _ => None,
                };
                drop(index);
                drop(removed);
                self.set_aside(&file::file_name(cluster_id), &reason);
                Ok(None)
            }
        }
    }

    /// Keeps the mapping of `pinned`, a pin of `cluster_id`'s file read for `entry`, in the
    /// index entry, when that is still `entry`'s payload in this very file, verified, and keeps
    /// no mapping yet ("Mappings kept").
    fn keep_mapping(&self, cluster_id: &str, entry: &Entry, pinned: &PinnedUpload) {
        let (Some(mapping), Pin::File(file)) = (&pinned.mapped, &pinned.pin) else {
            return;
        };
        if pinned.version != Some(self.pin_version(entry)) {
            return;
        }
        // The pinned file's inode, against the one the index entry names now.
        let Ok(metadata) = file.metadata() else {
            return;
        };
        let mut index = lock(&self.index);
        let Some(current) = index.get_mut(cluster_id) else {
            return;
        };
        if current.version != entry.version {
            return;
        }
        if let Location::File {
            inode,
            verified: true,
            mapped: kept @ None,
        } = &mut current.location
        {
            if *inode == metadata.ino() {
                *kept = Some(mapping.clone());
            }
        }
    }

    /// Reads `cluster_id`'s file, keeping it open: verified, unless it is the very file the index
    /// `entry` says a read has verified already (same inode, same receive time and payload
    /// length); a verified file is then marked so in the index. With `lazy`, such a file's
    /// payload is not read (its header is, and checked against the file's length); with `known`
    /// too (the caller knows this payload), an unverified file's payload is verified streaming,
    /// not kept. The pin has the entry's version only when the file is the entry's.
    fn read_upload(
        &self,
        cluster_id: &str,
        path: &Path,
        entry: &Entry,
        lazy: bool,
        known: bool,
    ) -> Result<PinnedUpload, ReadError> {
        let mut opened = open_for_reading(path).map_err(ReadError::Io)?;
        let metadata = opened.metadata().map_err(ReadError::Io)?;
        let (file_len, inode) = (metadata.len(), metadata.ino());
        let (entrys_inode, trusted) = match entry.location {
            Location::File {
                inode: known_inode,
                verified,
                ..
            } if known_inode == inode => (true, verified),
            _ => (false, false),
        };
        let mut read = file::read_as(
            &opened,
            file_len,
            if trusted && lazy {
                Reading::HeaderOnly
            } else if trusted {
                Reading::Trusted
            } else if entrys_inode && known {
                // Each file version is verified by its first read, but the caller needs none
                // of its bytes now: the checksum is computed in passing.
                Reading::Verified {
                    keep_payload: false,
                }
            } else {
                Reading::Verified { keep_payload: true }
            },
        )?;
        let (header, _) = &read;
        let entrys = entrys_inode
            && header.received_millis == entry.received_millis
            && header.payload_len == entry.payload_bytes;
        if trusted && !entrys {
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
                    ..
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
        // A file that is not the entry's (one renamed over it since the entry was read) holds
        // some other payload, whose version is not known here.
        let version = entrys.then(|| self.pin_version(entry));
        let payload_read = payload.is_some();
        let payload = payload.unwrap_or_default();
        Ok(PinnedUpload {
            // The payload is the file's tail (`read_as` checked the lengths add up).
            payload_offset: file_len.saturating_sub(header.payload_len),
            payload_len: header.payload_len,
            payload_read,
            version,
            mapped: None,
            pin: Pin::File(opened),
            upload: StoredUpload {
                cluster_id: header.cluster_id,
                received: telemeter_common::time::from_unix_millis(header.received_millis),
                payload,
            },
        })
    }
}
