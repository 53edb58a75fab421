//! Requests for a session another instance serves: sent on to that instance unchanged
//! (once), or, when it is gone, the session taken over here after its heartbeat lapses.
//!
//! Must not: forward a request that was already forwarded.

use super::*;

/// Marks a request forwarded by another instance: it is never forwarded again.
pub(super) const FORWARDED_HEADER: &str = "x-tether-forwarded";

/// What is needed to send a request on to another instance unchanged.
pub(super) struct Original<'a> {
    pub(super) method: Method,
    pub(super) path_and_query: String,
    pub(super) headers: &'a HeaderMap,
    pub(super) body: Bytes,
}

impl<'a> Original<'a> {
    pub(super) fn new(
        method: Method,
        uri: &Uri,
        headers: &'a HeaderMap,
        body: Bytes,
    ) -> Original<'a> {
        Original {
            method,
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned()),
            headers,
            body,
        }
    }
}

pub(super) enum Route {
    Local(Arc<Session>),
    Remote(Response),
}

/// Finds the session here or forwards the request to the instance that serves it. When
/// that instance does not answer (killed), waits for its heartbeat to lapse and takes the
/// session over, so the request is served here with the same session id.
pub(super) async fn route(
    st: &AppState,
    id: &str,
    principal: &Principal,
    original: Original<'_>,
) -> Result<Route, FrontError> {
    let deadline = tokio::time::Instant::now() + st.cfg.takeover_wait;
    loop {
        let (instance, url) = match st.registry.get(id, principal).await {
            Ok(s) => return Ok(Route::Local(s)),
            Err(SessionError::Elsewhere { instance, url }) => (instance, url),
            Err(e) => return Err(e.into()),
        };
        if original.headers.contains_key(FORWARDED_HEADER) {
            // Ownership moved while the request travelled; the client retries.
            return Err(SessionError::Elsewhere { instance, url }.into());
        }
        match forward(st, &url, &original).await {
            Ok(resp) => {
                st.registry.metrics().forwarded.inc();
                return Ok(Route::Remote(resp));
            }
            Err(e) if e.is_connect() && tokio::time::Instant::now() < deadline => {
                tracing::debug!(owner = %instance, error = %e, "owner instance unreachable; waiting to take the session over");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(FrontError::refused(&Failure::new(
                    FailureKind::Moved,
                    format!(
                        "the gateway instance serving this session ({instance}) failed: {e}; if a request was in flight its outcome is unknown"
                    ),
                    Retry::Unknown,
                )));
            }
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the HTTP client sets itself. `Host`
/// travels on: the owner applies the same `Host` check (`--allowed-hosts`) to the name the
/// client used, not to the instance address the forward was sent to.
pub(super) fn end_to_end(name: &header::HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
    )
}

pub(super) async fn forward(
    st: &AppState,
    owner_url: &str,
    original: &Original<'_>,
) -> Result<Response, reqwest::Error> {
    let mut req = st.forwarder.request(
        original.method.clone(),
        format!("{owner_url}{}", original.path_and_query),
    );
    for (name, value) in original.headers {
        if end_to_end(name) {
            req = req.header(name, value);
        }
    }
    let resp = req
        .header(FORWARDED_HEADER, "1")
        .body(original.body.clone())
        .send()
        .await?;
    let mut out = Response::builder().status(resp.status().as_u16());
    for (name, value) in resp.headers() {
        if end_to_end(name) {
            out = out.header(name.as_str(), value.as_bytes());
        }
    }
    Ok(out
        .body(Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response()))
}
