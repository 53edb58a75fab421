//! Durable tasks (issue 28). So far: 2025-11-25 tasks the gateway owns for a legacy client
//! (`params.task`, `tasks/get`, `tasks/result`, `tasks/list`, `tasks/cancel`), kept in the
//! store, bounded per user, answered only on their server, and after a gateway kill
//! re-issued when safe to repeat or `failed`, never "not found".

mod common;

use std::time::Duration;

use common::{Gateway, Mcp, state_dir};
use serde_json::{Value, json};

/// Initializes a session declaring the `tasks` capability; returns its id and the server
/// capabilities the gateway answered with.
async fn tasks_session(mcp: &Mcp) -> (String, Value) {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {"tasks": {"list": {}, "cancel": {}}},
        "clientInfo": {"name": "tasks-test", "version": "1.0"}
    }});
    let a = mcp.post(None, &init).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let sid = a.headers["mcp-session-id"].to_str().unwrap().to_owned();
    let caps = a.response()["result"]["capabilities"].clone();
    let n = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        )
        .await;
    assert_eq!(n.status, 202);
    (sid, caps)
}

async fn rpc(mcp: &Mcp, sid: &str, id: i64, method: &str, params: Value) -> Value {
    let a = mcp
        .post(
            Some(sid),
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        )
        .await;
    assert_eq!(a.status, 200, "{method}: {}", a.body);
    let r = a.response();
    assert_eq!(r["id"], id, "{r}");
    r
}

/// A `slow` call of `ms` as a task; its task id.
async fn start_slow_task(mcp: &Mcp, sid: &str, id: i64, ms: u64) -> String {
    let created = rpc(
        mcp,
        sid,
        id,
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": ms}, "task": {"ttl": 60_000}}),
    )
    .await;
    let task = &created["result"]["task"];
    assert_eq!(task["status"], "working", "{created}");
    assert_eq!(task["ttl"], 60_000, "{created}");
    assert!(task["pollInterval"].as_u64().is_some(), "{created}");
    assert!(task["createdAt"].as_str().is_some(), "{created}");
    task["taskId"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_legacy_clients_task_runs_is_polled_listed_and_cancelled() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let (sid, caps) = tasks_session(&mcp).await;
    assert_eq!(
        caps["tasks"],
        json!({"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}),
        "the gateway offers tasks for an upstream that has none"
    );

    let tools = rpc(&mcp, &sid, 100, "tools/list", json!({})).await;
    for tool in tools["result"]["tools"].as_array().unwrap() {
        assert_eq!(
            tool["execution"]["taskSupport"], "optional",
            "every tool may run as a task: {tool}"
        );
    }

    let task = start_slow_task(&mcp, &sid, 1, 1_500).await;
    let got = rpc(&mcp, &sid, 2, "tasks/get", json!({"taskId": task})).await;
    assert_eq!(got["result"]["status"], "working", "{got}");
    assert_eq!(got["result"]["taskId"], json!(task));

    // `tasks/result` waits for the end and gives the call's own result.
    let result = rpc(&mcp, &sid, 3, "tasks/result", json!({"taskId": task})).await;
    assert_eq!(
        result["result"]["content"][0]["text"], "waited 1500 ms",
        "{result}"
    );
    assert_eq!(
        result["result"]["_meta"]["io.modelcontextprotocol/related-task"]["taskId"],
        json!(task)
    );
    let got = rpc(&mcp, &sid, 4, "tasks/get", json!({"taskId": task})).await;
    assert_eq!(got["result"]["status"], "completed", "{got}");

    let listed = rpc(&mcp, &sid, 5, "tasks/list", json!({})).await;
    let ids: Vec<&Value> = listed["result"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["taskId"])
        .collect();
    assert_eq!(ids, vec![&json!(task)], "{listed}");

    // Unknown and malformed ids: -32602, the same answer.
    for bad in ["t_00000000000000000000000000000000", "nonsense"] {
        let r = rpc(&mcp, &sid, 6, "tasks/get", json!({"taskId": bad})).await;
        assert_eq!(r["error"]["code"], -32602, "{r}");
    }

    // Cancelled while it runs; a second cancel finds it ended.
    let long = start_slow_task(&mcp, &sid, 7, 20_000).await;
    let cancelled = rpc(&mcp, &sid, 8, "tasks/cancel", json!({"taskId": long})).await;
    assert_eq!(cancelled["result"]["status"], "cancelled", "{cancelled}");
    let got = rpc(&mcp, &sid, 9, "tasks/get", json!({"taskId": long})).await;
    assert_eq!(got["result"]["status"], "cancelled", "{got}");
    let again = rpc(&mcp, &sid, 10, "tasks/cancel", json!({"taskId": long})).await;
    assert_eq!(again["error"]["code"], -32602, "{again}");
    // The session goes on.
    assert_eq!(
        mcp.call_text(&sid, 11, "echo", json!({"text": "still here"}))
            .await,
        "still here"
    );
    // The metrics count the same tasks.
    assert_eq!(common::metric(&gw, "tether_tasks_created_total").await, 2.0);
    assert_eq!(
        common::metric(&gw, "tether_tasks_ended_total{status=\"completed\"}").await,
        1.0
    );
    assert_eq!(
        common::metric(&gw, "tether_tasks_ended_total{status=\"cancelled\"}").await,
        1.0
    );
    // The cancelled call's runner ends once its stream does.
    let mut running = common::metric(&gw, "tether_tasks_running").await;
    for _ in 0..250 {
        if running == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        running = common::metric(&gw, "tether_tasks_running").await;
    }
    assert_eq!(running, 0.0);
}

/// A kill -9 while tasks run: after the restart both are still known. The one whose tool is
/// safe to repeat (`slow`, read-only) is re-issued under the same id and completes; the
/// other (`slow_write`) is `failed`, saying why. Never "not found", which is what a
/// forgetting server answers.
#[tokio::test]
async fn tasks_interrupted_by_a_gateway_kill_are_resumed_or_failed_never_forgotten() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let (sid, _) = tasks_session(&mcp).await;
    let safe = start_slow_task(&mcp, &sid, 1, 3_000).await;
    let created = rpc(
        &mcp,
        &sid,
        2,
        "tools/call",
        json!({"name": "slow_write", "arguments": {"ms": 3_000}, "task": {"ttl": 60_000}}),
    )
    .await;
    let unsafe_task = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.kill9();
    let gw = gw.restart();
    let mcp = gw.client();

    let got = rpc(&mcp, &sid, 3, "tasks/get", json!({"taskId": unsafe_task})).await;
    assert_eq!(got["result"]["status"], "failed", "{got}");
    assert!(
        got["result"]["statusMessage"]
            .as_str()
            .is_some_and(|m| m.contains("interrupted by a gateway restart")),
        "{got}"
    );
    let result = rpc(
        &mcp,
        &sid,
        4,
        "tasks/result",
        json!({"taskId": unsafe_task}),
    )
    .await;
    assert_eq!(result["error"]["code"], -32013, "{result}");

    let got = rpc(&mcp, &sid, 5, "tasks/get", json!({"taskId": safe})).await;
    assert_eq!(got["result"]["status"], "working", "{got}");
    assert_eq!(
        got["result"]["statusMessage"], "resumed after a gateway restart",
        "{got}"
    );
    let result = rpc(&mcp, &sid, 6, "tasks/result", json!({"taskId": safe})).await;
    assert_eq!(
        result["result"]["content"][0]["text"], "waited 3000 ms",
        "{result}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// What one user can make the gateway keep is bounded (stored tasks, the size of an
/// answer a task keeps), another user is unharmed, and another user's task id is unknown
/// to them.
#[tokio::test]
async fn tasks_are_bounded_per_user_and_private() {
    let dir = state_dir();
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "").unwrap();
    let alice_key = common::add_key(&config, "alice", "alice@example.com");
    let bob_key = common::add_key(&config, "bob", "bob@example.com");
    let gw = Gateway::start(
        dir.path(),
        &["--config", config.to_str().unwrap(), "--demo"],
    );
    let alice = common::with_key(&gw.client(), &alice_key);
    let bob = common::with_key(&gw.client(), &bob_key);
    let (sa, _) = tasks_session(&alice).await;
    let (sb, _) = tasks_session(&bob).await;

    // An answer over what a task keeps: the task fails, naming the bound.
    let created = rpc(
        &alice,
        &sa,
        1,
        "tools/call",
        json!({"name": "big", "arguments": {"bytes": 2_000_000}, "task": {}}),
    )
    .await;
    let big = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = rpc(&alice, &sa, 2, "tasks/result", json!({"taskId": big})).await;
    assert_eq!(r["error"]["data"]["limit"], 1 << 20, "{r}");
    let got = rpc(&alice, &sa, 3, "tasks/get", json!({"taskId": big})).await;
    assert_eq!(got["result"]["status"], "failed", "{got}");

    // Bob cannot see alice's task.
    let r = rpc(&bob, &sb, 4, "tasks/get", json!({"taskId": big})).await;
    assert_eq!(r["error"]["code"], -32602, "{r}");

    // Alice fills her stored tasks (256 with the one above); the next is refused.
    for i in 0..255 {
        rpc(
            &alice,
            &sa,
            10 + i,
            "tools/call",
            json!({"name": "echo", "arguments": {"text": "x"}, "task": {}}),
        )
        .await;
    }
    let refused = rpc(
        &alice,
        &sa,
        300,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "x"}, "task": {}}),
    )
    .await;
    assert_eq!(refused["error"]["code"], -32016, "{refused}");
    assert_eq!(refused["error"]["data"]["limit"], "max-stored-tasks");
    // Plain calls still go, and bob's tasks are his own budget.
    assert_eq!(
        alice
            .call_text(&sa, 301, "echo", json!({"text": "plain"}))
            .await,
        "plain"
    );
    let task = start_slow_task(&bob, &sb, 5, 10).await;
    let r = rpc(&bob, &sb, 6, "tasks/result", json!({"taskId": task})).await;
    assert_eq!(r["result"]["content"][0]["text"], "waited 10 ms", "{r}");
}

/// A task belongs to the server it was created on: another server of the same gateway,
/// asked by the same user, knows nothing of it (and lists only its own).
#[tokio::test]
async fn a_task_is_answered_only_by_its_own_server() {
    let dir = state_dir();
    let file = dir.path().join("servers.json");
    let demo = json!({"command": common::BIN, "args": ["demo-server"]});
    std::fs::write(
        &file,
        json!({"mcpServers": {"alpha": demo, "beta": demo}}).to_string(),
    )
    .unwrap();
    let gw = Gateway::start(dir.path(), &["--servers", file.to_str().unwrap()]);
    let alpha = gw
        .client()
        .with_url(&gw.url.replace("/mcp", "/servers/alpha/mcp"));
    let beta = gw
        .client()
        .with_url(&gw.url.replace("/mcp", "/servers/beta/mcp"));
    let (sa, _) = tasks_session(&alpha).await;
    let (sb, _) = tasks_session(&beta).await;
    let task = start_slow_task(&alpha, &sa, 1, 10).await;
    let r = rpc(&beta, &sb, 2, "tasks/get", json!({"taskId": task})).await;
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let listed = rpc(&beta, &sb, 3, "tasks/list", json!({})).await;
    assert_eq!(listed["result"]["tasks"], json!([]), "{listed}");
    let r = rpc(&alpha, &sa, 4, "tasks/result", json!({"taskId": task})).await;
    assert_eq!(r["result"]["content"][0]["text"], "waited 10 ms", "{r}");
}
