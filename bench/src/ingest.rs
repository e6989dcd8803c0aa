//! Uploads to telemeter-server exactly as a client sends them: protobuf-delimited, snappy framed,
//! `Authorization: Bearer <upload token>`, one 500-sample upload per request.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use telemeter_common::media::PROTO_DELIMITED;
use telemeter_common::token::TokenSigner;
use telemeter_server::cluster::ring::{HashRing, DEFAULT_VNODES};

use crate::http::{Connection, Request, Target};
use crate::load::Workload;
use crate::payload::{self, PARTITION_LABEL};

/// Where upload tokens come from.
pub enum Tokens {
    /// Minted here with the server's shared key, as `/authorize` would (no round trips).
    Signed(TokenSigner),
    /// Asked for at `/authorize` with a client token.
    Authorize {
        /// The server's external URL.
        target: Target,
        /// The client token.
        client_token: String,
    },
}

impl Tokens {
    /// An upload token for `cluster`.
    pub fn upload_token(&self, cluster: &str) -> Result<String, String> {
        match self {
            Tokens::Signed(signer) => {
                let mut labels = BTreeMap::new();
                labels.insert(PARTITION_LABEL.to_string(), cluster.to_string());
                Ok(signer.issue(
                    cluster,
                    "telemeter-bench",
                    &labels,
                    Duration::from_secs(3600),
                    SystemTime::now(),
                ))
            }
            Tokens::Authorize {
                target,
                client_token,
            } => authorize(target, client_token, cluster),
        }
    }
}

/// `POST /authorize?id=<cluster>` and the upload token from its JSON answer.
fn authorize(target: &Target, client_token: &str, cluster: &str) -> Result<String, String> {
    let mut conn = Connection::new(target.clone(), Duration::from_secs(10));
    let request = Request {
        method: "POST",
        path: target.path(&format!("/authorize?id={cluster}")),
        headers: vec![("Authorization", format!("Bearer {client_token}"))],
        body: Vec::new(),
    };
    let response = conn.send(&request).map_err(|e| format!("authorize: {e}"))?;
    if response.status != 200 {
        return Err(format!(
            "authorize: status {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body).trim()
        ));
    }
    let answer: serde_json::Value =
        serde_json::from_slice(&response.body).map_err(|e| format!("authorize: {e}"))?;
    answer
        .get("token")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| "authorize: no token in the answer".to_string())
}

/// The upload workload against one server.
pub struct Upload {
    /// The server's external URL.
    pub target: Target,
    /// Where tokens come from.
    pub tokens: Tokens,
    /// The cluster ids to send, by index; `None`: [`payload::cluster_id`] of the index.
    pub ids: Option<Vec<String>>,
}

/// The first `count` cluster ids (in [`payload::cluster_id`] order) that the ring of `members`
/// does not give to `node`: uploads of them to `node` are all forwarded to their owners, which
/// measures ingest through a non-owner (sealing, the peer hop, the owner's store).
pub fn ids_not_owned_by(
    node: &str,
    members: &[String],
    count: usize,
) -> Result<Vec<String>, String> {
    if !members.iter().any(|m| m == node) {
        return Err(format!("--ring must list --forwarded-from {node:?}"));
    }
    if members.len() < 2 {
        return Err("--ring needs another member to forward to".into());
    }
    let ring = HashRing::new(members, DEFAULT_VNODES);
    Ok((0..)
        .map(payload::cluster_id)
        .filter(|id| ring.owner(id) != Some(node))
        .take(count)
        .collect())
}

impl Workload for Upload {
    fn request(&self, cluster: usize) -> Result<Request, String> {
        let id = match &self.ids {
            Some(ids) => ids
                .get(cluster)
                .cloned()
                .ok_or_else(|| format!("no cluster id number {cluster}"))?,
            None => payload::cluster_id(cluster),
        };
        let token = self.tokens.upload_token(&id)?;
        Ok(Request {
            method: "POST",
            path: self.target.path("/upload"),
            headers: vec![
                ("Authorization", format!("Bearer {token}")),
                ("Content-Type", PROTO_DELIMITED.to_string()),
                ("Content-Encoding", "snappy".to_string()),
            ],
            body: payload::upload_body(&id, payload::now_ms()),
        })
    }

    fn body_size_hint(&self) -> usize {
        payload::upload_body(&payload::cluster_id(0), 0).len() + 1024
    }
}

/// The Pushgateway workload: `PUT /metrics/job/<cluster id>` with the same series as text.
pub struct Pushgateway {
    /// The Pushgateway's URL.
    pub target: Target,
}

impl Workload for Pushgateway {
    fn request(&self, cluster: usize) -> Result<Request, String> {
        let id = payload::cluster_id(cluster);
        Ok(Request {
            method: "PUT",
            path: self.target.path(&format!("/metrics/job/{id}")),
            headers: vec![(
                "Content-Type",
                "text/plain; version=0.0.4; charset=utf-8".to_string(),
            )],
            body: payload::text_body(&id),
        })
    }

    fn body_size_hint(&self) -> usize {
        payload::text_body(&payload::cluster_id(0)).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemeter_common::keys::SharedKey;

    #[test]
    fn signed_tokens_name_the_cluster() {
        let key = SharedKey::generate();
        let tokens = Tokens::Signed(TokenSigner::new(&key));
        let token = tokens.upload_token("bench-00000003").unwrap_or_default();
        let claims = TokenSigner::new(&key)
            .verify(&token, SystemTime::now())
            .map_err(|e| e.to_string());
        let claims = claims.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(claims.cluster_id, "bench-00000003");
        assert_eq!(
            claims.labels.get("_id").map(String::as_str),
            Some("bench-00000003")
        );
    }

    #[test]
    fn upload_requests_carry_what_a_client_sends() {
        let w = Upload {
            ids: None,
            target: Target::parse("http://127.0.0.1:1").unwrap_or_else(|e| panic!("{e}")),
            tokens: Tokens::Signed(TokenSigner::new(&SharedKey::generate())),
        };
        let r = w.request(4).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.method, r.path.as_str()), ("POST", "/upload"));
        let header = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header("Content-Type").as_deref(), Some(PROTO_DELIMITED));
        assert_eq!(header("Content-Encoding").as_deref(), Some("snappy"));
        assert!(header("Authorization").is_some_and(|v| v.starts_with("Bearer ey")));
        assert!(r.body.starts_with(b"\xff\x06\x00\x00sNaPpY"));
    }

    #[test]
    fn pushgateway_requests_put_text_under_the_cluster_job() {
        let w = Pushgateway {
            target: Target::parse("http://127.0.0.1:1").unwrap_or_else(|e| panic!("{e}")),
        };
        let r = w.request(9).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/metrics/job/bench-00000009");
        assert!(String::from_utf8_lossy(&r.body).contains("_id=\"bench-00000009\""));
    }

    #[test]
    fn ids_not_owned_by_a_node_are_owned_by_the_others() {
        let members: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let ids = ids_not_owned_by("a", &members, 50).unwrap();
        assert_eq!(ids.len(), 50);
        let ring = HashRing::new(&members, DEFAULT_VNODES);
        assert!(ids
            .iter()
            .all(|id| ring.owner(id).is_some_and(|o| o != "a")));
        assert!(ids_not_owned_by("z", &members, 1).is_err());
        assert!(ids_not_owned_by("a", &members[..1], 1).is_err());
    }
}
