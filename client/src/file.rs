//! Writing a file so that it appears whole or not at all, readable by its owner only: the token
//! cache and the spool both keep what a crash must not tear, and what other users must not read.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` through `tmp` (in the same directory): written with mode 0600,
/// synced, renamed over `path`, then the directory synced, so the name appears only with the
/// whole content and survives a crash. `tmp` is removed when anything fails.
///
/// `tmp` is created anew (`O_EXCL`): a file or symbolic link already there (a crash's leftover,
/// or another user's in a shared directory such as `/tmp`, planted to read what is written) is
/// removed first, and where that is refused (another user's, in a sticky directory) the write
/// fails rather than writing a secret into a file someone else can read.
pub fn write_private(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
    };
    let opened = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(tmp)?;
            create()
        }
        opened => opened,
    };
    let result = (|| {
        let mut file = opened?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_or_link_at_the_temporary_name_is_replaced_not_written_through() {
        let dir = std::env::temp_dir().join(format!("tc-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (path, tmp, planted) = (
            dir.join("cache"),
            dir.join(".cache.tmp"),
            dir.join("planted"),
        );
        // A readable file someone linked the temporary name to.
        std::fs::write(&planted, b"").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::os::unix::fs::symlink(&planted, &tmp).unwrap();
        write_private(&path, &tmp, b"secret").unwrap();
        assert_eq!(
            std::fs::read(&planted).unwrap(),
            b"",
            "written through the link"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!tmp.exists());
        // A leftover file at the temporary name: replaced too.
        std::fs::write(&tmp, b"leftover").unwrap();
        write_private(&path, &tmp, b"again").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"again");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
