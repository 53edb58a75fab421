//! Multi-instance coordination on Redis: instance heartbeats, session ownership (claim,
//! takeover), the per-instance inbox, write-back after Redis lost its data.
//! Must not: serve a session another live instance owns.

use super::*;

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

    async fn shared_secret(&self, name: &str) -> Result<Option<String>, StoreError> {
        let key = self.key("secret", name);
        let mut pipe = Pipeline::new();
        pipe.cmd("SET")
            .arg(&key)
            .arg(crate::ids::random_hex(32))
            .arg("NX")
            .ignore();
        pipe.cmd("GET").arg(&key);
        let (value,): (String,) = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(Some(value))
    }

    async fn count(&self, name: &str, mine: u64, ttl: Duration) -> Result<Option<u64>, StoreError> {
        // A hash of each instance's part (`tally`, not the `count` string of older
        // versions: a rolling upgrade must not meet a key of the other type).
        let n: u64 = Script::new(TALLY)
            .key(self.key("tally", name))
            .arg(&self.inner.me.id)
            .arg(mine)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(Some(n))
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
