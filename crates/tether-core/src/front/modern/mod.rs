//! The modern era (2026-07-28) on `/mcp`: stateless requests checked against every rule
//! ([`crate::modern::check`]), `server/discover` answered by the gateway, and every other
//! request relayed to a pooled legacy upstream session ([`Registry::pooled`]).
//!
//! A call's answer is one JSON body when nothing comes before it; a notification the
//! client opted into (progress, log messages at its `logLevel`) or a long wait (the
//! keepalive interval) turns the response into an SSE stream with keepalive comments.
//! When the upstream asks the client something (sampling, elicitation, roots), the call is
//! answered with an `InputRequiredResult` and parked ([`ParkedCalls`], `parked.rs`) under a sealed
//! `requestState`; the client's retry with `inputResponses` delivers the answers to the
//! waiting upstream request and the same call continues. Closing a response stream
//! cancels its call upstream ([`Call`]'s drop).
//!
//! Must not: answer a retry whose call another instance holds (it is forwarded there,
//! once), or keep a call running upstream after its client closed the stream.

mod parked;
mod tasks;

use super::*;
use crate::modern::{self as rules, Meta, StateClaims, StateKey};
use crate::session::FrameRx;
use crate::store::now_ms;
use parked::{Call, ask_key, askable, park};
pub use parked::{MAX_PARKED, ParkedCalls};

/// How long input requests that follow a first one are gathered into the same
/// `InputRequiredResult`.
const GATHER: Duration = Duration::from_millis(20);

/// What the modern front needs besides the legacy one.
#[derive(Debug, Clone)]
pub struct ModernConfig {
    /// Seals `requestState`.
    pub state_key: StateKey,
    /// This gateway instance (a state names the instance that parked its call).
    pub instance: String,
    /// How long a `requestState` is valid (the upstream timeout: the call fails then
    /// anyway).
    pub state_ttl: Duration,
}

/// What one frame of a pooled call's stream is.
enum Event {
    /// The final answer.
    Answer(Value),
    /// A request of the upstream to the client.
    Ask(Value),
    /// A notification.
    Note(Value),
}

fn event_of(data: &str) -> Option<Event> {
    let v: Value = serde_json::from_str(data).ok()?;
    let has_method = v.get("method").is_some();
    let has_id = v.get("id").is_some_and(|i| !i.is_null());
    Some(match (has_method, has_id) {
        (true, true) => Event::Ask(v),
        (true, false) => Event::Note(v),
        _ => Event::Answer(v),
    })
}

fn refusal(r: rules::Refusal, id: Option<&Value>) -> FrontError {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut e = FrontError::new(status, r.code, r.message).with_id(id);
    e.data = r.data;
    e
}

fn json_status(status: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    (status, axum::Json(body)).into_response()
}

/// A modern POST (the era was decided by [`policy::classify_post`]).
pub(super) async fn post(
    st: &AppState,
    principal: &Principal,
    client: Option<std::net::IpAddr>,
    original: Original<'_>,
    env: Message,
) -> Result<Response, FrontError> {
    let headers = original.headers;
    if env.kind() == Kind::Notification {
        // Nothing to forward: a stateless client cancels by closing the stream, and the
        // lifecycle notifications are gone.
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    let h = rules::Headers {
        version: header_str(headers, VERSION_HEADER),
        method: header_str(headers, "mcp-method"),
        name: header_str(headers, "mcp-name"),
    };
    let meta = rules::check(&env, h).map_err(|r| refusal(r, env.id()))?;
    let id = env.id().cloned().unwrap_or(Value::Null);
    let method = env.method_name().unwrap_or_default().to_owned();
    let parked = &st.parked;
    st.registry.metrics().mcp_request("modern", &method);
    st.registry
        .note_stateless(principal, meta.client_info.as_ref(), &method);
    if method == "server/discover" {
        let init = match st.registry.upstream_init() {
            Some(i) => Some(i),
            None => {
                // No upstream started yet: start the member this client would use anyway.
                pooled(st, principal, &meta, client, &id).await?;
                st.registry.upstream_init()
            }
        };
        let mut body = json!({"jsonrpc": "2.0", "result": rules::discover(init.as_ref(), 0)});
        body["id"] = id;
        return Ok(axum::Json(body).into_response());
    }
    if method.starts_with("tasks/") {
        // The extension's methods are gated on it (SEP-2575's missing capability).
        if !meta.declares_extension(rules::TASKS_EXTENSION) {
            let v = rules::missing_extension(id, rules::TASKS_EXTENSION);
            return Ok(json_status(rules::status_of(&v), &v));
        }
        return Ok(tasks::request(st, principal, &original, &env, id).await);
    }
    if method == "subscriptions/listen" {
        let mut filter = rules::Filter::of(&env);
        if !filter.task_ids.is_empty() && !meta.declares_extension(rules::TASKS_EXTENSION) {
            let v = rules::missing_extension(id, rules::TASKS_EXTENSION);
            return Ok(json_status(rules::status_of(&v), &v));
        }
        let rx = st
            .registry
            .listen(principal)
            .map_err(|e| FrontError::from(e).with_id(Some(&id)))?;
        if !filter.uris.is_empty() {
            let session = pooled(st, principal, &meta, client, &id).await?;
            let mut honoured = Vec::with_capacity(filter.uris.len());
            for uri in std::mem::take(&mut filter.uris) {
                match subscribe(&session, &uri).await {
                    Subscribed::Yes => honoured.push(uri),
                    Subscribed::No => {}
                    // Over a bound the client is told, not quietly given less.
                    Subscribed::Refused(mut v) => {
                        protocol::set_id(&mut v, id);
                        return Ok(json_status(rules::status_of(&v), &v));
                    }
                }
            }
            filter.uris = honoured;
        }
        return Ok(listen(st, rx, filter, id));
    }
    let name = rules::request_name(&env);
    let progress_token = env.progress_token();
    let mut value = env.to_value();
    let retry = rules::to_legacy(&mut value).map_err(|r| refusal(r, Some(&id)))?;
    let wants_task = method == "tools/call" && meta.declares_extension(rules::TASKS_EXTENSION);
    let call_params = if wants_task {
        value.get("params").cloned()
    } else {
        None
    };
    let call = match retry.state {
        Some(state) => {
            let claims = parked
                .cfg
                .state_key
                .open(&state, &principal.id, &method, name.as_deref(), now_ms())
                .map_err(|e| {
                    FrontError::new(StatusCode::BAD_REQUEST, code::INVALID_PARAMS, e.to_string())
                        .with_id(Some(&id))
                })?;
            if claims.i != parked.cfg.instance
                && let Some(resp) = to_holder(st, &claims.i, &original).await
            {
                return Ok(resp);
            }
            let Some(mut call) = (claims.i == parked.cfg.instance)
                .then(|| parked.take(&claims))
                .flatten()
            else {
                let f = Failure::interrupted(format!(
                    "the call this requestState continues is no longer held (the gateway instance {} that held it stopped or restarted, or the call was already continued or expired); send the request again without requestState",
                    claims.i
                ));
                return Ok(axum::Json(f.response(id)).into_response());
            };
            if progress_token.is_some() {
                // The retry is a request of its own: its progress goes under its token.
                call.progress_token = progress_token;
            }
            let mut missing = Vec::new();
            for (k, request) in std::mem::take(&mut call.asked) {
                match retry.responses.get(&k) {
                    Some(result) => {
                        let answer = json!({"jsonrpc": "2.0", "id": k, "result": result});
                        if let Ok(env) = Message::from_value(answer) {
                            call.session.respond(env).await;
                        }
                    }
                    None => missing.push((k, request)),
                }
            }
            if !missing.is_empty() {
                // The spec's advice: ask again for what is still missing.
                call.asked = missing;
                let v = park(st, call, &principal.id, &method, name.as_deref(), id);
                return Ok(json_status(rules::status_of(&v), &v));
            }
            call
        }
        None => {
            let session = pooled(st, principal, &meta, client, &id).await?;
            if method == "tools/call" {
                session.learn_tools().await;
            }
            if let Some(tool) = name.as_deref().filter(|_| method == "tools/call")
                && !wants_task
                && session.task_support(tool).as_deref() == Some("required")
            {
                let v = rules::missing_tasks_extension(id, tool);
                return Ok(json_status(rules::status_of(&v), &v));
            }
            let env = Message::from_value(value).map_err(|e| {
                FrontError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()).with_id(Some(&id))
            })?;
            match session.request(env).await {
                Reply::Stream(handle) => {
                    let Some(rx) = handle.live else {
                        return Err(FrontError::new(
                            StatusCode::BAD_GATEWAY,
                            code::INTERNAL_ERROR,
                            "the call ended without an answer",
                        )
                        .with_id(Some(&id)));
                    };
                    Call {
                        session,
                        stream: handle.stream_id,
                        rx,
                        asked: Vec::new(),
                        progress_token,
                        done: false,
                    }
                }
                Reply::Immediate(mut v) => {
                    protocol::set_id(&mut v, id);
                    rules::complete(&method, &mut v);
                    return Ok(json_status(rules::status_of(&v), &v));
                }
                Reply::Accepted => return Ok(StatusCode::ACCEPTED.into_response()),
            }
        }
    };
    let plan = match (&name, wants_task) {
        (Some(tool), true) => Some(TaskPlan {
            at: tokio::time::Instant::now() + call.session.task_after(tool),
            tool: tool.clone(),
            params: call_params,
            client: json!({"capabilities": meta.capabilities, "clientInfo": meta.client_info}),
        }),
        _ => None,
    };
    Ok(answer(st, call, principal.id.clone(), meta, method, name, id, plan).await)
}

/// A call that becomes a task if it is not answered by `at` (its client declared the
/// Tasks extension): what the task's record keeps.
struct TaskPlan {
    at: tokio::time::Instant,
    tool: String,
    /// The call's params (kept by the record only if the tool is safe to repeat).
    params: Option<Value>,
    /// The client's `capabilities` and `clientInfo`: what a re-issue starts its upstream
    /// session with.
    client: Value,
}

/// Makes a call that outlived its plan's time a task: the `CreateTaskResult` answering
/// request `id` once the task's record is durable; `None` (the call stays a plain call,
/// still in `call`) when a task bound is reached or the store refuses the record.
async fn become_task(call: &mut Option<Call>, plan: &TaskPlan, id: &Value) -> Option<Value> {
    let session = call.as_ref()?.session.clone();
    if let Err(over) = session.may_start_task().await {
        tracing::debug!(reason = %over.message(), "a call that could be a task stays a plain call");
        return None;
    }
    let c = call.take()?;
    let progress_token = c.progress_token.clone();
    let (session, stream, frames) = c.hand_over();
    match session
        .begin_task(
            &plan.tool,
            plan.params.clone(),
            plan.client.clone(),
            stream.clone(),
            frames,
        )
        .await
    {
        Ok(created) => Some(json!({"jsonrpc": "2.0", "id": id, "result": created})),
        Err((failure, frames)) => {
            tracing::warn!(error = %failure.message(), "a task's record could not be stored; the call goes on as a plain call");
            *call = Some(Call {
                session,
                stream,
                rx: frames,
                asked: Vec::new(),
                progress_token,
                done: false,
            });
            None
        }
    }
}

/// A `subscriptions/listen` stream: the acknowledgement first, then the list-changed
/// notifications of this user's pooled upstreams that its filter asks for, each tagged with
/// the subscription (the request's id), with keepalive comments, until the client closes it
/// or the gateway stops. Nothing is stored: a client that reconnects listens again.
fn listen(
    st: &AppState,
    mut rx: tokio::sync::broadcast::Receiver<Arc<Value>>,
    filter: rules::Filter,
    id: Value,
) -> Response {
    let stop = st.registry.stopping();
    let keepalive = st.cfg.keepalive;
    let body = async_stream::stream! {
        let ack = filter.acknowledged(&id);
        yield sse::data(&ack.to_string());
        loop {
            let next = tokio::select! {
                n = rx.recv() => n,
                () = stop.cancelled() => break,
            };
            match next {
                Ok(n) if filter.admits(&n) => yield sse::data(&rules::tagged(&n, &id).to_string()),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    };
    sse::response(sse::with_keepalive(body, keepalive, sse::MODERN_KEEPALIVE))
}

/// The pooled upstream session that serves this client (its principal, application and
/// capabilities), started if none is; a refusal is the answer to request `id`.
async fn pooled(
    st: &AppState,
    principal: &Principal,
    meta: &Meta,
    client: Option<std::net::IpAddr>,
    id: &Value,
) -> Result<Arc<Session>, FrontError> {
    st.registry
        .pooled(
            principal,
            meta.capabilities_key(),
            &meta.init_params(),
            client,
        )
        .await
        .map_err(|e| FrontError::from(e).with_id(Some(id)))
}

/// Subscribes the pooled upstream session to `uri` for a listen stream (a legacy server
/// sends `notifications/resources/updated` only for what it was subscribed to); true when
/// the upstream agreed. The subscription is part of the session's restore state, so an
/// upstream restart keeps it; it ends with the pooled session (idle expiry), not with the
/// stream: another client of the same pool may listen to the same resource, and an extra
/// update is dropped by every filter that did not ask for it.
async fn subscribe(session: &Arc<Session>, uri: &str) -> Subscribed {
    let id = Value::from(format!("tether-subscribe-{}", crate::ids::random_hex(8)));
    let request = protocol::request(id, "resources/subscribe", Some(json!({ "uri": uri })));
    let Ok(env) = Message::from_value(request) else {
        return Subscribed::No;
    };
    let answer = match session.request(env).await {
        Reply::Immediate(v) if v.pointer("/error/code") == Some(&json!(code::LIMIT_REACHED)) => {
            return Subscribed::Refused(v);
        }
        Reply::Immediate(v) => Some(v),
        Reply::Accepted => None,
        Reply::Stream(handle) => match handle.live {
            Some(mut rx) => {
                let mut last = None;
                while let Some(frame) = rx.recv().await {
                    if frame.terminal {
                        last = serde_json::from_str::<Value>(&frame.data).ok();
                        break;
                    }
                }
                last
            }
            None => None,
        },
    };
    let ok = answer.as_ref().is_some_and(|a| a.get("result").is_some());
    if !ok {
        tracing::info!(uri = %crate::log_limit::cut(uri, 200), "the upstream did not subscribe to a resource a listen stream asked for; left out of the acknowledgement");
    }
    if ok { Subscribed::Yes } else { Subscribed::No }
}

/// What became of a resource a listen stream asked for.
enum Subscribed {
    /// The upstream holds it.
    Yes,
    /// The upstream did not agree (left out of the acknowledgement).
    No,
    /// A bound of the gateway refused it: the listen request gets this error.
    Refused(Value),
}

/// Sends a retry whose call another live instance of the deployment holds to that
/// instance (once: a forwarded request is never forwarded again), and returns its answer;
/// `None` when that instance is gone (its calls died with it).
async fn to_holder(st: &AppState, instance: &str, original: &Original<'_>) -> Option<Response> {
    if original.headers.contains_key(FORWARDED_HEADER) {
        return None;
    }
    let coordinator = st.registry.coordinator()?;
    let instances = coordinator.instances().await.ok()?;
    let holder = instances.iter().find(|i| i.id == instance)?;
    match forward(st, &holder.url, original).await {
        Ok(resp) => {
            st.registry.metrics().forwarded.inc();
            Some(resp)
        }
        Err(e) => {
            tracing::info!(owner = %instance, error = %e, "the instance holding a parked call does not answer");
            None
        }
    }
}

/// What to do with one event of a pooled call, in either rendering.
enum Step {
    /// Not for this client (a log it did not opt into, a notification unrelated to it, a
    /// request the gateway answered itself); read on.
    Skip,
    /// Send this notification and read on.
    Send(Value),
    /// Send this message and end: the answer, an `InputRequiredResult` (the call is
    /// parked), or an error.
    End(Value),
}

/// Decides what a frame means for the client. Asks are gathered with any others already
/// queued (parallel input requests go out together), checked against the client's
/// declared capabilities, and the call is parked.
#[allow(clippy::too_many_arguments)]
async fn step(
    st: &AppState,
    call: &mut Option<Call>,
    event: Event,
    meta: &Meta,
    principal: &str,
    method: &str,
    name: Option<&str>,
    id: &Value,
) -> Step {
    match event {
        Event::Answer(mut v) => {
            if let Some(c) = call.as_mut() {
                c.done = true;
            }
            protocol::set_id(&mut v, id.clone());
            rules::complete(method, &mut v);
            Step::End(v)
        }
        Event::Note(mut v) => match v.get("method").and_then(Value::as_str) {
            Some("notifications/progress") => {
                match call.as_ref().and_then(|c| c.progress_token.clone()) {
                    Some(token) => {
                        v["params"]["progressToken"] = token;
                        Step::Send(v)
                    }
                    None => Step::Skip,
                }
            }
            Some("notifications/message") if rules::admits_log(meta.log_level, &v) => Step::Send(v),
            _ => Step::Skip,
        },
        Event::Ask(v) => {
            let Some(c) = call.as_mut() else {
                return Step::Skip;
            };
            let ask_id = v.get("id").cloned().unwrap_or(Value::Null);
            let ask_method = v.get("method").and_then(Value::as_str).unwrap_or_default();
            let reply = |result: Result<Value, Value>| {
                let mut r = match result {
                    Ok(res) => json!({"jsonrpc": "2.0", "result": res}),
                    Err(err) => json!({"jsonrpc": "2.0", "error": err}),
                };
                r["id"] = ask_id.clone();
                Message::from_value(r).ok()
            };
            match rules::required_capability(ask_method) {
                _ if ask_method == "ping" => {
                    if let Some(env) = reply(Ok(json!({}))) {
                        c.session.respond(env).await;
                    }
                    Step::Skip
                }
                None => {
                    let err = json!({"code": code::METHOD_NOT_FOUND, "message": format!("{ask_method} cannot reach a 2026-07-28 client")});
                    if let Some(env) = reply(Err(err)) {
                        c.session.respond(env).await;
                    }
                    Step::Skip
                }
                Some(cap) if !meta.declares(cap) => {
                    let err = json!({"code": code::METHOD_NOT_FOUND, "message": format!("the client did not declare the {cap} capability")});
                    if let Some(env) = reply(Err(err)) {
                        c.session.respond(env).await;
                    }
                    // The call cannot go on without it: it is cancelled upstream (drop).
                    *call = None;
                    Step::End(rules::missing_capability(id.clone(), cap))
                }
                Some(_) => {
                    c.asked.push((ask_key(&v), v));
                    // Requests the upstream sent together go out together: those that
                    // follow within a moment (a server awaiting several at once sends them
                    // back to back) join this one.
                    loop {
                        let next = tokio::select! {
                            f = c.rx.recv() => f,
                            () = tokio::time::sleep(GATHER) => None,
                        };
                        let Some(f) = next else { break };
                        match event_of(&f.data) {
                            Some(Event::Ask(more)) if askable(&more, meta) => {
                                c.asked.push((ask_key(&more), more));
                            }
                            _ => {
                                c.rx.hold(f);
                                break;
                            }
                        }
                    }
                    match call.take() {
                        Some(c) => Step::End(park(st, c, principal, method, name, id.clone())),
                        None => Step::Skip,
                    }
                }
            }
        }
    }
}

/// Renders a pooled call: one JSON body if its answer (or an input request) comes before
/// anything the client should see, else an SSE stream.
#[allow(clippy::too_many_arguments)]
async fn answer(
    st: &AppState,
    call: Call,
    principal: String,
    meta: Meta,
    method: String,
    name: Option<String>,
    id: Value,
    mut plan: Option<TaskPlan>,
) -> Response {
    let keepalive = st.cfg.keepalive;
    let mut call = Some(call);
    // Wait for the first thing the client should see, up to one keepalive interval (or
    // until the call becomes a task).
    let deadline = tokio::time::Instant::now() + keepalive;
    let first = loop {
        let task_at = plan.as_ref().map(|p| p.at);
        // A call due to become a task does so before any frame is read, even one already
        // queued: a tool that asks at once asks its task's client (what a listed tool's
        // client expects), not an MRTR round decided by which of two ready branches was
        // polled first (a timer past its deadline need not be ready on its first poll).
        if task_at.is_some_and(|at| at <= tokio::time::Instant::now())
            && let Some(p) = plan.take()
        {
            if let Some(created) = become_task(&mut call, &p, &id).await {
                return json_status(200, &created);
            }
            continue;
        }
        let Some(c) = call.as_mut() else {
            break None;
        };
        let frame = tokio::select! {
            biased;
            () = tokio::time::sleep_until(task_at.unwrap_or(deadline).min(deadline)) => {
                if task_at.is_some_and(|at| at <= deadline)
                    && let Some(p) = plan.take()
                {
                    if let Some(created) = become_task(&mut call, &p, &id).await {
                        return json_status(200, &created);
                    }
                    continue;
                }
                break None;
            }
            f = c.rx.recv() => f,
        };
        let Some(frame) = frame else {
            let lost = Failure::upstream_lost("the call ended without an answer", true);
            return axum::Json(lost.response(id)).into_response();
        };
        let Some(event) = event_of(&frame.data) else {
            continue;
        };
        match step(
            st,
            &mut call,
            event,
            &meta,
            &principal,
            &method,
            name.as_deref(),
            &id,
        )
        .await
        {
            Step::Skip => {}
            Step::End(v) => return json_status(rules::status_of(&v), &v),
            Step::Send(v) => break Some(v),
        }
    };
    let st = st.clone();
    let body = async_stream::stream! {
        let mut call = call;
        if let Some(v) = first {
            yield sse::data(&v.to_string());
        }
        while let Some(c) = call.as_mut() {
            let frame = match plan.as_ref().map(|p| p.at) {
                Some(at) => tokio::select! {
                    biased;
                    () = tokio::time::sleep_until(at) => {
                        if let Some(p) = plan.take()
                            && let Some(created) = become_task(&mut call, &p, &id).await
                        {
                            yield sse::data(&created.to_string());
                            break;
                        }
                        continue;
                    }
                    f = c.rx.recv() => f,
                },
                None => c.rx.recv().await,
            };
            let Some(frame) = frame else { break };
            let Some(event) = event_of(&frame.data) else { continue };
            match step(&st, &mut call, event, &meta, &principal, &method, name.as_deref(), &id).await {
                Step::Skip => {}
                Step::Send(v) => yield sse::data(&v.to_string()),
                Step::End(v) => {
                    yield sse::data(&v.to_string());
                    break;
                }
            }
        }
    };
    sse::response(sse::with_keepalive(body, keepalive, sse::MODERN_KEEPALIVE))
}
