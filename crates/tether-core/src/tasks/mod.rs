//! Durable tasks (issue 28): a `tools/call` whose answer outlives the request that asked for
//! it. This is the first step of `docs/design/tasks.md`: what a task is ([`TaskRecord`],
//! [`Status`], [`Outcome`]), its id, and how each era writes it (`shape.rs`: the 2026-07-28
//! extension's flat `CreateTaskResult` and detailed task, the 2025-11-25 core spec's nested
//! `CreateTaskResult` and `Task`). The store keeps the records (`LiveStore::put_task`);
//! `session/tasks/` runs both eras' tasks (the 2026-07-28 routes are in `front/modern/tasks.rs`).
//!
//! Must not: know where a record is kept or how a call runs; it is the record and its
//! shapes only.

mod shape;

pub use shape::{RELATED_TASK, ack};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The task id prefix: a task id is never mistaken for a session or stream id in a log.
pub const ID_PREFIX: &str = "t_";

/// A new task id: 128 random bits, so that holding one is the only way to name it (the
/// extension's ids are bearer handles).
pub fn new_task_id() -> String {
    format!("{ID_PREFIX}{}", crate::ids::random_hex(16))
}

/// Whether `text` could be a task id this gateway minted (a cheap check before a lookup).
pub fn looks_like_task_id(text: &str) -> bool {
    text.strip_prefix(ID_PREFIX)
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Which era's shapes a task is written in: the era of the client that created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Era {
    /// 2025-11-25 tasks (`params.task`, nested `CreateTaskResult`, `ttl`, `pollInterval`).
    Legacy,
    /// The 2026-07-28 extension `io.modelcontextprotocol/tasks` (flat, `ttlMs`,
    /// `pollIntervalMs`, `resultType`).
    Modern,
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Running upstream.
    Working,
    /// The upstream asked the client something and waits for the answer.
    InputRequired,
    /// Answered (a tool result, `isError` or not, in the 2026-07-28 era).
    Completed,
    /// Ended with a JSON-RPC error (or, for a 2025-11-25 client, a tool result with
    /// `isError`, as that era's spec says).
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl Status {
    /// The name on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Working => "working",
            Status::InputRequired => "input_required",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// The status named `text`, if it is one.
    pub fn parse(text: &str) -> Option<Status> {
        [
            Status::Working,
            Status::InputRequired,
            Status::Completed,
            Status::Failed,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Whether nothing more happens to the task (its outcome, if any, is final).
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// How a task's call ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The call's result (a `CallToolResult`).
    Result(Value),
    /// The JSON-RPC error object it ended with.
    Error(Value),
}

/// One task: everything `tasks/*` answers from, in either era, on any instance. Stored
/// as its JSON ([`TaskRecord::to_json`]), so every backend keeps the same fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Its id ([`new_task_id`]).
    pub id: String,
    /// Who created it; every `tasks/*` compares it first.
    pub principal: String,
    /// The server it runs on.
    pub server: String,
    /// The tool it calls.
    pub tool: String,
    /// The era of the client that created it.
    pub era: Era,
    /// The instance that runs it (with a shared store; `None`: the only process).
    pub owner: Option<String>,
    /// Its status.
    pub status: Status,
    /// A word on the status for people (why it failed, that it was resumed).
    pub status_message: Option<String>,
    /// Created, ms since the Unix epoch.
    pub created_ms: i64,
    /// Last changed, ms since the Unix epoch.
    pub updated_ms: i64,
    /// How long after its creation it is kept; `None`: until the gateway's bound.
    pub ttl_ms: Option<u64>,
    /// How often a client should poll.
    pub poll_ms: u64,
    /// The upstream's open requests to the client, by key (2026-07-28 `inputRequests`).
    pub input_requests: Option<Value>,
    /// The call's params, kept only when the tool is safe to repeat (annotated
    /// `readOnlyHint` or `idempotentHint`): what re-issues it after a restart.
    #[serde(default)]
    pub request: Option<Value>,
    /// A 2026-07-28 task's client as its call declared it (`capabilities`, `clientInfo`):
    /// the pooled upstream a re-issue runs on.
    #[serde(default)]
    pub client: Option<Value>,
    /// How it ended, once it has.
    pub outcome: Option<Outcome>,
}

impl TaskRecord {
    /// A task that has just started working.
    pub fn working(
        principal: &str,
        server: &str,
        tool: &str,
        era: Era,
        ttl_ms: Option<u64>,
        poll_ms: u64,
        now_ms: i64,
    ) -> TaskRecord {
        TaskRecord {
            id: new_task_id(),
            principal: principal.to_owned(),
            server: server.to_owned(),
            tool: tool.to_owned(),
            era,
            owner: None,
            status: Status::Working,
            status_message: None,
            created_ms: now_ms,
            updated_ms: now_ms,
            ttl_ms,
            poll_ms,
            input_requests: None,
            request: None,
            client: None,
            outcome: None,
        }
    }

    /// Records how the call ended: the status follows from the outcome and the era (a tool
    /// result with `isError` is `completed` in the 2026-07-28 era and `failed` in 2025-11-25).
    pub fn finish(&mut self, mut outcome: Outcome, now_ms: i64) {
        // A 2026-07-28 task's result is that era's `CallToolResult`, discriminated like
        // every result of the era (the upstream behind the bridge may speak 2025-11-25).
        if let (Era::Modern, Outcome::Result(Value::Object(r))) = (self.era, &mut outcome) {
            r.entry("resultType")
                .or_insert_with(|| Value::from("complete"));
        }
        self.status = match (&outcome, self.era) {
            (Outcome::Error(_), _) => Status::Failed,
            (Outcome::Result(r), Era::Legacy)
                if r.get("isError").and_then(Value::as_bool) == Some(true) =>
            {
                Status::Failed
            }
            (Outcome::Result(_), _) => Status::Completed,
        };
        self.input_requests = None;
        self.outcome = Some(outcome);
        self.updated_ms = now_ms;
    }

    /// When it may be forgotten, ms since the Unix epoch (`None`: kept until removed).
    pub fn expires_ms(&self) -> Option<i64> {
        self.ttl_ms.map(|ttl| {
            self.created_ms
                .saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX))
        })
    }

    /// The record as the stores keep it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a task record serializes")
    }

    /// A stored record read back.
    pub fn from_json(text: &str) -> Result<TaskRecord, String> {
        serde_json::from_str(text).map_err(|e| format!("task record: {e}"))
    }

    /// The keys of the upstream's requests it waits on (2026-07-28 `inputRequests`).
    pub fn input_keys(&self) -> Vec<String> {
        self.input_requests
            .as_ref()
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether it has outlived its time to live at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_ms().is_some_and(|at| now_ms >= at)
    }
}

#[cfg(test)]
mod tests;
