//! A remote-write request's change to its cluster's payload, journaled instead of the whole
//! merged payload (issue #17).
//!
//! In the steady state a remote-write request only rewrites the samples of series its cluster
//! already holds, in place and at the same length (`receive::cache`), so what changed is a list
//! of byte ranges: ~26 bytes a series instead of the ~140 of its whole message and every other
//! series of the cluster. The committer journals that list as a "patch" record (kind 9) after
//! the cluster's full image (a put or serve-only record) of the same segment; the index keeps the
//! chain (image, then patches: [`super::state::Location::Chain`]) and reads rebuild the payload
//! from it. Replaying a patch is applying bytes at offsets of a payload of a known length, so it
//! needs no merge function and cannot differ from what was served.
//!
//! When a patch is written rather than an image is decided by the committer with the journal
//! locked, where the segment is chosen (`commit`), so a chain never crosses a segment: a
//! checkpoint writes exactly the state at its segment's end, and the replay of a later segment
//! starts every cluster from an image. A full image is written instead when the chain has
//! [`MAX_PATCHES`] patches, when its patches' bytes would pass the image's size (so a read costs
//! at most twice the payload), when the payload the patch was made against is not the one the
//! index holds (another write came between), or when the segment is full.
//!
//! # Record payload
//!
//! All integers little endian: payload length `p` before and after (u64), the newest sample
//! (i64 ms), the newest remote-write sample (i64 ms, `i64::MIN`: none), then ranges, each an
//! offset (u32), a length `n` (u32) and `n` bytes, with `offset + n <= p`.

use super::file::ReadError;
use super::journal::{self, Encoding, Next, Segment};

/// Most patches after one image: bounds the index entry and the records a read visits.
pub(super) const MAX_PATCHES: usize = 16;

/// Bytes before a patch's ranges.
pub(super) const HEADER_LEN: usize = 8 + 8 + 8;

/// What a caller that edited a payload in place gives the store beside the edited payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// The [`super::Store::version`] of the payload the ranges were written over.
    pub base_version: u64,
    /// That payload's length (and the edited one's: ranges are written in place).
    pub(super) base_len: u64,
    /// [`HEADER_LEN`] bytes the store fills in, then the ranges ([`Patch::push`]).
    pub(super) bytes: Vec<u8>,
}

impl Patch {
    /// An empty patch of the payload of `payload_len` bytes the store holds as `base_version`.
    pub fn new(base_version: u64, payload_len: usize) -> Patch {
        Patch {
            base_version,
            base_len: payload_len as u64,
            bytes: vec![0; HEADER_LEN],
        }
    }

    /// Makes room for `bytes` more of ranges (each 8 bytes and its bytes), so pushing a request's
    /// thousands of ranges does not grow the buffer a dozen times.
    pub fn reserve(&mut self, bytes: usize) {
        self.bytes.reserve(bytes);
    }

    /// Records that `bytes` were written at `offset` of the payload. Ranges apply in order.
    pub fn push(&mut self, offset: u32, bytes: &[u8]) {
        self.bytes.extend_from_slice(&offset.to_le_bytes());
        self.bytes
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(bytes);
    }

    /// The length of the payload it is a change of (as sealed).
    pub(super) fn payload_len(&self) -> u64 {
        header(&self.bytes).map_or(u64::MAX, |(len, _, _)| len)
    }

    /// Bytes of its ranges (what journaling it costs beyond a record's prefix).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it records no range.
    pub fn is_empty(&self) -> bool {
        self.bytes.len() <= HEADER_LEN
    }

    /// Fills in the header: the payload's length and its newest samples after the patch.
    pub(super) fn seal(&mut self, payload_len: u64, newest_sample_ms: i64, newest_received: i64) {
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&payload_len.to_le_bytes());
        header[8..16].copy_from_slice(&newest_sample_ms.to_le_bytes());
        header[16..].copy_from_slice(&newest_received.to_le_bytes());
        if let Some(head) = self.bytes.get_mut(..HEADER_LEN) {
            head.copy_from_slice(&header);
        }
    }
}

/// A patch record's header: (payload length, newest sample, newest remote-write sample).
pub(super) fn header(record: &[u8]) -> Result<(u64, i64, i64), String> {
    let field = |at: usize| -> Result<[u8; 8], String> {
        record
            .get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .ok_or_else(|| "a patch shorter than its header".to_string())
    };
    Ok((
        u64::from_le_bytes(field(0)?),
        i64::from_le_bytes(field(8)?),
        i64::from_le_bytes(field(16)?),
    ))
}

/// Applies the ranges of the patch record `record` to `payload`; refused (nothing said about
/// what was written) when its length is not the one the patch was made for or a range falls
/// outside it.
pub(super) fn apply(payload: &mut [u8], record: &[u8]) -> Result<(), String> {
    let (len, _, _) = header(record)?;
    if len != payload.len() as u64 {
        return Err(format!(
            "a patch of a {len}-byte payload over one of {} bytes",
            payload.len()
        ));
    }
    let mut rest = record.get(HEADER_LEN..).unwrap_or_default();
    while !rest.is_empty() {
        let word = |at: usize| -> Result<usize, String> {
            rest.get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(|b| u32::from_le_bytes(b) as usize)
                .ok_or_else(|| "a patch range cut short".to_string())
        };
        let (offset, n) = (word(0)?, word(4)?);
        let bytes = rest
            .get(8..8 + n)
            .ok_or_else(|| "a patch range cut short".to_string())?;
        payload
            .get_mut(offset..offset + n)
            .ok_or_else(|| format!("a patch range {offset}+{n} past the payload"))?
            .copy_from_slice(bytes);
        rest = rest.get(8 + n..).unwrap_or_default();
    }
    Ok(())
}

/// Rebuilds `cluster_id`'s payload from its chain in `segment`: the image record at `image`
/// (`payload_bytes` long) with the patch records at `patches` applied in order. Every record is
/// checked (checksum, kind, cluster). Returns the receive time of the last record and the payload.
pub(super) fn read_chain(
    segment: &Segment,
    cluster_id: &str,
    image: u64,
    patches: &[u64],
    payload_bytes: u64,
) -> Result<(u64, Vec<u8>), ReadError> {
    let (header, mut payload) =
        segment.read_put(cluster_id, image, payload_bytes, Encoding::Plain)?;
    let mut received_millis = header.received_millis;
    for &at in patches {
        let record = match journal::read_at(&segment.file, at, u64::MAX).map_err(ReadError::Io)? {
            Next::Record(record, _) => record,
            Next::End | Next::Torn(_) => {
                return Err(ReadError::Corrupt(format!("no whole patch record at {at}")))
            }
        };
        if record.kind != journal::PATCH || record.header.cluster_id != cluster_id {
            return Err(ReadError::Corrupt(format!(
                "holds another record at {at} than the index says"
            )));
        }
        apply(&mut payload, &record.payload).map_err(ReadError::Corrupt)?;
        received_millis = record.header.received_millis;
    }
    Ok((received_millis, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_applies_its_ranges_in_order_and_refuses_another_payload() {
        let mut patch = Patch::new(3, 5);
        assert!(patch.is_empty());
        patch.push(1, b"xy");
        patch.push(2, b"z");
        patch.seal(5, 7, i64::MIN);
        assert_eq!(header(&patch.bytes), Ok((5, 7, i64::MIN)));
        let mut payload = b"abcde".to_vec();
        apply(&mut payload, &patch.bytes).unwrap();
        assert_eq!(payload, b"axzde");
        // Another length, or a range past the end, changes nothing the caller keeps.
        assert!(apply(&mut [0u8; 4], &patch.bytes).is_err());
        let mut past = Patch::new(3, 5);
        past.push(4, b"xy");
        past.seal(5, 0, 0);
        assert!(apply(&mut [0u8; 5], &past.bytes).is_err());
        let cut = &patch.bytes[..patch.bytes.len() - 1];
        assert!(apply(&mut [0u8; 5], cut).is_err());
    }
}
