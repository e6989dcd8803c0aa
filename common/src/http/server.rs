//! The server's lifecycle: binding, the accept loop that admits connections under the caps, the
//! worker pool that runs the [`Handler`], and graceful shutdown.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sync::{self, lock, panic_message};

use super::connection::serve_connection;
use super::shared::{Job, PeerKey, Refused, Shared, Table};
use super::{Config, Handler, HttpError, Response, Stats};

/// The stack of a connection thread. It parses heads, drives rustls, and runs [`StreamBody`]
/// closures, which are written elsewhere; 256 KiB leaves room for those. Only touched pages cost
/// memory, so 1,000 idle connections stay at a few MiB of resident stack.
pub(super) const CONNECTION_STACK_BYTES: usize = 256 << 10;

/// The stack of a connection thread that may run the handler itself ([`Config::inline_paths`]):
/// a worker's (Rust's default), since the handler was written for one. Still only the touched
/// pages cost memory.
pub(super) const INLINE_CONNECTION_STACK_BYTES: usize = 2 << 20;

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
        let (jobs, queue) = sync::queue::<Job>();
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
        lock(&self.shared.jobs).take();
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
pub(super) fn work(name: &str, handler: &dyn Handler, queue: sync::Receiver<Job>) {
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

/// How long a new connection may wait at a cap for evicted connections to leave.
const DEPARTURE_WAIT: Duration = Duration::from_millis(500);

pub(super) fn accept_loop(shared: &Arc<Shared>) {
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
        let mut admitted = shared.admit_connection(peer);
        // At a cap, with the connections closed to make room still on their way out (their
        // threads need only be scheduled to end, which a busy machine may take a while to do):
        // wait a moment for them rather than refuse a client while room is being made. Bounded,
        // and only when something is departing, so a full server still answers 503 at once.
        let give_up = Instant::now() + DEPARTURE_WAIT;
        while admitted.is_err() && Instant::now() < give_up && shared.departing() > 0 {
            std::thread::sleep(Duration::from_millis(2));
            admitted = shared.admit_connection(peer);
        }
        match admitted {
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
            .stack_size(if shared.config.inline_paths.is_empty() {
                CONNECTION_STACK_BYTES
            } else {
                INLINE_CONNECTION_STACK_BYTES
            })
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
pub(super) fn refuse(mut tcp: TcpStream, reason: &str) {
    let _ = tcp.set_nonblocking(true);
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{reason}\n",
        reason.len() + 1
    );
    let _ = tcp.write_all(response.as_bytes());
    let _ = tcp.shutdown(std::net::Shutdown::Write);
}
