//! An upstream in a test's hands: the gateway's side is a [`Link`](super::Link) like any
//! other; the test holds the [`FakeUpstream`] and plays the server (reads what the gateway
//! sends, answers, asks the client, or dies with a cause). The session layer's state
//! machine is unit-tested through it with no process, no socket and paused time.
//! Must not: be compiled into the gateway (tests only).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Inbound;
use crate::wire::Message;

/// The gateway's end: what it sends goes to the test.
pub(crate) struct MemoryLink {
    tx: mpsc::Sender<Value>,
    shut: Arc<AtomicBool>,
}

impl MemoryLink {
    pub(crate) async fn send(&self, message: Message) {
        // A test that dropped its end plays a server that stopped reading.
        let _ = self.tx.send(message.to_value()).await;
    }

    pub(crate) fn shutdown(&self) {
        self.shut.store(true, Ordering::Relaxed);
    }
}

/// The test's end of one upstream link.
pub(crate) struct FakeUpstream {
    rx: mpsc::Receiver<Value>,
    tx: mpsc::Sender<Inbound>,
    shut: Arc<AtomicBool>,
}

/// A new link and the test's end of it; `to_gateway` is the link's inbound channel.
pub(crate) fn pair(to_gateway: mpsc::Sender<Inbound>) -> (MemoryLink, FakeUpstream) {
    let (tx, rx) = mpsc::channel(256);
    let shut = Arc::new(AtomicBool::new(false));
    (
        MemoryLink {
            tx,
            shut: shut.clone(),
        },
        FakeUpstream {
            rx,
            tx: to_gateway,
            shut,
        },
    )
}

impl FakeUpstream {
    /// The next message the gateway sent.
    pub(crate) async fn recv(&mut self) -> Value {
        self.rx.recv().await.expect("the gateway dropped the link")
    }

    /// The next message the gateway sent, skipping notifications.
    pub(crate) async fn next_request(&mut self) -> Value {
        loop {
            let m = self.recv().await;
            if m.get("id").is_some() {
                return m;
            }
        }
    }

    /// Sends a message to the gateway, as arriving on the stream of request `origin` when
    /// given (what an HTTP upstream's SSE response tells; stdio never does).
    pub(crate) async fn say(&self, value: Value, origin: Option<u64>) {
        let message = Message::ours(value);
        let _ = self.tx.send(Inbound::Message { message, origin }).await;
    }

    /// Answers `request` with `result`.
    pub(crate) async fn answer(&self, request: &Value, result: Value) {
        self.say(
            json!({"jsonrpc": "2.0", "id": request["id"], "result": result}),
            None,
        )
        .await;
    }

    /// Answers the gateway's `initialize` (the next message) as a server with `capabilities`.
    pub(crate) async fn accept_initialize(&mut self, capabilities: Value) -> Value {
        let init = self.recv().await;
        assert_eq!(init["method"], "initialize", "{init}");
        self.answer(
            &init,
            json!({"protocolVersion": "2025-11-25", "capabilities": capabilities,
                   "serverInfo": {"name": "fake", "version": "1"}}),
        )
        .await;
        init
    }

    /// The link ends with `cause` (what a process exit or a failed connection reports).
    pub(crate) async fn die(self, cause: &str) {
        let _ = self.tx.send(Inbound::Closed(cause.to_owned())).await;
    }

    /// Whether the gateway stopped this upstream.
    pub(crate) fn is_shut(&self) -> bool {
        self.shut.load(Ordering::Relaxed)
    }
}
