//! A Streamable HTTP upstream that speaks 2026-07-28: the session layer sees an ordinary
//! legacy link, and this link makes every request self-contained for a stateless server.
//!
//! `initialize` becomes `server/discover` (its result turned into an `InitializeResult`);
//! every other request gets the client's `_meta` (from its stored `initialize`: client
//! info and capabilities, plus the log level it set) and the modern headers, and is one
//! POST of its own (no session, no order between requests). `logging/setLevel`,
//! `resources/subscribe`/`unsubscribe` and `ping` are answered here: the level travels on
//! each request, subscriptions on a `subscriptions/listen` stream the link keeps open
//! (with the list-changed kinds the server offers), and its notifications come in like a
//! legacy server's. An `InputRequiredResult` (MRTR) becomes the server requests it holds,
//! sent to the client on the call's stream; their answers go back in a retry with a new id
//! and the upstream's `requestState`, until the call completes. A `notifications/cancelled`
//! closes the request's response stream, which cancels it upstream (spec §1.2).
//!
//! Like the legacy HTTP link of a gateway session, a transport failure ends the link
//! ([`Inbound::Closed`]); the session's supervisor starts another, which is a new discover.
//!
//! Must not: keep a request without a bound (at most [`MAX_IN_FLIGHT`] POSTs at once,
//! [`MAX_ROUNDS`] input rounds per call of at most [`MAX_ASKS_PER_ROUND`] requests each),
//! or retry a request whose outcome is unknown.

mod answer;
mod listen;

use crate::error::Failure;
pub use answer::probe;
use answer::{headers_for, id_text, read_answer};

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::Inbound;
use super::http::{
    HttpOptions, error_body, error_chain, error_parts, explain_error, is_event_stream,
    not_jsonrpc_answer, read_limited, status_answer,
};
use super::sse::{self, SseItem};
use crate::modern;
use crate::protocol::{self, code};

/// POSTs in flight at once on one link; over it a request is answered `-32016` at once.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Input rounds (`InputRequiredResult`s) one call may take before it is failed: a server
/// that keeps asking must not hold the call, and the client, forever.
pub const MAX_ROUNDS: u32 = 10;
/// Input requests one `InputRequiredResult` may hold: each waits for the client in a table
/// of this link, so a server's one answer must not fill it.
pub const MAX_ASKS_PER_ROUND: usize = 64;
/// Resources one session may subscribe to through the link (they all travel in the
/// `subscriptions/listen` request).
pub const MAX_SUBSCRIPTIONS: usize = 1000;
/// Longest wait between attempts to reopen a broken listen stream.
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One legacy client session's view of a stateless 2026-07-28 server.
pub struct ModernLink {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    url: String,
    opts: HttpOptions,
    inbound: mpsc::Sender<Inbound>,
    stop: CancellationToken,
    tracker: TaskTracker,
    span: tracing::Span,
    closed: AtomicBool,
    in_flight: Arc<Semaphore>,
    next: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    client: modern::Upstream,
    /// The capabilities of the server's discover result.
    server_capabilities: Value,
    /// Resources the client subscribed to.
    subscriptions: BTreeSet<String>,
    /// Calls in flight by the session's id: closing one's token closes its stream.
    calls: HashMap<u64, CancellationToken>,
    /// Input requests sent to the client (by the id they were sent with), waiting for
    /// its answer.
    asks: HashMap<String, oneshot::Sender<Value>>,
    /// The running listen stream.
    listen: Option<CancellationToken>,
    /// The `x-mcp-header` declarations of the server's tools (SEP-2243), by tool name,
    /// learnt from the `tools/list` answers that pass and, before the first call, fetched.
    tool_headers: HashMap<String, modern::ParamHeaders>,
    /// Whether `tool_headers` has been filled from a whole `tools/list` yet.
    tools_known: bool,
}

/// Pages of `tools/list` the link reads to learn the tools' header declarations.
const MAX_TOOL_PAGES: usize = 20;

/// What became of one POST.
enum Answer {
    /// The server's answer to it.
    Final(Value),
    /// It cannot be answered; the string says why (`-32011` to the client).
    Lost(String),
    /// The answer was over the size limit and has been reported as [`Inbound::Oversized`].
    Reported,
    /// The connection failed: the link ends.
    Failed(String),
}

/// A request refused at one of the link's bounds (`-32016`, `data.limit` names it); it
/// never reached the server.
fn over_limit(id: Value, limit: &str, message: String) -> Value {
    Failure::at_bound(limit, message).response(id)
}

/// The answer for request `id` when the server's answer cannot be had (`-32011`): it was
/// sent, so it may have run.
fn lost(id: Value, why: &str) -> Value {
    Failure::upstream_lost(why, true).response(id)
}

impl ModernLink {
    /// Creates the link; nothing is sent until the first message (normally `initialize`).
    pub fn new(
        client: reqwest::Client,
        url: &str,
        opts: HttpOptions,
        inbound: mpsc::Sender<Inbound>,
        tracker: TaskTracker,
    ) -> ModernLink {
        let span = tracing::info_span!(parent: None, "upstream", url = %url, session = %opts.label, era = "2026-07-28");
        ModernLink {
            inner: Arc::new(Inner {
                client,
                url: url.to_owned(),
                opts,
                inbound,
                stop: CancellationToken::new(),
                tracker,
                span,
                closed: AtomicBool::new(false),
                in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
                next: AtomicU64::new(1),
                state: Mutex::default(),
            }),
        }
    }

    /// The server URL.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Takes one message from the session. Never waits: requests run on tasks of their
    /// own, answered on the inbound channel.
    pub fn send(&self, value: Value) {
        let inner = &self.inner;
        if inner.stop.is_cancelled() {
            return;
        }
        let method = value
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let id = value.get("id").filter(|v| !v.is_null()).cloned();
        match (method.as_deref(), id) {
            (None, Some(id)) => {
                // The client's answer to an input request.
                let waiting = id.as_str().and_then(|k| inner.lock().asks.remove(k));
                match waiting {
                    Some(tx) => {
                        let _ = tx.send(value);
                    }
                    None => tracing::debug!("answer to an input request nobody waits for; dropped"),
                }
            }
            (Some("notifications/cancelled"), None) => {
                let id = value.pointer("/params/requestId").and_then(Value::as_u64);
                if let Some(token) = id.and_then(|i| inner.lock().calls.get(&i).cloned()) {
                    token.cancel();
                }
            }
            // `notifications/initialized`, `roots/list_changed`: a stateless server has no
            // use for them (roots are asked for per request).
            (Some(_), None) => {}
            (Some("initialize"), Some(id)) => inner.spawn(inner.clone().initialize(value, id)),
            (Some("ping"), Some(id)) => inner.answer(id, json!({})),
            (Some("logging/setLevel"), Some(id)) => {
                let level = value.pointer("/params/level").and_then(Value::as_str);
                inner.lock().client.log_level = level.map(str::to_owned);
                inner.answer(id, json!({}));
            }
            (Some(m @ ("resources/subscribe" | "resources/unsubscribe")), Some(id)) => {
                let uri = value.pointer("/params/uri").and_then(Value::as_str);
                let full = {
                    let mut st = inner.lock();
                    match uri {
                        Some(u) if m == "resources/subscribe" => {
                            if st.subscriptions.len() >= MAX_SUBSCRIPTIONS
                                && !st.subscriptions.contains(u)
                            {
                                true
                            } else {
                                st.subscriptions.insert(u.to_owned());
                                false
                            }
                        }
                        Some(u) => {
                            st.subscriptions.remove(u);
                            false
                        }
                        None => false,
                    }
                };
                if full {
                    inner.emit_soon(over_limit(
                        id,
                        "subscriptions",
                        format!("this session is subscribed to {MAX_SUBSCRIPTIONS} resources, the most a 2026-07-28 upstream's listen stream carries; unsubscribe from one first"),
                    ));
                    return;
                }
                inner.listen();
                inner.answer(id, json!({}));
            }
            (Some(_), Some(id)) => match inner.in_flight.clone().try_acquire_owned() {
                Ok(permit) => {
                    let me = inner.clone();
                    inner.spawn(async move {
                        me.call(value, id).await;
                        drop(permit);
                    });
                }
                Err(_) => inner.emit_soon(over_limit(
                    id,
                    "upstream-queue",
                    format!("{MAX_IN_FLIGHT} requests are already in flight to the upstream; this one was refused, retry it later"),
                )),
            },
            (None, None) => {}
        }
    }

    /// Stops all traffic: every open request stream is closed (which cancels it upstream).
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }
}

/// Ends a call's entry in the cancel table however the call ends.
struct CallEntry<'a> {
    inner: &'a Inner,
    id: Option<u64>,
    asked: Vec<String>,
}

impl Drop for CallEntry<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Some(id) = self.id {
            st.calls.remove(&id);
        }
        for k in &self.asked {
            st.asks.remove(k);
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = task => {}
                }
            }
            .instrument(self.span.clone()),
        );
    }

    fn answer(self: &Arc<Self>, id: Value, result: Value) {
        let mut v = json!({"jsonrpc": "2.0"});
        v["id"] = id;
        v["result"] = result;
        self.emit_soon(v);
    }

    /// Emits a message from a synchronous caller.
    fn emit_soon(self: &Arc<Self>, value: Value) {
        let me = self.clone();
        self.spawn(async move { me.emit(value, None).await });
    }

    async fn emit(&self, value: Value, origin: Option<u64>) {
        let message = crate::wire::Message::ours(value);
        let _ = self
            .inbound
            .send(Inbound::Message { message, origin })
            .await;
    }

    async fn fail_link(&self, cause: String) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            // The session logs the loss with this cause, once. Report first, then stop (as the legacy link does): the report must not be
            // raced by the cancellation.
            let _ = self.inbound.send(Inbound::Closed(cause)).await;
            self.stop.cancel();
        }
    }

    /// The headers of a POST carrying `body`, with the `Mcp-Param-*` headers a
    /// `tools/call` must carry.
    fn headers(&self, body: &Value) -> HeaderMap {
        let mut h = headers_for(&self.opts.headers, body);
        for (name, value) in self.param_headers(body) {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                h.insert(n, v);
            }
        }
        h
    }

    /// The `Mcp-Param-*` headers a `tools/call` must carry for the tool's `x-mcp-header`
    /// declarations (SEP-2243: a client mirrors the declared arguments; the server rejects
    /// a call without them).
    fn param_headers(&self, body: &Value) -> Vec<(String, String)> {
        if body.get("method").and_then(Value::as_str) != Some("tools/call") {
            return Vec::new();
        }
        let Some(tool) = body.pointer("/params/name").and_then(Value::as_str) else {
            return Vec::new();
        };
        let st = self.lock();
        match st.tool_headers.get(tool) {
            Some(decl) => modern::param_headers(body.pointer("/params/arguments"), decl),
            None => Vec::new(),
        }
    }

    fn learn_tools(&self, list: &Value) {
        let mut st = self.lock();
        for (tool, decl) in modern::param_headers_of(list) {
            st.tool_headers.insert(tool, decl);
        }
    }

    /// Reads the server's whole tool list for its header declarations (before the first
    /// call, and again when the server says a call's headers do not match).
    async fn fetch_tools(&self) {
        let mut cursor: Option<Value> = None;
        for page in 0..MAX_TOOL_PAGES {
            let params = match &cursor {
                Some(c) => json!({ "cursor": c }),
                None => json!({}),
            };
            let id = Value::from(format!(
                "tether-tools-{}-{page}",
                self.next.fetch_add(1, Ordering::Relaxed)
            ));
            let mut body = protocol::request(id, "tools/list", Some(params));
            self.lock().client.stamp(&mut body);
            let Answer::Final(answer) = self.exchange(&body, None).await else {
                return;
            };
            let Some(result) = answer.get("result") else {
                return;
            };
            self.learn_tools(result);
            cursor = result.get("nextCursor").filter(|c| !c.is_null()).cloned();
            if cursor.is_none() {
                self.lock().tools_known = true;
                return;
            }
        }
    }

    /// Sends one request and reads its answer; notifications on its stream go to the
    /// session with `origin` (the call's id) so they reach the call's stream.
    async fn exchange(&self, body: &Value, origin: Option<u64>) -> Answer {
        let send = self
            .client
            .post(&self.url)
            .headers(self.headers(body))
            .json(body)
            .send();
        let sent = match self.opts.request_timeout {
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(r) => r,
                Err(_) => {
                    return Answer::Failed(format!(
                        "no response from {} within {}",
                        self.url,
                        humantime::format_duration(t)
                    ));
                }
            },
            None => send.await,
        };
        match sent {
            Ok(resp) => {
                let notes = origin.map(|o| (&self.inbound, o));
                read_answer(resp, &self.url, body, self.opts.max_message, notes).await
            }
            Err(e) => Answer::Failed(explain_error(&e, &self.url).0),
        }
    }

    /// `initialize` → `server/discover`.
    async fn initialize(self: Arc<Self>, request: Value, id: Value) {
        let params = request.get("params").cloned().unwrap_or(Value::Null);
        let client = modern::Upstream::of_initialize(&params);
        let mut discover = protocol::request(id.clone(), "server/discover", Some(json!({})));
        client.stamp(&mut discover);
        self.lock().client = client;
        let answer = match self.exchange(&discover, None).await {
            Answer::Final(a) => a,
            Answer::Lost(why) => lost(id.clone(), &why),
            Answer::Reported => return,
            Answer::Failed(cause) => return self.fail_link(cause).await,
        };
        let Some(result) = answer.get("result") else {
            // The server's error: the handshake reports it as a rejection.
            return self.emit(answer, None).await;
        };
        if !modern::speaks_modern(result) {
            let why = format!(
                "the upstream's server/discover lists no {} among its supportedVersions ({}); start the gateway with --upstream-protocol legacy",
                protocol::MODERN_VERSION,
                result.get("supportedVersions").unwrap_or(&Value::Null)
            );
            let err = protocol::error_response(id, code::INVALID_REQUEST, why, None);
            return self.emit(err, None).await;
        }
        let requested = params.get("protocolVersion").and_then(Value::as_str);
        let init = modern::initialize_result(result, requested);
        self.lock().server_capabilities = init["capabilities"].clone();
        let mut v = json!({"jsonrpc": "2.0", "result": init});
        v["id"] = id;
        self.emit(v, None).await;
        self.listen();
    }

    /// One request of the client, through as many input rounds as the server asks for.
    async fn call(self: Arc<Self>, request: Value, id: Value) {
        let token = self.stop.child_token();
        let gid = id.as_u64();
        let mut entry = CallEntry {
            inner: &self,
            id: gid,
            asked: Vec::new(),
        };
        if let Some(g) = gid {
            self.lock().calls.insert(g, token.clone());
        }
        let mut body = request;
        self.lock().client.stamp(&mut body);
        let method = body
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if method == "tools/call" && !self.lock().tools_known {
            tokio::select! {
                _ = token.cancelled() => return,
                () = self.fetch_tools() => {}
            }
        }
        let mut original = body.clone();
        let mut round = 0;
        let mut refetched = false;
        loop {
            let answer = tokio::select! {
                _ = token.cancelled() => return,
                a = self.exchange(&body, gid) => a,
            };
            let mut answer = match answer {
                Answer::Final(a) => a,
                Answer::Lost(why) => return self.emit(lost(id, &why), gid).await,
                Answer::Reported => return,
                Answer::Failed(cause) => return self.fail_link(cause).await,
            };
            let mismatch = answer.pointer("/error/code").and_then(Value::as_i64)
                == Some(code::HEADER_MISMATCH);
            if mismatch && method == "tools/call" && !refetched {
                // The tool's header declarations may have changed since they were read: read
                // them again and send the call once more (the server refused it before
                // running it, so nothing is repeated).
                refetched = true;
                tokio::select! {
                    _ = token.cancelled() => return,
                    () = self.fetch_tools() => {}
                }
                original["id"] = Value::from(format!("{}-headers", id_text(&id)));
                body = original.clone();
                continue;
            }
            if method == "tools/list"
                && let Some(result) = answer.get("result")
            {
                self.learn_tools(result);
            }
            let Some(modern::InputRound { requests, state }) = modern::input_requests(&answer)
            else {
                modern::to_legacy_answer(&mut answer, id);
                return self.emit(answer, gid).await;
            };
            round += 1;
            if round > MAX_ROUNDS || requests.is_empty() || requests.len() > MAX_ASKS_PER_ROUND {
                let why = if requests.is_empty() {
                    "the upstream asked for input without saying what (an InputRequiredResult with no inputRequests)".to_owned()
                } else if requests.len() > MAX_ASKS_PER_ROUND {
                    format!(
                        "the upstream asked for {} inputs at once, over the {MAX_ASKS_PER_ROUND} the gateway carries; the request was stopped",
                        requests.len()
                    )
                } else {
                    format!(
                        "the upstream asked for input more than {MAX_ROUNDS} times for one request; it was stopped"
                    )
                };
                let err = protocol::error_response(id, code::INTERNAL_ERROR, why, None);
                return self.emit(err, gid).await;
            }
            let mut waiting = Vec::with_capacity(requests.len());
            for (key, mut ask) in requests {
                let ask_id = format!("mrtr-{}", self.next.fetch_add(1, Ordering::Relaxed));
                let (tx, rx) = oneshot::channel();
                self.lock().asks.insert(ask_id.clone(), tx);
                entry.asked.push(ask_id.clone());
                ask["id"] = Value::from(ask_id);
                self.emit(ask, gid).await;
                waiting.push((key, rx));
            }
            let mut responses = Map::new();
            for (key, rx) in waiting {
                let reply = tokio::select! {
                    _ = token.cancelled() => return,
                    r = rx => r,
                };
                let Ok(reply) = reply else {
                    return self
                        .emit(
                            lost(id, "the client's answer to an input request was lost"),
                            gid,
                        )
                        .await;
                };
                match reply.get("result") {
                    Some(r) => {
                        responses.insert(key, r.clone());
                    }
                    None => {
                        let e = reply.get("error").cloned().unwrap_or(Value::Null);
                        let msg = format!(
                            "the client refused the server's {key:?} input request: {}",
                            e.get("message")
                                .and_then(Value::as_str)
                                .unwrap_or("no reason given")
                        );
                        let c = e
                            .get("code")
                            .and_then(Value::as_i64)
                            .unwrap_or(code::INTERNAL_ERROR);
                        return self
                            .emit(protocol::error_response(id, c, msg, None), gid)
                            .await;
                    }
                }
            }
            let retry_id = Value::from(format!("{}-retry-{round}", id_text(&id)));
            body = modern::retry(&original, retry_id, responses, state);
        }
    }
}

#[cfg(test)]
mod tests;
