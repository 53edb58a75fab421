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
use crate::store::{LedgerEvent, Store};

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
    store: Arc<dyn Store>,
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

async fn write(store: &Arc<dyn Store>, metrics: &Metrics, batch: Vec<LedgerEvent>) {
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
