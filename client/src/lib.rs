//! telemeter-client: scrapes an isolated Prometheus, cleans and anonymizes, pushes to telemeter-server.
//!
//! The parts, each with one job: [`config`] (flags), [`scrape`], [`sources`] (several `--from`), [`transform`] (the pipeline),
//! [`anonymize`] (the salted hash of label values, upstream's), [`push`] (authorize + upload),
//! [`run`] (the loop and `--once`), [`spool`] (uploads kept through outages), [`bundle`] (`--to-file`, the air gap), [`metrics`] (the daemon's own endpoints).
#![deny(missing_docs)]

pub mod anonymize;
pub mod bundle;
pub mod config;
pub mod file;
pub mod metrics;
pub mod prescan;
pub mod push;
pub mod run;
pub mod scrape;
pub mod sources;
pub mod spool;
pub mod transform;

/// What this binary was built from (the revision and compiler baked in by `build.rs`).
pub const BUILD: telemeter_common::process::BuildInfo = telemeter_common::process::BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    revision: env!("TELEMETER_REVISION"),
    rustc: env!("TELEMETER_RUSTC"),
};

/// `--version`'s text: the version and the git revision.
pub const VERSION_TEXT: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("TELEMETER_REVISION"),
    ", ",
    env!("TELEMETER_RUSTC"),
    ")"
);

/// How the client names itself to its scrape source and to the server.
pub const USER_AGENT: &str = concat!("telemeter-client/", env!("CARGO_PKG_VERSION"));
