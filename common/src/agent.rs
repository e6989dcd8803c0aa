//! The HTTP client side both binaries share: ureq agents with their own trust roots (the
//! client's scrape and push, the server's remote write), and reading what a peer's reply says
//! (its first line, `Retry-After`, `Location`) for errors and retries.

use crate::tls;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

/// Why an agent could not be built.
#[derive(Debug)]
pub struct AgentError(pub String);

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AgentError {}

/// Whether an agent follows redirects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirects {
    /// Follow up to 10 (the scrape: a GET is safe to repeat elsewhere, and a proxy in front of
    /// Prometheus may move it; ureq sends no `Authorization` header after a redirect).
    Follow,
    /// Hand the 3xx back to the caller (authorize and upload: a redirected POST becomes a GET
    /// without a body, so following it would report an upload that never happened).
    Refuse,
}

/// An agent that trusts the CA certificates of `ca_file` (the system roots when `None`), gives
/// each request `timeout` in all, follows redirects or not, names itself `user_agent`, and hands
/// every status back to the caller instead of erroring.
pub fn build(
    ca_file: Option<&Path>,
    timeout: Duration,
    redirects: Redirects,
    user_agent: &str,
) -> Result<ureq::Agent, AgentError> {
    tls::install_crypto_provider();
    let roots: Vec<Certificate<'static>> = match ca_file {
        Some(path) => {
            let certs = tls::load_certificates(path).map_err(|e| AgentError(e.to_string()))?;
            if certs.is_empty() {
                return Err(AgentError(format!(
                    "{} holds no PEM certificate",
                    path.display()
                )));
            }
            certs
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .collect()
        }
        None => tls::system_roots()
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect(),
    };
    let tls_config = TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .build();
    let config = ureq::Agent::config_builder()
        .tls_config(tls_config)
        .http_status_as_error(false)
        .max_redirects(match redirects {
            Redirects::Follow => 10,
            Redirects::Refuse => 0,
        })
        .timeout_global(Some(timeout))
        .user_agent(user_agent)
        .build();
    Ok(config.new_agent())
}

/// The first line of an error reply body, trimmed and cut to 200 characters, for error messages.
pub fn first_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.chars().take(200).collect()
}

/// A `Retry-After` value in seconds (the HTTP-date form is not used by the peers we talk to, and
/// is ignored).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The `Location` of a reply, for an error message: at most 200 characters, `(none)` when absent.
pub fn location(headers: &ureq::http::HeaderMap) -> String {
    match headers.get("location") {
        None => "(none)".to_string(),
        Some(v) => {
            let text = String::from_utf8_lossy(v.as_bytes());
            format!("{:?}", text.chars().take(200).collect::<String>())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_is_quoted_and_short() {
        let mut headers = ureq::http::HeaderMap::new();
        assert_eq!(location(&headers), "(none)");
        headers.insert(
            "location",
            ureq::http::HeaderValue::from_static("/elsewhere"),
        );
        assert_eq!(location(&headers), "\"/elsewhere\"");
        let long = "x".repeat(500);
        headers.insert("location", long.parse().unwrap());
        assert_eq!(location(&headers).len(), 202);
    }

    #[test]
    fn retry_after_seconds_only() {
        assert_eq!(parse_retry_after(" 12 "), Some(Duration::from_secs(12)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn first_line_is_short_and_clean() {
        assert_eq!(first_line(b"\n  bad token \nmore"), "bad token");
        assert_eq!(first_line(b""), "");
        assert_eq!(first_line(&[b'x'; 500]).len(), 200);
    }
}
