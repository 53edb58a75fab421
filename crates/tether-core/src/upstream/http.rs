//! A Streamable HTTP upstream: an MCP client session with one Streamable HTTP server.
//!
//! Used by the gateway (one upstream session per client session) and by the stdio bridge
//! (`tether connect`). One dispatcher task takes messages in order: `initialize` and
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
//! with [`Reconnect`], are retried with backoff for a bounded outage (the bridge); a request
//! whose outcome became unknown (the connection died after it was sent) is answered with
//! an error saying so, never left hanging.
//!
//! Must not: buffer an answer without a bound, or retry a request whose outcome is unknown (it is answered with an error instead).

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
    /// Retry connection failures (the bridge); `None` ends the link on the first one.
    pub reconnect: Option<Reconnect>,
    /// Time to wait for response headers; `None` waits as long as the connection lives.
    pub request_timeout: Option<Duration>,
    /// Largest message (JSON body or one SSE event) read from the server; a larger answer
    /// is reported as [`Inbound::Oversized`] for its request and not read further.
    pub max_message: usize,
    /// Names the link's tasks in logs and traces (`session` field of their `upstream`
    /// span): the session's short id, or `bridge`.
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

/// A request failure in words a person can act on, and whether waiting may cure it (a
/// refused connection may be a restart; a TLS mismatch or a bad name will not fix itself).
pub fn explain_error(e: &reqwest::Error, url: &str) -> (String, bool) {
    let chain = error_chain(e);
    let lower = chain.to_ascii_lowercase();
    let host = reqwest::Url::parse(url)
        .ok()
        .map(|u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or(""),
                u.port_or_known_default().unwrap_or(0)
            )
        })
        .unwrap_or_default();
    if e.is_timeout() {
        (format!("no answer from {url} in time ({chain})"), true)
    } else if lower.contains("invalidcontenttype") || lower.contains("corrupt message") {
        (
            format!(
                "TLS failed: {host} answered in plain HTTP, not TLS. The URL says https:// but the server speaks http://; use http:// (or put TLS in front of it)"
            ),
            false,
        )
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        (
            format!(
                "TLS failed with {host}: {chain}. If the server uses a private CA, pass --ca-file."
            ),
            false,
        )
    } else if e.is_connect() && lower.contains("refused") {
        (
            format!(
                "connection refused: nothing is listening at {host} ({url}). Is the server running, on this port?"
            ),
            true,
        )
    } else if e.is_connect() && (lower.contains("dns") || lower.contains("resolve")) {
        (format!("cannot resolve the host of {url}: {chain}"), false)
    } else if e.is_connect() {
        (format!("cannot connect to {url}: {chain}"), true)
    } else {
        (format!("HTTP request to {url} failed: {chain}"), true)
    }
}

/// What an HTTP status on `initialize` says about the URL, for the statuses whose meaning
/// is clear: credentials wanted, or nothing serving MCP at that path.
pub fn explain_status(status: StatusCode, www_authenticate: Option<&str>) -> Option<String> {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Some(format!(
            "the server requires authentication (HTTP {}{}). Pass a key: --header 'Authorization: Bearer KEY', --bearer-env VAR or TETHER_HEADERS.",
            status.as_u16(),
            www_authenticate
                .filter(|c| !c.is_empty())
                .map(|c| format!(", WWW-Authenticate: {c}"))
                .unwrap_or_default()
        )),
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::BAD_REQUEST => {
            Some(format!(
                "the server answered HTTP {} to initialize: wrong path (MCP endpoints are usually /mcp), or a \
             2024-11-05 HTTP+SSE server (its endpoint is usually /sse; `tether connect` falls back to it)",
                status.as_u16()
            ))
        }
        _ => None,
    }
}

/// The body of an error answer, as text, at most 64 KiB (it is only read for a message).
pub(super) async fn error_body(resp: reqwest::Response) -> String {
    read_limited(resp, 64 << 10)
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The answer to request `id` that an HTTP error `status` from the server at `url` stands
/// for: the server's own JSON-RPC error when its `body` is one (with our id), else an error
/// of ours naming the upstream and the status (`data.http_status`), never the body relayed
/// as if it were JSON-RPC (issue 26: `400 {"error":"bad"}` reached clients as
/// `{"error":"bad","id":5}`).
pub(super) fn status_answer(
    id: &Value,
    url: &str,
    status: StatusCode,
    challenge: Option<&str>,
    body: &str,
) -> Value {
    if let Ok(mut err) = serde_json::from_str::<Value>(body)
        && err.get("error").is_some()
        && protocol::is_message(&err)
    {
        protocol::set_id(&mut err, id.clone());
        return err;
    }
    let why = explain_status(status, challenge)
        .filter(|_| matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN))
        .unwrap_or_else(|| {
            format!(
                "upstream {} answered HTTP {status}: {}",
                describe_url(url),
                crate::log_limit::cut(body, 200)
            )
        });
    protocol::error_response(
        id.clone(),
        code::UPSTREAM_LOST,
        why,
        Some(serde_json::json!({
            "kind": "upstream_http_error",
            "origin": "upstream",
            "http_status": status.as_u16(),
            "upstream": describe_url(url),
        })),
    )
}

/// The answer to request `id` when the server at `url` sent a body (`status`) that is not
/// a JSON-RPC message: an error of ours naming the upstream and the status.
pub(super) fn not_jsonrpc_answer(id: &Value, url: &str, status: StatusCode, what: &str) -> Value {
    protocol::error_response(
        id.clone(),
        code::UPSTREAM_LOST,
        format!(
            "upstream {} answered HTTP {status} with {what}, not a JSON-RPC message",
            describe_url(url)
        ),
        Some(serde_json::json!({
            "kind": "upstream_not_jsonrpc",
            "origin": "upstream",
            "http_status": status.as_u16(),
            "upstream": describe_url(url),
        })),
    )
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
            let err = protocol::error_response(
                id.clone(),
                code::LIMIT_REACHED,
                why,
                Some(serde_json::json!({"limit": limit})),
            );
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
    /// (its supervisor restarts it); the bridge answers the request and carries on.
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

    async fn read_response(&self, resp: reqwest::Response, value: &Value, is_init: bool) {
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
            let challenge = resp
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = error_body(resp).await;
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
    async fn answer_status(
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
    async fn note_initialized(&self, response: &Value) {
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

    async fn emit(&self, value: Value, origin: Option<u64>) {
        self.send_inbound(Message::ours(value), origin).await;
    }

    async fn send_inbound(&self, message: Message, origin: Option<u64>) {
        let _ = self
            .inbound
            .send(Inbound::Message { message, origin })
            .await;
    }

    /// Reads an SSE answer, resuming it with GET + `Last-Event-ID` if it breaks before the
    /// response to `req_id` arrives.
    async fn read_sse(&self, resp: reqwest::Response, req_id: Option<&Value>, origin: Option<u64>) {
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
    async fn resume(
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

    async fn lost(&self, id: &Value, why: &str) {
        let err = protocol::error_response(id.clone(), code::UPSTREAM_LOST, why, None);
        let _ = self
            .inbound
            .send(Inbound::Message {
                message: Message::ours(err),
                origin: None,
            })
            .await;
    }

    /// Answers a request with an error built here (the server gave no usable answer).
    async fn answer_error(&self, value: &Value, why: &str) {
        tracing::warn!(url = %self.url, "{why}");
        if let Some(id) = request_id(value) {
            self.lost(id, why).await;
        }
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

    /// Sends a message of the link's own and returns the answer to it, if any. Nothing
    /// else the server says on that exchange is forwarded.
    async fn internal(&self, value: &Value) -> Result<Option<Value>, SendError> {
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

    fn internal_id(&self) -> Value {
        Value::from(format!(
            "tether-internal-{}",
            self.next_internal.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Replays `initialize`, `notifications/initialized` and the restore requests with the
    /// client's stored params, as a fresh session.
    async fn reinitialize(&self) -> Result<(), SendError> {
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
    fn spawn_listen_stream(&self) {
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
mod tests {
    use super::*;
    use serde_json::json;

    /// A link to `url` with default options, its inbound channel of `capacity` and the
    /// tracker owning its tasks.
    fn link_to(url: &str, capacity: usize) -> (HttpLink, mpsc::Receiver<Inbound>, TaskTracker) {
        let (tx, rx) = mpsc::channel(capacity);
        let tracker = TaskTracker::new();
        let link = HttpLink::new(
            reqwest::Client::new(),
            url,
            json!({}),
            HttpOptions::default(),
            tx,
            tracker.clone(),
        );
        (link, rx, tracker)
    }

    /// Messages a link has not sent yet, and requests it has in flight, are bounded: over
    /// either bound a request is answered `-32016` at once naming it.
    #[tokio::test]
    async fn the_queue_and_the_requests_in_flight_are_bounded() {
        // A server that takes connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        let (link, mut rx, tracker) = link_to(&url, QUEUE * 4);
        let refused = |rx: &mut mpsc::Receiver<Inbound>, limit: &str| {
            let mut ids = Vec::new();
            while let Ok(Inbound::Message { message, .. }) = rx.try_recv() {
                let value = message.to_value();
                assert_eq!(
                    value.pointer("/error/code"),
                    Some(&json!(code::LIMIT_REACHED))
                );
                assert_eq!(value.pointer("/error/data/limit"), Some(&json!(limit)));
                ids.push(value["id"].as_u64().unwrap());
            }
            ids
        };
        // Sent faster than the dispatcher runs (it has not run yet): the queue's bound.
        for id in 0..QUEUE as u64 + 3 {
            link.send(protocol::request(Value::from(id), "tools/list", None));
        }
        link.send(protocol::notification("notifications/progress", None));
        let over = QUEUE as u64;
        assert_eq!(
            refused(&mut rx, "upstream-queue"),
            [over, over + 1, over + 2]
        );
        // The dispatcher hands them all to requests in flight, none answered: the next
        // ones are over that bound (however long a loaded machine takes to get there).
        tokio::time::sleep(Duration::from_millis(300)).await;
        for id in 0..3u64 {
            link.send(protocol::request(
                Value::from(10_000 + id),
                "tools/list",
                None,
            ));
        }
        let mut over = Vec::new();
        for _ in 0..200 {
            over.extend(refused(&mut rx, "in-flight"));
            if over.len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            over,
            [10_000, 10_001, 10_002],
            "exactly the ones over the bound"
        );
        link.shutdown(false);
        tracker.close();
        held.abort();
    }

    /// Issue 26: a server that answers one JSON body per request once the work is done held
    /// every later request of the session behind a slow call (the link waited for each
    /// POST's answer before sending the next): a ping, a list, the call's own cancel. Now
    /// only the handshake is ordered; the rest go at once.
    #[tokio::test]
    async fn a_slow_call_holds_up_no_other_message() {
        let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().route(
            "/mcp",
            axum::routing::post(move |body: axum::Json<Value>| {
                let log = log.clone();
                async move {
                    let method = body["method"].as_str().unwrap_or("").to_owned();
                    log.lock().unwrap().push(method.clone());
                    let headers = [("mcp-session-id", "s1"), ("content-type", "application/json")];
                    match method.as_str() {
                        "tools/call" => {
                            // The work that never ends.
                            std::future::pending::<()>().await;
                            unreachable!()
                        }
                        m if m.starts_with("notifications/") => {
                            axum::http::StatusCode::ACCEPTED.into_response()
                        }
                        _ => (
                            headers,
                            json!({"jsonrpc": "2.0", "id": body["id"], "result": {"protocolVersion": "2025-11-25"}})
                                .to_string(),
                        )
                            .into_response(),
                    }
                }
            }),
        );
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let (link, mut rx, tracker) = link_to(&url, 64);
        link.send(protocol::request(
            Value::from(1),
            "initialize",
            Some(json!({})),
        ));
        link.send(protocol::notification("notifications/initialized", None));
        link.send(protocol::request(
            Value::from(2),
            "tools/call",
            Some(json!({"name": "slow"})),
        ));
        link.send(protocol::request(Value::from(3), "ping", None));
        link.send(protocol::notification(
            "notifications/cancelled",
            Some(json!({"requestId": 2})),
        ));
        link.send(protocol::request(Value::from(4), "tools/list", None));
        let mut answered = Vec::new();
        while answered.len() < 3 {
            let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("answers come while the call hangs")
                .expect("the link lives");
            if let Inbound::Message { message, .. } = m
                && let Some(id) = message.id().and_then(Value::as_u64)
            {
                answered.push(id);
            }
        }
        answered.sort_unstable();
        assert_eq!(answered, [1, 3, 4]);
        let cancelled = || {
            seen.lock()
                .unwrap()
                .iter()
                .any(|m| m == "notifications/cancelled")
        };
        for _ in 0..100 {
            if cancelled() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            cancelled(),
            "the cancel reached the server: {:?}",
            seen.lock().unwrap()
        );
        let order = seen.lock().unwrap().clone();
        assert_eq!(order[..2], ["initialize", "notifications/initialized"]);
        link.shutdown(false);
        tracker.close();
        server.abort();
    }
}
