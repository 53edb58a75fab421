//! `tether connect` (the stdio bridge) and `tether check`, with the official Rust SDK client
//! speaking stdio to the bridge: the client never re-initializes and its calls keep
//! succeeding while the server behind the bridge is killed and restarted.
#![allow(deprecated)] // logging and resources/subscribe are deprecated by SEP-2577 but legacy-era API

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, Gateway, http_upstream, state_dir};
use rmcp::RoleClient;
use rmcp::model::{
    CallToolRequestParams, LoggingLevel, SetLevelRequestParams, SubscribeRequestParams,
};
use rmcp::service::RunningService;
use serde_json::{Value, json};

type Client = RunningService<RoleClient, rmcp::model::ClientConfig>;

async fn bridge_client(url: &str, dir: &std::path::Path) -> Client {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["connect", url, "--retry-base", "50ms", "--log-file"])
        .arg(dir.join("connect.log"));
    common::stdio_client(cmd).await
}

async fn text(client: &Client, tool: &'static str, args: Value) -> Result<String, String> {
    let Value::Object(map) = args else {
        panic!("object")
    };
    let r = client
        .call_tool(CallToolRequestParams::new(tool).with_arguments(map))
        .await
        .map_err(|e| e.to_string())?;
    let v = serde_json::to_value(&r).unwrap();
    if v["isError"] == true {
        return Err(v.to_string());
    }
    Ok(v.pointer("/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

#[tokio::test]
async fn stdio_client_survives_gateway_sigkill_through_connect() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let client = bridge_client(&gw.url, dir.path()).await;
    assert_eq!(
        text(&client, "echo", json!({"text": "one"})).await.unwrap(),
        "one"
    );
    let pid1 = text(&client, "pid", json!({})).await.unwrap();

    gw.kill9();
    // A call made while the gateway is down waits for it to come back.
    let pending = {
        let peer = client.peer().clone();
        tokio::spawn(async move {
            peer.call_tool(
                CallToolRequestParams::new("echo").with_arguments(
                    json!({"text": "during outage"})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gw2 = gw.restart();
    let r = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .expect("no hang")
        .unwrap()
        .expect("call succeeded");
    assert_eq!(
        serde_json::to_value(&r).unwrap().pointer("/content/0/text"),
        Some(&json!("during outage"))
    );
    assert_eq!(
        text(&client, "echo", json!({"text": "two"})).await.unwrap(),
        "two"
    );
    assert_ne!(
        text(&client, "pid", json!({})).await.unwrap(),
        pid1,
        "fresh upstream behind the same session"
    );
    // The same session id was resumed by the gateway: the bridge never re-initialized.
    assert!(
        gw2.log_text().contains("session rehydrated"),
        "{}",
        gw2.log_text()
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn stdio_client_survives_a_non_tether_server_forgetting_its_session() {
    let (upstream, url) = http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let client = bridge_client(&url, dir.path()).await;
    client
        .peer()
        .set_level(SetLevelRequestParams::new(LoggingLevel::Debug))
        .await
        .unwrap();
    client
        .peer()
        .subscribe(SubscribeRequestParams::new("demo://watched"))
        .await
        .unwrap();
    assert_eq!(text(&client, "counter", json!({})).await.unwrap(), "1");
    assert_eq!(
        text(&client, "setup", json!({})).await.unwrap(),
        "level=debug subscriptions=demo://watched"
    );

    let mut upstream2 = common::restart_http_upstream(upstream, &url);

    // 404 → re-initialize with the client's params → restore → retry; invisible to the client.
    assert_eq!(
        text(&client, "echo", json!({"text": "after restart"}))
            .await
            .unwrap(),
        "after restart"
    );
    assert_eq!(
        text(&client, "counter", json!({})).await.unwrap(),
        "1",
        "a new server session"
    );
    assert_eq!(
        text(&client, "setup", json!({})).await.unwrap(),
        "level=debug subscriptions=demo://watched"
    );
    client.cancel().await.unwrap();
    let log = std::fs::read_to_string(dir.path().join("connect.log")).unwrap();
    assert!(log.contains("re-initializing"), "{log}");
    upstream2.kill().unwrap();
    let _ = upstream2.wait();
}

#[tokio::test]
async fn call_in_flight_when_the_server_dies_gets_an_error_not_a_hang() {
    let (upstream, url) = http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let client = bridge_client(&url, dir.path()).await;
    let pending = {
        let peer = client.peer().clone();
        tokio::spawn(async move {
            peer.call_tool(
                CallToolRequestParams::new("slow_write")
                    .with_arguments(json!({"ms": 5000}).as_object().unwrap().clone()),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut upstream2 = common::restart_http_upstream(upstream, &url);
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .expect("no hang")
        .unwrap();
    let err = outcome
        .expect_err("the outcome is unknown, so the call fails")
        .to_string();
    assert!(err.contains("unknown") || err.contains("lost"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The bridge carries on.
    assert_eq!(
        text(&client, "echo", json!({"text": "still usable"}))
            .await
            .unwrap(),
        "still usable"
    );
    client.cancel().await.unwrap();
    upstream2.kill().unwrap();
    let _ = upstream2.wait();
}

#[tokio::test]
async fn connect_falls_back_to_the_2024_11_05_transport() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    // Tether's /sse endpoint speaks only the old transport: POST there is 405.
    let url = format!("http://{}/sse", gw.addr);
    let client = bridge_client(&url, dir.path()).await;
    assert_eq!(
        text(&client, "echo", json!({"text": "old transport"}))
            .await
            .unwrap(),
        "old transport"
    );
    client.cancel().await.unwrap();
    let log = std::fs::read_to_string(dir.path().join("connect.log")).unwrap();
    assert!(log.contains("falling back"), "{log}");
}

fn check(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).arg("check").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A one-shot HTTP server answering every request with `response`.
fn canned(response: &'static str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(mut s) = stream else { continue };
            use std::io::{Read, Write};
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(response.as_bytes());
        }
    });
    format!("http://{addr}/mcp")
}

#[tokio::test]
async fn check_reports_a_working_endpoint_and_diagnoses_broken_ones() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let (code, out) = check(&[&gw.url, "--json"]);
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["protocol_version"], "2025-11-25");
    assert_eq!(report["validates_origin"], true);
    assert_eq!(report["unknown_session_404"], true);
    assert_eq!(
        report["speaks_2026_07_28"], true,
        "Tether serves the modern era too"
    );
    assert!(report["capabilities"]["tools"].is_object());

    let (_reserved, free) = common::refused_addr();
    for (url, needle) in [
        (format!("http://{free}/mcp"), "connection refused"),
        (format!("http://{}/nope", gw.addr), "wrong path"),
        (
            canned(
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Length: 0\r\n\r\n",
            ),
            "Authorization",
        ),
        (
            canned("HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\nhello"),
            "not an MCP server",
        ),
    ] {
        let (code, out) = check(&[&url]);
        assert_eq!(code, 1, "{url}: {out}");
        assert!(out.contains(needle), "{url}: expected {needle:?} in\n{out}");
    }
}

#[test]
fn headers_from_flags_and_env_reach_the_server() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 8192];
        let n = s.read(&mut buf).unwrap();
        let _ = s.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
        String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase()
    });
    let out = Command::new(BIN)
        .args([
            "check",
            &format!("http://{addr}/mcp"),
            "--header",
            "X-From-Flag: one",
            "--bearer-env",
            "TETHER_TEST_TOKEN",
        ])
        .env("TETHER_HEADERS", "X-From-Env: two\nX-Also: three")
        .env("TETHER_TEST_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let request = server.join().unwrap();
    for h in [
        "x-from-flag: one",
        "x-from-env: two",
        "x-also: three",
        "authorization: bearer s3cret",
    ] {
        assert!(request.contains(h), "{h} in\n{request}");
    }
}

/// Runs `tether connect URL` with a raw stdio client: sends `initialize`, returns the first
/// line it answers with, what it answers to a request after that, and its log.
async fn first_answer(url: &str) -> (Value, Value, String) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = state_dir();
    let log = dir.path().join("connect.log");
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "connect",
            url,
            "--first-contact",
            "1s",
            "--retry-base",
            "50ms",
        ])
        .arg("--log-file")
        .arg(&log)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}});
    let mut read = async |msg: Value| {
        stdin
            .write_all(format!("{msg}\n").as_bytes())
            .await
            .unwrap();
        // A bound on silence, not a performance figure: the bridge used to wait out its
        // whole --max-outage (5 min) before saying anything.
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no answer from the bridge for {url}"))
            .unwrap()
            .expect("a line");
        serde_json::from_str::<Value>(&line).unwrap()
    };
    let first = read(init).await;
    let second = read(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})).await;
    drop(stdin);
    let _ = child.wait().await;
    (
        first,
        second,
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[tokio::test]
async fn connect_answers_a_request_it_cannot_deliver_with_the_cause() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let (_reserved, free) = common::refused_addr();
    let unauthorized = canned(
        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Length: 0\r\n\r\n",
    );
    for (url, needle) in [
        (format!("http://{free}/mcp"), "connection refused"),
        (format!("http://{}/nope", gw.addr), "nothing serves MCP at"),
        (format!("{}/", gw.admin), "nothing serves MCP at"),
        (format!("https://{}/mcp", gw.addr), "answered in plain HTTP"),
        (unauthorized, "requires authentication"),
    ] {
        let (first, second, log) = first_answer(&url).await;
        assert_eq!(first["id"], 1, "{url}: {first}");
        let message = first
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{url}: an error, got {first}"));
        assert!(message.contains(needle), "{url}: {needle:?} in {message}");
        assert!(
            second.pointer("/error/message").is_some(),
            "{url}: the next request is answered too: {second}"
        );
        let warnings = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(needle))
            .count();
        assert_eq!(warnings, 1, "{url}: the cause logged once at WARN:\n{log}");
    }
}

/// `node forgetful-server.mjs PORT` (server-everything's 400 for an unknown session), or
/// None (with one skip line) when the TypeScript SDK is not installed.
fn forgetful_server(port: u16) -> Option<(std::process::Child, String)> {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../e2e/ts"));
    if !dir.join("node_modules/@modelcontextprotocol/sdk").exists() {
        assert!(
            std::env::var("TETHER_TEST_REQUIRE_NODE").is_err(),
            "TETHER_TEST_REQUIRE_NODE is set but e2e/ts has no node_modules (run npm ci there)"
        );
        println!("skipped: e2e/ts/node_modules missing (run `npm ci` in e2e/ts)");
        return None;
    }
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("forgetful-server.mjs"))
        .arg(port.to_string())
        .stderr(std::process::Stdio::null());
    Some(common::spawn_announced(cmd, "listening on "))
}

fn restart_forgetful(mut old: std::process::Child, url: &str) -> std::process::Child {
    old.kill().unwrap();
    old.wait().unwrap();
    let port = reqwest::Url::parse(url).unwrap().port().unwrap();
    forgetful_server(port).expect("installed").0
}

#[tokio::test]
async fn connect_and_serve_recover_from_a_400_for_a_forgotten_session() {
    let Some((server, url)) = forgetful_server(0) else {
        return;
    };
    let dir = state_dir();
    let client = bridge_client(&url, dir.path()).await;
    let gw = Gateway::start(dir.path(), &["--upstream-url", &url]);
    let mcp = gw.client();
    let sid = mcp.initialize("behind-gateway").await;
    assert_eq!(text(&client, "counter", json!({})).await.unwrap(), "1");
    assert_eq!(mcp.call_text(&sid, 1, "counter", json!({})).await, "1");

    let mut server = restart_forgetful(server, &url);
    // The bridge: 400 "No valid session ID" → re-initialize → retry, invisible to the client.
    assert_eq!(
        text(&client, "counter", json!({})).await.unwrap(),
        "1",
        "a new server session, reached without the client noticing"
    );
    assert_eq!(
        text(&client, "echo", json!({"text": "on"})).await.unwrap(),
        "on"
    );
    // The gateway the same way.
    assert_eq!(mcp.call_text(&sid, 2, "counter", json!({})).await, "1");
    client.cancel().await.unwrap();
    let log = std::fs::read_to_string(dir.path().join("connect.log")).unwrap();
    assert!(
        log.contains("re-initializing") && log.contains("400"),
        "{log}"
    );
    server.kill().unwrap();
    let _ = server.wait();
}
