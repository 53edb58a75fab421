//! The in-flight table of a session ([`Calls`]: synchronous, no I/O, unit-tested without
//! processes), and completing a call: the entry is closed (progress token, stream), the
//! client gets its answer, and a tool call is counted once with its outcome in the
//! metrics, the log and the ledger.
//!
//! `Calls` holds pending calls by upstream id and generation, request streams, progress
//! tokens and the upstream's requests awaiting the client; `finish` (closes the entry, emits the answer) and
//! `record_call` (metrics, one WARN for a failure, ledger).
//!
//! Must not: record a call twice or drop one unrecorded; hold a lock across an await
//! (it lives inside the session's state mutex).

use super::*;
use std::collections::BTreeMap;

/// What one session has in flight. Upstream ids are gateway-wide and never reused, so an
/// answer can only ever match the call it was sent for; `generation` says which upstream
/// a call was sent to, so an upstream's death fails exactly its calls.
#[derive(Default)]
pub(super) struct Calls {
    /// Upstream id → the call waiting for its answer. Ordered: ids grow and every call
    /// has the same timeout, so the first call with a deadline has the earliest.
    pending: BTreeMap<u64, Pending>,
    /// `tether-N` id sent to the client → (upstream generation, the upstream's own id).
    server_requests: HashMap<String, (u64, Value)>,
    /// Request streams still waiting for their response (not the standalone stream).
    streams: HashMap<Arc<str>, Arc<Stream>>,
    /// Client progress token (as JSON text) → upstream id of the call that carries it.
    progress: HashMap<String, u64>,
}

impl Calls {
    /// Registers a call sent upstream as `uid`, with its request stream (`None` when it
    /// answers on the standalone stream).
    pub(super) fn insert(&mut self, uid: u64, call: Pending, stream: Option<Arc<Stream>>) {
        if let PendingKind::Client { token: Some(t), .. } = &call.kind {
            self.progress.insert(t.clone(), uid);
        }
        if let Some(s) = stream {
            self.streams.insert(s.id().clone(), s);
        }
        self.pending.insert(uid, call);
    }

    /// The call `uid` answers, taken out of the table (a second answer finds nothing).
    pub(super) fn take(&mut self, uid: u64) -> Option<Pending> {
        self.pending.remove(&uid)
    }

    /// The call `uid`, only if it was sent to upstream `generation`.
    pub(super) fn take_in(&mut self, uid: u64, generation: u64) -> Option<Pending> {
        match self.pending.get(&uid) {
            Some(p) if p.generation == generation => self.pending.remove(&uid),
            _ => None,
        }
    }

    /// Every call sent to upstream `generation` (it died); its requests to the client are
    /// forgotten too, since nobody is left to take their answers.
    pub(super) fn take_generation(&mut self, generation: u64) -> Vec<Pending> {
        self.server_requests.retain(|_, (g, _)| *g != generation);
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.generation == generation)
            .map(|(k, _)| *k)
            .collect();
        ids.into_iter()
            .filter_map(|k| self.pending.remove(&k))
            .collect()
    }

    /// Everything (the session ends here): the calls and the request streams.
    pub(super) fn drain(&mut self) -> (Vec<Pending>, Vec<Arc<Stream>>) {
        self.progress.clear();
        self.server_requests.clear();
        (
            std::mem::take(&mut self.pending).into_values().collect(),
            self.streams.drain().map(|(_, s)| s).collect(),
        )
    }

    /// Forgets what a finished client call held: its progress token and its stream.
    pub(super) fn release(&mut self, token: Option<&str>, stream: &Stream) {
        if let Some(t) = token {
            self.progress.remove(t);
        }
        self.streams.remove(stream.id());
    }

    /// The client call answering on request stream `stream`, taken out of the table.
    pub(super) fn take_by_stream(&mut self, stream: &str) -> Option<(u64, Pending)> {
        let uid = self.pending.iter().find_map(|(uid, p)| match &p.kind {
            PendingKind::Client { stream: s, .. } if &**s.id() == stream => Some(*uid),
            _ => None,
        })?;
        self.pending.remove(&uid).map(|p| (uid, p))
    }

    /// Takes the client call answering on `stream` out of `--upstream-timeout` (a task's
    /// call, bounded by the task's time to live instead); whether one was found. Calls
    /// without a deadline are skipped by [`Calls::earliest_deadline`], so the others'
    /// order (by id, the order of their deadlines) still holds.
    pub(super) fn untime_stream(&mut self, stream: &str) -> bool {
        let found = self.pending.values_mut().find(|p| match &p.kind {
            PendingKind::Client { stream: s, .. } => &**s.id() == stream,
            PendingKind::Internal(_) => false,
        });
        match found {
            Some(p) => {
                p.deadline = None;
                true
            }
            None => false,
        }
    }

    /// The stream of client call `uid` (not of the gateway's own requests).
    pub(super) fn stream_of(&self, uid: u64) -> Option<Arc<Stream>> {
        match &self.pending.get(&uid)?.kind {
            PendingKind::Client { stream, .. } => Some(stream.clone()),
            PendingKind::Internal(_) => None,
        }
    }

    /// The stream of the call that carries progress token `token` (JSON text).
    pub(super) fn stream_of_progress(&self, token: &str) -> Option<Arc<Stream>> {
        self.stream_of(*self.progress.get(token)?)
    }

    /// The stream of the newest client call in flight.
    pub(super) fn newest_stream(&self) -> Option<Arc<Stream>> {
        self.pending
            .values()
            .filter(|p| matches!(p.kind, PendingKind::Client { .. }))
            .max_by_key(|p| p.started)
            .and_then(|p| match &p.kind {
                PendingKind::Client { stream, .. } => Some(stream.clone()),
                PendingKind::Internal(_) => None,
            })
    }

    /// The upstream id of the client call the client knows as `client_id`.
    pub(super) fn upstream_id_of(&self, client_id: &Value) -> Option<u64> {
        self.pending
            .iter()
            .find(|(_, p)| matches!(&p.kind, PendingKind::Client { client_id: c, .. } if *c == *client_id))
            .map(|(k, _)| *k)
    }

    /// A request stream by id (resumption).
    pub(super) fn stream(&self, id: &str) -> Option<Arc<Stream>> {
        self.streams.get(id).cloned()
    }

    /// Adds a request stream waiting for an answer that comes later (a re-issued call).
    pub(super) fn add_stream(&mut self, stream: Arc<Stream>) {
        self.streams.insert(stream.id().clone(), stream);
    }

    /// Removes a request stream that will get no answer through the table.
    pub(super) fn remove_stream(&mut self, id: &str) {
        self.streams.remove(id);
    }

    /// Request streams a client is connected to.
    pub(super) fn attached_streams(&self) -> usize {
        self.streams.values().filter(|s| s.attached()).count()
    }

    /// Calls in flight (the gateway's own included).
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Remembers a request of upstream `generation` sent to the client as `ours`.
    pub(super) fn add_server_request(&mut self, ours: String, generation: u64, upstream_id: Value) {
        self.server_requests.insert(ours, (generation, upstream_id));
    }

    /// The upstream request the client answers as `ours`: (generation, the upstream's id).
    /// Whether the upstream's request `ours` still waits for the client's answer.
    pub(super) fn has_server_request(&self, ours: &str) -> bool {
        self.server_requests.contains_key(ours)
    }

    pub(super) fn take_server_request(&mut self, ours: &str) -> Option<(u64, Value)> {
        self.server_requests.remove(ours)
    }

    /// The earliest deadline of a call in flight.
    pub(super) fn earliest_deadline(&self) -> Option<Instant> {
        self.pending.values().find_map(|p| p.deadline)
    }

    /// The calls whose deadline is `now` or earlier, taken out of the table.
    pub(super) fn take_expired(&mut self, now: Instant) -> Vec<(u64, Pending)> {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        ids.into_iter()
            .filter_map(|k| self.pending.remove(&k).map(|p| (k, p)))
            .collect()
    }

    /// The id the client knows for upstream `generation`'s request `upstream_id`.
    pub(super) fn our_id_for(&self, generation: u64, upstream_id: &Value) -> Option<String> {
        self.server_requests
            .iter()
            .find(|(_, (g, o))| *g == generation && o == upstream_id)
            .map(|(k, _)| k.clone())
    }
}

impl Session {
    /// Completes a pending client request with the message `make` builds from its id.
    pub(super) fn finish(&self, p: Pending, make: impl FnOnce(Value) -> Message) {
        if let Some(RestoreOp::Subscribe(uri)) = &p.restore {
            // Accepted ones were applied to the restore state before; the rest go back.
            self.subscription_settled(uri);
        }
        match p.kind {
            PendingKind::Internal(tx) => drop(tx),
            PendingKind::Client {
                client_id,
                stream,
                token,
            } => {
                let touch_due = {
                    let mut st = self.lock();
                    st.calls.release(token.as_deref(), &stream);
                    // Idleness counts from the end of the last request, not its start: in
                    // the same step as the stream stops counting as open, or a call longer
                    // than the idle timeout would expire its session as it completes.
                    Session::note_activity(&mut st)
                };
                if touch_due {
                    self.send_touch();
                }
                let terminal = !Arc::ptr_eq(&stream, &self.standalone);
                let message = make(client_id);
                if let Some((request, _upstream)) = &p.spans {
                    Session::record_outcome(request, &message);
                }
                if p.method == Method::ToolsCall {
                    self.record_call(p.tool.unwrap_or_default(), p.started.elapsed(), &message);
                }
                self.emit(&stream, &message, terminal);
            }
        }
    }

    /// Ledger, metrics and (for failures) one log line for a finished tool call.
    pub(super) fn record_call(&self, tool: String, elapsed: Duration, response: &Message) {
        let sh = &self.shared;
        let (outcome, error_code) = protocol::call_outcome(response);
        sh.metrics
            .tool_calls
            .get_or_create(&crate::metrics::OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
        sh.metrics
            .server_tool_calls
            .get_or_create(&crate::metrics::ServerOutcomeLabel {
                server: sh.cfg.upstream_name.clone(),
                outcome: outcome.to_owned(),
            })
            .inc();
        sh.metrics.tool_call_seconds.observe(elapsed.as_secs_f64());
        if outcome == "cancelled" {
            // The client went away; nothing failed.
            tracing::info!(session.id = %crate::ids::shown(&self.id), tool = %tool, duration_ms = elapsed.as_millis() as u64, "tool call cancelled by the client");
        } else if outcome != "ok" {
            tracing::warn!(
                session.id = %crate::ids::shown(&self.id),
                principal = %self.record.principal,
                tool = %tool,
                outcome,
                jsonrpc.code = error_code,
                duration_ms = elapsed.as_millis() as u64,
                "tool call failed"
            );
        }
        let started_ms = now_ms() - i64::try_from(elapsed.as_millis()).unwrap_or(0);
        sh.ledger.record(LedgerEvent::ToolCall(ToolCallRecord {
            session_id: self.id.to_string(),
            tool,
            started_ms,
            duration_ms: i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX),
            outcome: outcome.to_owned(),
            error_code,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(id: &str) -> Arc<Stream> {
        Arc::new(Stream::new("s".into(), id.into(), 1, false))
    }

    fn call(
        client_id: Value,
        stream: &Arc<Stream>,
        token: Option<&str>,
        generation: u64,
    ) -> Pending {
        Pending {
            kind: PendingKind::Client {
                client_id,
                stream: stream.clone(),
                token: token.map(str::to_owned),
            },
            restore: None,
            tool: Some("echo".into()),
            generation,
            method: Method::ToolsCall,
            deadline: None,
            started: Instant::now(),
            spans: None,
        }
    }

    fn client_id(p: &Pending) -> &Value {
        match &p.kind {
            PendingKind::Client { client_id, .. } => client_id,
            PendingKind::Internal(_) => panic!("a client call"),
        }
    }

    #[test]
    fn an_answer_finds_its_call_once_with_the_clients_id() {
        let mut calls = Calls::default();
        let s = stream("a");
        calls.insert(7, call(json!("client-7"), &s, None, 1), Some(s.clone()));
        // Clients may use any id, the same one twice included: the table is keyed by ours.
        calls.insert(8, call(json!("client-7"), &s, None, 1), None);
        assert_eq!(client_id(&calls.take(7).unwrap()), &json!("client-7"));
        assert!(
            calls.take(7).is_none(),
            "a second answer is a late one: dropped"
        );
        assert_eq!(calls.len(), 1);
        assert_eq!(calls.upstream_id_of(&json!("client-7")), Some(8));
    }

    #[test]
    fn calls_of_an_old_upstream_never_match_a_new_one() {
        let mut calls = Calls::default();
        let (a, b) = (stream("a"), stream("b"));
        calls.insert(1, call(json!(1), &a, None, 1), Some(a.clone()));
        calls.insert(2, call(json!(1), &b, None, 2), Some(b.clone()));
        assert!(calls.take_in(2, 1).is_none(), "sent to generation 2");
        // Generation 1 dies: exactly its calls fail; generation 2's stays.
        let failed = calls.take_generation(1);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].generation, 1);
        assert!(calls.take_in(2, 2).is_some());
        assert_eq!(calls.len(), 0);
    }

    #[test]
    fn progress_goes_to_the_stream_of_the_call_that_carries_the_token() {
        let mut calls = Calls::default();
        let (a, b) = (stream("a"), stream("b"));
        calls.insert(1, call(json!(1), &a, Some("\"t1\""), 1), Some(a.clone()));
        calls.insert(2, call(json!(2), &b, Some("\"t2\""), 1), Some(b.clone()));
        assert_eq!(
            calls.stream_of_progress("\"t1\"").unwrap().id().as_ref(),
            "a"
        );
        assert_eq!(
            calls.stream_of_progress("\"t2\"").unwrap().id().as_ref(),
            "b"
        );
        // Finished: its token and stream are forgotten, the other call's stay.
        let p = calls.take(1).unwrap();
        calls.release(Some("\"t1\""), &a);
        drop(p);
        assert!(calls.stream_of_progress("\"t1\"").is_none());
        assert!(calls.stream("a").is_none());
        assert!(calls.stream("b").is_some());
    }

    #[test]
    fn a_server_request_goes_to_the_callers_stream_and_its_answer_back() {
        let mut calls = Calls::default();
        let (a, b) = (stream("a"), stream("b"));
        calls.insert(10, call(json!(1), &a, None, 3), Some(a.clone()));
        calls.insert(11, call(json!(2), &b, None, 3), Some(b.clone()));
        // The upstream asks (sampling) while serving call 11: its stream carries the request.
        assert_eq!(calls.stream_of(11).unwrap().id().as_ref(), "b");
        calls.add_server_request("tether-5".into(), 3, json!(0));
        assert_eq!(calls.our_id_for(3, &json!(0)).as_deref(), Some("tether-5"));
        assert_eq!(
            calls.our_id_for(4, &json!(0)),
            None,
            "another upstream's id 0"
        );
        assert_eq!(calls.take_server_request("tether-5"), Some((3, json!(0))));
        assert_eq!(calls.take_server_request("tether-5"), None, "answered once");
        // An upstream that dies takes its open requests to the client with it.
        calls.add_server_request("tether-6".into(), 3, json!(1));
        assert_eq!(calls.take_generation(3).len(), 2);
        assert_eq!(calls.take_server_request("tether-6"), None);
    }

    #[test]
    fn the_newest_client_call_gets_unattributed_messages_and_drain_empties_all() {
        let mut calls = Calls::default();
        let (a, b) = (stream("a"), stream("b"));
        calls.insert(1, call(json!(1), &a, Some("\"t\""), 1), Some(a.clone()));
        let mut later = call(json!(2), &b, None, 1);
        later.started += Duration::from_millis(1);
        calls.insert(2, later, Some(b.clone()));
        let (tx, _rx) = oneshot::channel();
        let mut own = call(json!(null), &a, None, 1);
        own.kind = PendingKind::Internal(tx);
        calls.insert(3, own, None);
        assert_eq!(
            calls.newest_stream().unwrap().id().as_ref(),
            "b",
            "own requests have no stream"
        );
        assert!(calls.stream_of(3).is_none());
        let (pending, streams) = calls.drain();
        assert_eq!((pending.len(), streams.len()), (3, 2));
        assert_eq!(calls.len(), 0);
        assert!(calls.stream_of_progress("\"t\"").is_none());
    }
}
