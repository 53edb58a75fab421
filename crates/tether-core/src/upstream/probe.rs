//! What is asked of an upstream before a session uses it: which era an HTTP upstream
//! speaks (asked once with `server/discover` under `auto`, or as configured, and kept for
//! the life of the process), the `initialize` handshake on a fresh link, and whether it
//! could be started at all (readiness).
//!
//! Must not: keep an unclear era answer for longer than one start.

use super::*;

pub(super) const ERA_UNKNOWN: u8 = 0;
pub(super) const ERA_LEGACY: u8 = 1;
pub(super) const ERA_MODERN: u8 = 2;

impl Connector {
    /// Whether links to this HTTP upstream speak 2026-07-28. With `auto` the server is
    /// asked once (`server/discover`, as the SDK clients probe) and its clear answer kept
    /// for the life of the process; an unclear one (unreachable, a 5xx, an authentication
    /// demand) means legacy for this start and another probe next time.
    pub(super) async fn speaks_modern(
        &self,
        url: &str,
        protocol: UpstreamProtocol,
        headers: &reqwest::header::HeaderMap,
        init_params: &Value,
    ) -> bool {
        match protocol {
            UpstreamProtocol::Legacy => return false,
            UpstreamProtocol::Modern => return true,
            UpstreamProtocol::Auto => {}
        }
        match self.era.load(Ordering::Relaxed) {
            ERA_LEGACY => return false,
            ERA_MODERN => return true,
            _ => {}
        }
        let found = modern::probe(
            &self.http,
            url,
            headers,
            init_params,
            Duration::from_secs(10),
        )
        .await;
        if let Some(m) = found {
            let era = if m { ERA_MODERN } else { ERA_LEGACY };
            if self.era.swap(era, Ordering::Relaxed) != era {
                tracing::info!(
                    upstream.name = %self.circuit.name(),
                    url = %url,
                    protocol = if m { protocol::MODERN_VERSION } else { "legacy" },
                    "upstream protocol detected (--upstream-protocol auto)"
                );
            }
        }
        found == Some(true)
    }
}

/// Runs `initialize` on a fresh link and returns its result plus any messages the upstream
/// sent before answering (log notifications, pings), which the caller routes afterwards.
pub async fn handshake(
    link: &Link,
    rx: &mut mpsc::Receiver<Inbound>,
    id: u64,
    params: &Value,
    timeout: Duration,
) -> Result<(Value, Vec<Inbound>), UpstreamError> {
    link.send(Message::request(
        Value::from(id),
        "initialize",
        Some(params.clone()),
    ))
    .await;
    let mut early = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, rx.recv()).await;
        match next {
            Err(_) => return Err(UpstreamError::Timeout(timeout)),
            Ok(None) => {
                return Err(UpstreamError::Closed(
                    "upstream link ended during initialize".into(),
                ));
            }
            Ok(Some(Inbound::Closed(cause))) => return Err(UpstreamError::Closed(cause)),
            Ok(Some(Inbound::Oversized { len, limit, .. })) => {
                return Err(UpstreamError::Closed(format!(
                    "upstream answered initialize with {len} bytes, over the {limit} byte limit (--max-upstream-message)"
                )));
            }
            Ok(Some(Inbound::NotStreamable(status))) => {
                return Err(UpstreamError::Closed(format!(
                    "upstream is not a Streamable HTTP server (HTTP {status})"
                )));
            }
            Ok(Some(Inbound::Message { message, origin })) => {
                if message.id().and_then(Value::as_u64) == Some(id)
                    && message.kind() == protocol::Kind::Response
                {
                    let Value::Object(mut answer) = message.to_value() else {
                        unreachable!("a message is an object")
                    };
                    if let Some(err) = answer.remove("error") {
                        return Err(UpstreamError::Rejected(err));
                    }
                    return Ok((answer.remove("result").unwrap_or(Value::Null), early));
                }
                early.push(Inbound::Message { message, origin });
            }
        }
    }
}

/// Whether the upstream could be started now: the stdio program exists and is
/// executable, or the HTTP upstream accepts a TCP connection. Readiness asks it on every
/// probe; start-up asks it once, to say at once what the first session would meet.
pub async fn startable(spec: &UpstreamSpec) -> Result<(), String> {
    match spec {
        UpstreamSpec::Stdio { argv, .. } => {
            let program = std::path::Path::new(&argv[0]);
            let candidates: Vec<std::path::PathBuf> = if program.components().count() > 1 {
                vec![program.to_path_buf()]
            } else {
                std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                    .map(|d| d.join(program))
                    .collect()
            };
            use std::os::unix::fs::PermissionsExt;
            let found = candidates.iter().any(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            });
            if found {
                Ok(())
            } else {
                Err(format!(
                    "{:?} is not an executable file or on PATH",
                    argv[0]
                ))
            }
        }
        UpstreamSpec::Http { url, .. } => {
            let u = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
            let host = u.host_str().unwrap_or("localhost").to_owned();
            let port = u.port_or_known_default().unwrap_or(80);
            match tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot connect to {host}:{port}: {e}")),
                Err(_) => Err(format!("no answer from {host}:{port}")),
            }
        }
    }
}
