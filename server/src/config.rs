//! Command-line flags and the validated configuration the server runs with.
//!
//! Flag names keep upstream telemeter-server's, so existing deployments keep their command lines:
//! every flag of upstream's `--help` is accepted with upstream's meaning, durations may be written
//! as Go wrote them, and an empty value (`--authorize-issuer-url=` from an unset variable in a
//! manifest) means the flag is not set, as it did upstream. [`Flags`] is what clap parses;
//! [`Flags::into_config`] checks what clap cannot (durations, label pairs, selector files, that a
//! client token source exists) and yields a [`Config`].

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
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
    about = "Receives pushed Prometheus metrics from telemeter clients, stores them durably and serves them on /federate.",
    after_help = "Durations are written as Prometheus writes them (15s, 4m30s, 1d) or as Go does (1.5m, 300ms, 1h30m).\nAn empty value (--authorize-issuer-url=) means the flag is not set, as it did upstream."
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

    /// File whose contents (at least 32 bytes, any format: upstream's PEM or DER EC or RSA private
    /// key works as it is) are the secret every server of a cluster shares; upload tokens are
    /// signed, and heartbeats and forwards sealed, with keys derived from its bytes. Repeatable,
    /// to rotate keys: the first signs and seals, every one verifies and opens. Without it a
    /// random key is made at start, and tokens stop working when the process ends.
    #[arg(long, value_name = "FILE")]
    pub shared_key: Vec<PathBuf>,

    /// Lifetime of the upload tokens /authorize hands out, in seconds.
    #[arg(long, default_value_t = 86_400, value_name = "SECONDS")]
    pub token_expire_seconds: u64,

    /// URL of an upstream authorization service ("tollbooth" protocol) that checks client tokens.
    #[arg(long, value_name = "URL", conflicts_with = "tokens_file")]
    pub authorize: Option<String>,

    /// OIDC issuer of the access token presented to --authorize (`Authorization: Bearer`). Its
    /// token endpoint is found at <URL>/.well-known/openid-configuration; the token is fetched
    /// with the client credentials grant (the password grant with --authorize-username) and
    /// fetched again before it expires or after the service answers 401.
    #[arg(long, value_name = "URL")]
    pub authorize_issuer_url: Option<String>,

    /// OIDC client id for --authorize-issuer-url.
    #[arg(long, value_name = "ID")]
    pub authorize_client_id: Option<String>,

    /// OIDC client secret for --authorize-issuer-url (also read from the environment, which,
    /// unlike the command line, other users cannot see in the process list).
    #[arg(
        long,
        value_name = "SECRET",
        env = "TELEMETER_AUTHORIZE_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub authorize_client_secret: Option<Secret>,

    /// OIDC user name for --authorize-issuer-url: the token is fetched with the resource owner
    /// password grant (give --authorize-password too).
    #[arg(long, value_name = "NAME")]
    pub authorize_username: Option<String>,

    /// OIDC password of --authorize-username (also read from the environment).
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "TELEMETER_AUTHORIZE_PASSWORD",
        hide_env_values = true
    )]
    pub authorize_password: Option<Secret>,

    /// Most calls to --authorize (and its OIDC issuer) in flight at once. /authorize requests over
    /// it are answered 503 with Retry-After at once, so a slow service holds at most this many
    /// worker threads and uploads never wait for it.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub authorize_concurrency: usize,

    /// Deadline of one /authorize call to the service, the OIDC token fetch and a retry after a
    /// refreshed token included (duration); past it the client gets 503.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub authorize_timeout: String,

    /// Deadline for connecting to --authorize or its OIDC issuer (duration).
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub authorize_connect_timeout: String,

    /// File mapping client tokens to the cluster ids they may push for: JSON
    /// `[{"token":"...","clusters":["id1","*"]}]` (an entry without "clusters" may push for any
    /// cluster id, as in upstream's tokens file `[{"token":"a"}]`), or one `TOKEN ID1,ID2` (or
    /// `TOKEN *`) per line.
    #[arg(long, value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Accept any client token for any cluster id. For tests only: anyone can then push as anyone.
    #[arg(long, conflicts_with_all = ["authorize", "tokens_file"])]
    pub insecure_accept_any_token: bool,

    /// The label that names the cluster on every stored series; the server sets it from the token.
    #[arg(long, default_value = "_id", value_name = "NAME")]
    pub partition_label: String,

    /// A label added to every stored series, as NAME=VALUE (repeatable, or comma-separated).
    #[arg(long = "label", value_name = "NAME=VALUE", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// A label written into every upload token and required on (or set on) every series of that
    /// cluster, as NAME=VALUE (repeatable, or comma-separated). A series carrying another value
    /// is refused (403).
    #[arg(
        long = "required-label",
        value_name = "NAME=VALUE",
        value_delimiter = ','
    )]
    pub required_labels: Vec<String>,

    /// A series selector, like `up{job="x"}`; only series matching at least one --whitelist or
    /// --whitelist-file selector are stored (repeatable; not comma-separated, since a selector
    /// holds commas). None given: every series is stored.
    #[arg(long = "whitelist", value_name = "SELECTOR")]
    pub whitelist: Vec<String>,

    /// A file of series selectors, one per line (`#` comments and blank lines skipped), added to
    /// --whitelist.
    #[arg(long, value_name = "FILE")]
    pub whitelist_file: Option<PathBuf>,

    /// Each cluster may store one upload per this window (a duration, as Prometheus writes it,
    /// `4m30s`, or Go, `4.5m`); more are answered 429 with Retry-After. 0s turns the limit off.
    #[arg(long, default_value = "4m30s", value_name = "DURATION")]
    pub ratelimit: String,

    /// A cluster is served on /federate only while the newest sample timestamp of its last
    /// upload is younger than this (Prometheus duration), however recently the upload arrived;
    /// then its file is removed. As upstream: samples older than now minus the TTL are dropped.
    #[arg(long, default_value = "10m", value_name = "DURATION")]
    pub ttl: String,

    /// Directory holding one file per cluster (created if missing; locked while the server runs).
    /// Relative to the working directory, like Prometheus's `data/`.
    #[arg(
        long,
        visible_alias = "storage-dir",
        default_value = "data",
        value_name = "DIR"
    )]
    pub storage_path: PathBuf,

    /// Largest upload body accepted as sent (compressed), in bytes; larger ones get 413.
    #[arg(
        long,
        visible_alias = "limit-bytes",
        default_value_t = 1 << 20,
        value_name = "BYTES"
    )]
    pub max_upload_bytes: usize,

    /// Largest upload body accepted after snappy decompression, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 16 << 20, value_name = "BYTES")]
    pub max_decompressed_bytes: usize,

    /// Most series one upload may carry; more get 413.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub max_series: usize,

    /// Samples older than this (duration) make the upload fail with 400.
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub max_sample_age: String,

    /// Samples further in the future than this (duration) make the upload fail with 400.
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub max_future_skew: String,

    /// Worker threads running request handlers on each port (default: 256). Most of them wait for
    /// their upload's group commit to be durable, which costs a thread stack and nothing else:
    /// decoding and validation run at most one per core whatever this is, and what uploads hold
    /// past the HTTP front is reserved from 256 MiB in all, so memory is bounded by bodies in
    /// flight (128 MiB) + 256 MiB, not by this number (README, "Memory").
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Most connections open at once on each port; more are answered 503 and closed.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,

    /// Most connections open at once on each port from one client address (an IPv4 address or an
    /// IPv6 /64). At the cap that address's own longest-idle connection is closed to make room, so
    /// a fleet behind one NAT keeps working however many clusters share the address; only when
    /// all of its connections are busy with requests is a new one answered 503 with Retry-After.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_connections_per_peer: usize,

    /// Most request-body bytes held in memory at once for one client address (of the 128 MiB all
    /// bodies may hold); a body that would pass it is answered 503 with Retry-After. Bodies hold
    /// only what has arrived, so the default takes dozens of full-size uploads from one NAT at once.
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES")]
    pub max_body_bytes_per_peer: usize,

    /// Time allowed to receive a whole request body (Prometheus duration); slower ones get 408.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub body_timeout: String,

    /// Also ship every upload this server stores, with its original timestamps, as Prometheus
    /// remote-write 1.0 to this URL (Prometheus with --web.enable-remote-write-receiver, Thanos
    /// receive, Mimir, Cortex, VictoriaMetrics).
    #[arg(long, value_name = "URL")]
    pub remote_write_url: Option<String>,

    /// Most uploads waiting to be sent to --remote-write-url; when full, the oldest is dropped.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub remote_write_queue: usize,

    /// Time allowed for one remote-write request (duration).
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

    /// A peer's --listen-cluster address (repeatable, or comma-separated; a host name resolves to
    /// every address it has, at every heartbeat). Without a port, the port of --listen-cluster.
    /// Peers not listed here are still accepted when their heartbeats carry a valid MAC under the
    /// shared key.
    #[arg(
        long = "join",
        value_name = "HOST[:PORT]",
        value_delimiter = ',',
        requires = "listen_cluster"
    )]
    pub join: Vec<String>,

    /// This server's name in the cluster, unique among its peers (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// The internal address peers forward pushes to (default: --listen-internal as bound; when
    /// that is a wildcard address such as 0.0.0.0, the local address that routes to the first
    /// --join peer, else the host name's address).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise_internal: Option<String>,

    /// Time between two heartbeats to each peer (duration).
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub gossip_interval: String,

    /// A peer silent for this long is dead and its clusters move to other servers.
    #[arg(long, default_value = "3s", value_name = "DURATION")]
    pub peer_timeout: String,

    /// Log at debug level (upstream's flag). Tokens and secrets are never logged.
    #[arg(short = 'v', long)]
    pub verbose: bool,

    /// Log level; given, it (or -v) overrides the RUST_LOG environment variable.
    #[arg(long, value_name = "LEVEL", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: Option<String>,
}

/// The cluster port of upstream's memberlist (its default), for a `--join` without a port when
/// `--listen-cluster` has none to offer (port 0).
pub const DEFAULT_CLUSTER_PORT: u16 = 7946;

/// A secret flag value: never shown by `Debug`, so a logged configuration cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Flags {
    /// The log filter the flags ask for (`--log-level`, else `debug` with `-v`), if any.
    pub fn log_filter(&self) -> Option<&str> {
        match (&self.log_level, self.verbose) {
            (Some(level), _) => Some(level.as_str()),
            (None, true) => Some("debug"),
            (None, false) => None,
        }
    }
}

/// The cluster part of the configuration (present when --listen-cluster is given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterFlags {
    /// UDP address to bind.
    pub listen_cluster: String,
    /// Peers' cluster addresses, "host:port" (a port added where `--join` had none).
    pub join: Vec<String>,
    /// Whether the internal port serves TLS, so peers are reached over https.
    pub internal_tls: bool,
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
    /// An upstream authorization service.
    Tollbooth(TollboothConfig),
    /// Any token is accepted (testing only).
    AnyToken,
}

/// How to call the upstream authorization service (`--authorize` and the flags around it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TollboothConfig {
    /// Its URL.
    pub url: String,
    /// Where its bearer token comes from, if it wants one.
    pub oidc: Option<OidcConfig>,
    /// Most calls in flight at once.
    pub concurrency: usize,
    /// Deadline of one authorization, token fetch and retry included.
    pub timeout: Duration,
    /// Deadline for connecting.
    pub connect_timeout: Duration,
}

/// The OIDC client that obtains the bearer token for the authorization service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcConfig {
    /// The issuer URL (discovery at `<issuer>/.well-known/openid-configuration`).
    pub issuer_url: String,
    /// The client id.
    pub client_id: String,
    /// The client secret, if the client has one.
    pub client_secret: Option<Secret>,
    /// User name and password for the password grant; None: client credentials grant.
    pub password_grant: Option<(String, Secret)>,
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
    /// The shared key files, the one that signs and seals first; none for a random key.
    pub shared_key: Vec<PathBuf>,
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
    /// Connection cap per port and client address.
    pub max_connections_per_peer: usize,
    /// Body-memory cap per port and client address.
    pub max_body_bytes_per_peer: usize,
    /// Time allowed for a whole request body.
    pub body_timeout: Duration,
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
        let authorize = non_empty(self.authorize.clone());
        if authorize.is_none() && non_empty(self.authorize_issuer_url.clone()).is_some() {
            return Err(ConfigError::Invalid {
                flag: "--authorize-issuer-url",
                reason: "the OIDC token is for the authorization service: give --authorize too"
                    .into(),
            });
        }
        let oidc = self.oidc_config()?;
        let token_source = match (&self.tokens_file, authorize) {
            (Some(path), _) => TokenSource::File(path.clone()),
            (None, Some(url)) => {
                check_url("--authorize", &url)?;
                let concurrency = self.authorize_concurrency;
                if concurrency == 0 {
                    return Err(ConfigError::Invalid {
                        flag: "--authorize-concurrency",
                        reason: "must be greater than 0".into(),
                    });
                }
                let timeout = parse_duration("--authorize-timeout", &self.authorize_timeout)?;
                let connect_timeout = parse_duration(
                    "--authorize-connect-timeout",
                    &self.authorize_connect_timeout,
                )?;
                if timeout.is_zero() || connect_timeout.is_zero() {
                    return Err(ConfigError::Invalid {
                        flag: "--authorize-timeout",
                        reason: "--authorize-timeout and --authorize-connect-timeout must be greater than 0s".into(),
                    });
                }
                TokenSource::Tollbooth(TollboothConfig {
                    url,
                    oidc,
                    concurrency,
                    timeout,
                    connect_timeout,
                })
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
        let has_shared_key = !self.shared_key.is_empty();
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
            max_connections_per_peer: positive(
                "--max-connections-per-peer",
                self.max_connections_per_peer,
            )?,
            max_body_bytes_per_peer: positive(
                "--max-body-bytes-per-peer",
                self.max_body_bytes_per_peer,
            )?,
            body_timeout: match parse_duration("--body-timeout", &self.body_timeout)? {
                zero if zero.is_zero() => {
                    return Err(ConfigError::Invalid {
                        flag: "--body-timeout",
                        reason: "must be greater than 0s".into(),
                    })
                }
                timeout => timeout,
            },
            remote_write,
            cluster: match self.listen_cluster {
                None => None,
                Some(listen_cluster) => {
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
                    let join = join_addresses(&listen_cluster, &self.join)?;
                    Some(ClusterFlags {
                        listen_cluster,
                        join,
                        internal_tls: has_internal_tls,
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

impl Flags {
    /// The OIDC client the `--authorize-*` flags describe, if `--authorize-issuer-url` is set.
    /// Without it the other OIDC flags are ignored, as upstream did.
    fn oidc_config(&self) -> Result<Option<OidcConfig>, ConfigError> {
        let Some(issuer_url) = non_empty(self.authorize_issuer_url.clone()) else {
            return Ok(None);
        };
        check_url("--authorize-issuer-url", &issuer_url)?;
        let client_id =
            non_empty(self.authorize_client_id.clone()).ok_or_else(|| ConfigError::Invalid {
                flag: "--authorize-client-id",
                reason: "required with --authorize-issuer-url".into(),
            })?;
        let secret = |s: &Option<Secret>| s.clone().filter(|s| !s.0.is_empty());
        let password_grant = match (
            non_empty(self.authorize_username.clone()),
            secret(&self.authorize_password),
        ) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    flag: "--authorize-username",
                    reason: "--authorize-username and --authorize-password go together".into(),
                })
            }
        };
        Ok(Some(OidcConfig {
            issuer_url,
            client_id,
            client_secret: secret(&self.authorize_client_secret),
            password_grant,
        }))
    }
}

/// `value`, unless it is empty: upstream's manifests pass `--flag=$(VAR)`, and an unset variable
/// meant "not set" there.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

fn check_url(flag: &'static str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            flag,
            reason: format!("{url:?} is not an http:// or https:// URL"),
        })
    }
}

/// The `--join` entries as "host:port": an entry without a port gets the port of
/// `listen_cluster` (every node of a cluster usually listens on the same one, and upstream's
/// memberlist did the same), or [`DEFAULT_CLUSTER_PORT`] when that is 0. Empty entries are
/// dropped.
pub fn join_addresses(listen_cluster: &str, join: &[String]) -> Result<Vec<String>, ConfigError> {
    let port = listen_cluster
        .parse::<SocketAddr>()
        .map(|a| a.port())
        .ok()
        .or_else(|| listen_cluster.rsplit_once(':')?.1.parse().ok())
        .filter(|port| *port != 0)
        .unwrap_or(DEFAULT_CLUSTER_PORT);
    let mut out = Vec::new();
    for entry in join.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let address = if entry.parse::<SocketAddr>().is_ok() {
            entry.to_owned()
        } else if entry.starts_with('[') && entry.ends_with(']') {
            format!("{entry}:{port}")
        } else if entry.parse::<Ipv6Addr>().is_ok() {
            format!("[{entry}]:{port}")
        } else {
            match entry.rsplit_once(':') {
                None => format!("{entry}:{port}"),
                Some((host, p))
                    if !host.is_empty() && !host.contains(':') && p.parse::<u16>().is_ok() =>
                {
                    entry.to_owned()
                }
                Some(_) => {
                    return Err(ConfigError::Invalid {
                        flag: "--join",
                        reason: format!("{entry:?} is not HOST or HOST:PORT"),
                    })
                }
            }
        };
        out.push(address);
    }
    Ok(out)
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
                internal_tls: false,
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
        // Upstream's manifests serve the internal port over TLS in a cluster: forwards use https.
        let c = flags(&[
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
        .unwrap();
        assert!(c.cluster.unwrap().internal_tls);
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
    fn shared_key_is_repeatable_in_order() {
        let c = flags(&[
            "--insecure-accept-any-token",
            "--shared-key=/new",
            "--shared-key",
            "/old",
        ])
        .into_config()
        .unwrap();
        assert_eq!(c.shared_key, [PathBuf::from("/new"), PathBuf::from("/old")]);
        let c = flags(&["--insecure-accept-any-token"])
            .into_config()
            .unwrap();
        assert!(c.shared_key.is_empty());
    }

    #[test]
    fn join_takes_lists_and_defaults_the_port() {
        let c = flags(&[
            "--insecure-accept-any-token",
            "--shared-key=/k",
            "--listen-cluster=0.0.0.0:8082",
            "--join=telemeter-server",
            "--join",
            "10.0.0.2,10.0.0.3:9000,[::1],::2,[::3]:7,host:1",
            "--join=",
        ])
        .into_config()
        .unwrap();
        assert_eq!(
            c.cluster.unwrap().join,
            [
                "telemeter-server:8082",
                "10.0.0.2:8082",
                "10.0.0.3:9000",
                "[::1]:8082",
                "[::2]:8082",
                "[::3]:7",
                "host:1"
            ]
        );
        // No port to borrow: upstream memberlist's.
        assert_eq!(
            join_addresses("127.0.0.1:0", &["peer".into()]).unwrap(),
            ["peer:7946"]
        );
        for bad in ["host:", ":80", "host:99999", "a:b:c:"] {
            assert!(
                join_addresses("127.0.0.1:1", &[bad.into()]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn labels_take_lists() {
        let c = flags(&[
            "--insecure-accept-any-token",
            "--label=a=1,b=2",
            "--label",
            "c=3",
            "--required-label=env=prod,tier=web",
        ])
        .into_config()
        .unwrap();
        let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(c.labels, pairs(&[("a", "1"), ("b", "2"), ("c", "3")]));
        assert_eq!(
            c.required_labels,
            pairs(&[("env", "prod"), ("tier", "web")])
        );
        // A selector holds commas: --whitelist is never split.
        let c = flags(&[
            "--insecure-accept-any-token",
            "--whitelist",
            r#"{__name__="up",job="a"}"#,
        ])
        .into_config()
        .unwrap();
        assert_eq!(c.whitelist.len(), 1);
    }

    #[test]
    fn storage_defaults_to_data_and_takes_upstreams_name() {
        let c = Flags::try_parse_from(["telemeter-server", "--insecure-accept-any-token"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(c.storage_path, PathBuf::from("data"));
        let c = Flags::try_parse_from([
            "telemeter-server",
            "--insecure-accept-any-token",
            "--storage-dir=/var/lib/x",
            "--limit-bytes=5242880",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(c.storage_path, PathBuf::from("/var/lib/x"));
        assert_eq!(c.max_upload_bytes, 5_242_880);
    }

    #[test]
    fn durations_may_be_written_as_go_writes_them() {
        let c = flags(&[
            "--insecure-accept-any-token",
            "--ratelimit=4.5m",
            "--ttl",
            "1h30m",
            "--max-future-skew=2.5s",
        ])
        .into_config()
        .unwrap();
        assert_eq!(c.ratelimit, Duration::from_secs(270));
        assert_eq!(c.ttl, Duration::from_secs(5400));
        assert_eq!(c.max_future_skew, Duration::from_millis(2500));
        let err = flags(&["--insecure-accept-any-token", "--ttl=10 minutes"])
            .into_config()
            .unwrap_err();
        assert!(
            err.to_string().starts_with("--ttl: invalid duration"),
            "{err}"
        );
    }

    #[test]
    fn verbosity() {
        assert_eq!(flags(&[]).log_filter(), None);
        assert_eq!(flags(&["-v"]).log_filter(), Some("debug"));
        assert_eq!(flags(&["--verbose"]).log_filter(), Some("debug"));
        assert_eq!(
            flags(&["-v", "--log-level", "warn"]).log_filter(),
            Some("warn")
        );
        assert!(Flags::try_parse_from(["telemeter-server", "--log-level", "loud"]).is_err());
    }

    fn tollbooth(c: Config) -> TollboothConfig {
        match c.token_source {
            TokenSource::Tollbooth(t) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn authorize_flags() {
        let t = tollbooth(
            flags(&["--authorize", "https://tollbooth/v1"])
                .into_config()
                .unwrap(),
        );
        assert_eq!(
            t,
            TollboothConfig {
                url: "https://tollbooth/v1".into(),
                oidc: None,
                concurrency: 16,
                timeout: Duration::from_secs(10),
                connect_timeout: Duration::from_secs(2),
            }
        );
        // Upstream's manifest with its secrets unset: every OIDC flag empty, so no OIDC.
        let t = tollbooth(
            flags(&[
                "--authorize=https://tollbooth/v1",
                "--authorize-issuer-url=",
                "--authorize-client-id=",
                "--authorize-username=",
                "--authorize-password=",
            ])
            .into_config()
            .unwrap(),
        );
        assert_eq!(t.oidc, None);
        let t = tollbooth(
            flags(&[
                "--authorize=https://tollbooth/v1",
                "--authorize-issuer-url=https://sso/realms/x",
                "--authorize-client-id=telemeter",
                "--authorize-username=bob",
                "--authorize-password=hunter2",
                "--authorize-concurrency=4",
                "--authorize-timeout=1.5s",
                "--authorize-connect-timeout=300ms",
            ])
            .into_config()
            .unwrap(),
        );
        assert_eq!(
            t.oidc,
            Some(OidcConfig {
                issuer_url: "https://sso/realms/x".into(),
                client_id: "telemeter".into(),
                client_secret: None,
                password_grant: Some(("bob".into(), Secret::from("hunter2".to_string()))),
            })
        );
        assert_eq!(
            (t.concurrency, t.timeout, t.connect_timeout),
            (4, Duration::from_millis(1500), Duration::from_millis(300))
        );
        // Secrets stay out of Debug output, so out of any log line.
        assert!(!format!("{t:?}").contains("hunter2"), "{t:?}");
        let c = flags(&[
            "--authorize=https://tollbooth/v1",
            "--authorize-issuer-url=https://sso",
            "--authorize-client-id=telemeter",
            "--authorize-client-secret=s3cret",
        ])
        .into_config()
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(
            tollbooth(c).oidc.unwrap().client_secret,
            Some(Secret::from("s3cret".to_string()))
        );

        for (bad, flag) in [
            (
                vec!["--authorize-issuer-url=https://sso"],
                "--authorize-issuer-url",
            ),
            (
                vec!["--authorize=http://t", "--authorize-issuer-url=https://sso"],
                "--authorize-client-id",
            ),
            (
                vec![
                    "--authorize=http://t",
                    "--authorize-issuer-url=sso",
                    "--authorize-client-id=c",
                ],
                "--authorize-issuer-url",
            ),
            (
                vec![
                    "--authorize=http://t",
                    "--authorize-issuer-url=https://sso",
                    "--authorize-client-id=c",
                    "--authorize-username=bob",
                ],
                "--authorize-username",
            ),
            (
                vec!["--authorize=http://t", "--authorize-concurrency=0"],
                "--authorize-concurrency",
            ),
            (
                vec!["--authorize=http://t", "--authorize-timeout=0s"],
                "--authorize-timeout",
            ),
        ] {
            let err = flags(&bad).into_config().unwrap_err();
            assert!(err.to_string().starts_with(flag), "{bad:?}: {err}");
        }
        // --authorize= (empty, as from an unset variable) is no token source.
        assert_eq!(
            flags(&["--authorize="]).into_config().unwrap_err(),
            ConfigError::NoTokenSource
        );
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
