//! Response streams and their durable event log.
//!
//! A [`Stream`] is the logical SSE stream of one client request, or a session's standalone
//! stream. Every event gets the next sequence number and is handed to the store *before*
//! it is queued to the attached HTTP connection together with the store's [`Ack`]; the
//! connection awaits the ack before writing, so an event is durable before the client can
//! see it, while the store is free to commit many events at once. The one exception is a
//! request's final answer, written while its commit runs (ARCHITECTURE.md invariant 3). Event ids are
//! `<stream>.<seq>`: unique within the session and naming their stream (spec §1.1.6).
//!
//! A request stream's own record (the request, for a re-issue after a crash) is *deferred*:
//! it is written when the call outlives the answer window, or when its first event that is
//! not the answer is pushed, whichever comes first. A call answered within the window is
//! answered as one JSON body, and nothing of it reaches the event log (invariant 3,
//! docs/design/durability.md row 2): the client never held an event id to resume it by.
//!
//! Must not: send an event before it is durable (except a request's final answer, or an
//! answer that no stored record precedes, invariant 3), or hold a slow client's bytes
//! without a bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use tracing::Instrument;

use crate::store::{Ack, EventRecord, LiveStore, StreamRecord};
use crate::wire::Message;

/// One event on its way to a client connection.
pub struct Frame {
    /// Sequence number within the stream.
    pub seq: u64,
    /// The JSON-RPC message.
    pub data: Arc<str>,
    /// Resolves once the event is durable.
    pub ack: Ack,
    /// Whether this is the response that ends a request stream.
    pub terminal: bool,
    /// Whether the event is in the stream's log (false on a stream that is not durable,
    /// and for an answer that came before its stream's record was written).
    pub stored: bool,
}

/// A logical response stream.
pub struct Stream {
    session_id: Arc<str>,
    id: Arc<str>,
    durable: bool,
    inner: Mutex<Inner>,
}

struct Inner {
    next_seq: u64,
    sink: Option<Sink>,
    done: bool,
    record: Record,
}

/// Where a request stream's own record stands.
enum Record {
    /// No record to write: the standalone stream (its row is made by its first event) or a
    /// stream that is not durable, or one restored from the store.
    Implicit,
    /// Not written yet; written by [`Stream::open`] or before the first event that needs it.
    /// The span is the request's, so the write shows under it whoever makes it.
    /// A request to be kept whole is held as its message until then: its tree is built
    /// only for a call that needs its record (most calls are answered first).
    Deferred(Box<StreamRecord>, Option<Box<Message>>, tracing::Span),
    /// Submitted to the store; the ack is taken by the first [`Stream::open`] after it.
    Submitted(Option<Ack>),
    /// The call was answered before its record was written: nothing of it is stored.
    Skipped,
}

/// The attached connection: frames go through an unbounded channel whose bytes are counted
/// against `limit`, so a push never waits (the upstream's pump must not stall on one slow
/// client) and never grows past the limit: a client that does not read has its stream
/// closed, and the events stay in the log for `Last-Event-ID`.
struct Sink {
    tx: mpsc::UnboundedSender<Frame>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

/// The receiving end of an attached connection ([`Stream::attach`]).
pub struct FrameRx {
    rx: mpsc::UnboundedReceiver<Frame>,
    queued: Arc<AtomicUsize>,
    held: Option<Frame>,
}

impl FrameRx {
    /// A receiver with nothing to receive (what is left of one handed over).
    pub fn ended() -> FrameRx {
        // Its sender is dropped here: nothing can ever be queued on it.
        let (_, rx) = mpsc::unbounded_channel();
        FrameRx {
            rx,
            queued: Arc::new(AtomicUsize::new(0)),
            held: None,
        }
    }

    /// The next frame; `None` when the stream ended or was detached (the frames queued
    /// before that come first).
    pub async fn recv(&mut self) -> Option<Frame> {
        if let Some(f) = self.held.take() {
            return Some(f);
        }
        let f = self.rx.recv().await?;
        self.queued.fetch_sub(f.data.len(), Ordering::Relaxed);
        Some(f)
    }

    /// The next frame if one is queued now.
    pub fn try_recv(&mut self) -> Option<Frame> {
        if let Some(f) = self.held.take() {
            return Some(f);
        }
        let f = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(f.data.len(), Ordering::Relaxed);
        Some(f)
    }

    /// Puts a frame taken by [`Self::recv`] back, to be returned first by the next one.
    pub fn hold(&mut self, frame: Frame) {
        debug_assert!(self.held.is_none());
        self.held = Some(frame);
    }
}

/// What [`Stream::push`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Recorded (and queued to the connection, if one is attached).
    Sent,
    /// Recorded, but the connection had more than its buffer's worth unread: it was
    /// detached, and the client resumes from the log.
    Overflowed,
    /// The stream had already ended; nothing was recorded.
    Ended,
}

/// Formats an SSE event id.
pub fn event_id(stream: &str, seq: u64) -> String {
    format!("{stream}.{seq}")
}

/// Splits an SSE event id into stream and sequence number.
pub fn parse_event_id(id: &str) -> Option<(&str, u64)> {
    let (stream, seq) = id.rsplit_once('.')?;
    if stream.is_empty() || !stream.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some((stream, seq.parse().ok()?))
}

impl Stream {
    /// A stream whose next event gets `next_seq`. Non-durable streams (the 2024-11-05
    /// transport, which cannot resume) skip the event log.
    pub fn new(session_id: Arc<str>, id: Arc<str>, next_seq: u64, durable: bool) -> Stream {
        Stream {
            session_id,
            id,
            durable,
            inner: Mutex::new(Inner {
                next_seq,
                sink: None,
                done: false,
                record: Record::Implicit,
            }),
        }
    }

    /// A new request stream whose record is written only when needed (module doc).
    /// `request`, when given, is the request kept whole in the record (`record.request` is
    /// then left `None` and filled in from it only when the record is written).
    pub fn deferred(record: StreamRecord, request: Option<Message>) -> Stream {
        let s = Stream::new(
            record.session_id.as_str().into(),
            record.stream_id.as_str().into(),
            1,
            true,
        );
        s.lock().record = Record::Deferred(
            Box::new(record),
            request.map(Box::new),
            tracing::Span::current(),
        );
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the stream's record if it is still deferred, and returns the ack to await
    /// before the client may be given an id on this stream (the priming event). `None`
    /// when there is nothing to wait for (no record of its own, or another caller took
    /// the ack).
    pub fn open(&self, store: &dyn LiveStore) -> Option<Ack> {
        let mut g = self.lock();
        match std::mem::replace(&mut g.record, Record::Implicit) {
            Record::Deferred(r, request, span) => {
                g.record = Record::Submitted(None);
                Some(submit(store, *r, request, &span))
            }
            Record::Submitted(ack) => {
                g.record = Record::Submitted(None);
                ack
            }
            other => {
                g.record = other;
                None
            }
        }
    }

    /// The stream id.
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// Records `value` and queues it for the attached connection, if any. A stored event
    /// takes its size from `budget` (the session's writes in flight), given back when the
    /// store has written it; past the budget it is stored all the same (a push never waits)
    /// and the caller is expected to wait for room ([`write_room`]) before the next.
    pub fn push(
        &self,
        store: &dyn LiveStore,
        message: &Message,
        terminal: bool,
        budget: Option<&Arc<tokio::sync::Semaphore>>,
    ) -> Pushed {
        let data: Arc<str> = message.encode().into();
        let mut g = self.lock();
        if g.done {
            return Pushed::Ended;
        }
        let seq = g.next_seq;
        g.next_seq += 1;
        g.done = terminal;
        let mut stored = self.durable;
        if matches!(g.record, Record::Deferred(..)) {
            if terminal {
                // The answer comes first: no id on this stream was ever given out, so
                // nothing needs to be stored for a resume.
                g.record = Record::Skipped;
                stored = false;
            } else if let Record::Deferred(r, request, span) =
                std::mem::replace(&mut g.record, Record::Implicit)
            {
                // Submitted before the event, so the store holds the record first.
                g.record = Record::Submitted(Some(submit(store, *r, request, &span)));
            }
        }
        let ack: Ack = if stored {
            let hold = budget.and_then(|b| {
                let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                b.clone().try_acquire_many_owned(n).ok().map(Arc::new)
            });
            store.append_event(EventRecord {
                session_id: self.session_id.clone(),
                stream_id: self.id.clone(),
                seq,
                data: data.clone(),
                terminal,
                hold,
            })
        } else {
            Box::pin(std::future::ready(Ok(())))
        };
        let Some(sink) = &g.sink else {
            return Pushed::Sent;
        };
        let len = data.len();
        let queued = sink.queued.fetch_add(len, Ordering::Relaxed) + len;
        // One event is always let through, however large (it was bounded on its way in).
        if queued > sink.limit && queued > len {
            sink.queued.fetch_sub(len, Ordering::Relaxed);
            g.sink = None;
            return Pushed::Overflowed;
        }
        if sink
            .tx
            .send(Frame {
                seq,
                data,
                ack,
                terminal,
                stored,
            })
            .is_err()
        {
            g.sink = None;
        }
        Pushed::Sent
    }

    /// Attaches a new connection that may hold up to `limit` unread bytes, replacing (and
    /// so ending) any previous one. Returns its receiver and the first sequence number it
    /// will carry live; earlier events must be replayed from the store.
    pub fn attach(&self, limit: usize) -> (FrameRx, u64) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut g = self.lock();
        g.sink = Some(Sink {
            tx,
            queued: queued.clone(),
            limit,
        });
        (
            FrameRx {
                rx,
                queued,
                held: None,
            },
            g.next_seq,
        )
    }

    /// Detaches the connection; its SSE response ends.
    pub fn detach(&self) {
        self.lock().sink = None;
    }

    /// Whether a client connection is currently attached and alive.
    pub fn attached(&self) -> bool {
        let g = self.lock();
        g.sink.as_ref().is_some_and(|s| !s.tx.is_closed())
    }

    /// Whether the final response was pushed.
    pub fn done(&self) -> bool {
        self.lock().done
    }
}

/// Waits until `budget` (a session's writes in flight, in bytes, of `size` in all) has at
/// least half its room again: the store has caught up with what the session pushed.
pub async fn write_room(budget: &tokio::sync::Semaphore, size: usize) {
    let half = u32::try_from(size / 2).unwrap_or(u32::MAX);
    if budget.available_permits() < half as usize
        && let Ok(p) = budget.acquire_many(half).await
    {
        drop(p);
    }
}

fn submit(
    store: &dyn LiveStore,
    mut record: StreamRecord,
    message: Option<Box<Message>>,
    request: &tracing::Span,
) -> Ack {
    if let Some(m) = message {
        record.request = Some(m.to_value());
    }
    let span = tracing::info_span!(parent: request, "store.write", store.op = "open_stream");
    Box::pin(store.open_stream(record).instrument(span))
}

/// What a client request produces.
pub enum Reply {
    /// An SSE stream that ends with the response.
    Stream(StreamHandle),
    /// A JSON-RPC message to return at once (an error, usually).
    Immediate(Value),
    /// Accepted; the answer goes to the session's single stream (2024-11-05 transport).
    Accepted,
}

/// A stream ready to be rendered as SSE.
pub struct StreamHandle {
    /// Stream id (the prefix of every event id).
    pub stream_id: Arc<str>,
    /// A request stream whose record is still deferred ([`Stream::deferred`]).
    pub deferred: Option<Deferred>,
    /// Send a priming event (event id + empty data + `retry`) first.
    pub priming: bool,
    /// `retry` for the priming event.
    pub retry: Duration,
    /// Stored events to send before live ones.
    pub replay: Vec<(u64, String)>,
    /// Live events; `None` when the stream already ended.
    pub live: Option<FrameRx>,
    /// End the HTTP response after the final response event.
    pub ends_with_response: bool,
    /// Cancelled when this response must end (shutdown).
    pub stop: CancellationToken,
}

/// What a [`StreamHandle`] needs to answer a quick call without a stream.
pub struct Deferred {
    pub(super) stream: Arc<Stream>,
    pub(super) store: Arc<dyn LiveStore>,
    pub(super) window: Duration,
}

impl StreamHandle {
    /// Waits up to the answer window for the answer of a call whose stream record is
    /// deferred, and returns it if nothing of the call was stored (it is then the whole
    /// response). Otherwise returns `None` with the handle ready to render as SSE, any
    /// frame it took held for the stream.
    pub async fn quick_answer(&mut self) -> Option<Arc<str>> {
        let deferred = self.deferred.as_ref().filter(|d| !d.window.is_zero())?;
        let rx = self.live.as_mut()?;
        let first = tokio::select! {
            biased;
            f = rx.recv() => f?,
            () = tokio::time::sleep(deferred.window) => return None,
            () = self.stop.cancelled() => return None,
        };
        if first.terminal && !first.stored {
            return Some(first.data);
        }
        rx.hold(first);
        None
    }

    /// Writes the stream's record if it is still deferred; the ack is awaited before the
    /// first byte, since the priming event gives the client an id to resume by.
    pub fn open_record(&mut self) -> Option<Ack> {
        let d = self.deferred.take()?;
        d.stream.open(d.store.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_that_does_not_read_is_detached_at_its_buffer_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(dir.path()).unwrap();
        let s = Stream::new("s".into(), "1".into(), 1, false);
        let (mut rx, _) = s.attach(1000);
        // 300 bytes written out: three fit in the 1000-byte buffer, a fourth does not.
        let msg = Message::notification("x", Some(serde_json::json!({"d": "x".repeat(252)})));
        assert_eq!(msg.encode().len(), 300);
        let outcomes: Vec<Pushed> = (0..5).map(|_| s.push(&store, &msg, false, None)).collect();
        assert_eq!(&outcomes[..3], &[Pushed::Sent; 3]);
        assert_eq!(outcomes[3], Pushed::Overflowed);
        assert!(!s.attached());
        // What was queued before the overflow is still delivered, then the stream ends.
        let mut got = 0;
        while rx.recv().await.is_some() {
            got += 1;
        }
        assert_eq!(got, 3);
        // A reader that keeps up is never detached.
        let (mut rx, _) = s.attach(1000);
        for _ in 0..20 {
            assert_eq!(s.push(&store, &msg, false, None), Pushed::Sent);
            rx.recv().await.unwrap();
        }
    }

    fn record(stream: &str) -> StreamRecord {
        StreamRecord {
            session_id: "s".into(),
            stream_id: stream.into(),
            client_request_id: Some(serde_json::json!(1)),
            request: None,
            retryable: false,
            done: false,
            last_seq: 0,
            created_ms: 0,
        }
    }

    #[tokio::test]
    async fn an_answer_before_the_record_is_written_stores_nothing() {
        let store = crate::store::memory::MemoryStore::default();
        let s = Stream::deferred(record("a"), None);
        let (mut rx, _) = s.attach(1 << 20);
        assert_eq!(
            s.push(
                &store,
                &Message::ours(serde_json::json!({"id": 1})),
                true,
                None
            ),
            Pushed::Sent
        );
        let f = rx.recv().await.unwrap();
        assert!(f.terminal && !f.stored);
        // Nothing to wait for and nothing written, even if asked later.
        assert!(s.open(&store).is_none());
        assert!(store.stream("s", "a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_notification_first_writes_the_record_before_itself() {
        let store = crate::store::memory::MemoryStore::default();
        let s = Stream::deferred(record("b"), None);
        let (mut rx, _) = s.attach(1 << 20);
        s.push(
            &store,
            &Message::ours(serde_json::json!({"method": "notifications/progress"})),
            false,
            None,
        );
        let stored = store
            .stream("s", "b")
            .await
            .unwrap()
            .expect("record written");
        assert_eq!(stored.last_seq, 1);
        // The ack of the record is still there for the response to await.
        s.open(&store).expect("the record's ack").await.unwrap();
        assert!(s.open(&store).is_none());
        assert!(rx.recv().await.unwrap().stored);
        s.push(
            &store,
            &Message::ours(serde_json::json!({"id": 1})),
            true,
            None,
        );
        let answer = rx.recv().await.unwrap();
        assert!(answer.terminal && answer.stored);
        assert!(store.stream("s", "b").await.unwrap().unwrap().done);
    }

    #[tokio::test]
    async fn a_record_opened_before_the_answer_keeps_the_answer() {
        let store = crate::store::memory::MemoryStore::default();
        let s = Stream::deferred(record("c"), None);
        let (mut rx, _) = s.attach(1 << 20);
        s.open(&store).expect("written now").await.unwrap();
        s.push(
            &store,
            &Message::ours(serde_json::json!({"id": 1})),
            true,
            None,
        );
        assert!(rx.recv().await.unwrap().stored);
        let events = store.events_after("s", "c", 0).await.unwrap();
        assert_eq!(events.len(), 1);
    }

    #[tokio::test]
    async fn a_held_frame_comes_back_first() {
        let store = crate::store::memory::MemoryStore::default();
        let s = Stream::new("s".into(), "d".into(), 1, false);
        let (mut rx, _) = s.attach(1 << 20);
        for i in 0..2 {
            s.push(
                &store,
                &Message::notification("n", Some(serde_json::json!({"n": i}))),
                false,
                None,
            );
        }
        let first = rx.recv().await.unwrap();
        rx.hold(first);
        assert_eq!(rx.recv().await.unwrap().seq, 1);
        assert_eq!(rx.recv().await.unwrap().seq, 2);
    }

    #[test]
    fn event_ids_round_trip() {
        assert_eq!(parse_event_id(&event_id("ab12", 7)), Some(("ab12", 7)));
        assert_eq!(parse_event_id("0.0"), Some(("0", 0)));
        for bad in ["", "x", ".1", "a.b", "a-b.1", "a.-1"] {
            assert_eq!(parse_event_id(bad), None, "{bad}");
        }
    }

    /// Issue 26: a stored event holds its size of the session's write budget until the
    /// store has written it, so the session's pump can wait for the store instead of
    /// queueing without bound; past the budget a push still stores (it never waits).
    #[tokio::test]
    async fn stored_events_hold_the_write_budget_until_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(dir.path()).unwrap();
        let budget = Arc::new(tokio::sync::Semaphore::new(250_000));
        let s = Stream::new("s".into(), "0".into(), 1, true);
        let msg =
            Message::notification("x", Some(serde_json::json!({"data": "x".repeat(100_000)})));
        // 2 MB pushed at once: the writer cannot have written it all yet.
        for _ in 0..20 {
            assert_eq!(s.push(&store, &msg, false, Some(&budget)), Pushed::Sent);
        }
        assert!(
            budget.available_permits() < 250_000,
            "held while queued to the writer"
        );
        store.flush().await.unwrap();
        assert_eq!(
            budget.available_permits(),
            250_000,
            "all given back once written"
        );
        // Waiting for room returns once the store caught up.
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            write_room(&budget, 250_000),
        )
        .await
        .unwrap();
    }
}
