//! The start circuit of one upstream: refuses new starts after consecutive failures,
//! across sessions, and lets one probe through after a short, growing wait.
//!
//! Must not: make an outage longer than the fault it guards against.

use super::*;

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
