//! The `telemeter-client` binary: flags → config → one cycle (`--once`) or the daemon loop.

use clap::Parser;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use telemeter_client::config::{Config, Flags};
use telemeter_client::metrics::{Endpoints, Metrics};
use telemeter_client::run::{Client, ClientError};
use telemeter_common::http::{self, Server};

fn main() -> ExitCode {
    let flags = Flags::parse();
    if flags.once {
        // A cron job's stderr should be the one-line reason, not the info log.
        if std::env::var_os("RUST_LOG").is_none() {
            std::env::set_var("RUST_LOG", "warn");
        }
        telemeter_common::logging::init();
        return once(flags);
    }
    // Before any thread starts, so every thread inherits the blocked signal mask.
    let signals = telemeter_common::signal::termination_channel();
    telemeter_common::logging::init();
    let config = match Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => return usage(&e.to_string()),
    };
    let metrics = Arc::new(Metrics::new());
    let mut client = match Client::new(&config, metrics.clone()) {
        Ok(c) => c,
        Err(e) => return not_started(&e),
    };
    let server = match &config.listen {
        None => None,
        Some(addr) => {
            let config = http::Config {
                name: "client".into(),
                max_connections: 64,
                workers: 2,
                ..http::Config::default()
            };
            match Server::bind(addr, config, Arc::new(Endpoints { metrics })) {
                Ok(s) => {
                    log::info!("serving /healthz and /metrics on {}", s.local_addr());
                    Some(s.spawn())
                }
                Err(e) => {
                    eprintln!("telemeter-client: --listen {addr}: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    };
    log::info!(
        "cluster {}: pushing {} to {} every {}",
        config.id,
        config
            .sources
            .iter()
            .map(|s| s.url.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        config.upload_url,
        telemeter_common::duration::format(config.interval)
    );
    client.run(&signals);
    if let Some(server) = server {
        server.shutdown(Duration::from_secs(5));
    }
    log::info!("stopped");
    ExitCode::SUCCESS
}

fn once(flags: Flags) -> ExitCode {
    let config = match Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => return usage(&e.to_string()),
    };
    let mut client = match Client::new(&config, Arc::new(Metrics::new())) {
        Ok(c) => c,
        Err(e) => return not_started(&e),
    };
    match client.cycle() {
        // The summary is printed whatever RUST_LOG says: it is what a timer's journal shows.
        Ok(report) if report.pushed.is_none() => {
            eprintln!("telemeter-client: cluster {}: {report}", config.id);
            // Its own code, so a timer whose --match selects nothing shows as failed.
            ExitCode::from(telemeter_client::config::EXIT_NOTHING_TO_PUSH)
        }
        Ok(report) if report.sources_down > 0 => {
            eprintln!("telemeter-client: cluster {}: {report}", config.id);
            ExitCode::from(telemeter_client::config::EXIT_SOURCES_DOWN)
        }
        Ok(report) => {
            eprintln!("telemeter-client: cluster {}: {report}", config.id);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("telemeter-client: cluster {}: {e}", config.id);
            ExitCode::from(1)
        }
    }
}

/// Exits for a client that could not be set up: 1 when another run holds the spool (worth
/// running again, as a failed push is: a timer retries it), 2 (as for bad flags) otherwise.
fn not_started(e: &ClientError) -> ExitCode {
    match e {
        ClientError::Spool(spool) if spool.error.kind() == std::io::ErrorKind::WouldBlock => {
            eprintln!("telemeter-client: {e}");
            ExitCode::from(1)
        }
        _ => usage(&e.to_string()),
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("telemeter-client: {message}");
    ExitCode::from(2)
}
