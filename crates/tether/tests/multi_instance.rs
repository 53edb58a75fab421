//! Several `tether` processes sharing Redis (live state) and PostgreSQL (ledger), with the
//! client switching between them the way a round-robin load balancer would.
//!
//! Needs `TETHER_TEST_REDIS_URL` (and `TETHER_TEST_DATABASE_URL` for the ledger parts);
//! each test uses its own key prefix and schema. Outage tests start a private
//! `redis-server` on a free port and stop that one, never the shared service.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, drop_schema, in_schema, metric, pg_schema, state_dir, unique};
use serde_json::{Value, json};

fn redis_url() -> Option<String> {
    match std::env::var("TETHER_TEST_REDIS_URL") {
        Ok(u) => Some(u),
        Err(_) => {
            eprintln!("skipped: TETHER_TEST_REDIS_URL is not set (a multi-instance test)");
            None
        }
    }
}

/// A deployment's shared settings: one Redis prefix, and a PostgreSQL schema when a
/// database is configured. Cleaned up on drop.
struct Shared {
    redis: String,
    prefix: String,
    /// Ledger URL (in the schema), admin connection and schema name.
    ledger: Option<(String, tokio_postgres::Client, String)>,
}

impl Shared {
    async fn new(redis: &str, name: &str) -> Shared {
        let prefix = format!("tether-it:{}", unique(name));
        let ledger = match pg_schema(&format!("tether_it_{name}")).await {
            Some((client, schema)) => {
                let url = std::env::var("TETHER_TEST_DATABASE_URL").unwrap();
                Some((in_schema(&url, &schema), client, schema))
            }
            None => {
                eprintln!(
                    "note: TETHER_TEST_DATABASE_URL is not set; the ledger parts are skipped"
                );
                None
            }
        };
        Shared {
            redis: redis.to_owned(),
            prefix,
            ledger,
        }
    }

    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "--store",
            &self.redis,
            "--store-prefix",
            &self.prefix,
            "--instance-ttl",
            "2s",
        ];
        if let Some((url, ..)) = &self.ledger {
            a.extend(["--ledger", url.as_str()]);
        }
        a.extend_from_slice(extra);
        a
    }

    async fn cleanup(&self) {
        if let Ok(client) = redis::Client::open(self.redis.as_str())
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.prefix))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            for chunk in keys.chunks(500) {
                let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
            }
        }
        if let Some((_, client, schema)) = &self.ledger {
            drop_schema(client, schema).await;
        }
    }
}

async fn get_json(url: &str) -> (u16, Value) {
    let resp = reqwest::get(url).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Waits until the admin API of `gw` lists `n` live instances.
async fn wait_instances(gw: &Gateway, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, deep) = get_json(&format!("{}/health/deep", gw.admin)).await;
        if deep["instances"].as_array().map_or(0, Vec::len) == n {
            return deep;
        }
        assert!(
            Instant::now() < deadline,
            "instances never became {n}: {deep}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_session_created_on_one_instance_continues_on_the_others_with_the_same_id() {
    let Some(url) = redis_url() else { return };
    let shared = Shared::new(&url, "roundrobin").await;
    let (da, db, dc) = (state_dir(), state_dir(), state_dir());
    let a = Gateway::start(da.path(), &shared.args(&["--demo"]));
    let b = Gateway::start(db.path(), &shared.args(&["--demo"]));
    let c = Gateway::start(dc.path(), &shared.args(&["--demo"]));
    let clients = [a.client(), b.client(), c.client()];
    let sid = clients[0].initialize("roundrobin").await;

    // Round robin: every call lands on the next instance; one upstream serves them all,
    // so its state (a counter, its pid) is continuous.
    let mut pids = Vec::new();
    for i in 0..6 {
        let mcp = &clients[i % 3];
        let n = mcp
            .call_text(&sid, 10 + i as i64, "counter", json!({}))
            .await;
        assert_eq!(n, (i + 1).to_string(), "call {i} saw the same upstream");
        pids.push(mcp.call_text(&sid, 100 + i as i64, "pid", json!({})).await);
    }
    assert!(
        pids.windows(2).all(|w| w[0] == w[1]),
        "one upstream: {pids:?}"
    );

    // Any instance's admin API shows the deployment.
    let deep = wait_instances(&c, 3).await;
    assert_eq!(deep["instances"].as_array().unwrap().len(), 3, "{deep}");
    if shared.ledger.is_some() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Full session ids need the admin token.
            let resp = reqwest::Client::new()
                .get(format!("{}/api/sessions", b.admin))
                .bearer_auth(b.admin_token())
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let list: Value = resp.json().await.unwrap();
            assert_eq!(status, 200);
            let row = list["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["id"] == sid.as_str())
                .cloned();
            if let Some(r) = row.as_ref().filter(|r| r["tool_calls"] == 12) {
                // B holds no upstream for it: the row names the instance that does.
                assert_eq!(r["upstream_state"], "elsewhere", "{r}");
                assert!(r["instance"].is_string(), "{r}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "B's admin API never showed the session's calls: {list}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // A DELETE on another instance ends the session everywhere.
    assert_eq!(clients[1].delete(&sid).await, 200);
    for mcp in &clients {
        let a = mcp
            .post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"}),
            )
            .await;
        assert_eq!(a.status, 404, "{}", a.body);
    }
    shared.cleanup().await;
}

#[tokio::test]
async fn sessions_of_a_sigkilled_instance_continue_on_another() {
    let Some(url) = redis_url() else { return };
    let shared = Shared::new(&url, "sigkill").await;
    let (da, db) = (state_dir(), state_dir());
    let mut a = Gateway::spawn(da.path(), &shared.args(&["--demo"]));
    let b = Gateway::spawn(db.path(), &shared.args(&["--demo"]));
    let (ma, mb) = (a.client(), b.client());
    let mut sessions = Vec::new();
    for i in 0..3 {
        let sid = ma.initialize(&format!("victim-{i}")).await;
        assert_eq!(ma.call_text(&sid, 1, "counter", json!({})).await, "1");
        sessions.push(sid);
    }
    // A call in flight through B (forwarded to A) when A dies: a safe tool (the client
    // listed tools first, as clients do, so its annotations are known), re-issued.
    let list = mb
        .post(
            Some(&sessions[0]),
            &json!({"jsonrpc": "2.0", "id": 6, "method": "tools/list"}),
        )
        .await;
    assert_eq!(list.status, 200);
    let (stream, mut open) = mb
        .start_call(&sessions[0], 7, "slow", json!({"ms": 1500}))
        .await;
    wait_instances(&b, 2).await;

    let killed = Instant::now();
    a.kill9();
    // Same ids on B: B forwards to A, is refused, waits out A's heartbeat (2s here),
    // claims each session and replays its stored initialize to a fresh upstream.
    let first = mb.call_text(&sessions[1], 20, "counter", json!({})).await;
    let takeover = killed.elapsed();
    assert_eq!(
        first, "1",
        "a fresh upstream (in-memory upstream state does not move)"
    );
    assert_eq!(
        mb.call_text(&sessions[2], 20, "counter", json!({})).await,
        "1"
    );
    eprintln!(
        "measured: a SIGKILLed instance's session answered on another instance {takeover:?} after the kill (instance TTL 2s)"
    );
    // The forwarded stream broke with A; the client resumes it on B, which re-issues the
    // safe call to its own upstream.
    while let Some(Ok(_)) = futures::StreamExt::next(&mut open.events).await {}
    let resumed = mb.resume(&sessions[0], &format!("{stream}.0")).await;
    let answer = resumed.response();
    assert_eq!(
        answer
            .pointer("/result/content/0/text")
            .and_then(Value::as_str),
        Some("waited 1500 ms"),
        "{}",
        resumed.body
    );
    let log = b.log_text();
    assert_eq!(log.matches("session rehydrated").count(), 3, "{log}");
    assert_eq!(metric(&b, "tether_session_takeovers_total").await, 3.0);
    wait_instances(&b, 1).await;
    shared.cleanup().await;
}

#[tokio::test]
async fn server_to_client_messages_cross_instances_and_answers_find_the_asking_upstream() {
    let Some(url) = redis_url() else { return };
    let shared = Shared::new(&url, "crossing").await;
    let (da, db) = (state_dir(), state_dir());
    let a = Gateway::start(da.path(), &shared.args(&["--demo"]));
    let b = Gateway::start(db.path(), &shared.args(&["--demo"]));
    let (ma, mb) = (a.client(), b.client());
    let sid = ma.initialize("crossing").await;

    // Progress notifications from A's upstream reach a request stream held on B.
    let msg = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "slow", "arguments": {"ms": 300, "steps": 3}, "_meta": {"progressToken": "p1"}}});
    let answer = mb.post(Some(&sid), &msg).await;
    let progress = answer
        .events()
        .into_iter()
        .filter_map(|(_, d)| d)
        .filter(|v| v["method"] == "notifications/progress")
        .count();
    assert_eq!(progress, 3, "{}", answer.body);

    // The standalone stream is held through B; A's upstream asks for sampling during a
    // call made on A; the request arrives on B's stream, the answer is posted to B and
    // reaches the upstream on A that asked.
    let get = mb.listen(&sid).await;
    let mut standalone = futures::StreamExt::boxed(eventsource_stream::Eventsource::eventsource(
        get.bytes_stream(),
    ));
    let call = {
        let ma = ma.clone();
        let sid = sid.clone();
        tokio::spawn(async move {
            ma.call_text(&sid, 2, "sample", json!({"prompt": "hi"}))
                .await
        })
    };
    let request = loop {
        let ev = tokio::time::timeout(
            Duration::from_secs(20),
            futures::StreamExt::next(&mut standalone),
        )
        .await
        .expect("sampling request on the standalone stream")
        .unwrap()
        .unwrap();
        if ev.data.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&ev.data).unwrap();
        if v["method"] == "sampling/createMessage" {
            break v;
        }
    };
    let reply = json!({"jsonrpc": "2.0", "id": request["id"], "result": {
        "role": "assistant", "model": "test", "content": {"type": "text", "text": "hello from B"}}});
    assert_eq!(mb.post(Some(&sid), &reply).await.status, 202);
    assert_eq!(call.await.unwrap(), "model said: hello from B");
    let metrics = reqwest::get(format!("{}/metrics", b.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tether_forwarded_requests_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    shared.cleanup().await;
}

/// A private Redis server (AOF, fsync on every write) in `dir` on `port`.
fn private_redis(dir: &std::path::Path, port: u16, persistent: bool) -> Child {
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ]);
    if persistent {
        cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        cmd.args(["--appendonly", "no"]);
    }
    let child = cmd
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "private redis did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_metric(gw: &Gateway, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(gw, name).await != want {
        assert!(Instant::now() < deadline, "{name} never became {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_redis_outage_keeps_held_sessions_working_and_loses_nothing_acknowledged() {
    if redis_url().is_none() {
        return;
    }
    let mut redis = PrivateRedis::start(true);
    let url = redis.url();
    let shared = Shared::new(&url, "outage").await;
    let (da, db) = (state_dir(), state_dir());
    // Every call gets a stored stream (a quick answer is never stored), so the answer
    // given during the outage can be replayed from the other instance afterwards.
    let args = shared.args(&["--demo", "--answer-window", "0"]);
    let a = Gateway::start(da.path(), &args);
    let b = Gateway::start(db.path(), &args);
    let (ma, mb) = (a.client(), b.client());
    let sid = ma.initialize("outage").await;
    assert_eq!(mb.call_text(&sid, 1, "counter", json!({})).await, "1");

    // Redis dies (SIGKILL).
    redis.stop();
    // The session A holds keeps working; its answers are kept for Redis.
    let during = ma
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "counter", "arguments": {}}}),
        )
        .await;
    assert_eq!(during.status, 200, "{}", during.body);
    assert_eq!(
        during
            .response()
            .pointer("/result/content/0/text")
            .and_then(Value::as_str),
        Some("2")
    );
    let during_stream = during.events()[0].0.rsplit_once('.').unwrap().0.to_owned();
    // A new session is refused clearly, with a time to retry.
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "new", "version": "1"}}});
    let refused = ma.post(None, &init).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(refused.json()["error"]["code"], -32014);
    // Health and metrics say so.
    let (status, ready) = get_json(&format!("{}/health/ready", a.admin)).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["checks"]["store"]["ok"], false, "{ready}");
    assert_eq!(metric(&a, "tether_store_up").await, 0.0);

    // Redis comes back from its append-only file; the instances reconnect by themselves.
    redis.restart();
    wait_metric(&a, "tether_store_up", 1.0).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = get_json(&format!("{}/health/ready", a.admin)).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "A never became ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&a, "tether_store_buffered_writes").await, 0.0);
    // The answer given during the outage was written through: B can replay it.
    let replay = mb.resume(&sid, &format!("{during_stream}.0")).await;
    assert_eq!(
        replay
            .response()
            .pointer("/result/content/0/text")
            .and_then(Value::as_str),
        Some("2"),
        "{}",
        replay.body
    );
    assert_eq!(mb.call_text(&sid, 3, "counter", json!({})).await, "3");
    let fresh = ma.post(None, &init).await;
    assert_eq!(fresh.status, 200, "{}", fresh.body);
    shared.cleanup().await;
}

#[tokio::test]
async fn a_redis_that_lost_everything_gets_held_sessions_written_back() {
    if redis_url().is_none() {
        return;
    }
    let mut redis = PrivateRedis::start(false);
    let url = redis.url();
    let shared = Shared::new(&url, "amnesia").await;
    let (da, db) = (state_dir(), state_dir());
    let a = Gateway::start(da.path(), &shared.args(&["--demo"]));
    let b = Gateway::start(db.path(), &shared.args(&["--demo"]));
    let (ma, mb) = (a.client(), b.client());
    let sid = ma.initialize("amnesia").await;
    assert_eq!(ma.call_text(&sid, 1, "counter", json!({})).await, "1");
    // A restart without persistence: every key is gone.
    redis.stop();
    redis.restart();
    // A notices its heartbeat had lapsed and writes back what it holds; then B finds the
    // session again and forwards to A, whose upstream still counts.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = mb
            .post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "counter", "arguments": {}}}),
            )
            .await;
        if r.status == 200 {
            assert_eq!(
                r.response()
                    .pointer("/result/content/0/text")
                    .and_then(Value::as_str),
                Some("2"),
                "{}",
                r.body
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never found the session: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(a.log_text().contains("session ownership re-checked"));
    shared.cleanup().await;
}

/// Issue 12: two instances, clients alternating between them, and Redis restarted empty.
/// No client ever sees 404: an instance that finds no record right after the restart waits
/// (bounded) for the holder to write it back, and holders write back as soon as they notice.
#[tokio::test]
async fn a_redis_restart_that_loses_everything_loses_no_session() {
    if redis_url().is_none() {
        return;
    }
    let mut redis = PrivateRedis::start(false);
    let url = redis.url();
    let shared = Shared::new(&url, "restart_empty").await;
    let (da, db) = (state_dir(), state_dir());
    let a = Gateway::start(da.path(), &shared.args(&["--demo"]));
    let b = Gateway::start(db.path(), &shared.args(&["--demo"]));
    let clients = [a.client(), b.client()];
    // Two sessions created on each instance; each calls its counter once.
    let mut sessions = Vec::new();
    for (i, owner) in [0usize, 0, 1, 1].into_iter().enumerate() {
        let sid = clients[owner].initialize(&format!("alt-{i}")).await;
        assert_eq!(
            clients[owner]
                .call_text(&sid, 1, "counter", json!({}))
                .await,
            "1"
        );
        sessions.push((sid, owner));
    }
    redis.stop();
    redis.restart();
    // At once, each session through the instance that does not hold it, then alternating.
    for round in 0..4 {
        for (sid, owner) in &sessions {
            let via = (owner + 1 + round) % 2;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let r = clients[via]
                    .post(
                        Some(sid),
                        &json!({"jsonrpc": "2.0", "id": 10 + round, "method": "tools/call",
                        "params": {"name": "counter", "arguments": {}}}),
                    )
                    .await;
                assert_ne!(
                    r.status, 404,
                    "round {round}: a client was told its session is gone: {}",
                    r.body
                );
                if r.status == 200 {
                    let text = r.response()["result"]["content"][0]["text"].clone();
                    assert_eq!(
                        text,
                        json!((round + 2).to_string()),
                        "same upstream, state kept: {}",
                        r.body
                    );
                    break;
                }
                // Redis coming back: 503 + Retry-After is the documented answer meanwhile.
                assert_eq!(r.status, 503, "{}", r.body);
                assert!(Instant::now() < deadline, "never served: {}", r.body);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    shared.cleanup().await;
}

/// Issue 12, readiness: a Redis that refuses writes (maxmemory reached, no eviction) makes
/// the instance not ready, saying why; held sessions are not what readiness is about.
#[tokio::test]
async fn a_redis_at_maxmemory_makes_the_instance_not_ready() {
    if redis_url().is_none() {
        return;
    }
    let redis = PrivateRedis::start(false);
    let url = redis.url();
    let shared = Shared::new(&url, "maxmemory").await;
    let dir = state_dir();
    let a = Gateway::start(dir.path(), &shared.args(&["--demo"]));
    let (status, _) = get_json(&format!("{}/health/ready", a.admin)).await;
    assert_eq!(status, 200);
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let used: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let used: u64 = used
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 1024)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Fill it up to the limit.
    let filler = "f".repeat(64 * 1024);
    for i in 0..64 {
        let r: Result<(), _> = redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(&filler)
            .query_async(&mut conn)
            .await;
        if r.is_err() {
            break;
        }
    }
    let (status, ready) = get_json(&format!("{}/health/ready", a.admin)).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["checks"]["store"]["ok"], false, "{ready}");
    assert!(
        ready["checks"]["store"]["error"]
            .as_str()
            .unwrap()
            .contains("maxmemory")
            || ready["checks"]["store"]["error"]
                .as_str()
                .unwrap()
                .contains("OOM"),
        "{ready}"
    );
    shared.cleanup().await;
}

/// A `redis-server` of the test's own on a free port (never the shared one), stopped when
/// dropped; restarting it keeps its port (and, when persistent, its data).
struct PrivateRedis {
    dir: tempfile::TempDir,
    port: u16,
    persistent: bool,
    child: Option<Guard>,
}

impl PrivateRedis {
    fn start(persistent: bool) -> PrivateRedis {
        let mut r = PrivateRedis {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            persistent,
            child: None,
        };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (an outage, or a crash that loses what is not persisted).
    fn stop(&mut self) {
        self.child = None;
    }

    fn restart(&mut self) {
        self.stop();
        self.child = Some(Guard(private_redis(
            self.dir.path(),
            self.port,
            self.persistent,
        )));
    }
}

/// Kills a child process when dropped.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A 2026-07-28 request to instance `url` (raw HTTP, the modern headers mirrored).
async fn modern_call(url: &str, id: i64, tool: &str, extra: Value) -> Value {
    let mut params = json!({"name": tool, "arguments": {"prompt": "p"}, "_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"sampling": {}},
    }});
    for (k, v) in extra.as_object().unwrap() {
        params[k] = v.clone();
    }
    let resp = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", common::ACCEPT_BOTH)
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    common::Answer::read(resp).await.response()
}

#[tokio::test]
async fn a_modern_retry_reaching_another_instance_continues_the_call_where_it_is_parked() {
    let Some(url) = redis_url() else { return };
    let shared = Shared::new(&url, "mrtr").await;
    let (da, db) = (state_dir(), state_dir());
    let mut a = Gateway::spawn(da.path(), &shared.args(&["--demo"]));
    let b = Gateway::spawn(db.path(), &shared.args(&["--demo"]));
    wait_instances(&b, 2).await;

    // Parked on A; the retry goes to B (a load balancer without affinity), which sends it
    // to A: the state verifies there (one key for the deployment) and the call completes.
    let first = modern_call(&a.url, 1, "sample", json!({})).await;
    let state = first["result"]["requestState"].as_str().unwrap().to_owned();
    let key = first["result"]["inputRequests"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let answer =
        json!({"role": "assistant", "content": {"type": "text", "text": "Lyon"}, "model": "m"});
    let done = modern_call(
        &b.url,
        2,
        "sample",
        json!({"requestState": state, "inputResponses": {key.as_str(): answer.clone()}}),
    )
    .await;
    assert_eq!(done["id"], 2, "{done}");
    assert_eq!(
        done["result"]["content"][0]["text"], "model said: Lyon",
        "{done}"
    );

    // Parked on A, and A is killed: B says the call was interrupted, at once.
    let first = modern_call(&a.url, 3, "sample", json!({})).await;
    let state = first["result"]["requestState"].as_str().unwrap().to_owned();
    let key = first["result"]["inputRequests"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    a.kill9();
    let started = Instant::now();
    let lost = modern_call(
        &b.url,
        4,
        "sample",
        json!({"requestState": state, "inputResponses": {key.as_str(): answer}}),
    )
    .await;
    assert_eq!(lost["error"]["code"], -32013, "{lost}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // And B serves modern calls on its own.
    let echo = modern_call(
        &b.url,
        5,
        "echo",
        json!({"arguments": {"text": "still here"}}),
    )
    .await;
    assert_eq!(echo["result"]["content"][0]["text"], "still here", "{echo}");
    shared.cleanup().await;
}

/// Waits out the end of the current hour window when fewer than `secs` seconds of it are
/// left (quota windows are aligned to the epoch), so a test's calls share one window.
async fn clear_of_an_hours_end(secs: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let left = 3_600_000 - now % 3_600_000;
    if left < secs * 1000 {
        tokio::time::sleep(std::time::Duration::from_millis(left + 100)).await;
    }
}

/// A tool-call quota is the deployment's, not each instance's: calls of one user on two
/// instances add up in Redis, and the call past the quota is refused wherever it lands.
#[tokio::test]
async fn a_quota_counts_a_users_calls_across_instances() {
    let Some(url) = redis_url() else { return };
    let shared = Shared::new(&url, "quota").await;
    let (da, db) = (state_dir(), state_dir());
    let quota = ["--demo", "--quota-tool-calls", "4/1h"];
    let a = Gateway::start(da.path(), &shared.args(&quota));
    let b = Gateway::start(db.path(), &shared.args(&quota));
    clear_of_an_hours_end(10).await;
    let (ca, cb) = (a.client(), b.client());
    let sa = ca.initialize("quota-a").await;
    let sb = cb.initialize("quota-b").await;
    for id in 1..=2 {
        assert_eq!(
            ca.call_text(&sa, id, "echo", json!({"text": "a"})).await,
            "a"
        );
        assert_eq!(
            cb.call_text(&sb, id, "echo", json!({"text": "b"})).await,
            "b"
        );
    }
    for (mcp, sid) in [(&ca, &sa), (&cb, &sb)] {
        let r = mcp.call(sid, 9, "echo", json!({"text": "over"})).await;
        assert_eq!(r["error"]["data"]["limit"], "quota-tool-calls", "{r}");
    }
    shared.cleanup().await;
}

/// Issue 26: a Redis restarted empty reset every quota (its counters were gone). Each
/// instance gives its part of a user's window back with its next count, so calls made
/// before the restart still count after it.
#[tokio::test]
async fn a_quota_survives_a_redis_restarted_empty() {
    if redis_url().is_none() {
        return;
    }
    let mut redis = PrivateRedis::start(false);
    let shared = Shared::new(&redis.url(), "quota_restart").await;
    let (da, db) = (state_dir(), state_dir());
    let quota = ["--demo", "--quota-tool-calls", "4/1h"];
    let a = Gateway::start(da.path(), &shared.args(&quota));
    let b = Gateway::start(db.path(), &shared.args(&quota));
    clear_of_an_hours_end(20).await;
    let (ca, cb) = (a.client(), b.client());
    let sa = ca.initialize("quota-a").await;
    let sb = cb.initialize("quota-b").await;
    for (mcp, sid, id) in [(&ca, &sa, 1), (&ca, &sa, 2), (&cb, &sb, 1)] {
        assert_eq!(
            mcp.call_text(sid, id, "echo", json!({"text": "x"})).await,
            "x"
        );
    }
    // Three of four used; Redis loses them all.
    redis.restart();
    wait_instances(&a, 2).await;
    // A's part comes back with its third call (3 of 4, served); B's with its second: 5.
    let third = ca.call(&sa, 3, "echo", json!({"text": "x"})).await;
    assert!(third.get("result").is_some(), "{third}");
    let over = cb.call(&sb, 2, "echo", json!({"text": "x"})).await;
    assert_eq!(over["error"]["data"]["limit"], "quota-tool-calls", "{over}");
    let over = ca.call(&sa, 4, "echo", json!({"text": "x"})).await;
    assert_eq!(over["error"]["data"]["limit"], "quota-tool-calls", "{over}");
    shared.cleanup().await;
}

/// Two instances serving the same `mcpServers` file: a session of one server is forwarded
/// to the instance that holds it under its own `/servers/NAME/mcp` path, and after that
/// instance is SIGKILLed it is taken over on its own server, never on another.
#[tokio::test]
async fn servers_of_a_shared_mcp_servers_file_forward_and_take_over_on_their_own_server() {
    let Some(url) = redis_url() else { return };
    let shared = Shared::new(&url, "servers").await;
    let (da, db) = (state_dir(), state_dir());
    let file = da.path().join("mcp.json");
    let entry =
        |who: &str| json!({"command": common::BIN, "args": ["demo-server"], "env": {"WHO": who}});
    std::fs::write(
        &file,
        json!({"mcpServers": {"alpha": entry("alpha"), "beta": entry("beta")}}).to_string(),
    )
    .unwrap();
    let servers = ["--servers", file.to_str().unwrap()];
    let mut a = Gateway::spawn(da.path(), &shared.args(&servers));
    let b = Gateway::spawn(db.path(), &shared.args(&servers));
    let on = |gw: &Gateway, server: &str| {
        common::Mcp::new(&format!("http://{}/servers/{server}/mcp", gw.addr))
    };
    let alpha_a = on(&a, "alpha");
    let sid = alpha_a.initialize("alpha-client").await;
    assert_eq!(alpha_a.call_text(&sid, 1, "counter", json!({})).await, "1");
    wait_instances(&b, 2).await;
    // Through B, at alpha's path: forwarded to A's upstream (its count goes on).
    let alpha_b = on(&b, "alpha");
    assert_eq!(alpha_b.call_text(&sid, 2, "counter", json!({})).await, "2");
    assert!(metric(&b, "tether_forwarded_requests_total").await >= 1.0);
    // At beta's path on either instance: not this server's session.
    let foreign = on(&b, "beta")
        .post(
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}),
        )
        .await;
    assert_eq!(foreign.status, 404, "{}", foreign.body);

    a.kill9();
    // B takes it over on alpha (a fresh upstream of alpha's command and env).
    assert_eq!(alpha_b.call_text(&sid, 4, "counter", json!({})).await, "1");
    assert_eq!(
        alpha_b
            .call_text(&sid, 5, "getenv", json!({"name": "WHO"}))
            .await,
        "alpha"
    );
    assert_eq!(metric(&b, "tether_session_takeovers_total").await, 1.0);
    shared.cleanup().await;
}

/// 2026-07-28 tasks across two instances on Redis: a task created on A is read on B
/// (durable create: at once), its `tasks/cancel` sent to B reaches the runner on A
/// (forwarded to the owner), and when A is SIGKILLed, B settles A's tasks once A's
/// heartbeat lapses: the one safe to repeat is re-issued on B and completes, the other
/// `failed` as interrupted. Never unknown.
#[tokio::test]
async fn a_task_is_served_by_any_instance_and_settled_by_another_when_its_owner_dies() {
    let Some(url) = redis_url() else { return };
    let shared = Shared::new(&url, "tasks").await;
    let (da, db) = (state_dir(), state_dir());
    let tasks_args = ["--demo", "--task-after", "0"];
    let mut a = Gateway::spawn(da.path(), &shared.args(&tasks_args));
    let b = Gateway::spawn(db.path(), &shared.args(&tasks_args));
    wait_instances(&b, 2).await;
    let caps = json!({"extensions": {"io.modelcontextprotocol/tasks": {}}});
    let on_a = common::modern::Modern::new(&a.url, caps.clone());
    let on_b = common::modern::Modern::new(&b.url, caps);
    let cancelled = on_a.task(1, "slow_write", json!({"ms": 30_000})).await;
    assert_eq!(on_b.task_state(&cancelled).await["status"], "working");
    let ack = on_b
        .send(2, "tasks/cancel", json!({"taskId": cancelled}))
        .await
        .json();
    assert_eq!(ack["result"], json!({"resultType": "complete"}), "{ack}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while on_b.task_state(&cancelled).await["status"] != "cancelled" {
        assert!(Instant::now() < deadline, "the cancel reached A's runner");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&a, "tether_tasks_running").await, 0.0);

    let safe = on_a.task(3, "slow", json!({"ms": 3_000})).await;
    let unsafe_task = on_a.task(4, "slow_write", json!({"ms": 3_000})).await;
    a.kill9();
    // Until A's heartbeat lapses (2s) B takes it for running there; then it settles.
    let deadline = Instant::now() + Duration::from_secs(15);
    let failed = loop {
        let t = on_b.task_state(&unsafe_task).await;
        if t["status"] != "working" {
            break t;
        }
        assert!(Instant::now() < deadline, "never settled: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], -32013, "{failed}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let t = on_b.task_state(&safe).await;
        if t["status"] == "completed" {
            break t;
        }
        assert!(Instant::now() < deadline, "never completed: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        done["statusMessage"], "resumed after a gateway restart",
        "{done}"
    );
    assert_eq!(
        done["result"]["content"][0]["text"], "waited 3000 ms",
        "{done}"
    );
    assert_eq!(metric(&b, "tether_tasks_resumed_total").await, 1.0);
    shared.cleanup().await;
}
