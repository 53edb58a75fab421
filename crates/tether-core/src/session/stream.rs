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
//! Must not: send an event before it is durable (except a request's final answer, invariant 3), or hold a slow client's bytes without a bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::store::{Ack, EventRecord, LiveStore};

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
}

impl FrameRx {
    /// The next frame; `None` when the stream ended or was detached (the frames queued
    /// before that come first).
    pub async fn recv(&mut self) -> Option<Frame> {
        let f = self.rx.recv().await?;
        self.queued.fetch_sub(f.data.len(), Ordering::Relaxed);
        Some(f)
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
            }),
        }
    }

    /// The stream id.
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// Records `value` and queues it for the attached connection, if any.
    pub fn push(&self, store: &dyn LiveStore, value: &Value, terminal: bool) -> Pushed {
        let data: Arc<str> = value.to_string().into();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.done {
            return Pushed::Ended;
        }
        let seq = g.next_seq;
        g.next_seq += 1;
        g.done = terminal;
        let ack: Ack = if self.durable {
            store.append_event(EventRecord {
                session_id: self.session_id.clone(),
                stream_id: self.id.clone(),
                seq,
                data: data.clone(),
                terminal,
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
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.sink = Some(Sink {
            tx,
            queued: queued.clone(),
            limit,
        });
        (FrameRx { rx, queued }, g.next_seq)
    }

    /// Detaches the connection; its SSE response ends.
    pub fn detach(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).sink = None;
    }

    /// Whether a client connection is currently attached and alive.
    pub fn attached(&self) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.sink.as_ref().is_some_and(|s| !s.tx.is_closed())
    }

    /// Whether the final response was pushed.
    pub fn done(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).done
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
        let msg = serde_json::json!({"data": "x".repeat(300)});
        let outcomes: Vec<Pushed> = (0..5).map(|_| s.push(&store, &msg, false)).collect();
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
            assert_eq!(s.push(&store, &msg, false), Pushed::Sent);
            rx.recv().await.unwrap();
        }
    }

    #[test]
    fn event_ids_round_trip() {
        assert_eq!(parse_event_id(&event_id("ab12", 7)), Some(("ab12", 7)));
        assert_eq!(parse_event_id("0.0"), Some(("0", 0)));
        for bad in ["", "x", ".1", "a.b", "a-b.1", "a.-1"] {
            assert_eq!(parse_event_id(bad), None, "{bad}");
        }
    }
}
