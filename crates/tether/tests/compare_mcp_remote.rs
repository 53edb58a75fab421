//! Side by side: `tether connect` and `mcp-remote` (npm) as the stdio bridge of the same
//! client, through the same two restarts. Not pass/fail for mcp-remote: it prints what each
//! bridge survives, for docs/clients.md.
//!
//! `cargo test -p tether --test compare_mcp_remote -- --ignored --nocapture`
//! (needs `npm ci` in e2e/ts, which installs mcp-remote).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{BIN, Gateway, http_upstream, state_dir};
use rmcp::RoleClient;
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use serde_json::json;

type Client = RunningService<RoleClient, rmcp::model::ClientConfig>;

const MCP_REMOTE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../e2e/ts/node_modules/.bin/mcp-remote"
);

async fn client_via(bridge: &str, url: &str, dir: &Path) -> Client {
    let mut cmd = if bridge == "tether connect" {
        let mut c = tokio::process::Command::new(BIN);
        c.args(["connect", url, "--log-file"])
            .arg(dir.join("bridge.log"));
        c
    } else {
        let mut c = tokio::process::Command::new(MCP_REMOTE);
        c.args([url, "--transport", "http-only"])
            .env("MCP_REMOTE_CONFIG_DIR", dir.join("mcp-auth"));
        c
    };
    cmd.stderr(Stdio::null());
    common::stdio_client(cmd).await
}

async fn echo(client: &Client, text: &str) -> Result<(), String> {
    let args = json!({ "text": text }).as_object().unwrap().clone();
    let call = client.call_tool(CallToolRequestParams::new("echo").with_arguments(args));
    match tokio::time::timeout(Duration::from_secs(20), call).await {
        Err(_) => Err("hung for 20 s".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(r)) => {
            let v = serde_json::to_value(&r).unwrap();
            if v.pointer("/content/0/text") == Some(&json!(text)) {
                Ok(())
            } else {
                Err(v.to_string())
            }
        }
    }
}

fn verdict(r: Result<(), String>) -> String {
    match r {
        Ok(()) => "survives".into(),
        Err(e) => format!("fails: {}", e.chars().take(120).collect::<String>()),
    }
}

#[tokio::test]
#[ignore = "comparison, run explicitly"]
async fn tether_connect_vs_mcp_remote() {
    assert!(Path::new(MCP_REMOTE).exists(), "run npm ci in e2e/ts first");
    println!(
        "\n| bridge | Tether gateway SIGKILL + restart | non-Tether server restart (forgets sessions) | call made while the server is down | log level + subscription after re-init |"
    );
    println!("|---|---|---|---|---|");
    for bridge in ["tether connect", "mcp-remote 0.15.1"] {
        // 1. Behind a Tether gateway that is killed and restarted.
        let dir = state_dir();
        let mut gw = Gateway::spawn(dir.path(), &["--demo"]);
        let client = client_via(bridge, &gw.url, dir.path()).await;
        echo(&client, "before")
            .await
            .expect("works before the restart");
        gw.kill9();
        let _gw2 = gw.restart();
        let a = echo(&client, "after gateway restart").await;
        let _ = client.cancel().await;

        // 2. Behind a server that is not Tether and forgets its sessions when restarted.
        let (up, url) = http_upstream("127.0.0.1:0");
        let dir = state_dir();
        let client = client_via(bridge, &url, dir.path()).await;
        echo(&client, "before")
            .await
            .expect("works before the restart");
        let mut up2 = common::restart_http_upstream(up, &url);
        let b = echo(&client, "after server restart").await;
        let _ = client.cancel().await;
        let _ = up2.kill();
        let _ = up2.wait();

        // 3. A call made while the server is down, which comes back 1 s later.
        let (mut up, url) = http_upstream("127.0.0.1:0");
        let dir = state_dir();
        let client = client_via(bridge, &url, dir.path()).await;
        echo(&client, "before")
            .await
            .expect("works before the outage");
        up.kill().unwrap();
        up.wait().unwrap();
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches("/mcp")
            .to_owned();
        let restarter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            http_upstream(&addr)
        });
        let c = echo(&client, "during outage").await;
        let (mut up2, _) = restarter.join().unwrap();
        let _ = client.cancel().await;
        let _ = up2.kill();
        let _ = up2.wait();

        // 4. State the client set up, after the server forgot the session.
        let (up, url) = http_upstream("127.0.0.1:0");
        let dir = state_dir();
        let client = client_via(bridge, &url, dir.path()).await;
        #[allow(deprecated)]
        {
            use rmcp::model::{LoggingLevel, SetLevelRequestParams, SubscribeRequestParams};
            client
                .peer()
                .set_level(SetLevelRequestParams::new(LoggingLevel::Debug))
                .await
                .unwrap();
            client
                .peer()
                .subscribe(SubscribeRequestParams::new("demo://watched"))
                .await
                .unwrap();
        }
        let mut up2 = common::restart_http_upstream(up, &url);
        let d = match tokio::time::timeout(
            Duration::from_secs(20),
            client.call_tool(CallToolRequestParams::new("setup")),
        )
        .await
        {
            Ok(Ok(r)) => {
                let t = serde_json::to_value(&r)
                    .unwrap()
                    .pointer("/content/0/text")
                    .cloned()
                    .unwrap_or_default();
                if t == json!("level=debug subscriptions=demo://watched") {
                    Ok(())
                } else {
                    Err(format!("server sees {t}"))
                }
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("hung".into()),
        };
        let _ = client.cancel().await;
        let _ = up2.kill();
        let _ = up2.wait();
        println!(
            "| {bridge} | {} | {} | {} | {} |",
            verdict(a),
            verdict(b),
            verdict(c),
            verdict(d)
        );
    }
}
