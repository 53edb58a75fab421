//! `tether __floor --listen ADDR -- CMD...`: the cost floor of any HTTP gateway in front of
//! a stdio MCP server, the row every other figure of `scripts/bench-peers.sh` is read
//! against. Streamable HTTP in (`POST /mcp`, JSON answers, sessions by `Mcp-Session-Id`),
//! one child per session, request ids rewritten and matched on the way back; nothing
//! durable, no ledger, no metrics, no supervision. Built on the gateway's own stack (tokio,
//! hyper through axum, the same JSON handling), so the difference to Tether is what Tether
//! does beyond relaying.
//!
//! Written by hand because it is a measuring stick, not a product: no crate is "a relay
//! that does nothing else". Hidden from `--help`.
//! Must not: grow features (auth, recovery, SSE): each would raise the floor it measures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec};

/// Arguments of `tether __floor`.
#[derive(Debug, clap::Args)]
pub struct FloorArgs {
    /// Address to serve `/mcp` on.
    #[arg(long)]
    listen: SocketAddr,
    /// The stdio server to start per session.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Sessions held at most: the floor is bounded like everything else, loosely.
const MAX_SESSIONS: usize = 1024;
/// Largest line read from a child.
const MAX_LINE: usize = 16 << 20;
/// How long a request waits for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// One session: a child, its stdin writer, and the calls waiting for answers.
struct Relay {
    stdin: mpsc::Sender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    next_id: AtomicU64,
    /// Killed when the relay is dropped (DELETE, or the floor exits).
    _child: tokio::process::Child,
}

struct Floor {
    argv: Vec<String>,
    sessions: Mutex<HashMap<String, Arc<Relay>>>,
}

fn status(code: StatusCode, message: &str) -> Response {
    (code, message.to_owned()).into_response()
}

impl Relay {
    fn spawn(argv: &[String]) -> std::io::Result<Arc<Relay>> {
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
        // The writer and reader end with the child's pipes.
        tokio::spawn(async move {
            while let Some(mut line) = rx.recv().await {
                line.push(b'\n');
                if stdin.write_all(&line).await.is_err() {
                    return;
                }
            }
        });
        let relay = Arc::new(Relay {
            stdin: tx,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            _child: child,
        });
        let weak = Arc::downgrade(&relay);
        tokio::spawn(async move {
            let mut lines = FramedRead::new(stdout, LinesCodec::new_with_max_length(MAX_LINE));
            while let Some(Ok(line)) = lines.next().await {
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let Some(id) = value.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let Some(relay) = weak.upgrade() else { return };
                let waiter = relay
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if let Some(w) = waiter {
                    let _ = w.send(value);
                }
            }
        });
        Ok(relay)
    }

    /// Sends `request` under a fresh id and returns the answer with the client's id.
    async fn call(&self, mut request: Value) -> Option<Value> {
        let client_id = request.get("id").cloned().unwrap_or(Value::Null);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        request["id"] = Value::from(id);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let line = serde_json::to_vec(&request).ok()?;
        self.stdin.send(line).await.ok()?;
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, rx).await;
        let mut answer = match answer {
            Ok(Ok(a)) => a,
            _ => {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return None;
            }
        };
        answer["id"] = client_id;
        Some(answer)
    }
}

fn json(value: &Value, session: Option<&str>) -> Response {
    let mut resp = (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(value).unwrap_or_default(),
    )
        .into_response();
    if let Some(s) = session.and_then(|s| HeaderValue::from_str(s).ok()) {
        resp.headers_mut().insert("mcp-session-id", s);
    }
    resp
}

async fn post(State(floor): State<Arc<Floor>>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return status(StatusCode::BAD_REQUEST, "not JSON");
    };
    let sid = headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if message.get("method").and_then(Value::as_str) == Some("initialize") {
        if floor
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            >= MAX_SESSIONS
        {
            return status(StatusCode::SERVICE_UNAVAILABLE, "too many sessions");
        }
        let relay = match Relay::spawn(&floor.argv) {
            Ok(r) => r,
            Err(e) => return status(StatusCode::BAD_GATEWAY, &e.to_string()),
        };
        let Some(answer) = relay.call(message).await else {
            return status(StatusCode::BAD_GATEWAY, "no answer to initialize");
        };
        let id = tether_core::ids::new_session_id();
        floor
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), relay);
        return json(&answer, Some(&id));
    }
    let relay = sid.and_then(|s| {
        floor
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&s)
            .cloned()
    });
    let Some(relay) = relay else {
        return status(StatusCode::NOT_FOUND, "session not found");
    };
    let is_request = message.get("method").is_some() && message.get("id").is_some();
    if !is_request {
        // Notifications and answers go through as they are.
        if let Ok(line) = serde_json::to_vec(&message) {
            let _ = relay.stdin.send(line).await;
        }
        return StatusCode::ACCEPTED.into_response();
    }
    match relay.call(message).await {
        Some(answer) => json(&answer, None),
        None => status(StatusCode::BAD_GATEWAY, "no answer"),
    }
}

async fn delete(State(floor): State<Arc<Floor>>, headers: HeaderMap) -> StatusCode {
    let sid = headers.get("mcp-session-id").and_then(|v| v.to_str().ok());
    let removed = sid.and_then(|s| {
        floor
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(s)
    });
    if removed.is_some() {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

/// Runs the floor relay until SIGINT or SIGTERM.
pub fn run(args: &FloorArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether __floor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let floor = Arc::new(Floor {
        argv: args.command.clone(),
        sessions: Mutex::default(),
    });
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        // Port 0 works: the address is announced (tests and scripts read it).
        println!(
            "tether __floor: listening on http://{}/mcp",
            listener.local_addr()?
        );
        let app = Router::new()
            .route("/mcp", axum::routing::post(post).delete(delete))
            .with_state(floor.clone());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            })
            .await?;
        anyhow::Ok(())
    });
    // Children are killed as their relays drop.
    floor
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether __floor: {e:#}");
            ExitCode::FAILURE
        }
    }
}
