//! Command-line flags and the validated configuration the server runs with.
//!
//! Flag names keep upstream telemeter-server's, so existing deployments keep their command lines.
//! [`Flags`] is what clap parses; [`Flags::into_config`] checks what clap cannot (durations, label
//! pairs, selector files, that a client token source exists) and yields a [`Config`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use telemeter_common::duration;
use telemeter_common::labels;
use telemeter_common::selector::{self, Selector};

use crate::remote_write::RemoteWriteConfig;

/// The flags of `telemeter-server`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "telemeter-server",
    version,
    about = "Receives pushed Prometheus metrics from telemeter clients, stores them durably and serves them on /federate."
)]
pub struct Flags {
    /// Address of the external port, where clients call /authorize and /upload.
    #[arg(long, default_value = "0.0.0.0:9003", value_name = "HOST:PORT")]
    pub listen: String,

    /// Address of the internal port, serving /federate and /metrics without authentication: keep it
    /// on a private network.
    #[arg(long, default_value = "127.0.0.1:9004", value_name = "HOST:PORT")]
    pub listen_internal: String,

    /// PEM private key for TLS on the external port (give --tls-crt too).
    #[arg(long, value_name = "FILE", requires = "tls_crt")]
    pub tls_key: Option<PathBuf>,

    /// PEM certificate chain for TLS on the external port (give --tls-key too).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_crt: Option<PathBuf>,

    /// PEM private key for TLS on the internal port (give --internal-tls-crt too).
    #[arg(long, value_name = "FILE", requires = "internal_tls_crt")]
    pub internal_tls_key: Option<PathBuf>,

    /// PEM certificate chain for TLS on the internal port (give --internal-tls-key too).
    #[arg(long, value_name = "FILE", requires = "internal_tls_key")]
    pub internal_tls_crt: Option<PathBuf>,

    /// File whose contents (at least 32 bytes, any format) are the secret every server of a cluster
    /// shares; upload tokens are signed with a key derived from it. Without it a random key is made
    /// at start, and tokens stop working when the process ends.
    #[arg(long, value_name = "FILE")]
    pub shared_key: Option<PathBuf>,

    /// Lifetime of the upload tokens /authorize hands out, in seconds.
    #[arg(long, default_value_t = 86_400, value_name = "SECONDS")]
    pub token_expire_seconds: u64,

    /// URL of an upstream authorization service ("tollbooth" protocol) that checks client tokens.
    #[arg(long, value_name = "URL", conflicts_with = "tokens_file")]
    pub authorize: Option<String>,

    /// File mapping client tokens to the cluster ids they may push for: JSON
    /// `[{"token":"...","clusters":["id1","*"]}]`, or one `TOKEN ID1,ID2` (or `TOKEN *`) per line.
    #[arg(long, value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Accept any client token for any cluster id. For tests only: anyone can then push as anyone.
    #[arg(long, conflicts_with_all = ["authorize", "tokens_file"])]
    pub insecure_accept_any_token: bool,

    /// The label that names the cluster on every stored series; the server sets it from the token.
    #[arg(long, default_value = "_id", value_name = "NAME")]
    pub partition_label: String,

    /// A label added to every stored series (repeatable), as NAME=VALUE.
    #[arg(long = "label", value_name = "NAME=VALUE")]
    pub labels: Vec<String>,

    /// A label written into every upload token and required on (or set on) every series of that
    /// cluster (repeatable), as NAME=VALUE. A series carrying another value is refused (403).
    #[arg(long = "required-label", value_name = "NAME=VALUE")]
    pub required_labels: Vec<String>,

    /// A series selector, like `up{job="x"}`; only series matching at least one --whitelist or
    /// --whitelist-file selector are stored (repeatable). None given: every series is stored.
    #[arg(long = "whitelist", value_name = "SELECTOR")]
    pub whitelist: Vec<String>,

    /// A file of series selectors, one per line (`#` comments and blank lines skipped), added to
    /// --whitelist.
    #[arg(long, value_name = "FILE")]
    pub whitelist_file: Option<PathBuf>,

    /// Each cluster may store one upload per this window (Prometheus duration); more are answered
    /// 429 with Retry-After. 0s turns the limit off.
    #[arg(long, default_value = "4m30s", value_name = "DURATION")]
    pub ratelimit: String,

    /// A cluster is served on /federate only while the newest sample timestamp of its last
    /// upload is younger than this (Prometheus duration), however recently the upload arrived;
    /// then its file is removed. As upstream: samples older than now minus the TTL are dropped.
    #[arg(long, default_value = "10m", value_name = "DURATION")]
    pub ttl: String,

    /// Directory holding one file per cluster (created if missing; locked while the server runs).
    #[arg(long, value_name = "DIR")]
    pub storage_path: PathBuf,

    /// Largest upload body accepted as sent (compressed), in bytes; larger ones get 413.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub max_upload_bytes: usize,

    /// Largest upload body accepted after snappy decompression, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 16 << 20, value_name = "BYTES")]
    pub max_decompressed_bytes: usize,

    /// Most series one upload may carry; more get 413.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub max_series: usize,

    /// Samples older than this (Prometheus duration) make the upload fail with 400.
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub max_sample_age: String,

    /// Samples further in the future than this (Prometheus duration) make the upload fail with 400.
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub max_future_skew: String,

    /// Worker threads running request handlers on each port (default: 256). Most of them wait for
    /// their upload's group commit to be durable, which costs a thread stack and nothing else:
    /// decoding and validation run at most one per core whatever this is, and the payloads
    /// waiting for the store are capped at 256 MiB in all, so memory is bounded by bodies in
    /// flight + one decoded body per core + 256 MiB, not by this number.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Most connections open at once on each port; more are answered 503 and closed.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,

    /// Also ship every upload this server stores, with its original timestamps, as Prometheus
    /// remote-write 1.0 to this URL (Prometheus with --web.enable-remote-write-receiver, Thanos
    /// receive, Mimir, Cortex, VictoriaMetrics).
    #[arg(long, value_name = "URL")]
    pub remote_write_url: Option<String>,

    /// Most uploads waiting to be sent to --remote-write-url; when full, the oldest is dropped.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub remote_write_queue: usize,

    /// Time allowed for one remote-write request (Prometheus duration).
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub remote_write_timeout: String,

    /// PEM CA certificates trusted for an https:// --remote-write-url (default: the system roots).
    #[arg(long, value_name = "FILE")]
    pub remote_write_ca_file: Option<PathBuf>,

    /// A file holding a bearer token sent with every remote-write request.
    #[arg(long, value_name = "FILE")]
    pub remote_write_bearer_token_file: Option<PathBuf>,

    /// UDP address for cluster heartbeats. Clustering is off without it (upstream's behaviour).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen_cluster: Option<String>,

    /// A peer's --listen-cluster address (repeatable). Peers not listed here are still accepted when
    /// their heartbeats carry a valid MAC under the shared key.
    #[arg(long = "join", value_name = "HOST:PORT", requires = "listen_cluster")]
    pub join: Vec<String>,

    /// This server's name in the cluster, unique among its peers (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// The internal address peers forward pushes to (default: --listen-internal as bound; required
    /// when that is a wildcard address such as 0.0.0.0).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise_internal: Option<String>,

    /// Time between two heartbeats to each peer (Prometheus duration).
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub gossip_interval: String,

    /// A peer silent for this long is dead and its clusters move to other servers.
    #[arg(long, default_value = "3s", value_name = "DURATION")]
    pub peer_timeout: String,
}

/// The cluster part of the configuration (present when --listen-cluster is given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterFlags {
    /// UDP address to bind.
    pub listen_cluster: String,
    /// Peers' cluster addresses.
    pub join: Vec<String>,
    /// This node's name.
    pub name: String,
    /// The internal address to advertise, when given.
    pub advertise_internal: Option<String>,
    /// Heartbeat interval.
    pub gossip_interval: Duration,
    /// Peer timeout.
    pub peer_timeout: Duration,
}

/// Where client tokens are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// A tokens file.
    File(PathBuf),
    /// An upstream authorization service at this URL.
    Tollbooth(String),
    /// Any token is accepted (testing only).
    AnyToken,
}

/// A certificate chain and key pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The PEM certificate chain.
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
}

/// The validated configuration of one server.
#[derive(Clone, Debug)]
pub struct Config {
    /// External address.
    pub listen: String,
    /// Internal address.
    pub listen_internal: String,
    /// TLS of the external port.
    pub tls: Option<TlsFiles>,
    /// TLS of the internal port.
    pub internal_tls: Option<TlsFiles>,
    /// The shared key file, if any.
    pub shared_key: Option<PathBuf>,
    /// Upload token lifetime.
    pub token_lifetime: Duration,
    /// Where client tokens are checked.
    pub token_source: TokenSource,
    /// The partition label name.
    pub partition_label: String,
    /// Labels added to every series.
    pub labels: Vec<(String, String)>,
    /// Labels put into tokens and required on series.
    pub required_labels: Vec<(String, String)>,
    /// Whitelist selectors; empty = accept all.
    pub whitelist: Vec<Selector>,
    /// Rate limit window; zero = off.
    pub ratelimit: Duration,
    /// How long a cluster is served after its last push.
    pub ttl: Duration,
    /// The storage directory.
    pub storage_path: PathBuf,
    /// Compressed body cap.
    pub max_upload_bytes: usize,
    /// Decompressed body cap.
    pub max_decompressed_bytes: usize,
    /// Series cap per upload.
    pub max_series: usize,
    /// Oldest sample accepted, relative to now.
    pub max_sample_age: Duration,
    /// Furthest future sample accepted, relative to now.
    pub max_future_skew: Duration,
    /// Worker threads per port (None = [`crate::server::DEFAULT_WORKERS`]).
    pub workers: Option<usize>,
    /// Connection cap per port.
    pub max_connections: usize,
    /// Clustering, when on.
    pub cluster: Option<ClusterFlags>,
    /// Where stored uploads are also shipped, if anywhere.
    pub remote_write: Option<RemoteWriteConfig>,
}

/// Why the flags do not make a usable configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// Neither --tokens-file, --authorize nor --insecure-accept-any-token.
    NoTokenSource,
    /// A flag's value is invalid.
    Invalid {
        /// The flag, with dashes.
        flag: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A file named by a flag could not be read.
    Read {
        /// The flag.
        flag: &'static str,
        /// The path.
        path: PathBuf,
        /// The error, as text.
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::NoTokenSource => f.write_str(
                "no client token source: give --tokens-file or --authorize, or --insecure-accept-any-token for testing",
            ),
            ConfigError::Invalid { flag, reason } => write!(f, "{flag}: {reason}"),
            ConfigError::Read { flag, path, reason } => {
                write!(f, "{flag}: reading {}: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl Flags {
    /// Checks the flags and builds the configuration (reading `--whitelist-file`).
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let token_source = match (&self.tokens_file, &self.authorize) {
            (Some(path), _) => TokenSource::File(path.clone()),
            (None, Some(url)) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(ConfigError::Invalid {
                        flag: "--authorize",
                        reason: format!("{url:?} is not an http:// or https:// URL"),
                    });
                }
                TokenSource::Tollbooth(url.clone())
            }
            (None, None) if self.insecure_accept_any_token => TokenSource::AnyToken,
            (None, None) => return Err(ConfigError::NoTokenSource),
        };
        if !labels::is_valid_label_name(&self.partition_label) {
            return Err(ConfigError::Invalid {
                flag: "--partition-label",
                reason: format!("{:?} is not a valid label name", self.partition_label),
            });
        }
        let labels = parse_label_pairs("--label", &self.labels)?;
        let required_labels = parse_label_pairs("--required-label", &self.required_labels)?;
        // Every series carries these: one /federate could not serve would refuse every upload.
        let added = std::iter::once(("--partition-label", &self.partition_label))
            .chain(labels.iter().map(|(name, _)| ("--label", name)))
            .chain(
                required_labels
                    .iter()
                    .map(|(name, _)| ("--required-label", name)),
            );
        for (flag, name) in added {
            if let Some(reason) = crate::validate::server_label_problem(name) {
                return Err(ConfigError::Invalid { flag, reason });
            }
        }
        for (name, _) in labels.iter().chain(&required_labels) {
            if *name == self.partition_label {
                return Err(ConfigError::Invalid {
                    flag: "--label",
                    reason: format!(
                        "{name:?} is the partition label, which the server sets itself"
                    ),
                });
            }
        }
        // A series would be required to carry one value and then be given the other.
        if let Some((name, _)) = labels
            .iter()
            .find(|(name, _)| required_labels.iter().any(|(r, _)| r == name))
        {
            return Err(ConfigError::Invalid {
                flag: "--label",
                reason: format!("{name:?} is also a --required-label"),
            });
        }

        let mut whitelist = Vec::new();
        for text in &self.whitelist {
            whitelist.push(Selector::parse(text).map_err(|e| ConfigError::Invalid {
                flag: "--whitelist",
                reason: e.to_string(),
            })?);
        }
        if let Some(path) = &self.whitelist_file {
            let contents = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                flag: "--whitelist-file",
                path: path.clone(),
                reason: e.to_string(),
            })?;
            whitelist.extend(selector::parse_file(&contents).map_err(|e| {
                ConfigError::Invalid {
                    flag: "--whitelist-file",
                    reason: e.to_string(),
                }
            })?);
        }

        let remote_write = match self.remote_write_url {
            None => None,
            Some(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(ConfigError::Invalid {
                        flag: "--remote-write-url",
                        reason: format!("{url:?} is not an http:// or https:// URL"),
                    });
                }
                if self.remote_write_queue == 0 {
                    return Err(ConfigError::Invalid {
                        flag: "--remote-write-queue",
                        reason: "must be greater than 0".into(),
                    });
                }
                let timeout = parse_duration("--remote-write-timeout", &self.remote_write_timeout)?;
                if timeout.is_zero() {
                    return Err(ConfigError::Invalid {
                        flag: "--remote-write-timeout",
                        reason: "must be greater than 0s".into(),
                    });
                }
                Some(RemoteWriteConfig {
                    url,
                    queue_capacity: self.remote_write_queue,
                    timeout,
                    ca_file: self.remote_write_ca_file,
                    bearer_token_file: self.remote_write_bearer_token_file,
                })
            }
        };

        let positive = |flag: &'static str, n: usize| {
            if n == 0 {
                Err(ConfigError::Invalid {
                    flag,
                    reason: "must be greater than 0".into(),
                })
            } else {
                Ok(n)
            }
        };
        let has_shared_key = self.shared_key.is_some();
        let has_internal_tls = self.internal_tls_key.is_some();
        Ok(Config {
            listen: self.listen,
            listen_internal: self.listen_internal,
            tls: pair(self.tls_crt, self.tls_key),
            internal_tls: pair(self.internal_tls_crt, self.internal_tls_key),
            shared_key: self.shared_key,
            token_lifetime: Duration::from_secs(self.token_expire_seconds),
            token_source,
            partition_label: self.partition_label,
            labels,
            required_labels,
            whitelist,
            ratelimit: parse_duration("--ratelimit", &self.ratelimit)?,
            ttl: parse_duration("--ttl", &self.ttl)?,
            storage_path: self.storage_path,
            max_upload_bytes: positive("--max-upload-bytes", self.max_upload_bytes)?,
            max_decompressed_bytes: positive(
                "--max-decompressed-bytes",
                self.max_decompressed_bytes,
            )?,
            max_series: positive("--max-series", self.max_series)?,
            max_sample_age: parse_duration("--max-sample-age", &self.max_sample_age)?,
            max_future_skew: parse_duration("--max-future-skew", &self.max_future_skew)?,
            workers: match self.workers {
                Some(n) => Some(positive("--workers", n)?),
                None => None,
            },
            max_connections: positive("--max-connections", self.max_connections)?,
            remote_write,
            cluster: match self.listen_cluster {
                None => None,
                Some(listen_cluster) => {
                    if has_internal_tls {
                        return Err(ConfigError::Invalid {
                            flag: "--listen-cluster",
                            reason: "servers forward pushes to each other's internal port over plain HTTP (signed); TLS on the internal port (--internal-tls-*) is not supported with clustering yet".into(),
                        });
                    }
                    if !has_shared_key {
                        return Err(ConfigError::Invalid {
                            flag: "--listen-cluster",
                            reason: "clustering needs --shared-key: every server must sign and verify with the same key".into(),
                        });
                    }
                    let name = match self.name {
                        Some(name) => name,
                        None => host_name().ok_or_else(|| ConfigError::Invalid {
                            flag: "--name",
                            reason: "the host name is unavailable: give --name".into(),
                        })?,
                    };
                    if name.is_empty() || name.len() > 255 {
                        return Err(ConfigError::Invalid {
                            flag: "--name",
                            reason: "must be 1 to 255 bytes".into(),
                        });
                    }
                    let gossip_interval =
                        parse_duration("--gossip-interval", &self.gossip_interval)?;
                    let peer_timeout = parse_duration("--peer-timeout", &self.peer_timeout)?;
                    if gossip_interval.is_zero() || peer_timeout <= gossip_interval {
                        return Err(ConfigError::Invalid {
                            flag: "--peer-timeout",
                            reason: "must be longer than --gossip-interval, which must be above 0"
                                .into(),
                        });
                    }
                    Some(ClusterFlags {
                        listen_cluster,
                        join: self.join,
                        name,
                        advertise_internal: self.advertise_internal,
                        gossip_interval,
                        peer_timeout,
                    })
                }
            },
        })
    }
}

/// The host name, if the system has a usable one.
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates when it fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(buf.get(..len)?).ok()?;
    (!name.is_empty()).then(|| name.to_owned())
}

fn pair(cert: Option<PathBuf>, key: Option<PathBuf>) -> Option<TlsFiles> {
    match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    }
}

fn parse_duration(flag: &'static str, text: &str) -> Result<Duration, ConfigError> {
    duration::parse(text).map_err(|e| ConfigError::Invalid {
        flag,
        reason: e.to_string(),
    })
}

/// Parses `NAME=VALUE` pairs, checking the name is a valid label name and the value non-empty.
pub fn parse_label_pairs(
    flag: &'static str,
    pairs: &[String],
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for text in pairs {
        let invalid = |reason: String| ConfigError::Invalid { flag, reason };
        let Some((name, value)) = text.split_once('=') else {
            return Err(invalid(format!("{text:?} is not NAME=VALUE")));
        };
        if !labels::is_valid_label_name(name) {
            return Err(invalid(format!("{name:?} is not a valid label name")));
        }
        if value.is_empty() || value.len() > labels::MAX_VALUE_BYTES {
            return Err(invalid(format!(
                "the value of {name:?} must be 1 to {} bytes",
                labels::MAX_VALUE_BYTES
            )));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(invalid(format!("{name:?} is given twice")));
        }
        out.push((name.to_string(), value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut all = vec!["telemeter-server", "--storage-path", "/tmp/x"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).expect("flags parse")
    }

    #[test]
    fn flag_definitions_are_consistent() {
        use clap::CommandFactory;
        Flags::command().debug_assert();
        // Every flag explains itself in --help.
        for arg in Flags::command().get_arguments() {
            assert!(arg.get_help().is_some(), "{} has no help", arg.get_id());
        }
    }

    #[test]
    fn needs_a_token_source() {
        let err = flags(&[]).into_config().unwrap_err();
        assert_eq!(err, ConfigError::NoTokenSource);
        assert!(err.to_string().contains("--insecure-accept-any-token"));
    }

    #[test]
    fn token_sources_exclude_each_other() {
        let r = Flags::try_parse_from([
            "telemeter-server",
            "--storage-path",
            "/x",
            "--tokens-file",
            "/t",
            "--insecure-accept-any-token",
        ]);
        assert!(r.is_err());
    }

    #[test]
    fn label_pairs_are_checked() {
        assert_eq!(
            parse_label_pairs("--label", &["a=b".into(), "c=d=e".into()]).unwrap(),
            vec![("a".into(), "b".into()), ("c".into(), "d=e".into())]
        );
        assert!(parse_label_pairs("--label", &["ab".into()]).is_err());
        assert!(parse_label_pairs("--label", &["1a=b".into()]).is_err());
        assert!(parse_label_pairs("--label", &["a=".into()]).is_err());
        assert!(parse_label_pairs("--label", &["a=b".into(), "a=c".into()]).is_err());
    }

    #[test]
    fn tls_flags_come_in_pairs() {
        let r = Flags::try_parse_from([
            "telemeter-server",
            "--storage-path",
            "/x",
            "--tls-key",
            "/k",
        ]);
        assert!(r.is_err());
    }

    #[test]
    fn defaults_follow_upstream() {
        let c = flags(&["--insecure-accept-any-token"])
            .into_config()
            .unwrap();
        assert_eq!(c.listen, "0.0.0.0:9003");
        assert_eq!(c.listen_internal, "127.0.0.1:9004");
        assert_eq!(c.ratelimit, Duration::from_secs(270));
        assert_eq!(c.ttl, Duration::from_secs(600));
        assert_eq!(c.max_sample_age, Duration::from_secs(86_400));
        assert_eq!(c.token_lifetime, Duration::from_secs(86_400));
        assert_eq!(c.partition_label, "_id");
        assert_eq!(c.token_source, TokenSource::AnyToken);
        assert!(c.whitelist.is_empty());
    }

    #[test]
    fn cluster_flags() {
        let c = flags(&["--insecure-accept-any-token"])
            .into_config()
            .unwrap();
        assert_eq!(c.cluster, None);
        let err = flags(&[
            "--insecure-accept-any-token",
            "--listen-cluster",
            "127.0.0.1:9005",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("--shared-key"), "{err}");
        let c = flags(&[
            "--insecure-accept-any-token",
            "--shared-key",
            "/k",
            "--listen-cluster",
            "127.0.0.1:9005",
            "--join",
            "10.0.0.2:9005",
            "--join",
            "10.0.0.3:9005",
            "--name",
            "a",
            "--peer-timeout",
            "5s",
        ])
        .into_config()
        .unwrap();
        assert_eq!(
            c.cluster,
            Some(ClusterFlags {
                listen_cluster: "127.0.0.1:9005".into(),
                join: vec!["10.0.0.2:9005".into(), "10.0.0.3:9005".into()],
                name: "a".into(),
                advertise_internal: None,
                gossip_interval: Duration::from_secs(1),
                peer_timeout: Duration::from_secs(5),
            })
        );
        let err = flags(&[
            "--insecure-accept-any-token",
            "--shared-key",
            "/k",
            "--listen-cluster",
            "127.0.0.1:9005",
            "--peer-timeout",
            "1s",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("--peer-timeout"), "{err}");
        let err = flags(&[
            "--insecure-accept-any-token",
            "--shared-key",
            "/k",
            "--listen-cluster",
            "127.0.0.1:9005",
            "--internal-tls-key",
            "/k",
            "--internal-tls-crt",
            "/c",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("--internal-tls"), "{err}");
        // --join without --listen-cluster is refused by the parser.
        assert!(Flags::try_parse_from([
            "telemeter-server",
            "--storage-path",
            "/x",
            "--join",
            "a:1"
        ])
        .is_err());
        assert!(host_name().is_some());
    }

    #[test]
    fn remote_write_flags() {
        let c = flags(&["--insecure-accept-any-token"])
            .into_config()
            .unwrap();
        assert_eq!(c.remote_write, None);
        let c = flags(&[
            "--insecure-accept-any-token",
            "--remote-write-url",
            "http://127.0.0.1:9090/api/v1/write",
            "--remote-write-queue",
            "5",
            "--remote-write-timeout",
            "2s",
        ])
        .into_config()
        .unwrap();
        assert_eq!(
            c.remote_write,
            Some(RemoteWriteConfig {
                url: "http://127.0.0.1:9090/api/v1/write".into(),
                queue_capacity: 5,
                timeout: Duration::from_secs(2),
                ca_file: None,
                bearer_token_file: None,
            })
        );
        for bad in [
            vec!["--remote-write-url", "ftp://x"],
            vec![
                "--remote-write-url",
                "http://x",
                "--remote-write-queue",
                "0",
            ],
            vec![
                "--remote-write-url",
                "http://x",
                "--remote-write-timeout",
                "0s",
            ],
        ] {
            let mut args = vec!["--insecure-accept-any-token"];
            args.extend(bad);
            let err = flags(&args).into_config().unwrap_err();
            assert!(err.to_string().contains("--remote-write"), "{err}");
        }
    }

    #[test]
    fn labels_the_server_adds_must_be_servable() {
        for (flag, value) in [
            ("--label", "le=x"),
            ("--label", "__name__=x"),
            ("--required-label", "quantile=x"),
            ("--partition-label", "__id"),
            ("--partition-label", "le"),
        ] {
            let err = flags(&["--insecure-accept-any-token", flag, value])
                .into_config()
                .unwrap_err();
            assert!(err.to_string().contains(flag), "{err}");
        }
        let err = flags(&[
            "--insecure-accept-any-token",
            "--label",
            "region=eu",
            "--required-label",
            "region=us",
        ])
        .into_config()
        .unwrap_err();
        assert!(err.to_string().contains("also a --required-label"), "{err}");
    }

    #[test]
    fn partition_label_cannot_be_set_by_label_flags() {
        let err = flags(&["--insecure-accept-any-token", "--label", "_id=x"])
            .into_config()
            .unwrap_err();
        assert!(err.to_string().contains("partition label"), "{err}");
    }
}
