//! The client's loop: scrape → transform → push, once (`--once`) or every `--interval`, with
//! `Retry-After` honoured on 429 and exponential back-off with jitter after other failures.

use crate::bundle::BundleWriteError;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::prescan;
use crate::push::{Prepared, PushError, Pushed, Pusher};
use crate::scrape::{ReplyLimits, ScrapeError, Scraper};
use crate::sources::{self, Source};
use crate::spool::{Spool, SpoolError};
use crate::transform::{Filtered, Pipeline};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use telemeter_common::agent::AgentError;
use telemeter_common::signal::Signal;

/// Why a client could not be built.
#[derive(Debug)]
pub enum ClientError {
    /// The HTTP agent (a CA file).
    Agent(AgentError),
    /// The spool directory.
    Spool(SpoolError),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Agent(e) => e.fmt(f),
            ClientError::Spool(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<AgentError> for ClientError {
    fn from(e: AgentError) -> ClientError {
        ClientError::Agent(e)
    }
}

/// The first wait after a failure; it doubles with each consecutive failure up to `--interval`.
pub const BACKOFF_START: Duration = Duration::from_secs(5);

/// Why a cycle failed.
#[derive(Debug)]
pub enum CycleError {
    /// The scrape failed.
    Scrape(ScrapeError),
    /// The push failed.
    Push(PushError),
    /// The push failed for a reason worth retrying and the upload is in the spool.
    Spooled(PushError),
    /// The push failed for a reason worth retrying and the spool could not keep it.
    Spool(PushError, SpoolError),
    /// `--to-file`: the bundle could not be written.
    Bundle(BundleWriteError),
}

impl fmt::Display for CycleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CycleError::Scrape(e) => e.fmt(f),
            CycleError::Push(e) => e.fmt(f),
            CycleError::Spooled(e) => write!(f, "{e}; the upload is kept in the spool"),
            CycleError::Spool(e, spool) => write!(f, "{e}; and it could not be spooled: {spool}"),
            CycleError::Bundle(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CycleError {}

/// What one successful cycle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleReport {
    /// Series scraped.
    pub scraped_series: usize,
    /// Series removed by the pipeline.
    pub filtered: Filtered,
    /// What was pushed; `None` when nothing was left to send.
    pub pushed: Option<Pushed>,
    /// Time spent scraping, transforming and pushing.
    pub timings: Timings,
    /// What the spool did this cycle (all zero without `--spool-dir`).
    pub spool: SpoolReport,
    /// `--to-file`: the bundle written instead of a push.
    pub bundle: Option<PathBuf>,
    /// `--from` endpoints that did not answer (pushed as `up 0`).
    pub sources_down: usize,
}

/// What sending the spool did in one cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolReport {
    /// Spooled uploads the server accepted (and removed from the spool).
    pub sent: usize,
    /// Spooled uploads dropped: refused for good, or over the spool's bounds.
    pub dropped: usize,
    /// Uploads left in the spool for a later run.
    pub left: usize,
}

/// Where the time of one cycle went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// The scrape, decoding included.
    pub scrape: Duration,
    /// The transform pipeline.
    pub transform: Duration,
    /// Authorize (when needed), encode, compress and upload.
    pub push: Duration,
}

impl fmt::Display for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "scrape {} ms, transform {} ms, push {} ms",
            self.scrape.as_millis(),
            self.transform.as_millis(),
            self.push.as_millis()
        )
    }
}

impl fmt::Display for CycleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.spool != SpoolReport::default() {
            write!(
                f,
                "spool: sent {}, dropped {}, left {}; ",
                self.spool.sent, self.spool.dropped, self.spool.left
            )?;
        }
        if self.sources_down > 0 {
            write!(f, "{} --from endpoints did not answer; ", self.sources_down)?;
        }
        if let Some(path) = &self.bundle {
            write!(f, "wrote bundle {}: ", path.display())?;
        }
        match self.pushed {
            Some(p) => {
                write!(
                f,
                "{} {} series ({} samples, {} bytes) of {} scraped; {} unselected, {} invalid; {}",
                if self.bundle.is_some() { "holding" } else { "pushed" },
                p.series,
                p.samples,
                p.bytes,
                self.scraped_series,
                self.filtered.unselected,
                self.filtered.invalid,
                self.timings
            )
            }
            None => write!(
                f,
                "nothing to push: {} series scraped, {} unselected, {} invalid",
                self.scraped_series, self.filtered.unselected, self.filtered.invalid
            ),
        }
    }
}

/// A configured client.
pub struct Client {
    id: String,
    interval: Duration,
    /// Every `--from` and its scraper.
    sources: Vec<(Source, Scraper)>,
    pusher: Pusher,
    pipeline: Pipeline,
    metrics: Arc<Metrics>,
    spool: Option<Spool>,
    /// `--to-file` and the client token that keys the bundles' tags.
    to_file: Option<(PathBuf, String)>,
}

fn now_ms() -> i64 {
    telemeter_common::time::now_millis()
}

/// A random number in `[0, 1)`, for jitter.
fn unit_random() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Without randomness, sub-second clock noise still spreads clients apart.
        let nanos = telemeter_common::time::since_epoch(SystemTime::now()).subsec_nanos();
        b = nanos.to_le_bytes();
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// The least wait a `Retry-After` is taken for: a proxy's `Retry-After: 0` would otherwise start
/// the next scrape and push at once, over and over.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long to wait for a `Retry-After` of `after`: at least [`MIN_RETRY_AFTER`], at most the
/// interval, and up to a tenth longer at `random` (in [0, 1)), so the clients a server rate
/// limited at once do not all come back in the same second.
pub fn retry_wait(after: Duration, interval: Duration, random: f64) -> Duration {
    let after = after.max(MIN_RETRY_AFTER);
    after
        .mul_f64(1.0 + 0.1 * random.clamp(0.0, 1.0))
        .min(interval.max(MIN_RETRY_AFTER))
}

/// The wait after `failures` consecutive failures (≥ 1): `BACKOFF_START` doubled per failure,
/// capped at `cap`, then scaled by a jitter factor in `[0.5, 1)` from `random` in `[0, 1)` so that
/// many clients failing together do not retry together.
pub fn backoff(failures: u32, cap: Duration, random: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = BACKOFF_START.saturating_mul(1u32 << exp).min(cap);
    base.mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0))
}

/// Waits up to `wait` for a termination signal; true when one came. SIGHUP is logged and ignored
/// (there is no reload: restart to reconfigure).
pub fn wait_for_termination(signals: &Receiver<Signal>, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match signals.recv_timeout(left) {
            Ok(Signal::Reload) => {
                log::info!("SIGHUP ignored: restart the client to change its configuration");
            }
            Ok(sig) => {
                log::info!("signal {sig} received, stopping");
                return true;
            }
            Err(RecvTimeoutError::Timeout) => return false,
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(left);
                return false;
            }
        }
    }
}

impl Client {
    /// Builds the scraper and the pusher from `config`.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Client, ClientError> {
        let mut sources = Vec::with_capacity(config.sources.len());
        for source in &config.sources {
            // An exporter's series get two labels more, which its reply's estimate must count.
            let mut labels = config.labels.clone();
            if source.exporter {
                labels.push(("job".into(), source.job.clone()));
                labels.push(("instance".into(), source.instance.clone()));
            }
            let transform =
                prescan::Transform::of(&labels, &config.id, config.anonymize_labels.len());
            let scraper = Scraper::new(
                &source.url,
                &config.matches,
                config.from_token.clone(),
                config.from_ca_file.as_deref(),
                config.timeout,
                ReplyLimits::new(config.limit_bytes, transform),
            )?;
            sources.push((source.clone(), scraper));
        }
        let pusher = Pusher::new(
            &config.authorize_url,
            &config.upload_url,
            &config.id,
            &config.to_token,
            config.to_ca_file.as_deref(),
            config.timeout,
            config.limit_bytes,
            config.token_cache.clone(),
        )?;
        let spool = match &config.spool_dir {
            Some(dir) => Some(
                Spool::open(dir, config.spool_max_bytes, config.spool_max_age)
                    .map_err(ClientError::Spool)?,
            ),
            None => None,
        };
        Ok(Client {
            spool,
            to_file: config
                .to_file
                .clone()
                .map(|dir| (dir, config.to_token.clone())),
            id: config.id.clone(),
            interval: config.interval,
            sources,
            pusher,
            pipeline: Pipeline {
                matches: config.matches.clone(),
                labels: config.labels.clone(),
                renames: config.renames.clone(),
                elide_labels: config.elide_labels.clone(),
                anonymize_labels: config.anonymize_labels.clone(),
                anonymize_salt: config.anonymize_salt.clone(),
            },
            metrics,
        })
    }

    /// Sends what is spooled (oldest first), then one scrape, transform and push; a push that
    /// fails for a reason worth retrying is spooled.
    pub fn cycle(&mut self) -> Result<CycleReport, CycleError> {
        let started = Instant::now();
        let spool = self.send_spool(started);
        let scrape_time = now_ms();
        let scraping = Instant::now();
        let mut timings = Timings::default();
        let mut families = Vec::new();
        let mut ups = Vec::new();
        let mut first_error = None;
        let mut sources_down = 0;
        for (source, scraper) in &self.sources {
            let scraped = scraper.scrape();
            self.metrics.scrape(scraped.is_ok());
            match scraped {
                Ok(scraped) => {
                    let mut scraped = scraped.families;
                    source.label(&mut scraped);
                    families.append(&mut scraped);
                    // One source alone gets no `up`: if it fails the run fails, so `up` would
                    // only ever say 1, and a single --from pushes what it did before.
                    if source.exporter && self.sources.len() > 1 {
                        ups.push(source.up(true, scrape_time));
                    }
                }
                Err(e) => {
                    sources_down += 1;
                    if self.sources.len() > 1 {
                        log::warn!(
                            "cluster {}: --from {}: {e}; pushed as up{{job={:?},instance={:?}}} 0",
                            self.id,
                            source.url,
                            source.job,
                            source.instance
                        );
                    }
                    ups.push(source.up(false, scrape_time));
                    first_error.get_or_insert(e);
                }
            }
        }
        timings.scrape = scraping.elapsed();
        if let Some(e) = first_error.filter(|_| sources_down == self.sources.len()) {
            return Err(CycleError::Scrape(e));
        }
        let scraped_series = families.iter().map(|f| f.metric.len()).sum();
        let filtered = self.pipeline.apply(&mut families, scrape_time);
        timings.transform = scraping.elapsed() - timings.scrape;
        self.metrics.filtered(filtered.unselected, filtered.invalid);
        // Nothing selected is a configuration to check, unless a dead endpoint is to be reported.
        if !families.is_empty() || sources_down > 0 {
            // The `up` series go through every step but the selection: a dead endpoint is
            // reported whatever --match names.
            let mut up_families = Vec::new();
            sources::add_up(&mut up_families, ups);
            let all = Pipeline {
                matches: Vec::new(),
                ..self.pipeline.clone()
            };
            all.apply(&mut up_families, scrape_time);
            for family in up_families {
                if family.name.as_deref() == Some(sources::UP) {
                    sources::add_up(&mut families, family.metric);
                } else {
                    families.push(family);
                }
            }
        }
        if families.is_empty() {
            return Ok(CycleReport {
                scraped_series,
                filtered,
                pushed: None,
                timings,
                spool,
                bundle: None,
                sources_down,
            });
        }
        let pushing = Instant::now();
        if let Some((dir, client_token)) = &self.to_file {
            // Offline: the labels /authorize would stamp are not known; the server stamps its
            // partition label when it imports the bundle.
            let prepared = self
                .pusher
                .prepare(&mut families, None)
                .map_err(CycleError::Push)?;
            let pushed = prepared.pushed;
            let path = crate::bundle::write(
                dir,
                &self.id,
                prepared.body,
                SystemTime::now(),
                client_token,
            )
            .map_err(CycleError::Bundle)?;
            timings.push = pushing.elapsed();
            return Ok(CycleReport {
                scraped_series,
                filtered,
                pushed: Some(pushed),
                timings,
                spool,
                bundle: Some(path),
                sources_down,
            });
        }
        let result = match self.pusher.token() {
            Ok(token) => match self.pusher.prepare(&mut families, Some(&token.labels)) {
                Ok(prepared) => self
                    .pusher
                    .send(&prepared, false)
                    .map(|()| prepared.pushed)
                    .map_err(|e| (e, Some(prepared))),
                Err(e) => Err((e, None)),
            },
            Err(e) => Err((e, None)),
        };
        timings.push = pushing.elapsed();
        match result {
            Ok(pushed) => {
                let now = telemeter_common::time::since_epoch(SystemTime::now()).as_secs_f64();
                self.metrics.push_succeeded(pushed.samples, now);
                Ok(CycleReport {
                    scraped_series,
                    filtered,
                    pushed: Some(pushed),
                    timings,
                    spool,
                    bundle: None,
                    sources_down,
                })
            }
            Err((e, prepared)) => {
                let result = match e {
                    PushError::RateLimited { .. } => "rate_limited",
                    _ => "error",
                };
                self.metrics.push_failed(result);
                let Some(store) = self.spool.as_ref().filter(|_| e.is_retryable()) else {
                    return Err(CycleError::Push(e));
                };
                // Without a token (the server was not reached) the labels it would stamp are
                // left to the server, which stamps them on every upload anyway.
                let prepared = match prepared {
                    Some(p) => p,
                    None => match self.pusher.prepare(&mut families, None) {
                        Ok(p) => p,
                        Err(_) => return Err(CycleError::Push(e)),
                    },
                };
                match store.put(&prepared.body, SystemTime::now()) {
                    // Drops over the bounds are logged by the spool itself.
                    Ok(_) => Err(CycleError::Spooled(e)),
                    Err(spool_error) => Err(CycleError::Spool(e, spool_error)),
                }
            }
        }
    }

    /// Sends the spooled uploads oldest first while the run's time budget (half the interval,
    /// leaving the other half to the fresh scrape) lasts; drops an upload whose content the
    /// server refuses for good ([`PushError::refuses_the_body`]), stops at any other failure.
    fn send_spool(&mut self, started: Instant) -> SpoolReport {
        let mut report = SpoolReport::default();
        let Some(spool) = self.spool.clone() else {
            return report;
        };
        let dropped = spool.enforce(SystemTime::now());
        report.dropped += dropped.expired + dropped.over_size;
        let entries = match spool.entries() {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!("cluster {}: {e}", self.id);
                return report;
            }
        };
        let budget = self.interval / 2;
        for (i, entry) in entries.iter().enumerate() {
            if started.elapsed() >= budget {
                log::warn!(
                    "cluster {}: spool: time budget spent, {} uploads left for the next run",
                    self.id,
                    entries.len() - i
                );
                report.left = entries.len() - i;
                break;
            }
            let body = match spool.read(entry) {
                Ok(body) => body,
                Err(e) => {
                    log::warn!("cluster {}: {e}", self.id);
                    report.left += 1;
                    continue;
                }
            };
            let prepared = Prepared {
                pushed: Pushed {
                    series: 0,
                    samples: 0,
                    bytes: body.len(),
                },
                body,
            };
            match self.pusher.send(&prepared, true) {
                Ok(()) => {
                    spool.remove(entry);
                    report.sent += 1;
                }
                // Refused for reasons that are not this upload's (the server unreachable, an
                // `/authorize` refusal, a redirect): the same for every upload left, so they all
                // stay for a later run.
                Err(e) if !e.refuses_the_body() => {
                    log::warn!(
                        "cluster {}: spool: {e}; {} uploads left for the next run",
                        self.id,
                        entries.len() - i
                    );
                    report.left = entries.len() - i;
                    break;
                }
                Err(e) => {
                    log::warn!(
                        "cluster {}: spool: dropped {}: {e}",
                        self.id,
                        entry.path.display()
                    );
                    spool.remove(entry);
                    report.dropped += 1;
                }
            }
        }
        report
    }

    /// Cycles every interval until a termination signal arrives.
    pub fn run(&mut self, signals: &Receiver<Signal>) {
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            let wait = match self.cycle() {
                Ok(report) => {
                    failures = 0;
                    if report.pushed.is_none() {
                        log::warn!("cluster {}: {report}", self.id);
                    } else {
                        log::info!("cluster {}: {report}", self.id);
                    }
                    self.interval.saturating_sub(started.elapsed())
                }
                // Spooled or not, the server said when to come back: sooner, the next cycle's
                // push (and the spool's backfill) would be refused again.
                Err(
                    CycleError::Push(PushError::RateLimited {
                        retry_after: Some(after),
                    })
                    | CycleError::Spooled(PushError::RateLimited {
                        retry_after: Some(after),
                    }),
                ) => {
                    let wait = retry_wait(after, self.interval, unit_random());
                    log::warn!(
                        "cluster {}: upload rate limited, next attempt in {}",
                        self.id,
                        telemeter_common::duration::format(wait)
                    );
                    wait
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures, self.interval, unit_random());
                    log::warn!(
                        "cluster {}: {e}; attempt {failures} failed, next in {:.1}s",
                        self.id,
                        wait.as_secs_f64()
                    );
                    wait
                }
            };
            if wait_for_termination(signals, wait) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let cap = Duration::from_secs(270);
        assert_eq!(backoff(1, cap, 0.0), Duration::from_millis(2500));
        assert_eq!(
            backoff(1, cap, 0.999_999),
            Duration::from_secs(5).mul_f64(0.9999995)
        );
        assert_eq!(backoff(2, cap, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(3, cap, 0.0), Duration::from_secs(10));
        assert_eq!(backoff(30, cap, 0.0), Duration::from_secs(135));
        assert!(backoff(30, cap, 0.99) <= cap);
        assert_eq!(
            backoff(1, Duration::from_secs(1), 0.0),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn a_retry_after_is_waited_with_a_floor_a_jitter_and_the_interval_as_cap() {
        let interval = Duration::from_secs(270);
        assert_eq!(
            retry_wait(Duration::from_secs(10), interval, 0.0),
            Duration::from_secs(10)
        );
        assert_eq!(
            retry_wait(Duration::from_secs(10), interval, 0.5),
            Duration::from_millis(10_500)
        );
        assert_eq!(
            retry_wait(Duration::ZERO, interval, 0.0),
            MIN_RETRY_AFTER,
            "Retry-After: 0 is a second"
        );
        assert_eq!(
            retry_wait(Duration::from_secs(3600), interval, 0.9),
            interval
        );
    }

    #[test]
    fn random_is_in_unit_interval() {
        for _ in 0..100 {
            let r = unit_random();
            assert!((0.0..1.0).contains(&r), "{r}");
        }
    }

    #[test]
    fn termination_wait_ends_on_signal_and_ignores_hup() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(Signal::Reload).unwrap();
        tx.send(Signal::Terminate).unwrap();
        assert!(wait_for_termination(&rx, Duration::from_secs(30)));
        assert!(!wait_for_termination(&rx, Duration::from_millis(10)));
    }
}
