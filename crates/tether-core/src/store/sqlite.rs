//! The embedded SQLite store (WAL mode).
//!
//! One writer thread owns the write connection and applies every write in batches: it takes
//! whatever has queued while the previous commit ran and commits it as one transaction
//! (group commit), then resolves each write's [`Ack`]. With `synchronous=NORMAL` in WAL mode
//! a commit is durable against a crash of this process without an fsync per commit; fsyncs
//! happen at checkpoints. Reads use a second connection on the blocking pool, so they never
//! wait behind a commit.
//!
//! Must not: write from more than its one writer thread, or run an unbounded statement on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::oneshot;

use super::{
    Ack, CallRow, EventRecord, LedgerEvent, LedgerSink, LedgerStore, LiveStore, SessionEvent,
    SessionQuery, SessionRecord, SessionState, SessionSummary, StoreError, StreamRecord,
    ToolCallRecord, Totals, UserRow, now_ms,
};

type Done = oneshot::Sender<Result<(), StoreError>>;

enum Op {
    CreateSession(Box<SessionRecord>, Done),
    Touch(String, i64),
    Restore(String, Value, Done),
    Ledger(Vec<LedgerEvent>, Done),
    Close {
        id: String,
        reason: String,
        at_ms: i64,
        done: Done,
    },
    OpenStream(StreamRecord, Done),
    Append(EventRecord, Done),
    Flush(Done),
    /// A real write (readiness): `Flush` commits nothing when nothing is queued.
    Probe(Done),
    /// One bounded chunk of pruning of everything older than the cutoff; answers the rows
    /// removed and whether more remain. Run after the batch's other writes.
    Prune(PruneKind, i64, oneshot::Sender<Result<Pruned, StoreError>>),
}

/// What a prune chunk removes.
#[derive(Debug, Clone, Copy)]
enum PruneKind {
    /// Stream logs: closed sessions' and finished streams past event retention.
    Events,
    /// Ledger history: tool calls and closed sessions past ledger retention.
    Ledger,
}

/// What one prune chunk did.
#[derive(Debug, Clone, Copy, Default)]
struct Pruned {
    /// Rows counted as removed (events, or tool calls and sessions).
    rows: u64,
    /// Whether the chunk stopped at its limit with work left.
    more: bool,
}

/// Rows one prune chunk may delete. Each chunk is one writer transaction, so this bounds
/// how long every other write can wait behind pruning (a few milliseconds).
const PRUNE_CHUNK: usize = 2000;

/// Events kept per stream unless configured otherwise (`--max-stream-events`).
pub const DEFAULT_MAX_STREAM_EVENTS: u64 = 10_000;

/// SQLite-backed [`LiveStore`] and [`LedgerStore`].
pub struct SqliteStore {
    path: PathBuf,
    writes: mpsc::Sender<Op>,
    reader: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    principal_email TEXT,
    principal_name TEXT,
    client_type TEXT NOT NULL DEFAULT 'unknown',
    tool_calls INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    rehydrations INTEGER NOT NULL DEFAULT 0,
    upstream_restarts INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    last_active_ms INTEGER NOT NULL,
    protocol_version TEXT NOT NULL,
    init_params TEXT NOT NULL,
    client_name TEXT,
    client_version TEXT,
    upstream_name TEXT NOT NULL,
    state TEXT NOT NULL,
    close_reason TEXT,
    closed_ms INTEGER,
    restore TEXT NOT NULL DEFAULT '{}',
    transport TEXT NOT NULL DEFAULT 'streamable-http',
    upstream_fingerprint TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions(state, last_active_ms);
CREATE INDEX IF NOT EXISTS sessions_by_principal ON sessions(principal, last_active_ms);
CREATE TABLE IF NOT EXISTS tool_calls (
    session_id TEXT NOT NULL,
    tool TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error_code INTEGER
);
CREATE INDEX IF NOT EXISTS tool_calls_by_time ON tool_calls(started_ms);
CREATE INDEX IF NOT EXISTS tool_calls_by_session ON tool_calls(session_id, started_ms);
CREATE TABLE IF NOT EXISTS streams (
    session_id TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    client_request_id TEXT,
    request TEXT,
    retryable INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (session_id, stream_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS streams_finished ON streams(done, created_ms);
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (session_id, stream_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_events (
    session_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS session_events_by_session ON session_events(session_id, at_ms);
CREATE TABLE IF NOT EXISTS closed_logs (
    session_id TEXT PRIMARY KEY
) WITHOUT ROWID;
";

#[allow(clippy::needless_pass_by_value)] // used as `map_err(backend)`
fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

impl SqliteStore {
    /// Opens (creating if needed) `tether.db` in `dir` and starts the writer thread.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(dir, DEFAULT_MAX_STREAM_EVENTS)
    }

    /// Opens the store keeping at most `max_stream_events` events per stream: when a
    /// stream's log grows past it, its oldest events are deleted as new ones are written
    /// (a standalone stream that never ends would otherwise grow the file without bound).
    pub fn open_with(dir: &Path, max_stream_events: u64) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!("cannot create state dir {}: {e}", dir.display()))
        })?;
        let path = dir.join("tether.db");
        let writer = Connection::open(&path).map_err(backend)?;
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;",
            )
            .map_err(backend)?;
        writer.execute_batch(SCHEMA).map_err(backend)?;
        migrate(&writer).map_err(backend)?;
        let reader = Connection::open(&path).map_err(backend)?;
        reader
            .execute_batch("PRAGMA busy_timeout=5000;")
            .map_err(backend)?;
        let (writes, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("tether-store".into())
            .spawn(move || writer_loop(writer, rx, max_stream_events.max(1)))
            .map_err(|e| StoreError::Backend(format!("cannot start store writer: {e}")))?;
        Ok(SqliteStore {
            path,
            writes,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn submit(&self, make: impl FnOnce(Done) -> Op) -> Ack {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(make(tx)).is_err() {
            return Box::pin(std::future::ready(Err(StoreError::Closed)));
        }
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
    }

    /// Prunes chunk by chunk, each its own writer transaction, so other sessions' writes
    /// queue behind a few milliseconds of deleting at most.
    async fn prune_in_chunks(&self, kind: PruneKind, cutoff_ms: i64) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let (tx, rx) = oneshot::channel();
            if self.writes.send(Op::Prune(kind, cutoff_ms, tx)).is_err() {
                return Err(StoreError::Closed);
            }
            let chunk = rx.await.unwrap_or(Err(StoreError::Closed))?;
            removed += chunk.rows;
            if !chunk.more {
                return Ok(removed);
            }
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn).map_err(backend)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("store reader failed: {e}")))?
    }
}

#[allow(clippy::needless_pass_by_value)] // the writer thread owns both for its whole life
fn writer_loop(conn: Connection, rx: mpsc::Receiver<Op>, max_stream_events: u64) {
    const MAX_BATCH: usize = 4096;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        apply_batch(&conn, batch, max_stream_events);
    }
}

fn apply_batch(conn: &Connection, batch: Vec<Op>, max_stream_events: u64) {
    let mut results: Vec<(Done, Result<(), StoreError>)> = Vec::with_capacity(batch.len());
    let mut prunes = Vec::new();
    let mut touches: HashMap<String, i64> = HashMap::new();
    let began = conn.execute_batch("BEGIN IMMEDIATE").map_err(backend);
    for op in batch {
        if let Err(e) = &began {
            match op {
                Op::CreateSession(_, d)
                | Op::OpenStream(_, d)
                | Op::Append(_, d)
                | Op::Flush(d)
                | Op::Probe(d)
                | Op::Restore(_, _, d)
                | Op::Ledger(_, d) => results.push((d, Err(e.clone()))),
                Op::Close { done, .. } => results.push((done, Err(e.clone()))),
                Op::Prune(_, _, d) => {
                    let _ = d.send(Err(e.clone()));
                }
                Op::Touch(..) => {}
            }
            continue;
        }
        match op {
            Op::CreateSession(r, d) => results.push((d, insert_session(conn, &r).map_err(backend))),
            Op::Touch(id, at) => {
                let slot = touches.entry(id).or_insert(at);
                *slot = (*slot).max(at);
            }
            Op::Restore(id, v, d) => results.push((
                d,
                conn.prepare_cached("UPDATE sessions SET restore = ?2 WHERE id = ?1")
                    .and_then(|mut s| s.execute(params![id, json_text(&v)]))
                    .map(|_| ())
                    .map_err(backend),
            )),
            Op::Close {
                id,
                reason,
                at_ms,
                done,
            } => results.push((
                done,
                close_session(conn, &id, &reason, at_ms).map_err(backend),
            )),
            Op::OpenStream(s, d) => results.push((d, insert_stream(conn, &s).map_err(backend))),
            Op::Append(e, d) => results.push((
                d,
                insert_event(conn, &e, max_stream_events).map_err(backend),
            )),
            Op::Flush(d) => results.push((d, Ok(()))),
            Op::Probe(d) => results.push((
                d,
                conn.prepare_cached("INSERT OR REPLACE INTO probe (id, at_ms) VALUES (1, ?1)")
                    .and_then(|mut s| s.execute(params![now_ms()]))
                    .map(|_| ())
                    .map_err(backend),
            )),
            Op::Prune(kind, cutoff, d) => prunes.push((kind, cutoff, d)),
            Op::Ledger(events, d) => {
                results.push((d, write_ledger(conn, &events).map_err(backend)))
            }
        }
    }
    if began.is_ok() {
        for (id, at) in touches {
            if let Err(e) = conn
                .prepare_cached(
                    "UPDATE sessions SET last_active_ms = max(last_active_ms, ?2) WHERE id = ?1",
                )
                .and_then(|mut s| s.execute(params![id, at]))
            {
                tracing::warn!(error = %e, "store: cannot record session activity");
            }
        }
        let pruned: Vec<_> = prunes
            .into_iter()
            .map(|(kind, cutoff, d)| {
                let r = match kind {
                    PruneKind::Events => prune(conn, cutoff, PRUNE_CHUNK),
                    PruneKind::Ledger => prune_ledger(conn, cutoff, PRUNE_CHUNK),
                };
                (d, r.map_err(backend))
            })
            .collect();
        let committed = conn.execute_batch("COMMIT").map_err(backend);
        if let Err(err) = &committed {
            tracing::error!(error = %err, "store: commit failed; writes in this batch are lost");
            let _ = conn.execute_batch("ROLLBACK");
            for (_, r) in &mut results {
                *r = Err(err.clone());
            }
        }
        for (d, r) in pruned {
            let _ = d.send(committed.clone().and(r));
        }
    }
    for (d, r) in results {
        let _ = d.send(r);
    }
}

/// Brings a database written by an earlier version up to the current schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has = |column: &str| -> rusqlite::Result<bool> {
        let mut stmt =
            conn.prepare("SELECT 1 FROM pragma_table_info('sessions') WHERE name = ?1")?;
        stmt.exists(params![column])
    };
    if !has("upstream_fingerprint")? {
        conn.execute_batch("ALTER TABLE sessions ADD COLUMN upstream_fingerprint TEXT")?;
    }
    Ok(())
}

fn insert_session(conn: &Connection, r: &SessionRecord) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO sessions (id, principal, created_ms, last_active_ms, protocol_version, init_params,
            client_name, client_version, upstream_name, state, close_reason, closed_ms, restore,
            principal_email, principal_name, client_type, transport, upstream_fingerprint)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
    )?
    .execute(params![
        r.id,
        r.principal,
        r.created_ms,
        r.last_active_ms,
        r.protocol_version,
        json_text(&r.init_params),
        r.client_name,
        r.client_version,
        r.upstream_name,
        r.state.as_str(),
        r.close_reason,
        r.closed_ms,
        json_text(&r.restore),
        r.principal_email,
        r.principal_name,
        r.client_type,
        r.transport,
        r.upstream_fingerprint
    ])?;
    Ok(())
}

fn close_session(conn: &Connection, id: &str, reason: &str, at_ms: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE sessions SET state = 'closed', close_reason = ?2, closed_ms = ?3 WHERE id = ?1 AND state = 'live'",
    )?
    .execute(params![id, reason, at_ms])?;
    // The log itself goes in bounded chunks at the next prune: a busy session can hold
    // hundreds of thousands of rows, and deleting them here, in one writer transaction,
    // stalled every other session's writes for seconds (found by the 30-minute soak).
    conn.prepare_cached("INSERT OR IGNORE INTO closed_logs (session_id) VALUES (?1)")?
        .execute(params![id])?;
    Ok(())
}

fn insert_stream(conn: &Connection, s: &StreamRecord) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO streams (session_id, stream_id, client_request_id, request, retryable, done, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        s.session_id,
        s.stream_id,
        s.client_request_id.as_ref().map(json_text),
        s.request.as_ref().map(json_text),
        s.retryable,
        s.done,
        s.created_ms
    ])?;
    Ok(())
}

fn insert_event(conn: &Connection, e: &EventRecord, max_events: u64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO events (session_id, stream_id, seq, data, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![&*e.session_id, &*e.stream_id, e.seq as i64, &*e.data, now_ms()])?;
    if e.seq > max_events {
        // Only long streams pay this, one indexed delete of about one row per event.
        conn.prepare_cached(
            "DELETE FROM events WHERE session_id = ?1 AND stream_id = ?2 AND seq <= ?3",
        )?
        .execute(params![
            &*e.session_id,
            &*e.stream_id,
            (e.seq - max_events) as i64
        ])?;
    }
    if &*e.stream_id == super::STANDALONE_STREAM {
        // The standalone stream is never opened like a request stream, but its last
        // sequence number must be known after a restart (or new events would reuse ids).
        conn.prepare_cached(
            "INSERT OR IGNORE INTO streams (session_id, stream_id, retryable, done, created_ms) VALUES (?1, ?2, 0, 0, ?3)",
        )?
        .execute(params![&*e.session_id, &*e.stream_id, now_ms()])?;
    }
    if e.terminal {
        conn.prepare_cached(
            "UPDATE streams SET done = 1 WHERE session_id = ?1 AND stream_id = ?2",
        )?
        .execute(params![&*e.session_id, &*e.stream_id])?;
    }
    Ok(())
}

fn insert_session_event(
    conn: &Connection,
    id: &str,
    at_ms: i64,
    kind: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO session_events (session_id, at_ms, kind) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![id, at_ms, kind])?;
    Ok(())
}

fn write_ledger(conn: &Connection, events: &[LedgerEvent]) -> rusqlite::Result<()> {
    for e in events {
        match e {
            LedgerEvent::ToolCall(c) => {
                conn.prepare_cached(
                    "INSERT INTO tool_calls (session_id, tool, started_ms, duration_ms, outcome, error_code)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![c.session_id, c.tool, c.started_ms, c.duration_ms, c.outcome, c.error_code])?;
                conn.prepare_cached(
                    "UPDATE sessions SET tool_calls = tool_calls + 1, errors = errors + ?2 WHERE id = ?1",
                )?
                .execute(params![c.session_id, i64::from(c.outcome != "ok")])?;
            }
            LedgerEvent::Rehydrated { id, at_ms } => {
                conn.prepare_cached(
                    "UPDATE sessions SET rehydrations = rehydrations + 1 WHERE id = ?1",
                )?
                .execute(params![id])?;
                insert_session_event(conn, id, *at_ms, "rehydrated")?;
            }
            LedgerEvent::UpstreamRestarted { id, at_ms } => {
                conn.prepare_cached(
                    "UPDATE sessions SET upstream_restarts = upstream_restarts + 1 WHERE id = ?1",
                )?
                .execute(params![id])?;
                insert_session_event(conn, id, *at_ms, "upstream_restarted")?;
            }
            // Sent only when the live store is another backend: this file is then the
            // ledger alone, and keeps the history of sessions that live elsewhere.
            LedgerEvent::Opened(r) => {
                if conn
                    .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
                    .exists(params![r.id])?
                {
                    continue;
                }
                insert_session(conn, r)?;
            }
            LedgerEvent::Closed { id, reason, at_ms } => {
                conn.prepare_cached(
                    "UPDATE sessions SET state = 'closed', close_reason = ?2, closed_ms = ?3 WHERE id = ?1 AND state = 'live'",
                )?
                .execute(params![id, reason, at_ms])?;
            }
            LedgerEvent::Touched { id, at_ms } => {
                conn.prepare_cached(
                    "UPDATE sessions SET last_active_ms = max(last_active_ms, ?2) WHERE id = ?1",
                )?
                .execute(params![id, at_ms])?;
            }
        }
    }
    Ok(())
}

/// One bounded chunk of ledger pruning, at most `limit` rows: tool calls, then closed
/// sessions, past retention. At thousands of calls a second ten minutes of history is
/// millions of rows, too many for one writer transaction.
fn prune_ledger(conn: &Connection, cutoff: i64, limit: usize) -> rusqlite::Result<Pruned> {
    let calls = conn
        .prepare_cached(
            "DELETE FROM tool_calls WHERE rowid IN
               (SELECT rowid FROM tool_calls WHERE started_ms < ?1 LIMIT ?2)",
        )?
        .execute(params![cutoff, limit as i64])?;
    if calls == limit {
        return Ok(Pruned {
            rows: calls as u64,
            more: true,
        });
    }
    let events = conn
        .prepare_cached(
            "DELETE FROM session_events WHERE rowid IN
               (SELECT rowid FROM session_events WHERE at_ms < ?1 LIMIT ?2)",
        )?
        .execute(params![cutoff, (limit - calls) as i64])?;
    let calls = calls + events;
    if calls == limit {
        return Ok(Pruned {
            rows: calls as u64,
            more: true,
        });
    }
    let sessions = conn
        .prepare_cached(
            "DELETE FROM sessions WHERE id IN
               (SELECT id FROM sessions WHERE state = 'closed' AND closed_ms < ?1 LIMIT ?2)",
        )?
        .execute(params![cutoff, (limit - calls) as i64])?;
    Ok(Pruned {
        rows: (calls + sessions) as u64,
        more: calls + sessions == limit,
    })
}

/// One bounded chunk of pruning: first the logs of closed sessions, then finished streams
/// created before `cutoff`, then old events of live sessions' standalone streams (which
/// never finish). At most `limit` rows of closed logs and standalone events, and at most
/// `limit` finished streams, each with its events (a handful per stream in practice: the
/// answer and any notifications before it).
fn prune(conn: &Connection, cutoff: i64, limit: usize) -> rusqlite::Result<Pruned> {
    let mut out = Pruned::default();
    let mut budget = limit;
    let closed: Vec<String> = conn
        .prepare_cached("SELECT session_id FROM closed_logs LIMIT ?1")?
        .query_map(params![limit as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in closed {
        let events = conn
            .prepare_cached(
                "DELETE FROM events WHERE (session_id, stream_id, seq) IN
                   (SELECT session_id, stream_id, seq FROM events WHERE session_id = ?1 LIMIT ?2)",
            )?
            .execute(params![id, budget as i64])?;
        out.rows += events as u64;
        budget -= events;
        if budget == 0 {
            out.more = true;
            return Ok(out);
        }
        let streams = conn
            .prepare_cached(
                "DELETE FROM streams WHERE (session_id, stream_id) IN
                   (SELECT session_id, stream_id FROM streams WHERE session_id = ?1 LIMIT ?2)",
            )?
            .execute(params![id, budget as i64])?;
        budget -= streams;
        if budget == 0 {
            out.more = true;
            return Ok(out);
        }
        conn.prepare_cached("DELETE FROM closed_logs WHERE session_id = ?1")?
            .execute(params![id])?;
    }
    let finished: Vec<(String, String)> = conn
        .prepare_cached(
            "SELECT session_id, stream_id FROM streams WHERE done = 1 AND created_ms < ?1 LIMIT ?2",
        )?
        .query_map(params![cutoff, budget as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (session, stream) in &finished {
        out.rows += conn
            .prepare_cached("DELETE FROM events WHERE session_id = ?1 AND stream_id = ?2")?
            .execute(params![session, stream])? as u64;
        conn.prepare_cached("DELETE FROM streams WHERE session_id = ?1 AND stream_id = ?2")?
            .execute(params![session, stream])?;
    }
    if finished.len() == budget {
        out.more = true;
        return Ok(out);
    }
    budget -= finished.len();
    // Walks live sessions' standalone streams by key rather than scanning every event.
    let standalone = conn
        .prepare_cached(
            "DELETE FROM events WHERE (session_id, stream_id, seq) IN
               (SELECT e.session_id, e.stream_id, e.seq FROM sessions s
                  JOIN events e ON e.session_id = s.id AND e.stream_id = '0'
                 WHERE s.state = 'live' AND e.created_ms < ?1 LIMIT ?2)",
        )?
        .execute(params![cutoff, budget as i64])?;
    out.rows += standalone as u64;
    out.more = standalone == budget;
    Ok(out)
}

fn parse_json(text: Option<String>) -> rusqlite::Result<Option<Value>> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

fn row_to_session(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
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

fn row_to_stream(row: &rusqlite::Row<'_>) -> rusqlite::Result<StreamRecord> {
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

const SUMMARY_COLUMNS: &str =
    "id, principal, principal_email, principal_name, client_name, client_version, client_type,
    protocol_version, upstream_name, state, close_reason, created_ms, last_active_ms, closed_ms,
    tool_calls, errors, rehydrations, upstream_restarts";

fn row_to_summary(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionSummary> {
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
    })
}

fn row_to_call(row: &rusqlite::Row<'_>) -> rusqlite::Result<ToolCallRecord> {
    Ok(ToolCallRecord {
        session_id: row.get(0)?,
        tool: row.get(1)?,
        started_ms: row.get(2)?,
        duration_ms: row.get(3)?,
        outcome: row.get(4)?,
        error_code: row.get(5)?,
    })
}

const STREAM_COLUMNS: &str = "s.session_id, s.stream_id, s.client_request_id, s.request, s.retryable, s.done, s.created_ms,
    COALESCE((SELECT max(seq) FROM events e WHERE e.session_id = s.session_id AND e.stream_id = s.stream_id), 0)";

impl LedgerSink for SqliteStore {
    fn record(&self, events: Vec<LedgerEvent>) -> Ack {
        self.submit(|d| Op::Ledger(events, d))
    }
}

#[async_trait::async_trait]
impl LiveStore for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    async fn create_session(&self, record: SessionRecord) -> Result<(), StoreError> {
        self.submit(|d| Op::CreateSession(Box::new(record), d))
            .await
    }

    async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT id, principal, created_ms, last_active_ms, protocol_version, init_params, client_name,
                        client_version, upstream_name, state, close_reason, closed_ms, restore,
                        principal_email, principal_name, client_type, transport, upstream_fingerprint
                 FROM sessions WHERE id = ?1",
            )?
            .query_row(params![id], row_to_session)
            .optional()
        })
        .await
    }

    fn set_restore(&self, id: &str, restore: Value) -> Ack {
        let id = id.to_owned();
        self.submit(|d| Op::Restore(id, restore, d))
    }

    fn touch(&self, id: &str, at_ms: i64) {
        let _ = self.writes.send(Op::Touch(id.to_owned(), at_ms));
    }

    async fn close_session(&self, id: &str, reason: &str, at_ms: i64) -> Result<(), StoreError> {
        let (id, reason) = (id.to_owned(), reason.to_owned());
        self.submit(|done| Op::Close {
            id,
            reason,
            at_ms,
            done,
        })
        .await
    }

    async fn idle_sessions(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id FROM sessions WHERE state = 'live' AND last_active_ms < ?1 ORDER BY last_active_ms LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cutoff_ms, limit as i64], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn count_live(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT count(*) FROM sessions WHERE state = 'live'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
        })
        .await
    }

    fn open_stream(&self, record: StreamRecord) -> Ack {
        self.submit(|d| Op::OpenStream(record, d))
    }

    fn append_event(&self, event: EventRecord) -> Ack {
        self.submit(|d| Op::Append(event, d))
    }

    fn flush(&self) -> Ack {
        self.submit(Op::Flush)
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        // Deleting the file leaves the open connections writing to an unlinked inode:
        // every write "succeeds" and is lost at the next start.
        if !self.path.exists() {
            return Err(StoreError::Backend(format!(
                "the database file {} was removed",
                self.path.display()
            )));
        }
        self.submit(Op::Probe).await
    }

    async fn events_after(
        &self,
        session_id: &str,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let (s, t) = (session_id.to_owned(), stream_id.to_owned());
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, data FROM events WHERE session_id = ?1 AND stream_id = ?2 AND seq > ?3 ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![s, t, after as i64], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    async fn stream(
        &self,
        session_id: &str,
        stream_id: &str,
    ) -> Result<Option<StreamRecord>, StoreError> {
        let (s, t) = (session_id.to_owned(), stream_id.to_owned());
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {STREAM_COLUMNS} FROM streams s WHERE s.session_id = ?1 AND s.stream_id = ?2"
            ))?
            .query_row(params![s, t], row_to_stream)
            .optional()
        })
        .await
    }

    async fn unfinished_streams(&self, session_id: &str) -> Result<Vec<StreamRecord>, StoreError> {
        let s = session_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {STREAM_COLUMNS} FROM streams s WHERE s.session_id = ?1 AND s.done = 0 AND s.stream_id != '0'
                 ORDER BY s.created_ms"
            ))?;
            let rows = stmt.query_map(params![s], row_to_stream)?;
            rows.collect()
        })
        .await
    }

    async fn prune_events(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        // Chunk by chunk, each its own writer transaction, so other sessions' writes queue
        // behind a few milliseconds of deleting at most.
        self.prune_in_chunks(PruneKind::Events, cutoff_ms).await
    }
}

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
                "SELECT session_id, tool, started_ms, duration_ms, outcome, error_code FROM tool_calls
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
                "SELECT t.session_id, t.tool, t.started_ms, t.duration_ms, t.outcome, t.error_code,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance as suite;

    #[tokio::test]
    async fn conformance_live_sessions() {
        let dir = tempfile::tempdir().unwrap();
        suite::sessions_round_trip_and_close(&SqliteStore::open(dir.path()).unwrap()).await;
    }

    #[tokio::test]
    async fn conformance_event_log_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        suite::event_log_survives_reopen(move || {
            Box::new(SqliteStore::open(&path).unwrap()) as Box<dyn LiveStore>
        })
        .await;
    }

    #[tokio::test]
    async fn conformance_concurrent_writes() {
        let dir = tempfile::tempdir().unwrap();
        suite::many_concurrent_writes(&SqliteStore::open(dir.path()).unwrap()).await;
    }

    #[tokio::test]
    async fn conformance_ledger_counts_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        suite::ledger_counts_and_retention_pruning(&SqliteStore::open(dir.path()).unwrap()).await;
    }

    #[tokio::test]
    async fn conformance_ledger_queries() {
        let dir = tempfile::tempdir().unwrap();
        suite::ledger_queries(&SqliteStore::open(dir.path()).unwrap()).await;
    }

    /// A busy closed session's log, many old finished streams and old standalone events all
    /// go, in chunks of at most `PRUNE_CHUNK` rows each (one writer transaction apiece), and
    /// one `prune_events` call runs the chunks until nothing is left; a stream within
    /// retention stays. Ledger pruning is chunked the same way.
    #[tokio::test]
    async fn pruning_goes_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (stream, event) = (suite::stream, suite::event);
        for id in ["closed", "live"] {
            store.create_session(suite::record(id, 1)).await.unwrap();
        }
        let n = PRUNE_CHUNK + PRUNE_CHUNK / 2;
        let mut acks = Vec::new();
        for i in 0..n {
            for sid in ["closed", "live"] {
                acks.push(store.open_stream(stream(sid, &format!("r{i}"), 5)));
                acks.push(store.append_event(event(sid, &format!("r{i}"), 1, true)));
            }
        }
        let later = now_ms() + 600_000;
        acks.push(store.open_stream(stream("live", "recent", later)));
        acks.push(store.append_event(event("live", "recent", 1, true)));
        acks.push(store.append_event(event("live", "0", 1, false)));
        for a in futures::future::join_all(acks).await {
            a.unwrap();
        }
        store.close_session("closed", "timeout", 9).await.unwrap();

        let conn = Connection::open(store.path()).unwrap();
        let cutoff = now_ms() + 60_000;
        let (mut chunks, mut rows) = (0, 0);
        loop {
            let p = prune(&conn, cutoff, PRUNE_CHUNK).unwrap();
            assert!(p.rows as usize <= PRUNE_CHUNK);
            rows += p.rows;
            chunks += 1;
            if !p.more {
                break;
            }
        }
        assert_eq!(rows, 2 * n as u64 + 1, "every old event counted once");
        // 3,000 events + 3,000 streams of the closed session, 3,000 old streams of the live one.
        assert!(chunks >= 5, "{chunks} chunks");
        let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(count("SELECT count(*) FROM events"), 1);
        assert_eq!(
            count("SELECT count(*) FROM streams WHERE stream_id != '0'"),
            1
        );
        assert_eq!(count("SELECT count(*) FROM closed_logs"), 0);
        assert!(store.stream("live", "recent").await.unwrap().is_some());
        assert_eq!(store.prune_events(cutoff).await.unwrap(), 0);

        let calls: Vec<_> = (0..2 * PRUNE_CHUNK + 1)
            .map(|i| suite::call("live", "echo", i as i64, "ok"))
            .collect();
        store.record(calls).await.unwrap();
        // The calls, and the session closed at 9 ms.
        assert_eq!(
            store.prune_ledger(1_000_000).await.unwrap(),
            2 * PRUNE_CHUNK as u64 + 2
        );
    }

    /// The shared-file case: a session created through the live store is the ledger's row,
    /// and the mirror events a split deployment sends change nothing twice.
    #[tokio::test]
    async fn one_file_serves_both_roles() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.create_session(suite::record("s", 10)).await.unwrap();
        store
            .record(vec![LedgerEvent::Opened(Box::new(suite::record("s", 10)))])
            .await
            .unwrap();
        assert_eq!(store.totals().await.unwrap().sessions, 1);
        assert_eq!(
            store.session_summary("s").await.unwrap().unwrap().state,
            "live"
        );
    }
}
