//! `tether`: the command line. One file per command: `serve` (in the library, shared with
//! the tests), `connect.rs`, `check.rs`, `import.rs`, `cli.rs` (the admin API's commands),
//! `bench.rs`, `floor.rs`, `demo.rs`; the hidden `__shim` supervises stdio children (see
//! `tether_core::upstream::shim`).
//!
//! Must not: contain gateway logic; flags become a `config::Layer`, nothing more.

mod bench;
mod check;
mod cli;
mod connect;
mod demo;
mod floor;
mod import;
mod remote;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether::serve::ServeArgs;

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
    Connect(Box<connect::ConnectArgs>),
    /// Test an MCP endpoint and explain what is wrong with it.
    Check(check::CheckArgs),
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
    /// Durable tasks (both eras), newest first: user, server, tool, status, age, the
    /// instance that runs it, and whether a restart re-issues it (`GET /api/tasks`).
    Tasks {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        filter: cli::TaskFilter,
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
    Import(import::ImportArgs),
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
        Command::Serve(args) => tether::serve::run(&args),
        Command::Connect(args) => connect::run(&args),
        Command::Check(args) => check::run(&args),
        Command::Sessions { admin, cmd } => cli::sessions(&admin, &cmd),
        Command::Stats { admin, since } => cli::stats(&admin, since.as_deref()),
        Command::Users { admin } => cli::users(&admin),
        Command::Clients { admin } => cli::clients(&admin),
        Command::Tasks { admin, filter } => cli::tasks(&admin, &filter),
        Command::Quotas { admin } => cli::quotas(&admin),
        Command::Servers { admin } => cli::servers(&admin),
        Command::Import(args) => import::run(&args),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use remote::server_url;
    use tether_core::config::{Config, Layer};

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
        let d = Config::resolve(Layer::default().with("demo", true), vec!["x".into()]).unwrap();
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
