//! What a failed connection or an HTTP status from a server means, in words an operator
//! can act on (wrong path, TLS, authentication, a 2024-11-05 server), and whether trying
//! again can help.
//!
//! Must not: put credentials or a URL's query into a message.

use super::*;

/// A request failure in words a person can act on, and whether waiting may cure it (a
/// refused connection may be a restart; a TLS mismatch or a bad name will not fix itself).
pub fn explain_error(e: &reqwest::Error, url: &str) -> (String, bool) {
    let chain = error_chain(e);
    let lower = chain.to_ascii_lowercase();
    let host = reqwest::Url::parse(url)
        .ok()
        .map(|u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or(""),
                u.port_or_known_default().unwrap_or(0)
            )
        })
        .unwrap_or_default();
    if e.is_timeout() {
        (format!("no answer from {url} in time ({chain})"), true)
    } else if lower.contains("invalidcontenttype") || lower.contains("corrupt message") {
        (
            format!(
                "TLS failed: {host} answered in plain HTTP, not TLS. The URL says https:// but the server speaks http://; use http:// (or put TLS in front of it)"
            ),
            false,
        )
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        (
            format!(
                "TLS failed with {host}: {chain}. If the server uses a private CA, pass --ca-file."
            ),
            false,
        )
    } else if e.is_connect() && lower.contains("refused") {
        (
            format!(
                "connection refused: nothing is listening at {host} ({url}). Is the server running, on this port?"
            ),
            true,
        )
    } else if e.is_connect() && (lower.contains("dns") || lower.contains("resolve")) {
        (format!("cannot resolve the host of {url}: {chain}"), false)
    } else if e.is_connect() {
        (format!("cannot connect to {url}: {chain}"), true)
    } else {
        (format!("HTTP request to {url} failed: {chain}"), true)
    }
}

/// What an HTTP status on `initialize` says about the URL, for the statuses whose meaning
/// is clear: credentials wanted, or nothing serving MCP at that path.
pub fn explain_status(status: StatusCode, www_authenticate: Option<&str>) -> Option<String> {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Some(format!(
            "the server requires authentication (HTTP {}{}). Pass a key: --header 'Authorization: Bearer KEY', --bearer-env VAR or TETHER_HEADERS.",
            status.as_u16(),
            www_authenticate
                .filter(|c| !c.is_empty())
                .map(|c| format!(", WWW-Authenticate: {c}"))
                .unwrap_or_default()
        )),
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::BAD_REQUEST => {
            Some(format!(
                "the server answered HTTP {} to initialize: wrong path (MCP endpoints are usually /mcp), or a \
             2024-11-05 HTTP+SSE server (its endpoint is usually /sse; `tether connect` falls back to it)",
                status.as_u16()
            ))
        }
        _ => None,
    }
}

/// What an error answer says: its `WWW-Authenticate` challenge and its body as text.
pub(in crate::upstream) async fn error_parts(resp: reqwest::Response) -> (Option<String>, String) {
    let challenge = resp
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (challenge, error_body(resp).await)
}

/// The body of an error answer, as text, at most 64 KiB (it is only read for a message).
pub(in crate::upstream) async fn error_body(resp: reqwest::Response) -> String {
    read_limited(resp, 64 << 10)
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The answer to request `id` that an HTTP error `status` from the server at `url` stands
/// for: the server's own JSON-RPC error when its `body` is one (with our id), else an error
/// of ours naming the upstream and the status (`data.http_status`), never the body relayed
/// as if it were JSON-RPC (issue 26: `400 {"error":"bad"}` reached clients as
/// `{"error":"bad","id":5}`).
pub(in crate::upstream) fn status_answer(
    id: &Value,
    url: &str,
    status: StatusCode,
    challenge: Option<&str>,
    body: &str,
) -> Value {
    if let Ok(mut err) = serde_json::from_str::<Value>(body)
        && err.get("error").is_some()
        && protocol::is_message(&err)
    {
        protocol::set_id(&mut err, id.clone());
        return err;
    }
    let why = explain_status(status, challenge)
        .filter(|_| matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN))
        .unwrap_or_else(|| {
            format!(
                "upstream {} answered HTTP {status}: {}",
                describe_url(url),
                crate::log_limit::cut(body, 200)
            )
        });
    protocol::error_response(
        id.clone(),
        code::UPSTREAM_LOST,
        why,
        Some(serde_json::json!({
            "kind": "upstream_http_error",
            "origin": "upstream",
            "http_status": status.as_u16(),
            "upstream": describe_url(url),
        })),
    )
}

/// The answer to request `id` when the server at `url` sent a body (`status`) that is not
/// a JSON-RPC message: an error of ours naming the upstream and the status.
pub(in crate::upstream) fn not_jsonrpc_answer(
    id: &Value,
    url: &str,
    status: StatusCode,
    what: &str,
) -> Value {
    protocol::error_response(
        id.clone(),
        code::UPSTREAM_LOST,
        format!(
            "upstream {} answered HTTP {status} with {what}, not a JSON-RPC message",
            describe_url(url)
        ),
        Some(serde_json::json!({
            "kind": "upstream_not_jsonrpc",
            "origin": "upstream",
            "http_status": status.as_u16(),
            "upstream": describe_url(url),
        })),
    )
}
