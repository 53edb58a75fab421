//! The `[limits]` table and its flags: every bound the gateway keeps, one row each in
//! [`LIMITS`]. The row is the option: its flag, its `TETHER_*` variable and its `[limits]`
//! key (the CLI builds its arguments from the rows), its default, whether a server's
//! `tether` table may set it, and its one doc line (the README's Limits table is generated
//! from the rows and checked against them). [`Limits::resolve`] turns the set values into
//! typed bounds, one line each. Also the tool-call quota's `N/WINDOW`.
//!
//! Must not: accept a bound it cannot keep (zero where one is needed is an error), or a key
//! no row names.

use std::sync::LazyLock;

use super::values::{Fallback, Opt, Reader, Rows, Values};
use super::*;

/// Every limit, in the README's order.
pub const LIMITS: &[Opt] = &[
    Opt::limit(
        "header-timeout",
        "TETHER_HEADER_TIMEOUT",
        "DUR",
        Fallback::Is("10s"),
        "Time a client has to send its request headers; an idle keep-alive connection is closed after the same time",
    ),
    Opt::limit(
        "body-timeout",
        "TETHER_BODY_TIMEOUT",
        "DUR",
        Fallback::Is("30s"),
        "Time a client has to send a request body (`408` after)",
    ),
    Opt::limit(
        "write-timeout",
        "TETHER_WRITE_TIMEOUT",
        "DUR",
        Fallback::Is("30s"),
        "A connection that takes none of our bytes for this long (a client that stopped reading) is cut",
    ),
    Opt::limit(
        "max-connections",
        "TETHER_MAX_CONNECTIONS",
        "N",
        Fallback::Is("1024"),
        "Open connections on the MCP listener. When it is full, the oldest connection that never finished a request's headers is cut to make room for a newcomer (a connection that carried a request never is); with none such, the newcomer is answered `503` at once and closed",
    ),
    Opt::limit(
        "max-connections-per-addr",
        "TETHER_MAX_CONNECTIONS_PER_ADDR",
        "N",
        Fallback::Derived("half of `--max-connections`"),
        "Open connections from one client address (behind a reverse proxy every client shares its address: raise it)",
    ),
    Opt::limit(
        "admin-max-connections",
        "TETHER_ADMIN_MAX_CONNECTIONS",
        "N",
        Fallback::Is("64"),
        "Open connections on the admin listener, a budget of its own: health and metrics answer while the MCP listener is full",
    ),
    Opt::limit(
        "max-sessions",
        "TETHER_MAX_SESSIONS",
        "N",
        Fallback::Is("1000"),
        "Live sessions held by this process (new and resumed ones); `503`, `-32016` above",
    )
    .server(),
    Opt::limit(
        "max-sessions-per-principal",
        "TETHER_MAX_SESSIONS_PER_PRINCIPAL",
        "N",
        Fallback::Derived("a quarter of `--max-sessions`"),
        "Live sessions of one API-key user (without keys everyone is one anonymous user, bounded by `--max-sessions` only)",
    ),
    Opt::limit(
        "session-rate",
        "TETHER_SESSION_RATE",
        "N",
        Fallback::Is("20"),
        "New sessions per second per user and per client address; `429`, `-32016` above",
    )
    .server(),
    Opt::limit(
        "session-burst",
        "TETHER_SESSION_BURST",
        "N",
        Fallback::Is("40"),
        "New sessions allowed in a burst above the rate",
    ),
    Opt::limit(
        "max-upstreams",
        "TETHER_MAX_UPSTREAMS",
        "N",
        Fallback::Is("--max-sessions"),
        "Running upstreams (stdio processes, HTTP upstream sessions)",
    )
    .server(),
    Opt::limit(
        "circuit-failures",
        "TETHER_CIRCUIT_FAILURES",
        "N",
        Fallback::Is("5"),
        "Consecutive upstream start failures, across sessions, that open the circuit: new starts are refused (`503`, `-32010`, `data.kind: circuit_open`) and `/health/ready` fails until one start succeeds. Failures of one moment (starts begun before the last failure was known, such as every session of a restarted upstream at once) count once; the gateway's own shortage (open files, memory: `-32016`, `data.limit: gateway-resources`) never counts",
    ),
    Opt::limit(
        "circuit-cooldown",
        "TETHER_CIRCUIT_COOLDOWN",
        "DUR",
        Fallback::Is("10s"),
        "The longest wait between starts tried through an open circuit: the first is tried after 250 ms, each failed one doubles the wait up to this. A session whose own restart failed starts again as soon as another start succeeds, so an upstream back within a second is used within about a second",
    ),
    Opt::limit(
        "max-upstream-message",
        "TETHER_MAX_UPSTREAM_MESSAGE",
        "SIZE",
        Fallback::Is("16MiB"),
        "Largest message read from an upstream; a larger answer fails its call with `-32017` naming the limit, and the upstream keeps running",
    ),
    Opt::limit(
        "stream-buffer",
        "TETHER_STREAM_BUFFER",
        "SIZE",
        Fallback::Is("4MiB"),
        "Unread bytes held in memory per response stream; past it the stream is closed and the client resumes it from the log with `Last-Event-ID`",
    ),
    Opt::limit(
        "max-stream-events",
        "TETHER_MAX_STREAM_EVENTS",
        "N",
        Fallback::Is("10000"),
        "Events kept per stream for `Last-Event-ID` in SQLite, and 10 times as many per session (older ones are dropped; Redis keeps 1,000 per stream)",
    ),
    Opt::limit(
        "max-session-log",
        "TETHER_MAX_SESSION_LOG",
        "SIZE",
        Fallback::Is("64MiB"),
        "Bytes of events kept per session (all its streams) in SQLite: past it the session's oldest events are dropped (never a stream's newest). Freed space goes back to the file system (the database shrinks after pruning; the WAL is cut back to 16 MiB after checkpoints). A session's events waiting to be written are bounded by `--stream-buffer` too: past it the session's upstream is not read until the store catches up, so a flood is held at its source, not in memory",
    ),
    Opt::limit(
        "stderr-lines-per-sec",
        "TETHER_STDERR_LINES_PER_SEC",
        "N",
        Fallback::Is("50"),
        "Upstream stderr lines logged per second per upstream; lines are cut at 2 KiB with their length logged, the lines over the rate are counted",
    ),
    Opt::limit(
        "quota-tool-calls",
        "TETHER_QUOTA_TOOL_CALLS",
        "N/WINDOW",
        Fallback::None,
        "Tool calls each user (API-key user; `anonymous` without keys) may make per window (`1000/1d`, `60/1h`). Windows are aligned to the epoch (a day resets at 00:00 UTC); with Redis the count is the deployment's (while Redis is away each instance counts its own, and no call is refused for it; a Redis restarted empty gets each instance's part of the window back with that instance's next call). A call over it: `-32016` with `data.limit = \"quota-tool-calls\"`, `quota`, `window_ms`, `resets_at_ms` and `retry_in_ms`, recorded `refused`; other methods are not counted. `GET /api/quotas` and `tether quotas` show each user's use",
    ),
    Opt::limit(
        "max-initialize",
        "TETHER_MAX_INITIALIZE",
        "SIZE",
        Fallback::Is("64KiB"),
        "The `initialize` params a session stores and replays to every fresh upstream (pooled sessions of 2026-07-28 clients too); larger: `400`, `-32602`, `data.limit: max-initialize`, nothing kept",
    ),
    Opt::limit(
        "max-subscriptions",
        "TETHER_MAX_SUBSCRIPTIONS",
        "N",
        Fallback::Is("1000"),
        "Resource subscriptions one session holds (legacy `resources/subscribe`; a 2026-07-28 `subscriptions/listen`'s `resourceSubscriptions` on its pooled session), and 256 bytes of URIs each on average; one URI at most 4 KiB. Over it: `-32016`, `data.limit: max-subscriptions` (or `max-subscription-uri`), nothing sent upstream; an unsubscribe or the session's end gives places back",
    ),
    Opt::limit(
        "max-subscriptions-per-principal",
        "TETHER_MAX_SUBSCRIPTIONS_PER_PRINCIPAL",
        "N",
        Fallback::Derived("10 × `--max-subscriptions`"),
        "The same for all sessions of one user together (`data.limit: max-subscriptions-per-principal`)",
    ),
    Opt::limit(
        "max-tasks",
        "TETHER_MAX_TASKS",
        "N",
        Fallback::Is("1024"),
        "Durable tasks (both eras) running at once on one server (each holds a call on an upstream and a runner). Over it: a 2025-11-25 `params.task` call gets `-32016`, `data.limit: max-tasks`; a 2026-07-28 call stays a plain call",
    ),
    Opt::limit(
        "max-tasks-per-principal",
        "TETHER_MAX_TASKS_PER_PRINCIPAL",
        "N",
        Fallback::Is("64"),
        "The same for one user on one server (`data.limit: max-tasks-per-principal`)",
    ),
    Opt::limit(
        "max-stored-tasks",
        "TETHER_MAX_STORED_TASKS",
        "N",
        Fallback::Is("256"),
        "Tasks one user may have kept (running or ended, until their time to live ends; `data.limit: max-stored-tasks`)",
    ),
    Opt::limit(
        "max-task-result",
        "TETHER_MAX_TASK_RESULT",
        "SIZE",
        Fallback::Is("1MiB"),
        "The largest answer a task keeps; a larger one fails the task with `-32017` naming the bound (with `max-stored-tasks`, what one user can make the store hold)",
    ),
    Opt::limit(
        "task-ttl",
        "TETHER_TASK_TTL",
        "DUR",
        Fallback::Is("1h"),
        "How long a task is kept, and the most a 2025-11-25 client may ask for; its call is cancelled upstream when it is over",
    ),
    Opt::limit(
        "pool-size",
        "TETHER_POOL_SIZE",
        "N",
        Fallback::Is("4"),
        "Upstream sessions pooled for stateless (2026-07-28) clients per user and per client application (name and capabilities; each counts as a session in the limits above; idle ones expire with `--idle-timeout`)",
    )
    .alias("bridge-pool-size"),
];

/// The row of `key` (or of its earlier name).
pub fn limit(key: &str) -> Option<&'static Opt> {
    LimitRows::row(key)
}

/// The keys a `[limits]` table may hold, for serde's "expected one of" message.
static LIMIT_KEYS: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| LIMITS.iter().map(|o| o.key).collect());

/// The table of [`LIMITS`].
pub struct LimitRows;

impl Rows for LimitRows {
    fn rows() -> &'static [Opt] {
        LIMITS
    }

    fn file_keys() -> &'static [&'static str] {
        &LIMIT_KEYS
    }
}

/// The `[limits]` values that are set, by key (each a key of [`LIMITS`]); flags and
/// `TETHER_*` variables of the same names override the config file's.
pub type LimitsLayer = Values<LimitRows>;

/// Resolved resource limits: [`LIMITS`] with what is set, defaults for the rest. Each field
/// is the row of the same name.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// `header-timeout`.
    pub header_timeout: Duration,
    /// `body-timeout`.
    pub body_timeout: Duration,
    /// `write-timeout`.
    pub write_timeout: Duration,
    /// `max-connections`.
    pub max_connections: usize,
    /// `max-connections-per-addr`.
    pub max_connections_per_addr: usize,
    /// `admin-max-connections`.
    pub admin_max_connections: usize,
    /// `max-sessions`.
    pub max_sessions: usize,
    /// `max-sessions-per-principal`.
    pub max_sessions_per_principal: usize,
    /// `max-upstreams`.
    pub max_upstreams: usize,
    /// `session-rate`.
    pub session_rate: u32,
    /// `session-burst`.
    pub session_burst: u32,
    /// `max-upstream-message`.
    pub max_upstream_message: usize,
    /// `stream-buffer`.
    pub stream_buffer: usize,
    /// `max-stream-events`.
    pub max_stream_events: u64,
    /// `stderr-lines-per-sec`.
    pub stderr_lines_per_sec: u32,
    /// `pool-size`.
    pub pool_size: usize,
    /// `max-tasks`.
    pub max_tasks: usize,
    /// `max-tasks-per-principal`.
    pub max_tasks_per_principal: usize,
    /// `max-stored-tasks`.
    pub max_stored_tasks: usize,
    /// `max-task-result`.
    pub max_task_result: usize,
    /// `task-ttl`.
    pub task_ttl: Duration,
    /// `quota-tool-calls`; `None`: no quota.
    pub quota_tool_calls: Option<Quota>,
    /// `circuit-failures`.
    pub circuit_failures: u32,
    /// `circuit-cooldown`.
    pub circuit_cooldown: Duration,
    /// `max-initialize`.
    pub max_initialize: usize,
    /// `max-subscriptions`.
    pub max_subscriptions: usize,
    /// `max-subscriptions-per-principal`.
    pub max_subscriptions_per_principal: usize,
    /// `max-session-log`.
    pub max_session_log: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::resolve(&mut Vec::new(), &LimitsLayer::default())
    }
}

impl Limits {
    pub(super) fn resolve(errors: &mut Vec<String>, l: &LimitsLayer) -> Limits {
        let mut r = Reader { layer: l, errors };
        let max_sessions = r.count("max-sessions", None);
        let max_connections = r.count("max-connections", None);
        let max_subscriptions = r.count("max-subscriptions", None);
        let quota_tool_calls = r.text("quota-tool-calls").map(str::to_owned);
        Limits {
            header_timeout: r.duration("header-timeout"),
            body_timeout: r.duration("body-timeout"),
            write_timeout: r.duration("write-timeout"),
            max_connections,
            max_connections_per_addr: r.count(
                "max-connections-per-addr",
                Some(max_connections.div_ceil(2)),
            ),
            admin_max_connections: r.count("admin-max-connections", None),
            max_sessions,
            max_sessions_per_principal: r
                .count("max-sessions-per-principal", Some(max_sessions.div_ceil(4))),
            max_upstreams: r.count("max-upstreams", Some(max_sessions)),
            session_rate: r.rate("session-rate"),
            session_burst: r.rate("session-burst"),
            max_upstream_message: r.size("max-upstream-message"),
            stream_buffer: r.size("stream-buffer"),
            // Zero means the least that works, as it always has.
            max_stream_events: r.number("max-stream-events", None).max(1),
            stderr_lines_per_sec: u32::try_from(r.number("stderr-lines-per-sec", None))
                .unwrap_or(u32::MAX)
                .max(1),
            pool_size: r.count("pool-size", None),
            max_tasks: r.count("max-tasks", None),
            max_tasks_per_principal: r.count("max-tasks-per-principal", None),
            max_stored_tasks: r.count("max-stored-tasks", None),
            max_task_result: r.size("max-task-result"),
            task_ttl: r.duration("task-ttl"),
            quota_tool_calls: quota_tool_calls.and_then(|q| {
                Quota::parse(&q)
                    .map_err(|e| r.errors.push(format!("quota-tool-calls: {e}")))
                    .ok()
            }),
            circuit_failures: u32::try_from(r.number("circuit-failures", None))
                .unwrap_or(u32::MAX)
                .max(1),
            circuit_cooldown: r.duration("circuit-cooldown"),
            max_initialize: r.size("max-initialize"),
            max_subscriptions,
            max_subscriptions_per_principal: r.count(
                "max-subscriptions-per-principal",
                Some(max_subscriptions.saturating_mul(10)),
            ),
            max_session_log: r.size("max-session-log"),
        }
    }
}

/// A quota: `limit` tool calls per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Calls allowed in one window.
    pub limit: u64,
    /// The window's length.
    pub window: Duration,
}

impl Quota {
    /// Parses `N/WINDOW` (`1000/1d`, `60/1h`, `5/10s`).
    pub fn parse(text: &str) -> Result<Quota, String> {
        let (n, w) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not N/WINDOW, such as 1000/1d"))?;
        let limit: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {n:?} is not a number of calls"))?;
        let window = humantime::parse_duration(w.trim())
            .map_err(|e| format!("{text:?}: {w:?} is not a duration ({e})"))?;
        if window < Duration::from_secs(1) {
            return Err(format!("{text:?}: the window must be at least 1s"));
        }
        Ok(Quota { limit, window })
    }
}
