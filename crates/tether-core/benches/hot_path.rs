//! The per-call work of the gateway outside I/O: parsing the client's JSON-RPC envelope,
//! rewriting ids on the way up and down (16 B and 100 KB calls; beside the typed message,
//! the same relay through `serde_json::Value` trees, how the gateway did it before `wire`), event ids, looking the session up (held in memory
//! among 10,000, and an unknown id), and one event-log append (SQLite and, with
//! `TETHER_TEST_REDIS_URL`, Redis).
//!
//! `cargo bench -p tether-core --bench hot_path`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use tether_core::protocol::set_id;
use tether_core::session::{event_id, parse_event_id};
use tether_core::store::sqlite::SqliteStore;
use tether_core::store::{EventRecord, LiveStore};
use tether_core::wire::Message;

const REQUEST: &[u8] = br#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello world"},"_meta":{"progressToken":"p-42"}}}"#;
const RESPONSE: &str = r#"{"jsonrpc":"2.0","id":9001,"result":{"content":[{"type":"text","text":"hello world"}],"isError":false}}"#;

/// A client's call up and the upstream's answer down, as the gateway relays them: parsed
/// once, the id replaced, written out; `tree` does the same through `Value`.
fn relay(request: &[u8], response: &[u8]) -> (String, String) {
    let mut up = Message::parse(request).unwrap();
    let client_id = up.id().cloned().unwrap();
    let _ = up.tool_name();
    up.set_id(json!(9001));
    let line = up.encode();
    let mut down = Message::parse(response).unwrap();
    let _ = tether_core::protocol::call_outcome(&down);
    down.set_id(client_id);
    (line, down.encode())
}

fn tree(request: &[u8], response: &[u8]) -> (String, String) {
    let mut up: Value = serde_json::from_slice(request).unwrap();
    let client_id = up["id"].clone();
    set_id(&mut up, json!(9001));
    let line = up.to_string();
    let mut down: Value = serde_json::from_slice(response).unwrap();
    set_id(&mut down, client_id);
    (line, down.to_string())
}

fn protocol(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot_path");
    g.bench_function("envelope_parse", |b| {
        b.iter(|| Message::parse(std::hint::black_box(REQUEST)).unwrap())
    });
    g.bench_function("id_rewrite_up_and_down", |b| {
        b.iter(|| relay(REQUEST, RESPONSE.as_bytes()))
    });
    g.bench_function("id_rewrite_up_and_down_tree", |b| {
        b.iter(|| tree(REQUEST, RESPONSE.as_bytes()))
    });
    let text = "x".repeat(100 * 1024);
    let big_request = json!({"jsonrpc": "2.0", "id": 42, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}}})
    .to_string();
    let big_response = json!({"jsonrpc": "2.0", "id": 9001,
        "result": {"content": [{"type": "text", "text": text}], "isError": false}})
    .to_string();
    g.bench_function("relay_100kb", |b| {
        b.iter(|| relay(big_request.as_bytes(), big_response.as_bytes()))
    });
    g.bench_function("relay_100kb_tree", |b| {
        b.iter(|| tree(big_request.as_bytes(), big_response.as_bytes()))
    });
    g.bench_function("event_id_format_and_parse", |b| {
        b.iter(|| {
            let id = event_id(std::hint::black_box("9f2c1a7b3e4d5f60"), 17);
            parse_event_id(&id).map(|(_, seq)| seq)
        })
    });
    g.finish();
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut stores: Vec<(&str, Arc<dyn LiveStore>)> =
        vec![("sqlite", Arc::new(SqliteStore::open(dir.path()).unwrap()))];
    let prefix = format!("tether-bench-hot:{}", std::process::id());
    if let Ok(url) = std::env::var("TETHER_TEST_REDIS_URL") {
        let _guard = rt.enter();
        stores.push((
            "redis",
            Arc::new(
                tether_core::store::redis::RedisStore::open(
                    &tether_core::store::redis::RedisOptions {
                        url,
                        prefix: prefix.clone(),
                        session_ttl: std::time::Duration::from_secs(600),
                        instance_ttl: std::time::Duration::from_secs(5),
                        advertise_url: "http://127.0.0.1:1".into(),
                    },
                    Arc::new(tether_core::metrics::Metrics::default()),
                )
                .unwrap(),
            ),
        ));
    }
    let seq = Arc::new(AtomicU64::new(1));
    let mut g = c.benchmark_group("hot_path/event_log_append");
    for (name, store) in &stores {
        g.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| {
                let (store, seq) = (store.clone(), seq.clone());
                async move {
                    store
                        .append_event(EventRecord {
                            session_id: "bench".into(),
                            stream_id: "0".into(),
                            seq: seq.fetch_add(1, Ordering::Relaxed),
                            data: RESPONSE.into(),
                            terminal: false,
                            hold: None,
                        })
                        .await
                        .unwrap()
                }
            })
        });
        rt.block_on(store.close_session("bench", "bench_done", 0))
            .unwrap();
    }
    g.finish();
}

/// `Registry::get` as every request does it: 10,000 sessions stored, all held after a first
/// load; also an unknown (well-formed) id, which asks the store.
fn lookup(c: &mut Criterion) {
    use tether_core::auth::Principal;
    use tether_core::session::{Registry, SessionConfig};
    use tether_core::store::{SessionRecord, SessionState};
    use tether_core::upstream::UpstreamSpec;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let metrics = Arc::new(tether_core::metrics::Metrics::default());
    let tracker = tokio_util::task::TaskTracker::new();
    let (ledger, _rx) = tether_core::ledger::Ledger::new(metrics.clone());
    let registry = {
        let _guard = rt.enter();
        Registry::new(
            SessionConfig {
                admission: tether_core::session::admission::AdmissionConfig {
                    max_sessions: 20_000,
                    max_per_principal: 20_000,
                    ..Default::default()
                },
                ..SessionConfig::default()
            },
            store.clone(),
            None,
            tether_core::upstream::Connector::new(
                UpstreamSpec::Http {
                    url: "http://127.0.0.1:1/mcp".into(),
                    protocol: tether_core::upstream::UpstreamProtocol::Legacy,
                    headers: Vec::new(),
                },
                "bench",
                None,
                tether_core::upstream::UpstreamLimits::default(),
                tracker.clone(),
            ),
            tracker,
            metrics,
            ledger,
        )
    };
    let ids: Vec<String> = (0..10_000).map(|i| format!("{i:040x}")).collect();
    let now = tether_core::store::now_ms();
    rt.block_on(async {
        for id in &ids {
            store
                .create_session(SessionRecord {
                    id: id.clone(),
                    principal: "anonymous".into(),
                    principal_email: None,
                    principal_name: None,
                    client_type: "unknown".into(),
                    transport: "streamable-http".into(),
                    created_ms: now,
                    last_active_ms: now,
                    protocol_version: "2025-11-25".into(),
                    init_params: json!({"protocolVersion": "2025-11-25", "capabilities": {},
                        "clientInfo": {"name": "bench", "version": "1"}}),
                    client_name: Some("bench".into()),
                    client_version: Some("1".into()),
                    upstream_name: "bench".into(),
                    upstream_fingerprint: None,
                    state: SessionState::Live,
                    close_reason: None,
                    closed_ms: None,
                    restore: json!({}),
                })
                .await
                .unwrap();
        }
        let me = Principal::anonymous();
        for id in &ids {
            registry.get(id, &me).await.unwrap();
        }
    });
    let me = Principal::anonymous();
    let mut g = c.benchmark_group("hot_path/session_lookup");
    let mut i = 0usize;
    g.bench_function("held", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 7919) % ids.len();
            let id = &ids[i];
            let (registry, me) = (&registry, &me);
            async move { registry.get(id, me).await.unwrap() }
        })
    });
    g.bench_function("unknown", |b| {
        b.to_async(&rt).iter(|| {
            let (registry, me) = (&registry, &me);
            async move {
                assert!(
                    registry
                        .get("ffffffffffffffffffffffffffffffffffffffff", me)
                        .await
                        .is_err()
                );
            }
        })
    });
    g.finish();
}

criterion_group!(benches, protocol, lookup, append);
criterion_main!(benches);
