//! What durability costs per call: the store writes one `tools/call` makes before its
//! client sees anything (the stream record, awaited before the priming event) and before it
//! sees the answer (the response event). Measured for one lone call (two commit round trips)
//! and per call when 16 calls run at once (group commit shares each commit).
//!
//! Run for the embedded SQLite store and, when `TETHER_TEST_REDIS_URL` names a Redis server,
//! for the Redis store beside it (its own key prefix, deleted afterwards).
//!
//! `TETHER_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo bench -p tether-core --bench durability`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use tether_core::metrics::Metrics;
use tether_core::store::redis::{RedisOptions, RedisStore};
use tether_core::store::sqlite::SqliteStore;
use tether_core::store::{EventRecord, LiveStore, SessionRecord, SessionState, StreamRecord};

fn record() -> SessionRecord {
    SessionRecord {
        id: "bench".into(),
        principal: "anonymous".into(),
        created_ms: 0,
        last_active_ms: 0,
        protocol_version: "2025-11-25".into(),
        init_params: json!({"protocolVersion": "2025-11-25"}),
        client_name: None,
        client_version: None,
        upstream_name: "bench".into(),
        upstream_fingerprint: None,
        state: SessionState::Live,
        close_reason: None,
        closed_ms: None,
        restore: json!({}),
        principal_email: None,
        principal_name: None,
        client_type: "unknown".into(),
        transport: "streamable-http".into(),
    }
}

async fn one_call(store: &dyn LiveStore, n: u64) {
    let stream = format!("{n:x}");
    store
        .open_stream(StreamRecord {
            session_id: "bench".into(),
            stream_id: stream.clone(),
            client_request_id: Some(json!(n)),
            request: Some(json!({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hello"}}})),
            retryable: true,
            done: false,
            last_seq: 0,
            created_ms: 0,
        })
        .await
        .unwrap();
    store
        .append_event(EventRecord {
            session_id: "bench".into(),
            stream_id: stream.into(),
            seq: 1,
            data: r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello"}],"isError":false}}"#.into(),
            terminal: true,
            hold: None,
        })
        .await
        .unwrap();
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut stores: Vec<(&str, Arc<dyn LiveStore>)> =
        vec![("sqlite", Arc::new(SqliteStore::open(dir.path()).unwrap()))];
    let prefix = format!("tether-bench:{}", std::process::id());
    if let Ok(url) = std::env::var("TETHER_TEST_REDIS_URL") {
        let _guard = rt.enter();
        let redis = RedisStore::open(
            &RedisOptions {
                url: url.clone(),
                prefix: prefix.clone(),
                session_ttl: std::time::Duration::from_secs(3600),
                instance_ttl: std::time::Duration::from_secs(5),
                advertise_url: "http://127.0.0.1:1".into(),
            },
            Arc::new(Metrics::default()),
        )
        .unwrap();
        stores.push(("redis", Arc::new(redis)));
    } else {
        eprintln!("TETHER_TEST_REDIS_URL is not set: measuring SQLite only");
    }
    let counter = Arc::new(AtomicU64::new(0));
    for (name, store) in &stores {
        rt.block_on(store.create_session(record())).unwrap();
        let mut g = c.benchmark_group(format!("durable_writes_per_call/{name}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("lone_call", |b| {
            b.to_async(&rt).iter(|| {
                let (store, counter) = (store.clone(), counter.clone());
                async move { one_call(store.as_ref(), counter.fetch_add(1, Ordering::Relaxed)).await }
            })
        });
        g.throughput(Throughput::Elements(16));
        g.bench_function("16_concurrent_calls", |b| {
            b.to_async(&rt).iter(|| {
                let (store, counter) = (store.clone(), counter.clone());
                async move {
                    let calls = (0..16).map(|_| {
                        let store = store.clone();
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(async move { one_call(store.as_ref(), n).await })
                    });
                    for h in futures::future::join_all(calls).await {
                        h.unwrap();
                    }
                }
            })
        });
        g.finish();
        rt.block_on(store.close_session("bench", "bench_done", 0))
            .unwrap();
    }
    if let Ok(url) = std::env::var("TETHER_TEST_REDIS_URL") {
        // Finished streams of the run, left by design (pruned by age in production).
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut conn)
            .unwrap();
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL").arg(chunk).query(&mut conn).unwrap();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
