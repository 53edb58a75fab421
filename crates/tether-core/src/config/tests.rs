use super::*;

/// Issue 26: a servers file replaced by a FIFO hung the reload (opening a FIFO to read
/// waits for a writer). A file that is not regular is refused at once, and a read that
/// hangs anyway is given up after its timeout.
#[tokio::test]
async fn only_regular_files_are_read_and_never_for_long() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("servers.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = read_bounded(&fifo, "servers file").unwrap_err();
    assert!(err.contains("not a regular file"), "{err}");
    let err = read_bounded(dir.path(), "servers file").unwrap_err();
    assert!(err.contains("not a regular file"), "{err}");
    let ok = dir.path().join("ok.json");
    std::fs::write(&ok, "{}").unwrap();
    assert_eq!(read_bounded(&ok, "servers file").unwrap(), "{}");

    let (release, hold) = std::sync::mpsc::channel::<()>();
    let err = off_runtime(
        "servers file",
        std::time::Duration::from_millis(50),
        move || {
            let _ = hold.recv();
        },
    )
    .await
    .unwrap_err();
    assert!(err.contains("no answer from the file system"), "{err}");
    drop(release);
    assert_eq!(
        off_runtime("x", std::time::Duration::from_secs(5), || 7).await,
        Ok(7)
    );
}

#[test]
fn a_config_file_past_the_bound_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.json");
    std::fs::write(&path, vec![b' '; MAX_CONFIG_FILE as usize + 1]).unwrap();
    let err = ServersSource::Json(path.clone()).load().unwrap_err();
    assert!(err.contains("larger than 4 MiB"), "{err}");
    std::fs::write(&path, r#"{"mcpServers": {}}"#).unwrap();
    assert!(ServersSource::Json(path).load().is_ok());
}

fn demo() -> Vec<String> {
    vec!["tether".into(), "demo-server".into()]
}

#[test]
fn defaults_apply() {
    let layer = Layer::default().with("demo", true);
    let c = Config::resolve(layer, demo()).unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.idle_timeout, Duration::from_secs(1800));
    assert_eq!(c.keepalive, Duration::from_secs(15));
    assert_eq!(c.max_body, 4 * 1024 * 1024);
    assert_eq!(c.upstream_timeout, Duration::from_secs(300));
    assert_eq!(c.shutdown_grace, Duration::from_secs(10));
    assert_eq!(c.upstream_name, "demo");
    let stdio = |argv: &[&str]| UpstreamSpec::Stdio {
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        env_policy: EnvPolicy::Inherit,
    };
    let http = |url: &str| UpstreamSpec::Http {
        url: url.to_owned(),
        protocol: UpstreamProtocol::Auto,
        headers: Vec::new(),
    };
    for (spec, want) in [
        (stdio(&["/usr/bin/mcp-server-time"]), "mcp-server-time"),
        (
            stdio(&["npx", "-y", "@modelcontextprotocol/server-everything"]),
            "server-everything",
        ),
        (stdio(&["npx", "-y", "@scope/pkg@1.2.3", "stdio"]), "pkg"),
        (stdio(&["uvx", "mcp-server-fetch"]), "mcp-server-fetch"),
        (stdio(&["python3", "-u", "/srv/tools/server.py"]), "server"),
        (
            stdio(&["docker", "run", "-i", "--rm", "ghcr.io/org/thing:latest"]),
            "thing",
        ),
        (http("http://127.0.0.1:3001/mcp"), "127.0.0.1-mcp"),
        (
            http("https://tools.example.com/v1/mcp/"),
            "tools.example.com-v1-mcp",
        ),
        (http("https://tools.example.com"), "tools.example.com"),
    ] {
        assert_eq!(spec.default_name(), want, "{spec:?}");
    }
    assert_eq!(
        http("https://user:secret@h.example/mcp?key=x").describe(),
        "https://h.example/mcp"
    );
    assert_eq!(
        stdio(&["npx", "-y", "pkg"]).describe(),
        "stdio npx (2 args)"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let layer = Layer::default()
        .with("listen", "nowhere")
        .with("idle-timeout", "soon")
        .with("max-body", "lots");
    let errs = Config::resolve(layer, demo()).unwrap_err();
    assert_eq!(errs.len(), 4, "{errs:#?}");
}

#[test]
fn flags_override_file() {
    let file: Layer = toml::from_str(
        "listen = \"127.0.0.1:1\"\nkeepalive = \"5s\"\n[upstream]\ncommand = [\"a\"]\n",
    )
    .unwrap();
    let cli = Layer {
        upstream: Some(UpstreamLayer {
            url: Some("http://x/mcp".into()),
            ..Default::default()
        }),
        ..Layer::default()
    }
    .with("listen", "127.0.0.1:2");
    let c = Config::resolve(file.overlay(cli), demo()).unwrap();
    assert_eq!(c.listen.port(), 2);
    assert_eq!(c.keepalive, Duration::from_secs(5));
    assert_eq!(
        c.upstream,
        UpstreamSpec::Http {
            url: "http://x/mcp".into(),
            protocol: UpstreamProtocol::Auto,
            headers: Vec::new(),
        }
    );
}

#[test]
fn unknown_fields_are_rejected() {
    assert!(toml::from_str::<Layer>("listne = \"x\"").is_err());
}

#[test]
fn store_and_ledger_urls_are_checked_together() {
    let layer = |store: Option<&str>, ledger: Option<&str>, mut extra: Layer| {
        extra.settings.set("demo", true.into());
        for (key, value) in [("store", store), ("ledger", ledger)] {
            if let Some(v) = value {
                extra.settings.set(key, v.into());
            }
        }
        extra
    };
    let c = Config::resolve(
        layer(
            Some("redis://127.0.0.1:6379/2"),
            Some("postgres://u@db:5432/t"),
            Layer::default().with("session-ttl", "1h"),
        ),
        vec!["x".into()],
    )
    .unwrap();
    match c.store {
        StoreSpec::Redis {
            prefix,
            session_ttl,
            instance_ttl,
            advertise_url,
            ..
        } => {
            assert_eq!(prefix, "tether");
            assert_eq!(session_ttl, Duration::from_secs(3600));
            assert_eq!(instance_ttl, Duration::from_secs(5));
            assert_eq!(advertise_url, None);
        }
        StoreSpec::Sqlite => panic!("redis expected"),
    }
    assert!(matches!(c.ledger, LedgerSpec::Postgres { .. }));
    let errors = Config::resolve(
        layer(
            Some("memcached://x"),
            Some("mysql://x"),
            Layer::default().with("store-prefix", "p"),
        ),
        vec!["x".into()],
    )
    .unwrap_err();
    let text = errors.join("\n");
    assert!(text.contains("store: \"memcached://x\""), "{text}");
    assert!(text.contains("ledger: \"mysql://x\""), "{text}");
    let errors = Config::resolve(
        layer(None, None, Layer::default().with("store-prefix", "p")),
        vec!["x".into()],
    )
    .unwrap_err();
    assert_eq!(
        errors,
        ["store-prefix: applies only with --store redis://..."]
    );
    let errors = Config::resolve(
        layer(
            Some("redis://127.0.0.1/"),
            None,
            Layer::default().with("listen", "0.0.0.0:7450"),
        ),
        vec!["x".into()],
    )
    .unwrap_err();
    assert!(
        errors.iter().any(|e| e.starts_with("advertise-url:")),
        "{errors:?}"
    );
}

/// Checks that the README's table under `header` is `rows` as `Opt::readme_row` writes them,
/// up to `end` (or rewrites it from them with `TETHER_BLESS_README=1`).
fn readme_table_is(header: &str, end: &str, rows: &[Opt], table: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).unwrap();
    let start = readme.find(header).expect("the table's header") + header.len();
    let end = start + readme[start..].find(end).expect("the table ends");
    let want = rows
        .iter()
        .map(Opt::readme_row)
        .collect::<Vec<_>>()
        .join("\n");
    if std::env::var_os("TETHER_BLESS_README").is_some() {
        let text = format!("{}{want}{}", &readme[..start], &readme[end..]);
        std::fs::write(path, text).unwrap();
        return;
    }
    assert_eq!(
        &readme[start..end],
        want,
        "README's table differs from config::{table}; run with TETHER_BLESS_README=1"
    );
}

/// The README's Limits table is the rows of [`LIMITS`].
/// `TETHER_BLESS_README=1 cargo test -p tether-core readme_limits` rewrites it from the rows.
#[test]
fn readme_limits_table_is_generated_from_the_rows() {
    readme_table_is(
        "| Flag | Env | Default | Bounds |\n|---|---|---|---|\n",
        "\n\n",
        LIMITS,
        "LIMITS",
    );
}

#[test]
fn every_limit_row_is_consistent_and_settable_from_the_file() {
    for o in LIMITS {
        assert_eq!(
            o.env,
            format!("TETHER_{}", o.key.to_uppercase().replace('-', "_")),
            "{}",
            o.key
        );
        assert!(!o.doc.is_empty() && !o.doc.contains('|'), "{}", o.key);
    }
    // Every default parses: the defaults resolve without a problem.
    let mut errors = Vec::new();
    let d = Limits::resolve(&mut errors, &LimitsLayer::default());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(d, Limits::default());
    assert_eq!(d.max_connections_per_addr, d.max_connections.div_ceil(2));
    assert_eq!(d.max_upstreams, d.max_sessions);
    assert_eq!(d.quota_tool_calls, None);
    // A key per row in `[limits]`, and its earlier name.
    let file: Layer = toml::from_str(
        "[limits]\nmax-sessions = 7\nstream-buffer = \"1MiB\"\nbridge-pool-size = 2\nheader-timeout = \"3s\"\n",
    )
    .unwrap();
    let mut errors = Vec::new();
    let l = Limits::resolve(&mut errors, &file.limits.unwrap());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        (
            l.max_sessions,
            l.stream_buffer,
            l.pool_size,
            l.header_timeout
        ),
        (7, 1 << 20, 2, Duration::from_secs(3))
    );
    let err = toml::from_str::<Layer>("[limits]\nmax-sesions = 7\n").unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
    // Text from a flag is checked like the file's values, every problem at once.
    let mut bad = LimitsLayer::default();
    assert!(bad.set_text("max-sessions", "many".into()));
    assert!(bad.set_text("body-timeout", "0s".into()));
    assert!(!bad.set_text("no-such-limit", "1".into()));
    let mut errors = Vec::new();
    Limits::resolve(&mut errors, &bad);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors.iter().any(|e| e.starts_with("max-sessions:")),
        "{errors:?}"
    );
}

/// A server's `tether` table may set exactly the rows marked `server`.
#[test]
fn a_server_sets_the_limits_its_rows_allow() {
    for o in LIMITS {
        let text = format!(
            r#"{{"mcpServers": {{"a": {{"command": "x", "tether": {{"{}": 3}}}}}}}}"#,
            o.key
        );
        let parsed = crate::servers::parse(&text, "f", &crate::upstream::EnvPolicy::Inherit);
        assert_eq!(parsed.is_ok(), o.server, "{}: {parsed:?}", o.key);
        if let Ok(f) = parsed {
            let layer = f.servers[0].settings.limits();
            let mut errors = Vec::new();
            let l = Limits::resolve(&mut errors, &layer);
            assert!(errors.is_empty());
            let got = match o.key {
                "max-sessions" => l.max_sessions,
                "max-upstreams" => l.max_upstreams,
                "session-rate" => l.session_rate as usize,
                other => panic!("{other} is marked server but not read by servers::parse"),
            };
            assert_eq!(got, 3, "{}", o.key);
        }
    }
}

/// The README's configuration reference is the rows of [`OPTIONS`] (then the settings only
/// the file holds). `TETHER_BLESS_README=1 cargo test -p tether-core readme_options` rewrites
/// the rows.
#[test]
fn readme_options_table_is_generated_from_the_rows() {
    readme_table_is(
        "| Flag | Env | File key | Default | Meaning |\n|---|---|---|---|---|\n",
        "\n| `-- CMD ARGS...`",
        OPTIONS,
        "OPTIONS",
    );
}

/// Every row is one option: its variable, its doc line, a file key that a config file takes
/// (and nothing the rows do not name), a default that resolves.
#[test]
fn every_option_row_is_consistent_and_settable_from_the_file() {
    let mut seen = std::collections::BTreeSet::new();
    for o in OPTIONS.iter().chain(LIMITS) {
        assert!(seen.insert(o.key), "{} is two rows", o.key);
        assert!(!o.doc.is_empty() && !o.doc.contains(" | "), "{}", o.key);
    }
    for o in OPTIONS {
        let env = format!("TETHER_{}", o.key.to_uppercase().replace('-', "_"));
        // The headers' variable holds several, one per line.
        assert!(o.env == env || o.kind == Kind::Lines, "{}", o.key);
        if o.place != Place::Top {
            assert!(toml::from_str::<Layer>(&format!("{} = \"x\"", o.key)).is_err());
            continue;
        }
        let value = match o.kind {
            Kind::Switch => "true".to_owned(),
            Kind::List => "[\"http://a.example\"]".to_owned(),
            _ => format!("{:?}", o.key),
        };
        let layer: Layer = toml::from_str(&format!("{} = {value}", o.key))
            .unwrap_or_else(|e| panic!("{}: {e}", o.key));
        assert!(layer.settings.get(o.key).is_some(), "{}", o.key);
    }
    let err = toml::from_str::<Layer>("listne = \"x\"").unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
    assert!(err.to_string().contains("`listen`"), "{err}");
    // The defaults of the rows resolve (with an upstream).
    let c = Config::resolve(Layer::default().with("demo", true), demo()).unwrap();
    assert_eq!(c.answer_window, Duration::from_millis(10));
    assert_eq!(c.retention, Duration::from_secs(30 * 86_400));
}

/// A server's `tether` table may set exactly the settings whose rows are marked `server`.
#[test]
fn a_server_sets_the_settings_its_rows_allow() {
    for o in OPTIONS.iter().filter(|o| o.place != Place::Cli) {
        let key = match o.place {
            Place::Upstream(k) => k.split(' ').next().unwrap(),
            _ => o.key,
        };
        let value = match o.kind {
            Kind::Choice(values) => serde_json::json!(values[1]),
            Kind::Switch => serde_json::json!(true),
            Kind::List => serde_json::json!(["a"]),
            _ => serde_json::json!("5m"),
        };
        let text = serde_json::json!({"mcpServers": {"a": {"url": "http://h.example/mcp", "tether": {key: value}}}})
            .to_string();
        let parsed = crate::servers::parse(&text, "f", &crate::upstream::EnvPolicy::Inherit);
        assert_eq!(parsed.is_ok(), o.server, "{key}: {parsed:?}");
    }
}
