//! A stateless (2026-07-28) client over raw HTTP: every request carries its `_meta` and the
//! headers that mirror it, so every field is the test's to choose.

use serde_json::{Value, json};

use super::{ACCEPT_BOTH, Answer};

pub const V: &str = "2026-07-28";

/// A stateless client: every request carries its `_meta` and the headers that mirror it.
pub struct Modern {
    http: reqwest::Client,
    url: String,
    capabilities: Value,
    key: Option<String>,
    name: &'static str,
}

impl Modern {
    pub fn new(url: &str, capabilities: Value) -> Modern {
        Modern {
            http: reqwest::Client::new(),
            url: url.to_owned(),
            capabilities,
            key: None,
            name: "modern-test",
        }
    }

    pub fn named(mut self, name: &'static str) -> Modern {
        self.name = name;
        self
    }

    pub fn with_key(mut self, key: &str) -> Modern {
        self.key = Some(key.to_owned());
        self
    }

    pub fn request(
        &self,
        id: impl Into<Value>,
        method: &str,
        mut params: Value,
    ) -> reqwest::RequestBuilder {
        let id: Value = id.into();
        let meta = params
            .as_object_mut()
            .unwrap()
            .entry("_meta")
            .or_insert_with(|| json!({}));
        meta["io.modelcontextprotocol/protocolVersion"] = json!(V);
        meta["io.modelcontextprotocol/clientCapabilities"] = self.capabilities.clone();
        meta["io.modelcontextprotocol/clientInfo"] = json!({"name": self.name, "version": "1"});
        let name = params
            .get("name")
            .or_else(|| params.get("uri"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", ACCEPT_BOTH)
            .header("mcp-protocol-version", V)
            .header("mcp-method", method);
        if let Some(n) = name.filter(|_| method == "tools/call") {
            req = req.header("mcp-name", n);
        }
        // The Tasks extension's methods name their task (what routes them).
        if let Some(t) = params.get("taskId").and_then(Value::as_str) {
            req = req.header("mcp-name", t);
        }
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        req.body(
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string(),
        )
    }

    /// Opens a `subscriptions/listen` stream named `id` asking for `notifications`.
    pub async fn listen(&self, id: &str, notifications: Value) -> reqwest::Response {
        self.request(
            id,
            "subscriptions/listen",
            json!({ "notifications": notifications }),
        )
        .send()
        .await
        .unwrap()
    }

    pub async fn send(&self, id: i64, method: &str, params: Value) -> Answer {
        Answer::read(self.request(id, method, params).send().await.unwrap()).await
    }

    pub async fn call(&self, id: i64, tool: &str, args: Value) -> Answer {
        self.send(id, "tools/call", json!({"name": tool, "arguments": args}))
            .await
    }

    /// A call of `tool` that the gateway makes a task (the client declared the Tasks
    /// extension; `--task-after` short enough): checks the `CreateTaskResult`'s shape and
    /// returns the task id.
    pub async fn task(&self, id: i64, tool: &str, args: Value) -> String {
        let created = self.call(id, tool, args).await;
        assert_eq!(created.status, 200, "{}", created.body);
        let created = created.json();
        let r = &created["result"];
        assert_eq!(r["resultType"], "task", "{created}");
        assert_eq!(r["status"], "working", "{created}");
        assert!(r["ttlMs"].as_u64().is_some(), "{created}");
        assert!(r["pollIntervalMs"].as_u64().is_some(), "{created}");
        assert!(r["createdAt"].as_str().is_some(), "{created}");
        r["taskId"].as_str().unwrap().to_owned()
    }

    /// The `tasks/get` result of `task`.
    pub async fn task_state(&self, task: &str) -> Value {
        self.send(99, "tasks/get", json!({"taskId": task}))
            .await
            .json()["result"]
            .clone()
    }
}
