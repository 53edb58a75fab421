//! A live store in memory, for unit tests of the session layer: every write completes at
//! once, so tests under `tokio::time::pause` never wait on another thread (a real backend's
//! writer thread would let paused time jump ahead while a request waits for its ack).
//! Passes the same conformance suite as the real backends. Clones share their data, which
//! is how a test "reopens" it after a simulated restart.
//! Must not: be compiled into the gateway (tests only).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::tasks::TaskRecord;

use super::{
    Ack, EventRecord, LiveStore, STANDALONE_STREAM, Servers, SessionRecord, SessionState,
    StoreError, StreamRecord,
};

/// Sessions, streams and events in maps behind one lock.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, SessionRecord>,
    /// (session, stream) → the stream and its events by sequence number.
    streams: HashMap<(String, String), (StreamRecord, BTreeMap<u64, String>)>,
    tasks: HashMap<String, TaskRecord>,
}

fn done() -> Ack {
    Box::pin(futures::future::ready(Ok(())))
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes session `id` look idle since `at_ms` to the store (its record's activity is
    /// wall-clock time, which paused tests cannot move).
    pub fn age(&self, id: &str, at_ms: i64) {
        if let Some(s) = self.lock().sessions.get_mut(id) {
            s.last_active_ms = at_ms;
        }
    }
}

#[async_trait::async_trait]
impl LiveStore for MemoryStore {
    async fn create_session(&self, record: SessionRecord) -> Result<(), StoreError> {
        self.lock().sessions.insert(record.id.clone(), record);
        Ok(())
    }

    async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.lock().sessions.get(id).cloned())
    }

    fn touch(&self, id: &str, at_ms: i64) {
        if let Some(s) = self.lock().sessions.get_mut(id) {
            s.last_active_ms = s.last_active_ms.max(at_ms);
        }
    }

    fn set_restore(&self, id: &str, restore: Value) -> Ack {
        if let Some(s) = self.lock().sessions.get_mut(id) {
            s.restore = restore;
        }
        done()
    }

    async fn close_session(&self, id: &str, reason: &str, at_ms: i64) -> Result<(), StoreError> {
        if let Some(s) = self.lock().sessions.get_mut(id) {
            s.state = SessionState::Closed;
            s.close_reason = Some(reason.to_owned());
            s.closed_ms = Some(at_ms);
        }
        Ok(())
    }

    async fn idle_sessions(
        &self,
        cutoff_ms: i64,
        limit: usize,
        of: Servers<'_>,
    ) -> Result<Vec<String>, StoreError> {
        let st = self.lock();
        let mut idle: Vec<&SessionRecord> = st
            .sessions
            .values()
            .filter(|s| s.state == SessionState::Live && s.last_active_ms < cutoff_ms)
            .filter(|s| of.admits(&s.upstream_name))
            .collect();
        idle.sort_by_key(|s| s.last_active_ms);
        Ok(idle.into_iter().take(limit).map(|s| s.id.clone()).collect())
    }

    async fn stale_pooled(&self) -> Result<Vec<String>, StoreError> {
        let st = self.lock();
        Ok(st
            .sessions
            .values()
            .filter(|s| s.state == SessionState::Live && s.transport == "pooled")
            .map(|s| s.id.clone())
            .collect())
    }

    async fn count_live(&self) -> Result<u64, StoreError> {
        let st = self.lock();
        Ok(st
            .sessions
            .values()
            .filter(|s| s.state == SessionState::Live)
            .count() as u64)
    }

    fn open_stream(&self, record: StreamRecord) -> Ack {
        let key = (record.session_id.clone(), record.stream_id.clone());
        self.lock().streams.insert(key, (record, BTreeMap::new()));
        done()
    }

    fn append_event(&self, event: EventRecord) -> Ack {
        let mut st = self.lock();
        let key = (event.session_id.to_string(), event.stream_id.to_string());
        let (stream, events) = st.streams.entry(key).or_insert_with(|| {
            (
                StreamRecord {
                    session_id: event.session_id.to_string(),
                    stream_id: event.stream_id.to_string(),
                    client_request_id: None,
                    request: None,
                    retryable: false,
                    done: false,
                    last_seq: 0,
                    created_ms: super::now_ms(),
                },
                BTreeMap::new(),
            )
        });
        stream.last_seq = stream.last_seq.max(event.seq);
        stream.done |= event.terminal;
        events.insert(event.seq, event.data.to_string());
        done()
    }

    fn flush(&self) -> Ack {
        done()
    }

    async fn events_after(
        &self,
        session_id: &str,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let st = self.lock();
        Ok(st
            .streams
            .get(&(session_id.to_owned(), stream_id.to_owned()))
            .map(|(_, events)| {
                events
                    .range(after + 1..)
                    .map(|(k, v)| (*k, v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn stream(
        &self,
        session_id: &str,
        stream_id: &str,
    ) -> Result<Option<StreamRecord>, StoreError> {
        let st = self.lock();
        Ok(st
            .streams
            .get(&(session_id.to_owned(), stream_id.to_owned()))
            .map(|(s, _)| s.clone()))
    }

    async fn unfinished_streams(&self, session_id: &str) -> Result<Vec<StreamRecord>, StoreError> {
        let st = self.lock();
        Ok(st
            .streams
            .values()
            .map(|(s, _)| s)
            .filter(|s| s.session_id == session_id && s.stream_id != STANDALONE_STREAM && !s.done)
            .cloned()
            .collect())
    }

    async fn prune_events(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let closed: Vec<String> = st
            .sessions
            .values()
            .filter(|s| s.state == SessionState::Closed)
            .map(|s| s.id.clone())
            .collect();
        let mut removed = 0;
        st.streams.retain(|(sid, _), (s, events)| {
            let gone = closed.contains(sid) || (s.done && s.created_ms < cutoff_ms);
            if gone {
                removed += events.len() as u64;
            }
            !gone
        });
        Ok(removed)
    }

    fn put_task(&self, task: &TaskRecord) -> Ack {
        self.lock().tasks.insert(task.id.clone(), task.clone());
        done()
    }

    async fn load_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self.lock().tasks.get(id).cloned())
    }

    async fn list_tasks(
        &self,
        principal: &str,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let st = self.lock();
        let mut tasks: Vec<&TaskRecord> = st
            .tasks
            .values()
            .filter(|t| t.principal == principal)
            .filter(|t| {
                after
                    .as_ref()
                    .is_none_or(|a| (t.created_ms, &t.id) > (a.0, &a.1))
            })
            .collect();
        tasks.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(tasks.into_iter().take(limit).cloned().collect())
    }

    async fn recent_tasks(&self, limit: usize) -> Result<Vec<TaskRecord>, StoreError> {
        let st = self.lock();
        let mut tasks: Vec<&TaskRecord> = st.tasks.values().collect();
        tasks.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
        Ok(tasks.into_iter().take(limit).cloned().collect())
    }

    async fn count_tasks(&self, principal: &str) -> Result<u64, StoreError> {
        let st = self.lock();
        Ok(st
            .tasks
            .values()
            .filter(|t| t.principal == principal)
            .count() as u64)
    }

    async fn prune_tasks(&self, now_ms: i64) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let before = st.tasks.len();
        st.tasks.retain(|_, t| !t.expired(now_ms));
        Ok((before - st.tasks.len()) as u64)
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance;
    use super::*;

    #[tokio::test]
    async fn conformance() {
        conformance::sessions_round_trip_and_close(&MemoryStore::default()).await;
        let store = MemoryStore::default();
        conformance::event_log_survives_reopen(|| Box::new(store.clone())).await;
        conformance::many_concurrent_writes(&MemoryStore::default()).await;
        conformance::tasks_are_kept_listed_and_pruned(&MemoryStore::default()).await;
    }
}
