//! One request to a 2026-07-28 server and its answer: the routing headers it needs
//! (`Mcp-Method`, `Mcp-Name`), the answer read as JSON or SSE within the message bound, and
//! the era probe (`server/discover`).
//!
//! Must not: read an answer past the message bound.

use super::*;

/// The headers of a POST carrying `body`: the configured ones, the content types, the
/// modern request headers, and the trace context where HTTP tooling looks for it.
pub(super) fn headers_for(base: &HeaderMap, body: &Value) -> HeaderMap {
    let mut h = base.clone();
    h.insert(
        ACCEPT,
        HeaderValue::from_static("application/json, text/event-stream"),
    );
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, v) in modern::request_headers(body) {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
    for (name, v) in crate::telemetry::meta_headers(body) {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(name, v);
        }
    }
    h
}

pub(super) fn id_text(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Reads the answer to `body` from its response: one JSON body, or an SSE stream whose
/// notifications are sent on as they come (with `notes`' origin) until the answer.
pub(super) async fn read_answer(
    resp: reqwest::Response,
    url: &str,
    body: &Value,
    max: usize,
    notes: Option<(&mpsc::Sender<Inbound>, u64)>,
) -> Answer {
    let status = resp.status();
    let id = body.get("id").cloned().unwrap_or(Value::Null);
    if !status.is_success() {
        let (challenge, text) = error_parts(resp).await;
        return Answer::Final(status_answer(&id, url, status, challenge.as_deref(), &text));
    }
    if !is_event_stream(resp.headers()) {
        return match read_limited(resp, max).await {
            Ok(Ok(bytes)) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) if protocol::is_message(&v) => Answer::Final(v),
                Ok(_) => Answer::Final(not_jsonrpc_answer(&id, url, status, "JSON")),
                Err(e) => Answer::Final(not_jsonrpc_answer(
                    &id,
                    url,
                    status,
                    &format!("malformed JSON ({e})"),
                )),
            },
            Ok(Err(len)) => report_oversized(notes, &id, len, max).await,
            Err(e) => Answer::Failed(format!("response failed: {}", error_chain(&e))),
        };
    }
    let mut events = sse::events(resp, max);
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(SseItem::Event(ev)) => ev,
            // At once, the rest unread: no core spent on what cannot be delivered.
            Ok(SseItem::TooLarge { len }) => return report_oversized(notes, &id, len, max).await,
            Err(e) => {
                return Answer::Lost(format!(
                    "the server's response stream broke before the answer ({e}); modern streams cannot be resumed, so the outcome is unknown"
                ));
            }
        };
        if ev.data.trim().is_empty() {
            continue;
        }
        let Some(v) = serde_json::from_str::<Value>(&ev.data)
            .ok()
            .filter(protocol::is_message)
        else {
            tracing::warn!("server SSE event is not a JSON-RPC message; ignored");
            continue;
        };
        if v.get("method").is_none() && v.get("id") == Some(&id) {
            return Answer::Final(v);
        }
        if v.get("id").is_some() {
            // A 2026-07-28 server has no requests of its own to send; a request here would
            // wait for an answer that has no way back.
            tracing::debug!("a request on a modern response stream; ignored");
            continue;
        }
        if let Some((tx, origin)) = notes {
            let _ = tx
                .send(Inbound::Message {
                    message: crate::wire::Message::ours(v),
                    origin: Some(origin),
                })
                .await;
        }
    }
    Answer::Lost(
        "the server closed the response stream before answering; the outcome is unknown".into(),
    )
}

pub(super) async fn report_oversized(
    notes: Option<(&mpsc::Sender<Inbound>, u64)>,
    id: &Value,
    len: usize,
    limit: usize,
) -> Answer {
    match notes {
        Some((tx, _)) => {
            let _ = tx
                .send(Inbound::Oversized {
                    id: Some(id.clone()),
                    len,
                    limit,
                })
                .await;
            Answer::Reported
        }
        None => Answer::Lost(format!(
            "the server's answer is {len} bytes, over the {limit} byte limit (--max-upstream-message)"
        )),
    }
}

/// Whether the server at `url` speaks 2026-07-28: `server/discover` with the client's
/// `_meta` answered with a result that lists it. `None` when the answer says nothing
/// either way (unreachable, an authentication demand, a server error): the caller asks
/// again next time rather than remember a guess.
pub async fn probe(
    client: &reqwest::Client,
    url: &str,
    headers: &HeaderMap,
    init_params: &Value,
    timeout: Duration,
) -> Option<bool> {
    let mut body = protocol::request(
        Value::from("tether-probe"),
        "server/discover",
        Some(json!({})),
    );
    modern::Upstream::of_initialize(init_params).stamp(&mut body);
    let h = headers_for(headers, &body);
    let exchange = async {
        let resp = client.post(url).headers(h).json(&body).send().await.ok()?;
        let status = resp.status().as_u16();
        if status == 401 || status == 403 || status == 429 || status >= 500 {
            return None;
        }
        match read_answer(resp, url, &body, 1 << 20, None).await {
            Answer::Final(v) => Some(v.get("result").is_some_and(modern::speaks_modern)),
            Answer::Lost(_) | Answer::Reported => Some(false),
            Answer::Failed(_) => None,
        }
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}
