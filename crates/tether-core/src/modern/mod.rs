//! The modern era (2026-07-28) as pure rules: what a stateless request must carry (spec
//! §1.2, `mcp-spec-notes.md`), and how the bridge translates between a modern client and a
//! legacy upstream session: the `initialize` it derives from a request's `_meta`, what it
//! strips before forwarding, what it adds to every result (`resultType`, caching hints),
//! `server/discover` from the upstream's `InitializeResult`, Multi Round-Trip Requests
//! (`InputRequiredResult` and a sealed `requestState`), and which log notifications a
//! request opted into.
//!
//! Must not: do I/O, read a clock (callers pass the time), or know about sessions or HTTP
//! beyond status numbers.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::protocol::{
    self, Kind, META_CLIENT_CAPABILITIES, META_CLIENT_INFO, META_LOG_LEVEL, META_PROTOCOL_VERSION,
    META_SERVER_INFO, META_SUBSCRIPTION_ID, MODERN_VERSION, Message, SUPPORTED_VERSIONS, code,
};

/// Methods a modern client may call through the gateway. Anything else (including the
/// legacy-only `initialize`, `ping`, `logging/setLevel`, `resources/subscribe`) is
/// `404 -32601`, as the spec asks of a server that does not implement a method.
pub const METHODS: &[&str] = &[
    "server/discover",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "subscriptions/listen",
    "tasks/get",
    "tasks/update",
    "tasks/cancel",
];

/// The Tasks extension's identifier (SEP-2663): a client declares it in its request's
/// `clientCapabilities.extensions`, the gateway in `server/discover`.
pub const TASKS_EXTENSION: &str = "io.modelcontextprotocol/tasks";

/// Results that carry caching hints (SEP-2549); the bridge cannot know how long an
/// upstream's list stays valid, so it adds `ttlMs: 0` (do not cache) where the upstream
/// gave none.
const CACHEABLE: &[&str] = &[
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
];

/// The newest legacy version: what a bridged upstream session is initialized with.
pub const BRIDGE_LEGACY_VERSION: &str = "2025-11-25";

/// Log levels in order of severity (RFC 5424, as MCP names them).
const LOG_LEVELS: &[&str] = &[
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
];

/// The request metadata headers of a POST, as sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Headers<'a> {
    /// `MCP-Protocol-Version`.
    pub version: Option<&'a str>,
    /// `Mcp-Method`.
    pub method: Option<&'a str>,
    /// `Mcp-Name`.
    pub name: Option<&'a str>,
}

/// Why a modern request is refused before anything runs: an HTTP status and a JSON-RPC
/// error.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// JSON-RPC error code.
    pub code: i64,
    /// Error message.
    pub message: String,
    /// `error.data`.
    pub data: Option<Value>,
}

impl Refusal {
    fn new(status: u16, code: i64, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
            data: None,
        }
    }

    fn mismatch(message: impl Into<String>) -> Refusal {
        Refusal::new(400, code::HEADER_MISMATCH, message)
    }
}

/// What a valid modern request says about its client.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    /// The protocol version (always [`MODERN_VERSION`] once checked).
    pub version: String,
    /// `clientInfo`, when sent (a SHOULD: never required).
    pub client_info: Option<Value>,
    /// `clientCapabilities` (an object).
    pub capabilities: Value,
    /// Index into the log levels of the request's `logLevel`; `None`: no log messages.
    pub log_level: Option<usize>,
}

impl Meta {
    /// Whether the client declared capability `name` (`sampling`, `elicitation`, `roots`).
    pub fn declares(&self, name: &str) -> bool {
        self.capabilities.get(name).is_some_and(|c| !c.is_null())
    }

    /// Whether the client declared extension `name` (`clientCapabilities.extensions`).
    pub fn declares_extension(&self, name: &str) -> bool {
        self.capabilities
            .pointer("/extensions")
            .and_then(|e| e.get(name))
            .is_some_and(|c| !c.is_null())
    }

    /// The key that decides which pooled upstream session may serve this client (within
    /// its principal): its capabilities change what the upstream may ask of it (sampling,
    /// elicitation, roots), and its name (`clientInfo.name`) tells two applications of one
    /// user apart, so neither shares an upstream (nor its in-memory state) with the other,
    /// and the ledger's per-client figures (read from the pooled session's record) are
    /// right for stateless clients too.
    pub fn capabilities_key(&self) -> String {
        let mut text = String::new();
        canonical(&self.capabilities, &mut text);
        text.push('\n');
        text.push_str(
            self.client_info
                .as_ref()
                .and_then(|i| i.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        let digest = Sha256::digest(text.as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The legacy `initialize` params a bridged upstream session is started with.
    pub fn init_params(&self) -> Value {
        json!({
            "protocolVersion": BRIDGE_LEGACY_VERSION,
            "capabilities": self.capabilities,
            "clientInfo": self.client_info.clone().unwrap_or_else(|| json!({"name": "modern-client", "version": "0"})),
        })
    }
}

/// Serializes `v` with object keys sorted, so equal capability objects give equal text
/// whatever order the client wrote them in.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Decodes a header value the spec lets a client encode as `=?base64?…?=` (non-ASCII
/// names).
fn header_text(v: &str) -> Option<String> {
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => String::from_utf8(STANDARD.decode(b64).ok()?).ok(),
        None => Some(v.to_owned()),
    }
}

/// The body field `Mcp-Name` mirrors, for the methods that must carry it.
fn name_field(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        "tasks/get" | "tasks/update" | "tasks/cancel" => Some("taskId"),
        _ => None,
    }
}

/// Checks a modern request (a JSON-RPC request, not a notification) against every rule
/// the spec gives a server, in the order the conformance suite expects: `_meta` and its
/// required fields (400 `-32602`), the version header against `_meta` (400 `-32020`), the
/// version (400 `-32022` with the supported list), `Mcp-Method` and `Mcp-Name` against the
/// body (400 `-32020`), the method (404 `-32601`).
pub fn check(env: &Message, h: Headers<'_>) -> Result<Meta, Refusal> {
    if env.kind() == Kind::Response {
        return Err(Refusal::new(
            400,
            code::INVALID_REQUEST,
            "a 2026-07-28 client must not send JSON-RPC responses (input goes in inputResponses)",
        ));
    }
    let method = env.method_name().unwrap_or_default();
    let params = env.params_value();
    let params = params.as_ref().and_then(Value::as_object);
    let meta = params
        .and_then(|p| p.get("_meta"))
        .and_then(Value::as_object)
        .ok_or_else(|| {
            Refusal::new(
                400,
                code::INVALID_PARAMS,
                "params._meta is required on every 2026-07-28 request",
            )
        })?;
    let version = meta
        .get(META_PROTOCOL_VERSION)
        .and_then(Value::as_str)
        .ok_or_else(|| {
            Refusal::new(
                400,
                code::INVALID_PARAMS,
                format!("params._meta[{META_PROTOCOL_VERSION:?}] is required"),
            )
        })?;
    let capabilities = meta
        .get(META_CLIENT_CAPABILITIES)
        .filter(|c| c.is_object())
        .ok_or_else(|| {
            Refusal::new(
                400,
                code::INVALID_PARAMS,
                format!("params._meta[{META_CLIENT_CAPABILITIES:?}] is required (an object)"),
            )
        })?;
    match h.version {
        None => {
            return Err(Refusal::mismatch(
                "the MCP-Protocol-Version header is required and must equal the _meta protocol version",
            ));
        }
        Some(v) if v != version => {
            return Err(Refusal::mismatch(format!(
                "MCP-Protocol-Version header {:?} does not match the _meta protocol version {:?}",
                cut(v),
                cut(version)
            )));
        }
        Some(_) => {}
    }
    if version != MODERN_VERSION {
        let mut r = Refusal::new(
            400,
            code::UNSUPPORTED_PROTOCOL_VERSION,
            format!("Unsupported protocol version: {}", cut(version)),
        );
        r.data = Some(json!({"supported": SUPPORTED_VERSIONS, "requested": version}));
        return Err(r);
    }
    match h.method {
        Some(m) if m == method => {}
        Some(m) => {
            return Err(Refusal::mismatch(format!(
                "Mcp-Method header {:?} does not match the body's method {:?}",
                cut(m),
                cut(method)
            )));
        }
        None => return Err(Refusal::mismatch("the Mcp-Method header is required")),
    }
    if let Some(field) = name_field(method) {
        let body = params.and_then(|p| p.get(field)).and_then(Value::as_str);
        match (h.name.map(header_text), body) {
            (Some(Some(n)), Some(b)) if n == b => {}
            (None, _) => {
                return Err(Refusal::mismatch(format!(
                    "the Mcp-Name header is required on {method} (params.{field})"
                )));
            }
            _ => {
                return Err(Refusal::mismatch(format!(
                    "Mcp-Name header does not match params.{field} of the body"
                )));
            }
        }
    }
    if !METHODS.contains(&method) {
        return Err(Refusal::new(
            404,
            code::METHOD_NOT_FOUND,
            format!("Method not found: {}", cut(method)),
        ));
    }
    let log_level = match meta.get(META_LOG_LEVEL) {
        None | Some(Value::Null) => None,
        Some(l) => Some(
            l.as_str()
                .and_then(|l| LOG_LEVELS.iter().position(|x| *x == l))
                .ok_or_else(|| {
                    Refusal::new(
                        400,
                        code::INVALID_PARAMS,
                        format!(
                            "params._meta[{META_LOG_LEVEL:?}] must be one of {}",
                            LOG_LEVELS.join(", ")
                        ),
                    )
                })?,
        ),
    };
    Ok(Meta {
        version: version.to_owned(),
        client_info: meta.get(META_CLIENT_INFO).cloned(),
        capabilities: capabilities.clone(),
        log_level,
    })
}

fn cut(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// What a retry of an MRTR request carries: the client's answers and the state it was
/// given.
#[derive(Debug, Default)]
pub struct Retry {
    /// `params.inputResponses`: key → the client's result for that input request.
    pub responses: Map<String, Value>,
    /// `params.requestState`, as sent.
    pub state: Option<String>,
}

/// Takes everything modern out of a request before it goes to a legacy upstream: the
/// `io.modelcontextprotocol/*` keys of `params._meta` (a legacy server must not see a
/// protocol version it did not negotiate) and the MRTR fields, which are returned. A
/// `requestState` that is not a string is refused (`-32602`); `inputResponses` must be an
/// object when present.
pub fn to_legacy(request: &mut Value) -> Result<Retry, Refusal> {
    let mut retry = Retry::default();
    let is_call = request.get("method").and_then(Value::as_str) == Some("tools/call");
    let Some(params) = request.get_mut("params").and_then(Value::as_object_mut) else {
        return Ok(retry);
    };
    // A 2025-11-25 task hint means nothing in 2026-07-28 (the server decides, SEP-2663): it
    // is ignored, never passed to a legacy upstream that would make it a task or refuse it.
    if is_call {
        params.remove("task");
    }
    match params.remove("inputResponses") {
        None => {}
        Some(Value::Object(m)) => retry.responses = m,
        Some(_) => {
            return Err(Refusal::new(
                400,
                code::INVALID_PARAMS,
                "params.inputResponses must be an object of input request keys to results",
            ));
        }
    }
    match params.remove("requestState") {
        None => {}
        Some(Value::String(s)) => retry.state = Some(s),
        Some(_) => {
            return Err(Refusal::new(
                400,
                code::INVALID_PARAMS,
                "params.requestState must be the string the gateway returned",
            ));
        }
    }
    if let Some(meta) = params.get_mut("_meta").and_then(Value::as_object_mut) {
        meta.retain(|k, _| !k.starts_with("io.modelcontextprotocol/"));
        if meta.is_empty() {
            params.remove("_meta");
        }
    }
    Ok(retry)
}

/// Makes an upstream's answer a modern one: `resultType: "complete"` on a result, and the
/// caching hints on the results that take them, where the upstream gave none.
pub fn complete(method: &str, answer: &mut Value) {
    // A legacy server's "resource not found" (-32002) is -32602 in 2026-07-28 (SEP-2164).
    if method == "resources/read"
        && let Some(c) = answer.pointer_mut("/error/code")
        && c.as_i64() == Some(code::LEGACY_RESOURCE_NOT_FOUND)
    {
        *c = Value::from(code::INVALID_PARAMS);
    }
    let Some(result) = answer.get_mut("result").and_then(Value::as_object_mut) else {
        return;
    };
    result
        .entry("resultType")
        .or_insert_with(|| Value::from("complete"));
    if CACHEABLE.contains(&method) {
        result.entry("ttlMs").or_insert_with(|| Value::from(0));
        result
            .entry("cacheScope")
            .or_insert_with(|| Value::from("private"));
    }
}

/// The HTTP status for an answer sent as a JSON body: the spec gives a status to three
/// errors (an unknown method is 404, a missing capability or a header mismatch 400);
/// everything else, results and other errors, is 200.
pub fn status_of(answer: &Value) -> u16 {
    match answer.pointer("/error/code").and_then(Value::as_i64) {
        Some(code::METHOD_NOT_FOUND) => 404,
        Some(code::MISSING_CLIENT_CAPABILITY | code::HEADER_MISMATCH) => 400,
        _ => 200,
    }
}

/// A legacy server's capabilities as a modern client reads them: unchanged. List-changed
/// flags reach `subscriptions/listen` streams, and `resources.subscribe` says a listen
/// stream's `resourceSubscriptions` are carried (the gateway subscribes its pooled
/// upstream session).
pub fn capabilities(legacy: Option<&Value>) -> Value {
    Value::Object(
        legacy
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
    )
}

/// The `server/discover` result for an upstream whose legacy `InitializeResult` is `init`
/// (`None` when no upstream has been started yet: no capabilities are claimed).
pub fn discover(init: Option<&Value>, ttl_ms: u64) -> Value {
    let mut caps = capabilities(init.and_then(|i| i.get("capabilities")));
    // The gateway runs any call as a task of its own, whatever the upstream offers.
    if !caps.get("extensions").is_some_and(Value::is_object) {
        caps["extensions"] = json!({});
    }
    caps["extensions"][TASKS_EXTENSION] = json!({});
    let mut result = json!({
        "resultType": "complete",
        "supportedVersions": SUPPORTED_VERSIONS,
        "capabilities": caps,
        "ttlMs": ttl_ms,
        "cacheScope": "private",
    });
    if let Some(i) = init
        .and_then(|i| i.get("instructions"))
        .filter(|i| i.is_string())
    {
        result["instructions"] = i.clone();
    }
    let info = init
        .and_then(|i| i.get("serverInfo"))
        .cloned()
        .unwrap_or_else(|| json!({"name": "tether", "version": env!("CARGO_PKG_VERSION")}));
    result["_meta"] = json!({ META_SERVER_INFO: info });
    result
}

/// The client capability an upstream's request to the client needs, if it is one the
/// bridge can carry as an input request.
pub fn required_capability(server_method: &str) -> Option<&'static str> {
    match server_method {
        "sampling/createMessage" => Some("sampling"),
        "elicitation/create" => Some("elicitation"),
        "roots/list" => Some("roots"),
        _ => None,
    }
}

/// The error for an upstream request whose capability the client did not declare.
pub fn missing_capability(id: Value, capability: &str) -> Value {
    protocol::error_response(
        id,
        code::MISSING_CLIENT_CAPABILITY,
        format!(
            "the server needs the client capability {capability:?} for this request, and the client did not declare it"
        ),
        Some(json!({"requiredCapabilities": {capability: {}}})),
    )
}

/// The error for a request that needs extension `name` the client did not declare
/// (`-32021`, naming it).
pub fn missing_extension(id: Value, name: &str) -> Value {
    protocol::error_response(
        id,
        code::MISSING_CLIENT_CAPABILITY,
        format!("this request needs the {name} extension, and the request did not declare it"),
        Some(json!({"requiredCapabilities": {"extensions": {name: {}}}})),
    )
}

/// The error for a call that can only run as a task from a client that did not declare
/// the Tasks extension (`-32021`, naming the extension).
pub fn missing_tasks_extension(id: Value, tool: &str) -> Value {
    protocol::error_response(
        id,
        code::MISSING_CLIENT_CAPABILITY,
        format!(
            "the tool {tool:?} runs only as a task, and the request did not declare the {TASKS_EXTENSION} extension"
        ),
        Some(json!({"requiredCapabilities": {"extensions": {TASKS_EXTENSION: {}}}})),
    )
}

/// Whether a `notifications/message` may go to a client whose request set `log_level`
/// (none set: no log messages at all).
pub fn admits_log(log_level: Option<usize>, message: &Value) -> bool {
    let Some(threshold) = log_level else {
        return false;
    };
    message
        .pointer("/params/level")
        .and_then(Value::as_str)
        .and_then(|l| LOG_LEVELS.iter().position(|x| *x == l))
        .is_none_or(|l| l >= threshold)
}

/// An `InputRequiredResult` answering request `id`: the upstream's requests to the client
/// (key → the request message) and the state the retry must carry.
pub fn input_required(id: Value, requests: &[(String, Value)], state: &str) -> Value {
    let inputs: Map<String, Value> = requests
        .iter()
        .map(|(k, r)| {
            let mut input = json!({"method": r.get("method").cloned().unwrap_or(Value::Null)});
            if let Some(p) = r.get("params") {
                input["params"] = p.clone();
            }
            (k.clone(), input)
        })
        .collect();
    let mut v = json!({
        "jsonrpc": "2.0",
        "result": {"resultType": "input_required", "inputRequests": inputs, "requestState": state},
    });
    v["id"] = id;
    v
}

/// The name an MRTR state is bound to: the body field `Mcp-Name` mirrors.
pub fn request_name(env: &Message) -> Option<String> {
    let field = name_field(env.method_name()?)?;
    env.params_value()?.get(field)?.as_str().map(str::to_owned)
}

mod listen;
mod state;
mod upstream;

pub use listen::{Filter, MAX_LISTEN_RESOURCES, MAX_LISTEN_TASKS, tagged};
pub use state::{StateClaims, StateError, StateKey};
pub use upstream::*;

#[cfg(test)]
mod tests;
