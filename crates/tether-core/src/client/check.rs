//! `tether check URL`: the connection test users run when a client shows "Disconnected".
//!
//! Runs `initialize`, lists tools, resources and prompts, pings, and probes whether the
//! endpoint validates `Origin` and answers 404 for an unknown session; reports the protocol
//! version, server, capabilities and latency per step, and a diagnosis when something is
//! wrong (refused, TLS, 401, wrong path, not MCP).
//!
//! Must not: change anything on the server beyond one session it closes again.

use std::time::{Duration, Instant};

use crate::upstream::sse::{self, SseItem};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde::Serialize;
use serde_json::{Value, json};

use crate::protocol;

/// Largest answer (JSON body or SSE event) read from the endpoint under check.
const MAX_ANSWER: usize = 16 << 20;

/// One step of the check.
#[derive(Debug, Serialize)]
pub struct Step {
    /// What was tried.
    pub name: String,
    /// `ok`, `failed`, `warning` or `skipped`.
    pub status: &'static str,
    /// Time taken.
    pub ms: u64,
    /// What happened.
    pub detail: String,
}

/// The outcome of a check.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The checked URL.
    pub url: String,
    /// Protocol version the server negotiated.
    pub protocol_version: Option<String>,
    /// `serverInfo` from the initialize result.
    pub server: Option<Value>,
    /// Server capabilities.
    pub capabilities: Option<Value>,
    /// Whether a foreign `Origin` was refused (DNS-rebinding protection).
    pub validates_origin: Option<bool>,
    /// Whether an unknown session id gets 404 (so compliant clients can recover).
    pub unknown_session_404: Option<bool>,
    /// Whether the endpoint also speaks 2026-07-28 (`server/discover` lists it); `None`
    /// when its answer said neither.
    pub speaks_2026_07_28: Option<bool>,
    /// Every step, in order.
    pub steps: Vec<Step>,
    /// What is wrong and what to do, if anything is.
    pub diagnosis: Option<String>,
    /// Whether the endpoint works as an MCP server.
    pub ok: bool,
}

struct Probe {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    timeout: Duration,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    message: Option<Value>,
    raw: String,
}

fn describe(e: &reqwest::Error, url: &str) -> String {
    crate::upstream::http::explain_error(e, url).0
}

impl Probe {
    /// What answers at the URL when it is not a Streamable HTTP endpoint: a 2024-11-05
    /// HTTP+SSE endpoint (its GET stream names a POST endpoint), or a Tether admin
    /// listener (its `/health` says so; `/health/deep` names the MCP address).
    async fn identify(&self) -> Option<String> {
        let get = |url: String, accept: &'static str| {
            self.client
                .get(url)
                .headers(self.headers.clone())
                .header("accept", accept)
                .timeout(self.timeout)
                .send()
        };
        if let Ok(resp) = get(self.url.clone(), "text/event-stream").await {
            let sse = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.starts_with("text/event-stream"));
            if resp.status().is_success() && sse {
                let mut events = sse::events(resp, MAX_ANSWER);
                if let Ok(Some(Ok(SseItem::Event(ev)))) =
                    tokio::time::timeout(self.timeout, events.next()).await
                    && ev.event == "endpoint"
                {
                    return Some(format!(
                        "this is a 2024-11-05 HTTP+SSE endpoint (its stream posts to {}), not Streamable HTTP: \
                             clients of the current spec need the server's Streamable HTTP endpoint (usually /mcp); \
                             `tether connect` speaks this transport too",
                        ev.data.trim()
                    ));
                }
            }
        }
        let base = reqwest::Url::parse(&self.url).ok()?;
        let health: Value = get(base.join("/health").ok()?.to_string(), "application/json")
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let is_tether_admin =
            health.get("live_sessions").is_some() && health.get("version").is_some();
        if !is_tether_admin {
            return None;
        }
        let deep: Option<Value> = match get(
            base.join("/health/deep").ok()?.to_string(),
            "application/json",
        )
        .await
        {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        let mcp = deep
            .as_ref()
            .and_then(|d| d.get("instances"))
            .and_then(Value::as_array)
            .and_then(|list| list.iter().find(|i| i.get("self") != Some(&json!(false))))
            .and_then(|i| i.get("address"))
            .and_then(Value::as_str)
            .map(|a| {
                let a = a.trim_end_matches('/');
                let scheme = if a.contains("://") { "" } else { "http://" };
                format!(" its MCP endpoint is {scheme}{a}/mcp")
            })
            .unwrap_or_default();
        Some(format!(
            "this is a Tether gateway's admin listener (health, metrics, API, dashboard), not its MCP endpoint;{mcp}"
        ))
    }

    async fn post(
        &self,
        session: Option<&str>,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let mut req = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .timeout(self.timeout);
        if let Some(s) = session {
            req = req
                .header("mcp-session-id", s)
                .header("mcp-protocol-version", "2025-11-25");
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let resp = req
            .json(body)
            .send()
            .await
            .map_err(|e| describe(&e, &self.url))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let want = body.get("id").cloned();
        let sse = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"));
        let (message, raw) = if sse {
            let mut events = sse::events(resp, MAX_ANSWER);
            let mut found = None;
            while let Ok(Some(Ok(SseItem::Event(ev)))) =
                tokio::time::timeout(self.timeout, events.next()).await
            {
                if let Ok(v) = serde_json::from_str::<Value>(&ev.data)
                    && v.get("method").is_none()
                    && v.get("id") == want.as_ref()
                {
                    found = Some(v);
                    break;
                }
            }
            (found, String::new())
        } else {
            let raw = crate::upstream::http::read_limited(resp, MAX_ANSWER)
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            (serde_json::from_str::<Value>(&raw).ok(), raw)
        };
        Ok(Answer {
            status,
            headers,
            message,
            raw,
        })
    }
}

fn step(name: &str, status: &'static str, started: Instant, detail: impl Into<String>) -> Step {
    Step {
        name: name.to_owned(),
        status,
        ms: started.elapsed().as_millis() as u64,
        detail: detail.into(),
    }
}

/// Runs the check.
pub async fn run(
    client: reqwest::Client,
    url: &str,
    headers: HeaderMap,
    timeout: Duration,
) -> Report {
    let p = Probe {
        client,
        url: url.to_owned(),
        headers,
        timeout,
    };
    let mut report = Report {
        url: url.to_owned(),
        protocol_version: None,
        server: None,
        capabilities: None,
        validates_origin: None,
        unknown_session_404: None,
        speaks_2026_07_28: None,
        steps: Vec::new(),
        diagnosis: None,
        ok: false,
    };
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "tether-check", "version": env!("CARGO_PKG_VERSION")}}});
    let t = Instant::now();
    let answer = match p.post(None, &init, &[]).await {
        Ok(a) => a,
        Err(why) => {
            report
                .steps
                .push(step("initialize", "failed", t, why.clone()));
            report.diagnosis = Some(why);
            return report;
        }
    };
    let fail = |report: &mut Report, why: String| {
        report
            .steps
            .push(step("initialize", "failed", t, why.clone()));
        report.diagnosis = Some(why);
    };
    match answer.status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            let challenge = answer
                .headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok());
            let why =
                crate::upstream::http::explain_status(answer.status, challenge).expect("explained");
            fail(&mut report, why);
            return report;
        }
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::BAD_REQUEST => {
            let why = match p.identify().await {
                Some(what) => what,
                None => {
                    crate::upstream::http::explain_status(answer.status, None).expect("explained")
                }
            };
            fail(&mut report, why);
            return report;
        }
        s if !s.is_success() => {
            fail(
                &mut report,
                format!(
                    "the server answered HTTP {s} to initialize: {}",
                    answer.raw.chars().take(200).collect::<String>()
                ),
            );
            return report;
        }
        _ => {}
    }
    let Some(msg) = answer
        .message
        .filter(|m| m.get("jsonrpc") == Some(&json!("2.0")))
    else {
        fail(
            &mut report,
            "not an MCP server: the answer to initialize is not JSON-RPC".into(),
        );
        return report;
    };
    if let Some(err) = msg.get("error") {
        fail(&mut report, format!("the server refused initialize: {err}"));
        return report;
    }
    let result = msg.get("result").cloned().unwrap_or(Value::Null);
    report.protocol_version = result
        .get("protocolVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    report.server = result.get("serverInfo").cloned();
    report.capabilities = result.get("capabilities").cloned();
    let session = answer
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    report.steps.push(step(
        "initialize",
        "ok",
        t,
        format!(
            "protocol {}, session {}",
            report.protocol_version.as_deref().unwrap_or("?"),
            if session.is_some() {
                "issued"
            } else {
                "none (stateless server)"
            }
        ),
    ));
    // The 2026-07-28 era: what a modern client (or Tether's `--upstream-protocol auto`)
    // would find here.
    let t = Instant::now();
    let init_params = init.get("params").cloned().unwrap_or(Value::Null);
    report.speaks_2026_07_28 =
        crate::upstream::modern::probe(&p.client, &p.url, &p.headers, &init_params, p.timeout)
            .await;
    report.steps.push(match report.speaks_2026_07_28 {
        Some(true) => step(
            "server/discover (2026-07-28)",
            "ok",
            t,
            "speaks 2026-07-28 too: modern clients can use it statelessly",
        ),
        Some(false) => step(
            "server/discover (2026-07-28)",
            "ok",
            t,
            "legacy only (sessions): modern clients fall back to initialize",
        ),
        None => step(
            "server/discover (2026-07-28)",
            "skipped",
            t,
            "no clear answer (an error status or no answer in time)",
        ),
    });
    let sid = session.as_deref();
    let t = Instant::now();
    match p
        .post(
            sid,
            &protocol::notification("notifications/initialized", None),
            &[],
        )
        .await
    {
        Ok(a) if a.status.is_success() => report.steps.push(step(
            "notifications/initialized",
            "ok",
            t,
            format!("HTTP {}", a.status.as_u16()),
        )),
        Ok(a) => report.steps.push(step(
            "notifications/initialized",
            "failed",
            t,
            format!("HTTP {}", a.status.as_u16()),
        )),
        Err(e) => report
            .steps
            .push(step("notifications/initialized", "failed", t, e)),
    }
    let caps = report.capabilities.clone().unwrap_or(Value::Null);
    let mut all_ok = report.steps.iter().all(|s| s.status == "ok");
    for (i, (method, cap, key)) in [
        ("tools/list", "tools", "tools"),
        ("resources/list", "resources", "resources"),
        ("prompts/list", "prompts", "prompts"),
    ]
    .into_iter()
    .enumerate()
    {
        let t = Instant::now();
        if caps.get(cap).is_none() {
            report
                .steps
                .push(step(method, "skipped", t, "not advertised"));
            continue;
        }
        let req = protocol::request(json!(10 + i), method, None);
        match p.post(sid, &req, &[]).await {
            Ok(a) => match a
                .message
                .as_ref()
                .and_then(|m| m.get("result"))
                .and_then(|r| r.get(key))
                .and_then(Value::as_array)
            {
                Some(items) => {
                    report
                        .steps
                        .push(step(method, "ok", t, format!("{} {key}", items.len())))
                }
                None => {
                    all_ok = false;
                    report.steps.push(step(
                        method,
                        "failed",
                        t,
                        format!("HTTP {}: no {key} in the answer", a.status.as_u16()),
                    ));
                }
            },
            Err(e) => {
                all_ok = false;
                report.steps.push(step(method, "failed", t, e));
            }
        }
    }
    let t = Instant::now();
    match p
        .post(sid, &protocol::request(json!(20), "ping", None), &[])
        .await
    {
        Ok(a)
            if a.message
                .as_ref()
                .is_some_and(|m| m.get("result").is_some()) =>
        {
            report.steps.push(step("ping", "ok", t, "answered"))
        }
        Ok(a) => {
            all_ok = false;
            report.steps.push(step(
                "ping",
                "failed",
                t,
                format!("HTTP {}, no result", a.status.as_u16()),
            ));
        }
        Err(e) => {
            all_ok = false;
            report.steps.push(step("ping", "failed", t, e));
        }
    }
    let t = Instant::now();
    match p
        .post(None, &init, &[("origin", "http://evil.example.invalid")])
        .await
    {
        Ok(a) if a.status.is_client_error() => {
            report.validates_origin = Some(true);
            report.steps.push(step(
                "foreign Origin refused",
                "ok",
                t,
                format!("HTTP {}", a.status.as_u16()),
            ));
        }
        Ok(a) => {
            report.validates_origin = Some(false);
            report.steps.push(step(
                "foreign Origin refused",
                "warning",
                t,
                format!(
                    "accepted (HTTP {}): open to DNS rebinding",
                    a.status.as_u16()
                ),
            ));
            if let Some(s) = a
                .headers
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
            {
                let _ = p
                    .client
                    .delete(&p.url)
                    .headers(p.headers.clone())
                    .header("mcp-session-id", s)
                    .send()
                    .await;
            }
        }
        Err(e) => report
            .steps
            .push(step("foreign Origin refused", "warning", t, e)),
    }
    let t = Instant::now();
    match p
        .post(
            Some("tether-check-unknown-session"),
            &protocol::request(json!(30), "tools/list", None),
            &[],
        )
        .await
    {
        Ok(a) if a.status == StatusCode::NOT_FOUND => {
            report.unknown_session_404 = Some(true);
            report
                .steps
                .push(step("unknown session gets 404", "ok", t, "HTTP 404"));
        }
        Ok(a) => {
            report.unknown_session_404 = Some(false);
            report.steps.push(step(
                "unknown session gets 404",
                "warning",
                t,
                format!(
                    "HTTP {}: clients cannot tell their session is gone",
                    a.status.as_u16()
                ),
            ));
        }
        Err(e) => report
            .steps
            .push(step("unknown session gets 404", "warning", t, e)),
    }
    if let Some(s) = sid {
        let _ = p
            .client
            .delete(&p.url)
            .headers(p.headers.clone())
            .header("mcp-session-id", s)
            .timeout(p.timeout)
            .send()
            .await;
    }
    report.ok = all_ok;
    if !all_ok {
        report.diagnosis =
            Some("the server initialized but failed later steps; see the steps above".into());
    }
    report
}

impl Report {
    /// Human-readable rendering.
    pub fn render(&self) -> String {
        let mut out = format!("Checking {}\n", self.url);
        let width = self.steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in &self.steps {
            out.push_str(&format!(
                "  {:<width$}  {:<8} {:>6} ms  {}\n",
                s.name, s.status, s.ms, s.detail
            ));
        }
        if let Some(server) = &self.server {
            out.push_str(&format!(
                "Server: {} {}\n",
                server.get("name").and_then(Value::as_str).unwrap_or("?"),
                server.get("version").and_then(Value::as_str).unwrap_or("")
            ));
        }
        if let Some(v) = &self.protocol_version {
            out.push_str(&format!("Protocol version: {v}\n"));
        }
        if let Some(c) = self.capabilities.as_ref().and_then(Value::as_object) {
            out.push_str(&format!(
                "Capabilities: {}\n",
                c.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        match &self.diagnosis {
            Some(d) => out.push_str(&format!("Problem: {d}\n")),
            None => out.push_str("OK: the endpoint works as an MCP server.\n"),
        }
        out
    }
}
