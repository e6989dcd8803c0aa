//! telemeter-server: receives pushed metrics, validates and stores them durably, serves `/federate`.
//!
//! One module per job: [`config`] (flags), [`authorize`] (client tokens → upload tokens),
//! [`oidc`] (the access token for the upstream authorization service),
//! [`ingest`] (the push pipeline, one file per step: upload, rate limit, gate, decode, validate,
//! placement), [`cluster`] (membership, hash ring, forwarding and handoff between
//! servers), [`store`] (durable files), [`federate`] (serving them), [`remote_write`] (shipping
//! stored uploads to a remote-write receiver), [`metrics`], [`ports`] (the HTTP applications on each listening port)
//! and [`server`] (wiring it all up).
#![deny(missing_docs)]

pub mod allocator;
pub mod authorize;
pub mod buffers;
pub mod cluster;
pub mod config;
pub mod federate;
pub mod import;
pub mod ingest;
pub mod metrics;
pub mod oidc;
pub mod ports;
pub mod receive;
pub mod reload;
pub mod remote_write;
pub mod server;
pub mod status;
pub mod store;

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

// The paths these modules had before they moved under `ingest`, for code written against them.
pub use ingest::{ratelimit, upload, validate};

pub use config::{Config, Flags};
pub use server::{RunningServer, Server, StartError};
