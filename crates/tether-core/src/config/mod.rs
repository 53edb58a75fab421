//! Configuration: one TOML file, `TETHER_*` environment variables and command-line flags.
//!
//! The file and the command line (which clap already merges with the environment) are each
//! read into a [`Layer`] of optional values; [`Config::resolve`] lays the command line over
//! the file over the defaults and reports every problem at once, before anything binds.
//! `values.rs` holds what an option is (a row: [`Opt`]) and what a layer sets of a table
//! ([`Values`]); `options.rs` the rows of the settings ([`OPTIONS`]), `limits.rs` those of
//! the `[limits]` table; `resolve.rs` the resolution, `files.rs` the bounded reads of the
//! operator's files.
//!
//! Must not: do I/O beyond reading the operator's files, or accept a value it cannot use
//! (every problem is reported, all at once).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod files;
mod limits;
mod options;
mod resolve;
pub(crate) use resolve::task_after;
mod values;

pub use files::{FILE_READ_TIMEOUT, MAX_CONFIG_FILE, MAX_STUCK_READS, off_runtime, read_bounded};
pub use limits::{LIMITS, LimitRows, Limits, LimitsLayer, Quota, limit};
pub use options::{OPTIONS, SettingRows, Settings, option};
use resolve::{duration, size};
pub use values::{Fallback, Kind, Opt, OptValue, Place, Rows, Values};

use crate::upstream::{DEFAULT_PASS_ENV, EnvPolicy, UpstreamProtocol, UpstreamSpec};

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

/// `task-after` when unset, in seconds.
pub const DEFAULT_TASK_AFTER_SECS: u64 = 5;
/// Default time in-flight requests get to finish on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "10s";
/// Default sliding TTL of session records in Redis.
pub const DEFAULT_SESSION_TTL: &str = "24h";
/// Default key prefix in Redis.
pub const DEFAULT_STORE_PREFIX: &str = "tether";
/// Default lifetime of an instance's heartbeat in Redis: how long after a SIGKILL its
/// sessions move to other instances.
pub const DEFAULT_INSTANCE_TTL: &str = "5s";

/// The tables a config file may hold besides its top-level settings.
pub const TABLES: &[&str] = &["upstream", "limits", "keys", "servers"];

/// One layer of settings (the config file, the command line); what is not set is absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layer {
    /// The top-level settings: rows of [`OPTIONS`] the file holds at its top.
    pub settings: Settings,
    /// API keys (hashes) and the users they belong to (`[[keys]]`).
    pub keys: Option<Vec<crate::auth::KeyEntry>>,
    /// The upstream MCP server (`[upstream]`).
    pub upstream: Option<UpstreamLayer>,
    /// Resource limits (the `[limits]` table).
    pub limits: Option<LimitsLayer>,
    /// Several servers, each at `/servers/NAME/mcp` (the `[servers.NAME]` tables): the keys
    /// of an `mcpServers` entry (`command`, `args`, `env`, `cwd`, `url`, `headers`, `type`,
    /// a `tether` table), read by `servers::parse`. `--servers FILE` replaces them.
    pub servers: Option<BTreeMap<String, serde_json::Value>>,
}

impl Layer {
    /// This layer with the top-level setting `key` set to `value`. Panics on a key no row
    /// names: callers pass literals.
    pub fn with(mut self, key: &str, value: impl Into<OptValue>) -> Layer {
        self.settings = self.settings.with(key, value);
        self
    }
}

impl<'de> Deserialize<'de> for Layer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Layer, D::Error> {
        use serde::de::Error;
        fn table<T: serde::de::DeserializeOwned, E: Error>(
            key: &str,
            v: serde_json::Value,
        ) -> Result<T, E> {
            serde_json::from_value(v).map_err(|e| E::custom(format!("{key}: {e}")))
        }
        let raw = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        let mut layer = Layer::default();
        for (k, v) in raw {
            match k.as_str() {
                "upstream" => layer.upstream = Some(table(&k, v)?),
                "limits" => layer.limits = Some(table(&k, v)?),
                "keys" => layer.keys = Some(table(&k, v)?),
                "servers" => layer.servers = Some(table(&k, v)?),
                _ => {
                    let value: OptValue = table(&k, v)?;
                    layer
                        .settings
                        .insert_file_key(&k, value)
                        .map_err(|()| D::Error::unknown_field(&k, SettingRows::file_keys()))?;
                }
            }
        }
        Ok(layer)
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

/// Tether's settings for one server (the entry's `tether` table).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerSettings {
    /// Idle time after which its sessions expire (humantime).
    pub idle_timeout: Option<String>,
    /// Time its upstream has to answer one request (humantime).
    pub upstream_timeout: Option<String>,
    /// `task-after` for it (humantime, or `0`).
    pub task_after: Option<String>,
    /// `task-tools` for it.
    pub task_tools: Option<Vec<String>>,
    /// The protocol era spoken to an HTTP server.
    pub protocol: Option<UpstreamProtocol>,
    /// Sessions it may hold at once (also counted in the gateway's `--max-sessions`).
    pub max_sessions: Option<usize>,
    /// Upstreams (processes, HTTP sessions) it may run at once (also counted in the
    /// gateway's `--max-upstreams`).
    pub max_upstreams: Option<usize>,
    /// New sessions per second per user and per client address (the gateway's
    /// `--session-rate` applies too).
    pub session_rate: Option<u32>,
    /// The users (API key users) allowed to use it; absent: every user.
    pub users: Option<Vec<String>>,
}

/// One server of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerEntry {
    /// Its name: the key in `mcpServers`, and its endpoint `/servers/NAME/mcp`.
    pub name: String,
    /// What to run or reach.
    pub upstream: UpstreamSpec,
    /// Tether's settings for it.
    pub settings: ServerSettings,
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
    /// [`crate::session::SessionConfig::task_after`].
    pub task_after: Duration,
    /// [`crate::session::SessionConfig::task_tools`].
    pub task_tools: Vec<String>,
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
    pub servers: Vec<ServerEntry>,
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
            l.settings.get("demo").is_some()
                || l.upstream
                    .as_ref()
                    .is_some_and(|u| u.command.is_some() || u.url.is_some())
        };
        let over_chooses = names_upstream(&over);
        let demo = if over_chooses {
            over.settings.get("demo").cloned()
        } else {
            self.settings.get("demo").cloned()
        };
        let (base_up, top_up) = (
            self.upstream.unwrap_or_default(),
            over.upstream.unwrap_or_default(),
        );
        let (command, url) = if over_chooses {
            (top_up.command, top_up.url)
        } else {
            (base_up.command, base_up.url)
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
        let mut settings = self.settings.overlay(over.settings);
        settings.replace("demo", demo);
        Layer {
            settings,
            keys: over.keys.or(self.keys),
            servers: over.servers.or(self.servers),
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

#[cfg(test)]
mod tests;
