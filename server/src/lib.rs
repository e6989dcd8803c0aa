//! telemeter-server: receives pushed metrics, validates and stores them durably, serves `/federate`.
//!
//! One module per job: [`config`] (flags), [`authorize`] (client tokens → upload tokens),
//! [`oidc`] (the access token for the upstream authorization service),
//! [`upload`] (the push pipeline), [`validate`] (checks and stamping), [`ratelimit`], [`route`]
//! (where an upload is stored), [`cluster`] (membership, hash ring, forwarding and handoff between
//! servers), [`store`] (durable files), [`federate`] (serving them), [`remote_write`] (shipping
//! stored uploads to a remote-write receiver), [`metrics`], [`routes`] (the two HTTP applications)
//! and [`server`] (wiring it all up).
#![deny(missing_docs)]

pub mod allocator;
pub mod authorize;
pub mod cluster;
pub mod config;
pub mod federate;
pub mod metrics;
pub mod oidc;
mod prescan;
pub mod ratelimit;
pub mod remote_write;
pub mod route;
pub mod routes;
pub mod server;
pub mod store;
pub mod upload;
pub mod validate;

pub use config::{Config, Flags};
pub use server::{RunningServer, Server, StartError};
