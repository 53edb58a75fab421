//! `tether connect URL`: a stdio MCP server that relays to a remote MCP server over HTTP,
//! so stdio-only clients (Claude Desktop's local servers, IDE plugins, scripts) never
//! notice the remote restarting.
//!
//! The relay speaks Streamable HTTP through [`HttpLink`] in reconnecting mode: connection
//! failures are retried with backoff for `--max-outage` (messages wait, in order), broken
//! response streams resume with `Last-Event-ID`, and a 404 for the session re-initializes
//! it with the client's own `initialize` params and restores its log level and resource
//! subscriptions. A request whose outcome became unknown gets a JSON-RPC error saying so.
//! A server that answers `initialize` with 400/404/405 is spoken to with the 2024-11-05
//! HTTP+SSE transport instead ([`LegacySse`]), re-initialized the same way if its stream
//! drops. stdout carries protocol bytes only; logs go to stderr or a file.
//!
//! Must not: write anything but protocol messages to stdout.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::upstream::sse::{self, SseItem};
use crate::wire::Message;
use anyhow::Context;
use futures::StreamExt;
pub use reqwest::header::HeaderMap;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Failure, Kind, Retry};
use crate::policy::Backoff;
use crate::protocol::{self, Restore, RestoreOp, code};
use crate::upstream::Inbound;
use crate::upstream::http::{HttpLink, HttpOptions, Reconnect};

/// Settings of `tether connect`.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The remote MCP endpoint.
    pub url: String,
    /// Headers sent with every request.
    pub headers: HeaderMap,
    /// Time to wait for the server's response headers on each request.
    pub timeout: Duration,
    /// Longest outage a message waits through.
    pub max_outage: Duration,
    /// How long the client's `initialize` waits for a server never reached before it is
    /// answered with an error naming the cause.
    pub first_contact: Duration,
    /// Reconnection backoff.
    pub backoff: Backoff,
    /// Send an MCP `ping` this often to notice dead connections early.
    pub heartbeat: Option<Duration>,
    /// Extra CA certificate (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Largest message accepted on stdin.
    pub max_message: usize,
}

/// Prefix of ids the relay uses for its own requests; their answers never reach stdout.
const OWN_ID_PREFIX: &str = "tether-";

/// Largest event read from a 2024-11-05 server's SSE stream.
const LEGACY_MAX_EVENT: usize = 16 << 20;

fn is_own(value: &Value) -> bool {
    value.get("method").is_none()
        && value
            .get("id")
            .and_then(Value::as_str)
            .is_some_and(|id| id.starts_with(OWN_ID_PREFIX))
}

/// Builds the HTTP client: system roots plus an optional CA file.
pub fn http_client(
    ca_file: Option<&std::path::Path>,
    timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().connect_timeout(timeout.min(Duration::from_secs(30)));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read CA file {}", path.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        b = b.add_root_certificate(cert);
    }
    b.build().context("cannot build the HTTP client")
}

enum Remote {
    Streamable(HttpLink),
    Legacy(LegacySse),
}

impl Remote {
    fn send(&self, value: Value) {
        match self {
            Remote::Streamable(l) => l.send(value),
            Remote::Legacy(l) => l.send(value),
        }
    }

    fn set_restore(&self, restore: &Restore) {
        if let Remote::Streamable(l) = self {
            l.set_restore(restore.requests());
        }
    }

    fn shutdown(&self) {
        match self {
            Remote::Streamable(l) => l.shutdown(true),
            Remote::Legacy(l) => l.stop.cancel(),
        }
    }
}

struct Connect {
    opts: ConnectOptions,
    client: reqwest::Client,
    tracker: TaskTracker,
    inbound_tx: mpsc::Sender<Inbound>,
    remote: Option<Remote>,
    /// The client's `initialize` request, replayed whenever the remote must start over.
    initialize: Option<Value>,
    /// Id of the client's `initialize` while its answer is awaited.
    initializing: Option<Value>,
    /// Client requests in flight: id (as JSON text) → the state change it would make.
    pending: HashMap<String, Option<RestoreOp>>,
    restore: Restore,
    next_own: u64,
    /// Own pings in flight (id → sent at).
    pings: HashMap<String, tokio::time::Instant>,
}

/// Runs `tether connect` until stdin closes.
pub async fn run(
    opts: ConnectOptions,
    stdin: impl AsyncRead + Unpin,
    mut stdout: impl AsyncWrite + Unpin,
) -> anyhow::Result<()> {
    let client = http_client(opts.ca_file.as_deref(), opts.timeout)?;
    let tracker = TaskTracker::new();
    let (inbound_tx, mut inbound) = mpsc::channel(256);
    let mut lines = FramedRead::new(stdin, LinesCodec::new_with_max_length(opts.max_message));
    let mut relay = Connect {
        opts,
        client,
        tracker: tracker.clone(),
        inbound_tx,
        remote: None,
        initialize: None,
        initializing: None,
        pending: HashMap::new(),
        restore: Restore::default(),
        next_own: 1,
        pings: HashMap::new(),
    };
    let mut heartbeat = relay
        .opts
        .heartbeat
        .map(|d| tokio::time::interval_at(tokio::time::Instant::now() + d, d));
    loop {
        tokio::select! {
            line = lines.next() => match line {
                Some(Ok(line)) => {
                    for out in relay.on_client_line(&line) {
                        write_line(&mut stdout, &out).await?;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "unreadable message on stdin; ignored");
                }
                None => break,
            },
            Some(msg) = inbound.recv() => {
                for out in relay.on_remote(msg) {
                    write_line(&mut stdout, &out).await?;
                }
            }
            _ = async { heartbeat.as_mut().expect("guarded").tick().await }, if heartbeat.is_some() => relay.ping(),
        }
    }
    tracing::info!("stdin closed; ending the remote session");
    if let Some(r) = relay.remote.take() {
        r.shutdown();
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    Ok(())
}

async fn write_line(out: &mut (impl AsyncWrite + Unpin), value: &Value) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec(value).expect("a Value always serializes");
    bytes.push(b'\n');
    out.write_all(&bytes).await.context("stdout closed")?;
    out.flush().await.context("stdout closed")
}

impl Connect {
    fn own_id(&mut self, what: &str) -> Value {
        self.next_own += 1;
        Value::from(format!("{OWN_ID_PREFIX}{what}-{}", self.next_own))
    }

    fn streamable(&self, init_params: Value) -> Remote {
        Remote::Streamable(HttpLink::new(
            self.client.clone(),
            &self.opts.url,
            init_params,
            HttpOptions {
                headers: self.opts.headers.clone(),
                reconnect: Some(Reconnect {
                    backoff: self.opts.backoff,
                    max_outage: self.opts.max_outage,
                    first_contact: self.opts.first_contact,
                }),
                request_timeout: Some(self.opts.timeout),
                label: "connect".into(),
                ..HttpOptions::default()
            },
            self.inbound_tx.clone(),
            self.tracker.clone(),
        ))
    }

    /// Handles one line from the client; returns messages to write back at once.
    fn on_client_line(&mut self, line: &str) -> Vec<Value> {
        if line.trim().is_empty() {
            return vec![];
        }
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                return vec![protocol::error_response(
                    Value::Null,
                    code::PARSE_ERROR,
                    format!("malformed JSON: {e}"),
                    None,
                )];
            }
        };
        let is_request = value.get("method").is_some() && value.get("id").is_some();
        if value.get("method").and_then(Value::as_str) == Some("initialize") && is_request {
            let params = value.get("params").cloned().unwrap_or(json!({}));
            if let Some(old) = self.remote.take() {
                old.shutdown();
            }
            self.initialize = Some(value.clone());
            self.initializing = value.get("id").cloned();
            self.restore = Restore::default();
            let remote = self.streamable(params);
            self.track(&value);
            remote.send(value);
            self.remote = Some(remote);
            return vec![];
        }
        let Some(remote) = &self.remote else {
            return match value.get("id").filter(|_| is_request) {
                Some(id) => vec![
                    Failure::new(Kind::InvalidRequest, "send initialize first", Retry::Never)
                        .response(id.clone()),
                ],
                None => vec![],
            };
        };
        if is_request {
            self.pending
                .insert(value["id"].to_string(), RestoreOp::of(&value));
        }
        remote.send(value);
        vec![]
    }

    fn track(&mut self, value: &Value) {
        if let Some(id) = value.get("id") {
            self.pending.insert(id.to_string(), None);
        }
    }

    /// Handles what the remote said; returns messages for the client.
    fn on_remote(&mut self, msg: Inbound) -> Vec<Value> {
        match msg {
            Inbound::Message { message, .. } => {
                let value = message.to_value();
                if is_own(&value) {
                    if let Some(id) = value.get("id").and_then(Value::as_str)
                        && let Some(sent) = self.pings.remove(id)
                    {
                        tracing::debug!(
                            rtt_ms = sent.elapsed().as_millis() as u64,
                            "heartbeat answered"
                        );
                    }
                    return vec![];
                }
                let answers_initialize = value.get("method").is_none()
                    && self.initializing.is_some()
                    && value.get("id") == self.initializing.as_ref();
                if answers_initialize {
                    self.initializing = None;
                    if value.get("error").is_some() {
                        // No session came of it: the client's next initialize starts over
                        // (and its other requests hear "send initialize first", not silence).
                        if let Some(r) = self.remote.take() {
                            r.shutdown();
                        }
                        self.initialize = None;
                        self.pending.clear();
                    }
                }
                if value.get("method").is_none()
                    && let Some(op) = value
                        .get("id")
                        .and_then(|id| self.pending.remove(&id.to_string()))
                        .flatten()
                    && value.get("result").is_some()
                    && self.restore.apply(&op)
                    && let Some(r) = &self.remote
                {
                    r.set_restore(&self.restore);
                }
                vec![value]
            }
            // An answer over the bound (one huge JSON body or SSE event): its request gets
            // the error the gateway gives, and nothing of it is read further.
            Inbound::Oversized { id, len, limit } => {
                let Some(id) = id else { return vec![] };
                self.pending.remove(&id.to_string());
                vec![
                    Failure::too_large(
                        format!(
                            "the server's answer was {len} bytes or more, over the relay's {limit} byte limit"
                        ),
                        len,
                        limit,
                    )
                    .response(id),
                ]
            }
            Inbound::NotStreamable(status) => {
                tracing::info!(status, url = %self.opts.url, "server is not Streamable HTTP; falling back to the 2024-11-05 HTTP+SSE transport");
                let Some(init) = self.initialize.clone() else {
                    return vec![];
                };
                let first = init.get("id").cloned().map(|id| (status, id));
                let legacy = LegacySse::start(self, None, first);
                legacy.send(init);
                self.remote = Some(Remote::Legacy(legacy));
                vec![]
            }
            Inbound::Closed(cause) => {
                // Only the 2024-11-05 transport ends like this: its one stream dropped and
                // cannot be resumed. Requests in flight have an unknown outcome; start over.
                tracing::warn!(cause = %cause, "remote stream lost; reconnecting");
                let failed: Vec<Value> = self
                    .pending
                    .drain()
                    .filter_map(|(id, _)| serde_json::from_str::<Value>(&id).ok())
                    .map(|id| {
                        Failure::upstream_lost(
                            format!("the connection to the server was lost after the request was sent ({cause}); its outcome is unknown"),
                            true,
                        )
                        .response(id)
                    })
                    .collect();
                if let Some(init) = self.initialize.clone() {
                    let mut replay = init;
                    protocol::set_id(&mut replay, self.own_id("reinit"));
                    let mut then = vec![protocol::notification("notifications/initialized", None)];
                    for (method, params) in self.restore.requests() {
                        then.push(protocol::request(
                            self.own_id("restore"),
                            method,
                            Some(params),
                        ));
                    }
                    let legacy = LegacySse::start(self, Some((replay, then)), None);
                    self.remote = Some(Remote::Legacy(legacy));
                }
                failed
            }
        }
    }

    fn ping(&mut self) {
        let Some(remote) = &self.remote else { return };
        let stale: Vec<String> = self
            .pings
            .iter()
            .filter(|(_, at)| at.elapsed() > self.opts.timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.pings.remove(&k);
            tracing::warn!(
                "heartbeat ping not answered within the timeout; the connection may be dead"
            );
        }
        self.next_own += 1;
        let id = format!("{OWN_ID_PREFIX}ping-{}", self.next_own);
        self.pings.insert(id.clone(), tokio::time::Instant::now());
        remote.send(protocol::request(Value::from(id), "ping", None));
    }
}

/// The 2024-11-05 HTTP+SSE transport: one GET stream carries every server message; the
/// first event names the endpoint that client messages are POSTed to.
struct LegacySse {
    outgoing: mpsc::Sender<Value>,
    /// Where a refused request's error goes (the relay's inbound queue).
    inbound: mpsc::Sender<Inbound>,
    stop: CancellationToken,
}

impl LegacySse {
    /// Connects; `preamble` (an initialize and what follows it) is sent before anything
    /// queued later, for a reconnection. `first` is set when this is a fallback tried for
    /// the client's initialize (the POST's status and the request's id): then a server
    /// that does not serve this transport either gets that request answered with an error
    /// naming both answers, instead of retries that would never succeed.
    fn start(
        relay: &Connect,
        preamble: Option<(Value, Vec<Value>)>,
        first: Option<(u16, Value)>,
    ) -> LegacySse {
        // Bounded like the Streamable HTTP link's queue: over it, requests get an error.
        let (outgoing, mut rx) = mpsc::channel::<Value>(1024);
        let stop = CancellationToken::new();
        let (client, url, headers, inbound, timeout) = (
            relay.client.clone(),
            relay.opts.url.clone(),
            relay.opts.headers.clone(),
            relay.inbound_tx.clone(),
            relay.opts.timeout,
        );
        let (backoff, max_outage) = (relay.opts.backoff, relay.opts.max_outage);
        let first_contact = relay.opts.first_contact;
        let task_stop = stop.clone();
        relay.tracker.spawn(async move {
            let started = tokio::time::Instant::now();
            let mut attempt = 0u32;
            let give_up_first = async |why: String| {
                let Some((post, id)) = &first else { return false };
                let message = format!(
                    "nothing serves MCP at {url}: POST answered HTTP {post}, and the 2024-11-05 HTTP+SSE fallback failed too ({why}). \
                     Check the URL: MCP endpoints are usually /mcp (a Tether gateway's is /mcp on its MCP port, not the admin port)"
                );
                tracing::warn!("{message}");
                let err = Failure::new(Kind::UpstreamUnavailable, message, Retry::Safe(None)).response(id.clone());
                let _ = inbound.send(Inbound::Message { message: Message::ours(err), origin: None }).await;
                true
            };
            let resp = loop {
                let req = client.get(&url).headers(headers.clone()).header(ACCEPT, "text/event-stream").send();
                match tokio::time::timeout(timeout, req).await {
                    Ok(Ok(r)) if r.status().is_success() => break r,
                    other => {
                        let definite = matches!(&other, Ok(Ok(_)));
                        let why = match other {
                            Ok(Ok(r)) => format!("GET answered HTTP {}", r.status()),
                            Ok(Err(e)) => crate::upstream::http::explain_error(&e, &url).0,
                            Err(_) => "timed out".into(),
                        };
                        attempt += 1;
                        if (definite || started.elapsed() >= first_contact) && give_up_first(why.clone()).await {
                            return;
                        }
                        if started.elapsed() >= max_outage {
                            let _ = inbound.send(Inbound::Closed(format!("cannot open the SSE stream: {why}"))).await;
                            return;
                        }
                        tokio::select! {
                            _ = task_stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff.delay(attempt + 1, 1.0).max(Duration::from_millis(100))) => {}
                        }
                    }
                }
            };
            let mut events = sse::events(resp, LEGACY_MAX_EVENT);
            let endpoint = loop {
                match events.next().await {
                    Some(Ok(SseItem::Event(ev))) if ev.event == "endpoint" => match reqwest::Url::parse(&url).and_then(|u| u.join(ev.data.trim())) {
                        Ok(e) => break e,
                        Err(e) => {
                            let _ = inbound.send(Inbound::Closed(format!("bad endpoint event: {e}"))).await;
                            return;
                        }
                    },
                    Some(Ok(_)) => {}
                    _ => {
                        if !give_up_first("its GET stream sent no endpoint event".into()).await {
                            let _ = inbound.send(Inbound::Closed("SSE stream ended before the endpoint event".into())).await;
                        }
                        return;
                    }
                }
            };
            // Posts go out in order from their own task while this one reads the stream.
            let post_stop = task_stop.clone();
            let (post_client, post_headers, post_inbound) = (client.clone(), headers.clone(), inbound.clone());
            let poster = tokio::spawn(async move {
                let preamble = preamble.map(|(init, rest)| std::iter::once(init).chain(rest).collect::<Vec<_>>()).unwrap_or_default();
                let mut queue = preamble.into_iter();
                loop {
                    let next = match queue.next() {
                        Some(v) => Some(v),
                        None => tokio::select! {
                            _ = post_stop.cancelled() => None,
                            v = rx.recv() => v,
                        },
                    };
                    let Some(value) = next else { return };
                    let res = post_client
                        .post(endpoint.clone())
                        .headers(post_headers.clone())
                        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                        .json(&value)
                        .send()
                        .await;
                    let failed = match res {
                        Ok(r) if r.status().is_success() => None,
                        Ok(r) => Some(format!("server answered HTTP {}", r.status())),
                        Err(e) => Some(e.to_string()),
                    };
                    if let (Some(why), Some(id)) = (failed, value.get("method").and(value.get("id"))) {
                        let err = Failure::upstream_lost(why, true).response(id.clone());
                        let _ = post_inbound.send(Inbound::Message { message: Message::ours(err), origin: None }).await;
                    }
                }
            });
            loop {
                let ev = tokio::select! {
                    _ = task_stop.cancelled() => break,
                    ev = events.next() => ev,
                };
                match ev {
                    Some(Ok(SseItem::Event(ev))) if ev.event == "message" || ev.event.is_empty() => {
                        if let Ok(value) = serde_json::from_str::<Value>(&ev.data) {
                            let message = Message::ours(value);
                            let _ = inbound.send(Inbound::Message { message, origin: None }).await;
                        }
                    }
                    Some(Ok(SseItem::TooLarge { len })) => {
                        tracing::warn!(bytes = len, limit = LEGACY_MAX_EVENT, "server event over the size limit skipped");
                    }
                    Some(Ok(SseItem::Event(_))) => {}
                    _ => {
                        poster.abort();
                        let _ = inbound.send(Inbound::Closed("the SSE stream ended".into())).await;
                        return;
                    }
                }
            }
            poster.abort();
        });
        LegacySse {
            outgoing,
            stop,
            inbound: relay.inbound_tx.clone(),
        }
    }

    fn send(&self, value: Value) {
        if let Err(mpsc::error::TrySendError::Full(v)) = self.outgoing.try_send(value) {
            tracing::warn!("server connection backed up: message refused");
            if let Some(id) = v.get("method").and(v.get("id")) {
                let err = Failure::at_bound(
                    "connect-queue",
                    "too many messages are waiting to be sent to the server; retry later",
                )
                .response(id.clone());
                let _ = self.inbound.try_send(Inbound::Message {
                    message: Message::ours(err),
                    origin: None,
                });
            }
        }
    }
}

/// Whether `url` is a well-formed `http://` or `https://` URL.
pub fn is_http_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
}

/// Parses `Name: value` header arguments.
pub fn parse_headers(items: &[String]) -> anyhow::Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for item in items {
        let (name, value) = item
            .split_once(':')
            .with_context(|| format!("header {item:?} is not `Name: value`"))?;
        let name = reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("bad header name in {item:?}"))?;
        let value = HeaderValue::from_str(value.trim())
            .with_context(|| format!("bad header value in {item:?}"))?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse() {
        let h =
            parse_headers(&["Authorization: Bearer abc".into(), "X-Team:  blue ".into()]).unwrap();
        assert_eq!(h["authorization"], "Bearer abc");
        assert_eq!(h["x-team"], "blue");
        assert!(parse_headers(&["no colon".into()]).is_err());
        assert!(parse_headers(&["Bad Name: x".into()]).is_err());
    }

    #[test]
    fn own_answers_are_recognized() {
        assert!(is_own(
            &json!({"jsonrpc": "2.0", "id": "tether-ping-3", "result": {}})
        ));
        assert!(!is_own(&json!({"jsonrpc": "2.0", "id": 3, "result": {}})));
        assert!(!is_own(
            &json!({"jsonrpc": "2.0", "id": "tether-1", "method": "sampling/createMessage"})
        ));
    }
}
