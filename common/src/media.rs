//! Media types of the wire formats and content negotiation between them.

/// Protobuf-delimited `MetricFamily` messages, the format upstream clients push.
pub const PROTO_DELIMITED: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";
/// Text exposition format 0.0.4.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// What a scraper sends in `Accept` to prefer protobuf and fall back to text.
pub const ACCEPT_PD_THEN_TEXT: &str = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3";

/// A wire format of metric families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Protobuf-delimited.
    ProtoDelimited,
    /// Text exposition 0.0.4.
    Text,
}

impl Format {
    /// The `Content-Type` to send with a body of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::ProtoDelimited => PROTO_DELIMITED,
            Format::Text => TEXT,
        }
    }

    /// The format a `Content-Type` names: protobuf-delimited `MetricFamily`, or text (`text/plain`,
    /// with or without parameters). `None` for anything else.
    pub fn from_content_type(content_type: &str) -> Option<Format> {
        let mut parts = content_type.split(';').map(str::trim);
        let essence = parts.next().unwrap_or("").to_ascii_lowercase();
        match essence.as_str() {
            "application/vnd.google.protobuf" => {
                let mut proto_ok = true;
                let mut delimited = true;
                for p in parts {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    match k.trim().to_ascii_lowercase().as_str() {
                        "proto" => proto_ok = v.trim() == "io.prometheus.client.MetricFamily",
                        "encoding" => delimited = v.trim() == "delimited",
                        _ => {}
                    }
                }
                (proto_ok && delimited).then_some(Format::ProtoDelimited)
            }
            "text/plain" => Some(Format::Text),
            _ => None,
        }
    }

    /// The format to answer a scrape with, from its `Accept` header: protobuf-delimited when the
    /// header asks for it (with a non-zero weight), text otherwise.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        for range in accept.split(',') {
            let range = range.trim();
            if !range
                .to_ascii_lowercase()
                .starts_with("application/vnd.google.protobuf")
            {
                continue;
            }
            let zero_weight = range.split(';').any(|p| {
                let p = p.trim();
                p.starts_with("q=")
                    && p[2..]
                        .trim()
                        .parse::<f64>()
                        .map(|q| q <= 0.0)
                        .unwrap_or(false)
            });
            if !zero_weight
                && Format::from_content_type(range.split(";q=").next().unwrap_or(range)).is_some()
            {
                return Format::ProtoDelimited;
            }
        }
        Format::Text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(
            Format::from_content_type(PROTO_DELIMITED),
            Some(Format::ProtoDelimited)
        );
        assert_eq!(
            Format::from_content_type("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"),
            Some(Format::ProtoDelimited)
        );
        assert_eq!(
            Format::from_content_type("text/plain; version=0.0.4"),
            Some(Format::Text)
        );
        assert_eq!(Format::from_content_type("text/plain"), Some(Format::Text));
        assert_eq!(Format::from_content_type("application/json"), None);
        assert_eq!(
            Format::from_content_type(
                "application/vnd.google.protobuf; proto=other.Message; encoding=delimited"
            ),
            None
        );
    }

    #[test]
    fn negotiation() {
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        assert_eq!(
            Format::negotiate(Some(ACCEPT_PD_THEN_TEXT)),
            Format::ProtoDelimited
        );
        assert_eq!(
            Format::negotiate(Some("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0")),
            Format::Text
        );
    }
}
