//! End-to-end tests of the sealed cluster transport with real `telemeter-server` processes:
//!
//! - every byte between servers (UDP gossip and TCP forwards) goes through a recording relay on
//!   127.0.0.7, and none of the recorded bytes names a node, an address, a cluster id, a metric
//!   name or a label value, while the cluster converges and forwarded pushes land;
//! - a shared key rolls through a 3-node cluster (add the new key second, make it first, remove
//!   the old), one node restarted at a time, while a pusher pushes steadily: no push is refused
//!   and every cluster ends on exactly one node.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{
    debug_cluster, free_udp_port, get, metric_value, now_ms, post, series_lines, wait_converged,
    ServerProcess, Signal, TempDir,
};
use telemeter_common::delimited;
use telemeter_common::keys::{KeyPurpose, SharedKey};
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::model::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
use telemeter_common::snappy;
use telemeter_server::cluster::packet::Keyring;

const INTERVAL: &str = "200ms";
const PEER_TIMEOUT: &str = "1s";
const WAIT: Duration = Duration::from_secs(30);
const KEY1: &str = "first-shared-key-of-the-secure-transport-test-0123456789";
const KEY2: &str = "second-shared-key-of-the-secure-transport-test-9876543210";
/// Where the relays listen: a loopback address no node uses.
const RELAY_IP: [u8; 4] = [127, 0, 0, 7];
const POLL: Duration = Duration::from_millis(50);

/// One family whose metric name and label value are distinctive enough to search for.
fn secret_families(ts: i64) -> Vec<MetricFamily> {
    vec![MetricFamily {
        name: Some("reactor_core_temperature_celsius".into()),
        help: Some("How hot the core is.".into()),
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            label: vec![LabelPair::new("vessel", "submarine-nautilus-7")],
            gauge: Some(Gauge { value: Some(451.0) }),
            timestamp_ms: Some(ts),
            ..Default::default()
        }],
    }]
}

fn authorize(external: SocketAddr, id: &str) -> Result<String, String> {
    let r = post(
        &format!("http://{external}/authorize?id={id}"),
        &[("Authorization", "Bearer any-client-token")],
        b"",
    );
    if r.status != 200 {
        return Err(format!("authorize at {external}: {} {}", r.status, r.body));
    }
    let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|e| e.to_string())?;
    v["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no token in {}", r.body))
}

fn push(external: SocketAddr, token: &str, families: &[MetricFamily]) -> (u16, String) {
    let r = post(
        &format!("http://{external}/upload"),
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", PROTO_DELIMITED),
            ("Content-Encoding", "snappy"),
        ],
        &snappy::encode_framed(&delimited::encode(families)),
    );
    (r.status, r.body)
}

/// Waits (bounded) until each of `processes` sees exactly `names` alive, with agreeing views.
fn wait_converged_on(processes: &[&ServerProcess], names: &[&str]) {
    let urls: Vec<String> = processes
        .iter()
        .map(|p| p.url_internal("/debug/cluster"))
        .collect();
    wait_converged(&urls, names, WAIT);
}

/// Which nodes serve each cluster id (by the `_id` label of any series) on /federate.
fn served_by(nodes: &[(&str, &ServerProcess)]) -> BTreeMap<String, Vec<String>> {
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, process) in nodes {
        for line in series_lines(&process.federate()) {
            if let Some(id) = line
                .split("_id=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            {
                seen.entry(id.to_owned())
                    .or_default()
                    .insert(name.to_string());
            }
        }
    }
    seen.into_iter()
        .map(|(id, nodes)| (id, nodes.into_iter().collect()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The recording relay

/// Everything the relays carried: one buffer per datagram and per TCP direction of a connection.
#[derive(Default)]
struct Recording {
    datagrams: Mutex<Vec<Vec<u8>>>,
    streams: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
}

/// Relays for one node: a UDP socket and a TCP listener on [`RELAY_IP`] that pass everything on
/// to the node's gossip and internal ports, recording it.
struct Relay {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    tcp_target: Arc<Mutex<Option<SocketAddr>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    fn start(gossip_target: SocketAddr, recording: Arc<Recording>, stop: Arc<AtomicBool>) -> Relay {
        let udp = UdpSocket::bind(SocketAddr::from((RELAY_IP, 0))).unwrap();
        udp.set_read_timeout(Some(POLL)).unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let listener = TcpListener::bind(SocketAddr::from((RELAY_IP, 0))).unwrap();
        listener.set_nonblocking(true).unwrap();
        let tcp_addr = listener.local_addr().unwrap();
        let tcp_target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let mut threads = Vec::new();
        {
            let recording = recording.clone();
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::SeqCst) {
                    match udp.recv_from(&mut buf) {
                        Ok((n, _)) => {
                            recording.datagrams.lock().unwrap().push(buf[..n].to_vec());
                            // The node sees the relay as the sender, and its replies to that
                            // address come back to itself (ignored as its own heartbeats): every
                            // datagram between nodes crosses a relay.
                            let _ = udp.send_to(&buf[..n], gossip_target);
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => thread::sleep(POLL),
                    }
                }
            }));
        }
        {
            let target = tcp_target.clone();
            threads.push(thread::spawn(move || {
                let mut pumps = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let Some(to) = *target.lock().unwrap() else {
                                continue;
                            };
                            let Ok(server) = TcpStream::connect_timeout(&to, WAIT) else {
                                continue;
                            };
                            client.set_nonblocking(false).unwrap();
                            for (from, into) in [
                                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                                (server, client),
                            ] {
                                let buffer: Arc<Mutex<Vec<u8>>> = Arc::default();
                                recording.streams.lock().unwrap().push(buffer.clone());
                                let stop = stop.clone();
                                pumps.push(thread::spawn(move || pump(from, into, buffer, stop)));
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => thread::sleep(POLL),
                    }
                }
                for p in pumps {
                    let _ = p.join();
                }
            }));
        }
        Relay {
            udp_addr,
            tcp_addr,
            tcp_target,
            threads,
        }
    }
}

/// Copies `from` into `into`, recording, until either side closes or the test stops.
fn pump(
    mut from: TcpStream,
    mut into: TcpStream,
    buffer: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
) {
    from.set_read_timeout(Some(POLL)).unwrap();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                buffer.lock().unwrap().extend_from_slice(&buf[..n]);
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = into.shutdown(Shutdown::Write);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn recorded_cluster_traffic_reveals_no_name_address_id_or_metric() {
    let dir = TempDir::new("secure-relay");
    let key = dir.file("shared.key", KEY1);
    let names = ["node-amethyst", "node-beryl", "node-citrine"];
    let gossip: Vec<SocketAddr> = names
        .iter()
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_udp_port())))
        .collect();
    let recording = Arc::new(Recording::default());
    let stop = Arc::new(AtomicBool::new(false));
    let relays: Vec<Relay> = gossip
        .iter()
        .map(|g| Relay::start(*g, recording.clone(), stop.clone()))
        .collect();
    let storages: Vec<TempDir> = names
        .iter()
        .map(|n| TempDir::new(&format!("secure-relay-{n}")))
        .collect();
    let mut processes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut args: Vec<String> = vec![
            "--insecure-accept-any-token".into(),
            "--ratelimit=0s".into(),
            format!("--shared-key={}", key.display()),
            format!("--name={name}"),
            format!("--listen-cluster={}", gossip[i]),
            format!("--advertise-internal={}", relays[i].tcp_addr),
            format!("--gossip-interval={INTERVAL}"),
            format!("--peer-timeout={PEER_TIMEOUT}"),
        ];
        for (j, relay) in relays.iter().enumerate() {
            if j != i {
                args.push(format!("--join={}", relay.udp_addr));
            }
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = ServerProcess::start(storages[i].path(), &refs);
        *relays[i].tcp_target.lock().unwrap() = Some(process.internal);
        processes.push(process);
    }
    let refs: Vec<&ServerProcess> = processes.iter().collect();
    wait_converged_on(&refs, &names);

    // Every cluster id pushed to every node: two of three pushes of each are forwarded.
    let ids: Vec<String> = (0..6).map(|i| format!("tenant-confidential-{i}")).collect();
    for id in &ids {
        for p in &processes {
            let token = authorize(p.external, id).unwrap();
            let (status, body) = push(p.external, &token, &secret_families(now_ms()));
            assert_eq!(status, 200, "push of {id}: {body}");
        }
    }
    let nodes: Vec<(&str, &ServerProcess)> = names.iter().copied().zip(processes.iter()).collect();
    let served = served_by(&nodes);
    for id in &ids {
        assert_eq!(served.get(id).map(Vec::len), Some(1), "{id}: {served:?}");
    }
    let forwarded: f64 = processes
        .iter()
        .map(|p| {
            metric_value(
                &get(&p.url_internal("/metrics"), &[]).body,
                "telemeter_server_cluster_forwards_total",
                &["kind=\"push\"", "result=\"ok\""],
            )
        })
        .sum();
    assert_eq!(forwarded, 12.0, "two of every three pushes are forwarded");
    // The key that opened each peer's heartbeats is named, by id.
    let gossip_id = Keyring::derive(
        &[SharedKey::from_bytes(KEY1.as_bytes()).unwrap()],
        KeyPurpose::GossipSeal,
    )
    .unwrap()
    .key_ids()[0]
        .to_string();
    let debug = debug_cluster(&processes[0]);
    for member in debug["members"].as_array().unwrap().iter().skip(1) {
        assert_eq!(member["key_id"], gossip_id.as_str(), "{debug}");
    }

    stop.store(true, Ordering::SeqCst);
    for relay in relays.iter() {
        let _ = relay.tcp_target.lock().unwrap().take();
    }
    let mut needles: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    needles.extend(ids.iter().cloned());
    needles.extend(gossip.iter().map(|a| a.to_string()));
    needles.extend(processes.iter().map(|p| p.internal.to_string()));
    needles.extend(relays.iter().map(|r| r.tcp_addr.to_string()));
    needles.extend(relays.iter().map(|r| r.udp_addr.to_string()));
    needles.extend(
        [
            "amethyst",
            "tenant-confidential",
            "reactor_core_temperature_celsius",
            "vessel",
            "submarine-nautilus-7",
            "How hot the core is",
            "_id",
        ]
        .map(String::from),
    );
    let datagrams = recording.datagrams.lock().unwrap().clone();
    let streams: Vec<Vec<u8>> = recording
        .streams
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.lock().unwrap().clone())
        .collect();
    let stream_bytes: usize = streams.iter().map(Vec::len).sum();
    println!(
        "recorded {} datagrams and {} TCP streams ({stream_bytes} bytes)",
        datagrams.len(),
        streams.len()
    );
    assert!(datagrams.len() >= 6, "the relay carried the gossip");
    assert!(stream_bytes > 12 * 100, "the relay carried the forwards");
    for needle in &needles {
        for (i, d) in datagrams.iter().enumerate() {
            assert!(
                !contains(d, needle.as_bytes()),
                "datagram {i} shows {needle:?}"
            );
        }
        for (i, s) in streams.iter().enumerate() {
            assert!(
                !contains(s, needle.as_bytes()),
                "TCP stream {i} shows {needle:?}: {}",
                String::from_utf8_lossy(s)
            );
        }
    }
    drop(processes);
    for relay in relays {
        for t in relay.threads {
            t.join().unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rolling a new key through a live cluster

/// The external address of each node while it is up; `None` while it restarts. The pusher holds
/// the lock for a whole push, so a node is never stopped under a push the test sent it.
type UpNodes = Arc<Mutex<Vec<Option<SocketAddr>>>>;

struct Pusher {
    stop: Arc<AtomicBool>,
    pushed: Arc<AtomicU64>,
    refused: Arc<Mutex<Vec<String>>>,
    thread: JoinHandle<()>,
}

impl Pusher {
    /// Pushes one of `ids` every 50 ms: authorized at one up node, uploaded to the next.
    fn start(up: UpNodes, ids: Vec<String>) -> Pusher {
        let stop = Arc::new(AtomicBool::new(false));
        let pushed = Arc::new(AtomicU64::new(0));
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();
        let thread = {
            let (stop, pushed, refused) = (stop.clone(), pushed.clone(), refused.clone());
            thread::spawn(move || {
                let mut round = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    round += 1;
                    let id = &ids[round % ids.len()];
                    {
                        let up = up.lock().unwrap();
                        let live: Vec<SocketAddr> = up.iter().flatten().copied().collect();
                        if live.len() >= 2 {
                            let issuer = live[round % live.len()];
                            let target = live[(round + 1) % live.len()];
                            let outcome = authorize(issuer, id).and_then(|token| {
                                match push(target, &token, &secret_families(now_ms())) {
                                    (200, _) => Ok(()),
                                    (status, body) => {
                                        Err(format!("push of {id} to {target}: {status} {body}"))
                                    }
                                }
                            });
                            pushed.fetch_add(1, Ordering::SeqCst);
                            if let Err(e) = outcome {
                                refused.lock().unwrap().push(e);
                            }
                        }
                    }
                    thread::sleep(POLL);
                }
            })
        };
        Pusher {
            stop,
            pushed,
            refused,
            thread,
        }
    }
}

struct RollingNode {
    name: &'static str,
    gossip: SocketAddr,
    storage: TempDir,
    process: Option<ServerProcess>,
}

fn start_rolling(
    node: &RollingNode,
    all: &[SocketAddr],
    keys: &[&std::path::Path],
) -> ServerProcess {
    let mut args: Vec<String> = vec![
        "--insecure-accept-any-token".into(),
        "--ratelimit=0s".into(),
        format!("--name={}", node.name),
        format!("--listen-cluster={}", node.gossip),
        format!("--gossip-interval={INTERVAL}"),
        format!("--peer-timeout={PEER_TIMEOUT}"),
    ];
    for key in keys {
        args.push(format!("--shared-key={}", key.display()));
    }
    for peer in all {
        if *peer != node.gossip {
            args.push(format!("--join={peer}"));
        }
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ServerProcess::start(node.storage.path(), &refs)
}

#[test]
fn a_key_rolls_through_a_live_cluster_without_refusing_a_push() {
    let dir = TempDir::new("secure-roll");
    let key1 = dir.file("key1", KEY1);
    let key2 = dir.file("key2", KEY2);
    let gossip_id = |key: &str| {
        Keyring::derive(
            &[SharedKey::from_bytes(key.as_bytes()).unwrap()],
            KeyPurpose::GossipSeal,
        )
        .unwrap()
        .key_ids()[0]
            .to_string()
    };
    let (id1, id2) = (gossip_id(KEY1), gossip_id(KEY2));
    let names = ["roll-a", "roll-b", "roll-c"];
    let mut nodes: Vec<RollingNode> = names
        .iter()
        .map(|name| RollingNode {
            name,
            gossip: SocketAddr::from(([127, 0, 0, 1], free_udp_port())),
            storage: TempDir::new(&format!("secure-{name}")),
            process: None,
        })
        .collect();
    let all: Vec<SocketAddr> = nodes.iter().map(|n| n.gossip).collect();
    for node in nodes.iter_mut() {
        node.process = Some(start_rolling(node, &all, &[&key1]));
    }
    let converge = |nodes: &[RollingNode]| {
        let processes: Vec<&ServerProcess> =
            nodes.iter().filter_map(|n| n.process.as_ref()).collect();
        wait_converged_on(&processes, &names);
    };
    converge(&nodes);
    let up: UpNodes = Arc::new(Mutex::new(
        nodes
            .iter()
            .map(|n| n.process.as_ref().map(|p| p.external))
            .collect(),
    ));
    let ids: Vec<String> = (0..9).map(|i| format!("rolling-{i}")).collect();
    let pusher = Pusher::start(up.clone(), ids.clone());

    // (phase, the keys every node restarts with, the key id each peer's heartbeats open with
    // once the phase is done everywhere)
    let phases: [(&str, Vec<&std::path::Path>, &str); 3] = [
        ("add key2 second", vec![&key1, &key2], &id1),
        ("make key2 first", vec![&key2, &key1], &id2),
        ("remove key1", vec![&key2], &id2),
    ];
    for (phase, keys, opened_with) in &phases {
        for i in 0..nodes.len() {
            up.lock().unwrap()[i] = None;
            let mut old = nodes[i].process.take().unwrap();
            assert!(
                old.signal_and_wait(Signal::Term).success(),
                "{phase}: stop {}",
                names[i]
            );
            let process = start_rolling(&nodes[i], &all, keys);
            nodes[i].process = Some(process);
            converge(&nodes);
            up.lock().unwrap()[i] = nodes[i].process.as_ref().map(|p| p.external);
            let before = pusher.pushed.load(Ordering::SeqCst);
            // Let the pusher cross the new mix of keys before the next restart.
            assert!(common::wait_until(WAIT, || pusher
                .pushed
                .load(Ordering::SeqCst)
                >= before + 5));
            println!("{phase}: {} restarted", names[i]);
        }
        for node in &nodes {
            let debug = debug_cluster(node.process.as_ref().unwrap());
            for member in debug["members"].as_array().unwrap().iter().skip(1) {
                assert_eq!(member["key_id"], *opened_with, "{phase}: {debug}");
            }
        }
    }
    pusher.stop.store(true, Ordering::SeqCst);
    pusher.thread.join().unwrap();
    let pushed = pusher.pushed.load(Ordering::SeqCst);
    let refused = pusher.refused.lock().unwrap().clone();
    println!("{pushed} pushes during the roll, {} refused", refused.len());
    assert!(refused.is_empty(), "refused: {refused:#?}");
    assert!(pushed >= 50, "only {pushed} pushes");

    // Every cluster ends on exactly one node (handoff moves what failed over while owners
    // restarted).
    let mut last = BTreeMap::new();
    let settled = common::wait_until(WAIT, || {
        let with_names: Vec<(&str, &ServerProcess)> = nodes
            .iter()
            .map(|n| (n.name, n.process.as_ref().unwrap()))
            .collect();
        last = served_by(&with_names);
        ids.iter().all(|id| last.get(id).map(Vec::len) == Some(1))
    });
    assert!(settled, "{last:?}");
    // Tokens signed under key1 alone are no longer accepted anywhere.
    let old_token =
        telemeter_common::token::TokenSigner::new(&SharedKey::from_bytes(KEY1.as_bytes()).unwrap())
            .issue(
                "rolling-0",
                "test",
                &[("_id".to_string(), "rolling-0".to_string())]
                    .into_iter()
                    .collect(),
                Duration::from_secs(600),
                std::time::SystemTime::now(),
            );
    let external = nodes[0].process.as_ref().unwrap().external;
    assert_eq!(
        push(external, &old_token, &secret_families(now_ms())).0,
        401
    );
}
