//! Durations in flags, written as Prometheus writes them (`15s`, `4m30s`, `24h`, `1d`, `500ms`) or
//! as Go's `time.ParseDuration` reads them (`1.5m`, `300ms`, `1h30m`, `2.5s`, `250us`): upstream
//! telemeter's flags were Go durations, so its command lines keep working.

use std::fmt;
use std::time::Duration;

/// Why a duration could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError(pub String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid duration {:?}: expected numbers with units, as Prometheus writes them (15s, 4m30s, 1d; units ms s m h d w y) or Go does (1.5m, 300ms, 1h30m; units ns us ms s m h)", self.0)
    }
}

impl std::error::Error for DurationError {}

/// The units, largest first, with their length in milliseconds. Order matters twice: a duration
/// must name them in this order, and `format` decomposes greedily in it.
const UNITS: [(&str, u64); 7] = [
    ("y", 365 * 24 * 3600 * 1000),
    ("w", 7 * 24 * 3600 * 1000),
    ("d", 24 * 3600 * 1000),
    ("h", 3600 * 1000),
    ("m", 60 * 1000),
    ("s", 1000),
    ("ms", 1),
];

/// Go's units with their length in nanoseconds, largest first (`format` decomposes in this order
/// when a duration is finer than a millisecond). Both spellings of micro are Go's.
const GO_UNITS: [(&str, u64); 8] = [
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("\u{b5}s", 1_000),
    ("\u{3bc}s", 1_000),
    ("ns", 1),
];

/// Prometheus keeps durations as int64 nanoseconds; refusing more keeps both sides agreeing on
/// which durations exist (about 292 years).
const MAX_MILLIS: u64 = i64::MAX as u64 / 1_000_000;
/// Go's limit, the same int64 nanoseconds.
const MAX_NANOS: u128 = i64::MAX as u128;
/// Fraction digits that can still matter: a tenth of a nanosecond of an hour has 13.
const MAX_FRACTION_DIGITS: usize = 18;

/// Parses a duration: a Prometheus one (one or more `<integer><unit>` with units `y w d h m s ms`
/// in decreasing order, or `0`), else a Go one (one or more `<decimal><unit>` with units
/// `h m s ms us µs ns` in any order, an optional leading `+`, or `0`). Negative durations are
/// refused: no flag means anything by them.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    parse_prometheus(text)
        .or_else(|| parse_go(text))
        .ok_or_else(|| DurationError(text.to_string()))
}

fn parse_prometheus(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    if text.is_empty() {
        return None;
    }
    let mut rest = text;
    let mut total: u64 = 0;
    // Index into UNITS of the last unit seen; the next must come strictly after it.
    let mut next_unit = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let (number, after) = rest.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(letters);
        let index = UNITS.iter().position(|(name, _)| *name == unit)?;
        if index < next_unit {
            return None;
        }
        next_unit = index + 1;
        let millis = number.checked_mul(UNITS[index].1)?;
        total = total.checked_add(millis)?;
        if total > MAX_MILLIS {
            return None;
        }
        rest = after;
    }
    Some(Duration::from_millis(total))
}

/// Go's `time.ParseDuration`, without negative values. A fraction is exact to the nanosecond
/// (truncated below it).
fn parse_go(text: &str) -> Option<Duration> {
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (whole, after) = rest.split_at(digits);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => {
                let digits = after.bytes().take_while(u8::is_ascii_digit).count();
                after.split_at(digits)
            }
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        // The unit runs to the next number (Go's rule), so `1h 30m` has the unit "h ".
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos = u128::from(GO_UNITS.iter().find(|(name, _)| *name == unit)?.1);
        // More than 20 digits overflows anyway; refusing early keeps the parse below in range.
        if whole.len() > 20 {
            return None;
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let fraction = fraction.get(..MAX_FRACTION_DIGITS).unwrap_or(fraction);
        let fraction_nanos = if fraction.is_empty() {
            0
        } else {
            let numerator: u128 = fraction.parse().ok()?;
            numerator * unit_nanos / 10u128.pow(u32::try_from(fraction.len()).ok()?)
        };
        total = total
            .checked_add(whole.checked_mul(unit_nanos)?)?
            .checked_add(fraction_nanos)?;
        if total > MAX_NANOS {
            return None;
        }
        rest = after;
    }
    Some(Duration::from_nanos(u64::try_from(total).ok()?))
}

/// Formats a duration the way [`parse`] reads it: Prometheus's canonical form (`4m30s`, `1d`,
/// `0s`) for whole milliseconds, else Go's (`1ms500us`), so nothing is lost.
pub fn format(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return format_go(d.as_nanos());
    }
    let mut millis = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (name, size) in UNITS {
        let count = millis / size;
        if count > 0 {
            out.push_str(&count.to_string());
            out.push_str(name);
            millis %= size;
        }
    }
    out
}

fn format_go(mut nanos: u128) -> String {
    let mut out = String::new();
    // "\u{b5}s" and "\u{3bc}s" are other spellings of "us": skip them.
    for (name, size) in GO_UNITS.iter().filter(|(name, _)| name.is_ascii()) {
        let size = u128::from(*size);
        let count = nanos / size;
        if count > 0 {
            out.push_str(&count.to_string());
            out.push_str(name);
            nanos %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const S: u64 = 1000;
    const M: u64 = 60 * S;
    const H: u64 = 60 * M;
    const D: u64 = 24 * H;

    #[test]
    fn parses_prometheus_durations() {
        let cases = [
            ("0", 0),
            ("0s", 0),
            ("500ms", 500),
            ("15s", 15 * S),
            ("4m30s", 4 * M + 30 * S),
            ("1h30m", H + 30 * M),
            ("24h", 24 * H),
            ("1d", D),
            ("2w", 14 * D),
            ("1y", 365 * D),
            (
                "1y2w3d4h5m6s7ms",
                365 * D + 14 * D + 3 * D + 4 * H + 5 * M + 6 * S + 7,
            ),
            ("90m", 90 * M),
            ("1s500ms", 1500),
            ("007s", 7 * S),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), Ok(ms(want)), "{text}");
        }
    }

    #[test]
    fn parses_go_durations() {
        let ns = Duration::from_nanos;
        let cases = [
            ("1.5m", ms(90 * S)),
            ("2.5s", ms(2500)),
            ("300ms", ms(300)),
            ("1h30m", ms(H + 30 * M)),
            ("0", Duration::ZERO),
            ("+0", Duration::ZERO),
            ("0.0s", Duration::ZERO),
            (".5s", ms(500)),
            ("1.s", ms(S)),
            ("+1s", ms(S)),
            ("1.5h", ms(H + 30 * M)),
            ("0.1s", ms(100)),
            // Go's units may come in any order and repeat.
            ("30m1h", ms(90 * M)),
            ("1s1s", ms(2 * S)),
            ("1ms1s", ms(1001)),
            ("1us", ns(1_000)),
            ("1\u{b5}s", ns(1_000)),
            ("1\u{3bc}s", ns(1_000)),
            ("1ns", ns(1)),
            ("1ms500us", ns(1_500_000)),
            ("0.000001ms", ns(1)),
            // Below a nanosecond is truncated, as in Go.
            ("1.0000000001s", ms(S)),
            ("1.123456789123456789123s", ns(1_123_456_789)),
            ("2562047h47m16.854775807s", ns(i64::MAX as u64)),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in [
            "", "s", "15", "-1s", "-0", "1x", "1S", "1h 30m", " 1h", "1h ", "1s 500ms", "1sms",
            "h1", ".s", ".", "1.5", "1..5s", "1.5d", "1d1us", "1e3s", "+", "++1s", "1h-1m",
            "1.5.5s", "1,5s", "1_000s",
        ] {
            assert_eq!(parse(bad), Err(DurationError(bad.to_string())), "{bad:?}");
        }
    }

    #[test]
    fn rejects_overflow() {
        assert!(parse("292y").is_ok());
        assert!(parse("293y").is_err());
        assert!(parse("99999999999999999999s").is_err());
        assert!(parse("18446744073709551615y").is_err());
        assert!(parse("292y52w").is_err());
        assert!(parse("2562047h47m16.854775808s").is_err());
        assert!(parse("2562048h").is_err());
        assert!(parse("9223372036854775808ns").is_err());
        assert!(parse(&format!("{}h", "9".repeat(40))).is_err());
    }

    #[test]
    fn error_names_the_text() {
        let e = parse("5 minutes").unwrap_err();
        assert!(e.to_string().starts_with("invalid duration \"5 minutes\":"));
    }

    #[test]
    fn formats_canonically() {
        let cases = [
            (0, "0s"),
            (1, "1ms"),
            (500, "500ms"),
            (1500, "1s500ms"),
            (15 * S, "15s"),
            (4 * M + 30 * S, "4m30s"),
            (90 * M, "1h30m"),
            (24 * H, "1d"),
            (7 * D, "1w"),
            (365 * D, "1y"),
            (366 * D + S, "1y1d1s"),
        ];
        for (millis, want) in cases {
            assert_eq!(format(ms(millis)), want, "{millis}ms");
        }
        // Finer than a millisecond: Go's units, so nothing is lost.
        assert_eq!(format(Duration::from_nanos(999_999)), "999us999ns");
        assert_eq!(format(Duration::from_nanos(1_500_000)), "1ms500us");
        assert_eq!(
            format(Duration::from_nanos(90 * 3_600_000_000_000 + 1)),
            "90h1ns"
        );
    }

    #[test]
    fn format_then_parse_round_trips() {
        for millis in [1, 999, 1000, 61_001, 3_600_000, 86_399_999, 31_536_000_123] {
            assert_eq!(parse(&format(ms(millis))), Ok(ms(millis)), "{millis}");
        }
        for nanos in [1, 999, 1_000_001, 86_400_000_000_001, i64::MAX as u64] {
            let d = Duration::from_nanos(nanos);
            assert_eq!(parse(&format(d)), Ok(d), "{nanos}ns");
        }
    }
}
