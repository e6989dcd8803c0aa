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
        for &b in s {
            self.push(b);
        }
    }

    fn push_u64(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                *d = b'0' + (n % 10) as u8;
            }
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        self.push_slice(digits.get(i..).unwrap_or_default());
    }

    pub(super) fn push_i64(&mut self, n: i64) {
        if n < 0 {
            self.push(b'-');
        }
        self.push_u64(n.unsigned_abs());
    }

    pub(super) fn push_float(&mut self, f: f64) {
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
        // Shortest round-trip digits and the decimal exponent of the first one.
        let mut digits = [0u8; 24];
        let mut nd = 0;
        let exp: i32;
        let abs = f.abs();
        if abs < 9_007_199_254_740_992.0 && abs.fract() == 0.0 {
            // Integers below 2^53 are exact, so their digits are their shortest form: skip fmt.
            let mut tmp = NumBuf::new();
            tmp.push_u64(abs as u64);
            let all = tmp.as_bytes();
            exp = all.len() as i32 - 1;
            let significant = all.iter().rposition(|&b| b != b'0').map_or(1, |p| p + 1);
            for &b in all.get(..significant).unwrap_or_default() {
                if let Some(d) = digits.get_mut(nd) {
                    *d = b;
                    nd += 1;
                }
            }
        } else {
            // `{:e}` gives the shortest round-trip digits as `d.ddddde-7`.
            let mut sci = NumBuf::new();
            if fmt::write(&mut sci, format_args!("{abs:e}")).is_err() {
                return self.push_slice(b"NaN");
            }
            let text = sci.as_bytes();
            let e_at = text.iter().position(|&b| b == b'e').unwrap_or(text.len());
            for &b in text.get(..e_at).unwrap_or_default() {
                if b.is_ascii_digit() {
                    if let Some(d) = digits.get_mut(nd) {
                        *d = b;
                        nd += 1;
                    }
                }
            }
            exp = std::str::from_utf8(text.get(e_at + 1..).unwrap_or_default())
                .ok()
                .and_then(|e| e.parse().ok())
                .unwrap_or(0);
        }
        let digits = digits.get(..nd).unwrap_or_default();
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

impl fmt::Write for NumBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > self.bytes.len() {
            return Err(fmt::Error);
        }
        self.push_slice(s.as_bytes());
        Ok(())
    }
}
