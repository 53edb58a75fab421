//! Reading a server's `text/event-stream` (WHATWG HTML §9.2.6), bounded: no line and no
//! event may grow past `max` bytes, and the bytes are scanned once.
//!
//! Written by hand because the parser used before (`eventsource-stream`) re-parses the
//! unfinished line from its start on every chunk and has no bound: one 100 MB event cost a
//! full core until the upstream timeout (5 minutes) instead of the `-32017` a 100 MB JSON
//! body gets in 0.3 s (issue 26). Here an event past the bound is reported the moment it
//! crosses it ([`SseItem::TooLarge`]) and the rest of it is skipped unread.
//!
//! Must not: buffer more than `max` bytes of one line or one event, or scan a byte twice.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use tokio_util::codec::Decoder;

/// One dispatched event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `event` field (empty: a `message`).
    pub event: String,
    /// Its `data` lines joined by `\n`.
    pub data: String,
    /// Its `id` field (empty when it had none).
    pub id: String,
    /// Its `retry` field.
    pub retry: Option<Duration>,
}

/// What the stream holds next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    /// A complete event.
    Event(SseEvent),
    /// An event (or one line of it) grew past the bound: `len` bytes so far. The rest of
    /// that event is skipped.
    TooLarge {
        /// Bytes of the event when it crossed the bound.
        len: usize,
    },
}

/// The decoder; see the module doc.
#[derive(Debug)]
pub struct SseDecoder {
    max: usize,
    /// Bytes at the start of the buffer already searched for a line end.
    scanned: usize,
    /// The event being built and its size so far.
    event: SseEvent,
    has_data: bool,
    size: usize,
    /// Skipping the rest of an oversized event until its blank line.
    skipping: bool,
    /// At the stream's start (a byte order mark is dropped there).
    start: bool,
}

impl SseDecoder {
    /// Lines and events of at most `max` bytes.
    pub fn new(max: usize) -> SseDecoder {
        SseDecoder {
            max,
            scanned: 0,
            event: SseEvent::default(),
            has_data: false,
            size: 0,
            skipping: false,
            start: true,
        }
    }

    /// The next complete line (without its end), or `None` when the buffer holds none yet.
    /// `eof`: the stream ended, so a final `\r` ends its line.
    fn next_line(&mut self, buf: &mut BytesMut, eof: bool) -> Option<BytesMut> {
        let from = self.scanned;
        let rel = buf[from..].iter().position(|b| *b == b'\n' || *b == b'\r');
        let Some(rel) = rel else {
            self.scanned = buf.len();
            return None;
        };
        let i = from + rel;
        let end_len = match buf[i] {
            b'\r' if i + 1 < buf.len() && buf[i + 1] == b'\n' => 2,
            b'\r' if i + 1 < buf.len() => 1,
            // A `\r` last in the buffer may be the first half of `\r\n`.
            b'\r' if !eof => {
                self.scanned = i;
                return None;
            }
            _ => 1,
        };
        let line = buf.split_to(i);
        buf.advance(end_len);
        self.scanned = 0;
        Some(line)
    }

    /// Applies one line; an event when it was the blank line that ends one.
    fn apply(&mut self, line: &[u8]) -> Option<SseItem> {
        if line.is_empty() {
            let skipped = std::mem::take(&mut self.skipping);
            let event = std::mem::take(&mut self.event);
            let had = std::mem::take(&mut self.has_data);
            self.size = 0;
            if skipped || !had && event.id.is_empty() && event.retry.is_none() {
                // An event without data is not dispatched (WHATWG); its id and retry still
                // count, so hand those on as an event with empty data.
                return (!skipped && (!event.id.is_empty() || event.retry.is_some()))
                    .then_some(SseItem::Event(event));
            }
            return Some(SseItem::Event(event));
        }
        if self.skipping {
            return None;
        }
        self.size += line.len() + 1;
        if self.size > self.max {
            self.skipping = true;
            return Some(SseItem::TooLarge { len: self.size });
        }
        if line[0] == b':' {
            return None;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"data" => {
                if self.has_data {
                    self.event.data.push('\n');
                }
                self.event.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => self.event.event = value.into_owned(),
            b"id" if !value.contains('\0') => self.event.id = value.into_owned(),
            b"retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.event.retry = value.parse().ok().map(Duration::from_millis);
            }
            _ => {}
        }
        None
    }

    fn step(&mut self, buf: &mut BytesMut, eof: bool) -> Option<SseItem> {
        if self.start {
            if buf.len() < 3 && !eof && b"\xEF\xBB\xBF".starts_with(buf) {
                return None;
            }
            if buf.starts_with(b"\xEF\xBB\xBF") {
                buf.advance(3);
            }
            self.start = false;
        }
        loop {
            match self.next_line(buf, eof) {
                Some(line) => {
                    if let Some(item) = self.apply(&line) {
                        return Some(item);
                    }
                }
                None => {
                    // No line end yet: an unfinished line past the bound ends the event
                    // here; its bytes are dropped as they come.
                    let pending = self.size + buf.len();
                    if pending > self.max {
                        buf.clear();
                        self.scanned = 0;
                        if !self.skipping {
                            self.skipping = true;
                            return Some(SseItem::TooLarge { len: pending });
                        }
                    } else if self.skipping {
                        buf.clear();
                        self.scanned = 0;
                    }
                    return None;
                }
            }
        }
    }
}

impl Decoder for SseDecoder {
    type Item = SseItem;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<SseItem>, std::io::Error> {
        Ok(self.step(buf, false))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<SseItem>, std::io::Error> {
        // An event not ended by a blank line is never dispatched (WHATWG): `apply` only
        // hands one on at its blank line.
        Ok(self.step(buf, true))
    }
}

/// The items of an HTTP response's SSE body, each event bounded by `max` bytes. A
/// transport error ends the stream with it.
pub fn events(
    resp: reqwest::Response,
    max: usize,
) -> futures::stream::BoxStream<'static, Result<SseItem, reqwest::Error>> {
    decode(resp.bytes_stream(), max)
}

/// [`events`] over any byte stream (tests, the fuzz target).
pub fn decode<E: Send + 'static>(
    body: impl futures::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
    max: usize,
) -> futures::stream::BoxStream<'static, Result<SseItem, E>> {
    async_stream::stream! {
        let mut decoder = SseDecoder::new(max);
        let mut buf = BytesMut::new();
        let mut body = std::pin::pin!(body);
        loop {
            while let Some(item) = decoder.step(&mut buf, false) {
                yield Ok(item);
            }
            match body.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    yield Err(e);
                    return;
                }
                None => {
                    while let Some(item) = decoder.step(&mut buf, true) {
                        yield Ok(item);
                    }
                    return;
                }
            }
        }
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]], max: usize) -> Vec<SseItem> {
        let body = futures::stream::iter(
            chunks
                .iter()
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        futures::executor::block_on(decode(body, max).collect::<Vec<_>>())
            .into_iter()
            .map(Result::unwrap)
            .collect()
    }

    fn event(data: &str, id: &str) -> SseItem {
        SseItem::Event(SseEvent {
            data: data.into(),
            id: id.into(),
            ..SseEvent::default()
        })
    }

    #[test]
    fn events_are_read_whatever_the_chunking_and_line_ends() {
        let text = b"\xEF\xBB\xBFid: s.1\nretry: 500\ndata: {\"a\":1}\n\n: keepalive\n\ndata:x\r\ndata: y\r\n\r\nid: s.2\rdata: z\r\r";
        let whole = all(&[text], 1 << 20);
        assert_eq!(
            whole,
            [
                SseItem::Event(SseEvent {
                    data: "{\"a\":1}".into(),
                    id: "s.1".into(),
                    retry: Some(Duration::from_millis(500)),
                    ..SseEvent::default()
                }),
                event("x\ny", ""),
                event("z", "s.2"),
            ]
        );
        for size in 1..text.len() {
            let chunks: Vec<&[u8]> = text.chunks(size).collect();
            assert_eq!(all(&chunks, 1 << 20), whole, "chunks of {size}");
        }
        // The priming event: an id and empty data.
        assert_eq!(all(&[b"id: p.0\ndata:\n\n"], 100), [event("", "p.0")]);
        // Not ended by a blank line: not dispatched.
        assert_eq!(all(&[b"data: cut"], 100), []);
    }

    /// Issue 26: an event past the bound is reported as soon as it crosses it, in one
    /// line or many, the rest of it skipped, and the stream goes on after it.
    #[test]
    fn an_oversized_event_is_reported_at_once_and_skipped() {
        let big = vec![b'x'; 10_000];
        let mut text = b"data: ".to_vec();
        text.extend_from_slice(&big);
        text.extend_from_slice(b"\n\ndata: after\n\n");
        let items = all(&text.chunks(512).collect::<Vec<_>>(), 1000);
        assert!(
            matches!(items[0], SseItem::TooLarge { len } if (1000..2000).contains(&len)),
            "{items:?}"
        );
        assert_eq!(items[1..], [event("after", "")]);
        // Many short lines making one large event.
        let many = "data: 0123456789\n".repeat(200) + "\ndata: next\n\n";
        let items = all(&[many.as_bytes()], 1000);
        assert!(matches!(items[0], SseItem::TooLarge { .. }), "{items:?}");
        assert_eq!(items[1..], [event("next", "")]);
        // A line that never ends is dropped as it comes: nothing is held past the bound.
        let mut d = SseDecoder::new(1000);
        let mut buf = BytesMut::new();
        let mut reported = 0;
        for _ in 0..100 {
            buf.extend_from_slice(&[b'y'; 4096]);
            if let Some(SseItem::TooLarge { .. }) = d.step(&mut buf, false) {
                reported += 1;
            }
            assert!(buf.len() <= 4096 + 1000, "{}", buf.len());
        }
        assert_eq!(reported, 1);
    }
}
