//! The admin surface, on its own listener (`--admin-listen`, loopback by default).
//!
//! Endpoints:
//! - `GET /health`: status, version, uptime, live sessions.
//! - `GET /health/ready`: the live store takes a real write, the upstream can be started
//!   and its circuit is closed (503 otherwise, naming the failing check).
//! - `GET /health/deep`: store latency, upstream states and circuit, limits in use,
//!   instances, ledger aggregates.
//! - `GET /metrics`: Prometheus text.
//! - `GET /api/sessions`, `GET|DELETE /api/sessions/{id}`, `GET /api/sessions/disconnected`,
//!   `GET /api/stats`, `GET /api/users`, `GET /api/users/{id}/stats`,
//!   `GET /api/stateless-clients` (2026-07-28 clients, who hold no session),
//!   `GET /api/quotas` (the tool-call quota and each user's use), `GET /api/servers` (each
//!   server's state, endpoint, sessions, upstreams and limits): the JSON API, every list
//!   bounded and paged; bad query parameters get 400 with a message.
//! - `GET /api/openapi.json`: the API description.
//! - `GET /`: the dashboard (one page, shipped in the binary, using only the JSON API).
//!
//! There is always an admin token (configured, read from a file, or generated at start into
//! `STATE_DIR/admin.token`, readable only by its user, where the CLI finds it). When the
//! listener is not on loopback, every endpoint but the health checks needs
//! `Authorization: Bearer <admin token>`. On loopback, requests without it are read-only
//! (anything but GET gets 401) and never see a full session id: ids in their answers are
//! cut to a prefix, so another local process can tell sessions apart but cannot use or
//! evict one.
//!
//! Must not: touch sessions except through `Registry` (evict, upstream states), or show a full session id without the token.

mod api;
mod guard;
mod health;

use api::{
    disconnected, evict_session, list_sessions, quotas, show_session, stateless_clients, stats,
    user_stats, users,
};
use guard::{check_host, require_token};
use health::{deep, health, metrics, ready, servers};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::KeyRing;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::session::Registry;
use crate::store::{
    CallRow, Coordinator, LedgerStore, LiveStore, SessionQuery, SessionState, SessionSummary,
    now_ms,
};

/// What the admin surface needs.
#[derive(Clone)]
pub struct AdminState {
    /// The servers of this process and their sessions.
    pub hub: Hub,
    /// Tool-call quotas per user (shared by every server).
    pub quotas: Arc<crate::session::quota::Quotas>,
    /// Live session state.
    pub store: Arc<dyn LiveStore>,
    /// Session history and tool calls.
    pub ledger: Arc<dyn LedgerStore>,
    /// Other instances of the deployment (Redis), if any.
    pub coordinator: Option<Arc<dyn Coordinator>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Configured users.
    pub keys: Arc<KeyRing>,
    /// The admin token (see the module doc for where it is required).
    pub token: String,
    /// Where the token can be found, for the 401 message.
    pub token_hint: String,
    /// Process start.
    pub started: Instant,
    /// This instance's MCP address, for `/health/deep`.
    pub instance: String,
    /// `Host` names allowed besides loopback ones (`--allowed-hosts`).
    pub allowed_hosts: Vec<String>,
    /// The admin listener is on a loopback address: only then is `Host` checked (see
    /// [`check_host`]).
    pub loopback_listener: bool,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/openapi.json", get(openapi))
        .route("/api/sessions", get(list_sessions))
        .route("/api/sessions/disconnected", get(disconnected))
        .route(
            "/api/sessions/{id}",
            get(show_session).delete(evict_session),
        )
        .route("/api/stats", get(stats))
        .route("/api/users", get(users))
        .route("/api/stateless-clients", get(stateless_clients))
        .route("/api/tasks", get(api::tasks))
        .route("/api/quotas", get(quotas))
        .route("/api/servers", get(servers))
        .route("/api/users/{id}/stats", get(user_stats))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        // The page holds no data; its API calls carry the token from the URL fragment.
        .route("/", get(dashboard))
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .route("/health/deep", get(deep))
        .merge(api)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_host,
        ))
        .with_state(state)
}

/// An admin API error: status plus `{"error": message}`.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.0.is_server_error() {
            tracing::warn!(status = self.0.as_u16(), "admin API: {}", self.1);
        }
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

#[cfg(test)]
mod tests;
