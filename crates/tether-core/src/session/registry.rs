//! The session map: its construction and accessors, single-flight lookup by id, creation
//! (`initialize`, the 2024-11-05 `/sse` opening), eviction, and what the admin API asks of
//! held sessions.
//!
//! One map per server (`Registry::of_server` with the process's `Common`): single-flight
//! `get`, `initialize` (admission slot, upstream start, durable record before
//! the id leaves), the 2024-11-05 `/sse` opening, eviction, upstream states for the admin
//! API, `holds`/`drain` for the hub.
//!
//! Must not: talk HTTP, or start an upstream except through `Shared::start_upstream`.

use super::*;

impl Registry {
    /// Creates a session from a client's `initialize`: starts an upstream, forwards the
    /// handshake, records the session durably, and returns it with the response to send.
    /// An upstream failure is a JSON-RPC error response and creates nothing.
    pub async fn initialize(
        &self,
        env: &Message,
        transport: Transport,
        legacy_id: Option<String>,
        principal: &Principal,
        client: Option<IpAddr>,
    ) -> Result<(Option<Arc<Session>>, Value), SessionError> {
        let sh = &self.shared;
        let client_id = env.id().cloned().unwrap_or(Value::Null);
        sh.admission
            .check_rate(&principal.id, client)
            .map_err(|r| self.refused(r))?;
        let slot = sh
            .admission
            .reserve(&principal.id)
            .map_err(|r| self.refused(r))?;
        let Some(params) = env.params_value().filter(Value::is_object) else {
            let f = Failure::new(
                FailureKind::InvalidParams,
                "initialize needs params",
                Retry::Never,
            );
            return Ok((None, f.response(client_id)));
        };
        // Stored with the record and replayed to every fresh upstream: a client must not
        // make the gateway keep (and log, and write) megabytes per session (issue 26: a
        // 4 MB `clientInfo.name` cost 8 MB of memory and 9 MB of database per session).
        let size = protocol::encoded_len(&params);
        if size > sh.cfg.max_initialize {
            return Err(self.refused(
                Failure::new(
                    FailureKind::InvalidParams,
                    format!(
                        "initialize params of {size} bytes are over the gateway's {} byte limit (--max-initialize)",
                        sh.cfg.max_initialize
                    ),
                    Retry::Never,
                )
                .with("limit", "max-initialize")
                .with("max", sh.cfg.max_initialize)
                .with("bytes", size),
            ));
        }
        let id = legacy_id.unwrap_or_else(new_session_id);
        let span = tracing::info_span!("session", session.id = %crate::ids::shown(&id), upstream.name = %sh.cfg.upstream_name);
        async {
            let Started {
                link,
                rx,
                result,
                early,
            } = match sh.start_upstream(&id, &params).await {
                Ok(x) => x,
                Err(UpstreamError::Rejected(err)) => {
                    return Ok((
                        None,
                        json!({"jsonrpc": "2.0", "id": client_id, "error": err}),
                    ));
                }
                Err(e) => {
                    let failure = Failure::unavailable(&sh.cfg.upstream_name, &e);
                    if refuses_start(&e) {
                        return Err(self.refused(failure));
                    }
                    sh.metrics.upstream_failures.inc();
                    tracing::debug!(error = %e, "cannot start upstream for a new session");
                    return Ok((None, failure.response(client_id)));
                }
            };
            *sh.upstream_init.lock().unwrap_or_else(|p| p.into_inner()) = Some(result.clone());
            let now = now_ms();
            let info = params.get("clientInfo");
            // Kept in the ledger and shown: cut like every client string.
            let text = |k: &str| {
                info.and_then(|i| i.get(k))
                    .and_then(Value::as_str)
                    .map(|s| crate::log_limit::cut(s, crate::log_limit::MAX_KEPT).into_owned())
            };
            let record = SessionRecord {
                id: id.clone(),
                principal: principal.id.clone(),
                principal_email: principal.email.clone(),
                principal_name: principal.name.clone(),
                client_type: policy::client_type(text("name").as_deref()).to_owned(),
                created_ms: now,
                last_active_ms: now,
                protocol_version: result
                    .get("protocolVersion")
                    .and_then(Value::as_str)
                    .unwrap_or(protocol::DEFAULT_VERSION)
                    .to_owned(),
                init_params: params.clone(),
                client_name: text("name"),
                client_version: text("version"),
                upstream_name: sh.cfg.upstream_name.clone(),
                upstream_fingerprint: Some(sh.cfg.upstream_fingerprint.clone()),
                transport: transport.as_str().to_owned(),
                state: SessionState::Live,
                close_reason: None,
                closed_ms: None,
                restore: json!({}),
            };
            sh.metrics.upstream_starts.inc();
            let write = sh
                .store
                .create_session(record.clone())
                .instrument(tracing::info_span!(
                    "store.write",
                    store.op = "create_session"
                ));
            if let Err(e) = write.await {
                link.shutdown(true);
                tracing::error!(error = %e, "cannot record new session");
                return Err(SessionError::Store(e));
            }
            crate::fault::point(crate::fault::points::SESSION_RECORDED);
            if sh.cfg.mirror_ledger {
                sh.ledger
                    .record(LedgerEvent::Opened(Box::new(record.clone())));
            }
            let standalone = match transport {
                Transport::LegacySse => self.take_legacy_stream(&id),
                Transport::Streamable | Transport::Pooled => None,
            }
            .unwrap_or_else(|| {
                Arc::new(Stream::new(
                    id.as_str().into(),
                    STANDALONE_STREAM.into(),
                    1,
                    transport == Transport::Streamable,
                ))
            });
            let session = Session::new(sh.clone(), record, transport, standalone, slot);
            let link = Arc::new(link);
            let generation = session
                .install(link.clone())
                .expect("a session nobody else has seen yet is open");
            session.spawn_pump(generation, rx, early);
            self.insert(&session);
            sh.metrics.sessions_created.inc();
            sh.metrics
                .server_sessions_created
                .get_or_create(&Metrics::server(&sh.cfg.upstream_name))
                .inc();
            tracing::info!(
                principal = %session.record.principal,
                client.name = session.record.client_name.as_deref().unwrap_or("unknown"),
                "client.type" = %session.record.client_type,
                protocol.version = %session.record.protocol_version,
                upstream = %link.describe(),
                "session created"
            );
            let mut result = result;
            if session.gateway_owns_tasks()
                && let Some(caps) = result
                    .get_mut("capabilities")
                    .and_then(Value::as_object_mut)
            {
                caps.insert("tasks".into(), tasks::capability());
            }
            Ok((
                Some(session),
                json!({"jsonrpc": "2.0", "id": client_id, "result": result}),
            ))
        }
        .instrument(span)
        .await
    }

    pub(super) fn insert(&self, session: &Arc<Session>) {
        let cell = Arc::new(OnceCell::new_with(Some(session.clone())));
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.id.to_string(), cell);
        self.count_held();
    }

    pub(super) fn count_held(&self) {
        let sh = &self.shared;
        let now = self.held_count() as i64;
        sh.metrics
            .server_sessions_held
            .get_or_create(&Metrics::server(&sh.cfg.upstream_name))
            .set(now);
        // The gateway-wide gauge is the sum over servers: each adds its change.
        let before = sh.held_reported.swap(now, Ordering::Relaxed);
        sh.metrics.sessions_held.inc_by(now - before);
    }

    /// Sessions this process holds in memory (being loaded included).
    pub fn held_count(&self) -> usize {
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Finds `principal`'s session, rehydrating it from the store if this process does not
    /// hold it. Another principal's session is reported exactly like an unknown one.
    pub async fn get(&self, id: &str, principal: &Principal) -> Result<Arc<Session>, SessionError> {
        if !policy::plausible_session_id(id) {
            return Err(SessionError::NotFound);
        }
        let cell = {
            let mut map = self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.entry(id.to_owned())
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        let result = cell
            .get_or_try_init(|| self.load(id, principal))
            .await
            .cloned();
        if result.is_err() {
            let mut map = self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if map
                .get(id)
                .is_some_and(|c| Arc::ptr_eq(c, &cell) && !c.initialized())
            {
                map.remove(id);
            }
        }
        let session = result?;
        self.count_held();
        // A pooled session's id is never given to a client: it is unknown to all of them.
        if session.is_closed()
            || session.record.principal != principal.id
            || session.transport == Transport::Pooled
        {
            return Err(SessionError::NotFound);
        }
        Ok(session)
    }

    pub(super) async fn load(
        &self,
        id: &str,
        principal: &Principal,
    ) -> Result<Arc<Session>, SessionError> {
        let span = tracing::info_span!(
            parent: None, "session", session.id = %crate::ids::shown(id), upstream.name = %self.shared.cfg.upstream_name
        );
        self.load_inner(id, principal, span.clone())
            .instrument(span)
            .await
    }

    /// Ends a session for good (DELETE, idle timeout, operator).
    pub async fn close(&self, session: &Arc<Session>, reason: &str) {
        session.close(reason).await;
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&*session.id);
        self.count_held();
    }

    /// Every session this process holds (loaded, not being loaded).
    pub(super) fn held(&self) -> Vec<Arc<Session>> {
        let map = self
            .shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.values().filter_map(|c| c.get().cloned()).collect()
    }

    /// Upstream state of every session this process holds: id → `up`, `down`, `backoff`
    /// or `idle` (not started since the session was loaded).
    pub fn upstream_states(&self) -> HashMap<String, &'static str> {
        let sessions = self.held();
        sessions
            .iter()
            .map(|s| (s.id.to_string(), s.upstream_state()))
            .collect()
    }

    /// Closes every session held here whose principal `revoked` names (reason `revoked`):
    /// a reload took the user off this server's `users`, or took away its every key. Its
    /// next request is refused at the front door (403 or 401); this ends what it holds, and
    /// its calls in flight get the session-closed error. Returns how many were closed.
    pub async fn revoke(&self, revoked: impl Fn(&str) -> bool) -> usize {
        let theirs: Vec<Arc<Session>> = self
            .held()
            .into_iter()
            .filter(|s| revoked(&s.record.principal))
            .collect();
        for s in &theirs {
            self.close(s, "revoked").await;
        }
        theirs.len()
    }

    /// Ends a session on an operator's request (reason `evicted`), whether this process
    /// holds it or it is only in the store. Returns whether a live session was found.
    pub async fn evict(&self, id: &str) -> Result<bool, SessionError> {
        let held = {
            let map = self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.get(id).and_then(|c| c.get().cloned())
        };
        if let Some(s) = held {
            if s.is_closed() {
                return Ok(false);
            }
            self.close(&s, "evicted").await;
            return Ok(true);
        }
        match self.shared.store.load_session(id).await? {
            Some(r) if r.state == SessionState::Live => {
                let owner = match &self.shared.coordinator {
                    Some(c) => c.owners(&[id.to_owned()]).await?.pop().flatten(),
                    None => None,
                };
                self.shared.close_stored(id, "evicted").await?;
                if let (Some(c), Some(owner)) = (&self.shared.coordinator, owner)
                    && owner != c.me().id
                {
                    c.send_drop(&owner, id).await?;
                }
                self.shared.metrics.closed("evicted");
                tracing::info!(session.id = %crate::ids::shown(id), reason = "evicted", "session closed");
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Opens a 2024-11-05 `/sse` stream: a session id reserved until the client's
    /// `initialize` arrives on the POST endpoint.
    pub fn legacy_open(&self, principal: &Principal) -> (String, StreamHandle) {
        let id = new_session_id();
        let stream = Arc::new(Stream::new(
            id.as_str().into(),
            STANDALONE_STREAM.into(),
            1,
            false,
        ));
        let (rx, _) = stream.attach(self.shared.cfg.stream_buffer);
        self.shared
            .legacy_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                LegacyPending {
                    stream: stream.clone(),
                    opened: Instant::now(),
                    principal: principal.id.clone(),
                },
            );
        let handle = StreamHandle {
            stream_id: stream.id().clone(),
            deferred: None,
            priming: false,
            retry: self.shared.cfg.sse_retry,
            replay: Vec::new(),
            live: Some(rx),
            ends_with_response: false,
            stop: self.shared.stopping.clone(),
        };
        (id, handle)
    }

    /// Whether `id` is a `/sse` connection of `principal` still waiting for `initialize`.
    /// Another principal's stream is not (it gets the 404 of an unknown session).
    pub fn legacy_pending(&self, id: &str, principal: &Principal) -> bool {
        self.shared
            .legacy_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|p| p.principal == principal.id)
    }

    pub(super) fn take_legacy_stream(&self, id: &str) -> Option<Arc<Stream>> {
        self.shared
            .legacy_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .map(|p| p.stream)
    }

    /// Delivers the answer to a 2024-11-05 `initialize` on the session's SSE stream.
    pub async fn legacy_initialize(
        &self,
        id: &str,
        env: &Message,
        principal: &Principal,
        client: Option<IpAddr>,
    ) -> Result<(), SessionError> {
        let stream = self
            .shared
            .legacy_pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .filter(|p| p.principal == principal.id)
            .map(|p| p.stream.clone())
            .ok_or(SessionError::NotFound)?;
        let (_, response) = self
            .initialize(
                env,
                Transport::LegacySse,
                Some(id.to_owned()),
                principal,
                client,
            )
            .await?;
        stream.push(
            self.shared.store.as_ref(),
            &Message::ours(response),
            false,
            None,
        );
        Ok(())
    }
}

impl Registry {
    /// Creates the registry. `tracker` owns every task it spawns.
    pub fn new(
        cfg: SessionConfig,
        store: Arc<dyn LiveStore>,
        coordinator: Option<Arc<dyn Coordinator>>,
        connector: Connector,
        tracker: TaskTracker,
        metrics: Arc<Metrics>,
        ledger: Ledger,
    ) -> Registry {
        let admission = Admission::new(cfg.admission.clone());
        let quotas = Arc::new(quota::Quotas::new(cfg.quota, coordinator.clone()));
        Registry::build(
            cfg,
            &Common {
                store,
                coordinator,
                tracker,
                metrics,
                ledger,
                quotas,
                subscriptions: Arc::new(subscriptions::SubscriptionBudget::new(
                    subscriptions::SubscriptionLimits::default(),
                )),
                admission: admission.clone(),
                siblings: Siblings::default(),
            },
            connector,
            admission,
        )
    }

    /// The registry of the one server of this process: the gateway's counts are its own.
    pub fn with_common(cfg: SessionConfig, common: &Common, connector: Connector) -> Registry {
        Registry::build(cfg, common, connector, common.admission.clone())
    }

    /// The registry of one server among several of this process (`cfg.upstream_name`):
    /// its own sessions, upstreams and limits (`cfg.admission`, counted in the gateway's
    /// too), everything else shared.
    pub fn of_server(cfg: SessionConfig, common: &Common, connector: Connector) -> Registry {
        let admission = Admission::for_server(
            cfg.admission.clone(),
            &cfg.upstream_name,
            common.admission.clone(),
        );
        Registry::build(cfg, common, connector, admission)
    }

    pub(super) fn build(
        cfg: SessionConfig,
        common: &Common,
        connector: Connector,
        admission: Arc<Admission>,
    ) -> Registry {
        let c = common.clone();
        let registry = Registry {
            shared: Arc::new(Shared {
                cfg,
                store: c.store,
                coordinator: c.coordinator,
                metrics: c.metrics,
                ledger: c.ledger,
                connector,
                admission,
                quotas: c.quotas,
                subscriptions: c.subscriptions,
                held_reported: std::sync::atomic::AtomicI64::new(0),
                draining: std::sync::atomic::AtomicBool::new(false),
                siblings: c.siblings.clone(),
                sessions: Mutex::new(HashMap::new()),
                legacy_pending: Mutex::new(HashMap::new()),
                next_upstream_id: AtomicU64::new(1),
                next_server_request: AtomicU64::new(1),
                pool: Mutex::new(HashMap::new()),
                upstream_init: Mutex::new(None),
                stateless: Mutex::new(HashMap::new()),
                listeners: Mutex::new(HashMap::new()),
                tasks: Mutex::new(HashMap::new()),
                tracker: c.tracker,
                stopping: CancellationToken::new(),
                stopped: CancellationToken::new(),
            }),
        };
        c.siblings.add(&registry.shared);
        registry
    }

    /// What this registry shares with the others of the process.
    #[cfg(test)]
    pub(super) fn common(&self) -> Common {
        let sh = &self.shared;
        Common {
            store: sh.store.clone(),
            coordinator: sh.coordinator.clone(),
            tracker: sh.tracker.clone(),
            metrics: sh.metrics.clone(),
            ledger: sh.ledger.clone(),
            quotas: sh.quotas.clone(),
            subscriptions: sh.subscriptions.clone(),
            admission: sh.admission.clone(),
            siblings: sh.siblings.clone(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn LiveStore> {
        &self.shared.store
    }

    /// The upstream connector (its circuit and running count, for health and metrics).
    pub fn connector(&self) -> &Connector {
        &self.shared.connector
    }

    /// Session counts and limits.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.shared.admission
    }

    /// The settings it was made with.
    pub fn config(&self) -> &SessionConfig {
        &self.shared.cfg
    }

    /// The server this registry serves (its upstream's configured name).
    pub fn server(&self) -> &str {
        &self.shared.cfg.upstream_name
    }

    /// Whether this process holds session `id` here.
    pub fn holds(&self, id: &str) -> bool {
        self.shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
            || self
                .shared
                .legacy_pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id)
    }

    /// A reload removed or replaced this server: from now on its reaper expires only the
    /// sessions it holds (the store's belong to the server's new registry, if any).
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    /// Whether [`Registry::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    /// The tool-call quota and each user's use of it as this instance last counted.
    pub fn quotas(&self) -> &quota::Quotas {
        &self.shared.quotas
    }

    pub(super) fn refused(&self, r: Failure) -> SessionError {
        let limit = r
            .field("limit")
            .and_then(Value::as_str)
            .unwrap_or(r.kind().as_str());
        self.shared.metrics.refused(limit);
        SessionError::Refused(r)
    }

    /// The metrics this registry updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }
}
