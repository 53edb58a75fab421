//! What stands before the admin API: the `Host` check of a loopback listener, the admin
//! token, and read-only access (session ids cut to a prefix without the token).
//!
//! Must not: let a request without the token change anything, or show a usable session id.

use super::*;

/// DNS-rebinding protection for a loopback admin listener: a page whose name was rebound to
/// 127.0.0.1 could otherwise read the API with plain GETs (no Origin, no token on loopback).
/// On any other address the admin token guards the API and load balancers' health checks
/// name the instance's own address, so `Host` is not checked there.
pub(super) async fn check_host(
    State(st): State<AdminState>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let hosts: Vec<&str> = headers
        .get_all(header::HOST)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
        .collect();
    let host = match crate::policy::request_host(&hosts, req.uri().authority().map(|a| a.as_str()))
    {
        Ok(h) => h,
        Err(why) => {
            return ApiError(
                StatusCode::BAD_REQUEST,
                crate::log_limit::cut(&why, 200).into_owned(),
            )
            .into_response();
        }
    };
    if st.loopback_listener
        && let Some(host) = host
        && !crate::policy::host_allowed(&host, &st.allowed_hosts, true)
    {
        return ApiError(
            StatusCode::FORBIDDEN,
            format!("Host {host:?} is not allowed (see --allowed-hosts)"),
        )
        .into_response();
    }
    next.run(req).await
}

pub(super) async fn require_token(
    State(st): State<AdminState>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| crate::auth::same_secret(g, &st.token)) {
        return next.run(req).await;
    }
    let read_only = st.loopback_listener && req.method() == axum::http::Method::GET;
    if !read_only {
        static LOGGED: std::sync::LazyLock<crate::log_limit::LogLimiter> =
            std::sync::LazyLock::new(|| {
                crate::log_limit::LogLimiter::new(5, "refused admin requests")
            });
        if LOGGED.admit() {
            tracing::info!(method = %req.method(), path = %crate::log_limit::cut(req.uri().path(), 100), "admin request without a valid token refused");
        }
        let what = if st.loopback_listener {
            "changing anything (evicting a session) needs the admin token"
        } else {
            "the admin API needs the admin token"
        };
        let mut resp = ApiError(
            StatusCode::UNAUTHORIZED,
            format!("{what}: Authorization: Bearer TOKEN ({})", st.token_hint),
        )
        .into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"tether-admin\""),
        );
        return resp;
    }
    redact_session_ids(next.run(req).await).await
}

/// Cuts every session id in a JSON answer to a prefix (read-only access without the
/// token): enough to tell sessions apart, not enough to use or evict one.
pub(super) async fn redact_session_ids(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // Admin answers are bounded pages; 16 MiB is far above any of them.
    let Ok(bytes) = axum::body::to_bytes(body, 16 << 20).await else {
        // Pages are bounded far below this; an answer past it cannot be redacted, so it
        // is not sent, and the reader is told to ask for less.
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "answer over 16 MiB; ask for a smaller page (limit)".into(),
        )
        .into_response();
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    redact(&mut value);
    let mut resp = (parts.status, axum::Json(value)).into_response();
    for (k, v) in &parts.headers {
        if k != header::CONTENT_LENGTH {
            resp.headers_mut().insert(k, v.clone());
        }
    }
    resp
}

/// Session ids are 40 lowercase hex characters ([`crate::ids::new_session_id`]).
pub(super) fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                if matches!(k.as_str(), "id" | "session_id")
                    && let Some(s) = item
                        .as_str()
                        .filter(|s| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                {
                    *item = Value::String(format!("{}…", &s[..8]));
                    continue;
                }
                redact(item);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}
