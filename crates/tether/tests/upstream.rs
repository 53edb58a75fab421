//! Upstream supervision: crashes fail in-flight calls at once and the next call restarts
//! the upstream; crash loops back off visibly; HTTP upstreams that forget their sessions are
//! re-initialized transparently; an upstream that cannot start is a clear error.

mod common;

use std::time::{Duration, Instant};

use common::{BIN, Gateway, http_upstream, state_dir, wait_gone};
use serde_json::{Value, json};

#[tokio::test]
async fn crash_fails_the_call_at_once_and_the_next_call_restarts() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("crash").await;
    let pid: i32 = mcp
        .call_text(&sid, 1, "pid", json!({}))
        .await
        .parse()
        .unwrap();

    let started = Instant::now();
    let r = mcp.call(&sid, 2, "crash", json!({})).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no hang on a dead upstream"
    );
    assert_eq!(r.pointer("/error/code"), Some(&json!(-32011)), "{r}");
    let msg = r.pointer("/error/message").and_then(Value::as_str).unwrap();
    assert!(msg.contains("exited"), "the error names the cause: {msg}");
    assert!(wait_gone(pid, Duration::from_secs(5)));

    let new_pid: i32 = mcp
        .call_text(&sid, 3, "pid", json!({}))
        .await
        .parse()
        .unwrap();
    assert_ne!(new_pid, pid);
    assert_eq!(
        mcp.call_text(&sid, 4, "echo", json!({"text": "still here"}))
            .await,
        "still here"
    );
}

#[tokio::test]
async fn crash_loop_backs_off_and_says_so() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("loop").await;
    let mut seen = Vec::new(); // (failures, retry_in_ms) from backoff errors
    let mut id = 10;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 3 && Instant::now() < deadline {
        id += 1;
        let r = mcp.call(&sid, id, "crash", json!({})).await;
        if let Some(data) = r
            .pointer("/error/data")
            .filter(|d| d["kind"] == "upstream_backoff")
        {
            let msg = r.pointer("/error/message").and_then(Value::as_str).unwrap();
            assert!(msg.contains("backing off"), "{msg}");
            let failures = data["failures"].as_u64().unwrap();
            if seen.last().is_none_or(|(f, _)| *f < failures) {
                seen.push((failures, data["retry_in_ms"].as_u64().unwrap()));
            }
            // Wait out the backoff so the next call restarts (and crashes) again.
            tokio::time::sleep(Duration::from_millis(
                data["retry_in_ms"].as_u64().unwrap() + 20,
            ))
            .await;
        }
    }
    assert!(seen.len() >= 3, "backoff errors seen: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1].0 > w[0].0),
        "consecutive failures grow: {seen:?}"
    );
    // Jitter keeps each wait within [half, full] of base * 2^(failures-2): 250 ms base.
    let (f_last, r_last) = *seen.last().unwrap();
    let full = 250u64 << (f_last - 2);
    assert!(
        r_last <= full && r_last >= full / 2 - 50,
        "retry_in {r_last} ms for {f_last} failures"
    );
    let (f_first, r_first) = seen[0];
    assert!(
        r_last > r_first || f_last > f_first + 1,
        "backoff grows: {seen:?}"
    );
    // After the loop, a good call still works once the backoff passes.
    tokio::time::sleep(Duration::from_millis(full + 50)).await;
    assert_eq!(
        mcp.call_text(&sid, 999, "echo", json!({"text": "ok"}))
            .await,
        "ok"
    );
}

#[tokio::test]
async fn upstream_that_cannot_start_is_a_clear_error() {
    let dir = state_dir();
    let mut gw = Gateway::start(dir.path(), &["--", "/nonexistent/mcp-server", "--flag"]);
    let mcp = gw.client();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}});
    let a = mcp.post(None, &init).await;
    assert_eq!(a.status, 200);
    assert!(
        a.headers.get("mcp-session-id").is_none(),
        "no session for a failed initialize"
    );
    let r = a.json();
    assert_eq!(r.pointer("/error/code"), Some(&json!(-32010)), "{r}");
    assert!(
        r.pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap()
            .contains("unavailable")
    );
    assert!(gw.alive());
}

#[tokio::test]
async fn http_upstream_restart_is_invisible_to_the_client() {
    let (upstream, url) = http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let gw = Gateway::start(
        dir.path(),
        &["--upstream-url", &url, "--upstream-protocol", "legacy"],
    );
    let mcp = gw.client();
    let sid = mcp.initialize("http-client").await;
    assert_eq!(mcp.call_text(&sid, 1, "counter", json!({})).await, "1");
    assert_eq!(mcp.call_text(&sid, 2, "counter", json!({})).await, "2");

    // The upstream restarts on the same address and forgets every session.
    let mut upstream2 = common::restart_http_upstream(upstream, &url);
    // Same client session id keeps working: 404 upstream → re-initialize → retry.
    assert_eq!(
        mcp.call_text(&sid, 3, "echo", json!({"text": "after upstream restart"}))
            .await,
        "after upstream restart"
    );
    assert_eq!(
        mcp.call_text(&sid, 4, "counter", json!({})).await,
        "1",
        "a fresh upstream session"
    );
    assert!(
        gw.log_text().contains("re-initializing"),
        "{}",
        gw.log_text()
    );
    upstream2.kill().unwrap();
    let _ = upstream2.wait();
}

#[tokio::test]
async fn http_upstream_restart_keeps_the_clients_log_level_and_subscriptions() {
    let (upstream, url) = http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let gw = Gateway::start(
        dir.path(),
        &["--upstream-url", &url, "--upstream-protocol", "legacy"],
    );
    let mcp = gw.client();
    let sid = mcp.initialize("http-restore").await;
    for (id, method, params) in [
        (1, "logging/setLevel", json!({"level": "debug"})),
        (2, "resources/subscribe", json!({"uri": "demo://watched"})),
    ] {
        let a = mcp
            .post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
            )
            .await;
        assert!(a.response().get("result").is_some(), "{}", a.body);
    }

    // The upstream restarts and forgets; the link re-initializes it on the next request,
    // and must replay the level and the subscription there too.
    let mut upstream2 = common::restart_http_upstream(upstream, &url);
    // The demo sends these notifications unrelated to the request, so the server may put
    // them on its standalone stream: listen there too, as clients do.
    let listen = {
        use futures::StreamExt;
        let resp = mcp.listen(&sid).await;
        let mut events = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while let Ok(Some(Ok(ev))) = tokio::time::timeout_at(deadline, events.next()).await {
                if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
                    seen.push(v);
                    if seen.len() == 2 {
                        break;
                    }
                }
            }
            seen
        })
    };
    let a = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "touch", "arguments": {}}}),
        )
        .await;
    let mut events: Vec<Value> = a.events().into_iter().filter_map(|(_, v)| v).collect();
    let notes = events.iter().filter(|v| v.get("method").is_some()).count();
    if notes < 2 {
        events.extend(listen.await.unwrap());
    }
    let updated = events
        .iter()
        .find(|v| v["method"] == "notifications/resources/updated")
        .unwrap_or_else(|| panic!("resource update after the restart: {events:?}"));
    assert_eq!(updated["params"]["uri"], "demo://watched");
    let log = events
        .iter()
        .find(|v| v["method"] == "notifications/message")
        .unwrap_or_else(|| panic!("log message after the restart: {events:?}"));
    assert_eq!(log["params"]["level"], "debug");
    assert_eq!(
        a.response().pointer("/result/content/0/text"),
        Some(&json!("updated=1 level=debug"))
    );
    assert!(gw.log_text().contains("re-initializing"));
    upstream2.kill().unwrap();
    let _ = upstream2.wait();
}

#[tokio::test]
async fn http_upstream_down_is_an_error_then_recovers() {
    let (mut upstream, url) = http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let gw = Gateway::start(
        dir.path(),
        &["--upstream-url", &url, "--upstream-protocol", "legacy"],
    );
    let mcp = gw.client();
    let sid = mcp.initialize("http-down").await;
    upstream.kill().unwrap();
    upstream.wait().unwrap();
    let r = mcp.call(&sid, 1, "echo", json!({"text": "x"})).await;
    assert!(
        r.get("error").is_some(),
        "a clear error while the upstream is down: {r}"
    );
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/mcp")
        .to_owned();
    let (mut upstream2, _) = http_upstream(&addr);
    // The link failed; the next call reconnects (after at most the backoff).
    let mut ok = false;
    for i in 0..40 {
        let r = mcp
            .call(&sid, 10 + i, "echo", json!({"text": "back"}))
            .await;
        if r.pointer("/result/content/0/text") == Some(&json!("back")) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "session recovered after the upstream came back");
    upstream2.kill().unwrap();
    let _ = upstream2.wait();
}

#[tokio::test]
async fn slow_upstream_times_out_with_a_clear_error() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo", "--upstream-timeout", "300ms"]);
    let mcp = gw.client();
    let sid = mcp.initialize("impatient").await;
    let started = Instant::now();
    let r = mcp.call(&sid, 1, "slow", json!({"ms": 3000})).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "timed out at the gateway"
    );
    assert_eq!(r.pointer("/error/code"), Some(&json!(-32012)), "{r}");
    // The session and its upstream are fine afterwards.
    assert_eq!(
        mcp.call_text(&sid, 2, "echo", json!({"text": "next"}))
            .await,
        "next"
    );
}

#[tokio::test]
async fn stdio_upstream_gets_env_and_cwd_from_the_config_file() {
    let dir = state_dir();
    let work = state_dir();
    let config = dir.path().join("tether.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\nname = \"configured\"\ncommand = [{:?}, \"demo-server\"]\ncwd = {:?}\nenv = {{ TETHER_DEMO_MARK = \"x42\" }}\n",
            BIN,
            work.path().display().to_string()
        ),
    )
    .unwrap();
    let gw = Gateway::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let mcp = gw.client();
    let sid = mcp.initialize("configured").await;
    assert_eq!(
        mcp.call_text(&sid, 1, "getenv", json!({"name": "TETHER_DEMO_MARK"}))
            .await,
        "x42"
    );
    let cwd = mcp.call_text(&sid, 2, "cwd", json!({})).await;
    assert_eq!(
        std::fs::canonicalize(cwd).unwrap(),
        std::fs::canonicalize(work.path()).unwrap()
    );
    assert!(gw.log_text().contains("upstream.name=configured"));
}

/// `--servers` takes the upstream from a client's `mcpServers` file as the client wrote it:
/// a stdio entry with its args, env and cwd, or a remote one with its headers and Tether
/// settings; serving all of them, a flag naming one upstream is refused, as is an unknown --server.
#[tokio::test]
async fn a_clients_mcp_servers_file_gives_the_upstream() {
    let (mut upstream, url) = http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let work = state_dir();
    let file = dir.path().join("claude_desktop_config.json");
    std::fs::write(
        &file,
        json!({"mcpServers": {
            "demo": {"command": BIN, "args": ["demo-server"], "env": {"DEMO_MARK": "m1"},
                     "cwd": work.path(), "autoApprove": ["echo"]},
            "remote": {"url": url, "headers": {"Authorization": "Bearer t"},
                       "tether": {"protocol": "legacy", "idle-timeout": "5m"}},
        }, "globalShortcut": "Ctrl+Space"})
        .to_string(),
    )
    .unwrap();
    let path = file.to_str().unwrap();

    let gw = Gateway::start(dir.path(), &["--servers", path, "--server", "demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("from-file").await;
    assert_eq!(
        mcp.call_text(&sid, 1, "getenv", json!({"name": "DEMO_MARK"}))
            .await,
        "m1"
    );
    let cwd = mcp.call_text(&sid, 2, "cwd", json!({})).await;
    assert_eq!(
        std::fs::canonicalize(cwd).unwrap(),
        std::fs::canonicalize(work.path()).unwrap()
    );
    let log = gw.log_text();
    assert!(log.contains("upstream.name=demo"), "{log}");
    assert!(
        log.contains("\"autoApprove\" is a client setting; ignored"),
        "{log}"
    );
    drop(gw);

    let other = state_dir();
    let gw = Gateway::start(other.path(), &["--servers", path, "--server", "remote"]);
    let mcp = gw.client();
    let sid = mcp.initialize("from-file-remote").await;
    assert_eq!(
        mcp.call_text(&sid, 1, "echo", json!({"text": "via the file"}))
            .await,
        "via the file"
    );
    assert!(
        !gw.log_text().contains("upstream protocol detected"),
        "tether.protocol = legacy: no probe"
    );
    drop(gw);

    // Serving every server of the file, a flag that names one upstream cannot apply; a
    // name the file lacks is refused with the names it has.
    let third = state_dir();
    let run = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .args([
                "serve",
                "--state-dir",
                third.path().to_str().unwrap(),
                "--servers",
                path,
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--upstream-header", "X-A: 1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("serves every server of the file, so --upstream-header cannot apply"),
        "{err}"
    );
    let out = run(&["--server", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no server named \"nope\" (it has: demo, remote)"),
        "{err}"
    );
    let _ = upstream.kill();
    let _ = upstream.wait();
}
