//! Health, readiness, the deep check, the servers list and Prometheus metrics: what the
//! probes and dashboards read. Readiness tells what requests will meet now.
//!
//! Must not: report ready when a request would be refused for the reason it checks.

use super::*;

pub(super) async fn health(State(st): State<AdminState>) -> Result<axum::Json<Value>, ApiError> {
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
pub(super) fn circuit_check(registry: &Registry) -> Result<(), String> {
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
pub(super) struct ReadyParams {
    server: Option<String>,
}

/// Ready when the store takes a write and every server (or the one `?server=` names) can
/// start its upstream with its circuit closed; each server's checks are listed.
pub(super) async fn ready(State(st): State<AdminState>, Query(p): Query<ReadyParams>) -> Response {
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
pub(super) fn server_json(
    name: &str,
    g: &crate::hub::Generation,
    state: &str,
    endpoint: bool,
) -> Value {
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
pub(super) async fn servers(State(st): State<AdminState>) -> axum::Json<Value> {
    axum::Json(json!({ "servers": servers_json(&st.hub) }))
}

pub(super) fn servers_json(hub: &Hub) -> Vec<Value> {
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

pub(super) async fn deep(State(st): State<AdminState>) -> Result<axum::Json<Value>, ApiError> {
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

pub(super) async fn metrics(State(st): State<AdminState>) -> Response {
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
