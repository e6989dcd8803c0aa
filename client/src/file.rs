//! Writing a file so that it appears whole or not at all, readable by its owner only: the token
//! cache and the spool both keep what a crash must not tear, and what other users must not read.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` through `tmp` (in the same directory): written with mode 0600,
/// synced, renamed over `path`, then the directory synced, so the name appears only with the
/// whole content and survives a crash. `tmp` is removed when anything fails.
pub fn write_private(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(tmp, path)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}
