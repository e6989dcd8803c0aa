//! Importing air-gap bundles (written by `telemeter-client --once --to-file DIR`, format in
//! [`telemeter_common::bundle`]): `telemeter-server import FILE…` against a stopped server's
//! storage directory, or `POST /import` on a running server's external port.
//!
//! Each bundle is verified (format, length, then its tag against the SHA-256 of every token the
//! tokens file allows for the bundle's cluster id: so a token removed from the file, or one of
//! another cluster, verifies nothing), validated exactly as `/upload` validates (the same decoder
//! and [`Rules`], with the partition label stamped to the bundle's cluster id), and stored as a
//! late upload through [`store_push`] (or the server's placement, which ends there): it
//! never replaces newer values on `/federate`, and `--remote-write-url` gets its samples with
//! their original timestamps. A bundle refused for any reason stores nothing; the other bundles
//! of the same command are imported all the same.
//!
//! Why `POST /import` needs no bearer token: the tag is the authentication. It can only be made
//! with a client token the tokens file allows for that cluster id, which is exactly what
//! `/authorize` checks before handing out an upload token, and it covers the cluster id, the
//! creation time and every byte of the upload. What a peer without a token can make the server do
//! is read one body (capped by [`ImportHandler::body_limit`] and the front's per-peer caps) and
//! compute one HMAC per token allowed for the cluster it names, never decode anything. Replaying
//! a captured bundle only stores the same samples again (no newer values are replaced) and is
//! bounded by the cluster's backfill budget ([`crate::ingest::backfill`]), which every verified
//! bundle is charged before it is decoded.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use log::info;
use telemeter_common::bundle::{self, Bundle, BundleError};
use telemeter_common::delimited;
use telemeter_common::http::{Request, Response};
use telemeter_common::sync::Swap;

use crate::authorize::{check_cluster_id, ClientAuthorizer, TokensFile};
use crate::config::{Config, Flags, TokenSource};
use crate::ingest::backfill::{BackfillBudget, BACKFILLS_PER_WINDOW};
use crate::ingest::decode::{self, Decoded};
use crate::ingest::placement::{store_push, Placement, PlacementError};
use crate::ingest::ratelimit::retry_after_secs;
use crate::ingest::upload::UploadLimits;
use crate::ingest::validate::Rules;
use crate::receive::merge::{MergeError, Merger};
use crate::store::{Store, StoreConfig, StoreError};

/// Memory the decoder may plan for per decompressed byte, as `/upload` reserves it.
const DECODE_BYTES_PER_BODY_BYTE: usize = 24;
/// Memory the decoder may plan for besides, as `/upload` reserves it.
const DECODE_BYTES_PER_UPLOAD: usize = 64 << 10;

/// Exit status of `import` when some bundle was refused (the others were imported).
pub const EXIT_REFUSED: u8 = 1;
/// Exit status of `import` when nothing could be tried: bad flags, no tokens file, the store.
pub const EXIT_USAGE: u8 = 2;

/// Why a bundle was not imported.
#[derive(Debug)]
pub enum ImportError {
    /// The file could not be read.
    Read(std::io::Error),
    /// Not a well-formed bundle, or its tag does not verify.
    Bundle(BundleError),
    /// The bundle names a cluster id the server does not take.
    ClusterId(String),
    /// The server's tokens do not come from a tokens file, so no tag can be verified.
    NoTokensFile,
    /// The upload inside does not pass what `/upload` checks.
    Invalid {
        /// The status `/upload` would answer.
        status: u16,
        /// Why, one line.
        message: String,
    },
    /// The cluster's backfill budget is spent for now.
    Backfill(Duration),
    /// The store could not take it.
    Store(String),
}

impl ImportError {
    /// The HTTP status of `POST /import`: 400 malformed, 413 too large, 403 not authenticated
    /// (tampered, truncated past its tag, foreign or revoked token), as `/upload` for the upload
    /// inside, 429 over the backfill budget, 503 not stored.
    pub fn status(&self) -> u16 {
        match self {
            ImportError::Read(_) => 400,
            ImportError::Bundle(BundleError::Tag) => 403,
            ImportError::Bundle(BundleError::TooLarge { .. }) => 413,
            ImportError::Bundle(_) => 400,
            ImportError::ClusterId(_) => 400,
            ImportError::NoTokensFile => 403,
            ImportError::Invalid { status, .. } => *status,
            ImportError::Backfill(_) => 429,
            ImportError::Store(_) => 503,
        }
    }
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportError::Read(e) => write!(f, "cannot read it: {e}"),
            ImportError::Bundle(e) => e.fmt(f),
            ImportError::ClusterId(reason) => {
                write!(f, "the bundle's cluster id is not valid: {reason}")
            }
            ImportError::NoTokensFile => f.write_str(
                "bundles are verified with the tokens file, and this server takes its tokens from elsewhere (--tokens-file is needed)",
            ),
            ImportError::Invalid { message, .. } => write!(f, "its upload is refused: {message}"),
            ImportError::Backfill(wait) => write!(
                f,
                "rate limited: {BACKFILLS_PER_WINDOW} late uploads of this cluster within the window; next one read in {}s",
                retry_after_secs(*wait)
            ),
            ImportError::Store(e) => write!(f, "not stored: {e}"),
        }
    }
}

impl std::error::Error for ImportError {}

/// A verified and validated bundle, ready to store.
#[derive(Debug)]
pub struct Imported {
    /// Its cluster.
    pub cluster_id: String,
    /// When the client made it (not later than now).
    pub created: SystemTime,
    /// The families to store, protobuf-delimited; `None` when the whitelist left nothing.
    pub payload: Option<Vec<u8>>,
    /// Series kept.
    pub series: usize,
}

/// Verifies and validates bundles, as `/upload` validates uploads.
pub struct Importer {
    limits: UploadLimits,
    rules: Rules,
    partition_label: String,
    /// `--required-label`: what an upload token of this server carries besides the partition
    /// label, so an import is held to them as an upload is.
    required_labels: Vec<(String, String)>,
}

impl Importer {
    /// An importer enforcing `limits` and `rules` (those of `/upload`).
    pub fn new(limits: UploadLimits, rules: Rules, partition_label: &str) -> Importer {
        Importer {
            limits,
            rules,
            partition_label: partition_label.to_string(),
            required_labels: Vec::new(),
        }
    }

    /// This importer, holding every series to `required_labels` (`--required-label`) as an
    /// upload with a token of this server is: set when absent, refused (403) with another value.
    pub fn with_required_labels(mut self, required_labels: Vec<(String, String)>) -> Importer {
        self.required_labels = required_labels;
        self
    }

    /// The importer of a server started with `config`, whitelist as `whitelist` has it now.
    pub fn from_config(
        config: &Config,
        whitelist: Swap<Vec<telemeter_common::selector::Selector>>,
    ) -> Importer {
        Importer::new(
            crate::server::upload_limits(config),
            crate::server::upload_rules(config, whitelist),
            &config.partition_label,
        )
        .with_required_labels(config.required_labels.clone())
    }

    /// The largest bundle file: its upload at most `--max-upload-bytes`, as `/upload` takes it.
    pub fn max_file_bytes(&self) -> usize {
        bundle::max_file_bytes(self.limits.max_upload_bytes)
    }

    /// The bundle in `bytes`, if it is well formed and one of the keys `keys` gives for its
    /// cluster id (the hashes of the tokens allowed for it) made its tag.
    pub fn verify(
        &self,
        bytes: &[u8],
        keys: impl FnOnce(&str) -> Option<Vec<[u8; 32]>>,
    ) -> Result<Bundle, ImportError> {
        let unverified =
            bundle::parse(bytes, self.limits.max_upload_bytes).map_err(ImportError::Bundle)?;
        check_cluster_id(&unverified.bundle.cluster_id).map_err(ImportError::ClusterId)?;
        let keys = keys(&unverified.bundle.cluster_id).ok_or(ImportError::NoTokensFile)?;
        unverified.verify(&keys).map_err(ImportError::Bundle)
    }

    /// Decodes and validates a verified bundle's upload at `now` as `/upload` does for a token of
    /// its cluster, and stamps the partition label (and the required labels).
    pub fn validate(&self, bundle: Bundle, now: SystemTime) -> Result<Imported, ImportError> {
        let cluster_id = bundle.cluster_id;
        let created = (UNIX_EPOCH + Duration::from_millis(bundle.created_ms)).min(now);
        // The upload is what the client would have sent to /upload: snappy-framed protobuf.
        let request = Request {
            method: "POST".into(),
            path: "/upload".into(),
            query: String::new(),
            headers: [("Content-Encoding", "snappy")].into_iter().collect(),
            body: bundle.body,
            remote: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            admitted: None,
        };
        let invalid = |status, message| ImportError::Invalid { status, message };
        // What an upload token of this server for the cluster carries.
        let mut token_labels: BTreeMap<String, String> =
            self.required_labels.iter().cloned().collect();
        token_labels.insert(self.partition_label.clone(), cluster_id.clone());
        let decompressed = decode::decompressed_len(&request, &self.limits)
            .map_err(|r| invalid(r.status, r.message))?;
        let memory = decompressed
            .saturating_mul(DECODE_BYTES_PER_BODY_BYTE)
            .saturating_add(DECODE_BYTES_PER_UPLOAD);
        let (payload, series) = match decode::decode(
            &request,
            &self.limits,
            &self.rules,
            &token_labels,
            now,
            memory,
        )
        .map_err(|r| invalid(r.status, r.message))?
        {
            Decoded::Unchanged { body, series, .. } => (Some(body), series),
            Decoded::Families(families) => {
                let validated = self
                    .rules
                    .apply(families, &token_labels, now)
                    .map_err(|e| invalid(e.status(), e.to_string()))?;
                let payload = (!validated.families.is_empty())
                    .then(|| delimited::encode(&validated.families));
                (payload, validated.series)
            }
        };
        Ok(Imported {
            cluster_id,
            created,
            payload,
            series,
        })
    }
}

/// `POST /import` on the external port: one bundle per request, as the body.
pub struct ImportHandler {
    importer: Importer,
    authorizer: Arc<dyn ClientAuthorizer>,
    placement: Arc<dyn Placement>,
    backfill: BackfillBudget,
    /// One import is decoded at a time: imports are an operator's occasional act, and this keeps
    /// what they hold to one upload's worth however many arrive at once.
    one_at_a_time: Mutex<()>,
}

impl ImportHandler {
    /// A handler verifying with the tokens `authorizer` holds now (reloads included), storing
    /// through `placement`, with a backfill budget per `window` (`--ratelimit`).
    pub fn new(
        importer: Importer,
        authorizer: Arc<dyn ClientAuthorizer>,
        placement: Arc<dyn Placement>,
        window: Duration,
    ) -> ImportHandler {
        ImportHandler {
            importer,
            authorizer,
            placement,
            backfill: BackfillBudget::new(window),
            one_at_a_time: Mutex::new(()),
        }
    }

    /// The body cap: the largest bundle of an upload `/upload` would take.
    pub fn body_limit(&self) -> usize {
        self.importer.max_file_bytes()
    }

    /// Answers one `/import` request: 200 and one line saying what was imported, or the
    /// refusal's status and one-line reason.
    pub fn handle(&self, request: &Request) -> Response {
        if request.method != "POST" {
            return Response::text(405, "only POST is allowed").with_header("Allow", "POST");
        }
        let _one = telemeter_common::sync::lock(&self.one_at_a_time);
        match self.import(request) {
            Ok(line) => {
                info!("import from {}: {line}", request.remote);
                Response::text(200, &line)
            }
            Err(e) => {
                info!("import from {} refused: {e}", request.remote);
                let response = Response::text(e.status(), &format!("bundle refused: {e}"));
                match &e {
                    ImportError::Backfill(wait) => {
                        response.with_header("Retry-After", &retry_after_secs(*wait).to_string())
                    }
                    _ => response,
                }
            }
        }
    }

    fn import(&self, request: &Request) -> Result<String, ImportError> {
        let bundle = self
            .importer
            .verify(&request.body, |id| self.authorizer.bundle_keys(id))?;
        // Charged once the bundle is known to come from a token of the cluster (so nobody else
        // can spend it) and before it is decoded (so every read of a token holder is paid for).
        self.backfill
            .take(&bundle.cluster_id, Instant::now())
            .map_err(ImportError::Backfill)?;
        let imported = self.importer.validate(bundle, SystemTime::now())?;
        let Some(payload) = imported.payload else {
            return Ok(format!(
                "cluster {:?}: nothing left after the whitelist, nothing stored",
                imported.cluster_id
            ));
        };
        self.placement
            .place(&imported.cluster_id, payload, imported.created)
            .map_err(|e| match e {
                // Its content: merged into the cluster's remote-write series, over the cap.
                PlacementError::Refused { status, reason } => ImportError::Invalid {
                    status,
                    message: reason,
                },
                e => {
                    log::warn!(
                        "import of cluster {:?} not stored: {e}",
                        imported.cluster_id
                    );
                    // Storage paths and OS errors stay in the log.
                    ImportError::Store("retry later".into())
                }
            })?;
        Ok(format!(
            "imported {} series of cluster {:?}",
            imported.series, imported.cluster_id
        ))
    }
}

/// What `telemeter-server import --help` adds after the flags.
pub const IMPORT_AFTER_HELP: &str = "\
Imports air-gap bundles written by `telemeter-client --once --to-file DIR` into the storage
directory of a STOPPED server (the store's lock refuses to share it with a running one: POST the
bundles to its /import instead). Give the server's own flags: --storage-path, --tokens-file (the
bundles' tags are verified against the tokens it allows for each bundle's cluster id), and
--remote-write-url, --whitelist, --label, limits as the server runs with them.

Each bundle is verified and validated as /upload validates a push, then stored as a late upload:
it never replaces newer values on /federate, and --remote-write-url gets its samples with their
original timestamps (they join the durable egress backlog, which the server ships once it runs).
A refused bundle (tampered, truncated, a token not in the tokens file or not allowed for its
cluster, samples older than --max-sample-age) stores nothing and is named with its reason; the
other files are still imported.

Exit status: 0 every bundle imported, 1 some refused (each named on standard error), 2 nothing
tried (bad flags, no tokens file, the storage directory in use).";

/// The flags of `telemeter-server import`.
#[derive(Parser, Debug)]
#[command(
    name = "telemeter-server import",
    about = "Imports air-gap bundles into a stopped server's storage directory.",
    after_help = IMPORT_AFTER_HELP
)]
pub struct ImportFlags {
    /// The server's flags.
    #[command(flatten)]
    pub server: Flags,
    /// Bundle files, imported in the order given.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// Reads one bundle file, never more than `max` bytes of it.
fn read_bundle(path: &Path, max: usize) -> Result<Vec<u8>, ImportError> {
    let file = std::fs::File::open(path).map_err(ImportError::Read)?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(ImportError::Read)?;
    // Over the cap: parse reports the size against the limit without the rest being read.
    Ok(bytes)
}

/// `telemeter-server import …`: `args` are the arguments after `import`.
pub fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    let usage = |message: &dyn fmt::Display| {
        eprintln!("telemeter-server import: {message}");
        ExitCode::from(EXIT_USAGE)
    };
    let flags = match ImportFlags::try_parse_from(
        std::iter::once(OsString::from("telemeter-server import")).chain(args),
    ) {
        Ok(flags) => flags,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            return usage(&crate::config::one_line_error(&e));
        }
    };
    // The per-file lines are the output; the store's own info lines would bury them.
    let filter = flags.server.log_filter().map(str::to_string).or_else(|| {
        std::env::var_os("RUST_LOG")
            .is_none()
            .then(|| "warn".to_string())
    });
    telemeter_common::logging::init_with(filter.as_deref());
    let files = flags.files;
    let config = match flags.server.into_config() {
        Ok(config) => config,
        Err(e) => return usage(&e),
    };
    let tokens = match &config.token_source {
        TokenSource::File(path) => match TokensFile::load(path) {
            Ok(tokens) => tokens,
            Err(e) => return usage(&format_args!("--tokens-file {}: {e}", path.display())),
        },
        _ => return usage(&ImportError::NoTokensFile),
    };
    let importer = Importer::from_config(&config, Swap::new(Arc::new(config.whitelist.clone())));
    let store_config = StoreConfig {
        dir: config.storage_path.clone(),
        ttl: config.ttl,
        max_batch: 1,
    };
    // With --remote-write-url the imports are journaled to be shipped: the server ships them
    // from its durable backlog once it runs, so the command never waits for the receiver.
    let opened = if config.remote_write.is_some() {
        Store::open_shipping(store_config)
    } else {
        Store::open(store_config)
    };
    let store = match opened {
        Ok(store) => store,
        Err(StoreError::Locked { dir }) => {
            return usage(&format_args!(
                "{} is in use by a running telemeter-server (it holds the lock): stop it first, or POST each bundle to its /import",
                dir.display()
            ))
        }
        Err(e) => return usage(&format_args!("--storage-path: {e}")),
    };
    // This process's own merge of the store (the server is not running: the lock says so).
    let merger = Merger::new(store.clone()).with_max_series(config.max_series);
    let mut refused = 0;
    for path in &files {
        let result = read_bundle(path, importer.max_file_bytes()).and_then(|bytes| {
            let bundle = importer.verify(&bytes, |id| Some(tokens.hashes_for(id)))?;
            let imported = importer.validate(bundle, SystemTime::now())?;
            if let Some(payload) = &imported.payload {
                store_push(
                    &merger,
                    &imported.cluster_id,
                    payload.clone(),
                    imported.created,
                )
                .map_err(|e| match e {
                    MergeError::Store(e) => ImportError::Store(e.to_string()),
                    refused @ MergeError::TooManySeries { .. } => ImportError::Invalid {
                        status: 413,
                        message: refused.to_string(),
                    },
                })?;
            }
            Ok(imported)
        });
        match result {
            Ok(imported) => eprintln!(
                "telemeter-server import: {}: imported {} series of cluster {:?}{}",
                path.display(),
                imported.series,
                imported.cluster_id,
                if imported.payload.is_none() {
                    " (nothing left after the whitelist)"
                } else {
                    ""
                }
            ),
            Err(e) => {
                refused += 1;
                eprintln!(
                    "telemeter-server import: {}: refused, nothing stored: {e}",
                    path.display()
                );
            }
        }
    }
    store.close();
    if refused > 0 {
        let rest = if refused == files.len() {
            String::new()
        } else {
            "; the others are imported".to_string()
        };
        eprintln!(
            "telemeter-server import: {refused} of {} bundles refused{rest}",
            files.len()
        );
        ExitCode::from(EXIT_REFUSED)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemeter_common::model::MetricFamily;

    fn importer() -> Importer {
        Importer::new(
            UploadLimits {
                max_upload_bytes: 1 << 20,
                max_decompressed_bytes: 4 << 20,
                max_series: 1000,
            },
            Rules {
                partition_label: "_id".into(),
                extra_labels: Vec::new(),
                whitelist: Swap::new(Arc::new(Vec::new())),
                max_sample_age: Duration::from_secs(3600),
                max_future_skew: Duration::from_secs(300),
                max_samples: 10_000,
            },
            "_id",
        )
    }

    fn sealed(cluster: &str, token: &str, ts: i64) -> Vec<u8> {
        let mut family = MetricFamily {
            name: Some("edge_value".into()),
            r#type: Some(1),
            ..MetricFamily::default()
        };
        let mut metric = telemeter_common::model::Metric {
            timestamp_ms: Some(ts),
            gauge: Some(telemeter_common::model::Gauge { value: Some(7.0) }),
            ..Default::default()
        };
        metric.set_label("instance", "a:1");
        family.metric.push(metric);
        Bundle {
            cluster_id: cluster.into(),
            created_ms: ts as u64,
            body: telemeter_common::snappy::encode_framed(&delimited::encode(&[family])),
        }
        .seal(&bundle::key_of(token))
    }

    #[test]
    fn a_bundle_verifies_only_with_a_token_of_its_cluster_and_is_stamped() {
        let tokens = TokensFile::parse("good site-a\nother site-b\n").unwrap();
        let now = SystemTime::now();
        let ts = telemeter_common::time::unix_millis(now) as i64;
        let importer = importer();
        let bytes = sealed("site-a", "good", ts);
        let bundle = importer
            .verify(&bytes, |id| Some(tokens.hashes_for(id)))
            .unwrap();
        let imported = importer.validate(bundle, now).unwrap();
        assert_eq!(imported.cluster_id, "site-a");
        assert_eq!(imported.series, 1);
        let families =
            delimited::decode(&imported.payload.unwrap(), &delimited::Limits::default()).unwrap();
        assert_eq!(families[0].metric[0].label_value("_id"), Some("site-a"));

        // A token of another cluster, a token not in the file, a flipped byte.
        for bytes in [
            sealed("site-a", "other", ts),
            sealed("site-a", "revoked", ts),
            {
                let mut b = sealed("site-a", "good", ts);
                let i = b.len() / 2;
                b[i] ^= 0x40;
                b
            },
        ] {
            let e = importer
                .verify(&bytes, |id| Some(tokens.hashes_for(id)))
                .unwrap_err();
            assert_eq!(e.status(), 403, "{e}");
        }
        let truncated = &bytes[..bytes.len() - 1];
        let e = importer
            .verify(truncated, |id| Some(tokens.hashes_for(id)))
            .unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = importer.verify(&bytes, |_| None).unwrap_err();
        assert_eq!(e.status(), 403);
        assert!(e.to_string().contains("--tokens-file"), "{e}");
    }

    #[test]
    fn a_bundle_is_held_to_the_required_labels_as_an_upload_is() {
        let tokens = TokensFile::parse("good site-a\n").unwrap();
        let now = SystemTime::now();
        let ts = telemeter_common::time::unix_millis(now) as i64;
        let keys = |id: &str| Some(tokens.hashes_for(id));
        // Set when the series has none.
        let acme =
            importer().with_required_labels(vec![("tenant".to_string(), "acme".to_string())]);
        let bundle = acme.verify(&sealed("site-a", "good", ts), keys).unwrap();
        let imported = acme.validate(bundle, now).unwrap();
        let families =
            delimited::decode(&imported.payload.unwrap(), &delimited::Limits::default()).unwrap();
        assert_eq!(families[0].metric[0].label_value("tenant"), Some("acme"));
        // Refused with another value (the bundle's series has instance="a:1").
        let other =
            importer().with_required_labels(vec![("instance".to_string(), "b:2".to_string())]);
        let bundle = other.verify(&sealed("site-a", "good", ts), keys).unwrap();
        let e = other.validate(bundle, now).unwrap_err();
        assert_eq!(e.status(), 403, "{e}");
    }

    #[test]
    fn a_bundle_older_than_the_sample_age_is_refused_as_upload_would() {
        let tokens = TokensFile::parse("good site-a\n").unwrap();
        let now = SystemTime::now();
        let old = telemeter_common::time::unix_millis(now) as i64 - 2 * 3600 * 1000;
        let importer = importer();
        let bundle = importer
            .verify(&sealed("site-a", "good", old), |id| {
                Some(tokens.hashes_for(id))
            })
            .unwrap();
        let e = importer.validate(bundle, now).unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
    }
}
