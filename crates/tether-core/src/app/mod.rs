//! Wiring: the only module that knows every other one. Opens the store, builds the
//! session registry and the front door, serves until the shutdown future resolves, then
//! drains in-flight requests under the grace period and stops every upstream: [`run`] is
//! `start`, `serve`, `stop`. `build.rs` builds one server's parts, `reload.rs` applies
//! reloads, `secrets.rs` keeps the state dir's secrets and lock, `stores.rs` opens the
//! stores.
//!
//! Must not: hold request logic: it wires the parts and owns their tasks and shutdown.

mod build;
mod reload;
mod secrets;
mod stores;

use build::{Builder, check_startable, self_upstreams, served};
use reload::{ReloadSources, ignore_hangups, run_reloads};
pub use secrets::{ADMIN_TOKEN_FILE, BRIDGE_KEY_FILE};
use secrets::{lock_state_dir, resolve_admin_token, state_key};
use stores::{open_stores, raise_fd_limit};

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admin::{self, AdminState};
use crate::auth::{KeyRing, Keys};
use crate::config::Config;
use crate::config::{LedgerSpec, ServersSource, StoreSpec};
use crate::front::{self, FrontConfig, ModernConfig};
use crate::hub::{Generation, Hub};
use crate::ledger::{self, Ledger};
use crate::listener::{self, ListenerLimits};
use crate::metrics::Metrics;
use crate::servers::{ServerEntry, ServerSettings};
use crate::session::admission::{Admission, AdmissionConfig};
use crate::session::quota::Quotas;
use crate::session::subscriptions::{SubscriptionBudget, SubscriptionLimits};
use crate::session::{Common, Registry, SessionConfig};
use crate::store::postgres::PostgresLedger;
use crate::store::redis::{RedisOptions, RedisStore};
use crate::store::sqlite::SqliteStore;
use crate::store::{Coordinator, LedgerStore, LiveStore};
use crate::upstream::{Connector, UpstreamLimits};

/// Runs the gateway. `shim` is the `tether` executable used to supervise stdio children;
/// `on_ready` is called with the bound MCP and admin addresses once both accept connections.
pub async fn run(
    config: Config,
    shim: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr, SocketAddr),
) -> anyhow::Result<()> {
    let mut gateway = start(config, shim).await?;
    on_ready(gateway.addr, gateway.admin_addr);
    gateway.serve(shutdown).await?;
    gateway.stop().await;
    Ok(())
}

/// A started gateway: both listeners accepting, every background task running, and what
/// stopping them in order needs.
struct Running {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown_grace: Duration,
    hub: Hub,
    coordinator: Option<Arc<dyn Coordinator>>,
    tracker: TaskTracker,
    server: tokio::task::JoinHandle<()>,
    stop_accepting: CancellationToken,
    drop_connections: CancellationToken,
    upkeep_stop: CancellationToken,
    prune_stop: CancellationToken,
    admin_stop: CancellationToken,
    admin_server: tokio::task::JoinHandle<()>,
    ledger_stop: CancellationToken,
    ledger_task: tokio::task::JoinHandle<()>,
    /// Held for the life of the process; the kernel drops it when the process dies.
    _state_lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// Checks what the first session would meet, opens the stores, binds both listeners and
/// starts every server's registry and the background tasks.
async fn start(config: Config, shim: Option<PathBuf>) -> anyhow::Result<Running> {
    let tracker = TaskTracker::new();
    let metrics = Arc::new(Metrics::default());
    // Said once at start rather than discovered by the first client: readiness knows the
    // same thing, but nobody reads it before something is already broken.
    for (name, spec) in served(&config) {
        check_startable(&name, &spec, config.require_upstream).await?;
    }
    let listen = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listen.local_addr()?;
    let me = crate::servers::GatewayAddr::listening(addr);
    let loops = self_upstreams(&me, served(&config).iter().map(|(n, s)| (n.as_str(), s)));
    anyhow::ensure!(
        loops.is_empty(),
        "{} (the gateway listens on {addr}): every request would call the gateway again; point it at the real server",
        loops.join("; ")
    );
    // Made private before anything is written into it (session ids, secrets).
    crate::state_dir::prepare(&config.state_dir).with_context(|| {
        format!(
            "cannot open the session store: cannot create the state dir {}",
            config.state_dir.display()
        )
    })?;
    let uses_state_dir =
        matches!(config.store, StoreSpec::Sqlite) || matches!(config.ledger, LedgerSpec::Sqlite);
    let _state_lock = if uses_state_dir {
        Some(lock_state_dir(&config.state_dir, addr)?)
    } else {
        None
    };
    let stores = open_stores(&config, addr, &metrics).await?;
    let store = stores.live.clone();
    match store.count_live().await {
        Ok(live) => tracing::info!(
            sessions = live,
            store = %store.describe(),
            ledger = %stores.ledger_name,
            "{live} sessions were live before and will resume on contact"
        ),
        Err(e) => {
            tracing::warn!(error = %e, store = %store.describe(), "the live store does not answer yet; new sessions get 503 until it does")
        }
    }
    let (ledger, ledger_rx) = Ledger::new(metrics.clone());
    let ledger_stop = CancellationToken::new();
    let ledger_task = tokio::spawn(ledger::run_writer(
        ledger_rx,
        stores.ledger.clone() as Arc<dyn ledger::LedgerSink>,
        metrics.clone(),
        ledger_stop.clone(),
    ));
    let keys = Arc::new(KeyRing::new(
        Keys::new(&config.keys).map_err(|e| anyhow::anyhow!(e.join("; ")))?,
    ));
    let limits = &config.limits;
    raise_fd_limit(
        limits.max_connections + limits.admin_max_connections,
        limits.max_upstreams,
        served(&config)
            .iter()
            .any(|(_, spec)| matches!(spec, crate::upstream::UpstreamSpec::Stdio { .. })),
    );
    let common = Common {
        store: store.clone(),
        coordinator: stores.coordinator.clone(),
        tracker: tracker.clone(),
        metrics: metrics.clone(),
        ledger,
        quotas: Arc::new(Quotas::new(
            limits.quota_tool_calls,
            stores.coordinator.clone(),
        )),
        subscriptions: Arc::new(SubscriptionBudget::new(SubscriptionLimits {
            per_session: limits.max_subscriptions,
            per_principal: limits.max_subscriptions_per_principal,
        })),
        admission: Admission::new(AdmissionConfig {
            max_sessions: limits.max_sessions,
            max_per_principal: limits.max_sessions_per_principal,
            rate: limits.session_rate,
            burst: limits.session_burst,
        }),
        siblings: crate::session::Siblings::default(),
    };
    let front = FrontConfig {
        keys: keys.clone(),
        max_body: config.max_body,
        body_timeout: limits.body_timeout,
        allowed_origins: config.allowed_origins.clone(),
        allowed_hosts: config.allowed_hosts.clone(),
        loopback_listener: addr.ip().is_loopback(),
        keepalive: config.keepalive,
        takeover_wait: match &config.store {
            StoreSpec::Redis { instance_ttl, .. } => *instance_ttl + Duration::from_secs(2),
            StoreSpec::Sqlite => Duration::ZERO,
        },
        modern: ModernConfig {
            state_key: state_key(&config, stores.coordinator.as_deref()).await?,
            instance: stores
                .coordinator
                .as_ref()
                .map_or_else(crate::ids::new_instance_id, |c| c.me().id.clone()),
            state_ttl: config.upstream_timeout,
        },
        server: None,
        users: Arc::default(),
    };
    let builder = Arc::new(Builder {
        me,
        multi: config.servers_source.is_some() || config.servers.len() > 1,
        gateway_upstreams: Arc::new(tokio::sync::Semaphore::new(limits.max_upstreams)),
        mirror_ledger: !stores.shared,
        config: config.clone(),
        shim,
        common,
        front,
    });
    let hub = Hub::new(metrics.clone());
    if config.servers.is_empty() {
        hub.install(&config.upstream_name, builder.build(None));
    } else {
        for e in &config.servers {
            hub.install(&e.name, builder.build(Some(e)));
        }
    }
    if !keys.get().enabled() {
        for e in &config.servers {
            if e.settings.users.is_some() {
                tracing::warn!(server = %e.name, "tether.users is set but no API keys are configured: every client is the anonymous user, so only a list naming \"anonymous\" lets anyone in");
            }
        }
    }
    let mcp_listener = listen;
    if !addr.ip().is_loopback() && !keys.get().enabled() {
        tracing::warn!(
            listen = %addr,
            "listening beyond loopback without authentication: anyone who can reach this address can use the upstream"
        );
    }
    if let Some(c) = &stores.coordinator {
        // Beat once before accepting: a session created here must never look orphaned
        // (owner without a heartbeat) to the other instances.
        match c.heartbeat().await {
            Ok(_) => {
                tracing::info!(instance = %c.me().id, advertise = %c.me().url, "joined the deployment")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach Redis at start; new sessions get 503 until it answers")
            }
        }
    }
    let upkeep_stop = CancellationToken::new();
    if let (StoreSpec::Redis { instance_ttl, .. }, Some(c)) = (&config.store, &stores.coordinator) {
        // Five beats per TTL: a few missed beats (a slow Redis, a busy machine) do not
        // make other instances take this one's sessions.
        let every = (*instance_ttl / 5).max(Duration::from_millis(200));
        let hub = hub.clone();
        tracker.spawn(
            crate::session::run_coordination(c.clone(), every, upkeep_stop.clone(), move || {
                hub.registries()
            })
            .instrument(tracing::info_span!("coordination")),
        );
    }
    // Pooled members of an earlier process: no client can name them (issue 26: they
    // stayed live after every restart).
    if let Some(r) = hub.registries().first() {
        let closed = r.close_stale_pooled().await;
        if closed > 0 {
            tracing::info!(
                sessions = closed,
                "closed the pooled sessions (2026-07-28 clients) of the earlier process"
            );
        }
    }
    if builder.multi {
        // Each server reaps its own; this reaps the servers none serves any more.
        let hub = hub.clone();
        tracker.spawn(
            crate::session::run_orphan_reaping(
                move || hub.registries(),
                config.idle_timeout,
                upkeep_stop.clone(),
            )
            .instrument(tracing::info_span!("reap_orphans")),
        );
    }
    tracker.spawn(
        crate::session::run_log_pruning(
            store.clone(),
            SessionConfig::default().event_retention,
            upkeep_stop.clone(),
        )
        .instrument(tracing::info_span!("prune_events")),
    );
    if config.servers_source.is_some() || config.keys_file.is_some() {
        tracker.spawn(
            run_reloads(
                hub.clone(),
                builder.clone(),
                ReloadSources {
                    servers: config.servers_source.clone(),
                    keys: config.keys_file.clone(),
                },
                upkeep_stop.clone(),
            )
            .instrument(tracing::info_span!("reload")),
        );
    } else {
        // `systemctl reload` (or a stray hangup) must not kill a gateway that has nothing to
        // reload: SIGHUP's default action is to exit.
        tracker.spawn(ignore_hangups(upkeep_stop.clone()));
    }
    let admin_token = resolve_admin_token(&config)?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_app = admin::router(AdminState {
        hub: hub.clone(),
        quotas: builder.common.quotas.clone(),
        store: store.clone(),
        ledger: stores.ledger.clone(),
        coordinator: stores.coordinator.clone(),
        metrics: metrics.clone(),
        keys: keys.clone(),
        token: admin_token.secret.clone(),
        token_hint: admin_token.hint.clone(),
        started: std::time::Instant::now(),
        instance: addr.to_string(),
        allowed_hosts: config.allowed_hosts.clone(),
        loopback_listener: admin_addr.ip().is_loopback(),
    });
    let admin_stop = CancellationToken::new();
    let admin_server = tokio::spawn(listener::serve(
        admin_listener,
        admin_app,
        ListenerLimits {
            name: "admin",
            max_connections: limits.admin_max_connections,
            max_per_addr: limits.admin_max_connections,
            header_timeout: limits.header_timeout,
            write_timeout: limits.write_timeout,
        },
        metrics.clone(),
        admin_stop.clone(),
        admin_stop.clone(),
    ));
    tracing::info!(admin = %admin_addr, "admin API, metrics and dashboard on http://{admin_addr}/");
    let prune_stop = CancellationToken::new();
    tracker.spawn(
        crate::session::run_ledger_pruning(
            stores.ledger.clone(),
            config.retention,
            prune_stop.clone(),
        )
        .instrument(tracing::info_span!("ledger_pruning")),
    );

    let stop_accepting = CancellationToken::new();
    let drop_connections = CancellationToken::new();
    let server = tokio::spawn(listener::serve(
        mcp_listener,
        hub.router(),
        ListenerLimits {
            name: "mcp",
            max_connections: limits.max_connections,
            max_per_addr: limits.max_connections_per_addr,
            header_timeout: limits.header_timeout,
            write_timeout: limits.write_timeout,
        },
        metrics.clone(),
        stop_accepting.clone(),
        drop_connections.clone(),
    ));
    let auth = if config.keys.is_empty() {
        "off: every client is anonymous (add API keys with `tether keys add`)".to_owned()
    } else {
        let users: std::collections::BTreeSet<&str> =
            config.keys.iter().map(|k| k.user.as_str()).collect();
        format!("{} API keys of {} users", config.keys.len(), users.len())
    };
    if builder.multi {
        for (name, g) in hub.current() {
            tracing::info!(
                server = %name,
                upstream = %g.registry.connector().spec().describe(),
                "serving {name} on http://{addr}/servers/{name}/mcp"
            );
        }
        tracing::info!(
            listen = %addr,
            servers = hub.current().len(),
            auth = %auth,
            store = %store.describe(),
            ledger = %stores.ledger_name,
            "tether ready on http://{addr}/servers/NAME/mcp"
        );
    } else {
        tracing::info!(
            listen = %addr,
            upstream.name = %config.upstream_name,
            upstream = %config.upstream.describe(),
            auth = %auth,
            store = %store.describe(),
            ledger = %stores.ledger_name,
            "tether ready on http://{addr}/mcp"
        );
    }
    Ok(Running {
        addr,
        admin_addr,
        shutdown_grace: config.shutdown_grace,
        hub,
        coordinator: stores.coordinator.clone(),
        tracker,
        server,
        stop_accepting,
        drop_connections,
        upkeep_stop,
        prune_stop,
        admin_stop,
        admin_server,
        ledger_stop,
        ledger_task,
        _state_lock,
    })
}

impl Running {
    /// Serves until `shutdown` resolves; an error when the MCP listener itself stopped (the
    /// gateway then exits without [`Running::stop`], which would wait on that listener).
    async fn serve(&mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::select! {
            _ = shutdown => Ok(()),
            res = &mut self.server => {
                res.context("server task failed")?;
                anyhow::bail!("the MCP listener stopped");
            }
        }
    }

    /// Stops in order: no new connections, in-flight requests get the grace period, then
    /// the remaining streams end (resumable after a restart), the instance leaves the
    /// deployment, and the admin listener, the ledger writer and every task stop.
    async fn stop(self) {
        tracing::info!(grace = ?self.shutdown_grace, "shutting down: no new connections; in-flight requests may finish");
        self.upkeep_stop.cancel();
        for r in self.hub.registries() {
            r.begin_shutdown();
        }
        self.stop_accepting.cancel();
        let mut server = self.server;
        if tokio::time::timeout(self.shutdown_grace, &mut server)
            .await
            .is_err()
        {
            tracing::warn!(
                "shutdown grace over; ending the remaining streams (clients can resume them after restart)"
            );
            for r in self.hub.registries() {
                r.finish_shutdown().await;
            }
            self.drop_connections.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        }
        for r in self.hub.registries() {
            r.finish_shutdown().await;
        }
        if let Some(c) = &self.coordinator {
            c.leave().await;
        }
        self.prune_stop.cancel();
        self.admin_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.admin_server).await;
        self.ledger_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.ledger_task).await;
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(3), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some background tasks did not stop in time");
        }
        tracing::info!("stopped; sessions stay resumable");
    }
}
