//! [`FrontError`]: every refusal of the front door, and the one place it becomes an HTTP
//! status, headers (`Retry-After`, `WWW-Authenticate`, `Allow`), a JSON-RPC error body and
//! one log line (rate-limited).
//!
//! Must not: log a refusal twice, or decide a status anywhere but here.

use super::*;

/// A request the front door refuses, with everything needed to answer it.
#[derive(Debug)]
pub struct FrontError {
    pub(super) status: StatusCode,
    pub(super) code: i64,
    pub(super) message: String,
    pub(super) id: Value,
    pub(super) data: Option<Value>,
    pub(super) www_authenticate: bool,
    /// `Retry-After`; 503s get 1 s when not set.
    pub(super) retry_after: Option<Duration>,
    /// Logged at WARN even with a `Retry-After`: not a limit doing its job but something
    /// broken (the store).
    pub(super) alarm: bool,
    /// A 405 says what is allowed (`Allow: POST`).
    pub(super) allow_post: bool,
}

/// A JSON-RPC error response from outside any server's front door (the gateway's
/// dispatcher: an unknown server, `/mcp` when several are served): `status`, code
/// `-32600`, `message`, and `data` when given.
pub fn error_response(status: StatusCode, message: String, data: Option<Value>) -> Response {
    let mut e = FrontError::new(status, code::INVALID_REQUEST, message);
    e.data = data;
    e.into_response()
}

impl FrontError {
    pub(super) fn new(status: StatusCode, code: i64, message: impl Into<String>) -> FrontError {
        FrontError {
            status,
            code,
            message: message.into(),
            id: Value::Null,
            data: None,
            www_authenticate: false,
            retry_after: None,
            alarm: false,
            allow_post: false,
        }
    }

    pub(super) fn with_id(mut self, id: Option<&Value>) -> FrontError {
        self.id = id.cloned().unwrap_or(Value::Null);
        self
    }

    pub(super) fn session_missing() -> FrontError {
        FrontError::new(
            StatusCode::BAD_REQUEST,
            code::SERVER_ERROR,
            "Bad Request: MCP-Session-Id header is required (send initialize first)",
        )
    }

    /// The one place a session-layer failure that refuses a request gets its HTTP status:
    /// a rate is the client's to slow down (429), a client's mistake 400, anything else is
    /// the gateway's, the store's or the upstream's state (503 with `Retry-After`).
    pub(super) fn refused(f: &Failure) -> FrontError {
        let status = match (f.kind(), f.origin()) {
            (FailureKind::Rate, _) => StatusCode::TOO_MANY_REQUESTS,
            (_, Origin::Client) => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut e = FrontError::new(status, f.code(), f.message());
        e.data = Some(f.data());
        if let Retry::Safe(after) = f.retry() {
            e.retry_after = after;
        }
        e.alarm = f.origin() == Origin::Store;
        e
    }

    pub(super) fn not_found() -> FrontError {
        FrontError::new(
            StatusCode::NOT_FOUND,
            code::SESSION_NOT_FOUND,
            "Session not found: it expired, was closed, or never existed; send initialize to start a new one",
        )
    }
}

impl From<SessionError> for FrontError {
    fn from(e: SessionError) -> FrontError {
        match e {
            SessionError::NotFound => FrontError::not_found(),
            SessionError::BadRequest(m) => {
                FrontError::new(StatusCode::BAD_REQUEST, code::SERVER_ERROR, m)
            }
            SessionError::Elsewhere { instance, .. } => FrontError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::STORE_UNAVAILABLE,
                format!(
                    "the session is served by instance {instance}, which this instance cannot reach; retry shortly"
                ),
            ),
            SessionError::Refused(f) => FrontError::refused(&f),
            SessionError::Store(e) => FrontError::refused(&Failure::new(
                FailureKind::StoreUnavailable,
                format!("the gateway cannot record this request right now: {e}"),
                Retry::Safe(Some(Duration::from_secs(1))),
            )),
        }
    }
}

/// Refused requests are logged at most this often per second (a flood of bad or
/// over-limit requests must not flood the log); the rest are counted.
static REFUSALS_LOGGED: std::sync::LazyLock<LogLimiter> =
    std::sync::LazyLock::new(|| LogLimiter::new(10, "refused requests"));

impl IntoResponse for FrontError {
    fn into_response(self) -> Response {
        if REFUSALS_LOGGED.admit() {
            // Messages can quote what the client sent (Host, Origin, a method name).
            let message = cut(&self.message, 300);
            // A limit doing its job (it sets Retry-After) is counted in metrics, not a
            // warning; a failure of the gateway is.
            if self.status.is_server_error() && (self.retry_after.is_none() || self.alarm) {
                tracing::warn!(
                    status = self.status.as_u16(),
                    jsonrpc.code = self.code,
                    "{message}"
                );
            } else {
                tracing::info!(
                    status = self.status.as_u16(),
                    jsonrpc.code = self.code,
                    "request refused: {message}"
                );
            }
        }
        let body = protocol::error_response(self.id, self.code, self.message, self.data);
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.allow_post {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        if self.www_authenticate {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tether\""),
            );
        }
        let retry_after = self
            .retry_after
            .or((self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(Duration::from_secs(1)));
        if let Some(after) = retry_after {
            // Whole seconds, rounded up (RFC 9110 §10.2.3).
            let secs = after.as_millis().div_ceil(1000).max(1);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
        }
        resp
    }
}
