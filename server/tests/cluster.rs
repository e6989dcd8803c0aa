//! End-to-end tests of clustering with real `telemeter-server` processes on 127.0.0.1: ownership
//! on the ring, failover when a node is killed, ownership moving back when it returns, forged and
//! replayed gossip, and unsigned forwards.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{
    debug_cluster, families, free_udp_port, get, now_ms, post, series_lines, wait_converged,
    ServerProcess, Signal, TempDir,
};
use telemeter_common::keys::{KeyPurpose, SharedKey};
use telemeter_server::cluster::packet::{Heartbeat, Keyring};
use telemeter_server::cluster::ring::{HashRing, DEFAULT_VNODES};

const INTERVAL: &str = "200ms";
const PEER_TIMEOUT: &str = "1s";
const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "0123456789abcdef0123456789abcdef-test-shared-key";

struct Node {
    name: String,
    cluster_addr: String,
    storage: TempDir,
    process: Option<ServerProcess>,
}

struct Cluster {
    nodes: Vec<Node>,
    key: PathBuf,
    _dir: TempDir,
}

impl Cluster {
    fn start(names: &[&str]) -> Cluster {
        let dir = TempDir::new("cluster-key");
        let key = dir.file("shared.key", KEY);
        let nodes = names
            .iter()
            .map(|name| Node {
                name: name.to_string(),
                cluster_addr: format!("127.0.0.1:{}", free_udp_port()),
                storage: TempDir::new(&format!("cluster-{name}")),
                process: None,
            })
            .collect();
        let mut cluster = Cluster {
            nodes,
            key,
            _dir: dir,
        };
        for i in 0..cluster.nodes.len() {
            cluster.start_node(i);
        }
        cluster
    }

    fn start_node(&mut self, i: usize) {
        let joins: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| n.cluster_addr.clone())
            .collect();
        let node = &self.nodes[i];
        let mut args: Vec<String> = vec![
            "--insecure-accept-any-token".into(),
            "--ratelimit".into(),
            "0s".into(),
            "--shared-key".into(),
            self.key.display().to_string(),
            "--name".into(),
            node.name.clone(),
            "--listen-cluster".into(),
            node.cluster_addr.clone(),
            "--gossip-interval".into(),
            INTERVAL.into(),
            "--peer-timeout".into(),
            PEER_TIMEOUT.into(),
        ];
        for join in joins {
            args.push("--join".into());
            args.push(join);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = ServerProcess::start(node.storage.path(), &refs);
        self.nodes[i].process = Some(process);
    }

    fn running(&self) -> impl Iterator<Item = (&Node, &ServerProcess)> {
        self.nodes
            .iter()
            .filter_map(|n| n.process.as_ref().map(|p| (n, p)))
    }

    /// Waits until every running node sees exactly the running nodes alive and views agree.
    /// Returns how long it took.
    fn wait_converged(&self) -> Duration {
        let (names, urls) = self.convergence_probe();
        wait_converged(&urls, &names, WAIT)
    }

    /// What [`wait_converged`] needs, to run it on another thread.
    fn convergence_probe(&self) -> (Vec<String>, Vec<String>) {
        (
            self.running().map(|(n, _)| n.name.clone()).collect(),
            self.running()
                .map(|(_, p)| p.url_internal("/debug/cluster"))
                .collect(),
        )
    }

    fn ring(&self) -> HashRing {
        let names: Vec<&str> = self.running().map(|(n, _)| n.name.as_str()).collect();
        HashRing::new(&names, DEFAULT_VNODES)
    }

    /// Which nodes serve which cluster ids on /federate, with the value of `test_metric{i="1"}`.
    fn federated(&self) -> BTreeMap<String, Vec<(String, String)>> {
        let mut seen: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for (node, process) in self.running() {
            let body = process.federate();
            for line in series_lines(&body) {
                if !line.starts_with("test_metric{") || !line.contains("i=\"1\"") {
                    continue;
                }
                let id = line
                    .split("_id=\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .unwrap_or("")
                    .to_string();
                let value = line.rsplit(' ').next().unwrap_or("").to_string();
                seen.entry(id).or_default().push((node.name.clone(), value));
            }
        }
        seen
    }

    /// Waits until every id is served exactly once, by its ring owner, with `value`.
    fn wait_owned(&self, ids: &[String], value: &str) -> Duration {
        let started = Instant::now();
        let ring = self.ring();
        loop {
            let seen = self.federated();
            let wrong: Vec<String> = ids
                .iter()
                .filter(|id| {
                    let owner = ring.owner(id).unwrap_or("").to_string();
                    seen.get(*id) != Some(&vec![(owner, value.to_string())])
                })
                .map(|id| format!("{id}: {:?}", seen.get(id)))
                .collect();
            if wrong.is_empty() && seen.len() == ids.len() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < WAIT,
                "{} of {} clusters not served exactly once by their owner, e.g. {:?}",
                wrong.len(),
                ids.len(),
                wrong.iter().take(5).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pushes every id (value `value` on `test_metric{i="1"}`) to pseudo-random running nodes.
    fn push_all(&self, ids: &[String], value: f64, seed: &mut u64) {
        let running: Vec<&ServerProcess> = self.running().map(|(_, p)| p).collect();
        for id in ids {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            let auth = running[(*seed % running.len() as u64) as usize];
            let upload = running[((*seed >> 8) % running.len() as u64) as usize];
            let token = auth.upload_token("any", id);
            let mut fams = families(Some(id), 2, now_ms());
            if let Some(metric) = fams[1].metric.get_mut(1) {
                metric.gauge = Some(telemeter_common::model::Gauge { value: Some(value) });
            }
            let reply = upload.upload(&token, &fams);
            assert_eq!(reply.status, 200, "upload of {id}: {}", reply.body);
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut process) = self.nodes[i].process.take() {
            process.signal_and_wait(Signal::Kill);
        }
    }
}

fn metric(p: &ServerProcess, series: &str) -> f64 {
    let body = get(&p.url_internal("/metrics"), &[]).body;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn three_nodes_own_fail_over_and_take_back() {
    let mut cluster = Cluster::start(&["node-a", "node-b", "node-c"]);
    let took = cluster.wait_converged();
    eprintln!("3 nodes converged in {took:?}");

    let ids: Vec<String> = (0..200).map(|i| format!("cluster-{i:03}")).collect();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    cluster.push_all(&ids, 1.0, &mut seed);
    cluster.wait_owned(&ids, "1");
    let ring = cluster.ring();
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &ids {
        *load.entry(ring.owner(id).unwrap()).or_default() += 1;
    }
    let max = *load.values().max().unwrap() as f64;
    let mean = ids.len() as f64 / load.len() as f64;
    eprintln!(
        "ownership of 200 clusters: {load:?}, max/mean {:.2}",
        max / mean
    );
    assert_eq!(load.len(), 3, "every node owns some clusters");

    // Kill node-c without warning: the others agree on [a, b] and take its clusters.
    let owned_by_c: BTreeSet<&String> = ids
        .iter()
        .filter(|id| ring.owner(id) == Some("node-c"))
        .collect();
    cluster.kill(2);
    let probe = std::thread::spawn({
        let probe = cluster.convergence_probe();
        move || wait_converged(&probe.1, &probe.0, WAIT)
    });
    // Pushed at once, before the survivors notice: pushes owned by node-c fail over to the next
    // node on the ring (which is also its owner once node-c is gone); every one gets 200.
    cluster.push_all(&ids, 2.0, &mut seed);
    let took = probe.join().unwrap();
    eprintln!(
        "after SIGKILL of node-c, survivors agreed in {took:?} (peer timeout {PEER_TIMEOUT}, interval {INTERVAL})"
    );
    cluster.wait_owned(&ids, "2");
    let unreachable: f64 = cluster
        .running()
        .map(|(_, p)| {
            metric(
                p,
                "telemeter_server_cluster_forwards_total{kind=\"push\",result=\"unreachable\"}",
            )
        })
        .sum();
    eprintln!("forwards to the dead node before it was noticed: {unreachable}");
    let forwarded: f64 = cluster
        .running()
        .map(|(_, p)| {
            metric(
                p,
                "telemeter_server_cluster_forwards_total{kind=\"push\",result=\"ok\"}",
            )
        })
        .sum();
    eprintln!(
        "{} clusters of node-c moved; forwarded pushes so far: {forwarded}",
        owned_by_c.len()
    );
    assert!(forwarded > 0.0);

    // node-c comes back with its old files: ownership moves back, newest upload wins.
    cluster.start_node(2);
    let back = Instant::now();
    cluster.wait_converged();
    let took = cluster.wait_owned(&ids, "2");
    eprintln!(
        "node-c back: ownership settled {:?} after restart ({took:?} after convergence)",
        back.elapsed()
    );
    let handoffs: f64 = cluster
        .running()
        .map(|(_, p)| {
            metric(
                p,
                "telemeter_server_cluster_forwards_total{kind=\"handoff\",result=\"ok\"}",
            )
        })
        .sum();
    assert!(
        handoffs >= owned_by_c.len() as f64,
        "{handoffs} handoffs for {} clusters",
        owned_by_c.len()
    );
}

#[test]
fn forged_and_replayed_gossip_is_dropped_and_unsigned_forwards_refused() {
    let cluster = Cluster::start(&["solo"]);
    let (node, process) = cluster.running().next().unwrap();
    let target = node.cluster_addr.clone();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();

    let key = SharedKey::from_bytes(KEY.as_bytes()).unwrap();
    let gossip_key = Keyring::derive(std::slice::from_ref(&key), KeyPurpose::GossipSeal).unwrap();
    let heartbeat = |seq: u64, sent_ms: u64| Heartbeat {
        name: "mallory".into(),
        boot_id: 42,
        seq,
        sent_ms,
        internal_addr: "127.0.0.1:1".into(),
        members: vec!["mallory".into()],
    };
    let now = now_ms() as u64;
    let genuine = heartbeat(1, now).encode(&gossip_key).unwrap();
    let forged = heartbeat(2, now)
        .encode(
            &Keyring::derive(
                &[SharedKey::from_bytes(&[9; 32]).unwrap()],
                KeyPurpose::GossipSeal,
            )
            .unwrap(),
        )
        .unwrap();
    let skewed = heartbeat(3, now - 120_000).encode(&gossip_key).unwrap();
    udp.send_to(&genuine, &target).unwrap();
    udp.send_to(&genuine, &target).unwrap();
    udp.send_to(&forged, &target).unwrap();
    udp.send_to(&skewed, &target).unwrap();
    udp.send_to(b"\x01garbage", &target).unwrap();
    udp.send_to(&vec![1u8; 9000], &target).unwrap();

    let dropped = |reason: &str| {
        metric(
            process,
            &format!("telemeter_server_gossip_dropped_packets_total{{reason=\"{reason}\"}}"),
        )
    };
    let started = Instant::now();
    while !(dropped("replay") == 1.0
        && dropped("unknown_key") == 1.0
        && dropped("clock_skew") == 1.0
        && dropped("garbage") == 1.0
        && dropped("oversized") == 1.0)
    {
        assert!(
            started.elapsed() < WAIT,
            "drops not counted: {}",
            get(&process.url_internal("/debug/cluster"), &[]).body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let debug = debug_cluster(process);
    assert_eq!(debug["dropped_packets"]["replay"], 1);

    // Forwards not sealed, or sealed with another key, are refused.
    let url = process.url_internal("/internal/forward");
    let r = post(&url, &[], b"payload");
    assert_eq!(r.status, 401, "{}", r.body);
    let other =
        telemeter_server::cluster::forward::Sealer::new(
            &[SharedKey::from_bytes(&[9; 32]).unwrap()],
        )
        .unwrap();
    let body = other
        .seal(
            "solo",
            "c1",
            std::time::SystemTime::now(),
            telemeter_server::cluster::forward::ForwardKind::Push,
            b"payload",
            std::time::SystemTime::now(),
        )
        .unwrap();
    let r = post(&url, &[], &body);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(
        metric(
            process,
            "telemeter_server_cluster_forwards_received_total{result=\"unauthorized\"}"
        ),
        2.0
    );
    // Nothing was stored.
    assert!(series_lines(&process.federate()).is_empty());

    // A clustered server still stops cleanly on SIGTERM.
    let mut cluster = cluster;
    let mut process = cluster.nodes[0].process.take().unwrap();
    assert!(process.signal_and_wait(Signal::Term).success());
}

/// `DELETE /api/v1/clusters/<id>` on a server that does not own the cluster is forwarded (sealed)
/// to its owner, which removes it; the status API of each node names the members.
#[test]
fn delete_on_a_non_owner_removes_the_cluster_at_its_owner() {
    let cluster = Cluster::start(&["node-a", "node-b"]);
    cluster.wait_converged();
    let ids: Vec<String> = (0..20).map(|i| format!("cluster-{i:03}")).collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    cluster.push_all(&ids, 1.0, &mut seed);
    cluster.wait_owned(&ids, "1");
    let ring = cluster.ring();
    let id = ids
        .iter()
        .find(|id| ring.owner(id) == Some("node-b"))
        .expect("node-b owns one of 20");
    let (_, a) = cluster.running().find(|(n, _)| n.name == "node-a").unwrap();
    let (_, b) = cluster.running().find(|(n, _)| n.name == "node-b").unwrap();

    let api: serde_json::Value =
        serde_json::from_str(&get(&b.url_internal("/api/v1/clusters"), &[]).body).unwrap();
    assert!(api["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["id"] == id.as_str() && c["owner"] == "node-b"));
    let members: Vec<&str> = api["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["node-b", "node-a"]);

    let r = common::raw_request(
        a.internal,
        format!("DELETE /api/v1/clusters/{id} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("at its owner node-b"), "{}", r.body);
    let needle = format!("_id=\"{id}\"");
    assert!(!b.federate().contains(&needle));
    assert!(!a.federate().contains(&needle));
    // The others stay.
    let other = ids.iter().find(|other| *other != id).unwrap();
    let owner = if ring.owner(other) == Some("node-b") {
        b
    } else {
        a
    };
    assert!(owner.federate().contains(&format!("_id=\"{other}\"")));
    assert_eq!(
        metric(
            a,
            "telemeter_server_cluster_forwards_total{kind=\"remove\",result=\"ok\"}"
        ),
        1.0
    );
}
