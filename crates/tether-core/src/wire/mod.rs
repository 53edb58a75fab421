//! The ground floor: one JSON-RPC message, typed once at each edge.
//!
//! A [`Message`] is parsed from the bytes a client or an upstream sent, once. Its envelope
//! (kind, `id`, `method`) is typed; its `params`, `result` and `error` stay the raw JSON text
//! they arrived as ([`RawValue`]): the gateway forwards a 100 KB tool result without building
//! a tree of it or writing it out again, and looks inside only where it acts on a field
//! (a tool's name, a progress token, `isError`), reading just that field. Ids are replaced on
//! the typed envelope, never by a round trip through [`Value`]. Writing a message back out
//! ([`Message::encode`], or `Serialize`) copies the raw parts as they are.
//!
//! JSON-RPC 2.0 defines a message's members (`jsonrpc`, `id`, `method`, `params`, `result`,
//! `error`); any other top-level member a sender adds is not kept.
//!
//! Must not: depend on anything else in the crate, do I/O, or parse a raw part it does not
//! need to read.

mod method;

pub use method::Method;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use std::sync::OnceLock;

use serde_json::{Map, Value};

/// What kind of JSON-RPC message a body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Has `method` and a non-null `id`.
    Request,
    /// Has `method` and no `id`.
    Notification,
    /// Has `id` and `result` or `error`, no `method`.
    Response,
}

/// Why a body is not an acceptable JSON-RPC message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not JSON (or not UTF-8).
    #[error("malformed JSON: {0}")]
    Parse(String),
    /// JSON but not a single JSON-RPC 2.0 message.
    #[error("{0}")]
    Invalid(&'static str),
}

impl EnvelopeError {
    /// The JSON-RPC code for this failure.
    pub fn code(&self) -> i64 {
        match self {
            EnvelopeError::Parse(_) => -32700,
            EnvelopeError::Invalid(_) => -32600,
        }
    }
}

/// One JSON-RPC message: a typed envelope around raw parts.
#[derive(Debug, Clone)]
pub struct Message {
    kind: Kind,
    id: Option<Value>,
    method: Option<Method>,
    params: Option<Box<RawValue>>,
    result: Option<Box<RawValue>>,
    error: Option<Box<RawValue>>,
    /// What the gateway reads of `params`, read once, when first asked.
    head: OnceLock<Head>,
    /// Whether `result.isError` is true, read once (the span and the ledger both ask).
    tool_error: OnceLock<bool>,
}

/// The fields of `params` the gateway reads: one pass over them finds them, skipping the
/// rest (a tool's arguments) without building anything.
#[derive(Debug, Clone, Default, Deserialize)]
struct Head {
    name: Option<Value>,
    #[serde(rename = "_meta")]
    meta: Option<Value>,
    /// 2025-11-25 task augmentation (`params.task`).
    task: Option<Value>,
}

/// The members of a message as borrowed raw text: one pass over the bytes finds them all
/// (validating the JSON) without copying or unescaping what they hold.
#[derive(Clone, Copy, Deserialize)]
struct Frame<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    jsonrpc: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    method: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    params: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    result: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    error: Option<&'a RawValue>,
}

/// A member that is present, even as `null` (a plain `Option` would read `null` as absent,
/// and `"id": null` is a different message from one without an id).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

impl Message {
    /// Parses and validates one message. Batches (JSON arrays) are refused: 2025-06-18
    /// removed them and no current client sends them, and accepting them would force one
    /// HTTP response to carry several streams.
    pub fn parse(body: &[u8]) -> Result<Message, EnvelopeError> {
        let opens_object = body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{');
        if opens_object && let Ok(frame) = serde_json::from_slice::<Frame<'_>>(body) {
            return Message::from_frame(frame);
        }
        // Not an object, not JSON, or JSON that a derived struct refuses (a repeated member):
        // read it as a tree, as any JSON reader would, to say exactly what is wrong with it.
        let value: Value =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::Parse(e.to_string()))?;
        Message::from_value(value)
    }

    /// Parses what an upstream sent: a JSON-RPC message, or any JSON object (read by its
    /// `method` and `id` alone, as before the gateway typed its messages: a server that
    /// leaves out `"jsonrpc"` is still answered). `None` for what is not a JSON object.
    pub fn parse_upstream(line: &[u8]) -> Option<Message> {
        match Message::parse(line) {
            Ok(m) => Some(m),
            Err(EnvelopeError::Invalid(_)) => match serde_json::from_slice::<Value>(line) {
                Ok(v @ Value::Object(_)) => Some(Message::ours(v)),
                _ => None,
            },
            Err(EnvelopeError::Parse(_)) => None,
        }
    }

    fn from_frame(f: Frame<'_>) -> Result<Message, EnvelopeError> {
        let version = f.jsonrpc.map(|v| v.get());
        if version != Some("\"2.0\"")
            && version.and_then(|v| serde_json::from_str::<String>(v).ok()) != Some("2.0".into())
        {
            return Err(EnvelopeError::Invalid(
                "missing or wrong \"jsonrpc\": \"2.0\"",
            ));
        }
        let id = match f.id {
            Some(raw) => Some(parse_id(raw)?),
            None => None,
        };
        let method = match f.method {
            Some(raw) => Some(Method::from_name(
                &serde_json::from_str::<String>(raw.get())
                    .map_err(|_| EnvelopeError::Invalid("\"method\" must be a string"))?,
            )),
            None => None,
        };
        let kind = classify(
            id.is_some(),
            method.is_some(),
            f.result.is_some(),
            f.error.map(RawValue::get),
        )?;
        if [f.params, f.result, f.error]
            .into_iter()
            .flatten()
            .any(|part| !within_depth(part.get()))
        {
            return Err(EnvelopeError::Parse(format!(
                "nested deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(Message {
            kind,
            id,
            method,
            params: f.params.map(ToOwned::to_owned),
            result: f.result.map(ToOwned::to_owned),
            error: f.error.map(ToOwned::to_owned),
            head: OnceLock::new(),
            tool_error: OnceLock::new(),
        })
    }

    /// Validates an already parsed value (what the 2026-07-28 translations and tests build).
    pub fn from_value(value: Value) -> Result<Message, EnvelopeError> {
        let Value::Object(mut obj) = value else {
            return Err(EnvelopeError::Invalid(if value.is_array() {
                "batch requests are not supported"
            } else {
                "a JSON-RPC message must be an object"
            }));
        };
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err(EnvelopeError::Invalid(
                "missing or wrong \"jsonrpc\": \"2.0\"",
            ));
        }
        let id = obj.remove("id");
        if let Some(id) = &id
            && !valid_id(id)
        {
            return Err(EnvelopeError::Invalid(
                "\"id\" must be a string or an integer and not null",
            ));
        }
        let method = match obj.remove("method") {
            Some(Value::String(m)) => Some(Method::from_name(&m)),
            Some(_) => return Err(EnvelopeError::Invalid("\"method\" must be a string")),
            None => None,
        };
        let error = obj.remove("error").map(|e| raw(&e));
        let kind = classify(
            id.is_some(),
            method.is_some(),
            obj.contains_key("result"),
            error.as_deref().map(RawValue::get),
        )?;
        Ok(Message {
            kind,
            id,
            method,
            params: obj.remove("params").map(|p| raw(&p)),
            result: obj.remove("result").map(|r| raw(&r)),
            error,
            head: OnceLock::new(),
            tool_error: OnceLock::new(),
        })
    }

    /// A message the gateway wrote itself (an error reply, a request it sends): taken as it
    /// is, without the checks a received one passes (an error reply to a message without a
    /// usable id carries `"id": null`).
    pub fn ours(value: Value) -> Message {
        let Value::Object(mut obj) = value else {
            return Message::notification("", None);
        };
        let id = obj.remove("id");
        let method = obj
            .remove("method")
            .and_then(|m| m.as_str().map(Method::from_name));
        let kind = match (&method, &id) {
            (Some(_), Some(id)) if !id.is_null() => Kind::Request,
            (Some(_), _) => Kind::Notification,
            (None, _) => Kind::Response,
        };
        Message {
            kind,
            id,
            method,
            params: obj.remove("params").map(|p| raw(&p)),
            result: obj.remove("result").map(|r| raw(&r)),
            error: obj.remove("error").map(|e| raw(&e)),
            head: OnceLock::new(),
            tool_error: OnceLock::new(),
        }
    }

    /// A request.
    pub fn request(id: Value, method: &str, params: Option<Value>) -> Message {
        Message {
            kind: Kind::Request,
            id: Some(id),
            method: Some(Method::from_name(method)),
            params: params.map(|p| raw(&p)),
            result: None,
            error: None,
            head: OnceLock::new(),
            tool_error: OnceLock::new(),
        }
    }

    /// A notification.
    pub fn notification(method: &str, params: Option<Value>) -> Message {
        Message {
            kind: Kind::Notification,
            id: None,
            method: Some(Method::from_name(method)),
            params: params.map(|p| raw(&p)),
            result: None,
            error: None,
            head: OnceLock::new(),
            tool_error: OnceLock::new(),
        }
    }

    /// A successful answer.
    pub fn answer(id: Value, result: Box<RawValue>) -> Message {
        Message {
            kind: Kind::Response,
            id: Some(id),
            method: None,
            params: None,
            result: Some(result),
            error: None,
            head: OnceLock::new(),
            tool_error: OnceLock::new(),
        }
    }

    /// Request, notification or response.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The `id`, for requests and responses.
    pub fn id(&self) -> Option<&Value> {
        self.id.as_ref()
    }

    /// Replaces the `id` (what the gateway does to every request it forwards and every
    /// answer it returns).
    pub fn set_id(&mut self, id: Value) {
        self.id = Some(id);
    }

    /// The method, for requests and notifications.
    pub fn method(&self) -> Option<&Method> {
        self.method.as_ref()
    }

    /// The method's name, for requests and notifications.
    pub fn method_name(&self) -> Option<&str> {
        self.method.as_ref().map(Method::as_str)
    }

    /// Whether this is a request or notification of `method`.
    pub fn is(&self, method: &Method) -> bool {
        self.method.as_ref() == Some(method)
    }

    /// The raw `params`.
    pub fn params(&self) -> Option<&RawValue> {
        self.params.as_deref()
    }

    /// The raw `result` of an answer.
    pub fn result(&self) -> Option<&RawValue> {
        self.result.as_deref()
    }

    /// The raw `error` of an error answer.
    pub fn error(&self) -> Option<&RawValue> {
        self.error.as_deref()
    }

    /// `params` read as a tree (for the few places that change them).
    pub fn params_value(&self) -> Option<Value> {
        self.params
            .as_deref()
            .and_then(|p| serde_json::from_str(p.get()).ok())
    }

    /// Replaces `params`.
    pub fn set_params(&mut self, params: &Value) {
        self.params = Some(raw(params));
        self.head = OnceLock::new();
    }

    fn head(&self) -> &Head {
        self.head.get_or_init(|| {
            self.params
                .as_deref()
                .and_then(|p| serde_json::from_str(p.get()).ok())
                .unwrap_or_default()
        })
    }

    /// Changes `params` as an object (created when absent; untouched when it is not one),
    /// writing it back only when `edit` says it changed something.
    pub fn edit_params(&mut self, edit: impl FnOnce(&mut Map<String, Value>) -> bool) {
        let mut params = self
            .params_value()
            .unwrap_or_else(|| Value::Object(Map::new()));
        if let Some(obj) = params.as_object_mut()
            && edit(obj)
        {
            self.set_params(&params);
        }
    }

    /// `result` read as a tree.
    pub fn result_value(&self) -> Option<Value> {
        self.result
            .as_deref()
            .and_then(|r| serde_json::from_str(r.get()).ok())
    }

    /// `error.code`, for an error answer.
    pub fn error_code(&self) -> Option<i64> {
        #[derive(Deserialize)]
        struct Code {
            code: Option<i64>,
        }
        serde_json::from_str::<Code>(self.error.as_deref()?.get())
            .ok()?
            .code
    }

    /// `params.name` of a `tools/call` (only a tool call names a tool: `prompts/get` has a
    /// `params.name` too).
    pub fn tool_name(&self) -> Option<String> {
        if !self.is(&Method::ToolsCall) {
            return None;
        }
        self.head().name.as_ref()?.as_str().map(str::to_owned)
    }

    /// `params.task`, if it is an object: the client asks for the request to run as a
    /// 2025-11-25 task. Read in the same pass as the tool's name.
    pub fn task_param(&self) -> Option<&Map<String, Value>> {
        self.head().task.as_ref()?.as_object()
    }

    /// `params._meta`, if it is an object.
    pub fn meta(&self) -> Option<&Map<String, Value>> {
        self.head().meta.as_ref()?.as_object()
    }

    /// `params._meta.progressToken`, if any.
    pub fn progress_token(&self) -> Option<Value> {
        self.meta()?.get("progressToken").cloned()
    }

    /// Whether an answer is a tool's own failure (`result.isError`). Reads that field alone.
    pub fn is_tool_error(&self) -> bool {
        #[derive(Deserialize)]
        struct Flag {
            #[serde(rename = "isError")]
            is_error: Option<Value>,
        }
        *self.tool_error.get_or_init(|| {
            self.result
                .as_deref()
                .and_then(|r| serde_json::from_str::<Flag>(r.get()).ok())
                .and_then(|f| f.is_error)
                .and_then(|v| v.as_bool())
                == Some(true)
        })
    }

    /// The message as a tree (for the code that reads a whole message: the 2026-07-28
    /// translations, the bridge).
    pub fn to_value(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("jsonrpc".into(), Value::from("2.0"));
        if let Some(id) = &self.id {
            obj.insert("id".into(), id.clone());
        }
        if let Some(m) = &self.method {
            obj.insert("method".into(), Value::from(m.as_str()));
        }
        let tree = |r: &RawValue| serde_json::from_str(r.get()).unwrap_or(Value::Null);
        for (key, part) in [
            ("params", &self.params),
            ("result", &self.result),
            ("error", &self.error),
        ] {
            if let Some(p) = part {
                obj.insert(key.into(), tree(p));
            }
        }
        Value::Object(obj)
    }

    /// The message as compact JSON text; raw parts are copied as they arrived.
    pub fn encode(&self) -> String {
        let parts = [&self.params, &self.result, &self.error];
        // Room for the envelope, and a newline the stdio link appends, so a large message
        // is never copied to grow.
        let mut out = String::with_capacity(
            128 + self.method_name().map_or(0, str::len)
                + parts
                    .iter()
                    .filter_map(|p| p.as_deref())
                    .map(|p| p.get().len())
                    .sum::<usize>(),
        );
        out.push_str("{\"jsonrpc\":\"2.0\"");
        if let Some(id) = &self.id {
            out.push_str(",\"id\":");
            out.push_str(&id.to_string());
        }
        if let Some(m) = &self.method {
            out.push_str(",\"method\":");
            out.push_str(&serde_json::to_string(m.as_str()).expect("a string serializes"));
        }
        for (key, part) in [
            (",\"params\":", &self.params),
            (",\"result\":", &self.result),
            (",\"error\":", &self.error),
        ] {
            if let Some(p) = part {
                out.push_str(key);
                out.push_str(p.get());
            }
        }
        out.push('}');
        out
    }
}

impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a> {
            jsonrpc: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<&'a Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            method: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            params: Option<&'a RawValue>,
            #[serde(skip_serializing_if = "Option::is_none")]
            result: Option<&'a RawValue>,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: Option<&'a RawValue>,
        }
        Out {
            jsonrpc: "2.0",
            id: self.id.as_ref(),
            method: self.method_name(),
            params: self.params(),
            result: self.result(),
            error: self.error(),
        }
        .serialize(s)
    }
}

/// How deep a message may nest: what serde_json's tree reader allows (it refuses a 129th
/// level). The raw reader has no such limit, and a message the gateway takes must stay one
/// that any reader of trees downstream (the gateway's own translations, an SDK) can read.
const MAX_DEPTH: usize = 128;

/// Whether a raw member (itself one level inside the message) nests within [`MAX_DEPTH`].
/// Strings are skipped with `memchr`, so a large text costs a few microseconds.
fn within_depth(text: &str) -> bool {
    let b = text.as_bytes();
    let mut depth = 1usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                // To the closing quote, past escapes.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &b[i..]) {
                        Some(off) if b[i + off] == b'\\' => i += off + 2,
                        Some(off) => {
                            i += off;
                            break;
                        }
                        None => return true,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    true
}

/// A tree written as raw text (what the gateway builds itself is small).
fn raw(v: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).expect("a Value always serializes")
}

fn parse_id(raw: &RawValue) -> Result<Value, EnvelopeError> {
    let id: Value = serde_json::from_str(raw.get()).map_err(|_| {
        EnvelopeError::Invalid("\"id\" must be a string or an integer and not null")
    })?;
    if valid_id(&id) {
        Ok(id)
    } else {
        Err(EnvelopeError::Invalid(
            "\"id\" must be a string or an integer and not null",
        ))
    }
}

fn valid_id(id: &Value) -> bool {
    match id {
        Value::String(s) => s.len() <= 1024,
        Value::Number(n) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

/// The kind of a message from which members it has, or why it is none.
fn classify(
    has_id: bool,
    has_method: bool,
    has_result: bool,
    error: Option<&str>,
) -> Result<Kind, EnvelopeError> {
    if has_method {
        return Ok(if has_id {
            Kind::Request
        } else {
            Kind::Notification
        });
    }
    if !has_id {
        return Err(EnvelopeError::Invalid(
            "message has neither \"method\" nor \"id\"",
        ));
    }
    if has_result == error.is_some() {
        return Err(EnvelopeError::Invalid(
            "a response must carry exactly one of \"result\" and \"error\"",
        ));
    }
    if let Some(error) = error {
        #[derive(Deserialize)]
        struct Shape {
            code: Value,
            message: Value,
        }
        let ok = serde_json::from_str::<Shape>(error)
            .is_ok_and(|s| s.code.is_i64() && s.message.is_string());
        if !ok {
            return Err(EnvelopeError::Invalid(
                "\"error\" must be an object with an integer \"code\" and a string \"message\"",
            ));
        }
    }
    Ok(Kind::Response)
}

#[cfg(test)]
mod tests;
