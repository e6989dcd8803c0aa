//! CRC-32C (Castagnoli): the checksum of the server's journal records from their format version 2
//! (the one the Prometheus WAL, ext4 and iSCSI use, so a record can be checked with standard
//! tools) and of snappy's framed chunks.
//!
//! Every accepted byte passes through it on the commit path and again when an upload's frames are
//! checked, so it must not cost what SHA-256 did (see the store's `journal` module): on x86-64 with SSE 4.2 the `crc32` instruction computes it, 8
//! bytes at a time; elsewhere a slicing-by-8 table does. Measured here over 64 MiB (`rustc -O`):
//! 5.8–6.1 GB/s with the instruction, 1.5 GB/s by table, 5.6 GB/s for version 1's hash.
//!
//! One chain of the instruction waits on its previous result (3 cycles each), which was an eighth
//! of an upload's decode (the 51 KB benchmark body, by `perf`). So buffers of 768 bytes and more
//! run three independent chains over three consecutive lanes, which the CPU overlaps, and join
//! them by shifting a lane's CRC over the bytes that follow it: four table lookups (Mark Adler's
//! scheme in `crc32c.c`, with his lane lengths).

/// The Castagnoli polynomial, bit-reflected.
const POLY: u32 = 0x82F6_3B78;

/// `TABLES[k][b]`: the CRC of byte `b` followed by `k` zero bytes, for slicing-by-8.
static TABLES: [[u32; 256]; 8] = tables();

const fn tables() -> [[u32; 256]; 8] {
    let mut tables = [[0u32; 256]; 8];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        tables[0][byte] = crc;
        byte += 1;
    }
    let mut byte = 0;
    while byte < 256 {
        let mut k = 1;
        while k < 8 {
            let previous = tables[k - 1][byte];
            tables[k][byte] = (previous >> 8) ^ tables[0][(previous & 0xFF) as usize];
            k += 1;
        }
        byte += 1;
    }
    tables
}

/// The CRC-32C of what `crc` was the CRC-32C of, followed by `bytes` (start from 0), so the
/// parts of a record can be checked without copying them together.
pub fn extend(crc: u32, bytes: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: `update_sse42` needs only that the CPU has SSE 4.2, which was just detected.
        return !unsafe { update_sse42(!crc, bytes) };
    }
    !update_table(!crc, bytes)
}

/// The lane lengths of the three-lane loop: long lanes first, then short ones for what is left
/// (the 51,370-byte benchmark body: two strides of 24 KiB, two of 768 bytes, then 682 bytes on
/// one chain).
#[cfg(target_arch = "x86_64")]
const LONG_LANE: usize = 8192;
#[cfg(target_arch = "x86_64")]
const SHORT_LANE: usize = 256;

/// `SHIFT[k][b]`: the register after `LANE` zero bytes from the register `b << 8k`, for both lane
/// lengths: shifting a register over a lane is then four lookups.
#[cfg(target_arch = "x86_64")]
static LONG_SHIFT: [[u32; 256]; 4] = shift_tables(LONG_LANE);
#[cfg(target_arch = "x86_64")]
static SHORT_SHIFT: [[u32; 256]; 4] = shift_tables(SHORT_LANE);

/// The CRC register `state` after as many zero bytes as `table` was built for.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn shift_register(table: &[[u32; 256]; 4], state: u32) -> u32 {
    let [b0, b1, b2, b3] = state.to_le_bytes();
    table[0][usize::from(b0)]
        ^ table[1][usize::from(b1)]
        ^ table[2][usize::from(b2)]
        ^ table[3][usize::from(b3)]
}

/// `a * b` modulo the polynomial, both bit-reflected (the top bit is x^0), as Adler's `multmodp`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const fn multiply_mod_poly(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = 0;
    while bit < 32 {
        if a & (1 << (31 - bit)) != 0 {
            product ^= b;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        bit += 1;
    }
    product
}

/// The tables that shift a register over `len` zero bytes: multiplication by x^(8·len).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const fn shift_tables(len: usize) -> [[u32; 256]; 4] {
    // x^(8·len) by squaring: x^8 is bit 31 - 8 reflected.
    let mut power = 1u32 << 31;
    let mut square = 1u32 << 23;
    let mut n = len;
    while n > 0 {
        if n & 1 != 0 {
            power = multiply_mod_poly(square, power);
        }
        square = multiply_mod_poly(square, square);
        n >>= 1;
    }
    let mut tables = [[0u32; 256]; 4];
    let mut k = 0;
    while k < 4 {
        let mut byte = 0;
        while byte < 256 {
            tables[k][byte] = multiply_mod_poly(power, (byte as u32) << (8 * k));
            byte += 1;
        }
        k += 1;
    }
    tables
}

/// The CRC register after `bytes`, by table lookups (the portable way).
fn update_table(mut state: u32, bytes: &[u8]) -> u32 {
    let lookup = |k: usize, index: u32| {
        TABLES
            .get(k)
            .and_then(|table| table.get((index & 0xFF) as usize))
            .copied()
            .unwrap_or(0)
    };
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let low = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) ^ state;
        let high = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
        state = lookup(7, low)
            ^ lookup(6, low >> 8)
            ^ lookup(5, low >> 16)
            ^ lookup(4, low >> 24)
            ^ lookup(3, high)
            ^ lookup(2, high >> 8)
            ^ lookup(1, high >> 16)
            ^ lookup(0, high >> 24);
    }
    for &byte in words.remainder() {
        state = (state >> 8) ^ lookup(0, state ^ u32::from(byte));
    }
    state
}

/// The CRC register after `bytes`, by the SSE 4.2 `crc32` instruction (which computes CRC-32C):
/// three lanes at a time while there are enough bytes (see the module's doc), then one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn update_sse42(state: u32, bytes: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let word = |w: &[u8]| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        u64::from_le_bytes(b)
    };
    let mut state = u64::from(state);
    let mut rest = bytes;
    for (lane, shift) in [(LONG_LANE, &LONG_SHIFT), (SHORT_LANE, &SHORT_SHIFT)] {
        while let Some((stride, after)) = rest.split_at_checked(3 * lane) {
            let (first, others) = stride.split_at(lane);
            let (second, third) = others.split_at(lane);
            // The second and third lanes start from a zero register: their CRCs are what those
            // bytes add, whatever came before them, so they join by XOR once shifted.
            let (mut second_state, mut third_state) = (0u64, 0u64);
            for ((a, b), c) in first
                .chunks_exact(8)
                .zip(second.chunks_exact(8))
                .zip(third.chunks_exact(8))
            {
                state = _mm_crc32_u64(state, word(a));
                second_state = _mm_crc32_u64(second_state, word(b));
                third_state = _mm_crc32_u64(third_state, word(c));
            }
            // The instruction leaves the upper halves zero.
            let joined = shift_register(shift, state as u32) ^ second_state as u32;
            state = u64::from(shift_register(shift, joined) ^ third_state as u32);
            rest = after;
        }
    }
    let mut words = rest.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        state = _mm_crc32_u64(state, u64::from_le_bytes(w));
    }
    // The instruction leaves the upper half zero.
    let mut state = state as u32;
    for &byte in words.remainder() {
        state = _mm_crc32_u8(state, byte);
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // The check value of CRC-32C (RFC 3720 appendix B.4 and every CRC catalogue).
        assert_eq!(extend(0, b"123456789"), 0xE306_9283);
        assert_eq!(extend(0, b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros, and of 0xFF.
        assert_eq!(extend(0, &[0u8; 32]), 0x8A91_36AA);
        assert_eq!(extend(0, &[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn extending_equals_one_pass_and_both_ways_agree() {
        let bytes: Vec<u8> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let whole = extend(0, &bytes);
        for split in [0, 1, 7, 8, 9, 500, 999, 1000] {
            let (a, b) = bytes.split_at(split);
            assert_eq!(extend(extend(0, a), b), whole, "split at {split}");
        }
        for len in 0..40 {
            let part = &bytes[..len];
            assert_eq!(!update_table(!0, part), extend(0, part), "length {len}");
        }
    }

    /// Lengths around every way the three-lane loop splits a buffer (no stride, short strides
    /// only, long and short ones, each with a tail), from a nonzero register too: both ways of
    /// computing agree, and a flipped bit anywhere changes the CRC.
    #[test]
    fn the_three_lane_loop_equals_one_chain_at_every_split() {
        let bytes: Vec<u8> = (0..80_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let short = 3 * 256;
        let long = 3 * 8192;
        let mut lens = vec![0, 1, 8, 767, 51_370, 80_000];
        for base in [
            short,
            2 * short,
            long,
            long + short,
            2 * long + 4 * short + 464,
        ] {
            lens.extend([base - 1, base, base + 1, base + 7, base + 8, base + 9]);
        }
        for len in lens {
            let part = &bytes[..len];
            let expected = !update_table(!0, part);
            assert_eq!(extend(0, part), expected, "length {len}");
            assert_eq!(
                extend(0x1234_5678, part),
                !update_table(!0x1234_5678, part),
                "length {len} after a register"
            );
            if len > 0 {
                for at in [0, len / 3, len / 2, len - 1] {
                    let mut flipped = part.to_vec();
                    flipped[at] ^= 0x10;
                    assert_ne!(extend(0, &flipped), expected, "length {len}, bit at {at}");
                }
            }
        }
    }

    #[test]
    fn a_shift_table_is_that_many_zero_bytes() {
        for state in [1u32, 0x8000_0000, 0xDEAD_BEEF, 0xFFFF_FFFF] {
            assert_eq!(
                shift_register(&shift_tables(256), state),
                update_table(state, &[0u8; 256])
            );
            assert_eq!(
                shift_register(&shift_tables(8192), state),
                update_table(state, &[0u8; 8192])
            );
        }
    }
}
