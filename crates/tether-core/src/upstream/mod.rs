//! Connections to upstream MCP servers.
//!
//! A [`Link`] is one live connection: a stdio child (through the [`shim`]) or one session
//! with a Streamable HTTP server. Messages go out with [`Link::send`]; everything the
//! upstream says comes back on the [`Inbound`] channel returned by [`Connector::connect`],
//! ending with exactly one [`Inbound::Closed`] naming the cause. This layer knows nothing of
//! client sessions, HTTP front doors or stores: supervision policy (restart, backoff) lives
//! in the session layer, which owns each link.
//!
//! Must not: know about client sessions or stores.

mod circuit;
pub mod http;
#[cfg(test)]
pub(crate) mod memory;
pub mod modern;
mod probe;
pub mod shim;
mod spec;
pub mod sse;
pub mod stdio;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::protocol;
use crate::wire::Message;
pub use circuit::{Attempt, Circuit, FIRST_PROBE};
use probe::{ERA_LEGACY, ERA_MODERN, ERA_UNKNOWN};
pub use probe::{handshake, startable};
pub use spec::{DEFAULT_PASS_ENV, EnvPolicy, UpstreamProtocol, UpstreamSpec};

/// Something the upstream sent, or the end of the link.
#[derive(Debug)]
pub enum Inbound {
    /// A JSON-RPC message. `origin` is the gateway-side id of the request on whose response
    /// stream it arrived, when the transport tells us (HTTP SSE); stdio never does.
    Message {
        /// The message.
        message: Message,
        /// The request it arrived in answer to, if known.
        origin: Option<u64>,
    },
    /// The link is gone; the string names why (exit status, HTTP error).
    Closed(String),
    /// The server answered `initialize` with a status that means it does not speak
    /// Streamable HTTP (400, 404 or 405: spec §1.1.9); a client may fall back to the
    /// 2024-11-05 HTTP+SSE transport. Only links that reconnect (the bridge) report it.
    NotStreamable(u16),
    /// A message longer than the limit was skipped; `id` is its JSON-RPC id when its first
    /// bytes named one, so the caller waiting for it can be told.
    Oversized {
        /// The message's id, if it could be read.
        id: Option<Value>,
        /// Its length in bytes.
        len: usize,
        /// The limit it exceeded.
        limit: usize,
    },
}

/// Why an upstream could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The process could not be started.
    #[error("cannot start upstream: {0}")]
    Spawn(String),
    /// The gateway itself ran out of a resource (open files, memory, processes) while
    /// starting the upstream: a capacity refusal of this one start, never the upstream's
    /// failure.
    #[error("the gateway is out of resources: {0}")]
    Resources(String),
    /// The link closed (process exited, connection failed).
    #[error("{0}")]
    Closed(String),
    /// The upstream did not finish `initialize` in time.
    #[error("upstream did not answer initialize within {0:?}")]
    Timeout(Duration),
    /// The upstream answered `initialize` with an error.
    #[error("upstream rejected initialize: {0}")]
    Rejected(Value),
    /// New upstreams kept failing to start; starts are refused until `retry_in` passes.
    #[error(
        "upstream failed to start {failures} times in a row (last: {last}); not starting another for {} ms",
        retry_in.as_millis()
    )]
    CircuitOpen {
        /// Consecutive start failures.
        failures: u32,
        /// Time until a start is tried again.
        retry_in: Duration,
        /// The last failure.
        last: String,
    },
    /// `--max-upstreams` upstreams are running (in all, or of this server: `setting` says
    /// which limit).
    #[error("{max} upstreams are running, the most allowed ({setting})")]
    Capacity {
        /// The limit.
        max: usize,
        /// Where it is set.
        setting: &'static str,
    },
}

/// A live connection to one upstream. It holds one of the connector's `--max-upstreams`
/// slots until it is dropped.
pub struct Link {
    kind: LinkKind,
    /// Its places in the running counts (the server's, and the gateway's when the server
    /// is one of several).
    _slot: Vec<OwnedSemaphorePermit>,
}

enum LinkKind {
    /// A stdio child process.
    Stdio(stdio::StdioLink),
    /// A Streamable HTTP upstream session.
    Http(http::HttpLink),
    /// A stateless 2026-07-28 HTTP upstream.
    Modern(modern::ModernLink),
    /// A test's fake upstream.
    #[cfg(test)]
    Memory(memory::MemoryLink),
}

impl Link {
    /// Sends a message. Delivery failures surface as [`Inbound::Closed`] (or, for HTTP, an
    /// error response for the request), so callers never wait on a dead link.
    pub async fn send(&self, message: Message) {
        match &self.kind {
            LinkKind::Stdio(l) => l.send(&message).await,
            LinkKind::Http(l) => l.send(message.to_value()),
            LinkKind::Modern(l) => l.send(message.to_value()),
            #[cfg(test)]
            LinkKind::Memory(l) => l.send(message).await,
        }
    }

    /// Sets the requests that restore the client's session state (log level, resource
    /// subscriptions) after an HTTP upstream forgot the session and the link re-initialized
    /// it by itself. A stdio upstream is restarted by the session, which replays them.
    /// `requests` is only called for a link that keeps them (HTTP): building them costs
    /// what the subscriptions number, on every change.
    pub fn set_restore(&self, requests: impl FnOnce() -> Vec<(&'static str, Value)>) {
        if let LinkKind::Http(l) = &self.kind {
            l.set_restore(requests());
        }
    }

    /// Stops the upstream: the stdio child's process group is killed, the HTTP upstream
    /// session is deleted when `end_session` is set. Idempotent.
    pub fn shutdown(&self, end_session: bool) {
        match &self.kind {
            LinkKind::Stdio(l) => l.shutdown(),
            LinkKind::Http(l) => l.shutdown(end_session),
            LinkKind::Modern(l) => l.shutdown(),
            #[cfg(test)]
            LinkKind::Memory(l) => l.shutdown(),
        }
    }

    /// Stops the upstream at once (gateway shutdown): the stdio child's group is killed
    /// without the polite stdin close; an HTTP upstream session is left for its server.
    pub fn kill(&self) {
        match &self.kind {
            LinkKind::Stdio(l) => l.kill(),
            LinkKind::Http(l) => l.shutdown(false),
            LinkKind::Modern(l) => l.shutdown(),
            #[cfg(test)]
            LinkKind::Memory(l) => l.shutdown(),
        }
    }

    /// Short description for logs: the child's pid or the upstream URL.
    pub fn describe(&self) -> String {
        match &self.kind {
            LinkKind::Stdio(l) => format!("pid {}", l.pid()),
            LinkKind::Http(l) => l.url().to_owned(),
            LinkKind::Modern(l) => l.url().to_owned(),
            #[cfg(test)]
            LinkKind::Memory(_) => "memory".to_owned(),
        }
    }
}

/// A started upstream: the link, its messages, and its `initialize` result.
pub struct Started {
    /// The link.
    pub link: Link,
    /// What the upstream says from now on.
    pub rx: mpsc::Receiver<Inbound>,
    /// The upstream's `InitializeResult`.
    pub result: Value,
    /// Messages it sent before answering `initialize`.
    pub early: Vec<Inbound>,
}

/// Bounds of one configured upstream ([`Connector::new`]).
#[derive(Debug, Clone)]
pub struct UpstreamLimits {
    /// Largest message read from the upstream.
    pub max_message: usize,
    /// Running links at most.
    pub max_running: usize,
    /// stderr lines logged per second.
    pub stderr_lines_per_sec: u32,
    /// Consecutive start failures that open the circuit.
    pub circuit_failures: u32,
    /// How long the circuit stays open.
    pub circuit_cooldown: Duration,
}

impl Default for UpstreamLimits {
    fn default() -> Self {
        UpstreamLimits {
            max_message: 16 << 20,
            max_running: 1000,
            stderr_lines_per_sec: 50,
            circuit_failures: 5,
            circuit_cooldown: Duration::from_secs(10),
        }
    }
}

/// Starts links for one configured upstream.
#[derive(Clone)]
pub struct Connector {
    spec: UpstreamSpec,
    shim: Option<PathBuf>,
    http: reqwest::Client,
    limits: UpstreamLimits,
    slots: Arc<Semaphore>,
    /// The gateway's running count and its limit, when this server is one of several.
    gateway_slots: Option<(Arc<Semaphore>, usize)>,
    circuit: Arc<Circuit>,
    stderr: Arc<crate::log_limit::LogLimiter>,
    tracker: TaskTracker,
    /// What `--upstream-protocol auto` found the HTTP upstream to speak: [`ERA_UNKNOWN`]
    /// until a probe gave a clear answer.
    era: Arc<AtomicU8>,
    /// Tests: links are [`memory::FakeUpstream`]s handed to the test through this channel.
    #[cfg(test)]
    memory: Option<mpsc::UnboundedSender<memory::FakeUpstream>>,
}

impl Connector {
    /// `shim` is the `tether` executable used to supervise stdio children (see [`shim`]);
    /// without it children are spawned directly and may outlive a SIGKILLed gateway.
    pub fn new(
        spec: UpstreamSpec,
        name: &str,
        shim: Option<PathBuf>,
        limits: UpstreamLimits,
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
            slots: Arc::new(Semaphore::new(limits.max_running)),
            gateway_slots: None,
            circuit: Arc::new(Circuit::new(
                name,
                limits.circuit_failures,
                limits.circuit_cooldown,
            )),
            stderr: Arc::new(crate::log_limit::LogLimiter::new(
                limits.stderr_lines_per_sec,
                "upstream stderr lines (over --stderr-lines-per-sec)",
            )),
            limits,
            tracker,
            era: Arc::new(AtomicU8::new(ERA_UNKNOWN)),
            #[cfg(test)]
            memory: None,
        }
    }

    /// A connector whose links are fakes the test plays (each start hands one over).
    #[cfg(test)]
    pub(crate) fn in_memory(
        limits: UpstreamLimits,
        tracker: TaskTracker,
    ) -> (Connector, mpsc::UnboundedReceiver<memory::FakeUpstream>) {
        // Unbounded: one entry per upstream start, and the test takes each as it plays it.
        let (tx, rx) = mpsc::unbounded_channel();
        let mut c = Connector::new(
            UpstreamSpec::Http {
                url: "http://memory.invalid/mcp".into(),
                protocol: UpstreamProtocol::Legacy,
                headers: Vec::new(),
            },
            "fake",
            None,
            limits,
            tracker,
        );
        c.memory = Some(tx);
        (c, rx)
    }

    /// This server's upstreams also count against the gateway's `--max-upstreams`
    /// (`slots`, of `max`), shared by every server of the process.
    #[must_use]
    pub fn sharing(mut self, slots: Arc<Semaphore>, max: usize) -> Connector {
        self.gateway_slots = Some((slots, max));
        self
    }

    /// The circuit breaker of this upstream.
    pub fn circuit(&self) -> &Circuit {
        &self.circuit
    }

    /// The protocol era spoken to this upstream: `legacy`, `2026-07-28`, or for
    /// `--upstream-protocol auto` before the server has given a clear answer,
    /// `auto (not asked yet)`.
    pub fn protocol(&self) -> &'static str {
        match &self.spec {
            UpstreamSpec::Stdio { .. }
            | UpstreamSpec::Http {
                protocol: UpstreamProtocol::Legacy,
                ..
            } => "legacy",
            UpstreamSpec::Http {
                protocol: UpstreamProtocol::Modern,
                ..
            } => protocol::MODERN_VERSION,
            UpstreamSpec::Http {
                protocol: UpstreamProtocol::Auto,
                ..
            } => match self.era.load(Ordering::Relaxed) {
                ERA_LEGACY => "legacy",
                ERA_MODERN => protocol::MODERN_VERSION,
                _ => "auto (not asked yet)",
            },
        }
    }

    /// What it starts.
    pub fn spec(&self) -> &UpstreamSpec {
        &self.spec
    }

    /// Its own `max-upstreams`.
    pub fn max_running(&self) -> usize {
        self.limits.max_running
    }

    /// Links running now.
    pub fn running(&self) -> usize {
        self.limits.max_running - self.slots.available_permits()
    }

    /// Starts an upstream and runs `initialize` on it: the one way both new sessions and
    /// restarts get an upstream. Refused while `--max-upstreams` links run or the circuit
    /// is open; every outcome is reported to the circuit.
    pub async fn start(
        &self,
        session_id: &str,
        params: &Value,
        uid: u64,
        timeout: Duration,
    ) -> Result<Started, UpstreamError> {
        let mut slot =
            vec![
                self.slots
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| UpstreamError::Capacity {
                        max: self.limits.max_running,
                        setting: if self.gateway_slots.is_some() {
                            "tether.max-upstreams in the servers file"
                        } else {
                            "--max-upstreams"
                        },
                    })?,
            ];
        if let Some((all, max)) = &self.gateway_slots {
            slot.push(
                all.clone()
                    .try_acquire_owned()
                    .map_err(|_| UpstreamError::Capacity {
                        max: *max,
                        setting: "--max-upstreams",
                    })?,
            );
        }
        let attempt = self.circuit.admit()?;
        let (mut link, mut rx) = match self.connect(session_id, params).await {
            Ok(x) => x,
            Err(e) => {
                self.report(attempt, &e);
                return Err(e);
            }
        };
        link._slot = slot;
        match handshake(&link, &mut rx, uid, params, timeout).await {
            Ok((result, early)) => {
                self.circuit.success(attempt);
                Ok(Started {
                    link,
                    rx,
                    result,
                    early,
                })
            }
            Err(e) => {
                link.shutdown(true);
                self.report(attempt, &e);
                Err(e)
            }
        }
    }

    /// Tells the circuit what a failed start says of the upstream.
    fn report(&self, attempt: Attempt, err: &UpstreamError) {
        match err {
            // It answered: the server runs, it refused these params.
            UpstreamError::Rejected(_) => self.circuit.success(attempt),
            // The gateway's own shortage says nothing of the upstream (issue 26: a flood
            // of sessions under `nofile=1024` opened the circuit for every client).
            UpstreamError::Resources(_) => self.circuit.neutral(attempt),
            _ => self.circuit.failure(attempt, err),
        }
    }

    /// Opens a new link without `initialize` or limits ([`Connector::start`] is the way
    /// sessions get one). `init_params` are what an HTTP link replays if its upstream forgets
    /// the session (404); `session_id` labels the child's logs.
    pub async fn connect(
        &self,
        session_id: &str,
        init_params: &Value,
    ) -> Result<(Link, mpsc::Receiver<Inbound>), UpstreamError> {
        let (tx, rx) = mpsc::channel(256);
        #[cfg(test)]
        if let Some(m) = &self.memory {
            let (link, fake) = memory::pair(tx);
            let _ = m.send(fake);
            let kind = LinkKind::Memory(link);
            return Ok((
                Link {
                    kind,
                    _slot: Vec::new(),
                },
                rx,
            ));
        }
        let kind = match &self.spec {
            UpstreamSpec::Stdio {
                argv,
                env,
                cwd,
                env_policy,
            } => LinkKind::Stdio(stdio::StdioLink::spawn(
                stdio::SpawnSpec {
                    argv,
                    env,
                    cwd: cwd.as_deref(),
                    env_policy,
                    shim: self.shim.as_deref(),
                    name: self.circuit.name(),
                },
                session_id,
                self.limits.max_message,
                self.stderr.clone(),
                tx,
                &self.tracker,
            )?),
            UpstreamSpec::Http {
                url,
                protocol,
                headers,
            } => {
                let opts = http::HttpOptions {
                    headers: header_map(headers),
                    max_message: self.limits.max_message,
                    label: session_id.chars().take(8).collect(),
                    ..http::HttpOptions::default()
                };
                if self
                    .speaks_modern(url, *protocol, &opts.headers, init_params)
                    .await
                {
                    LinkKind::Modern(modern::ModernLink::new(
                        self.http.clone(),
                        url,
                        opts,
                        tx,
                        self.tracker.clone(),
                    ))
                } else {
                    LinkKind::Http(http::HttpLink::new(
                        self.http.clone(),
                        url,
                        init_params.clone(),
                        opts,
                        tx,
                        self.tracker.clone(),
                    ))
                }
            }
        };
        Ok((
            Link {
                kind,
                _slot: Vec::new(),
            },
            rx,
        ))
    }
}

/// Whether an I/O error is the gateway's own shortage (open files of the process or the
/// system, memory, processes) rather than anything the upstream did.
pub fn gateway_exhausted(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOMEM, Errno::EAGAIN]
            .iter()
            .any(|x| *x as i32 == code)
    })
}

/// The configured headers of an HTTP upstream (validated when the configuration was read).
fn header_map(headers: &[(String, String)]) -> reqwest::header::HeaderMap {
    let mut map = reqwest::header::HeaderMap::new();
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            reqwest::header::HeaderName::from_bytes(k.as_bytes()),
            reqwest::header::HeaderValue::from_str(v),
        ) {
            map.insert(k, v);
        }
    }
    map
}

#[cfg(test)]
mod tests;
