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

/// DNS-rebinding protection for a loopback admin listener: a page whose name was rebound to
/// 127.0.0.1 could otherwise read the API with plain GETs (no Origin, no token on loopback).
/// On any other address the admin token guards the API and load balancers' health checks
/// name the instance's own address, so `Host` is not checked there.
async fn check_host(
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

async fn require_token(
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
async fn redact_session_ids(resp: Response) -> Response {
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
fn redact(v: &mut Value) {
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

async fn health(State(st): State<AdminState>) -> Result<axum::Json<Value>, ApiError> {
    let live = st.store.count_live().await?;
    st.metrics.sessions_live.set(live as i64);
    let held: usize = st.hub.registries().iter().map(Registry::held_count).sum();
    Ok(axum::Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": st.started.elapsed().as_secs(),
        "live_sessions": live,
        "held_sessions": held,
    })))
}

/// The upstream's circuit: `Err` while new upstream starts are refused.
fn circuit_check(registry: &Registry) -> Result<(), String> {
    let circuit = registry.connector().circuit();
    if circuit.is_open() {
        let (failures, last) = circuit.failures();
        return Err(format!(
            "circuit open: the upstream failed to start {failures} times in a row (last: {last}); new sessions are refused"
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
struct ReadyParams {
    server: Option<String>,
}

/// Ready when the store takes a write and every server (or the one `?server=` names) can
/// start its upstream with its circuit closed; each server's checks are listed.
async fn ready(State(st): State<AdminState>, Query(p): Query<ReadyParams>) -> Response {
    let store = match tokio::time::timeout(Duration::from_secs(2), st.store.check_writable()).await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("store write did not complete within 2s".into()),
    };
    let mut servers = st.hub.current();
    if let Some(name) = &p.server {
        servers.retain(|n, _| n == name);
        if servers.is_empty() {
            return ApiError(StatusCode::NOT_FOUND, format!("no server {name:?}")).into_response();
        }
    }
    let show = |r: &Result<(), String>| match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": e}),
    };
    let mut upstream = Ok(());
    let mut circuit = Ok(());
    let mut per_server = serde_json::Map::new();
    for (name, g) in &servers {
        let u = crate::upstream::startable(g.registry.connector().spec()).await;
        let c = circuit_check(&g.registry);
        let several = servers.len() > 1;
        if upstream.is_ok()
            && let Err(e) = &u
        {
            upstream = Err(if several {
                format!("{name}: {e}")
            } else {
                e.clone()
            });
        }
        if circuit.is_ok()
            && let Err(e) = &c
        {
            circuit = Err(if several {
                format!("{name}: {e}")
            } else {
                e.clone()
            });
        }
        per_server.insert(
            name.clone(),
            json!({"ready": u.is_ok() && c.is_ok(), "upstream": show(&u), "circuit": show(&c)}),
        );
    }
    let ok = store.is_ok() && upstream.is_ok() && circuit.is_ok();
    if !ok {
        tracing::debug!(?store, ?upstream, ?circuit, "not ready");
    }
    let body = json!({ "ready": ok, "checks": {
        "store": show(&store),
        "upstream": show(&upstream),
        "circuit": show(&circuit),
    }, "servers": per_server });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// One server's part of `/health/deep` and `/api/servers`.
fn server_json(name: &str, g: &crate::hub::Generation, state: &str, endpoint: bool) -> Value {
    let r = &g.registry;
    let connector = r.connector();
    let circuit = connector.circuit();
    let (failures, last_failure) = circuit.failures();
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for s in r.upstream_states().into_values() {
        *states.entry(s).or_default() += 1;
    }
    let admission = r.admission();
    let cfg = r.config();
    json!({
        "name": name,
        "state": state,
        "endpoint": endpoint.then(|| format!("/servers/{name}/mcp")),
        "upstream": connector.spec().describe(),
        "protocol": connector.protocol(),
        "sessions_by_state": states,
        "held_sessions": r.held_count(),
        "running": connector.running(),
        "circuit": {
            "open": circuit.is_open(),
            "consecutive_failures": failures,
            "last_failure": (!last_failure.is_empty()).then_some(last_failure),
            "refused": circuit.refused(),
        },
        "limits": {
            "max_sessions": admission.config().max_sessions,
            "max_upstreams": connector.max_running(),
            "session_rate": (admission.config().rate > 0).then_some(admission.config().rate),
            "idle_timeout_s": cfg.idle_timeout.as_secs(),
            "upstream_timeout_s": cfg.upstream_timeout.as_secs(),
        },
    })
}

/// The servers this process serves, with their draining generations (`GET /api/servers`).
async fn servers(State(st): State<AdminState>) -> axum::Json<Value> {
    axum::Json(json!({ "servers": servers_json(&st.hub) }))
}

fn servers_json(hub: &Hub) -> Vec<Value> {
    let mut out = Vec::new();
    for v in hub.view() {
        if let Some(g) = &v.current {
            out.push(server_json(&v.name, g, "serving", true));
        }
        for g in &v.draining {
            out.push(server_json(&v.name, g, "draining", false));
        }
    }
    out
}

async fn deep(State(st): State<AdminState>) -> Result<axum::Json<Value>, ApiError> {
    let t = Instant::now();
    let totals = st.ledger.totals().await?;
    let store_latency_ms = t.elapsed().as_secs_f64() * 1000.0;
    let me = json!({ "address": st.instance, "uptime_s": st.started.elapsed().as_secs() });
    let (instances, live_store) = match &st.coordinator {
        None => (vec![me], json!({ "kind": st.store.describe(), "up": true })),
        Some(c) => {
            let up = c.is_up();
            let listed = match c.instances().await {
                Ok(list) => list
                    .into_iter()
                    .map(|i| {
                        json!({
                            "id": i.id,
                            "address": i.url,
                            "uptime_s": (now_ms() - i.started_ms).max(0) / 1000,
                            "version": i.version,
                            "self": i.id == c.me().id,
                        })
                    })
                    .collect(),
                // Redis is down: this instance is the only one it can vouch for.
                Err(_) => vec![me],
            };
            (listed, json!({ "kind": st.store.describe(), "up": up }))
        }
    };
    let servers = servers_json(&st.hub);
    // One server: its block is `upstream`, as before servers came in several.
    let upstream = match servers.as_slice() {
        [one] => one.clone(),
        _ => Value::Null,
    };
    let global = st.hub.registries();
    let admission = global.first().map(|r| {
        let a = r.admission();
        a.parent().cloned().unwrap_or_else(|| a.clone())
    });
    Ok(axum::Json(json!({
        "status": "ok",
        "store": { "latency_ms": store_latency_ms, "live": live_store },
        "upstream": upstream,
        "servers": servers,
        "limits": admission.map(|a| json!({
            "sessions_held": a.held(),
            "max_sessions": a.config().max_sessions,
            "max_sessions_per_principal": a.config().max_per_principal,
        })),
        "instances": instances,
        "sessions": {
            "total": totals.sessions,
            "active": totals.active,
            "average_duration_ms": totals.average_duration_ms,
        },
        "tool_calls": { "total": totals.tool_calls, "errors": totals.errors },
    })))
}

async fn metrics(State(st): State<AdminState>) -> Response {
    // Gauges of state owned elsewhere, read when scraped.
    let mut running = 0;
    let mut open = false;
    for v in st.hub.view() {
        let label = Metrics::server(&v.name);
        let generations: Vec<_> = v.current.iter().chain(&v.draining).collect();
        let n: usize = generations
            .iter()
            .map(|g| g.registry.connector().running())
            .sum();
        let circuit = v
            .current
            .as_ref()
            .is_some_and(|g| g.registry.connector().circuit().is_open());
        open |= circuit;
        st.metrics
            .server_circuit_open
            .get_or_create(&label)
            .set(i64::from(circuit));
        st.metrics
            .server_upstreams_running
            .get_or_create(&label)
            .set(n as i64);
        running += n;
    }
    st.metrics.upstream_circuit_open.set(i64::from(open));
    st.metrics.upstreams_running.set(running as i64);
    // The same figure /health reports. A store that does not answer leaves the last value:
    // the scrape still serves every other metric, and readiness reports the outage.
    // Bounded: a store that hangs (Redis unreachable) must not stall the scrape.
    match tokio::time::timeout(Duration::from_secs(1), st.store.count_live()).await {
        Ok(Ok(live)) => {
            st.metrics.sessions_live.set(live as i64);
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "cannot count live sessions for /metrics"),
        Err(_) => tracing::debug!("counting live sessions for /metrics timed out"),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("admin/openapi.json"),
    )
        .into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("admin/dashboard.html"))
}

/// Parses `since`: RFC 3339, milliseconds since the epoch, or a duration ago (`1h`); a time
/// before the epoch or after now is out of range (400), not a negative or future window.
fn parse_since(text: &str) -> Result<i64, ApiError> {
    let now = now_ms();
    let out_of_range = || {
        bad(format!(
            "since: {:?} is out of range (from the Unix epoch to now)",
            crate::log_limit::cut(text, 64)
        ))
    };
    let at = if let Ok(ms) = text.parse::<i64>() {
        ms
    } else if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| out_of_range())
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))?
    } else if let Ok(d) = humantime::parse_duration(text) {
        now.checked_sub(i64::try_from(d.as_millis()).map_err(|_| out_of_range())?)
            .ok_or_else(out_of_range)?
    } else {
        return Err(bad(format!(
            "since: {:?} is not a time (RFC 3339, epoch ms) or a duration ago like 1h",
            crate::log_limit::cut(text, 64)
        )));
    };
    if !(0..=now).contains(&at) {
        return Err(out_of_range());
    }
    Ok(at)
}

/// Largest `offset` a page may start at (far past any ledger; bounds the arithmetic).
const MAX_OFFSET: usize = 1_000_000_000;

/// Bytes of rows one page holds at most, whatever its row limit: rows are bounded (client
/// strings are cut), but a page must stay small even of rows an older version wrote.
const PAGE_BYTES: usize = 1 << 20;

/// The first rows of `rows` that fit in [`PAGE_BYTES`] (at least one), and whether some
/// were left for the next page.
fn fit_page(rows: Vec<Value>) -> (Vec<Value>, bool) {
    let mut used = 0;
    let mut out = Vec::with_capacity(rows.len());
    let total = rows.len();
    for row in rows {
        used += crate::protocol::encoded_len(&row);
        if used > PAGE_BYTES && !out.is_empty() {
            break;
        }
        out.push(row);
    }
    let cut = out.len() < total;
    (out, cut)
}

fn parse_limit(limit: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(t) => match t.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad(format!(
                "limit: {t:?} must be a whole number from 1 to {max}"
            ))),
        },
    }
}

#[derive(Deserialize)]
struct ListParams {
    status: Option<String>,
    user: Option<String>,
    client: Option<String>,
    server: Option<String>,
    since: Option<String>,
    limit: Option<String>,
    offset: Option<String>,
}

/// Adds each session's upstream state (held here) or, in a multi-instance deployment, the
/// instance that serves it.
async fn with_state(st: &AdminState, sessions: Vec<SessionSummary>) -> Vec<Value> {
    let states: HashMap<String, &'static str> = st
        .hub
        .registries()
        .iter()
        .flat_map(Registry::upstream_states)
        .collect();
    let mut owners: HashMap<String, String> = HashMap::new();
    if let Some(c) = &st.coordinator {
        let elsewhere: Vec<String> = sessions
            .iter()
            .filter(|s| s.state == "live" && !states.contains_key(&s.id))
            .map(|s| s.id.clone())
            .collect();
        // Without Redis the page is still useful; the owner column is just empty.
        if let Ok(found) = c.owners(&elsewhere).await {
            for (id, owner) in elsewhere.into_iter().zip(found) {
                if let Some(o) = owner {
                    owners.insert(id, o);
                }
            }
        }
    }
    let me = st.coordinator.as_ref().map(|c| c.me().id.clone());
    sessions
        .into_iter()
        .map(|s| {
            let mut v = serde_json::to_value(&s).expect("summary serializes");
            let (upstream, instance) = if s.state == "closed" {
                ("stopped", None)
            } else if let Some(state) = states.get(&s.id) {
                (*state, me.clone())
            } else if let Some(owner) = owners.get(&s.id).filter(|o| Some(*o) != me.as_ref()) {
                ("elsewhere", Some(owner.clone()))
            } else {
                ("idle", None)
            };
            v["upstream_state"] = json!(upstream);
            v["instance"] = json!(instance);
            v["idle_ms"] = json!((now_ms() - s.last_active_ms).max(0));
            v
        })
        .collect()
}

async fn list_sessions(
    State(st): State<AdminState>,
    Query(p): Query<ListParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let state = match p.status.as_deref() {
        None | Some("all") => None,
        Some("active" | "live") => Some(SessionState::Live),
        Some("closed") => Some(SessionState::Closed),
        Some(other) => {
            return Err(bad(format!(
                "status: {other:?} must be active, closed or all"
            )));
        }
    };
    let limit = parse_limit(p.limit.as_deref(), 50, 500)?;
    let offset = match p.offset.as_deref() {
        None => 0,
        Some(t) => t
            .parse::<usize>()
            .ok()
            .filter(|o| *o <= MAX_OFFSET)
            .ok_or_else(|| {
                bad(format!(
                    "offset: {:?} must be a whole number from 0 to {MAX_OFFSET}",
                    crate::log_limit::cut(t, 64)
                ))
            })?,
    };
    let since_ms = p.since.as_deref().map(parse_since).transpose()?;
    let query = SessionQuery {
        state,
        user: p.user,
        client: p.client,
        server: p.server,
        since_ms,
        limit: limit + 1,
        offset,
    };
    let mut sessions = st.ledger.list_sessions(&query).await?;
    let more = sessions.len() > limit;
    sessions.truncate(limit);
    let (page, cut) = fit_page(with_state(&st, sessions).await);
    let next = (more || cut).then_some(offset + page.len());
    Ok(axum::Json(json!({
        "sessions": page,
        "limit": limit,
        "offset": offset,
        "next_offset": next,
    })))
}

async fn show_session(
    State(st): State<AdminState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let Some(s) = st.ledger.session_summary(&id).await? else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no session {id}")));
    };
    let calls = st.ledger.session_calls(&id, 50).await?;
    let events = st.ledger.session_events(&id, 200).await?;
    // The session's life in order: created, rehydrations and upstream restarts, tool calls
    // (the 50 most recent; never arguments or results), closed.
    let mut timeline: Vec<(i64, Value)> = Vec::with_capacity(calls.len() + events.len() + 2);
    timeline.push((
        s.created_ms,
        json!({"at_ms": s.created_ms, "kind": "created"}),
    ));
    for e in &events {
        timeline.push((e.at_ms, json!({"at_ms": e.at_ms, "kind": e.kind})));
    }
    for c in &calls {
        timeline.push((
            c.started_ms,
            json!({"at_ms": c.started_ms, "kind": "tool_call", "tool": c.tool, "outcome": c.outcome,
                   "error_code": c.error_code, "duration_ms": c.duration_ms}),
        ));
    }
    if let Some(at) = s.closed_ms {
        timeline.push((
            at,
            json!({"at_ms": at, "kind": "closed", "reason": s.close_reason}),
        ));
    }
    timeline.sort_by_key(|(at, _)| *at);
    let timeline: Vec<Value> = timeline.into_iter().map(|(_, v)| v).collect();
    let session = with_state(&st, vec![s])
        .await
        .pop()
        .expect("one in, one out");
    Ok(axum::Json(
        json!({ "session": session, "calls": calls, "timeline": timeline }),
    ))
}

async fn evict_session(
    State(st): State<AdminState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    // The server holding it, else any (a session only in the store is closed there).
    let Some(registry) = st
        .hub
        .holder(&id)
        .or_else(|| st.hub.registries().into_iter().next())
    else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no live session {id}"),
        ));
    };
    match registry.evict(&id).await {
        Ok(true) => Ok(axum::Json(json!({ "evicted": id }))),
        Ok(false) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no live session {id}"),
        )),
        Err(e) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

#[derive(Deserialize)]
struct DisconnectedParams {
    days: Option<String>,
    limit: Option<String>,
}

async fn disconnected(
    State(st): State<AdminState>,
    Query(p): Query<DisconnectedParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let days = match p.days.as_deref() {
        None => 7,
        Some(t) => match t.parse::<i64>() {
            Ok(d) if (1..=3650).contains(&d) => d,
            _ => {
                return Err(bad(format!(
                    "days: {t:?} must be a whole number from 1 to 3650"
                )));
            }
        },
    };
    let limit = parse_limit(p.limit.as_deref(), 50, 500)?;
    let since = now_ms() - days * 86_400_000;
    // Statistics over the window (bounded), the page from its newest end.
    let window = st
        .ledger
        .list_sessions(&SessionQuery {
            state: Some(SessionState::Closed),
            since_ms: Some(since),
            limit: 10_000,
            ..SessionQuery::default()
        })
        .await?;
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for s in &window {
        *by_reason
            .entry(s.close_reason.clone().unwrap_or_else(|| "unknown".into()))
            .or_default() += 1;
    }
    let durations: Vec<i64> = window.iter().map(|s| s.duration_ms).collect();
    let stats = json!({
        "count": window.len(),
        "by_reason": by_reason,
        "average_duration_ms": (!durations.is_empty()).then(|| durations.iter().sum::<i64>() as f64 / durations.len() as f64),
        "min_duration_ms": durations.iter().min(),
        "max_duration_ms": durations.iter().max(),
        "truncated": window.len() == 10_000,
    });
    let page: Vec<SessionSummary> = window.into_iter().take(limit).collect();
    let (page, _) = fit_page(with_state(&st, page).await);
    Ok(axum::Json(
        json!({ "days": days, "sessions": page, "stats": stats }),
    ))
}

/// The `p` quantile of sorted values (nearest rank), none when empty.
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
}

/// Calls, errors, error rate and duration percentiles of a group of calls.
fn summarize(calls: &[&CallRow]) -> Value {
    let mut d: Vec<i64> = calls.iter().map(|c| c.call.duration_ms).collect();
    d.sort_unstable();
    let pct = |p: f64| percentile(&d, p);
    let errors = calls.iter().filter(|c| c.call.outcome != "ok").count();
    json!({
        "calls": calls.len(),
        "errors": errors,
        "error_rate": if calls.is_empty() { 0.0 } else { errors as f64 / calls.len() as f64 },
        "p50_ms": pct(0.5),
        "p95_ms": pct(0.95),
    })
}

fn grouped<'a>(rows: &'a [CallRow], key: impl Fn(&CallRow) -> String) -> BTreeMap<String, Value> {
    let mut groups: HashMap<String, Vec<&'a CallRow>> = HashMap::new();
    for r in rows {
        groups.entry(key(r)).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|(k, v)| (k, summarize(&v)))
        .collect()
}

/// Per-minute calls and errors over the last hour, oldest first (for the charts).
fn timeline(rows: &[CallRow]) -> Vec<Value> {
    let now_min = now_ms() / 60_000;
    let mut buckets: Vec<(usize, Vec<i64>)> = vec![(0, Vec::new()); 60];
    for r in rows {
        let age = now_min - r.call.started_ms / 60_000;
        if (0..60).contains(&age) {
            let b = &mut buckets[59 - age as usize];
            b.0 += usize::from(r.call.outcome != "ok");
            b.1.push(r.call.duration_ms);
        }
    }
    buckets
        .into_iter()
        .enumerate()
        .map(|(i, (errors, mut durations))| {
            durations.sort_unstable();
            json!({
                "minute_ms": (now_min - 59 + i as i64) * 60_000,
                "calls": durations.len(),
                "errors": errors,
                "p50_ms": percentile(&durations, 0.50),
                "p95_ms": percentile(&durations, 0.95),
            })
        })
        .collect()
}

const STATS_ROWS: usize = 100_000;

#[derive(Deserialize)]
struct StatsParams {
    since: Option<String>,
}

impl StatsParams {
    /// Window start; the last 24 hours by default.
    fn since_ms(&self) -> Result<i64, ApiError> {
        Ok(self
            .since
            .as_deref()
            .map(parse_since)
            .transpose()?
            .unwrap_or_else(|| now_ms() - 86_400_000))
    }
}

async fn stats(
    State(st): State<AdminState>,
    Query(p): Query<StatsParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let since = p.since_ms()?;
    let rows = st
        .ledger
        .calls_since(since.min(now_ms() - 3_600_000), STATS_ROWS)
        .await?;
    let in_window: Vec<CallRow> = rows
        .iter()
        .filter(|r| r.call.started_ms >= since)
        .cloned()
        .collect();
    let all: Vec<&CallRow> = in_window.iter().collect();
    let totals = st.ledger.totals().await?;
    Ok(axum::Json(json!({
        "since_ms": since,
        "totals": totals,
        "window": summarize(&all),
        "per_client_type": grouped(&in_window, |r| r.client_type.clone()),
        "per_upstream": grouped(&in_window, |r| r.upstream_name.clone()),
        "per_tool": grouped(&in_window, |r| r.call.tool.clone()),
        "per_user": grouped(&in_window, |r| r.user_id.clone()),
        "timeline": timeline(&rows),
        "truncated": rows.len() == STATS_ROWS,
    })))
}

async fn users(State(st): State<AdminState>) -> Result<axum::Json<Value>, ApiError> {
    let mut rows: BTreeMap<String, Value> = BTreeMap::new();
    for u in st.keys.get().users() {
        rows.insert(
            u.id.clone(),
            json!({"id": u.id, "email": u.email, "name": u.name, "sessions": 0, "active": 0, "tool_calls": 0, "errors": 0, "last_active_ms": null}),
        );
    }
    for u in st.ledger.users().await? {
        let mut v = serde_json::to_value(&u).expect("row serializes");
        if let Some(known) = rows.get(&u.id) {
            for k in ["email", "name"] {
                if v[k].is_null() {
                    v[k] = known[k].clone();
                }
            }
        }
        rows.insert(u.id.clone(), v);
    }
    Ok(axum::Json(
        json!({ "users": rows.into_values().collect::<Vec<_>>() }),
    ))
}

/// Stateless (2026-07-28) clients this instance served: they have no session, so they are
/// shown by user and client info, with their requests, and the bridge's pooled upstream
/// sessions (`transport: pooled` in `/api/sessions`) that served them.
/// The tool-call quota and each user's use of its current window, as this instance last
/// counted it (with Redis the count is the deployment's at that user's last call here).
async fn quotas(State(st): State<AdminState>) -> axum::Json<Value> {
    let q = &st.quotas;
    let now = u64::try_from(crate::store::now_ms()).unwrap_or_default();
    axum::Json(json!({
        "quota": q.quota().map(|q| json!({"tool_calls": q.limit, "window_ms": q.window.as_millis() as u64})),
        "users": q.uses(now),
    }))
}

async fn stateless_clients(State(st): State<AdminState>) -> axum::Json<Value> {
    let mut clients: Vec<Value> = Vec::new();
    for r in st.hub.registries() {
        for c in r.stateless_clients() {
            let mut v = serde_json::to_value(&c).unwrap_or_default();
            v["server"] = json!(r.server());
            clients.push(v);
        }
    }
    clients.sort_by_key(|c| std::cmp::Reverse(c["last_seen_ms"].as_i64().unwrap_or_default()));
    axum::Json(json!({ "clients": clients }))
}

async fn user_stats(
    State(st): State<AdminState>,
    Path(id): Path<String>,
    Query(p): Query<StatsParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let since = p.since_ms()?;
    let Some(user) = st.ledger.users().await?.into_iter().find(|u| u.id == id) else {
        if st.keys.get().users().iter().any(|u| u.id == id) {
            return Ok(axum::Json(
                json!({"user": {"id": id}, "window": summarize(&[]), "per_tool": {}}),
            ));
        }
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no user {id}")));
    };
    let rows = st.ledger.calls_since(since, STATS_ROWS).await?;
    let mine: Vec<CallRow> = rows.into_iter().filter(|r| r.user_id == id).collect();
    let all: Vec<&CallRow> = mine.iter().collect();
    Ok(axum::Json(json!({
        "user": user,
        "since_ms": since,
        "window": summarize(&all),
        "per_tool": grouped(&mine, |r| r.call.tool.clone()),
        "per_client_type": grouped(&mine, |r| r.client_type.clone()),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_and_limit_parse() {
        assert_eq!(parse_since("1700000000000").unwrap(), 1_700_000_000_000);
        assert!(parse_since("2026-11-21T10:00:00Z").unwrap() > 1_700_000_000_000);
        assert!(parse_since("1h").unwrap() < now_ms());
        assert!(parse_since("yesterday-ish").is_err());
        // Issue 26: out of range is a 400, not a negative window.
        for bad in [
            "1000000000000h",
            "-5",
            "1969-01-01T00:00:00Z",
            "99999999999999999",
        ] {
            assert!(parse_since(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_limit(None, 50, 500).unwrap(), 50);
        assert_eq!(parse_limit(Some("10"), 50, 500).unwrap(), 10);
        assert!(parse_limit(Some("0"), 50, 500).is_err());
        assert!(parse_limit(Some("501"), 50, 500).is_err());
        assert!(parse_limit(Some("x"), 50, 500).is_err());
    }
}
