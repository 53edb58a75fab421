use super::*;

/// A 2026-07-28 server whose every `tools/call` answer asks for `asks` inputs, and which
/// records the `_meta` and headers it was sent.
async fn asking_server(asks: usize) -> (String, Arc<Mutex<Vec<(HeaderMap, Value)>>>) {
    let seen: Arc<Mutex<Vec<(HeaderMap, Value)>>> = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |headers: HeaderMap, body: axum::Json<Value>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((headers, body.0.clone()));
                let requests: Map<String, Value> = (0..asks)
                    .map(|i| {
                        (
                            format!("k{i}"),
                            json!({"method": "elicitation/create", "params": {"message": "?"}}),
                        )
                    })
                    .collect();
                axum::Json(json!({"jsonrpc": "2.0", "id": body.0["id"], "result": {
                    "resultType": "input_required", "inputRequests": requests, "requestState": "s"}}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn link(url: &str) -> (ModernLink, mpsc::Receiver<Inbound>, TaskTracker) {
    let (tx, rx) = mpsc::channel(256);
    let tracker = TaskTracker::new();
    let l = ModernLink::new(
        reqwest::Client::new(),
        url,
        HttpOptions::default(),
        tx,
        tracker.clone(),
    );
    (l, rx, tracker)
}

async fn next(rx: &mut mpsc::Receiver<Inbound>) -> Value {
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(Inbound::Message { message, .. })) => message.to_value(),
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn a_server_that_keeps_asking_is_stopped_after_the_round_bound() {
    let (url, seen) = asking_server(1).await;
    let (link, mut rx, tracker) = link(&url);
    link.send(protocol::request(
        Value::from(7),
        "tools/call",
        Some(json!({"name": "ask"})),
    ));
    let mut asked = 0;
    let failed = loop {
        let v = next(&mut rx).await;
        if v.get("method").is_some() {
            // Each round's input request reaches the session as a server request on
            // the call; the answer goes back to the link under the id it was sent with.
            asked += 1;
            assert_eq!(v["method"], "elicitation/create");
            link.send(json!({"jsonrpc": "2.0", "id": v["id"], "result": {"action": "decline"}}));
            continue;
        }
        break v;
    };
    assert_eq!(asked, MAX_ROUNDS);
    assert_eq!(failed["id"], 7);
    assert_eq!(failed["error"]["code"], code::INTERNAL_ERROR);
    let sent: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, b)| b["method"] == "tools/call")
        .cloned()
        .collect();
    assert_eq!(
        sent.len(),
        MAX_ROUNDS as usize + 1,
        "the first POST and one retry per round"
    );
    let ids: BTreeSet<String> = sent.iter().map(|(_, b)| b["id"].to_string()).collect();
    assert_eq!(ids.len(), sent.len(), "every retry has an id of its own");
    let (h, last) = sent.last().unwrap();
    assert_eq!(h["mcp-method"], "tools/call");
    assert_eq!(h["mcp-name"], "ask");
    assert_eq!(h["mcp-protocol-version"], protocol::MODERN_VERSION);
    assert_eq!(last["params"]["requestState"], "s");
    assert_eq!(last["params"]["inputResponses"]["k0"]["action"], "decline");
    assert_eq!(
        last["params"]["_meta"][protocol::META_PROTOCOL_VERSION],
        protocol::MODERN_VERSION
    );
    assert!(link.inner.lock().asks.is_empty(), "nothing left waiting");
    link.shutdown();
    tracker.close();
}

#[tokio::test]
async fn an_answer_asking_for_too_many_inputs_fails_its_call_without_asking() {
    let (url, _) = asking_server(MAX_ASKS_PER_ROUND + 1).await;
    let (link, mut rx, tracker) = link(&url);
    link.send(protocol::request(
        Value::from(8),
        "tools/call",
        Some(json!({"name": "ask"})),
    ));
    let v = next(&mut rx).await;
    assert_eq!(v["id"], 8, "the call fails; no input request was sent: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&MAX_ASKS_PER_ROUND.to_string())
    );
    assert!(link.inner.lock().asks.is_empty());
    link.shutdown();
    tracker.close();
}

#[tokio::test]
async fn the_link_answers_what_a_stateless_server_has_no_method_for() {
    let (url, seen) = asking_server(1).await;
    let (link, mut rx, tracker) = link(&url);
    link.send(protocol::request(Value::from(1), "ping", None));
    link.send(protocol::request(
        Value::from(2),
        "logging/setLevel",
        Some(json!({"level": "error"})),
    ));
    for _ in 0..2 {
        let v = next(&mut rx).await;
        assert_eq!(v["result"], json!({}), "{v}");
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the server"
    );
    assert_eq!(
        link.inner.lock().client.log_level.as_deref(),
        Some("error"),
        "the level travels on the next requests"
    );
    link.shutdown();
    tracker.close();
}

/// A server with one tool whose `region` argument must be mirrored into
/// `Mcp-Param-Region`, validated as the spec asks (400 `-32020` when missing or
/// different).
async fn header_server() -> (String, Arc<Mutex<Vec<(HeaderMap, Value)>>>) {
    let seen: Arc<Mutex<Vec<(HeaderMap, Value)>>> = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |headers: HeaderMap, body: axum::Json<Value>| {
            let log = log.clone();
            async move {
                let b = body.0;
                log.lock().unwrap().push((headers.clone(), b.clone()));
                let id = b["id"].clone();
                if b["method"] == "tools/list" {
                    let tools = json!([{"name": "query", "inputSchema": {"type": "object", "properties": {
                        "region": {"type": "string", "x-mcp-header": "Region"},
                        "sql": {"type": "string"}}}}]);
                    return (
                        axum::http::StatusCode::OK,
                        axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": {"resultType": "complete", "tools": tools}})),
                    );
                }
                let want = b.pointer("/params/arguments/region").and_then(Value::as_str);
                let got = headers.get("mcp-param-region").and_then(|v| v.to_str().ok());
                let got = got.map(|g| match g.strip_prefix("=?base64?").and_then(|r| r.strip_suffix("?=")) {
                    Some(b64) => String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()).unwrap(),
                    None => g.to_owned(),
                });
                if want.map(str::to_owned) != got {
                    return (
                        axum::http::StatusCode::BAD_REQUEST,
                        axum::Json(json!({"jsonrpc": "2.0", "id": id, "error": {"code": code::HEADER_MISMATCH, "message": "Mcp-Param-Region does not match"}})),
                    );
                }
                (
                    axum::http::StatusCode::OK,
                    axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": {"resultType": "complete", "content": [{"type": "text", "text": want}]}})),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test]
async fn declared_tool_arguments_are_mirrored_into_mcp_param_headers() {
    let (url, seen) = header_server().await;
    let (link, mut rx, tracker) = link(&url);
    // No tools/list from the client: the link reads the declarations before the call.
    for (id, region) in [(1, "eu-west"), (2, "zürich")] {
        link.send(protocol::request(
            Value::from(id),
            "tools/call",
            Some(json!({"name": "query", "arguments": {"region": region, "sql": "select 1"}})),
        ));
        let v = next(&mut rx).await;
        assert_eq!(v["id"], id);
        assert_eq!(
            v.pointer("/result/content/0/text"),
            Some(&json!(region)),
            "{v}"
        );
    }
    let sent = seen.lock().unwrap().clone();
    let lists = sent
        .iter()
        .filter(|(_, b)| b["method"] == "tools/list")
        .count();
    assert_eq!(lists, 1, "the tool list is read once");
    let (h, _) = &sent[1];
    assert_eq!(h["mcp-param-region"], "eu-west");
    let (h, _) = &sent[2];
    assert!(
        h["mcp-param-region"]
            .to_str()
            .unwrap()
            .starts_with("=?base64?"),
        "a non-ASCII value travels base64-encoded"
    );
    link.shutdown();
    tracker.close();
}

#[tokio::test]
async fn subscriptions_past_the_bound_are_refused_and_the_rest_kept() {
    // Nothing listens there: the listen stream the link keeps trying to open never
    // comes up, which is all this test needs.
    let (link, mut rx, tracker) = link("http://127.0.0.1:1/mcp");
    for i in 0..=MAX_SUBSCRIPTIONS {
        link.send(protocol::request(
            Value::from(i as u64),
            "resources/subscribe",
            Some(json!({"uri": format!("demo://{i}")})),
        ));
    }
    let mut refused = Vec::new();
    for _ in 0..=MAX_SUBSCRIPTIONS {
        let v = next(&mut rx).await;
        if v.get("error").is_some() {
            assert_eq!(v["error"]["data"]["limit"], "subscriptions");
            refused.push(v["id"].as_u64().unwrap());
        }
    }
    assert_eq!(
        refused,
        [MAX_SUBSCRIPTIONS as u64],
        "only the one over the bound"
    );
    assert_eq!(link.inner.lock().subscriptions.len(), MAX_SUBSCRIPTIONS);
    link.shutdown();
    tracker.close();
}
