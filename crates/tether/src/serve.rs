//! `tether serve`: its arguments, what they resolve to (over the config file, a servers
//! file and `TETHER_*` variables), and the run until SIGTERM. [`prepare`] is also what a
//! test uses to run a gateway in its own process from the same arguments.
//!
//! Must not: contain gateway logic; flags become a `config::Layer`, nothing more.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, FromArgMatches as _};
use tether_core::config::{Config, Layer, LimitsLayer, ServersSource, SizeValue, UpstreamLayer};

use crate::logging::{self, LogFormat};

/// Parses `tether serve`'s arguments (without the program name and `serve`) as the
/// command line does, `TETHER_*` variables included.
pub fn parse_args<I, T>(args: I) -> Result<ServeArgs, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cmd = ServeArgs::augment_args(clap::Command::new("serve").no_binary_name(true));
    ServeArgs::from_arg_matches(&cmd.try_get_matches_from(args)?)
}

/// `tether serve`'s arguments.
#[derive(Args)]
pub struct ServeArgs {
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
    /// The log filter (`--log`, tracing's EnvFilter syntax).
    pub fn log_filter(&self) -> &str {
        &self.log
    }

    /// The log line format (`--log-format`).
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }

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
    notes: &mut Vec<String>,
) -> Result<(Layer, Servers), Vec<String>> {
    // Stdio entries get the gateway's resolved environment policy after resolution.
    let file =
        tether_core::servers::parse(text, shown, &tether_core::upstream::EnvPolicy::Inherit)?;
    notes.extend(file.notes.iter().cloned());
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

/// What `tether serve`'s arguments resolve to, before anything is started.
pub struct Prepared {
    /// The gateway's configuration.
    pub config: Config,
    /// The servers of a servers file, each announced at its own endpoint once listening.
    pub server_names: Vec<String>,
    /// What the servers file's reader had to say (entries skipped, names changed), to be
    /// shown before the gateway starts.
    pub notes: Vec<String>,
}

/// Resolves `args` (over the config file, the servers file and `TETHER_*` variables) into
/// the gateway's configuration; `exe` is the `tether` executable that runs the bundled
/// demo server. On failure, every problem found, one per entry.
pub fn prepare(args: &ServeArgs, exe: Option<&Path>) -> Result<Prepared, Vec<String>> {
    // A file that does not parse is one problem among the others: the flags are still
    // checked, so every problem is reported in one run.
    let (file, file_error) = match &args.config {
        Some(path) => match Layer::from_file(path) {
            Ok(l) => (l, None),
            Err(e) => (Layer::default(), Some(e)),
        },
        None => (Layer::default(), None),
    };
    let demo_command = vec![
        exe.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "tether".into()),
        "demo-server".into(),
    ];
    let flags = args.layer();
    let mut notes = Vec::new();
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
            .and_then(|(text, shown)| servers_layer(&text, &shown, args.server.as_deref(), &flags, &mut notes))
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
            return Err(errors);
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
    Ok(Prepared {
        config,
        server_names,
        notes,
    })
}

/// `tether serve`: prepares the configuration, installs logging and runs the gateway until
/// SIGTERM or SIGINT.
pub fn run(args: &ServeArgs) -> ExitCode {
    let exe = std::env::current_exe().ok();
    let Prepared {
        config,
        server_names,
        notes,
    } = match prepare(args, exe.as_deref()) {
        Ok(p) => p,
        Err(errors) => {
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
    for note in &notes {
        eprintln!("tether: {note}");
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tether: invalid --log filter {:?}: {e}", args.log);
            return ExitCode::from(2);
        }
    };
    let telemetry = match logging::init(
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
    let runtime = match crate::runtime() {
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

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler can be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
