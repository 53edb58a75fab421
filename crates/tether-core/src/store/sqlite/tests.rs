use super::*;
use crate::store::conformance as suite;

/// Issue 26: a session's stored log is bounded by bytes and count over all its streams
/// (the oldest go, never a stream's newest: its sequence continues after a restart),
/// and the file gives freed space back.
#[tokio::test]
async fn a_sessions_log_is_bounded_and_the_file_shrinks_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(
        dir.path(),
        LogBounds {
            stream_events: 1_000,
            session_events: 1_000,
            session_bytes: 100_000,
        },
    )
    .unwrap();
    store.create_session(suite::record("s", 1)).await.unwrap();
    store
        .create_session(suite::record("other", 1))
        .await
        .unwrap();
    let big = "x".repeat(10_000);
    for seq in 1..=60u64 {
        for stream in ["0", "r1"] {
            let mut e = suite::event("s", stream, seq, false);
            e.data = format!("{{\"n\":{seq},\"pad\":\"{big}\"}}").into();
            drop(store.append_event(e));
        }
    }
    drop(store.append_event(suite::event("other", "0", 1, false)));
    store.flush().await.unwrap();
    let (count, bytes): (i64, i64) = store
        .read(|c| {
            c.query_row(
                "SELECT count(*), sum(length(data)) FROM events WHERE session_id = 's'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
        .unwrap();
    assert!(
        bytes <= 100_000 && count <= 10,
        "{count} events, {bytes} bytes kept"
    );
    for stream in ["0", "r1"] {
        let newest = store.events_after("s", stream, 59).await.unwrap();
        assert_eq!(newest.len(), 1, "the newest of {stream} is kept");
        assert_eq!(newest[0].0, 60);
    }
    assert_eq!(
        store.events_after("other", "0", 0).await.unwrap().len(),
        1,
        "another session is untouched"
    );
    // Closed and pruned: the file gives the space back.
    let size = || {
        std::fs::metadata(dir.path().join("tether.db"))
            .unwrap()
            .len()
    };
    store.close_session("s", "timeout", 2).await.unwrap();
    store.prune_events(now_ms()).await.unwrap();
    store.flush().await.unwrap();
    let (free, pages): (i64, i64) = store
        .read(|c| {
            Ok((
                c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?,
                c.query_row("PRAGMA page_count", [], |r| r.get(0))?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(
        free,
        0,
        "free pages given back ({pages} pages, {} bytes)",
        size()
    );
    drop(store);

    // A file an earlier version made (no auto_vacuum, in WAL mode) is rewritten once.
    let old = tempfile::tempdir().unwrap();
    {
        let c = Connection::open(old.path().join("tether.db")).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL;").unwrap();
        c.execute_batch(SCHEMA).unwrap();
    }
    let reopened = SqliteStore::open(old.path()).unwrap();
    let mode: i64 = reopened
        .read(|c| c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(mode, 2, "incremental");
}

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
async fn conformance_tasks() {
    let dir = tempfile::tempdir().unwrap();
    suite::tasks_are_kept_listed_and_pruned(&SqliteStore::open(dir.path()).unwrap()).await;
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
