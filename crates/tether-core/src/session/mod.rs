//! The session layer: every client session's life, and the only place that knows how
//! client messages map onto upstream messages.
//!
//! - [`Registry`] finds sessions by id, loading (rehydrating) a stored one on first contact
//!   with single-flight semantics: concurrent requests for the same id wait on one load.
//! - [`Session`] owns one upstream [`Link`] at a time and supervises it: when it dies,
//!   in-flight requests fail at once naming the cause, and the next request restarts it
//!   (with jittered exponential backoff on crash loops) and replays the stored
//!   `initialize` and `notifications/initialized`.
//! - Ids: every request sent upstream gets a fresh gateway-wide integer id; every request
//!   the upstream sends the client gets a fresh `tether-N` id. Neither can collide, across
//!   restarts and re-initializations included, and answers are mapped back.
//!
//! This module never touches HTTP: the front door calls it and renders what it returns.

pub mod admission;
pub mod stream;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{OnceCell, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::Principal;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::policy::{self, Backoff};
use crate::protocol::{self, Envelope, Kind, Restore, RestoreOp, code};
use crate::store::{
    Ack, Coordinator, LedgerEvent, LiveStore, Owner, STANDALONE_STREAM, SessionRecord,
    SessionState, StoreError, StreamRecord, ToolCallRecord, now_ms,
};
use crate::upstream::{Connector, Inbound, Link, Started, UpstreamError};
use admission::{Admission, Refusal, Slot};

pub use stream::{Frame, FrameRx, Pushed, Stream, event_id, parse_event_id};

/// Settings of the session layer.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Idle time after which a session expires.
    pub idle_timeout: Duration,
    /// Time an upstream has to answer one request.
    pub upstream_timeout: Duration,
    /// Configured upstream name (logs, records).
    pub upstream_name: String,
    /// [`crate::config::UpstreamSpec::fingerprint`] of the configured upstream.
    pub upstream_fingerprint: String,
    /// `retry` sent in priming events: how long clients wait before resuming a stream.
    pub sse_retry: Duration,
    /// Restart backoff after upstream crashes.
    pub backoff: Backoff,
    /// An upstream that lived at least this long before dying was healthy: its crash
    /// starts a new count instead of extending a crash loop.
    pub healthy_after: Duration,
    /// How long finished streams stay resumable.
    pub event_retention: Duration,
    /// The ledger is another backend than the live store: session creation, closing and
    /// activity are sent to it as ledger events too.
    pub mirror_ledger: bool,
    /// Unread bytes a client connection may hold per stream before it is detached.
    pub stream_buffer: usize,
    /// Session limits and creation rates.
    pub admission: admission::AdmissionConfig,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_timeout: Duration::from_secs(1800),
            upstream_timeout: Duration::from_secs(300),
            upstream_name: "upstream".into(),
            upstream_fingerprint: String::new(),
            sse_retry: Duration::from_secs(1),
            backoff: Backoff::default(),
            healthy_after: Duration::from_secs(10),
            event_retention: Duration::from_secs(3600),
            mirror_ledger: false,
            stream_buffer: 4 << 20,
            admission: admission::AdmissionConfig::default(),
        }
    }
}

/// Which client transport a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Streamable HTTP: a stream per request, resumable.
    Streamable,
    /// The 2024-11-05 HTTP+SSE transport: everything on one stream, not resumable.
    LegacySse,
}

impl Transport {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Streamable => "streamable-http",
            Transport::LegacySse => "sse",
        }
    }
}

/// Failures the front door must render.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Unknown, expired, closed or foreign session: 404.
    #[error("session not found")]
    NotFound,
    /// The request is not acceptable: 400.
    #[error("{0}")]
    BadRequest(String),
    /// The store failed: 503.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A limit or a broken upstream refuses the request for now (503 or 429 with
    /// `Retry-After`).
    #[error("{}", .0.message)]
    Refused(Refusal),
    /// Another live instance owns the session; the request belongs there.
    #[error("session is served by instance {instance} at {url}")]
    Elsewhere {
        /// The owner's instance id.
        instance: String,
        /// Its MCP listener root URL.
        url: String,
    },
}

/// What a client request produces.
pub enum Reply {
    /// An SSE stream that ends with the response.
    Stream(StreamHandle),
    /// A JSON-RPC message to return at once (an error, usually).
    Immediate(Value),
    /// Accepted; the answer goes to the session's single stream (2024-11-05 transport).
    Accepted,
}

/// A stream ready to be rendered as SSE.
pub struct StreamHandle {
    /// Stream id (the prefix of every event id).
    pub stream_id: Arc<str>,
    /// Awaited before the first byte: the stream's record must be durable first.
    pub opened: Option<Ack>,
    /// Send a priming event (event id + empty data + `retry`) first.
    pub priming: bool,
    /// `retry` for the priming event.
    pub retry: Duration,
    /// Stored events to send before live ones.
    pub replay: Vec<(u64, String)>,
    /// Live events; `None` when the stream already ended.
    pub live: Option<FrameRx>,
    /// End the HTTP response after the final response event.
    pub ends_with_response: bool,
    /// Cancelled when this response must end (shutdown).
    pub stop: CancellationToken,
}

/// Methods whose repetition is harmless, so an interrupted one may be re-issued.
const SAFE_METHODS: &[&str] = &[
    "ping",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "prompts/list",
    "prompts/get",
    "completion/complete",
];

struct Shared {
    cfg: SessionConfig,
    store: Arc<dyn LiveStore>,
    coordinator: Option<Arc<dyn Coordinator>>,
    metrics: Arc<Metrics>,
    ledger: Ledger,
    connector: Connector,
    admission: Arc<Admission>,
    sessions: Mutex<HashMap<String, Arc<OnceCell<Arc<Session>>>>>,
    /// `/sse` streams waiting for their `initialize`.
    legacy_pending: Mutex<HashMap<String, LegacyPending>>,
    next_upstream_id: AtomicU64,
    next_server_request: AtomicU64,
    tracker: TaskTracker,
    /// Cancelled when the gateway stops accepting: standalone streams end.
    stopping: CancellationToken,
    /// Cancelled when the shutdown grace is over: every stream ends.
    stopped: CancellationToken,
}

/// A 2024-11-05 `/sse` stream whose client has not sent `initialize` yet.
struct LegacyPending {
    stream: Arc<Stream>,
    opened: Instant,
    /// Only the principal that opened the stream may initialize it.
    principal: String,
}

impl Shared {
    /// Starts an upstream for session `id` and replays `params` as its `initialize` under a
    /// fresh gateway id: the one start of new sessions and restarts alike.
    async fn start_upstream(&self, id: &str, params: &Value) -> Result<Started, UpstreamError> {
        let uid = self.next_upstream_id.fetch_add(1, Ordering::Relaxed);
        self.connector
            .start(id, params, uid, self.cfg.upstream_timeout)
            .await
    }

    /// Marks a session closed in the live store (and the ledger, when that is elsewhere).
    async fn close_stored(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        let at_ms = now_ms();
        self.store.close_session(id, reason, at_ms).await?;
        if self.cfg.mirror_ledger {
            self.ledger.record(LedgerEvent::Closed {
                id: id.to_owned(),
                reason: reason.to_owned(),
                at_ms,
            });
        }
        Ok(())
    }
}

/// All sessions of this gateway process.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

enum UpstreamSlot {
    Down {
        cause: Option<String>,
        since: Option<Instant>,
    },
    Up {
        link: Arc<Link>,
        started: Instant,
    },
}

enum PendingKind {
    Client {
        client_id: Value,
        stream: Arc<Stream>,
        token: Option<String>,
    },
    Internal(oneshot::Sender<Value>),
}

struct Pending {
    kind: PendingKind,
    restore: Option<RestoreOp>,
    /// `params.name` of a `tools/call`, for the ledger.
    tool: Option<String>,
    generation: u64,
    method: String,
    timer: Option<tokio::task::AbortHandle>,
    started: Instant,
    /// The client request's span (its outcome is recorded on it at the end) and the child
    /// span timing the upstream's part; both end when the call is finished.
    spans: Option<(tracing::Span, tracing::Span)>,
}

struct State {
    upstream: UpstreamSlot,
    generation: u64,
    failures: u32,
    pending: HashMap<u64, Pending>,
    /// `tether-N` id sent to the client → (upstream generation, the upstream's own id).
    server_requests: HashMap<String, (u64, Value)>,
    /// Request streams still waiting for their response.
    streams: HashMap<Arc<str>, Arc<Stream>>,
    progress: HashMap<String, u64>,
    safe_tools: HashSet<String>,
    restore: Restore,
    last_active: Instant,
    last_touch_sent: Instant,
    /// HTTP exchanges with the client still open ([`Exchange`]): a request whose answer
    /// is known but not yet written to the client is not idle.
    exchanges: usize,
    closed: bool,
    /// This session's place in the admission counts, released when it closes here.
    slot: Option<Slot>,
}

/// An open HTTP exchange with a session's client ([`Session::exchange`]). Dropping it
/// closes the exchange and marks the session active, so idleness counts from the moment
/// the client got its answer.
pub struct Exchange(Arc<Session>);

impl Drop for Exchange {
    fn drop(&mut self) {
        let due = {
            let mut st = self.0.lock();
            st.exchanges = st.exchanges.saturating_sub(1);
            Session::note_activity(&mut st)
        };
        if due {
            self.0.send_touch();
        }
    }
}

/// One client session.
pub struct Session {
    id: Arc<str>,
    record: SessionRecord,
    transport: Transport,
    shared: Arc<Shared>,
    state: Mutex<State>,
    /// Serializes upstream (re)starts: one restart at a time, others wait for its outcome.
    upstream_gate: tokio::sync::Mutex<()>,
    standalone: Arc<Stream>,
}

pub use crate::ids::{new_instance_id, new_session_id};

/// What a request gets when its session closed before its upstream was up (the caller
/// sets the client's id).
/// The tool of a `tools/call` whose stream a crash left unfinished, read from the request
/// the stream kept (whole when retryable, else only its method and tool name).
fn interrupted_tool(rec: &StreamRecord) -> Option<String> {
    let request = rec.request.as_ref()?;
    (request.get("method").and_then(Value::as_str) == Some("tools/call")).then(|| {
        request
            .pointer("/params/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    })
}

fn closed_error() -> Value {
    protocol::error_response(Value::Null, code::SESSION_CLOSED, "session closed", None)
}

fn upstream_error(client_id: Value, name: &str, err: &UpstreamError) -> Value {
    let (code, data) = match err {
        UpstreamError::CircuitOpen {
            failures, retry_in, ..
        } => (
            code::UPSTREAM_UNAVAILABLE,
            json!({"kind": "circuit_open", "failures": failures, "retry_in_ms": retry_in.as_millis() as u64}),
        ),
        UpstreamError::Capacity(max) => (
            code::LIMIT_REACHED,
            json!({"kind": "limit", "limit": "max-upstreams", "max": max}),
        ),
        _ => (
            code::UPSTREAM_UNAVAILABLE,
            json!({ "kind": "upstream_unavailable" }),
        ),
    };
    protocol::error_response(
        client_id,
        code,
        format!("upstream {name:?} is unavailable: {err}"),
        Some(data),
    )
}

/// A new session refused because of a full limit or an open circuit: a 503 with
/// `Retry-After`, not a session.
fn start_refusal(name: &str, err: &UpstreamError) -> Option<Refusal> {
    let retry_after = match err {
        UpstreamError::CircuitOpen { retry_in, .. } => *retry_in,
        UpstreamError::Capacity(_) => Duration::from_secs(5),
        _ => return None,
    };
    let body = upstream_error(Value::Null, name, err);
    Some(Refusal {
        status: 503,
        code: body["error"]["code"]
            .as_i64()
            .unwrap_or(code::UPSTREAM_UNAVAILABLE),
        message: body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        retry_after,
        data: body["error"]["data"].clone(),
    })
}

impl Registry {
    /// Creates the registry. `tracker` owns every task it spawns.
    pub fn new(
        cfg: SessionConfig,
        store: Arc<dyn LiveStore>,
        coordinator: Option<Arc<dyn Coordinator>>,
        connector: Connector,
        tracker: TaskTracker,
        metrics: Arc<Metrics>,
        ledger: Ledger,
    ) -> Registry {
        let admission = Admission::new(cfg.admission.clone());
        Registry {
            shared: Arc::new(Shared {
                cfg,
                store,
                coordinator,
                metrics,
                ledger,
                connector,
                admission,
                sessions: Mutex::new(HashMap::new()),
                legacy_pending: Mutex::new(HashMap::new()),
                next_upstream_id: AtomicU64::new(1),
                next_server_request: AtomicU64::new(1),
                tracker,
                stopping: CancellationToken::new(),
                stopped: CancellationToken::new(),
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn LiveStore> {
        &self.shared.store
    }

    /// The upstream connector (its circuit and running count, for health and metrics).
    pub fn connector(&self) -> &Connector {
        &self.shared.connector
    }

    /// Session counts and limits.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.shared.admission
    }

    fn refused(&self, r: Refusal) -> SessionError {
        let limit = r.data["limit"]
            .as_str()
            .or(r.data["kind"].as_str())
            .unwrap_or("other");
        self.shared.metrics.refused(limit);
        SessionError::Refused(r)
    }

    /// Creates a session from a client's `initialize`: starts an upstream, forwards the
    /// handshake, records the session durably, and returns it with the response to send.
    /// An upstream failure is a JSON-RPC error response and creates nothing.
    pub async fn initialize(
        &self,
        env: &Envelope,
        transport: Transport,
        legacy_id: Option<String>,
        principal: &Principal,
        client: Option<IpAddr>,
    ) -> Result<(Option<Arc<Session>>, Value), SessionError> {
        let sh = &self.shared;
        let client_id = env.id().cloned().unwrap_or(Value::Null);
        sh.admission
            .check_rate(&principal.id, client)
            .map_err(|r| self.refused(r))?;
        let slot = sh
            .admission
            .reserve(&principal.id)
            .map_err(|r| self.refused(r))?;
        let Some(params) = env.value.get("params").filter(|p| p.is_object()).cloned() else {
            return Ok((
                None,
                protocol::error_response(
                    client_id,
                    code::INVALID_PARAMS,
                    "initialize needs params",
                    None,
                ),
            ));
        };
        let id = legacy_id.unwrap_or_else(new_session_id);
        let span = tracing::info_span!(parent: None, "session", session.id = %id, upstream.name = %sh.cfg.upstream_name);
        async {
            let Started {
                link,
                rx,
                result,
                early,
            } = match sh.start_upstream(&id, &params).await {
                Ok(x) => x,
                Err(UpstreamError::Rejected(err)) => {
                    return Ok((
                        None,
                        json!({"jsonrpc": "2.0", "id": client_id, "error": err}),
                    ));
                }
                Err(e) => {
                    if let Some(r) = start_refusal(&sh.cfg.upstream_name, &e) {
                        return Err(self.refused(r));
                    }
                    sh.metrics.upstream_failures.inc();
                    tracing::debug!(error = %e, "cannot start upstream for a new session");
                    return Ok((None, upstream_error(client_id, &sh.cfg.upstream_name, &e)));
                }
            };
            let now = now_ms();
            let info = params.get("clientInfo");
            let text = |k: &str| {
                info.and_then(|i| i.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            let record = SessionRecord {
                id: id.clone(),
                principal: principal.id.clone(),
                principal_email: principal.email.clone(),
                principal_name: principal.name.clone(),
                client_type: policy::client_type(text("name").as_deref()).to_owned(),
                created_ms: now,
                last_active_ms: now,
                protocol_version: result
                    .get("protocolVersion")
                    .and_then(Value::as_str)
                    .unwrap_or(protocol::DEFAULT_VERSION)
                    .to_owned(),
                init_params: params.clone(),
                client_name: text("name"),
                client_version: text("version"),
                upstream_name: sh.cfg.upstream_name.clone(),
                upstream_fingerprint: Some(sh.cfg.upstream_fingerprint.clone()),
                transport: transport.as_str().to_owned(),
                state: SessionState::Live,
                close_reason: None,
                closed_ms: None,
                restore: json!({}),
            };
            sh.metrics.upstream_starts.inc();
            let write = sh
                .store
                .create_session(record.clone())
                .instrument(tracing::info_span!(
                    "store.write",
                    store.op = "create_session"
                ));
            if let Err(e) = write.await {
                link.shutdown(true);
                tracing::error!(error = %e, "cannot record new session");
                return Err(SessionError::Store(e));
            }
            if sh.cfg.mirror_ledger {
                sh.ledger
                    .record(LedgerEvent::Opened(Box::new(record.clone())));
            }
            let standalone = match transport {
                Transport::LegacySse => self.take_legacy_stream(&id),
                Transport::Streamable => None,
            }
            .unwrap_or_else(|| {
                Arc::new(Stream::new(
                    id.as_str().into(),
                    STANDALONE_STREAM.into(),
                    1,
                    true,
                ))
            });
            let session = Session::new(sh.clone(), record, transport, standalone, slot);
            let link = Arc::new(link);
            let generation = session
                .install(link.clone())
                .expect("a session nobody else has seen yet is open");
            session.spawn_pump(generation, rx, early);
            self.insert(&session);
            sh.metrics.sessions_created.inc();
            tracing::info!(
                principal = %session.record.principal,
                client.name = session.record.client_name.as_deref().unwrap_or("unknown"),
                "client.type" = %session.record.client_type,
                protocol.version = %session.record.protocol_version,
                upstream = %link.describe(),
                "session created"
            );
            Ok((
                Some(session),
                json!({"jsonrpc": "2.0", "id": client_id, "result": result}),
            ))
        }
        .instrument(span)
        .await
    }

    fn insert(&self, session: &Arc<Session>) {
        let cell = Arc::new(OnceCell::new_with(Some(session.clone())));
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.id.to_string(), cell);
        self.count_held();
    }

    fn count_held(&self) {
        self.shared
            .metrics
            .sessions_held
            .set(self.held_count() as i64);
    }

    /// Sessions this process holds in memory (being loaded included).
    pub fn held_count(&self) -> usize {
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Finds `principal`'s session, rehydrating it from the store if this process does not
    /// hold it. Another principal's session is reported exactly like an unknown one.
    pub async fn get(&self, id: &str, principal: &Principal) -> Result<Arc<Session>, SessionError> {
        if !policy::plausible_session_id(id) {
            return Err(SessionError::NotFound);
        }
        let cell = {
            let mut map = self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.entry(id.to_owned())
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        let result = cell
            .get_or_try_init(|| self.load(id, principal))
            .await
            .cloned();
        if result.is_err() {
            let mut map = self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if map
                .get(id)
                .is_some_and(|c| Arc::ptr_eq(c, &cell) && !c.initialized())
            {
                map.remove(id);
            }
        }
        let session = result?;
        self.count_held();
        if session.is_closed() || session.record.principal != principal.id {
            return Err(SessionError::NotFound);
        }
        Ok(session)
    }

    async fn load(&self, id: &str, principal: &Principal) -> Result<Arc<Session>, SessionError> {
        let span = tracing::info_span!(
            parent: None, "session", session.id = %id, upstream.name = %self.shared.cfg.upstream_name
        );
        self.load_inner(id, principal, span.clone())
            .instrument(span)
            .await
    }

    async fn load_inner(
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
            Some(f) => f != sh.cfg.upstream_fingerprint,
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
        if record.state == SessionState::Live && record.principal == principal.id {
            if let Some(c) = &sh.coordinator {
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
        if record.transport == Transport::LegacySse.as_str() {
            // The 2024-11-05 transport has no way to resume its one stream: its client
            // reconnects to /sse and starts over.
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
                    let answer = protocol::error_response(
                        client_id,
                        code::INTERRUPTED,
                        "the gateway restarted while this request was in flight; it was not retried \
                         because the tool is not annotated readOnlyHint or idempotentHint",
                        Some(json!({"kind": "interrupted", "retried": false})),
                    );
                    if let Some(tool) = interrupted_tool(&rec) {
                        let waited = now_ms().saturating_sub(rec.created_ms).max(0);
                        session.record_call(tool, Duration::from_millis(waited as u64), &answer);
                    }
                    stream.push(sh.store.as_ref(), &answer, true);
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
                    st.streams.insert(stream.id().clone(), stream.clone());
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
    async fn await_write_back(&self, id: &str) -> Result<SessionRecord, SessionError> {
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

    /// Ends a session for good (DELETE, idle timeout, operator).
    pub async fn close(&self, session: &Arc<Session>, reason: &str) {
        session.close(reason).await;
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&*session.id);
        self.count_held();
    }

    /// Opens a 2024-11-05 `/sse` stream: a session id reserved until the client's
    /// `initialize` arrives on the POST endpoint.
    pub fn legacy_open(&self, principal: &Principal) -> (String, StreamHandle) {
        let id = new_session_id();
        let stream = Arc::new(Stream::new(
            id.as_str().into(),
            STANDALONE_STREAM.into(),
            1,
            false,
        ));
        let (rx, _) = stream.attach(self.shared.cfg.stream_buffer);
        self.shared
            .legacy_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                LegacyPending {
                    stream: stream.clone(),
                    opened: Instant::now(),
                    principal: principal.id.clone(),
                },
            );
        let handle = StreamHandle {
            stream_id: stream.id().clone(),
            opened: None,
            priming: false,
            retry: self.shared.cfg.sse_retry,
            replay: Vec::new(),
            live: Some(rx),
            ends_with_response: false,
            stop: self.shared.stopping.clone(),
        };
        (id, handle)
    }

    /// Whether `id` is a `/sse` connection of `principal` still waiting for `initialize`.
    /// Another principal's stream is not (it gets the 404 of an unknown session).
    pub fn legacy_pending(&self, id: &str, principal: &Principal) -> bool {
        self.shared
            .legacy_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|p| p.principal == principal.id)
    }

    fn take_legacy_stream(&self, id: &str) -> Option<Arc<Stream>> {
        self.shared
            .legacy_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .map(|p| p.stream)
    }

    /// The metrics this registry updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Every session this process holds (loaded, not being loaded).
    fn held(&self) -> Vec<Arc<Session>> {
        let map = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.values().filter_map(|c| c.get().cloned()).collect()
    }

    /// Upstream state of every session this process holds: id → `up`, `down`, `backoff`
    /// or `idle` (not started since the session was loaded).
    pub fn upstream_states(&self) -> HashMap<String, &'static str> {
        let sessions = self.held();
        sessions
            .iter()
            .map(|s| (s.id.to_string(), s.upstream_state()))
            .collect()
    }

    /// Ends a session on an operator's request (reason `evicted`), whether this process
    /// holds it or it is only in the store. Returns whether a live session was found.
    pub async fn evict(&self, id: &str) -> Result<bool, SessionError> {
        let held = {
            let map = self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.get(id).and_then(|c| c.get().cloned())
        };
        if let Some(s) = held {
            if s.is_closed() {
                return Ok(false);
            }
            self.close(&s, "evicted").await;
            return Ok(true);
        }
        match self.shared.store.load_session(id).await? {
            Some(r) if r.state == SessionState::Live => {
                let owner = match &self.shared.coordinator {
                    Some(c) => c.owners(&[id.to_owned()]).await?.pop().flatten(),
                    None => None,
                };
                self.shared.close_stored(id, "evicted").await?;
                if let (Some(c), Some(owner)) = (&self.shared.coordinator, owner) {
                    if owner != c.me().id {
                        c.send_drop(&owner, id).await?;
                    }
                }
                self.shared.metrics.closed("evicted");
                tracing::info!(session.id = %id, reason = "evicted", "session closed");
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Delivers the answer to a 2024-11-05 `initialize` on the session's SSE stream.
    pub async fn legacy_initialize(
        &self,
        id: &str,
        env: &Envelope,
        principal: &Principal,
        client: Option<IpAddr>,
    ) -> Result<(), SessionError> {
        let stream = self
            .shared
            .legacy_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .filter(|p| p.principal == principal.id)
            .map(|p| p.stream.clone())
            .ok_or(SessionError::NotFound)?;
        let (_, response) = self
            .initialize(
                env,
                Transport::LegacySse,
                Some(id.to_owned()),
                principal,
                client,
            )
            .await?;
        stream.push(self.shared.store.as_ref(), &response, false);
        Ok(())
    }

    /// Expires idle sessions (in memory and in the store) and prunes old stream logs.
    /// Called periodically by [`Registry::run_reaper`].
    pub async fn reap(&self) {
        let sh = &self.shared;
        for s in self.held() {
            if s.is_idle() {
                self.close(&s, "timeout").await;
            }
        }
        let idle_ms = i64::try_from(sh.cfg.idle_timeout.as_millis()).unwrap_or(i64::MAX);
        match sh
            .store
            .idle_sessions(now_ms().saturating_sub(idle_ms), 256)
            .await
        {
            Ok(ids) => {
                for id in ids {
                    let held = sh
                        .sessions
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains_key(&id);
                    if held {
                        continue;
                    }
                    if let Some(c) = &sh.coordinator {
                        // Another live instance may hold it with an open stream; its own
                        // reaper decides. An orphan (owner gone) is claimed, then expired.
                        match c.claim(&id).await {
                            Ok(Owner::Me | Owner::TookOver { .. }) => {}
                            Ok(Owner::Other { .. }) => continue,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot check a session's owner");
                                continue;
                            }
                        }
                    }
                    match sh.close_stored(&id, "timeout").await {
                        Ok(()) => {
                            tracing::info!(session.id = %id, reason = "timeout", "session closed")
                        }
                        Err(e) => {
                            tracing::warn!(session.id = %id, error = %e, "cannot expire session")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look up idle sessions"),
        }
        sh.legacy_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, p| p.stream.attached() || p.opened.elapsed() < Duration::from_secs(10));
    }

    /// Runs [`Registry::reap`] until shutdown, and prunes stream logs past retention.
    pub async fn run_reaper(self) {
        let sh = self.shared.clone();
        let tick =
            (sh.cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = Instant::now();
        // Pruning runs beside reaping, not in its loop: a large prune takes many chunks and
        // must not delay expiry. At most one at a time; dropping the set on return (shutdown)
        // aborts it between chunks.
        let mut pruning = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = sh.stopping.cancelled() => return,
                _ = interval.tick() => {}
            }
            self.reap().await;
            while pruning.try_join_next().is_some() {}
            if pruning.is_empty() && last_prune.elapsed() >= Duration::from_secs(60) {
                last_prune = Instant::now();
                let retention =
                    i64::try_from(sh.cfg.event_retention.as_millis()).unwrap_or(i64::MAX);
                let store = sh.store.clone();
                pruning.spawn(async move {
                    if let Err(e) = store.prune_events(now_ms().saturating_sub(retention)).await {
                        tracing::warn!(error = %e, "cannot prune stream logs");
                    }
                });
            }
        }
    }

    /// Keeps this instance's heartbeat alive and obeys the deployment: drops sessions that
    /// were closed elsewhere or taken over after a lapse, and writes back records a store
    /// lost. Runs until shutdown; only with a coordinator (Redis).
    pub async fn run_coordination(self, every: Duration) {
        let sh = self.shared.clone();
        let Some(c) = sh.coordinator.clone() else {
            return;
        };
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down = false;
        loop {
            tokio::select! {
                _ = sh.stopping.cancelled() => return,
                _ = interval.tick() => {}
                // Back from an outage: re-check now, so records a restarted Redis lost are
                // written back before the clients of other instances give up on them.
                () = c.reconnected() => {}
            }
            match c.heartbeat().await {
                Ok(lapsed) => {
                    if down {
                        tracing::info!("heartbeat restored");
                        down = false;
                    }
                    if lapsed {
                        self.resync(c.as_ref()).await;
                    }
                }
                Err(e) => {
                    if !down {
                        tracing::warn!(error = %e, "cannot refresh this instance's heartbeat; held sessions keep working");
                        down = true;
                    }
                    continue;
                }
            }
            match c.take_drops().await {
                Ok(ids) => {
                    for id in ids {
                        self.release(&id, "closed by another instance").await;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot read this instance's inbox"),
            }
        }
    }

    /// After a lapsed heartbeat: every held session is checked against the store.
    async fn resync(&self, c: &dyn Coordinator) {
        let held = self.held();
        if held.is_empty() {
            return;
        }
        let ids: Vec<String> = held.iter().map(|s| s.id.to_string()).collect();
        let owners = match c.owners(&ids).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-check session ownership");
                return;
            }
        };
        let (mut kept, mut restored, mut lost) = (0, 0, 0);
        for (s, owner) in held.iter().zip(owners) {
            match owner {
                Some(o) if o == c.me().id => kept += 1,
                Some(_) => {
                    lost += 1;
                    self.release(&s.id, "taken over by another instance").await;
                }
                None => {
                    let record = s.current_record();
                    match c.reassert(&record).await {
                        Ok(()) => restored += 1,
                        Err(e) => {
                            tracing::warn!(session.id = %s.id, error = %e, "cannot write back a session record");
                        }
                    }
                }
            }
        }
        tracing::info!(
            kept,
            restored,
            released = lost,
            "heartbeat had lapsed: session ownership re-checked"
        );
    }

    /// Drops this process's copy of a session without closing it in the store: another
    /// instance serves it now (or it was closed there).
    pub async fn release(&self, id: &str, why: &str) {
        let cell = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(s) = cell.and_then(|c| c.get().cloned()) {
            s.shutdown_local(why);
            tracing::info!(session.id = %id, why, "session released by this instance");
        }
        self.count_held();
    }

    /// Shutdown, first phase: standalone streams end; request streams continue.
    pub fn begin_shutdown(&self) {
        self.shared.stopping.cancel();
    }

    /// Shutdown, last phase: every stream ends and every upstream stops. Sessions stay
    /// live in the store and resume on contact after a restart.
    pub async fn finish_shutdown(&self) {
        let sh = &self.shared;
        sh.stopping.cancel();
        sh.stopped.cancel();
        let sessions: Vec<Arc<Session>> = {
            let mut map = sh.sessions.lock().unwrap_or_else(|p| p.into_inner());
            map.drain().filter_map(|(_, c)| c.get().cloned()).collect()
        };
        for s in &sessions {
            s.stop_upstream();
        }
        if let Err(e) = sh.store.flush().await {
            tracing::error!(error = %e, "store flush failed at shutdown");
        }
    }
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        record: SessionRecord,
        transport: Transport,
        standalone: Arc<Stream>,
        slot: Slot,
    ) -> Arc<Session> {
        let now = Instant::now();
        let restore = Restore::from_json(&record.restore);
        Arc::new(Session {
            id: record.id.as_str().into(),
            record,
            transport,
            shared,
            state: Mutex::new(State {
                upstream: UpstreamSlot::Down {
                    cause: None,
                    since: None,
                },
                generation: 0,
                failures: 0,
                pending: HashMap::new(),
                server_requests: HashMap::new(),
                streams: HashMap::new(),
                progress: HashMap::new(),
                safe_tools: HashSet::new(),
                restore,
                exchanges: 0,
                last_active: now,
                last_touch_sent: now,
                closed: false,
                slot: Some(slot),
            }),
            upstream_gate: tokio::sync::Mutex::new(()),
            standalone,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The stored record as loaded or created.
    pub fn record(&self) -> &SessionRecord {
        &self.record
    }

    /// The client transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// `up`, `down` (died; restarts on the next request), `backoff` (crash loop) or `idle`.
    pub fn upstream_state(&self) -> &'static str {
        let st = self.lock();
        match &st.upstream {
            UpstreamSlot::Up { .. } => "up",
            UpstreamSlot::Down { since: None, .. } => "idle",
            UpstreamSlot::Down { since: Some(_), .. } if st.failures > 1 => "backoff",
            UpstreamSlot::Down { .. } => "down",
        }
    }

    fn span(&self) -> tracing::Span {
        tracing::info_span!(parent: None, "session", session.id = %self.id, upstream.name = %self.shared.cfg.upstream_name)
    }

    /// Notes client activity; the store hears of it at most once a second.
    pub fn touch(&self) {
        let due = Session::note_activity(&mut self.lock());
        if due {
            self.send_touch();
        }
    }

    /// Marks the session active now (under the caller's lock); true when the store is due
    /// to hear of it ([`Session::send_touch`], outside the lock).
    fn note_activity(st: &mut State) -> bool {
        let now = Instant::now();
        st.last_active = now;
        let due = now.duration_since(st.last_touch_sent) >= Duration::from_secs(1);
        if due {
            st.last_touch_sent = now;
        }
        due
    }

    fn send_touch(&self) {
        let at_ms = now_ms();
        self.shared.store.touch(&self.id, at_ms);
        if self.shared.cfg.mirror_ledger {
            self.shared.ledger.record(LedgerEvent::Touched {
                id: self.id.to_string(),
                at_ms,
            });
        }
    }

    /// Counts one HTTP exchange with the client as open until the returned guard drops
    /// (handlers move it into the response body, so it lives until the last byte is
    /// written). The reaper never expires a session with an open exchange: between the
    /// upstream's answer and its delivery the request is no longer pending, and a stall
    /// there (a slow durable write, a starved runtime) must not look like idleness.
    pub fn exchange(self: &Arc<Self>) -> Exchange {
        self.lock().exchanges += 1;
        Exchange(self.clone())
    }

    fn is_idle(&self) -> bool {
        let st = self.lock();
        let open = usize::from(self.standalone.attached())
            + st.streams.values().filter(|s| s.attached()).count()
            + st.exchanges;
        policy::is_idle(
            st.last_active.elapsed(),
            self.shared.cfg.idle_timeout,
            open,
            st.pending.len(),
        )
    }

    /// Makes `link` the session's upstream; `None` when the session was closed meanwhile
    /// (the caller must stop the link, or its process outlives the session).
    fn install(&self, link: Arc<Link>) -> Option<u64> {
        let mut st = self.lock();
        if st.closed {
            return None;
        }
        st.generation += 1;
        link.set_restore(st.restore.requests());
        st.upstream = UpstreamSlot::Up {
            link,
            started: Instant::now(),
        };
        Some(st.generation)
    }

    fn spawn_pump(
        self: &Arc<Self>,
        generation: u64,
        mut rx: mpsc::Receiver<Inbound>,
        early: Vec<Inbound>,
    ) {
        let me = self.clone();
        let stopped = self.shared.stopped.clone();
        self.shared.tracker.spawn(
            async move {
                for m in early {
                    if let Inbound::Message { value, origin } = m {
                        me.on_upstream_message(generation, value, origin).await;
                    }
                }
                loop {
                    let next = tokio::select! {
                        _ = stopped.cancelled() => return,
                        m = rx.recv() => m,
                    };
                    match next {
                        Some(Inbound::Message { value, origin }) => {
                            me.on_upstream_message(generation, value, origin).await
                        }
                        Some(Inbound::Oversized { id, len, limit }) => {
                            me.on_oversized(
                                generation,
                                id.as_ref().and_then(Value::as_u64),
                                len,
                                limit,
                            );
                        }
                        Some(Inbound::NotStreamable(status)) => {
                            me.on_upstream_closed(
                                generation,
                                &format!("upstream answered HTTP {status}"),
                            );
                            return;
                        }
                        Some(Inbound::Closed(cause)) => {
                            me.on_upstream_closed(generation, &cause);
                            return;
                        }
                        None => {
                            me.on_upstream_closed(generation, "upstream link ended");
                            return;
                        }
                    }
                }
            }
            .instrument(self.span()),
        );
    }

    /// Returns the live upstream, (re)starting it if needed: connect, replay the stored
    /// `initialize` and `notifications/initialized`, refresh tool annotations.
    async fn ensure_upstream(self: &Arc<Self>) -> Result<(Arc<Link>, u64), Value> {
        if let Some(up) = self.current_link() {
            return Ok(up);
        }
        let _gate = self.upstream_gate.lock().await;
        if let Some(up) = self.current_link() {
            return Ok(up);
        }
        let sh = &self.shared;
        let name = &sh.cfg.upstream_name;
        {
            let st = self.lock();
            if st.closed {
                return Err(closed_error());
            }
            if let UpstreamSlot::Down {
                cause: Some(cause),
                since: Some(since),
            } = &st.upstream
            {
                let delay = sh
                    .cfg
                    .backoff
                    .delay(st.failures, rand::random_range(0.5..=1.0));
                let elapsed = since.elapsed();
                if elapsed < delay {
                    let retry_in = (delay - elapsed).as_millis();
                    return Err(protocol::error_response(
                        Value::Null,
                        code::UPSTREAM_UNAVAILABLE,
                        format!(
                            "upstream {name:?} failed {} times in a row (last: {cause}); backing off, next restart attempt in {retry_in} ms",
                            st.failures
                        ),
                        Some(
                            json!({"kind": "upstream_backoff", "failures": st.failures, "retry_in_ms": retry_in}),
                        ),
                    ));
                }
            }
        }
        let started = Instant::now();
        let Started {
            link,
            rx,
            result,
            early,
        } = match sh.start_upstream(&self.id, &self.record.init_params).await {
            Ok(x) => x,
            Err(err @ (UpstreamError::CircuitOpen { .. } | UpstreamError::Capacity(_))) => {
                // Refused before anything ran: not this session's failure, so its own
                // backoff does not grow; the connector counts and logs.
                return Err(upstream_error(Value::Null, name, &err));
            }
            Err(err) => {
                sh.metrics.upstream_failures.inc();
                let mut st = self.lock();
                st.failures += 1;
                st.upstream = UpstreamSlot::Down {
                    cause: Some(err.to_string()),
                    since: Some(Instant::now()),
                };
                tracing::warn!(error = %err, failures = st.failures, "upstream restart failed");
                return Err(upstream_error(Value::Null, name, &err));
            }
        };
        link.send(protocol::notification("notifications/initialized", None))
            .await;
        let link = Arc::new(link);
        // The session can close (expiry, DELETE, eviction) while the upstream starts: the
        // `closed` check above was before the (slow) spawn and handshake, and `tear_down`
        // does not wait for the gate. Installing into a closed session would orphan the
        // process (found by the soak at a 1 s idle timeout).
        let Some(generation) = self.install(link.clone()) else {
            link.shutdown(true);
            return Err(closed_error());
        };
        self.spawn_pump(generation, rx, early);
        sh.metrics.upstream_starts.inc();
        sh.metrics.upstream_restarts.inc();
        sh.ledger.record(LedgerEvent::UpstreamRestarted {
            id: self.id.to_string(),
            at_ms: now_ms(),
        });
        tracing::info!(
            upstream = %link.describe(),
            generation,
            duration_ms = started.elapsed().as_millis() as u64,
            "upstream started and re-initialized"
        );
        self.replay_restore(&link, generation).await;
        if result.pointer("/capabilities/tools").is_some() && self.lock().safe_tools.is_empty() {
            self.refresh_safe_tools(&link, generation).await;
        }
        Ok((link, generation))
    }

    fn current_link(&self) -> Option<(Arc<Link>, u64)> {
        let st = self.lock();
        match &st.upstream {
            UpstreamSlot::Up { link, .. } => Some((link.clone(), st.generation)),
            UpstreamSlot::Down { .. } => None,
        }
    }

    /// Sends a request of the gateway's own to the upstream and waits (bounded) for its
    /// answer.
    async fn internal_request(
        &self,
        link: &Link,
        generation: u64,
        method: &str,
        params: Option<Value>,
    ) -> Option<Value> {
        let uid = self.shared.next_upstream_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().pending.insert(
            uid,
            Pending {
                kind: PendingKind::Internal(tx),
                restore: None,
                tool: None,
                generation,
                method: method.to_owned(),
                timer: None,
                started: Instant::now(),
                spans: None,
            },
        );
        link.send(protocol::request(Value::from(uid), method, params))
            .await;
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(resp)) => Some(resp),
            _ => {
                self.lock().pending.remove(&uid);
                None
            }
        }
    }

    /// Learns which tools are safe to re-issue, by asking the upstream directly (one page).
    async fn refresh_safe_tools(&self, link: &Link, generation: u64) {
        match self
            .internal_request(link, generation, "tools/list", None)
            .await
        {
            Some(resp) if resp.get("result").is_some() => {
                let safe: Vec<String> = protocol::safe_tools(&resp["result"]).collect();
                self.lock().safe_tools.extend(safe);
            }
            _ => tracing::debug!(
                "upstream did not list its tools; interrupted calls will not be retried"
            ),
        }
    }

    /// Tells a fresh upstream what the client had set up: log level and subscriptions.
    async fn replay_restore(&self, link: &Link, generation: u64) {
        let requests = self.lock().restore.requests();
        for (method, params) in requests {
            let r = self
                .internal_request(link, generation, method, Some(params.clone()))
                .await;
            if r.is_none_or(|r| r.get("error").is_some()) {
                tracing::warn!(mcp.method = method, params = %params, "fresh upstream refused restored session state");
            }
        }
    }

    /// Records a setting the upstream accepted, so the next upstream gets it too.
    fn remember(&self, op: &RestoreOp) {
        let snapshot = {
            let mut st = self.lock();
            let changed = st.restore.apply(op);
            if changed {
                // An HTTP link re-initializes a forgetful upstream by itself: it must
                // replay this too, not only a restart this session runs.
                if let UpstreamSlot::Up { link, .. } = &st.upstream {
                    link.set_restore(st.restore.requests());
                }
            }
            changed.then(|| st.restore.to_json())
        };
        if let Some(v) = snapshot {
            // Not awaited: a lost update costs one setting after a crash, never a request.
            drop(self.shared.store.set_restore(&self.id, v));
        }
    }

    /// Handles a client request. Its span (a child of the caller's, which carries the
    /// client's trace context) lasts until the call is finished and records its outcome.
    pub async fn request(self: &Arc<Self>, env: Envelope) -> Reply {
        let span = tracing::info_span!(
            "request",
            session.id = %self.id,
            mcp.method = env.method().unwrap_or_default(),
            mcp.tool = env.tool_name(),
            mcp.outcome = tracing::field::Empty,
            jsonrpc.code = tracing::field::Empty,
        );
        self.request_inner(env).instrument(span).await
    }

    /// Records how a request ended on its span.
    fn record_outcome(span: &tracing::Span, response: &Value) {
        let (outcome, code) = protocol::call_outcome(response);
        span.record("mcp.outcome", outcome);
        if let Some(c) = code {
            span.record("jsonrpc.code", c);
        }
    }

    async fn request_inner(self: &Arc<Self>, env: Envelope) -> Reply {
        self.touch();
        let client_id = env.id().cloned().unwrap_or(Value::Null);
        let method = env.method().unwrap_or_default().to_owned();
        if method == "initialize" {
            return Reply::Immediate(protocol::error_response(
                client_id,
                code::INVALID_REQUEST,
                "this session is already initialized; send initialize without MCP-Session-Id to start a new one",
                None,
            ));
        }
        let started = Instant::now();
        let tool = env.tool_name().map(str::to_owned);
        let (link, generation) = match self.ensure_upstream().await {
            Ok(x) => x,
            Err(mut err) => {
                protocol::set_id(&mut err, client_id);
                // Refused before it reached the upstream (backoff, circuit, capacity): still
                // a call the client made, counted with that outcome.
                if method == "tools/call" {
                    self.record_call(tool.unwrap_or_default(), started.elapsed(), &err);
                }
                Session::record_outcome(&tracing::Span::current(), &err);
                return Reply::Immediate(err);
            }
        };
        let retryable = SAFE_METHODS.contains(&method.as_str())
            || (method == "tools/call"
                && tool
                    .as_ref()
                    .is_some_and(|t| self.lock().safe_tools.contains(t)));
        let (stream, opened, live) = match self.transport {
            Transport::Streamable => {
                let stream_id: Arc<str> = crate::ids::new_stream_id().into();
                let opened = self.shared.store.open_stream(StreamRecord {
                    session_id: self.id.to_string(),
                    stream_id: stream_id.to_string(),
                    client_request_id: Some(client_id.clone()),
                    request: if retryable {
                        Some(env.value.clone())
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
                });
                let stream = Arc::new(Stream::new(self.id.clone(), stream_id, 1, true));
                let (rx, _) = stream.attach(self.shared.cfg.stream_buffer);
                let opened: crate::store::Ack = Box::pin(
                    opened.instrument(tracing::info_span!("store.write", store.op = "open_stream")),
                );
                (stream, Some(opened), Some(rx))
            }
            Transport::LegacySse => (self.standalone.clone(), None, None),
        };
        self.forward(
            &link,
            generation,
            env.value,
            client_id,
            stream.clone(),
            method,
        )
        .await;
        match live {
            Some(rx) => Reply::Stream(StreamHandle {
                stream_id: stream.id().clone(),
                opened,
                priming: self.record.protocol_version.as_str() >= "2025-11-25",
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
    async fn forward(
        self: &Arc<Self>,
        link: &Link,
        generation: u64,
        mut message: Value,
        client_id: Value,
        stream: Arc<Stream>,
        method: String,
    ) {
        let uid = self.shared.next_upstream_id.fetch_add(1, Ordering::Relaxed);
        protocol::set_id(&mut message, Value::from(uid));
        let upstream_span = tracing::info_span!(
            "upstream",
            upstream.name = %self.shared.cfg.upstream_name,
            upstream.generation = generation,
        );
        crate::telemetry::inject_meta(&upstream_span, &mut message);
        let token = message
            .pointer("/params/_meta/progressToken")
            .map(Value::to_string);
        let weak = Arc::downgrade(self);
        let timeout = self.shared.cfg.upstream_timeout;
        // Ends at shutdown too: a call still pending then must not hold the process for
        // the rest of --upstream-timeout.
        let stopped = self.shared.stopped.clone();
        let timer = self.shared.tracker.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {}
                _ = stopped.cancelled() => return,
            }
            if let Some(s) = weak.upgrade() {
                s.on_timeout(uid).await;
            }
        });
        let pending = Pending {
            kind: PendingKind::Client {
                client_id,
                stream: stream.clone(),
                token: token.clone(),
            },
            restore: RestoreOp::of(&message),
            tool: message
                .pointer("/params/name")
                .and_then(Value::as_str)
                .map(str::to_owned),
            generation,
            method,
            timer: Some(timer.abort_handle()),
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
                self.finish(pending, |client_id| {
                    protocol::error_response(
                        client_id,
                        code::UPSTREAM_LOST,
                        "the upstream went away before this request could be sent; the next request restarts it",
                        Some(json!({"kind": "upstream_lost"})),
                    )
                });
                return;
            }
            if let Some(t) = &token {
                st.progress.insert(t.clone(), uid);
            }
            if !Arc::ptr_eq(&stream, &self.standalone) {
                st.streams.insert(stream.id().clone(), stream);
            }
            st.pending.insert(uid, pending);
        }
        link.send(message).await;
    }

    /// Re-issues safe requests that were in flight when the gateway died.
    async fn reissue(self: Arc<Self>, items: Vec<(Arc<Stream>, Value, Value)>) {
        match self.ensure_upstream().await {
            Ok((link, generation)) => {
                for (stream, client_id, request) in items {
                    let method = request
                        .get("method")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    tracing::info!(mcp.method = %method, "re-issuing a safe request interrupted by a gateway restart");
                    self.forward(&link, generation, request, client_id, stream, method)
                        .await;
                }
            }
            Err(err) => {
                let why = err
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("upstream unavailable")
                    .to_owned();
                for (stream, client_id, request) in items {
                    self.lock().streams.remove(stream.id());
                    let answer = protocol::error_response(
                        client_id,
                        code::INTERRUPTED,
                        format!(
                            "the gateway restarted while this request was in flight, and retrying it failed: {why}"
                        ),
                        Some(json!({"kind": "interrupted", "retried": false})),
                    );
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

    async fn on_timeout(self: &Arc<Self>, uid: u64) {
        let pending = self.lock().pending.remove(&uid);
        let Some(p) = pending else { return };
        tracing::warn!(mcp.method = %p.method, duration_ms = p.started.elapsed().as_millis() as u64, "upstream request timed out");
        let timeout = self.shared.cfg.upstream_timeout;
        self.finish(p, |client_id| {
            protocol::error_response(
                client_id,
                code::UPSTREAM_TIMEOUT,
                format!(
                    "upstream did not answer within {}",
                    humantime::format_duration(timeout)
                ),
                Some(json!({"kind": "upstream_timeout"})),
            )
        });
        if let Some((link, _)) = self.current_link() {
            link.send(protocol::notification(
                "notifications/cancelled",
                Some(json!({"requestId": uid, "reason": "timed out at the gateway"})),
            ))
            .await;
        }
    }

    /// Completes a pending client request with the message `make` builds from its id.
    fn finish(&self, p: Pending, make: impl FnOnce(Value) -> Value) {
        if let Some(t) = &p.timer {
            t.abort();
        }
        match p.kind {
            PendingKind::Internal(tx) => drop(tx),
            PendingKind::Client {
                client_id,
                stream,
                token,
            } => {
                let touch_due = {
                    let mut st = self.lock();
                    if let Some(t) = token {
                        st.progress.remove(&t);
                    }
                    st.streams.remove(stream.id());
                    // Idleness counts from the end of the last request, not its start: in
                    // the same step as the stream stops counting as open, or a call longer
                    // than the idle timeout would expire its session as it completes.
                    Session::note_activity(&mut st)
                };
                if touch_due {
                    self.send_touch();
                }
                let terminal = !Arc::ptr_eq(&stream, &self.standalone);
                let message = make(client_id);
                if let Some((request, _upstream)) = &p.spans {
                    Session::record_outcome(request, &message);
                }
                if p.method == "tools/call" {
                    self.record_call(p.tool.unwrap_or_default(), p.started.elapsed(), &message);
                }
                self.emit(&stream, &message, terminal);
            }
        }
    }

    /// Ledger, metrics and (for failures) one log line for a finished tool call.
    fn record_call(&self, tool: String, elapsed: Duration, response: &Value) {
        let sh = &self.shared;
        let (outcome, error_code) = protocol::call_outcome(response);
        sh.metrics
            .tool_calls
            .get_or_create(&crate::metrics::OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
        sh.metrics.tool_call_seconds.observe(elapsed.as_secs_f64());
        if outcome != "ok" {
            tracing::warn!(
                session.id = %self.id,
                principal = %self.record.principal,
                tool = %tool,
                outcome,
                jsonrpc.code = error_code,
                duration_ms = elapsed.as_millis() as u64,
                "tool call failed"
            );
        }
        let started_ms = now_ms() - i64::try_from(elapsed.as_millis()).unwrap_or(0);
        sh.ledger.record(LedgerEvent::ToolCall(ToolCallRecord {
            session_id: self.id.to_string(),
            tool,
            started_ms,
            duration_ms: i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX),
            outcome: outcome.to_owned(),
            error_code,
        }));
    }

    async fn on_upstream_message(
        self: &Arc<Self>,
        generation: u64,
        mut value: Value,
        origin: Option<u64>,
    ) {
        let has_method = value.get("method").and_then(Value::as_str).is_some();
        let has_id = value.get("id").is_some_and(|v| !v.is_null());
        match (has_method, has_id) {
            (false, true) => {
                let Some(uid) = value.get("id").and_then(Value::as_u64) else {
                    tracing::debug!("upstream answered an id the gateway never sent; dropped");
                    return;
                };
                let pending = self.lock().pending.remove(&uid);
                let Some(p) = pending else {
                    tracing::debug!(
                        jsonrpc.id = uid,
                        "late upstream response (timed out or cancelled); dropped"
                    );
                    return;
                };
                if let PendingKind::Internal(_) = &p.kind {
                    if let PendingKind::Internal(tx) = p.kind {
                        let _ = tx.send(value);
                    }
                    return;
                }
                if p.method == "tools/list" {
                    if let Some(result) = value.get("result") {
                        let safe: Vec<String> = protocol::safe_tools(result).collect();
                        self.lock().safe_tools.extend(safe);
                    }
                }
                if let (Some(op), Some(_)) = (&p.restore, value.get("result")) {
                    self.remember(op);
                }
                self.finish(p, |client_id| {
                    protocol::set_id(&mut value, client_id);
                    value
                });
            }
            (true, true) => self.route_server_request(generation, value, origin).await,
            (true, false) => {
                let method = value
                    .get("method")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let target = if method == "notifications/progress" {
                    let token = value.pointer("/params/progressToken").map(Value::to_string);
                    let st = self.lock();
                    token
                        .and_then(|t| st.progress.get(&t).copied())
                        .and_then(|uid| self.stream_of(&st, uid))
                } else {
                    if method == "notifications/cancelled" {
                        // The upstream cancels a request it sent the client: use our id for it.
                        let orig = value.pointer("/params/requestId").cloned();
                        let st = self.lock();
                        let ours = st
                            .server_requests
                            .iter()
                            .find(|(_, (g, o))| *g == generation && Some(o) == orig.as_ref())
                            .map(|(k, _)| k.clone());
                        drop(st);
                        match ours {
                            Some(k) => value["params"]["requestId"] = Value::from(k),
                            None => return,
                        }
                    }
                    self.pick_stream(origin)
                };
                match target {
                    Some(stream) => {
                        self.emit(&stream, &value, false);
                    }
                    None => {
                        tracing::debug!(mcp.method = %method, "no client stream for an upstream notification; dropped")
                    }
                }
            }
            (false, false) => tracing::debug!(
                "upstream sent a message that is neither request, notification nor response"
            ),
        }
    }

    fn stream_of(&self, st: &State, uid: u64) -> Option<Arc<Stream>> {
        match &st.pending.get(&uid)?.kind {
            PendingKind::Client { stream, .. } => Some(stream.clone()),
            PendingKind::Internal(_) => None,
        }
    }

    /// The stream for an upstream message that is not a response: the stream of the
    /// request it arrived for (HTTP tells us), else the standalone stream if a client is
    /// listening, else the newest request in flight (stdio cannot say which request a
    /// message belongs to; the newest is the one most likely waiting on it).
    fn pick_stream(&self, origin: Option<u64>) -> Option<Arc<Stream>> {
        if self.transport == Transport::LegacySse {
            return Some(self.standalone.clone());
        }
        let st = self.lock();
        if let Some(s) = origin.and_then(|o| self.stream_of(&st, o)) {
            return Some(s);
        }
        if self.standalone.attached() {
            return Some(self.standalone.clone());
        }
        st.pending
            .values()
            .filter(|p| matches!(p.kind, PendingKind::Client { .. }))
            .max_by_key(|p| p.started)
            .and_then(|p| match &p.kind {
                PendingKind::Client { stream, .. } => Some(stream.clone()),
                PendingKind::Internal(_) => None,
            })
    }

    async fn route_server_request(
        self: &Arc<Self>,
        generation: u64,
        mut value: Value,
        origin: Option<u64>,
    ) {
        let method = value
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let orig_id = value.get("id").cloned().unwrap_or(Value::Null);
        let Some(stream) = self.pick_stream(origin) else {
            let answer = if method == "ping" {
                json!({"jsonrpc": "2.0", "id": orig_id, "result": {}})
            } else {
                protocol::error_response(
                    orig_id,
                    code::INTERNAL_ERROR,
                    format!("no client connection is open to deliver {method}"),
                    None,
                )
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
            .server_requests
            .insert(ours.clone(), (generation, orig_id));
        protocol::set_id(&mut value, Value::from(ours));
        self.emit(&stream, &value, false);
    }

    fn on_upstream_closed(&self, generation: u64, cause: &str) {
        let failed: Vec<Pending> = {
            let mut st = self.lock();
            if st.generation != generation {
                return;
            }
            let healthy = match &st.upstream {
                UpstreamSlot::Up { started, .. } => {
                    started.elapsed() >= self.shared.cfg.healthy_after
                }
                UpstreamSlot::Down { .. } => return,
            };
            st.failures = if healthy { 1 } else { st.failures + 1 };
            st.upstream = UpstreamSlot::Down {
                cause: Some(cause.to_owned()),
                since: Some(Instant::now()),
            };
            st.server_requests.retain(|_, (g, _)| *g != generation);
            let ids: Vec<u64> = st
                .pending
                .iter()
                .filter(|(_, p)| p.generation == generation)
                .map(|(k, _)| *k)
                .collect();
            ids.into_iter()
                .filter_map(|k| st.pending.remove(&k))
                .collect()
        };
        if self.is_closed() {
            return;
        }
        self.shared.metrics.upstream_failures.inc();
        tracing::warn!(cause = %cause, in_flight = failed.len(), "upstream lost");
        for p in failed {
            self.finish(p, |client_id| {
                protocol::error_response(
                    client_id,
                    code::UPSTREAM_LOST,
                    format!("{cause}; the request was not completed. The next request restarts the upstream."),
                    Some(json!({"kind": "upstream_lost"})),
                )
            });
        }
    }

    /// An upstream message over `--max-upstream-message` was skipped. The request it
    /// answered (when its id could be read) fails with an error naming the limit; the
    /// upstream keeps running with its state.
    fn on_oversized(&self, generation: u64, id: Option<u64>, len: usize, limit: usize) {
        self.shared.metrics.upstream_oversized.inc();
        let pending = id.and_then(|uid| {
            let mut st = self.lock();
            match st.pending.get(&uid) {
                Some(p) if p.generation == generation => st.pending.remove(&uid),
                _ => None,
            }
        });
        let Some(p) = pending else {
            tracing::warn!(
                bytes = len,
                limit,
                "upstream message over the size limit (--max-upstream-message) skipped; it answered no request in flight"
            );
            return;
        };
        tracing::warn!(bytes = len, limit, method = %p.method, "upstream answer over the size limit (--max-upstream-message); the request gets an error, the upstream keeps running");
        self.finish(p, |client_id| {
            protocol::error_response(
                client_id,
                code::UPSTREAM_MESSAGE_TOO_LARGE,
                format!(
                    "the upstream's answer was {len} bytes, over the gateway's {limit} byte limit (--max-upstream-message)"
                ),
                Some(json!({"kind": "message_too_large", "bytes": len, "limit": limit})),
            )
        });
    }

    /// Handles a client notification: forwarded upstream, with a cancelled request's id
    /// rewritten to the upstream's id for it.
    pub async fn notify(self: &Arc<Self>, env: Envelope) {
        self.touch();
        let mut value = env.value;
        if env.kind == Kind::Notification
            && value.get("method").and_then(Value::as_str) == Some("notifications/cancelled")
        {
            let target = value.pointer("/params/requestId").cloned();
            let uid = {
                let st = self.lock();
                st.pending
                    .iter()
                    .find(|(_, p)| matches!(&p.kind, PendingKind::Client { client_id, .. } if Some(client_id) == target.as_ref()))
                    .map(|(k, _)| *k)
            };
            match uid {
                Some(uid) => value["params"]["requestId"] = Value::from(uid),
                None => return,
            }
        }
        match self.ensure_upstream().await {
            Ok((link, _)) => link.send(value).await,
            Err(_) => tracing::debug!("client notification dropped: upstream unavailable"),
        }
    }

    /// Handles a client response to a request the upstream sent.
    pub async fn respond(self: &Arc<Self>, env: Envelope) {
        self.touch();
        let mut value = env.value;
        let key = value.get("id").and_then(Value::as_str).map(str::to_owned);
        let entry = key.and_then(|k| self.lock().server_requests.remove(&k));
        let Some((generation, orig)) = entry else {
            tracing::debug!(
                "client answered a request that is unknown or already answered; dropped"
            );
            return;
        };
        match self.current_link() {
            Some((link, g)) if g == generation => {
                protocol::set_id(&mut value, orig);
                link.send(value).await;
            }
            _ => tracing::debug!("the upstream that asked is gone; client answer dropped"),
        }
    }

    /// Sends a message on the session's single stream (2024-11-05 transport).
    pub fn deliver_standalone(&self, value: &Value) {
        self.emit(&self.standalone, value, false);
    }

    /// Pushes an event to a stream; a client that stopped reading is detached there
    /// (counted and logged), and resumes from the log when it reads again.
    fn emit(&self, stream: &Stream, value: &Value, terminal: bool) {
        if stream.push(self.shared.store.as_ref(), value, terminal) == Pushed::Overflowed {
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
            opened: None,
            priming: self.record.protocol_version.as_str() >= "2025-11-25",
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
            self.lock().streams.get(stream_id).cloned()
        };
        let store = &self.shared.store;
        let handle = |replay, live, standalone: bool| StreamHandle {
            stream_id: stream_id.into(),
            opened: None,
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

    async fn close(&self, reason: &str) {
        self.close_inner(reason).instrument(self.span()).await
    }

    /// Marks the session closed in this process and ends everything it runs here: pending
    /// requests get the error `make` builds, streams end, the upstream stops. False if it
    /// was already closed.
    fn tear_down(&self, make: impl Fn(Value) -> Value) -> bool {
        let (link, pending, streams) = {
            let mut st = self.lock();
            if st.closed {
                return false;
            }
            st.closed = true;
            st.slot = None;
            let link = match std::mem::replace(
                &mut st.upstream,
                UpstreamSlot::Down {
                    cause: None,
                    since: None,
                },
            ) {
                UpstreamSlot::Up { link, .. } => Some(link),
                UpstreamSlot::Down { .. } => None,
            };
            let pending: Vec<Pending> = st.pending.drain().map(|(_, p)| p).collect();
            let streams: Vec<Arc<Stream>> = st.streams.drain().map(|(_, s)| s).collect();
            (link, pending, streams)
        };
        for p in pending {
            self.finish(p, &make);
        }
        for s in streams {
            s.detach();
        }
        self.standalone.detach();
        if let Some(link) = link {
            link.shutdown(true);
        }
        true
    }

    async fn close_inner(&self, reason: &str) {
        let closed_now = self.tear_down(|client_id| {
            protocol::error_response(
                client_id,
                code::SESSION_CLOSED,
                format!("session closed ({reason})"),
                None,
            )
        });
        if !closed_now {
            return;
        }
        if let Err(e) = self.shared.close_stored(&self.id, reason).await {
            tracing::error!(error = %e, "cannot record session close");
        }
        self.shared.metrics.closed(reason);
        tracing::info!(reason, "session closed");
    }

    /// The record as it stands now (activity and restore state included).
    fn current_record(&self) -> SessionRecord {
        let mut r = self.record.clone();
        let st = self.lock();
        r.restore = st.restore.to_json();
        r.last_active_ms =
            now_ms() - i64::try_from(st.last_active.elapsed().as_millis()).unwrap_or(0);
        r
    }

    /// Ends this process's part in the session (streams, pending calls, upstream) without
    /// recording a close: the session lives on elsewhere.
    fn shutdown_local(&self, why: &str) {
        self.tear_down(|client_id| {
            protocol::error_response(
                client_id,
                code::UPSTREAM_LOST,
                format!("the session moved to another gateway instance ({why}); the outcome of this request is unknown"),
                Some(json!({"kind": "upstream_lost"})),
            )
        });
    }

    /// Stops the upstream without ending the session (gateway shutdown).
    fn stop_upstream(&self) {
        let link = {
            let mut st = self.lock();
            match std::mem::replace(
                &mut st.upstream,
                UpstreamSlot::Down {
                    cause: None,
                    since: None,
                },
            ) {
                UpstreamSlot::Up { link, .. } => Some(link),
                UpstreamSlot::Down { .. } => None,
            }
        };
        if let Some(link) = link {
            link.kill();
        }
    }
}
