//! Session lifecycle over raw HTTP: DELETE, idle expiry, the standalone GET stream with
//! keepalives, and the 2024-11-05 HTTP+SSE transport.

mod common;

use std::time::Duration;

use common::{Gateway, process_alive, state_dir, wait_gone};
use futures::StreamExt;
use serde_json::json;
use tether_core::store::LiveStore;

#[tokio::test]
async fn delete_ends_the_session_and_its_upstream() {
    let dir = state_dir();
    // In process, from a config (common::Gateway::builder), instead of the binary with flags.
    let mut gw = common::Gateway::builder(dir.path())
        .layer(tether_core::config::Layer::default())
        .start();
    let mcp = gw.client();
    let sid = mcp.initialize("deleter").await;
    let pid: i32 = mcp
        .call_text(&sid, 1, "pid", json!({}))
        .await
        .parse()
        .unwrap();
    assert_eq!(mcp.delete(&sid).await, 200);
    assert!(
        wait_gone(pid, std::time::Duration::from_secs(5)),
        "upstream stopped on DELETE"
    );
    let a = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await;
    assert_eq!(a.status, 404);
    let store = tether_core::store::sqlite::SqliteStore::open(dir.path()).unwrap();
    let rec = store.load_session(&sid).await.unwrap().unwrap();
    assert_eq!(rec.close_reason.as_deref(), Some("client_disconnect"));
    assert_eq!(rec.client_name.as_deref(), Some("deleter"));
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn an_in_process_gateway_stops_and_its_sessions_resume_in_the_next() {
    let dir = state_dir();
    let idle = tether_core::config::Layer::default().with("idle-timeout", "10m");
    let mut first = common::Gateway::builder(dir.path())
        .layer(idle.clone())
        .start();
    let sid = first.client().initialize("in-process").await;
    assert_eq!(
        first
            .client()
            .call_text(&sid, 1, "echo", json!({"text": "before"}))
            .await,
        "before"
    );
    first.stop().await.expect("a clean stop");
    let mut second = common::Gateway::builder(dir.path()).layer(idle).start();
    assert_eq!(
        second
            .client()
            .call_text(&sid, 2, "echo", json!({"text": "after"}))
            .await,
        "after",
        "the same session id, served by the next gateway on the state dir"
    );
    second.stop().await.unwrap();
}

#[tokio::test]
async fn idle_sessions_expire_with_reason_timeout() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo", "--idle-timeout", "1s"]);
    let mcp = gw.client();
    let sid = mcp.initialize("sleepy").await;
    let pid: i32 = mcp
        .call_text(&sid, 1, "pid", json!({}))
        .await
        .parse()
        .unwrap();
    let other = mcp.initialize("stored-only").await;
    // A session only in the store (from before a restart) expires too.
    gw.kill9();
    let gw = gw.restart();
    let mcp = gw.client();
    // Touch the first session so it is held in memory again.
    assert_eq!(
        mcp.call_text(&sid, 2, "echo", json!({"text": "hi"})).await,
        "hi"
    );
    let pid2: i32 = mcp
        .call_text(&sid, 3, "pid", json!({}))
        .await
        .parse()
        .unwrap();
    assert!(!process_alive(pid));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        wait_gone(pid2, Duration::from_secs(5)),
        "expired session's upstream stopped"
    );
    let a = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}),
        )
        .await;
    assert_eq!(a.status, 404, "{}", a.body);
    let a = mcp
        .post(
            Some(&other),
            &json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}),
        )
        .await;
    assert_eq!(a.status, 404, "{}", a.body);
    assert_eq!(
        common::metric(&gw, "tether_sessions_live").await,
        0.0,
        "the gauge follows expiry"
    );
    let store = tether_core::store::sqlite::SqliteStore::open(dir.path()).unwrap();
    for id in [&sid, &other] {
        let rec = store.load_session(id).await.unwrap().unwrap();
        assert_eq!(rec.close_reason.as_deref(), Some("timeout"), "{id}");
    }
}

#[tokio::test]
async fn standalone_stream_carries_keepalives_and_survives_reconnect() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo", "--keepalive", "200ms"]);
    let mcp = gw.client();
    let sid = mcp.initialize("listener").await;
    let resp = mcp
        .http
        .get(&gw.url)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !text.contains(": keepalive") && tokio::time::Instant::now() < deadline {
        if let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(1), body.next()).await
        {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(
        text.contains("retry: "),
        "priming event with retry: {text:?}"
    );
    assert!(
        text.contains("id: 0.0"),
        "standalone stream is stream 0: {text:?}"
    );
    assert!(
        text.contains(": keepalive"),
        "keepalive comment within the interval: {text:?}"
    );
    // With the GET stream open the session is active; requests still work alongside it.
    assert_eq!(
        mcp.call_text(&sid, 1, "echo", json!({"text": "side by side"}))
            .await,
        "side by side"
    );
}

#[tokio::test]
async fn legacy_http_sse_transport_works() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let http = reqwest::Client::new();
    let base = format!("http://{}", gw.addr);
    let resp = http
        .get(format!("{base}/sse"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    let endpoint = events.next().await.unwrap().unwrap();
    assert_eq!(endpoint.event, "endpoint");
    let post_url = format!("{base}{}", endpoint.data);
    let post = |body: serde_json::Value| {
        let http = http.clone();
        let url = post_url.clone();
        async move {
            http.post(url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "old-client", "version": "0.1"}}});
    assert_eq!(post(init).await, 202);
    let ev = events.next().await.unwrap().unwrap();
    assert_eq!(ev.event, "message");
    let v: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(v["id"], 1);
    assert!(v.pointer("/result/serverInfo").is_some(), "{v}");
    assert_eq!(
        post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await,
        202
    );
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "old school"}}});
    assert_eq!(post(call).await, 202);
    let ev = events.next().await.unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(v["id"], 2);
    assert_eq!(
        v.pointer("/result/content/0/text"),
        Some(&json!("old school"))
    );
}

/// Found by the long soak: a call that outlasts the idle timeout must not expire its session
/// the moment it completes. Idleness counts from the end of the last request.
/// The answer is known but the client has not been sent it yet (here: it does not read,
/// so the gateway's write blocks on a full socket; in the soak it was a stall in the
/// durable write). The request is no longer pending upstream, yet the session must not
/// look idle until the answer is out.
#[tokio::test]
async fn an_answer_not_yet_delivered_keeps_its_session() {
    let dir = state_dir();
    let gw = Gateway::start(
        dir.path(),
        &["--demo", "--idle-timeout", "1s", "--max-body", "32MiB"],
    );
    let mcp = gw.client();
    let sid = mcp.initialize("slow-reader").await;
    // Larger than the loopback socket buffers on both sides (4 MiB send buffer at most;
    // the receive buffer does not grow while nobody reads), so the write cannot finish
    // until the client reads; below the demo server's own 16 MiB message limit.
    let text = "x".repeat(12 * 1024 * 1024);
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}}});
    let resp = mcp
        .http
        .post(&mcp.url)
        .header("content-type", "application/json")
        .header("accept", common::ACCEPT_BOTH)
        .header("mcp-session-id", &sid)
        .header("mcp-protocol-version", "2025-11-25")
        .body(call.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Several reaper ticks past the idle timeout while the answer is stuck in the socket.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let body = resp.text().await.unwrap();
    assert!(body.len() > text.len(), "the whole answer arrived");
    assert_eq!(
        mcp.call_text(&sid, 2, "echo", json!({"text": "still here"}))
            .await,
        "still here"
    );
}

#[tokio::test]
async fn a_call_longer_than_the_idle_timeout_keeps_its_session() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo", "--idle-timeout", "1s"]);
    let mcp = gw.client();
    let sid = mcp.initialize("patient").await;
    assert_eq!(
        mcp.call_text(&sid, 1, "slow", json!({"ms": 1800})).await,
        "waited 1800 ms"
    );
    // Past the reaper's tick (a quarter of the timeout), well within the timeout since the
    // call ended, but more than the timeout since it started.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        mcp.call_text(&sid, 2, "echo", json!({"text": "still here"}))
            .await,
        "still here"
    );
}

/// Found by the soak at a 1 s idle timeout: a session that closes (expiry, DELETE) while
/// its upstream is being restarted must not leave that new upstream running.
#[tokio::test]
async fn a_session_closed_while_its_upstream_starts_leaves_no_process() {
    let dir = state_dir();
    let mark = format!("TETHER_TEST_MARK={}", common::unique("closing"));
    // A slow start: the restart is still under way when the session closes.
    let script = format!("sleep 1; exec env {mark} {} demo-server", common::BIN);
    let gw = Gateway::start(dir.path(), &["--", "sh", "-c", &script]);
    let mcp = gw.client();
    let sid = mcp.initialize("closing").await;
    assert_eq!(common::marked_processes(&mark), 1);
    let crash = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "crash", "arguments": {}}});
    mcp.post(Some(&sid), &crash).await;
    assert!(
        common::wait_for(Duration::from_secs(5), || common::marked_processes(&mark)
            == 0),
        "the crashed upstream is gone"
    );
    let restarting = {
        let mcp = gw.client();
        let sid = sid.clone();
        tokio::spawn(async move {
            mcp.post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mcp.delete(&sid).await, 200);
    restarting.await.unwrap();
    // The restart finished (1 s sleep, then the handshake) after the session had closed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        common::wait_for(Duration::from_secs(5), || common::marked_processes(&mark)
            == 0),
        "{} upstream process(es) outlived their closed session",
        common::marked_processes(&mark)
    );
}
