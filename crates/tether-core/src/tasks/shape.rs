//! A task as each era writes it. The 2026-07-28 extension (`io.modelcontextprotocol/tasks`)
//! is flat: `CreateTaskResult` is the task with `resultType: "task"`, `tasks/get` the
//! detailed task (its `inputRequests`, `result` or `error` inline) with `resultType:
//! "complete"`, and `notifications/tasks` carries the detailed task; times are `ttlMs` and
//! `pollIntervalMs`. The 2025-11-25 core spec nests the task under `task` in
//! `CreateTaskResult`, answers `tasks/get` and `tasks/cancel` with the task itself,
//! `tasks/result` with the call's own result, and names its times `ttl` and `pollInterval`.
//!
//! Must not: decide anything: the record says what the task is, this only writes it.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use super::{Era, Outcome, Status, TaskRecord};

/// The extension's `_meta` key tying a message to its task (both eras).
pub const RELATED_TASK: &str = "io.modelcontextprotocol/related-task";

/// An instant as ISO 8601 (RFC 3339, UTC, milliseconds).
fn timestamp(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

impl TaskRecord {
    /// The `Task` object of its era: id, status, message, times.
    pub fn task(&self) -> Value {
        let (ttl, poll) = match self.era {
            Era::Modern => ("ttlMs", "pollIntervalMs"),
            Era::Legacy => ("ttl", "pollInterval"),
        };
        let mut task = Map::new();
        task.insert("taskId".into(), json!(self.id));
        task.insert("status".into(), json!(self.status.as_str()));
        if let Some(m) = &self.status_message {
            task.insert("statusMessage".into(), json!(m));
        }
        task.insert("createdAt".into(), json!(timestamp(self.created_ms)));
        task.insert("lastUpdatedAt".into(), json!(timestamp(self.updated_ms)));
        task.insert(ttl.into(), json!(self.ttl_ms));
        task.insert(poll.into(), json!(self.poll_ms));
        Value::Object(task)
    }

    /// What answers the `tools/call` that created it.
    pub fn create_result(&self) -> Value {
        match self.era {
            Era::Modern => with(self.task(), "resultType", json!("task")),
            Era::Legacy => json!({ "task": self.task() }),
        }
    }

    /// The 2026-07-28 detailed task: the task with what its status carries inline
    /// (`inputRequests`, `result` or `error`).
    pub fn detailed(&self) -> Value {
        let mut task = self.task();
        match (self.status, &self.outcome) {
            (Status::InputRequired, _) => {
                let asks = self.input_requests.clone().unwrap_or_else(|| json!({}));
                task = with(task, "inputRequests", asks);
            }
            (Status::Completed | Status::Failed, Some(Outcome::Result(r))) => {
                task = with(task, "result", r.clone());
            }
            (Status::Completed | Status::Failed, Some(Outcome::Error(e))) => {
                task = with(task, "error", e.clone());
            }
            _ => {}
        }
        task
    }

    /// What answers `tasks/get`: the detailed task (`resultType: "complete"`) in the
    /// 2026-07-28 era, the task itself in 2025-11-25.
    pub fn get_result(&self) -> Value {
        match self.era {
            Era::Modern => with(self.detailed(), "resultType", json!("complete")),
            Era::Legacy => self.task(),
        }
    }

    /// The status notification of its era: `notifications/tasks` with the detailed task,
    /// or `notifications/tasks/status` with the task.
    pub fn status_notification(&self) -> Value {
        match self.era {
            Era::Modern => json!({
                "jsonrpc": "2.0",
                "method": "notifications/tasks",
                "params": self.detailed(),
            }),
            Era::Legacy => json!({
                "jsonrpc": "2.0",
                "method": "notifications/tasks/status",
                "params": self.task(),
            }),
        }
    }
}

/// The empty acknowledgement of `tasks/update` and of a 2026-07-28 `tasks/cancel`.
pub fn ack() -> Value {
    json!({ "resultType": "complete" })
}

/// `value` (an object) with `key` set.
fn with(mut value: Value, key: &str, v: Value) -> Value {
    if let Value::Object(map) = &mut value {
        map.insert(key.to_owned(), v);
    }
    value
}
