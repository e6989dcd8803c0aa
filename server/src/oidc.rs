//! The OIDC access token presented to the upstream authorization service (`--authorize-issuer-url`,
//! `--authorize-client-id`, `--authorize-client-secret`, `--authorize-username`,
//! `--authorize-password`), as upstream's server obtained it.
//!
//! The token endpoint is discovered once at `<issuer>/.well-known/openid-configuration`; a token is
//! then fetched with a form-encoded POST: the client credentials grant, or the resource owner
//! password grant when a user name is configured, with the client id and secret in the form. It is
//! reused until `expires_in` minus a margin, and fetched again early when the service answers 401
//! (the service may have revoked it).
//!
//! Every wait is bounded by the caller's deadline: one caller fetches while the others wait on a
//! condition variable for at most their own deadline, and a failed fetch is remembered for a
//! moment so that a dead issuer is not asked again by every waiting request in turn. The client
//! secret, the password and the access token are never logged nor shown by `Debug`.

use std::fmt;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::OidcConfig;

/// Most of a token's lifetime kept as margin before it expires: a quarter, and at most this.
pub const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// A token younger than this is not dropped after a 401. A 401 also means "unknown client token",
/// so without this anyone could make us fetch a token from the issuer per bad `/authorize`.
pub const MIN_AGE_TO_REFRESH_AFTER_401: Duration = Duration::from_secs(1);
/// How long a failed fetch is answered from memory instead of asking the issuer again.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(1);
/// Largest discovery document or token response read.
const MAX_REPLY_BYTES: u64 = 64 << 10;

/// Why no access token could be obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OidcError {
    /// The discovery document could not be fetched or read.
    Discovery(String),
    /// The token endpoint could not be reached or refused.
    Token(String),
    /// The caller's deadline passed while another request was fetching.
    Deadline,
}

impl fmt::Display for OidcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OidcError::Discovery(reason) => write!(f, "OIDC discovery failed: {reason}"),
            OidcError::Token(reason) => write!(f, "OIDC token request failed: {reason}"),
            OidcError::Deadline => f.write_str("OIDC token not obtained before the deadline"),
        }
    }
}

impl std::error::Error for OidcError {}

/// Obtains and caches the access token.
pub struct TokenSource {
    config: OidcConfig,
    agent: ureq::Agent,
    state: Mutex<State>,
    fetched: Condvar,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("issuer_url", &self.config.issuer_url)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    /// The token endpoint, once discovered.
    endpoint: Option<String>,
    token: Option<Cached>,
    /// Whether a request is fetching now (the others wait for it).
    fetching: bool,
    failure: Option<(Instant, OidcError)>,
    /// Token requests made, for the log line of each.
    fetches: u64,
}

struct Cached {
    access_token: String,
    fetched_at: Instant,
    /// When to fetch another; None: when the service refuses this one.
    refresh_at: Option<Instant>,
    /// When it expires; until then it is still used if fetching another fails.
    expires_at: Option<Instant>,
}

impl State {
    /// The cached token if it has not expired yet (it may be due for a refresh).
    fn unexpired(&self, now: Instant) -> Option<String> {
        let token = self.token.as_ref()?;
        token
            .expires_at
            .is_none_or(|at| now < at)
            .then(|| token.access_token.clone())
    }
}

#[derive(Deserialize)]
struct Discovery {
    #[serde(default)]
    issuer: String,
    #[serde(default)]
    token_endpoint: String,
}

#[derive(Deserialize)]
struct TokenReply {
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    /// Seconds; some issuers send it as a string.
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorReply {
    #[serde(default)]
    error: String,
}

impl TokenSource {
    /// A source for `config`, making its requests with `agent` (whose connect timeout applies).
    pub fn new(config: OidcConfig, agent: ureq::Agent) -> TokenSource {
        TokenSource {
            config,
            agent,
            state: Mutex::new(State::default()),
            fetched: Condvar::new(),
        }
    }

    /// The access token to use now: the cached one while it is fresh, else a new one (one caller
    /// fetches, the others wait for it), all before `deadline`.
    pub fn token(&self, deadline: Instant) -> Result<String, OidcError> {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            if let Some(token) = &state.token {
                if token.refresh_at.is_none_or(|at| now < at) {
                    return Ok(token.access_token.clone());
                }
            }
            if let Some((at, err)) = &state.failure {
                if now.duration_since(*at) < FAILURE_MEMORY {
                    return state.unexpired(now).ok_or_else(|| err.clone());
                }
            }
            if !state.fetching {
                break;
            }
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(OidcError::Deadline);
            }
            state = self
                .fetched
                .wait_timeout(state, left)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        state.fetching = true;
        state.fetches += 1;
        let fetch = state.fetches;
        let endpoint = state.endpoint.clone();
        drop(state);

        let result = self.fetch(endpoint, deadline);

        let mut state = self.lock();
        state.fetching = false;
        let answer = match result {
            Ok((endpoint, reply)) => {
                let now = Instant::now();
                let lifetime = expires_in(reply.expires_in.as_ref());
                log::info!(
                    "OIDC: access token {fetch} for --authorize obtained from {endpoint} ({})",
                    match lifetime {
                        Some(l) => format!("expires in {}s", l.as_secs()),
                        None => "no expiry given".to_string(),
                    }
                );
                state.endpoint = Some(endpoint);
                state.failure = None;
                state.token = Some(Cached {
                    access_token: reply.access_token.clone(),
                    fetched_at: now,
                    refresh_at: lifetime.map(|l| now + l - refresh_margin(l)),
                    expires_at: lifetime.map(|l| now + l),
                });
                Ok(reply.access_token)
            }
            Err(err) => {
                log::warn!("OIDC: {err}");
                // Our own deadline passing says nothing about the issuer.
                if err != OidcError::Deadline {
                    state.failure = Some((Instant::now(), err.clone()));
                }
                // A token due for a refresh but not expired still works meanwhile.
                state.unexpired(Instant::now()).ok_or(err)
            }
        };
        drop(state);
        self.fetched.notify_all();
        answer
    }

    /// After the service answered 401 to a call made with `used`: whether a retry with another
    /// token makes sense. It does when `used` was replaced meanwhile, or is old enough to be
    /// dropped now (see [`MIN_AGE_TO_REFRESH_AFTER_401`]).
    pub fn refused(&self, used: &str) -> bool {
        let mut state = self.lock();
        match &state.token {
            Some(token) if token.access_token == used => {
                if token.fetched_at.elapsed() < MIN_AGE_TO_REFRESH_AFTER_401 {
                    return false;
                }
                log::info!("OIDC: --authorize refused the access token (401): fetching another");
                state.token = None;
                true
            }
            _ => true,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        telemeter_common::sync::lock(&self.state)
    }

    /// Discovers the endpoint (when not known yet) and requests a token.
    fn fetch(
        &self,
        endpoint: Option<String>,
        deadline: Instant,
    ) -> Result<(String, TokenReply), OidcError> {
        let endpoint = match endpoint {
            Some(endpoint) => endpoint,
            None => self.discover(deadline)?,
        };
        let mut form: Vec<(&str, &str)> = Vec::with_capacity(5);
        match &self.config.password_grant {
            Some((user, password)) => {
                form.push(("grant_type", "password"));
                form.push(("username", user));
                form.push(("password", password.expose()));
            }
            None => form.push(("grant_type", "client_credentials")),
        }
        form.push(("client_id", &self.config.client_id));
        if let Some(secret) = &self.config.client_secret {
            form.push(("client_secret", secret.expose()));
        }
        let mut response = self
            .agent
            .post(&endpoint)
            .header("Accept", "application/json")
            .config()
            .timeout_global(Some(left(deadline).map_err(|()| OidcError::Deadline)?))
            .build()
            .send_form(form)
            .map_err(|e| OidcError::Token(format!("{endpoint}: {e}")))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .map_err(|e| OidcError::Token(format!("{endpoint}: reading the reply: {e}")))?;
        if status != 200 {
            // Only the OAuth error code: a description may echo what we sent.
            let code = serde_json::from_slice::<ErrorReply>(&body)
                .map(|e| printable(&e.error))
                .unwrap_or_default();
            return Err(OidcError::Token(format!(
                "{endpoint} answered {status} {code}"
            )));
        }
        let reply: TokenReply = serde_json::from_slice(&body)
            .map_err(|e| OidcError::Token(format!("{endpoint}: invalid JSON: {e}")))?;
        if reply.access_token.is_empty() {
            return Err(OidcError::Token(format!("{endpoint}: no access_token")));
        }
        if let Some(kind) = &reply.token_type {
            if !kind.eq_ignore_ascii_case("bearer") {
                return Err(OidcError::Token(format!(
                    "{endpoint}: token_type {:?}, not bearer",
                    printable(kind)
                )));
            }
        }
        Ok((endpoint, reply))
    }

    fn discover(&self, deadline: Instant) -> Result<String, OidcError> {
        let issuer = self.config.issuer_url.trim_end_matches('/');
        let url = format!("{issuer}/.well-known/openid-configuration");
        let mut response = self
            .agent
            .get(&url)
            .header("Accept", "application/json")
            .config()
            .timeout_global(Some(left(deadline).map_err(|()| OidcError::Deadline)?))
            .build()
            .call()
            .map_err(|e| OidcError::Discovery(format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(OidcError::Discovery(format!("{url} answered {status}")));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .map_err(|e| OidcError::Discovery(format!("{url}: {e}")))?;
        let document: Discovery = serde_json::from_slice(&body)
            .map_err(|e| OidcError::Discovery(format!("{url}: invalid JSON: {e}")))?;
        // As go-oidc (upstream) does: a document naming another issuer is not this issuer's.
        if document.issuer.trim_end_matches('/') != issuer {
            return Err(OidcError::Discovery(format!(
                "{url} names issuer {:?}, not {issuer:?}",
                printable(&document.issuer)
            )));
        }
        let endpoint = document.token_endpoint;
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(OidcError::Discovery(format!(
                "{url}: token_endpoint {:?} is not an http(s) URL",
                printable(&endpoint)
            )));
        }
        Ok(endpoint)
    }
}

/// Time left before `deadline`; Err when none.
fn left(deadline: Instant) -> Result<Duration, ()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(())
    } else {
        Ok(left)
    }
}

/// `expires_in` as a lifetime (a number, or a string of digits); None when absent or unreadable.
fn expires_in(value: Option<&serde_json::Value>) -> Option<Duration> {
    let secs = match value? {
        serde_json::Value::Number(n) => n.as_u64()?,
        serde_json::Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// How long before expiry a token is replaced: a quarter of its lifetime, at most
/// [`MAX_REFRESH_MARGIN`].
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 4).min(MAX_REFRESH_MARGIN)
}

/// `text` cut to 100 characters without control characters, for a log line.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(100).collect()
}

#[cfg(test)]
mod tests;
