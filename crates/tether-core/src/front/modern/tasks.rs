//! The Tasks extension's methods on `/mcp` (2026-07-28): `tasks/get` answers from the
//! task's record (on any instance), `tasks/update` and `tasks/cancel` go to the runner
//! that holds the call: here, or forwarded once to the live instance that owns the task.
//! The `Mcp-Name` header was checked against `params.taskId` by the rules (400 `-32020`
//! on a mismatch). An id that names no task of the caller's (unknown, expired, another
//! principal's) is `-32602`, the same answer for all three.
//!
//! Must not: tell one principal anything about another's task.

use super::*;
use crate::session::TaskReach;
use crate::tasks::ack;

/// Answers `tasks/get`, `tasks/update` or `tasks/cancel`.
pub(super) async fn request(
    st: &AppState,
    principal: &Principal,
    original: &Original<'_>,
    env: &Message,
    id: Value,
) -> Response {
    let params = env.params_value().unwrap_or(Value::Null);
    let task_id = params
        .get("taskId")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let registry = &st.registry;
    let reached = match env.method_name().unwrap_or_default() {
        "tasks/get" => match registry.task(principal, task_id).await {
            Ok(Some(task)) => return reply(&id, &task.get_result()),
            Ok(None) => Ok(TaskReach::Unknown),
            Err(e) => Err(e),
        },
        "tasks/update" => {
            let Some(answers) = params.get("inputResponses").and_then(Value::as_object) else {
                let f = Failure::new(
                    FailureKind::InvalidParams,
                    "params.inputResponses is required (an object: key → the answer)",
                    Retry::Never,
                );
                return reply_value(&f.response(id));
            };
            registry
                .update_task(principal, task_id, answers.clone())
                .await
        }
        _ => registry.cancel_modern_task(principal, task_id).await,
    };
    match reached {
        Ok(TaskReach::Done) => reply(&id, &ack()),
        Ok(TaskReach::Unknown) => reply_value(
            &Failure::new(
                FailureKind::InvalidParams,
                "no such task (unknown, expired, or not yours)",
                Retry::Never,
            )
            .response(id),
        ),
        Ok(TaskReach::Owner(owner)) => match to_holder(st, &owner, original).await {
            Some(resp) => resp,
            // Its owner stopped answering: it settles the task when next asked about
            // (its heartbeat lapses), and the input or cancellation had nowhere to go.
            None => reply(&id, &ack()),
        },
        Err(e) => reply_value(&e.response(id)),
    }
}

fn reply(id: &Value, result: &Value) -> Response {
    reply_value(&json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

fn reply_value(v: &Value) -> Response {
    json_status(rules::status_of(v), v)
}
