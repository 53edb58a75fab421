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
    self, Envelope, Kind, META_CLIENT_CAPABILITIES, META_CLIENT_INFO, META_LOG_LEVEL,
    META_PROTOCOL_VERSION, META_SERVER_INFO, META_SUBSCRIPTION_ID, MODERN_VERSION,
    SUPPORTED_VERSIONS, code,
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
];

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
        _ => None,
    }
}

/// Checks a modern request (a JSON-RPC request, not a notification) against every rule
/// the spec gives a server, in the order the conformance suite expects: `_meta` and its
/// required fields (400 `-32602`), the version header against `_meta` (400 `-32020`), the
/// version (400 `-32022` with the supported list), `Mcp-Method` and `Mcp-Name` against the
/// body (400 `-32020`), the method (404 `-32601`).
pub fn check(env: &Envelope, h: Headers<'_>) -> Result<Meta, Refusal> {
    if env.kind == Kind::Response {
        return Err(Refusal::new(
            400,
            code::INVALID_REQUEST,
            "a 2026-07-28 client must not send JSON-RPC responses (input goes in inputResponses)",
        ));
    }
    let method = env.method().unwrap_or_default();
    let params = env.params();
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
    let Some(params) = request.get_mut("params").and_then(Value::as_object_mut) else {
        return Ok(retry);
    };
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

/// Resources one `subscriptions/listen` may subscribe to; the acknowledgement lists the
/// ones honoured, so a client asking for more learns which were left out.
pub const MAX_LISTEN_RESOURCES: usize = 64;

/// What a `subscriptions/listen` asked for: list-changed kinds, and the resources whose
/// updates it wants (`resourceSubscriptions`, at most [`MAX_LISTEN_RESOURCES`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `toolsListChanged`.
    pub tools: bool,
    /// `promptsListChanged`.
    pub prompts: bool,
    /// `resourcesListChanged`.
    pub resources: bool,
    /// `resourceSubscriptions`: the URIs whose `notifications/resources/updated` pass.
    pub uris: Vec<String>,
}

impl Filter {
    /// The filter of a `subscriptions/listen` request's `params.notifications`.
    pub fn of(env: &Envelope) -> Filter {
        let n = env.params().and_then(|p| p.get("notifications"));
        let on = |k: &str| n.and_then(|n| n.get(k)).and_then(Value::as_bool) == Some(true);
        let mut uris: Vec<String> = Vec::new();
        for u in n
            .and_then(|n| n.get("resourceSubscriptions"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if uris.len() == MAX_LISTEN_RESOURCES {
                break;
            }
            if !uris.iter().any(|x| x == u) {
                uris.push(u.to_owned());
            }
        }
        Filter {
            tools: on("toolsListChanged"),
            prompts: on("promptsListChanged"),
            resources: on("resourcesListChanged"),
            uris,
        }
    }

    /// Whether a notification from an upstream passes the filter.
    pub fn admits(&self, notification: &Value) -> bool {
        match notification.get("method").and_then(Value::as_str) {
            Some("notifications/tools/list_changed") => self.tools,
            Some("notifications/prompts/list_changed") => self.prompts,
            Some("notifications/resources/list_changed") => self.resources,
            Some("notifications/resources/updated") => notification
                .pointer("/params/uri")
                .and_then(Value::as_str)
                .is_some_and(|u| self.uris.iter().any(|x| x == u)),
            _ => false,
        }
    }

    /// The first message of the stream: what is honoured, tagged with the subscription.
    pub fn acknowledged(&self, subscription: &Value) -> Value {
        let mut honoured = Map::new();
        for (k, on) in [
            ("toolsListChanged", self.tools),
            ("promptsListChanged", self.prompts),
            ("resourcesListChanged", self.resources),
        ] {
            if on {
                honoured.insert(k.to_owned(), Value::Bool(true));
            }
        }
        if !self.uris.is_empty() {
            honoured.insert("resourceSubscriptions".to_owned(), json!(self.uris));
        }
        json!({
            "jsonrpc": "2.0",
            "method": "notifications/subscriptions/acknowledged",
            "params": {"notifications": honoured, "_meta": {META_SUBSCRIPTION_ID: subscription}},
        })
    }
}

/// A notification for a listen stream, tagged with its subscription.
pub fn tagged(notification: &Value, subscription: &Value) -> Value {
    let mut v = notification.clone();
    if !v.get("params").is_some_and(Value::is_object) {
        v["params"] = json!({});
    }
    if !v["params"].get("_meta").is_some_and(Value::is_object) {
        v["params"]["_meta"] = json!({});
    }
    v["params"]["_meta"][META_SUBSCRIPTION_ID] = subscription.clone();
    v
}

/// The `server/discover` result for an upstream whose legacy `InitializeResult` is `init`
/// (`None` when no upstream has been started yet: no capabilities are claimed).
pub fn discover(init: Option<&Value>, ttl_ms: u64) -> Value {
    let mut result = json!({
        "resultType": "complete",
        "supportedVersions": SUPPORTED_VERSIONS,
        "capabilities": capabilities(init.and_then(|i| i.get("capabilities"))),
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

/// What a `requestState` stands for: whose call, on which instance, which waiting call,
/// which request may continue it, until when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateClaims {
    /// Principal id.
    pub p: String,
    /// The gateway instance that holds the call.
    pub i: String,
    /// The waiting call's key on that instance.
    pub w: String,
    /// Method of the request it continues.
    pub m: String,
    /// Its tool, prompt or resource name, if any.
    pub n: Option<String>,
    /// Expiry, Unix milliseconds.
    pub x: i64,
}

/// Why a `requestState` is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StateError {
    /// Not one the gateway sealed (altered, truncated, another key, another principal).
    #[error(
        "requestState failed integrity verification (it was altered, or belongs to another client)"
    )]
    Tampered,
    /// Sealed, but its time is over.
    #[error("requestState has expired; send the request again without it")]
    Expired,
    /// Sealed for another request.
    #[error("requestState belongs to another request (method or name differ)")]
    Foreign,
}

/// The key that seals `requestState` (HMAC-SHA256): kept in the state directory or the
/// shared store, so any instance can verify a state another one sealed.
#[derive(Clone)]
pub struct StateKey([u8; 32]);

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(..)")
    }
}

type HmacSha256 = Hmac<Sha256>;

impl StateKey {
    /// A key from its bytes.
    pub fn new(bytes: [u8; 32]) -> StateKey {
        StateKey(bytes)
    }

    /// A key from the 64 hex characters it is kept as (in the state dir or the shared
    /// store); `None` for anything else.
    pub fn from_hex(text: &str) -> Option<StateKey> {
        let text = text.trim();
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(StateKey(out))
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        mac
    }

    /// `base64url(claims JSON) "." base64url(HMAC)`: opaque to the client, verifiable by
    /// any instance with the key.
    pub fn seal(&self, claims: &StateClaims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{tag}")
    }

    /// Verifies a state for `principal` retrying `method`/`name` at `now_ms`.
    pub fn open(
        &self,
        token: &str,
        principal: &str,
        method: &str,
        name: Option<&str>,
        now_ms: i64,
    ) -> Result<StateClaims, StateError> {
        let (payload, tag) = token.split_once('.').ok_or(StateError::Tampered)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| StateError::Tampered)?;
        self.mac(payload)
            .verify_slice(&tag)
            .map_err(|_| StateError::Tampered)?;
        let claims: StateClaims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(StateError::Tampered)?;
        if claims.p != principal {
            return Err(StateError::Tampered);
        }
        if claims.m != method || claims.n.as_deref() != name {
            return Err(StateError::Foreign);
        }
        if now_ms >= claims.x {
            return Err(StateError::Expired);
        }
        Ok(claims)
    }
}

/// The name an MRTR state is bound to: the body field `Mcp-Name` mirrors.
pub fn request_name(env: &Envelope) -> Option<&str> {
    let field = name_field(env.method()?)?;
    env.params()?.get(field)?.as_str()
}

// The other direction: a legacy client session in front of a modern upstream
// (`upstream::modern`). The gateway keeps the client's session; every request it sends
// upstream is made self-contained here.

/// What a legacy session tells a modern upstream on every request: the client as its
/// `initialize` described it, and the log level it set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Upstream {
    /// The client's `clientInfo` from its `initialize`.
    pub client_info: Value,
    /// The client's `capabilities` from its `initialize`.
    pub capabilities: Value,
    /// The level of the client's last `logging/setLevel`; `None`: no log messages.
    pub log_level: Option<String>,
}

impl Upstream {
    /// The client of a legacy `initialize`'s params.
    pub fn of_initialize(params: &Value) -> Upstream {
        Upstream {
            client_info: params
                .get("clientInfo")
                .filter(|v| v.is_object())
                .cloned()
                .unwrap_or_else(|| json!({"name": "tether", "version": env!("CARGO_PKG_VERSION")})),
            capabilities: params
                .get("capabilities")
                .filter(|v| v.is_object())
                .cloned()
                .unwrap_or_else(|| json!({})),
            log_level: None,
        }
    }

    /// The `_meta` keys every modern request carries, added to `request.params._meta`
    /// (the client's own keys, such as its progress token and trace context, stay).
    pub fn stamp(&self, request: &mut Value) {
        if !request.get("params").is_some_and(Value::is_object) {
            request["params"] = json!({});
        }
        let params = &mut request["params"];
        if !params.get("_meta").is_some_and(Value::is_object) {
            params["_meta"] = json!({});
        }
        let meta = &mut params["_meta"];
        meta[META_PROTOCOL_VERSION] = Value::from(MODERN_VERSION);
        meta[META_CLIENT_INFO] = self.client_info.clone();
        meta[META_CLIENT_CAPABILITIES] = self.capabilities.clone();
        if let Some(level) = &self.log_level {
            meta[META_LOG_LEVEL] = Value::from(level.as_str());
        }
    }
}

/// The HTTP headers a modern request must carry (spec §1.2): `MCP-Protocol-Version`,
/// `Mcp-Method`, and `Mcp-Name` for the methods that name something. A name that is not
/// plain visible ASCII is sent in the `=?base64?…?=` form the spec gives for it.
pub fn request_headers(request: &Value) -> Vec<(&'static str, String)> {
    let mut h = vec![("mcp-protocol-version", MODERN_VERSION.to_owned())];
    let Some(method) = request.get("method").and_then(Value::as_str) else {
        return h;
    };
    h.push(("mcp-method", method.to_owned()));
    let name = name_field(method)
        .and_then(|f| request.get("params")?.get(f)?.as_str())
        .map(header_encoded);
    if let Some(name) = name {
        h.push(("mcp-name", name));
    }
    h
}

/// The `x-mcp-header` declarations of one tool: the path of each annotated argument (its
/// property names from the schema root through `properties`) and the header name
/// (`Mcp-Param-{name}`).
pub type ParamHeaders = Vec<(Vec<String>, String)>;

/// The `x-mcp-header` declarations of every tool in a `tools/list` result (SEP-2243): what
/// a client must mirror into `Mcp-Param-*` headers when it calls the tool. Tools without
/// any are left out; a declaration that is not a header token is ignored (the server
/// cannot expect it).
pub fn param_headers_of(tools_list: &Value) -> Vec<(String, ParamHeaders)> {
    fn walk(props: Option<&Value>, path: &mut Vec<String>, out: &mut ParamHeaders) {
        let Some(Value::Object(props)) = props else {
            return;
        };
        for (name, schema) in props {
            path.push(name.clone());
            if let Some(h) = schema.get("x-mcp-header").and_then(Value::as_str)
                && !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            {
                out.push((path.clone(), h.to_owned()));
            }
            walk(schema.get("properties"), path, out);
            path.pop();
        }
    }
    tools_list
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let name = t.get("name")?.as_str()?.to_owned();
            let mut out = Vec::new();
            walk(
                t.pointer("/inputSchema/properties"),
                &mut Vec::new(),
                &mut out,
            );
            (!out.is_empty()).then_some((name, out))
        })
        .collect()
}

/// The `Mcp-Param-*` headers of a call with `arguments` to a tool declaring `decl`: one per
/// declared argument present with a primitive value (absent or null: no header).
pub fn param_headers(arguments: Option<&Value>, decl: &ParamHeaders) -> Vec<(String, String)> {
    let Some(args) = arguments else {
        return Vec::new();
    };
    decl.iter()
        .filter_map(|(path, header)| {
            let v = path.iter().try_fold(args, |v, k| v.get(k))?;
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((
                format!("mcp-param-{}", header.to_ascii_lowercase()),
                header_encoded(&text),
            ))
        })
        .collect()
}

/// A header value as sent: as is when it is visible ASCII without surrounding spaces,
/// else base64 in the `=?base64?…?=` form.
fn header_encoded(text: &str) -> String {
    let plain = text.bytes().all(|b| (0x20..0x7f).contains(&b))
        && text.trim() == text
        && !text.starts_with("=?");
    if plain {
        text.to_owned()
    } else {
        format!("=?base64?{}?=", STANDARD.encode(text))
    }
}

/// The legacy `InitializeResult` a client is given for a modern upstream: the
/// capabilities, server info and instructions of its `server/discover` result, at the
/// version the client asked for when the gateway speaks it (else the newest legacy one).
pub fn initialize_result(discover: &Value, requested: Option<&str>) -> Value {
    let version = requested
        .filter(|v| protocol::LEGACY_VERSIONS.contains(v))
        .unwrap_or(BRIDGE_LEGACY_VERSION);
    let mut result = json!({
        "protocolVersion": version,
        "capabilities": discover.get("capabilities").filter(|c| c.is_object()).cloned().unwrap_or_else(|| json!({})),
        "serverInfo": discover
            .pointer(&format!("/_meta/{}", META_SERVER_INFO.replace('/', "~1")))
            .filter(|i| i.is_object())
            .cloned()
            .unwrap_or_else(|| json!({"name": "upstream", "version": "unknown"})),
    });
    if let Some(i) = discover.get("instructions").filter(|i| i.is_string()) {
        result["instructions"] = i.clone();
    }
    result
}

/// Whether a `server/discover` result says the server speaks 2026-07-28.
pub fn speaks_modern(discover: &Value) -> bool {
    discover
        .get("supportedVersions")
        .and_then(Value::as_array)
        .is_some_and(|v| v.iter().any(|v| v.as_str() == Some(MODERN_VERSION)))
}

/// What an `InputRequiredResult` asks of the client before its request can finish.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRound {
    /// Key → the request message to send the client (without id).
    pub requests: Vec<(String, Value)>,
    /// The state the retry must echo, as the server sent it.
    pub state: Option<Value>,
}

/// The input round a modern upstream's answer asks for; `None` for any other answer.
pub fn input_requests(answer: &Value) -> Option<InputRound> {
    let result = answer.get("result")?;
    if result.get("resultType").and_then(Value::as_str) != Some("input_required") {
        return None;
    }
    let requests = result
        .get("inputRequests")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, r)| {
                    let mut msg = json!({"jsonrpc": "2.0", "method": r.get("method").cloned().unwrap_or(Value::Null)});
                    if let Some(p) = r.get("params") {
                        msg["params"] = p.clone();
                    }
                    (k.clone(), msg)
                })
                .collect()
        })
        .unwrap_or_default();
    Some(InputRound {
        requests,
        state: result.get("requestState").cloned(),
    })
}

/// The retry of an MRTR request: the original with a new id (the spec requires one),
/// the client's answers and the upstream's state.
pub fn retry(
    original: &Value,
    id: Value,
    responses: Map<String, Value>,
    state: Option<Value>,
) -> Value {
    let mut r = original.clone();
    r["id"] = id;
    if !r.get("params").is_some_and(Value::is_object) {
        r["params"] = json!({});
    }
    r["params"]["inputResponses"] = Value::Object(responses);
    match state {
        Some(s) => r["params"]["requestState"] = s,
        None => {
            if let Some(p) = r["params"].as_object_mut() {
                p.remove("requestState");
            }
        }
    }
    r
}

/// Makes a modern upstream's final answer a legacy one: the result loses the fields a
/// legacy client has no use for (`resultType`, the caching hints); the id is the one the
/// session sent.
pub fn to_legacy_answer(answer: &mut Value, id: Value) {
    answer["id"] = id;
    if let Some(r) = answer.get_mut("result").and_then(Value::as_object_mut) {
        r.remove("resultType");
        r.remove("ttlMs");
        r.remove("cacheScope");
    }
}

/// The `subscriptions/listen` request that carries a legacy session's change
/// notifications: the list-changed kinds the server offers and the resources the client
/// subscribed to. `None` when there is nothing to listen for.
pub fn listen_request(
    id: Value,
    server_capabilities: &Value,
    resources: &[String],
) -> Option<Value> {
    let offers = |kind: &str| {
        server_capabilities
            .get(kind)
            .and_then(|c| c.get("listChanged"))
            .and_then(Value::as_bool)
            == Some(true)
    };
    let mut notifications = Map::new();
    for (kind, key) in [
        ("tools", "toolsListChanged"),
        ("prompts", "promptsListChanged"),
        ("resources", "resourcesListChanged"),
    ] {
        if offers(kind) {
            notifications.insert(key.to_owned(), Value::Bool(true));
        }
    }
    if !resources.is_empty() {
        notifications.insert("resourceSubscriptions".to_owned(), json!(resources));
    }
    if notifications.is_empty() {
        return None;
    }
    let mut v = json!({"jsonrpc": "2.0", "method": "subscriptions/listen", "params": {"notifications": notifications}});
    v["id"] = id;
    Some(v)
}

/// A listen stream's notification as a legacy session receives it: without the
/// subscription tag. `None` for what only a listen stream's client needs (the
/// acknowledgement).
pub fn from_listen(mut notification: Value) -> Option<Value> {
    if notification.get("method").and_then(Value::as_str)
        == Some("notifications/subscriptions/acknowledged")
    {
        return None;
    }
    if let Some(meta) = notification
        .get_mut("params")
        .and_then(|p| p.get_mut("_meta"))
        .and_then(Value::as_object_mut)
    {
        meta.remove(META_SUBSCRIPTION_ID);
        if meta.is_empty()
            && let Some(p) = notification
                .get_mut("params")
                .and_then(Value::as_object_mut)
        {
            p.remove("_meta");
        }
    }
    Some(notification)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, params: Value) -> Envelope {
        let mut v = json!({"jsonrpc": "2.0", "id": 7, "method": method});
        v["params"] = params;
        Envelope::from_value(v).unwrap()
    }

    fn meta() -> Value {
        json!({
            META_PROTOCOL_VERSION: MODERN_VERSION,
            META_CLIENT_CAPABILITIES: {},
            META_CLIENT_INFO: {"name": "c", "version": "1"},
        })
    }

    fn headers<'a>(method: &'a str, name: Option<&'a str>) -> Headers<'a> {
        Headers {
            version: Some(MODERN_VERSION),
            method: Some(method),
            name,
        }
    }

    #[test]
    fn every_rule_refuses_with_its_status_and_code() {
        let rows: Vec<(Envelope, Headers<'_>, u16, i64)> = vec![
            (
                req("tools/list", json!({})),
                headers("tools/list", None),
                400,
                code::INVALID_PARAMS,
            ),
            (
                req(
                    "tools/list",
                    json!({"_meta": {META_CLIENT_CAPABILITIES: {}}}),
                ),
                headers("tools/list", None),
                400,
                code::INVALID_PARAMS,
            ),
            (
                req(
                    "tools/list",
                    json!({"_meta": {META_PROTOCOL_VERSION: MODERN_VERSION}}),
                ),
                headers("tools/list", None),
                400,
                code::INVALID_PARAMS,
            ),
            (
                req("tools/list", json!({"_meta": meta()})),
                Headers {
                    version: None,
                    ..headers("tools/list", None)
                },
                400,
                code::HEADER_MISMATCH,
            ),
            (
                req("tools/list", json!({"_meta": meta()})),
                Headers {
                    version: Some("2025-11-25"),
                    ..headers("tools/list", None)
                },
                400,
                code::HEADER_MISMATCH,
            ),
            (
                req(
                    "tools/list",
                    json!({"_meta": {META_PROTOCOL_VERSION: "v9", META_CLIENT_CAPABILITIES: {}}}),
                ),
                Headers {
                    version: Some("v9"),
                    ..headers("tools/list", None)
                },
                400,
                code::UNSUPPORTED_PROTOCOL_VERSION,
            ),
            (
                req("tools/list", json!({"_meta": meta()})),
                headers("tools/call", None),
                400,
                code::HEADER_MISMATCH,
            ),
            (
                req("tools/list", json!({"_meta": meta()})),
                Headers {
                    method: None,
                    ..headers("tools/list", None)
                },
                400,
                code::HEADER_MISMATCH,
            ),
            (
                req("tools/call", json!({"name": "echo", "_meta": meta()})),
                headers("tools/call", None),
                400,
                code::HEADER_MISMATCH,
            ),
            (
                req("tools/call", json!({"name": "echo", "_meta": meta()})),
                headers("tools/call", Some("add")),
                400,
                code::HEADER_MISMATCH,
            ),
            (
                req("initialize", json!({"_meta": meta()})),
                headers("initialize", None),
                404,
                code::METHOD_NOT_FOUND,
            ),
            (
                req("ping", json!({"_meta": meta()})),
                headers("ping", None),
                404,
                code::METHOD_NOT_FOUND,
            ),
        ];
        for (i, (env, h, status, code)) in rows.into_iter().enumerate() {
            let r = check(&env, h).expect_err(&format!("row {i} must be refused"));
            assert_eq!((r.status, r.code), (status, code), "row {i}: {r:?}");
        }
    }

    #[test]
    fn an_unsupported_version_lists_what_is_served_and_echoes_the_request() {
        let env = req(
            "server/discover",
            json!({"_meta": {META_PROTOCOL_VERSION: "v999.0.0", META_CLIENT_CAPABILITIES: {}}}),
        );
        let r = check(
            &env,
            Headers {
                version: Some("v999.0.0"),
                ..headers("server/discover", None)
            },
        )
        .unwrap_err();
        assert_eq!(
            r.data,
            Some(json!({"supported": SUPPORTED_VERSIONS, "requested": "v999.0.0"}))
        );
    }

    #[test]
    fn a_valid_request_gives_its_client_and_a_base64_name_is_decoded() {
        let env = req(
            "tools/call",
            json!({"name": "héllo", "_meta": {META_PROTOCOL_VERSION: MODERN_VERSION, META_CLIENT_CAPABILITIES: {"sampling": {}}, META_LOG_LEVEL: "warning"}}),
        );
        let encoded = format!("=?base64?{}?=", STANDARD.encode("héllo"));
        let m = check(&env, headers("tools/call", Some(&encoded))).unwrap();
        assert!(m.declares("sampling") && !m.declares("elicitation"));
        assert_eq!(m.log_level, Some(3));
        assert_eq!(m.client_info, None);
        assert_eq!(m.init_params()["protocolVersion"], BRIDGE_LEGACY_VERSION);
    }

    #[test]
    fn the_capabilities_key_ignores_key_order() {
        let a: Value =
            serde_json::from_str(r#"{"sampling":{},"roots":{"listChanged":true}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"roots":{"listChanged":true},"sampling":{}}"#).unwrap();
        let m = |c: Value| Meta {
            version: MODERN_VERSION.into(),
            client_info: None,
            capabilities: c,
            log_level: None,
        };
        assert_eq!(m(a.clone()).capabilities_key(), m(b).capabilities_key());
        let mut named = m(a.clone());
        named.client_info = Some(json!({"name": "cursor", "version": "1"}));
        assert_ne!(
            named.capabilities_key(),
            m(a).capabilities_key(),
            "another application"
        );
        assert_ne!(
            m(json!({})).capabilities_key(),
            m(json!({"sampling": {}})).capabilities_key()
        );
    }

    #[test]
    fn to_legacy_strips_modern_fields_and_returns_the_retry() {
        let mut v = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "x", "inputResponses": {"k": {"action": "accept"}}, "requestState": "s",
            "_meta": {META_PROTOCOL_VERSION: MODERN_VERSION, "progressToken": 5}}});
        let r = to_legacy(&mut v).unwrap();
        assert_eq!(r.state.as_deref(), Some("s"));
        assert_eq!(r.responses["k"], json!({"action": "accept"}));
        assert_eq!(
            v["params"],
            json!({"name": "x", "_meta": {"progressToken": 5}})
        );
        let mut bad = json!({"params": {"requestState": 3}});
        assert_eq!(to_legacy(&mut bad).unwrap_err().code, code::INVALID_PARAMS);
    }

    #[test]
    fn results_get_their_type_and_cache_hints_and_statuses_follow_the_spec() {
        let mut a = json!({"id": 1, "result": {"tools": []}});
        complete("tools/list", &mut a);
        assert_eq!(a["result"]["resultType"], "complete");
        assert_eq!(a["result"]["ttlMs"], 0);
        let mut c = json!({"id": 1, "result": {"content": [], "resultType": "x"}});
        complete("tools/call", &mut c);
        assert_eq!(c["result"], json!({"content": [], "resultType": "x"}));
        assert_eq!(status_of(&json!({"error": {"code": -32601}})), 404);
        assert_eq!(status_of(&json!({"error": {"code": -32602}})), 200);
    }

    #[test]
    fn discover_translates_a_legacy_initialize_result() {
        let init = json!({"capabilities": {"tools": {"listChanged": true}, "resources": {"subscribe": true}},
            "serverInfo": {"name": "s", "version": "2"}, "instructions": "hi"});
        let d = discover(Some(&init), 0);
        assert_eq!(
            d["capabilities"],
            json!({"tools": {"listChanged": true}, "resources": {"subscribe": true}})
        );
        assert_eq!(d["_meta"][META_SERVER_INFO]["name"], "s");
        assert_eq!(d["instructions"], "hi");
        assert_eq!(d["supportedVersions"][0], MODERN_VERSION);
    }

    #[test]
    fn a_listen_filter_admits_what_it_names_and_tags_it() {
        let env = req(
            "subscriptions/listen",
            json!({"notifications": {"promptsListChanged": true, "resourceSubscriptions": ["x"]}}),
        );
        let f = Filter::of(&env);
        assert!(f.admits(&json!({"method": "notifications/prompts/list_changed"})));
        assert!(!f.admits(&json!({"method": "notifications/tools/list_changed"})));
        assert!(
            f.admits(&json!({"method": "notifications/resources/updated", "params": {"uri": "x"}}))
        );
        assert!(
            !f.admits(
                &json!({"method": "notifications/resources/updated", "params": {"uri": "y"}})
            )
        );
        let ack = f.acknowledged(&json!("sub-1"));
        assert_eq!(
            ack["params"]["notifications"],
            json!({"promptsListChanged": true, "resourceSubscriptions": ["x"]})
        );
        assert_eq!(ack["params"]["_meta"][META_SUBSCRIPTION_ID], "sub-1");
        let t = tagged(
            &json!({"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"}),
            &json!("sub-1"),
        );
        assert_eq!(t["params"]["_meta"][META_SUBSCRIPTION_ID], "sub-1");
    }

    #[test]
    fn log_messages_need_a_level_and_meet_it() {
        let warn = json!({"params": {"level": "warning"}});
        assert!(!admits_log(None, &warn));
        assert!(admits_log(Some(1), &warn));
        assert!(!admits_log(Some(4), &warn));
    }

    #[test]
    fn request_state_is_sealed_bound_and_expires() {
        let key = StateKey::new([7; 32]);
        let claims = StateClaims {
            p: "alice".into(),
            i: "inst".into(),
            w: "w1".into(),
            m: "tools/call".into(),
            n: Some("sample".into()),
            x: 1_000,
        };
        let s = key.seal(&claims);
        assert_eq!(
            key.open(&s, "alice", "tools/call", Some("sample"), 999),
            Ok(claims)
        );
        assert_eq!(
            key.open(
                &format!("{s}-TAMPERED"),
                "alice",
                "tools/call",
                Some("sample"),
                0
            ),
            Err(StateError::Tampered)
        );
        assert_eq!(
            key.open(&s, "bob", "tools/call", Some("sample"), 0),
            Err(StateError::Tampered)
        );
        assert_eq!(
            key.open(&s, "alice", "tools/call", Some("echo"), 0),
            Err(StateError::Foreign)
        );
        assert_eq!(
            key.open(&s, "alice", "tools/call", Some("sample"), 1_000),
            Err(StateError::Expired)
        );
        assert!(StateKey::from_hex(&"07".repeat(32)).is_some_and(|k| k.0 == [7; 32]));
        assert!(
            StateKey::from_hex("07").is_none() && StateKey::from_hex(&"zz".repeat(32)).is_none()
        );
        let other = StateKey::new([8; 32]);
        assert_eq!(
            other.open(&s, "alice", "tools/call", Some("sample"), 0),
            Err(StateError::Tampered)
        );
        let (payload, tag) = s.split_once('.').unwrap();
        let forged = format!("{}x.{tag}", payload);
        assert_eq!(
            key.open(&forged, "alice", "tools/call", Some("sample"), 0),
            Err(StateError::Tampered)
        );
    }

    #[test]
    fn input_required_carries_each_request_under_its_key() {
        let r = input_required(
            json!(3),
            &[(
                "tether-1".into(),
                json!({"method": "elicitation/create", "id": "tether-1", "params": {"message": "?"}}),
            )],
            "st",
        );
        assert_eq!(r["id"], 3);
        assert_eq!(
            r["result"]["inputRequests"]["tether-1"],
            json!({"method": "elicitation/create", "params": {"message": "?"}})
        );
        assert_eq!(r["result"]["requestState"], "st");
    }

    #[test]
    fn a_legacy_session_request_is_made_self_contained_for_a_modern_upstream() {
        let mut client = Upstream::of_initialize(&json!({
            "protocolVersion": "2025-06-18",
            "capabilities": {"elicitation": {}},
            "clientInfo": {"name": "c", "version": "1"},
        }));
        client.log_level = Some("debug".into());
        let mut r = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "héllo", "_meta": {"progressToken": 9}}});
        client.stamp(&mut r);
        let meta = &r["params"]["_meta"];
        assert_eq!(meta["progressToken"], 9, "the client's own keys stay");
        assert_eq!(meta[META_PROTOCOL_VERSION], MODERN_VERSION);
        assert_eq!(meta[META_CLIENT_CAPABILITIES], json!({"elicitation": {}}));
        assert_eq!(meta[META_CLIENT_INFO]["name"], "c");
        assert_eq!(meta[META_LOG_LEVEL], "debug");
        // What the gateway stamps passes its own rules for a modern request.
        let env = Envelope::from_value(r.clone()).unwrap();
        let h = request_headers(&r);
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        assert_eq!(
            get("mcp-name"),
            Some(format!("=?base64?{}?=", STANDARD.encode("héllo")).as_str())
        );
        check(
            &env,
            Headers {
                version: get("mcp-protocol-version"),
                method: get("mcp-method"),
                name: get("mcp-name"),
            },
        )
        .expect("a stamped request is a valid modern request");
        let mut plain = json!({"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "demo://a"}});
        client.stamp(&mut plain);
        assert!(request_headers(&plain).contains(&("mcp-name", "demo://a".to_owned())));
    }

    #[test]
    fn discover_becomes_an_initialize_result_at_the_clients_version() {
        let d = json!({
            "resultType": "complete",
            "supportedVersions": ["2026-07-28"],
            "capabilities": {"tools": {"listChanged": true}},
            "instructions": "be kind",
            "_meta": {META_SERVER_INFO: {"name": "up", "version": "2"}},
        });
        assert!(speaks_modern(&d));
        assert!(!speaks_modern(
            &json!({"supportedVersions": ["2025-11-25"]})
        ));
        let i = initialize_result(&d, Some("2025-06-18"));
        assert_eq!(i["protocolVersion"], "2025-06-18");
        assert_eq!(i["serverInfo"]["name"], "up");
        assert_eq!(i["instructions"], "be kind");
        assert_eq!(i["capabilities"]["tools"]["listChanged"], true);
        let i = initialize_result(&d, Some("1999-01-01"));
        assert_eq!(i["protocolVersion"], BRIDGE_LEGACY_VERSION);
    }

    #[test]
    fn an_input_required_answer_gives_its_requests_and_the_retry_carries_the_answers() {
        let a = json!({"jsonrpc": "2.0", "id": 4, "result": {
            "resultType": "input_required",
            "inputRequests": {"k": {"method": "elicitation/create", "params": {"message": "?"}}},
            "requestState": "s1",
        }});
        let InputRound {
            requests: reqs,
            state,
        } = input_requests(&a).unwrap();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].0, "k");
        assert_eq!(reqs[0].1["method"], "elicitation/create");
        assert_eq!(reqs[0].1["params"]["message"], "?");
        assert_eq!(state, Some(json!("s1")));
        assert!(input_requests(&json!({"id": 4, "result": {"resultType": "complete"}})).is_none());
        let original =
            json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "ask"}});
        let mut answers = Map::new();
        answers.insert("k".into(), json!({"action": "accept"}));
        let r = retry(&original, json!("4-retry-1"), answers, state);
        assert_eq!(r["id"], "4-retry-1", "a retry has an id of its own");
        assert_eq!(r["params"]["name"], "ask");
        assert_eq!(r["params"]["inputResponses"]["k"]["action"], "accept");
        assert_eq!(r["params"]["requestState"], "s1");
        let mut done = json!({"jsonrpc": "2.0", "id": "4-retry-1", "result": {"resultType": "complete", "ttlMs": 0, "cacheScope": "private", "content": []}});
        to_legacy_answer(&mut done, json!(4));
        assert_eq!(
            done,
            json!({"jsonrpc": "2.0", "id": 4, "result": {"content": []}})
        );
    }

    #[test]
    fn the_listen_request_asks_for_what_the_server_offers_and_the_client_subscribed() {
        let caps = json!({"tools": {"listChanged": true}, "prompts": {}, "resources": {"listChanged": false}});
        assert!(
            listen_request(json!("l"), &json!({}), &[]).is_none(),
            "nothing to listen for"
        );
        let r = listen_request(json!("l"), &caps, &["demo://a".into()]).unwrap();
        assert_eq!(
            r["params"]["notifications"],
            json!({"toolsListChanged": true, "resourceSubscriptions": ["demo://a"]})
        );
        let ack = json!({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged", "params": {}});
        assert!(from_listen(ack).is_none());
        let n = tagged(
            &json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
            &json!("l"),
        );
        assert_eq!(
            from_listen(n).unwrap(),
            json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed", "params": {}})
        );
    }
}
