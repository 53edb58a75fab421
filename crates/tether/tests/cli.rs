//! The command line: help lists every option, and bad options or a bad config file exit
//! with a clear message and a non-zero code before anything binds.

mod common;

use std::process::Command;

use common::{BIN, state_dir};

const OPTIONS: &[&str] = &[
    "--config",
    "--listen",
    "--state-dir",
    "--idle-timeout",
    "--keepalive",
    "--max-body",
    "--upstream-timeout",
    "--shutdown-grace",
    "--allowed-origins",
    "--allowed-hosts",
    "--upstream-url",
    "--demo",
    "--admin-listen",
    "--admin-token",
    "--retention",
    "--max-sessions",
    "--header-timeout",
    "--body-timeout",
    "--write-timeout",
    "--max-connections",
    "--max-connections-per-addr",
    "--admin-max-connections",
    "--max-sessions-per-principal",
    "--max-upstreams",
    "--session-rate",
    "--session-burst",
    "--max-upstream-message",
    "--stream-buffer",
    "--max-stream-events",
    "--stderr-lines-per-sec",
    "--circuit-failures",
    "--circuit-cooldown",
    "--upstream-inherit-env",
    "--upstream-pass-env",
    "--admin-token-file",
];

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
    for opt in OPTIONS {
        assert!(text.contains(opt), "serve --help lists {opt}:\n{text}");
    }
    for env in ["TETHER_LISTEN", "TETHER_STATE_DIR", "TETHER_IDLE_TIMEOUT"] {
        assert!(text.contains(env), "serve --help names {env}");
    }
}

#[test]
fn readme_config_reference_lists_every_option() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    for opt in OPTIONS {
        assert!(readme.contains(opt), "README documents {opt}");
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
    let gw = common::Gateway::start(dir.path(), &["--demo"]);
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
