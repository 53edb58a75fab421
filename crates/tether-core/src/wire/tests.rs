use super::*;
use serde_json::json;

fn parse(v: &Value) -> Result<Message, EnvelopeError> {
    Message::parse(v.to_string().as_bytes())
}

#[test]
fn parsing_the_bytes_and_the_tree_agree() {
    let cases = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "a\"b\\c\u{1F600}"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "t", "progress": 1}}),
        json!({"jsonrpc": "2.0", "id": "x", "result": {"content": [], "isError": true}}),
        json!({"jsonrpc": "2.0", "id": 7, "error": {"code": -32601, "message": "no", "data": {"a": [1, 2]}}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "vendor/thing"}),
    ];
    for case in cases {
        let typed = parse(&case).unwrap();
        let tree = Message::from_value(case.clone()).unwrap();
        assert_eq!(typed.to_value(), case);
        assert_eq!(tree.to_value(), case);
        assert_eq!(typed.kind(), tree.kind());
        let text = typed.encode();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), case);
        assert_eq!(serde_json::to_value(&typed).unwrap(), case);
    }
}

#[test]
fn invalid_messages_say_why_on_both_paths() {
    let cases: [(Value, &str); 9] = [
        (
            json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]),
            "batch",
        ),
        (json!("ping"), "must be an object"),
        (json!({"id": 1, "method": "ping"}), "jsonrpc"),
        (
            json!({"jsonrpc": "1.0", "id": 1, "method": "ping"}),
            "jsonrpc",
        ),
        (
            json!({"jsonrpc": "2.0", "id": null, "method": "ping"}),
            "\"id\"",
        ),
        (
            json!({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}),
            "\"id\"",
        ),
        (
            json!({"jsonrpc": "2.0", "id": 1, "method": 3}),
            "\"method\"",
        ),
        (json!({"jsonrpc": "2.0", "id": 1}), "exactly one"),
        (
            json!({"jsonrpc": "2.0", "id": 1, "error": {"code": "x", "message": "m"}}),
            "\"error\"",
        ),
    ];
    for (case, says) in cases {
        let typed = parse(&case).unwrap_err();
        let tree = Message::from_value(case.clone()).unwrap_err();
        assert_eq!(typed, tree, "{case}");
        assert!(typed.to_string().contains(says), "{case}: {typed}");
        assert_eq!(typed.code(), -32600);
    }
    let bad = Message::parse(b"{\"jsonrpc\": ").unwrap_err();
    assert!(matches!(bad, EnvelopeError::Parse(_)));
    assert_eq!(bad.code(), -32700);
    assert_eq!(
        parse(&json!({"jsonrpc": "2.0"})).unwrap_err(),
        EnvelopeError::Invalid("message has neither \"method\" nor \"id\"")
    );
}

#[test]
fn nesting_is_refused_where_a_tree_reader_refuses_it() {
    for depth in [120, 126, 127, 128, 129, 200] {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"a":{}"x\"[{{"{}}}}}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let tree = serde_json::from_str::<Value>(&body).is_ok();
        let typed = Message::parse(body.as_bytes());
        assert_eq!(typed.is_ok(), tree, "depth {depth}: {typed:?}");
        if let Err(e) = typed {
            assert_eq!(e.code(), -32700);
        }
    }
}

#[test]
fn a_repeated_member_is_read_as_any_json_reader_reads_it() {
    let m = Message::parse(br#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#).unwrap();
    assert_eq!(m.id(), Some(&json!(2)));
}

#[test]
fn raw_parts_are_copied_as_they_came_and_ids_replaced() {
    let body = br#"{"jsonrpc":"2.0","id":"c-1","method":"tools/call","params":{"name":"echo","arguments":{"text":"caf\u00e9 \"q\""}}}"#;
    let mut m = Message::parse(body).unwrap();
    assert_eq!(m.tool_name().as_deref(), Some("echo"));
    m.set_id(json!(41));
    let out = m.encode();
    assert!(
        out.contains(r#""params":{"name":"echo","arguments":{"text":"caf\u00e9 \"q\""}}"#),
        "{out}"
    );
    assert!(out.starts_with(r#"{"jsonrpc":"2.0","id":41,"method":"tools/call""#));
}

#[test]
fn fields_the_gateway_reads() {
    let m = parse(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"arguments": {"x": 1}, "name": "n", "_meta": {"progressToken": 5}}}))
    .unwrap();
    assert_eq!(m.tool_name().as_deref(), Some("n"));
    assert_eq!(m.progress_token(), Some(json!(5)));
    let prompt = parse(
        &json!({"jsonrpc": "2.0", "id": 1, "method": "prompts/get", "params": {"name": "p"}}),
    )
    .unwrap();
    assert_eq!(prompt.tool_name(), None);
    let failed = parse(&json!({"jsonrpc": "2.0", "id": 1, "result": {"isError": true}})).unwrap();
    assert!(failed.is_tool_error());
    let fine = parse(&json!({"jsonrpc": "2.0", "id": 1, "result": {"isError": "yes"}})).unwrap();
    assert!(!fine.is_tool_error());
    let err = parse(&json!({"jsonrpc": "2.0", "id": 1, "error": {"code": -32012, "message": "t"}}))
        .unwrap();
    assert_eq!(err.error_code(), Some(-32012));
}

#[test]
fn params_are_edited_only_when_the_edit_changes_them() {
    let mut m =
        Message::parse(br#"{"jsonrpc":"2.0","id":1,"method":"x","params": {"a" : 1}}"#).unwrap();
    m.edit_params(|_| false);
    assert_eq!(m.params().unwrap().get(), r#"{"a" : 1}"#);
    m.edit_params(|p| {
        p.insert("b".into(), json!(2));
        true
    });
    assert_eq!(m.params_value(), Some(json!({"a": 1, "b": 2})));
    let mut bare = Message::request(json!(1), "x", None);
    bare.edit_params(|p| {
        p.insert("_meta".into(), json!({}));
        true
    });
    assert_eq!(bare.params_value(), Some(json!({"_meta": {}})));
}

#[test]
fn our_own_messages_keep_a_null_id() {
    let m = Message::ours(
        json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "bad"}}),
    );
    assert_eq!(m.kind(), Kind::Response);
    assert_eq!(
        serde_json::from_str::<Value>(&m.encode()).unwrap(),
        json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "bad"}})
    );
}
