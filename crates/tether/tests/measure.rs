//! Per-call latency through the gateway beside the same upstream called directly, in one
//! run. Not a pass/fail test (no timing assertions): it prints a table for BENCHMARKS.md.
//!
//! `cargo test --release -p tether --test measure -- --ignored --nocapture`
//! (`TETHER_MEASURE_CALLS` sets calls per row, default 2000). With `TETHER_TEST_REDIS_URL`
//! set it adds the Redis live store and the forwarding hop between two instances (own key
//! prefix, deleted afterwards).

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, Mcp, http_upstream, rss_kib, state_dir};
use serde_json::json;

struct Row {
    name: &'static str,
    lat: Vec<Duration>,
}

async fn run(mcp: &Mcp, calls: usize) -> Vec<Duration> {
    let sid = mcp.initialize("measure").await;
    run_in(mcp, &sid, calls).await
}

/// Calls `echo` in an existing session (which may have been created on another instance).
async fn run_in(mcp: &Mcp, sid: &str, calls: usize) -> Vec<Duration> {
    let sid = sid.to_owned();
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
    let (mut upstream, up_url) = http_upstream("127.0.0.1:0");

    let dir_http = state_dir();
    let gw_http = Gateway::start(
        dir_http.path(),
        &["--upstream-url", &up_url, "--log", "warn"],
    );
    let dir_stdio = state_dir();
    let gw_stdio = Gateway::start(dir_stdio.path(), &["--demo", "--log", "warn"]);

    let mut rows = vec![
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
    let redis = std::env::var("TETHER_TEST_REDIS_URL").ok();
    let prefix = format!("tether-measure:{}", std::process::id());
    let mut redis_gateways = Vec::new();
    if let Some(url) = &redis {
        let args = [
            "--demo",
            "--log",
            "warn",
            "--store",
            url.as_str(),
            "--store-prefix",
            prefix.as_str(),
        ];
        let (da, db) = (state_dir(), state_dir());
        let a = Gateway::start(da.path(), &args);
        let b = Gateway::start(db.path(), &args);
        rows.push(Row {
            name: "tether (Redis store) -> stdio demo upstream",
            lat: run(&a.client(), calls).await,
        });
        let sid = a.client().initialize("measure-forwarded").await;
        rows.push(Row {
            name: "tether B -> forwarded to owner A (Redis) -> stdio",
            lat: run_in(&b.client(), &sid, calls).await,
        });
        redis_gateways.extend([(a, da), (b, db)]);
    } else {
        eprintln!("TETHER_TEST_REDIS_URL is not set: no Redis rows");
    }
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
    drop(redis_gateways);
    if let Some(url) = redis {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
}

/// Two of issue 5's targets: startup to ready with 100,000 stored sessions, and gateway
/// memory per idle session (10,000 sessions against an HTTP upstream).
///
/// `cargo test --release -p tether --test measure startup_and_idle -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run explicitly"]
async fn startup_and_idle_session_memory() {
    use tether_core::store::LiveStore;
    let stored: usize = std::env::var("TETHER_MEASURE_STORED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let idle: usize = std::env::var("TETHER_MEASURE_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = state_dir();
    {
        let store = tether_core::store::sqlite::SqliteStore::open(dir.path()).unwrap();
        let now = tether_core::store::now_ms();
        for chunk in (0..stored).collect::<Vec<_>>().chunks(1000) {
            let acks: Vec<_> = chunk
                .iter()
                .map(|i| {
                    let r = tether_core::store::SessionRecord {
                        id: format!("{i:040x}"),
                        principal: "anonymous".into(),
                        principal_email: None,
                        principal_name: None,
                        client_type: "unknown".into(),
                        transport: "streamable-http".into(),
                        created_ms: now,
                        last_active_ms: now,
                        protocol_version: "2025-11-25".into(),
                        init_params: json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "m", "version": "1"}}),
                        client_name: Some("m".into()),
                        client_version: Some("1".into()),
                        upstream_name: "demo".into(),
                        upstream_fingerprint: None,
                        state: tether_core::store::SessionState::Live,
                        close_reason: None,
                        closed_ms: None,
                        restore: json!({}),
                    };
                    let store = &store;
                    async move { store.create_session(r).await.unwrap() }
                })
                .collect();
            futures::future::join_all(acks).await;
        }
    }
    let t = Instant::now();
    let gw = Gateway::spawn(dir.path(), &["--demo", "--log", "warn"]);
    let ready = t.elapsed();
    drop(gw);
    println!(
        "\nstartup to listening with {stored} stored live sessions: {:.1} ms (spawn of the process included)",
        ready.as_secs_f64() * 1e3
    );

    let (mut upstream, up_url) = http_upstream("127.0.0.1:0");
    let dir2 = state_dir();
    let gw = Gateway::spawn(
        dir2.path(),
        &[
            "--upstream-url",
            &up_url,
            "--log",
            "warn",
            "--idle-timeout",
            "2h",
            // Past the default session cap (1,000), which this measurement is not about.
            "--max-sessions",
            "100000",
            "--max-sessions-per-principal",
            "100000",
        ],
    );
    let mcp = gw.client();
    // Warm up allocator and connection pool before the baseline.
    for _ in 0..100 {
        mcp.initialize("warm").await;
    }
    let before = rss_kib(gw.pid());
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for _ in 0..idle {
        let (mcp, sem) = (mcp.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            mcp.initialize("idle").await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(gw.pid());
    println!(
        "gateway RSS {before} KiB -> {after} KiB with {idle} more idle sessions (HTTP upstream): {:.1} KiB per idle session",
        (after.saturating_sub(before)) as f64 / idle as f64
    );
    drop(gw);
    let _ = upstream.kill();
    let _ = upstream.wait();
}

mod tasks_cost {
    //! What a 2026-07-28 task costs beside a plain call, same gateway, same upstream,
    //! same run: `cargo test --release -p tether --test measure tasks -- --ignored
    //! --nocapture` (`TETHER_MEASURE_CALLS`, default 200: one user keeps at most 256 tasks;
    //! with `TETHER_TEST_REDIS_URL` the same on the Redis live store, own key prefix).

    use super::common::modern::Modern;
    use super::common::{Gateway, state_dir, unique};
    use super::pct;
    use serde_json::json;
    use std::time::{Duration, Instant};

    /// Plain calls, task creations, `tasks/get` polls, and create-to-result, in µs.
    async fn rows(url: &str, calls: usize) -> Vec<(&'static str, Vec<Duration>)> {
        let plain = Modern::new(url, json!({}));
        let tasks = Modern::new(
            url,
            json!({"extensions": {"io.modelcontextprotocol/tasks": {}}}),
        );
        // Warmed with plain calls only: every task is kept for its time to live, and a
        // user may keep 256 (over it a call stays a plain call).
        for i in 0..50 {
            plain.call(i, "echo", json!({"text": "warm"})).await;
        }
        let (mut p, mut c, mut g, mut whole) = (vec![], vec![], vec![], vec![]);
        for i in 0..calls as i64 {
            let t = Instant::now();
            let a = plain.call(1000 + i, "echo", json!({"text": "hello"})).await;
            p.push(t.elapsed());
            assert_eq!(a.status, 200);
            let t = Instant::now();
            let created = tasks
                .call(1000 + i, "echo", json!({"text": "hello"}))
                .await
                .json();
            c.push(t.elapsed());
            let id = created["result"]["taskId"]
                .as_str()
                .expect("a task")
                .to_owned();
            loop {
                let tg = Instant::now();
                let got = tasks
                    .send(5000 + i, "tasks/get", json!({"taskId": id}))
                    .await
                    .json();
                g.push(tg.elapsed());
                if got["result"]["status"] == "completed" {
                    break;
                }
            }
            whole.push(t.elapsed());
        }
        let mut out = vec![
            ("plain tools/call (no extension)", p),
            ("tools/call answered with CreateTaskResult", c),
            ("tasks/get", g),
            ("task: create, poll until completed", whole),
        ];
        for (_, v) in &mut out {
            v.sort();
        }
        out
    }

    fn print(label: &str, rows: &[(&'static str, Vec<Duration>)]) {
        println!("\n{label}\n| request | n | p50 µs | p99 µs |\n|---|---|---|---|");
        for (name, lat) in rows {
            println!(
                "| {name} | {} | {:.0} | {:.0} |",
                lat.len(),
                pct(lat, 0.5),
                pct(lat, 0.99)
            );
        }
    }

    #[tokio::test]
    #[ignore = "measurement, run explicitly"]
    async fn tasks_beside_plain_calls() {
        let calls: usize = std::env::var("TETHER_MEASURE_CALLS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200)
            .min(250);
        let dir = state_dir();
        let gw = Gateway::start(dir.path(), &["--demo", "--task-after", "0"]);
        print("SQLite live store", &rows(&gw.url, calls).await);
        drop(gw);
        if let Ok(redis) = std::env::var("TETHER_TEST_REDIS_URL") {
            let prefix = format!("tether-measure:{}", unique("tasks"));
            let dir = state_dir();
            let gw = Gateway::start(
                dir.path(),
                &[
                    "--store",
                    &redis,
                    "--store-prefix",
                    &prefix,
                    "--demo",
                    "--task-after",
                    "0",
                ],
            );
            print("Redis live store", &rows(&gw.url, calls).await);
        }
    }
}
