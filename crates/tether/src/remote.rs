//! What the commands that talk to a remote MCP endpoint share: headers, a bearer token
//! from a variable, a CA file, and the address of one server of a gateway.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

/// Options shared by the commands that talk to a remote MCP endpoint.
#[derive(Args)]
pub(crate) struct RemoteArgs {
    /// Extra request header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    pub(crate) headers: Vec<String>,
    /// Environment variable holding a bearer token, sent as `Authorization: Bearer ...`.
    #[arg(long, value_name = "VAR")]
    pub(crate) bearer_env: Option<String>,
    /// PEM file of a CA to trust besides the system roots.
    #[arg(long, value_name = "FILE")]
    pub(crate) ca_file: Option<PathBuf>,
}

impl RemoteArgs {
    /// Checks the URL and builds the headers, or says what is wrong (exit code 2).
    pub(crate) fn prepare(&self, url: &str) -> Result<tether_core::connect::HeaderMap, ExitCode> {
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

/// The endpoint of server `name` of the gateway at `base` (its address, or any of its
/// endpoints: `/mcp` and a `/servers/OTHER/mcp` are replaced).
pub(crate) fn server_url(base: &str, name: &str) -> String {
    let mut root = base.trim_end_matches('/');
    root = root.strip_suffix("/mcp").unwrap_or(root);
    if let Some(i) = root.find("/servers/") {
        root = &root[..i];
    }
    format!("{root}/servers/{name}/mcp")
}

/// A duration flag, or exit code 2 having said why it is not one.
pub(crate) fn duration_arg(name: &str, text: &str) -> Result<std::time::Duration, ExitCode> {
    humantime::parse_duration(text).map_err(|e| {
        eprintln!("tether: --{name}: {text:?} is not a duration like 30s ({e})");
        ExitCode::from(2)
    })
}
