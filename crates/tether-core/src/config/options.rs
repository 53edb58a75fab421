//! Every option of `tether serve` but the limits, one row each in [`OPTIONS`]: its flag,
//! its `TETHER_*` variable, where the config file holds it, its default, how the flag takes
//! its value, whether a server may set it, its doc line. The CLI builds its arguments from
//! the rows, the config file's top-level keys are checked against them ([`Settings`]), and
//! the README's configuration reference is generated from them and checked. A new setting
//! is one row here and one line of `Config::resolve`.
//!
//! Must not: parse a value (that is `Config::resolve`'s, every problem at once).

use std::sync::LazyLock;

use super::values::{Fallback, Kind, Opt, Place, Rows, Values};

/// Every option of `tether serve` but the limits ([`super::LIMITS`]), in the README's order.
pub const OPTIONS: &[Opt] = &[
    Opt::top("config", "TETHER_CONFIG", "FILE", Fallback::None, "TOML config file")
        .at(Place::Cli),
    Opt::top(
        "listen",
        "TETHER_LISTEN",
        "ADDR",
        Fallback::Is(super::DEFAULT_LISTEN),
        "MCP listener; the endpoint is `/mcp` (also `/sse` + `/messages` for 2024-11-05 clients). Without API keys, a non-loopback address logs a loud warning at start",
    ),
    Opt::top(
        "state-dir",
        "TETHER_STATE_DIR",
        "DIR",
        Fallback::Derived("platform data dir (`~/.local/share/tether`)"),
        "Holds `tether.db` (SQLite, WAL), the generated admin token and the `requestState` key: the dir is made 0700 and those files 0600 (session ids are credentials), corrected at start with a warning when found open",
    ),
    Opt::top(
        "idle-timeout",
        "TETHER_IDLE_TIMEOUT",
        "DUR",
        Fallback::Is(super::DEFAULT_IDLE_TIMEOUT),
        "A session with no request and no open stream for this long expires (reason `timeout`); so do stored sessions of a server no longer configured. The pooled sessions (2026-07-28 clients) of an earlier process are closed at start (reason `gateway_restart`)",
    )
    .server(),
    Opt::top(
        "keepalive",
        "TETHER_KEEPALIVE",
        "DUR",
        Fallback::Is(super::DEFAULT_KEEPALIVE),
        "SSE keepalive comment interval",
    ),
    Opt::top(
        "max-body",
        "TETHER_MAX_BODY",
        "SIZE",
        Fallback::Is(super::DEFAULT_MAX_BODY),
        "Largest request body (413 above)",
    ),
    Opt::top(
        "upstream-timeout",
        "TETHER_UPSTREAM_TIMEOUT",
        "DUR",
        Fallback::Is(super::DEFAULT_UPSTREAM_TIMEOUT),
        "Time the upstream has to answer one request; then the client gets `-32012` and the upstream a `notifications/cancelled`",
    )
    .server(),
    Opt::top(
        "answer-window",
        "TETHER_ANSWER_WINDOW",
        "DUR",
        Fallback::Is("10ms"),
        "A call answered within this time is answered with one JSON body and nothing of it is stored (its client never held an event id, so there is nothing to resume); a longer call gets its record stored and a resumable SSE stream. `0`: every call gets a stream (docs/design/durability.md, row 2)",
    ),
    Opt::top(
        "task-after",
        "TETHER_TASK_AFTER",
        "DUR",
        Fallback::Is("5s"),
        "A `tools/call` of a 2026-07-28 client that declares the tasks extension (`io.modelcontextprotocol/tasks`) and is not answered within this time becomes a durable task: the client gets a `CreateTaskResult` once the task's record is stored, the call goes on upstream, and `tasks/get` gives its outcome, across restarts. `0`: every such call becomes a task at once",
    )
    .server(),
    Opt::top(
        "task-tools",
        "TETHER_TASK_TOOLS",
        "LIST",
        Fallback::None,
        "Tools whose calls become tasks at once for a client that declares the tasks extension (comma-separated; tools whose upstream declares `execution.taskSupport` do too)",
    )
    .kind(Kind::List)
    .server(),
    Opt::top(
        "shutdown-grace",
        "TETHER_SHUTDOWN_GRACE",
        "DUR",
        Fallback::Is(super::DEFAULT_SHUTDOWN_GRACE),
        "On SIGTERM/SIGINT, time in-flight requests get to finish; remaining streams are cut and resume after restart",
    ),
    Opt::top(
        "allowed-origins",
        "TETHER_ALLOWED_ORIGINS",
        "LIST",
        Fallback::Derived("loopback only"),
        "Origins allowed besides `http(s)://localhost`, `127.0.0.0/8`, `[::1]` (any port), comma-separated; `*` allows any. Others get 403",
    )
    .kind(Kind::List),
    Opt::top(
        "allowed-hosts",
        "TETHER_ALLOWED_HOSTS",
        "LIST",
        Fallback::Derived("loopback only, on a loopback listener"),
        "`Host` names allowed besides loopback ones (`name` or `name:port`, comma-separated; `*` allows any). Others get 403. Set, it is checked on any listener; unset, only when `--listen` is a loopback address. A loopback admin listener checks `Host` the same way",
    )
    .kind(Kind::List),
    Opt::top(
        "upstream-url",
        "TETHER_UPSTREAM_URL",
        "URL",
        Fallback::None,
        "Streamable HTTP upstream",
    )
    .at(Place::Upstream("url")),
    Opt::top(
        "upstream-header",
        "TETHER_UPSTREAM_HEADERS",
        "'NAME: VALUE'",
        Fallback::None,
        "Headers sent with every request to an HTTP upstream (credentials); repeat the flag for more. Prefer the file or the variable for secrets: flags show in process lists",
    )
    .at(Place::Upstream("headers = { NAME = \"VALUE\" }"))
    .kind(Kind::Lines),
    Opt::top(
        "servers",
        "TETHER_SERVERS",
        "FILE",
        Fallback::None,
        "A client's `mcpServers` JSON (Claude Desktop, Claude Code `.mcp.json`, Cursor, Windsurf, Cline; VS Code's `servers`), as the client wrote it: `command`/`args`/`env`/`cwd` or `url`/`headers` (`serverUrl`), `type`; `disabled: true` is left out; keys clients use that mean nothing here are named on stderr and ignored; Tether's settings in the entry's `tether` table (`idle-timeout`, `upstream-timeout`, `task-after`, `task-tools`, `protocol`, `max-sessions`, `max-upstreams`, `session-rate`, `users`). Every server (at most 256) is served at `/servers/NAME/mcp` (the gateway-wide flags are the defaults and the outer limits), and the file is reloaded on `SIGHUP` or when it changes; upstream flags (`-- CMD`, `--upstream-url`, `--upstream-header`, `--upstream-protocol`, `--upstream-name`) are refused with it",
    )
    .at(Place::Cli),
    Opt::top(
        "server",
        "TETHER_SERVER",
        "NAME",
        Fallback::None,
        "Serve only this server of `--servers`, as the gateway's one upstream (at `/mcp` too; flags override its settings; no reload)",
    )
    .at(Place::Cli),
    Opt::top(
        "upstream-protocol",
        "TETHER_UPSTREAM_PROTOCOL",
        "ERA",
        Fallback::Is("auto"),
        "What to speak to an HTTP upstream: `auto` (ask once with `server/discover`: 2026-07-28 if it lists it, else legacy; an unclear answer such as a 5xx or 401 is asked again at the next start), `legacy` (sessions), `modern` (2026-07-28, stateless). `GET /health/deep` shows what it speaks (`upstream.protocol`)",
    )
    .at(Place::Upstream("protocol"))
    .kind(Kind::Choice(&["auto", "legacy", "modern"]))
    .server(),
    Opt::top(
        "upstream-pass-env",
        "TETHER_UPSTREAM_PASS_ENV",
        "LIST",
        Fallback::None,
        "Variables a stdio upstream gets from the gateway's environment besides the default allow-list (`PATH`, `HOME`, `USER`, `LOGNAME`, `SHELL`, `LANG`, `LC_ALL`, `LC_CTYPE`, `TZ`, `TMPDIR`, `TERM`), comma-separated. Nothing else of the gateway's environment reaches an upstream; `TETHER_*` never does",
    )
    .at(Place::Upstream("pass-env"))
    .kind(Kind::List),
    Opt::top(
        "upstream-inherit-env",
        "TETHER_UPSTREAM_INHERIT_ENV",
        "",
        Fallback::Derived("off"),
        "Give a stdio upstream the gateway's whole environment instead (still less `TETHER_*`, which holds the admin token and store URLs)",
    )
    .at(Place::Upstream("inherit-env = true"))
    .kind(Kind::Switch),
    Opt::top(
        "upstream-name",
        "TETHER_UPSTREAM_NAME",
        "NAME",
        Fallback::Derived("from the command or URL"),
        "Name used in logs and records. Default: the package or script a launcher runs (`npx -y @modelcontextprotocol/server-everything` → `server-everything`, `uvx mcp-server-time` → `mcp-server-time`), else the program's file name; for a URL its host and path (`127.0.0.1-mcp`)",
    )
    .at(Place::Upstream("name")),
    Opt::top(
        "require-upstream",
        "TETHER_REQUIRE_UPSTREAM",
        "",
        Fallback::Derived("off"),
        "Exit at start when the upstream cannot be started (program missing or not executable, URL not answering). Without it the same check is a warning at start, and `/health/ready` reports it",
    )
    .at(Place::Upstream("require = true"))
    .kind(Kind::Switch),
    Opt::top(
        "demo",
        "TETHER_DEMO",
        "",
        Fallback::None,
        "Run the bundled demo server as the upstream (file: `demo = true`). Boolean variables take `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`",
    )
    .kind(Kind::Switch),
    Opt::top(
        "admin-listen",
        "TETHER_ADMIN_LISTEN",
        "ADDR",
        Fallback::Is(super::DEFAULT_ADMIN_LISTEN),
        "Admin listener: `/health`, `/health/ready`, `/health/deep`, `/metrics`, `/api/...`, the dashboard at `/`",
    ),
    Opt::top(
        "admin-token",
        "TETHER_ADMIN_TOKEN",
        "TOKEN",
        Fallback::Derived("generated into `STATE_DIR/admin.token`"),
        "Admin token (`Authorization: Bearer TOKEN`): needed for eviction and full session ids, and on a non-loopback admin listener (where it is mandatory) for every endpoint but the health checks. Prefer the variable or a file: flags show in process lists",
    )
    .kind(Kind::Secret),
    Opt::top(
        "admin-token-file",
        "TETHER_ADMIN_TOKEN_FILE",
        "FILE",
        Fallback::None,
        "The admin token from a file (its first line)",
    ),
    Opt::top(
        "retention",
        "TETHER_RETENTION",
        "DUR",
        Fallback::Is(super::DEFAULT_RETENTION),
        "How long closed sessions and tool calls stay in the ledger",
    ),
    Opt::top(
        "store",
        "TETHER_STORE",
        "URL",
        Fallback::Is("sqlite"),
        "Live session state: `sqlite` (`tether.db` in the state dir) or `redis://HOST:PORT/DB` / `rediss://...`, shared by every instance of a deployment",
    ),
    Opt::top(
        "store-prefix",
        "TETHER_STORE_PREFIX",
        "PREFIX",
        Fallback::Is(super::DEFAULT_STORE_PREFIX),
        "Prefix of every Redis key (one deployment per prefix)",
    ),
    Opt::top(
        "session-ttl",
        "TETHER_SESSION_TTL",
        "DUR",
        Fallback::Is(super::DEFAULT_SESSION_TTL),
        "Sliding TTL of session records and stream logs in Redis, refreshed on activity",
    ),
    Opt::top(
        "ledger",
        "TETHER_LEDGER",
        "URL",
        Fallback::Is("sqlite"),
        "Session history and tool calls: `sqlite` or `postgres://USER@HOST:PORT/DB` (migrations run at start). Any mix with `--store` works",
    ),
    Opt::top(
        "advertise-url",
        "TETHER_ADVERTISE_URL",
        "URL",
        Fallback::Derived("`http://<listen>`"),
        "Where other instances reach this one's MCP listener (required when listening on `0.0.0.0`)",
    ),
    Opt::top(
        "instance-ttl",
        "TETHER_INSTANCE_TTL",
        "DUR",
        Fallback::Is(super::DEFAULT_INSTANCE_TTL),
        "Heartbeat lifetime in Redis: a killed instance's sessions move to others after this",
    ),
    Opt::top(
        "log",
        "TETHER_LOG",
        "FILTER",
        Fallback::Is("info"),
        "Log filter (`tracing` EnvFilter syntax); logs go to stderr. Upstream stderr is logged at debug, prefixed with the upstream's name, the session's first 8 characters and the pid: `info,tether_core::upstream::stderr=debug` shows it",
    )
    .at(Place::Cli),
    Opt::top(
        "log-format",
        "TETHER_LOG_FORMAT",
        "text\\|json",
        Fallback::Is("text"),
        "`json`: one JSON object per line (`timestamp`, `level`, `target`, `fields`, and `spans` with the fields of every enclosing span, such as `session.id`) for log pipelines",
    )
    .at(Place::Cli)
    .kind(Kind::Choice(&["text", "json"])),
    Opt::top(
        "otlp-endpoint",
        "TETHER_OTLP_ENDPOINT",
        "URL",
        Fallback::None,
        "Export traces over OTLP/HTTP to this collector (e.g. `http://127.0.0.1:4318`): one span per MCP request (session, method, tool, outcome) with children for the upstream call and store writes. Standard `OTEL_*` variables tune the exporter",
    )
    .at(Place::Cli),
];

/// The row of `key`.
pub fn option(key: &str) -> Option<&'static Opt> {
    SettingRows::row(key)
}

/// The top-level keys a config file may hold besides its tables.
static SETTING_KEYS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    OPTIONS
        .iter()
        .filter(|o| o.place == Place::Top)
        .map(|o| o.key)
        .chain(super::TABLES.iter().copied())
        .collect()
});

/// The table of [`OPTIONS`].
pub struct SettingRows;

impl Rows for SettingRows {
    fn rows() -> &'static [Opt] {
        OPTIONS
    }

    fn file_keys() -> &'static [&'static str] {
        &SETTING_KEYS
    }
}

/// The top-level settings one layer sets, by key (each the key of a row of [`OPTIONS`]).
pub type Settings = Values<SettingRows>;
