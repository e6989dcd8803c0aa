//! `/authorize`: exchanging a client token for a signed upload token.
//!
//! Client tokens are checked by one [`ClientAuthorizer`]: a tokens file, an upstream authorization
//! service ("tollbooth"), or, for tests only, anything. Upstream accepted any token when no service
//! was configured; here that needs `--insecure-accept-any-token`.
//!
//! `/authorize` runs on the same worker threads as `/upload`, so a slow authorization service must
//! not be able to hold them all: calls to it are capped (`--authorize-concurrency`, a non-blocking
//! try-acquire; over it the client gets 503 with Retry-After at once) and each has a deadline
//! (`--authorize-timeout`, `--authorize-connect-timeout`) covering its OIDC token fetch too.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};
use ring::digest;
use serde::Deserialize;
use telemeter_common::http::{Request, Response};
use telemeter_common::tls;
use telemeter_common::token::TokenSigner;

use crate::config::TollboothConfig;
use crate::metrics::Metrics;
use crate::oidc::TokenSource;

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
}

/// Why a tokens file could not be loaded.
#[derive(Debug)]
pub enum TokensFileError {
    /// The file could not be read.
    Read(std::io::Error),
    /// The JSON form is invalid.
    Json(serde_json::Error),
    /// A line of the line form is invalid.
    Line {
        /// The 1-based line number.
        line: usize,
        /// What was wrong.
        reason: String,
    },
    /// The file names no token.
    Empty,
}

impl fmt::Display for TokensFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokensFileError::Read(e) => write!(f, "{e}"),
            TokensFileError::Json(e) => write!(f, "invalid JSON: {e}"),
            TokensFileError::Line { line, reason } => write!(f, "line {line}: {reason}"),
            TokensFileError::Empty => f.write_str("no token in the file"),
        }
    }
}

impl std::error::Error for TokensFileError {}

/// Client tokens from a file, each allowed for some cluster ids or all (`*`, or a JSON entry
/// without `clusters`, which is upstream's tokens file `[{"token":"a"}]`).
///
/// Tokens are kept as SHA-256 digests, so a lookup's timing says nothing useful about a token.
#[derive(Debug, Default)]
pub struct TokensFile {
    tokens: HashMap<[u8; 32], Allowed>,
}

#[derive(Debug, Clone, Default)]
struct Allowed {
    any: bool,
    clusters: Vec<String>,
}

#[derive(Deserialize)]
struct JsonEntry {
    token: String,
    /// Absent: any cluster (upstream's authorization server knew no restriction).
    #[serde(default)]
    clusters: Option<Vec<String>>,
}

impl TokensFile {
    /// Reads and parses a tokens file.
    pub fn load(path: &Path) -> Result<TokensFile, TokensFileError> {
        let contents = std::fs::read_to_string(path).map_err(TokensFileError::Read)?;
        TokensFile::parse(&contents)
    }

    /// Parses a tokens file: JSON `[{"token":"…","clusters":["id","*"]}]` when the first
    /// non-space character is `[` (an entry without `clusters` may push for any cluster id; other
    /// fields are ignored), else lines `TOKEN ID1,ID2` or `TOKEN *` (`#` comments, blank lines
    /// skipped).
    pub fn parse(contents: &str) -> Result<TokensFile, TokensFileError> {
        let mut file = TokensFile::default();
        if contents.trim_start().starts_with('[') {
            let entries: Vec<JsonEntry> =
                serde_json::from_str(contents).map_err(TokensFileError::Json)?;
            for (i, entry) in entries.into_iter().enumerate() {
                if entry.token.is_empty() {
                    return Err(TokensFileError::Line {
                        line: i + 1,
                        reason: "entry has an empty token".into(),
                    });
                }
                match &entry.clusters {
                    None => file.add(&entry.token, std::iter::once("*")),
                    Some(clusters) if clusters.is_empty() => {
                        return Err(TokensFileError::Line {
                            line: i + 1,
                            reason: "entry has an empty \"clusters\" list: list cluster ids or \"*\", or leave the field out to allow any".into(),
                        })
                    }
                    Some(clusters) => file.add(&entry.token, clusters.iter().map(String::as_str)),
                }
            }
        } else {
            for (i, line) in contents.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut words = line.split_whitespace();
                let (Some(token), Some(clusters), None) =
                    (words.next(), words.next(), words.next())
                else {
                    return Err(TokensFileError::Line {
                        line: i + 1,
                        reason: "expected TOKEN CLUSTER1,CLUSTER2 or TOKEN *".into(),
                    });
                };
                file.add(token, clusters.split(',').filter(|c| !c.is_empty()));
            }
        }
        if file.tokens.is_empty() {
            return Err(TokensFileError::Empty);
        }
        Ok(file)
    }

    /// How many tokens the file holds.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the file holds no token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// How many tokens may push for any cluster id.
    pub fn unrestricted(&self) -> usize {
        self.tokens.values().filter(|a| a.any).count()
    }

    fn add<'a>(&mut self, token: &str, clusters: impl Iterator<Item = &'a str>) {
        let allowed = self.tokens.entry(token_digest(token)).or_default();
        for cluster in clusters {
            if cluster == "*" {
                allowed.any = true;
            } else {
                allowed.clusters.push(cluster.to_string());
            }
        }
    }
}

fn token_digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}

impl ClientAuthorizer for TokensFile {
    fn authorize(&self, token: &str, cluster_id: &str) -> Result<String, AuthorizeError> {
        let allowed = self
            .tokens
            .get(&token_digest(token))
            .ok_or(AuthorizeError::UnknownToken)?;
        if allowed.any || allowed.clusters.iter().any(|c| c == cluster_id) {
            Ok(cluster_id.to_string())
        } else {
            Err(AuthorizeError::NotAllowed {
                cluster_id: cluster_id.to_string(),
            })
        }
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

/// An upstream authorization service speaking the tollbooth protocol.
pub struct Tollbooth {
    url: String,
    agent: ureq::Agent,
    oidc: Option<TokenSource>,
    slots: Slots,
    timeout: Duration,
}

#[derive(serde::Serialize)]
struct TollboothRequest<'a> {
    cluster_id: &'a str,
    authorization_token: &'a str,
    account_id: &'a str,
}

#[derive(Deserialize)]
struct TollboothAnswer {
    #[serde(default)]
    account_id: String,
}

/// A counting semaphore that never waits: a call either gets a slot now or is refused.
struct Slots {
    in_flight: AtomicUsize,
    max: usize,
}

/// A taken slot, given back when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Slots {
    fn try_acquire(&self) -> Option<Slot<'_>> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(&self.in_flight))
    }
}

impl Tollbooth {
    /// A client of the service `config` names, trusting the system's root certificates for
    /// `https://` (the rustls crypto provider must be installed).
    pub fn new(config: &TollboothConfig) -> Tollbooth {
        // ureq is built without its bundled roots: without explicit roots an https call panics.
        let roots: Vec<ureq::tls::Certificate<'static>> = tls::system_roots()
            .iter()
            .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
            .collect();
        let agent_config = ureq::Agent::config_builder()
            .timeout_connect(Some(config.connect_timeout))
            // Each call also gets what is left of its deadline; this is the most it can be.
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
                    .build(),
            )
            .build();
        let agent = ureq::Agent::new_with_config(agent_config);
        Tollbooth {
            url: config.url.clone(),
            oidc: config
                .oidc
                .clone()
                .map(|oidc| TokenSource::new(oidc, agent.clone())),
            agent,
            slots: Slots {
                in_flight: AtomicUsize::new(0),
                max: config.concurrency.max(1),
            },
            timeout: config.timeout,
        }
    }

    /// Calls now in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.in_flight.load(Ordering::Acquire)
    }

    /// One call to the service, with `bearer` as its `Authorization`, before `deadline`.
    fn call(
        &self,
        token: &str,
        cluster_id: &str,
        bearer: Option<&str>,
        deadline: Instant,
    ) -> Result<String, AuthorizeError> {
        let body = serde_json::to_vec(&TollboothRequest {
            cluster_id,
            authorization_token: token,
            account_id: "",
        })
        .map_err(|e| AuthorizeError::BadAnswer(e.to_string()))?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AuthorizeError::Unavailable("deadline passed".into()));
        }
        let mut request = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json");
        if let Some(bearer) = bearer {
            request = request.header("Authorization", format!("Bearer {bearer}"));
        }
        let mut response = request
            .config()
            .timeout_global(Some(left))
            .build()
            .send(&body[..])
            .map_err(|e| AuthorizeError::Unavailable(e.to_string()))?;
        let status = response.status().as_u16();
        match status {
            200 | 201 => {}
            401 => return Err(AuthorizeError::UnknownToken),
            429 => {
                let retry_after = response
                    .headers()
                    .get("Retry-After")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(DEFAULT_RETRY_AFTER_SECS);
                return Err(AuthorizeError::RateLimited { retry_after });
            }
            other => return Err(AuthorizeError::Rejected { status: other }),
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(16 << 10)
            .read_to_vec()
            .map_err(|e| AuthorizeError::BadAnswer(e.to_string()))?;
        let answer: TollboothAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| AuthorizeError::BadAnswer(format!("invalid JSON: {e}")))?;
        if answer.account_id.is_empty() {
            return Err(AuthorizeError::BadAnswer("no account_id".into()));
        }
        Ok(answer.account_id)
    }
}

impl ClientAuthorizer for Tollbooth {
    fn authorize(&self, token: &str, cluster_id: &str) -> Result<String, AuthorizeError> {
        let Some(_slot) = self.slots.try_acquire() else {
            return Err(AuthorizeError::Busy {
                retry_after: BUSY_RETRY_AFTER_SECS,
            });
        };
        let deadline = Instant::now() + self.timeout;
        let Some(oidc) = &self.oidc else {
            return self.call(token, cluster_id, None, deadline);
        };
        let bearer = oidc
            .token(deadline)
            .map_err(|e| AuthorizeError::Unavailable(e.to_string()))?;
        match self.call(token, cluster_id, Some(&bearer), deadline) {
            // The service may have revoked our access token: once, with a fresh one.
            Err(AuthorizeError::UnknownToken) if oidc.refused(&bearer) => {
                let bearer = oidc
                    .token(deadline)
                    .map_err(|e| AuthorizeError::Unavailable(e.to_string()))?;
                self.call(token, cluster_id, Some(&bearer), deadline)
            }
            other => other,
        }
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
                info!("authorize refused for cluster {id:?}: {e}");
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
        info!("authorized cluster {id:?}");
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
    let header = authorization.ok_or("Only bearer authorization allowed")?;
    let header = header.trim();
    let (scheme, token) = header.split_once(' ').unwrap_or((header, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("Only bearer authorization allowed");
    }
    let token = token.trim();
    if token.is_empty() {
        return Err("Invalid Authorization header");
    }
    Ok(token)
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
