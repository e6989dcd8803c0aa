//! The load generator and in-process probes behind `make bench` (`tests/bench.sh`).
//!
//! Each subcommand of `telemeter-loadgen` measures one thing and prints one line of `key=value`
//! figures: [`disk`] (the durable-write ceiling of the disk), [`load`] with [`ingest`] (uploads to
//! our server, or the same series to a Pushgateway), [`federate`] (one full scrape), [`decode`]
//! (decode + validate on one thread), [`receive`] (remote write to `/metrics/v1/receive`), [`sink`] (a
//! remote-write receiver that checks and counts, keeping nothing) and
//! [`payload`] (the realistic 500-sample upload they share). [`recovery`] times the store's open
//! after a crash; `telemeter-allocs` counts the server's allocations per upload with [`alloc`].
#![deny(missing_docs)]

pub mod alloc;
pub mod decode;
pub mod disk;
pub mod federate;
pub mod http;
pub mod ingest;
pub mod latency;
pub mod load;
pub mod recovery;
// The payload lives in testkit so the server's federate probe scrapes the same series.
pub use testkit::payload;
pub mod receive;
pub mod report;
pub mod sink;
