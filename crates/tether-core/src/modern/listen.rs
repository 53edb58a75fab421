//! What a `subscriptions/listen` stream asked for (`Filter`): the list-changed kinds, the
//! resources and the tasks whose notifications pass, its acknowledgement, and the tag each
//! notification carries.
//!
//! Must not: decide who may listen (the front does) or hold a stream.

use super::*;

/// Task ids one `subscriptions/listen` may name (`notifications.taskIds`); the
/// acknowledgement lists the ones honoured.
pub const MAX_LISTEN_TASKS: usize = 64;

/// Resources one `subscriptions/listen` may subscribe to; the acknowledgement lists the
/// ones honoured, so a client asking for more learns which were left out.
pub const MAX_LISTEN_RESOURCES: usize = 64;

/// What a `subscriptions/listen` asked for: list-changed kinds, and the resources whose
/// updates it wants (`resourceSubscriptions`, at most [`MAX_LISTEN_RESOURCES`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `toolsListChanged`.
    pub tools: bool,
    /// `promptsListChanged`.
    pub prompts: bool,
    /// `resourcesListChanged`.
    pub resources: bool,
    /// `resourceSubscriptions`: the URIs whose `notifications/resources/updated` pass.
    pub uris: Vec<String>,
    /// `taskIds`: the tasks whose `notifications/tasks` pass (at most
    /// [`MAX_LISTEN_TASKS`]; each reaches only its own principal's streams).
    pub task_ids: Vec<String>,
}

impl Filter {
    /// The filter of a `subscriptions/listen` request's `params.notifications`.
    pub fn of(env: &Message) -> Filter {
        let params = env.params_value();
        let n = params.as_ref().and_then(|p| p.get("notifications"));
        let on = |k: &str| n.and_then(|n| n.get(k)).and_then(Value::as_bool) == Some(true);
        // The distinct strings of list `k`, the first `most` of them.
        let distinct = |k: &str, most: usize| {
            let mut out: Vec<String> = Vec::new();
            for s in n
                .and_then(|n| n.get(k))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if out.len() == most {
                    break;
                }
                if !out.iter().any(|x| x == s) {
                    out.push(s.to_owned());
                }
            }
            out
        };
        Filter {
            tools: on("toolsListChanged"),
            prompts: on("promptsListChanged"),
            resources: on("resourcesListChanged"),
            uris: distinct("resourceSubscriptions", MAX_LISTEN_RESOURCES),
            task_ids: distinct("taskIds", MAX_LISTEN_TASKS),
        }
    }

    /// Whether a notification from an upstream passes the filter.
    pub fn admits(&self, notification: &Value) -> bool {
        match notification.get("method").and_then(Value::as_str) {
            Some("notifications/tools/list_changed") => self.tools,
            Some("notifications/prompts/list_changed") => self.prompts,
            Some("notifications/resources/list_changed") => self.resources,
            Some("notifications/resources/updated") => notification
                .pointer("/params/uri")
                .and_then(Value::as_str)
                .is_some_and(|u| self.uris.iter().any(|x| x == u)),
            Some("notifications/tasks") => notification
                .pointer("/params/taskId")
                .and_then(Value::as_str)
                .is_some_and(|t| self.task_ids.iter().any(|x| x == t)),
            _ => false,
        }
    }

    /// The first message of the stream: what is honoured, tagged with the subscription.
    pub fn acknowledged(&self, subscription: &Value) -> Value {
        let mut honoured = Map::new();
        for (k, on) in [
            ("toolsListChanged", self.tools),
            ("promptsListChanged", self.prompts),
            ("resourcesListChanged", self.resources),
        ] {
            if on {
                honoured.insert(k.to_owned(), Value::Bool(true));
            }
        }
        if !self.uris.is_empty() {
            honoured.insert("resourceSubscriptions".to_owned(), json!(self.uris));
        }
        if !self.task_ids.is_empty() {
            honoured.insert("taskIds".to_owned(), json!(self.task_ids));
        }
        json!({
            "jsonrpc": "2.0",
            "method": "notifications/subscriptions/acknowledged",
            "params": {"notifications": honoured, "_meta": {META_SUBSCRIPTION_ID: subscription}},
        })
    }
}

/// A notification for a listen stream, tagged with its subscription.
pub fn tagged(notification: &Value, subscription: &Value) -> Value {
    let mut v = notification.clone();
    if !v.get("params").is_some_and(Value::is_object) {
        v["params"] = json!({});
    }
    if !v["params"].get("_meta").is_some_and(Value::is_object) {
        v["params"]["_meta"] = json!({});
    }
    v["params"]["_meta"][META_SUBSCRIPTION_ID] = subscription.clone();
    v
}
