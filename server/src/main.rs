//! `telemeter-server`: flags → config → run until SIGTERM/SIGINT → clean shutdown.

use std::process::ExitCode;

use clap::Parser;
use log::info;
use telemeter_common::logging;
use telemeter_common::signal::{self, Signal};
use telemeter_server::{Flags, Server};

fn main() -> ExitCode {
    // First, before any thread exists, so every thread inherits the blocked signal mask.
    let signals = signal::termination_channel();
    telemeter_server::allocator::tune();
    let flags = match Flags::try_parse() {
        Ok(flags) => flags,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's message spans lines (error, usage, hint); keep the promise of one line.
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            eprintln!("telemeter-server: {}", message.join(" "));
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
    let running = match Server::start(config) {
        Ok(running) => running,
        Err(e) => {
            eprintln!("telemeter-server: {e}");
            return ExitCode::from(1);
        }
    };
    loop {
        match signals.recv() {
            // SIGHUP: nothing to reload yet; keep running.
            Ok(Signal::Reload) => info!("SIGHUP ignored"),
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
