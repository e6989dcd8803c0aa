//! The HTTP client side both binaries share: ureq agents with their own trust roots (the
//! client's scrape and push, the server's remote write), and reading what a peer's reply says
//! (its first line, `Retry-After`, `Location`) for errors and retries.

use crate::tls;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

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
    build_pooled(ca_file, timeout, redirects, user_agent, IDLE_PER_PEER)
}

/// Idle connections [`build`] keeps to one peer (ureq's own default).
pub const IDLE_PER_PEER: usize = 3;

/// As [`build`], keeping up to `idle_per_peer` idle connections to one peer for reuse: a caller
/// with that many threads sending to the same peer at once (remote write's shards) would
/// otherwise open and close a connection for most of its requests.
pub fn build_pooled(
    ca_file: Option<&Path>,
    timeout: Duration,
    redirects: Redirects,
    user_agent: &str,
    idle_per_peer: usize,
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
        .max_idle_connections(idle_per_peer.max(10))
        .max_idle_connections_per_host(idle_per_peer.max(1))
        .build();
    Ok(ureq::Agent::with_parts(
        config,
        DefaultConnector::new(),
        LiteralResolver::default(),
    ))
}

/// ureq's resolver, except that a URL's host written as an IP address is used as it is. ureq's
/// own, under a timeout (every agent here has one), looks up even an IP address on a thread it
/// spawns for each request (a connection from the pool included): that thread's creation, stack
/// mapping and unmapping were 3 % of remote write's CPU shipping to `127.0.0.1`. A name is still
/// looked up ureq's way, within the timeout.
#[derive(Debug, Default)]
struct LiteralResolver {
    names: DefaultResolver,
}

impl Resolver for LiteralResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let literal = uri.authority().and_then(|authority| {
            let host = authority.host();
            // An IPv6 address is written in brackets in a URL.
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let ip = host.parse::<IpAddr>().ok()?;
            let port = authority.port_u16().or(match uri.scheme_str() {
                Some("http") => Some(80),
                Some("https") => Some(443),
                _ => None,
            })?;
            Some(SocketAddr::new(ip, port))
        });
        match literal {
            Some(addr) => {
                let mut addrs = self.empty();
                addrs.push(addr);
                Ok(addrs)
            }
            None => self.names.resolve(uri, config, timeout),
        }
    }
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

    /// What the resolver makes of `url`, with no time left: ureq's own resolver would give up
    /// (its lookup thread is not waited for), so only an address used as written is `Ok`.
    fn resolve_now(url: &str) -> Result<Vec<SocketAddr>, ureq::Error> {
        let uri: ureq::http::Uri = url.parse().unwrap();
        let config = ureq::Agent::config_builder().build();
        let timeout = NextTimeout {
            after: ureq::unversioned::transport::time::Duration::Exact(Duration::ZERO),
            reason: ureq::Timeout::Global,
            per_read: None,
            per_write: None,
        };
        LiteralResolver::default()
            .resolve(&uri, &config, timeout)
            .map(|addrs| addrs.to_vec())
    }

    #[test]
    fn an_address_in_the_url_is_used_as_written_without_a_lookup() {
        assert_eq!(
            resolve_now("http://127.0.0.1:9201/api/v1/write").unwrap(),
            ["127.0.0.1:9201".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve_now("https://[::1]/x").unwrap(),
            ["[::1]:443".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve_now("http://10.1.2.3/x").unwrap(),
            ["10.1.2.3:80".parse::<SocketAddr>().unwrap()]
        );
        // A name is looked up ureq's way, within the time left: none.
        assert!(resolve_now("http://receiver.invalid:9201/x").is_err());
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
