//! The admin API's reads and its one write: sessions (list, show, evict), disconnections,
//! call statistics, users, quotas and stateless clients, paged and bounded.
//!
//! Must not: return an unbounded page, or evict without the token.

use super::*;

/// Parses `since`: RFC 3339, milliseconds since the epoch, or a duration ago (`1h`); a time
/// before the epoch or after now is out of range (400), not a negative or future window.
pub(super) fn parse_since(text: &str) -> Result<i64, ApiError> {
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
pub(super) const MAX_OFFSET: usize = 1_000_000_000;

/// Bytes of rows one page holds at most, whatever its row limit: rows are bounded (client
/// strings are cut), but a page must stay small even of rows an older version wrote.
pub(super) const PAGE_BYTES: usize = 1 << 20;

/// The first rows of `rows` that fit in [`PAGE_BYTES`] (at least one), and whether some
/// were left for the next page.
pub(super) fn fit_page(rows: Vec<Value>) -> (Vec<Value>, bool) {
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

pub(super) fn parse_limit(
    limit: Option<&str>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
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
pub(super) struct ListParams {
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
pub(super) async fn with_state(st: &AdminState, sessions: Vec<SessionSummary>) -> Vec<Value> {
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

pub(super) async fn list_sessions(
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

pub(super) async fn show_session(
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

pub(super) async fn evict_session(
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
pub(super) struct DisconnectedParams {
    days: Option<String>,
    limit: Option<String>,
}

pub(super) async fn disconnected(
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
pub(super) fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
}

/// Calls, errors, error rate and duration percentiles of a group of calls.
pub(super) fn summarize(calls: &[&CallRow]) -> Value {
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

pub(super) fn grouped<'a>(
    rows: &'a [CallRow],
    key: impl Fn(&CallRow) -> String,
) -> BTreeMap<String, Value> {
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
pub(super) fn timeline(rows: &[CallRow]) -> Vec<Value> {
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

pub(super) const STATS_ROWS: usize = 100_000;

#[derive(Deserialize)]
pub(super) struct StatsParams {
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

pub(super) async fn stats(
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

pub(super) async fn users(State(st): State<AdminState>) -> Result<axum::Json<Value>, ApiError> {
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

/// The tool-call quota and each user's use of its current window, as this instance last
/// counted it (with Redis the count is the deployment's at that user's last call here).
pub(super) async fn quotas(State(st): State<AdminState>) -> axum::Json<Value> {
    let q = &st.quotas;
    let now = u64::try_from(crate::store::now_ms()).unwrap_or_default();
    axum::Json(json!({
        "quota": q.quota().map(|q| json!({"tool_calls": q.limit, "window_ms": q.window.as_millis() as u64})),
        "users": q.uses(now),
    }))
}

/// Query of `GET /api/tasks`.
#[derive(Deserialize)]
pub(super) struct TaskParams {
    user: Option<String>,
    status: Option<String>,
    server: Option<String>,
    limit: Option<usize>,
}

/// Tasks at most `GET /api/tasks` reads (newest first; the filters apply to these).
const MAX_TASK_ROWS: usize = 1000;

/// Durable tasks (issue 28), newest first, of every user: what each runs, who started it,
/// where it stands, which instance runs it, and whether a restart re-issues it. Their
/// answers are not shown (they are the users' data, up to 1 MiB each).
pub(super) async fn tasks(
    State(st): State<AdminState>,
    Query(p): Query<TaskParams>,
) -> Result<axum::Json<Value>, ApiError> {
    let limit = p.limit.unwrap_or(100).clamp(1, MAX_TASK_ROWS);
    let now = crate::store::now_ms();
    let rows: Vec<Value> = st
        .store
        .recent_tasks(MAX_TASK_ROWS)
        .await?
        .into_iter()
        .filter(|t| !t.expired(now))
        .filter(|t| p.user.as_ref().is_none_or(|u| &t.principal == u))
        .filter(|t| p.status.as_ref().is_none_or(|s| t.status.as_str() == s))
        .filter(|t| p.server.as_ref().is_none_or(|s| &t.server == s))
        .take(limit)
        .map(|t| {
            json!({
                "id": t.id,
                "user_id": t.principal,
                "server": t.server,
                "tool": t.tool,
                "era": match t.era {
                    crate::tasks::Era::Legacy => "2025-11-25",
                    crate::tasks::Era::Modern => "2026-07-28",
                },
                "status": t.status.as_str(),
                "status_message": t.status_message,
                "created_ms": t.created_ms,
                "updated_ms": t.updated_ms,
                "expires_ms": t.expires_ms(),
                "owner": t.owner,
                "input_requests": t.input_keys().len(),
                "repeatable": t.request.is_some(),
                "error_code": match &t.outcome {
                    Some(crate::tasks::Outcome::Error(e)) => e.get("code").cloned(),
                    _ => None,
                },
            })
        })
        .collect();
    Ok(axum::Json(json!({ "tasks": rows })))
}

/// Stateless (2026-07-28) clients this instance served: they have no session, so they are
/// shown by user and client info, with their requests, and the pooled upstream
/// sessions (`transport: pooled` in `/api/sessions`) that served them.
pub(super) async fn stateless_clients(State(st): State<AdminState>) -> axum::Json<Value> {
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

pub(super) async fn user_stats(
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
