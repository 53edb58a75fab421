//! The session's bounds and pooled members under paused time: subscriptions per session
//! and principal, closing, the stateless pool, abandoned calls, reapers.
//! Must not: sleep, spawn a process or open a socket.

use super::*;

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
