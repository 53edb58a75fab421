use super::*;

fn req(method: &str, params: Value) -> Message {
    let mut v = json!({"jsonrpc": "2.0", "id": 7, "method": method});
    v["params"] = params;
    Message::from_value(v).unwrap()
}

fn meta() -> Value {
    json!({
        META_PROTOCOL_VERSION: MODERN_VERSION,
        META_CLIENT_CAPABILITIES: {},
        META_CLIENT_INFO: {"name": "c", "version": "1"},
    })
}

fn headers<'a>(method: &'a str, name: Option<&'a str>) -> Headers<'a> {
    Headers {
        version: Some(MODERN_VERSION),
        method: Some(method),
        name,
    }
}

#[test]
fn every_rule_refuses_with_its_status_and_code() {
    let rows: Vec<(Message, Headers<'_>, u16, i64)> = vec![
        (
            req("tools/list", json!({})),
            headers("tools/list", None),
            400,
            code::INVALID_PARAMS,
        ),
        (
            req(
                "tools/list",
                json!({"_meta": {META_CLIENT_CAPABILITIES: {}}}),
            ),
            headers("tools/list", None),
            400,
            code::INVALID_PARAMS,
        ),
        (
            req(
                "tools/list",
                json!({"_meta": {META_PROTOCOL_VERSION: MODERN_VERSION}}),
            ),
            headers("tools/list", None),
            400,
            code::INVALID_PARAMS,
        ),
        (
            req("tools/list", json!({"_meta": meta()})),
            Headers {
                version: None,
                ..headers("tools/list", None)
            },
            400,
            code::HEADER_MISMATCH,
        ),
        (
            req("tools/list", json!({"_meta": meta()})),
            Headers {
                version: Some("2025-11-25"),
                ..headers("tools/list", None)
            },
            400,
            code::HEADER_MISMATCH,
        ),
        (
            req(
                "tools/list",
                json!({"_meta": {META_PROTOCOL_VERSION: "v9", META_CLIENT_CAPABILITIES: {}}}),
            ),
            Headers {
                version: Some("v9"),
                ..headers("tools/list", None)
            },
            400,
            code::UNSUPPORTED_PROTOCOL_VERSION,
        ),
        (
            req("tools/list", json!({"_meta": meta()})),
            headers("tools/call", None),
            400,
            code::HEADER_MISMATCH,
        ),
        (
            req("tools/list", json!({"_meta": meta()})),
            Headers {
                method: None,
                ..headers("tools/list", None)
            },
            400,
            code::HEADER_MISMATCH,
        ),
        (
            req("tools/call", json!({"name": "echo", "_meta": meta()})),
            headers("tools/call", None),
            400,
            code::HEADER_MISMATCH,
        ),
        (
            req("tools/call", json!({"name": "echo", "_meta": meta()})),
            headers("tools/call", Some("add")),
            400,
            code::HEADER_MISMATCH,
        ),
        (
            req("initialize", json!({"_meta": meta()})),
            headers("initialize", None),
            404,
            code::METHOD_NOT_FOUND,
        ),
        (
            req("ping", json!({"_meta": meta()})),
            headers("ping", None),
            404,
            code::METHOD_NOT_FOUND,
        ),
    ];
    for (i, (env, h, status, code)) in rows.into_iter().enumerate() {
        let r = check(&env, h).expect_err(&format!("row {i} must be refused"));
        assert_eq!((r.status, r.code), (status, code), "row {i}: {r:?}");
    }
}

#[test]
fn an_unsupported_version_lists_what_is_served_and_echoes_the_request() {
    let env = req(
        "server/discover",
        json!({"_meta": {META_PROTOCOL_VERSION: "v999.0.0", META_CLIENT_CAPABILITIES: {}}}),
    );
    let r = check(
        &env,
        Headers {
            version: Some("v999.0.0"),
            ..headers("server/discover", None)
        },
    )
    .unwrap_err();
    assert_eq!(
        r.data,
        Some(json!({"supported": SUPPORTED_VERSIONS, "requested": "v999.0.0"}))
    );
}

#[test]
fn a_valid_request_gives_its_client_and_a_base64_name_is_decoded() {
    let env = req(
        "tools/call",
        json!({"name": "héllo", "_meta": {META_PROTOCOL_VERSION: MODERN_VERSION, META_CLIENT_CAPABILITIES: {"sampling": {}}, META_LOG_LEVEL: "warning"}}),
    );
    let encoded = format!("=?base64?{}?=", STANDARD.encode("héllo"));
    let m = check(&env, headers("tools/call", Some(&encoded))).unwrap();
    assert!(m.declares("sampling") && !m.declares("elicitation"));
    assert_eq!(m.log_level, Some(3));
    assert_eq!(m.client_info, None);
    assert_eq!(m.init_params()["protocolVersion"], BRIDGE_LEGACY_VERSION);
}

#[test]
fn the_capabilities_key_ignores_key_order() {
    let a: Value = serde_json::from_str(r#"{"sampling":{},"roots":{"listChanged":true}}"#).unwrap();
    let b: Value = serde_json::from_str(r#"{"roots":{"listChanged":true},"sampling":{}}"#).unwrap();
    let m = |c: Value| Meta {
        version: MODERN_VERSION.into(),
        client_info: None,
        capabilities: c,
        log_level: None,
    };
    assert_eq!(m(a.clone()).capabilities_key(), m(b).capabilities_key());
    let mut named = m(a.clone());
    named.client_info = Some(json!({"name": "cursor", "version": "1"}));
    assert_ne!(
        named.capabilities_key(),
        m(a).capabilities_key(),
        "another application"
    );
    assert_ne!(
        m(json!({})).capabilities_key(),
        m(json!({"sampling": {}})).capabilities_key()
    );
}

#[test]
fn to_legacy_strips_modern_fields_and_returns_the_retry() {
    let mut v = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "x", "inputResponses": {"k": {"action": "accept"}}, "requestState": "s",
        "task": {"ttl": 1000},
        "_meta": {META_PROTOCOL_VERSION: MODERN_VERSION, "progressToken": 5}}});
    let r = to_legacy(&mut v).unwrap();
    assert_eq!(r.state.as_deref(), Some("s"));
    assert_eq!(r.responses["k"], json!({"action": "accept"}));
    assert_eq!(
        v["params"],
        json!({"name": "x", "_meta": {"progressToken": 5}})
    );
    let mut bad = json!({"params": {"requestState": 3}});
    assert_eq!(to_legacy(&mut bad).unwrap_err().code, code::INVALID_PARAMS);
}

#[test]
fn results_get_their_type_and_cache_hints_and_statuses_follow_the_spec() {
    let mut a = json!({"id": 1, "result": {"tools": []}});
    complete("tools/list", &mut a);
    assert_eq!(a["result"]["resultType"], "complete");
    assert_eq!(a["result"]["ttlMs"], 0);
    let mut c = json!({"id": 1, "result": {"content": [], "resultType": "x"}});
    complete("tools/call", &mut c);
    assert_eq!(c["result"], json!({"content": [], "resultType": "x"}));
    assert_eq!(status_of(&json!({"error": {"code": -32601}})), 404);
    assert_eq!(status_of(&json!({"error": {"code": -32602}})), 200);
}

#[test]
fn discover_translates_a_legacy_initialize_result() {
    let init = json!({"capabilities": {"tools": {"listChanged": true}, "resources": {"subscribe": true}},
        "serverInfo": {"name": "s", "version": "2"}, "instructions": "hi"});
    let d = discover(Some(&init), 0);
    assert_eq!(
        d["capabilities"],
        json!({"tools": {"listChanged": true}, "resources": {"subscribe": true},
            "extensions": {TASKS_EXTENSION: {}}})
    );
    assert_eq!(d["_meta"][META_SERVER_INFO]["name"], "s");
    assert_eq!(d["instructions"], "hi");
    assert_eq!(d["supportedVersions"][0], MODERN_VERSION);
}

#[test]
fn a_listen_filter_admits_what_it_names_and_tags_it() {
    let env = req(
        "subscriptions/listen",
        json!({"notifications": {"promptsListChanged": true, "resourceSubscriptions": ["x"]}}),
    );
    let f = Filter::of(&env);
    assert!(f.admits(&json!({"method": "notifications/prompts/list_changed"})));
    assert!(!f.admits(&json!({"method": "notifications/tools/list_changed"})));
    assert!(
        f.admits(&json!({"method": "notifications/resources/updated", "params": {"uri": "x"}}))
    );
    assert!(
        !f.admits(&json!({"method": "notifications/resources/updated", "params": {"uri": "y"}}))
    );
    let ack = f.acknowledged(&json!("sub-1"));
    assert_eq!(
        ack["params"]["notifications"],
        json!({"promptsListChanged": true, "resourceSubscriptions": ["x"]})
    );
    assert_eq!(ack["params"]["_meta"][META_SUBSCRIPTION_ID], "sub-1");
    let t = tagged(
        &json!({"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"}),
        &json!("sub-1"),
    );
    assert_eq!(t["params"]["_meta"][META_SUBSCRIPTION_ID], "sub-1");
}

#[test]
fn log_messages_need_a_level_and_meet_it() {
    let warn = json!({"params": {"level": "warning"}});
    assert!(!admits_log(None, &warn));
    assert!(admits_log(Some(1), &warn));
    assert!(!admits_log(Some(4), &warn));
}

#[test]
fn request_state_is_sealed_bound_and_expires() {
    let key = StateKey::new([7; 32]);
    let claims = StateClaims {
        p: "alice".into(),
        i: "inst".into(),
        w: "w1".into(),
        m: "tools/call".into(),
        n: Some("sample".into()),
        x: 1_000,
    };
    let s = key.seal(&claims);
    assert_eq!(
        key.open(&s, "alice", "tools/call", Some("sample"), 999),
        Ok(claims)
    );
    assert_eq!(
        key.open(
            &format!("{s}-TAMPERED"),
            "alice",
            "tools/call",
            Some("sample"),
            0
        ),
        Err(StateError::Tampered)
    );
    assert_eq!(
        key.open(&s, "bob", "tools/call", Some("sample"), 0),
        Err(StateError::Tampered)
    );
    assert_eq!(
        key.open(&s, "alice", "tools/call", Some("echo"), 0),
        Err(StateError::Foreign)
    );
    assert_eq!(
        key.open(&s, "alice", "tools/call", Some("sample"), 1_000),
        Err(StateError::Expired)
    );
    assert!(StateKey::from_hex(&"07".repeat(32)).is_some_and(|k| k.0 == [7; 32]));
    assert!(StateKey::from_hex("07").is_none() && StateKey::from_hex(&"zz".repeat(32)).is_none());
    let other = StateKey::new([8; 32]);
    assert_eq!(
        other.open(&s, "alice", "tools/call", Some("sample"), 0),
        Err(StateError::Tampered)
    );
    let (payload, tag) = s.split_once('.').unwrap();
    let forged = format!("{}x.{tag}", payload);
    assert_eq!(
        key.open(&forged, "alice", "tools/call", Some("sample"), 0),
        Err(StateError::Tampered)
    );
}

#[test]
fn input_required_carries_each_request_under_its_key() {
    let r = input_required(
        json!(3),
        &[(
            "tether-1".into(),
            json!({"method": "elicitation/create", "id": "tether-1", "params": {"message": "?"}}),
        )],
        "st",
    );
    assert_eq!(r["id"], 3);
    assert_eq!(
        r["result"]["inputRequests"]["tether-1"],
        json!({"method": "elicitation/create", "params": {"message": "?"}})
    );
    assert_eq!(r["result"]["requestState"], "st");
}

#[test]
fn a_legacy_session_request_is_made_self_contained_for_a_modern_upstream() {
    let mut client = Upstream::of_initialize(&json!({
        "protocolVersion": "2025-06-18",
        "capabilities": {"elicitation": {}},
        "clientInfo": {"name": "c", "version": "1"},
    }));
    client.log_level = Some("debug".into());
    let mut r = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "héllo", "_meta": {"progressToken": 9}}});
    client.stamp(&mut r);
    let meta = &r["params"]["_meta"];
    assert_eq!(meta["progressToken"], 9, "the client's own keys stay");
    assert_eq!(meta[META_PROTOCOL_VERSION], MODERN_VERSION);
    assert_eq!(meta[META_CLIENT_CAPABILITIES], json!({"elicitation": {}}));
    assert_eq!(meta[META_CLIENT_INFO]["name"], "c");
    assert_eq!(meta[META_LOG_LEVEL], "debug");
    // What the gateway stamps passes its own rules for a modern request.
    let env = Message::from_value(r.clone()).unwrap();
    let h = request_headers(&r);
    let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
    assert_eq!(
        get("mcp-name"),
        Some(format!("=?base64?{}?=", STANDARD.encode("héllo")).as_str())
    );
    check(
        &env,
        Headers {
            version: get("mcp-protocol-version"),
            method: get("mcp-method"),
            name: get("mcp-name"),
        },
    )
    .expect("a stamped request is a valid modern request");
    let mut plain = json!({"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "demo://a"}});
    client.stamp(&mut plain);
    assert!(request_headers(&plain).contains(&("mcp-name", "demo://a".to_owned())));
}

#[test]
fn discover_becomes_an_initialize_result_at_the_clients_version() {
    let d = json!({
        "resultType": "complete",
        "supportedVersions": ["2026-07-28"],
        "capabilities": {"tools": {"listChanged": true}},
        "instructions": "be kind",
        "_meta": {META_SERVER_INFO: {"name": "up", "version": "2"}},
    });
    assert!(speaks_modern(&d));
    assert!(!speaks_modern(
        &json!({"supportedVersions": ["2025-11-25"]})
    ));
    let i = initialize_result(&d, Some("2025-06-18"));
    assert_eq!(i["protocolVersion"], "2025-06-18");
    assert_eq!(i["serverInfo"]["name"], "up");
    assert_eq!(i["instructions"], "be kind");
    assert_eq!(i["capabilities"]["tools"]["listChanged"], true);
    let i = initialize_result(&d, Some("1999-01-01"));
    assert_eq!(i["protocolVersion"], BRIDGE_LEGACY_VERSION);
}

#[test]
fn an_input_required_answer_gives_its_requests_and_the_retry_carries_the_answers() {
    let a = json!({"jsonrpc": "2.0", "id": 4, "result": {
        "resultType": "input_required",
        "inputRequests": {"k": {"method": "elicitation/create", "params": {"message": "?"}}},
        "requestState": "s1",
    }});
    let InputRound {
        requests: reqs,
        state,
    } = input_requests(&a).unwrap();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].0, "k");
    assert_eq!(reqs[0].1["method"], "elicitation/create");
    assert_eq!(reqs[0].1["params"]["message"], "?");
    assert_eq!(state, Some(json!("s1")));
    assert!(input_requests(&json!({"id": 4, "result": {"resultType": "complete"}})).is_none());
    let original =
        json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "ask"}});
    let mut answers = Map::new();
    answers.insert("k".into(), json!({"action": "accept"}));
    let r = retry(&original, json!("4-retry-1"), answers, state);
    assert_eq!(r["id"], "4-retry-1", "a retry has an id of its own");
    assert_eq!(r["params"]["name"], "ask");
    assert_eq!(r["params"]["inputResponses"]["k"]["action"], "accept");
    assert_eq!(r["params"]["requestState"], "s1");
    let mut done = json!({"jsonrpc": "2.0", "id": "4-retry-1", "result": {"resultType": "complete", "ttlMs": 0, "cacheScope": "private", "content": []}});
    to_legacy_answer(&mut done, json!(4));
    assert_eq!(
        done,
        json!({"jsonrpc": "2.0", "id": 4, "result": {"content": []}})
    );
}

#[test]
fn the_listen_request_asks_for_what_the_server_offers_and_the_client_subscribed() {
    let caps =
        json!({"tools": {"listChanged": true}, "prompts": {}, "resources": {"listChanged": false}});
    assert!(
        listen_request(json!("l"), &json!({}), &[]).is_none(),
        "nothing to listen for"
    );
    let r = listen_request(json!("l"), &caps, &["demo://a".into()]).unwrap();
    assert_eq!(
        r["params"]["notifications"],
        json!({"toolsListChanged": true, "resourceSubscriptions": ["demo://a"]})
    );
    let ack = json!({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged", "params": {}});
    assert!(from_listen(ack).is_none());
    let n = tagged(
        &json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
        &json!("l"),
    );
    assert_eq!(
        from_listen(n).unwrap(),
        json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed", "params": {}})
    );
}

#[test]
fn a_listen_filter_passes_the_task_notifications_it_names_and_says_so() {
    let env = req(
        "subscriptions/listen",
        json!({"notifications": {"taskIds": ["t_a", "t_a", "t_b"]}}),
    );
    let f = Filter::of(&env);
    assert_eq!(f.task_ids, vec!["t_a", "t_b"]);
    let note = |id: &str| json!({"method": "notifications/tasks", "params": {"taskId": id}});
    assert!(f.admits(&note("t_a")));
    assert!(!f.admits(&note("t_c")));
    let ack = f.acknowledged(&json!(7));
    assert_eq!(
        ack["params"]["notifications"]["taskIds"],
        json!(["t_a", "t_b"])
    );
    let many: Vec<String> = (0..100).map(|i| format!("t_{i}")).collect();
    let f = Filter::of(&req(
        "subscriptions/listen",
        json!({"notifications": {"taskIds": many}}),
    ));
    assert_eq!(f.task_ids.len(), MAX_LISTEN_TASKS);
}

#[test]
fn a_task_method_must_name_its_task_in_mcp_name() {
    let meta = json!({META_PROTOCOL_VERSION: MODERN_VERSION, META_CLIENT_CAPABILITIES: {"extensions": {TASKS_EXTENSION: {}}}});
    let env = req("tasks/get", json!({"taskId": "t_1", "_meta": meta}));
    let h = |name| Headers {
        version: Some(MODERN_VERSION),
        method: Some("tasks/get"),
        name,
    };
    let m = check(&env, h(Some("t_1"))).expect("a matching name passes");
    assert!(m.declares_extension(TASKS_EXTENSION));
    let r = check(&env, h(Some("t_2"))).expect_err("a mismatch is refused");
    assert_eq!((r.status, r.code), (400, code::HEADER_MISMATCH));
    assert!(check(&env, h(None)).is_err());
}
