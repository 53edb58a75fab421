//! Prometheus metrics. Labels are bounded: reasons, outcomes, method classes and status
//! codes come from fixed sets; never a session id, user or tool argument.
//!
//! Must not: label by session id, user or tool argument.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: why a session closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `client_disconnect`, `timeout`, `evicted`, `server_shutdown`, ...
    pub reason: String,
}

/// Label: how a task ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskStatusLabel {
    /// `completed`, `failed` or `cancelled`.
    pub status: String,
}

/// Label: how a tool call ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok`, `tool_error`, `error`, `timeout`, `upstream_lost`, `interrupted`.
    pub outcome: String,
}

/// Label: one configured server (names come from the configuration, so they are bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabel {
    /// The server's name (`/servers/NAME/mcp`).
    pub server: String,
}

/// Label: tool calls of one server by outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerOutcomeLabel {
    /// The server's name.
    pub server: String,
    /// As [`OutcomeLabel::outcome`].
    pub outcome: String,
}

/// Label: HTTP requests by class and status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// `initialize`, `request`, `notification`, `response`, `stream`, `delete`, `invalid`.
    pub class: String,
    /// HTTP status code.
    pub status: u16,
}

/// Label: a JSON-RPC request by protocol era and method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EraLabel {
    /// `legacy` (sessions) or `modern` (2026-07-28, stateless).
    pub era: String,
    /// The MCP method if it is one of the spec's, else `other`.
    pub method: String,
}

/// Methods counted under their own name; anything else a client sends is `other`, so a
/// client cannot grow the label set.
const COUNTED_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "server/discover",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "subscriptions/listen",
];

/// Label: which limit refused a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// `max-sessions`, `max-sessions-per-principal`, `max-upstreams`, `session-rate per
    /// user`, `session-rate per client address`, `circuit_open`.
    pub limit: String,
}

/// Label: a listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `mcp` or `admin`.
    pub listener: String,
}

/// Label: a refused or cut connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    /// `mcp` or `admin`.
    pub listener: String,
    /// `max-connections`, `max-connections-per-addr`, `accept_error`, `header_timeout`,
    /// `write_timeout`.
    pub reason: String,
}

/// Every metric of the gateway.
pub struct Metrics {
    registry: Registry,
    /// Live sessions in the live store (deployment-wide with Redis): the figure `/health`
    /// reports as `live_sessions`, read from the store when scraped.
    pub sessions_live: Gauge,
    /// Sessions held in memory by this process; the rest of the live ones resume on contact.
    pub sessions_held: Gauge,
    /// Sessions created.
    pub sessions_created: Counter,
    /// Sessions closed, by reason.
    pub sessions_closed: Family<ReasonLabel, Counter>,
    /// Stored sessions brought back after a restart.
    pub rehydrations: Counter,
    /// Upstreams started (first start of a session included).
    pub upstream_starts: Counter,
    /// Upstreams started again for an existing session (crash, rehydration).
    pub upstream_restarts: Counter,
    /// Upstreams that failed to start or died.
    pub upstream_failures: Counter,
    /// Tool calls by outcome.
    pub tool_calls: Family<OutcomeLabel, Counter>,
    /// Tool call duration in seconds.
    pub tool_call_seconds: Histogram,
    /// HTTP requests on the MCP listener.
    pub requests: Family<RequestLabel, Counter>,
    /// JSON-RPC requests by era and method.
    pub mcp_requests: Family<EraLabel, Counter>,
    /// Ledger records waiting to be written.
    pub ledger_queue_depth: Gauge,
    /// Time to write one ledger batch, in seconds.
    pub ledger_batch_seconds: Histogram,
    /// Ledger records dropped because the queue was full.
    pub ledger_dropped: Counter,
    /// Ledger records waiting for the ledger database to come back.
    pub ledger_backlog: Gauge,
    /// Whether the live store answers (1) or is unreachable (0).
    pub store_up: Gauge,
    /// Live-store writes held in memory while the store is unreachable.
    pub store_buffered: Gauge,
    /// Live-store writes dropped because the outage buffer was full.
    pub store_dropped: Counter,
    /// Times the live store became unreachable.
    pub store_outages: Counter,
    /// Requests forwarded to the instance that owns their session.
    pub forwarded: Counter,
    /// Sessions this instance took over from an instance that stopped.
    pub takeovers: Counter,
    /// Requests refused by a limit, by limit.
    pub refusals: Family<LimitLabel, Counter>,
    /// Upstream messages skipped for their size.
    pub upstream_oversized: Counter,
    /// Open connections per listener.
    pub connections_open: Family<ListenerLabel, Gauge>,
    /// Connections refused or cut, by listener and reason.
    pub connections_refused: Family<ConnectionLabel, Counter>,
    /// 1 while the upstream's circuit refuses new starts.
    pub upstream_circuit_open: Gauge,
    /// Upstreams running (stdio processes or HTTP upstream sessions).
    pub upstreams_running: Gauge,
    /// Response streams closed because their client did not read.
    pub stream_overflows: Counter,
    /// Sessions held, by server (they sum to `sessions_held`).
    pub server_sessions_held: Family<ServerLabel, Gauge>,
    /// Sessions created, by server.
    pub server_sessions_created: Family<ServerLabel, Counter>,
    /// Tool calls by server and outcome (they sum to `tool_calls`).
    pub server_tool_calls: Family<ServerOutcomeLabel, Counter>,
    /// Upstreams running, by server.
    pub server_upstreams_running: Family<ServerLabel, Gauge>,
    /// 1 while a server's circuit refuses new starts, by server.
    pub server_circuit_open: Family<ServerLabel, Gauge>,
    /// Tasks created (durable before their client heard of them).
    pub tasks_created: Counter,
    /// Tasks ended, by their final status.
    pub tasks_ended: Family<TaskStatusLabel, Counter>,
    /// Tasks re-issued after a gateway restart.
    pub tasks_resumed: Counter,
    /// Tasks this process runs now.
    pub tasks_running: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tether");
        let m = Metrics {
            sessions_live: Gauge::default(),
            sessions_held: Gauge::default(),
            sessions_created: Counter::default(),
            sessions_closed: Family::default(),
            rehydrations: Counter::default(),
            upstream_starts: Counter::default(),
            upstream_restarts: Counter::default(),
            upstream_failures: Counter::default(),
            tool_calls: Family::default(),
            tool_call_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            requests: Family::default(),
            mcp_requests: Family::default(),
            ledger_queue_depth: Gauge::default(),
            ledger_batch_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ledger_dropped: Counter::default(),
            ledger_backlog: Gauge::default(),
            store_up: Gauge::default(),
            store_buffered: Gauge::default(),
            store_dropped: Counter::default(),
            store_outages: Counter::default(),
            forwarded: Counter::default(),
            takeovers: Counter::default(),
            refusals: Family::default(),
            upstream_oversized: Counter::default(),
            connections_open: Family::default(),
            connections_refused: Family::default(),
            upstream_circuit_open: Gauge::default(),
            upstreams_running: Gauge::default(),
            stream_overflows: Counter::default(),
            server_sessions_held: Family::default(),
            server_sessions_created: Family::default(),
            server_tool_calls: Family::default(),
            server_upstreams_running: Family::default(),
            server_circuit_open: Family::default(),
            tasks_created: Counter::default(),
            tasks_ended: Family::default(),
            tasks_resumed: Counter::default(),
            tasks_running: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "tasks_created",
            "Tasks created (each durable before its client heard of it)",
            m.tasks_created.clone(),
        );
        registry.register(
            "tasks_ended",
            "Tasks ended, by final status",
            m.tasks_ended.clone(),
        );
        registry.register(
            "tasks_resumed",
            "Tasks re-issued after a gateway restart",
            m.tasks_resumed.clone(),
        );
        registry.register(
            "tasks_running",
            "Tasks this process runs now",
            m.tasks_running.clone(),
        );
        registry.register(
            "refused_requests",
            "Requests refused by a limit (503 or 429), by limit",
            m.refusals.clone(),
        );
        registry.register(
            "upstream_oversized_messages",
            "Upstream messages skipped for being over --max-upstream-message",
            m.upstream_oversized.clone(),
        );
        registry.register(
            "connections_open",
            "Open client connections per listener",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at accept or cut for a timeout, by listener and reason",
            m.connections_refused.clone(),
        );
        registry.register(
            "upstream_circuit_open",
            "1 while new upstream starts are refused after consecutive start failures",
            m.upstream_circuit_open.clone(),
        );
        registry.register(
            "upstreams_running",
            "Upstreams running (stdio processes or HTTP upstream sessions)",
            m.upstreams_running.clone(),
        );
        registry.register(
            "stream_overflows",
            "Response streams closed because their client did not read (--stream-buffer)",
            m.stream_overflows.clone(),
        );
        registry.register(
            "server_sessions_held",
            "Sessions held in memory by this process, by server",
            m.server_sessions_held.clone(),
        );
        registry.register(
            "server_sessions_created",
            "Sessions created, by server",
            m.server_sessions_created.clone(),
        );
        registry.register(
            "server_tool_calls",
            "Tool calls by server and outcome",
            m.server_tool_calls.clone(),
        );
        registry.register(
            "server_upstreams_running",
            "Upstreams running, by server",
            m.server_upstreams_running.clone(),
        );
        registry.register(
            "server_upstream_circuit_open",
            "1 while a server's new upstream starts are refused after consecutive start failures",
            m.server_circuit_open.clone(),
        );
        m.store_up.set(1);
        registry.register(
            "ledger_backlog",
            "Ledger records waiting for the ledger database to come back",
            m.ledger_backlog.clone(),
        );
        registry.register(
            "store_up",
            "Whether the live store answers (1) or is unreachable (0)",
            m.store_up.clone(),
        );
        registry.register(
            "store_buffered_writes",
            "Live-store writes held in memory while the store is unreachable",
            m.store_buffered.clone(),
        );
        registry.register(
            "store_dropped_writes",
            "Live-store writes dropped because the outage buffer was full",
            m.store_dropped.clone(),
        );
        registry.register(
            "store_outages",
            "Times the live store became unreachable",
            m.store_outages.clone(),
        );
        registry.register(
            "forwarded_requests",
            "Requests forwarded to the instance that owns their session",
            m.forwarded.clone(),
        );
        registry.register(
            "session_takeovers",
            "Sessions taken over from an instance that stopped",
            m.takeovers.clone(),
        );
        registry.register(
            "sessions_live",
            "Live sessions in the live store (held here or resumable on contact); /health live_sessions",
            m.sessions_live.clone(),
        );
        registry.register(
            "sessions_held",
            "Sessions held in memory by this process (upstream state, open streams); the other live ones resume on contact",
            m.sessions_held.clone(),
        );
        registry.register(
            "mcp_requests",
            "JSON-RPC requests by protocol era (legacy: sessions; modern: 2026-07-28, stateless) and method",
            m.mcp_requests.clone(),
        );
        registry.register(
            "sessions_created",
            "Sessions created",
            m.sessions_created.clone(),
        );
        registry.register(
            "sessions_closed",
            "Sessions closed, by reason",
            m.sessions_closed.clone(),
        );
        registry.register(
            "rehydrations",
            "Stored sessions resumed after a gateway restart",
            m.rehydrations.clone(),
        );
        registry.register(
            "upstream_starts",
            "Upstreams started",
            m.upstream_starts.clone(),
        );
        registry.register(
            "upstream_restarts",
            "Upstreams restarted for an existing session",
            m.upstream_restarts.clone(),
        );
        registry.register(
            "upstream_failures",
            "Upstreams that failed to start or died",
            m.upstream_failures.clone(),
        );
        registry.register("tool_calls", "Tool calls by outcome", m.tool_calls.clone());
        registry.register(
            "tool_call_duration_seconds",
            "Tool call duration",
            m.tool_call_seconds.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests on the MCP listener by class and status",
            m.requests.clone(),
        );
        registry.register(
            "ledger_queue_depth",
            "Ledger records waiting to be written",
            m.ledger_queue_depth.clone(),
        );
        registry.register(
            "ledger_batch_duration_seconds",
            "Time to write one ledger batch",
            m.ledger_batch_seconds.clone(),
        );
        registry.register(
            "ledger_dropped",
            "Ledger records dropped because the queue was full",
            m.ledger_dropped.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts a task that ended with `status`.
    pub fn task_ended(&self, status: &str) {
        self.tasks_ended
            .get_or_create(&TaskStatusLabel {
                status: status.to_owned(),
            })
            .inc();
    }

    /// Counts a closed session.
    pub fn closed(&self, reason: &str) {
        self.sessions_closed
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The `server` label of `name`.
    pub fn server(name: &str) -> ServerLabel {
        ServerLabel {
            server: name.to_owned(),
        }
    }

    /// Counts a request refused by `limit`.
    pub fn refused(&self, limit: &str) {
        self.refusals
            .get_or_create(&LimitLabel {
                limit: limit.to_owned(),
            })
            .inc();
    }

    /// Counts a connection refused or cut on `listener` for `reason`.
    pub fn connection_refused(&self, listener: &str, reason: &str) {
        self.connections_refused
            .get_or_create(&ConnectionLabel {
                listener: listener.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The open-connections gauge of `listener`.
    pub fn connections(&self, listener: &str) -> Gauge {
        self.connections_open
            .get_or_create(&ListenerLabel {
                listener: listener.to_owned(),
            })
            .clone()
    }

    /// Counts a JSON-RPC request of `era` (`legacy` or `modern`).
    pub fn mcp_request(&self, era: &str, method: &str) {
        let method = if COUNTED_METHODS.contains(&method) {
            method
        } else {
            "other"
        };
        self.mcp_requests
            .get_or_create(&EraLabel {
                era: era.to_owned(),
                method: method.to_owned(),
            })
            .inc();
    }

    /// Counts an HTTP request.
    pub fn request(&self, class: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabel {
                class: class.to_owned(),
                status,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_bounded_labels() {
        let m = Metrics::default();
        m.sessions_created.inc();
        m.closed("timeout");
        m.request("request", 200);
        m.tool_calls
            .get_or_create(&OutcomeLabel {
                outcome: "ok".into(),
            })
            .inc();
        m.tool_call_seconds.observe(0.01);
        let text = m.encode();
        for needle in [
            "tether_sessions_created_total 1",
            "tether_sessions_closed_total{reason=\"timeout\"} 1",
            "tether_http_requests_total{class=\"request\",status=\"200\"} 1",
            "tether_tool_calls_total{outcome=\"ok\"} 1",
            "tether_tool_call_duration_seconds_count 1",
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
    }
}
