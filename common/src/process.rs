//! The standard `process_*` metrics every Prometheus client library exports, read from
//! `/proc/self` at each render (no crate), and a binary's `*_build_info`.
//!
//! Same names, types and units as Go's `client_golang` process collector, so the dashboards and
//! alerts operators already have for any exporter work unchanged.

use std::fs;

use crate::instrument::Registry;

/// What `/proc/self/stat` and friends say about this process now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size, in bytes.
    pub resident_bytes: f64,
    /// Virtual memory size, in bytes.
    pub virtual_bytes: f64,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// Reads the fields of a `/proc/<pid>/stat` line, given the clock ticks per second, the page size
/// and the boot time (seconds since the epoch); `None` when the line does not have them.
pub fn parse_stat(
    stat: &str,
    ticks: f64,
    page_bytes: f64,
    boot_seconds: f64,
) -> Option<ProcessStats> {
    // The command name (field 2) is in parentheses and may hold spaces or parentheses itself:
    // the fields that follow start after the last `)`, at field 3.
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse::<f64>().ok() };
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) / ticks,
        start_time_seconds: boot_seconds + field(22)? / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page_bytes,
    })
}

/// This process's stats now; `None` without `/proc` (not Linux) or when it cannot be read.
pub fn stats() -> Option<ProcessStats> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let boot = fs::read_to_string("/proc/stat").ok()?;
    let boot_seconds = boot
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse::<f64>()
        .ok()?;
    // SAFETY: sysconf only reads its argument and returns a value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ticks <= 0 || page <= 0 {
        return None;
    }
    parse_stat(&stat, ticks as f64, page as f64, boot_seconds)
}

/// The file descriptors this process has open now (`/proc/self/fd`, less the one reading it).
pub fn open_fds() -> Option<f64> {
    let entries = fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.count().saturating_sub(1) as f64)
}

/// The soft limit on open file descriptors.
pub fn max_fds() -> Option<f64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    Some(limit.rlim_cur as f64)
}

/// Registers `process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds` and
/// `process_start_time_seconds` in `registry`, each read when rendered (0 when unreadable).
pub fn register_process_metrics(registry: &Registry) {
    let stat = |read: fn(&ProcessStats) -> f64| -> Box<dyn Fn() -> f64 + Send + Sync> {
        Box::new(move || stats().as_ref().map_or(0.0, read))
    };
    registry.counter_fn(
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
        stat(|s| s.cpu_seconds),
    );
    registry.gauge_fn(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        stat(|s| s.resident_bytes),
    );
    registry.gauge_fn(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        stat(|s| s.virtual_bytes),
    );
    registry.gauge_fn(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        stat(|s| s.start_time_seconds),
    );
    registry.gauge_fn(
        "process_open_fds",
        "Number of open file descriptors.",
        Box::new(|| open_fds().unwrap_or(0.0)),
    );
    registry.gauge_fn(
        "process_max_fds",
        "Maximum number of open file descriptors.",
        Box::new(|| max_fds().unwrap_or(0.0)),
    );
}

/// What a binary was built from, for its `*_build_info` and `--version`.
#[derive(Clone, Copy, Debug)]
pub struct BuildInfo {
    /// The crate version.
    pub version: &'static str,
    /// The git revision it was built from (`unknown` when built outside git).
    pub revision: &'static str,
    /// The `rustc --version` that built it.
    pub rustc: &'static str,
}

/// Registers `name` (e.g. `telemeter_server_build_info`): a gauge of 1 labelled with `build`'s
/// version, revision and rustc, as Prometheus's own `prometheus_build_info`.
pub fn register_build_info(registry: &Registry, name: &str, build: BuildInfo) {
    registry
        .gauge(
            name,
            "A metric with a constant '1' value labeled by version, revision and rustc from which the binary was built.",
            &["version", "revision", "rustc"],
        )
        .with(&[build.version, build.revision, build.rustc])
        .set(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_last_parenthesis() {
        // A command name with a space and a parenthesis, as a process may name itself.
        let line = "4242 (tele) meter) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1000 123456789 300 18446744073709551615 0 0 0";
        let stats = parse_stat(line, 100.0, 4096.0, 1_700_000_000.0).unwrap();
        assert_eq!(stats.cpu_seconds, 3.0);
        assert_eq!(stats.start_time_seconds, 1_700_000_010.0);
        assert_eq!(stats.virtual_bytes, 123_456_789.0);
        assert_eq!(stats.resident_bytes, 300.0 * 4096.0);
        assert_eq!(parse_stat("4242 (short) S 1", 100.0, 4096.0, 0.0), None);
    }

    #[test]
    fn this_process_is_read() {
        let stats = stats().unwrap();
        assert!(stats.resident_bytes > 0.0);
        assert!(stats.virtual_bytes >= stats.resident_bytes);
        let now = crate::time::unix_millis(std::time::SystemTime::now()) as f64 / 1000.0;
        assert!(stats.start_time_seconds <= now + 1.0 && stats.start_time_seconds > now - 3600.0);
        assert!(open_fds().unwrap() >= 3.0);
        assert!(max_fds().unwrap() >= open_fds().unwrap());
    }
}
