//! Server-sent events as the front door writes them, in both eras: one encoder for an event
//! and one keepalive for a stream of them, and the response that carries them.
//!
//! Events are encoded here rather than with `axum::response::Sse` because the priming event
//! must carry an explicit empty `data:` line (spec §1.1.3 item 6), which axum omits. Every
//! payload is a compact JSON text, so it never contains a line break.
//!
//! Must not: know what the events mean.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use futures::{Stream, StreamExt};

/// The comment a legacy (Streamable HTTP, 2024-11-05) stream keeps its connection with.
pub const LEGACY_KEEPALIVE: &[u8] = b": keepalive\n\n";
/// The comment a 2026-07-28 stream keeps its connection with.
pub const MODERN_KEEPALIVE: &[u8] = b":\n\n";

/// One event: an optional `event:` name and `id:`, then its data (possibly empty, as the
/// priming event's is), after an optional `retry:` field.
pub fn event(name: Option<&str>, id: Option<&str>, retry: Option<Duration>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 64);
    if let Some(r) = retry {
        out.push_str(&format!("retry: {}\n", r.as_millis()));
    }
    if let Some(n) = name {
        out.push_str("event: ");
        out.push_str(n);
        out.push('\n');
    }
    if let Some(i) = id {
        out.push_str("id: ");
        out.push_str(i);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(data);
    out.push_str("\n\n");
    out.into()
}

/// An event of data alone (`data: ...`).
pub fn data(data: &str) -> Bytes {
    event(None, None, None, data)
}

/// `body`'s events with `comment` written whenever `every` passes without one, so proxies
/// and clients keep an idle stream open. The timer starts with the stream and restarts
/// after each event. Reading `body` is cancel-safe: a keepalive written while an event is
/// being made loses nothing.
pub fn with_keepalive(
    body: impl Stream<Item = Bytes> + Send + 'static,
    every: Duration,
    comment: &'static [u8],
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    async_stream::stream! {
        let mut body = std::pin::pin!(body);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                next = body.next() => match next {
                    Some(bytes) => {
                        yield Ok(bytes);
                        ticker.reset();
                    }
                    None => break,
                },
                _ = ticker.tick() => yield Ok(Bytes::from_static(comment)),
            }
        }
    }
}

/// An SSE response of `body`'s events (both eras; `X-Accel-Buffering: no` so a reverse
/// proxy does not hold them back).
pub fn response(body: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(body))
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_written_field_by_field() {
        assert_eq!(data("{}"), Bytes::from("data: {}\n\n"));
        assert_eq!(
            event(None, Some("s.0"), Some(Duration::from_millis(1500)), ""),
            Bytes::from("retry: 1500\nid: s.0\ndata: \n\n")
        );
        assert_eq!(
            event(Some("endpoint"), None, None, "/messages?x=1"),
            Bytes::from("event: endpoint\ndata: /messages?x=1\n\n")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keepalives_fill_silences_and_restart_after_each_event() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let body = tokio_stream_of(rx);
        let mut out = std::pin::pin!(with_keepalive(body, Duration::from_secs(10), b":\n\n"));
        let start = tokio::time::Instant::now();
        // Silence: a comment after 10 s, another after 20.
        assert_eq!(
            out.next().await.unwrap().unwrap(),
            Bytes::from_static(b":\n\n")
        );
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.send(data("1")).await.unwrap();
        assert_eq!(out.next().await.unwrap().unwrap(), data("1"));
        // The event restarted the timer: the next comment is 10 s after it.
        let at = tokio::time::Instant::now();
        assert_eq!(
            out.next().await.unwrap().unwrap(),
            Bytes::from_static(b":\n\n")
        );
        assert_eq!(at.elapsed(), Duration::from_secs(10));
        drop(tx);
        assert!(out.next().await.is_none(), "ends with its body");
    }

    fn tokio_stream_of(
        mut rx: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> impl Stream<Item = Bytes> + Send + 'static {
        async_stream::stream! {
            while let Some(b) = rx.recv().await {
                yield b;
            }
        }
    }
}
