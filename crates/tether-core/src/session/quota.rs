//! Per-user quotas: at most N tool calls per user in each window (`--quota-tool-calls
//! N/WINDOW`). Windows are fixed and aligned to the epoch (a day window resets at 00:00
//! UTC), so every instance agrees on when one ends. With a shared store the count is the
//! deployment's (`Coordinator::count`, a Redis counter per user and window); without one,
//! or while Redis is away, each instance counts its own calls (a call is never refused
//! because the count could not be read). A refused call is `-32016` saying which quota,
//! how many calls it allows, and when it resets, with `retry_in_ms`; it is recorded with
//! the outcome `refused`.
//!
//! Must not: block a call on the shared counter longer than one store round trip, or grow
//! its table past the users it has seen (one entry each).

use super::*;
pub use crate::config::Quota;

/// Longest wait for the shared counter: past it the call is counted on this instance.
const COUNT_WAIT: Duration = Duration::from_millis(500);

/// One user's use of the quota, as this instance last saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuotaUse {
    /// The user (principal id).
    pub principal: String,
    /// Tool calls counted in the current window (refused ones included).
    pub used: u64,
    /// Calls allowed per window.
    pub limit: u64,
    /// When the window ends (ms since the epoch).
    pub resets_at_ms: u64,
}

/// One user's window as this instance knows it.
#[derive(Debug, Clone, Copy, Default)]
struct Use {
    /// The window's index (time since the epoch / window).
    index: u64,
    /// Calls this instance counted in it: its part of the shared counter, given back to a
    /// store that lost it (a Redis restarted empty).
    own: u64,
    /// The deployment's count as last read, plus this instance's calls since (what is
    /// judged while the shared store is away).
    total: u64,
}

/// The quota table of one gateway process.
pub struct Quotas {
    quota: Option<Quota>,
    coordinator: Option<Arc<dyn Coordinator>>,
    /// principal → its use of the current window.
    seen: Mutex<HashMap<String, Use>>,
    fallback_logged: crate::log_limit::LogLimiter,
}

impl Quotas {
    /// The table for `quota` (none: nothing is counted), shared through `coordinator`.
    pub fn new(quota: Option<Quota>, coordinator: Option<Arc<dyn Coordinator>>) -> Quotas {
        Quotas {
            quota,
            coordinator,
            seen: Mutex::default(),
            fallback_logged: crate::log_limit::LogLimiter::new(
                1,
                "quota counts kept per instance while the shared store is away",
            ),
        }
    }

    /// The configured quota.
    pub fn quota(&self) -> Option<Quota> {
        self.quota
    }

    /// Counts one tool call of `principal` at `now_ms`; the refusal when it is over the
    /// quota.
    pub async fn charge(&self, principal: &str, now_ms: u64) -> Result<(), Failure> {
        let Some(q) = self.quota else { return Ok(()) };
        let window_ms = q.window.as_millis().max(1) as u64;
        let index = now_ms / window_ms;
        let resets_at_ms = (index + 1) * window_ms;
        let (own, local) = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let e = seen.entry(principal.to_owned()).or_default();
            if e.index != index {
                *e = Use {
                    index,
                    ..Use::default()
                };
            }
            e.own += 1;
            e.total += 1;
            (e.own, e.total)
        };
        let shared = match &self.coordinator {
            Some(c) => {
                // Kept a little past the window's end so a slow clock on one instance
                // still finds the count.
                let ttl = Duration::from_millis(resets_at_ms - now_ms) + Duration::from_secs(5);
                let key = format!("quota:tool-calls:{principal}:{index}");
                let counted = tokio::time::timeout(COUNT_WAIT, c.count(&key, own, ttl))
                    .await
                    .unwrap_or_else(|_| {
                        Err(crate::store::StoreError::Unavailable(format!(
                            "no answer within {} ms",
                            COUNT_WAIT.as_millis()
                        )))
                    });
                match counted {
                    Ok(n) => n,
                    Err(e) => {
                        if self.fallback_logged.admit() {
                            tracing::warn!(error = %e, "cannot count a quota in the shared store; counting on this instance until it answers");
                        }
                        None
                    }
                }
            }
            None => None,
        };
        let used = shared.unwrap_or(local);
        if shared.is_some() {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = seen.get_mut(principal).filter(|e| e.index == index) {
                e.total = used;
            }
        }
        if used <= q.limit {
            return Ok(());
        }
        let wait = Duration::from_millis(resets_at_ms - now_ms);
        Err(Failure::new(
            FailureKind::Limit,
            format!(
                "the tool-call quota of {} per {} is used up for user {principal}; it resets at {} (in {})",
                q.limit,
                humantime::format_duration(q.window),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(resets_at_ms)
                ),
                humantime::format_duration(Duration::from_secs(wait.as_secs().max(1))),
            ),
            Retry::Safe(Some(wait)),
        )
        .with("limit", "quota-tool-calls")
        .with("quota", q.limit)
        .with("window_ms", window_ms)
        .with("resets_at_ms", resets_at_ms))
    }

    /// Every user this instance has counted, with their use of the current window.
    pub fn uses(&self, now_ms: u64) -> Vec<QuotaUse> {
        let Some(q) = self.quota else {
            return Vec::new();
        };
        let window_ms = q.window.as_millis().max(1) as u64;
        let index = now_ms / window_ms;
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<QuotaUse> = seen
            .iter()
            .map(|(p, u)| QuotaUse {
                principal: p.clone(),
                used: if u.index == index { u.total } else { 0 },
                limit: q.limit,
                resets_at_ms: (index + 1) * window_ms,
            })
            .collect();
        v.sort_by(|a, b| a.principal.cmp(&b.principal));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_reads_as_calls_per_window() {
        assert_eq!(
            Quota::parse("1000/1d").unwrap(),
            Quota {
                limit: 1000,
                window: Duration::from_secs(86_400)
            }
        );
        assert!(Quota::parse("1000").is_err());
        assert!(Quota::parse("x/1d").is_err());
        assert!(Quota::parse("5/soon").is_err());
        assert!(Quota::parse("5/10ms").is_err());
    }

    #[tokio::test]
    async fn calls_over_the_quota_are_refused_until_the_window_ends_and_users_are_apart() {
        let q = Quotas::new(
            Some(Quota {
                limit: 2,
                window: Duration::from_secs(10),
            }),
            None,
        );
        let t0 = 1_000_000_000; // a window boundary (a multiple of 10 s)
        q.charge("alice", t0).await.unwrap();
        q.charge("alice", t0 + 1).await.unwrap();
        let refused = q.charge("alice", t0 + 2_000).await.unwrap_err();
        let v = refused.response(json!(1));
        assert_eq!(v["error"]["code"], code::LIMIT_REACHED);
        assert_eq!(v["error"]["data"]["limit"], "quota-tool-calls");
        assert_eq!(v["error"]["data"]["resets_at_ms"], t0 + 10_000);
        assert_eq!(v["error"]["data"]["retry_in_ms"], 8_000);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("resets at")
        );
        q.charge("bob", t0 + 2_000)
            .await
            .expect("another user is not touched");
        assert_eq!(
            q.uses(t0 + 2_000),
            vec![
                QuotaUse {
                    principal: "alice".into(),
                    used: 3,
                    limit: 2,
                    resets_at_ms: t0 + 10_000
                },
                QuotaUse {
                    principal: "bob".into(),
                    used: 1,
                    limit: 2,
                    resets_at_ms: t0 + 10_000
                },
            ]
        );
        q.charge("alice", t0 + 10_000)
            .await
            .expect("a new window starts from nothing");
        let none = Quotas::new(None, None);
        for _ in 0..10 {
            none.charge("alice", t0).await.unwrap();
        }
        assert!(none.uses(t0).is_empty());
    }

    /// A shared store that never answers a count (Redis hung): the call is not held past
    /// `COUNT_WAIT` and is counted on this instance.
    struct Hung(crate::store::InstanceInfo);

    #[async_trait::async_trait]
    impl Coordinator for Hung {
        fn me(&self) -> &crate::store::InstanceInfo {
            &self.0
        }
        async fn heartbeat(&self) -> Result<bool, crate::store::StoreError> {
            unreachable!()
        }
        async fn leave(&self) {}
        async fn claim(&self, _: &str) -> Result<crate::store::Owner, crate::store::StoreError> {
            unreachable!()
        }
        async fn owners(
            &self,
            _: &[String],
        ) -> Result<Vec<Option<String>>, crate::store::StoreError> {
            unreachable!()
        }
        async fn instances(
            &self,
        ) -> Result<Vec<crate::store::InstanceInfo>, crate::store::StoreError> {
            unreachable!()
        }
        async fn send_drop(&self, _: &str, _: &str) -> Result<(), crate::store::StoreError> {
            unreachable!()
        }
        async fn take_drops(&self) -> Result<Vec<String>, crate::store::StoreError> {
            unreachable!()
        }
        async fn reassert(
            &self,
            _: &crate::store::SessionRecord,
        ) -> Result<(), crate::store::StoreError> {
            unreachable!()
        }
        fn is_up(&self) -> bool {
            false
        }
        async fn count(
            &self,
            _: &str,
            _: u64,
            _: Duration,
        ) -> Result<Option<u64>, crate::store::StoreError> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_shared_counter_costs_a_call_at_most_the_wait_and_counts_locally() {
        let info = crate::store::InstanceInfo {
            id: "i".into(),
            url: "http://127.0.0.1:1".into(),
            started_ms: 0,
            version: String::new(),
        };
        let q = Quotas::new(
            Some(Quota {
                limit: 1,
                window: Duration::from_secs(3600),
            }),
            Some(Arc::new(Hung(info))),
        );
        let started = tokio::time::Instant::now();
        q.charge("alice", 0).await.expect("counted here: 1 of 1");
        assert_eq!(started.elapsed(), COUNT_WAIT);
        assert!(
            q.charge("alice", 1).await.is_err(),
            "the local count still refuses"
        );
    }
}
