//! A Streamable HTTP upstream: the gateway as an MCP client, one upstream session per
//! client session.
//!
//! Each message is one POST, sent from its own task so a slow call never blocks others.
//! Answers come back as JSON or as an SSE stream (resumed with `Last-Event-ID` after the
//! upstream's `retry` if it breaks before the response). A 404 for our upstream session
//! means the upstream forgot it (it restarted): the link replays `initialize` with the
//! client's stored params and retries the message once (spec §1.1.7 item 4). A connection
//! failure ends the link, and the session layer's supervisor decides when to reconnect.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use serde_json::Value;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Inbound;
use crate::protocol::{self, code};

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
const LAST_EVENT_ID: &str = "last-event-id";
/// How often a broken response stream is resumed before the request is failed.
const MAX_RESUMES: u32 = 5;
const DEFAULT_RETRY: Duration = Duration::from_secs(1);

/// One upstream session on a Streamable HTTP server.
pub struct HttpLink {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    url: String,
    init_params: Value,
    /// Upstream session id and negotiated version; replaced on re-initialization.
    session: Arc<Mutex<UpstreamSession>>,
    inbound: mpsc::Sender<Inbound>,
    stop: CancellationToken,
    tracker: TaskTracker,
    next_internal: AtomicU64,
    closed: AtomicBool,
}

#[derive(Default, Clone)]
struct UpstreamSession {
    id: Option<String>,
    version: Option<String>,
    /// Bumped on each re-initialization so concurrent 404s re-initialize only once.
    epoch: u64,
}

/// What one POST produced.
enum Outcome {
    Done,
    SessionGone,
    Failed(String),
}

impl HttpLink {
    /// Creates the link; nothing is sent until the first message (normally `initialize`).
    pub fn new(
        client: reqwest::Client,
        url: &str,
        init_params: Value,
        inbound: mpsc::Sender<Inbound>,
        tracker: TaskTracker,
    ) -> HttpLink {
        HttpLink {
            inner: Arc::new(Inner {
                client,
                url: url.to_owned(),
                init_params,
                session: Arc::new(Mutex::new(UpstreamSession::default())),
                inbound,
                stop: CancellationToken::new(),
                tracker,
                next_internal: AtomicU64::new(1),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// The upstream URL.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Posts one message from a task of its own.
    pub fn send(&self, value: Value) {
        let inner = self.inner.clone();
        self.inner.tracker.spawn(async move {
            tokio::select! {
                _ = inner.stop.cancelled() => {}
                _ = inner.clone().deliver(value) => {}
            }
        });
    }

    /// Stops all traffic; with `end_session`, also DELETEs the upstream session.
    pub fn shutdown(&self, end_session: bool) {
        if self.inner.stop.is_cancelled() {
            return;
        }
        self.inner.stop.cancel();
        if end_session {
            let inner = self.inner.clone();
            self.inner.tracker.spawn(async move {
                let s = inner.session.lock().await.clone();
                if let Some(id) = s.id {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        inner
                            .client
                            .delete(&inner.url)
                            .header(SESSION_HEADER, id)
                            .send(),
                    )
                    .await;
                }
            });
        }
    }
}

impl Inner {
    async fn deliver(self: Arc<Self>, value: Value) {
        let is_init = value.get("method").and_then(Value::as_str) == Some("initialize");
        let epoch = self.session.lock().await.epoch;
        match self.post(&value, true).await {
            Outcome::Done => {}
            Outcome::SessionGone if !is_init => {
                tracing::info!(url = %self.url, "upstream forgot our session (404); re-initializing");
                if let Err(cause) = self.reinitialize(epoch).await {
                    self.fail_link(format!("upstream re-initialization failed: {cause}"))
                        .await;
                    return;
                }
                match self.post(&value, true).await {
                    Outcome::Done => {}
                    Outcome::SessionGone => {
                        self.answer_error(
                            &value,
                            "upstream answered 404 again after re-initialization",
                        )
                        .await
                    }
                    Outcome::Failed(cause) => self.fail_link(cause).await,
                }
            }
            Outcome::SessionGone => {
                self.answer_error(&value, "upstream answered 404 to initialize")
                    .await
            }
            Outcome::Failed(cause) => self.fail_link(cause).await,
        }
    }

    fn headers(&self, s: &UpstreamSession) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            ACCEPT,
            "application/json, text/event-stream"
                .parse()
                .expect("static"),
        );
        h.insert(CONTENT_TYPE, "application/json".parse().expect("static"));
        if let Some(id) = s.id.as_deref().and_then(|v| v.parse().ok()) {
            h.insert(SESSION_HEADER, id);
        }
        if let Some(v) = s.version.as_deref().and_then(|v| v.parse().ok()) {
            h.insert(VERSION_HEADER, v);
        }
        h
    }

    /// POSTs a message and routes whatever comes back. With `route` unset (internal
    /// re-initialization), the answer is returned through `Inbound` only if it is not the
    /// answer to the internal request itself; see [`Inner::reinitialize`].
    async fn post(&self, value: &Value, route: bool) -> Outcome {
        let session = self.session.lock().await.clone();
        let is_init = value.get("method").and_then(Value::as_str) == Some("initialize");
        let req_id = value.get("method").and(value.get("id")).cloned();
        let origin = req_id.as_ref().and_then(Value::as_u64);
        let resp = match self
            .client
            .post(&self.url)
            .headers(self.headers(&session))
            .json(value)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Failed(format!(
                    "upstream HTTP request failed: {}",
                    error_chain(&e)
                ));
            }
        };
        let status = resp.status();
        if status == StatusCode::NOT_FOUND && session.id.is_some() {
            return Outcome::SessionGone;
        }
        if is_init && status.is_success() {
            let mut s = self.session.lock().await;
            s.id = resp
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
        if status == StatusCode::ACCEPTED {
            return Outcome::Done;
        }
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            if let Some(err) = serde_json::from_str::<Value>(&body)
                .ok()
                .filter(|v| v.get("error").is_some())
            {
                if let Some(id) = &req_id {
                    let mut err = err;
                    protocol::set_id(&mut err, id.clone());
                    self.emit(err, origin, route).await;
                    return Outcome::Done;
                }
            }
            let snippet: String = body.chars().take(200).collect();
            self.answer_error(
                value,
                &format!("upstream answered HTTP {status}: {snippet}"),
            )
            .await;
            return Outcome::Done;
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if content_type.starts_with("text/event-stream") {
            self.read_sse(resp, req_id.as_ref(), origin, route).await
        } else {
            match resp.bytes().await {
                Ok(bytes) if bytes.is_empty() => Outcome::Done,
                Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                    Ok(v) => {
                        if is_init {
                            self.note_version(&v).await;
                        }
                        self.emit(v, origin, route).await;
                        Outcome::Done
                    }
                    Err(e) => {
                        self.answer_error(value, &format!("upstream sent malformed JSON: {e}"))
                            .await;
                        Outcome::Done
                    }
                },
                Err(e) => Outcome::Failed(format!("upstream response failed: {}", error_chain(&e))),
            }
        }
    }

    async fn note_version(&self, response: &Value) {
        if let Some(v) = response
            .pointer("/result/protocolVersion")
            .and_then(Value::as_str)
        {
            self.session.lock().await.version = Some(v.to_owned());
        }
        let started = self.session.lock().await.id.is_some();
        if started {
            self.spawn_listen_stream();
        }
    }

    async fn emit(&self, value: Value, origin: Option<u64>, route: bool) {
        if route {
            let _ = self.inbound.send(Inbound::Message { value, origin }).await;
        }
    }

    /// Reads an SSE response, resuming it with GET + `Last-Event-ID` if it breaks before
    /// the response to `req_id` arrives.
    async fn read_sse(
        &self,
        resp: reqwest::Response,
        req_id: Option<&Value>,
        origin: Option<u64>,
        route: bool,
    ) -> Outcome {
        let is_request = req_id.is_some();
        let mut last_id: Option<String> = None;
        let mut retry = DEFAULT_RETRY;
        let mut resp = resp;
        let mut resumes = 0;
        loop {
            let mut events = resp.bytes_stream().eventsource();
            while let Some(ev) = events.next().await {
                let Ok(ev) = ev else { break };
                if !ev.id.is_empty() {
                    last_id = Some(ev.id.clone());
                }
                if let Some(r) = ev.retry {
                    retry = r;
                }
                if ev.data.trim().is_empty() {
                    continue;
                }
                let Ok(value) = serde_json::from_str::<Value>(&ev.data) else {
                    tracing::warn!(url = %self.url, "upstream SSE event is not JSON; ignored");
                    continue;
                };
                let answers = value.get("method").is_none()
                    && req_id.is_some_and(|id| value.get("id") == Some(id));
                if answers && value.pointer("/result/protocolVersion").is_some() {
                    self.note_version(&value).await;
                }
                self.emit(value, origin, route).await;
                if answers {
                    return Outcome::Done;
                }
            }
            if !is_request {
                return Outcome::Done;
            }
            let Some(last) = last_id.clone() else {
                return self
                    .stream_lost(
                        req_id,
                        "upstream closed the response stream before answering",
                    )
                    .await;
            };
            if resumes >= MAX_RESUMES {
                return self
                    .stream_lost(req_id, "upstream response stream broke repeatedly")
                    .await;
            }
            resumes += 1;
            tokio::time::sleep(retry).await;
            let session = self.session.lock().await.clone();
            let mut h = self.headers(&session);
            h.insert(ACCEPT, "text/event-stream".parse().expect("static"));
            h.remove(CONTENT_TYPE);
            match self
                .client
                .get(&self.url)
                .headers(h)
                .header(LAST_EVENT_ID, last)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => resp = r,
                Ok(r) if r.status() == StatusCode::NOT_FOUND => return Outcome::SessionGone,
                Ok(r) => {
                    return self
                        .stream_lost(
                            req_id,
                            &format!("upstream refused stream resumption: HTTP {}", r.status()),
                        )
                        .await;
                }
                Err(e) => {
                    return Outcome::Failed(format!(
                        "upstream HTTP request failed: {}",
                        error_chain(&e)
                    ));
                }
            }
        }
    }

    async fn stream_lost(&self, req_id: Option<&Value>, why: &str) -> Outcome {
        if let Some(id) = req_id {
            let err = protocol::error_response(id.clone(), code::UPSTREAM_LOST, why, None);
            let _ = self
                .inbound
                .send(Inbound::Message {
                    value: err,
                    origin: None,
                })
                .await;
        }
        Outcome::Done
    }

    /// Answers a request with an error built here (the upstream gave no usable answer).
    async fn answer_error(&self, value: &Value, why: &str) {
        tracing::warn!(url = %self.url, "{why}");
        if let (Some(id), Some(_)) = (value.get("id"), value.get("method")) {
            let err = protocol::error_response(id.clone(), code::UPSTREAM_LOST, why, None);
            let _ = self
                .inbound
                .send(Inbound::Message {
                    value: err,
                    origin: None,
                })
                .await;
        }
    }

    async fn fail_link(&self, cause: String) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.stop.cancel();
            let _ = self.inbound.send(Inbound::Closed(cause)).await;
        }
    }

    /// Replays `initialize` + `notifications/initialized` with the client's stored params,
    /// unless another task already did so since `seen_epoch`.
    async fn reinitialize(self: &Arc<Self>, seen_epoch: u64) -> Result<(), String> {
        let mut s = self.session.lock().await;
        if s.epoch != seen_epoch {
            return Ok(());
        }
        s.id = None;
        s.version = None;
        drop(s);
        let id = format!(
            "tether-reinit-{}",
            self.next_internal.fetch_add(1, Ordering::Relaxed)
        );
        let init = protocol::request(
            Value::from(id),
            "initialize",
            Some(self.init_params.clone()),
        );
        match self.post(&init, false).await {
            Outcome::Done => {}
            Outcome::SessionGone => return Err("404 to initialize".into()),
            Outcome::Failed(c) => return Err(c),
        }
        {
            let mut s = self.session.lock().await;
            if s.id.is_none() {
                return Err("upstream answered initialize without a session id".into());
            }
            s.epoch += 1;
        }
        let initialized = protocol::notification("notifications/initialized", None);
        match self.post(&initialized, false).await {
            Outcome::Done => Ok(()),
            Outcome::SessionGone => Err("404 to notifications/initialized".into()),
            Outcome::Failed(c) => Err(c),
        }
    }

    /// Opens the standalone GET stream for server-initiated messages and keeps it open
    /// (honouring `retry`) until the link stops or the upstream says it offers none (405).
    fn spawn_listen_stream(&self) {
        let client = self.client.clone();
        let url = self.url.clone();
        let stop = self.stop.clone();
        let inbound = self.inbound.clone();
        let this = self.session.clone();
        self.tracker.spawn(async move {
            let mut last_id: Option<String> = None;
            let mut retry = DEFAULT_RETRY;
            let mut failures = 0u32;
            loop {
                let s = this.lock().await.clone();
                let Some(sid) = s.id.clone() else { return };
                let mut req = client
                    .get(&url)
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
                    Ok(r) if r.status() == StatusCode::METHOD_NOT_ALLOWED => return,
                    Ok(r) if r.status() == StatusCode::NOT_FOUND => return,
                    Ok(r) if r.status().is_success() => {
                        failures = 0;
                        let mut events = r.bytes_stream().eventsource();
                        loop {
                            let ev = tokio::select! {
                                _ = stop.cancelled() => return,
                                ev = events.next() => ev,
                            };
                            let Some(Ok(ev)) = ev else { break };
                            if !ev.id.is_empty() {
                                last_id = Some(ev.id.clone());
                            }
                            if let Some(r) = ev.retry {
                                retry = r;
                            }
                            if let Ok(value) = serde_json::from_str::<Value>(&ev.data) {
                                if inbound
                                    .send(Inbound::Message {
                                        value,
                                        origin: None,
                                    })
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
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
        });
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
