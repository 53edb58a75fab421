//! End to end with the official Rust SDK client through the gateway to a real stdio MCP
//! server: initialize, tools/list, tools/call, a server-to-client request (sampling),
//! progress notifications, and DELETE on close.
#![allow(deprecated)] // sampling is deprecated by SEP-2577 but is what legacy servers send

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Gateway, state_dir};
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, ClientRequest,
    CreateMessageRequestParams, CreateMessageResult, Implementation, ProgressNotificationParam,
    ProtocolVersion, Request, SamplingMessage,
};
use rmcp::service::{NotificationContext, PeerRequestOptions, RequestContext};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, ErrorData, RoleClient, ServiceExt};
use serde_json::json;
use tether_core::store::LiveStore;

#[derive(Clone, Default)]
struct TestClient {
    progress: Arc<AtomicUsize>,
    sampled: Arc<AtomicUsize>,
}

impl ClientHandler for TestClient {
    async fn create_message(
        &self,
        params: CreateMessageRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, ErrorData> {
        self.sampled.fetch_add(1, Ordering::SeqCst);
        assert_eq!(params.messages.len(), 1);
        Ok(CreateMessageResult::new(
            SamplingMessage::assistant_text("forty-two"),
            "test-model".into(),
        ))
    }

    async fn on_progress(
        &self,
        _params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.progress.fetch_add(1, Ordering::SeqCst);
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::builder().enable_sampling().build(),
            Implementation::new("rmcp-e2e", "1.0.0"),
        )
        .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
    }
}

fn args(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(map) => map,
        other => panic!("tool arguments must be an object, got {other}"),
    }
}

/// A plain call, then one whose upstream asks this client to sample (a server-to-client
/// request on the call's stream, or an input round of a 2026-07-28 exchange): its answer
/// reaches the upstream that asked.
async fn add_and_sample(
    client: &rmcp::service::RunningService<RoleClient, TestClient>,
    handler: &TestClient,
) {
    let r = client
        .call_tool(CallToolRequestParams::new("add").with_arguments(args(json!({"a": 40, "b": 2}))))
        .await
        .unwrap();
    assert_eq!(serde_json::to_value(&r.content).unwrap()[0]["text"], "42");
    let r = client
        .call_tool(
            CallToolRequestParams::new("sample")
                .with_arguments(args(json!({"prompt": "meaning?"}))),
        )
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&r.content).unwrap()[0]["text"],
        "model said: forty-two"
    );
    assert_eq!(handler.sampled.load(Ordering::SeqCst), 1);
}

/// Initialize, list, call, sampling and progress through the gateway at `url`.
async fn exercise(
    url: &str,
) -> (
    rmcp::service::RunningService<RoleClient, TestClient>,
    TestClient,
) {
    let handler = TestClient::default();
    let transport = StreamableHttpClientTransport::from_uri(url.to_owned());
    let client = handler
        .clone()
        .serve(transport)
        .await
        .expect("initialize through the gateway");

    let info = client.peer_info().expect("server info");
    assert_eq!(info.protocol_version, ProtocolVersion::V_2025_11_25);

    let tools = client.list_all_tools().await.unwrap();
    let names: Vec<_> = tools.iter().map(|t| t.name.to_string()).collect();
    for expected in ["echo", "add", "slow", "sample", "pid", "crash"] {
        assert!(
            names.contains(&expected.to_owned()),
            "{expected} in {names:?}"
        );
    }

    add_and_sample(&client, &handler).await;

    // Progress notifications arrive for a call that asked for them.
    let handle = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(
                CallToolRequestParams::new("slow")
                    .with_arguments(args(json!({"ms": 300, "steps": 3}))),
            )),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    handle.await_response().await.unwrap();
    assert_eq!(handler.progress.load(Ordering::SeqCst), 3);
    (client, handler)
}

#[tokio::test]
async fn rmcp_client_through_gateway_to_stdio_server() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let (client, _handler) = exercise(&gw.url).await;

    // Closing the client sends DELETE: the session ends with reason client_disconnect.
    client.cancel().await.unwrap();
    let store = tether_core::store::sqlite::SqliteStore::open(dir.path()).unwrap();
    let mut closed = false;
    for _ in 0..100 {
        if store.count_live().await.unwrap() == 0 && gw.log_text().contains("session closed") {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(closed, "session closed by DELETE: {}", gw.log_text());
    assert!(
        gw.log_text().contains("reason=\"client_disconnect\""),
        "{}",
        gw.log_text()
    );
}

#[tokio::test]
async fn rmcp_client_through_gateway_to_http_server() {
    // Both ways of speaking to an HTTP upstream: a legacy upstream session, and (what
    // `auto` finds the demo to speak) stateless 2026-07-28, where the sampling request
    // comes from the upstream's InputRequiredResult.
    for era in ["legacy", "auto"] {
        let (mut upstream, url) = common::http_upstream("127.0.0.1:0");
        let dir = state_dir();
        let gw = Gateway::start(
            dir.path(),
            &["--upstream-url", &url, "--upstream-protocol", era],
        );
        // Over HTTP the upstream sends sampling requests and progress on the stream of the
        // call that caused them; the gateway keeps that association (SEP-2260).
        let (client, handler) = exercise(&gw.url).await;
        assert_eq!(handler.sampled.load(Ordering::SeqCst), 1);
        client.cancel().await.unwrap();
        assert_eq!(
            gw.log_text().contains("upstream protocol detected"),
            era == "auto",
            "{}",
            gw.log_text()
        );
        let _ = upstream.kill();
        let _ = upstream.wait();
    }
}

/// A modern client in front of a modern upstream: rmcp in `Auto` mode picks 2026-07-28 at
/// the gateway, whose pooled upstream session speaks 2026-07-28 to the demo over HTTP. An
/// MRTR round trip crosses both: the upstream's input request becomes the gateway's own
/// `InputRequiredResult` (its `requestState`), and the client's answer goes back upstream
/// with the upstream's state.
#[tokio::test]
async fn rmcp_modern_client_through_gateway_to_a_modern_upstream() {
    use rmcp::{ClientLifecycleMode, ClientServiceExt};
    let (mut upstream, url) = common::http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let gw = Gateway::start(
        dir.path(),
        &["--upstream-url", &url, "--upstream-protocol", "modern"],
    );
    let handler = TestClient::default();
    let client = handler
        .clone()
        .serve_with_lifecycle(
            StreamableHttpClientTransport::from_uri(gw.url.clone()),
            ClientLifecycleMode::Auto {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
                legacy_version: None,
            },
        )
        .await
        .expect("auto mode connects through the gateway");
    assert_eq!(
        client.peer_info().unwrap().protocol_version,
        ProtocolVersion::V_2026_07_28
    );
    add_and_sample(&client, &handler).await;
    client.cancel().await.unwrap();
    let _ = upstream.kill();
    let _ = upstream.wait();
}

/// rmcp 3.11 in `Auto` lifecycle mode probes `server/discover` and now picks the modern era
/// through the gateway (before issue 16 Tether answered `-32022` listing only legacy
/// versions, which rmcp treats as "no compatible version" and fails outright). The legacy
/// stdio demo is behind the bridge; sampling is fulfilled by MRTR through the same
/// `ClientHandler`, and progress reaches the handler.
#[tokio::test]
async fn rmcp_client_in_auto_mode_picks_the_modern_era_through_the_bridge() {
    use rmcp::{ClientLifecycleMode, ClientServiceExt};
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let handler = TestClient::default();
    let transport = StreamableHttpClientTransport::from_uri(gw.url.clone());
    let client = handler
        .clone()
        .serve_with_lifecycle(
            transport,
            ClientLifecycleMode::Auto {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
                legacy_version: None,
            },
        )
        .await
        .expect("auto mode connects through the gateway");
    let info = client
        .peer_info()
        .expect("server info from server/discover");
    assert_eq!(
        info.protocol_version,
        ProtocolVersion::V_2026_07_28,
        "auto mode must pick the modern era"
    );
    let tools = client.list_all_tools().await.unwrap();
    assert!(tools.iter().any(|t| t.name == "echo"));
    add_and_sample(&client, &handler).await;
    // No session was created for the client: only the bridge's pooled upstream.
    let sessions = gw.admin_json("/api/sessions?state=live").await;
    assert!(
        sessions["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["transport"] == "pooled"),
        "{sessions}"
    );
    client.cancel().await.unwrap();
}
