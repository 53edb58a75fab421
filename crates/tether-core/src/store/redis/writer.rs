//! The writer task: every write goes through one pipeline in order; while Redis is away
//! writes wait in a bounded backlog (oldest dropped and counted) and are replayed in order
//! when it answers again.
//! Must not: block a caller (writes are queued, never awaited on the request path) or grow
//! the backlog past its bound.

use super::*;

/// Writes kept in memory during an outage before the oldest are dropped.
pub(super) const BACKLOG: usize = 100_000;

/// Commands per pipeline when writing a backlog.
pub(super) const CHUNK: usize = 1024;

/// The writer task: applies writes in order, one pipeline per batch; buffers through
/// outages. Ends when every [`RedisStore`] clone is gone.
pub(super) async fn writer(
    mut conn: ConnectionManager,
    mut rx: mpsc::UnboundedReceiver<Op>,
    up: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    reconnected: Arc<tokio::sync::Notify>,
) {
    let mut backlog: VecDeque<Cmd> = VecDeque::new();
    let mut touches: HashMap<String, i64> = HashMap::new();
    let mut closed = false;
    while !closed {
        let healthy = up.load(Ordering::Relaxed);
        let mut batch = Vec::new();
        if healthy {
            match rx.recv().await {
                Some(op) => batch.push(op),
                None => closed = true,
            }
        } else {
            // Outage: retry twice a second, and keep taking writes meanwhile.
            tokio::select! {
                op = rx.recv() => match op {
                    Some(op) => batch.push(op),
                    None => closed = true,
                },
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        while let Ok(op) = rx.try_recv() {
            batch.push(op);
        }
        let mut healthy = healthy;
        let wants_durable = batch
            .iter()
            .any(|op| matches!(op, Op::Write { durable: true, .. } | Op::Flush(_)));
        if !healthy && wants_durable && drain(&mut conn, &mut backlog).await.is_ok() {
            // Redis came back since the last retry. Refusing on the stale state instead
            // lost every record an instance wrote back after a Redis restart whenever it
            // still had writes buffered (found by `a_redis_that_lost_everything_...`).
            recovered(&up, &metrics, &reconnected);
            healthy = true;
        }
        let mut cmds: Vec<Cmd> = Vec::new();
        // Commands of durable writes: on a failed batch they are not buffered, since their
        // callers were told the write failed (a refused session must not appear later).
        let mut durable_cmds: Vec<bool> = Vec::new();
        let mut acks: Vec<(Done, bool)> = Vec::new();
        // Given back when this batch is sent or buffered (the end of this turn).
        let mut _holds: Vec<Hold> = Vec::new();
        for op in batch {
            match op {
                Op::Write {
                    cmds: c,
                    done,
                    durable,
                    hold,
                } => {
                    _holds.extend(hold);
                    if durable && !healthy {
                        if let Some(d) = done {
                            let _ = d.send(Err(StoreError::Unavailable(
                                "redis is unreachable; the gateway cannot record new sessions now"
                                    .into(),
                            )));
                        }
                        continue;
                    }
                    durable_cmds.extend(std::iter::repeat_n(durable, c.len()));
                    cmds.extend(c);
                    if let Some(d) = done {
                        acks.push((d, durable));
                    }
                }
                Op::Touch(key, at) => {
                    let slot = touches.entry(key).or_insert(at);
                    *slot = (*slot).max(at);
                }
                Op::Flush(d) => acks.push((d, true)),
            }
        }
        let touch_cmds = std::mem::take(&mut touches);
        if !healthy {
            // Try the backlog first; writes stay in order behind it.
            backlog.extend(cmds);
            for (key, at) in touch_cmds {
                touches.insert(key, at);
            }
            match drain(&mut conn, &mut backlog).await {
                Ok(()) => {
                    recovered(&up, &metrics, &reconnected);
                    for (d, _) in acks {
                        let _ = d.send(Ok(()));
                    }
                }
                Err(_) => {
                    for (d, durable) in acks {
                        let _ = d.send(if durable {
                            Err(StoreError::Unavailable("redis is unreachable".into()))
                        } else {
                            Ok(())
                        });
                    }
                }
            }
            trim(&mut backlog, &metrics);
            continue;
        }
        let touch_list: Vec<(String, i64)> = touch_cmds.into_iter().collect();
        let mut pipe = Pipeline::new();
        for c in &cmds {
            pipe.add_command(c.clone()).ignore();
        }
        for (meta, at) in &touch_list {
            for c in touch_commands(meta, *at) {
                pipe.add_command(c).ignore();
            }
        }
        if pipe.cmd_iter().next().is_none() {
            for (d, _) in acks {
                let _ = d.send(Ok(()));
            }
            continue;
        }
        match pipe.exec_async(&mut conn).await {
            Ok(()) => {
                for (d, _) in acks {
                    let _ = d.send(Ok(()));
                }
            }
            Err(e) if transient(&e) => {
                up.store(false, Ordering::Relaxed);
                metrics.store_up.set(0);
                metrics.store_outages.inc();
                tracing::error!(error = %e, "redis unreachable: serving held sessions from memory, buffering writes, refusing new sessions until it is back");
                backlog.extend(
                    cmds.into_iter()
                        .zip(durable_cmds)
                        .filter(|(_, durable)| !durable)
                        .map(|(c, _)| c),
                );
                for (meta, at) in touch_list {
                    touches.insert(meta, at);
                }
                for (d, durable) in acks {
                    let _ = d.send(if durable {
                        Err(StoreError::Unavailable(format!("redis: {e}")))
                    } else {
                        Ok(())
                    });
                }
                trim(&mut backlog, &metrics);
            }
            Err(e) => {
                tracing::error!(error = %e, "redis refused a write batch");
                let err = StoreError::Backend(format!("redis: {e}"));
                for (d, _) in acks {
                    let _ = d.send(Err(err.clone()));
                }
            }
        }
    }
}

pub(super) fn recovered(up: &AtomicBool, metrics: &Metrics, reconnected: &tokio::sync::Notify) {
    reconnected.notify_one();
    up.store(true, Ordering::Relaxed);
    metrics.store_up.set(1);
    tracing::info!("redis reachable again; buffered writes written");
}

pub(super) fn trim(backlog: &mut VecDeque<Cmd>, metrics: &Metrics) {
    let over = backlog.len().saturating_sub(BACKLOG);
    if over > 0 {
        backlog.drain(..over);
        metrics.store_dropped.inc_by(over as u64);
        tracing::warn!(
            dropped = over,
            "redis outage buffer full: oldest buffered writes dropped"
        );
    }
    metrics.store_buffered.set(backlog.len() as i64);
}

pub(super) async fn drain(
    conn: &mut ConnectionManager,
    backlog: &mut VecDeque<Cmd>,
) -> Result<(), ()> {
    let pong: Result<String, _> = redis::cmd("PING").query_async(conn).await;
    if pong.is_err() {
        return Err(());
    }
    while !backlog.is_empty() {
        let n = backlog.len().min(CHUNK);
        let mut pipe = Pipeline::new();
        for c in backlog.iter().take(n) {
            pipe.add_command(c.clone()).ignore();
        }
        match pipe.exec_async(conn).await {
            Ok(()) => {
                backlog.drain(..n);
            }
            Err(e) if transient(&e) => return Err(()),
            Err(e) => {
                // A write Redis refuses will never succeed; do not block the rest on it.
                tracing::error!(error = %e, "redis refused buffered writes; skipping them");
                backlog.drain(..n);
            }
        }
    }
    Ok(())
}

/// A touch is queued as `"{prefix}\n{id}\n{ttl_ms}"` so the writer can build it alone.
pub(super) fn touch_commands(meta: &str, at: i64) -> Vec<Cmd> {
    let mut parts = meta.splitn(3, '\n');
    let (Some(p), Some(id), Some(ttl)) = (parts.next(), parts.next(), parts.next()) else {
        return Vec::new();
    };
    let s = format!("{p}s:{id}");
    let mut hset = redis::cmd("HSET");
    hset.arg(&s).arg("last").arg(at);
    let mut exp = redis::cmd("PEXPIRE");
    exp.arg(&s).arg(ttl);
    let mut zadd = redis::cmd("ZADD");
    zadd.arg(format!("{p}live")).arg("XX").arg(at).arg(id);
    let mut own = redis::cmd("PEXPIRE");
    own.arg(format!("{p}own:{id}")).arg(ttl);
    vec![hset, exp, zadd, own]
}
