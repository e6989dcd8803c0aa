//! Unit tests of `forward`, beside it so the module reads as the module.

use super::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use telemeter_common::keys::DerivedKey;

fn sealer(byte: u8) -> Sealer {
    Sealer::with_keys(
        Keyring::new(&[DerivedKey([byte; 32])]).unwrap(),
        DEFAULT_WINDOW,
    )
}

fn t(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

const NOW: u64 = 1_800_000_000_000;
/// The node the test forwards are addressed to, and the one opening them.
const DEST: &str = "node-b";

fn sealed(s: &Sealer, body: &[u8], kind: ForwardKind) -> Vec<u8> {
    s.seal(DEST, "cluster-1", t(NOW - 5_000), kind, body, t(NOW))
        .unwrap()
}

fn open(s: &Sealer, body: Vec<u8>, at: u64) -> Result<(Forwarded, Vec<u8>), VerifyError> {
    s.open(DEST, "POST", FORWARD_PATH, body, t(at))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn sealed_push_opens_and_hides_everything() {
    let s = sealer(1);
    let body = sealed(&s, b"families", ForwardKind::Push);
    for secret in [&b"families"[..], b"cluster-1", DEST.as_bytes()] {
        assert!(!contains(&body, secret), "{secret:?} is readable");
    }
    let (got, families) = open(&s, body, NOW + 1_000).unwrap();
    assert_eq!(
        got,
        Forwarded {
            cluster_id: "cluster-1".into(),
            received: t(NOW - 5_000),
            kind: ForwardKind::Push,
            key_id: DerivedKey([1; 32]).id(),
        }
    );
    assert_eq!(families, b"families");
    let handoff = sealed(&s, b"families", ForwardKind::Handoff);
    assert_eq!(open(&s, handoff, NOW).unwrap().0.kind, ForwardKind::Handoff);
    let empty = sealed(&s, b"", ForwardKind::Push);
    assert_eq!(open(&s, empty, NOW).unwrap().1, b"");
}

#[test]
fn any_flipped_bit_or_cut_is_refused() {
    let s = sealer(1);
    let body = sealed(&s, b"families", ForwardKind::Push);
    for i in 0..body.len() {
        let mut forged = body.clone();
        forged[i] ^= 0x01;
        assert!(
            open(&s, forged, NOW).is_err(),
            "bit flip at {i} went unnoticed"
        );
    }
    for len in 0..body.len() {
        assert!(open(&s, body[..len].to_vec(), NOW).is_err(), "length {len}");
    }
    let mut forged = body.clone();
    forged[HEADER_LEN + 3] ^= 0x80;
    assert_eq!(open(&s, forged, NOW), Err(VerifyError::BadSeal));
}

#[test]
fn method_and_path_are_bound() {
    let s = sealer(1);
    let body = sealed(&s, b"b", ForwardKind::Push);
    assert_eq!(
        s.open(DEST, "PUT", FORWARD_PATH, body.clone(), t(NOW)),
        Err(VerifyError::BadSeal)
    );
    assert_eq!(
        s.open(DEST, "POST", "/upload", body, t(NOW)),
        Err(VerifyError::BadSeal)
    );
}

#[test]
fn wrong_key_is_unknown_key_and_rotation_opens_both() {
    let body = sealed(&sealer(1), b"b", ForwardKind::Push);
    assert_eq!(
        open(&sealer(2), body.clone(), NOW),
        Err(VerifyError::UnknownKey(DerivedKey([1; 32]).id()))
    );
    let rolling = Sealer::with_keys(
        Keyring::new(&[DerivedKey([2; 32]), DerivedKey([1; 32])]).unwrap(),
        DEFAULT_WINDOW,
    );
    assert_eq!(
        open(&rolling, body, NOW).unwrap().0.key_id,
        DerivedKey([1; 32]).id()
    );
    let by_rolling = sealed(&rolling, b"b", ForwardKind::Push);
    assert_eq!(
        open(&sealer(2), by_rolling, NOW).unwrap().0.key_id,
        DerivedKey([2; 32]).id()
    );
}

#[test]
fn old_or_future_time_is_outside_window() {
    let s = sealer(1);
    assert_eq!(
        open(&s, sealed(&s, b"b", ForwardKind::Push), NOW + 30_001),
        Err(VerifyError::OutsideWindow { skew_ms: 30_001 })
    );
    assert_eq!(
        open(&s, sealed(&s, b"b", ForwardKind::Push), NOW - 60_000),
        Err(VerifyError::OutsideWindow { skew_ms: 60_000 })
    );
}

#[test]
fn second_hop_and_bad_fields_are_refused() {
    let s = sealer(1);
    let seal_plain = |plain: &[u8]| {
        s.keys
            .seal(
                FORWARD_VERSION,
                &[FORWARD_METHOD.as_bytes(), FORWARD_PATH.as_bytes()],
                plain,
            )
            .unwrap()
    };
    let plain = |hop: u8, kind: u8| {
        let mut p = vec![DEST.len() as u8];
        p.extend_from_slice(DEST.as_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        p.push(b'c');
        p.extend_from_slice(&NOW.to_be_bytes());
        p.extend_from_slice(&NOW.to_be_bytes());
        p.push(hop);
        p.push(kind);
        p
    };
    assert!(open(&s, seal_plain(&plain(1, 1)), NOW).is_ok());
    assert_eq!(
        open(&s, seal_plain(&plain(2, 1)), NOW),
        Err(VerifyError::HopExceeded(2))
    );
    assert_eq!(
        open(&s, seal_plain(&plain(1, 9)), NOW),
        Err(VerifyError::Malformed("unknown kind"))
    );
    let short = plain(1, 1);
    assert!(matches!(
        open(&s, seal_plain(&short[..10]), NOW),
        Err(VerifyError::Malformed(_))
    ));
    assert!(matches!(
        open(&s, b"not an envelope".to_vec(), NOW),
        Err(VerifyError::Malformed(_))
    ));
}

#[test]
fn a_forward_sealed_before_the_start_is_refused_as_a_possible_replay() {
    // A restarted node's replay cache is empty: what it sealed before its start may have been
    // opened by the process before.
    let s = sealer(1).refusing_before(t(NOW));
    let early = s
        .seal(DEST, "c", t(NOW), ForwardKind::Remove, b"", t(NOW - 1_000))
        .unwrap();
    assert_eq!(
        open(&s, early, NOW).unwrap_err(),
        VerifyError::SealedBeforeStart { before_ms: 1_000 }
    );
    let fresh = s
        .seal(DEST, "c", t(NOW), ForwardKind::Remove, b"", t(NOW))
        .unwrap();
    assert!(open(&s, fresh, NOW + 10).is_ok());
    // Only removals: a push opened twice replaces nothing fresher, and a node whose clock runs
    // ahead of its peers' must not refuse their genuine pushes after its start.
    let push = s
        .seal(DEST, "c", t(NOW), ForwardKind::Push, b"", t(NOW - 1_000))
        .unwrap();
    assert!(open(&s, push, NOW).is_ok());
}

#[test]
fn replay_is_refused() {
    let s = sealer(1);
    let body = sealed(&s, b"b", ForwardKind::Push);
    assert!(open(&s, body.clone(), NOW).is_ok());
    assert_eq!(open(&s, body, NOW + 10), Err(VerifyError::Replayed));
    // The same push sealed again is a new forward (a fresh nonce), not a replay.
    assert!(open(&s, sealed(&s, b"b", ForwardKind::Push), NOW).is_ok());
}

#[test]
fn a_forward_for_another_node_is_refused() {
    let s = sealer(1);
    // Genuinely sealed, for node-a: captured on its way there and replayed to node-b.
    let body = s
        .seal(
            "node-a",
            "cluster-1",
            t(NOW),
            ForwardKind::Push,
            b"b",
            t(NOW),
        )
        .unwrap();
    assert_eq!(
        open(&s, body.clone(), NOW),
        Err(VerifyError::WrongDestination {
            to: "node-a".into()
        })
    );
    // Refusing it did not mark it seen: node-a still takes it once.
    assert!(s.open("node-a", "POST", FORWARD_PATH, body, t(NOW)).is_ok());
}

#[test]
fn seal_refuses_empty_or_long_fields() {
    let s = sealer(1);
    let long = "x".repeat(256);
    assert_eq!(
        s.seal(&long, "c", t(NOW), ForwardKind::Push, b"", t(NOW)),
        Err(SealError::TooLong("destination name"))
    );
    assert_eq!(
        s.seal(DEST, "", t(NOW), ForwardKind::Push, b"", t(NOW)),
        Err(SealError::TooLong("cluster id"))
    );
}

#[test]
fn replay_cache_is_bounded_in_time() {
    let mut cache = ReplayCache::default();
    let window = Duration::from_secs(30);
    assert!(cache.insert(vec![1], 0, window));
    assert!(!cache.insert(vec![1], 1_000, window));
    assert!(cache.insert(vec![2], 100_000, window));
    assert_eq!(cache.order.len(), 1);
    assert!(cache.insert(vec![1], 100_001, window));
}

/// A one-request HTTP server answering `status` and recording the request's head and body.
fn one_shot(status: u16) -> (String, std::thread::JoinHandle<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut head = String::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let reply = if status == 200 {
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
        } else {
            format!("HTTP/1.1 {status} No\r\ncontent-length: 13\r\nconnection: close\r\n\r\nbad signature\n")
        };
        let mut stream = stream;
        stream.write_all(reply.as_bytes()).unwrap();
        (head, body)
    });
    (addr, handle)
}

#[test]
fn forwarder_posts_an_openable_request_with_nothing_in_the_clear() {
    let s = Arc::new(sealer(1));
    let forwarder = Forwarder::new(s.clone(), Duration::from_secs(5), false);
    let (addr, server) = one_shot(200);
    forwarder
        .forward(DEST, &addr, "c1", t(NOW), ForwardKind::Push, b"payload")
        .unwrap();
    let (head, body) = server.join().unwrap();
    assert!(
        head.starts_with("POST /internal/forward HTTP/1.1"),
        "{head}"
    );
    assert!(!head.contains(DEST) && !head.contains("c1"), "{head}");
    assert!(!contains(&body, b"payload"));
    let (got, families) = s
        .open(DEST, "POST", FORWARD_PATH, body, SystemTime::now())
        .unwrap();
    assert_eq!(families, b"payload");
    assert_eq!(got.cluster_id, "c1");
    assert_eq!(got.received, t(NOW));
}

#[test]
fn forwarder_reports_rejection_and_unreachable() {
    let forwarder = Forwarder::new(Arc::new(sealer(1)), Duration::from_secs(5), false);
    let (addr, server) = one_shot(401);
    assert_eq!(
        forwarder.forward(DEST, &addr, "c1", t(NOW), ForwardKind::Push, b"x"),
        Err(ForwardError::Rejected {
            status: 401,
            reason: "bad signature".into()
        })
    );
    server.join().unwrap();
    // A port nobody listens on (bound, then closed).
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    assert!(matches!(
        forwarder.forward(DEST, &closed, "c1", t(NOW), ForwardKind::Push, b"x"),
        Err(ForwardError::Unreachable(_))
    ));
}
