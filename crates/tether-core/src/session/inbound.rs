//! Upstream → client: answers routed to the stream of their request, server-initiated
//! requests given `tether-N` ids and routed to the stream of the call that caused them,
//! notifications to their call's stream or the standalone one; stream resumption.
//!
//! The functions: `on_upstream_message` (answers by id and generation, server requests
//! get `tether-N` ids and the stream of the call that caused them, notifications), `emit`,
//! standalone stream, `resume`.
//!
//! Must not: deliver an answer from an older upstream generation to a newer call.

use super::*;

impl Session {
    pub(super) async fn on_upstream_message(
        self: &Arc<Self>,
        generation: u64,
        mut message: Message,
        origin: Option<u64>,
    ) {
        let has_id = message.id().is_some_and(|v| !v.is_null());
        match (message.method().is_some(), has_id) {
            (false, true) => {
                let Some(uid) = message.id().and_then(Value::as_u64) else {
                    tracing::debug!("upstream answered an id the gateway never sent; dropped");
                    return;
                };
                let pending = self.lock().calls.take(uid);
                let Some(p) = pending else {
                    tracing::debug!(
                        jsonrpc.id = uid,
                        "late upstream response (timed out or cancelled); dropped"
                    );
                    return;
                };
                if let PendingKind::Internal(_) = &p.kind {
                    if let PendingKind::Internal(tx) = p.kind {
                        let _ = tx.send(message.to_value());
                    }
                    return;
                }
                if p.method == Method::ToolsList
                    && let Some(mut result) = message.result_value()
                {
                    let safe: Vec<String> = protocol::safe_tools(&result).collect();
                    self.lock().safe_tools.extend(safe);
                    if self.gateway_owns_tasks()
                        && tasks::offer_tasks_in(&mut result)
                        && let Ok(rewritten) = Message::from_value(
                            json!({"jsonrpc": "2.0", "id": 0, "result": result}),
                        )
                    {
                        message = rewritten;
                    }
                }
                if let (Some(op), Some(_)) = (&p.restore, message.result()) {
                    self.remember(op);
                }
                self.finish(p, |client_id| {
                    message.set_id(client_id);
                    message
                });
            }
            (true, true) => self.route_server_request(generation, message, origin).await,
            (true, false) => {
                if self.to_listeners(&message) {
                    return;
                }
                let target = match message.method() {
                    Some(Method::Progress) => {
                        #[derive(serde::Deserialize)]
                        struct Progress {
                            #[serde(rename = "progressToken")]
                            token: Option<Value>,
                        }
                        let token = message
                            .params()
                            .and_then(|p| serde_json::from_str::<Progress>(p.get()).ok())
                            .and_then(|p| p.token)
                            .map(|t| t.to_string());
                        token.and_then(|t| self.lock().calls.stream_of_progress(&t))
                    }
                    Some(Method::Cancelled) => {
                        // The upstream cancels a request it sent the client: use our id for it.
                        let orig = message
                            .params_value()
                            .and_then(|p| p.get("requestId").cloned());
                        let ours = orig.and_then(|o| self.lock().calls.our_id_for(generation, &o));
                        let Some(k) = ours else { return };
                        message.edit_params(|p| {
                            p.insert("requestId".into(), Value::from(k));
                            true
                        });
                        self.pick_stream(origin)
                    }
                    _ => self.pick_stream(origin),
                };
                match target {
                    Some(stream) => {
                        self.emit(&stream, &message, false);
                    }
                    None => {
                        tracing::debug!(mcp.method = %crate::log_limit::cut(message.method_name().unwrap_or_default(), 64), "no client stream for an upstream notification; dropped")
                    }
                }
            }
            (false, false) => tracing::debug!(
                "upstream sent a message that is neither request, notification nor response"
            ),
        }
    }

    /// The stream for an upstream message that is not a response: the stream of the
    /// request it arrived for (HTTP tells us), else the standalone stream if a client is
    /// listening, else the newest request in flight (stdio cannot say which request a
    /// message belongs to; the newest is the one most likely waiting on it).
    pub(super) fn pick_stream(&self, origin: Option<u64>) -> Option<Arc<Stream>> {
        if self.transport == Transport::LegacySse {
            return Some(self.standalone.clone());
        }
        let st = self.lock();
        if let Some(s) = origin.and_then(|o| st.calls.stream_of(o)) {
            return Some(s);
        }
        // Unattributed (stdio), and the newest call is a task's: its runner takes it, so
        // the request is tagged with the task and the task shows `input_required`.
        if let Some(s) = st.calls.newest_stream()
            && st.task_streams.contains(s.id())
        {
            return Some(s);
        }
        if self.standalone.attached() {
            return Some(self.standalone.clone());
        }
        st.calls.newest_stream()
    }

    pub(super) async fn route_server_request(
        self: &Arc<Self>,
        generation: u64,
        mut message: Message,
        origin: Option<u64>,
    ) {
        let orig_id = message.id().cloned().unwrap_or(Value::Null);
        let Some(stream) = self.pick_stream(origin) else {
            let answer = if message.is(&Method::Ping) {
                Message::ours(json!({"jsonrpc": "2.0", "id": orig_id, "result": {}}))
            } else {
                Message::ours(protocol::error_response(
                    orig_id,
                    code::INTERNAL_ERROR,
                    format!(
                        "no client connection is open to deliver {}",
                        crate::log_limit::cut(message.method_name().unwrap_or_default(), 64)
                    ),
                    None,
                ))
            };
            if let Some((link, _)) = self.current_link() {
                link.send(answer).await;
            }
            return;
        };
        let ours = format!(
            "tether-{}",
            self.shared
                .next_server_request
                .fetch_add(1, Ordering::Relaxed)
        );
        self.lock()
            .calls
            .add_server_request(ours.clone(), generation, orig_id);
        message.set_id(Value::from(ours));
        self.emit(&stream, &message, false);
    }

    /// Sends a message on the session's single stream (2024-11-05 transport).
    pub fn deliver_standalone(&self, message: &Message) {
        self.emit(&self.standalone, message, false);
    }

    /// Pushes an event to a stream; a client that stopped reading is detached there
    /// (counted and logged), and resumes from the log when it reads again.
    pub(super) fn emit(&self, stream: &Stream, message: &Message, terminal: bool) {
        if stream.push(
            self.shared.store.as_ref(),
            message,
            terminal,
            Some(&self.writes),
        ) == Pushed::Overflowed
        {
            self.shared.metrics.stream_overflows.inc();
            tracing::warn!(
                stream = %stream.id(),
                limit = self.shared.cfg.stream_buffer,
                "client is not reading its stream: closed it at the buffer limit (--stream-buffer); its events stay resumable with Last-Event-ID"
            );
        }
    }

    /// Opens the standalone stream (GET without `Last-Event-ID`), replacing any previous
    /// connection to it.
    pub fn open_standalone(&self) -> StreamHandle {
        self.touch();
        let (rx, _) = self.standalone.attach(self.shared.cfg.stream_buffer);
        StreamHandle {
            stream_id: self.standalone.id().clone(),
            deferred: None,
            priming: policy::primes_streams(&self.record.protocol_version),
            retry: self.shared.cfg.sse_retry,
            replay: Vec::new(),
            live: Some(rx),
            ends_with_response: false,
            stop: self.shared.stopping.clone(),
        }
    }

    /// Resumes a stream after `last_event_id` (GET with `Last-Event-ID`): replays what the
    /// client missed from the log, then continues live if the stream has not ended.
    pub async fn resume(
        self: &Arc<Self>,
        last_event_id: &str,
    ) -> Result<StreamHandle, SessionError> {
        self.touch();
        let Some((stream_id, after)) = parse_event_id(last_event_id) else {
            return Err(SessionError::BadRequest(format!(
                "Last-Event-ID {last_event_id:?} is not an event id of this gateway"
            )));
        };
        let live_stream = if stream_id == STANDALONE_STREAM {
            Some(self.standalone.clone())
        } else {
            self.lock().calls.stream(stream_id)
        };
        let store = &self.shared.store;
        let handle = |replay, live, standalone: bool| StreamHandle {
            stream_id: stream_id.into(),
            deferred: None,
            priming: false,
            retry: self.shared.cfg.sse_retry,
            replay,
            live,
            ends_with_response: !standalone,
            stop: if standalone {
                self.shared.stopping.clone()
            } else {
                self.shared.stopped.clone()
            },
        };
        match live_stream {
            Some(stream) => {
                let (rx, boundary) = stream.attach(self.shared.cfg.stream_buffer);
                store.flush().await?;
                let mut replay = store.events_after(&self.id, stream_id, after).await?;
                replay.retain(|(seq, _)| *seq < boundary);
                Ok(handle(replay, Some(rx), stream_id == STANDALONE_STREAM))
            }
            None => {
                // Events pushed just before (an interrupted call's error at rehydration)
                // may still be in the writer's queue.
                store.flush().await?;
                if store.stream(&self.id, stream_id).await?.is_none() {
                    return Err(SessionError::BadRequest(format!(
                        "no stream {stream_id:?} in this session"
                    )));
                }
                let replay = store.events_after(&self.id, stream_id, after).await?;
                Ok(handle(replay, None, false))
            }
        }
    }
}
