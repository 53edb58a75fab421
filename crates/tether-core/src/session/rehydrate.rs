//! Bringing a stored session back on first contact after a restart (or from an instance
//! that stopped): checks (principal, upstream fingerprint, idle expiry, ownership), the
//! interrupted-call answers, and the re-issue of safe calls that were in flight.
//!
//! `load_inner`: a stored session back on first contact (principal, fingerprint, idle
//! expiry, cross-instance claim, write-back wait), interrupted calls answered `-32013` and
//! recorded, safe ones re-issued (`reissue`).
//!
//! Must not: resume a session against another upstream or another principal.

use super::*;

impl Registry {
    pub(super) async fn load_inner(
        &self,
        id: &str,
        principal: &Principal,
        span: tracing::Span,
    ) -> Result<Arc<Session>, SessionError> {
        let sh = &self.shared;
        let record = match sh.store.load_session(id).await? {
            Some(r) => r,
            None => self.await_write_back(id).await?,
        };
        // The fingerprint says what runs; the name is a label (its default changed once),
        // so it decides only for records written before fingerprints existed.
        let other_upstream = match record.upstream_fingerprint.as_deref() {
            Some(f) => {
                f != sh.cfg.upstream_fingerprint
                    || (sh.cfg.one_of_several && record.upstream_name != sh.cfg.upstream_name)
            }
            None => record.upstream_name != sh.cfg.upstream_name,
        };
        if other_upstream {
            // Its stored initialize belongs to another server: replaying it here would
            // hand the client a different server under the same session id.
            static LOGGED: std::sync::LazyLock<crate::log_limit::LogLimiter> =
                std::sync::LazyLock::new(|| {
                    crate::log_limit::LogLimiter::new(5, "sessions of another upstream")
                });
            if LOGGED.admit() {
                tracing::warn!(
                    session.upstream = %record.upstream_name,
                    session.fingerprint = record.upstream_fingerprint.as_deref().unwrap_or(""),
                    fingerprint = %sh.cfg.upstream_fingerprint,
                    "session was created for another upstream; not resumed here (404)"
                );
            }
            return Err(SessionError::NotFound);
        }
        if record.state == SessionState::Live
            && record.principal == principal.id
            && let Some(c) = &sh.coordinator
        {
            // One instance serves a session's upstream; the others forward to it. A
            // session whose owner stopped heartbeating is taken over here.
            match c.claim(id).await? {
                Owner::Me => {}
                Owner::TookOver { from } => {
                    sh.metrics.takeovers.inc();
                    tracing::info!(from = %from, "session taken over from an instance that stopped");
                }
                Owner::Other { instance, url } => {
                    return Err(SessionError::Elsewhere { instance, url });
                }
            }
        }
        if record.state != SessionState::Live || record.principal != principal.id {
            return Err(SessionError::NotFound);
        }
        let idle_ms = i64::try_from(sh.cfg.idle_timeout.as_millis()).unwrap_or(i64::MAX);
        if now_ms().saturating_sub(record.last_active_ms) >= idle_ms {
            sh.close_stored(id, "timeout").await?;
            tracing::info!(reason = "timeout", "session closed");
            return Err(SessionError::NotFound);
        }
        if record.transport == Transport::LegacySse.as_str()
            || record.transport == Transport::Pooled.as_str()
        {
            // The 2024-11-05 transport has no way to resume its one stream: its client
            // reconnects to /sse and starts over. A pooled upstream session of a process
            // that died is re-created from the next modern request's own `_meta`.
            sh.close_stored(id, "server_shutdown").await?;
            tracing::info!(reason = "server_shutdown", "session closed");
            return Err(SessionError::NotFound);
        }
        let slot = sh
            .admission
            .reserve(&record.principal)
            .map_err(|r| self.refused(r))?;
        let standalone_seq = sh
            .store
            .stream(id, STANDALONE_STREAM)
            .await?
            .map_or(0, |s| s.last_seq);
        let unfinished = sh.store.unfinished_streams(id).await?;
        let standalone = Arc::new(Stream::new(
            id.into(),
            STANDALONE_STREAM.into(),
            standalone_seq + 1,
            true,
        ));
        let session = Session::new(sh.clone(), record, Transport::Streamable, standalone, slot);
        let mut retry = Vec::new();
        for rec in unfinished {
            let stream = Arc::new(Stream::new(
                id.into(),
                rec.stream_id.as_str().into(),
                rec.last_seq + 1,
                true,
            ));
            let client_id = rec.client_request_id.clone().unwrap_or(Value::Null);
            match rec.request.clone().filter(|_| rec.retryable) {
                Some(request) => retry.push((stream, client_id, request)),
                None => {
                    let answer = Failure::interrupted(
                        "the gateway restarted while this request was in flight; it was not retried \
                         because the tool is not annotated readOnlyHint or idempotentHint",
                    )
                    .reply(client_id);
                    if let Some(tool) = interrupted_tool(&rec) {
                        let waited = now_ms().saturating_sub(rec.created_ms).max(0);
                        session.record_call(tool, Duration::from_millis(waited as u64), &answer);
                    }
                    stream.push(sh.store.as_ref(), &answer, true, None);
                }
            }
        }
        // The interrupted-call errors above must be readable before any resume is served.
        sh.store.flush().await?;
        sh.metrics.rehydrations.inc();
        sh.ledger.record(LedgerEvent::Rehydrated {
            id: id.to_owned(),
            at_ms: now_ms(),
        });
        tracing::info!(interrupted_retrying = retry.len(), "session rehydrated");
        if !retry.is_empty() {
            let s = session.clone();
            {
                let mut st = s.lock();
                for (stream, ..) in &retry {
                    st.calls.add_stream(stream.clone());
                }
            }
            sh.tracker
                .spawn(async move { s.reissue(retry).await }.instrument(span.clone()));
        }
        Ok(session)
    }

    /// A session record the store does not have: right after the store lost its data (a
    /// Redis restart without persistence) the instance holding the session is about to
    /// write it back, so wait for that (bounded) instead of telling the client its session
    /// is gone. Otherwise, and when the window passes, 404.
    pub(super) async fn await_write_back(&self, id: &str) -> Result<SessionRecord, SessionError> {
        let sh = &self.shared;
        let Some(c) = &sh.coordinator else {
            return Err(SessionError::NotFound);
        };
        let Some(window) = c.write_back_window().await? else {
            return Err(SessionError::NotFound);
        };
        let deadline = tokio::time::Instant::now() + window;
        tracing::debug!(
            window_ms = window.as_millis() as u64,
            "session record missing after a store restart; waiting for its holder to write it back"
        );
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(r) = sh.store.load_session(id).await? {
                return Ok(r);
            }
        }
        Err(SessionError::NotFound)
    }
}

impl Session {
    /// Re-issues safe requests that were in flight when the gateway died.
    pub(super) async fn reissue(self: Arc<Self>, items: Vec<(Arc<Stream>, Value, Value)>) {
        match self.ensure_upstream().await {
            Ok((link, generation)) => {
                for (stream, client_id, request) in items {
                    let request = Message::ours(request);
                    let method = request
                        .method()
                        .cloned()
                        .unwrap_or(Method::Other("".into()));
                    tracing::info!(mcp.method = %crate::log_limit::cut(method.as_str(), 64), "re-issuing a safe request interrupted by a gateway restart");
                    self.forward(&link, generation, request, client_id, stream, method)
                        .await;
                }
            }
            Err(err) => {
                let interrupted = Failure::interrupted(format!(
                    "the gateway restarted while this request was in flight, and retrying it failed: {err}"
                ));
                for (stream, client_id, request) in items {
                    self.lock().calls.remove_stream(stream.id());
                    let answer = interrupted.reply(client_id);
                    if request.get("method").and_then(Value::as_str) == Some("tools/call") {
                        let tool = request.pointer("/params/name").and_then(Value::as_str);
                        self.record_call(
                            tool.unwrap_or_default().to_owned(),
                            Duration::ZERO,
                            &answer,
                        );
                    }
                    self.emit(&stream, &answer, true);
                }
            }
        }
    }
}
