//! The headline: sessions survive a SIGKILLed gateway, with no re-initialize by the client,
//! no orphaned children, and in-flight requests either re-issued (safe tools) or answered
//! with an "interrupted" error (unsafe tools) on stream resumption.

mod common;

use std::time::Duration;

use common::{Gateway, state_dir, wait_gone};
use serde_json::{Value, json};

#[tokio::test]
async fn sessions_survive_sigkill_without_reinitialize_and_leave_no_orphans() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let mut sessions = Vec::new();
    for i in 0..3 {
        let sid = mcp.initialize(&format!("client-{i}")).await;
        assert_eq!(mcp.call_text(&sid, 1, "counter", json!({})).await, "1");
        assert_eq!(mcp.call_text(&sid, 2, "counter", json!({})).await, "2");
        let pid: i32 = mcp
            .call_text(&sid, 3, "pid", json!({}))
            .await
            .parse()
            .unwrap();
        sessions.push((sid, pid));
    }

    gw.kill9();
    for (_, pid) in &sessions {
        assert!(
            wait_gone(*pid, Duration::from_secs(5)),
            "upstream {pid} outlived the SIGKILLed gateway"
        );
    }

    let gw2 = gw.restart();
    assert!(
        gw2.log_text()
            .contains("3 sessions were live before and will resume on contact")
    );
    let mcp2 = gw2.client();
    for (i, (sid, old_pid)) in sessions.iter().enumerate() {
        // Same id, no initialize: the gateway replays the stored one to a fresh upstream.
        let echoed = mcp2
            .call_text(sid, 10, "echo", json!({"text": format!("hello {i}")}))
            .await;
        assert_eq!(echoed, format!("hello {i}"));
        let new_pid: i32 = mcp2
            .call_text(sid, 11, "pid", json!({}))
            .await
            .parse()
            .unwrap();
        assert_ne!(
            new_pid, *old_pid,
            "a fresh upstream serves the resumed session"
        );
        // Upstream state is per process: a fresh upstream starts counting again.
        assert_eq!(mcp2.call_text(sid, 12, "counter", json!({})).await, "1");
    }
    assert_eq!(gw2.log_text().matches("session rehydrated").count(), 3);
}

#[tokio::test]
async fn concurrent_requests_share_one_rehydration() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let sid = gw.client().initialize("burst").await;
    gw.kill9();
    let gw2 = gw.restart();
    let mcp = gw2.client();
    let calls = (0..8).map(|i| {
        let mcp = mcp.clone();
        let sid = sid.clone();
        async move { mcp.call_text(&sid, 100 + i, "pid", json!({})).await }
    });
    let pids: Vec<String> = futures::future::join_all(calls).await;
    assert!(
        pids.windows(2).all(|w| w[0] == w[1]),
        "one upstream serves all: {pids:?}"
    );
    assert_eq!(gw2.log_text().matches("session rehydrated").count(), 1);
    assert_eq!(
        gw2.log_text()
            .matches("upstream started and re-initialized")
            .count(),
        1
    );
}

#[tokio::test]
async fn completed_stream_replays_after_restart() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("replay").await;
    // A call that outlives the answer window gets a stream, resumable after a crash (a
    // quicker one is one JSON body, nothing stored: `durability.rs`).
    let slow = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "slow", "arguments": {"ms": 100}}});
    let answer = mcp.post(Some(&sid), &slow).await;
    let events = answer.events();
    let (priming_id, priming_data) = &events[0];
    assert!(priming_data.is_none(), "priming event has empty data");
    assert!(
        answer.body.starts_with("retry: "),
        "priming event carries retry: {}",
        answer.body
    );
    // A final answer is sent while its commit runs (invariant 3). The store applies writes
    // in order and a later stream's priming event waits for its own record, so once the
    // next such call's answer arrives, this one is durable.
    let next = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "slow", "arguments": {"ms": 100}}}),
        )
        .await;
    assert_eq!(next.status, 200);
    assert!(next.body.starts_with("retry: "), "{}", next.body);
    gw.kill9();

    let gw2 = gw.restart();
    let replay = gw2.client().resume(&sid, priming_id).await;
    assert_eq!(replay.status, 200, "{}", replay.body);
    let response = replay.response();
    assert_eq!(response["id"], 7);
    assert_eq!(
        response.pointer("/result/content/0/text"),
        Some(&json!("waited 100 ms"))
    );
}

async fn interrupted_call(tool: &str) -> Value {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("inflight").await;
    // Let the gateway learn the tools' annotations, as clients do.
    let list = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        )
        .await;
    assert_eq!(list.status, 200);
    let (stream, _open) = mcp.start_call(&sid, 42, tool, json!({"ms": 1500})).await;
    gw.kill9();

    let gw2 = gw.restart();
    let replay = gw2.client().resume(&sid, &format!("{stream}.0")).await;
    assert_eq!(replay.status, 200, "{}", replay.body);
    let response = replay.response();
    assert_eq!(
        response["id"], 42,
        "the answer keeps the client's id: {response}"
    );
    response
}

#[tokio::test]
async fn interrupted_safe_call_is_reissued_after_restart() {
    let response = interrupted_call("slow").await;
    assert_eq!(
        response.pointer("/result/content/0/text"),
        Some(&json!("waited 1500 ms")),
        "{response}"
    );
}

#[tokio::test]
async fn interrupted_unsafe_call_gets_an_error_not_a_retry() {
    let response = interrupted_call("slow_write").await;
    assert_eq!(
        response.pointer("/error/code"),
        Some(&json!(-32013)),
        "{response}"
    );
    let message = response
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap();
    assert!(message.contains("not retried"), "{message}");
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_calls_and_keeps_sessions() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo", "--shutdown-grace", "10s"]);
    let mcp = gw.client();
    let sid = mcp.initialize("graceful").await;
    let pid: i32 = mcp
        .call_text(&sid, 1, "pid", json!({}))
        .await
        .parse()
        .unwrap();
    let (_, mut open) = mcp
        .start_call(&sid, 2, "slow_write", json!({"ms": 700}))
        .await;
    let status = {
        let pid = gw.pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        // The in-flight call still completes.
        let mut result = None;
        use futures::StreamExt;
        while let Some(Ok(ev)) = open.events.next().await {
            if let Ok(v) = serde_json::from_str::<Value>(&ev.data)
                && v.get("id") == Some(&json!(2))
            {
                result = Some(v);
            }
        }
        let result = result.expect("response delivered before shutdown");
        assert_eq!(
            result.pointer("/result/content/0/text"),
            Some(&json!("wrote after 700 ms"))
        );
        gw.sigterm()
    };
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        wait_gone(pid, Duration::from_secs(5)),
        "upstream stopped at shutdown"
    );
    assert!(gw.log_text().contains("sessions stay resumable"));

    let gw2 = gw.restart();
    assert!(gw2.log_text().contains("1 sessions were live before"));
    assert_eq!(
        gw2.client()
            .call_text(&sid, 3, "echo", json!({"text": "back"}))
            .await,
        "back"
    );
}

async fn setup_of(mcp: &common::Mcp, sid: &str, id: i64) -> String {
    mcp.call_text(sid, id, "setup", json!({})).await
}

#[tokio::test]
async fn log_level_and_subscriptions_are_replayed_to_fresh_upstreams() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("setup").await;
    for (i, (method, params)) in [
        ("logging/setLevel", json!({"level": "debug"})),
        ("resources/subscribe", json!({"uri": "demo://a"})),
        ("resources/subscribe", json!({"uri": "demo://b"})),
        ("resources/unsubscribe", json!({"uri": "demo://b"})),
    ]
    .into_iter()
    .enumerate()
    {
        let a = mcp
            .post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "id": i, "method": method, "params": params}),
            )
            .await;
        assert!(a.response().get("result").is_some(), "{method}: {}", a.body);
    }
    let expected = "level=debug subscriptions=demo://a";
    assert_eq!(setup_of(&mcp, &sid, 10).await, expected);

    // After an upstream crash the fresh upstream is told again.
    let _ = mcp.call(&sid, 11, "crash", json!({})).await;
    assert_eq!(setup_of(&mcp, &sid, 12).await, expected);

    // And after the gateway itself is killed.
    gw.kill9();
    let gw2 = gw.restart();
    assert_eq!(setup_of(&gw2.client(), &sid, 13).await, expected);
}

#[tokio::test]
async fn rehydration_with_a_broken_upstream_is_an_error_not_a_404() {
    let dir = state_dir();
    // The same upstream command before and after the restart (a session is never resumed
    // against another upstream), which only works while `healthy` exists.
    let healthy = dir.path().join("healthy");
    std::fs::write(&healthy, "").unwrap();
    let script = format!(
        "test -e '{}' && exec '{}' demo-server; exit 1",
        healthy.display(),
        common::BIN
    );
    let args = ["--", "sh", "-c", script.as_str()];
    let mut gw = Gateway::spawn(dir.path(), &args);
    let sid = gw.client().initialize("stranded").await;
    gw.kill9();
    std::fs::remove_file(&healthy).unwrap();
    let gw2 = gw.restart_with(&args);
    let a = gw2
        .client()
        .post(Some(&sid), &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}))
        .await;
    assert_eq!(a.status, 200, "the session exists: {}", a.body);
    let r = a.json();
    assert_eq!(r["id"], 1);
    assert_eq!(r.pointer("/error/code"), Some(&json!(-32010)), "{r}");
}

/// A session is never resumed against a different upstream: its stored `initialize` was
/// for another server. The client gets 404 (and re-initializes), the log says why.
#[tokio::test]
async fn a_session_is_not_resumed_against_another_upstream() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let sid = gw.client().initialize("moved").await;
    gw.kill9();
    let gw2 = gw.restart_with(&[
        "--upstream-name",
        "demo",
        "--",
        common::BIN,
        "demo-server",
        "--http",
        "127.0.0.1:1",
    ]);
    let a = gw2
        .client()
        .post(Some(&sid), &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}))
        .await;
    assert_eq!(a.status, 404, "{}", a.body);
    assert!(
        gw2.log_text()
            .contains("session was created for another upstream")
    );
    // The same upstream again: the session resumes.
    drop(gw2);
    let gw3 = gw.restart_with(&["--demo"]);
    assert_eq!(
        gw3.client()
            .call_text(&sid, 2, "echo", json!({"text": "back"}))
            .await,
        "back"
    );
}

/// One gateway per state dir: a second one exits at once, naming the first.
#[tokio::test]
async fn a_second_gateway_on_the_same_state_dir_exits_naming_the_first() {
    let dir = state_dir();
    let gw = Gateway::spawn(dir.path(), &["--demo"]);
    let (code, _, stderr) = common::serve_to_exit(dir.path());
    assert_eq!(code, Some(1));
    assert!(stderr.contains("is in use by another tether"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", gw.pid())), "{stderr}");
    assert!(stderr.contains(&gw.addr), "{stderr}");
    // The first one is unaffected.
    let mcp = gw.client();
    let sid = mcp.initialize("first").await;
    assert_eq!(
        mcp.call_text(&sid, 1, "echo", json!({"text": "ok"})).await,
        "ok"
    );
}
