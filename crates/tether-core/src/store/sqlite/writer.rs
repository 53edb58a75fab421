//! The writer thread: takes every queued write, commits them as one transaction (group
//! commit), answers each write's ack; prunes in bounded chunks between batches.
//! Must not: run an unbounded statement (every prune is a chunk), or answer an ack before
//! its commit.

use super::*;

pub(super) type Done = oneshot::Sender<Result<(), StoreError>>;

pub(super) enum Op {
    CreateSession(Box<SessionRecord>, Done),
    /// A task's record, new or changed (replaces the stored one).
    Task(Box<TaskRecord>, Done),
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
    /// Gives free pages back to the file system (`incremental_vacuum`, a bounded number
    /// per op, after the batch commits); answers whether free pages remain.
    Reclaim(oneshot::Sender<Result<bool, StoreError>>),
}

/// The bounds of the stored log ([`SqliteStore::open_with`]).
#[derive(Debug, Clone, Copy)]
pub struct LogBounds {
    /// Events kept per stream (`--max-stream-events`).
    pub stream_events: u64,
    /// Events kept per session, all streams together.
    pub session_events: u64,
    /// Bytes of events kept per session (`--max-session-log`).
    pub session_bytes: u64,
}

impl Default for LogBounds {
    fn default() -> Self {
        LogBounds {
            stream_events: DEFAULT_MAX_STREAM_EVENTS,
            session_events: DEFAULT_MAX_STREAM_EVENTS * 10,
            session_bytes: 64 << 20,
        }
    }
}

/// What each session's log holds, as the writer knows it (read from the file the first
/// time a session appends in this process, then kept up to date).
#[derive(Debug, Default)]
pub(super) struct SessionLogs(HashMap<String, (u64, u64)>);

/// Free pages given back per [`Op::Reclaim`]: bounded work per writer turn.
const RECLAIM_PAGES: i64 = 2048;

/// What a prune chunk removes.
#[derive(Debug, Clone, Copy)]
pub(super) enum PruneKind {
    /// Stream logs: closed sessions' and finished streams past event retention.
    Events,
    /// Ledger history: tool calls and closed sessions past ledger retention.
    Ledger,
    /// Tasks past their time to live (the cutoff is now).
    Tasks,
}

/// What one prune chunk did.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Pruned {
    /// Rows counted as removed (events, or tool calls and sessions).
    pub(super) rows: u64,
    /// Whether the chunk stopped at its limit with work left.
    pub(super) more: bool,
}

/// Rows one prune chunk may delete. Each chunk is one writer transaction, so this bounds
/// how long every other write can wait behind pruning (a few milliseconds).
pub(super) const PRUNE_CHUNK: usize = 2000;

#[allow(clippy::needless_pass_by_value)] // the writer thread owns both for its whole life
pub(super) fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Op>,
    bounds: LogBounds,
    wal: std::path::PathBuf,
) {
    let mut logs = SessionLogs::default();
    const MAX_BATCH: usize = 4096;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        apply_batch(&conn, batch, bounds, &mut logs);
        // The checkpointer thread never catches up with a writer that commits without a
        // pause (a flood): each of its passes ends behind new frames, so the WAL is never
        // reset and grows by the gigabyte (issue 26: 1.1 GB for a 1 GiB flood). Past
        // WAL_HARD_LIMIT the writer pauses until the WAL is checkpointed whole and cut
        // back (a pause of about one copy of the WAL, which normal traffic never reaches;
        // the sessions' write budgets hold their upstreams meanwhile).
        bound_wal(&conn, &wal, WAL_HARD_LIMIT);
    }
}

/// Truncates the WAL at `wal` once it is larger than `limit` ([`writer_loop`]).
fn bound_wal(conn: &Connection, wal: &std::path::Path, limit: u64) {
    if std::fs::metadata(wal).is_ok_and(|m| m.len() > limit) {
        truncate_wal(conn);
    }
}

/// WAL size past which the writer waits for it to be checkpointed ([`writer_loop`]).
const WAL_HARD_LIMIT: u64 = 64 << 20;

/// Checkpoints the whole WAL and truncates it, trying again while another connection's
/// checkpoint runs (it finishes now that the writer has stopped adding frames), for at
/// most a second.
fn truncate_wal(conn: &Connection) {
    for _ in 0..100 {
        match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        }) {
            Ok(0) => return,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot checkpoint the store's write-ahead log");
                return;
            }
        }
    }
    tracing::debug!("the write-ahead log stayed busy for a second; checkpointing later");
}

pub(super) fn apply_batch(
    conn: &Connection,
    batch: Vec<Op>,
    bounds: LogBounds,
    logs: &mut SessionLogs,
) {
    let mut results: Vec<(Done, Result<(), StoreError>)> = Vec::with_capacity(batch.len());
    let mut prunes = Vec::new();
    let mut reclaims = Vec::new();
    let mut touches: HashMap<String, i64> = HashMap::new();
    // Budget places of the events written: given back once this batch is committed,
    // before anyone waiting on it hears so.
    let mut holds: Vec<crate::store::Hold> = Vec::new();
    let began = conn.execute_batch("BEGIN IMMEDIATE").map_err(backend);
    for op in batch {
        if let Err(e) = &began {
            match op {
                Op::CreateSession(_, d)
                | Op::Task(_, d)
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
                Op::Reclaim(d) => {
                    let _ = d.send(Err(e.clone()));
                }
                Op::Touch(..) => {}
            }
            continue;
        }
        match op {
            Op::CreateSession(r, d) => results.push((d, insert_session(conn, &r).map_err(backend))),
            Op::Task(t, d) => results.push((d, super::tasks::put(conn, &t).map_err(backend))),
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
            } => {
                logs.forget(&id);
                results.push((
                    done,
                    close_session(conn, &id, &reason, at_ms).map_err(backend),
                ));
            }
            Op::OpenStream(s, d) => results.push((d, insert_stream(conn, &s).map_err(backend))),
            Op::Append(e, d) => {
                let r = insert_event(conn, &e, bounds.stream_events)
                    .and_then(|()| bound_session_log(conn, &e, bounds, logs));
                results.push((d, r.map_err(backend)));
                holds.extend(e.hold);
            }
            Op::Flush(d) => results.push((d, Ok(()))),
            Op::Probe(d) => results.push((
                d,
                conn.prepare_cached("INSERT OR REPLACE INTO probe (id, at_ms) VALUES (1, ?1)")
                    .and_then(|mut s| s.execute(params![now_ms()]))
                    .map(|_| ())
                    .map_err(backend),
            )),
            Op::Prune(kind, cutoff, d) => prunes.push((kind, cutoff, d)),
            Op::Reclaim(d) => reclaims.push(d),
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
                    PruneKind::Tasks => super::tasks::prune(conn, cutoff, PRUNE_CHUNK),
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
    drop(holds);
    for (d, r) in results {
        let _ = d.send(r);
    }
    if !reclaims.is_empty() {
        // Outside the batch's transaction: incremental_vacuum runs in its own.
        // Stepped to its end: each step frees pages.
        let vacuum = || -> rusqlite::Result<bool> {
            let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({RECLAIM_PAGES})"))?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
            let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            Ok(free > 0)
        };
        let r = vacuum().map_err(backend);
        for d in reclaims {
            let _ = d.send(r.clone());
        }
    }
}

/// Keeps a session's stored log within its bounds by count and bytes (all its streams
/// together): past a bound its oldest events go, a tenth of the bound at a time, never the
/// newest event of a stream (its sequence number is what a restarted gateway continues
/// from, so no event id is reused). Streams past `--max-stream-events` are cut by
/// `insert_event` already.
fn bound_session_log(
    conn: &Connection,
    e: &EventRecord,
    bounds: LogBounds,
    logs: &mut SessionLogs,
) -> rusqlite::Result<()> {
    let id = &*e.session_id;
    let used = match logs.0.get_mut(id) {
        Some(u) => u,
        None => {
            let u: (i64, i64) = conn
                .prepare_cached(
                    "SELECT count(*), coalesce(sum(octet_length(data)), 0) FROM events WHERE session_id = ?1",
                )?
                .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            logs.0
                .entry(id.to_owned())
                .or_insert((u.0.max(0) as u64, u.1.max(0) as u64))
        }
    };
    // The row just written is in the count read from the file, not in one kept here.
    used.0 += 1;
    used.1 += e.data.len() as u64;
    if used.0 <= bounds.session_events && used.1 <= bounds.session_bytes {
        return Ok(());
    }
    let target = (
        bounds.session_events - bounds.session_events / 10,
        bounds.session_bytes - bounds.session_bytes / 10,
    );
    // `octet_length`, not `length`: SQLite answers it from the record's header, without
    // reading (and counting the characters of) each event's text.
    let mut stmt = conn.prepare_cached(
        "DELETE FROM events WHERE (session_id, stream_id, seq) IN (
             SELECT e.session_id, e.stream_id, e.seq FROM events e
             WHERE e.session_id = ?1
               AND e.seq < (SELECT max(seq) FROM events m
                            WHERE m.session_id = e.session_id AND m.stream_id = e.stream_id)
             ORDER BY e.created_ms, e.seq LIMIT ?2)
         RETURNING octet_length(data)",
    )?;
    while used.0 > target.0 || used.1 > target.1 {
        let lengths: Vec<i64> = stmt
            .query_map(params![id, 256], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if lengths.is_empty() {
            break;
        }
        used.0 = used.0.saturating_sub(lengths.len() as u64);
        used.1 = used
            .1
            .saturating_sub(lengths.iter().sum::<i64>().max(0) as u64);
    }
    Ok(())
}

impl SessionLogs {
    /// Forgets a session (closed: its log is pruned as a whole).
    pub(super) fn forget(&mut self, id: &str) {
        self.0.remove(id);
    }
}

pub(super) fn insert_session(conn: &Connection, r: &SessionRecord) -> rusqlite::Result<()> {
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

pub(super) fn close_session(
    conn: &Connection,
    id: &str,
    reason: &str,
    at_ms: i64,
) -> rusqlite::Result<()> {
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

pub(super) fn insert_stream(conn: &Connection, s: &StreamRecord) -> rusqlite::Result<()> {
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

pub(super) fn insert_event(
    conn: &Connection,
    e: &EventRecord,
    max_events: u64,
) -> rusqlite::Result<()> {
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
    if &*e.stream_id == crate::store::STANDALONE_STREAM {
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

pub(super) fn insert_session_event(
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

pub(super) fn write_ledger(conn: &Connection, events: &[LedgerEvent]) -> rusqlite::Result<()> {
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

/// One bounded chunk of ledger pruning, at most `limit` rows: tool calls, then timeline
/// events, then closed sessions, past retention. At thousands of calls a second ten minutes of history is
/// millions of rows, too many for one writer transaction.
pub(super) fn prune_ledger(
    conn: &Connection,
    cutoff: i64,
    limit: usize,
) -> rusqlite::Result<Pruned> {
    // In this order, each taking what the budget has left.
    const STATEMENTS: [&str; 3] = [
        "DELETE FROM tool_calls WHERE rowid IN
           (SELECT rowid FROM tool_calls WHERE started_ms < ?1 LIMIT ?2)",
        "DELETE FROM session_events WHERE rowid IN
           (SELECT rowid FROM session_events WHERE at_ms < ?1 LIMIT ?2)",
        "DELETE FROM sessions WHERE id IN
           (SELECT id FROM sessions WHERE state = 'closed' AND closed_ms < ?1 LIMIT ?2)",
    ];
    let mut removed = 0;
    for sql in STATEMENTS {
        removed += conn
            .prepare_cached(sql)?
            .execute(params![cutoff, (limit - removed) as i64])?;
        if removed == limit {
            break;
        }
    }
    Ok(Pruned {
        rows: removed as u64,
        more: removed == limit,
    })
}

/// One bounded chunk of pruning: first the logs of closed sessions, then finished streams
/// created before `cutoff`, then old events of live sessions' standalone streams (which
/// never finish). At most `limit` rows of closed logs and standalone events, and at most
/// `limit` finished streams, each with its events (a handful per stream in practice: the
/// answer and any notifications before it).
pub(super) fn prune(conn: &Connection, cutoff: i64, limit: usize) -> rusqlite::Result<Pruned> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Without automatic checkpoints (as the writer runs) a WAL grows with every commit;
    /// past the limit the writer cuts it back to nothing, and the data stays.
    #[test]
    fn the_wal_is_truncated_past_its_hard_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let wal = dir.path().join("t.db-wal");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE t (v BLOB);",
        )
        .unwrap();
        for _ in 0..64 {
            conn.execute("INSERT INTO t VALUES (zeroblob(65536))", [])
                .unwrap();
        }
        let grown = std::fs::metadata(&wal).unwrap().len();
        assert!(grown > 4 << 20, "the WAL grew to {grown} bytes");
        bound_wal(&conn, &wal, 8 << 20);
        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            grown,
            "under the limit: kept"
        );
        bound_wal(&conn, &wal, 1 << 20);
        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            0,
            "past the limit: truncated"
        );
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 64);
    }
}
