//! One full `GET /federate`, read as it streams: series lines and bytes counted, never kept. With
//! gzip (as Prometheus always asks), the body is decompressed as it arrives: the bytes counted are
//! those on the wire, the series those in the decompressed text.

use std::io::Write;
use std::time::{Duration, Instant};

use flate2::write::GzDecoder;

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
        let starts_skipped = |prev: u8, b: u8| prev == b'\n' && (b == b'#' || b == b'\n');
        self.skipped += u64::from(starts_skipped(self.last, first));
        let (lines, skipped) = count_lines(piece);
        self.lines += lines;
        self.skipped += skipped;
        self.last = piece[piece.len() - 1];
        self.open_line = self.last != b'\n';
    }

    /// Series lines seen (a last line without its newline included).
    pub fn series(&self) -> u64 {
        self.lines + u64::from(self.open_line) - self.skipped
    }
}

/// The newlines of `piece`, and how many of them are followed (within `piece`) by `#` or another
/// newline. One pass, branch-free, in blocks whose sums fit a `u32`, so it vectorizes: the reader
/// must cost far less than the server it measures (these bodies run to hundreds of MB, and the
/// bench shares two cores with the server). A pair-wise `filter().count()` did not vectorize and
/// took most of a core at the server's speed.
fn count_lines(piece: &[u8]) -> (u64, u64) {
    let Some((&last, rest)) = piece.split_last() else {
        return (0, 0);
    };
    let (mut lines, mut skipped) = (u64::from(last == b'\n'), 0u64);
    let (prevs, nexts) = (rest, &piece[1..]);
    for (prevs, nexts) in prevs.chunks(1 << 16).zip(nexts.chunks(1 << 16)) {
        let (mut l, mut s) = (0u32, 0u32);
        for (&prev, &next) in prevs.iter().zip(nexts) {
            let newline = u32::from(prev == b'\n');
            l += newline;
            s += newline & (u32::from(next == b'#') | u32::from(next == b'\n'));
        }
        lines += u64::from(l);
        skipped += u64::from(s);
    }
    (lines, skipped)
}

/// Feeds what is written to it (the decompressed body) to a [`LineCounter`].
struct Counting<'a>(&'a mut LineCounter);

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// GETs `path` under `target` once (asking for gzip when `gzip`) and reports series, bytes on
/// the wire (and, with gzip, decompressed), time and rates.
pub fn run(target: &Target, path: &str, timeout: Duration, gzip: bool) -> Result<Report, Error> {
    let mut conn = Connection::new(target.clone(), timeout);
    let mut headers = vec![("Accept", "text/plain;version=0.0.4".to_string())];
    if gzip {
        headers.push(("Accept-Encoding", "gzip".to_string()));
    }
    let request = Request {
        method: "GET",
        path: target.path(path),
        headers,
        body: Vec::new(),
    };
    let mut plain = LineCounter::default();
    let mut unzipped = LineCounter::default();
    let mut wire_bytes = 0u64;
    let mut gunzip_error: Option<String> = None;
    let mut first_byte: Option<Duration> = None;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let status = {
        let mut decoder = gzip.then(|| GzDecoder::new(Counting(&mut unzipped)));
        let status = conn.send_streaming(&request, &mut |piece| {
            if first_byte.is_none() {
                first_byte = Some(started.elapsed());
            }
            wire_bytes += piece.len() as u64;
            match decoder.as_mut() {
                Some(decoder) => {
                    if let Err(e) = decoder.write_all(piece) {
                        gunzip_error.get_or_insert_with(|| e.to_string());
                    }
                }
                None => plain.feed(piece),
            }
        })?;
        if let Some(decoder) = decoder {
            if let Err(e) = decoder.finish() {
                gunzip_error.get_or_insert_with(|| e.to_string());
            }
        }
        status
    };
    let counter = if gzip { unzipped } else { plain };
    if let Some(e) = gunzip_error {
        return Err(Error::Protocol(format!(
            "the gzip body does not decompress: {e}"
        )));
    }
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    let mut report = Report::new();
    report
        .int("status", u64::from(status))
        .int("gzip", u64::from(gzip))
        .int("series", counter.series())
        .int("bytes", wire_bytes)
        .int("text_bytes", counter.bytes)
        .float("seconds", wall, 3)
        .float(
            "first_byte_ms",
            first_byte.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
            1,
        )
        .float("series_per_s", counter.series() as f64 / wall, 0)
        .float("bytes_per_s", wire_bytes as f64 / wall, 0)
        .float("loadgen_cpu_s", cpu_seconds() - cpu_before, 2);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gzip_body_is_counted_decompressed_across_any_split() {
        let body = b"# HELP a x\n# TYPE a gauge\na{x=\"#\"} 1\na 2\n\nb 3\n#c\nd 4\n".repeat(50);
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&body).unwrap();
        let zipped = encoder.finish().unwrap();
        for split in [1, 7, zipped.len() / 2, zipped.len() - 1] {
            let mut counter = LineCounter::default();
            let mut decoder = GzDecoder::new(Counting(&mut counter));
            decoder.write_all(&zipped[..split]).unwrap();
            decoder.write_all(&zipped[split..]).unwrap();
            decoder.finish().unwrap();
            assert_eq!(counter.series(), 200, "split at {split}");
            assert_eq!(counter.bytes, body.len() as u64);
        }
    }

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

    #[test]
    fn counts_as_the_pairwise_rule_over_block_boundaries() {
        // Lines of every kind, long enough to cross the 64 KiB blocks at many offsets.
        let body: Vec<u8> = (0..40_000u32)
            .flat_map(|i| match i % 5 {
                0 => b"# TYPE a gauge\n".to_vec(),
                1 => b"\n".to_vec(),
                2 => format!("a{{x=\"#{i}\"}} {i}\n").into_bytes(),
                _ => format!("b_{i} 1\n").into_bytes(),
            })
            .collect();
        assert!(body.len() > 3 << 16);
        let naive = |piece: &[u8]| {
            let lines = piece.iter().filter(|&&b| b == b'\n').count() as u64;
            let skipped = piece
                .windows(2)
                .filter(|w| w[0] == b'\n' && (w[1] == b'#' || w[1] == b'\n'))
                .count() as u64;
            (lines, skipped)
        };
        for start in [0, 1, 9, 65_535, 65_536, 100_000] {
            let piece = &body[start..];
            assert_eq!(count_lines(piece), naive(piece), "from {start}");
        }
        assert_eq!(count_lines(b""), (0, 0));
        assert_eq!(count_lines(b"\n"), (1, 0));
    }
}
