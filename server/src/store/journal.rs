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
//! A record is a kind byte followed by an image in the cluster file format (header with checksum,
//! then payload): [`PUT`] carries an upload, [`REMOVE`] (empty payload) says the cluster's file was
//! removed, so a replay does not bring it back. On open, segments are replayed in order; a record
//! that is cut short or fails its checksum ends its segment's replay (a crash during an append,
//! which was never answered Ok).

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::file::{self, Header, ReadError};

/// Segment files are named this followed by their number.
pub(super) const PREFIX: &str = "journal-";
/// A segment is closed and checkpointed once it holds this many bytes.
pub(super) const SEGMENT_BYTES: u64 = 256 << 20;
/// The record of an upload.
pub(super) const PUT: u8 = 1;
/// The record of a removal.
pub(super) const REMOVE: u8 = 2;

/// One segment file, shared by the index entries whose data it holds. Reads go through the open
/// descriptor, so they keep working while the checkpointer deletes the file.
#[derive(Debug)]
pub(super) struct Segment {
    /// Its number; segments are replayed in this order.
    pub(super) number: u64,
    /// Where it is.
    pub(super) path: PathBuf,
    /// Open for reading and writing.
    pub(super) file: File,
}

impl Segment {
    /// Creates segment `number` in `dir` (which the caller syncs before relying on it).
    pub(super) fn create(dir: &Path, number: u64) -> io::Result<Segment> {
        let path = dir.join(format!("{PREFIX}{number}"));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Segment { number, path, file })
    }

    /// Reads and verifies the record image at `offset` (after its kind byte) of a put of
    /// `payload_bytes` for `cluster_id`.
    pub(super) fn read_put(
        &self,
        cluster_id: &str,
        offset: u64,
        payload_bytes: u64,
    ) -> Result<(Header, Vec<u8>), ReadError> {
        let len = file::header_len(cluster_id).saturating_add(payload_bytes);
        let len = usize::try_from(len)
            .map_err(|_| ReadError::Corrupt(format!("journal record of {len} bytes")))?;
        let mut image = vec![0u8; len];
        self.file
            .read_exact_at(&mut image, offset)
            .map_err(ReadError::Io)?;
        file::read_image(&mut image.as_slice(), len as u64)
    }
}

/// Appends a record of `kind` to `out`; returns the offset of its image relative to `out`'s start.
pub(super) fn encode(
    kind: u8,
    cluster_id: &str,
    received_millis: u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    let header = file::encode_header(cluster_id, received_millis, payload)?;
    out.push(kind);
    let image = out.len();
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(image)
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
    /// [`PUT`] or [`REMOVE`].
    pub(super) kind: u8,
    /// The image's header.
    pub(super) header: Header,
    /// The image's payload (empty for a removal).
    pub(super) payload: Vec<u8>,
}

/// Reads the records of the segment at `path` one by one (memory holds one record at a time) and
/// hands each to `apply`. Returns how many bytes at the end were not a whole valid record, with
/// the reason.
pub(super) fn replay(
    path: &Path,
    mut apply: impl FnMut(Record) -> io::Result<()>,
) -> io::Result<Option<(u64, String)>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(256 << 10, file);
    let mut at = 0u64;
    while at < len {
        let mut kind = [0u8; 1];
        reader.read_exact(&mut kind)?;
        if kind[0] != PUT && kind[0] != REMOVE {
            return Ok(Some((len - at, format!("unknown record kind {}", kind[0]))));
        }
        match file::read_image(&mut reader, len - at - 1) {
            Ok((header, payload)) => {
                at += 1 + file::header_len(&header.cluster_id) + header.payload_len;
                apply(Record {
                    kind: kind[0],
                    header,
                    payload,
                })?;
            }
            Err(ReadError::Corrupt(reason)) => return Ok(Some((len - at, reason))),
            Err(ReadError::Io(error)) => return Err(error),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_tail_is_reported() {
        let dir = std::env::temp_dir().join(format!("telemeter-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let segment = Segment::create(&dir, 7).unwrap();
        let mut bytes = Vec::new();
        let first = encode(PUT, "a", 5, b"payload", &mut bytes).unwrap();
        encode(REMOVE, "b", 0, b"", &mut bytes).unwrap();
        let whole = bytes.len();
        encode(PUT, "c", 6, b"cut off", &mut bytes).unwrap();
        bytes.truncate(bytes.len() - 3);
        segment.file.write_all_at(&bytes, 0).unwrap();

        let (header, payload) = segment.read_put("a", first as u64, 7).unwrap();
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
}
