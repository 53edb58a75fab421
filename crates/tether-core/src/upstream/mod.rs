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

pub mod http;
#[cfg(test)]
pub(crate) mod memory;
pub mod modern;
pub mod shim;
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

use crate::config::{UpstreamProtocol, UpstreamSpec};
use crate::protocol;
use crate::wire::Message;

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

/// Refuses new upstream starts, across sessions, after consecutive start failures: a
/// server that exits at once would otherwise be spawned on every request of every session.
///
/// A guard must never make an outage longer than the fault it guards against (issue 26:
/// eight sessions whose HTTP upstream restarted in a second failed together within 20 ms,
/// opened the circuit for its whole 10 s cooldown, and turned a 1 s outage into 10 s), so:
/// - failures of one moment count once: a start that began before the last counted
///   failure was recorded failed for the same reason at the same time;
/// - an open circuit lets one start through (half-open) after a short wait
///   ([`FIRST_PROBE`]) that doubles with each failed probe up to `cooldown`, so an upstream
///   that is back within a second is used within about a second;
/// - its success closes the circuit, its failure opens it again.
///
/// Logs the first failure and the opening, then only counts.
pub struct Circuit {
    name: String,
    threshold: u32,
    cooldown: Duration,
    state: Mutex<CircuitState>,
    refused: AtomicU64,
}

/// The wait before the first start is tried through an open circuit; each failed probe
/// doubles it, up to the cooldown.
pub const FIRST_PROBE: Duration = Duration::from_millis(250);

#[derive(Default)]
struct CircuitState {
    /// Failures counted since the last success (concurrent ones once).
    failures: u32,
    /// When the last counted failure was recorded.
    last_failure_at: Option<Instant>,
    open_until: Option<Instant>,
    probing: bool,
    /// Probes that failed since the circuit opened.
    failed_probes: u32,
    last: String,
    /// When a start last succeeded.
    last_success: Option<Instant>,
}

/// One start let through by [`Circuit::admit`]: when it began, and whether it is the
/// half-open probe.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    began: Instant,
    probe: bool,
}

impl Circuit {
    /// The upstream's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A closed circuit for the upstream `name`.
    pub fn new(name: &str, threshold: u32, cooldown: Duration) -> Circuit {
        Circuit {
            name: name.to_owned(),
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::default(),
            refused: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CircuitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The wait before the next probe after `failed_probes` failed ones.
    fn probe_wait(&self, failed_probes: u32) -> Duration {
        FIRST_PROBE
            .saturating_mul(1u32 << failed_probes.min(20))
            .min(self.cooldown)
    }

    /// May a start be tried now? The attempt is handed back with its outcome.
    pub fn admit(&self) -> Result<Attempt, UpstreamError> {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(until) = st.open_until else {
            return Ok(Attempt {
                began: now,
                probe: false,
            });
        };
        if now >= until && !st.probing {
            st.probing = true;
            return Ok(Attempt {
                began: now,
                probe: true,
            });
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        Err(UpstreamError::CircuitOpen {
            failures: st.failures,
            retry_in: until
                .saturating_duration_since(now)
                .max(Duration::from_millis(100)),
            last: st.last.clone(),
        })
    }

    /// A start succeeded.
    pub fn success(&self, _attempt: Attempt) {
        let mut st = self.lock();
        if st.open_until.is_some() {
            // Outside the macro: its fields are not evaluated when the level is off.
            let refused = self.refused.swap(0, Ordering::Relaxed);
            tracing::info!(
                upstream.name = %self.name,
                failures = st.failures,
                refused,
                "upstream starts again; circuit closed"
            );
        }
        *st = CircuitState {
            last_success: Some(Instant::now()),
            ..CircuitState::default()
        };
    }

    /// Whether a start succeeded after `t`: the upstream was reachable again since then.
    pub fn succeeded_since(&self, t: Instant) -> bool {
        self.lock().last_success.is_some_and(|s| s > t)
    }

    /// A start failed.
    pub fn failure(&self, attempt: Attempt, cause: &UpstreamError) {
        let now = Instant::now();
        let mut st = self.lock();
        if attempt.probe {
            st.probing = false;
        }
        // Begun before the last counted failure was known: the same moment's failure.
        let same_moment = !attempt.probe && st.last_failure_at.is_some_and(|t| attempt.began < t);
        if same_moment {
            return;
        }
        st.failures += 1;
        st.last_failure_at = Some(now);
        st.last = cause.to_string();
        if st.failures == 1 {
            tracing::warn!(upstream.name = %self.name, error = %cause, "upstream failed to start");
        }
        if st.open_until.is_some() {
            if attempt.probe {
                st.failed_probes += 1;
                st.open_until = Some(now + self.probe_wait(st.failed_probes));
            }
        } else if st.failures >= self.threshold {
            st.open_until = Some(now + self.probe_wait(0));
            tracing::warn!(
                upstream.name = %self.name,
                failures = st.failures,
                error = %cause,
                first_probe_ms = self.probe_wait(0).as_millis() as u64,
                cooldown_ms = self.cooldown.as_millis() as u64,
                "upstream keeps failing to start; circuit open: new starts are refused, one is tried after a wait that doubles up to the cooldown"
            );
        }
    }

    /// A start ended without saying anything of the upstream (the gateway itself was out
    /// of descriptors or memory): nothing is counted, and a probe's turn is given back.
    pub fn neutral(&self, attempt: Attempt) {
        if attempt.probe {
            self.lock().probing = false;
        }
    }

    /// Whether starts are being refused.
    pub fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }

    /// Consecutive failures and the last cause.
    pub fn failures(&self) -> (u32, String) {
        let st = self.lock();
        (st.failures, st.last.clone())
    }

    /// Starts refused while open, since the circuit last closed.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
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

const ERA_UNKNOWN: u8 = 0;
const ERA_LEGACY: u8 = 1;
const ERA_MODERN: u8 = 2;

impl Connector {
    /// Whether links to this HTTP upstream speak 2026-07-28. With `auto` the server is
    /// asked once (`server/discover`, as the SDK clients probe) and its clear answer kept
    /// for the life of the process; an unclear one (unreachable, a 5xx, an authentication
    /// demand) means legacy for this start and another probe next time.
    async fn speaks_modern(
        &self,
        url: &str,
        protocol: UpstreamProtocol,
        headers: &reqwest::header::HeaderMap,
        init_params: &Value,
    ) -> bool {
        match protocol {
            UpstreamProtocol::Legacy => return false,
            UpstreamProtocol::Modern => return true,
            UpstreamProtocol::Auto => {}
        }
        match self.era.load(Ordering::Relaxed) {
            ERA_LEGACY => return false,
            ERA_MODERN => return true,
            _ => {}
        }
        let found = modern::probe(
            &self.http,
            url,
            headers,
            init_params,
            Duration::from_secs(10),
        )
        .await;
        if let Some(m) = found {
            let era = if m { ERA_MODERN } else { ERA_LEGACY };
            if self.era.swap(era, Ordering::Relaxed) != era {
                tracing::info!(
                    upstream.name = %self.circuit.name(),
                    url = %url,
                    protocol = if m { protocol::MODERN_VERSION } else { "legacy" },
                    "upstream protocol detected (--upstream-protocol auto)"
                );
            }
        }
        found == Some(true)
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
    link.send(Message::request(
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
            Ok(Some(Inbound::Oversized { len, limit, .. })) => {
                return Err(UpstreamError::Closed(format!(
                    "upstream answered initialize with {len} bytes, over the {limit} byte limit (--max-upstream-message)"
                )));
            }
            Ok(Some(Inbound::NotStreamable(status))) => {
                return Err(UpstreamError::Closed(format!(
                    "upstream is not a Streamable HTTP server (HTTP {status})"
                )));
            }
            Ok(Some(Inbound::Message { message, origin })) => {
                if message.id().and_then(Value::as_u64) == Some(id)
                    && message.kind() == protocol::Kind::Response
                {
                    let Value::Object(mut answer) = message.to_value() else {
                        unreachable!("a message is an object")
                    };
                    if let Some(err) = answer.remove("error") {
                        return Err(UpstreamError::Rejected(err));
                    }
                    return Ok((answer.remove("result").unwrap_or(Value::Null), early));
                }
                early.push(Inbound::Message { message, origin });
            }
        }
    }
}

/// Whether the upstream could be started now: the stdio program exists and is
/// executable, or the HTTP upstream accepts a TCP connection. Readiness asks it on every
/// probe; start-up asks it once, to say at once what the first session would meet.
pub async fn startable(spec: &UpstreamSpec) -> Result<(), String> {
    match spec {
        UpstreamSpec::Stdio { argv, .. } => {
            let program = std::path::Path::new(&argv[0]);
            let candidates: Vec<std::path::PathBuf> = if program.components().count() > 1 {
                vec![program.to_path_buf()]
            } else {
                std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                    .map(|d| d.join(program))
                    .collect()
            };
            use std::os::unix::fs::PermissionsExt;
            let found = candidates.iter().any(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            });
            if found {
                Ok(())
            } else {
                Err(format!(
                    "{:?} is not an executable file or on PATH",
                    argv[0]
                ))
            }
        }
        UpstreamSpec::Http { url, .. } => {
            let u = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
            let host = u.host_str().unwrap_or("localhost").to_owned();
            let port = u.port_or_known_default().unwrap_or(80);
            match tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot connect to {host}:{port}: {e}")),
                Err(_) => Err(format!("no answer from {host}:{port}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configured headers of an HTTP upstream (an `mcpServers` entry's `headers`, or
    /// `--upstream-header`) go with its requests, the probe of `auto` included.
    #[tokio::test]
    async fn an_http_upstreams_configured_headers_reach_it() {
        let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().route(
            "/mcp",
            axum::routing::post(move |headers: reqwest::header::HeaderMap| {
                let log = log.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    log.lock().unwrap().push(auth);
                    axum::http::StatusCode::NOT_FOUND
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let tracker = TaskTracker::new();
        let c = Connector::new(
            UpstreamSpec::Http {
                url,
                protocol: UpstreamProtocol::Auto,
                headers: vec![("Authorization".into(), "Bearer t".into())],
            },
            "h",
            None,
            UpstreamLimits::default(),
            tracker.clone(),
        );
        let r = c
            .start("s", &serde_json::json!({}), 1, Duration::from_secs(5))
            .await;
        assert!(r.is_err(), "the server answers 404 to everything");
        let seen = seen.lock().unwrap().clone();
        assert!(seen.len() >= 2, "the probe and the initialize: {seen:?}");
        assert!(
            seen.iter().all(|a| a.as_deref() == Some("Bearer t")),
            "{seen:?}"
        );
        tracker.close();
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_opens_after_consecutive_failures_and_probes_with_a_growing_wait() {
        let c = Circuit::new("t", 3, Duration::from_secs(10));
        let err = UpstreamError::Closed("exited at once".into());
        for _ in 0..2 {
            let a = c.admit().unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
            c.failure(a, &err);
        }
        assert!(!c.is_open());
        let a = c.admit().unwrap();
        c.failure(a, &err);
        assert!(c.is_open());
        match c.admit() {
            Err(UpstreamError::CircuitOpen {
                failures, retry_in, ..
            }) => {
                assert_eq!(failures, 3);
                assert_eq!(retry_in, FIRST_PROBE, "the first probe comes soon");
            }
            other => panic!("{other:?}"),
        }
        // Each failed probe doubles the wait, up to the cooldown.
        let mut waits = Vec::new();
        for _ in 0..8 {
            let wait = match c.admit() {
                Err(UpstreamError::CircuitOpen { retry_in, .. }) => retry_in,
                other => panic!("{other:?}"),
            };
            waits.push(wait.as_millis());
            tokio::time::advance(wait).await;
            // Half-open: one start goes through, the others wait for its outcome.
            let probe = c.admit().unwrap();
            assert!(c.admit().is_err());
            c.failure(probe, &err);
        }
        assert_eq!(
            waits,
            [250, 500, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000]
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = c.admit().unwrap();
        c.success(probe);
        assert!(!c.is_open());
        assert_eq!(c.failures().0, 0);
        c.admit().unwrap();
        assert_eq!(
            c.refused(),
            0,
            "the refusal count restarts when the circuit closes"
        );
    }

    /// Issue 26: eight sessions whose upstream went away all fail to restart at the same
    /// moment. That is one failure, not eight: the circuit stays closed, and each later
    /// failure (a start begun after the last one was known) counts.
    #[tokio::test(start_paused = true)]
    async fn failures_of_one_moment_count_once() {
        let c = Circuit::new("t", 5, Duration::from_secs(10));
        let err = UpstreamError::Closed("connection refused".into());
        let together: Vec<Attempt> = (0..8).map(|_| c.admit().unwrap()).collect();
        tokio::time::advance(Duration::from_millis(2)).await;
        for a in together {
            c.failure(a, &err);
        }
        assert_eq!(c.failures().0, 1);
        assert!(!c.is_open());
        for n in 2..=4 {
            tokio::time::advance(Duration::from_millis(100)).await;
            let a = c.admit().unwrap();
            let b = c.admit().unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
            c.failure(a, &err);
            c.failure(b, &err);
            assert_eq!(c.failures().0, n);
        }
        assert!(!c.is_open());
    }

    /// An upstream back within a second of a crash loop opening the circuit is used within
    /// about a second: the probe after the first wait succeeds and closes it.
    #[tokio::test(start_paused = true)]
    async fn an_upstream_back_soon_is_used_soon() {
        let c = Circuit::new("t", 2, Duration::from_secs(30));
        let err = UpstreamError::Closed("connection refused".into());
        for _ in 0..2 {
            let a = c.admit().unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
            c.failure(a, &err);
        }
        let opened = Instant::now();
        // The upstream comes back 900 ms after the circuit opened.
        let back = opened + Duration::from_millis(900);
        loop {
            match c.admit() {
                Ok(probe) if Instant::now() >= back => {
                    c.success(probe);
                    break;
                }
                Ok(probe) => c.failure(probe, &err),
                Err(UpstreamError::CircuitOpen { retry_in, .. }) => {
                    tokio::time::advance(retry_in).await;
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        assert!(!c.is_open());
        let used = Instant::now() - opened;
        assert!(
            used <= Duration::from_millis(1_750),
            "used {used:?} after opening"
        );
    }

    /// The gateway's own shortage (EMFILE) says nothing of the upstream: it is not counted,
    /// and a probe that met it gives its turn back.
    #[tokio::test(start_paused = true)]
    async fn the_gateways_own_shortage_is_not_the_upstreams_failure() {
        let c = Circuit::new("t", 1, Duration::from_secs(10));
        let a = c.admit().unwrap();
        c.neutral(a);
        assert_eq!(c.failures().0, 0);
        let a = c.admit().unwrap();
        c.failure(a, &UpstreamError::Closed("refused".into()));
        assert!(c.is_open());
        tokio::time::advance(FIRST_PROBE).await;
        let probe = c.admit().unwrap();
        c.neutral(probe);
        let probe = c.admit().expect("the probe's turn was given back");
        c.success(probe);
        assert!(!c.is_open());
        let emfile = std::io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        assert!(gateway_exhausted(&emfile));
        let enoent = std::io::Error::from_raw_os_error(nix::errno::Errno::ENOENT as i32);
        assert!(!gateway_exhausted(&enoent));
    }
}
