//! Unit tests of `gossip`, beside it so the module reads as the module.

use super::super::membership::MembershipConfig;
use super::*;
use crate::cluster::testing::wait_for;
use telemeter_common::keys::DerivedKey;

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
