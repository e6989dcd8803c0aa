//! Protobuf-delimited `MetricFamily` streams: each message prefixed by its length as a varint.
//!
//! The reader enforces hard limits before it allocates, so a hostile body can neither panic it nor
//! make it allocate more than the limits allow.

use crate::model::MetricFamily;
use prost::Message;
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
        match self {
            DecodeError::Truncated => f.write_str("body ends inside a message"),
            DecodeError::VarintOverflow => f.write_str("message length prefix overflows 64 bits"),
            DecodeError::MessageTooLarge { size, limit } => {
                write!(f, "message of {size} bytes exceeds the limit of {limit}")
            }
            DecodeError::TooLarge { limit } => write!(f, "body exceeds the limit of {limit} bytes"),
            DecodeError::TooManyFamilies { limit } => {
                write!(f, "more than {limit} metric families")
            }
            DecodeError::TooManySeries { limit } => write!(f, "more than {limit} series"),
            DecodeError::Invalid(why) => write!(f, "invalid MetricFamily message: {why}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes every family of a protobuf-delimited body, enforcing `limits`.
pub fn decode(body: &[u8], limits: &Limits) -> Result<Vec<MetricFamily>, DecodeError> {
    if body.len() > limits.max_total_bytes {
        return Err(DecodeError::TooLarge {
            limit: limits.max_total_bytes,
        });
    }
    let mut families = Vec::new();
    let mut series = 0usize;
    let mut rest = body;
    while !rest.is_empty() {
        let (size, prefix) = read_varint(rest)?;
        // Every check happens on the declared size before prost sees (and allocates for) the message.
        if size > limits.max_message_bytes as u64 {
            return Err(DecodeError::MessageTooLarge {
                size,
                limit: limits.max_message_bytes,
            });
        }
        let after_prefix = rest.get(prefix..).ok_or(DecodeError::Truncated)?;
        let size = usize::try_from(size).map_err(|_| DecodeError::Truncated)?;
        let message = after_prefix.get(..size).ok_or(DecodeError::Truncated)?;
        if families.len() >= limits.max_families {
            return Err(DecodeError::TooManyFamilies {
                limit: limits.max_families,
            });
        }
        let family =
            MetricFamily::decode(message).map_err(|e| DecodeError::Invalid(e.to_string()))?;
        series = series.saturating_add(family.metric.len());
        if series > limits.max_series {
            return Err(DecodeError::TooManySeries {
                limit: limits.max_series,
            });
        }
        families.push(family);
        rest = after_prefix.get(size..).unwrap_or_default();
    }
    Ok(families)
}

/// Reads a base-128 varint from the front of `buf`: its value and how many bytes it took.
fn read_varint(buf: &[u8]) -> Result<(u64, usize), DecodeError> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().enumerate() {
        if i == 9 && byte > 1 {
            // The tenth byte may only contribute bit 63; anything more overflows (or continues).
            return Err(DecodeError::VarintOverflow);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(DecodeError::Truncated)
}

/// Appends `family` to `out` as one length-prefixed message.
pub fn encode_family(family: &MetricFamily, out: &mut Vec<u8>) {
    // `encode_length_delimited` would size the message a second time; sizing once and writing the
    // prefix ourselves keeps this to one traversal for the length and one for the bytes.
    let len = family.encoded_len();
    out.reserve(len + prost::length_delimiter_len(len));
    // Writing into a Vec cannot run out of room, so neither call can fail.
    let _ = prost::encode_length_delimiter(len, out);
    family.encode_raw(out);
}

/// Encodes all `families` as one protobuf-delimited body.
pub fn encode(families: &[MetricFamily]) -> Vec<u8> {
    let mut out = Vec::new();
    for family in families {
        encode_family(family, &mut out);
    }
    out
}
