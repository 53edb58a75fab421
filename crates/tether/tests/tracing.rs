//! OpenTelemetry: with `--otlp-endpoint`, an in-process OTLP/HTTP collector receives one
//! span per MCP request (session, method, tool, outcome) with children for the upstream
//! call and the store write, in the trace the client's `traceparent` named; the upstream
//! call's context reaches a stdio upstream in `params._meta` and an HTTP upstream in the
//! `traceparent` header too.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Gateway, http_upstream, state_dir};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::{Value, json};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Span>>>;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An OTLP/HTTP (protobuf) collector on port 0 keeping every span it receives.
async fn collector() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let keep = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            let attrs = s
                                .attributes
                                .iter()
                                .filter_map(|kv| {
                                    let v = match kv.value.as_ref()?.value.as_ref()? {
                                        AnyValue::StringValue(s) => s.clone(),
                                        AnyValue::IntValue(i) => i.to_string(),
                                        AnyValue::BoolValue(b) => b.to_string(),
                                        other => format!("{other:?}"),
                                    };
                                    Some((kv.key.clone(), v))
                                })
                                .collect();
                            keep.lock().unwrap().push(Span {
                                name: s.name,
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                                attrs,
                            });
                        }
                    }
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

/// Waits until the collector holds a span matching `f`.
async fn span_where(spans: &Spans, what: &str, f: impl Fn(&Span) -> bool) -> Span {
    for _ in 0..200 {
        if let Some(s) = spans.lock().unwrap().iter().find(|s| f(s)) {
            return s.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {what} span in {:#?}", spans.lock().unwrap());
}

/// What the demo's `trace` tool reported: the trace context it was sent.
fn seen_by_upstream(answer: &Value) -> Value {
    let text = answer
        .pointer("/result/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("trace did not succeed: {answer}"));
    serde_json::from_str(text).unwrap()
}

async fn traced_call(
    gw: &Gateway,
    sid: &str,
    id: i64,
    tool: &str,
    header: bool,
    meta: bool,
) -> Value {
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let mut params = json!({"name": tool, "arguments": {"text": "t"}});
    if meta {
        params["_meta"] = json!({"traceparent": traceparent});
    }
    let mut req = reqwest::Client::new()
        .post(&gw.url)
        .header("content-type", "application/json")
        .header("accept", common::ACCEPT_BOTH)
        .header("mcp-session-id", sid)
        .header("mcp-protocol-version", "2025-11-25");
    if header {
        req = req.header("traceparent", &traceparent);
    }
    let resp = req
        .body(
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    common::Answer::read(resp).await.response()
}

#[tokio::test]
async fn request_spans_reach_an_otlp_collector_in_the_clients_trace() {
    let (endpoint, spans) = collector().await;
    let dir = state_dir();
    let gw = Gateway::start_env(
        dir.path(),
        // Every call gets a stored stream, so the call makes a store write to see.
        &[
            "--demo",
            "--otlp-endpoint",
            &endpoint,
            "--answer-window",
            "0",
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let mcp = gw.client();
    let sid = mcp.initialize("traced").await;

    // traceparent as an HTTP header.
    let answer = traced_call(&gw, &sid, 1, "trace", true, false).await;
    let seen = seen_by_upstream(&answer);
    let request = span_where(&spans, "request", |s| {
        s.name == "request" && s.attrs.get("mcp.tool").map(String::as_str) == Some("trace")
    })
    .await;
    assert_eq!(
        request.trace_id, TRACE_ID,
        "in the client's trace: {request:?}"
    );
    // Issue 26: a span carries the id's prefix, never the credential itself.
    assert_eq!(request.attrs["session.id"], &sid[..8]);
    assert_eq!(request.attrs["mcp.method"], "tools/call");
    assert_eq!(request.attrs["mcp.outcome"], "ok");
    let http = span_where(&spans, "mcp.http", |s| s.span_id == request.parent).await;
    assert_eq!(
        http.parent, CLIENT_SPAN,
        "the front span's parent is the client's span"
    );
    let upstream = span_where(&spans, "upstream", |s| {
        s.name == "upstream" && s.parent == request.span_id
    })
    .await;
    assert_eq!(upstream.attrs["upstream.name"], "demo");
    span_where(&spans, "store.write", |s| {
        s.name == "store.write" && s.parent == request.span_id
    })
    .await;
    // The stdio upstream got the upstream span's context in _meta.
    let meta = seen["meta"].as_str().expect("traceparent in _meta");
    assert_eq!(
        meta,
        format!("00-{TRACE_ID}-{}-01", upstream.span_id),
        "{seen}"
    );

    // traceparent in _meta only (how MCP SDK clients send it), and a failing call.
    let answer = traced_call(&gw, &sid, 2, "no_such_tool", false, true).await;
    assert!(answer.get("error").is_some() || answer.pointer("/result/isError").is_some());
    let failed = span_where(&spans, "failed request", |s| {
        s.name == "request" && s.attrs.get("mcp.tool").map(String::as_str) == Some("no_such_tool")
    })
    .await;
    assert_eq!(failed.trace_id, TRACE_ID);
    assert_ne!(failed.attrs["mcp.outcome"], "ok", "{failed:?}");
}

#[tokio::test]
async fn an_http_upstream_gets_the_trace_context_in_its_headers() {
    // Both links: a legacy upstream session, and the stateless 2026-07-28 one.
    for era in ["legacy", "modern"] {
        http_upstream_gets_the_trace_context(era).await;
    }
}

async fn http_upstream_gets_the_trace_context(era: &str) {
    let (endpoint, spans) = collector().await;
    let (mut upstream, url) = http_upstream("127.0.0.1:0");
    let dir = state_dir();
    let gw = Gateway::start_env(
        dir.path(),
        &[
            "--upstream-url",
            &url,
            "--upstream-protocol",
            era,
            "--otlp-endpoint",
            &endpoint,
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let sid = gw.client().initialize("traced-http").await;
    let answer = traced_call(&gw, &sid, 1, "trace", true, false).await;
    let seen = seen_by_upstream(&answer);
    let up = span_where(&spans, "upstream", |s| {
        s.name == "upstream" && s.trace_id == TRACE_ID
    })
    .await;
    let want = format!("00-{TRACE_ID}-{}-01", up.span_id);
    assert_eq!(seen["header"], want.as_str(), "{era}: {seen}");
    assert_eq!(seen["meta"], want.as_str(), "{era}: {seen}");
    upstream.kill().unwrap();
    let _ = upstream.wait();
}

#[tokio::test]
async fn without_an_endpoint_a_clients_meta_passes_untouched() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let sid = gw.client().initialize("untraced").await;
    let answer = traced_call(&gw, &sid, 1, "trace", true, true).await;
    let seen = seen_by_upstream(&answer);
    assert_eq!(
        seen["meta"],
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").as_str()
    );
}
