//! The embedded SQLite store (WAL mode).
//!
//! One writer thread owns the write connection and applies every write in batches: it takes
//! whatever has queued while the previous commit ran and commits it as one transaction
//! (group commit), then resolves each write's [`Ack`]. With `synchronous=NORMAL` in WAL mode
//! a commit is durable against a crash of this process without an fsync per commit; fsyncs
//! happen at checkpoints, which a third connection runs on its own thread so that no commit
//! waits behind one. Reads use a second connection on the blocking pool, so they never
//! wait behind a commit.
//!
//! Must not: write rows from more than its one writer thread (the checkpointer only moves
//! committed pages), or run an unbounded statement on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::tasks::TaskRecord;

use super::{
    Ack, CallRow, EventRecord, LedgerEvent, LedgerSink, LedgerStore, LiveStore, Servers,
    SessionEvent, SessionQuery, SessionRecord, SessionState, SessionSummary, StoreError,
    StreamRecord, ToolCallRecord, Totals, UserRow, now_ms,
};

mod ledger;
mod rows;
mod tasks;
mod writer;

use rows::*;
pub use writer::LogBounds;
use writer::*;

/// Events kept per stream unless configured otherwise (`--max-stream-events`).
pub const DEFAULT_MAX_STREAM_EVENTS: u64 = 10_000;

/// SQLite-backed [`LiveStore`] and [`LedgerStore`].
pub struct SqliteStore {
    path: PathBuf,
    /// The database file's (device, inode) when it was opened: a file deleted or replaced
    /// under the gateway is a different one (or none), and writes to the one still open
    /// "succeed" and are lost at the next start.
    file_id: (u64, u64),
    writes: mpsc::Sender<Op>,
    reader: Arc<Mutex<Connection>>,
}

/// (device, inode) of a file.
fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| (m.dev(), m.ino()))
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
-- Partial: a new stream (done = 0) touches no index, finishing one adds one entry; the
-- full (done, created_ms) index it replaces cost an insert, a delete and an insert per call.
CREATE INDEX IF NOT EXISTS streams_done_by_age ON streams(created_ms) WHERE done = 1;
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
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    record TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_principal ON tasks(principal, created_ms, id);
CREATE INDEX IF NOT EXISTS tasks_by_creation ON tasks(created_ms);
CREATE INDEX IF NOT EXISTS tasks_by_expiry ON tasks(expires_ms) WHERE expires_ms IS NOT NULL;
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
        SqliteStore::open_with(dir, LogBounds::default())
    }

    /// Opens the store keeping each stream's and each session's log within `bounds`: past
    /// one, the oldest events are deleted as new ones are written (a standalone stream that
    /// never ends, or a client that never reads, would otherwise grow the file without
    /// bound).
    pub fn open_with(dir: &Path, bounds: LogBounds) -> Result<SqliteStore, StoreError> {
        crate::state_dir::prepare(dir).map_err(|e| {
            StoreError::Backend(format!("cannot create state dir {}: {e}", dir.display()))
        })?;
        let path = dir.join("tether.db");
        // Private from the start: SQLite gives its `-wal` and `-shm` files this file's mode.
        crate::state_dir::create_private(&path)
            .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", path.display())))?;
        let writer = Connection::open(&path).map_err(backend)?;
        incremental_vacuum(&writer).map_err(backend)?;
        // No automatic checkpoints on the writer: SQLite runs them inside a commit, on the
        // thread every write waits for (copying the WAL into the database and syncing it,
        // every ≈4 MB of WAL): the p99 of a call. The checkpointer thread does it instead.
        // The WAL file is cut back to 16 MiB after each checkpoint that resets it (it kept
        // the size of its largest burst, gigabytes after a flood; issue 26).
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;
                 PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit=16777216;",
            )
            .map_err(backend)?;
        writer.execute_batch(SCHEMA).map_err(backend)?;
        migrate(&writer).map_err(backend)?;
        let reader = Connection::open(&path).map_err(backend)?;
        reader
            .execute_batch("PRAGMA busy_timeout=5000;")
            .map_err(backend)?;
        // Not bounded by count, and this is a known gap: the writer empties it into one
        // transaction per turn (up to 4,096 ops), so while the disk keeps up it holds one
        // turn's worth; but a stalled disk (a full or hung volume) lets an upstream that
        // floods notifications grow it, since the session's pump pushes events without
        // waiting for their acks. Bounding it needs backpressure on that pump, which is
        // the write-path redesign of the hot-path issue (15), not a channel swap here.
        let (writes, rx) = mpsc::channel();
        crate::threads::spawn("tether-store", {
            let wal = dir.join("tether.db-wal");
            move || writer_loop(writer, rx, bounds, wal)
        })
        .map_err(|e| StoreError::Backend(format!("cannot start store writer: {e}")))?;
        let reader = Arc::new(Mutex::new(reader));
        let checkpoints = Connection::open(&path).map_err(backend)?;
        checkpoints
            .execute_batch("PRAGMA busy_timeout=5000; PRAGMA journal_size_limit=16777216;")
            .map_err(backend)?;
        let alive = Arc::downgrade(&reader);
        crate::threads::spawn("tether-checkpoint", move || {
            checkpoint_loop(&checkpoints, &alive)
        })
        .map_err(|e| StoreError::Backend(format!("cannot start store checkpointer: {e}")))?;
        let file_id = file_id(&path)
            .map_err(|e| StoreError::Backend(format!("cannot stat {}: {e}", path.display())))?;
        Ok(SqliteStore {
            path,
            file_id,
            writes,
            reader,
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file at the path is still the one this store writes: deleting (or
    /// replacing) it leaves the open connections writing to an unlinked inode, so every
    /// write "succeeds" and is lost at the next start.
    fn same_file(&self) -> Result<(), StoreError> {
        match file_id(&self.path) {
            Ok(id) if id == self.file_id => Ok(()),
            Ok(_) => Err(StoreError::Unavailable(format!(
                "the database file {} was replaced under the gateway; what is written now would be lost, so new sessions are refused until it restarts",
                self.path.display()
            ))),
            Err(e) => Err(StoreError::Unavailable(format!(
                "the database file {} was removed ({e}); what is written now would be lost, so new sessions are refused until the gateway restarts",
                self.path.display()
            ))),
        }
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

    /// Gives the file's free pages back to the file system, a bounded number per writer
    /// turn (pruning and the per-session log bound free them; the file shrinks).
    pub async fn reclaim(&self) -> Result<(), StoreError> {
        // At most 256 turns of 2,048 pages (2 GiB of 4 KiB pages) per call.
        for _ in 0..256 {
            let (tx, rx) = oneshot::channel();
            if self.writes.send(Op::Reclaim(tx)).is_err() {
                return Err(StoreError::Closed);
            }
            if !rx.await.unwrap_or(Err(StoreError::Closed))? {
                break;
            }
        }
        Ok(())
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

/// Makes the file one whose free pages can be given back (`auto_vacuum = INCREMENTAL`, so
/// pruning shrinks the file: it never did, and stayed at the size of its largest flood;
/// issue 26). A new file takes the setting at once; a file an earlier version made is
/// rewritten once (`VACUUM`), which takes as long as copying it.
fn incremental_vacuum(conn: &Connection) -> rusqlite::Result<()> {
    const INCREMENTAL: i64 = 2;
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode == INCREMENTAL {
        return Ok(());
    }
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
    let now: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if now != INCREMENTAL {
        let tables: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )?;
        if tables > 0 {
            tracing::info!("rewriting the session store once so that it gives freed space back");
        }
        conn.execute_batch("VACUUM")?;
    }
    Ok(())
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
    // Replaced by the partial `streams_done_by_age` (issue 15).
    conn.execute_batch("DROP INDEX IF EXISTS streams_finished")?;
    Ok(())
}

impl LedgerSink for SqliteStore {
    fn record(&self, events: Vec<LedgerEvent>) -> Ack {
        self.submit(|d| Op::Ledger(events, d))
    }
}

#[async_trait::async_trait]
impl LiveStore for SqliteStore {
    fn put_task(&self, task: &TaskRecord) -> Ack {
        let task = Box::new(task.clone());
        self.submit(|d| Op::Task(task, d))
    }

    async fn load_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| tasks::load(c, &id))
            .await?
            .map(|text| tasks::decode(&text))
            .transpose()
    }

    async fn list_tasks(
        &self,
        principal: &str,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let principal = principal.to_owned();
        let texts = self
            .read(move |c| tasks::list(c, &principal, after, limit))
            .await?;
        texts.iter().map(|t| tasks::decode(t)).collect()
    }

    async fn recent_tasks(&self, limit: usize) -> Result<Vec<TaskRecord>, StoreError> {
        let texts = self.read(move |c| tasks::recent(c, limit)).await?;
        texts.iter().map(|t| tasks::decode(t)).collect()
    }

    async fn count_tasks(&self, principal: &str) -> Result<u64, StoreError> {
        let principal = principal.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT COUNT(*) FROM tasks WHERE principal = ?1")?
                .query_row(params![principal], |r| r.get::<_, i64>(0))
        })
        .await
        .map(|n| u64::try_from(n).unwrap_or(0))
    }

    async fn prune_tasks(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.prune_in_chunks(PruneKind::Tasks, now_ms).await
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    async fn create_session(&self, record: SessionRecord) -> Result<(), StoreError> {
        self.submit(|d| Op::CreateSession(Box::new(record), d))
            .await?;
        // Committed, but to the file this store opened: if that is no longer the file at
        // its path, the record is lost at the next start, and the session must not be
        // acknowledged (issue 26: one was, and was 404 after a restart).
        self.same_file()
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

    async fn idle_sessions(
        &self,
        cutoff_ms: i64,
        limit: usize,
        of: Servers<'_>,
    ) -> Result<Vec<String>, StoreError> {
        // (mode, names as a JSON array): 0 every server, 1 the one named, 2 none named.
        let (mode, names) = match of {
            Servers::All => (0, "[]".to_owned()),
            Servers::Only(n) => (1, serde_json::json!([n]).to_string()),
            Servers::NoneOf(ns) => (2, serde_json::json!(ns).to_string()),
        };
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id FROM sessions WHERE state = 'live' AND last_active_ms < ?1
                   AND (?3 = 0
                        OR (?3 = 1 AND upstream_name IN (SELECT value FROM json_each(?4)))
                        OR (?3 = 2 AND upstream_name NOT IN (SELECT value FROM json_each(?4))))
                 ORDER BY last_active_ms LIMIT ?2",
            )?;
            let rows =
                stmt.query_map(params![cutoff_ms, limit as i64, mode, names], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn stale_pooled(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id FROM sessions WHERE state = 'live' AND transport = 'pooled'",
            )?;
            let rows = stmt.query_map([], |r| r.get(0))?;
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
        self.same_file()?;
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
        let removed = self.prune_in_chunks(PruneKind::Events, cutoff_ms).await?;
        self.reclaim().await?;
        Ok(removed)
    }
}

/// How often the checkpointer copies the WAL into the database; a checkpoint with
/// nothing to copy costs a few system calls.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// WAL pages (4 KiB) past which a checkpoint holds writes up until it has reset the WAL:
/// the bound on the file when passive checkpoints cannot catch up (16 MiB), as under an
/// upstream flooding a stream.
const WAL_LIMIT_PAGES: i64 = 4096;

/// Checkpoints the WAL off the writer's thread until the store is dropped (`alive` is the
/// store's reader connection). A `PASSIVE` checkpoint never waits for the writer or for
/// readers, so no commit waits behind it; SQLite starts the WAL over at the first write
/// after a checkpoint that copied all of it. Only when writes never pause long enough for
/// that, and the WAL passes [`WAL_LIMIT_PAGES`], does a `RESTART` checkpoint make the
/// writer wait, once, to bound the file.
fn checkpoint_loop(conn: &Connection, alive: &std::sync::Weak<std::sync::Mutex<Connection>>) {
    while alive.strong_count() > 0 {
        std::thread::sleep(CHECKPOINT_EVERY);
        let passive = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
        match passive {
            Ok(wal_pages) if wal_pages > WAL_LIMIT_PAGES => {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, wal_pages, "cannot reset the store's write-ahead log");
                }
            }
            Ok(_) => {}
            // A full disk or a deleted file shows in the writer's commits and in readiness.
            Err(e) => tracing::debug!(error = %e, "store checkpoint failed"),
        }
    }
}

#[cfg(test)]
mod tests;
