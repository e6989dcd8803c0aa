//! The heartbeat datagram: who sent it, which boot, how far along, and whom it sees alive.
//!
//! One UDP datagram, at most [`MAX_DATAGRAM`] bytes. Integers are big endian; strings are UTF-8
//! prefixed by their byte length.
//!
//! ```text
//! offset  size      field
//! 0       1         version, [`VERSION`]
//! 1       1         name length n (1..=255)
//! 2       n         sender's name
//!         8         boot id: random, chosen when the sender started
//!         8         sequence number: increases with every heartbeat of one boot
//!         8         send time, milliseconds since the Unix epoch
//!         1         internal address length a (1..=255)
//!         a         sender's internal (HTTP peer) address, "host:port"
//!         2         member count m (0..=256)
//!         m × (1+k) alive member names as the sender sees them, each a length byte and k bytes
//!         32        HMAC-SHA256 (`common::token::mac`, gossip key) over every byte before it
//! ```
//!
//! Decoding reads the structure first and checks the MAC last, so a datagram is classified by what
//! is wrong with it (too large, truncated, garbage, bad MAC); nothing in it is trusted before the
//! MAC verifies, and no input makes decoding panic.

use std::fmt;

use telemeter_common::token::{mac, verify_mac, DerivedKey};

/// The format version this module writes and accepts.
pub const VERSION: u8 = 1;
/// The largest datagram sent or accepted.
pub const MAX_DATAGRAM: usize = 8 * 1024;
/// The longest name or address, in bytes.
pub const MAX_NAME: usize = 255;
/// The most member names a heartbeat carries.
pub const MAX_MEMBERS: usize = 256;
/// Length of the trailing MAC.
pub const MAC_LEN: usize = 32;

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
    /// The MAC does not verify under our gossip key (forged, or another cluster's key).
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
            PacketError::BadMac => f.write_str("heartbeat MAC does not verify"),
        }
    }
}

impl std::error::Error for PacketError {}

/// Why a heartbeat could not be encoded (a bug or a misconfiguration on our side, never input).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The name or address is empty or longer than [`MAX_NAME`].
    BadField(&'static str),
    /// More than [`MAX_MEMBERS`] members.
    TooManyMembers(usize),
    /// The encoded datagram would exceed [`MAX_DATAGRAM`].
    TooLarge(usize),
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
        }
    }
}

impl std::error::Error for EncodeError {}

impl Heartbeat {
    /// The datagram for this heartbeat, MAC'd with `key` (the gossip key).
    pub fn encode(&self, key: &DerivedKey) -> Result<Vec<u8>, EncodeError> {
        if self.members.len() > MAX_MEMBERS {
            return Err(EncodeError::TooManyMembers(self.members.len()));
        }
        let mut out = Vec::with_capacity(64 + self.members.len() * 16);
        out.push(VERSION);
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
        let tag = mac(key, &[&out]);
        out.extend_from_slice(&tag);
        if out.len() > MAX_DATAGRAM {
            return Err(EncodeError::TooLarge(out.len()));
        }
        Ok(out)
    }

    /// Parses and authenticates a datagram.
    pub fn decode(datagram: &[u8], key: &DerivedKey) -> Result<Heartbeat, PacketError> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(PacketError::TooLarge {
                len: datagram.len(),
            });
        }
        let mut r = Reader {
            buf: datagram,
            pos: 0,
        };
        let version = r.u8()?;
        if version != VERSION {
            return Err(PacketError::BadVersion(version));
        }
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
        let signed_len = r.pos;
        let tag = r.take(MAC_LEN)?;
        if r.pos != datagram.len() {
            return Err(PacketError::Malformed("trailing bytes after the MAC"));
        }
        let signed = datagram.get(..signed_len).ok_or(PacketError::Truncated)?;
        if !verify_mac(key, &[signed], tag) {
            return Err(PacketError::BadMac);
        }
        Ok(Heartbeat {
            name,
            boot_id,
            seq,
            sent_ms,
            internal_addr,
            members,
        })
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

    fn key(byte: u8) -> DerivedKey {
        DerivedKey([byte; 32])
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

    #[test]
    fn round_trip() {
        let hb = sample();
        let bytes = hb.encode(&key(1)).unwrap();
        assert_eq!(bytes[0], VERSION);
        assert_eq!(Heartbeat::decode(&bytes, &key(1)).unwrap(), hb);
    }

    #[test]
    fn round_trip_with_no_members_and_max_members() {
        let mut hb = sample();
        hb.members.clear();
        let bytes = hb.encode(&key(1)).unwrap();
        assert_eq!(Heartbeat::decode(&bytes, &key(1)).unwrap(), hb);

        hb.members = (0..MAX_MEMBERS).map(|i| format!("n{i}")).collect();
        let bytes = hb.encode(&key(1)).unwrap();
        assert_eq!(Heartbeat::decode(&bytes, &key(1)).unwrap(), hb);
    }

    #[test]
    fn wrong_key_is_bad_mac() {
        let bytes = sample().encode(&key(1)).unwrap();
        assert_eq!(Heartbeat::decode(&bytes, &key(2)), Err(PacketError::BadMac));
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
    fn forged_field_with_recomputed_layout_is_bad_mac() {
        // An attacker without the key changes the sequence number: the structure still parses.
        let bytes = sample().encode(&key(1)).unwrap();
        let mut forged = bytes.clone();
        let seq_at = 1 + 1 + "node-a".len() + 8;
        forged[seq_at + 7] = 0xff;
        assert_eq!(
            Heartbeat::decode(&forged, &key(1)),
            Err(PacketError::BadMac)
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode(&key(1)).unwrap();
        for len in 0..bytes.len() {
            let result = Heartbeat::decode(&bytes[..len], &key(1));
            assert_eq!(result, Err(PacketError::Truncated), "length {len}");
        }
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut bytes = sample().encode(&key(1)).unwrap();
        bytes.push(0);
        assert!(matches!(
            Heartbeat::decode(&bytes, &key(1)),
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
        bytes[0] = 2;
        assert_eq!(
            Heartbeat::decode(&bytes, &key(1)),
            Err(PacketError::BadVersion(2))
        );
    }

    #[test]
    fn too_many_members_is_malformed() {
        let mut bytes = vec![VERSION, 1, b'a'];
        bytes.extend_from_slice(&[0; 24]);
        bytes.extend_from_slice(&[1, b'x']);
        bytes.extend_from_slice(&((MAX_MEMBERS + 1) as u16).to_be_bytes());
        assert_eq!(
            Heartbeat::decode(&bytes, &key(1)),
            Err(PacketError::Malformed("too many members"))
        );
    }

    #[test]
    fn empty_and_non_utf8_names_are_malformed() {
        let empty_name = [VERSION, 0];
        assert!(matches!(
            Heartbeat::decode(&empty_name, &key(1)),
            Err(PacketError::Malformed(_))
        ));
        let bad_utf8 = [VERSION, 2, 0xc3, 0x28];
        assert!(matches!(
            Heartbeat::decode(&bad_utf8, &key(1)),
            Err(PacketError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random stream (xorshift) of datagrams of every length class.
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
            if round % 2 == 0 && !bytes.is_empty() {
                bytes[0] = VERSION;
            }
            assert!(Heartbeat::decode(&bytes, &key(1)).is_err());
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
