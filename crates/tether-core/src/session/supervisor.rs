//! Upstream supervision of one session: (re)start with backoff through the one
//! `Shared::start_upstream`, the pump that feeds upstream messages to `inbound`, the
//! state a fresh upstream gets replayed (restore, safe-tool annotations), and what an
//! upstream's death or an oversized message does to the calls in flight.
//!
//! `ensure_upstream` (backoff, circuit, restart, replay of `initialize` and restore state),
//! `install` (hands restore requests to the link), the pump, `on_upstream_closed` (every
//! pending call of that generation fails with the cause), `on_oversized`, `stop_upstream`;
//! `remember` (an accepted restore change) and `write_restore` (one write of the restore
//! state in flight per session, changes made meanwhile in one write after it;
//! `flush_restore` at shutdown).
//!
//! Must not: leave a call waiting on a dead upstream, or install into a closed session.

use super::*;

impl Session {
    /// Makes `link` the session's upstream; `None` when the session was closed meanwhile
    /// (the caller must stop the link, or its process outlives the session).
    pub(super) fn install(&self, link: Arc<Link>) -> Option<u64> {
        let mut st = self.lock();
        if st.closed {
            return None;
        }
        st.generation += 1;
        st.start_failed_at = None;
        link.set_restore(|| st.restore.requests());
        st.upstream = UpstreamSlot::Up {
            link,
            started: Instant::now(),
        };
        Some(st.generation)
    }

    pub(super) fn spawn_pump(
        self: &Arc<Self>,
        generation: u64,
        mut rx: mpsc::Receiver<Inbound>,
        early: Vec<Inbound>,
    ) {
        let me = self.clone();
        let stopped = self.shared.stopped.clone();
        self.shared.tracker.spawn(
            async move {
                for m in early {
                    if let Inbound::Message { message, origin } = m {
                        me.on_upstream_message(generation, message, origin).await;
                    }
                }
                let budget = me.shared.cfg.write_budget();
                loop {
                    // The store first catches up with what this session pushed: nothing
                    // more is taken from the upstream meanwhile (its pipe or stream fills
                    // and it waits), so a flood is held at its source, not in memory.
                    tokio::select! {
                        _ = stopped.cancelled() => return,
                        () = stream::write_room(&me.writes, budget) => {}
                    }
                    let next = tokio::select! {
                        _ = stopped.cancelled() => return,
                        m = rx.recv() => m,
                    };
                    match next {
                        Some(Inbound::Message { message, origin }) => {
                            me.on_upstream_message(generation, message, origin).await
                        }
                        Some(Inbound::Oversized { id, len, limit }) => {
                            me.on_oversized(
                                generation,
                                id.as_ref().and_then(Value::as_u64),
                                len,
                                limit,
                            );
                        }
                        Some(Inbound::NotStreamable(status)) => {
                            me.on_upstream_closed(
                                generation,
                                &format!("upstream answered HTTP {status}"),
                            );
                            return;
                        }
                        Some(Inbound::Closed(cause)) => {
                            me.on_upstream_closed(generation, &cause);
                            return;
                        }
                        None => {
                            me.on_upstream_closed(generation, "upstream link ended");
                            return;
                        }
                    }
                }
            }
            .instrument(self.span()),
        );
    }

    /// Returns the live upstream, (re)starting it if needed: connect, replay the stored
    /// `initialize` and `notifications/initialized`, refresh tool annotations.
    pub(super) async fn ensure_upstream(self: &Arc<Self>) -> Result<(Arc<Link>, u64), Failure> {
        if let Some(up) = self.current_link() {
            return Ok(up);
        }
        let _gate = self.upstream_gate.lock().await;
        if let Some(up) = self.current_link() {
            return Ok(up);
        }
        let sh = &self.shared;
        let name = &sh.cfg.upstream_name;
        {
            let st = self.lock();
            if st.closed {
                return Err(Failure::session_closed(None));
            }
            if let UpstreamSlot::Down {
                cause: Some(cause),
                retry_at: Some(at),
            } = &st.upstream
            {
                let now = Instant::now();
                // A failed start waits out its backoff unless the upstream has been
                // reached since (another session started one): the wait guards against a
                // broken upstream and must not outlast it (issue 26).
                let reached = st
                    .start_failed_at
                    .is_some_and(|t| sh.connector.circuit().succeeded_since(t));
                if now < *at && !reached {
                    let retry_in = *at - now;
                    return Err(Failure::new(
                        FailureKind::UpstreamBackoff,
                        format!(
                            "upstream {name:?} failed {} times in a row (last: {cause}); backing off, next restart attempt in {} ms",
                            st.failures,
                            crate::error::ceil_ms(retry_in)
                        ),
                        Retry::Safe(Some(retry_in)),
                    )
                    .with("failures", st.failures));
                }
            }
        }
        let started = Instant::now();
        let Started {
            link,
            rx,
            result,
            early,
        } = match sh.start_upstream(&self.id, &self.record.init_params).await {
            Ok(x) => x,
            Err(
                err @ (UpstreamError::CircuitOpen { .. }
                | UpstreamError::Capacity { .. }
                | UpstreamError::Resources(_)),
            ) => {
                // Refused before anything ran: not this session's failure, so its own
                // backoff does not grow; the connector counts and logs.
                return Err(Failure::unavailable(name, &err));
            }
            Err(err) => {
                sh.metrics.upstream_failures.inc();
                let mut st = self.lock();
                st.failures += 1;
                st.start_failed_at = Some(Instant::now());
                st.upstream = UpstreamSlot::failed(err.to_string(), st.failures, &sh.cfg.backoff);
                tracing::warn!(error = %err, failures = st.failures, "upstream restart failed");
                return Err(Failure::unavailable(name, &err));
            }
        };
        link.send(Message::notification("notifications/initialized", None))
            .await;
        let link = Arc::new(link);
        // The session can close (expiry, DELETE, eviction) while the upstream starts: the
        // `closed` check above was before the (slow) spawn and handshake, and `tear_down`
        // does not wait for the gate. Installing into a closed session would orphan the
        // process (found by the soak at a 1 s idle timeout).
        let Some(generation) = self.install(link.clone()) else {
            link.shutdown(true);
            return Err(Failure::session_closed(None));
        };
        self.spawn_pump(generation, rx, early);
        sh.metrics.upstream_starts.inc();
        sh.metrics.upstream_restarts.inc();
        sh.ledger.record(LedgerEvent::UpstreamRestarted {
            id: self.id.to_string(),
            at_ms: now_ms(),
        });
        tracing::info!(
            upstream = %link.describe(),
            generation,
            duration_ms = started.elapsed().as_millis() as u64,
            "upstream started and re-initialized"
        );
        self.replay_restore(&link, generation).await;
        if result.pointer("/capabilities/tools").is_some() && self.lock().safe_tools.is_empty() {
            self.refresh_safe_tools(&link, generation).await;
        }
        Ok((link, generation))
    }

    pub(super) fn current_link(&self) -> Option<(Arc<Link>, u64)> {
        let st = self.lock();
        match &st.upstream {
            UpstreamSlot::Up { link, .. } => Some((link.clone(), st.generation)),
            UpstreamSlot::Down { .. } => None,
        }
    }

    /// Sends a request of the gateway's own to the upstream and waits (bounded) for its
    /// answer.
    pub(super) async fn internal_request(
        &self,
        link: &Link,
        generation: u64,
        method: &str,
        params: Option<Value>,
    ) -> Option<Value> {
        let uid = self.shared.next_upstream_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().calls.insert(
            uid,
            Pending {
                kind: PendingKind::Internal(tx),
                restore: None,
                tool: None,
                generation,
                method: Method::from_name(method),
                deadline: None,
                started: Instant::now(),
                spans: None,
            },
            None,
        );
        link.send(Message::request(Value::from(uid), method, params))
            .await;
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(resp)) => Some(resp),
            _ => {
                self.lock().calls.take(uid);
                None
            }
        }
    }

    /// Learns which tools are safe to re-issue, by asking the upstream directly (one page).
    pub(super) async fn refresh_safe_tools(&self, link: &Link, generation: u64) {
        match self
            .internal_request(link, generation, "tools/list", None)
            .await
        {
            Some(resp) if resp.get("result").is_some() => {
                let safe: Vec<String> = protocol::safe_tools(&resp["result"]).collect();
                let tasks: Vec<(String, String)> =
                    protocol::task_support(&resp["result"]).collect();
                let mut st = self.lock();
                st.safe_tools.extend(safe);
                st.task_support.extend(tasks);
                st.tools_learned = true;
            }
            _ => tracing::debug!(
                "upstream did not list its tools; interrupted calls will not be retried"
            ),
        }
    }

    /// Tells a fresh upstream what the client had set up: log level and subscriptions.
    pub(super) async fn replay_restore(&self, link: &Link, generation: u64) {
        let requests = self.lock().restore.requests();
        for (method, params) in requests {
            let r = self
                .internal_request(link, generation, method, Some(params.clone()))
                .await;
            if r.is_none_or(|r| r.get("error").is_some()) {
                tracing::warn!(mcp.method = method, params = %params, "fresh upstream refused restored session state");
            }
        }
    }

    /// Records a setting the upstream accepted, so the next upstream gets it too.
    pub(super) fn remember(self: &Arc<Self>, op: &RestoreOp) {
        let write = {
            let mut st = self.lock();
            let changed = st.restore.apply(op);
            if changed {
                match op {
                    RestoreOp::Subscribe(uri) => st.subs.bytes += uri.len(),
                    RestoreOp::Unsubscribe(uri) => st.subs.bytes -= uri.len(),
                    RestoreOp::SetLevel(_) => {}
                }
                self.recharge(&mut st);
                // An HTTP link re-initializes a forgetful upstream by itself: it must
                // replay this too, not only a restart this session runs.
                if let UpstreamSlot::Up { link, .. } = &st.upstream {
                    link.set_restore(|| st.restore.requests());
                }
            }
            st.restore_dirty |= changed;
            let start = changed && !st.restore_writing;
            st.restore_writing |= start;
            start
        };
        if write {
            let me = self.clone();
            self.shared
                .tracker
                .spawn(async move { me.write_restore().await }.instrument(self.span()));
        }
    }

    /// Queues a write of the restore state if a change is still unwritten (shutdown: the
    /// store's flush that follows makes it durable).
    pub(super) fn flush_restore(&self) {
        let v = {
            let mut st = self.lock();
            if !std::mem::take(&mut st.restore_dirty) {
                return;
            }
            st.restore.to_json()
        };
        drop(self.shared.store.set_restore(&self.id, v));
    }

    /// Writes the restore state to the record until it stops changing: one write in flight
    /// per session, and the changes made meanwhile go in one write after it, so a client
    /// changing it as fast as it can costs one write of the whole state per store round
    /// trip, not one queued write per change (each is as large as the subscriptions: a
    /// flood queued writes whose total grew with their square; issue 26). Not awaited by
    /// any request: a crash loses at most the changes of the write in flight.
    async fn write_restore(self: Arc<Self>) {
        loop {
            let v = {
                let mut st = self.lock();
                if !st.restore_dirty || st.closed {
                    st.restore_writing = false;
                    return;
                }
                st.restore_dirty = false;
                st.restore.to_json()
            };
            if let Err(e) = self.shared.store.set_restore(&self.id, v).await {
                tracing::warn!(error = %e, "cannot record the session's restore state");
            }
        }
    }

    pub(super) fn on_upstream_closed(&self, generation: u64, cause: &str) {
        let failed: Vec<Pending> = {
            let mut st = self.lock();
            if st.generation != generation {
                return;
            }
            let healthy = match &st.upstream {
                UpstreamSlot::Up { started, .. } => {
                    started.elapsed() >= self.shared.cfg.healthy_after
                }
                UpstreamSlot::Down { .. } => return,
            };
            st.failures = if healthy { 1 } else { st.failures + 1 };
            st.upstream =
                UpstreamSlot::failed(cause.to_owned(), st.failures, &self.shared.cfg.backoff);
            st.calls.take_generation(generation)
        };
        if self.is_closed() {
            return;
        }
        self.shared.metrics.upstream_failures.inc();
        tracing::warn!(cause = %cause, in_flight = failed.len(), "upstream lost");
        let lost = Failure::upstream_lost(
            format!(
                "{cause}; the request was not completed. The next request restarts the upstream."
            ),
            true,
        );
        for p in failed {
            self.finish(p, |client_id| lost.reply(client_id));
        }
    }

    /// An upstream message over `--max-upstream-message` was skipped. The request it
    /// answered (when its id could be read) fails with an error naming the limit; the
    /// upstream keeps running with its state.
    pub(super) fn on_oversized(&self, generation: u64, id: Option<u64>, len: usize, limit: usize) {
        self.shared.metrics.upstream_oversized.inc();
        let pending = id.and_then(|uid| {
            let mut st = self.lock();
            st.calls.take_in(uid, generation)
        });
        let Some(p) = pending else {
            tracing::warn!(
                bytes = len,
                limit,
                "upstream message over the size limit (--max-upstream-message) skipped; it answered no request in flight"
            );
            return;
        };
        tracing::warn!(bytes = len, limit, method = %p.method, "upstream answer over the size limit (--max-upstream-message); the request gets an error, the upstream keeps running");
        let too_large = Failure::too_large(
            format!(
                "the upstream's answer was {len} bytes, over the gateway's {limit} byte limit (--max-upstream-message)"
            ),
            len,
            limit,
        );
        self.finish(p, |client_id| too_large.reply(client_id));
    }

    /// Stops the upstream without ending the session (gateway shutdown).
    pub(super) fn stop_upstream(&self) {
        let link = self.lock().take_link();
        if let Some(link) = link {
            link.kill();
        }
    }
}
