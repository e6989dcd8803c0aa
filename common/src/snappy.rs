//! Snappy, in the two forms telemeter speaks: the framed (stream) format of upload bodies
//! (`Content-Encoding: snappy`) and the block format of Prometheus remote write. Decoding caps the
//! decompressed size, so a small body cannot expand into unbounded memory.

use std::fmt;

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
        todo!()
    }
}

impl std::error::Error for SnappyError {}

/// Compresses `data` in the snappy framed format.
pub fn encode_framed(data: &[u8]) -> Vec<u8> {
    todo!()
}

/// Decompresses a snappy framed body, failing as soon as the output would pass `max_decompressed`.
pub fn decode_framed(body: &[u8], max_decompressed: usize) -> Result<Vec<u8>, SnappyError> {
    todo!()
}

/// Compresses `data` as one snappy block (remote write).
pub fn encode_block(data: &[u8]) -> Vec<u8> {
    todo!()
}

/// Decompresses one snappy block, refusing one whose declared length passes `max_decompressed`.
pub fn decode_block(body: &[u8], max_decompressed: usize) -> Result<Vec<u8>, SnappyError> {
    todo!()
}
