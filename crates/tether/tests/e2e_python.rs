//! End to end with the official Python SDK 2.x client (PyPI `mcp`, pinned in
//! `e2e/py/requirements.txt`) in the 2026-07-28 era, through the bridge to the legacy
//! stdio demo: pinned to 2026-07-28 and in `auto` mode (which must pick modern). Needs
//! `e2e/py/.venv` (`.ci/run` makes it); without it the test prints one skip line, unless
//! `TETHER_TEST_REQUIRE_PYTHON=1` makes that a failure.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Gateway, state_dir};

#[tokio::test]
async fn python_sdk_client_in_the_modern_era_through_the_bridge() {
    let dir_py = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../e2e/py"));
    let python = dir_py.join(".venv/bin/python");
    if !python.exists() {
        assert!(
            std::env::var("TETHER_TEST_REQUIRE_PYTHON").is_err(),
            "TETHER_TEST_REQUIRE_PYTHON is set but e2e/py/.venv is missing \
             (python3 -m venv e2e/py/.venv && e2e/py/.venv/bin/pip install -r e2e/py/requirements.txt)"
        );
        println!("skipped: e2e/py/.venv missing (see e2e/py/requirements.txt)");
        return;
    }
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    for mode in ["2026-07-28", "auto"] {
        let mut cmd = Command::new(&python);
        cmd.arg(dir_py.join("client_modern.py"))
            .args([gw.url.as_str(), mode]);
        let report = common::client_report(cmd, &format!("Python client ({mode})"), &gw).await;
        assert_eq!(report["version"], "2026-07-28", "{report}");
        assert_eq!(report["sampled"], 1);
        assert_eq!(report["elicited"], 1);
        assert_eq!(report["progress"], 3);
        assert_eq!(report["cancelled"], true);
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::metric_sum(&gw, "tether_tool_calls_total{outcome=\"cancelled\"}").await < 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cancelled calls were not recorded as cancelled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
