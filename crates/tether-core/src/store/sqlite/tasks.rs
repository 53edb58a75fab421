//! Task records in SQLite: one row per task, its record as JSON beside the columns the
//! queries need (principal and creation for listing, expiry for pruning). Written by the
//! writer thread (`Op::Task`, `PruneKind::Tasks`), read on the reader connection.
//! Must not: interpret a record beyond the columns it indexes.

use super::*;

/// Stores `task`, replacing its earlier state.
pub(super) fn put(conn: &Connection, task: &TaskRecord) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO tasks (id, principal, created_ms, expires_ms, record) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(id) DO UPDATE SET expires_ms = excluded.expires_ms, record = excluded.record",
    )?
    .execute(params![
        task.id,
        task.principal,
        task.created_ms,
        task.expires_ms(),
        task.to_json()
    ])?;
    Ok(())
}

/// The stored record of task `id`, as text.
pub(super) fn load(conn: &Connection, id: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT record FROM tasks WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()
}

/// A principal's records after `after` (creation time, id), oldest first.
pub(super) fn list(
    conn: &Connection,
    principal: &str,
    after: Option<(i64, String)>,
    limit: usize,
) -> rusqlite::Result<Vec<String>> {
    let (after_ms, after_id) = after.unwrap_or((i64::MIN, String::new()));
    conn.prepare_cached(
        "SELECT record FROM tasks WHERE principal = ?1 AND (created_ms, id) > (?2, ?3)
         ORDER BY created_ms, id LIMIT ?4",
    )?
    .query_map(
        params![
            principal,
            after_ms,
            after_id,
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |r| r.get(0),
    )?
    .collect()
}

/// The newest records of every principal, at most `limit`.
pub(super) fn recent(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<String>> {
    conn.prepare_cached("SELECT record FROM tasks ORDER BY created_ms DESC, id DESC LIMIT ?1")?
        .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            r.get(0)
        })?
        .collect()
}

/// Deletes at most `limit` tasks expired at `now_ms`.
pub(super) fn prune(conn: &Connection, now_ms: i64, limit: usize) -> rusqlite::Result<Pruned> {
    let budget = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = conn
        .prepare_cached(
            "DELETE FROM tasks WHERE id IN
             (SELECT id FROM tasks WHERE expires_ms IS NOT NULL AND expires_ms <= ?1 LIMIT ?2)",
        )?
        .execute(params![now_ms, budget])?;
    Ok(Pruned {
        rows: rows as u64,
        more: rows as i64 == budget,
    })
}

/// A stored record read back; a record that does not decode is corrupt, not absent.
pub(super) fn decode(text: &str) -> Result<TaskRecord, StoreError> {
    TaskRecord::from_json(text).map_err(StoreError::Corrupt)
}
