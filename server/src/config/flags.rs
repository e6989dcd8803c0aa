//! The flags of `telemeter-server` as clap parses them: names, defaults, help, and the upstream
//! aliases. Checking them and building the [`super::Config`] is in `build`.

use std::path::PathBuf;

use clap::Parser;

use super::Secret;

/// The flags of `telemeter-server`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "telemeter-server",
    version = crate::VERSION_TEXT,
    about = "Receives pushed Prometheus metrics from telemeter clients, stores them durably and serves them on /federate.",
    after_help = "`telemeter-server import FILE…` imports air-gap bundles written by `telemeter-client --to-file` (see `telemeter-server import --help`); a running server takes them by POST /import on the external port.\n\nDurations are written as Prometheus writes them (15s, 4m30s, 1d) or as Go does (1.5m, 300ms, 1h30m).\nAn empty value (--authorize-issuer-url=) means the flag is not set, as it did upstream.\n\nSIGHUP (or POST /-/reload on the internal port) reads --tokens-file and --whitelist-file again.\n\nEnvironment:\n  RUST_LOG   log filter, e.g. info, debug, telemeter_server=debug (default info); -v and\n             --log-level override it\n  HTTPS_PROXY, HTTP_PROXY, ALL_PROXY (or lower case), NO_PROXY\n             proxy for the outgoing calls (--authorize service, its OIDC issuer, remote write)"
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
    /// Uploads a client sends late from its spool (header `X-Telemeter-Backfill: 1`) are not
    /// counted here but against a budget of their own: 12 per cluster per window, one back every
    /// window / 12; they never replace newer samples on /federate, and are shipped to
    /// --remote-write-url with their original timestamps.
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

    /// Largest remote-write body accepted on /metrics/v1/receive as sent (snappy-compressed), in
    /// bytes; larger ones get 413, which a Prometheus does not retry. Upstream's default.
    #[arg(long, default_value_t = 128 << 10, value_name = "BYTES")]
    pub receive_max_bytes: usize,

    /// Largest remote-write body after decompression, in bytes, checked from snappy's declared
    /// length before decompressing; larger ones get 413.
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    pub receive_max_decompressed_bytes: usize,

    /// Remote-write requests per second accepted from each cluster on /metrics/v1/receive, with a
    /// burst of 10 seconds' worth (a Prometheus sends one batch every few seconds per shard, and
    /// replays its WAL quickly after an outage). Over it: 429 with Retry-After, which Prometheus
    /// retries without dropping anything (set `queue_config.retry_on_http_429: true` on 2.42). 0
    /// turns the limit off.
    #[arg(long, default_value_t = 20.0, value_name = "N")]
    pub receive_ratelimit: f64,

    /// A label removed from every series received by remote write (repeatable, or
    /// comma-separated), as upstream's --elide-label; /upload clients elide with their own flag.
    #[arg(long = "elide-label", value_name = "NAME", value_delimiter = ',')]
    pub elide_labels: Vec<String>,

    /// Also ship every upload this server stores, with its original timestamps, as Prometheus
    /// remote-write 1.0 to this URL (Prometheus with --web.enable-remote-write-receiver, Thanos
    /// receive, Mimir, Cortex, VictoriaMetrics).
    #[arg(long, value_name = "URL")]
    pub remote_write_url: Option<String>,

    /// No effect, kept for compatibility: the remote-write backlog is the journal on disk, bounded
    /// by --remote-write-max-backlog-bytes and --remote-write-max-backlog-age.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub remote_write_queue: usize,

    /// Parallel remote-write senders; each series always goes through the same one (in order).
    #[arg(long, default_value_t = crate::remote_write::DEFAULT_SHARDS, value_name = "N")]
    pub remote_write_shards: usize,

    /// Most samples in one remote-write request.
    #[arg(long, default_value_t = crate::remote_write::DEFAULT_MAX_SAMPLES_PER_SEND, value_name = "N")]
    pub remote_write_max_samples_per_send: usize,

    /// Most journal bytes kept waiting for --remote-write-url (an outage of the receiver); beyond,
    /// the oldest are dropped, counted and logged.
    #[arg(long, default_value_t = crate::remote_write::DEFAULT_MAX_BACKLOG_BYTES, value_name = "BYTES")]
    pub remote_write_max_backlog_bytes: u64,

    /// Uploads received longer ago than this (duration) are dropped unsent, counted and logged.
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub remote_write_max_backlog_age: String,

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
