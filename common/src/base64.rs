//! Unpadded base64url (RFC 4648 §5), the alphabet of JWTs and of anonymized label values.

/// Encodes `data` as unpadded base64url.
pub fn encode_url(data: &[u8]) -> String {
    todo!()
}

/// Decodes unpadded base64url; `None` for any character outside the alphabet, or a bad length.
pub fn decode_url(text: &str) -> Option<Vec<u8>> {
    todo!()
}
