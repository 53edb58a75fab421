//! The bundled demo MCP server (`tether demo-server`), built with the official Rust SDK.
//!
//! It is the upstream of `tether serve --demo`, so the quick start works on a machine with
//! no Node.js or Python, and it is the fixture of the integration tests: its tools cover
//! plain calls, progress, a server-to-client request (sampling), annotated and
//! unannotated slow calls (for retry-after-restart rules), per-process state and a crash,
//! and misbehaviour on request (floods of notifications, huge answers, huge stderr lines)
//! for the tests of the gateway's bounds.
//!
//! Must not: be needed by the gateway: it is a test and quick-start upstream only.
#![allow(deprecated)] // Sampling is deprecated by SEP-2577 but is what legacy clients speak.
#![allow(missing_docs)] // The tool argument structs document themselves through schemars.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::InputResponses;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResponse, CallToolResult, ContentBlock, CreateMessageRequestParams,
    InputRequiredResult, ProgressNotificationParam, RequestMetaObject, SamplingMessage,
    ServerCapabilities, ServerConfig, SetLevelRequestParams, SubscribeRequestParams,
    SubscriptionFilter, UnsubscribeRequestParams,
};
use rmcp::service::{RequestContext, SubscriptionContext};
use rmcp::{
    ErrorData, Peer, RoleServer, ServerHandler, ServiceExt, schemars, tool, tool_handler,
    tool_router,
};

/// Options of `tether demo-server`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Serve Streamable HTTP on this address (path /mcp) instead of stdio.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct EchoArgs {
    /// Text to return.
    pub text: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct AddArgs {
    pub a: i64,
    pub b: i64,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct SlowArgs {
    /// Total time to take, in milliseconds.
    pub ms: u64,
    /// Progress notifications to send along the way (when the caller gave a progress token).
    #[serde(default)]
    pub steps: u32,
}

/// What `ask` asks the user for.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct AskAnswer {
    /// The user's name.
    pub name: String,
}
rmcp::elicit_safe!(AskAnswer);

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct SampleArgs {
    /// What to ask the client's model.
    pub prompt: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct SizeArgs {
    /// How many bytes.
    pub bytes: usize,
}

/// What a `touch` tool did, for the listen streams to tell their clients.
#[derive(Clone, Copy, Debug)]
enum Touch {
    /// `touch_tools`: the tool list changed.
    Tools,
    /// `touch`: every resource a stream subscribed to was updated.
    Resources,
}

/// `touch_tools` and `touch` in the 2026-07-28 era: every open `subscriptions/listen`
/// stream of this process hears them (a stateless server has no session to send it on). Bounded; a
/// listener that falls behind misses old touches, which say the same thing.
static TOUCHED: std::sync::LazyLock<tokio::sync::broadcast::Sender<Touch>> =
    std::sync::LazyLock::new(|| tokio::sync::broadcast::channel(16).0);

/// Whether a request came from a 2026-07-28 client: only those carry the version in
/// `_meta`. Such a client cannot be sent requests; it is asked through an
/// `InputRequiredResult` and retries with the answers.
fn is_modern(meta: &RequestMetaObject) -> bool {
    meta.protocol_version().is_some()
}

/// An `InputRequiredResult` asking for one input under `key`.
fn ask_for(key: &str, method: &str, params: serde_json::Value) -> CallToolResponse {
    let mut v = serde_json::json!({
        "resultType": "input_required",
        "inputRequests": {key: {"method": method}},
    });
    v["inputRequests"][key]["params"] = params;
    match serde_json::from_value::<InputRequiredResult>(v) {
        Ok(r) => CallToolResponse::InputRequired(r),
        Err(e) => CallToolResponse::Complete(CallToolResult::error(vec![ContentBlock::text(
            format!("cannot build the input request: {e}"),
        )])),
    }
}

fn text(t: String) -> CallToolResponse {
    CallToolResponse::Complete(CallToolResult::success(vec![ContentBlock::text(t)]))
}

#[derive(Clone)]
pub struct Demo {
    #[allow(dead_code)] // read by the tool_handler macro
    tool_router: ToolRouter<Self>,
    counter: Arc<AtomicU64>,
    /// What the client set up on this server process (so tests can see it replayed).
    log_level: Arc<std::sync::Mutex<Option<String>>>,
    subscriptions: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct EnvArgs {
    /// Environment variable to read.
    pub name: String,
}

impl Demo {
    fn new() -> Demo {
        Demo {
            tool_router: Self::tool_router(),
            counter: Arc::new(AtomicU64::new(0)),
            log_level: Arc::default(),
            subscriptions: Arc::default(),
        }
    }

    async fn wait(ms: u64, steps: u32, meta: RequestMetaObject, client: Peer<RoleServer>) {
        let token = meta.get_progress_token();
        let steps = steps.max(1);
        for step in 1..=steps {
            tokio::time::sleep(Duration::from_millis(ms / u64::from(steps))).await;
            if let Some(token) = &token {
                let _ = client
                    .notify_progress(
                        ProgressNotificationParam::new(token.clone(), f64::from(step))
                            .with_total(f64::from(steps)),
                    )
                    .await;
            }
        }
    }
}

#[tool_router]
impl Demo {
    #[tool(
        description = "Return the given text",
        annotations(read_only_hint = true)
    )]
    fn echo(&self, Parameters(EchoArgs { text }): Parameters<EchoArgs>) -> String {
        text
    }

    #[tool(description = "Add two integers", annotations(read_only_hint = true))]
    fn add(&self, Parameters(AddArgs { a, b }): Parameters<AddArgs>) -> String {
        a.saturating_add(b).to_string()
    }

    #[tool(
        description = "Wait, reporting progress; safe to repeat",
        annotations(read_only_hint = true)
    )]
    async fn slow(
        &self,
        Parameters(SlowArgs { ms, steps }): Parameters<SlowArgs>,
        meta: RequestMetaObject,
        client: Peer<RoleServer>,
    ) -> String {
        Demo::wait(ms, steps, meta, client).await;
        format!("waited {ms} ms")
    }

    #[tool(description = "Wait like slow, but not annotated as safe to repeat")]
    async fn slow_write(
        &self,
        Parameters(SlowArgs { ms, steps }): Parameters<SlowArgs>,
        meta: RequestMetaObject,
        client: Peer<RoleServer>,
    ) -> String {
        Demo::wait(ms, steps, meta, client).await;
        format!("wrote after {ms} ms")
    }

    #[tool(
        description = "Send notifications/tools/list_changed (for tests of list-changed delivery)"
    )]
    async fn touch_tools(&self, client: Peer<RoleServer>, meta: RequestMetaObject) -> String {
        if is_modern(&meta) {
            let listeners = TOUCHED.send(Touch::Tools).unwrap_or(0);
            return format!("sent to {listeners} listen streams");
        }
        match client.notify_tool_list_changed().await {
            Ok(()) => "sent".into(),
            Err(e) => format!("not sent: {e}"),
        }
    }

    #[tool(description = "Ask the user for their name (elicitation/create) and greet them")]
    async fn ask(
        &self,
        client: Peer<RoleServer>,
        meta: RequestMetaObject,
        InputResponses(answers): InputResponses,
    ) -> Result<CallToolResponse, ErrorData> {
        if is_modern(&meta) {
            let Some(answer) = answers.as_ref().and_then(|a| a.get("name")) else {
                return Ok(ask_for(
                    "name",
                    "elicitation/create",
                    serde_json::json!({
                        "message": "What is your name?",
                        "requestedSchema": {
                            "type": "object",
                            "properties": {"name": {"type": "string", "description": "The user's name."}},
                            "required": ["name"],
                        },
                    }),
                ));
            };
            return Ok(
                match answer.pointer("/content/name").and_then(|n| n.as_str()) {
                    Some(name) => text(format!("hello, {name}")),
                    None => text("no answer".into()),
                },
            );
        }
        match client.elicit::<AskAnswer>("What is your name?").await {
            Ok(Some(a)) => Ok(text(format!("hello, {}", a.name))),
            Ok(None) => Ok(text("no answer".into())),
            Err(e) => Err(ErrorData::internal_error(
                format!("elicitation failed: {e}"),
                None,
            )),
        }
    }

    #[tool(description = "Ask the client's model (sampling/createMessage) and return its answer")]
    async fn sample(
        &self,
        Parameters(SampleArgs { prompt }): Parameters<SampleArgs>,
        client: Peer<RoleServer>,
        meta: RequestMetaObject,
        InputResponses(answers): InputResponses,
    ) -> Result<CallToolResponse, ErrorData> {
        if is_modern(&meta) {
            let Some(answer) = answers.as_ref().and_then(|a| a.get("answer")) else {
                return Ok(ask_for(
                    "answer",
                    "sampling/createMessage",
                    serde_json::json!({
                        "messages": [{"role": "user", "content": {"type": "text", "text": prompt}}],
                        "maxTokens": 100,
                    }),
                ));
            };
            let said = answer
                .pointer("/content/text")
                .and_then(|t| t.as_str())
                .unwrap_or_default();
            return Ok(text(format!("model said: {said}")));
        }
        let result = client
            .create_message(CreateMessageRequestParams::new(
                vec![SamplingMessage::user_text(prompt)],
                100,
            ))
            .await
            .map_err(|e| ErrorData::internal_error(format!("sampling failed: {e}"), None))?;
        let text = serde_json::to_value(&result.message)
            .ok()
            .and_then(|m| {
                m.pointer("/content/text")
                    .and_then(|t| t.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        Ok(self::text(format!("model said: {text}")))
    }

    #[tool(
        description = "This server process's id",
        annotations(read_only_hint = true)
    )]
    fn pid(&self) -> String {
        std::process::id().to_string()
    }

    #[tool(description = "Count calls made to this server process")]
    fn counter(&self) -> String {
        (self.counter.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }

    #[tool(
        description = "The value of an environment variable of this server process",
        annotations(read_only_hint = true)
    )]
    fn getenv(&self, Parameters(EnvArgs { name }): Parameters<EnvArgs>) -> String {
        std::env::var(name).unwrap_or_default()
    }

    #[tool(
        description = "This server process's working directory",
        annotations(read_only_hint = true)
    )]
    fn cwd(&self) -> String {
        std::env::current_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    #[tool(
        description = "What the client set up on this server process: log level and subscriptions",
        annotations(read_only_hint = true)
    )]
    fn setup(&self) -> String {
        let level = self
            .log_level
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| "none".into());
        let subs: Vec<String> = self.subscriptions.lock().unwrap().iter().cloned().collect();
        format!("level={level} subscriptions={}", subs.join(","))
    }

    #[tool(
        description = "Send notifications/resources/updated for every subscribed resource and one log message at the level the client set, then answer with how many were sent (for tests of restored session state)"
    )]
    async fn touch(&self, client: Peer<RoleServer>, meta: RequestMetaObject) -> String {
        if is_modern(&meta) {
            // A stateless server keeps no subscriptions or level: the listen streams know
            // what they subscribed to, the request says its level.
            let streams = TOUCHED.send(Touch::Resources).unwrap_or(0);
            let level = meta.log_level();
            if let Some(level) = level {
                let note = rmcp::model::LoggingMessageNotificationParam::new(
                    level,
                    serde_json::Value::String("touched".into()),
                );
                let _ = client.notify_logging_message(note).await;
            }
            let level = level
                .and_then(|l| serde_json::to_value(l).ok())
                .and_then(|l| l.as_str().map(str::to_owned));
            return format!(
                "streams={streams} level={}",
                level.unwrap_or_else(|| "none".into())
            );
        }
        let subs: Vec<String> = self.subscriptions.lock().unwrap().iter().cloned().collect();
        let level = self.log_level.lock().unwrap().clone();
        for uri in &subs {
            let _ = client
                .notify_resource_updated(rmcp::model::ResourceUpdatedNotificationParam::new(
                    uri.clone(),
                ))
                .await;
        }
        if let Some(level) = level
            .as_deref()
            .and_then(|l| serde_json::from_value(serde_json::Value::String(l.to_owned())).ok())
        {
            let note = rmcp::model::LoggingMessageNotificationParam::new(
                level,
                serde_json::Value::String("touched".into()),
            );
            let _ = client.notify_logging_message(note).await;
        }
        format!(
            "updated={} level={}",
            subs.len(),
            level.unwrap_or_else(|| "none".into())
        )
    }

    #[tool(
        description = "Send log notifications of 64 KiB each, about `bytes` in all, then answer (for tests of clients that do not read)"
    )]
    async fn flood(
        &self,
        Parameters(SizeArgs { bytes }): Parameters<SizeArgs>,
        client: Peer<RoleServer>,
    ) -> String {
        let chunk = "x".repeat(64 * 1024);
        let mut sent = 0;
        while sent < bytes {
            let note = rmcp::model::LoggingMessageNotificationParam::new(
                rmcp::model::LoggingLevel::Info,
                serde_json::Value::String(chunk.clone()),
            );
            if client.notify_logging_message(note).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        format!("sent {sent} bytes")
    }

    #[tool(description = "Answer with a text of `bytes` bytes (for message size limits)")]
    fn big(&self, Parameters(SizeArgs { bytes }): Parameters<SizeArgs>) -> String {
        "y".repeat(bytes)
    }

    #[tool(description = "Write `bytes` bytes to stderr with no newline, then answer")]
    fn stderr(&self, Parameters(SizeArgs { bytes }): Parameters<SizeArgs>) -> String {
        use std::io::Write;
        let chunk = vec![b'z'; 1 << 20];
        let mut err = std::io::stderr().lock();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            if err.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n;
        }
        let _ = err.flush();
        format!("wrote {bytes} bytes to stderr")
    }

    #[tool(
        description = "Return the W3C trace context this request carried: `_meta.traceparent`, and the `traceparent` HTTP header in HTTP mode (for tracing tests)",
        annotations(read_only_hint = true)
    )]
    #[allow(clippy::needless_pass_by_value)] // rmcp's extractors hand over owned values
    fn trace(&self, meta: RequestMetaObject, extensions: rmcp::model::Extensions) -> String {
        let header = extensions
            .get::<axum::http::request::Parts>()
            .and_then(|p| p.headers.get("traceparent"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        serde_json::json!({
            "meta": meta.get("traceparent"),
            "header": header,
        })
        .to_string()
    }

    #[tool(description = "Exit this server process at once (for crash tests)")]
    fn crash(&self) -> String {
        std::process::exit(3)
    }
}

#[tool_handler]
impl ServerHandler for Demo {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .enable_logging()
                .enable_resources()
                .enable_resources_subscribe()
                .build(),
        )
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(requested.clone())
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let mut touched = TOUCHED.subscribe();
        loop {
            let t = tokio::select! {
                _ = context.cancelled() => return Ok(()),
                t = touched.recv() => t,
            };
            match t {
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Ok(Touch::Tools) => {
                    if context.accepted().tools_list_changed == Some(true) {
                        let _ = context.sink().notify_tool_list_changed().await;
                    }
                }
                Ok(Touch::Resources) => {
                    let uris = context
                        .accepted()
                        .resource_subscriptions
                        .clone()
                        .unwrap_or_default();
                    for uri in uris {
                        let _ = context.sink().notify_resource_updated(uri).await;
                    }
                }
            }
        }
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let level = serde_json::to_value(request.level)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
        *self.log_level.lock().unwrap() = level;
        Ok(())
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.subscriptions
            .lock()
            .unwrap()
            .insert(request.uri.to_string());
        Ok(())
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.subscriptions
            .lock()
            .unwrap()
            .remove(request.uri.as_str());
        Ok(())
    }
}

/// Runs the demo server until its client goes away.
pub fn run(args: DemoArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match args.http {
            None => {
                let service = Demo::new().serve(rmcp::transport::stdio()).await?;
                service.waiting().await?;
                anyhow::Ok(())
            }
            Some(addr) => serve_http(&addr).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_http(addr: &str) -> anyhow::Result<()> {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    };
    let service = StreamableHttpService::new(
        || Ok(Demo::new()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "demo-server: listening on http://{}/mcp",
        listener.local_addr()?
    );
    // Answers are several small SSE writes: without TCP_NODELAY each waits ~40 ms for the
    // client's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
