//! What the accept loop, connections and the handle share: the connection table with its caps
//! and eviction order, and the body budget over all connections and per peer.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sync::{self, lock};

use super::later::Owed;
use super::{Config, Handler, Request, Response};

/// a body that stops arriving holds about what it sent.
pub(super) const BODY_STEP: usize = 16 << 10;

/// A body that received bytes within this long is making progress and is not closed to make room
/// at the connection cap; one silent for longer may be, after every idle connection.
pub(super) const BODY_PROGRESS_GRACE: Duration = Duration::from_secs(5);

pub(super) type Job = (Request, sync::ReplySender<Response>);

/// What the accept loop, connections and the handle share.
pub(super) struct Shared {
    pub(super) addr: SocketAddr,
    /// Kept here rather than in the accept thread so its descriptor stays open for as long as
    /// `stop` may shut it down to wake a blocked `accept`.
    pub(super) listener: TcpListener,
    pub(super) config: Config,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) stopping: AtomicBool,
    pub(super) open: AtomicU64,
    pub(super) accepted: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) peer_rejected: AtomicU64,
    pub(super) evicted: AtomicU64,
    pub(super) protocol_errors: AtomicU64,
    pub(super) peer_rejected_bodies: AtomicU64,
    pub(super) refused_heads: AtomicU64,
    pub(super) body_bytes_in_flight: AtomicUsize,
    /// Taken once shutdown has drained the connections, which ends the workers. Without a
    /// shutdown, the queue closes when the last holder of `Shared` goes.
    pub(super) jobs: Mutex<Option<sync::Sender<Job>>>,
    pub(super) connections: Mutex<Table>,
    pub(super) next_connection: AtomicU64,
}

/// Whose connections and body bytes count together: an IPv4 address, or an IPv6 /64 (one host
/// usually has a whole /64, so counting single IPv6 addresses would cap nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct PeerKey(IpAddr);

impl PeerKey {
    pub(super) fn of(ip: IpAddr) -> PeerKey {
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
pub(super) struct PeerUsage {
    pub(super) connections: usize,
    pub(super) body_bytes: usize,
}

/// The open connections and what each peer address holds, under one lock.
#[derive(Default)]
pub(super) struct Table {
    pub(super) connections: HashMap<u64, Tracked>,
    pub(super) peers: HashMap<PeerKey, PeerUsage>,
}

impl Table {
    /// Forgets `peer` once it holds nothing, so the map only grows with peers that hold something.
    pub(super) fn forget_if_unused(&mut self, peer: PeerKey) {
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
pub(super) enum Phase {
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
pub(super) struct Tracked {
    pub(super) fd: RawFd,
    /// The answer the connection owes: while one is, it is not idle (see the `later` module).
    pub(super) owed: Arc<Owed>,
    pub(super) peer: PeerKey,
    pub(super) idle: bool,
    pub(super) closed_by_server: bool,
    pub(super) phase: Phase,
}

/// Why a body could not grow.
pub(super) enum BudgetFull {
    /// Over [`Config::max_body_bytes_in_flight`].
    All,
    /// Over [`Config::max_body_bytes_per_peer`].
    Peer,
}

impl Shared {
    pub(super) fn connections(&self) -> MutexGuard<'_, Table> {
        lock(&self.connections)
    }

    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes idle connections; idempotent, does not wait.
    pub(super) fn stop(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.wake_accept();
        self.close_connections(false);
    }

    fn wake_accept(&self) {
        // On Linux, shutting a listening socket down wakes a blocked accept() with an error.
        // SAFETY: the descriptor is the listener's, still open (`Shared::listener`, which lives as long as `self`).
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
    pub(super) fn close_connections(&self, busy_too: bool) {
        for tracked in self.connections().connections.values_mut() {
            if tracked.idle && !tracked.owed.outstanding() || busy_too {
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
    pub(super) fn admit_connection(&self, peer: PeerKey) -> Result<(), Refused> {
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
            // Owing an answer is being answered: not evicted (see the `later` module).
            .filter(|t| !t.owed.outstanding())
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

    /// Connections closed to make room whose threads have not ended yet.
    pub(super) fn departing(&self) -> usize {
        self.connections()
            .connections
            .values()
            .filter(|t| t.closed_by_server)
            .count()
    }

    /// Uncounts a connection of `peer` (admitted by [`Shared::admit_connection`]).
    pub(super) fn release_connection(&self, peer: PeerKey) {
        let mut table = self.connections();
        if let Some(usage) = table.peers.get_mut(&peer) {
            usage.connections = usage.connections.saturating_sub(1);
        }
        table.forget_if_unused(peer);
    }

    pub(super) fn protocol_error(&self) {
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
pub(super) enum Refused {
    All,
    Peer,
}

/// A request body as it arrives, with the budget it holds. Memory is set aside in steps as bytes
/// arrive ([`BODY_STEP`], or half again what is held), never for what was only declared, so a
/// peer that declares a large body and stalls holds about what it sent.
pub(super) struct BodyBuffer {
    pub(super) shared: Arc<Shared>,
    pub(super) peer: PeerKey,
    pub(super) bytes: Vec<u8>,
    /// Budget held: the capacity asked for.
    pub(super) reserved: usize,
    /// The body's size when known (Content-Length), else its cap; memory never grows past it.
    pub(super) most: usize,
}

impl BodyBuffer {
    pub(super) fn new(shared: Arc<Shared>, peer: PeerKey, most: usize) -> BodyBuffer {
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
    pub(super) fn append(&mut self, data: &[u8]) -> Result<(), BudgetFull> {
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
    pub(super) fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

impl Drop for BodyBuffer {
    fn drop(&mut self) {
        self.shared.release_body(self.peer, self.reserved);
    }
}
