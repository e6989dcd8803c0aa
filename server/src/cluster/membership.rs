//! Who is in the cluster, as a pure state machine: heartbeats and time go in, member states and
//! the hash ring come out. No I/O, no clock reads; the gossip thread drives it.
//!
//! Decisions this module makes (DESIGN §6):
//! - **Authentication is the MAC, not the source address.** Any heartbeat whose MAC verifies under
//!   the gossip key comes from a holder of the shared key, so its name is accepted and learned,
//!   whether or not its address is in `--join` (UDP source addresses are forgeable anyway, and NAT
//!   rewrites them). The gossip thread also sends to the source address of every member it hears
//!   from, so a node listed by only one side of a pair still ends up with a symmetric view.
//! - **Liveness is first-hand only.** A member is alive while its own heartbeats arrive within the
//!   peer timeout; the member lists inside heartbeats are recorded (to show whether views agree)
//!   but never make anyone alive, so a dead node cannot be kept alive by hearsay.
//! - **Anti-replay.** Per member we keep the current boot id, the last sequence number and send
//!   time, and the boot ids seen replaced. A heartbeat is dropped when its send time is outside
//!   `now ± max_clock_skew`, when its boot id was replaced before (`StaleBoot`), when it names a new
//!   boot id but is not newer than the current boot's last heartbeat while that boot is still alive
//!   (an old boot replayed, `StaleBoot`), or when its sequence number does not increase (`Replay`).
//! - **Suspect is local and does not move the ring.** A forwarding failure marks the owner suspect:
//!   it is skipped when choosing where to forward, but stays in the ring, because the other nodes
//!   did not see that failure and every node must build the same ring. A suspect member becomes
//!   alive again with a heartbeat that arrives after `peer_timeout` has passed since the failure.
//! - The ring is rebuilt only when the set of non-dead members changes; `generation()` counts the
//!   rebuilds so callers can tell cheaply whether ownership may have moved.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use telemeter_common::keys::KeyId;

use super::packet::{Heartbeat, PacketError};
use super::ring::{HashRing, DEFAULT_VNODES};

/// How many replaced boot ids are remembered per member.
const RETIRED_BOOTS: usize = 8;

/// How membership judges heartbeats.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// This node's name.
    pub name: String,
    /// This node's internal (HTTP peer) address, as advertised; empty until known.
    pub internal_addr: String,
    /// This node's boot id.
    pub boot_id: u64,
    /// A member whose last heartbeat is older than this is dead.
    pub peer_timeout: Duration,
    /// Heartbeats whose send time differs from ours by more than this are dropped.
    pub max_clock_skew: Duration,
    /// Most members remembered (dead ones included); new names beyond it are dropped.
    pub max_members: usize,
    /// Virtual nodes per member on the ring.
    pub vnodes: usize,
}

impl MembershipConfig {
    /// Defaults for everything but the node's identity: 3 s timeout, 30 s skew, 256 members.
    pub fn new(name: &str, internal_addr: &str, boot_id: u64) -> MembershipConfig {
        MembershipConfig {
            name: name.to_owned(),
            internal_addr: internal_addr.to_owned(),
            boot_id,
            peer_timeout: Duration::from_secs(3),
            max_clock_skew: Duration::from_secs(30),
            max_members: 256,
            vnodes: DEFAULT_VNODES,
        }
    }
}

/// A member's state as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Heartbeats arrive in time.
    Alive,
    /// Heartbeats arrive, but forwarding to it failed recently: skipped when forwarding.
    Suspect,
    /// No heartbeat for longer than the peer timeout.
    Dead,
}

impl MemberState {
    /// Lower-case name, for JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
        }
    }
}

/// What this node knows about one peer.
#[derive(Clone, Debug)]
pub struct Member {
    /// The peer's name.
    pub name: String,
    /// Its internal (HTTP peer) address, from its last heartbeat.
    pub internal_addr: String,
    /// The UDP address its last heartbeat came from.
    pub gossip_addr: SocketAddr,
    /// Its current boot id.
    pub boot_id: u64,
    /// The last sequence number accepted from this boot.
    pub last_seq: u64,
    /// The send time of that heartbeat (its clock, ms since the epoch).
    pub last_sent_ms: u64,
    /// When we accepted it (our clock).
    pub last_heard: Instant,
    /// Alive, suspect or dead.
    pub state: MemberState,
    /// When it was last marked suspect.
    pub suspected_at: Option<Instant>,
    /// The members it sees alive, from its last heartbeat.
    pub view: Vec<String>,
    /// The id of the key that opened its last accepted heartbeat (shows a key rotation's progress).
    pub key_id: Option<KeyId>,
    retired_boots: VecDeque<u64>,
}

/// Why a heartbeat (or datagram) was dropped: the label of the drop counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The AEAD tag did not verify (forged, tampered, truncated).
    BadMac,
    /// Sealed under a key id we do not hold (another deployment's key, or one rotated out).
    UnknownKey,
    /// A sequence number that did not increase for the current boot.
    Replay,
    /// A boot id that was replaced, or an older boot replayed.
    StaleBoot,
    /// Send time too far from our clock.
    ClockSkew,
    /// Truncated, malformed, or an unknown version.
    Garbage,
    /// Over the datagram size limit.
    Oversized,
    /// Our own name: a reflected packet of ours, or another node misconfigured with our name.
    SelfName,
    /// A new member while the member table is full.
    TableFull,
}

impl DropReason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [DropReason; 9] = [
        DropReason::BadMac,
        DropReason::UnknownKey,
        DropReason::Replay,
        DropReason::StaleBoot,
        DropReason::ClockSkew,
        DropReason::Garbage,
        DropReason::Oversized,
        DropReason::SelfName,
        DropReason::TableFull,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BadMac => "bad_mac",
            DropReason::UnknownKey => "unknown_key",
            DropReason::Replay => "replay",
            DropReason::StaleBoot => "stale_boot",
            DropReason::ClockSkew => "clock_skew",
            DropReason::Garbage => "garbage",
            DropReason::Oversized => "oversized",
            DropReason::SelfName => "self_name",
            DropReason::TableFull => "table_full",
        }
    }

    /// The reason a datagram that failed to decode is counted under.
    pub fn of_packet_error(err: &PacketError) -> DropReason {
        match err {
            PacketError::TooLarge { .. } => DropReason::Oversized,
            PacketError::BadMac => DropReason::BadMac,
            PacketError::UnknownKey(_) => DropReason::UnknownKey,
            PacketError::Truncated | PacketError::BadVersion(_) | PacketError::Malformed(_) => {
                DropReason::Garbage
            }
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why [`Membership::on_heartbeat`] refused a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Sequence number `seq` is not above the last accepted `last`.
    Replay {
        /// The packet's sequence number.
        seq: u64,
        /// The last one accepted from that boot.
        last: u64,
    },
    /// The boot id was replaced, or is older than the current boot.
    StaleBoot {
        /// The packet's boot id.
        boot_id: u64,
    },
    /// The send time is `skew_ms` away from our clock, over the limit.
    ClockSkew {
        /// Absolute difference, ms.
        skew_ms: u64,
    },
    /// The packet claims our own name.
    SelfName,
    /// The member table is full.
    TableFull,
}

impl Rejection {
    /// The drop counter this rejection increments.
    pub fn reason(&self) -> DropReason {
        match self {
            Rejection::Replay { .. } => DropReason::Replay,
            Rejection::StaleBoot { .. } => DropReason::StaleBoot,
            Rejection::ClockSkew { .. } => DropReason::ClockSkew,
            Rejection::SelfName => DropReason::SelfName,
            Rejection::TableFull => DropReason::TableFull,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Replay { seq, last } => {
                write!(f, "sequence {seq} is not above the last accepted {last}")
            }
            Rejection::StaleBoot { boot_id } => {
                write!(f, "boot id {boot_id:016x} is stale")
            }
            Rejection::ClockSkew { skew_ms } => {
                write!(f, "send time is {skew_ms} ms away from our clock")
            }
            Rejection::SelfName => f.write_str("heartbeat carries our own name"),
            Rejection::TableFull => f.write_str("member table is full"),
        }
    }
}

impl std::error::Error for Rejection {}

/// What an accepted heartbeat changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing but freshness: the member was alive and stays alive.
    None,
    /// A member that was unknown or dead is alive: the ring changed.
    Joined,
    /// An alive member restarted (new boot id); the ring did not change.
    Restarted,
}

/// The member table, the drop counters and the ring of one node.
#[derive(Debug)]
pub struct Membership {
    config: MembershipConfig,
    members: BTreeMap<String, Member>,
    drops: BTreeMap<DropReason, u64>,
    accepted: u64,
    ring: HashRing,
    ring_members: Vec<String>,
    generation: u64,
}

impl Membership {
    /// A table with only this node in it.
    pub fn new(config: MembershipConfig) -> Membership {
        let ring_members = vec![config.name.clone()];
        let ring = HashRing::new(&ring_members, config.vnodes);
        Membership {
            config,
            members: BTreeMap::new(),
            drops: BTreeMap::new(),
            accepted: 0,
            ring,
            ring_members,
            generation: 1,
        }
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// This node's advertised internal address.
    pub fn internal_addr(&self) -> &str {
        &self.config.internal_addr
    }

    /// Changes the advertised internal address (once the internal port is bound, when it was
    /// bound to port 0); peers learn it from the next heartbeat.
    pub fn set_internal_addr(&mut self, addr: &str) {
        addr.clone_into(&mut self.config.internal_addr);
    }

    /// This node's boot id.
    pub fn boot_id(&self) -> u64 {
        self.config.boot_id
    }

    /// The configuration.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// Judges an authenticated heartbeat received from `from` at `now` (our monotonic clock) and
    /// `now_ms` (our wall clock, ms since the epoch). A rejection is also counted.
    pub fn on_heartbeat(
        &mut self,
        hb: &Heartbeat,
        from: SocketAddr,
        now: Instant,
        now_ms: u64,
    ) -> Result<Change, Rejection> {
        let result = self.judge(hb, from, now, now_ms);
        match &result {
            Ok(change) => {
                self.accepted += 1;
                if *change == Change::Joined {
                    self.rebuild_ring_if_changed();
                }
            }
            Err(rejection) => self.count_drop(rejection.reason()),
        }
        result
    }

    fn judge(
        &mut self,
        hb: &Heartbeat,
        from: SocketAddr,
        now: Instant,
        now_ms: u64,
    ) -> Result<Change, Rejection> {
        if hb.name == self.config.name {
            return Err(Rejection::SelfName);
        }
        let skew_ms = hb.sent_ms.abs_diff(now_ms);
        if u128::from(skew_ms) > self.config.max_clock_skew.as_millis() {
            return Err(Rejection::ClockSkew { skew_ms });
        }
        let peer_timeout = self.config.peer_timeout;
        let Some(member) = self.members.get_mut(&hb.name) else {
            if self.members.len() >= self.config.max_members && !self.evict_oldest_dead() {
                return Err(Rejection::TableFull);
            }
            self.members.insert(
                hb.name.clone(),
                Member {
                    name: hb.name.clone(),
                    internal_addr: hb.internal_addr.clone(),
                    gossip_addr: from,
                    boot_id: hb.boot_id,
                    last_seq: hb.seq,
                    last_sent_ms: hb.sent_ms,
                    last_heard: now,
                    state: MemberState::Alive,
                    suspected_at: None,
                    view: hb.members.clone(),
                    key_id: None,
                    retired_boots: VecDeque::new(),
                },
            );
            return Ok(Change::Joined);
        };

        let mut restarted = false;
        if hb.boot_id == member.boot_id {
            if hb.seq <= member.last_seq {
                return Err(Rejection::Replay {
                    seq: hb.seq,
                    last: member.last_seq,
                });
            }
        } else {
            if member.retired_boots.contains(&hb.boot_id) {
                return Err(Rejection::StaleBoot {
                    boot_id: hb.boot_id,
                });
            }
            // While the current boot is alive, a different boot must be newer than it; otherwise
            // it is a replay of an earlier boot we never saw replaced.
            if member.state != MemberState::Dead && hb.sent_ms <= member.last_sent_ms {
                return Err(Rejection::StaleBoot {
                    boot_id: hb.boot_id,
                });
            }
            if member.retired_boots.len() >= RETIRED_BOOTS {
                member.retired_boots.pop_front();
            }
            member.retired_boots.push_back(member.boot_id);
            member.boot_id = hb.boot_id;
            restarted = true;
        }

        let was = member.state;
        member.last_seq = hb.seq;
        member.last_sent_ms = hb.sent_ms;
        member.last_heard = now;
        member.internal_addr.clone_from(&hb.internal_addr);
        member.gossip_addr = from;
        member.view.clone_from(&hb.members);
        member.state = match (was, member.suspected_at) {
            (MemberState::Suspect, Some(at))
                if now.saturating_duration_since(at) < peer_timeout =>
            {
                MemberState::Suspect
            }
            _ => MemberState::Alive,
        };
        if member.state == MemberState::Alive {
            member.suspected_at = None;
        }
        Ok(match (was, restarted) {
            (MemberState::Dead, _) => Change::Joined,
            (_, true) => Change::Restarted,
            _ => Change::None,
        })
    }

    fn evict_oldest_dead(&mut self) -> bool {
        let oldest = self
            .members
            .values()
            .filter(|m| m.state == MemberState::Dead)
            .min_by_key(|m| m.last_heard)
            .map(|m| m.name.clone());
        match oldest {
            Some(name) => {
                self.members.remove(&name);
                true
            }
            None => false,
        }
    }

    /// Marks members dead whose last heartbeat is older than the peer timeout. Returns whether the
    /// set of live members (and so the ring) changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        let timeout = self.config.peer_timeout;
        let mut changed = false;
        for member in self.members.values_mut() {
            if member.state != MemberState::Dead
                && now.saturating_duration_since(member.last_heard) > timeout
            {
                member.state = MemberState::Dead;
                member.suspected_at = None;
                changed = true;
            }
        }
        if changed {
            self.rebuild_ring_if_changed();
        }
        changed
    }

    /// Marks a live member suspect because forwarding to it failed at `now`. Returns false when the
    /// member is unknown or dead.
    pub fn mark_suspect(&mut self, name: &str, now: Instant) -> bool {
        match self.members.get_mut(name) {
            Some(member) if member.state != MemberState::Dead => {
                member.state = MemberState::Suspect;
                member.suspected_at = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Counts a dropped datagram (decode failures are counted by the caller through this).
    pub fn count_drop(&mut self, reason: DropReason) {
        *self.drops.entry(reason).or_insert(0) += 1;
    }

    /// Dropped datagrams by reason, every reason listed (zeros included).
    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.drops.get(r).copied().unwrap_or(0)))
            .collect()
    }

    /// Heartbeats accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// The live members (alive or suspect) and self, sorted by name: the ring's members.
    pub fn alive(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .members
            .values()
            .filter(|m| m.state != MemberState::Dead)
            .map(|m| m.name.clone())
            .collect();
        names.push(self.config.name.clone());
        names.sort();
        names.dedup();
        names
    }

    /// A member's record.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.get(name)
    }

    /// Records which key opened `name`'s heartbeat that was just accepted.
    pub fn record_key(&mut self, name: &str, key_id: KeyId) {
        if let Some(member) = self.members.get_mut(name) {
            member.key_id = Some(key_id);
        }
    }

    /// Every known peer (self excluded), dead ones included, by name.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// The ring over [`Membership::alive`], rebuilt only when that set changes.
    pub fn ring(&self) -> &HashRing {
        &self.ring
    }

    /// How many times the ring has been built (1 for the initial self-only ring).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn rebuild_ring_if_changed(&mut self) {
        let alive = self.alive();
        if alive != self.ring_members {
            self.ring = HashRing::new(&alive, self.config.vnodes);
            self.ring_members = alive;
            self.generation += 1;
        }
    }

    /// Whether every live peer reports the same alive set as ours (the cluster has converged).
    pub fn converged(&self) -> bool {
        let ours = self.alive();
        self.members
            .values()
            .filter(|m| m.state != MemberState::Dead)
            .all(|m| m.view == ours)
    }
}

#[cfg(test)]
mod tests;
