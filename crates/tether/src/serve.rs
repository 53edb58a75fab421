//! `tether serve`: its arguments, what they resolve to (over the config file, a servers
//! file and `TETHER_*` variables), and the run until SIGTERM. [`prepare`] is also what a
//! test uses to run a gateway in its own process from the same arguments.
//!
//! Must not: contain gateway logic; flags become a `config::Layer`, nothing more.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, FromArgMatches as _};
use std::collections::BTreeMap;

use tether_core::config::{
    Config, Kind, LIMITS, Layer, LimitsLayer, OPTIONS, OptValue, Place, ServersSource,
    UpstreamLayer,
};

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
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    options: OptionArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// The stdio MCP server to run per session, given after `--` (no shell involved).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Every option but the limits: one argument per row of [`tether_core::config::OPTIONS`],
/// with its flag, variable, kind, help and default all from the row; built by hand for the
/// same reason as [`LimitArgs`].
#[derive(Debug, Clone, Default)]
struct OptionArgs(BTreeMap<&'static str, OptValue>);

impl clap::FromArgMatches for OptionArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<OptionArgs, clap::Error> {
        let mut set = BTreeMap::new();
        for o in OPTIONS {
            let value = match o.kind {
                Kind::Switch => m.get_flag(o.key).then_some(OptValue::Switch(true)),
                Kind::List | Kind::Lines => m
                    .get_many::<String>(o.key)
                    .map(|v| OptValue::List(v.cloned().collect())),
                Kind::One | Kind::Secret | Kind::Choice(_) => {
                    m.get_one::<String>(o.key).cloned().map(OptValue::Text)
                }
            };
            if let Some(v) = value {
                set.insert(o.key, v);
            }
        }
        Ok(OptionArgs(set))
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = OptionArgs::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for OptionArgs {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        use clap::ArgAction;
        for o in OPTIONS {
            let arg = clap::Arg::new(o.key).long(o.key).env(o.env).help(o.help());
            let value_name = o.value.replace("\\|", "|");
            cmd = cmd.arg(match o.kind {
                Kind::One => arg.value_name(value_name),
                Kind::Secret => arg.value_name(value_name).hide_env_values(true),
                Kind::Choice(values) => arg
                    .value_name(value_name)
                    .value_parser(clap::builder::PossibleValuesParser::new(values.iter())),
                Kind::Switch => arg
                    .action(ArgAction::SetTrue)
                    .value_parser(clap::builder::BoolishValueParser::new()),
                Kind::List => arg
                    .value_name(value_name)
                    .value_delimiter(',')
                    .action(ArgAction::Append),
                Kind::Lines => arg
                    .value_name(value_name)
                    .value_delimiter('\n')
                    .action(ArgAction::Append)
                    .hide_env_values(true),
            });
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        OptionArgs::augment_args(cmd)
    }
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
        for o in LIMITS {
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
        for o in LIMITS {
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
    /// The value of an option of the command line only, as text.
    fn cli(&self, key: &str) -> Option<String> {
        match self.options.0.get(key)? {
            OptValue::Text(t) => Some(t.clone()),
            _ => None,
        }
    }

    fn config(&self) -> Option<PathBuf> {
        self.cli("config").map(PathBuf::from)
    }

    fn servers(&self) -> Option<PathBuf> {
        self.cli("servers").map(PathBuf::from)
    }

    fn server(&self) -> Option<String> {
        self.cli("server")
    }

    fn otlp_endpoint(&self) -> Option<String> {
        self.cli("otlp-endpoint")
    }

    /// The log filter (`--log`, tracing's EnvFilter syntax).
    pub fn log_filter(&self) -> String {
        self.cli("log").unwrap_or_else(|| "info".to_owned())
    }

    /// The log line format (`--log-format`).
    pub fn log_format(&self) -> LogFormat {
        match self.cli("log-format").as_deref() {
            Some("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }

    /// The flags as a layer: each row's value where the row says the file holds it.
    fn layer(&self) -> Layer {
        let mut layer = Layer::default();
        let mut up = UpstreamLayer {
            command: (!self.command.is_empty()).then(|| self.command.clone()),
            ..UpstreamLayer::default()
        };
        for (key, value) in &self.options.0 {
            let Some(row) = tether_core::config::option(key) else {
                continue;
            };
            let text = || match value {
                OptValue::Text(t) => Some(t.clone()),
                _ => None,
            };
            let list = || match value {
                OptValue::List(l) => Some(l.clone()),
                _ => None,
            };
            match row.place {
                Place::Top => {
                    layer.settings.set(key, value.clone());
                }
                Place::Upstream(_) => match *key {
                    "upstream-url" => up.url = text(),
                    "upstream-name" => up.name = text(),
                    "upstream-protocol" => up.protocol = text(),
                    "upstream-pass-env" => up.pass_env = list(),
                    "upstream-inherit-env" => up.inherit_env = Some(true),
                    "require-upstream" => up.require = Some(true),
                    "upstream-header" => {
                        up.headers = list().map(|headers| {
                            headers
                                .iter()
                                .map(|h| match h.split_once(':') {
                                    Some((k, v)) => (k.trim().to_owned(), v.trim().to_owned()),
                                    None => (h.trim().to_owned(), String::new()),
                                })
                                .collect()
                        });
                    }
                    other => unreachable!("no [upstream] key for --{other}"),
                },
                Place::Cli | Place::Limits => {}
            }
        }
        layer.upstream = Some(up);
        layer.limits = self.limits.layer();
        layer
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
    if flags.settings.switch("demo") == Some(true) {
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
    let (file, file_error) = match &args.config() {
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
    let source = match (&args.servers(), &file.servers, &args.config()) {
        (Some(path), ..) => Some(ServersSource::Json(path.clone())),
        (None, Some(_), Some(config)) => Some(ServersSource::Toml(config.clone())),
        _ => None,
    };
    let read = |source: &ServersSource| -> Result<(String, String), Vec<String>> {
        let file_upstream = file
            .upstream
            .as_ref()
            .is_some_and(|u| u.command.is_some() || u.url.is_some())
            || file.settings.switch("demo") == Some(true);
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
            .and_then(|(text, shown)| servers_layer(&text, &shown, args.server().as_deref(), &flags, &mut notes))
        {
            Ok((l, chosen)) => (l, Some(chosen), Vec::new()),
            Err(e) => (Layer::default(), None, e),
        },
        None if args.server().is_some() => (
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
    config.keys_file = args.config();
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
    let filter = match tracing_subscriber::EnvFilter::try_new(args.log_filter()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tether: invalid --log filter {:?}: {e}", args.log_filter());
            return ExitCode::from(2);
        }
    };
    let telemetry = match logging::init(
        filter,
        args.log_format(),
        std::io::stderr,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        args.otlp_endpoint().as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tether: --otlp-endpoint: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(endpoint) = &args.otlp_endpoint() {
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
