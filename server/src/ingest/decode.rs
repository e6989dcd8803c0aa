//! Turning an upload's body into families: Content-Encoding and Content-Type, the caps before and
//! after decompression, counts taken from the wire before anything is built (see `wire::count` in common),
//! then the fast wire check ([`Rules::check_wire`]) or a full decode.

use std::collections::BTreeMap;
use std::time::SystemTime;

use telemeter_common::delimited::{self, DecodeError};
use telemeter_common::http::Request;
use telemeter_common::media::{Format, PROTO_DELIMITED};
use telemeter_common::model::MetricFamily;
use telemeter_common::snappy::{self, SnappyError};
use telemeter_common::text;

use crate::ingest::upload::UploadLimits;
use crate::ingest::validate::{Rules, WireCheck};
use telemeter_common::wire::count as prescan;

/// What stamping the token's labels may add to one series of the re-encoded payload.
const STAMP_BYTES_PER_SERIES: usize = 128;

/// A body that could not be decoded: the HTTP status (413 over a cap, 415 for an unknown
/// encoding or type, 400 for a malformed body) and a one-line reason for the client.
#[derive(Debug)]
pub struct Rejection {
    /// The HTTP status.
    pub status: u16,
    /// The reason, one line.
    pub message: String,
}

impl Rejection {
    fn new(status: u16, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            message: message.into(),
        }
    }
}

/// A decoded body.
pub enum Decoded {
    /// Families for the owned path ([`Rules::apply`]).
    Families(Vec<MetricFamily>),
    /// A protobuf-delimited body valid as it is, to store unchanged.
    Unchanged {
        /// The decompressed body.
        body: Vec<u8>,
        /// The body as it arrived when that was snappy framed: the store journals it so, packed
        /// (~8 KB instead of ~51 KB for the benchmark's upload).
        frames: Option<Vec<u8>>,
        /// Its series.
        series: usize,
        /// Its newest sample's timestamp, as the wire check read it (see
        /// [`WireCheck::Unchanged`]): the store need not walk the body again for it.
        newest_sample_ms: i64,
    },
}

/// The length the body decompresses to, from its snappy frames' headers (its own length when
/// it is not compressed); 413 past the cap, before anything is decompressed.
pub fn decompressed_len(request: &Request, limits: &UploadLimits) -> Result<usize, Rejection> {
    let max = limits.max_decompressed_bytes;
    let snappy = request
        .header("Content-Encoding")
        .is_some_and(|e| e.trim().eq_ignore_ascii_case("snappy"));
    if !snappy {
        return Ok(request.body.len());
    }
    snappy::framed_len(&request.body, max).map_err(|e| snappy_rejection(e, max))
}

/// Decompresses and decodes the body by its Content-Encoding and Content-Type. A
/// protobuf-delimited body that is valid and needs no rewrite for a token with
/// `token_labels` at `now` is not decoded at all (see [`Rules::check_wire`]).
pub fn decode(
    request: &Request,
    limits: &UploadLimits,
    rules: &Rules,
    token_labels: &BTreeMap<String, String>,
    now: SystemTime,
    memory: usize,
) -> Result<Decoded, Rejection> {
    let decoded = decode_framed(
        request,
        limits,
        rules,
        token_labels,
        now,
        memory,
        &mut Vec::new(),
    )?;
    Ok(with_frames(decoded, || request.body.clone()))
}

/// [`decode`], decompressing a snappy body into `spare` (a buffer used before: it is only
/// zeroed where it grows, and not allocated again), which the decompressed body then takes
/// (`spare` is left empty); a body that is not snappy leaves `spare` as it was. A snappy body
/// stored unchanged takes `request`'s body as its frames rather than a copy of it (~8 KB an
/// upload): the request's body is left empty then.
pub fn decode_into(
    request: &mut Request,
    limits: &UploadLimits,
    rules: &Rules,
    token_labels: &BTreeMap<String, String>,
    now: SystemTime,
    memory: usize,
    spare: &mut Vec<u8>,
) -> Result<Decoded, Rejection> {
    let decoded = decode_framed(request, limits, rules, token_labels, now, memory, spare)?;
    Ok(with_frames(decoded, || std::mem::take(&mut request.body)))
}

/// A decoded body whose `frames` are still to be filled from the request: `Some(empty)` stands
/// for "the request's body" (see [`decode_framed`]), which `frames` gives.
fn with_frames(decoded: Decoded, frames: impl FnOnce() -> Vec<u8>) -> Decoded {
    match decoded {
        Decoded::Unchanged {
            body,
            frames: Some(_),
            series,
            newest_sample_ms,
        } => Decoded::Unchanged {
            body,
            frames: Some(frames()),
            series,
            newest_sample_ms,
        },
        decoded => decoded,
    }
}

/// [`decode_into`] without its frames: a snappy body stored unchanged is answered with
/// `frames: Some(Vec::new())`, a stand-in for the request's body, which the caller fills in
/// (with the body itself when it may take it, else a copy).
fn decode_framed(
    request: &Request,
    limits: &UploadLimits,
    rules: &Rules,
    token_labels: &BTreeMap<String, String>,
    now: SystemTime,
    memory: usize,
    spare: &mut Vec<u8>,
) -> Result<Decoded, Rejection> {
    if request.body.len() > limits.max_upload_bytes {
        return Err(Rejection::new(
            413,
            format!("body is larger than {} bytes", limits.max_upload_bytes),
        ));
    }
    let format = match request.header("Content-Type").map(str::trim) {
        None | Some("") => Format::ProtoDelimited,
        // What every client of ours and upstream's sends, recognised without the parse's copies.
        Some(PROTO_DELIMITED) => Format::ProtoDelimited,
        Some(content_type) => Format::from_content_type(content_type).ok_or_else(|| {
            Rejection::new(
                415,
                format!("unsupported Content-Type {content_type:?}: send protobuf-delimited MetricFamily or text/plain"),
            )
        })?,
    };
    // Compared without case rather than lowercased: no copy of the header per upload.
    let decompressed: Option<Vec<u8>> = match request.header("Content-Encoding").map(str::trim) {
        None | Some("") => None,
        Some(e) if e.eq_ignore_ascii_case("identity") => None,
        Some(e) if e.eq_ignore_ascii_case("snappy") => {
            snappy::decode_framed_into(&request.body, limits.max_decompressed_bytes, spare)
                .map_err(|e| snappy_rejection(e, limits.max_decompressed_bytes))?;
            Some(std::mem::take(spare))
        }
        Some(other) => {
            let other = other.to_ascii_lowercase();
            return Err(Rejection::new(
                415,
                format!("unsupported Content-Encoding {other:?}: send snappy or identity"),
            ));
        }
    };
    let body: &[u8] = decompressed.as_deref().unwrap_or(&request.body);
    if body.len() > limits.max_decompressed_bytes {
        return Err(Rejection::new(
            413,
            format!(
                "decompressed body is larger than {} bytes",
                limits.max_decompressed_bytes
            ),
        ));
    }
    match format {
        Format::ProtoDelimited => {
            let decode_limits = delimited::Limits {
                max_message_bytes: limits.max_decompressed_bytes,
                max_total_bytes: limits.max_decompressed_bytes,
                max_families: limits.max_series,
                max_series: limits.max_series,
            };
            // What the owned path may spend on structs: the reservation less the body and
            // the payload it re-encodes.
            let budget = |series: usize| {
                memory.saturating_sub(
                    body.len()
                        .saturating_mul(2)
                        .saturating_add(series.saturating_mul(STAMP_BYTES_PER_SERIES)),
                )
            };
            // The fast path counts what the pre-decode scan below counts, so the same caps
            // hold without that scan.
            if let WireCheck::Unchanged {
                series,
                element_bytes,
                newest_sample_ms,
                ..
            } = rules.check_wire(body, &decode_limits, token_labels, now)
            {
                if element_bytes <= budget(series) {
                    // A decompressed body is stored as it is, not copied again; its frames are
                    // what the journal keeps.
                    return Ok(match decompressed {
                        Some(body) => Decoded::Unchanged {
                            body,
                            // The request's body, filled in by the caller (see `decode_framed`).
                            frames: Some(Vec::new()),
                            series,
                            newest_sample_ms,
                        },
                        None => Decoded::Unchanged {
                            body: request.body.clone(),
                            frames: None,
                            series,
                            newest_sample_ms,
                        },
                    });
                }
            }
            // The decoder checks its caps only after building each family, so they are
            // checked here first on counts taken from the wire (see `telemeter_common::wire::count`).
            let counts = prescan::count(body);
            if counts.series > limits.max_series {
                return Err(Rejection::new(
                    413,
                    format!(
                        "invalid protobuf body: more than {} series",
                        limits.max_series
                    ),
                ));
            }
            let budget = budget(counts.series);
            if counts.decode_bytes() > budget {
                return Err(Rejection::new(
                    413,
                    format!(
                        "invalid protobuf body: {} series with {} labels, quantiles and buckets would take more than {budget} bytes to decode",
                        counts.series,
                        counts.labels + counts.quantiles + counts.buckets
                    ),
                ));
            }
            delimited::decode(body, &decode_limits)
                .map(Decoded::Families)
                .map_err(|e| {
                    let status = match e {
                        DecodeError::MessageTooLarge { .. }
                        | DecodeError::TooLarge { .. }
                        | DecodeError::TooManyFamilies { .. }
                        | DecodeError::TooManySeries { .. } => 413,
                        _ => 400,
                    };
                    Rejection::new(status, format!("invalid protobuf body: {e}"))
                })
        }
        Format::Text => {
            let counts = prescan::count_text(body);
            let budget = memory.saturating_sub(
                body.len()
                    .saturating_mul(2)
                    .saturating_add(counts.series.saturating_mul(STAMP_BYTES_PER_SERIES)),
            );
            if counts.decode_bytes() > budget {
                return Err(Rejection::new(
                    413,
                    format!(
                        "invalid text body: up to {} series with {} labels would take more than {budget} bytes to decode",
                        counts.series, counts.labels
                    ),
                ));
            }
            let text_limits = text::Limits {
                max_families: limits.max_series,
                max_series: limits.max_series,
                ..text::Limits::default()
            };
            text::parse(body, &text_limits)
                .map(Decoded::Families)
                .map_err(|e| Rejection::new(400, format!("invalid text body: {e}")))
        }
    }
}

/// The rejection of a snappy body that could not be decompressed within `max` bytes.
fn snappy_rejection(e: SnappyError, max: usize) -> Rejection {
    match e {
        SnappyError::TooLarge { .. } => {
            Rejection::new(413, format!("decompressed body is larger than {max} bytes"))
        }
        SnappyError::Corrupt(_) => Rejection::new(400, format!("invalid snappy body: {e}")),
    }
}
