//! The on-disk format of one cluster's file (layout in the parent module's doc).
//!
//! Reading trusts nothing: every length is checked against the file's real size before anything is
//! allocated, and the checksum is verified before a payload is handed out.

use std::fs::File;
use std::io::{self, BufReader, Read};

use ring::digest;
use telemeter_common::crc32c;

/// The first eight bytes of every cluster file.
pub(super) const MAGIC: &[u8; 8] = b"TLMSTORE";
/// The format version this code writes: 4 is version 3 with a CRC-32C in place of the SHA-256.
pub(super) const VERSION: u16 = 4;
/// The third version, still read: as version 4 with a SHA-256 as its checksum, which was a tenth of
/// the first scrape after a checkpoint (each file's first read checks it: ~2.5 GB/s with the SHA
/// instructions, against the CRC's ~15).
pub(super) const VERSION_3: u16 = 3;
/// The second version, still read: without the newest remote-write sample's time, which the store
/// learns from the payload when first asked ([`super::Store::newest_received`]).
pub(super) const VERSION_2: u16 = 2;
/// The first version, still read: without the newest sample's time, which is then read from the
/// payload (and so is the newest remote-write sample's).
pub(super) const VERSION_1: u16 = 1;
/// Bytes of the checksum of versions 1 to 3 (SHA-256).
pub(super) const SHA256_LEN: u64 = 32;
/// Bytes of the checksum from version 4 (CRC-32C).
pub(super) const CRC32C_LEN: u64 = 4;
/// Bytes of magic + version + cluster id length, the part before the cluster id.
pub(super) const PREFIX_LEN: u64 = 8 + 2 + 2;
/// Bytes of receive time + payload length, between the cluster id and the checksum, in version 1.
pub(super) const TIMES_LEN: u64 = 8 + 8;
/// Bytes of the newest sample's time, after the receive time, from version 2.
pub(super) const NEWEST_LEN: u64 = 8;
/// Bytes of the newest remote-write sample's time, after the newest sample's, from version 3.
pub(super) const RECEIVED_LEN: u64 = 8;
/// The smallest possible header: an empty cluster id, version 4's checksum and no optional time.
const MIN_HEADER_LEN: u64 = PREFIX_LEN + TIMES_LEN + CRC32C_LEN;

/// A file's checksum as it is computed: SHA-256 up to version 3, CRC-32C from version 4 (as the
/// journal's records from their version 2). Both guard against damage, not against someone who
/// can write the store's directory (who could rewrite either), so the cheaper one does.
enum Checksum {
    Sha256(Box<digest::Context>),
    Crc32c(u32),
}

impl Checksum {
    fn for_version(version: u16) -> Checksum {
        if version >= VERSION {
            Checksum::Crc32c(0)
        } else {
            Checksum::Sha256(Box::new(digest::Context::new(&digest::SHA256)))
        }
    }

    fn len(&self) -> u64 {
        match self {
            Checksum::Sha256(_) => SHA256_LEN,
            Checksum::Crc32c(_) => CRC32C_LEN,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Checksum::Sha256(context) => context.update(bytes),
            Checksum::Crc32c(crc) => *crc = crc32c::extend(*crc, bytes),
        }
    }

    /// The checksum's bytes as the file holds them.
    fn finish(self) -> Vec<u8> {
        match self {
            Checksum::Sha256(context) => context.finish().as_ref().to_vec(),
            Checksum::Crc32c(crc) => crc.to_le_bytes().to_vec(),
        }
    }
}

/// The file name of a cluster: lowercase hex SHA-256 of its id, so any id is a safe name.
pub(super) fn file_name(cluster_id: &str) -> String {
    // By table, not `format!` per byte: `/federate` names every cluster's file on every scrape,
    // and 32 formatted strings a name were a quarter of pinning one (`perf`).
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let hash = digest::digest(&digest::SHA256, cluster_id.as_bytes());
    let mut name = String::with_capacity(64);
    for byte in hash.as_ref() {
        name.push(char::from(DIGITS[usize::from(byte >> 4)]));
        name.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    name
}

/// Whether `name` looks like a cluster file's name (64 lowercase hex digits).
pub(super) fn is_cluster_file_name(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Builds the (current version's) header for `payload`, whose newest sample is stamped
/// `newest_sample_ms` and newest remote-write sample `newest_received_ms` (`i64::MIN`: none); the
/// payload itself follows it in the file. Fails only when the cluster id does not fit its u16
/// length field.
pub(super) fn encode_header(
    cluster_id: &str,
    received_millis: u64,
    newest_sample_ms: i64,
    newest_received_ms: i64,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let id_len = u16::try_from(cluster_id.len())
        .map_err(|_| format!("cluster id is {} bytes, more than 65535", cluster_id.len()))?;
    let mut header = Vec::with_capacity(
        (MIN_HEADER_LEN + NEWEST_LEN + RECEIVED_LEN) as usize + cluster_id.len(),
    );
    let mut checksum = Checksum::for_version(VERSION);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&id_len.to_le_bytes());
    header.extend_from_slice(cluster_id.as_bytes());
    header.extend_from_slice(&received_millis.to_le_bytes());
    header.extend_from_slice(&newest_sample_ms.to_le_bytes());
    header.extend_from_slice(&newest_received_ms.to_le_bytes());
    header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    checksum.update(&header);
    checksum.update(payload);
    header.extend_from_slice(&checksum.finish());
    Ok(header)
}

/// What a verified file's header says.
#[derive(Debug)]
pub(super) struct Header {
    /// The cluster id.
    pub(super) cluster_id: String,
    /// Receive time, ms since the epoch.
    pub(super) received_millis: u64,
    /// The newest sample's timestamp, ms since the epoch; `None` where the format does not record
    /// it (version 1 files, journal records), so it is read from the payload.
    pub(super) newest_sample_ms: Option<i64>,
    /// The newest remote-write sample's timestamp (`i64::MIN`: none); `None` where the format
    /// does not record it (version 1 and 2 files, journal records before version 3).
    pub(super) newest_received_ms: Option<i64>,
    /// Payload bytes.
    pub(super) payload_len: u64,
}

/// Why a file could not be read.
#[derive(Debug)]
pub(super) enum ReadError {
    /// The file system failed (including the file not existing); the file may be fine.
    Io(io::Error),
    /// The file's content is damaged; the reason says how.
    Corrupt(String),
}

/// An early end means the file changed size under us or lies about its lengths: corruption.
fn early_end(error: io::Error) -> ReadError {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        ReadError::Corrupt("ends before its declared lengths".to_string())
    } else {
        ReadError::Io(error)
    }
}

fn read_array<const N: usize>(reader: &mut impl Read) -> Result<[u8; N], ReadError> {
    let mut bytes = [0u8; N];
    reader.read_exact(&mut bytes).map_err(early_end)?;
    Ok(bytes)
}

/// Reads and verifies the file at `path`. With `keep_payload` the payload is returned; without, it
/// is streamed through the checksum in small pieces (recovery verifies every file that way, so
/// memory does not grow with payload size), except in a version 1 file: its header does not record
/// the newest sample's time, so its payload is returned to read that from. (The store itself
/// reads with [`read_as`]; tests read files straight from disk with this.)
#[cfg(test)]
pub(super) fn read(
    path: &std::path::Path,
    keep_payload: bool,
) -> Result<(Header, Option<Vec<u8>>), ReadError> {
    let file = File::open(path).map_err(ReadError::Io)?;
    read_open(&file, keep_payload)
}

/// As [`read`], from a file already open (at its start): `/federate` keeps it open after reading,
/// so the version it verified stays readable (the payload is the file's last `payload_len`
/// bytes) even when a checkpoint renames a newer one over it.
#[cfg(test)]
pub(super) fn read_open(
    file: &File,
    keep_payload: bool,
) -> Result<(Header, Option<Vec<u8>>), ReadError> {
    let file_len = file.metadata().map_err(ReadError::Io)?.len();
    read_as(file, file_len, Reading::Verified { keep_payload })
}

/// How much of a file [`read_as`] reads and checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reading {
    /// Header and payload, the checksum verified; the payload returned with `keep_payload` (and
    /// always from a version 1 file, see [`read`]).
    Verified {
        /// Whether the payload is returned.
        keep_payload: bool,
    },
    /// The header alone (open builds the index so): every length checked against the file's
    /// size, but not the checksum, which covers the payload too; the first read of the payload
    /// verifies it. A version 1 file's header lacks the newest sample's time (`None`).
    HeaderOnly,
    /// Header and payload, returned without computing the checksum: for a file whose bytes this
    /// store has already verified (the same file, by inode, and unchanged lengths).
    Trusted,
}

/// Reads the file open as `file` (at its start), `file_len` bytes long, as `reading` says.
pub(super) fn read_as(
    file: &File,
    file_len: u64,
    reading: Reading,
) -> Result<(Header, Option<Vec<u8>>), ReadError> {
    if file_len < MIN_HEADER_LEN {
        return Err(ReadError::Corrupt(format!(
            "is {file_len} bytes, shorter than any header ({MIN_HEADER_LEN})"
        )));
    }
    let (verify, keep_payload) = match reading {
        Reading::Verified { keep_payload } => (true, keep_payload),
        Reading::HeaderOnly => (false, false),
        Reading::Trusted => (false, true),
    };
    // A header is ~100 bytes: reading 8 KB ahead of it for every one of 10,000 files at open
    // would copy 80 MB for nothing.
    let buffer = match reading {
        Reading::HeaderOnly => 512,
        _ => 8 * 1024,
    };
    let mut reader = BufReader::with_capacity(buffer, file);

    let magic: [u8; 8] = read_array(&mut reader)?;
    if &magic != MAGIC {
        return Err(ReadError::Corrupt(
            "does not start with TLMSTORE".to_string(),
        ));
    }
    let version: [u8; 2] = read_array(&mut reader)?;
    let version_number = u16::from_le_bytes(version);
    let (with_newest, with_received) = match version_number {
        VERSION | VERSION_3 => (true, true),
        VERSION_2 => (true, false),
        VERSION_1 => (false, false),
        other => {
            return Err(ReadError::Corrupt(format!(
                "has format version {other}, this server reads {VERSION_1} to {VERSION}"
            )))
        }
    };
    // A version 1 file is read whole even for its header: only the payload has its newest sample.
    let (verify, keep_payload) = match reading {
        Reading::HeaderOnly if !with_newest => (true, true),
        _ => (verify, keep_payload || (verify && !with_newest)),
    };
    let id_len: [u8; 2] = read_array(&mut reader)?;
    let newest_len = if with_newest { NEWEST_LEN } else { 0 };
    let received_len = if with_received { RECEIVED_LEN } else { 0 };
    let mut checksum = Checksum::for_version(version_number);
    let header_len = PREFIX_LEN
        + TIMES_LEN
        + checksum.len()
        + newest_len
        + received_len
        + u64::from(u16::from_le_bytes(id_len));
    if file_len < header_len {
        return Err(ReadError::Corrupt(format!(
            "is {file_len} bytes, shorter than its header ({header_len})"
        )));
    }
    checksum.update(MAGIC);
    checksum.update(&version);
    checksum.update(&id_len);

    // At most 65535 bytes, and the file was just shown to hold them.
    let mut id = vec![0u8; usize::from(u16::from_le_bytes(id_len))];
    reader.read_exact(&mut id).map_err(early_end)?;
    checksum.update(&id);
    let received: [u8; 8] = read_array(&mut reader)?;
    checksum.update(&received);
    let newest_sample_ms = if with_newest {
        let newest: [u8; 8] = read_array(&mut reader)?;
        checksum.update(&newest);
        Some(i64::from_le_bytes(newest))
    } else {
        None
    };
    let newest_received_ms = if with_received {
        let newest: [u8; 8] = read_array(&mut reader)?;
        checksum.update(&newest);
        Some(i64::from_le_bytes(newest))
    } else {
        None
    };
    let payload_len: [u8; 8] = read_array(&mut reader)?;
    checksum.update(&payload_len);
    // At most 32 bytes, and the file was shown to hold the whole header.
    let mut stored_checksum = vec![0u8; checksum.len() as usize];
    reader.read_exact(&mut stored_checksum).map_err(early_end)?;

    let declared = u64::from_le_bytes(payload_len);
    let actual = file_len - header_len;
    if declared != actual {
        return Err(ReadError::Corrupt(format!(
            "declares {declared} payload bytes but holds {actual}"
        )));
    }

    let payload = if keep_payload {
        // `declared` equals the real remaining size, so this allocation is backed by the file.
        let len = usize::try_from(declared)
            .map_err(|_| ReadError::Corrupt(format!("payload of {declared} bytes")))?;
        // Read into spare capacity rather than over zeros: a `/federate` scrape reads every
        // cluster's payload, and zeroing each first was one more pass over all of them.
        let mut payload = Vec::with_capacity(len);
        (&mut reader)
            .take(declared)
            .read_to_end(&mut payload)
            .map_err(ReadError::Io)?;
        if payload.len() != len {
            return Err(early_end(io::ErrorKind::UnexpectedEof.into()));
        }
        if verify {
            checksum.update(&payload);
        }
        Some(payload)
    } else if !verify {
        None
    } else {
        let mut remaining = declared;
        let mut buf = vec![0u8; 64 * 1024];
        while remaining > 0 {
            let want = usize::try_from(remaining.min(buf.len() as u64)).unwrap_or(buf.len());
            let piece = buf.get_mut(..want).unwrap_or_default();
            reader.read_exact(piece).map_err(early_end)?;
            checksum.update(piece);
            remaining -= want as u64;
        }
        None
    };

    if verify && checksum.finish() != stored_checksum {
        return Err(ReadError::Corrupt("fails its checksum".to_string()));
    }
    let cluster_id = String::from_utf8(id)
        .map_err(|_| ReadError::Corrupt("holds a cluster id that is not UTF-8".to_string()))?;
    let header = Header {
        cluster_id,
        received_millis: u64::from_le_bytes(received),
        newest_sample_ms,
        newest_received_ms,
        payload_len: declared,
    };
    Ok((header, payload))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn file_names_are_hex_sha256() {
        // SHA-256("abc"), from FIPS 180-2.
        assert_eq!(
            file_name("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_cluster_file_name(&file_name("x")));
        assert!(!is_cluster_file_name(".lock"));
        assert!(!is_cluster_file_name(&file_name("x").to_uppercase()));
    }

    #[test]
    fn header_layout() {
        let header = encode_header("ab", 7, -9, 11, b"xyz").unwrap();
        assert_eq!(
            header.len() as u64,
            MIN_HEADER_LEN + NEWEST_LEN + RECEIVED_LEN + 2
        );
        assert_eq!(&header[..8], MAGIC);
        assert_eq!(&header[8..10], &4u16.to_le_bytes());
        assert_eq!(&header[10..12], &2u16.to_le_bytes());
        assert_eq!(&header[12..14], b"ab");
        assert_eq!(&header[14..22], &7u64.to_le_bytes());
        assert_eq!(&header[22..30], &(-9i64).to_le_bytes());
        assert_eq!(&header[30..38], &11i64.to_le_bytes());
        assert_eq!(&header[38..46], &3u64.to_le_bytes());
        // The CRC-32C of the header before it and the payload, as one run of bytes.
        let crc = crc32c::extend(0, &[&header[..46], b"xyz"].concat());
        assert_eq!(&header[46..], &crc.to_le_bytes());
        assert!(encode_header(&"x".repeat(70_000), 0, 0, 0, b"").is_err());
    }

    /// A header of version 1, 2 or 3 (SHA-256 checksummed), as servers before version 4 wrote
    /// it: the newest sample's time from version 2, the newest remote-write sample's from 3.
    fn encode_sha256_header(
        version: u16,
        cluster_id: &str,
        received_millis: u64,
        newest_sample_ms: i64,
        newest_received_ms: i64,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&version.to_le_bytes());
        header.extend_from_slice(&(cluster_id.len() as u16).to_le_bytes());
        header.extend_from_slice(cluster_id.as_bytes());
        header.extend_from_slice(&received_millis.to_le_bytes());
        if version >= VERSION_2 {
            header.extend_from_slice(&newest_sample_ms.to_le_bytes());
        }
        if version >= VERSION_3 {
            header.extend_from_slice(&newest_received_ms.to_le_bytes());
        }
        header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let mut checksum = digest::Context::new(&digest::SHA256);
        checksum.update(&header);
        checksum.update(payload);
        header.extend_from_slice(checksum.finish().as_ref());
        header
    }

    /// A version 1 header, as servers before version 2 wrote it.
    pub(in crate::store) fn encode_header_v1(
        cluster_id: &str,
        received_millis: u64,
        payload: &[u8],
    ) -> Vec<u8> {
        encode_sha256_header(VERSION_1, cluster_id, received_millis, 0, 0, payload)
    }

    /// A version 2 header, as servers before version 3 wrote it.
    pub(in crate::store) fn encode_header_v2(
        cluster_id: &str,
        received_millis: u64,
        newest_sample_ms: i64,
        payload: &[u8],
    ) -> Vec<u8> {
        encode_sha256_header(
            VERSION_2,
            cluster_id,
            received_millis,
            newest_sample_ms,
            0,
            payload,
        )
    }

    /// A version 3 header, as servers before version 4 wrote it.
    pub(in crate::store) fn encode_header_v3(
        cluster_id: &str,
        received_millis: u64,
        newest_sample_ms: i64,
        newest_received_ms: i64,
        payload: &[u8],
    ) -> Vec<u8> {
        encode_sha256_header(
            VERSION_3,
            cluster_id,
            received_millis,
            newest_sample_ms,
            newest_received_ms,
            payload,
        )
    }

    #[test]
    fn every_version_is_read() {
        let dir = std::env::temp_dir().join(format!("telemeter-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        for (bytes, newest, received) in [
            (
                [
                    encode_header("c", 5, 42, 41, b"pay").unwrap(),
                    b"pay".to_vec(),
                ]
                .concat(),
                Some(42),
                Some(41),
            ),
            (
                [encode_header_v3("c", 5, 42, 41, b"pay"), b"pay".to_vec()].concat(),
                Some(42),
                Some(41),
            ),
            (
                [encode_header_v2("c", 5, 42, b"pay"), b"pay".to_vec()].concat(),
                Some(42),
                None,
            ),
            (
                [encode_header_v1("c", 5, b"pay"), b"pay".to_vec()].concat(),
                None,
                None,
            ),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            let (header, payload) = read(&path, false).unwrap();
            assert_eq!(
                (
                    header.cluster_id.as_str(),
                    header.received_millis,
                    header.newest_sample_ms,
                    header.newest_received_ms
                ),
                ("c", 5, newest, received)
            );
            // Version 1 hands its payload out anyway: the newest sample is read from it.
            assert_eq!(payload.is_some(), newest.is_none());
            assert_eq!(read(&path, true).unwrap().1.unwrap(), b"pay");
            // Every header byte is under the checksum.
            for at in 8..bytes.len() {
                let mut flipped = bytes.clone();
                flipped[at] ^= 0x01;
                std::fs::write(&path, &flipped).unwrap();
                assert!(read(&path, true).is_err(), "byte {at}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
