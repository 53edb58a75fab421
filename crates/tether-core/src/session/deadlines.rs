//! Call timeouts: one task per session instead of one timer task per call.
//!
//! Every client call gets the same `--upstream-timeout`, and upstream ids grow, so the
//! call with the smallest id in flight has the earliest deadline. The task sleeps until
//! that deadline, fails what has expired, and looks again; calls that finish meanwhile
//! cost it nothing (it does not wake for them). A call started while the task is sleeping
//! for an earlier deadline needs no wake-up either; only a call that finds the task parked
//! (nothing was in flight) wakes it. So a session with calls always in flight wakes its
//! task about once per timeout, where a task per call cost a spawn, a poll and an abort
//! for every call (BENCHMARKS.md "The hot path").
//!
//! Must not: hold the session while it waits (it keeps a `Weak`), or hold its lock
//! across an await.

use super::*;
use std::sync::Weak;

/// The session's side of its deadline task.
pub(super) struct Watch {
    wake: tokio::sync::Notify,
    /// Set by the task before it looks for a deadline and parks: a call registered after
    /// that must wake it.
    parked: std::sync::atomic::AtomicBool,
    /// Ends the task: the session closed or was dropped, or the gateway stops.
    ended: CancellationToken,
    /// The task is started by the session's first call: a session that never calls
    /// (most idle ones) holds no task.
    started: std::sync::atomic::AtomicBool,
}

impl Watch {
    pub(super) fn new(stopped: &CancellationToken) -> Watch {
        Watch {
            wake: tokio::sync::Notify::new(),
            parked: std::sync::atomic::AtomicBool::new(false),
            ended: stopped.child_token(),
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A call with a deadline was registered (the task exists: [`Session::armed`]).
    fn wake(&self) {
        if self.parked.swap(false, Ordering::AcqRel) {
            // A stored permit if the task is between its check and its wait.
            self.wake.notify_one();
        }
    }

    pub(super) fn end(&self) {
        self.ended.cancel();
    }
}

impl Session {
    /// A call with a deadline was registered: starts the task, or wakes it if parked.
    pub(super) fn armed(self: &Arc<Self>) {
        if self.deadlines.started.swap(true, Ordering::AcqRel) {
            self.deadlines.wake();
        } else {
            self.spawn_deadlines();
        }
    }

    fn spawn_deadlines(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let watch = self.deadlines.clone();
        self.shared.tracker.spawn(
            async move {
                while let Some(expired) = next_expired(&weak, &watch).await {
                    let Some(session) = weak.upgrade() else {
                        return;
                    };
                    for (uid, p) in expired {
                        session.timed_out(uid, p).await;
                    }
                }
            }
            // A root span: the first call starts this task from inside its request span,
            // and a child that lives as long as the session would keep that request's span
            // (and its export) open until then.
            .instrument(tracing::info_span!(parent: None, "deadlines", session.id = %crate::ids::shown(&self.id))),
        );
    }

    /// Fails a call whose deadline passed and tells the upstream to stop working on it.
    async fn timed_out(self: &Arc<Self>, uid: u64, p: Pending) {
        {
            let _in_request = p
                .spans
                .as_ref()
                .map(|(request, _)| request.clone().entered());
            tracing::warn!(mcp.method = %p.method, duration_ms = p.started.elapsed().as_millis() as u64, "upstream request timed out");
        }
        let timed_out = Failure::timeout(self.shared.cfg.upstream_timeout);
        self.finish(p, |client_id| timed_out.reply(client_id));
        if let Some((link, _)) = self.current_link() {
            link.send(Message::notification(
                "notifications/cancelled",
                Some(json!({"requestId": uid, "reason": "timed out at the gateway"})),
            ))
            .await;
        }
    }
}

/// Waits for the next deadline and returns the calls that expired by then (perhaps none:
/// the call it waited for may have finished). `None` when the task must end. Holds the
/// session only while it looks, never while it waits.
async fn next_expired(weak: &Weak<Session>, watch: &Watch) -> Option<Vec<(u64, Pending)>> {
    watch.parked.store(true, Ordering::Release);
    let next = weak.upgrade()?.lock().calls.earliest_deadline();
    match next {
        None => tokio::select! {
            () = watch.wake.notified() => {}
            () = watch.ended.cancelled() => return None,
        },
        Some(at) => {
            watch.parked.store(false, Ordering::Release);
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = watch.ended.cancelled() => return None,
            }
        }
    }
    let expired = weak.upgrade()?.lock().calls.take_expired(Instant::now());
    Some(expired)
}
