//! A remote-write receiver that keeps nothing: it reads each request's whole body, checks that it
//! is a snappy block holding a well-formed `prometheus.WriteRequest` (every series with sorted,
//! non-empty label names including `__name__`, and at least one sample), counts it and answers
//! 204, or 400 with the reason. It isolates our egress capacity from a real receiver's, whose
//! storage costs more CPU per sample than our shipping does; the check keeps the figure honest
//! (garbage is refused, and a refused request counts as rejected on the server).
//!
//! `GET /stats` answers one line of `key=value` figures: requests, samples, bytes, refused, and
//! the sink's own CPU seconds.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use telemeter_common::snappy::{decode_block_into, SnappyError};

use crate::report::{cpu_seconds, Report};

/// Largest request head read (request line and headers).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest request body read (a request of 50,000 series is ~5 MB compressed at worst).
const MAX_BODY_BYTES: usize = 64 << 20;
/// Largest decompressed request.
const MAX_DECOMPRESSED_BYTES: usize = 256 << 20;
/// Connections served at once (the server opens one per shard).
const MAX_CONNECTIONS: usize = 64;
/// A connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the sink has taken so far.
#[derive(Default)]
pub struct Stats {
    requests: AtomicU64,
    series: AtomicU64,
    samples: AtomicU64,
    body_bytes: AtomicU64,
    refused: AtomicU64,
    connections: AtomicUsize,
}

impl Stats {
    /// One line of `key=value` figures.
    pub fn line(&self) -> String {
        let mut r = Report::new();
        r.int("requests", self.requests.load(Ordering::Relaxed))
            .int("series", self.series.load(Ordering::Relaxed))
            .int("samples", self.samples.load(Ordering::Relaxed))
            .int("body_bytes", self.body_bytes.load(Ordering::Relaxed))
            .int("refused", self.refused.load(Ordering::Relaxed))
            .float("cpu_s", cpu_seconds(), 3);
        r.to_string()
    }
}

/// Why a request body is not a remote-write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Not a snappy block, or one that decompresses past the cap.
    Snappy(SnappyError),
    /// A snappy block whose bytes are not a well-formed `WriteRequest`.
    Malformed(Malformed),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Snappy(e) => write!(f, "snappy: {e}"),
            Invalid::Malformed(why) => f.write_str(why.reason()),
        }
    }
}

/// Why a decompressed body is not a well-formed `WriteRequest`: a byte, where a `String` reason
/// made every field's `Result` three words wide on the walk's hottest path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A varint cut short by the end of its message.
    TruncatedVarint,
    /// A varint of more than 10 bytes.
    LongVarint,
    /// A field's length or fixed width passes the end of its message.
    PastMessage,
    /// Wire type 3, 4, 6 or 7 (groups and reserved).
    WireType,
    /// A field numbered 0.
    FieldZero,
    /// A `WriteRequest.timeseries` that is not a message.
    SeriesNotDelimited,
    /// A `TimeSeries.labels` or `.samples` that is not a message.
    LabelOrSampleNotDelimited,
    /// A sample's value not a fixed64, or its timestamp not a varint.
    SampleWrongType,
    /// A label's name or value not length-delimited.
    LabelWrongType,
    /// A label's name or value not UTF-8.
    LabelNotUtf8,
    /// A label without a name.
    EmptyLabelName,
    /// A label without a value (Prometheus drops such labels; a writer should not send them).
    EmptyLabelValue,
    /// A series whose label names are not strictly increasing.
    LabelsNotSorted,
    /// A series without a `__name__` label.
    SeriesWithoutName,
    /// A series without samples.
    SeriesWithoutSamples,
}

impl Malformed {
    /// What a 400 answer says.
    pub fn reason(self) -> &'static str {
        match self {
            Malformed::TruncatedVarint => "truncated varint",
            Malformed::LongVarint => "varint longer than 10 bytes",
            Malformed::PastMessage => "field runs past its message",
            Malformed::WireType => "unsupported wire type",
            Malformed::FieldZero => "field number 0",
            Malformed::SeriesNotDelimited => "timeseries is not length-delimited",
            Malformed::LabelOrSampleNotDelimited => "label or sample is not length-delimited",
            Malformed::SampleWrongType => "sample field of the wrong type",
            Malformed::LabelWrongType => "label field of the wrong type",
            Malformed::LabelNotUtf8 => "label not UTF-8",
            Malformed::EmptyLabelName => "empty label name",
            Malformed::EmptyLabelValue => "empty label value",
            Malformed::LabelsNotSorted => "labels not sorted by name, or repeated",
            Malformed::SeriesWithoutName => "series without __name__",
            Malformed::SeriesWithoutSamples => "series without samples",
        }
    }
}

/// Reads protobuf wire fields from a byte slice, borrowing.
struct Fields<'a> {
    bytes: &'a [u8],
}

/// One field's value.
enum Value<'a> {
    Varint,
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32,
}

impl<'a> Fields<'a> {
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, Malformed> {
        // Keys, and the lengths of labels and samples, are one byte; a series' length is two.
        match *self.bytes {
            [b, ref rest @ ..] if b < 0x80 => {
                self.bytes = rest;
                Ok(u64::from(b))
            }
            [b0, b1, ref rest @ ..] if b1 < 0x80 => {
                self.bytes = rest;
                Ok(u64::from(b0 & 0x7f) | u64::from(b1) << 7)
            }
            _ => self.long_varint(),
        }
    }

    /// A varint of three bytes or more, or a truncated one: never in a well-formed request
    /// of ours, so kept out of line.
    #[inline(never)]
    fn long_varint(&mut self) -> Result<u64, Malformed> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.bytes.split_first().ok_or(Malformed::TruncatedVarint)?;
            self.bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(Malformed::LongVarint)
    }

    #[inline(always)]
    fn take(&mut self, n: u64) -> Result<&'a [u8], Malformed> {
        match usize::try_from(n) {
            Ok(n) if n <= self.bytes.len() => {
                let (head, rest) = self.bytes.split_at(n);
                self.bytes = rest;
                Ok(head)
            }
            _ => Err(Malformed::PastMessage),
        }
    }

    /// The next field if it is field 1 or 2 of wire type 2 (a key of one byte) with a length of
    /// one or two bytes, as every series, label and sample is; None for anything else, which
    /// [`Fields::next_field`] reads. Its jump on the wire type was a fifth of the walk's time,
    /// mispredicted as labels and samples alternate.
    #[inline(always)]
    fn delimited(&mut self) -> Option<(u64, &'a [u8])> {
        let (key, len, rest) = match *self.bytes {
            [key @ (0x0a | 0x12), n, ref rest @ ..] if n < 0x80 => (key, usize::from(n), rest),
            [key @ (0x0a | 0x12), n0, n1, ref rest @ ..] if n0 >= 0x80 && n1 < 0x80 => {
                (key, usize::from(n0 & 0x7f) | usize::from(n1) << 7, rest)
            }
            _ => return None,
        };
        if len > rest.len() {
            return None;
        }
        let (head, rest) = rest.split_at(len);
        self.bytes = rest;
        Some((u64::from(key >> 3), head))
    }

    /// The next field number and value, or None at the end. A field [`Fields::delimited`]
    /// reads is taken from it: the same field, without the jump on the wire type.
    #[inline(always)]
    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, Malformed> {
        if let Some((number, field)) = self.delimited() {
            return Ok(Some((number, Value::Bytes(field))));
        }
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => {
                self.varint()?;
                Value::Varint
            }
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = self.varint()?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed32
            }
            _ => return Err(Malformed::WireType),
        };
        if key >> 3 == 0 {
            return Err(Malformed::FieldZero);
        }
        Ok(Some((key >> 3, value)))
    }
}

/// Checks a decompressed `WriteRequest`: returns its series and samples.
pub fn check_write_request(bytes: &[u8]) -> Result<(u64, u64), Invalid> {
    walk_write_request(bytes).map_err(Invalid::Malformed)
}

fn walk_write_request(bytes: &[u8]) -> Result<(u64, u64), Malformed> {
    let (mut series, mut samples) = (0u64, 0u64);
    let mut request = Fields { bytes };
    while let Some((number, value)) = request.next_field()? {
        match (number, value) {
            (1, Value::Bytes(entry)) => {
                samples += check_series(entry)?;
                series += 1;
            }
            (1, _) => return Err(Malformed::SeriesNotDelimited),
            // Metadata and anything newer: skipped, as a receiver does.
            _ => {}
        }
    }
    Ok((series, samples))
}

/// Checks one `TimeSeries`: returns its samples. A well-formed series of the usual shape is
/// read by [`plain_series`]; any other by the walk below, where labels and samples of the usual
/// shape are read by [`plain_label`] and [`plain_sample`], a few comparisons each, and any other
/// shape by the general walk ([`check_label`], [`check_sample`]), which decides exactly as the
/// sink always has (the tests compare the two on damaged requests).
#[inline(always)]
fn check_series(bytes: &[u8]) -> Result<u64, Malformed> {
    if let Some(samples) = plain_series(bytes) {
        return Ok(samples);
    }
    let mut fields = Fields { bytes };
    let mut previous: &[u8] = b"";
    let (mut has_name, mut samples) = (false, 0u64);
    while let Some((number, value)) = fields.next_field()? {
        match (number, value) {
            (1, Value::Bytes(label)) => {
                // An ASCII label's name and value are UTF-8 without `from_utf8`'s per-call cost,
                // a third of the walk's time when called twice a label.
                let (name, value) = match plain_label(label) {
                    Some((name, value)) if label.is_ascii() => (name, value),
                    _ => check_label(label)?,
                };
                if name.is_empty() {
                    return Err(Malformed::EmptyLabelName);
                }
                if value.is_empty() {
                    return Err(Malformed::EmptyLabelValue);
                }
                if !sorts_before(previous, name) {
                    return Err(Malformed::LabelsNotSorted);
                }
                has_name |= is_metric_name(name);
                previous = name;
            }
            (2, Value::Bytes(sample)) => {
                if !plain_sample(sample) {
                    check_sample(sample)?;
                }
                samples += 1;
            }
            (1 | 2, _) => return Err(Malformed::LabelOrSampleNotDelimited),
            _ => {}
        }
    }
    if !has_name {
        return Err(Malformed::SeriesWithoutName);
    }
    if samples == 0 {
        return Err(Malformed::SeriesWithoutSamples);
    }
    Ok(samples)
}

/// The samples of a well-formed series of the shape every writer gives it: plain labels, then
/// plain samples, every length one byte, all its labels ASCII. None for anything else, valid or
/// not, which the general walk decides. One ASCII check over all the labels, where one a label
/// cost a tenth of the walk.
#[inline(always)]
fn plain_series(bytes: &[u8]) -> Option<u64> {
    let mut rest = bytes;
    let mut previous: &[u8] = b"";
    let mut has_name = false;
    // A field that does not read so ends the loop and is left in `rest`: not a plain series.
    while let Some((label, tail)) = short_field(rest, 0x0a) {
        let (name, value) = plain_label(label)?;
        // An empty name sorts after nothing, not even the empty `previous` of the first label.
        if value.is_empty() || !sorts_before(previous, name) {
            return None;
        }
        has_name |= is_metric_name(name);
        previous = name;
        rest = tail;
    }
    let labels = bytes.get(..bytes.len() - rest.len())?;
    if !has_name || !labels.is_ascii() {
        return None;
    }
    let mut samples = 0;
    while let Some((sample, tail)) = short_field(rest, 0x12) {
        if !plain_sample(sample) {
            return None;
        }
        samples += 1;
        rest = tail;
    }
    if !rest.is_empty() || samples == 0 {
        return None;
    }
    Some(samples)
}

/// Whether a label's name is `__name__`: one 8-byte comparison, where `==` on slices called
/// `memcmp`.
#[inline(always)]
fn is_metric_name(name: &[u8]) -> bool {
    name.len() == 8 && name.first_chunk::<8>() == Some(b"__name__")
}

/// `previous < name`, with an empty `previous` before any name. Label names are short: a loop
/// over their bytes, where `<` on slices called `memcmp` for every label (8 % of the walk).
#[inline(always)]
fn sorts_before(previous: &[u8], name: &[u8]) -> bool {
    for (p, n) in previous.iter().zip(name) {
        if p != n {
            return p < n;
        }
    }
    previous.len() < name.len()
}

/// A `Label` as every writer writes it: its name (field 1) then its value (field 2), each
/// shorter than 128 bytes, nothing else. None for any other shape, which [`check_label`] reads.
#[inline(always)]
fn plain_label(label: &[u8]) -> Option<(&[u8], &[u8])> {
    let (name, rest) = short_field(label, 0x0a)?;
    match short_field(rest, 0x12)? {
        (value, []) => Some((name, value)),
        _ => None,
    }
}

/// The field of `key` (one byte) that `bytes` starts with, when its length is one byte (under
/// 128) and within `bytes`: its bytes, and what follows it. None otherwise.
#[inline(always)]
fn short_field(bytes: &[u8], key: u8) -> Option<(&[u8], &[u8])> {
    match *bytes {
        [k, n, ref rest @ ..] if k == key && n < 0x80 && usize::from(n) <= rest.len() => {
            Some(rest.split_at(usize::from(n)))
        }
        _ => None,
    }
}

/// A `Sample` as every writer writes it: its value (field 1, 8 bytes) then its timestamp
/// (field 2, a varint), nothing else. False for any other shape, which [`check_sample`] reads.
#[inline(always)]
fn plain_sample(sample: &[u8]) -> bool {
    let [0x09, _, _, _, _, _, _, _, _, 0x10, ref timestamp @ ..] = *sample else {
        return false;
    };
    // One varint filling the rest: every byte but its last continues it, and it is no longer
    // than 10 bytes. Read as a varint, a timestamp of milliseconds (6 bytes) left the inlined
    // path: 4 % of the walk.
    match timestamp.split_last() {
        Some((&last, init)) => last < 0x80 && init.len() < 10 && init.iter().all(|&b| b >= 0x80),
        None => false,
    }
}

/// Checks a `Sample` of any shape: its value a fixed64 and its timestamp a varint where present.
#[inline(never)]
fn check_sample(sample: &[u8]) -> Result<(), Malformed> {
    let mut sample = Fields { bytes: sample };
    while let Some((number, value)) = sample.next_field()? {
        match (number, value) {
            (1, Value::Fixed64) | (2, Value::Varint) => {}
            (1 | 2, _) => return Err(Malformed::SampleWrongType),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a `Label` of any shape: its name and value, UTF-8.
#[inline(never)]
fn check_label(bytes: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
    let mut fields = Fields { bytes };
    let (mut name, mut value): (&[u8], &[u8]) = (b"", b"");
    while let Some((number, field)) = fields.next_field()? {
        match (number, field) {
            (1, Value::Bytes(b)) => name = b,
            (2, Value::Bytes(b)) => value = b,
            (1 | 2, _) => return Err(Malformed::LabelWrongType),
            _ => {}
        }
    }
    if std::str::from_utf8(name).is_err() || std::str::from_utf8(value).is_err() {
        return Err(Malformed::LabelNotUtf8);
    }
    Ok((name, value))
}

/// Checks one request body (snappy block + `WriteRequest`), decompressing it into
/// `decompressed` (a connection's buffer, used again for its next request): returns its series
/// and samples.
pub fn check_body(body: &[u8], decompressed: &mut Vec<u8>) -> Result<(u64, u64), Invalid> {
    decode_block_into(body, MAX_DECOMPRESSED_BYTES, decompressed).map_err(Invalid::Snappy)?;
    check_write_request(decompressed)
}

/// Serves `listener` until `deadline`: one thread per connection (at most `MAX_CONNECTIONS`).
pub fn serve(listener: TcpListener, stats: Arc<Stats>, deadline: Instant) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) => {
                if stats.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    continue;
                }
                stats.connections.fetch_add(1, Ordering::Relaxed);
                let served = stats.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("sink-conn".into())
                        .spawn(move || {
                            let _ = connection(stream, &served, deadline);
                            served.connections.fetch_sub(1, Ordering::Relaxed);
                        });
                if spawned.is_err() {
                    stats.connections.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn reply(out: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())
}

/// One keep-alive connection: requests until the peer closes, an error, or the deadline.
fn connection(stream: TcpStream, stats: &Stats, deadline: Instant) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let mut out = stream.try_clone()?;
    let mut input = BufReader::with_capacity(64 * 1024, stream);
    let mut body = Vec::new();
    let mut decompressed = Vec::new();
    let mut line = String::new();
    while Instant::now() < deadline {
        // Request line.
        line.clear();
        let mut head_bytes = 0;
        if input
            .by_ref()
            .take(MAX_HEAD_BYTES as u64)
            .read_line(&mut line)?
            == 0
        {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut content_length: Option<usize> = None;
        let mut chunked = false;
        loop {
            line.clear();
            let n = input
                .by_ref()
                .take(MAX_HEAD_BYTES as u64)
                .read_line(&mut line)?;
            head_bytes += n;
            if n == 0 || head_bytes > MAX_HEAD_BYTES {
                return reply(
                    &mut out,
                    "431 Request Header Fields Too Large",
                    "head too large\n",
                );
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = !value.eq_ignore_ascii_case("identity");
                }
            }
        }
        match (method.as_str(), path.as_str()) {
            ("GET", "/stats") => reply(&mut out, "200 OK", &(stats.line() + "\n"))?,
            ("POST", _) => {
                let Some(len) = content_length.filter(|_| !chunked) else {
                    return reply(&mut out, "411 Length Required", "need Content-Length\n");
                };
                if len > MAX_BODY_BYTES {
                    return reply(&mut out, "413 Payload Too Large", "body too large\n");
                }
                body.resize(len, 0);
                input.read_exact(&mut body)?;
                stats.requests.fetch_add(1, Ordering::Relaxed);
                stats.body_bytes.fetch_add(len as u64, Ordering::Relaxed);
                match check_body(&body, &mut decompressed) {
                    Ok((series, samples)) => {
                        stats.series.fetch_add(series, Ordering::Relaxed);
                        stats.samples.fetch_add(samples, Ordering::Relaxed);
                        out.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")?;
                    }
                    Err(why) => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        reply(&mut out, "400 Bad Request", &format!("{why}\n"))?;
                    }
                }
            }
            _ => reply(&mut out, "404 Not Found", "POST a remote-write request\n")?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use telemeter_server::remote_write::convert::to_series;
    use telemeter_server::remote_write::proto::{Label, Sample, TimeSeries, WriteRequest};

    fn request() -> Vec<u8> {
        let families = crate::payload::families("sink-test", 1_700_000_000_000);
        WriteRequest {
            timeseries: to_series(&families, 0),
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_the_series_and_samples_prost_wrote() {
        let bytes = request();
        let want = WriteRequest::decode(bytes.as_slice())
            .unwrap()
            .timeseries
            .len() as u64;
        assert_eq!(want, crate::payload::SAMPLES_PER_UPLOAD as u64);
        assert_eq!(check_write_request(&bytes), Ok((want, want)));
        let body = telemeter_common::snappy::encode_block(&bytes);
        let mut decompressed = Vec::new();
        assert_eq!(check_body(&body, &mut decompressed), Ok((want, want)));
        // The buffer is used again: a shorter request after a longer one, then the longer one.
        let short = telemeter_common::snappy::encode_block(&bytes[..bytes.len() / 2]);
        assert!(check_body(&short, &mut decompressed).is_err());
        assert_eq!(check_body(&body, &mut decompressed), Ok((want, want)));
    }

    #[test]
    fn refuses_what_a_receiver_would_not_take() {
        let bytes = request();
        // Truncated anywhere inside: never accepted as a whole request.
        assert!(check_write_request(&bytes[..bytes.len() - 3]).is_err());
        // Not snappy, or snappy of garbage.
        let mut decompressed = Vec::new();
        assert!(matches!(
            check_body(&bytes, &mut decompressed),
            Err(Invalid::Snappy(_))
        ));
        let garbage = telemeter_common::snappy::encode_block(&[0xff; 64]);
        assert!(matches!(
            check_body(&garbage, &mut decompressed),
            Err(Invalid::Malformed(_))
        ));
        let series = |labels: &[(&str, &str)], samples: usize| {
            WriteRequest {
                timeseries: vec![TimeSeries {
                    labels: labels
                        .iter()
                        .map(|(n, v)| Label {
                            name: n.to_string(),
                            value: v.to_string(),
                        })
                        .collect(),
                    samples: vec![
                        Sample {
                            value: 1.0,
                            timestamp: 5
                        };
                        samples
                    ],
                }],
            }
            .encode_to_vec()
        };
        assert_eq!(
            check_write_request(&series(&[("__name__", "up"), ("a", "b")], 2)),
            Ok((1, 2))
        );
        for (bad, why) in [
            (
                series(&[("a", "b"), ("__name__", "up")], 1),
                Malformed::LabelsNotSorted,
            ),
            (
                series(&[("__name__", "up"), ("a", "b"), ("a", "c")], 1),
                Malformed::LabelsNotSorted,
            ),
            (series(&[("a", "b")], 1), Malformed::SeriesWithoutName),
            (
                series(&[("__name__", "up")], 0),
                Malformed::SeriesWithoutSamples,
            ),
            (
                series(&[("__name__", "up"), ("a", "")], 1),
                Malformed::EmptyLabelValue,
            ),
            (
                series(&[("", "x"), ("__name__", "up")], 1),
                Malformed::EmptyLabelName,
            ),
        ] {
            assert_eq!(check_write_request(&bad), Err(Invalid::Malformed(why)));
        }
    }

    /// Appends a length-delimited field: its key, its length as a varint, its bytes.
    fn put_delimited(out: &mut Vec<u8>, key: u8, field: &[u8]) {
        out.push(key);
        let mut len = field.len();
        while len >= 0x80 {
            out.push(len as u8 | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(field);
    }

    /// One series as raw wire bytes: labels (name, value) and samples, each an encoded message.
    fn raw_series(labels: &[&[u8]], samples: &[&[u8]]) -> Vec<u8> {
        let mut entry = Vec::new();
        for (key, fields) in [(0x0a, labels), (0x12, samples)] {
            for field in fields {
                put_delimited(&mut entry, key, field);
            }
        }
        let mut request = Vec::new();
        put_delimited(&mut request, 0x0a, &entry);
        request
    }

    /// A sample of value 1.0 at a timestamp of `varint`'s bytes.
    fn sample_at(varint: &[u8]) -> Vec<u8> {
        [&SAMPLE[..10], varint].concat()
    }

    /// A sample of value 1.0 at timestamp 5, as prost writes it.
    const SAMPLE: &[u8] = b"\x09\x00\x00\x00\x00\x00\x00\xf0\x3f\x10\x05";

    #[test]
    fn reads_labels_and_samples_of_every_shape() {
        let name: &[u8] = b"\x0a\x08__name__\x12\x02up";
        // A timestamp in milliseconds (6 bytes), the longest varint (10), and a value of 130
        // bytes (a label of two length bytes in a series of two).
        let (now, longest) = (
            sample_at(b"\x80\xa0\xa7\xc0\xbc\x31"),
            sample_at(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"),
        );
        let long_value = [b"\x0a\x01a\x12\x82\x01".as_slice(), &[b'v'; 130]].concat();
        // Plain shapes and the others: fields reversed or repeated, unknown fields, a value of
        // 0.0 or a timestamp of 0 left out (as prost does), a two-byte timestamp.
        for (labels, samples) in [
            (vec![name], vec![SAMPLE]),
            (vec![b"\x12\x02up\x0a\x08__name__".as_slice()], vec![SAMPLE]),
            (
                vec![b"\x0a\x01x\x0a\x08__name__\x12\x02up".as_slice()],
                vec![SAMPLE],
            ),
            (
                vec![b"\x0a\x08__name__\x12\x02up\x18\x07".as_slice()],
                vec![SAMPLE],
            ),
            (vec![name], vec![b"\x10\x05".as_slice()]),
            (
                vec![name],
                vec![b"\x09\x00\x00\x00\x00\x00\x00\xf0\x3f".as_slice()],
            ),
            (vec![name], vec![b"".as_slice()]),
            (
                vec![name],
                vec![b"\x09\x00\x00\x00\x00\x00\x00\xf0\x3f\x10\x85\x01".as_slice()],
            ),
            (
                vec![name],
                vec![b"\x09\x00\x00\x00\x00\x00\x00\xf0\x3f\x10\x85\x81\x01".as_slice()],
            ),
            (vec![name], vec![b"\x18\x01\x10\x05".as_slice(), SAMPLE]),
            (vec![name], vec![now.as_slice(), longest.as_slice()]),
            (vec![name, long_value.as_slice()], vec![SAMPLE]),
            // Not ASCII, but UTF-8: é in a value, € in a name.
            (
                vec![name, b"\x0a\x01a\x12\x02\xc3\xa9".as_slice()],
                vec![SAMPLE],
            ),
            (
                vec![name, b"\x0a\x03\xe2\x82\xac\x12\x01v".as_slice()],
                vec![SAMPLE],
            ),
        ] {
            let request = raw_series(&labels, &samples);
            assert_eq!(
                check_write_request(&request),
                Ok((1, samples.len() as u64)),
                "{labels:?} {samples:?}"
            );
        }
        for (labels, samples, why) in [
            // Not UTF-8: a lone continuation byte, an overlong NUL, a surrogate.
            (
                vec![name, b"\x0a\x01a\x12\x01\x80".as_slice()],
                vec![SAMPLE],
                Malformed::LabelNotUtf8,
            ),
            (
                vec![name, b"\x0a\x02\xc0\x80\x12\x01v".as_slice()],
                vec![SAMPLE],
                Malformed::LabelNotUtf8,
            ),
            (
                vec![name, b"\x0a\x01a\x12\x03\xed\xa0\x80".as_slice()],
                vec![SAMPLE],
                Malformed::LabelNotUtf8,
            ),
            (
                vec![b"\x08\x01\x12\x02up".as_slice()],
                vec![SAMPLE],
                Malformed::LabelWrongType,
            ),
            (
                vec![name],
                vec![b"\x0d\x00\x00\x00\x00".as_slice()],
                Malformed::SampleWrongType,
            ),
            (
                vec![name],
                vec![
                    b"\x09\x00\x00\x00\x00\x00\x00\xf0\x3f\x11\x05\x00\x00\x00\x00\x00\x00\x00"
                        .as_slice(),
                ],
                Malformed::SampleWrongType,
            ),
            // A timestamp cut inside its varint, a label cut inside its value.
            (
                vec![name],
                vec![b"\x09\x00\x00\x00\x00\x00\x00\xf0\x3f\x10\x85".as_slice()],
                Malformed::TruncatedVarint,
            ),
            (
                vec![b"\x0a\x08__name__\x12\x03up".as_slice()],
                vec![SAMPLE],
                Malformed::PastMessage,
            ),
            (vec![name], vec![b"\x0b".as_slice()], Malformed::WireType),
            // An empty name or value written out, not left out as prost leaves it.
            (
                vec![name, b"\x0a\x01a\x12\x00".as_slice()],
                vec![SAMPLE],
                Malformed::EmptyLabelValue,
            ),
            (
                vec![b"\x0a\x00\x12\x01v".as_slice(), name],
                vec![SAMPLE],
                Malformed::EmptyLabelName,
            ),
            // A timestamp of 11 bytes, and one whose last byte says it goes on.
            (
                vec![name],
                vec![sample_at(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01").as_slice()],
                Malformed::LongVarint,
            ),
            (
                vec![name],
                vec![sample_at(b"\x80\xa0\xa7\xc0\xbc\xb1").as_slice()],
                Malformed::TruncatedVarint,
            ),
            (
                vec![name],
                vec![b"\x00\x00".as_slice()],
                Malformed::FieldZero,
            ),
        ] {
            assert_eq!(
                check_write_request(&raw_series(&labels, &samples)),
                Err(Invalid::Malformed(why)),
                "{labels:?} {samples:?}"
            );
        }
        // A label or sample that is not a message, a series that is not one.
        assert_eq!(
            check_write_request(b"\x0a\x04\x08\x01\x12\x00"),
            Err(Invalid::Malformed(Malformed::LabelOrSampleNotDelimited))
        );
        assert_eq!(
            check_write_request(b"\x08\x01"),
            Err(Invalid::Malformed(Malformed::SeriesNotDelimited))
        );
    }

    /// The walk the sink made before its plain-shape fast paths, kept to prove they changed no
    /// verdict and no reason.
    mod before {
        use super::super::Malformed;

        struct Fields<'a> {
            bytes: &'a [u8],
        }

        enum Value<'a> {
            Varint,
            Fixed64,
            Bytes(&'a [u8]),
            Fixed32,
        }

        impl<'a> Fields<'a> {
            fn varint(&mut self) -> Result<u64, Malformed> {
                let mut value = 0u64;
                for shift in (0..64).step_by(7) {
                    let (&byte, rest) =
                        self.bytes.split_first().ok_or(Malformed::TruncatedVarint)?;
                    self.bytes = rest;
                    value |= u64::from(byte & 0x7f) << shift;
                    if byte < 0x80 {
                        return Ok(value);
                    }
                }
                Err(Malformed::LongVarint)
            }

            fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
                if n > self.bytes.len() {
                    return Err(Malformed::PastMessage);
                }
                let (head, rest) = self.bytes.split_at(n);
                self.bytes = rest;
                Ok(head)
            }

            fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, Malformed> {
                if self.bytes.is_empty() {
                    return Ok(None);
                }
                let key = self.varint()?;
                let value = match key & 7 {
                    0 => {
                        self.varint()?;
                        Value::Varint
                    }
                    1 => {
                        self.take(8)?;
                        Value::Fixed64
                    }
                    2 => {
                        let len = self.varint()? as usize;
                        Value::Bytes(self.take(len)?)
                    }
                    5 => {
                        self.take(4)?;
                        Value::Fixed32
                    }
                    _ => return Err(Malformed::WireType),
                };
                if key >> 3 == 0 {
                    return Err(Malformed::FieldZero);
                }
                Ok(Some((key >> 3, value)))
            }
        }

        pub fn check_write_request(bytes: &[u8]) -> Result<(u64, u64), Malformed> {
            let (mut series, mut samples) = (0u64, 0u64);
            let mut request = Fields { bytes };
            while let Some((number, value)) = request.next_field()? {
                match (number, value) {
                    (1, Value::Bytes(entry)) => {
                        samples += check_series(entry)?;
                        series += 1;
                    }
                    (1, _) => return Err(Malformed::SeriesNotDelimited),
                    _ => {}
                }
            }
            Ok((series, samples))
        }

        fn check_series(bytes: &[u8]) -> Result<u64, Malformed> {
            let mut fields = Fields { bytes };
            let mut previous: Option<&[u8]> = None;
            let (mut has_name, mut samples) = (false, 0u64);
            while let Some((number, value)) = fields.next_field()? {
                match (number, value) {
                    (1, Value::Bytes(label)) => {
                        let (name, value) = check_label(label)?;
                        if name.is_empty() {
                            return Err(Malformed::EmptyLabelName);
                        }
                        if value.is_empty() {
                            return Err(Malformed::EmptyLabelValue);
                        }
                        if previous.is_some_and(|p| p >= name) {
                            return Err(Malformed::LabelsNotSorted);
                        }
                        has_name |= name == b"__name__";
                        previous = Some(name);
                    }
                    (2, Value::Bytes(sample)) => {
                        let mut sample = Fields { bytes: sample };
                        while let Some((number, value)) = sample.next_field()? {
                            match (number, value) {
                                (1, Value::Fixed64) | (2, Value::Varint) => {}
                                (1 | 2, _) => return Err(Malformed::SampleWrongType),
                                _ => {}
                            }
                        }
                        samples += 1;
                    }
                    (1 | 2, _) => return Err(Malformed::LabelOrSampleNotDelimited),
                    _ => {}
                }
            }
            if !has_name {
                return Err(Malformed::SeriesWithoutName);
            }
            if samples == 0 {
                return Err(Malformed::SeriesWithoutSamples);
            }
            Ok(samples)
        }

        fn check_label(bytes: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
            let mut fields = Fields { bytes };
            let (mut name, mut value): (&[u8], &[u8]) = (b"", b"");
            while let Some((number, field)) = fields.next_field()? {
                match (number, field) {
                    (1, Value::Bytes(b)) => name = b,
                    (2, Value::Bytes(b)) => value = b,
                    (1 | 2, _) => return Err(Malformed::LabelWrongType),
                    _ => {}
                }
            }
            if std::str::from_utf8(name).is_err() || std::str::from_utf8(value).is_err() {
                return Err(Malformed::LabelNotUtf8);
            }
            Ok((name, value))
        }
    }

    #[test]
    fn damaged_requests_get_the_verdict_and_reason_they_got_before() {
        // Small requests of every shape, damaged thousands of ways (flipped, inserted, deleted,
        // spliced bytes and protobuf-ish tokens): the fast walk and the one before agree on each.
        let name: &[u8] = b"\x0a\x08__name__\x12\x02up";
        let long_value = [b"\x0a\x01a\x12\x82\x01".as_slice(), &[b'v'; 130]].concat();
        let corpus = vec![
            raw_series(&[name, b"\x0a\x01a\x12\x01b"], &[SAMPLE, SAMPLE]),
            raw_series(
                &[name, &long_value],
                &[&sample_at(b"\x80\xa0\xa7\xc0\xbc\x31")],
            ),
            raw_series(&[name, b"\x0a\x01a\x12\x02\xc3\xa9"], &[b"\x10\x85\x01"]),
            raw_series(&[b"\x12\x02up\x0a\x08__name__"], &[b"\x18\x01", SAMPLE]),
            [
                raw_series(&[name], &[SAMPLE]),
                raw_series(&[name, b"\x0a\x03job\x12\x01x"], &[SAMPLE]),
            ]
            .concat(),
        ];
        let dict: &[&[u8]] = &[
            b"\x0a",
            b"\x12",
            b"\x09",
            b"\x10",
            b"\x08",
            b"\x0d",
            b"\x1a",
            b"\x80\x01",
            b"__name__",
            b"\xff",
        ];
        let mut rng = testkit::fuzz::Rng::new(0x5eed_51ec);
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..100_000 {
            let mut input = rng.pick(&corpus).clone();
            testkit::fuzz::mutate(&mut rng, &mut input, &corpus, dict);
            let want = before::check_write_request(&input).map_err(Invalid::Malformed);
            assert_eq!(
                check_write_request(&input),
                want,
                "round {round}: {}",
                testkit::fuzz::escape(&input)
            );
            if want.is_ok() {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        // Both verdicts were exercised, not just one.
        assert!(accepted > 1000 && refused > 1000, "{accepted} {refused}");
        // And the benchmark's own request, cut anywhere in its first series and at a few
        // places further on, and whole.
        let bytes = request();
        let further = (0..=bytes.len()).step_by(bytes.len() / 16);
        for cut in (0..1000).chain(further).chain([bytes.len()]) {
            assert_eq!(
                check_write_request(&bytes[..cut]),
                before::check_write_request(&bytes[..cut]).map_err(Invalid::Malformed),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn answers_204_over_http_and_counts() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let deadline = Instant::now() + Duration::from_secs(20);
        let served = stats.clone();
        std::thread::spawn(move || serve(listener, served, deadline));
        let good = telemeter_common::snappy::encode_block(&request());
        // One connection per request, closed by us after it: the reply is all that comes back.
        let ask = |body: &[u8]| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let head = format!(
                "POST /api/v1/write HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(body).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = String::new();
            stream.read_to_string(&mut reply).unwrap();
            reply
        };
        assert_eq!(ask(&good), "HTTP/1.1 204 No Content\r\n\r\n");
        let refused = ask(b"not snappy at all");
        assert!(refused.starts_with("HTTP/1.1 400 "), "{refused}");
        assert!(refused.contains("snappy"), "{refused}");
        // Snappy, but of a request whose labels are out of order.
        let mut unsorted = request();
        let at = unsorted
            .windows(8)
            .position(|w| w == b"__name__")
            .expect("the request names its series");
        unsorted[at..at + 8].copy_from_slice(b"zz_name_");
        let refused = ask(&telemeter_common::snappy::encode_block(&unsorted));
        assert!(refused.starts_with("HTTP/1.1 400 "), "{refused}");
        assert!(refused.contains("not sorted"), "{refused}");
        let line = stats.line();
        assert!(line.contains("requests=3 "), "{line}");
        assert!(line.contains("samples=500 "), "{line}");
        assert!(line.contains("refused=2 "), "{line}");
    }
}
