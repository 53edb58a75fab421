//! The link's own requests: the handshake replayed when the server forgot the session
//! (404, or a 400 naming the session), the state restored after it, and the standalone GET
//! stream for server-initiated messages.
//!
//! Must not: re-initialize more than once for requests that met the same 404.

use super::*;

impl Inner {
    /// Sends a message of the link's own and returns the answer to it, if any. Nothing
    /// else the server says on that exchange is forwarded.
    pub(super) async fn internal(&self, value: &Value) -> Result<Option<Value>, SendError> {
        let resp = self.open(value).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(SendError::Sent(format!("HTTP {status}")));
        }
        if method_of(value) == Some("initialize") {
            self.adopt_session_id(resp.headers()).await;
        }
        let want = request_id(value).cloned();
        let is_sse = is_event_stream(resp.headers());
        if is_sse {
            let mut events = sse::events(resp, self.opts.max_message);
            while let Some(Ok(SseItem::Event(ev))) = events.next().await {
                if let Ok(v) = serde_json::from_str::<Value>(&ev.data)
                    && want.is_some()
                    && v.get("method").is_none()
                    && v.get("id") == want.as_ref()
                {
                    return Ok(Some(v));
                }
            }
            return Ok(None);
        }
        let bytes = read_limited(resp, self.opts.max_message)
            .await
            .map_err(|e| SendError::Sent(error_chain(&e)))?
            .map_err(|len| {
                SendError::Sent(format!(
                    "answer of {len} bytes over the {} byte limit",
                    self.opts.max_message
                ))
            })?;
        Ok(serde_json::from_slice(&bytes).ok())
    }

    pub(super) fn internal_id(&self) -> Value {
        Value::from(format!(
            "tether-internal-{}",
            self.next_internal.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Replays `initialize`, `notifications/initialized` and the restore requests with the
    /// client's stored params, as a fresh session.
    pub(super) async fn reinitialize(&self) -> Result<(), SendError> {
        *self.session.lock().await = UpstreamSession::default();
        let init = protocol::request(
            self.internal_id(),
            "initialize",
            Some(self.init_params.clone()),
        );
        let answer = self.internal(&init).await?.unwrap_or(Value::Null);
        if answer.get("result").is_none() {
            return Err(SendError::Sent(format!(
                "initialize was not accepted: {answer}"
            )));
        }
        if self.session.lock().await.id.is_none() {
            return Err(SendError::Sent(
                "the server answered initialize without a session id".into(),
            ));
        }
        self.note_initialized(&answer).await;
        self.internal(&protocol::notification("notifications/initialized", None))
            .await?;
        let restore = self
            .restore
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (method, params) in restore {
            let answer = self
                .internal(&protocol::request(self.internal_id(), method, Some(params)))
                .await?;
            if answer.is_none_or(|a| a.get("error").is_some()) {
                tracing::warn!(mcp.method = method, "server refused restored session state");
            }
        }
        Ok(())
    }

    /// Opens the standalone GET stream for server-initiated messages and keeps it open
    /// (honouring `retry`) until the link stops, the server offers none (405) or forgets the
    /// session (404; the next POST re-initializes, which opens a new one).
    pub(super) fn spawn_listen_stream(&self) {
        let client = self.client.clone();
        let url = self.url.clone();
        let stop = self.stop.clone();
        let inbound = self.inbound.clone();
        let base_headers = self.opts.headers.clone();
        let session = self.session.clone();
        let max_message = self.opts.max_message;
        self.tracker.spawn(
            async move {
                let mut last_id: Option<String> = None;
                let mut retry = DEFAULT_RETRY;
                let mut failures = 0u32;
                let mut opened_for: Option<String> = None;
                loop {
                    let s = session.lock().await.clone();
                    let Some(sid) = s.id.clone() else { return };
                    if opened_for.as_ref().is_some_and(|o| *o != sid) {
                        // A re-initialization opened a stream of its own for the new session.
                        return;
                    }
                    opened_for = Some(sid.clone());
                    let mut req = client
                        .get(&url)
                        .headers(base_headers.clone())
                        .header(ACCEPT, "text/event-stream")
                        .header(SESSION_HEADER, sid);
                    if let Some(v) = s.version.clone() {
                        req = req.header(VERSION_HEADER, v);
                    }
                    if let Some(l) = last_id.clone() {
                        req = req.header(LAST_EVENT_ID, l);
                    }
                    let resp = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = req.send() => r,
                    };
                    match resp {
                        Ok(r)
                            if r.status() == StatusCode::METHOD_NOT_ALLOWED
                                || r.status() == StatusCode::NOT_FOUND =>
                        {
                            return;
                        }
                        Ok(r) if r.status().is_success() => {
                            failures = 0;
                            let mut events = sse::events(r, max_message);
                            loop {
                                let ev = tokio::select! {
                                    _ = stop.cancelled() => return,
                                    ev = events.next() => ev,
                                };
                                let ev = match ev {
                                    Some(Ok(SseItem::Event(ev))) => ev,
                                    Some(Ok(SseItem::TooLarge { len })) => {
                                        tracing::warn!(bytes = len, limit = max_message, "upstream stream event over the size limit (--max-upstream-message) skipped");
                                        continue;
                                    }
                                    _ => break,
                                };
                                if !ev.id.is_empty() {
                                    last_id = Some(ev.id.clone());
                                }
                                if let Some(r) = ev.retry {
                                    retry = r;
                                }
                                if let Some(message) = Message::parse_upstream(ev.data.as_bytes())
                                    && inbound
                                        .send(Inbound::Message {
                                            message,
                                            origin: None,
                                        })
                                        .await
                                        .is_err()
                                {
                                    return;
                                }
                            }
                        }
                        Ok(_) | Err(_) => failures += 1,
                    }
                    let wait = retry
                        .max(DEFAULT_RETRY)
                        .saturating_mul(1 << failures.min(5))
                        .min(Duration::from_secs(30));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
            .instrument(self.span.clone()),
        );
    }
}
