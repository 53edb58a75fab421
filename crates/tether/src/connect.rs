//! `tether connect`: a stdio MCP server that relays to a remote endpoint and survives its
//! restarts (`tether_core::connect`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tether::logging::{self, LogFormat};

use crate::remote::{RemoteArgs, duration_arg, server_url};

#[derive(Args)]
pub(crate) struct ConnectArgs {
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

/// Runs `tether connect` until its client closes stdin.
pub(crate) fn run(args: &ConnectArgs) -> ExitCode {
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
                let _ = logging::init(
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
            let _ = logging::init(filter, args.log_format, std::io::stderr, false, None);
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
    let runtime = match tether::runtime() {
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
