//! The PostgreSQL ledger: session history and tool calls shared by every instance of a
//! deployment, so any instance's admin API, CLI and dashboard show all of them.
//!
//! Migrations run at start under an advisory lock (instances starting together do not race)
//! and are recorded in `tether_migrations`. Tables live in the connection's `search_path`,
//! so a deployment (or a test) can use its own schema with
//! `?options=-c%20search_path%3Dmyschema`. Writes come only from the ledger writer
//! ([`crate::ledger`]), which buffers and retries while the database is unreachable.
//!
//! Must not: serve live state.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::{
    Ack, CallRow, LedgerEvent, LedgerSink, LedgerStore, SessionEvent, SessionQuery, SessionState,
    SessionSummary, StoreError, ToolCallRecord, Totals, UserRow, now_ms,
};

/// Schema versions, applied in order; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    principal_email TEXT,
    principal_name TEXT,
    client_name TEXT,
    client_version TEXT,
    client_type TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    upstream_name TEXT NOT NULL,
    transport TEXT NOT NULL,
    state TEXT NOT NULL,
    close_reason TEXT,
    created_ms BIGINT NOT NULL,
    last_active_ms BIGINT NOT NULL,
    closed_ms BIGINT,
    tool_calls BIGINT NOT NULL DEFAULT 0,
    errors BIGINT NOT NULL DEFAULT 0,
    rehydrations BIGINT NOT NULL DEFAULT 0,
    upstream_restarts BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions(state, last_active_ms);
CREATE INDEX IF NOT EXISTS sessions_by_principal ON sessions(principal, last_active_ms);
CREATE TABLE IF NOT EXISTS tool_calls (
    session_id TEXT NOT NULL,
    tool TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    error_code BIGINT
);
CREATE INDEX IF NOT EXISTS tool_calls_by_time ON tool_calls(started_ms);
CREATE INDEX IF NOT EXISTS tool_calls_by_session ON tool_calls(session_id, started_ms);
",
    "
CREATE TABLE IF NOT EXISTS session_events (
    session_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS session_events_by_session ON session_events(session_id, at_ms);
CREATE INDEX IF NOT EXISTS session_events_by_time ON session_events(at_ms);
",
];

/// PostgreSQL-backed [`LedgerStore`].
#[derive(Clone)]
pub struct PostgresLedger {
    pool: Pool,
    shown: String,
}

fn pg(e: &tokio_postgres::Error) -> StoreError {
    if e.is_closed() || e.as_db_error().is_none() {
        StoreError::Unavailable(format!("postgres: {e}"))
    } else {
        StoreError::Backend(format!("postgres: {e}"))
    }
}

fn pool_err(e: &deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!("postgres: {e}"))
}

const SUMMARY_COLUMNS: &str =
    "id, principal, principal_email, principal_name, substr(client_name, 1, 256),
    substr(client_version, 1, 256), client_type,
    protocol_version, upstream_name, state, close_reason, created_ms, last_active_ms, closed_ms,
    tool_calls, errors, rehydrations, upstream_restarts, transport";

fn row_to_summary(r: &tokio_postgres::Row) -> SessionSummary {
    let created_ms: i64 = r.get(11);
    let closed_ms: Option<i64> = r.get(13);
    SessionSummary {
        id: r.get(0),
        user_id: r.get(1),
        user_email: r.get(2),
        user_name: r.get(3),
        client_name: r.get(4),
        client_version: r.get(5),
        client_type: r.get(6),
        protocol_version: r.get(7),
        upstream_name: r.get(8),
        state: r.get(9),
        close_reason: r.get(10),
        created_ms,
        last_active_ms: r.get(12),
        closed_ms,
        duration_ms: closed_ms
            .unwrap_or_else(now_ms)
            .saturating_sub(created_ms)
            .max(0),
        tool_calls: r.get(14),
        errors: r.get(15),
        rehydrations: r.get(16),
        upstream_restarts: r.get(17),
        transport: r.get(18),
    }
}

fn row_to_call(r: &tokio_postgres::Row) -> ToolCallRecord {
    ToolCallRecord {
        session_id: r.get(0),
        tool: r.get(1),
        started_ms: r.get(2),
        duration_ms: r.get(3),
        outcome: r.get(4),
        error_code: r.get(5),
    }
}

impl PostgresLedger {
    /// Connects, creates the pool and runs pending migrations.
    pub async fn connect(url: &str) -> Result<PostgresLedger, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("postgres URL: {e}")))?;
        config.connect_timeout(Duration::from_secs(3));
        if config.get_application_name().is_none() {
            config.application_name("tether");
        }
        let shown = format!(
            "postgres://{}/{}",
            config
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_default(),
            config.get_dbname().unwrap_or("")
        );
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(3)))
            .create_timeout(Some(Duration::from_secs(3)))
            .recycle_timeout(Some(Duration::from_secs(3)))
            .build()
            .map_err(|e| StoreError::Backend(format!("postgres pool: {e}")))?;
        let ledger = PostgresLedger { pool, shown };
        ledger.migrate().await?;
        Ok(ledger)
    }

    /// Where the ledger is (no credentials).
    pub fn describe(&self) -> String {
        self.shown.clone()
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(|e| pool_err(&e))?;
        let tx = client.transaction().await.map_err(|e| pg(&e))?;
        tx.execute("SELECT pg_advisory_xact_lock(7450001)", &[])
            .await
            .map_err(|e| pg(&e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS tether_migrations (version INTEGER PRIMARY KEY, applied_ms BIGINT NOT NULL)",
        )
        .await
        .map_err(|e| pg(&e))?;
        let done: i32 = tx
            .query_one(
                "SELECT COALESCE(max(version), 0) FROM tether_migrations",
                &[],
            )
            .await
            .map_err(|e| pg(&e))?
            .get(0);
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
            if version <= done {
                continue;
            }
            tx.batch_execute(sql).await.map_err(|e| pg(&e))?;
            tx.execute(
                "INSERT INTO tether_migrations (version, applied_ms) VALUES ($1, $2)",
                &[&version, &now_ms()],
            )
            .await
            .map_err(|e| pg(&e))?;
            tracing::info!(version, "ledger migration applied");
        }
        tx.commit().await.map_err(|e| pg(&e))
    }

    async fn write(&self, events: Vec<LedgerEvent>) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(|e| pool_err(&e))?;
        let tx = client.transaction().await.map_err(|e| pg(&e))?;
        for e in &events {
            match e {
                LedgerEvent::ToolCall(c) => {
                    tx.execute(
                        "INSERT INTO tool_calls (session_id, tool, started_ms, duration_ms, outcome, error_code)
                         VALUES ($1, $2, $3, $4, $5, $6)",
                        &[&c.session_id, &c.tool, &c.started_ms, &c.duration_ms, &c.outcome, &c.error_code],
                    )
                    .await
                    .map_err(|e| pg(&e))?;
                    tx.execute(
                        "UPDATE sessions SET tool_calls = tool_calls + 1, errors = errors + $2 WHERE id = $1",
                        &[&c.session_id, &i64::from(c.outcome != "ok")],
                    )
                    .await
                    .map_err(|e| pg(&e))?;
                }
                LedgerEvent::Rehydrated { id, at_ms } => {
                    tx.execute(
                        "UPDATE sessions SET rehydrations = rehydrations + 1 WHERE id = $1",
                        &[id],
                    )
                    .await
                    .map_err(|e| pg(&e))?;
                    tx.execute(
                        "INSERT INTO session_events (session_id, at_ms, kind) VALUES ($1, $2, 'rehydrated')",
                        &[id, at_ms],
                    )
                    .await
                    .map_err(|e| pg(&e))?;
                }
                LedgerEvent::UpstreamRestarted { id, at_ms } => {
                    tx.execute(
                        "UPDATE sessions SET upstream_restarts = upstream_restarts + 1 WHERE id = $1",
                        &[id],
                    )
                    .await
                    .map_err(|e| pg(&e))?;
                    tx.execute(
                        "INSERT INTO session_events (session_id, at_ms, kind) VALUES ($1, $2, 'upstream_restarted')",
                        &[id, at_ms],
                    )
                    .await
                    .map_err(|e| pg(&e))?;
                }
                LedgerEvent::Opened(r) => {
                    tx.execute(
                        "INSERT INTO sessions (id, principal, principal_email, principal_name, client_name,
                            client_version, client_type, protocol_version, upstream_name, transport, state,
                            close_reason, created_ms, last_active_ms, closed_ms)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                         ON CONFLICT (id) DO NOTHING",
                        &[
                            &r.id,
                            &r.principal,
                            &r.principal_email,
                            &r.principal_name,
                            &r.client_name,
                            &r.client_version,
                            &r.client_type,
                            &r.protocol_version,
                            &r.upstream_name,
                            &r.transport,
                            &r.state.as_str(),
                            &r.close_reason,
                            &r.created_ms,
                            &r.last_active_ms,
                            &r.closed_ms,
                        ],
                    )
                    .await
                    .map_err(|e| pg(&e))?;
                }
                LedgerEvent::Closed { id, reason, at_ms } => {
                    tx.execute(
                        "UPDATE sessions SET state = 'closed', close_reason = $2, closed_ms = $3 WHERE id = $1 AND state = 'live'",
                        &[id, reason, at_ms],
                    )
                    .await
                    .map_err(|e| pg(&e))?;
                }
                LedgerEvent::Touched { id, at_ms } => {
                    tx.execute(
                        "UPDATE sessions SET last_active_ms = GREATEST(last_active_ms, $2) WHERE id = $1",
                        &[id, at_ms],
                    )
                    .await
                    .map_err(|e| pg(&e))?;
                }
            }
        }
        tx.commit().await.map_err(|e| pg(&e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| pool_err(&e))
    }
}

impl LedgerSink for PostgresLedger {
    fn record(&self, events: Vec<LedgerEvent>) -> Ack {
        let this = self.clone();
        Box::pin(async move { this.write(events).await })
    }
}

#[async_trait::async_trait]
impl LedgerStore for PostgresLedger {
    async fn list_sessions(&self, q: &SessionQuery) -> Result<Vec<SessionSummary>, StoreError> {
        let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM sessions WHERE TRUE");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut arg = |sql: &mut String, frag: &str, v: Box<dyn ToSql + Sync + Send>| {
            args.push(v);
            sql.push_str(&frag.replace('?', &format!("${}", args.len())));
        };
        if let Some(state) = q.state {
            arg(&mut sql, " AND state = ?", Box::new(state.as_str()));
        }
        if let Some(user) = &q.user {
            arg(&mut sql, " AND principal = ?", Box::new(user.clone()));
        }
        if let Some(client) = &q.client {
            arg(&mut sql, " AND (client_type = ? ", Box::new(client.clone()));
            arg(&mut sql, "OR client_name = ?)", Box::new(client.clone()));
        }
        if let Some(server) = &q.server {
            arg(&mut sql, " AND upstream_name = ?", Box::new(server.clone()));
        }
        if let Some(since) = q.since_ms {
            arg(
                &mut sql,
                " AND GREATEST(last_active_ms, COALESCE(closed_ms, 0)) >= ?",
                Box::new(since),
            );
        }
        let order = if q.state == Some(SessionState::Closed) {
            "closed_ms"
        } else {
            "last_active_ms"
        };
        sql.push_str(&format!(" ORDER BY {order} DESC"));
        arg(
            &mut sql,
            " LIMIT ?",
            Box::new(i64::try_from(q.limit).unwrap_or(i64::MAX)),
        );
        arg(
            &mut sql,
            " OFFSET ?",
            Box::new(i64::try_from(q.offset).unwrap_or(i64::MAX)),
        );
        let params: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = self
            .client()
            .await?
            .query(&sql, &params)
            .await
            .map_err(|e| pg(&e))?;
        Ok(rows.iter().map(row_to_summary).collect())
    }

    async fn session_summary(&self, id: &str) -> Result<Option<SessionSummary>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {SUMMARY_COLUMNS} FROM sessions WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(|e| pg(&e))?;
        Ok(row.as_ref().map(row_to_summary))
    }

    async fn session_calls(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<ToolCallRecord>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT session_id, substr(tool, 1, 256), started_ms, duration_ms, outcome, error_code FROM tool_calls
                 WHERE session_id = $1 ORDER BY started_ms DESC LIMIT $2",
                &[&id, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(|e| pg(&e))?;
        Ok(rows.iter().map(row_to_call).collect())
    }

    async fn session_events(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT at_ms, kind FROM session_events WHERE session_id = $1 ORDER BY at_ms DESC LIMIT $2",
                &[&id, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(|e| pg(&e))?;
        Ok(rows
            .iter()
            .map(|r| SessionEvent {
                at_ms: r.get(0),
                kind: r.get(1),
            })
            .collect())
    }

    async fn calls_since(&self, since_ms: i64, limit: usize) -> Result<Vec<CallRow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT t.session_id, substr(t.tool, 1, 256), t.started_ms, t.duration_ms, t.outcome, t.error_code,
                        COALESCE(s.client_type, 'unknown'), COALESCE(s.upstream_name, ''), COALESCE(s.principal, 'anonymous')
                 FROM tool_calls t LEFT JOIN sessions s ON s.id = t.session_id
                 WHERE t.started_ms >= $1 ORDER BY t.started_ms DESC LIMIT $2",
                &[&since_ms, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(|e| pg(&e))?;
        Ok(rows
            .iter()
            .map(|r| CallRow {
                call: row_to_call(r),
                client_type: r.get(6),
                upstream_name: r.get(7),
                user_id: r.get(8),
            })
            .collect())
    }

    async fn totals(&self) -> Result<Totals, StoreError> {
        let r = self
            .client()
            .await?
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE state = 'live'),
                        (avg(closed_ms - created_ms) FILTER (WHERE state = 'closed'))::float8,
                        COALESCE(sum(tool_calls), 0)::bigint, COALESCE(sum(errors), 0)::bigint
                 FROM sessions",
                &[],
            )
            .await
            .map_err(|e| pg(&e))?;
        Ok(Totals {
            sessions: r.get(0),
            active: r.get(1),
            average_duration_ms: r.get(2),
            tool_calls: r.get(3),
            errors: r.get(4),
        })
    }

    async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT principal, max(principal_email), max(principal_name), count(*),
                        count(*) FILTER (WHERE state = 'live'),
                        sum(tool_calls)::bigint, sum(errors)::bigint, max(last_active_ms)
                 FROM sessions GROUP BY principal ORDER BY principal LIMIT 1000",
                &[],
            )
            .await
            .map_err(|e| pg(&e))?;
        Ok(rows
            .iter()
            .map(|r| UserRow {
                id: r.get(0),
                email: r.get(1),
                name: r.get(2),
                sessions: r.get(3),
                active: r.get(4),
                tool_calls: r.get(5),
                errors: r.get(6),
                last_active_ms: r.get(7),
            })
            .collect())
    }

    async fn prune_ledger(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| pg(&e))?;
        let calls = tx
            .execute(
                "DELETE FROM tool_calls WHERE started_ms < $1",
                &[&cutoff_ms],
            )
            .await
            .map_err(|e| pg(&e))?;
        let events = tx
            .execute("DELETE FROM session_events WHERE at_ms < $1", &[&cutoff_ms])
            .await
            .map_err(|e| pg(&e))?;
        let calls = calls + events;
        let sessions = tx
            .execute(
                "DELETE FROM sessions WHERE state = 'closed' AND closed_ms < $1",
                &[&cutoff_ms],
            )
            .await
            .map_err(|e| pg(&e))?;
        tx.commit().await.map_err(|e| pg(&e))?;
        Ok(calls + sessions)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::conformance as suite;

    #[tokio::test]
    async fn conformance_ledger_counts_and_pruning() {
        let Some((ledger, schema)) = suite::postgres_ledger("counts").await else {
            return;
        };
        suite::ledger_counts_and_retention_pruning(&ledger).await;
        suite::drop_schema(&schema).await;
    }

    #[tokio::test]
    async fn conformance_ledger_queries() {
        let Some((ledger, schema)) = suite::postgres_ledger("queries").await else {
            return;
        };
        suite::ledger_queries(&ledger).await;
        // Migrations are recorded once: connecting again applies nothing and keeps the data.
        drop(ledger);
        let url = std::env::var("TETHER_TEST_DATABASE_URL").unwrap();
        let sep = if url.contains('?') { '&' } else { '?' };
        let again = super::PostgresLedger::connect(&format!(
            "{url}{sep}options=-c%20search_path%3D{schema}"
        ))
        .await
        .unwrap();
        use crate::store::LedgerStore;
        assert_eq!(again.totals().await.unwrap().sessions, 3);
        suite::drop_schema(&schema).await;
    }

    #[tokio::test]
    async fn an_unreachable_database_is_reported_as_unavailable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err =
            super::PostgresLedger::connect(&format!("postgres://postgres@127.0.0.1:{port}/test"))
                .await
                .err()
                .expect("nothing listens there");
        assert!(
            matches!(err, crate::store::StoreError::Unavailable(_)),
            "{err:?}"
        );
    }
}
