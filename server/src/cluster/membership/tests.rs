//! Unit tests of `membership`, beside it so the module reads as the module.

use super::*;

const T0_MS: u64 = 1_800_000_000_000;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn membership() -> Membership {
    let mut config = MembershipConfig::new("self", "127.0.0.1:9004", 7);
    config.vnodes = 16;
    Membership::new(config)
}

fn hb(name: &str, boot_id: u64, seq: u64, sent_ms: u64) -> Heartbeat {
    Heartbeat {
        name: name.into(),
        boot_id,
        seq,
        sent_ms,
        internal_addr: format!("{name}.internal:9004"),
        members: vec![name.into(), "self".into()],
    }
}

#[test]
fn join_makes_member_alive_and_rebuilds_ring() {
    let mut m = membership();
    let t0 = Instant::now();
    assert_eq!(m.alive(), vec!["self"]);
    assert_eq!(m.generation(), 1);
    assert_eq!(
        m.on_heartbeat(&hb("b", 1, 1, T0_MS), addr(1), t0, T0_MS),
        Ok(Change::Joined)
    );
    assert_eq!(m.alive(), vec!["b", "self"]);
    assert_eq!(m.ring().members(), ["b".to_string(), "self".to_string()]);
    assert_eq!(m.generation(), 2);
    let b = m.member("b").unwrap();
    assert_eq!(b.state, MemberState::Alive);
    assert_eq!(b.internal_addr, "b.internal:9004");
    assert_eq!(b.gossip_addr, addr(1));
}

#[test]
fn ring_generation_changes_only_on_membership_change() {
    let mut m = membership();
    let t0 = Instant::now();
    m.on_heartbeat(&hb("b", 1, 1, T0_MS), addr(1), t0, T0_MS)
        .unwrap();
    let generation = m.generation();
    for seq in 2..50 {
        let now = t0 + Duration::from_millis(seq * 100);
        assert_eq!(
            m.on_heartbeat(&hb("b", 1, seq, T0_MS + seq * 100), addr(1), now, T0_MS),
            Ok(Change::None)
        );
        assert!(!m.tick(now));
    }
    assert_eq!(m.generation(), generation);
    // Suspect does not move the ring either.
    assert!(m.mark_suspect("b", t0));
    assert_eq!(m.generation(), generation);
    assert_eq!(m.alive(), vec!["b", "self"]);
    // A join does.
    m.on_heartbeat(&hb("c", 1, 1, T0_MS), addr(2), t0, T0_MS)
        .unwrap();
    assert_eq!(m.generation(), generation + 1);
}

#[test]
fn timeout_makes_member_dead_and_rejoin_with_new_boot() {
    let mut m = membership();
    let t0 = Instant::now();
    m.on_heartbeat(&hb("b", 1, 10, T0_MS), addr(1), t0, T0_MS)
        .unwrap();
    assert!(!m.tick(t0 + Duration::from_secs(3)));
    assert!(m.tick(t0 + Duration::from_millis(3_001)));
    assert_eq!(m.member("b").unwrap().state, MemberState::Dead);
    assert_eq!(m.alive(), vec!["self"]);
    assert_eq!(m.ring().members(), ["self".to_string()]);
    assert_eq!(m.generation(), 3);
    // Ticking again changes nothing.
    assert!(!m.tick(t0 + Duration::from_secs(10)));

    // It restarts: new boot id, sequence starting over.
    let t1 = t0 + Duration::from_secs(20);
    assert_eq!(
        m.on_heartbeat(&hb("b", 2, 1, T0_MS + 20_000), addr(1), t1, T0_MS + 20_000),
        Ok(Change::Joined)
    );
    let b = m.member("b").unwrap();
    assert_eq!((b.state, b.boot_id, b.last_seq), (MemberState::Alive, 2, 1));
    assert_eq!(m.generation(), 4);
}

#[test]
fn restart_while_alive_is_restarted_not_joined() {
    let mut m = membership();
    let t0 = Instant::now();
    m.on_heartbeat(&hb("b", 1, 10, T0_MS), addr(1), t0, T0_MS)
        .unwrap();
    let generation = m.generation();
    assert_eq!(
        m.on_heartbeat(&hb("b", 2, 1, T0_MS + 500), addr(1), t0, T0_MS),
        Ok(Change::Restarted)
    );
    assert_eq!(m.generation(), generation);
}

#[test]
fn replayed_packet_is_rejected() {
    let mut m = membership();
    let t0 = Instant::now();
    let first = hb("b", 1, 5, T0_MS);
    m.on_heartbeat(&first, addr(1), t0, T0_MS).unwrap();
    assert_eq!(
        m.on_heartbeat(&first, addr(1), t0, T0_MS),
        Err(Rejection::Replay { seq: 5, last: 5 })
    );
    assert_eq!(
        m.on_heartbeat(&hb("b", 1, 4, T0_MS + 10), addr(1), t0, T0_MS),
        Err(Rejection::Replay { seq: 4, last: 5 })
    );
    let drops: BTreeMap<_, _> = m.drops().into_iter().collect();
    assert_eq!(drops[&DropReason::Replay], 2);
    assert_eq!(m.member("b").unwrap().last_seq, 5);
}

#[test]
fn replaced_boot_id_is_stale() {
    let mut m = membership();
    let t0 = Instant::now();
    m.on_heartbeat(&hb("b", 1, 100, T0_MS), addr(1), t0, T0_MS)
        .unwrap();
    m.on_heartbeat(&hb("b", 2, 1, T0_MS + 1_000), addr(1), t0, T0_MS)
        .unwrap();
    // A packet of the first boot with a higher sequence and a fresh time: still stale.
    assert_eq!(
        m.on_heartbeat(&hb("b", 1, 101, T0_MS + 2_000), addr(1), t0, T0_MS),
        Err(Rejection::StaleBoot { boot_id: 1 })
    );
    // Even after the member died and the old boot tries to come back.
    assert!(m.tick(t0 + Duration::from_secs(4)));
    assert_eq!(
        m.on_heartbeat(&hb("b", 1, 102, T0_MS + 5_000), addr(1), t0, T0_MS),
        Err(Rejection::StaleBoot { boot_id: 1 })
    );
    let drops: BTreeMap<_, _> = m.drops().into_iter().collect();
    assert_eq!(drops[&DropReason::StaleBoot], 2);
}

#[test]
fn older_unseen_boot_is_stale_while_current_is_alive() {
    let mut m = membership();
    let t0 = Instant::now();
    m.on_heartbeat(&hb("b", 2, 1, T0_MS), addr(1), t0, T0_MS)
        .unwrap();
    assert_eq!(
        m.on_heartbeat(&hb("b", 1, 50, T0_MS - 1_000), addr(1), t0, T0_MS),
        Err(Rejection::StaleBoot { boot_id: 1 })
    );
    assert_eq!(m.member("b").unwrap().boot_id, 2);
}

#[test]
fn skewed_time_is_rejected() {
    let mut m = membership();
    let t0 = Instant::now();
    assert_eq!(
        m.on_heartbeat(&hb("b", 1, 1, T0_MS + 30_001), addr(1), t0, T0_MS),
        Err(Rejection::ClockSkew { skew_ms: 30_001 })
    );
    assert_eq!(
        m.on_heartbeat(&hb("b", 1, 1, T0_MS - 60_000), addr(1), t0, T0_MS),
        Err(Rejection::ClockSkew { skew_ms: 60_000 })
    );
    assert!(m.member("b").is_none());
    assert_eq!(
        m.on_heartbeat(&hb("b", 1, 1, T0_MS + 30_000), addr(1), t0, T0_MS),
        Ok(Change::Joined)
    );
}

#[test]
fn own_name_is_rejected() {
    let mut m = membership();
    let t0 = Instant::now();
    assert_eq!(
        m.on_heartbeat(&hb("self", 7, 1, T0_MS), addr(1), t0, T0_MS),
        Err(Rejection::SelfName)
    );
    assert_eq!(m.alive(), vec!["self"]);
}

#[test]
fn suspect_is_skipped_until_a_later_heartbeat() {
    let mut m = membership();
    let t0 = Instant::now();
    m.on_heartbeat(&hb("b", 1, 1, T0_MS), addr(1), t0, T0_MS)
        .unwrap();
    assert!(m.mark_suspect("b", t0));
    assert!(!m.mark_suspect("nobody", t0));
    // A heartbeat within the peer timeout of the failure keeps it suspect...
    m.on_heartbeat(
        &hb("b", 1, 2, T0_MS),
        addr(1),
        t0 + Duration::from_secs(1),
        T0_MS,
    )
    .unwrap();
    assert_eq!(m.member("b").unwrap().state, MemberState::Suspect);
    // ...one after it makes it alive again.
    m.on_heartbeat(
        &hb("b", 1, 3, T0_MS),
        addr(1),
        t0 + Duration::from_secs(4),
        T0_MS,
    )
    .unwrap();
    assert_eq!(m.member("b").unwrap().state, MemberState::Alive);
    // A suspect that stops sending dies like any other.
    m.mark_suspect("b", t0 + Duration::from_secs(4));
    assert!(m.tick(t0 + Duration::from_secs(8)));
    assert_eq!(m.member("b").unwrap().state, MemberState::Dead);
    assert!(!m.mark_suspect("b", t0 + Duration::from_secs(8)));
}

#[test]
fn table_is_bounded_and_evicts_dead_first() {
    let mut config = MembershipConfig::new("self", "x:1", 7);
    config.vnodes = 4;
    config.max_members = 2;
    let mut m = Membership::new(config);
    let t0 = Instant::now();
    m.on_heartbeat(&hb("a", 1, 1, T0_MS), addr(1), t0, T0_MS)
        .unwrap();
    m.on_heartbeat(
        &hb("b", 1, 1, T0_MS),
        addr(2),
        t0 + Duration::from_secs(2),
        T0_MS,
    )
    .unwrap();
    assert_eq!(
        m.on_heartbeat(&hb("c", 1, 1, T0_MS), addr(3), t0, T0_MS),
        Err(Rejection::TableFull)
    );
    m.tick(t0 + Duration::from_secs(4));
    assert_eq!(m.member("a").unwrap().state, MemberState::Dead);
    assert_eq!(
        m.on_heartbeat(
            &hb("c", 1, 1, T0_MS),
            addr(3),
            t0 + Duration::from_secs(4),
            T0_MS
        ),
        Ok(Change::Joined)
    );
    assert!(m.member("a").is_none());
    assert_eq!(m.alive(), vec!["b", "c", "self"]);
}

#[test]
fn converged_when_views_agree() {
    let mut m = membership();
    let t0 = Instant::now();
    let mut b = hb("b", 1, 1, T0_MS);
    b.members = vec!["b".into()];
    m.on_heartbeat(&b, addr(1), t0, T0_MS).unwrap();
    assert!(!m.converged());
    b.seq = 2;
    b.members = vec!["b".into(), "self".into()];
    m.on_heartbeat(&b, addr(1), t0, T0_MS).unwrap();
    assert!(m.converged());
}

#[test]
fn decode_errors_map_to_reasons() {
    assert_eq!(
        DropReason::of_packet_error(&PacketError::TooLarge { len: 9000 }),
        DropReason::Oversized
    );
    assert_eq!(
        DropReason::of_packet_error(&PacketError::BadMac),
        DropReason::BadMac
    );
    assert_eq!(
        DropReason::of_packet_error(&PacketError::UnknownKey(KeyId([1, 2, 3, 4]))),
        DropReason::UnknownKey
    );
    assert_eq!(
        DropReason::of_packet_error(&PacketError::BadVersion(9)),
        DropReason::Garbage
    );
    assert_eq!(
        DropReason::of_packet_error(&PacketError::Truncated),
        DropReason::Garbage
    );
}
