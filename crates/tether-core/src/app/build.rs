//! Building what serves one server: its connector, registry and front door, counted in
//! the gateway's limits ([`Builder`]); and the checks made once at start (the upstream can
//! start, and is not the gateway itself).
//!
//! Must not: start an upstream (registries start them on demand).

use super::*;

/// The servers a config names, with what each starts.
pub(super) fn served(config: &Config) -> Vec<(String, crate::upstream::UpstreamSpec)> {
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
pub(super) fn self_upstreams<'a>(
    me: &crate::servers::GatewayAddr,
    servers: impl Iterator<Item = (&'a str, &'a crate::upstream::UpstreamSpec)>,
) -> Vec<String> {
    servers
        .filter_map(|(name, spec)| {
            me.reached_by(spec)
                .map(|what| format!("server {name:?} is this gateway itself ({what})"))
        })
        .collect()
}

/// Warns (or with `--require-upstream` fails) when a server's upstream cannot be started.
pub(super) async fn check_startable(
    name: &str,
    spec: &crate::upstream::UpstreamSpec,
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
pub(super) struct Builder {
    pub(super) config: Config,
    /// Where this gateway listens: a server whose upstream is the gateway itself is refused.
    pub(super) me: crate::servers::GatewayAddr,
    pub(super) shim: Option<PathBuf>,
    pub(super) common: Common,
    pub(super) front: FrontConfig,
    /// Several servers (or a servers file that may gain some): each has its own limits
    /// inside the gateway's, and reaps only its own stored sessions.
    pub(super) multi: bool,
    /// The gateway's `--max-upstreams`, shared by every server's connector.
    pub(super) gateway_upstreams: Arc<tokio::sync::Semaphore>,
    pub(super) mirror_ledger: bool,
}

impl Builder {
    /// A generation serving `entry` (`None`: the config's one upstream).
    pub(super) fn build(&self, entry: Option<&ServerEntry>) -> Arc<Generation> {
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
            task_after: settings
                .task_after
                .as_deref()
                .map_or(config.task_after, |t| {
                    crate::config::task_after(&mut Vec::new(), Some(t))
                }),
            task_limits: crate::session::TaskLimits {
                running: limits.max_tasks,
                running_per_principal: limits.max_tasks_per_principal,
                stored_per_principal: limits.max_stored_tasks,
                result: limits.max_task_result,
                ttl: limits.task_ttl,
            },
            task_tools: settings
                .task_tools
                .clone()
                .unwrap_or_else(|| config.task_tools.clone()),
            upstream_name: name.clone(),
            upstream_fingerprint: spec.fingerprint(),
            mirror_ledger: self.mirror_ledger,
            stream_buffer: limits.stream_buffer,
            max_initialize: limits.max_initialize,
            pool_size: limits.pool_size,
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
