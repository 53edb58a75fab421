//! `tether`: the command line. Parses flags (over `TETHER_*` env and a TOML file), then
//! hands off to `tether_core::app`. Also hosts the bundled demo MCP server and the hidden
//! `__shim` that supervises stdio children (see `tether_core::upstream::shim`).
//!
//! Must not: contain gateway logic; flags become a `config::Layer`, nothing more.

mod bench;
mod cli;
mod demo;
mod floor;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tether_core::config::{Config, Layer, LimitsLayer, ServersSource, SizeValue, UpstreamLayer};

/// A gateway that makes MCP sessions durable: they survive gateway restarts (even
/// kill -9), upstream crashes and upstream restarts, transparently.
#[derive(Parser)]
#[command(name = "tether", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a durable-session MCP endpoint (http://LISTEN/mcp) in front of one MCP server.
    ///
    /// Give the upstream as a stdio command after `--`, as --upstream-url, or use --demo.
    /// Examples:
    ///   tether serve --demo
    ///   tether serve -- npx -y @modelcontextprotocol/server-everything
    ///   tether serve --upstream-url http://127.0.0.1:8000/mcp
    #[command(verbatim_doc_comment)]
    Serve(Box<ServeArgs>),
    /// Be a stdio MCP server that relays to a remote MCP server and survives its restarts.
    ///
    /// For clients that only launch commands (Claude Desktop, IDE plugins):
    ///   "command": "tether", "args": ["connect", "https://gw.example/mcp"]
    /// Keys stay out of process lists: put headers in TETHER_HEADERS ("Name: value" lines)
    /// or name a variable holding a bearer token with --bearer-env.
    #[command(verbatim_doc_comment)]
    Connect(Box<ConnectArgs>),
    /// Test an MCP endpoint and explain what is wrong with it.
    Check(CheckArgs),
    /// Sessions of a running gateway (through its admin API).
    Sessions {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(subcommand)]
        cmd: cli::SessionsCmd,
    },
    /// Totals and per-tool, per-client, per-upstream and per-user statistics.
    Stats {
        #[command(flatten)]
        admin: cli::AdminArgs,
        /// Window start (RFC 3339, epoch ms, or a duration ago such as 1h) [default: 24h].
        #[arg(long)]
        since: Option<String>,
    },
    /// Users and their sessions and tool calls.
    Users {
        #[command(flatten)]
        admin: cli::AdminArgs,
    },
    /// Stateless (2026-07-28) clients the gateway served: by user and client, with their
    /// requests (they have no session; their pooled upstream sessions are in `sessions list`).
    Clients {
        #[command(flatten)]
        admin: cli::AdminArgs,
    },
    /// The servers a gateway serves (one per entry of its --servers file): endpoint, state
    /// (serving, or draining after a reload removed or changed it), sessions, upstreams.
    Servers {
        #[command(flatten)]
        admin: cli::AdminArgs,
    },
    /// Turn a client's mcpServers file into the gateway's servers file, and print the
    /// client's file pointing each server at the gateway instead (before/after).
    ///
    ///   tether import ~/Library/Application\ Support/Claude/claude_desktop_config.json \
    ///       --out ~/.config/tether/servers.json > new_claude_desktop_config.json
    ///   tether serve --servers ~/.config/tether/servers.json
    #[command(verbatim_doc_comment)]
    Import(ImportArgs),
    /// The tool-call quota (--quota-tool-calls) and each user's use of its current window.
    Quotas {
        #[command(flatten)]
        admin: cli::AdminArgs,
    },
    /// Ask a running gateway whether it is ready (GET /health/ready): exit 0 when ready,
    /// 1 naming the failing check. For container health checks and scripts.
    Health {
        #[command(flatten)]
        admin: cli::AdminArgs,
    },
    /// Print the dashboard's address with the admin token (open it in a browser).
    Dashboard {
        #[command(flatten)]
        admin: cli::AdminArgs,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        cmd: cli::KeysCmd,
    },
    /// Run the bundled demo MCP server on stdio (or on HTTP with --http ADDR).
    DemoServer(demo::DemoArgs),
    /// Print a shell completion script, e.g. `tether completions bash > /etc/bash_completion.d/tether`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print man pages (roff): `tether man` for tether(1); `--dir DIR` writes one page per
    /// command (tether.1, tether-serve.1, ...).
    Man {
        /// Write every page into this directory instead of printing tether(1).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Load an MCP endpoint (or a stdio server directly) and report calls/s and latency.
    ///
    /// Examples:
    ///   tether bench http://127.0.0.1:7450/mcp --sessions 16 --duration 10s
    ///   tether bench --stdio --sessions 16 -- tether demo-server
    ///   tether bench URL --watch-pid $(pgrep -f 'tether serve') --json
    #[command(verbatim_doc_comment)]
    Bench(Box<bench::BenchArgs>),
    /// The benchmarks' floor: a bare relay, Streamable HTTP in, a stdio child per session out.
    #[command(name = "__floor", hide = true)]
    Floor(floor::FloorArgs),
}

/// Options shared by the commands that talk to a remote MCP endpoint.
#[derive(Args)]
struct RemoteArgs {
    /// Extra request header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    headers: Vec<String>,
    /// Environment variable holding a bearer token, sent as `Authorization: Bearer ...`.
    #[arg(long, value_name = "VAR")]
    bearer_env: Option<String>,
    /// PEM file of a CA to trust besides the system roots.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("tether: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

impl RemoteArgs {
    /// Checks the URL and builds the headers, or says what is wrong (exit code 2).
    fn prepare(&self, url: &str) -> Result<tether_core::connect::HeaderMap, ExitCode> {
        if !tether_core::connect::is_http_url(url) {
            eprintln!("tether: {url:?} is not an http:// or https:// URL");
            return Err(ExitCode::from(2));
        }
        self.header_map().map_err(|e| {
            eprintln!("tether: {e:#}");
            ExitCode::from(2)
        })
    }

    fn header_map(&self) -> anyhow::Result<tether_core::connect::HeaderMap> {
        let mut items = self.headers.clone();
        if let Ok(lines) = std::env::var("TETHER_HEADERS") {
            items.extend(
                lines
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned),
            );
        }
        if let Some(var) = &self.bearer_env {
            let token = std::env::var(var)
                .map_err(|_| anyhow::anyhow!("--bearer-env: variable {var} is not set"))?;
            items.push(format!("Authorization: Bearer {}", token.trim()));
        }
        tether_core::connect::parse_headers(&items)
    }
}

#[derive(Args)]
struct ConnectArgs {
    /// The remote MCP endpoint, e.g. https://gw.example/mcp (with --server, the gateway's
    /// address: https://gw.example).
    url: String,
    /// One server of a gateway that serves several: connects to URL/servers/NAME/mcp.
    #[arg(long, value_name = "NAME")]
    server: Option<String>,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Time to wait for the server's response headers on each request.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    timeout: String,
    /// Longest outage a message waits through before it gets an error.
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    max_outage: String,
    /// How long the client's first request waits for a server never reached before it is
    /// answered with an error naming the cause (refused, TLS, wrong path, 401).
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    first_contact: String,
    /// First reconnection delay; doubles (jittered) up to 30s.
    #[arg(long, default_value = "250ms", value_name = "DURATION")]
    retry_base: String,
    /// Send an MCP ping this often to notice dead connections early (off by default).
    #[arg(long, value_name = "DURATION")]
    heartbeat: Option<String>,
    /// Write logs to this file instead of stderr (stdout carries protocol bytes only).
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Log filter.
    #[arg(
        long,
        env = "TETHER_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    log: String,
    /// Log lines as text or JSON.
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Args)]
struct CheckArgs {
    /// The MCP endpoint to test, e.g. http://127.0.0.1:7450/mcp.
    url: String,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Time allowed per step.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    timeout: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ImportArgs {
    /// The client's config: Claude Desktop's claude_desktop_config.json, Claude Code's
    /// .mcp.json, Cursor's mcp.json, VS Code's mcp.json (servers), Windsurf, Cline.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Where to write the gateway's servers file (never overwritten without --force).
    #[arg(long, value_name = "FILE", default_value = "tether-servers.json")]
    out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    force: bool,
    /// The gateway's address as the client reaches it.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:7450")]
    gateway: String,
    /// How the client reaches the gateway: `connect` (a `tether connect URL` command, which
    /// every client can launch) or `url` (direct Streamable HTTP).
    #[arg(long, value_name = "HOW", default_value = "connect", value_parser = ["connect", "url"])]
    via: String,
}

/// The endpoint of server `name` of the gateway at `base` (its address, or any of its
/// endpoints: `/mcp` and a `/servers/OTHER/mcp` are replaced).
fn server_url(base: &str, name: &str) -> String {
    let mut root = base.trim_end_matches('/');
    root = root.strip_suffix("/mcp").unwrap_or(root);
    if let Some(i) = root.find("/servers/") {
        root = &root[..i];
    }
    format!("{root}/servers/{name}/mcp")
}

/// `tether import`: the gateway's servers file to --out, the client's new file to stdout,
/// what changed to stderr.
fn import(args: &ImportArgs) -> ExitCode {
    use tether_core::servers::{Via, import};
    let shown = args.file.display().to_string();
    let text = match tether_core::config::read_bounded(&args.file, "client config") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::from(2);
        }
    };
    let via = if args.via == "url" {
        Via::Url
    } else {
        Via::Connect
    };
    let imported = match import(&text, &shown, &args.gateway, via) {
        Ok(i) => i,
        Err(errors) => {
            eprintln!("tether: cannot import {shown}:");
            for e in errors {
                eprintln!("  - {e}");
            }
            return ExitCode::from(2);
        }
    };
    for note in &imported.notes {
        eprintln!("tether: {note}");
    }
    if imported.names.is_empty() {
        eprintln!("tether: {shown}: no enabled server to put behind the gateway");
        return ExitCode::from(2);
    }
    let body = serde_json::to_string_pretty(&imported.tether).unwrap_or_default() + "\n";
    let written = if args.force {
        std::fs::write(&args.out, body)
    } else {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&args.out)
            .and_then(|mut f| f.write_all(body.as_bytes()))
    };
    if let Err(e) = written {
        eprintln!(
            "tether: cannot write {}: {e}{}",
            args.out.display(),
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                " (--force replaces it)"
            } else {
                ""
            }
        );
        return ExitCode::from(2);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&imported.client).unwrap_or_default()
    );
    let gateway = args.gateway.trim_end_matches('/').trim_end_matches("/mcp");
    eprintln!(
        "tether: wrote {} servers to {} ({}); run them with:\n    tether serve --servers {}",
        imported.names.len(),
        args.out.display(),
        imported.names.join(", "),
        args.out.display()
    );
    for name in &imported.names {
        eprintln!("tether:   {name} -> {gateway}/servers/{name}/mcp");
    }
    eprintln!(
        "tether: the client config above points each server at the gateway; save it over {shown} once the gateway runs"
    );
    ExitCode::SUCCESS
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file; flags and TETHER_* variables override it.
    #[arg(long, env = "TETHER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// A client's `mcpServers` JSON (Claude Desktop, Claude Code, Cursor, VS Code...) to take
    /// the upstream from: its `command`/`args`/`env`/`cwd` or `url`/`headers`, and Tether's
    /// settings from the entry's `tether` table. It replaces the config file's upstream;
    /// flags still override.
    #[arg(long, env = "TETHER_SERVERS", value_name = "FILE")]
    servers: Option<PathBuf>,
    /// Which server of --servers to serve (needed when the file has several).
    #[arg(long, env = "TETHER_SERVER", value_name = "NAME")]
    server: Option<String>,
    /// Address of the MCP listener [default: 127.0.0.1:7450].
    #[arg(long, env = "TETHER_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// Directory of the SQLite session store [default: the platform data dir].
    #[arg(long, env = "TETHER_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A session with no activity for this long expires [default: 30m].
    #[arg(long, env = "TETHER_IDLE_TIMEOUT", value_name = "DURATION")]
    idle_timeout: Option<String>,
    /// Interval between SSE keepalive comments [default: 15s].
    #[arg(long, env = "TETHER_KEEPALIVE", value_name = "DURATION")]
    keepalive: Option<String>,
    /// Largest accepted request body, e.g. 4MiB [default: 4MiB].
    #[arg(long, env = "TETHER_MAX_BODY", value_name = "SIZE")]
    max_body: Option<String>,
    /// Time the upstream has to answer one request [default: 5m].
    #[arg(long, env = "TETHER_UPSTREAM_TIMEOUT", value_name = "DURATION")]
    upstream_timeout: Option<String>,
    /// A call answered within this time gets one JSON body and nothing of it is stored;
    /// a longer one gets a durable, resumable SSE stream; 0 = always a stream [default: 10ms].
    #[arg(long, env = "TETHER_ANSWER_WINDOW", value_name = "DURATION")]
    answer_window: Option<String>,
    /// On SIGTERM/SIGINT, time in-flight requests get to finish [default: 10s].
    #[arg(long, env = "TETHER_SHUTDOWN_GRACE", value_name = "DURATION")]
    shutdown_grace: Option<String>,
    /// Origins allowed besides loopback ones, comma-separated (`*` allows any).
    #[arg(
        long,
        env = "TETHER_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Option<Vec<String>>,
    /// `Host` names allowed besides loopback ones, comma-separated (`name` or `name:port`;
    /// `*` allows any). Checked always when set, else only on a loopback listener.
    #[arg(
        long,
        env = "TETHER_ALLOWED_HOSTS",
        value_name = "HOSTS",
        value_delimiter = ','
    )]
    allowed_hosts: Option<Vec<String>>,
    /// URL of a Streamable HTTP MCP server to front.
    #[arg(long, env = "TETHER_UPSTREAM_URL", value_name = "URL")]
    upstream_url: Option<String>,
    /// Protocol era spoken to an HTTP upstream: auto (ask it once with server/discover),
    /// legacy (sessions) or modern (2026-07-28, stateless) [default: auto].
    #[arg(long, env = "TETHER_UPSTREAM_PROTOCOL", value_name = "ERA", value_parser = ["auto", "legacy", "modern"])]
    upstream_protocol: Option<String>,
    /// A header sent with every request to an HTTP upstream, as `Name: value` (repeat the
    /// flag for more). Prefer the config file or TETHER_UPSTREAM_HEADERS for secrets: flags
    /// show in process lists.
    #[arg(
        long = "upstream-header",
        env = "TETHER_UPSTREAM_HEADERS",
        value_name = "HEADER",
        value_delimiter = '\n',
        hide_env_values = true
    )]
    upstream_header: Vec<String>,
    /// Name of the upstream in logs [default: derived from the command or URL].
    #[arg(long, env = "TETHER_UPSTREAM_NAME", value_name = "NAME")]
    upstream_name: Option<String>,
    /// Run the bundled demo MCP server as the upstream.
    #[arg(long, env = "TETHER_DEMO", value_parser = clap::builder::BoolishValueParser::new())]
    demo: bool,
    /// Address of the admin listener: health, metrics, API, dashboard [default: 127.0.0.1:7451].
    #[arg(long, env = "TETHER_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Token the admin API requires for eviction and full session ids (and for everything
    /// when its listener is not on loopback) [default: generated into the state dir].
    /// Prefer TETHER_ADMIN_TOKEN or --admin-token-file: flags show in process lists.
    #[arg(
        long,
        env = "TETHER_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// File whose first line is the admin token.
    #[arg(long, env = "TETHER_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Give a stdio upstream the gateway's whole environment (less TETHER_*) instead of
    /// PATH, HOME, LANG, TZ and the few others of the default allow-list.
    #[arg(long, env = "TETHER_UPSTREAM_INHERIT_ENV", value_parser = clap::builder::BoolishValueParser::new())]
    upstream_inherit_env: bool,
    /// Variables a stdio upstream gets from the gateway's environment besides the default
    /// allow-list, comma-separated (TETHER_* never passes).
    #[arg(
        long,
        env = "TETHER_UPSTREAM_PASS_ENV",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    upstream_pass_env: Option<Vec<String>>,
    /// Exit at start when the upstream cannot be started (program missing or not
    /// executable, URL not answering) instead of warning and serving errors.
    #[arg(long, env = "TETHER_REQUIRE_UPSTREAM", value_parser = clap::builder::BoolishValueParser::new())]
    require_upstream: bool,
    #[command(flatten)]
    limits: LimitArgs,
    /// How long closed sessions and tool calls stay in the ledger [default: 30d].
    #[arg(long, env = "TETHER_RETENTION", value_name = "DURATION")]
    retention: Option<String>,
    /// Live session state: sqlite (default) or a redis:// or rediss:// URL shared by every
    /// instance of a deployment.
    #[arg(long, env = "TETHER_STORE", value_name = "URL")]
    store: Option<String>,
    /// Prefix of every Redis key [default: tether].
    #[arg(long, env = "TETHER_STORE_PREFIX", value_name = "PREFIX")]
    store_prefix: Option<String>,
    /// Sliding TTL of session records in Redis, refreshed on activity [default: 24h].
    #[arg(long, env = "TETHER_SESSION_TTL", value_name = "DURATION")]
    session_ttl: Option<String>,
    /// Session history and tool calls: sqlite (default) or a postgres:// URL.
    #[arg(long, env = "TETHER_LEDGER", value_name = "URL")]
    ledger: Option<String>,
    /// URL at which other instances reach this one's MCP listener [default: http://LISTEN].
    #[arg(long, env = "TETHER_ADVERTISE_URL", value_name = "URL")]
    advertise_url: Option<String>,
    /// Heartbeat lifetime in Redis: how soon a killed instance's sessions move [default: 5s].
    #[arg(long, env = "TETHER_INSTANCE_TTL", value_name = "DURATION")]
    instance_ttl: Option<String>,
    /// Log filter (tracing EnvFilter syntax), e.g. info or tether_core=debug. Upstream
    /// stderr is at debug: `info,tether_core::upstream::stderr=debug` shows it.
    #[arg(
        long,
        env = "TETHER_LOG",
        value_name = "FILTER",
        default_value = "info"
    )]
    log: String,
    /// Log lines as text for people, or JSON (one object per line, with the fields of
    /// every enclosing span) for log pipelines.
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Export traces over OTLP/HTTP to this collector (e.g. http://127.0.0.1:4318): one span
    /// per MCP request (session, method, tool, outcome) with children for the upstream
    /// call and store writes. Standard OTEL_* variables tune the exporter.
    #[arg(long, env = "TETHER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// The stdio MCP server to run per session, given after `--` (no shell involved).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// How log lines are written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// JSON lines: timestamp, level, target, fields, and the span list.
    Json,
}

/// Installs the global subscriber writing to `writer`, and the OTLP exporter when
/// `otlp` names a collector (returned, to be flushed at exit).
fn init_logging<W>(
    filter: tracing_subscriber::EnvFilter,
    format: LogFormat,
    writer: W,
    ansi: bool,
    otlp: Option<&str>,
) -> anyhow::Result<Option<tether_core::telemetry::Telemetry>>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(writer)
            .boxed(),
    };
    let (otel, telemetry) = match otlp {
        Some(endpoint) => {
            let (layer, t) = tether_core::telemetry::Telemetry::start(endpoint)?;
            (Some(layer), Some(t))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .init();
    Ok(telemetry)
}

/// Resource limits (README "Limits"): one argument per row of [`tether_core::config::LIMITS`],
/// with its flag, variable, help and earlier name all from the row. Built by hand rather than
/// derived so that a new limit is one row in the core and nothing here.
#[derive(Debug, Clone, Default)]
struct LimitArgs(LimitsLayer);

/// The hidden argument that reads a limit's earlier variable name.
fn earlier_id(key: &str) -> String {
    format!("earlier-{key}")
}

impl clap::FromArgMatches for LimitArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<LimitArgs, clap::Error> {
        let mut layer = LimitsLayer::default();
        for o in tether_core::config::LIMITS {
            // The current name wins over the earlier one when both are set.
            let value = m.get_one::<String>(o.key).or_else(|| {
                o.alias
                    .and_then(|_| m.get_one::<String>(earlier_id(o.key).as_str()))
            });
            if let Some(v) = value {
                layer.set_text(o.key, v.clone());
            }
        }
        Ok(LimitArgs(layer))
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = LimitArgs::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for LimitArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let mut cmd = cmd.next_help_heading("Limits");
        for o in tether_core::config::LIMITS {
            let mut arg = clap::Arg::new(o.key)
                .long(o.key)
                .env(o.env)
                .value_name(o.value)
                .help(o.help());
            if let (Some(alias), Some(env)) = (o.alias, o.alias_env()) {
                arg = arg.visible_alias(alias);
                cmd = cmd.arg(
                    clap::Arg::new(earlier_id(o.key))
                        .long(earlier_id(o.key))
                        .env(env)
                        .value_name(o.value)
                        .hide(true),
                );
            }
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        LimitArgs::augment_args(cmd)
    }
}

impl LimitArgs {
    fn layer(&self) -> Option<LimitsLayer> {
        (!self.0.is_empty()).then(|| self.0.clone())
    }
}

impl ServeArgs {
    fn layer(&self) -> Layer {
        let upstream = UpstreamLayer {
            name: self.upstream_name.clone(),
            command: (!self.command.is_empty()).then(|| self.command.clone()),
            url: self.upstream_url.clone(),
            env: None,
            cwd: None,
            inherit_env: self.upstream_inherit_env.then_some(true),
            pass_env: self.upstream_pass_env.clone(),
            require: self.require_upstream.then_some(true),
            protocol: self.upstream_protocol.clone(),
            headers: (!self.upstream_header.is_empty()).then(|| {
                self.upstream_header
                    .iter()
                    .map(|h| match h.split_once(':') {
                        Some((k, v)) => (k.trim().to_owned(), v.trim().to_owned()),
                        None => (h.trim().to_owned(), String::new()),
                    })
                    .collect()
            }),
        };
        Layer {
            servers: None,
            listen: self.listen.clone(),
            state_dir: self.state_dir.clone(),
            idle_timeout: self.idle_timeout.clone(),
            keepalive: self.keepalive.clone(),
            max_body: self.max_body.clone().map(SizeValue::Text),
            upstream_timeout: self.upstream_timeout.clone(),
            answer_window: self.answer_window.clone(),
            shutdown_grace: self.shutdown_grace.clone(),
            allowed_origins: self.allowed_origins.clone(),
            allowed_hosts: self.allowed_hosts.clone(),
            demo: self.demo.then_some(true),
            admin_listen: self.admin_listen.clone(),
            admin_token: self.admin_token.clone(),
            admin_token_file: self.admin_token_file.clone(),
            retention: self.retention.clone(),
            store: self.store.clone(),
            store_prefix: self.store_prefix.clone(),
            session_ttl: self.session_ttl.clone(),
            ledger: self.ledger.clone(),
            advertise_url: self.advertise_url.clone(),
            instance_ttl: self.instance_ttl.clone(),
            keys: None,
            upstream: Some(upstream),
            limits: self.limits.layer(),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__shim") {
        let rest = args
            .iter()
            .skip(2)
            .skip_while(|a| *a == "--")
            .cloned()
            .collect::<Vec<_>>();
        let code = tether_core::upstream::shim::run(&rest);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Connect(args) => connect(&args),
        Command::Check(args) => check(&args),
        Command::Sessions { admin, cmd } => cli::sessions(&admin, &cmd),
        Command::Stats { admin, since } => cli::stats(&admin, since.as_deref()),
        Command::Users { admin } => cli::users(&admin),
        Command::Clients { admin } => cli::clients(&admin),
        Command::Quotas { admin } => cli::quotas(&admin),
        Command::Servers { admin } => cli::servers(&admin),
        Command::Import(args) => import(&args),
        Command::Dashboard { admin } => cli::dashboard(&admin),
        Command::Health { admin } => cli::health(&admin),
        Command::Keys { cmd } => cli::keys(&cmd),
        Command::DemoServer(args) => demo::run(args),
        Command::Bench(args) => bench::run(&args),
        Command::Floor(args) => floor::run(&args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "tether", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { dir } => man(dir.as_deref()),
    }
}

/// What `--servers FILE` gives: every server of the file (each at its own endpoint, the
/// file reloaded on SIGHUP or change), or with `--server NAME` that one, served as the
/// gateway's only upstream (flags override its settings, as for `-- CMD`).
enum Servers {
    All(Vec<tether_core::servers::ServerEntry>),
    One(Box<tether_core::servers::ServerEntry>),
}

/// The `--servers` file read: the layer to resolve the gateway's config with, and the
/// servers; or every problem with the file.
fn servers_layer(
    text: &str,
    shown: &str,
    name: Option<&str>,
    flags: &Layer,
) -> Result<(Layer, Servers), Vec<String>> {
    // Stdio entries get the gateway's resolved environment policy after resolution.
    let file =
        tether_core::servers::parse(text, shown, &tether_core::upstream::EnvPolicy::Inherit)?;
    for note in &file.notes {
        eprintln!("tether: {note}");
    }
    if let Some(name) = name {
        let entry = file.pick(Some(name), shown).map_err(|e| vec![e])?;
        return Ok((entry.layer(), Servers::One(Box::new(entry.clone()))));
    }
    let Some(first) = file.servers.first() else {
        return Err(vec![format!("{shown}: no enabled server in it")]);
    };
    // Settings that belong to one upstream cannot apply to every server of the file.
    if let Some(up) = &flags.upstream {
        let per_upstream = [
            (
                "an upstream (-- CMD or --upstream-url)",
                up.command.is_some() || up.url.is_some(),
            ),
            ("--upstream-name", up.name.is_some()),
            ("--upstream-header", up.headers.is_some()),
            ("--upstream-protocol", up.protocol.is_some()),
        ];
        let given: Vec<&str> = per_upstream
            .iter()
            .filter(|(_, set)| *set)
            .map(|(n, _)| *n)
            .collect();
        if !given.is_empty() {
            return Err(vec![format!(
                "{shown}: serves every server of the file, so {} cannot apply; set them in the entries (or pick one server with --server NAME)",
                given.join(", ")
            )]);
        }
    }
    if flags.demo == Some(true) {
        return Err(vec![format!(
            "{shown}: --demo and --servers both name upstreams; give one"
        )]);
    }
    // Resolution needs an upstream: the first server's; the gateway serves them all.
    let layer = Layer {
        upstream: first.layer().upstream,
        ..Layer::default()
    };
    Ok((layer, Servers::All(file.servers)))
}

fn serve(args: &ServeArgs) -> ExitCode {
    // A file that does not parse is one problem among the others: the flags are still
    // checked, so every problem is reported in one run.
    let (file, file_error) = match &args.config {
        Some(path) => match Layer::from_file(path) {
            Ok(l) => (l, None),
            Err(e) => (Layer::default(), Some(e)),
        },
        None => (Layer::default(), None),
    };
    let exe = std::env::current_exe().ok();
    let demo_command = vec![
        exe.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "tether".into()),
        "demo-server".into(),
    ];
    let flags = args.layer();
    // The servers: a --servers file, else the config file's [servers.NAME] tables.
    let source = match (&args.servers, &file.servers, &args.config) {
        (Some(path), ..) => Some(ServersSource::Json(path.clone())),
        (None, Some(_), Some(config)) => Some(ServersSource::Toml(config.clone())),
        _ => None,
    };
    let read = |source: &ServersSource| -> Result<(String, String), Vec<String>> {
        let file_upstream = file
            .upstream
            .as_ref()
            .is_some_and(|u| u.command.is_some() || u.url.is_some())
            || file.demo == Some(true);
        if let ServersSource::Toml(path) = source
            && file_upstream
        {
            return Err(vec![format!(
                "config file {}: give [upstream] (one server) or [servers.NAME] tables (several), not both",
                path.display()
            )]);
        }
        source.load().map_err(|e| vec![e])
    };
    let (servers, chosen, servers_error) = match &source {
        Some(source) => match read(source)
            .and_then(|(text, shown)| servers_layer(&text, &shown, args.server.as_deref(), &flags))
        {
            Ok((l, chosen)) => (l, Some(chosen), Vec::new()),
            Err(e) => (Layer::default(), None, e),
        },
        None if args.server.is_some() => (
            Layer::default(),
            None,
            vec!["--server NAME picks a server of --servers FILE (or of the config's [servers] tables); neither is given".to_owned()],
        ),
        None => (Layer::default(), None, Vec::new()),
    };
    let resolved = Config::resolve(file.overlay(servers).overlay(flags), demo_command);
    let file_errors: Vec<String> = file_error.into_iter().chain(servers_error).collect();
    let mut config = match (resolved, file_errors.is_empty()) {
        (Ok(c), true) => c,
        (result, _) => {
            let mut errors = file_errors;
            // Without the file, "no upstream given" may only mean the file named it.
            let skip_upstream = !errors.is_empty();
            errors.extend(
                result
                    .err()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|e| !(skip_upstream && e.starts_with("upstream: none given"))),
            );
            eprintln!("tether: invalid configuration:");
            for e in errors {
                let mut lines = e.lines();
                eprintln!("  - {}", lines.next().unwrap_or_default());
                for l in lines {
                    eprintln!("    {l}");
                }
            }
            return ExitCode::from(2);
        }
    };
    match chosen {
        Some(Servers::All(mut entries)) => {
            for e in &mut entries {
                if let tether_core::upstream::UpstreamSpec::Stdio { env_policy, .. } =
                    &mut e.upstream
                {
                    *env_policy = config.env_policy.clone();
                }
            }
            config.servers = entries;
            config.servers_source = source;
        }
        Some(Servers::One(entry)) => {
            // Served as the only upstream: the resolved one (flags applied), with the
            // entry's users.
            config.servers = vec![tether_core::servers::ServerEntry {
                name: config.upstream_name.clone(),
                upstream: config.upstream.clone(),
                settings: tether_core::servers::ServerSettings {
                    users: entry.settings.users,
                    ..Default::default()
                },
            }];
        }
        None => {}
    }
    // Keys live only in the config file: it is re-read for them on SIGHUP and when it
    // changes (`tether keys revoke` takes effect without a restart).
    config.keys_file = args.config.clone();
    let server_names: Vec<String> = if config.servers_source.is_some() {
        config.servers.iter().map(|e| e.name.clone()).collect()
    } else {
        Vec::new()
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tether: invalid --log filter {:?}: {e}", args.log);
            return ExitCode::from(2);
        }
    };
    let telemetry = match init_logging(
        filter,
        args.log_format,
        std::io::stderr,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        args.otlp_endpoint.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tether: --otlp-endpoint: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(endpoint) = &args.otlp_endpoint {
        tracing::info!(endpoint = %endpoint, "exporting traces over OTLP/HTTP");
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = runtime.block_on(tether_core::app::run(
        config,
        exe,
        shutdown_signal(),
        |addr, admin| {
            // Scripts and tests wait for these lines to learn the bound ports.
            for name in &server_names {
                println!("tether: server {name} on http://{addr}/servers/{name}/mcp");
            }
            println!("tether: admin on http://{admin}/");
            println!("tether: listening on http://{addr}/mcp");
        },
    ));
    drop(runtime);
    if let Some(t) = telemetry {
        t.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Man pages generated from the CLI definition, so they never drift from `--help`.
fn man(dir: Option<&std::path::Path>) -> ExitCode {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let result = match dir {
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
        Some(dir) => std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(cmd, dir)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: cannot write man pages: {e}");
            ExitCode::FAILURE
        }
    }
}

fn duration_arg(name: &str, text: &str) -> Result<std::time::Duration, ExitCode> {
    humantime::parse_duration(text).map_err(|e| {
        eprintln!("tether: --{name}: {text:?} is not a duration like 30s ({e})");
        ExitCode::from(2)
    })
}

fn connect(args: &ConnectArgs) -> ExitCode {
    let parsed = (|| {
        Ok::<_, ExitCode>((
            duration_arg("timeout", &args.timeout)?,
            duration_arg("max-outage", &args.max_outage)?,
            duration_arg("retry-base", &args.retry_base)?,
            duration_arg("first-contact", &args.first_contact)?,
            args.heartbeat
                .as_deref()
                .map(|h| duration_arg("heartbeat", h))
                .transpose()?,
        ))
    })();
    let (timeout, max_outage, retry_base, first_contact, heartbeat) = match parsed {
        Ok(v) => v,
        Err(code) => return code,
    };
    let url = match &args.server {
        None => args.url.clone(),
        Some(name) if tether_core::servers::valid_name(name) => server_url(&args.url, name),
        Some(name) => {
            eprintln!("tether: --server {name:?} is not a server name (letters, digits, - _ .)");
            return ExitCode::from(2);
        }
    };
    let headers = match args.remote.prepare(&url) {
        Ok(h) => h,
        Err(code) => return code,
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tether: invalid --log filter {:?}: {e}", args.log);
            return ExitCode::from(2);
        }
    };
    // stdout is the protocol channel: logs go to stderr or a file, never stdout.
    match &args.log_file {
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => {
                let _ = init_logging(
                    filter,
                    args.log_format,
                    std::sync::Mutex::new(file),
                    false,
                    None,
                );
            }
            Err(e) => {
                eprintln!("tether: cannot open log file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => {
            let _ = init_logging(filter, args.log_format, std::io::stderr, false, None);
        }
    }
    let opts = tether_core::connect::ConnectOptions {
        url,
        headers,
        timeout,
        max_outage,
        first_contact,
        backoff: tether_core::policy::Backoff {
            base: retry_base,
            max: std::time::Duration::from_secs(30),
        },
        heartbeat,
        ca_file: args.remote.ca_file.clone(),
        max_message: 64 * 1024 * 1024,
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(tether_core::connect::run(
        opts,
        tokio::io::stdin(),
        tokio::io::stdout(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let timeout = match duration_arg("timeout", &args.timeout) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let headers = match args.remote.prepare(&args.url) {
        Ok(h) => h,
        Err(code) => return code,
    };
    let client = match tether_core::connect::http_client(args.remote.ca_file.as_deref(), timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let report = runtime.block_on(tether_core::check::run(client, &args.url, headers, timeout));
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print!("{}", report.render());
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler can be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn a_servers_url_is_built_from_any_gateway_address() {
        for base in [
            "http://gw:7450",
            "http://gw:7450/",
            "http://gw:7450/mcp",
            "http://gw:7450/servers/other/mcp",
        ] {
            assert_eq!(
                server_url(base, "files"),
                "http://gw:7450/servers/files/mcp"
            );
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/tether.toml");
        let layer = Layer::from_file(std::path::Path::new(path)).expect("example config parses");
        let c = Config::resolve(layer, vec!["x".into()]).expect("example config is valid");
        let d = Config::resolve(
            Layer {
                demo: Some(true),
                ..Layer::default()
            },
            vec!["x".into()],
        )
        .unwrap();
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.idle_timeout, d.idle_timeout);
        assert_eq!(c.keepalive, d.keepalive);
        assert_eq!(c.max_body, d.max_body);
        assert_eq!(c.upstream_timeout, d.upstream_timeout);
        assert_eq!(c.answer_window, d.answer_window);
        assert_eq!(c.shutdown_grace, d.shutdown_grace);
        assert_eq!(c.admin_listen, d.admin_listen);
        assert_eq!(c.retention, d.retention);
        assert_eq!(c.store, d.store);
        assert_eq!(c.ledger, d.ledger);
        assert_eq!(c.limits, d.limits);
        assert!(c.keys.is_empty() && c.admin_token.is_none());
        assert_eq!(tether_core::config::DEFAULT_LISTEN, "127.0.0.1:7450");
    }
}
