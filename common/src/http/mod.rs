//! A small synchronous HTTP/1.1 server front that both binaries serve their endpoints with.
//!
//! Why not tiny_http: 0.12 starts one unbounded thread per connection, sets no socket deadlines, and
//! its TLS feature pins rustls 0.20 (RUSTSEC-2024-0336). This front owns exactly those parts:
//! - an accept loop with a cap on open connections, over all peers and per peer address (an IPv4
//!   address or an IPv6 /64); at a cap it first closes a connection that is not doing anything
//!   useful (see [`Stats::evicted_connections`]), else answers `503` and closes;
//! - one thread per open connection (small stack) that reads a request head under a total deadline
//!   and a body under its own deadline, so a client trickling bytes holds only its own thread;
//! - the [`Handler`] is asked about each head ([`Handler::admit`]) before any of its body is read:
//!   it may refuse it (the server's `/upload` checks the upload token there) or set its body cap;
//! - request bodies with `Content-Length` or `Transfer-Encoding: chunked` (RFC 9112 §7.1; chunk
//!   extensions ignored, trailers read and dropped), held in memory that grows with the bytes that
//!   arrive, never with what was declared, and counted against a budget over all connections and
//!   one per peer address;
//! - a fixed pool of worker threads running the [`Handler`] (CPU work is bounded by the pool size),
//!   except on the paths a handler bounds itself ([`Config::inline_paths`]), which run on the
//!   connection's thread;
//! - optional TLS with rustls ≥ 0.23.5;
//! - the protocol errors answered here, one line each, and the connection closed after them:
//!   `400` malformed (including lone-LF line ends, control characters in header values, folded
//!   header lines, `Transfer-Encoding` with `Content-Length` or in HTTP/1.0, a bad chunk), `408`
//!   too slow, `413` body over the handler's limit (a declared length before reading, a chunked
//!   body as soon as its chunks pass it), `417` unknown expectation, `431` head or trailers too
//!   large, `501` a transfer coding other than a single `chunked`, `503` too many connections or a
//!   full body budget, `505` not HTTP/1.x;
//! - HTTP/1.1 keep-alive with an idle deadline, and `Connection: close`;
//! - graceful shutdown: stop accepting, finish in-flight requests, then return.
//!
//! Request heads and chunk-size lines are parsed by `httparse`, behind the sans-IO functions
//! [`head_end`], [`parse_head`], [`framing`] and [`ChunkedDecoder`] that each connection runs (and
//! the fuzz tests drive directly). httparse accepts lone `\n` line ends and a chunk-size line
//! without digits; both are refused here before they reach it.
//!
//! Where each part lives: this file holds the API a handler sees ([`Request`], [`Response`],
//! [`Handler`], [`Config`], [`Stats`]) and the bearer parser; `url` the percent coding; `head` the
//! sans-IO parser; `stream` the deadlined plain/TLS socket; `connection` one connection's state
//! machine; `shared` the connection table, caps, eviction and body budget; `server` binding, the
//! accept loop, the workers and shutdown.

use std::any::Any;
use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use url::urlencoded_values;

mod connection;
mod head;
mod later;
mod pending;
mod server;
mod shared;
mod short;
mod stream;
mod url;

pub use head::{
    framing, head_end, parse_head, ChunkStep, ChunkedDecoder, Framing, Head, HeaderFields, Headers,
    RequestError, MAX_CHUNK_LINE, MAX_HEADERS,
};
pub use later::{Defer, Later};
pub use server::{Server, ServerHandle};
pub use short::ShortText;
pub use url::{percent_decode, percent_encode};

/// One request, with its whole body read (up to the handler's limit).
#[derive(Debug)]
pub struct Request {
    /// The method, as sent (`GET`, `POST`, ...).
    pub method: ShortText,
    /// The path, without the query string, percent-decoding not applied.
    pub path: ShortText,
    /// The raw query string (without `?`), possibly empty.
    pub query: String,
    /// The headers in order; names as sent.
    pub headers: Headers,
    /// The body.
    pub body: Vec<u8>,
    /// The peer's address.
    pub remote: SocketAddr,
    /// What the handler's [`Handler::admit`] noted of this request's head, handed back with it.
    pub admitted: Option<Note>,
}

/// What a handler learned from a request's head in [`Handler::admit`] (a verified token's
/// claims) and wants back with that request in [`Handler::handle`], so it need not work it out
/// again. The front carries it from the head to the request it belongs to, and to no other.
pub struct Note(Arc<dyn Any + Send + Sync>);

impl Note {
    /// A note holding `value`.
    pub fn new<T: Any + Send + Sync>(value: T) -> Note {
        Note(Arc::new(value))
    }

    /// A note holding what `shared` points to, without another allocation (an upload's verified
    /// token is shared already: boxing its handle was one allocation an upload).
    pub fn shared<T: Any + Send + Sync>(shared: Arc<T>) -> Note {
        Note(shared)
    }

    /// The value, if it is a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        (*self.0).downcast_ref()
    }

    /// A handle on the value, if it is a `T` (noted with [`Note::shared`] or [`Note::new`]).
    pub fn get_shared<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.0.clone().downcast().ok()
    }
}

impl fmt::Debug for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Note(..)")
    }
}

/// What [`Handler::admit`] decided for a head it lets in.
#[derive(Debug)]
pub struct Admission {
    /// The largest body accepted for this request.
    pub body_limit: usize,
    /// Handed back in [`Request::admitted`].
    pub note: Option<Note>,
}

impl From<usize> for Admission {
    fn from(body_limit: usize) -> Admission {
        Admission {
            body_limit,
            note: None,
        }
    }
}

impl Request {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The first value of query parameter `name`, percent- and `+`-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_params(name).into_iter().next()
    }

    /// Every value of query parameter `name`, percent- and `+`-decoded, in order.
    pub fn query_params(&self, name: &str) -> Vec<String> {
        urlencoded_values(&self.query, name)
    }

    /// The first value of `name` in an `application/x-www-form-urlencoded` body (empty when the
    /// body is of another type).
    pub fn form_param(&self, name: &str) -> Option<String> {
        let content_type = self.header("Content-Type")?;
        let media_type = content_type.split(';').next().unwrap_or("").trim();
        if !media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return None;
        }
        let body = std::str::from_utf8(&self.body).ok()?;
        urlencoded_values(body, name).into_iter().next()
    }

    /// The bearer token of the `Authorization` header, as [`bearer`] reads it.
    pub fn bearer_token(&self) -> Result<&str, BearerError> {
        bearer(self.header("Authorization"))
    }
}

/// Why a request carries no usable bearer token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BearerError {
    /// No `Authorization` header, or one with another scheme.
    NotBearer,
    /// The `Bearer` scheme without a token.
    Empty,
}

impl BearerError {
    /// The one-line reason a `401` gives (the words upstream telemeter answers with).
    pub fn reason(self) -> &'static str {
        match self {
            BearerError::NotBearer => "Only bearer authorization allowed",
            BearerError::Empty => "Invalid Authorization header",
        }
    }
}

impl fmt::Display for BearerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for BearerError {}

/// THE bearer parser: the token of an `Authorization` header value (`None`: no header). The scheme
/// is matched case-insensitively and ends at the first space; the token is what follows, trimmed,
/// and is never empty. Every endpoint that takes a bearer token reads it with this function.
pub fn bearer(authorization: Option<&str>) -> Result<&str, BearerError> {
    let header = authorization.ok_or(BearerError::NotBearer)?.trim();
    let (scheme, token) = header.split_once(' ').unwrap_or((header, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(BearerError::NotBearer);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(BearerError::Empty);
    }
    Ok(token)
}

/// A function that writes a response body as it goes (for large responses such as `/federate`).
/// It runs on the connection's own thread, so a slow reader never holds a worker.
pub type StreamBody = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + Send>;

/// A response body.
pub enum Body {
    /// No body.
    Empty,
    /// A body known in full (sent with `Content-Length`).
    Bytes(Vec<u8>),
    /// A streamed body (sent chunked).
    Stream(StreamBody),
}

/// A response: status, headers and body.
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers to send, besides `Content-Length`/`Transfer-Encoding`/`Connection`, which the front sets.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
}

impl Response {
    /// An empty response with `status`.
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Empty,
        }
    }

    /// A `text/plain` response of one line (a newline is added).
    pub fn text(status: u16, line: &str) -> Response {
        Response::bytes(
            status,
            "text/plain; charset=utf-8",
            format!("{line}\n").into_bytes(),
        )
    }

    /// A response with a body of `content_type`.
    pub fn bytes(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: Body::Bytes(body),
        }
    }

    /// An `application/json` response.
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response::bytes(status, "application/json", body),
            Err(e) => Response::text(500, &format!("encoding the response failed: {e}")),
        }
    }

    /// A streamed response of `content_type`.
    pub fn stream(status: u16, content_type: &str, body: StreamBody) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: Body::Stream(body),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// The application behind a [`Server`].
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, request: Request) -> Response;

    /// Answers a request on one of [`Config::inline_paths`] that may be answered later, from
    /// another thread: a handler that will (its answer waits for work done elsewhere) takes the
    /// request's [`Later`] from `defer` and returns `None`, and the connection's thread goes on
    /// reading the next request meanwhile; otherwise it returns the answer. It returns `None`
    /// exactly when it took the [`Later`]. Default: [`Handler::handle`].
    fn handle_later(&self, request: Request, defer: Defer<'_>) -> Option<Response> {
        let _ = defer;
        Some(self.handle(request))
    }

    /// The largest body accepted for a request with this method and path; a declared length over it
    /// is answered `413` before any of the body is read, a chunked body as soon as it passes it.
    /// Default 64 KiB.
    fn body_limit(&self, _method: &str, _path: &str) -> usize {
        64 << 10
    }

    /// Decides on a request from its head alone, before any of its body is read or any memory is
    /// set aside for it: `Ok` with the body cap (and a [`Note`] for the handler, if any), or the
    /// response that refuses it (the connection is closed after it, since the body was not read).
    /// Runs on the connection's thread, so it must be cheap (a token's MAC, not a call to another
    /// service). Default: [`Handler::body_limit`].
    fn admit(&self, head: &Head, _remote: SocketAddr) -> Result<Admission, Response> {
        Ok(self.body_limit(&head.method, &head.path).into())
    }

    /// Told when the front answers `413` to a request whose head it admitted, because the body
    /// was over `limit` (declared, or as a chunked body arrived): the handler never sees that
    /// request, so this is where it counts and logs it. Default: nothing.
    fn body_too_large(&self, _head: &Head, _limit: usize, _remote: SocketAddr) {}
}

/// How a [`Server`] runs.
#[derive(Clone)]
pub struct Config {
    /// A name for logs (`external`, `internal`, `client`).
    pub name: String,
    /// Most connections open at once; more are answered `503` and closed.
    pub max_connections: usize,
    /// Most connections open at once from one peer address (an IPv4 address, or an IPv6 /64); at
    /// it, that peer's own longest-waiting idle connection is closed to make room, and only when
    /// all of them are busy is the new one answered `503`.
    pub max_connections_per_peer: usize,
    /// Worker threads running the handler.
    pub workers: usize,
    /// Time allowed to receive a whole request head.
    pub header_timeout: Duration,
    /// Time allowed to receive a whole body.
    pub body_timeout: Duration,
    /// How long a keep-alive connection may sit idle between requests.
    pub idle_timeout: Duration,
    /// Time allowed for each write to the peer.
    pub write_timeout: Duration,
    /// Largest request head, in bytes; also the cap on a chunked body's trailers and extensions.
    pub max_header_bytes: usize,
    /// Most body bytes held in memory over all connections at once; past it, `503` with `Retry-After`.
    pub max_body_bytes_in_flight: usize,
    /// Most body bytes held in memory for one peer address at once; past it, `503` with
    /// `Retry-After`.
    pub max_body_bytes_per_peer: usize,
    /// TLS, when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Paths whose requests the connection's own thread runs through the handler, instead of
    /// handing them to a worker and waiting for its answer: two thread wake-ups fewer per request.
    /// Only for a handler that bounds its own CPU and memory on these paths (the server's
    /// `/upload` gates both), since the worker pool no longer does: up to
    /// [`Config::max_connections`] of them may be in the handler at once.
    pub inline_paths: Vec<String>,
}

impl Default for Config {
    /// 1,024 connections (256 per peer), 2× cores workers (at least 4), 10 s head, 30 s body,
    /// 60 s idle, 30 s write, 16 KiB head, 128 MiB of bodies in flight (64 MiB per peer), no TLS,
    /// every request handed to a worker.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Config {
            name: "http".into(),
            max_connections: 1024,
            max_connections_per_peer: 256,
            workers: (2 * cores).max(4),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_header_bytes: 16 << 10,
            // Half of the server's memory bound (README, "Memory"): the other half is what
            // uploads hold past the front.
            max_body_bytes_in_flight: 128 << 20,
            max_body_bytes_per_peer: 64 << 20,
            tls: None,
            inline_paths: Vec::new(),
        }
    }
}

/// Why a server could not start.
#[derive(Debug)]
pub enum HttpError {
    /// The address could not be bound (in use, not permitted, not local).
    Bind {
        /// The address asked for.
        addr: String,
        /// The error.
        source: io::Error,
    },
    /// The address could not be parsed or resolved.
    Address(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Bind { addr, source } => match source.kind() {
                io::ErrorKind::AddrInUse => write!(f, "address {addr} is already in use"),
                io::ErrorKind::PermissionDenied => {
                    write!(f, "binding address {addr} is not permitted: {source}")
                }
                io::ErrorKind::AddrNotAvailable => {
                    write!(f, "address {addr} is not an address of this host: {source}")
                }
                _ => write!(f, "binding address {addr}: {source}"),
            },
            HttpError::Address(reason) => write!(f, "invalid listen address: {reason}"),
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpError::Bind { source, .. } => Some(source),
            HttpError::Address(_) => None,
        }
    }
}

/// Counters the front keeps, for its owner's `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections open now.
    pub open_connections: u64,
    /// Connections accepted since start.
    pub accepted_connections: u64,
    /// Connections refused because the cap was reached and every open one was busy.
    pub rejected_connections: u64,
    /// Connections refused because their peer address had [`Config::max_connections_per_peer`]
    /// open and every one of them was busy.
    pub peer_rejected_connections: u64,
    /// Connections closed to make room at a connection cap: first the one that had waited longest
    /// for or in a request head (idle keep-alive, silent, trickling), then a body that has stopped
    /// arriving; never a body still making progress nor a request being answered.
    pub evicted_connections: u64,
    /// Requests answered by the front itself with a protocol error (400, 408, 413, 417, 431, 501,
    /// 503, 505).
    pub protocol_errors: u64,
    /// Of those, bodies refused because their peer address held [`Config::max_body_bytes_per_peer`].
    pub peer_rejected_bodies: u64,
    /// Requests the handler refused from their head alone ([`Handler::admit`]), before their body.
    pub refused_heads: u64,
    /// Body bytes held in memory now, over all connections.
    pub body_bytes_in_flight: u64,
}

/// The reason phrase of a status line (only informative: clients read the code).
fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests;
