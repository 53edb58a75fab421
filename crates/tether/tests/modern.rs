//! The modern era (2026-07-28) through the gateway to a legacy stdio server (the demo):
//! discover, calls, progress on the request's stream, MRTR round trips, cancellation by
//! closing the stream, pools per principal, and what a parked call's client gets after the
//! gateway was killed. Raw HTTP, so every header and field is the test's to choose; real
//! SDK clients are in `e2e_modern.rs` and the official conformance suite in
//! `conformance_suite.rs`.

mod common;

use std::time::Duration;

use common::modern::{Modern, V};
use common::{Gateway, state_dir};
use serde_json::{Value, json};

fn text_of(answer: &Value) -> String {
    answer
        .pointer("/result/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no text in {answer}"))
        .to_owned()
}

#[tokio::test]
async fn a_modern_client_reaches_a_legacy_server_beside_a_legacy_client() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let modern = Modern::new(&gw.url, json!({}));

    let d = modern.send(1, "server/discover", json!({})).await;
    assert_eq!(d.status, 200, "{}", d.body);
    let d = d.json();
    assert_eq!(d["id"], 1);
    let r = &d["result"];
    assert_eq!(r["resultType"], "complete");
    assert_eq!(r["supportedVersions"][0], V);
    assert!(
        r["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("2025-11-25"))
    );
    assert!(r["capabilities"]["tools"].is_object(), "{r}");
    assert!(r["_meta"]["io.modelcontextprotocol/serverInfo"]["name"].is_string());
    assert!(r["ttlMs"].is_u64() && r["cacheScope"].is_string());

    let list = modern.send(2, "tools/list", json!({})).await.json();
    assert_eq!(list["result"]["resultType"], "complete");
    assert_eq!(list["result"]["ttlMs"], 0);
    assert!(
        list["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "echo")
    );

    let echo = modern.call(3, "echo", json!({"text": "modern"})).await;
    assert_eq!(echo.status, 200);
    let echo = echo.json();
    assert_eq!(echo["id"], 3);
    assert_eq!(echo["result"]["resultType"], "complete");
    assert_eq!(text_of(&echo), "modern");

    // The same id from many concurrent stateless calls is fine: each gets its own answer.
    let calls = (0..8).map(|i| {
        let m = &modern;
        async move {
            text_of(
                &m.call(1, "echo", json!({"text": format!("c{i}")}))
                    .await
                    .json(),
            )
        }
    });
    let texts = futures::future::join_all(calls).await;
    assert_eq!(texts, (0..8).map(|i| format!("c{i}")).collect::<Vec<_>>());

    // Progress arrives on the request's own stream, then the answer.
    let slow = modern
        .send(
            4,
            "tools/call",
            json!({"name": "slow", "arguments": {"ms": 300, "steps": 3}, "_meta": {"progressToken": "tok"}}),
        )
        .await;
    assert_eq!(slow.headers["content-type"], "text/event-stream");
    assert_eq!(slow.headers["x-accel-buffering"], "no");
    let events: Vec<Value> = slow.events().into_iter().filter_map(|(_, d)| d).collect();
    assert!(
        events
            .iter()
            .any(|e| e["method"] == "notifications/progress"
                && e["params"]["progressToken"] == "tok"),
        "{events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last["id"].clone(), text_of(last)),
        (json!(4), "waited 300 ms".to_owned())
    );
    // No event ids: modern streams are not resumable.
    assert!(slow.events().iter().all(|(id, _)| id.is_empty()));

    // A legacy client on the same endpoint keeps everything it had.
    let mcp = gw.client();
    let sid = mcp.initialize("legacy-beside").await;
    assert_eq!(
        mcp.call_text(&sid, 1, "echo", json!({"text": "legacy"}))
            .await,
        "legacy"
    );

    // The pooled upstream session shows in the admin API, told apart from the client's.
    let sessions = gw.admin_json("/api/sessions?state=live").await;
    let transports: Vec<String> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["transport"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(transports.contains(&"pooled".to_owned()), "{sessions}");
    assert!(
        transports.contains(&"streamable-http".to_owned()),
        "{sessions}"
    );
    // Stateless clients are shown by user and client, with their requests (admin API and
    // CLI); they have no session of their own.
    let clients = gw.admin_json("/api/stateless-clients").await;
    let me = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_name"] == "modern-test")
        .unwrap_or_else(|| panic!("{clients}"));
    assert_eq!(me["user_id"], "anonymous");
    assert_eq!(me["tool_calls"], 10, "{me}");
    assert_eq!(me["requests"], 12, "{me}");
    let out = std::process::Command::new(common::BIN)
        .args(["clients", "--admin", &gw.admin, "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("modern-test"),
        "{table}"
    );
    // Requests are counted by era.
    assert!(
        common::metric_sum(
            &gw,
            "tether_mcp_requests_total{era=\"modern\",method=\"tools/call\"}"
        )
        .await
            >= 10.0
    );
    assert!(
        common::metric_sum(
            &gw,
            "tether_mcp_requests_total{era=\"legacy\",method=\"tools/call\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn sampling_through_mrtr_round_trips_and_a_tampered_state_is_refused() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let modern = Modern::new(&gw.url, json!({"sampling": {}}));
    let first = modern
        .call(10, "sample", json!({"prompt": "capital of France?"}))
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    let first = first.json();
    let r = &first["result"];
    assert_eq!(r["resultType"], "input_required", "{first}");
    let inputs = r["inputRequests"].as_object().unwrap();
    assert_eq!(inputs.len(), 1);
    let (key, input) = inputs.iter().next().unwrap();
    assert_eq!(input["method"], "sampling/createMessage");
    assert_eq!(
        input["params"]["messages"][0]["content"]["text"],
        "capital of France?"
    );
    let state = r["requestState"].as_str().unwrap().to_owned();

    // A tampered state is refused, and the parked call is still there for the real one.
    let answer = json!({"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "m", "stopReason": "endTurn"});
    let tampered = modern
        .send(
            11,
            "tools/call",
            json!({"name": "sample", "arguments": {"prompt": "capital of France?"}, "requestState": format!("{state}x"), "inputResponses": {key.as_str(): answer.clone()}}),
        )
        .await;
    assert_eq!(
        (tampered.status, tampered.json()["error"]["code"].clone()),
        (400, json!(-32602))
    );
    // Another principal cannot continue it either (here: another tool name).
    let foreign = modern
        .send(
            12,
            "tools/call",
            json!({"name": "echo", "arguments": {"text": "x"}, "requestState": state.clone(), "inputResponses": {}}),
        )
        .await;
    assert_eq!(foreign.status, 400, "{}", foreign.body);

    let done = modern
        .send(
            13,
            "tools/call",
            json!({"name": "sample", "arguments": {"prompt": "capital of France?"}, "requestState": state.clone(), "inputResponses": {key.as_str(): answer}}),
        )
        .await
        .json();
    assert_eq!(done["id"], 13);
    assert_eq!(done["result"]["resultType"], "complete");
    assert_eq!(text_of(&done), "model said: Paris");

    // The state was used: a replay gets a clear error, not a hang.
    let replay = modern
        .send(
            14,
            "tools/call",
            json!({"name": "sample", "arguments": {"prompt": "capital of France?"}, "requestState": state, "inputResponses": {}}),
        )
        .await
        .json();
    assert_eq!(replay["error"]["code"], -32013, "{replay}");

    // A retry that leaves the input out is asked again.
    let again = modern
        .call(15, "sample", json!({"prompt": "q"}))
        .await
        .json();
    let state = again["result"]["requestState"].as_str().unwrap();
    let asked_again = modern
        .send(
            16,
            "tools/call",
            json!({"name": "sample", "arguments": {"prompt": "q"}, "requestState": state, "inputResponses": {"wrong-key": {}}}),
        )
        .await
        .json();
    assert_eq!(
        asked_again["result"]["resultType"], "input_required",
        "{asked_again}"
    );
}

#[tokio::test]
async fn closing_the_stream_cancels_the_call_upstream() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let modern = Modern::new(&gw.url, json!({}));
    // Progress makes it a stream at once; the client reads the first event and leaves.
    let resp = modern
        .request(
            20,
            "tools/call",
            json!({"name": "slow", "arguments": {"ms": 30000, "steps": 30}, "_meta": {"progressToken": 1}}),
        )
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    use futures::StreamExt;
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("notifications/progress"));
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while common::metric_sum(&gw, "tether_tool_calls_total{outcome=\"cancelled\"}").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call was not recorded as cancelled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The upstream heard of it (the demo logs cancellations on stderr) and serves on.
    assert_eq!(
        text_of(
            &modern
                .call(21, "echo", json!({"text": "after"}))
                .await
                .json()
        ),
        "after"
    );
}

#[tokio::test]
async fn principals_get_their_own_upstreams() {
    let dir = state_dir();
    let mut keys = Vec::new();
    for user in ["alice", "bob"] {
        let out = std::process::Command::new(common::BIN)
            .args(["keys", "add", "--user", user, "--config"])
            .arg(dir.path().join("tether.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        keys.push(
            text.lines()
                .map(str::trim)
                .find(|l| l.starts_with("tk_"))
                .unwrap_or_else(|| panic!("no key in {text}"))
                .to_owned(),
        );
    }
    let config = dir.path().join("tether.toml");
    let gw = Gateway::start(
        dir.path(),
        &["--demo", "--config", config.to_str().unwrap()],
    );
    let alice = Modern::new(&gw.url, json!({})).with_key(&keys[0]);
    let bob = Modern::new(&gw.url, json!({})).with_key(&keys[1]);
    let pa = text_of(&alice.call(1, "pid", json!({})).await.json());
    let pb = text_of(&bob.call(1, "pid", json!({})).await.json());
    assert_ne!(
        pa, pb,
        "two principals must never share an upstream process"
    );
    // One principal's sequential calls stay on its one pooled upstream.
    assert_eq!(text_of(&alice.call(2, "pid", json!({})).await.json()), pa);
    // Without a key: 401, as for a legacy client.
    let anon = Modern::new(&gw.url, json!({}));
    assert_eq!(anon.call(3, "pid", json!({})).await.status, 401);
}

#[tokio::test]
async fn a_parked_call_after_a_gateway_kill_gets_a_clear_error_and_the_bridge_comes_back() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let modern = Modern::new(&gw.url, json!({"sampling": {}}));
    let first = modern
        .call(30, "sample", json!({"prompt": "p"}))
        .await
        .json();
    let state = first["result"]["requestState"].as_str().unwrap().to_owned();
    let key = first["result"]["inputRequests"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    gw.kill9();
    let gw = gw.restart();
    let modern = Modern::new(&gw.url, json!({"sampling": {}}));
    let retry = modern
        .send(
            31,
            "tools/call",
            json!({"name": "sample", "arguments": {"prompt": "p"}, "requestState": state, "inputResponses": {key: {"role": "assistant", "content": {"type": "text", "text": "x"}, "model": "m"}}}),
        )
        .await;
    // The state still verifies (the key is in the state dir), but the call it continued
    // died with the gateway: the client is told so and may start over.
    assert_eq!(retry.status, 200, "{}", retry.body);
    let retry = retry.json();
    assert_eq!(retry["error"]["code"], -32013, "{retry}");
    assert!(
        retry["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no longer held")
    );
    assert_eq!(
        text_of(
            &modern
                .call(32, "echo", json!({"text": "back"}))
                .await
                .json()
        ),
        "back"
    );
}

#[tokio::test]
async fn clients_sharing_one_pooled_upstream_never_see_each_others_progress() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo", "--pool-size", "1"]);
    let a = Modern::new(&gw.url, json!({}));
    let b = Modern::new(&gw.url, json!({}));
    // One upstream for both (the pool holds one member) ...
    let pa = text_of(&a.call(1, "pid", json!({})).await.json());
    assert_eq!(text_of(&b.call(1, "pid", json!({})).await.json()), pa);
    // ... and both pick the same progress token for concurrent calls.
    let slow = |m: &'static Modern, ms: u64| async move {
        m.send(
            7,
            "tools/call",
            json!({"name": "slow", "arguments": {"ms": ms, "steps": 3}, "_meta": {"progressToken": "same"}}),
        )
        .await
    };
    let (a, b): (&'static Modern, &'static Modern) =
        (Box::leak(Box::new(a)), Box::leak(Box::new(b)));
    let (ra, rb) = tokio::join!(slow(a, 400), slow(b, 600));
    for (r, ms) in [(ra, 400), (rb, 600)] {
        let events: Vec<Value> = r.events().into_iter().filter_map(|(_, d)| d).collect();
        let progress: Vec<&Value> = events
            .iter()
            .filter(|e| e["method"] == "notifications/progress")
            .collect();
        assert_eq!(progress.len(), 3, "{events:?}");
        assert!(
            progress
                .iter()
                .all(|p| p["params"]["progressToken"] == "same")
        );
        assert_eq!(text_of(events.last().unwrap()), format!("waited {ms} ms"));
    }
}

#[tokio::test]
async fn two_applications_of_one_user_get_their_own_upstreams_and_ledger_rows() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let cursor = Modern::new(&gw.url, json!({})).named("Cursor");
    let claude = Modern::new(&gw.url, json!({})).named("claude-code");
    let pc = text_of(&cursor.call(1, "pid", json!({})).await.json());
    let pk = text_of(&claude.call(1, "pid", json!({})).await.json());
    assert_ne!(pc, pk, "two applications never share an upstream process");
    // Each pooled upstream's record names its client, so the ledger's per-client figures
    // hold for stateless clients too.
    let sessions = gw.admin_json("/api/sessions?state=live").await;
    let mut names: Vec<String> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["transport"] == "pooled")
        .map(|s| s["client_name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["Cursor", "claude-code"], "{sessions}");
}

#[tokio::test]
async fn a_listen_stream_gets_the_list_changes_it_asked_for_tagged_with_its_subscription() {
    use futures::StreamExt;
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let modern = Modern::new(&gw.url, json!({}));
    // A subscription is named by its request's id (a string here, as SDK clients send).
    let tools = modern
        .listen("sub-tools", json!({"toolsListChanged": true}))
        .await;
    assert_eq!(tools.headers()["content-type"], "text/event-stream");
    let prompts = modern
        .listen("sub-prompts", json!({"promptsListChanged": true}))
        .await;
    let mut tools = tools.bytes_stream();
    let mut prompts = prompts.bytes_stream();
    let event = |chunk: axum::body::Bytes| -> Value {
        let text = String::from_utf8_lossy(&chunk).to_string();
        let data = text
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("no data in {text:?}"));
        serde_json::from_str(data).unwrap()
    };
    let ack = event(tools.next().await.unwrap().unwrap());
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
    assert_eq!(
        ack["params"]["notifications"],
        json!({"toolsListChanged": true})
    );
    assert_eq!(
        ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        "sub-tools"
    );
    let _ = event(prompts.next().await.unwrap().unwrap());
    // A call on the user's pooled upstream changes its tool list.
    assert_eq!(
        text_of(&modern.call(1, "touch_tools", json!({})).await.json()),
        "sent"
    );
    let changed = tokio::time::timeout(Duration::from_secs(10), tools.next())
        .await
        .expect("the change reaches the listen stream")
        .unwrap()
        .unwrap();
    let changed = event(changed);
    assert_eq!(changed["method"], "notifications/tools/list_changed");
    assert_eq!(
        changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        "sub-tools"
    );
    // The stream filtered to prompts hears nothing of it.
    let quiet = tokio::time::timeout(Duration::from_millis(500), prompts.next()).await;
    assert!(quiet.is_err(), "a prompts-only listener got {quiet:?}");
}

/// A listen stream's `resourceSubscriptions` reach the legacy upstream as
/// `resources/subscribe` on the client's pooled session, and its
/// `notifications/resources/updated` come back on the stream, tagged; a URI not asked for
/// does not.
#[tokio::test]
async fn a_listen_stream_subscribes_the_resources_it_names() {
    use futures::StreamExt;
    let dir = state_dir();
    // One pool member: the call that touches the resource runs on the subscribed upstream.
    let gw = Gateway::start(dir.path(), &["--demo", "--bridge-pool-size", "1"]);
    let modern = Modern::new(&gw.url, json!({}));
    // The same client as the one that calls below: its pooled upstream is the one
    // subscribed.
    let resp = modern
        .listen(
            "sub-res",
            json!({"resourceSubscriptions": ["demo://watched", "demo://watched"]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut events = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    let mut next = async || loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event on the listen stream")
            .unwrap()
            .unwrap();
        if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
            return v;
        }
    };
    let ack = next().await;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
    assert_eq!(
        ack["params"]["notifications"],
        json!({"resourceSubscriptions": ["demo://watched"]}),
        "duplicates folded, the subscription honoured"
    );
    // The demo's touch sends an update for every resource its session subscribed to.
    assert_eq!(
        text_of(&modern.call(1, "touch", json!({})).await.json()),
        "updated=1 level=none"
    );
    let updated = next().await;
    assert_eq!(updated["method"], "notifications/resources/updated");
    assert_eq!(updated["params"]["uri"], "demo://watched");
    assert_eq!(
        updated["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        "sub-res"
    );
}
