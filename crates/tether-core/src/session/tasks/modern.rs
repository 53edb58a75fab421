//! 2026-07-28 tasks (the extension `io.modelcontextprotocol/tasks`) on pooled sessions:
//! the front hands over a `tools/call` that outlived `--task-after` (or one of the tools
//! that become tasks at once) once its record is durable; the runner (`mod.rs`) keeps the
//! upstream's requests to the client as the task's `inputRequests`, `tasks/update` answers
//! them, `tasks/cancel` stops the call upstream, and every status change reaches the
//! principal's `subscriptions/listen` streams that name the task. `tasks/get` reads the
//! record, on any instance; a task whose runner died is re-issued on a pooled session
//! like the one that started it when its tool is safe to repeat, else `failed`.
//!
//! Must not: answer another principal's task other than as an unknown one, or show a
//! task's client an input request or outcome before the record holds it.

use super::*;

/// Client messages (`tasks/update`, `tasks/cancel`) one task's runner holds unread.
const INBOX: usize = 8;

/// How long `tasks/update` waits for the runner to take the answers before it
/// acknowledges anyway (the acknowledgement is eventually consistent by the spec).
const TAKE_WAIT: Duration = Duration::from_secs(5);

/// Where a `tasks/update` or `tasks/cancel` went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskReach {
    /// Handed to its runner here, or nothing to do (the task has ended): acknowledge.
    Done,
    /// No task of the caller's by that id: `-32602`.
    Unknown,
    /// Another live instance runs it: forward the request to that instance.
    Owner(String),
}

impl Shared {
    /// Hands a 2026-07-28 task's status notification to its principal's listen streams
    /// (each stream's filter keeps the tasks it named).
    pub(super) fn to_task_listeners(&self, principal: &str, note: Value) {
        let map = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(principal) {
            let _ = tx.send(Arc::new(note));
        }
    }

    /// The runner of task `id` in this process, if it takes a client's input.
    fn inbox(&self, id: &str) -> Option<mpsc::Sender<TaskInput>> {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(|r| r.inbox.clone())
    }
}

impl Session {
    /// What the upstream declares of `tool`'s task support (`optional`, `required`), from
    /// its own `tools/list`.
    pub fn task_support(&self, tool: &str) -> Option<String> {
        self.lock().task_support.get(tool).cloned()
    }

    /// Asks the upstream for its own `tools/list` once (what is safe to repeat, what
    /// declares task support), unless its start already did.
    pub async fn learn_tools(self: &Arc<Self>) {
        if self.lock().tools_learned {
            return;
        }
        match self.ensure_upstream().await {
            Ok((link, generation)) => self.refresh_safe_tools(&link, generation).await,
            Err(f) => tracing::debug!(error = %f.message(), "no upstream to ask for its tools"),
        }
        // One try per session: an upstream that does not list its tools is not asked
        // before every call.
        self.lock().tools_learned = true;
    }

    /// How long a 2026-07-28 call to `tool` from a client that declared the extension runs
    /// before it becomes a task: at once for the operator's `--task-tools` and the tools
    /// whose upstream declares task support, else `--task-after`.
    pub fn task_after(&self, tool: &str) -> Duration {
        if self.shared.cfg.task_tools.iter().any(|t| t == tool)
            || self.lock().task_support.contains_key(tool)
        {
            Duration::ZERO
        } else {
            self.shared.cfg.task_after
        }
    }

    /// Whether this pooled session's principal may start another task (the same bounds
    /// as 2025-11-25 tasks); over one, the call simply stays a plain call.
    pub async fn may_start_task(&self) -> Result<(), Failure> {
        self.admit_task().await
    }

    /// Makes the call running on `stream` (its frames `frames`) a 2026-07-28 task of
    /// this pooled session's principal: the record is durable when this returns `Ok`
    /// with the `CreateTaskResult`, and a runner owns the call from then on. `params`
    /// are the call's (kept only if the tool is safe to repeat); `client` the
    /// `capabilities` and `clientInfo` its request declared.
    pub async fn begin_task(
        self: &Arc<Self>,
        tool: &str,
        params: Option<Value>,
        client: Value,
        stream: Arc<str>,
        frames: FrameRx,
    ) -> Result<Value, (Failure, FrameRx)> {
        let mut task = TaskRecord::working(
            &self.record.principal,
            &self.shared.cfg.upstream_name,
            tool,
            Era::Modern,
            Some(u64::try_from(self.shared.cfg.task_limits.ttl.as_millis()).unwrap_or(u64::MAX)),
            u64::try_from(TASK_POLL.as_millis()).unwrap_or(1000),
            crate::store::now_ms(),
        );
        task.owner = self.shared.coordinator.as_ref().map(|c| c.me().id.clone());
        if self.lock().safe_tools.contains(tool) {
            task.request = params;
        }
        task.client = Some(client);
        let (tx, inbox) = mpsc::channel(INBOX);
        if let Err(over) = self.claim_new_task(&task.id, &Value::from(stream.to_string()), Some(tx))
        {
            return Err((over, frames));
        }
        if let Err(e) = self.shared.store.put_task(&task).await {
            self.shared.release_task(&task.id);
            return Err((store_down(&e), frames));
        }
        crate::fault::point(crate::fault::points::TASK_CREATED);
        self.shared.metrics.tasks_created.inc();
        let created = task.create_result();
        self.run_modern(task, stream, frames, inbox);
        Ok(created)
    }

    /// Starts the runner of a claimed 2026-07-28 task on the call answering on `stream`.
    fn run_modern(
        self: &Arc<Self>,
        task: TaskRecord,
        stream: Arc<str>,
        frames: FrameRx,
        inbox: mpsc::Receiver<TaskInput>,
    ) {
        self.lock().task_streams.insert(stream.clone());
        let capabilities = task
            .client
            .as_ref()
            .and_then(|c| c.get("capabilities"))
            .cloned()
            .unwrap_or_else(|| json!({}));
        let run = ModernRun {
            inbox,
            capabilities,
        };
        let session = self.clone();
        self.shared
            .tracker
            .spawn(async move { session.run_task(task, frames, stream, Some(run)).await });
    }

    /// Re-issues a 2026-07-28 task whose runner died with its process, on this pooled
    /// session: same id, a fresh call. `false` when it cannot be.
    async fn resume_modern(self: &Arc<Self>, task: &mut TaskRecord) -> bool {
        let Some((client_id, call)) = resume_call(task) else {
            return false;
        };
        let (tx, inbox) = mpsc::channel(INBOX);
        if !self.claim_task_with(&task.id, &client_id, Some(tx)) {
            // Resumed by a concurrent request: it runs.
            return true;
        }
        task.owner = self.shared.coordinator.as_ref().map(|c| c.me().id.clone());
        task.status = Status::Working;
        task.input_requests = None;
        task.status_message = Some("resumed after a gateway restart".into());
        task.updated_ms = crate::store::now_ms();
        let started = match self.shared.store.put_task(task).await {
            Ok(()) => match self.request(call).await {
                Reply::Stream(handle) => handle.live.map(|rx| (handle.stream_id, rx)),
                // Refused at once (a limit, the upstream down): settled as interrupted.
                _ => None,
            },
            Err(_) => None,
        };
        let Some((stream, frames)) = started else {
            self.shared.release_task(&task.id);
            return false;
        };
        self.shared.metrics.tasks_resumed.inc();
        tracing::info!(task = %task.id, tool = %task.tool, "task resumed after a gateway restart");
        self.run_modern(task.clone(), stream, frames, inbox);
        true
    }

    /// The upstream asks the client of a 2026-07-28 task something: kept as one of the
    /// task's `inputRequests` (durable before `tasks/get` can show it) when the client
    /// declared what it needs, else refused to the upstream.
    pub(super) async fn ask_input(
        self: &Arc<Self>,
        task: &mut TaskRecord,
        capabilities: &Value,
        message: Message,
    ) {
        let Some(ask_id) = message.id().cloned() else {
            return;
        };
        let method = message.method_name().unwrap_or_default().to_owned();
        if method == "ping" {
            let pong = json!({"jsonrpc": "2.0", "id": ask_id, "result": {}});
            self.respond(Message::ours(pong)).await;
            return;
        }
        let open = task.input_keys().len();
        let refusal = match crate::modern::required_capability(&method) {
            None => Some(format!("{method} cannot reach a 2026-07-28 client")),
            Some(cap) if capabilities.get(cap).is_none_or(Value::is_null) => Some(format!(
                "the task's client did not declare the {cap} capability"
            )),
            Some(_) if open >= MAX_TASK_INPUTS => Some(format!(
                "the task already waits on {open} requests to its client, the most it keeps"
            )),
            Some(_) => None,
        };
        let key = ask_id.as_str().map(str::to_owned);
        let (Some(key), None) = (key, &refusal) else {
            let text = refusal.unwrap_or_else(|| "unusable request id".into());
            let err = protocol::error_response(ask_id, code::METHOD_NOT_FOUND, text, None);
            self.respond(Message::ours(err)).await;
            return;
        };
        let mut input = json!({ "method": method });
        if let Some(p) = message.params_value() {
            input["params"] = p;
        }
        let mut asks = task
            .input_requests
            .take()
            .and_then(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .unwrap_or_default();
        asks.insert(key, input);
        task.input_requests = Some(Value::Object(asks));
        task.status = Status::InputRequired;
        task.updated_ms = crate::store::now_ms();
        self.store_task(task).await;
        crate::fault::point(crate::fault::points::TASK_INPUT);
        self.tell_status(task);
    }

    /// `tasks/update`: the client's answers to the task's open requests go to the
    /// upstream; keys that name none are ignored (the spec's advice). The task is back to
    /// `working` once none is open.
    pub(super) async fn take_inputs(
        self: &Arc<Self>,
        task: &mut TaskRecord,
        answers: serde_json::Map<String, Value>,
    ) {
        let mut open = match task.input_requests.take() {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let mut taken = false;
        for (key, result) in answers {
            if open.remove(&key).is_none() {
                continue;
            }
            taken = true;
            let answer = json!({"jsonrpc": "2.0", "id": key, "result": result});
            if let Ok(m) = Message::from_value(answer) {
                self.respond(m).await;
            }
        }
        let done = open.is_empty();
        task.input_requests = (!done).then_some(Value::Object(open));
        if !taken {
            return;
        }
        if done {
            task.status = Status::Working;
        }
        task.updated_ms = crate::store::now_ms();
        self.store_task(task).await;
        self.tell_status(task);
    }
}

impl Registry {
    /// The caller's 2026-07-28 task `id` (`tasks/get`), settled if its runner is gone:
    /// re-issued when its tool is safe to repeat, else `failed`. `None` when it names no
    /// task of `principal` on this server (or one that expired).
    pub async fn task(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<Option<TaskRecord>, Failure> {
        let sh = &self.shared;
        if !crate::tasks::looks_like_task_id(id) {
            return Ok(None);
        }
        let found = sh.store.load_task(id).await.map_err(|e| store_down(&e))?;
        let Some(mut task) = found.filter(|t| {
            t.era == Era::Modern
                && t.principal == principal.id
                && t.server == sh.cfg.upstream_name
                && !t.expired(crate::store::now_ms())
        }) else {
            return Ok(None);
        };
        if task.status.is_terminal()
            || sh.runs_task(&task).await
            || sh.ended_meanwhile(&mut task).await?
        {
            return Ok(Some(task));
        }
        if task.request.is_some()
            && let Some(session) = self.pooled_for(principal, &task).await
            && session.resume_modern(&mut task).await
        {
            return Ok(Some(task));
        }
        sh.settle_once(&principal.id, &mut task).await?;
        Ok(Some(task))
    }

    /// A pooled session like the one that started `task` (its client's capabilities and
    /// name), to re-issue it on.
    async fn pooled_for(&self, principal: &Principal, task: &TaskRecord) -> Option<Arc<Session>> {
        let client = task.client.as_ref()?;
        let meta = crate::modern::Meta {
            version: crate::protocol::MODERN_VERSION.to_owned(),
            client_info: client.get("clientInfo").cloned(),
            capabilities: client
                .get("capabilities")
                .cloned()
                .unwrap_or_else(|| json!({})),
            log_level: None,
        };
        self.pooled(
            principal,
            meta.capabilities_key(),
            &meta.init_params(),
            None,
        )
        .await
        .ok()
    }

    /// `tasks/update`: hands the client's answers to the task's runner.
    pub async fn update_task(
        &self,
        principal: &Principal,
        id: &str,
        answers: serde_json::Map<String, Value>,
    ) -> Result<TaskReach, Failure> {
        let tx = match self.runner_of(principal, id).await? {
            Ok(tx) => tx,
            Err(reach) => return Ok(reach),
        };
        let (taken, heard) = oneshot::channel();
        if tx.send(TaskInput::Responses(answers, taken)).await.is_ok() {
            let _ = tokio::time::timeout(TAKE_WAIT, heard).await;
        }
        Ok(TaskReach::Done)
    }

    /// The inbox of task `id`'s runner in this process; else where the request goes
    /// instead (nowhere for an unknown or ended task, or the owner instance).
    async fn runner_of(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<Result<mpsc::Sender<TaskInput>, TaskReach>, Failure> {
        let Some(task) = self.task(principal, id).await? else {
            return Ok(Err(TaskReach::Unknown));
        };
        if task.status.is_terminal() {
            return Ok(Err(TaskReach::Done));
        }
        Ok(self.shared.inbox(id).ok_or_else(|| self.elsewhere(&task)))
    }

    /// `tasks/cancel`: tells the task's runner to stop (cooperative: the acknowledgement
    /// does not wait for it, and a task that has ended stays as it ended).
    pub async fn cancel_modern_task(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<TaskReach, Failure> {
        match self.runner_of(principal, id).await? {
            Ok(tx) => {
                let _ = tx.try_send(TaskInput::Cancel);
                Ok(TaskReach::Done)
            }
            Err(reach) => Ok(reach),
        }
    }

    /// Where a running task this process does not run is: its owner instance.
    fn elsewhere(&self, task: &TaskRecord) -> TaskReach {
        match (&self.shared.coordinator, &task.owner) {
            (Some(c), Some(owner)) if owner != &c.me().id => TaskReach::Owner(owner.clone()),
            _ => TaskReach::Done,
        }
    }
}
