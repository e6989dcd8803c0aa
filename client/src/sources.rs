//! Several scrape sources in one push (`--from` repeated, `--from NAME=URL`), labelled the way a
//! Prometheus scrape labels its targets so that series of different endpoints never collide.
//!
//! A source whose path is `/federate` is a Prometheus: its series already carry the `job` and
//! `instance` of their own targets, and are pushed as they come. Any other path is an exporter
//! (`/metrics`): every series gets `job` (NAME, or [`DEFAULT_JOB`]) and `instance` (the host:port
//! of the URL, the scheme's default port filled in), and, when several `--from` are given, the
//! target gets an `up` series, 1 when it answered and 0 when it did not, as Prometheus records for
//! every scrape. A single `--from` gets none: when it fails the run fails and nothing is pushed,
//! so its `up` could only ever say 1, and a single-source command line pushes what it always has.
//!
//! The rule for a label the exporter already sets is Prometheus's `honor_labels: true`: the
//! exporter's value is kept (an empty value counts as absent, as in Prometheus). It is the rule a
//! Prometheus federating through us would need anyway, and it never renames what the exporter
//! meant (`exported_job`); keeping endpoints apart is then the configuration's job: two exporters
//! may not share NAME and host:port (refused at start).
//!
//! A source that does not answer is logged and gets `up{job,instance} 0` (a `/federate` source
//! too, with its NAME or `federate` as the job); the others are pushed all the same. Only when
//! every source fails does the cycle fail. The `up` series are kept whatever `--match` says, so a
//! dead endpoint is seen on the server even when the selectors do not name `up`.

use std::fmt;

use telemeter_common::model::{Metric, MetricFamily, MetricType, Untyped};

/// `job` of an exporter given without NAME.
pub const DEFAULT_JOB: &str = "telemeter-client";
/// `job` of the `up` series of a failing `/federate` source given without NAME.
pub const FEDERATE_JOB: &str = "federate";
/// The name of the per-target health series.
pub const UP: &str = "up";

/// One `--from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The NAME of `--from NAME=URL`.
    pub name: Option<String>,
    /// The scrape URL (`/federate` filled in for an empty path).
    pub url: String,
    /// Not a `/federate`: its series get `job` and `instance`, and it gets an `up` series.
    pub exporter: bool,
    /// Its `job` label.
    pub job: String,
    /// Its `instance` label: host:port of the URL.
    pub instance: String,
}

/// Why a `--from` is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError(pub String);

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SourceError {}

/// `NAME=` at the start of a `--from`: a name never holds `:` or `/`, so an URL whose query has
/// `=` is not mistaken for one.
fn split_name(text: &str) -> (Option<&str>, &str) {
    match text.split_once('=') {
        Some((name, url))
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
        {
            (Some(name), url)
        }
        _ => (None, text),
    }
}

/// host:port of `url` (an http:// or https:// URL), the scheme's default port filled in.
pub fn instance_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    // A port follows the last ':' unless that ':' is inside an IPv6 literal's brackets.
    let has_port = match host_port.rfind(':') {
        Some(i) => !host_port[i..].contains(']'),
        None => false,
    };
    if has_port {
        host_port.to_string()
    } else {
        let port = if scheme.eq_ignore_ascii_case("https") {
            443
        } else {
            80
        };
        format!("{host_port}:{port}")
    }
}

impl Source {
    /// Parses one `--from` value, `URL` or `NAME=URL`; `check` validates the URL.
    pub fn parse(
        text: &str,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Source, SourceError> {
        let (name, url) = split_name(text.trim());
        check(url).map_err(SourceError)?;
        let url = crate::config::scrape_url(url);
        let path = url.split('?').next().unwrap_or("");
        let exporter = !path.ends_with("/federate");
        let job = match name {
            Some(n) => n.to_string(),
            None if exporter => DEFAULT_JOB.to_string(),
            None => FEDERATE_JOB.to_string(),
        };
        Ok(Source {
            name: name.map(str::to_string),
            instance: instance_of(&url),
            url,
            exporter,
            job,
        })
    }

    /// Adds `job` and `instance` to every series that lacks them (an exporter's; honor_labels).
    pub fn label(&self, families: &mut [MetricFamily]) {
        if !self.exporter {
            return;
        }
        for metric in families.iter_mut().flat_map(|f| f.metric.iter_mut()) {
            for (name, value) in [("job", &self.job), ("instance", &self.instance)] {
                if metric.label_value(name).is_none_or(str::is_empty) {
                    metric.set_label(name, value);
                }
            }
        }
    }

    /// This source's `up` series at `now_ms`: 1 when it answered.
    pub fn up(&self, answered: bool, now_ms: i64) -> Metric {
        let mut metric = Metric {
            untyped: Some(Untyped {
                value: Some(if answered { 1.0 } else { 0.0 }),
            }),
            timestamp_ms: Some(now_ms),
            ..Metric::default()
        };
        metric.set_label("job", &self.job);
        metric.set_label("instance", &self.instance);
        metric
    }
}

/// Checks that no two exporters share `job` and `instance` (their series would collide).
pub fn check_distinct(sources: &[Source]) -> Result<(), SourceError> {
    for (i, a) in sources.iter().enumerate() {
        for b in &sources[i + 1..] {
            if (a.exporter || b.exporter) && a.job == b.job && a.instance == b.instance {
                return Err(SourceError(format!(
                    "--from {} and --from {} would both be job={:?} instance={:?}: name them apart (--from NAME=URL)",
                    a.url, b.url, a.job, a.instance
                )));
            }
        }
    }
    Ok(())
}

/// The `up` family of `series`, merged into `families`' own `up` (a federated Prometheus sends
/// one) when there is one, so the upload never holds the same family twice.
pub fn add_up(families: &mut Vec<MetricFamily>, series: Vec<Metric>) {
    if series.is_empty() {
        return;
    }
    match families
        .iter_mut()
        .find(|f| f.name.as_deref() == Some(UP) && f.metric_type() == MetricType::Untyped)
    {
        Some(family) => {
            family.metric.extend(series);
            // The server wants a family's timestamps non-decreasing.
            family.metric.sort_by_key(|m| m.timestamp_ms.unwrap_or(0));
        }
        None => families.push(MetricFamily {
            name: Some(UP.to_string()),
            help: Some("1 if the target answered the scrape, 0 if not.".to_string()),
            r#type: Some(MetricType::Untyped as i32),
            metric: series,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &str) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn names_urls_and_instances() {
        let s = Source::parse("node=http://10.0.0.1:9100/metrics", ok).unwrap();
        assert_eq!(s.name.as_deref(), Some("node"));
        assert_eq!(s.job, "node");
        assert_eq!(s.instance, "10.0.0.1:9100");
        assert!(s.exporter);
        let s = Source::parse("http://prom:9090", ok).unwrap();
        assert_eq!(s.url, "http://prom:9090/federate");
        assert!(!s.exporter);
        assert_eq!(s.job, FEDERATE_JOB);
        // An `=` in the query is not a name.
        let s = Source::parse("https://h/metrics?x=1", ok).unwrap();
        assert_eq!(s.name, None);
        assert_eq!(s.url, "https://h/metrics?x=1");
        assert_eq!(s.instance, "h:443");
        assert_eq!(s.job, DEFAULT_JOB);
        assert_eq!(instance_of("http://u:p@[::1]/metrics"), "[::1]:80");
        assert_eq!(instance_of("http://[::1]:9100/metrics"), "[::1]:9100");
    }

    #[test]
    fn exporter_labels_are_added_unless_present() {
        let s = Source::parse("app=http://127.0.0.1:8000/metrics", ok).unwrap();
        let mut a = Metric::default();
        a.set_label("job", "own");
        a.set_label("instance", "");
        let mut families = vec![MetricFamily {
            name: Some("x".into()),
            metric: vec![a, Metric::default()],
            ..MetricFamily::default()
        }];
        s.label(&mut families);
        let m = &families[0].metric;
        assert_eq!(m[0].label_value("job"), Some("own"));
        assert_eq!(m[0].label_value("instance"), Some("127.0.0.1:8000"));
        assert_eq!(m[1].label_value("job"), Some("app"));
        // A /federate source is left as it is.
        let f = Source::parse("http://p:9090", ok).unwrap();
        let mut families = vec![MetricFamily {
            name: Some("x".into()),
            metric: vec![Metric::default()],
            ..MetricFamily::default()
        }];
        f.label(&mut families);
        assert_eq!(families[0].metric[0].label_value("job"), None);
    }

    #[test]
    fn colliding_exporters_are_refused_and_up_merges() {
        let a = Source::parse("http://h:1/metrics", ok).unwrap();
        let b = Source::parse("http://h:1/other", ok).unwrap();
        assert!(check_distinct(&[a.clone(), b]).is_err());
        let c = Source::parse("x=http://h:1/other", ok).unwrap();
        assert!(check_distinct(&[a.clone(), c.clone()]).is_ok());
        let mut families = vec![MetricFamily {
            name: Some(UP.into()),
            r#type: Some(MetricType::Untyped as i32),
            metric: vec![a.up(true, 20)],
            ..MetricFamily::default()
        }];
        add_up(&mut families, vec![c.up(false, 10)]);
        assert_eq!(families.len(), 1);
        assert_eq!(families[0].metric[0].timestamp_ms, Some(10));
        assert_eq!(
            families[0].metric[0].untyped.as_ref().unwrap().value,
            Some(0.0)
        );
    }
}
