//! PostgreSQL going away under a running gateway: calls are served as before, ledger
//! records wait in memory, and on recovery every one is written, none dropped.
//!
//! The outage is made with a TCP proxy between the gateway and the machine's shared
//! PostgreSQL (the shared service is never stopped); needs `TETHER_TEST_DATABASE_URL`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Gateway, drop_schema, in_schema, metric, pg_schema, state_dir};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards connections to `target` until cut; a cut also breaks open connections.
struct Proxy {
    port: u16,
    on: Arc<AtomicBool>,
    kill: Arc<std::sync::Mutex<CancellationToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let on = Arc::new(AtomicBool::new(true));
        let kill = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let (on2, kill2) = (on.clone(), kill.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !on2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let token = kill2.lock().unwrap().clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            on,
            kill,
            task,
        }
    }

    fn cut(&self) {
        self.on.store(false, Ordering::SeqCst);
        let mut k = self.kill.lock().unwrap();
        k.cancel();
        *k = CancellationToken::new();
    }

    fn restore(&self) {
        self.on.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

// Multi-threaded: the harness starts the gateway with blocking reads while the proxy task
// must already be forwarding the gateway's first connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ledger_database_loses_no_record() {
    let Ok(url) = std::env::var("TETHER_TEST_DATABASE_URL") else {
        eprintln!("skipped: TETHER_TEST_DATABASE_URL is not set (a PostgreSQL test)");
        return;
    };
    let config: tokio_postgres::Config = url.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(_) => {
            eprintln!("skipped: the ledger outage test needs a TCP PostgreSQL URL");
            return;
        }
    };
    let pg_port = config.get_ports().first().copied().unwrap_or(5432);
    let (admin, schema) = pg_schema("tether_outage")
        .await
        .expect("database configured");
    let proxy = Proxy::start(format!("{host}:{pg_port}")).await;
    let user = config.get_user().unwrap_or("postgres");
    let db = config.get_dbname().unwrap_or("postgres");
    let proxied = in_schema(
        &format!("postgres://{user}@127.0.0.1:{}/{db}", proxy.port),
        &schema,
    );

    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo", "--ledger", &proxied]);
    let mcp = gw.client();
    let sid = mcp.initialize("ledger-outage").await;
    let calls = |n: i64| {
        let q = format!("SELECT count(*) FROM {schema}.tool_calls WHERE session_id = '{sid}'");
        let admin = &admin;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let got: i64 = admin.query_one(&q, &[]).await.unwrap().get(0);
                if got == n {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "ledger has {got} calls, want {n}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for i in 0..3 {
        assert_eq!(
            mcp.call_text(&sid, i, "echo", json!({"text": "a"})).await,
            "a"
        );
    }
    calls(3).await;

    proxy.cut();
    for i in 10..15 {
        assert_eq!(
            mcp.call_text(&sid, i, "echo", json!({"text": "during"}))
                .await,
            "during",
            "serving does not depend on the ledger"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&gw, "tether_ledger_backlog").await == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the backlog never showed the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The admin API says the ledger is unavailable instead of hanging or lying.
    let status = reqwest::get(format!("{}/api/sessions", gw.admin))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 503);

    proxy.restore();
    calls(8).await;
    assert_eq!(metric(&gw, "tether_ledger_dropped_total").await, 0.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&gw, "tether_ledger_backlog").await != 0.0 {
        assert!(Instant::now() < deadline, "backlog not drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = admin
        .query_one(
            &format!("SELECT tool_calls FROM {schema}.sessions WHERE id = $1"),
            &[&sid],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        8,
        "session counters include the outage's calls"
    );
    drop(gw);
    drop_schema(&admin, &schema).await;
}
