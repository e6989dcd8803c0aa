//! Log set-up shared by both binaries: `RUST_LOG` filters (default `info`), one line per event with a
//! UTC timestamp, the level and the module, on standard error.

use std::io::Write;
use std::time::SystemTime;

/// Initializes `log` with `env_logger`. Safe to call more than once (later calls do nothing).
pub fn init() {
    init_with(None);
}

/// Like [`init`], but `filter` (as `RUST_LOG` writes it: `debug`, `warn,ureq=info`), when given,
/// overrides `RUST_LOG`: a binary's `-v` or `--log-level` flag says what the operator wants now.
pub fn init_with(filter: Option<&str>) {
    let mut builder = match filter {
        Some(filter) => {
            let mut builder = env_logger::Builder::new();
            builder.parse_filters(filter);
            builder
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    let _ = builder
        .format(|buf, record| {
            writeln!(
                buf,
                "{} {:<5} {}: {}",
                rfc3339_now(),
                record.level(),
                record.target(),
                record.args()
            )
        })
        .try_init();
}

/// The current time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_now() -> String {
    let since = crate::time::since_epoch(SystemTime::now());
    rfc3339(since.as_secs(), since.subsec_millis())
}

/// Formats seconds since the epoch (and milliseconds) as an RFC 3339 UTC timestamp.
pub fn rfc3339(secs: u64, millis: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

// Howard Hinnant's days-to-civil algorithm: the proleptic Gregorian date of a day number.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(
            rfc3339(1_795_392_000 + 3_723, 999),
            "2026-11-23T01:02:03.999Z"
        );
    }
}
