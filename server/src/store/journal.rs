//! The write-ahead journal: what makes a group commit cost one `fdatasync`.
//!
//! On ext4 (data=ordered) every journal commit of the file system also flushes the dirty data of
//! the files it touches, so writing 64 cluster files and syncing them costs far more than
//! appending the same bytes to one file: measured here, ~115 ms per batch of 64 × 50 KB files
//! with one `syncfs`, ~150–200 ms with `fdatasync` per file, ~20 ms appending them to one file
//! with one `fdatasync`. So a batch is appended to the current segment (`DIR/journal-<n>`) and
//! synced once; the callers are answered then, and reads find the data in the segment. When a
//! segment is full the committer starts the next one and the checkpointer writes, for each cluster
//! whose newest upload lives in the old segment, its cluster file (temp + sync + rename + one
//! directory sync for all), then deletes the segment. Clusters uploaded many times per segment
//! are written once.
//!
//! A record is: kind (u8), cluster id length (u16), receive time (u64 ms), payload length (u64),
//! checksum (u64), cluster id, payload, and in a version 3 record the payload's newest
//! remote-write sample (i64, `i64::MIN`: none; see the store's "remote-write marker");
//! integers little endian. [`PUT`] carries an upload,
//! [`REMOVE`] (empty payload) says the cluster's file was removed, so a replay does not bring it
//! back. On open, segments are replayed in order; a record that is cut short or fails its checksum
//! ends its segment's replay (a crash during an append, which was never answered Ok).
//!
//! The checksum only has to catch a torn or stale tail, not an adversary, and every accepted byte
//! passes through it on the commit path, so it is not the SHA-256 that cluster files had before
//! their version 4 (~0.5 GB/s here without the SHA instructions, which cost the committer 0.1 ms
//! per upload); cluster files use the same CRC-32C since.
//!
//! # Versions
//!
//! The kind byte says the record's format version, so a segment written by an older server is
//! still replayed after an upgrade:
//!
//! | kind byte | record                | checksum, over the prefix before it, the id, the payload |
//! |-----------|-----------------------|-----------------------------------------------------------|
//! | 1, 2      | version 1: put, remove | a 64-bit multiply-rotate hash of this codebase's own     |
//! | 3, 4      | version 2: put, remove | CRC-32C (as the Prometheus WAL), in the low 32 bits       |
//! | 5         | version 2: ship only   | CRC-32C                                                    |
//! | 6         | version 2: serve only  | CRC-32C                                                    |
//! | 7, 8      | version 3: put, serve only, + marker | CRC-32C, the marker included            |
//! | 0x13      | version 2: put, packed (below) | CRC-32C                                           |
//! | 0x15      | version 2: ship only, packed   | CRC-32C                                           |
//! | 0x16      | version 2: serve only, packed  | CRC-32C                                           |
//! | 9         | patch of the served payload (the `patch` module) | CRC-32C                      |
//!
//! A served payload that is not packed (put, serve only) is written as version 3, everything else
//! (remove, ship only, packed records, patches) as version 2: the marker only means something
//! beside a served payload, and a packed record is a plain upload, whose marker is always "none".
//! A replay restores the marker of a version 3 record, reads it from the payload of an older one,
//! and takes "none" for a packed one. With `--remote-write-url` the journal is also the egress
//! backlog (`remote_write`): a put (1, 3, 7, 0x13) is served and shipped; "ship only" (5, 0x15)
//! carries what must reach the remote-write receiver but not `/federate` (a late upload older
//! than what is served, the delta of a remote-write request whose merged view is put
//! separately); "serve only" (6, 8, 0x16) is a put whose payload is not shipped (that merged
//! view, or a handoff between servers). A replay into the store skips ship only records and
//! treats serve only ones as a put; egress ships puts and ship only records. A patch (9) changes
//! the served payload of its cluster's plain (not packed) put earlier in the same segment; egress
//! skips it (a remote-write request's delta is shipped in its own ship-only record). Kinds 5 and
//! 6 are read by this version on, 7, 8, 9 and the packed kinds by version 3 on; an older server stops its
//! replay at them as at a torn tail (as it refuses the version 3 cluster files: there is no
//! downgrade past a format version without a clean stop, which checkpoints and deletes every
//! segment).
//!
//! # Packed records
//!
//! An upload that passed the wire check unchanged (snappy framed, already stamped, nothing to
//! rewrite: what `telemeter-client` and the upstream client send) is journaled as it arrived: the
//! kind byte has [`PACKED`] (0x10) set and the payload is the decompressed length (u64), the
//! newest sample's timestamp (i64), then the body's snappy frames, all under the record's
//! checksum. The benchmark's upload is ~8 KB that way instead of ~51 KB, so the committer copies,
//! checksums and syncs ~6× fewer bytes, and a 256 MiB segment holds ~6× more uploads before a
//! checkpoint. Replay indexes a packed record from those two fields without decompressing it (its
//! frames' chunk headers are checked to declare exactly that length, and at most 64 bytes per
//! byte of frames, so a read never allocates from a length the record cannot back); every read
//! (`Store::get`, `/federate`'s pins, the checkpointer, egress) decompresses it, and frames that
//! do not decompress to that length are a corrupt record, refused as one that fails its checksum
//! is. A read that must keep the payload (a `/federate` pin) holds it decompressed in memory, so
//! a segment is also closed (and checkpointed into plain cluster files) once the packed payloads
//! the index finds in it would decompress to [`PACKED_BUDGET`] (64 MiB).
//!
//! # Zeros written ahead
//!
//! An `fdatasync` after appending past the end of the file also writes the file system's
//! metadata (the new size, the new extents: one ext4 journal commit), which measured ~200–330 µs
//! against ~120–160 µs for overwriting blocks already allocated and inside the file's size. So
//! when an append would pass the zeros already written, the same commit first writes the next
//! [`ZEROS_AHEAD`] of zeros past it (never past the segment's size limit): that commit's sync
//! pays the metadata once per chunk, and the appends after it overwrite blocks in place. Real
//! zeros, not `fallocate`: ext4 keeps fallocated blocks as unwritten extents, and the first
//! write into one converts it, a metadata update again on the sync. On a disk too full for a
//! chunk, what was written of it is cut off again (zeros must never take the space records and
//! cluster files need) and that segment appends past its end as before.
//!
//! A record never starts with a zero byte (no kind is 0), and every commit starts on a page
//! boundary, so a zero kind byte at a page boundary is the end of the written part of a segment:
//! every reader stops there ([`replay`], [`read_at`]), after checking that only zeros follow
//! (an append a crash cut off whose first page never reached the disk but a later one did is
//! reported as a torn tail, as any other). A segment set aside for egress is first cut to the end
//! of its records ([`Segment::written`]); one a crash left keeps its zeros until it is replayed.
//!
//! This module owns the journal's writing end ([`JournalState`]): `Shared::append_locked` is
//! the one place that writes to a segment and `fdatasync`s it, for the committer's batches and
//! for removals alike.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_channel::Sender;

use super::file::{Header, ReadError};
use super::read::{self, Mapping};
use super::state::{lock, Entry, Location, Shared};
use super::StoreError;
use telemeter_common::{crc32c, snappy};

/// Segment files are named this followed by their number.
pub(super) const PREFIX: &str = "journal-";
/// A segment is closed and checkpointed once it holds this many bytes.
pub(super) const SEGMENT_BYTES: u64 = 256 << 20;
/// Commits start at multiples of this; the bytes between are zeros (a hole).
pub(super) const PAGE: u64 = 4096;
/// Bytes of zeros written ahead of the records at a time (see "Zeros written ahead"). The commit
/// that writes them also syncs them, and every upload of that commit and of the next waits for
/// it: 8 MiB took the 64-sender benchmark's p99 to 34–41 ms on a loaded machine, 2 MiB to
/// 25–29 ms (5 alternating pairs, lower in each; throughput level; the median a little higher,
/// ~7.3 → ~7.9 ms, for the size synced four times as often).
pub(super) const ZEROS_AHEAD: u64 = 2 << 20;
/// The record of an upload.
pub(super) const PUT: u8 = 1;
/// The record of a removal.
pub(super) const REMOVE: u8 = 2;
/// The record of a payload to ship but not serve (written only as version 2).
pub(super) const SHIP: u8 = 5;
/// The record of an upload to serve but not ship (written only as version 2).
pub(super) const SERVE: u8 = 6;
/// The record of a patch of the cluster's payload (the `patch` module), after its image in the
/// same segment. Version 2 layout and checksum; its own byte, so an older server stops its replay
/// at it as at a torn tail.
pub(super) const PATCH: u8 = 9;
/// Added to [`PUT`] or [`REMOVE`] in the kind byte of a version 2 record.
const VERSION_2_KINDS: u8 = 2;
/// The kind byte of a version 3 [`PUT`]: a version 2 put followed by [`MARKER_LEN`] bytes, the
/// payload's newest remote-write sample.
pub(super) const PUT_MARKED: u8 = 7;
/// The kind byte of a version 3 [`SERVE`], with the same trailing marker as [`PUT_MARKED`].
const SERVE_MARKED: u8 = 8;
/// Bytes of a version 3 record's marker, after its payload: the newest remote-write sample (ms,
/// i64, `i64::MIN` when none), under the checksum.
const MARKER_LEN: usize = 8;
/// Set in the kind byte of a version 2 put, ship or serve record whose payload is the upload as
/// it arrived, snappy framed, after a [`PACKED_HEADER_LEN`]-byte header (see the module doc).
pub(super) const PACKED: u8 = 0x10;
/// Bytes before the snappy frames in a packed record's payload: the decompressed length (u64)
/// and the newest sample's timestamp (i64), both little endian.
const PACKED_HEADER_LEN: usize = 8 + 8;
/// The most one byte of snappy frames can decompress to, with slack: a packed record that claims
/// more is corrupt, so no read allocates from a length its bytes cannot back.
const MAX_SNAPPY_RATIO: u64 = 64;
/// Bytes before a record's cluster id: kind, id length, receive time, payload length, checksum.
const PREFIX_LEN: usize = 1 + 2 + 8 + 8 + 8;
/// The part of the prefix the checksum covers (all but the checksum itself).
const CHECKED_PREFIX_LEN: usize = PREFIX_LEN - 8;

/// How a record is checksummed, by its format version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Checksum {
    /// Version 1: [`hash`].
    Hash64,
    /// Version 2: CRC-32C.
    Crc32c,
}

/// The record kind ([`PUT`], [`REMOVE`], [`SHIP`] or [`SERVE`]) and checksum of a kind byte
/// (the [`PACKED`] flag aside: see [`is_packed`]); `None` for another byte.
fn kind_of(byte: u8) -> Option<(u8, Checksum)> {
    if is_packed(byte) {
        // Only a version 2 put, ship or serve record can be packed: a removal has no payload,
        // and a packed payload is a plain upload, which has no remote-write marker (7, 8).
        let base = byte & !PACKED;
        return match base == PUT + VERSION_2_KINDS || base == SHIP || base == SERVE {
            true => kind_of(base),
            false => None,
        };
    }
    match byte {
        PUT | REMOVE => Some((byte, Checksum::Hash64)),
        SHIP | SERVE | PATCH => Some((byte, Checksum::Crc32c)),
        PUT_MARKED => Some((PUT, Checksum::Crc32c)),
        SERVE_MARKED => Some((SERVE, Checksum::Crc32c)),
        _ => {
            let kind = byte.checked_sub(VERSION_2_KINDS)?;
            (kind == PUT || kind == REMOVE).then_some((kind, Checksum::Crc32c))
        }
    }
}

/// Bytes after the payload of a record whose kind byte is `byte`: a version 3 record's marker.
fn marker_len(byte: u8) -> usize {
    match byte {
        PUT_MARKED | SERVE_MARKED => MARKER_LEN,
        _ => 0,
    }
}

/// Whether the kind byte `byte` says the payload is packed (snappy framed as received).
fn is_packed(byte: u8) -> bool {
    byte & PACKED != 0
}

/// The kind byte of a record of `kind` checksummed with `method`.
fn kind_byte(method: Checksum, kind: u8) -> u8 {
    match (method, kind) {
        (Checksum::Hash64, _) | (Checksum::Crc32c, SHIP | SERVE | PATCH) => kind,
        (Checksum::Crc32c, _) => kind + VERSION_2_KINDS,
    }
}

/// The checksum of a record over its checked prefix, id and payload.
fn checksum(method: Checksum, prefix: &[u8], cluster_id: &[u8], payload: &[u8]) -> u64 {
    checksum_parts(method, prefix, cluster_id, &[payload])
}

/// [`checksum`] of a payload written in `parts` (a packed record's header, then its frames).
fn checksum_parts(method: Checksum, prefix: &[u8], cluster_id: &[u8], parts: &[&[u8]]) -> u64 {
    match method {
        Checksum::Hash64 => {
            let payload = parts.concat();
            hash(&payload, hash(cluster_id, hash(prefix, 0)))
        }
        Checksum::Crc32c => u64::from(parts.iter().fold(
            crc32c::extend(crc32c::extend(0, prefix), cluster_id),
            |crc, part| crc32c::extend(crc, part),
        )),
    }
}

/// A fast non-cryptographic 64-bit hash (version 1 records) (four independent multiply-rotate lanes over 8-byte
/// words, then the length mixed in), chained through `seed`.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    const P1: u64 = 0x9E37_79B9_7F4A_7C15;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let mut lanes = [
        seed ^ P1,
        seed.rotate_left(17) ^ P2,
        seed.rotate_left(31).wrapping_add(P1),
        !seed,
    ];
    let mut round = |block: &[u8]| {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            *lane = (*lane ^ u64::from_le_bytes(w))
                .wrapping_mul(P2)
                .rotate_left(29)
                .wrapping_mul(P1);
        }
    };
    let mut blocks = bytes.chunks_exact(32);
    for block in &mut blocks {
        round(block);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut block = [0u8; 32];
        block
            .get_mut(..tail.len())
            .unwrap_or_default()
            .copy_from_slice(tail);
        round(&block);
    }
    let mut h = bytes.len() as u64 ^ P2;
    for lane in lanes {
        h = (h ^ lane).wrapping_mul(P1).rotate_left(27);
    }
    h ^ (h >> 33)
}

/// The fixed-size start of a record, read.
struct Prefix {
    /// The kind byte as written (version included).
    kind: u8,
    id_len: usize,
    received_millis: u64,
    payload_len: u64,
    checksum: u64,
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        w.copy_from_slice(src);
    }
    u64::from_le_bytes(w)
}

fn parse_prefix(prefix: &[u8; PREFIX_LEN]) -> Prefix {
    Prefix {
        kind: prefix[0],
        id_len: usize::from(u16::from_le_bytes([prefix[1], prefix[2]])),
        received_millis: read_u64(prefix, 3),
        payload_len: read_u64(prefix, 11),
        checksum: read_u64(prefix, 19),
    }
}

/// Verifies a record whose prefix, id and payload (followed by its marker, for a version 3
/// record) were read; returns what it holds, the payload without the marker.
fn verify(
    prefix_bytes: &[u8; PREFIX_LEN],
    prefix: &Prefix,
    id: Vec<u8>,
    mut payload: Vec<u8>,
) -> Result<(Header, Vec<u8>), ReadError> {
    let (header, payload_len) = verify_in_place(prefix_bytes, prefix, id, &payload)?;
    payload.truncate(payload_len);
    Ok((header, payload))
}

/// [`verify`] of a payload (and marker) read into a buffer that is kept: returns the header and
/// the length of the payload without its marker.
fn verify_in_place(
    prefix_bytes: &[u8; PREFIX_LEN],
    prefix: &Prefix,
    id: Vec<u8>,
    payload: &[u8],
) -> Result<(Header, usize), ReadError> {
    let Some((_, method)) = kind_of(prefix.kind) else {
        return Err(ReadError::Corrupt(format!(
            "unknown record kind {}",
            prefix.kind
        )));
    };
    let checked = prefix_bytes.get(..CHECKED_PREFIX_LEN).unwrap_or_default();
    if checksum(method, checked, &id, payload) != prefix.checksum {
        return Err(ReadError::Corrupt("fails its checksum".to_string()));
    }
    let (payload, newest_received_ms) = match marker_len(prefix.kind) {
        0 => (payload, None),
        len => {
            let at = payload.len().checked_sub(len).ok_or_else(|| {
                ReadError::Corrupt("ends before its remote-write marker".to_string())
            })?;
            let marker = read_u64(payload, at) as i64;
            (payload.get(..at).unwrap_or_default(), Some(marker))
        }
    };
    let newest_received_ms = match is_packed(prefix.kind) {
        // Its frames must declare the length its header says (a walk over the chunk headers,
        // nothing decompressed), so what a read allocates is what the record holds. A packed
        // record is a plain upload, which never carries remote-write series.
        true => {
            packed_parts(payload)?;
            Some(i64::MIN)
        }
        false => newest_received_ms,
    };
    let cluster_id = String::from_utf8(id)
        .map_err(|_| ReadError::Corrupt("holds a cluster id that is not UTF-8".to_string()))?;
    Ok((
        Header {
            cluster_id,
            received_millis: prefix.received_millis,
            // Not recorded: the store reads it from the payload.
            newest_sample_ms: None,
            newest_received_ms,
            payload_len: prefix.payload_len,
        },
        payload.len(),
    ))
}

/// How a put's payload is kept in its record (the index remembers it for every journal location).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Encoding {
    /// Protobuf-delimited families, as served.
    Plain,
    /// Packed ([`PACKED`]): the upload as it arrived, snappy framed, behind a small header;
    /// `record_bytes` is the record's payload length (header and frames).
    Packed {
        /// The record's payload length.
        record_bytes: u64,
    },
}

/// A packed record payload's parts: the decompressed length, the newest sample's timestamp and
/// the snappy frames. `Corrupt` when it is too short for its header, or its frames do not
/// declare exactly that length (or more than they could hold).
pub(super) fn packed_parts(payload: &[u8]) -> Result<(usize, i64, &[u8]), ReadError> {
    let corrupt = |why: &str| ReadError::Corrupt(format!("holds a packed payload {why}"));
    let frames = payload
        .get(PACKED_HEADER_LEN..)
        .ok_or_else(|| corrupt("shorter than its header"))?;
    let plain_len = read_u64(payload, 0);
    let newest_sample_ms = read_u64(payload, 8) as i64;
    if plain_len > (frames.len() as u64).saturating_mul(MAX_SNAPPY_RATIO) {
        return Err(corrupt(&format!(
            "of {} bytes that claims {plain_len} bytes decompressed",
            frames.len()
        )));
    }
    let plain_len = usize::try_from(plain_len).map_err(|_| corrupt("too long for this machine"))?;
    match snappy::framed_len(frames, plain_len) {
        Ok(declared) if declared == plain_len => Ok((plain_len, newest_sample_ms, frames)),
        Ok(declared) => Err(corrupt(&format!(
            "whose frames declare {declared} bytes, not {plain_len}"
        ))),
        Err(e) => Err(corrupt(&format!("whose frames do not hold: {e}"))),
    }
}

/// The families a packed record's `payload` holds, decompressed: exactly the length its header
/// says (at most what ingest's cap let through when it was written), or `Corrupt`, as a record
/// that fails its checksum is.
pub(super) fn unpack(payload: &[u8]) -> Result<Vec<u8>, ReadError> {
    let mut plain = Vec::new();
    unpack_into(payload, &mut plain)?;
    Ok(plain)
}

/// [`unpack`] into `plain` (a buffer used again: see [`snappy::decode_framed_into`]).
pub(super) fn unpack_into(payload: &[u8], plain: &mut Vec<u8>) -> Result<(), ReadError> {
    unpack_checking(payload, plain, true)
}

/// [`unpack_into`] of a payload whose record has just passed its checksum, which covers every
/// byte of the frames: their own CRC-32Cs are not checked again (5 % of egress's CPU went to
/// that). Packed records are only ever CRC-32C records ([`kind_of`]), so that checksum is as
/// strong as the frames'. A damaged payload that passed it anyway is still refused if it does not
/// decompress to exactly its header's length, and never takes more memory than that.
pub(super) fn unpack_verified_into(payload: &[u8], plain: &mut Vec<u8>) -> Result<(), ReadError> {
    unpack_checking(payload, plain, false)
}

/// [`unpack_into`], checking the frames' own CRC-32Cs only with `frame_checksums`.
fn unpack_checking(
    payload: &[u8],
    plain: &mut Vec<u8>,
    frame_checksums: bool,
) -> Result<(), ReadError> {
    let (plain_len, _, frames) = packed_parts(payload)?;
    let decoded = if frame_checksums {
        snappy::decode_framed_into(frames, plain_len, plain)
    } else {
        snappy::decode_framed_into_unchecked(frames, plain_len, plain)
    };
    match decoded {
        Ok(()) if plain.len() == plain_len => Ok(()),
        Ok(()) => Err(ReadError::Corrupt(format!(
            "holds snappy frames that decompress to {} bytes, not {plain_len}",
            plain.len()
        ))),
        Err(e) => Err(ReadError::Corrupt(format!(
            "holds snappy frames that do not decompress: {e}"
        ))),
    }
}

/// The largest record buffer [`read_at_into`] keeps for the next read: a larger one (an upload
/// near ingest's cap) is freed once read, so a reader holds at most this much between records.
const KEPT_RECORD_BUFFER: usize = 1 << 20;

/// One segment file, shared by the index entries whose data it holds. Reads go through the open
/// descriptor, so they keep working while the checkpointer deletes the file.
#[derive(Debug)]
pub(super) struct Segment {
    /// Its number; segments are replayed in this order.
    pub(super) number: u64,
    /// Where it is.
    pub(super) path: PathBuf,
    /// Open for reading (and writing, when this run created it).
    pub(super) file: File,
    /// Where its records end: synced by this run's appends, or found by the replay of a segment
    /// an earlier run left. What follows is zeros written ahead (or a torn tail).
    written: AtomicU64,
    /// Where the zeros written ahead end (this run's appends only).
    zeroed: AtomicU64,
    /// Writing zeros ahead failed (a full disk): the appends to it no longer try.
    zeros_failed: AtomicBool,
    /// Decompressed bytes of the packed payloads the index found in it when it was the current
    /// segment ([`JournalState::packed_bytes`] then): what its checkpoint settles of
    /// [`Shared::packed_unsettled`].
    pub(super) packed: AtomicU64,
    /// The segment mapped whole, made by the first pin of one of its records taken for ranges
    /// and shared by the pins of all of them (`read`'s "Pins read through a mapping"): one
    /// mapping a segment rather than one a record a scrape. Unset while mapping fails (past
    /// `read::MAX_MAPPINGS`, which a scrape of many clusters can reach for a while): a later
    /// pin tries again, rather than the segment's records being read by `pread` for its life.
    mapping: OnceLock<Arc<Mapping>>,
}

impl Segment {
    /// Opens segment `number` of `dir`, left by an earlier run, for reading: its records are
    /// served from it until the checkpointer has written them to their cluster files.
    pub(super) fn open(dir: &Path, number: u64) -> io::Result<Segment> {
        let path = dir.join(format!("{PREFIX}{number}"));
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        Ok(Segment::new(number, path, file, len))
    }

    fn new(number: u64, path: PathBuf, file: File, written: u64) -> Segment {
        Segment {
            number,
            path,
            file,
            written: AtomicU64::new(written),
            zeroed: AtomicU64::new(written),
            zeros_failed: AtomicBool::new(false),
            packed: AtomicU64::new(0),
            mapping: OnceLock::new(),
        }
    }

    /// The mapping of the whole segment ([`Segment::mapping`]'s field), made on first use.
    pub(super) fn mapping(&self) -> Option<Arc<Mapping>> {
        if let Some(mapping) = self.mapping.get() {
            return Some(Arc::clone(mapping));
        }
        // Two pins may map it at once: the one set first is kept, the other unmapped.
        let _ = self.mapping.set(read::map_segment(&self.file)?);
        self.mapping.get().cloned()
    }

    /// Where its records end (see the field), for cutting off the zeros when it is retired.
    pub(super) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Records where a replay found its records end.
    pub(super) fn set_written(&self, end: u64) {
        self.written.store(end, Ordering::Relaxed);
    }

    /// Creates segment `number` in `dir` (which the caller syncs before relying on it).
    pub(super) fn create(dir: &Path, number: u64) -> io::Result<Segment> {
        let path = dir.join(format!("{PREFIX}{number}"));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Segment::new(number, path, file, 0))
    }

    /// Reads and verifies the record at `offset` of a put of `payload_bytes` (decompressed) for
    /// `cluster_id`, kept as `encoding` says; returns the families decompressed. A packed payload
    /// that does not decompress to `payload_bytes` is `Corrupt`, as a failed checksum is.
    pub(super) fn read_put(
        &self,
        cluster_id: &str,
        offset: u64,
        payload_bytes: u64,
        encoding: Encoding,
    ) -> Result<(Header, Vec<u8>), ReadError> {
        let mut prefix_bytes = [0u8; PREFIX_LEN];
        self.file
            .read_exact_at(&mut prefix_bytes, offset)
            .map_err(ReadError::Io)?;
        let prefix = parse_prefix(&prefix_bytes);
        let record_bytes = match encoding {
            Encoding::Plain => payload_bytes,
            Encoding::Packed { record_bytes } => record_bytes,
        };
        if !matches!(kind_of(prefix.kind), Some((PUT | SERVE, _)))
            || is_packed(prefix.kind) != matches!(encoding, Encoding::Packed { .. })
            || prefix.id_len != cluster_id.len()
            || prefix.payload_len != record_bytes
        {
            return Err(ReadError::Corrupt(
                "holds another record than the index says".to_string(),
            ));
        }
        let payload_len = usize::try_from(record_bytes)
            .ok()
            .and_then(|len| len.checked_add(marker_len(prefix.kind)))
            .ok_or_else(|| ReadError::Corrupt(format!("payload of {record_bytes} bytes")))?;
        let mut id = vec![0u8; prefix.id_len];
        let mut payload = vec![0u8; payload_len];
        let id_at = offset + PREFIX_LEN as u64;
        self.file
            .read_exact_at(&mut id, id_at)
            .and_then(|()| {
                self.file
                    .read_exact_at(&mut payload, id_at + id.len() as u64)
            })
            .map_err(ReadError::Io)?;
        let (mut header, payload) = verify(&prefix_bytes, &prefix, id, payload)?;
        if encoding == Encoding::Plain {
            return Ok((header, payload));
        }
        let plain = unpack(&payload)?;
        if plain.len() as u64 != payload_bytes {
            return Err(ReadError::Corrupt(
                "holds another record than the index says".to_string(),
            ));
        }
        header.payload_len = payload_bytes;
        Ok((header, plain))
    }
}

/// Where the payload of the put record at `offset` for `cluster_id` starts in its segment.
pub(super) fn payload_offset(offset: u64, cluster_id: &str) -> u64 {
    offset + PREFIX_LEN as u64 + cluster_id.len() as u64
}

/// Appends a record of `kind` ([`PUT`], [`REMOVE`], [`SHIP`] or [`SERVE`]) to `out`, in the current version; returns
/// its offset relative to `out`'s start. Fails only when the cluster id does not fit its u16
/// length field.
pub(super) fn encode(
    kind: u8,
    cluster_id: &str,
    received_millis: u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    encode_as(
        Checksum::Crc32c,
        kind,
        cluster_id,
        received_millis,
        payload,
        out,
    )
}

/// [`encode`] in the version that checksums with `method` (tests write version 1 with it).
pub(super) fn encode_as(
    method: Checksum,
    kind: u8,
    cluster_id: &str,
    received_millis: u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    encode_parts(
        method,
        kind_byte(method, kind),
        cluster_id,
        received_millis,
        &[payload],
        out,
    )
}

/// The payload length of a packed record holding `frames_len` bytes of snappy frames.
pub(super) fn packed_record_bytes(frames_len: usize) -> u64 {
    (PACKED_HEADER_LEN + frames_len) as u64
}

/// Appends a packed record of `kind` ([`PUT`], [`SHIP`] or [`SERVE`]): `frames`, an upload's body
/// as it arrived (snappy framed), which decompresses to `plain_len` bytes of families whose newest
/// sample is stamped `newest_sample_ms` (kept so a replay indexes it without decompressing).
pub(super) fn encode_packed(
    kind: u8,
    cluster_id: &str,
    received_millis: u64,
    plain_len: u64,
    newest_sample_ms: i64,
    frames: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    if kind == REMOVE {
        return Err("a removal has no payload to pack".to_string());
    }
    let mut header = [0u8; PACKED_HEADER_LEN];
    header[..8].copy_from_slice(&plain_len.to_le_bytes());
    header[8..].copy_from_slice(&newest_sample_ms.to_le_bytes());
    encode_parts(
        Checksum::Crc32c,
        kind_byte(Checksum::Crc32c, kind) | PACKED,
        cluster_id,
        received_millis,
        &[&header, frames],
        out,
    )
}

/// Appends a record with kind byte `kind` whose payload is `parts`, one after the other.
fn encode_parts(
    method: Checksum,
    kind: u8,
    cluster_id: &str,
    received_millis: u64,
    parts: &[&[u8]],
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    let id_len = u16::try_from(cluster_id.len())
        .map_err(|_| format!("cluster id is {} bytes, more than 65535", cluster_id.len()))?;
    let payload_len: usize = parts.iter().map(|part| part.len()).sum();
    let start = out.len();
    out.push(kind);
    out.extend_from_slice(&id_len.to_le_bytes());
    out.extend_from_slice(&received_millis.to_le_bytes());
    out.extend_from_slice(&(payload_len as u64).to_le_bytes());
    let sum = checksum_parts(
        method,
        out.get(start..).unwrap_or_default(),
        cluster_id.as_bytes(),
        parts,
    );
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(cluster_id.as_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    Ok(start)
}

/// Appends a version 3 record of a served payload: `kind` is [`PUT`] or [`SERVE`], and the
/// payload's newest remote-write sample `newest_received_ms` (`i64::MIN`: none) follows it, so a
/// replay restores it rather than guessing it from the payload. Returns its offset relative to
/// `out`'s start. Fails when `kind` is another kind, or the cluster id does not fit its u16
/// length field.
pub(super) fn encode_marked(
    kind: u8,
    cluster_id: &str,
    received_millis: u64,
    payload: &[u8],
    newest_received_ms: i64,
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    let byte = match kind {
        PUT => PUT_MARKED,
        SERVE => SERVE_MARKED,
        other => return Err(format!("record kind {other} carries no served payload")),
    };
    let id_len = u16::try_from(cluster_id.len())
        .map_err(|_| format!("cluster id is {} bytes, more than 65535", cluster_id.len()))?;
    let marker = newest_received_ms.to_le_bytes();
    let start = out.len();
    out.push(byte);
    out.extend_from_slice(&id_len.to_le_bytes());
    out.extend_from_slice(&received_millis.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let prefix = out.get(start..).unwrap_or_default();
    let sum = crc32c::extend(
        crc32c::extend(crc32c::extend(0, prefix), cluster_id.as_bytes()),
        payload,
    );
    let sum = u64::from(crc32c::extend(sum, &marker));
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(cluster_id.as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&marker);
    Ok(start)
}

/// The segment numbers present in `dir`, in replay order.
pub(super) fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(number) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            numbers.push(number);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Whether `name` is a segment's file name.
pub(super) fn is_segment_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// One replayed record.
pub(super) struct Record {
    /// [`PUT`], [`REMOVE`], [`SHIP`], [`SERVE`] or [`PATCH`].
    pub(super) kind: u8,
    /// The image's header.
    pub(super) header: Header,
    /// The image's payload as the record holds it (empty for a removal; packed when `packed`,
    /// which only [`read_at_packed`] hands out: [`read_at`] decompresses).
    pub(super) payload: Vec<u8>,
    /// Whether `payload` is packed ([`PACKED`]).
    pub(super) packed: bool,
    /// Where the record starts in its segment (what [`Segment::read_put`] takes).
    pub(super) offset: u64,
}

impl Record {
    /// How the record keeps its payload, the decompressed length and, for a packed one, the
    /// newest sample's timestamp it recorded (read without decompressing).
    pub(super) fn encoding(&self) -> (Encoding, u64, Option<i64>) {
        if !self.packed {
            return (Encoding::Plain, self.payload.len() as u64, None);
        }
        let record_bytes = self.payload.len() as u64;
        match packed_parts(&self.payload) {
            Ok((plain_len, newest_sample_ms, _)) => (
                Encoding::Packed { record_bytes },
                plain_len as u64,
                Some(newest_sample_ms),
            ),
            // `verify` checked the parts when the record was read.
            Err(_) => (Encoding::Packed { record_bytes }, 0, None),
        }
    }
}

/// Reads the records of the segment at `path` one by one (memory holds one record at a time) and
/// hands each to `apply`. Returns how many bytes at the end were not a whole valid record, with
/// the reason (the zeros written ahead after the last record are not: see the module doc).
#[cfg(test)]
pub(super) fn replay(
    path: &Path,
    apply: impl FnMut(Record) -> io::Result<()>,
) -> io::Result<Option<(u64, String)>> {
    replay_to_end(path, apply).map(|(_, torn)| torn)
}

/// [`replay`], also returning where the last whole record ends.
pub(super) fn replay_to_end(
    path: &Path,
    mut apply: impl FnMut(Record) -> io::Result<()>,
) -> io::Result<(u64, Option<(u64, String)>)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(256 << 10, file);
    let mut at = 0u64;
    let mut end = 0u64;
    while at < len {
        let torn = |reason: &str| Ok((end, Some((len - at, reason.to_string()))));
        if at % PAGE != 0 {
            // After a commit's last record: zeros up to the next page, where the next one starts.
            let mut kind = [0u8; 1];
            reader.read_exact(&mut kind)?;
            if kind[0] == 0 {
                let gap = at.next_multiple_of(PAGE).min(len) - at - 1;
                io::copy(&mut (&mut reader).take(gap), &mut io::sink())?;
                at += 1 + gap;
                continue;
            }
            reader.seek_relative(-1)?;
        }
        let left = len - at;
        let mut prefix_bytes = [0u8; PREFIX_LEN];
        let prefix_len = usize::try_from(left.min(PREFIX_LEN as u64)).unwrap_or(PREFIX_LEN);
        reader.read_exact(prefix_bytes.get_mut(..prefix_len).unwrap_or_default())?;
        if prefix_bytes[0] == 0 {
            return match first_non_zero(reader.get_ref(), at, len)? {
                None => Ok((end, None)),
                Some(_) => torn("holds bytes after the zeros that end its records"),
            };
        }
        if left < PREFIX_LEN as u64 {
            return torn("ends inside a record's prefix");
        }
        let prefix = parse_prefix(&prefix_bytes);
        let Some((kind, _)) = kind_of(prefix.kind) else {
            return torn(&format!("unknown record kind {}", prefix.kind));
        };
        let size = (PREFIX_LEN + prefix.id_len + marker_len(prefix.kind)) as u64;
        if prefix.payload_len > left.saturating_sub(size) || size > left {
            return torn("ends inside a record");
        }
        // Both lengths were just shown to be backed by the file.
        let payload_len = usize::try_from(prefix.payload_len).unwrap_or(0);
        let mut id = vec![0u8; prefix.id_len];
        let mut payload = vec![0u8; payload_len + marker_len(prefix.kind)];
        reader.read_exact(&mut id)?;
        reader.read_exact(&mut payload)?;
        match verify(&prefix_bytes, &prefix, id, payload) {
            Ok((header, payload)) => {
                let offset = at;
                at += size + prefix.payload_len;
                end = at;
                apply(Record {
                    kind,
                    header,
                    packed: is_packed(prefix.kind),
                    payload,
                    offset,
                })?;
            }
            Err(ReadError::Corrupt(reason)) => return torn(&reason),
            Err(ReadError::Io(error)) => return Err(error),
        }
    }
    Ok((end, None))
}

/// The offset of the first byte of `file` in `at..len` that is not zero, if any: zeros to the
/// end are the part written ahead and never used; anything else after them is an append a crash
/// cut off. Reads at most one chunk of zeros ahead (plus a page's gap), in pieces.
fn first_non_zero(file: &File, mut at: u64, len: u64) -> io::Result<Option<u64>> {
    let mut buffer = vec![0u8; 256 << 10];
    while at < len {
        let want = usize::try_from((len - at).min(buffer.len() as u64)).unwrap_or(buffer.len());
        let piece = buffer.get_mut(..want).unwrap_or_default();
        file.read_exact_at(piece, at)?;
        if let Some(i) = piece.iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += want as u64;
    }
    Ok(None)
}

/// What [`read_at`] found at an offset.
pub(super) enum Next {
    /// A whole valid record, and the offset just past it.
    Record(Record, u64),
    /// Nothing more before `len`.
    End,
    /// Bytes that are no whole valid record (a torn tail); the reason.
    Torn(String),
}

/// Reads the record at or after `at` (skipping the zeros between commits) of the segment open as
/// `file`, of which only the first `len` bytes are known written, its payload decompressed if
/// packed. Memory holds one record.
pub(super) fn read_at(file: &File, at: u64, len: u64) -> io::Result<Next> {
    read_at_into(file, at, len, &mut Vec::new(), &mut Vec::new())
}

/// [`read_at`], a packed payload decompressed into `unpacked` (a buffer used again, which the
/// record then holds: see [`snappy::decode_framed_into`]); a plain record's leaves it. A packed
/// record is read into `record`, also used again (its contents are of no use to the caller).
pub(super) fn read_at_into(
    file: &File,
    at: u64,
    len: u64,
    unpacked: &mut Vec<u8>,
    record: &mut Vec<u8>,
) -> io::Result<Next> {
    read_at_with(file, at, len, Some(unpacked), record)
}

/// [`read_at_into`], a packed record handed out as it is stored (`packed`, its payload the
/// header and frames [`unpack_verified_into`] decompresses, its checksum verified), in `record`'s
/// buffer (taken: the caller gives the next read another). Remote-write egress decompresses it on
/// the shard that converts it, not on its one reader thread.
pub(super) fn read_at_packed(
    file: &File,
    at: u64,
    len: u64,
    record: &mut Vec<u8>,
) -> io::Result<Next> {
    read_at_with(file, at, len, None, record)
}

/// [`read_at_into`], a packed payload decompressed into `unpacked` if given, else handed out
/// packed ([`read_at_packed`]).
fn read_at_with(
    file: &File,
    mut at: u64,
    len: u64,
    unpacked: Option<&mut Vec<u8>>,
    record: &mut Vec<u8>,
) -> io::Result<Next> {
    if at >= len {
        return Ok(Next::End);
    }
    if at % PAGE != 0 {
        let mut kind = [0u8; 1];
        file.read_exact_at(&mut kind, at)?;
        if kind[0] == 0 {
            at = at.next_multiple_of(PAGE);
            if at >= len {
                return Ok(Next::End);
            }
        }
    }
    let left = len - at;
    let mut prefix_bytes = [0u8; PREFIX_LEN];
    let prefix_len = usize::try_from(left.min(PREFIX_LEN as u64)).unwrap_or(PREFIX_LEN);
    file.read_exact_at(prefix_bytes.get_mut(..prefix_len).unwrap_or_default(), at)?;
    if prefix_bytes[0] == 0 {
        // The zeros written ahead (see the module doc) end the records.
        return Ok(match first_non_zero(file, at, len)? {
            None => Next::End,
            Some(_) => Next::Torn("holds bytes after the zeros that end its records".to_string()),
        });
    }
    if left < PREFIX_LEN as u64 {
        return Ok(Next::Torn("ends inside a record's prefix".to_string()));
    }
    let prefix = parse_prefix(&prefix_bytes);
    let Some((kind, _)) = kind_of(prefix.kind) else {
        return Ok(Next::Torn(format!("unknown record kind {}", prefix.kind)));
    };
    let marker = marker_len(prefix.kind);
    let size = (PREFIX_LEN + prefix.id_len + marker) as u64;
    if size > left || prefix.payload_len > left - size {
        return Ok(Next::Torn("ends inside a record".to_string()));
    }
    // Both lengths were just shown to be backed by the file.
    let payload_len = usize::try_from(prefix.payload_len).unwrap_or(0);
    let mut id = vec![0u8; prefix.id_len];
    file.read_exact_at(&mut id, at + PREFIX_LEN as u64)?;
    let payload_at = at + (PREFIX_LEN + prefix.id_len) as u64;
    // A packed payload is handed out decompressed; one that does not decompress ends the
    // segment's reading as a failed checksum does.
    let packed = is_packed(prefix.kind) && unpacked.is_none();
    let read = match (is_packed(prefix.kind), unpacked) {
        (false, _) => {
            let mut payload = vec![0u8; payload_len + marker];
            file.read_exact_at(&mut payload, payload_at)?;
            verify(&prefix_bytes, &prefix, id, payload)
        }
        (true, None) => {
            // As it is stored, in a buffer of the caller's (only its growth is zeroed).
            let end = payload_len + marker;
            if record.len() < end {
                record.resize(end, 0);
            }
            record.truncate(end);
            file.read_exact_at(record, payload_at)?;
            verify_in_place(&prefix_bytes, &prefix, id, record).map(|(header, payload_len)| {
                let mut payload = std::mem::take(record);
                payload.truncate(payload_len);
                (header, payload)
            })
        }
        (true, Some(unpacked)) => {
            // Read over what the buffer held (only its growth is zeroed, not the whole record
            // each time: a fresh zeroed buffer cost egress 3 % of its CPU); the record's bytes
            // are exactly its first `payload_len + marker`.
            let end = payload_len + marker;
            if record.len() < end {
                record.resize(end, 0);
            }
            let bytes = record.get_mut(..end).unwrap_or_default();
            file.read_exact_at(bytes, payload_at)?;
            let bytes = record.get(..end).unwrap_or_default();
            let read = verify_in_place(&prefix_bytes, &prefix, id, bytes).and_then(
                |(header, payload_len)| {
                    // The record's checksum has just covered every byte of its frames.
                    let payload = bytes.get(..payload_len).unwrap_or_default();
                    unpack_verified_into(payload, unpacked)
                        .map(|()| (header, std::mem::take(unpacked)))
                },
            );
            if record.capacity() > KEPT_RECORD_BUFFER {
                *record = Vec::new();
            }
            read
        }
    };
    match read {
        Ok((header, payload)) => Ok(Next::Record(
            Record {
                kind,
                header,
                packed,
                payload,
                offset: at,
            },
            at + size + prefix.payload_len,
        )),
        Err(ReadError::Corrupt(reason)) => Ok(Next::Torn(reason)),
        Err(ReadError::Io(error)) => Err(error),
    }
}

/// The journal's writing end: the current segment and how full it is.
pub(super) struct JournalState {
    /// Appended to; `None` until the first append, or after starting a new one failed.
    pub(super) segment: Option<Arc<Segment>>,
    /// Bytes written to it and synced.
    pub(super) len: u64,
    /// A write or sync failed: what follows `len` is unknown, so the next append starts a new
    /// segment rather than write after bytes a replay could misread.
    pub(super) broken: bool,
    /// The number of the next segment.
    pub(super) next_number: u64,
    /// Where full segments go to be checkpointed; `None` once the store closes.
    pub(super) retired: Option<Sender<Arc<Segment>>>,
    /// Decompressed bytes of the packed payloads the index finds in the current segment (an
    /// upper bound: a removal or a sweep does not lower it). A read of one holds it decompressed
    /// in memory (a `/federate` scrape pins every cluster at once), so the segment is closed and
    /// checkpointed into plain cluster files once this passes `packed_budget`.
    pub(super) packed_bytes: u64,
    /// See `packed_bytes` ([`PACKED_BUDGET`]; tests lower it).
    pub(super) packed_budget: u64,
    /// The same for the payloads of chains (the `patch` module) in the current segment: a read
    /// of one holds the payload it rebuilds in memory.
    pub(super) chained_bytes: u64,
    /// See `chained_bytes` ([`CHAIN_BUDGET`]; tests lower it).
    pub(super) chain_budget: u64,
    /// The buffer the last commit encoded its batch into, emptied, for the next (commits hold
    /// this state, so one at a time): a fresh one of a batch's size (~200 KB at 64 senders) came
    /// from the top of the heap, which glibc trims after each free, so every commit faulted its
    /// pages in again.
    pub(super) batch_buffer: Vec<u8>,
}

/// Decompressed bytes of packed payloads a segment may hold reads to (see
/// [`JournalState::packed_bytes`]): at 51 KB an upload, ~1,300 clusters' uploads.
pub(super) const PACKED_BUDGET: u64 = 64 << 20;

/// Decompressed bytes of packed payloads all segments not yet checkpointed may hold reads to
/// ([`Shared::packed_unsettled`]). The per-segment budget alone does not bound them: with many
/// clusters, segments close faster than the checkpointer writes their files. Past it, uploads are
/// journaled plain (as families, read from the segment file, never held) until checkpoints catch
/// up: packing saves the commit's copies, it must not cost a `/federate` scrape its memory.
pub(super) const PACKED_UNSETTLED_BUDGET: u64 = 32 << 20;

/// Bytes of chained payloads a segment may hold reads to (see [`JournalState::chained_bytes`]):
/// ~470 clusters of 280 KB that push by remote write. Past it the segment is closed, and each
/// cluster's next request starts a new chain with a whole image there.
pub(super) const CHAIN_BUDGET: u64 = 128 << 20;

/// How an append changed the bytes of the current segment's payloads that reads hold in memory
/// ([`JournalState::packed_bytes`], [`JournalState::chained_bytes`]), as the index entries it
/// made and replaced say.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Held {
    packed: i64,
    chained: i64,
}

impl Held {
    /// Counts `entry`, just indexed, when a read of it from segment `number` holds its payload.
    pub(super) fn add(&mut self, entry: &Entry, number: u64) {
        self.change(entry, number, 1);
    }

    /// Uncounts `entry`, just replaced in the index.
    pub(super) fn remove(&mut self, entry: &Entry, number: u64) {
        self.change(entry, number, -1);
    }

    fn change(&mut self, entry: &Entry, number: u64, sign: i64) {
        let bytes = i64::try_from(entry.payload_bytes)
            .unwrap_or(i64::MAX)
            .saturating_mul(sign);
        match &entry.location {
            Location::Journal {
                segment,
                encoding: Encoding::Packed { .. },
                ..
            } if segment.number == number => self.packed = self.packed.saturating_add(bytes),
            Location::Chain { segment, .. } if segment.number == number => {
                self.chained = self.chained.saturating_add(bytes)
            }
            _ => {}
        }
    }
}

impl Shared {
    /// The number of the segment the next append to `journal` (locked by the caller) writes
    /// to, when it is the current one; `None` when that append starts a new segment (the current
    /// one is full, by bytes or by the packed payloads its reads may hold, or broken).
    pub(super) fn appending_to(&self, journal: &JournalState) -> Option<u64> {
        let full = journal.len >= self.segment_bytes.load(Ordering::Relaxed)
            || journal.packed_bytes >= journal.packed_budget
            || journal.chained_bytes >= journal.chain_budget;
        match (&journal.segment, journal.broken || full) {
            (Some(segment), false) => Some(segment.number),
            _ => None,
        }
    }

    /// Appends `bytes` to the journal, locked by the caller (the committer decides what to
    /// encode by the segment it goes to, [`Shared::appending_to`]; a removal checks the index
    /// first), and syncs them; `then` runs with the journal still locked, with the segment and the
    /// offset `bytes` start at (so index updates follow the journal's order), and says how the
    /// payloads reads of the segment hold in memory changed. Starts a new segment first when the
    /// current one is full or broken.
    pub(super) fn append_locked<T>(
        &self,
        journal: &mut JournalState,
        bytes: &[u8],
        then: impl FnOnce(&Arc<Segment>, u64) -> (T, Held),
    ) -> Result<T, StoreError> {
        if self.appending_to(journal).is_none() {
            if let Some(old) = journal.segment.take() {
                if let Some(retired) = &journal.retired {
                    // Its records stay readable through the index until the checkpoint is done.
                    let _ = retired.send(old);
                }
            }
            let number = journal.next_number;
            journal.next_number += 1;
            let segment = Segment::create(&self.dir, number)
                .and_then(|segment| self.dir_file.sync_all().map(|()| segment))
                .map_err(|e| {
                    StoreError::io(
                        format!(
                            "creating {}",
                            self.dir.join(format!("{}{number}", PREFIX)).display()
                        ),
                        e,
                    )
                })?;
            journal.segment = Some(Arc::new(segment));
            journal.len = 0;
            journal.packed_bytes = 0;
            journal.chained_bytes = 0;
            journal.broken = false;
        }
        let Some(segment) = journal.segment.clone() else {
            return Err(StoreError::Closed);
        };
        // Each commit starts on a fresh page: the previous commit's last page is never written
        // again (a page under writeback would make this write wait for it), and a commit always
        // needs new space, so a full disk is refused at once rather than after the slack of the
        // last page is used up. The gap is a hole that replay skips.
        let offset = journal.len.next_multiple_of(PAGE);
        // Opened by its path for each commit (a few microseconds, next to a sync's milliseconds),
        // as the per-upload temp files were: a storage directory that became read-only, also
        // through a read-only mount on top of it, refuses the commit instead of taking it
        // through a descriptor opened before.
        let end = offset + bytes.len() as u64;
        let zeroed = segment.zeroed.load(Ordering::Relaxed);
        // The next chunk of zeros, when this append passes the last one (see "Zeros written
        // ahead"), up to the segment's limit at most: a full segment is closed, not grown.
        let ahead = (end > zeroed && !segment.zeros_failed.load(Ordering::Relaxed)).then(|| {
            let limit = self.segment_bytes.load(Ordering::Relaxed);
            (zeroed.max(end), end.saturating_add(ZEROS_AHEAD).min(limit))
        });
        let written = File::options()
            .write(true)
            .open(&segment.path)
            .and_then(|out| {
                out.write_all_at(bytes, offset)?;
                if let Some((from, to)) = ahead.filter(|(from, to)| from < to) {
                    // Only what later syncs cost: a failure (a full disk) leaves this append
                    // to be synced as any append past the end is. The zeros that were written
                    // go, so they never take the space the records and cluster files need,
                    // and this segment stops trying (each try would fill the disk again).
                    match write_zeros(&out, from, to) {
                        Ok(()) => segment.zeroed.store(to, Ordering::Relaxed),
                        Err(error) => {
                            segment.zeros_failed.store(true, Ordering::Relaxed);
                            log::info!(
                                "writing zeros ahead in {}: {error}; its appends sync the file's \
                                 size from now on",
                                segment.path.display()
                            );
                            out.set_len(from)?;
                        }
                    }
                }
                out.sync_data()
            });
        if let Err(error) = written {
            journal.broken = true;
            return Err(StoreError::io(
                format!("appending to {}", segment.path.display()),
                error,
            ));
        }
        journal.len = end;
        segment.written.store(end, Ordering::Relaxed);
        let (result, held) = then(&segment, offset);
        let before = journal.packed_bytes;
        journal.packed_bytes = journal.packed_bytes.saturating_add_signed(held.packed);
        segment
            .packed
            .store(journal.packed_bytes, Ordering::Relaxed);
        let after = journal.packed_bytes;
        let _ = self
            .packed_unsettled
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(after).saturating_sub(before))
            });
        journal.chained_bytes = journal.chained_bytes.saturating_add_signed(held.chained);
        if let Some(egress) = &self.egress {
            *lock(&egress.tip) = Some((segment.number, journal.len));
            let _ = egress.appended.try_send(());
        }
        Ok(result)
    }
}

/// Writes zeros to `out` from `from` to `to`, 1 MiB a write, from [`zeros`].
fn write_zeros(out: &File, mut from: u64, to: u64) -> io::Result<()> {
    let zeros = zeros();
    while from < to {
        let n = usize::try_from(to - from).map_or(zeros.len(), |n| n.min(zeros.len()));
        out.write_all_at(zeros.get(..n).unwrap_or_default(), from)?;
        from += n as u64;
    }
    Ok(())
}

/// The zeros a chunk ahead is written from: allocated at the first chunk, zeroed by the
/// allocator, and kept. A buffer allocated per chunk was fresh memory (mapped anew for a buffer
/// this large), and the kernel's copy out of it faulted on each of its pages, at every chunk: at
/// 64 senders that copy took 5.7% of the server's CPU, ten times the copy of the records
/// themselves. Kept, its pages stay mapped (to the kernel's one zero page, so they cost no
/// memory). Not a static, which would put the megabyte in the binary.
fn zeros() -> &'static [u8] {
    static ZEROS: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    ZEROS.get_or_init(|| vec![0u8; 1 << 20].into_boxed_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test (`tag` tells the tests apart).
    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("telemeter-journal-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_reported() {
        let dir = temp_dir("round-trip");
        let segment = Segment::create(&dir, 7).unwrap();
        let mut bytes = Vec::new();
        let first = encode(PUT, "a", 5, b"payload", &mut bytes).unwrap();
        encode(REMOVE, "b", 0, b"", &mut bytes).unwrap();
        let whole = bytes.len();
        encode(PUT, "c", 6, b"cut off", &mut bytes).unwrap();
        bytes.truncate(bytes.len() - 3);
        segment.file.write_all_at(&bytes, 0).unwrap();

        let (header, payload) = segment
            .read_put("a", first as u64, 7, Encoding::Plain)
            .unwrap();
        assert_eq!(
            (header.cluster_id.as_str(), payload.as_slice()),
            ("a", &b"payload"[..])
        );
        assert_eq!(list(&dir).unwrap(), vec![7]);
        assert!(
            is_segment_name("journal-7")
                && !is_segment_name("journal-")
                && !is_segment_name("journal-x")
        );

        let mut seen = Vec::new();
        let torn = replay(&segment.path, |r| {
            seen.push((r.kind, r.header.cluster_id, r.payload));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (PUT, "a".to_string(), b"payload".to_vec()),
                (REMOVE, "b".to_string(), vec![])
            ]
        );
        let (left, _) = torn.unwrap();
        assert_eq!(left, (bytes.len() - whole) as u64);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Commits of `records` (cluster id, payload) each on its own page, as appends write them,
    /// then `zeros` bytes of zeros written ahead; returns the image and where its records end.
    fn committed_with_zeros(records: &[(&str, &[u8])], zeros: usize) -> (Vec<u8>, u64) {
        let mut bytes = Vec::new();
        for (id, payload) in records {
            bytes.resize((bytes.len() as u64).next_multiple_of(PAGE) as usize, 0);
            encode(PUT, id, 5, payload, &mut bytes).unwrap();
        }
        let end = bytes.len() as u64;
        bytes.resize(bytes.len() + zeros, 0);
        (bytes, end)
    }

    #[test]
    fn a_segment_ending_in_zeros_written_ahead_replays_every_record_and_no_torn_tail() {
        let dir = temp_dir("zeros-ahead");
        let segment = Segment::create(&dir, 1).unwrap();
        let big = vec![9u8; 3 * PAGE as usize];
        let records: [(&str, &[u8]); 3] = [("a", b"first"), ("b", &big), ("c", b"last")];
        // As a crash leaves it: the zeros of the last chunk after the last commit, from a page
        // boundary or from inside the last commit's page.
        for zeros in [ZEROS_AHEAD as usize, PAGE as usize - 7, 1, 0] {
            let (image, end) = committed_with_zeros(&records, zeros);
            segment.file.set_len(0).unwrap();
            segment.file.write_all_at(&image, 0).unwrap();
            let mut seen = Vec::new();
            let (replayed_end, torn) = replay_to_end(&segment.path, |r| {
                seen.push((r.header.cluster_id, r.payload.len()));
                Ok(())
            })
            .unwrap();
            assert_eq!(
                seen,
                vec![
                    ("a".to_string(), 5),
                    ("b".to_string(), big.len()),
                    ("c".to_string(), 4)
                ],
                "{zeros} zeros"
            );
            assert_eq!((replayed_end, torn), (end, None), "{zeros} zeros");
            // Egress, reading a segment whose size it takes from the file, stops there too.
            let (mut at, mut read) = (0, 0);
            loop {
                match read_at(&segment.file, at, image.len() as u64).unwrap() {
                    Next::Record(_, next) => (at, read) = (next, read + 1),
                    Next::End => break,
                    Next::Torn(reason) => panic!("{zeros} zeros: torn: {reason}"),
                }
            }
            assert_eq!((at, read), (end, 3), "{zeros} zeros");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_torn_in_the_zeros_written_ahead_is_reported_and_ignored() {
        let dir = temp_dir("zeros-torn");
        let segment = Segment::create(&dir, 1).unwrap();
        let (image, end) = committed_with_zeros(&[("a", b"kept")], ZEROS_AHEAD as usize);
        let next_commit = end.next_multiple_of(PAGE) as usize;
        let mut torn_record = Vec::new();
        encode(PUT, "b", 6, &vec![7u8; 3 * PAGE as usize], &mut torn_record).unwrap();
        // Its first page on disk and the rest still zeros; its last page alone (the kind byte
        // at the page boundary is zero, but what follows is not); its prefix cut short.
        let first_page = torn_record.get(..PAGE as usize).unwrap().to_vec();
        let last_page = PAGE as usize * 2..torn_record.len();
        let cases: [(&str, usize, &[u8]); 3] = [
            ("first page", next_commit, &first_page),
            (
                "last page",
                next_commit + last_page.start,
                torn_record.get(last_page).unwrap(),
            ),
            ("prefix", next_commit, torn_record.get(..10).unwrap()),
        ];
        for (what, at, bytes) in cases {
            let mut crashed = image.clone();
            crashed
                .get_mut(at..at + bytes.len())
                .unwrap()
                .copy_from_slice(bytes);
            segment.file.set_len(0).unwrap();
            segment.file.write_all_at(&crashed, 0).unwrap();
            let mut seen = Vec::new();
            let (replayed_end, torn) = replay_to_end(&segment.path, |r| {
                seen.push(r.header.cluster_id);
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, vec!["a".to_string()], "{what}");
            assert_eq!(replayed_end, end, "{what}");
            let (left, reason) = torn.unwrap_or_else(|| panic!("{what}: no torn tail reported"));
            assert_eq!(
                left,
                (crashed.len() - next_commit) as u64,
                "{what}: {reason}"
            );
            let after_first = match read_at(&segment.file, 0, crashed.len() as u64).unwrap() {
                Next::Record(_, next) => next,
                _ => panic!("{what}: the first record reads"),
            };
            assert!(
                matches!(
                    read_at(&segment.file, after_first, crashed.len() as u64).unwrap(),
                    Next::Torn(_)
                ),
                "{what}: egress"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_changed_byte_fails_the_checksum() {
        let dir = temp_dir("flip");
        let segment = Segment::create(&dir, 1).unwrap();
        let mut bytes = Vec::new();
        encode(PUT, "a", 5, &[7u8; 100], &mut bytes).unwrap();
        let second = encode(PUT, "b", 6, &[8u8; 100], &mut bytes).unwrap();
        for at in [second + 1, second + 5, bytes.len() - 1, second + 40] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            segment.file.write_all_at(&flipped, 0).unwrap();
            assert!(
                segment
                    .read_put("b", second as u64, 100, Encoding::Plain)
                    .is_err(),
                "byte {at}"
            );
            let mut seen = 0;
            let torn = replay(&segment.path, |_| {
                seen += 1;
                Ok(())
            })
            .unwrap();
            assert_eq!(
                (seen, torn.map(|(left, _)| left)),
                (1, Some((bytes.len() - second) as u64))
            );
        }
        assert_ne!(hash(&[0u8; 3], 0), hash(&[0u8; 4], 0));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_plain_uploads_put_ship_or_serve_kind_can_be_packed() {
        // A packed payload is an upload as sent: never a removal, a version 1 record, or a
        // record carrying a remote-write marker (whose bytes would be read as snappy frames).
        for base in [PUT + VERSION_2_KINDS, SHIP, SERVE] {
            assert!(kind_of(base | PACKED).is_some(), "{base}");
        }
        for base in [
            PUT,
            REMOVE,
            REMOVE + VERSION_2_KINDS,
            PUT_MARKED,
            SERVE_MARKED,
        ] {
            assert_eq!(kind_of(base | PACKED), None, "{base}");
        }
        assert_eq!(marker_len(PUT_MARKED | PACKED), 0);
    }

    #[test]
    fn version_1_records_are_still_read_and_version_2_is_written() {
        let dir = temp_dir("v1");
        let segment = Segment::create(&dir, 3).unwrap();
        let mut old = Vec::new();
        let first = encode_as(Checksum::Hash64, PUT, "a", 5, b"old payload", &mut old).unwrap();
        encode_as(Checksum::Hash64, REMOVE, "b", 0, b"", &mut old).unwrap();
        let mut new = Vec::new();
        encode(PUT, "a", 5, b"old payload", &mut new).unwrap();
        // Same layout, another kind byte and checksum.
        assert_eq!((old[first], new[0]), (1, 3));
        assert_eq!(old.get(1..19), new.get(1..19));
        assert_ne!(old.get(19..27), new.get(19..27));
        let crc = crc32c::extend(
            crc32c::extend(crc32c::extend(0, &new[..19]), b"a"),
            b"old payload",
        );
        assert_eq!(new.get(19..27), Some(&u64::from(crc).to_le_bytes()[..]));

        segment.file.write_all_at(&old, 0).unwrap();
        let (header, payload) = segment
            .read_put("a", first as u64, 11, Encoding::Plain)
            .unwrap();
        assert_eq!(
            (header.cluster_id.as_str(), &payload[..]),
            ("a", &b"old payload"[..])
        );
        let mut seen = Vec::new();
        let torn = replay(&segment.path, |r| {
            seen.push((r.kind, r.header.cluster_id));
            Ok(())
        })
        .unwrap();
        assert!(torn.is_none());
        assert_eq!(
            seen,
            vec![(PUT, "a".to_string()), (REMOVE, "b".to_string())]
        );
        // A version 1 record whose bytes changed still fails its (version 1) checksum.
        let mut flipped = old.clone();
        flipped[first + 30] ^= 1;
        segment.file.write_all_at(&flipped, 0).unwrap();
        assert!(segment
            .read_put("a", first as u64, 11, Encoding::Plain)
            .is_err());
        // A kind byte of no version ends the replay.
        let mut unknown = old.clone();
        unknown[first] = 9;
        segment.file.write_all_at(&unknown, 0).unwrap();
        let torn = replay(&segment.path, |_| Ok(())).unwrap();
        assert_eq!(torn.map(|(left, _)| left), Some(old.len() as u64));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A compressible payload of `len` bytes and its snappy frames.
    fn packable(len: u32) -> (Vec<u8>, Vec<u8>) {
        let plain: Vec<u8> = (0..len)
            .map(|i| (i % 97) as u8 ^ (i / 4096) as u8)
            .collect();
        let frames = snappy::encode_framed(&plain);
        assert!(
            frames.len() < plain.len() / 4,
            "the test payload compresses"
        );
        (plain, frames)
    }

    #[test]
    fn a_packed_record_is_read_decompressed_and_replayed_without_decompressing() {
        let dir = temp_dir("packed");
        let segment = Segment::create(&dir, 1).unwrap();
        let (plain, frames) = packable(50_000);
        let mut bytes = Vec::new();
        let first =
            encode_packed(PUT, "a", 5, plain.len() as u64, 1234, &frames, &mut bytes).unwrap();
        let second = encode(PUT, "b", 6, b"plain", &mut bytes).unwrap();
        let shipped =
            encode_packed(SHIP, "c", 7, plain.len() as u64, 99, &frames, &mut bytes).unwrap();
        segment.file.write_all_at(&bytes, 0).unwrap();
        // A version 2 put with the packed flag; its payload is the frames behind 16 bytes.
        assert_eq!(bytes[first], (PUT + VERSION_2_KINDS) | PACKED);
        assert_eq!(bytes[shipped], SHIP | PACKED);
        let record_bytes = packed_record_bytes(frames.len());
        assert_eq!(
            bytes.len() - shipped,
            PREFIX_LEN + 1 + record_bytes as usize
        );
        assert!(encode_packed(REMOVE, "d", 0, 0, 0, b"", &mut Vec::new()).is_err());

        let packed = Encoding::Packed { record_bytes };
        let (header, payload) = segment
            .read_put("a", first as u64, plain.len() as u64, packed)
            .unwrap();
        assert_eq!((header.payload_len, &payload), (plain.len() as u64, &plain));
        // Read as the index says it is kept, or not at all.
        assert!(segment
            .read_put("a", first as u64, record_bytes, Encoding::Plain)
            .is_err());
        assert!(segment
            .read_put("a", first as u64, plain.len() as u64 + 1, packed)
            .is_err());
        assert!(segment
            .read_put("b", second as u64, 5, Encoding::Packed { record_bytes: 5 })
            .is_err());

        let mut seen = Vec::new();
        let torn = replay(&segment.path, |r| {
            seen.push((
                r.kind,
                r.header.cluster_id.clone(),
                r.encoding(),
                r.payload.len(),
            ));
            Ok(())
        })
        .unwrap();
        assert!(torn.is_none());
        assert_eq!(
            seen,
            vec![
                (
                    PUT,
                    "a".to_string(),
                    (packed, plain.len() as u64, Some(1234)),
                    record_bytes as usize
                ),
                (PUT, "b".to_string(), (Encoding::Plain, 5, None), 5),
                (
                    SHIP,
                    "c".to_string(),
                    (packed, plain.len() as u64, Some(99)),
                    record_bytes as usize
                ),
            ]
        );

        // Egress reads every record's families.
        let mut at = 0;
        let mut read = Vec::new();
        while let Next::Record(record, next) =
            read_at(&segment.file, at, bytes.len() as u64).unwrap()
        {
            read.push((record.kind, record.payload));
            at = next;
        }
        assert_eq!(
            read,
            vec![
                (PUT, plain.clone()),
                (PUT, b"plain".to_vec()),
                (SHIP, plain.clone())
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_packed_record_whose_bytes_changed_is_refused_as_a_failed_checksum_is() {
        let dir = temp_dir("packed-flip");
        let segment = Segment::create(&dir, 1).unwrap();
        let (plain, frames) = packable(50_000);
        let mut bytes = Vec::new();
        encode(PUT, "a", 5, b"before", &mut bytes).unwrap();
        let second =
            encode_packed(PUT, "b", 6, plain.len() as u64, 1, &frames, &mut bytes).unwrap();
        let packed = Encoding::Packed {
            record_bytes: packed_record_bytes(frames.len()),
        };
        let expect_refused = |image: &[u8], what: &str| {
            segment.file.set_len(0).unwrap();
            segment.file.write_all_at(image, 0).unwrap();
            assert!(
                matches!(
                    segment.read_put("b", second as u64, plain.len() as u64, packed),
                    Err(ReadError::Corrupt(_))
                ),
                "{what}: read"
            );
            let mut seen = 0;
            let torn = replay(&segment.path, |_| {
                seen += 1;
                Ok(())
            })
            .unwrap();
            assert_eq!(
                (seen, torn.map(|(left, _)| left)),
                (1, Some((image.len() - second) as u64)),
                "{what}: replay"
            );
            let after_first = match read_at(&segment.file, 0, image.len() as u64).unwrap() {
                Next::Record(_, next) => next,
                _ => panic!("{what}: the first record reads"),
            };
            assert!(
                matches!(
                    read_at(&segment.file, after_first, image.len() as u64).unwrap(),
                    Next::Torn(_)
                ),
                "{what}: egress"
            );
        };
        // A byte of the prefix, the packed header, the frames' header, the compressed data.
        let payload_at = second + PREFIX_LEN + 1;
        for at in [
            second + 5,
            payload_at + 3,
            payload_at + PACKED_HEADER_LEN + 2,
            bytes.len() - 100,
        ] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            expect_refused(&flipped, &format!("byte {at} flipped"));
        }
        // Frames that the journal's checksum vouches for but that do not decompress (a flipped
        // byte inside the compressed data, caught by snappy's own checksum), or that declare
        // another length than the record says.
        let mut bad_frames = frames.clone();
        let last = bad_frames.len() - 50;
        bad_frames[last] ^= 0x10;
        for (plain_len, frames, what) in [
            (plain.len() as u64, &bad_frames, "bad frames"),
            (plain.len() as u64 + 1, &frames, "another length"),
            (u64::MAX, &frames, "an absurd length"),
        ] {
            let mut image = Vec::new();
            encode(PUT, "a", 5, b"before", &mut image).unwrap();
            encode_packed(PUT, "b", 6, plain_len, 1, frames, &mut image).unwrap();
            if what == "bad frames" {
                // Its declared lengths hold, so the replay indexes it; the read refuses it.
                segment.file.set_len(0).unwrap();
                segment.file.write_all_at(&image, 0).unwrap();
                assert!(matches!(
                    segment.read_put("b", second as u64, plain.len() as u64, packed),
                    Err(ReadError::Corrupt(_))
                ));
                // Egress trusts the journal's checksum over the frames and does not check
                // their own (see `unpack_verified_into`): bytes of the declared length, or an
                // error, never a panic (`a_damaged_frame_under_a_good_record_...`).
                let after_first = match read_at(&segment.file, 0, image.len() as u64).unwrap() {
                    Next::Record(_, next) => next,
                    _ => panic!("the first record reads"),
                };
                match read_at(&segment.file, after_first, image.len() as u64).unwrap() {
                    Next::Torn(_) => {}
                    Next::Record(record, _) => assert_eq!(record.payload.len(), plain.len()),
                    Next::End => panic!("the second record is missing"),
                }
            } else {
                expect_refused(&image, what);
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn egress_reads_packed_records_through_kept_buffers_that_hold_exactly_each_record() {
        let dir = temp_dir("packed-kept");
        let segment = Segment::create(&dir, 1).unwrap();
        let (big, big_frames) = packable(200_000);
        let (small, small_frames) = packable(20_000);
        let mut bytes = Vec::new();
        let mut records = Vec::new();
        for (plain, frames, id) in [
            (&big, &big_frames, "big"),
            (&small, &small_frames, "small"),
            (&big, &big_frames, "big again"),
        ] {
            let at = encode_packed(PUT, id, 5, plain.len() as u64, 1, frames, &mut bytes).unwrap();
            records.push((at, plain, frames));
        }
        let plain_at = encode(PUT, "plain", 6, b"families", &mut bytes).unwrap();
        segment.file.write_all_at(&bytes, 0).unwrap();
        // Both buffers start full of other bytes, longer than any record.
        let mut unpacked = vec![0xaa; 300_000];
        let mut record = vec![0x55; 300_000];
        let kept = record.as_ptr();
        for (at, plain, frames) in &records {
            let Next::Record(read, _) = read_at_into(
                &segment.file,
                *at as u64,
                bytes.len() as u64,
                &mut unpacked,
                &mut record,
            )
            .unwrap() else {
                panic!("record at {at} reads");
            };
            assert_eq!(&read.payload, *plain, "record at {at}");
            // The record buffer's allocation is used again, and it begins with exactly the
            // payload as journaled: the packed header, then the frames.
            assert_eq!(record.as_ptr(), kept);
            let payload_len = PACKED_HEADER_LEN + frames.len();
            assert_eq!(record[..8], (plain.len() as u64).to_le_bytes());
            assert_eq!(&record[PACKED_HEADER_LEN..payload_len], &frames[..]);
            unpacked = read.payload;
        }
        // A plain record is handed out as read, and leaves both buffers.
        let Next::Record(read, _) = read_at_into(
            &segment.file,
            plain_at as u64,
            bytes.len() as u64,
            &mut unpacked,
            &mut record,
        )
        .unwrap() else {
            panic!("the plain record reads");
        };
        assert_eq!(read.payload, b"families");
        assert_eq!((unpacked.len(), record.as_ptr()), (big.len(), kept));
        // A buffer grown past what a reader keeps is freed once the record is read.
        let mut huge = vec![0u8; KEPT_RECORD_BUFFER + 1];
        assert!(matches!(
            read_at_into(
                &segment.file,
                0,
                bytes.len() as u64,
                &mut unpacked,
                &mut huge
            )
            .unwrap(),
            Next::Record(..)
        ));
        assert_eq!(huge.capacity(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_frame_under_a_good_record_checksum_is_never_a_panic_for_egress() {
        let dir = temp_dir("packed-trusted");
        let segment = Segment::create(&dir, 1).unwrap();
        let (plain, frames) = packable(8_000);
        let packed = Encoding::Packed {
            record_bytes: packed_record_bytes(frames.len()),
        };
        let write = |frames: &[u8]| {
            let mut image = Vec::new();
            encode_packed(PUT, "a", 5, plain.len() as u64, 1, frames, &mut image).unwrap();
            segment.file.set_len(0).unwrap();
            segment.file.write_all_at(&image, 0).unwrap();
            image.len() as u64
        };
        // Only a frame's CRC-32C changed, under a journal checksum that holds: egress does not
        // check it again and reads the families; a read for `/federate` still checks it.
        let mut bad_crc = frames.clone();
        bad_crc[14] ^= 1;
        let len = write(&bad_crc);
        match read_at(&segment.file, 0, len).unwrap() {
            Next::Record(record, next) => assert_eq!((record.payload, next), (plain.clone(), len)),
            _ => panic!("the record reads"),
        }
        assert!(matches!(
            segment.read_put("a", 0, plain.len() as u64, packed),
            Err(ReadError::Corrupt(_))
        ));
        // Any byte of the frames changed (the chunk headers, the CRCs, the compressed data):
        // the record is torn, or holds exactly the length its header says.
        let mut unpacked = Vec::new();
        let mut record = Vec::new();
        for at in 0..frames.len() {
            for flip in [0x01u8, 0x80] {
                let mut damaged = frames.clone();
                damaged[at] ^= flip;
                let len = write(&damaged);
                match read_at_into(&segment.file, 0, len, &mut unpacked, &mut record).unwrap() {
                    Next::Torn(_) => {}
                    Next::Record(read, _) => {
                        assert_eq!(read.payload.len(), plain.len(), "byte {at} ^ {flip}");
                        unpacked = read.payload;
                    }
                    Next::End => panic!("byte {at} ^ {flip}: no record"),
                }
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
