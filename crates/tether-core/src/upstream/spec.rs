//! What an upstream is, as the session layer and the connector use it: a stdio command
//! (with the environment it may see) or an HTTP endpoint (with the era spoken to it).
//! Configuration builds these; the upstream layer only reads them.
//!
//! Must not: read files or the environment (the caller hands in what it read).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Environment variables a stdio upstream gets from the gateway's environment by default.
pub const DEFAULT_PASS_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "TERM",
    "SYSTEMROOT",
];

/// Where the gateway's upstream MCP server is.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamSpec {
    /// A child process per session speaking JSON-RPC over stdio.
    Stdio {
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment variables.
        env: BTreeMap<String, String>,
        /// Working directory.
        cwd: Option<PathBuf>,
        /// Which of the gateway's own variables the child sees.
        env_policy: EnvPolicy,
    },
    /// A Streamable HTTP MCP endpoint, one upstream session per client session.
    Http {
        /// The endpoint URL.
        url: String,
        /// Which era of the protocol to speak to it.
        protocol: UpstreamProtocol,
        /// Headers sent with every request to it (credentials, as `mcpServers` files
        /// give them).
        headers: Vec<(String, String)>,
    },
}

/// The protocol era the gateway speaks to an HTTP upstream (`--upstream-protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// Ask the server once (`server/discover`): 2026-07-28 when it lists that version,
    /// else the legacy protocol with sessions.
    #[default]
    Auto,
    /// Sessions (`initialize`, `Mcp-Session-Id`), 2024-11-05 to 2025-11-25.
    Legacy,
    /// Stateless 2026-07-28: every request self-contained.
    Modern,
}

impl UpstreamProtocol {
    /// Parses the option's value.
    pub fn parse(text: &str) -> Option<UpstreamProtocol> {
        match text {
            "auto" => Some(UpstreamProtocol::Auto),
            "legacy" => Some(UpstreamProtocol::Legacy),
            "modern" | "2026-07-28" => Some(UpstreamProtocol::Modern),
            _ => None,
        }
    }
}

impl UpstreamSpec {
    /// What the upstream is, for the start-up log: the program and how many arguments it
    /// gets (arguments can hold secrets), or the URL without credentials or query.
    pub fn describe(&self) -> String {
        match self {
            UpstreamSpec::Stdio { argv, .. } => {
                format!("stdio {} ({} args)", argv[0], argv.len() - 1)
            }
            UpstreamSpec::Http { url, .. } => match reqwest::Url::parse(url) {
                Ok(mut u) => {
                    let _ = u.set_username("");
                    let _ = u.set_password(None);
                    u.set_query(None);
                    u.to_string()
                }
                Err(_) => "http (unparsable URL)".to_owned(),
            },
        }
    }

    /// The name an upstream gets when none is configured: what a person would call it.
    /// For a launcher (`npx`, `uvx`, `node`, `python`, ...) that is the package or script
    /// it runs, without scope, version or extension; otherwise the program's file name.
    /// For a URL, its host and path (`127.0.0.1-mcp`). Characters a name may not hold
    /// become `-`.
    pub fn default_name(&self) -> String {
        const LAUNCHERS: &[&str] = &[
            "npx", "bunx", "pnpx", "uvx", "uv", "node", "bun", "deno", "python", "python3", "pipx",
            "docker", "podman",
        ];
        let base = |p: &str| {
            Path::new(p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let raw = match self {
            UpstreamSpec::Stdio { argv, .. } => {
                let program = base(&argv[0]);
                let target = LAUNCHERS
                    .contains(&program.as_str())
                    .then(|| {
                        argv[1..].iter().find(|a| {
                            !a.starts_with('-')
                                && !["run", "exec", "tool", "x"].contains(&a.as_str())
                        })
                    })
                    .flatten();
                match target {
                    Some(t) => {
                        // @scope/pkg@1.2 → pkg; server.py → server; ghcr.io/a/b:tag → b
                        let t = t.rsplit('/').next().unwrap_or(t);
                        let t = t.split(['@', ':']).find(|p| !p.is_empty()).unwrap_or(t);
                        let t = [".py", ".js", ".mjs", ".cjs", ".ts"]
                            .iter()
                            .find_map(|ext| t.strip_suffix(ext))
                            .unwrap_or(t);
                        t.to_owned()
                    }
                    None => program,
                }
            }
            UpstreamSpec::Http { url, .. } => match reqwest::Url::parse(url) {
                Ok(u) => {
                    let host = u.host_str().unwrap_or("http").to_owned();
                    let path = u.path().trim_matches('/').replace('/', "-");
                    if path.is_empty() {
                        host
                    } else {
                        format!("{host}-{path}")
                    }
                }
                Err(_) => "http".to_owned(),
            },
        };
        let name: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        if name.is_empty() {
            "upstream".to_owned()
        } else {
            name
        }
    }

    /// A short fingerprint of what this upstream runs: the argv and working directory of a
    /// stdio command, or the URL. Sessions record it so a session is never resumed against
    /// a different server (two gateways on one state dir, or a changed command).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        match self {
            UpstreamSpec::Stdio { argv, cwd, .. } => {
                h.update(b"stdio\0");
                for a in argv {
                    h.update(a.as_bytes());
                    h.update(b"\0");
                }
                if let Some(dir) = cwd {
                    h.update(dir.to_string_lossy().as_bytes());
                }
            }
            UpstreamSpec::Http { url, .. } => {
                h.update(b"http\0");
                h.update(url.as_bytes());
            }
        }
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Which of the gateway's environment variables a stdio upstream inherits. `TETHER_*`
/// never does: it holds the admin token and store URLs with passwords.
#[derive(Debug, Clone, PartialEq)]
pub enum EnvPolicy {
    /// Only these names (the defaults in [`DEFAULT_PASS_ENV`] plus `pass-env`).
    Allow(Vec<String>),
    /// Everything but `TETHER_*`.
    Inherit,
}

impl EnvPolicy {
    /// The variables a child gets from `vars` (the gateway's environment).
    pub fn filter(
        &self,
        vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        vars.filter(|(k, _)| {
            let name = k.to_string_lossy();
            if name.starts_with("TETHER_") {
                return false;
            }
            match self {
                EnvPolicy::Inherit => true,
                EnvPolicy::Allow(names) => names.iter().any(|n| *n == name),
            }
        })
        .collect()
    }
}

impl Default for EnvPolicy {
    fn default() -> EnvPolicy {
        EnvPolicy::Allow(DEFAULT_PASS_ENV.iter().map(|s| (*s).to_owned()).collect())
    }
}
