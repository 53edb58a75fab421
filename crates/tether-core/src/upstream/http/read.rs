//! Reading a server's answer to one request: a JSON body or an SSE stream (each event
//! bounded), a broken stream resumed with `Last-Event-ID`, the session id adopted from
//! `initialize`, and every way an answer can fail turned into an error for its caller.
//!
//! Must not: leave a request without an answer, or read an event past the message bound.

use super::*;

impl Inner {
    pub(super) async fn read_response(
        &self,
        resp: reqwest::Response,
        value: &Value,
        is_init: bool,
    ) {
        let status = resp.status();
        let req_id = request_id(value).cloned();
        let origin = req_id.as_ref().and_then(Value::as_u64);
        if is_init && status.is_success() {
            self.adopt_session_id(resp.headers()).await;
        }
        if status == StatusCode::ACCEPTED {
            return;
        }
        if is_init
            && self.opts.reconnect.is_some()
            && matches!(
                status,
                StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
            )
        {
            let _ = self
                .inbound
                .send(Inbound::NotStreamable(status.as_u16()))
                .await;
            return;
        }
        if !status.is_success() {
            let (challenge, body) = error_parts(resp).await;
            let challenge = challenge.filter(|_| is_init);
            self.answer_status(value, status, challenge.as_deref(), &body)
                .await;
            return;
        }
        let is_sse = is_event_stream(resp.headers());
        if is_sse {
            self.read_sse(resp, req_id.as_ref(), origin).await;
            return;
        }
        let max = self.opts.max_message;
        match read_limited(resp, max).await {
            Ok(Err(len)) => {
                let _ = self
                    .inbound
                    .send(Inbound::Oversized {
                        id: request_id(value).cloned(),
                        len,
                        limit: max,
                    })
                    .await;
            }
            Ok(Ok(bytes)) if bytes.is_empty() => {}
            Ok(Ok(bytes)) => match Message::parse(&bytes) {
                Ok(m) => {
                    if is_init {
                        self.note_initialized(&m.to_value()).await;
                    }
                    self.send_inbound(m, origin).await;
                }
                Err(e) => {
                    let what = match e {
                        EnvelopeError::Invalid(_) => "JSON".to_owned(),
                        EnvelopeError::Parse(e) => format!("malformed JSON ({e})"),
                    };
                    if let Some(id) = req_id {
                        let answer = not_jsonrpc_answer(&id, &self.url, status, &what);
                        tracing::warn!(url = %self.url, "{}", answer["error"]["message"].as_str().unwrap_or_default());
                        self.emit(answer, origin).await;
                    }
                }
            },
            Err(e) => {
                self.give_up(
                    value,
                    &format!("response failed: {}", error_chain(&e)),
                    false,
                )
                .await
            }
        }
    }

    /// Answers a request the server refused with an HTTP error: the server's own JSON-RPC
    /// error when it sent one, else a message saying what the status means.
    pub(super) async fn answer_status(
        &self,
        value: &Value,
        status: StatusCode,
        challenge: Option<&str>,
        body: &str,
    ) {
        let Some(id) = request_id(value).cloned() else {
            tracing::warn!(url = %self.url, status = status.as_u16(), "server refused a message that needs no answer");
            return;
        };
        let answer = status_answer(&id, &self.url, status, challenge, body);
        if answer.pointer("/error/data/http_status").is_some() {
            tracing::warn!(url = %self.url, status = status.as_u16(), "{}", answer["error"]["message"].as_str().unwrap_or_default());
        }
        self.emit(answer, id.as_u64()).await;
    }

    /// Records the negotiated version and opens the standalone stream.
    pub(super) async fn note_initialized(&self, response: &Value) {
        let started = {
            let mut s = self.session.lock().await;
            if let Some(v) = response
                .pointer("/result/protocolVersion")
                .and_then(Value::as_str)
            {
                s.version = Some(v.to_owned());
            }
            s.id.is_some()
        };
        if started {
            self.spawn_listen_stream();
        }
    }

    pub(super) async fn emit(&self, value: Value, origin: Option<u64>) {
        self.send_inbound(Message::ours(value), origin).await;
    }

    pub(super) async fn send_inbound(&self, message: Message, origin: Option<u64>) {
        let _ = self
            .inbound
            .send(Inbound::Message { message, origin })
            .await;
    }

    /// Reads an SSE answer, resuming it with GET + `Last-Event-ID` if it breaks before the
    /// response to `req_id` arrives.
    pub(super) async fn read_sse(
        &self,
        resp: reqwest::Response,
        req_id: Option<&Value>,
        origin: Option<u64>,
    ) {
        let mut last_id: Option<String> = None;
        let mut retry = DEFAULT_RETRY;
        let mut resp = resp;
        let mut resumes = 0;
        loop {
            let mut events = sse::events(resp, self.opts.max_message);
            let mut too_large = None;
            while let Some(Ok(item)) = events.next().await {
                let ev = match item {
                    SseItem::Event(ev) => ev,
                    SseItem::TooLarge { len } => {
                        too_large = Some(len);
                        break;
                    }
                };
                if !ev.id.is_empty() {
                    last_id = Some(ev.id.clone());
                }
                if let Some(r) = ev.retry {
                    retry = r;
                }
                if ev.data.trim().is_empty() {
                    continue;
                }
                let Ok(message) = Message::parse(ev.data.as_bytes()) else {
                    tracing::warn!(url = %self.url, "server SSE event is not a JSON-RPC message; ignored");
                    continue;
                };
                let answers =
                    message.method().is_none() && req_id.is_some_and(|id| message.id() == Some(id));
                // Only an `initialize` answer names a protocol version; the text is looked
                // at before any tree is built of it.
                if answers
                    && message
                        .result()
                        .is_some_and(|r| r.get().contains("\"protocolVersion\""))
                {
                    let value = message.to_value();
                    if value.pointer("/result/protocolVersion").is_some() {
                        self.note_initialized(&value).await;
                    }
                }
                self.send_inbound(message, origin).await;
                if answers {
                    return;
                }
            }
            let Some(id) = req_id else { return };
            if let Some(len) = too_large {
                // At once, the rest unread (the connection is dropped with the stream):
                // resuming would only fetch the same event again.
                let _ = self
                    .inbound
                    .send(Inbound::Oversized {
                        id: Some(id.clone()),
                        len,
                        limit: self.opts.max_message,
                    })
                    .await;
                return;
            }
            let Some(last) = last_id.clone() else {
                self.lost(id, "the server closed the response stream before answering, and it cannot be resumed").await;
                return;
            };
            match self.resume(&last, retry, &mut resumes).await {
                Ok(r) => resp = r,
                Err(why) => {
                    self.lost(id, &why).await;
                    return;
                }
            }
        }
    }

    /// Reopens a response stream after `retry`, through outages when reconnecting.
    pub(super) async fn resume(
        &self,
        last: &str,
        retry: Duration,
        resumes: &mut u32,
    ) -> Result<reqwest::Response, String> {
        let started = Instant::now();
        loop {
            *resumes += 1;
            if *resumes > MAX_RESUMES {
                return Err(
                    "the server's response stream broke too often; its outcome is unknown".into(),
                );
            }
            tokio::time::sleep(retry).await;
            let session = self.session.lock().await.clone();
            let send = self
                .client
                .get(&self.url)
                .headers(self.headers(&session, "text/event-stream"))
                .header(LAST_EVENT_ID, last)
                .send();
            match self.await_response(send).await {
                Ok(r) if r.status().is_success() => return Ok(r),
                Ok(r) => {
                    return Err(format!(
                        "the server refused to resume the response stream (HTTP {}); the outcome is unknown",
                        r.status()
                    ));
                }
                Err(SendError::Connect(cause, _) | SendError::Sent(cause)) => {
                    match self.opts.reconnect {
                        Some(rc) if started.elapsed() < rc.max_outage => {
                            // Gateway restarting: keep trying within the outage budget.
                            *resumes -= 1;
                            let wait = rc.backoff.delay(3, rand::random_range(0.5..=1.0));
                            tokio::time::sleep(wait.saturating_sub(retry)).await;
                        }
                        Some(_) => {
                            return Err(format!(
                                "the server stayed unreachable ({cause}); the outcome is unknown"
                            ));
                        }
                        None => {
                            self.fail_link(cause).await;
                            return Err("upstream connection lost".into());
                        }
                    }
                }
            }
        }
    }

    pub(super) async fn lost(&self, id: &Value, why: &str) {
        let err = crate::error::Failure::upstream_lost(why, true).response(id.clone());
        let _ = self
            .inbound
            .send(Inbound::Message {
                message: Message::ours(err),
                origin: None,
            })
            .await;
    }

    /// Answers a request with an error built here (the server gave no usable answer).
    pub(super) async fn answer_error(&self, value: &Value, why: &str) {
        tracing::warn!(url = %self.url, "{why}");
        if let Some(id) = request_id(value) {
            self.lost(id, why).await;
        }
    }
}
