//! What a subcommand prints: one line of `key=value` pairs on stdout, for the bench harness to
//! read, in the order they were added.

use std::fmt;

/// One measurement's figures.
#[derive(Clone, Debug, Default)]
pub struct Report {
    fields: Vec<(String, String)>,
}

impl Report {
    /// An empty report.
    pub fn new() -> Report {
        Report::default()
    }

    /// Adds an integer figure.
    pub fn int(&mut self, key: &str, value: u64) -> &mut Report {
        self.fields.push((key.to_string(), value.to_string()));
        self
    }

    /// Adds a figure with `decimals` digits after the point.
    pub fn float(&mut self, key: &str, value: f64, decimals: usize) -> &mut Report {
        self.fields
            .push((key.to_string(), format!("{value:.decimals$}")));
        self
    }

    /// Adds a word (spaces become `_`, so the line stays splittable on spaces).
    pub fn word(&mut self, key: &str, value: &str) -> &mut Report {
        let value: String = value
            .chars()
            .map(|c| {
                if c.is_whitespace() || c == '=' {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        self.fields.push((key.to_string(), value));
        self
    }

    /// The value recorded under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// CPU seconds (user + system) this process has used so far.
pub fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers and timevals, for which all zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass, which lives across the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_of_pairs() {
        let mut r = Report::new();
        r.int("ok", 3)
            .float("p99_ms", 1.23456, 2)
            .word("first_error", "503 no owner");
        assert_eq!(r.to_string(), "ok=3 p99_ms=1.23 first_error=503_no_owner");
        assert_eq!(r.get("ok"), Some("3"));
        assert_eq!(r.get("missing"), None);
    }

    #[test]
    fn cpu_time_is_counted() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_seconds() > 0.0);
    }
}
