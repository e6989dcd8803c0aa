//! Durations written as Prometheus writes them: `15s`, `4m30s`, `24h`, `1d`, `500ms`.

use std::fmt;
use std::time::Duration;

/// Why a duration could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError(pub String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid duration {:?}: expected a number and a unit (ms, s, m, h, d, w, y), as in 15s or 4m30s", self.0)
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

/// Prometheus keeps durations as int64 nanoseconds; refusing more keeps both sides agreeing on
/// which durations exist (about 292 years).
const MAX_MILLIS: u64 = i64::MAX as u64 / 1_000_000;

/// Parses a Prometheus duration: one or more `<integer><unit>` with units `y w d h m s ms` in
/// decreasing order, or `0`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(text.to_string());
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(err());
    }
    let mut rest = text;
    let mut total: u64 = 0;
    // Index into UNITS of the last unit seen; the next must come strictly after it.
    let mut next_unit = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let (number, after) = rest.split_at(digits);
        let number: u64 = number.parse().map_err(|_| err())?;
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(letters);
        let index = UNITS
            .iter()
            .position(|(name, _)| *name == unit)
            .ok_or_else(err)?;
        if index < next_unit {
            return Err(err());
        }
        next_unit = index + 1;
        let millis = number.checked_mul(UNITS[index].1).ok_or_else(err)?;
        total = total.checked_add(millis).ok_or_else(err)?;
        if total > MAX_MILLIS {
            return Err(err());
        }
        rest = after;
    }
    Ok(Duration::from_millis(total))
}

/// Formats a duration the way [`parse`] reads it (`4m30s`, `0s`).
pub fn format(d: Duration) -> String {
    // Durations finer than a millisecond are not expressible; they are truncated.
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
    fn rejects_bad_durations() {
        for bad in [
            "", "s", "15", "-1s", "+1s", "1.5s", "1x", "1S", "1h 30m", " 1h", "1h ", "30m1h",
            "1s1s", "1m1m", "1ms1s", "1s 500ms", "1sms", "1µs", "1ns", "1us", "h1",
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
        assert_eq!(format(Duration::from_nanos(999_999)), "0s");
        assert_eq!(format(Duration::from_nanos(1_500_000)), "1ms");
    }

    #[test]
    fn format_then_parse_round_trips() {
        for millis in [1, 999, 1000, 61_001, 3_600_000, 86_399_999, 31_536_000_123] {
            assert_eq!(parse(&format(ms(millis))), Ok(ms(millis)), "{millis}");
        }
    }
}
