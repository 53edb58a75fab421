//! The MCP methods the gateway acts on, named once.
//!
//! Must not: refuse a method it does not know; those are [`Method::Other`] and forwarded.

use std::fmt;

/// A JSON-RPC method. The gateway looks at a few methods (their ids, params or results
/// change what it does); every other one is [`Method::Other`] and passes through unread.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// `initialize`.
    Initialize,
    /// `notifications/initialized`.
    Initialized,
    /// `ping`.
    Ping,
    /// `tools/call`.
    ToolsCall,
    /// `tools/list`.
    ToolsList,
    /// `resources/subscribe`.
    ResourcesSubscribe,
    /// `resources/unsubscribe`.
    ResourcesUnsubscribe,
    /// `logging/setLevel`.
    SetLevel,
    /// `notifications/cancelled`.
    Cancelled,
    /// `notifications/progress`.
    Progress,
    /// `server/discover` (2026-07-28).
    Discover,
    /// `subscriptions/listen` (2026-07-28).
    Listen,
    /// `tasks/get` (both eras).
    TasksGet,
    /// `tasks/result` (2025-11-25).
    TasksResult,
    /// `tasks/list` (2025-11-25).
    TasksList,
    /// `tasks/cancel` (both eras).
    TasksCancel,
    /// `tasks/update` (2026-07-28).
    TasksUpdate,
    /// Any other method, kept as sent.
    Other(Box<str>),
}

/// The known methods and their names; one table, so a name is spelled once.
const KNOWN: &[(Method, &str)] = &[
    (Method::Initialize, "initialize"),
    (Method::Initialized, "notifications/initialized"),
    (Method::Ping, "ping"),
    (Method::ToolsCall, "tools/call"),
    (Method::ToolsList, "tools/list"),
    (Method::ResourcesSubscribe, "resources/subscribe"),
    (Method::ResourcesUnsubscribe, "resources/unsubscribe"),
    (Method::SetLevel, "logging/setLevel"),
    (Method::Cancelled, "notifications/cancelled"),
    (Method::Progress, "notifications/progress"),
    (Method::Discover, "server/discover"),
    (Method::Listen, "subscriptions/listen"),
    (Method::TasksGet, "tasks/get"),
    (Method::TasksResult, "tasks/result"),
    (Method::TasksList, "tasks/list"),
    (Method::TasksCancel, "tasks/cancel"),
    (Method::TasksUpdate, "tasks/update"),
];

impl Method {
    /// The method called `name`.
    pub fn from_name(name: &str) -> Method {
        KNOWN
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(m, _)| m.clone())
            .unwrap_or_else(|| Method::Other(name.into()))
    }

    /// Its name on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Other(name) => name,
            known => KNOWN
                .iter()
                .find(|(m, _)| m == known)
                .map(|(_, n)| *n)
                .expect("every known method is in KNOWN"),
        }
    }

    /// Whether a message with this method needs an answer: every MCP notification's method
    /// is under `notifications/`, so any other method is a request.
    pub fn needs_answer(&self) -> bool {
        !self.as_str().starts_with("notifications/")
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Method {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Method {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_kept() {
        for (m, n) in KNOWN {
            assert_eq!(Method::from_name(n), *m);
            assert_eq!(m.as_str(), *n);
        }
        let other = Method::from_name("vendor/thing");
        assert_eq!(other, Method::Other("vendor/thing".into()));
        assert_eq!(other.as_str(), "vendor/thing");
        assert!(other.needs_answer());
        assert!(!Method::Progress.needs_answer());
    }
}
