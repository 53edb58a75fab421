//! Reading the operator's files (config, servers, secrets): bounded in size, refused when
//! not a regular file, and, while serving, off the async runtime with a deadline.
//!
//! Must not: block a runtime worker on a file system, or read an unbounded file.

use super::*;

/// Largest config or servers file read: the operator's file, but a path re-read on every
/// change (reload) must not read whatever grows there into memory.
pub const MAX_CONFIG_FILE: u64 = 4 << 20;

/// A config or servers file's text (`what` it is, for messages), refused past
/// [`MAX_CONFIG_FILE`] and when it is not a regular file: the file is opened without
/// blocking and checked before a byte is read, since opening a FIFO (or a device) to read
/// waits for a writer (issue 26: a servers file replaced by a FIFO hung a runtime worker,
/// then shutdown).
pub fn read_bounded(path: &Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| format!("cannot read {what} {}: {e}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(failed)?;
    let meta = file.metadata().map_err(failed)?;
    if !meta.is_file() {
        return Err(format!(
            "cannot read {what} {}: not a regular file",
            path.display()
        ));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_FILE + 1)
        .read_to_string(&mut text)
        .map_err(failed)?;
    if text.len() as u64 > MAX_CONFIG_FILE {
        return Err(format!(
            "{what} {} is larger than {} MiB",
            path.display(),
            MAX_CONFIG_FILE >> 20
        ));
    }
    Ok(text)
}

/// How long a read of a file while serving (a reload) may take before it is given up.
pub const FILE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads that are still stuck on a file system that does not answer (each holds a thread
/// until the read returns); past [`MAX_STUCK_READS`] no new one is started.
static STUCK_READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Stuck reads allowed at once.
pub const MAX_STUCK_READS: usize = 2;

/// Runs `read` (file I/O: a stat, a read) off the async runtime, on a thread of its own,
/// and gives it up after `timeout`: a file system that hangs (a dead network mount) must
/// never hold a runtime worker, and a thread left waiting on it never holds up the
/// process's exit (tokio's blocking pool is waited for at shutdown; a plain thread is not).
pub async fn off_runtime<T: Send + 'static>(
    what: &str,
    timeout: std::time::Duration,
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    use std::sync::atomic::Ordering;
    if STUCK_READS.load(Ordering::Relaxed) >= MAX_STUCK_READS {
        return Err(format!(
            "{what}: earlier reads are still stuck; not starting another"
        ));
    }
    STUCK_READS.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = crate::threads::spawn("tether-read", move || {
        let out = read();
        STUCK_READS.fetch_sub(1, Ordering::Relaxed);
        let _ = tx.send(out);
    });
    if let Err(e) = spawned {
        STUCK_READS.fetch_sub(1, Ordering::Relaxed);
        return Err(format!("{what}: cannot start a reader thread: {e}"));
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(format!("{what}: the reader thread ended without an answer")),
        Err(_) => Err(format!(
            "{what}: no answer from the file system within {}",
            humantime::format_duration(timeout)
        )),
    }
}
