//! Unit tests of `upload`, beside it so the module reads as the module.

use super::*;
use crate::store::StoreError;
use std::sync::Mutex;
use std::time::Duration;
use telemeter_common::keys::SharedKey;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::model::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
use telemeter_common::selector::Selector;
use telemeter_common::snappy;

/// Records what it stores (and the frames of what it was handed packed); fails while `fail`
/// is set.
#[derive(Default)]
struct FakePlacement {
    stored: Mutex<Vec<(String, Vec<u8>)>>,
    frames: Mutex<Vec<Option<Vec<u8>>>>,
    fail: Mutex<bool>,
}

impl Placement for Arc<FakePlacement> {
    fn place(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        _received: SystemTime,
    ) -> Result<(), PlacementError> {
        if *self.fail.lock().unwrap() {
            return Err(PlacementError::Store(StoreError::Closed));
        }
        self.stored
            .lock()
            .unwrap()
            .push((cluster_id.to_string(), payload));
        self.frames.lock().unwrap().push(None);
        Ok(())
    }

    fn place_unchanged(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        frames: Option<Vec<u8>>,
        _newest_sample_ms: i64,
        received: SystemTime,
    ) -> Result<(), PlacementError> {
        self.place(cluster_id, payload, received)?;
        if let Some(last) = self.frames.lock().unwrap().last_mut() {
            *last = frames;
        }
        Ok(())
    }
}

fn signer() -> TokenSigner {
    TokenSigner::new(&SharedKey::from_bytes(&[1u8; 32]).unwrap())
}

fn handler(placement: Arc<FakePlacement>, whitelist: Vec<Selector>) -> UploadHandler {
    UploadHandler::new(
        signer(),
        "_id",
        UploadLimits {
            max_upload_bytes: 1 << 20,
            max_decompressed_bytes: 4 << 20,
            max_series: 1000,
        },
        Rules {
            partition_label: "_id".into(),
            extra_labels: vec![],
            whitelist: telemeter_common::sync::Swap::new(Arc::new(whitelist)),
            max_sample_age: Duration::from_secs(86_400),
            max_future_skew: Duration::from_secs(300),
            max_samples: 10_000,
        },
        Arc::new(RateLimiter::new(Duration::from_secs(3600))),
        Arc::new(placement),
        Metrics::new(),
    )
}

fn request(token: &str, body: Vec<u8>) -> Request {
    Request {
        method: "POST".into(),
        path: "/upload".into(),
        query: String::new(),
        headers: vec![
            ("Authorization".to_string(), format!("Bearer {token}")),
            ("Content-Type".into(), PROTO_DELIMITED.into()),
        ]
        .into(),
        body,
        remote: "127.0.0.1:1".parse().unwrap(),
        admitted: None,
    }
}

fn body(name: &str) -> Vec<u8> {
    let ts = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    delimited::encode(&[MetricFamily {
        name: Some(name.into()),
        help: None,
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            label: vec![LabelPair::new("job", "x")],
            gauge: Some(Gauge { value: Some(1.0) }),
            timestamp_ms: Some(ts),
            ..Default::default()
        }],
    }])
}

fn token(id: &str) -> String {
    let labels = BTreeMap::from([("_id".to_string(), id.to_string())]);
    signer().issue(id, id, &labels, Duration::from_secs(60), SystemTime::now())
}

#[test]
fn a_failed_store_does_not_use_the_slot() {
    let placement = Arc::new(FakePlacement::default());
    let h = handler(placement.clone(), vec![]);
    *placement.fail.lock().unwrap() = true;
    let r = h.handle(request(&token("a"), body("up")));
    assert_eq!(r.status, 503);
    *placement.fail.lock().unwrap() = false;
    assert_eq!(h.handle(request(&token("a"), body("up"))).status, 200);
    let stored = placement.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, "a");
    let families = delimited::decode(&stored[0].1, &delimited::Limits::default()).unwrap();
    assert_eq!(families[0].metric[0].label_value("_id"), Some("a"));
    // Now the slot is used.
    let r = h.handle(request(&token("a"), body("up")));
    assert_eq!(r.status, 429);
    assert!(r
        .headers
        .iter()
        .any(|(n, v)| n == "Retry-After" && v.parse::<u64>().unwrap() > 2600));
}

/// Fails like a full disk does.
struct DiskFull;

impl Placement for DiskFull {
    fn place(&self, _: &str, _: Vec<u8>, _: SystemTime) -> Result<(), PlacementError> {
        Err(PlacementError::Store(StoreError::Io {
            context: "writing /var/lib/secret-place/.tmp-7".into(),
            source: std::io::Error::from_raw_os_error(28),
        }))
    }
}

#[test]
fn a_store_failure_is_503_without_server_details() {
    let mut h = handler(Arc::new(FakePlacement::default()), vec![]);
    h.placement = Arc::new(DiskFull);
    let r = h.handle(request(&token("a"), body("up")));
    assert_eq!(r.status, 503);
    let telemeter_common::http::Body::Bytes(text) = &r.body else {
        panic!("a 503 has a text body");
    };
    let text = String::from_utf8_lossy(text);
    assert_eq!(text.trim_end(), STORE_FAILED);
    assert!(!text.contains("secret-place") && !text.contains("os error"));
}

#[test]
fn series_over_the_cap_are_refused_before_decoding() {
    // 1,001 empty series (the handler's cap is 1,000) in one family, two bytes each.
    let mut family = vec![0x0a, 1, b'm'];
    for _ in 0..1001 {
        family.extend_from_slice(&[0x22, 0]);
    }
    let mut body = Vec::new();
    prost::encoding::encode_varint(family.len() as u64, &mut body);
    body.extend_from_slice(&family);
    let placement = Arc::new(FakePlacement::default());
    let r = handler(placement.clone(), vec![]).handle(request(&token("a"), body));
    assert_eq!(r.status, 413);
    assert!(placement.stored.lock().unwrap().is_empty());
}

#[test]
fn a_stamped_upload_is_stored_byte_for_byte_and_an_unstamped_one_is_stamped() {
    let placement = Arc::new(FakePlacement::default());
    let h = handler(placement.clone(), vec![]);
    let ts = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let stamped = delimited::encode(&[MetricFamily {
        name: Some("up".into()),
        help: Some("Up.".into()),
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            label: vec![LabelPair::new("_id", "a"), LabelPair::new("job", "x")],
            gauge: Some(Gauge { value: Some(1.0) }),
            timestamp_ms: Some(ts),
            ..Default::default()
        }],
    }]);
    let mut compressed = request(&token("a"), snappy::encode_framed(&stamped));
    compressed.headers.push("Content-Encoding", "snappy");
    assert_eq!(h.handle(compressed).status, 200);
    // Stored as sent (after decompression): no decode, no re-encode.
    assert_eq!(placement.stored.lock().unwrap()[0].1, stamped);

    let h = handler(placement.clone(), vec![]);
    assert_eq!(h.handle(request(&token("b"), body("up"))).status, 200);
    let stored = placement.stored.lock().unwrap()[1].1.clone();
    let families = delimited::decode(&stored, &delimited::Limits::default()).unwrap();
    assert_eq!(families[0].metric[0].label_value("_id"), Some("b"));
}

#[test]
fn an_empty_upload_stores_nothing_and_keeps_the_slot() {
    let placement = Arc::new(FakePlacement::default());
    let h = handler(placement.clone(), vec![Selector::parse("up").unwrap()]);
    assert_eq!(h.handle(request(&token("a"), body("other"))).status, 200);
    assert!(placement.stored.lock().unwrap().is_empty());
    assert_eq!(h.handle(request(&token("a"), body("up"))).status, 200);
    assert_eq!(placement.stored.lock().unwrap().len(), 1);
}

fn retry_after(r: &Response) -> Option<u64> {
    r.headers
        .iter()
        .find(|(n, _)| n == "Retry-After")
        .and_then(|(_, v)| v.parse().ok())
}

fn reason(r: &Response) -> String {
    match &r.body {
        telemeter_common::http::Body::Bytes(text) => String::from_utf8_lossy(text).into_owned(),
        _ => String::new(),
    }
}

#[test]
fn uploads_read_but_not_stored_cost_the_sender_a_refusal_each() {
    let placement = Arc::new(FakePlacement::default());
    let h = handler(placement.clone(), vec![]);
    // Refused after a full decode (the sample is a day and a bit old).
    let old = |name: &str| {
        let mut families = delimited::decode(&body(name), &Default::default()).unwrap();
        families[0].metric[0].timestamp_ms = Some(1_000);
        delimited::encode(&families)
    };
    for _ in 0..REFUSALS_PER_WINDOW {
        assert_eq!(h.handle(request(&token("a"), old("up"))).status, 400);
    }
    // Over the budget: 429 before anything is read (read, it would be 400), valid or not.
    for upload in [old("up"), body("up")] {
        let r = h.handle(request(&token("a"), upload));
        assert_eq!(r.status, 429);
        // The handler's window is an hour: one refusal comes back every 20 minutes.
        assert_eq!(retry_after(&r), Some(1200));
        assert!(reason(&r).contains("refused or empty"), "{}", reason(&r));
    }
    // Other clusters are not affected.
    assert_eq!(h.handle(request(&token("b"), body("up"))).status, 200);
    assert_eq!(placement.stored.lock().unwrap().len(), 1);
}

#[test]
fn empty_uploads_cost_a_refusal_and_not_the_slot() {
    let placement = Arc::new(FakePlacement::default());
    let h = handler(placement.clone(), vec![Selector::parse("up").unwrap()]);
    for _ in 0..REFUSALS_PER_WINDOW - 1 {
        assert_eq!(h.handle(request(&token("a"), body("other"))).status, 200);
    }
    // With one refusal left, a real upload is read and stored: it gives the refusal back.
    assert_eq!(h.handle(request(&token("a"), body("up"))).status, 200);
    assert_eq!(placement.stored.lock().unwrap().len(), 1);
    // Now the slot is used: not read at all.
    let r = h.handle(request(&token("a"), body("other")));
    // Due again in an hour, accepted from a quarter of it before.
    assert_eq!((r.status, retry_after(&r)), (429, Some(2700)));
    assert!(
        reason(&r).contains("next upload accepted"),
        "{}",
        reason(&r)
    );
}

#[test]
fn refusals() {
    let placement = Arc::new(FakePlacement::default());
    let h = handler(placement.clone(), vec![]);
    let mut r = request(&token("a"), body("up"));
    r.method = "GET".into();
    assert_eq!(h.handle(r).status, 405);
    assert_eq!(h.handle(request("garbage", body("up"))).status, 401);
    let mut r = request(&token("a"), body("up"));
    r.headers = r
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n,
                if n == "Content-Type" {
                    "application/json"
                } else {
                    v
                },
            )
        })
        .collect();
    assert_eq!(h.handle(r).status, 415);
    let mut r = request(&token("a"), body("up"));
    r.headers.push("Content-Encoding", "br");
    assert_eq!(h.handle(r).status, 415);
    // No Content-Type: protobuf-delimited, as upstream clients send.
    let mut r = request(&token("a"), body("up"));
    r.headers = r
        .headers
        .iter()
        .filter(|(n, _)| *n != "Content-Type")
        .collect();
    assert_eq!(h.handle(r).status, 200);
    assert_eq!(placement.stored.lock().unwrap().len(), 1);
}

fn head_of(request: &Request) -> Head {
    let mut raw = format!("{} {} HTTP/1.1\r\n", request.method, request.path);
    for (name, value) in &request.headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    telemeter_common::http::parse_head(raw.as_bytes()).unwrap()
}

#[test]
fn the_token_admitted_from_the_head_is_verified_once() {
    let placement = Arc::new(FakePlacement::default());
    let h = handler(placement.clone(), vec![]);
    let remote = "127.0.0.1:1".parse().unwrap();
    let a = request(&token("a"), body("up"));
    let Ok(admission) = h.admit(&head_of(&a), remote) else {
        panic!("a valid token's head is admitted");
    };
    let note = admission
        .note
        .expect("the claims are carried to the request");

    // The request takes the claims its head was admitted with, and does not verify its token
    // again: a token spoilt after admission shows it.
    let mut spoilt = request(&format!("{}x", token("a")), body("up"));
    spoilt.admitted = Some(note);
    assert_eq!(h.handle(spoilt).status, 200);

    // A request that carries none verifies its own token.
    let forged = || request(&format!("{}x", token("d")), body("up"));
    assert_eq!(h.handle(forged()).status, 401);
    let other_key = SharedKey::from_bytes(&[2u8; 32]).unwrap();
    let other = UploadHandler {
        tokens: VerifiedTokens::new(TokenSigner::new(&other_key), 8),
        ..handler(placement.clone(), vec![])
    };
    assert_eq!(other.handle(request(&token("b"), body("up"))).status, 401);

    // A refused head is answered there, with nothing to carry.
    assert!(h.admit(&head_of(&forged()), remote).is_err());
    assert_eq!(placement.stored.lock().unwrap().len(), 1);
}

/// A body already stamped with cluster `id`, labels in order: valid as it is (the wire fast path).
fn stamped(id: &str) -> Vec<u8> {
    let ts = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    delimited::encode(&[MetricFamily {
        name: Some("up".into()),
        help: None,
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            label: vec![LabelPair::new("_id", id), LabelPair::new("job", "x")],
            gauge: Some(Gauge { value: Some(1.0) }),
            timestamp_ms: Some(ts),
            ..Default::default()
        }],
    }])
}

#[test]
fn only_a_snappy_body_stored_unchanged_is_handed_on_with_its_frames() {
    let placement = Arc::new(FakePlacement::default());
    let h = handler(placement.clone(), vec![]);
    let snappy_request = |id: &str, plain: &[u8]| {
        let mut r = request(&token(id), snappy::encode_framed(plain));
        r.headers.push("Content-Encoding", "snappy");
        r
    };
    let packed = snappy_request("a", &stamped("a"));
    let packed_body = packed.body.clone();
    assert_eq!(h.handle(packed).status, 200);
    // Stamped by the server (the owned path re-encodes it): the families only.
    assert_eq!(h.handle(snappy_request("b", &body("up"))).status, 200);
    // Not compressed: nothing to keep as it arrived.
    let plain_c = stamped("c");
    assert_eq!(h.handle(request(&token("c"), plain_c.clone())).status, 200);
    let stored = placement.stored.lock().unwrap().clone();
    let frames = placement.frames.lock().unwrap().clone();
    assert_eq!(stored.len(), 3);
    assert_eq!(
        stored[0],
        (
            "a".to_string(),
            snappy::decode_framed(&packed_body, 1 << 20).unwrap()
        )
    );
    assert_eq!(frames[0].as_ref(), Some(&packed_body));
    assert_eq!(stored[1].0, "b");
    assert_ne!(stored[1].1, body("up"));
    assert_eq!(frames[1], None);
    assert_eq!(stored[2], ("c".to_string(), plain_c));
    assert_eq!(frames[2], None);
}

/// Stores through a real [`LocalPlacement`], and records the newest sample of each upload it was
/// handed as unchanged, and how many it was handed to store as rewritten.
struct Recorded {
    inner: crate::ingest::placement::LocalPlacement,
    unchanged: Mutex<Vec<(String, i64, bool)>>,
    rewritten: Mutex<usize>,
}

impl Placement for Recorded {
    fn place(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        received: SystemTime,
    ) -> Result<(), PlacementError> {
        *self.rewritten.lock().unwrap() += 1;
        self.inner.place(cluster_id, payload, received)
    }

    fn place_unchanged(
        &self,
        cluster_id: &str,
        payload: Vec<u8>,
        frames: Option<Vec<u8>>,
        newest_sample_ms: i64,
        received: SystemTime,
    ) -> Result<(), PlacementError> {
        self.unchanged.lock().unwrap().push((
            cluster_id.to_string(),
            newest_sample_ms,
            frames.is_some(),
        ));
        self.inner
            .place_unchanged(cluster_id, payload, frames, newest_sample_ms, received)
    }
}

/// An upload taken by the wire fast path hands the store the newest sample the check read, and
/// the TTL counts from it: not from the receive time, nor from the last family's samples. Both
/// ways the fast path stores (snappy framed, so packed; and plain).
#[test]
fn the_ttl_of_an_upload_stored_unchanged_counts_from_its_newest_sample() {
    use crate::store::{Store, StoreConfig};
    let dir = testkit::TempDir::new("upload-newest");
    let store = Store::open(StoreConfig {
        dir: dir.path().to_path_buf(),
        ttl: Duration::from_secs(600),
        max_batch: 64,
    })
    .unwrap();
    let recorded = Arc::new(Recorded {
        inner: crate::ingest::placement::LocalPlacement::new(crate::receive::merge::Merger::new(
            store.clone(),
        )),
        unchanged: Mutex::new(Vec::new()),
        rewritten: Mutex::new(0),
    });
    let mut h = handler(Arc::new(FakePlacement::default()), vec![]);
    h.placement = recorded.clone();
    let now_ms = telemeter_common::time::unix_millis(SystemTime::now()) as i64;
    let minute = 60_000;
    let family = |name: &str, id: &str, ts: i64| MetricFamily {
        name: Some(name.into()),
        help: None,
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            label: vec![LabelPair::new("_id", id), LabelPair::new("job", "x")],
            gauge: Some(Gauge { value: Some(1.0) }),
            timestamp_ms: Some(ts),
            ..Default::default()
        }],
    };
    // The newest sample (9 minutes old) first; the last family's is 20 minutes old.
    let fresh = delimited::encode(&[
        family("up", "fresh", now_ms - 9 * minute),
        family("b", "fresh", now_ms - 20 * minute),
    ]);
    let mut packed = request(&token("fresh"), snappy::encode_framed(&fresh));
    packed.headers.push("Content-Encoding", "snappy");
    assert_eq!(h.handle(packed).status, 200);
    let stale = delimited::encode(&[
        family("up", "stale", now_ms - 21 * minute),
        family("b", "stale", now_ms - 20 * minute),
    ]);
    assert_eq!(h.handle(request(&token("stale"), stale)).status, 200);
    assert_eq!(
        *recorded.unchanged.lock().unwrap(),
        [
            ("fresh".to_string(), now_ms - 9 * minute, true),
            ("stale".to_string(), now_ms - 20 * minute, false)
        ]
    );
    assert_eq!(*recorded.rewritten.lock().unwrap(), 0);
    // Served while its newest sample is within the 10 minute TTL, then swept a minute later.
    let listed = || -> Vec<String> { store.clusters().into_iter().map(|c| c.cluster_id).collect() };
    assert_eq!(listed(), ["fresh"]);
    assert_eq!(store.get("stale").unwrap(), None);
    assert_eq!(store.sweep(SystemTime::now()), 1);
    assert_eq!(store.sweep(SystemTime::now() + Duration::from_secs(50)), 0);
    assert_eq!(store.sweep(SystemTime::now() + Duration::from_secs(70)), 1);
    assert!(listed().is_empty());
}

/// An upload stored packed hands its decompressed body's buffer back to the handler's pool, and
/// the next upload decompresses into it (what it held before shows nowhere: a shorter body
/// is stored exactly); the pool keeps at most its bounds whatever is handed to it.
#[test]
fn a_body_stored_packed_lends_its_buffer_to_the_next_upload_within_the_pool_bounds() {
    use crate::store::{Store, StoreConfig};
    let dir = testkit::TempDir::new("upload-lent");
    let store = Store::open(StoreConfig {
        dir: dir.path().to_path_buf(),
        ttl: Duration::from_secs(600),
        max_batch: 64,
    })
    .unwrap();
    let mut h = handler(Arc::new(FakePlacement::default()), vec![]);
    h.placement = Arc::new(crate::ingest::placement::LocalPlacement::new(
        crate::receive::merge::Merger::new(store.clone()),
    ));
    let snappy_request = |id: &str, payload: &[u8]| {
        let mut r = request(&token(id), snappy::encode_framed(payload));
        r.headers.push("Content-Encoding", "snappy");
        r
    };
    let upload = |id: &str, job: &str| {
        let ts = telemeter_common::time::unix_millis(SystemTime::now()) as i64;
        delimited::encode(&[MetricFamily {
            name: Some("up".into()),
            help: None,
            r#type: Some(MetricType::Gauge as i32),
            metric: vec![Metric {
                label: vec![LabelPair::new("_id", id), LabelPair::new("job", job)],
                gauge: Some(Gauge { value: Some(1.0) }),
                timestamp_ms: Some(ts),
                ..Default::default()
            }],
        }])
    };
    let long = upload("a", &"x".repeat(500));
    let short = upload("b", "x");
    assert!(short.len() < long.len());
    assert_eq!(h.bodies.kept().0, 0);
    assert_eq!(h.handle(snappy_request("a", &long)).status, 200);
    let (buffers, bytes) = h.bodies.kept();
    assert_eq!(buffers, 1, "the stored body's buffer came back");
    assert!(bytes >= long.len());
    assert_eq!(h.handle(snappy_request("b", &short)).status, 200);
    assert_eq!(h.bodies.kept(), (1, bytes), "the same buffer, used again");
    assert_eq!(store.get("a").unwrap().map(|e| e.payload), Some(long));
    assert_eq!(store.get("b").unwrap().map(|e| e.payload), Some(short));
    // Bounded however many come back and however large.
    h.bodies.give(vec![0; BODY_BUFFER_BYTES + 1]);
    assert_eq!(
        h.bodies.kept().0,
        1,
        "a buffer over the size bound is freed"
    );
    for _ in 0..BODY_BUFFERS * 2 {
        h.bodies.give(vec![0; BODY_BUFFER_BYTES]);
    }
    let (buffers, bytes) = h.bodies.kept();
    assert!(buffers <= BODY_BUFFERS, "{buffers} buffers kept");
    assert!(bytes <= BODY_BUFFERS_BYTES, "{bytes} bytes kept");
    assert!(buffers > 1);
}
