//! The cluster: static membership over UDP heartbeats, a consistent hash ring over the live
//! members, and signed forwarding of pushes to the member that owns their cluster id (DESIGN §6).
//!
//! - [`packet`]: the sealed envelope (ChaCha20-Poly1305, rotatable keys) and the heartbeat;
//! - [`membership`]: the member table and the ring, a pure state machine;
//! - [`ring`]: the consistent hash ring over member names;
//! - [`gossip`]: the thread that sends and receives heartbeats;
//! - [`forward`]: sealing, opening and sending forwarded pushes;
//! - [`endpoint`]: the internal endpoint that stores forwarded pushes;
//! - [`handoff`]: moving files to their new owner when ownership moves;
//! - [`placement`]: where an upload is stored in a cluster: locally or forwarded to the owner;
//! - [`metrics`]: the cluster's families in `/metrics`.
//!
//! [`Cluster`] ties them together for the server: where should this cluster id's upload go, in
//! which order, and what does the cluster look like (`/debug/cluster`, `/metrics`).
//!
//! What it guarantees, and what it does not:
//! - a client gets 200 only once some server has the upload on disk: the owner, or when the owner
//!   cannot be reached, the next live member in ring order (which becomes the owner if the first
//!   one is gone), or this node; the handoff thread later moves a failed-over file to its owner;
//! - each node serves on `/federate` only the clusters it owns in its own view of the ring, and
//!   nothing before it has heard its peers (or a peer timeout passed), so two nodes serve the same
//!   cluster only while their views differ: about one peer timeout after a change, or for as long
//!   as a network partition lasts (there is no consensus: each side of a partition owns all of
//!   its clusters);
//! - nodes' clocks must agree within 30 s (heartbeats and forwards carry sealed send times);
//! - every byte between servers is sealed under a key derived from `--shared-key`: a listener on
//!   the internal network sees sizes, timing and which addresses talk, nothing else.

pub mod endpoint;
pub mod forward;
pub mod gossip;
pub mod handoff;
pub mod membership;
pub mod metrics;
pub mod packet;
pub mod placement;
pub mod ring;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ::ring::rand::{SecureRandom, SystemRandom};
use serde_json::{json, Value};
use telemeter_common::keys::{KeyId, KeyPurpose, SharedKey};

use forward::{ForwardError, ForwardKind, Forwarded, Forwarder, Sealer, VerifyError};
use gossip::{lock, Gossip, GossipConfig};
use membership::{DropReason, MemberState, Membership, MembershipConfig};
use packet::{Keyring, KeyringError, MAX_NAME};

/// How this node takes part in the cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's name (`--name`), unique in the cluster, 1 to 255 bytes.
    pub name: String,
    /// The UDP address heartbeats are sent from and received on (`--listen-cluster`).
    pub listen_cluster: SocketAddr,
    /// The peers' cluster addresses (`--join`, repeatable), "host:port".
    pub join: Vec<String>,
    /// Time between heartbeats (`--gossip-interval`).
    pub gossip_interval: Duration,
    /// A member silent for this long is dead (`--peer-timeout`).
    pub peer_timeout: Duration,
    /// The internal address peers forward pushes to, "host:port", as they can reach it. Empty
    /// when not known yet (the internal port is bound later): no heartbeat is sent until
    /// [`Cluster::set_internal_addr`] gives it, so peers never learn a wrong address.
    pub internal_addr: String,
    /// Bound on one forwarded request, the owner's fsync included.
    pub forward_timeout: Duration,
    /// Whether peers' internal ports serve TLS (`--internal-tls-*`): forwards then use https.
    pub internal_tls: bool,
}

impl ClusterConfig {
    /// A configuration with the default timings: 1 s interval, 3 s peer timeout, 10 s forwards.
    pub fn new(name: &str, listen_cluster: SocketAddr, internal_addr: &str) -> ClusterConfig {
        ClusterConfig {
            name: name.to_owned(),
            listen_cluster,
            join: Vec::new(),
            gossip_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(3),
            internal_addr: internal_addr.to_owned(),
            forward_timeout: Duration::from_secs(10),
            internal_tls: false,
        }
    }
}

/// Why the cluster could not start.
#[derive(Debug)]
pub enum ClusterError {
    /// The configuration cannot work; the text says why.
    Config(String),
    /// The gossip socket or thread failed.
    Gossip(gossip::GossipError),
    /// No randomness for the boot id.
    Random,
    /// The shared keys cannot be used (none, or one listed twice).
    Keys(KeyringError),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Config(why) => write!(f, "invalid cluster configuration: {why}"),
            ClusterError::Gossip(err) => err.fmt(f),
            ClusterError::Random => f.write_str("no randomness available for the boot id"),
            ClusterError::Keys(err) => write!(f, "--shared-key: {err}"),
        }
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClusterError::Gossip(err) => Some(err),
            _ => None,
        }
    }
}

/// A place an upload can be stored: this node or a live peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The member's name.
    pub name: String,
    /// Its internal address (ours for self).
    pub internal_addr: String,
    /// Whether it is this node (store locally, do not forward).
    pub is_self: bool,
}

/// Counters of the cluster, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Members by state, self counted as alive.
    pub members_alive: u64,
    /// Members suspect.
    pub members_suspect: u64,
    /// Members dead (still remembered).
    pub members_dead: u64,
    /// Ring rebuilds so far.
    pub ring_generation: u64,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Heartbeats that could not be sent.
    pub heartbeat_send_errors: u64,
    /// Heartbeats accepted.
    pub heartbeats_accepted: u64,
    /// Dropped datagrams by reason (label value, count), every reason listed.
    pub drops: Vec<(&'static str, u64)>,
    /// Forwards sent, by kind and result (`push`/`handoff`, `ok`/`unreachable`/`rejected`).
    pub forwards: Vec<(&'static str, &'static str, u64)>,
    /// Forwards received, by result (`push`, `handoff`: stored; `unauthorized`; `store_error`).
    pub received_forwards: Vec<(&'static str, u64)>,
    /// Each peer's name and the id of the key that opened its last accepted heartbeat.
    pub peer_keys: Vec<(String, String)>,
    /// Forwards accepted, by the id of the key that opened them.
    pub forwards_opened: Vec<(String, u64)>,
}

/// Results of forwards received, in [`ClusterStats::received_forwards`] order.
const RECEIVED: [&str; 7] = [
    "push",
    "handoff",
    "unauthorized",
    "store_error",
    "receive",
    // A forwarded remote-write request or push refused for its content (`--max-series` merged).
    "refused",
    // A forwarded merge overtaken by other writes of its cluster every time it was tried
    // (`StoreError::Contended`): the client retries; the sender suspects no one.
    "contended",
];

/// Forward results by kind (push, handoff, remove, receive) × result (ok, unreachable, rejected).
#[derive(Debug, Default)]
struct ForwardCounters {
    counts: [[AtomicU64; 3]; 4],
}

const RESULTS: [&str; 3] = ["ok", "unreachable", "rejected"];
const KINDS: [ForwardKind; 4] = [
    ForwardKind::Push,
    ForwardKind::Handoff,
    ForwardKind::Remove,
    ForwardKind::Receive,
];

impl ForwardCounters {
    fn count(&self, kind: ForwardKind, result: &Result<(), ForwardError>) {
        let k = match kind {
            ForwardKind::Push => 0,
            ForwardKind::Handoff => 1,
            ForwardKind::Remove => 2,
            ForwardKind::Receive => 3,
        };
        let r = match result {
            Ok(()) => 0,
            Err(ForwardError::Unreachable(_)) => 1,
            Err(ForwardError::Rejected { .. }) => 2,
        };
        if let Some(counter) = self.counts.get(k).and_then(|row| row.get(r)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (kind, row) in KINDS.iter().zip(&self.counts) {
            for (result, counter) in RESULTS.iter().zip(row) {
                out.push((kind.as_str(), *result, counter.load(Ordering::Relaxed)));
            }
        }
        out
    }
}

/// This node's view of the cluster, and the means to forward to it.
#[derive(Debug)]
pub struct Cluster {
    membership: Arc<Mutex<Membership>>,
    gossip: Mutex<Gossip>,
    sealer: Arc<Sealer>,
    gossip_keys: Vec<KeyId>,
    forwards_opened: Mutex<BTreeMap<KeyId, u64>>,
    forwarder: Forwarder,
    forwards: ForwardCounters,
    received: [AtomicU64; RECEIVED.len()],
    started: Instant,
    peer_timeout: Duration,
    join_count: usize,
    settled: AtomicBool,
}

impl Cluster {
    /// Checks the configuration, binds the gossip socket and starts heartbeating. The first of
    /// `shared_keys` seals; every one of them opens (a key rotation lists two).
    pub fn start(
        config: ClusterConfig,
        shared_keys: &[SharedKey],
    ) -> Result<Cluster, ClusterError> {
        if config.name.is_empty() || config.name.len() > MAX_NAME {
            return Err(ClusterError::Config(format!(
                "--name must be 1 to {MAX_NAME} bytes, got {:?}",
                config.name
            )));
        }
        if config.internal_addr.len() > MAX_NAME {
            return Err(ClusterError::Config(format!(
                "the internal address must be at most {MAX_NAME} bytes, got {:?}",
                config.internal_addr
            )));
        }
        if config.gossip_interval.is_zero() {
            return Err(ClusterError::Config(
                "--gossip-interval must be above 0".into(),
            ));
        }
        if config.peer_timeout <= config.gossip_interval {
            return Err(ClusterError::Config(format!(
                "--peer-timeout ({:?}) must be longer than --gossip-interval ({:?}), or members flap",
                config.peer_timeout, config.gossip_interval
            )));
        }
        let gossip_keys =
            Keyring::derive(shared_keys, KeyPurpose::GossipSeal).map_err(ClusterError::Keys)?;
        let sealer = Arc::new(Sealer::new(shared_keys).map_err(ClusterError::Keys)?);
        let gossip_key_ids = gossip_keys.key_ids();
        let mut boot = [0u8; 8];
        SystemRandom::new()
            .fill(&mut boot)
            .map_err(|_| ClusterError::Random)?;
        let mut membership_config = MembershipConfig::new(
            &config.name,
            &config.internal_addr,
            u64::from_be_bytes(boot),
        );
        membership_config.peer_timeout = config.peer_timeout;
        let membership = Arc::new(Mutex::new(Membership::new(membership_config)));
        let gossip = Gossip::start(
            GossipConfig {
                listen: config.listen_cluster,
                join: config.join.clone(),
                interval: config.gossip_interval,
            },
            gossip_keys,
            membership.clone(),
        )
        .map_err(ClusterError::Gossip)?;
        log::info!(
            "cluster: node {} (boot {:016x}) gossiping on udp {} with peers {:?}; sealing with key id {}, opening {}",
            config.name,
            u64::from_be_bytes(boot),
            gossip.local_addr(),
            config.join,
            gossip_key_ids.first().map(KeyId::to_string).unwrap_or_default(),
            key_list(&gossip_key_ids),
        );
        if !config.internal_addr.is_empty() {
            log::info!(
                "cluster: advertising internal address {}",
                config.internal_addr
            );
        }
        Ok(Cluster {
            membership,
            gossip: Mutex::new(gossip),
            forwarder: Forwarder::new(sealer.clone(), config.forward_timeout, config.internal_tls),
            sealer,
            gossip_keys: gossip_key_ids,
            forwards_opened: Mutex::new(BTreeMap::new()),
            forwards: ForwardCounters::default(),
            received: Default::default(),
            started: Instant::now(),
            peer_timeout: config.peer_timeout,
            join_count: config.join.len(),
            settled: AtomicBool::new(false),
        })
    }

    /// This node's name.
    pub fn name(&self) -> String {
        lock(&self.membership).name().to_owned()
    }

    /// The bound UDP address.
    pub fn gossip_addr(&self) -> SocketAddr {
        telemeter_common::sync::lock(&self.gossip).local_addr()
    }

    /// The shared member table (for tests and the debug page; hold the lock briefly).
    pub fn membership(&self) -> &Arc<Mutex<Membership>> {
        &self.membership
    }

    /// Changes the internal address advertised to peers (see [`Membership::set_internal_addr`]).
    pub fn set_internal_addr(&self, addr: &str) -> Result<(), ClusterError> {
        if addr.is_empty() || addr.len() > MAX_NAME {
            return Err(ClusterError::Config(format!(
                "the internal address must be 1 to {MAX_NAME} bytes, got {addr:?}"
            )));
        }
        lock(&self.membership).set_internal_addr(addr);
        log::info!("cluster: advertising internal address {addr}");
        Ok(())
    }

    /// The ring's generation: changes exactly when the set of live members does.
    pub fn generation(&self) -> u64 {
        lock(&self.membership).generation()
    }

    /// The live members, self included, sorted.
    pub fn alive(&self) -> Vec<String> {
        lock(&self.membership).alive()
    }

    /// Whether this node owns `cluster_id` on the ring (suspects included: suspicion is local and
    /// does not move ownership). Federate serves, and handoff keeps, only what this returns true for.
    pub fn owns(&self, cluster_id: &str) -> bool {
        let membership = lock(&self.membership);
        membership.ring().owner(cluster_id) == Some(membership.name())
    }

    /// Whether this node has had time to hear its peers since it started: it has heard as many
    /// as `--join` lists, or a peer timeout has passed. Until then its ring may hold only itself,
    /// and serving every stored cluster would duplicate the owners' series.
    pub fn settled(&self) -> bool {
        if self.settled.load(Ordering::Relaxed) {
            return true;
        }
        let heard = self.alive().len().saturating_sub(1);
        let settled = heard >= self.join_count || self.started.elapsed() >= self.peer_timeout;
        if settled {
            self.settled.store(true, Ordering::Relaxed);
        }
        settled
    }

    /// Whether `/federate` should serve `cluster_id` now: settled, and the owner.
    pub fn serves(&self, cluster_id: &str) -> bool {
        self.settled() && self.owns(cluster_id)
    }

    /// Where to store `cluster_id`'s upload, best first: the ring's preference order, skipping
    /// suspect and dead members. Self is always in the list (it is always alive to itself).
    pub fn owner_preference(&self, cluster_id: &str) -> Vec<Owner> {
        let membership = lock(&self.membership);
        let me = membership.name();
        membership
            .ring()
            .preference(cluster_id)
            .into_iter()
            .filter_map(|name| {
                if name == me {
                    return Some(Owner {
                        name: name.to_owned(),
                        internal_addr: membership.internal_addr().to_owned(),
                        is_self: true,
                    });
                }
                let member = membership.member(name)?;
                (member.state == MemberState::Alive).then(|| Owner {
                    name: name.to_owned(),
                    internal_addr: member.internal_addr.clone(),
                    is_self: false,
                })
            })
            .collect()
    }

    /// The ring owner of `cluster_id` when it is another member that is alive (not suspect):
    /// where a handoff goes. `None` when this node owns it or the owner is suspect.
    pub fn ring_owner(&self, cluster_id: &str) -> Option<Owner> {
        let membership = lock(&self.membership);
        let name = membership.ring().owner(cluster_id)?;
        let member = membership.member(name)?;
        (member.state == MemberState::Alive).then(|| Owner {
            name: name.to_owned(),
            internal_addr: member.internal_addr.clone(),
            is_self: false,
        })
    }

    /// Counts a forward received by the endpoint: `push`, `handoff`, `unauthorized`, `store_error`.
    pub fn count_received_forward(&self, result: &str) {
        if let Some(i) = RECEIVED.iter().position(|r| *r == result) {
            if let Some(counter) = self.received.get(i) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Marks `name` suspect after a failed forward: skipped until it heartbeats again after a
    /// peer timeout.
    pub fn mark_suspect(&self, name: &str) {
        if lock(&self.membership).mark_suspect(name, Instant::now()) {
            log::warn!("cluster: member {name} is suspect (forwarding to it failed)");
        }
    }

    /// Forwards `body` to `owner` (a peer), sealed, and counts the result. Ok only once the owner
    /// stored it durably.
    pub fn forward(
        &self,
        owner: &Owner,
        cluster_id: &str,
        received: SystemTime,
        kind: ForwardKind,
        body: &[u8],
    ) -> Result<(), ForwardError> {
        let result = self.forwarder.forward(
            &owner.name,
            &owner.internal_addr,
            cluster_id,
            received,
            kind,
            body,
        );
        self.forwards.count(kind, &result);
        result
    }

    /// Opens a request to the internal forward endpoint: sealed under one of our keys, fresh, and
    /// addressed to this node. What to store and the families.
    pub fn open_forward(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(Forwarded, Vec<u8>), VerifyError> {
        let name = self.name();
        let opened = self
            .sealer
            .open(&name, method, path, body, SystemTime::now())?;
        *self
            .forwards_opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(opened.0.key_id)
            .or_insert(0) += 1;
        Ok(opened)
    }

    /// Counters for `/metrics`.
    pub fn stats(&self) -> ClusterStats {
        let (sent, send_errors) = {
            let gossip = telemeter_common::sync::lock(&self.gossip);
            let c = gossip.counters();
            (
                c.sent.load(Ordering::Relaxed),
                c.send_errors.load(Ordering::Relaxed),
            )
        };
        let membership = lock(&self.membership);
        let mut stats = ClusterStats {
            members_alive: 1,
            ring_generation: membership.generation(),
            heartbeats_sent: sent,
            heartbeat_send_errors: send_errors,
            heartbeats_accepted: membership.accepted(),
            drops: membership
                .drops()
                .into_iter()
                .map(|(reason, n)| (reason.as_str(), n))
                .collect(),
            forwards: self.forwards.snapshot(),
            received_forwards: RECEIVED
                .iter()
                .zip(&self.received)
                .map(|(result, n)| (*result, n.load(Ordering::Relaxed)))
                .collect(),
            peer_keys: membership
                .members()
                .filter_map(|m| Some((m.name.clone(), m.key_id?.to_string())))
                .collect(),
            forwards_opened: self
                .forwards_opened
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(id, n)| (id.to_string(), *n))
                .collect(),
            ..ClusterStats::default()
        };
        for member in membership.members() {
            match member.state {
                MemberState::Alive => stats.members_alive += 1,
                MemberState::Suspect => stats.members_suspect += 1,
                MemberState::Dead => stats.members_dead += 1,
            }
        }
        stats
    }

    /// The `/debug/cluster` document: self, every member with its state and heartbeat age, the
    /// ring's members, shares and generation, and the drop counters.
    pub fn debug_json(&self) -> Value {
        let now = Instant::now();
        let membership = lock(&self.membership);
        let mut members = vec![json!({
            "name": membership.name(),
            "self": true,
            "state": MemberState::Alive.as_str(),
            "internal_addr": membership.internal_addr(),
            "boot_id": format!("{:016x}", membership.boot_id()),
            "uptime_seconds": now.saturating_duration_since(self.started).as_secs_f64(),
        })];
        for m in membership.members() {
            members.push(json!({
                "name": m.name,
                "self": false,
                "state": m.state.as_str(),
                "internal_addr": m.internal_addr,
                "gossip_addr": m.gossip_addr.to_string(),
                "boot_id": format!("{:016x}", m.boot_id),
                "last_seq": m.last_seq,
                "last_heartbeat_age_seconds":
                    now.saturating_duration_since(m.last_heard).as_secs_f64(),
                "view": m.view,
                "key_id": m.key_id.map(|id| id.to_string()),
            }));
        }
        let shares: BTreeMap<String, f64> = membership.ring().shares().into_iter().collect();
        let drops: BTreeMap<&str, u64> = membership
            .drops()
            .into_iter()
            .map(|(reason, n)| (reason.as_str(), n))
            .collect();
        json!({
            "name": membership.name(),
            "members": members,
            "alive": membership.alive(),
            "converged": membership.converged(),
            "settled": self.settled.load(Ordering::Relaxed),
            "ring": {
                "generation": membership.generation(),
                "members": membership.ring().members(),
                "shares": shares,
            },
            "dropped_packets": drops,
            "keys": {
                "gossip": key_strings(&self.gossip_keys),
                "forward": key_strings(&self.sealer.key_ids()),
                "forwards_opened": self
                    .forwards_opened
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|(id, n)| (id.to_string(), *n))
                    .collect::<BTreeMap<String, u64>>(),
            },
        })
    }

    /// Stops gossiping. Peers see this node dead after their peer timeout.
    pub fn shutdown(&self) {
        telemeter_common::sync::lock(&self.gossip).shutdown();
    }
}

/// Key ids as strings, the sealing key first.
fn key_strings(ids: &[KeyId]) -> Vec<String> {
    ids.iter().map(KeyId::to_string).collect()
}

/// Key ids for a log line: "a1b2c3d4, e5f6a7b8".
fn key_list(ids: &[KeyId]) -> String {
    key_strings(ids).join(", ")
}

impl DropReason {
    /// The drop reasons as metric label values.
    pub fn labels() -> impl Iterator<Item = &'static str> {
        DropReason::ALL.iter().map(|r| r.as_str())
    }
}

/// Helpers for the cluster's unit tests: temporary stores and started clusters.
#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;
