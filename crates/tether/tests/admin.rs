//! Observability end to end: API keys and principals, the ledger through the admin API,
//! metrics, health checks, the CLI against a running gateway, and the admin token.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{BIN, Gateway, add_key, state_dir, with_key};
use serde_json::{Value, json};

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Polls until `f` holds (the ledger writes in batches, off the request path).
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test]
async fn keys_principals_ledger_api_metrics_and_cli() {
    let dir = state_dir();
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "demo = true\n").unwrap();
    let alice_key = add_key(&config, "alice", "alice@example.com");
    let bob_key = add_key(&config, "bob", "bob@example.com");
    assert!(
        !std::fs::read_to_string(&config)
            .unwrap()
            .contains(&alice_key),
        "only the hash is stored"
    );
    let gw = Gateway::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--upstream-timeout",
            "500ms",
        ],
    );

    // No key, or a wrong one: 401 with a challenge.
    let anon = gw.client();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "claude-code", "version": "2.0"}}});
    let a = anon.post(None, &init).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.headers["www-authenticate"], "Bearer realm=\"tether\"");
    assert_eq!(
        with_key(&anon, "tk_nope").post(None, &init).await.status,
        401
    );

    let alice = with_key(&anon, &alice_key);
    let bob = with_key(&anon, &bob_key);
    let a = alice.post(None, &init).await;
    let sid = a.headers["mcp-session-id"].to_str().unwrap().to_owned();
    assert_eq!(
        alice
            .post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
            )
            .await
            .status,
        202
    );
    // Alice's session id with Bob's key is exactly an unknown session.
    let stolen = bob
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await;
    assert_eq!(stolen.status, 404);

    assert_eq!(
        alice
            .call_text(&sid, 3, "echo", json!({"text": "hi"}))
            .await,
        "hi"
    );
    assert_eq!(
        alice
            .call_text(&sid, 4, "add", json!({"a": 1, "b": 2}))
            .await,
        "3"
    );
    let timed_out = alice.call(&sid, 5, "slow", json!({"ms": 3000})).await;
    assert_eq!(timed_out.pointer("/error/code"), Some(&json!(-32012)));
    let bob_sid = bob.initialize("cursor").await;
    assert_eq!(
        bob.call_text(&bob_sid, 1, "echo", json!({"text": "bob"}))
            .await,
        "bob"
    );

    let admin = gw.admin.clone();
    eventually("ledger has alice's calls", async || {
        get(&format!("{admin}/api/sessions/{sid}")).await.1["session"]["tool_calls"] == 3
    })
    .await;
    let (status, detail) = get(&format!("{admin}/api/sessions/{sid}")).await;
    assert_eq!(status, 200);
    let s = &detail["session"];
    assert_eq!(s["user_id"], "alice");
    assert_eq!(s["user_email"], "alice@example.com");
    assert_eq!(s["client_type"], "Claude Code");
    assert_eq!(s["errors"], 1);
    assert_eq!(s["upstream_state"], "up");
    let outcomes: Vec<&str> = detail["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        vec!["timeout", "ok", "ok"],
        "newest first, never arguments"
    );
    assert!(detail["calls"][0].get("arguments").is_none());

    let (_, list) = get(&format!("{admin}/api/sessions?status=active&user=alice")).await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);
    let (_, list) = get(&format!("{admin}/api/sessions?client=Cursor")).await;
    assert_eq!(list["sessions"][0]["user_id"], "bob");
    let (_, page) = get(&format!("{admin}/api/sessions?limit=1")).await;
    assert_eq!(page["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_offset"], 1, "paged");
    for bad in [
        "status=sleeping",
        "limit=0",
        "limit=9999",
        "since=whenever",
        "offset=-1",
    ] {
        let (status, body) = get(&format!("{admin}/api/sessions?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].as_str().is_some());
    }
    assert_eq!(
        get(&format!("{admin}/api/sessions/disconnected?days=0"))
            .await
            .0,
        400
    );

    let (_, stats) = get(&format!("{admin}/api/stats")).await;
    assert_eq!(stats["per_tool"]["echo"]["calls"], 2);
    assert_eq!(stats["per_tool"]["slow"]["error_rate"], 1.0);
    assert!(stats["per_tool"]["echo"]["p50_ms"].is_number());
    assert_eq!(stats["per_client_type"]["Claude Code"]["calls"], 3);
    assert_eq!(stats["per_user"]["bob"]["calls"], 1);
    assert_eq!(stats["timeline"].as_array().unwrap().len(), 60);
    let (_, users) = get(&format!("{admin}/api/users")).await;
    let ids: Vec<&str> = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["alice", "bob"]);
    let (status, us) = get(&format!("{admin}/api/users/alice/stats")).await;
    assert_eq!(status, 200);
    assert_eq!(us["window"]["calls"], 3);
    assert_eq!(
        get(&format!("{admin}/api/users/mallory/stats")).await.0,
        404
    );

    // Health and metrics.
    let (status, h) = get(&format!("{admin}/health")).await;
    assert_eq!((status, h["status"].as_str()), (200, Some("ok")));
    assert_eq!(h["live_sessions"], 2);
    let (status, r) = get(&format!("{admin}/health/ready")).await;
    assert_eq!(status, 200, "{r}");
    let (_, d) = get(&format!("{admin}/health/deep")).await;
    assert_eq!(d["sessions"]["active"], 2);
    assert_eq!(d["upstream"]["sessions_by_state"]["up"], 2);
    assert_eq!(d["instances"].as_array().unwrap().len(), 1);
    let metrics = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "tether_sessions_created_total 2",
        "tether_tool_calls_total{outcome=\"timeout\"} 1",
        "tether_http_requests_total{class=\"post\",status=\"401\"} 2",
        "tether_ledger_dropped_total 0",
        "tether_tool_call_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "{needle} in\n{metrics}");
    }
    assert!(!metrics.contains(&sid), "no session ids in metric labels");
    let (status, spec) = get(&format!("{admin}/api/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(spec["paths"]["/api/sessions/{id}"]["delete"].is_object());

    // The CLI against the running gateway; it finds the admin token the gateway generated
    // in its state dir.
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--admin", &admin])
            .arg("--state-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, table, _) = cli(&["sessions", "list"]);
    assert_eq!(code, Some(0));
    assert!(table.starts_with("SESSION"), "{table}");
    assert!(
        table.contains(&sid) && table.contains("alice") && table.contains("Claude Code"),
        "{table}"
    );
    let (_, json_out, _) = cli(&["sessions", "list", "--json"]);
    let parsed: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(parsed["sessions"].as_array().unwrap().len(), 2);
    let (code, shown, _) = cli(&["sessions", "show", &sid]);
    assert_eq!(code, Some(0));
    assert!(
        shown.contains("alice@example.com") && shown.contains("timeout"),
        "{shown}"
    );
    let (code, st, _) = cli(&["stats"]);
    assert_eq!(code, Some(0));
    assert!(st.contains("PER TOOL") && st.contains("echo"), "{st}");
    let (code, us, _) = cli(&["users"]);
    assert_eq!(code, Some(0));
    assert!(us.contains("bob@example.com"), "{us}");
    let (code, _, err) = cli(&["sessions", "show", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("404"), "{err}");

    // Evict from the CLI: the client gets 404, the ledger says why.
    let (code, _, _) = cli(&["sessions", "close", &bob_sid]);
    assert_eq!(code, Some(0));
    assert_eq!(
        bob.post(
            Some(&bob_sid),
            &json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"})
        )
        .await
        .status,
        404
    );
    assert_eq!(alice.delete(&sid).await, 200);
    let (_, gone) = get(&format!("{admin}/api/sessions/disconnected?days=1")).await;
    assert_eq!(gone["stats"]["count"], 2);
    assert_eq!(gone["stats"]["by_reason"]["evicted"], 1);
    assert_eq!(gone["stats"]["by_reason"]["client_disconnect"], 1);
    assert!(
        gone["stats"]["max_duration_ms"].as_i64().unwrap()
            >= gone["stats"]["min_duration_ms"].as_i64().unwrap()
    );
}

#[test]
fn cli_explains_a_gateway_that_is_not_running() {
    let (_reserved, free) = common::refused_addr();
    let out = Command::new(BIN)
        .args(["sessions", "list", "--admin", &format!("http://{free}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is `tether serve` running?"), "{err}");
}

/// Issue 12: on loopback without the token the admin API is read-only and shows session ids
/// only as prefixes; eviction needs the token, which the gateway generated into its state
/// dir (readable only by its user) and `tether dashboard` puts in a link.
#[tokio::test]
async fn loopback_admin_without_the_token_is_read_only_and_hides_session_ids() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let sid = gw.client().initialize("local").await;
    let token = gw.admin_token();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the token file is readable only by its user"
    );
    let http = reqwest::Client::new();
    let sessions = async |token: Option<&str>| -> Value {
        let mut req = http.get(format!("{}/api/sessions", gw.admin));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().json().await.unwrap()
    };
    let list = sessions(None).await;
    let shown = list["sessions"][0]["id"].as_str().unwrap();
    assert_eq!(shown, format!("{}…", &sid[..8]), "{list}");
    assert!(
        !list.to_string().contains(&sid),
        "no full id anywhere: {list}"
    );
    // With the token: full ids.
    let full = sessions(Some(&token)).await;
    assert_eq!(full["sessions"][0]["id"], sid.as_str());
    // Eviction: refused without the token, done with it.
    let refused = http
        .delete(format!("{}/api/sessions/{sid}", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let text = refused.text().await.unwrap();
    assert!(
        text.contains("admin.token"),
        "says where the token is: {text}"
    );
    assert_eq!(
        gw.client()
            .call_text(&sid, 1, "echo", json!({"text": "still mine"}))
            .await,
        "still mine"
    );
    let evicted = http
        .delete(format!("{}/api/sessions/{sid}", gw.admin))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(evicted.status(), 200);
    // `tether dashboard` prints the link with the token.
    let out = Command::new(BIN)
        .args(["dashboard", "--admin", &gw.admin, "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}/#token={token}", gw.admin)
    );
    // A restart keeps the same token.
    drop(gw);
    let gw = Gateway::start(dir.path(), &["--demo"]);
    assert_eq!(gw.admin_token(), token);
}

#[tokio::test]
async fn non_loopback_admin_needs_a_token() {
    let dir = state_dir();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
            "--state-dir",
        ])
        .arg(dir.path())
        .env_remove("TETHER_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin-token"));

    let gw = Gateway::start(
        dir.path(),
        &[
            "--demo",
            "--admin-listen",
            "0.0.0.0:0",
            "--admin-token",
            "s3cret",
        ],
    );
    let port = gw.admin.rsplit(':').next().unwrap().to_owned();
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        get(&format!("{base}/health")).await.0,
        200,
        "health needs no token"
    );
    let r = reqwest::get(format!("{base}/api/sessions")).await.unwrap();
    assert_eq!(r.status(), 401);
    let r = reqwest::Client::new()
        .get(format!("{base}/api/sessions"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out = Command::new(BIN)
        .args(["users", "--admin", &base, "--admin-token", "s3cret"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// DNS rebinding against the loopback admin listener: a rebound `Host` is refused on the
/// API, the dashboard and health checks; loopback names and `--allowed-hosts` pass.
#[tokio::test]
async fn loopback_admin_refuses_a_rebound_host() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo", "--allowed-hosts", "ops.example"]);
    let http = reqwest::Client::new();
    let get = |path: &str, host: &str| {
        http.get(format!("{}{path}", gw.admin))
            .header("host", host)
            .send()
    };
    for path in ["/api/sessions", "/", "/health", "/metrics"] {
        let r = get(path, "evil.example.com").await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    let port = gw.admin.rsplit(':').next().unwrap().to_owned();
    for host in [format!("localhost:{port}"), "ops.example".to_owned()] {
        let r = get("/api/sessions", &host).await.unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }
}

/// `--quota-tool-calls N/WINDOW`: a user's calls past N in a window are refused with
/// `-32016` naming the quota and its reset, recorded `refused`; other methods and other
/// users are untouched; the next window serves again; `GET /api/quotas` shows the use.
#[tokio::test]
async fn a_users_tool_call_quota_is_refused_until_its_window_resets() {
    let dir = state_dir();
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "demo = true\n").unwrap();
    let alice_key = add_key(&config, "alice", "alice@example.com");
    let bob_key = add_key(&config, "bob", "bob@example.com");
    let gw = Gateway::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--quota-tool-calls",
            "3/3s",
        ],
    );
    let anon = gw.client();
    let alice = with_key(&anon, &alice_key);
    let bob = with_key(&anon, &bob_key);
    let a = alice.initialize("quota-alice").await;
    let b = bob.initialize("quota-bob").await;
    // Start at the beginning of a window (they are aligned to the epoch), so the calls
    // below share one.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(std::time::Duration::from_millis(3_000 - now % 3_000 + 50)).await;
    for id in 1..=3 {
        assert_eq!(
            alice
                .call_text(&a, id, "add", json!({"a": 1, "b": 1}))
                .await,
            "2"
        );
    }
    let refused = alice.call(&a, 4, "add", json!({"a": 1, "b": 1})).await;
    assert_eq!(refused["error"]["code"], -32016, "{refused}");
    assert_eq!(refused["error"]["data"]["limit"], "quota-tool-calls");
    assert_eq!(refused["error"]["data"]["quota"], 3);
    assert!(refused["error"]["data"]["retry_in_ms"].as_u64().unwrap() <= 3_000);
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("alice") && message.contains("resets at"),
        "{message}"
    );
    // Not a tool call: not counted, not refused. Another user: their own quota.
    let list = alice
        .post(
            Some(&a),
            &json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}),
        )
        .await;
    assert!(list.response()["result"]["tools"].is_array());
    assert_eq!(
        bob.call_text(&b, 1, "add", json!({"a": 2, "b": 2})).await,
        "4"
    );
    let (status, q) = get(&format!("{}/api/quotas", gw.admin)).await;
    assert_eq!(status, 200);
    assert_eq!(q["quota"]["tool_calls"], 3);
    let users = q["users"].as_array().unwrap();
    let alice_use = users.iter().find(|u| u["principal"] == "alice").unwrap();
    assert_eq!(alice_use["used"], 4, "{q}");
    assert_eq!(
        users.iter().find(|u| u["principal"] == "bob").unwrap()["used"],
        1
    );
    assert!(common::metric_sum(&gw, "tether_tool_calls_total{outcome=\"refused\"").await >= 1.0);
    let out = Command::new(BIN)
        .args(["quotas", "--admin", &gw.admin])
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("3 tool calls per user every 3s"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("alice") && l.contains(" 4 ")),
        "{text}"
    );
    // The next window serves again.
    tokio::time::sleep(std::time::Duration::from_millis(
        refused["error"]["data"]["retry_in_ms"].as_u64().unwrap() + 50,
    ))
    .await;
    assert_eq!(
        alice.call_text(&a, 6, "add", json!({"a": 2, "b": 3})).await,
        "5"
    );
}
