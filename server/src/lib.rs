//! telemeter-server: receives pushed metrics, validates and stores them durably, serves `/federate`.
#![deny(missing_docs)]

pub mod cluster;
pub mod store;
