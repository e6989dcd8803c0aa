//! The upstream authorization service ("tollbooth"): one HTTP call per `/authorize`, under a
//! cap on calls in flight and a deadline that covers its OIDC token fetch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use telemeter_common::tls;

use super::*;
use crate::config::TollboothConfig;
use crate::oidc::TokenSource;

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
