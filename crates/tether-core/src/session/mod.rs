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
//!
//! Where each part of a session's life is (every file is `impl` blocks on the types
//! defined here, so the state stays in one place):
//! - `registry.rs`: construction, the map, single-flight `get`, `initialize`, eviction;
//! - `rehydrate.rs`: a stored session back on first contact, interrupted calls;
//! - `supervisor.rs`: upstream (re)start, backoff, the pump, upstream death;
//! - `outbound.rs`: client → upstream (requests, notifications, answers);
//! - `pool.rs`: upstream sessions held for stateless (2026-07-28) clients, cancellation
//!   by a closed stream;
//! - `deadlines.rs`: call timeouts, one task per session;
//! - `inbound.rs`: upstream → client (routing, server requests, resumption);
//! - `calls.rs`: the in-flight table, completing a call and recording it;
//! - `tasks/`: tasks the gateway owns, both eras (a call run for a task id; `modern.rs`
//!   the 2026-07-28 extension on pooled sessions);
//! - `error.rs`: [`Failure`] (defined in [`crate::error`]) for an upstream that could not
//!   start; `tests/`: the state machine under paused time, with fake upstreams;
//! - `close.rs`: closing or letting go; `upkeep.rs`: reaper, coordination, shutdown;
//! - `stream.rs`: SSE streams, their logs, and the [`Reply`] the front door renders;
//! - `admission.rs`: session limits.
//!
//! Must not: talk HTTP, import `front` or `app`, or build the HTTP status of an error.

pub mod admission;
mod calls;
mod close;
mod deadlines;
mod error;
mod inbound;
mod outbound;
mod pool;
pub mod quota;
mod registry;
mod rehydrate;
pub mod stream;
pub mod subscriptions;
mod supervisor;
mod tasks;
pub use tasks::{TaskLimits, TaskReach};
mod upkeep;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{OnceCell, mpsc, oneshot};
// Tokio's clock, not std's: under `tokio::time::pause` the session's idleness, backoff and
// health windows move with the timers, so its state machine tests without sleeping.
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::Principal;
pub use crate::error::{Failure, Kind as FailureKind, Origin, Retry};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::policy::{self, Backoff};
use crate::protocol::{self, Kind, Restore, RestoreOp, code};
use crate::store::{
    Coordinator, LedgerEvent, LiveStore, Owner, STANDALONE_STREAM, Servers, SessionRecord,
    SessionState, StoreError, StreamRecord, ToolCallRecord, now_ms,
};
use crate::upstream::{Connector, Inbound, Link, Started, UpstreamError};
use crate::wire::{Message, Method};
use admission::{Admission, Slot};

pub use stream::{
    Deferred, Frame, FrameRx, Pushed, Reply, Stream, StreamHandle, event_id, parse_event_id,
};

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
    /// A call answered within this time is answered as one JSON body and its stream's
    /// record is never written; a longer one gets its record, then an SSE stream
    /// (docs/design/durability.md row 2). Zero: every call gets a stream.
    pub answer_window: Duration,
    /// A 2026-07-28 `tools/call` of a client that declares the tasks extension, not
    /// answered within this time, becomes a task (`--task-after`; zero: at once).
    pub task_after: Duration,
    /// Tools whose calls become tasks at once for such a client (`--task-tools`).
    pub task_tools: Vec<String>,
    /// The bounds of tasks (`--max-tasks`, `--max-tasks-per-principal`,
    /// `--max-stored-tasks`, `--max-task-result`, `--task-ttl`).
    pub task_limits: tasks::TaskLimits,
    /// Session limits and creation rates.
    pub admission: admission::AdmissionConfig,
    /// Largest `initialize` params a session stores (and replays to every fresh upstream).
    pub max_initialize: usize,
    /// Upstream sessions the modern-era bridge may hold per principal and client
    /// capabilities ([`Registry::pooled`]).
    pub pool_size: usize,
    /// Tool calls allowed per user and window (`--quota-tool-calls`); `None`: no quota.
    /// Read by [`Registry::new`] only: registries made from a [`Common`] share its quotas.
    pub quota: Option<crate::config::Quota>,
    /// This registry is one server among several sharing the store: its reaper expires
    /// only stored sessions of its own name (each server has its idle timeout), and a
    /// stored session resumes here only if it names this server (two servers of a file may
    /// run the same command, so the fingerprint cannot tell them apart).
    pub one_of_several: bool,
}

impl SessionConfig {
    /// Bytes of one session's events the store may have to write at once: the stream
    /// buffer's bound (the GET stream holds the same as a POST stream), at least 1 MiB.
    pub fn write_budget(&self) -> usize {
        self.stream_buffer.max(1 << 20)
    }
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
            answer_window: Duration::from_millis(10),
            task_after: Duration::from_secs(crate::config::DEFAULT_TASK_AFTER_SECS),
            task_tools: Vec::new(),
            task_limits: tasks::TaskLimits::default(),
            admission: admission::AdmissionConfig::default(),
            max_initialize: 64 << 10,
            pool_size: 4,
            quota: None,
            one_of_several: false,
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
    /// An upstream session the gateway holds for stateless (2026-07-28) clients
    /// (`pool.rs`): its id is never given to a client, and its streams are not stored
    /// (a modern request whose stream breaks is lost by the spec's design).
    Pooled,
}

impl Transport {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Streamable => "streamable-http",
            Transport::LegacySse => "sse",
            Transport::Pooled => "pooled",
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
    /// A limit or a broken upstream refuses the request for now (503, or 429 for a rate,
    /// with `Retry-After`).
    #[error("{0}")]
    Refused(Failure),
    /// Another live instance owns the session; the request belongs there.
    #[error("session is served by instance {instance} at {url}")]
    Elsewhere {
        /// The owner's instance id.
        instance: String,
        /// Its MCP listener root URL.
        url: String,
    },
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
    quotas: Arc<quota::Quotas>,
    /// Resource subscriptions per principal, across servers.
    subscriptions: Arc<subscriptions::SubscriptionBudget>,
    /// The held count last added to the gateway-wide gauge (servers add their changes).
    held_reported: std::sync::atomic::AtomicI64,
    /// The process's registries (this one included).
    siblings: Siblings,
    /// Removed or replaced by a reload: serves its held sessions until they end, takes no
    /// new ones (the dispatcher sends it none) and leaves the store's sessions to the
    /// server's new registry.
    draining: std::sync::atomic::AtomicBool,
    sessions: Mutex<HashMap<String, Arc<OnceCell<Arc<Session>>>>>,
    /// `/sse` streams waiting for their `initialize`.
    legacy_pending: Mutex<HashMap<String, LegacyPending>>,
    next_upstream_id: AtomicU64,
    next_server_request: AtomicU64,
    /// The modern-era bridge's upstream sessions, by principal and client capabilities.
    pool: Mutex<HashMap<pool::Key, Arc<pool::Entry>>>,
    /// The last `InitializeResult` an upstream gave (`server/discover` is built from it).
    upstream_init: Mutex<Option<Value>>,
    /// Stateless clients seen, by principal and client info (bounded).
    stateless: Mutex<HashMap<pool::ClientKey, pool::ClientSeen>>,
    /// List-changed notifications of a principal's pooled upstreams, for its
    /// `subscriptions/listen` streams.
    listeners: Mutex<HashMap<String, tokio::sync::broadcast::Sender<Arc<Value>>>>,
    /// The tasks this process runs (`tasks.rs`), by task id.
    tasks: Mutex<HashMap<String, tasks::RunningTask>>,
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

impl UpstreamSlot {
    /// Down after the `failures`-th consecutive failure: the next start waits out the
    /// jittered backoff from now.
    fn failed(cause: String, failures: u32, backoff: &Backoff) -> UpstreamSlot {
        let delay = backoff.delay(failures, rand::random_range(0.5..=1.0));
        UpstreamSlot::Down {
            cause: Some(cause),
            retry_at: Some(Instant::now() + delay),
        }
    }
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
    /// No upstream. After a failure, `cause` says why and `retry_at` when the next start
    /// may be tried: drawn once per failure, so a client told "retry in N ms" is not
    /// refused again when it does.
    Down {
        cause: Option<String>,
        retry_at: Option<Instant>,
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
    method: Method,
    /// When the gateway gives up on the upstream's answer (`--upstream-timeout`); `None`
    /// for the gateway's own requests, which their callers bound.
    deadline: Option<Instant>,
    started: Instant,
    /// The client request's span (its outcome is recorded on it at the end) and the child
    /// span timing the upstream's part; both end when the call is finished.
    spans: Option<(tracing::Span, tracing::Span)>,
}

struct State {
    upstream: UpstreamSlot,
    generation: u64,
    failures: u32,
    /// When the last failure was a failed start (not a crash of a running upstream): its
    /// backoff ends as soon as another start of this server succeeds.
    start_failed_at: Option<Instant>,
    /// What is in flight: calls sent upstream, their streams, progress tokens, and the
    /// upstream's requests waiting for the client's answer.
    calls: calls::Calls,
    safe_tools: HashSet<String>,
    /// Tools whose upstream declares `execution.taskSupport` (`optional` or `required`),
    /// from the same `tools/list`: a 2026-07-28 call to one becomes a task at once.
    task_support: HashMap<String, String>,
    /// The upstream's own `tools/list` was asked for (`safe_tools`, `task_support`).
    tools_learned: bool,
    /// The streams of the calls this session runs for tasks (their runners read them).
    task_streams: HashSet<Arc<str>>,
    restore: Restore,
    /// What of the subscriptions is pending and charged (`subscriptions.rs`).
    subs: subscriptions::Held,
    /// The restore state changed since it was last written to the record.
    restore_dirty: bool,
    /// A task is writing it (`Session::write_restore`).
    restore_writing: bool,
    last_active: Instant,
    last_touch_sent: Instant,
    /// HTTP exchanges with the client still open ([`Exchange`]): a request whose answer
    /// is known but not yet written to the client is not idle.
    exchanges: usize,
    closed: bool,
    /// This session's place in the admission counts, released when it closes here.
    slot: Option<Slot>,
}

impl State {
    /// Takes the running upstream out of the slot (closing or stopping), leaving it idle.
    fn take_link(&mut self) -> Option<Arc<Link>> {
        let idle = UpstreamSlot::Down {
            cause: None,
            retry_at: None,
        };
        match std::mem::replace(&mut self.upstream, idle) {
            UpstreamSlot::Up { link, .. } => Some(link),
            UpstreamSlot::Down { .. } => None,
        }
    }
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
    deadlines: Arc<deadlines::Watch>,
    /// Bytes of this session's events handed to the store and not written yet, at most
    /// [`Session::write_budget`]: the pump waits for room before taking the upstream's next
    /// message, so a flood the store cannot keep up with stops at the upstream instead of
    /// queueing in memory.
    writes: Arc<tokio::sync::Semaphore>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // A session dropped without being torn down must not leave its deadline task, nor
        // its subscriptions charged to its principal.
        self.deadlines.end();
        self.release_subscriptions();
    }
}

pub use crate::ids::{new_instance_id, new_session_id};
pub use upkeep::{run_coordination, run_ledger_pruning, run_log_pruning, run_orphan_reaping};

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

/// Whether a failed start refuses a new session outright (a full limit or an open circuit:
/// a 503 with `Retry-After`) rather than answering its `initialize` with an error.
fn refuses_start(err: &UpstreamError) -> bool {
    matches!(
        err,
        UpstreamError::CircuitOpen { .. }
            | UpstreamError::Capacity { .. }
            | UpstreamError::Resources(_)
    )
}

/// What the registries of every server of one process share: the stores, the metrics, the
/// ledger, the task owner, the users' quotas and the gateway-wide session counts.
#[derive(Clone)]
pub struct Common {
    /// The live store.
    pub store: Arc<dyn LiveStore>,
    /// Multi-instance coordination (Redis).
    pub coordinator: Option<Arc<dyn Coordinator>>,
    /// Owns every task a registry spawns.
    pub tracker: TaskTracker,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The ledger queue.
    pub ledger: Ledger,
    /// Tool-call quotas per user, across servers.
    pub quotas: Arc<quota::Quotas>,
    /// Resource subscriptions per user, across servers.
    pub subscriptions: Arc<subscriptions::SubscriptionBudget>,
    /// The gateway's session counts; each server's also count here.
    pub admission: Arc<Admission>,
    /// Every registry made with this `Common`.
    pub siblings: Siblings,
}

/// The registries of one process (weak: a drained generation is freed), so that a reaper
/// never expires a stored session another registry of the process holds: a changed
/// server's draining generation has the same name as its new one, and the store's
/// `last_active` lags behind a session whose stream is open.
#[derive(Clone, Default)]
pub struct Siblings(Arc<Mutex<Vec<std::sync::Weak<Shared>>>>);

impl Siblings {
    fn add(&self, shared: &Arc<Shared>) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(shared));
    }

    /// The registries still alive (taken out of the lock before anything is asked of them).
    fn live(&self) -> Vec<Arc<Shared>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }

    /// Whether any registry of the process runs task `id` (a reload's new registry must
    /// not take an old one's running task for an interrupted one).
    fn run_task(&self, id: &str) -> bool {
        self.live().iter().any(|sh| {
            sh.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id)
        })
    }

    /// Whether any registry of the process holds session `id`.
    fn hold(&self, id: &str) -> bool {
        self.live().iter().any(|sh| {
            sh.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id)
        })
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
        // A resumed session brings the subscriptions it held back into its principal's
        // count (never refused: they were admitted before).
        let subs = subscriptions::Held {
            bytes: restore.subscriptions.iter().map(String::len).sum(),
            ..subscriptions::Held::default()
        };
        let deadlines = Arc::new(deadlines::Watch::new(&shared.stopped));
        let write_budget = shared.cfg.write_budget();
        let session = Arc::new(Session {
            id: record.id.as_str().into(),
            record,
            transport,
            shared,
            state: Mutex::new(State {
                upstream: UpstreamSlot::Down {
                    cause: None,
                    retry_at: None,
                },
                generation: 0,
                failures: 0,
                start_failed_at: None,
                calls: calls::Calls::default(),
                safe_tools: HashSet::new(),
                task_support: HashMap::new(),
                tools_learned: false,
                task_streams: HashSet::new(),
                restore,
                subs,
                restore_dirty: false,
                restore_writing: false,
                exchanges: 0,
                last_active: now,
                last_touch_sent: now,
                closed: false,
                slot: Some(slot),
            }),
            upstream_gate: tokio::sync::Mutex::new(()),
            standalone,
            deadlines,
            writes: Arc::new(tokio::sync::Semaphore::new(write_budget)),
        });
        session.recharge(&mut session.lock());
        session
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
            UpstreamSlot::Down { retry_at: None, .. } => "idle",
            UpstreamSlot::Down {
                retry_at: Some(_), ..
            } if st.failures > 1 => "backoff",
            UpstreamSlot::Down { .. } => "down",
        }
    }

    fn span(&self) -> tracing::Span {
        tracing::info_span!(parent: None, "session", session.id = %crate::ids::shown(&self.id), upstream.name = %self.shared.cfg.upstream_name)
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
        let open =
            usize::from(self.standalone.attached()) + st.calls.attached_streams() + st.exchanges;
        policy::is_idle(
            st.last_active.elapsed(),
            self.shared.cfg.idle_timeout,
            open,
            st.calls.len(),
        )
    }
}

#[cfg(test)]
mod tests;
