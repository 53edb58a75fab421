//! The dashboard in a real browser: headless Chromium driven by Playwright (`playwright-core`
//! from npm, Debian's `chromium`). While a client holds sessions and calls tools, the page
//! must keep its rows in place between refreshes, filter them, draw charts with axes and
//! tooltips, show per-tool and per-upstream panels, open a session's detail with its
//! timeline, evict it, page closed sessions, fit a 400 px viewport and follow dark mode.
//! Screenshots land in `target/artifacts/` (kept by CI).
//! Without Chromium or `e2e/ts/node_modules` it prints one skip line, unless
//! `TETHER_TEST_REQUIRE_BROWSER=1` (set by `.ci/run`) makes that a failure.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Gateway, state_dir};
use serde_json::{Value, json};

#[tokio::test]
async fn dashboard_shows_sessions_and_evicts_one() {
    let e2e = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../e2e/ts"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !e2e.join("node_modules/playwright-core").exists() || !Path::new(&chromium).exists() {
        assert!(
            std::env::var("TETHER_TEST_REQUIRE_BROWSER").is_err(),
            "TETHER_TEST_REQUIRE_BROWSER is set but Chromium or e2e/ts/node_modules is missing"
        );
        println!(
            "skipped: needs {chromium} and e2e/ts/node_modules (apt-get install chromium; npm ci in e2e/ts)"
        );
        return;
    }
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let mcp = gw.client();
    let target = mcp.initialize("claude-code").await;
    let other = mcp.initialize("cursor").await;
    for i in 0..5 {
        mcp.call_text(&target, i, "echo", json!({"text": "x"}))
            .await;
    }
    // Keep calling on the other session while the page is open.
    let busy = {
        let (mcp, other) = (mcp.clone(), other.clone());
        tokio::spawn(async move {
            for i in 0..200 {
                mcp.call(&other, 100 + i, "add", json!({"a": i, "b": 1}))
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // One stateless (2026-07-28) client: it has no session, the page lists it apart.
    let modern = reqwest::Client::new()
        .post(&gw.url)
        .header("content-type", "application/json")
        .header("accept", common::ACCEPT_BOTH)
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/list")
        .body(
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "modern-dash", "version": "2"},
            }}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(modern.status(), 200);
    // One task (2025-11-25, on the target session): the page lists it.
    let task = mcp
        .post(
            Some(&target),
            &json!({"jsonrpc": "2.0", "id": 90, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "t"}, "task": {"ttl": 60_000}}}),
        )
        .await;
    assert_eq!(task.status, 200, "{}", task.body);
    tokio::time::sleep(Duration::from_millis(300)).await; // let the ledger batch land

    // Kept as CI artifacts: target/artifacts/dashboard*.png.
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/artifacts");
    std::fs::create_dir_all(&shots).unwrap();
    // The link `tether dashboard` prints: the token in the fragment.
    let admin_link = format!("{}/#token={}", gw.admin, gw.admin_token());
    let (admin, sid, shot) = (gw.admin.clone(), target.clone(), shots.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(e2e.join("dashboard.mjs"))
            .args([&admin, &sid])
            .arg(&shot)
            .arg(&admin_link)
            .arg("cursor")
            .env("CHROMIUM", chromium)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    busy.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dashboard check failed:\n{stdout}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_text()
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(report["rows"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(report["stable"], true, "{report}");
    assert_eq!(report["byClient"], 1, "{report}");
    assert_eq!(report["byId"], 1, "{report}");
    assert!(report["calls"].as_u64().unwrap() >= 5, "{report}");
    assert!(
        report["detailText"]
            .as_str()
            .unwrap()
            .contains("Claude Code"),
        "{report}"
    );
    assert!(
        report["reasons"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("evicted"),
        "{report}"
    );
    assert!(report["closedRows"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["narrow"].as_u64().unwrap() <= 400, "{report}");
    assert_eq!(
        report["failed"].as_array().map(Vec::len),
        Some(0),
        "no failed requests (favicon included): {report}"
    );
    for name in [
        "dashboard.png",
        "dashboard-narrow.png",
        "dashboard-dark.png",
    ] {
        let path = shots.join(name);
        assert!(
            std::fs::metadata(&path).unwrap().len() > 10_000,
            "screenshot saved at {}",
            path.display()
        );
    }
    // The evicted client now gets the spec's 404.
    let a = mcp
        .post(
            Some(&target),
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        )
        .await;
    assert_eq!(a.status, 404);
}
