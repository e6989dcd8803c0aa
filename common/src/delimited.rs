//! Protobuf-delimited `MetricFamily` streams: each message prefixed by its length as a varint.
//!
//! The reader enforces hard limits before it allocates, so a hostile body can neither panic it nor
//! make it allocate more than the limits allow.

use crate::model::MetricFamily;
use std::fmt;

/// Caps on what one decoded body may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest single message, in bytes.
    pub max_message_bytes: usize,
    /// Largest whole body, in bytes.
    pub max_total_bytes: usize,
    /// Most families in one body.
    pub max_families: usize,
    /// Most series (metrics) over all families in one body.
    pub max_series: usize,
}

impl Default for Limits {
    /// 4 MiB per message, 16 MiB in all, 10,000 families, 100,000 series.
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 << 20,
            max_total_bytes: 16 << 20,
            max_families: 10_000,
            max_series: 100_000,
        }
    }
}

/// Why a protobuf-delimited body could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// The body ends inside a length prefix or a message.
    Truncated,
    /// A length prefix is longer than 10 bytes or does not fit in 64 bits.
    VarintOverflow,
    /// A message is larger than `Limits::max_message_bytes`.
    MessageTooLarge {
        /// The declared size.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// The body is larger than `Limits::max_total_bytes`.
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// More families than `Limits::max_families`.
    TooManyFamilies {
        /// The limit.
        limit: usize,
    },
    /// More series than `Limits::max_series`.
    TooManySeries {
        /// The limit.
        limit: usize,
    },
    /// A message is not a valid `MetricFamily`.
    Invalid(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl std::error::Error for DecodeError {}

/// Decodes every family of a protobuf-delimited body, enforcing `limits`.
pub fn decode(body: &[u8], limits: &Limits) -> Result<Vec<MetricFamily>, DecodeError> {
    todo!()
}

/// Appends `family` to `out` as one length-prefixed message.
pub fn encode_family(family: &MetricFamily, out: &mut Vec<u8>) {
    todo!()
}

/// Encodes all `families` as one protobuf-delimited body.
pub fn encode(families: &[MetricFamily]) -> Vec<u8> {
    todo!()
}
