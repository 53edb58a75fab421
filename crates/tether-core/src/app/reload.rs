//! Reloads while serving: the servers file and the keys file re-read on SIGHUP and when
//! they change, each change applied as new generations beside the draining old ones.
//!
//! Must not: block the runtime on a file read, or drop a server's sessions on a reload
//! that failed.

use super::*;

/// What a reload re-reads: the servers (a `--servers` file or the config's `[servers]`)
/// and the config file's keys.
#[derive(Clone)]
pub(super) struct ReloadSources {
    pub(super) servers: Option<ServersSource>,
    pub(super) keys: Option<PathBuf>,
}

impl ReloadSources {
    /// The files whose change triggers a reload.
    pub(super) fn paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .servers
            .iter()
            .map(|s| s.path().to_path_buf())
            .chain(self.keys.clone())
            .collect();
        v.dedup();
        v
    }
}

/// Re-reads the servers and the keys on SIGHUP and when their files change (checked every
/// 2 s), and stops the generations a reload left draining once they hold no session.
/// Until `stop`.
pub(super) async fn run_reloads(
    hub: Hub,
    builder: Arc<Builder>,
    sources: ReloadSources,
    stop: CancellationToken,
) {
    let paths = sources.paths();
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the files are still watched");
            None
        }
    };
    // Off the runtime, bounded in time: a hung file system must not hold a worker.
    let modified = |paths: &[PathBuf]| {
        let paths = paths.to_vec();
        async move {
            crate::config::off_runtime(
                "reloaded files",
                crate::config::FILE_READ_TIMEOUT,
                move || {
                    paths
                        .iter()
                        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                        .collect::<Vec<_>>()
                },
            )
            .await
            .ok()
        }
    };
    let mut seen = modified(&paths).await;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            () = stop.cancelled() => return,
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
            _ = tick.tick() => {
                for g in hub.take_drained() {
                    tracing::info!(server = %g.registry.server(), "a removed or replaced server holds no session any more: stopped");
                    g.registry.begin_shutdown();
                    g.registry.finish_shutdown().await;
                }
                let now = modified(&paths).await;
                if now == seen {
                    continue;
                }
                "the file changed"
            }
        };
        seen = modified(&paths).await;
        if let Some(source) = &sources.servers {
            let loaded = {
                let source = source.clone();
                crate::config::off_runtime(
                    "servers file",
                    crate::config::FILE_READ_TIMEOUT,
                    move || source.load(),
                )
                .await
                .and_then(|r| r)
            };
            reload(&hub, &builder, source, loaded, why).await;
        }
        if let Some(path) = &sources.keys {
            reload_keys(&hub, &builder, path, why).await;
        }
    }
}

/// Puts the config file's keys in force; the sessions of users who lost every key are
/// closed (`revoked`). A file that cannot be read or holds invalid keys changes nothing.
pub(super) async fn reload_keys(hub: &Hub, builder: &Builder, path: &std::path::Path, why: &str) {
    let read = {
        let path = path.to_path_buf();
        crate::config::off_runtime("config file", crate::config::FILE_READ_TIMEOUT, move || {
            crate::config::Layer::from_file(&path)
        })
        .await
        .and_then(|r| r)
        .and_then(|layer| Keys::new(&layer.keys.unwrap_or_default()).map_err(|e| e.join("; ")))
    };
    let keys = match read {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(trigger = why, error = %e, "keys not reloaded: the keys in force stay");
            return;
        }
    };
    let gone = builder.front.keys.replace(keys);
    if gone.is_empty() {
        return;
    }
    let mut closed = 0;
    for r in hub.registries() {
        closed += r.revoke(|p| gone.iter().any(|g| g == p)).await;
    }
    tracing::info!(trigger = why, users = %gone.join(","), sessions_closed = closed, "keys reloaded: users without a key any more are refused and their sessions closed (revoked)");
}

/// Says that SIGHUP reloads nothing without `--servers` (or `[servers]`), until `stop`.
pub(super) async fn ignore_hangups(stop: CancellationToken) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            Some(()) = hup.recv() => tracing::info!(
                "SIGHUP: nothing to reload (the servers of --servers or [servers.NAME] tables and the keys of --config are reloaded; other settings need a restart)"
            ),
        }
    }
}

/// Applies the servers as `source` now holds them to `hub`: added servers serve at once,
/// removed ones drain, changed ones serve new sessions from a new generation while the old
/// one keeps its sessions; an invalid file changes nothing and says why.
pub(super) async fn reload(
    hub: &Hub,
    builder: &Builder,
    source: &ServersSource,
    loaded: Result<(String, String), String>,
    why: &str,
) {
    let mut shown = source.path().display().to_string();
    let file = loaded.map_err(|e| vec![e]).and_then(|(json, name)| {
        shown = name;
        crate::servers::parse(&json, &shown, &builder.config.env_policy)
    });
    let file = match file {
        Ok(f) if f.servers.is_empty() => Err(vec![format!(
            "{shown}: no enabled server in it (a gateway with no server would refuse every client)"
        )]),
        Ok(f) => {
            let loops = self_upstreams(
                &builder.me,
                f.servers.iter().map(|e| (e.name.as_str(), &e.upstream)),
            );
            if loops.is_empty() {
                Ok(f)
            } else {
                Err(loops.iter().map(|l| format!("{shown}: {l}")).collect())
            }
        }
        Err(e) => Err(e),
    };
    let file = match file {
        Ok(f) => f,
        Err(errors) => {
            tracing::error!(
                trigger = why,
                errors = %errors.join("; "),
                "servers file not reloaded: the running configuration stays"
            );
            return;
        }
    };
    for note in &file.notes {
        tracing::info!("{note}");
    }
    let current = hub.current();
    let (mut added, mut changed, mut removed, mut kept) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let mut revoked = 0;
    for e in &file.servers {
        match current.get(&e.name) {
            Some(g) if g.entry.as_ref() == Some(e) => kept += 1,
            Some(_) => {
                hub.install(&e.name, builder.build(Some(e)));
                changed.push(e.name.clone());
                // The draining generations keep their sessions, not their users: a user
                // taken off the list is refused there on its next request, and what it
                // holds there is closed.
                let users = e.settings.users.clone();
                for g in hub.generations_of(&e.name) {
                    g.access.set(users.clone());
                    revoked += g
                        .registry
                        .revoke(|p| users.as_ref().is_some_and(|u| !u.iter().any(|x| x == p)))
                        .await;
                }
            }
            None => {
                hub.install(&e.name, builder.build(Some(e)));
                added.push(e.name.clone());
            }
        }
    }
    for name in current.keys() {
        if !file.servers.iter().any(|e| &e.name == name) {
            hub.remove(name);
            removed.push(name.clone());
        }
    }
    tracing::info!(
        trigger = why,
        added = %added.join(","),
        changed = %changed.join(","),
        removed = %removed.join(","),
        unchanged = kept,
        sessions_revoked = revoked,
        "servers reloaded"
    );
}
