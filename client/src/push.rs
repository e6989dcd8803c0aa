//! Pushing to telemeter-server: `POST /authorize?id=` for an upload token (cached in memory and,
//! with `--token-cache`, on disk), then `POST /upload` of protobuf-delimited, snappy-framed families.

use crate::transform;
use crate::USER_AGENT;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use telemeter_common::agent::{self, AgentError};
use telemeter_common::http::percent_encode;
use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::model::MetricFamily;
use telemeter_common::{delimited, snappy};

/// The most of an `/authorize` reply that is read.
const MAX_AUTHORIZE_REPLY: u64 = 16 << 10;
/// The most of an error reply that is read (only its first line is reported).
const MAX_ERROR_REPLY: u64 = 4 << 10;
/// A token is refreshed this long before it expires (upstream's margin).
const EXPIRY_MARGIN: Duration = Duration::from_secs(15);

/// The request header that marks an upload as a backfill (sent late, from the spool or a bundle).
pub const BACKFILL_HEADER: &str = "X-Telemeter-Backfill";

/// Why a push failed.
#[derive(Debug)]
pub enum PushError {
    /// The request could not be made (connection refused, timeout, TLS).
    Transport {
        /// The URL (without query).
        url: String,
        /// What went wrong.
        message: String,
    },
    /// `/authorize` refused the client token or failed.
    Authorize {
        /// The status.
        status: u16,
        /// The first line of the reply.
        message: String,
    },
    /// `/authorize` answered 200 with a body that is not a token reply.
    BadAuthorizeReply(String),
    /// The server is rate limiting this cluster.
    RateLimited {
        /// What `Retry-After` asked for, when it was given in seconds.
        retry_after: Option<Duration>,
    },
    /// `/upload` answered with a status other than 200 (401 after a fresh token included).
    Upload {
        /// The status.
        status: u16,
        /// The first line of the reply.
        message: String,
    },
    /// `/authorize` or `/upload` answered with a redirect, which is not followed.
    Redirected {
        /// `authorize` or `upload`.
        what: &'static str,
        /// The URL (without query).
        url: String,
        /// The status.
        status: u16,
        /// The `Location` header, quoted (see [`agent::location`]).
        location: String,
    },
    /// The compressed upload body is larger than `--limit-bytes`.
    TooLarge {
        /// The body size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushError::Transport { url, message } => write!(f, "request to {url} failed: {message}"),
            PushError::Authorize { status, message } => {
                write!(f, "authorize refused with status {status}: {message}")
            }
            PushError::BadAuthorizeReply(m) => write!(f, "authorize reply not understood: {m}"),
            PushError::RateLimited {
                retry_after: Some(d),
            } => write!(f, "upload rate limited (429), retry after {}s", d.as_secs()),
            PushError::RateLimited { retry_after: None } => {
                write!(f, "upload rate limited (429)")
            }
            PushError::Upload { status, message } => {
                write!(f, "upload refused with status {status}: {message}")
            }
            PushError::Redirected {
                what,
                url,
                status,
                location,
            } => write!(
                f,
                "{what} at {url} answered {status} with Location {location}; redirects are not followed: give the final URL in --to (or --to-auth/--to-upload)"
            ),
            PushError::TooLarge { size, limit } => write!(
                f,
                "refusing to send {size} bytes (compressed): over --limit-bytes ({limit} bytes); narrow --match or raise --limit-bytes"
            ),
        }
    }
}

impl std::error::Error for PushError {}

impl PushError {
    /// Whether the server refused this very upload's content for good: `/upload` answered 400,
    /// 403 (a label the token sets carries another value), 413 or 422, or the body is over
    /// `--limit-bytes`. Sending the same bytes again would fail again whatever else changes;
    /// every other failure (an `/authorize` refusal, a redirect, a 401 on `/upload`) is about the
    /// client's set-up or the way to the server, not about the upload, so a spooled upload
    /// outlives it.
    pub fn refuses_the_body(&self) -> bool {
        match self {
            PushError::Upload { status, .. } => matches!(status, 400 | 403 | 413 | 422),
            PushError::TooLarge { .. } => true,
            _ => false,
        }
    }

    /// Whether the same upload may succeed later (connection, timeout, 5xx, 429), so it is worth
    /// spooling; a 4xx other than 429, a redirect or an oversized body would fail again.
    pub fn is_retryable(&self) -> bool {
        match self {
            PushError::Transport { .. } | PushError::RateLimited { .. } => true,
            PushError::Authorize { status, .. } | PushError::Upload { status, .. } => {
                *status >= 500 || *status == 429
            }
            PushError::BadAuthorizeReply(_)
            | PushError::Redirected { .. }
            | PushError::TooLarge { .. } => false,
        }
    }
}

/// The `/authorize` reply.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizeReply {
    /// Protocol version (1).
    #[serde(default)]
    pub version: i64,
    /// The upload token.
    pub token: String,
    /// Lifetime of the token.
    #[serde(default)]
    pub expires_in_seconds: i64,
    /// Labels to set on every series.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// An upload token and when to stop using it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadToken {
    /// The token, sent as the bearer of `/upload`.
    pub token: String,
    /// When to authorize again.
    pub refresh_at: SystemTime,
    /// Labels `/authorize` asked to set on every series.
    pub labels: BTreeMap<String, String>,
}

/// When a token obtained at `issued` and valid for `expires_in_seconds` should be replaced:
/// 15 s before expiry, or at half its life when that is shorter than a minute (upstream cached such
/// tokens forever). A non-positive lifetime means "use it for this push only".
pub fn refresh_at(issued: SystemTime, expires_in_seconds: i64) -> SystemTime {
    if expires_in_seconds <= 0 {
        return issued;
    }
    let life = Duration::from_secs(expires_in_seconds as u64);
    if life >= Duration::from_secs(60) {
        issued + life - EXPIRY_MARGIN
    } else {
        issued + life / 2
    }
}

/// The token cache file's contents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct CacheFile {
    authorize_url: String,
    id: String,
    /// SHA-256 of the client token, so a rotated client token is not paired with an old upload token.
    client_token_sha256: String,
    token: String,
    refresh_at_unix: u64,
    labels: BTreeMap<String, String>,
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_secs(t: SystemTime) -> u64 {
    telemeter_common::time::unix_seconds(t)
}

/// Writes `bytes` to `path` whole or not at all, readable by the owner only.
fn write_private_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "token-cache".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    crate::file::write_private(path, &tmp, bytes)
}

/// Authorizes and uploads to one server as one cluster.
pub struct Pusher {
    agent: ureq::Agent,
    authorize_url: String,
    upload_url: String,
    id: String,
    client_token: String,
    limit_bytes: usize,
    cache_file: Option<PathBuf>,
    token: Option<UploadToken>,
}

/// What a successful push sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// Series sent.
    pub series: usize,
    /// Samples sent.
    pub samples: usize,
    /// Compressed body size.
    pub bytes: usize,
}

impl Pusher {
    /// A pusher; with `cache_file`, a still-valid token stored there by an earlier run is reused.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        authorize_url: &str,
        upload_url: &str,
        id: &str,
        client_token: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
        limit_bytes: usize,
        cache_file: Option<PathBuf>,
    ) -> Result<Pusher, AgentError> {
        let mut pusher = Pusher {
            agent: agent::build(ca_file, timeout, agent::Redirects::Refuse, USER_AGENT)?,
            authorize_url: authorize_url.to_string(),
            upload_url: upload_url.to_string(),
            id: id.to_string(),
            client_token: client_token.to_string(),
            limit_bytes,
            cache_file,
            token: None,
        };
        pusher.token = pusher.load_cache(SystemTime::now());
        Ok(pusher)
    }

    /// The cached token, if any (for tests and logs; never log `.token`).
    pub fn cached_token(&self) -> Option<&UploadToken> {
        self.token.as_ref()
    }

    fn load_cache(&self, now: SystemTime) -> Option<UploadToken> {
        let path = self.cache_file.as_ref()?;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                log::warn!("ignoring token cache {}: {e}", path.display());
                return None;
            }
        };
        let cache: CacheFile = match serde_json::from_slice(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("ignoring token cache {}: {e}", path.display());
                return None;
            }
        };
        let refresh_at = UNIX_EPOCH + Duration::from_secs(cache.refresh_at_unix);
        if cache.authorize_url != self.authorize_url
            || cache.id != self.id
            || cache.client_token_sha256 != sha256_hex(&self.client_token)
            || refresh_at <= now
        {
            log::debug!(
                "token cache {} is for another server, cluster or client token, or expired",
                path.display()
            );
            return None;
        }
        Some(UploadToken {
            token: cache.token,
            refresh_at,
            labels: cache.labels,
        })
    }

    fn store_cache(&self, token: &UploadToken) {
        let Some(path) = &self.cache_file else {
            return;
        };
        let cache = CacheFile {
            authorize_url: self.authorize_url.clone(),
            id: self.id.clone(),
            client_token_sha256: sha256_hex(&self.client_token),
            token: token.token.clone(),
            refresh_at_unix: unix_secs(token.refresh_at),
            labels: token.labels.clone(),
        };
        let written = serde_json::to_vec(&cache)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_private_atomically(path, &bytes));
        if let Err(e) = written {
            log::warn!(
                "cluster {}: cannot write token cache {}: {e}",
                self.id,
                path.display()
            );
        }
    }

    fn forget_token(&mut self) {
        self.token = None;
        if let Some(path) = &self.cache_file {
            let _ = std::fs::remove_file(path);
        }
    }

    /// A valid upload token: the cached one, or a fresh one from `/authorize`.
    pub fn token(&mut self) -> Result<UploadToken, PushError> {
        if let Some(t) = &self.token {
            if SystemTime::now() < t.refresh_at {
                return Ok(t.clone());
            }
        }
        let token = self.authorize()?;
        self.token = Some(token.clone());
        self.store_cache(&token);
        Ok(token)
    }

    /// Asks `/authorize` for a new upload token.
    pub fn authorize(&self) -> Result<UploadToken, PushError> {
        let issued = SystemTime::now();
        let sep = if self.authorize_url.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!("{}{sep}id={}", self.authorize_url, percent_encode(&self.id));
        let mut response = self
            .agent
            .post(&url)
            .header("Authorization", format!("Bearer {}", self.client_token))
            .send_empty()
            .map_err(|e| PushError::Transport {
                url: self.authorize_url.clone(),
                message: e.to_string(),
            })?;
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            return Err(PushError::Redirected {
                what: "authorize",
                url: self.authorize_url.clone(),
                status,
                location: agent::location(response.headers()),
            });
        }
        let limit = if status == 200 || status == 201 {
            MAX_AUTHORIZE_REPLY
        } else {
            MAX_ERROR_REPLY
        };
        let body = response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| PushError::Transport {
                url: self.authorize_url.clone(),
                message: format!("reading the reply: {e}"),
            })?;
        if status != 200 && status != 201 {
            return Err(PushError::Authorize {
                status,
                message: agent::first_line(&body),
            });
        }
        let reply: AuthorizeReply = serde_json::from_slice(&body)
            .map_err(|e| PushError::BadAuthorizeReply(e.to_string()))?;
        if reply.token.is_empty() {
            return Err(PushError::BadAuthorizeReply("empty token".into()));
        }
        log::info!(
            "cluster {}: authorized, token valid for {}s",
            self.id,
            reply.expires_in_seconds
        );
        Ok(UploadToken {
            token: reply.token,
            refresh_at: refresh_at(issued, reply.expires_in_seconds),
            labels: reply.labels,
        })
    }

    /// Stamps the token's labels on `families` and uploads them. A 401 drops the token,
    /// authorizes again and retries once.
    pub fn push(&mut self, families: &mut [MetricFamily]) -> Result<Pushed, PushError> {
        let token = self.token()?;
        let prepared = self.prepare(families, Some(&token.labels))?;
        self.send(&prepared, false)?;
        Ok(prepared.pushed)
    }

    /// The upload of `families` as it goes on the wire: `labels` (the token's) stamped, encoded,
    /// compressed, and checked against `--limit-bytes`. Without labels the server stamps them.
    pub fn prepare(
        &self,
        families: &mut [MetricFamily],
        labels: Option<&BTreeMap<String, String>>,
    ) -> Result<Prepared, PushError> {
        if let Some(labels) = labels {
            transform::stamp_labels(families, labels);
        }
        let body = snappy::encode_framed(&delimited::encode(families));
        if body.len() > self.limit_bytes {
            return Err(PushError::TooLarge {
                size: body.len(),
                limit: self.limit_bytes,
            });
        }
        Ok(Prepared {
            pushed: Pushed {
                series: families.iter().map(|f| f.metric.len()).sum(),
                samples: families.iter().map(|f| f.sample_count()).sum(),
                bytes: body.len(),
            },
            body,
        })
    }

    /// Uploads a prepared body; `backfill` marks an upload sent late (from the spool), which the
    /// server counts against its backfill budget rather than the fresh-push rate limit. A 401
    /// drops the token, authorizes again and retries once.
    pub fn send(&mut self, prepared: &Prepared, backfill: bool) -> Result<(), PushError> {
        let token = self.token()?;
        match self.upload(&prepared.body, &token, backfill) {
            Err(PushError::Upload { status: 401, .. }) => {
                log::info!(
                    "cluster {}: upload token refused (401), authorizing again",
                    self.id
                );
                self.forget_token();
                let token = self.token()?;
                self.upload(&prepared.body, &token, backfill)
            }
            other => other,
        }
    }

    fn upload(&self, body: &[u8], token: &UploadToken, backfill: bool) -> Result<(), PushError> {
        let transport = |e: ureq::Error| PushError::Transport {
            url: self.upload_url.clone(),
            message: e.to_string(),
        };
        let mut request = self
            .agent
            .post(&self.upload_url)
            .header("Authorization", format!("Bearer {}", token.token))
            .header("Content-Type", PROTO_DELIMITED)
            .header("Content-Encoding", "snappy");
        if backfill {
            request = request.header(BACKFILL_HEADER, "1");
        }
        let mut response = request.send(body).map_err(transport)?;
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            return Err(PushError::Redirected {
                what: "upload",
                url: self.upload_url.clone(),
                status,
                location: agent::location(response.headers()),
            });
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(agent::parse_retry_after);
        let reply = response
            .body_mut()
            .with_config()
            .limit(MAX_ERROR_REPLY)
            .read_to_vec()
            .unwrap_or_default();
        match status {
            200..=299 => Ok(()),
            429 => Err(PushError::RateLimited { retry_after }),
            _ => Err(PushError::Upload {
                status,
                message: agent::first_line(&reply),
            }),
        }
    }
}

/// An upload ready to send: the exact bytes, and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Snappy-framed, protobuf-delimited families.
    pub body: Vec<u8>,
    /// What the body holds.
    pub pushed: Pushed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_margins() {
        let t = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(refresh_at(t, 86400), t + Duration::from_secs(86385));
        assert_eq!(refresh_at(t, 60), t + Duration::from_secs(45));
        // Short-lived tokens are refreshed at half life, not cached forever like upstream.
        assert_eq!(refresh_at(t, 30), t + Duration::from_secs(15));
        assert_eq!(refresh_at(t, 0), t);
        assert_eq!(refresh_at(t, -5), t);
    }

    #[test]
    fn only_a_refusal_of_the_uploads_content_refuses_the_body() {
        let upload = |status| PushError::Upload {
            status,
            message: String::new(),
        };
        for status in [400, 403, 413, 422] {
            assert!(upload(status).refuses_the_body(), "{status}");
        }
        for status in [401, 404, 429, 500, 503] {
            assert!(!upload(status).refuses_the_body(), "{status}");
        }
        let authorize = PushError::Authorize {
            status: 403,
            message: String::new(),
        };
        assert!(!authorize.refuses_the_body());
        assert!(PushError::TooLarge { size: 2, limit: 1 }.refuses_the_body());
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(
            agent::parse_retry_after(" 120 "),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            agent::parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            None
        );
    }

    #[test]
    fn authorize_reply_parses_upstream_json() {
        let r: AuthorizeReply = serde_json::from_str(
            r#"{"version":1,"token":"abc","expiresInSeconds":86400,"labels":{"_id":"c1"}}"#,
        )
        .unwrap();
        assert_eq!(r.token, "abc");
        assert_eq!(r.expires_in_seconds, 86400);
        assert_eq!(r.labels.get("_id").map(String::as_str), Some("c1"));
    }

    fn pusher(cache: &Path, id: &str, client_token: &str) -> Pusher {
        Pusher {
            agent: ureq::Agent::new_with_defaults(),
            authorize_url: "http://s/authorize".into(),
            upload_url: "http://s/upload".into(),
            id: id.into(),
            client_token: client_token.into(),
            limit_bytes: 1 << 20,
            cache_file: Some(cache.to_path_buf()),
            token: None,
        }
    }

    #[test]
    fn upload_over_the_limit_is_refused_before_sending() {
        let dir = std::env::temp_dir().join(format!("tc-push-limit-{}", std::process::id()));
        let mut p = pusher(&dir.join("unused.json"), "c1", "client");
        p.cache_file = None;
        p.limit_bytes = 10;
        // Nothing listens on the upload URL: the error must come from the size check.
        p.upload_url = "http://127.0.0.1:1/upload".into();
        p.token = Some(UploadToken {
            token: "tok".into(),
            refresh_at: SystemTime::now() + Duration::from_secs(600),
            labels: BTreeMap::from([("_id".into(), "c1".into())]),
        });
        let mut families = vec![MetricFamily {
            name: Some("up".into()),
            r#type: Some(1),
            metric: vec![telemeter_common::model::Metric {
                gauge: Some(telemeter_common::model::Gauge { value: Some(1.0) }),
                timestamp_ms: Some(1),
                ..Default::default()
            }],
            ..Default::default()
        }];
        match p.push(&mut families) {
            Err(e @ PushError::TooLarge { limit: 10, .. }) => {
                assert!(e.to_string().contains("--limit-bytes"), "{e}")
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn token_cache_round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tc-push-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cache.json");
        let now = SystemTime::now();
        let token = UploadToken {
            token: "tok".into(),
            refresh_at: UNIX_EPOCH + Duration::from_secs(unix_secs(now) + 600),
            labels: BTreeMap::from([("_id".into(), "c1".into())]),
        };
        let p = pusher(&path, "c1", "client");
        p.store_cache(&token);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(p.load_cache(now), Some(token.clone()));
        // Another cluster id, another client token, or an expired token: ignored.
        assert_eq!(pusher(&path, "c2", "client").load_cache(now), None);
        assert_eq!(pusher(&path, "c1", "rotated").load_cache(now), None);
        assert_eq!(p.load_cache(now + Duration::from_secs(601)), None);
        // Garbage is ignored, not an error.
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(p.load_cache(now), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
