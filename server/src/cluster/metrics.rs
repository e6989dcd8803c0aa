//! The cluster's metrics, registered in the server's registry and refreshed at scrape time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use telemeter_common::instrument::{Counter, CounterVec, GaugeVec, Registry};

use super::ClusterStats;

/// The cluster's metric families.
#[derive(Clone)]
pub struct ClusterMetrics {
    members: GaugeVec,
    ring_generation: GaugeVec,
    heartbeats: CounterVec,
    dropped: CounterVec,
    forwards: CounterVec,
    received: CounterVec,
    peer_key: GaugeVec,
    forwards_opened: CounterVec,
    peer_keys_seen: Arc<Mutex<BTreeMap<String, String>>>,
    // Counters are copied in as deltas; the lock keeps two scrapes from adding one delta twice.
    refresh: Arc<Mutex<()>>,
}

impl ClusterMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &Registry) -> ClusterMetrics {
        ClusterMetrics {
            members: registry.gauge(
                "telemeter_server_cluster_members",
                "Cluster members as this server sees them (itself included), by state.",
                &["state"],
            ),
            ring_generation: registry.gauge(
                "telemeter_server_cluster_ring_generation",
                "How many times the hash ring was rebuilt because the live members changed.",
                &[],
            ),
            heartbeats: registry.counter(
                "telemeter_server_gossip_heartbeats_total",
                "Heartbeats by result: sent, send_error, accepted.",
                &["result"],
            ),
            dropped: registry.counter(
                "telemeter_server_gossip_dropped_packets_total",
                "Gossip datagrams dropped, by reason.",
                &["reason"],
            ),
            forwards: registry.counter(
                "telemeter_server_cluster_forwards_total",
                "Pushes forwarded to other servers, by kind (push, handoff, remove, receive) and result.",
                &["kind", "result"],
            ),
            received: registry.counter(
                "telemeter_server_cluster_forwards_received_total",
                "Forwarded pushes received, by result (push, handoff, unauthorized, store_error, receive).",
                &["result"],
            ),
            peer_key: registry.gauge(
                "telemeter_server_cluster_peer_key_info",
                "1 for the id of the key that opened each peer's last accepted heartbeat (a hash, never the key): shows a key rotation's progress.",
                &["peer", "key_id"],
            ),
            forwards_opened: registry.counter(
                "telemeter_server_cluster_forwards_opened_total",
                "Forwarded pushes accepted (opened, fresh, addressed to this server), by the id of the key that opened them.",
                &["key_id"],
            ),
            peer_keys_seen: Arc::default(),
            refresh: Arc::default(),
        }
    }

    /// Copies `stats` in; call before rendering the registry.
    pub fn refresh(&self, stats: &ClusterStats) {
        let _guard = telemeter_common::sync::lock(&self.refresh);
        for (state, n) in [
            ("alive", stats.members_alive),
            ("suspect", stats.members_suspect),
            ("dead", stats.members_dead),
        ] {
            self.members.with(&[state]).set(n as f64);
        }
        self.ring_generation
            .with(&[])
            .set(stats.ring_generation as f64);
        for (result, n) in [
            ("sent", stats.heartbeats_sent),
            ("send_error", stats.heartbeat_send_errors),
            ("accepted", stats.heartbeats_accepted),
        ] {
            catch_up(&self.heartbeats.with(&[result]), n);
        }
        for (reason, n) in &stats.drops {
            catch_up(&self.dropped.with(&[reason]), *n);
        }
        for (kind, result, n) in &stats.forwards {
            catch_up(&self.forwards.with(&[kind, result]), *n);
        }
        for (result, n) in &stats.received_forwards {
            catch_up(&self.received.with(&[result]), *n);
        }
        // A peer's previous key id goes to 0 when it changes, so one series per peer reads 1.
        for (peer, key_id) in &stats.peer_keys {
            let mut previous = self
                .peer_keys_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(old) = previous.insert(peer.clone(), key_id.clone()) {
                if old != *key_id {
                    self.peer_key.with(&[peer, &old]).set(0.0);
                }
            }
            self.peer_key.with(&[peer, key_id]).set(1.0);
        }
        for (key_id, n) in &stats.forwards_opened {
            catch_up(&self.forwards_opened.with(&[key_id]), *n);
        }
    }
}

/// Raises a counter to a monotonic total kept elsewhere.
fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.add(total - now);
    }
}
