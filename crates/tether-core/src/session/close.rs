//! Ending a session here: closing (recorded), or only letting go of it (it lives on
//! elsewhere); pending calls get an error, streams end, the upstream stops.
//!
//! `close` (recorded), `tear_down`, `shutdown_local` (the session moved), `current_record`.
//!
//! Must not: record a close for a session that moved to another instance.

use super::*;

impl Session {
    pub(super) async fn close(&self, reason: &str) {
        self.close_inner(reason).instrument(self.span()).await
    }

    /// Marks the session closed in this process and ends everything it runs here: pending
    /// requests get the error `make` builds, streams end, the upstream stops. False if it
    /// was already closed.
    pub(super) fn tear_down(&self, make: impl Fn(Value) -> Value) -> bool {
        let (link, pending, streams) = {
            let mut st = self.lock();
            if st.closed {
                return false;
            }
            st.closed = true;
            st.slot = None;
            let link = st.take_link();
            let (pending, streams) = st.calls.drain();
            (link, pending, streams)
        };
        for p in pending {
            self.finish(p, |id| Message::ours(make(id)));
        }
        self.release_subscriptions();
        for s in streams {
            s.detach();
        }
        self.standalone.detach();
        self.deadlines.end();
        if let Some(link) = link {
            link.shutdown(true);
        }
        true
    }

    pub(super) async fn close_inner(&self, reason: &str) {
        let closed = Failure::session_closed(Some(reason));
        let closed_now = self.tear_down(|client_id| closed.response(client_id));
        if !closed_now {
            return;
        }
        if let Err(e) = self.shared.close_stored(&self.id, reason).await {
            tracing::error!(error = %e, "cannot record session close");
        }
        self.shared.metrics.closed(reason);
        tracing::info!(reason, "session closed");
    }

    /// The record as it stands now (activity and restore state included).
    pub(super) fn current_record(&self) -> SessionRecord {
        let mut r = self.record.clone();
        let st = self.lock();
        r.restore = st.restore.to_json();
        r.last_active_ms =
            now_ms() - i64::try_from(st.last_active.elapsed().as_millis()).unwrap_or(0);
        r
    }

    /// Ends this process's part in the session (streams, pending calls, upstream) without
    /// recording a close: the session lives on elsewhere.
    pub(super) fn shutdown_local(&self, why: &str) {
        let moved = Failure::new(
            FailureKind::Moved,
            format!(
                "the session moved to another gateway instance ({why}); the outcome of this request is unknown"
            ),
            Retry::Unknown,
        );
        self.tear_down(|client_id| moved.response(client_id));
    }
}
