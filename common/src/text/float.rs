//! THE float formatter: Go's `strconv.FormatFloat(f, 'g', -1, 64)`, which is how Prometheus
//! writes sample values, `le` and `quantile`. Every writer of floats in telemeter uses this one, so
//! the same value is spelled the same way in `/federate`, `/metrics` and remote write.

use std::fmt;
use std::io::{self, Write};

/// Writes `f` as Go's `strconv.FormatFloat(f, 'g', -1, 64)` does (the shortest digits that read
/// back as `f`, in exponent form below 1e-4 and from 1e6 up), with `NaN`, `+Inf` and `-Inf`.
pub(super) fn write_float<W: Write>(w: &mut W, f: f64) -> io::Result<()> {
    let mut buf = NumBuf::new();
    buf.push_float(f);
    w.write_all(buf.as_bytes())
}

/// `f` as Go's `strconv.FormatFloat(f, 'g', -1, 64)` writes it, as a `String`: what Prometheus
/// puts in sample values, `le` and `quantile`, for writers that build text rather than stream it.
pub fn format_float(f: f64) -> String {
    let mut buf = NumBuf::new();
    buf.push_float(f);
    String::from_utf8_lossy(buf.as_bytes()).into_owned()
}

/// A small stack buffer numbers are formatted into, so formatting never touches the heap. Room
/// for the longest line tail: `,quantile="<float>"} <float> <i64>\n` is at most 84 bytes.
pub(super) struct NumBuf {
    bytes: [u8; 128],
    len: usize,
}

impl NumBuf {
    pub(super) fn new() -> Self {
        NumBuf {
            bytes: [0; 128],
            len: 0,
        }
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }

    pub(super) fn push(&mut self, b: u8) {
        // Every caller stays far below the capacity; dropping would be the safe failure anyway.
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    pub(super) fn push_slice(&mut self, s: &[u8]) {
        // One copy, not a byte at a time: this carries every number of every line `/federate`
        // writes. Dropping what does not fit is the safe failure (no caller comes near it).
        let end = self.len + s.len();
        if let Some(room) = self.bytes.get_mut(self.len..end) {
            room.copy_from_slice(s);
            self.len = end;
        }
    }

    fn push_u64(&mut self, n: u64) {
        let mut room = [0u8; 20];
        self.push_slice(u64_digits(n, &mut room));
    }

    pub(super) fn push_i64(&mut self, n: i64) {
        if n < 0 {
            self.push(b'-');
        }
        self.push_u64(n.unsigned_abs());
    }

    /// `f` as Go's `strconv.FormatFloat(f, 'g', -1, 64)`: the fast path for the values most
    /// series carry, then [`NumBuf::push_float_general`] for the rest.
    #[inline]
    pub(super) fn push_float(&mut self, f: f64) {
        let abs = f.abs();
        // Integers below 1e6 (counts, most counters and gauges, 0 and 1, negative zero as "0"):
        // their shortest digits are the integer itself, which Go writes without an exponent.
        // (A round trip through u64, not `fract`: that is a call to libm's `trunc` without
        // SSE4.1, a few percent of a scrape.)
        let integer = abs as u64;
        if abs < 1e6 && integer as f64 == abs {
            if f < 0.0 {
                self.push(b'-');
            }
            return self.push_u64(integer);
        }
        self.push_float_general(f)
    }

    /// [`NumBuf::push_float`] for every value, without its fast path: the reference that path is
    /// tested against.
    pub(super) fn push_float_general(&mut self, f: f64) {
        // Written in place when the buffer has room for the longest float (always, in practice):
        // one bounds check for the whole number, not one a byte.
        let start = self.len;
        let room = self
            .bytes
            .get_mut(start..start + FLOAT_ROOM)
            .and_then(|room| <&mut [u8; FLOAT_ROOM]>::try_from(room).ok());
        if let Some(room) = room {
            self.len += write_general(f, room);
        } else {
            let mut room = [0u8; FLOAT_ROOM];
            let len = write_general(f, &mut room);
            self.push_slice(room.get(..len).unwrap_or_default());
        }
    }
}

/// Room [`write_general`] writes into: the longest float is 24 bytes
/// (`-1.7976931348623157e+308`), and a power of two keeps the slices of it cheap to check.
const FLOAT_ROOM: usize = 32;

/// `f` as Go's `strconv.FormatFloat(f, 'g', -1, 64)`, at the start of `out`; returns its length.
/// The digits go straight to where they belong (one place right of it when a point will split
/// them, the few before the point then moved left over it), rather than into a scratch buffer
/// first and then copied a byte at a time.
fn write_general(f: f64, out: &mut [u8; FLOAT_ROOM]) -> usize {
    if f.is_nan() {
        return put_slice(out, 0, b"NaN");
    }
    if f.is_infinite() {
        return put_slice(out, 0, if f > 0.0 { b"+Inf" } else { b"-Inf" });
    }
    if f == 0.0 {
        // Go writes negative zero as "0" too.
        return put_slice(out, 0, b"0");
    }
    let abs = f.abs();
    // The shortest digits that read back as `abs`, as an integer and its power of ten.
    let integer = abs as u64;
    let (mantissa, power) = if abs < 9_007_199_254_740_992.0 && integer as f64 == abs {
        // Integers below 2^53 are exact, so their digits are their shortest form (once their
        // trailing zeros go to the exponent, as Ryū's do).
        let (mut mantissa, mut power) = (integer, 0);
        while mantissa % 10 == 0 {
            mantissa /= 10;
            power += 1;
        }
        (mantissa, power)
    } else {
        ryu::shortest(abs)
    };
    let sign = usize::from(f < 0.0);
    // Every branch below writes `out[0]` when there is no sign.
    put(out, 0, b'-');
    let length = decimal_length17(mantissa);
    // The decimal exponent of the first digit, as Go's `%e` would write it.
    let exp = power + length as i32 - 1;
    if !(-4..6).contains(&exp) {
        // d.ddde±XX
        let mut end = sign + 1 + length;
        put_digits(mantissa, out, end);
        let first = out.get(sign + 1).copied().unwrap_or(b'0');
        put(out, sign, first);
        if length > 1 {
            put(out, sign + 1, b'.');
        } else {
            end = sign + 1;
        }
        put(out, end, b'e');
        put(out, end + 1, if exp < 0 { b'-' } else { b'+' });
        end += 2;
        // Go writes at least two exponent digits.
        let e = exp.unsigned_abs() as usize;
        if e >= 100 {
            put(out, end, b'0' + (e / 100) as u8);
            end += 1;
        }
        put_pair(out, end, e % 100);
        end + 2
    } else if exp < 0 {
        // 0.000ddd: the zeros first, then the digits over the last of them.
        put_slice(out, sign, b"0.0000");
        let end = sign + 1 + exp.unsigned_abs() as usize + length;
        put_digits(mantissa, out, end);
        end
    } else if length <= exp as usize {
        // ddd000: an integer whose trailing zeros Ryū moved to the exponent.
        put_slice(out, sign, b"000000");
        put_digits(mantissa, out, sign + length);
        sign + exp as usize + 1
    } else if length == exp as usize + 1 {
        let end = sign + length;
        put_digits(mantissa, out, end);
        end
    } else {
        // ddd.ddd. The integer part is `abs`'s own (were an integer within the rounding
        // interval, it would be the shortest digits and there would be no fraction), so the digits
        // split at the point by a multiplication, not a division, and each part goes straight to
        // its place: writing them whole and moving the integer part over the point reads back
        // bytes just stored two at a time, a store-forwarding stall that cost more than it saved.
        let int_len = exp as usize + 1;
        let end = sign + 1 + length;
        let scale = POWERS_OF_TEN
            .get(length - int_len)
            .copied()
            .unwrap_or(u64::MAX);
        match integer
            .checked_mul(scale)
            .and_then(|whole| mantissa.checked_sub(whole))
        {
            Some(fraction) if fraction < scale => {
                // Zeros first, for a fraction with leading zeros (12.05).
                put_slice(out, sign + int_len + 1, &[b'0'; 16]);
                put_digits(fraction, out, end);
                put(out, sign + int_len, b'.');
                put_digits(integer, out, sign + int_len);
            }
            _ => {
                // Not reached (see above); the slow way rather than wrong digits if it were.
                put_digits(mantissa, out, end);
                out.copy_within(sign + 1..sign + 1 + int_len, sign);
                put(out, sign + int_len, b'.');
            }
        }
        end
    }
}

/// 10^0 .. 10^16.
const POWERS_OF_TEN: [u64; 17] = {
    let mut powers = [0u64; 17];
    let mut p = 1u64;
    let mut i = 0;
    while i < 17 {
        powers[i] = p;
        p *= 10;
        i += 1;
    }
    powers
};

/// The number of decimal digits of `v`, for `v < 10^17` (Ryū's digits of an `f64` are at most
/// 17): comparisons, not a division a digit.
fn decimal_length17(v: u64) -> usize {
    // From the top: most values that get here have 16 or 17 digits. (Counting the powers `v`
    // reaches vectorizes into a popcount emulated with shifts and masks, slower than this.)
    let mut length = 17;
    for p in POWERS_OF_TEN.iter().rev() {
        if v >= *p {
            return length;
        }
        length -= 1;
    }
    1
}

fn put(out: &mut [u8; FLOAT_ROOM], at: usize, b: u8) {
    // Every caller stays within the longest float; dropping would be the safe failure anyway.
    if let Some(slot) = out.get_mut(at) {
        *slot = b;
    }
}

/// Writes `s` at `at`; returns where it ends.
fn put_slice(out: &mut [u8; FLOAT_ROOM], at: usize, s: &[u8]) -> usize {
    if let Some(room) = out.get_mut(at..at + s.len()) {
        room.copy_from_slice(s);
    }
    at + s.len()
}

/// Writes `pair` (below 100) as two digits at `at`.
fn put_pair(out: &mut [u8; FLOAT_ROOM], at: usize, pair: usize) {
    let pair = pair * 2;
    if let (Some(slot), Some(pair)) = (out.get_mut(at..at + 2), DIGIT_PAIRS.get(pair..pair + 2)) {
        slot.copy_from_slice(pair);
    }
}

/// Writes the digits of `n` (below 10^17) so that they end just before `end`. From 2^32 up, the
/// last eight first, as four pairs from one 64-bit division; then the rest in 32 bits, four
/// digits a division.
fn put_digits(mut n: u64, out: &mut [u8; FLOAT_ROOM], mut end: usize) {
    if n >> 32 != 0 && end >= 8 {
        let low = (n % 100_000_000) as u32;
        n /= 100_000_000;
        let (high4, low4) = ((low / 10_000) as usize, (low % 10_000) as usize);
        put_pair(out, end - 2, low4 % 100);
        put_pair(out, end - 4, low4 / 100);
        put_pair(out, end - 6, high4 % 100);
        put_pair(out, end - 8, high4 / 100);
        end -= 8;
    }
    let mut n = n as u32;
    while n >= 10_000 && end >= 4 {
        let four = (n % 10_000) as usize;
        n /= 10_000;
        put_pair(out, end - 2, four % 100);
        put_pair(out, end - 4, four / 100);
        end -= 4;
    }
    if n >= 100 && end >= 2 {
        put_pair(out, end - 2, (n % 100) as usize);
        n /= 100;
        end -= 2;
    }
    if n >= 10 && end >= 2 {
        put_pair(out, end - 2, n as usize);
    } else if end >= 1 {
        put(out, end - 1, b'0' + n as u8);
    }
}

/// Renderings of recent `le` and `quantile` values, by their bits: a histogram's bounds are
/// the same in every series of its family (and every cluster's), so `/federate` formats each once
/// per thread instead of once per bucket line. Direct-mapped; a collision only costs a format.
pub(super) struct FloatCache {
    slots: [CachedFloat; FLOAT_CACHE_SLOTS],
}

const FLOAT_CACHE_SLOTS: usize = 64;

/// The longest float [`NumBuf::push_float`] writes is 24 bytes (`-1.7976931348623157e+308`).
#[derive(Clone, Copy)]
struct CachedFloat {
    bits: u64,
    /// 0 for an empty slot: every rendering has at least one byte.
    len: u8,
    text: [u8; 31],
}

impl FloatCache {
    pub(super) const fn new() -> Self {
        FloatCache {
            slots: [CachedFloat {
                bits: 0,
                len: 0,
                text: [0; 31],
            }; FLOAT_CACHE_SLOTS],
        }
    }

    /// Appends `f` to `buf` as [`NumBuf::push_float`] does, from the cache when it can.
    pub(super) fn push_float(&mut self, buf: &mut NumBuf, f: f64) {
        let bits = f.to_bits();
        let slot = (bits ^ (bits >> 29) ^ (bits >> 47)) as usize % FLOAT_CACHE_SLOTS;
        let Some(cached) = self.slots.get_mut(slot) else {
            return buf.push_float(f);
        };
        if cached.len > 0 && cached.bits == bits {
            return buf.push_slice(
                cached
                    .text
                    .get(..usize::from(cached.len))
                    .unwrap_or_default(),
            );
        }
        let start = buf.len;
        buf.push_float(f);
        let text = buf.bytes.get(start..buf.len).unwrap_or_default();
        if let Some(room) = cached.text.get_mut(..text.len()) {
            room.copy_from_slice(text);
            cached.bits = bits;
            cached.len = text.len() as u8;
        }
    }
}

/// `n`'s decimal digits, written at the end of `room`. Two digits a division, from a table:
/// half the divisions of one digit at a time. From 10^8 up, the last eight digits are written
/// first as four pairs computed side by side from one division by 10^8, then the rest: a
/// value's shortest digits are often 16 or 17, and one chain of eight dependent divisions made
/// formatting such a value ~10% slower.
fn u64_digits(mut n: u64, room: &mut [u8; 20]) -> &[u8] {
    let mut i = room.len();
    if n >= 100_000_000 {
        let low = (n % 100_000_000) as u32;
        n /= 100_000_000;
        let (high4, low4) = (low / 10_000, low % 10_000);
        for (at, pair) in [high4 / 100, high4 % 100, low4 / 100, low4 % 100]
            .into_iter()
            .enumerate()
        {
            let pair = pair as usize * 2;
            let at = room.len() - 8 + at * 2;
            if let (Some(slot), Some(pair)) =
                (room.get_mut(at..at + 2), DIGIT_PAIRS.get(pair..pair + 2))
            {
                slot.copy_from_slice(pair);
            }
        }
        i -= 8;
    }
    while n >= 100 && i >= 2 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        if let (Some(slot), Some(pair)) = (room.get_mut(i..i + 2), DIGIT_PAIRS.get(pair..pair + 2))
        {
            slot.copy_from_slice(pair);
        }
    }
    if n >= 10 && i >= 2 {
        let pair = n as usize * 2;
        i -= 2;
        if let (Some(slot), Some(pair)) = (room.get_mut(i..i + 2), DIGIT_PAIRS.get(pair..pair + 2))
        {
            slot.copy_from_slice(pair);
        }
    } else if i >= 1 {
        i -= 1;
        if let Some(d) = room.get_mut(i) {
            *d = b'0' + n as u8;
        }
    }
    room.get(i..).unwrap_or_default()
}

/// "00", "01", .. "99": the digits of every number below 100, two at a time.
const DIGIT_PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

impl fmt::Write for NumBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > self.bytes.len() {
            return Err(fmt::Error);
        }
        self.push_slice(s.as_bytes());
        Ok(())
    }
}

/// Ryū's shortest digits, written out here because the crates we may use do not include `ryu`,
/// and `fmt`'s `{:e}` is both several times slower and not Go's choice on an exact tie (it rounds
/// half up where Go's `strconv` rounds half to even: `2138389708628431.25` is
/// `2138389708628431.2` in Go and Prometheus, `…431.3` from `{:e}`).
mod ryu {
    /// Ryū (Ulf Adams, PLDI 2018): the shortest decimal digits that read back as a finite, positive
    /// `f64`, as `(digits, exponent)` with the value `digits × 10^exponent` and no trailing zero in
    /// `digits`. The same digits as Rust's `{:e}` and Go's `FormatFloat(f, 'g', -1, 64)` (both
    /// shortest round-trip, ties to the closest), without `fmt`'s machinery.
    pub(super) fn shortest(f: f64) -> (u64, i32) {
        const MANTISSA_BITS: u32 = 52;
        const BIAS: i32 = 1023;
        let bits = f.to_bits();
        let ieee_mantissa = bits & ((1u64 << MANTISSA_BITS) - 1);
        let ieee_exponent = ((bits >> MANTISSA_BITS) & 0x7ff) as i32;
        let (e2, m2) = if ieee_exponent == 0 {
            (1 - BIAS - MANTISSA_BITS as i32 - 2, ieee_mantissa)
        } else {
            (
                ieee_exponent - BIAS - MANTISSA_BITS as i32 - 2,
                (1u64 << MANTISSA_BITS) | ieee_mantissa,
            )
        };
        let accept_bounds = m2 & 1 == 0;
        let mv = 4 * m2;
        let mm_shift = u64::from(ieee_mantissa != 0 || ieee_exponent <= 1);
        let tables = tables();
        let (mut vr, mut vp, mut vm);
        let e10: i32;
        let mut vm_is_trailing_zeros = false;
        let mut vr_is_trailing_zeros = false;
        if e2 >= 0 {
            let q = log10_pow2(e2) - u32::from(e2 > 3);
            e10 = q as i32;
            let k = POW5_INV_BITCOUNT + pow5bits(q as i32) - 1;
            let i = -e2 + q as i32 + k;
            let mul = tables.inv.get(q as usize).copied().unwrap_or_default();
            vr = mul_shift(mv, mul, i as u32);
            vp = mul_shift(mv + 2, mul, i as u32);
            vm = mul_shift(mv - 1 - mm_shift, mul, i as u32);
            if q <= 21 {
                if mv % 5 == 0 {
                    vr_is_trailing_zeros = multiple_of_power_of_5(mv, q);
                } else if accept_bounds {
                    vm_is_trailing_zeros = multiple_of_power_of_5(mv - 1 - mm_shift, q);
                } else {
                    vp -= u64::from(multiple_of_power_of_5(mv + 2, q));
                }
            }
        } else {
            let q = log10_pow5(-e2) - u32::from(-e2 > 1);
            e10 = q as i32 + e2;
            let i = -e2 - q as i32;
            let k = pow5bits(i) - POW5_BITCOUNT;
            let j = q as i32 - k;
            let mul = tables.pow5.get(i as usize).copied().unwrap_or_default();
            vr = mul_shift(mv, mul, j as u32);
            vp = mul_shift(mv + 2, mul, j as u32);
            vm = mul_shift(mv - 1 - mm_shift, mul, j as u32);
            if q <= 1 {
                vr_is_trailing_zeros = true;
                if accept_bounds {
                    vm_is_trailing_zeros = mm_shift == 1;
                } else {
                    vp -= 1;
                }
            } else if q < 63 {
                vr_is_trailing_zeros = mv & ((1u64 << q) - 1) == 0;
            }
        }
        let mut removed = 0i32;
        let mut last_removed_digit = 0u64;
        let mut output;
        if vm_is_trailing_zeros || vr_is_trailing_zeros {
            while vp / 10 > vm / 10 {
                vm_is_trailing_zeros &= vm % 10 == 0;
                vr_is_trailing_zeros &= last_removed_digit == 0;
                last_removed_digit = vr % 10;
                vr /= 10;
                vp /= 10;
                vm /= 10;
                removed += 1;
            }
            if vm_is_trailing_zeros {
                while vm % 10 == 0 && vm > 0 {
                    vr_is_trailing_zeros &= last_removed_digit == 0;
                    last_removed_digit = vr % 10;
                    // The upper bound is not read again: only `vr` and `vm` go on shrinking.
                    vr /= 10;
                    vm /= 10;
                    removed += 1;
                }
            }
            if vr_is_trailing_zeros && last_removed_digit == 5 && vr % 2 == 0 {
                // Exactly halfway: round to even.
                last_removed_digit = 4;
            }
            output = vr
                + u64::from(
                    (vr == vm && (!accept_bounds || !vm_is_trailing_zeros))
                        || last_removed_digit >= 5,
                );
        } else {
            let mut round_up = false;
            if vp / 100 > vm / 100 {
                round_up = vr % 100 >= 50;
                vr /= 100;
                vp /= 100;
                vm /= 100;
                removed += 2;
            }
            while vp / 10 > vm / 10 {
                round_up = vr % 10 >= 5;
                vr /= 10;
                vp /= 10;
                vm /= 10;
                removed += 1;
            }
            output = vr + u64::from(vr == vm || round_up);
        }
        let mut exp = e10 + removed;
        while output % 10 == 0 && output > 0 {
            output /= 10;
            exp += 1;
        }
        (output, exp)
    }

    const POW5_INV_BITCOUNT: i32 = 125;
    const POW5_BITCOUNT: i32 = 125;

    /// `ceil(log2(5^e))` (1 for e = 0), for 0 <= e <= 3528.
    fn pow5bits(e: i32) -> i32 {
        ((e as u32 * 1_217_359) >> 19) as i32 + 1
    }

    /// `floor(log10(2^e))`, for 0 <= e <= 1650.
    fn log10_pow2(e: i32) -> u32 {
        (e as u32 * 78_913) >> 18
    }

    /// `floor(log10(5^e))`, for 0 <= e <= 2620.
    fn log10_pow5(e: i32) -> u32 {
        (e as u32 * 732_923) >> 20
    }

    fn multiple_of_power_of_5(mut v: u64, p: u32) -> bool {
        let mut count = 0;
        while v > 0 && v % 5 == 0 {
            v /= 5;
            count += 1;
        }
        count >= p
    }

    /// `(m × mul) >> j` for a 128-bit `mul` (j >= 64: the product's low 64 bits never matter).
    fn mul_shift(m: u64, mul: u128, j: u32) -> u64 {
        let low = u128::from(m) * (mul as u64 as u128);
        let high = u128::from(m) * (mul >> 64);
        (((low >> 64) + high) >> (j - 64)) as u64
    }

    /// Ryū's tables: the top 125 bits of 5^i, and 2^(bits(5^q) - 1 + 125) / 5^q + 1, computed once
    /// (a few milliseconds) rather than carried as 10 KB of literals.
    struct Tables {
        pow5: Vec<u128>,
        inv: Vec<u128>,
    }

    fn tables() -> &'static Tables {
        static TABLES: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
        TABLES.get_or_init(|| {
            let mut pow5 = Vec::with_capacity(326);
            let mut inv = Vec::with_capacity(342);
            // 5^i as little-endian 32-bit limbs.
            let mut big: Vec<u32> = vec![1];
            for i in 0..342 {
                let len = bit_len(&big);
                if i < 326 {
                    pow5.push(top_bits(&big, len, POW5_BITCOUNT as usize));
                }
                inv.push(inverse(&big, len - 1 + POW5_INV_BITCOUNT as usize).wrapping_add(1));
                let mut carry = 0u64;
                for limb in big.iter_mut() {
                    let v = u64::from(*limb) * 5 + carry;
                    *limb = v as u32;
                    carry = v >> 32;
                }
                if carry > 0 {
                    big.push(carry as u32);
                }
            }
            Tables { pow5, inv }
        })
    }

    fn bit_len(big: &[u32]) -> usize {
        let top = big.iter().rposition(|&l| l != 0).unwrap_or(0);
        top * 32 + (32 - big.get(top).map_or(32, |l| l.leading_zeros() as usize))
    }

    fn bit(big: &[u32], at: usize) -> u128 {
        big.get(at / 32)
            .map_or(0, |l| u128::from((l >> (at % 32)) & 1))
    }

    /// The `n` top bits of `big` (of `len` bits), shifted up with zeros when it has fewer.
    fn top_bits(big: &[u32], len: usize, n: usize) -> u128 {
        let mut out = 0u128;
        for k in 0..n {
            out <<= 1;
            if k < len {
                out |= bit(big, len - 1 - k);
            }
        }
        out
    }

    /// `floor(2^j / d)` (it fits 128 bits for Ryū's j), by long division a bit at a time.
    fn inverse(d: &[u32], j: usize) -> u128 {
        let mut rem: Vec<u32> = vec![0; d.len() + 1];
        let mut quotient = 0u128;
        for k in (0..=j).rev() {
            // rem = rem * 2 + (bit k of 2^j)
            let mut carry = u32::from(k == j);
            for limb in rem.iter_mut() {
                let next = *limb >> 31;
                *limb = (*limb << 1) | carry;
                carry = next;
            }
            quotient <<= 1;
            if !less(&rem, d) {
                let mut borrow = 0i64;
                for (at, limb) in rem.iter_mut().enumerate() {
                    let v = i64::from(*limb) - i64::from(d.get(at).copied().unwrap_or(0)) - borrow;
                    borrow = i64::from(v < 0);
                    *limb = (v + (borrow << 32)) as u32;
                }
                quotient |= 1;
            }
        }
        quotient
    }

    fn less(a: &[u32], b: &[u32]) -> bool {
        let n = a.len().max(b.len());
        for at in (0..n).rev() {
            let (x, y) = (
                a.get(at).copied().unwrap_or(0),
                b.get(at).copied().unwrap_or(0),
            );
            if x != y {
                return x < y;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::{u64_digits, FloatCache, NumBuf};

    impl NumBuf {
        /// The general path as it was before it wrote in place (digits into a scratch buffer, then
        /// pushed a byte at a time): what the new one is compared with, for bytes and for speed.
        fn old_push_float_general(&mut self, f: f64) {
            if f.is_nan() {
                return self.push_slice(b"NaN");
            }
            if f.is_infinite() {
                return self.push_slice(if f > 0.0 { b"+Inf" } else { b"-Inf" });
            }
            if f == 0.0 {
                // Go writes negative zero as "0" too.
                return self.push(b'0');
            }
            let abs = f.abs();
            // The shortest digits that read back as `abs`, as an integer and its power of ten.
            let integer = abs as u64;
            let (mut mantissa, mut power) =
                if abs < 9_007_199_254_740_992.0 && integer as f64 == abs {
                    // Integers below 2^53 are exact, so their digits are their shortest form.
                    (integer, 0)
                } else {
                    super::ryu::shortest(abs)
                };
            while mantissa % 10 == 0 && mantissa > 0 {
                mantissa /= 10;
                power += 1;
            }
            let mut room = [0u8; 20];
            let digits = u64_digits(mantissa, &mut room);
            // The decimal exponent of the first digit, as Go's `%e` would write it.
            let exp = power + digits.len() as i32 - 1;
            if f < 0.0 {
                self.push(b'-');
            }
            if !(-4..6).contains(&exp) {
                let (first, rest) = digits.split_first().unwrap_or((&b'0', &[]));
                self.push(*first);
                if !rest.is_empty() {
                    self.push(b'.');
                    self.push_slice(rest);
                }
                self.push(b'e');
                self.push(if exp < 0 { b'-' } else { b'+' });
                if exp.unsigned_abs() < 10 {
                    self.push(b'0');
                }
                self.push_u64(u64::from(exp.unsigned_abs()));
            } else if exp < 0 {
                self.push_slice(b"0.");
                for _ in 0..(-exp - 1) {
                    self.push(b'0');
                }
                self.push_slice(digits);
            } else {
                let int_len = exp as usize + 1;
                for i in 0..int_len {
                    self.push(digits.get(i).copied().unwrap_or(b'0'));
                }
                if let Some(frac) = digits.get(int_len..).filter(|f| !f.is_empty()) {
                    self.push(b'.');
                    self.push_slice(frac);
                }
            }
        }
    }

    #[test]
    fn integer_digits_are_rusts() {
        let mut values = vec![0, u64::MAX, u64::MAX - 1];
        let mut power = 1u64;
        for _ in 0..20 {
            values.extend([
                power - 1,
                power,
                power.saturating_add(1),
                power.wrapping_mul(7) / 3,
            ]);
            power = power.saturating_mul(10);
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x);
            values.push(x >> (x % 64));
        }
        for n in values {
            let mut room = [0u8; 20];
            assert_eq!(u64_digits(n, &mut room), n.to_string().as_bytes(), "{n}");
        }
    }

    fn fast(f: f64) -> String {
        let mut buf = NumBuf::new();
        buf.push_float(f);
        String::from_utf8(buf.as_bytes().to_vec()).unwrap()
    }

    fn general(f: f64) -> String {
        let mut buf = NumBuf::new();
        buf.push_float_general(f);
        String::from_utf8(buf.as_bytes().to_vec()).unwrap()
    }

    /// Go's `FormatFloat(f, 'g', -1, 64)` built with Rust's `fmt` and string handling alone,
    /// sharing no code with [`NumBuf`]: the oracle both paths answer to. The shortest length
    /// comes from `{:e}`; the digits from formatting exactly to that length, which rounds half
    /// to even as Go does (`{:e}`'s own last digit rounds an exact tie up). Checked against Go
    /// over 4M values when written.
    fn oracle(f: f64) -> String {
        if f.is_nan() {
            return "NaN".into();
        }
        if f.is_infinite() {
            return if f > 0.0 { "+Inf" } else { "-Inf" }.into();
        }
        if f == 0.0 {
            return "0".into();
        }
        let shortest = format!("{:e}", f.abs());
        let length = shortest
            .split('e')
            .next()
            .unwrap()
            .chars()
            .filter(char::is_ascii_digit);
        let sci = format!("{:.*e}", length.count() - 1, f.abs());
        let (mantissa, exp) = sci.split_once('e').unwrap();
        let exp: i32 = exp.parse().unwrap();
        let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
        let sign = if f < 0.0 { "-" } else { "" };
        if !(-4..6).contains(&exp) {
            let (first, rest) = digits.split_at(1);
            let dot = if rest.is_empty() { "" } else { "." };
            let esign = if exp < 0 { '-' } else { '+' };
            return format!("{sign}{first}{dot}{rest}e{esign}{:02}", exp.abs());
        }
        if exp < 0 {
            return format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize));
        }
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            format!("{sign}{digits}{}", "0".repeat(int_len - digits.len()))
        } else {
            format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
        }
    }

    fn check(f: f64) {
        let want = oracle(f);
        assert_eq!(fast(f), want, "fast path, {f:?} ({:#x})", f.to_bits());
        assert_eq!(general(f), want, "general path, {f:?} ({:#x})", f.to_bits());
        let mut cache = FloatCache::new();
        for _ in 0..2 {
            let mut buf = NumBuf::new();
            cache.push_float(&mut buf, f);
            assert_eq!(buf.as_bytes(), want.as_bytes(), "cached, {f:?}");
        }
    }

    /// Each value with its neighbours one and two ulps either side, both signs.
    fn check_around(f: f64) {
        let bits = f.to_bits();
        for b in bits.saturating_sub(2)..=bits.saturating_add(2) {
            let g = f64::from_bits(b);
            check(g);
            check(-g);
        }
    }

    #[test]
    fn exact_ties_round_to_even_as_go_does() {
        // strconv.FormatFloat(f, 'g', -1, 64) from Go 1.x on these bits.
        for (bits, go) in [
            (0x431e_636a_9be5_873d_u64, "2.1383897086284312e+15"),
            (0x430b_6eaf_72d9_d92a, "9.651905245499252e+14"),
            (0x42e3_7f9f_0e8a_5e24, "1.7151080243684912e+14"),
            (0x42d4_47a1_05a6_ab28, "8.919150694263662e+13"),
            (0x3fb6_1405_f554_71f3, "0.08624303092478396"),
            (0x43df_db0a_02fa_aa39, "9.181757771948287e+18"),
        ] {
            check(f64::from_bits(bits));
            assert_eq!(fast(f64::from_bits(bits)), go);
        }
    }

    #[test]
    fn fast_paths_write_what_the_general_formatter_writes() {
        for f in [
            0.0,
            -0.0,
            1.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            check(f);
        }
        assert_eq!(fast(-0.0), "0");
        assert_eq!(fast(1.0), "1");
        assert_eq!(fast(999_999.0), "999999");
        assert_eq!(fast(1e6), "1e+06");
        assert_eq!(fast(0.0001), "0.0001");
        assert_eq!(fast(0.5), "0.5");
        assert_eq!(fast(-123.25), "-123.25");
        // The edges of the fast paths: 1e6 and 1e-4, and integers near 2^53 and 2^64.
        let two53 = 9_007_199_254_740_992.0f64;
        for f in [
            1e6,
            1e-4,
            999_999.5,
            two53,
            2.0 * two53,
            1.8446744073709552e19,
        ] {
            check_around(f);
        }
        for k in 0..2_000u64 {
            check(two53 - k as f64);
            check(two53 + 2.0 * k as f64);
            check(1e6 - k as f64);
            check(1e6 + k as f64);
            check(k as f64);
            check(k as f64 / 8.0);
        }
        // 1e21 and up (Go's and JavaScript's switch points differ: Go's is 1e6), powers of ten
        // across the range, subnormals down to the smallest.
        for e in -324..=308 {
            check_around(format!("1e{e}").parse().unwrap());
        }
        check_around(f64::MIN_POSITIVE);
        check_around(f64::MAX);
        check_around(f64::from_bits(1));
        check_around(f64::from_bits(0x000f_ffff_ffff_ffff));
        // Random bit patterns, random integers of every size, and the bench payload's values.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..300_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            check(f64::from_bits(x));
            check((x >> (i % 64)) as f64);
            check((x % 10_000_000) as f64 / 7.0);
        }
    }

    #[test]
    fn the_cache_tells_colliding_values_apart() {
        let mut cache = FloatCache::new();
        // Far more values than slots, each asked for twice in a row and again later.
        for round in 0..3 {
            for i in 0..1_000u64 {
                for f in [i as f64 * 0.005, f64::from_bits(i << 40), -(i as f64)] {
                    let mut buf = NumBuf::new();
                    cache.push_float(&mut buf, f);
                    assert_eq!(buf.as_bytes(), oracle(f).as_bytes(), "round {round}, {f:?}");
                }
            }
        }
    }

    fn old_general(f: f64) -> String {
        let mut buf = NumBuf::new();
        buf.old_push_float_general(f);
        String::from_utf8(buf.as_bytes().to_vec()).unwrap()
    }

    /// The in-place writer against the one it replaced, on far more values than the oracle (slow)
    /// can check: random bit patterns, the bench's n/7 values, short decimals of every length.
    #[test]
    fn the_in_place_writer_writes_what_the_old_one_wrote() {
        let mut rng = testkit::fuzz::Rng::new(0x9e37_79b9_7f4a_7c15);
        for i in 0..1_000_000u64 {
            let x = rng.next_u64();
            let scale = [1.0, 10.0, 1e3, 1e5, 1e6, 1e7, 1e-3, 1e-5, 1e17, 1e-300][i as usize % 10];
            for f in [
                f64::from_bits(x),
                (x % 10_000_000) as f64 / 7.0,
                (x % 100_000) as f64 / scale,
                (x >> (i % 64)) as f64,
            ] {
                for f in [f, -f] {
                    assert_eq!(general(f), old_general(f), "{f:?} ({:#x})", f.to_bits());
                }
            }
        }
        // The edges of the buffer: formatting near its end must not lose or add bytes.
        for fill in 90..128 {
            for f in [
                -1.7976931348623157e308,
                1_428_571.4285714286,
                -0.0001234,
                5e-324,
            ] {
                let (mut new, mut old) = (NumBuf::new(), NumBuf::new());
                for _ in 0..fill {
                    new.push(b'x');
                    old.push(b'x');
                }
                new.push_float_general(f);
                old.old_push_float_general(f);
                if fill + old_general(f).len() <= 128 {
                    assert_eq!(new.as_bytes(), old.as_bytes(), "{fill} bytes before {f:?}");
                } else {
                    // What does not fit is dropped whole, where the old writer cut it short.
                    assert_eq!(
                        new.as_bytes(),
                        &[b'x'; 128][..fill],
                        "{fill} bytes before {f:?}"
                    );
                }
            }
        }
    }

    /// `cargo test --release -p telemeter-common float_speed -- --ignored --nocapture`: 10M values
    /// n/7 (the bench's, 16-17 significant digits) through the old and the new general path,
    /// alternating every 100,000 values (the machine is shared: load that comes and goes then
    /// falls on both alike), five rounds; the sum and the fastest chunk of each.
    #[test]
    #[ignore]
    fn float_speed() {
        use std::hint::black_box;
        use std::time::{Duration, Instant};
        let values: Vec<f64> = (0..10_000_000u64)
            .map(|n| (n.wrapping_mul(0x9e37_79b9) % 10_000_000) as f64 / 7.0)
            .collect();
        let mut totals = [Duration::ZERO; 2];
        let mut fastest = [Duration::MAX; 2];
        let mut bytes = [0usize; 2];
        for _ in 0..5 {
            for chunk in values.chunks(100_000) {
                for which in 0..2 {
                    let started = Instant::now();
                    for &f in chunk {
                        let mut buf = NumBuf::new();
                        if which == 0 {
                            buf.old_push_float_general(black_box(f));
                        } else {
                            buf.push_float_general(black_box(f));
                        }
                        bytes[which] += black_box(buf.as_bytes()).len();
                    }
                    let took = started.elapsed();
                    totals[which] += took;
                    fastest[which] = fastest[which].min(took);
                }
            }
        }
        assert_eq!(bytes[0], bytes[1]);
        for (which, name) in ["old", "new"].into_iter().enumerate() {
            println!(
                "{name}: {:.1} ns/value overall, {:.1} ns/value in its fastest chunk",
                totals[which].as_nanos() as f64 / 5e7,
                fastest[which].as_nanos() as f64 / 1e5
            );
        }
    }
}
