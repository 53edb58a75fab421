//! The front door: Streamable HTTP on `/mcp` and the 2024-11-05 HTTP+SSE transport on
//! `/sse` + `/messages`.
//!
//! It validates what arrives (Origin, Accept, Content-Type, body size, JSON-RPC shape,
//! protocol version, session id), decides the protocol era through [`policy`], and renders
//! what the session layer returns as JSON, 202 or SSE. Every failure becomes one
//! [`FrontError`], mapped to its status and JSON-RPC error body and logged once, in
//! [`FrontError::into_response`]. This module knows nothing about processes or databases.
//!
//! Where the rest is: `checks.rs` (Host, Origin, the caller), `error.rs` ([`FrontError`]),
//! `forward.rs` (a session another instance serves), `sse.rs` (the one SSE encoder), and
//! `modern/` (the 2026-07-28 era: stateless requests served by pooled legacy upstream
//! sessions, and calls parked for client input).
//!
//! Must not: know about processes or databases.

mod checks;
mod error;
mod forward;
mod modern;
mod sse;
use checks::{Caller, accepts, header_str};
pub use error::{FrontError, error_response};
use forward::{FORWARDED_HEADER, Original, Route, forward, route};
pub use modern::{MAX_PARKED, ModernConfig};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::OriginalUri;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{KeyRing, Principal};
use crate::log_limit::{LogLimiter, cut};
use crate::metrics::Metrics;
use crate::policy::{self, Opening};
use crate::protocol::{self, Kind, code};
use crate::session::{
    Exchange, Failure, FailureKind, Origin, Registry, Reply, Retry, Session, SessionError,
    StreamHandle, Transport, event_id,
};
use crate::wire::Message;
use tracing::Instrument;

/// Session id header (case-insensitive; 2025-06-18 wrote `Mcp-Session-Id`).
pub const SESSION_HEADER: &str = "mcp-session-id";
/// Protocol version header.
pub const VERSION_HEADER: &str = "mcp-protocol-version";
const LAST_EVENT_ID: &str = "last-event-id";

/// Front-door settings.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// API keys; when any is configured every request must carry one. Replaced in place
    /// by a reload of the config file.
    pub keys: Arc<KeyRing>,
    /// Request body limit in bytes.
    pub max_body: usize,
    /// Time a client has to send its request body.
    pub body_timeout: Duration,
    /// Origins allowed besides loopback.
    pub allowed_origins: Vec<String>,
    /// `Host` names allowed besides loopback.
    pub allowed_hosts: Vec<String>,
    /// The MCP listener is on a loopback address, so `Host` is checked even without
    /// `allowed_hosts` ([`policy::host_allowed`]).
    pub loopback_listener: bool,
    /// SSE keepalive interval.
    pub keepalive: Duration,
    /// How long a request for a session whose owner instance does not answer waits for
    /// that instance's heartbeat to expire, so this instance can take the session over.
    pub takeover_wait: Duration,
    /// The modern era's settings (MRTR state).
    pub modern: ModernConfig,
    /// The server this front door serves, when the gateway serves several (messages).
    pub server: Option<String>,
    /// The users allowed to use this server (`tether.users`), as the last reload says.
    pub users: Arc<Access>,
}

/// Who may use a server (`tether.users`; `None`: every user). Read on every request and
/// set by a reload, also on a generation that is draining: a user taken off the list is
/// refused on its next request there too, not served for as long as its session stays busy.
#[derive(Debug, Default)]
pub struct Access(std::sync::RwLock<Option<Arc<std::collections::BTreeSet<String>>>>);

impl Access {
    /// Access for `users` (`None`: every user).
    pub fn new(users: Option<Vec<String>>) -> Access {
        let access = Access::default();
        access.set(users);
        access
    }

    /// Whether `user` may use the server.
    pub fn allows(&self, user: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|u| u.contains(user))
    }

    /// Puts `users` in force.
    pub fn set(&self, users: Option<Vec<String>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) =
            users.map(|u| Arc::new(u.into_iter().collect()));
    }
}

/// The path prefix a request reached this server's front door under (`/servers/NAME`), set
/// by the gateway's dispatcher ([`crate::hub`]); absent for `/mcp` at the root.
#[derive(Debug, Clone, Default)]
pub struct Prefix(pub Arc<str>);

#[derive(Clone)]
struct AppState {
    registry: Registry,
    cfg: Arc<FrontConfig>,
    /// Client for forwarding requests to the instance that owns their session.
    forwarder: reqwest::Client,
    /// Modern calls parked for their client's input.
    parked: Arc<modern::ParkedCalls>,
}

/// The router for the MCP listener.
pub fn router(registry: Registry, cfg: FrontConfig) -> Router {
    let metrics = registry.metrics().clone();
    let forwarder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client without TLS settings builds");
    let state = AppState {
        registry,
        parked: Arc::new(modern::ParkedCalls::new(cfg.modern.clone())),
        cfg: Arc::new(cfg),
        forwarder,
    };
    Router::new()
        .route("/mcp", post(mcp_post).get(mcp_get).delete(mcp_delete))
        .route("/sse", get(sse_get))
        .route("/messages", post(messages_post))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(metrics, front_door))
}

/// Every request: one span that every log line of the request carries (HTTP method,
/// endpoint, client address, the session id it names, and the MCP method once the body is
/// read), a child of the client's trace when its `traceparent` header names one; and a
/// count by a bounded class (HTTP method and endpoint) and status.
async fn front_door(
    State(metrics): State<Arc<Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let class = match (req.method().as_str(), req.uri().path()) {
        ("POST", "/mcp") => "post",
        ("GET", "/mcp") => "get",
        ("DELETE", "/mcp") => "delete",
        (_, "/sse") => "sse",
        (_, "/messages") => "messages",
        _ => "other",
    };
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    // The id a client sent, as its prefix: a full id is a credential, and it is untrusted
    // input on its way into a log line.
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| crate::ids::shown(v).to_owned())
        .or_else(|| {
            (class == "messages")
                .then(|| req.uri().query().unwrap_or_default())
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("sessionId=")))
                .map(|v| crate::ids::shown(v).to_owned())
        });
    let span = tracing::info_span!(
        "mcp.http",
        http.method = %req.method(),
        http.route = class,
        client.address = client.as_deref().unwrap_or("unknown"),
        session.id = session.as_deref(),
        mcp.method = tracing::field::Empty,
    );
    crate::telemetry::adopt_headers(&span, req.headers());
    let resp = next.run(req).instrument(span).await;
    metrics.request(class, resp.status().as_u16());
    resp
}

async fn read_message(
    headers: &HeaderMap,
    body: Body,
    cfg: &FrontConfig,
) -> Result<(Message, Bytes), FrontError> {
    let content_type = header_str(headers, header::CONTENT_TYPE.as_str()).unwrap_or("");
    if !content_type
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    {
        return Err(FrontError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code::SERVER_ERROR,
            "Unsupported Media Type: Content-Type must be application/json",
        ));
    }
    let too_large = || {
        FrontError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::INVALID_REQUEST,
            format!(
                "Payload Too Large: the body exceeds the {} byte limit (--max-body)",
                cfg.max_body
            ),
        )
    };
    if header_str(headers, header::CONTENT_LENGTH.as_str())
        .and_then(|l| l.parse::<usize>().ok())
        .is_some_and(|l| l > cfg.max_body)
    {
        return Err(too_large());
    }
    let read = tokio::time::timeout(cfg.body_timeout, axum::body::to_bytes(body, cfg.max_body));
    let bytes: Bytes = match read.await {
        Err(_) => {
            return Err(FrontError::new(
                StatusCode::REQUEST_TIMEOUT,
                code::PARSE_ERROR,
                format!(
                    "Request Timeout: the body did not arrive within {} ms (--body-timeout)",
                    cfg.body_timeout.as_millis()
                ),
            ));
        }
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let inner = e.into_inner();
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large());
                }
                source = s.source();
            }
            return Err(FrontError::new(
                StatusCode::BAD_REQUEST,
                code::PARSE_ERROR,
                format!("cannot read body: {inner}"),
            ));
        }
    };
    let env = Message::parse(&bytes)
        .map_err(|e| FrontError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    if let (Kind::Notification, Some(method)) = (env.kind(), env.method_name())
        && protocol::needs_answer(method)
    {
        return Err(FrontError::new(
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            format!(
                "Invalid Request: {:?} is a request and needs an \"id\" (only notifications/* are sent without one)",
                cut(method, 64)
            ),
        ));
    }
    Ok((env, bytes))
}

async fn mcp_post(
    State(st): State<AppState>,
    Caller(principal): Caller,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, FrontError> {
    let client = client.map(|c| c.0.0.ip());
    if !(accepts(&headers, "application/json") && accepts(&headers, "text/event-stream")) {
        return Err(FrontError::new(
            StatusCode::NOT_ACCEPTABLE,
            code::SERVER_ERROR,
            "Not Acceptable: Accept must list both application/json and text/event-stream",
        ));
    }
    let (env, bytes) = read_message(&headers, body, &st.cfg).await?;
    note_message(&env);
    let session_header = header_str(&headers, SESSION_HEADER);
    let version_header = header_str(&headers, VERSION_HEADER);
    match policy::classify_post(&env, session_header, version_header) {
        Opening::LegacyInitialize => {
            st.registry.metrics().mcp_request("legacy", "initialize");
            let (session, response) = st
                .registry
                .initialize(&env, Transport::Streamable, None, &principal, client)
                .await
                .map_err(|e| FrontError::from(e).with_id(env.id()))?;
            let mut resp = axum::Json(response).into_response();
            if let Some(s) = session {
                resp.headers_mut().insert(
                    SESSION_HEADER,
                    HeaderValue::from_str(s.id()).expect("session ids are visible ASCII"),
                );
            }
            Ok(resp)
        }
        Opening::Modern => {
            let original = Original::new(Method::POST, &uri, &headers, bytes);
            modern::post(&st, &principal, client, original, env).await
        }
        Opening::MissingSession => Err(FrontError::session_missing().with_id(env.id())),
        Opening::LegacySession(id) => {
            policy::legacy_version(version_header).map_err(|m| {
                FrontError::new(StatusCode::BAD_REQUEST, code::SERVER_ERROR, m).with_id(env.id())
            })?;
            let original = Original::new(Method::POST, &uri, &headers, bytes);
            let session = match route(&st, &id, &principal, original).await {
                Ok(Route::Local(s)) => s,
                Ok(Route::Remote(resp)) => return Ok(resp),
                Err(e) => return Err(e.with_id(env.id())),
            };
            let exchange = session.exchange();
            if let (Kind::Request, Some(m)) = (env.kind(), env.method_name()) {
                st.registry.metrics().mcp_request("legacy", m);
            }
            match env.kind() {
                Kind::Request => match session.request(env).await {
                    Reply::Stream(mut handle) => {
                        if let Some(answer) = handle.quick_answer().await {
                            crate::fault::point(crate::fault::points::QUICK_ANSWER);
                            return Ok(json_body(&answer));
                        }
                        Ok(sse_response(handle, st.cfg.keepalive, None, Some(exchange)))
                    }
                    Reply::Immediate(v) => Ok(axum::Json(v).into_response()),
                    Reply::Accepted => Ok(StatusCode::ACCEPTED.into_response()),
                },
                Kind::Notification => {
                    session.notify(env).await;
                    Ok(StatusCode::ACCEPTED.into_response())
                }
                Kind::Response => {
                    session.respond(env).await;
                    Ok(StatusCode::ACCEPTED.into_response())
                }
            }
        }
    }
}

/// Notes what a message is on the front door's span: its MCP method. (A trace context in
/// `params._meta` is adopted by the session's request span, created after this one: a
/// span's trace is fixed when its first child is created.)
fn note_message(env: &Message) {
    if let Some(m) = env.method_name() {
        tracing::Span::current().record("mcp.method", cut(m, 64).as_ref());
    }
}

async fn mcp_get(
    State(st): State<AppState>,
    Caller(principal): Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Response, FrontError> {
    modern_has_no_get_or_delete(&headers)?;
    if !accepts(&headers, "text/event-stream") {
        return Err(FrontError::new(
            StatusCode::NOT_ACCEPTABLE,
            code::SERVER_ERROR,
            "Not Acceptable: Accept must list text/event-stream",
        ));
    }
    let id = header_str(&headers, SESSION_HEADER).ok_or_else(FrontError::session_missing)?;
    policy::legacy_version(header_str(&headers, VERSION_HEADER))
        .map_err(|m| FrontError::new(StatusCode::BAD_REQUEST, code::SERVER_ERROR, m))?;
    let session = match route(
        &st,
        id,
        &principal,
        Original::new(Method::GET, &uri, &headers, Bytes::new()),
    )
    .await?
    {
        Route::Local(s) => s,
        Route::Remote(resp) => return Ok(resp),
    };
    let exchange = session.exchange();
    let handle = match header_str(&headers, LAST_EVENT_ID) {
        Some(last) => session.resume(last).await?,
        None => session.open_standalone(),
    };
    Ok(sse_response(handle, st.cfg.keepalive, None, Some(exchange)))
}

async fn mcp_delete(
    State(st): State<AppState>,
    Caller(principal): Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Response, FrontError> {
    modern_has_no_get_or_delete(&headers)?;
    let id = header_str(&headers, SESSION_HEADER).ok_or_else(FrontError::session_missing)?;
    let session = match route(
        &st,
        id,
        &principal,
        Original::new(Method::DELETE, &uri, &headers, Bytes::new()),
    )
    .await?
    {
        Route::Local(s) => s,
        Route::Remote(resp) => return Ok(resp),
    };
    st.registry.close(&session, "client_disconnect").await;
    crate::fault::point(crate::fault::points::SESSION_CLOSED);
    Ok(StatusCode::OK.into_response())
}

/// A 2026-07-28 client has no GET stream and no session to delete: 405 (spec §1.2,
/// backward compatibility; the era is [`policy::is_modern_get_or_delete`]'s to decide).
fn modern_has_no_get_or_delete(headers: &HeaderMap) -> Result<(), FrontError> {
    let session = headers.get(SESSION_HEADER).map(|_| "");
    if policy::is_modern_get_or_delete(session, header_str(headers, VERSION_HEADER)) {
        let mut e = FrontError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            code::SERVER_ERROR,
            "Method Not Allowed: a 2026-07-28 client only POSTs (no GET stream, no session to delete)",
        );
        e.allow_post = true;
        return Err(e);
    }
    Ok(())
}

async fn sse_get(
    State(st): State<AppState>,
    Caller(principal): Caller,
    prefix: Option<Extension<Prefix>>,
) -> Result<Response, FrontError> {
    let (id, handle) = st.registry.legacy_open(&principal);
    // The endpoint is relative to where the client reached this server: a server of
    // several answers under its `/servers/NAME` prefix.
    let prefix = prefix.map(|p| p.0.0).unwrap_or_default();
    Ok(sse_response(
        handle,
        st.cfg.keepalive,
        Some(format!("{prefix}/messages?sessionId={id}")),
        None,
    ))
}

#[derive(Deserialize)]
struct MessagesQuery {
    #[serde(rename = "sessionId")]
    session_id: Option<String>,
}

async fn messages_post(
    State(st): State<AppState>,
    Caller(principal): Caller,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    Query(q): Query<MessagesQuery>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, FrontError> {
    let id = q.session_id.ok_or_else(|| {
        FrontError::new(
            StatusCode::BAD_REQUEST,
            code::SERVER_ERROR,
            "Bad Request: sessionId query parameter is required",
        )
    })?;
    let (env, bytes) = read_message(&headers, body, &st.cfg).await?;
    note_message(&env);
    if env.kind() == Kind::Request
        && env.method_name() == Some("initialize")
        && st.registry.legacy_pending(&id, &principal)
    {
        st.registry
            .legacy_initialize(&id, &env, &principal, client.map(|c| c.0.0.ip()))
            .await?;
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    let original = Original::new(Method::POST, &uri, &headers, bytes);
    let session = match route(&st, &id, &principal, original).await? {
        Route::Local(s) => s,
        Route::Remote(resp) => return Ok(resp),
    };
    if session.transport() != Transport::LegacySse {
        return Err(FrontError::not_found());
    }
    let _exchange = session.exchange();
    match env.kind() {
        Kind::Request => {
            if let Reply::Immediate(v) = session.request(env).await {
                session.deliver_standalone(&Message::ours(v));
            }
        }
        Kind::Notification => session.notify(env).await,
        Kind::Response => session.respond(env).await,
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

/// A whole JSON-RPC message as the response body (a call answered within the answer
/// window: its text is already serialized).
fn json_body(message: &str) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(message.to_owned()))
        .expect("static headers are valid")
}

/// Renders a stream as an SSE response. With `legacy_endpoint` (the 2024-11-05 transport)
/// the first event is `endpoint` and messages are `message` events without ids.
///
/// `exchange` is held by the body, so the session counts the exchange as open until the
/// client has been sent the last event (or went away).
fn sse_response(
    mut handle: StreamHandle,
    keepalive: Duration,
    legacy_endpoint: Option<String>,
    exchange: Option<Exchange>,
) -> Response {
    let opened = handle.open_record();
    let StreamHandle {
        stream_id,
        deferred: _,
        priming,
        retry,
        replay,
        live,
        ends_with_response,
        stop,
    } = handle;
    let legacy = legacy_endpoint.is_some();
    let event = move |seq: u64, retry: Option<Duration>, data: &str| -> Bytes {
        if legacy {
            sse::event(Some("message"), None, retry, data)
        } else {
            sse::event(None, Some(&event_id(&stream_id, seq)), retry, data)
        }
    };
    let body = async_stream::stream! {
        let _exchange = exchange;
        if let Some(endpoint) = legacy_endpoint {
            yield sse::event(Some("endpoint"), None, None, &endpoint);
        }
        if let Some(opened) = opened {
            match opened.await {
                Ok(()) => crate::fault::point(crate::fault::points::STREAM_RECORDED),
                Err(e) => tracing::error!(error = %e, "stream record not durable; continuing without resumability"),
            }
        }
        if priming {
            yield event(0, Some(retry), "");
        }
        for (seq, data) in replay {
            yield event(seq, None, &data);
        }
        if let Some(mut rx) = live {
            loop {
                let next = tokio::select! {
                    f = rx.recv() => f,
                    _ = stop.cancelled() => None,
                };
                let Some(frame) = next else { break };
                let ends = frame.terminal && ends_with_response;
                // A request's final answer goes out while its commit runs (the write is
                // still made; the writer logs a failed commit). Waiting for it was the
                // largest single cost of a call (BENCHMARKS.md), and a client that got the
                // answer never resumes this stream; one that did not finds it unfinished
                // after a crash and gets the re-issue or `-32013` path, as before. Every
                // other event is durable before it is sent, so no event id can be reused.
                if !ends
                    && let Err(e) = frame.ack.await {
                        tracing::error!(error = %e, "event not durable; sending it anyway");
                    }
                yield event(frame.seq, None, &frame.data);
                if ends {
                    break;
                }
            }
        }
    };
    sse::response(sse::with_keepalive(body, keepalive, sse::LEGACY_KEEPALIVE))
}

#[cfg(test)]
mod tests;
