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
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn invalid(reason: &str) -> Invalid {
    Invalid(reason.to_string())
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
    fn varint(&mut self) -> Result<u64, Invalid> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self
                .bytes
                .split_first()
                .ok_or_else(|| invalid("truncated varint"))?;
            self.bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(invalid("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Invalid> {
        if n > self.bytes.len() {
            return Err(invalid("field runs past its message"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// The next field number and value, or None at the end.
    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, Invalid> {
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
                let len = usize::try_from(self.varint()?).map_err(|_| invalid("huge length"))?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed32
            }
            _ => return Err(invalid("unsupported wire type")),
        };
        if key >> 3 == 0 {
            return Err(invalid("field number 0"));
        }
        Ok(Some((key >> 3, value)))
    }
}

/// Checks a decompressed `WriteRequest`: returns its series and samples.
pub fn check_write_request(bytes: &[u8]) -> Result<(u64, u64), Invalid> {
    let (mut series, mut samples) = (0u64, 0u64);
    let mut request = Fields { bytes };
    while let Some((number, value)) = request.next_field()? {
        match (number, value) {
            (1, Value::Bytes(entry)) => {
                samples += check_series(entry)?;
                series += 1;
            }
            (1, _) => return Err(invalid("timeseries is not length-delimited")),
            // Metadata and anything newer: skipped, as a receiver does.
            _ => {}
        }
    }
    Ok((series, samples))
}

/// Checks one `TimeSeries`: returns its samples.
fn check_series(bytes: &[u8]) -> Result<u64, Invalid> {
    let mut fields = Fields { bytes };
    let mut previous: Option<&[u8]> = None;
    let (mut has_name, mut samples) = (false, 0u64);
    while let Some((number, value)) = fields.next_field()? {
        match (number, value) {
            (1, Value::Bytes(label)) => {
                let (name, value) = check_label(label)?;
                if name.is_empty() {
                    return Err(invalid("empty label name"));
                }
                if value.is_empty() {
                    return Err(invalid("empty label value"));
                }
                if previous.is_some_and(|p| p >= name) {
                    return Err(invalid("labels not sorted by name, or repeated"));
                }
                has_name |= name == b"__name__";
                previous = Some(name);
            }
            (2, Value::Bytes(sample)) => {
                let mut sample = Fields { bytes: sample };
                while let Some((number, value)) = sample.next_field()? {
                    match (number, value) {
                        (1, Value::Fixed64) | (2, Value::Varint) => {}
                        (1 | 2, _) => return Err(invalid("sample field of the wrong type")),
                        _ => {}
                    }
                }
                samples += 1;
            }
            (1 | 2, _) => return Err(invalid("label or sample is not length-delimited")),
            _ => {}
        }
    }
    if !has_name {
        return Err(invalid("series without __name__"));
    }
    if samples == 0 {
        return Err(invalid("series without samples"));
    }
    Ok(samples)
}

/// Checks one `Label`: its name and value, UTF-8.
fn check_label(bytes: &[u8]) -> Result<(&[u8], &[u8]), Invalid> {
    let mut fields = Fields { bytes };
    let (mut name, mut value): (&[u8], &[u8]) = (b"", b"");
    while let Some((number, field)) = fields.next_field()? {
        match (number, field) {
            (1, Value::Bytes(b)) => name = b,
            (2, Value::Bytes(b)) => value = b,
            (1 | 2, _) => return Err(invalid("label field of the wrong type")),
            _ => {}
        }
    }
    if std::str::from_utf8(name).is_err() || std::str::from_utf8(value).is_err() {
        return Err(invalid("label not UTF-8"));
    }
    Ok((name, value))
}

/// Checks one request body (snappy block + `WriteRequest`): returns its series and samples.
pub fn check_body(body: &[u8]) -> Result<(u64, u64), Invalid> {
    let bytes = telemeter_common::snappy::decode_block(body, MAX_DECOMPRESSED_BYTES)
        .map_err(|e| Invalid(format!("snappy: {e}")))?;
    check_write_request(&bytes)
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
                match check_body(&body) {
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
        assert_eq!(check_body(&body), Ok((want, want)));
    }

    #[test]
    fn refuses_what_a_receiver_would_not_take() {
        let bytes = request();
        // Truncated anywhere inside: never accepted as a whole request.
        assert!(check_write_request(&bytes[..bytes.len() - 3]).is_err());
        // Not snappy, or snappy of garbage.
        assert!(check_body(&bytes).is_err());
        let garbage = telemeter_common::snappy::encode_block(&[0xff; 64]);
        assert!(check_body(&garbage).is_err());
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
        for bad in [
            series(&[("a", "b"), ("__name__", "up")], 1),
            series(&[("__name__", "up"), ("a", "b"), ("a", "c")], 1),
            series(&[("a", "b")], 1),
            series(&[("__name__", "up")], 0),
            series(&[("__name__", "up"), ("a", "")], 1),
        ] {
            assert!(check_write_request(&bad).is_err());
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
        let line = stats.line();
        assert!(line.contains("requests=2 "), "{line}");
        assert!(line.contains("samples=500 "), "{line}");
        assert!(line.contains("refused=1 "), "{line}");
    }
}
