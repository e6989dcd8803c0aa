//! The shared vocabulary of telemeter.
//!
//! Everything both binaries speak lives here: the Prometheus metric model and its two wire formats
//! (protobuf-delimited and text exposition 0.0.4), label rules, series selectors, anonymization,
//! snappy framing, signed upload tokens, the consistent hash ring, Prometheus-style durations, and the
//! small synchronous HTTP front both binaries serve their endpoints with.

#![deny(missing_docs)]
// Every `unsafe` block says why it is sound (`// SAFETY: ...`); clippy runs with -D warnings.
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod agent;
pub mod base64;
pub mod bundle;
pub mod bytes;
pub mod crc32c;
pub mod delimited;
pub mod duration;
pub mod http;
pub mod instrument;
pub mod keys;
pub mod labels;
pub mod logging;
pub mod media;
pub mod model;
pub mod process;
#[cfg(test)]
mod promtool;
pub mod selector;
pub mod signal;
pub mod snappy;
pub mod sync;
pub mod text;
pub mod time;
pub mod tls;
pub mod token;
pub mod wire;
