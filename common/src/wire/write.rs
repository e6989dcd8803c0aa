//! Writing protobuf: a family copied with its series' timestamps dropped (what `/federate`
//! without timestamps serves), byte for byte otherwise.

use crate::delimited::DecodeError;

use super::check::check_family_message;
use super::fields::{Bad, Fields, Wire};
use super::{FamilyView, FAMILY_DEPTH, METRIC_DEPTH, METRIC_FIELD, METRIC_KEY, TIMESTAMP_FIELD};

/// Appends `family` to `out` as one length-prefixed message with every series' timestamp
/// (`Metric` field 6) dropped, copying every other byte: what prost would give for decode, clear
/// the timestamps, encode (but unknown fields are kept). The family is checked whole first
/// (`check_family`), so nothing invalid is ever copied; on error `out` is left as it was.
pub fn write_family_without_timestamps(
    out: &mut Vec<u8>,
    family: &FamilyView<'_>,
) -> Result<(), DecodeError> {
    check_family_message(family.message)?;
    // Two passes over the family's fields: sizes first (the length prefixes come first on the
    // wire), then the bytes.
    let mut size = 0usize;
    let mut fields = Fields::new(family.message, FAMILY_DEPTH);
    while let Some((tag, wire, span)) = fields.next_with_span()? {
        size += match (tag, wire) {
            (METRIC_FIELD, Wire::Bytes(metric)) => {
                let inner = size_without_timestamp(metric)?;
                1 + varint_len(inner as u64) + inner
            }
            _ => span.len(),
        };
    }
    out.reserve(size + varint_len(size as u64));
    put_varint(out, size as u64);
    let mut fields = Fields::new(family.message, FAMILY_DEPTH);
    while let Some((tag, wire, span)) = fields.next_with_span()? {
        match (tag, wire) {
            (METRIC_FIELD, Wire::Bytes(metric)) => {
                out.push(METRIC_KEY);
                put_varint(out, size_without_timestamp(metric)? as u64);
                let mut metric_fields = Fields::new(metric, METRIC_DEPTH);
                while let Some((tag, _, span)) = metric_fields.next_with_span()? {
                    if tag != TIMESTAMP_FIELD {
                        out.extend_from_slice(span);
                    }
                }
            }
            _ => out.extend_from_slice(span),
        }
    }
    Ok(())
}

/// The size of a `Metric` message once its timestamp fields are dropped.
pub(super) fn size_without_timestamp(metric: &[u8]) -> Result<usize, Bad> {
    let mut size = 0;
    let mut fields = Fields::new(metric, METRIC_DEPTH);
    while let Some((tag, _, span)) = fields.next_with_span()? {
        if tag != TIMESTAMP_FIELD {
            size += span.len();
        }
    }
    Ok(size)
}

pub(super) fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
