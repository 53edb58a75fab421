//! docs/design/durability.md, row by row: the gateway is crashed (`TETHER_FAULT`, debug
//! builds) exactly between a write becoming durable and the client seeing what it
//! describes, and the test checks what the table says the client is left with.

mod common;

use std::time::Duration;

use common::{ACCEPT_BOTH, Gateway, state_dir};
use serde_json::{Value, json};
use tether_core::store::LiveStore;

/// A POST whose answer may never come: the body read to its end, or the transport error.
async fn post_may_fail(
    gw: &Gateway,
    session: Option<&str>,
    message: &Value,
) -> Result<(u16, String), String> {
    let mut req = gw
        .client()
        .http
        .post(&gw.url)
        .header("content-type", "application/json")
        .header("accept", ACCEPT_BOTH)
        .body(message.to_string());
    if let Some(s) = session {
        req = req
            .header("mcp-session-id", s)
            .header("mcp-protocol-version", "2025-11-25");
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// Waits for the gateway to crash at its fault point (it aborts).
fn crashed(gw: &mut Gateway, point: &str) {
    assert!(
        common::wait_for(Duration::from_secs(10), || !gw.alive()),
        "the gateway did not crash at {point}"
    );
    assert!(
        gw.log_text().contains(&format!("crashing at {point}")),
        "{}",
        gw.log_text()
    );
}

fn faulty(dir: &std::path::Path, point: &str, args: &[&str]) -> Gateway {
    let mut all = vec!["--demo"];
    all.extend_from_slice(args);
    Gateway::start_env(dir, &all, &[(tether_core::fault::ENV, point)])
}

/// A window no echo misses, however loaded the machine (debug builds, parallel tests).
const WIDE_WINDOW: [&str; 2] = ["--answer-window", "30s"];

async fn unfinished_streams(dir: &std::path::Path, session: &str) -> usize {
    let store = tether_core::store::sqlite::SqliteStore::open(dir).unwrap();
    store.unfinished_streams(session).await.unwrap().len()
}

fn call(id: i64, tool: &str, args: &Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
}

/// Row 1: the session record is durable but the `initialize` answer never left. The
/// client has no session id and starts again; the record it never learned of is a live
/// session nobody holds, reaped by the idle timeout like any abandoned one.
#[tokio::test]
async fn crash_after_the_session_record_leaves_the_client_without_an_id() {
    let dir = state_dir();
    let mut gw = faulty(
        dir.path(),
        tether_core::fault::points::SESSION_RECORDED,
        &[],
    );
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "row1", "version": "1"}}});
    let got = post_may_fail(&gw, None, &init).await;
    assert!(got.is_err(), "no answer reaches the client: {got:?}");
    crashed(&mut gw, tether_core::fault::points::SESSION_RECORDED);

    let gw2 = gw.restart_clean();
    assert!(
        gw2.log_text()
            .contains("1 sessions were live before and will resume on contact"),
        "{}",
        gw2.log_text()
    );
    let mcp = gw2.client();
    let sid = mcp.initialize("row1-again").await;
    assert_eq!(
        mcp.call_text(&sid, 1, "echo", json!({"text": "ok"})).await,
        "ok"
    );
}

/// Row 2 without a crash: a call answered within the window is one JSON body; one that
/// sends a notification first gets a stream (the notification is stored before it is
/// sent, so the record is written before it), resumable from its priming event.
#[tokio::test]
async fn quick_calls_are_one_json_body_and_others_get_a_stream() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo", WIDE_WINDOW[0], WIDE_WINDOW[1]]);
    let mcp = gw.client();
    let sid = mcp.initialize("row2").await;
    let quick = mcp
        .post(Some(&sid), &call(1, "echo", &json!({"text": "q"})))
        .await;
    assert_eq!(quick.status, 200);
    assert!(
        quick.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        quick.headers
    );
    assert_eq!(quick.json()["result"]["content"][0]["text"], "q");

    let mut msg = call(2, "slow", &json!({"ms": 50, "steps": 2}));
    msg["params"]["_meta"] = json!({"progressToken": "t"});
    let streamed = mcp.post(Some(&sid), &msg).await;
    let events = streamed.events();
    assert!(events[0].1.is_none(), "priming first: {}", streamed.body);
    assert_eq!(
        events.len(),
        4,
        "priming, 2 progress, answer: {}",
        streamed.body
    );
    let replay = mcp.resume(&sid, &events[0].0).await;
    assert_eq!(replay.events().len(), 3, "{}", replay.body);
    assert_eq!(replay.response()["id"], 2);
    assert_eq!(unfinished_streams(dir.path(), &sid).await, 0);
}

/// Row 2, a quick call: answered within the answer window, nothing of it was stored.
/// A crash before the body is sent leaves a failed POST with no event id (nothing to
/// resume, nothing left unfinished), and the session goes on after the restart.
#[tokio::test]
async fn crash_before_a_quick_answer_leaves_a_failed_post_and_nothing_stored() {
    let dir = state_dir();
    let mut gw = faulty(
        dir.path(),
        tether_core::fault::points::QUICK_ANSWER,
        &WIDE_WINDOW,
    );
    let sid = gw.client().initialize("row2-quick").await;
    let got = post_may_fail(&gw, Some(&sid), &call(5, "echo", &json!({"text": "x"}))).await;
    assert!(got.is_err(), "no answer reaches the client: {got:?}");
    crashed(&mut gw, tether_core::fault::points::QUICK_ANSWER);
    assert_eq!(unfinished_streams(dir.path(), &sid).await, 0);

    let gw2 = gw.restart_clean();
    let mcp = gw2.client();
    assert_eq!(
        mcp.call_text(&sid, 6, "echo", json!({"text": "again"}))
            .await,
        "again"
    );
}

/// Row 2, a call that outlives the answer window: its record (with the request, the call
/// being safe to repeat) is durable before the priming event. A crash between the two
/// leaves the client a stream with no event id, and the record an unfinished stream that
/// nobody can resume; the session goes on after the restart.
#[tokio::test]
async fn crash_between_the_stream_record_and_the_priming_event() {
    let dir = state_dir();
    let mut gw = faulty(dir.path(), tether_core::fault::points::STREAM_RECORDED, &[]);
    let mcp = gw.client();
    let sid = mcp.initialize("row2-slow").await;
    let got = post_may_fail(&gw, Some(&sid), &call(7, "slow", &json!({"ms": 2000}))).await;
    match &got {
        Err(_) => {}
        Ok((_, body)) => assert!(!body.contains("id:"), "no event id was sent: {body}"),
    }
    crashed(&mut gw, tether_core::fault::points::STREAM_RECORDED);
    assert_eq!(unfinished_streams(dir.path(), &sid).await, 1);

    let gw2 = gw.restart_clean();
    let mcp = gw2.client();
    assert_eq!(
        mcp.call_text(&sid, 8, "echo", json!({"text": "on"})).await,
        "on"
    );
}

/// Row 8: the close is durable but the `DELETE` answer never left. The client sees a
/// failed `DELETE`; after the restart the session is closed (404), as it asked.
#[tokio::test]
async fn crash_after_the_close_record_leaves_the_session_closed() {
    let dir = state_dir();
    let mut gw = faulty(dir.path(), tether_core::fault::points::SESSION_CLOSED, &[]);
    let mcp = gw.client();
    let sid = mcp.initialize("row8").await;
    let deleted = mcp
        .http
        .delete(&gw.url)
        .header("mcp-session-id", &sid)
        .send()
        .await;
    assert!(
        deleted.is_err(),
        "no answer reaches the client: {deleted:?}"
    );
    crashed(&mut gw, tether_core::fault::points::SESSION_CLOSED);

    let gw2 = gw.restart_clean();
    let a = gw2
        .client()
        .post(Some(&sid), &call(9, "echo", &json!({"text": "x"})))
        .await;
    assert_eq!(a.status, 404, "{}", a.body);
}

/// 2025-11-25 `tools/call` with `params.task`, answered by the gateway.
fn task_call(id: i64, tool: &str, args: &Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "task": {"ttl": 60_000}}})
}

/// Row T1: a task's record is durable before its `CreateTaskResult` is sent. A crash
/// between the two leaves the client a failed POST (no task id); the task is kept, and
/// after the restart it is listed and `failed` (its call, not safe to repeat, died with the
/// gateway), never lost.
#[tokio::test]
async fn crash_after_the_task_record_leaves_a_failed_task_it_can_list() {
    let dir = state_dir();
    let mut gw = faulty(dir.path(), tether_core::fault::points::TASK_CREATED, &[]);
    let mcp = gw.client();
    let sid = mcp.initialize("rowT1").await;
    let got = post_may_fail(
        &gw,
        Some(&sid),
        &task_call(3, "slow_write", &json!({"ms": 5000})),
    )
    .await;
    assert!(
        got.as_ref()
            .map_or(true, |(_, body)| !body.contains("taskId")),
        "no task id reached the client: {got:?}"
    );
    crashed(&mut gw, tether_core::fault::points::TASK_CREATED);

    let gw2 = gw.restart_clean();
    let mcp = gw2.client();
    let listed = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 4, "method": "tasks/list", "params": {}}),
        )
        .await
        .response();
    let tasks = listed["result"]["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{listed}");
    let id = tasks[0]["taskId"].clone();
    let got = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 5, "method": "tasks/get", "params": {"taskId": id}}),
        )
        .await
        .response();
    assert_eq!(got["result"]["status"], "failed", "{got}");
}

/// Row T2: a 2026-07-28 task's input request is durable before its client can see it. A
/// crash right after leaves the task known: after the restart it is `failed` (its call,
/// not safe to repeat, died with the gateway), never unknown.
#[tokio::test]
async fn crash_after_a_tasks_input_request_leaves_a_failed_task_never_an_unknown_one() {
    let dir = state_dir();
    let args = ["--task-after", "0", "--task-tools", "ask"];
    let mut gw = faulty(dir.path(), tether_core::fault::points::TASK_INPUT, &args);
    let client = common::modern::Modern::new(
        &gw.url,
        json!({"elicitation": {}, "extensions": {"io.modelcontextprotocol/tasks": {}}}),
    );
    let created = client.call(1, "ask", json!({})).await.json();
    assert_eq!(created["result"]["resultType"], "task", "{created}");
    let task = created["result"]["taskId"].as_str().unwrap().to_owned();
    crashed(&mut gw, tether_core::fault::points::TASK_INPUT);

    let gw2 = gw.restart_clean();
    let client = common::modern::Modern::new(
        &gw2.url,
        json!({"elicitation": {}, "extensions": {"io.modelcontextprotocol/tasks": {}}}),
    );
    let got = client
        .send(2, "tasks/get", json!({"taskId": task}))
        .await
        .json();
    assert_eq!(got["result"]["status"], "failed", "{got}");
    assert_eq!(got["result"]["error"]["code"], -32013, "{got}");
}

/// Row T5: a 2025-11-25 task's cancellation is durable before `tasks/cancel` is answered.
/// A crash right after leaves the client a failed request, and the task `cancelled`
/// after the restart: not re-issued (its tool is safe to repeat) and not `failed`.
#[tokio::test]
async fn crash_after_a_tasks_cancellation_leaves_it_cancelled_not_resumed() {
    let dir = state_dir();
    let mut gw = faulty(dir.path(), tether_core::fault::points::TASK_CANCELLED, &[]);
    let mcp = gw.client();
    let sid = mcp.initialize("rowT5").await;
    let created = mcp
        .post(Some(&sid), &task_call(1, "slow", &json!({"ms": 30_000})))
        .await
        .response();
    let task = created["result"]["task"]["taskId"].clone();
    assert!(task.is_string(), "{created}");
    let cancel =
        json!({"jsonrpc": "2.0", "id": 2, "method": "tasks/cancel", "params": {"taskId": task}});
    let got = post_may_fail(&gw, Some(&sid), &cancel).await;
    assert!(
        got.as_ref()
            .map_or(true, |(_, body)| !body.contains("cancelled")),
        "no answer reached the client: {got:?}"
    );
    crashed(&mut gw, tether_core::fault::points::TASK_CANCELLED);

    let gw2 = gw.restart_clean();
    let got = gw2
        .client()
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 3, "method": "tasks/get", "params": {"taskId": task}}),
        )
        .await
        .response();
    assert_eq!(got["result"]["status"], "cancelled", "{got}");
}

/// Row T4: a task's outcome is durable before anyone is told. A crash right after leaves
/// it `completed` with its result after the restart (not `failed` as interrupted).
#[tokio::test]
async fn crash_after_the_task_outcome_leaves_it_completed() {
    let dir = state_dir();
    let mut gw = faulty(dir.path(), tether_core::fault::points::TASK_FINISHED, &[]);
    let mcp = gw.client();
    let sid = mcp.initialize("rowT4").await;
    let created = mcp
        .post(Some(&sid), &task_call(3, "slow", &json!({"ms": 200})))
        .await
        .response();
    let id = created["result"]["task"]["taskId"].clone();
    assert!(id.is_string(), "{created}");
    crashed(&mut gw, tether_core::fault::points::TASK_FINISHED);

    let gw2 = gw.restart_clean();
    let result = gw2
        .client()
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 4, "method": "tasks/result", "params": {"taskId": id}}),
        )
        .await
        .response();
    assert_eq!(
        result["result"]["content"][0]["text"], "waited 200 ms",
        "{result}"
    );
}
