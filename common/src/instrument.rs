//! A small registry of the process's own metrics, rendered in text format for `/metrics`.
//!
//! Counters, gauges and histograms with label values fixed at first use; lock-free updates after
//! that (atomics), one mutex only when a new label combination appears.
//!
//! Mistakes in names or label counts are programmer errors, not input, so registration and
//! [`CounterVec::with`] & co. panic on them with a message naming the metric. Follow Prometheus
//! naming so `promtool check metrics` stays clean: counters end in `_total`, units are base units
//! (`_seconds`, `_bytes`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::sync::lock;
use crate::text::format_float;

/// All metrics of one process.
#[derive(Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<BTreeMap<String, Family>>>,
}

struct Family {
    help: String,
    kind: Kind,
}

enum Kind {
    Counter(Arc<Children<AtomicU64>>),
    Gauge(Arc<Children<AtomicU64>>),
    Histogram(Arc<Children<HistogramCore>>),
    GaugeFn(Box<dyn Fn() -> f64 + Send + Sync>),
    CounterFn(Box<dyn Fn() -> f64 + Send + Sync>),
}

/// The members of one family, by label values (a `BTreeMap` so rendering comes out sorted).
struct Children<T> {
    family: String,
    label_names: Vec<String>,
    members: Mutex<BTreeMap<Vec<String>, Arc<T>>>,
}

impl<T> Children<T> {
    fn new(family: &str, label_names: &[&str]) -> Children<T> {
        Children {
            family: family.to_owned(),
            label_names: label_names.iter().map(|n| (*n).to_owned()).collect(),
            members: Mutex::new(BTreeMap::new()),
        }
    }

    fn members(&self) -> MutexGuard<'_, BTreeMap<Vec<String>, Arc<T>>> {
        // A panic while holding this lock cannot leave the map half-updated (insert is atomic from
        // our point of view), so a poisoned lock is still good to use.
        lock(&self.members)
    }

    fn get_or_insert(&self, label_values: &[&str], make: impl FnOnce() -> T) -> Arc<T> {
        assert!(
            label_values.len() == self.label_names.len(),
            "metric {}: {} label values given for labels {:?}",
            self.family,
            label_values.len(),
            self.label_names
        );
        let key: Vec<String> = label_values.iter().map(|v| (*v).to_owned()).collect();
        self.members()
            .entry(key)
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    fn snapshot(&self) -> Vec<(Vec<String>, Arc<T>)> {
        self.members()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

struct HistogramCore {
    bounds: Arc<[f64]>,
    /// One count per bound, plus the `+Inf` bucket; not cumulative (summed at render time).
    counts: Vec<AtomicU64>,
    sum_bits: AtomicU64,
}

impl HistogramCore {
    fn new(bounds: Arc<[f64]>) -> HistogramCore {
        HistogramCore {
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            bounds,
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }
}

/// A family of counters by label values.
#[derive(Clone)]
pub struct CounterVec {
    children: Arc<Children<AtomicU64>>,
}

/// A family of gauges by label values.
#[derive(Clone)]
pub struct GaugeVec {
    children: Arc<Children<AtomicU64>>,
}

/// A family of histograms by label values.
#[derive(Clone)]
pub struct HistogramVec {
    children: Arc<Children<HistogramCore>>,
    bounds: Arc<[f64]>,
}

/// One counter.
#[derive(Clone)]
pub struct Counter {
    value: Arc<AtomicU64>,
}

/// One gauge.
#[derive(Clone)]
pub struct Gauge {
    bits: Arc<AtomicU64>,
}

/// One histogram.
#[derive(Clone)]
pub struct Histogram {
    core: Arc<HistogramCore>,
}

/// Default latency buckets, in seconds: 1 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    fn families(&self) -> MutexGuard<'_, BTreeMap<String, Family>> {
        lock(&self.families)
    }

    fn register(&self, name: &str, help: &str, label_names: &[&str], kind: Kind) {
        assert!(is_metric_name(name), "invalid metric name {name:?}");
        for (i, label) in label_names.iter().enumerate() {
            assert!(
                is_label_name(label),
                "metric {name}: invalid label name {label:?}"
            );
            assert!(
                !label_names[..i].contains(label),
                "metric {name}: label {label:?} given twice"
            );
        }
        let mut families = self.families();
        assert!(
            !families.contains_key(name),
            "metric {name} registered twice"
        );
        families.insert(
            name.to_owned(),
            Family {
                help: help.to_owned(),
                kind,
            },
        );
    }

    /// Registers a counter family. Names must be valid metric names and unique in the registry.
    pub fn counter(&self, name: &str, help: &str, label_names: &[&str]) -> CounterVec {
        let children = Arc::new(Children::new(name, label_names));
        self.register(name, help, label_names, Kind::Counter(children.clone()));
        let family = CounterVec { children };
        if label_names.is_empty() {
            // A family without labels has exactly one member: show it (as 0) from the start.
            family.with(&[]);
        }
        family
    }

    /// Registers a gauge family.
    pub fn gauge(&self, name: &str, help: &str, label_names: &[&str]) -> GaugeVec {
        let children = Arc::new(Children::new(name, label_names));
        self.register(name, help, label_names, Kind::Gauge(children.clone()));
        let family = GaugeVec { children };
        if label_names.is_empty() {
            family.with(&[]);
        }
        family
    }

    /// Registers a histogram family with `buckets` (upper bounds, ascending; `+Inf` is implied).
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        label_names: &[&str],
        buckets: &[f64],
    ) -> HistogramVec {
        assert!(
            !label_names.contains(&"le"),
            "histogram {name}: the label name \"le\" is reserved for buckets"
        );
        assert!(
            buckets.iter().all(|b| b.is_finite()) && buckets.windows(2).all(|w| w[0] < w[1]),
            "histogram {name}: buckets must be finite and strictly ascending, got {buckets:?}"
        );
        let children = Arc::new(Children::new(name, label_names));
        self.register(name, help, label_names, Kind::Histogram(children.clone()));
        let family = HistogramVec {
            children,
            bounds: buckets.into(),
        };
        if label_names.is_empty() {
            family.with(&[]);
        }
        family
    }

    /// Registers a gauge whose value is read by calling `read` at render time.
    pub fn gauge_fn(&self, name: &str, help: &str, read: Box<dyn Fn() -> f64 + Send + Sync>) {
        self.register(name, help, &[], Kind::GaugeFn(read));
    }

    /// Registers a counter whose value is read by calling `read` at render time (one the process
    /// keeps elsewhere, such as its CPU time).
    pub fn counter_fn(&self, name: &str, help: &str, read: Box<dyn Fn() -> f64 + Send + Sync>) {
        self.register(name, help, &[], Kind::CounterFn(read));
    }

    /// Every metric in text format 0.0.4, families sorted by name, `promtool check metrics` clean.
    pub fn render(&self) -> String {
        let families = self.families();
        let mut out = String::new();
        for (name, family) in families.iter() {
            match &family.kind {
                Kind::Counter(children) => {
                    let members = children.snapshot();
                    if members.is_empty() {
                        continue;
                    }
                    header(&mut out, name, &family.help, "counter");
                    for (values, value) in members {
                        let labels = label_set(&children.label_names, &values, None);
                        let _ = writeln!(out, "{name}{labels} {}", value.load(Ordering::Relaxed));
                    }
                }
                Kind::Gauge(children) => {
                    let members = children.snapshot();
                    if members.is_empty() {
                        continue;
                    }
                    header(&mut out, name, &family.help, "gauge");
                    for (values, bits) in members {
                        let labels = label_set(&children.label_names, &values, None);
                        let value = f64::from_bits(bits.load(Ordering::Relaxed));
                        let _ = writeln!(out, "{name}{labels} {}", format_float(value));
                    }
                }
                Kind::GaugeFn(read) => {
                    header(&mut out, name, &family.help, "gauge");
                    let _ = writeln!(out, "{name} {}", format_float(read()));
                }
                Kind::CounterFn(read) => {
                    header(&mut out, name, &family.help, "counter");
                    let _ = writeln!(out, "{name} {}", format_float(read()));
                }
                Kind::Histogram(children) => {
                    let members = children.snapshot();
                    if members.is_empty() {
                        continue;
                    }
                    header(&mut out, name, &family.help, "histogram");
                    for (values, core) in members {
                        render_histogram(&mut out, name, &children.label_names, &values, &core);
                    }
                }
            }
        }
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let mut escaped = String::with_capacity(help.len());
    for c in help.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    let _ = writeln!(out, "# HELP {name} {escaped}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn render_histogram(
    out: &mut String,
    name: &str,
    label_names: &[String],
    values: &[String],
    core: &HistogramCore,
) {
    let mut cumulative = 0u64;
    for (i, count) in core.counts.iter().enumerate() {
        cumulative += count.load(Ordering::Relaxed);
        let le = match core.bounds.get(i) {
            Some(bound) => format_float(*bound),
            None => "+Inf".to_owned(),
        };
        let labels = label_set(label_names, values, Some(&le));
        let _ = writeln!(out, "{name}_bucket{labels} {cumulative}");
    }
    let labels = label_set(label_names, values, None);
    let sum = f64::from_bits(core.sum_bits.load(Ordering::Relaxed));
    let _ = writeln!(out, "{name}_sum{labels} {}", format_float(sum));
    // The count is the +Inf bucket, so the two always agree even while observations race.
    let _ = writeln!(out, "{name}_count{labels} {cumulative}");
}

/// `{a="x",b="y"}` (with `le` last when given), or nothing when there are no labels.
fn label_set(names: &[String], values: &[String], le: Option<&str>) -> String {
    if names.is_empty() && le.is_none() {
        return String::new();
    }
    let mut out = String::from("{");
    let pairs = names
        .iter()
        .map(String::as_str)
        .zip(values.iter().map(String::as_str))
        .chain(le.map(|le| ("le", le)));
    for (i, (name, value)) in pairs.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// Adds `delta` to an f64 stored as bits.
fn add_float(bits: &AtomicU64, delta: f64) {
    let _ = bits.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
        Some((f64::from_bits(old) + delta).to_bits())
    });
}

impl CounterVec {
    /// The counter for these label values (in the order of the family's label names).
    pub fn with(&self, label_values: &[&str]) -> Counter {
        Counter {
            value: self
                .children
                .get_or_insert(label_values, || AtomicU64::new(0)),
        }
    }
}

impl GaugeVec {
    /// The gauge for these label values.
    pub fn with(&self, label_values: &[&str]) -> Gauge {
        Gauge {
            bits: self
                .children
                .get_or_insert(label_values, || AtomicU64::new(0f64.to_bits())),
        }
    }
}

impl HistogramVec {
    /// The histogram for these label values.
    pub fn with(&self, label_values: &[&str]) -> Histogram {
        let bounds = self.bounds.clone();
        Histogram {
            core: self
                .children
                .get_or_insert(label_values, || HistogramCore::new(bounds)),
        }
    }
}

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1)
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

impl Gauge {
    /// Sets the value.
    pub fn set(&self, value: f64) {
        self.bits.store(value.to_bits(), Ordering::Relaxed);
    }

    /// Adds `delta` (may be negative).
    pub fn add(&self, delta: f64) {
        add_float(&self.bits, delta);
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, value: f64) {
        // `le` means "less than or equal"; NaN compares false everywhere and lands in +Inf.
        let index = self
            .core
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.core.bounds.len());
        if let Some(count) = self.core.counts.get(index) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        add_float(&self.core.sum_bits, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_registry() -> Registry {
        let registry = Registry::new();
        let uploads = registry.counter(
            "telemeter_uploads_total",
            "Uploads by result.",
            &["result", "code"],
        );
        uploads.with(&["rejected", "400"]).add(2);
        uploads.with(&["accepted", "200"]).inc();
        let members = registry.gauge("telemeter_members", "Cluster members.", &[]);
        members.with(&[]).set(3.0);
        members.with(&[]).add(-0.5);
        let latency = registry.histogram(
            "telemeter_store_write_seconds",
            "Store write latency.",
            &["kind"],
            &[0.1, 1.0],
        );
        latency.with(&["upload"]).observe(0.05);
        latency.with(&["upload"]).observe(0.5);
        latency.with(&["upload"]).observe(7.0);
        registry.gauge_fn(
            "telemeter_build_info",
            "Always 1; \\ and\nnewline in help.",
            Box::new(|| 1.0),
        );
        let odd = registry.counter("a_odd_total", "Escaping.", &["path"]);
        odd.with(&["a\"b\\c\nd"]).inc();
        registry
    }

    #[test]
    fn renders_the_exact_text_format() {
        let expected = "\
# HELP a_odd_total Escaping.
# TYPE a_odd_total counter
a_odd_total{path=\"a\\\"b\\\\c\\nd\"} 1
# HELP telemeter_build_info Always 1; \\\\ and\\nnewline in help.
# TYPE telemeter_build_info gauge
telemeter_build_info 1
# HELP telemeter_members Cluster members.
# TYPE telemeter_members gauge
telemeter_members 2.5
# HELP telemeter_store_write_seconds Store write latency.
# TYPE telemeter_store_write_seconds histogram
telemeter_store_write_seconds_bucket{kind=\"upload\",le=\"0.1\"} 1
telemeter_store_write_seconds_bucket{kind=\"upload\",le=\"1\"} 2
telemeter_store_write_seconds_bucket{kind=\"upload\",le=\"+Inf\"} 3
telemeter_store_write_seconds_sum{kind=\"upload\"} 7.55
telemeter_store_write_seconds_count{kind=\"upload\"} 3
# HELP telemeter_uploads_total Uploads by result.
# TYPE telemeter_uploads_total counter
telemeter_uploads_total{result=\"accepted\",code=\"200\"} 1
telemeter_uploads_total{result=\"rejected\",code=\"400\"} 2
";
        assert_eq!(small_registry().render(), expected);
    }

    #[test]
    fn counters_and_gauges_read_back() {
        let registry = Registry::new();
        let c = registry.counter("x_total", "x", &["a"]);
        c.with(&["1"]).add(5);
        // The same label values reach the same counter.
        assert_eq!(c.with(&["1"]).get(), 5);
        assert_eq!(c.with(&["2"]).get(), 0);
        let g = registry.gauge("y", "y", &[]).with(&[]);
        g.set(-1.5);
        g.add(0.25);
        assert_eq!(g.get(), -1.25);
    }

    #[test]
    fn labelled_families_without_members_are_left_out() {
        let registry = Registry::new();
        registry.counter("x_total", "x", &["a"]);
        assert_eq!(registry.render(), "");
    }

    #[test]
    fn special_values_are_spelled_as_prometheus_does() {
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(0.0025), "0.0025");
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn duplicate_registration_panics() {
        let registry = Registry::new();
        registry.counter("x_total", "x", &[]);
        registry.gauge("x_total", "x", &[]);
    }

    #[test]
    #[should_panic(expected = "label values given")]
    fn wrong_label_count_panics() {
        Registry::new().counter("x_total", "x", &["a"]).with(&[]);
    }

    #[test]
    #[should_panic(expected = "invalid metric name")]
    fn invalid_name_panics() {
        Registry::new().counter("1x", "x", &[]);
    }

    #[test]
    fn promtool_accepts_the_rendering() {
        let registry = small_registry();
        // Latency buckets too, so the default constant renders cleanly.
        registry
            .histogram(
                "telemeter_federate_duration_seconds",
                "Federate duration.",
                &[],
                LATENCY_BUCKETS,
            )
            .with(&[])
            .observe(0.003);
        let (code, said) = crate::promtool::check_metrics(registry.render().into_bytes());
        assert_eq!(code, 0, "promtool: {said}");
        assert_eq!(said.trim(), "", "promtool linted: {said}");
    }
}
