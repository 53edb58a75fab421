//! The command line: help lists every option, and bad options or a bad config file exit
//! with a clear message and a non-zero code before anything binds.

mod common;

use std::process::Command;

use common::{BIN, state_dir};

/// Every flag of `tether serve`: the rows of the two option tables.
fn options() -> Vec<String> {
    use tether_core::config::{LIMITS, OPTIONS};
    OPTIONS
        .iter()
        .chain(LIMITS)
        .map(|o| format!("--{}", o.key))
        .collect()
}

#[test]
fn help_describes_every_option() {
    let top = Command::new(BIN).arg("--help").output().unwrap();
    assert!(top.status.success());
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(text.contains("serve"), "{text}");
    let serve = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(serve.status.success());
    let text = String::from_utf8_lossy(&serve.stdout);
    for opt in options() {
        assert!(text.contains(&opt), "serve --help lists {opt}:\n{text}");
    }
    for env in ["TETHER_LISTEN", "TETHER_STATE_DIR", "TETHER_IDLE_TIMEOUT"] {
        assert!(text.contains(env), "serve --help names {env}");
    }
}

#[test]
fn readme_config_reference_lists_every_option() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    for opt in options() {
        assert!(readme.contains(&opt), "README documents {opt}");
    }
}

fn run_serve(args: &[&str]) -> (i32, String, String) {
    let dir = state_dir();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--state-dir")
        .arg(dir.path())
        .args(args)
        .env_remove("TETHER_LISTEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_options_fail_before_binding() {
    for (args, needle) in [
        (vec!["--demo", "--idle-timeout", "soon"], "idle-timeout"),
        (vec!["--demo", "--listen", "not-an-address"], "listen"),
        (vec!["--demo", "--max-body", "lots"], "max-body"),
        (
            vec!["--demo", "--upstream-url", "ftp://x/mcp"],
            "exactly one",
        ),
        (vec!["--upstream-url", "ftp://x/mcp"], "upstream-url"),
        (vec![], "none given"),
        (vec!["--no-such-flag"], "--no-such-flag"),
    ] {
        let (code, stdout, stderr) = run_serve(&args);
        assert_ne!(code, 0, "{args:?} must fail");
        assert!(!stdout.contains("listening"), "{args:?} bound nothing");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr mentions {needle}: {stderr}"
        );
    }
}

#[test]
fn bad_config_file_fails_with_every_problem() {
    let dir = state_dir();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "listen = \"nowhere\"\nkeepalive = \"never\"\n").unwrap();
    let (code, stdout, stderr) = run_serve(&["--config", path.to_str().unwrap(), "--demo"]);
    assert_eq!(code, 2);
    assert!(!stdout.contains("listening"));
    assert!(
        stderr.contains("listen") && stderr.contains("keepalive"),
        "{stderr}"
    );

    std::fs::write(&path, "listne = \"127.0.0.1:1\"\n").unwrap();
    let (code, _, stderr) = run_serve(&["--config", path.to_str().unwrap(), "--demo"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown field"), "{stderr}");

    let (code, _, stderr) = run_serve(&["--config", "/nonexistent/tether.toml", "--demo"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read config file"), "{stderr}");

    // A syntax error (with its line and column) and bad flags, in one run.
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\nidle-timeout = \n").unwrap();
    let (code, stdout, stderr) = run_serve(&[
        "--config",
        path.to_str().unwrap(),
        "--keepalive",
        "nope",
        "--max-body",
        "lots",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(!stdout.contains("listening"));
    for needle in ["line 2, column 16", "keepalive", "max-body"] {
        assert!(stderr.contains(needle), "{needle} in {stderr}");
    }
    assert!(
        !stderr.contains("none given"),
        "no upstream complaint the file might have answered: {stderr}"
    );
}

#[tokio::test]
async fn boolean_variables_accept_1_and_admin_urls_need_no_scheme() {
    let dir = state_dir();
    // TETHER_DEMO=1 (not only "true") chooses the demo upstream.
    let gw = common::Gateway::start_env(dir.path(), &[], &[("TETHER_DEMO", "1")]);
    let sid = gw.client().initialize("env-demo").await;
    assert!(!sid.is_empty());
    let bare = gw.admin.trim_start_matches("http://").to_owned();
    let out = Command::new(BIN)
        .args([
            "sessions",
            "list",
            "--json",
            "--admin",
            &bare,
            "--state-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&sid), "{stdout}");
}

#[test]
fn keys_list_and_revoke_edit_the_config_file() {
    let dir = state_dir();
    let path = dir.path().join("tether.toml");
    std::fs::write(&path, "# my gateway\nlisten = \"127.0.0.1:7450\"\n").unwrap();
    let add = |user: &str| {
        let out = Command::new(BIN)
            .args([
                "keys",
                "add",
                "--user",
                user,
                "--email",
                &format!("{user}@example.com"),
            ])
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    add("alice");
    add("bob");
    add("alice");
    let list = |json: bool| {
        let mut cmd = Command::new(BIN);
        cmd.args(["keys", "list", "--config"]).arg(&path);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rows: serde_json::Value = serde_json::from_str(&list(true)).unwrap();
    let users: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice", "bob", "alice"]);
    assert!(list(false).contains("bob@example.com"));
    let bob_hash = rows[1]["hash_prefix"].as_str().unwrap().to_owned();

    let revoke = |args: &[&str]| {
        Command::new(BIN)
            .args(["keys", "revoke", "--config"])
            .arg(&path)
            .args(args)
            .output()
            .unwrap()
    };
    let out = revoke(&["--hash", &bob_hash]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = revoke(&["--user", "alice"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked 2"));
    assert!(!revoke(&["--user", "nobody"]).status.success());
    assert_eq!(revoke(&["--hash", "ab"]).status.code(), Some(2));
    assert!(list(false).contains("no keys"));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("# my gateway"), "comments kept: {text}");
    // The file still configures a gateway.
    let layer = tether_core::config::Layer::from_file(&path).unwrap();
    assert!(layer.keys.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn check_says_what_answers_at_a_url_that_is_not_mcp() {
    let dir = state_dir();
    let gw = common::Gateway::start(dir.path(), &["--demo"]);
    for (url, needle) in [
        (format!("{}/", gw.admin), "admin listener"),
        (
            format!("http://{}/sse", gw.addr),
            "2024-11-05 HTTP+SSE endpoint",
        ),
        (format!("https://{}/mcp", gw.addr), "answered in plain HTTP"),
    ] {
        let out = Command::new(BIN).args(["check", &url]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{url}: {stdout}");
        assert!(stdout.contains(needle), "{url}: {needle:?} in {stdout}");
    }
    let out = Command::new(BIN)
        .args(["check", &format!("{}/", gw.admin)])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&gw.url),
        "names the MCP endpoint"
    );
}

#[test]
fn unwritable_state_dir_is_a_clear_error() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--demo",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            "/proc/tether-cannot-be-here",
        ])
        .output()
        .unwrap();
    let (code, stdout, stderr) = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_ne!(code, 0);
    assert!(!stdout.contains("listening"));
    assert!(stderr.contains("cannot open the session store"), "{stderr}");
}

/// `tether bench` drives a gateway over HTTP and a stdio server directly, and reports what
/// it measured as JSON (numbers are not judged here: no timing assertions in tests).
#[tokio::test]
async fn bench_loads_a_gateway_and_a_stdio_server() {
    let dir = common::state_dir();
    let gw = common::Gateway::spawn(dir.path(), &["--demo"]);
    let run = |args: Vec<String>| {
        let out = std::process::Command::new(common::BIN)
            .arg("bench")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bench {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let common_args = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "--sessions",
            "2",
            "--in-flight",
            "2",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let pid = gw.pid().to_string();
    let http = run(common_args(&[&gw.url, "--watch-pid", &pid]));
    assert!(http["ok"].as_f64().unwrap() > 0.0, "{http}");
    assert_eq!(
        http["outcomes"].as_object().unwrap().len(),
        1,
        "only ok: {http}"
    );
    assert!(http["latency_us"]["p50"].as_f64().unwrap() > 0.0);
    assert!(
        http["watched"]["peak_rss_kib"].as_u64().unwrap() > 0,
        "{http}"
    );
    let stdio = run(common_args(&["--stdio", "--", common::BIN, "demo-server"]));
    assert!(stdio["ok"].as_f64().unwrap() > 0.0, "{stdio}");
    // The benchmarks' floor relays real calls (ids matched back) with no errors.
    let mut floor_cmd = std::process::Command::new(common::BIN);
    floor_cmd.args([
        "__floor",
        "--listen",
        "127.0.0.1:0",
        "--",
        common::BIN,
        "demo-server",
    ]);
    let (mut floor, floor_url) =
        common::spawn_announced(floor_cmd, "tether __floor: listening on ");
    let relayed = run(common_args(&[&floor_url]));
    // SIGTERM: the floor drops its sessions, and their children with them.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(floor.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(floor.wait().unwrap().success());
    assert!(relayed["ok"].as_f64().unwrap() > 0.0, "{relayed}");
    assert_eq!(
        relayed["outcomes"].as_object().unwrap().len(),
        1,
        "only ok: {relayed}"
    );
    // Errors are counted by kind, not hidden: an unknown tool is a JSON-RPC error.
    let bad = std::process::Command::new(common::BIN)
        .args([
            "bench",
            &gw.url,
            "--duration",
            "300ms",
            "--warmup",
            "0s",
            "--json",
            "--tool",
            "nope",
        ])
        .output()
        .unwrap();
    let bad: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert!(
        bad["outcomes"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("rpc_") || k == "tool_error"),
        "{bad}"
    );
}

#[tokio::test]
async fn json_logs_carry_span_fields_and_upstream_stderr_is_prefixed() {
    let dir = state_dir();
    let gw = common::Gateway::start(dir.path(), &["--demo", "--log-format", "json"]);
    let mcp = gw.client();
    let sid = mcp.initialize("json-logs").await;
    // The demo's `stderr` tool writes to its stderr (debug in the harness's filter).
    mcp.call(&sid, 1, "stderr", serde_json::json!({"bytes": 10}))
        .await;
    // It writes no newline: the line is logged when the upstream's stderr closes.
    assert_eq!(mcp.delete(&sid).await, 200);
    let mut found = false;
    for _ in 0..50 {
        found = gw.log_text().contains("tether_core::upstream::stderr");
        if found {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(found, "{}", gw.log_text());
    let lines: Vec<serde_json::Value> = gw
        .log_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let ready = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("tether ready"))
        })
        .expect("ready line");
    for field in ["auth", "store", "ledger", "upstream", "upstream.name"] {
        assert!(ready["fields"][field].is_string(), "{field} in {ready}");
    }
    assert!(ready["fields"]["auth"].as_str().unwrap().starts_with("off"));
    let created = lines
        .iter()
        .find(|l| l["fields"]["message"] == "session created")
        .expect("session created");
    let spans = created["spans"].as_array().unwrap();
    let session = spans.iter().find(|s| s["name"] == "session").unwrap();
    // Issue 26: a full session id is a credential; logs carry its prefix.
    assert_eq!(session["session.id"], &sid[..8], "{created}");
    // The request that created it: the front door's span, outermost.
    assert_eq!(spans[0]["name"], "mcp.http", "{created}");
    assert_eq!(spans[0]["client.address"], "127.0.0.1", "{created}");
    assert_eq!(spans[0]["mcp.method"], "initialize", "{created}");

    // A refused request's one log line names where it came from and what it asked.
    let bogus = "0123456789abcdef0123456789abcdef01234567";
    let a = mcp
        .post(
            Some(bogus),
            &serde_json::json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"}),
        )
        .await;
    assert_eq!(a.status, 404);
    let refused: serde_json::Value = gw
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("request refused: Session not found"))
        })
        .expect("a refused request is logged");
    let front = &refused["spans"][0];
    assert_eq!(front["name"], "mcp.http", "{refused}");
    assert_eq!(front["http.method"], "POST", "{refused}");
    assert_eq!(front["http.route"], "post", "{refused}");
    assert_eq!(front["client.address"], "127.0.0.1", "{refused}");
    assert_eq!(front["session.id"], &bogus[..8], "{refused}");
    assert_eq!(front["mcp.method"], "tools/list", "{refused}");
    let stderr = lines
        .iter()
        .find(|l| l["target"] == "tether_core::upstream::stderr")
        .unwrap();
    assert_eq!(stderr["level"], "DEBUG", "{stderr}");
    let span = &stderr["spans"][0];
    assert_eq!(span["upstream.name"], "demo", "{stderr}");
    assert_eq!(span["session"], &sid[..8], "one short session id: {stderr}");
    assert_eq!(stderr["spans"].as_array().unwrap().len(), 1, "{stderr}");
}
