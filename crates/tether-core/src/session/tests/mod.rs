//! The session's state machine with no process and no socket: a registry over an
//! in-memory store, with upstreams the test plays ([`FakeUpstream`]), under paused time.
//! What the binary-level tests prove end to end (restarts, timeouts, routing) is proved
//! here branch by branch, in milliseconds.
//! Must not: sleep, spawn a process or open a socket.

use super::*;
use crate::auth::Principal;
use crate::store::memory::MemoryStore;
use crate::upstream::UpstreamLimits;
use crate::upstream::memory::FakeUpstream;

struct Harness {
    registry: Registry,
    /// Shares its data with the registry's store.
    store: MemoryStore,
    upstreams: mpsc::UnboundedReceiver<FakeUpstream>,
    ledger: mpsc::Receiver<LedgerEvent>,
}

fn harness(cfg: SessionConfig) -> Harness {
    let tracker = TaskTracker::new();
    let (connector, upstreams) = Connector::in_memory(UpstreamLimits::default(), tracker.clone());
    let metrics = Arc::new(Metrics::default());
    let (ledger, ledger_rx) = Ledger::new(metrics.clone());
    let store = MemoryStore::default();
    let registry = Registry::new(
        cfg,
        Arc::new(store.clone()),
        None,
        connector,
        tracker,
        metrics,
        ledger,
    );
    Harness {
        registry,
        store,
        upstreams,
        ledger: ledger_rx,
    }
}

fn envelope(value: Value) -> Message {
    Message::from_value(value).expect("a valid JSON-RPC message")
}

fn call(id: impl Into<Value>, tool: &str) -> Message {
    let id: Value = id.into();
    envelope(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                    "params": {"name": tool, "arguments": {}}}))
}

impl Harness {
    /// The next upstream the gateway starts, its `initialize` answered.
    async fn upstream(&mut self) -> FakeUpstream {
        let mut up = self.upstreams.recv().await.expect("an upstream start");
        up.accept_initialize(json!({})).await;
        up
    }

    /// A new session (Streamable HTTP) and its first upstream.
    async fn session(&mut self) -> (Arc<Session>, FakeUpstream) {
        let init = envelope(json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "unit", "version": "1"}}}));
        let anonymous = Principal::anonymous();
        let registry = self.registry.clone();
        let start = registry.initialize(&init, Transport::Streamable, None, &anonymous, None);
        let ((session, answer), up) =
            tokio::join!(async { start.await.expect("a session") }, self.upstream());
        assert!(answer.get("result").is_some(), "{answer}");
        (session.expect("a session"), up)
    }

    /// Outcomes of the tool calls recorded so far, in order.
    fn recorded_outcomes(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(e) = self.ledger.try_recv() {
            if let LedgerEvent::ToolCall(c) = e {
                out.push(c.outcome);
            }
        }
        out
    }
}

/// Lets the session's pump take in an upstream's death (it runs as its own task).
async fn until_down(session: &Session) {
    while session.upstream_state() == "up" {
        tokio::task::yield_now().await;
    }
}

/// The live frames of a request's stream.
fn frames(reply: Reply) -> FrameRx {
    match reply {
        Reply::Stream(mut h) => h.live.take().expect("a live stream"),
        Reply::Immediate(v) => panic!("an immediate answer: {v}"),
        Reply::Accepted => panic!("accepted without a stream"),
    }
}

/// The next message on a stream, and whether it ends the stream.
async fn next(rx: &mut FrameRx) -> (Value, bool) {
    let f = rx.recv().await.expect("the stream ended early");
    (serde_json::from_str(&f.data).expect("JSON"), f.terminal)
}

/// The final answer on a stream.
async fn answer(rx: &mut FrameRx) -> Value {
    loop {
        let (v, terminal) = next(rx).await;
        if terminal {
            return v;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn ids_are_rewritten_both_ways_and_never_reused_across_a_restart() {
    let mut h = harness(SessionConfig::default());
    let (session, mut up) = h.session().await;
    // Clients may reuse an id while the first call is in flight; the upstream must not see
    // the collision, and each answer must reach its own stream with the client's id.
    let mut a = frames(session.request(call(json!("x"), "a")).await);
    let mut b = frames(session.request(call(json!("x"), "b")).await);
    let ra = up.next_request().await;
    let rb = up.next_request().await;
    let (ua, ub) = (ra["id"].as_u64().unwrap(), rb["id"].as_u64().unwrap());
    assert_ne!(ua, ub);
    up.answer(&rb, json!({"content": [], "tool": "b"})).await;
    up.answer(&ra, json!({"content": [], "tool": "a"})).await;
    let (aa, ab) = (answer(&mut a).await, answer(&mut b).await);
    assert_eq!(
        (&aa["id"], &aa["result"]["tool"]),
        (&json!("x"), &json!("a"))
    );
    assert_eq!(
        (&ab["id"], &ab["result"]["tool"]),
        (&json!("x"), &json!("b"))
    );

    // The upstream dies; the next call re-initializes a fresh one with the stored params.
    up.die("exited with status 1").await;
    until_down(&session).await;
    let next_call = session.request(call(json!("x"), "c"));
    let (reply, mut fresh) = tokio::join!(next_call, async {
        let mut up = h.upstreams.recv().await.unwrap();
        let init = up.accept_initialize(json!({})).await;
        assert_eq!(
            init["params"]["clientInfo"]["name"], "unit",
            "the stored initialize"
        );
        assert_eq!(up.recv().await["method"], "notifications/initialized");
        up
    });
    let mut c = frames(reply);
    let rc = fresh.next_request().await;
    let uc = rc["id"].as_u64().unwrap();
    assert!(
        uc > ua.max(ub),
        "ids are gateway-wide and never reused: {uc}"
    );
    fresh.answer(&rc, json!({"content": []})).await;
    assert_eq!(answer(&mut c).await["id"], json!("x"));
    assert_eq!(h.recorded_outcomes(), ["ok", "ok", "ok"]);
}

fn handle(reply: Reply) -> StreamHandle {
    match reply {
        Reply::Stream(h) => h,
        Reply::Immediate(v) => panic!("an immediate answer: {v}"),
        Reply::Accepted => panic!("accepted without a stream"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_quick_answer_is_the_whole_response_and_a_slow_call_is_recorded_at_the_window() {
    let window = Duration::from_millis(10);
    let mut h = harness(SessionConfig {
        answer_window: window,
        ..SessionConfig::default()
    });
    let (session, mut up) = h.session().await;

    let mut quick = handle(session.request(call(json!(1), "echo")).await);
    let sent = up.next_request().await;
    up.answer(&sent, json!({"content": []})).await;
    let body = quick
        .quick_answer()
        .await
        .expect("answered within the window");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], 1);
    assert!(
        quick.open_record().is_none(),
        "nothing to write or wait for"
    );
    let stored = h
        .store
        .stream(session.id(), &quick.stream_id)
        .await
        .unwrap();
    assert!(stored.is_none(), "nothing of a quick call is stored");

    let mut slow = handle(session.request(call(json!(2), "slow")).await);
    let sent = up.next_request().await;
    let started = tokio::time::Instant::now();
    assert!(slow.quick_answer().await.is_none());
    assert_eq!(
        started.elapsed(),
        window,
        "the stream starts at the window's end"
    );
    let id = slow.stream_id.clone();
    assert!(h.store.stream(session.id(), &id).await.unwrap().is_none());
    slow.open_record().expect("the record's ack").await.unwrap();
    let record = h.store.stream(session.id(), &id).await.unwrap();
    assert_eq!(record.expect("recorded").client_request_id, Some(json!(2)));
    up.answer(&sent, json!({"content": []})).await;
    let f = slow.live.as_mut().unwrap().recv().await.unwrap();
    assert!(
        f.terminal && f.stored,
        "a streamed call's answer is in its log"
    );
    assert_eq!(h.recorded_outcomes(), ["ok", "ok"]);
}

#[tokio::test(start_paused = true)]
async fn a_call_times_out_at_the_deadline_and_the_upstream_is_told_to_cancel() {
    let mut h = harness(SessionConfig {
        upstream_timeout: Duration::from_secs(30),
        ..SessionConfig::default()
    });
    let (session, mut up) = h.session().await;
    let started = tokio::time::Instant::now();
    let mut rx = frames(session.request(call(json!(1), "slow")).await);
    let sent = up.next_request().await;
    // Nobody answers: paused time runs to the deadline and no further.
    let got = answer(&mut rx).await;
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    assert_eq!(got["id"], json!(1));
    assert_eq!(got["error"]["code"], json!(code::UPSTREAM_TIMEOUT));
    assert_eq!(got["error"]["data"]["kind"], "upstream_timeout");
    assert_eq!(got["error"]["data"]["retry"], "unknown", "it may have run");
    let cancel = up.recv().await;
    assert_eq!(cancel["method"], "notifications/cancelled");
    assert_eq!(cancel["params"]["requestId"], sent["id"]);
    // A late answer finds nothing and changes nothing.
    up.answer(&sent, json!({"content": []})).await;
    assert_eq!(h.recorded_outcomes(), ["timeout"]);
    assert_eq!(
        session.upstream_state(),
        "up",
        "a slow upstream is not a dead one"
    );
}

#[tokio::test(start_paused = true)]
async fn one_deadline_task_times_out_each_late_call_and_no_answered_one() {
    let timeout = Duration::from_secs(30);
    let mut h = harness(SessionConfig {
        upstream_timeout: timeout,
        ..SessionConfig::default()
    });
    let (session, mut up) = h.session().await;
    // Answered calls, the first of which the task is asleep for when it is answered.
    for i in 0..3 {
        let mut rx = frames(session.request(call(json!(i), "quick")).await);
        let sent = up.next_request().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        up.answer(&sent, json!({"content": []})).await;
        assert!(answer(&mut rx).await.get("result").is_some());
    }
    // Nothing in flight for a while: the task parks; a new call must wake it.
    tokio::time::sleep(timeout * 3).await;
    let started = tokio::time::Instant::now();
    let mut late = frames(session.request(call(json!("late"), "slow")).await);
    up.next_request().await;
    // A second call started later times out at its own deadline, not the first one's.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut later = frames(session.request(call(json!("later"), "slow")).await);
    up.next_request().await;
    assert_eq!(
        answer(&mut late).await["error"]["code"],
        json!(code::UPSTREAM_TIMEOUT)
    );
    assert_eq!(started.elapsed(), timeout);
    assert_eq!(
        answer(&mut later).await["error"]["code"],
        json!(code::UPSTREAM_TIMEOUT)
    );
    assert_eq!(started.elapsed(), timeout + Duration::from_secs(5));
    assert_eq!(
        h.recorded_outcomes(),
        ["ok", "ok", "ok", "timeout", "timeout"]
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_death_fails_every_call_in_flight_with_its_cause() {
    let mut h = harness(SessionConfig::default());
    let (session, mut up) = h.session().await;
    let mut calls = Vec::new();
    for i in 0..3 {
        calls.push(frames(session.request(call(json!(i), "work")).await));
        up.next_request().await;
    }
    let read = envelope(
        json!({"jsonrpc": "2.0", "id": "r", "method": "resources/read",
                               "params": {"uri": "file:///a"}}),
    );
    let mut read = frames(session.request(read).await);
    up.next_request().await;
    up.die("upstream exited with signal 9 (SIGKILL)").await;
    for (i, rx) in calls.iter_mut().enumerate() {
        let got = answer(rx).await;
        assert_eq!(got["id"], json!(i));
        assert_eq!(got["error"]["code"], json!(code::UPSTREAM_LOST));
        let message = got["error"]["message"].as_str().unwrap();
        assert!(message.contains("signal 9 (SIGKILL)"), "{message}");
        assert_eq!(got["error"]["data"]["origin"], "upstream");
    }
    assert_eq!(
        answer(&mut read).await["error"]["code"],
        json!(code::UPSTREAM_LOST)
    );
    // Three tool calls, three recorded failures; the read is not a tool call.
    assert_eq!(h.recorded_outcomes(), ["upstream_lost"; 3]);
    assert_eq!(session.upstream_state(), "down");
}

#[tokio::test(start_paused = true)]
async fn a_server_request_reaches_the_callers_stream_and_its_answer_goes_back() {
    let mut h = harness(SessionConfig::default());
    let (session, mut up) = h.session().await;
    let mut a = frames(session.request(call(json!("a"), "ask")).await);
    let ra = up.next_request().await;
    let mut b = frames(session.request(call(json!("b"), "other")).await);
    let rb = up.next_request().await;
    // While serving `a` (an HTTP upstream says so), the upstream asks the client.
    up.say(
        json!({"jsonrpc": "2.0", "id": 0, "method": "sampling/createMessage",
               "params": {"messages": [], "maxTokens": 1}}),
        ra["id"].as_u64(),
    )
    .await;
    let (asked, terminal) = next(&mut a).await;
    assert!(!terminal);
    assert_eq!(asked["method"], "sampling/createMessage");
    let ours = asked["id"].as_str().expect("a tether-N id").to_owned();
    assert!(ours.starts_with("tether-"), "{ours}");
    session
        .respond(envelope(
            json!({"jsonrpc": "2.0", "id": ours, "result": {"role": "assistant"}}),
        ))
        .await;
    let back = up.recv().await;
    assert_eq!(back["id"], json!(0), "the upstream gets its own id back");
    assert_eq!(back["result"]["role"], "assistant");
    // A second answer to the same request is dropped, not sent twice.
    session
        .respond(envelope(
            json!({"jsonrpc": "2.0", "id": ours, "result": {}}),
        ))
        .await;
    // Progress for `b`'s token goes to `b`, whatever stream is newest.
    up.say(
        json!({"jsonrpc": "2.0", "method": "notifications/message",
               "params": {"level": "info", "data": "to a"}}),
        ra["id"].as_u64(),
    )
    .await;
    assert_eq!(next(&mut a).await.0["params"]["data"], "to a");
    up.answer(&rb, json!({"content": []})).await;
    up.answer(&ra, json!({"content": []})).await;
    assert_eq!(answer(&mut a).await["id"], json!("a"));
    assert_eq!(answer(&mut b).await["id"], json!("b"));
}

#[tokio::test(start_paused = true)]
async fn progress_goes_to_the_call_that_carries_the_token() {
    let mut h = harness(SessionConfig::default());
    let (session, mut up) = h.session().await;
    let with_token = |id: i64, token: &str| {
        envelope(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "long", "_meta": {"progressToken": token}}}))
    };
    let mut a = frames(session.request(with_token(1, "t")).await);
    let ra = up.next_request().await;
    // Two calls may carry the same token text with different types; JSON text tells them
    // apart ("t" the string here, and the second call uses another token).
    let mut b = frames(session.request(with_token(2, "u")).await);
    let rb = up.next_request().await;
    assert_eq!(
        ra["params"]["_meta"]["progressToken"], "t",
        "forwarded as is"
    );
    for (token, n) in [("t", 1), ("u", 2), ("t", 3)] {
        up.say(
            json!({"jsonrpc": "2.0", "method": "notifications/progress",
                   "params": {"progressToken": token, "progress": n}}),
            None,
        )
        .await;
    }
    assert_eq!(next(&mut a).await.0["params"]["progress"], 1);
    assert_eq!(next(&mut a).await.0["params"]["progress"], 3);
    assert_eq!(next(&mut b).await.0["params"]["progress"], 2);
    up.answer(&ra, json!({})).await;
    up.answer(&rb, json!({})).await;
    assert_eq!(answer(&mut a).await["id"], json!(1));
    assert_eq!(answer(&mut b).await["id"], json!(2));
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_backs_off_and_a_healthy_run_resets_the_count() {
    let cfg = SessionConfig {
        backoff: Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(8),
        },
        healthy_after: Duration::from_secs(10),
        ..SessionConfig::default()
    };
    let mut h = harness(cfg);
    let (session, up) = h.session().await;
    up.die("crashed").await;
    until_down(&session).await;
    // First failure: restart at once. It dies too, straight away: a crash loop.
    let restart = session.request(call(json!(1), "x"));
    let (reply, mut second) = tokio::join!(restart, h.upstream());
    let mut rx = frames(reply);
    assert_eq!(second.recv().await["method"], "notifications/initialized");
    second.next_request().await;
    second.die("crashed again").await;
    assert_eq!(
        answer(&mut rx).await["error"]["code"],
        json!(code::UPSTREAM_LOST)
    );
    assert_eq!(session.upstream_state(), "backoff");
    // Within the backoff (1 s, jittered down to 0.5 s) the call is refused without a start.
    let refused = match session.request(call(json!(2), "x")).await {
        Reply::Immediate(v) => v,
        _ => panic!("refused at once"),
    };
    assert_eq!(refused["error"]["code"], json!(code::UPSTREAM_UNAVAILABLE));
    assert_eq!(refused["error"]["data"]["kind"], "upstream_backoff");
    assert_eq!(
        refused["error"]["data"]["retry"], "safe",
        "it never left the gateway"
    );
    let wait = refused["error"]["data"]["retry_in_ms"].as_u64().unwrap();
    assert!((1..=1000).contains(&wait), "{wait}");
    assert!(h.upstreams.try_recv().is_err(), "no start during backoff");
    tokio::time::advance(Duration::from_millis(wait)).await;
    // After it, a start; this upstream lives past `healthy_after`, so its death counts as
    // the first of a new run, restarted at once.
    let restart = session.request(call(json!(3), "x"));
    let (reply, mut third) = tokio::join!(restart, h.upstream());
    let mut rx = frames(reply);
    third.recv().await;
    let r = third.next_request().await;
    third.answer(&r, json!({})).await;
    assert_eq!(answer(&mut rx).await["id"], json!(3));
    tokio::time::advance(Duration::from_secs(11)).await;
    third.die("crashed after a good run").await;
    until_down(&session).await;
    assert_eq!(
        session.upstream_state(),
        "down",
        "not backoff: the run was healthy"
    );
    let restart = session.request(call(json!(4), "x"));
    let (reply, _fourth) = tokio::join!(restart, h.upstream());
    assert!(matches!(reply, Reply::Stream(_)));
    assert_eq!(
        h.recorded_outcomes(),
        ["upstream_lost", "upstream_unavailable", "ok"]
    );
}

/// Issue 26: a session whose restart failed (the upstream was away) waits out its backoff
/// only while the upstream stays away: once another session's start succeeds, its next
/// request starts at once instead of after its grown wait.
#[tokio::test(start_paused = true)]
async fn a_failed_starts_backoff_ends_when_another_start_succeeds() {
    let cfg = SessionConfig {
        backoff: Backoff {
            base: Duration::from_secs(5),
            max: Duration::from_secs(30),
        },
        ..SessionConfig::default()
    };
    let mut h = harness(cfg);
    let (a, up_a) = h.session().await;
    let (b, up_b) = h.session().await;
    up_a.die("connection refused").await;
    up_b.die("connection refused").await;
    until_down(&a).await;
    until_down(&b).await;
    // A's restart fails: the upstream is still away.
    let restart = a.request(call(json!(1), "x"));
    let (reply, failed) = tokio::join!(restart, async {
        let up = h.upstreams.recv().await.expect("a start");
        up.die("connection refused").await;
    });
    let Reply::Immediate(v) = reply else {
        panic!("refused at once")
    };
    assert_eq!(v["error"]["code"], json!(code::UPSTREAM_UNAVAILABLE), "{v}");
    let () = failed;
    match a.request(call(json!(2), "x")).await {
        Reply::Immediate(v) => assert_eq!(v["error"]["data"]["kind"], "upstream_backoff"),
        _ => panic!("A backs off"),
    }
    // B's restart succeeds: the upstream is back.
    tokio::time::advance(Duration::from_millis(100)).await;
    let (reply, _up) = tokio::join!(b.request(call(json!(1), "x")), h.upstream());
    assert!(matches!(reply, Reply::Stream(_)));
    // A does not wait for its backoff (2.5 s at least) any more.
    let (reply, _up) = tokio::join!(a.request(call(json!(3), "x")), h.upstream());
    assert!(matches!(reply, Reply::Stream(_)), "A starts at once");
}

mod pool_and_limits;
