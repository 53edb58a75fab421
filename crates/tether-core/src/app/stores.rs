//! Opening the live store and the ledger the configuration names (SQLite in the state
//! dir, Redis, PostgreSQL), and raising the open-file limit to what the limits need.
//!
//! Must not: serve before the live store is open (it may still be unreachable: then
//! requests get 503 until it answers).

use super::*;

/// Descriptors a running stdio upstream holds in the gateway: its three pipes and the
/// child's pidfd.
pub(super) const FDS_PER_STDIO_UPSTREAM: u64 = 4;

/// Raises the soft open-files limit to the hard limit (a gateway holds a descriptor per
/// connection, upstream pipe and database file), and says so when even the hard limit
/// leaves less room than the connection caps and `--max-upstreams` running upstreams ask
/// for: past it new sessions are refused (`gateway-resources`) rather than the upstream
/// blamed, but an operator should hear of it before the first refusal.
pub(super) fn raise_fd_limit(connections: usize, upstreams: usize, stdio: bool) {
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
pub(super) struct Stores {
    pub(super) live: Arc<dyn LiveStore>,
    pub(super) ledger: Arc<dyn LedgerStore>,
    pub(super) ledger_name: String,
    /// Live store and ledger are the same database (the session rows are shared).
    pub(super) shared: bool,
    pub(super) coordinator: Option<Arc<dyn Coordinator>>,
}

pub(super) async fn open_stores(
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
