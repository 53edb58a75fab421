use serde_json::json;

use super::*;

fn modern() -> TaskRecord {
    TaskRecord::working(
        "alice",
        "demo",
        "slow",
        Era::Modern,
        Some(60_000),
        500,
        1_765_000_000_000,
    )
}

#[test]
fn ids_are_unguessable_and_recognisable() {
    let (a, b) = (new_task_id(), new_task_id());
    assert_ne!(a, b);
    assert!(looks_like_task_id(&a), "{a}");
    for not in [
        "",
        "t_",
        "t_xyz",
        "s_0123456789abcdef0123456789abcdef",
        &a[..a.len() - 1],
    ] {
        assert!(!looks_like_task_id(not), "{not}");
    }
    for s in [
        Status::Working,
        Status::InputRequired,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ] {
        assert_eq!(Status::parse(s.as_str()), Some(s));
        assert_eq!(
            s.is_terminal(),
            !matches!(s, Status::Working | Status::InputRequired)
        );
    }
    assert_eq!(Status::parse("done"), None);
}

/// The extension's `CreateTaskResult` is the task, flat, with `resultType: "task"`; the
/// 2025-11-25 one nests it under `task`, with that era's names for the times.
#[test]
fn a_created_task_is_written_in_its_eras_shape() {
    let t = modern();
    let created = t.create_result();
    assert_eq!(created["resultType"], "task");
    assert_eq!(created["taskId"], json!(t.id));
    assert_eq!(created["status"], "working");
    assert_eq!(created["ttlMs"], 60_000);
    assert_eq!(created["pollIntervalMs"], 500);
    assert_eq!(created["createdAt"], "2025-12-06T05:46:40.000Z");
    assert_eq!(created["lastUpdatedAt"], created["createdAt"]);
    assert!(created.get("task").is_none() && created.get("ttl").is_none());

    let mut legacy = modern();
    legacy.era = Era::Legacy;
    legacy.ttl_ms = None;
    let created = legacy.create_result();
    let task = &created["task"];
    assert_eq!(task["taskId"], json!(legacy.id));
    assert_eq!(task["ttl"], json!(null), "unlimited is null, not absent");
    assert_eq!(task["pollInterval"], 500);
    assert!(created.get("resultType").is_none() && task.get("ttlMs").is_none());
    // `tasks/get` in 2025-11-25 is the task itself.
    assert_eq!(legacy.get_result(), *task);
}

/// `tasks/get` (2026-07-28) carries what the status carries, inline.
#[test]
fn the_detailed_task_carries_what_its_status_carries() {
    let mut t = modern();
    assert_eq!(t.get_result()["resultType"], "complete");
    assert!(t.get_result().get("result").is_none());

    t.status = Status::InputRequired;
    t.input_requests =
        Some(json!({"ask-1": {"method": "elicitation/create", "params": {"message": "sure?"}}}));
    let got = t.get_result();
    assert_eq!(got["status"], "input_required");
    assert_eq!(
        got["inputRequests"]["ask-1"]["method"],
        "elicitation/create"
    );

    // A tool error is a completed task in this era, its result inline.
    let result = json!({"content": [{"type": "text", "text": "no"}], "isError": true});
    t.finish(Outcome::Result(result.clone()), t.created_ms + 1_000);
    // The era's CallToolResult: discriminated as every 2026-07-28 result.
    let mut result = result;
    result["resultType"] = json!("complete");
    let got = t.get_result();
    assert_eq!(got["status"], "completed");
    assert_eq!(got["result"], result);
    assert!(got.get("inputRequests").is_none());
    assert_eq!(got["lastUpdatedAt"], "2025-12-06T05:46:41.000Z");
    let note = t.status_notification();
    assert_eq!(note["method"], "notifications/tasks");
    assert_eq!(note["params"]["result"], result);

    let mut failed = modern();
    let error = json!({"code": -32603, "message": "boom"});
    failed.finish(Outcome::Error(error.clone()), failed.created_ms);
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.get_result()["error"], error);
    assert_eq!(ack(), json!({"resultType": "complete"}));
}

/// 2025-11-25 counts a tool result with `isError` as a failed task; its notification is
/// `notifications/tasks/status` with the task.
#[test]
fn a_legacy_task_fails_on_a_tool_error() {
    let mut t = modern();
    t.era = Era::Legacy;
    t.finish(
        Outcome::Result(json!({"content": [], "isError": true})),
        t.created_ms,
    );
    assert_eq!(t.status, Status::Failed);
    let note = t.status_notification();
    assert_eq!(note["method"], "notifications/tasks/status");
    assert_eq!(note["params"]["status"], "failed");
    assert!(note["params"].get("result").is_none());
    t.finish(Outcome::Result(json!({"content": []})), t.created_ms);
    assert_eq!(t.status, Status::Completed);
}

#[test]
fn a_task_expires_after_its_time_to_live() {
    let mut t = modern();
    assert!(!t.expired(t.created_ms + 59_999));
    assert!(t.expired(t.created_ms + 60_000));
    t.ttl_ms = None;
    assert!(!t.expired(i64::MAX));
}
