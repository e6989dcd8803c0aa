//! Comparisons of short byte strings (label fields, label names: a few to a few dozen bytes), done
//! inline in whole words: at these lengths a call to `memcmp`/`bcmp` costs more than the
//! comparison it makes. Shared by the ingest's wire check and the text writer, which both ask
//! "is this label the one at the same place in the series before?" once a label.

/// Whether `a` and `b` hold the same bytes (slices of different lengths never do), compared
/// eight bytes at a time, the last word overlapping the one before; four at a time, from both
/// ends, for 4 to 7 bytes; byte by byte below that.
#[inline(always)]
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let len = a.len();
    if len != b.len() {
        return false;
    }
    let word = |bytes: &[u8], at: usize| {
        let mut word = [0u8; 8];
        if let Some(chunk) = bytes.get(at..at + 8) {
            word.copy_from_slice(chunk);
        }
        u64::from_le_bytes(word)
    };
    let half = |bytes: &[u8], at: usize| {
        let mut half = [0u8; 4];
        if let Some(chunk) = bytes.get(at..at + 4) {
            half.copy_from_slice(chunk);
        }
        u32::from_le_bytes(half)
    };
    if len >= 8 {
        let mut at = 0;
        let mut differ = 0;
        while at + 8 < len {
            differ |= word(a, at) ^ word(b, at);
            at += 8;
        }
        differ | (word(a, len - 8) ^ word(b, len - 8)) == 0
    } else if len >= 4 {
        half(a, 0) == half(b, 0) && half(a, len - 4) == half(b, len - 4)
    } else {
        a.iter().zip(b).all(|(x, y)| x == y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_is_slice_equality_at_every_length_and_position() {
        for n in 0..80usize {
            let a: Vec<u8> = (0..n as u8).map(|b| b.wrapping_mul(37)).collect();
            assert!(same_bytes(&a, &a.clone()), "{n}");
            for at in 0..n {
                for flip in [0x01, 0x40, 0x80] {
                    let mut b = a.clone();
                    b[at] ^= flip;
                    assert!(!same_bytes(&a, &b), "{n} {at} {flip:#x}");
                    assert!(!same_bytes(&b, &a), "{n} {at} {flip:#x}");
                }
            }
            let mut longer = a.clone();
            longer.push(0);
            assert!(!same_bytes(&a, &longer), "{n}");
            assert!(!same_bytes(&longer, &a), "{n}");
            assert!(!same_bytes(&a[..n.saturating_sub(1)], &a) || n == 0, "{n}");
        }
    }
}
