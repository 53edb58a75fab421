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

/// A `resources/subscribe` of `uri`, answered by `up` when it reaches it; the answer.
async fn subscribe(session: &Arc<Session>, up: &mut FakeUpstream, id: i64, uri: &str) -> Value {
    let env = envelope(
        json!({"jsonrpc": "2.0", "id": id, "method": "resources/subscribe",
                              "params": {"uri": uri}}),
    );
    match session.request(env).await {
        Reply::Immediate(v) => v,
        reply => {
            let mut rx = frames(reply);
            let r = up.next_request().await;
            assert_eq!(r["params"]["uri"], uri);
            up.answer(&r, json!({})).await;
            answer(&mut rx).await
        }
    }
}

/// Issue 26: resource subscriptions are bounded per session and per principal, by count
/// (and bytes, and URI length); a subscription over a bound is `-32016` naming it and never
/// reaches the upstream; an unsubscribe or the session's end gives its place back.
#[tokio::test(start_paused = true)]
async fn subscriptions_are_bounded_per_session_and_per_principal() {
    let mut h = harness(SessionConfig::default());
    let budget = Arc::new(subscriptions::SubscriptionBudget::new(
        subscriptions::SubscriptionLimits {
            per_session: 3,
            per_principal: 4,
        },
    ));
    let common = Common {
        subscriptions: budget.clone(),
        ..h.registry.common()
    };
    let (connector, upstreams) =
        Connector::in_memory(UpstreamLimits::default(), common.tracker.clone());
    h.registry = Registry::with_common(SessionConfig::default(), &common, connector);
    h.upstreams = upstreams;
    let (a, mut up_a) = h.session().await;
    for (i, uri) in ["file:///a1", "file:///a2", "file:///a3"]
        .iter()
        .enumerate()
    {
        let v = subscribe(&a, &mut up_a, i as i64, uri).await;
        assert!(v.get("result").is_some(), "{v}");
    }
    let again = subscribe(&a, &mut up_a, 9, "file:///a1").await;
    assert!(
        again.get("result").is_some(),
        "one it holds costs nothing: {again}"
    );
    let over = subscribe(&a, &mut up_a, 10, "file:///a4").await;
    assert_eq!(over["error"]["code"], json!(code::LIMIT_REACHED), "{over}");
    assert_eq!(over["error"]["data"]["limit"], "max-subscriptions");
    let (b, mut up_b) = h.session().await;
    assert!(
        subscribe(&b, &mut up_b, 1, "file:///b1")
            .await
            .get("result")
            .is_some()
    );
    let over = subscribe(&b, &mut up_b, 2, "file:///b2").await;
    assert_eq!(
        over["error"]["data"]["limit"], "max-subscriptions-per-principal",
        "{over}"
    );
    let long = subscribe(&b, &mut up_b, 3, &"x".repeat(subscriptions::MAX_URI + 1)).await;
    assert_eq!(
        long["error"]["data"]["limit"], "max-subscription-uri",
        "{long}"
    );
    assert_eq!(budget.used("anonymous").0, 4);
    // An unsubscribe gives a place back.
    let env = envelope(
        json!({"jsonrpc": "2.0", "id": 20, "method": "resources/unsubscribe",
                              "params": {"uri": "file:///a1"}}),
    );
    let mut rx = frames(a.request(env).await);
    let r = up_a.next_request().await;
    up_a.answer(&r, json!({})).await;
    assert!(answer(&mut rx).await.get("result").is_some());
    assert!(
        subscribe(&b, &mut up_b, 4, "file:///b2")
            .await
            .get("result")
            .is_some()
    );
    // A refused subscribe (the upstream's error) is given back too.
    let env = envelope(
        json!({"jsonrpc": "2.0", "id": 5, "method": "resources/subscribe",
                              "params": {"uri": "file:///b3"}}),
    );
    let over = match b.request(env).await {
        Reply::Immediate(v) => v,
        _ => panic!("over the principal's bound"),
    };
    assert_eq!(
        over["error"]["data"]["limit"],
        "max-subscriptions-per-principal"
    );
    // The session's end gives back all it held.
    h.registry.close(&a, "client_disconnect").await;
    assert_eq!(budget.used("anonymous"), (2, "file:///b1".len() * 2));
    let env = envelope(
        json!({"jsonrpc": "2.0", "id": 6, "method": "resources/subscribe",
                              "params": {"uri": "file:///b3"}}),
    );
    let mut rx = frames(b.request(env).await);
    let r = up_b.next_request().await;
    up_b.say(
        json!({"jsonrpc": "2.0", "id": r["id"], "error": {"code": -32602, "message": "no such resource"}}),
        None,
    )
    .await;
    assert!(answer(&mut rx).await.get("error").is_some());
    assert_eq!(
        budget.used("anonymous").0,
        2,
        "the upstream's refusal holds no place"
    );
}

#[tokio::test(start_paused = true)]
async fn closing_fails_calls_in_flight_and_stops_the_upstream() {
    let mut h = harness(SessionConfig::default());
    let (session, mut up) = h.session().await;
    let mut rx = frames(session.request(call(json!(9), "x")).await);
    up.next_request().await;
    h.registry.close(&session, "client_disconnect").await;
    let got = answer(&mut rx).await;
    assert_eq!(got["error"]["code"], json!(code::SESSION_CLOSED));
    assert_eq!(got["error"]["data"]["retry"], "never");
    assert!(up.is_shut(), "the upstream is stopped with its session");
    assert!(session.is_closed());
    assert_eq!(h.recorded_outcomes(), ["session_closed"]);
    // A request racing the close gets the same answer, without a start.
    match session.request(call(json!(10), "x")).await {
        Reply::Immediate(v) => assert_eq!(v["error"]["code"], json!(code::SESSION_CLOSED)),
        _ => panic!("refused at once"),
    }
    assert!(h.upstreams.try_recv().is_err());
}

/// A pooled member for `principal` with capabilities key `key`, started if needed; the
/// fake upstream of a new member is returned with it.
async fn pooled(
    h: &mut Harness,
    principal: &Principal,
    key: &str,
) -> (Arc<Session>, Option<FakeUpstream>) {
    let init = json!({"protocolVersion": "2025-11-25", "capabilities": {},
                      "clientInfo": {"name": "modern", "version": "1"}});
    let registry = h.registry.clone();
    let get = registry.pooled(principal, key.to_owned(), &init, None);
    tokio::pin!(get);
    tokio::select! {
        biased;
        s = &mut get => (s.expect("a member"), None),
        up = h.upstreams.recv() => {
            let mut up = up.expect("an upstream start");
            let (s, _) = tokio::join!(&mut get, up.accept_initialize(json!({})));
            (s.expect("a member"), Some(up))
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_pool_prefers_an_idle_member_grows_when_all_are_busy_and_stops_at_its_size() {
    let mut h = harness(SessionConfig {
        pool_size: 2,
        ..SessionConfig::default()
    });
    let alice = Principal::anonymous();
    let (a, up_a) = pooled(&mut h, &alice, "caps").await;
    let mut up_a = up_a.expect("the first call starts a member");
    assert_eq!(a.transport(), Transport::Pooled);
    // Idle: the same member again, nothing started.
    let (again, none) = pooled(&mut h, &alice, "caps").await;
    assert!(Arc::ptr_eq(&a, &again) && none.is_none());
    // Busy: a second member.
    let _busy = frames(a.request(call(json!(1), "slow")).await);
    let _sent = up_a.next_request().await;
    let (b, up_b) = pooled(&mut h, &alice, "caps").await;
    assert!(!Arc::ptr_eq(&a, &b) && up_b.is_some());
    // Both busy and the pool full: the least loaded, nothing started.
    let mut up_b = up_b.unwrap();
    let _busy_b = frames(b.request(call(json!(2), "slow")).await);
    let _sent_b = up_b.next_request().await;
    let _busier = frames(a.request(call(json!(3), "slow")).await);
    let _ = up_a.next_request().await;
    let (least, none) = pooled(&mut h, &alice, "caps").await;
    assert!(Arc::ptr_eq(&least, &b) && none.is_none());
    // Another capability set never shares a member.
    let (other, up_other) = pooled(&mut h, &alice, "other-caps").await;
    assert!(!Arc::ptr_eq(&other, &a) && !Arc::ptr_eq(&other, &b) && up_other.is_some());
    // A pooled id is never a client's session.
    assert!(matches!(
        h.registry.get(a.id(), &alice).await,
        Err(SessionError::NotFound)
    ));
}

/// Issue 26: one user's stateless requests keep pools for at most
/// `MAX_POOLS_PER_PRINCIPAL` client applications (a client varying its name on every
/// request would make a pool per request), and hold at most `MAX_LISTENS_PER_PRINCIPAL`
/// listen streams; another user is untouched.
#[tokio::test(start_paused = true)]
async fn a_users_pools_and_listen_streams_are_bounded() {
    let mut h = harness(SessionConfig::default());
    let alice = Principal::anonymous();
    let mut held = Vec::new();
    for i in 0..pool::MAX_POOLS_PER_PRINCIPAL {
        held.push(pooled(&mut h, &alice, &format!("app-{i}")).await);
    }
    let init = json!({"protocolVersion": "2025-11-25", "capabilities": {},
                      "clientInfo": {"name": "one-more", "version": "1"}});
    let over = match h.registry.pooled(&alice, "app-x".into(), &init, None).await {
        Err(SessionError::Refused(f)) => f,
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a pool past the bound"),
    };
    assert_eq!(over.field("limit"), Some(&json!("bridge-pools-per-user")));
    let again = pooled(&mut h, &alice, "app-3").await;
    assert!(again.1.is_none(), "an existing pool still serves");

    let listens: Vec<_> = (0..pool::MAX_LISTENS_PER_PRINCIPAL)
        .map(|_| h.registry.listen(&alice).expect("a listen stream"))
        .collect();
    match h.registry.listen(&alice) {
        Err(SessionError::Refused(f)) => {
            assert_eq!(f.field("limit"), Some(&json!("listen-streams-per-user")));
        }
        _ => panic!("a listen stream past the bound"),
    }
    let bob = Principal {
        id: "bob".into(),
        ..Principal::anonymous()
    };
    h.registry.listen(&bob).expect("another user is untouched");
    drop(listens);
    h.registry
        .listen(&alice)
        .expect("closed streams give their places back");
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_call_is_recorded_cancelled_and_cancelled_upstream() {
    let mut h = harness(SessionConfig::default());
    let alice = Principal::anonymous();
    let (member, up) = pooled(&mut h, &alice, "caps").await;
    let mut up = up.unwrap();
    let reply = member.request(call(json!(7), "slow")).await;
    let Reply::Stream(handle) = reply else {
        panic!("a stream")
    };
    let sent = up.next_request().await;
    assert_ne!(
        sent["id"],
        json!(7),
        "ids are rewritten on pooled sessions too"
    );
    member.abandon(&handle.stream_id, &[]);
    let cancel = up.recv().await;
    assert_eq!(cancel["method"], "notifications/cancelled");
    assert_eq!(cancel["params"]["requestId"], sent["id"]);
    assert_eq!(member.in_flight(), 0);
    assert_eq!(h.recorded_outcomes(), ["cancelled"]);
    // A late answer finds nothing.
    up.answer(&sent, json!({"content": []})).await;
    assert_eq!(h.recorded_outcomes(), Vec::<String>::new());
}

/// A server replaced by a reload: its old generation still holds a session whose stream is
/// open, while the store (whose activity lags) finds it idle. The new generation's reaper
/// (same server name) must leave it to the generation that holds it; a registry of another
/// process would expire it.
#[tokio::test(start_paused = true)]
async fn a_reaper_leaves_a_session_another_registry_of_the_process_holds() {
    let cfg = SessionConfig {
        one_of_several: true,
        ..SessionConfig::default()
    };
    let mut h = harness(cfg.clone());
    let (session, _up) = h.session().await;
    let id = session.id().to_owned();
    let _exchange = session.exchange();
    let (connector, _ups) = Connector::in_memory(UpstreamLimits::default(), TaskTracker::new());
    let next = Registry::of_server(cfg.clone(), &h.registry.common(), connector);
    h.registry.drain();
    h.store.age(&id, 0);
    next.reap().await;
    h.registry.reap().await;
    assert!(!session.is_closed());
    let live = h.store.load_session(&id).await.unwrap().unwrap();
    assert_eq!(live.state, SessionState::Live, "left to its holder");

    // Without the process's registries in common, the store's view wins.
    let mut other = h.registry.common();
    other.siblings = Siblings::default();
    let (connector, _ups) = Connector::in_memory(UpstreamLimits::default(), TaskTracker::new());
    Registry::of_server(cfg, &other, connector).reap().await;
    let closed = h.store.load_session(&id).await.unwrap().unwrap();
    assert_eq!(closed.state, SessionState::Closed);
}

/// Issue 26: the stored sessions of a server no registry of the process serves (removed
/// from the configuration, or a quick start's `--demo` before a servers file) were reaped
/// by no one and stayed live for good; and the bridge's pooled sessions of an earlier
/// process, which no client can name, stayed live after every restart. The orphans are
/// expired at the gateway's idle timeout, the pooled ones closed at start; a held session
/// and a served server's stored session are left to their own reaper.
#[tokio::test(start_paused = true)]
async fn sessions_no_server_serves_expire_and_stale_pooled_ones_close() {
    let cfg = SessionConfig {
        one_of_several: true,
        upstream_name: "mine".into(),
        ..SessionConfig::default()
    };
    let mut h = harness(cfg);
    let (held, _up) = h.session().await;
    let mut gone = crate::store::conformance::record("orphan", 0);
    gone.upstream_name = "removed".into();
    h.store.create_session(gone).await.unwrap();
    let mut stored = crate::store::conformance::record("stored-mine", 0);
    stored.upstream_name = "mine".into();
    h.store.create_session(stored).await.unwrap();
    let mut pooled = crate::store::conformance::record("pooled-old", now_ms());
    pooled.upstream_name = "mine".into();
    pooled.transport = "pooled".into();
    h.store.create_session(pooled).await.unwrap();
    h.store.age(held.id(), 0);

    h.registry
        .reap_orphans(&["mine".to_owned()], Duration::from_secs(60))
        .await;
    let state = |id: &str| {
        let store = h.store.clone();
        let id = id.to_owned();
        async move { store.load_session(&id).await.unwrap().unwrap() }
    };
    let orphan = state("orphan").await;
    assert_eq!(
        (orphan.state, orphan.close_reason.as_deref()),
        (SessionState::Closed, Some("timeout"))
    );
    assert_eq!(
        state("stored-mine").await.state,
        SessionState::Live,
        "its server's reaper decides"
    );
    assert_eq!(
        state(held.id()).await.state,
        SessionState::Live,
        "held here"
    );

    assert_eq!(h.registry.close_stale_pooled().await, 1);
    let p = state("pooled-old").await;
    assert_eq!(
        (p.state, p.close_reason.as_deref()),
        (SessionState::Closed, Some("gateway_restart"))
    );
    assert_eq!(h.store.count_live().await.unwrap(), 2);
}
