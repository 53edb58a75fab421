//! What every MCP request passes before a handler reads it: Host and Origin (DNS
//! rebinding), the caller's key and the server's user list, and what it accepts.
//!
//! Must not: read the body, or let a handler skip or reorder the checks.

use super::*;

/// The checks every MCP request passes first, in this order: its `Origin` is allowed
/// (403), then its caller is authenticated (401). Taken by every handler before anything
/// else is read, so no handler can skip or reorder them.
pub(super) struct Caller(pub(super) Principal);

impl axum::extract::FromRequestParts<AppState> for Caller {
    type Rejection = FrontError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &AppState,
    ) -> Result<Self, FrontError> {
        // The dispatcher rewrote the path; the original target keeps an absolute-form
        // request's authority.
        let authority = parts
            .extensions
            .get::<OriginalUri>()
            .map_or(&parts.uri, |o| &o.0)
            .authority()
            .map(|a| a.as_str().to_owned());
        check_origin(&parts.headers, authority.as_deref(), &st.cfg)?;
        let principal = authenticate(&parts.headers, &st.cfg)?;
        if !st.cfg.users.allows(&principal.id) {
            return Err(FrontError::new(
                StatusCode::FORBIDDEN,
                code::SERVER_ERROR,
                format!(
                    "Forbidden: user {:?} may not use server {:?} (its tether.users in the servers file)",
                    principal.id,
                    st.cfg.server.as_deref().unwrap_or_default()
                ),
            ));
        }
        Ok(Caller(principal))
    }
}

/// The principal of a request: anonymous without keys, else the key's user or 401.
pub(super) fn authenticate(
    headers: &HeaderMap,
    cfg: &FrontConfig,
) -> Result<Principal, FrontError> {
    let keys = cfg.keys.get();
    if !keys.enabled() {
        return Ok(Principal::anonymous());
    }
    keys.authenticate(header_str(headers, header::AUTHORIZATION.as_str()))
        .ok_or_else(|| {
            let mut e = FrontError::new(
                StatusCode::UNAUTHORIZED,
                code::SERVER_ERROR,
                "Unauthorized: send a valid API key as `Authorization: Bearer KEY`",
            );
            e.www_authenticate = true;
            e
        })
}

pub(super) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// DNS-rebinding protection: the `Host` a request names and the `Origin` it comes from
/// (when present) must be allowed; 403 otherwise.
pub(super) fn check_origin(
    headers: &HeaderMap,
    authority: Option<&str>,
    cfg: &FrontConfig,
) -> Result<(), FrontError> {
    let hosts: Vec<&str> = headers
        .get_all(header::HOST)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
        .collect();
    let host = policy::request_host(&hosts, authority).map_err(|why| {
        FrontError::new(
            StatusCode::BAD_REQUEST,
            code::SERVER_ERROR,
            format!("Bad Request: {}", cut(&why, 200)),
        )
    })?;
    if let Some(host) = host
        && !policy::host_allowed(&host, &cfg.allowed_hosts, cfg.loopback_listener)
    {
        return Err(FrontError::new(
            StatusCode::FORBIDDEN,
            code::SERVER_ERROR,
            format!(
                "Forbidden: Host {:?} is not allowed (see --allowed-hosts)",
                cut(&host, 100)
            ),
        ));
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    if policy::origin_allowed(origin, &cfg.allowed_origins) {
        Ok(())
    } else {
        Err(FrontError::new(
            StatusCode::FORBIDDEN,
            code::SERVER_ERROR,
            format!(
                "Forbidden: Origin {:?} is not allowed (see --allowed-origins)",
                cut(origin, 100)
            ),
        ))
    }
}

pub(super) fn accepts(headers: &HeaderMap, wanted: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|part| {
            part.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case(wanted))
        })
}
