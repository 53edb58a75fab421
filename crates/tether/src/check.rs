//! `tether check`: tests an MCP endpoint and explains what is wrong with it.

use std::process::ExitCode;

use clap::Args;

use crate::remote::{RemoteArgs, duration_arg};

#[derive(Args)]
pub(crate) struct CheckArgs {
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

/// Runs `tether check` and exits by its verdict.
pub(crate) fn run(args: &CheckArgs) -> ExitCode {
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
    let runtime = match tether::runtime() {
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
