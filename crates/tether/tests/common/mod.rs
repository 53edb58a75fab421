//! Test harness: one test gateway, [`Gateway`], started from the same arguments as `tether
//! serve` on 127.0.0.1:0 with its own state dir, in this test's process unless the test
//! needs a process boundary (kill -9, signals, a process's memory or descriptors, its
//! environment), and a raw MCP-over-HTTP client so tests can prove exactly what goes over
//! the wire (for example that no `initialize` is sent after a restart).
#![allow(dead_code, missing_docs, clippy::zombie_processes)] // Gateway::drop kills and waits

use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod modern;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_tether");
pub const ACCEPT_BOTH: &str = "application/json, text/event-stream";

/// The log filter of every test gateway unless its arguments give `--log`.
const TEST_LOG: &str = "info,tether_core=debug";

/// What a test gateway is started from: the same arguments as `tether serve` (the upstream
/// command after `--`), or a config layer for the settings that have no flag.
#[derive(Clone)]
enum From {
    Args(Vec<String>),
    Layer(Box<tether_core::config::Layer>),
}

/// A test gateway: real listeners on 127.0.0.1:0, its own state dir and log file. Started
/// in this process by [`Gateway::start`] (and [`Gateway::builder`]), as a `tether serve`
/// process by [`Gateway::spawn`] and the builder's `process()`; dropped like kill -9.
pub struct Gateway {
    run: Run,
    pub addr: String,
    pub url: String,
    /// Base URL of the admin listener, e.g. `http://127.0.0.1:PORT`.
    pub admin: String,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    from: From,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
}

enum Run {
    Process(Child),
    InProcess(Embedded),
}

/// A gateway on a runtime of its own, on a thread of its own, in this process.
struct Embedded {
    /// Resolves the shutdown future `app::run` was given, as SIGTERM does in the binary.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Ends the run at once, dropping its tasks (and so its children), as a drop kills.
    abort: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

thread_local! {
    /// The log of the embedded gateway whose runtime owns this thread.
    static GATEWAY_LOG: RefCell<Option<tracing::dispatcher::DefaultGuard>> =
        const { RefCell::new(None) };
}

/// How to start a test gateway; see [`Gateway::builder`].
pub struct Builder {
    state_dir: PathBuf,
    listen: String,
    from: From,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    process: bool,
}

impl Builder {
    /// `tether serve`'s arguments (the upstream command after `--`).
    pub fn args(mut self, args: &[&str]) -> Builder {
        self.from = From::Args(args.iter().map(|s| s.to_string()).collect());
        self
    }

    /// A config layer instead of arguments (listen, admin listen and state dir are set
    /// here; the demo server is the upstream unless the layer names another).
    pub fn layer(mut self, layer: tether_core::config::Layer) -> Builder {
        self.from = From::Layer(Box::new(layer));
        self
    }

    /// Environment variables of the gateway process (implies [`Builder::process`]).
    pub fn env(mut self, env: &[(&str, &str)]) -> Builder {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.process = true;
        self
    }

    /// Runs the process under `wrapper`, a command that runs its arguments (such as
    /// `prlimit --nofile=512:512`); implies [`Builder::process`].
    pub fn wrapper(mut self, wrapper: &[&str]) -> Builder {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self.process = true;
        self
    }

    /// Runs `tether serve` as a process: for kill -9, signals, and a process's own memory,
    /// descriptors and environment.
    pub fn process(mut self) -> Builder {
        self.process = true;
        self
    }

    /// Starts it and waits until both listeners accept connections.
    pub fn start(self) -> Gateway {
        let log = self.state_dir.join(format!(
            "gateway-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let (run, addr, admin) = if self.process {
            let args = match &self.from {
                From::Args(a) => a.clone(),
                From::Layer(_) => panic!("a process gateway is started from arguments"),
            };
            spawn_process(
                &self.state_dir,
                &self.listen,
                &args,
                &self.env,
                &self.wrapper,
                &log,
            )
        } else {
            embed(&self.state_dir, &self.listen, &self.from, &log)
        };
        Gateway {
            run,
            url: format!("http://{addr}/mcp"),
            addr,
            admin,
            state_dir: self.state_dir,
            log,
            from: self.from,
            env: self.env,
            wrapper: self.wrapper,
        }
    }
}

/// `serve --listen LISTEN --state-dir DIR` with the harness's defaults, then `args` (the
/// upstream command after `--` last).
fn serve_argv(state_dir: &Path, listen: &str, args: &[String]) -> Vec<String> {
    let (flags, upstream): (Vec<String>, Vec<String>) = match args.iter().position(|a| a == "--") {
        Some(i) => (args[..i].to_vec(), args[i..].to_vec()),
        None => (args.to_vec(), vec![]),
    };
    let mut argv = vec![
        "--listen".to_owned(),
        listen.to_owned(),
        "--state-dir".to_owned(),
        state_dir.display().to_string(),
    ];
    argv.extend(flags.iter().cloned());
    if !flags.iter().any(|f| f == "--admin-listen") {
        argv.extend(["--admin-listen".into(), "127.0.0.1:0".into()]);
    }
    // Tests create sessions far faster than any person would; the ones about the
    // creation rate set their own.
    if !flags.iter().any(|f| f == "--session-rate") {
        argv.extend([
            "--session-rate".into(),
            "100000".into(),
            "--session-burst".into(),
            "100000".into(),
        ]);
    }
    argv.extend(upstream);
    argv
}

fn spawn_process(
    state_dir: &Path,
    listen: &str,
    args: &[String],
    env: &[(String, String)],
    wrapper: &[String],
    log: &Path,
) -> (Run, String, String) {
    let log_file = std::fs::File::create(log).unwrap();
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.arg("serve").args(serve_argv(state_dir, listen, args));
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("TETHER_LOG", TEST_LOG)
        .stdout(Stdio::piped())
        .stderr(log_file)
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("tether binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut admin = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap_or(0);
        if n == 0 {
            let log_text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("gateway exited before listening; log:\n{log_text}");
        }
        if let Some(rest) = line.trim().strip_prefix("tether: admin on ") {
            admin = rest.trim_end_matches('/').to_owned();
            continue;
        }
        if let Some(rest) = line.trim().strip_prefix("tether: listening on http://") {
            let addr = rest.trim_end_matches("/mcp").to_owned();
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || {
                let mut sink = String::new();
                while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                    sink.clear();
                }
            });
            return (Run::Process(child), addr, admin);
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not report its address"
        );
    }
}

/// The configuration `from` gives, resolved as `tether serve` resolves its arguments, with
/// the notes the binary would print first.
fn embedded_config(
    state_dir: &Path,
    listen: &str,
    from: &From,
) -> (
    tether_core::config::Config,
    Vec<String>,
    String,
    tether::logging::LogFormat,
) {
    use tether_core::config::{Config, Layer, LimitsLayer};
    match from {
        From::Args(args) => {
            let mut argv = serve_argv(state_dir, listen, args);
            if !args.iter().any(|a| a == "--log") {
                argv.splice(0..0, ["--log".to_owned(), TEST_LOG.to_owned()]);
            }
            let parsed = tether::serve::parse_args(&argv)
                .unwrap_or_else(|e| panic!("tether serve {argv:?}: {e}"));
            let prepared = tether::serve::prepare(&parsed, Some(Path::new(BIN)))
                .unwrap_or_else(|e| panic!("invalid configuration: {e:#?}"));
            (
                prepared.config,
                prepared.notes,
                parsed.log_filter().to_owned(),
                parsed.log_format(),
            )
        }
        From::Layer(layer) => {
            let base = Layer {
                limits: Some(
                    LimitsLayer::default()
                        .with("session-rate", 100_000u64)
                        .with("session-burst", 100_000u64),
                ),
                ..Layer::default()
            }
            .with("listen", listen)
            .with("admin-listen", "127.0.0.1:0")
            .with("state-dir", state_dir.display().to_string())
            .with("demo", true);
            let config = Config::resolve(
                base.overlay((**layer).clone()),
                vec![BIN.into(), "demo-server".into()],
            )
            .unwrap_or_else(|e| panic!("invalid test config: {e:?}"));
            (
                config,
                Vec::new(),
                TEST_LOG.to_owned(),
                tether::logging::LogFormat::Text,
            )
        }
    }
}

/// Runs `app::run` on a runtime and thread of its own whose threads log to `log` (the
/// binary's lines, format and filter), and waits until it listens.
fn embed(state_dir: &Path, listen: &str, from: &From, log: &Path) -> (Run, String, String) {
    use std::io::Write as _;
    let (config, notes, filter, format) = embedded_config(state_dir, listen, from);
    let mut file = std::fs::File::create(log).unwrap();
    for note in notes {
        writeln!(file, "tether: {note}").unwrap();
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).expect("a valid --log filter");
    let dispatch = tether::logging::dispatch(filter, format, Arc::new(file));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (abort_tx, abort_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("test-gateway".into())
        .spawn(move || {
            let on_start = dispatch.clone();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .on_thread_start(move || {
                    let guard = tracing::dispatcher::set_default(&on_start);
                    GATEWAY_LOG.with(|g| *g.borrow_mut() = Some(guard));
                })
                .on_thread_stop(|| GATEWAY_LOG.with(|g| drop(g.borrow_mut().take())))
                .build()
                .map_err(|e| format!("cannot start a runtime: {e}"))?;
            let _log = tracing::dispatcher::set_default(&dispatch);
            let result = runtime.block_on(async move {
                let mut run = tokio::spawn(tether_core::app::run(
                    config,
                    Some(PathBuf::from(BIN)),
                    async {
                        let _ = stop_rx.await;
                    },
                    move |addr, admin| {
                        let _ = ready_tx.send((addr, admin));
                    },
                ));
                tokio::select! {
                    ended = &mut run => match ended {
                        Ok(r) => r.map_err(|e| format!("{e:#}")),
                        Err(e) => Err(format!("the gateway panicked: {e}")),
                    },
                    _ = abort_rx => {
                        run.abort();
                        Err("killed".to_owned())
                    }
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(10));
            result
        })
        .expect("a thread for the gateway");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ready_rx.recv_timeout(Duration::from_millis(20)) {
            Ok((addr, admin)) => {
                let run = Run::InProcess(Embedded {
                    stop: Some(stop_tx),
                    abort: Some(abort_tx),
                    thread: Some(thread),
                });
                return (run, addr.to_string(), format!("http://{admin}"));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(_) => {
                let _ = abort_tx.send(());
                let ended = thread.join();
                let log_text = std::fs::read_to_string(log).unwrap_or_default();
                panic!("gateway did not start ({ended:?}); log:\n{log_text}");
            }
        }
    }
}

impl Gateway {
    /// How to start a test gateway on `state_dir`: in this process from the arguments of
    /// `tether serve` (none by default) unless told otherwise.
    pub fn builder(state_dir: &Path) -> Builder {
        Builder {
            state_dir: state_dir.to_path_buf(),
            listen: "127.0.0.1:0".to_owned(),
            from: From::Args(Vec::new()),
            env: Vec::new(),
            wrapper: Vec::new(),
            process: false,
        }
    }

    /// Starts `tether serve --listen 127.0.0.1:0 --state-dir DIR <args>` in this process.
    pub fn start(state_dir: &Path, args: &[&str]) -> Gateway {
        Gateway::builder(state_dir).args(args).start()
    }

    /// Like [`Gateway::start`], as a process of its own.
    pub fn spawn(state_dir: &Path, args: &[&str]) -> Gateway {
        Gateway::builder(state_dir).args(args).process().start()
    }

    /// A process, with extra environment variables.
    pub fn start_env(state_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        Gateway::builder(state_dir).args(args).env(env).start()
    }

    /// A process run under `wrapper` (a command that runs its arguments, such as
    /// `prlimit --nofile=512:512`).
    pub fn start_wrapped(state_dir: &Path, wrapper: &[&str], args: &[&str]) -> Gateway {
        Gateway::builder(state_dir)
            .args(args)
            .wrapper(wrapper)
            .start()
    }

    /// Whether this gateway is a process of its own.
    pub fn is_process(&self) -> bool {
        matches!(self.run, Run::Process(_))
    }

    /// Starts a new gateway on the same address, state dir and arguments, the same way.
    pub fn restart(&self) -> Gateway {
        self.restart_from(&self.from, &self.env)
    }

    /// Starts a new gateway on the same address, state dir and arguments, without the
    /// extra environment (a fault injection) this one had.
    pub fn restart_clean(&self) -> Gateway {
        self.restart_from(&self.from, &[])
    }

    /// Starts a new gateway on the same address and state dir with other arguments.
    pub fn restart_with(&self, args: &[&str]) -> Gateway {
        let args = From::Args(args.iter().map(|s| s.to_string()).collect());
        self.restart_from(&args, &self.env)
    }

    fn restart_from(&self, from: &From, env: &[(String, String)]) -> Gateway {
        let mut last = None;
        for _ in 0..50 {
            let builder = Builder {
                state_dir: self.state_dir.clone(),
                listen: self.addr.clone(),
                from: from.clone(),
                env: env.to_vec(),
                wrapper: self.wrapper.clone(),
                process: self.is_process(),
            };
            match std::panic::catch_unwind(|| builder.start()) {
                Ok(g) => return g,
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        std::panic::resume_unwind(last.unwrap())
    }

    fn child(&mut self) -> &mut Child {
        match &mut self.run {
            Run::Process(c) => c,
            Run::InProcess(_) => panic!(
                "this gateway runs in the test's process; start it with Gateway::spawn (or the builder's process()) for kill -9, signals, its pid"
            ),
        }
    }

    pub fn pid(&self) -> i32 {
        match &self.run {
            Run::Process(c) => c.id() as i32,
            Run::InProcess(_) => panic!(
                "this gateway runs in the test's process; start it with Gateway::spawn for a pid of its own"
            ),
        }
    }

    pub fn kill9(&mut self) {
        let child = self.child();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let pid = self.pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let child = self.child();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it as SIGTERM does (grace for in-flight calls, sessions stay resumable) and
    /// says how the run ended; [`Gateway::restart`] starts the next one.
    pub async fn stop(&mut self) -> Result<(), String> {
        match &mut self.run {
            Run::Process(_) => {
                let status = self.sigterm();
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("tether serve exited with {status}"))
                }
            }
            Run::InProcess(e) => {
                if let Some(stop) = e.stop.take() {
                    let _ = stop.send(());
                }
                let thread = e.thread.take().expect("a running gateway");
                tokio::task::spawn_blocking(move || thread.join())
                    .await
                    .unwrap()
                    .unwrap_or_else(|_| Err("the gateway's thread panicked".to_owned()))
            }
        }
    }

    pub fn alive(&mut self) -> bool {
        match &mut self.run {
            Run::Process(c) => c.try_wait().unwrap().is_none(),
            Run::InProcess(e) => e.thread.as_ref().is_some_and(|t| !t.is_finished()),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn client(&self) -> Mcp {
        Mcp::new(&self.url)
    }

    /// GET on the admin API with the admin token (full session ids), as JSON.
    pub async fn admin_json(&self, path: &str) -> Value {
        reqwest::Client::new()
            .get(format!("{}{path}", self.admin))
            .bearer_auth(self.admin_token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The admin token the gateway generated into its state dir.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("admin.token"))
            .expect("the gateway wrote its admin token")
            .trim()
            .to_owned()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        match &mut self.run {
            Run::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Run::InProcess(e) => {
                if let Some(abort) = e.abort.take() {
                    let _ = abort.send(());
                }
                if let Some(thread) = e.thread.take() {
                    let _ = thread.join();
                }
            }
        }
    }
}

/// Whether a process exists (and is not a zombie).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone, up to `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    wait_for(timeout, || !process_alive(pid))
}

/// Polls `cond` until it holds (true) or `timeout` passes (false).
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    /// Status, headers and the whole body of a response.
    pub async fn read(resp: reqwest::Response) -> Answer {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        Answer {
            status,
            headers,
            body: resp.text().await.unwrap_or_default(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// SSE events as (id, data) pairs; data parsed as JSON when not empty.
    pub fn events(&self) -> Vec<(String, Option<Value>)> {
        parse_sse(&self.body)
    }

    /// The JSON-RPC response in this answer (JSON body, or the last SSE response event).
    pub fn response(&self) -> Value {
        if self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"))
        {
            self.events()
                .into_iter()
                .filter_map(|(_, d)| d)
                .rfind(|v| v.get("method").is_none())
                .unwrap_or_else(|| panic!("no response event in {}", self.body))
        } else {
            self.json()
        }
    }
}

pub fn parse_sse(text: &str) -> Vec<(String, Option<Value>)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut id = String::new();
        let mut data: Option<String> = None;
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data = Some(v.trim_start().to_owned());
            }
        }
        if let Some(d) = data {
            out.push((
                id,
                (!d.is_empty()).then(|| serde_json::from_str(&d).expect("SSE data is JSON")),
            ));
        }
    }
    out
}

/// A raw MCP-over-HTTP client.
#[derive(Clone)]
pub struct Mcp {
    pub url: String,
    pub http: reqwest::Client,
}

impl Mcp {
    pub fn new(url: &str) -> Mcp {
        // A bound on every exchange: a hang must fail the test, not stall CI.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Mcp {
            url: url.to_owned(),
            http,
        }
    }

    pub fn with_url(&self, url: &str) -> Mcp {
        Mcp {
            url: url.to_owned(),
            http: self.http.clone(),
        }
    }

    pub async fn post_raw(
        &self,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> Answer {
        let mut req = self.http.post(&self.url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.body(body).send().await.expect("gateway reachable");
        Answer::read(resp).await
    }

    /// POSTs a message with the usual headers, optionally in a session.
    pub async fn post(&self, session: Option<&str>, message: &Value) -> Answer {
        let mut h = vec![
            ("content-type", "application/json"),
            ("accept", ACCEPT_BOTH),
        ];
        if let Some(s) = session {
            h.push(("mcp-session-id", s));
            h.push(("mcp-protocol-version", "2025-11-25"));
        }
        self.post_raw(&h, message.to_string()).await
    }

    /// initialize + notifications/initialized; returns the session id.
    pub async fn initialize(&self, client_name: &str) -> String {
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {"sampling": {}},
            "clientInfo": {"name": client_name, "version": "1.0"}
        }});
        let a = self.post(None, &init).await;
        assert_eq!(a.status, 200, "initialize: {}", a.body);
        let sid = a
            .headers
            .get("mcp-session-id")
            .expect("session id issued")
            .to_str()
            .unwrap()
            .to_owned();
        let n = self
            .post(
                Some(&sid),
                &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            )
            .await;
        assert_eq!(n.status, 202);
        sid
    }

    /// Calls a tool and returns the JSON-RPC response.
    pub async fn call(&self, session: &str, id: i64, tool: &str, args: Value) -> Value {
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}});
        let a = self.post(Some(session), &msg).await;
        assert_eq!(a.status, 200, "tools/call {tool}: {}", a.body);
        a.response()
    }

    /// The text of a successful tool result.
    pub async fn call_text(&self, session: &str, id: i64, tool: &str, args: Value) -> String {
        let r = self.call(session, id, tool, args).await;
        r.pointer("/result/content/0/text")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{tool} did not succeed: {r}"))
            .to_owned()
    }

    /// Starts a tool call and returns once the priming event arrived, with the stream id
    /// and the still-open event stream.
    pub async fn start_call(
        &self,
        session: &str,
        id: i64,
        tool: &str,
        args: Value,
    ) -> (String, OpenStream) {
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}});
        let resp = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", ACCEPT_BOTH)
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-11-25")
            .body(msg.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut events = resp.bytes_stream().eventsource().boxed();
        let first = events
            .next()
            .await
            .expect("priming event")
            .expect("valid SSE");
        assert!(first.data.is_empty(), "first event is the priming event");
        let stream = first.id.rsplit_once('.').unwrap().0.to_owned();
        (stream, OpenStream { events })
    }

    /// Opens the session's standalone stream (GET); asserts it is accepted.
    pub async fn listen(&self, session: &str) -> reqwest::Response {
        let resp = self
            .http
            .get(&self.url)
            .header("accept", "text/event-stream")
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-11-25")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp
    }

    /// GET with Last-Event-ID; returns the whole (finite) replayed stream.
    pub async fn resume(&self, session: &str, last_event_id: &str) -> Answer {
        let resp = self
            .http
            .get(&self.url)
            .header("accept", "text/event-stream")
            .header("mcp-session-id", session)
            .header("last-event-id", last_event_id)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        Answer::read(resp).await
    }

    pub async fn delete(&self, session: &str) -> u16 {
        self.http
            .delete(&self.url)
            .header("mcp-session-id", session)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

pub struct OpenStream {
    pub events: futures::stream::BoxStream<
        'static,
        Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>,
    >,
}

/// A temp dir per test, kept on failure for inspection.
pub fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tether-test-")
        .tempdir()
        .unwrap()
}

/// Runs `tether demo-server --http ADDR` (an rmcp server that is not Tether and forgets its
/// sessions when restarted) and returns it with its MCP URL.
pub fn http_upstream(addr: &str) -> (std::process::Child, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["demo-server", "--http", addr])
        .stderr(Stdio::null());
    spawn_announced(cmd, "demo-server: listening on ")
}

/// Spawns a server that prints `PREFIX<url>` as its first stdout line; returns it and the
/// URL.
pub fn spawn_announced(mut cmd: Command, prefix: &str) -> (std::process::Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("server starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected {prefix:?}<url>, got {line:?}"))
        .to_owned();
    (child, url)
}

/// Kills an `http_upstream` and starts a fresh one on the same address: the server
/// restarts and forgets every session.
pub fn restart_http_upstream(mut old: std::process::Child, url: &str) -> std::process::Child {
    old.kill().unwrap();
    old.wait().unwrap();
    let addr = url.trim_start_matches("http://").trim_end_matches("/mcp");
    http_upstream(addr).0
}

/// An address where nothing listens and nothing else can start listening while the
/// returned socket lives: bound, never `listen`ed, so connections are refused.
pub fn refused_addr() -> (socket2::Socket, std::net::SocketAddr) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (socket, addr)
}

/// The official Rust SDK client speaking stdio to `cmd` (a bridge such as `tether connect`).
pub async fn stdio_client(
    cmd: tokio::process::Command,
) -> rmcp::service::RunningService<rmcp::RoleClient, rmcp::model::ClientConfig> {
    use rmcp::ServiceExt;
    let info = rmcp::model::ClientConfig::new(
        rmcp::model::ClientCapabilities::default(),
        rmcp::model::Implementation::new("stdio-client", "1.0"),
    )
    .with_protocol_version(rmcp::model::ProtocolVersion::LATEST_WITH_INITIALIZE);
    let transport = rmcp::transport::TokioChildProcess::new(cmd).expect("bridge starts");
    info.serve(transport)
        .await
        .expect("initialize through the bridge")
}

/// `tether serve --demo` on port 0 with `state_dir`, run to its exit (for starts that must
/// fail): exit code, stdout and stderr.
pub fn serve_to_exit(state_dir: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(state_dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn metrics_text(gw: &Gateway) -> String {
    reqwest::get(format!("{}/metrics", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The sum of every sample of a metric whose line starts with `prefix` (a name with some
/// of its labels), 0 when there is none.
pub async fn metric_sum(gw: &Gateway, prefix: &str) -> f64 {
    metrics_text(gw)
        .await
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Open file descriptors of a process.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// One value of an unlabelled metric from a gateway's `/metrics`.
pub async fn metric(gw: &Gateway, name: &str) -> f64 {
    let text = metrics_text(gw).await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// A name no other test (or earlier run) uses: `name_PID_NANOS`.
pub fn unique(name: &str) -> String {
    format!(
        "{name}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// A PostgreSQL schema of the test's own in `TETHER_TEST_DATABASE_URL`'s database; returns
/// an admin connection and the schema name. Drop it with [`drop_schema`].
pub async fn pg_schema(name: &str) -> Option<(tokio_postgres::Client, String)> {
    let url = std::env::var("TETHER_TEST_DATABASE_URL").ok()?;
    let schema = unique(name);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("TETHER_TEST_DATABASE_URL must reach PostgreSQL");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    Some((client, schema))
}

/// `url` with its `search_path` set to `schema`.
pub fn in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

pub async fn drop_schema(client: &tokio_postgres::Client, schema: &str) {
    let _ = client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await;
}

/// Resident memory of a process, in KiB (0 if it is gone).
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Live processes whose environment holds the `KEY=value` entry `entry` (a test's
/// upstreams, started under `env KEY=value`, wherever they were reparented to).
pub fn marked_processes(entry: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .filter(|e| {
                    std::fs::read(e.path().join("environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == entry.as_bytes()))
                        && process_alive(e.file_name().to_str().unwrap().parse().unwrap())
                })
                .count()
        })
        .unwrap_or(0)
}

/// Runs an end-to-end client script (off the async runtime) and returns the JSON report it
/// prints on its last line; a failing run panics with its output and the gateway's log.
pub async fn client_report(mut cmd: Command, what: &str, gw: &Gateway) -> Value {
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("the client runs"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_text()
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{what}: no JSON report ({e}): {stdout}"))
}

/// `tether keys add --config FILE`, returning the printed key.
pub fn add_key(config: &std::path::Path, user: &str, email: &str) -> String {
    let out = Command::new(BIN)
        .args([
            "keys", "add", "--user", user, "--email", email, "--name", user, "--config",
        ])
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("tk_"))
        .expect("key printed once")
        .to_owned()
}

/// `mcp` sending `Authorization: Bearer KEY` on every request.
pub fn with_key(mcp: &Mcp, key: &str) -> Mcp {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
    Mcp {
        url: mcp.url.clone(),
        http: reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap(),
    }
}
