//! Command-line flags (upstream names, so existing command lines keep working) and the checked
//! configuration the rest of the client runs from.

use crate::sources::{self, Source};
use clap::Parser;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use telemeter_common::selector::{self, Selector};

/// The selector scraped when neither `--match` nor `--match-file` is given (upstream's default).
pub const DEFAULT_MATCH: &str = r#"{__name__="up"}"#;

/// The default of `--limit-bytes`: 8 MiB. Large enough for ~10,000 federated series in either
/// format, small enough that a misconfigured `--match` cannot make the client buffer gigabytes.
pub const DEFAULT_LIMIT_BYTES: usize = 8 << 20;

/// What `--help` adds after the flags: exit codes and the environment.
pub const AFTER_HELP: &str = "\
Exit codes of --once (a systemd timer or cron job shows anything but 0 as failed):
  0  pushed (the one-line summary is printed on standard error)
  1  the scrape or the push failed (the reason on standard error)
  2  bad flags or configuration
  3  nothing to push: every series was filtered out (check --match and the source)
  4  pushed, but some --from endpoints did not answer (each named on standard error, and
     pushed as up{job,instance} 0); 1 when none answered
With --to-file, 0 means the bundle was written (the line names the file).

Environment:
  RUST_LOG     log filter, e.g. info, debug, telemeter_client=debug (default info; warn with
               --once, whose summary line is printed whatever the filter)
  HTTPS_PROXY, HTTP_PROXY, ALL_PROXY (or lower case)
               proxy for the scrape and the push: the first one set is used for every URL,
               http://, socks5:// ...
  NO_PROXY     hosts that bypass it (comma-separated; .example.com matches subdomains)";

/// `--once` exit code when the cycle left nothing to push.
pub const EXIT_NOTHING_TO_PUSH: u8 = 3;

/// `--once` exit code when the push went out but some `--from` endpoints did not answer.
pub const EXIT_SOURCES_DOWN: u8 = 4;

/// The raw command line.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "telemeter-client",
    version = crate::VERSION_TEXT,
    about = "Scrapes an isolated Prometheus, cleans and anonymizes the series, and pushes them to telemeter-server.",
    long_about = None,
    after_help = AFTER_HELP
)]
pub struct Flags {
    /// The Prometheus to scrape. A URL with an empty path means `<URL>/federate`; any other path
    /// (for example an exporter's `/metrics`) is scraped as given, and its series get `job` (NAME
    /// of `NAME=URL`, else `telemeter-client`) and `instance` (host:port of the URL) unless they
    /// carry their own (Prometheus's honor_labels). Repeat for several endpoints in one push:
    /// then every exporter also gets an `up` series (1 answered, 0 not; kept whatever --match
    /// says), and one that does not answer is logged and pushed as `up{job,instance} 0` while the
    /// others are pushed all the same (see exit code 4).
    #[arg(long, value_name = "[NAME=]URL", required = true)]
    pub from: Vec<String>,

    /// Bearer token sent with the scrape.
    #[arg(long, value_name = "TOKEN")]
    pub from_token: Option<String>,

    /// File holding the bearer token sent with the scrape (surrounding whitespace is trimmed).
    #[arg(long, value_name = "FILE", conflicts_with = "from_token")]
    pub from_token_file: Option<PathBuf>,

    /// PEM file of the CA certificates that sign the scraped server's certificate (system roots
    /// otherwise).
    #[arg(long, value_name = "FILE")]
    pub from_ca_file: Option<PathBuf>,

    /// Base URL of telemeter-server; `/authorize` and `/upload` are appended to it.
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,

    /// Explicit authorize URL (overrides `<--to>/authorize`); `?id=<--id>` is appended.
    #[arg(long, value_name = "URL")]
    pub to_auth: Option<String>,

    /// Explicit upload URL (overrides `<--to>/upload`).
    #[arg(long, value_name = "URL")]
    pub to_upload: Option<String>,

    /// Client token presented to `/authorize` to obtain an upload token.
    #[arg(long, value_name = "TOKEN")]
    pub to_token: Option<String>,

    /// File holding the client token (surrounding whitespace is trimmed).
    #[arg(long, value_name = "FILE", conflicts_with = "to_token")]
    pub to_token_file: Option<PathBuf>,

    /// PEM file of the CA certificates that sign telemeter-server's certificate (system roots
    /// otherwise).
    #[arg(long, value_name = "FILE")]
    pub to_ca_file: Option<PathBuf>,

    /// The cluster id this client pushes as (sent to `/authorize?id=`).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,

    /// Time between pushes in daemon mode, as Prometheus writes durations (`4m30s`). Also the cap
    /// of the back-off after failures.
    #[arg(long, value_name = "DURATION", default_value = "4m30s", value_parser = parse_duration)]
    pub interval: Duration,

    /// A series selector sent as `match[]`; repeat the flag for more. Never split on commas
    /// (selectors hold them), like upstream's `--match`. When neither `--match` nor
    /// `--match-file` is given, `{__name__="up"}` is used.
    #[arg(long = "match", value_name = "SELECTOR")]
    pub matches: Vec<String>,

    /// File of series selectors, one per line (blank lines and `#` comments skipped); added to
    /// those of `--match`.
    #[arg(long, value_name = "FILE")]
    pub match_file: Option<PathBuf>,

    /// Rename metric OLD to NEW. Repeat the flag or give a list (`A=a,B=b`, see `--label`).
    /// Giving any `--rename` replaces the default; `--rename ''` renames nothing.
    #[arg(long, value_name = "OLD=NEW", default_values_t = vec!["ALERTS=alerts".to_string()])]
    pub rename: Vec<String>,

    /// Add label NAME=VALUE to every series, replacing a scraped value. Repeat the flag or give a
    /// comma-separated list (`a=b,c=d`), as upstream reads it: CSV, so an item that holds a comma
    /// is quoted (`'"a=b,c",d=e'`).
    #[arg(long, value_name = "NAME=VALUE")]
    pub label: Vec<String>,

    /// Remove label NAME from every series. Repeat the flag or give a list (`a,b`).
    #[arg(long, value_name = "NAME")]
    pub elide_label: Vec<String>,

    /// Label names whose values are replaced by a salted hash; an empty value (no such label)
    /// stays empty, as upstream leaves it. Repeat the flag or give a list (`instance,pod`).
    /// Requires `--anonymize-salt` or `--anonymize-salt-file`.
    #[arg(long, value_name = "NAMES")]
    pub anonymize_labels: Vec<String>,

    /// The salt of `--anonymize-labels`; the same salt gives the same values as upstream.
    #[arg(long, value_name = "SALT")]
    pub anonymize_salt: Option<String>,

    /// File holding the salt of `--anonymize-labels` (surrounding whitespace is trimmed).
    #[arg(long, value_name = "FILE", conflicts_with = "anonymize_salt")]
    pub anonymize_salt_file: Option<PathBuf>,

    /// Largest scrape body read and largest (compressed) upload body sent, in bytes; over it the
    /// cycle fails with a clear error rather than sending partial data. A reply whose series would
    /// take more than 4 × this in memory once decoded is refused before it is decoded (what
    /// Prometheus sends takes about 1.5 KB a series: about 20,000 series at the default).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_LIMIT_BYTES)]
    pub limit_bytes: usize,

    /// Address of the daemon's own `/healthz`, `/healthz/ready` and `/metrics`; empty turns it
    /// off. Not used with `--once`.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9002")]
    pub listen: String,

    /// Scrape and push once, then exit: 0 on success, 1 with a one-line reason otherwise (for cron
    /// and systemd timers).
    #[arg(long)]
    pub once: bool,

    /// File where the upload token is kept between runs (JSON, mode 0600), so repeated `--once`
    /// runs authorize only when the token expires.
    #[arg(long, value_name = "FILE")]
    pub token_cache: Option<PathBuf>,

    /// Time allowed for each HTTP request (scrape, authorize, upload).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Directory where a push that failed for a reason worth retrying (connection, timeout, 5xx,
    /// 429) is kept as the exact prepared upload; later runs send what is kept, oldest first,
    /// before their own scrape. A 4xx other than 429 is not kept (it would be refused again).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,

    /// Most bytes the spool holds; over it the oldest uploads are dropped (and logged).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SPOOL_MAX_BYTES)]
    pub spool_max_bytes: u64,

    /// Oldest upload the spool keeps; older ones are dropped (and logged). Keep it below the
    /// server's --max-sample-age (24h by default), which would refuse them.
    #[arg(long, value_name = "DURATION", default_value = "12h", value_parser = parse_duration)]
    pub spool_max_age: Duration,

    /// Across an air gap: with `--once`, write the prepared upload (cleaned, anonymized,
    /// compressed: exactly what would be pushed) as a bundle file into DIR instead of pushing it,
    /// then carry DIR to the connected side and run `telemeter-server import FILE…` (or `POST
    /// /import`). Needs no network to the server, so no `--to`: the bundle is authenticated with
    /// a tag keyed by the SHA-256 of the client token (`--to-token(-file)`), which the server
    /// knows from its tokens file. The labels `/authorize` would add cannot be known offline:
    /// the server stamps its partition label (the cluster id) when it imports the bundle.
    #[arg(
        long,
        value_name = "DIR",
        requires = "once",
        conflicts_with_all = ["to", "to_auth", "to_upload", "spool_dir", "token_cache"]
    )]
    pub to_file: Option<PathBuf>,
}

/// The default of `--spool-max-bytes`: 4 MiB, a day of a typical 4m30s push of a few hundred
/// series, small enough for an appliance's flash.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 4 << 20;

fn parse_duration(text: &str) -> Result<Duration, String> {
    telemeter_common::duration::parse(text).map_err(|e| e.to_string())
}

/// Why the flags do not make a usable configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(message.into()))
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The scrape sources, in the order given (at least one).
    pub sources: Vec<Source>,
    /// Bearer token for the scrape.
    pub from_token: Option<String>,
    /// CA file for the scrape.
    pub from_ca_file: Option<PathBuf>,
    /// Authorize URL, without the `id` parameter.
    pub authorize_url: String,
    /// Upload URL.
    pub upload_url: String,
    /// Client token for `/authorize`.
    pub to_token: String,
    /// CA file for the server.
    pub to_ca_file: Option<PathBuf>,
    /// Cluster id.
    pub id: String,
    /// Time between pushes.
    pub interval: Duration,
    /// The selectors, sent as `match[]` and also applied to what comes back.
    pub matches: Vec<Selector>,
    /// Metric renames, old to new.
    pub renames: Vec<(String, String)>,
    /// Labels added to every series.
    pub labels: Vec<(String, String)>,
    /// Labels removed from every series.
    pub elide_labels: Vec<String>,
    /// Labels whose values are anonymized.
    pub anonymize_labels: Vec<String>,
    /// The anonymization salt (empty when nothing is anonymized).
    pub anonymize_salt: String,
    /// Byte cap on the scrape body and the upload body.
    pub limit_bytes: usize,
    /// Address of the daemon's own endpoints; `None` when off.
    pub listen: Option<String>,
    /// One cycle, then exit.
    pub once: bool,
    /// Where the upload token is kept between runs.
    pub token_cache: Option<PathBuf>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Where failed uploads are kept for later runs.
    pub spool_dir: Option<PathBuf>,
    /// Byte bound of the spool.
    pub spool_max_bytes: u64,
    /// Age bound of the spool.
    pub spool_max_age: Duration,
    /// `--to-file`: where bundles are written instead of pushing (then the URLs are empty).
    pub to_file: Option<PathBuf>,
}

fn read_secret(path: &Path, what: &str) -> Result<String, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().to_string()),
        Err(e) => err(format!("cannot read {what} {}: {e}", path.display())),
    }
}

/// Splits one value of a list flag as upstream's flags split it (Go pflag's `StringSlice`, which
/// reads the value as one CSV record): on commas, except inside an item that starts with a double
/// quote, which ends at the next lone quote (`""` is a quote inside it). An empty value is no
/// items; a quote inside an unquoted item, or text after a closing quote, is an error.
pub fn split_list(flag: &str, value: &str) -> Result<Vec<String>, ConfigError> {
    let mut items = Vec::new();
    if value.is_empty() {
        return Ok(items);
    }
    let mut chars = value.chars().peekable();
    loop {
        let mut item = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return err(format!("{flag} {value:?}: a quoted item is not closed")),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        item.push('"');
                    }
                    Some('"') => break,
                    Some(c) => item.push(c),
                }
            }
            items.push(item);
            match chars.next() {
                None => return Ok(items),
                Some(',') => {}
                Some(_) => {
                    return err(format!(
                        "{flag} {value:?}: a quoted item must be followed by a comma or the end"
                    ))
                }
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        items.push(item);
                        return Ok(items);
                    }
                    Some(',') => break,
                    Some('"') => {
                        return err(format!(
                            "{flag} {value:?}: a quote may only open an item (quote a whole item that holds a comma)"
                        ))
                    }
                    Some(c) => item.push(c),
                }
            }
            items.push(item);
        }
    }
}

/// Every item of every occurrence of a list flag, in order.
fn list(flag: &str, values: &[String]) -> Result<Vec<String>, ConfigError> {
    let mut items = Vec::new();
    for value in values {
        items.extend(split_list(flag, value)?);
    }
    Ok(items)
}

fn split_pair(text: &str, flag: &str, shape: &str) -> Result<(String, String), ConfigError> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => err(format!("{flag} {text:?}: expected {shape}")),
    }
}

fn check_http_url(url: &str, flag: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => Ok(()),
        _ => err(format!(
            "{flag} {url:?}: expected an http:// or https:// URL with a host"
        )),
    }
}

/// `url` with `/federate` as its path when the path is empty (upstream's rule for `--from`).
pub fn scrape_url(from: &str) -> String {
    let (base, query) = match from.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (from, None),
    };
    let after_scheme = base.split_once("://").map(|(_, r)| r).unwrap_or(base);
    let path_empty = match after_scheme.find('/') {
        None => true,
        Some(i) => &after_scheme[i..] == "/",
    };
    let mut url = if path_empty {
        format!("{}/federate", base.trim_end_matches('/'))
    } else {
        base.to_string()
    };
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

fn join_url(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

impl Config {
    /// Checks the flags and reads the files they name.
    pub fn from_flags(flags: Flags) -> Result<Config, ConfigError> {
        let mut sources = Vec::with_capacity(flags.from.len());
        for from in &flags.from {
            let source = Source::parse(from, |url| check_http_url(url, "--from").map_err(|e| e.0))
                .map_err(|e| ConfigError(e.0))?;
            sources.push(source);
        }
        sources::check_distinct(&sources).map_err(|e| ConfigError(e.0))?;

        let from_token = match (&flags.from_token, &flags.from_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(p)) => Some(read_secret(p, "--from-token-file")?),
            (None, None) => None,
        };

        let (authorize_url, upload_url) =
            if flags.to_file.is_some() {
                // Nothing is pushed: the bundle is carried to the server instead.
                (String::new(), String::new())
            } else {
                let authorize_url =
                    match (&flags.to_auth, &flags.to) {
                        (Some(u), _) => u.clone(),
                        (None, Some(to)) => join_url(to, "/authorize"),
                        (None, None) => return err(
                            "--to (or both --to-auth and --to-upload, or --to-file) is required",
                        ),
                    };
                let upload_url =
                    match (&flags.to_upload, &flags.to) {
                        (Some(u), _) => u.clone(),
                        (None, Some(to)) => join_url(to, "/upload"),
                        (None, None) => return err(
                            "--to (or both --to-auth and --to-upload, or --to-file) is required",
                        ),
                    };
                check_http_url(&authorize_url, "--to-auth")?;
                check_http_url(&upload_url, "--to-upload")?;
                (authorize_url, upload_url)
            };

        let to_token = match (&flags.to_token, &flags.to_token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(p)) => read_secret(p, "--to-token-file")?,
            (None, None) => return err("--to-token or --to-token-file is required"),
        };
        if to_token.is_empty() {
            return err("the client token (--to-token/--to-token-file) is empty");
        }

        let id = match &flags.id {
            Some(id) if !id.trim().is_empty() => id.trim().to_string(),
            _ => return err("--id (the cluster id to push as) is required"),
        };

        if flags.interval.is_zero() {
            return err("--interval must be greater than 0s");
        }
        if flags.timeout.is_zero() {
            return err("--timeout must be greater than 0s");
        }
        if flags.limit_bytes == 0 {
            return err("--limit-bytes must be greater than 0");
        }

        let mut matches = Vec::new();
        for text in &flags.matches {
            let s = Selector::parse(text).map_err(|e| ConfigError(format!("--match: {e}")))?;
            matches.push(s);
        }
        if let Some(path) = &flags.match_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read --match-file {}: {e}", path.display()))
            })?;
            let parsed = selector::parse_file(&text)
                .map_err(|e| ConfigError(format!("--match-file {}: {e}", path.display())))?;
            matches.extend(parsed);
        }
        if flags.matches.is_empty() && flags.match_file.is_none() {
            let s = Selector::parse(DEFAULT_MATCH)
                .map_err(|e| ConfigError(format!("default --match: {e}")))?;
            matches.push(s);
        }
        if matches.is_empty() {
            return err("--match-file holds no selectors and no --match was given");
        }

        let mut renames = Vec::new();
        // Empty items are skipped, as upstream skips them: `--rename ''` renames nothing.
        for r in list("--rename", &flags.rename)?
            .iter()
            .filter(|r| !r.is_empty())
        {
            let (old, new) = split_pair(r, "--rename", "OLD=NEW")?;
            if !telemeter_common::labels::is_valid_metric_name(&new) {
                return err(format!(
                    "--rename {r:?}: {new:?} is not a valid metric name"
                ));
            }
            renames.push((old, new));
        }

        let mut labels = Vec::new();
        for l in &list("--label", &flags.label)? {
            let (name, value) = split_pair(l, "--label", "NAME=VALUE")?;
            if !telemeter_common::labels::is_valid_label_name(&name) {
                return err(format!("--label {l:?}: {name:?} is not a valid label name"));
            }
            labels.push((name, value));
        }

        let elide_labels: Vec<String> = list("--elide-label", &flags.elide_label)?
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        for name in &elide_labels {
            if !telemeter_common::labels::is_valid_label_name(name) {
                return err(format!("--elide-label {name:?} is not a valid label name"));
            }
        }

        let anonymize_labels: Vec<String> = list("--anonymize-labels", &flags.anonymize_labels)?
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let anonymize_salt = match (&flags.anonymize_salt, &flags.anonymize_salt_file) {
            (Some(s), _) => s.clone(),
            (None, Some(p)) => read_secret(p, "--anonymize-salt-file")?,
            (None, None) => String::new(),
        };
        if !anonymize_labels.is_empty() && anonymize_salt.is_empty() {
            return err("--anonymize-labels needs --anonymize-salt or --anonymize-salt-file");
        }

        let listen = match flags.listen.trim() {
            "" => None,
            l => Some(l.to_string()),
        };

        Ok(Config {
            sources,
            from_token,
            from_ca_file: flags.from_ca_file,
            authorize_url,
            upload_url,
            to_token,
            to_ca_file: flags.to_ca_file,
            id,
            interval: flags.interval,
            matches,
            renames,
            labels,
            elide_labels,
            anonymize_labels,
            anonymize_salt,
            limit_bytes: flags.limit_bytes,
            listen,
            once: flags.once,
            token_cache: flags.token_cache,
            timeout: flags.timeout,
            spool_dir: flags.spool_dir,
            spool_max_bytes: flags.spool_max_bytes,
            spool_max_age: flags.spool_max_age,
            to_file: flags.to_file,
        })
    }
}

#[cfg(test)]
mod tests;
