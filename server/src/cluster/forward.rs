//! Pushes forwarded between servers: how they are sealed, opened and sent.
//!
//! A forwarded push is `POST /internal/forward` on the owner's internal port, with
//! `Content-Type: application/octet-stream` and a body that is one envelope (see `packet`) of
//! version [`FORWARD_VERSION`], sealed with the key derived for [`KeyPurpose::ForwardSeal`], whose
//! associated data binds the method and the path. The plaintext (integers big endian):
//!
//! ```text
//! size  field
//! 1     destination length d (1..=255), then d bytes: the name of the node the push is for
//! 2     cluster id length c (1..=65535), then c bytes
//! 8     received: when the first server accepted the upload, ms since the epoch
//! 8     time: when this forward was sealed, ms since the epoch
//! 1     hop: 1. A forwarded push is never forwarded again
//! 1     kind: 1 push (a client's upload: store it), 2 handoff (a file moving to its new owner
//!       after membership changed: store it only if newer than what is there)
//! rest  the families, exactly what the owner stores (validated, stamped, protobuf-delimited)
//! ```
//!
//! Nothing about the push travels in the clear: not the cluster id, not the destination, not a
//! metric. The receiver opens the envelope (a wrong key id, a flipped bit or a cut tag: 401), then
//! checks that it is the destination named (every node shares the key, so without this a forward
//! captured on its way to one node could be replayed to another, whose replay cache has not seen
//! it), that the time is within a window of its clock, that the hop is 1, and that it has not
//! opened the same nonce within the window (a replayed request could otherwise put an older
//! upload back over a newer one), nor, for a removal, was it sealed before this server started
//! (the nonces it opened before a restart are not remembered). Nonces never repeat for a key (see `packet`), so
//! a genuine forward is never mistaken for a replay.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use telemeter_common::keys::{KeyId, KeyPurpose, SharedKey};

use super::packet::{Keyring, KeyringError, OpenError, SealError, HEADER_LEN};

/// The internal endpoint forwarded pushes are sent to.
pub const FORWARD_PATH: &str = "/internal/forward";
/// The method of a forwarded push.
pub const FORWARD_METHOD: &str = "POST";
/// The envelope version of a forwarded push.
pub const FORWARD_VERSION: u8 = 1;
/// The content type of a forwarded push: opaque bytes.
pub const FORWARD_CONTENT_TYPE: &str = "application/octet-stream";
/// How far the sealing time may be from the receiver's clock.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
/// Most nonces remembered for replay detection.
const REPLAY_CACHE: usize = 100_000;

/// Why a push is being forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardKind {
    /// A client's upload, accepted by another server: the owner stores it (replacing).
    Push,
    /// A stored file moving to its new owner: stored only when newer than the owner's.
    Handoff,
    /// An operator's `DELETE /api/v1/clusters/<id>` on another server: the owner removes the
    /// cluster (durably). The body is empty.
    Remove,
    /// A remote-write request accepted by another server (its validated families): the owner
    /// merges it into the cluster's series.
    Receive,
}

impl ForwardKind {
    /// The name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardKind::Push => "push",
            ForwardKind::Handoff => "handoff",
            ForwardKind::Remove => "remove",
            ForwardKind::Receive => "receive",
        }
    }

    fn code(self) -> u8 {
        match self {
            ForwardKind::Push => 1,
            ForwardKind::Handoff => 2,
            ForwardKind::Remove => 3,
            ForwardKind::Receive => 4,
        }
    }

    fn from_code(code: u8) -> Option<ForwardKind> {
        match code {
            1 => Some(ForwardKind::Push),
            2 => Some(ForwardKind::Handoff),
            3 => Some(ForwardKind::Remove),
            4 => Some(ForwardKind::Receive),
            _ => None,
        }
    }
}

/// An opened forwarded push: what the receiver should store, and under which key it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarded {
    /// The cluster id.
    pub cluster_id: String,
    /// When the upload was first received.
    pub received: SystemTime,
    /// Push or handoff.
    pub kind: ForwardKind,
    /// The key that opened it.
    pub key_id: KeyId,
}

/// Why a forwarded push was refused (the endpoint answers 401 for all of them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyError {
    /// Not an envelope, or its plaintext does not parse.
    Malformed(&'static str),
    /// Sealed under a key we do not hold (another deployment's, or rotated out).
    UnknownKey(KeyId),
    /// The tag does not verify: tampered, truncated, or moved to another method or path.
    BadSeal,
    /// The sealing time is `skew_ms` away from our clock, over the window.
    OutsideWindow {
        /// Absolute difference, ms.
        skew_ms: u64,
    },
    /// The hop marker is not 1: the push was already forwarded once.
    HopExceeded(u8),
    /// The same sealed request was opened before.
    Replayed,
    /// Sealed before this server started: its replay cache, kept in memory, cannot say whether
    /// the forward was opened before (by the process before a restart), so it may be a replay.
    SealedBeforeStart {
        /// How long before the start, ms.
        before_ms: u64,
    },
    /// The forward is sealed for another node (captured on its way there and replayed here).
    WrongDestination {
        /// The node the forward names.
        to: String,
    },
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::Malformed(what) => write!(f, "malformed forward: {what}"),
            VerifyError::UnknownKey(id) => {
                write!(f, "forward sealed under key id {id}, which is not ours")
            }
            VerifyError::BadSeal => f.write_str("forward does not open (bad tag)"),
            VerifyError::OutsideWindow { skew_ms } => {
                write!(f, "forward sealed {skew_ms} ms away from our clock")
            }
            VerifyError::HopExceeded(hop) => {
                write!(f, "hop {hop}: a forwarded push is never forwarded again")
            }
            VerifyError::Replayed => f.write_str("forwarded request replayed"),
            VerifyError::SealedBeforeStart { before_ms } => write!(
                f,
                "forward sealed {before_ms} ms before this server started: it may be a replay"
            ),
            VerifyError::WrongDestination { to } => {
                write!(f, "forward addressed to node {to:?}, not to this node")
            }
        }
    }
}

impl std::error::Error for VerifyError {}

/// Seals and opens forwarded pushes with the keys derived for [`KeyPurpose::ForwardSeal`].
#[derive(Debug)]
pub struct Sealer {
    keys: Keyring,
    window: Duration,
    seen: Mutex<ReplayCache>,
    /// Forwards sealed before this (Unix ms) are refused: see [`Sealer::refusing_before`].
    not_before_ms: u64,
}

impl Sealer {
    /// A sealer with the forward keys of `shared` (the first seals) and the default window.
    /// It refuses forwards sealed before it was made ([`Sealer::refusing_before`]).
    pub fn new(shared: &[SharedKey]) -> Result<Sealer, KeyringError> {
        Ok(Sealer::with_keys(
            Keyring::derive(shared, KeyPurpose::ForwardSeal)?,
            DEFAULT_WINDOW,
        )
        .refusing_before(SystemTime::now()))
    }

    /// A sealer with an explicit keyring and window.
    pub fn with_keys(keys: Keyring, window: Duration) -> Sealer {
        Sealer {
            keys,
            window,
            seen: Mutex::new(ReplayCache::default()),
            not_before_ms: 0,
        }
    }

    /// This sealer, refusing to open removals sealed before `start` (the server's start). Its
    /// replay cache is in memory: after a restart, a removal captured on its way to the process
    /// before and sent again within the window would otherwise be opened a second time. A
    /// genuine forward is sealed for each attempt, just before it is sent, so only one sent
    /// within a clock skew of the start is refused with it. The endpoint removes only what was
    /// received by the removal's time besides, which holds whatever the clocks.
    pub fn refusing_before(mut self, start: SystemTime) -> Sealer {
        self.not_before_ms = telemeter_common::time::unix_millis(start);
        self
    }

    /// The body of a forwarded push of `families` to the node named `destination`, sealed at
    /// `now`.
    pub fn seal(
        &self,
        destination: &str,
        cluster_id: &str,
        received: SystemTime,
        kind: ForwardKind,
        families: &[u8],
        now: SystemTime,
    ) -> Result<Vec<u8>, SealError> {
        let dest_len = u8::try_from(destination.len())
            .ok()
            .filter(|n| *n > 0)
            .ok_or(SealError::TooLong("destination name"))?;
        let id_len = u16::try_from(cluster_id.len())
            .ok()
            .filter(|n| *n > 0)
            .ok_or(SealError::TooLong("cluster id"))?;
        let mut plain =
            Vec::with_capacity(32 + destination.len() + cluster_id.len() + families.len());
        plain.push(dest_len);
        plain.extend_from_slice(destination.as_bytes());
        plain.extend_from_slice(&id_len.to_be_bytes());
        plain.extend_from_slice(cluster_id.as_bytes());
        plain.extend_from_slice(&telemeter_common::time::unix_millis(received).to_be_bytes());
        plain.extend_from_slice(&telemeter_common::time::unix_millis(now).to_be_bytes());
        plain.push(1);
        plain.push(kind.code());
        plain.extend_from_slice(families);
        self.keys.seal(
            FORWARD_VERSION,
            &[FORWARD_METHOD.as_bytes(), FORWARD_PATH.as_bytes()],
            &plain,
        )
    }

    /// Opens a forwarded request's `body` as received by the node named `local_name` with
    /// `method` and `path`, at `now`: what to store, and the families (in `body`'s buffer).
    pub fn open(
        &self,
        local_name: &str,
        method: &str,
        path: &str,
        body: Vec<u8>,
        now: SystemTime,
    ) -> Result<(Forwarded, Vec<u8>), VerifyError> {
        // Key id and nonce: unique per genuine forward, so they name it in the replay cache.
        let replay_key = body.get(1..HEADER_LEN).map(<[u8]>::to_vec);
        let (mut plain, key_id) = self
            .keys
            .open(FORWARD_VERSION, &[method.as_bytes(), path.as_bytes()], body)
            .map_err(|err| match err {
                OpenError::Truncated => VerifyError::Malformed("shorter than an envelope"),
                OpenError::BadVersion(_) => VerifyError::Malformed("unknown envelope version"),
                OpenError::UnknownKey(id) => VerifyError::UnknownKey(id),
                OpenError::BadTag => VerifyError::BadSeal,
            })?;
        let replay_key = replay_key.ok_or(VerifyError::Malformed("shorter than an envelope"))?;
        // Genuine from here on: a parse failure is our peer's bug, still refused.
        let mut r = Cursor {
            buf: &plain,
            pos: 0,
        };
        let dest_len = usize::from(r.u8()?);
        let destination = r.str(dest_len, "destination")?;
        let id_len = usize::from(u16::from_be_bytes(r.array()?));
        let cluster_id = r.str(id_len, "cluster id")?;
        let received_ms = u64::from_be_bytes(r.array()?);
        let time_ms = u64::from_be_bytes(r.array()?);
        let hop = r.u8()?;
        let kind = ForwardKind::from_code(r.u8()?).ok_or(VerifyError::Malformed("unknown kind"))?;
        let start = r.pos;
        if destination != local_name {
            return Err(VerifyError::WrongDestination { to: destination });
        }
        if cluster_id.is_empty() {
            return Err(VerifyError::Malformed("empty cluster id"));
        }
        if hop != 1 {
            return Err(VerifyError::HopExceeded(hop));
        }
        let now_ms = telemeter_common::time::unix_millis(now);
        let skew_ms = time_ms.abs_diff(now_ms);
        if u128::from(skew_ms) > self.window.as_millis() {
            return Err(VerifyError::OutsideWindow { skew_ms });
        }
        // Removals only: a push, receive or handoff opened twice replaces nothing fresher, and
        // a node whose clock runs ahead of its peers' would refuse their genuine ones for as
        // long as it is ahead.
        if kind == ForwardKind::Remove && time_ms < self.not_before_ms {
            return Err(VerifyError::SealedBeforeStart {
                before_ms: self.not_before_ms - time_ms,
            });
        }
        let fresh =
            telemeter_common::sync::lock(&self.seen).insert(replay_key, now_ms, self.window);
        if !fresh {
            return Err(VerifyError::Replayed);
        }
        plain.drain(..start);
        Ok((
            Forwarded {
                cluster_id,
                received: UNIX_EPOCH + Duration::from_millis(received_ms),
                kind,
                key_id,
            },
            plain,
        ))
    }

    /// The ids of the forward keys, the sealing key first.
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.key_ids()
    }
}

/// Reads the opened plaintext; running out is `Malformed`, never a panic.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], VerifyError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(VerifyError::Malformed(what))?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or(VerifyError::Malformed(what))?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], VerifyError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, "truncated header")?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, VerifyError> {
        Ok(self.array::<1>()?[0])
    }

    fn str(&mut self, len: usize, what: &'static str) -> Result<String, VerifyError> {
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| VerifyError::Malformed(what))
    }
}

/// Nonces opened within the window, bounded: the oldest are forgotten first.
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

/// Sends sealed pushes to peers' internal endpoints, synchronously.
#[derive(Debug)]
pub struct Forwarder {
    agent: ureq::Agent,
    sealer: std::sync::Arc<Sealer>,
    scheme: &'static str,
}

impl Forwarder {
    /// A client sealing with `sealer`; `timeout` bounds a whole request (connect, send, the
    /// owner's fsync, reply). With `tls`, peers' internal ports serve TLS (`--internal-tls-*`)
    /// and forwards go over `https://`.
    ///
    /// The peer's certificate is not verified: peers are reached by the address they advertise
    /// (often a pod IP), which upstream's certificates (a service name) never name. The body is
    /// sealed whatever the scheme, so TLS adds nothing but hiding the path.
    pub fn new(sealer: std::sync::Arc<Sealer>, timeout: Duration, tls: bool) -> Forwarder {
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
            // No version in the clear either: the peers know it.
            .user_agent("telemeter-server")
            .build()
            .into();
        Forwarder {
            agent,
            sealer,
            scheme: if tls { "https" } else { "http" },
        }
    }

    /// POSTs `families` to the peer named `destination` whose internal address is `peer`
    /// ("host:port"). Ok only when the peer answered 200, which it does only once the push is
    /// durable.
    pub fn forward(
        &self,
        destination: &str,
        peer: &str,
        cluster_id: &str,
        received: SystemTime,
        kind: ForwardKind,
        families: &[u8],
    ) -> Result<(), ForwardError> {
        let body = self
            .sealer
            .seal(
                destination,
                cluster_id,
                received,
                kind,
                families,
                SystemTime::now(),
            )
            .map_err(|err| ForwardError::Rejected {
                status: 0,
                reason: format!("not sent, cannot seal it: {err}"),
            })?;
        let url = format!("{}://{peer}{FORWARD_PATH}", self.scheme);
        let mut response = self
            .agent
            .post(&url)
            .content_type(FORWARD_CONTENT_TYPE)
            // The peer's address is in the IP header already; the payload need not repeat it.
            .header("Host", "peer")
            .send(&body[..])
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
