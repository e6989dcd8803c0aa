//! Unit tests of `remote_write`, beside it so the module reads as the module.

use super::*;
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

#[test]
fn a_full_queue_drops_its_oldest_and_shutdown_counts_what_is_left() {
    // Nothing listens on port 1: every attempt fails and is retried, so uploads pile up.
    let config = RemoteWriteConfig {
        url: "http://127.0.0.1:1/api/v1/write".into(),
        queue_capacity: 2,
        timeout: Duration::from_secs(1),
        ca_file: None,
        bearer_token_file: None,
    };
    let registry = Registry::new();
    let writer = RemoteWriter::start(&config, &registry).unwrap();
    let payload = delimited::encode(&[MetricFamily {
        name: Some("up".into()),
        help: None,
        r#type: Some(MetricType::Gauge as i32),
        metric: vec![Metric {
            gauge: Some(Gauge { value: Some(1.0) }),
            timestamp_ms: Some(1),
            ..Default::default()
        }],
    }]);
    for id in ["a", "b", "c", "d"] {
        writer.enqueue(id, payload.clone(), SystemTime::now());
    }
    // At most one upload is in the sender's hands; the queue never holds more than 2.
    assert!((1..=2).contains(&writer.queue_length()));
    let full = value(
        &registry,
        r#"telemeter_server_remote_write_dropped_total{reason="queue_full"}"#,
    )
    .unwrap();
    assert!((1.0..=2.0).contains(&full), "{full}");

    let started = Instant::now();
    writer.shutdown(Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_secs(5));
    let shutdown = value(
        &registry,
        r#"telemeter_server_remote_write_dropped_total{reason="shutdown"}"#,
    )
    .unwrap();
    // Every upload is accounted for: dropped when full, or left at shutdown.
    assert_eq!(full + shutdown, 4.0, "full {full}, shutdown {shutdown}");
    assert_eq!(writer.queue_length(), 0);
    // Enqueueing after shutdown is counted, not queued.
    writer.enqueue("e", payload, SystemTime::now());
    assert_eq!(writer.queue_length(), 0);
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
