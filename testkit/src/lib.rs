//! What the workspace's tests (and `bench/`) need again and again, written once: temporary
//! directories, free loopback ports, bounded waits, child processes started and stopped with a
//! bound, the mutation fuzz harness, the realistic upload payload, and a thread's CPU time.
//!
//! A dev-dependency only (`publish = false`): test code, so it panics on setup failures (a test
//! that cannot create its temporary directory has nothing to say) and never on what it checks.
#![deny(missing_docs)]

pub mod cpu;
pub mod fuzz;
pub mod payload;
pub mod process;
pub mod wait;

mod dir;
mod net;

pub use dir::TempDir;
pub use net::free_port;
pub use process::{capture_lines, kill, wait_exit, wait_or_kill, wait_output, Guard, Logs, Signal};
pub use wait::{wait_for, wait_until};
