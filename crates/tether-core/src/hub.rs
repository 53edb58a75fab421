//! The servers one process serves (issue 17). Each has its own session registry (sessions,
//! upstreams, limits, idle timeout) and its own front door, reached at
//! `/servers/NAME/mcp` (and the 2024-11-05 pair `/servers/NAME/sse`, `.../messages`);
//! `/mcp` at the root serves the only server when there is one, and otherwise answers 404
//! listing the servers (a request naming a session of one of them, held or stored, still
//! reaches it). The map can change while the gateway runs (a reload): a server
//! added starts serving at once; one removed or changed keeps serving the sessions it holds
//! (a *draining generation*: requests naming them still reach it) and takes no new ones;
//! when it holds none it is stopped. Sessions of untouched servers never notice.
//!
//! Must not: know what a request means beyond the server and session it names (the front
//! door decides everything else), or build a registry (`app` does, it knows the config).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::body::Body;
use axum::extract::{OriginalUri, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::front::{self, Prefix, SESSION_HEADER};
use crate::servers::ServerEntry;
use crate::session::Registry;

/// One generation of a served server: a registry and the router in front of it.
pub struct Generation {
    /// What it was built from (`None` for the one upstream of `tether serve -- CMD`).
    pub entry: Option<ServerEntry>,
    /// Its sessions.
    pub registry: Registry,
    router: Router,
    /// Who may use it (its front door reads it on every request; a reload sets it).
    pub access: Arc<crate::front::Access>,
}

impl Generation {
    /// A generation serving `registry` through `router`, to the users `access` allows.
    pub fn new(
        entry: Option<ServerEntry>,
        registry: Registry,
        router: Router,
        access: Arc<crate::front::Access>,
    ) -> Arc<Generation> {
        Arc::new(Generation {
            entry,
            registry,
            router,
            access,
        })
    }
}

/// A server by name: the generation taking new sessions (none once removed) and the
/// older ones still serving sessions they hold.
#[derive(Default, Clone)]
struct Slot {
    current: Option<Arc<Generation>>,
    draining: Vec<Arc<Generation>>,
}

/// What the admin API shows of one server.
pub struct ServerView {
    /// Its name.
    pub name: String,
    /// The generation taking new sessions; `None` when removed (draining only).
    pub current: Option<Arc<Generation>>,
    /// Older generations serving the sessions they hold.
    pub draining: Vec<Arc<Generation>>,
}

/// The served servers, shared by the dispatcher, the admin API and the reload.
#[derive(Clone)]
pub struct Hub {
    servers: Arc<RwLock<BTreeMap<String, Slot>>>,
    /// Requests the dispatcher answers itself (no such server, `/mcp` with several) are
    /// counted here as `class="dispatch"`; the rest by the server's front door.
    metrics: Arc<crate::metrics::Metrics>,
}

impl Hub {
    /// An empty hub counting into `metrics`.
    pub fn new(metrics: Arc<crate::metrics::Metrics>) -> Hub {
        Hub {
            servers: Arc::default(),
            metrics,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Slot>> {
        self.servers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Slot>> {
        self.servers.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `generation` as server `name` from now on; a generation it replaces drains.
    pub fn install(&self, name: &str, generation: Arc<Generation>) -> Option<Arc<Generation>> {
        let mut map = self.write();
        let slot = map.entry(name.to_owned()).or_default();
        let old = slot.current.replace(generation)?;
        old.registry.drain();
        slot.draining.push(old.clone());
        Some(old)
    }

    /// Every generation of `name`: the current one and those draining.
    pub fn generations_of(&self, name: &str) -> Vec<Arc<Generation>> {
        self.read()
            .get(name)
            .map(|s| s.current.iter().chain(&s.draining).cloned().collect())
            .unwrap_or_default()
    }

    /// Stops taking new sessions for `name`; the sessions it holds go on until they end.
    pub fn remove(&self, name: &str) {
        let mut map = self.write();
        if let Some(slot) = map.get_mut(name)
            && let Some(old) = slot.current.take()
        {
            old.registry.drain();
            slot.draining.push(old);
        }
    }

    /// Draining generations that hold no session any more: taken out of the map, for the
    /// caller to stop.
    pub fn take_drained(&self) -> Vec<Arc<Generation>> {
        let mut map = self.write();
        let mut done = Vec::new();
        for slot in map.values_mut() {
            let (empty, busy): (Vec<_>, Vec<_>) = std::mem::take(&mut slot.draining)
                .into_iter()
                .partition(|g| g.registry.held_count() == 0);
            slot.draining = busy;
            done.extend(empty);
        }
        map.retain(|_, s| s.current.is_some() || !s.draining.is_empty());
        done
    }

    /// Every registry, draining ones included (coordination, shutdown, metrics).
    pub fn registries(&self) -> Vec<Registry> {
        self.read()
            .values()
            .flat_map(|s| s.current.iter().chain(&s.draining))
            .map(|g| g.registry.clone())
            .collect()
    }

    /// The servers taking new sessions, by name.
    pub fn current(&self) -> BTreeMap<String, Arc<Generation>> {
        self.read()
            .iter()
            .filter_map(|(n, s)| Some((n.clone(), s.current.clone()?)))
            .collect()
    }

    /// Every server with its generations, for the admin API.
    pub fn view(&self) -> Vec<ServerView> {
        self.read()
            .iter()
            .map(|(n, s)| ServerView {
                name: n.clone(),
                current: s.current.clone(),
                draining: s.draining.clone(),
            })
            .collect()
    }

    /// The registry holding session `id`, wherever it is (admin: evict, details).
    pub fn holder(&self, id: &str) -> Option<Registry> {
        self.registries().into_iter().find(|r| r.holds(id))
    }

    /// The generation a request for server `name` goes to: the one holding the session it
    /// names, else the current one.
    fn pick(&self, name: &str, session: Option<&str>) -> Result<Arc<Generation>, Box<Response>> {
        let map = self.read();
        let Some(slot) = map.get(name) else {
            return Err(Box::new(unknown(&map, name)));
        };
        if let Some(id) = session
            && let Some(g) = slot.draining.iter().find(|g| g.registry.holds(id))
        {
            return Ok(g.clone());
        }
        slot.current.clone().ok_or_else(|| {
            Box::new(front::error_response(
                StatusCode::NOT_FOUND,
                format!(
                    "server {name:?} was removed from this gateway's configuration; it serves only the sessions it still holds ({})",
                    endpoints(&map)
                ),
                Some(listing(&map)),
            ))
        })
    }

    /// The generation a request at the root (`/mcp`, `/sse`, `/messages`) goes to: the one
    /// holding the session it names (with several servers, a client that began at `/mcp`
    /// before a reload added servers), else the only server; else a 404 listing them.
    fn pick_root(&self, session: Option<&str>) -> Result<Arc<Generation>, Box<Response>> {
        let map = self.read();
        let mut all = map
            .values()
            .flat_map(|s| s.current.iter().chain(&s.draining));
        if let Some(id) = session
            && let Some(g) = all.find(|g| g.registry.holds(id))
        {
            return Ok(g.clone());
        }
        let mut current = map.values().filter_map(|s| s.current.as_ref());
        if let (Some(only), None) = (current.next(), current.next()) {
            return Ok(only.clone());
        }
        Err(Box::new(front::error_response(
            StatusCode::NOT_FOUND,
            format!(
                "this gateway serves several MCP servers, each at its own endpoint: {}",
                endpoints(&map)
            ),
            Some(listing(&map)),
        )))
    }

    /// The server a stored session belongs to, for a request at `/mcp` with several servers
    /// naming a session no generation holds: one begun at `/mcp` when there was one server,
    /// before a reload (or a restart) brought more.
    async fn owner_of(&self, session: Option<&str>) -> Option<Arc<Generation>> {
        let id = session?;
        let store = self.registries().first()?.store().clone();
        let record = store.load_session(id).await.ok()??;
        self.current().get(&record.upstream_name).cloned()
    }

    /// The MCP listener's router: every request is dispatched to its server's front door.
    pub fn router(&self) -> Router {
        let hub = self.clone();
        Router::new().fallback(move |req: Request| {
            let hub = hub.clone();
            async move { hub.dispatch(req).await }
        })
    }

    async fn dispatch(&self, req: Request) -> Response {
        match self.route(req).await {
            Ok(resp) => resp,
            Err(resp) => {
                self.metrics.request("dispatch", resp.status().as_u16());
                resp
            }
        }
    }

    /// The server's answer (`Ok`), or the dispatcher's own (`Err`).
    async fn route(&self, mut req: Request) -> Result<Response, Response> {
        let path = req.uri().path().to_owned();
        let session = session_of(&req);
        let (generation, prefix, rest) = if let Some(tail) = path.strip_prefix("/servers/") {
            let (name, rest) = tail.split_once('/').unwrap_or((tail, ""));
            if !matches!(rest, "mcp" | "sse" | "messages") {
                return Err(StatusCode::NOT_FOUND.into_response());
            }
            match self.pick(name, session.as_deref()) {
                Ok(g) => (g, format!("/servers/{name}"), format!("/{rest}")),
                Err(resp) => return Err(*resp),
            }
        } else if matches!(path.as_str(), "/mcp" | "/sse" | "/messages") {
            match self.pick_root(session.as_deref()) {
                Ok(g) => (g, String::new(), path.clone()),
                Err(resp) => match self.owner_of(session.as_deref()).await {
                    Some(g) => (g, String::new(), path.clone()),
                    None => return Err(*resp),
                },
            }
        } else {
            return Err(StatusCode::NOT_FOUND.into_response());
        };
        // The server's front door sees its own paths; forwarding to another instance and
        // the `/sse` endpoint event use the original path and the prefix.
        let original = req.uri().clone();
        let inner = match original.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest,
        };
        match inner.parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => return Err(StatusCode::BAD_REQUEST.into_response()),
        }
        req.extensions_mut().insert(OriginalUri(original));
        req.extensions_mut().insert(Prefix(prefix.into()));
        match generation.router.clone().oneshot(req.map(Body::new)).await {
            Ok(resp) => Ok(resp),
            Err(never) => match never {},
        }
    }
}

/// The session a request names: its `Mcp-Session-Id`, or the 2024-11-05 `sessionId`.
fn session_of(req: &Request) -> Option<String> {
    if let Some(v) = req.headers().get(SESSION_HEADER) {
        return v.to_str().ok().map(str::to_owned);
    }
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("sessionId="))
        .map(str::to_owned)
}

/// A 404 for a server name the gateway does not have.
fn unknown(map: &BTreeMap<String, Slot>, name: &str) -> Response {
    front::error_response(
        StatusCode::NOT_FOUND,
        format!(
            "this gateway has no server named {:?}; it serves {}",
            crate::log_limit::cut(name, 64),
            endpoints(map)
        ),
        Some(listing(map)),
    )
}

fn endpoints(map: &BTreeMap<String, Slot>) -> String {
    let names: Vec<String> = map
        .iter()
        .filter(|(_, s)| s.current.is_some())
        .map(|(n, _)| format!("/servers/{n}/mcp"))
        .collect();
    if names.is_empty() {
        "no server now".to_owned()
    } else {
        names.join(", ")
    }
}

fn listing(map: &BTreeMap<String, Slot>) -> Value {
    let servers: Vec<Value> = map
        .iter()
        .filter(|(_, s)| s.current.is_some())
        .map(|(n, _)| json!({"name": n, "endpoint": format!("/servers/{n}/mcp")}))
        .collect();
    json!({ "servers": servers })
}
