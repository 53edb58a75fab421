//! Pure policy decisions: which protocol era a request opens, whether an Origin is allowed,
//! how long to back off after upstream crashes. No I/O, no clocks: callers pass what they
//! know, which keeps every rule unit-testable and in one place.
//!
//! Must not: touch clocks, I/O or state.

use std::time::Duration;

use crate::protocol::{self, Kind, Message};
use crate::wire::Method;

/// How the front door must treat a POST, decided from the body and headers alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// An `initialize` request: a new legacy-era session.
    LegacyInitialize,
    /// A message for an existing legacy session.
    LegacySession(String),
    /// A modern-era (2026-07-28) stateless request: its own rules decide the rest
    /// (`modern::check`), including an unsupported version.
    Modern,
    /// A non-initialize legacy message without `MCP-Session-Id`.
    MissingSession,
}

/// The one place the era of a request is decided (2026-07-28 `basic/versioning.mdx`: "A
/// dual-era server selects its behavior from how the client opens").
///
/// An `initialize` that carries a session id belongs to that session (which refuses it): a
/// client starts a new session by sending `initialize` *without* an id (spec §1.1.7 item 4).
pub fn classify_post(
    env: &Message,
    session_header: Option<&str>,
    version_header: Option<&str>,
) -> Opening {
    // A request carrying modern `_meta` is served statelessly, whatever else it carries
    // (a modern server ignores `Mcp-Session-Id`, spec §1.2).
    if env
        .meta()
        .and_then(|m| m.get(protocol::META_PROTOCOL_VERSION))
        .is_some_and(serde_json::Value::is_string)
    {
        return Opening::Modern;
    }
    if let Some(id) = session_header {
        return Opening::LegacySession(id.to_owned());
    }
    if version_header.is_some_and(protocol::is_modern) {
        return Opening::Modern;
    }
    if env.kind() == Kind::Request && env.is(&Method::Initialize) {
        return Opening::LegacyInitialize;
    }
    if env.is(&Method::Discover) {
        return Opening::Modern;
    }
    Opening::MissingSession
}

/// The era of a GET or DELETE (the other half of deciding the era; a POST is decided by
/// [`classify_post`]): modern when it names 2026-07-28 in `MCP-Protocol-Version` and no
/// session. A modern client has no GET stream and no session to delete (405).
pub fn is_modern_get_or_delete(session_header: Option<&str>, version_header: Option<&str>) -> bool {
    session_header.is_none() && version_header.is_some_and(protocol::is_modern)
}

/// Whether a client-supplied session id can be one of ours at all: 1 to 256 visible ASCII
/// characters (spec: session ids are visible ASCII). Anything else is an unknown session.
pub fn plausible_session_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 256 && id.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Checks `MCP-Protocol-Version` on a legacy request: absent means 2025-03-26 (§1.1.8);
/// anything else must be a version we serve, or the caller answers 400.
pub fn legacy_version(header: Option<&str>) -> Result<&str, String> {
    match header {
        None => Ok(protocol::DEFAULT_VERSION),
        Some(v) if protocol::is_supported_legacy(v) => Ok(v),
        Some(v) => Err(format!(
            "unsupported MCP-Protocol-Version {v:?}; supported: {}",
            protocol::LEGACY_VERSIONS.join(", ")
        )),
    }
}

/// Whether a present `Origin` header is allowed. Loopback origins (localhost, 127.0.0.0/8,
/// [::1], any scheme and port) are allowed by default; `allowed` lists exact origins such as
/// `https://app.example.com`, or `*` for any.
pub fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let Some((_, rest)) = origin.split_once("://") else {
        return false;
    };
    // An origin is scheme://host[:port], nothing else (`http://127.0.0.1:1@evil.com` is
    // evil.com's, and used to pass as loopback).
    plain_host(rest).is_some_and(|(name, _)| is_loopback_name(&name))
}

/// `text` as a plain `host[:port]` (RFC 9110 §7.2: a name of letters, digits, `-`, `.`
/// and `_`, an IPv4 address, or an IPv6 address in brackets; an optional decimal port):
/// the host lowercased, without brackets, and the port. `None` for anything else, such as
/// userinfo (`127.0.0.1:1@evil.com`), a path, or an empty name.
pub fn plain_host(text: &str) -> Option<(String, Option<u16>)> {
    let (name, port) = if let Some(v6) = text.strip_prefix('[') {
        let (addr, rest) = v6.split_once(']')?;
        addr.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match rest {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (addr, port)
    } else {
        match text.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (text, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok()?)
        }
        Some(_) => return None,
    };
    let bracketed = text.starts_with('[');
    let ok = !name.is_empty()
        && (bracketed
            || name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')));
    ok.then(|| (name.to_ascii_lowercase(), port))
}

/// The host a request names (RFC 9112 §3.2: the authority of an absolute-form request
/// line, else its one `Host` header), or why the request is malformed: two `Host`
/// headers (proxies and servers disagree on which wins), a `Host` or authority that is not
/// a plain `host[:port]`. `None`: no host named at all (HTTP/1.0).
pub fn request_host(hosts: &[&str], authority: Option<&str>) -> Result<Option<String>, String> {
    if hosts.len() > 1 {
        return Err("more than one Host header".into());
    }
    for h in hosts {
        if plain_host(h).is_none() {
            return Err(format!("Host {h:?} is not a plain host[:port]"));
        }
    }
    if let Some(a) = authority {
        if plain_host(a).is_none() {
            return Err(format!(
                "the request target's authority {a:?} is not a plain host[:port]"
            ));
        }
        return Ok(Some(a.to_owned()));
    }
    Ok(hosts.first().map(|h| (*h).to_owned()))
}

/// `localhost`, `*.localhost`, 127.0.0.0/8 or `::1` (lowercase, without port or brackets).
fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name == "::1"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a request's `Host` header is allowed (DNS-rebinding protection, spec §1.1.2 and
/// the SDKs' `allowedHosts`). A page on `evil.example` whose name was rebound to 127.0.0.1
/// reaches a loopback listener with `Host: evil.example`; a real local client says
/// `localhost`, `127.x.x.x` or `[::1]`. So: loopback names are always allowed; `allowed`
/// adds names (`host` matches any port, `host:port` one port) or `*` for any; and when
/// `allowed` is empty the check applies only to a loopback listener, because on a public
/// address Tether cannot know the names it is reached by (authentication guards it there).
pub fn host_allowed(host: &str, allowed: &[String], loopback_listener: bool) -> bool {
    if allowed.is_empty() && !loopback_listener {
        return true;
    }
    let Some((name, _)) = plain_host(host) else {
        return false;
    };
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(&name))
    {
        return true;
    }
    is_loopback_name(&name)
}

/// Upstream restart backoff. The first crash restarts at once (a single crash is the common
/// case and the client should not wait); each further crash in a row doubles the wait from
/// `base`, capped at `max`, scaled by `jitter` in [0.5, 1.0] so many sessions whose
/// upstreams crashed together do not restart in lockstep.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The wait after the second crash in a row.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The wait before restart attempt after `failures` consecutive failures.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        if failures <= 1 {
            return Duration::ZERO;
        }
        let exp = (failures - 2).min(20);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.max);
        // NaN would panic in `mul_f64` (clamp keeps it): no jitter then.
        let jitter = if jitter.is_nan() {
            1.0
        } else {
            jitter.clamp(0.5, 1.0)
        };
        raw.mul_f64(jitter)
    }
}

/// Whether streams of a session speaking `version` start with a priming event (event id,
/// empty data, `retry`): from 2025-11-25 on; older clients may choke on an empty event.
/// Versions are dates, so they compare as strings.
pub fn primes_streams(version: &str) -> bool {
    version >= "2025-11-25"
}

/// A session counts as idle when nothing touched it for `idle` and it holds no open stream
/// and no request in flight (an open stream proves a live client: keepalive writes to a
/// dead connection fail and detach it).
pub fn is_idle(
    since_active: Duration,
    idle: Duration,
    open_streams: usize,
    in_flight: usize,
) -> bool {
    open_streams == 0 && in_flight == 0 && since_active >= idle
}

/// The client family, from `clientInfo.name` (case-insensitive substring match, most
/// specific first). Bounded set: safe as a metrics label and a filter.
pub fn client_type(client_name: Option<&str>) -> &'static str {
    let Some(name) = client_name else {
        return "unknown";
    };
    let n = name.to_ascii_lowercase();
    const RULES: &[(&str, &str)] = &[
        ("claude-code", "Claude Code"),
        ("claude code", "Claude Code"),
        ("claude", "Claude Desktop"),
        ("cursor", "Cursor"),
        ("visual studio code", "VS Code"),
        ("vscode", "VS Code"),
        ("vs code", "VS Code"),
        ("windsurf", "Windsurf"),
        ("cline", "Cline"),
        ("zed", "Zed"),
        ("gemini", "Gemini CLI"),
        ("codex", "Codex"),
        ("inspector", "MCP Inspector"),
    ];
    RULES
        .iter()
        .find(|(needle, _)| n.contains(needle))
        .map_or("unknown", |(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(s: &str) -> Message {
        Message::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn era_is_decided_from_the_opening() {
        let init = env(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#);
        assert_eq!(classify_post(&init, None, None), Opening::LegacyInitialize);
        assert_eq!(
            classify_post(&init, Some("s"), None),
            Opening::LegacySession("s".into())
        );
        let call = env(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
        assert_eq!(
            classify_post(&call, Some("abc"), None),
            Opening::LegacySession("abc".into())
        );
        assert_eq!(classify_post(&call, None, None), Opening::MissingSession);
        assert_eq!(
            classify_post(&call, None, Some("2026-07-28")),
            Opening::Modern
        );
        let modern = env(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        );
        assert_eq!(classify_post(&modern, None, None), Opening::Modern);
        // Modern `_meta` wins over a session id (a modern server ignores it) ...
        assert_eq!(classify_post(&modern, Some("abc"), None), Opening::Modern);
        // ... and a modern `initialize` is a removed method, not a legacy opening.
        let modern_init = env(
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        );
        assert_eq!(classify_post(&modern_init, None, None), Opening::Modern);
        assert_eq!(
            classify_post(&init, None, Some("2026-07-28")),
            Opening::Modern
        );
        let discover = env(r#"{"jsonrpc":"2.0","id":1,"method":"server/discover"}"#);
        assert_eq!(classify_post(&discover, None, None), Opening::Modern);
    }

    #[test]
    fn a_get_or_delete_is_modern_only_by_its_version_header_without_a_session() {
        assert!(is_modern_get_or_delete(None, Some("2026-07-28")));
        assert!(!is_modern_get_or_delete(Some("abc"), Some("2026-07-28")));
        assert!(!is_modern_get_or_delete(None, Some("2025-11-25")));
        assert!(!is_modern_get_or_delete(None, None));
    }

    #[test]
    fn protocol_version_header() {
        assert_eq!(legacy_version(None), Ok("2025-03-26"));
        assert_eq!(legacy_version(Some("2025-06-18")), Ok("2025-06-18"));
        assert!(legacy_version(Some("1999-01-01")).is_err());
        assert!(legacy_version(Some("2026-07-28")).is_err());
    }

    #[test]
    fn hosts() {
        let none: Vec<String> = vec![];
        for ok in [
            "localhost:8080",
            "127.0.0.1",
            "127.9.9.9:1",
            "[::1]:3000",
            "LOCALHOST",
        ] {
            assert!(host_allowed(ok, &none, true), "{ok}");
        }
        for bad in [
            "evil.example.com",
            "evil.example.com:8080",
            "localhost.evil.com",
            "10.0.0.1:80",
        ] {
            assert!(!host_allowed(bad, &none, true), "{bad}");
            assert!(
                host_allowed(bad, &none, false),
                "no check on a public listener: {bad}"
            );
        }
        let named = vec![
            "mcp.example.com".to_owned(),
            "other.example:9000".to_owned(),
        ];
        assert!(host_allowed("mcp.example.com:443", &named, false));
        assert!(host_allowed("MCP.example.com", &named, true));
        assert!(host_allowed("other.example:9000", &named, false));
        assert!(!host_allowed("other.example:9001", &named, false));
        assert!(
            !host_allowed("evil.example.com", &named, false),
            "a list applies everywhere"
        );
        assert!(
            host_allowed("127.0.0.1:80", &named, false),
            "loopback names always pass"
        );
        assert!(host_allowed("anything", &["*".to_owned()], true));
        // Issue 26: only a plain host[:port] is a host.
        for bad in [
            "127.0.0.1:7450@evil.com",
            "localhost:80/x",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "[::1",
            "[evil]:80",
            "",
            "user@localhost",
        ] {
            assert!(plain_host(bad).is_none(), "{bad}");
            assert!(!host_allowed(bad, &none, true), "{bad}");
        }
        assert_eq!(
            plain_host("[::1]:3000"),
            Some(("::1".to_owned(), Some(3000)))
        );
        assert_eq!(
            request_host(&["127.0.0.1:1"], None),
            Ok(Some("127.0.0.1:1".to_owned()))
        );
        assert!(request_host(&["127.0.0.1:1", "evil.com"], None).is_err());
        assert!(request_host(&["127.0.0.1:1@evil.com"], None).is_err());
        assert_eq!(
            request_host(&["127.0.0.1:1"], Some("evil.com")),
            Ok(Some("evil.com".to_owned())),
            "an absolute-form target names the host (RFC 9112 §3.2.2)"
        );
        assert_eq!(request_host(&[], None), Ok(None));
    }

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        for ok in [
            "http://localhost:3000",
            "http://127.0.0.1",
            "https://[::1]:8443",
            "http://app.localhost",
        ] {
            assert!(origin_allowed(ok, &none), "{ok}");
        }
        for bad in [
            "http://evil.example.com",
            "null",
            "http://localhost.evil.com",
            "http://128.0.0.1",
            "http://127.0.0.1:1@evil.com",
            "http://localhost/x",
        ] {
            assert!(!origin_allowed(bad, &none), "{bad}");
        }
        assert!(origin_allowed(
            "https://app.example.com",
            &["https://app.example.com".into()]
        ));
        assert!(origin_allowed("https://x.y", &["*".into()]));
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 1.0), Duration::ZERO);
        assert_eq!(b.delay(1, 1.0), Duration::ZERO);
        let mut last = Duration::ZERO;
        for failures in 2..12 {
            let d = b.delay(failures, 1.0);
            assert!(d >= last, "non-decreasing at {failures}");
            assert!(d <= b.max);
            // jitter only ever shortens, by at most half
            let lo = b.delay(failures, 0.0);
            assert!(lo >= d / 2 - Duration::from_nanos(1) && lo <= d);
            last = d;
        }
        assert_eq!(b.delay(40, 1.0), b.max);
        assert_eq!(b.delay(3, 1.0), 2 * b.delay(2, 1.0));
    }

    /// The same properties over a grid of configurations, failure counts and jitters
    /// (deterministic: every case, no sampling), including extremes that could overflow.
    #[test]
    fn backoff_properties_hold_for_every_configuration() {
        let bases = [1u64, 7, 250, 1_000, 60_000];
        let maxes = [1u64, 500, 30_000, 3_600_000, u64::MAX / 4];
        let jitters = [f64::NEG_INFINITY, -1.0, 0.0, 0.5, 0.73, 1.0, 2.0, f64::NAN];
        for base in bases.map(Duration::from_millis) {
            for max in maxes.map(Duration::from_millis) {
                let b = Backoff { base, max };
                let mut last = Duration::ZERO;
                for failures in 0..=70u32 {
                    let full = b.delay(failures, 1.0);
                    // Bounds: nothing before the second failure, never above max.
                    if failures <= 1 {
                        assert_eq!(full, Duration::ZERO);
                    } else {
                        assert!(full <= max, "{b:?} {failures}");
                        assert!(full >= base.min(max), "{b:?} {failures}");
                    }
                    // Growth: non-decreasing, doubling until the cap.
                    assert!(full >= last, "{b:?} {failures}");
                    // (the exponent stops growing after 20 doublings)
                    if (3..=22).contains(&failures) && last * 2 <= max {
                        assert_eq!(full, last * 2, "{b:?} {failures}");
                    }
                    last = full;
                    // Jitter: any input lands in [full/2, full].
                    for j in jitters {
                        let d = b.delay(failures, j);
                        assert!(
                            d <= full && d + Duration::from_nanos(1) >= full / 2,
                            "{b:?} {failures} {j}"
                        );
                    }
                }
                assert_eq!(last, base.saturating_mul(1 << 20).min(max), "{b:?}");
            }
        }
    }

    #[test]
    fn streams_are_primed_from_2025_11_25() {
        for (v, primed) in [
            ("2024-11-05", false),
            ("2025-03-26", false),
            ("2025-06-18", false),
            ("2025-11-25", true),
            ("2026-07-28", true),
        ] {
            assert_eq!(primes_streams(v), primed, "{v}");
        }
    }

    #[test]
    fn client_types() {
        for (name, t) in [
            ("claude-code", "Claude Code"),
            ("claude-ai", "Claude Desktop"),
            ("cursor-vscode", "Cursor"),
            ("Visual Studio Code", "VS Code"),
            ("windsurf-client", "Windsurf"),
            ("Cline", "Cline"),
            ("Zed", "Zed"),
            ("gemini-cli-mcp-client", "Gemini CLI"),
            ("codex-mcp-client", "Codex"),
            ("mcp-inspector", "MCP Inspector"),
            ("my-script", "unknown"),
        ] {
            assert_eq!(client_type(Some(name)), t, "{name}");
        }
        assert_eq!(client_type(None), "unknown");
    }

    #[test]
    fn idleness() {
        let idle = Duration::from_secs(10);
        assert!(is_idle(Duration::from_secs(11), idle, 0, 0));
        assert!(!is_idle(Duration::from_secs(11), idle, 1, 0));
        assert!(!is_idle(Duration::from_secs(11), idle, 0, 1));
        assert!(!is_idle(Duration::from_secs(9), idle, 0, 0));
    }
}
