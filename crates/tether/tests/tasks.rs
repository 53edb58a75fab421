//! Durable tasks (issue 28), owned by the gateway: 2025-11-25 tasks for a legacy client
//! (`params.task`, `tasks/get`, `tasks/result`, `tasks/list`, `tasks/cancel`) and the
//! 2026-07-28 Tasks extension for a stateless client (a call that outlives `--task-after`
//! becomes a task; `tasks/get`, `tasks/update` with the upstream's elicitation as
//! `inputRequests`, `tasks/cancel`, `notifications/tasks` on a listen stream, `Mcp-Name`
//! checked, `-32021` without the extension), kept in the store, bounded per user, answered
//! only on their server and to their user, and after a gateway kill re-issued when safe
//! to repeat or `failed`, never "not found".

mod common;

use std::time::Duration;

use common::modern::{Modern, V};
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

/// A gateway in front of the demo with two API-key users, alice and bob, and `extra`
/// arguments; their keys.
fn two_users(dir: &std::path::Path, extra: &[&str]) -> (Gateway, String, String) {
    let config = dir.join("tether.toml");
    std::fs::write(&config, "").unwrap();
    let alice = common::add_key(&config, "alice", "alice@example.com");
    let bob = common::add_key(&config, "bob", "bob@example.com");
    let mut args = vec!["--config", config.to_str().unwrap(), "--demo"];
    args.extend_from_slice(extra);
    (Gateway::start(dir, &args), alice, bob)
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
    let (gw, alice_key, bob_key) = two_users(
        dir.path(),
        &[
            "--max-stored-tasks",
            "20",
            "--max-tasks-per-principal",
            "2",
            "--max-task-result",
            "100KiB",
        ],
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
        json!({"name": "big", "arguments": {"bytes": 200_000}, "task": {}}),
    )
    .await;
    let big = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = rpc(&alice, &sa, 2, "tasks/result", json!({"taskId": big})).await;
    assert_eq!(r["error"]["data"]["limit"], 100 << 10, "{r}");
    let got = rpc(&alice, &sa, 3, "tasks/get", json!({"taskId": big})).await;
    assert_eq!(got["result"]["status"], "failed", "{got}");

    // Bob cannot see alice's task.
    let r = rpc(&bob, &sb, 4, "tasks/get", json!({"taskId": big})).await;
    assert_eq!(r["error"]["code"], -32602, "{r}");

    // Two running at once at most for one user; a third is refused, bob's are his own.
    let first = start_slow_task(&alice, &sa, 5, 2_000).await;
    let second = start_slow_task(&alice, &sa, 6, 2_000).await;
    let refused = rpc(
        &alice,
        &sa,
        7,
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": 10}, "task": {}}),
    )
    .await;
    assert_eq!(refused["error"]["code"], -32016, "{refused}");
    assert_eq!(refused["error"]["data"]["limit"], "max-tasks-per-principal");
    let bobs = start_slow_task(&bob, &sb, 7, 10).await;
    rpc(&bob, &sb, 8, "tasks/result", json!({"taskId": bobs})).await;
    rpc(&alice, &sa, 8, "tasks/result", json!({"taskId": first})).await;
    rpc(&alice, &sa, 9, "tasks/result", json!({"taskId": second})).await;

    // Alice fills her stored tasks (20 with the three above); then she is refused. Her
    // quick tasks may meet the running bound meanwhile: those are not stored, and retried.
    let mut stored = 3;
    let mut id = 10;
    let refused = loop {
        id += 1;
        let r = rpc(
            &alice,
            &sa,
            id,
            "tools/call",
            json!({"name": "echo", "arguments": {"text": "x"}, "task": {}}),
        )
        .await;
        match r["error"]["data"]["limit"].as_str() {
            None => stored += 1,
            Some("max-tasks-per-principal") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(_) => break r,
        }
        assert!(id < 200, "never refused");
    };
    assert_eq!(refused["error"]["code"], -32016, "{refused}");
    assert_eq!(refused["error"]["data"]["limit"], "max-stored-tasks");
    assert_eq!(stored, 20, "refused at the bound, not before");
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

/// The Tasks extension as a 2026-07-28 client declares it, with elicitation.
fn tasks_client(url: &str) -> Modern {
    Modern::new(
        url,
        json!({"elicitation": {}, "extensions": {"io.modelcontextprotocol/tasks": {}}}),
    )
    .named("modern-tasks-test")
}

/// Polls a 2026-07-28 task until `done` holds for its `tasks/get` result (at most 20 s).
async fn poll_until(client: &Modern, task: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut id = 1000;
    loop {
        id += 1;
        let got = client.send(id, "tasks/get", json!({"taskId": task})).await;
        assert_eq!(got.status, 200, "{}", got.body);
        let got = got.json();
        assert_eq!(got["result"]["resultType"], "complete", "{got}");
        if done(&got["result"]) {
            return got["result"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task {task} never got there: {got}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `tasks/*` request whose `Mcp-Name` header is `name`, whatever its body says.
async fn task_request_named(url: &str, method: &str, task: &str, name: &str) -> (u16, Value) {
    let meta = json!({"io.modelcontextprotocol/protocolVersion": V,
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}}});
    let resp = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", common::ACCEPT_BOTH)
        .header("mcp-protocol-version", V)
        .header("mcp-method", method)
        .header("mcp-name", name)
        .body(
            json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": {"taskId": task, "_meta": meta}})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// A 2026-07-28 client that declares the Tasks extension: the gateway advertises it, a
/// quick call is answered as ever, a call that outlives `--task-after` becomes a task that
/// a listen stream naming it hears end and `tasks/get` shows with its result; a listed
/// tool becomes a task at once, its elicitation is the task's `inputRequests` and
/// `tasks/update` answers it; `tasks/cancel` stops a task; a client without the extension
/// gets plain answers; bad ids and headers get the spec's errors.
#[tokio::test]
async fn a_modern_clients_long_call_becomes_a_task_it_polls_answers_and_cancels() {
    use futures::StreamExt;
    let dir = state_dir();
    let gw = Gateway::start(
        dir.path(),
        &["--demo", "--task-after", "300ms", "--task-tools", "ask"],
    );
    let client = tasks_client(&gw.url);

    let discover = client.send(1, "server/discover", json!({})).await.json();
    assert_eq!(
        discover["result"]["capabilities"]["extensions"]["io.modelcontextprotocol/tasks"],
        json!({}),
        "{discover}"
    );

    // Answered before --task-after: a plain result.
    let quick = client.call(2, "echo", json!({"text": "hi"})).await.json();
    assert_eq!(quick["result"]["resultType"], "complete", "{quick}");
    assert_eq!(quick["result"]["content"][0]["text"], "hi");

    // Longer: a task, answered once its record is stored; the call goes on upstream.
    let task = client.task(3, "slow", json!({"ms": 1_500})).await;
    let listen = client
        .listen("sub-task", json!({"taskIds": [task.clone()]}))
        .await;
    let mut listen = listen.bytes_stream();
    let mut seen = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = listen.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if seen.contains("\"notifications/tasks\"") && seen.contains("completed") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        ended,
        Ok(true),
        "the listen stream hears the task end: {seen}"
    );
    assert!(
        seen.contains("\"taskIds\":[\""),
        "the ack names the task: {seen}"
    );
    let done = poll_until(&client, &task, |t| t["status"] != "working").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["result"]["content"][0]["text"], "waited 1500 ms",
        "{done}"
    );

    // A listed tool becomes a task at once; the upstream's elicitation waits as input.
    let asked = client.task(4, "ask", json!({})).await;
    let waiting = poll_until(&client, &asked, |t| t["status"] == "input_required").await;
    let inputs = waiting["inputRequests"].as_object().unwrap();
    assert_eq!(inputs.len(), 1, "{waiting}");
    let (key, input) = inputs.iter().next().unwrap();
    assert_eq!(input["method"], "elicitation/create", "{waiting}");
    let ack = client
        .send(
            5,
            "tasks/update",
            json!({"taskId": asked, "inputResponses": {
                key.as_str(): {"action": "accept", "content": {"name": "Ada"}},
                "never-asked": {"action": "decline"}
            }}),
        )
        .await
        .json();
    assert_eq!(ack["result"], json!({"resultType": "complete"}), "{ack}");
    let greeted = poll_until(&client, &asked, |t| t["status"] == "completed").await;
    assert_eq!(
        greeted["result"]["content"][0]["text"], "hello, Ada",
        "{greeted}"
    );

    // Cancelled: acknowledged at once, then the task is cancelled.
    let long = client.task(6, "slow_write", json!({"ms": 30_000})).await;
    let ack = client
        .send(7, "tasks/cancel", json!({"taskId": long}))
        .await
        .json();
    assert_eq!(ack["result"], json!({"resultType": "complete"}), "{ack}");
    let cancelled = poll_until(&client, &long, |t| t["status"] != "working").await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");

    // Unknown ids, and a header that disagrees with the body.
    let unknown = client
        .send(
            8,
            "tasks/get",
            json!({"taskId": "t_00000000000000000000000000000000"}),
        )
        .await;
    assert_eq!(
        (unknown.status, unknown.json()["error"]["code"].clone()),
        (200, json!(-32602))
    );
    let (status, body) = task_request_named(&gw.url, "tasks/get", &task, "t_other").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!(-32020)),
        "{body}"
    );
    let listed = client.send(9, "tasks/list", json!({})).await;
    assert_eq!(
        listed.status, 404,
        "tasks/list does not exist in 2026-07-28: {}",
        listed.body
    );

    // Without the extension: no task, the answer comes as ever, and naming tasks on a
    // listen stream needs the extension.
    let plain = Modern::new(&gw.url, json!({}));
    let slow = plain.call(10, "slow", json!({"ms": 600})).await.response();
    assert_eq!(
        slow["result"]["content"][0]["text"], "waited 600 ms",
        "{slow}"
    );
    let refused = plain
        .send(
            11,
            "subscriptions/listen",
            json!({"notifications": {"taskIds": [task]}}),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    let refused = refused.json();
    assert_eq!(refused["error"]["code"], -32021, "{refused}");
    assert_eq!(
        refused["error"]["data"]["requiredCapabilities"]["extensions"]["io.modelcontextprotocol/tasks"],
        json!({}),
        "{refused}"
    );

    assert_eq!(common::metric(&gw, "tether_tasks_created_total").await, 3.0);
    assert_eq!(common::metric(&gw, "tether_tasks_running").await, 0.0);

    // The admin API and `tether tasks` show the same three, newest first, no answers.
    let listed = gw.admin_json("/api/tasks").await;
    let rows = listed["tasks"].as_array().unwrap();
    let ids: Vec<&str> = rows.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [long.as_str(), asked.as_str(), task.as_str()],
        "{listed}"
    );
    let statuses: Vec<&str> = rows.iter().map(|t| t["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["cancelled", "completed", "completed"]);
    assert_eq!(rows[2]["tool"], "slow");
    assert_eq!(rows[2]["era"], "2026-07-28");
    assert_eq!(rows[2]["repeatable"], true, "slow is read-only");
    assert_eq!(rows[0]["repeatable"], false, "slow_write is not");
    assert!(rows.iter().all(|t| t.get("result").is_none()));
    let only = gw.admin_json("/api/tasks?status=cancelled").await;
    assert_eq!(only["tasks"].as_array().unwrap().len(), 1, "{only}");
    let out = std::process::Command::new(common::BIN)
        .args([
            "tasks",
            "--admin",
            &gw.admin,
            "--status",
            "completed",
            "--state-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("TASK"), "{text}");
    assert!(
        text.contains(&task) && text.contains(&asked) && !text.contains(&long),
        "{text}"
    );
}

/// Another user's 2026-07-28 task is unknown to them, for every method.
#[tokio::test]
async fn a_modern_task_is_its_users_only() {
    let dir = state_dir();
    let (gw, alice_key, bob_key) = two_users(dir.path(), &["--task-after", "0"]);
    let alice = tasks_client(&gw.url).with_key(&alice_key);
    let bob = tasks_client(&gw.url).with_key(&bob_key);
    let task = alice.task(1, "slow", json!({"ms": 2_000})).await;
    for (i, method) in ["tasks/get", "tasks/cancel"].into_iter().enumerate() {
        let got = bob
            .send(2 + i as i64, method, json!({"taskId": task}))
            .await
            .json();
        assert_eq!(got["error"]["code"], -32602, "{method}: {got}");
    }
    let got = bob
        .send(
            5,
            "tasks/update",
            json!({"taskId": task, "inputResponses": {}}),
        )
        .await
        .json();
    assert_eq!(got["error"]["code"], -32602, "{got}");
    // Alice's task was not touched by any of it.
    let done = poll_until(&alice, &task, |t| t["status"] != "working").await;
    assert_eq!(done["status"], "completed", "{done}");
}

/// A kill -9 while 2026-07-28 tasks run: the one safe to repeat is re-issued under the
/// same id on a fresh pooled upstream and completes; the other is `failed`, saying why.
#[tokio::test]
async fn modern_tasks_interrupted_by_a_gateway_kill_are_resumed_or_failed() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo", "--task-after", "0"]);
    let client = tasks_client(&gw.url);
    let safe = client.task(1, "slow", json!({"ms": 2_000})).await;
    let unsafe_task = client.task(2, "slow_write", json!({"ms": 2_000})).await;
    gw.kill9();
    let gw = gw.restart();
    let client = tasks_client(&gw.url);

    let failed = poll_until(&client, &unsafe_task, |_| true).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], -32013, "{failed}");
    assert!(
        failed["statusMessage"]
            .as_str()
            .is_some_and(|m| m.contains("interrupted by a gateway restart")),
        "{failed}"
    );
    let resumed = poll_until(&client, &safe, |_| true).await;
    assert_eq!(resumed["status"], "working", "{resumed}");
    assert_eq!(
        resumed["statusMessage"], "resumed after a gateway restart",
        "{resumed}"
    );
    let done = poll_until(&client, &safe, |t| t["status"] == "completed").await;
    assert_eq!(
        done["result"]["content"][0]["text"], "waited 2000 ms",
        "{done}"
    );
}

/// A graceful stop (SIGTERM) while 2026-07-28 tasks run is no outcome: the records stay
/// as they were, and the next start settles them as after a kill (the safe one re-issued
/// and completed, the other `failed` as interrupted), instead of recording the upstream's
/// shutdown as the tasks' end.
#[tokio::test]
async fn a_graceful_stop_leaves_running_tasks_to_the_next_start() {
    let dir = state_dir();
    let mut gw = Gateway::start(
        dir.path(),
        &["--demo", "--task-after", "0", "--shutdown-grace", "1s"],
    );
    let client = tasks_client(&gw.url);
    let safe = client.task(1, "slow", json!({"ms": 3_000})).await;
    let unsafe_task = client.task(2, "slow_write", json!({"ms": 3_000})).await;
    gw.stop().await.unwrap();
    let gw = gw.restart();
    let client = tasks_client(&gw.url);
    let failed = poll_until(&client, &unsafe_task, |_| true).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], -32013, "{failed}");
    let done = poll_until(&client, &safe, |t| t["status"] == "completed").await;
    assert_eq!(
        done["statusMessage"], "resumed after a gateway restart",
        "{done}"
    );
    assert_eq!(
        done["result"]["content"][0]["text"], "waited 3000 ms",
        "{done}"
    );
}

/// A task's call is bounded by the task's time to live, not `--upstream-timeout`: a task
/// longer than the timeout completes, and one that outlives its time to live is stopped
/// upstream and counted `failed` (its record may be forgotten from then on).
#[tokio::test]
async fn a_tasks_call_lives_as_long_as_the_task_not_the_upstream_timeout() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo", "--upstream-timeout", "1s"]);
    let mcp = gw.client();
    let (sid, _) = tasks_session(&mcp).await;
    let long = start_slow_task(&mcp, &sid, 1, 2_500).await;
    let result = rpc(&mcp, &sid, 2, "tasks/result", json!({"taskId": long})).await;
    assert_eq!(
        result["result"]["content"][0]["text"], "waited 2500 ms",
        "past --upstream-timeout: {result}"
    );
    let short = rpc(
        &mcp,
        &sid,
        3,
        "tools/call",
        json!({"name": "slow_write", "arguments": {"ms": 30_000}, "task": {"ttl": 500}}),
    )
    .await;
    assert_eq!(short["result"]["task"]["ttl"], 500, "{short}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while common::metric(&gw, "tether_tasks_running").await > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outlived task still runs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        common::metric(&gw, "tether_tasks_ended_total{status=\"failed\"}").await,
        1.0
    );
    assert_eq!(
        common::metric(&gw, "tether_tasks_ended_total{status=\"completed\"}").await,
        1.0
    );
}

/// A 2025-11-25 task's upstream asks its client something (the demo's `ask`: elicitation):
/// the request reaches the client on the session's GET stream tagged with the task, the
/// task is `input_required` meanwhile, and the client's answer reaches the upstream, which
/// finishes the task.
#[tokio::test]
async fn a_legacy_tasks_elicitation_reaches_its_client_and_the_answer_its_upstream() {
    use futures::StreamExt;
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {"tasks": {"list": {}, "cancel": {}}, "elicitation": {}},
        "clientInfo": {"name": "tasks-elicit", "version": "1.0"}
    }});
    let a = mcp.post(None, &init).await;
    let sid = a.headers["mcp-session-id"].to_str().unwrap().to_owned();
    mcp.post(
        Some(&sid),
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    let mut events = mcp.listen(&sid).await.bytes_stream();
    let created = rpc(
        &mcp,
        &sid,
        1,
        "tools/call",
        json!({"name": "ask", "arguments": {}, "task": {"ttl": 60_000}}),
    )
    .await;
    let task = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();

    // The request arrives on the GET stream, tagged with its task.
    let mut seen = String::new();
    let ask = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = events.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            for line in seen.lines() {
                if let Some(data) = line.strip_prefix("data: ")
                    && let Ok(v) = serde_json::from_str::<Value>(data)
                    && v["method"] == "elicitation/create"
                {
                    return v;
                }
            }
        }
        panic!("the stream ended: {seen}");
    })
    .await
    .expect("the elicitation reaches the GET stream");
    assert_eq!(
        ask["params"]["_meta"]["io.modelcontextprotocol/related-task"]["taskId"],
        task.as_str(),
        "{ask}"
    );
    let got = rpc(&mcp, &sid, 2, "tasks/get", json!({"taskId": task})).await;
    assert_eq!(got["result"]["status"], "input_required", "{got}");

    let answer = json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"action": "accept", "content": {"name": "Ada"}}});
    let posted = mcp.post(Some(&sid), &answer).await;
    assert_eq!(posted.status, 202, "{}", posted.body);
    let result = rpc(&mcp, &sid, 3, "tasks/result", json!({"taskId": task})).await;
    assert_eq!(
        result["result"]["content"][0]["text"], "hello, Ada",
        "{result}"
    );
    let got = rpc(&mcp, &sid, 4, "tasks/get", json!({"taskId": task})).await;
    assert_eq!(got["result"]["status"], "completed", "{got}");
}
