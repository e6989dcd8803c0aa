//! The remote-write bearer: `Authorization: Bearer <base64 of {"authorization_token": "...",
//! "cluster_id": "..."}>` (upstream v2's format; a Prometheus sends it with
//! `authorization: {credentials: <base64>}`), and a short cache of what the authorization service
//! answered, so a Prometheus sending every few seconds per shard does not call it every time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::authorize::{check_cluster_id, AuthorizeError, ClientAuthorizer};

/// The decoded bearer.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    /// The client token, checked like `/authorize` checks it.
    pub authorization_token: String,
    /// The cluster it pushes for.
    pub cluster_id: String,
}

/// Largest bearer read (base64 of a token and a cluster id).
const MAX_BEARER_BYTES: usize = 8 << 10;

/// The credentials in an `Authorization` header value, or the one-line reason (for a 401).
pub fn credentials(authorization: Option<&str>) -> Result<Credentials, String> {
    let bearer = crate::authorize::bearer_in(authorization).map_err(str::to_string)?;
    if bearer.len() > MAX_BEARER_BYTES {
        return Err("the bearer token is too long".into());
    }
    // Upstream encodes with standard base64 (padded); accept URL-safe and unpadded too.
    let normalized: String = bearer
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    let json = telemeter_common::base64::decode_url(&normalized)
        .ok_or("the bearer token is not base64")?;
    let creds: Credentials = serde_json::from_slice(&json).map_err(|_| {
        "the bearer token is not base64 of {\"authorization_token\": ..., \"cluster_id\": ...}"
            .to_string()
    })?;
    if creds.authorization_token.is_empty() {
        return Err("the bearer token has an empty authorization_token".into());
    }
    check_cluster_id(&creds.cluster_id).map_err(|e| format!("invalid cluster_id: {e}"))?;
    Ok(creds)
}

/// How long an answer of the authorization service is reused: a revoked token keeps pushing for
/// at most this long (only with `--authorize`; a tokens file is checked on every request).
pub const CACHE_OK: Duration = Duration::from_secs(60);
/// How long a refusal is reused, so a misconfigured sender retrying does not hammer the service.
pub const CACHE_REFUSED: Duration = Duration::from_secs(10);
/// Most answers cached; past it the cache is emptied (bounded memory whatever the senders do).
const CACHE_ENTRIES: usize = 10_000;

/// Checks credentials with the `/authorize` authorizer, caching its answers when it is a remote
/// service.
pub struct Authenticator {
    authorizer: Arc<dyn ClientAuthorizer>,
    /// Whether the authorizer is local (tokens file, any-token): cheap enough to run on the
    /// connection's thread for every request head, and never cached.
    local: bool,
    cache: Mutex<HashMap<(String, String), Cached>>,
}

/// A cached answer of the authorizer and until when it is used.
type Cached = (Result<(), AuthorizeError>, Instant);

impl Authenticator {
    /// An authenticator over `authorizer`; `local` when calling it costs no network round trip.
    pub fn new(authorizer: Arc<dyn ClientAuthorizer>, local: bool) -> Authenticator {
        Authenticator {
            authorizer,
            local,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// What is known of `creds` without calling a remote service: `Some` answer from the
    /// authorizer when it is local or its answer is cached, `None` when it must be asked
    /// ([`Authenticator::check`], off the connection thread).
    pub fn known(&self, creds: &Credentials, now: Instant) -> Option<Result<(), AuthorizeError>> {
        if self.local {
            return Some(self.ask(creds));
        }
        let cache = telemeter_common::sync::lock(&self.cache);
        let key = (creds.authorization_token.clone(), creds.cluster_id.clone());
        match cache.get(&key) {
            Some((answer, until)) if *until > now => Some(answer.clone()),
            _ => None,
        }
    }

    /// Whether `creds` may push: cached or local answer, else asks the authorizer and caches
    /// the definite answers (ok, unknown token, not allowed).
    pub fn check(&self, creds: &Credentials, now: Instant) -> Result<(), AuthorizeError> {
        if let Some(answer) = self.known(creds, now) {
            return answer;
        }
        let answer = self.ask(creds);
        let keep = match &answer {
            Ok(()) => Some(CACHE_OK),
            Err(AuthorizeError::UnknownToken | AuthorizeError::NotAllowed { .. }) => {
                Some(CACHE_REFUSED)
            }
            Err(_) => None,
        };
        if let Some(keep) = keep {
            let mut cache = telemeter_common::sync::lock(&self.cache);
            if cache.len() >= CACHE_ENTRIES {
                cache.retain(|_, (_, until)| *until > now);
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(
                (creds.authorization_token.clone(), creds.cluster_id.clone()),
                (answer.clone(), now + keep),
            );
        }
        answer
    }

    fn ask(&self, creds: &Credentials) -> Result<(), AuthorizeError> {
        self.authorizer
            .authorize(&creds.authorization_token, &creds.cluster_id)
            .map(|_| ())
    }
}

/// The bearer a sender puts in `Authorization` for `token` and `cluster_id` (standard base64 of
/// the JSON, as upstream's clients build it).
pub fn bearer_for(token: &str, cluster_id: &str) -> String {
    let json = serde_json::json!({ "authorization_token": token, "cluster_id": cluster_id });
    let url = telemeter_common::base64::encode_url(json.to_string().as_bytes());
    let mut standard: String = url
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    while standard.len() % 4 != 0 {
        standard.push('=');
    }
    standard
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorize::AnyToken;

    #[test]
    fn reads_standard_and_url_safe_base64() {
        let bearer = bearer_for("secret", "c1");
        let creds = credentials(Some(&format!("Bearer {bearer}"))).unwrap();
        assert_eq!(creds.authorization_token, "secret");
        assert_eq!(creds.cluster_id, "c1");
        let unpadded = bearer
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_");
        assert_eq!(
            credentials(Some(&format!("Bearer {unpadded}"))).unwrap(),
            creds
        );
    }

    #[test]
    fn refuses_what_is_not_credentials() {
        assert!(credentials(None).is_err());
        assert!(credentials(Some("Bearer !!!")).is_err());
        let not_json = telemeter_common::base64::encode_url(b"secret");
        assert!(credentials(Some(&format!("Bearer {not_json}"))).is_err());
        let empty_id = bearer_for("secret", "");
        assert!(credentials(Some(&format!("Bearer {empty_id}")))
            .unwrap_err()
            .contains("cluster_id"));
    }

    #[test]
    fn remote_answers_are_cached_local_ones_not() {
        let auth = Authenticator::new(Arc::new(AnyToken), false);
        let creds = Credentials {
            authorization_token: "t".into(),
            cluster_id: "c".into(),
        };
        let now = Instant::now();
        assert!(auth.known(&creds, now).is_none());
        assert_eq!(auth.check(&creds, now), Ok(()));
        assert_eq!(auth.known(&creds, now), Some(Ok(())));
        assert!(auth
            .known(&creds, now + CACHE_OK + Duration::from_secs(1))
            .is_none());
        let local = Authenticator::new(Arc::new(AnyToken), true);
        assert_eq!(local.known(&creds, now), Some(Ok(())));
    }
}
