//! The keys of a cluster: the shared secret every server holds (`--shared-key`, repeatable for a
//! rotation), the per-purpose keys derived from it, their short public ids, and the MAC the
//! purposes that sign (rather than seal) use.
//!
//! Keys for different jobs (token signing, peer forwarding, gossip, sealing) are derived with
//! distinct labels, so the same bytes never serve two purposes. Split from `token`, which is only
//! the JWT that one of these keys signs.

use ring::{hmac, rand};
use std::fmt;
use std::path::Path;

/// What a derived key is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPurpose {
    /// Signing and verifying upload tokens.
    UploadToken,
    /// Signing pushes forwarded between servers.
    PeerForward,
    /// Authenticating gossip heartbeats (format version 1, MAC only).
    Gossip,
    /// Sealing gossip datagrams (AEAD, format version 2).
    GossipSeal,
    /// Sealing pushes forwarded between servers (AEAD).
    ForwardSeal,
}

/// A short public name of a derived key: the first 4 bytes of SHA-256 over a label and the key.
///
/// Sent in the clear so that a receiver holding several keys (during a rotation) picks the right
/// one without trial decryption. It reveals nothing usable about the key: finding a key from 32
/// bits of its hash is no easier than guessing the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 4]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl DerivedKey {
    /// This key's [`KeyId`].
    pub fn id(&self) -> KeyId {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"telemeter/v2/key-id\0");
        ctx.update(&self.0);
        let digest = ctx.finish();
        let mut id = [0u8; 4];
        for (dst, src) in id.iter_mut().zip(digest.as_ref()) {
            *dst = *src;
        }
        KeyId(id)
    }
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
        match self {
            KeyError::Read { path, source } => write!(f, "cannot read key file {path}: {source}"),
            KeyError::TooShort { len } => write!(
                f,
                "shared key is {len} bytes long, at least {MIN_KEY_BYTES} are needed"
            ),
        }
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyError::Read { source, .. } => Some(source),
            KeyError::TooShort { .. } => None,
        }
    }
}

/// The least key material accepted, in bytes: as much as one HMAC-SHA256 key holds.
pub const MIN_KEY_BYTES: usize = 32;

impl KeyPurpose {
    /// The label the key for this purpose is derived with. Part of the protocol: every server of a
    /// cluster must derive the same keys.
    pub fn label(self) -> &'static str {
        match self {
            KeyPurpose::UploadToken => "telemeter/v1/upload-token",
            KeyPurpose::PeerForward => "telemeter/v1/peer-forward",
            KeyPurpose::Gossip => "telemeter/v1/gossip",
            KeyPurpose::GossipSeal => "telemeter/v2/gossip-seal",
            KeyPurpose::ForwardSeal => "telemeter/v2/forward-seal",
        }
    }
}

impl SharedKey {
    /// Reads the key file: its whole contents (any format, a PEM key included) are the secret; at
    /// least 32 bytes.
    pub fn from_file(path: &Path) -> Result<SharedKey, KeyError> {
        let secret = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        SharedKey::from_bytes(&secret)
    }

    /// A key from bytes; at least 32.
    pub fn from_bytes(secret: &[u8]) -> Result<SharedKey, KeyError> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort { len: secret.len() });
        }
        Ok(SharedKey {
            secret: secret.to_vec(),
        })
    }

    /// A fresh random key, for a single server started without `--shared-key`.
    pub fn generate() -> SharedKey {
        let mut secret = vec![0u8; MIN_KEY_BYTES];
        // Without a working system random source no key is safe to use, and nothing the caller
        // could do would fix that: stopping is the only sound reaction.
        rand::SecureRandom::fill(&rand::SystemRandom::new(), &mut secret)
            .expect("the system random number generator failed");
        SharedKey { secret }
    }

    /// The key for `purpose`: HMAC-SHA256 of a purpose label under the shared secret.
    pub fn derive(&self, purpose: KeyPurpose) -> DerivedKey {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.secret);
        let tag = hmac::sign(&key, purpose.label().as_bytes());
        DerivedKey(tag_bytes(&tag))
    }
}

/// The 32 bytes of an HMAC-SHA256 tag.
fn tag_bytes(tag: &hmac::Tag) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (dst, src) in out.iter_mut().zip(tag.as_ref()) {
        *dst = *src;
    }
    out
}

/// The message `mac` signs: each part preceded by its length as 8 bytes big endian.
fn framed_parts(parts: &[&[u8]]) -> Vec<u8> {
    let total: usize = parts.iter().map(|p| p.len() + 8).sum();
    let mut message = Vec::with_capacity(total);
    for part in parts {
        message.extend_from_slice(&(part.len() as u64).to_be_bytes());
        message.extend_from_slice(part);
    }
    message
}

/// HMAC-SHA256 over the concatenation of `parts`, each prefixed with its length so that part
/// boundaries cannot be shifted.
pub fn mac(key: &DerivedKey, parts: &[&[u8]]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &key.0);
    tag_bytes(&hmac::sign(&key, &framed_parts(parts)))
}

/// Whether `tag` is the MAC of `parts` under `key`, compared in constant time.
pub fn verify_mac(key: &DerivedKey, parts: &[&[u8]], tag: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &key.0);
    hmac::verify(&key, &framed_parts(parts), tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(byte: u8) -> SharedKey {
        SharedKey::from_bytes(&[byte; 32]).unwrap()
    }

    #[test]
    fn keys_need_32_bytes() {
        assert!(matches!(
            SharedKey::from_bytes(&[1; 31]),
            Err(KeyError::TooShort { len: 31 })
        ));
        assert!(SharedKey::from_bytes(&[1; 32]).is_ok());
        assert_eq!(
            KeyError::TooShort { len: 5 }.to_string(),
            "shared key is 5 bytes long, at least 32 are needed"
        );
    }

    #[test]
    fn key_file() {
        let dir = std::env::temp_dir().join(format!("telemeter-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key.pem");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n",
        )
        .unwrap();
        let from_file = SharedKey::from_file(&path).unwrap();
        let from_bytes = SharedKey::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            from_file.derive(KeyPurpose::Gossip),
            from_bytes.derive(KeyPurpose::Gossip)
        );

        std::fs::write(&path, "short").unwrap();
        assert!(matches!(
            SharedKey::from_file(&path),
            Err(KeyError::TooShort { len: 5 })
        ));

        let missing = dir.join("missing");
        let err = SharedKey::from_file(&missing).unwrap_err();
        let line = err.to_string();
        assert!(line.contains(&missing.display().to_string()), "{line}");
        assert!(!line.contains('\n'));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn generated_keys_differ() {
        let a = SharedKey::generate();
        let b = SharedKey::generate();
        assert_eq!(a.secret.len(), 32);
        assert_ne!(a.secret, b.secret);
    }

    #[test]
    fn derived_keys_differ_per_purpose_and_secret() {
        let k = shared(1);
        let token = k.derive(KeyPurpose::UploadToken);
        let forward = k.derive(KeyPurpose::PeerForward);
        let gossip = k.derive(KeyPurpose::Gossip);
        assert_ne!(token, forward);
        assert_ne!(token, gossip);
        assert_ne!(forward, gossip);
        // Never the shared bytes themselves.
        assert_ne!(token.0.to_vec(), k.secret);
        // Deterministic, and a function of the secret.
        assert_eq!(
            k.derive(KeyPurpose::Gossip),
            shared(1).derive(KeyPurpose::Gossip)
        );
        assert_ne!(
            k.derive(KeyPurpose::Gossip),
            shared(2).derive(KeyPurpose::Gossip)
        );
        // Derivation is HMAC-SHA256(secret, label): pinned so all servers keep agreeing.
        let expected = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &[1; 32]),
            b"telemeter/v1/gossip",
        );
        assert_eq!(gossip.0.as_slice(), expected.as_ref());
    }

    #[test]
    fn mac_round_trip_and_boundaries() {
        let key = shared(3).derive(KeyPurpose::PeerForward);
        let tag = mac(&key, &[b"POST", b"/upload", b"body"]);
        assert!(verify_mac(&key, &[b"POST", b"/upload", b"body"], &tag));
        // Moving a byte across a boundary changes the MAC.
        assert!(!verify_mac(&key, &[b"POS", b"T/upload", b"body"], &tag));
        assert!(!verify_mac(&key, &[b"POST/upload", b"body"], &tag));
        assert!(!verify_mac(&key, &[b"POST", b"/upload", b"bodY"], &tag));
        // Another key, a truncated tag, an empty tag.
        let other = shared(3).derive(KeyPurpose::Gossip);
        assert!(!verify_mac(&other, &[b"POST", b"/upload", b"body"], &tag));
        assert!(!verify_mac(
            &key,
            &[b"POST", b"/upload", b"body"],
            &tag[..31]
        ));
        assert!(!verify_mac(&key, &[b"POST", b"/upload", b"body"], &[]));
        // The MAC is HMAC over length-prefixed parts.
        let mut message = Vec::new();
        for part in [&b"POST"[..], b"/upload", b"body"] {
            message.extend_from_slice(&(part.len() as u64).to_be_bytes());
            message.extend_from_slice(part);
        }
        let expected = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key.0), &message);
        assert_eq!(tag.as_slice(), expected.as_ref());
    }

    #[test]
    fn key_ids_are_short_stable_and_differ_per_key() {
        let a = shared(1).derive(KeyPurpose::GossipSeal);
        let b = shared(2).derive(KeyPurpose::GossipSeal);
        assert_eq!(a.id(), shared(1).derive(KeyPurpose::GossipSeal).id());
        assert_ne!(a.id(), b.id());
        assert_ne!(a.id(), shared(1).derive(KeyPurpose::ForwardSeal).id());
        assert_eq!(a.id().to_string().len(), 8);
        // The id is a hash of the key, not a piece of it.
        assert_ne!(a.id().0[..], a.0[..4]);
    }
}
