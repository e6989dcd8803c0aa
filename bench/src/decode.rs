//! Decode and validate in process, on one thread: what the server does to an upload body between
//! reading it and storing it, with no network and no disk. The same steps as the server's upload
//! pipeline, in its order: snappy framed → the fast path on the body's wire views
//! (`telemeter_server::validate::Rules::check_wire`), which takes a valid body that needs no
//! rewrite as it is; only when it cannot, the owned path (decode into families, validate and stamp
//! with `Rules::apply`). The owned path alone is measured too, for the uploads that need it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use telemeter_common::delimited;
use telemeter_common::model::MetricFamily;
use telemeter_common::selector::Selector;
use telemeter_common::snappy;
use telemeter_server::validate::{Rules, WireCheck};

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
                whitelist: telemeter_common::sync::Swap::new(std::sync::Arc::new(Vec::new())),
                max_sample_age: Duration::from_secs(24 * 3600),
                max_future_skew: Duration::from_secs(300),
                max_samples: MAX_SERIES * SAMPLES_PER_SERIES,
            },
            token_labels,
        }
    }

    /// As [`Validator::for_cluster`], under a whitelist that names each of the benchmark
    /// upload's families (`{__name__="..."}`, as upstream's whitelists do).
    pub fn for_cluster_listed(cluster: &str) -> Validator {
        let validator = Validator::for_cluster(cluster);
        let mut names: Vec<String> = payload::families(cluster, 0)
            .into_iter()
            .filter_map(|f| f.name)
            .collect();
        names.dedup();
        let selectors = names
            .iter()
            .filter_map(|n| Selector::parse(&format!("{{__name__=\"{n}\"}}")).ok())
            .collect();
        validator
            .rules
            .whitelist
            .replace(std::sync::Arc::new(selectors));
        validator
    }

    /// The server's fast path on the decompressed `pd`: the samples of a body stored as it is,
    /// `None` when the owned path has to decide.
    pub fn check_wire(&self, pd: &[u8]) -> Option<usize> {
        match self
            .rules
            .check_wire(pd, &limits(), &self.token_labels, SystemTime::now())
        {
            WireCheck::Unchanged { samples, .. } => Some(samples),
            WireCheck::Owned => None,
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

/// Decodes and validates one upload body as the server does (fast path first); returns its
/// samples.
pub fn decode_one(body: &[u8], validator: &Validator) -> Result<usize, String> {
    let pd = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
    if let Some(samples) = validator.check_wire(&pd) {
        // The server stores the decompressed body it checked as it is, with no further copy.
        std::hint::black_box(pd);
        return Ok(samples);
    }
    owned(&pd, validator)
}

/// The owned path alone on one decompressed body: decode into families, validate, stamp.
fn owned(pd: &[u8], validator: &Validator) -> Result<usize, String> {
    let families = delimited::decode(pd, &limits()).map_err(|e| e.to_string())?;
    validator.check(families)
}

/// Samples per CPU second of `f` repeated on one thread for `duration`, with the uploads done.
fn rate(duration: Duration, mut f: impl FnMut() -> Result<usize, String>) -> Result<Rate, String> {
    // One untimed pass: page faults of the first allocations are not the decoder's speed.
    f()?;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut uploads = 0u64;
    let mut samples = 0u64;
    while started.elapsed() < duration {
        samples += f()? as u64;
        uploads += 1;
    }
    Ok(Rate {
        uploads,
        samples,
        wall: started.elapsed().as_secs_f64().max(1e-9),
        cpu: (cpu_seconds() - cpu_before).max(1e-9),
    })
}

/// What [`rate`] measured.
struct Rate {
    uploads: u64,
    samples: u64,
    wall: f64,
    cpu: f64,
}

/// Seconds per upload spent in each stage of [`decode_one`] (snappy, the wire check), in the
/// owned path's two stages (protobuf decode, validation), and in the wire check under a whitelist
/// of the upload's family names, each timed alone over `rounds` repetitions.
pub fn stages(body: &[u8], validator: &Validator, rounds: u32) -> Result<[f64; 5], String> {
    let rounds = rounds.max(1);
    let pd = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
    let families = delimited::decode(&pd, &limits()).map_err(|e| e.to_string())?;
    let time = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
        let t = Instant::now();
        for _ in 0..rounds {
            f()?;
        }
        Ok(t.elapsed().as_secs_f64() / f64::from(rounds))
    };
    let snappy_s = time(&mut || {
        let out = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
        std::hint::black_box(out);
        Ok(())
    })?;
    let wire_s = time(&mut || {
        std::hint::black_box(validator.check_wire(&pd));
        Ok(())
    })?;
    let listed = Validator::for_cluster_listed(&payload::cluster_id(1));
    let listed_s = time(&mut || {
        std::hint::black_box(listed.check_wire(&pd));
        Ok(())
    })?;
    let decode_s = time(&mut || {
        let out = delimited::decode(&pd, &limits()).map_err(|e| e.to_string())?;
        std::hint::black_box(out);
        Ok(())
    })?;
    // Validation takes the families by value: time the copies alone and take them off.
    let clone_s = time(&mut || {
        std::hint::black_box(families.clone());
        Ok(())
    })?;
    let validate_s = time(&mut || {
        std::hint::black_box(validator.check(families.clone())?);
        Ok(())
    })?;
    Ok([
        snappy_s,
        wire_s,
        decode_s,
        (validate_s - clone_s).max(0.0),
        listed_s,
    ])
}

/// CPU seconds this thread has used so far: the split of an upload between its stages, which
/// wall time on a shared machine blurs (another process's turn lands in whichever stage it hits).
fn thread_cpu_seconds() -> f64 {
    testkit::cpu::thread_cpu().as_secs_f64()
}

/// CPU seconds per upload of the two stages of [`decode_one`] (snappy, the wire check), each
/// repeated alone `rounds` times on this thread.
pub fn stages_cpu(body: &[u8], validator: &Validator, rounds: u32) -> Result<[f64; 2], String> {
    let rounds = rounds.max(1);
    let pd = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
    let cpu = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
        f()?;
        let before = thread_cpu_seconds();
        for _ in 0..rounds {
            f()?;
        }
        Ok((thread_cpu_seconds() - before) / f64::from(rounds))
    };
    let snappy_s = cpu(&mut || {
        let out = snappy::decode_framed(body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
        std::hint::black_box(out);
        Ok(())
    })?;
    let wire_s = cpu(&mut || {
        std::hint::black_box(validator.check_wire(&pd));
        Ok(())
    })?;
    Ok([snappy_s, wire_s])
}

/// Repeats [`decode_one`] on the benchmark upload for `duration` and reports samples/s, then the
/// owned path alone for `duration` more.
pub fn run(duration: Duration) -> Result<Report, String> {
    let cluster = payload::cluster_id(1);
    let validator = Validator::for_cluster(&cluster);
    let body = payload::upload_body(&cluster, payload::now_ms());
    let pd = snappy::decode_framed(&body, MAX_DECOMPRESSED).map_err(|e| e.to_string())?;
    let path = match validator.check_wire(&pd) {
        Some(_) => "wire",
        None => "owned",
    };
    let server = rate(duration, || decode_one(&body, &validator))?;
    let owned = rate(duration, || owned(&pd, &validator))?;
    let [snappy_s, wire_s, decode_s, validate_s, listed_s] = stages(&body, &validator, 300)?;
    let [snappy_cpu_s, wire_cpu_s] = stages_cpu(&body, &validator, 3000)?;
    let mut report = Report::new();
    report
        .word("validator", "telemeter_server::validate::Rules")
        .word("path", path)
        .int("body_bytes", body.len() as u64)
        .int("uploads", server.uploads)
        .float("seconds", server.wall, 3)
        .float("cpu_s", server.cpu, 3)
        .float("uploads_per_s", server.uploads as f64 / server.wall, 1)
        .float("samples_per_s", server.samples as f64 / server.wall, 0)
        .float("samples_per_cpu_s", server.samples as f64 / server.cpu, 0)
        .float(
            "owned_samples_per_cpu_s",
            owned.samples as f64 / owned.cpu,
            0,
        )
        .float("snappy_us", snappy_s * 1e6, 1)
        .float("wire_check_us", wire_s * 1e6, 1)
        .float("snappy_cpu_us", snappy_cpu_s * 1e6, 2)
        .float("wire_check_cpu_us", wire_cpu_s * 1e6, 2)
        .float("wire_check_listed_us", listed_s * 1e6, 1)
        .float("owned_decode_us", decode_s * 1e6, 1)
        .float("owned_validate_us", validate_s * 1e6, 1);
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
    fn the_benchmark_upload_takes_the_fast_path_and_both_paths_agree() {
        let cluster = "bench-00000005";
        let body = payload::upload_body(cluster, payload::now_ms());
        let pd = snappy::decode_framed(&body, MAX_DECOMPRESSED).unwrap();
        let v = Validator::for_cluster(cluster);
        assert_eq!(v.check_wire(&pd), Some(payload::SAMPLES_PER_UPLOAD));
        assert_eq!(owned(&pd, &v), Ok(payload::SAMPLES_PER_UPLOAD));
        // Another cluster's token is never taken unchanged.
        assert_eq!(
            Validator::for_cluster("bench-00000006").check_wire(&pd),
            None
        );
    }

    #[test]
    fn under_a_whitelist_of_its_family_names_the_upload_takes_the_fast_path() {
        let cluster = "bench-00000005";
        let pd = snappy::decode_framed(
            &payload::upload_body(cluster, payload::now_ms()),
            MAX_DECOMPRESSED,
        )
        .unwrap();
        let listed = Validator::for_cluster_listed(cluster);
        assert!(!listed.rules.whitelist.current().is_empty());
        assert_eq!(listed.check_wire(&pd), Some(payload::SAMPLES_PER_UPLOAD));
    }

    #[test]
    fn the_cpu_split_times_both_stages() {
        let cluster = "bench-00000005";
        let body = payload::upload_body(cluster, payload::now_ms());
        let [snappy_s, wire_s] = stages_cpu(&body, &Validator::for_cluster(cluster), 20).unwrap();
        assert!(snappy_s > 0.0 && wire_s > 0.0, "{snappy_s} {wire_s}");
        assert!(stages_cpu(&body[..body.len() / 2], &Validator::for_cluster(cluster), 1).is_err());
    }

    #[test]
    fn stale_samples_are_refused() {
        let body = payload::upload_body("bench-00000005", 1_000);
        assert!(decode_one(&body, &Validator::for_cluster("bench-00000005")).is_err());
    }
}
