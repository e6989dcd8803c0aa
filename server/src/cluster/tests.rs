//! Unit tests of `cluster`, beside it so the module reads as the module.

use super::*;
use crate::cluster::testing::{key, wait_for};
use std::thread;

fn config(name: &str, join: Vec<String>) -> ClusterConfig {
    let mut config = ClusterConfig::new(
        name,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &format!("{name}.internal:9004"),
    );
    config.join = join;
    config.gossip_interval = Duration::from_millis(50);
    config.peer_timeout = Duration::from_millis(1_000);
    config
}

#[test]
fn bad_configs_are_refused() {
    let mut c = config("", vec![]);
    assert!(matches!(
        Cluster::start(c.clone(), &[key()]),
        Err(ClusterError::Config(_))
    ));
    c.name = "a".into();
    c.peer_timeout = c.gossip_interval;
    assert!(matches!(
        Cluster::start(c, &[key()]),
        Err(ClusterError::Config(_))
    ));
}

#[test]
fn serves_nothing_until_settled() {
    let alone = Cluster::start(config("alone", vec![]), &[key()]).unwrap();
    assert!(alone.settled());
    assert!(alone.serves("c1"));
    alone.shutdown();

    // A peer that never answers: settled after the peer timeout.
    let quiet = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let a = Cluster::start(
        config("a", vec![quiet.local_addr().unwrap().to_string()]),
        &[key()],
    )
    .unwrap();
    assert!(a.owns("c1"));
    assert!(!a.serves("c1"));
    assert!(wait_for(|| a.serves("c1")));
    assert!(a.started.elapsed() >= a.peer_timeout);
    a.shutdown();
}

#[test]
fn no_heartbeat_before_the_internal_address_is_known() {
    let a = Cluster::start(config("a", vec![]), &[key()]).unwrap();
    let mut unknown = config("b", vec![a.gossip_addr().to_string()]);
    unknown.internal_addr = String::new();
    let b = Cluster::start(unknown, &[key()]).unwrap();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(a.alive(), ["a"]);
    assert_eq!(b.stats().heartbeats_sent, 0);
    b.set_internal_addr("127.0.0.1:4444").unwrap();
    assert!(wait_for(|| a.alive() == ["a", "b"]));
    let addr = lock(&a.membership)
        .member("b")
        .map(|m| m.internal_addr.clone());
    assert_eq!(addr.as_deref(), Some("127.0.0.1:4444"));
    a.shutdown();
    b.shutdown();
}

#[test]
fn two_nodes_agree_on_owners_and_skip_suspects() {
    let a = Cluster::start(config("a", vec![]), &[key()]).unwrap();
    let b = Cluster::start(config("b", vec![a.gossip_addr().to_string()]), &[key()]).unwrap();
    assert!(wait_for(
        || a.alive() == ["a", "b"] && b.alive() == ["a", "b"]
    ));

    let ids: Vec<String> = (0..100).map(|i| format!("cluster-{i}")).collect();
    let mut owned_by_a = 0;
    for id in &ids {
        let pa = a.owner_preference(id);
        let pb = b.owner_preference(id);
        let names = |p: &[Owner]| p.iter().map(|o| o.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&pa), names(&pb), "{id}");
        assert_eq!(pa.len(), 2);
        assert_eq!(a.owns(id), pa[0].name == "a");
        assert_ne!(a.owns(id), b.owns(id), "{id} must have exactly one owner");
        let peer = pa.iter().find(|o| !o.is_self).unwrap();
        assert_eq!(peer.internal_addr, "b.internal:9004");
        owned_by_a += usize::from(a.owns(id));
    }
    assert!(owned_by_a > 0 && owned_by_a < ids.len());

    // A suspect peer is skipped by a, but ownership does not move.
    let generation = a.generation();
    a.mark_suspect("b");
    for id in &ids {
        let pa = a.owner_preference(id);
        assert_eq!(pa.len(), 1);
        assert!(pa[0].is_self);
    }
    assert_eq!(a.generation(), generation);
    assert_eq!(a.stats().members_suspect, 1);

    let debug = a.debug_json();
    assert_eq!(debug["name"], "a");
    assert_eq!(debug["ring"]["members"], json!(["a", "b"]));
    assert_eq!(debug["members"][1]["state"], "suspect");
    assert!(
        debug["members"][1]["last_heartbeat_age_seconds"]
            .as_f64()
            .unwrap()
            < 10.0
    );

    // b stops: a sees it dead and owns everything.
    b.shutdown();
    assert!(wait_for(|| a.alive() == ["a"]));
    assert!(ids.iter().all(|id| a.owns(id)));
    assert_eq!(a.stats().members_dead, 1);
    a.shutdown();
}
