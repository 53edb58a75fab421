//! Wiring: the only module that knows every other one. Opens the store, builds the
//! session registry and the front door, serves until the shutdown future resolves, then
//! drains in-flight requests under the grace period and stops every upstream.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::auth::Keys;
use crate::config::Config;
use crate::front::{self, FrontConfig};
use crate::ledger::{self, Ledger};
use crate::metrics::Metrics;
use crate::session::{Registry, SessionConfig};
use crate::store::Store;
use crate::store::sqlite::SqliteStore;
use crate::upstream::Connector;

/// Runs the gateway. `shim` is the `tether` executable used to supervise stdio children;
/// `on_ready` is called with the bound MCP and admin addresses once both accept connections.
pub async fn run(
    config: Config,
    shim: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr, SocketAddr),
) -> anyhow::Result<()> {
    let store = SqliteStore::open(&config.state_dir).with_context(|| {
        format!(
            "cannot open the session store in {}",
            config.state_dir.display()
        )
    })?;
    let db_path = store.path().to_path_buf();
    let store: Arc<dyn Store> = Arc::new(store);
    let live = store
        .count_live()
        .await
        .context("cannot read the session store")?;
    tracing::info!(
        sessions = live,
        store = %db_path.display(),
        "{live} sessions were live before and will resume on contact"
    );

    let tracker = TaskTracker::new();
    let metrics = Arc::new(Metrics::default());
    let (ledger, ledger_rx) = Ledger::new(metrics.clone());
    let ledger_stop = CancellationToken::new();
    let ledger_task = tokio::spawn(ledger::run_writer(
        ledger_rx,
        store.clone() as Arc<dyn ledger::LedgerSink>,
        metrics.clone(),
        ledger_stop.clone(),
    ));
    let keys = Arc::new(Keys::new(&config.keys).map_err(|e| anyhow::anyhow!(e.join("; ")))?);
    let connector = Connector::new(
        config.upstream.clone(),
        shim,
        config.max_body.max(1 << 20),
        tracker.clone(),
    );
    let registry = Registry::new(
        SessionConfig {
            idle_timeout: config.idle_timeout,
            upstream_timeout: config.upstream_timeout,
            upstream_name: config.upstream_name.clone(),
            ..SessionConfig::default()
        },
        store.clone(),
        connector,
        tracker.clone(),
        metrics.clone(),
        ledger,
    );
    let app = front::router(
        registry.clone(),
        FrontConfig {
            keys: keys.clone(),
            max_body: config.max_body,
            allowed_origins: config.allowed_origins.clone(),
            keepalive: config.keepalive,
        },
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && !keys.enabled() {
        tracing::warn!(
            listen = %addr,
            "listening beyond loopback without authentication: anyone who can reach this address can use the upstream"
        );
    }
    tracker.spawn(registry.clone().run_reaper());
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_app = admin::router(AdminState {
        registry: registry.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        keys: keys.clone(),
        token: config.admin_token.clone(),
        started: std::time::Instant::now(),
        upstream: config.upstream.clone(),
        upstream_name: config.upstream_name.clone(),
        instance: addr.to_string(),
    });
    let admin_stop = CancellationToken::new();
    let admin_server = tokio::spawn(
        axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(admin_stop.clone().cancelled_owned())
            .into_future(),
    );
    tracing::info!(admin = %admin_addr, "admin API, metrics and dashboard on http://{admin_addr}/");
    let retention = config.retention;
    let prune_store = store.clone();
    let prune_stop = CancellationToken::new();
    let prune_token = prune_stop.clone();
    tracker.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(600));
        loop {
            tokio::select! {
                _ = prune_token.cancelled() => return,
                _ = every.tick() => {}
            }
            let cutoff =
                crate::store::now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
            match prune_store.prune_ledger(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "pruned ledger history past retention"),
                Err(e) => tracing::warn!(error = %e, "cannot prune ledger history"),
            }
        }
    });

    let stop_accepting = CancellationToken::new();
    // SSE answers are several small writes (priming event, then events); with Nagle's
    // algorithm on, each one after the first waits for the client's delayed ACK (~40 ms).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stop_accepting.clone().cancelled_owned())
            .into_future(),
    );
    tracing::info!(listen = %addr, upstream.name = %config.upstream_name, "tether ready on http://{addr}/mcp");
    on_ready(addr, admin_addr);

    let mut server = server;
    tokio::select! {
        _ = shutdown => {}
        res = &mut server => {
            res.context("server task failed")?.context("server failed")?;
        }
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: no new connections; in-flight requests may finish");
    registry.begin_shutdown();
    stop_accepting.cancel();
    if tokio::time::timeout(config.shutdown_grace, &mut server)
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown grace over; ending the remaining streams (clients can resume them after restart)"
        );
        registry.finish_shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    registry.finish_shutdown().await;
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
