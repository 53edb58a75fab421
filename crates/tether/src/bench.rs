//! `tether bench`: a load generator for MCP servers and gateways.
//!
//! Opens N sessions against a Streamable HTTP MCP URL (or, with `--stdio`, N child
//! processes of a stdio MCP server, the no-gateway baseline), runs `tools/call` loops with
//! K calls in flight per session for a bounded time, and reports calls/s, latency
//! percentiles, errors by kind and its own CPU time. With `--watch-pid` it also samples the
//! CPU time and peak memory of a process tree (the gateway under test and its children).
//!
//! Written here rather than using wrk or oha because an MCP call is a session handshake plus
//! a POST whose answer may be JSON or an SSE stream, and the stdio baseline must drive the
//! same pattern over pipes; the hot loop is one reqwest POST and a scan of the answer.
//!
//! Must not: share state between workers in the hot loop.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, mpsc, oneshot};

/// `tether bench` options.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Streamable HTTP MCP endpoint to load (omit with --stdio).
    url: Option<String>,
    /// Concurrent sessions.
    #[arg(long, short = 'n', default_value_t = 1)]
    sessions: usize,
    /// Calls in flight per session.
    #[arg(long, short = 'k', default_value_t = 1)]
    in_flight: usize,
    /// Measured time.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    duration: String,
    /// Unmeasured time first (connections, caches, JIT of peers).
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    warmup: String,
    /// Tool to call.
    #[arg(long, default_value = "echo")]
    tool: String,
    /// Tool arguments (JSON object).
    #[arg(long, default_value = r#"{"text":"hello"}"#)]
    args: String,
    /// Protocol version to ask for. `2026-07-28`: stateless modern-era clients (each
    /// "session" is one client: `server/discover` once, then every call carries its `_meta`
    /// and the `Mcp-Method`/`Mcp-Name` headers).
    #[arg(long, default_value = "2025-06-18")]
    protocol_version: String,
    /// Sample CPU time and peak memory of this process and its descendants.
    #[arg(long, value_name = "PID")]
    watch_pid: Option<i32>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Drive a stdio MCP server directly (one child per session), given after `--`.
    #[arg(long)]
    stdio: bool,
    /// The stdio server command (with --stdio).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// What one call ended as.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Ok,
    ToolError,
    Rpc(i64),
    Http(u16),
    Transport,
}

impl Outcome {
    fn label(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::ToolError => "tool_error".into(),
            Outcome::Rpc(c) => format!("rpc_{c}"),
            Outcome::Http(s) => format!("http_{s}"),
            Outcome::Transport => "transport".into(),
        }
    }
}

fn classify(v: &Value) -> Outcome {
    if let Some(code) = v.pointer("/error/code").and_then(Value::as_i64) {
        Outcome::Rpc(code)
    } else if v.pointer("/result/isError").and_then(Value::as_bool) == Some(true) {
        Outcome::ToolError
    } else if v.get("result").is_some() {
        Outcome::Ok
    } else {
        Outcome::Transport
    }
}

/// Per-worker results, merged at the end (no shared state in the hot loop).
#[derive(Default)]
struct Tally {
    lat_us: Vec<u32>,
    outcomes: BTreeMap<String, u64>,
}

impl Tally {
    fn add(&mut self, started: Instant, outcome: &Outcome) {
        if *outcome == Outcome::Ok {
            self.lat_us
                .push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
        }
        *self.outcomes.entry(outcome.label()).or_default() += 1;
    }
}

/// CPU seconds (user + system) of this process so far.
fn own_cpu() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

/// A process tree's CPU seconds and resident memory, from /proc, and the CPU of its root
/// alone (a gateway without its upstream children).
struct TreeSample {
    cpu_s: f64,
    root_cpu_s: f64,
    rss_kib: u64,
}

fn tree_sample(root: i32) -> TreeSample {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let page_kib = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64
        / 1024;
    // pid -> (ppid, cpu ticks incl. reaped children, rss pages)
    let mut procs: HashMap<i32, (i32, u64, u64)> = HashMap::new();
    let mut root_ticks = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the command (which may hold spaces) start at ") ".
            let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let ppid = f.get(1).and_then(|v| v.parse::<i32>().ok()).unwrap_or(0);
            // state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14 ... rss=21
            let cpu = num(11) + num(12) + num(13) + num(14);
            if pid == root {
                root_ticks = num(11) + num(12);
            }
            procs.insert(pid, (ppid, cpu, num(21)));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            procs
                .iter()
                .filter(|(_, (pp, ..))| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    let (cpu, rss) = tree
        .iter()
        .filter_map(|p| procs.get(p))
        .fold((0u64, 0u64), |(c, r), (_, cpu, rss)| (c + cpu, r + rss));
    TreeSample {
        cpu_s: cpu as f64 / ticks,
        root_cpu_s: root_ticks as f64 / ticks,
        rss_kib: rss * page_kib,
    }
}

/// Runs the benchmark; exit code 2 for bad arguments, 1 if no call succeeded.
pub fn run(args: &BenchArgs) -> ExitCode {
    let parse = |what: &str, v: &str| {
        humantime::parse_duration(v).map_err(|e| {
            eprintln!("tether bench: --{what} {v:?}: {e}");
            ExitCode::from(2)
        })
    };
    let (duration, warmup) = match (
        parse("duration", &args.duration),
        parse("warmup", &args.warmup),
    ) {
        (Ok(d), Ok(w)) => (d, w),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let Ok(tool_args) = serde_json::from_str::<Value>(&args.args) else {
        eprintln!("tether bench: --args must be a JSON object");
        return ExitCode::from(2);
    };
    if args.stdio == args.url.is_some() || (args.stdio && args.command.is_empty()) {
        eprintln!("tether bench: give a URL, or --stdio -- CMD ARGS");
        return ExitCode::from(2);
    }
    if args.sessions == 0 || args.in_flight == 0 {
        eprintln!("tether bench: --sessions and --in-flight must be at least 1");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(args, duration, warmup, tool_args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tether bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One way of making calls in a session.
#[derive(Clone)]
enum Target {
    Http(HttpSession),
    Stdio(Arc<StdioSession>),
}

impl Target {
    async fn call(&self, id: u64, body: &Value) -> Outcome {
        match self {
            Target::Http(h) => h.call(id, body).await,
            Target::Stdio(s) => s.call(id, body).await,
        }
    }
}

#[derive(Clone)]
struct HttpSession {
    http: reqwest::Client,
    url: String,
    session: Option<String>,
    version: String,
}

impl HttpSession {
    async fn open(http: reqwest::Client, url: &str, version: &str) -> anyhow::Result<HttpSession> {
        let mut s = HttpSession {
            http,
            url: url.to_owned(),
            session: None,
            version: version.to_owned(),
        };
        if s.modern() {
            let discover =
                json!({"jsonrpc": "2.0", "id": 0, "method": "server/discover", "params": {}});
            let answer = read_answer(s.post(&discover).send().await?).await?;
            if answer.get("result").is_none() {
                anyhow::bail!("server/discover failed: {answer}");
            }
            return Ok(s);
        }
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": version, "capabilities": {},
            "clientInfo": {"name": "tether-bench", "version": env!("CARGO_PKG_VERSION")}}});
        let resp = s.post(&init).send().await?;
        if !resp.status().is_success() {
            anyhow::bail!("initialize: HTTP {}", resp.status());
        }
        s.session = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let answer = read_answer(resp).await?;
        if answer.get("result").is_none() {
            anyhow::bail!("initialize failed: {answer}");
        }
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        s.post(&note).send().await?;
        Ok(s)
    }

    fn modern(&self) -> bool {
        self.version.as_str() >= "2026-07-28"
    }

    fn post(&self, body: &Value) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", &self.version);
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s);
        }
        if self.modern() {
            // A stateless request carries who its client is every time.
            let mut body = body.clone();
            let method = body["method"].as_str().unwrap_or_default().to_owned();
            req = req.header("mcp-method", &method);
            if let Some(name) = body.pointer("/params/name").and_then(Value::as_str) {
                req = req.header("mcp-name", name);
            }
            body["params"]["_meta"] = json!({
                "io.modelcontextprotocol/protocolVersion": self.version,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "tether-bench", "version": env!("CARGO_PKG_VERSION")},
            });
            return req.body(body.to_string());
        }
        req.body(body.to_string())
    }

    async fn call(&self, _id: u64, body: &Value) -> Outcome {
        let resp = match self.post(body).send().await {
            Ok(r) => r,
            Err(_) => return Outcome::Transport,
        };
        if !resp.status().is_success() {
            return Outcome::Http(resp.status().as_u16());
        }
        match read_answer(resp).await {
            Ok(v) => classify(&v),
            Err(_) => Outcome::Transport,
        }
    }
}

/// The JSON-RPC response in an answer: the JSON body, or the SSE event carrying it.
async fn read_answer(resp: reqwest::Response) -> anyhow::Result<Value> {
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    let text = resp.text().await?;
    if !sse {
        return Ok(serde_json::from_str(&text)?);
    }
    for line in text.lines() {
        if let Some(data) = line.strip_prefix("data:") {
            let data = data.trim_start();
            if data.contains("\"result\"") || data.contains("\"error\"") {
                let v: Value = serde_json::from_str(data)?;
                if v.get("method").is_none() {
                    return Ok(v);
                }
            }
        }
    }
    anyhow::bail!("no response in the event stream")
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// One stdio server process, calls multiplexed by id.
struct StdioSession {
    tx: mpsc::Sender<String>,
    waiters: Waiters,
    child: Mutex<tokio::process::Child>,
}

impl StdioSession {
    async fn open(cmd: &[String], version: &str) -> anyhow::Result<StdioSession> {
        let mut child = tokio::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, mut rx) = mpsc::channel::<String>(1024);
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if stdin.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                // Batch whatever else is queued into one flush.
                while let Ok(more) = rx.try_recv() {
                    if stdin.write_all(more.as_bytes()).await.is_err() {
                        return;
                    }
                }
                if stdin.flush().await.is_err() {
                    return;
                }
            }
        });
        let waiters: Waiters = Arc::default();
        let w = waiters.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(id) = v.get("id").and_then(Value::as_u64)
                    && let Some(tx) = w.lock().await.remove(&id)
                {
                    let _ = tx.send(v);
                }
            }
        });
        let s = StdioSession {
            tx,
            waiters,
            child: Mutex::new(child),
        };
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": version, "capabilities": {},
            "clientInfo": {"name": "tether-bench", "version": env!("CARGO_PKG_VERSION")}}});
        let answer = s.request(0, &init).await?;
        if answer.get("result").is_none() {
            anyhow::bail!("initialize failed: {answer}");
        }
        s.tx.send(format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
        ))
        .await?;
        Ok(s)
    }

    async fn request(&self, id: u64, body: &Value) -> anyhow::Result<Value> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().await.insert(id, tx);
        self.tx.send(format!("{body}\n")).await?;
        Ok(tokio::time::timeout(Duration::from_secs(60), rx).await??)
    }

    async fn call(&self, id: u64, body: &Value) -> Outcome {
        match self.request(id, body).await {
            Ok(v) => classify(&v),
            Err(_) => Outcome::Transport,
        }
    }
}

async fn bench(
    args: &BenchArgs,
    duration: Duration,
    warmup: Duration,
    tool_args: Value,
) -> anyhow::Result<bool> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.sessions * args.in_flight + 4)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut targets = Vec::with_capacity(args.sessions);
    let opened = Instant::now();
    for _ in 0..args.sessions {
        targets.push(match &args.url {
            Some(url) => {
                Target::Http(HttpSession::open(http.clone(), url, &args.protocol_version).await?)
            }
            None => Target::Stdio(Arc::new(
                StdioSession::open(&args.command, &args.protocol_version).await?,
            )),
        });
    }
    let open_time = opened.elapsed();
    let watch = args.watch_pid.or_else(|| {
        args.stdio
            .then(|| i32::try_from(std::process::id()).unwrap_or(0))
    });
    let start = Instant::now() + warmup;
    let end = start + duration;
    let next_id = Arc::new(AtomicU64::new(1));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = watch.map(|pid| {
        let peak = peak.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                every.tick().await;
                let s = tokio::task::spawn_blocking(move || tree_sample(pid))
                    .await
                    .map(|s| s.rss_kib)
                    .unwrap_or(0);
                peak.fetch_max(s, Ordering::Relaxed);
            }
        })
    });
    let mut workers = Vec::new();
    for target in &targets {
        for _ in 0..args.in_flight {
            let (target, next_id, tool, tool_args) = (
                target.clone(),
                next_id.clone(),
                args.tool.clone(),
                tool_args.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut tally = Tally::default();
                loop {
                    let now = Instant::now();
                    if now >= end {
                        return tally;
                    }
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                        "params": {"name": tool, "arguments": tool_args}});
                    let outcome = target.call(id, &body).await;
                    if now >= start {
                        tally.add(now, &outcome);
                    }
                }
            }));
        }
    }
    tokio::time::sleep_until(start.into()).await;
    let (cpu0, tree0) = (own_cpu(), watch.map(tree_sample));
    let mut total = Tally::default();
    for w in workers {
        let t = w.await?;
        total.lat_us.extend(t.lat_us);
        for (k, v) in t.outcomes {
            *total.outcomes.entry(k).or_default() += v;
        }
    }
    let elapsed = start.elapsed().as_secs_f64().max(duration.as_secs_f64());
    let (cpu1, tree1) = (own_cpu(), watch.map(tree_sample));
    if let Some(s) = sampler {
        s.abort();
    }
    total.lat_us.sort_unstable();
    let ok = total.lat_us.len() as f64;
    let calls: u64 = total.outcomes.values().sum();
    let pct = |p: f64| -> f64 {
        if total.lat_us.is_empty() {
            return 0.0;
        }
        let i = ((total.lat_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(total.lat_us[i])
    };
    let bench_cpu = cpu1 - cpu0;
    let mut report = json!({
        "target": args.url.clone().unwrap_or_else(|| format!("stdio: {}", args.command.join(" "))),
        "sessions": args.sessions,
        "in_flight_per_session": args.in_flight,
        "duration_s": elapsed,
        "session_open_s": open_time.as_secs_f64(),
        "calls": calls,
        "ok": ok,
        "calls_per_s": ok / elapsed,
        "latency_us": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        "outcomes": total.outcomes,
        "bench_cpu_s": bench_cpu,
        "bench_cpu_us_per_call": if ok > 0.0 { bench_cpu * 1e6 / ok } else { 0.0 },
    });
    if let (Some(pid), Some(t0), Some(t1)) = (watch, tree0, tree1) {
        // In --stdio mode the watched tree is this process: subtract the load tool's own
        // CPU so what remains is the servers'.
        let mut cpu = t1.cpu_s - t0.cpu_s;
        if args.stdio {
            cpu = (cpu - bench_cpu).max(0.0);
        }
        // The watched process alone (a gateway without its upstreams): what it costs itself.
        let root = t1.root_cpu_s - t0.root_cpu_s;
        report["watched"] = json!({
            "pid": pid,
            "cpu_s": cpu,
            "cpu_us_per_call": if ok > 0.0 { cpu * 1e6 / ok } else { 0.0 },
            "self_cpu_us_per_call": if ok > 0.0 && !args.stdio { root * 1e6 / ok } else { 0.0 },
            "peak_rss_kib": peak.load(Ordering::Relaxed).max(t1.rss_kib),
        });
    }
    for t in &targets {
        if let Target::Stdio(s) = t {
            let _ = s.child.lock().await.kill().await;
        }
    }
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(ok > 0.0)
}

fn print_table(r: &Value) {
    let f = |p: &str| r.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
    println!("target      {}", r["target"].as_str().unwrap_or(""));
    println!(
        "load        {} sessions x {} in flight, {:.1} s measured",
        r["sessions"],
        r["in_flight_per_session"],
        f("/duration_s")
    );
    println!("calls/s     {:.0}", f("/calls_per_s"));
    println!(
        "latency us  p50 {:.0}  p90 {:.0}  p99 {:.0}  max {:.0}",
        f("/latency_us/p50"),
        f("/latency_us/p90"),
        f("/latency_us/p99"),
        f("/latency_us/max")
    );
    let outcomes: Vec<String> = r["outcomes"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    println!("outcomes    {}", outcomes.join(", "));
    println!(
        "bench cpu   {:.2} s ({:.1} us per call)",
        f("/bench_cpu_s"),
        f("/bench_cpu_us_per_call")
    );
    if r.get("watched").is_some() {
        println!(
            "watched     pid {}: cpu {:.2} s ({:.1} us per call; {:.1} the process alone), peak rss {} KiB",
            r["watched"]["pid"],
            f("/watched/cpu_s"),
            f("/watched/cpu_us_per_call"),
            f("/watched/self_cpu_us_per_call"),
            r["watched"]["peak_rss_kib"]
        );
    }
}
