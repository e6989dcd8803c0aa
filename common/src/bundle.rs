//! The air-gap bundle: one prepared upload carried on removable media from an isolated site to
//! the server, verifiable with nothing the server does not already have.
//!
//! Format (version 1), all of it covered by the tag:
//!
//! ```text
//! TELEMETER-BUNDLE/1\n
//! cluster=<cluster id>\n
//! created_ms=<creation time, ms since the Unix epoch>\n
//! body_bytes=<length of the upload>\n
//! \n
//! <the upload: snappy-framed, protobuf-delimited families, exactly as /upload takes it>
//! <tag: 32 bytes, HMAC-SHA256>
//! ```
//!
//! The tag's key is the SHA-256 of the client token. Why: the server keeps exactly that for every
//! client token of its tokens file (never the token), so it can verify a bundle without a new secret
//! to distribute, and removing (revoking) a token from the file makes its bundles refused too. The
//! message starts with the format line, so a tag made for a bundle means nothing anywhere else, and
//! the header (cluster id, creation time, length) is authenticated with the body: a bundle can be
//! neither re-labelled for another cluster nor cut short. A truncated file fails the length check
//! before the tag is computed.

use std::fmt;

/// The first line of every bundle.
pub const MAGIC: &[u8] = b"TELEMETER-BUNDLE/1\n";
/// Length of the tag.
pub const TAG_BYTES: usize = 32;
/// Most bytes the header may take (a cluster id is at most a few hundred bytes).
const MAX_HEADER_BYTES: usize = 4096;

/// One upload and who made it when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The cluster the upload is for.
    pub cluster_id: String,
    /// When the bundle was made, ms since the Unix epoch.
    pub created_ms: u64,
    /// The upload body.
    pub body: Vec<u8>,
}

/// Why a file is not a usable bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleError {
    /// It does not start with [`MAGIC`] (another file, or another version).
    NotABundle,
    /// The header is malformed.
    Header(String),
    /// The body is larger than the reader allows.
    TooLarge {
        /// The declared length.
        declared: u64,
        /// The limit.
        limit: usize,
    },
    /// The file is shorter or longer than its header says.
    Length {
        /// Bytes the header promises (header, body and tag).
        expected: u64,
        /// Bytes the file has.
        actual: usize,
    },
    /// No key the reader has makes the tag: tampered, or made with a token it does not know
    /// (revoked, or of another cluster).
    Tag,
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BundleError::NotABundle => f.write_str("not a telemeter bundle (version 1)"),
            BundleError::Header(m) => write!(f, "bad bundle header: {m}"),
            BundleError::TooLarge { declared, limit } => {
                write!(f, "bundle body of {declared} bytes is over the limit of {limit}")
            }
            BundleError::Length { expected, actual } => write!(
                f,
                "bundle is {actual} bytes but its header says {expected}: truncated or extended"
            ),
            BundleError::Tag => f.write_str(
                "bundle tag does not verify: altered, or made with a client token not allowed for its cluster (revoked?)",
            ),
        }
    }
}

impl std::error::Error for BundleError {}

/// The largest file a bundle whose body holds at most `max_body` bytes can be: what a reader
/// reads at most before [`parse`] refuses it.
pub fn max_file_bytes(max_body: usize) -> usize {
    MAGIC
        .len()
        .saturating_add(MAX_HEADER_BYTES)
        .saturating_add(max_body)
        .saturating_add(TAG_BYTES)
}

/// The tag key of a client token: its SHA-256.
pub fn key_of(client_token: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    key.copy_from_slice(
        ring::digest::digest(&ring::digest::SHA256, client_token.as_bytes()).as_ref(),
    );
    key
}

impl Bundle {
    /// The bundle's bytes, tagged with `key` ([`key_of`] the client token).
    pub fn seal(&self, key: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 256);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(
            format!(
                "cluster={}\ncreated_ms={}\nbody_bytes={}\n\n",
                self.cluster_id,
                self.created_ms,
                self.body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&self.body);
        let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), &out);
        out.extend_from_slice(tag.as_ref());
        out
    }
}

/// A bundle read but not yet verified.
#[derive(Debug)]
pub struct Unverified<'a> {
    /// What it claims.
    pub bundle: Bundle,
    signed: &'a [u8],
    tag: &'a [u8],
}

impl Unverified<'_> {
    /// The bundle, if one of `keys` made its tag (compared in constant time).
    pub fn verify<'k>(
        self,
        keys: impl IntoIterator<Item = &'k [u8; 32]>,
    ) -> Result<Bundle, BundleError> {
        for key in keys {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
            if ring::hmac::verify(&key, self.signed, self.tag).is_ok() {
                return Ok(self.bundle);
            }
        }
        Err(BundleError::Tag)
    }
}

/// Reads a bundle's header and checks its length; the body may hold at most `max_body` bytes.
pub fn parse(bytes: &[u8], max_body: usize) -> Result<Unverified<'_>, BundleError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(BundleError::NotABundle)?;
    let window = &rest[..rest.len().min(MAX_HEADER_BYTES)];
    let end = window
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or_else(|| BundleError::Header("no end of header".into()))?;
    let header =
        std::str::from_utf8(&window[..end]).map_err(|_| BundleError::Header("not UTF-8".into()))?;
    let (mut cluster_id, mut created_ms, mut body_bytes) = (None, None, None);
    for line in header.lines() {
        let (name, value) = line
            .split_once('=')
            .ok_or_else(|| BundleError::Header(format!("line {line:?} is not NAME=VALUE")))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| BundleError::Header(format!("{name} {value:?} is not a number")))
        };
        match name {
            "cluster" => cluster_id = Some(value.to_string()),
            "created_ms" => created_ms = Some(number()?),
            "body_bytes" => body_bytes = Some(number()?),
            _ => return Err(BundleError::Header(format!("unknown field {name:?}"))),
        }
    }
    let missing = |name: &str| BundleError::Header(format!("no {name}"));
    let cluster_id = cluster_id.ok_or_else(|| missing("cluster"))?;
    let created_ms = created_ms.ok_or_else(|| missing("created_ms"))?;
    let body_bytes = body_bytes.ok_or_else(|| missing("body_bytes"))?;
    if body_bytes > max_body as u64 {
        return Err(BundleError::TooLarge {
            declared: body_bytes,
            limit: max_body,
        });
    }
    let header_len = MAGIC.len() + end + 2;
    let expected = header_len as u64 + body_bytes + TAG_BYTES as u64;
    if bytes.len() as u64 != expected {
        return Err(BundleError::Length {
            expected,
            actual: bytes.len(),
        });
    }
    let body_end = header_len + body_bytes as usize;
    let (signed, tag) = bytes.split_at(body_end);
    Ok(Unverified {
        bundle: Bundle {
            cluster_id,
            created_ms,
            body: signed[header_len..].to_vec(),
        },
        signed,
        tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        Bundle {
            cluster_id: "site-a".into(),
            created_ms: 1_700_000_000_123,
            body: b"\xff\x06\x00\x00sNaPpY and more".to_vec(),
        }
    }

    #[test]
    fn a_sealed_bundle_verifies_with_its_token_only() {
        let key = key_of("client-secret");
        let bytes = sample().seal(&key);
        let other = key_of("another-token");
        assert_eq!(
            parse(&bytes, 1 << 20).unwrap().verify([&other, &key]),
            Ok(sample())
        );
        // A revoked token: the reader no longer has its key.
        assert_eq!(
            parse(&bytes, 1 << 20).unwrap().verify([&other]),
            Err(BundleError::Tag)
        );
    }

    #[test]
    fn any_flipped_byte_truncation_or_extension_is_refused() {
        let key = key_of("client-secret");
        let bytes = sample().seal(&key);
        for i in 0..bytes.len() {
            let mut altered = bytes.clone();
            altered[i] ^= 0x01;
            let result = parse(&altered, 1 << 20).and_then(|u| u.verify([&key]));
            assert!(result.is_err(), "byte {i} flipped and still accepted");
        }
        for len in 0..bytes.len() {
            assert!(
                parse(&bytes[..len], 1 << 20)
                    .and_then(|u| u.verify([&key]))
                    .is_err(),
                "truncated to {len} and still accepted"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            parse(&longer, 1 << 20),
            Err(BundleError::Length { .. })
        ));
        assert_eq!(
            parse(&bytes, 4).unwrap_err(),
            BundleError::TooLarge {
                declared: sample().body.len() as u64,
                limit: 4
            }
        );
        assert_eq!(parse(b"hello", 10).unwrap_err(), BundleError::NotABundle);
    }
}
