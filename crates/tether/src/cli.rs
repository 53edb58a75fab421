//! The operator commands: `tether keys add`, and `sessions`, `stats`, `users`, which talk
//! to a running gateway's admin API. Aligned tables for people, `--json` for scripts.
//!
//! Must not: read the store directly: everything goes through the admin API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

/// Where the admin API is and how to print.
#[derive(Args)]
pub struct AdminArgs {
    /// Base URL of the gateway's admin listener.
    #[arg(
        long,
        global = true,
        env = "TETHER_ADMIN",
        default_value = "http://127.0.0.1:7451",
        value_name = "URL"
    )]
    admin: String,
    /// Admin token [default: the one the gateway generated in its state dir].
    #[arg(
        long,
        global = true,
        env = "TETHER_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// File holding the admin token (its first line).
    #[arg(
        long,
        global = true,
        env = "TETHER_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    admin_token_file: Option<PathBuf>,
    /// The gateway's state dir, where it keeps a generated admin token [default: the
    /// platform data dir].
    #[arg(long, global = true, env = "TETHER_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

impl AdminArgs {
    /// The admin URL without a trailing slash; `host:port` (as the gateway prints its
    /// listeners and people type them) gets `http://`.
    fn base(&self) -> String {
        let a = self.admin.trim().trim_end_matches('/');
        if a.contains("://") {
            a.to_owned()
        } else {
            format!("http://{a}")
        }
    }
}

/// `tether sessions ...`
#[derive(Subcommand)]
pub enum SessionsCmd {
    /// List sessions, most recently active first.
    List {
        /// active, closed or all.
        #[arg(long, default_value = "active")]
        status: String,
        /// Only this user id.
        #[arg(long)]
        user: Option<String>,
        /// Only this client type or client name.
        #[arg(long)]
        client: Option<String>,
        /// Only sessions of this server (a name of the --servers file).
        #[arg(long)]
        server: Option<String>,
        /// Only sessions active since (RFC 3339, epoch ms, or a duration ago such as 1h).
        #[arg(long)]
        since: Option<String>,
        /// At most this many.
        #[arg(long, default_value = "50")]
        limit: u32,
    },
    /// Show one session and its recent tool calls.
    Show {
        /// Session id.
        id: String,
    },
    /// Close (evict) a live session; its client gets 404 afterwards.
    Close {
        /// Session id.
        id: String,
    },
}

/// `tether keys ...`
#[derive(Subcommand)]
pub enum KeysCmd {
    /// Create an API key for a user; prints it once and stores only its hash.
    Add {
        /// User id the key belongs to.
        #[arg(long)]
        user: String,
        /// The user's email.
        #[arg(long)]
        email: Option<String>,
        /// The user's display name.
        #[arg(long)]
        name: Option<String>,
        /// Append the `[[keys]]` entry to this config file (else it is printed).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// List the keys of a config file: user, email, name and the hash's first characters
    /// (the keys themselves are never stored).
    List {
        /// The config file holding `[[keys]]` entries.
        #[arg(long, env = "TETHER_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove keys from a config file: every key of a user, or the one whose hash starts
    /// with a prefix (as `keys list` shows it). The gateway reads keys at start; restart it
    /// for the removal to take effect.
    Revoke {
        /// The config file holding `[[keys]]` entries.
        #[arg(long, env = "TETHER_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// Revoke every key of this user.
        #[arg(long, conflicts_with = "hash", required_unless_present = "hash")]
        user: Option<String>,
        /// Revoke the key whose hash starts with this (at least 8 hex characters).
        #[arg(long, value_name = "PREFIX")]
        hash: Option<String>,
    },
}

/// The `[[keys]]` of a config file, as an editable document (comments and layout kept).
fn read_keys_file(path: &std::path::Path) -> Result<toml_edit::DocumentMut, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.parse::<toml_edit::DocumentMut>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn key_field(t: &toml_edit::Table, k: &str) -> String {
    t.get(k)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The part of a stored hash people compare: the hex after `sha256:`.
fn hash_hex(hash: &str) -> &str {
    hash.strip_prefix("sha256:").unwrap_or(hash)
}

fn keys_list(config: &std::path::Path, json: bool) -> ExitCode {
    let doc = match read_keys_file(config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::from(2);
        }
    };
    let rows: Vec<[String; 4]> = doc
        .get("keys")
        .and_then(|k| k.as_array_of_tables())
        .map(|a| {
            a.iter()
                .map(|t| {
                    [
                        key_field(t, "user"),
                        key_field(t, "email"),
                        key_field(t, "name"),
                        hash_hex(&key_field(t, "hash")).chars().take(12).collect(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if json {
        let v: Vec<Value> = rows
            .iter()
            .map(|[u, e, n, h]| serde_json::json!({"user": u, "email": e, "name": n, "hash_prefix": h}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else if rows.is_empty() {
        println!("no keys in {} (clients are anonymous)", config.display());
    } else {
        let rows: Vec<Vec<String>> = rows.into_iter().map(Vec::from).collect();
        print!("{}", table(&["USER", "EMAIL", "NAME", "HASH"], &rows));
    }
    ExitCode::SUCCESS
}

fn keys_revoke(config: &std::path::Path, user: Option<&str>, hash: Option<&str>) -> ExitCode {
    let mut doc = match read_keys_file(config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(h) = hash
        && (h.len() < 8 || !h.chars().all(|c| c.is_ascii_hexdigit()))
    {
        eprintln!(
            "tether: --hash needs at least 8 hex characters of the hash (`tether keys list` shows them)"
        );
        return ExitCode::from(2);
    }
    let matches = |t: &toml_edit::Table| match (user, hash) {
        (Some(u), _) => key_field(t, "user") == u,
        (None, Some(h)) => hash_hex(&key_field(t, "hash")).starts_with(&h.to_ascii_lowercase()),
        (None, None) => false,
    };
    let Some(keys) = doc.get_mut("keys").and_then(|k| k.as_array_of_tables_mut()) else {
        eprintln!("tether: {} has no [[keys]]", config.display());
        return ExitCode::FAILURE;
    };
    let hits: Vec<usize> = keys
        .iter()
        .enumerate()
        .filter(|(_, t)| matches(t))
        .map(|(i, _)| i)
        .collect();
    if hits.is_empty() {
        eprintln!("tether: no key matches in {}", config.display());
        return ExitCode::FAILURE;
    }
    if hash.is_some() && hits.len() > 1 {
        eprintln!(
            "tether: {} keys match that prefix; give more of the hash",
            hits.len()
        );
        return ExitCode::from(2);
    }
    for i in hits.iter().rev() {
        keys.remove(*i);
    }
    // Written beside and renamed over: a crash mid-write never leaves half a config.
    let tmp = config.with_extension("toml.tmp");
    let written = std::fs::write(&tmp, doc.to_string()).and_then(|()| {
        if let Ok(meta) = std::fs::metadata(config) {
            std::fs::set_permissions(&tmp, meta.permissions())?;
        }
        std::fs::rename(&tmp, config)
    });
    if let Err(e) = written {
        eprintln!("tether: cannot write {}: {e}", config.display());
        let _ = std::fs::remove_file(&tmp);
        return ExitCode::FAILURE;
    }
    println!(
        "revoked {n} key(s) in {file}; a gateway serving with --config {file} takes it within 2 s (or at once on SIGHUP) and closes the sessions of users left without a key",
        n = hits.len(),
        file = config.display()
    );
    ExitCode::SUCCESS
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Runs `tether keys add`.
pub fn keys(cmd: &KeysCmd) -> ExitCode {
    let (user, email, name, config) = match cmd {
        KeysCmd::List { config, json } => return keys_list(config, *json),
        KeysCmd::Revoke { config, user, hash } => {
            return keys_revoke(config, user.as_deref(), hash.as_deref());
        }
        KeysCmd::Add {
            user,
            email,
            name,
            config,
        } => (user, email, name, config),
    };
    if user.is_empty() || user == "anonymous" {
        eprintln!("tether: --user must name a user (not {user:?})");
        return ExitCode::from(2);
    }
    let key = tether_core::auth::generate_key();
    let mut entry = format!(
        "\n[[keys]]\nhash = {}\nuser = {}\n",
        toml_string(&tether_core::auth::hash_key(&key)),
        toml_string(user)
    );
    if let Some(e) = email {
        entry.push_str(&format!("email = {}\n", toml_string(e)));
    }
    if let Some(n) = name {
        entry.push_str(&format!("name = {}\n", toml_string(n)));
    }
    println!("New API key for {user} (shown once; store it now):\n\n  {key}\n");
    match config {
        Some(path) => {
            use std::io::Write;
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(entry.as_bytes()));
            if let Err(e) = written {
                eprintln!("tether: cannot append to {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!(
                "Its hash was added to {}; restart the gateway to use it.",
                path.display()
            );
        }
        None => println!("Add this to the gateway's config file:\n{entry}"),
    }
    println!("Clients send it as: Authorization: Bearer {key}");
    ExitCode::SUCCESS
}

impl AdminArgs {
    /// The token: given, from the named file, or the one the gateway generated into its
    /// state dir (readable only by the user the gateway runs as).
    fn token(&self) -> Option<String> {
        if let Some(t) = &self.admin_token {
            return Some(t.clone());
        }
        let path = self.admin_token_file.clone().unwrap_or_else(|| {
            self.state_dir
                .clone()
                .unwrap_or_else(tether_core::config::default_state_dir)
                .join(tether_core::app::ADMIN_TOKEN_FILE)
        });
        let text = std::fs::read_to_string(path).ok()?;
        let token = text.lines().next()?.trim();
        (!token.is_empty()).then(|| token.to_owned())
    }
}

/// Runs `tether dashboard`: prints the dashboard's address with the admin token in its
/// fragment (never sent to a server, kept by the page for its API calls).
pub fn dashboard(admin: &AdminArgs) -> ExitCode {
    let base = admin.base();
    let base = base.as_str();
    match admin.token() {
        Some(t) => println!("{base}/#token={t}"),
        None => {
            println!("{base}/");
            eprintln!(
                "tether: no admin token found (give --admin-token, --admin-token-file or --state-dir); the page is read-only"
            );
        }
    }
    ExitCode::SUCCESS
}

/// Runs `tether health`: readiness of a running gateway, as an exit code.
pub fn health(a: &AdminArgs) -> ExitCode {
    let base = a.base();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("static client config");
    let runtime = match current_thread() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let answer = runtime.block_on(async {
        let resp = http.get(format!("{base}/health/ready")).send().await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        Ok::<_, reqwest::Error>((status, body))
    });
    match answer {
        Ok((status, body)) if status.is_success() => {
            if a.json {
                println!("{body}");
            } else {
                println!("ready");
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let failing: Vec<String> = body
                .get("checks")
                .and_then(Value::as_object)
                .map(|checks| {
                    checks
                        .iter()
                        .filter(|(_, c)| c.get("ok") == Some(&Value::Bool(false)))
                        .map(|(name, c)| {
                            format!(
                                "{name}: {}",
                                c.get("error").and_then(Value::as_str).unwrap_or("failed")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            if a.json {
                println!("{body}");
            } else {
                println!(
                    "not ready (HTTP {}): {}",
                    status.as_u16(),
                    failing.join("; ")
                );
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("not reachable: cannot reach the admin listener at {base}: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Admin {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Admin {
    fn new(a: &AdminArgs) -> Admin {
        Admin {
            base: a.base(),
            token: a.token(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .expect("static client config"),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                format!("cannot reach the admin API at {}: is `tether serve` running? (set --admin or TETHER_ADMIN)", self.base)
            } else {
                format!("admin API request failed: {e}")
            }
        })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = body
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no details");
            return Err(format!(
                "admin API answered HTTP {}: {msg}",
                status.as_u16()
            ));
        }
        Ok(body)
    }
}

/// Renders rows as a table with aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(w - c.chars().count()));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn text(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn dur(ms: &Value) -> String {
    let Some(ms) = ms.as_f64() else {
        return "-".into();
    };
    let s = (ms / 1000.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn session_rows(sessions: &[Value]) -> Vec<Vec<String>> {
    sessions
        .iter()
        .map(|s| {
            vec![
                text(s, "id"),
                text(s, "user_id"),
                format!("{} ({})", text(s, "client_name"), text(s, "client_type")),
                text(s, "state"),
                dur(&s["duration_ms"]),
                dur(&s["idle_ms"]),
                text(s, "tool_calls"),
                text(s, "errors"),
                text(s, "upstream_state"),
                text(s, "close_reason"),
                text(s, "upstream_name"),
            ]
        })
        .collect()
}

const SESSION_HEADERS: &[&str] = &[
    "SESSION",
    "USER",
    "CLIENT",
    "STATE",
    "AGE",
    "IDLE",
    "CALLS",
    "ERRORS",
    "UPSTREAM",
    "CLOSED BECAUSE",
    "SERVER",
];

fn current_thread() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("tether: {e}");
            ExitCode::FAILURE
        })
}

fn run(f: impl std::future::Future<Output = Result<String, String>>) -> ExitCode {
    let runtime = match current_thread() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(f) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pretty(v: &Value) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(v).expect("JSON serializes")
    )
}

/// Runs `tether sessions ...`.
pub fn sessions(a: &AdminArgs, cmd: &SessionsCmd) -> ExitCode {
    let admin = Admin::new(a);
    let json = a.json;
    run(async move {
        match cmd {
            SessionsCmd::List {
                status,
                user,
                client,
                server,
                since,
                limit,
            } => {
                let mut path = format!("/api/sessions?status={}&limit={limit}", encode(status));
                for (k, v) in [
                    ("user", user),
                    ("client", client),
                    ("server", server),
                    ("since", since),
                ] {
                    if let Some(v) = v {
                        path.push_str(&format!("&{k}={}", encode(v)));
                    }
                }
                let v = admin.call(reqwest::Method::GET, &path).await?;
                if json {
                    return Ok(pretty(&v));
                }
                let list = v["sessions"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    return Ok(format!("no {status} sessions\n"));
                }
                Ok(table(SESSION_HEADERS, &session_rows(&list)))
            }
            SessionsCmd::Show { id } => {
                let v = admin
                    .call(
                        reqwest::Method::GET,
                        &format!("/api/sessions/{}", encode(id)),
                    )
                    .await?;
                if json {
                    return Ok(pretty(&v));
                }
                let s = &v["session"];
                let mut out = String::new();
                for (label, key) in [
                    ("Session", "id"),
                    ("User", "user_id"),
                    ("Email", "user_email"),
                    ("Client", "client_name"),
                    ("Client version", "client_version"),
                    ("Client type", "client_type"),
                    ("Protocol", "protocol_version"),
                    ("Upstream", "upstream_name"),
                    ("Upstream state", "upstream_state"),
                    ("State", "state"),
                    ("Closed because", "close_reason"),
                    ("Tool calls", "tool_calls"),
                    ("Errors", "errors"),
                    ("Rehydrations", "rehydrations"),
                    ("Upstream restarts", "upstream_restarts"),
                ] {
                    out.push_str(&format!("{label:<18} {}\n", text(s, key)));
                }
                out.push_str(&format!("{:<18} {}\n\n", "Age", dur(&s["duration_ms"])));
                let calls = v["calls"].as_array().cloned().unwrap_or_default();
                let rows: Vec<Vec<String>> = calls
                    .iter()
                    .map(|c| {
                        vec![
                            text(c, "tool"),
                            format!("{} ms", text(c, "duration_ms")),
                            text(c, "outcome"),
                            text(c, "error_code"),
                        ]
                    })
                    .collect();
                out.push_str(&table(&["TOOL", "DURATION", "OUTCOME", "CODE"], &rows));
                Ok(out)
            }
            SessionsCmd::Close { id } => {
                let v = admin
                    .call(
                        reqwest::Method::DELETE,
                        &format!("/api/sessions/{}", encode(id)),
                    )
                    .await?;
                if json {
                    Ok(pretty(&v))
                } else {
                    Ok(format!("closed session {id} (reason: evicted)\n"))
                }
            }
        }
    })
}

fn group_rows(groups: &Value) -> Vec<Vec<String>> {
    let mut items: Vec<(&String, &Value)> = groups
        .as_object()
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    items.sort_by_key(|(_, v)| std::cmp::Reverse(v["calls"].as_i64().unwrap_or(0)));
    items
        .into_iter()
        .map(|(k, v)| {
            vec![
                k.clone(),
                text(v, "calls"),
                format!("{:.1}%", v["error_rate"].as_f64().unwrap_or(0.0) * 100.0),
                format!("{} ms", text(v, "p50_ms")),
                format!("{} ms", text(v, "p95_ms")),
            ]
        })
        .collect()
}

/// Runs `tether stats`.
pub fn stats(a: &AdminArgs, since: Option<&str>) -> ExitCode {
    let admin = Admin::new(a);
    let json = a.json;
    let path = match since {
        Some(s) => format!("/api/stats?since={}", encode(s)),
        None => "/api/stats".to_owned(),
    };
    run(async move {
        let v = admin.call(reqwest::Method::GET, &path).await?;
        if json {
            return Ok(pretty(&v));
        }
        let t = &v["totals"];
        let mut out = format!(
            "Sessions: {} recorded, {} active, average duration {}\nTool calls: {} recorded, {} failed\n",
            text(t, "sessions"),
            text(t, "active"),
            dur(&t["average_duration_ms"]),
            text(t, "tool_calls"),
            text(t, "errors"),
        );
        for (title, key) in [
            ("PER TOOL", "per_tool"),
            ("PER CLIENT TYPE", "per_client_type"),
            ("PER UPSTREAM", "per_upstream"),
            ("PER USER", "per_user"),
        ] {
            out.push('\n');
            out.push_str(&table(
                &[title, "CALLS", "ERROR RATE", "P50", "P95"],
                &group_rows(&v[key]),
            ));
        }
        Ok(out)
    })
}

/// Runs `tether users`.
pub fn users(a: &AdminArgs) -> ExitCode {
    let admin = Admin::new(a);
    let json = a.json;
    run(async move {
        let v = admin.call(reqwest::Method::GET, "/api/users").await?;
        if json {
            return Ok(pretty(&v));
        }
        let rows: Vec<Vec<String>> = v["users"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|u| {
                vec![
                    text(u, "id"),
                    text(u, "email"),
                    text(u, "name"),
                    text(u, "sessions"),
                    text(u, "active"),
                    text(u, "tool_calls"),
                    text(u, "errors"),
                ]
            })
            .collect();
        Ok(table(
            &[
                "USER", "EMAIL", "NAME", "SESSIONS", "ACTIVE", "CALLS", "ERRORS",
            ],
            &rows,
        ))
    })
}

/// What `tether tasks` lists.
#[derive(clap::Args, Debug)]
pub struct TaskFilter {
    /// Only this user id.
    #[arg(long)]
    user: Option<String>,
    /// Only tasks in this status (working, input_required, completed, failed, cancelled).
    #[arg(long)]
    status: Option<String>,
    /// Only tasks of this server (a name of the --servers file).
    #[arg(long)]
    server: Option<String>,
    /// At most this many.
    #[arg(long, default_value = "50")]
    limit: u32,
}

/// Runs `tether tasks`: the durable tasks of a running gateway, newest first.
pub fn tasks(a: &AdminArgs, f: &TaskFilter) -> ExitCode {
    let admin = Admin::new(a);
    let json = a.json;
    let mut path = format!("/api/tasks?limit={}", f.limit);
    for (k, v) in [
        ("user", &f.user),
        ("status", &f.status),
        ("server", &f.server),
    ] {
        if let Some(v) = v {
            path.push_str(&format!("&{k}={}", encode(v)));
        }
    }
    run(async move {
        let v = admin.call(reqwest::Method::GET, &path).await?;
        if json {
            return Ok(pretty(&v));
        }
        let list = v["tasks"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            return Ok("no tasks\n".to_owned());
        }
        let now = tether_core::store::now_ms();
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|t| {
                let age = t["created_ms"].as_i64().map(|c| now.saturating_sub(c));
                vec![
                    text(t, "id"),
                    text(t, "user_id"),
                    text(t, "server"),
                    text(t, "tool"),
                    text(t, "status"),
                    dur(&age.map_or(Value::Null, Value::from)),
                    text(t, "era"),
                    if t["repeatable"] == true { "yes" } else { "no" }.to_owned(),
                    text(t, "status_message"),
                ]
            })
            .collect();
        Ok(table(
            &[
                "TASK",
                "USER",
                "SERVER",
                "TOOL",
                "STATUS",
                "AGE",
                "ERA",
                "REPEATABLE",
                "MESSAGE",
            ],
            &rows,
        ))
    })
}

/// Runs `tether clients`: the stateless clients a running gateway served.
pub fn clients(a: &AdminArgs) -> ExitCode {
    let admin = Admin::new(a);
    let json = a.json;
    run(async move {
        let v = admin
            .call(reqwest::Method::GET, "/api/stateless-clients")
            .await?;
        if json {
            return Ok(pretty(&v));
        }
        let now = tether_core::store::now_ms();
        let rows: Vec<Vec<String>> = v["clients"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| {
                let ago = c["last_seen_ms"].as_i64().map(|t| now.saturating_sub(t));
                vec![
                    text(c, "user_id"),
                    text(c, "client_name"),
                    text(c, "client_version"),
                    text(c, "requests"),
                    text(c, "tool_calls"),
                    dur(&ago.map_or(Value::Null, Value::from)),
                ]
            })
            .collect();
        Ok(table(
            &[
                "USER",
                "CLIENT",
                "VERSION",
                "REQUESTS",
                "CALLS",
                "LAST SEEN",
            ],
            &rows,
        ))
    })
}

/// Runs `tether servers`: what the gateway serves, each server's endpoint, state,
/// sessions, upstreams and limits (`GET /api/servers`).
pub fn servers(a: &AdminArgs) -> ExitCode {
    let admin = Admin::new(a);
    let json = a.json;
    run(async move {
        let v = admin.call(reqwest::Method::GET, "/api/servers").await?;
        if json {
            return Ok(pretty(&v));
        }
        let rows: Vec<Vec<String>> = v["servers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|s| {
                let circuit = if s["circuit"]["open"] == true {
                    "open"
                } else {
                    "closed"
                };
                vec![
                    text(s, "name"),
                    text(s, "state"),
                    text(s, "endpoint"),
                    format!(
                        "{}/{}",
                        text(s, "held_sessions"),
                        s["limits"]["max_sessions"]
                    ),
                    format!("{}/{}", text(s, "running"), s["limits"]["max_upstreams"]),
                    circuit.to_owned(),
                    text(s, "protocol"),
                    text(s, "upstream"),
                ]
            })
            .collect();
        Ok(table(
            &[
                "SERVER",
                "STATE",
                "ENDPOINT",
                "SESSIONS",
                "UPSTREAMS",
                "CIRCUIT",
                "PROTOCOL",
                "RUNS",
            ],
            &rows,
        ))
    })
}

/// Runs `tether quotas`: the quota and each user's use of its current window.
pub fn quotas(a: &AdminArgs) -> ExitCode {
    let admin = Admin::new(a);
    let json = a.json;
    run(async move {
        let v = admin.call(reqwest::Method::GET, "/api/quotas").await?;
        if json {
            return Ok(pretty(&v));
        }
        let Some(q) = v.get("quota").filter(|q| !q.is_null()) else {
            return Ok("no quota configured (--quota-tool-calls N/WINDOW)\n".to_owned());
        };
        let now = tether_core::store::now_ms();
        let rows: Vec<Vec<String>> = v["users"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|u| {
                let left = u["resets_at_ms"].as_i64().map(|t| t.saturating_sub(now));
                vec![
                    text(u, "principal"),
                    text(u, "used"),
                    text(u, "limit"),
                    dur(&left.map_or(Value::Null, Value::from)),
                ]
            })
            .collect();
        Ok(format!(
            "{} tool calls per user every {}\n{}",
            q["tool_calls"],
            humantime::format_duration(std::time::Duration::from_millis(
                q["window_ms"].as_u64().unwrap_or_default()
            )),
            table(&["USER", "USED", "LIMIT", "RESETS IN"], &rows)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
    }
}
