//! Upstream sessions held on behalf of stateless (2026-07-28) clients: the bridge.
//!
//! A modern client has no session, but a legacy upstream needs one (an `initialize`, and
//! for stdio a process). The gateway keeps a small pool of ordinary sessions
//! ([`Transport::Pooled`]) per principal and per client (capabilities and name), each initialized
//! from the `_meta` of the request that made it: calls are multiplexed on them with ids
//! rewritten, supervised and timed out exactly like a client session's. Two principals
//! never share an upstream (SEP-2567: server state must not cross them), nor do two
//! capability sets (they change what the upstream may ask of the client), nor two client
//! applications of one user (their records then name the right client in the ledger).
//!
//! A call goes to a member with nothing in flight, the pool grows to
//! [`SessionConfig::pool_size`] when all are busy, and past that the least-loaded member
//! takes it. Members are sessions like any other: they count against the principal's
//! session limit, expire when idle (the pool shrinks), and show in the admin API with
//! transport `pooled`.
//!
//! Must not: hand a pooled session's id to a client, or let one principal's call reach
//! another's member.

use super::*;

/// Notifications a `subscriptions/listen` stream may fall behind by.
pub const LISTEN_BUFFER: usize = 64;

/// Stateless clients this process remembers (the least recently seen is forgotten first).
pub const MAX_STATELESS_CLIENTS: usize = 1000;

/// `subscriptions/listen` streams one principal may hold open at once (each is a
/// connection and a receiver of its upstreams' notifications).
pub const MAX_LISTENS_PER_PRINCIPAL: usize = 32;

/// Client applications (name and capability sets) one principal's stateless requests may
/// keep pools for at once: each is a pool of up to `--pool-size` upstreams.
pub const MAX_POOLS_PER_PRINCIPAL: usize = 64;

/// A stateless client: principal id, client name, client version.
pub(super) type ClientKey = (String, String, String);

/// What this process saw of one stateless client.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientSeen {
    /// Principal (user) id.
    pub user_id: String,
    /// `clientInfo.name` (`unknown` when not sent).
    pub client_name: String,
    /// `clientInfo.version`.
    pub client_version: String,
    /// Detected client family.
    pub client_type: String,
    /// First request, ms since the Unix epoch.
    pub first_seen_ms: i64,
    /// Last request.
    pub last_seen_ms: i64,
    /// Requests (every method, MRTR retries included).
    pub requests: u64,
    /// `tools/call` requests.
    pub tool_calls: u64,
}

/// Principal id and capabilities key ([`crate::modern::Meta::capabilities_key`]).
pub(super) type Key = (String, String);

/// One principal's members for one capability set.
pub(super) struct Entry {
    members: Mutex<Vec<Arc<Session>>>,
    /// One growth at a time per key: two calls finding every member busy start one new
    /// member, not two.
    grow: tokio::sync::Mutex<()>,
}

impl Entry {
    /// A live member: with nothing in flight, or (`busy_ok`) the least loaded.
    fn pick(&self, busy_ok: bool) -> Option<Arc<Session>> {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.retain(|s| !s.is_closed());
        let (load, s) = members
            .iter()
            .map(|s| (s.in_flight(), s))
            .min_by_key(|(load, _)| *load)?;
        (load == 0 || busy_ok).then(|| s.clone())
    }

    fn len(&self) -> usize {
        self.members.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Registry {
    /// The upstream session that serves a modern request of `principal` whose client
    /// declared the capabilities `key` stands for; `init` is the `initialize` a new member
    /// is started with (from the request's `_meta`).
    pub async fn pooled(
        &self,
        principal: &Principal,
        key: String,
        init: &Value,
        client: Option<IpAddr>,
    ) -> Result<Arc<Session>, SessionError> {
        let entry = {
            let mut pool = self.shared.pool.lock().unwrap_or_else(|p| p.into_inner());
            let key = (principal.id.clone(), key);
            if !pool.contains_key(&key) {
                // A client that varies its name or capabilities on every request would
                // otherwise make a pool (and upstreams) per request.
                pool.retain(|_, e| e.len() > 0 || Arc::strong_count(e) > 1);
                let theirs = pool.keys().filter(|(p, _)| *p == principal.id).count();
                if theirs >= MAX_POOLS_PER_PRINCIPAL {
                    return Err(self.refused(Failure::over_limit(
                        "bridge-pools-per-user",
                        MAX_POOLS_PER_PRINCIPAL,
                        format!(
                            "this user's stateless requests hold upstream pools for {theirs} client applications (names and capability sets), the most allowed ({MAX_POOLS_PER_PRINCIPAL}); retry once some expire"
                        ),
                        Retry::Safe(Some(Duration::from_secs(5))),
                    )));
                }
            }
            pool.entry(key)
                .or_insert_with(|| {
                    Arc::new(Entry {
                        members: Mutex::new(Vec::new()),
                        grow: tokio::sync::Mutex::new(()),
                    })
                })
                .clone()
        };
        if let Some(s) = entry.pick(false) {
            return Ok(s);
        }
        let _grow = entry.grow.lock().await;
        if let Some(s) = entry.pick(false) {
            return Ok(s);
        }
        if entry.len() >= self.shared.cfg.pool_size.max(1)
            && let Some(s) = entry.pick(true)
        {
            return Ok(s);
        }
        let env = Message::request(Value::from(0), "initialize", Some(init.clone()));
        let started = self
            .initialize(&env, Transport::Pooled, None, principal, client)
            .await;
        match started {
            Ok((Some(s), _)) => {
                tracing::info!(session.id = %crate::ids::shown(&s.id), principal = %principal.id, "bridge: upstream session added to the pool");
                entry
                    .members
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(s.clone());
                Ok(s)
            }
            // A member that could not start (a limit, a rate, an upstream failure) is no
            // reason to refuse a call an existing member can take.
            other => entry.pick(true).ok_or_else(|| match other {
                Err(e) => e,
                Ok((_, answer)) => {
                    let message = answer
                        .pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("the upstream could not be started");
                    SessionError::Refused(Failure::new(
                        FailureKind::UpstreamUnavailable,
                        message.to_owned(),
                        Retry::Safe(Some(Duration::from_secs(1))),
                    ))
                }
            }),
        }
    }

    /// The coordinator of a multi-instance deployment, if any.
    pub fn coordinator(&self) -> Option<&Arc<dyn Coordinator>> {
        self.shared.coordinator.as_ref()
    }

    /// The `InitializeResult` the last upstream started gave (`None` before the first).
    pub fn upstream_init(&self) -> Option<Value> {
        self.shared
            .upstream_init
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets pool entries whose members all closed (the reaper calls it).
    pub(super) fn prune_pool(&self) {
        let mut pool = self.shared.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.retain(|_, e| {
            let mut m = e.members.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|s| !s.is_closed());
            !m.is_empty() || Arc::strong_count(e) > 1
        });
    }
}

impl Registry {
    /// Notes a request of a stateless client (`client_info` from its `_meta`).
    pub fn note_stateless(&self, principal: &Principal, client_info: Option<&Value>, method: &str) {
        let text = |k: &str| {
            client_info
                .and_then(|i| i.get(k))
                .and_then(Value::as_str)
                .map(|s| crate::log_limit::cut(s, 100).into_owned())
        };
        let name = text("name").unwrap_or_else(|| "unknown".into());
        let version = text("version").unwrap_or_default();
        let now = now_ms();
        let mut map = self
            .shared
            .stateless
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (principal.id.clone(), name.clone(), version.clone());
        if !map.contains_key(&key)
            && map.len() >= MAX_STATELESS_CLIENTS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, c)| c.last_seen_ms)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        let seen = map.entry(key).or_insert_with(|| ClientSeen {
            user_id: principal.id.clone(),
            client_type: policy::client_type(Some(&name)).to_owned(),
            client_name: name,
            client_version: version,
            first_seen_ms: now,
            last_seen_ms: now,
            requests: 0,
            tool_calls: 0,
        });
        seen.last_seen_ms = now;
        seen.requests += 1;
        if method == "tools/call" {
            seen.tool_calls += 1;
        }
    }

    /// A receiver of the list-changed notifications of `principal`'s pooled upstreams
    /// (a `subscriptions/listen` stream). Bounded: a listener that falls behind by more
    /// than [`LISTEN_BUFFER`] notifications misses the oldest (each only says "list again").
    /// At most [`MAX_LISTENS_PER_PRINCIPAL`] at once: over it, the refusal.
    pub fn listen(
        &self,
        principal: &Principal,
    ) -> Result<tokio::sync::broadcast::Receiver<Arc<Value>>, SessionError> {
        let mut map = self
            .shared
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.retain(|_, tx| tx.receiver_count() > 0);
        let tx = map
            .entry(principal.id.clone())
            .or_insert_with(|| tokio::sync::broadcast::channel(LISTEN_BUFFER).0);
        let open = tx.receiver_count();
        if open >= MAX_LISTENS_PER_PRINCIPAL {
            return Err(self.refused(Failure::over_limit(
                "listen-streams-per-user",
                MAX_LISTENS_PER_PRINCIPAL,
                format!(
                    "this user holds {open} subscriptions/listen streams open, the most allowed ({MAX_LISTENS_PER_PRINCIPAL}); close one first"
                ),
                Retry::Safe(Some(Duration::from_secs(1))),
            )));
        }
        Ok(tx.subscribe())
    }

    /// Cancelled when the gateway stops accepting (long-lived streams end).
    pub fn stopping(&self) -> CancellationToken {
        self.shared.stopping.clone()
    }

    /// Stateless clients this process has served, most recently seen first.
    pub fn stateless_clients(&self) -> Vec<ClientSeen> {
        let mut v: Vec<ClientSeen> = self
            .shared
            .stateless
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|c| std::cmp::Reverse(c.last_seen_ms));
        v
    }
}

impl Session {
    /// Hands a list-changed or resource-updated notification of a pooled upstream to its
    /// principal's listen streams (it concerns no call of any one client; each stream's
    /// filter keeps what it asked for). True when it was one.
    pub(super) fn to_listeners(&self, message: &Message) -> bool {
        let for_listeners = message.method_name().is_some_and(|m| {
            (m.starts_with("notifications/") && m.ends_with("/list_changed"))
                || m == "notifications/resources/updated"
        });
        if self.transport != Transport::Pooled || !for_listeners {
            return false;
        }
        let map = self
            .shared
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(&self.record.principal) {
            let _ = tx.send(Arc::new(message.to_value()));
        }
        true
    }

    /// Calls in flight (the pool's load measure).
    pub fn in_flight(&self) -> usize {
        self.lock().calls.len()
    }

    /// The client went away from the call answering on stream `stream` (a modern client
    /// closing its response stream cancels the request): the call is recorded as
    /// cancelled, the upstream is told to stop (`notifications/cancelled`), and its
    /// requests to the client that were never answered (`server_requests`, `tether-N`
    /// ids) are forgotten.
    pub fn abandon(self: &Arc<Self>, stream: &str, server_requests: &[String]) {
        let found = {
            let mut st = self.lock();
            for k in server_requests {
                st.calls.take_server_request(k);
            }
            st.calls.take_by_stream(stream)
        };
        let Some((uid, p)) = found else {
            return;
        };
        let cancelled = Failure::new(
            FailureKind::Cancelled,
            "the client closed the response stream; the request was cancelled",
            Retry::Never,
        );
        self.finish(p, |client_id| cancelled.reply(client_id));
        let Some((link, _)) = self.current_link() else {
            return;
        };
        self.shared.tracker.spawn(
            async move {
                link.send(Message::notification(
                    "notifications/cancelled",
                    Some(json!({"requestId": uid, "reason": "the client closed the response stream"})),
                ))
                .await;
            }
            .instrument(self.span()),
        );
    }
}
