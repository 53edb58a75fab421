//! Client → upstream: requests (ids rewritten, registered in flight with a deadline),
//! notifications (a cancelled request's id rewritten) and the client's answers to
//! server-initiated requests.
//!
//! The functions: `request` (its span, the tool-call quota, stream record, id rewrite,
//! per-call timer), `forward`, `on_timeout`, `notify` (a client's `notifications/cancelled`
//! finishes the call at once, recorded `cancelled`, and goes upstream with the upstream's
//! id), `respond` (answers to server requests).
//!
//! Must not: send a request into an upstream already declared dead.

use super::*;

impl Session {
    /// Handles a client request. Its span (a child of the caller's, which carries the
    /// client's trace context) lasts until the call is finished and records its outcome.
    pub async fn request(self: &Arc<Self>, env: Message) -> Reply {
        let span = tracing::info_span!(
            "request",
            session.id = %crate::ids::shown(&self.id),
            mcp.method = %crate::log_limit::cut(env.method_name().unwrap_or_default(), 64),
            mcp.tool = env.tool_name().map(|t| crate::log_limit::cut(&t, 64).into_owned()).as_deref(),
            mcp.outcome = tracing::field::Empty,
            jsonrpc.code = tracing::field::Empty,
        );
        // How MCP SDKs send a trace context: it names this request's trace (else the front
        // door's span, child of a `traceparent` header, does).
        if let Some(meta) = env.meta() {
            crate::telemetry::adopt_meta(&span, meta);
        }
        self.request_inner(env).instrument(span).await
    }

    /// Records how a request ended on its span.
    pub(super) fn record_outcome(span: &tracing::Span, response: &Message) {
        let (outcome, code) = protocol::call_outcome(response);
        span.record("mcp.outcome", outcome);
        if let Some(c) = code {
            span.record("jsonrpc.code", c);
        }
    }

    pub(super) async fn request_inner(self: &Arc<Self>, env: Message) -> Reply {
        self.touch();
        let client_id = env.id().cloned().unwrap_or(Value::Null);
        let method = env.method().cloned().unwrap_or(Method::Other("".into()));
        if method == Method::Initialize {
            return Reply::Immediate(Failure::new(
                FailureKind::InvalidRequest,
                "this session is already initialized; send initialize without MCP-Session-Id to start a new one",
                Retry::Never,
            ).response(client_id));
        }
        if self.is_task_request(&env) {
            return self.task_request(env).await;
        }
        let started = Instant::now();
        // Kept in the ledger and logged: cut like every client string.
        let tool = tool_of(&env);
        if method == Method::ToolsCall {
            let now = u64::try_from(crate::store::now_ms()).unwrap_or_default();
            if let Err(over) = self.shared.quotas.charge(&self.record.principal, now).await {
                let err = over.response(client_id);
                let msg = Message::ours(err.clone());
                self.record_call(tool.unwrap_or_default(), started.elapsed(), &msg);
                Session::record_outcome(&tracing::Span::current(), &msg);
                return Reply::Immediate(err);
            }
        }
        let (link, generation) = match self.ensure_upstream().await {
            Ok(x) => x,
            Err(failure) => {
                let err = failure.response(client_id);
                let msg = Message::ours(err.clone());
                // Refused before it reached the upstream (backoff, circuit, capacity): still
                // a call the client made, counted with that outcome.
                if method == Method::ToolsCall {
                    self.record_call(tool.unwrap_or_default(), started.elapsed(), &msg);
                }
                Session::record_outcome(&tracing::Span::current(), &msg);
                return Reply::Immediate(err);
            }
        };
        // Charged as it is sent (before `forward` registers the call whose end settles it).
        if method == Method::ResourcesSubscribe
            && let Some(RestoreOp::Subscribe(uri)) = RestoreOp::of_message(&env)
            && let Err(over) = self.reserve_subscription(&uri)
        {
            self.shared.metrics.refused(
                over.field("limit")
                    .and_then(Value::as_str)
                    .unwrap_or("max-subscriptions"),
            );
            let err = over.response(client_id);
            Session::record_outcome(&tracing::Span::current(), &Message::ours(err.clone()));
            return Reply::Immediate(err);
        }
        let retryable = SAFE_METHODS.contains(&method.as_str())
            || (method == Method::ToolsCall
                && tool
                    .as_ref()
                    .is_some_and(|t| self.lock().safe_tools.contains(t)));
        let (stream, deferred, live) = match self.transport {
            Transport::Streamable => {
                let record = StreamRecord {
                    session_id: self.id.to_string(),
                    stream_id: crate::ids::new_stream_id(),
                    client_request_id: Some(client_id.clone()),
                    request: if retryable {
                        None
                    } else {
                        // Enough to record an interrupted call with its tool after a crash,
                        // without keeping its arguments.
                        tool.as_ref()
                            .map(|t| json!({"method": "tools/call", "params": {"name": t}}))
                    },
                    retryable,
                    done: false,
                    last_seq: 0,
                    created_ms: now_ms(),
                };
                let stream = Arc::new(Stream::deferred(record, retryable.then(|| env.clone())));
                let (rx, _) = stream.attach(self.shared.cfg.stream_buffer);
                let deferred = Deferred {
                    stream: stream.clone(),
                    store: self.shared.store.clone(),
                    window: self.shared.cfg.answer_window,
                };
                (stream, Some(deferred), Some(rx))
            }
            Transport::Pooled => {
                let stream = Arc::new(Stream::new(
                    self.id.clone(),
                    crate::ids::new_stream_id().into(),
                    1,
                    false,
                ));
                let (rx, _) = stream.attach(self.shared.cfg.stream_buffer);
                (stream, None, Some(rx))
            }
            Transport::LegacySse => (self.standalone.clone(), None, None),
        };
        self.forward(&link, generation, env, client_id, stream.clone(), method)
            .await;
        match live {
            Some(rx) => Reply::Stream(StreamHandle {
                stream_id: stream.id().clone(),
                deferred,
                priming: self.transport == Transport::Streamable
                    && policy::primes_streams(&self.record.protocol_version),
                retry: self.shared.cfg.sse_retry,
                replay: Vec::new(),
                live: Some(rx),
                ends_with_response: true,
                stop: self.shared.stopped.clone(),
            }),
            None => Reply::Accepted,
        }
    }

    /// Rewrites a client request's id, registers it as pending on `stream`, arms its
    /// timeout, and sends it upstream.
    pub(super) async fn forward(
        self: &Arc<Self>,
        link: &Link,
        generation: u64,
        mut message: Message,
        client_id: Value,
        stream: Arc<Stream>,
        method: Method,
    ) {
        let uid = self.shared.next_upstream_id.fetch_add(1, Ordering::Relaxed);
        message.set_id(Value::from(uid));
        let upstream_span = tracing::info_span!(
            "upstream",
            upstream.name = %self.shared.cfg.upstream_name,
            upstream.generation = generation,
        );
        crate::telemetry::inject_meta(&upstream_span, &mut message);
        let mut token = message.progress_token();
        if self.transport == Transport::Pooled && token.is_some() {
            // Stateless clients share a pooled upstream: their progress tokens are theirs
            // alone, so each call gets one the gateway chose (the front door puts the
            // client's back on every notification).
            let ours = Value::from(format!("tether-{uid}"));
            message.edit_params(|p| {
                if let Some(meta) = p.get_mut("_meta").and_then(Value::as_object_mut) {
                    meta.insert("progressToken".into(), ours.clone());
                }
                true
            });
            token = Some(ours);
        }
        let token = token.map(|t| t.to_string());
        let pending = Pending {
            kind: PendingKind::Client {
                client_id,
                stream: stream.clone(),
                token: token.clone(),
            },
            restore: RestoreOp::of_message(&message),
            tool: tool_of(&message),
            generation,
            method,
            deadline: Some(Instant::now() + self.shared.cfg.upstream_timeout),
            started: Instant::now(),
            spans: Some((tracing::Span::current(), upstream_span)),
        };
        {
            let mut st = self.lock();
            // Checked under the lock `on_upstream_closed` takes: a request registered after
            // that upstream was declared dead would be sent into it and wait for nothing.
            let live =
                st.generation == generation && matches!(st.upstream, UpstreamSlot::Up { .. });
            if !live {
                drop(st);
                let lost = Failure::upstream_lost(
                    "the upstream went away before this request could be sent; the next request restarts it",
                    false,
                );
                self.finish(pending, |client_id| lost.reply(client_id));
                return;
            }
            let own_stream = (!Arc::ptr_eq(&stream, &self.standalone)).then_some(stream);
            st.calls.insert(uid, pending, own_stream);
        }
        self.armed();
        link.send(message).await;
    }

    /// Handles a client notification: forwarded upstream, with a cancelled request's id
    /// rewritten to the upstream's id for it. A cancelled call is finished here at once,
    /// recorded `cancelled` (the upstream owes no answer to a cancelled request, and the
    /// call must neither hold its stream until `--upstream-timeout` nor be counted as a
    /// timeout then); its stream ends with the `-32018` error, which a client that
    /// cancelled ignores.
    pub async fn notify(self: &Arc<Self>, env: Message) {
        self.touch();
        let mut value = env;
        if value.kind() == Kind::Notification && value.is(&Method::Cancelled) {
            let target = value
                .params_value()
                .and_then(|p| p.get("requestId").cloned());
            let taken = target.and_then(|t| {
                let mut st = self.lock();
                let uid = st.calls.upstream_id_of(&t)?;
                st.calls.take(uid).map(|p| (uid, p))
            });
            let Some((uid, pending)) = taken else { return };
            value.edit_params(|p| {
                p.insert("requestId".into(), Value::from(uid));
                true
            });
            let cancelled = Failure::new(
                FailureKind::Cancelled,
                "the client cancelled the request",
                Retry::Never,
            );
            self.finish(pending, |client_id| cancelled.reply(client_id));
        }
        match self.ensure_upstream().await {
            Ok((link, _)) => link.send(value).await,
            Err(_) => tracing::debug!("client notification dropped: upstream unavailable"),
        }
    }

    /// Handles a client response to a request the upstream sent.
    pub async fn respond(self: &Arc<Self>, env: Message) {
        self.touch();
        let mut value = env;
        let key = value.id().and_then(Value::as_str).map(str::to_owned);
        let entry = key.and_then(|k| self.lock().calls.take_server_request(&k));
        let Some((generation, orig)) = entry else {
            tracing::debug!(
                "client answered a request that is unknown or already answered; dropped"
            );
            return;
        };
        match self.current_link() {
            Some((link, g)) if g == generation => {
                value.set_id(orig);
                link.send(value).await;
            }
            _ => tracing::debug!("the upstream that asked is gone; client answer dropped"),
        }
    }
}

/// `params.name` of a `tools/call`, cut as every client string kept or logged.
pub(super) fn tool_of(message: &Message) -> Option<String> {
    message
        .tool_name()
        .map(|t| crate::log_limit::cut(&t, crate::log_limit::MAX_KEPT).into_owned())
}
