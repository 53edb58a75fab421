//! 2025-11-25 tasks owned by the gateway (issue 28, step 2 of `docs/design/tasks.md`): a
//! legacy client's `tools/call` with `params.task` is answered with a `CreateTaskResult` once
//! the task's record is durable, while the call runs upstream on the session as any other
//! (its answer read by a runner task instead of an HTTP response); `tasks/get`,
//! `tasks/result` (waits until the task ends), `tasks/list` (the caller's only) and
//! `tasks/cancel` are answered from the record, never sent upstream. A task that was
//! running when its gateway died is, when next asked about, re-issued under the same id if
//! its tool is safe to repeat (the record kept its params), else `failed` ("interrupted by
//! a gateway restart and not retried").
//!
//! 2026-07-28 tasks (`modern.rs`) run the same way on a pooled session: the front hands
//! over a call that outlived `--task-after`, the runner keeps the upstream's requests to the
//! client as the task's `inputRequests` until `tasks/update` answers them, and status
//! changes go to the principal's `subscriptions/listen` streams that name the task.
//!
//! A task's call is out of `--upstream-timeout` and bounded by the task's time to live
//! instead; the running bounds are checked and claimed under one lock.
//!
//! A 2025-11-25 task's upstream requests to the client go on the session's GET stream,
//! tagged with the task (`run.rs`, `ask_client`); the task is `input_required` until the
//! client's answer (which the session routes upstream as any) has gone.
//!
//! Must not: show a task to its client before its record is durable, or answer another
//! principal's task other than as an unknown one.

mod modern;
mod run;

pub use modern::TaskReach;

use super::*;
use crate::tasks::{Era, Outcome, Status, TaskRecord};
use tokio::sync::{mpsc, oneshot};

/// The bounds of tasks, each a `[limits]` row: what one user, and all of them, can make
/// the gateway run and keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskLimits {
    /// Tasks running on one server at once (`max-tasks`).
    pub running: usize,
    /// The same for one principal (`max-tasks-per-principal`).
    pub running_per_principal: usize,
    /// Tasks one principal may have stored, running or ended (`max-stored-tasks`).
    pub stored_per_principal: usize,
    /// The largest answer a task keeps (`max-task-result`): past it the task fails,
    /// naming the bound.
    pub result: usize,
    /// A task's time to live when its client asks for none, and the most it may ask for
    /// (`task-ttl`).
    pub ttl: Duration,
}

impl Default for TaskLimits {
    fn default() -> TaskLimits {
        TaskLimits {
            running: 1024,
            running_per_principal: 64,
            stored_per_principal: 256,
            result: 1 << 20,
            ttl: Duration::from_secs(3600),
        }
    }
}

/// How often a client should poll a task.
pub const TASK_POLL: Duration = Duration::from_millis(1000);

/// `tasks/list` page size.
const LIST_PAGE: usize = 100;

/// A task this process runs: what `tasks/result` waits on and `tasks/cancel` stops.
pub(super) struct RunningTask {
    /// Who started it.
    principal: String,
    /// The client's id of the call (what a cancellation names).
    client_id: Value,
    /// Set once the task has ended (the record is then durable in its final state).
    ended: tokio::sync::watch::Sender<bool>,
    /// Set by `tasks/cancel`: the runner leaves the record as cancelled.
    cancelled: bool,
    /// Set by the runner once the call has ended: too late to cancel.
    finishing: bool,
    /// A 2026-07-28 task's runner: what its client's `tasks/update` and `tasks/cancel` tell it.
    inbox: Option<mpsc::Sender<TaskInput>>,
}

/// What a 2026-07-28 task's client tells its runner.
pub(super) enum TaskInput {
    /// `tasks/update`: answers to the upstream's requests, by key; the sender hears once the
    /// task's record shows them taken.
    Responses(serde_json::Map<String, Value>, oneshot::Sender<()>),
    /// `tasks/cancel`: stop the call upstream and record the task cancelled.
    Cancel,
}

/// What a 2026-07-28 task's runner needs besides the call: its inbox and the
/// capabilities its client declared (which of the upstream's requests it can be asked).
pub(super) struct ModernRun {
    inbox: mpsc::Receiver<TaskInput>,
    capabilities: Value,
}

/// How often a 2025-11-25 task waiting on its client looks whether the client answered.
const INPUT_CHECK: Duration = Duration::from_millis(200);

/// Requests of the upstream one 2026-07-28 task keeps open for its client at once; more
/// are refused to the upstream.
pub const MAX_TASK_INPUTS: usize = 16;

/// How a task's runner left it.
enum End {
    /// Its call ended.
    Outcome(Outcome),
    /// Its 2026-07-28 client cancelled it.
    Cancelled,
    /// The gateway stops (the shutdown grace is over) before the call ended.
    Stopped,
    /// The task's time to live ended before its call did.
    Outlived,
}

/// The call that re-issues `task` (its kept params under an id of the gateway's), if it
/// may be re-issued.
fn resume_call(task: &TaskRecord) -> Option<(Value, Message)> {
    let params = task.request.clone()?;
    let client_id = Value::from(format!("{}-resumed", task.id));
    let call = Message::from_value(
        json!({"jsonrpc": "2.0", "id": client_id, "method": "tools/call", "params": params}),
    )
    .ok()?;
    Some((client_id, call))
}

/// The refusal while the store that keeps tasks does not answer.
fn store_down(e: &StoreError) -> Failure {
    Failure::new(
        FailureKind::StoreUnavailable,
        format!("the task store is unavailable: {e}"),
        Retry::Safe(Some(Duration::from_secs(1))),
    )
}

/// The answer to request `id`.
fn answer(id: Value, result: Value) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("jsonrpc".into(), json!("2.0"));
    out.insert("id".into(), id);
    out.insert("result".into(), result);
    Value::Object(out)
}

/// The refusal for an id that names no task of the caller (unknown, expired or another
/// principal's: the same answer, so ids cannot be probed).
fn unknown(id: Value) -> Value {
    Failure::new(
        FailureKind::InvalidParams,
        "no such task (unknown, expired, or not yours)",
        Retry::Never,
    )
    .response(id)
}

/// The 2025-11-25 `tasks` server capability the gateway offers.
pub(super) fn capability() -> Value {
    json!({"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}})
}

/// Declares every tool of a `tools/list` result that says nothing of tasks as
/// `execution.taskSupport: "optional"` (the gateway can run any call as a task); what the
/// upstream says (`required`, `forbidden`) stands. Whether anything changed.
pub(super) fn offer_tasks_in(result: &mut Value) -> bool {
    let Some(tools) = result.get_mut("tools").and_then(Value::as_array_mut) else {
        return false;
    };
    let mut changed = false;
    for tool in tools.iter_mut().filter_map(Value::as_object_mut) {
        let execution = tool.entry("execution").or_insert_with(|| json!({}));
        if let Some(e) = execution.as_object_mut()
            && !e.contains_key("taskSupport")
        {
            e.insert("taskSupport".into(), json!("optional"));
            changed = true;
        }
    }
    changed
}

impl Shared {
    /// Marks task `id` of `principal` as run by this process (the table locked by the
    /// caller, who has checked it is not there).
    fn insert_claim(
        &self,
        tasks: &mut HashMap<String, RunningTask>,
        id: &str,
        principal: &str,
        client_id: &Value,
        inbox: Option<mpsc::Sender<TaskInput>>,
    ) {
        let (ended, _) = tokio::sync::watch::channel(false);
        self.metrics.tasks_running.inc();
        tasks.insert(
            id.to_owned(),
            RunningTask {
                principal: principal.to_owned(),
                client_id: client_id.clone(),
                ended,
                cancelled: false,
                finishing: false,
                inbox,
            },
        );
    }

    /// Fails a task whose runner is gone, once: the settlement is claimed like a run, so a
    /// concurrent request meanwhile shows the task as stored (and settles nothing).
    pub(super) async fn settle_once(
        &self,
        principal: &str,
        task: &mut TaskRecord,
    ) -> Result<(), Failure> {
        {
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            if tasks.contains_key(&task.id) {
                return Ok(());
            }
            let holder = Value::from(format!("{}-settling", task.id));
            self.insert_claim(&mut tasks, &task.id, principal, &holder, None);
        }
        let settled = self.settle_interrupted(task).await;
        self.release_task(&task.id);
        settled
    }

    /// Drops this process's claim on task `id` (one that will not run here).
    pub(super) fn release_task(&self, id: &str) {
        let released = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if released.is_some() {
            self.metrics.tasks_running.dec();
        }
    }

    /// Fails a task whose call died with its process and may not be repeated.
    pub(super) async fn settle_interrupted(&self, task: &mut TaskRecord) -> Result<(), Failure> {
        let failure =
            Failure::interrupted("the task was interrupted by a gateway restart and not retried");
        task.status_message = Some(failure.message().to_owned());
        task.finish(
            Outcome::Error(failure.response(Value::Null)["error"].clone()),
            crate::store::now_ms(),
        );
        self.store
            .put_task(task)
            .await
            .map_err(|e| store_down(&e))?;
        self.metrics.task_ended(task.status.as_str());
        Ok(())
    }

    /// Whether `task`, read before its runner was found gone, has ended meanwhile (its
    /// runner stores the end before it lets go of the task, so the record read first may
    /// be stale): then `task` is the stored record, which must not be re-issued or failed.
    pub(super) async fn ended_meanwhile(&self, task: &mut TaskRecord) -> Result<bool, Failure> {
        match self
            .store
            .load_task(&task.id)
            .await
            .map_err(|e| store_down(&e))?
        {
            Some(stored) if stored.status.is_terminal() => {
                *task = stored;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether a live process runs `task`: this one, or (with a shared store) its owner
    /// while that instance's heartbeat lives.
    pub(super) async fn runs_task(&self, task: &TaskRecord) -> bool {
        if self.siblings.run_task(&task.id) {
            return true;
        }
        let (Some(c), Some(owner)) = (&self.coordinator, &task.owner) else {
            return false;
        };
        owner != &c.me().id
            && c.instances()
                .await
                .map(|all| all.iter().any(|i| &i.id == owner))
                // Unknown while the store is away: not failed on a guess.
                .unwrap_or(true)
    }
}

impl Session {
    /// Whether the gateway answers this session's tasks: a client session whose upstream
    /// offers none of its own (an upstream that does keeps answering its own, passed
    /// through, until the plan's step 5 maps them).
    pub(super) fn gateway_owns_tasks(&self) -> bool {
        self.transport != Transport::Pooled
            && self
                .shared
                .upstream_init
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_none_or(|init| init.pointer("/capabilities/tasks").is_none())
    }

    /// Whether this request is the gateway's to answer as a task (a `tools/call` with
    /// `params.task`, or a `tasks/*` method).
    pub(super) fn is_task_request(&self, env: &Message) -> bool {
        let asks = match env.method() {
            Some(Method::ToolsCall) => env.task_param().is_some(),
            Some(
                Method::TasksGet | Method::TasksResult | Method::TasksList | Method::TasksCancel,
            ) => true,
            _ => false,
        };
        asks && self.gateway_owns_tasks()
    }

    /// Answers a task request (see [`Session::is_task_request`]).
    pub(super) async fn task_request(self: &Arc<Self>, env: Message) -> Reply {
        let id = env.id().cloned().unwrap_or(Value::Null);
        if env.is(&Method::ToolsCall) {
            let ttl = env
                .task_param()
                .and_then(|t| t.get("ttl"))
                .and_then(Value::as_u64);
            return self.start_task(env, id, ttl).await;
        }
        // Small requests: read as a tree.
        let params = env.params_value().unwrap_or(Value::Null);
        let task_id = params
            .get("taskId")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let out = match (env.method(), task_id) {
            (Some(Method::TasksList), _) => self.list_tasks(id, &params).await,
            (_, None) => Failure::new(
                FailureKind::InvalidParams,
                "params.taskId is required",
                Retry::Never,
            )
            .response(id),
            (Some(Method::TasksGet), Some(t)) => match self.own_task(&t).await {
                Ok(Some(task)) => answer(id, task.get_result()),
                Ok(None) => unknown(id),
                Err(e) => e.response(id),
            },
            (Some(Method::TasksResult), Some(t)) => self.task_result(id, &t).await,
            (_, Some(t)) => self.cancel_task(id, &t).await,
        };
        Reply::Immediate(out)
    }

    /// The caller's task `id`, settled if its runner is gone; `None` when it names no task
    /// of this session's principal (or one that expired).
    async fn own_task(self: &Arc<Self>, id: &str) -> Result<Option<TaskRecord>, Failure> {
        if !crate::tasks::looks_like_task_id(id) {
            return Ok(None);
        }
        let found = self
            .shared
            .store
            .load_task(id)
            .await
            .map_err(|e| store_down(&e))?;
        // A task is answered on the server it was created on, to its principal only.
        let Some(mut task) = found.filter(|t| {
            t.era == Era::Legacy
                && t.principal == self.record.principal
                && t.server == self.shared.cfg.upstream_name
                && !t.expired(crate::store::now_ms())
        }) else {
            return Ok(None);
        };
        if !task.status.is_terminal()
            && !self.shared.runs_task(&task).await
            && !self.shared.ended_meanwhile(&mut task).await?
        {
            if task.request.is_some() && self.resume_task(&mut task).await {
                return Ok(Some(task));
            }
            self.shared
                .settle_once(&self.record.principal, &mut task)
                .await?;
        }
        Ok(Some(task))
    }

    /// Whether the caller may start another task: its running ones and the server's, and
    /// its stored ones, under their bounds.
    async fn admit_task(&self) -> Result<(), Failure> {
        self.running_bound(&self.shared.tasks.lock().unwrap_or_else(|p| p.into_inner()))?;
        let stored = self
            .shared
            .store
            .count_tasks(&self.record.principal)
            .await
            .map_err(|e| store_down(&e))?;
        let most = self.shared.cfg.task_limits.stored_per_principal;
        if stored >= u64::try_from(most).unwrap_or(u64::MAX) {
            return Err(Failure::at_bound(
                "max-stored-tasks",
                format!(
                    "this user has {stored} tasks kept (at most {most}); they are forgotten when their time to live ends"
                ),
            ));
        }
        Ok(())
    }

    /// The running bounds, checked against `tasks` (the table, locked by the caller).
    fn running_bound(&self, tasks: &HashMap<String, RunningTask>) -> Result<(), Failure> {
        let mine = tasks
            .values()
            .filter(|t| t.principal == self.record.principal)
            .count();
        let limits = &self.shared.cfg.task_limits;
        if mine >= limits.running_per_principal {
            return Err(Failure::at_bound(
                "max-tasks-per-principal",
                format!(
                    "{} tasks of this user are running on this server; wait for one to end",
                    limits.running_per_principal
                ),
            ));
        }
        if tasks.len() >= limits.running {
            return Err(Failure::at_bound(
                "max-tasks",
                format!(
                    "{} tasks are running on this server; try again shortly",
                    limits.running
                ),
            ));
        }
        Ok(())
    }

    /// Claims a new task `id` for this process, within the running bounds: the check and
    /// the claim under one lock, so concurrent creations cannot overshoot them.
    pub(super) fn claim_new_task(
        &self,
        id: &str,
        client_id: &Value,
        inbox: Option<mpsc::Sender<TaskInput>>,
    ) -> Result<(), Failure> {
        let mut tasks = self.shared.tasks.lock().unwrap_or_else(|p| p.into_inner());
        self.running_bound(&tasks)?;
        self.shared
            .insert_claim(&mut tasks, id, &self.record.principal, client_id, inbox);
        Ok(())
    }

    /// `tools/call` with `params.task`: the record first, then the call.
    async fn start_task(self: &Arc<Self>, mut env: Message, id: Value, ttl: Option<u64>) -> Reply {
        let most = self.shared.cfg.task_limits.ttl;
        let ttl = ttl.map_or(most, Duration::from_millis).min(most);
        let tool = super::outbound::tool_of(&env).unwrap_or_default();
        if let Err(over) = self.admit_task().await {
            self.shared.metrics.refused(
                over.field("limit")
                    .and_then(Value::as_str)
                    .unwrap_or("max-tasks"),
            );
            return Reply::Immediate(over.response(id));
        }
        let (link, generation) = match self.ensure_upstream().await {
            Ok(x) => x,
            Err(failure) => return Reply::Immediate(failure.response(id)),
        };
        let mut task = TaskRecord::working(
            &self.record.principal,
            &self.shared.cfg.upstream_name,
            &tool,
            Era::Legacy,
            Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            u64::try_from(TASK_POLL.as_millis()).unwrap_or(1000),
            crate::store::now_ms(),
        );
        task.owner = self.shared.coordinator.as_ref().map(|c| c.me().id.clone());
        // The upstream runs a plain call: the task is the gateway's.
        env.edit_params(|p| p.remove("task").is_some());
        // Whether it may be re-issued after a restart is the upstream's word, asked once
        // (a client need not have listed the tools).
        if self.lock().safe_tools.is_empty() {
            self.refresh_safe_tools(&link, generation).await;
        }
        if self.lock().safe_tools.contains(&tool) {
            task.request = env.params_value();
        }
        if let Err(over) = self.claim_new_task(&task.id, &id, None) {
            self.shared.metrics.refused(
                over.field("limit")
                    .and_then(Value::as_str)
                    .unwrap_or("max-tasks"),
            );
            return Reply::Immediate(over.response(id));
        }
        if let Err(e) = self.shared.store.put_task(&task).await {
            self.shared.release_task(&task.id);
            return Reply::Immediate(store_down(&e).response(id));
        }
        crate::fault::point(crate::fault::points::TASK_CREATED);
        self.shared.metrics.tasks_created.inc();
        let created = task.create_result();
        self.launch_task(task, env, id.clone(), &link, generation)
            .await;
        Reply::Immediate(answer(id, created))
    }

    /// Marks task `id` as run by this process; `false` when it already is (a concurrent
    /// resumption got there first).
    fn claim_task(&self, id: &str, client_id: &Value) -> bool {
        self.claim_task_with(id, client_id, None)
    }

    /// [`Session::claim_task`] for a task whose client may update or cancel it through
    /// `inbox` (2026-07-28).
    fn claim_task_with(
        &self,
        id: &str,
        client_id: &Value,
        inbox: Option<mpsc::Sender<TaskInput>>,
    ) -> bool {
        let mut tasks = self.shared.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks.contains_key(id) {
            return false;
        }
        self.shared
            .insert_claim(&mut tasks, id, &self.record.principal, client_id, inbox);
        true
    }

    /// Sends a claimed task's call upstream and starts its runner.
    async fn launch_task(
        self: &Arc<Self>,
        task: TaskRecord,
        call: Message,
        client_id: Value,
        link: &Link,
        generation: u64,
    ) {
        let stream = Arc::new(Stream::new(
            self.id.clone(),
            crate::ids::new_stream_id().into(),
            1,
            false,
        ));
        let (frames, _) = stream.attach(self.shared.cfg.stream_buffer);
        let stream_id: Arc<str> = stream.id().clone();
        // Marked before the call is sent: the upstream may ask its client at once.
        self.lock().task_streams.insert(stream_id.clone());
        self.forward(link, generation, call, client_id, stream, Method::ToolsCall)
            .await;
        let session = self.clone();
        self.shared
            .tracker
            .spawn(async move { session.run_task(task, frames, stream_id, None).await });
    }

    /// Re-issues a task that is safe to repeat and whose runner died with its process:
    /// same task id, a fresh call on a fresh upstream. `false` when it cannot be (no
    /// upstream now): the caller fails it.
    async fn resume_task(self: &Arc<Self>, task: &mut TaskRecord) -> bool {
        let Some((client_id, call)) = resume_call(task) else {
            return false;
        };
        if !self.claim_task(&task.id, &client_id) {
            // Resumed by a concurrent request: it runs.
            return true;
        }
        let resumed = async {
            let (link, generation) = self.ensure_upstream().await.ok()?;
            task.owner = self.shared.coordinator.as_ref().map(|c| c.me().id.clone());
            task.status_message = Some("resumed after a gateway restart".into());
            task.updated_ms = crate::store::now_ms();
            self.shared.store.put_task(task).await.ok()?;
            Some((link, generation))
        }
        .await;
        let Some((link, generation)) = resumed else {
            self.shared.release_task(&task.id);
            return false;
        };
        self.shared.metrics.tasks_resumed.inc();
        tracing::info!(task = %task.id, tool = %task.tool, "task resumed after a gateway restart");
        self.launch_task(task.clone(), call, client_id, &link, generation)
            .await;
        true
    }

    /// `tasks/result`: the call's own answer once the task has ended.
    async fn task_result(self: &Arc<Self>, id: Value, task_id: &str) -> Value {
        loop {
            let task = match self.own_task(task_id).await {
                Ok(Some(t)) => t,
                Ok(None) => return unknown(id),
                Err(e) => return e.response(id),
            };
            if task.status.is_terminal() {
                let related = json!({ crate::tasks::RELATED_TASK: {"taskId": task.id} });
                return match task.outcome {
                    Some(Outcome::Result(mut r)) => {
                        if let Some(obj) = r.as_object_mut() {
                            obj.insert("_meta".into(), related);
                        }
                        answer(id, r)
                    }
                    Some(Outcome::Error(e)) => json!({"jsonrpc": "2.0", "id": id, "error": e}),
                    None => Failure::new(
                        FailureKind::Cancelled,
                        "the task was cancelled",
                        Retry::Never,
                    )
                    .response(id),
                };
            }
            let waiter = self
                .shared
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(task_id)
                .map(|r| r.ended.subscribe());
            match waiter {
                Some(mut ended) => {
                    let _ = tokio::time::timeout(TASK_POLL, ended.wait_for(|e| *e)).await;
                }
                // Another instance runs it: its record tells.
                None => tokio::time::sleep(TASK_POLL).await,
            }
        }
    }

    /// `tasks/list`: the caller's tasks, oldest first, a page at a time.
    async fn list_tasks(&self, id: Value, params: &Value) -> Value {
        let after = params
            .get("cursor")
            .and_then(Value::as_str)
            .and_then(|c| c.split_once(':'))
            .and_then(|(ms, t)| Some((ms.parse::<i64>().ok()?, t.to_owned())));
        let now = crate::store::now_ms();
        match self
            .shared
            .store
            .list_tasks(&self.record.principal, after, LIST_PAGE)
            .await
        {
            Ok(tasks) => {
                let next = (tasks.len() == LIST_PAGE)
                    .then(|| tasks.last().map(|t| format!("{}:{}", t.created_ms, t.id)))
                    .flatten();
                let mut result = json!({
                    "tasks": tasks
                        .iter()
                        .filter(|t| !t.expired(now) && t.server == self.shared.cfg.upstream_name)
                        .map(TaskRecord::task)
                        .collect::<Vec<_>>(),
                });
                if let Some(n) = next {
                    result["nextCursor"] = json!(n);
                }
                answer(id, result)
            }
            Err(e) => store_down(&e).response(id),
        }
    }

    /// `tasks/cancel` (2025-11-25): answered once the task is `cancelled`; a task that has
    /// already ended cannot be.
    async fn cancel_task(self: &Arc<Self>, id: Value, task_id: &str) -> Value {
        let mut task = match self.own_task(task_id).await {
            Ok(Some(t)) => t,
            Ok(None) => return unknown(id),
            Err(e) => return e.response(id),
        };
        if task.status.is_terminal() {
            return Failure::new(
                FailureKind::InvalidParams,
                format!("the task has already ended ({})", task.status.as_str()),
                Retry::Never,
            )
            .response(id);
        }
        let client_id = {
            let mut tasks = self.shared.tasks.lock().unwrap_or_else(|p| p.into_inner());
            match tasks.get_mut(task_id) {
                Some(r) if r.finishing => {
                    return Failure::new(
                        FailureKind::InvalidParams,
                        "the task has already ended",
                        Retry::Never,
                    )
                    .response(id);
                }
                Some(r) => {
                    r.cancelled = true;
                    Some(r.client_id.clone())
                }
                None => None,
            }
        };
        task.status = Status::Cancelled;
        task.status_message = Some("cancelled by its client".into());
        task.updated_ms = crate::store::now_ms();
        if let Err(e) = self.shared.store.put_task(&task).await {
            return store_down(&e).response(id);
        }
        crate::fault::point(crate::fault::points::TASK_CANCELLED);
        self.shared.metrics.task_ended(Status::Cancelled.as_str());
        if let Some(request_id) = client_id {
            let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": request_id, "reason": "task cancelled"}});
            if let Ok(message) = Message::from_value(cancel) {
                self.notify(message).await;
            }
        }
        answer(id, task.task())
    }
}
