//! The sans-IO request parser: where a head ends, what it says, how its body is framed, and the
//! chunked decoder. No socket here, so the fuzz tests drive it directly.

use std::fmt;
use std::ops::Range;

use super::ShortText;

/// Most header fields in a request head (httparse needs a fixed array; 128 is several times what
/// any client we serve sends).
pub const MAX_HEADERS: usize = 128;

/// Longest chunk-size line (size, extensions, CRLF), as Go's net/http allows.
pub const MAX_CHUNK_LINE: usize = 4096;

/// A request head, as [`Handler::admit`](super::Handler::admit) sees it before any of the body is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The method, as sent.
    pub method: ShortText,
    /// The path, without the query string, percent-decoding not applied.
    pub path: ShortText,
    /// The raw query string (without `?`), possibly empty.
    pub query: String,
    /// The header fields in order; names as sent, values without surrounding blanks.
    pub headers: Headers,
    /// Whether the request is HTTP/1.0 (else HTTP/1.1).
    pub http10: bool,
}

/// Header fields in order, names as sent: held in one buffer, not two strings a field (an
/// upload's five fields were ten of the twenty allocations its request cost).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    /// Every field's name then its value, one field after the other.
    text: String,
    /// Where each field's name and its value end in `text`; its name starts where the field
    /// before it ends.
    ends: Vec<(usize, usize)>,
}

impl Headers {
    /// No fields.
    pub fn new() -> Headers {
        Headers::default()
    }

    /// No fields yet, with room for `fields` of them holding `bytes` bytes in all.
    pub fn with_capacity(fields: usize, bytes: usize) -> Headers {
        Headers {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(fields),
        }
    }

    /// Appends a field.
    pub fn push(&mut self, name: &str, value: &str) {
        self.text.push_str(name);
        let name_end = self.text.len();
        self.text.push_str(value);
        self.ends.push((name_end, self.text.len()));
    }

    /// The fields in order, as `(name, value)`.
    pub fn iter(&self) -> HeaderFields<'_> {
        HeaderFields {
            headers: self,
            next: 0,
        }
    }

    /// The first value of the field `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// How many fields.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The field at `index`, as `(name, value)`.
    pub fn field(&self, index: usize) -> Option<(&str, &str)> {
        let start = match index.checked_sub(1) {
            None => 0,
            Some(before) => self.ends.get(before)?.1,
        };
        let &(name_end, end) = self.ends.get(index)?;
        Some((
            self.text.get(start..name_end)?,
            self.text.get(name_end..end)?,
        ))
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<N: AsRef<str>, V: AsRef<str>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(fields: I) -> Headers {
        let mut headers = Headers::new();
        for (name, value) in fields {
            headers.push(name.as_ref(), value.as_ref());
        }
        headers
    }
}

impl<N: AsRef<str>, V: AsRef<str>> From<Vec<(N, V)>> for Headers {
    fn from(fields: Vec<(N, V)>) -> Headers {
        fields.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a str);
    type IntoIter = HeaderFields<'a>;

    fn into_iter(self) -> HeaderFields<'a> {
        self.iter()
    }
}

/// The fields of [`Headers`], in order, as `(name, value)`.
pub struct HeaderFields<'a> {
    headers: &'a Headers,
    next: usize,
}

impl<'a> Iterator for HeaderFields<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        let field = self.headers.field(self.next)?;
        self.next += 1;
        Some(field)
    }
}

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// Whether the `Connection` header lists `token`.
    fn connection_has(&self, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub(super) fn wants_close(&self) -> bool {
        if self.http10 {
            !self.connection_has("keep-alive")
        } else {
            self.connection_has("close")
        }
    }
}

/// Why the front refuses a request itself, before the handler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// A malformed head, body framing or chunk (`400`), and what was wrong.
    Malformed(&'static str),
    /// Not HTTP/1.0 nor HTTP/1.1 (`505`).
    Version,
    /// The head is over the cap (`431`).
    HeadTooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// More header fields than [`MAX_HEADERS`] (`431`).
    TooManyHeaders,
    /// A chunked body's trailers and chunk extensions together are over the cap (`431`).
    TrailersTooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// A transfer coding other than a single `chunked` (`501`).
    UnsupportedTransferCoding,
    /// The body is over the handler's cap (`413`).
    BodyTooLarge {
        /// The declared length; `None` for a chunked body, refused as soon as a chunk passes it.
        declared: Option<u64>,
        /// The cap, in bytes.
        limit: usize,
    },
    /// An `Expect` other than `100-continue` (`417`).
    Expectation,
}

impl RequestError {
    /// The status the front answers with.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Malformed(_) => 400,
            RequestError::Version => 505,
            RequestError::HeadTooLarge { .. }
            | RequestError::TooManyHeaders
            | RequestError::TrailersTooLarge { .. } => 431,
            RequestError::UnsupportedTransferCoding => 501,
            RequestError::BodyTooLarge { .. } => 413,
            RequestError::Expectation => 417,
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Malformed(reason) => f.write_str(reason),
            RequestError::Version => f.write_str("only HTTP/1.0 and HTTP/1.1 are supported"),
            RequestError::HeadTooLarge { limit } => {
                write!(f, "the request head is over the limit of {limit} bytes")
            }
            RequestError::TooManyHeaders => write!(
                f,
                "the request head has more than {MAX_HEADERS} header fields"
            ),
            RequestError::TrailersTooLarge { limit } => write!(
                f,
                "the chunk extensions and trailers are over the limit of {limit} bytes"
            ),
            RequestError::UnsupportedTransferCoding => {
                f.write_str("only Transfer-Encoding: chunked is supported (one coding, no other)")
            }
            RequestError::BodyTooLarge {
                declared: Some(length),
                limit,
            } => write!(
                f,
                "the body of {length} bytes is over the limit of {limit} bytes"
            ),
            RequestError::BodyTooLarge {
                declared: None,
                limit,
            } => write!(f, "the chunked body is over the limit of {limit} bytes"),
            RequestError::Expectation => f.write_str("only Expect: 100-continue is supported"),
        }
    }
}

impl std::error::Error for RequestError {}

/// How many bytes of empty lines (CRLF) start `buf`: what may precede a request line.
pub(super) fn leading_empty_lines(buf: &[u8]) -> usize {
    buf.chunks_exact(2)
        .take_while(|pair| pair == b"\r\n")
        .count()
        * 2
}

/// Where the request head at the start of `buf` ends: `Ok(Some(n))` when its first `n` bytes are
/// a whole head (through its empty line), `Ok(None)` when more bytes are needed, `431` when the
/// head is longer than `max`. `scanned` carries how far earlier calls looked (start it at 0 for
/// each head), so a head that arrives a byte at a time is scanned once, not once per byte. A head
/// whose empty line is a lone LF is found too, so that [`parse_head`] refuses it at once rather
/// than the connection waiting for a CRLF that never comes.
pub fn head_end(
    buf: &[u8],
    scanned: &mut usize,
    max: usize,
) -> Result<Option<usize>, RequestError> {
    // The end (`\n\r\n` or `\n\n`) may straddle what the last call saw: look 2 bytes back.
    let mut from = (*scanned).min(buf.len()).saturating_sub(2);
    let end = loop {
        let Some(offset) = buf
            .get(from..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        else {
            break None;
        };
        let at = from + offset;
        match (buf.get(at + 1), buf.get(at + 2)) {
            (Some(b'\n'), _) => break Some(at + 2),
            (Some(b'\r'), Some(b'\n')) => break Some(at + 3),
            _ => from = at + 1,
        }
    };
    match end {
        Some(end) if end > max => Err(RequestError::HeadTooLarge { limit: max }),
        Some(end) => Ok(Some(end)),
        None if buf.len() > max => Err(RequestError::HeadTooLarge { limit: max }),
        None => {
            *scanned = buf.len();
            Ok(None)
        }
    }
}

/// Parses a whole request head (as [`head_end`] delimits it) with httparse, refusing what RFC 9112
/// lets a server refuse and httparse accepts: lone-LF line ends (§2.2) and folded header lines
/// (§5.2). httparse itself refuses control characters other than HTAB in header values, a bare
/// CR, blanks before a header's colon, and invalid names.
pub fn parse_head(bytes: &[u8]) -> Result<Head, RequestError> {
    // A lone LF is a line end to some parsers and not to others; a proxy in front of us that
    // disagrees about where a line ends is how requests get smuggled.
    let lone_lf = bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes.get(i - 1) != Some(&b'\r')));
    if lone_lf {
        return Err(RequestError::Malformed(
            "a line of the request head ends in a lone LF; line ends must be CRLF",
        ));
    }
    if bytes
        .windows(2)
        .any(|w| w[0] == b'\n' && matches!(w[1], b' ' | b'\t'))
    {
        return Err(RequestError::Malformed(
            "folded header lines (obs-fold) are not accepted",
        ));
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(used)) if used == bytes.len() => {}
        Ok(_) => return Err(RequestError::Malformed("malformed request head")),
        Err(httparse::Error::Version) => {
            // The version is the request line's last word; "HTTP/2.0" is a version we do not
            // speak, anything else is not a request line.
            let line = bytes.split(|&b| b == b'\r').next().unwrap_or(&[]);
            let version = line.rsplit(|&b| b == b' ').next().unwrap_or(&[]);
            return Err(if version.starts_with(b"HTTP/") {
                RequestError::Version
            } else {
                RequestError::Malformed("malformed request line")
            });
        }
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooManyHeaders),
        Err(httparse::Error::HeaderName) => {
            return Err(RequestError::Malformed("malformed header name"))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(RequestError::Malformed(
                "a header value holds a control character",
            ))
        }
        Err(httparse::Error::NewLine) => {
            return Err(RequestError::Malformed(
                "malformed line end in the request head",
            ))
        }
        Err(_) => return Err(RequestError::Malformed("malformed request line")),
    }
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Err(RequestError::Malformed("malformed request line"));
    };
    // Absolute form (`http://host/path`) is allowed by RFC 9112; only its path matters here.
    let origin = match target.split_once("://") {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            rest.find('/').map_or("/", |slash| &rest[slash..])
        }
        _ => target,
    };
    if !(origin.starts_with('/') || method == "OPTIONS" && origin == "*") {
        return Err(RequestError::Malformed("malformed request target"));
    }
    if origin.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(RequestError::Malformed("malformed request target"));
    }
    let (path, query) = origin.split_once('?').unwrap_or((origin, ""));
    let bytes = parsed
        .headers
        .iter()
        .map(|field| field.name.len() + field.value.len())
        .sum();
    let mut headers = Headers::with_capacity(parsed.headers.len(), bytes);
    for field in parsed.headers.iter() {
        let value = std::str::from_utf8(field.value)
            .map_err(|_| RequestError::Malformed("a header value is not UTF-8"))?;
        headers.push(field.name, value.trim_matches([' ', '\t']));
    }
    Ok(Head {
        method: method.into(),
        path: path.into(),
        query: query.to_owned(),
        headers,
        http10: parsed.version == Some(0),
    })
}

/// How a request's body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes, from `Content-Length`; 0 without either header (a request with neither
    /// has no body, which is what `curl -X POST` without data sends).
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// The body framing a head declares, refusing every combination that two parsers could read
/// differently (RFC 9112 §6.1, §6.3): `Transfer-Encoding` with `Content-Length` or in HTTP/1.0
/// (`400`), a coding other than one `chunked` (`501`), conflicting or malformed lengths (`400`).
pub fn framing(head: &Head) -> Result<Framing, RequestError> {
    let mut transfer_encoding = false;
    let mut codings = Vec::new();
    for (_, value) in head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
    {
        transfer_encoding = true;
        codings.extend(value.split(',').map(str::trim).filter(|c| !c.is_empty()));
    }
    let lengths = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    if transfer_encoding {
        if head.http10 {
            return Err(RequestError::Malformed(
                "Transfer-Encoding is not allowed in an HTTP/1.0 request",
            ));
        }
        if lengths.count() > 0 {
            return Err(RequestError::Malformed(
                "a request may not have both Transfer-Encoding and Content-Length",
            ));
        }
        return match codings.as_slice() {
            [only] if only.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
            _ => Err(RequestError::UnsupportedTransferCoding),
        };
    }
    let mut declared: Option<usize> = None;
    for (_, value) in lengths {
        let length = value
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| value.parse::<usize>().ok())
            .flatten()
            .ok_or(RequestError::Malformed("invalid Content-Length"))?;
        if declared.is_some_and(|d| d != length) {
            return Err(RequestError::Malformed(
                "conflicting Content-Length headers",
            ));
        }
        declared = Some(length);
    }
    Ok(Framing::Length(declared.unwrap_or(0)))
}

/// Decodes a chunked request body (RFC 9112 §7.1) from bytes as they arrive, without doing any
/// I/O: each [`ChunkedDecoder::step`] takes what it can from the front of its input. Chunk sizes
/// are parsed by httparse; extensions are ignored and trailers read and dropped, both counted
/// against one cap; the body cap is checked when a chunk's size is read, before its data arrives.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    limit: usize,
    received: usize,
    max_overhead: usize,
    overhead: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChunkState {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes to come.
    Data(usize),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    /// The body is complete.
    Done,
}

/// What one [`ChunkedDecoder::step`] took from its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkStep {
    /// Bytes of the input used; 0 when more input is needed (or the body is complete).
    pub consumed: usize,
    /// The body bytes among them, as a range of the input (empty for framing).
    pub data: Range<usize>,
}

impl ChunkedDecoder {
    /// A decoder of a body of at most `limit` bytes, whose chunk extensions and trailers together
    /// may take `max_overhead` bytes.
    pub fn new(limit: usize, max_overhead: usize) -> ChunkedDecoder {
        ChunkedDecoder {
            state: ChunkState::Size,
            limit,
            received: 0,
            max_overhead,
            overhead: 0,
        }
    }

    /// Whether the whole body, trailers included, has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Body bytes decoded so far.
    pub fn received(&self) -> usize {
        self.received
    }

    /// Decodes the next piece at the start of `input`: a chunk-size line, data, the CRLF after
    /// data, or a trailer line. Consumes nothing until a whole line is there.
    pub fn step(&mut self, input: &[u8]) -> Result<ChunkStep, RequestError> {
        let framing = |consumed| ChunkStep {
            consumed,
            data: 0..0,
        };
        match self.state {
            ChunkState::Done => Ok(framing(0)),
            ChunkState::Size => {
                let Some(end) = input.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                    if input.len() >= MAX_CHUNK_LINE {
                        return Err(RequestError::Malformed(
                            "a chunk-size line is longer than 4096 bytes",
                        ));
                    }
                    return Ok(framing(0));
                };
                let line = input.get(..=end).unwrap_or(&[]);
                if end == 0 || line.get(end - 1) != Some(&b'\r') {
                    return Err(RequestError::Malformed(
                        "a chunk-size line ends in a lone LF; line ends must be CRLF",
                    ));
                }
                // httparse reads a line without digits (`\r\n`, `;x\r\n`) as size 0, which
                // would end the body where another parser sees garbage.
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                if digits == 0 {
                    return Err(RequestError::Malformed("a chunk size is not a hex number"));
                }
                let size = match httparse::parse_chunk_size(line) {
                    Ok(httparse::Status::Complete((used, size))) if used == line.len() => size,
                    // More than 16 hex digits overflow; anything else is not a chunk size.
                    _ if digits > 16 => {
                        return Err(RequestError::Malformed(
                            "a chunk size has more than 16 hex digits",
                        ))
                    }
                    _ => return Err(RequestError::Malformed("invalid chunk-size line")),
                };
                self.add_overhead(line.len() - digits - 2)?;
                let room = self.limit - self.received;
                if size > room as u64 {
                    return Err(RequestError::BodyTooLarge {
                        declared: None,
                        limit: self.limit,
                    });
                }
                self.state = match size as usize {
                    0 => ChunkState::Trailers,
                    size => ChunkState::Data(size),
                };
                Ok(framing(line.len()))
            }
            ChunkState::Data(left) => {
                let n = left.min(input.len());
                if n == 0 {
                    return Ok(framing(0));
                }
                self.received += n;
                self.state = if n == left {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left - n)
                };
                Ok(ChunkStep {
                    consumed: n,
                    data: 0..n,
                })
            }
            ChunkState::DataEnd => match input {
                [] | [b'\r'] => Ok(framing(0)),
                [b'\r', b'\n', ..] => {
                    self.state = ChunkState::Size;
                    Ok(framing(2))
                }
                _ => Err(RequestError::Malformed(
                    "a chunk's data is not followed by CRLF",
                )),
            },
            ChunkState::Trailers => {
                let room = self.max_overhead - self.overhead;
                let Some(end) = input.iter().take(room + 1).position(|&b| b == b'\n') else {
                    if input.len() > room {
                        return Err(RequestError::TrailersTooLarge {
                            limit: self.max_overhead,
                        });
                    }
                    return Ok(framing(0));
                };
                let line = input.get(..=end).unwrap_or(&[]);
                if end == 0 || line.get(end - 1) != Some(&b'\r') {
                    return Err(RequestError::Malformed(
                        "a trailer line ends in a lone LF; line ends must be CRLF",
                    ));
                }
                if line.len() == 2 {
                    self.state = ChunkState::Done;
                    return Ok(framing(2));
                }
                self.add_overhead(line.len())?;
                if !is_field_line(line.get(..end - 1).unwrap_or(&[])) {
                    return Err(RequestError::Malformed("malformed trailer field"));
                }
                Ok(framing(line.len()))
            }
        }
    }

    fn add_overhead(&mut self, bytes: usize) -> Result<(), RequestError> {
        self.overhead += bytes;
        if self.overhead > self.max_overhead {
            return Err(RequestError::TrailersTooLarge {
                limit: self.max_overhead,
            });
        }
        Ok(())
    }
}

/// Whether `line` (without its CRLF) is `name: value` with a token name and a value without
/// control characters other than HTAB: what a trailer field must be, though it is dropped.
pub(super) fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let (name, value) = line.split_at(colon);
    std::str::from_utf8(name).is_ok_and(is_token)
        && value
            .iter()
            .skip(1)
            .all(|&b| b == b'\t' || (b >= b' ' && b != 0x7f))
}

/// `tchar` of RFC 9110: what methods and header names are made of.
pub(super) fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}
