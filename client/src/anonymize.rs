//! Salted anonymization of label values, identical to upstream telemeter so that anonymized ids line
//! up across both implementations: unpadded base64url of the first 9 bytes of SHA-256(salt ‖ value).

use ring::digest;
use telemeter_common::model::MetricFamily;

/// How many digest bytes are kept: 9 bytes encode to exactly 12 base64 characters, no padding.
const KEPT_BYTES: usize = 9;

/// The anonymized form of `value` under `salt`.
pub fn anonymize(salt: &str, value: &str) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(salt.as_bytes());
    ctx.update(value.as_bytes());
    let digest = ctx.finish();
    let bytes = digest.as_ref();
    telemeter_common::base64::encode_url(bytes.get(..KEPT_BYTES).unwrap_or(bytes))
}

/// Replaces the value of each label named in `label_names`, in every series of `families`.
///
/// Empty values stay empty, as upstream leaves them: an empty value means "no such label", and
/// Prometheus's `/federate` writes `instance=""` on purpose on series that have no instance (rule
/// and alert results), so that the federating Prometheus adds none. Its hash would invent an
/// `instance` on every alert.
pub fn anonymize_labels(families: &mut [MetricFamily], salt: &str, label_names: &[String]) {
    if label_names.is_empty() {
        return;
    }
    for family in families {
        for series in &mut family.metric {
            for pair in &mut series.label {
                let named = pair
                    .name
                    .as_deref()
                    .is_some_and(|n| label_names.iter().any(|l| l == n));
                if !named {
                    continue;
                }
                if let Some(value) = pair.value.as_mut().filter(|v| !v.is_empty()) {
                    *value = anonymize(salt, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemeter_common::model::{LabelPair, Metric};

    #[test]
    fn upstream_vectors() {
        assert_eq!(
            anonymize("a-unique-value", "localhost:9005"),
            "pzMPIS6aBuSI"
        );
        assert_eq!(anonymize("s1", "127.0.0.1:9090"), "RWwk9dheYMSZ");
    }

    #[test]
    fn output_is_twelve_url_safe_characters() {
        for (salt, value) in [("", ""), ("x", "y"), ("salt", &"v".repeat(10_000))] {
            let out = anonymize(salt, value);
            assert_eq!(out.len(), 12);
            assert!(out
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }

    #[test]
    fn salt_changes_the_result() {
        assert_ne!(anonymize("s1", "host"), anonymize("s2", "host"));
        // Salt and value are concatenated, as upstream does.
        assert_eq!(anonymize("ab", "c"), anonymize("a", "bc"));
    }

    fn pair(name: &str, value: &str) -> LabelPair {
        LabelPair {
            name: Some(name.to_string()),
            value: Some(value.to_string()),
        }
    }

    fn family(name: &str, series: Vec<Vec<LabelPair>>) -> MetricFamily {
        MetricFamily {
            name: Some(name.to_string()),
            metric: series
                .into_iter()
                .map(|label| Metric {
                    label,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn replaces_only_named_labels_in_every_series() {
        let mut families = vec![
            family(
                "up",
                vec![
                    vec![pair("instance", "localhost:9005"), pair("job", "node")],
                    vec![pair("job", "prom"), pair("instance", "127.0.0.1:9090")],
                ],
            ),
            family("other", vec![vec![pair("pod", "p1"), pair("ns", "n")]]),
        ];
        let names = vec!["instance".to_string(), "pod".to_string()];
        anonymize_labels(&mut families, "a-unique-value", &names);

        let want = vec![
            family(
                "up",
                vec![
                    vec![pair("instance", "pzMPIS6aBuSI"), pair("job", "node")],
                    vec![
                        pair("job", "prom"),
                        pair("instance", &anonymize("a-unique-value", "127.0.0.1:9090")),
                    ],
                ],
            ),
            family(
                "other",
                vec![vec![
                    pair("pod", &anonymize("a-unique-value", "p1")),
                    pair("ns", "n"),
                ]],
            ),
        ];
        assert_eq!(families, want);
    }

    #[test]
    fn no_names_changes_nothing() {
        let mut families = vec![family("up", vec![vec![pair("instance", "h")]])];
        let before = families.clone();
        anonymize_labels(&mut families, "s", &[]);
        assert_eq!(families, before);
        anonymize_labels(&mut families, "s", &["job".to_string()]);
        assert_eq!(families, before);
    }

    #[test]
    fn empty_values_stay_empty_as_upstream() {
        // What Prometheus's /federate sends for an alert: instance="" because it has none.
        let mut families = vec![family(
            "ALERTS",
            vec![
                vec![pair("alertname", "Down"), pair("instance", "")],
                vec![pair("alertname", "Up"), pair("instance", "h:9100")],
            ],
        )];
        anonymize_labels(&mut families, "s", &["instance".to_string()]);
        assert_eq!(families[0].metric[0].label_value("instance"), Some(""));
        assert_eq!(
            families[0].metric[1]
                .label_value("instance")
                .map(str::to_string),
            Some(anonymize("s", "h:9100"))
        );
        // The hash of an empty value is a real value, which is why it must not be used.
        assert_eq!(anonymize("s", "").len(), 12);
    }

    #[test]
    fn missing_value_stays_missing() {
        let mut families = vec![family(
            "up",
            vec![vec![LabelPair {
                name: Some("instance".to_string()),
                value: None,
            }]],
        )];
        let before = families.clone();
        anonymize_labels(&mut families, "s", &["instance".to_string()]);
        assert_eq!(families, before);
    }
}
