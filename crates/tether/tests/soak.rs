//! Soak: many calls plus many session create / expire / delete cycles against one gateway,
//! sampling its memory, open files and upstream processes. Asserts what must not leak
//! (file descriptors, child processes, orphans); reports memory.
//!
//! CI runs a short version. The long one (issue 5: 30 minutes, at least 1,000,000 calls and
//! 10,000 session cycles):
//! `TETHER_SOAK_SECS=1800 TETHER_SOAK_CYCLES=10000 TETHER_SOAK_IDLE=1s cargo test --release -p tether --test soak -- --nocapture`

mod common;

use std::time::{Duration, Instant};

use common::{BIN, Gateway, rss_kib, state_dir};
use serde_json::{Value, json};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Open file descriptors of a process.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn marked_processes(marker: &str) -> usize {
    common::marked_processes(&format!("TETHER_SOAK_MARK={marker}"))
}

struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    upstreams: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_calls_and_session_cycles_leak_nothing() {
    let secs = env_num("TETHER_SOAK_SECS", 15);
    let cycles = env_num("TETHER_SOAK_CYCLES", 300);
    // The long run uses 1s to put expiry right beside the load (see BENCHMARKS.md, soak).
    let idle = std::env::var("TETHER_SOAK_IDLE").unwrap_or_else(|_| "3s".into());
    let marker = format!("{}-{}", std::process::id(), common::unique("soak"));
    let dir = state_dir();
    let gw = Gateway::spawn(
        dir.path(),
        &[
            // Short enough to expire thousands of sessions, long enough that a loaded CI
            // machine's stalls do not look like idleness (see BENCHMARKS.md, soak).
            "--idle-timeout",
            &idle,
            "--log",
            "warn",
            "--",
            "env",
            &format!("TETHER_SOAK_MARK={marker}"),
            BIN,
            "demo-server",
        ],
    );
    let pid = gw.pid();
    let mcp = gw.client();
    let started = Instant::now();
    let sample = |upstreams| Sample {
        at: started.elapsed(),
        rss_kib: rss_kib(pid),
        fds: fds(pid),
        upstreams,
    };

    // Warm-up: a few sessions and calls, then everything closed, as the baseline.
    for i in 0..5 {
        let sid = mcp.initialize("warm").await;
        mcp.call_text(&sid, i, "echo", json!({"text": "w"})).await;
        assert_eq!(mcp.delete(&sid).await, 200);
    }
    let baseline = sample(marked_processes(&marker));
    let mut samples = vec![];

    // Session cycles: half deleted by the client, half left to expire.
    let mut expiring = Vec::new();
    for i in 0..cycles {
        let sid = mcp.initialize("cycle").await;
        mcp.call_text(&sid, 1, "echo", json!({"text": "c"})).await;
        if i % 2 == 0 {
            assert_eq!(mcp.delete(&sid).await, 200);
        } else {
            expiring.push(sid);
        }
        if i % 100 == 99 {
            samples.push(sample(marked_processes(&marker)));
        }
    }

    // Calls: 16 sessions in parallel through `tether bench` for the soak duration.
    let sampler = {
        let marker = marker.clone();
        let every = Duration::from_secs((secs / 10).max(1));
        tokio::spawn(async move {
            let mut taken = Vec::new();
            loop {
                tokio::time::sleep(every).await;
                taken.push(Sample {
                    at: started.elapsed(),
                    rss_kib: rss_kib(pid),
                    fds: fds(pid),
                    upstreams: marked_processes(&marker),
                });
                if taken.len() as u64 >= 10 {
                    return taken;
                }
            }
        })
    };
    let out = tokio::process::Command::new(BIN)
        .args([
            "bench",
            &gw.url,
            "--sessions",
            "16",
            "--duration",
            &format!("{secs}s"),
            "--warmup",
            "0s",
            "--json",
        ])
        .output()
        .await
        .unwrap();
    samples.extend(sampler.await.unwrap_or_default());
    let bench: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("bench: {}", String::from_utf8_lossy(&out.stderr)));
    let calls = bench["ok"].as_f64().unwrap_or(0.0) as u64;
    let errors: u64 = bench["outcomes"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "ok")
        .map(|(_, v)| v.as_u64().unwrap_or(0))
        .sum();
    samples.push(sample(marked_processes(&marker)));

    println!("soak: bench {bench}");
    println!("\nsoak: {cycles} session cycles, {calls} calls in {secs}s ({errors} errors)");
    println!("| t s | RSS KiB | open fds | upstream processes |");
    println!("|---|---|---|---|");
    let row = |s: &Sample| {
        println!(
            "| {:.1} | {} | {} | {} |",
            s.at.as_secs_f64(),
            s.rss_kib,
            s.fds,
            s.upstreams
        );
    };
    for s in std::iter::once(&baseline).chain(samples.iter()) {
        row(s);
    }

    // Everything idle now: the bench's sessions and the expiring ones time out.
    let deadline = Instant::now() + Duration::from_secs(30);
    while marked_processes(&marker) > 0 {
        if Instant::now() >= deadline {
            let held = reqwest::get(format!("{}/api/sessions?limit=50", gw.admin))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            panic!(
                "{} upstream processes still running 30s after the load stopped; sessions: \
                 {held}\ngateway log:\n{}",
                marked_processes(&marker),
                gw.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for sid in &expiring[..expiring.len().min(20)] {
        let a = mcp
            .post(
                Some(sid),
                &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
            )
            .await;
        assert_eq!(a.status, 404, "an expired session is gone");
    }
    let end = sample(0);
    row(&end);
    assert_eq!(errors, 0, "every call succeeded: {bench}");
    // Pooled connections and SQLite files may add a few descriptors; a leak adds one per
    // session or call.
    assert!(
        end.fds <= baseline.fds + 16,
        "file descriptors grew from {} to {}",
        baseline.fds,
        end.fds
    );
    drop(gw);
    // No orphans once the gateway is gone either.
    let deadline = Instant::now() + Duration::from_secs(5);
    while marked_processes(&marker) > 0 {
        assert!(Instant::now() < deadline, "orphaned upstream processes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
