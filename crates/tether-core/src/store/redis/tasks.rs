//! Task records on Redis, shared by every instance: `P:task:ID` holds the record's JSON
//! (expiring with the task), `P:tasks:PRINCIPAL` a principal's tasks in creation order
//! (members `CREATED:ID`, all at score 0, so their order is the text's), `P:tasks-expiry`
//! every task by its expiry (score; `+inf` for one that never expires), for pruning the
//! indexes after the records themselves have expired and for the admin's recent tasks.
//! Must not: list another principal's tasks, or return a listing without bound.

use super::*;
use crate::tasks::TaskRecord;

/// Index pages read per listing at most (entries whose record expired are skipped).
const MAX_LIST_ROUNDS: usize = 8;

/// A task's member in its principal's index: sorts by creation, then id.
fn member(created_ms: i64, id: &str) -> String {
    format!("{:020}:{id}", created_ms.max(0))
}

fn decode(text: &str) -> Result<TaskRecord, StoreError> {
    TaskRecord::from_json(text).map_err(StoreError::Corrupt)
}

impl RedisStore {
    fn task_key(&self, id: &str) -> String {
        self.key("task", id)
    }

    fn tasks_key(&self, principal: &str) -> String {
        self.key("tasks", principal)
    }

    fn expiry_key(&self) -> String {
        format!("{}tasks-expiry", self.inner.p)
    }

    pub(super) fn put_task_cmds(&self, task: &TaskRecord) -> Vec<Cmd> {
        let mut set = redis::cmd("SET");
        set.arg(self.task_key(&task.id)).arg(task.to_json());
        if let Some(at) = task.expires_ms() {
            // Already past its time: kept a moment, so that its writer's read still finds it.
            set.arg("PX").arg((at - now_ms()).max(1));
        }
        let mut index = redis::cmd("ZADD");
        index
            .arg(self.tasks_key(&task.principal))
            .arg(0)
            .arg(member(task.created_ms, &task.id));
        // Every task is in the expiry index (one that never expires at +inf, never
        // pruned): it is also the index of all tasks that `recent_task_records` reads.
        let mut expiry = redis::cmd("ZADD");
        expiry.arg(self.expiry_key());
        match task.expires_ms() {
            Some(at) => expiry.arg(at),
            None => expiry.arg("+inf"),
        };
        expiry.arg(format!(
            "{}\n{}",
            task.principal,
            member(task.created_ms, &task.id)
        ));
        vec![set, index, expiry]
    }

    pub(super) async fn load_task_record(
        &self,
        id: &str,
    ) -> Result<Option<TaskRecord>, StoreError> {
        let text: Option<String> = redis::cmd("GET")
            .arg(self.task_key(id))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        text.as_deref().map(decode).transpose()
    }

    pub(super) async fn list_task_records(
        &self,
        principal: &str,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let index = self.tasks_key(principal);
        let mut from = match &after {
            Some((ms, id)) => format!("({}", member(*ms, id)),
            None => "-".to_owned(),
        };
        let mut out = Vec::new();
        for _ in 0..MAX_LIST_ROUNDS {
            let want = limit - out.len();
            let members: Vec<String> = redis::cmd("ZRANGEBYLEX")
                .arg(&index)
                .arg(&from)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(want)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| unavailable(&e))?;
            let Some(last) = members.last() else {
                break;
            };
            from = format!("({last}");
            let keys: Vec<String> = members
                .iter()
                .map(|m| self.task_key(m.split_once(':').map_or(m.as_str(), |(_, id)| id)))
                .collect();
            let texts: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| unavailable(&e))?;
            for text in texts.into_iter().flatten() {
                out.push(decode(&text)?);
            }
            if out.len() >= limit || members.len() < want {
                break;
            }
        }
        Ok(out)
    }

    /// The newest records of every principal, at most `limit`: read from the expiry index
    /// (every task is in it), latest expiry first, then ordered by creation (a task's time
    /// to live is at most an hour, so the latest to expire are the latest created, give
    /// or take that hour's spread of time-to-live choices).
    pub(super) async fn recent_task_records(
        &self,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let entries: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(self.expiry_key())
            .arg(0)
            .arg(limit - 1)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let keys: Vec<String> = entries
            .iter()
            .filter_map(|e| e.split_once('\n'))
            .map(|(_, m)| self.task_key(m.split_once(':').map_or(m, |(_, id)| id)))
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let texts: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let mut out = texts
            .into_iter()
            .flatten()
            .map(|t| decode(&t))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
        Ok(out)
    }

    pub(super) async fn count_task_records(&self, principal: &str) -> Result<u64, StoreError> {
        redis::cmd("ZCARD")
            .arg(self.tasks_key(principal))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))
    }

    /// Drops the index entries of tasks expired at `now_ms` (their records expire by
    /// themselves), at most a chunk at a time; returns how many.
    pub(super) async fn prune_task_index(&self, now_ms: i64) -> Result<u64, StoreError> {
        let expiry = self.expiry_key();
        let mut removed = 0u64;
        loop {
            let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(&expiry)
                .arg("-inf")
                .arg(now_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(512)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| unavailable(&e))?;
            if due.is_empty() {
                return Ok(removed);
            }
            let mut pipe = redis::pipe();
            for entry in &due {
                let Some((principal, m)) = entry.split_once('\n') else {
                    continue;
                };
                let id = m.split_once(':').map_or(m, |(_, id)| id);
                pipe.cmd("ZREM")
                    .arg(self.tasks_key(principal))
                    .arg(m)
                    .ignore();
                pipe.cmd("DEL").arg(self.task_key(id)).ignore();
            }
            pipe.cmd("ZREM").arg(&expiry).arg(&due).ignore();
            pipe.query_async::<()>(&mut self.conn())
                .await
                .map_err(|e| unavailable(&e))?;
            removed += due.len() as u64;
            if due.len() < 512 {
                return Ok(removed);
            }
        }
    }
}
