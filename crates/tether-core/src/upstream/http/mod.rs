//! A Streamable HTTP upstream: an MCP client session with one Streamable HTTP server.
//!
//! Used by the gateway (one upstream session per client session) and by `tether connect`.
//! One dispatcher task takes messages in order: `initialize` and
//! `notifications/initialized` are sent and answered before anything after them (the
//! spec's only ordering), and every other message goes at once on a task of its own (at
//! most [`MAX_IN_FLIGHT`]), so a call the server takes its time over holds up no other
//! request of the session, nor that call's cancel (issue 26: a JSON-response server's hung
//! call held the whole session until the upstream timeout). Answers come back as JSON or
//! SSE (read by [`super::sse`], each event bounded); a broken SSE answer is resumed with
//! GET + `Last-Event-ID` after the server's `retry`. A 404 for our session means the server
//! forgot it (it restarted): the link replays `initialize` with the client's params, then
//! the state the client had set up (log level, subscriptions), and retries once (spec
//! §1.1.7 item 4); requests that meet the 404 together share one re-initialization.
//!
//! Connection failures either end the link (the gateway: its supervisor restarts it) or,
//! with [`Reconnect`], are retried with backoff for a bounded outage (`tether connect`); a
//! request whose outcome became unknown (the connection died after it was sent) is answered with
//! an error saying so, never left hanging.
//!
//! Must not: buffer an answer without a bound, or retry a request whose outcome is unknown (it is answered with an error instead).

mod explain;
mod read;
mod session;

pub(super) use explain::{error_body, error_parts, not_jsonrpc_answer, status_answer};
pub use explain::{explain_error, explain_status};

use crate::error::Failure;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::Value;

use crate::wire::{EnvelopeError, Message};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::Inbound;
use super::sse::{self, SseItem};
use crate::policy::Backoff;
use crate::protocol::{self, code};

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
const LAST_EVENT_ID: &str = "last-event-id";
/// How often one broken response stream is resumed before the request is failed.
const MAX_RESUMES: u32 = 20;
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// Messages waiting for the dispatcher (only while the handshake is under way, or a burst
/// is being handed to tasks) before new ones are refused: a client that floods a slow
/// upstream must not grow the gateway.
const QUEUE: usize = 1024;
/// Requests in flight on one link at once (each its own POST and task); over it a
/// request is answered `-32016` at once.
pub const MAX_IN_FLIGHT: usize = 1024;

/// Retrying connection failures instead of ending the link.
#[derive(Debug, Clone, Copy)]
pub struct Reconnect {
    /// Wait between attempts (jittered, growing).
    pub backoff: Backoff,
    /// Longest outage a message waits through before it is answered with an error.
    pub max_outage: Duration,
    /// How long the first `initialize` waits for a server that was never reached before
    /// it is answered with an error naming the cause. A server that answered once is
    /// waited for through `max_outage` (a restart); one never reached is more likely a
    /// wrong URL, and the person starting the client should hear so at once.
    pub first_contact: Duration,
}

/// How an [`HttpLink`] talks to its server.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Headers sent with every request (for example `Authorization`).
    pub headers: HeaderMap,
    /// Retry connection failures (`tether connect`); `None` ends the link on the first one.
    pub reconnect: Option<Reconnect>,
    /// Time to wait for response headers; `None` waits as long as the connection lives.
    pub request_timeout: Option<Duration>,
    /// Largest message (JSON body or one SSE event) read from the server; a larger answer
    /// is reported as [`Inbound::Oversized`] for its request and not read further.
    pub max_message: usize,
    /// Names the link's tasks in logs and traces (`session` field of their `upstream`
    /// span): the session's short id, or `connect`.
    pub label: String,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            headers: HeaderMap::new(),
            reconnect: None,
            request_timeout: None,
            max_message: 16 << 20,
            label: String::new(),
        }
    }
}

/// A JSON body of at most `max` bytes; `Ok(Err(len))` when it is longer (not read further).
pub async fn read_limited(
    mut resp: reqwest::Response,
    max: usize,
) -> reqwest::Result<Result<bytes::Bytes, usize>> {
    if let Some(len) = resp.content_length().filter(|l| *l as usize > max) {
        return Ok(Err(len as usize));
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await? {
        if buf.len() + chunk.len() > max {
            return Ok(Err(buf.len() + chunk.len()));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Ok(buf.freeze()))
}

/// One session with a Streamable HTTP server.
pub struct HttpLink {
    inner: Arc<Inner>,
    outgoing: mpsc::Sender<Value>,
}

struct Inner {
    client: reqwest::Client,
    url: String,
    init_params: Value,
    opts: HttpOptions,
    session: Arc<Mutex<UpstreamSession>>,
    /// Requests that restore client-set state after a re-initialization.
    restore: std::sync::Mutex<Vec<(&'static str, Value)>>,
    inbound: mpsc::Sender<Inbound>,
    stop: CancellationToken,
    tracker: TaskTracker,
    next_internal: AtomicU64,
    /// Held while the link re-initializes a forgotten session (one at a time).
    reinit: Mutex<()>,
    closed: AtomicBool,
    /// Whether the server ever answered (any HTTP status).
    reached: AtomicBool,
    /// The span of every task of this link: a root, like a stdio child's, since the link
    /// outlives the request that started it.
    span: tracing::Span,
}

#[derive(Default, Clone)]
struct UpstreamSession {
    id: Option<String>,
    version: Option<String>,
}

/// Why a request could not be sent or answered.
enum SendError {
    /// No connection was made: nothing reached the server, retrying is safe. The flag says
    /// whether waiting may cure it (false: a TLS mismatch, an unknown host).
    Connect(String, bool),
    /// The connection failed after the request may have reached the server.
    Sent(String),
}

/// A server URL as it may be shown to a client: host, port and path, without credentials
/// or query.
pub(super) fn describe_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}{}{}",
            u.host_str().unwrap_or_default(),
            u.port().map(|p| format!(":{p}")).unwrap_or_default(),
            u.path()
        ),
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

/// Whether a 400's body blames the session id, as servers do that answer 400 where the
/// spec says 404 for a session they forgot (the official server-everything's
/// "Bad Request: No valid session ID provided").
fn names_the_session(body: &str) -> bool {
    body.to_ascii_lowercase().contains("session")
}

impl HttpLink {
    /// Creates the link and its dispatcher; nothing is sent until the first message
    /// (normally `initialize`).
    pub fn new(
        client: reqwest::Client,
        url: &str,
        init_params: Value,
        opts: HttpOptions,
        inbound: mpsc::Sender<Inbound>,
        tracker: TaskTracker,
    ) -> HttpLink {
        let opts_label = opts.label.clone();
        let inner = Arc::new(Inner {
            client,
            url: url.to_owned(),
            init_params,
            opts,
            session: Arc::new(Mutex::new(UpstreamSession::default())),
            restore: std::sync::Mutex::new(Vec::new()),
            inbound,
            stop: CancellationToken::new(),
            tracker,
            next_internal: AtomicU64::new(1),
            reinit: Mutex::new(()),
            closed: AtomicBool::new(false),
            reached: AtomicBool::new(false),
            span: tracing::info_span!(parent: None, "upstream", url = %url, session = %opts_label),
        });
        let (outgoing, mut rx) = mpsc::channel::<Value>(QUEUE);
        let dispatcher = inner.clone();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        inner.tracker.spawn(
            async move {
                loop {
                    let next = tokio::select! {
                        _ = dispatcher.stop.cancelled() => return,
                        v = rx.recv() => v,
                    };
                    let Some(value) = next else { return };
                    // Only the handshake is ordered before what follows (spec: the client
                    // sends nothing but pings before `initialize` is answered, and
                    // `notifications/initialized` comes first); everything else goes at
                    // once on its own task, so a call the server takes its time over (or
                    // never answers) holds up no other message of the session, its own
                    // `notifications/cancelled` included (issue 26).
                    if ordered(&value) {
                        tokio::select! {
                            _ = dispatcher.stop.cancelled() => return,
                            _ = dispatcher.dispatch(value) => {}
                        }
                        continue;
                    }
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        dispatcher.refuse(
                            &value,
                            "in-flight",
                            format!(
                                "{MAX_IN_FLIGHT} requests to the upstream are already in flight on this session; this one was refused, retry it later"
                            ),
                        );
                        continue;
                    };
                    let me = dispatcher.clone();
                    dispatcher.tracker.spawn(
                        async move {
                            let _permit = permit;
                            tokio::select! {
                                _ = me.stop.cancelled() => {}
                                _ = me.dispatch(value) => {}
                            }
                        }
                        .instrument(dispatcher.span.clone()),
                    );
                }
            }
            .instrument(inner.span.clone()),
        );
        HttpLink { inner, outgoing }
    }

    /// The server URL.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Queues one message; messages reach the server in the order they were queued. Never
    /// waits: over [`QUEUE`] messages waiting, a request is answered at once with
    /// `-32016` (`data.limit` = `upstream-queue`) and anything else is dropped and logged.
    pub fn send(&self, value: Value) {
        let value = match self.outgoing.try_send(value) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(v)) => v,
        };
        self.inner.refuse(
            &value,
            "upstream-queue",
            format!(
                "{QUEUE} messages are already waiting to be sent to the upstream; this request was refused, retry it later"
            ),
        );
    }

    /// Sets the requests replayed after a re-initialization (log level, subscriptions).
    pub fn set_restore(&self, requests: Vec<(&'static str, Value)>) {
        *self.inner.restore.lock().unwrap_or_else(|p| p.into_inner()) = requests;
    }

    /// Stops all traffic; with `end_session`, also DELETEs the server session.
    pub fn shutdown(&self, end_session: bool) {
        if self.inner.stop.is_cancelled() {
            return;
        }
        self.inner.stop.cancel();
        if end_session {
            let inner = self.inner.clone();
            self.inner.tracker.spawn(
                async move {
                    let s = inner.session.lock().await.clone();
                    if let Some(id) = s.id {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            inner
                                .client
                                .delete(&inner.url)
                                .headers(inner.opts.headers.clone())
                                .header(SESSION_HEADER, id)
                                .send(),
                        )
                        .await;
                    }
                }
                .instrument(self.inner.span.clone()),
            );
        }
    }
}

fn method_of(value: &Value) -> Option<&str> {
    value.get("method").and_then(Value::as_str)
}

/// The id of a request (not of a response).
fn request_id(value: &Value) -> Option<&Value> {
    value.get("method").and(value.get("id"))
}

/// Whether a message goes out before anything queued after it: the handshake.
fn ordered(value: &Value) -> bool {
    matches!(
        method_of(value),
        Some("initialize" | "notifications/initialized")
    )
}

impl Inner {
    /// A message that cannot be taken now (`limit`): a request is answered `-32016` at
    /// once, anything else dropped; logged a few times a second at most.
    fn refuse(&self, value: &Value, limit: &str, why: String) {
        static LOGGED: std::sync::LazyLock<crate::log_limit::LogLimiter> =
            std::sync::LazyLock::new(|| {
                crate::log_limit::LogLimiter::new(5, "messages refused by a full upstream link")
            });
        if LOGGED.admit() {
            tracing::warn!(url = %self.url, limit, method = method_of(value).unwrap_or("(response)"), "upstream link full: message refused");
        }
        if let Some(id) = request_id(value) {
            let err = Failure::at_bound(limit, why).response(id.clone());
            let _ = self.inbound.try_send(Inbound::Message {
                message: Message::ours(err),
                origin: None,
            });
        }
    }

    async fn dispatch(self: &Arc<Self>, value: Value) {
        let is_init = method_of(&value) == Some("initialize");
        let started = Instant::now();
        let mut attempt = 0u32;
        let mut reinitialized = false;
        loop {
            let used = self.session.lock().await.id.clone();
            let had_session = used.is_some();
            let first_contact = is_init && !self.reached.load(Ordering::Relaxed);
            let sent = self.open(&value).await;
            if sent.is_ok() {
                self.reached.store(true, Ordering::Relaxed);
            }
            let sent = match sent {
                // 400 where the spec says 404: forgotten only if the body blames the session.
                Ok(resp) if resp.status() == StatusCode::BAD_REQUEST && had_session && !is_init => {
                    let body = error_body(resp).await;
                    if names_the_session(&body) {
                        Err(StatusCode::BAD_REQUEST)
                    } else {
                        self.answer_status(&value, StatusCode::BAD_REQUEST, None, &body)
                            .await;
                        return;
                    }
                }
                Ok(resp) if resp.status() == StatusCode::NOT_FOUND && had_session && !is_init => {
                    Err(StatusCode::NOT_FOUND)
                }
                other => Ok(other),
            };
            let sent = match sent {
                Ok(sent) => sent,
                Err(status) => {
                    if reinitialized {
                        self.answer_error(
                            &value,
                            &format!(
                                "server answered {} again right after re-initialization",
                                status.as_u16()
                            ),
                        )
                        .await;
                        return;
                    }
                    // Requests in flight together meet the forgotten session together:
                    // one re-initializes, the others retry on the session it made.
                    let _one = self.reinit.lock().await;
                    if self.session.lock().await.id != used {
                        reinitialized = true;
                        continue;
                    }
                    tracing::info!(url = %self.url, status = status.as_u16(), "server forgot our session; re-initializing");
                    match self.reinitialize().await {
                        Ok(()) => reinitialized = true,
                        Err(SendError::Connect(cause, _) | SendError::Sent(cause)) => {
                            self.give_up(
                                &value,
                                &format!("re-initialization failed: {cause}"),
                                true,
                            )
                            .await;
                            return;
                        }
                    }
                    continue;
                }
            };
            match sent {
                Ok(resp) => {
                    self.read_response(resp, &value, is_init).await;
                    return;
                }
                Err(SendError::Connect(cause, curable)) => match self.opts.reconnect {
                    Some(rc)
                        if first_contact && (started.elapsed() >= rc.first_contact || !curable) =>
                    {
                        self.answer_error(
                            &value,
                            &format!(
                                "{cause} (the server was never reached; gave up on this first request after {})",
                                humantime::format_duration(started.elapsed().min(rc.first_contact))
                            ),
                        )
                        .await;
                        return;
                    }
                    Some(rc) if started.elapsed() < rc.max_outage => {
                        attempt += 1;
                        if attempt == 1 && !first_contact {
                            tracing::warn!(url = %self.url, "server unreachable ({cause}); retrying");
                        }
                        let wait = rc
                            .backoff
                            .delay(attempt + 1, rand::random_range(0.5..=1.0))
                            .max(Duration::from_millis(50));
                        tokio::time::sleep(wait).await;
                    }
                    Some(rc) => {
                        let why = format!(
                            "server unreachable for {}: {cause}",
                            humantime::format_duration(rc.max_outage)
                        );
                        self.answer_error(&value, &why).await;
                        return;
                    }
                    None => {
                        self.fail_link(cause).await;
                        return;
                    }
                },
                Err(SendError::Sent(cause)) => {
                    self.give_up(&value, &cause, false).await;
                    return;
                }
            }
        }
    }

    /// A failure after which this message cannot be completed. The gateway's link ends
    /// (its supervisor restarts it); `tether connect` answers the request and carries on.
    async fn give_up(&self, value: &Value, cause: &str, before_sending: bool) {
        if self.opts.reconnect.is_none() {
            self.fail_link(cause.to_owned()).await;
        } else if before_sending {
            self.answer_error(value, cause).await;
        } else {
            let why = format!(
                "the connection failed after the request was sent ({cause}); its outcome is unknown"
            );
            self.answer_error(value, &why).await;
        }
    }

    fn headers(&self, s: &UpstreamSession, accept: &'static str) -> HeaderMap {
        let mut h = self.opts.headers.clone();
        h.insert(ACCEPT, HeaderValue::from_static(accept));
        if let Some(id) = s.id.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            h.insert(SESSION_HEADER, id);
        }
        if let Some(v) = s
            .version
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            h.insert(VERSION_HEADER, v);
        }
        h
    }

    async fn open(&self, value: &Value) -> Result<reqwest::Response, SendError> {
        let session = self.session.lock().await.clone();
        let mut headers = self.headers(&session, "application/json, text/event-stream");
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // The trace context travels in `_meta` for every upstream; an HTTP one also gets
        // it where HTTP tooling (proxies, the server's own tracing) looks for it.
        for (name, v) in crate::telemetry::meta_headers(value) {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.insert(name, v);
            }
        }
        let send = self
            .client
            .post(&self.url)
            .headers(headers)
            .json(value)
            .send();
        self.await_response(send).await
    }

    async fn await_response(
        &self,
        send: impl Future<Output = reqwest::Result<reqwest::Response>>,
    ) -> Result<reqwest::Response, SendError> {
        let result = match self.opts.request_timeout {
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(SendError::Sent(format!(
                        "no response within {}",
                        humantime::format_duration(t)
                    )));
                }
            },
            None => send.await,
        };
        result.map_err(|e| {
            let (cause, curable) = explain_error(&e, &self.url);
            if e.is_connect() {
                // First contact gives up at once on what waiting will not cure.
                SendError::Connect(cause, curable)
            } else {
                SendError::Sent(cause)
            }
        })
    }

    /// Takes the session id from the answer to `initialize` (none: a stateless server).
    async fn adopt_session_id(&self, headers: &HeaderMap) {
        let id = headers
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.session.lock().await.id = id;
    }

    async fn fail_link(&self, cause: String) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            // Report first, then stop: this runs inside futures raced against `stop`, and a
            // send that yields after the cancel would be dropped, leaving the session
            // waiting for a `Closed` that never comes.
            let _ = self.inbound.send(Inbound::Closed(cause)).await;
            self.stop.cancel();
        }
    }
}

/// Whether a response is an SSE stream (content types are case-insensitive).
pub(super) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("text/event-stream"))
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests;
