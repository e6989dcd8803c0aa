//! Unit tests of `remote_write`, beside it so the module reads as the module.

use super::batch::{split, Batch};
use super::shard::is_out_of_order;
use super::*;
use crate::store::Store;
use prost::Message;
use proto::{Label, Sample, WriteRequest};
use telemeter_common::delimited;
use telemeter_common::model::{Gauge, Metric, MetricFamily, MetricType};

fn value(registry: &Registry, series: &str) -> Option<f64> {
    registry.render().lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A receiver taking everything, keeping each request's series.
struct Sink(Arc<Mutex<Vec<WriteRequest>>>);

impl telemeter_common::http::Handler for Sink {
    fn handle(&self, request: telemeter_common::http::Request) -> telemeter_common::http::Response {
        let body = snappy::decode_block(&request.body, 64 << 20).unwrap();
        self.0
            .lock()
            .unwrap()
            .push(WriteRequest::decode(&body[..]).unwrap());
        telemeter_common::http::Response::text(204, "")
    }

    fn body_limit(&self, _method: &str, _path: &str) -> usize {
        64 << 20
    }
}

/// `series` gauges `g{i}` of cluster `id` at `ts`, as stored (with `_id`).
fn upload(id: &str, series: usize, ts: i64) -> Vec<u8> {
    delimited::encode(&[MetricFamily {
        name: Some("g".into()),
        help: None,
        r#type: Some(MetricType::Gauge as i32),
        metric: (0..series)
            .map(|i| Metric {
                label: vec![
                    telemeter_common::model::LabelPair::new("i", &i.to_string()),
                    telemeter_common::model::LabelPair::new("_id", id),
                ],
                gauge: Some(Gauge {
                    value: Some(ts as f64),
                }),
                timestamp_ms: Some(ts),
                ..Default::default()
            })
            .collect(),
    }])
}

#[test]
fn shards_keep_each_series_in_order_and_a_restart_ships_nothing_twice() {
    const UPLOADS: i64 = 60;
    const SERIES: usize = 40;
    const CLUSTERS: i64 = 6;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let receiver = telemeter_common::http::Server::bind(
        "127.0.0.1:0",
        telemeter_common::http::Config {
            name: "sink".into(),
            ..telemeter_common::http::Config::default()
        },
        Arc::new(Sink(seen.clone())),
    )
    .unwrap()
    .spawn();
    let dir = testkit::TempDir::new("rw-shards");
    let store_config = crate::store::StoreConfig {
        dir: dir.path().to_path_buf(),
        ttl: Duration::from_secs(3600),
        max_batch: 64,
    };
    let config = RemoteWriteConfig {
        shards: 4,
        // Small batches: many requests per shard, so order across requests is tested.
        max_samples_per_send: 7,
        ..RemoteWriteConfig::new(&format!("http://{}/", receiver.local_addr()))
    };
    let base = telemeter_common::time::sample_millis(SystemTime::now()) - 100_000;
    {
        let store = Store::open_shipping(store_config.clone()).unwrap();
        let registry = Registry::new();
        let writer = RemoteWriter::start(&config, &registry, store.backlog().unwrap()).unwrap();
        // Uploads of several clusters, so several shards send at once; every other one packed
        // (journaled as its snappy frames, as /upload keeps what it took unchanged), which the
        // shard decompresses itself.
        for n in 0..UPLOADS {
            let id = format!("c{}", n % CLUSTERS);
            let families = upload(&id, SERIES, base + n);
            match n % 2 {
                0 => store.put(&id, families, SystemTime::now()).unwrap(),
                _ => {
                    let frames = telemeter_common::snappy::encode_framed(&families);
                    store
                        .put_unless_older_packed(&id, families, frames, SystemTime::now())
                        .unwrap();
                }
            }
        }
        let want = (UPLOADS as f64) * SERIES as f64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while value(
            &registry,
            r#"telemeter_server_remote_write_samples_total{result="sent"}"#,
        )
        .is_none_or(|sent| sent < want)
        {
            assert!(Instant::now() < deadline, "{}", registry.render());
            std::thread::sleep(Duration::from_millis(20));
        }
        writer.shutdown(Duration::from_secs(5));
        store.close();
    }
    let mut by_series: std::collections::HashMap<String, Vec<i64>> = Default::default();
    let requests = std::mem::take(&mut *seen.lock().unwrap());
    assert!(requests.len() >= (UPLOADS as usize * SERIES) / 7);
    for request in &requests {
        assert!(convert::sample_count(&request.timeseries) <= 7);
        for series in &request.timeseries {
            let key = format!("{:?}", series.labels);
            by_series
                .entry(key)
                .or_default()
                .extend(series.samples.iter().map(|s| s.timestamp));
        }
    }
    assert_eq!(by_series.len(), SERIES * CLUSTERS as usize);
    for (series, stamps) in &by_series {
        let cluster: i64 = series
            .split("value: \"c")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        let want: Vec<i64> = (0..UPLOADS)
            .filter(|n| n % CLUSTERS == cluster)
            .map(|n| base + n)
            .collect();
        assert_eq!(stamps, &want, "{series}: every sample once, in order");
    }

    // The cursor was saved at shutdown: a restart ships only what is new.
    let store = Store::open_shipping(store_config).unwrap();
    let registry = Registry::new();
    let writer = RemoteWriter::start(&config, &registry, store.backlog().unwrap()).unwrap();
    store
        .put("c0", upload("c0", 1, base + UPLOADS), SystemTime::now())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while value(
        &registry,
        r#"telemeter_server_remote_write_samples_total{result="sent"}"#,
    ) != Some(1.0)
    {
        assert!(Instant::now() < deadline, "{}", registry.render());
        std::thread::sleep(Duration::from_millis(20));
    }
    writer.shutdown(Duration::from_secs(5));
    let again = seen.lock().unwrap();
    assert_eq!(again.len(), 1, "only the new upload");
    assert_eq!(again[0].timeseries[0].samples[0].timestamp, base + UPLOADS);
    drop(again);
    store.close();
    receiver.shutdown(Duration::from_secs(1));
}

#[test]
fn a_token_file_must_hold_one_line() {
    let dir = std::env::temp_dir().join(format!("rw-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good");
    std::fs::write(&good, "s3cret\n").unwrap();
    assert_eq!(read_token(&good).unwrap(), "s3cret");
    let bad = dir.join("bad");
    std::fs::write(&bad, "a\nb\n").unwrap();
    assert!(read_token(&bad).is_err());
    std::fs::write(&bad, "  \n").unwrap();
    assert!(read_token(&bad).is_err());
    assert!(read_token(&dir.join("missing")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

fn series(name: &str, stamps: &[i64]) -> TimeSeries {
    TimeSeries {
        labels: vec![Label {
            name: "__name__".into(),
            value: name.into(),
        }],
        samples: stamps
            .iter()
            .map(|&timestamp| Sample {
                value: 1.0,
                timestamp,
            })
            .collect(),
    }
}

#[test]
fn a_request_is_the_write_request_prometheus_decodes() {
    let all = vec![series("a", &[1, 2]), series("b", &[3])];
    let body = snappy::decode_block(&encode(&all), 1 << 20).unwrap();
    let want = WriteRequest {
        timeseries: all.clone(),
    };
    assert_eq!(body, want.encode_to_vec());
    assert_eq!(WriteRequest::decode(&body[..]).unwrap(), want);
}

#[test]
fn an_out_of_order_refusal_splits_the_request_in_order() {
    assert!(is_out_of_order(
        "out of order sample for series {__name__=\"x\"}"
    ));
    assert!(is_out_of_order("err-mimir-sample-out-of-order"));
    assert!(is_out_of_order("duplicate sample for timestamp"));
    assert!(!is_out_of_order("unauthorized"));
    // Records 1, 2, 3 of one gauge series each: a, b, c.
    let gauge = |name: &str, ts: i64| MetricFamily {
        name: Some(name.into()),
        help: None,
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            gauge: Some(Gauge { value: Some(1.0) }),
            timestamp_ms: Some(ts),
            ..Default::default()
        }],
    };
    let batch = || {
        let mut b = Batch::default();
        for (seq, name) in ["a", "b", "c"].iter().enumerate() {
            b.extend(
                &delimited::encode(&[gauge(name, seq as i64 + 1)]),
                seq as u64 + 1,
                0,
            )
            .unwrap();
        }
        b
    };
    let decoded = |b: &Batch| -> Vec<TimeSeries> {
        let body = snappy::decode_block(&b.body(), 1 << 20).unwrap();
        WriteRequest::decode(&body[..]).unwrap().timeseries
    };
    let (first, second) = split(batch());
    assert_eq!(decoded(&first), vec![series("a", &[1])]);
    assert_eq!(decoded(&second), vec![series("b", &[2]), series("c", &[3])]);
    assert_eq!(second.seqs, vec![2, 3]);
    // Dropping the oldest records removes their series only.
    let mut b = batch();
    assert_eq!(b.drop_below(3), 2);
    assert_eq!(
        (decoded(&b), b.seqs.clone()),
        (vec![series("c", &[3])], vec![3])
    );
    // A full request is taken from the front.
    // The rest goes into the spare's buffers, whatever they held before.
    let mut b = batch();
    let front = b.take_front(2, batch());
    assert_eq!(decoded(&front), vec![series("a", &[1]), series("b", &[2])]);
    assert_eq!((decoded(&b), b.len()), (vec![series("c", &[3])], 1));
    assert_eq!(b.seqs, vec![3]);
    assert_eq!(b.take_front(0, front).len(), 1, "at least one series");
    assert!(b.is_empty());
    // The body written into reused buffers is the same request.
    let mut body = vec![7u8; 3];
    for b in [batch(), b] {
        let len = b.body_into(&mut body);
        assert_eq!(body[..len], b.body());
    }
    // The age bound drops the series of records received before the cut-off (all at 0 here).
    let mut b = batch();
    assert_eq!(b.drop_received_before(0), 0);
    assert_eq!(b.drop_received_before(1), 3);
    assert!(b.is_empty());
}

/// The realistic upload of several clusters, as a shard batches it: every request cut from the
/// batch, wherever it is cut, is a snappy block that `snap` decodes to exactly its series, and
/// the copies of repeated labels make it a fraction of its size.
#[test]
fn a_request_body_is_its_series_snappy_compressed_wherever_the_batch_is_cut() {
    let mut b = Batch::default();
    for (seq, id) in ["cluster-a", "cluster-b", "cluster-c"].iter().enumerate() {
        let payload = delimited::encode(&testkit::payload::families(id, 1_700_000_000_000));
        b.extend(&payload, seq as u64, 0).unwrap();
    }
    let entries = |b: &Batch| b.entries().to_vec();
    let whole = entries(&b);
    let body = b.body();
    let decoded = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
    assert_eq!(decoded, whole);
    let series = WriteRequest::decode(&decoded[..]).unwrap().timeseries;
    assert_eq!(series.len(), 1500);
    // The bytes snap's hash-matching compressor makes, against ours: within a small factor.
    let snap_len = snappy::encode_block(&whole).len();
    assert!(
        body.len() * 3 < whole.len() && body.len() < snap_len * 4,
        "ours {} bytes, snap {snap_len}, uncompressed {}",
        body.len(),
        whole.len()
    );
    // Cut anywhere (a full request, an out-of-order split): each part on its own decodes.
    for at in [1, 2, 7, 499, 500, 501, 1499] {
        let mut front = Batch::default();
        for (seq, id) in ["cluster-a", "cluster-b", "cluster-c"].iter().enumerate() {
            let payload = delimited::encode(&testkit::payload::families(id, 1_700_000_000_000));
            front.extend(&payload, seq as u64, 0).unwrap();
        }
        let back = front.split_off(at);
        for part in [&front, &back] {
            let decoded = snappy::decode_block(&part.body(), 1 << 20).unwrap();
            assert_eq!(decoded, entries(part), "cut at {at}");
        }
        let rejoined: Vec<TimeSeries> = [&front, &back]
            .iter()
            .flat_map(|p| {
                let bytes = snappy::decode_block(&p.body(), 1 << 20).unwrap();
                WriteRequest::decode(&bytes[..]).unwrap().timeseries
            })
            .collect();
        assert_eq!(rejoined, series, "cut at {at}");
    }
}

/// Starts one shard shipping `uploads` (cluster id, payload) to a receiver that takes the
/// connection and never answers, and returns the records in hand once the reader can hand over
/// no more: what the shard's request holds, its queue and the one the reader waits with.
fn in_hand_behind_a_stalled_receiver(uploads: Vec<(String, Vec<u8>)>, least: usize) -> usize {
    // Never accepted: the kernel completes the connection and keeps the request unread.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = testkit::TempDir::new("rw-bound");
    let store = Store::open_shipping(crate::store::StoreConfig {
        dir: dir.path().to_path_buf(),
        ttl: Duration::from_secs(3600),
        max_batch: 64,
    })
    .unwrap();
    let config = RemoteWriteConfig {
        shards: 1,
        // One record a request: the first is sent and never answered.
        max_samples_per_send: 1,
        timeout: Duration::from_secs(60),
        ..RemoteWriteConfig::new(&format!("http://{}/", stalled.local_addr().unwrap()))
    };
    let registry = Registry::new();
    let writer = RemoteWriter::start(&config, &registry, store.backlog().unwrap()).unwrap();
    let count = uploads.len();
    for (id, payload) in uploads {
        store.put(&id, payload, SystemTime::now()).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while writer.queue_length() < least {
        assert!(Instant::now() < deadline, "{}", writer.queue_length());
        std::thread::sleep(Duration::from_millis(10));
    }
    // The reader reads on as long as the queue takes more: its most over half a second.
    let mut most = 0;
    let watch_until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < watch_until {
        most = most.max(writer.queue_length());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(most < count, "{most} of {count}: the reader read them all");
    writer.shutdown(Duration::ZERO);
    store.close();
    // Closing the listener resets the connection: the shard's request fails and it stops.
    drop(stalled);
    most
}

#[test]
fn a_shard_queue_holds_at_most_its_count_of_records() {
    let uploads = (0..3 * SHARD_QUEUE)
        .map(|n| {
            let id = format!("c{n}");
            let payload = upload(&id, 1, 1_000 + n as i64);
            (id, payload)
        })
        .collect();
    // One in the request, the queue, one in the reader's hand.
    let most = in_hand_behind_a_stalled_receiver(uploads, SHARD_QUEUE);
    assert!(most <= SHARD_QUEUE + 2, "{most}");
    assert!(
        most > 8 + 2,
        "{most}: more than a request's worth of uploads can wait"
    );
}

#[test]
fn a_shard_queue_holds_at_most_its_bytes_of_records() {
    const LABEL: usize = 1 << 20;
    let uploads = (0..SHARD_QUEUE + 8)
        .map(|n| {
            let id = format!("c{n}");
            let payload = delimited::encode(&[MetricFamily {
                name: Some("big".into()),
                help: None,
                r#type: Some(MetricType::Gauge as i32),
                metric: vec![Metric {
                    label: vec![
                        telemeter_common::model::LabelPair::new("v", &"x".repeat(LABEL)),
                        telemeter_common::model::LabelPair::new("_id", &id),
                    ],
                    gauge: Some(Gauge { value: Some(1.0) }),
                    timestamp_ms: Some(1_000 + n as i64),
                    ..Default::default()
                }],
            }]);
            (id, payload)
        })
        .collect();
    let fit = SHARD_QUEUE_BYTES / LABEL;
    let most = in_hand_behind_a_stalled_receiver(uploads, fit / 2);
    // Each record is a little over LABEL bytes: fewer than `fit` are queued.
    assert!(most <= fit + 2, "{most}");
    assert!(fit + 2 < SHARD_QUEUE, "the bytes bound is what is tested");
}

/// Egress's CPU a sample in a shard, without HTTP: the bench's uploads of 64 clusters converted
/// into a batch, cut into requests of the default size and each request's body written, as a
/// shard does, with each cluster's cache ([`super::cache`]) and without, in turns (the same
/// minutes, for a busy machine). Each cluster's uploads alternate between two timestamps, as the
/// bench's carry the time they were sent. For comparing changes on a machine too busy for
/// `tests/bench.sh egress`:
/// `cargo test --release -p telemeter-server --lib shard_cpu -- --ignored --nocapture`.
#[test]
#[ignore]
fn shard_cpu_a_sample_converting_and_writing_bodies() {
    use super::cache::Caches;
    use testkit::cpu::thread_cpu;
    let uploads = |timestamp_ms: i64| -> Vec<(String, Vec<u8>)> {
        (0..64)
            .map(|i| {
                let id = testkit::payload::cluster_id(i);
                let payload = delimited::encode(&testkit::payload::families(&id, timestamp_ms));
                (id, payload)
            })
            .collect()
    };
    let rounds_of = [uploads(1_700_000_000_000), uploads(1_700_000_015_000)];
    for turn in 0..6 {
        let with_cache = turn % 2 == 1;
        let mut caches = Caches::default();
        let (mut batch, mut spare, mut body) = (Batch::default(), Batch::default(), Vec::new());
        let (mut samples, mut bytes) = (0usize, 0usize);
        let start = thread_cpu();
        // Bounded: 200 rounds of 64 uploads.
        for round in 0..200u64 {
            for (i, (id, payload)) in rounds_of[round as usize % 2].iter().enumerate() {
                let seq = round * 64 + i as u64;
                let cache = if with_cache { caches.get(id) } else { None };
                batch.extend_cached(payload, seq, 0, cache).unwrap();
                while batch.len() >= DEFAULT_MAX_SAMPLES_PER_SEND {
                    let front =
                        batch.take_front(DEFAULT_MAX_SAMPLES_PER_SEND, std::mem::take(&mut spare));
                    bytes += front.body_into(&mut body);
                    samples += front.len();
                    spare = front;
                }
            }
        }
        let cpu = thread_cpu() - start;
        println!(
            "shard cpu{}: {:.1} ns a sample, {:.1} bytes a sample, {samples} samples",
            if with_cache { " with caches" } else { "" },
            cpu.as_nanos() as f64 / samples as f64,
            bytes as f64 / samples as f64
        );
        assert!(samples >= 200 * 64 * 500 - DEFAULT_MAX_SAMPLES_PER_SEND);
    }
}
