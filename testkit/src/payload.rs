//! The realistic upload, shared by `make bench` and the server's federate probe: what one
//! cluster's client pushes, shaped like a node exporter's output.
//!
//! Five nodes, each with CPU, memory, filesystem, disk, network and load families (counters and
//! gauges) and one request-duration histogram, plus a cluster-wide API server histogram: 500
//! samples in all, which are also 500 Prometheus series (a histogram counts one per bucket, the
//! `+Inf` bucket written out, plus its sum and count).
//! Every series carries `_id=<cluster id>`, as an upstream client stamps it.

use std::time::{SystemTime, UNIX_EPOCH};

use telemeter_common::model::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use telemeter_common::{delimited, snappy, text};

/// Samples in one upload.
pub const SAMPLES_PER_UPLOAD: usize = 500;

/// The label naming the cluster.
pub const PARTITION_LABEL: &str = "_id";

const NODES: usize = 5;
const CPUS: usize = 4;
const CPU_MODES: [&str; 8] = [
    "idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user",
];
const MEMORY: [&str; 10] = [
    "MemTotal",
    "MemFree",
    "MemAvailable",
    "Buffers",
    "Cached",
    "SwapTotal",
    "SwapFree",
    "Active",
    "Inactive",
    "Dirty",
];
/// (device, fstype, mountpoint)
const FILESYSTEMS: [(&str, &str, &str); 3] = [
    ("/dev/nvme0n1p4", "xfs", "/"),
    ("/dev/nvme0n1p3", "ext4", "/boot"),
    ("tmpfs", "tmpfs", "/run"),
];
const FILESYSTEM_FAMILIES: [&str; 5] = [
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
    "node_filesystem_free_bytes",
    "node_filesystem_files",
    "node_filesystem_files_free",
];
const DISKS: [&str; 2] = ["nvme0n1", "sda"];
const DISK_FAMILIES: [&str; 5] = [
    "node_disk_read_bytes_total",
    "node_disk_written_bytes_total",
    "node_disk_reads_completed_total",
    "node_disk_writes_completed_total",
    "node_disk_io_time_seconds_total",
];
const NICS: [&str; 2] = ["ens3", "br-ex"];
const NETWORK_FAMILIES: [&str; 4] = [
    "node_network_receive_bytes_total",
    "node_network_transmit_bytes_total",
    "node_network_receive_packets_total",
    "node_network_transmit_packets_total",
];
const LOADS: [&str; 3] = ["node_load1", "node_load5", "node_load15"];
// The +Inf bucket is written out, so the protobuf's sample count and the text's lines agree.
const NODE_BUCKETS: [f64; 11] = [
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    f64::INFINITY,
];
const API_BUCKETS: [f64; 13] = [
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1.0,
    2.0,
    5.0,
    f64::INFINITY,
];
const API_REQUESTS: [(&str, &str); 3] = [("GET", "pods"), ("LIST", "nodes"), ("WATCH", "secrets")];

/// The cluster id of the `i`-th benchmark cluster: fixed width, so every upload has the same size.
pub fn cluster_id(i: usize) -> String {
    format!("bench-{i:08}")
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Builds families one series at a time, giving each series the common labels.
struct Builder {
    cluster: String,
    timestamp_ms: i64,
    families: Vec<MetricFamily>,
    /// A cheap deterministic spread of values, so the numbers do not all compress alike.
    seed: u64,
}

impl Builder {
    fn value(&mut self) -> f64 {
        // xorshift64: values vary like real counters without a random-number crate.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        (self.seed % 10_000_000) as f64 / 7.0
    }

    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut MetricFamily {
        if self.families.last().and_then(|f| f.name.as_deref()) != Some(name) {
            self.families.push(MetricFamily {
                name: Some(name.to_string()),
                help: Some(help.to_string()),
                r#type: Some(kind as i32),
                metric: Vec::new(),
            });
        }
        let last = self.families.len() - 1;
        &mut self.families[last]
    }

    fn labels(&self, job: &str, instance: &str, extra: &[(&str, &str)]) -> Vec<LabelPair> {
        let mut labels = Vec::with_capacity(extra.len() + 4);
        labels.push(LabelPair::new(PARTITION_LABEL, &self.cluster));
        labels.push(LabelPair::new("instance", instance));
        labels.push(LabelPair::new("job", job));
        for (k, v) in extra {
            labels.push(LabelPair::new(k, v));
        }
        labels
    }

    fn scalar(&mut self, name: &str, kind: MetricType, instance: &str, extra: &[(&str, &str)]) {
        let label = self.labels("node-exporter", instance, extra);
        let value = Some(self.value());
        let timestamp_ms = Some(self.timestamp_ms);
        let metric = match kind {
            MetricType::Counter => Metric {
                label,
                counter: Some(Counter { value }),
                timestamp_ms,
                ..Default::default()
            },
            _ => Metric {
                label,
                gauge: Some(Gauge { value }),
                timestamp_ms,
                ..Default::default()
            },
        };
        let help = format!("{name} as the node exporter reports it.");
        self.family(name, &help, kind).metric.push(metric);
    }

    fn histogram(
        &mut self,
        name: &str,
        job: &str,
        instance: &str,
        extra: &[(&str, &str)],
        bounds: &[f64],
    ) {
        let label = self.labels(job, instance, extra);
        let mut count = 0u64;
        let bucket = bounds
            .iter()
            .map(|&upper| {
                count += (self.value() as u64) % 1000;
                Bucket {
                    cumulative_count: Some(count),
                    upper_bound: Some(upper),
                }
            })
            .collect();
        let metric = Metric {
            label,
            histogram: Some(Histogram {
                sample_count: Some(count + 3),
                sample_sum: Some(self.value()),
                bucket,
            }),
            timestamp_ms: Some(self.timestamp_ms),
            ..Default::default()
        };
        let help = format!("{name}: request latency distribution.");
        self.family(name, &help, MetricType::Histogram)
            .metric
            .push(metric);
    }
}

/// The 500-sample upload of cluster `cluster`, every sample stamped `timestamp_ms`.
pub fn families(cluster: &str, timestamp_ms: i64) -> Vec<MetricFamily> {
    let mut b = Builder {
        cluster: cluster.to_string(),
        timestamp_ms,
        families: Vec::new(),
        seed: cluster.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, c| {
            h.wrapping_mul(31) ^ u64::from(c)
        }) | 1,
    };
    let instances: Vec<String> = (0..NODES)
        .map(|n| format!("10.0.{}.{}:9100", n / 200, 10 + n % 200))
        .collect();
    // Families are grouped by name (all nodes' series of a family together), as an exporter and
    // Prometheus's /federate both send them.
    for instance in &instances {
        for cpu in 0..CPUS {
            let cpu = cpu.to_string();
            for mode in CPU_MODES {
                b.scalar(
                    "node_cpu_seconds_total",
                    MetricType::Counter,
                    instance,
                    &[("cpu", &cpu), ("mode", mode)],
                );
            }
        }
    }
    for field in MEMORY {
        let name = format!("node_memory_{field}_bytes");
        for instance in &instances {
            b.scalar(&name, MetricType::Gauge, instance, &[]);
        }
    }
    for name in FILESYSTEM_FAMILIES {
        for instance in &instances {
            for (device, fstype, mountpoint) in FILESYSTEMS {
                b.scalar(
                    name,
                    MetricType::Gauge,
                    instance,
                    &[
                        ("device", device),
                        ("fstype", fstype),
                        ("mountpoint", mountpoint),
                    ],
                );
            }
        }
    }
    for name in DISK_FAMILIES {
        for instance in &instances {
            for device in DISKS {
                b.scalar(name, MetricType::Counter, instance, &[("device", device)]);
            }
        }
    }
    for name in NETWORK_FAMILIES {
        for instance in &instances {
            for device in NICS {
                b.scalar(name, MetricType::Counter, instance, &[("device", device)]);
            }
        }
    }
    for name in LOADS {
        for instance in &instances {
            b.scalar(name, MetricType::Gauge, instance, &[]);
        }
    }
    for instance in &instances {
        b.histogram(
            "node_exporter_http_request_duration_seconds",
            "node-exporter",
            instance,
            &[("handler", "/metrics")],
            &NODE_BUCKETS,
        );
    }
    for (verb, resource) in API_REQUESTS {
        b.histogram(
            "apiserver_request_duration_seconds",
            "apiserver",
            "10.0.0.1:6443",
            &[("verb", verb), ("resource", resource), ("scope", "cluster")],
            &API_BUCKETS,
        );
    }
    b.families
}

/// The body a client sends for `cluster`: protobuf-delimited, snappy framed.
pub fn upload_body(cluster: &str, timestamp_ms: i64) -> Vec<u8> {
    snappy::encode_framed(&delimited::encode(&families(cluster, timestamp_ms)))
}

/// The same series as text exposition 0.0.4 without timestamps, as the Pushgateway takes them
/// (it refuses pushed timestamps).
pub fn text_body(cluster: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * 1024);
    // Writing into a Vec cannot fail; an error here would leave the body short, which the
    // Pushgateway would answer with an error status that the caller counts.
    let _ = text::encode(&mut out, &families(cluster, now_ms()), false);
    out
}

/// Samples in `families`, counted as Prometheus counts them.
pub fn sample_count(families: &[MetricFamily]) -> usize {
    families.iter().map(MetricFamily::sample_count).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemeter_common::labels;

    #[test]
    fn an_upload_carries_exactly_500_samples_of_the_cluster() {
        let families = families(&cluster_id(7), 1_700_000_000_000);
        assert_eq!(sample_count(&families), SAMPLES_PER_UPLOAD);
        for family in &families {
            assert!(labels::check_metric_name(family.name.as_deref().unwrap_or("")).is_ok());
            for metric in &family.metric {
                assert_eq!(metric.label_value("_id"), Some("bench-00000007"));
                assert!(labels::check_series_labels(metric).is_ok());
                assert_eq!(metric.timestamp_ms, Some(1_700_000_000_000));
            }
        }
    }

    #[test]
    fn family_names_are_not_repeated() {
        let families = families("c", 1);
        let mut names: Vec<_> = families.iter().filter_map(|f| f.name.clone()).collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all);
    }

    #[test]
    fn the_upload_body_round_trips() {
        let body = upload_body("bench-00000001", 5);
        let pd = snappy::decode_framed(&body, 16 << 20).unwrap_or_default();
        let decoded = delimited::decode(&pd, &delimited::Limits::default()).unwrap_or_default();
        assert_eq!(decoded, families("bench-00000001", 5));
    }

    #[test]
    fn the_text_body_parses_to_500_samples() {
        let body = text_body("bench-00000002");
        let parsed = text::parse(&body, &text::Limits::default()).unwrap_or_default();
        assert_eq!(sample_count(&parsed), SAMPLES_PER_UPLOAD);
    }
}
