//! Signed upload tokens.
//!
//! A token is a compact JWT signed with HS256 (HMAC-SHA256, via `ring`). Clients treat it as opaque;
//! every server of the cluster verifies it with the key derived from the shared key file. Keys for
//! different jobs (token signing, peer forwarding, gossip) are derived with distinct labels, so the
//! same bytes never serve two purposes.

use ring::hmac;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::keys::{DerivedKey, KeyPurpose, SharedKey};
use crate::time::unix_seconds;

/// The issuer written into and required of every token (upstream's value).
pub const ISSUER: &str = "telemeter.selfsigned";
/// The audience written into and required of every upload token (upstream's value).
pub const AUDIENCE: &str = "federate";
/// Clock skew tolerated on `nbf` and `exp`.
pub const LEEWAY: Duration = Duration::from_secs(60);

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
        match self {
            TokenError::Malformed => f.write_str("token is not a well-formed JWT"),
            TokenError::UnsupportedAlgorithm(alg) => {
                // The name comes from the client: cut it short so the line stays short.
                let alg: String = alg.chars().take(32).collect();
                write!(f, "token algorithm {alg:?} is not supported (HS256 only)")
            }
            TokenError::BadSignature => f.write_str("token signature does not verify"),
            TokenError::Expired => f.write_str("token has expired"),
            TokenError::NotYetValid => f.write_str("token is not valid yet"),
            TokenError::WrongIssuer => write!(f, "token issuer is not {ISSUER:?}"),
            TokenError::WrongAudience => write!(f, "token audience does not include {AUDIENCE:?}"),
        }
    }
}

impl std::error::Error for TokenError {}

/// The JOSE header we issue: fixed, so it is written as a constant.
const HEADER_JSON: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// `aud` may be one string or an array of strings (RFC 7519 §4.1.3).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, wanted: &str) -> bool {
        match self {
            Audience::One(a) => a == wanted,
            Audience::Many(all) => all.iter().any(|a| a == wanted),
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct TelemeterClaims {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The JSON claims, named as upstream's tokens name them.
#[derive(Serialize, Deserialize)]
struct WireClaims {
    iss: String,
    #[serde(default)]
    sub: String,
    aud: Audience,
    #[serde(default)]
    iat: u64,
    #[serde(default)]
    nbf: u64,
    exp: u64,
    #[serde(rename = "telemeter.openshift.io", default)]
    telemeter: TelemeterClaims,
    #[serde(default)]
    cluster_id: String,
}

/// Issues and verifies upload tokens with the key derived for [`KeyPurpose::UploadToken`].
///
/// During a key rotation it holds several keys: the first signs, every one verifies, so tokens
/// issued under a key that is still listed keep working until they expire.
#[derive(Clone, Debug)]
pub struct TokenSigner {
    signing: DerivedKey,
    /// The other keys tokens are still accepted under.
    others: Vec<DerivedKey>,
}

impl TokenSigner {
    /// A signer using `shared`'s upload-token key.
    pub fn new(shared: &SharedKey) -> TokenSigner {
        TokenSigner::with_keys(std::slice::from_ref(shared))
    }

    /// A signer that signs with the first of `shared` and verifies with any of them. With no key
    /// at all it signs with a fresh random one (as a server without `--shared-key` does).
    pub fn with_keys(shared: &[SharedKey]) -> TokenSigner {
        let mut keys = shared.iter().map(|k| k.derive(KeyPurpose::UploadToken));
        let signing = keys
            .next()
            .unwrap_or_else(|| SharedKey::generate().derive(KeyPurpose::UploadToken));
        TokenSigner {
            signing,
            others: keys.collect(),
        }
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.signing.0)
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
        let now = unix_seconds(now);
        let claims = WireClaims {
            iss: ISSUER.to_string(),
            sub: subject.to_string(),
            aud: Audience::Many(vec![AUDIENCE.to_string()]),
            iat: now,
            nbf: now,
            exp: now.saturating_add(lifetime.as_secs()),
            telemeter: TelemeterClaims {
                labels: labels.clone(),
            },
            cluster_id: cluster_id.to_string(),
        };
        // Serializing plain strings, integers and string maps cannot fail.
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let mut token = crate::base64::encode_url(HEADER_JSON.as_bytes());
        token.push('.');
        token.push_str(&crate::base64::encode_url(&payload));
        let tag = hmac::sign(&self.hmac_key(), token.as_bytes());
        token.push('.');
        token.push_str(&crate::base64::encode_url(tag.as_ref()));
        token
    }

    /// Verifies signature, algorithm, issuer, audience and validity window at `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header = crate::base64::decode_url(header_b64).ok_or(TokenError::Malformed)?;
        let header: Header = serde_json::from_slice(&header).map_err(|_| TokenError::Malformed)?;
        // The algorithm is fixed by us, never chosen by the token: "none" and every other name
        // are refused before anything else is looked at.
        if header.alg != "HS256" {
            return Err(TokenError::UnsupportedAlgorithm(header.alg));
        }
        let signature = crate::base64::decode_url(signature_b64).ok_or(TokenError::Malformed)?;
        let signed_len = header_b64.len() + 1 + payload_b64.len();
        let signed = token.get(..signed_len).ok_or(TokenError::Malformed)?;
        // A token has no key id (upstream's format), so each listed key is tried: at most a few,
        // and only during a rotation.
        let genuine = std::iter::once(&self.signing).chain(&self.others).any(|k| {
            let key = hmac::Key::new(hmac::HMAC_SHA256, &k.0);
            hmac::verify(&key, signed.as_bytes(), &signature).is_ok()
        });
        if !genuine {
            return Err(TokenError::BadSignature);
        }

        let payload = crate::base64::decode_url(payload_b64).ok_or(TokenError::Malformed)?;
        let claims: WireClaims =
            serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        if claims.iss != ISSUER {
            return Err(TokenError::WrongIssuer);
        }
        if !claims.aud.contains(AUDIENCE) {
            return Err(TokenError::WrongAudience);
        }
        check_window(claims.nbf, claims.exp, now)?;
        let labels = claims.telemeter.labels;
        let cluster_id = if claims.cluster_id.is_empty() {
            // Upstream's tokens carry the id only as the `_id` label.
            labels.get("_id").cloned().unwrap_or_default()
        } else {
            claims.cluster_id
        };
        Ok(Claims {
            issuer: claims.iss,
            subject: claims.sub,
            audience: AUDIENCE.to_string(),
            cluster_id,
            labels,
            issued_at: claims.iat,
            not_before: claims.nbf,
            expires_at: claims.exp,
        })
    }
}

/// Whether `now` is within a token's validity window (`nbf` and `exp`, with [`LEEWAY`]).
fn check_window(not_before: u64, expires_at: u64, now: SystemTime) -> Result<(), TokenError> {
    let now = unix_seconds(now);
    let leeway = LEEWAY.as_secs();
    if now.saturating_add(leeway) < not_before {
        return Err(TokenError::NotYetValid);
    }
    if now.saturating_sub(leeway) > expires_at {
        return Err(TokenError::Expired);
    }
    Ok(())
}

/// The longest token [`VerifiedTokens`] keeps: a longer one is verified every time. Upload tokens
/// this server issues are a few hundred bytes; the cap (with the entry count) bounds the memory
/// whatever a token carries.
pub const MAX_CACHED_TOKEN_BYTES: usize = 1024;

/// Tokens verified before, each with what its caller made of its claims, so a client sending the
/// same token upload after upload costs a lookup instead of base64, two JSON parses and an HMAC
/// per key (~4 µs an upload).
///
/// Safe to trust because an entry is exactly what [`TokenSigner::verify`] (and the caller's own
/// check) concluded of the same bytes, and every part of that conclusion but the validity window
/// depends on those bytes and the keys alone: the window is checked again at every hit, with the
/// same rule, so an expired token is refused as `Expired` from the cache as it would be without
/// it. The cache owns its signer, whose keys never change: keys read anew (a restart, or a
/// reload that ever re-reads `--shared-key`) make a new signer and so a new, empty cache. A reload
/// of the tokens file does not touch upload tokens already issued, cached or not (they are
/// self-contained, as upstream's).
///
/// Bounded against whoever sends tokens: only a token that verified and passed the caller's check
/// enters (invalid ones, however many, neither fill nor evict it); at most `capacity` entries of
/// tokens up to [`MAX_CACHED_TOKEN_BYTES`], whose values are made from their claims. When full,
/// expired entries are dropped, and if none were, all are: a client able to mint more valid
/// tokens than the capacity (through `/authorize`) can only make others verify again, never
/// grow it.
pub struct VerifiedTokens<V> {
    signer: TokenSigner,
    capacity: usize,
    entries: Mutex<HashMap<Box<str>, Verified<V>>>,
}

/// One cached verdict.
struct Verified<V> {
    not_before: u64,
    expires_at: u64,
    value: Arc<V>,
}

/// Why [`VerifiedTokens::verify`] refused a token.
#[derive(Debug, PartialEq, Eq)]
pub enum CachedTokenError<E> {
    /// The token did not verify, or is outside its validity window now.
    Token(TokenError),
    /// The token verified, and the caller's check refused its claims.
    Refused(E),
}

impl<V> VerifiedTokens<V> {
    /// An empty cache of at most `capacity` tokens (at least one), verified with `signer`.
    pub fn new(signer: TokenSigner, capacity: usize) -> VerifiedTokens<V> {
        VerifiedTokens {
            signer,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The signer tokens are verified with.
    pub fn signer(&self) -> &TokenSigner {
        &self.signer
    }

    /// Tokens held now.
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.entries).len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What `accept` made of `token`'s claims, from the cache when the token verified before and
    /// is still within its validity window at `now`; else verified (and `accept`ed) now, and kept
    /// when both passed.
    pub fn verify<E>(
        &self,
        token: &str,
        now: SystemTime,
        accept: impl FnOnce(Claims) -> Result<V, E>,
    ) -> Result<Arc<V>, CachedTokenError<E>> {
        {
            let mut entries = crate::sync::lock(&self.entries);
            if let Some(hit) = entries.get(token) {
                return match check_window(hit.not_before, hit.expires_at, now) {
                    Ok(()) => Ok(hit.value.clone()),
                    Err(e) => {
                        if e == TokenError::Expired {
                            entries.remove(token);
                        }
                        Err(CachedTokenError::Token(e))
                    }
                };
            }
        }
        let claims = self
            .signer
            .verify(token, now)
            .map_err(CachedTokenError::Token)?;
        let (not_before, expires_at) = (claims.not_before, claims.expires_at);
        let value = Arc::new(accept(claims).map_err(CachedTokenError::Refused)?);
        if token.len() <= MAX_CACHED_TOKEN_BYTES {
            let mut entries = crate::sync::lock(&self.entries);
            if entries.len() >= self.capacity {
                entries.retain(|_, v| check_window(v.not_before, v.expires_at, now).is_ok());
                if entries.len() >= self.capacity {
                    entries.clear();
                }
            }
            entries.insert(
                token.into(),
                Verified {
                    not_before,
                    expires_at,
                    value: value.clone(),
                },
            );
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base64::{decode_url, encode_url};

    const NOW: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn shared(byte: u8) -> SharedKey {
        SharedKey::from_bytes(&[byte; 32]).unwrap()
    }

    fn labels() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("_id".to_string(), "cluster-1".to_string()),
            ("region".to_string(), "eu".to_string()),
        ])
    }

    fn issue(signer: &TokenSigner) -> String {
        signer.issue(
            "cluster-1",
            "account-7",
            &labels(),
            Duration::from_secs(3600),
            at(NOW),
        )
    }

    /// A token with the given header and claims JSON, signed with `key` (or with `signature`).
    fn forge(key: &DerivedKey, header: &str, claims: &serde_json::Value) -> String {
        let signed = format!(
            "{}.{}",
            encode_url(header.as_bytes()),
            encode_url(claims.to_string().as_bytes())
        );
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &key.0),
            signed.as_bytes(),
        );
        format!("{signed}.{}", encode_url(tag.as_ref()))
    }

    fn claims_json() -> serde_json::Value {
        serde_json::json!({
            "iss": ISSUER,
            "sub": "account-7",
            "aud": ["federate"],
            "iat": NOW,
            "nbf": NOW,
            "exp": NOW + 3600,
            "telemeter.openshift.io": {"labels": {"_id": "cluster-1"}},
            "cluster_id": "cluster-1",
        })
    }

    #[test]
    fn debug_hides_secrets() {
        let k = shared(0x41);
        assert_eq!(format!("{k:?}"), "SharedKey(..)");
        assert_eq!(
            format!("{:?}", k.derive(KeyPurpose::Gossip)),
            "DerivedKey(..)"
        );
        assert!(!format!("{:?}", TokenSigner::new(&k)).contains("65"));
    }

    #[test]
    fn issue_verify_round_trip() {
        let signer = TokenSigner::new(&shared(5));
        let token = issue(&signer);
        let claims = signer.verify(&token, at(NOW + 10)).unwrap();
        assert_eq!(
            claims,
            Claims {
                issuer: ISSUER.to_string(),
                subject: "account-7".to_string(),
                audience: AUDIENCE.to_string(),
                cluster_id: "cluster-1".to_string(),
                labels: labels(),
                issued_at: NOW,
                not_before: NOW,
                expires_at: NOW + 3600,
            }
        );
    }

    #[test]
    fn issued_token_has_upstream_shape() {
        let token = issue(&TokenSigner::new(&shared(5)));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&decode_url(parts[0]).unwrap()).unwrap();
        assert_eq!(header, serde_json::json!({"alg": "HS256", "typ": "JWT"}));
        let claims: serde_json::Value =
            serde_json::from_slice(&decode_url(parts[1]).unwrap()).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({
                "iss": "telemeter.selfsigned",
                "sub": "account-7",
                "aud": ["federate"],
                "iat": NOW,
                "nbf": NOW,
                "exp": NOW + 3600,
                "telemeter.openshift.io": {"labels": {"_id": "cluster-1", "region": "eu"}},
                "cluster_id": "cluster-1",
            })
        );
        assert_eq!(decode_url(parts[2]).unwrap().len(), 32);
    }

    #[test]
    fn tampered_payload_fails() {
        let signer = TokenSigner::new(&shared(5));
        let token = issue(&signer);
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&decode_url(parts[1]).unwrap()).unwrap();
        claims["cluster_id"] = serde_json::json!("cluster-2");
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            encode_url(claims.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(
            signer.verify(&tampered, at(NOW)),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampered_signature_fails() {
        let signer = TokenSigner::new(&shared(5));
        let token = issue(&signer);
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let mut bytes = decode_url(sig).unwrap();
        bytes[0] ^= 1;
        let flipped = format!("{signed}.{}", encode_url(&bytes));
        assert_eq!(
            signer.verify(&flipped, at(NOW)),
            Err(TokenError::BadSignature)
        );
        let short = format!("{signed}.{}", encode_url(&bytes[..16]));
        assert_eq!(
            signer.verify(&short, at(NOW)),
            Err(TokenError::BadSignature)
        );
        let empty = format!("{signed}.");
        assert_eq!(
            signer.verify(&empty, at(NOW)),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn token_from_another_key_fails() {
        let ours = TokenSigner::new(&shared(5));
        let theirs = TokenSigner::new(&shared(6));
        assert_eq!(
            ours.verify(&issue(&theirs), at(NOW)),
            Err(TokenError::BadSignature)
        );
        // Same shared key, but a key derived for another purpose.
        let forward_key = shared(5).derive(KeyPurpose::PeerForward);
        let forged = forge(&forward_key, HEADER_JSON, &claims_json());
        assert_eq!(ours.verify(&forged, at(NOW)), Err(TokenError::BadSignature));
        // The forge helper itself produces tokens the right key accepts.
        let good = forge(
            &shared(5).derive(KeyPurpose::UploadToken),
            HEADER_JSON,
            &claims_json(),
        );
        assert!(ours.verify(&good, at(NOW)).is_ok());
    }

    #[test]
    fn validity_window_with_leeway() {
        let signer = TokenSigner::new(&shared(5));
        let token = issue(&signer);
        let exp = NOW + 3600;
        assert!(signer.verify(&token, at(exp)).is_ok());
        assert!(signer.verify(&token, at(exp + 60)).is_ok());
        assert_eq!(
            signer.verify(&token, at(exp + 61)),
            Err(TokenError::Expired)
        );
        assert_eq!(
            signer.verify(&token, at(exp + 86_400)),
            Err(TokenError::Expired)
        );
        assert!(signer.verify(&token, at(NOW - 60)).is_ok());
        assert_eq!(
            signer.verify(&token, at(NOW - 61)),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(signer.verify(&token, at(0)), Err(TokenError::NotYetValid));
    }

    #[test]
    fn wrong_audience() {
        let key = shared(5).derive(KeyPurpose::UploadToken);
        let signer = TokenSigner::new(&shared(5));
        for aud in [
            serde_json::json!(["other"]),
            serde_json::json!([]),
            serde_json::json!("other"),
        ] {
            let mut claims = claims_json();
            claims["aud"] = aud;
            let token = forge(&key, HEADER_JSON, &claims);
            assert_eq!(
                signer.verify(&token, at(NOW)),
                Err(TokenError::WrongAudience)
            );
        }
        // A single string, or an array that contains it among others, is fine.
        for aud in [
            serde_json::json!("federate"),
            serde_json::json!(["x", "federate"]),
        ] {
            let mut claims = claims_json();
            claims["aud"] = aud;
            let token = forge(&key, HEADER_JSON, &claims);
            assert!(signer.verify(&token, at(NOW)).is_ok());
        }
    }

    #[test]
    fn wrong_issuer() {
        let key = shared(5).derive(KeyPurpose::UploadToken);
        let mut claims = claims_json();
        claims["iss"] = serde_json::json!("someone.else");
        let token = forge(&key, HEADER_JSON, &claims);
        assert_eq!(
            TokenSigner::new(&shared(5)).verify(&token, at(NOW)),
            Err(TokenError::WrongIssuer)
        );
    }

    #[test]
    fn algorithm_none_and_others_are_refused() {
        let signer = TokenSigner::new(&shared(5));
        let claims = encode_url(claims_json().to_string().as_bytes());
        let none = format!("{}.{claims}.", encode_url(br#"{"alg":"none","typ":"JWT"}"#));
        assert_eq!(
            signer.verify(&none, at(NOW)),
            Err(TokenError::UnsupportedAlgorithm("none".to_string()))
        );
        let key = shared(5).derive(KeyPurpose::UploadToken);
        for alg in ["RS256", "HS512", "hs256", "ES256"] {
            let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
            let token = forge(&key, &header, &claims_json());
            assert_eq!(
                signer.verify(&token, at(NOW)),
                Err(TokenError::UnsupportedAlgorithm(alg.to_string()))
            );
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let signer = TokenSigner::new(&shared(5));
        let token = issue(&signer);
        let key = shared(5).derive(KeyPurpose::UploadToken);
        let (_, rest) = token.split_once('.').unwrap();
        let cases = vec![
            String::new(),
            "garbage".to_string(),
            "a.b".to_string(),
            "a.b.c.d".to_string(),
            format!("{token}.extra"),
            format!("!!!.{rest}"),
            format!("{}.{rest}", encode_url(b"not json")),
            format!("{}.{rest}", encode_url(br#"{"typ":"JWT"}"#)),
            // Valid signature over a payload that is not JSON claims.
            forge(&key, HEADER_JSON, &serde_json::json!("just a string")),
            forge(&key, HEADER_JSON, &serde_json::json!({"iss": ISSUER})),
        ];
        for bad in cases {
            assert_eq!(
                signer.verify(&bad, at(NOW)),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
        let bad_sig_encoding = format!("{}.{}", token.rsplit_once('.').unwrap().0, "***");
        assert_eq!(
            signer.verify(&bad_sig_encoding, at(NOW)),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn cluster_id_falls_back_to_the_id_label() {
        let key = shared(5).derive(KeyPurpose::UploadToken);
        let mut claims = claims_json();
        claims.as_object_mut().unwrap().remove("cluster_id");
        let token = forge(&key, HEADER_JSON, &claims);
        let verified = TokenSigner::new(&shared(5))
            .verify(&token, at(NOW))
            .unwrap();
        assert_eq!(verified.cluster_id, "cluster-1");
    }

    #[test]
    fn errors_display_one_line() {
        let errors = [
            TokenError::Malformed,
            TokenError::UnsupportedAlgorithm("x".repeat(500)),
            TokenError::BadSignature,
            TokenError::Expired,
            TokenError::NotYetValid,
            TokenError::WrongIssuer,
            TokenError::WrongAudience,
        ];
        for e in errors {
            let s = e.to_string();
            assert!(!s.contains('\n') && s.len() < 100, "{s}");
        }
        assert_eq!(TokenError::Expired.to_string(), "token has expired");
    }

    #[test]
    fn rotation_signs_with_the_first_key_and_verifies_with_any() {
        let now = SystemTime::now();
        let old = TokenSigner::new(&shared(1));
        let rolling = TokenSigner::with_keys(&[shared(2), shared(1)]);
        let new = TokenSigner::new(&shared(2));
        let by_old = old.issue("c", "s", &labels(), Duration::from_secs(60), now);
        let by_rolling = rolling.issue("c", "s", &labels(), Duration::from_secs(60), now);
        assert!(rolling.verify(&by_old, now).is_ok());
        assert!(new.verify(&by_rolling, now).is_ok());
        assert!(matches!(
            old.verify(&by_rolling, now),
            Err(TokenError::BadSignature)
        ));
        assert!(matches!(
            new.verify(&by_old, now),
            Err(TokenError::BadSignature)
        ));
    }

    /// A cache whose `accept` counts its calls (each one is a full verification).
    fn cache(capacity: usize) -> (VerifiedTokens<String>, Arc<std::sync::atomic::AtomicUsize>) {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (
            VerifiedTokens::new(TokenSigner::new(&shared(1)), capacity),
            calls,
        )
    }

    fn verify_counted(
        cache: &VerifiedTokens<String>,
        calls: &std::sync::atomic::AtomicUsize,
        token: &str,
        now: SystemTime,
    ) -> Result<Arc<String>, CachedTokenError<()>> {
        cache.verify(token, now, |claims| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(claims.cluster_id)
        })
    }

    #[test]
    fn a_cached_token_is_verified_once_and_refused_once_expired() {
        let (cache, calls) = cache(8);
        let token = issue(cache.signer());
        for _ in 0..3 {
            let value = verify_counted(&cache, &calls, &token, at(NOW + 10)).unwrap();
            assert_eq!(*value, "cluster-1");
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The window is checked at every hit, with verify's own rule and error.
        let late = at(NOW + 3600 + LEEWAY.as_secs() + 1);
        assert_eq!(
            cache.signer().verify(&token, late).unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(
            verify_counted(&cache, &calls, &token, late).unwrap_err(),
            CachedTokenError::Token(TokenError::Expired)
        );
        assert!(cache.is_empty(), "an expired token stays cached");
        // A clock set back before `nbf` refuses it as verify would.
        let token = issue(cache.signer());
        verify_counted(&cache, &calls, &token, at(NOW)).unwrap();
        assert_eq!(
            verify_counted(&cache, &calls, &token, at(NOW - LEEWAY.as_secs() - 1)).unwrap_err(),
            CachedTokenError::Token(TokenError::NotYetValid)
        );
    }

    #[test]
    fn only_tokens_that_verified_and_were_accepted_enter_the_cache() {
        let (cache, calls) = cache(4);
        let good = issue(cache.signer());
        verify_counted(&cache, &calls, &good, at(NOW)).unwrap();
        // Forged, tampered, under another key, or refused by the caller: none enters, and none
        // evicts the token that did, however many are sent.
        let other = issue(&TokenSigner::new(&shared(2)));
        // One character of the signature changed (not the last, whose low bits base64 drops).
        let at_sig = good.len() - 10;
        let swapped = if &good[at_sig..=at_sig] == "B" {
            "C"
        } else {
            "B"
        };
        let tampered = format!("{}{swapped}{}", &good[..at_sig], &good[at_sig + 1..]);
        for i in 0..100 {
            let forged = format!("{good}{i}");
            for bad in [&forged, &other, &tampered] {
                assert!(
                    verify_counted(&cache, &calls, bad, at(NOW)).is_err(),
                    "{bad} verified, good {good}"
                );
            }
            let refused: Result<_, CachedTokenError<&str>> =
                cache.verify(&issue_at(cache.signer(), i), at(NOW + 100), |_| Err("no"));
            assert_eq!(refused.unwrap_err(), CachedTokenError::Refused("no"));
        }
        assert_eq!(cache.len(), 1);
        let before = calls.load(std::sync::atomic::Ordering::SeqCst);
        verify_counted(&cache, &calls, &good, at(NOW)).unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), before);
    }

    fn issue_at(signer: &TokenSigner, i: u64) -> String {
        signer.issue(
            &format!("cluster-{i}"),
            "account-7",
            &labels(),
            Duration::from_secs(3600),
            at(NOW + i),
        )
    }

    #[test]
    fn the_cache_holds_at_most_its_capacity_and_no_long_token() {
        let (cache, calls) = cache(16);
        for i in 0..200 {
            let token = issue_at(cache.signer(), i);
            verify_counted(&cache, &calls, &token, at(NOW + 200)).unwrap();
            assert!(cache.len() <= 16, "{} tokens held", cache.len());
        }
        // Expired entries go first when it is full: the fresh ones stay.
        let (cache, calls) = cache_with_expired();
        assert_eq!(cache.len(), 4);
        // Full of fresh ones: the next clears it rather than grow it.
        verify_counted(
            &cache,
            &calls,
            &issue_at(cache.signer(), 904),
            at(NOW + 1000),
        )
        .unwrap();
        assert_eq!(cache.len(), 1);
        // A token over the byte cap verifies, and is not kept.
        let (cache, calls) = self::cache(16);
        let long_labels: BTreeMap<String, String> =
            BTreeMap::from([("x".to_string(), "y".repeat(MAX_CACHED_TOKEN_BYTES))]);
        let long = cache
            .signer()
            .issue("c", "s", &long_labels, Duration::from_secs(60), at(NOW));
        assert!(long.len() > MAX_CACHED_TOKEN_BYTES);
        verify_counted(&cache, &calls, &long, at(NOW)).unwrap();
        assert!(cache.is_empty());
    }

    /// A full cache of 4 holding 3 expired tokens and 1 fresh, then one more fresh token put.
    fn cache_with_expired() -> (VerifiedTokens<String>, Arc<std::sync::atomic::AtomicUsize>) {
        let (cache, calls) = cache(4);
        for i in 0..3 {
            let short = cache.signer().issue(
                &format!("old-{i}"),
                "s",
                &labels(),
                Duration::from_secs(1),
                at(NOW),
            );
            verify_counted(&cache, &calls, &short, at(NOW)).unwrap();
        }
        let later = at(NOW + 1000);
        let fresh = [issue_at(cache.signer(), 900), issue_at(cache.signer(), 901)];
        verify_counted(&cache, &calls, &fresh[0], later).unwrap();
        verify_counted(&cache, &calls, &fresh[1], later).unwrap();
        // The expired three were dropped, not the fresh one: both are hits now.
        let before = calls.load(std::sync::atomic::Ordering::SeqCst);
        for token in &fresh {
            verify_counted(&cache, &calls, token, later).unwrap();
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), before);
        // Filled up again with fresh ones.
        verify_counted(&cache, &calls, &issue_at(cache.signer(), 902), later).unwrap();
        verify_counted(&cache, &calls, &issue_at(cache.signer(), 903), later).unwrap();
        (cache, calls)
    }
}
