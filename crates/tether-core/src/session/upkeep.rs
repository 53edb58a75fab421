//! Background care of the session set: the idle reaper, multi-instance coordination
//! (releases, takeovers, write-back after a store outage), the ledger's retention pruning
//! and shutdown.
//!
//! Reaper (per server: with several, only its own stored sessions, `idle_sessions(..,
//! Servers::Only(name))`; a draining one only what it holds), `run_orphan_reaping` (one
//! loop per process with several servers: the stored sessions of names no registry serves,
//! `Servers::NoneOf`, expired at the gateway's idle timeout; issue 26),
//! `close_stale_pooled` (at start: pooled members an earlier process left in a store only
//! this process uses, reason `gateway_restart`), `run_coordination` (one per process over
//! every registry: heartbeat, inbox, re-check after a lapse, write-back after a Redis
//! restart), `run_log_pruning`, `run_ledger_pruning` (retention), `release`, shutdown.
//!
//! Must not: block a request; every loop here has a shutdown path.

use super::*;

impl Registry {
    /// Expires idle sessions (in memory and in the store) and prunes old stream logs.
    /// Called periodically by [`Registry::run_reaper`].
    pub async fn reap(&self) {
        let sh = &self.shared;
        for s in self.held() {
            if s.is_idle() {
                self.close(&s, "timeout").await;
            }
        }
        self.prune_pool();
        if self.is_draining() {
            return;
        }
        let of = if sh.cfg.one_of_several {
            Servers::Only(&sh.cfg.upstream_name)
        } else {
            Servers::All
        };
        self.expire_idle(sh.cfg.idle_timeout, of).await;
        sh.legacy_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, p| p.stream.attached() || p.opened.elapsed() < Duration::from_secs(10));
    }

    /// Expires the stored sessions of the servers `of` names idle past `idle`, unless a
    /// registry of the process holds them (its reaper decides) or, in a deployment, another
    /// live instance does.
    async fn expire_idle(&self, idle: Duration, of: Servers<'_>) {
        let sh = &self.shared;
        let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
        let ids = match sh
            .store
            .idle_sessions(now_ms().saturating_sub(idle_ms), 256, of)
            .await
        {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up idle sessions");
                return;
            }
        };
        for id in ids {
            // Held here or by another registry of the process (its reaper decides, from
            // what it knows of the session's open streams).
            if sh.siblings.hold(&id) {
                continue;
            }
            if let Some(c) = &sh.coordinator {
                // Another live instance may hold it with an open stream; its own reaper
                // decides. An orphan (owner gone) is claimed, then expired.
                match c.claim(&id).await {
                    Ok(Owner::Me | Owner::TookOver { .. }) => {}
                    Ok(Owner::Other { .. }) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot check a session's owner");
                        continue;
                    }
                }
            }
            self.expire_stored(&id, "timeout").await;
        }
    }

    /// Closes a stored session no registry holds, with `reason`.
    async fn expire_stored(&self, id: &str, reason: &str) {
        let sh = &self.shared;
        match sh.close_stored(id, reason).await {
            Ok(()) => {
                sh.metrics.closed(reason);
                tracing::info!(session.id = %crate::ids::shown(id), reason, "session closed");
            }
            Err(e) => {
                tracing::warn!(session.id = %crate::ids::shown(id), error = %e, "cannot expire session")
            }
        }
    }

    /// Expires, at `idle`, the stored sessions of servers no registry of the process
    /// serves (removed from the configuration, or served before under another name, such
    /// as a quick start's `--demo`): no server's reaper looks at them (issue 26: they stayed
    /// live for good, and counted as live everywhere). With several instances another one
    /// may still serve such a server, so only the idle timeout ends them, never more.
    pub async fn reap_orphans(&self, served: &[String], idle: Duration) {
        self.expire_idle(idle, Servers::NoneOf(served)).await;
    }

    /// Closes the bridge's pooled sessions an earlier process left in a store only this
    /// process uses (`LiveStore::stale_pooled`): no client can name them, so nothing would
    /// resume them, and they would count as live until they idled out. Returns how many.
    pub async fn close_stale_pooled(&self) -> usize {
        let ids = match self.shared.store.stale_pooled().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up pooled sessions of an earlier process");
                return 0;
            }
        };
        let mut n = 0;
        for id in ids {
            if !self.shared.siblings.hold(&id) {
                self.expire_stored(&id, "gateway_restart").await;
                n += 1;
            }
        }
        n
    }

    /// Runs [`Registry::reap`] until shutdown.
    pub async fn run_reaper(self) {
        let sh = self.shared.clone();
        let tick =
            (sh.cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sh.stopping.cancelled() => return,
                _ = interval.tick() => {}
            }
            self.reap().await;
        }
    }

    /// After a lapsed heartbeat: every held session is checked against the store.
    pub(super) async fn resync(&self, c: &dyn Coordinator) {
        let held = self.held();
        if held.is_empty() {
            return;
        }
        let ids: Vec<String> = held.iter().map(|s| s.id.to_string()).collect();
        let owners = match c.owners(&ids).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-check session ownership");
                return;
            }
        };
        let (mut kept, mut restored, mut lost) = (0, 0, 0);
        for (s, owner) in held.iter().zip(owners) {
            match owner {
                Some(o) if o == c.me().id => kept += 1,
                Some(_) => {
                    lost += 1;
                    self.release(&s.id, "taken over by another instance").await;
                }
                None => {
                    let record = s.current_record();
                    match c.reassert(&record).await {
                        Ok(()) => restored += 1,
                        Err(e) => {
                            tracing::warn!(session.id = %crate::ids::shown(&s.id), error = %e, "cannot write back a session record");
                        }
                    }
                }
            }
        }
        tracing::info!(
            kept,
            restored,
            released = lost,
            "heartbeat had lapsed: session ownership re-checked"
        );
    }

    /// Drops this process's copy of a session without closing it in the store: another
    /// instance serves it now (or it was closed there).
    pub async fn release(&self, id: &str, why: &str) {
        let cell = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let Some(cell) = cell else {
            return;
        };
        if let Some(s) = cell.get().cloned() {
            s.shutdown_local(why);
            tracing::info!(session.id = %crate::ids::shown(id), why, "session released by this instance");
        }
        self.count_held();
    }

    /// Shutdown, first phase: standalone streams end; request streams continue.
    pub fn begin_shutdown(&self) {
        self.shared.stopping.cancel();
    }

    /// Shutdown, last phase: every stream ends and every upstream stops. Sessions stay
    /// live in the store and resume on contact after a restart.
    pub async fn finish_shutdown(&self) {
        let sh = &self.shared;
        sh.stopping.cancel();
        sh.stopped.cancel();
        let sessions: Vec<Arc<Session>> = {
            let mut map = sh.sessions.lock().unwrap_or_else(|p| p.into_inner());
            map.drain().filter_map(|(_, c)| c.get().cloned()).collect()
        };
        for s in &sessions {
            s.stop_upstream();
            s.flush_restore();
        }
        if let Err(e) = sh.store.flush().await {
            tracing::error!(error = %e, "store flush failed at shutdown");
        }
    }
}

/// Runs [`Registry::reap_orphans`] on one of `registries()` (with the names every registry
/// of the process serves) every `idle / 4` (1 s to 30 s), until `stop`: one loop per
/// process, for the gateway's idle timeout.
pub async fn run_orphan_reaping(
    registries: impl Fn() -> Vec<Registry> + Send,
    idle: Duration,
    stop: CancellationToken,
) {
    let mut interval =
        tokio::time::interval((idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(30)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let all = registries();
        let mut served: Vec<String> = all.iter().map(|r| r.server().to_owned()).collect();
        served.sort();
        served.dedup();
        if let Some(r) = all.first() {
            r.reap_orphans(&served, idle).await;
        }
    }
}

/// Prunes stream logs past `retention` (and closed sessions' logs), then expired tasks,
/// every minute until `stop`: one loop per process, whatever its servers (they share the
/// store). Beside the reapers, not in their loops: a large prune takes many chunks and
/// must not delay expiry.
pub async fn run_log_pruning(
    store: Arc<dyn LiveStore>,
    retention: Duration,
    stop: CancellationToken,
) {
    let mut interval = tokio::time::interval(Duration::from_secs(60));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        // Dropped between chunks when `stop` fires.
        tokio::select! {
            () = stop.cancelled() => return,
            r = store.prune_events(now_ms().saturating_sub(retention)) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot prune stream logs");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            r = store.prune_tasks(now_ms()) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot prune expired tasks");
                }
            }
        }
    }
}

/// Keeps this instance's heartbeat alive and obeys the deployment for every server's
/// registry (`registries` gives the current set): drops sessions that were closed
/// elsewhere or taken over after a lapse, and writes back records a store lost. One loop
/// per process (the heartbeat and the inbox are the instance's); runs until `stop`.
pub async fn run_coordination(
    c: Arc<dyn Coordinator>,
    every: Duration,
    stop: CancellationToken,
    registries: impl Fn() -> Vec<Registry> + Send,
) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
            // Back from an outage: re-check now, so records a restarted Redis lost are
            // written back before the clients of other instances give up on them.
            () = c.reconnected() => {}
        }
        match c.heartbeat().await {
            Ok(lapsed) => {
                if down {
                    tracing::info!("heartbeat restored");
                    down = false;
                }
                if lapsed {
                    for r in registries() {
                        r.resync(c.as_ref()).await;
                    }
                }
            }
            Err(e) => {
                if !down {
                    tracing::warn!(error = %e, "cannot refresh this instance's heartbeat; held sessions keep working");
                    down = true;
                }
                continue;
            }
        }
        match c.take_drops().await {
            Ok(ids) => {
                let all = registries();
                for id in ids {
                    // The inbox is the instance's: the server holding the session drops it.
                    for r in &all {
                        r.release(&id, "closed by another instance").await;
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read this instance's inbox"),
        }
    }
}

/// Deletes ledger history past `retention` every ten minutes (and once at start) until
/// `stop`. Stream logs are pruned by the reaper; this is the sessions and tool calls.
pub async fn run_ledger_pruning(
    ledger: Arc<dyn crate::store::LedgerStore>,
    retention: Duration,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match ledger
            .prune_ledger(cutoff)
            .instrument(tracing::info_span!("prune_ledger"))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "pruned ledger history past retention"),
            Err(e) => tracing::warn!(error = %e, "cannot prune ledger history"),
        }
    }
}
