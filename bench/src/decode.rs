//! Decode and validate in process, on one thread: what the server does to an upload body between
//! reading it and storing it (snappy framed → protobuf-delimited → families → validation), with
//! no network and no disk.

use std::time::{Duration, Instant};

use telemeter_common::model::MetricFamily;
use telemeter_common::{delimited, labels, snappy};

use crate::payload;
use crate::report::{cpu_seconds, Report};

/// The server's default caps (`--max-decompressed-bytes`, `--max-series`).
const MAX_DECOMPRESSED: usize = 16 << 20;

/// The checks the server makes on every series: metric names, label sets, a timestamp on every
/// sample, and the partition label, when it is not linked in.
pub fn validate(families: &[MetricFamily], cluster: &str) -> Result<usize, String> {
    let mut samples = 0;
    for family in families {
        let name = family.name.as_deref().unwrap_or("");
        labels::check_metric_name(name).map_err(|e| e.to_string())?;
        for metric in &family.metric {
            labels::check_series_labels(metric).map_err(|e| e.to_string())?;
            if metric.timestamp_ms.is_none() {
                return Err(format!("{name}: a sample without a timestamp"));
            }
            match metric.label_value(payload::PARTITION_LABEL) {
                Some(v) if v != cluster => return Err(format!("{name}: _id={v}")),
                _ => {}
            }
        }
        samples += family.sample_count();
    }
    Ok(samples)
}

/// Decodes and validates one upload body of `cluster`; returns its samples.
pub fn decode_one(body: &[u8], cluster: &str) -> Result<usize, String> {
    let pd = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
    let families =
        delimited::decode(&pd, &delimited::Limits::default()).map_err(|e| e.to_string())?;
    validate(&families, cluster)
}

/// Seconds per upload spent in each stage (snappy, protobuf decode, validation), each stage timed
/// alone over `rounds` repetitions: where the time of [`decode_one`] goes.
pub fn stages(body: &[u8], cluster: &str, rounds: u32) -> Result<[f64; 3], String> {
    let rounds = rounds.max(1);
    let pd = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
    let families =
        delimited::decode(&pd, &delimited::Limits::default()).map_err(|e| e.to_string())?;
    let t = Instant::now();
    for _ in 0..rounds {
        let out = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
        std::hint::black_box(out);
    }
    let snappy_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..rounds {
        let out =
            delimited::decode(&pd, &delimited::Limits::default()).map_err(|e| e.to_string())?;
        std::hint::black_box(out);
    }
    let decode_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(validate(&families, cluster)?);
    }
    let validate_s = t.elapsed().as_secs_f64();
    let per = f64::from(rounds);
    Ok([snappy_s / per, decode_s / per, validate_s / per])
}

/// Repeats [`decode_one`] on the benchmark upload for `duration` and reports samples/s.
pub fn run(duration: Duration) -> Result<Report, String> {
    let cluster = payload::cluster_id(1);
    let body = payload::upload_body(&cluster, payload::now_ms());
    // One untimed pass: page faults of the first allocations are not the decoder's speed.
    decode_one(&body, &cluster)?;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut uploads = 0u64;
    let mut samples = 0u64;
    while started.elapsed() < duration {
        samples += decode_one(&body, &cluster)? as u64;
        uploads += 1;
    }
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    let cpu = (cpu_seconds() - cpu_before).max(1e-9);
    let [snappy_s, decode_s, validate_s] = stages(&body, &cluster, 300)?;
    let stage_total = (snappy_s + decode_s + validate_s).max(1e-12);
    let mut report = Report::new();
    report
        .word("validator", "common-label-checks")
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
        assert_eq!(
            decode_one(&body, "bench-00000005"),
            Ok(payload::SAMPLES_PER_UPLOAD)
        );
        assert!(decode_one(&body, "bench-00000006").is_err());
        assert!(decode_one(&body[..body.len() / 2], "bench-00000005").is_err());
    }
}
