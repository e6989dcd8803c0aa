//! `telemeter-server`: flags → config → run until SIGTERM/SIGINT → clean shutdown.

use std::process::ExitCode;

use clap::Parser;
use log::info;
use telemeter_common::logging;
use telemeter_common::signal::{self, Signal};
use telemeter_server::config::one_line_error;
use telemeter_server::{Flags, Server};

fn main() -> ExitCode {
    // The import command runs before the signal mask below: Ctrl-C ends it at once, which is safe
    // (each bundle is stored whole or not at all).
    if std::env::args_os().nth(1).is_some_and(|a| a == "import") {
        return telemeter_server::import::main(std::env::args_os().skip(2));
    }
    // First, before any thread exists, so every thread inherits the blocked signal mask.
    let signals = signal::termination_channel();
    telemeter_server::allocator::tune();
    let flags = match Flags::try_parse() {
        Ok(flags) => flags,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("telemeter-server: {}", one_line_error(&e));
            return ExitCode::from(1);
        }
    };
    // After the flags, which may set the level (-v, --log-level); nothing is logged before.
    logging::init_with(flags.log_filter());
    let config = match flags.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("telemeter-server: {e}");
            return ExitCode::from(1);
        }
    };
    raise_open_files_limit();
    let running = match Server::start(config) {
        Ok(running) => running,
        Err(e) => {
            eprintln!("telemeter-server: {e}");
            return ExitCode::from(1);
        }
    };
    loop {
        match signals.recv() {
            // SIGHUP: read the tokens and whitelist files again; a bad file keeps the old ones
            // (the reloader logs why).
            Ok(Signal::Reload) => {
                let _ = running.reload("SIGHUP");
            }
            Ok(signal) => {
                info!("signal {signal}: shutting down");
                break;
            }
            Err(_) => break,
        }
    }
    running.shutdown();
    ExitCode::SUCCESS
}

/// Raises the soft limit on open files to the hard one, as Go's runtime and Prometheus do: a
/// `/federate` scrape holds one open file per cluster served (see `federate`), beside the
/// connections, and the usual soft limit of 1024 would cap a server at fewer clusters than its
/// hard limit allows. A failure is logged and the server runs with the limit it has.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        log::warn!(
            "reading the open files limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: `limit` is a valid rlimit; setrlimit only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        log::warn!(
            "raising the open files limit to {}: {}",
            limit.rlim_max,
            std::io::Error::last_os_error()
        );
    }
}
