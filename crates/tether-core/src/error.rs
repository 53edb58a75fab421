//! The gateway's one error: what a failure is ([`Kind`], which fixes the JSON-RPC code and
//! where it came from, [`Origin`]: client, gateway, upstream or store); whether repeating
//! the request is safe ([`Retry`]); and the one place it becomes a JSON-RPC error
//! ([`Failure::response`]). The session layer and the upstream links build it; the front
//! door gives a refused request its HTTP status (`front::FrontError`), from the kind alone.
//! Must not: import anything internal but `protocol` and `wire`, know HTTP (statuses,
//! headers), or log: a failure is logged once, where it is answered.

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::protocol::{self, code};

/// Where a failure came from: who has to change something for the request to succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client sent something the gateway cannot serve.
    Client,
    /// A limit or the state of the gateway (a session closed, a restart, a move).
    Gateway,
    /// The upstream server: it is down, slow, crashed or answered too much.
    Upstream,
    /// The live store could not record what the request needs.
    Store,
}

impl Origin {
    /// Name in `error.data.origin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Client => "client",
            Origin::Gateway => "gateway",
            Origin::Upstream => "upstream",
            Origin::Store => "store",
        }
    }
}

/// Whether the client may send the same request again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The request never reached the upstream: repeating it is safe, after the delay when
    /// one is given.
    Safe(Option<Duration>),
    /// It may have run upstream: repeating it is safe only if it is idempotent.
    Unknown,
    /// Repeating it as it is cannot succeed (the session is gone, the request is invalid,
    /// the answer is too large).
    Never,
}

impl Retry {
    fn as_str(self) -> &'static str {
        match self {
            Retry::Safe(_) => "safe",
            Retry::Unknown => "unknown",
            Retry::Never => "never",
        }
    }
}

/// What went wrong, as a closed set: each kind has one JSON-RPC code and one origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is not acceptable in this session (a second `initialize`).
    InvalidRequest,
    /// `initialize` without params.
    InvalidParams,
    /// A count limit is full (sessions, upstreams, the upstream queue).
    Limit,
    /// Sessions are created too fast by one user or address.
    Rate,
    /// The session was closed (DELETE, expiry, eviction) before the request finished.
    SessionClosed,
    /// The gateway restarted with the request in flight and did not (or could not) repeat it.
    Interrupted,
    /// The session moved to another gateway instance with the request in flight.
    Moved,
    /// New upstreams kept failing to start; starts are refused for a while.
    CircuitOpen,
    /// This session's upstream keeps crashing; restarts wait (jittered backoff).
    UpstreamBackoff,
    /// The upstream could not be started.
    UpstreamUnavailable,
    /// The upstream went away with the request in flight (or before it could be sent).
    UpstreamLost,
    /// The upstream did not answer within `--upstream-timeout`.
    UpstreamTimeout,
    /// The upstream's answer was over `--max-upstream-message`.
    MessageTooLarge,
    /// The live store cannot record what the request needs (disk, Redis outage).
    StoreUnavailable,
    /// The client closed the request's response stream (2026-07-28: that is cancellation).
    Cancelled,
}

impl Kind {
    /// Name in `error.data.kind` (stable: clients and tests match on it).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::InvalidRequest => "invalid_request",
            Kind::InvalidParams => "invalid_params",
            Kind::Limit => "limit",
            Kind::Rate => "rate",
            Kind::SessionClosed => "session_closed",
            Kind::Interrupted => "interrupted",
            // Older clients and the tests know a move as a lost upstream: same code.
            Kind::Moved | Kind::UpstreamLost => "upstream_lost",
            Kind::CircuitOpen => "circuit_open",
            Kind::UpstreamBackoff => "upstream_backoff",
            Kind::UpstreamUnavailable => "upstream_unavailable",
            Kind::UpstreamTimeout => "upstream_timeout",
            Kind::MessageTooLarge => "message_too_large",
            Kind::StoreUnavailable => "store_unavailable",
            Kind::Cancelled => "cancelled",
        }
    }

    /// The JSON-RPC error code.
    pub fn code(self) -> i64 {
        match self {
            Kind::InvalidRequest => code::INVALID_REQUEST,
            Kind::InvalidParams => code::INVALID_PARAMS,
            Kind::Limit | Kind::Rate => code::LIMIT_REACHED,
            Kind::SessionClosed => code::SESSION_CLOSED,
            Kind::Interrupted => code::INTERRUPTED,
            Kind::Moved | Kind::UpstreamLost => code::UPSTREAM_LOST,
            Kind::CircuitOpen | Kind::UpstreamBackoff | Kind::UpstreamUnavailable => {
                code::UPSTREAM_UNAVAILABLE
            }
            Kind::UpstreamTimeout => code::UPSTREAM_TIMEOUT,
            Kind::MessageTooLarge => code::UPSTREAM_MESSAGE_TOO_LARGE,
            Kind::StoreUnavailable => code::STORE_UNAVAILABLE,
            Kind::Cancelled => code::CANCELLED,
        }
    }

    /// Where a failure of this kind comes from.
    pub fn origin(self) -> Origin {
        match self {
            Kind::InvalidRequest | Kind::InvalidParams | Kind::Cancelled => Origin::Client,
            Kind::Limit | Kind::Rate | Kind::SessionClosed | Kind::Interrupted | Kind::Moved => {
                Origin::Gateway
            }
            Kind::CircuitOpen
            | Kind::UpstreamBackoff
            | Kind::UpstreamUnavailable
            | Kind::UpstreamLost
            | Kind::UpstreamTimeout
            | Kind::MessageTooLarge => Origin::Upstream,
            Kind::StoreUnavailable => Origin::Store,
        }
    }
}

/// A request the gateway could not serve. Built where the failure is known, answered
/// in-band as a JSON-RPC error ([`Failure::response`]) or, when it refuses a request before
/// any stream exists, with an HTTP status the front door picks from [`Failure::kind`].
#[derive(Debug, Clone)]
pub struct Failure {
    kind: Kind,
    message: String,
    retry: Retry,
    /// More `error.data` fields (`limit`, `max`, `failures`, `bytes`...).
    data: Map<String, Value>,
}

impl Failure {
    /// A failure of `kind` with `message` for the client.
    pub fn new(kind: Kind, message: impl Into<String>, retry: Retry) -> Failure {
        Failure {
            kind,
            message: message.into(),
            retry,
            data: Map::new(),
        }
    }

    /// A bound reached (`Kind::Limit`): `data.limit` names it and `data.max` says how much
    /// it allows.
    pub fn over_limit(
        limit: &str,
        max: usize,
        message: impl Into<String>,
        retry: Retry,
    ) -> Failure {
        Failure::new(Kind::Limit, message, retry)
            .with("limit", limit)
            .with("max", max)
    }

    /// A request refused at bound `limit` before it was sent (`Kind::Limit`, safe to
    /// repeat): `data.limit` names the bound.
    pub fn at_bound(limit: &str, message: impl Into<String>) -> Failure {
        Failure::new(Kind::Limit, message, Retry::Safe(None)).with("limit", limit)
    }

    /// An answer of `bytes` (or more) over the `limit` the reader keeps: its request fails,
    /// the upstream keeps running.
    pub fn too_large(message: impl Into<String>, bytes: usize, limit: usize) -> Failure {
        Failure::new(Kind::MessageTooLarge, message, Retry::Never)
            .with("bytes", bytes)
            .with("limit", limit)
    }

    /// Adds a field to `error.data`.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Failure {
        self.data.insert(key.to_owned(), value.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Where it came from.
    pub fn origin(&self) -> Origin {
        self.kind.origin()
    }

    /// Whether the same request may be sent again.
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// The message for the client.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The JSON-RPC error code.
    pub fn code(&self) -> i64 {
        self.kind.code()
    }

    /// A field of `error.data` added with [`Failure::with`].
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.data.get(key)
    }

    /// `error.data`: the kind, origin and retry advice first, then the kind's own fields.
    pub fn data(&self) -> Value {
        let mut data = Map::new();
        data.insert("kind".into(), self.kind.as_str().into());
        data.insert("origin".into(), self.origin().as_str().into());
        data.insert("retry".into(), self.retry.as_str().into());
        if let Retry::Safe(Some(after)) = self.retry {
            data.insert("retry_in_ms".into(), json!(ceil_ms(after)));
        }
        data.extend(self.data.clone());
        Value::Object(data)
    }

    /// The JSON-RPC error response answering request `client_id`.
    pub fn response(&self, client_id: Value) -> Value {
        protocol::error_response(client_id, self.code(), &self.message, Some(self.data()))
    }

    /// The same answer as a typed message, for a client stream.
    pub fn reply(&self, client_id: Value) -> crate::wire::Message {
        crate::wire::Message::ours(self.response(client_id))
    }

    /// The session closed (for `reason`, when known) before the request finished.
    pub fn session_closed(reason: Option<&str>) -> Failure {
        let message = match reason {
            Some(r) => format!("session closed ({r})"),
            None => "session closed".to_owned(),
        };
        Failure::new(Kind::SessionClosed, message, Retry::Never)
    }

    /// The upstream went away: with the request in flight when `sent` (it may have run),
    /// or before it could be sent.
    pub fn upstream_lost(message: impl Into<String>, sent: bool) -> Failure {
        let retry = if sent {
            Retry::Unknown
        } else {
            Retry::Safe(None)
        };
        Failure::new(Kind::UpstreamLost, message, retry)
    }

    /// The upstream did not answer within `timeout`.
    pub fn timeout(timeout: Duration) -> Failure {
        Failure::new(
            Kind::UpstreamTimeout,
            format!(
                "upstream did not answer within {}",
                humantime::format_duration(timeout)
            ),
            Retry::Unknown,
        )
    }

    /// The gateway restarted with the request in flight and did not repeat it.
    pub fn interrupted(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Interrupted, message, Retry::Unknown).with("retried", false)
    }
}

/// Whole milliseconds, rounded up: a client that waits exactly that long is not early.
pub(crate) fn ceil_ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_code_and_the_outcome_the_ledger_expects() {
        // The ledger and metrics classify answers by code (`protocol::call_outcome`); a kind
        // must land in the outcome its name promises.
        for (kind, outcome) in [
            (Kind::UpstreamTimeout, "timeout"),
            (Kind::UpstreamLost, "upstream_lost"),
            (Kind::Moved, "upstream_lost"),
            (Kind::Interrupted, "interrupted"),
            (Kind::SessionClosed, "session_closed"),
            (Kind::UpstreamBackoff, "upstream_unavailable"),
            (Kind::CircuitOpen, "upstream_unavailable"),
            (Kind::UpstreamUnavailable, "upstream_unavailable"),
            (Kind::Limit, "refused"),
            (Kind::Rate, "refused"),
            (Kind::MessageTooLarge, "too_large"),
            (Kind::InvalidRequest, "error"),
            (Kind::StoreUnavailable, "error"),
        ] {
            let r = Failure::new(kind, "x", Retry::Never).response(Value::Null);
            let m = crate::wire::Message::ours(r);
            assert_eq!(protocol::call_outcome(&m).0, outcome, "{kind:?}");
        }
    }
}
