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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    membership
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Milliseconds since the Unix epoch on our wall clock (0 before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
mod tests {
    use super::super::membership::MembershipConfig;
    use super::*;
    use telemeter_common::token::DerivedKey;

    fn keyring(key: &DerivedKey) -> Keyring {
        Keyring::new(std::slice::from_ref(key)).unwrap()
    }

    fn start(name: &str, join: Vec<String>, key: DerivedKey) -> (Gossip, Arc<Mutex<Membership>>) {
        let mut config = MembershipConfig::new(name, &format!("{name}:9004"), rand_boot(name));
        config.vnodes = 8;
        let membership = Arc::new(Mutex::new(Membership::new(config)));
        let gossip = Gossip::start(
            GossipConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                join,
                interval: Duration::from_millis(50),
            },
            keyring(&key),
            membership.clone(),
        )
        .unwrap();
        (gossip, membership)
    }

    fn rand_boot(name: &str) -> u64 {
        name.bytes()
            .fold(now_ms(), |h, b| h.rotate_left(7) ^ u64::from(b))
    }

    /// Polls `cond` for up to 10 s.
    fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        cond()
    }

    #[test]
    fn two_nodes_see_each_other_alive() {
        let key = DerivedKey([3; 32]);
        let (mut a, ma) = start("a", vec![], key.clone());
        // Only b lists a: a learns b's address from its heartbeats.
        let (mut b, mb) = start("b", vec![a.local_addr().to_string()], key.clone());
        assert!(wait_for(|| lock(&ma).alive() == ["a", "b"]
            && lock(&mb).alive() == ["a", "b"]
            && lock(&ma).converged()
            && lock(&mb).converged()));
        assert_eq!(lock(&ma).member("b").unwrap().internal_addr, "b:9004");
        assert_eq!(lock(&mb).member("a").unwrap().gossip_addr, a.local_addr());
        assert!(a.counters().received.load(Ordering::Relaxed) > 0);

        // b stops: a sees it dead after the peer timeout.
        b.shutdown();
        lock(&ma).tick(Instant::now() + Duration::from_secs(4));
        assert_eq!(lock(&ma).alive(), ["a"]);
        a.shutdown();
    }

    #[test]
    fn packets_under_another_key_are_dropped_and_counted() {
        let (mut a, ma) = start("a", vec![], DerivedKey([1; 32]));
        let (mut b, _mb) = start("b", vec![a.local_addr().to_string()], DerivedKey([2; 32]));
        let garbage = UdpSocket::bind("127.0.0.1:0").unwrap();
        garbage.send_to(b"not a heartbeat", a.local_addr()).unwrap();
        garbage
            .send_to(&vec![1u8; MAX_DATAGRAM + 1], a.local_addr())
            .unwrap();
        let count = |reason: DropReason| {
            lock(&ma)
                .drops()
                .into_iter()
                .find(|(r, _)| *r == reason)
                .map(|(_, n)| n)
                .unwrap_or(0)
        };
        assert!(wait_for(|| count(DropReason::UnknownKey) >= 2
            && count(DropReason::Garbage) >= 1
            && count(DropReason::Oversized) >= 1));
        assert_eq!(lock(&ma).alive(), ["a"]);
        a.shutdown();
        b.shutdown();
    }

    #[test]
    fn own_address_in_join_is_ignored() {
        let key = DerivedKey([4; 32]);
        let (mut a, ma) = start("a", vec![], key.clone());
        // b lists itself and a, as one --join list shared by every node would.
        let b_addr = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut config = MembershipConfig::new("b", "b:9004", 77);
        config.vnodes = 8;
        let mb = Arc::new(Mutex::new(Membership::new(config)));
        let mut b = Gossip::start(
            GossipConfig {
                listen: b_addr,
                join: vec![a.local_addr().to_string(), b_addr.to_string()],
                interval: Duration::from_millis(50),
            },
            keyring(&key),
            mb.clone(),
        )
        .unwrap();
        assert!(wait_for(|| lock(&mb).alive() == ["a", "b"]
            && lock(&ma).alive() == ["a", "b"]
            && b.counters().received.load(Ordering::Relaxed) > 10));
        let self_drops = lock(&mb)
            .drops()
            .into_iter()
            .find(|(r, _)| *r == DropReason::SelfName)
            .map(|(_, n)| n);
        assert_eq!(self_drops, Some(0));
        a.shutdown();
        b.shutdown();
    }

    #[test]
    fn unresolvable_join_is_not_fatal() {
        let (mut a, ma) = start(
            "a",
            vec!["no-such-host.invalid:1".into(), "127.0.0.1:notaport".into()],
            DerivedKey([1; 32]),
        );
        assert!(wait_for(|| a
            .counters()
            .send_errors
            .load(Ordering::Relaxed)
            >= 4));
        assert_eq!(lock(&ma).alive(), ["a"]);
        a.shutdown();
    }

    #[test]
    fn replayed_and_skewed_heartbeats_are_dropped_and_counted() {
        let key = DerivedKey([5; 32]);
        let (mut a, ma) = start("a", vec![], key.clone());
        let sealing = keyring(&key);
        let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
        let heartbeat = |seq: u64, sent_ms: u64| {
            Heartbeat {
                name: "x".into(),
                boot_id: 9,
                seq,
                sent_ms,
                internal_addr: "x:1".into(),
                members: vec!["x".into()],
            }
            .encode(&sealing)
            .unwrap()
        };
        let first = heartbeat(1, now_ms());
        attacker.send_to(&first, a.local_addr()).unwrap();
        assert!(wait_for(|| lock(&ma).alive() == ["a", "x"]));
        attacker.send_to(&first, a.local_addr()).unwrap();
        attacker
            .send_to(&heartbeat(2, now_ms() - 120_000), a.local_addr())
            .unwrap();
        let count = |reason: DropReason| {
            lock(&ma)
                .drops()
                .into_iter()
                .find(|(r, _)| *r == reason)
                .map(|(_, n)| n)
                .unwrap_or(0)
        };
        assert!(wait_for(
            || count(DropReason::Replay) == 1 && count(DropReason::ClockSkew) == 1
        ));
        assert_eq!(lock(&ma).member("x").unwrap().last_seq, 1);
        a.shutdown();
    }
}
