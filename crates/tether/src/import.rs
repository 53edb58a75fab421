//! `tether import`: a client's `mcpServers` file becomes the gateway's servers file, and
//! the client's file is printed pointing at the gateway.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Args)]
pub(crate) struct ImportArgs {
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

/// `tether import`: the gateway's servers file to --out, the client's new file to stdout,
/// what changed to stderr.
pub(crate) fn run(args: &ImportArgs) -> ExitCode {
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
