//! The live store on Redis: session records, stream records and event logs (trimmed to
//! `MAX_EVENTS`), all with a sliding TTL; writes go through the writer's queue.
//! Must not: await a write on the request path except where the trait says it is durable.

use super::*;

#[async_trait::async_trait]
impl LiveStore for RedisStore {
    fn describe(&self) -> String {
        format!("redis {}", self.inner.describe)
    }

    fn put_task(&self, task: &crate::tasks::TaskRecord) -> Ack {
        self.submit(self.put_task_cmds(task), true)
    }

    async fn load_task(&self, id: &str) -> Result<Option<crate::tasks::TaskRecord>, StoreError> {
        self.load_task_record(id).await
    }

    async fn list_tasks(
        &self,
        principal: &str,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<crate::tasks::TaskRecord>, StoreError> {
        self.list_task_records(principal, after, limit).await
    }

    async fn recent_tasks(
        &self,
        limit: usize,
    ) -> Result<Vec<crate::tasks::TaskRecord>, StoreError> {
        self.recent_task_records(limit).await
    }

    async fn count_tasks(&self, principal: &str) -> Result<u64, StoreError> {
        self.count_task_records(principal).await
    }

    async fn prune_tasks(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.prune_task_index(now_ms).await
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

    async fn idle_sessions(
        &self,
        cutoff_ms: i64,
        limit: usize,
        of: Servers<'_>,
    ) -> Result<Vec<String>, StoreError> {
        // One sorted set holds every server's sessions; a server's own are picked out of
        // at most IDLE_PAGES pages by their records' upstream (the rest wait for the
        // next reap, which sees them again as the older ones close).
        const IDLE_PAGES: usize = 8;
        let mut out = Vec::new();
        for page in 0..IDLE_PAGES {
            let ids: Vec<String> = redis::cmd("ZRANGE")
                .arg(format!("{}live", self.inner.p))
                .arg("-inf")
                .arg(format!("({cutoff_ms}"))
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(page * limit)
                .arg(limit)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| unavailable(&e))?;
            if let Servers::All = of {
                return Ok(ids);
            }
            if ids.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGET").arg(self.key("s", id)).arg("rec");
            }
            let recs: Vec<Option<String>> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(|e| unavailable(&e))?;
            let last_page = ids.len() < limit;
            for (id, rec) in ids.into_iter().zip(recs) {
                let server = rec
                    .and_then(|r| serde_json::from_str::<Value>(&r).ok())
                    .and_then(|v| v.get("upstream_name")?.as_str().map(str::to_owned));
                if server.as_deref().is_some_and(|n| of.admits(n)) {
                    out.push(id);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            if last_page {
                break;
            }
        }
        Ok(out)
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
        self.submit_holding(cmds, false, e.hold)
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
            .filter(|s| s != crate::store::STANDALONE_STREAM)
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
