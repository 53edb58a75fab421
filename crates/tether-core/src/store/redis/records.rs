//! Session and stream records as Redis hashes: encoding and decoding.
//! Must not: talk to Redis.

use super::*;

pub(super) fn record_json(r: &SessionRecord) -> Value {
    json!({
        "id": r.id,
        "principal": r.principal,
        "principal_email": r.principal_email,
        "principal_name": r.principal_name,
        "client_type": r.client_type,
        "transport": r.transport,
        "created_ms": r.created_ms,
        "protocol_version": r.protocol_version,
        "init_params": r.init_params,
        "client_name": r.client_name,
        "client_version": r.client_version,
        "upstream_name": r.upstream_name,
        "upstream_fingerprint": r.upstream_fingerprint,
    })
}

pub(super) fn decode_record(
    mut h: HashMap<String, String>,
) -> Result<Option<SessionRecord>, StoreError> {
    let Some(rec) = h.remove("rec") else {
        return Ok(None);
    };
    let corrupt = |what: &str| StoreError::Corrupt(format!("redis session record: {what}"));
    let v: Value = serde_json::from_str(&rec).map_err(|e| corrupt(&e.to_string()))?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let num = |t: Option<&String>| t.and_then(|t| t.parse::<i64>().ok());
    Ok(Some(SessionRecord {
        id: s("id").ok_or_else(|| corrupt("id"))?,
        principal: s("principal").ok_or_else(|| corrupt("principal"))?,
        principal_email: s("principal_email"),
        principal_name: s("principal_name"),
        client_type: s("client_type").unwrap_or_else(|| "unknown".into()),
        transport: s("transport").unwrap_or_else(|| "streamable-http".into()),
        created_ms: v.get("created_ms").and_then(Value::as_i64).unwrap_or(0),
        last_active_ms: num(h.get("last")).unwrap_or(0),
        protocol_version: s("protocol_version").unwrap_or_default(),
        init_params: v.get("init_params").cloned().unwrap_or(Value::Null),
        client_name: s("client_name"),
        client_version: s("client_version"),
        upstream_name: s("upstream_name").unwrap_or_default(),
        upstream_fingerprint: s("upstream_fingerprint"),
        state: if h.get("state").map(String::as_str) == Some("closed") {
            SessionState::Closed
        } else {
            SessionState::Live
        },
        close_reason: h.get("reason").cloned(),
        closed_ms: num(h.get("closed")),
        restore: h
            .get("restore")
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_else(|| json!({})),
    }))
}

pub(super) fn decode_stream(
    session_id: &str,
    stream_id: &str,
    h: &HashMap<String, String>,
) -> Option<StreamRecord> {
    if h.is_empty() {
        return None;
    }
    let meta: Value = h
        .get("meta")
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or(Value::Null);
    Some(StreamRecord {
        session_id: session_id.to_owned(),
        stream_id: stream_id.to_owned(),
        client_request_id: meta
            .get("client_request_id")
            .cloned()
            .filter(|v| !v.is_null()),
        request: meta.get("request").cloned().filter(|v| !v.is_null()),
        retryable: meta
            .get("retryable")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        done: h.get("done").map(String::as_str) == Some("1"),
        last_seq: h.get("last").and_then(|t| t.parse().ok()).unwrap_or(0),
        created_ms: meta.get("created_ms").and_then(Value::as_i64).unwrap_or(0),
    })
}
