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
//! | `P:tally:{name}` | hash | each instance's part of a deployment-wide counter (`quota:tool-calls:USER:WINDOW`), summed when counted | the window and 5 s |
//! | `P:secret:{name}` | string | a secret all instances share (`bridge`: the key sealing MRTR `requestState`), set by the first to ask | none |
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
    Ack, Coordinator, EventRecord, Hold, InstanceInfo, LiveStore, Owner, Servers, SessionRecord,
    SessionState, StoreError, StreamRecord, now_ms,
};
use crate::metrics::Metrics;

mod coordinator;
mod live;
mod records;
mod tasks;
mod writer;

use records::*;
use writer::*;

/// Events kept per stream; older ones are trimmed (a client that far behind re-initializes).
pub const MAX_EVENTS: isize = 1000;

type Done = oneshot::Sender<Result<(), StoreError>>;

enum Op {
    /// Commands applied in order. `durable`: refuse during an outage instead of buffering.
    Write {
        cmds: Vec<Cmd>,
        done: Option<Done>,
        durable: bool,
        /// Given back once the writer has sent (or buffered) the commands.
        hold: Option<Hold>,
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

/// One count of a deployment-wide counter: this instance's part (a hash field per
/// instance) goes to the larger of its stored value plus one and what the instance counted
/// itself (`ARGV[2]`: after Redis came back empty, the part comes back whole), the key
/// expires after the window (`ARGV[3]` ms, set once), and the total of every part is
/// returned. A hash holds one field per instance, so the sum is a handful of values.
const TALLY: &str = r"
local have = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local mine = tonumber(ARGV[2])
local part = have + 1
if mine > part then part = mine end
redis.call('HSET', KEYS[1], ARGV[1], part)
redis.call('PEXPIRE', KEYS[1], ARGV[3], 'NX')
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
return total
";

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
        // Not bounded by count: the writer empties it into one batch on every turn, and a
        // turn lasts at most the response timeout above (2 s), so it holds at most that long
        // of writes; during an outage they move to the backlog, which is bounded
        // (`BACKLOG`, oldest dropped and counted; tested by the Redis outage tests).
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
        self.submit_holding(cmds, durable, None)
    }

    /// [`Self::submit`], keeping `hold` until the writer is done with the commands.
    fn submit_holding(&self, cmds: Vec<Cmd>, durable: bool, hold: Option<Hold>) -> Ack {
        self.send(|done| Op::Write {
            cmds,
            done: Some(done),
            durable,
            hold,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance as suite;

    fn open(opts: &RedisOptions) -> RedisStore {
        RedisStore::open(opts, Arc::new(Metrics::default())).unwrap()
    }

    /// Issue 26: a Redis restarted empty reset every quota. Each instance's part of a
    /// counter comes back with its next count (what it counted itself), and the parts of
    /// several instances add up.
    #[tokio::test]
    async fn a_counter_that_redis_lost_comes_back_with_each_instances_part() {
        let Some(opts) = suite::redis_options("tally") else {
            return;
        };
        let a = open(&opts);
        let b = open(&RedisOptions {
            advertise_url: "http://127.0.0.1:2".into(),
            ..opts.clone()
        });
        let ttl = Duration::from_secs(60);
        assert_eq!(a.count("q", 1, ttl).await.unwrap(), Some(1));
        assert_eq!(a.count("q", 2, ttl).await.unwrap(), Some(2));
        assert_eq!(b.count("q", 1, ttl).await.unwrap(), Some(3));
        a.wipe().await;
        // A counts its third call: its part comes back whole; B's with its next call.
        assert_eq!(a.count("q", 3, ttl).await.unwrap(), Some(3));
        assert_eq!(b.count("q", 2, ttl).await.unwrap(), Some(5));
        a.wipe().await;
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
    async fn conformance_tasks() {
        let Some(opts) = suite::redis_options("tasks") else {
            return;
        };
        let store = open(&opts);
        suite::tasks_are_kept_listed_and_pruned(&store).await;
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
                hold: None,
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
                hold: None,
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
