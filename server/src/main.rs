//! `telemeter-server`: flags → config → run until SIGTERM/SIGINT → clean shutdown.

use std::process::ExitCode;

use clap::Parser;
use log::info;
use telemeter_common::{logging, signal};
use telemeter_server::{Flags, Server};

fn main() -> ExitCode {
    // First, before any thread exists, so every thread inherits the blocked signal mask.
    let signals = signal::termination_channel();
    logging::init();
    let flags = Flags::parse();
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
            Ok(libc::SIGHUP) => info!("SIGHUP ignored"),
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
