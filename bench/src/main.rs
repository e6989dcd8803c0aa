//! telemeter-loadgen: flags → one measurement → one line of `key=value` figures on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use telemeter_bench::http::Target;
use telemeter_bench::ingest::{self, Pushgateway, Tokens, Upload};
use telemeter_bench::load::{self, Plan};
use telemeter_bench::{decode, disk, federate, payload, receive, recovery, sink};
use telemeter_common::keys::SharedKey;
use telemeter_common::token::TokenSigner;
use telemeter_common::{delimited, text};

#[derive(Parser, Debug)]
#[command(
    name = "telemeter-loadgen",
    version,
    about = "Load generator and probes for `make bench`: each subcommand prints one line of key=value figures."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PayloadFormat {
    /// Text exposition 0.0.4 with timestamps.
    Text,
    /// Protobuf-delimited, snappy framed: the upload body.
    Upload,
    /// One line of figures about the payload.
    Stats,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the realistic 500-sample upload of one cluster.
    Payload {
        /// The cluster id stamped on every series.
        #[arg(long, default_value = "bench-00000000")]
        cluster: String,
        /// What to print.
        #[arg(long, value_enum, default_value = "stats")]
        format: PayloadFormat,
    },
    /// The durable-write ceiling: temp file + write + fsync + rename + directory fsync per upload.
    Disk {
        /// Directory to write in (same file system as the server's storage).
        #[arg(long)]
        dir: PathBuf,
        /// Writer threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Writes in all.
        #[arg(long, default_value_t = 10_000)]
        uploads: usize,
        /// Stop after this many seconds anyway.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Distinct files, each replaced over and over (default: 4 per thread).
        #[arg(long)]
        clusters: Option<usize>,
    },
    /// Store recovery: the time `Store::open` takes on 10,000 clusters' files plus a full journal
    /// segment left by a crash (built first in a child process that exits without closing).
    Recovery {
        /// An empty directory for the store (same file system as the server's storage).
        #[arg(long)]
        dir: PathBuf,
        /// Clusters, each with its file.
        #[arg(long, default_value_t = 10_000)]
        clusters: usize,
        /// Fill the journal segment with packed uploads (snappy framed, as clients send them)
        /// of this many of the clusters instead (0: plain uploads of all of them).
        #[arg(long, default_value_t = 0)]
        packed: usize,
    },
    /// The first half of `recovery`, in its child process: fill the store, then exit at once.
    #[command(hide = true)]
    RecoveryFill {
        /// The store's directory.
        #[arg(long)]
        dir: PathBuf,
        /// Clusters.
        #[arg(long)]
        clusters: usize,
        /// See `recovery`.
        #[arg(long, default_value_t = 0)]
        packed: usize,
    },
    /// The second half of `recovery` alone, for profiling it: open (and close) a filled store.
    #[command(hide = true)]
    RecoveryOpen {
        /// The store's directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Upload to telemeter-server as clients do (PD, snappy framed, bearer upload token).
    Ingest {
        /// The server's external URL.
        #[arg(long)]
        url: String,
        /// The server's --shared-key file: upload tokens are minted here, no /authorize calls.
        #[arg(long, conflicts_with = "token")]
        shared_key: Option<PathBuf>,
        /// A client token: upload tokens come from /authorize, one per cluster, before the clock.
        #[arg(long, required_unless_present = "shared_key")]
        token: Option<String>,
        /// Sender threads, each with one keep-alive connection.
        #[arg(long, default_value_t = 1)]
        senders: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Distinct cluster ids over all senders (default: 4 per sender).
        #[arg(long)]
        clusters: Option<usize>,
        /// Upload each cluster exactly once, then stop (to load a server).
        #[arg(long)]
        once: bool,
        /// Per-request timeout in seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// The --name of the node at --url: send only cluster ids it does not own on the ring of
        /// --ring, so every upload is forwarded to its owner (ingest through a non-owner).
        #[arg(long, requires = "ring")]
        forwarded_from: Option<String>,
        /// Every member's --name, comma separated (with --forwarded-from).
        #[arg(long, value_delimiter = ',', requires = "forwarded_from")]
        ring: Vec<String>,
    },
    /// Remote write to /metrics/v1/receive as a Prometheus sends it (2,000-sample snappy-block
    /// WriteRequests, base64 JSON bearer of --token and the cluster id).
    Receive {
        /// The server's external URL.
        #[arg(long)]
        url: String,
        /// A client token of the server's tokens file, allowed for every cluster id.
        #[arg(long)]
        token: String,
        /// Sender threads, each with one keep-alive connection.
        #[arg(long, default_value_t = 1)]
        senders: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Distinct cluster ids over all senders (default: 4 per sender).
        #[arg(long)]
        clusters: Option<usize>,
        /// Per-request timeout in seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// PUT the same series as text to a Pushgateway, under /metrics/job/<cluster id>.
    Pushgateway {
        /// The Pushgateway's URL.
        #[arg(long)]
        url: String,
        /// Sender threads.
        #[arg(long, default_value_t = 1)]
        senders: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Distinct cluster ids (groups) over all senders (default: 4 per sender).
        #[arg(long)]
        clusters: Option<usize>,
        /// Push each cluster exactly once, then stop.
        #[arg(long)]
        once: bool,
        /// Per-request timeout in seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// One full GET of /federate, counted as it streams.
    Federate {
        /// The server's internal URL.
        #[arg(long)]
        url: String,
        /// The path to get.
        #[arg(long, default_value = "/federate")]
        path: String,
        /// Seconds the whole response may take between reads.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
        /// Ask for gzip (as Prometheus does) and decompress as it streams.
        #[arg(long)]
        gzip: bool,
    },
    /// A remote-write receiver that checks and counts every request (snappy + WriteRequest) and
    /// keeps nothing, answering 204 (400 to a malformed one); `GET /stats` gives its figures.
    Sink {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Stop after this many seconds anyway.
        #[arg(long, default_value_t = 600.0)]
        max_seconds: f64,
    },
    /// Decode + validate the upload body in process, on one thread.
    Decode {
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::from_secs(3600))
}

fn target(url: &str) -> Result<Target, String> {
    Target::parse(url).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<String, String> {
    match cli.command {
        Command::Payload { cluster, format } => {
            let families = payload::families(&cluster, payload::now_ms());
            let mut out = std::io::stdout().lock();
            let written = match format {
                PayloadFormat::Text => text::encode(&mut out, &families, true),
                PayloadFormat::Upload => {
                    out.write_all(&payload::upload_body(&cluster, payload::now_ms()))
                }
                PayloadFormat::Stats => {
                    let pd = delimited::encode(&families);
                    let series: usize = families.iter().map(|f| f.metric.len()).sum();
                    return Ok(format!(
                        "families={} series={} samples={} pd_bytes={} upload_bytes={} text_bytes={}",
                        families.len(),
                        series,
                        payload::sample_count(&families),
                        pd.len(),
                        payload::upload_body(&cluster, 0).len(),
                        payload::text_body(&cluster).len()
                    ));
                }
            };
            written.map_err(|e| e.to_string())?;
            Ok(String::new())
        }
        Command::Disk {
            dir,
            threads,
            uploads,
            duration,
            clusters,
        } => disk::run(&disk::Plan {
            dir,
            threads,
            uploads,
            duration: seconds(duration),
            clusters: clusters.unwrap_or(threads.max(1) * 4),
        })
        .map(|r| r.to_string())
        .map_err(|e| e.to_string()),
        Command::Recovery {
            dir,
            clusters,
            packed,
        } => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let fill = std::process::Command::new(exe)
                .arg("recovery-fill")
                .arg("--dir")
                .arg(&dir)
                .arg("--clusters")
                .arg(clusters.to_string())
                .arg("--packed")
                .arg(packed.to_string())
                .output()
                .map_err(|e| format!("running the fill: {e}"))?;
            if !fill.status.success() {
                return Err(format!(
                    "the fill failed: {}",
                    String::from_utf8_lossy(&fill.stderr).trim()
                ));
            }
            let filled = String::from_utf8_lossy(&fill.stdout)
                .trim()
                .replace(' ', " fill_");
            let opened = recovery::measure(&dir)?;
            Ok(format!("{opened} fill_{filled}"))
        }
        Command::RecoveryOpen { dir } => recovery::measure(&dir),
        Command::RecoveryFill {
            dir,
            clusters,
            packed,
        } => {
            let (line, store) = recovery::fill(&dir, clusters, packed)?;
            println!("{line}");
            let _ = std::io::stdout().flush();
            // As a crash would: no close, so the last segment is not checkpointed on the way out.
            std::mem::forget(store);
            std::process::exit(0);
        }
        Command::Ingest {
            url,
            shared_key,
            token,
            senders,
            duration,
            clusters,
            once,
            timeout,
            forwarded_from,
            ring,
        } => {
            let target = target(&url)?;
            let clusters = clusters.unwrap_or(senders.max(1) * 4);
            let ids = match forwarded_from {
                Some(node) => Some(ingest::ids_not_owned_by(&node, &ring, clusters)?),
                None => None,
            };
            let tokens = match (shared_key, token) {
                (Some(path), _) => {
                    let key = SharedKey::from_file(&path).map_err(|e| e.to_string())?;
                    Tokens::Signed(TokenSigner::new(&key))
                }
                (None, Some(client_token)) => Tokens::Authorize {
                    target: target.clone(),
                    client_token,
                },
                (None, None) => return Err("give --shared-key or --token".into()),
            };
            let plan = Plan {
                senders,
                clusters,
                duration: seconds(duration),
                once,
                samples_per_request: payload::SAMPLES_PER_UPLOAD,
                expected_status: 200,
                timeout: seconds(timeout),
            };
            Ok(load::run(
                &plan,
                &target,
                Arc::new(Upload {
                    target: target.clone(),
                    tokens,
                    ids,
                }),
            )
            .to_string())
        }
        Command::Receive {
            url,
            token,
            senders,
            duration,
            clusters,
            timeout,
        } => {
            let target = target(&url)?;
            let plan = Plan {
                senders,
                clusters: clusters.unwrap_or(senders.max(1) * 4),
                duration: seconds(duration),
                once: false,
                samples_per_request: receive::SAMPLES_PER_REQUEST,
                expected_status: 200,
                timeout: seconds(timeout),
            };
            Ok(load::run(
                &plan,
                &target,
                Arc::new(receive::Receive {
                    target: target.clone(),
                    client_token: token,
                }),
            )
            .to_string())
        }
        Command::Pushgateway {
            url,
            senders,
            duration,
            clusters,
            once,
            timeout,
        } => {
            let target = target(&url)?;
            let plan = Plan {
                senders,
                clusters: clusters.unwrap_or(senders.max(1) * 4),
                duration: seconds(duration),
                once,
                samples_per_request: payload::SAMPLES_PER_UPLOAD,
                expected_status: 200,
                timeout: seconds(timeout),
            };
            Ok(load::run(
                &plan,
                &target,
                Arc::new(Pushgateway {
                    target: target.clone(),
                }),
            )
            .to_string())
        }
        Command::Federate {
            url,
            path,
            timeout,
            gzip,
        } => federate::run(&target(&url)?, &path, seconds(timeout), gzip)
            .map(|r| r.to_string())
            .map_err(|e| e.to_string()),
        Command::Sink {
            listen,
            max_seconds,
        } => {
            let listener = std::net::TcpListener::bind(&listen)
                .map_err(|e| format!("listening on {listen}: {e}"))?;
            let stats = Arc::new(sink::Stats::default());
            let deadline = std::time::Instant::now() + seconds(max_seconds);
            sink::serve(listener, stats.clone(), deadline).map_err(|e| e.to_string())?;
            Ok(stats.line())
        }
        Command::Decode { seconds: s } => decode::run(seconds(s)).map(|r| r.to_string()),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(line) => {
            if !line.is_empty() {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("telemeter-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
