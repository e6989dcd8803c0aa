//! A remote-write request's change to its cluster's payload, journaled instead of the whole
//! merged payload (issue #17).
//!
//! In the steady state a remote-write request only rewrites the samples of series its cluster
//! already holds, in place and at the same length (`receive::cache`), so what changed is a list
//! of byte ranges: ~18 bytes a series instead of the ~140 of its whole message and every other
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
//!
//! Compact ranges (written from issue #17's second round; both are read): the payload length
//! has its top bit ([`COMPACT`]) set, and each range is the distance of its offset from the end
//! of the range before (0 for the first), zigzag varint, then `n << 4 | k` as a varint, then
//! `n` bytes, then (not journaled) the last `k` bytes of the range before (`k` ≤ 15, ≤ that
//! range's length): the range is `n + k` bytes. A request's series sit a few hundred bytes
//! apart, so the distance takes 1–3 bytes rather than 4 and the length 1–2 rather than 4; and
//! the series of one request most often share their timestamp, so each range leaves out its
//! 7 bytes of timestamp field: ~12 bytes a series rather than ~23. Less journal a request, and
//! the chain takes more patches before its bytes pass the image's size and a whole image is
//! written again.

use super::file::ReadError;
use super::journal::{self, Encoding, Next, Segment};

/// Most patches after one image: bounds the index entry and the records a read visits.
pub(super) const MAX_PATCHES: usize = 16;

/// Bytes before a patch's ranges.
pub(super) const HEADER_LEN: usize = 8 + 8 + 8;

/// The bit of the header's payload length that says the ranges are compact (no payload this
/// store keeps comes near 2^63 bytes).
const COMPACT: u64 = 1 << 63;

/// Most bytes a compact range takes from the end of the one before.
const SHARED_MAX: usize = 15;

/// The last bytes (up to [`SHARED_MAX`]) of the range before, which the next may end with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Tail {
    bytes: [u8; SHARED_MAX],
    len: usize,
}

impl Tail {
    /// The last `k` bytes, if there are that many (they are kept at the end of `bytes`).
    fn last(&self, k: usize) -> Option<&[u8]> {
        match k <= self.len {
            true => self.bytes.get(SHARED_MAX - k..),
            false => None,
        }
    }

    /// Now the tail of a range of `literal` then `shared`.
    fn follow(&mut self, literal: &[u8], shared: &[u8]) {
        let mut next = [0u8; SHARED_MAX];
        let total = literal.len() + shared.len();
        let len = total.min(SHARED_MAX);
        // Filled from the end: the shared bytes, then what fits of the literal ones.
        let from_shared = shared.len().min(len);
        next[SHARED_MAX - from_shared..].copy_from_slice(&shared[shared.len() - from_shared..]);
        let from_literal = len - from_shared;
        next[SHARED_MAX - len..SHARED_MAX - from_shared]
            .copy_from_slice(&literal[literal.len() - from_literal..]);
        *self = Tail { bytes: next, len };
    }

    /// Now the tail of the range `bytes`: [`Tail::follow`] of its literal and shared parts, one
    /// copy of a known length when the range is as long as a tail (a remote-write series' is).
    fn follow_range(&mut self, bytes: &[u8]) {
        match bytes.last_chunk::<SHARED_MAX>() {
            Some(last) => {
                *self = Tail {
                    bytes: *last,
                    len: SHARED_MAX,
                }
            }
            None => self.follow(bytes, &[]),
        }
    }
}

/// Where a [`Patch`] stood ([`Patch::mark`]).
#[derive(Clone, Debug)]
pub struct PatchMark {
    len: usize,
    end: u64,
    tail: Tail,
}

/// What a caller that edited a payload in place gives the store beside the edited payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// The [`super::Store::version`] of the payload the ranges were written over.
    pub base_version: u64,
    /// That payload's length (and the edited one's: ranges are written in place).
    pub(super) base_len: u64,
    /// [`HEADER_LEN`] bytes the store fills in, then the ranges ([`Patch::push`]), compact.
    pub(super) bytes: Vec<u8>,
    /// The end of the last range pushed (0 before the first): where the next one's distance
    /// counts from.
    end: u64,
    /// The last bytes of the last range pushed.
    tail: Tail,
}

impl Patch {
    /// An empty patch of the payload of `payload_len` bytes the store holds as `base_version`.
    pub fn new(base_version: u64, payload_len: usize) -> Patch {
        Patch {
            base_version,
            base_len: payload_len as u64,
            bytes: vec![0; HEADER_LEN],
            end: 0,
            tail: Tail::default(),
        }
    }

    /// Makes room for `bytes` more of ranges (each 8 bytes and its bytes), so pushing a request's
    /// thousands of ranges does not grow the buffer a dozen times.
    pub fn reserve(&mut self, bytes: usize) {
        self.bytes.reserve(bytes);
    }

    /// Records that `bytes` were written at `offset` of the payload. Ranges apply in order.
    pub fn push(&mut self, offset: u32, bytes: &[u8]) {
        let offset = u64::from(offset);
        let distance = offset.wrapping_sub(self.end) as i64;
        // The longest end this range shares with the one before.
        let mut k = 0;
        while k < bytes.len().min(self.tail.len)
            && bytes[bytes.len() - 1 - k] == self.tail.bytes[SHARED_MAX - 1 - k]
        {
            k += 1;
        }
        let literal = bytes.get(..bytes.len() - k).unwrap_or_default();
        put_varint(zigzag(distance), &mut self.bytes);
        put_varint(((literal.len() as u64) << 4) | k as u64, &mut self.bytes);
        self.bytes.extend_from_slice(literal);
        self.end = offset + bytes.len() as u64;
        self.tail.follow_range(bytes);
    }

    /// Where it stands now, to [`Patch::rewind`] to: the ranges pushed after it are dropped.
    pub fn mark(&self) -> PatchMark {
        PatchMark {
            len: self.bytes.len(),
            end: self.end,
            tail: self.tail.clone(),
        }
    }

    /// Drops the ranges pushed since `mark` (taken of this patch): a caller that wrote ranges
    /// as it went and then kept none of its writes.
    pub fn rewind(&mut self, mark: PatchMark) {
        self.bytes.truncate(mark.len.max(HEADER_LEN));
        self.end = mark.end;
        self.tail = mark.tail;
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
        header[..8].copy_from_slice(&(payload_len | COMPACT).to_le_bytes());
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
        u64::from_le_bytes(field(0)?) & !COMPACT,
        i64::from_le_bytes(field(8)?),
        i64::from_le_bytes(field(16)?),
    ))
}

/// Appends `n` as a protobuf varint; most of a patch's are one byte.
#[inline]
fn put_varint(mut n: u64, out: &mut Vec<u8>) {
    // In line, byte by byte: a range's distance takes 2-3 bytes, and prost's general writer was
    // a fifth of what pushing a range cost.
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A signed distance as an unsigned varint's value (protobuf's sint64).
fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Walks the ranges of a patch record (after its header), compact or not, each checked against
/// a payload of `len` bytes: `each` gets its offset and bytes, in order, until one is refused.
fn ranges(
    record: &[u8],
    len: usize,
    mut each: impl FnMut(usize, &[u8], &[u8]),
) -> Result<(), String> {
    let compact = record
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .is_some_and(|b| u64::from_le_bytes(b) & COMPACT != 0);
    let mut rest = record.get(HEADER_LEN..).unwrap_or_default();
    let mut end = 0u64;
    let mut tail = Tail::default();
    let cut = || "a patch range cut short".to_string();
    while !rest.is_empty() {
        let (offset, n, k) = if compact {
            let distance = prost::encoding::decode_varint(&mut rest).map_err(|_| cut())?;
            let h = prost::encoding::decode_varint(&mut rest).map_err(|_| cut())?;
            (
                end.wrapping_add(unzigzag(distance) as u64),
                h >> 4,
                (h & 15) as usize,
            )
        } else {
            let word = |at: usize| -> Result<u64, String> {
                rest.get(at..at + 4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(|b| u64::from(u32::from_le_bytes(b)))
                    .ok_or_else(cut)
            };
            let range = (word(0)?, word(4)?, 0);
            rest = rest.get(8..).unwrap_or_default();
            range
        };
        let literal = usize::try_from(n)
            .ok()
            .and_then(|n| rest.get(..n))
            .ok_or_else(cut)?;
        rest = rest.get(literal.len()..).unwrap_or_default();
        let shared = tail
            .last(k)
            .ok_or("a patch range sharing more than the range before has")?;
        let n = n + shared.len() as u64;
        end = offset
            .checked_add(n)
            .filter(|&e| e <= len as u64)
            .ok_or_else(|| format!("a patch range {offset}+{n} past the payload"))?;
        each(offset as usize, literal, shared);
        if compact {
            let mut next = tail.clone();
            next.follow(literal, shared);
            tail = next;
        }
    }
    Ok(())
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
    let len = payload.len();
    ranges(record, len, |offset, literal, shared| {
        let (n, k) = (literal.len(), shared.len());
        if let Some(target) = payload.get_mut(offset..offset + n + k) {
            target[..n].copy_from_slice(literal);
            target[n..].copy_from_slice(shared);
        }
    })
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
    fn a_rewound_patch_is_the_patch_it_was_at_its_mark() {
        let mut patch = Patch::new(3, 1000);
        patch.push(10, b"abcdefghijklmnopq");
        let at_mark = patch.clone();
        let mark = patch.mark();
        patch.push(40, b"xyzdefghijklmnopq");
        patch.push(90, b"12");
        assert_ne!(patch, at_mark);
        patch.rewind(mark);
        assert_eq!(patch, at_mark);
        // It goes on as the patch it was: the next range after it is what it would be there.
        let mut straight = at_mark.clone();
        straight.push(60, b"rstdefghijklmnopq");
        patch.push(60, b"rstdefghijklmnopq");
        assert_eq!(patch, straight);
        let mut empty = Patch::new(3, 1000);
        let mark = empty.mark();
        empty.push(0, b"a");
        empty.rewind(mark);
        assert!(empty.is_empty());
    }

    #[test]
    fn a_tail_follows_a_whole_range_as_it_follows_its_parts() {
        let bytes: Vec<u8> = (1..=40).collect();
        for len in 0..=bytes.len() {
            let range = &bytes[..len];
            for k in 0..=len.min(SHARED_MAX) {
                let (literal, shared) = range.split_at(len - k);
                let mut parts = Tail::default();
                parts.follow(literal, shared);
                let mut whole = Tail::default();
                whole.follow_range(range);
                assert_eq!(parts, whole, "{len} bytes, {k} shared");
            }
        }
    }

    #[test]
    fn varints_are_protobufs() {
        for n in [
            0,
            1,
            0x7f,
            0x80,
            300,
            1 << 21,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_varint(n, &mut ours);
            prost::encoding::encode_varint(n, &mut theirs);
            assert_eq!(ours, theirs, "{n}");
        }
    }

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

    #[test]
    fn compact_ranges_go_either_way_in_a_few_bytes_each() {
        let mut payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let mut expected = payload.clone();
        let mut patch = Patch::new(1, payload.len());
        // Forwards, backwards and far: each range where it was said, in order.
        for (offset, bytes) in [
            (60_000u32, &b"far"[..]),
            (10, b"0123456789abcd"),
            (40, b"x"),
            (5, b"back"),
            (69_998, b"ZZ"),
            (12, b"over the earlier one"),
        ] {
            patch.push(offset, bytes);
            expected[offset as usize..][..bytes.len()].copy_from_slice(bytes);
        }
        patch.seal(payload.len() as u64, 3, 4);
        assert_eq!(header(&patch.bytes), Ok((70_000, 3, 4)));
        apply(&mut payload, &patch.bytes).unwrap();
        assert_eq!(payload, expected);
        // 14 bytes of one range: 1 of distance and 2 of length beside them, not 8; the next
        // range ending in the same 7 bytes (a timestamp field) journals only its other bytes.
        let mut one = Patch::new(1, 120);
        one.push(20, b"0123456789abcd");
        assert_eq!(one.len(), HEADER_LEN + 1 + 2 + 14);
        one.push(50, b"ABCDEFG789abcd");
        assert_eq!(one.len(), HEADER_LEN + 1 + 2 + 14 + 1 + 1 + 7);
        one.push(80, b"b");
        one.push(90, b"xyzABCDEFG789abcd");
        one.seal(120, 0, 0);
        let mut expected = [0u8; 120];
        expected[20..34].copy_from_slice(b"0123456789abcd");
        expected[50..64].copy_from_slice(b"ABCDEFG789abcd");
        expected[80] = b'b';
        expected[90..107].copy_from_slice(b"xyzABCDEFG789abcd");
        let mut payload = [0u8; 120];
        apply(&mut payload, &one.bytes).unwrap();
        assert_eq!(payload, expected);
        // Sharing more bytes than the range before has is refused.
        let mut greedy = one.bytes[..HEADER_LEN].to_vec();
        greedy.extend_from_slice(&[0x00, 0x20, b'a', b'b', 0x00, 0x13, b'c']);
        assert!(apply(&mut [0u8; 120], &greedy[..greedy.len() - 3]).is_ok());
        assert!(
            apply(&mut [0u8; 120], &greedy).is_err(),
            "3 of a 2-byte range"
        );
        // A distance past the end, or before the start, is refused.
        let mut past = Patch::new(1, 10);
        past.push(8, b"abc");
        past.seal(10, 0, 0);
        assert!(apply(&mut [0u8; 10], &past.bytes).is_err());
        let mut before = past.bytes[..HEADER_LEN].to_vec();
        before.extend_from_slice(&[0x03, 0x01, b'a']);
        assert!(apply(&mut [0u8; 10], &before).is_err(), "offset -2");
    }

    #[test]
    fn any_ranges_rebuild_what_was_written() {
        // Pseudo-random ranges (fixed seed) whose ends often repeat, as timestamps do.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |m: u64| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 33) % m
        };
        for round in 0..20 {
            let len = 5000 + round * 100;
            let base: Vec<u8> = (0..len).map(|_| next(256) as u8).collect();
            let mut expected = base.clone();
            let mut patch = Patch::new(1, len);
            for _ in 0..500 {
                let n = 1 + next(24) as usize;
                let offset = next((len - n) as u64) as usize;
                let mut bytes: Vec<u8> = (0..n).map(|_| next(4) as u8).collect();
                if next(2) == 0 {
                    let end = [0x30, 1, 2, 3, 4, 5, 6];
                    let keep = n.min(end.len());
                    bytes[n - keep..].copy_from_slice(&end[end.len() - keep..]);
                }
                patch.push(offset as u32, &bytes);
                expected[offset..offset + n].copy_from_slice(&bytes);
            }
            patch.seal(len as u64, 0, 0);
            let mut payload = base;
            apply(&mut payload, &patch.bytes).unwrap();
            assert_eq!(payload, expected, "round {round}");
        }
    }

    #[test]
    fn a_plain_patch_of_an_earlier_server_still_applies() {
        // As written before compact ranges: no top bit; offset (u32), length (u32), bytes.
        let mut record = Vec::new();
        record.extend_from_slice(&5u64.to_le_bytes());
        record.extend_from_slice(&7i64.to_le_bytes());
        record.extend_from_slice(&i64::MIN.to_le_bytes());
        for (offset, bytes) in [(1u32, &b"xy"[..]), (2, b"z")] {
            record.extend_from_slice(&offset.to_le_bytes());
            record.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            record.extend_from_slice(bytes);
        }
        assert_eq!(header(&record), Ok((5, 7, i64::MIN)));
        let mut payload = b"abcde".to_vec();
        apply(&mut payload, &record).unwrap();
        assert_eq!(payload, b"axzde");
        assert!(apply(&mut [0u8; 5], &record[..record.len() - 1]).is_err());
    }
}
