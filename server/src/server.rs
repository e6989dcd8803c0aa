//! Building and running a whole server from a [`Config`]: store, token signer, handlers, both ports.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use telemeter_common::http::{self, HttpError};
use telemeter_common::keys::{KeyError, SharedKey};
use telemeter_common::selector::Selector;
use telemeter_common::sync::Swap;
use telemeter_common::tls::{self, TlsError};
use telemeter_common::token::TokenSigner;

use crate::authorize::{self, AuthorizeHandler, TokensFileError};
use crate::cluster::handoff::Handoff;
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::placement::ClusterPlacement;
use crate::cluster::{Cluster, ClusterConfig, ClusterError};
use crate::config::{Config, TlsFiles};
use crate::import::{ImportHandler, Importer};
use crate::ingest::placement::{LocalPlacement, Placement};
use crate::ingest::ratelimit::RateLimiter;
use crate::ingest::upload::{UploadHandler, UploadLimits};
use crate::ingest::validate::Rules;
use crate::metrics::Metrics;
use crate::ports::{ClusterRoutes, External, Fronts, Internal};
use crate::receive::merge::Merger;
use crate::receive::{ReceiveHandler, ReceiveParts, Route, RECEIVE_PATH};
use crate::reload::Reloader;
use crate::remote_write::{RemoteWriteError, RemoteWriter};
use crate::status::Status;
use crate::store::{Store, StoreConfig, StoreError};

/// How long shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long shutdown keeps sending queued uploads to the remote-write receiver.
pub const REMOTE_WRITE_GRACE: Duration = Duration::from_secs(5);
/// Most uploads one group commit of the store takes: every upload waiting may join the next one.
const STORE_MAX_BATCH: usize = DEFAULT_WORKERS;
/// Worker threads per port without `--workers`: `/authorize` (which may wait for a remote
/// authorizer), forwarded pushes and the internal endpoints hold one while they run. `/upload`
/// runs on its connection's thread instead and waits there for the store, so up to
/// `--max-connections` uploads can be waiting for a commit at once; the CPU part of an upload
/// (decode, validate) is gated to one per core separately, so idle waiting threads cost a stack
/// each, not CPU.
pub const DEFAULT_WORKERS: usize = 256;
/// Samples allowed per allowed series (histograms and summaries carry several).
const SAMPLES_PER_SERIES: usize = 10;

/// The internal port's cap on a forward's body. A forwarded upload, or remote-write request, is
/// validated families with their labels stamped (allow for growth), decompressed within the
/// larger of the two caps: a forward over it would be answered 413 by the front, which the
/// sender takes as the owner refusing the content.
pub(crate) fn max_forward_bytes(config: &Config) -> usize {
    config
        .max_decompressed_bytes
        .max(config.receive.max_decompressed_bytes)
        .saturating_mul(2)
}

/// The size caps of an upload, from the flags; `/upload` and `import` take the same.
pub(crate) fn upload_limits(config: &Config) -> UploadLimits {
    UploadLimits {
        max_upload_bytes: config.max_upload_bytes,
        max_decompressed_bytes: config.max_decompressed_bytes,
        max_series: config.max_series,
    }
}

/// What an accepted upload must satisfy, from the flags, with the whitelist as `whitelist` holds
/// it now (a reload swaps it); `/upload` and `import` check the same.
pub(crate) fn upload_rules(config: &Config, whitelist: Swap<Vec<Selector>>) -> Rules {
    Rules {
        partition_label: config.partition_label.clone(),
        extra_labels: config.labels.clone(),
        whitelist,
        max_sample_age: config.max_sample_age,
        max_future_skew: config.max_future_skew,
        max_samples: config.max_series.saturating_mul(SAMPLES_PER_SERIES),
    }
}

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The shared key file is unusable.
    SharedKey(KeyError),
    /// The tokens file is unusable.
    TokensFile(TokensFileError),
    /// TLS material is unusable.
    Tls(TlsError),
    /// The store could not open.
    Store(StoreError),
    /// A port could not be bound.
    Http(HttpError),
    /// Clustering could not start.
    Cluster(ClusterError),
    /// The remote-write sender could not start.
    RemoteWrite(RemoteWriteError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::SharedKey(e) => write!(f, "--shared-key: {e}"),
            StartError::TokensFile(e) => write!(f, "--tokens-file: {e}"),
            StartError::Tls(e) => write!(f, "TLS: {e}"),
            StartError::Store(e) => write!(f, "--storage-path: {e}"),
            StartError::Http(e) => write!(f, "{e}"),
            StartError::Cluster(e) => write!(f, "cluster: {e}"),
            StartError::RemoteWrite(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Starts servers.
pub struct Server;

/// A running server: both ports served, the store open.
pub struct RunningServer {
    external: SocketAddr,
    internal: SocketAddr,
    fronts: Arc<Fronts>,
    store: Store,
    cluster: Option<Arc<Cluster>>,
    handoff: Option<Handoff>,
    remote_write: Option<RemoteWriter>,
    reloader: Arc<Reloader>,
}

impl Server {
    /// Opens the store, builds the handlers and starts serving both ports.
    pub fn start(config: Config) -> Result<RunningServer, StartError> {
        tls::install_crypto_provider();
        let mut shared = Vec::with_capacity(config.shared_key.len());
        for path in &config.shared_key {
            shared.push(SharedKey::from_file(path).map_err(StartError::SharedKey)?);
        }
        if shared.is_empty() {
            warn!("no --shared-key: signing upload tokens with a random key; they stop working when this process ends");
            shared.push(SharedKey::generate());
        }
        let signer = TokenSigner::with_keys(&shared);
        let authorizer =
            authorize::from_source(&config.token_source).map_err(StartError::TokensFile)?;
        let external_tls = load_tls(config.tls.as_ref())?;
        let internal_tls = load_tls(config.internal_tls.as_ref())?;
        if config.whitelist.is_empty() {
            info!("no whitelist: every valid series is stored");
        } else {
            info!("whitelist: {} selectors", config.whitelist.len());
        }

        let store_config = StoreConfig {
            dir: config.storage_path.clone(),
            ttl: config.ttl,
            max_batch: STORE_MAX_BATCH,
        };
        // With remote write, the journal is also its durable backlog.
        let store = match config.remote_write {
            Some(_) => Store::open_shipping(store_config),
            None => Store::open(store_config),
        }
        .map_err(StartError::Store)?;
        let metrics = Metrics::new();
        let whitelist = Swap::new(Arc::new(config.whitelist.clone()));
        let tokens_file = match &config.token_source {
            crate::config::TokenSource::File(path) => Some(path.clone()),
            _ => None,
        };
        let (reloader, authorizer) = Reloader::new(
            tokens_file,
            authorizer,
            config.whitelist_source.clone(),
            whitelist.clone(),
            &metrics.registry,
        );
        let reloader = Arc::new(reloader);
        let remote_write = match &config.remote_write {
            Some(rw) => match store
                .backlog()
                .ok_or_else(|| RemoteWriteError::Backlog("the store keeps no backlog".to_string()))
                .and_then(|backlog| RemoteWriter::start(rw, &metrics.registry, backlog))
            {
                Ok(writer) => Some(writer),
                Err(e) => {
                    store.close();
                    return Err(StartError::RemoteWrite(e));
                }
            },
            None => None,
        };
        // Whatever fails from here on stops the sender thread too.
        let stop_remote_write = || {
            if let Some(writer) = &remote_write {
                writer.shutdown(Duration::ZERO);
            }
        };

        let cluster = match &config.cluster {
            None => None,
            Some(flags) => match start_cluster(flags, &shared) {
                Ok(cluster) => Some(Arc::new(cluster)),
                Err(e) => {
                    stop_remote_write();
                    store.close();
                    return Err(e);
                }
            },
        };
        // The one remote-write merge of this store: every path that stores a push goes through
        // it (uploads, remote write, forwards).
        let merger = Merger::new(store.clone()).with_max_series(config.max_series);
        // Only the node that stores an upload ships it: the placement when it stores locally, the
        // forward endpoint when a peer forwarded the push here.
        let placement: Arc<dyn Placement> = match &cluster {
            Some(cluster) => Arc::new(ClusterPlacement::new(cluster.clone(), merger.clone())),
            None => Arc::new(LocalPlacement::new(merger.clone())),
        };

        let limiter = Arc::new(RateLimiter::new(config.ratelimit));
        let import = ImportHandler::new(
            Importer::from_config(&config, whitelist.clone()),
            authorizer.clone(),
            placement.clone(),
            config.ratelimit,
        );
        let receive = ReceiveHandler::new(
            config.receive.clone(),
            ReceiveParts {
                authorizer: authorizer.clone(),
                local_authorizer: !matches!(
                    config.token_source,
                    crate::config::TokenSource::Tollbooth(_)
                ),
                partition_label: config.partition_label.clone(),
                extra_labels: config.labels.clone(),
                required_labels: config.required_labels.clone(),
                whitelist: whitelist.clone(),
                max_sample_age: config.max_sample_age,
                max_future_skew: config.max_future_skew,
                max_series: config.max_series,
                merger: merger.clone(),
                route: match &cluster {
                    Some(cluster) => Route::Cluster(cluster.clone()),
                    None => Route::Local,
                },
                metrics: metrics.clone(),
            },
        );
        let external_handler = External {
            import,
            receive,
            authorize: AuthorizeHandler::new(
                authorizer,
                signer.clone(),
                config.token_lifetime,
                &config.partition_label,
                config.required_labels.clone(),
                metrics.clone(),
            ),
            upload: Arc::new(UploadHandler::new(
                signer,
                &config.partition_label,
                upload_limits(&config),
                upload_rules(&config, whitelist),
                limiter.clone(),
                placement,
                metrics.clone(),
            )),
        };
        let fronts = Arc::new(Fronts::default());
        let internal_handler = Internal {
            store: store.clone(),
            partition_label: config.partition_label.clone(),
            reloader: reloader.clone(),
            status: Status {
                store: store.clone(),
                cluster: cluster.clone(),
                limiter,
            },
            cluster: cluster.as_ref().map(|cluster| ClusterRoutes {
                cluster: cluster.clone(),
                metrics: ClusterMetrics::register(&metrics.registry),
                merger,
                max_series: config.max_series,
            }),
            metrics,
            fronts: fronts.clone(),
            max_forward_bytes: max_forward_bytes(&config),
        };

        let front_config = |name: &str, tls, inline_paths: &[&str]| {
            let mut c = http::Config {
                name: name.to_string(),
                max_connections: config.max_connections,
                max_connections_per_peer: config.max_connections_per_peer,
                max_body_bytes_per_peer: config.max_body_bytes_per_peer,
                body_timeout: config.body_timeout,
                tls,
                inline_paths: inline_paths.iter().map(|p| p.to_string()).collect(),
                ..http::Config::default()
            };
            c.workers = config.workers.unwrap_or(DEFAULT_WORKERS);
            c
        };
        let bound = http::Server::bind(
            &config.listen,
            // `/upload` and `/metrics/v1/receive` gate their own CPU (one decode per core) and
            // memory (their reservations), so they run on the connection's thread: the only
            // thread they wake is the store's committer, and the one wake-up they wait for is its
            // answer. Before their gates they do only bounded work: the bearer (8 KiB at most)
            // and the token, checked on the head so a peer without a valid one holds no body
            // (receive with `--authorize` and no cached answer asks the service after the capped
            // body, as it did on a worker: the service's own concurrency bound answers 503 past
            // it, and the wait holds this connection's thread, not one of the shared workers).
            front_config("external", external_tls, &["/upload", RECEIVE_PATH]),
            Arc::new(external_handler),
        )
        .and_then(|external| {
            http::Server::bind(
                &config.listen_internal,
                front_config("internal", internal_tls, &[]),
                Arc::new(internal_handler),
            )
            .map(|internal| (external, internal))
        });
        let (external, internal) = match bound {
            Ok(pair) => pair,
            Err(e) => {
                if let Some(cluster) = &cluster {
                    cluster.shutdown();
                }
                stop_remote_write();
                store.close();
                return Err(StartError::Http(e));
            }
        };
        let mut handoff = None;
        if let (Some(cluster), Some(flags)) = (&cluster, &config.cluster) {
            let bound = internal.local_addr();
            let advertised = match &flags.advertise_internal {
                Some(addr) => Ok(addr.clone()),
                // Upstream's manifests listen on 0.0.0.0 and name no address to advertise.
                None if bound.ip().is_unspecified() => match local_ip(&flags.join) {
                    Some((ip, how)) => {
                        let addr = SocketAddr::new(ip, bound.port()).to_string();
                        info!("cluster: --listen-internal {} is a wildcard address: advertising {addr} ({how}; --advertise-internal sets another)", config.listen_internal);
                        Ok(addr)
                    }
                    None => Err(ClusterError::Config(format!(
                        "--listen-internal {} is a wildcard address, and no local address routes to a --join peer nor does the host name resolve: give --advertise-internal",
                        config.listen_internal
                    ))),
                },
                None => Ok(bound.to_string()),
            };
            let started = advertised
                .and_then(|addr| cluster.set_internal_addr(&addr))
                .and_then(|()| {
                    Handoff::start(cluster.clone(), store.clone(), flags.gossip_interval).map_err(
                        |e| ClusterError::Config(format!("cannot start the handoff thread: {e}")),
                    )
                });
            match started {
                Ok(thread) => handoff = Some(thread),
                Err(e) => {
                    cluster.shutdown();
                    stop_remote_write();
                    store.close();
                    return Err(StartError::Cluster(e));
                }
            }
        }
        let external = external.spawn();
        let internal = internal.spawn();
        let running = RunningServer {
            external: external.local_addr(),
            internal: internal.local_addr(),
            fronts,
            store,
            cluster,
            handoff,
            remote_write,
            reloader,
        };
        running.fronts.add("external", external);
        running.fronts.add("internal", internal);
        info!(
            "listening external={} internal={}",
            running.external, running.internal
        );
        Ok(running)
    }
}

fn start_cluster(
    flags: &crate::config::ClusterFlags,
    shared: &[SharedKey],
) -> Result<Cluster, StartError> {
    // A host name is resolved, as --listen and --listen-internal are (`localhost:9006`).
    let listen_cluster = flags
        .listen_cluster
        .to_socket_addrs()
        .map_err(|e| e.to_string())
        .and_then(|mut addrs| {
            addrs
                .next()
                .ok_or_else(|| "resolves to nothing".to_string())
        })
        .map_err(|e| {
            StartError::Cluster(ClusterError::Config(format!(
                "--listen-cluster {:?}: {e}",
                flags.listen_cluster
            )))
        })?;
    // Without --advertise-internal, the address is known once the internal port is bound; the
    // cluster sends no heartbeat until then.
    let internal = flags.advertise_internal.clone().unwrap_or_default();
    let mut cluster_config = ClusterConfig::new(&flags.name, listen_cluster, &internal);
    cluster_config.join.clone_from(&flags.join);
    cluster_config.internal_tls = flags.internal_tls;
    cluster_config.gossip_interval = flags.gossip_interval;
    cluster_config.peer_timeout = flags.peer_timeout;
    Cluster::start(cluster_config, shared).map_err(StartError::Cluster)
}

/// An address of this host that peers can reach, and how it was found: the local address of the
/// route to the first resolvable `--join` peer (a UDP socket's `connect` picks it without sending
/// anything), else the first address the host name resolves to (a pod's IP in Kubernetes).
fn local_ip(join: &[String]) -> Option<(IpAddr, String)> {
    for peer in join {
        let Ok(addrs) = peer.to_socket_addrs() else {
            continue;
        };
        for addr in addrs {
            let any: SocketAddr = match addr {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let local = UdpSocket::bind(any)
                .and_then(|socket| socket.connect(addr).map(|()| socket))
                .and_then(|socket| socket.local_addr());
            if let Ok(local) = local {
                if !local.ip().is_unspecified() {
                    return Some((local.ip(), format!("the route to --join {peer}")));
                }
            }
        }
    }
    let host = crate::config::host_name()?;
    let addrs: Vec<IpAddr> = (host.as_str(), 0)
        .to_socket_addrs()
        .ok()?
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .collect();
    let ip = addrs
        .iter()
        .find(|ip| !ip.is_loopback())
        .or_else(|| addrs.first())?;
    Some((*ip, format!("the address of host name {host}")))
}

fn load_tls(files: Option<&TlsFiles>) -> Result<Option<Arc<rustls::ServerConfig>>, StartError> {
    match files {
        Some(files) => Ok(Some(
            tls::server_config(&files.cert, &files.key).map_err(StartError::Tls)?,
        )),
        None => Ok(None),
    }
}

impl RunningServer {
    /// Reads the tokens and whitelist files again (SIGHUP): see [`Reloader::reload`].
    pub fn reload(&self, cause: &str) -> Result<(), String> {
        self.reloader.reload(cause)
    }

    /// The external port's address.
    pub fn external_addr(&self) -> SocketAddr {
        self.external
    }

    /// The internal port's address.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The cluster, when clustering is on.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Stops accepting, finishes in-flight requests (external port first, so no upload is cut off
    /// while the store is still open), sends what the remote-write queue holds (for a few seconds
    /// at most), then closes the store. Clustered, the handoff thread and the heartbeats stop
    /// first, so peers start taking over this node's clusters at once.
    pub fn shutdown(mut self) {
        if let Some(mut handoff) = self.handoff.take() {
            handoff.shutdown();
        }
        if let Some(cluster) = &self.cluster {
            cluster.shutdown();
        }
        for (port, handle) in self.fronts.take() {
            info!("stopping the {port} port");
            handle.shutdown(SHUTDOWN_GRACE);
        }
        if let Some(writer) = &self.remote_write {
            info!(
                "remote write: shipping for up to {REMOTE_WRITE_GRACE:?} before stopping ({} uploads in hand; the rest of the backlog stays on disk)",
                writer.queue_length()
            );
            writer.shutdown(REMOTE_WRITE_GRACE);
        }
        self.store.close();
        info!("stopped");
    }
}
