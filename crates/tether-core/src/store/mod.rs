//! Durable state, in two halves that may live on different backends:
//!
//! - [`LiveStore`]: session records, the per-stream SSE event log and task records, what
//!   serving, rehydration and `tasks/*` need. SQLite ([`sqlite::SqliteStore`], the embedded default) or Redis
//!   ([`redis::RedisStore`], shared by the instances of a deployment, which also
//!   implements [`Coordinator`]).
//! - [`LedgerStore`]: session history and tool calls for the admin API. SQLite or
//!   PostgreSQL ([`postgres::PostgresLedger`]).
//!
//! Every backend passes the same conformance suite (`conformance.rs`). Writes that sit on the request path return an [`Ack`]
//! future instead of blocking: a backend may group many writes into one commit, and the
//! caller decides what must be durable before it answers the client.
//!
//! Must not: know about sessions' behaviour: the traits say what must be durable, not why.

#[cfg(test)]
pub(crate) mod conformance;
#[cfg(test)]
pub(crate) mod memory;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;

use crate::tasks::TaskRecord;

/// A store failure. Callers turn it into a JSON-RPC error; it never panics the process.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend reported an error (disk full, I/O error, corrupt file...).
    #[error("store error: {0}")]
    Backend(String),
    /// The store was shut down.
    #[error("store is closed")]
    Closed,
    /// The backend cannot be reached right now (Redis or PostgreSQL outage).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Completion of a write: resolves once the write is durable (or failed).
pub type Ack = BoxFuture<'static, Result<(), StoreError>>;

/// Lifecycle state of a stored session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Usable; resumes on contact after a restart.
    Live,
    /// Ended; requests get 404.
    Closed,
}

impl SessionState {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Live => "live",
            SessionState::Closed => "closed",
        }
    }
}

/// Everything needed to rebuild a session behind its id.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// The session id the client holds.
    pub id: String,
    /// Who created it: the user id of its API key, or `anonymous`.
    pub principal: String,
    /// The user's email, when known.
    pub principal_email: Option<String>,
    /// The user's display name, when known.
    pub principal_name: Option<String>,
    /// Client family detected from `clientInfo` (Claude Code, Cursor, ... or `unknown`).
    pub client_type: String,
    /// Client transport: `streamable-http`, or `sse` (2024-11-05, not resumable).
    pub transport: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: i64,
    /// Last activity, ms since the Unix epoch (may lag by up to one second).
    pub last_active_ms: i64,
    /// Protocol version negotiated with the upstream.
    pub protocol_version: String,
    /// The client's `initialize` params, replayed to every fresh upstream.
    pub init_params: Value,
    /// `clientInfo.name`.
    pub client_name: Option<String>,
    /// `clientInfo.version`.
    pub client_version: Option<String>,
    /// Configured upstream name.
    pub upstream_name: String,
    /// Fingerprint of the upstream's command or URL the session was created for (`None`
    /// for records written before it was kept). A session is never resumed against
    /// another upstream.
    pub upstream_fingerprint: Option<String>,
    /// Live or closed.
    pub state: SessionState,
    /// Why it closed (`timeout`, `client_disconnect`...).
    pub close_reason: Option<String>,
    /// When it closed.
    pub closed_ms: Option<i64>,
    /// Session state the client set up after `initialize`, replayed to every fresh
    /// upstream: `{"logLevel": ..., "subscriptions": [uri, ...]}`.
    pub restore: Value,
}

/// A response stream: the SSE stream of one client request, or the session's standalone
/// stream (id [`STANDALONE_STREAM`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    /// Owning session.
    pub session_id: String,
    /// Stream id, unique within the session; part of every event id.
    pub stream_id: String,
    /// The client's JSON-RPC id of the request this stream answers.
    pub client_request_id: Option<Value>,
    /// The request: whole when `retryable`, so an interrupted safe request can be
    /// re-issued; for other tool calls only its method and tool name, so an interrupted call
    /// is recorded with its tool (arguments are never kept for them).
    pub request: Option<Value>,
    /// Whether re-issuing the request after a crash is safe.
    pub retryable: bool,
    /// Whether the final response has been recorded.
    pub done: bool,
    /// Highest event sequence number stored for the stream (0 = none).
    pub last_seq: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: i64,
}

/// Id of the standalone (GET / legacy SSE) stream of every session.
pub const STANDALONE_STREAM: &str = "0";

/// One SSE event to append to a stream's log.
#[derive(Debug, Clone)]
pub struct EventRecord {
    /// Owning session.
    pub session_id: Arc<str>,
    /// Stream within the session.
    pub stream_id: Arc<str>,
    /// Sequence number within the stream, from 1.
    pub seq: u64,
    /// The JSON-RPC message as sent.
    pub data: Arc<str>,
    /// Whether this is the stream's final response.
    pub terminal: bool,
    /// A place in its session's budget of writes in flight, given back when the store has
    /// written (or, in an outage, buffered) the event: the session's pump waits while its
    /// budget is spent, so an upstream flooding a stream nobody reads cannot queue writes
    /// faster than the store makes them (issue 26: memory grew by the gigabyte).
    pub hold: Option<Hold>,
}

/// A place in a budget, given back when the last clone drops.
pub type Hold = Arc<tokio::sync::OwnedSemaphorePermit>;

/// Where ledger batches go. Separate from [`LedgerStore`] so the ledger writer can be tested
/// against slow and failing sinks.
pub trait LedgerSink: Send + Sync + 'static {
    /// Writes ledger events (one batch, one commit).
    fn record(&self, events: Vec<LedgerEvent>) -> Ack;
}

/// Live session state: session records and the per-stream event log. What an instance
/// needs to serve, resume and rehydrate sessions.
#[async_trait::async_trait]
pub trait LiveStore: Send + Sync + 'static {
    /// Records a new session; durable when this returns.
    async fn create_session(&self, record: SessionRecord) -> Result<(), StoreError>;
    /// Loads a session by id.
    async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// Notes activity; batched, never blocks.
    fn touch(&self, id: &str, at_ms: i64);
    /// Replaces a session's restore state (log level, resource subscriptions); batched.
    fn set_restore(&self, id: &str, restore: Value) -> Ack;
    /// Marks a session closed. Its event log goes then or at the next [`Self::prune_events`]
    /// (a busy session's log is too large to delete in one step without stalling others).
    async fn close_session(&self, id: &str, reason: &str, at_ms: i64) -> Result<(), StoreError>;
    /// Live sessions whose last activity is older than `cutoff_ms`, oldest first, of the
    /// servers `of` names (each server of a gateway has its own idle timeout; the servers
    /// no registry serves any more are reaped at the gateway's).
    async fn idle_sessions(
        &self,
        cutoff_ms: i64,
        limit: usize,
        of: Servers<'_>,
    ) -> Result<Vec<String>, StoreError>;
    /// Live sessions of the bridge's pools (`transport = pooled`) that no process of the
    /// deployment can hold: with a store only one process uses (SQLite), every one found at
    /// start is a member of an earlier process, which no client can name. A shared store
    /// (Redis) answers none: other instances hold theirs, and an orphan is claimed and
    /// expired by the reaper.
    async fn stale_pooled(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    /// Number of live sessions.
    async fn count_live(&self) -> Result<u64, StoreError>;
    /// Records a new stream (and, for request streams, the request).
    fn open_stream(&self, record: StreamRecord) -> Ack;
    /// Appends an event; a terminal event also marks its stream done.
    fn append_event(&self, event: EventRecord) -> Ack;
    /// Resolves once every write submitted before it is durable.
    fn flush(&self) -> Ack;
    /// Whether a new write would be stored now (readiness): a real write, so a full disk,
    /// a deleted database or a Redis refusing writes (maxmemory) all show.
    async fn check_writable(&self) -> Result<(), StoreError> {
        self.flush().await
    }
    /// Events of a stream with `seq > after`, in order.
    async fn events_after(
        &self,
        session_id: &str,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<(u64, String)>, StoreError>;
    /// One stream, with its last sequence number.
    async fn stream(
        &self,
        session_id: &str,
        stream_id: &str,
    ) -> Result<Option<StreamRecord>, StoreError>;
    /// Request streams of a session whose response was never recorded.
    async fn unfinished_streams(&self, session_id: &str) -> Result<Vec<StreamRecord>, StoreError>;
    /// Deletes the logs of closed sessions and of finished streams created before
    /// `cutoff_ms`, in bounded steps so other writes are not held up; returns events removed.
    async fn prune_events(&self, cutoff_ms: i64) -> Result<u64, StoreError>;
    /// Stores a task (a new one, or its new state); durable when the ack resolves. A task is
    /// shown to a client only once its record is durable (`docs/design/tasks.md`).
    fn put_task(&self, task: &TaskRecord) -> Ack;
    /// A task by id. An expired one may be found until it is pruned: the caller checks.
    async fn load_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;
    /// A principal's tasks, oldest first, after `after` (the creation time and id of the
    /// last one the caller has), at most `limit`.
    async fn list_tasks(
        &self,
        principal: &str,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError>;
    /// Forgets the tasks whose time to live ended before `now_ms`; returns how many.
    async fn prune_tasks(&self, now_ms: i64) -> Result<u64, StoreError>;
    /// The most recently created tasks of every principal, newest first, at most `limit`
    /// (the admin API's view; expired ones not yet pruned may be among them).
    async fn recent_tasks(&self, limit: usize) -> Result<Vec<TaskRecord>, StoreError>;
    /// How many tasks a principal has stored (those expired but not yet pruned may count).
    async fn count_tasks(&self, principal: &str) -> Result<u64, StoreError>;
    /// A short description for logs and health (`sqlite:/path`, `redis://host/0 prefix p`).
    fn describe(&self) -> String;
}

/// Session history and tool calls: what the admin API, CLI and dashboard read.
#[async_trait::async_trait]
pub trait LedgerStore: LedgerSink {
    /// Sessions matching `query`, most recently active first.
    async fn list_sessions(&self, query: &SessionQuery) -> Result<Vec<SessionSummary>, StoreError>;
    /// One session's summary.
    async fn session_summary(&self, id: &str) -> Result<Option<SessionSummary>, StoreError>;
    /// A session's most recent tool calls, newest first.
    async fn session_calls(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<ToolCallRecord>, StoreError>;
    /// A session's recorded lifecycle events (`rehydrated`, `upstream_restarted`), newest
    /// first: with its record and tool calls, the session's timeline.
    async fn session_events(&self, id: &str, limit: usize)
    -> Result<Vec<SessionEvent>, StoreError>;
    /// Tool calls started since `since_ms` (at most `limit`, newest first), with dimensions.
    async fn calls_since(&self, since_ms: i64, limit: usize) -> Result<Vec<CallRow>, StoreError>;
    /// Ledger-wide totals.
    async fn totals(&self) -> Result<Totals, StoreError>;
    /// Every user with sessions in the ledger.
    async fn users(&self) -> Result<Vec<UserRow>, StoreError>;
    /// Deletes closed sessions and tool calls older than `cutoff_ms`; returns rows removed.
    async fn prune_ledger(&self, cutoff_ms: i64) -> Result<u64, StoreError>;
}

/// Who serves a session in a multi-instance deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This instance (it just claimed a session nobody owned, or already owned it).
    Me,
    /// This instance, which just took the session over from an instance whose heartbeat
    /// lapsed (killed, or cut off from the store).
    TookOver {
        /// The previous owner's instance id.
        from: String,
    },
    /// Another live instance, reachable at `url`.
    Other {
        /// Its instance id.
        instance: String,
        /// Where it serves MCP (its advertise URL, ending in the listener root).
        url: String,
    },
}

/// One gateway instance of a deployment, as its heartbeat describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceInfo {
    /// Random id chosen at start.
    pub id: String,
    /// Where other instances reach its MCP listener.
    pub url: String,
    /// Start time, ms since the Unix epoch.
    pub started_ms: i64,
    /// Tether version.
    pub version: String,
}

/// Coordination between instances sharing a live store: heartbeats, session ownership and
/// a small inbox per instance. Implemented by the Redis store; a single SQLite instance has
/// none.
#[async_trait::async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// This instance.
    fn me(&self) -> &InstanceInfo;
    /// Refreshes this instance's heartbeat. Returns `true` when the previous heartbeat had
    /// lapsed (first beat, an outage longer than the heartbeat TTL, or a store that lost its
    /// data): other instances may have taken sessions over, so ownership must be re-checked.
    async fn heartbeat(&self) -> Result<bool, StoreError>;
    /// Removes this instance's heartbeat (graceful shutdown: its sessions move at once).
    async fn leave(&self);
    /// Makes this instance the owner of `session_id` unless another live instance owns it.
    async fn claim(&self, session_id: &str) -> Result<Owner, StoreError>;
    /// The owner instance id of each session (None: no owner recorded).
    async fn owners(&self, ids: &[String]) -> Result<Vec<Option<String>>, StoreError>;
    /// Live instances.
    async fn instances(&self) -> Result<Vec<InstanceInfo>, StoreError>;
    /// Asks `instance` to drop its in-memory copy of `session_id` (closed elsewhere).
    async fn send_drop(&self, instance: &str, session_id: &str) -> Result<(), StoreError>;
    /// Takes the session ids other instances asked this one to drop.
    async fn take_drops(&self) -> Result<Vec<String>, StoreError>;
    /// Writes back a session this instance holds whose record the store lost (a Redis
    /// restart without persistence), and claims it.
    async fn reassert(&self, record: &SessionRecord) -> Result<(), StoreError>;
    /// Whether the live store is reachable right now (false during an outage).
    fn is_up(&self) -> bool;
    /// After the store was seen to lose its data (a Redis restart without persistence),
    /// how much longer a missing session record may still be written back by the instance
    /// holding it; `None` outside that window. A lookup that finds nothing waits this long
    /// before answering 404, so clients do not give up sessions that are about to return.
    async fn write_back_window(&self) -> Result<Option<std::time::Duration>, StoreError> {
        Ok(None)
    }
    /// Resolves when the store is reachable again after an outage (so held sessions can be
    /// re-checked and written back at once, not at the next heartbeat).
    async fn reconnected(&self) {
        std::future::pending::<()>().await;
    }
    /// A secret every instance of the deployment shares (32 random bytes as hex), made by
    /// the first one that asks (`name` says what it is for); `None` when the store keeps
    /// none.
    async fn shared_secret(&self, _name: &str) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
    /// Adds one to this instance's part of the deployment-wide counter `name` and returns
    /// the counter's new total; `mine` is what this instance has counted of it itself, this
    /// one included, so a store that lost the counter (a Redis restarted empty) gets this
    /// instance's part back at its next count instead of starting again from zero. The
    /// counter is forgotten `ttl` after it was first counted (a quota's window). `None` when
    /// the store keeps no shared counters.
    async fn count(
        &self,
        _name: &str,
        _mine: u64,
        _ttl: std::time::Duration,
    ) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

/// One finished tool call. Never its arguments or results.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ToolCallRecord {
    /// Session that made the call.
    pub session_id: String,
    /// Tool name.
    pub tool: String,
    /// Start, ms since the Unix epoch.
    pub started_ms: i64,
    /// How long it took.
    pub duration_ms: i64,
    /// `ok`, `tool_error` (result with `isError`), `error` (JSON-RPC error), `timeout`,
    /// `upstream_lost`, `interrupted`.
    pub outcome: String,
    /// JSON-RPC error code, for outcomes other than `ok` and `tool_error`.
    pub error_code: Option<i64>,
}

/// A lifecycle event of a session, for its timeline.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionEvent {
    /// When, ms since the Unix epoch.
    pub at_ms: i64,
    /// `rehydrated` or `upstream_restarted`.
    pub kind: String,
}

/// Something for the ledger; written in batches off the request path.
#[derive(Debug, Clone)]
pub enum LedgerEvent {
    /// A tool call finished.
    ToolCall(ToolCallRecord),
    /// A stored session was resumed after a gateway restart.
    Rehydrated {
        /// Session id.
        id: String,
        /// When, ms since the Unix epoch.
        at_ms: i64,
    },
    /// A session's upstream was started again (crash, rehydration).
    UpstreamRestarted {
        /// Session id.
        id: String,
        /// When, ms since the Unix epoch.
        at_ms: i64,
    },
    /// A session was created. Only sent to a ledger on another backend than the live
    /// store (a backend holding both already has the row).
    Opened(Box<SessionRecord>),
    /// A session ended (same condition as [`LedgerEvent::Opened`]).
    Closed {
        /// Session id.
        id: String,
        /// Close reason.
        reason: String,
        /// When, ms since the Unix epoch.
        at_ms: i64,
    },
    /// A session was active (same condition; at most one a second per session).
    Touched {
        /// Session id.
        id: String,
        /// When, ms since the Unix epoch.
        at_ms: i64,
    },
}

/// A session as the ledger reports it: the record plus its counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionSummary {
    /// Session id.
    pub id: String,
    /// User id (`anonymous` without API keys).
    pub user_id: String,
    /// User email.
    pub user_email: Option<String>,
    /// User name.
    pub user_name: Option<String>,
    /// `clientInfo.name`.
    pub client_name: Option<String>,
    /// `clientInfo.version`.
    pub client_version: Option<String>,
    /// Detected client family.
    pub client_type: String,
    /// Negotiated protocol version.
    pub protocol_version: String,
    /// Configured upstream name.
    pub upstream_name: String,
    /// `live` or `closed`.
    pub state: String,
    /// Why it closed.
    pub close_reason: Option<String>,
    /// Created, ms since the Unix epoch.
    pub created_ms: i64,
    /// Last activity, ms since the Unix epoch.
    pub last_active_ms: i64,
    /// Closed, ms since the Unix epoch.
    pub closed_ms: Option<i64>,
    /// Closed (or now) minus created.
    pub duration_ms: i64,
    /// Tool calls made.
    pub tool_calls: i64,
    /// Tool calls that did not end `ok`.
    pub errors: i64,
    /// Resumptions after gateway restarts.
    pub rehydrations: i64,
    /// Upstream restarts.
    pub upstream_restarts: i64,
    /// `streamable-http`, `sse` (2024-11-05), or `pooled`: an upstream session the
    /// gateway holds for stateless (2026-07-28) clients.
    pub transport: String,
}

/// Which servers' sessions a lookup concerns.
#[derive(Debug, Clone, Copy)]
pub enum Servers<'a> {
    /// Every server's.
    All,
    /// Those of the server so named.
    Only(&'a str),
    /// Those of no server so named (the ones no registry of the process serves).
    NoneOf(&'a [String]),
}

impl Servers<'_> {
    /// Whether a session of server `name` is concerned.
    pub fn admits(&self, name: &str) -> bool {
        match self {
            Servers::All => true,
            Servers::Only(n) => *n == name,
            Servers::NoneOf(names) => !names.iter().any(|n| n == name),
        }
    }
}

/// Filters for listing sessions.
#[derive(Debug, Clone, Default)]
pub struct SessionQuery {
    /// Only live (`Some(Live)`) or closed sessions.
    pub state: Option<SessionState>,
    /// Only this user id.
    pub user: Option<String>,
    /// Only this client type or client name.
    pub client: Option<String>,
    /// Only sessions of this server (upstream name).
    pub server: Option<String>,
    /// Only sessions active (or closed) since this time.
    pub since_ms: Option<i64>,
    /// Page size.
    pub limit: usize,
    /// Page offset.
    pub offset: usize,
}

/// One tool call with its session's dimensions, for statistics.
#[derive(Debug, Clone)]
pub struct CallRow {
    /// The call.
    pub call: ToolCallRecord,
    /// Its session's client type.
    pub client_type: String,
    /// Its session's upstream.
    pub upstream_name: String,
    /// Its session's user.
    pub user_id: String,
}

/// Ledger-wide totals.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Totals {
    /// Sessions recorded (within retention).
    pub sessions: i64,
    /// Live sessions.
    pub active: i64,
    /// Mean duration of closed sessions.
    pub average_duration_ms: Option<f64>,
    /// Tool calls recorded.
    pub tool_calls: i64,
    /// Tool calls that did not end `ok`.
    pub errors: i64,
}

/// One user as the ledger knows them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UserRow {
    /// User id.
    pub id: String,
    /// Email.
    pub email: Option<String>,
    /// Name.
    pub name: Option<String>,
    /// Sessions recorded.
    pub sessions: i64,
    /// Live sessions.
    pub active: i64,
    /// Tool calls.
    pub tool_calls: i64,
    /// Failed tool calls.
    pub errors: i64,
    /// Last activity, ms since the Unix epoch.
    pub last_active_ms: Option<i64>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
