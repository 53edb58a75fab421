//! The ledger writer: session history and tool calls, recorded off the request path.
//!
//! The request path only `try_send`s into a bounded queue; one task drains it in batches
//! (up to 512 records or 50 ms) into the store. When the queue is full the record is counted
//! in `tether_ledger_dropped_total` and the call goes on: recording never slows a call down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
#[cfg(test)]
use crate::store::Ack;
use crate::store::LedgerEvent;
pub use crate::store::LedgerSink;

const QUEUE: usize = 10_000;
const BATCH: usize = 512;

/// Handle for recording; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<LedgerEvent>,
    metrics: Arc<Metrics>,
}

impl Ledger {
    /// Creates the queue; run [`run_writer`] with the receiver.
    pub fn new(metrics: Arc<Metrics>) -> (Ledger, mpsc::Receiver<LedgerEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Ledger { tx, metrics }, rx)
    }

    /// Records an event without waiting; counts it as dropped if the queue is full.
    pub fn record(&self, event: LedgerEvent) {
        match self.tx.try_send(event) {
            Ok(()) => {
                self.metrics
                    .ledger_queue_depth
                    .set((QUEUE - self.tx.capacity()) as i64);
            }
            Err(_) => {
                self.metrics.ledger_dropped.inc();
            }
        }
    }
}

/// Drains the queue into the store until `stop`, then writes what is left.
pub async fn run_writer(
    mut rx: mpsc::Receiver<LedgerEvent>,
    store: Arc<dyn LedgerSink>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            e = rx.recv() => e,
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                _ => break,
            }
        }
        write(&store, &metrics, batch).await;
        metrics.ledger_queue_depth.set(rx.len() as i64);
    }
    // Shutdown: whatever is queued still gets written.
    let mut rest = Vec::new();
    while let Ok(e) = rx.try_recv() {
        rest.push(e);
    }
    if !rest.is_empty() {
        write(&store, &metrics, rest).await;
    }
}

async fn write(store: &Arc<dyn LedgerSink>, metrics: &Metrics, batch: Vec<LedgerEvent>) {
    let started = Instant::now();
    let n = batch.len();
    if let Err(e) = store.record(batch).await {
        metrics.ledger_dropped.inc_by(n as u64);
        tracing::warn!(error = %e, records = n, "ledger batch not written");
    }
    metrics
        .ledger_batch_seconds
        .observe(started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreError, ToolCallRecord};

    fn call() -> LedgerEvent {
        LedgerEvent::ToolCall(ToolCallRecord {
            session_id: "s".into(),
            tool: "echo".into(),
            started_ms: 0,
            duration_ms: 1,
            outcome: "ok".into(),
            error_code: None,
        })
    }

    /// A store that never finishes a write.
    struct Stuck;
    impl LedgerSink for Stuck {
        fn record(&self, _: Vec<LedgerEvent>) -> Ack {
            Box::pin(std::future::pending())
        }
    }

    /// A store whose every write fails.
    struct Broken(std::sync::atomic::AtomicUsize);
    impl LedgerSink for Broken {
        fn record(&self, _: Vec<LedgerEvent>) -> Ack {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(std::future::ready(Err(StoreError::Backend(
                "disk full".into(),
            ))))
        }
    }

    #[tokio::test]
    async fn a_stuck_store_never_makes_recording_wait() {
        let metrics = Arc::new(Metrics::default());
        let (ledger, rx) = Ledger::new(metrics.clone());
        let stop = CancellationToken::new();
        let writer = tokio::spawn(run_writer(
            rx,
            Arc::new(Stuck),
            metrics.clone(),
            stop.clone(),
        ));
        // Far more records than the queue holds: every call returns at once (the test would
        // hang otherwise) and the overflow is counted, not lost silently.
        for _ in 0..(QUEUE + BATCH + 100) {
            ledger.record(call());
        }
        assert!(
            metrics.ledger_dropped.get() >= 100,
            "dropped {}",
            metrics.ledger_dropped.get()
        );
        writer.abort();
    }

    #[tokio::test]
    async fn a_failing_store_is_counted_and_the_writer_keeps_going() {
        let metrics = Arc::new(Metrics::default());
        let (ledger, rx) = Ledger::new(metrics.clone());
        let sink = Arc::new(Broken(Default::default()));
        let stop = CancellationToken::new();
        let writer = tokio::spawn(run_writer(rx, sink.clone(), metrics.clone(), stop.clone()));
        ledger.record(call());
        tokio::time::sleep(Duration::from_millis(150)).await;
        ledger.record(call());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            sink.0.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "a batch after a failure is still written"
        );
        assert_eq!(metrics.ledger_dropped.get(), 2);
        stop.cancel();
        writer.await.unwrap();
    }
}
