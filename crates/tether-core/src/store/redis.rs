//! The Redis live store: session records, stream logs and the coordination of several
//! instances (heartbeats, session ownership, a drop inbox per instance).
//!
//! Keys, all under the configured prefix `P`:
//!
//! | key | type | holds | expiry |
//! |---|---|---|---|
//! | `P:s:{id}` | hash | `rec` (the record as JSON), `last`, `state`, `reason`, `closed`, `restore` | session TTL, refreshed on activity |
//! | `P:live` | sorted set | live session ids by last activity | members removed on close |
//! | `P:own:{id}` | string | owning instance id | session TTL, refreshed on activity |
//! | `P:sts:{id}` | set | stream ids of the session | session TTL |
//! | `P:st:{id}:{stream}` | hash | `meta` (JSON), `done`, `last` | session TTL |
//! | `P:ev:{id}:{stream}` | list | `"{seq} {json}"`, the last [`MAX_EVENTS`] | session TTL |
//! | `P:done` | sorted set | finished streams by finish time, for pruning | members removed on prune |
//! | `P:gone:{id}` | set | stream ids of a closed session, still to delete | none: emptied by prune |
//! | `P:gone` | set | closed sessions with a `P:gone:{id}` | members removed on prune |
//! | `P:inst:{instance}` | string | the instance's heartbeat (JSON) | instance TTL |
//! | `P:instances` | sorted set | instance ids by last heartbeat | stale members removed after an hour |
//! | `P:inbox:{instance}` | list | session ids the instance must drop | one minute |
//! | `P:epoch` | string | a random value set by the first instance to find it missing | none |
//!
//! A Redis that restarts without persistence comes back empty: `P:epoch` is gone, and the
//! first instance to look sets a new one. Every instance compares it with the one it last
//! saw (heartbeat, and every lookup that finds no session record); for one instance TTL
//! after a change a missing record may still be written back by the instance that holds
//! the session ([`Coordinator::write_back_window`]), so lookups wait for it instead of
//! answering 404, and holders write their sessions back at once when they notice.
//!
//! Writes go through one task, in order, as pipelines (one round trip for whatever queued
//! during the previous one: the same group commit as the SQLite writer). When Redis cannot
//! be reached, writes of sessions already being served are kept in memory (bounded) and
//! written in order on recovery, and their acks resolve at once so those sessions keep
//! working; a write that must be durable before a client sees it (a new session) fails
//! with [`StoreError::Unavailable`] instead, which the front door turns into 503 +
//! `Retry-After`.
//!
//! Must not: be used for the ledger, or let a Redis outage stall a held session.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Cmd, Pipeline, Script};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::{
    Ack, Coordinator, EventRecord, InstanceInfo, LiveStore, Owner, SessionRecord, SessionState,
    StoreError, StreamRecord, now_ms,
};
use crate::metrics::Metrics;

/// Events kept per stream; older ones are trimmed (a client that far behind re-initializes).
pub const MAX_EVENTS: isize = 1000;
/// Writes kept in memory during an outage before the oldest are dropped.
const BACKLOG: usize = 100_000;
/// Commands per pipeline when writing a backlog.
const CHUNK: usize = 1024;

type Done = oneshot::Sender<Result<(), StoreError>>;

enum Op {
    /// Commands applied in order. `durable`: refuse during an outage instead of buffering.
    Write {
        cmds: Vec<Cmd>,
        done: Option<Done>,
        durable: bool,
    },
    Touch(String, i64),
    Flush(Done),
}

/// Settings of a Redis store.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// Key prefix (without the trailing `:`).
    pub prefix: String,
    /// Sliding TTL of session records and their streams.
    pub session_ttl: Duration,
    /// Heartbeat lifetime of an instance.
    pub instance_ttl: Duration,
    /// Where other instances reach this one's MCP listener.
    pub advertise_url: String,
}

/// Redis-backed [`LiveStore`] and [`Coordinator`].
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    p: String,
    ttl_ms: i64,
    instance_ttl_ms: i64,
    me: InstanceInfo,
    writes: mpsc::UnboundedSender<Op>,
    up: Arc<AtomicBool>,
    describe: String,
    /// Notified when the writer reaches Redis again after an outage.
    reconnected: Arc<tokio::sync::Notify>,
    epoch: std::sync::Mutex<Epoch>,
}

/// The `P:epoch` this instance last saw, and when it last saw it change.
#[derive(Default)]
struct Epoch {
    seen: Option<String>,
    changed: Option<tokio::time::Instant>,
}

fn unavailable(e: &redis::RedisError) -> StoreError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
        StoreError::Unavailable(format!("redis: {e}"))
    } else {
        StoreError::Backend(format!("redis: {e}"))
    }
}

fn transient(e: &redis::RedisError) -> bool {
    matches!(unavailable(e), StoreError::Unavailable(_))
}

/// Claims a session unless another instance with a live heartbeat owns it.
const CLAIM: &str = r"
local o = redis.call('GET', KEYS[1])
if o and o ~= ARGV[1] then
  local info = redis.call('GET', ARGV[3] .. o)
  if info then return {o, info, ''} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {ARGV[1], '', o or ''}
";

/// Marks a session closed and hands its stream set to pruning (`P:gone`): a busy session
/// has hundreds of thousands of streams, and deleting them all in one script would block
/// Redis, and every instance, for as long.
const CLOSE: &str = r"
if redis.call('HEXISTS', KEYS[1], 'rec') == 1 and redis.call('HGET', KEYS[1], 'state') ~= 'closed' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'reason', ARGV[1], 'closed', ARGV[2])
end
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[3])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('SUNIONSTORE', KEYS[5], KEYS[5], KEYS[4])
  redis.call('DEL', KEYS[4])
  redis.call('SADD', KEYS[6], ARGV[3])
end
return 0
";

/// Deletes up to `ARGV[4]` streams of one closed session named in `P:gone` (`KEYS[1]`);
/// `ARGV[1..3]`: the `P:gone:`, `P:st:` and `P:ev:` prefixes, `KEYS[2]` `P:done`. Returns
/// the events deleted and 1 if anything is left to delete.
const PRUNE_GONE: &str = r"
local id = redis.call('SRANDMEMBER', KEYS[1])
if not id then return {0, 0} end
local set = ARGV[1] .. id
local streams = redis.call('SPOP', set, tonumber(ARGV[4]))
local events = 0
for _, s in ipairs(streams) do
  local ev = ARGV[3] .. id .. ':' .. s
  events = events + redis.call('LLEN', ev)
  redis.call('DEL', ev, ARGV[2] .. id .. ':' .. s)
  redis.call('ZREM', KEYS[2], id .. '\n' .. s)
end
if redis.call('EXISTS', set) == 0 then redis.call('SREM', KEYS[1], id) end
return {events, redis.call('SCARD', KEYS[1]) > 0 and 1 or 0}
";

impl RedisStore {
    /// Connects (lazily: the instance starts even when Redis is down, and reports it) and
    /// starts the writer task.
    pub fn open(opts: &RedisOptions, metrics: Arc<Metrics>) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(opts.url.as_str())
            .map_err(|e| StoreError::Backend(format!("redis URL: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = client
            .get_connection_manager_lazy(config)
            .map_err(|e| StoreError::Backend(format!("redis: {e}")))?;
        let (writes, rx) = mpsc::unbounded_channel();
        let up = Arc::new(AtomicBool::new(true));
        let reconnected = Arc::new(tokio::sync::Notify::new());
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let shown = match opts.url.split_once('@') {
            // Keep passwords out of logs.
            Some((scheme_user, host)) => format!(
                "{}://***@{host}",
                scheme_user.split("://").next().unwrap_or("redis")
            ),
            None => opts.url.clone(),
        };
        let inner = Inner {
            conn: conn.clone(),
            p: format!("{}:", opts.prefix),
            ttl_ms: ms(opts.session_ttl),
            instance_ttl_ms: ms(opts.instance_ttl).max(1000),
            me: InstanceInfo {
                id: crate::ids::new_instance_id(),
                url: opts.advertise_url.trim_end_matches('/').to_owned(),
                started_ms: now_ms(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            writes,
            up: up.clone(),
            describe: format!("{shown} prefix {:?}", opts.prefix),
            reconnected: reconnected.clone(),
            epoch: std::sync::Mutex::default(),
        };
        tokio::spawn(writer(conn, rx, up, metrics, reconnected));
        Ok(RedisStore {
            inner: Arc::new(inner),
        })
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.inner.p)
    }

    fn stream_key(&self, kind: &str, session: &str, stream: &str) -> String {
        format!("{}{kind}:{session}:{stream}", self.inner.p)
    }

    fn submit(&self, cmds: Vec<Cmd>, durable: bool) -> Ack {
        self.send(|done| Op::Write {
            cmds,
            done: Some(done),
            durable,
        })
    }

    fn send(&self, make: impl FnOnce(Done) -> Op) -> Ack {
        let (tx, rx) = oneshot::channel();
        if self.inner.writes.send(make(tx)).is_err() {
            return Box::pin(std::future::ready(Err(StoreError::Closed)));
        }
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// Sets `P:epoch` if Redis lost it, and reads it (one result, the epoch).
    fn epoch_commands(&self, pipe: &mut Pipeline) {
        let key = format!("{}epoch", self.inner.p);
        pipe.cmd("SET")
            .arg(&key)
            .arg(crate::ids::new_instance_id())
            .arg("NX")
            .ignore();
        pipe.cmd("GET").arg(&key);
    }

    /// Records the epoch just read; true when it differs from the one seen before (Redis
    /// restarted without its data since).
    fn note_epoch(&self, epoch: Option<String>) -> bool {
        let mut e = self.inner.epoch.lock().unwrap_or_else(|p| p.into_inner());
        if e.seen.is_none() {
            e.seen = epoch;
            return false;
        }
        if epoch.is_some() && e.seen != epoch {
            tracing::warn!(
                "redis lost its data (restart without persistence?): held sessions are written back; lookups of missing sessions wait for that before answering 404"
            );
            e.seen = epoch;
            e.changed = Some(tokio::time::Instant::now());
            return true;
        }
        false
    }

    fn expire(&self, key: &str) -> Cmd {
        let mut c = redis::cmd("PEXPIRE");
        c.arg(key).arg(self.inner.ttl_ms);
        c
    }

    fn record_cmds(&self, r: &SessionRecord, owner_nx: bool) -> Vec<Cmd> {
        let key = self.key("s", &r.id);
        let mut hset = redis::cmd("HSET");
        hset.arg(&key)
            .arg("rec")
            .arg(record_json(r).to_string())
            .arg("last")
            .arg(r.last_active_ms)
            .arg("state")
            .arg(r.state.as_str())
            .arg("restore")
            .arg(r.restore.to_string());
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(format!("{}live", self.inner.p))
            .arg(r.last_active_ms)
            .arg(&r.id);
        let mut own = redis::cmd("SET");
        own.arg(self.key("own", &r.id))
            .arg(&self.inner.me.id)
            .arg("PX")
            .arg(self.inner.ttl_ms);
        if owner_nx {
            own.arg("NX");
        }
        vec![hset, self.expire(&key), zadd, own]
    }

    /// Deletes every key under this store's prefix (tests and `tether` never call this on a
    /// shared prefix).
    #[cfg(test)]
    pub async fn wipe(&self) {
        let mut conn = self.conn();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.inner.p))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
        }
    }
}

fn record_json(r: &SessionRecord) -> Value {
    json!({
        "id": r.id,
        "principal": r.principal,
        "principal_email": r.principal_email,
        "principal_name": r.principal_name,
        "client_type": r.client_type,
        "transport": r.transport,
        "created_ms": r.created_ms,
        "protocol_version": r.protocol_version,
        "init_params": r.init_params,
        "client_name": r.client_name,
        "client_version": r.client_version,
        "upstream_name": r.upstream_name,
        "upstream_fingerprint": r.upstream_fingerprint,
    })
}

fn decode_record(mut h: HashMap<String, String>) -> Result<Option<SessionRecord>, StoreError> {
    let Some(rec) = h.remove("rec") else {
        return Ok(None);
    };
    let corrupt = |what: &str| StoreError::Corrupt(format!("redis session record: {what}"));
    let v: Value = serde_json::from_str(&rec).map_err(|e| corrupt(&e.to_string()))?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let num = |t: Option<&String>| t.and_then(|t| t.parse::<i64>().ok());
    Ok(Some(SessionRecord {
        id: s("id").ok_or_else(|| corrupt("id"))?,
        principal: s("principal").ok_or_else(|| corrupt("principal"))?,
        principal_email: s("principal_email"),
        principal_name: s("principal_name"),
        client_type: s("client_type").unwrap_or_else(|| "unknown".into()),
        transport: s("transport").unwrap_or_else(|| "streamable-http".into()),
        created_ms: v.get("created_ms").and_then(Value::as_i64).unwrap_or(0),
        last_active_ms: num(h.get("last")).unwrap_or(0),
        protocol_version: s("protocol_version").unwrap_or_default(),
        init_params: v.get("init_params").cloned().unwrap_or(Value::Null),
        client_name: s("client_name"),
        client_version: s("client_version"),
        upstream_name: s("upstream_name").unwrap_or_default(),
        upstream_fingerprint: s("upstream_fingerprint"),
        state: if h.get("state").map(String::as_str) == Some("closed") {
            SessionState::Closed
        } else {
            SessionState::Live
        },
        close_reason: h.get("reason").cloned(),
        closed_ms: num(h.get("closed")),
        restore: h
            .get("restore")
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_else(|| json!({})),
    }))
}

fn decode_stream(
    session_id: &str,
    stream_id: &str,
    h: &HashMap<String, String>,
) -> Option<StreamRecord> {
    if h.is_empty() {
        return None;
    }
    let meta: Value = h
        .get("meta")
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or(Value::Null);
    Some(StreamRecord {
        session_id: session_id.to_owned(),
        stream_id: stream_id.to_owned(),
        client_request_id: meta
            .get("client_request_id")
            .cloned()
            .filter(|v| !v.is_null()),
        request: meta.get("request").cloned().filter(|v| !v.is_null()),
        retryable: meta
            .get("retryable")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        done: h.get("done").map(String::as_str) == Some("1"),
        last_seq: h.get("last").and_then(|t| t.parse().ok()).unwrap_or(0),
        created_ms: meta.get("created_ms").and_then(Value::as_i64).unwrap_or(0),
    })
}

/// The writer task: applies writes in order, one pipeline per batch; buffers through
/// outages. Ends when every [`RedisStore`] clone is gone.
async fn writer(
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
        for op in batch {
            match op {
                Op::Write {
                    cmds: c,
                    done,
                    durable,
                } => {
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

fn recovered(up: &AtomicBool, metrics: &Metrics, reconnected: &tokio::sync::Notify) {
    reconnected.notify_one();
    up.store(true, Ordering::Relaxed);
    metrics.store_up.set(1);
    tracing::info!("redis reachable again; buffered writes written");
}

fn trim(backlog: &mut VecDeque<Cmd>, metrics: &Metrics) {
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

async fn drain(conn: &mut ConnectionManager, backlog: &mut VecDeque<Cmd>) -> Result<(), ()> {
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
fn touch_commands(meta: &str, at: i64) -> Vec<Cmd> {
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

#[async_trait::async_trait]
impl LiveStore for RedisStore {
    fn describe(&self) -> String {
        format!("redis {}", self.inner.describe)
    }

    async fn create_session(&self, record: SessionRecord) -> Result<(), StoreError> {
        self.submit(self.record_cmds(&record, false), true).await
    }

    async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.key("s", id))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        decode_record(h)
    }

    fn touch(&self, id: &str, at_ms: i64) {
        let meta = format!("{}\n{id}\n{}", self.inner.p, self.inner.ttl_ms);
        let _ = self.inner.writes.send(Op::Touch(meta, at_ms));
    }

    fn set_restore(&self, id: &str, restore: Value) -> Ack {
        let mut c = redis::cmd("HSET");
        c.arg(self.key("s", id))
            .arg("restore")
            .arg(restore.to_string());
        self.submit(vec![c], false)
    }

    async fn close_session(&self, id: &str, reason: &str, at_ms: i64) -> Result<(), StoreError> {
        let p = &self.inner.p;
        let mut c = redis::cmd("EVAL");
        c.arg(CLOSE)
            .arg(6)
            .arg(self.key("s", id))
            .arg(format!("{p}live"))
            .arg(self.key("own", id))
            .arg(self.key("sts", id))
            .arg(self.key("gone", id))
            .arg(format!("{p}gone"))
            .arg(reason)
            .arg(at_ms)
            .arg(id);
        self.submit(vec![c], false).await
    }

    async fn idle_sessions(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        redis::cmd("ZRANGE")
            .arg(format!("{}live", self.inner.p))
            .arg("-inf")
            .arg(format!("({cutoff_ms}"))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn count_live(&self) -> Result<u64, StoreError> {
        redis::cmd("ZCARD")
            .arg(format!("{}live", self.inner.p))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))
    }

    fn open_stream(&self, r: StreamRecord) -> Ack {
        let key = self.stream_key("st", &r.session_id, &r.stream_id);
        let meta = json!({
            "client_request_id": r.client_request_id,
            "request": r.request,
            "retryable": r.retryable,
            "created_ms": r.created_ms,
        });
        let mut cmds = Vec::new();
        for (field, value) in [
            ("meta", meta.to_string()),
            ("done", if r.done { "1" } else { "0" }.to_owned()),
            ("last", r.last_seq.to_string()),
        ] {
            let mut c = redis::cmd("HSETNX");
            c.arg(&key).arg(field).arg(value);
            cmds.push(c);
        }
        cmds.push(self.expire(&key));
        let sts = self.key("sts", &r.session_id);
        let mut sadd = redis::cmd("SADD");
        sadd.arg(&sts).arg(&r.stream_id);
        cmds.push(sadd);
        cmds.push(self.expire(&sts));
        self.submit(cmds, false)
    }

    fn append_event(&self, e: EventRecord) -> Ack {
        let ev = self.stream_key("ev", &e.session_id, &e.stream_id);
        let st = self.stream_key("st", &e.session_id, &e.stream_id);
        let sts = self.key("sts", &e.session_id);
        let mut push = redis::cmd("RPUSH");
        push.arg(&ev).arg(format!("{} {}", e.seq, e.data));
        let mut trim = redis::cmd("LTRIM");
        trim.arg(&ev).arg(-MAX_EVENTS).arg(-1);
        let mut last = redis::cmd("HSET");
        last.arg(&st).arg("last").arg(e.seq);
        if e.terminal {
            last.arg("done").arg(1);
        }
        let mut sadd = redis::cmd("SADD");
        sadd.arg(&sts).arg(&*e.stream_id);
        let mut cmds = vec![
            push,
            trim,
            self.expire(&ev),
            last,
            self.expire(&st),
            sadd,
            self.expire(&sts),
        ];
        if e.terminal {
            let mut done = redis::cmd("ZADD");
            done.arg(format!("{}done", self.inner.p))
                .arg(now_ms())
                .arg(format!("{}\n{}", e.session_id, e.stream_id));
            cmds.push(done);
        }
        self.submit(cmds, false)
    }

    fn flush(&self) -> Ack {
        self.send(Op::Flush)
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        // Straight to Redis, not through the writer, whose outage buffer would accept it.
        redis::cmd("SET")
            .arg(self.key("ready", &self.inner.me.id))
            .arg(now_ms())
            .arg("PX")
            .arg(60_000)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn events_after(
        &self,
        session_id: &str,
        stream_id: &str,
        after: u64,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let items: Vec<String> = redis::cmd("LRANGE")
            .arg(self.stream_key("ev", session_id, stream_id))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let mut out = Vec::new();
        for item in items {
            let (seq, data) = item
                .split_once(' ')
                .and_then(|(s, d)| Some((s.parse::<u64>().ok()?, d)))
                .ok_or_else(|| StoreError::Corrupt("redis event entry".into()))?;
            if seq > after {
                out.push((seq, data.to_owned()));
            }
        }
        Ok(out)
    }

    async fn stream(
        &self,
        session_id: &str,
        stream_id: &str,
    ) -> Result<Option<StreamRecord>, StoreError> {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.stream_key("st", session_id, stream_id))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(decode_stream(session_id, stream_id, &h))
    }

    async fn unfinished_streams(&self, session_id: &str) -> Result<Vec<StreamRecord>, StoreError> {
        let mut conn = self.conn();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key("sts", session_id))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let ids: Vec<String> = ids
            .into_iter()
            .filter(|s| s != super::STANDALONE_STREAM)
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = Pipeline::new();
        for id in &ids {
            pipe.cmd("HGETALL")
                .arg(self.stream_key("st", session_id, id));
        }
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut out: Vec<StreamRecord> = ids
            .iter()
            .zip(hashes.iter())
            .filter(|(_, h)| h.contains_key("meta"))
            .filter_map(|(id, h)| decode_stream(session_id, id, h))
            .filter(|s| !s.done)
            .collect();
        out.sort_by_key(|s| s.created_ms);
        Ok(out)
    }

    async fn prune_events(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let p = &self.inner.p;
        let done = format!("{p}done");
        let mut removed = 0u64;
        // Closed sessions' streams first, 500 per script run so Redis never blocks for long.
        loop {
            let (events, more): (u64, u8) = redis::cmd("EVAL")
                .arg(PRUNE_GONE)
                .arg(2)
                .arg(format!("{p}gone"))
                .arg(&done)
                .arg(format!("{p}gone:"))
                .arg(format!("{p}st:"))
                .arg(format!("{p}ev:"))
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            removed += events;
            if more == 0 {
                break;
            }
        }
        loop {
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(&done)
                .arg("-inf")
                .arg(format!("({cutoff_ms}"))
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            if members.is_empty() {
                return Ok(removed);
            }
            let mut pipe = Pipeline::new();
            for m in &members {
                let Some((sid, stream)) = m.split_once('\n') else {
                    continue;
                };
                pipe.cmd("LLEN").arg(self.stream_key("ev", sid, stream));
                pipe.cmd("DEL")
                    .arg(self.stream_key("ev", sid, stream))
                    .arg(self.stream_key("st", sid, stream))
                    .ignore();
                pipe.cmd("SREM")
                    .arg(self.key("sts", sid))
                    .arg(stream)
                    .ignore();
            }
            pipe.cmd("ZREM").arg(&done).arg(&members).ignore();
            let lens: Vec<u64> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            removed += lens.iter().sum::<u64>();
        }
    }
}

#[async_trait::async_trait]
impl Coordinator for RedisStore {
    fn me(&self) -> &InstanceInfo {
        &self.inner.me
    }

    async fn heartbeat(&self) -> Result<bool, StoreError> {
        let me = &self.inner.me;
        let info = serde_json::to_string(me).unwrap_or_default();
        let mut pipe = Pipeline::new();
        self.epoch_commands(&mut pipe);
        pipe.cmd("SET")
            .arg(self.key("inst", &me.id))
            .arg(info)
            .arg("PX")
            .arg(self.inner.instance_ttl_ms)
            .arg("GET");
        pipe.cmd("ZADD")
            .arg(format!("{}instances", self.inner.p))
            .arg(now_ms())
            .arg(&me.id)
            .ignore();
        let (epoch, old): (Option<String>, Option<String>) = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let restarted = self.note_epoch(epoch);
        Ok(old.is_none() || restarted)
    }

    async fn write_back_window(&self) -> Result<Option<Duration>, StoreError> {
        let mut pipe = Pipeline::new();
        self.epoch_commands(&mut pipe);
        let (epoch,): (Option<String>,) = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        self.note_epoch(epoch);
        let window = Duration::from_millis(self.inner.instance_ttl_ms.unsigned_abs());
        let changed = self
            .inner
            .epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .changed;
        Ok(changed
            .map(|t| t.elapsed())
            .filter(|e| *e < window)
            .map(|e| window - e))
    }

    async fn reconnected(&self) {
        self.inner.reconnected.notified().await;
    }

    async fn leave(&self) {
        let me = &self.inner.me.id;
        let mut pipe = Pipeline::new();
        pipe.cmd("DEL").arg(self.key("inst", me)).ignore();
        pipe.cmd("ZREM")
            .arg(format!("{}instances", self.inner.p))
            .arg(me)
            .ignore();
        if let Err(e) = pipe.exec_async(&mut self.conn()).await {
            tracing::warn!(error = %e, "cannot remove this instance's heartbeat; its sessions move once it expires");
        }
    }

    async fn claim(&self, session_id: &str) -> Result<Owner, StoreError> {
        let (owner, info, previous): (String, String, String) = Script::new(CLAIM)
            .key(self.key("own", session_id))
            .arg(&self.inner.me.id)
            .arg(self.inner.ttl_ms)
            .arg(format!("{}inst:", self.inner.p))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        if owner == self.inner.me.id {
            return Ok(if previous.is_empty() || previous == owner {
                Owner::Me
            } else {
                Owner::TookOver { from: previous }
            });
        }
        let info: InstanceInfo = serde_json::from_str(&info)
            .map_err(|e| StoreError::Corrupt(format!("instance heartbeat: {e}")))?;
        Ok(Owner::Other {
            instance: owner,
            url: info.url,
        })
    }

    async fn owners(&self, ids: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key("own", id)).collect();
        redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn instances(&self) -> Result<Vec<InstanceInfo>, StoreError> {
        let mut conn = self.conn();
        let set = format!("{}instances", self.inner.p);
        let _: Result<(), _> = redis::cmd("ZREMRANGEBYSCORE")
            .arg(&set)
            .arg("-inf")
            .arg(now_ms() - 3_600_000)
            .query_async(&mut conn)
            .await;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(&set)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key("inst", id)).collect();
        let infos: Vec<Option<String>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut out: Vec<InstanceInfo> = infos
            .into_iter()
            .flatten()
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect();
        out.sort_by_key(|i| i.started_ms);
        Ok(out)
    }

    async fn send_drop(&self, instance: &str, session_id: &str) -> Result<(), StoreError> {
        let key = self.key("inbox", instance);
        let mut pipe = Pipeline::new();
        pipe.cmd("RPUSH").arg(&key).arg(session_id).ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(60_000).ignore();
        pipe.exec_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn take_drops(&self) -> Result<Vec<String>, StoreError> {
        let key = self.key("inbox", &self.inner.me.id);
        let mut pipe = Pipeline::new();
        pipe.atomic();
        pipe.cmd("LRANGE").arg(&key).arg(0).arg(-1);
        pipe.cmd("DEL").arg(&key).ignore();
        let (ids,): (Vec<String>,) = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(ids)
    }

    async fn reassert(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let mut cmds = self.record_cmds(record, true);
        // HSET would overwrite a newer record written meanwhile; only fill a missing one.
        let key = self.key("s", &record.id);
        let mut hsetnx = redis::cmd("HSETNX");
        hsetnx
            .arg(&key)
            .arg("rec")
            .arg(record_json(record).to_string());
        cmds[0] = hsetnx;
        let mut fill = Vec::new();
        for (f, v) in [
            ("last", record.last_active_ms.to_string()),
            ("state", "live".to_owned()),
            ("restore", record.restore.to_string()),
        ] {
            let mut c = redis::cmd("HSETNX");
            c.arg(&key).arg(f).arg(v);
            fill.push(c);
        }
        cmds.splice(1..1, fill);
        self.submit(cmds, true).await
    }

    fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance as suite;

    fn open(opts: &RedisOptions) -> RedisStore {
        RedisStore::open(opts, Arc::new(Metrics::default())).unwrap()
    }

    #[tokio::test]
    async fn conformance_live_sessions() {
        let Some(opts) = suite::redis_options("sessions") else {
            return;
        };
        let store = open(&opts);
        suite::sessions_round_trip_and_close(&store).await;
        store.wipe().await;
    }

    #[tokio::test]
    async fn conformance_event_log_survives_reopen() {
        let Some(opts) = suite::redis_options("events") else {
            return;
        };
        let o = opts.clone();
        suite::event_log_survives_reopen(move || Box::new(open(&o)) as Box<dyn LiveStore>).await;
        open(&opts).wipe().await;
    }

    #[tokio::test]
    async fn conformance_concurrent_writes() {
        let Some(opts) = suite::redis_options("concurrent") else {
            return;
        };
        let store = open(&opts);
        suite::many_concurrent_writes(&store).await;
        store.wipe().await;
    }

    /// Closing a session with many streams deletes nothing at once; one prune then deletes
    /// them all, 500 per script run, leaving only the closed record.
    #[tokio::test]
    async fn a_closed_sessions_streams_go_in_chunks() {
        let Some(opts) = suite::redis_options("gone") else {
            return;
        };
        let store = open(&opts);
        store
            .create_session(suite::record("busy", 1))
            .await
            .unwrap();
        let mut acks = Vec::new();
        for i in 0..1200 {
            let id = format!("r{i}");
            acks.push(store.open_stream(suite::stream("busy", &id, now_ms())));
            acks.push(store.append_event(suite::event("busy", &id, 1, i % 2 == 0)));
        }
        for a in futures::future::join_all(acks).await {
            a.unwrap();
        }
        store.close_session("busy", "timeout", 9).await.unwrap();
        let keys = |pattern: String| {
            let mut conn = store.conn();
            async move {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                keys.len()
            }
        };
        let p = &store.inner.p;
        assert_eq!(
            keys(format!("{p}ev:busy:*")).await,
            1200,
            "close deletes nothing yet"
        );
        // A cutoff in the past: only the closed session's streams qualify.
        assert_eq!(store.prune_events(0).await.unwrap(), 1200);
        assert_eq!(keys(format!("{p}ev:busy:*")).await, 0);
        assert_eq!(keys(format!("{p}st:busy:*")).await, 0);
        assert_eq!(keys(format!("{p}gone*")).await, 0);
        let done: u64 = redis::cmd("ZCARD")
            .arg(format!("{p}done"))
            .query_async(&mut store.conn())
            .await
            .unwrap();
        assert_eq!(done, 0, "finished streams leave the prune index too");
        assert_eq!(
            store.load_session("busy").await.unwrap().unwrap().state,
            SessionState::Closed
        );
        store.wipe().await;
    }

    #[tokio::test]
    async fn ownership_heartbeats_and_inbox() {
        let Some(opts) = suite::redis_options("owners") else {
            return;
        };
        let a = open(&RedisOptions {
            advertise_url: "http://127.0.0.1:1001".into(),
            instance_ttl: Duration::from_secs(1),
            ..opts.clone()
        });
        let b = open(&RedisOptions {
            advertise_url: "http://127.0.0.1:1002/".into(),
            ..opts.clone()
        });
        assert!(
            a.heartbeat().await.unwrap(),
            "the first beat reports a lapse"
        );
        assert!(!a.heartbeat().await.unwrap());
        assert!(b.heartbeat().await.unwrap());
        a.create_session(suite::record("s", 1)).await.unwrap();
        assert_eq!(a.claim("s").await.unwrap(), Owner::Me);
        assert_eq!(
            b.claim("s").await.unwrap(),
            Owner::Other {
                instance: a.me().id.clone(),
                url: "http://127.0.0.1:1001".into()
            }
        );
        let ids: Vec<String> = b
            .instances()
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert!(ids.contains(&a.me().id) && ids.contains(&b.me().id));
        // A's heartbeat lapses (SIGKILL): B takes the session over, and A, when it beats
        // again, learns that it lapsed.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(
            b.claim("s").await.unwrap(),
            Owner::TookOver {
                from: a.me().id.clone()
            }
        );
        assert_eq!(b.claim("s").await.unwrap(), Owner::Me);
        assert_eq!(
            a.owners(&["s".into(), "none".into()]).await.unwrap(),
            vec![Some(b.me().id.clone()), None]
        );
        assert!(a.heartbeat().await.unwrap());
        // A graceful leave moves sessions at once.
        b.leave().await;
        assert!(matches!(
            a.claim("s").await.unwrap(),
            Owner::TookOver { .. }
        ));
        // The inbox.
        a.send_drop(&b.me().id, "s").await.unwrap();
        a.send_drop(&b.me().id, "t").await.unwrap();
        assert_eq!(b.take_drops().await.unwrap(), ["s", "t"]);
        assert!(b.take_drops().await.unwrap().is_empty());
        // A record lost by Redis is written back by its holder, without clobbering one that
        // exists.
        let mut lost = suite::record("lost", 77);
        lost.restore = json!({"logLevel": "info"});
        a.reassert(&lost).await.unwrap();
        assert_eq!(a.load_session("lost").await.unwrap(), Some(lost));
        let mut other = suite::record("lost", 99);
        other.client_type = "changed".into();
        b.reassert(&other).await.unwrap();
        assert_eq!(
            a.load_session("lost")
                .await
                .unwrap()
                .unwrap()
                .last_active_ms,
            77
        );
        a.wipe().await;
    }

    #[tokio::test]
    async fn an_unreachable_redis_buffers_writes_and_refuses_new_sessions() {
        // A port nothing listens on: the store starts (lazily) and reports the outage.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let metrics = Arc::new(Metrics::default());
        let store = RedisStore::open(
            &RedisOptions {
                url: format!("redis://127.0.0.1:{port}/"),
                prefix: "t".into(),
                session_ttl: Duration::from_secs(60),
                instance_ttl: Duration::from_secs(5),
                advertise_url: "http://127.0.0.1:1".into(),
            },
            metrics.clone(),
        )
        .unwrap();
        // The first write discovers the outage; a held session's write is acknowledged
        // (kept for later), a new session is refused as unavailable.
        let _ = store
            .append_event(EventRecord {
                session_id: "s".into(),
                stream_id: "0".into(),
                seq: 1,
                data: "{}".into(),
                terminal: false,
            })
            .await;
        assert!(!store.is_up());
        assert_eq!(metrics.store_up.get(), 0);
        let err = store
            .create_session(suite::record("new", 1))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        store
            .append_event(EventRecord {
                session_id: "s".into(),
                stream_id: "0".into(),
                seq: 2,
                data: "{}".into(),
                terminal: false,
            })
            .await
            .unwrap();
        assert!(metrics.store_buffered.get() > 0);
        assert!(
            store.flush().await.is_err(),
            "nothing is durable during an outage"
        );

        // Redis comes back (empty). The next durable write must not be refused on the
        // writer's stale view of the outage: it finds Redis back, writes the buffer, then
        // the write itself.
        let Ok(server) = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
        else {
            eprintln!(
                "skip: redis-server is not installed; the recovery half of this test did not run"
            );
            return;
        };
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _server = Kill(server);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store
            .create_session(suite::record("new", 1))
            .await
            .expect("a durable write once Redis is back");
        assert!(store.is_up());
        assert_eq!(store.events_after("s", "0", 0).await.unwrap().len(), 2);
        assert!(store.load_session("new").await.unwrap().is_some());
    }
}
