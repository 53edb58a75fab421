//! The `mcpServers` file clients already use (Claude Desktop, Claude Code's `.mcp.json`,
//! Cursor, Windsurf, Cline; VS Code's `servers`), read as they write it: each entry is a
//! stdio `command` with `args`, `env` and `cwd`, or a remote `url` with `headers`
//! (Windsurf's `serverUrl` too), with `type` where given. Tether's own per-server settings
//! go in an entry's `tether` table. Keys other clients use that mean nothing here are
//! reported (file, server, key) and otherwise ignored; `disabled: true` leaves the server
//! out, as the clients do.
//!
//! Must not: do I/O beyond what the caller hands in, or accept an entry it cannot serve
//! (every problem is reported, all at once).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use crate::config::{Layer, LimitsLayer, UpstreamLayer};
pub use crate::config::{ServerEntry, ServerSettings};
use crate::upstream::{EnvPolicy, UpstreamProtocol, UpstreamSpec};

/// Keys client configs put on an entry that Tether has no use for: reported as ignored,
/// never an error (the file stays the one the client reads).
const CLIENT_KEYS: &[&str] = &[
    "autoApprove",
    "alwaysAllow",
    "timeout",
    "transportType",
    "envFile",
    "description",
    "icon",
    "gallery",
    "version",
    "dev",
    "trust",
    "includeTools",
    "excludeTools",
    "oauth",
];

/// A read servers file: its servers in file order, and what was ignored in it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServersFile {
    /// The servers (disabled ones left out).
    pub servers: Vec<ServerEntry>,
    /// What was ignored, one line each (file, server, key).
    pub notes: Vec<String>,
}

/// Servers one file may hold: each gets a registry, a reaper task and metric series (the
/// `server` label is bounded by this), so a generated file cannot make thousands.
pub const MAX_SERVERS: usize = 256;

/// Longest server name.
pub const MAX_NAME: usize = 64;

/// Whether `name` can be a server name: it becomes a URL path segment and a metric label,
/// so letters, digits, `-`, `_` and `.` only, at most [`MAX_NAME`], and not dots alone
/// (`.` and `..` are path steps: clients normalize `/servers/../mcp` to `/mcp`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.chars().all(|c| c == '.')
}

/// A valid server name for a client's entry name that is not one (`tether import`): other
/// characters become `-`, dots alone become `server`, cut to [`MAX_NAME`].
pub fn safe_name(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME)
        .collect();
    if mapped.is_empty() || mapped.chars().all(|c| c == '.') {
        "server".to_owned()
    } else {
        mapped
    }
}

/// Where a gateway is reached: a host (name or address) and port. A server whose upstream
/// is the gateway itself would have every request call the gateway again (issue 26:
/// `tether import` run twice wrote entries pointing at the gateway, and serving them
/// spawned 100 `tether connect` processes in 0.6 s).
#[derive(Debug, Clone)]
pub struct GatewayAddr {
    host: String,
    port: u16,
}

impl GatewayAddr {
    /// The gateway at URL `url` (`tether import --gateway`).
    pub fn from_url(url: &str) -> Option<GatewayAddr> {
        let u = reqwest::Url::parse(url).ok()?;
        Some(GatewayAddr {
            host: u.host_str()?.trim_matches(['[', ']']).to_ascii_lowercase(),
            port: u.port_or_known_default()?,
        })
    }

    /// The gateway listening on `addr` (an unspecified address is reached on loopback).
    pub fn listening(addr: std::net::SocketAddr) -> GatewayAddr {
        GatewayAddr {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }

    /// Whether `url` names this gateway.
    pub fn is(&self, url: &str) -> bool {
        let Ok(u) = reqwest::Url::parse(url) else {
            return false;
        };
        let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) else {
            return false;
        };
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        let local = |h: &str| {
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
        };
        port == self.port && (host == self.host || (local(&host) && local(&self.host)))
    }

    /// What of `spec` reaches this gateway, if anything: its URL, or a `tether connect` to
    /// it.
    pub fn reached_by(&self, spec: &UpstreamSpec) -> Option<String> {
        match spec {
            UpstreamSpec::Http { url, .. } => self.is(url).then(|| url.clone()),
            UpstreamSpec::Stdio { argv, .. } => {
                let program = std::path::Path::new(&argv[0])
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let connect = program.starts_with("tether") && argv.iter().any(|a| a == "connect");
                argv.iter()
                    .skip(1)
                    .find(|a| connect && self.is(a))
                    .map(|a| format!("{} connect {a}", argv[0]))
            }
        }
    }
}

/// Reads the servers file text `text` (named `file` in messages). Every problem at once.
pub fn parse(text: &str, file: &str, env_policy: &EnvPolicy) -> Result<ServersFile, Vec<String>> {
    let root: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Err(vec![format!("{file}: not JSON: {e}")]),
    };
    let mut out = ServersFile::default();
    let mut errors = Vec::new();
    let Some(obj) = root.as_object() else {
        return Err(vec![format!(
            "{file}: must be a JSON object with \"mcpServers\""
        )]);
    };
    // Claude Desktop, Cursor, Claude Code: mcpServers; VS Code: servers.
    let (table_key, table) = match (obj.get("mcpServers"), obj.get("servers")) {
        (Some(t), None) => ("mcpServers", t),
        (None, Some(t)) => ("servers", t),
        (Some(_), Some(_)) => {
            return Err(vec![format!(
                "{file}: has both \"mcpServers\" and \"servers\"; keep one"
            )]);
        }
        (None, None) => {
            return Err(vec![format!(
                "{file}: no \"mcpServers\" (or VS Code's \"servers\") object"
            )]);
        }
    };
    for k in obj.keys().filter(|k| k.as_str() != table_key) {
        out.notes
            .push(format!("{file}: top-level key {k:?} ignored"));
    }
    let Some(table) = table.as_object() else {
        return Err(vec![format!("{file}: \"{table_key}\" must be an object")]);
    };
    if table.len() > MAX_SERVERS {
        return Err(vec![format!(
            "{file}: \"{table_key}\" has {} servers; one gateway serves at most {MAX_SERVERS}",
            table.len()
        )]);
    }
    let mut lower_names: BTreeMap<String, String> = BTreeMap::new();
    for (name, entry) in table {
        let at = format!("{file}: {table_key}.{name}");
        if !valid_name(name) {
            errors.push(format!(
                "{at}: the name may hold only letters, digits, - _ and . (at most {MAX_NAME}, not dots alone): it is the endpoint /servers/NAME/mcp; `tether import` maps such names"
            ));
            continue;
        }
        if let Some(other) = lower_names.insert(name.to_ascii_lowercase(), name.clone()) {
            errors.push(format!(
                "{at}: same name as {other:?} but for case; endpoints would clash"
            ));
            continue;
        }
        match read_entry(name, entry, &at, env_policy, &mut out.notes) {
            Ok(Some(e)) => out.servers.push(e),
            Ok(None) => {}
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

impl ServerEntry {
    /// The configuration layer that serves this server alone (`tether serve --servers FILE
    /// --server NAME`): its upstream, name and settings, to be laid under the flags.
    pub fn layer(&self) -> Layer {
        let mut up = UpstreamLayer {
            name: Some(self.name.clone()),
            ..UpstreamLayer::default()
        };
        match &self.upstream {
            UpstreamSpec::Stdio { argv, env, cwd, .. } => {
                up.command = Some(argv.clone());
                up.env = (!env.is_empty()).then(|| env.clone());
                up.cwd = cwd.clone();
            }
            UpstreamSpec::Http {
                url,
                protocol,
                headers,
            } => {
                up.url = Some(url.clone());
                up.protocol = self.settings.protocol.map(|_| {
                    match protocol {
                        UpstreamProtocol::Auto => "auto",
                        UpstreamProtocol::Legacy => "legacy",
                        UpstreamProtocol::Modern => "modern",
                    }
                    .to_owned()
                });
                up.headers = (!headers.is_empty()).then(|| headers.iter().cloned().collect());
            }
        }
        let mut settings = crate::config::Settings::default();
        for (key, value) in [
            ("idle-timeout", &self.settings.idle_timeout),
            ("upstream-timeout", &self.settings.upstream_timeout),
            ("task-after", &self.settings.task_after),
        ] {
            if let Some(v) = value {
                settings.set_text(key, v.clone());
            }
        }
        if let Some(tools) = &self.settings.task_tools {
            settings.set("task-tools", crate::config::OptValue::List(tools.clone()));
        }
        Layer {
            settings,
            upstream: Some(up),
            limits: Some(self.settings.limits()).filter(|l| !l.is_empty()),
            ..Layer::default()
        }
    }
}

impl ServerSettings {
    /// The limits this server's `tether` table sets (the rows of [`crate::config::LIMITS`]
    /// marked `server`), as a layer over the gateway's.
    pub fn limits(&self) -> LimitsLayer {
        let set = [
            ("max-sessions", self.max_sessions.map(|n| n as u64)),
            ("max-upstreams", self.max_upstreams.map(|n| n as u64)),
            ("session-rate", self.session_rate.map(u64::from)),
        ];
        set.into_iter()
            .filter_map(|(key, n)| Some((key, n?)))
            .fold(LimitsLayer::default(), |l, (key, n)| l.with(key, n))
    }
}

impl ServersFile {
    /// The server `name` (`--server NAME`: that entry served alone), or the only one when
    /// no name is given.
    pub fn pick(&self, name: Option<&str>, file: &str) -> Result<&ServerEntry, String> {
        let names = || {
            self.servers
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            Some(n) => self
                .servers
                .iter()
                .find(|s| s.name == n)
                .ok_or_else(|| format!("{file}: no server named {n:?} (it has: {})", names())),
            None => match self.servers.as_slice() {
                [one] => Ok(one),
                [] => Err(format!("{file}: no enabled server in it")),
                _ => Err(format!(
                    "{file}: it has {} servers ({}); pick one with --server NAME, or leave --server out to serve them all",
                    self.servers.len(),
                    names()
                )),
            },
        }
    }
}

/// How the client reaches the gateway after `tether import`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Direct Streamable HTTP (`url`; VS Code `type: http`; Windsurf `serverUrl`).
    Url,
    /// `tether connect URL`, a command every client can launch (Claude Desktop needs it).
    Connect,
}

/// What `tether import` makes of a client's config: the servers file Tether serves (the
/// client's enabled entries as written, minus the keys only clients use), and the client's
/// config pointing each entry at the gateway's `/servers/NAME/mcp` instead.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// The servers file for `tether serve --servers`.
    pub tether: Value,
    /// The client's file, its entries replaced by gateway entries (other keys kept).
    pub client: Value,
    /// The servers moved behind the gateway, in file order.
    pub names: Vec<String>,
    /// What was ignored or left out, one line each.
    pub notes: Vec<String>,
}

/// Splits a client's config (`text`, named `file`) into what Tether serves and what the
/// client keeps; `gateway` is the gateway's base URL (`http://127.0.0.1:7450`). Every entry
/// must be one Tether can serve; errors are reported all at once, as [`parse`] does.
pub fn import(text: &str, file: &str, gateway: &str, via: Via) -> Result<Imported, Vec<String>> {
    let mut root: Value = serde_json::from_str(text).map_err(|e| vec![format!("{file}: {e}")])?;
    let key = if root.get("servers").is_some() {
        "servers"
    } else {
        "mcpServers"
    };
    // Names a gateway cannot serve under are mapped (and said so); the client keeps its own.
    let mut renamed: BTreeMap<String, String> = BTreeMap::new();
    let mut notes = Vec::new();
    let mut mapped_text = None;
    if let Some(table) = root.get(key).and_then(Value::as_object) {
        let mut taken: std::collections::BTreeSet<String> = table
            .keys()
            .filter(|k| valid_name(k))
            .map(|k| k.to_ascii_lowercase())
            .collect();
        let mut mapped = serde_json::Map::new();
        for (name, entry) in table {
            let served = if valid_name(name) {
                name.clone()
            } else {
                let base = safe_name(name);
                let mut candidate = base.clone();
                let mut n = 2;
                while taken.contains(&candidate.to_ascii_lowercase()) {
                    let suffix = format!("-{n}");
                    let keep = MAX_NAME - suffix.len();
                    candidate = format!("{}{suffix}", &base[..base.len().min(keep)]);
                    n += 1;
                }
                taken.insert(candidate.to_ascii_lowercase());
                notes.push(format!(
                    "{file}: {key}.{name}: served as {candidate:?} (a server name holds only letters, digits, - _ and ., at most {MAX_NAME}, and not dots alone)"
                ));
                renamed.insert(name.clone(), candidate.clone());
                candidate
            };
            mapped.insert(served, entry.clone());
        }
        if !renamed.is_empty() {
            let mut copy = root.clone();
            copy[key] = Value::Object(mapped);
            mapped_text = Some(copy.to_string());
        }
    }
    let mut read = parse(
        mapped_text.as_deref().unwrap_or(text),
        file,
        &EnvPolicy::Inherit,
    )?;
    notes.append(&mut read.notes);
    if let Some(gw) = GatewayAddr::from_url(gateway) {
        let looping: Vec<String> = read
            .servers
            .iter()
            .filter_map(|s| {
                gw.reached_by(&s.upstream).map(|what| {
                    format!(
                        "{file}: {key}.{}: points at this gateway ({what}): it was imported already, and serving it would make the gateway call itself; remove it or import the client's original file",
                        s.name
                    )
                })
            })
            .collect();
        if !looping.is_empty() {
            return Err(looping);
        }
    }
    let vs_code = key == "servers";
    let gateway = gateway
        .trim_end_matches('/')
        .trim_end_matches("/mcp")
        .to_owned();
    let table = root[key].as_object().cloned().unwrap_or_default();
    let mut tether = serde_json::Map::new();
    let mut client = serde_json::Map::new();
    let mut names = Vec::new();
    for (name, entry) in &table {
        let served = renamed.get(name).unwrap_or(name);
        if !read.servers.iter().any(|s| &s.name == served) {
            // Disabled: left in the client's file as it was.
            client.insert(name.clone(), entry.clone());
            continue;
        }
        let mut kept = entry.as_object().cloned().unwrap_or_default();
        kept.retain(|k, _| !CLIENT_KEYS.contains(&k.as_str()));
        tether.insert(served.clone(), Value::Object(kept));
        let url = format!("{gateway}/servers/{served}/mcp");
        let windsurf = entry.get("serverUrl").is_some();
        let pointed = match via {
            Via::Url if vs_code => serde_json::json!({"type": "http", "url": url}),
            Via::Url if windsurf => serde_json::json!({"serverUrl": url}),
            Via::Url => serde_json::json!({"type": "http", "url": url}),
            Via::Connect if vs_code => {
                serde_json::json!({"type": "stdio", "command": "tether", "args": ["connect", url]})
            }
            Via::Connect => serde_json::json!({"command": "tether", "args": ["connect", url]}),
        };
        // The client's own settings for the entry (auto-approval, timeouts) stay with it.
        let mut pointed = pointed.as_object().cloned().unwrap_or_default();
        if let Some(e) = entry.as_object() {
            for (k, v) in e {
                if CLIENT_KEYS.contains(&k.as_str()) {
                    pointed.insert(k.clone(), v.clone());
                }
            }
        }
        client.insert(name.clone(), Value::Object(pointed));
        names.push(served.clone());
    }
    root[key] = Value::Object(client);
    Ok(Imported {
        tether: serde_json::json!({ "mcpServers": tether }),
        client: root,
        names,
        notes,
    })
}

fn strings(v: &Value, at: &str, key: &str, errors: &mut Vec<String>) -> Vec<String> {
    match v.as_array() {
        Some(a) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => {
            errors.push(format!("{at}: {key:?} must be a list of strings"));
            Vec::new()
        }
    }
}

fn string_map(
    v: &Value,
    at: &str,
    key: &str,
    errors: &mut Vec<String>,
) -> BTreeMap<String, String> {
    match v.as_object() {
        Some(m) if m.values().all(Value::is_string) => m
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect(),
        _ => {
            errors.push(format!("{at}: {key:?} must be an object of strings"));
            BTreeMap::new()
        }
    }
}

fn read_entry(
    name: &str,
    entry: &Value,
    at: &str,
    env_policy: &EnvPolicy,
    notes: &mut Vec<String>,
) -> Result<Option<ServerEntry>, Vec<String>> {
    let Some(e) = entry.as_object() else {
        return Err(vec![format!("{at}: must be an object")]);
    };
    if e.get("disabled").and_then(Value::as_bool) == Some(true) {
        notes.push(format!("{at}: disabled; left out"));
        return Ok(None);
    }
    let mut errors = Vec::new();
    let mut command = None;
    let mut args = Vec::new();
    let mut env = BTreeMap::new();
    let mut cwd = None;
    let mut url = None;
    let mut headers = BTreeMap::new();
    let mut kind = None;
    let mut settings = ServerSettings::default();
    for (k, v) in e {
        match k.as_str() {
            "command" => match v.as_str() {
                Some(c) if !c.is_empty() => command = Some(c.to_owned()),
                _ => errors.push(format!("{at}: \"command\" must be a program name or path")),
            },
            "args" => args = strings(v, at, k, &mut errors),
            "env" => env = string_map(v, at, k, &mut errors),
            "cwd" => match v.as_str() {
                Some(c) => cwd = Some(PathBuf::from(c)),
                None => errors.push(format!("{at}: \"cwd\" must be a path")),
            },
            "url" | "serverUrl" => match v.as_str() {
                Some(u) => url = Some(u.to_owned()),
                None => errors.push(format!("{at}: {k:?} must be a URL")),
            },
            "headers" => headers = string_map(v, at, k, &mut errors),
            "type" => kind = v.as_str().map(str::to_owned),
            "disabled" => {}
            "tether" => settings = read_settings(v, at, &mut errors),
            other if CLIENT_KEYS.contains(&other) => {
                notes.push(format!("{at}: {other:?} is a client setting; ignored"));
            }
            other => notes.push(format!("{at}: unknown key {other:?} ignored")),
        }
    }
    let upstream = match (command, url, kind.as_deref()) {
        (Some(_), Some(_), _) => {
            errors.push(format!("{at}: give \"command\" or \"url\", not both"));
            None
        }
        (None, None, _) => {
            errors.push(format!(
                "{at}: neither \"command\" (stdio) nor \"url\" (HTTP)"
            ));
            None
        }
        (Some(_), None, Some(t)) if t != "stdio" => {
            errors.push(format!(
                "{at}: \"type\": {t:?} with a \"command\"; a command is stdio"
            ));
            None
        }
        (Some(c), None, _) => {
            if !headers.is_empty() {
                errors.push(format!("{at}: \"headers\" apply only to a \"url\""));
            }
            let mut argv = vec![c];
            argv.extend(args);
            Some(UpstreamSpec::Stdio {
                argv,
                env,
                cwd,
                env_policy: env_policy.clone(),
            })
        }
        (None, Some(u), t) => {
            if matches!(t, Some("sse")) {
                errors.push(format!(
                    "{at}: \"type\": \"sse\" is the 2024-11-05 HTTP+SSE transport, which Tether serves to clients but does not speak to upstreams; use the server's Streamable HTTP endpoint (usually /mcp)"
                ));
            } else if t.is_some_and(|t| !["http", "streamable-http", "streamableHttp"].contains(&t))
            {
                errors.push(format!(
                    "{at}: \"type\": {:?} with a \"url\"; expected \"http\"",
                    t.unwrap_or_default()
                ));
            }
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.parse::<reqwest::Url>().is_err()
            {
                errors.push(format!("{at}: {u:?} is not an http:// or https:// URL"));
            }
            if !env.is_empty() || cwd.is_some() || !args.is_empty() {
                errors.push(format!(
                    "{at}: \"args\", \"env\" and \"cwd\" apply only to a \"command\""
                ));
            }
            Some(UpstreamSpec::Http {
                url: u,
                protocol: settings.protocol.unwrap_or_default(),
                headers: headers.into_iter().collect(),
            })
        }
    };
    if settings.protocol.is_some() && matches!(upstream, Some(UpstreamSpec::Stdio { .. })) {
        errors.push(format!("{at}: tether.protocol applies only to a \"url\""));
    }
    match upstream {
        Some(upstream) if errors.is_empty() => Ok(Some(ServerEntry {
            name: name.to_owned(),
            upstream,
            settings,
        })),
        _ => Err(errors),
    }
}

fn read_settings(v: &Value, at: &str, errors: &mut Vec<String>) -> ServerSettings {
    let mut s = ServerSettings::default();
    let Some(m) = v.as_object() else {
        errors.push(format!("{at}: \"tether\" must be an object"));
        return s;
    };
    let duration = |k: &str, v: &Value, errors: &mut Vec<String>| match v.as_str() {
        Some(t) if humantime::parse_duration(t).is_ok() => Some(t.to_owned()),
        _ => {
            errors.push(format!(
                "{at}: tether.{k} must be a duration such as \"30m\""
            ));
            None
        }
    };
    for (k, v) in m {
        match k.as_str() {
            "idle-timeout" => s.idle_timeout = duration(k, v, errors),
            "upstream-timeout" => s.upstream_timeout = duration(k, v, errors),
            "task-after" => match v.as_str() {
                Some("0") => s.task_after = Some("0".into()),
                _ => s.task_after = duration(k, v, errors),
            },
            "task-tools" => s.task_tools = Some(strings(v, at, "tether.task-tools", errors)),
            "protocol" => match v.as_str().and_then(UpstreamProtocol::parse) {
                Some(p) => s.protocol = Some(p),
                None => errors.push(format!("{at}: tether.protocol must be auto, legacy or modern")),
            },
            "max-sessions" => match v.as_u64() {
                Some(n) if n > 0 => s.max_sessions = Some(n as usize),
                _ => errors.push(format!("{at}: tether.max-sessions must be a positive number")),
            },
            "max-upstreams" => match v.as_u64() {
                Some(n) if n > 0 => s.max_upstreams = Some(n as usize),
                _ => errors.push(format!("{at}: tether.max-upstreams must be a positive number")),
            },
            "session-rate" => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if n > 0 => s.session_rate = Some(n),
                _ => errors.push(format!(
                    "{at}: tether.session-rate must be a positive number (new sessions per second)"
                )),
            },
            "users" => {
                let users = strings(v, at, "tether.users", errors);
                if users.is_empty() {
                    errors.push(format!(
                        "{at}: tether.users must name at least one user (leave it out to allow every user)"
                    ));
                }
                s.users = Some(users);
            }
            other => errors.push(format!(
                "{at}: tether.{other} is not a Tether server setting (idle-timeout, upstream-timeout, task-after, task-tools, protocol, max-sessions, max-upstreams, session-rate, users)"
            )),
        }
    }
    s
}

#[cfg(test)]
mod tests;
