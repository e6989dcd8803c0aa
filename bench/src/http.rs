//! A minimal keep-alive HTTP/1.1 client over one TCP connection.
//!
//! The load generator shares two cores with the server it measures, so every cycle it spends is
//! one the server does not get: this client writes each request with one `write` and parses only
//! what it needs (status, `Content-Length`, chunked bodies, `Connection: close`). Plain HTTP only.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Longest status line or header line accepted.
const MAX_LINE: usize = 16 * 1024;
/// How much of a response body [`Connection::send`] keeps (the rest is read and dropped).
const KEPT_BODY: usize = 64 * 1024;

/// Why a request failed before a status arrived, or while its body was read.
#[derive(Debug)]
pub enum Error {
    /// The URL is not `http://host:port[/path]`.
    Url(String),
    /// Connecting, writing or reading failed.
    Io(io::Error),
    /// The response is not HTTP/1.x as we read it.
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Url(url) => write!(f, "not an http://host:port URL: {url:?}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Protocol(why) => write!(f, "bad HTTP response: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// Where requests go: `host:port` and a path prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `host:port`.
    pub authority: String,
    /// The URL's path without a trailing slash (empty for the root).
    pub base_path: String,
}

impl Target {
    /// Parses `http://host:port[/path]`.
    pub fn parse(url: &str) -> Result<Target, Error> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| Error::Url(url.to_string()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() || !authority.contains(':') {
            return Err(Error::Url(url.to_string()));
        }
        Ok(Target {
            authority: authority.to_string(),
            base_path: path.trim_end_matches('/').to_string(),
        })
    }

    /// The request target for `path` under this URL.
    pub fn path(&self, path: &str) -> String {
        format!("{}{}", self.base_path, path)
    }
}

/// A request to send.
#[derive(Clone, Debug)]
pub struct Request {
    /// `GET`, `POST`, `PUT`.
    pub method: &'static str,
    /// The request target, like `/upload`.
    pub path: String,
    /// Extra headers (`Host`, `Content-Length` and `Connection` are added).
    pub headers: Vec<(&'static str, String)>,
    /// The body (sent with a `Content-Length`, also when empty for POST and PUT).
    pub body: Vec<u8>,
}

/// A response whose body was read (its first `KEPT_BODY` bytes kept).
#[derive(Clone, Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The start of the body.
    pub body: Vec<u8>,
}

/// One keep-alive connection to a target, reopened when the server closes it.
pub struct Connection {
    target: Target,
    stream: Option<BufReader<TcpStream>>,
    timeout: Duration,
    head: Vec<u8>,
}

impl Connection {
    /// A connection to `target` (opened on the first request); every read and write is bounded by
    /// `timeout`.
    pub fn new(target: Target, timeout: Duration) -> Connection {
        Connection {
            target,
            stream: None,
            timeout,
            head: Vec::with_capacity(1024),
        }
    }

    fn open(&self) -> Result<BufReader<TcpStream>, Error> {
        let addr = self
            .target
            .authority
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| Error::Url(self.target.authority.clone()))?;
        let stream = TcpStream::connect_timeout(&addr, self.timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        Ok(BufReader::with_capacity(64 * 1024, stream))
    }

    /// Sends `request` and reads the whole response, keeping the start of its body.
    pub fn send(&mut self, request: &Request) -> Result<Response, Error> {
        let mut body = Vec::new();
        let status = self.send_streaming(request, &mut |chunk| {
            let room = KEPT_BODY.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        })?;
        Ok(Response { status, body })
    }

    /// Sends `request` and hands the response body to `sink` piece by piece; returns the status.
    /// A request on a reused connection that the server had closed is sent once more on a new one.
    pub fn send_streaming(
        &mut self,
        request: &Request,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u16, Error> {
        self.head.clear();
        let head = &mut self.head;
        // Writing into a Vec cannot fail.
        let _ = write!(
            head,
            "{} {} HTTP/1.1\r\nHost: {}\r\n",
            request.method, request.path, self.target.authority
        );
        for (name, value) in &request.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if request.method != "GET" || !request.body.is_empty() {
            let _ = write!(head, "Content-Length: {}\r\n", request.body.len());
        }
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(&request.body);

        let reused = self.stream.is_some();
        match self.exchange(sink) {
            Err(Error::Io(e)) if reused && stale_connection(&e) => {
                self.stream = None;
                self.exchange(sink)
            }
            other => other,
        }
    }

    fn exchange(&mut self, sink: &mut dyn FnMut(&[u8])) -> Result<u16, Error> {
        let mut stream = match self.stream.take() {
            Some(s) => s,
            None => self.open()?,
        };
        stream.get_mut().write_all(&self.head)?;
        let (status, framing, close) = read_head(&mut stream)?;
        match framing {
            Framing::Length(n) => copy_exact(&mut stream, n, sink)?,
            Framing::Chunked => copy_chunked(&mut stream, sink)?,
            Framing::UntilClose => {
                copy_to_end(&mut stream, sink)?;
                return Ok(status);
            }
        }
        if !close {
            self.stream = Some(stream);
        }
        Ok(status)
    }
}

/// A reused connection failing like this was closed by the server while idle.
fn stale_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

fn read_line(stream: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> Result<(), Error> {
    line.clear();
    let n = stream
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', line)?;
    if n == 0 {
        return Err(Error::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before the response",
        )));
    }
    if line.last() != Some(&b'\n') {
        return Err(Error::Protocol("line too long or cut short".into()));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(())
}

fn read_head(stream: &mut BufReader<TcpStream>) -> Result<(u16, Framing, bool), Error> {
    let mut line = Vec::with_capacity(128);
    read_line(stream, &mut line)?;
    let status_line = String::from_utf8_lossy(&line).into_owned();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(Error::Protocol(format!("status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("status line {status_line:?}")))?;
    let mut framing = Framing::UntilClose;
    let mut close = version == "HTTP/1.0";
    loop {
        read_line(stream, &mut line)?;
        if line.is_empty() {
            break;
        }
        let header = String::from_utf8_lossy(&line);
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse()
                .map_err(|_| Error::Protocol(format!("Content-Length {value:?}")))?;
            if !matches!(framing, Framing::Chunked) {
                framing = Framing::Length(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.to_ascii_lowercase().contains("chunked") {
                framing = Framing::Chunked;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    // Statuses that never carry a body.
    if status == 204 || status == 304 || (100..200).contains(&status) {
        framing = Framing::Length(0);
    }
    Ok((status, framing, close))
}

fn copy_exact(
    stream: &mut BufReader<TcpStream>,
    mut n: u64,
    sink: &mut dyn FnMut(&[u8]),
) -> Result<(), Error> {
    while n > 0 {
        let buf = stream.fill_buf()?;
        if buf.is_empty() {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside the body",
            )));
        }
        let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        sink(&buf[..take]);
        stream.consume(take);
        n -= take as u64;
    }
    Ok(())
}

fn copy_chunked(
    stream: &mut BufReader<TcpStream>,
    sink: &mut dyn FnMut(&[u8]),
) -> Result<(), Error> {
    let mut line = Vec::with_capacity(64);
    loop {
        read_line(stream, &mut line)?;
        let text = String::from_utf8_lossy(&line);
        let size = text.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| Error::Protocol(format!("chunk size {size:?}")))?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                read_line(stream, &mut line)?;
                if line.is_empty() {
                    return Ok(());
                }
            }
        }
        copy_exact(stream, size, sink)?;
        read_line(stream, &mut line)?;
        if !line.is_empty() {
            return Err(Error::Protocol("chunk not followed by CRLF".into()));
        }
    }
}

fn copy_to_end(
    stream: &mut BufReader<TcpStream>,
    sink: &mut dyn FnMut(&[u8]),
) -> Result<(), Error> {
    loop {
        let buf = stream.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        sink(buf);
        stream.consume(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    #[test]
    fn targets_parse() {
        let t = Target::parse("http://127.0.0.1:9003/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.authority, "127.0.0.1:9003");
        assert_eq!(t.path("/upload"), "/upload");
        let t = Target::parse("http://h:1/prefix/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.path("/upload"), "/prefix/upload");
        assert!(Target::parse("https://h:1").is_err());
        assert!(Target::parse("http://nohostport").is_err());
    }

    /// A server answering each request on one connection with the canned replies in turn.
    fn serve(replies: Vec<&'static str>) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream);
            for reply in replies {
                // Read one request head (the test requests carry no body).
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let _ = reader.get_mut().write_all(reply.as_bytes());
            }
        });
        Target {
            authority: addr.to_string(),
            base_path: String::new(),
        }
    }

    #[test]
    fn reads_length_and_chunked_bodies_on_one_connection() {
        let target = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            "HTTP/1.1 204 No Content\r\n\r\n",
        ]);
        let mut c = Connection::new(target, Duration::from_secs(5));
        let get = Request {
            method: "GET",
            path: "/".into(),
            headers: vec![],
            body: vec![],
        };
        let r = c.send(&get).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let r = c.send(&get).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
        let r = c.send(&get).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status, r.body.len()), (204, 0));
    }

    #[test]
    fn a_garbled_response_is_an_error() {
        let target = serve(vec!["SPDY nonsense\r\n\r\n"]);
        let mut c = Connection::new(target, Duration::from_secs(5));
        let get = Request {
            method: "GET",
            path: "/".into(),
            headers: vec![],
            body: vec![],
        };
        assert!(matches!(c.send(&get), Err(Error::Protocol(_))));
    }
}
