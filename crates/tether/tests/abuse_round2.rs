//! Bounded under abuse, second round (issue 26): what one client, one upstream or one file
//! could still do to everyone after the first round. One test per row of the issue; each
//! asserts the bound and that a bystander (on another loopback address where addresses
//! matter) is unharmed. Tests run the gateway in process ([`common::Gateway`]) unless the
//! process boundary is the point (its memory, descriptors, files, signals).

mod common;

use std::time::{Duration, Instant};

use common::{Mcp, state_dir};
use serde_json::{Value, json};
use tether_core::config::{Layer, LimitsLayer, UpstreamLayer};

/// The JSON-RPC answer to one `echo` call, whatever it is.
async fn echo(mcp: &Mcp, sid: &str, id: i64) -> Value {
    let msg = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hi"}}});
    let a = mcp.post(Some(sid), &msg).await;
    if a.status != 200 {
        return json!({"status": a.status, "body": a.body});
    }
    a.response()
}

/// Row 1: an HTTP upstream killed and back within a second. Eight sessions calling at
/// once all fail to restart it at the same moment; that used to count as five failures,
/// open the circuit for its whole cooldown and turn a 1 s outage into 10 s. Written to
/// fail on the main of issue 26's filing: with a 30 s cooldown no session recovers within
/// the test's 6 s.
#[tokio::test]
async fn an_upstream_back_within_a_second_is_used_within_about_a_second() {
    let (upstream, url) = common::http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let mut gw = common::Gateway::builder(dir.path())
        .layer(Layer {
            upstream: Some(UpstreamLayer {
                url: Some(url.clone()),
                protocol: Some("legacy".into()),
                ..UpstreamLayer::default()
            }),
            limits: Some(LimitsLayer::default().with("circuit-cooldown", "30s")),
            ..Layer::default()
        })
        .start();
    let mcp = gw.client();
    let mut sids = Vec::new();
    for i in 0..8 {
        sids.push(mcp.initialize(&format!("caller-{i}")).await);
    }
    for (i, sid) in sids.iter().enumerate() {
        assert!(echo(&mcp, sid, i as i64).await.get("result").is_some());
    }

    // Every session calls in a loop; each records when it was first served again after
    // the upstream came back.
    let back: std::sync::Arc<std::sync::Mutex<Option<Instant>>> = Default::default();
    let mut callers = Vec::new();
    for sid in sids.clone() {
        let mcp = mcp.clone();
        let back = back.clone();
        callers.push(tokio::spawn(async move {
            let mut id = 100;
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                id += 1;
                let r = echo(&mcp, &sid, id).await;
                let since_back = back.lock().unwrap().map(|b| b.elapsed());
                if let Some(since) = since_back
                    && r.get("result").is_some()
                {
                    return Some(since);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut child = upstream;
    child.kill().unwrap();
    child.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let addr = url.trim_start_matches("http://").trim_end_matches("/mcp");
    let (mut restarted, _) = common::http_upstream(addr);
    *back.lock().unwrap() = Some(Instant::now());

    let mut recovered = Vec::new();
    for c in callers {
        recovered.push(c.await.unwrap());
    }
    restarted.kill().unwrap();
    let _ = restarted.wait();
    let worst = recovered
        .iter()
        .map(|r| r.expect("every session is served again"))
        .max()
        .unwrap();
    eprintln!("every session served again within {worst:?} of the upstream's return");
    assert!(
        worst < Duration::from_secs(6),
        "every session is served again soon after the upstream is back (worst {worst:?}), not after the circuit's 30 s cooldown"
    );
    gw.stop().await.unwrap();
}

/// A client on another loopback address than the attacker's.
fn bystander_at(url: &str, ip: &str) -> Mcp {
    let http = reqwest::Client::builder()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    Mcp {
        url: url.to_owned(),
        http,
    }
}

/// Row "nofile": a flood of sessions that runs the gateway out of descriptors is the
/// gateway's shortage, not the upstream's failure. Each refused session gets a capacity
/// error naming it (503, `-32016`, `data.limit: gateway-resources`), the circuit stays
/// closed (it used to open for every client), and once sessions end new ones start at
/// once. Also: the start-up warning when `--max-sessions` cannot fit the limit. The
/// process boundary is the point (the descriptor limit is the process's).
#[tokio::test]
async fn running_out_of_descriptors_refuses_sessions_and_never_opens_the_circuit() {
    let dir = state_dir();
    let gw = common::Gateway::start_wrapped(
        dir.path(),
        &["prlimit", "--nofile=160:160"],
        &[
            "--demo",
            "--max-connections",
            "64",
            "--circuit-failures",
            "2",
        ],
    );
    let log = gw.log_text();
    assert!(
        log.contains("the open-files limit cannot hold"),
        "warned at start: {log}"
    );
    let other = bystander_at(&gw.url, "127.0.0.2");
    let bystander = other.initialize("bystander").await;

    let mcp = gw.client();
    let mut sids = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": format!("flood-{i}"), "version": "1"}}});
        let a = mcp.post(None, &init).await;
        if a.status != 200 {
            refused = Some(a);
            break;
        }
        sids.push(a.headers["mcp-session-id"].to_str().unwrap().to_owned());
    }
    let refused = refused.expect("the descriptor limit refuses a session");
    eprintln!("{} sessions held under nofile=160", sids.len());
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.headers.contains_key("retry-after"));
    let err = refused.json();
    assert_eq!(err["error"]["code"], json!(-32016), "{err}");
    assert_eq!(err["error"]["data"]["limit"], "gateway-resources", "{err}");
    assert!(
        sids.len() >= 10,
        "sessions held before the limit: {}",
        sids.len()
    );
    // More attempts while short: each refused the same way, none counted against the
    // upstream (two failures would open this circuit).
    for _ in 0..3 {
        let a = mcp
            .post(
                None,
                &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "again", "version": "1"}}}),
            )
            .await;
        assert_eq!(a.status, 503, "{}", a.body);
    }
    assert_eq!(
        common::metric(&gw, "tether_upstream_circuit_open").await,
        0.0,
        "the circuit stays closed"
    );
    // Sessions end; a new one starts at once, and the bystander was never harmed.
    for sid in sids.drain(..8) {
        assert_eq!(mcp.delete(&sid).await, 200);
    }
    let fresh = mcp.initialize("after").await;
    assert_eq!(
        mcp.call_text(&fresh, 1, "echo", json!({"text": "ok"}))
            .await,
        "ok"
    );
    assert_eq!(
        other
            .call_text(&bystander, 1, "echo", json!({"text": "still here"}))
            .await,
        "still here"
    );
}

/// An HTTP MCP server that is not Tether and not well behaved: it answers `initialize`
/// and notifications like any, and every other request with `status` and `body`, which
/// need not be JSON-RPC. Returns its URL; it lives as long as the test's runtime.
async fn imperfect_upstream(status: u16, body: &'static str) -> String {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |msg: axum::Json<Value>| async move {
            match msg.get("method").and_then(Value::as_str) {
                Some("initialize") => (
                    [
                        ("mcp-session-id", "imperfect-1"),
                        ("content-type", "application/json"),
                    ],
                    json!({"jsonrpc": "2.0", "id": msg["id"], "result": {
                        "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                        "serverInfo": {"name": "imperfect", "version": "1"}}})
                    .to_string(),
                )
                    .into_response(),
                _ if msg.get("id").is_none() => StatusCode::ACCEPTED.into_response(),
                _ => (
                    StatusCode::from_u16(status).unwrap(),
                    [("content-type", "application/json")],
                    body,
                )
                    .into_response(),
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Asserts `v` is a well-formed JSON-RPC error answering `id` whose message names the
/// upstream and `status`.
fn assert_names_upstream_status(v: &Value, id: i64, status: u16) {
    assert_eq!(v["jsonrpc"], "2.0", "{v}");
    assert_eq!(v["id"], id, "{v}");
    assert!(v["error"]["code"].is_i64(), "{v}");
    let message = v["error"]["message"].as_str().expect("a string message");
    assert!(
        message.contains("upstream") && message.contains(&format!("HTTP {status}")),
        "{v}"
    );
    assert!(v.get("result").is_none(), "{v}");
}

/// Row "an HTTP upstream answering `400 {"error":"bad"}`": its answer is not JSON-RPC, so
/// the client gets a proper JSON-RPC error of the gateway's naming the upstream and the
/// status (it used to be relayed as `{"error":"bad","id":5}`), through the gateway and
/// through `tether connect`; a 200 whose body is JSON but not JSON-RPC likewise.
#[tokio::test]
async fn an_upstream_answer_that_is_not_jsonrpc_becomes_a_proper_error() {
    for (status, body) in [(400, r#"{"error":"bad"}"#), (200, r#"{"hello":"world"}"#)] {
        let url = imperfect_upstream(status, body).await;
        let dir = state_dir();
        let mut gw = common::Gateway::builder(dir.path())
            .layer(Layer {
                upstream: Some(UpstreamLayer {
                    url: Some(url.clone()),
                    protocol: Some("legacy".into()),
                    ..UpstreamLayer::default()
                }),
                ..Layer::default()
            })
            .start();
        let mcp = gw.client();
        let sid = mcp.initialize("strict").await;
        let a = mcp
            .post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {}}}),
            )
            .await;
        let v = a.response();
        assert_names_upstream_status(&v, 5, status);
        assert_eq!(v["error"]["data"]["http_status"], status, "{v}");

        // The same through `tether connect`, whose client reads stdio.
        let answer = bridge_exchange(
            &url,
            json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                "params": {"name": "echo", "arguments": {}}}),
        )
        .await;
        assert_names_upstream_status(&answer, 5, status);
        gw.stop().await.unwrap();
    }
}

/// Runs `tether connect URL` with a raw stdio client: `initialize`, then `message`;
/// returns the answer to `message`.
async fn bridge_exchange(url: &str, message: Value) -> Value {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = state_dir();
    let mut child = tokio::process::Command::new(common::BIN)
        .args(["connect", url, "--first-contact", "2s", "--log-file"])
        .arg(dir.path().join("connect.log"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut send = async |msg: Value| {
        stdin
            .write_all(format!("{msg}\n").as_bytes())
            .await
            .unwrap();
        if msg.get("id").is_none() {
            return Value::Null;
        }
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the bridge answers")
            .unwrap()
            .expect("a line");
        serde_json::from_str::<Value>(&line).unwrap()
    };
    let init = send(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}}),
    )
    .await;
    assert!(init.get("result").is_some(), "{init}");
    send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
    let answer = send(message).await;
    drop(stdin);
    let _ = child.wait().await;
    answer
}

/// Row "a legacy `tools/call` sent without an `id`": a method that needs an answer
/// without an id is refused (400, `-32600`) and never reaches the upstream, so it can
/// neither pass the quota uncounted nor go unrecorded (20 of 20 used to reach a logging
/// upstream after the quota was used up).
#[tokio::test]
async fn a_request_without_an_id_is_refused_and_never_reaches_the_upstream() {
    let dir = state_dir();
    let seen = dir.path().join("upstream-stdin.log");
    let mut gw = common::Gateway::builder(dir.path())
        .layer(Layer {
            upstream: Some(UpstreamLayer {
                command: Some(vec![
                    "sh".into(),
                    "-c".into(),
                    format!(
                        "tee -a '{}' | exec '{}' demo-server",
                        seen.display(),
                        common::BIN
                    ),
                ]),
                ..UpstreamLayer::default()
            }),
            limits: Some(LimitsLayer::default().with("quota-tool-calls", "1/1h")),
            ..Layer::default()
        })
        .start();
    let mcp = gw.client();
    let sid = mcp.initialize("no-ids").await;
    for _ in 0..20 {
        let a = mcp
            .post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": "sneaky"}}}),
            )
            .await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert_eq!(a.json()["error"]["code"], -32600, "{}", a.body);
    }
    // The quota's one call is still there, and used by a proper call.
    assert_eq!(
        mcp.call_text(&sid, 1, "echo", json!({"text": "proper"}))
            .await,
        "proper"
    );
    let over = mcp.call(&sid, 2, "echo", json!({"text": "over"})).await;
    assert_eq!(over["error"]["data"]["limit"], "quota-tool-calls", "{over}");
    let upstream_saw = std::fs::read_to_string(&seen).unwrap();
    assert!(upstream_saw.contains("proper"), "{upstream_saw}");
    assert!(!upstream_saw.contains("sneaky"), "{upstream_saw}");
    gw.stop().await.unwrap();
}

/// Rows "server names `.` and `..`" and "`tether import` run on a client file it already
/// rewrote": `import` maps names a gateway cannot serve under (`..` became
/// `/servers/../mcp`, which clients normalize to `/mcp`) and says so; run again on its own
/// output it refuses the entries that point at the gateway, and `serve` refuses a server
/// whose upstream is the gateway itself (it spawned 100 `tether connect` processes in
/// 0.6 s). The CLI is the point: these run the binary.
#[tokio::test]
async fn import_maps_unsafe_names_and_nothing_serves_the_gateway_itself() {
    use std::process::Command;
    let dir = state_dir();
    let client_file = dir.path().join("claude.json");
    std::fs::write(
        &client_file,
        r#"{"mcpServers": {"..": {"command": "tether", "args": ["demo-server"]}, ".": {"command": "tether", "args": ["demo-server"]}}}"#,
    )
    .unwrap();
    let out_file = dir.path().join("tether-servers.json");
    let import = |client: &std::path::Path| {
        Command::new(common::BIN)
            .args(["import", "--gateway", "http://127.0.0.1:7450", "--out"])
            .arg(&out_file)
            .arg("--force")
            .arg(client)
            .output()
            .unwrap()
    };
    let first = import(&client_file);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(stderr.contains("served as"), "{stderr}");
    let rewritten = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(!rewritten.contains("/servers/../"), "{rewritten}");
    assert!(!rewritten.contains("/servers/./"), "{rewritten}");
    let served: Value = serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    let names: Vec<&String> = served["mcpServers"].as_object().unwrap().keys().collect();
    assert_eq!(names.len(), 2);
    assert!(
        names.iter().all(|n| !n.chars().all(|c| c == '.')),
        "{names:?}"
    );

    // Imported again: refused, naming what points at the gateway.
    let again_file = dir.path().join("claude-again.json");
    std::fs::write(&again_file, &rewritten).unwrap();
    let again = import(&again_file);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("points at this gateway"), "{stderr}");

    // Served: a server that is the gateway itself is refused at start.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let loop_file = dir.path().join("loop.json");
    std::fs::write(
        &loop_file,
        json!({"mcpServers": {
            "real": {"command": common::BIN, "args": ["demo-server"]},
            "me": {"command": "tether", "args": ["connect", format!("http://localhost:{port}/servers/real/mcp")]}
        }})
        .to_string(),
    )
    .unwrap();
    let serve = Command::new(common::BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--servers")
        .arg(&loop_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert!(!serve.status.success(), "{stderr}");
    assert!(stderr.contains("is this gateway itself"), "{stderr}");
}

/// File modes of the gateway's files in a state dir.
fn modes(dir: &std::path::Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = vec![(
        ".".to_owned(),
        std::fs::metadata(dir).unwrap().permissions().mode() & 0o777,
    )];
    for name in [
        "tether.db",
        "tether.db-wal",
        "tether.db-shm",
        "tether.lock",
        "admin.token",
        "bridge.key",
    ] {
        if let Ok(m) = std::fs::metadata(dir.join(name)) {
            out.push((name.to_owned(), m.permissions().mode() & 0o777));
        }
    }
    out
}

/// Row "the state dir": it holds full session ids and stored events, so it is 0700 and
/// the gateway's files 0600, from creation (it was 0755 with `tether.db` and its WAL
/// 0644), and a dir an older version left open is corrected at start with a WARN.
#[tokio::test]
async fn the_state_dir_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let root = state_dir();
    let fresh = root.path();
    let gw = common::Gateway::start(fresh, &["--demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("private").await;
    mcp.call_text(&sid, 1, "echo", json!({"text": "x"})).await;
    let found = modes(fresh);
    assert!(found.len() >= 6, "{found:?}");
    for (name, mode) in &found {
        let want = if name == "." { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{name}: {mode:o} in {found:?}");
    }
    drop(gw);

    // An open dir, as an earlier version left it: corrected, and said so.
    std::fs::set_permissions(fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
    for name in ["tether.db", "tether.db-wal", "admin.token"] {
        let p = fresh.join(name);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let gw = common::Gateway::start(fresh, &["--demo"]);
    let log = gw.log_text();
    assert!(
        log.contains("WARN") && log.contains("made private"),
        "{log}"
    );
    for (name, mode) in modes(fresh) {
        let want = if name == "." { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{name}: {mode:o}");
    }
    assert_eq!(
        gw.client()
            .call_text(&sid, 2, "echo", json!({"text": "y"}))
            .await,
        "y",
        "the session resumes from the corrected store"
    );
}

/// Row "the servers file replaced by a FIFO, then SIGHUP": it was read on a runtime
/// worker, so `/mcp` and `/health` hung about 60 s, idle sessions were reaped meanwhile,
/// and a second block left SIGTERM unable to end the process. Now a file that is not a
/// regular one is refused at once (the running servers stay, the reason is logged),
/// everything answers throughout, and SIGTERM ends the process. Signals are the point.
#[tokio::test]
async fn a_servers_file_replaced_by_a_fifo_blocks_nothing() {
    let dir = state_dir();
    let file = dir.path().join("servers.json");
    std::fs::write(
        &file,
        json!({"mcpServers": {"demo": {"command": common::BIN, "args": ["demo-server"]}}})
            .to_string(),
    )
    .unwrap();
    let mut gw = common::Gateway::spawn(
        dir.path(),
        &["--servers", file.to_str().unwrap(), "--idle-timeout", "3s"],
    );
    let mcp = gw
        .client()
        .with_url(&gw.url.replace("/mcp", "/servers/demo/mcp"));
    let sid = mcp.initialize("held").await;
    std::fs::remove_file(&file).unwrap();
    nix::unistd::mkfifo(&file, nix::sys::stat::Mode::S_IRWXU).unwrap();
    for _ in 0..2 {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(gw.pid()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let began = Instant::now();
        let health = reqwest::Client::new()
            .get(format!("{}/health", gw.admin))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        assert_eq!(
            mcp.call_text(&sid, 1, "echo", json!({"text": "served"}))
                .await,
            "served"
        );
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "answered while the file is a FIFO: {:?}",
            began.elapsed()
        );
    }
    assert!(
        common::wait_for(Duration::from_secs(5), || gw
            .log_text()
            .contains("not a regular file")),
        "{}",
        gw.log_text()
    );
    let status = gw.sigterm();
    assert!(status.success(), "{status:?}");
}

/// Rows "100 sessions whose `initialize` carries a 4 MB `clientInfo.name`" and "logs":
/// the stored `initialize` is bounded (`--max-initialize`, 64 KiB by default: over it
/// `-32602` naming the limit, nothing kept), what is under it is cut before a log line, a
/// record or a page, the dashboard's `GET /api/sessions` answers 200 with a bounded page
/// (it answered 500), and no log line carries a full session id (they are credentials).
/// The process's memory and log file are the point: this runs the binary.
#[tokio::test]
async fn a_huge_initialize_is_refused_and_client_strings_are_cut_everywhere() {
    let dir = state_dir();
    let gw = common::Gateway::spawn(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let bystander = bystander_at(&gw.url, "127.0.0.2");
    let other = bystander.initialize("bystander").await;
    let rss_before = common::rss_kib(gw.pid());

    let huge = "n".repeat(3 << 20);
    for i in 0..20 {
        let init = json!({"jsonrpc": "2.0", "id": i, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": huge, "version": "1"}}});
        let a = mcp.post(None, &init).await;
        assert_eq!(a.status, 400, "{}", &a.body[..a.body.len().min(300)]);
        let e = a.json();
        assert_eq!(e["error"]["code"], -32602, "{e}");
        assert_eq!(e["error"]["data"]["limit"], "max-initialize", "{e}");
        assert_eq!(e["id"], i, "{e}");
    }
    // Under the bound: accepted, and cut wherever it is kept or shown.
    let big = "b".repeat(60 << 10);
    let mut sids = Vec::new();
    for i in 0..100 {
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": format!("{i}{big}"), "version": "1"}}});
        let a = mcp.post(None, &init).await;
        assert_eq!(a.status, 200, "{}", &a.body[..a.body.len().min(300)]);
        sids.push(a.headers["mcp-session-id"].to_str().unwrap().to_owned());
    }
    let rss_after = common::rss_kib(gw.pid());
    assert!(
        rss_after < rss_before + 100 * 1024,
        "RSS {rss_before} KiB → {rss_after} KiB"
    );
    // What the dashboard reads, without the token: a bounded page, never a 500.
    let page = reqwest::get(format!("{}/api/sessions?limit=500", gw.admin))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let text = page.text().await.unwrap();
    assert!(text.len() < 1 << 20, "a page of {} bytes", text.len());
    let v: Value = serde_json::from_str(&text).unwrap();
    let rows = v["sessions"].as_array().unwrap();
    assert!(!rows.is_empty());
    for row in rows {
        let name = row["client_name"].as_str().unwrap_or_default();
        assert!(name.len() <= 300, "client name of {} bytes", name.len());
    }
    assert_eq!(
        bystander
            .call_text(&other, 1, "echo", json!({"text": "fine"}))
            .await,
        "fine"
    );
    // The log: small, no client name whole, no full session id.
    let log = gw.log_text();
    assert!(log.len() < 2 << 20, "a log of {} bytes", log.len());
    assert!(!log.contains(&big[..1024]), "a client name logged whole");
    for sid in sids.iter().chain([&other]) {
        assert!(
            !log.contains(sid.as_str()),
            "full session id {sid} in the log"
        );
        assert!(
            log.contains(&sid[..8]),
            "the prefix {} is logged",
            &sid[..8]
        );
    }
    let db = std::fs::metadata(dir.path().join("tether.db"))
        .map(|m| m.len())
        .unwrap_or(0)
        + std::fs::metadata(dir.path().join("tether.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    assert!(db < 64 << 20, "database and WAL of {db} bytes");
}

/// Sends one raw HTTP/1.1 request and returns the status code of the answer.
async fn raw_status(addr: &str, request: String) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// Row "Host and URI": `Host: 127.0.0.1:P@evil.com` passed as loopback, of two `Host`
/// headers the first won, an absolute-form `http://evil.com/mcp` request line was served,
/// and `/api/stats?since=1000000000000h` answered 200 with a negative window. Now: 400 for a
/// `Host` that is not a plain host[:port] and for two of them, the absolute-form
/// authority is what the `Host` check judges (403 for evil.com, served for our own), and
/// out-of-range admin values are 400.
#[tokio::test]
async fn hosts_must_be_plain_single_and_ours_and_admin_values_in_range() {
    let dir = state_dir();
    let mut gw = common::Gateway::builder(dir.path())
        .layer(Layer::default())
        .start();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}})
    .to_string();
    let post = |target: &str, hosts: &[&str]| {
        let mut r = format!("POST {target} HTTP/1.1\r\n");
        for h in hosts {
            r.push_str(&format!("Host: {h}\r\n"));
        }
        r.push_str(&format!(
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{init}",
            init.len()
        ));
        r
    };
    let me = gw.addr.clone();
    let userinfo = format!("{me}@evil.com");
    for (target, hosts, want) in [
        ("/mcp", vec![userinfo.as_str()], 400),
        ("/mcp", vec![me.as_str(), "evil.com"], 400),
        ("/mcp", vec!["evil.com", me.as_str()], 400),
        ("http://evil.com/mcp", vec![me.as_str()], 403),
        ("http://evil.com/servers/demo/mcp", vec![me.as_str()], 403),
        (&format!("http://{me}/mcp"), vec![me.as_str()], 200),
        ("/mcp", vec![me.as_str()], 200),
    ] {
        let status = raw_status(&gw.addr, post(target, &hosts)).await;
        assert_eq!(status, want, "{target} with Host {hosts:?}");
    }
    let admin = gw.admin.trim_start_matches("http://").to_owned();
    let get = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    for (target, host, want) in [
        ("/api/stats?since=1000000000000h", admin.as_str(), 400),
        ("/api/stats?since=-5", admin.as_str(), 400),
        (
            "/api/sessions?offset=99999999999999999999",
            admin.as_str(),
            400,
        ),
        ("/api/stats?since=1h", admin.as_str(), 200),
        ("/health", &format!("{admin}@evil.com"), 400),
        ("/health", admin.as_str(), 200),
    ] {
        let status = raw_status(&admin, get(target, host)).await;
        assert_eq!(status, want, "{target} with Host {host}");
    }
    gw.stop().await.unwrap();
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15; here counted from the state (field 3).
    (ticks(11) + ticks(12)) / 100.0
}

/// Row "one stateless 2026-07-28 client sends `subscriptions/listen` again and again, each
/// with 64 fresh 1 KB `resourceSubscriptions`" and legacy `resources/subscribe` likewise:
/// every URI was kept with no cap (2 GB by the 49th listen; 4,000 legacy URIs 1.4 GB and
/// 28 s of CPU). Now each session and each user is bounded by count and bytes: past it the
/// client gets `-32016` naming the limit, memory and CPU stay small, and a bystander on
/// another address is served throughout. The process's memory is the point: the binary.
#[tokio::test]
async fn resource_subscriptions_are_bounded_in_both_eras() {
    let dir = state_dir();
    let gw = common::Gateway::spawn(dir.path(), &["--demo"]);
    let bystander = bystander_at(&gw.url, "127.0.0.2");
    let other = bystander.initialize("bystander").await;
    let rss_before = common::rss_kib(gw.pid());
    let cpu_before = cpu_seconds(gw.pid());

    // Legacy: fresh 1 KB URIs until refused.
    let mcp = gw.client();
    let sid = mcp.initialize("subscriber").await;
    let mut accepted = 0;
    let mut refused = None;
    for i in 0..4000 {
        let uri = format!("file:///{i:06}/{}", "u".repeat(1000));
        let a = mcp
            .post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "id": i, "method": "resources/subscribe", "params": {"uri": uri}}),
            )
            .await;
        let v = a.response();
        if v.get("result").is_some() {
            accepted += 1;
        } else {
            refused = Some(v);
            break;
        }
    }
    let refused = refused.expect("a bound refuses the flood");
    assert_eq!(refused["error"]["code"], -32016, "{refused}");
    assert_eq!(
        refused["error"]["data"]["limit"], "max-subscriptions",
        "{refused}"
    );
    assert!(accepted >= 200, "{accepted} accepted first");

    // Modern: listen again and again with 64 fresh URIs each.
    let listen = |n: usize| {
        let uris: Vec<String> = (0..64)
            .map(|k| format!("file:///listen-{n}-{k}/{}", "l".repeat(1000)))
            .collect();
        let body = json!({"jsonrpc": "2.0", "id": format!("sub-{n}"), "method": "subscriptions/listen",
            "params": {"notifications": {"resourceSubscriptions": uris}, "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "listener", "version": "1"}}}});
        mcp.http
            .post(&gw.url)
            .header("content-type", "application/json")
            .header("accept", common::ACCEPT_BOTH)
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "subscriptions/listen")
            .body(body.to_string())
            .send()
    };
    let mut limited = None;
    for n in 0..60 {
        let resp = listen(n).await.unwrap();
        let is_sse = resp
            .headers()
            .get("content-type")
            .is_some_and(|c| c.to_str().unwrap_or("").starts_with("text/event-stream"));
        if !is_sse {
            limited = Some(resp.json::<Value>().await.unwrap());
            break;
        }
        // The acknowledgement came; the client goes away and comes back with more.
        drop(resp);
    }
    let limited = limited.expect("the pooled session's subscriptions are bounded");
    assert_eq!(limited["error"]["code"], -32016, "{limited}");
    assert_eq!(
        limited["error"]["data"]["limit"], "max-subscriptions",
        "{limited}"
    );

    let rss_after = common::rss_kib(gw.pid());
    let cpu = cpu_seconds(gw.pid()) - cpu_before;
    eprintln!("RSS {rss_before} → {rss_after} KiB, {cpu:.2} s of CPU");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS {rss_before} → {rss_after} KiB"
    );
    assert!(cpu < 20.0, "{cpu} s of CPU");
    assert_eq!(
        bystander
            .call_text(&other, 1, "echo", json!({"text": "fine"}))
            .await,
        "fine"
    );
}

/// An HTTP MCP server (not Tether) that answers one JSON body per request when its work is
/// done, as JSON-response servers do: `hang` never finishes, `flood` answers with one SSE
/// event of `flood_bytes` that never ends its line, `echo` at once. The methods it was sent
/// are kept in order. Lives as long as the test's runtime.
async fn json_response_upstream(
    flood_bytes: usize,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::response::IntoResponse;
    let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |msg: axum::Json<Value>| {
            let log = log.clone();
            async move {
                let method = msg["method"].as_str().unwrap_or("").to_owned();
                log.lock().unwrap().push(method.clone());
                let json_headers = [("mcp-session-id", "json-1"), ("content-type", "application/json")];
                let tool = msg.pointer("/params/name").and_then(Value::as_str).unwrap_or("");
                match (method.as_str(), tool) {
                    ("initialize", _) => (
                        json_headers,
                        json!({"jsonrpc": "2.0", "id": msg["id"], "result": {
                            "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                            "serverInfo": {"name": "json-response", "version": "1"}}})
                        .to_string(),
                    )
                        .into_response(),
                    (m, _) if m.starts_with("notifications/") => {
                        axum::http::StatusCode::ACCEPTED.into_response()
                    }
                    ("tools/call", "hang") => {
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    ("tools/call", "flood") => {
                        let chunk = axum::body::Bytes::from(vec![b'x'; 64 << 10]);
                        let first = axum::body::Bytes::from_static(b"data: ");
                        let body = futures::stream::iter(
                            std::iter::once(first)
                                .chain(std::iter::repeat_n(chunk, flood_bytes / (64 << 10)))
                                .map(Ok::<_, std::io::Error>),
                        );
                        (
                            [("content-type", "text/event-stream")],
                            axum::body::Body::from_stream(body),
                        )
                            .into_response()
                    }
                    _ => (
                        json_headers,
                        json!({"jsonrpc": "2.0", "id": msg["id"], "result": {
                            "content": [{"type": "text", "text": msg.pointer("/params/arguments/text").cloned().unwrap_or(json!("pong"))}]}})
                        .to_string(),
                    )
                        .into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// Row "a `tools/call` that an HTTP upstream never answers, where the upstream sends one
/// JSON body when the work is done": the link sent POSTs one at a time, so every later
/// request of the session (ping, tools/list, the cancel itself) waited for
/// `--upstream-timeout` and failed. Now a hung call holds up nothing: other calls of the
/// same session are answered while it hangs, and its cancel reaches the upstream at once;
/// through `tether connect` likewise.
#[tokio::test]
async fn a_hung_call_holds_up_nothing_else_of_its_session() {
    let (url, seen) = json_response_upstream(0).await;
    let dir = state_dir();
    let mut gw = common::Gateway::builder(dir.path())
        .layer(
            Layer {
                upstream: Some(UpstreamLayer {
                    url: Some(url.clone()),
                    protocol: Some("legacy".into()),
                    ..UpstreamLayer::default()
                }),
                ..Layer::default()
            }
            .with("upstream-timeout", "60s"),
        )
        .start();
    let mcp = gw.client();
    let sid = mcp.initialize("patient").await;
    let (_stream, _open) = mcp.start_call(&sid, 1, "hang", json!({})).await;
    for i in 0..5 {
        let text = tokio::time::timeout(
            Duration::from_secs(10),
            mcp.call_text(&sid, 10 + i, "echo", json!({"text": "meanwhile"})),
        )
        .await
        .expect("answered while the other call hangs");
        assert_eq!(text, "meanwhile");
    }
    let cancel = mcp
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}),
        )
        .await;
    assert_eq!(cancel.status, 202);
    // Polled without blocking: the upstream that records it runs on this test's runtime.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen
        .lock()
        .unwrap()
        .iter()
        .any(|m| m == "notifications/cancelled")
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|m| m == "notifications/cancelled"),
        "the cancel reached the upstream: {:?}",
        seen.lock().unwrap()
    );
    gw.stop().await.unwrap();

    // The same through `tether connect`: a hung call, then an echo answered meanwhile.
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut child = tokio::process::Command::new(common::BIN)
        .args(["connect", &url, "--log-file"])
        .arg(dir.path().join("connect.log"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for msg in [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "hang", "arguments": {}}}),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "through"}}}),
    ] {
        stdin
            .write_all(format!("{msg}\n").as_bytes())
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("the bridge answers the echo while the other call hangs")
            .unwrap()
            .expect("a line");
        got.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert_eq!(got[1]["id"], 3, "{got:?}");
    assert_eq!(got[1]["result"]["content"][0]["text"], "through", "{got:?}");
    drop(stdin);
    let _ = child.kill().await;
}

/// Row "an HTTP upstream that sends one 100 MB SSE event": no `-32017`, a full core burned
/// until the upstream timeout (5 min), and `tether connect` spent 24.5 s of CPU in 25 s
/// without answering. Now the event is refused the moment it crosses
/// `--max-upstream-message` (`-32017`), the rest unread, and the same session's next call
/// is served. The processes' CPU is the point: the gateway and the bridge run as binaries.
#[tokio::test]
async fn one_huge_sse_event_is_refused_at_once_without_burning_a_core() {
    let (url, _) = json_response_upstream(100 << 20).await;
    let dir = state_dir();
    let gw = common::Gateway::spawn(
        dir.path(),
        &["--upstream-url", &url, "--upstream-protocol", "legacy"],
    );
    let mcp = gw.client();
    let sid = mcp.initialize("flooded").await;
    let cpu_before = cpu_seconds(gw.pid());
    let v = tokio::time::timeout(
        Duration::from_secs(20),
        mcp.call(&sid, 1, "flood", json!({})),
    )
    .await
    .expect("answered, not left to the upstream timeout");
    assert_eq!(v["error"]["code"], -32017, "{v}");
    let cpu = cpu_seconds(gw.pid()) - cpu_before;
    assert!(cpu < 5.0, "the gateway spent {cpu} s of CPU on one event");
    assert_eq!(
        mcp.call_text(&sid, 2, "echo", json!({"text": "after"}))
            .await,
        "after"
    );

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut child = tokio::process::Command::new(common::BIN)
        .args(["connect", &url, "--log-file"])
        .arg(dir.path().join("connect.log"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap() as i32;
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for msg in [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "flood", "arguments": {}}}),
    ] {
        stdin
            .write_all(format!("{msg}\n").as_bytes())
            .await
            .unwrap();
    }
    let mut answer = Value::Null;
    while answer["id"] != 2 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the bridge answers the flood")
            .unwrap()
            .expect("a line");
        answer = serde_json::from_str(&line).unwrap();
    }
    assert_eq!(answer["error"]["code"], -32017, "{answer}");
    let cpu = cpu_seconds(pid);
    assert!(cpu < 5.0, "the bridge spent {cpu} s of CPU");
    drop(stdin);
    let _ = child.kill().await;
}

/// The reason a session was closed with, from the admin API, once it is (up to 5 s).
async fn until_closed(gw: &common::Gateway, sid: &str) -> Option<String> {
    for _ in 0..50 {
        let v = gw.admin_json(&format!("/api/sessions/{sid}")).await;
        if let Some(r) = v["session"]["close_reason"].as_str() {
            return Some(r.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Row "a user removed from a server's `users` by reload": new sessions got 403, but the
/// user's existing session kept answering (16 of 16 calls over 8 s) on the draining
/// generation. Now a reload takes effect on live sessions: the user's next request is 403
/// and its sessions close with reason `revoked`, while another user's go on. Likewise a
/// key revoked with `tether keys revoke`: taken from the config file on SIGHUP (or its
/// change), its user's sessions close `revoked` and its next request is 401. Signals and the
/// CLI are the point: the binary.
#[tokio::test]
async fn a_reload_takes_effect_on_live_sessions() {
    let dir = state_dir();
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "").unwrap();
    let alice_key = common::add_key(&config, "alice", "a@example.com");
    let bob_key = common::add_key(&config, "bob", "b@example.com");
    let servers = dir.path().join("servers.json");
    let write_servers = |users: &[&str]| {
        std::fs::write(
            &servers,
            json!({"mcpServers": {"demo": {"command": common::BIN, "args": ["demo-server"],
                "tether": {"users": users}}}})
            .to_string(),
        )
        .unwrap();
    };
    write_servers(&["alice", "bob"]);
    let gw = common::Gateway::spawn(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--servers",
            servers.to_str().unwrap(),
        ],
    );
    let url = gw.url.replace("/mcp", "/servers/demo/mcp");
    let alice = common::with_key(&Mcp::new(&url), &alice_key);
    let bob = common::with_key(&Mcp::new(&url), &bob_key);
    let a = alice.initialize("alice").await;
    let b = bob.initialize("bob").await;
    assert_eq!(
        alice.call_text(&a, 1, "echo", json!({"text": "a"})).await,
        "a"
    );
    let hangup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(gw.pid()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    };

    // Alice is taken off the server's users.
    write_servers(&["bob"]);
    hangup();
    let mut status = 0;
    for _ in 0..50 {
        let r = alice
            .post(
                Some(&a),
                &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": "still?"}}}),
            )
            .await;
        status = r.status;
        if status == 403 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 403, "alice is refused on her live session");
    assert_eq!(
        until_closed(&gw, &a).await.as_deref(),
        Some("revoked"),
        "alice's session closed as revoked"
    );
    assert_eq!(
        bob.call_text(&b, 3, "echo", json!({"text": "b"})).await,
        "b"
    );

    // Bob's key is revoked in the config file.
    let out = std::process::Command::new(common::BIN)
        .args(["keys", "revoke", "--user", "bob", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    hangup();
    let mut status = 0;
    for _ in 0..50 {
        status = bob
            .post(
                Some(&b),
                &json!({"jsonrpc": "2.0", "id": 4, "method": "ping"}),
            )
            .await
            .status;
        if status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 401, "bob's revoked key is refused");
    assert_eq!(
        until_closed(&gw, &b).await.as_deref(),
        Some("revoked"),
        "bob's session closed as revoked"
    );
}

/// Row "the database file deleted while serving": readiness turned 503, yet a new session
/// was still acknowledged, and was 404 after a restart. A session is never acknowledged
/// when its record cannot be made durable: once the file at the store's path is not the
/// one it writes (deleted or replaced), `initialize` is refused (503, `-32014`); sessions
/// held go on serving, and a session created before stays served meanwhile.
#[tokio::test]
async fn no_session_is_acknowledged_into_a_deleted_database() {
    let dir = state_dir();
    let mut gw = common::Gateway::builder(dir.path())
        .layer(Layer::default())
        .start();
    let mcp = gw.client();
    let held = mcp.initialize("before").await;
    for f in ["tether.db", "tether.db-wal", "tether.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "after", "version": "1"}}});
    let refused = mcp.post(None, &init).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(!refused.headers.contains_key("mcp-session-id"));
    let e = refused.json();
    assert_eq!(e["error"]["code"], -32014, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("removed"),
        "{e}"
    );
    let ready = reqwest::get(format!("{}/health/ready", gw.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(
        mcp.call_text(&held, 1, "echo", json!({"text": "held"}))
            .await,
        "held"
    );
    // A file put back at the path is another file: still refused, never acknowledged.
    std::fs::write(dir.path().join("tether.db"), b"").unwrap();
    assert_eq!(mcp.post(None, &init).await.status, 503);
    gw.stop().await.unwrap();
}

/// Row "sessions nobody serves any more": with SQLite, the quick start's sessions were
/// still live 33 minutes later under `--servers` (no server's reaper looks at a name no
/// server has), and the bridge's pooled sessions stayed live after every restart (the
/// dashboard said 45 live with one upstream running). Now the first are expired at the
/// idle timeout and the second closed at start, and `/health` and the metrics say the same.
/// A restart with other arguments is the point: the binary.
#[tokio::test]
async fn sessions_no_server_serves_expire_and_the_figures_agree() {
    let dir = state_dir();
    let mut gw = common::Gateway::start(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let quick = mcp.initialize("quick-start").await;
    // A 2026-07-28 call: the bridge starts a pooled session for it.
    let modern = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": "m"}, "_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "modern", "version": "1"}}}});
    let a = mcp
        .post_raw(
            &[
                ("content-type", "application/json"),
                ("accept", common::ACCEPT_BOTH),
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/call"),
                ("mcp-name", "echo"),
            ],
            modern.to_string(),
        )
        .await;
    assert!(a.response().get("result").is_some(), "{}", a.body);
    let sessions = gw.admin_json("/api/sessions?status=live").await;
    let pooled: Vec<String> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["transport"] == "pooled")
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(pooled.len(), 1, "{sessions}");
    gw.stop().await.expect("a clean stop");

    let file = dir.path().join("servers.json");
    std::fs::write(
        &file,
        json!({"mcpServers": {"other": {"command": common::BIN, "args": ["demo-server"]}}})
            .to_string(),
    )
    .unwrap();
    let gw = gw.restart_with(&["--servers", file.to_str().unwrap(), "--idle-timeout", "1s"]);
    let reason = until_closed(&gw, &pooled[0]).await;
    assert_eq!(reason.as_deref(), Some("gateway_restart"));
    let mut quick_reason = None;
    for _ in 0..10 {
        quick_reason = until_closed(&gw, &quick).await;
        if quick_reason.is_some() {
            break;
        }
    }
    assert_eq!(
        quick_reason.as_deref(),
        Some("timeout"),
        "no server serves demo any more"
    );
    let health: Value = reqwest::get(format!("{}/health", gw.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["live_sessions"], 0, "{health}");
    assert_eq!(common::metric(&gw, "tether_sessions_live").await, 0.0);
}

/// Row "half-open connections from two or more addresses that reopen as they are cut":
/// the connection slots stayed full and a bystander's `initialize` and its session's calls
/// got 503 for the whole attack (one address alone is capped at half, which held). Now a
/// full listener makes the oldest connection that never finished its headers give way to
/// a newcomer, and a connection that carried a request is never cut for one: the
/// bystander's new connections and its established session are served throughout.
#[tokio::test]
async fn held_connections_from_many_addresses_give_way_to_clients() {
    let dir = state_dir();
    let mut gw = common::Gateway::builder(dir.path())
        .layer(Layer {
            limits: Some(
                LimitsLayer::default()
                    .with("max-connections", 60u64)
                    .with("max-connections-per-addr", 30u64)
                    .with("header-timeout", "60s"),
            ),
            ..Layer::default()
        })
        .start();
    let established = bystander_at(&gw.url, "127.0.0.2");
    let sid = established.initialize("established").await;
    assert_eq!(
        established
            .call_text(&sid, 1, "echo", json!({"text": "x"}))
            .await,
        "x"
    );
    // Attackers on two addresses: each keeps its 30 connections open without finishing
    // a request, and opens a new one whenever one is cut.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut attackers = Vec::new();
    for ip in ["127.0.0.3", "127.0.0.4"] {
        for _ in 0..30 {
            let (addr, stop) = (gw.addr.clone(), stop.clone());
            attackers.push(tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                while !stop.is_cancelled() {
                    let socket = tokio::net::TcpSocket::new_v4().unwrap();
                    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
                    let Ok(mut tcp) = socket.connect(addr.parse().unwrap()).await else {
                        continue;
                    };
                    let _ = tcp
                        .write_all(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                        .await;
                    let mut buf = [0u8; 512];
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tcp.read(&mut buf) => {}
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // During the attack: new clients (each a new connection) and the established session.
    for i in 0..5 {
        let fresh = bystander_at(&gw.url, "127.0.0.5");
        let a = fresh
            .post(
                None,
                &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                    "protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": format!("newcomer-{i}"), "version": "1"}}}),
            )
            .await;
        assert_eq!(
            a.status, 200,
            "a newcomer is served during the attack: {}",
            a.body
        );
        assert_eq!(
            established
                .call_text(&sid, 10 + i, "echo", json!({"text": "still"}))
                .await,
            "still"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    for a in attackers {
        let _ = a.await;
    }
    gw.stop().await.unwrap();
}

/// A stdio MCP server (Python, not Tether) whose `flood` tool writes `bytes` of 64 KiB log
/// notifications as fast as its pipe takes them, then answers (`scripts/flood_server.py`,
/// which the benchmark uses too).
const FLOOD_SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/flood_server.py");

/// Opens `request` on a socket that takes nothing back (a client that never reads).
async fn never_reading(addr: &str, request: String) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .connect(&addr.parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut tcp = tokio::net::TcpStream::from_std(socket.into()).unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    tcp
}

/// Row "a client that never reads its GET stream while the upstream writes 1.5 GB": RSS
/// grew to 796 MB, a bystander stalled up to 2.48 s, and the database and WAL grew to
/// 1.5-2.1 GB and never shrank. Now the GET stream has the POST stream's bound (the
/// session's pump waits for the store, never past its write budget), the stored log is
/// bounded per session (`--max-session-log`), and the WAL is cut back after checkpoints.
/// The process's memory and files are the point: the binary.
#[tokio::test]
async fn a_get_stream_nobody_reads_is_bounded_in_memory_and_on_disk() {
    let dir = state_dir();
    let script = std::path::Path::new(FLOOD_SERVER);
    let gw = common::Gateway::spawn(
        dir.path(),
        &[
            "--max-session-log",
            "8MiB",
            "--write-timeout",
            "300s",
            "--",
            "python3",
            script.to_str().unwrap(),
        ],
    );
    let bystander = bystander_at(&gw.url, "127.0.0.2");
    let other = bystander.initialize("bystander").await;
    let mcp = gw.client();
    let sid = mcp.initialize("never-reads").await;
    let rss_before = common::rss_kib(gw.pid());
    // The GET stream and the flooding call, both from sockets that take nothing.
    let _get = never_reading(
        &gw.addr,
        format!(
            "GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nMcp-Session-Id: {sid}\r\nMcp-Protocol-Version: 2025-11-25\r\n\r\n"
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "flood", "arguments": {"bytes": 256 << 20}}})
    .to_string();
    let _post = never_reading(
        &gw.addr,
        format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Session-Id: {sid}\r\nMcp-Protocol-Version: 2025-11-25\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    let (mut peak, mut files_peak, mut calls) = (0, 0, 0);
    let started = Instant::now();
    // Until the flood's call is recorded (all of it went through the gateway), or 150 s.
    loop {
        peak = peak.max(common::rss_kib(gw.pid()));
        let files = ["tether.db", "tether.db-wal"]
            .iter()
            .map(|f| std::fs::metadata(dir.path().join(f)).map_or(0, |m| m.len()))
            .sum::<u64>();
        files_peak = files_peak.max(files);
        calls += 1;
        let echoed = tokio::time::timeout(
            Duration::from_secs(10),
            bystander.call_text(&other, calls, "echo", json!({"text": "here"})),
        )
        .await
        .expect("the bystander is served during the flood");
        assert_eq!(echoed, "here");
        let s = gw.admin_json(&format!("/api/sessions/{sid}")).await;
        if s["session"]["tool_calls"] == 1 || started.elapsed() > Duration::from_secs(150) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "GET flood of 256 MiB: RSS {rss_before} KiB → peak {peak} KiB; database and WAL peaked at {files_peak} bytes; {calls} bystander calls in {:?}",
        started.elapsed()
    );
    assert!(
        peak < rss_before + 96 * 1024,
        "RSS peaked at {peak} KiB from {rss_before} KiB"
    );
    // The bound: the WAL is cut back once it passes 64 MiB (`WAL_HARD_LIMIT`), the
    // session's log holds 8 MiB, and a commit in progress may add up to 16 MiB more; alone
    // on a machine the flood peaks near 38 MB, on one running the whole suite near 73 MB
    // (without the bounds it was 636 + 1,040 MiB).
    assert!(
        files_peak < (64 + 8 + 16) << 20,
        "database and WAL peaked at {files_peak} bytes"
    );
}
