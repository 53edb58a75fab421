//! Every bad input gets the status and JSON-RPC error the spec asks for, the process stays
//! up, and other sessions are unaffected.

mod common;

use common::{ACCEPT_BOTH, Gateway, state_dir};
use serde_json::json;

struct Row {
    name: &'static str,
    method: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    code: Option<i64>,
}

fn row(
    name: &'static str,
    headers: Vec<(&'static str, String)>,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: Option<i64>,
) -> Row {
    Row {
        name,
        method: "POST",
        headers,
        body: body.into(),
        status,
        code,
    }
}

#[tokio::test]
async fn bad_inputs_get_clear_errors_and_harm_nothing() {
    let dir = state_dir();
    let mut gw = Gateway::start(dir.path(), &["--demo", "--max-body", "2KiB"]);
    let mcp = gw.client();
    let good = mcp.initialize("bystander").await;
    let victim = mcp.initialize("victim").await;
    let deleted = mcp.initialize("deleted").await;
    assert_eq!(mcp.delete(&deleted).await, 200);

    let std = |sid: &str| {
        vec![
            ("content-type", "application/json".to_owned()),
            ("accept", ACCEPT_BOTH.to_owned()),
            ("mcp-session-id", sid.to_owned()),
        ]
    };
    let no_session = vec![
        ("content-type", "application/json".to_owned()),
        ("accept", ACCEPT_BOTH.to_owned()),
    ];
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string();
    let with = |mut h: Vec<(&'static str, String)>, k: &'static str, v: &str| {
        h.retain(|(name, _)| *name != k);
        h.push((k, v.to_owned()));
        h
    };
    let rows = vec![
        row(
            "malformed JSON",
            std(&victim),
            "{\"jsonrpc\": ",
            400,
            Some(-32700),
        ),
        row(
            "invalid UTF-8",
            std(&victim),
            vec![b'{', 0xff, 0xfe, b'}'],
            400,
            Some(-32700),
        ),
        row(
            "batch array",
            std(&victim),
            format!("[{call}]"),
            400,
            Some(-32600),
        ),
        row(
            "not JSON-RPC",
            std(&victim),
            "{\"hello\": 1}",
            400,
            Some(-32600),
        ),
        row(
            "null id",
            std(&victim),
            r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
            400,
            Some(-32600),
        ),
        row(
            "huge string id",
            std(&victim),
            format!(
                r#"{{"jsonrpc":"2.0","id":"{}","method":"ping"}}"#,
                "x".repeat(1500)
            ),
            400,
            Some(-32600),
        ),
        row(
            "missing Accept",
            with(std(&victim), "accept", "application/json"),
            call.clone(),
            406,
            Some(-32000),
        ),
        row(
            "wrong content type",
            with(std(&victim), "content-type", "text/plain"),
            call.clone(),
            415,
            Some(-32000),
        ),
        row(
            "oversized body",
            std(&victim),
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"pad":"{}"}}}}"#,
                "a".repeat(4096)
            ),
            413,
            Some(-32600),
        ),
        row(
            "wrong Origin",
            with(std(&victim), "origin", "http://evil.example.com"),
            call.clone(),
            403,
            Some(-32000),
        ),
        row(
            "DNS-rebound Host (loopback listener)",
            with(std(&victim), "host", "evil.example.com:8080"),
            call.clone(),
            403,
            Some(-32000),
        ),
        row(
            "unknown session",
            std("0123456789abcdef0123456789abcdef01234567"),
            call.clone(),
            404,
            Some(-32001),
        ),
        row(
            "foreign-looking session id",
            std("../../etc/passwd"),
            call.clone(),
            404,
            Some(-32001),
        ),
        row(
            "deleted session",
            std(&deleted),
            call.clone(),
            404,
            Some(-32001),
        ),
        row(
            "missing session",
            no_session.clone(),
            call.clone(),
            400,
            Some(-32000),
        ),
        row(
            "unsupported protocol version",
            with(std(&victim), "mcp-protocol-version", "1999-01-01"),
            call.clone(),
            400,
            Some(-32000),
        ),
        row(
            "initialize without params",
            no_session.clone(),
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize"}"#,
            200,
            Some(-32602),
        ),
        row(
            "re-initialize in a session",
            std(&victim),
            json!({"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {}}).to_string(),
            200,
            Some(-32600),
        ),
        Row {
            name: "GET without Accept",
            method: "GET",
            headers: vec![("mcp-session-id", victim.clone())],
            body: vec![],
            status: 406,
            code: Some(-32000),
        },
        Row {
            name: "GET without session",
            method: "GET",
            headers: vec![("accept", "text/event-stream".into())],
            body: vec![],
            status: 400,
            code: Some(-32000),
        },
        Row {
            name: "GET unknown session",
            method: "GET",
            headers: vec![
                ("accept", "text/event-stream".into()),
                ("mcp-session-id", "nope".into()),
            ],
            body: vec![],
            status: 404,
            code: Some(-32001),
        },
        Row {
            name: "GET bad Last-Event-ID",
            method: "GET",
            headers: vec![
                ("accept", "text/event-stream".into()),
                ("mcp-session-id", victim.clone()),
                ("last-event-id", "garbage".into()),
            ],
            body: vec![],
            status: 400,
            code: Some(-32000),
        },
        Row {
            name: "GET unknown stream",
            method: "GET",
            headers: vec![
                ("accept", "text/event-stream".into()),
                ("mcp-session-id", victim.clone()),
                ("last-event-id", "ffff.3".into()),
            ],
            body: vec![],
            status: 400,
            code: Some(-32000),
        },
        Row {
            name: "DELETE without session",
            method: "DELETE",
            headers: vec![],
            body: vec![],
            status: 400,
            code: Some(-32000),
        },
        Row {
            name: "DELETE unknown session",
            method: "DELETE",
            headers: vec![("mcp-session-id", "nope".into())],
            body: vec![],
            status: 404,
            code: Some(-32001),
        },
        row(
            "object id",
            std(&victim),
            r#"{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}"#,
            400,
            Some(-32600),
        ),
        row(
            "array id",
            std(&victim),
            r#"{"jsonrpc":"2.0","id":[1],"method":"ping"}"#,
            400,
            Some(-32600),
        ),
        row(
            "boolean id",
            std(&victim),
            r#"{"jsonrpc":"2.0","id":true,"method":"ping"}"#,
            400,
            Some(-32600),
        ),
        row(
            "wrong jsonrpc version",
            std(&victim),
            r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
            400,
            Some(-32600),
        ),
        row(
            "method not a string",
            std(&victim),
            r#"{"jsonrpc":"2.0","id":1,"method":42}"#,
            400,
            Some(-32600),
        ),
        row(
            "deeply nested params",
            std(&victim),
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"a":{}1{}}}}}"#,
                "[".repeat(600),
                "]".repeat(600)
            ),
            400,
            Some(-32700),
        ),
        // Beyond 64 bits an id cannot round-trip exactly through the upstream: refused.
        row(
            "huge integer id",
            std(&victim),
            r#"{"jsonrpc":"2.0","id":123456789012345678901234567890,"method":"ping"}"#,
            400,
            Some(-32600),
        ),
        row(
            "unknown method (the upstream's answer)",
            std(&victim),
            r#"{"jsonrpc":"2.0","id":77,"method":"nope/never"}"#,
            200,
            Some(-32601),
        ),
        Row {
            name: "PUT",
            method: "PUT",
            headers: vec![],
            body: vec![],
            status: 405,
            code: None,
        },
    ];
    let rows: Vec<Row> = rows.into_iter().chain(modern_rows()).collect();

    let http = reqwest::Client::new();
    for r in rows {
        let mut req = http.request(r.method.parse().unwrap(), &gw.url);
        for (k, v) in &r.headers {
            req = req.header(*k, v);
        }
        let resp = req.body(r.body.clone()).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, r.status, "{}: {text}", r.name);
        if let Some(code) = r.code {
            // An answer from the upstream comes as an SSE stream: its last message.
            let v: serde_json::Value = if text.starts_with("id:") || text.starts_with("retry:") {
                common::parse_sse(&text)
                    .into_iter()
                    .filter_map(|(_, d)| d)
                    .next_back()
                    .unwrap_or_else(|| panic!("{}: no message in {text}", r.name))
            } else {
                serde_json::from_str(&text)
                    .unwrap_or_else(|_| panic!("{}: body is JSON: {text}", r.name))
            };
            assert_eq!(v["jsonrpc"], "2.0", "{}", r.name);
            assert_eq!(
                v.pointer("/error/code").and_then(|c| c.as_i64()),
                Some(code),
                "{}: {text}",
                r.name
            );
        }
        assert!(gw.alive(), "gateway died on {}", r.name);
    }

    // Nobody else was harmed, the victim session included.
    assert_eq!(
        mcp.call_text(&good, 50, "echo", json!({"text": "fine"}))
            .await,
        "fine"
    );
    assert_eq!(
        mcp.call_text(&victim, 51, "echo", json!({"text": "also fine"}))
            .await,
        "also fine"
    );
}

/// One row per rule a 2026-07-28 request must follow (spec §1.2): the status and code
/// the spec gives each, from the same endpoint that serves the legacy rows above.
fn modern_rows() -> Vec<Row> {
    const V: &str = "2026-07-28";
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": V,
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    let headers = |method: &str, name: Option<&str>| {
        let mut h = vec![
            ("content-type", "application/json".to_owned()),
            ("accept", ACCEPT_BOTH.to_owned()),
            ("mcp-protocol-version", V.to_owned()),
            ("mcp-method", method.to_owned()),
        ];
        if let Some(n) = name {
            h.push(("mcp-name", n.to_owned()));
        }
        h
    };
    let without = |mut h: Vec<(&'static str, String)>, k: &str| {
        h.retain(|(name, _)| *name != k);
        h
    };
    let body = |method: &str, mut params: serde_json::Value| {
        if params.get("_meta").is_none() {
            params["_meta"] = meta.clone();
        }
        json!({"jsonrpc": "2.0", "id": 31, "method": method, "params": params}).to_string()
    };
    let list = || headers("tools/list", None);
    let echo = || headers("tools/call", Some("echo"));
    let echo_args = json!({"name": "echo", "arguments": {"text": "x"}});
    let with_meta = |extra: serde_json::Value| {
        let mut m = meta.clone();
        for (k, v) in extra.as_object().unwrap() {
            m[k] = v.clone();
        }
        m
    };
    vec![
        row("modern: no _meta", list(), json!({"jsonrpc": "2.0", "id": 31, "method": "tools/list", "params": {}}).to_string(), 400, Some(-32602)),
        row("modern: _meta without protocolVersion", list(), body("tools/list", json!({"_meta": {"io.modelcontextprotocol/clientCapabilities": {}}})), 400, Some(-32602)),
        row("modern: _meta without clientCapabilities", list(), body("tools/list", json!({"_meta": {"io.modelcontextprotocol/protocolVersion": V}})), 400, Some(-32602)),
        row("modern: no MCP-Protocol-Version header", without(list(), "mcp-protocol-version"), body("tools/list", json!({})), 400, Some(-32020)),
        row("modern: header version differs from _meta", { let mut h = without(list(), "mcp-protocol-version"); h.push(("mcp-protocol-version", "2025-11-25".into())); h }, body("tools/list", json!({})), 400, Some(-32020)),
        row("modern: unsupported version", { let mut h = without(list(), "mcp-protocol-version"); h.push(("mcp-protocol-version", "2099-01-01".into())); h }, body("tools/list", json!({"_meta": with_meta(json!({"io.modelcontextprotocol/protocolVersion": "2099-01-01"}))})), 400, Some(-32022)),
        row("modern: no Mcp-Method header", without(list(), "mcp-method"), body("tools/list", json!({})), 400, Some(-32020)),
        row("modern: Mcp-Method differs from the body", headers("prompts/list", None), body("tools/list", json!({})), 400, Some(-32020)),
        row("modern: no Mcp-Name on tools/call", headers("tools/call", None), body("tools/call", echo_args.clone()), 400, Some(-32020)),
        row("modern: Mcp-Name differs from the tool", headers("tools/call", Some("add")), body("tools/call", echo_args.clone()), 400, Some(-32020)),
        row("modern: unknown method", headers("nope/never", None), body("nope/never", json!({})), 404, Some(-32601)),
        row("modern: removed method (initialize)", headers("initialize", None), body("initialize", json!({})), 404, Some(-32601)),
        row("modern: removed method (ping)", headers("ping", None), body("ping", json!({})), 404, Some(-32601)),
        row("modern: a response from the client", list(), json!({"jsonrpc": "2.0", "id": 31, "result": {}}).to_string(), 400, Some(-32600)),
        row("modern: bad logLevel", list(), body("tools/list", json!({"_meta": with_meta(json!({"io.modelcontextprotocol/logLevel": "loud"}))})), 400, Some(-32602)),
        row("modern: requestState not a string", echo(), body("tools/call", json!({"name": "echo", "arguments": {}, "requestState": 5})), 400, Some(-32602)),
        row("modern: inputResponses not an object", echo(), body("tools/call", json!({"name": "echo", "arguments": {}, "inputResponses": null})), 400, Some(-32602)),
        row("modern: forged requestState", echo(), body("tools/call", json!({"name": "echo", "arguments": {}, "requestState": "eyJwIjoieCJ9.AAAA", "inputResponses": {}})), 400, Some(-32602)),
        row("modern: a capability the client did not declare (sampling)", headers("tools/call", Some("sample")), body("tools/call", json!({"name": "sample", "arguments": {"prompt": "hi"}})), 400, Some(-32021)),
        Row { name: "modern: GET", method: "GET", headers: vec![("accept", "text/event-stream".into()), ("mcp-protocol-version", V.into())], body: vec![], status: 405, code: Some(-32000) },
        Row { name: "modern: DELETE", method: "DELETE", headers: vec![("mcp-protocol-version", V.into())], body: vec![], status: 405, code: Some(-32000) },
        row("modern: a notification is accepted and dropped", list(), json!({"jsonrpc": "2.0", "method": "notifications/initialized", "params": {"_meta": meta}}).to_string(), 202, None),
    ]
}

#[tokio::test]
async fn slow_headers_do_not_block_others() {
    use tokio::io::AsyncWriteExt;
    let dir = state_dir();
    let gw = common::Gateway::builder(dir.path())
        .layer(tether_core::config::Layer::default())
        .start();
    // A slowloris connection that never finishes its headers.
    let mut slow = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    slow.write_all(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        .await
        .unwrap();
    let mcp = gw.client();
    let sid = mcp.initialize("fast").await;
    assert_eq!(
        mcp.call_text(&sid, 1, "echo", json!({"text": "not blocked"}))
            .await,
        "not blocked"
    );
    drop(slow);
}

#[tokio::test]
async fn garbage_from_the_upstream_is_ignored() {
    let dir = state_dir();
    // An upstream that writes a non-JSON line before behaving: sh is used only to inject it.
    let script = format!("echo 'this is not json'; exec {} demo-server", common::BIN);
    let gw = Gateway::start(dir.path(), &["--", "sh", "-c", &script]);
    let mcp = gw.client();
    let sid = mcp.initialize("garbage").await;
    assert_eq!(
        mcp.call_text(&sid, 1, "echo", json!({"text": "ok"})).await,
        "ok"
    );
    assert!(gw.log_text().contains("not a JSON-RPC message"));
}
