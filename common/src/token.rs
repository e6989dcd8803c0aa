//! Signed upload tokens, and the per-purpose keys derived from the cluster's shared key.
//!
//! A token is a compact JWT signed with HS256 (HMAC-SHA256, via `ring`). Clients treat it as opaque;
//! every server of the cluster verifies it with the key derived from the shared key file. Keys for
//! different jobs (token signing, peer forwarding, gossip) are derived with distinct labels, so the
//! same bytes never serve two purposes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The issuer written into and required of every token (upstream's value).
pub const ISSUER: &str = "telemeter.selfsigned";
/// The audience written into and required of every upload token (upstream's value).
pub const AUDIENCE: &str = "federate";
/// Clock skew tolerated on `nbf` and `exp`.
pub const LEEWAY: Duration = Duration::from_secs(60);

/// What a derived key is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPurpose {
    /// Signing and verifying upload tokens.
    UploadToken,
    /// Signing pushes forwarded between servers.
    PeerForward,
    /// Authenticating gossip heartbeats.
    Gossip,
}

/// A 256-bit key derived from the shared key for one purpose.
#[derive(Clone, PartialEq, Eq)]
pub struct DerivedKey(pub [u8; 32]);

impl fmt::Debug for DerivedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DerivedKey(..)")
    }
}

/// The secret all servers of one cluster share (`--shared-key`).
#[derive(Clone)]
pub struct SharedKey {
    secret: Vec<u8>,
}

impl fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedKey(..)")
    }
}

/// Why a key could not be loaded.
#[derive(Debug)]
pub enum KeyError {
    /// The file could not be read.
    Read {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The key material is shorter than 32 bytes.
    TooShort {
        /// How many bytes there were.
        len: usize,
    },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl std::error::Error for KeyError {}

impl SharedKey {
    /// Reads the key file: its whole contents (any format, a PEM key included) are the secret; at
    /// least 32 bytes.
    pub fn from_file(path: &Path) -> Result<SharedKey, KeyError> {
        todo!()
    }

    /// A key from bytes; at least 32.
    pub fn from_bytes(secret: &[u8]) -> Result<SharedKey, KeyError> {
        todo!()
    }

    /// A fresh random key, for a single server started without `--shared-key`.
    pub fn generate() -> SharedKey {
        todo!()
    }

    /// The key for `purpose`: HMAC-SHA256 of a purpose label under the shared secret.
    pub fn derive(&self, purpose: KeyPurpose) -> DerivedKey {
        todo!()
    }
}

/// HMAC-SHA256 over the concatenation of `parts`, each prefixed with its length so that part
/// boundaries cannot be shifted.
pub fn mac(key: &DerivedKey, parts: &[&[u8]]) -> [u8; 32] {
    todo!()
}

/// Whether `tag` is the MAC of `parts` under `key`, compared in constant time.
pub fn verify_mac(key: &DerivedKey, parts: &[&[u8]], tag: &[u8]) -> bool {
    todo!()
}

/// The claims of an upload token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Issuer, [`ISSUER`].
    pub issuer: String,
    /// Subject: the account the authorizer named (or the cluster id).
    pub subject: String,
    /// Audience, [`AUDIENCE`].
    pub audience: String,
    /// The cluster id the token is valid for.
    pub cluster_id: String,
    /// Labels every series of this cluster carries (the partition label included).
    pub labels: BTreeMap<String, String>,
    /// Issued at, seconds since the epoch.
    pub issued_at: u64,
    /// Not valid before, seconds since the epoch.
    pub not_before: u64,
    /// Expires at, seconds since the epoch.
    pub expires_at: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts of JSON.
    Malformed,
    /// The header names an algorithm other than HS256.
    UnsupportedAlgorithm(String),
    /// The signature does not verify.
    BadSignature,
    /// Past `exp` (plus leeway).
    Expired,
    /// Before `nbf` (minus leeway).
    NotYetValid,
    /// The issuer is not [`ISSUER`].
    WrongIssuer,
    /// The audience does not contain [`AUDIENCE`].
    WrongAudience,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl std::error::Error for TokenError {}

/// Issues and verifies upload tokens with the key derived for [`KeyPurpose::UploadToken`].
#[derive(Clone, Debug)]
pub struct TokenSigner {
    key: DerivedKey,
}

impl TokenSigner {
    /// A signer using `shared`'s upload-token key.
    pub fn new(shared: &SharedKey) -> TokenSigner {
        TokenSigner {
            key: shared.derive(KeyPurpose::UploadToken),
        }
    }

    /// A compact HS256 JWT for `cluster_id`, valid from `now` for `lifetime`. The JSON claims are
    /// `iss`, `sub`, `aud` (an array, as upstream), `iat`, `nbf`, `exp`, and upstream's
    /// `"telemeter.openshift.io": {"labels": {...}}`, plus `"cluster_id"`.
    pub fn issue(
        &self,
        cluster_id: &str,
        subject: &str,
        labels: &BTreeMap<String, String>,
        lifetime: Duration,
        now: SystemTime,
    ) -> String {
        todo!()
    }

    /// Verifies signature, algorithm, issuer, audience and validity window at `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, TokenError> {
        todo!()
    }
}
