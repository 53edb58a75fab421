//! [`Config::resolve`]: the layers laid over each other and over the defaults, every
//! value parsed and checked, every problem reported at once.
//!
//! Must not: do I/O beyond reading a secret file it names, or stop at the first problem.

use super::values::Reader;
use super::*;

pub(super) fn duration(
    errors: &mut Vec<String>,
    field: &str,
    value: Option<&str>,
    default: &str,
) -> Duration {
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

pub(super) fn size(
    errors: &mut Vec<String>,
    field: &str,
    value: Option<&OptValue>,
    default: &str,
) -> usize {
    let parse = |t: &str| {
        t.parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| format!("{field}: {t:?} is not a size like 4MiB ({e})"))
    };
    let bytes = match value {
        None => parse(default),
        Some(OptValue::Number(b)) => Ok(*b),
        Some(OptValue::Text(t)) => parse(t),
        Some(_) => Err(format!("{field}: must be a size like 4MiB")),
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
        let set = &layer.settings;
        let listen_text = set.text("listen");
        let listen_text = listen_text.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|e| {
            errors.push(format!(
                "listen: {listen_text:?} is not an address like 127.0.0.1:7450 ({e})"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let store = resolve_store(&mut errors, &layer, listen);
        let mut r = Reader {
            layer: set,
            errors: &mut errors,
        };
        let idle_timeout = r.duration("idle-timeout");
        let keepalive = r.duration("keepalive");
        let upstream_timeout = r.duration("upstream-timeout");
        let shutdown_grace = r.duration("shutdown-grace");
        let max_body = r.size("max-body");
        let retention = r.duration("retention");
        let answer_window = match set.text("answer-window").as_deref().map(str::trim) {
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
        let task_after = task_after(&mut errors, set.text("task-after").as_deref());
        let task_tools = set.list("task-tools").unwrap_or_default();
        let limits = Limits::resolve(&mut errors, &layer.limits.clone().unwrap_or_default());
        let admin_text = set.text("admin-listen");
        let admin_text = admin_text.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
        let admin_listen = admin_text.parse::<SocketAddr>().unwrap_or_else(|e| {
            errors.push(format!(
                "admin-listen: {admin_text:?} is not an address like 127.0.0.1:7451 ({e})"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let admin_token = set.text("admin-token").filter(|t| !t.is_empty());
        let admin_token_file = set.text("admin-token-file").map(PathBuf::from);
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
        let allowed_origins = set.list("allowed-origins").unwrap_or_default();
        for o in &allowed_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                errors.push(format!(
                    "allowed-origins: {o:?} must be * or start with http:// or https://"
                ));
            }
        }
        let allowed_hosts = set.list("allowed-hosts").unwrap_or_default();
        for h in &allowed_hosts {
            if h.is_empty() || h.contains(['/', ' ', '@']) {
                errors.push(format!(
                    "allowed-hosts: {h:?} must be * or a host name, optionally with :port"
                ));
            }
        }

        let ledger = match set.text("ledger").as_deref() {
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
        let demo = set.switch("demo").unwrap_or(false);
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
            state_dir: set
                .text("state-dir")
                .map(PathBuf::from)
                .unwrap_or_else(default_state_dir),
            idle_timeout,
            keepalive,
            max_body,
            upstream_timeout,
            answer_window,
            task_after,
            task_tools,
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
    let set = &layer.settings;
    let redis_only = [
        "store-prefix",
        "session-ttl",
        "advertise-url",
        "instance-ttl",
    ]
    .map(|key| (key, set.get(key).is_some()));
    match set.text("store").as_deref() {
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
            let mut r = Reader {
                layer: set,
                errors: &mut *errors,
            };
            let session_ttl = r.duration("session-ttl");
            let instance_ttl = r.duration("instance-ttl");
            if instance_ttl < Duration::from_secs(1) && !instance_ttl.is_zero() {
                errors.push("instance-ttl: must be at least 1s".to_owned());
            }
            let prefix = set
                .text("store-prefix")
                .unwrap_or_else(|| DEFAULT_STORE_PREFIX.to_owned());
            if prefix.is_empty() || prefix.contains(char::is_whitespace) {
                errors.push(format!(
                    "store-prefix: {prefix:?} must be non-empty and without spaces"
                ));
            }
            let advertise_url = set.text("advertise-url");
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

/// `task-after`: a duration, `0` meaning at once.
pub(crate) fn task_after(errors: &mut Vec<String>, text: Option<&str>) -> Duration {
    match text.map(str::trim) {
        None => Duration::from_secs(DEFAULT_TASK_AFTER_SECS),
        Some("0") => Duration::ZERO,
        Some(t) => humantime::parse_duration(t).unwrap_or_else(|e| {
            errors.push(format!(
                "task-after: {t:?} is not a duration such as \"5s\" ({e})"
            ));
            Duration::from_secs(DEFAULT_TASK_AFTER_SECS)
        }),
    }
}
