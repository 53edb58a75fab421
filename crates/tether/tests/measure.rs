//! Per-call latency through the gateway beside the same upstream called directly, in one
//! run. Not a pass/fail test (no timing assertions): it prints a table for BENCHMARKS.md.
//!
//! `cargo test --release -p tether --test measure -- --ignored --nocapture`
//! (`TETHER_MEASURE_CALLS` sets calls per row, default 2000).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Gateway, Mcp, state_dir};
use serde_json::json;

struct Row {
    name: &'static str,
    lat: Vec<Duration>,
}

async fn run(mcp: &Mcp, calls: usize) -> Vec<Duration> {
    let sid = mcp.initialize("measure").await;
    for i in 0..50 {
        mcp.call_text(&sid, i, "echo", json!({"text": "warm"}))
            .await;
    }
    let mut lat = Vec::with_capacity(calls);
    for i in 0..calls {
        let t = Instant::now();
        mcp.call_text(&sid, 1000 + i as i64, "echo", json!({"text": "hello"}))
            .await;
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

fn pct(lat: &[Duration], p: f64) -> f64 {
    let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
    lat[i].as_secs_f64() * 1e6
}

#[tokio::test]
#[ignore = "measurement, run explicitly"]
async fn per_call_latency_direct_vs_gateway() {
    let calls: usize = std::env::var("TETHER_MEASURE_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut upstream = Command::new(BIN)
        .args(["demo-server", "--http", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(upstream.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let up_url = line
        .trim()
        .strip_prefix("demo-server: listening on ")
        .unwrap()
        .to_owned();

    let dir_http = state_dir();
    let gw_http = Gateway::start(
        dir_http.path(),
        &["--upstream-url", &up_url, "--log", "warn"],
    );
    let dir_stdio = state_dir();
    let gw_stdio = Gateway::start(dir_stdio.path(), &["--demo", "--log", "warn"]);

    let rows = vec![
        Row {
            name: "direct to upstream (HTTP, rmcp demo server)",
            lat: run(&Mcp::new(&up_url), calls).await,
        },
        Row {
            name: "tether -> same HTTP upstream",
            lat: run(&gw_http.client(), calls).await,
        },
        Row {
            name: "tether -> stdio demo upstream",
            lat: run(&gw_stdio.client(), calls).await,
        },
    ];
    println!("\n{calls} sequential tools/call echo per row, one client, loopback");
    println!("| path | mean us | p50 us | p99 us | calls/s |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let mean = r.lat.iter().map(Duration::as_secs_f64).sum::<f64>() / r.lat.len() as f64;
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.name,
            mean * 1e6,
            pct(&r.lat, 0.5),
            pct(&r.lat, 0.99),
            1.0 / mean
        );
    }
    let _ = upstream.kill();
    let _ = upstream.wait();
}
