//! The ledger writer: session history and tool calls, recorded off the request path.
//!
//! The request path only `try_send`s into a bounded queue; one task drains it in batches
//! (up to 512 records or 50 ms) into the store. When the queue is full the record is counted
//! in `tether_ledger_dropped_total` and the call goes on: recording never slows a call down.
//!
//! Must not: block the request path; a full queue drops and counts.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
#[cfg(test)]
use crate::store::Ack;
pub use crate::store::LedgerSink;
use crate::store::{LedgerEvent, StoreError};

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

/// Records kept while the ledger database is unreachable before the oldest are dropped.
const BACKLOG: usize = 100_000;

/// Drains the queue into the store until `stop`, then writes what is left.
///
/// While the store reports itself unreachable ([`StoreError::Unavailable`], a PostgreSQL
/// outage) records wait in an in-memory backlog (bounded by `BACKLOG`; overflow is counted
/// in `tether_ledger_dropped_total`) and are written in order once it answers again,
/// retried with a doubling delay up to 30 s. Any other failure drops its batch, counted.
pub async fn run_writer(
    mut rx: mpsc::Receiver<LedgerEvent>,
    store: Arc<dyn LedgerSink>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut backlog: VecDeque<LedgerEvent> = VecDeque::new();
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let wake = retry.map(|(at, _)| at);
        let first = tokio::select! {
            e = rx.recv() => match e {
                Some(e) => Some(e),
                None => break,
            },
            () = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => None,
            _ = stop.cancelled() => break,
        };
        if let Some(first) = first {
            backlog.push_back(first);
            let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
            while backlog.len() < BATCH || retry.is_some() {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(e)) => backlog.push_back(e),
                    _ => break,
                }
            }
        }
        let waiting = retry.is_some_and(|(at, _)| tokio::time::Instant::now() < at);
        if !waiting {
            retry = write_backlog(&store, &metrics, &mut backlog, retry.map(|(_, d)| d)).await;
        }
        trim(&mut backlog, &metrics);
        metrics.ledger_queue_depth.set(rx.len() as i64);
    }
    // Shutdown: whatever is queued still gets written (once; an outage loses it, counted).
    while let Ok(e) = rx.try_recv() {
        backlog.push_back(e);
    }
    if write_backlog(&store, &metrics, &mut backlog, None)
        .await
        .is_some()
    {
        metrics.ledger_dropped.inc_by(backlog.len() as u64);
        tracing::warn!(
            records = backlog.len(),
            "ledger unreachable at shutdown: records not written"
        );
    }
}

fn trim(backlog: &mut VecDeque<LedgerEvent>, metrics: &Metrics) {
    let over = backlog.len().saturating_sub(BACKLOG);
    if over > 0 {
        backlog.drain(..over);
        metrics.ledger_dropped.inc_by(over as u64);
    }
    metrics.ledger_backlog.set(backlog.len() as i64);
}

/// Writes the backlog in batches. Returns when to retry if the store is unreachable.
async fn write_backlog(
    store: &Arc<dyn LedgerSink>,
    metrics: &Metrics,
    backlog: &mut VecDeque<LedgerEvent>,
    last_delay: Option<Duration>,
) -> Option<(tokio::time::Instant, Duration)> {
    while !backlog.is_empty() {
        let n = backlog.len().min(BATCH);
        let batch: Vec<LedgerEvent> = backlog.iter().take(n).cloned().collect();
        let started = Instant::now();
        let result = store.record(batch).await;
        metrics
            .ledger_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                backlog.drain(..n);
                if last_delay.is_some() {
                    tracing::info!("ledger reachable again; buffered records written");
                }
            }
            Err(StoreError::Unavailable(e)) => {
                let delay = last_delay
                    .map_or(Duration::from_millis(500), |d| d * 2)
                    .min(Duration::from_secs(30));
                if last_delay.is_none() {
                    tracing::warn!(error = %e, buffered = backlog.len(), "ledger unreachable: keeping records in memory until it is back");
                }
                return Some((tokio::time::Instant::now() + delay, delay));
            }
            Err(e) => {
                backlog.drain(..n);
                metrics.ledger_dropped.inc_by(n as u64);
                tracing::warn!(error = %e, records = n, "ledger batch not written");
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ToolCallRecord;

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

    /// A database that is down for its first `outage` writes, then records what it gets.
    struct Flaky {
        outage: std::sync::atomic::AtomicUsize,
        got: std::sync::Mutex<Vec<String>>,
    }
    impl LedgerSink for Flaky {
        fn record(&self, events: Vec<LedgerEvent>) -> Ack {
            use std::sync::atomic::Ordering;
            if self
                .outage
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Box::pin(std::future::ready(Err(StoreError::Unavailable(
                    "connection refused".into(),
                ))));
            }
            let mut got = self.got.lock().unwrap();
            for e in events {
                if let LedgerEvent::ToolCall(c) = e {
                    got.push(c.tool);
                }
            }
            Box::pin(std::future::ready(Ok(())))
        }
    }

    #[tokio::test]
    async fn an_unreachable_ledger_keeps_records_and_writes_them_in_order_on_recovery() {
        let metrics = Arc::new(Metrics::default());
        let (ledger, rx) = Ledger::new(metrics.clone());
        let sink = Arc::new(Flaky {
            outage: 3.into(),
            got: Default::default(),
        });
        let stop = CancellationToken::new();
        let writer = tokio::spawn(run_writer(rx, sink.clone(), metrics.clone(), stop.clone()));
        for i in 0..20 {
            let mut e = call();
            if let LedgerEvent::ToolCall(c) = &mut e {
                c.tool = format!("t{i}");
            }
            ledger.record(e);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Three failed attempts back off 0.5 + 1 + 2 s; then everything is written.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.got.lock().unwrap().len() < 20 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let got = sink.got.lock().unwrap().clone();
        let want: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
        assert_eq!(got, want, "every record, once, in order");
        assert_eq!(metrics.ledger_dropped.get(), 0);
        assert_eq!(metrics.ledger_backlog.get(), 0);
        stop.cancel();
        writer.await.unwrap();
    }
}
