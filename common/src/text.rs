//! The Prometheus text exposition format, version 0.0.4: parser and encoder.
//!
//! The parser groups `_bucket`/`_sum`/`_count` and quantile lines into histogram and summary
//! series the way the Go `expfmt` parser does, so a text body and the protobuf body of the same
//! metrics decode to the same families.

use crate::model::MetricFamily;
use std::fmt;
use std::io::{self, Write};

/// Caps on what one parsed body may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most families.
    pub max_families: usize,
    /// Most series over all families.
    pub max_series: usize,
    /// Longest line, in bytes.
    pub max_line_bytes: usize,
}

impl Default for Limits {
    /// 10,000 families, 100,000 series, 64 KiB lines.
    fn default() -> Self {
        Limits {
            max_families: 10_000,
            max_series: 100_000,
            max_line_bytes: 64 << 10,
        }
    }
}

/// Why a text body could not be parsed: the 1-based line and what was wrong there.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// The 1-based line number (0 for errors about the whole body).
    pub line: usize,
    /// What was wrong, in a few words.
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl std::error::Error for ParseError {}

/// Parses a text exposition body into families, enforcing `limits`. The body must be UTF-8.
pub fn parse(body: &[u8], limits: &Limits) -> Result<Vec<MetricFamily>, ParseError> {
    todo!()
}

/// Writes one family in text format: `# HELP` (when there is help text), `# TYPE`, then one line per
/// sample. With `timestamps` false, sample timestamps are left out.
pub fn write_family<W: Write>(
    w: &mut W,
    family: &MetricFamily,
    timestamps: bool,
) -> io::Result<()> {
    todo!()
}

/// Writes all `families` in text format (see [`write_family`]).
pub fn encode<W: Write>(w: &mut W, families: &[MetricFamily], timestamps: bool) -> io::Result<()> {
    for family in families {
        write_family(w, family, timestamps)?;
    }
    Ok(())
}
