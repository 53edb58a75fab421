//! Resource subscriptions are state a client makes the gateway keep: each session keeps the
//! URIs its upstream accepted (they are replayed to every fresh upstream and written to the
//! record), and a stateless client's `subscriptions/listen` subscribes its pooled session.
//! So they are bounded by count and by bytes, per session and per principal (issue 26: one
//! client sending `subscriptions/listen` with 64 fresh 1 KB URIs again and again grew a
//! pooled session to 2 GB, and 4,000 legacy `resources/subscribe`s cost 1.4 GB and 28 s of
//! CPU, the cost growing with the square of the count).
//!
//! A subscription is charged when its `resources/subscribe` is sent (so concurrent ones
//! cannot overshoot) and stays charged while the upstream holds it; a refused or failed
//! one, an unsubscribe and the session's end give it back. A refusal is `-32016` naming
//! the limit, before anything reaches the upstream.
//!
//! Must not: grow past the principals holding subscriptions (one entry each), or refuse a
//! subscription the session already holds.

use super::*;

/// Longest URI a subscription may name.
pub const MAX_URI: usize = 4096;

/// Bytes of URIs allowed per subscription on average: the byte bounds are the count bounds
/// times this.
pub const BYTES_PER_SUBSCRIPTION: usize = 256;

/// The bounds, from `--max-subscriptions` and `--max-subscriptions-per-principal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionLimits {
    /// Subscriptions one session may hold.
    pub per_session: usize,
    /// Subscriptions all sessions of one principal may hold together.
    pub per_principal: usize,
}

impl Default for SubscriptionLimits {
    fn default() -> Self {
        SubscriptionLimits {
            per_session: 1000,
            per_principal: 10_000,
        }
    }
}

/// What each principal's sessions hold, across the servers of the process.
pub struct SubscriptionBudget {
    limits: SubscriptionLimits,
    /// principal → (subscriptions, bytes of their URIs).
    used: Mutex<HashMap<String, (usize, usize)>>,
}

impl SubscriptionBudget {
    /// An empty budget with `limits`.
    pub fn new(limits: SubscriptionLimits) -> SubscriptionBudget {
        SubscriptionBudget {
            limits,
            used: Mutex::default(),
        }
    }

    /// The bounds.
    pub fn limits(&self) -> SubscriptionLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (usize, usize)>> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Charges one more subscription of `bytes` to `principal`, whose session holds
    /// `session` (count, bytes) already; the refusal when a bound would be passed.
    pub fn take(
        &self,
        principal: &str,
        session: (usize, usize),
        bytes: usize,
    ) -> Result<(), Failure> {
        let l = self.limits;
        if bytes > MAX_URI {
            return Err(refusal(
                "max-subscription-uri",
                format!("the resource URI is {bytes} bytes, over the {MAX_URI} byte limit"),
                MAX_URI,
            ));
        }
        if session.0 + 1 > l.per_session
            || session.1 + bytes > l.per_session * BYTES_PER_SUBSCRIPTION
        {
            return Err(refusal(
                "max-subscriptions",
                format!(
                    "this session holds {} resource subscriptions ({} bytes of URIs), the most allowed (--max-subscriptions {}, {} bytes)",
                    session.0,
                    session.1,
                    l.per_session,
                    l.per_session * BYTES_PER_SUBSCRIPTION
                ),
                l.per_session,
            ));
        }
        let mut used = self.lock();
        let mine = used.get(principal).copied().unwrap_or_default();
        if mine.0 + 1 > l.per_principal || mine.1 + bytes > l.per_principal * BYTES_PER_SUBSCRIPTION
        {
            return Err(refusal(
                "max-subscriptions-per-principal",
                format!(
                    "this user's sessions hold {} resource subscriptions ({} bytes of URIs), the most allowed (--max-subscriptions-per-principal {}, {} bytes)",
                    mine.0,
                    mine.1,
                    l.per_principal,
                    l.per_principal * BYTES_PER_SUBSCRIPTION
                ),
                l.per_principal,
            ));
        }
        used.insert(principal.to_owned(), (mine.0 + 1, mine.1 + bytes));
        Ok(())
    }

    /// Moves `principal`'s charge by `delta` (subscriptions, bytes): what a session gives
    /// back, or brings along when it is resumed (never refused: it held them before).
    pub fn adjust(&self, principal: &str, delta: (isize, isize)) {
        if delta == (0, 0) {
            return;
        }
        let mut used = self.lock();
        let e = used.entry(principal.to_owned()).or_default();
        e.0 = e.0.saturating_add_signed(delta.0);
        e.1 = e.1.saturating_add_signed(delta.1);
        if *e == (0, 0) {
            used.remove(principal);
        }
    }

    /// What `principal`'s sessions hold (subscriptions, bytes).
    pub fn used(&self, principal: &str) -> (usize, usize) {
        self.lock().get(principal).copied().unwrap_or_default()
    }
}

fn refusal(limit: &'static str, message: String, max: usize) -> Failure {
    Failure::over_limit(limit, max, message, Retry::Never)
}

/// A session's subscriptions: the URIs its upstream accepted (in [`Restore`]) and those
/// whose `resources/subscribe` is in flight, with their bytes, and what of it is charged
/// to the principal.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// Bytes of the accepted URIs (`restore.subscriptions`).
    pub bytes: usize,
    /// URIs whose subscribe is in flight, not yet accepted.
    pub pending: HashSet<String>,
    /// Bytes of `pending`.
    pub pending_bytes: usize,
    /// What is charged to the principal for this session.
    pub charged: (usize, usize),
}

impl Held {
    /// The session's use (subscriptions, bytes), `accepted` being `restore.subscriptions`.
    pub fn usage(&self, accepted: usize) -> (usize, usize) {
        (
            accepted + self.pending.len(),
            self.bytes + self.pending_bytes,
        )
    }
}

impl Session {
    /// Charges a `resources/subscribe` of `uri` before it is sent; the refusal when a bound
    /// would be passed. A URI the session holds or is subscribing already costs nothing.
    pub(super) fn reserve_subscription(&self, uri: &str) -> Result<(), Failure> {
        let budget = &self.shared.subscriptions;
        let mut st = self.lock();
        if st.restore.subscriptions.contains(uri) || st.subs.pending.contains(uri) {
            return Ok(());
        }
        let usage = st.subs.usage(st.restore.subscriptions.len());
        budget.take(&self.record.principal, usage, uri.len())?;
        st.subs.pending.insert(uri.to_owned());
        st.subs.pending_bytes += uri.len();
        st.subs.charged.0 += 1;
        st.subs.charged.1 += uri.len();
        Ok(())
    }

    /// A `resources/subscribe` of `uri` ended (accepted ones were already applied to the
    /// restore state): it is no longer pending, and what it no longer holds goes back.
    pub(super) fn subscription_settled(&self, uri: &str) {
        let mut st = self.lock();
        if st.subs.pending.remove(uri) {
            st.subs.pending_bytes -= uri.len();
        }
        self.recharge(&mut st);
    }

    /// Brings the principal's charge in line with what the session holds now.
    pub(super) fn recharge(&self, st: &mut State) {
        // A closed session holds nothing, whatever its calls still settle.
        let now = if st.closed {
            (0, 0)
        } else {
            st.subs.usage(st.restore.subscriptions.len())
        };
        let was = st.subs.charged;
        st.subs.charged = now;
        let delta = (
            now.0 as isize - was.0 as isize,
            now.1 as isize - was.1 as isize,
        );
        self.shared
            .subscriptions
            .adjust(&self.record.principal, delta);
    }

    /// Gives back everything charged for this session (it ended here).
    pub(super) fn release_subscriptions(&self) {
        let mut st = self.lock();
        let was = std::mem::take(&mut st.subs.charged);
        drop(st);
        self.shared.subscriptions.adjust(
            &self.record.principal,
            (-(was.0 as isize), -(was.1 as isize)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_is_bounded_by_count_and_bytes_across_its_sessions() {
        let b = SubscriptionBudget::new(SubscriptionLimits {
            per_session: 3,
            per_principal: 4,
        });
        for i in 0..3 {
            b.take("alice", (i, i * 10), 10).unwrap();
        }
        let over = b.take("alice", (3, 30), 10).unwrap_err();
        assert_eq!(over.field("limit"), Some(&json!("max-subscriptions")));
        b.take("alice", (0, 0), 10).unwrap();
        let over = b.take("alice", (1, 10), 10).unwrap_err();
        assert_eq!(
            over.field("limit"),
            Some(&json!("max-subscriptions-per-principal"))
        );
        assert_eq!(over.code(), code::LIMIT_REACHED);
        b.take("bob", (0, 0), 10)
            .expect("another user is untouched");
        // Bytes: 4 × 256 per principal; one long URI fills it.
        let big = SubscriptionBudget::new(SubscriptionLimits {
            per_session: 4,
            per_principal: 4,
        });
        big.take("carol", (0, 0), 1000).unwrap();
        assert!(big.take("carol", (1, 1000), 100).is_err());
        let long = big.take("dave", (0, 0), MAX_URI + 1).unwrap_err();
        assert_eq!(long.field("limit"), Some(&json!("max-subscription-uri")));
        // Given back, the entry goes.
        b.adjust("alice", (-4, -40));
        assert_eq!(b.used("alice"), (0, 0));
        assert!(!b.lock().contains_key("alice"));
    }
}
