//! Fuzz targets of the server crate's own parser: gossip heartbeat datagrams, which arrive over
//! UDP from anyone who can reach `--listen-cluster`. Reuses the workspace's mutation harness
//! (`common/tests/fuzz/harness.rs`; `FUZZ_SECONDS`, `FUZZ_SEED` apply).

#[path = "../../common/tests/fuzz/harness.rs"]
mod harness;

use telemeter_common::token::{mac, KeyPurpose, SharedKey};
use telemeter_server::cluster::packet::Heartbeat;

/// Bytes of the MAC at the end of a datagram.
const MAC_LEN: usize = 32;

fn heartbeats() -> Vec<Heartbeat> {
    let hb = |name: &str, members: &[&str], addr: &str| Heartbeat {
        name: name.into(),
        boot_id: 0x0123_4567_89ab_cdef,
        seq: 42,
        sent_ms: 1_700_000_000_000,
        internal_addr: addr.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
    };
    vec![
        hb("a", &["a"], "127.0.0.1:9004"),
        hb("node-b", &["node-a", "node-b", "node-c"], "10.0.0.2:9004"),
        hb("ü-node", &[], "[::1]:9004"),
        hb(&"n".repeat(200), &["x"; 40], "host.example:1"),
    ]
}

/// Whole datagrams: a mutation must never authenticate (only an untouched seed may), nor panic.
#[test]
fn gossip_packet() {
    let key = SharedKey::from_bytes(&[7; 32])
        .unwrap()
        .derive(KeyPurpose::Gossip);
    let seeds: Vec<Vec<u8>> = heartbeats()
        .iter()
        .map(|hb| hb.encode(&key).unwrap())
        .collect();
    let valid = seeds.clone();
    harness::run(
        harness::Target {
            name: "gossip_packet",
            dict: &[b"\x01", b"\x00\x00", b"\xff\xff", b"127.0.0.1:9004"],
            seeds,
        },
        |input| match Heartbeat::decode(input, &key) {
            Ok(hb) if !valid.iter().any(|v| v == input) => {
                Err(format!("a mutated packet authenticated: {hb:?}"))
            }
            _ => Ok(()),
        },
    );
}

/// The part behind the MAC: each mutated body is MAC'd again before decoding, so the field parser
/// sees hostile fields from a key holder. It must not panic, and what it accepts must encode back
/// to the same bytes (nothing is silently dropped or reinterpreted).
#[test]
fn gossip_packet_fields() {
    let key = SharedKey::from_bytes(&[7; 32])
        .unwrap()
        .derive(KeyPurpose::Gossip);
    let seeds: Vec<Vec<u8>> = heartbeats()
        .iter()
        .map(|hb| {
            let mut datagram = hb.encode(&key).unwrap();
            datagram.truncate(datagram.len() - MAC_LEN);
            datagram
        })
        .collect();
    harness::run(
        harness::Target {
            name: "gossip_packet_fields",
            dict: &[b"\x01", b"\x00\x00", b"\xff\xff", b"\x00\x01a"],
            seeds,
        },
        |body| {
            let mut datagram = body.to_vec();
            datagram.extend_from_slice(&mac(&key, &[body]));
            match Heartbeat::decode(&datagram, &key) {
                Ok(hb) => match hb.encode(&key) {
                    Ok(again) if again == datagram => Ok(()),
                    Ok(again) => Err(format!(
                        "{hb:?} decoded, but encodes to other bytes: {}",
                        harness::escape(&again)
                    )),
                    Err(e) => Err(format!("{hb:?} decoded, but does not encode: {e}")),
                },
                Err(_) => Ok(()),
            }
        },
    );
}
