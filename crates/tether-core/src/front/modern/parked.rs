//! Calls parked until their client sends the input their upstream asked for (MRTR,
//! 2026-07-28): the table, its bounds, and the sealed `requestState` a parked call's retry
//! carries. A parked call holds its pooled session's stream; dropped unanswered (expiry,
//! a full table, a closed stream) it is cancelled upstream ([`Call`]'s drop).
//!
//! Must not: hold a parked call past its state's expiry, or keep more than
//! [`MAX_PARKED`] of them ([`MAX_PARKED_PER_PRINCIPAL`] of one user).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use super::*;
use crate::store::now_ms;

/// Parked calls (waiting for a client's input) this gateway holds at most.
pub const MAX_PARKED: usize = 1024;
/// Parked calls of one principal: one user cannot fill the table for the others.
pub const MAX_PARKED_PER_PRINCIPAL: usize = 128;

/// Calls parked until their client sends the input their upstream asked for.
pub struct ParkedCalls {
    pub(super) cfg: ModernConfig,
    parked: Mutex<HashMap<String, Parked>>,
    last_sweep: AtomicI64,
}

struct Parked {
    call: Call,
    principal: String,
    expires_ms: i64,
}

/// A pooled call in progress. Dropped before its answer was delivered (the client closed
/// the stream, a parked call expired), it is cancelled upstream.
pub(super) struct Call {
    pub(super) session: Arc<Session>,
    pub(super) stream: Arc<str>,
    pub(super) rx: FrameRx,
    /// The upstream's requests to the client still unanswered: `tether-N` id → request.
    pub(super) asked: Vec<(String, Value)>,
    /// The progress token the client chose (upstream, the call carries one of the
    /// gateway's: pooled sessions are shared).
    pub(super) progress_token: Option<Value>,
    pub(super) done: bool,
}

impl Call {
    /// Takes the call's session, stream and frames for a new owner (a task's runner):
    /// dropping what is left cancels nothing.
    pub(super) fn hand_over(mut self) -> (Arc<Session>, Arc<str>, FrameRx) {
        self.done = true;
        let frames = std::mem::replace(&mut self.rx, FrameRx::ended());
        (self.session.clone(), self.stream.clone(), frames)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done {
            let keys: Vec<String> = self.asked.iter().map(|(k, _)| k.clone()).collect();
            self.session.abandon(&self.stream, &keys);
        }
    }
}

impl ParkedCalls {
    pub(in crate::front) fn new(cfg: ModernConfig) -> ParkedCalls {
        ParkedCalls {
            cfg,
            parked: Mutex::new(HashMap::new()),
            last_sweep: AtomicI64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Parked>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops parked calls whose state expired (cancelling them upstream); at most once a
    /// second, from the parks and retries that arrive (a parked call holds no exchange, so
    /// its pooled session still expires on its own; the table is bounded by
    /// [`MAX_PARKED`] meanwhile).
    fn sweep(&self, now: i64) {
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now - last < 1000
            || self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let expired: Vec<Parked> = {
            let mut map = self.lock();
            let keys: Vec<String> = map
                .iter()
                .filter(|(_, p)| p.expires_ms <= now)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter().filter_map(|k| map.remove(&k)).collect()
        };
        drop(expired);
    }

    /// Parks `call` and returns the state its retry must carry; `None` when the table is
    /// full (the call is then dropped: cancelled upstream).
    fn park(
        &self,
        call: Call,
        principal: &str,
        method: &str,
        name: Option<&str>,
    ) -> Option<String> {
        let now = now_ms();
        self.sweep(now);
        let expires_ms =
            now + i64::try_from(self.cfg.state_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let key = crate::ids::new_session_id();
        let state = self.cfg.state_key.seal(&StateClaims {
            p: principal.to_owned(),
            i: self.cfg.instance.clone(),
            w: key.clone(),
            m: method.to_owned(),
            n: name.map(str::to_owned),
            x: expires_ms,
        });
        let mut map = self.lock();
        let theirs = map.values().filter(|p| p.principal == principal).count();
        if map.len() >= MAX_PARKED || theirs >= MAX_PARKED_PER_PRINCIPAL {
            return None;
        }
        map.insert(
            key,
            Parked {
                call,
                principal: principal.to_owned(),
                expires_ms,
            },
        );
        Some(state)
    }

    pub(super) fn take(&self, claims: &StateClaims) -> Option<Call> {
        self.sweep(now_ms());
        let mut map = self.lock();
        match map.get(&claims.w) {
            Some(p) if p.principal == claims.p => map.remove(&claims.w).map(|p| p.call),
            _ => None,
        }
    }
}

/// Parks a call that asked the client for input: the `InputRequiredResult` to answer
/// with, or the refusal when the table is full (the call is then dropped: cancelled
/// upstream).
pub(super) fn park(
    st: &AppState,
    call: Call,
    principal: &str,
    method: &str,
    name: Option<&str>,
    id: Value,
) -> Value {
    let asked = call.asked.clone();
    match st.parked.park(call, principal, method, name) {
        Some(state) => rules::input_required(id, &asked, &state),
        None => parked_full().response(id),
    }
}

/// Whether an upstream's request can go to this client as an input request (a kind MRTR
/// carries, for a capability the client declared).
pub(super) fn askable(ask: &Value, meta: &Meta) -> bool {
    ask.get("method")
        .and_then(Value::as_str)
        .and_then(rules::required_capability)
        .is_some_and(|cap| meta.declares(cap))
}

/// The key an upstream's request to the client goes under: its `tether-N` id.
pub(super) fn ask_key(ask: &Value) -> String {
    ask.get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The refusal of a call that would park past [`MAX_PARKED`] or
/// [`MAX_PARKED_PER_PRINCIPAL`].
pub(super) fn parked_full() -> Failure {
    Failure::new(
        FailureKind::Limit,
        format!(
            "the gateway holds as many calls waiting for client input as it may ({MAX_PARKED} in all, {MAX_PARKED_PER_PRINCIPAL} per user); retry later"
        ),
        Retry::Safe(Some(Duration::from_secs(1))),
    )
    .with("limit", "parked_calls")
}
