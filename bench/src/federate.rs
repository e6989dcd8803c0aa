//! One full `GET /federate`, read as it streams: series lines and bytes counted, never kept.

use std::time::{Duration, Instant};

use crate::http::{Connection, Error, Request, Target};
use crate::report::{cpu_seconds, Report};

/// Counts the series (sample) lines of text exposition as it arrives in pieces: lines that are
/// neither empty nor comments.
#[derive(Clone, Debug)]
pub struct LineCounter {
    /// Bytes seen.
    pub bytes: u64,
    lines: u64,
    skipped: u64,
    /// The last byte of the previous piece (`\n` before the first).
    last: u8,
    /// Whether the last piece ended inside a line.
    open_line: bool,
}

impl Default for LineCounter {
    fn default() -> Self {
        LineCounter {
            bytes: 0,
            lines: 0,
            skipped: 0,
            last: b'\n',
            open_line: false,
        }
    }
}

impl LineCounter {
    /// Takes the next piece of the body.
    pub fn feed(&mut self, piece: &[u8]) {
        let Some(&first) = piece.first() else {
            return;
        };
        self.bytes += piece.len() as u64;
        // Written as whole-slice counts so they vectorize: these bodies run to hundreds of MB.
        self.lines += piece.iter().filter(|&&b| b == b'\n').count() as u64;
        let starts_skipped = |prev: u8, b: u8| prev == b'\n' && (b == b'#' || b == b'\n');
        self.skipped += u64::from(starts_skipped(self.last, first));
        self.skipped += piece
            .iter()
            .zip(&piece[1..])
            .filter(|&(&prev, &b)| starts_skipped(prev, b))
            .count() as u64;
        self.last = piece[piece.len() - 1];
        self.open_line = self.last != b'\n';
    }

    /// Series lines seen (a last line without its newline included).
    pub fn series(&self) -> u64 {
        self.lines + u64::from(self.open_line) - self.skipped
    }
}

/// GETs `path` under `target` once and reports series, bytes, time and rates.
pub fn run(target: &Target, path: &str, timeout: Duration) -> Result<Report, Error> {
    let mut conn = Connection::new(target.clone(), timeout);
    let request = Request {
        method: "GET",
        path: target.path(path),
        headers: vec![("Accept", "text/plain;version=0.0.4".to_string())],
        body: Vec::new(),
    };
    let mut counter = LineCounter::default();
    let mut first_byte: Option<Duration> = None;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let status = conn.send_streaming(&request, &mut |piece| {
        if first_byte.is_none() {
            first_byte = Some(started.elapsed());
        }
        counter.feed(piece);
    })?;
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    let mut report = Report::new();
    report
        .int("status", u64::from(status))
        .int("series", counter.series())
        .int("bytes", counter.bytes)
        .float("seconds", wall, 3)
        .float(
            "first_byte_ms",
            first_byte.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
            1,
        )
        .float("series_per_s", counter.series() as f64 / wall, 0)
        .float("bytes_per_s", counter.bytes as f64 / wall, 0)
        .float("loadgen_cpu_s", cpu_seconds() - cpu_before, 2);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_series_lines_across_any_split() {
        let body = b"# HELP a x\n# TYPE a gauge\na{x=\"#\"} 1\na 2\n\nb 3\n#c\nd 4";
        for split in 0..body.len() {
            let mut c = LineCounter::default();
            c.feed(&body[..split]);
            c.feed(&body[split..]);
            assert_eq!(c.series(), 4, "split at {split}");
            assert_eq!(c.bytes, body.len() as u64);
        }
    }
}
