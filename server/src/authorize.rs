//! `/authorize`: exchanging a client token for a signed upload token.
//!
//! Client tokens are checked by one [`ClientAuthorizer`]: a tokens file ([`TokensFile`], in
//! `tokens_file.rs`), an upstream authorization service ("tollbooth", [`Tollbooth`], in
//! `tollbooth.rs`), or, for tests only, anything. Upstream accepted any token when no service
//! was configured; here that needs `--insecure-accept-any-token`.
//!
//! `/authorize` runs on the same worker threads as `/upload`, so a slow authorization service must
//! not be able to hold them all: calls to it are capped (`--authorize-concurrency`, a non-blocking
//! try-acquire; over it the client gets 503 with Retry-After at once) and each has a deadline
//! (`--authorize-timeout`, `--authorize-connect-timeout`) covering its OIDC token fetch too.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use log::{info, warn};
use serde::Deserialize;
use telemeter_common::http::{Request, Response};
use telemeter_common::token::TokenSigner;

use crate::metrics::Metrics;

mod tokens_file;
mod tollbooth;

pub use tokens_file::{TokensFile, TokensFileError};
pub use tollbooth::Tollbooth;

/// Longest cluster id accepted, in bytes.
pub const MAX_CLUSTER_ID_BYTES: usize = 255;
/// Largest `/authorize` body read (it is empty, or a small form).
pub const MAX_BODY_BYTES: usize = 4 << 10;
/// `Retry-After` sent when the authorization service rate-limits without saying for how long
/// (upstream's value).
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 300;
/// `Retry-After` sent when every slot for calls to the authorization service is taken.
pub const BUSY_RETRY_AFTER_SECS: u64 = 5;

/// Why a client token was not accepted for a cluster id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeError {
    /// The token is not known.
    UnknownToken,
    /// The token is known but may not push for this cluster id.
    NotAllowed {
        /// The cluster id asked for.
        cluster_id: String,
    },
    /// The authorization service asks to come back later.
    RateLimited {
        /// Seconds to wait.
        retry_after: u64,
    },
    /// The authorization service answered an unexpected status.
    Rejected {
        /// Its status.
        status: u16,
    },
    /// The authorization service answered something we cannot read.
    BadAnswer(String),
    /// The authorization service could not be reached.
    Unavailable(String),
    /// As many calls to the authorization service as allowed are in flight already.
    Busy {
        /// Seconds to wait.
        retry_after: u64,
    },
}

impl AuthorizeError {
    /// The HTTP status for the client.
    pub fn status(&self) -> u16 {
        match self {
            AuthorizeError::UnknownToken => 401,
            AuthorizeError::NotAllowed { .. } => 403,
            AuthorizeError::RateLimited { .. } => 429,
            AuthorizeError::Rejected { .. } | AuthorizeError::BadAnswer(_) => 502,
            AuthorizeError::Unavailable(_) | AuthorizeError::Busy { .. } => 503,
        }
    }
}

impl fmt::Display for AuthorizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthorizeError::UnknownToken => f.write_str("unauthorized"),
            AuthorizeError::NotAllowed { cluster_id } => {
                write!(f, "the token may not push for cluster {cluster_id:?}")
            }
            AuthorizeError::RateLimited { retry_after } => write!(
                f,
                "authorization service is rate limiting: retry in {retry_after}s"
            ),
            AuthorizeError::Rejected { status } => {
                write!(f, "authorization service answered {status}")
            }
            AuthorizeError::BadAnswer(reason) => {
                write!(f, "authorization service answered badly: {reason}")
            }
            AuthorizeError::Unavailable(reason) => {
                write!(f, "authorization service unavailable: {reason}")
            }
            AuthorizeError::Busy { retry_after } => write!(
                f,
                "authorization service busy: too many authorizations in flight, retry in {retry_after}s"
            ),
        }
    }
}

impl std::error::Error for AuthorizeError {}

/// Checks client tokens.
pub trait ClientAuthorizer: Send + Sync + 'static {
    /// Whether `token` may push for `cluster_id`; the token subject (an account id) when it may.
    fn authorize(&self, token: &str, cluster_id: &str) -> Result<String, AuthorizeError>;

    /// The SHA-256 of every client token allowed for `cluster_id`, the keys of the tags of its
    /// air-gap bundles (`/import`); `None` when this source does not hold its tokens (an
    /// authorization service, any token), so no bundle can be verified.
    fn bundle_keys(&self, _cluster_id: &str) -> Option<Vec<[u8; 32]>> {
        None
    }
}

/// Accepts every token for every cluster (`--insecure-accept-any-token`).
#[derive(Debug, Default)]
pub struct AnyToken;

impl ClientAuthorizer for AnyToken {
    fn authorize(&self, _token: &str, cluster_id: &str) -> Result<String, AuthorizeError> {
        Ok(cluster_id.to_string())
    }
}

/// Serves `/authorize`.
pub struct AuthorizeHandler {
    authorizer: Arc<dyn ClientAuthorizer>,
    signer: TokenSigner,
    lifetime: Duration,
    partition_label: String,
    required_labels: Vec<(String, String)>,
    metrics: Metrics,
}

/// The JSON answer of `/authorize` (upstream's `TokenResponse`).
#[derive(Debug, serde::Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenResponse {
    /// Always 1.
    pub version: u32,
    /// The upload token.
    pub token: String,
    /// Seconds until the token expires.
    #[serde(rename = "expiresInSeconds")]
    pub expires_in_seconds: u64,
    /// Labels the client should put on every series (the partition label included).
    pub labels: BTreeMap<String, String>,
}

impl AuthorizeHandler {
    /// A handler issuing tokens valid `lifetime` that carry the partition label and `required_labels`.
    pub fn new(
        authorizer: Arc<dyn ClientAuthorizer>,
        signer: TokenSigner,
        lifetime: Duration,
        partition_label: &str,
        required_labels: Vec<(String, String)>,
        metrics: Metrics,
    ) -> AuthorizeHandler {
        AuthorizeHandler {
            authorizer,
            signer,
            lifetime,
            partition_label: partition_label.to_string(),
            required_labels,
            metrics,
        }
    }

    /// Answers one `/authorize` request.
    pub fn handle(&self, request: &Request) -> Response {
        let response = self.answer(request);
        let result = match response.status {
            200 => "ok",
            400 | 401 | 403 | 405 => "denied",
            _ => "error",
        };
        self.metrics.authorize.with(&[result]).inc();
        response
    }

    fn answer(&self, request: &Request) -> Response {
        if request.method != "POST" {
            return Response::text(405, "only POST is allowed").with_header("Allow", "POST");
        }
        let id = match request
            .query_param("id")
            .filter(|id| !id.is_empty())
            .or_else(|| request.form_param("id").filter(|id| !id.is_empty()))
        {
            Some(id) => id,
            None => {
                return Response::text(
                    400,
                    "The 'id' parameter must be specified via URL or url-encoded form body",
                )
            }
        };
        let token = match bearer(request) {
            Ok(token) => token,
            Err(reason) => return unauthorized(reason),
        };
        if let Err(reason) = check_cluster_id(&id) {
            return Response::text(400, &format!("invalid cluster id: {reason}"));
        }
        let subject = match self.authorizer.authorize(token, &id) {
            Ok(subject) => subject,
            Err(e) => {
                // With the peer: the first thing to look up when a site cannot push.
                info!(
                    "authorize from {} refused for cluster {id:?}: {e}",
                    request.remote
                );
                return match e {
                    AuthorizeError::UnknownToken => unauthorized(&e.to_string()),
                    AuthorizeError::RateLimited { retry_after } => {
                        Response::text(429, &e.to_string())
                            .with_header("Retry-After", &retry_after.to_string())
                    }
                    AuthorizeError::Busy { retry_after } => Response::text(503, &e.to_string())
                        .with_header("Retry-After", &retry_after.to_string()),
                    _ => Response::text(e.status(), &e.to_string()),
                };
            }
        };
        let mut labels = BTreeMap::new();
        for (name, value) in &self.required_labels {
            labels.insert(name.clone(), value.clone());
        }
        labels.insert(self.partition_label.clone(), id.clone());
        let token = self
            .signer
            .issue(&id, &subject, &labels, self.lifetime, SystemTime::now());
        info!("authorized cluster {id:?} from {}", request.remote);
        Response::json(
            200,
            &TokenResponse {
                version: 1,
                token,
                expires_in_seconds: self.lifetime.as_secs(),
                labels,
            },
        )
    }
}

/// The bearer token of a request, or the one-line reason (upstream's wording) it has none.
pub fn bearer(request: &Request) -> Result<&str, &'static str> {
    bearer_in(request.header("Authorization"))
}

/// [`bearer`] on the value of an `Authorization` header, when there is one (for a request head).
pub fn bearer_in(authorization: Option<&str>) -> Result<&str, &'static str> {
    telemeter_common::http::bearer(authorization)
        .map_err(telemeter_common::http::BearerError::reason)
}

/// A 401 with the challenge that says which scheme to use.
pub fn unauthorized(reason: &str) -> Response {
    Response::text(401, reason).with_header("WWW-Authenticate", "Bearer")
}

/// Whether `id` can be a cluster id: a label value of 1 to [`MAX_CLUSTER_ID_BYTES`] bytes without
/// control characters (it ends up in logs and file headers).
pub fn check_cluster_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty".into());
    }
    if id.len() > MAX_CLUSTER_ID_BYTES {
        return Err(format!("longer than {MAX_CLUSTER_ID_BYTES} bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err("contains control characters".into());
    }
    Ok(())
}

/// Builds the authorizer a token source names (loading a tokens file).
pub fn from_source(
    source: &crate::config::TokenSource,
) -> Result<Arc<dyn ClientAuthorizer>, TokensFileError> {
    Ok(match source {
        crate::config::TokenSource::File(path) => {
            let file = TokensFile::load(path)?;
            info!("client tokens: {} from {}", file.len(), path.display());
            let unrestricted = file.unrestricted();
            if unrestricted > 0 {
                warn!(
                    "client tokens: {unrestricted} of the {} tokens in {} may push for ANY cluster id (\"*\", or a JSON entry without \"clusters\" as in upstream's tokens file)",
                    file.len(),
                    path.display()
                );
            }
            Arc::new(file)
        }
        crate::config::TokenSource::Tollbooth(config) => {
            info!(
                "client tokens: checked by {} (at most {} calls at once, {}s deadline{})",
                config.url,
                config.concurrency,
                config.timeout.as_secs_f64(),
                match &config.oidc {
                    Some(oidc) => format!(", OIDC token from {}", oidc.issuer_url),
                    None => String::new(),
                }
            );
            Arc::new(Tollbooth::new(config))
        }
        crate::config::TokenSource::AnyToken => {
            warn!("client tokens: ANY token is accepted for ANY cluster (--insecure-accept-any-token)");
            Arc::new(AnyToken)
        }
    })
}

#[cfg(test)]
mod tests;
