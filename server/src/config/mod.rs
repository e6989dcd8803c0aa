//! Command-line flags and the validated configuration the server runs with.
//!
//! Flag names keep upstream telemeter-server's, so existing deployments keep their command lines:
//! every flag of upstream's `--help` is accepted with upstream's meaning, durations may be written
//! as Go wrote them, and an empty value (`--authorize-issuer-url=` from an unset variable in a
//! manifest) means the flag is not set, as it did upstream. [`Flags`] is what clap parses;
//! [`Flags::into_config`] checks what clap cannot (durations, label pairs, selector files, that a
//! client token source exists) and yields a [`Config`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use telemeter_common::selector::Selector;

use crate::remote_write::RemoteWriteConfig;

mod build;
mod flags;
#[cfg(test)]
mod tests;

pub use build::{host_name, join_addresses, parse_label_pairs};
pub use flags::Flags;

/// A clap error as one line: clap's message spans lines (error, usage, hint), and a bad flag
/// promises one line on stderr.
pub fn one_line_error(e: &clap::Error) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    lines.join(" ")
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

/// Where the whitelist comes from: selectors given on the command line, and a file read at start
/// and at each reload.
#[derive(Clone, Debug, Default)]
pub struct WhitelistSource {
    /// The `--whitelist` selectors.
    pub inline: Vec<Selector>,
    /// The `--whitelist-file`.
    pub file: Option<PathBuf>,
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
    /// Where the whitelist came from, to read it again on a reload.
    pub whitelist_source: WhitelistSource,
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
    /// `/metrics/v1/receive` (remote write from the edge).
    pub receive: crate::receive::ReceiveConfig,
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
