//! The figures operators read agree with what clients met: every tool call is in the
//! ledger and the metrics with its real outcome (refusals during backoff and calls a crash
//! interrupted included), the session gauges agree with `/health` after a restart, and a
//! command that cannot start is said at start-up.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{BIN, Gateway, state_dir};
use serde_json::{Value, json};

/// The admin API's view of one session (with the token, so the id is not cut).
async fn session_detail(gw: &Gateway, sid: &str) -> Value {
    gw.admin_json(&format!("/api/sessions/{sid}")).await
}

/// Outcome → count of `tether_tool_calls_total`.
async fn metric_outcomes(gw: &Gateway) -> BTreeMap<String, u64> {
    let text = reqwest::get(format!("{}/metrics", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("tether_tool_calls_total{outcome=\""))
        .filter_map(|l| {
            let (outcome, rest) = l.split_once('"')?;
            let n = rest.rsplit_once(' ')?.1.parse::<f64>().ok()?;
            Some((outcome.to_owned(), n as u64))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Outcome → count of a session's calls in the ledger, once it holds `total` of them (the
/// ledger writes in batches, off the request path).
async fn ledger_outcomes(gw: &Gateway, sid: &str, total: usize) -> BTreeMap<String, u64> {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = session_detail(gw, sid).await;
        let calls = last["calls"].as_array().cloned().unwrap_or_default();
        if calls.len() >= total {
            let mut by = BTreeMap::new();
            for c in calls {
                *by.entry(c["outcome"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
            return by;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the ledger never held {total} calls: {last}");
}

#[tokio::test]
async fn refusals_in_backoff_are_counted_calls_with_their_outcome() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("figures").await;
    let mut codes = Vec::new();
    let mut id = 1;
    let mut call = async |tool: &str| {
        id += 1;
        let r = mcp.call(&sid, id, tool, json!({"text": "x"})).await;
        codes.push(r.pointer("/error/code").and_then(Value::as_i64));
    };
    // The reproduction: one echo, ten crashes, three echoes.
    call("echo").await;
    for _ in 0..10 {
        call("crash").await;
    }
    for _ in 0..3 {
        call("echo").await;
    }
    assert!(
        codes.contains(&Some(-32010)),
        "quick crashes put the upstream in backoff: {codes:?}"
    );

    let ledger = ledger_outcomes(&gw, &sid, 14).await;
    assert_eq!(ledger.values().sum::<u64>(), 14, "{ledger:?}");
    assert!(ledger.contains_key("upstream_unavailable"), "{ledger:?}");
    let metrics = metric_outcomes(&gw).await;
    assert_eq!(
        metrics, ledger,
        "the metrics and the ledger count the same calls"
    );
    let errors = codes.iter().filter(|c| c.is_some()).count() as u64;
    assert_eq!(
        ledger.get("ok").copied().unwrap_or(0),
        14 - errors,
        "every answer a client got is counted as what it was: {codes:?} vs {ledger:?}"
    );
    let stats = gw.admin_json("/api/stats").await;
    // The dashboard's and the CLI's figures come from the same ledger rows.
    assert_eq!(stats["window"]["calls"], 14, "{stats}");
    assert_eq!(stats["window"]["errors"], errors, "{stats}");
}

#[tokio::test]
async fn a_call_interrupted_by_a_gateway_crash_is_recorded_as_interrupted() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("interrupted").await;
    let (stream, _open) = mcp
        .start_call(&sid, 7, "slow_write", json!({"ms": 3000}))
        .await;
    gw.kill9();

    let gw2 = gw.restart();
    let replay = gw2.client().resume(&sid, &format!("{stream}.0")).await;
    assert_eq!(
        replay.response().pointer("/error/code"),
        Some(&json!(-32013))
    );
    let ledger = ledger_outcomes(&gw2, &sid, 1).await;
    assert_eq!(ledger.get("interrupted"), Some(&1), "{ledger:?}");
    let detail = session_detail(&gw2, &sid).await;
    assert_eq!(detail["calls"][0]["tool"], "slow_write", "{detail}");
    assert_eq!(detail["session"]["tool_calls"], 1, "{detail}");
    assert_eq!(detail["session"]["errors"], 1, "{detail}");
    let metrics = metric_outcomes(&gw2).await;
    assert_eq!(metrics.get("interrupted"), Some(&1), "{metrics:?}");
}

#[tokio::test]
async fn session_gauges_agree_with_health_after_a_restart() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(mcp.initialize(&format!("gauge-{i}")).await);
    }
    assert_eq!(common::metric(&gw, "tether_sessions_held").await, 3.0);
    gw.kill9();

    let gw2 = gw.restart();
    let health = |gw: &Gateway| {
        let url = format!("{}/health", gw.admin);
        async move {
            reqwest::get(url)
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let h = health(&gw2).await;
    assert_eq!(h["live_sessions"], 3, "{h}");
    assert_eq!(h["held_sessions"], 0, "{h}");
    assert_eq!(common::metric(&gw2, "tether_sessions_live").await, 3.0);
    assert_eq!(common::metric(&gw2, "tether_sessions_held").await, 0.0);

    // One client comes back: held here now, still one of the three live.
    gw2.client()
        .call_text(&ids[0], 1, "echo", json!({"text": "back"}))
        .await;
    let h = health(&gw2).await;
    assert_eq!(
        (h["live_sessions"].as_u64(), h["held_sessions"].as_u64()),
        (Some(3), Some(1)),
        "{h}"
    );
    assert_eq!(common::metric(&gw2, "tether_sessions_live").await, 3.0);
    assert_eq!(common::metric(&gw2, "tether_sessions_held").await, 1.0);

    // A DELETE ends one: both figures follow.
    assert_eq!(gw2.client().delete(&ids[0]).await, 200);
    assert_eq!(common::metric(&gw2, "tether_sessions_live").await, 2.0);
    assert_eq!(common::metric(&gw2, "tether_sessions_held").await, 0.0);
}

#[tokio::test]
async fn a_command_that_cannot_start_is_said_at_start_up() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--", "/no/such/binary", "--flag"]);
    let log = gw.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("upstream cannot be started"))
        .unwrap_or_else(|| panic!("a start-up warning: {log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("/no/such/binary"), "{warning}");
    let ready = reqwest::get(format!("{}/health/ready", gw.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "readiness says the same");
    drop(gw);

    // Run to exit with --require-upstream, or with TETHER_REQUIRE_UPSTREAM=1 (boolean
    // variables take 1 as the flag).
    let dir = state_dir();
    let serve = |flag: bool| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(dir.path());
        if flag {
            cmd.arg("--require-upstream");
        } else {
            cmd.env("TETHER_REQUIRE_UPSTREAM", "1");
        }
        cmd.args(["--", "/no/such/binary"]).output().unwrap()
    };
    for flag in [true, false] {
        let out = serve(flag);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("cannot be started") && stderr.contains("/no/such/binary"),
            "{stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "never reported ready"
        );
    }
}

#[tokio::test]
async fn a_sessions_timeline_tells_its_life_in_order() {
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let sid = mcp.initialize("timeline").await;
    mcp.call_text(&sid, 1, "echo", json!({"text": "a"})).await;
    // The ledger is written in batches of up to 50 ms, off the request path: a SIGKILL
    // inside that window loses those records (the session itself is durable before its
    // id is sent). Wait for the batch, then kill.
    ledger_outcomes(&gw, &sid, 1).await;
    gw.kill9();
    let gw2 = gw.restart();
    let mcp = gw2.client();
    mcp.call_text(&sid, 2, "echo", json!({"text": "b"})).await;
    assert_eq!(mcp.delete(&sid).await, 200);
    let mut kinds: Vec<String> = Vec::new();
    for _ in 0..100 {
        let detail = session_detail(&gw2, &sid).await;
        kinds = detail["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect();
        if kinds.last().map(String::as_str) == Some("closed") && kinds.len() >= 6 {
            let calls: Vec<&Value> = detail["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["kind"] == "tool_call")
                .collect();
            assert!(
                calls
                    .iter()
                    .all(|c| c["tool"] == "echo" && c["outcome"] == "ok")
            );
            assert!(
                !detail.to_string().contains("\"text\""),
                "never arguments or results: {detail}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        kinds,
        [
            "created",
            "tool_call",
            "rehydrated",
            "upstream_restarted",
            "tool_call",
            "closed"
        ],
        "in time order"
    );
}
