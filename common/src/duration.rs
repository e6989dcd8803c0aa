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

/// Parses a Prometheus duration: one or more `<integer><unit>` with units `y w d h m s ms` in
/// decreasing order, or `0`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    todo!()
}

/// Formats a duration the way [`parse`] reads it (`4m30s`, `0s`).
pub fn format(d: Duration) -> String {
    todo!()
}
