//! Connections to upstream MCP servers.
//!
//! A [`Link`] is one live connection: a stdio child (through the [`shim`]) or one session
//! with a Streamable HTTP server. Messages go out with [`Link::send`]; everything the
//! upstream says comes back on the [`Inbound`] channel returned by [`Connector::connect`],
//! ending with exactly one [`Inbound::Closed`] naming the cause. This layer knows nothing of
//! client sessions, HTTP front doors or stores: supervision policy (restart, backoff) lives
//! in the session layer, which owns each link.

pub mod http;
pub mod shim;
pub mod stdio;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::config::UpstreamSpec;
use crate::protocol;

/// Something the upstream sent, or the end of the link.
#[derive(Debug)]
pub enum Inbound {
    /// A JSON-RPC message. `origin` is the gateway-side id of the request on whose response
    /// stream it arrived, when the transport tells us (HTTP SSE); stdio never does.
    Message {
        /// The message.
        value: Value,
        /// The request it arrived in answer to, if known.
        origin: Option<u64>,
    },
    /// The link is gone; the string names why (exit status, HTTP error).
    Closed(String),
    /// The server answered `initialize` with a status that means it does not speak
    /// Streamable HTTP (400, 404 or 405: spec §1.1.9); a client may fall back to the
    /// 2024-11-05 HTTP+SSE transport. Only links that reconnect (the bridge) report it.
    NotStreamable(u16),
}

/// Why an upstream could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The process could not be started.
    #[error("cannot start upstream: {0}")]
    Spawn(String),
    /// The link closed (process exited, connection failed).
    #[error("{0}")]
    Closed(String),
    /// The upstream did not finish `initialize` in time.
    #[error("upstream did not answer initialize within {0:?}")]
    Timeout(Duration),
    /// The upstream answered `initialize` with an error.
    #[error("upstream rejected initialize: {0}")]
    Rejected(Value),
}

/// A live connection to one upstream.
pub enum Link {
    /// A stdio child process.
    Stdio(stdio::StdioLink),
    /// A Streamable HTTP upstream session.
    Http(http::HttpLink),
}

impl Link {
    /// Sends a message. Delivery failures surface as [`Inbound::Closed`] (or, for HTTP, an
    /// error response for the request), so callers never wait on a dead link.
    pub async fn send(&self, value: Value) {
        match self {
            Link::Stdio(l) => l.send(value).await,
            Link::Http(l) => l.send(value),
        }
    }

    /// Stops the upstream: the stdio child's process group is killed, the HTTP upstream
    /// session is deleted when `end_session` is set. Idempotent.
    pub fn shutdown(&self, end_session: bool) {
        match self {
            Link::Stdio(l) => l.shutdown(),
            Link::Http(l) => l.shutdown(end_session),
        }
    }

    /// Short description for logs: the child's pid or the upstream URL.
    pub fn describe(&self) -> String {
        match self {
            Link::Stdio(l) => format!("pid {}", l.pid()),
            Link::Http(l) => l.url().to_owned(),
        }
    }
}

/// Starts links for one configured upstream.
#[derive(Clone)]
pub struct Connector {
    spec: UpstreamSpec,
    shim: Option<PathBuf>,
    http: reqwest::Client,
    max_message: usize,
    tracker: TaskTracker,
}

impl Connector {
    /// `shim` is the `tether` executable used to supervise stdio children (see [`shim`]);
    /// without it children are spawned directly and may outlive a SIGKILLed gateway.
    pub fn new(
        spec: UpstreamSpec,
        shim: Option<PathBuf>,
        max_message: usize,
        tracker: TaskTracker,
    ) -> Connector {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .expect("HTTP client configuration is static and valid");
        Connector {
            spec,
            shim,
            http,
            max_message,
            tracker,
        }
    }

    /// Opens a new link. `init_params` are what an HTTP link replays if its upstream forgets
    /// the session (404); `session_id` labels the child's logs.
    pub async fn connect(
        &self,
        session_id: &str,
        init_params: &Value,
    ) -> Result<(Link, mpsc::Receiver<Inbound>), UpstreamError> {
        let (tx, rx) = mpsc::channel(256);
        let link = match &self.spec {
            UpstreamSpec::Stdio { argv, env, cwd } => Link::Stdio(stdio::StdioLink::spawn(
                stdio::SpawnSpec {
                    argv,
                    env,
                    cwd: cwd.as_deref(),
                    shim: self.shim.as_deref(),
                },
                session_id,
                self.max_message,
                tx,
                &self.tracker,
            )?),
            UpstreamSpec::Http { url } => Link::Http(http::HttpLink::new(
                self.http.clone(),
                url,
                init_params.clone(),
                http::HttpOptions::default(),
                tx,
                self.tracker.clone(),
            )),
        };
        Ok((link, rx))
    }
}

/// Runs `initialize` on a fresh link and returns its result plus any messages the upstream
/// sent before answering (log notifications, pings), which the caller routes afterwards.
pub async fn handshake(
    link: &Link,
    rx: &mut mpsc::Receiver<Inbound>,
    id: u64,
    params: &Value,
    timeout: Duration,
) -> Result<(Value, Vec<Inbound>), UpstreamError> {
    link.send(protocol::request(
        Value::from(id),
        "initialize",
        Some(params.clone()),
    ))
    .await;
    let mut early = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, rx.recv()).await;
        match next {
            Err(_) => return Err(UpstreamError::Timeout(timeout)),
            Ok(None) => {
                return Err(UpstreamError::Closed(
                    "upstream link ended during initialize".into(),
                ));
            }
            Ok(Some(Inbound::Closed(cause))) => return Err(UpstreamError::Closed(cause)),
            Ok(Some(Inbound::NotStreamable(status))) => {
                return Err(UpstreamError::Closed(format!(
                    "upstream is not a Streamable HTTP server (HTTP {status})"
                )));
            }
            Ok(Some(Inbound::Message { value, origin })) => {
                if value.get("id").and_then(Value::as_u64) == Some(id)
                    && value.get("method").is_none()
                {
                    if let Some(err) = value.get("error") {
                        return Err(UpstreamError::Rejected(err.clone()));
                    }
                    return Ok((value.get("result").cloned().unwrap_or(Value::Null), early));
                }
                early.push(Inbound::Message { value, origin });
            }
        }
    }
}
