//! telemeter-allocs: the server's heap allocations per durable upload. Starts a telemeter-server
//! in this process (the real one: HTTP front, upload pipeline, store with its journal and
//! fsyncs) behind a counting global allocator, sends it the benchmark's 500-sample uploads from
//! the load generator's senders (whose own allocations are counted apart), and prints one line
//! of `key=value` figures. A counting allocator costs every allocation two atomic additions,
//! which is why it lives in this binary and not in the server.
//!
//!   telemeter-allocs [--senders 64] [--seconds 5]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use telemeter_bench::alloc::{self, CountingAllocator};
use telemeter_bench::http::Target;
use telemeter_bench::ingest::{Tokens, Upload};
use telemeter_bench::load::{self, Plan};
use telemeter_bench::payload;
use telemeter_common::keys::SharedKey;
use telemeter_common::token::TokenSigner;
use telemeter_server::{Flags, Server};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[derive(Parser, Debug)]
#[command(
    name = "telemeter-allocs",
    about = "The server's heap allocations per durable upload, in process."
)]
struct Cli {
    /// Sender threads, each with one keep-alive connection.
    #[arg(long, default_value_t = 64)]
    senders: usize,
    /// Seconds of measured load (after one second of warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // As the server's main does: the glibc arenas and mmap threshold it runs with.
    telemeter_server::allocator::tune();
    match run(&cli) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("telemeter-allocs: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> Result<String, String> {
    let dir = testkit::TempDir::new("allocs");
    let key_hex: String = (0..48)
        .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
        .collect();
    let key_file = dir.file("shared.key", &key_hex);
    let tokens_file = dir.file("tokens.json", r#"[{"token":"t","clusters":["*"]}]"#);
    let storage = dir.path().join("store");
    let args = [
        "telemeter-server",
        "--listen",
        "127.0.0.1:0",
        "--listen-internal",
        "127.0.0.1:0",
        "--storage-path",
        storage.to_str().ok_or("temp dir is not UTF-8")?,
        "--shared-key",
        key_file.to_str().ok_or("temp dir is not UTF-8")?,
        "--tokens-file",
        tokens_file.to_str().ok_or("temp dir is not UTF-8")?,
        "--ratelimit",
        "0s",
        "--ttl",
        "1h",
    ];
    let config = Flags::try_parse_from(args)
        .map_err(|e| e.to_string())?
        .into_config()
        .map_err(|e| e.to_string())?;
    let server = Server::start(config).map_err(|e| e.to_string())?;
    let target =
        Target::parse(&format!("http://{}", server.external_addr())).map_err(|e| e.to_string())?;
    let key = SharedKey::from_file(&key_file).map_err(|e| e.to_string())?;
    let workload = Arc::new(Upload {
        target: target.clone(),
        tokens: Tokens::Signed(TokenSigner::new(&key)),
        ids: None,
    });
    let mut plan = Plan {
        senders: cli.senders.max(1),
        clusters: cli.senders.max(1) * 4,
        duration: Duration::from_secs(1),
        once: false,
        samples_per_request: payload::SAMPLES_PER_UPLOAD,
        expected_status: 200,
        timeout: Duration::from_secs(30),
    };
    // The warm-up: connection threads, the store's files and buffers, first-use caches.
    let warm = load::run(&plan, &target, workload.clone());
    plan.duration = Duration::try_from_secs_f64(cli.seconds.clamp(0.5, 600.0))
        .unwrap_or(Duration::from_secs(5));
    alloc::mark_client_thread();
    let before = alloc::counts();
    let report = load::run(&plan, &target, workload);
    let after = alloc::counts();
    server.shutdown();
    let ok = report_field(&report.to_string(), "ok").unwrap_or(0);
    if ok == 0 {
        return Err(format!("no upload succeeded: {report} (warm-up: {warm})"));
    }
    let per = |n: u64| n as f64 / ok as f64;
    Ok(format!(
        "{report} server_allocations_per_upload={:.1} server_bytes_allocated_per_upload={:.0} client_allocations_per_upload={:.1}",
        per(after.server_allocations - before.server_allocations),
        per(after.server_bytes - before.server_bytes),
        per(after.client_allocations - before.client_allocations),
    ))
}

/// An integer field of a `key=value` report line.
fn report_field(line: &str, key: &str) -> Option<u64> {
    line.split(' ')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}
