//! Snappy, in the two forms telemeter speaks: the framed (stream) format of upload bodies
//! (`Content-Encoding: snappy`) and the block format of Prometheus remote write. Decoding caps the
//! decompressed size, so a small body cannot expand into unbounded memory.

use std::fmt;
use std::io::{Read, Write};

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

/// Reads at most `limit` bytes from `reader` into `out`, growing it no further than `limit` either.
/// Returns `TooLarge` as soon as one byte more than `limit` is available.
fn read_capped(mut reader: impl Read, limit: usize, out: &mut Vec<u8>) -> Result<(), SnappyError> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SnappyError::Corrupt(e.to_string())),
        };
        let read = chunk.get(..n).unwrap_or_default();
        if out.len().saturating_add(read.len()) > limit {
            return Err(SnappyError::TooLarge { limit });
        }
        if out.capacity() - out.len() < read.len() {
            // Double like Vec would, but never past the cap: a hostile body must not make us
            // reserve more memory than the limit promises.
            let wanted = out
                .capacity()
                .saturating_mul(2)
                .max(out.len() + read.len())
                .min(limit);
            out.reserve_exact(wanted - out.len());
        }
        out.extend_from_slice(read);
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

/// Decompresses a snappy framed body, failing as soon as the output would pass `max_decompressed`.
/// The output is allocated once, at the length the chunk headers declare (see [`framed_len`]).
pub fn decode_framed(body: &[u8], max_decompressed: usize) -> Result<Vec<u8>, SnappyError> {
    let declared = framed_len(body, max_decompressed)?;
    let decoder = snap::read::FrameDecoder::new(body);
    // `take` stops the decoder right after the first byte past the declared length, so a body
    // whose chunks decode to more than they declare costs at most one frame of work beyond it.
    let limited = decoder.take((declared as u64).saturating_add(1));
    let mut out = Vec::with_capacity(declared);
    read_capped(limited, declared, &mut out).map_err(|e| match e {
        SnappyError::TooLarge { .. } => corrupt_len(),
        other => other,
    })?;
    Ok(out)
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

/// Decompresses one snappy block, refusing one whose declared length passes `max_decompressed`.
pub fn decode_block(body: &[u8], max_decompressed: usize) -> Result<Vec<u8>, SnappyError> {
    let declared =
        snap::raw::decompress_len(body).map_err(|e| SnappyError::Corrupt(e.to_string()))?;
    if declared > max_decompressed {
        return Err(SnappyError::TooLarge {
            limit: max_decompressed,
        });
    }
    let mut out = vec![0u8; declared];
    let n = snap::raw::Decoder::new()
        .decompress(body, &mut out)
        .map_err(|e| SnappyError::Corrupt(e.to_string()))?;
    out.truncate(n);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn read_capped_never_reserves_past_the_cap() {
        let data = vec![7u8; 100_000];
        let mut out = Vec::new();
        read_capped(&data[..], 100_000, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(out.capacity() <= 100_000, "capacity {}", out.capacity());
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
