//! Unpadded base64url (RFC 4648 §5), the alphabet of JWTs and of anonymized label values.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Encodes `data` as unpadded base64url.
pub fn encode_url(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b0 = chunk.first().copied().unwrap_or(0);
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        // A chunk of k bytes carries 8k bits, which need k + 1 six-bit symbols.
        for i in 0..=chunk.len() {
            let sextet = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[sextet as usize]));
        }
    }
    out
}

fn sextet(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Decodes unpadded base64url; `None` for any character outside the alphabet, or a bad length.
pub fn decode_url(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    // One leftover symbol cannot hold a whole byte.
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3 + 2);
    for chunk in bytes.chunks(4) {
        let mut n: u32 = 0;
        for (i, &c) in chunk.iter().enumerate() {
            n |= sextet(c)? << (18 - 6 * i);
        }
        let produced = chunk.len() - 1;
        // Bits below the last whole byte must be zero, so every byte string has exactly one encoding
        // (a signature or an id cannot be altered without changing its bytes).
        let unused_bits = 24 - 8 * produced;
        if n & ((1u32 << unused_bits) - 1) != 0 {
            return None;
        }
        for i in 0..produced {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 4648 §10, without padding (the standard and url alphabets agree on these).
    const VECTORS: &[(&str, &str)] = &[
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
        ("foobar", "Zm9vYmFy"),
    ];

    #[test]
    fn rfc4648_vectors_encode() {
        for (plain, encoded) in VECTORS {
            assert_eq!(encode_url(plain.as_bytes()), *encoded, "encoding {plain:?}");
        }
    }

    #[test]
    fn rfc4648_vectors_decode() {
        for (plain, encoded) in VECTORS {
            assert_eq!(
                decode_url(encoded).as_deref(),
                Some(plain.as_bytes()),
                "decoding {encoded:?}"
            );
        }
    }

    #[test]
    fn url_alphabet_uses_dash_and_underscore() {
        // 0xfb 0xff 0xbf is "+/+/" in the standard alphabet.
        assert_eq!(encode_url(&[0xfb, 0xff, 0xbf]), "-_-_");
        assert_eq!(decode_url("-_-_"), Some(vec![0xfb, 0xff, 0xbf]));
        assert_eq!(encode_url(&[0xff]), "_w");
        assert_eq!(encode_url(&[0xff, 0xff]), "__8");
    }

    #[test]
    fn round_trips_every_byte_and_length() {
        let data: Vec<u8> = (0..=255u8).collect();
        for len in 0..data.len() {
            let slice = &data[..len];
            let encoded = encode_url(slice);
            assert!(!encoded.contains('='));
            assert_eq!(decode_url(&encoded).as_deref(), Some(slice), "length {len}");
        }
    }

    #[test]
    fn rejects_standard_alphabet_padding_and_junk() {
        assert_eq!(decode_url("+/+/"), None);
        assert_eq!(decode_url("Zg=="), None);
        assert_eq!(decode_url("Zm9v YmFy"), None);
        assert_eq!(decode_url("Zm9\n"), None);
        assert_eq!(decode_url("é"), None);
    }

    #[test]
    fn rejects_impossible_lengths() {
        assert_eq!(decode_url("Z"), None);
        assert_eq!(decode_url("Zm9vY"), None);
    }

    #[test]
    fn rejects_non_canonical_trailing_bits() {
        // "Zg" is "f"; "Zh" has a stray low bit set.
        assert_eq!(decode_url("Zh"), None);
        assert_eq!(decode_url("Zm9"), None);
        assert_eq!(decode_url("Zm8"), Some(b"fo".to_vec()));
    }
}
