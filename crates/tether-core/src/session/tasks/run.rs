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
            if frame.terminal && frame.data.len() > MAX_TASK_RESULT {
                break End::Outcome(Outcome::Error(
                    Failure::too_large(
                        "the task's answer is larger than a task keeps",
                        frame.data.len(),
                        MAX_TASK_RESULT,
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
            // The upstream asks the client something: a 2026-07-28 task keeps it for its
            // client; a 2025-11-25 one does not carry it yet. Notifications (progress,
            // logs) are not kept for a task.
            if let Some(m) = &modern
                && message.kind() == Kind::Request
            {
                self.ask_input(&mut task, &m.capabilities, message).await;
            } else if message.kind() == Kind::Request
                && let Some(ask) = message.id()
            {
                let refusal = Failure::new(
                    FailureKind::InvalidRequest,
                    "the gateway does not yet carry a server's requests to the client during a task",
                    Retry::Never,
                )
                .response(ask.clone());
                self.respond(Message::ours(refusal)).await;
            }
        };
        // Decided under the lock, so that a cancellation either came first (and its final
        // state stands) or finds the task finishing and is refused as too late. The entry
        // stays until the outcome is durable: a `tasks/get` meanwhile must not take a
        // task whose runner is gone for an interrupted one.
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
