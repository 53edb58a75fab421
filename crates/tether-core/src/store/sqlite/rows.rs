//! Row mappings and the column lists the queries share.
//! Must not: query; these only read a row.

use super::*;

pub(super) fn parse_json(text: Option<String>) -> rusqlite::Result<Option<Value>> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

pub(super) fn row_to_session(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    let state: String = row.get(9)?;
    Ok(SessionRecord {
        id: row.get(0)?,
        principal: row.get(1)?,
        created_ms: row.get(2)?,
        last_active_ms: row.get(3)?,
        protocol_version: row.get(4)?,
        init_params: parse_json(Some(row.get(5)?))?.unwrap_or(Value::Null),
        client_name: row.get(6)?,
        client_version: row.get(7)?,
        upstream_name: row.get(8)?,
        state: if state == "live" {
            SessionState::Live
        } else {
            SessionState::Closed
        },
        close_reason: row.get(10)?,
        closed_ms: row.get(11)?,
        restore: parse_json(Some(row.get(12)?))?.unwrap_or(Value::Null),
        principal_email: row.get(13)?,
        principal_name: row.get(14)?,
        client_type: row.get(15)?,
        transport: row.get(16)?,
        upstream_fingerprint: row.get(17)?,
    })
}

pub(super) fn row_to_stream(row: &rusqlite::Row<'_>) -> rusqlite::Result<StreamRecord> {
    Ok(StreamRecord {
        session_id: row.get(0)?,
        stream_id: row.get(1)?,
        client_request_id: parse_json(row.get(2)?)?,
        request: parse_json(row.get(3)?)?,
        retryable: row.get(4)?,
        done: row.get(5)?,
        created_ms: row.get(6)?,
        last_seq: row.get::<_, i64>(7)? as u64,
    })
}

/// A summary's columns. Client strings are cut to 256 characters here, so a page of rows
/// written before records were bounded (issue 26: a 4 MB `clientInfo.name`) stays small.
pub(super) const SUMMARY_COLUMNS: &str =
    "id, principal, principal_email, principal_name, substr(client_name, 1, 256),
    substr(client_version, 1, 256), client_type,
    protocol_version, upstream_name, state, close_reason, created_ms, last_active_ms, closed_ms,
    tool_calls, errors, rehydrations, upstream_restarts, transport";

pub(super) fn row_to_summary(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionSummary> {
    let created_ms: i64 = row.get(11)?;
    let closed_ms: Option<i64> = row.get(13)?;
    Ok(SessionSummary {
        id: row.get(0)?,
        user_id: row.get(1)?,
        user_email: row.get(2)?,
        user_name: row.get(3)?,
        client_name: row.get(4)?,
        client_version: row.get(5)?,
        client_type: row.get(6)?,
        protocol_version: row.get(7)?,
        upstream_name: row.get(8)?,
        state: row.get(9)?,
        close_reason: row.get(10)?,
        created_ms,
        last_active_ms: row.get(12)?,
        closed_ms,
        duration_ms: closed_ms
            .unwrap_or_else(now_ms)
            .saturating_sub(created_ms)
            .max(0),
        tool_calls: row.get(14)?,
        errors: row.get(15)?,
        rehydrations: row.get(16)?,
        upstream_restarts: row.get(17)?,
        transport: row.get(18)?,
    })
}

pub(super) fn row_to_call(row: &rusqlite::Row<'_>) -> rusqlite::Result<ToolCallRecord> {
    Ok(ToolCallRecord {
        session_id: row.get(0)?,
        tool: row.get(1)?,
        started_ms: row.get(2)?,
        duration_ms: row.get(3)?,
        outcome: row.get(4)?,
        error_code: row.get(5)?,
    })
}

pub(super) const STREAM_COLUMNS: &str = "s.session_id, s.stream_id, s.client_request_id, s.request, s.retryable, s.done, s.created_ms,
    COALESCE((SELECT max(seq) FROM events e WHERE e.session_id = s.session_id AND e.stream_id = s.stream_id), 0)";
