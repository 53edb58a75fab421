//! The per-call work of the gateway outside I/O: parsing the client's JSON-RPC envelope,
//! rewriting ids on the way up and down, event ids, looking the session up (held in memory
//! among 10,000, and an unknown id), and one event-log append (SQLite and, with
//! `TETHER_TEST_REDIS_URL`, Redis).
//!
//! `cargo bench -p tether-core --bench hot_path`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use tether_core::protocol::{Envelope, set_id};
use tether_core::session::{event_id, parse_event_id};
use tether_core::store::sqlite::SqliteStore;
use tether_core::store::{EventRecord, LiveStore};

const REQUEST: &[u8] = br#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello world"},"_meta":{"progressToken":"p-42"}}}"#;
const RESPONSE: &str = r#"{"jsonrpc":"2.0","id":9001,"result":{"content":[{"type":"text","text":"hello world"}],"isError":false}}"#;

fn protocol(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot_path");
    g.bench_function("envelope_parse", |b| {
        b.iter(|| Envelope::parse(std::hint::black_box(REQUEST)).unwrap())
    });
    let env = Envelope::parse(REQUEST).unwrap();
    g.bench_function("id_rewrite_up_and_down", |b| {
        b.iter(|| {
            // Up: the client's request under the gateway's id, as the line written upstream.
            let mut up = env.value.clone();
            set_id(&mut up, json!(9001));
            let line = up.to_string();
            // Down: the upstream's answer under the client's id, as the SSE data.
            let mut down: Value = serde_json::from_str(RESPONSE).unwrap();
            set_id(&mut down, env.id().cloned().unwrap());
            (line, down.to_string())
        })
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
    use tether_core::config::UpstreamSpec;
    use tether_core::session::{Registry, SessionConfig};
    use tether_core::store::{SessionRecord, SessionState};

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
                    protocol: tether_core::config::UpstreamProtocol::Legacy,
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
