//! The front door in process (`tower::ServiceExt::oneshot` on its router): a registry over
//! an in-memory store, upstreams the test plays, no socket and no process. What a client's
//! bytes become at the edge: refusals with their status and code, a session opened, and a
//! large call relayed without its payload being rewritten.
//! Must not: bind a port or spawn a process.

use super::*;
use crate::auth::{KeyRing, Keys};
use crate::ledger::Ledger;
use crate::session::{Registry, SessionConfig};
use crate::store::memory::MemoryStore;
use crate::upstream::memory::FakeUpstream;
use crate::upstream::{Connector, UpstreamLimits};
use axum::body::Body;
use axum::http::Request;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

struct Door {
    router: Router,
    upstreams: mpsc::UnboundedReceiver<FakeUpstream>,
    _ledger: mpsc::Receiver<crate::store::LedgerEvent>,
}

fn door() -> Door {
    let tracker = TaskTracker::new();
    let (connector, upstreams) = Connector::in_memory(UpstreamLimits::default(), tracker.clone());
    let metrics = Arc::new(Metrics::default());
    let (ledger, ledger_rx) = Ledger::new(metrics.clone());
    let registry = Registry::new(
        SessionConfig::default(),
        Arc::new(MemoryStore::default()),
        None,
        connector,
        tracker,
        metrics,
        ledger,
    );
    let cfg = FrontConfig {
        keys: Arc::new(KeyRing::new(Keys::new(&[]).expect("no keys"))),
        max_body: 1 << 20,
        body_timeout: Duration::from_secs(5),
        allowed_origins: Vec::new(),
        allowed_hosts: Vec::new(),
        loopback_listener: false,
        keepalive: Duration::from_secs(15),
        takeover_wait: Duration::from_secs(1),
        modern: modern::ModernConfig {
            state_key: crate::modern::StateKey::new([7; 32]),
            instance: "test".into(),
            state_ttl: Duration::from_secs(60),
        },
        server: None,
        users: Arc::new(Access::new(None)),
    };
    Door {
        router: router(registry, cfg),
        upstreams,
        _ledger: ledger_rx,
    }
}

fn post(body: impl Into<Body>, session: Option<&str>) -> Request<Body> {
    let mut req = Request::post("/mcp")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(s) = session {
        req = req
            .header(SESSION_HEADER, s)
            .header(VERSION_HEADER, "2025-11-25");
    }
    req.body(body.into()).expect("a valid request")
}

async fn send(door: &Door, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let resp = door.router.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, value)
}

fn initialize() -> String {
    json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "front-test", "version": "1"}}})
    .to_string()
}

/// Opens a session, the test playing its upstream; returns the session id and the upstream.
async fn open(door: &mut Door) -> (String, FakeUpstream) {
    let mut upstreams = std::mem::replace(&mut door.upstreams, mpsc::unbounded_channel().1);
    let play = tokio::spawn(async move {
        let mut up = upstreams.recv().await.expect("an upstream is started");
        up.accept_initialize(json!({"tools": {}})).await;
        (up, upstreams)
    });
    let (status, headers, body) = send(door, post(initialize(), None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["result"]["serverInfo"]["name"], "fake", "{body}");
    let (up, upstreams) = play.await.unwrap();
    door.upstreams = upstreams;
    let sid = headers[SESSION_HEADER].to_str().unwrap().to_owned();
    (sid, up)
}

#[tokio::test]
async fn bytes_that_are_no_message_are_refused_with_their_code() {
    let door = door();
    let cases: [(&str, StatusCode, i64); 5] = [
        ("{\"jsonrpc\": ", StatusCode::BAD_REQUEST, -32700),
        (
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
            StatusCode::BAD_REQUEST,
            -32600,
        ),
        (r#"{"hello": 1}"#, StatusCode::BAD_REQUEST, -32600),
        (
            r#"{"jsonrpc":"2.0","method":"tools/call"}"#,
            StatusCode::BAD_REQUEST,
            -32600,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            StatusCode::BAD_REQUEST,
            -32000,
        ),
    ];
    for (body, status, code) in cases {
        let (got, _, v) = send(&door, post(body.to_owned(), None)).await;
        assert_eq!(
            (got, v["error"]["code"].as_i64()),
            (status, Some(code)),
            "{body}: {v}"
        );
    }
    let (got, _, v) = send(&door, post(initialize(), Some("no-such-session"))).await;
    assert_eq!(got, StatusCode::NOT_FOUND, "{v}");
    let req = Request::post("/mcp")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(Body::from(initialize()))
        .unwrap();
    let (got, _, _) = send(&door, req).await;
    assert_eq!(got, StatusCode::NOT_ACCEPTABLE);
}

#[tokio::test]
async fn a_large_call_crosses_under_new_ids_with_its_payload_as_sent() {
    let mut door = door();
    let (sid, mut up) = open(&mut door).await;
    // Unusual but valid JSON the gateway must pass on as it is: escapes, non-ASCII, a
    // number no float holds exactly, and 100 KB of text.
    let text = format!("caf\u{e9} \"quoted\" \\ {}", "x".repeat(100 * 1024));
    let arguments =
        json!({"text": text, "big": 12345678901234567890u64, "nested": {"a": [1, null, true]}});
    let call = json!({"jsonrpc": "2.0", "id": "client-7", "method": "tools/call",
        "params": {"name": "echo", "arguments": arguments}});
    let answer = tokio::spawn(async move {
        // The gateway asks for the tool list of its own first (which tools are safe to
        // re-issue); the call follows.
        let mut req = up.next_request().await;
        while req["method"] != "tools/call" {
            up.answer(&req, json!({"tools": []})).await;
            req = up.next_request().await;
        }
        assert_ne!(req["id"], "client-7", "the upstream sees the gateway's id");
        assert_eq!(req["params"]["arguments"], arguments);
        up.answer(
            &req,
            json!({"content": [{"type": "text", "text": req["params"]["arguments"]["text"]}]}),
        )
        .await;
        up
    });
    let (status, _, v) = send(&door, post(call.to_string(), Some(&sid))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["id"], "client-7", "the client sees its own id");
    assert_eq!(v["result"]["content"][0]["text"], text);
    answer.await.unwrap();
}
