//! The state dir's secrets and lock: the admin token, the key that seals `requestState`
//! of parked calls (shared through the live store in a deployment), and the lock that keeps
//! two gateways off one SQLite state dir.
//!
//! Must not: write a secret readable by anyone but the owner.

use super::*;

/// The admin token and where an operator finds it.
pub(super) struct AdminToken {
    pub(super) secret: String,
    pub(super) hint: String,
}

/// Name of the generated admin token file in the state dir (the CLI reads it there).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The file in the state dir holding the key that seals MRTR `requestState`.
pub const BRIDGE_KEY_FILE: &str = "bridge.key";

/// The configured token, the first line of `--admin-token-file`, or the one generated
/// into the state dir (kept across restarts, readable only by this user).
pub(super) fn resolve_admin_token(config: &Config) -> anyhow::Result<AdminToken> {
    if let Some(t) = &config.admin_token {
        return Ok(AdminToken {
            secret: t.clone(),
            hint: "the configured --admin-token".into(),
        });
    }
    let read = |path: &std::path::Path| -> anyhow::Result<String> {
        let text =
            crate::config::read_bounded(path, "admin token file").map_err(anyhow::Error::msg)?;
        let token = text.lines().next().unwrap_or("").trim().to_owned();
        anyhow::ensure!(
            !token.is_empty(),
            "the admin token file {} is empty",
            path.display()
        );
        Ok(token)
    };
    if let Some(path) = &config.admin_token_file {
        return Ok(AdminToken {
            secret: read(path)?,
            hint: format!("in {}", path.display()),
        });
    }
    let path = config.state_dir.join(ADMIN_TOKEN_FILE);
    let hint = format!("in {}", path.display());
    if path.exists() {
        return Ok(AdminToken {
            secret: read(&path)?,
            hint,
        });
    }
    let secret = format!("tadm_{}", crate::ids::new_session_id());
    write_secret(&config.state_dir, &path, &secret)?;
    tracing::info!(file = %path.display(), "generated an admin token (the CLI reads it there; `tether dashboard` prints a link with it)");
    Ok(AdminToken { secret, hint })
}

/// The key that seals MRTR `requestState` (`modern::StateKey`): with a shared store the
/// deployment's one (`P:secret:bridge`, so any instance verifies a state another sealed),
/// else 32 random bytes kept in the state dir (`bridge.key`, mode 0600), so a state stays
/// verifiable across restarts.
pub(super) async fn state_key(
    config: &Config,
    coordinator: Option<&dyn crate::store::Coordinator>,
) -> anyhow::Result<crate::modern::StateKey> {
    let (text, whence) = match coordinator {
        Some(c) => match c.shared_secret("bridge").await {
            Ok(Some(text)) => (text, "the live store's requestState key".to_owned()),
            Ok(None) => state_key_file(config)?,
            Err(e) => anyhow::bail!("cannot read the requestState key from the live store: {e}"),
        },
        None => state_key_file(config)?,
    };
    crate::modern::StateKey::from_hex(&text).with_context(|| {
        format!("{whence} is not 64 hex characters; delete it to have a new key made")
    })
}

/// The requestState key's text from the state dir (its file keeps the name `bridge.key`
/// it had, so existing state dirs keep their key), made there first if missing; and where it is.
pub(super) fn state_key_file(config: &Config) -> anyhow::Result<(String, String)> {
    let path = config.state_dir.join(BRIDGE_KEY_FILE);
    let text = if path.exists() {
        crate::config::read_bounded(&path, "requestState key").map_err(anyhow::Error::msg)?
    } else {
        let hex = crate::ids::random_hex(32);
        write_secret(&config.state_dir, &path, &hex)?;
        hex
    };
    Ok((text, path.display().to_string()))
}

/// Writes a secret the gateway generated into a new file of the state dir, readable by its
/// owner only (an existing file is never overwritten).
pub(super) fn write_secret(
    state_dir: &std::path::Path,
    path: &std::path::Path,
    secret: &str,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state dir {}", state_dir.display()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(())
}

/// Takes the state dir for this process: two gateways writing one SQLite store would serve
/// each other's sessions (each replaying them into its own upstream). A second process
/// exits at once, naming the holder.
pub(super) fn lock_state_dir(
    dir: &std::path::Path,
    addr: SocketAddr,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot open the session store: cannot create the state dir {}",
            dir.display()
        )
    })?;
    let path = dir.join("tether.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(crate::state_dir::FILE_MODE)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0)?;
            lock.rewind()?;
            writeln!(
                lock,
                "pid {} listening on http://{addr}/mcp",
                std::process::id()
            )?;
            Ok(lock)
        }
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            // One line of ours; bounded all the same.
            let _ = file.take(4096).read_to_string(&mut holder);
            anyhow::bail!(
                "the state dir {} is in use by another tether ({}); give this one its own --state-dir, or share sessions between gateways with --store redis://...",
                dir.display(),
                holder.trim()
            )
        }
        Err((_, e)) => Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
    }
}
