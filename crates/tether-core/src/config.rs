//! Configuration: one TOML file, `TETHER_*` environment variables and command-line flags.
//!
//! The file and the command line (which clap already merges with the environment) are each
//! read into a [`Layer`] of optional values; [`Config::resolve`] lays the command line over
//! the file over the defaults and reports every problem at once, before anything binds.
//!
//! Must not: do I/O beyond reading the file, or accept a value it cannot use (every problem is reported, all at once).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default MCP listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7450";
/// Default admin listener (health, metrics, API, dashboard).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7451";
/// Default ledger retention.
pub const DEFAULT_RETENTION: &str = "30d";
/// Defaults as the strings a user would write, so the example config and `--help` agree.
pub const DEFAULT_IDLE_TIMEOUT: &str = "30m";
/// Default interval between SSE keepalive comments.
pub const DEFAULT_KEEPALIVE: &str = "15s";
/// Default request body limit.
pub const DEFAULT_MAX_BODY: &str = "4MiB";
/// Default time an upstream has to answer one request.
pub const DEFAULT_UPSTREAM_TIMEOUT: &str = "5m";
/// Default answer window (ms): a call answered within it needs no stream.
pub const DEFAULT_ANSWER_WINDOW_MS: u64 = 10;
/// Default time in-flight requests get to finish on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "10s";
/// Default sliding TTL of session records in Redis.
pub const DEFAULT_SESSION_TTL: &str = "24h";
/// Default key prefix in Redis.
pub const DEFAULT_STORE_PREFIX: &str = "tether";
/// Default lifetime of an instance's heartbeat in Redis: how long after a SIGKILL its
/// sessions move to other instances.
pub const DEFAULT_INSTANCE_TTL: &str = "5s";

/// Default time a client has to send its request headers (also how long an idle
/// keep-alive connection is kept).
pub const DEFAULT_HEADER_TIMEOUT: &str = "10s";
/// Default time a client has to send a request body once its headers arrived.
pub const DEFAULT_BODY_TIMEOUT: &str = "30s";
/// Default time a connection may refuse to take bytes we have to write before it is cut.
pub const DEFAULT_WRITE_TIMEOUT: &str = "30s";
/// Default bytes buffered in memory per response stream for a client that reads slowly.
pub const DEFAULT_STREAM_BUFFER: &str = "4MiB";
/// Default wait before a broken upstream (circuit open) is tried again.
pub const DEFAULT_CIRCUIT_COOLDOWN: &str = "10s";
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

/// A size written either as bytes (`4194304`) or with a unit (`"4MiB"`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SizeValue {
    /// Plain bytes.
    Bytes(u64),
    /// A string such as `4MiB` or `512 KB`.
    Text(String),
}

/// One layer of settings; `None` means "not set here".
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Layer {
    /// Address of the MCP listener; the endpoint is `/mcp`.
    pub listen: Option<String>,
    /// Directory holding the SQLite store.
    pub state_dir: Option<PathBuf>,
    /// Idle time after which a session expires (humantime, e.g. `30m`).
    pub idle_timeout: Option<String>,
    /// Interval between SSE keepalive comments.
    pub keepalive: Option<String>,
    /// Largest accepted request body.
    pub max_body: Option<SizeValue>,
    /// Time an upstream has to answer one request.
    pub upstream_timeout: Option<String>,
    /// A call answered within this time is answered as one JSON body, nothing of it
    /// stored; a longer one gets a durable, resumable SSE stream (`0` for always).
    pub answer_window: Option<String>,
    /// Time in-flight requests get to finish on SIGTERM/SIGINT.
    pub shutdown_grace: Option<String>,
    /// Origins allowed besides loopback ones (`*` allows any).
    pub allowed_origins: Option<Vec<String>>,
    /// `Host` names allowed besides loopback ones (`*` allows any).
    pub allowed_hosts: Option<Vec<String>>,
    /// Run the bundled demo MCP server as the upstream.
    pub demo: Option<bool>,
    /// Address of the admin listener.
    pub admin_listen: Option<String>,
    /// Token required by the admin API when its listener is not on loopback.
    pub admin_token: Option<String>,
    /// File holding the admin token (first line), instead of the token itself.
    pub admin_token_file: Option<PathBuf>,
    /// How long closed sessions and tool calls stay in the ledger.
    pub retention: Option<String>,
    /// API keys (hashes) and the users they belong to.
    pub keys: Option<Vec<crate::auth::KeyEntry>>,
    /// The upstream MCP server.
    pub upstream: Option<UpstreamLayer>,
    /// Live session state: `sqlite` (default, in the state dir) or `redis://` / `rediss://`.
    pub store: Option<String>,
    /// Prefix of every Redis key.
    pub store_prefix: Option<String>,
    /// Sliding TTL of session records in Redis.
    pub session_ttl: Option<String>,
    /// Session history: `sqlite` (default) or `postgres://`.
    pub ledger: Option<String>,
    /// URL at which other instances reach this one's MCP listener (multi-instance).
    pub advertise_url: Option<String>,
    /// Heartbeat lifetime of an instance in Redis.
    pub instance_ttl: Option<String>,
    /// Resource limits (the `[limits]` table).
    pub limits: Option<LimitsLayer>,
    /// Several servers, each at `/servers/NAME/mcp` (the `[servers.NAME]` tables): the keys
    /// of an `mcpServers` entry (`command`, `args`, `env`, `cwd`, `url`, `headers`, `type`,
    /// a `tether` table), read by [`crate::servers::parse`]. `--servers FILE` replaces them.
    pub servers: Option<BTreeMap<String, serde_json::Value>>,
}

/// The `[limits]` table: every bound the gateway keeps on connections, sessions, upstreams
/// and buffers. Flags and `TETHER_*` variables of the same names override it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsLayer {
    /// Time a client has to send its request headers; an idle keep-alive connection is
    /// closed after the same time.
    pub header_timeout: Option<String>,
    /// Time a client has to send a request body.
    pub body_timeout: Option<String>,
    /// Time a connection may refuse our writes (a client that does not read) before it is cut.
    pub write_timeout: Option<String>,
    /// Open connections on the MCP listener.
    pub max_connections: Option<usize>,
    /// Open connections on the MCP listener from one client address.
    pub max_connections_per_addr: Option<usize>,
    /// Open connections on the admin listener (its own budget).
    pub admin_max_connections: Option<usize>,
    /// Sessions held by this process.
    pub max_sessions: Option<usize>,
    /// Sessions held by this process for one authenticated principal.
    pub max_sessions_per_principal: Option<usize>,
    /// Running upstreams (stdio children or HTTP upstream sessions).
    pub max_upstreams: Option<usize>,
    /// New sessions per second per principal and per client address.
    pub session_rate: Option<u32>,
    /// Burst of new sessions allowed above the rate.
    pub session_burst: Option<u32>,
    /// Largest message accepted from an upstream.
    pub max_upstream_message: Option<SizeValue>,
    /// Bytes buffered in memory per response stream for a client that reads slowly.
    pub stream_buffer: Option<SizeValue>,
    /// Events kept in the log per stream for `Last-Event-ID` (older ones are dropped).
    pub max_stream_events: Option<u64>,
    /// Upstream stderr lines logged per second per upstream (the rest are counted).
    pub stderr_lines_per_sec: Option<u32>,
    /// Consecutive upstream start failures (across sessions) that open the circuit.
    pub circuit_failures: Option<u32>,
    /// How long an open circuit refuses new upstream starts before one is tried again.
    pub circuit_cooldown: Option<String>,
    /// Upstream sessions the 2026-07-28 bridge holds per user and client-capability set.
    pub bridge_pool_size: Option<usize>,
    /// Tool calls each user may make per window, as `N/WINDOW` (`1000/1d`).
    pub quota_tool_calls: Option<String>,
    /// Largest `initialize` params a session may store (replayed to every fresh upstream); larger ones are refused with `-32602`.
    pub max_initialize: Option<SizeValue>,
    /// Resource subscriptions one session may hold (and 256 bytes of URIs each on average).
    pub max_subscriptions: Option<usize>,
    /// Resource subscriptions all sessions of one user may hold together.
    pub max_subscriptions_per_principal: Option<usize>,
    /// Bytes of stream events kept per session for `Last-Event-ID` (SQLite), the oldest dropped past it.
    pub max_session_log: Option<SizeValue>,
}

impl LimitsLayer {
    fn overlay(self, over: LimitsLayer) -> LimitsLayer {
        macro_rules! pick {
            ($($f:ident),*) => { LimitsLayer { $($f: over.$f.or(self.$f)),* } };
        }
        pick!(
            header_timeout,
            body_timeout,
            write_timeout,
            max_connections,
            max_connections_per_addr,
            admin_max_connections,
            max_sessions,
            max_sessions_per_principal,
            max_upstreams,
            session_rate,
            session_burst,
            max_upstream_message,
            stream_buffer,
            max_stream_events,
            stderr_lines_per_sec,
            circuit_failures,
            circuit_cooldown,
            bridge_pool_size,
            quota_tool_calls,
            max_initialize,
            max_subscriptions,
            max_subscriptions_per_principal,
            max_session_log
        )
    }
}

/// Resolved resource limits ([`LimitsLayer`] with defaults applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// See [`LimitsLayer::header_timeout`].
    pub header_timeout: Duration,
    /// See [`LimitsLayer::body_timeout`].
    pub body_timeout: Duration,
    /// See [`LimitsLayer::write_timeout`].
    pub write_timeout: Duration,
    /// See [`LimitsLayer::max_connections`].
    pub max_connections: usize,
    /// See [`LimitsLayer::max_connections_per_addr`].
    pub max_connections_per_addr: usize,
    /// See [`LimitsLayer::admin_max_connections`].
    pub admin_max_connections: usize,
    /// See [`LimitsLayer::max_sessions`].
    pub max_sessions: usize,
    /// See [`LimitsLayer::max_sessions_per_principal`].
    pub max_sessions_per_principal: usize,
    /// See [`LimitsLayer::max_upstreams`].
    pub max_upstreams: usize,
    /// See [`LimitsLayer::session_rate`].
    pub session_rate: u32,
    /// See [`LimitsLayer::session_burst`].
    pub session_burst: u32,
    /// See [`LimitsLayer::max_upstream_message`].
    pub max_upstream_message: usize,
    /// See [`LimitsLayer::stream_buffer`].
    pub stream_buffer: usize,
    /// See [`LimitsLayer::max_stream_events`].
    pub max_stream_events: u64,
    /// See [`LimitsLayer::stderr_lines_per_sec`].
    pub stderr_lines_per_sec: u32,
    /// See [`LimitsLayer::bridge_pool_size`].
    pub bridge_pool_size: usize,
    /// See [`LimitsLayer::quota_tool_calls`]; `None`: no quota.
    pub quota_tool_calls: Option<Quota>,
    /// See [`LimitsLayer::circuit_failures`].
    pub circuit_failures: u32,
    /// See [`LimitsLayer::circuit_cooldown`].
    pub circuit_cooldown: Duration,
    /// See [`LimitsLayer::max_initialize`].
    pub max_initialize: usize,
    /// See [`LimitsLayer::max_subscriptions`].
    pub max_subscriptions: usize,
    /// See [`LimitsLayer::max_subscriptions_per_principal`].
    pub max_subscriptions_per_principal: usize,
    /// See [`LimitsLayer::max_session_log`].
    pub max_session_log: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::resolve(&mut Vec::new(), &LimitsLayer::default())
    }
}

impl Limits {
    fn resolve(errors: &mut Vec<String>, l: &LimitsLayer) -> Limits {
        let positive = |errors: &mut Vec<String>, name: &str, v: Option<usize>, d: usize| {
            let v = v.unwrap_or(d);
            if v == 0 {
                errors.push(format!("{name}: must be greater than zero"));
            }
            v
        };
        let max_sessions = positive(errors, "max-sessions", l.max_sessions, 1000);
        let max_connections = positive(errors, "max-connections", l.max_connections, 1024);
        let max_subscriptions = positive(errors, "max-subscriptions", l.max_subscriptions, 1000);
        let stream_buffer = size(
            errors,
            "stream-buffer",
            l.stream_buffer.as_ref(),
            DEFAULT_STREAM_BUFFER,
        );
        Limits {
            header_timeout: duration(
                errors,
                "header-timeout",
                l.header_timeout.as_deref(),
                DEFAULT_HEADER_TIMEOUT,
            ),
            body_timeout: duration(
                errors,
                "body-timeout",
                l.body_timeout.as_deref(),
                DEFAULT_BODY_TIMEOUT,
            ),
            write_timeout: duration(
                errors,
                "write-timeout",
                l.write_timeout.as_deref(),
                DEFAULT_WRITE_TIMEOUT,
            ),
            max_connections,
            max_connections_per_addr: positive(
                errors,
                "max-connections-per-addr",
                l.max_connections_per_addr,
                max_connections.div_ceil(2),
            ),
            admin_max_connections: positive(
                errors,
                "admin-max-connections",
                l.admin_max_connections,
                64,
            ),
            max_sessions,
            max_sessions_per_principal: positive(
                errors,
                "max-sessions-per-principal",
                l.max_sessions_per_principal,
                max_sessions.div_ceil(4),
            ),
            max_upstreams: positive(errors, "max-upstreams", l.max_upstreams, max_sessions),
            session_rate: u32::try_from(positive(
                errors,
                "session-rate",
                l.session_rate.map(|v| v as usize),
                20,
            ))
            .unwrap_or(u32::MAX),
            session_burst: u32::try_from(positive(
                errors,
                "session-burst",
                l.session_burst.map(|v| v as usize),
                40,
            ))
            .unwrap_or(u32::MAX),
            max_upstream_message: size(
                errors,
                "max-upstream-message",
                l.max_upstream_message.as_ref(),
                "16MiB",
            ),
            stream_buffer,
            max_stream_events: l.max_stream_events.unwrap_or(10_000).max(1),
            stderr_lines_per_sec: l.stderr_lines_per_sec.unwrap_or(50).max(1),
            bridge_pool_size: positive(errors, "bridge-pool-size", l.bridge_pool_size, 4),
            quota_tool_calls: l.quota_tool_calls.as_deref().and_then(|q| {
                Quota::parse(q)
                    .map_err(|e| errors.push(format!("quota-tool-calls: {e}")))
                    .ok()
            }),
            circuit_failures: l.circuit_failures.unwrap_or(5).max(1),
            circuit_cooldown: duration(
                errors,
                "circuit-cooldown",
                l.circuit_cooldown.as_deref(),
                DEFAULT_CIRCUIT_COOLDOWN,
            ),
            max_initialize: size(errors, "max-initialize", l.max_initialize.as_ref(), "64KiB"),
            max_subscriptions,
            max_subscriptions_per_principal: positive(
                errors,
                "max-subscriptions-per-principal",
                l.max_subscriptions_per_principal,
                max_subscriptions.saturating_mul(10),
            ),
            max_session_log: size(
                errors,
                "max-session-log",
                l.max_session_log.as_ref(),
                "64MiB",
            ),
        }
    }
}

/// The `[upstream]` table.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpstreamLayer {
    /// Name used in logs (and, later, metrics).
    pub name: Option<String>,
    /// argv of a stdio MCP server; run directly, never through a shell.
    pub command: Option<Vec<String>>,
    /// URL of a Streamable HTTP MCP server.
    pub url: Option<String>,
    /// Extra environment for a stdio server.
    pub env: Option<BTreeMap<String, String>>,
    /// Working directory for a stdio server.
    pub cwd: Option<PathBuf>,
    /// Give a stdio server the gateway's whole environment (less `TETHER_*`) instead of
    /// the allow-list.
    pub inherit_env: Option<bool>,
    /// Variables passed from the gateway's environment besides the default allow-list.
    pub pass_env: Option<Vec<String>>,
    /// Refuse to start when the upstream cannot be started (program missing, URL not
    /// answering) instead of warning and serving errors to the first sessions.
    pub require: Option<bool>,
    /// The protocol era spoken to an HTTP upstream: `auto` (default: ask it once with
    /// `server/discover`), `legacy` (sessions) or `modern` (2026-07-28, stateless).
    pub protocol: Option<String>,
    /// Headers sent with every request to an HTTP upstream (for example `Authorization`).
    pub headers: Option<BTreeMap<String, String>>,
}

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

/// A quota: `limit` tool calls per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Calls allowed in one window.
    pub limit: u64,
    /// The window's length.
    pub window: Duration,
}

impl Quota {
    /// Parses `N/WINDOW` (`1000/1d`, `60/1h`, `5/10s`).
    pub fn parse(text: &str) -> Result<Quota, String> {
        let (n, w) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not N/WINDOW, such as 1000/1d"))?;
        let limit: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {n:?} is not a number of calls"))?;
        let window = humantime::parse_duration(w.trim())
            .map_err(|e| format!("{text:?}: {w:?} is not a duration ({e})"))?;
        if window < Duration::from_secs(1) {
            return Err(format!("{text:?}: the window must be at least 1s"));
        }
        Ok(Quota { limit, window })
    }
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

/// Where live session state is kept.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreSpec {
    /// `tether.db` in the state directory.
    Sqlite,
    /// A Redis server shared by every instance.
    Redis {
        /// `redis://` or `rediss://` URL.
        url: String,
        /// Key prefix.
        prefix: String,
        /// Sliding TTL of session records.
        session_ttl: Duration,
        /// Heartbeat lifetime of an instance.
        instance_ttl: Duration,
        /// URL at which other instances reach this one (None: derived from `listen`).
        advertise_url: Option<String>,
    },
}

/// Where session history and tool calls are kept.
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerSpec {
    /// `tether.db` in the state directory.
    Sqlite,
    /// A PostgreSQL database.
    Postgres {
        /// `postgres://` URL.
        url: String,
    },
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// MCP listener address.
    pub listen: SocketAddr,
    /// Directory of the SQLite store.
    pub state_dir: PathBuf,
    /// Session idle timeout.
    pub idle_timeout: Duration,
    /// SSE keepalive interval.
    pub keepalive: Duration,
    /// Request body limit in bytes.
    pub max_body: usize,
    /// Per-request upstream timeout.
    pub upstream_timeout: Duration,
    /// [`crate::session::SessionConfig::answer_window`].
    pub answer_window: Duration,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// Extra allowed origins.
    pub allowed_origins: Vec<String>,
    /// Extra allowed `Host` names ([`crate::policy::host_allowed`]).
    pub allowed_hosts: Vec<String>,
    /// Upstream name for logs.
    pub upstream_name: String,
    /// The upstream.
    pub upstream: UpstreamSpec,
    /// Admin listener address.
    pub admin_listen: SocketAddr,
    /// Admin token, if any.
    pub admin_token: Option<String>,
    /// Ledger retention.
    pub retention: Duration,
    /// API keys.
    pub keys: Vec<crate::auth::KeyEntry>,
    /// Live session state.
    pub store: StoreSpec,
    /// Session history.
    pub ledger: LedgerSpec,
    /// File holding the admin token (read at start), when given instead of the token.
    pub admin_token_file: Option<PathBuf>,
    /// Resource limits.
    pub limits: Limits,
    /// Exit at start when the upstream cannot be started (`--require-upstream`).
    pub require_upstream: bool,
    /// Which of the gateway's own variables stdio children see (`inherit-env`, `pass-env`).
    pub env_policy: EnvPolicy,
    /// The servers of a `--servers` file, each at `/servers/NAME/mcp` (set by the CLI);
    /// empty: the one `upstream` (at `/mcp`, and `/servers/UPSTREAM_NAME/mcp`).
    pub servers: Vec<crate::servers::ServerEntry>,
    /// Where `servers` came from, re-read on SIGHUP and when it changes (`None`: one
    /// upstream, no reload).
    pub servers_source: Option<ServersSource>,
    /// The config file the keys were read from (set by the CLI), re-read on SIGHUP and when
    /// it changes: a key revoked there ends its user's sessions (`None`: no reload).
    pub keys_file: Option<PathBuf>,
}

/// Where a gateway's servers are written.
#[derive(Debug, Clone, PartialEq)]
pub enum ServersSource {
    /// A client's `mcpServers` JSON (`--servers FILE`).
    Json(PathBuf),
    /// The `[servers.NAME]` tables of the TOML config file (`--config FILE`).
    Toml(PathBuf),
}

impl ServersSource {
    /// The file to watch.
    pub fn path(&self) -> &Path {
        match self {
            ServersSource::Json(p) | ServersSource::Toml(p) => p,
        }
    }

    /// The servers as the file holds them now, as `mcpServers` JSON text, and the name to
    /// report problems under (the file, and for TOML its `[servers]` tables).
    pub fn load(&self) -> Result<(String, String), String> {
        let what = match self {
            ServersSource::Json(_) => "servers file",
            ServersSource::Toml(_) => "config file",
        };
        let text = read_bounded(self.path(), what)?;
        match self {
            ServersSource::Json(p) => Ok((text, p.display().to_string())),
            ServersSource::Toml(p) => {
                let layer: Layer = toml::from_str(&text)
                    .map_err(|e| format!("config file {}: {e}", p.display()))?;
                // The `[servers.NAME]` tables as the `mcpServers` JSON the parser reads.
                let tables = layer.servers.unwrap_or_default();
                Ok((
                    serde_json::json!({ "mcpServers": tables }).to_string(),
                    format!("{} [servers]", p.display()),
                ))
            }
        }
    }
}

/// Largest config or servers file read: the operator's file, but a path re-read on every
/// change (reload) must not read whatever grows there into memory.
pub const MAX_CONFIG_FILE: u64 = 4 << 20;

/// A config or servers file's text (`what` it is, for messages), refused past
/// [`MAX_CONFIG_FILE`] and when it is not a regular file: the file is opened without
/// blocking and checked before a byte is read, since opening a FIFO (or a device) to read
/// waits for a writer (issue 26: a servers file replaced by a FIFO hung a runtime worker,
/// then shutdown).
pub fn read_bounded(path: &Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| format!("cannot read {what} {}: {e}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(failed)?;
    let meta = file.metadata().map_err(failed)?;
    if !meta.is_file() {
        return Err(format!(
            "cannot read {what} {}: not a regular file",
            path.display()
        ));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_FILE + 1)
        .read_to_string(&mut text)
        .map_err(failed)?;
    if text.len() as u64 > MAX_CONFIG_FILE {
        return Err(format!(
            "{what} {} is larger than {} MiB",
            path.display(),
            MAX_CONFIG_FILE >> 20
        ));
    }
    Ok(text)
}

/// How long a read of a file while serving (a reload) may take before it is given up.
pub const FILE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads that are still stuck on a file system that does not answer (each holds a thread
/// until the read returns); past [`MAX_STUCK_READS`] no new one is started.
static STUCK_READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Stuck reads allowed at once.
pub const MAX_STUCK_READS: usize = 2;

/// Runs `read` (file I/O: a stat, a read) off the async runtime, on a thread of its own,
/// and gives it up after `timeout`: a file system that hangs (a dead network mount) must
/// never hold a runtime worker, and a thread left waiting on it never holds up the
/// process's exit (tokio's blocking pool is waited for at shutdown; a plain thread is not).
pub async fn off_runtime<T: Send + 'static>(
    what: &str,
    timeout: std::time::Duration,
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    use std::sync::atomic::Ordering;
    if STUCK_READS.load(Ordering::Relaxed) >= MAX_STUCK_READS {
        return Err(format!(
            "{what}: earlier reads are still stuck; not starting another"
        ));
    }
    STUCK_READS.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("tether-read".into())
        .spawn(move || {
            let out = read();
            STUCK_READS.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(out);
        });
    if let Err(e) = spawned {
        STUCK_READS.fetch_sub(1, Ordering::Relaxed);
        return Err(format!("{what}: cannot start a reader thread: {e}"));
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(format!("{what}: the reader thread ended without an answer")),
        Err(_) => Err(format!(
            "{what}: no answer from the file system within {}",
            humantime::format_duration(timeout)
        )),
    }
}

impl Layer {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Layer, String> {
        let text = read_bounded(path, "config file")?;
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// `self` with every value set in `over` replaced by that value. An upstream is one
    /// choice: a higher layer naming a command, a URL or the demo replaces the lower
    /// layer's choice entirely.
    pub fn overlay(self, over: Layer) -> Layer {
        let names_upstream = |l: &Layer| {
            l.demo.is_some()
                || l.upstream
                    .as_ref()
                    .is_some_and(|u| u.command.is_some() || u.url.is_some())
        };
        let over_chooses = names_upstream(&over);
        let (base_up, base_demo) = (self.upstream.unwrap_or_default(), self.demo);
        let top_up = over.upstream.unwrap_or_default();
        let (command, url, demo) = if over_chooses {
            (top_up.command, top_up.url, over.demo)
        } else {
            (base_up.command, base_up.url, base_demo)
        };
        let upstream = UpstreamLayer {
            name: top_up.name.or(base_up.name),
            command,
            url,
            env: top_up.env.or(base_up.env),
            cwd: top_up.cwd.or(base_up.cwd),
            inherit_env: top_up.inherit_env.or(base_up.inherit_env),
            pass_env: top_up.pass_env.or(base_up.pass_env),
            require: top_up.require.or(base_up.require),
            protocol: top_up.protocol.or(base_up.protocol),
            headers: top_up.headers.or(base_up.headers),
        };
        let limits = match (self.limits, over.limits) {
            (Some(a), Some(b)) => Some(a.overlay(b)),
            (a, b) => b.or(a),
        };
        Layer {
            listen: over.listen.or(self.listen),
            state_dir: over.state_dir.or(self.state_dir),
            idle_timeout: over.idle_timeout.or(self.idle_timeout),
            keepalive: over.keepalive.or(self.keepalive),
            max_body: over.max_body.or(self.max_body),
            upstream_timeout: over.upstream_timeout.or(self.upstream_timeout),
            answer_window: over.answer_window.or(self.answer_window),
            shutdown_grace: over.shutdown_grace.or(self.shutdown_grace),
            allowed_origins: over.allowed_origins.or(self.allowed_origins),
            allowed_hosts: over.allowed_hosts.or(self.allowed_hosts),
            admin_listen: over.admin_listen.or(self.admin_listen),
            admin_token: over.admin_token.or(self.admin_token),
            admin_token_file: over.admin_token_file.or(self.admin_token_file),
            retention: over.retention.or(self.retention),
            keys: over.keys.or(self.keys),
            store: over.store.or(self.store),
            store_prefix: over.store_prefix.or(self.store_prefix),
            session_ttl: over.session_ttl.or(self.session_ttl),
            ledger: over.ledger.or(self.ledger),
            advertise_url: over.advertise_url.or(self.advertise_url),
            instance_ttl: over.instance_ttl.or(self.instance_ttl),
            servers: over.servers.or(self.servers),
            demo,
            upstream: Some(upstream),
            limits,
        }
    }
}

/// The platform data directory for Tether (e.g. `~/.local/share/tether`).
pub fn default_state_dir() -> PathBuf {
    directories::ProjectDirs::from("dev", "tether", "tether")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".tether"))
}

fn duration(errors: &mut Vec<String>, field: &str, value: Option<&str>, default: &str) -> Duration {
    let text = value.unwrap_or(default);
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => {
            errors.push(format!("{field}: must be greater than zero (got {text:?})"));
            Duration::ZERO
        }
        Ok(d) => d,
        Err(e) => {
            errors.push(format!(
                "{field}: {text:?} is not a duration like 30s or 5m ({e})"
            ));
            Duration::ZERO
        }
    }
}

fn size(errors: &mut Vec<String>, field: &str, value: Option<&SizeValue>, default: &str) -> usize {
    let parse = |t: &str| {
        t.parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| format!("{field}: {t:?} is not a size like 4MiB ({e})"))
    };
    let bytes = match value {
        None => parse(default),
        Some(SizeValue::Bytes(b)) => Ok(*b),
        Some(SizeValue::Text(t)) => parse(t),
    };
    match bytes {
        Ok(0) => {
            errors.push(format!("{field}: must be greater than zero"));
            0
        }
        Ok(b) => usize::try_from(b).unwrap_or(usize::MAX),
        Err(e) => {
            errors.push(e);
            0
        }
    }
}

impl Config {
    /// Resolves the merged layer into a configuration, or every problem found.
    /// `demo_command` is the argv that runs the bundled demo server.
    pub fn resolve(layer: Layer, demo_command: Vec<String>) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let listen_text = layer.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|e| {
            errors.push(format!(
                "listen: {listen_text:?} is not an address like 127.0.0.1:7450 ({e})"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let store = resolve_store(&mut errors, &layer, listen);
        let idle_timeout = duration(
            &mut errors,
            "idle-timeout",
            layer.idle_timeout.as_deref(),
            DEFAULT_IDLE_TIMEOUT,
        );
        let keepalive = duration(
            &mut errors,
            "keepalive",
            layer.keepalive.as_deref(),
            DEFAULT_KEEPALIVE,
        );
        let upstream_timeout = duration(
            &mut errors,
            "upstream-timeout",
            layer.upstream_timeout.as_deref(),
            DEFAULT_UPSTREAM_TIMEOUT,
        );
        let answer_window = match layer.answer_window.as_deref().map(str::trim) {
            None => Duration::from_millis(DEFAULT_ANSWER_WINDOW_MS),
            // Zero is meaningful here: every call gets a stream and a stored record.
            Some("0") => Duration::ZERO,
            Some(text) => {
                let d = duration(&mut errors, "answer-window", Some(text), "");
                if d > Duration::from_secs(60) {
                    errors.push(format!(
                        "answer-window: {text:?} is over 60s; a call's stream (and its resumability) would start that late"
                    ));
                }
                d
            }
        };
        let shutdown_grace = duration(
            &mut errors,
            "shutdown-grace",
            layer.shutdown_grace.as_deref(),
            DEFAULT_SHUTDOWN_GRACE,
        );
        let max_body = size(
            &mut errors,
            "max-body",
            layer.max_body.as_ref(),
            DEFAULT_MAX_BODY,
        );
        let limits = Limits::resolve(&mut errors, &layer.limits.clone().unwrap_or_default());
        let retention = duration(
            &mut errors,
            "retention",
            layer.retention.as_deref(),
            DEFAULT_RETENTION,
        );
        let admin_text = layer
            .admin_listen
            .as_deref()
            .unwrap_or(DEFAULT_ADMIN_LISTEN);
        let admin_listen = admin_text.parse::<SocketAddr>().unwrap_or_else(|e| {
            errors.push(format!(
                "admin-listen: {admin_text:?} is not an address like 127.0.0.1:7451 ({e})"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let admin_token = layer.admin_token.filter(|t| !t.is_empty());
        let admin_token_file = layer.admin_token_file.clone();
        if admin_token.is_some() && admin_token_file.is_some() {
            errors
                .push("admin-token-file: give either a token or a token file, not both".to_owned());
        }
        if !admin_listen.ip().is_loopback() && admin_token.is_none() && admin_token_file.is_none() {
            errors.push(format!(
                "admin-listen: {admin_listen} is not loopback, so the admin API needs --admin-token (TETHER_ADMIN_TOKEN)"
            ));
        }
        let keys = layer.keys.unwrap_or_default();
        if let Err(e) = crate::auth::Keys::new(&keys) {
            errors.extend(e);
        }
        let allowed_origins = layer.allowed_origins.unwrap_or_default();
        for o in &allowed_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                errors.push(format!(
                    "allowed-origins: {o:?} must be * or start with http:// or https://"
                ));
            }
        }
        let allowed_hosts = layer.allowed_hosts.unwrap_or_default();
        for h in &allowed_hosts {
            if h.is_empty() || h.contains(['/', ' ', '@']) {
                errors.push(format!(
                    "allowed-hosts: {h:?} must be * or a host name, optionally with :port"
                ));
            }
        }

        let ledger = match layer.ledger.as_deref() {
            None | Some("sqlite") => LedgerSpec::Sqlite,
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                if url.parse::<tokio_postgres::Config>().is_err() {
                    errors.push(format!("ledger: {url:?} is not a valid PostgreSQL URL"));
                }
                LedgerSpec::Postgres {
                    url: url.to_owned(),
                }
            }
            Some(other) => {
                errors.push(format!(
                    "ledger: {other:?} must be sqlite or a postgres:// URL"
                ));
                LedgerSpec::Sqlite
            }
        };

        let up = layer.upstream.unwrap_or_default();
        let require_upstream = up.require.unwrap_or(false);
        let demo = layer.demo.unwrap_or(false);
        let env_policy = if up.inherit_env.unwrap_or(false) {
            if up.pass_env.is_some() {
                errors.push("upstream: pass-env has no effect with inherit-env".to_owned());
            }
            EnvPolicy::Inherit
        } else {
            let mut names: Vec<String> = DEFAULT_PASS_ENV.iter().map(|s| (*s).to_owned()).collect();
            for n in up.pass_env.clone().unwrap_or_default() {
                if n.is_empty() || n.contains('=') {
                    errors.push(format!("upstream.pass-env: {n:?} is not a variable name"));
                } else if n.starts_with("TETHER_") {
                    errors.push(format!(
                        "upstream.pass-env: {n:?}: TETHER_* variables never reach an upstream (they hold the gateway's secrets); name it in upstream.env instead"
                    ));
                } else if !names.contains(&n) {
                    names.push(n);
                }
            }
            EnvPolicy::Allow(names)
        };
        let protocol = match up
            .protocol
            .as_deref()
            .map(|p| (p, UpstreamProtocol::parse(p)))
        {
            None => UpstreamProtocol::Auto,
            Some((_, Some(p))) => {
                if up.url.is_none() && p != UpstreamProtocol::Auto {
                    errors.push(
                        "upstream.protocol: applies only to an HTTP upstream (--upstream-url); a stdio server is spoken to in the legacy protocol".to_owned(),
                    );
                }
                p
            }
            Some((text, None)) => {
                errors.push(format!(
                    "upstream.protocol: {text:?} is not one of auto, legacy, modern"
                ));
                UpstreamProtocol::Auto
            }
        };
        if let Some(h) = &up.headers {
            if up.url.is_none() {
                errors.push(
                    "upstream.headers: apply only to an HTTP upstream (--upstream-url)".to_owned(),
                );
            }
            for (k, v) in h {
                if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(v).is_err()
                {
                    errors.push(format!(
                        "upstream.headers: {k:?} is not a valid HTTP header (name, or a value with line breaks)"
                    ));
                }
            }
        }
        let sources =
            usize::from(up.command.is_some()) + usize::from(up.url.is_some()) + usize::from(demo);
        let upstream = match (up.command, up.url) {
            _ if sources > 1 => {
                errors.push(
                    "upstream: give exactly one of a command (after --), --upstream-url or --demo"
                        .to_owned(),
                );
                None
            }
            _ if sources == 0 => {
                errors.push(
                    "upstream: none given; use `tether serve -- CMD ARGS`, `--upstream-url URL` or `--demo`".to_owned(),
                );
                None
            }
            (Some(argv), None) if argv.is_empty() || argv[0].is_empty() => {
                errors.push("upstream.command: must name a program".to_owned());
                None
            }
            (Some(argv), None) => Some(UpstreamSpec::Stdio {
                argv,
                env: up.env.clone().unwrap_or_default(),
                cwd: up.cwd.clone(),
                env_policy: env_policy.clone(),
            }),
            (None, Some(url)) => {
                if !(url.starts_with("http://") || url.starts_with("https://"))
                    || url.parse::<reqwest::Url>().is_err()
                {
                    errors.push(format!(
                        "upstream-url: {url:?} is not an http:// or https:// URL"
                    ));
                }
                if up.env.is_some()
                    || up.cwd.is_some()
                    || up.inherit_env.is_some()
                    || up.pass_env.is_some()
                {
                    errors.push(
                        "upstream: env, cwd, inherit-env and pass-env apply only to a stdio command"
                            .to_owned(),
                    );
                }
                Some(UpstreamSpec::Http {
                    url,
                    protocol,
                    headers: up.headers.clone().unwrap_or_default().into_iter().collect(),
                })
            }
            _ => Some(UpstreamSpec::Stdio {
                argv: demo_command,
                env: BTreeMap::new(),
                cwd: None,
                env_policy: env_policy.clone(),
            }),
        };
        let upstream_name = up.name.unwrap_or_else(|| match &upstream {
            Some(UpstreamSpec::Stdio { .. }) if demo => "demo".to_owned(),
            Some(spec) => spec.default_name(),
            None => "upstream".to_owned(),
        });
        if !upstream_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || upstream_name.is_empty()
        {
            errors.push(format!(
                "upstream.name: {upstream_name:?} may hold only letters, digits, - _ and ."
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Config {
            listen,
            state_dir: layer.state_dir.unwrap_or_else(default_state_dir),
            idle_timeout,
            keepalive,
            max_body,
            upstream_timeout,
            answer_window,
            shutdown_grace,
            allowed_origins,
            allowed_hosts,
            upstream_name,
            upstream: upstream.expect("checked above"),
            admin_listen,
            admin_token,
            retention,
            keys,
            store,
            ledger,
            admin_token_file,
            limits,
            require_upstream,
            env_policy,
            servers: Vec::new(),
            servers_source: None,
            keys_file: None,
        })
    }
}

fn resolve_store(errors: &mut Vec<String>, layer: &Layer, listen: SocketAddr) -> StoreSpec {
    let redis_only = [
        ("store-prefix", layer.store_prefix.is_some()),
        ("session-ttl", layer.session_ttl.is_some()),
        ("advertise-url", layer.advertise_url.is_some()),
        ("instance-ttl", layer.instance_ttl.is_some()),
    ];
    match layer.store.as_deref() {
        None | Some("sqlite") => {
            for (name, set) in redis_only {
                if set {
                    errors.push(format!("{name}: applies only with --store redis://..."));
                }
            }
            StoreSpec::Sqlite
        }
        Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
            if redis::Client::open(url).is_err() {
                errors.push(format!("store: {url:?} is not a valid Redis URL"));
            }
            let session_ttl = duration(
                errors,
                "session-ttl",
                layer.session_ttl.as_deref(),
                DEFAULT_SESSION_TTL,
            );
            let instance_ttl = duration(
                errors,
                "instance-ttl",
                layer.instance_ttl.as_deref(),
                DEFAULT_INSTANCE_TTL,
            );
            if instance_ttl < Duration::from_secs(1) && !instance_ttl.is_zero() {
                errors.push("instance-ttl: must be at least 1s".to_owned());
            }
            let prefix = layer
                .store_prefix
                .clone()
                .unwrap_or_else(|| DEFAULT_STORE_PREFIX.to_owned());
            if prefix.is_empty() || prefix.contains(char::is_whitespace) {
                errors.push(format!(
                    "store-prefix: {prefix:?} must be non-empty and without spaces"
                ));
            }
            let advertise_url = layer.advertise_url.clone();
            match &advertise_url {
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    errors.push(format!("advertise-url: {u:?} is not an http(s):// URL"));
                }
                None if listen.ip().is_unspecified() => errors.push(format!(
                    "advertise-url: listening on {listen} (all interfaces), so other instances need --advertise-url to reach this one"
                )),
                _ => {}
            }
            StoreSpec::Redis {
                url: url.to_owned(),
                prefix,
                session_ttl,
                instance_ttl,
                advertise_url,
            }
        }
        Some(other) => {
            errors.push(format!(
                "store: {other:?} must be sqlite or a redis:// or rediss:// URL"
            ));
            StoreSpec::Sqlite
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 26: a servers file replaced by a FIFO hung the reload (opening a FIFO to read
    /// waits for a writer). A file that is not regular is refused at once, and a read that
    /// hangs anyway is given up after its timeout.
    #[tokio::test]
    async fn only_regular_files_are_read_and_never_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("servers.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = read_bounded(&fifo, "servers file").unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let err = read_bounded(dir.path(), "servers file").unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let ok = dir.path().join("ok.json");
        std::fs::write(&ok, "{}").unwrap();
        assert_eq!(read_bounded(&ok, "servers file").unwrap(), "{}");

        let (release, hold) = std::sync::mpsc::channel::<()>();
        let err = off_runtime(
            "servers file",
            std::time::Duration::from_millis(50),
            move || {
                let _ = hold.recv();
            },
        )
        .await
        .unwrap_err();
        assert!(err.contains("no answer from the file system"), "{err}");
        drop(release);
        assert_eq!(
            off_runtime("x", std::time::Duration::from_secs(5), || 7).await,
            Ok(7)
        );
    }

    #[test]
    fn a_config_file_past_the_bound_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.json");
        std::fs::write(&path, vec![b' '; MAX_CONFIG_FILE as usize + 1]).unwrap();
        let err = ServersSource::Json(path.clone()).load().unwrap_err();
        assert!(err.contains("larger than 4 MiB"), "{err}");
        std::fs::write(&path, r#"{"mcpServers": {}}"#).unwrap();
        assert!(ServersSource::Json(path).load().is_ok());
    }

    fn demo() -> Vec<String> {
        vec!["tether".into(), "demo-server".into()]
    }

    #[test]
    fn defaults_apply() {
        let layer = Layer {
            demo: Some(true),
            ..Layer::default()
        };
        let c = Config::resolve(layer, demo()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.idle_timeout, Duration::from_secs(1800));
        assert_eq!(c.keepalive, Duration::from_secs(15));
        assert_eq!(c.max_body, 4 * 1024 * 1024);
        assert_eq!(c.upstream_timeout, Duration::from_secs(300));
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.upstream_name, "demo");
        let stdio = |argv: &[&str]| UpstreamSpec::Stdio {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            env_policy: EnvPolicy::Inherit,
        };
        let http = |url: &str| UpstreamSpec::Http {
            url: url.to_owned(),
            protocol: UpstreamProtocol::Auto,
            headers: Vec::new(),
        };
        for (spec, want) in [
            (stdio(&["/usr/bin/mcp-server-time"]), "mcp-server-time"),
            (
                stdio(&["npx", "-y", "@modelcontextprotocol/server-everything"]),
                "server-everything",
            ),
            (stdio(&["npx", "-y", "@scope/pkg@1.2.3", "stdio"]), "pkg"),
            (stdio(&["uvx", "mcp-server-fetch"]), "mcp-server-fetch"),
            (stdio(&["python3", "-u", "/srv/tools/server.py"]), "server"),
            (
                stdio(&["docker", "run", "-i", "--rm", "ghcr.io/org/thing:latest"]),
                "thing",
            ),
            (http("http://127.0.0.1:3001/mcp"), "127.0.0.1-mcp"),
            (
                http("https://tools.example.com/v1/mcp/"),
                "tools.example.com-v1-mcp",
            ),
            (http("https://tools.example.com"), "tools.example.com"),
        ] {
            assert_eq!(spec.default_name(), want, "{spec:?}");
        }
        assert_eq!(
            http("https://user:secret@h.example/mcp?key=x").describe(),
            "https://h.example/mcp"
        );
        assert_eq!(
            stdio(&["npx", "-y", "pkg"]).describe(),
            "stdio npx (2 args)"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let layer = Layer {
            listen: Some("nowhere".into()),
            idle_timeout: Some("soon".into()),
            max_body: Some(SizeValue::Text("lots".into())),
            ..Layer::default()
        };
        let errs = Config::resolve(layer, demo()).unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:#?}");
    }

    #[test]
    fn flags_override_file() {
        let file: Layer = toml::from_str(
            "listen = \"127.0.0.1:1\"\nkeepalive = \"5s\"\n[upstream]\ncommand = [\"a\"]\n",
        )
        .unwrap();
        let cli = Layer {
            listen: Some("127.0.0.1:2".into()),
            upstream: Some(UpstreamLayer {
                url: Some("http://x/mcp".into()),
                ..Default::default()
            }),
            ..Layer::default()
        };
        let c = Config::resolve(file.overlay(cli), demo()).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.keepalive, Duration::from_secs(5));
        assert_eq!(
            c.upstream,
            UpstreamSpec::Http {
                url: "http://x/mcp".into(),
                protocol: UpstreamProtocol::Auto,
                headers: Vec::new(),
            }
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(toml::from_str::<Layer>("listne = \"x\"").is_err());
    }

    #[test]
    fn store_and_ledger_urls_are_checked_together() {
        let layer = |store: Option<&str>, ledger: Option<&str>, extra: Layer| Layer {
            demo: Some(true),
            store: store.map(str::to_owned),
            ledger: ledger.map(str::to_owned),
            ..extra
        };
        let c = Config::resolve(
            layer(
                Some("redis://127.0.0.1:6379/2"),
                Some("postgres://u@db:5432/t"),
                Layer {
                    session_ttl: Some("1h".into()),
                    ..Layer::default()
                },
            ),
            vec!["x".into()],
        )
        .unwrap();
        match c.store {
            StoreSpec::Redis {
                prefix,
                session_ttl,
                instance_ttl,
                advertise_url,
                ..
            } => {
                assert_eq!(prefix, "tether");
                assert_eq!(session_ttl, Duration::from_secs(3600));
                assert_eq!(instance_ttl, Duration::from_secs(5));
                assert_eq!(advertise_url, None);
            }
            StoreSpec::Sqlite => panic!("redis expected"),
        }
        assert!(matches!(c.ledger, LedgerSpec::Postgres { .. }));
        let errors = Config::resolve(
            layer(
                Some("memcached://x"),
                Some("mysql://x"),
                Layer {
                    store_prefix: Some("p".into()),
                    ..Layer::default()
                },
            ),
            vec!["x".into()],
        )
        .unwrap_err();
        let text = errors.join("\n");
        assert!(text.contains("store: \"memcached://x\""), "{text}");
        assert!(text.contains("ledger: \"mysql://x\""), "{text}");
        let errors = Config::resolve(
            layer(
                None,
                None,
                Layer {
                    store_prefix: Some("p".into()),
                    ..Layer::default()
                },
            ),
            vec!["x".into()],
        )
        .unwrap_err();
        assert_eq!(
            errors,
            ["store-prefix: applies only with --store redis://..."]
        );
        let errors = Config::resolve(
            layer(
                Some("redis://127.0.0.1/"),
                None,
                Layer {
                    listen: Some("0.0.0.0:7450".into()),
                    ..Layer::default()
                },
            ),
            vec!["x".into()],
        )
        .unwrap_err();
        assert!(
            errors.iter().any(|e| e.starts_with("advertise-url:")),
            "{errors:?}"
        );
    }
}
