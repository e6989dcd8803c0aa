//! The sealed envelope every byte between servers travels in, and the heartbeat datagram.
//!
//! # The envelope
//!
//! Gossip datagrams and forwarded pushes are both sealed with ChaCha20-Poly1305 (`ring::aead`)
//! under a key derived from the shared key for that purpose only ([`KeyPurpose::GossipSeal`],
//! [`KeyPurpose::ForwardSeal`]):
//!
//! ```text
//! offset  size  field
//! 0       1     format version (heartbeat: [`VERSION`]; forward: its own)
//! 1       4     key id: the sealing key's [`KeyId`] (a hash of the derived key, never the key)
//! 5       12    nonce
//! 17      n     ciphertext
//! 17+n    16    Poly1305 tag
//! ```
//!
//! The associated data is the 17 header bytes followed by a context the receiver knows without
//! being told (for a forward: the method and path), each part prefixed by its length. So nothing
//! in the header can be changed, and a sealed body cannot be moved to another purpose or request.
//!
//! **Key choice.** The receiver looks the key id up among its keys (`--shared-key` may be given
//! several times during a rotation): no trial decryption, and a datagram under a key it does not
//! hold is dropped as `unknown_key` before any cryptography runs. Two listed keys with the same id
//! are refused at start.
//!
//! **Nonces never repeat for a key.** Every server of a cluster seals with the same key, so a
//! nonce is a random 64-bit prefix drawn from the system's secure generator followed by a 32-bit
//! counter; a new prefix is drawn when the counter would wrap (every 2³² seals) and at every
//! start. A nonce can only repeat if two prefixes collide: with p prefixes ever drawn under one
//! key the chance is about p²/2⁶⁵, below 2⁻³² until 2¹⁶ prefixes, i.e. 2⁴⁸ seals or 65,536
//! restarts of the cluster's servers under one key, which a rotation resets.
//!
//! # The heartbeat
//!
//! One UDP datagram, at most [`MAX_DATAGRAM`] bytes: the envelope, version [`VERSION`], with no
//! context, whose plaintext is (integers big endian, strings UTF-8 prefixed by their byte length):
//!
//! ```text
//! size      field
//! 1         name length n (1..=255)
//! n         sender's name
//! 8         boot id: random, chosen when the sender started
//! 8         sequence number: increases with every heartbeat of one boot
//! 8         send time, milliseconds since the Unix epoch
//! 1         internal address length a (1..=255)
//! a         sender's internal (HTTP peer) address, "host:port"
//! 2         member count m (0..=256)
//! m × (1+k) alive member names as the sender sees them, each a length byte and k bytes
//! ```
//!
//! The anti-replay rules read the opened plaintext (boot id, sequence, send time within the clock
//! window: see `membership`). Decoding checks the size, the version and the key id, then opens,
//! then parses: nothing is read from the plaintext before the tag verifies, and no input makes
//! decoding panic.

use std::fmt;
use std::sync::Mutex;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use telemeter_common::keys::{DerivedKey, KeyId, KeyPurpose, SharedKey};

/// The heartbeat format version this module writes and accepts (1 was MAC'd, not sealed).
pub const VERSION: u8 = 2;
/// The largest datagram sent or accepted.
pub const MAX_DATAGRAM: usize = 8 * 1024;
/// The longest name or address, in bytes.
pub const MAX_NAME: usize = 255;
/// The most member names a heartbeat carries.
pub const MAX_MEMBERS: usize = 256;
/// Length of the envelope's clear header: version, key id, nonce.
pub const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
/// Length of the trailing AEAD tag.
pub const TAG_LEN: usize = 16;

/// Why an envelope could not be sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SealError {
    /// The system random generator failed while drawing a nonce prefix.
    Random,
    /// `ring` refused to seal (the plaintext is beyond ChaCha20's limit).
    Seal,
    /// A field is empty or too long for its length prefix.
    TooLong(&'static str),
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealError::Random => f.write_str("no randomness for a nonce"),
            SealError::Seal => f.write_str("the payload cannot be sealed"),
            SealError::TooLong(what) => write!(f, "the {what} is empty or too long"),
        }
    }
}

impl std::error::Error for SealError {}

/// Why an envelope did not open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Shorter than a header and a tag.
    Truncated,
    /// The version byte is not the one expected.
    BadVersion(u8),
    /// Sealed under a key we do not hold (another deployment's, or one rotated out).
    UnknownKey(KeyId),
    /// The tag does not verify: tampered, truncated, or replayed into another context.
    BadTag,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Truncated => f.write_str("sealed message is truncated"),
            OpenError::BadVersion(v) => write!(f, "sealed message of version {v} is not supported"),
            OpenError::UnknownKey(id) => write!(f, "sealed under key id {id}, which is not ours"),
            OpenError::BadTag => {
                f.write_str("sealed message does not open (tampered or truncated)")
            }
        }
    }
}

impl std::error::Error for OpenError {}

/// Why a keyring could not be built from the configured keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyringError {
    /// No key at all.
    Empty,
    /// Two keys have the same id: the same key listed twice (or a 2⁻³² coincidence).
    DuplicateId(KeyId),
}

impl fmt::Display for KeyringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyringError::Empty => f.write_str("no shared key to seal with"),
            KeyringError::DuplicateId(id) => write!(
                f,
                "two shared keys have the key id {id}: the same key is listed twice"
            ),
        }
    }
}

impl std::error::Error for KeyringError {}

struct SealKey {
    id: KeyId,
    key: LessSafeKey,
}

/// The nonce generator's state: see the module documentation.
struct NonceState {
    prefix: u64,
    /// The next counter value; `None` when a fresh prefix must be drawn first.
    next: Option<u32>,
}

/// The keys of one purpose: the first seals, every one opens.
pub struct Keyring {
    keys: Vec<SealKey>,
    nonces: Mutex<NonceState>,
    rng: SystemRandom,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

impl Keyring {
    /// A keyring of derived keys, the first sealing.
    pub fn new(keys: &[DerivedKey]) -> Result<Keyring, KeyringError> {
        let mut sealed = Vec::with_capacity(keys.len());
        for key in keys {
            let id = key.id();
            if sealed.iter().any(|k: &SealKey| k.id == id) {
                return Err(KeyringError::DuplicateId(id));
            }
            // A 32-byte key is exactly what ChaCha20-Poly1305 takes: this cannot fail.
            let unbound =
                UnboundKey::new(&CHACHA20_POLY1305, &key.0).map_err(|_| KeyringError::Empty)?;
            sealed.push(SealKey {
                id,
                key: LessSafeKey::new(unbound),
            });
        }
        if sealed.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(Keyring {
            keys: sealed,
            nonces: Mutex::new(NonceState {
                prefix: 0,
                next: None,
            }),
            rng: SystemRandom::new(),
        })
    }

    /// The keyring for `purpose` derived from each shared key, in the order given.
    pub fn derive(shared: &[SharedKey], purpose: KeyPurpose) -> Result<Keyring, KeyringError> {
        let keys: Vec<DerivedKey> = shared.iter().map(|k| k.derive(purpose)).collect();
        Keyring::new(&keys)
    }

    /// The ids of the keys, the sealing key first.
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }

    fn next_nonce(&self) -> Result<[u8; NONCE_LEN], SealError> {
        let mut state = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        let counter = match state.next {
            Some(counter) => counter,
            None => {
                let mut prefix = [0u8; 8];
                self.rng.fill(&mut prefix).map_err(|_| SealError::Random)?;
                state.prefix = u64::from_be_bytes(prefix);
                0
            }
        };
        // After u32::MAX the prefix is drawn again rather than the counter wrapping.
        state.next = counter.checked_add(1);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&state.prefix.to_be_bytes());
        nonce[8..].copy_from_slice(&counter.to_be_bytes());
        Ok(nonce)
    }

    /// Seals `plaintext` as an envelope of `version`, bound to `context`.
    pub fn seal(
        &self,
        version: u8,
        context: &[&[u8]],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let key = self.keys.first().ok_or(SealError::Seal)?;
        let nonce = self.next_nonce()?;
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.push(version);
        out.extend_from_slice(&key.id.0);
        out.extend_from_slice(&nonce);
        let aad = associated_data(&out, context);
        out.extend_from_slice(plaintext);
        let body = out.get_mut(HEADER_LEN..).ok_or(SealError::Seal)?;
        let tag = key
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
            .map_err(|_| SealError::Seal)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens an envelope of `version` bound to `context`: the plaintext (in the envelope's own
    /// buffer, no copy) and the id of the key that opened it.
    pub fn open(
        &self,
        version: u8,
        context: &[&[u8]],
        mut envelope: Vec<u8>,
    ) -> Result<(Vec<u8>, KeyId), OpenError> {
        if envelope.len() < HEADER_LEN + TAG_LEN {
            return Err(OpenError::Truncated);
        }
        let header = envelope.get(..HEADER_LEN).ok_or(OpenError::Truncated)?;
        let found = header.first().copied().unwrap_or(0);
        if found != version {
            return Err(OpenError::BadVersion(found));
        }
        let mut id = [0u8; 4];
        id.copy_from_slice(header.get(1..5).ok_or(OpenError::Truncated)?);
        let id = KeyId(id);
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(OpenError::UnknownKey(id))?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(header.get(5..HEADER_LEN).ok_or(OpenError::Truncated)?);
        let aad = associated_data(header, context);
        let body = envelope.get_mut(HEADER_LEN..).ok_or(OpenError::Truncated)?;
        let plain_len = key
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
            .map_err(|_| OpenError::BadTag)?
            .len();
        envelope.truncate(HEADER_LEN + plain_len);
        envelope.drain(..HEADER_LEN);
        Ok((envelope, id))
    }
}

/// The header followed by each context part prefixed with its length (8 bytes big endian), so
/// that part boundaries cannot be shifted.
fn associated_data(header: &[u8], context: &[&[u8]]) -> Vec<u8> {
    let total: usize = header.len() + context.iter().map(|p| p.len() + 8).sum::<usize>();
    let mut aad = Vec::with_capacity(total);
    aad.extend_from_slice(header);
    for part in context {
        aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad
}

/// One decoded (and authenticated) heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The sender's node name.
    pub name: String,
    /// Random per process start; a new boot id means the sender restarted.
    pub boot_id: u64,
    /// Increases with every heartbeat sent under one boot id.
    pub seq: u64,
    /// When it was sent, milliseconds since the Unix epoch (sender's clock).
    pub sent_ms: u64,
    /// Where the sender accepts forwarded pushes: "host:port" of its internal port.
    pub internal_addr: String,
    /// The members the sender sees alive (itself included), sorted.
    pub members: Vec<String>,
}

/// Why a datagram is not a valid heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PacketError {
    /// Longer than [`MAX_DATAGRAM`].
    TooLarge {
        /// The datagram's length.
        len: usize,
    },
    /// The datagram ends before a field it announces.
    Truncated,
    /// The version byte is not [`VERSION`].
    BadVersion(u8),
    /// A field is malformed: empty or non-UTF-8 name, too many members, trailing bytes...
    Malformed(&'static str),
    /// Sealed under a key id we do not hold.
    UnknownKey(KeyId),
    /// The tag does not verify under our key of that id (forged, tampered or truncated).
    BadMac,
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PacketError::TooLarge { len } => {
                write!(
                    f,
                    "datagram of {len} bytes is over the {MAX_DATAGRAM} byte limit"
                )
            }
            PacketError::Truncated => f.write_str("datagram is truncated"),
            PacketError::BadVersion(v) => {
                write!(f, "heartbeat version {v} is not the supported {VERSION}")
            }
            PacketError::Malformed(what) => write!(f, "malformed heartbeat: {what}"),
            PacketError::UnknownKey(id) => {
                write!(f, "heartbeat sealed under key id {id}, which is not ours")
            }
            PacketError::BadMac => f.write_str("heartbeat does not open (bad tag)"),
        }
    }
}

impl std::error::Error for PacketError {}

impl From<OpenError> for PacketError {
    fn from(err: OpenError) -> PacketError {
        match err {
            OpenError::Truncated => PacketError::Truncated,
            OpenError::BadVersion(v) => PacketError::BadVersion(v),
            OpenError::UnknownKey(id) => PacketError::UnknownKey(id),
            OpenError::BadTag => PacketError::BadMac,
        }
    }
}

/// Why a heartbeat could not be encoded (a bug or a misconfiguration on our side, never input).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The name or address is empty or longer than [`MAX_NAME`].
    BadField(&'static str),
    /// More than [`MAX_MEMBERS`] members.
    TooManyMembers(usize),
    /// The encoded datagram would exceed [`MAX_DATAGRAM`].
    TooLarge(usize),
    /// Sealing failed.
    Seal(SealError),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BadField(what) => {
                write!(f, "{what} must be 1 to {MAX_NAME} bytes long")
            }
            EncodeError::TooManyMembers(n) => {
                write!(
                    f,
                    "{n} members is over the {MAX_MEMBERS} a heartbeat carries"
                )
            }
            EncodeError::TooLarge(n) => {
                write!(
                    f,
                    "heartbeat of {n} bytes is over the {MAX_DATAGRAM} byte limit"
                )
            }
            EncodeError::Seal(err) => write!(f, "cannot seal the heartbeat: {err}"),
        }
    }
}

impl std::error::Error for EncodeError {}

impl Heartbeat {
    /// The datagram for this heartbeat, sealed with `keys`' first key (the gossip keyring).
    pub fn encode(&self, keys: &Keyring) -> Result<Vec<u8>, EncodeError> {
        if self.members.len() > MAX_MEMBERS {
            return Err(EncodeError::TooManyMembers(self.members.len()));
        }
        let mut out = Vec::with_capacity(64 + self.members.len() * 16);
        put_str(&mut out, &self.name, "name")?;
        out.extend_from_slice(&self.boot_id.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.sent_ms.to_be_bytes());
        put_str(&mut out, &self.internal_addr, "internal address")?;
        // Checked above: fits in u16.
        out.extend_from_slice(&(self.members.len() as u16).to_be_bytes());
        for member in &self.members {
            put_str(&mut out, member, "member name")?;
        }
        let sealed_len = HEADER_LEN + out.len() + TAG_LEN;
        if sealed_len > MAX_DATAGRAM {
            return Err(EncodeError::TooLarge(sealed_len));
        }
        keys.seal(VERSION, &[], &out).map_err(EncodeError::Seal)
    }

    /// Opens and parses a datagram: the heartbeat and the id of the key that opened it.
    pub fn decode(datagram: &[u8], keys: &Keyring) -> Result<(Heartbeat, KeyId), PacketError> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(PacketError::TooLarge {
                len: datagram.len(),
            });
        }
        let (plain, key_id) = keys.open(VERSION, &[], datagram.to_vec())?;
        let mut r = Reader {
            buf: &plain,
            pos: 0,
        };
        let name = r.str("empty or non-UTF-8 name")?;
        let boot_id = r.u64()?;
        let seq = r.u64()?;
        let sent_ms = r.u64()?;
        let internal_addr = r.str("empty or non-UTF-8 internal address")?;
        let count = usize::from(r.u16()?);
        if count > MAX_MEMBERS {
            return Err(PacketError::Malformed("too many members"));
        }
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            members.push(r.str("empty or non-UTF-8 member name")?);
        }
        if r.pos != plain.len() {
            return Err(PacketError::Malformed("trailing bytes after the members"));
        }
        Ok((
            Heartbeat {
                name,
                boot_id,
                seq,
                sent_ms,
                internal_addr,
                members,
            },
            key_id,
        ))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), EncodeError> {
    let len = u8::try_from(s.len()).map_err(|_| EncodeError::BadField(what))?;
    if len == 0 {
        return Err(EncodeError::BadField(what));
    }
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// A cursor that returns `Truncated` instead of reading past the end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PacketError> {
        let end = self.pos.checked_add(n).ok_or(PacketError::Truncated)?;
        let bytes = self.buf.get(self.pos..end).ok_or(PacketError::Truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PacketError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, PacketError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, PacketError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn str(&mut self, what: &'static str) -> Result<String, PacketError> {
        let len = usize::from(self.u8()?);
        if len == 0 {
            return Err(PacketError::Malformed(what));
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| PacketError::Malformed(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Keyring {
        Keyring::new(&[DerivedKey([byte; 32])]).unwrap()
    }

    fn sample() -> Heartbeat {
        Heartbeat {
            name: "node-a".into(),
            boot_id: 0x0123_4567_89ab_cdef,
            seq: 42,
            sent_ms: 1_700_000_000_123,
            internal_addr: "10.0.0.1:9004".into(),
            members: vec!["node-a".into(), "node-b".into(), "ünïcode".into()],
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn round_trip_names_the_key_and_hides_every_field() {
        let hb = sample();
        let keys = key(1);
        let bytes = hb.encode(&keys).unwrap();
        assert_eq!(bytes[0], VERSION);
        assert_eq!(&bytes[1..5], &DerivedKey([1; 32]).id().0);
        let (decoded, id) = Heartbeat::decode(&bytes, &keys).unwrap();
        assert_eq!(decoded, hb);
        assert_eq!(id, DerivedKey([1; 32]).id());
        for field in [
            &b"node-a"[..],
            b"node-b",
            b"10.0.0.1",
            &hb.boot_id.to_be_bytes(),
        ] {
            assert!(!contains(&bytes, field), "{field:?} is readable");
        }
    }

    #[test]
    fn nonces_never_repeat_and_the_same_heartbeat_seals_differently() {
        let keys = key(1);
        let a = sample().encode(&keys).unwrap();
        let b = sample().encode(&keys).unwrap();
        assert_ne!(a[5..HEADER_LEN], b[5..HEADER_LEN]);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
        // The counter runs under one prefix; a wrap draws a new prefix instead.
        let n1 = keys.next_nonce().unwrap();
        let n2 = keys.next_nonce().unwrap();
        assert_eq!(n1[..8], n2[..8]);
        assert_eq!(u32::from_be_bytes(n2[8..].try_into().unwrap()), 3);
        keys.nonces.lock().unwrap().next = None;
        let n3 = keys.next_nonce().unwrap();
        assert_ne!(n3[..8], n2[..8]);
        assert_eq!(n3[8..], [0, 0, 0, 0]);
        keys.nonces.lock().unwrap().next = Some(u32::MAX);
        let last = keys.next_nonce().unwrap();
        let after = keys.next_nonce().unwrap();
        assert_eq!(last[8..], [0xff; 4]);
        assert_ne!(
            after[..8],
            last[..8],
            "a wrapped counter must not reuse the prefix"
        );
    }

    #[test]
    fn round_trip_with_no_members_and_max_members() {
        let mut hb = sample();
        hb.members.clear();
        let bytes = hb.encode(&key(1)).unwrap();
        assert_eq!(Heartbeat::decode(&bytes, &key(1)).unwrap().0, hb);

        hb.members = (0..MAX_MEMBERS).map(|i| format!("n{i}")).collect();
        let bytes = hb.encode(&key(1)).unwrap();
        assert_eq!(Heartbeat::decode(&bytes, &key(1)).unwrap().0, hb);
    }

    #[test]
    fn wrong_key_is_unknown_key_without_trying_it() {
        let bytes = sample().encode(&key(1)).unwrap();
        assert_eq!(
            Heartbeat::decode(&bytes, &key(2)),
            Err(PacketError::UnknownKey(DerivedKey([1; 32]).id()))
        );
        // Another key under our key id (forged header): the tag catches it.
        let mut forged = sample().encode(&key(2)).unwrap();
        forged[1..5].copy_from_slice(&DerivedKey([1; 32]).id().0);
        assert_eq!(
            Heartbeat::decode(&forged, &key(1)),
            Err(PacketError::BadMac)
        );
    }

    #[test]
    fn rotation_every_listed_key_opens_the_first_seals() {
        let old = DerivedKey([1; 32]);
        let new = DerivedKey([2; 32]);
        let rolling = Keyring::new(&[new.clone(), old.clone()]).unwrap();
        let by_old = sample().encode(&key(1)).unwrap();
        assert_eq!(Heartbeat::decode(&by_old, &rolling).unwrap().1, old.id());
        let by_rolling = sample().encode(&rolling).unwrap();
        assert_eq!(&by_rolling[1..5], &new.id().0);
        assert_eq!(Heartbeat::decode(&by_rolling, &key(2)).unwrap().1, new.id());
        assert_eq!(rolling.key_ids(), vec![new.id(), old.id()]);
        assert_eq!(
            Keyring::new(&[old.clone(), old.clone()]).unwrap_err(),
            KeyringError::DuplicateId(old.id())
        );
        assert_eq!(Keyring::new(&[]).unwrap_err(), KeyringError::Empty);
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let bytes = sample().encode(&key(1)).unwrap();
        for i in 0..bytes.len() {
            let mut forged = bytes.clone();
            forged[i] ^= 0x01;
            let result = Heartbeat::decode(&forged, &key(1));
            assert!(result.is_err(), "flipping a bit of byte {i} went unnoticed");
        }
    }

    #[test]
    fn context_is_bound() {
        let keys = key(1);
        let sealed = keys.seal(7, &[b"POST", b"/a"], b"payload").unwrap();
        assert_eq!(
            keys.open(7, &[b"POST", b"/a"], sealed.clone()).unwrap().0,
            b"payload"
        );
        assert_eq!(
            keys.open(7, &[b"POST", b"/b"], sealed.clone()),
            Err(OpenError::BadTag)
        );
        // Shifting a byte from one part to the next changes the associated data.
        assert_eq!(
            keys.open(7, &[b"POST/", b"a"], sealed.clone()),
            Err(OpenError::BadTag)
        );
        assert_eq!(
            keys.open(8, &[b"POST", b"/a"], sealed),
            Err(OpenError::BadVersion(7))
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode(&key(1)).unwrap();
        for len in 0..bytes.len() {
            let result = Heartbeat::decode(&bytes[..len], &key(1));
            let want = if len < HEADER_LEN + TAG_LEN {
                PacketError::Truncated
            } else {
                // A shortened tag or ciphertext: the tag no longer verifies.
                PacketError::BadMac
            };
            assert_eq!(result, Err(want), "length {len}");
        }
    }

    #[test]
    fn trailing_bytes_are_bad_mac() {
        let mut bytes = sample().encode(&key(1)).unwrap();
        bytes.push(0);
        assert_eq!(Heartbeat::decode(&bytes, &key(1)), Err(PacketError::BadMac));
    }

    #[test]
    fn trailing_plaintext_is_malformed() {
        let keys = key(1);
        let mut plain = vec![1, b'a'];
        plain.extend_from_slice(&[0; 24]);
        plain.extend_from_slice(&[1, b'x', 0, 0, 9]);
        let bytes = keys.seal(VERSION, &[], &plain).unwrap();
        assert!(matches!(
            Heartbeat::decode(&bytes, &keys),
            Err(PacketError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_is_too_large() {
        let bytes = vec![VERSION; MAX_DATAGRAM + 1];
        assert_eq!(
            Heartbeat::decode(&bytes, &key(1)),
            Err(PacketError::TooLarge {
                len: MAX_DATAGRAM + 1
            })
        );
    }

    #[test]
    fn wrong_version_is_bad_version() {
        let mut bytes = sample().encode(&key(1)).unwrap();
        bytes[0] = 1;
        assert_eq!(
            Heartbeat::decode(&bytes, &key(1)),
            Err(PacketError::BadVersion(1))
        );
    }

    #[test]
    fn too_many_members_is_malformed() {
        let keys = key(1);
        let mut plain = vec![1, b'a'];
        plain.extend_from_slice(&[0; 24]);
        plain.extend_from_slice(&[1, b'x']);
        plain.extend_from_slice(&((MAX_MEMBERS + 1) as u16).to_be_bytes());
        let bytes = keys.seal(VERSION, &[], &plain).unwrap();
        assert_eq!(
            Heartbeat::decode(&bytes, &keys),
            Err(PacketError::Malformed("too many members"))
        );
    }

    #[test]
    fn empty_and_non_utf8_names_are_malformed() {
        let keys = key(1);
        for plain in [&[0u8][..], &[2, 0xc3, 0x28]] {
            let bytes = keys.seal(VERSION, &[], plain).unwrap();
            assert!(matches!(
                Heartbeat::decode(&bytes, &keys),
                Err(PacketError::Malformed(_))
            ));
        }
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random stream (xorshift) of datagrams of every length class.
        let keys = key(1);
        let id = DerivedKey([1; 32]).id();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..5_000usize {
            let len = round % (MAX_DATAGRAM + 64);
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            if round % 2 == 0 && bytes.len() >= HEADER_LEN {
                bytes[0] = VERSION;
                bytes[1..5].copy_from_slice(&id.0);
            }
            assert!(Heartbeat::decode(&bytes, &keys).is_err());
        }
    }

    #[test]
    fn encode_refuses_bad_fields() {
        let mut hb = sample();
        hb.name = String::new();
        assert_eq!(hb.encode(&key(1)), Err(EncodeError::BadField("name")));
        let mut hb = sample();
        hb.name = "x".repeat(MAX_NAME + 1);
        assert_eq!(hb.encode(&key(1)), Err(EncodeError::BadField("name")));
        let mut hb = sample();
        hb.members = vec!["m".into(); MAX_MEMBERS + 1];
        assert_eq!(
            hb.encode(&key(1)),
            Err(EncodeError::TooManyMembers(MAX_MEMBERS + 1))
        );
        let mut hb = sample();
        hb.members = (0..MAX_MEMBERS).map(|i| format!("{i:0>200}")).collect();
        assert!(matches!(hb.encode(&key(1)), Err(EncodeError::TooLarge(_))));
    }
}
