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
//! - a fixed pool of worker threads running the [`Handler`] (CPU work is bounded by the pool size);
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

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufWriter, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::handoff;

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
        first_header(&self.headers, name)
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

    /// The bearer token of the `Authorization` header (scheme matched case-insensitively).
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.header("Authorization")?.trim();
        let (scheme, token) = value.split_once([' ', '\t'])?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let token = token.trim();
        (!token.is_empty()).then_some(token)
    }
}

/// Every value of `name` in `a=1&b=2` text, decoded; pairs that fail to decode are skipped.
fn urlencoded_values(text: &str, name: &str) -> Vec<String> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key)? == name).then(|| percent_decode(value))?
        })
        .collect()
}

/// Percent-decodes a URL component, `+` as space. `None` for malformed escapes or non-UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'+' => out.push(b' '),
            b'%' => {
                let high = hex_value(*bytes.get(i + 1)?)?;
                let low = hex_value(*bytes.get(i + 2)?)?;
                out.push(high << 4 | low);
                i += 2;
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Percent-encodes a URL query component (unreserved characters kept).
pub fn percent_encode(text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 15)]));
        }
    }
    out
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
    /// is answered `413` before any of the body is read, a chunked body as soon as it passes it.
    /// Default 64 KiB.
    fn body_limit(&self, _method: &str, _path: &str) -> usize {
        64 << 10
    }

    /// Decides on a request from its head alone, before any of its body is read or any memory is
    /// set aside for it: `Ok` with the body cap, or the response that refuses it (the connection is
    /// closed after it, since the body was not read). Runs on the connection's thread, so it must
    /// be cheap (a token's MAC, not a call to another service). Default: [`Handler::body_limit`].
    fn admit(&self, head: &Head, _remote: SocketAddr) -> Result<usize, Response> {
        Ok(self.body_limit(&head.method, &head.path))
    }
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
}

impl Default for Config {
    /// 1,024 connections (256 per peer), 2× cores workers (at least 4), 10 s head, 30 s body,
    /// 60 s idle, 30 s write, 16 KiB head, 128 MiB of bodies in flight (64 MiB per peer), no TLS.
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

/// The stack of a connection thread. It parses heads, drives rustls, and runs [`StreamBody`]
/// closures, which are written elsewhere; 256 KiB leaves room for those. Only touched pages cost
/// memory, so 1,000 idle connections stay at a few MiB of resident stack.
const CONNECTION_STACK_BYTES: usize = 256 << 10;

/// How long a closing connection keeps reading (and discarding) what the peer still sends, so the
/// kernel does not answer unread data with a reset that would destroy the error response.
const LINGER: Duration = Duration::from_secs(1);

/// The most bytes discarded while lingering.
const LINGER_BYTES: usize = 1 << 20;

/// Most header fields in a request head (httparse needs a fixed array; 128 is several times what
/// any client we serve sends).
pub const MAX_HEADERS: usize = 128;

/// Longest chunk-size line (size, extensions, CRLF), as Go's net/http allows.
pub const MAX_CHUNK_LINE: usize = 4096;

/// Body memory is set aside in steps of at least this much (or the whole body, when smaller), so
/// a body that stops arriving holds about what it sent.
const BODY_STEP: usize = 16 << 10;

/// A body that received bytes within this long is making progress and is not closed to make room
/// at the connection cap; one silent for longer may be, after every idle connection.
const BODY_PROGRESS_GRACE: Duration = Duration::from_secs(5);

/// How often a receiving body records its progress (a lock of the connection table each time).
const PROGRESS_MARK_EVERY: Duration = Duration::from_millis(250);

/// A bound, not yet running, server.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    config: Config,
    handler: Arc<dyn Handler>,
}

impl Server {
    /// Binds `addr` (`host:port`).
    pub fn bind(
        addr: &str,
        config: Config,
        handler: Arc<dyn Handler>,
    ) -> Result<Server, HttpError> {
        let candidates: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| HttpError::Address(format!("{addr}: {e}")))?
            .collect();
        if candidates.is_empty() {
            return Err(HttpError::Address(format!("{addr}: resolves to nothing")));
        }
        let listener = TcpListener::bind(&candidates[..]).map_err(|source| HttpError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
        let local = listener.local_addr().map_err(|source| HttpError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
        Ok(Server {
            listener,
            addr: local,
            config,
            handler,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the accept loop and the workers on their own threads.
    pub fn spawn(self) -> ServerHandle {
        let (jobs, queue) = handoff::queue::<Job>();
        let name = self.config.name.clone();
        let shared = Arc::new(Shared {
            addr: self.addr,
            listener: self.listener,
            config: self.config,
            handler: self.handler,
            stopping: AtomicBool::new(false),
            open: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            peer_rejected: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            peer_rejected_bodies: AtomicU64::new(0),
            refused_heads: AtomicU64::new(0),
            body_bytes_in_flight: AtomicUsize::new(0),
            jobs: Mutex::new(Some(jobs)),
            connections: Mutex::new(Table::default()),
            next_connection: AtomicU64::new(0),
        });
        let mut workers = Vec::new();
        for i in 0..shared.config.workers.max(1) {
            let queue = queue.clone();
            let handler = shared.handler.clone();
            let worker_name = name.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-worker-{i}"))
                .spawn(move || work(&worker_name, &*handler, queue));
            match spawned {
                Ok(worker) => workers.push(worker),
                Err(e) => log::error!("{name}: starting worker {i} failed: {e}"),
            }
        }
        let accept_shared = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(&accept_shared));
        let accept = match accept {
            Ok(accept) => Some(accept),
            Err(e) => {
                log::error!("{name}: starting the accept thread failed: {e}");
                None
            }
        };
        ServerHandle {
            shared,
            accept,
            workers,
        }
    }
}

/// A running server. Dropping it stops accepting and closes idle connections without waiting;
/// [`ServerHandle::shutdown`] also waits for in-flight requests.
pub struct ServerHandle {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The front's counters now.
    pub fn stats(&self) -> Stats {
        Stats {
            open_connections: self.shared.open.load(Ordering::SeqCst),
            accepted_connections: self.shared.accepted.load(Ordering::SeqCst),
            rejected_connections: self.shared.rejected.load(Ordering::SeqCst),
            peer_rejected_connections: self.shared.peer_rejected.load(Ordering::SeqCst),
            evicted_connections: self.shared.evicted.load(Ordering::SeqCst),
            protocol_errors: self.shared.protocol_errors.load(Ordering::SeqCst),
            peer_rejected_bodies: self.shared.peer_rejected_bodies.load(Ordering::SeqCst),
            refused_heads: self.shared.refused_heads.load(Ordering::SeqCst),
            body_bytes_in_flight: self.shared.body_bytes_in_flight.load(Ordering::SeqCst) as u64,
        }
    }

    /// Stops accepting, lets in-flight requests finish (up to `grace`), and joins the threads.
    pub fn shutdown(mut self, grace: Duration) {
        let name = self.shared.config.name.clone();
        self.shared.stop();
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let deadline = Instant::now() + grace;
        while self.shared.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = self.shared.open.load(Ordering::SeqCst);
        if left > 0 {
            log::warn!("{name}: closing {left} connections still busy after the grace period");
            self.shared.close_connections(true);
        }
        // Requests being read when shutdown began still reach the workers; now nothing more can
        // come, so closing the queue ends the workers. A handler stuck past the grace period is
        // left behind rather than hanging shutdown.
        self.shared
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let deadline = Instant::now() + grace.max(Duration::from_secs(1));
        for worker in std::mem::take(&mut self.workers) {
            while !worker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if worker.is_finished() {
                let _ = worker.join();
            } else {
                log::warn!("{name}: a worker is still busy after shutdown; leaving it behind");
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

type Job = (Request, handoff::ReplySender<Response>);

/// What the accept loop, connections and the handle share.
struct Shared {
    addr: SocketAddr,
    /// Kept here rather than in the accept thread so its descriptor stays open for as long as
    /// `stop` may shut it down to wake a blocked `accept`.
    listener: TcpListener,
    config: Config,
    handler: Arc<dyn Handler>,
    stopping: AtomicBool,
    open: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    peer_rejected: AtomicU64,
    evicted: AtomicU64,
    protocol_errors: AtomicU64,
    peer_rejected_bodies: AtomicU64,
    refused_heads: AtomicU64,
    body_bytes_in_flight: AtomicUsize,
    /// Taken once shutdown has drained the connections, which ends the workers. Without a
    /// shutdown, the queue closes when the last holder of `Shared` goes.
    jobs: Mutex<Option<handoff::Sender<Job>>>,
    connections: Mutex<Table>,
    next_connection: AtomicU64,
}

/// Whose connections and body bytes count together: an IPv4 address, or an IPv6 /64 (one host
/// usually has a whole /64, so counting single IPv6 addresses would cap nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PeerKey(IpAddr);

impl PeerKey {
    fn of(ip: IpAddr) -> PeerKey {
        PeerKey(match ip {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
        })
    }
}

/// What one peer address holds now.
#[derive(Default)]
struct PeerUsage {
    connections: usize,
    body_bytes: usize,
}

/// The open connections and what each peer address holds, under one lock.
#[derive(Default)]
struct Table {
    connections: HashMap<u64, Tracked>,
    peers: HashMap<PeerKey, PeerUsage>,
}

impl Table {
    /// Forgets `peer` once it holds nothing, so the map only grows with peers that hold something.
    fn forget_if_unused(&mut self, peer: PeerKey) {
        if self
            .peers
            .get(&peer)
            .is_some_and(|u| u.connections == 0 && u.body_bytes == 0)
        {
            self.peers.remove(&peer);
        }
    }
}

/// What a connection is doing, as eviction at the connection cap sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request or receiving its head (idle keep-alive, silent, trickling) since
    /// then: nothing authenticated it yet. Evicted first, longest waiting first.
    Waiting(Instant),
    /// Receiving an admitted body; the time is when bytes last arrived. Evicted only once silent
    /// for [`BODY_PROGRESS_GRACE`], and only when no connection is waiting.
    Body(Instant),
    /// Its request is complete and being handled or answered: never evicted.
    Busy,
}

/// An open connection as shutdown and eviction see it. The descriptor stays valid while the entry
/// exists: a connection removes its entry (under the lock) before closing its socket, and
/// `shutdown(2)` is only called under the lock.
struct Tracked {
    fd: RawFd,
    peer: PeerKey,
    idle: bool,
    closed_by_server: bool,
    phase: Phase,
}

/// Why a body could not grow.
enum BudgetFull {
    /// Over [`Config::max_body_bytes_in_flight`].
    All,
    /// Over [`Config::max_body_bytes_per_peer`].
    Peer,
}

impl Shared {
    fn connections(&self) -> MutexGuard<'_, Table> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes idle connections; idempotent, does not wait.
    fn stop(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.wake_accept();
        self.close_connections(false);
    }

    fn wake_accept(&self) {
        // On Linux, shutting a listening socket down wakes a blocked accept() with an error.
        // SAFETY: the descriptor is the listener's, still open (see `listener_fd`).
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        // Elsewhere that may not wake it; a connection to ourselves does.
        let mut target = self.addr;
        if target.ip().is_unspecified() {
            target.set_ip(match target {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&target, Duration::from_millis(200));
    }

    /// Shuts down idle connections (all of them when `busy_too`), which wakes their blocked reads.
    fn close_connections(&self, busy_too: bool) {
        for tracked in self.connections().connections.values_mut() {
            if tracked.idle || busy_too {
                tracked.closed_by_server = true;
                // SAFETY: see `Tracked`: the descriptor is open while its entry exists.
                unsafe {
                    libc::shutdown(tracked.fd, libc::SHUT_RDWR);
                }
            }
        }
    }

    /// Decides whether a new connection from `peer` may be served, making room at a cap when it
    /// can; on success the connection is counted for its peer (the caller counts `open`).
    ///
    /// At a cap, the connection closed is the one that has waited longest for or in a request head
    /// (idle keep-alive, silent, trickling): nothing has authenticated those, and without this a
    /// crowd of slow or idle sockets would hold every slot so that a normal client only ever got
    /// 503; with it, they evict each other, while a client that sends its request promptly is past
    /// its head before it becomes the oldest. Only when none is waiting is a body that has stopped
    /// arriving closed. A body still arriving (an upload over a slow link) and a request being
    /// answered are never closed. At the per-peer cap only that peer's own connections are
    /// candidates, so clients behind one NAT recycle their own idle connections.
    fn admit_connection(&self, peer: PeerKey) -> Result<(), Refused> {
        let config = &self.config;
        let mut table = self.connections();
        let held = table.peers.get(&peer).map_or(0, |u| u.connections);
        let peer_cap = config.max_connections_per_peer.max(1);
        let mut made_room = false;
        if held >= peer_cap {
            // Evicted connections leave within moments of their shutdown; the slack bounds how
            // many may still be on their way out while new ones come in.
            if held < peer_cap + peer_cap / 8 + 1 && self.evict(&mut table, Some(peer)) {
                made_room = true;
            } else {
                return Err(Refused::Peer);
            }
        }
        let open = self.open.load(Ordering::SeqCst);
        let cap = config.max_connections as u64;
        if open >= cap && !(open < cap + cap / 8 + 1 && (made_room || self.evict(&mut table, None)))
        {
            return Err(Refused::All);
        }
        table.peers.entry(peer).or_default().connections += 1;
        Ok(())
    }

    /// Closes one connection to make room (see [`Shared::admit_connection`]); only `peer`'s when
    /// given. False when none may be closed.
    fn evict(&self, table: &mut Table, peer: Option<PeerKey>) -> bool {
        let now = Instant::now();
        let victim = table
            .connections
            .values_mut()
            .filter(|t| !t.closed_by_server && peer.is_none_or(|p| t.peer == p))
            .filter_map(|t| match t.phase {
                Phase::Waiting(since) => Some(((0, since), t)),
                Phase::Body(progress) if now.duration_since(progress) >= BODY_PROGRESS_GRACE => {
                    Some(((1, progress), t))
                }
                Phase::Body(_) | Phase::Busy => None,
            })
            .min_by_key(|(order, _)| *order);
        match victim {
            Some((_, tracked)) => {
                tracked.closed_by_server = true;
                // SAFETY: see `Tracked`: the descriptor is open while its entry exists.
                unsafe {
                    libc::shutdown(tracked.fd, libc::SHUT_RDWR);
                }
                self.evicted.fetch_add(1, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Uncounts a connection of `peer` (admitted by [`Shared::admit_connection`]).
    fn release_connection(&self, peer: PeerKey) {
        let mut table = self.connections();
        if let Some(usage) = table.peers.get_mut(&peer) {
            usage.connections = usage.connections.saturating_sub(1);
        }
        table.forget_if_unused(peer);
    }

    fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Ordering::SeqCst);
    }

    /// Sets `bytes` more of the body budget aside for `peer`, within both budgets.
    fn reserve_body(&self, peer: PeerKey, bytes: usize) -> Result<(), BudgetFull> {
        let mut table = self.connections();
        let usage = table.peers.entry(peer).or_default();
        let peer_total = usage.body_bytes.saturating_add(bytes);
        if peer_total > self.config.max_body_bytes_per_peer {
            drop(table);
            self.peer_rejected_bodies.fetch_add(1, Ordering::SeqCst);
            return Err(BudgetFull::Peer);
        }
        let limit = self.config.max_body_bytes_in_flight;
        self.body_bytes_in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .map_err(|_| BudgetFull::All)?;
        usage.body_bytes = peer_total;
        Ok(())
    }

    fn release_body(&self, peer: PeerKey, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.body_bytes_in_flight.fetch_sub(bytes, Ordering::SeqCst);
        let mut table = self.connections();
        if let Some(usage) = table.peers.get_mut(&peer) {
            usage.body_bytes = usage.body_bytes.saturating_sub(bytes);
        }
        table.forget_if_unused(peer);
    }
}

/// Which connection cap refused a new connection.
enum Refused {
    All,
    Peer,
}

/// A request body as it arrives, with the budget it holds. Memory is set aside in steps as bytes
/// arrive ([`BODY_STEP`], or half again what is held), never for what was only declared, so a
/// peer that declares a large body and stalls holds about what it sent.
struct BodyBuffer {
    shared: Arc<Shared>,
    peer: PeerKey,
    bytes: Vec<u8>,
    /// Budget held: the capacity asked for.
    reserved: usize,
    /// The body's size when known (Content-Length), else its cap; memory never grows past it.
    most: usize,
}

impl BodyBuffer {
    fn new(shared: Arc<Shared>, peer: PeerKey, most: usize) -> BodyBuffer {
        BodyBuffer {
            shared,
            peer,
            bytes: Vec::new(),
            reserved: 0,
            most,
        }
    }

    /// Appends `data` (the caller has checked it stays within `most`), setting more budget aside
    /// first when the buffer is full.
    fn append(&mut self, data: &[u8]) -> Result<(), BudgetFull> {
        let needed = self.bytes.len() + data.len();
        if needed > self.reserved {
            let step = BODY_STEP.max(self.reserved / 2);
            let target = needed.max(self.reserved.saturating_add(step).min(self.most));
            self.shared
                .reserve_body(self.peer, target - self.reserved)?;
            self.reserved = target;
            self.bytes.reserve_exact(target - self.bytes.len());
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    /// The body, leaving the budget held until this buffer drops (after the answer is written, so
    /// the budget covers the handler's use of the body).
    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

impl Drop for BodyBuffer {
    fn drop(&mut self) {
        self.shared.release_body(self.peer, self.reserved);
    }
}

fn work(name: &str, handler: &dyn Handler, queue: handoff::Receiver<Job>) {
    for (request, reply) in queue.iter() {
        let what = format!("{} {}", request.method, request.path);
        let response = match catch_unwind(AssertUnwindSafe(|| handler.handle(request))) {
            Ok(response) => response,
            Err(panic) => {
                log::error!(
                    "{name}: the handler panicked on {what}: {}",
                    panic_message(&*panic)
                );
                Response::text(500, "internal error")
            }
        };
        // The connection may be gone (shutdown, peer reset); nothing to do then.
        reply.send(response);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "(no message)"
    }
}

fn accept_loop(shared: &Arc<Shared>) {
    let name = &shared.config.name;
    loop {
        let accepted = shared.listener.accept();
        if shared.stopping() {
            return;
        }
        let (tcp, remote) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                log::warn!("{name}: accept failed: {e}");
                // Out of descriptors and the like: do not spin while it lasts.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let peer = PeerKey::of(remote.ip());
        match shared.admit_connection(peer) {
            Ok(()) => {}
            Err(Refused::All) => {
                shared.rejected.fetch_add(1, Ordering::SeqCst);
                log::debug!(
                    "{name}: refusing {remote}: {} connections open",
                    shared.open.load(Ordering::SeqCst)
                );
                refuse(tcp, "too many connections");
                continue;
            }
            Err(Refused::Peer) => {
                shared.peer_rejected.fetch_add(1, Ordering::SeqCst);
                log::debug!("{name}: refusing {remote}: too many connections from its address");
                refuse(tcp, "too many connections from your address");
                continue;
            }
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        let connection_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-conn"))
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || serve_connection(connection_shared, tcp, remote, peer));
        if let Err(e) = spawned {
            shared.open.fetch_sub(1, Ordering::SeqCst);
            shared.release_connection(peer);
            shared.rejected.fetch_add(1, Ordering::SeqCst);
            log::warn!("{name}: starting a connection thread for {remote} failed: {e}");
        }
    }
}

/// Answers `503` on a fresh connection from the accept thread, never blocking it.
fn refuse(mut tcp: TcpStream, reason: &str) {
    let _ = tcp.set_nonblocking(true);
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{reason}\n",
        reason.len() + 1
    );
    let _ = tcp.write_all(response.as_bytes());
    let _ = tcp.shutdown(std::net::Shutdown::Write);
}

/// A socket whose reads share one deadline, so a peer trickling bytes cannot stretch a phase
/// (head, body, idle wait, TLS handshake) past its time, however many reads it takes.
struct Deadlined {
    tcp: TcpStream,
    deadline: Option<Instant>,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.tcp.set_read_timeout(Some(left))?;
        }
        self.tcp.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

enum Stream {
    Plain(Deadlined),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, Deadlined>>),
}

impl Stream {
    fn socket(&mut self) -> &mut Deadlined {
        match self {
            Stream::Plain(socket) => socket,
            Stream::Tls(tls) => &mut tls.sock,
        }
    }

    fn set_deadline(&mut self, deadline: Instant) {
        self.socket().deadline = Some(deadline);
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(socket) => socket.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// One open connection; dropping it forgets it in the tracking table before the socket closes.
struct Connection {
    shared: Arc<Shared>,
    id: u64,
    remote: SocketAddr,
    peer: PeerKey,
    stream: Stream,
    /// Bytes read past the current request (the next pipelined request, or the start of a body).
    pending: Vec<u8>,
    /// When a body being received last recorded its progress in the table.
    progress_marked: Instant,
}

impl Drop for Connection {
    fn drop(&mut self) {
        {
            let mut table = self.shared.connections();
            table.connections.remove(&self.id);
            if let Some(usage) = table.peers.get_mut(&self.peer) {
                usage.connections = usage.connections.saturating_sub(1);
            }
            table.forget_if_unused(self.peer);
        }
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request read and checked, with what the front needs to answer it.
struct Parsed {
    request: Request,
    http10: bool,
    head_only: bool,
    /// Close after answering (asked by the peer, HTTP/1.0, or shutting down).
    close: bool,
    /// Released once the answer is written, so the budget covers the handler's use of the body.
    _body: BodyBuffer,
}

/// Why a connection stops reading requests.
enum Stop {
    /// Close quietly: the peer left, went idle past its time, or we are shutting down.
    Close,
    /// Answer this protocol error, then close.
    Refuse(Response),
    /// Answer the handler's refusal of a head ([`Handler::admit`]), then close: its body, if
    /// any, was not read.
    Refused(Response),
}

impl From<RequestError> for Stop {
    fn from(e: RequestError) -> Stop {
        Stop::Refuse(Response::text(e.status(), &e.to_string()))
    }
}

impl From<BudgetFull> for Stop {
    fn from(full: BudgetFull) -> Stop {
        let reason = match full {
            BudgetFull::All => "too many request bodies in flight; retry",
            BudgetFull::Peer => "too many request bodies in flight from your address; retry",
        };
        Stop::Refuse(Response::text(503, reason).with_header("Retry-After", "1"))
    }
}

fn serve_connection(shared: Arc<Shared>, tcp: TcpStream, remote: SocketAddr, peer: PeerKey) {
    let accepted_at = Instant::now();
    let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
    shared.connections().connections.insert(
        id,
        Tracked {
            fd: tcp.as_raw_fd(),
            peer,
            idle: true,
            closed_by_server: false,
            phase: Phase::Waiting(accepted_at),
        },
    );
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_write_timeout(Some(shared.config.write_timeout));
    let socket = Deadlined {
        tcp,
        deadline: Some(accepted_at + shared.config.header_timeout),
    };
    let stream = match &shared.config.tls {
        None => Stream::Plain(socket),
        Some(tls) => match rustls::ServerConnection::new(tls.clone()) {
            Ok(session) => Stream::Tls(Box::new(rustls::StreamOwned::new(session, socket))),
            Err(e) => {
                log::warn!("{}: starting TLS for {remote}: {e}", shared.config.name);
                shared.connections().connections.remove(&id);
                shared.release_connection(peer);
                shared.open.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        },
    };
    let mut connection = Connection {
        shared,
        id,
        remote,
        peer,
        stream,
        pending: Vec::new(),
        progress_marked: accepted_at,
    };
    // A panic in a stream body or here must still close the connection and release its slot,
    // which `Connection`'s drop does during unwinding; catching it keeps the log tidy.
    let name = connection.shared.config.name.clone();
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| connection.run(accepted_at))) {
        log::error!(
            "{name}: connection from {remote} panicked: {}",
            panic_message(&*panic)
        );
    }
}

impl Connection {
    fn config(&self) -> &Config {
        &self.shared.config
    }

    fn run(&mut self, accepted_at: Instant) {
        let mut first = true;
        loop {
            let head_deadline = match self.wait_for_request(first, accepted_at) {
                Some(deadline) => deadline,
                None => return,
            };
            first = false;
            let (response, refused_head) = match self.read_request(head_deadline) {
                Ok(parsed) => {
                    if !self.set_phase(Phase::Busy) || !self.answer(parsed) {
                        return;
                    }
                    continue;
                }
                Err(Stop::Close) => return,
                Err(Stop::Refuse(response)) => {
                    self.shared.protocol_error();
                    (response, false)
                }
                Err(Stop::Refused(response)) => {
                    self.shared.refused_heads.fetch_add(1, Ordering::SeqCst);
                    (response, true)
                }
            };
            log::debug!(
                "{}: {} from {}{}",
                self.config().name,
                response.status,
                self.remote,
                if refused_head {
                    " (refused by the handler)"
                } else {
                    ""
                }
            );
            let _ = self.write_response(response, false, false, true);
            self.linger();
            return;
        }
    }

    /// Waits for the first byte of a request while marked idle (so shutdown may close us), and
    /// returns the deadline for the whole head; `None` to close.
    fn wait_for_request(&mut self, first: bool, accepted_at: Instant) -> Option<Instant> {
        if !self.set_idle(true) {
            return None;
        }
        if self.pending.is_empty() {
            let deadline = if first {
                accepted_at + self.config().header_timeout
            } else {
                Instant::now() + self.config().idle_timeout
            };
            self.stream.set_deadline(deadline);
            match self.fill() {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        if !self.set_idle(false) {
            return None;
        }
        Some(if first {
            accepted_at + self.config().header_timeout
        } else {
            Instant::now() + self.config().header_timeout
        })
    }

    /// Marks the connection idle (waiting for a request) or not (receiving one); false when
    /// shutdown or eviction has claimed it. A head being received keeps the time its wait began,
    /// so a trickled head stays first in line for eviction.
    fn set_idle(&self, idle: bool) -> bool {
        let mut table = self.shared.connections();
        match table.connections.get_mut(&self.id) {
            Some(tracked) if !(tracked.closed_by_server || idle && self.shared.stopping()) => {
                tracked.idle = idle;
                if idle {
                    tracked.phase = Phase::Waiting(Instant::now());
                }
                true
            }
            _ => false,
        }
    }

    /// Records what the connection is doing; false when eviction or shutdown has claimed it.
    fn set_phase(&self, phase: Phase) -> bool {
        let mut table = self.shared.connections();
        match table.connections.get_mut(&self.id) {
            Some(tracked) if !tracked.closed_by_server => {
                tracked.phase = phase;
                true
            }
            _ => false,
        }
    }

    /// Reads more bytes into `pending`; the count read (0 at end of stream).
    fn fill(&mut self) -> io::Result<usize> {
        // Read into the stack, not into spare heap capacity, so an idle connection blocked here
        // holds no buffer of its own.
        let mut chunk = [0u8; 4096];
        let read = self.stream.read(&mut chunk)?;
        self.pending
            .extend_from_slice(chunk.get(..read).unwrap_or(&[]));
        Ok(read)
    }

    /// Reads some body bytes into `buf` under the body deadline, recording progress now and then.
    fn read_body_bytes(&mut self, buf: &mut [u8]) -> Result<usize, Stop> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => return Err(Stop::Close),
                Ok(n) => {
                    let now = Instant::now();
                    if now.duration_since(self.progress_marked) >= PROGRESS_MARK_EVERY {
                        self.progress_marked = now;
                        // An eviction shows on the next read, as the end of the stream.
                        self.set_phase(Phase::Body(now));
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    return Err(Stop::Refuse(Response::text(
                        408,
                        "the request body took too long",
                    )))
                }
                Err(_) => return Err(Stop::Close),
            }
        }
    }

    /// Reads and checks one request: head, the handler's admission, body.
    fn read_request(&mut self, deadline: Instant) -> Result<Parsed, Stop> {
        let max = self.config().max_header_bytes;
        self.stream.set_deadline(deadline);
        let mut scanned = 0;
        let head_end = loop {
            // Empty lines before a request line are ignored (RFC 9112 §2.2): some clients send a
            // CRLF after a body.
            let blank = leading_empty_lines(&self.pending);
            if blank > 0 {
                self.pending.drain(..blank);
                scanned = 0;
            }
            if let Some(end) = head_end(&self.pending, &mut scanned, max)? {
                break end;
            }
            match self.fill() {
                Ok(0) => return Err(Stop::Close),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) && !self.pending.is_empty() => {
                    return Err(Stop::Refuse(Response::text(
                        408,
                        "the request head took too long",
                    )))
                }
                Err(_) => return Err(Stop::Close),
            }
        };
        let head = parse_head(self.pending.get(..head_end).unwrap_or(&[]))?;
        self.pending.drain(..head_end);
        let framing = framing(&head)?;
        let limit = self
            .shared
            .handler
            .admit(&head, self.remote)
            .map_err(Stop::Refused)?;
        let most = match framing {
            Framing::Length(length) if length > limit => {
                return Err(RequestError::BodyTooLarge {
                    declared: Some(length as u64),
                    limit,
                }
                .into())
            }
            Framing::Length(length) => length,
            Framing::Chunked => limit,
        };
        let has_body = framing != Framing::Length(0);
        if let Some(expect) = head.header("Expect") {
            if !expect.eq_ignore_ascii_case("100-continue") {
                return Err(RequestError::Expectation.into());
            }
            let arrived = match framing {
                Framing::Length(length) => self.pending.len() >= length,
                Framing::Chunked => !self.pending.is_empty(),
            };
            if !head.http10 && has_body && !arrived {
                let sent = self
                    .stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .and_then(|()| self.stream.flush());
                if sent.is_err() {
                    return Err(Stop::Close);
                }
            }
        }
        let mut body = BodyBuffer::new(self.shared.clone(), self.peer, most);
        if has_body {
            let now = Instant::now();
            self.progress_marked = now;
            if !self.set_phase(Phase::Body(now)) {
                return Err(Stop::Close);
            }
            self.stream.set_deadline(now + self.config().body_timeout);
            match framing {
                Framing::Length(length) => self.read_sized_body(length, &mut body)?,
                Framing::Chunked => self.read_chunked_body(limit, &mut body)?,
            }
        }
        // A large head or a chunked body's reads may have grown the buffer; an idle keep-alive
        // connection should not keep that.
        if self.pending.capacity() > 2 * BODY_STEP {
            self.pending.shrink_to(4 << 10);
        }
        let close = head.wants_close() || self.shared.stopping();
        let head_only = head.method == "HEAD";
        let request = Request {
            method: head.method,
            path: head.path,
            query: head.query,
            headers: head.headers,
            body: body.take(),
            remote: self.remote,
        };
        Ok(Parsed {
            request,
            http10: head.http10,
            head_only,
            close,
            _body: body,
        })
    }

    /// Reads a body of `length` bytes (already checked against the cap).
    fn read_sized_body(&mut self, length: usize, body: &mut BodyBuffer) -> Result<(), Stop> {
        let from_pending = length.min(self.pending.len());
        body.append(self.pending.get(..from_pending).unwrap_or(&[]))?;
        self.pending.drain(..from_pending);
        // Read straight into the stack, never past the body: what follows it stays unread.
        let mut chunk = [0u8; BODY_STEP];
        while body.bytes.len() < length {
            let want = (length - body.bytes.len()).min(chunk.len());
            let read = self.read_body_bytes(&mut chunk[..want])?;
            body.append(chunk.get(..read).unwrap_or(&[]))?;
        }
        Ok(())
    }

    /// Reads a chunked body of at most `limit` bytes; bytes past its end stay in `pending`.
    fn read_chunked_body(&mut self, limit: usize, body: &mut BodyBuffer) -> Result<(), Stop> {
        let mut decoder = ChunkedDecoder::new(limit, self.config().max_header_bytes);
        let mut chunk = [0u8; BODY_STEP];
        loop {
            // Steps move a cursor; `pending` is drained once per read, not once per chunk.
            let mut at = 0;
            while !decoder.is_done() {
                let input = self.pending.get(at..).unwrap_or(&[]);
                let step = decoder.step(input)?;
                if step.consumed == 0 {
                    break;
                }
                body.append(input.get(step.data).unwrap_or(&[]))?;
                at += step.consumed;
            }
            self.pending.drain(..at);
            if decoder.is_done() {
                return Ok(());
            }
            let read = self.read_body_bytes(&mut chunk)?;
            self.pending
                .extend_from_slice(chunk.get(..read).unwrap_or(&[]));
        }
    }

    /// Hands the request to the workers and writes their answer; false to close the connection.
    fn answer(&mut self, parsed: Parsed) -> bool {
        let Parsed {
            request,
            http10,
            head_only,
            mut close,
            _body,
        } = parsed;
        let (reply, answer) = handoff::oneshot();
        {
            // Queued under the lock rather than with a clone of the sender: a clone and its drop
            // would take the queue's own lock twice more, against every worker.
            let jobs = self.shared.jobs.lock().unwrap_or_else(|e| e.into_inner());
            match jobs.as_ref() {
                // With the workers gone the job is given back and dropped, and so is its reply
                // sender.
                Some(jobs) => drop(jobs.send((request, reply))),
                // Shutting down: no queue to take it.
                None => drop(reply),
            }
        }
        // `None`: shutting down, or the workers are gone.
        let response = match answer.recv() {
            Some(response) => response,
            None => {
                close = true;
                Response::text(503, "shutting down")
            }
        };
        drop(_body);
        if self.shared.stopping() {
            close = true;
        }
        match self.write_response(response, http10, head_only, close) {
            Ok(keep_alive) => keep_alive,
            Err(e) => {
                log::debug!(
                    "{}: writing a response to {}: {e}",
                    self.config().name,
                    self.remote
                );
                false
            }
        }
    }

    /// Writes `response`; whether the connection may carry another request.
    fn write_response(
        &mut self,
        response: Response,
        http10: bool,
        head_only: bool,
        mut close: bool,
    ) -> io::Result<bool> {
        let Response {
            mut status,
            headers,
            body,
        } = response;
        if !(200..=599).contains(&status) {
            log::error!(
                "{}: the handler answered status {status}; sending 500",
                self.config().name
            );
            status = 500;
        }
        if headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
        }) {
            close = true;
        }
        // HTTP/1.0 has no chunked encoding: a streamed body ends where the connection does.
        let chunked = matches!(body, Body::Stream(_)) && !http10;
        if matches!(body, Body::Stream(_)) && http10 {
            close = true;
        }
        let mut head = String::with_capacity(256);
        head.push_str("HTTP/1.1 ");
        head.push_str(&status.to_string());
        head.push(' ');
        head.push_str(reason_phrase(status));
        head.push_str("\r\n");
        for (name, value) in &headers {
            let framing = ["content-length", "transfer-encoding", "connection"]
                .iter()
                .any(|f| name.eq_ignore_ascii_case(f));
            let unsafe_text = !is_token(name) || value.bytes().any(|b| b == b'\r' || b == b'\n');
            if framing {
                continue;
            }
            if unsafe_text {
                log::error!(
                    "{}: dropping response header {name:?} with characters that would split the response",
                    self.config().name
                );
                continue;
            }
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        let no_body_status = status == 204 || status == 304;
        match &body {
            _ if no_body_status => {}
            Body::Empty => head.push_str("Content-Length: 0\r\n"),
            Body::Bytes(bytes) => head.push_str(&format!("Content-Length: {}\r\n", bytes.len())),
            Body::Stream(_) if chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
            Body::Stream(_) => {}
        }
        if close {
            head.push_str("Connection: close\r\n");
        } else if http10 {
            head.push_str("Connection: keep-alive\r\n");
        }
        head.push_str("\r\n");

        let name = self.shared.config.name.clone();
        let mut out = BufWriter::with_capacity(8 << 10, &mut self.stream);
        out.write_all(head.as_bytes())?;
        if !head_only && !no_body_status {
            match body {
                Body::Empty => {}
                Body::Bytes(bytes) => out.write_all(&bytes)?,
                Body::Stream(write_body) => {
                    let written = if chunked {
                        let mut chunks = BufWriter::with_capacity(16 << 10, Chunked(&mut out));
                        let written = write_body(&mut chunks).and_then(|()| chunks.flush());
                        drop(chunks);
                        written.and_then(|()| out.write_all(b"0\r\n\r\n"))
                    } else {
                        write_body(&mut out)
                    };
                    if let Err(e) = written {
                        // Without the last chunk the peer sees a broken body, not a short one.
                        log::warn!("{name}: a streamed response body failed: {e}");
                        return Ok(false);
                    }
                }
            }
        }
        out.flush()?;
        drop(out);
        if close {
            if let Stream::Tls(tls) = &mut self.stream {
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
        Ok(!close)
    }

    /// Closes our side, then reads and drops what the peer still sends for a moment, so an error
    /// response is not lost to a reset caused by unread request bytes.
    fn linger(&mut self) {
        let socket = self.stream.socket();
        let _ = socket.tcp.shutdown(std::net::Shutdown::Write);
        socket.deadline = Some(Instant::now() + LINGER);
        let mut discarded = 0;
        let mut sink = [0u8; 4096];
        while discarded < LINGER_BYTES {
            match socket.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    }
}

/// Wraps each write in one HTTP/1.1 chunk.
struct Chunked<W: Write>(W);

impl<W: Write> Write for Chunked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.0, "{:x}\r\n", buf.len())?;
        self.0.write_all(buf)?;
        self.0.write_all(b"\r\n")?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// A request head, as [`Handler::admit`] sees it before any of the body is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The method, as sent.
    pub method: String,
    /// The path, without the query string, percent-decoding not applied.
    pub path: String,
    /// The raw query string (without `?`), possibly empty.
    pub query: String,
    /// The header fields in order; names as sent, values without surrounding blanks.
    pub headers: Vec<(String, String)>,
    /// Whether the request is HTTP/1.0 (else HTTP/1.1).
    pub http10: bool,
}

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        first_header(&self.headers, name)
    }

    /// Whether the `Connection` header lists `token`.
    fn connection_has(&self, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn wants_close(&self) -> bool {
        if self.http10 {
            !self.connection_has("keep-alive")
        } else {
            self.connection_has("close")
        }
    }
}

/// The first value of header `name` among `headers` (case-insensitive).
fn first_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
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
fn leading_empty_lines(buf: &[u8]) -> usize {
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
    let mut headers = Vec::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let value = std::str::from_utf8(field.value)
            .map_err(|_| RequestError::Malformed("a header value is not UTF-8"))?;
        headers.push((
            field.name.to_owned(),
            value.trim_matches([' ', '\t']).to_owned(),
        ));
    }
    Ok(Head {
        method: method.to_owned(),
        path: path.to_owned(),
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
enum ChunkState {
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
fn is_field_line(line: &[u8]) -> bool {
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
fn is_token(text: &str) -> bool {
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
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::path::Path;

    /// Routes for the tests: each exercises one behaviour of the front.
    struct TestApp {
        slow_started: Mutex<Option<crossbeam_channel::Sender<()>>>,
    }

    impl Handler for TestApp {
        fn handle(&self, request: Request) -> Response {
            match request.path.as_str() {
                "/hello" => Response::text(200, "hello"),
                "/guarded" => Response::text(
                    200,
                    &format!("guarded {}", String::from_utf8_lossy(&request.body)),
                ),
                "/echo" => Response::bytes(200, "application/octet-stream", request.body),
                "/query" => {
                    Response::text(200, &request.query_param("q").unwrap_or_else(|| "-".into()))
                }
                "/slow" => {
                    if let Some(started) = &*self.slow_started.lock().unwrap() {
                        let _ = started.send(());
                    }
                    std::thread::sleep(Duration::from_millis(300));
                    Response::text(200, "slow done")
                }
                "/panic" => panic!("test handler panics on purpose"),
                "/stream-panic" => Response::stream(
                    200,
                    "text/plain",
                    Box::new(|out: &mut dyn Write| {
                        out.write_all(&[b'x'; 100_000])?;
                        panic!("test stream body panics on purpose")
                    }),
                ),
                "/stream" => Response::stream(
                    200,
                    "text/plain",
                    Box::new(|out: &mut dyn Write| {
                        for i in 0..2000 {
                            writeln!(out, "line {i}")?;
                        }
                        Ok(())
                    }),
                ),
                _ => Response::text(404, "not found"),
            }
        }

        fn body_limit(&self, _method: &str, path: &str) -> usize {
            if path == "/echo" {
                64 << 10
            } else {
                1024
            }
        }

        fn admit(&self, head: &Head, _remote: SocketAddr) -> Result<usize, Response> {
            match (head.path.as_str(), head.header("X-Key")) {
                ("/guarded", Some("open")) => Ok(10),
                ("/guarded", _) => Err(Response::text(401, "no key")),
                (path, _) => Ok(self.body_limit(&head.method, path)),
            }
        }
    }

    fn test_config() -> Config {
        Config {
            name: "test".into(),
            max_connections: 200,
            max_connections_per_peer: 200,
            workers: 2,
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(5),
            max_header_bytes: 4096,
            max_body_bytes_in_flight: 1 << 20,
            max_body_bytes_per_peer: 1 << 20,
            tls: None,
        }
    }

    fn start_with(config: Config, app: TestApp) -> ServerHandle {
        Server::bind("127.0.0.1:0", config, Arc::new(app))
            .unwrap()
            .spawn()
    }

    fn start(config: Config) -> ServerHandle {
        start_with(
            config,
            TestApp {
                slow_started: Mutex::new(None),
            },
        )
    }

    fn connect(server: &ServerHandle) -> BufReader<TcpStream> {
        let stream = TcpStream::connect(server.local_addr()).unwrap();
        // Every wait in the tests is bounded by this.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        BufReader::new(stream)
    }

    fn send(client: &mut BufReader<TcpStream>, bytes: &[u8]) {
        client.get_mut().write_all(bytes).unwrap();
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    /// Reads one response; `head_only` for answers to HEAD.
    fn read_reply(client: &mut impl BufRead, head_only: bool) -> Reply {
        let mut line = String::new();
        client.read_line(&mut line).unwrap();
        let status: u16 = line
            .split(' ')
            .nth(1)
            .unwrap_or_else(|| panic!("no status line: {line:?}"))
            .parse()
            .unwrap();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            client.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status == 100 {
            return reply;
        }
        if let Some(length) = reply.header("Content-Length") {
            let mut body = vec![0; length.parse().unwrap()];
            client.read_exact(&mut body).unwrap();
            reply.body = body;
        } else if reply.header("Transfer-Encoding") == Some("chunked") {
            loop {
                let mut size = String::new();
                client.read_line(&mut size).unwrap();
                let size = usize::from_str_radix(size.trim_end(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                client.read_exact(&mut chunk).unwrap();
                assert_eq!(&chunk[size..], b"\r\n");
                if size == 0 {
                    break;
                }
                reply.body.extend_from_slice(&chunk[..size]);
            }
        } else {
            client.read_to_end(&mut reply.body).unwrap();
        }
        reply
    }

    /// Whether the server closed the connection (EOF rather than more bytes or a timeout).
    fn closed(client: &mut BufReader<TcpStream>) -> bool {
        let mut rest = Vec::new();
        matches!(client.read_to_end(&mut rest), Ok(0))
    }

    #[test]
    fn serves_several_requests_on_one_kept_alive_connection() {
        let server = start(test_config());
        let mut client = connect(&server);
        for _ in 0..3 {
            send(&mut client, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
            let reply = read_reply(&mut client, false);
            assert_eq!(reply.status, 200);
            assert_eq!(reply.text(), "hello\n");
            assert_eq!(reply.header("Connection"), None);
        }
        // Pipelined: two requests in one write, answered in order.
        send(
            &mut client,
            b"GET /query?q=a%20b+c HTTP/1.1\r\n\r\nGET /query HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(read_reply(&mut client, false).text(), "a b c\n");
        let last = read_reply(&mut client, false);
        assert_eq!(last.text(), "-\n");
        assert_eq!(last.header("Connection"), Some("close"));
        assert!(closed(&mut client));
        assert_eq!(server.stats().accepted_connections, 1);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn http_1_0_closes_unless_kept_alive() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(
            &mut client,
            b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        );
        let reply = read_reply(&mut client, false);
        assert_eq!(reply.header("Connection"), Some("keep-alive"));
        send(&mut client, b"GET /hello HTTP/1.0\r\n\r\n");
        let reply = read_reply(&mut client, false);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("Connection"), Some("close"));
        assert!(closed(&mut client));
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn posts_a_body() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(
            &mut client,
            b"POST /echo HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world",
        );
        let reply = read_reply(&mut client, false);
        assert_eq!((reply.status, reply.text().as_str()), (200, "hello world"));
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_post_without_length_has_an_empty_body() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(&mut client, b"POST /echo HTTP/1.1\r\n\r\n");
        let reply = read_reply(&mut client, false);
        assert_eq!((reply.status, reply.text().as_str()), (200, ""));
        assert_eq!(server.stats().protocol_errors, 0);
        server.shutdown(Duration::from_secs(5));
    }

    /// Sends `request` on a fresh connection and reads the reply; whether the server closed the
    /// connection after it.
    fn exchange(server: &ServerHandle, request: &[u8]) -> (Reply, bool) {
        let mut client = connect(server);
        send(&mut client, request);
        let reply = read_reply(&mut client, false);
        let closed = closed(&mut client);
        (reply, closed)
    }

    #[test]
    fn a_chunked_request_body_is_decoded() {
        let server = start(test_config());
        let mut client = connect(&server);
        // Sizes in both cases and with leading zeros, an extension (ignored), a trailer (dropped),
        // then a pipelined request on the same connection.
        send(
            &mut client,
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0001;name=\"value\"\r\n \r\nA\r\n0123456789\r\n\
              0\r\nX-Checksum: abc\r\n\r\nGET /hello HTTP/1.1\r\n\r\n",
        );
        let reply = read_reply(&mut client, false);
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "hello 0123456789")
        );
        assert_eq!(read_reply(&mut client, false).text(), "hello\n");
        // Chunks trickled a few bytes at a time, across every boundary.
        let body: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = b"POST /echo HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n".to_vec();
        for piece in body.chunks(777) {
            wire.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            wire.extend_from_slice(piece);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        for piece in wire.chunks(5) {
            send(&mut client, piece);
        }
        let reply = read_reply(&mut client, false);
        assert_eq!((reply.status, &reply.body), (200, &body));
        assert_eq!(server.stats().protocol_errors, 0);
        assert_eq!(server.stats().body_bytes_in_flight, 0);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn ambiguous_framing_is_refused_and_the_connection_closed() {
        let server = start(test_config());
        let cases: &[(&[u8], u16, &str)] = &[
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                400,
                "both Transfer-Encoding and Content-Length",
            ),
            (
                b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                400,
                "both Transfer-Encoding and Content-Length",
            ),
            (
                b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                400,
                "HTTP/1.0",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                501,
                "only Transfer-Encoding: chunked",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
                501,
                "only Transfer-Encoding: chunked",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                501,
                "only Transfer-Encoding: chunked",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
                501,
                "only Transfer-Encoding: chunked",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\nhello\r\n0\r\n\r\n",
                400,
                "not a hex number",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
                400,
                "not a hex number",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
                400,
                "more than 16 hex digits",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
                400,
                "not followed by CRLF",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
                400,
                "lone LF",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5 5\r\nhello\r\n0\r\n\r\n",
                400,
                "invalid chunk-size line",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n",
                400,
                "trailer",
            ),
        ];
        for (request, status, reason) in cases {
            let (reply, closed) = exchange(&server, request);
            let what = String::from_utf8_lossy(request);
            assert_eq!(reply.status, *status, "{what:?}: {}", reply.text());
            assert!(reply.text().contains(reason), "{what:?}: {}", reply.text());
            assert_eq!(reply.header("Connection"), Some("close"), "{what:?}");
            assert!(closed, "{what:?}: the connection stayed open");
        }
        // A chunk-size line that never ends is refused at 4096 bytes, not buffered.
        let mut long = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
        long.extend(std::iter::repeat_n(b'x', 5000));
        let (reply, _) = exchange(&server, &long);
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert!(
            reply.text().contains("longer than 4096"),
            "{}",
            reply.text()
        );
        // Extensions and trailers share the head's cap.
        let mut heavy = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            heavy.extend_from_slice(format!("1;{}\r\nx\r\n", "e".repeat(2000)).as_bytes());
        }
        heavy.extend_from_slice(b"0\r\n\r\n");
        let (reply, _) = exchange(&server, &heavy);
        assert_eq!(reply.status, 431, "{}", reply.text());
        assert_eq!(server.stats().body_bytes_in_flight, 0);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_chunked_body_over_the_limit_is_413_before_it_has_all_arrived() {
        let server = start(test_config());
        let mut client = connect(&server);
        // The /hello limit is 1 KiB: the third 400-byte chunk passes it. No last chunk is sent,
        // so a server that waited for the whole body would answer 408 after a second.
        let mut wire = b"POST /hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            wire.extend_from_slice(b"190\r\n");
            wire.extend_from_slice(&[b'a'; 400]);
            wire.extend_from_slice(b"\r\n");
        }
        send(&mut client, &wire);
        let started = Instant::now();
        let reply = read_reply(&mut client, false);
        assert_eq!(reply.status, 413, "{}", reply.text());
        assert!(
            reply
                .text()
                .contains("chunked body is over the limit of 1024 bytes"),
            "{}",
            reply.text()
        );
        assert!(started.elapsed() < Duration::from_millis(900));
        assert!(closed(&mut client));
        // One chunk declaring more than the limit is refused at its size line.
        let (reply, _) = exchange(
            &server,
            b"POST /hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
        );
        assert_eq!(reply.status, 413, "{}", reply.text());
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_chunked_body_that_stalls_gets_408() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(
            &mut client,
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        );
        let started = Instant::now();
        let reply = read_reply(&mut client, false);
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (408, "the request body took too long\n")
        );
        // The 1 s body deadline, not the 1 s head deadline again nor the 10 s client timeout.
        assert!(started.elapsed() < Duration::from_secs(3));
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn expect_100_continue_is_answered_before_a_chunked_body() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(
            &mut client,
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
        );
        assert_eq!(read_reply(&mut client, false).status, 100);
        send(&mut client, b"3\r\nabc\r\n0\r\n\r\n");
        let reply = read_reply(&mut client, false);
        assert_eq!((reply.status, reply.text().as_str()), (200, "abc"));
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn header_hygiene() {
        let server = start(test_config());
        let cases: &[(&[u8], &str)] = &[
            (b"GET /hello HTTP/1.1\nHost: x\r\n\r\n", "lone LF"),
            (b"GET /hello HTTP/1.1\r\nHost: x\n\r\n", "lone LF"),
            (b"GET /hello HTTP/1.1\r\nHost: x\n\n", "lone LF"),
            (
                b"GET /hello HTTP/1.1\r\nX-A: a\x01b\r\n\r\n",
                "control character",
            ),
            (
                b"GET /hello HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
                "control character",
            ),
            (
                b"GET /hello HTTP/1.1\r\nX-A: a\x1bb\r\n\r\n",
                "control character",
            ),
            (
                b"GET /hello HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n",
                "control character",
            ),
            (
                b"GET /hello HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
                "control character",
            ),
            (b"GET /hello HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n", "obs-fold"),
            (b"GET /hello HTTP/1.1\r\nX-A : a\r\n\r\n", "header name"),
            (b"GET /hello HTTP/1.1\r\nX-A: \xff\r\n\r\n", "not UTF-8"),
        ];
        for (request, reason) in cases {
            let (reply, closed) = exchange(&server, request);
            let what = String::from_utf8_lossy(request);
            assert_eq!(reply.status, 400, "{what:?}: {}", reply.text());
            assert!(reply.text().contains(reason), "{what:?}: {}", reply.text());
            assert!(closed, "{what:?}");
        }
        // HTAB inside a value is fine.
        let (reply, _) = exchange(
            &server,
            b"GET /hello HTTP/1.1\r\nX-A: a\tb\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(reply.status, 200);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn the_handler_refuses_a_head_before_its_body() {
        let server = start(test_config());
        // 10 MB declared and none sent: the 401 comes at once, and nothing was set aside for it.
        let (reply, closed) = exchange(
            &server,
            b"POST /guarded HTTP/1.1\r\nContent-Length: 10000000\r\nExpect: 100-continue\r\n\r\n",
        );
        assert_eq!((reply.status, reply.text().as_str()), (401, "no key\n"));
        assert!(closed);
        let (reply, _) = exchange(
            &server,
            b"POST /guarded HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        );
        assert_eq!(reply.status, 401);
        let stats = server.stats();
        assert_eq!((stats.refused_heads, stats.protocol_errors), (2, 0));
        // With the key, its limit is the one admit gave.
        let (reply, _) = exchange(
            &server,
            b"POST /guarded HTTP/1.1\r\nX-Key: open\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        );
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "guarded hello\n")
        );
        let (reply, _) = exchange(
            &server,
            b"POST /guarded HTTP/1.1\r\nX-Key: open\r\nContent-Length: 20\r\n\r\n",
        );
        assert_eq!(reply.status, 413);
        server.shutdown(Duration::from_secs(5));
    }

    /// Waits (bounded) until `check` holds for the server's stats; the last stats seen.
    fn wait_for_stats(server: &ServerHandle, check: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = server.stats();
            if check(&stats) || Instant::now() > deadline {
                return stats;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn body_memory_follows_the_bytes_that_arrived() {
        let mut config = test_config();
        config.body_timeout = Duration::from_secs(10);
        let server = start(config);
        // 60 KiB declared, 1 KiB sent: about one step is held, not 60 KiB.
        let mut declared = connect(&server);
        send(
            &mut declared,
            b"POST /echo HTTP/1.1\r\nContent-Length: 61440\r\n\r\n",
        );
        send(&mut declared, &[b'a'; 1024]);
        let stats = wait_for_stats(&server, |s| s.body_bytes_in_flight > 0);
        assert!(
            (1024..=BODY_STEP as u64).contains(&stats.body_bytes_in_flight),
            "{stats:?}"
        );
        // A head alone holds nothing.
        let mut head_only = connect(&server);
        send(
            &mut head_only,
            b"POST /echo HTTP/1.1\r\nContent-Length: 61440\r\n\r\n",
        );
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            server.stats().body_bytes_in_flight,
            stats.body_bytes_in_flight
        );
        // The rest arrives: the body is whole and the budget is back to zero once answered.
        send(&mut declared, &[b'b'; 61440 - 1024]);
        let reply = read_reply(&mut declared, false);
        assert_eq!((reply.status, reply.body.len()), (200, 61440));
        drop(head_only);
        let stats = wait_for_stats(&server, |s| s.body_bytes_in_flight == 0);
        assert_eq!(stats.body_bytes_in_flight, 0);
        server.shutdown(Duration::from_secs(5));
    }

    /// A client socket bound to `local` (a 127.0.0.x address) connected to the server.
    fn connect_from(server: &ServerHandle, local: [u8; 4]) -> BufReader<TcpStream> {
        // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
        let tcp = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let bind = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(local),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(
                libc::bind(fd, &bind as *const _ as *const libc::sockaddr, len),
                0
            );
            let port = server.local_addr().port();
            let to = libc::sockaddr_in {
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                ..bind
            };
            assert_eq!(
                libc::connect(fd, &to as *const _ as *const libc::sockaddr, len),
                0
            );
            <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd)
        };
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        BufReader::new(tcp)
    }

    #[test]
    fn per_peer_caps_hold_one_address_back_and_not_the_others() {
        let mut config = test_config();
        config.max_connections_per_peer = 3;
        config.max_body_bytes_per_peer = 40 << 10;
        config.body_timeout = Duration::from_secs(10);
        let server = start(config);
        // Three requests being answered from one address: its fourth connection is refused.
        let mut busy: Vec<_> = (0..3)
            .map(|_| {
                let mut client = connect_from(&server, [127, 0, 0, 2]);
                send(&mut client, b"GET /slow HTTP/1.1\r\n\r\n");
                client
            })
            .collect();
        wait_for_stats(&server, |s| s.open_connections == 3);
        std::thread::sleep(Duration::from_millis(50));
        let mut fourth = connect_from(&server, [127, 0, 0, 2]);
        let reply = read_reply(&mut fourth, false);
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (503, "too many connections from your address\n")
        );
        assert_eq!(reply.header("Retry-After"), Some("1"));
        // Another address is served meanwhile.
        let mut other = connect_from(&server, [127, 0, 0, 3]);
        send(&mut other, b"GET /hello HTTP/1.1\r\n\r\n");
        assert_eq!(read_reply(&mut other, false).status, 200);
        for client in &mut busy {
            assert_eq!(read_reply(client, false).status, 200);
        }
        // Now idle: at the per-peer cap, the address's own idle connections make room.
        let mut fifth = connect_from(&server, [127, 0, 0, 2]);
        send(&mut fifth, b"GET /hello HTTP/1.1\r\n\r\n");
        assert_eq!(read_reply(&mut fifth, false).status, 200);
        let stats = server.stats();
        assert_eq!(stats.peer_rejected_connections, 1);
        assert_eq!(stats.evicted_connections, 1);
        drop((busy, fifth, other));
        // Body bytes: 30 KiB arrived on one body from 127.0.0.4 (held, it waits for the rest);
        // a second body of 20 KiB from that address passes its 40 KiB, one from elsewhere does not.
        let mut holder = connect_from(&server, [127, 0, 0, 4]);
        send(
            &mut holder,
            b"POST /echo HTTP/1.1\r\nContent-Length: 40000\r\n\r\n",
        );
        send(&mut holder, &[b'a'; 30 << 10]);
        wait_for_stats(&server, |s| s.body_bytes_in_flight >= 30 << 10);
        let mut request = b"POST /echo HTTP/1.1\r\nContent-Length: 20480\r\n\r\n".to_vec();
        request.extend_from_slice(&[b'b'; 20 << 10]);
        let mut second = connect_from(&server, [127, 0, 0, 4]);
        send(&mut second, &request);
        let reply = read_reply(&mut second, false);
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (
                503,
                "too many request bodies in flight from your address; retry\n"
            )
        );
        let mut elsewhere = connect_from(&server, [127, 0, 0, 5]);
        send(&mut elsewhere, &request);
        assert_eq!(read_reply(&mut elsewhere, false).status, 200);
        send(&mut holder, &[b'a'; 40000 - (30 << 10)]);
        assert_eq!(read_reply(&mut holder, false).status, 200);
        assert_eq!(server.stats().peer_rejected_bodies, 1);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn at_the_cap_a_body_still_arriving_is_not_evicted() {
        let mut config = test_config();
        config.max_connections = 4;
        config.body_timeout = Duration::from_secs(10);
        config.header_timeout = Duration::from_secs(10);
        let server = start(config);
        // The oldest connection is a body trickling in, 2,000 bytes over about 2 s.
        let mut upload = connect(&server);
        send(
            &mut upload,
            b"POST /echo HTTP/1.1\r\nContent-Length: 2000\r\n\r\n",
        );
        let trickle = {
            let mut writer = upload.get_ref().try_clone().unwrap();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    writer.write_all(&[b'u'; 100]).unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        // Meanwhile a flood of silent and garbage-trickling connections, far over the cap.
        let mut flood = Vec::new();
        for i in 0..40 {
            let mut client = connect(&server);
            if i % 2 == 0 {
                let _ = client.get_mut().write_all(b"GET /hel");
            }
            flood.push(client);
            std::thread::sleep(Duration::from_millis(20));
        }
        trickle.join().unwrap();
        let reply = read_reply(&mut upload, false);
        assert_eq!((reply.status, reply.body.len()), (200, 2000));
        assert!(server.stats().evicted_connections >= 30);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_declared_length_over_the_limit_is_413_without_reading_the_body() {
        let server = start(test_config());
        let mut client = connect(&server);
        // None of the 10 MB is sent: had the server waited for it, the answer would be a 408
        // after the 1 s body deadline, not a 413.
        send(
            &mut client,
            b"POST /echo HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n",
        );
        let reply = read_reply(&mut client, false);
        assert_eq!(reply.status, 413);
        assert_eq!(reply.header("Connection"), Some("close"));
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_head_over_the_limit_is_431() {
        let server = start(test_config());
        let mut client = connect(&server);
        let mut request = b"GET /hello HTTP/1.1\r\n".to_vec();
        for i in 0..200 {
            request.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(40)).as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        send(&mut client, &request);
        assert_eq!(read_reply(&mut client, false).status, 431);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_garbage_request_line_is_400() {
        let server = start(test_config());
        for garbage in [
            &b"HELLO\r\n\r\n"[..],
            b"GET /x HTTP/1.1 extra\r\n\r\n",
            b"GET nopath HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        ] {
            let mut client = connect(&server);
            send(&mut client, garbage);
            let reply = read_reply(&mut client, false);
            assert_eq!(reply.status, 400, "{:?}", String::from_utf8_lossy(garbage));
        }
        let mut client = connect(&server);
        send(&mut client, b"GET / HTTP/2.0\r\n\r\n");
        assert_eq!(read_reply(&mut client, false).status, 505);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn half_a_head_gets_408_and_silence_gets_closed() {
        let server = start(test_config());
        let mut half = connect(&server);
        send(&mut half, b"GET /hello HTTP/1.1\r\nHost: x\r\n");
        let mut silent = connect(&server);
        let reply = read_reply(&mut half, false);
        assert_eq!(reply.status, 408);
        assert!(closed(&mut half));
        // Nothing was asked, so nothing is answered: just a close.
        assert!(closed(&mut silent));
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_body_that_stops_coming_gets_408() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(
            &mut client,
            b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly part",
        );
        assert_eq!(read_reply(&mut client, false).status, 408);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn slow_loris_connections_do_not_block_a_normal_request() {
        let mut config = test_config();
        config.header_timeout = Duration::from_secs(30);
        let server = start(config);
        let mut trickling: Vec<_> = (0..50)
            .map(|_| {
                let mut client = connect(&server);
                send(&mut client, b"GET /hello HTTP/1.1\r\n");
                client
            })
            .collect();
        for client in &mut trickling {
            send(client, b"X-Slow: 1\r\n");
        }
        let mut client = connect(&server);
        send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
        let reply = read_reply(&mut client, false);
        assert_eq!((reply.status, reply.text().as_str()), (200, "hello\n"));
        assert_eq!(server.stats().open_connections, 51);
        drop(trickling);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn busy_connections_over_the_cap_get_503() {
        let mut config = test_config();
        config.max_connections = 4;
        let server = start(config);
        // Four complete requests in hand (two in the workers, two queued behind them for 300 ms
        // each): nothing can be evicted, so the fifth connection is refused.
        let mut clients: Vec<_> = (0..4)
            .map(|_| {
                let mut client = connect(&server);
                send(&mut client, b"GET /slow HTTP/1.1\r\n\r\n");
                client
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut fifth = connect(&server);
        let reply = read_reply(&mut fifth, false);
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("Connection"), Some("close"));
        let stats = server.stats();
        assert_eq!(stats.rejected_connections, 1);
        assert_eq!(stats.evicted_connections, 0);
        // The first four are answered.
        for client in &mut clients {
            assert_eq!(read_reply(client, false).status, 200);
        }
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn at_the_cap_the_longest_waiting_idle_connection_makes_room() {
        let mut config = test_config();
        config.max_connections = 4;
        config.header_timeout = Duration::from_secs(30);
        let server = start(config);
        // The oldest only trickles a head; the next three are idle keep-alive connections.
        let mut trickler = connect(&server);
        send(&mut trickler, b"GET /hello HTTP/1.1\r\n");
        std::thread::sleep(Duration::from_millis(20));
        let mut idle: Vec<_> = (0..3)
            .map(|_| {
                let mut client = connect(&server);
                send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
                assert_eq!(read_reply(&mut client, false).status, 200);
                client
            })
            .collect();
        let mut fifth = connect(&server);
        send(&mut fifth, b"GET /hello HTTP/1.1\r\n\r\n");
        let reply = read_reply(&mut fifth, false);
        assert_eq!((reply.status, reply.text().as_str()), (200, "hello\n"));
        let stats = server.stats();
        assert_eq!(
            (stats.evicted_connections, stats.rejected_connections),
            (1, 0)
        );
        // The trickler, waiting longest, was the one closed; the idle ones still work.
        assert!(closed(&mut trickler));
        send(&mut idle[0], b"GET /hello HTTP/1.1\r\n\r\n");
        assert_eq!(read_reply(&mut idle[0], false).status, 200);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn streams_a_chunked_response() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(&mut client, b"GET /stream HTTP/1.1\r\n\r\n");
        let reply = read_reply(&mut client, false);
        assert_eq!(reply.header("Transfer-Encoding"), Some("chunked"));
        let expected: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(reply.text(), expected);
        // The connection stays usable after the last chunk.
        send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
        assert_eq!(read_reply(&mut client, false).text(), "hello\n");
        // HTTP/1.0 has no chunks: the body runs to the close.
        let mut old = connect(&server);
        send(&mut old, b"GET /stream HTTP/1.0\r\n\r\n");
        let reply = read_reply(&mut old, false);
        assert_eq!(reply.header("Transfer-Encoding"), None);
        assert_eq!(reply.text(), expected);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn head_answers_without_a_body() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(&mut client, b"HEAD /hello HTTP/1.1\r\n\r\n");
        let reply = read_reply(&mut client, true);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("Content-Length"), Some("6"));
        // Had a body been sent, this would read "hello" instead of a status line.
        send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
        let reply = read_reply(&mut client, false);
        assert_eq!((reply.status, reply.text().as_str()), (200, "hello\n"));
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn expect_100_continue_is_answered_before_the_body() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(
            &mut client,
            b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        );
        let interim = read_reply(&mut client, false);
        assert_eq!(interim.status, 100);
        send(&mut client, b"abcde");
        let reply = read_reply(&mut client, false);
        assert_eq!((reply.status, reply.text().as_str()), (200, "abcde"));
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_handler_panic_is_a_500_and_the_worker_lives_on() {
        let mut config = test_config();
        config.workers = 1;
        let server = start(config);
        let mut client = connect(&server);
        for _ in 0..2 {
            send(&mut client, b"GET /panic HTTP/1.1\r\n\r\n");
            let reply = read_reply(&mut client, false);
            assert_eq!(
                (reply.status, reply.text().as_str()),
                (500, "internal error\n")
            );
        }
        send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
        assert_eq!(read_reply(&mut client, false).status, 200);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_stream_body_panic_breaks_only_its_own_response() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(&mut client, b"GET /stream-panic HTTP/1.1\r\n\r\n");
        let mut line = String::new();
        client.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        // The body ends without its last chunk: the client sees a broken, not a short, body.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(!rest.ends_with(b"0\r\n\r\n"));
        assert!(rest.len() > 100_000);
        // The server is fine.
        let mut client = connect(&server);
        send(&mut client, b"GET /hello HTTP/1.1\r\n\r\n");
        assert_eq!(read_reply(&mut client, false).status, 200);
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn shutdown_finishes_an_in_flight_request() {
        let (started, started_rx) = crossbeam_channel::bounded(1);
        let server = start_with(
            test_config(),
            TestApp {
                slow_started: Mutex::new(Some(started)),
            },
        );
        let addr = server.local_addr();
        let mut idle = connect(&server);
        send(&mut idle, b"GET /hello HTTP/1.1\r\n\r\n");
        assert_eq!(read_reply(&mut idle, false).status, 200);
        let mut client = connect(&server);
        send(&mut client, b"GET /slow HTTP/1.1\r\n\r\n");
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let stopper = std::thread::spawn(move || server.shutdown(Duration::from_secs(10)));
        let reply = read_reply(&mut client, false);
        assert_eq!((reply.status, reply.text().as_str()), (200, "slow done\n"));
        assert_eq!(reply.header("Connection"), Some("close"));
        // The idle keep-alive connection is closed rather than waited for.
        assert!(closed(&mut idle));
        stopper.join().unwrap();
        assert!(TcpStream::connect(addr).is_err(), "still accepting");
    }

    #[test]
    fn dropping_the_handle_stops_the_server() {
        let server = start(test_config());
        let mut idle = connect(&server);
        send(&mut idle, b"GET /hello HTTP/1.1\r\n\r\n");
        assert_eq!(read_reply(&mut idle, false).status, 200);
        drop(server);
        assert!(closed(&mut idle));
    }

    #[test]
    fn serves_over_tls() {
        crate::tls::install_crypto_provider();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tls");
        let mut config = test_config();
        config.tls = Some(
            crate::tls::server_config(
                &fixtures.join("server.pem"),
                &fixtures.join("server-key.pem"),
            )
            .unwrap(),
        );
        let server = start(config);

        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::tls::load_certificates(&fixtures.join("ca.pem")).unwrap() {
            roots.add(cert).unwrap();
        }
        let client_config = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        for host in ["localhost", "127.0.0.1"] {
            let name = rustls_pki_types::ServerName::try_from(host).unwrap();
            let session = rustls::ClientConnection::new(client_config.clone(), name).unwrap();
            let tcp = TcpStream::connect(server.local_addr()).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut tls = BufReader::new(rustls::StreamOwned::new(session, tcp));
            for _ in 0..2 {
                tls.get_mut()
                    .write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 6\r\n\r\nsecret")
                    .unwrap();
                let reply = read_reply(&mut tls, false);
                assert_eq!((reply.status, reply.text().as_str()), (200, "secret"));
            }
            assert_eq!(
                tls.get_ref().conn.alpn_protocol(),
                None,
                "the client offered no ALPN"
            );
        }
        // A plaintext client gets nothing useful and the server survives it.
        let mut plain = connect(&server);
        send(&mut plain, b"GET /hello HTTP/1.1\r\n\r\n");
        let mut rest = Vec::new();
        let _ = plain.read_to_end(&mut rest);
        assert!(!rest.starts_with(b"HTTP/1.1 200"));
        server.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn binding_a_used_address_names_it() {
        let server = start(test_config());
        let addr = server.local_addr().to_string();
        let e = Server::bind(
            &addr,
            test_config(),
            Arc::new(TestApp {
                slow_started: Mutex::new(None),
            }),
        )
        .err()
        .unwrap();
        assert_eq!(e.to_string(), format!("address {addr} is already in use"));
        assert!(matches!(
            Server::bind(
                "not an address",
                test_config(),
                Arc::new(TestApp {
                    slow_started: Mutex::new(None)
                })
            ),
            Err(HttpError::Address(_))
        ));
        server.shutdown(Duration::from_secs(5));
    }

    fn request(query: &str, headers: &[(&str, &str)], body: &[u8]) -> Request {
        Request {
            method: "POST".into(),
            path: "/".into(),
            query: query.into(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.to_vec(),
            remote: SocketAddr::from(([127, 0, 0, 1], 1)),
        }
    }

    #[test]
    fn decodes_query_and_form_parameters() {
        let r = request(
            "a=1&b=x+y%2Fz&a=2&empty&bad=%zz&c=%E2%9C%93",
            &[(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )],
            b"id=cluster%201&token=t",
        );
        assert_eq!(r.query_params("a"), vec!["1", "2"]);
        assert_eq!(r.query_param("b").as_deref(), Some("x y/z"));
        assert_eq!(r.query_param("empty").as_deref(), Some(""));
        assert_eq!(r.query_param("bad"), None);
        assert_eq!(r.query_param("c").as_deref(), Some("✓"));
        assert_eq!(r.query_param("missing"), None);
        assert_eq!(r.form_param("id").as_deref(), Some("cluster 1"));
        let json = request("", &[("Content-Type", "application/json")], b"id=1");
        assert_eq!(json.form_param("id"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
        assert_eq!(percent_encode("a b/✓~"), "a%20b%2F%E2%9C%93~");
        assert_eq!(
            percent_decode(&percent_encode("x=1&y+z")).as_deref(),
            Some("x=1&y+z")
        );
    }

    #[test]
    fn finds_bearer_tokens() {
        let token = |value: &str| {
            request("", &[("authorization", value)], b"")
                .bearer_token()
                .map(str::to_owned)
        };
        assert_eq!(token("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(token("bEaReR   abc  ").as_deref(), Some("abc"));
        assert_eq!(token("Basic abc"), None);
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("Bearer"), None);
        assert_eq!(request("", &[], b"").bearer_token(), None);
        assert_eq!(
            request("", &[("X-A", "1")], b"").header("x-a"),
            Some("1"),
            "header names are case-insensitive"
        );
    }

    /// Not a test of behaviour but a measurement: `cargo test -p telemeter-common --lib
    /// idle_connection_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn idle_connection_cost() {
        fn status(field: &str) -> String {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find(|l| l.starts_with(field))
                .unwrap_or("")
                .to_owned()
        }
        let mut config = test_config();
        config.header_timeout = Duration::from_secs(60);
        config.max_connections = 2000;
        let server = start(config);
        println!("before: {} {}", status("Threads"), status("VmRSS"));
        let clients: Vec<_> = (0..1000).map(|_| connect(&server)).collect();
        while server.stats().open_connections < 1000 {
            std::thread::sleep(Duration::from_millis(10));
        }
        println!(
            "1000 idle: {} {} open={}",
            status("Threads"),
            status("VmRSS"),
            server.stats().open_connections
        );
        drop(clients);
        server.shutdown(Duration::from_secs(5));
    }
}
