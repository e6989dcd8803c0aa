//! `--to-file DIR`: the prepared upload written as an air-gap bundle (see
//! [`telemeter_common::bundle`] for the format and why its tag needs no new secret), to be carried
//! to the connected side and imported there (`telemeter-server import FILE…` or `POST /import`).
//!
//! Names are `<creation unix ms, 13 digits>-<cluster id, made file-safe>.bundle`, so a directory
//! listing sorts by creation time, which is the order to import them in (an older bundle never
//! replaces newer values, so the order only matters for who reads the directory). A file is written
//! under a hidden temporary name, synced and renamed, so whoever copies the directory to removable
//! media never copies half a bundle.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use telemeter_common::bundle::{self, Bundle};

/// The suffix of a bundle file.
pub const SUFFIX: &str = ".bundle";
/// Most characters of the cluster id kept in a file name.
const MAX_NAME_ID: usize = 64;
/// Names tried for one millisecond before giving up (only a clock stuck in place reaches it).
const MAX_SAME_MS: usize = 1000;

/// Why a bundle could not be written.
#[derive(Debug)]
pub struct BundleWriteError {
    /// The file being written, or the directory.
    pub path: PathBuf,
    /// The OS error.
    pub error: std::io::Error,
}

impl fmt::Display for BundleWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "--to-file: writing {}: {}",
            self.path.display(),
            self.error
        )
    }
}

impl std::error::Error for BundleWriteError {}

/// `id` with every character a file name should not hold replaced by `_`, cut to a bounded length.
fn file_safe(id: &str) -> String {
    id.chars()
        .take(MAX_NAME_ID)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Seals `body` (the prepared upload) for `cluster_id` with the key of `client_token`, and writes it
/// into `dir` (created, mode 0700, when missing). Returns the file's path.
pub fn write(
    dir: &Path,
    cluster_id: &str,
    body: Vec<u8>,
    created: SystemTime,
    client_token: &str,
) -> Result<PathBuf, BundleWriteError> {
    use std::os::unix::fs::DirBuilderExt;
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |error| BundleWriteError { path, error }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(error(dir))?;
    let created_ms = telemeter_common::time::unix_millis(created);
    let sealed = Bundle {
        cluster_id: cluster_id.to_string(),
        created_ms,
        body,
    }
    .seal(&bundle::key_of(client_token));
    let stem = format!("{created_ms:013}-{}", file_safe(cluster_id));
    // Two runs within one millisecond (a test, a clock set back) must not overwrite each other.
    let path = (0..MAX_SAME_MS)
        .map(|n| match n {
            0 => dir.join(format!("{stem}{SUFFIX}")),
            n => dir.join(format!("{stem}-{n}{SUFFIX}")),
        })
        .find(|p| !p.exists())
        .ok_or_else(|| BundleWriteError {
            path: dir.join(format!("{stem}{SUFFIX}")),
            error: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "name taken"),
        })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    crate::file::write_private(&path, &tmp, &sealed).map_err(error(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_written_bundle_verifies_with_the_token_and_names_sort_by_time() {
        let dir = std::env::temp_dir().join(format!("bundle-write-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let a = write(&dir, "site/a b", b"body".to_vec(), t, "tok").unwrap();
        let b = write(&dir, "site/a b", b"body2".to_vec(), t, "tok").unwrap();
        let c = write(
            &dir,
            "site/a b",
            b"x".to_vec(),
            t + Duration::from_millis(1),
            "tok",
        )
        .unwrap();
        assert_eq!(
            a.file_name().unwrap().to_str().unwrap(),
            "1700000000000-site_a_b.bundle"
        );
        assert_ne!(a, b);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        assert_eq!(names.last(), Some(&c), "{names:?}");
        let bytes = std::fs::read(&a).unwrap();
        let read = bundle::parse(&bytes, 1 << 20)
            .unwrap()
            .verify([&bundle::key_of("tok")])
            .unwrap();
        assert_eq!(read.cluster_id, "site/a b");
        assert_eq!(read.created_ms, 1_700_000_000_000);
        assert_eq!(read.body, b"body");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
