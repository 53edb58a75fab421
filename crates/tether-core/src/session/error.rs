//! What the session layer adds to the gateway's error ([`crate::error`]): an upstream that
//! could not start, as the failure its callers get.
//! Must not: know HTTP, or log.

use std::time::Duration;

use crate::error::{Failure, Kind, Retry};
use crate::upstream::UpstreamError;

impl Failure {
    /// The upstream `name` could not be started or was not allowed to start.
    pub fn unavailable(name: &str, err: &UpstreamError) -> Failure {
        let message = format!("upstream {name:?} is unavailable: {err}");
        match err {
            UpstreamError::CircuitOpen {
                failures, retry_in, ..
            } => Failure::new(Kind::CircuitOpen, message, Retry::Safe(Some(*retry_in)))
                .with("failures", *failures),
            UpstreamError::Capacity { max, .. } => Failure::new(
                Kind::Limit,
                message,
                Retry::Safe(Some(Duration::from_secs(5))),
            )
            .with("limit", "max-upstreams")
            .with("max", *max),
            UpstreamError::Resources(_) => Failure::new(
                Kind::Limit,
                message,
                Retry::Safe(Some(Duration::from_secs(1))),
            )
            .with("limit", "gateway-resources"),
            _ => Failure::new(Kind::UpstreamUnavailable, message, Retry::Safe(None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::code;
    use serde_json::{Value, json};

    #[test]
    fn the_response_says_kind_origin_and_retry_advice_once() {
        let f = Failure::unavailable(
            "demo",
            &UpstreamError::CircuitOpen {
                failures: 5,
                retry_in: Duration::from_millis(2500),
                last: "exited".into(),
            },
        );
        let r = f.response(json!(7));
        assert_eq!(r["id"], json!(7));
        assert_eq!(r["error"]["code"], json!(code::UPSTREAM_UNAVAILABLE));
        assert_eq!(
            r["error"]["data"],
            json!({"kind": "circuit_open", "origin": "upstream", "retry": "safe",
                   "retry_in_ms": 2500, "failures": 5})
        );
        let lost = Failure::upstream_lost("gone", true).response(json!("a"));
        assert_eq!(lost["error"]["data"]["retry"], "unknown", "it may have run");
        let unsent = Failure::upstream_lost("gone", false).response(json!("a"));
        assert_eq!(unsent["error"]["data"]["retry"], "safe", "it never left");
        assert_eq!(
            Failure::session_closed(Some("timeout")).response(Value::Null)["error"]["data"]["origin"],
            "gateway"
        );
    }
}
