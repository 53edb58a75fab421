use super::*;

fn read(text: &str) -> Result<ServersFile, Vec<String>> {
    parse(text, "mcp.json", &EnvPolicy::Inherit)
}

#[test]
fn a_claude_desktop_file_reads_as_written() {
    let f = read(
        r#"{"mcpServers": {
            "files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"], "env": {"A": "1"}},
            "remote": {"url": "https://mcp.example.com/mcp", "headers": {"Authorization": "Bearer x"}, "tether": {"protocol": "legacy", "idle-timeout": "5m"}},
            "off": {"command": "x", "disabled": true},
            "cline": {"command": "uvx", "args": ["mcp-server-time"], "autoApprove": [], "weird": 1}
        }, "globalShortcut": "x"}"#,
    )
    .unwrap();
    let names: Vec<_> = f.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["cline", "files", "remote"]);
    match &f.servers[1].upstream {
        UpstreamSpec::Stdio { argv, env, .. } => {
            assert_eq!(argv[0], "npx");
            assert_eq!(argv.len(), 4);
            assert_eq!(env["A"], "1");
        }
        other @ UpstreamSpec::Http { .. } => panic!("{other:?}"),
    }
    match &f.servers[2].upstream {
        UpstreamSpec::Http {
            url,
            protocol,
            headers,
        } => {
            assert_eq!(url, "https://mcp.example.com/mcp");
            assert_eq!(*protocol, UpstreamProtocol::Legacy);
            assert_eq!(
                headers,
                &[("Authorization".to_owned(), "Bearer x".to_owned())]
            );
        }
        other @ UpstreamSpec::Stdio { .. } => panic!("{other:?}"),
    }
    assert_eq!(f.servers[2].settings.idle_timeout.as_deref(), Some("5m"));
    let notes = f.notes.join("\n");
    for want in [
        "\"globalShortcut\"",
        "mcpServers.off: disabled",
        "\"autoApprove\" is a client setting",
        "mcpServers.cline: unknown key \"weird\"",
    ] {
        assert!(notes.contains(want), "{want} in {notes}");
    }
}

#[test]
fn import_splits_a_client_file_into_the_gateways_and_the_clients() {
    let text = r#"{"mcpServers": {
        "files": {"command": "npx", "args": ["fs"], "autoApprove": ["read"]},
        "remote": {"serverUrl": "https://mcp.example.com/mcp", "headers": {"X": "1"}},
        "off": {"command": "x", "disabled": true}
    }, "globalShortcut": "Ctrl+Space"}"#;
    let i = import(text, "c.json", "http://127.0.0.1:7450/mcp", Via::Connect).unwrap();
    assert_eq!(i.names, ["files", "remote"]);
    // Tether gets the entries as written, minus what only clients read.
    assert_eq!(
        i.tether["mcpServers"]["files"],
        serde_json::json!({"command": "npx", "args": ["fs"]})
    );
    assert_eq!(
        i.tether["mcpServers"]["remote"]["headers"],
        serde_json::json!({"X": "1"})
    );
    assert!(i.tether["mcpServers"].get("off").is_none());
    // The client keeps its other keys, its disabled entry, and its own settings.
    assert_eq!(i.client["globalShortcut"], "Ctrl+Space");
    assert_eq!(i.client["mcpServers"]["off"]["disabled"], true);
    assert_eq!(
        i.client["mcpServers"]["files"],
        serde_json::json!({"command": "tether", "args": ["connect", "http://127.0.0.1:7450/servers/files/mcp"], "autoApprove": ["read"]})
    );
    // The Tether file is one Tether reads back.
    let back = parse(&i.tether.to_string(), "t.json", &EnvPolicy::Inherit).unwrap();
    assert_eq!(back.servers.len(), 2);
    assert!(back.notes.is_empty(), "{:?}", back.notes);
    // Direct HTTP, in the forms each client reads.
    let u = import(text, "c.json", "http://gw:7450", Via::Url).unwrap();
    assert_eq!(
        u.client["mcpServers"]["remote"],
        serde_json::json!({"serverUrl": "http://gw:7450/servers/remote/mcp"})
    );
    let vs = import(
        r#"{"servers": {"gh": {"type": "stdio", "command": "gh-mcp"}}}"#,
        "mcp.json",
        "http://gw:7450",
        Via::Url,
    )
    .unwrap();
    assert_eq!(
        vs.client["servers"]["gh"],
        serde_json::json!({"type": "http", "url": "http://gw:7450/servers/gh/mcp"})
    );
    // A file Tether cannot serve is refused whole, with every reason.
    assert!(
        import(
            r#"{"mcpServers": {"x": {}}}"#,
            "c.json",
            "http://gw",
            Via::Url
        )
        .is_err()
    );
}

#[test]
fn a_file_holds_a_bounded_number_of_servers() {
    let many: serde_json::Map<String, Value> = (0..=MAX_SERVERS)
        .map(|i| (format!("s{i}"), serde_json::json!({"command": "x"})))
        .collect();
    let text = serde_json::json!({ "mcpServers": many }).to_string();
    let err = read(&text).unwrap_err().join("\n");
    assert!(err.contains("at most 256"), "{err}");
}

#[test]
fn a_vs_code_file_reads_too() {
    let f = read(r#"{"inputs": [], "servers": {"gh": {"type": "http", "url": "http://127.0.0.1:9/mcp"}, "t": {"type": "stdio", "command": "t"}}}"#).unwrap();
    assert_eq!(f.servers.len(), 2);
}

#[test]
fn every_problem_is_reported_at_once_with_file_and_server() {
    let errs = read(
        r#"{"mcpServers": {
            "both": {"command": "x", "url": "http://a/mcp"},
            "none": {"args": []},
            "bad url": {"url": "ftp://x"},
            "sse": {"type": "sse", "url": "http://a/sse"},
            "http-env": {"url": "http://a/mcp", "env": {"A": "1"}},
            "settings": {"command": "x", "tether": {"idle-timeout": "soon", "colour": "red", "protocol": "modern"}}
        }}"#,
    )
    .unwrap_err();
    let all = errs.join("\n");
    for want in [
        "mcp.json: mcpServers.both: give \"command\" or \"url\", not both",
        "mcpServers.none: neither",
        "mcpServers.bad url: the name may hold only",
        "mcpServers.sse: \"type\": \"sse\"",
        "mcpServers.http-env: \"args\", \"env\" and \"cwd\" apply only",
        "mcpServers.settings: tether.idle-timeout must be a duration",
        "mcpServers.settings: tether.colour is not a Tether server setting",
        "mcpServers.settings: tether.protocol applies only to a \"url\"",
    ] {
        assert!(all.contains(want), "{want:?} in\n{all}");
    }
    assert!(read("[]").is_err());
    assert!(read("{").unwrap_err()[0].contains("not JSON"));
    assert!(read(r#"{"other": {}}"#).unwrap_err()[0].contains("no \"mcpServers\""));
    assert!(
        read(r#"{"mcpServers": {"A": {"command": "x"}, "a": {"command": "y"}}}"#).unwrap_err()[0]
            .contains("but for case")
    );
}

/// Issue 26: `.` and `..` are path steps (clients normalize `/servers/../mcp` to
/// `/mcp`), so they are no names; `tether import` maps what a gateway cannot serve
/// under and says so, and the client keeps its own entry name.
#[test]
fn names_are_safe_and_import_maps_the_others() {
    for bad in [".", "..", "...", "", "a/b", "my server", &"x".repeat(65)] {
        assert!(!valid_name(bad), "{bad:?}");
    }
    for good in ["a", "a.b", ".hidden", "github-mcp_2", &"x".repeat(64)] {
        assert!(valid_name(good), "{good:?}");
    }
    assert!(read(r#"{"mcpServers": {"..": {"command": "x"}}}"#).is_err());
    let text = r#"{"mcpServers": {
        "..": {"command": "a"},
        "my server": {"command": "b"},
        "my-server": {"command": "c"},
        "gh/issues": {"url": "http://127.0.0.1:9/mcp"}
    }}"#;
    let i = import(text, "c.json", "http://127.0.0.1:7450", Via::Url).unwrap();
    let mut names = i.names.clone();
    names.sort();
    assert_eq!(names, ["gh-issues", "my-server", "my-server-2", "server"]);
    assert!(names.iter().all(|n| valid_name(n)));
    assert_eq!(
        i.client["mcpServers"]["my server"]["url"],
        "http://127.0.0.1:7450/servers/my-server-2/mcp"
    );
    assert_eq!(
        i.client["mcpServers"][".."]["url"],
        "http://127.0.0.1:7450/servers/server/mcp"
    );
    assert!(
        i.notes
            .iter()
            .any(|n| n.contains("mcpServers.gh/issues: served as \"gh-issues\"")),
        "{:?}",
        i.notes
    );
    let back = parse(&i.tether.to_string(), "t.json", &EnvPolicy::Inherit).unwrap();
    assert_eq!(back.servers.len(), 4);
}

/// Issue 26: importing a file that already points at the gateway (its URL, or a
/// `tether connect` to it, under any loopback name) is refused: serving such an entry
/// would make the gateway call itself.
#[test]
fn import_refuses_entries_that_point_at_the_gateway() {
    let first = import(
        r#"{"mcpServers": {"files": {"command": "npx", "args": ["fs"]}}}"#,
        "c.json",
        "http://127.0.0.1:7450",
        Via::Connect,
    )
    .unwrap();
    for (again, gateway) in [
        (first.client.to_string(), "http://127.0.0.1:7450"),
        (first.client.to_string(), "http://localhost:7450/mcp"),
        (
            r#"{"mcpServers": {"x": {"url": "http://[::1]:7450/servers/x/mcp"}}}"#.to_owned(),
            "http://127.0.0.1:7450",
        ),
    ] {
        let err = import(&again, "c.json", gateway, Via::Connect)
            .unwrap_err()
            .join("\n");
        assert!(err.contains("points at this gateway"), "{err}");
    }
    // Another port is another server.
    assert!(
        import(
            r#"{"mcpServers": {"x": {"url": "http://127.0.0.1:9000/mcp"}}}"#,
            "c.json",
            "http://127.0.0.1:7450",
            Via::Url
        )
        .is_ok()
    );
    let me = GatewayAddr::listening("0.0.0.0:7450".parse().unwrap());
    assert!(me.is("http://localhost:7450/mcp"));
    assert!(!me.is("http://localhost:7451/mcp"));
}
