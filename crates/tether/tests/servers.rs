//! One gateway for several servers (issue 17): a client's `mcpServers` file served at
//! `/servers/NAME/mcp`, each server with its own sessions, limits and ledger rows; a
//! SIGKILL of the gateway; reloads that add, change and remove servers while the sessions
//! of the others go on; one busy server at its limit while another keeps serving.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{BIN, Gateway, Mcp, add_key, http_upstream, metric, state_dir, wait_for, with_key};
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use serde_json::{Value, json};

/// Sends the gateway SIGHUP (what `systemctl reload` does).
fn hangup(gw: &Gateway) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gw.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A stdio demo server whose `getenv WHO` says which server it is.
fn stdio(who: &str) -> Value {
    json!({"command": BIN, "args": ["demo-server"], "env": {"WHO": who}})
}

fn write(path: &Path, servers: &Value) {
    std::fs::write(path, json!({ "mcpServers": servers }).to_string()).unwrap();
}

fn at(gw: &Gateway, server: &str) -> Mcp {
    Mcp::new(&format!("http://{}/servers/{server}/mcp", gw.addr))
}

async fn who(mcp: &Mcp, session: &str) -> String {
    mcp.call_text(session, 7, "getenv", json!({"name": "WHO"}))
        .await
}

async fn servers(gw: &Gateway) -> Vec<(String, String)> {
    gw.admin_json("/api/servers").await["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A ping in `session` at `mcp`'s server: 200 where the session is served, 404 elsewhere.
async fn ping(mcp: &Mcp, session: &str) -> common::Answer {
    mcp.post(
        Some(session),
        &json!({"jsonrpc": "2.0", "id": 99, "method": "ping"}),
    )
    .await
}

/// An `initialize` whose answer the test inspects (a refusal, usually).
async fn initialize_raw(mcp: &Mcp, client: &str) -> common::Answer {
    mcp.post(None, &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": client, "version": "1"}}}))
        .await
}

/// The official Rust SDK client at one server's URL: lists its tools and calls one.
async fn rmcp_call(url: &str, tool: &str, arguments: Value) -> String {
    let client =
        ().serve(StreamableHttpClientTransport::from_uri(url.to_owned()))
            .await
            .unwrap_or_else(|e| panic!("initialize at {url}: {e}"));
    let tools = client.list_all_tools().await.unwrap();
    assert!(tools.iter().any(|t| t.name == tool), "{tool} at {url}");
    let Value::Object(arguments) = arguments else {
        panic!("arguments are an object")
    };
    let r = client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
        .await
        .unwrap();
    client.cancel().await.unwrap();
    r.content[0].as_text().unwrap().text.clone()
}

#[tokio::test]
async fn three_servers_from_an_mcp_servers_file_behind_one_gateway() {
    let dir = state_dir();
    let (web_server, web_url) = http_upstream("127.0.0.1:0");
    // Killed however the test ends (a failed assertion must not leave it running).
    let _web_server = KillOnDrop(web_server);
    let file = dir.path().join("claude_desktop_config.json");
    let mut beta = stdio("beta");
    beta["autoApprove"] = json!(["echo"]);
    write(
        &file,
        &json!({"alpha": stdio("alpha"), "beta": beta, "web": {"url": web_url}}),
    );
    let mut gw = Gateway::spawn(dir.path(), &["--servers", file.to_str().unwrap()]);

    // A real client at each server's URL reaches that server.
    for (server, expect) in [("alpha", "alpha"), ("beta", "beta")] {
        let url = format!("http://{}/servers/{server}/mcp", gw.addr);
        assert_eq!(
            rmcp_call(&url, "getenv", json!({"name": "WHO"})).await,
            expect
        );
    }
    let url = format!("http://{}/servers/web/mcp", gw.addr);
    assert_eq!(rmcp_call(&url, "echo", json!({"text": "hi"})).await, "hi");

    // Sessions belong to their server.
    let (a, b, w) = (at(&gw, "alpha"), at(&gw, "beta"), at(&gw, "web"));
    let sa = a.initialize("raw-a").await;
    let sb = b.initialize("raw-b").await;
    let sw = w.initialize("raw-w").await;
    assert_eq!(who(&a, &sa).await, "alpha");
    assert_eq!(who(&b, &sb).await, "beta");
    assert_eq!(w.call_text(&sw, 2, "echo", json!({"text": "w"})).await, "w");
    let foreign = ping(&b, &sa).await;
    assert_eq!(
        foreign.status, 404,
        "another server's session: {}",
        foreign.body
    );

    // /mcp with several servers lists them; an unknown server is a clear 404.
    let root = gw
        .client()
        .post(
            None,
            &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}),
        )
        .await;
    assert_eq!(root.status, 404);
    let body = root.json();
    let listed: Vec<&str> = body["error"]["data"]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        [
            "/servers/alpha/mcp",
            "/servers/beta/mcp",
            "/servers/web/mcp"
        ]
    );
    let nope = at(&gw, "nope")
        .post(None, &json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .await;
    assert_eq!(nope.status, 404);
    let message = nope.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("no server named \"nope\""), "{message}");
    assert_eq!(
        metric(
            &gw,
            "tether_http_requests_total{class=\"dispatch\",status=\"404\"}"
        )
        .await,
        2.0,
        "the dispatcher's own answers are counted"
    );

    // The 2024-11-05 pair lives under the same prefix.
    let sse = reqwest::Client::new()
        .get(format!("http://{}/servers/beta/sse", gw.addr))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut body = sse.bytes_stream();
    let first = futures::StreamExt::next(&mut body).await.unwrap().unwrap();
    let first = String::from_utf8_lossy(&first);
    assert!(
        first.contains("data: /servers/beta/messages?sessionId="),
        "{first}"
    );
    drop(body);

    // The admin API, the ledger and the metrics know each session's server.
    assert_eq!(
        servers(&gw).await,
        [
            ("alpha".to_owned(), "serving".to_owned()),
            ("beta".to_owned(), "serving".to_owned()),
            ("web".to_owned(), "serving".to_owned())
        ]
    );
    let mut of_beta = Vec::new();
    for _ in 0..100 {
        of_beta = gw
            .admin_json("/api/sessions?server=beta&status=active")
            .await["sessions"]
            .as_array()
            .unwrap()
            .clone();
        if of_beta
            .iter()
            .any(|s| s["id"].as_str().unwrap().starts_with(&sb[..8]))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!of_beta.is_empty());
    assert!(
        of_beta.iter().all(|s| s["upstream_name"] == "beta"),
        "{of_beta:?}"
    );
    assert!(
        metric(
            &gw,
            "tether_server_tool_calls_total{server=\"alpha\",outcome=\"ok\"}"
        )
        .await
            >= 2.0
    );
    assert!(
        gw.log_text()
            .contains("mcpServers.beta: \"autoApprove\" is a client setting; ignored"),
        "the client-only key is reported"
    );

    // SIGKILL: every session continues on its own server, under the same id.
    gw.kill9();
    let gw = gw.restart();
    let (a, b, w) = (at(&gw, "alpha"), at(&gw, "beta"), at(&gw, "web"));
    assert_eq!(who(&a, &sa).await, "alpha");
    assert_eq!(who(&b, &sb).await, "beta");
    assert_eq!(
        w.call_text(&sw, 4, "echo", json!({"text": "back"})).await,
        "back"
    );
    let foreign = ping(&w, &sb).await;
    assert_eq!(foreign.status, 404);
    drop(gw);
}

#[tokio::test]
async fn a_reload_adds_changes_and_removes_servers_while_the_others_sessions_go_on() {
    let dir = state_dir();
    let file = dir.path().join("mcp.json");
    write(
        &file,
        &json!({"alpha": stdio("alpha"), "beta": stdio("beta"), "delta": stdio("delta")}),
    );
    // A process: reloads are asked for with SIGHUP.
    let gw = Gateway::spawn(dir.path(), &["--servers", file.to_str().unwrap()]);
    let (a, b, d) = (at(&gw, "alpha"), at(&gw, "beta"), at(&gw, "delta"));
    let sa = a.initialize("a").await;
    let sb = b.initialize("b").await;
    let sd = d.initialize("d").await;
    let alpha_pid = a.call_text(&sa, 1, "pid", json!({})).await;
    let beta_pid: i32 = b.call_text(&sb, 1, "pid", json!({})).await.parse().unwrap();

    // An invalid file changes nothing and says exactly what is wrong.
    std::fs::write(&file, r#"{"mcpServers": {"alpha": {"command": 5}}}"#).unwrap();
    hangup(&gw);
    assert!(wait_for(Duration::from_secs(10), || gw
        .log_text()
        .contains("servers file not reloaded")));
    assert!(
        gw.log_text()
            .contains("mcpServers.alpha: \"command\" must be a program name or path"),
        "{}",
        gw.log_text()
    );
    assert_eq!(who(&b, &sb).await, "beta");

    // beta removed, gamma added, delta changed, alpha untouched.
    let mut delta = stdio("delta2");
    delta["tether"] = json!({"idle-timeout": "10m"});
    write(
        &file,
        &json!({"alpha": stdio("alpha"), "gamma": stdio("gamma"), "delta": delta}),
    );
    hangup(&gw);
    assert!(wait_for(Duration::from_secs(10), || gw
        .log_text()
        .contains("servers reloaded")));
    let listed = servers(&gw).await;
    for (name, state) in [
        ("alpha", "serving"),
        ("beta", "draining"),
        ("delta", "serving"),
        ("delta", "draining"),
        ("gamma", "serving"),
    ] {
        assert!(
            listed.contains(&(name.to_owned(), state.to_owned())),
            "{name} {state} in {listed:?}"
        );
    }
    // The untouched server's session never noticed: same upstream process.
    assert_eq!(a.call_text(&sa, 2, "pid", json!({})).await, alpha_pid);
    // The removed server keeps its session, refuses new ones.
    assert_eq!(who(&b, &sb).await, "beta");
    let refused = initialize_raw(&b, "late").await;
    assert_eq!(refused.status, 404);
    assert!(refused.body.contains("removed"), "{}", refused.body);
    // The changed server: its old session on the old upstream, new ones on the new.
    assert_eq!(who(&d, &sd).await, "delta");
    let sd2 = d.initialize("d2").await;
    assert_eq!(who(&d, &sd2).await, "delta2");
    // The added server serves.
    let g = at(&gw, "gamma");
    let sg = g.initialize("g").await;
    assert_eq!(who(&g, &sg).await, "gamma");

    // When the removed server's last session ends, it stops, and its process is gone.
    assert_eq!(b.delete(&sb).await, 200);
    let mut gone = false;
    for _ in 0..100 {
        if !servers(&gw).await.iter().any(|(n, _)| n == "beta") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "beta leaves once drained: {:?}", servers(&gw).await);
    assert!(common::wait_gone(beta_pid, Duration::from_secs(5)));
}

#[tokio::test]
async fn a_busy_server_at_its_limit_while_another_keeps_serving() {
    let dir = state_dir();
    let file = dir.path().join("mcp.json");
    let config = dir.path().join("tether.toml");
    let alice = add_key(&config, "alice", "alice@example.com");
    let bob = add_key(&config, "bob", "bob@example.com");
    let mut busy = stdio("busy");
    busy["tether"] = json!({"max-sessions": 2, "max-upstreams": 2});
    let mut calm = stdio("calm");
    calm["tether"] = json!({"users": ["alice"]});
    write(&file, &json!({"busy": busy, "calm": calm}));
    let gw = Gateway::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--servers",
            file.to_str().unwrap(),
            "--max-sessions",
            "4",
            "--max-sessions-per-principal",
            "4",
        ],
    );
    let busy = with_key(&at(&gw, "busy"), &bob);
    let calm = with_key(&at(&gw, "calm"), &alice);
    let s1 = busy.initialize("b1").await;
    let _s2 = busy.initialize("b2").await;
    let full = initialize_raw(&busy, "b3").await;
    assert_eq!(full.status, 503, "{}", full.body);
    let err = &full.json()["error"];
    assert_eq!(err["data"]["limit"], "max-sessions");
    assert_eq!(err["data"]["server"], "busy");
    assert!(full.headers.contains_key("retry-after"));

    // The other server is not starved, and the busy one's sessions are unharmed.
    let c1 = calm.initialize("c1").await;
    assert_eq!(who(&calm, &c1).await, "calm");
    assert_eq!(who(&busy, &s1).await, "busy");
    let c2 = calm.initialize("c2").await;
    assert_eq!(who(&calm, &c2).await, "calm");
    // Now the gateway's own limit (4) is reached: a refusal that names no server.
    let gw_full = initialize_raw(&calm, "c3").await;
    assert_eq!(gw_full.status, 503);
    assert_eq!(gw_full.json()["error"]["data"]["limit"], "max-sessions");
    assert!(gw_full.json()["error"]["data"].get("server").is_none());

    // Only the users a server names may use it.
    let denied = with_key(&at(&gw, "calm"), &bob)
        .post(
            None,
            &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}),
        )
        .await;
    assert_eq!(denied.status, 403);
    let message = denied.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("user \"bob\" may not use server \"calm\""),
        "{message}"
    );

    let limits = gw.admin_json("/api/servers").await;
    let busy_view = limits["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "busy")
        .unwrap()
        .clone();
    assert_eq!(busy_view["limits"]["max_sessions"], 2);
    assert_eq!(busy_view["held_sessions"], 2);
}

#[tokio::test]
async fn import_gives_the_gateway_its_servers_and_the_client_its_new_config() {
    let dir = state_dir();
    let client_file = dir.path().join("claude_desktop_config.json");
    let mut files = stdio("files");
    files["autoApprove"] = json!(["getenv"]);
    std::fs::write(
        &client_file,
        json!({"mcpServers": {"files": files, "off": {"command": "x", "disabled": true}},
               "globalShortcut": "Ctrl+Space"})
        .to_string(),
    )
    .unwrap();
    let out = dir.path().join("tether-servers.json");
    let run = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .arg("import")
            .arg(&client_file)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&["--via", "url"]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(stderr.contains("tether serve --servers"), "{stderr}");
    assert!(
        stderr.contains("\"autoApprove\" is a client setting"),
        "{stderr}"
    );
    let after: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(after["globalShortcut"], "Ctrl+Space");
    assert_eq!(after["mcpServers"]["off"]["disabled"], true);
    assert_eq!(
        after["mcpServers"]["files"]["autoApprove"],
        json!(["getenv"])
    );
    let url = after["mcpServers"]["files"]["url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(url, "http://127.0.0.1:7450/servers/files/mcp");
    // An existing servers file is never replaced by accident.
    let again = run(&[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    // The gateway serves what import wrote, at the URL the client's new config names.
    let gw = Gateway::start(dir.path(), &["--servers", out.to_str().unwrap()]);
    let url = url.replace("127.0.0.1:7450", &gw.addr);
    assert_eq!(
        rmcp_call(&url, "getenv", json!({"name": "WHO"})).await,
        "files"
    );

    // `tether connect --server` reaches the same server from the gateway's address.
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args([
        "connect",
        &format!("http://{}", gw.addr),
        "--server",
        "files",
    ])
    .stderr(std::process::Stdio::null());
    let bridge = common::stdio_client(cmd).await;
    let r = bridge
        .call_tool(
            CallToolRequestParams::new("getenv")
                .with_arguments(json!({"name": "WHO"}).as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    assert_eq!(r.content[0].as_text().unwrap().text, "files");
    bridge.cancel().await.unwrap();

    // The CLI shows the servers and filters sessions by server.
    let admin = ["--admin", gw.admin.as_str()];
    let out = std::process::Command::new(BIN)
        .arg("servers")
        .args(admin)
        .env("TETHER_STATE_DIR", dir.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("files")
            && table.contains("serving")
            && table.contains("/servers/files/mcp"),
        "{table}"
    );
    let mut listed = String::new();
    for _ in 0..100 {
        let out = std::process::Command::new(BIN)
            .args([
                "sessions", "list", "--status", "all", "--server", "files", "--json",
            ])
            .args(admin)
            .env("TETHER_STATE_DIR", dir.path())
            .output()
            .unwrap();
        listed = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Value = serde_json::from_str(&listed).unwrap_or(Value::Null);
        if v["sessions"].as_array().is_some_and(|s| s.len() >= 2) {
            assert!(
                v["sessions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|s| s["upstream_name"] == "files")
            );
            let none = std::process::Command::new(BIN)
                .args([
                    "sessions", "list", "--status", "all", "--server", "other", "--json",
                ])
                .args(admin)
                .env("TETHER_STATE_DIR", dir.path())
                .output()
                .unwrap();
            let v: Value = serde_json::from_slice(&none.stdout).unwrap();
            assert!(v["sessions"].as_array().unwrap().is_empty());
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the ledger lists both sessions of files: {listed}");
}

/// Each server expires its own sessions on its own idle timeout: held ones, and after a
/// SIGKILL the ones only the store knows (the reaper of one server never closes another's).
#[tokio::test]
async fn each_server_expires_idle_sessions_on_its_own_timeout() {
    let dir = state_dir();
    let file = dir.path().join("mcp.json");
    let mut quick = stdio("quick");
    quick["tether"] = json!({"idle-timeout": "1s"});
    write(&file, &json!({"quick": quick, "slow": stdio("slow")}));
    let args = ["--servers", file.to_str().unwrap(), "--idle-timeout", "1h"];
    let mut gw = Gateway::spawn(dir.path(), &args);
    let (q, s) = (at(&gw, "quick"), at(&gw, "slow"));
    let held_q = q.initialize("q").await;
    let held_s = s.initialize("s").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let gone = ping(&q, &held_q).await;
    assert_eq!(
        gone.status, 404,
        "quick's idle session expired: {}",
        gone.body
    );
    assert_eq!(who(&s, &held_s).await, "slow");

    // Only in the store: created, then the gateway killed before its reaper ran.
    let stored_q = q.initialize("q2").await;
    let stored_s = s.initialize("s2").await;
    gw.kill9();
    let gw = gw.restart();
    let (q, s) = (at(&gw, "quick"), at(&gw, "slow"));
    let closed = wait_for(Duration::from_secs(10), || {
        gw.log_text()
            .contains(&format!("session.id={}", &stored_q[..8]))
            && gw.log_text().contains("reason=\"timeout\"")
    });
    assert!(
        closed,
        "quick's stored session expired by its reaper: {}",
        gw.log_text()
    );
    let gone = ping(&q, &stored_q).await;
    assert_eq!(gone.status, 404);
    assert_eq!(
        who(&s, &stored_s).await,
        "slow",
        "slow's survives quick's reaper"
    );
}

/// The same servers as `[servers.NAME]` tables of the TOML config file, reloaded when the
/// file changes.
#[tokio::test]
async fn servers_from_the_toml_config_are_served_and_reloaded() {
    let dir = state_dir();
    let config = dir.path().join("tether.toml");
    let table = |names: &[&str]| {
        let mut out = String::new();
        for n in names {
            out.push_str(&format!(
                "[servers.{n}]\ncommand = {BIN:?}\nargs = [\"demo-server\"]\nenv = {{ WHO = \"{n}\" }}\ntether = {{ max-sessions = 3 }}\n"
            ));
        }
        out
    };
    std::fs::write(&config, table(&["red"])).unwrap();
    let gw = Gateway::spawn(dir.path(), &["--config", config.to_str().unwrap()]);
    let red = at(&gw, "red");
    let sr = red.initialize("r").await;
    assert_eq!(who(&red, &sr).await, "red");
    // One server: /mcp serves it too.
    let root = gw.client();
    let s0 = root.initialize("root").await;
    assert_eq!(who(&root, &s0).await, "red");

    // Editing the file is enough (no signal): blue comes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&config, table(&["red", "blue"])).unwrap();
    let mut served = Vec::new();
    for _ in 0..100 {
        served = servers(&gw).await;
        if served.iter().any(|(n, _)| n == "blue") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served.contains(&("blue".to_owned(), "serving".to_owned())),
        "{served:?}"
    );
    let blue = at(&gw, "blue");
    let sb = blue.initialize("b").await;
    assert_eq!(who(&blue, &sb).await, "blue");
    // red never noticed, and the session begun at /mcp still reaches it there,
    assert_eq!(who(&red, &sr).await, "red");
    assert_eq!(who(&root, &s0).await, "red");
    // also after a SIGKILL, when no server holds it (its record names its server).
    let mut gw = gw;
    gw.kill9();
    let gw = gw.restart();
    let root = gw.client();
    assert_eq!(who(&root, &s0).await, "red");
    assert_eq!(who(&at(&gw, "blue"), &sb).await, "blue");
    let unknown = ping(&root, "0000000000000000000000000000000000000000").await;
    assert_eq!(unknown.status, 404);
}

/// A gateway with one upstream has nothing to reload: SIGHUP (`systemctl reload`) is
/// logged, not fatal.
#[tokio::test]
async fn sighup_without_servers_is_not_fatal() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("hup").await;
    hangup(&gw);
    assert!(wait_for(Duration::from_secs(10), || gw
        .log_text()
        .contains("SIGHUP: nothing to reload")));
    assert!(gw.alive());
    assert_eq!(
        mcp.call_text(&sid, 1, "echo", json!({"text": "still"}))
            .await,
        "still"
    );
}
