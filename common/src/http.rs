//! A small synchronous HTTP/1.1 server front that both binaries serve their endpoints with.
//!
//! Why not tiny_http: 0.12 starts one unbounded thread per connection, sets no socket deadlines, and
//! its TLS feature pins rustls 0.20 (RUSTSEC-2024-0336). This front owns exactly those parts:
//! - an accept loop with a cap on open connections (over it: `503` and close);
//! - one thread per open connection (small stack) that reads a request head under a total deadline
//!   and a body under its own deadline, so a client trickling bytes holds only its own thread;
//! - a fixed pool of worker threads running the [`Handler`] (CPU work is bounded by the pool size);
//! - optional TLS with rustls ≥ 0.23.5;
//! - the protocol errors answered here, one line each: `400` malformed, `408` too slow, `411` chunked
//!   request body, `413` body over the handler's limit (checked before reading it), `431` head too
//!   large, `503` too many connections or a full body budget;
//! - HTTP/1.1 keep-alive with an idle deadline, and `Connection: close`;
//! - graceful shutdown: stop accepting, finish in-flight requests, then return.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
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
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
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
    /// 30 s write, 16 KiB head, 128 MiB of bodies in flight, no TLS.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Config {
            name: "http".into(),
            max_connections: 1024,
            workers: (2 * cores).max(4),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_header_bytes: 16 << 10,
            // Half of the server's memory bound (README, "Memory"): the other half is what
            // uploads hold past the front.
            max_body_bytes_in_flight: 128 << 20,
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
    /// Connections closed to make room at the cap: the one that had waited longest without
    /// completing a request.
    pub evicted_connections: u64,
    /// Requests answered by the front itself with a protocol error (400, 408, 411, 413, 431, 503).
    pub protocol_errors: u64,
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
            evicted: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            body_bytes_in_flight: AtomicUsize::new(0),
            jobs: Mutex::new(Some(jobs)),
            connections: Mutex::new(HashMap::new()),
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
            evicted_connections: self.shared.evicted.load(Ordering::SeqCst),
            protocol_errors: self.shared.protocol_errors.load(Ordering::SeqCst),
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
    evicted: AtomicU64,
    protocol_errors: AtomicU64,
    body_bytes_in_flight: AtomicUsize,
    /// Taken once shutdown has drained the connections, which ends the workers. Without a
    /// shutdown, the queue closes when the last holder of `Shared` goes.
    jobs: Mutex<Option<handoff::Sender<Job>>>,
    connections: Mutex<HashMap<u64, Tracked>>,
    next_connection: AtomicU64,
}

/// An open connection as shutdown sees it. The descriptor stays valid while the entry exists: a
/// connection removes its entry (under the lock) before closing its socket, and `shutdown(2)` is
/// only called under the lock.
struct Tracked {
    fd: RawFd,
    idle: bool,
    closed_by_server: bool,
    /// Since when the connection has been waiting for, or receiving, a request it has not yet
    /// completed; `None` while a request is being handled or answered. See [`Shared::evict_oldest`].
    evictable_since: Option<Instant>,
}

impl Shared {
    fn connections(&self) -> MutexGuard<'_, HashMap<u64, Tracked>> {
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
        for tracked in self.connections().values_mut() {
            if tracked.idle || busy_too {
                tracked.closed_by_server = true;
                // SAFETY: see `Tracked`: the descriptor is open while its entry exists.
                unsafe {
                    libc::shutdown(tracked.fd, libc::SHUT_RDWR);
                }
            }
        }
    }

    /// At the connection cap, makes room by closing the connection that has waited longest
    /// without completing a request (idle keep-alive, trickling head or body). Without this, a
    /// crowd of slow or idle sockets would hold every slot and a normal client would only ever get
    /// 503; with it, they only evict each other, while a client that sends its request promptly
    /// is in a worker before it becomes the oldest. False when every connection is busy.
    fn evict_oldest(&self) -> bool {
        let mut connections = self.connections();
        let oldest = connections
            .values_mut()
            .filter(|t| !t.closed_by_server)
            .filter_map(|t| t.evictable_since.map(|since| (since, t)))
            .min_by_key(|(since, _)| *since);
        match oldest {
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

    fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Ordering::SeqCst);
    }

    /// Reserves `bytes` of the body budget; the reservation is returned when the guard drops.
    fn reserve_body(self: &Arc<Self>, bytes: usize) -> Option<BodyReservation> {
        let limit = self.config.max_body_bytes_in_flight;
        self.body_bytes_in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .ok()
            .map(|_| BodyReservation {
                shared: self.clone(),
                bytes,
            })
    }
}

/// Body bytes counted against `max_body_bytes_in_flight` until the request is answered.
struct BodyReservation {
    shared: Arc<Shared>,
    bytes: usize,
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        self.shared
            .body_bytes_in_flight
            .fetch_sub(self.bytes, Ordering::SeqCst);
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
        let open = shared.open.load(Ordering::SeqCst);
        let cap = shared.config.max_connections as u64;
        // Evicted connections leave within moments of their shutdown; the slack bounds how many
        // may still be on their way out while new ones come in.
        let slack = cap / 8 + 1;
        if open >= cap && !(open < cap + slack && shared.evict_oldest()) {
            shared.rejected.fetch_add(1, Ordering::SeqCst);
            log::debug!("{name}: refusing {remote}: {open} connections open");
            refuse(tcp);
            continue;
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        let connection_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-conn"))
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || serve_connection(connection_shared, tcp, remote));
        if let Err(e) = spawned {
            shared.open.fetch_sub(1, Ordering::SeqCst);
            shared.rejected.fetch_add(1, Ordering::SeqCst);
            log::warn!("{name}: starting a connection thread for {remote} failed: {e}");
        }
    }
}

/// Answers `503` on a fresh connection from the accept thread, never blocking it.
fn refuse(mut tcp: TcpStream) {
    let _ = tcp.set_nonblocking(true);
    let body = "too many connections\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
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
    stream: Stream,
    /// Bytes read past the current request (the next pipelined request, or the start of a body).
    pending: Vec<u8>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.connections().remove(&self.id);
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
    _reservation: Option<BodyReservation>,
}

/// Why a connection stops reading requests.
enum Stop {
    /// Close quietly: the peer left, went idle past its time, or we are shutting down.
    Close,
    /// Answer this protocol error, then close.
    Refuse(Response),
}

/// The parts of a request head the front acts on.
struct Head {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    http10: bool,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
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

fn serve_connection(shared: Arc<Shared>, tcp: TcpStream, remote: SocketAddr) {
    let accepted_at = Instant::now();
    let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
    shared.connections().insert(
        id,
        Tracked {
            fd: tcp.as_raw_fd(),
            idle: true,
            closed_by_server: false,
            evictable_since: Some(accepted_at),
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
                shared.connections().remove(&id);
                shared.open.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        },
    };
    let mut connection = Connection {
        shared,
        id,
        remote,
        stream,
        pending: Vec::new(),
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
            match self.read_request(head_deadline) {
                Ok(parsed) => {
                    if !self.set_busy() || !self.answer(parsed) {
                        return;
                    }
                }
                Err(Stop::Close) => return,
                Err(Stop::Refuse(response)) => {
                    self.shared.protocol_error();
                    log::debug!(
                        "{}: {} from {}",
                        self.config().name,
                        response.status,
                        self.remote
                    );
                    let _ = self.write_response(response, false, false, true);
                    self.linger();
                    return;
                }
            }
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
    /// shutdown or eviction has claimed it.
    fn set_idle(&self, idle: bool) -> bool {
        let mut connections = self.shared.connections();
        match connections.get_mut(&self.id) {
            Some(tracked) if !(tracked.closed_by_server || idle && self.shared.stopping()) => {
                tracked.idle = idle;
                if idle {
                    tracked.evictable_since = Some(Instant::now());
                }
                true
            }
            _ => false,
        }
    }

    /// Marks the connection as handling a complete request: no longer evictable. False when it
    /// was evicted while its request was still arriving.
    fn set_busy(&self) -> bool {
        let mut connections = self.shared.connections();
        match connections.get_mut(&self.id) {
            Some(tracked) if !tracked.closed_by_server => {
                tracked.evictable_since = None;
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

    /// Reads and checks one request; `(request, http10, head_only, close_after)`.
    fn read_request(&mut self, deadline: Instant) -> Result<Parsed, Stop> {
        let max = self.config().max_header_bytes;
        self.stream.set_deadline(deadline);
        let head_end = loop {
            // Stray line ends before a request line are allowed (RFC 9112 §2.2).
            let blank = self
                .pending
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            self.pending.drain(..blank);
            if let Some(end) = find_head_end(&self.pending) {
                if end > max {
                    return Err(Stop::Refuse(too_large_head(max)));
                }
                break end;
            }
            if self.pending.len() > max {
                return Err(Stop::Refuse(too_large_head(max)));
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
        let head_bytes: Vec<u8> = self.pending.drain(..head_end).collect();
        let head = parse_head(&head_bytes).map_err(|reason| match reason {
            HeadError::Malformed(reason) => Stop::Refuse(Response::text(400, reason)),
            HeadError::Version => Stop::Refuse(Response::text(
                505,
                "only HTTP/1.0 and HTTP/1.1 are supported",
            )),
        })?;
        let length = self.body_length(&head)?;
        let mut close = head.wants_close();
        let head_only = head.method == "HEAD";
        let reservation = match length {
            0 => None,
            n => Some(self.shared.reserve_body(n).ok_or_else(|| {
                Stop::Refuse(
                    Response::text(503, "too many request bodies in flight; retry")
                        .with_header("Retry-After", "1"),
                )
            })?),
        };
        if let Some(expect) = head.header("Expect") {
            if !expect.eq_ignore_ascii_case("100-continue") {
                return Err(Stop::Refuse(Response::text(
                    417,
                    "only Expect: 100-continue is supported",
                )));
            }
            if !head.http10 && self.pending.len() < length {
                let sent = self
                    .stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .and_then(|()| self.stream.flush());
                if sent.is_err() {
                    return Err(Stop::Close);
                }
            }
        }
        let body = self.read_body(length)?;
        if self.shared.stopping() {
            close = true;
        }
        let request = Request {
            method: head.method,
            path: head.path,
            query: head.query,
            headers: head.headers,
            body,
            remote: self.remote,
        };
        Ok(Parsed {
            request,
            http10: head.http10,
            head_only,
            close,
            _reservation: reservation,
        })
    }

    /// The declared body length, checked against the rules and the handler's limit.
    fn body_length(&self, head: &Head) -> Result<usize, Stop> {
        if head.header("Transfer-Encoding").is_some() {
            return Err(Stop::Refuse(Response::text(
                411,
                "chunked request bodies are not supported; send Content-Length",
            )));
        }
        let mut declared: Option<usize> = None;
        for (_, value) in head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        {
            let value = value.trim();
            let length = value
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| value.parse::<usize>().ok())
                .flatten()
                .ok_or_else(|| Stop::Refuse(Response::text(400, "invalid Content-Length")))?;
            if declared.is_some_and(|d| d != length) {
                return Err(Stop::Refuse(Response::text(
                    400,
                    "conflicting Content-Length headers",
                )));
            }
            declared = Some(length);
        }
        // RFC 9112 §6.3: a request with neither Content-Length nor Transfer-Encoding has no body
        // (what `curl -X POST` without data sends), so it is an empty body, not a 411.
        let length = declared.unwrap_or(0);
        let limit = self.shared.handler.body_limit(&head.method, &head.path);
        if length > limit {
            return Err(Stop::Refuse(Response::text(
                413,
                &format!("the body of {length} bytes is over the limit of {limit} bytes"),
            )));
        }
        Ok(length)
    }

    /// Reads a body of `length` bytes under the body deadline.
    fn read_body(&mut self, length: usize) -> Result<Vec<u8>, Stop> {
        if length == 0 {
            return Ok(Vec::new());
        }
        let from_pending = length.min(self.pending.len());
        let mut body = Vec::with_capacity(length);
        body.extend(self.pending.drain(..from_pending));
        if body.len() < length {
            self.stream
                .set_deadline(Instant::now() + self.config().body_timeout);
            body.resize(length, 0);
            let mut filled = from_pending;
            while filled < length {
                match self.stream.read(&mut body[filled..]) {
                    Ok(0) => return Err(Stop::Close),
                    Ok(n) => filled += n,
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
        Ok(body)
    }

    /// Hands the request to the workers and writes their answer; false to close the connection.
    fn answer(&mut self, parsed: Parsed) -> bool {
        let Parsed {
            request,
            http10,
            head_only,
            mut close,
            _reservation,
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
        drop(_reservation);
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

fn too_large_head(max: usize) -> Response {
    Response::text(
        431,
        &format!("the request head is over the limit of {max} bytes"),
    )
}

/// The offset just past the blank line ending a head (`\r\n\r\n`, or bare `\n\n`).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(offset) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let at = i + offset;
        match (buf.get(at + 1), buf.get(at + 2)) {
            (Some(b'\n'), _) => return Some(at + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(at + 3),
            _ => i = at + 1,
        }
    }
    None
}

enum HeadError {
    Malformed(&'static str),
    Version,
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

fn parse_head(bytes: &[u8]) -> Result<Head, HeadError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| HeadError::Malformed("the request head is not UTF-8"))?;
    let mut lines = text
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err(HeadError::Malformed("malformed request line")),
    };
    if !is_token(method) {
        return Err(HeadError::Malformed("malformed request method"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Err(HeadError::Version),
        _ => return Err(HeadError::Malformed("malformed request line")),
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
        return Err(HeadError::Malformed("malformed request target"));
    }
    if origin.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(HeadError::Malformed("malformed request target"));
    }
    let (path, query) = origin.split_once('?').unwrap_or((origin, ""));
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            return Err(HeadError::Malformed(
                "folded header lines are not supported",
            ));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(HeadError::Malformed("malformed header line"))?;
        if !is_token(name) {
            return Err(HeadError::Malformed("malformed header name"));
        }
        if value.bytes().any(|b| b == 0 || b == b'\r') {
            return Err(HeadError::Malformed("malformed header value"));
        }
        headers.push((name.to_owned(), value.trim_matches([' ', '\t']).to_owned()));
    }
    Ok(Head {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers,
        http10,
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
    }

    fn test_config() -> Config {
        Config {
            name: "test".into(),
            max_connections: 200,
            workers: 2,
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(5),
            max_header_bytes: 4096,
            max_body_bytes_in_flight: 1 << 20,
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

    #[test]
    fn a_chunked_request_body_is_411() {
        let server = start(test_config());
        let mut client = connect(&server);
        send(
            &mut client,
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        );
        let reply = read_reply(&mut client, false);
        assert_eq!(reply.status, 411);
        assert!(
            reply.text().contains("send Content-Length"),
            "{}",
            reply.text()
        );
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
