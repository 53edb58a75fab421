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
    let layer = Layer {
        demo: Some(true),
        ..Layer::default()
    };
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
    let layer = Layer {
        listen: Some("nowhere".into()),
        idle_timeout: Some("soon".into()),
        max_body: Some(SizeValue::Text("lots".into())),
        ..Layer::default()
    };
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
        listen: Some("127.0.0.1:2".into()),
        upstream: Some(UpstreamLayer {
            url: Some("http://x/mcp".into()),
            ..Default::default()
        }),
        ..Layer::default()
    };
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
    let layer = |store: Option<&str>, ledger: Option<&str>, extra: Layer| Layer {
        demo: Some(true),
        store: store.map(str::to_owned),
        ledger: ledger.map(str::to_owned),
        ..extra
    };
    let c = Config::resolve(
        layer(
            Some("redis://127.0.0.1:6379/2"),
            Some("postgres://u@db:5432/t"),
            Layer {
                session_ttl: Some("1h".into()),
                ..Layer::default()
            },
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
            Layer {
                store_prefix: Some("p".into()),
                ..Layer::default()
            },
        ),
        vec!["x".into()],
    )
    .unwrap_err();
    let text = errors.join("\n");
    assert!(text.contains("store: \"memcached://x\""), "{text}");
    assert!(text.contains("ledger: \"mysql://x\""), "{text}");
    let errors = Config::resolve(
        layer(
            None,
            None,
            Layer {
                store_prefix: Some("p".into()),
                ..Layer::default()
            },
        ),
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
            Layer {
                listen: Some("0.0.0.0:7450".into()),
                ..Layer::default()
            },
        ),
        vec!["x".into()],
    )
    .unwrap_err();
    assert!(
        errors.iter().any(|e| e.starts_with("advertise-url:")),
        "{errors:?}"
    );
}
