//! Bounded logging: a peer that repeats a failure (an upstream writing stderr, a client
//! sending bad requests, a flood of connections) gets a bounded number of log lines per
//! second; what is over the rate is counted and the count logged with the next line let
//! through. Client-provided strings are cut before they reach a log line.
//!
//! Must not: drop a count: what is not logged is summarized.

use std::sync::atomic::{AtomicU64, Ordering};

/// Limits log lines per second for one source.
pub struct LogLimiter {
    limiter: governor::DefaultDirectRateLimiter,
    suppressed: AtomicU64,
    what: &'static str,
}

impl LogLimiter {
    /// `per_sec` lines per second, with a burst of the same size; `what` names the lines in
    /// the summary of those not logged.
    pub fn new(per_sec: u32, what: &'static str) -> LogLimiter {
        let rate = std::num::NonZeroU32::new(per_sec.max(1)).expect("at least one");
        LogLimiter {
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
            suppressed: AtomicU64::new(0),
            what,
        }
    }

    /// Whether the next line may be logged.
    pub fn admit(&self) -> bool {
        if self.limiter.check().is_ok() {
            let n = self.suppressed.swap(0, Ordering::Relaxed);
            if n > 0 {
                tracing::warn!(suppressed = n, "{n} {} were not logged", self.what);
            }
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Longest client string the gateway keeps as it is in a record, a ledger row or a log
/// field (a client name, a tool name): longer ones are cut with their length noted.
pub const MAX_KEPT: usize = 256;

/// `text` (a string a client sent) cut to at most `max` bytes (on a character boundary),
/// with an ellipsis and the full length when cut.
pub fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_on_a_char_boundary() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("ééé", 3), "é… (6 bytes)");
    }

    #[test]
    fn lines_over_the_rate_are_counted() {
        let l = LogLimiter::new(5, "test lines");
        let admitted = (0..50).filter(|_| l.admit()).count();
        assert_eq!(admitted, 5);
        assert_eq!(l.suppressed.load(Ordering::Relaxed), 45);
    }
}
