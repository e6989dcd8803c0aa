//! Salted anonymization of label values, identical to upstream telemeter so that anonymized ids line
//! up across both implementations: unpadded base64url of the first 9 bytes of SHA-256(salt ‖ value).

use crate::model::MetricFamily;

/// The anonymized form of `value` under `salt`.
pub fn anonymize(salt: &str, value: &str) -> String {
    todo!()
}

/// Replaces the value of each label named in `label_names`, in every series of `families`.
pub fn anonymize_labels(families: &mut [MetricFamily], salt: &str, label_names: &[String]) {
    todo!()
}
