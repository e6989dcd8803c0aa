//! The gossip thread: sends a heartbeat to every peer each interval, receives theirs, and feeds
//! them to the shared [`Membership`].
//!
//! One UDP socket does both, so a peer's heartbeats come from its `--listen-cluster` address and
//! replies can go straight back to it. Peers are the `--join` addresses, resolved again every round
//! (a peer that is not up yet, or a name that does not resolve, is logged and retried, never
//! fatal), plus the source address of every live member heard from, so a pair where only one side
//! lists the other still sees each other.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use super::membership::{Change, DropReason, MemberState, Membership, Rejection};
use super::packet::{Heartbeat, Keyring, MAX_DATAGRAM, MAX_MEMBERS};

/// How often a clash of node names is logged at most.
const NAME_CLASH_WARNING: Duration = Duration::from_secs(60);

/// How often silent members are checked for the peer timeout.
const TICK: Duration = Duration::from_millis(50);

/// The longest the thread blocks in `recv` before it looks at the shutdown flag again.
const POLL: Duration = Duration::from_millis(100);

/// How the gossip thread runs.
#[derive(Clone, Debug)]
pub struct GossipConfig {
    /// The UDP address to bind (`--listen-cluster`).
    pub listen: SocketAddr,
    /// The peers' cluster addresses (`--join`), "host:port", resolved every round.
    pub join: Vec<String>,
    /// Time between two heartbeats to each peer.
    pub interval: Duration,
}

/// Why the gossip thread could not start.
#[derive(Debug)]
pub enum GossipError {
    /// Binding or configuring the UDP socket failed.
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The thread could not be spawned.
    Spawn(io::Error),
}

impl fmt::Display for GossipError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GossipError::Socket { addr, source } => {
                write!(f, "cannot use UDP socket {addr} for gossip: {source}")
            }
            GossipError::Spawn(err) => write!(f, "cannot start the gossip thread: {err}"),
        }
    }
}

impl std::error::Error for GossipError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GossipError::Socket { source, .. } => Some(source),
            GossipError::Spawn(err) => Some(err),
        }
    }
}

/// Counters of the gossip thread's own traffic (drops are counted in [`Membership`]).
#[derive(Debug, Default)]
pub struct GossipCounters {
    /// Heartbeats sent.
    pub sent: AtomicU64,
    /// Heartbeats that could not be sent (unreachable, resolve failure...).
    pub send_errors: AtomicU64,
    /// Datagrams received.
    pub received: AtomicU64,
}

/// A running gossip thread.
#[derive(Debug)]
pub struct Gossip {
    local_addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    counters: Arc<GossipCounters>,
    thread: Option<JoinHandle<()>>,
}

/// Locks the membership even if a thread panicked while holding it: the table stays usable.
pub fn lock(membership: &Mutex<Membership>) -> MutexGuard<'_, Membership> {
    telemeter_common::sync::lock(membership)
}

/// Milliseconds since the Unix epoch on our wall clock (0 before 1970).
pub fn now_ms() -> u64 {
    telemeter_common::time::unix_millis(SystemTime::now())
}

impl Gossip {
    /// Binds the socket and starts the thread.
    pub fn start(
        config: GossipConfig,
        keys: Keyring,
        membership: Arc<Mutex<Membership>>,
    ) -> Result<Gossip, GossipError> {
        let socket_err = |source| GossipError::Socket {
            addr: config.listen,
            source,
        };
        let socket = UdpSocket::bind(config.listen).map_err(socket_err)?;
        let local_addr = socket.local_addr().map_err(socket_err)?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(GossipCounters::default());
        let mut worker = Worker {
            socket,
            local_addr,
            config,
            keys,
            membership,
            shutdown: shutdown.clone(),
            counters: counters.clone(),
            seq: 0,
            resolve_errors: BTreeMap::new(),
            warned_name_clash: None,
        };
        let thread = thread::Builder::new()
            .name("gossip".into())
            .spawn(move || worker.run())
            .map_err(GossipError::Spawn)?;
        Ok(Gossip {
            local_addr,
            shutdown,
            counters,
            thread: Some(thread),
        })
    }

    /// The bound UDP address (useful when binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The traffic counters.
    pub fn counters(&self) -> &GossipCounters {
        &self.counters
    }

    /// Stops the thread and waits for it (at most one poll interval).
    pub fn shutdown(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("gossip thread panicked");
            }
        }
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    socket: UdpSocket,
    local_addr: SocketAddr,
    config: GossipConfig,
    keys: Keyring,
    membership: Arc<Mutex<Membership>>,
    shutdown: Arc<AtomicBool>,
    counters: Arc<GossipCounters>,
    seq: u64,
    /// The last resolve error per `--join` entry, so each is logged once until it changes.
    resolve_errors: BTreeMap<String, String>,
    /// When a clash of names was last logged.
    warned_name_clash: Option<Instant>,
}

impl Worker {
    fn run(&mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let interval = self.config.interval;
        let mut next_send = Instant::now();
        let mut last_send: Option<Instant> = None;
        let mut last_tick = Instant::now();
        while !self.shutdown.load(Ordering::SeqCst) {
            let mut changed = false;
            let now = Instant::now();
            // Deaths are noticed within TICK of the timeout, not only at send rounds.
            if now.saturating_duration_since(last_tick) >= TICK {
                last_tick = now;
                changed |= self.tick(now);
            }
            if now >= next_send {
                self.send_round();
                last_send = Some(now);
                next_send = now + interval;
            }
            let wait = next_send
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), POLL);
            if let Err(err) = self.socket.set_read_timeout(Some(wait)) {
                log::error!("gossip: cannot set the read timeout: {err}");
                thread::sleep(wait);
                continue;
            }
            match self.socket.recv_from(&mut buf) {
                Ok((len, from)) => changed |= self.receive(buf.get(..len).unwrap_or(&[]), from),
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                            // ICMP port unreachable from an earlier send, reported on Linux.
                            | io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(err) => {
                    log::warn!("gossip: receive failed: {err}");
                    thread::sleep(POLL);
                }
            }
            if changed {
                // Tell the peers our new view now rather than at the next round, so views agree
                // sooner; at most four rounds per interval however often membership changes.
                let earliest = last_send.map_or(now, |at| at + interval / 4);
                next_send = next_send.min(earliest.max(Instant::now()));
            }
        }
        log::debug!("gossip thread stopped");
    }

    /// Handles one datagram; true when membership changed (a member joined or restarted).
    fn receive(&mut self, datagram: &[u8], from: SocketAddr) -> bool {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let decoded = Heartbeat::decode(datagram, &self.keys);
        let mut membership = lock(&self.membership);
        let (hb, key_id) = match decoded {
            Ok(opened) => opened,
            Err(err) => {
                membership.count_drop(DropReason::of_packet_error(&err));
                log::debug!("gossip: dropped datagram from {from}: {err}");
                return false;
            }
        };
        if hb.name == membership.name() && hb.boot_id == membership.boot_id() {
            // Our own heartbeat: --join lists this node too (the same list on every node).
            return false;
        }
        let result = membership.on_heartbeat(&hb, from, Instant::now(), now_ms());
        if result.is_ok() {
            membership.record_key(&hb.name, key_id);
        }
        match &result {
            Ok(Change::Joined) => log::info!(
                "cluster: member {} is alive (internal {}, gossip {from}); members now {:?}, ring generation {}",
                hb.name,
                hb.internal_addr,
                membership.alive(),
                membership.generation()
            ),
            Ok(Change::Restarted) => log::info!(
                "cluster: member {} restarted (boot {:016x})",
                hb.name,
                hb.boot_id
            ),
            Ok(Change::None) => {}
            Err(Rejection::SelfName) => {
                let due = self
                    .warned_name_clash
                    .is_none_or(|at| at.elapsed() >= NAME_CLASH_WARNING);
                if due {
                    self.warned_name_clash = Some(Instant::now());
                    log::warn!(
                        "cluster: {from} sends heartbeats under our name {:?} (boot {:016x}): two servers share a --name; their heartbeats are dropped",
                        hb.name,
                        hb.boot_id
                    );
                }
            }
            Err(rejection) => log::debug!(
                "gossip: dropped heartbeat from {from} naming {}: {rejection}",
                hb.name
            ),
        }
        matches!(result, Ok(Change::Joined | Change::Restarted))
    }

    /// Marks silent members dead; true when that changed membership.
    fn tick(&mut self, now: Instant) -> bool {
        let mut membership = lock(&self.membership);
        let before: BTreeSet<String> = membership.alive().into_iter().collect();
        let changed = membership.tick(now);
        if changed {
            let after: BTreeSet<String> = membership.alive().into_iter().collect();
            for gone in before.difference(&after) {
                log::warn!(
                    "cluster: member {gone} is dead (no heartbeat for {:?}); members now {:?}, ring generation {}",
                    membership.config().peer_timeout,
                    after,
                    membership.generation()
                );
            }
        }
        changed
    }

    fn send_round(&mut self) {
        let (datagram, mut targets) = {
            let membership = lock(&self.membership);
            if membership.internal_addr().is_empty() {
                // Not advertising yet: peers would learn an address that does not work.
                return;
            }
            self.seq += 1;
            let mut members = membership.alive();
            members.truncate(MAX_MEMBERS);
            let hb = Heartbeat {
                name: membership.name().to_owned(),
                boot_id: membership.boot_id(),
                seq: self.seq,
                sent_ms: now_ms(),
                internal_addr: membership.internal_addr().to_owned(),
                members,
            };
            let datagram = match hb.encode(&self.keys) {
                Ok(datagram) => datagram,
                Err(err) => {
                    log::error!("gossip: cannot encode our heartbeat: {err}");
                    return;
                }
            };
            let learned: BTreeSet<SocketAddr> = membership
                .members()
                .filter(|m| m.state != MemberState::Dead)
                .map(|m| m.gossip_addr)
                .collect();
            (datagram, learned)
        };
        for peer in self.config.join.clone() {
            match peer.to_socket_addrs() {
                Ok(addrs) => {
                    if self.resolve_errors.remove(&peer).is_some() {
                        log::info!("gossip: peer {peer} resolves again");
                    }
                    targets.extend(addrs);
                }
                Err(err) => {
                    self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    let text = err.to_string();
                    if self.resolve_errors.get(&peer) != Some(&text) {
                        log::warn!("gossip: cannot resolve peer {peer}: {text}");
                        self.resolve_errors.insert(peer, text);
                    }
                }
            }
        }
        targets.remove(&self.local_addr);
        for target in targets {
            match self.socket.send_to(&datagram, target) {
                Ok(_) => {
                    self.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    log::debug!("gossip: cannot send to {target}: {err}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
