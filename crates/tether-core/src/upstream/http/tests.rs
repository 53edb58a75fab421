use super::*;
use serde_json::json;

/// A link to `url` with default options, its inbound channel of `capacity` and the
/// tracker owning its tasks.
fn link_to(url: &str, capacity: usize) -> (HttpLink, mpsc::Receiver<Inbound>, TaskTracker) {
    let (tx, rx) = mpsc::channel(capacity);
    let tracker = TaskTracker::new();
    let link = HttpLink::new(
        reqwest::Client::new(),
        url,
        json!({}),
        HttpOptions::default(),
        tx,
        tracker.clone(),
    );
    (link, rx, tracker)
}

/// Messages a link has not sent yet, and requests it has in flight, are bounded: over
/// either bound a request is answered `-32016` at once naming it.
#[tokio::test]
async fn the_queue_and_the_requests_in_flight_are_bounded() {
    // A server that takes connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let (link, mut rx, tracker) = link_to(&url, QUEUE * 4);
    let refused = |rx: &mut mpsc::Receiver<Inbound>, limit: &str| {
        let mut ids = Vec::new();
        while let Ok(Inbound::Message { message, .. }) = rx.try_recv() {
            let value = message.to_value();
            assert_eq!(
                value.pointer("/error/code"),
                Some(&json!(code::LIMIT_REACHED))
            );
            assert_eq!(value.pointer("/error/data/limit"), Some(&json!(limit)));
            ids.push(value["id"].as_u64().unwrap());
        }
        ids
    };
    // Sent faster than the dispatcher runs (it has not run yet): the queue's bound.
    for id in 0..QUEUE as u64 + 3 {
        link.send(protocol::request(Value::from(id), "tools/list", None));
    }
    link.send(protocol::notification("notifications/progress", None));
    let over = QUEUE as u64;
    assert_eq!(
        refused(&mut rx, "upstream-queue"),
        [over, over + 1, over + 2]
    );
    // The dispatcher hands them all to requests in flight, none answered: the next
    // ones are over that bound (however long a loaded machine takes to get there).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in 0..3u64 {
        link.send(protocol::request(
            Value::from(10_000 + id),
            "tools/list",
            None,
        ));
    }
    let mut over = Vec::new();
    for _ in 0..200 {
        over.extend(refused(&mut rx, "in-flight"));
        if over.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        over,
        [10_000, 10_001, 10_002],
        "exactly the ones over the bound"
    );
    link.shutdown(false);
    tracker.close();
    held.abort();
}

/// Issue 26: a server that answers one JSON body per request once the work is done held
/// every later request of the session behind a slow call (the link waited for each
/// POST's answer before sending the next): a ping, a list, the call's own cancel. Now
/// only the handshake is ordered; the rest go at once.
#[tokio::test]
async fn a_slow_call_holds_up_no_other_message() {
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |body: axum::Json<Value>| {
            let log = log.clone();
            async move {
                let method = body["method"].as_str().unwrap_or("").to_owned();
                log.lock().unwrap().push(method.clone());
                let headers = [("mcp-session-id", "s1"), ("content-type", "application/json")];
                match method.as_str() {
                    "tools/call" => {
                        // The work that never ends.
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    m if m.starts_with("notifications/") => {
                        axum::http::StatusCode::ACCEPTED.into_response()
                    }
                    _ => (
                        headers,
                        json!({"jsonrpc": "2.0", "id": body["id"], "result": {"protocolVersion": "2025-11-25"}})
                            .to_string(),
                    )
                        .into_response(),
                }
            }
        }),
    );
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let (link, mut rx, tracker) = link_to(&url, 64);
    link.send(protocol::request(
        Value::from(1),
        "initialize",
        Some(json!({})),
    ));
    link.send(protocol::notification("notifications/initialized", None));
    link.send(protocol::request(
        Value::from(2),
        "tools/call",
        Some(json!({"name": "slow"})),
    ));
    link.send(protocol::request(Value::from(3), "ping", None));
    link.send(protocol::notification(
        "notifications/cancelled",
        Some(json!({"requestId": 2})),
    ));
    link.send(protocol::request(Value::from(4), "tools/list", None));
    let mut answered = Vec::new();
    while answered.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("answers come while the call hangs")
            .expect("the link lives");
        if let Inbound::Message { message, .. } = m
            && let Some(id) = message.id().and_then(Value::as_u64)
        {
            answered.push(id);
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, [1, 3, 4]);
    let cancelled = || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|m| m == "notifications/cancelled")
    };
    for _ in 0..100 {
        if cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cancelled(),
        "the cancel reached the server: {:?}",
        seen.lock().unwrap()
    );
    let order = seen.lock().unwrap().clone();
    assert_eq!(order[..2], ["initialize", "notifications/initialized"]);
    link.shutdown(false);
    tracker.close();
    server.abort();
}
