//! The `[limits]` table and its flags: every bound the gateway keeps, read as optional
//! values and resolved with their defaults; and the tool-call quota's `N/WINDOW`.
//!
//! Must not: accept a bound it cannot keep (zero where one is needed is an error).

use super::*;

/// The `[limits]` table: every bound the gateway keeps on connections, sessions, upstreams
/// and buffers. Flags and `TETHER_*` variables of the same names override it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsLayer {
    /// Time a client has to send its request headers; an idle keep-alive connection is
    /// closed after the same time.
    pub header_timeout: Option<String>,
    /// Time a client has to send a request body.
    pub body_timeout: Option<String>,
    /// Time a connection may refuse our writes (a client that does not read) before it is cut.
    pub write_timeout: Option<String>,
    /// Open connections on the MCP listener.
    pub max_connections: Option<usize>,
    /// Open connections on the MCP listener from one client address.
    pub max_connections_per_addr: Option<usize>,
    /// Open connections on the admin listener (its own budget).
    pub admin_max_connections: Option<usize>,
    /// Sessions held by this process.
    pub max_sessions: Option<usize>,
    /// Sessions held by this process for one authenticated principal.
    pub max_sessions_per_principal: Option<usize>,
    /// Running upstreams (stdio children or HTTP upstream sessions).
    pub max_upstreams: Option<usize>,
    /// New sessions per second per principal and per client address.
    pub session_rate: Option<u32>,
    /// Burst of new sessions allowed above the rate.
    pub session_burst: Option<u32>,
    /// Largest message accepted from an upstream.
    pub max_upstream_message: Option<SizeValue>,
    /// Bytes buffered in memory per response stream for a client that reads slowly.
    pub stream_buffer: Option<SizeValue>,
    /// Events kept in the log per stream for `Last-Event-ID` (older ones are dropped).
    pub max_stream_events: Option<u64>,
    /// Upstream stderr lines logged per second per upstream (the rest are counted).
    pub stderr_lines_per_sec: Option<u32>,
    /// Consecutive upstream start failures (across sessions) that open the circuit.
    pub circuit_failures: Option<u32>,
    /// How long an open circuit refuses new upstream starts before one is tried again.
    pub circuit_cooldown: Option<String>,
    /// Upstream sessions pooled for stateless (2026-07-28) clients per user and client
    /// (`bridge-pool-size`, its earlier name, is still read).
    #[serde(alias = "bridge-pool-size")]
    pub pool_size: Option<usize>,
    /// Tool calls each user may make per window, as `N/WINDOW` (`1000/1d`).
    pub quota_tool_calls: Option<String>,
    /// Largest `initialize` params a session may store (replayed to every fresh upstream); larger ones are refused with `-32602`.
    pub max_initialize: Option<SizeValue>,
    /// Resource subscriptions one session may hold (and 256 bytes of URIs each on average).
    pub max_subscriptions: Option<usize>,
    /// Resource subscriptions all sessions of one user may hold together.
    pub max_subscriptions_per_principal: Option<usize>,
    /// Bytes of stream events kept per session for `Last-Event-ID` (SQLite), the oldest dropped past it.
    pub max_session_log: Option<SizeValue>,
}

impl LimitsLayer {
    pub(super) fn overlay(self, over: LimitsLayer) -> LimitsLayer {
        macro_rules! pick {
            ($($f:ident),*) => { LimitsLayer { $($f: over.$f.or(self.$f)),* } };
        }
        pick!(
            header_timeout,
            body_timeout,
            write_timeout,
            max_connections,
            max_connections_per_addr,
            admin_max_connections,
            max_sessions,
            max_sessions_per_principal,
            max_upstreams,
            session_rate,
            session_burst,
            max_upstream_message,
            stream_buffer,
            max_stream_events,
            stderr_lines_per_sec,
            circuit_failures,
            circuit_cooldown,
            pool_size,
            quota_tool_calls,
            max_initialize,
            max_subscriptions,
            max_subscriptions_per_principal,
            max_session_log
        )
    }
}

/// Resolved resource limits ([`LimitsLayer`] with defaults applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// See [`LimitsLayer::header_timeout`].
    pub header_timeout: Duration,
    /// See [`LimitsLayer::body_timeout`].
    pub body_timeout: Duration,
    /// See [`LimitsLayer::write_timeout`].
    pub write_timeout: Duration,
    /// See [`LimitsLayer::max_connections`].
    pub max_connections: usize,
    /// See [`LimitsLayer::max_connections_per_addr`].
    pub max_connections_per_addr: usize,
    /// See [`LimitsLayer::admin_max_connections`].
    pub admin_max_connections: usize,
    /// See [`LimitsLayer::max_sessions`].
    pub max_sessions: usize,
    /// See [`LimitsLayer::max_sessions_per_principal`].
    pub max_sessions_per_principal: usize,
    /// See [`LimitsLayer::max_upstreams`].
    pub max_upstreams: usize,
    /// See [`LimitsLayer::session_rate`].
    pub session_rate: u32,
    /// See [`LimitsLayer::session_burst`].
    pub session_burst: u32,
    /// See [`LimitsLayer::max_upstream_message`].
    pub max_upstream_message: usize,
    /// See [`LimitsLayer::stream_buffer`].
    pub stream_buffer: usize,
    /// See [`LimitsLayer::max_stream_events`].
    pub max_stream_events: u64,
    /// See [`LimitsLayer::stderr_lines_per_sec`].
    pub stderr_lines_per_sec: u32,
    /// See [`LimitsLayer::pool_size`].
    pub pool_size: usize,
    /// See [`LimitsLayer::quota_tool_calls`]; `None`: no quota.
    pub quota_tool_calls: Option<Quota>,
    /// See [`LimitsLayer::circuit_failures`].
    pub circuit_failures: u32,
    /// See [`LimitsLayer::circuit_cooldown`].
    pub circuit_cooldown: Duration,
    /// See [`LimitsLayer::max_initialize`].
    pub max_initialize: usize,
    /// See [`LimitsLayer::max_subscriptions`].
    pub max_subscriptions: usize,
    /// See [`LimitsLayer::max_subscriptions_per_principal`].
    pub max_subscriptions_per_principal: usize,
    /// See [`LimitsLayer::max_session_log`].
    pub max_session_log: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::resolve(&mut Vec::new(), &LimitsLayer::default())
    }
}

impl Limits {
    pub(super) fn resolve(errors: &mut Vec<String>, l: &LimitsLayer) -> Limits {
        let positive = |errors: &mut Vec<String>, name: &str, v: Option<usize>, d: usize| {
            let v = v.unwrap_or(d);
            if v == 0 {
                errors.push(format!("{name}: must be greater than zero"));
            }
            v
        };
        let max_sessions = positive(errors, "max-sessions", l.max_sessions, 1000);
        let max_connections = positive(errors, "max-connections", l.max_connections, 1024);
        let max_subscriptions = positive(errors, "max-subscriptions", l.max_subscriptions, 1000);
        let stream_buffer = size(
            errors,
            "stream-buffer",
            l.stream_buffer.as_ref(),
            DEFAULT_STREAM_BUFFER,
        );
        Limits {
            header_timeout: duration(
                errors,
                "header-timeout",
                l.header_timeout.as_deref(),
                DEFAULT_HEADER_TIMEOUT,
            ),
            body_timeout: duration(
                errors,
                "body-timeout",
                l.body_timeout.as_deref(),
                DEFAULT_BODY_TIMEOUT,
            ),
            write_timeout: duration(
                errors,
                "write-timeout",
                l.write_timeout.as_deref(),
                DEFAULT_WRITE_TIMEOUT,
            ),
            max_connections,
            max_connections_per_addr: positive(
                errors,
                "max-connections-per-addr",
                l.max_connections_per_addr,
                max_connections.div_ceil(2),
            ),
            admin_max_connections: positive(
                errors,
                "admin-max-connections",
                l.admin_max_connections,
                64,
            ),
            max_sessions,
            max_sessions_per_principal: positive(
                errors,
                "max-sessions-per-principal",
                l.max_sessions_per_principal,
                max_sessions.div_ceil(4),
            ),
            max_upstreams: positive(errors, "max-upstreams", l.max_upstreams, max_sessions),
            session_rate: u32::try_from(positive(
                errors,
                "session-rate",
                l.session_rate.map(|v| v as usize),
                20,
            ))
            .unwrap_or(u32::MAX),
            session_burst: u32::try_from(positive(
                errors,
                "session-burst",
                l.session_burst.map(|v| v as usize),
                40,
            ))
            .unwrap_or(u32::MAX),
            max_upstream_message: size(
                errors,
                "max-upstream-message",
                l.max_upstream_message.as_ref(),
                "16MiB",
            ),
            stream_buffer,
            max_stream_events: l.max_stream_events.unwrap_or(10_000).max(1),
            stderr_lines_per_sec: l.stderr_lines_per_sec.unwrap_or(50).max(1),
            pool_size: positive(errors, "pool-size", l.pool_size, 4),
            quota_tool_calls: l.quota_tool_calls.as_deref().and_then(|q| {
                Quota::parse(q)
                    .map_err(|e| errors.push(format!("quota-tool-calls: {e}")))
                    .ok()
            }),
            circuit_failures: l.circuit_failures.unwrap_or(5).max(1),
            circuit_cooldown: duration(
                errors,
                "circuit-cooldown",
                l.circuit_cooldown.as_deref(),
                DEFAULT_CIRCUIT_COOLDOWN,
            ),
            max_initialize: size(errors, "max-initialize", l.max_initialize.as_ref(), "64KiB"),
            max_subscriptions,
            max_subscriptions_per_principal: positive(
                errors,
                "max-subscriptions-per-principal",
                l.max_subscriptions_per_principal,
                max_subscriptions.saturating_mul(10),
            ),
            max_session_log: size(
                errors,
                "max-session-log",
                l.max_session_log.as_ref(),
                "64MiB",
            ),
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
