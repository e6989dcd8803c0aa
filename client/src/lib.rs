//! telemeter-client: scrapes an isolated Prometheus, cleans and anonymizes, pushes to telemeter-server.
//!
//! The parts, each with one job: [`config`] (flags), [`scrape`], [`transform`] (the pipeline),
//! [`anonymize`] (the salted hash of label values, upstream's), [`push`] (authorize + upload),
//! [`run`] (the loop and `--once`), [`spool`] (uploads kept through outages), [`metrics`] (the daemon's own endpoints).
#![deny(missing_docs)]

pub mod anonymize;
pub mod config;
pub mod file;
pub mod metrics;
pub mod prescan;
pub mod push;
pub mod run;
pub mod scrape;
pub mod spool;
pub mod transform;

/// How the client names itself to its scrape source and to the server.
pub const USER_AGENT: &str = concat!("telemeter-client/", env!("CARGO_PKG_VERSION"));
