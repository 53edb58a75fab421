//! Wiring: the only module that knows every other one. Opens the store, builds the
//! session registry and the front door, serves until the shutdown future resolves, then
//! drains in-flight requests under the grace period and stops every upstream.
//!
//! Must not: hold request logic: it wires the parts and owns their tasks and shutdown.

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
    // Held for the life of the process; the kernel drops it when the process dies.
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
            .any(|(_, spec)| matches!(spec, crate::config::UpstreamSpec::Stdio { .. })),
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
            state_key: bridge_key(&config, stores.coordinator.as_deref()).await?,
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
                "closed the 2026-07-28 bridge's pooled sessions of the earlier process"
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
    on_ready(addr, admin_addr);

    let mut server = server;
    tokio::select! {
        _ = shutdown => {}
        res = &mut server => {
            res.context("server task failed")?;
            anyhow::bail!("the MCP listener stopped");
        }
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: no new connections; in-flight requests may finish");
    upkeep_stop.cancel();
    for r in hub.registries() {
        r.begin_shutdown();
    }
    stop_accepting.cancel();
    if tokio::time::timeout(config.shutdown_grace, &mut server)
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown grace over; ending the remaining streams (clients can resume them after restart)"
        );
        for r in hub.registries() {
            r.finish_shutdown().await;
        }
        drop_connections.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    for r in hub.registries() {
        r.finish_shutdown().await;
    }
    if let Some(c) = &stores.coordinator {
        c.leave().await;
    }
    prune_stop.cancel();
    admin_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_server).await;
    ledger_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), ledger_task).await;
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(3), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some background tasks did not stop in time");
    }
    tracing::info!("stopped; sessions stay resumable");
    Ok(())
}

/// The servers a config names, with what each starts.
fn served(config: &Config) -> Vec<(String, crate::config::UpstreamSpec)> {
    if config.servers.is_empty() {
        vec![(config.upstream_name.clone(), config.upstream.clone())]
    } else {
        config
            .servers
            .iter()
            .map(|e| (e.name.clone(), e.upstream.clone()))
            .collect()
    }
}

/// The servers among `servers` whose upstream is the gateway `me` itself, each said with
/// what reaches it (its URL, or a `tether connect` to it): serve and reload refuse them.
fn self_upstreams<'a>(
    me: &crate::servers::GatewayAddr,
    servers: impl Iterator<Item = (&'a str, &'a crate::config::UpstreamSpec)>,
) -> Vec<String> {
    servers
        .filter_map(|(name, spec)| {
            me.reached_by(spec)
                .map(|what| format!("server {name:?} is this gateway itself ({what})"))
        })
        .collect()
}

/// Warns (or with `--require-upstream` fails) when a server's upstream cannot be started.
async fn check_startable(
    name: &str,
    spec: &crate::config::UpstreamSpec,
    required: bool,
) -> anyhow::Result<()> {
    if let Err(why) = crate::upstream::startable(spec).await {
        if required {
            anyhow::bail!("upstream {name:?} cannot be started: {why} (--require-upstream)");
        }
        tracing::warn!(
            upstream.name = %name,
            error = %why,
            "upstream cannot be started: new sessions will get -32010 and /health/ready reports it (--require-upstream makes this fatal)"
        );
    }
    Ok(())
}

/// Makes the registry and front door of one server (at start and on reload).
struct Builder {
    config: Config,
    /// Where this gateway listens: a server whose upstream is the gateway itself is refused.
    me: crate::servers::GatewayAddr,
    shim: Option<PathBuf>,
    common: Common,
    front: FrontConfig,
    /// Several servers (or a servers file that may gain some): each has its own limits
    /// inside the gateway's, and reaps only its own stored sessions.
    multi: bool,
    /// The gateway's `--max-upstreams`, shared by every server's connector.
    gateway_upstreams: Arc<tokio::sync::Semaphore>,
    mirror_ledger: bool,
}

impl Builder {
    /// A generation serving `entry` (`None`: the config's one upstream).
    fn build(&self, entry: Option<&ServerEntry>) -> Arc<Generation> {
        let config = &self.config;
        let limits = &config.limits;
        let (name, spec, settings) = match entry {
            Some(e) => (e.name.clone(), e.upstream.clone(), e.settings.clone()),
            None => (
                config.upstream_name.clone(),
                config.upstream.clone(),
                ServerSettings::default(),
            ),
        };
        // Validated when the file was read.
        let duration = |text: &Option<String>, default: Duration| {
            text.as_deref()
                .and_then(|t| humantime::parse_duration(t).ok())
                .unwrap_or(default)
        };
        let connector = Connector::new(
            spec.clone(),
            &name,
            self.shim.clone(),
            UpstreamLimits {
                max_message: limits.max_upstream_message,
                max_running: settings.max_upstreams.unwrap_or(limits.max_upstreams),
                stderr_lines_per_sec: limits.stderr_lines_per_sec,
                circuit_failures: limits.circuit_failures,
                circuit_cooldown: limits.circuit_cooldown,
            },
            self.common.tracker.clone(),
        );
        let cfg = SessionConfig {
            idle_timeout: duration(&settings.idle_timeout, config.idle_timeout),
            upstream_timeout: duration(&settings.upstream_timeout, config.upstream_timeout),
            answer_window: config.answer_window,
            upstream_name: name.clone(),
            upstream_fingerprint: spec.fingerprint(),
            mirror_ledger: self.mirror_ledger,
            stream_buffer: limits.stream_buffer,
            max_initialize: limits.max_initialize,
            pool_size: limits.bridge_pool_size,
            admission: AdmissionConfig {
                max_sessions: settings.max_sessions.unwrap_or(limits.max_sessions),
                // The gateway's count per user applies across servers.
                max_per_principal: usize::MAX,
                rate: settings.session_rate.unwrap_or(0),
                burst: settings.session_rate.unwrap_or(1).saturating_mul(2),
            },
            one_of_several: self.multi,
            ..SessionConfig::default()
        };
        let registry = if self.multi {
            let connector = connector.sharing(self.gateway_upstreams.clone(), limits.max_upstreams);
            Registry::of_server(cfg, &self.common, connector)
        } else {
            Registry::with_common(cfg, &self.common, connector)
        };
        self.common.tracker.spawn(
            registry
                .clone()
                .run_reaper()
                .instrument(tracing::info_span!("reaper", server = %name)),
        );
        let access = Arc::new(front::Access::new(settings.users));
        let router = front::router(
            registry.clone(),
            FrontConfig {
                server: Some(name),
                users: access.clone(),
                ..self.front.clone()
            },
        );
        Generation::new(entry.cloned(), registry, router, access)
    }
}

/// What a reload re-reads: the servers (a `--servers` file or the config's `[servers]`)
/// and the config file's keys.
#[derive(Clone)]
struct ReloadSources {
    servers: Option<ServersSource>,
    keys: Option<PathBuf>,
}

impl ReloadSources {
    /// The files whose change triggers a reload.
    fn paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .servers
            .iter()
            .map(|s| s.path().to_path_buf())
            .chain(self.keys.clone())
            .collect();
        v.dedup();
        v
    }
}

/// Re-reads the servers and the keys on SIGHUP and when their files change (checked every
/// 2 s), and stops the generations a reload left draining once they hold no session.
/// Until `stop`.
async fn run_reloads(
    hub: Hub,
    builder: Arc<Builder>,
    sources: ReloadSources,
    stop: CancellationToken,
) {
    let paths = sources.paths();
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the files are still watched");
            None
        }
    };
    // Off the runtime, bounded in time: a hung file system must not hold a worker.
    let modified = |paths: &[PathBuf]| {
        let paths = paths.to_vec();
        async move {
            crate::config::off_runtime(
                "reloaded files",
                crate::config::FILE_READ_TIMEOUT,
                move || {
                    paths
                        .iter()
                        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                        .collect::<Vec<_>>()
                },
            )
            .await
            .ok()
        }
    };
    let mut seen = modified(&paths).await;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            () = stop.cancelled() => return,
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
            _ = tick.tick() => {
                for g in hub.take_drained() {
                    tracing::info!(server = %g.registry.server(), "a removed or replaced server holds no session any more: stopped");
                    g.registry.begin_shutdown();
                    g.registry.finish_shutdown().await;
                }
                let now = modified(&paths).await;
                if now == seen {
                    continue;
                }
                "the file changed"
            }
        };
        seen = modified(&paths).await;
        if let Some(source) = &sources.servers {
            let loaded = {
                let source = source.clone();
                crate::config::off_runtime(
                    "servers file",
                    crate::config::FILE_READ_TIMEOUT,
                    move || source.load(),
                )
                .await
                .and_then(|r| r)
            };
            reload(&hub, &builder, source, loaded, why).await;
        }
        if let Some(path) = &sources.keys {
            reload_keys(&hub, &builder, path, why).await;
        }
    }
}

/// Puts the config file's keys in force; the sessions of users who lost every key are
/// closed (`revoked`). A file that cannot be read or holds invalid keys changes nothing.
async fn reload_keys(hub: &Hub, builder: &Builder, path: &std::path::Path, why: &str) {
    let read = {
        let path = path.to_path_buf();
        crate::config::off_runtime("config file", crate::config::FILE_READ_TIMEOUT, move || {
            crate::config::Layer::from_file(&path)
        })
        .await
        .and_then(|r| r)
        .and_then(|layer| Keys::new(&layer.keys.unwrap_or_default()).map_err(|e| e.join("; ")))
    };
    let keys = match read {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(trigger = why, error = %e, "keys not reloaded: the keys in force stay");
            return;
        }
    };
    let gone = builder.front.keys.replace(keys);
    if gone.is_empty() {
        return;
    }
    let mut closed = 0;
    for r in hub.registries() {
        closed += r.revoke(|p| gone.iter().any(|g| g == p)).await;
    }
    tracing::info!(trigger = why, users = %gone.join(","), sessions_closed = closed, "keys reloaded: users without a key any more are refused and their sessions closed (revoked)");
}

/// Says that SIGHUP reloads nothing without `--servers` (or `[servers]`), until `stop`.
async fn ignore_hangups(stop: CancellationToken) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            Some(()) = hup.recv() => tracing::info!(
                "SIGHUP: nothing to reload (the servers of --servers or [servers.NAME] tables and the keys of --config are reloaded; other settings need a restart)"
            ),
        }
    }
}

/// Applies the servers as `source` now holds them to `hub`: added servers serve at once,
/// removed ones drain, changed ones serve new sessions from a new generation while the old
/// one keeps its sessions; an invalid file changes nothing and says why.
async fn reload(
    hub: &Hub,
    builder: &Builder,
    source: &ServersSource,
    loaded: Result<(String, String), String>,
    why: &str,
) {
    let mut shown = source.path().display().to_string();
    let file = loaded.map_err(|e| vec![e]).and_then(|(json, name)| {
        shown = name;
        crate::servers::parse(&json, &shown, &builder.config.env_policy)
    });
    let file = match file {
        Ok(f) if f.servers.is_empty() => Err(vec![format!(
            "{shown}: no enabled server in it (a gateway with no server would refuse every client)"
        )]),
        Ok(f) => {
            let loops = self_upstreams(
                &builder.me,
                f.servers.iter().map(|e| (e.name.as_str(), &e.upstream)),
            );
            if loops.is_empty() {
                Ok(f)
            } else {
                Err(loops.iter().map(|l| format!("{shown}: {l}")).collect())
            }
        }
        Err(e) => Err(e),
    };
    let file = match file {
        Ok(f) => f,
        Err(errors) => {
            tracing::error!(
                trigger = why,
                errors = %errors.join("; "),
                "servers file not reloaded: the running configuration stays"
            );
            return;
        }
    };
    for note in &file.notes {
        tracing::info!("{note}");
    }
    let current = hub.current();
    let (mut added, mut changed, mut removed, mut kept) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let mut revoked = 0;
    for e in &file.servers {
        match current.get(&e.name) {
            Some(g) if g.entry.as_ref() == Some(e) => kept += 1,
            Some(_) => {
                hub.install(&e.name, builder.build(Some(e)));
                changed.push(e.name.clone());
                // The draining generations keep their sessions, not their users: a user
                // taken off the list is refused there on its next request, and what it
                // holds there is closed.
                let users = e.settings.users.clone();
                for g in hub.generations_of(&e.name) {
                    g.access.set(users.clone());
                    revoked += g
                        .registry
                        .revoke(|p| users.as_ref().is_some_and(|u| !u.iter().any(|x| x == p)))
                        .await;
                }
            }
            None => {
                hub.install(&e.name, builder.build(Some(e)));
                added.push(e.name.clone());
            }
        }
    }
    for name in current.keys() {
        if !file.servers.iter().any(|e| &e.name == name) {
            hub.remove(name);
            removed.push(name.clone());
        }
    }
    tracing::info!(
        trigger = why,
        added = %added.join(","),
        changed = %changed.join(","),
        removed = %removed.join(","),
        unchanged = kept,
        sessions_revoked = revoked,
        "servers reloaded"
    );
}

/// The admin token and where an operator finds it.
struct AdminToken {
    secret: String,
    hint: String,
}

/// Name of the generated admin token file in the state dir (the CLI reads it there).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The file in the state dir holding the key that seals MRTR `requestState`.
pub const BRIDGE_KEY_FILE: &str = "bridge.key";

/// The configured token, the first line of `--admin-token-file`, or the one generated
/// into the state dir (kept across restarts, readable only by this user).
fn resolve_admin_token(config: &Config) -> anyhow::Result<AdminToken> {
    if let Some(t) = &config.admin_token {
        return Ok(AdminToken {
            secret: t.clone(),
            hint: "the configured --admin-token".into(),
        });
    }
    let read = |path: &std::path::Path| -> anyhow::Result<String> {
        let text =
            crate::config::read_bounded(path, "admin token file").map_err(anyhow::Error::msg)?;
        let token = text.lines().next().unwrap_or("").trim().to_owned();
        anyhow::ensure!(
            !token.is_empty(),
            "the admin token file {} is empty",
            path.display()
        );
        Ok(token)
    };
    if let Some(path) = &config.admin_token_file {
        return Ok(AdminToken {
            secret: read(path)?,
            hint: format!("in {}", path.display()),
        });
    }
    let path = config.state_dir.join(ADMIN_TOKEN_FILE);
    let hint = format!("in {}", path.display());
    if path.exists() {
        return Ok(AdminToken {
            secret: read(&path)?,
            hint,
        });
    }
    let secret = format!("tadm_{}", crate::ids::new_session_id());
    write_secret(&config.state_dir, &path, &secret)?;
    tracing::info!(file = %path.display(), "generated an admin token (the CLI reads it there; `tether dashboard` prints a link with it)");
    Ok(AdminToken { secret, hint })
}

/// The key that seals MRTR `requestState` (`modern::StateKey`): with a shared store the
/// deployment's one (`P:secret:bridge`, so any instance verifies a state another sealed),
/// else 32 random bytes kept in the state dir (`bridge.key`, mode 0600), so a state stays
/// verifiable across restarts.
async fn bridge_key(
    config: &Config,
    coordinator: Option<&dyn crate::store::Coordinator>,
) -> anyhow::Result<crate::modern::StateKey> {
    let (text, whence) = match coordinator {
        Some(c) => match c.shared_secret("bridge").await {
            Ok(Some(text)) => (text, "the live store's bridge secret".to_owned()),
            Ok(None) => bridge_key_file(config)?,
            Err(e) => anyhow::bail!("cannot read the bridge key from the live store: {e}"),
        },
        None => bridge_key_file(config)?,
    };
    crate::modern::StateKey::from_hex(&text).with_context(|| {
        format!("{whence} is not 64 hex characters; delete it to have a new key made")
    })
}

/// The bridge key's text from the state dir, made there first if missing; and where it is.
fn bridge_key_file(config: &Config) -> anyhow::Result<(String, String)> {
    let path = config.state_dir.join(BRIDGE_KEY_FILE);
    let text = if path.exists() {
        crate::config::read_bounded(&path, "bridge key").map_err(anyhow::Error::msg)?
    } else {
        let hex = crate::ids::random_hex(32);
        write_secret(&config.state_dir, &path, &hex)?;
        hex
    };
    Ok((text, path.display().to_string()))
}

/// Writes a secret the gateway generated into a new file of the state dir, readable by its
/// owner only (an existing file is never overwritten).
fn write_secret(
    state_dir: &std::path::Path,
    path: &std::path::Path,
    secret: &str,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state dir {}", state_dir.display()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(())
}

/// Takes the state dir for this process: two gateways writing one SQLite store would serve
/// each other's sessions (each replaying them into its own upstream). A second process
/// exits at once, naming the holder.
fn lock_state_dir(
    dir: &std::path::Path,
    addr: SocketAddr,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot open the session store: cannot create the state dir {}",
            dir.display()
        )
    })?;
    let path = dir.join("tether.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(crate::state_dir::FILE_MODE)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0)?;
            lock.rewind()?;
            writeln!(
                lock,
                "pid {} listening on http://{addr}/mcp",
                std::process::id()
            )?;
            Ok(lock)
        }
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            // One line of ours; bounded all the same.
            let _ = file.take(4096).read_to_string(&mut holder);
            anyhow::bail!(
                "the state dir {} is in use by another tether ({}); give this one its own --state-dir, or share sessions between gateways with --store redis://...",
                dir.display(),
                holder.trim()
            )
        }
        Err((_, e)) => Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
    }
}

/// Descriptors a running stdio upstream holds in the gateway: its three pipes and the
/// child's pidfd.
const FDS_PER_STDIO_UPSTREAM: u64 = 4;

/// Raises the soft open-files limit to the hard limit (a gateway holds a descriptor per
/// connection, upstream pipe and database file), and says so when even the hard limit
/// leaves less room than the connection caps and `--max-upstreams` running upstreams ask
/// for: past it new sessions are refused (`gateway-resources`) rather than the upstream
/// blamed, but an operator should hear of it before the first refusal.
fn raise_fd_limit(connections: usize, upstreams: usize, stdio: bool) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::debug!(error = %e, "cannot raise the open-files limit");
    }
    let now = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    let per_upstream = if stdio { FDS_PER_STDIO_UPSTREAM } else { 1 };
    // Stores, listeners, logs and the runtime's own.
    const BASE: u64 = 64;
    let wanted = connections as u64 + upstreams as u64 * per_upstream + BASE;
    if now < wanted {
        let fit = now.saturating_sub(connections as u64 + BASE) / per_upstream;
        tracing::warn!(
            open_files = now,
            wanted,
            max_upstreams = upstreams,
            upstreams_that_fit = fit,
            "the open-files limit cannot hold the connection limits and --max-sessions/--max-upstreams running upstreams ({per_upstream} descriptors each): past about {fit} upstreams new sessions are refused (limit gateway-resources); raise `ulimit -n` or lower the limits"
        );
    }
}

/// The backends of one gateway process.
struct Stores {
    live: Arc<dyn LiveStore>,
    ledger: Arc<dyn LedgerStore>,
    ledger_name: String,
    /// Live store and ledger are the same database (the session rows are shared).
    shared: bool,
    coordinator: Option<Arc<dyn Coordinator>>,
}

async fn open_stores(
    config: &Config,
    addr: SocketAddr,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Stores> {
    let sqlite = || -> anyhow::Result<Arc<SqliteStore>> {
        Ok(Arc::new(
            SqliteStore::open_with(
                &config.state_dir,
                crate::store::sqlite::LogBounds {
                    stream_events: config.limits.max_stream_events,
                    session_events: config.limits.max_stream_events.saturating_mul(10),
                    session_bytes: config.limits.max_session_log as u64,
                },
            )
            .with_context(|| {
                format!(
                    "cannot open the session store in {}",
                    config.state_dir.display()
                )
            })?,
        ))
    };
    let (ledger, ledger_name, sqlite_ledger): (
        Arc<dyn LedgerStore>,
        String,
        Option<Arc<SqliteStore>>,
    ) = match &config.ledger {
        LedgerSpec::Sqlite => {
            let s = sqlite()?;
            let name = s.describe();
            (s.clone(), name, Some(s))
        }
        LedgerSpec::Postgres { url } => {
            let pg = PostgresLedger::connect(url)
                .await
                .context("cannot open the PostgreSQL ledger")?;
            let name = pg.describe();
            (Arc::new(pg), name, None)
        }
    };
    match &config.store {
        StoreSpec::Sqlite => {
            let live: Arc<SqliteStore> = match sqlite_ledger {
                Some(s) => s,
                None => sqlite()?,
            };
            Ok(Stores {
                shared: matches!(config.ledger, LedgerSpec::Sqlite),
                live,
                ledger,
                ledger_name,
                coordinator: None,
            })
        }
        StoreSpec::Redis {
            url,
            prefix,
            session_ttl,
            instance_ttl,
            advertise_url,
        } => {
            if matches!(config.ledger, LedgerSpec::Sqlite) {
                tracing::warn!(
                    "live sessions are in Redis but the ledger is this instance's SQLite file: the admin API and dashboard show only the history this instance recorded; use --ledger postgres://... for a deployment-wide view"
                );
            }
            let redis = RedisStore::open(
                &RedisOptions {
                    url: url.clone(),
                    prefix: prefix.clone(),
                    session_ttl: *session_ttl,
                    instance_ttl: *instance_ttl,
                    advertise_url: advertise_url
                        .clone()
                        .unwrap_or_else(|| format!("http://{addr}")),
                },
                metrics.clone(),
            )
            .map_err(|e| anyhow::anyhow!("cannot open the Redis store: {e}"))?;
            let redis = Arc::new(redis);
            Ok(Stores {
                live: redis.clone(),
                ledger,
                ledger_name,
                shared: false,
                coordinator: Some(redis),
            })
        }
    }
}
