//! The store conformance suite: one set of behaviours every backend must show, run by each
//! backend's tests (SQLite always; Redis and PostgreSQL against the real servers named by
//! `TETHER_TEST_REDIS_URL` / `TETHER_TEST_DATABASE_URL`, each test in its own key prefix or
//! schema).
//!
//! Must not: be compiled into the gateway (tests only) or share a key prefix or schema between tests.

use serde_json::json;

use super::{
    EventRecord, LedgerEvent, LedgerStore, LiveStore, Servers, SessionQuery, SessionRecord,
    SessionState, StreamRecord, ToolCallRecord, now_ms,
};

/// A live session record.
pub fn record(id: &str, last_active_ms: i64) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        principal: "anonymous".into(),
        created_ms: 1,
        last_active_ms,
        protocol_version: "2025-11-25".into(),
        init_params: json!({"protocolVersion": "2025-11-25", "clientInfo": {"name": "t", "version": "1"}}),
        client_name: Some("t".into()),
        client_version: Some("1".into()),
        upstream_name: "demo".into(),
        upstream_fingerprint: None,
        state: SessionState::Live,
        close_reason: None,
        closed_ms: None,
        restore: json!({}),
        principal_email: None,
        principal_name: None,
        client_type: "unknown".into(),
        transport: "streamable-http".into(),
    }
}

/// An event whose data is `{"n": seq}`.
pub fn event(session: &str, stream: &str, seq: u64, terminal: bool) -> EventRecord {
    EventRecord {
        session_id: session.into(),
        stream_id: stream.into(),
        seq,
        data: format!("{{\"n\":{seq}}}").into(),
        terminal,
        hold: None,
    }
}

/// A request stream with nothing to repeat, opened at `created_ms`.
pub fn stream(session: &str, stream: &str, created_ms: i64) -> StreamRecord {
    StreamRecord {
        session_id: session.into(),
        stream_id: stream.into(),
        client_request_id: None,
        request: None,
        retryable: false,
        done: false,
        last_seq: 0,
        created_ms,
    }
}

/// A tool call of 3 ms; any outcome but `ok` carries an error code.
pub fn call(sid: &str, tool: &str, started_ms: i64, outcome: &str) -> LedgerEvent {
    LedgerEvent::ToolCall(ToolCallRecord {
        session_id: sid.into(),
        tool: tool.into(),
        started_ms,
        duration_ms: 3,
        outcome: outcome.into(),
        error_code: (outcome != "ok").then_some(-32012),
    })
}

/// Records round-trip; activity, restore state and close are stored; idle lookup works.
pub async fn sessions_round_trip_and_close(store: &dyn LiveStore) {
    store.create_session(record("a", 10)).await.unwrap();
    store.create_session(record("b", 20)).await.unwrap();
    assert_eq!(
        store.load_session("a").await.unwrap(),
        Some(record("a", 10))
    );
    assert_eq!(store.count_live().await.unwrap(), 2);
    store.touch("a", 50);
    store.flush().await.unwrap();
    assert_eq!(
        store
            .load_session("a")
            .await
            .unwrap()
            .unwrap()
            .last_active_ms,
        50
    );
    assert_eq!(
        store.idle_sessions(30, 10, Servers::All).await.unwrap(),
        vec!["b".to_owned()]
    );
    // Each server of a gateway reaps its own sessions.
    assert_eq!(
        store
            .idle_sessions(30, 10, Servers::Only("demo"))
            .await
            .unwrap(),
        vec!["b".to_owned()]
    );
    assert!(
        store
            .idle_sessions(30, 10, Servers::Only("another"))
            .await
            .unwrap()
            .is_empty()
    );
    // Servers no registry serves any more are reaped by elimination.
    assert_eq!(
        store
            .idle_sessions(30, 10, Servers::NoneOf(&["another".to_owned()]))
            .await
            .unwrap(),
        vec!["b".to_owned()]
    );
    assert!(
        store
            .idle_sessions(
                30,
                10,
                Servers::NoneOf(&["demo".to_owned(), "x".to_owned()])
            )
            .await
            .unwrap()
            .is_empty()
    );
    let restore = json!({"logLevel": "debug", "subscriptions": ["file:///a"]});
    store.set_restore("a", restore.clone()).await.unwrap();
    assert_eq!(
        store.load_session("a").await.unwrap().unwrap().restore,
        restore
    );
    store.close_session("b", "timeout", 99).await.unwrap();
    let b = store.load_session("b").await.unwrap().unwrap();
    assert_eq!(
        (b.state, b.close_reason.as_deref(), b.closed_ms),
        (SessionState::Closed, Some("timeout"), Some(99))
    );
    assert_eq!(store.count_live().await.unwrap(), 1);
    assert!(store.idle_sessions(1_000, 10, Servers::All).await.unwrap() == vec!["a".to_owned()]);
    assert!(store.load_session("missing").await.unwrap().is_none());
}

/// Streams and events survive a reopen (a process restart); finished streams prune.
pub async fn event_log_survives_reopen(open: impl Fn() -> Box<dyn LiveStore>) {
    {
        let store = open();
        store.create_session(record("s", 1)).await.unwrap();
        let stream = StreamRecord {
            session_id: "s".into(),
            stream_id: "x".into(),
            client_request_id: Some(json!(7)),
            request: Some(json!({"method": "tools/call"})),
            retryable: true,
            done: false,
            last_seq: 0,
            created_ms: 5,
        };
        store.open_stream(stream).await.unwrap();
        store.append_event(event("s", "x", 1, false)).await.unwrap();
        store.append_event(event("s", "x", 2, false)).await.unwrap();
    }
    let store = open();
    let open_streams = store.unfinished_streams("s").await.unwrap();
    assert_eq!(open_streams.len(), 1);
    assert_eq!(open_streams[0].last_seq, 2);
    assert_eq!(open_streams[0].client_request_id, Some(json!(7)));
    assert_eq!(
        open_streams[0].request,
        Some(json!({"method": "tools/call"}))
    );
    assert!(open_streams[0].retryable);
    let after = store.events_after("s", "x", 1).await.unwrap();
    assert_eq!(after, vec![(2, "{\"n\":2}".to_owned())]);
    store.append_event(event("s", "x", 3, true)).await.unwrap();
    assert!(store.unfinished_streams("s").await.unwrap().is_empty());
    assert!(store.stream("s", "x").await.unwrap().unwrap().done);
    assert_eq!(store.prune_events(now_ms() + 60_000).await.unwrap(), 3);
    assert!(store.stream("s", "x").await.unwrap().is_none());
    // A closed session's log goes at the next prune, finished or not, however recent.
    store.append_event(event("s", "y", 1, false)).await.unwrap();
    store
        .close_session("s", "client_disconnect", 9)
        .await
        .unwrap();
    store.prune_events(0).await.unwrap();
    assert!(store.events_after("s", "y", 0).await.unwrap().is_empty());
    assert!(store.stream("s", "y").await.unwrap().is_none());
}

/// Hundreds of writes in flight at once all land, in order.
pub async fn many_concurrent_writes(store: &dyn LiveStore) {
    store.create_session(record("s", 1)).await.unwrap();
    let acks: Vec<_> = (1..=500)
        .map(|i| store.append_event(event("s", "0", i, false)))
        .collect();
    for a in futures::future::join_all(acks).await {
        a.unwrap();
    }
    let events = store.events_after("s", "0", 0).await.unwrap();
    assert_eq!(events.len(), 500);
    assert!(events.windows(2).all(|w| w[0].0 + 1 == w[1].0));
    assert_eq!(store.stream("s", "0").await.unwrap().unwrap().last_seq, 500);
}

/// Task records: a put is readable once acknowledged (on any handle), a change replaces
/// the record, a principal lists only its own tasks in creation order page by page, and an
/// expired task goes when pruned while a live one stays.
pub async fn tasks_are_kept_listed_and_pruned(store: &dyn LiveStore) {
    use crate::tasks::{Era, Outcome, Status, TaskRecord};
    let now = now_ms();
    let task = |principal: &str, created_ms: i64, ttl_ms: Option<u64>| {
        TaskRecord::working(
            principal,
            "demo",
            "slow",
            Era::Modern,
            ttl_ms,
            500,
            created_ms,
        )
    };
    let mut a = task("alice", now, Some(3_600_000));
    store.put_task(&a).await.unwrap();
    assert_eq!(store.load_task(&a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(store.load_task("t_nothing").await.unwrap(), None);

    a.status = Status::InputRequired;
    a.input_requests = Some(json!({"k": {"method": "roots/list"}}));
    store.put_task(&a).await.unwrap();
    a.finish(Outcome::Result(json!({"content": []})), now + 5);
    store.put_task(&a).await.unwrap();
    let got = store.load_task(&a.id).await.unwrap().unwrap();
    assert_eq!(got.status, Status::Completed);
    assert_eq!(got, a);

    // Three more of alice's (two created in the same millisecond), one of bob's.
    let later: Vec<TaskRecord> = [now + 1, now + 2, now + 2]
        .into_iter()
        .map(|at| task("alice", at, None))
        .collect();
    for t in &later {
        store.put_task(t).await.unwrap();
    }
    let bob = task("bob", now, None);
    store.put_task(&bob).await.unwrap();
    let mut want: Vec<String> = std::iter::once(&a)
        .chain(&later)
        .map(|t| t.id.clone())
        .collect();
    want[2..].sort();
    let first = store.list_tasks("alice", None, 3).await.unwrap();
    let next = first.last().map(|t| (t.created_ms, t.id.clone()));
    let rest = store.list_tasks("alice", next, 3).await.unwrap();
    let listed: Vec<String> = first.iter().chain(&rest).map(|t| t.id.clone()).collect();
    assert_eq!(first.len(), 3);
    assert_eq!(listed, want, "alice's tasks, in order, in two pages");
    let bobs = store.list_tasks("bob", None, 10).await.unwrap();
    assert_eq!(bobs, vec![bob.clone()]);
    assert_eq!(store.count_tasks("alice").await.unwrap(), 4);
    assert_eq!(store.count_tasks("bob").await.unwrap(), 1);
    assert_eq!(store.count_tasks("carol").await.unwrap(), 0);
    let recent = store.recent_tasks(10).await.unwrap();
    assert_eq!(recent.len(), 5, "every principal's tasks");
    assert!(
        recent
            .windows(2)
            .all(|w| (w[0].created_ms, &w[0].id) >= (w[1].created_ms, &w[1].id)),
        "newest first"
    );
    assert_eq!(store.recent_tasks(2).await.unwrap().len(), 2);

    // Created an hour ago with a minute to live: expired.
    let old = task("alice", now - 3_600_000, Some(60_000));
    store.put_task(&old).await.unwrap();
    assert!(store.prune_tasks(now).await.unwrap() >= 1);
    assert_eq!(store.load_task(&old.id).await.unwrap(), None);
    assert!(
        store.load_task(&a.id).await.unwrap().is_some(),
        "a live task stays"
    );
    let listed = store.list_tasks("alice", None, 10).await.unwrap();
    assert!(listed.iter().all(|t| t.id != old.id), "nor is it listed");
    assert_eq!(listed.len(), 4);
    assert_eq!(store.count_tasks("alice").await.unwrap(), 4);
}

/// Counters follow tool calls; retention pruning removes old calls and closed sessions.
/// Sessions arrive as ledger events, as they do when the ledger is its own backend.
pub async fn ledger_counts_and_retention_pruning(ledger: &dyn LedgerStore) {
    ledger
        .record(vec![
            LedgerEvent::Opened(Box::new(record("old", 1))),
            LedgerEvent::Opened(Box::new(record("new", 1))),
            call("old", "echo", 100, "ok"),
            call("old", "echo", 200, "timeout"),
            call("new", "echo", 5_000, "ok"),
            LedgerEvent::Rehydrated {
                id: "new".into(),
                at_ms: 5_100,
            },
            LedgerEvent::UpstreamRestarted {
                id: "new".into(),
                at_ms: 5_200,
            },
            LedgerEvent::UpstreamRestarted {
                id: "old".into(),
                at_ms: 150,
            },
            LedgerEvent::Touched {
                id: "new".into(),
                at_ms: 6_000,
            },
        ])
        .await
        .unwrap();
    let old = ledger.session_summary("old").await.unwrap().unwrap();
    assert_eq!((old.tool_calls, old.errors), (2, 1));
    let new = ledger.session_summary("new").await.unwrap().unwrap();
    assert_eq!((new.rehydrations, new.upstream_restarts), (1, 1));
    assert_eq!(new.last_active_ms, 6_000);
    let timeline = ledger.session_events("new", 10).await.unwrap();
    let seen: Vec<(i64, &str)> = timeline
        .iter()
        .map(|e| (e.at_ms, e.kind.as_str()))
        .collect();
    assert_eq!(
        seen,
        [(5_200, "upstream_restarted"), (5_100, "rehydrated")],
        "newest first"
    );
    ledger
        .record(vec![LedgerEvent::Closed {
            id: "old".into(),
            reason: "timeout".into(),
            at_ms: 1_000,
        }])
        .await
        .unwrap();
    let old = ledger.session_summary("old").await.unwrap().unwrap();
    assert_eq!(
        (old.state.as_str(), old.close_reason.as_deref()),
        ("closed", Some("timeout"))
    );
    // Past retention: the closed session and old calls go; live sessions and recent calls stay.
    assert_eq!(ledger.prune_ledger(2_000).await.unwrap(), 4);
    assert!(ledger.session_summary("old").await.unwrap().is_none());
    assert!(ledger.session_events("old", 10).await.unwrap().is_empty());
    assert_eq!(ledger.session_events("new", 10).await.unwrap().len(), 2);
    assert!(ledger.session_summary("new").await.unwrap().is_some());
    assert_eq!(ledger.calls_since(0, 10).await.unwrap().len(), 1);
    let totals = ledger.totals().await.unwrap();
    assert_eq!(
        (totals.sessions, totals.active, totals.tool_calls),
        (1, 1, 1)
    );
}

/// Filters, ordering, paging, per-user rows and call dimensions.
pub async fn ledger_queries(ledger: &dyn LedgerStore) {
    let mut alice = record("a1", 300);
    alice.principal = "alice".into();
    alice.principal_email = Some("alice@example.com".into());
    alice.client_type = "Cursor".into();
    let mut alice2 = record("a2", 200);
    alice2.principal = "alice".into();
    let mut bob = record("b1", 100);
    bob.principal = "bob".into();
    bob.client_name = Some("Claude Code".into());
    bob.upstream_name = "files".into();
    ledger
        .record(vec![
            LedgerEvent::Opened(Box::new(alice)),
            LedgerEvent::Opened(Box::new(alice2)),
            LedgerEvent::Opened(Box::new(bob)),
            call("a1", "echo", 1_000, "ok"),
            call("a1", "add", 1_100, "tool_error"),
            call("b1", "echo", 1_200, "ok"),
            LedgerEvent::Closed {
                id: "a2".into(),
                reason: "client_disconnect".into(),
                at_ms: 400,
            },
        ])
        .await
        .unwrap();
    let ids = |v: Vec<super::SessionSummary>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    let all = SessionQuery {
        limit: 10,
        ..SessionQuery::default()
    };
    assert_eq!(
        ids(ledger.list_sessions(&all).await.unwrap()),
        ["a1", "a2", "b1"]
    );
    let live = SessionQuery {
        state: Some(SessionState::Live),
        ..all.clone()
    };
    assert_eq!(
        ids(ledger.list_sessions(&live).await.unwrap()),
        ["a1", "b1"]
    );
    let closed = SessionQuery {
        state: Some(SessionState::Closed),
        ..all.clone()
    };
    assert_eq!(ids(ledger.list_sessions(&closed).await.unwrap()), ["a2"]);
    let by_user = SessionQuery {
        user: Some("alice".into()),
        ..all.clone()
    };
    assert_eq!(
        ids(ledger.list_sessions(&by_user).await.unwrap()),
        ["a1", "a2"]
    );
    let by_type = SessionQuery {
        client: Some("Cursor".into()),
        ..all.clone()
    };
    assert_eq!(ids(ledger.list_sessions(&by_type).await.unwrap()), ["a1"]);
    let by_name = SessionQuery {
        client: Some("Claude Code".into()),
        ..all.clone()
    };
    assert_eq!(ids(ledger.list_sessions(&by_name).await.unwrap()), ["b1"]);
    let by_server = SessionQuery {
        server: Some("files".into()),
        ..all.clone()
    };
    assert_eq!(ids(ledger.list_sessions(&by_server).await.unwrap()), ["b1"]);
    let since = SessionQuery {
        since_ms: Some(250),
        ..all.clone()
    };
    assert_eq!(
        ids(ledger.list_sessions(&since).await.unwrap()),
        ["a1", "a2"]
    );
    let page = SessionQuery {
        limit: 1,
        offset: 1,
        ..all.clone()
    };
    assert_eq!(ids(ledger.list_sessions(&page).await.unwrap()), ["a2"]);

    let users = ledger.users().await.unwrap();
    let alice = users.iter().find(|u| u.id == "alice").unwrap();
    assert_eq!(
        (alice.sessions, alice.active, alice.tool_calls, alice.errors),
        (2, 1, 2, 1)
    );
    assert_eq!(alice.email.as_deref(), Some("alice@example.com"));
    let calls = ledger.calls_since(1_050, 10).await.unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].call.tool, "echo");
    assert_eq!(calls[0].user_id, "bob");
    assert_eq!(calls[1].client_type, "Cursor");
    assert_eq!(calls[1].call.error_code, Some(-32012));
    let recent = ledger.session_calls("a1", 1).await.unwrap();
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0].tool, "add");
    let totals = ledger.totals().await.unwrap();
    assert_eq!(
        (
            totals.sessions,
            totals.active,
            totals.tool_calls,
            totals.errors
        ),
        (3, 2, 3, 1)
    );
    assert_eq!(totals.average_duration_ms, Some(399.0));
}

/// Redis settings for a test: the URL from the environment and a prefix of its own.
pub fn redis_options(test: &str) -> Option<super::redis::RedisOptions> {
    let Ok(url) = std::env::var("TETHER_TEST_REDIS_URL") else {
        eprintln!("skipped: TETHER_TEST_REDIS_URL is not set (a Redis test)");
        return None;
    };
    Some(super::redis::RedisOptions {
        url,
        prefix: format!("tether-test:{test}:{}", crate::ids::new_instance_id()),
        session_ttl: std::time::Duration::from_secs(3600),
        instance_ttl: std::time::Duration::from_secs(5),
        advertise_url: "http://127.0.0.1:1".into(),
    })
}

/// A PostgreSQL ledger in a schema of its own (dropped by [`drop_schema`]).
pub async fn postgres_ledger(test: &str) -> Option<(super::postgres::PostgresLedger, String)> {
    let Ok(url) = std::env::var("TETHER_TEST_DATABASE_URL") else {
        eprintln!("skipped: TETHER_TEST_DATABASE_URL is not set (a PostgreSQL test)");
        return None;
    };
    let schema = format!("tether_test_{test}_{}", crate::ids::new_instance_id());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("TETHER_TEST_DATABASE_URL must reach PostgreSQL");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{sep}options=-c%20search_path%3D{schema}");
    let ledger = super::postgres::PostgresLedger::connect(&scoped)
        .await
        .unwrap();
    Some((ledger, schema))
}

/// Drops a test schema.
pub async fn drop_schema(schema: &str) {
    let url = std::env::var("TETHER_TEST_DATABASE_URL").unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
