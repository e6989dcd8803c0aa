//! Pushes forwarded between servers: how they are signed, verified and sent.
//!
//! A forwarded push is `POST /internal/forward` on the owner's internal port. The body is exactly
//! what the owner stores: the validated, stamped families as protobuf-delimited bytes. Headers:
//!
//! - `X-Telemeter-Destination`: the name of the node the push is for (its `--name`);
//! - `X-Telemeter-Cluster-Id`: the cluster id the body belongs to;
//! - `X-Telemeter-Received`: when the first server accepted the upload, ms since the epoch;
//! - `X-Telemeter-Time`: when this request was signed, ms since the epoch;
//! - `X-Telemeter-Hop`: `1`. A forwarded push is never forwarded again;
//! - `X-Telemeter-Kind`: `push` (a client's upload: store it) or `handoff` (a file moving to its
//!   new owner after membership changed: store it only if newer than what is there);
//! - `X-Telemeter-Signature`: hex of `mac(PeerForward key, [method, path, destination, cluster id,
//!   received, time, hop, kind, SHA-256(body)])`.
//!
//! The receiver checks the signature, that it is the destination named (every node shares the
//! key, so without this a forward captured on its way to one node could be replayed to another,
//! whose replay cache has not seen it), that the time is within a window of its clock, that the
//! hop is 1, and that it has not seen the same signature within the window (a replayed request
//! could otherwise put an older upload back over a newer one).

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::digest;
use telemeter_common::media;
use telemeter_common::token::{mac, verify_mac, DerivedKey, KeyPurpose, SharedKey};

/// The internal endpoint forwarded pushes are sent to.
pub const FORWARD_PATH: &str = "/internal/forward";
/// The method of a forwarded push.
pub const FORWARD_METHOD: &str = "POST";
/// Header: the name of the node the forward is addressed to.
pub const HEADER_DESTINATION: &str = "X-Telemeter-Destination";
/// Header: the cluster id.
pub const HEADER_CLUSTER_ID: &str = "X-Telemeter-Cluster-Id";
/// Header: when the upload was first received, ms since the epoch.
pub const HEADER_RECEIVED: &str = "X-Telemeter-Received";
/// Header: when the request was signed, ms since the epoch.
pub const HEADER_TIME: &str = "X-Telemeter-Time";
/// Header: the hop count, always 1.
pub const HEADER_HOP: &str = "X-Telemeter-Hop";
/// Header: `push` or `handoff`.
pub const HEADER_KIND: &str = "X-Telemeter-Kind";
/// Header: the hex HMAC.
pub const HEADER_SIGNATURE: &str = "X-Telemeter-Signature";
/// How far the signing time may be from the receiver's clock.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
/// Most signatures remembered for replay detection.
const REPLAY_CACHE: usize = 100_000;

/// Why a push is being forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardKind {
    /// A client's upload, accepted by another server: the owner stores it (replacing).
    Push,
    /// A stored file moving to its new owner: stored only when newer than the owner's.
    Handoff,
}

impl ForwardKind {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardKind::Push => "push",
            ForwardKind::Handoff => "handoff",
        }
    }

    fn parse(value: &str) -> Option<ForwardKind> {
        match value {
            "push" => Some(ForwardKind::Push),
            "handoff" => Some(ForwardKind::Handoff),
            _ => None,
        }
    }
}

/// A verified forwarded push: what the receiver should store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarded {
    /// The cluster id.
    pub cluster_id: String,
    /// When the upload was first received.
    pub received: SystemTime,
    /// Push or handoff.
    pub kind: ForwardKind,
}

/// Why a forwarded push was refused (the endpoint answers 401 for all of them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyError {
    /// A required header is absent.
    MissingHeader(&'static str),
    /// A header's value cannot be parsed.
    BadHeader(&'static str),
    /// The signature does not match (tampered, or another cluster's key).
    BadSignature,
    /// The signing time is `skew_ms` away from our clock, over the window.
    OutsideWindow {
        /// Absolute difference, ms.
        skew_ms: u64,
    },
    /// The hop marker is not 1: the push was already forwarded once.
    HopExceeded(String),
    /// The same signed request was seen before.
    Replayed,
    /// The forward is signed for another node (captured on its way there and replayed here).
    WrongDestination {
        /// The node the forward names.
        to: String,
    },
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::MissingHeader(h) => write!(f, "missing header {h}"),
            VerifyError::BadHeader(h) => write!(f, "malformed header {h}"),
            VerifyError::BadSignature => f.write_str("bad forward signature"),
            VerifyError::OutsideWindow { skew_ms } => {
                write!(f, "forward signed {skew_ms} ms away from our clock")
            }
            VerifyError::HopExceeded(hop) => {
                write!(f, "hop {hop:?}: a forwarded push is never forwarded again")
            }
            VerifyError::Replayed => f.write_str("forwarded request replayed"),
            VerifyError::WrongDestination { to } => {
                write!(f, "forward addressed to node {to:?}, not to this node")
            }
        }
    }
}

impl std::error::Error for VerifyError {}

/// Signs and verifies forwarded pushes with the key derived for [`KeyPurpose::PeerForward`].
#[derive(Debug)]
pub struct Signer {
    key: DerivedKey,
    window: Duration,
    seen: Mutex<ReplayCache>,
}

impl Signer {
    /// A signer with `shared`'s forward key and the default window.
    pub fn new(shared: &SharedKey) -> Signer {
        Signer::with_key(shared.derive(KeyPurpose::PeerForward), DEFAULT_WINDOW)
    }

    /// A signer with an explicit key and window.
    pub fn with_key(key: DerivedKey, window: Duration) -> Signer {
        Signer {
            key,
            window,
            seen: Mutex::new(ReplayCache::default()),
        }
    }

    /// The headers of a forwarded push of `body` to the node named `destination`, signed at `now`.
    pub fn headers(
        &self,
        destination: &str,
        cluster_id: &str,
        received: SystemTime,
        kind: ForwardKind,
        body: &[u8],
        now: SystemTime,
    ) -> Vec<(&'static str, String)> {
        let received = telemeter_common::time::unix_millis(received).to_string();
        let time = telemeter_common::time::unix_millis(now).to_string();
        let hop = "1";
        let tag = self.tag(
            FORWARD_METHOD,
            FORWARD_PATH,
            destination,
            cluster_id,
            &received,
            &time,
            hop,
            kind.as_str(),
            body,
        );
        vec![
            (HEADER_DESTINATION, destination.to_owned()),
            (HEADER_CLUSTER_ID, cluster_id.to_owned()),
            (HEADER_RECEIVED, received),
            (HEADER_TIME, time),
            (HEADER_HOP, hop.to_owned()),
            (HEADER_KIND, kind.as_str().to_owned()),
            (HEADER_SIGNATURE, hex(&tag)),
        ]
    }

    /// Verifies a forwarded request as received by the node named `local_name`: its method, path,
    /// headers (names compared case-insensitively) and body, at `now`.
    pub fn verify(
        &self,
        local_name: &str,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
        now: SystemTime,
    ) -> Result<Forwarded, VerifyError> {
        let destination = header(headers, HEADER_DESTINATION)?;
        let cluster_id = header(headers, HEADER_CLUSTER_ID)?;
        let received = header(headers, HEADER_RECEIVED)?;
        let time = header(headers, HEADER_TIME)?;
        let hop = header(headers, HEADER_HOP)?;
        let kind_text = header(headers, HEADER_KIND)?;
        let signature = header(headers, HEADER_SIGNATURE)?;
        let tag = unhex(signature).ok_or(VerifyError::BadHeader(HEADER_SIGNATURE))?;
        let received_ms: u64 = received
            .parse()
            .map_err(|_| VerifyError::BadHeader(HEADER_RECEIVED))?;
        let time_ms: u64 = time
            .parse()
            .map_err(|_| VerifyError::BadHeader(HEADER_TIME))?;
        let kind = ForwardKind::parse(kind_text).ok_or(VerifyError::BadHeader(HEADER_KIND))?;
        if cluster_id.is_empty() {
            return Err(VerifyError::BadHeader(HEADER_CLUSTER_ID));
        }
        let parts = self.parts(
            method,
            path,
            destination,
            cluster_id,
            received,
            time,
            hop,
            kind_text,
            body,
        );
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        if !verify_mac(&self.key, &refs, &tag) {
            return Err(VerifyError::BadSignature);
        }
        // Checked after the signature, so an unsigned request cannot probe our clock or hop rules.
        if destination != local_name {
            return Err(VerifyError::WrongDestination {
                to: destination.to_owned(),
            });
        }
        if hop != "1" {
            return Err(VerifyError::HopExceeded(hop.to_owned()));
        }
        let now_ms = telemeter_common::time::unix_millis(now);
        let skew_ms = time_ms.abs_diff(now_ms);
        if u128::from(skew_ms) > self.window.as_millis() {
            return Err(VerifyError::OutsideWindow { skew_ms });
        }
        let fresh = telemeter_common::sync::lock(&self.seen).insert(tag, now_ms, self.window);
        if !fresh {
            return Err(VerifyError::Replayed);
        }
        Ok(Forwarded {
            cluster_id: cluster_id.to_owned(),
            received: UNIX_EPOCH + Duration::from_millis(received_ms),
            kind,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn tag(
        &self,
        method: &str,
        path: &str,
        destination: &str,
        cluster_id: &str,
        received: &str,
        time: &str,
        hop: &str,
        kind: &str,
        body: &[u8],
    ) -> [u8; 32] {
        let parts = self.parts(
            method,
            path,
            destination,
            cluster_id,
            received,
            time,
            hop,
            kind,
            body,
        );
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        mac(&self.key, &refs)
    }

    #[allow(clippy::too_many_arguments)]
    fn parts(
        &self,
        method: &str,
        path: &str,
        destination: &str,
        cluster_id: &str,
        received: &str,
        time: &str,
        hop: &str,
        kind: &str,
        body: &[u8],
    ) -> Vec<Vec<u8>> {
        let digest = digest::digest(&digest::SHA256, body);
        vec![
            method.as_bytes().to_vec(),
            path.as_bytes().to_vec(),
            destination.as_bytes().to_vec(),
            cluster_id.as_bytes().to_vec(),
            received.as_bytes().to_vec(),
            time.as_bytes().to_vec(),
            hop.as_bytes().to_vec(),
            kind.as_bytes().to_vec(),
            digest.as_ref().to_vec(),
        ]
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &'static str) -> Result<&'a str, VerifyError> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .ok_or(VerifyError::MissingHeader(name))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
            _ => None,
        })
        .collect()
}

/// Signatures seen within the window, bounded: the oldest are forgotten first.
#[derive(Debug, Default)]
struct ReplayCache {
    order: VecDeque<(u64, Vec<u8>)>,
    set: HashSet<Vec<u8>>,
}

impl ReplayCache {
    /// Records `tag` seen at `now_ms`; false when it was already there.
    fn insert(&mut self, tag: Vec<u8>, now_ms: u64, window: Duration) -> bool {
        // A request is only accepted within ±window of its time, so twice the window is enough.
        let keep_ms = u64::try_from(window.as_millis().saturating_mul(2)).unwrap_or(u64::MAX);
        while let Some((at, _)) = self.order.front() {
            if now_ms.saturating_sub(*at) <= keep_ms && self.order.len() < REPLAY_CACHE {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        if !self.set.insert(tag.clone()) {
            return false;
        }
        self.order.push_back((now_ms, tag));
        true
    }
}

/// Why a forward did not store the push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardError {
    /// No answer: connection refused, timeout, reset...
    Unreachable(String),
    /// The peer answered, but not 200.
    Rejected {
        /// Its status.
        status: u16,
        /// The first line of its reply.
        reason: String,
    },
}

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardError::Unreachable(err) => write!(f, "peer unreachable: {err}"),
            ForwardError::Rejected { status, reason } => {
                write!(f, "peer rejected the forward with {status}: {reason}")
            }
        }
    }
}

impl std::error::Error for ForwardError {}

/// Sends signed pushes to peers' internal endpoints, synchronously.
#[derive(Debug)]
pub struct Forwarder {
    agent: ureq::Agent,
    signer: std::sync::Arc<Signer>,
    scheme: &'static str,
}

impl Forwarder {
    /// A client signing with `signer`; `timeout` bounds a whole request (connect, send, the
    /// owner's fsync, reply). With `tls`, peers' internal ports serve TLS (`--internal-tls-*`)
    /// and forwards go over `https://`.
    ///
    /// The peer's certificate is not verified: peers are reached by the address they advertise
    /// (often a pod IP), which upstream's certificates (a service name) never name, and what makes
    /// a forward genuine is its signature under the shared key, not the channel. TLS adds
    /// confidentiality against a passive listener on the internal network.
    pub fn new(signer: std::sync::Arc<Signer>, timeout: Duration, tls: bool) -> Forwarder {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .disable_verification(true)
                    .build(),
            )
            .http_status_as_error(false)
            .max_redirects(0)
            // Internal traffic never goes through an HTTP proxy from the environment.
            .proxy(None)
            .timeout_connect(Some(timeout.min(Duration::from_secs(2))))
            .timeout_global(Some(timeout))
            .user_agent(concat!("telemeter-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Forwarder {
            agent,
            signer,
            scheme: if tls { "https" } else { "http" },
        }
    }

    /// POSTs `body` to the peer named `destination` whose internal address is `peer`
    /// ("host:port"). Ok only when the peer answered 200, which it does only once the push is
    /// durable.
    pub fn forward(
        &self,
        destination: &str,
        peer: &str,
        cluster_id: &str,
        received: SystemTime,
        kind: ForwardKind,
        body: &[u8],
    ) -> Result<(), ForwardError> {
        let url = format!("{}://{peer}{FORWARD_PATH}", self.scheme);
        let mut request = self.agent.post(&url).content_type(media::PROTO_DELIMITED);
        for (name, value) in self.signer.headers(
            destination,
            cluster_id,
            received,
            kind,
            body,
            SystemTime::now(),
        ) {
            request = request.header(name, value);
        }
        let mut response = request
            .send(body)
            .map_err(|err| ForwardError::Unreachable(err.to_string()))?;
        let status = response.status().as_u16();
        if status == 200 {
            return Ok(());
        }
        let reason = response
            .body_mut()
            .with_config()
            .limit(4096)
            .read_to_string()
            .unwrap_or_default();
        Err(ForwardError::Rejected {
            status,
            reason: reason.lines().next().unwrap_or("").trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests;
