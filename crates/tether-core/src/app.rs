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

use crate::config::Config;
use crate::front::{self, FrontConfig};
use crate::session::{Registry, SessionConfig};
use crate::store::Store;
use crate::store::sqlite::SqliteStore;
use crate::upstream::Connector;

/// Runs the gateway. `shim` is the `tether` executable used to supervise stdio children;
/// `on_ready` is called with the bound address once the listener accepts connections.
pub async fn run(
    config: Config,
    shim: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr),
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
    );
    let app = front::router(
        registry.clone(),
        FrontConfig {
            max_body: config.max_body,
            allowed_origins: config.allowed_origins.clone(),
            keepalive: config.keepalive,
        },
    );
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            listen = %addr,
            "listening beyond loopback without authentication: anyone who can reach this address can use the upstream"
        );
    }
    tracker.spawn(registry.clone().run_reaper());

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
    on_ready(addr);

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
