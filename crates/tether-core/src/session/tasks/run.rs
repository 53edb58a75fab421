//! A task's runner, both eras: it reads the task's call to its end (a 2026-07-28 task's
//! also takes its client's `tasks/update` and `tasks/cancel` through its inbox), stores
//! each state before anyone can see it, and tells the client.
//!
//! Must not: show a state the record does not hold, or report a task's end twice.

use super::*;

impl Session {
    /// Reads the task's call to its end and stores how it ended; a 2026-07-28 task's
    /// runner also takes its client's updates and cancellation (`modern`).
    pub(super) async fn run_task(
        self: Arc<Self>,
        mut task: TaskRecord,
        mut frames: FrameRx,
        stream: Arc<str>,
        mut modern: Option<ModernRun>,
    ) {
        // Out of `--upstream-timeout`: a task's call may run as long as the task lives.
        self.lock().calls.untime_stream(&stream);
        let expires = task.expires_ms().map(|at| {
            let left = u64::try_from(at - crate::store::now_ms()).unwrap_or(0);
            tokio::time::Instant::now() + Duration::from_millis(left)
        });
        let outlived = async move {
            match expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(outlived);
        // A 2025-11-25 task's requests to its client that wait for an answer (the answer
        // goes straight to the upstream through the session; this only watches for it).
        let mut waiting: Vec<String> = Vec::new();
        let mut answered = tokio::time::interval(INPUT_CHECK);
        let stopped = self.shared.stopped.clone();
        let end = loop {
            let next = match modern.as_mut() {
                Some(m) => tokio::select! {
                    biased;
                    () = stopped.cancelled() => break End::Stopped,
                    () = &mut outlived => break End::Outlived,
                    f = frames.recv() => f,
                    input = m.inbox.recv() => match input {
                        Some(TaskInput::Responses(answers, taken)) => {
                            self.take_inputs(&mut task, answers).await;
                            let _ = taken.send(());
                            continue;
                        }
                        Some(TaskInput::Cancel) => break End::Cancelled,
                        // The entry (and its sender) outlives the runner: not reached.
                        None => continue,
                    },
                },
                None => tokio::select! {
                    biased;
                    () = stopped.cancelled() => break End::Stopped,
                    () = &mut outlived => break End::Outlived,
                    _ = answered.tick(), if !waiting.is_empty() => {
                        self.answered_inputs(&mut task, &mut waiting).await;
                        continue;
                    }
                    f = frames.recv() => f,
                },
            };
            let Some(frame) = next.filter(|_| !stopped.is_cancelled()) else {
                if stopped.is_cancelled() {
                    break End::Stopped;
                }
                break End::Outcome(Outcome::Error(
                    Failure::upstream_lost("the task's call ended without an answer", true)
                        .response(Value::Null)["error"]
                        .clone(),
                ));
            };
            // Measured before anything is parsed: an answer too large to keep is not read.
            let most = self.shared.cfg.task_limits.result;
            if frame.terminal && frame.data.len() > most {
                break End::Outcome(Outcome::Error(
                    Failure::too_large(
                        "the task's answer is larger than a task keeps",
                        frame.data.len(),
                        most,
                    )
                    .response(Value::Null)["error"]
                        .clone(),
                ));
            }
            let Ok(message) = Message::parse(frame.data.as_bytes()) else {
                continue;
            };
            if frame.terminal {
                break End::Outcome(match (message.error(), message.result_value()) {
                    (Some(e), _) => {
                        Outcome::Error(serde_json::from_str(e.get()).unwrap_or_default())
                    }
                    (None, result) => Outcome::Result(result.unwrap_or_default()),
                });
            }
            // The upstream asks the client something: a 2026-07-28 task keeps it as an
            // input request for `tasks/update`; a 2025-11-25 one sends it on the session's
            // stream, tagged with the task. Notifications (progress, logs) are not kept
            // for a task.
            if message.kind() == Kind::Request {
                match &modern {
                    Some(m) => self.ask_input(&mut task, &m.capabilities, message).await,
                    None => self.ask_client(&mut task, message, &mut waiting).await,
                }
            }
        };
        // Decided under the lock, so that a cancellation either came first (and its final
        // state stands) or finds the task finishing and is refused as too late. The entry
        // stays until the outcome is durable: a `tasks/get` meanwhile must not take a
        // task whose runner is gone for an interrupted one.
        self.lock().task_streams.remove(&stream);
        let outcome = match end {
            End::Outcome(o) => o,
            End::Cancelled => {
                self.abandon(&stream, &task.input_keys());
                task.status = Status::Cancelled;
                task.status_message = Some("cancelled by its client".into());
                task.input_requests = None;
                task.updated_ms = crate::store::now_ms();
                self.store_task(&task).await;
                self.end_task(&task, true);
                return;
            }
            // The gateway stops: the record stays as it is, and the next process settles
            // it like any task whose runner died (re-issued if safe to repeat, else
            // `failed`), instead of this one recording the upstream's end as the outcome.
            End::Stopped => {
                self.end_task(&task, false);
                return;
            }
            // Its time to live is over: the call stops upstream and the task fails,
            // saying so (the record may be forgotten from now on).
            End::Outlived => {
                self.abandon(&stream, &task.input_keys());
                let f = Failure::new(
                    FailureKind::UpstreamTimeout,
                    "the task outlived its time to live; its call was cancelled",
                    Retry::Unknown,
                );
                Outcome::Error(f.response(Value::Null)["error"].clone())
            }
        };
        let cancelled = {
            let mut tasks = self.shared.tasks.lock().unwrap_or_else(|p| p.into_inner());
            match tasks.get_mut(&task.id) {
                Some(r) if r.cancelled => true,
                Some(r) => {
                    r.finishing = true;
                    false
                }
                None => false,
            }
        };
        // Cancelled through another instance (it stored the final state; only the owner
        // runs the call): that state stands.
        let cancelled = cancelled
            || matches!(
                self.shared.store.load_task(&task.id).await,
                Ok(Some(t)) if t.status == Status::Cancelled
            );
        if !cancelled {
            task.finish(outcome, crate::store::now_ms());
            self.store_task(&task).await;
            crate::fault::point(crate::fault::points::TASK_FINISHED);
        }
        self.end_task(&task, !cancelled);
    }

    /// A 2025-11-25 task's upstream asks its client something: the request goes on the
    /// session's standalone (GET) stream with the task's `related-task` metadata (the
    /// spec lets such messages come on any stream), and the task is `input_required`
    /// (durable before the status notification) until the client has answered.
    pub(super) async fn ask_client(
        self: &Arc<Self>,
        task: &mut TaskRecord,
        message: Message,
        waiting: &mut Vec<String>,
    ) {
        let Some(key) = message.id().and_then(Value::as_str).map(str::to_owned) else {
            return;
        };
        if waiting.len() >= MAX_TASK_INPUTS {
            let refusal = Failure::new(
                FailureKind::Limit,
                format!("the task already waits on {MAX_TASK_INPUTS} requests to its client"),
                Retry::Never,
            )
            .response(Value::from(key));
            self.respond(Message::ours(refusal)).await;
            return;
        }
        let mut ask = message.to_value();
        if !ask.get("params").is_some_and(Value::is_object) {
            ask["params"] = json!({});
        }
        if !ask["params"].get("_meta").is_some_and(Value::is_object) {
            ask["params"]["_meta"] = json!({});
        }
        ask["params"]["_meta"][crate::tasks::RELATED_TASK] = json!({ "taskId": task.id });
        let mut input = json!({ "method": ask["method"].clone() });
        input["params"] = ask["params"].clone();
        let Ok(ask) = Message::from_value(ask) else {
            return;
        };
        let _ = self
            .standalone
            .push(self.shared.store.as_ref(), &ask, false, None);
        let mut open = match task.input_requests.take() {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        open.insert(key.clone(), input);
        task.input_requests = Some(Value::Object(open));
        waiting.push(key);
        task.status = Status::InputRequired;
        task.updated_ms = crate::store::now_ms();
        self.store_task(task).await;
        crate::fault::point(crate::fault::points::TASK_INPUT);
        self.tell_status(task);
    }

    /// Drops the requests of `waiting` the client has answered; the task is `working`
    /// again once none waits.
    async fn answered_inputs(&self, task: &mut TaskRecord, waiting: &mut Vec<String>) {
        let before = waiting.len();
        {
            let st = self.lock();
            waiting.retain(|k| st.calls.has_server_request(k));
        }
        if waiting.len() == before {
            return;
        }
        if let Some(Value::Object(open)) = task.input_requests.as_mut() {
            open.retain(|k, _| waiting.contains(k));
        }
        if waiting.is_empty() {
            task.input_requests = None;
            task.status = Status::Working;
        }
        task.updated_ms = crate::store::now_ms();
        self.store_task(task).await;
        self.tell_status(task);
    }

    /// Stores a running task's new state (logged, not fatal, when the store is away: the
    /// record keeps its last state).
    pub(super) async fn store_task(&self, task: &TaskRecord) {
        if let Err(e) = self.shared.store.put_task(task).await {
            tracing::warn!(task = %task.id, status = task.status.as_str(), error = %e, "a task's state could not be stored");
        }
    }

    /// A task's runner is done: its entry goes, its waiters wake, and (when `counted`: its
    /// end is this runner's to report) it is counted and its client told.
    pub(super) fn end_task(&self, task: &TaskRecord, counted: bool) {
        let running = self
            .shared
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&task.id);
        if let Some(r) = running {
            self.shared.metrics.tasks_running.dec();
            let _ = r.ended.send(true);
        }
        if !counted {
            return;
        }
        self.shared.metrics.task_ended(task.status.as_str());
        self.tell_status(task);
    }

    /// Tells a task's client its new status: on the session's stream for a 2025-11-25
    /// client, if it listens (status notifications are optional there; polling finds the
    /// same), or on its principal's `subscriptions/listen` streams that name the task.
    pub(super) fn tell_status(&self, task: &TaskRecord) {
        let note = task.status_notification();
        match task.era {
            Era::Legacy => {
                if let Ok(note) = Message::from_value(note) {
                    let _ = self
                        .standalone
                        .push(self.shared.store.as_ref(), &note, false, None);
                }
            }
            Era::Modern => self.shared.to_task_listeners(&task.principal, note),
        }
    }
}
