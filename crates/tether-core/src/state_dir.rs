//! The state dir holds what must not leak to other local users: full session ids (which
//! are bearer credentials for anonymous sessions) and stored events in `tether.db`, the
//! admin token, the key that seals `requestState`. So the dir is 0700 and the gateway's
//! files in it 0600: set when they are created, and corrected at start (with a WARN) when
//! an older version or a hand left them open (issue 26: the dir was 0755 and `tether.db`
//! 0644, so any local user could take an anonymous session and the admin API's id
//! redaction was moot).
//!
//! The process umask is left alone: stdio upstreams inherit it, and the files they write
//! are theirs to decide.
//!
//! Must not: touch files that are not the gateway's own.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The gateway's files in the state dir.
pub const FILES: &[&str] = &[
    "tether.db",
    "tether.db-wal",
    "tether.db-shm",
    "tether.lock",
    "admin.token",
    "bridge.key",
];

/// Mode of the state dir.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file of the gateway's in it.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (0700) if missing, else makes it and the gateway's files in it private,
/// logging a WARN for each mode it had to correct.
pub fn prepare(dir: &Path) -> std::io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    restrict(dir, DIR_MODE);
    for name in FILES {
        restrict(&dir.join(name), FILE_MODE);
    }
    Ok(())
}

/// Sets `path`'s mode to `mode` when it allows more (group or other bits), saying so.
fn restrict(path: &Path, mode: u32) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.file_type().is_symlink() {
        return;
    }
    let had = meta.permissions().mode() & 0o777;
    if had & 0o077 == 0 {
        return;
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            was = format!("{had:o}"),
            now = format!("{mode:o}"),
            "state dir entry was readable by other users; made private (it holds session ids and secrets)"
        ),
        Err(e) => tracing::warn!(
            path = %path.display(),
            was = format!("{had:o}"),
            error = %e,
            "state dir entry is readable by other users and cannot be made private"
        ),
    }
}

/// Creates `path` empty with mode 0600 if it does not exist (a file SQLite then opens, and
/// whose mode it gives its `-wal` and `-shm` files).
pub fn create_private(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_dir_is_private_and_an_open_one_is_corrected() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/state");
        prepare(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        create_private(&dir.join("tether.db")).unwrap();
        assert_eq!(mode(&dir.join("tether.db")), 0o600);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            dir.join("tether.db"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        std::fs::set_permissions(
            dir.join("notes.txt"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("tether.db")), 0o600);
        assert_eq!(
            mode(&dir.join("notes.txt")),
            0o644,
            "not the gateway's file"
        );
    }
}
