//! Unit tests of `forward`, beside it so the module reads as the module.

use super::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

fn signer(byte: u8) -> Signer {
    Signer::with_key(DerivedKey([byte; 32]), DEFAULT_WINDOW)
}

fn owned(headers: Vec<(&'static str, String)>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v))
        .collect()
}

fn t(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

const NOW: u64 = 1_800_000_000_000;
/// The node the test forwards are addressed to, and the one verifying them.
const DEST: &str = "node-b";

fn signed(s: &Signer, body: &[u8], kind: ForwardKind) -> Vec<(String, String)> {
    owned(s.headers(DEST, "cluster-1", t(NOW - 5_000), kind, body, t(NOW)))
}

fn set(headers: &mut [(String, String)], name: &str, value: &str) {
    for (n, v) in headers.iter_mut() {
        if n.eq_ignore_ascii_case(name) {
            *v = value.to_owned();
        }
    }
}

#[test]
fn signed_push_verifies() {
    let s = signer(1);
    let headers = signed(&s, b"families", ForwardKind::Push);
    let got = s
        .verify(
            DEST,
            "POST",
            FORWARD_PATH,
            &headers,
            b"families",
            t(NOW + 1_000),
        )
        .unwrap();
    assert_eq!(
        got,
        Forwarded {
            cluster_id: "cluster-1".into(),
            received: t(NOW - 5_000),
            kind: ForwardKind::Push,
        }
    );
    let handoff = signed(&s, b"families", ForwardKind::Handoff);
    let got = s
        .verify(DEST, "POST", FORWARD_PATH, &handoff, b"families", t(NOW))
        .unwrap();
    assert_eq!(got.kind, ForwardKind::Handoff);
}

#[test]
fn tampered_body_is_bad_signature() {
    let s = signer(1);
    let headers = signed(&s, b"families", ForwardKind::Push);
    assert_eq!(
        s.verify(DEST, "POST", FORWARD_PATH, &headers, b"famil1es", t(NOW)),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn tampered_headers_are_bad_signature() {
    let s = signer(1);
    for (name, value) in [
        (HEADER_DESTINATION, "node-c"),
        (HEADER_CLUSTER_ID, "cluster-2"),
        (HEADER_RECEIVED, "1"),
        (HEADER_TIME, "1800000000001"),
        (HEADER_KIND, "handoff"),
    ] {
        let mut headers = signed(&s, b"b", ForwardKind::Push);
        set(&mut headers, name, value);
        assert_eq!(
            s.verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW)),
            Err(VerifyError::BadSignature),
            "{name}"
        );
    }
    let headers = signed(&s, b"b", ForwardKind::Push);
    assert_eq!(
        s.verify(DEST, "PUT", FORWARD_PATH, &headers, b"b", t(NOW)),
        Err(VerifyError::BadSignature)
    );
    assert_eq!(
        s.verify(DEST, "POST", "/upload", &headers, b"b", t(NOW)),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn wrong_key_is_bad_signature() {
    let headers = signed(&signer(1), b"b", ForwardKind::Push);
    assert_eq!(
        signer(2).verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW)),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn old_or_future_time_is_outside_window() {
    let s = signer(1);
    let headers = signed(&s, b"b", ForwardKind::Push);
    assert_eq!(
        s.verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW + 30_001)),
        Err(VerifyError::OutsideWindow { skew_ms: 30_001 })
    );
    assert_eq!(
        s.verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW - 60_000)),
        Err(VerifyError::OutsideWindow { skew_ms: 60_000 })
    );
}

#[test]
fn second_hop_is_refused() {
    let s = signer(1);
    // A peer that signs hop 2 (it would only do so if it re-forwarded) is still refused.
    let mut headers = signed(&s, b"b", ForwardKind::Push);
    set(&mut headers, HEADER_HOP, "2");
    let received = (NOW - 5_000).to_string();
    let time = NOW.to_string();
    let tag = s.tag(
        "POST",
        FORWARD_PATH,
        DEST,
        "cluster-1",
        &received,
        &time,
        "2",
        "push",
        b"b",
    );
    set(&mut headers, HEADER_SIGNATURE, &hex(&tag));
    assert_eq!(
        s.verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW)),
        Err(VerifyError::HopExceeded("2".into()))
    );
    // An unsigned change of the hop is a bad signature.
    let mut headers = signed(&s, b"b", ForwardKind::Push);
    set(&mut headers, HEADER_HOP, "2");
    assert_eq!(
        s.verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW)),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn replay_is_refused() {
    let s = signer(1);
    let headers = signed(&s, b"b", ForwardKind::Push);
    assert!(s
        .verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW))
        .is_ok());
    assert_eq!(
        s.verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW + 10)),
        Err(VerifyError::Replayed)
    );
}

#[test]
fn a_forward_for_another_node_is_refused() {
    let s = signer(1);
    // Genuinely signed, for node-a: captured on its way there and replayed to node-b.
    let headers = owned(s.headers(
        "node-a",
        "cluster-1",
        t(NOW - 5_000),
        ForwardKind::Push,
        b"b",
        t(NOW),
    ));
    assert_eq!(
        s.verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW)),
        Err(VerifyError::WrongDestination {
            to: "node-a".into()
        })
    );
    // Refusing it did not mark it seen: node-a still takes it once.
    assert!(s
        .verify("node-a", "POST", FORWARD_PATH, &headers, b"b", t(NOW))
        .is_ok());
    let mut headers = headers;
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(HEADER_DESTINATION));
    assert_eq!(
        s.verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW)),
        Err(VerifyError::MissingHeader(HEADER_DESTINATION))
    );
}

#[test]
fn missing_and_malformed_headers() {
    let s = signer(1);
    assert_eq!(
        s.verify(DEST, "POST", FORWARD_PATH, &[], b"b", t(NOW)),
        Err(VerifyError::MissingHeader(HEADER_DESTINATION))
    );
    let mut headers = signed(&s, b"b", ForwardKind::Push);
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(HEADER_SIGNATURE));
    assert_eq!(
        s.verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW)),
        Err(VerifyError::MissingHeader(HEADER_SIGNATURE))
    );
    for (name, value) in [
        (HEADER_SIGNATURE, "zz"),
        (HEADER_SIGNATURE, &"g".repeat(64)),
        (HEADER_RECEIVED, "yesterday"),
        (HEADER_TIME, "-1"),
        (HEADER_KIND, "copy"),
        (HEADER_CLUSTER_ID, ""),
    ] {
        let mut headers = signed(&s, b"b", ForwardKind::Push);
        set(&mut headers, name, value);
        assert_eq!(
            s.verify(DEST, "POST", FORWARD_PATH, &headers, b"b", t(NOW)),
            Err(VerifyError::BadHeader(name)),
            "{name}={value}"
        );
    }
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
fn forwarder_posts_a_verifiable_request() {
    let s = Arc::new(signer(1));
    let forwarder = Forwarder::new(s.clone(), Duration::from_secs(5), false);
    let (addr, server) = one_shot(200);
    forwarder
        .forward(DEST, &addr, "c1", t(NOW), ForwardKind::Push, b"payload")
        .unwrap();
    let (head, body) = server.join().unwrap();
    assert_eq!(body, b"payload");
    assert!(
        head.starts_with("POST /internal/forward HTTP/1.1"),
        "{head}"
    );
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_owned(), v.trim().to_owned()))
        .collect();
    let got = s
        .verify(
            DEST,
            "POST",
            FORWARD_PATH,
            &headers,
            &body,
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(got.cluster_id, "c1");
    assert_eq!(got.received, t(NOW));
}

#[test]
fn forwarder_reports_rejection_and_unreachable() {
    let forwarder = Forwarder::new(Arc::new(signer(1)), Duration::from_secs(5), false);
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
