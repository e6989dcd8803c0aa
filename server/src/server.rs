//! Building and running a whole server from a [`Config`]: store, token signer, handlers, both ports.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use telemeter_common::http::{self, HttpError};
use telemeter_common::tls::{self, TlsError};
use telemeter_common::token::{KeyError, SharedKey, TokenSigner};

use crate::authorize::{self, AuthorizeHandler, TokensFileError};
use crate::config::{Config, TlsFiles};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::route::LocalRouter;
use crate::routes::{External, Fronts, Internal};
use crate::store::{Store, StoreConfig, StoreError};
use crate::upload::{UploadHandler, UploadLimits};
use crate::validate::Rules;

/// How long shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Most uploads one group commit of the store takes.
const STORE_MAX_BATCH: usize = 64;
/// Samples allowed per allowed series (histograms and summaries carry several).
const SAMPLES_PER_SERIES: usize = 10;

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
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::SharedKey(e) => write!(f, "--shared-key: {e}"),
            StartError::TokensFile(e) => write!(f, "--tokens-file: {e}"),
            StartError::Tls(e) => write!(f, "TLS: {e}"),
            StartError::Store(e) => write!(f, "--storage-path: {e}"),
            StartError::Http(e) => write!(f, "{e}"),
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
}

impl Server {
    /// Opens the store, builds the handlers and starts serving both ports.
    pub fn start(config: Config) -> Result<RunningServer, StartError> {
        tls::install_crypto_provider();
        let shared = match &config.shared_key {
            Some(path) => SharedKey::from_file(path).map_err(StartError::SharedKey)?,
            None => {
                warn!("no --shared-key: signing upload tokens with a random key; they stop working when this process ends");
                SharedKey::generate()
            }
        };
        let signer = TokenSigner::new(&shared);
        let authorizer =
            authorize::from_source(&config.token_source).map_err(StartError::TokensFile)?;
        let external_tls = load_tls(config.tls.as_ref())?;
        let internal_tls = load_tls(config.internal_tls.as_ref())?;
        if config.whitelist.is_empty() {
            info!("no whitelist: every valid series is stored");
        } else {
            info!("whitelist: {} selectors", config.whitelist.len());
        }

        let store = Store::open(StoreConfig {
            dir: config.storage_path.clone(),
            ttl: config.ttl,
            max_batch: STORE_MAX_BATCH,
        })
        .map_err(StartError::Store)?;
        let metrics = Metrics::new();

        let external_handler = External {
            authorize: AuthorizeHandler::new(
                authorizer,
                signer.clone(),
                config.token_lifetime,
                &config.partition_label,
                config.required_labels.clone(),
                metrics.clone(),
            ),
            upload: UploadHandler::new(
                signer,
                &config.partition_label,
                UploadLimits {
                    max_upload_bytes: config.max_upload_bytes,
                    max_decompressed_bytes: config.max_decompressed_bytes,
                    max_series: config.max_series,
                },
                Rules {
                    partition_label: config.partition_label.clone(),
                    extra_labels: config.labels.clone(),
                    whitelist: config.whitelist.clone(),
                    max_sample_age: config.max_sample_age,
                    max_future_skew: config.max_future_skew,
                    max_samples: config.max_series.saturating_mul(SAMPLES_PER_SERIES),
                },
                RateLimiter::new(config.ratelimit),
                Arc::new(LocalRouter::new(store.clone())),
                metrics.clone(),
            ),
        };
        let fronts = Arc::new(Fronts::default());
        let internal_handler = Internal {
            store: store.clone(),
            metrics,
            fronts: fronts.clone(),
        };

        let front_config = |name: &str, tls| {
            let mut c = http::Config {
                name: name.to_string(),
                max_connections: config.max_connections,
                tls,
                ..http::Config::default()
            };
            if let Some(workers) = config.workers {
                c.workers = workers;
            }
            c
        };
        let bound = http::Server::bind(
            &config.listen,
            front_config("external", external_tls),
            Arc::new(external_handler),
        )
        .and_then(|external| {
            http::Server::bind(
                &config.listen_internal,
                front_config("internal", internal_tls),
                Arc::new(internal_handler),
            )
            .map(|internal| (external, internal))
        });
        let (external, internal) = match bound {
            Ok(pair) => pair,
            Err(e) => {
                store.close();
                return Err(StartError::Http(e));
            }
        };
        let external = external.spawn();
        let internal = internal.spawn();
        let running = RunningServer {
            external: external.local_addr(),
            internal: internal.local_addr(),
            fronts,
            store,
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

fn load_tls(files: Option<&TlsFiles>) -> Result<Option<Arc<rustls::ServerConfig>>, StartError> {
    match files {
        Some(files) => Ok(Some(
            tls::server_config(&files.cert, &files.key).map_err(StartError::Tls)?,
        )),
        None => Ok(None),
    }
}

impl RunningServer {
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

    /// Stops accepting, finishes in-flight requests (external port first, so no upload is cut off
    /// while the store is still open), then closes the store.
    pub fn shutdown(self) {
        for (port, handle) in self.fronts.take() {
            info!("stopping the {port} port");
            handle.shutdown(SHUTDOWN_GRACE);
        }
        self.store.close();
        info!("stopped");
    }
}
