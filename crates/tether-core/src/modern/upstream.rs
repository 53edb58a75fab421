//! The other direction: a legacy client session in front of a 2026-07-28 upstream
//! (`upstream::modern` does the I/O). Every request the gateway sends such an upstream is
//! made self-contained here.
//! Must not: do I/O or know sessions.

use super::*;

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
