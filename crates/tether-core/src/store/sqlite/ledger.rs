//! The ledger queries (session history, tool calls, users, totals, timeline events) on the
//! reader connection.
//! Must not: write (ledger rows arrive through the writer as `LedgerEvent`s).

use super::*;

#[async_trait::async_trait]
impl LedgerStore for SqliteStore {
    async fn list_sessions(&self, query: &SessionQuery) -> Result<Vec<SessionSummary>, StoreError> {
        let q = query.clone();
        self.read(move |c| {
            let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM sessions WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            if let Some(state) = q.state {
                sql.push_str(" AND state = ?");
                args.push(state.as_str().to_owned().into());
            }
            if let Some(user) = q.user {
                sql.push_str(" AND principal = ?");
                args.push(user.into());
            }
            if let Some(client) = q.client {
                sql.push_str(" AND (client_type = ? OR client_name = ?)");
                args.push(client.clone().into());
                args.push(client.into());
            }
            if let Some(server) = q.server {
                sql.push_str(" AND upstream_name = ?");
                args.push(server.into());
            }
            if let Some(since) = q.since_ms {
                sql.push_str(" AND max(last_active_ms, COALESCE(closed_ms, 0)) >= ?");
                args.push(since.into());
            }
            let order = if q.state == Some(SessionState::Closed) {
                "closed_ms"
            } else {
                "last_active_ms"
            };
            sql.push_str(&format!(" ORDER BY {order} DESC LIMIT ? OFFSET ?"));
            args.push((q.limit as i64).into());
            args.push((q.offset as i64).into());
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args), row_to_summary)?;
            rows.collect()
        })
        .await
    }

    async fn session_summary(&self, id: &str) -> Result<Option<SessionSummary>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS} FROM sessions WHERE id = ?1"
            ))?
            .query_row(params![id], row_to_summary)
            .optional()
        })
        .await
    }

    async fn session_calls(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<ToolCallRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT session_id, substr(tool, 1, 256), started_ms, duration_ms, outcome, error_code FROM tool_calls
                 WHERE session_id = ?1 ORDER BY started_ms DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![id, limit as i64], row_to_call)?;
            rows.collect()
        })
        .await
    }

    async fn session_events(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT at_ms, kind FROM session_events WHERE session_id = ?1 ORDER BY at_ms DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![id, limit as i64], |r| {
                Ok(SessionEvent {
                    at_ms: r.get(0)?,
                    kind: r.get(1)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn calls_since(&self, since_ms: i64, limit: usize) -> Result<Vec<CallRow>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT t.session_id, substr(t.tool, 1, 256), t.started_ms, t.duration_ms, t.outcome, t.error_code,
                        COALESCE(s.client_type, 'unknown'), COALESCE(s.upstream_name, ''), COALESCE(s.principal, 'anonymous')
                 FROM tool_calls t LEFT JOIN sessions s ON s.id = t.session_id
                 WHERE t.started_ms >= ?1 ORDER BY t.started_ms DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![since_ms, limit as i64], |r| {
                Ok(CallRow { call: row_to_call(r)?, client_type: r.get(6)?, upstream_name: r.get(7)?, user_id: r.get(8)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn totals(&self) -> Result<Totals, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT count(*), COALESCE(sum(state = 'live'), 0),
                        avg(CASE WHEN state = 'closed' THEN closed_ms - created_ms END),
                        COALESCE(sum(tool_calls), 0), COALESCE(sum(errors), 0)
                 FROM sessions",
                [],
                |r| {
                    Ok(Totals {
                        sessions: r.get(0)?,
                        active: r.get(1)?,
                        average_duration_ms: r.get(2)?,
                        tool_calls: r.get(3)?,
                        errors: r.get(4)?,
                    })
                },
            )
        })
        .await
    }

    async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT principal, max(principal_email), max(principal_name), count(*), sum(state = 'live'),
                        sum(tool_calls), sum(errors), max(last_active_ms)
                 FROM sessions GROUP BY principal ORDER BY principal LIMIT 1000",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(UserRow {
                    id: r.get(0)?,
                    email: r.get(1)?,
                    name: r.get(2)?,
                    sessions: r.get(3)?,
                    active: r.get(4)?,
                    tool_calls: r.get(5)?,
                    errors: r.get(6)?,
                    last_active_ms: r.get(7)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn prune_ledger(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        self.prune_in_chunks(PruneKind::Ledger, cutoff_ms).await
    }
}
