//! A small synchronous HTTP/1.1 server front that both binaries serve their endpoints with.
//!
//! Why not tiny_http: 0.12 starts one unbounded thread per connection, sets no socket deadlines, and
//! its TLS feature pins rustls 0.20 (RUSTSEC-2024-0336). This front owns exactly those parts:
//! - an accept loop with a cap on open connections (over it: `503` and close);
//! - one thread per open connection (small stack) that reads a request head under a total deadline
//!   and a body under its own deadline, so a client trickling bytes holds only its own thread;
//! - a fixed pool of worker threads running the [`Handler`] (CPU work is bounded by the pool size);
//! - optional TLS with rustls ≥ 0.23.5;
//! - the protocol errors answered here, one line each: `400` malformed, `408` too slow, `411` no
//!   length on a body, `413` body over the handler's limit (checked before reading it), `431` head too
//!   large, `503` too many connections or a full body budget;
//! - HTTP/1.1 keep-alive with an idle deadline, and `Connection: close`;
//! - graceful shutdown: stop accepting, finish in-flight requests, then return.

use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// One request, with its whole body read (up to the handler's limit).
#[derive(Debug)]
pub struct Request {
    /// The method, as sent (`GET`, `POST`, ...).
    pub method: String,
    /// The path, without the query string, percent-decoding not applied.
    pub path: String,
    /// The raw query string (without `?`), possibly empty.
    pub query: String,
    /// The headers in order; names as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The peer's address.
    pub remote: SocketAddr,
}

impl Request {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        todo!()
    }

    /// The first value of query parameter `name`, percent- and `+`-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_params(name).into_iter().next()
    }

    /// Every value of query parameter `name`, percent- and `+`-decoded, in order.
    pub fn query_params(&self, name: &str) -> Vec<String> {
        todo!()
    }

    /// The first value of `name` in an `application/x-www-form-urlencoded` body (empty when the
    /// body is of another type).
    pub fn form_param(&self, name: &str) -> Option<String> {
        todo!()
    }

    /// The bearer token of the `Authorization` header (scheme matched case-insensitively).
    pub fn bearer_token(&self) -> Option<&str> {
        todo!()
    }
}

/// Percent-decodes a URL component, `+` as space. `None` for malformed escapes or non-UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    todo!()
}

/// Percent-encodes a URL query component (unreserved characters kept).
pub fn percent_encode(text: &str) -> String {
    todo!()
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

    /// The largest body accepted for a request with this method and path; a declared length over it
    /// is answered `413` before any of the body is read. Default 64 KiB.
    fn body_limit(&self, _method: &str, _path: &str) -> usize {
        64 << 10
    }
}

/// How a [`Server`] runs.
#[derive(Clone)]
pub struct Config {
    /// A name for logs (`external`, `internal`, `client`).
    pub name: String,
    /// Most connections open at once; more are answered `503` and closed.
    pub max_connections: usize,
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
    /// Largest request head, in bytes.
    pub max_header_bytes: usize,
    /// Most body bytes held in memory over all connections at once; past it, `503` with `Retry-After`.
    pub max_body_bytes_in_flight: usize,
    /// TLS, when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for Config {
    /// 1,024 connections, 2× cores workers (at least 4), 10 s head, 30 s body, 60 s idle,
    /// 30 s write, 16 KiB head, 256 MiB of bodies in flight, no TLS.
    fn default() -> Self {
        todo!()
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
        todo!()
    }
}

impl std::error::Error for HttpError {}

/// Counters the front keeps, for its owner's `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections open now.
    pub open_connections: u64,
    /// Connections accepted since start.
    pub accepted_connections: u64,
    /// Connections refused because the cap was reached.
    pub rejected_connections: u64,
    /// Requests answered by the front itself with a protocol error (400, 408, 411, 413, 431, 503).
    pub protocol_errors: u64,
}

/// A bound, not yet running, server.
pub struct Server {
    _private: (),
}

impl Server {
    /// Binds `addr` (`host:port`).
    pub fn bind(
        addr: &str,
        config: Config,
        handler: Arc<dyn Handler>,
    ) -> Result<Server, HttpError> {
        todo!()
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        todo!()
    }

    /// Starts the accept loop and the workers on their own threads.
    pub fn spawn(self) -> ServerHandle {
        todo!()
    }
}

/// A running server.
pub struct ServerHandle {
    _private: (),
}

impl ServerHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        todo!()
    }

    /// The front's counters now.
    pub fn stats(&self) -> Stats {
        todo!()
    }

    /// Stops accepting, lets in-flight requests finish (up to `grace`), and joins the threads.
    pub fn shutdown(self, grace: Duration) {
        todo!()
    }
}
