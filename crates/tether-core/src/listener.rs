//! Serving HTTP with bounds on every connection: how many are open (per listener and per
//! client address), how long a client may take to send its request headers (and how long
//! an idle keep-alive connection is kept), and how long it may refuse our writes. Each
//! listener has its own budget, so the admin listener answers while the MCP listener is
//! saturated.
//!
//! Written on hyper directly rather than `axum::serve` because axum exposes none of these
//! bounds: it sets no header-read timer (2,000 connections that never finished their
//! headers stayed open indefinitely) and no connection cap.
//!
//! Must not: know what the routes do; it serves any `Router`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::metrics::Metrics;

/// The bounds of one listener.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// `mcp` or `admin` (metric label and logs).
    pub name: &'static str,
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one address at most.
    pub max_per_addr: usize,
    /// Time to receive a request's headers, and the longest a keep-alive connection idles.
    pub header_timeout: Duration,
    /// Time a connection may take none of our bytes before it is cut.
    pub write_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` is cancelled, then lets open connections finish
/// their requests until `kill` is cancelled (then they are dropped). Returns when every
/// connection is gone.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_addr: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let open = Arc::new(Open::default());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut tasks = tokio::task::JoinSet::new();
    let accept_errors = crate::log_limit::LogLimiter::new(1, "accept errors");
    let gauge = metrics.connections(limits.name);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: the connection stays in the backlog; pausing
                    // keeps this loop from spinning while descriptors are short.
                    metrics.connection_refused(limits.name, "accept_error");
                    if accept_errors.admit() {
                        tracing::warn!(listener = limits.name, error = %e, "cannot accept connections");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let Some(addr_slot) = AddrSlot::take(&per_addr, addr.ip(), limits.max_per_addr) else {
            refuse(&tcp, "max-connections-per-addr", limits.max_per_addr);
            metrics.connection_refused(limits.name, "max-connections-per-addr");
            continue;
        };
        // Full: the oldest connection that never finished its headers gives way, and this
        // one waits (briefly) for its place; with none such, it is refused. So connections
        // held open without a request (from any number of addresses, reopened as they are
        // cut) cannot keep out clients that send requests, and a connection that has
        // carried a request is never cut for a newcomer (issue 26).
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) if open.waiting.load(Ordering::Relaxed) < MAX_WAITING && open.evict_one() => {
                // Counted here, not in its task: a burst of newcomers accepted before
                // their tasks run must not pass the bound.
                open.waiting.fetch_add(1, Ordering::Relaxed);
                metrics.connection_refused(limits.name, "evicted_for_newcomer");
                None
            }
            Err(_) => {
                refuse(&tcp, "max-connections", limits.max_connections);
                metrics.connection_refused(limits.name, "max-connections");
                continue;
            }
        };
        // SSE answers are several small writes (priming event, then events); with Nagle's
        // algorithm on, each one after the first waits for the client's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let state = open.add();
        let io = TokioIo::new(WriteDeadline::new(tcp, limits.write_timeout));
        let served = state.clone();
        let svc = app.clone().map_request(
            move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                // Its headers are complete: from now on it never gives way to a newcomer.
                served.served.store(true, Ordering::Relaxed);
                req.extensions_mut().insert(ConnectInfo(addr));
                req
            },
        );
        let conn = graceful.watch(builder.serve_connection(io, TowerToHyperService::new(svc)));
        let (gauge, metrics, kill, name) =
            (gauge.clone(), metrics.clone(), kill.clone(), limits.name);
        let (slots, open) = (slots.clone(), open.clone());
        gauge.inc();
        tasks.spawn(async move {
            let slot = match slot {
                Some(s) => s,
                None => {
                    // The place a connection evicted for it gives back.
                    let got =
                        tokio::time::timeout(EVICT_WAIT, slots.acquire_owned()).await;
                    open.waiting.fetch_sub(1, Ordering::Relaxed);
                    match got {
                        Ok(Ok(s)) => s,
                        _ => {
                            open.remove(&state);
                            metrics.connection_refused(name, "max-connections");
                            gauge.dec();
                            drop(conn);
                            return;
                        }
                    }
                }
            };
            let _held = (slot, addr_slot);
            let evicted = state.evict.clone();
            tokio::select! {
                () = evicted.cancelled() => {
                    tracing::debug!(listener = name, client.addr = %addr, "connection without a request cut for a newcomer (listener full)");
                }
                r = conn => if let Err(e) = r {
                    let reason = if e.is_timeout() {
                        "header_timeout"
                    } else if caused_by_timeout(&e) {
                        "write_timeout"
                    } else {
                        ""
                    };
                    if !reason.is_empty() {
                        metrics.connection_refused(name, reason);
                    }
                    tracing::debug!(listener = name, client.addr = %addr, error = %e, reason, "connection ended");
                },
                _ = kill.cancelled() => {}
            }
            open.remove(&state);
            gauge.dec();
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = kill.cancelled() => {}
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// How long a newcomer waits for the place an evicted connection gives back.
const EVICT_WAIT: Duration = Duration::from_secs(1);
/// Newcomers waiting for such a place at once; past it a full listener refuses at once.
const MAX_WAITING: usize = 64;

/// One open connection as eviction sees it.
#[derive(Debug, Default)]
struct Conn {
    id: u64,
    /// It has finished the headers of a request (it is a client, not a held socket).
    served: std::sync::atomic::AtomicBool,
    /// Cancelled to cut it for a newcomer.
    evict: CancellationToken,
}

/// The listener's open connections in accept order, for eviction.
#[derive(Debug, Default)]
struct Open {
    next: std::sync::atomic::AtomicU64,
    conns: Mutex<std::collections::BTreeMap<u64, Arc<Conn>>>,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Open {
    fn add(&self) -> Arc<Conn> {
        let c = Arc::new(Conn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            ..Conn::default()
        });
        self.lock().insert(c.id, c.clone());
        c
    }

    fn remove(&self, c: &Conn) {
        self.lock().remove(&c.id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts the oldest connection that never finished its headers; false if there is
    /// none (every open connection carries or carried a request).
    fn evict_one(&self) -> bool {
        let victim = self
            .lock()
            .values()
            .find(|c| !c.served.load(Ordering::Relaxed) && !c.evict.is_cancelled())
            .cloned();
        match victim {
            Some(c) => {
                c.evict.cancel();
                true
            }
            None => false,
        }
    }
}

fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// Answers a connection over a limit with a 503 it can read, without reading its request
/// or spending a task on it: the few bytes fit in an empty socket buffer, and a client that
/// cannot take them simply sees the connection close.
fn refuse(tcp: &TcpStream, limit: &str, max: usize) {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":null,"error":{{"code":{},"message":"too many open connections (--{limit} {max}); try again later","data":{{"kind":"limit","limit":"{limit}","max":{max}}}}}}}"#,
        crate::protocol::code::LIMIT_REACHED
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.try_write(response.as_bytes());
}

/// One connection's place in its address's count.
struct AddrSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddrSlot {
    fn take(map: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<AddrSlot> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddrSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for AddrSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A TCP stream whose writes fail with `TimedOut` once a write has waited `limit` without
/// the peer taking a byte: a client that stops reading cannot hold its connection, its
/// buffers and its task forever. Hand-written because neither hyper nor tower-http bounds
/// the time a response write may wait.
struct WriteDeadline {
    io: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl WriteDeadline {
    fn new(io: TcpStream, limit: Duration) -> WriteDeadline {
        WriteDeadline {
            io,
            limit,
            stalled: None,
        }
    }

    /// Called when the socket would block: has it been blocked for too long?
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        sleep.as_mut().poll(cx).is_ready()
    }

    fn timed_out() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took none of our bytes for --write-timeout",
        )
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(WriteDeadline::timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(WriteDeadline::timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The address a request came from, when it came through [`serve`].
pub fn client_addr(parts: &axum::http::Extensions) -> Option<SocketAddr> {
    parts.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}
