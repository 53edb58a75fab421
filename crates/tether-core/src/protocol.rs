//! JSON-RPC envelope handling for MCP messages.
//!
//! This module only classifies and rewrites messages; it depends on nothing else in the crate
//! and does no I/O. The gateway deliberately works on `serde_json::Value` rather than typed
//! MCP structs: it must forward methods and fields it does not know (future spec revisions,
//! `experimental` capabilities) byte-for-byte in meaning, and only ever touches `id`,
//! `method`, a few `params` fields and `_meta.progressToken`.
//!
//! Must not: know about sessions or HTTP.

use serde_json::{Value, json};

/// Legacy-era protocol versions the front door accepts (spec §1.1.8: absent means 2025-03-26).
pub const LEGACY_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
/// The version assumed when a request carries no `MCP-Protocol-Version` header.
pub const DEFAULT_VERSION: &str = "2025-03-26";
/// The modern (stateless) era's version the front door serves.
pub const MODERN_VERSION: &str = "2026-07-28";
/// Every version the gateway serves, newest first (`server/discover`'s `supportedVersions`
/// and the list in a `-32022` error).
pub const SUPPORTED_VERSIONS: &[&str] = &[
    MODERN_VERSION,
    "2025-11-25",
    "2025-06-18",
    "2025-03-26",
    "2024-11-05",
];
/// `_meta` key that marks a modern-era request.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key of a modern request's client info.
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
/// `_meta` key of a modern request's client capabilities.
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key of a modern request's log level (no key: no log notifications).
pub const META_LOG_LEVEL: &str = "io.modelcontextprotocol/logLevel";
/// `_meta` key tying a `subscriptions/listen` notification to its subscription.
pub const META_SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";
/// `_meta` key a modern server identifies itself with.
pub const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";

/// JSON-RPC and Tether error codes. Tether's own codes sit in the legacy server-error range
/// (-32000..-32019) that the 2026-07-28 spec leaves to implementations.
pub mod code {
    /// Invalid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid JSON-RPC message.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Method not found.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid params.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Internal error.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// Resource not found, before 2026-07-28 (SEP-2164 made it `INVALID_PARAMS`).
    pub const LEGACY_RESOURCE_NOT_FOUND: i64 = -32002;
    /// Generic server error (bad header, forbidden origin, missing session).
    pub const SERVER_ERROR: i64 = -32000;
    /// Session not found (TypeScript SDK convention, kept for client compatibility).
    pub const SESSION_NOT_FOUND: i64 = -32001;
    /// The upstream could not be started or is backing off after a crash loop.
    pub const UPSTREAM_UNAVAILABLE: i64 = -32010;
    /// The upstream went away while this request was in flight.
    pub const UPSTREAM_LOST: i64 = -32011;
    /// The upstream did not answer within `--upstream-timeout`.
    pub const UPSTREAM_TIMEOUT: i64 = -32012;
    /// The gateway restarted while this request was in flight and it was not safe to retry.
    pub const INTERRUPTED: i64 = -32013;
    /// The session's store could not record the request.
    pub const STORE_UNAVAILABLE: i64 = -32014;
    /// The session was closed while the request was in flight.
    pub const SESSION_CLOSED: i64 = -32015;
    /// A limit of the gateway was reached (sessions, upstreams, creation rate); `data.limit`
    /// names it.
    pub const LIMIT_REACHED: i64 = -32016;
    /// The upstream's answer was larger than `--max-upstream-message`; the upstream keeps
    /// running.
    pub const UPSTREAM_MESSAGE_TOO_LARGE: i64 = -32017;
    /// The client went away (closed its response stream) before the answer; recorded as
    /// the call's outcome, never seen by the client.
    pub const CANCELLED: i64 = -32018;
    /// 2026-07-28: a request header does not match its body (HeaderMismatch).
    pub const HEADER_MISMATCH: i64 = -32020;
    /// 2026-07-28: the request needs a client capability the client did not declare.
    pub const MISSING_CLIENT_CAPABILITY: i64 = -32021;
    /// 2026-07-28: unsupported protocol version.
    pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
}

pub use crate::wire::{EnvelopeError, Kind, Message};

/// Whether a message needs an answer: every MCP notification's method is under
/// `notifications/`, so any other method is a request, and a request without an `id`
/// could never be answered (issue 26: such a `tools/call` reached the upstream uncounted
/// by the quota and unrecorded).
pub fn needs_answer(method: &str) -> bool {
    !method.starts_with("notifications/")
}

/// Whether `v` is one well-formed JSON-RPC 2.0 message (what an upstream must send to be
/// relayed as it is).
pub fn is_message(v: &Value) -> bool {
    Message::from_value(v.clone()).is_ok()
}

/// The length of `v` written as compact JSON, without writing it anywhere.
pub fn encoded_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Replaces the `id` of a message.
pub fn set_id(value: &mut Value, id: Value) {
    if let Some(obj) = value.as_object_mut() {
        obj.insert("id".to_owned(), id);
    }
}

/// A JSON-RPC error response. `id` is `Value::Null` when the failing message had none.
pub fn error_response(
    id: Value,
    code: i64,
    message: impl Into<String>,
    data: Option<Value>,
) -> Value {
    let mut error = json!({ "code": code, "message": message.into() });
    if let Some(data) = data {
        error["data"] = data;
    }
    let mut v = json!({ "jsonrpc": "2.0", "error": error });
    v["id"] = id;
    v
}

/// A JSON-RPC request.
pub fn request(id: Value, method: &str, params: Option<Value>) -> Value {
    let mut v = json!({ "jsonrpc": "2.0", "method": method });
    v["id"] = id;
    if let Some(p) = params {
        v["params"] = p;
    }
    v
}

/// A JSON-RPC notification.
pub fn notification(method: &str, params: Option<Value>) -> Value {
    let mut v = json!({ "jsonrpc": "2.0", "method": method });
    if let Some(p) = params {
        v["params"] = p;
    }
    v
}

/// Whether `version` is a legacy-era version the gateway serves.
pub fn is_supported_legacy(version: &str) -> bool {
    LEGACY_VERSIONS.contains(&version)
}

/// Whether `version` belongs to the modern (stateless) era. Versions are ISO dates, so a
/// string comparison orders them.
pub fn is_modern(version: &str) -> bool {
    version.len() == 10 && version >= MODERN_VERSION
}

/// How a `tools/call` answer ends, for the ledger: `ok`, `tool_error` (a result with
/// `isError`), or for a JSON-RPC error `timeout`, `upstream_lost`, `interrupted`,
/// `session_closed` or `error`, with the code.
pub fn call_outcome(response: &Message) -> (&'static str, Option<i64>) {
    if let Some(c) = response.error_code() {
        let kind = match c {
            code::UPSTREAM_TIMEOUT => "timeout",
            code::UPSTREAM_LOST => "upstream_lost",
            code::INTERRUPTED => "interrupted",
            code::SESSION_CLOSED => "session_closed",
            code::UPSTREAM_UNAVAILABLE => "upstream_unavailable",
            code::LIMIT_REACHED => "refused",
            code::UPSTREAM_MESSAGE_TOO_LARGE => "too_large",
            code::CANCELLED => "cancelled",
            _ => "error",
        };
        return (kind, Some(c));
    }
    if response.is_tool_error() {
        return ("tool_error", None);
    }
    ("ok", None)
}

/// Tool names whose annotations say a repeated call is harmless (`readOnlyHint` or
/// `idempotentHint`), read from a `tools/list` result.
pub fn safe_tools(list_result: &Value) -> impl Iterator<Item = String> + '_ {
    list_result
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|tool| {
            let ann = tool.get("annotations");
            let flag = |k: &str| ann.and_then(|a| a.get(k)).and_then(Value::as_bool) == Some(true);
            flag("readOnlyHint") || flag("idempotentHint")
        })
        .filter_map(|tool| tool.get("name").and_then(Value::as_str).map(str::to_owned))
}

/// The tools of a `tools/list` result that declare `execution.taskSupport` other than
/// `forbidden`, with what they declare.
pub fn task_support(list_result: &Value) -> impl Iterator<Item = (String, String)> + '_ {
    list_result
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|tool| {
            let support = tool.pointer("/execution/taskSupport")?.as_str()?;
            let name = tool.get("name")?.as_str()?;
            (support != "forbidden").then(|| (name.to_owned(), support.to_owned()))
        })
}

/// Session state a client sets up after `initialize` that a fresh upstream must be told again.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Restore {
    /// Last accepted `logging/setLevel` level.
    pub log_level: Option<Value>,
    /// URIs with an accepted `resources/subscribe`.
    pub subscriptions: std::collections::BTreeSet<String>,
}

impl Restore {
    /// Reads the stored form.
    pub fn from_json(v: &Value) -> Restore {
        Restore {
            log_level: v.get("logLevel").cloned(),
            subscriptions: v
                .get("subscriptions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect(),
        }
    }

    /// The stored form.
    pub fn to_json(&self) -> Value {
        let mut v = json!({ "subscriptions": self.subscriptions });
        if let Some(level) = &self.log_level {
            v["logLevel"] = level.clone();
        }
        v
    }
}

/// A change to [`Restore`] that takes effect when the upstream accepts the request.
#[derive(Debug, Clone)]
pub enum RestoreOp {
    /// `logging/setLevel`.
    SetLevel(Value),
    /// `resources/subscribe`.
    Subscribe(String),
    /// `resources/unsubscribe`.
    Unsubscribe(String),
}

impl RestoreOp {
    /// The change a client request would make, if it is one of those methods (reads the
    /// params of those methods only).
    pub fn of_message(message: &Message) -> Option<RestoreOp> {
        use crate::wire::Method;
        match message.method()? {
            Method::SetLevel | Method::ResourcesSubscribe | Method::ResourcesUnsubscribe => {
                RestoreOp::of(&message.to_value())
            }
            _ => None,
        }
    }

    /// The change a client request would make, if it is one of those methods.
    pub fn of(message: &Value) -> Option<RestoreOp> {
        let params = message.get("params");
        let uri = || params?.get("uri")?.as_str().map(str::to_owned);
        match message.get("method")?.as_str()? {
            "logging/setLevel" => Some(RestoreOp::SetLevel(params?.get("level")?.clone())),
            "resources/subscribe" => uri().map(RestoreOp::Subscribe),
            "resources/unsubscribe" => uri().map(RestoreOp::Unsubscribe),
            _ => None,
        }
    }
}

impl Restore {
    /// Applies an accepted change; returns whether anything changed.
    pub fn apply(&mut self, op: &RestoreOp) -> bool {
        match op {
            RestoreOp::SetLevel(level) => {
                self.log_level.replace(level.clone()).as_ref() != Some(level)
            }
            RestoreOp::Subscribe(uri) => self.subscriptions.insert(uri.clone()),
            RestoreOp::Unsubscribe(uri) => self.subscriptions.remove(uri),
        }
    }

    /// The requests that put a fresh server in this state, as (method, params).
    pub fn requests(&self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if let Some(level) = &self.log_level {
            out.push(("logging/setLevel", json!({ "level": level })));
        }
        for uri in &self.subscriptions {
            out.push(("resources/subscribe", json!({ "uri": uri })));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_tool_call_names_a_tool() {
        let env = |m: &str| {
            Message::parse(
                json!({"jsonrpc": "2.0", "id": 1, "method": m, "params": {"name": "x"}})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap()
        };
        assert_eq!(env("tools/call").tool_name().as_deref(), Some("x"));
        assert_eq!(env("prompts/get").tool_name(), None);
    }

    #[test]
    fn classifies_messages() {
        let r = Message::parse(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#).unwrap();
        assert_eq!(r.kind(), Kind::Request);
        let n =
            Message::parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert_eq!(n.kind(), Kind::Notification);
        let s = Message::parse(br#"{"jsonrpc":"2.0","id":"a","result":{}}"#).unwrap();
        assert_eq!(s.kind(), Kind::Response);
    }

    #[test]
    fn rejects_bad_envelopes() {
        assert!(matches!(
            Message::parse(b"{not json"),
            Err(EnvelopeError::Parse(_))
        ));
        assert!(matches!(
            Message::parse(&[0xff, 0xfe]),
            Err(EnvelopeError::Parse(_))
        ));
        for bad in [
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"error":"bad"}"#,
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":1}}"#,
            r#"{"error":"bad","id":5}"#,
            r#""hello""#,
        ] {
            let err = Message::parse(bad.as_bytes()).unwrap_err();
            assert_eq!(err.code(), code::INVALID_REQUEST, "{bad}");
        }
    }

    #[test]
    fn only_notifications_go_without_an_id() {
        assert!(!needs_answer("notifications/initialized"));
        assert!(!needs_answer("notifications/cancelled"));
        for m in ["tools/call", "ping", "initialize", "x/notifications/y"] {
            assert!(needs_answer(m), "{m}");
        }
        assert!(is_message(
            &json!({"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "m"}})
        ));
        assert!(!is_message(&json!({"hello": "world"})));
    }

    #[test]
    fn version_eras() {
        assert!(is_supported_legacy("2025-11-25"));
        assert!(!is_supported_legacy("2026-07-28"));
        assert!(is_modern("2026-07-28"));
        assert!(!is_modern("2025-11-25"));
        assert!(!is_modern("garbage"));
    }

    #[test]
    fn restore_state_follows_accepted_changes() {
        let mut r = Restore::default();
        let ops = [
            json!({"method": "logging/setLevel", "params": {"level": "debug"}}),
            json!({"method": "resources/subscribe", "params": {"uri": "a"}}),
            json!({"method": "resources/subscribe", "params": {"uri": "b"}}),
            json!({"method": "resources/unsubscribe", "params": {"uri": "b"}}),
        ];
        for op in &ops {
            assert!(r.apply(&RestoreOp::of(op).unwrap()));
        }
        assert!(
            !r.apply(&RestoreOp::of(&ops[0]).unwrap()),
            "same level again changes nothing"
        );
        assert!(RestoreOp::of(&json!({"method": "tools/list"})).is_none());
        assert_eq!(Restore::from_json(&r.to_json()), r);
        assert_eq!(r.requests().len(), 2);
    }

    #[test]
    fn finds_safe_tools() {
        let list = json!({"tools":[
            {"name":"a","annotations":{"readOnlyHint":true}},
            {"name":"b","annotations":{"idempotentHint":true}},
            {"name":"c","annotations":{"destructiveHint":true}},
            {"name":"d"}]});
        let safe: Vec<_> = safe_tools(&list).collect();
        assert_eq!(safe, vec!["a", "b"]);
    }
}
