//! Fault injection for the durability kill tests (docs/design/durability.md): a named
//! point in the code where a debug build crashes the process when `TETHER_FAULT` names
//! it, so a test can stop the gateway exactly between a write and what the client sees.
//! Release builds compile every point to nothing.
//!
//! Must not: do anything in a release build, or run cleanup of any kind when it fires
//! (the point is to leave the state a SIGKILL would).

/// The variable that names the point to crash at.
pub const ENV: &str = "TETHER_FAULT";

/// Points a test may name, each at one row of docs/design/durability.md.
pub mod points {
    /// Row 1: the session record is durable, the `initialize` answer not yet sent.
    pub const SESSION_RECORDED: &str = "session-recorded";
    /// Row 2: a request stream's record is durable, its priming event not yet sent.
    pub const STREAM_RECORDED: &str = "stream-recorded";
    /// Row 2: a call was answered within the answer window (nothing of it stored), its
    /// JSON body not yet sent.
    pub const QUICK_ANSWER: &str = "quick-answer";
    /// Row 8: the close is durable, the `DELETE` answer not yet sent.
    pub const SESSION_CLOSED: &str = "session-closed";
    /// Row T1: a task's record is durable, its `CreateTaskResult` not yet sent.
    pub const TASK_CREATED: &str = "task-created";
    /// Row T2: a 2026-07-28 task's input request is durable, nobody told yet.
    pub const TASK_INPUT: &str = "task-input";
    /// Row T5: a 2025-11-25 task's cancellation is durable, its `tasks/cancel` not yet
    /// answered.
    pub const TASK_CANCELLED: &str = "task-cancelled";
    /// Row T4: a task's outcome is durable, nobody told yet.
    pub const TASK_FINISHED: &str = "task-finished";
}

/// Crashes the process (abort: no destructors, no flush) if this is a debug build and
/// `TETHER_FAULT` names `point`.
pub fn point(point: &str) {
    if cfg!(debug_assertions) && armed().is_some_and(|p| p == point) {
        eprintln!("tether: fault injection: crashing at {point}");
        std::process::abort();
    }
}

fn armed() -> Option<&'static str> {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()))
        .as_deref()
}
