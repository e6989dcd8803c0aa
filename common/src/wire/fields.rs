//! THE protobuf field reader: keys, varints, length-delimited bytes and unknown groups, with
//! prost's exact rules (a key fits 32 bits with a tag above 0, a varint takes at most 10 bytes,
//! groups nest within the recursion budget). Every reader of the wire format in telemeter walks
//! messages with [`Fields`], so the views, the checks, the counts and the length prefixes of
//! [`crate::delimited`] accept and refuse exactly the same bytes.

use crate::delimited::DecodeError;

/// Why a message is invalid. Static, so that reading never allocates until an error is reported.
#[derive(Clone, Copy, Debug)]
pub(super) struct Bad(pub(super) &'static str);

impl From<Bad> for DecodeError {
    fn from(bad: Bad) -> Self {
        DecodeError::Invalid(bad.0.to_string())
    }
}

/// One field's value as the wire carries it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32,
    /// A group, already skipped: valid only as an unknown field.
    Group,
}

impl<'a> Wire<'a> {
    #[inline]
    pub(super) fn bytes(self) -> Result<&'a [u8], Bad> {
        match self {
            Wire::Bytes(b) => Ok(b),
            _ => Err(Bad("wrong wire type for a length-delimited field")),
        }
    }

    #[inline]
    pub(super) fn str(self) -> Result<&'a str, Bad> {
        utf8(self.bytes()?)
    }

    #[inline]
    pub(super) fn varint(self) -> Result<u64, Bad> {
        match self {
            Wire::Varint(v) => Ok(v),
            _ => Err(Bad("wrong wire type for a varint field")),
        }
    }

    #[inline]
    pub(super) fn double(self) -> Result<f64, Bad> {
        match self {
            Wire::Fixed64(v) => Ok(f64::from_bits(v)),
            _ => Err(Bad("wrong wire type for a double field")),
        }
    }
}

/// `bytes` as a string, if they are UTF-8.
#[inline]
pub(super) fn utf8(bytes: &[u8]) -> Result<&str, Bad> {
    // Nearly every name and value is short ASCII, which the inlined scan settles without the
    // call into the general UTF-8 validator (a few percent of an upload's CPU, measured).
    if bytes.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).map_err(|_| Bad("string is not UTF-8"))
}

/// The fields of one message, in wire order.
#[derive(Clone, Copy, Debug)]
pub(super) struct Fields<'a> {
    rest: &'a [u8],
    /// Prost's remaining recursion budget for this message's fields.
    depth: u32,
}

impl<'a> Fields<'a> {
    pub(super) fn new(message: &'a [u8], depth: u32) -> Fields<'a> {
        Fields {
            rest: message,
            depth,
        }
    }

    /// The next field's number and value; unknown groups are skipped and reported as [`Wire::Group`].
    // Always inlined: it is the innermost loop of every reader, and inlined its result stays in
    // registers.
    #[inline(always)]
    pub(super) fn next(&mut self) -> Result<Option<(u32, Wire<'a>)>, Bad> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (tag, wire_type) = read_key(&mut self.rest)?;
        let wire = match wire_type {
            0 => Wire::Varint(read_varint(&mut self.rest)?),
            1 => Wire::Fixed64(u64::from_le_bytes(take::<8>(&mut self.rest)?)),
            2 => {
                let len = read_varint(&mut self.rest)?;
                let len = usize::try_from(len).map_err(|_| Bad(TRUNCATED))?;
                let (bytes, rest) = self.rest.split_at_checked(len).ok_or(Bad(TRUNCATED))?;
                self.rest = rest;
                Wire::Bytes(bytes)
            }
            5 => {
                take::<4>(&mut self.rest)?;
                Wire::Fixed32
            }
            3 => {
                skip_group(&mut self.rest, tag, self.depth)?;
                Wire::Group
            }
            _ => return Err(Bad("unexpected end group tag")),
        };
        Ok(Some((tag, wire)))
    }

    /// The next field, when its key is the one byte `key` (a length-delimited field numbered
    /// below 16) and its length one byte (under 128): the bytes [`Fields::next`] would return for
    /// it, read without the general key and varint decoding. Nearly every label, and the label's
    /// name and value, is such a field. `None` (the fields left as they were) for anything else,
    /// a truncated field included, which [`Fields::next`] then reads or refuses.
    #[inline(always)]
    pub(super) fn next_short(&mut self, key: u8) -> Option<&'a [u8]> {
        match *self.rest {
            [k, len, ref tail @ ..] if k == key && len < 0x80 => {
                let (bytes, rest) = tail.split_at_checked(usize::from(len))?;
                self.rest = rest;
                Some(bytes)
            }
            _ => None,
        }
    }

    /// As [`Fields::next_short`], for a length of one or two bytes (under 16 KiB): a series'
    /// message, passed over by a family's header and read by its series iterator.
    #[inline(always)]
    pub(super) fn next_bytes(&mut self, key: u8) -> Option<&'a [u8]> {
        let (len, tail) = match *self.rest {
            [k, len, ref tail @ ..] if k == key && len < 0x80 => (usize::from(len), tail),
            [k, low, high, ref tail @ ..] if k == key && low >= 0x80 && high < 0x80 => {
                (usize::from(low & 0x7f) | usize::from(high) << 7, tail)
            }
            _ => return None,
        };
        let (bytes, rest) = tail.split_at_checked(len)?;
        self.rest = rest;
        Some(bytes)
    }

    /// The next field, when it is a gauge's, counter's or untyped value's message written as every
    /// encoder writes it (a one-byte key, length 9, and inside the double's key and eight bytes):
    /// its key and the double's bytes, read without the general reader. `None` (the fields left
    /// as they were) for anything else, which [`Fields::next`] then reads or refuses.
    #[inline(always)]
    pub(super) fn next_simple_value(&mut self) -> Option<(u8, [u8; 8])> {
        use super::parse::{COUNTER_KEY, GAUGE_KEY, UNTYPED_KEY, VALUE_DOUBLE_KEY};
        match *self.rest {
            [key, 9, VALUE_DOUBLE_KEY, ref tail @ ..]
                if key == GAUGE_KEY || key == COUNTER_KEY || key == UNTYPED_KEY =>
            {
                let (bits, rest) = tail.split_first_chunk::<8>()?;
                self.rest = rest;
                Some((key, *bits))
            }
            _ => None,
        }
    }

    /// The next field, when its key is the one byte `key` (a varint field numbered below 16):
    /// its value, read as [`Fields::next`] reads it. `None` (the fields left as they were) for
    /// anything else, a bad varint included, which [`Fields::next`] then reads or refuses.
    #[inline(always)]
    pub(super) fn next_varint(&mut self, key: u8) -> Option<u64> {
        match *self.rest {
            [k, ref tail @ ..] if k == key => {
                let mut rest = tail;
                // Inlined whole: this reads every sample's timestamp (six bytes), where the call
                // to the long varint's reader cost more than its reading (`perf`).
                let value = match *tail {
                    [byte, ref after @ ..] if byte < 0x80 => {
                        rest = after;
                        u64::from(byte)
                    }
                    _ => read_long_varint_inline(&mut rest).ok()?,
                };
                self.rest = rest;
                Some(value)
            }
            _ => None,
        }
    }

    /// The bytes not read yet.
    #[inline(always)]
    pub(super) fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// True when every field has been read.
    #[inline(always)]
    pub(super) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// As [`Fields::next`], with the field's whole encoding (key included).
    pub(super) fn next_with_span(&mut self) -> Result<Option<SpannedField<'a>>, Bad> {
        let before = self.rest;
        let Some((tag, wire)) = self.next()? else {
            return Ok(None);
        };
        let used = before.len() - self.rest.len();
        Ok(Some((tag, wire, before.get(..used).unwrap_or_default())))
    }
}

/// A field's number, value and whole encoding.
pub(super) type SpannedField<'a> = (u32, Wire<'a>, &'a [u8]);

pub(super) const TRUNCATED: &str = "field runs past the end of its message";

const VARINT_OVERFLOW: &str = "varint overflows 64 bits";

/// Reads a field key: its field number and wire type (0, 1, 2, 3, 4 or 5), as prost's
/// `decode_key` checks it.
#[inline(always)]
pub(super) fn read_key(buf: &mut &[u8]) -> Result<(u32, u8), Bad> {
    let key = read_varint(buf)?;
    let key = u32::try_from(key).map_err(|_| Bad("field key does not fit 32 bits"))?;
    let wire_type = (key & 7) as u8;
    if wire_type > 5 {
        return Err(Bad("invalid wire type"));
    }
    let tag = key >> 3;
    if tag == 0 {
        return Err(Bad("field number 0"));
    }
    Ok((tag, wire_type))
}

/// Skips a group up to its end tag, as prost skips an unknown group (within its recursion limit).
pub(super) fn skip_group(buf: &mut &[u8], tag: u32, depth: u32) -> Result<(), Bad> {
    if depth == 0 {
        return Err(Bad("recursion limit reached"));
    }
    loop {
        let (inner_tag, wire_type) = read_key(buf)?;
        if wire_type == 4 {
            return if inner_tag == tag {
                Ok(())
            } else {
                Err(Bad("unexpected end group tag"))
            };
        }
        skip_field(buf, inner_tag, wire_type, depth - 1)?;
    }
}

pub(super) fn skip_field(buf: &mut &[u8], tag: u32, wire_type: u8, depth: u32) -> Result<(), Bad> {
    if depth == 0 {
        return Err(Bad("recursion limit reached"));
    }
    match wire_type {
        0 => {
            read_varint(buf)?;
        }
        1 => {
            take::<8>(buf)?;
        }
        2 => {
            let len = read_varint(buf)?;
            let len = usize::try_from(len).map_err(|_| Bad(TRUNCATED))?;
            *buf = buf.get(len..).ok_or(Bad(TRUNCATED))?;
        }
        5 => {
            take::<4>(buf)?;
        }
        3 => skip_group(buf, tag, depth)?,
        _ => return Err(Bad("unexpected end group tag")),
    }
    Ok(())
}

#[inline]
pub(super) fn take<const N: usize>(buf: &mut &[u8]) -> Result<[u8; N], Bad> {
    let (head, rest) = buf.split_first_chunk::<N>().ok_or(Bad(TRUNCATED))?;
    *buf = rest;
    Ok(*head)
}

/// Reads a varint of at most 10 bytes whose tenth byte holds only bit 63 (prost's rule).
#[inline(always)]
pub(super) fn read_varint(buf: &mut &[u8]) -> Result<u64, Bad> {
    match **buf {
        [byte, ref rest @ ..] if byte < 0x80 => {
            *buf = rest;
            Ok(u64::from(byte))
        }
        // Two bytes: the length of every series and family message of 128 bytes to 16 KiB.
        [low, high, ref rest @ ..] if high < 0x80 => {
            *buf = rest;
            Ok(u64::from(low & 0x7f) | u64::from(high) << 7)
        }
        _ => read_long_varint(buf),
    }
}

pub(super) fn read_long_varint(buf: &mut &[u8]) -> Result<u64, Bad> {
    read_long_varint_inline(buf)
}

/// [`read_long_varint`], for the one caller that inlines it (see [`Fields::next_varint`]).
#[inline(always)]
fn read_long_varint_inline(buf: &mut &[u8]) -> Result<u64, Bad> {
    // Up to eight bytes at once: every sample's timestamp (milliseconds since 1970 take six)
    // comes here, and a byte-at-a-time loop was a few percent of an upload's check (measured).
    // A timestamp is the last field of its series, so fewer than eight bytes may remain: four to
    // seven are gathered with two loads that overlap in the middle (the same bytes there, which
    // OR keeps), and only an end among them counts.
    let (word, present) = match buf.first_chunk::<8>() {
        Some(head) => (u64::from_le_bytes(*head), u64::MAX),
        None => match (buf.first_chunk::<4>(), buf.last_chunk::<4>()) {
            (Some(low), Some(high)) => {
                // Four to seven bytes here, so both shifts are below 64.
                let shift = 8 * (buf.len() as u32 - 4);
                (
                    u64::from(u32::from_le_bytes(*low))
                        | u64::from(u32::from_le_bytes(*high)) << shift,
                    (1u64 << (8 * buf.len())) - 1,
                )
            }
            // Fewer than four: the loop below.
            _ => (0, 0),
        },
    };
    // The high bit of each byte is clear on the varint's last byte.
    let ends = !word & 0x8080_8080_8080_8080 & present;
    if ends != 0 {
        let len = (ends.trailing_zeros() / 8 + 1) as usize;
        let x = (word & (u64::MAX >> (64 - 8 * len))) & 0x7f7f_7f7f_7f7f_7f7f;
        // Close the gaps the continuation bits leave: byte pairs, then 16-bit and 32-bit halves.
        let x = (x & 0x007f_007f_007f_007f) | ((x & 0x7f00_7f00_7f00_7f00) >> 1);
        let x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x3fff_0000_3fff_0000) >> 2);
        let x = (x & 0x0000_0000_0fff_ffff) | ((x & 0x0fff_ffff_0000_0000) >> 4);
        *buf = buf.get(len..).unwrap_or_default();
        return Ok(x);
    }
    let bytes: &[u8] = buf;
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        if i == 9 && byte > 1 {
            return Err(Bad(VARINT_OVERFLOW));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            *buf = bytes.get(i + 1..).unwrap_or_default();
            return Ok(value);
        }
    }
    Err(Bad("varint runs past the end of its message"))
}

/// Reads a body's length prefix (the varint before each message of a delimited body): its value
/// and its length. The same reader as every field's, with its errors as [`DecodeError`]s.
pub(crate) fn length_prefix(buf: &[u8]) -> Result<(u64, usize), DecodeError> {
    let mut rest = buf;
    match read_varint(&mut rest) {
        Ok(value) => Ok((value, buf.len() - rest.len())),
        Err(Bad(VARINT_OVERFLOW)) => Err(DecodeError::VarintOverflow),
        Err(_) => Err(DecodeError::Truncated),
    }
}
