//! The spool (`--spool-dir`): pushes that failed for a reason worth retrying, kept on disk as the
//! exact prepared upload (cleaned, anonymized, compressed) until a later run sends them.
//!
//! One file per upload, named `<creation unix ms, 13 digits>-<sequence>.upload`, so the name
//! order is the age order and a run needs no index: an index would be one more file to keep
//! consistent through a crash. Every file is written to a hidden temporary name, synced and then
//! renamed, and the directory synced, so a crash leaves either the whole upload or none of it;
//! leftover temporary files are removed on the next run.
//!
//! Bounds: `--spool-max-bytes` over all files and `--spool-max-age` per file. Over them the
//! oldest are dropped first (the newest carry the values a reader wants most), each drop
//! counted and logged.
//!
//! One process at a time: a run holds an exclusive lock on the directory's `.lock` for as long as
//! it runs. A cron run that outlasts its slot would otherwise meet the next one in the spool,
//! which removed its half-written file as a crash's leftover and sent every kept upload a second
//! time.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The suffix of a spooled upload's file name.
const SUFFIX: &str = ".upload";
/// The prefix of a file being written.
const TMP_PREFIX: &str = ".tmp-";

/// Why the spool could not be used.
#[derive(Debug)]
pub struct SpoolError {
    /// What was being done.
    pub what: String,
    /// The OS error.
    pub error: std::io::Error,
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spool: {}: {}", self.what, self.error)
    }
}

impl std::error::Error for SpoolError {}

fn spool_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SpoolError {
    let what = what.into();
    move |error| SpoolError { what, error }
}

/// One spooled upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its file.
    pub path: PathBuf,
    /// When it was spooled, ms since the Unix epoch (from its name).
    pub created_ms: u64,
    /// Its size.
    pub bytes: u64,
}

/// A spool directory and its bounds.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    max_age: Duration,
    /// The directory's lock file, locked while this process runs (see the module doc).
    _lock: std::sync::Arc<std::fs::File>,
}

/// The name of the lock file in a spool directory.
const LOCK_FILE: &str = ".lock";

/// How long [`Spool::open`] waits for another run to let go of the spool.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// What [`Spool::enforce`] dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Uploads older than `--spool-max-age`.
    pub expired: usize,
    /// Uploads dropped to stay within `--spool-max-bytes`.
    pub over_size: usize,
}

impl Spool {
    /// A spool in `dir` (created, mode 0700, when missing), locked for this process; waits up to
    /// 10 s for another run holding it, then fails saying so.
    pub fn open(dir: &Path, max_bytes: u64, max_age: Duration) -> Result<Spool, SpoolError> {
        Spool::open_waiting(dir, max_bytes, max_age, LOCK_WAIT)
    }

    /// [`Spool::open`], waiting up to `wait` for the lock.
    fn open_waiting(
        dir: &Path,
        max_bytes: u64,
        max_age: Duration,
        wait: Duration,
    ) -> Result<Spool, SpoolError> {
        use fs2::FileExt;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(spool_error(format!("creating {}", dir.display())))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(spool_error(format!("opening {}", lock_path.display())))?;
        let deadline = std::time::Instant::now() + wait;
        while let Err(error) = lock.try_lock_exclusive() {
            if error.kind() != fs2::lock_contended_error().kind() {
                return Err(spool_error(format!("locking {}", lock_path.display()))(
                    error,
                ));
            }
            if std::time::Instant::now() >= deadline {
                return Err(SpoolError {
                    what: format!("locking {}", lock_path.display()),
                    error: std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!(
                            "another telemeter-client uses this spool (a run still going, or a daemon) and held it for {}",
                            telemeter_common::duration::format(wait)
                        ),
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            max_age,
            _lock: std::sync::Arc::new(lock),
        };
        spool.remove_leftovers();
        Ok(spool)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Temporary files of a run that crashed while writing: never complete, so never sent.
    fn remove_leftovers(&self) {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in read.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The spooled uploads, oldest first. Files that are not spooled uploads are left alone.
    pub fn entries(&self) -> Result<Vec<Entry>, SpoolError> {
        let read = std::fs::read_dir(&self.dir)
            .map_err(spool_error(format!("reading {}", self.dir.display())))?;
        let mut entries = Vec::new();
        for entry in read.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(created_ms) = parse_name(&name) else {
                continue;
            };
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            entries.push(Entry {
                path: entry.path(),
                created_ms,
                bytes: meta.len(),
            });
        }
        entries.sort_by(|a, b| a.path.file_name().cmp(&b.path.file_name()));
        Ok(entries)
    }

    /// Keeps `body` (a prepared upload) created at `created`, then enforces the bounds.
    pub fn put(&self, body: &[u8], created: SystemTime) -> Result<Dropped, SpoolError> {
        // Kept, it would push every upload out of the spool over the bound, then itself: the
        // uploads kept stay, and the caller says this one was not.
        if body.len() as u64 > self.max_bytes {
            return Err(SpoolError {
                what: format!(
                    "keeping an upload of {} bytes",
                    body.len()
                ),
                error: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "over --spool-max-bytes ({} bytes) on its own; raise it above --limit-bytes",
                        self.max_bytes
                    ),
                ),
            });
        }
        let created_ms = telemeter_common::time::unix_millis(created);
        // The sequence keeps two uploads of the same millisecond apart and in order.
        let existing = self.entries()?;
        let sequence = existing
            .iter()
            .filter(|e| e.created_ms == created_ms)
            .count();
        let name = format!("{created_ms:013}-{sequence:04}{SUFFIX}");
        write_atomically(&self.dir, &name, body)?;
        log::info!(
            "spooled {} bytes as {}",
            body.len(),
            self.dir.join(&name).display()
        );
        Ok(self.enforce(created))
    }

    /// Reads one spooled upload.
    pub fn read(&self, entry: &Entry) -> Result<Vec<u8>, SpoolError> {
        std::fs::read(&entry.path).map_err(spool_error(format!("reading {}", entry.path.display())))
    }

    /// Removes one spooled upload (sent, or refused for good).
    pub fn remove(&self, entry: &Entry) {
        if let Err(e) = std::fs::remove_file(&entry.path) {
            log::warn!("spool: cannot remove {}: {e}", entry.path.display());
        }
    }

    /// Drops what is older than the maximum age, then the oldest until the total fits the
    /// maximum size; each drop logged.
    pub fn enforce(&self, now: SystemTime) -> Dropped {
        let mut dropped = Dropped::default();
        let entries = match self.entries() {
            Ok(entries) => entries,
            Err(e) => {
                log::warn!("{e}");
                return dropped;
            }
        };
        let now_ms = telemeter_common::time::unix_millis(now);
        let max_age_ms = u64::try_from(self.max_age.as_millis()).unwrap_or(u64::MAX);
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        for entry in &entries {
            let expired = now_ms.saturating_sub(entry.created_ms) > max_age_ms;
            if !expired && total <= self.max_bytes {
                continue;
            }
            log::warn!(
                "spool: dropped {} ({} bytes): {}",
                entry.path.display(),
                entry.bytes,
                if expired {
                    "older than --spool-max-age"
                } else {
                    "over --spool-max-bytes"
                }
            );
            self.remove(entry);
            total = total.saturating_sub(entry.bytes);
            if expired {
                dropped.expired += 1;
            } else {
                dropped.over_size += 1;
            }
        }
        dropped
    }
}

/// The creation time in a spooled upload's file name, or `None` for any other name.
fn parse_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (millis, sequence) = stem.split_once('-')?;
    if millis.len() != 13
        || !millis.bytes().all(|b| b.is_ascii_digit())
        || sequence.is_empty()
        || !sequence.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    millis.parse().ok()
}

/// Writes `bytes` as `dir/name`, readable by the owner only (see [`crate::file::write_private`]);
/// the temporary name starts with `TMP_PREFIX`, which a crashed run leaves and the next removes.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    crate::file::write_private(&path, &tmp, bytes)
        .map_err(spool_error(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// The first byte of each kept upload, oldest first (the tests' uploads are one byte
    /// repeated).
    fn first_bytes(spool: &Spool) -> Vec<u8> {
        spool
            .entries()
            .unwrap()
            .iter()
            .map(|e| spool.read(e).unwrap()[0])
            .collect()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tc-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn uploads_come_back_oldest_first_and_exact() {
        let dir = temp_dir("order");
        let spool = Spool::open(&dir, 1 << 20, Duration::from_secs(3600)).unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        spool.put(b"second", t + Duration::from_secs(1)).unwrap();
        spool.put(b"first", t).unwrap();
        spool
            .put(b"second-bis", t + Duration::from_secs(1))
            .unwrap();
        // Something else in the directory is not an upload.
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        std::fs::write(dir.join(".tmp-0000000000000-0000.upload-1"), b"partial").unwrap();
        let entries = spool.entries().unwrap();
        let bodies: Vec<Vec<u8>> = entries.iter().map(|e| spool.read(e).unwrap()).collect();
        assert_eq!(
            bodies,
            vec![
                b"first".to_vec(),
                b"second".to_vec(),
                b"second-bis".to_vec()
            ]
        );
        // A new run (this one gone) removes a crashed run's temporary file.
        drop(spool);
        Spool::open(&dir, 1 << 20, Duration::from_secs(3600)).unwrap();
        assert!(!dir.join(".tmp-0000000000000-0000.upload-1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bounds_drop_the_oldest_and_count_them() {
        let dir = temp_dir("bounds");
        let spool = Spool::open(&dir, 25, Duration::from_secs(60)).unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(spool.put(&[1; 10], t).unwrap(), Dropped::default());
        assert_eq!(
            spool.put(&[2; 10], t + Duration::from_secs(1)).unwrap(),
            Dropped::default()
        );
        // 30 bytes > 25: the oldest goes.
        assert_eq!(
            spool.put(&[3; 10], t + Duration::from_secs(2)).unwrap(),
            Dropped {
                expired: 0,
                over_size: 1
            }
        );
        let left = first_bytes(&spool);
        assert_eq!(left, vec![2, 3]);
        // 61 s after the second: it expired, the third (60 s old) did not.
        assert_eq!(
            spool.enforce(t + Duration::from_secs(62)),
            Dropped {
                expired: 1,
                over_size: 0
            }
        );
        assert_eq!(spool.entries().unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_upload_over_the_bound_on_its_own_is_refused_and_the_kept_ones_stay() {
        let dir = temp_dir("too-large");
        let spool = Spool::open(&dir, 25, Duration::from_secs(60)).unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        spool.put(&[1; 10], t).unwrap();
        let refused = spool
            .put(&[2; 26], t + Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("over --spool-max-bytes (25 bytes)"),
            "{refused}"
        );
        let left = first_bytes(&spool);
        assert_eq!(left, vec![1]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_process_at_a_time_holds_the_spool() {
        let dir = temp_dir("lock");
        let first = Spool::open(&dir, 25, Duration::from_secs(60)).unwrap();
        // A second open (another run) waits, then says why it cannot have it.
        let second = Spool::open_waiting(&dir, 25, Duration::from_secs(60), Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(
            second.contains("another telemeter-client uses this spool"),
            "{second}"
        );
        // Clones share the lock; once every one is gone, the next run has it.
        let clone = first.clone();
        drop(first);
        assert!(Spool::open_waiting(&dir, 25, Duration::from_secs(60), Duration::ZERO).is_err());
        drop(clone);
        let third = Spool::open_waiting(&dir, 25, Duration::from_secs(60), Duration::ZERO).unwrap();
        assert!(
            third.entries().unwrap().is_empty(),
            "the lock file is not an upload"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_spool_names_are_read() {
        assert_eq!(
            parse_name("1700000000000-0000.upload"),
            Some(1_700_000_000_000)
        );
        assert_eq!(parse_name("170000000000-0000.upload"), None);
        assert_eq!(parse_name("1700000000000-.upload"), None);
        assert_eq!(parse_name("1700000000000-0000.upload.tmp"), None);
        assert_eq!(parse_name("x700000000000-0000.upload"), None);
    }
}
