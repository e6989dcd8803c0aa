//! Snappy, in the two forms telemeter speaks: the framed (stream) format of upload bodies
//! (`Content-Encoding: snappy`) and the block format of Prometheus remote write. Decoding caps the
//! decompressed size, so a small body cannot expand into unbounded memory.

use std::fmt;
use std::io::Write;
use std::ops::Range;

/// Why a snappy body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnappyError {
    /// The body is not valid snappy of the expected form.
    Corrupt(String),
    /// The decompressed data would exceed the cap.
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
}

impl fmt::Display for SnappyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnappyError::Corrupt(why) => write!(f, "corrupt snappy data: {why}"),
            SnappyError::TooLarge { limit } => {
                write!(f, "snappy data decompresses to more than {limit} bytes")
            }
        }
    }
}

impl std::error::Error for SnappyError {}

/// Compresses `data` in the snappy framed format.
pub fn encode_framed(data: &[u8]) -> Vec<u8> {
    let mut encoder = snap::write::FrameEncoder::new(Vec::with_capacity(data.len() / 2 + 64));
    // The sink is a Vec, whose writes cannot fail, and the encoder has no failure of its own for
    // writes (it chunks any input into 64 KiB blocks).
    {
        encoder
            .write_all(data)
            .expect("writing snappy frames into a Vec cannot fail");
        encoder
            .into_inner()
            .expect("flushing snappy frames into a Vec cannot fail")
    }
}

/// The length a snappy framed body decompresses to, read from its chunk headers and the blocks'
/// length preambles without decompressing anything; `TooLarge` past `max_decompressed`. A body
/// whose chunks lie about their lengths is caught by [`decode_framed`], which never writes past
/// this length.
pub fn framed_len(body: &[u8], max_decompressed: usize) -> Result<usize, SnappyError> {
    let corrupt = |why: &str| SnappyError::Corrupt(why.to_string());
    let mut total = 0usize;
    let mut rest = body;
    while !rest.is_empty() {
        let (kind, len) = match rest {
            [kind, a, b, c, ..] => (
                *kind,
                usize::from(*a) | usize::from(*b) << 8 | usize::from(*c) << 16,
            ),
            _ => return Err(corrupt("truncated chunk header")),
        };
        let chunk = rest
            .get(4..4 + len)
            .ok_or_else(|| corrupt("truncated chunk"))?;
        let data = match kind {
            // Compressed data and uncompressed data: a 4-byte checksum, then the data.
            0x00 => {
                snap::raw::decompress_len(chunk.get(4..).ok_or_else(|| corrupt("short chunk"))?)
                    .map_err(|e| SnappyError::Corrupt(e.to_string()))?
            }
            0x01 => len.checked_sub(4).ok_or_else(|| corrupt("short chunk"))?,
            // The stream identifier, padding and skippable chunks hold no data.
            0x80..=0xff => 0,
            _ => return Err(corrupt("reserved unskippable chunk")),
        };
        total = total.saturating_add(data);
        if total > max_decompressed {
            return Err(SnappyError::TooLarge {
                limit: max_decompressed,
            });
        }
        rest = rest.get(4 + len..).unwrap_or_default();
    }
    Ok(total)
}

/// The most bytes one chunk of a framed stream may decompress to (the framing format's limit).
const MAX_CHUNK_DATA: usize = 1 << 16;

/// The stream identifier chunk's body.
const STREAM_IDENTIFIER: &[u8] = b"sNaPpY";

/// Decompresses a snappy framed body, failing as soon as the output would pass `max_decompressed`.
/// The output is allocated once, at the length the chunk headers declare (see [`framed_len`]),
/// and every chunk is decompressed straight into its place in it: `snap`'s stream reader zeroes
/// two 64 KiB buffers per body and copies every byte twice more on its way out, which was a third
/// of the time an upload spent here (49 µs against 33 µs for the 51 KB benchmark upload).
pub fn decode_framed(body: &[u8], max_decompressed: usize) -> Result<Vec<u8>, SnappyError> {
    let mut out = Vec::new();
    decode_framed_into(body, max_decompressed, &mut out)?;
    Ok(out)
}

/// [`decode_framed`] into `out`, which ends holding exactly the decompressed bytes (whatever it
/// held before; on an error, anything). A buffer used again is only zeroed where it grows, and
/// not allocated again: remote-write egress decompresses every journaled upload, and a fresh
/// zeroed buffer for each (allocated on one thread, freed on another) cost it 3 % of its CPU.
pub fn decode_framed_into(
    body: &[u8],
    max_decompressed: usize,
    out: &mut Vec<u8>,
) -> Result<(), SnappyError> {
    decode_framed_into_checking(body, max_decompressed, out, ChunkChecksums::Check)
}

/// [`decode_framed_into`] without checking the chunks' CRC-32Cs, for bytes that an outer
/// checksum over all of them has just verified (the journal's packed records, whose own CRC-32C
/// covers their frames): checking again cost remote-write egress 5 % of its CPU. Everything else
/// is checked as [`decode_framed_into`] checks it, so any bytes still give exactly the declared
/// length or an error, never more memory than `max_decompressed` (a damaged chunk that decodes
/// to other bytes of the right length is not noticed: that is what the outer checksum is for).
/// Never for bytes no other checksum covers, such as an upload's body.
pub fn decode_framed_into_unchecked(
    body: &[u8],
    max_decompressed: usize,
    out: &mut Vec<u8>,
) -> Result<(), SnappyError> {
    decode_framed_into_checking(body, max_decompressed, out, ChunkChecksums::Skip)
}

/// Whether a framed decode checks each chunk's CRC-32C.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkChecksums {
    /// Every chunk's CRC-32C is checked: bytes no other checksum covers.
    Check,
    /// None is: bytes an outer checksum has just verified.
    Skip,
}

/// [`decode_framed_into`], checking the chunks' CRC-32Cs as `checksums` says.
fn decode_framed_into_checking(
    body: &[u8],
    max_decompressed: usize,
    out: &mut Vec<u8>,
    checksums: ChunkChecksums,
) -> Result<(), SnappyError> {
    let corrupt = |why: String| SnappyError::Corrupt(why);
    let declared = framed_len(body, max_decompressed)?;
    // `declared` passed the cap above.
    zeroed_to(out, declared);
    let mut at = 0usize;
    let mut decoder = snap::raw::Decoder::new();
    let mut rest = body;
    let mut first = true;
    while !rest.is_empty() {
        // `framed_len` has checked every header and length, but the loop checks again rather
        // than trust another function's walk with an index.
        let (kind, len) = match rest {
            [kind, a, b, c, ..] => (
                *kind,
                usize::from(*a) | usize::from(*b) << 8 | usize::from(*c) << 16,
            ),
            _ => return Err(corrupt("truncated chunk header".into())),
        };
        let chunk = rest
            .get(4..4 + len)
            .ok_or_else(|| corrupt("truncated chunk".into()))?;
        rest = rest.get(4 + len..).unwrap_or_default();
        if first && kind != 0xff {
            return Err(corrupt(format!(
                "the stream does not start with its identifier (chunk type {kind:#04x})"
            )));
        }
        first = false;
        match kind {
            0xff => {
                if chunk != STREAM_IDENTIFIER {
                    return Err(corrupt("bad stream identifier".into()));
                }
            }
            0x00 | 0x01 => {
                let (crc, data) = chunk
                    .split_first_chunk::<4>()
                    .ok_or_else(|| corrupt("short chunk".into()))?;
                let n = if kind == 0x00 {
                    snap::raw::decompress_len(data)
                        .map_err(|e| SnappyError::Corrupt(e.to_string()))?
                } else {
                    data.len()
                };
                if n > MAX_CHUNK_DATA {
                    return Err(corrupt(format!(
                        "a chunk decompresses to {n} bytes, more than {MAX_CHUNK_DATA}"
                    )));
                }
                let place = at
                    .checked_add(n)
                    .and_then(|end| out.get_mut(at..end))
                    .ok_or_else(corrupt_len)?;
                if kind == 0x00 {
                    let written = decoder
                        .decompress(data, place)
                        .map_err(|e| SnappyError::Corrupt(e.to_string()))?;
                    if written != n {
                        return Err(corrupt("a chunk decompressed to another length".into()));
                    }
                } else {
                    place.copy_from_slice(data);
                }
                if checksums == ChunkChecksums::Check
                    && masked_crc32c(place) != u32::from_le_bytes(*crc)
                {
                    return Err(corrupt("checksum mismatch".into()));
                }
                at += n;
            }
            // Padding and skippable chunks.
            0x80..=0xfe => {}
            _ => return Err(corrupt(format!("reserved unskippable chunk {kind:#04x}"))),
        }
    }
    if at != declared {
        return Err(corrupt_len());
    }
    Ok(())
}

/// The checksum a framed chunk carries: CRC-32C of its data, masked as the framing format says
/// (so that a CRC of data that itself holds CRCs is not weak).
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crate::crc32c::extend(0, data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn corrupt_len() -> SnappyError {
    SnappyError::Corrupt("chunks decompress to more than their headers declare".into())
}

/// Compresses `data` as one snappy block (remote write).
pub fn encode_block(data: &[u8]) -> Vec<u8> {
    // snap refuses only inputs over 2^32 - 1 bytes; every body we build is capped far below that.
    snap::raw::Encoder::new()
        .compress_vec(data)
        .expect("snappy block input is far below 4 GiB")
}

/// Copies shorter than this are written as literal bytes: a copy takes 2 or 3 bytes and splits the
/// literal around it (one more tag byte), so a shorter one saves next to nothing and costs a call.
const MIN_COPY: usize = 8;

/// One snappy block of `data` written by a caller that knows where `data` repeats itself, instead
/// of searching for repeats with a hash table as [`encode_block`] does (which cost a fifth of
/// remote-write egress's CPU). The caller names ranges of `data` that are like an earlier range
/// ([`BlockWriter::repeat`]); the bytes such a range shares with an earlier one at its start and
/// at its end are written as copies of them, every other byte as a literal.
///
/// The output is a valid snappy block whatever the ranges named: a range that is not wholly
/// after what was written already, or not wholly after the range it is said to be like, is
/// written as literal bytes.
pub struct BlockWriter<'a> {
    data: &'a [u8],
    out: &'a mut Vec<u8>,
    /// `data[..written]` is in `out` (as literals or copies); the rest is not yet.
    written: usize,
}

impl<'a> BlockWriter<'a> {
    /// Starts the block of `data` at the end of `out` with the length preamble; `TooLarge` for
    /// data over 4 GiB - 1, which the block format cannot describe.
    pub fn new(data: &'a [u8], out: &'a mut Vec<u8>) -> Result<BlockWriter<'a>, SnappyError> {
        let limit = u32::MAX as usize;
        if data.len() > limit {
            return Err(SnappyError::TooLarge { limit });
        }
        put_varint(out, data.len() as u64);
        Ok(BlockWriter {
            data,
            out,
            written: 0,
        })
    }

    /// Writes `data[range]` as copies of what it shares at its start and at its end with the one
    /// of the earlier ranges `likes` it shares most with (tried in order: one that leaves less
    /// than a copy's worth unshared ends the search), the bytes before `range` not yet written
    /// first, as a literal; its middle is left for the next call or [`BlockWriter::finish`] to
    /// write as a literal.
    pub fn repeat(&mut self, range: Range<usize>, likes: &[Range<usize>]) {
        let Some(now) = self.data.get(range.clone()) else {
            return;
        };
        if range.start < self.written {
            return;
        }
        let mut best = (0, 0, 0..0);
        for like in likes {
            let Some(then) = self.data.get(like.clone()) else {
                continue;
            };
            if like.end > range.start || like.is_empty() {
                continue;
            }
            let prefix = common_prefix(now, then);
            // The shared end stops where the shared start ends, in either range.
            let suffix = common_suffix(&now[prefix..], &then[prefix..]);
            if prefix + suffix > best.0 + best.1 {
                best = (prefix, suffix, like.clone());
            }
            // Shares all but what a copy could not save: the others need not be compared.
            if prefix + suffix + MIN_COPY > now.len() {
                break;
            }
        }
        let (prefix, suffix, like) = best;
        if prefix >= MIN_COPY {
            self.literal_to(range.start);
            self.copy(range.start - like.start, prefix);
            self.written = range.start + prefix;
        }
        if suffix >= MIN_COPY {
            self.literal_to(range.end - suffix);
            self.copy(range.end - like.end, suffix);
            self.written = range.end;
        }
    }

    /// Writes the rest of the data as a literal: the block is complete.
    pub fn finish(mut self) {
        self.literal_to(self.data.len());
    }

    /// Writes `data[written..to]` as one literal element.
    #[inline]
    fn literal_to(&mut self, to: usize) {
        let Some(bytes) = self.data.get(self.written..to).filter(|b| !b.is_empty()) else {
            return;
        };
        let n = bytes.len() - 1;
        if n < 60 {
            self.out.push((n as u8) << 2);
        } else {
            // 60..63: the length - 1 follows in 1..4 little-endian bytes.
            let extra = (usize::BITS - n.leading_zeros()).div_ceil(8) as usize;
            self.out.push(((59 + extra) as u8) << 2);
            self.out.extend_from_slice(&n.to_le_bytes()[..extra]);
        }
        self.out.extend_from_slice(bytes);
        self.written = to;
    }

    /// Writes a copy of `len` bytes (at least 4) from `offset` bytes back, as the reference
    /// encoder splits it: elements of 64 bytes, then one of 60 if 65 to 67 would be left (a copy
    /// element holds 4 to 64 with a 1-byte offset form only from 4 to 11).
    fn copy(&mut self, offset: usize, mut len: usize) {
        while len >= 68 {
            self.copy_element(offset, 64);
            len -= 64;
        }
        if len > 64 {
            self.copy_element(offset, 60);
            len -= 60;
        }
        self.copy_element(offset, len);
    }

    #[inline]
    fn copy_element(&mut self, offset: usize, len: usize) {
        debug_assert!((1..=64).contains(&len) && offset > 0);
        if (4..=11).contains(&len) && offset < 2048 {
            // Tag 01: length - 4 in bits 2-4, the offset's high 3 bits in 5-7, then its low byte.
            self.out
                .push(0b01 | ((len - 4) as u8) << 2 | ((offset >> 8) as u8) << 5);
            self.out.push(offset as u8);
        } else if offset < 1 << 16 {
            // Tag 10: length - 1 in bits 2-7, then a 2-byte offset.
            self.out.push(0b10 | ((len - 1) as u8) << 2);
            self.out.extend_from_slice(&(offset as u16).to_le_bytes());
        } else {
            // Tag 11: a 4-byte offset (`new` refused data of 4 GiB, so it fits).
            self.out.push(0b11 | ((len - 1) as u8) << 2);
            self.out.extend_from_slice(&(offset as u32).to_le_bytes());
        }
    }
}

/// The number of bytes `a` and `b` start with in common, 8 at a time.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().unwrap_or_default());
        let y = u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        if x != y {
            return i + ((x ^ y).trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// The number of bytes `a` and `b` end with in common, 8 at a time.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[n - i - 8..n - i].try_into().unwrap_or_default());
        let y = u64::from_le_bytes(b[n - i - 8..n - i].try_into().unwrap_or_default());
        if x != y {
            return i + ((x ^ y).leading_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[n - i - 1] == b[n - i - 1] {
        i += 1;
    }
    i
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Makes `out` exactly `len` bytes for a decompression to write: zeroed, not just reserved
/// (`raw::Decoder` writes into an initialised slice), but only where it grows, and a first
/// buffer allocated zeroed at once. Cheap next to the decompression.
fn zeroed_to(out: &mut Vec<u8>, len: usize) {
    if out.capacity() == 0 {
        *out = vec![0u8; len];
    } else {
        out.resize(len, 0);
    }
}

/// Decompresses one snappy block, refusing one whose declared length passes `max_decompressed`.
pub fn decode_block(body: &[u8], max_decompressed: usize) -> Result<Vec<u8>, SnappyError> {
    let mut out = Vec::new();
    decode_block_into(body, max_decompressed, &mut out)?;
    Ok(out)
}

/// [`decode_block`] into `out`, which ends holding exactly the decompressed bytes (whatever it
/// held before; on an error, anything). A buffer used again is only zeroed where it grows: a
/// receiver that zeroes half a megabyte for every request writes each byte twice.
pub fn decode_block_into(
    body: &[u8],
    max_decompressed: usize,
    out: &mut Vec<u8>,
) -> Result<(), SnappyError> {
    let declared =
        snap::raw::decompress_len(body).map_err(|e| SnappyError::Corrupt(e.to_string()))?;
    if declared > max_decompressed {
        return Err(SnappyError::TooLarge {
            limit: max_decompressed,
        });
    }
    zeroed_to(out, declared);
    let n = snap::raw::Decoder::new()
        .decompress(body, out)
        .map_err(|e| SnappyError::Corrupt(e.to_string()))?;
    out.truncate(n);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::fuzz::Rng;

    /// Data that compresses somewhat but not trivially: text-like with repeats.
    fn sample(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut x: u32 = 12345;
        while out.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let word =
                ["up", "{job=\"node\"}", " 1\n", "_id", "cluster", "0.5"][(x >> 16) as usize % 6];
            out.extend_from_slice(word.as_bytes());
        }
        out.truncate(len);
        out
    }

    #[test]
    fn framed_round_trip() {
        for len in [0, 1, 100, 65_536, 65_537, 300_000] {
            let data = sample(len);
            let encoded = encode_framed(&data);
            // Framed bodies start with the stream identifier chunk (an empty stream is empty).
            if len > 0 {
                assert_eq!(&encoded[..10], b"\xff\x06\x00\x00sNaPpY");
            }
            assert_eq!(decode_framed(&encoded, len).unwrap(), data, "length {len}");
        }
    }

    #[test]
    fn framed_len_reads_the_length_from_the_headers_and_decode_allocates_it_once() {
        for len in [0, 1, 100, 65_536, 65_537, 300_000] {
            let encoded = encode_framed(&sample(len));
            assert_eq!(framed_len(&encoded, len), Ok(len), "length {len}");
            assert_eq!(decode_framed(&encoded, len).unwrap().capacity(), len);
        }
        let encoded = encode_framed(&sample(1000));
        assert_eq!(
            framed_len(&encoded, 999),
            Err(SnappyError::TooLarge { limit: 999 })
        );
        // Cut anywhere but right after the 10-byte stream identifier (an empty stream).
        for cut in (1..encoded.len()).filter(|&cut| cut != 10) {
            assert!(
                matches!(
                    framed_len(&encoded[..cut], 1 << 20),
                    Err(SnappyError::Corrupt(_))
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn framed_into_a_used_buffer_holds_exactly_the_data_and_keeps_its_allocation() {
        let mut out = Vec::new();
        // Longer, shorter, empty and longer again than what the buffer held.
        for len in [300_000, 1, 65_537, 0, 100, 250_000] {
            let data = sample(len);
            let before = out.capacity();
            decode_framed_into(&encode_framed(&data), len, &mut out).unwrap();
            assert_eq!(out, data, "length {len}");
            if len <= before {
                assert_eq!(out.capacity(), before, "not allocated again for {len}");
            }
        }
        // A bad body is still refused, however much the buffer holds.
        let mut bad = encode_framed(&sample(1000));
        let last = bad.len() - 1;
        bad[last] ^= 0x55;
        assert!(decode_framed_into(&bad, 1000, &mut out).is_err());
        assert_eq!(
            decode_framed_into(&encode_framed(&sample(1000)), 999, &mut out),
            Err(SnappyError::TooLarge { limit: 999 })
        );
    }

    #[test]
    fn framed_exactly_at_cap_passes_one_over_fails() {
        let data = sample(10_000);
        let encoded = encode_framed(&data);
        assert_eq!(decode_framed(&encoded, 10_000).unwrap(), data);
        assert_eq!(
            decode_framed(&encoded, 9_999),
            Err(SnappyError::TooLarge { limit: 9_999 })
        );
        assert_eq!(
            decode_framed(&encoded, 0),
            Err(SnappyError::TooLarge { limit: 0 })
        );
    }

    #[test]
    fn framed_bomb_is_refused() {
        // 64 MiB of zeros compress to about 3 MiB; the cap is 1 MiB.
        let bomb = encode_framed(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 4 << 20, "bomb is {} bytes", bomb.len());
        assert_eq!(
            decode_framed(&bomb, 1 << 20),
            Err(SnappyError::TooLarge { limit: 1 << 20 })
        );
    }

    #[test]
    fn framed_incompressible_data_round_trips_through_uncompressed_chunks() {
        // Pseudo-random bytes do not compress: the encoder writes them as uncompressed chunks.
        let mut x: u64 = 7;
        let data: Vec<u8> = (0..150_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let encoded = encode_framed(&data);
        assert!(
            encoded[10..].starts_with(&[0x01]),
            "not an uncompressed chunk"
        );
        assert_eq!(decode_framed(&encoded, data.len()).unwrap(), data);
    }

    #[test]
    fn framed_skippable_chunks_are_skipped_and_a_bad_checksum_is_corrupt() {
        let data = sample(5_000);
        let encoded = encode_framed(&data);
        // A padding chunk after the stream identifier changes nothing.
        let mut padded = encoded[..10].to_vec();
        padded.extend_from_slice(&[0xfe, 3, 0, 0, 9, 9, 9]);
        padded.extend_from_slice(&encoded[10..]);
        assert_eq!(decode_framed(&padded, data.len()).unwrap(), data);
        // A reserved unskippable chunk is refused.
        let mut reserved = encoded[..10].to_vec();
        reserved.extend_from_slice(&[0x02, 1, 0, 0, 0]);
        assert!(matches!(
            decode_framed(&reserved, 1 << 20),
            Err(SnappyError::Corrupt(_))
        ));
        // The checksum follows the chunk header.
        let mut bad = encoded.clone();
        bad[14] ^= 1;
        assert_eq!(
            decode_framed(&bad, 1 << 20),
            Err(SnappyError::Corrupt("checksum mismatch".into()))
        );
        // Data before the stream identifier is refused.
        assert!(matches!(
            decode_framed(&encoded[10..], 1 << 20),
            Err(SnappyError::Corrupt(_))
        ));
    }

    #[test]
    fn framed_garbage_is_corrupt() {
        for garbage in [&b"hello world"[..], b"\x00\x00\x00\x00", &[0xffu8; 64]] {
            match decode_framed(garbage, 1 << 20) {
                Err(SnappyError::Corrupt(_)) => {}
                other => panic!("{garbage:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn framed_block_body_is_corrupt() {
        // A block-format body is not a framed body: no stream identifier.
        let block = encode_block(b"some data some data");
        assert!(matches!(
            decode_framed(&block, 1 << 20),
            Err(SnappyError::Corrupt(_))
        ));
    }

    #[test]
    fn framed_truncated_is_corrupt() {
        let encoded = encode_framed(&sample(200_000));
        // Cut inside the stream identifier, inside a chunk header and inside chunk bodies.
        for cut in [3, 12, 13, 100, encoded.len() / 2, encoded.len() - 1] {
            match decode_framed(&encoded[..cut], 1 << 20) {
                Err(SnappyError::Corrupt(_)) => {}
                other => panic!("cut at {cut}: {:?}", other.map(|v| v.len())),
            }
        }
    }

    #[test]
    fn framed_flipped_byte_is_corrupt() {
        let mut encoded = encode_framed(&sample(5_000));
        let last = encoded.len() - 1;
        encoded[last] ^= 0x55;
        assert!(matches!(
            decode_framed(&encoded, 1 << 20),
            Err(SnappyError::Corrupt(_))
        ));
    }

    #[test]
    fn framed_unchecked_skips_only_the_chunk_checksums() {
        let data = sample(200_000);
        let encoded = encode_framed(&data);
        let mut out = vec![7u8; 3];
        decode_framed_into_unchecked(&encoded, data.len(), &mut out).unwrap();
        assert_eq!(out, data);
        // A wrong checksum (it follows the first chunk's header) is not looked at...
        let mut bad = encoded.clone();
        bad[14] ^= 1;
        decode_framed_into_unchecked(&bad, data.len(), &mut out).unwrap();
        assert_eq!(out, data);
        // ...while the checking decode still refuses it.
        assert_eq!(
            decode_framed_into(&bad, data.len(), &mut out),
            Err(SnappyError::Corrupt("checksum mismatch".into()))
        );
        // Everything else is still checked: the cap, the stream identifier, truncation.
        assert_eq!(
            decode_framed_into_unchecked(&encoded, data.len() - 1, &mut out),
            Err(SnappyError::TooLarge {
                limit: data.len() - 1
            })
        );
        assert!(decode_framed_into_unchecked(&encoded[10..], 1 << 20, &mut out).is_err());
        assert!(
            decode_framed_into_unchecked(&encoded[..encoded.len() - 1], 1 << 20, &mut out).is_err()
        );
    }

    #[test]
    fn framed_unchecked_on_damaged_bytes_gives_the_declared_length_or_an_error() {
        // Every byte of a body flipped, and every cut of it: never a panic, never more than
        // the cap, and on success exactly the length the chunk headers declare.
        let data = sample(3_000);
        let mut encoded = encode_framed(&data);
        encoded.extend_from_slice(&encode_framed(&sample(100))[10..]);
        let cap = 4_000;
        let mut out = Vec::new();
        for at in 0..encoded.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut damaged = encoded.clone();
                damaged[at] ^= flip;
                match decode_framed_into_unchecked(&damaged, cap, &mut out) {
                    Ok(()) => {
                        assert!(out.len() <= cap, "byte {at}: {} bytes", out.len());
                        assert_eq!(Ok(out.len()), framed_len(&damaged, cap), "byte {at}");
                    }
                    Err(SnappyError::Corrupt(_) | SnappyError::TooLarge { .. }) => {}
                }
            }
        }
        for cut in 0..encoded.len() {
            if decode_framed_into_unchecked(&encoded[..cut], cap, &mut out).is_ok() {
                assert_eq!(Ok(out.len()), framed_len(&encoded[..cut], cap), "cut {cut}");
            }
        }
    }

    #[test]
    fn framed_empty_body_is_empty() {
        assert_eq!(decode_framed(b"", 10), Ok(Vec::new()));
    }

    #[test]
    fn block_round_trip() {
        for len in [0, 1, 1000, 200_000] {
            let data = sample(len);
            let encoded = encode_block(&data);
            assert_eq!(decode_block(&encoded, len).unwrap(), data, "length {len}");
        }
    }

    #[test]
    fn block_into_a_used_buffer_holds_exactly_the_block() {
        // Longer, shorter, empty, longer again: never a byte of the request before.
        let mut out = vec![0xaa; 7];
        for len in [200_000, 1000, 0, 150_000] {
            let data = sample(len);
            decode_block_into(&encode_block(&data), len, &mut out).unwrap();
            assert_eq!(out, data, "length {len}");
        }
        // The cap and corruption are refused as decode_block refuses them.
        let encoded = encode_block(&sample(1000));
        assert_eq!(
            decode_block_into(&encoded, 999, &mut out),
            Err(SnappyError::TooLarge { limit: 999 })
        );
        assert!(matches!(
            decode_block_into(&encoded[..encoded.len() / 2], 1000, &mut out),
            Err(SnappyError::Corrupt(_))
        ));
    }

    #[test]
    fn block_declared_length_over_cap_is_refused_before_decoding() {
        let encoded = encode_block(&vec![0u8; 1 << 20]);
        assert_eq!(
            decode_block(&encoded, (1 << 20) - 1),
            Err(SnappyError::TooLarge {
                limit: (1 << 20) - 1
            })
        );
        // A header claiming 4 GiB with no data behind it: refused by length, no allocation.
        let liar = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(
            decode_block(&liar, 1 << 20),
            Err(SnappyError::TooLarge { limit: 1 << 20 })
        );
    }

    #[test]
    fn block_garbage_and_truncation_are_corrupt() {
        let encoded = encode_block(&sample(10_000));
        for bad in [
            &encoded[..encoded.len() / 2],
            &[0xffu8; 11][..],
            &[0x80][..],
        ] {
            match decode_block(bad, 1 << 20) {
                Err(SnappyError::Corrupt(_)) => {}
                other => panic!("{bad:?}: {:?}", other.map(|v| v.len())),
            }
        }
    }

    /// What `snap`'s decoder (the reference implementation's port) reads back.
    fn snap_decode(block: &[u8]) -> Vec<u8> {
        snap::raw::Decoder::new()
            .decompress_vec(block)
            .expect("snap decodes the block")
    }

    /// Writes `data` with `ranges` (range, like) named in order.
    fn write_like(data: &[u8], ranges: &[(Range<usize>, Range<usize>)]) -> Vec<u8> {
        let mut out = vec![0xee]; // written after what `out` holds
        let mut w = BlockWriter::new(data, &mut out).unwrap();
        for (range, like) in ranges {
            w.repeat(range.clone(), std::slice::from_ref(like));
        }
        w.finish();
        out.remove(0);
        out
    }

    #[test]
    fn block_writer_copies_what_a_range_shares_with_the_one_it_is_like() {
        // Records of a header, a body like the previous record's, and a tail.
        let mut data = Vec::new();
        let mut ranges = Vec::new();
        let mut previous: Option<Range<usize>> = None;
        for i in 0..200 {
            data.extend_from_slice(&[0x0a, i as u8]);
            let start = data.len();
            data.extend_from_slice(b"__name__ node_cpu_seconds_total _id cluster-a cpu ");
            data.extend_from_slice(format!("{} mode ", i % 4).as_bytes());
            data.extend_from_slice(b"instance host.example.com:9100 job node-exporter");
            let body = start..data.len();
            data.extend_from_slice(&(i as f64).to_le_bytes());
            if let Some(like) = previous.replace(body.clone()) {
                ranges.push((body, like));
            }
        }
        let block = write_like(&data, &ranges);
        assert_eq!(snap_decode(&block), data);
        assert_eq!(decode_block(&block, data.len()).unwrap(), data);
        // Each record after the first: 2 + 8 literal bytes, its varying middle, 3 copies.
        assert!(
            block.len() * 5 < data.len(),
            "{} of {}",
            block.len(),
            data.len()
        );
    }

    #[test]
    fn block_writer_output_is_valid_snappy_for_any_ranges() {
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
        let (mut total_data, mut total_block) = (0, 0);
        for round in 0..2000 {
            // Small alphabets repeat a lot; sizes up to past 64 KiB (the 4-byte offsets).
            let len = match round % 10 {
                0 => rng.below(200_000),
                _ => rng.below(3000),
            };
            // Random runs and copies of earlier runs, so that ranges share starts and ends.
            let alphabet = 1 + rng.below(4) as u64 * 60;
            let mut data: Vec<u8> = Vec::with_capacity(len);
            while data.len() < len {
                let run = 1 + rng.below(300);
                if data.len() > run && rng.below(2) == 0 {
                    let from = rng.below(data.len() - run);
                    data.extend_from_within(from..from + run);
                } else {
                    data.extend((0..run).map(|_| (rng.next_u64() % alphabet) as u8));
                }
            }
            data.truncate(len);
            let mut ranges = Vec::new();
            let mut at = 0;
            while at < len && ranges.len() < 64 {
                // Mostly well-formed (after what was written, like an earlier range), sometimes
                // not: those must become literals.
                let start = at + rng.below(100);
                let end = start + rng.below(400);
                let like_start = rng.below(start + 1);
                let like_end = like_start + rng.below(start - like_start + 20);
                let like = if rng.below(4) == 0 {
                    // An exact earlier copy of the range's length, to get long shared runs.
                    start.saturating_sub(end - start + rng.below(70_000))..start
                } else {
                    like_start..like_end
                };
                ranges.push((start..end, like));
                at = if rng.below(8) == 0 { start / 2 } else { end };
            }
            let block = write_like(&data, &ranges);
            assert_eq!(snap_decode(&block), data, "round {round}");
            (total_data, total_block) = (total_data + data.len(), total_block + block.len());
        }
        // Not all literals: the copies were exercised too.
        assert!(total_block < total_data, "{total_block} of {total_data}");
    }

    #[test]
    fn block_writer_copies_every_length_and_offset_form() {
        // A run repeated at offsets needing each form, for lengths around each split point.
        for offset in [8, 2047, 2048, 65_535, 65_536, 70_000] {
            for len in [8, 11, 12, 63, 64, 65, 66, 67, 68, 69, 128, 131, 1000] {
                let mut rng = Rng::new(offset as u64 * 1000 + len as u64);
                let mut data: Vec<u8> = (0..offset).map(|_| rng.next_u64() as u8).collect();
                let (like, at) = (0..len.min(offset), data.len());
                data.extend_from_within(like.clone());
                let range = at..data.len();
                let block = write_like(&data, &[(range, like)]);
                assert_eq!(snap_decode(&block), data, "offset {offset} length {len}");
                assert!(
                    block.len() < data.len() + 10,
                    "offset {offset} length {len}"
                );
            }
        }
    }

    #[test]
    fn block_writer_literals_of_every_length_form() {
        for len in [
            0,
            1,
            60,
            61,
            256,
            257,
            65_536,
            65_537,
            1 << 24,
            (1 << 24) + 1,
        ] {
            let data = vec![7u8; len];
            let block = write_like(&data, &[]);
            assert_eq!(snap_decode(&block), data, "length {len}");
        }
    }

    #[test]
    fn display() {
        assert_eq!(
            SnappyError::TooLarge { limit: 10 }.to_string(),
            "snappy data decompresses to more than 10 bytes"
        );
        assert!(SnappyError::Corrupt("x".into())
            .to_string()
            .starts_with("corrupt snappy data"));
    }
}
