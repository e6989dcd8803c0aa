//! Decode and validate in process, on one thread: what the server does to an upload body between
//! reading it and storing it (snappy framed → protobuf-delimited → families → the server's own
//! validation and stamping, `telemeter_server::validate::Rules`), with no network and no disk.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use telemeter_common::delimited;
use telemeter_common::model::MetricFamily;
use telemeter_common::snappy;
use telemeter_server::validate::Rules;

use crate::payload;
use crate::report::{cpu_seconds, Report};

/// The server's default caps (`--max-decompressed-bytes`, `--max-series`) and samples per series.
const MAX_DECOMPRESSED: usize = 16 << 20;
const MAX_SERIES: usize = 100_000;
const SAMPLES_PER_SERIES: usize = 10;

/// The server's validation with its default flags, for uploads of one cluster.
pub struct Validator {
    rules: Rules,
    token_labels: BTreeMap<String, String>,
}

impl Validator {
    /// Validates as a default server does for a token of `cluster`.
    pub fn for_cluster(cluster: &str) -> Validator {
        let mut token_labels = BTreeMap::new();
        token_labels.insert(payload::PARTITION_LABEL.to_string(), cluster.to_string());
        Validator {
            rules: Rules {
                partition_label: payload::PARTITION_LABEL.to_string(),
                extra_labels: Vec::new(),
                whitelist: Vec::new(),
                max_sample_age: Duration::from_secs(24 * 3600),
                max_future_skew: Duration::from_secs(300),
                max_samples: MAX_SERIES * SAMPLES_PER_SERIES,
            },
            token_labels,
        }
    }

    /// Validates and stamps `families`; returns the samples kept.
    pub fn check(&self, families: Vec<MetricFamily>) -> Result<usize, String> {
        let validated = self
            .rules
            .apply(families, &self.token_labels, SystemTime::now())
            .map_err(|e| e.to_string())?;
        Ok(payload::sample_count(&validated.families))
    }
}

fn limits() -> delimited::Limits {
    delimited::Limits {
        max_series: MAX_SERIES,
        ..delimited::Limits::default()
    }
}

/// Decodes and validates one upload body; returns its samples.
pub fn decode_one(body: &[u8], validator: &Validator) -> Result<usize, String> {
    let pd = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
    let families = delimited::decode(&pd, &limits()).map_err(|e| e.to_string())?;
    validator.check(families)
}

/// Seconds per upload spent in each stage (snappy, protobuf decode, validation), each stage timed
/// alone over `rounds` repetitions: where the time of [`decode_one`] goes.
pub fn stages(body: &[u8], validator: &Validator, rounds: u32) -> Result<[f64; 3], String> {
    let rounds = rounds.max(1);
    let pd = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
    let families = delimited::decode(&pd, &limits()).map_err(|e| e.to_string())?;
    let t = Instant::now();
    for _ in 0..rounds {
        let out = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
        std::hint::black_box(out);
    }
    let snappy_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..rounds {
        let out = delimited::decode(&pd, &limits()).map_err(|e| e.to_string())?;
        std::hint::black_box(out);
    }
    let decode_s = t.elapsed().as_secs_f64();
    // Validation takes the families by value: time the copies alone and take them off.
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(families.clone());
    }
    let clone_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(validator.check(families.clone())?);
    }
    let validate_s = (t.elapsed().as_secs_f64() - clone_s).max(0.0);
    let per = f64::from(rounds);
    Ok([snappy_s / per, decode_s / per, validate_s / per])
}

/// Repeats [`decode_one`] on the benchmark upload for `duration` and reports samples/s.
pub fn run(duration: Duration) -> Result<Report, String> {
    let cluster = payload::cluster_id(1);
    let validator = Validator::for_cluster(&cluster);
    let body = payload::upload_body(&cluster, payload::now_ms());
    // One untimed pass: page faults of the first allocations are not the decoder's speed.
    decode_one(&body, &validator)?;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut uploads = 0u64;
    let mut samples = 0u64;
    while started.elapsed() < duration {
        samples += decode_one(&body, &validator)? as u64;
        uploads += 1;
    }
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    let cpu = (cpu_seconds() - cpu_before).max(1e-9);
    let [snappy_s, decode_s, validate_s] = stages(&body, &validator, 300)?;
    let stage_total = (snappy_s + decode_s + validate_s).max(1e-12);
    let mut report = Report::new();
    report
        .word("validator", "telemeter_server::validate::Rules")
        .int("body_bytes", body.len() as u64)
        .int("uploads", uploads)
        .float("seconds", wall, 3)
        .float("cpu_s", cpu, 3)
        .float("uploads_per_s", uploads as f64 / wall, 1)
        .float("samples_per_s", samples as f64 / wall, 0)
        .float("samples_per_cpu_s", samples as f64 / cpu, 0)
        .float("snappy_share", snappy_s / stage_total, 2)
        .float("pd_decode_share", decode_s / stage_total, 2)
        .float("validate_share", validate_s / stage_total, 2);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmark_upload_decodes_and_validates() {
        let body = payload::upload_body("bench-00000005", payload::now_ms());
        let own = Validator::for_cluster("bench-00000005");
        assert_eq!(decode_one(&body, &own), Ok(payload::SAMPLES_PER_UPLOAD));
        // Another cluster's token: the series carry _id of cluster 5, so the server refuses them.
        assert!(decode_one(&body, &Validator::for_cluster("bench-00000006")).is_err());
        assert!(decode_one(&body[..body.len() / 2], &own).is_err());
    }

    #[test]
    fn stale_samples_are_refused() {
        let body = payload::upload_body("bench-00000005", 1_000);
        assert!(decode_one(&body, &Validator::for_cluster("bench-00000005")).is_err());
    }
}
