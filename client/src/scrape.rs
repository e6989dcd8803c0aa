//! Scraping the isolated Prometheus: `GET <from>?match[]=…`, protobuf preferred, text accepted.

use crate::prescan::{self, Estimate, Refusal, Transform};
use crate::USER_AGENT;
use std::fmt;
use std::path::Path;
use std::time::Duration;
use telemeter_common::agent::{self, AgentError};
use telemeter_common::http::percent_encode;
use telemeter_common::media::{Format, ACCEPT_PD_THEN_TEXT};
use telemeter_common::model::MetricFamily;
use telemeter_common::selector::Selector;
use telemeter_common::{delimited, text};

/// Why a scrape failed.
#[derive(Debug)]
pub enum ScrapeError {
    /// The request could not be made or the reply not read (connection refused, timeout, TLS).
    Transport {
        /// The URL scraped (without query).
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The server answered with a status other than 200.
    Status {
        /// The URL scraped (without query).
        url: String,
        /// The status.
        status: u16,
        /// The first line of the reply body.
        message: String,
    },
    /// The body is larger than `--limit-bytes`.
    TooLarge {
        /// The URL scraped (without query).
        url: String,
        /// The limit.
        limit: usize,
    },
    /// The body could not be decoded.
    Decode {
        /// The URL scraped (without query).
        url: String,
        /// The Content-Type of the reply.
        content_type: String,
        /// What was wrong.
        message: String,
    },
    /// Decoding the body would take more memory than `--limit-bytes` allows; nothing was decoded.
    TooMuchMemory {
        /// The URL scraped (without query).
        url: String,
        /// The size of the body.
        bytes: usize,
        /// What the body holds.
        estimate: Estimate,
        /// The memory decoding and transforming it would take, at most.
        needed: usize,
        /// The memory allowed.
        budget: usize,
    },
}

impl fmt::Display for ScrapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScrapeError::Transport { url, message } => {
                write!(f, "scraping {url} failed: {message}")
            }
            ScrapeError::Status {
                url,
                status,
                message,
            } => write!(f, "scraping {url} failed with status {status}: {message}"),
            ScrapeError::TooLarge { url, limit } => write!(
                f,
                "scraping {url}: the reply is larger than --limit-bytes ({limit} bytes); narrow --match or raise --limit-bytes"
            ),
            ScrapeError::Decode {
                url,
                content_type,
                message,
            } => write!(
                f,
                "scraping {url}: cannot decode the reply ({content_type}): {message}"
            ),
            ScrapeError::TooMuchMemory {
                url,
                bytes,
                estimate,
                needed,
                budget,
            } => write!(
                f,
                "scraping {url}: the reply ({bytes} bytes: {} series, {} labels) would take {} MiB to decode, over the {} MiB allowed ({DECODED_BYTES_PER_LIMIT_BYTE} × --limit-bytes); narrow --match or raise --limit-bytes",
                estimate.series,
                estimate.labels,
                mib(*needed),
                mib(*budget)
            ),
        }
    }
}

impl std::error::Error for ScrapeError {}

/// The memory a reply may take once decoded, transformed and sorted, per byte of `--limit-bytes`.
/// What Prometheus sends takes 6 to 14 bytes of that per byte on the wire (about 1.5 KB a
/// federated series), so the default 8 MiB admits about 20,000 federated series; a reply built to
/// take more (millions of empty series or labels) is refused before it is decoded. With the reply
/// itself, the upload body and its compressed copy, the client then holds at most about
/// 8 × `--limit-bytes` and a few MiB of its own (`tests/hostile.rs` measures it).
pub const DECODED_BYTES_PER_LIMIT_BYTE: usize = 4;

fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 20))
}

/// The caps a reply is decoded under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyLimits {
    /// `--limit-bytes`: the largest body, and the largest message in it.
    pub limit_bytes: usize,
    /// The memory the decoded families (and the transform) may take.
    pub memory_bytes: usize,
    /// What the transform adds to each series.
    pub transform: Transform,
}

impl ReplyLimits {
    /// The caps for `--limit-bytes`, with `transform` run on the decoded families.
    pub fn new(limit_bytes: usize, transform: Transform) -> ReplyLimits {
        ReplyLimits {
            limit_bytes,
            memory_bytes: limit_bytes.saturating_mul(DECODED_BYTES_PER_LIMIT_BYTE),
            transform,
        }
    }
}

/// Why a reply body was not decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyError {
    /// The body is malformed, or breaks a decoder limit.
    Invalid(String),
    /// Decoding it would take more than [`ReplyLimits::memory_bytes`].
    TooMuchMemory {
        /// What the body holds.
        estimate: Estimate,
        /// The memory it would take.
        needed: usize,
        /// The memory allowed.
        budget: usize,
    },
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Invalid(m) => f.write_str(m),
            ReplyError::TooMuchMemory { needed, budget, .. } => write!(
                f,
                "decoding would take {needed} bytes, over the {budget} allowed"
            ),
        }
    }
}

impl std::error::Error for ReplyError {}

impl From<Refusal> for ReplyError {
    fn from(r: Refusal) -> Self {
        ReplyError::Invalid(r.to_string())
    }
}

impl ReplyLimits {
    /// Refuses a reply whose estimate is over the memory budget.
    fn check(&self, estimate: Estimate) -> Result<(), ReplyError> {
        let needed = estimate.peak_bytes();
        if needed > self.memory_bytes {
            return Err(ReplyError::TooMuchMemory {
                estimate,
                needed,
                budget: self.memory_bytes,
            });
        }
        Ok(())
    }
}

/// What one scrape brought back.
#[derive(Debug)]
pub struct Scraped {
    /// The decoded families.
    pub families: Vec<MetricFamily>,
    /// The format the server answered in.
    pub format: Format,
    /// Size of the reply body, in bytes.
    pub bytes: usize,
}

/// Scrapes one URL with fixed selectors and credentials.
pub struct Scraper {
    agent: ureq::Agent,
    url: String,
    matches: Vec<String>,
    token: Option<String>,
    limits: ReplyLimits,
}

/// `url` with one `match[]` parameter per selector, built fresh (upstream appended them to a shared
/// URL on every cycle, so the query grew without bound).
pub fn build_url(url: &str, matches: &[String]) -> String {
    let mut out = String::with_capacity(url.len() + matches.len() * 32);
    out.push_str(url);
    let mut sep = if url.contains('?') { '&' } else { '?' };
    for m in matches {
        out.push(sep);
        out.push_str("match%5B%5D=");
        out.push_str(&percent_encode(m));
        sep = '&';
    }
    out
}

/// Decodes a scrape body by its Content-Type: protobuf-delimited, or text for `text/plain` and
/// anything unlabelled (as Prometheus does for an unknown type). The body is pre-scanned first
/// ([`prescan`]), and refused without being decoded when its decoded form would not fit `limits`.
pub fn decode_body(
    body: &[u8],
    content_type: &str,
    limits: &ReplyLimits,
) -> Result<(Vec<MetricFamily>, Format), ReplyError> {
    match Format::from_content_type(content_type) {
        Some(Format::ProtoDelimited) => {
            let decoder = delimited::Limits {
                max_total_bytes: limits.limit_bytes,
                max_message_bytes: limits.limit_bytes,
                ..delimited::Limits::default()
            };
            limits.check(prescan::protobuf(body, &decoder, &limits.transform)?)?;
            delimited::decode(body, &decoder)
                .map(|f| (f, Format::ProtoDelimited))
                .map_err(|e| ReplyError::Invalid(e.to_string()))
        }
        _ => {
            let parser = text::Limits::default();
            limits.check(prescan::text(body, parser.max_families, &limits.transform)?)?;
            text::parse(body, &parser)
                .map(|f| (f, Format::Text))
                .map_err(|e| ReplyError::Invalid(e.to_string()))
        }
    }
}

impl Scraper {
    /// A scraper of `url` (already with `/federate` filled in) sending `matches` as `match[]`,
    /// decoding replies under `limits`.
    pub fn new(
        url: &str,
        matches: &[Selector],
        token: Option<String>,
        ca_file: Option<&Path>,
        timeout: Duration,
        limits: ReplyLimits,
    ) -> Result<Scraper, AgentError> {
        Ok(Scraper {
            agent: agent::build(ca_file, timeout, agent::Redirects::Follow, USER_AGENT)?,
            url: url.to_string(),
            matches: matches.iter().map(|s| s.source.clone()).collect(),
            token,
            limits,
        })
    }

    /// The URL scraped, without the `match[]` parameters.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Scrapes once.
    pub fn scrape(&self) -> Result<Scraped, ScrapeError> {
        let url = build_url(&self.url, &self.matches);
        let transport = |e: ureq::Error| ScrapeError::Transport {
            url: self.url.clone(),
            message: e.to_string(),
        };
        let mut request = self.agent.get(&url).header("Accept", ACCEPT_PD_THEN_TEXT);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let mut response = request.call().map_err(transport)?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let read = response
            .body_mut()
            .with_config()
            .limit(self.limits.limit_bytes as u64)
            .read_to_vec();
        let body = match read {
            Ok(b) => b,
            Err(ureq::Error::BodyExceedsLimit(_)) if status == 200 => {
                return Err(ScrapeError::TooLarge {
                    url: self.url.clone(),
                    limit: self.limits.limit_bytes,
                })
            }
            Err(e) if status == 200 => return Err(transport(e)),
            Err(_) => Vec::new(),
        };
        if status != 200 {
            return Err(ScrapeError::Status {
                url: self.url.clone(),
                status,
                message: agent::first_line(&body),
            });
        }
        let (families, format) =
            decode_body(&body, &content_type, &self.limits).map_err(|e| match e {
                ReplyError::Invalid(message) => ScrapeError::Decode {
                    url: self.url.clone(),
                    content_type: content_type.clone(),
                    message,
                },
                ReplyError::TooMuchMemory {
                    estimate,
                    needed,
                    budget,
                } => ScrapeError::TooMuchMemory {
                    url: self.url.clone(),
                    bytes: body.len(),
                    estimate,
                    needed,
                    budget,
                },
            })?;
        Ok(Scraped {
            families,
            format,
            bytes: body.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(limit_bytes: usize) -> ReplyLimits {
        ReplyLimits::new(limit_bytes, Transform::default())
    }

    #[test]
    fn url_is_built_fresh_with_each_match() {
        let m = vec![
            r#"{__name__="up"}"#.to_string(),
            "a{b=~\"c|d\"}".to_string(),
        ];
        let u = build_url("http://p/federate", &m);
        assert_eq!(
            u,
            format!(
                "http://p/federate?match%5B%5D={}&match%5B%5D={}",
                percent_encode(&m[0]),
                percent_encode(&m[1])
            )
        );
        // Building twice gives the same URL: nothing accumulates.
        assert_eq!(build_url("http://p/federate", &m), u);
        assert!(build_url("http://p/x?a=b", &m).starts_with("http://p/x?a=b&match%5B%5D="));
        assert_eq!(build_url("http://p/metrics", &[]), "http://p/metrics");
    }

    #[test]
    fn decodes_text_and_unknown_as_text() {
        let body = b"# TYPE up gauge\nup{job=\"a\"} 1 1000\n";
        let (f, fmt) = decode_body(body, "text/plain; version=0.0.4", &limits(1 << 20)).unwrap();
        assert_eq!(fmt, Format::Text);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].name.as_deref(), Some("up"));
        let (f, _) = decode_body(body, "", &limits(1 << 20)).unwrap();
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn a_reply_too_big_decoded_is_refused_before_decoding() {
        // 64 KiB of `a 1` lines: 16,384 series, about 200 bytes each decoded.
        let text_body = b"a 1\n".repeat(1 << 14);
        let mut pd_body = vec![0x0a, 1, b'm'];
        pd_body.extend(std::iter::repeat_n([0x22, 0], 1 << 15).flatten());
        let mut framed = Vec::new();
        prost::encode_length_delimiter(pd_body.len(), &mut framed).unwrap();
        framed.extend_from_slice(&pd_body);
        for (body, content_type) in [
            (&text_body[..], "text/plain"),
            (&framed[..], telemeter_common::media::PROTO_DELIMITED),
        ] {
            match decode_body(body, content_type, &limits(1 << 17)) {
                Err(ReplyError::TooMuchMemory {
                    estimate,
                    needed,
                    budget,
                }) => {
                    assert_eq!(budget, 4 << 17);
                    assert!(needed > budget);
                    assert!(estimate.series >= 1 << 14, "{estimate:?}");
                }
                other => panic!("{content_type}: {other:?}"),
            }
            // With room for it, the same reply decodes.
            assert!(decode_body(body, content_type, &limits(16 << 20)).is_ok());
        }
        let e = ScrapeError::TooMuchMemory {
            url: "http://p/federate".into(),
            bytes: 65536,
            estimate: Estimate {
                series: 16384,
                ..Estimate::default()
            },
            needed: 7 << 20,
            budget: 4 << 20,
        };
        assert_eq!(
            e.to_string(),
            "scraping http://p/federate: the reply (65536 bytes: 16384 series, 0 labels) would take 7.0 MiB to decode, over the 4.0 MiB allowed (4 × --limit-bytes); narrow --match or raise --limit-bytes"
        );
    }

    #[test]
    fn decodes_protobuf() {
        let fam = MetricFamily {
            name: Some("up".into()),
            r#type: Some(1),
            metric: vec![telemeter_common::model::Metric {
                gauge: Some(telemeter_common::model::Gauge { value: Some(1.0) }),
                timestamp_ms: Some(5),
                ..Default::default()
            }],
            ..Default::default()
        };
        let body = delimited::encode(std::slice::from_ref(&fam));
        let (f, fmt) = decode_body(
            &body,
            telemeter_common::media::PROTO_DELIMITED,
            &limits(1 << 20),
        )
        .unwrap();
        assert_eq!(fmt, Format::ProtoDelimited);
        assert_eq!(f, vec![fam]);
        assert!(decode_body(
            b"\xff\xff",
            telemeter_common::media::PROTO_DELIMITED,
            &limits(1 << 20)
        )
        .is_err());
    }
}
