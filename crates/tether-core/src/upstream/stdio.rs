//! A stdio upstream: one child process per session, JSON-RPC as newline-delimited JSON.
//!
//! One task owns stdout (parsing lines into [`Inbound`] messages), one owns stdin (written
//! from a channel so senders never hold a lock across a write), one forwards stderr to the
//! log. When stdout ends the reader reaps the child, kills what is left of its process
//! group, and reports the exit as [`Inbound::Closed`].

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{Inbound, UpstreamError, shim};

/// What to start.
#[derive(Clone, Copy)]
pub struct SpawnSpec<'a> {
    /// Program and arguments.
    pub argv: &'a [String],
    /// Extra environment.
    pub env: &'a BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<&'a Path>,
    /// The `tether` executable to supervise the child through, if available.
    pub shim: Option<&'a Path>,
}

/// A running stdio child.
pub struct StdioLink {
    pid: u32,
    stdin: mpsc::Sender<Vec<u8>>,
    stop: CancellationToken,
    exited: Arc<AtomicBool>,
}

/// How long a child gets to exit by itself after its stdin closes before its group is killed.
const EXIT_GRACE: Duration = Duration::from_millis(300);

impl StdioLink {
    /// Starts the child and its I/O tasks.
    pub fn spawn(
        spec: SpawnSpec<'_>,
        session_id: &str,
        max_line: usize,
        inbound: mpsc::Sender<Inbound>,
        tracker: &TaskTracker,
    ) -> Result<StdioLink, UpstreamError> {
        let mut cmd = match spec.shim {
            Some(shim_exe) => {
                let mut c = Command::new(shim_exe);
                c.arg("__shim").arg("--").args(spec.argv);
                c.env(shim::PARENT_ENV, std::process::id().to_string());
                c
            }
            None => {
                let mut c = Command::new(&spec.argv[0]);
                c.args(&spec.argv[1..]);
                c
            }
        };
        cmd.envs(spec.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = spec.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| UpstreamError::Spawn(format!("{:?}: {e}", spec.argv[0])))?;
        let pid = child
            .id()
            .ok_or_else(|| UpstreamError::Spawn("child exited at once".into()))?;
        let (stdin_tx, mut stdin_rx) = mpsc::channel::<Vec<u8>>(64);
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let stop = CancellationToken::new();
        let exited = Arc::new(AtomicBool::new(false));
        let span = tracing::info_span!("upstream_child", session.id = %session_id, pid);

        let writer_stop = stop.clone();
        tracker.spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = writer_stop.cancelled() => break,
                        msg = stdin_rx.recv() => {
                            let Some(mut line) = msg else { break };
                            line.push(b'\n');
                            if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                                break;
                            }
                        }
                    }
                }
                // Dropping stdin closes the pipe: the polite way to ask a stdio server to exit.
            }
            .instrument(span.clone()),
        );

        tracker.spawn(
            async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(target: "tether::upstream::stderr", "{line}");
                }
            }
            .instrument(span.clone()),
        );

        let reader_exited = exited.clone();
        tracker.spawn(
            async move {
                let mut frames = FramedRead::new(stdout, LinesCodec::new_with_max_length(max_line));
                let mut garbage = 0u64;
                while let Some(frame) = frames.next().await {
                    match frame {
                        Ok(line) => {
                            if line.trim().is_empty() {
                                continue;
                            }
                            match serde_json::from_str::<Value>(&line) {
                                Ok(value) if value.is_object() => {
                                    if inbound.send(Inbound::Message { value, origin: None }).await.is_err() {
                                        break;
                                    }
                                }
                                _ => {
                                    garbage += 1;
                                    // Log the first few, then every thousandth, so a chatty
                                    // broken server cannot flood the log.
                                    if garbage <= 3 || garbage.is_multiple_of(1000) {
                                        tracing::warn!(count = garbage, "upstream wrote a line that is not a JSON-RPC message; ignored");
                                    }
                                }
                            }
                        }
                        Err(LinesCodecError::MaxLineLengthExceeded) => {
                            tracing::warn!(limit = max_line, "upstream message over the size limit; dropped");
                        }
                        Err(LinesCodecError::Io(e)) => {
                            tracing::debug!(error = %e, "upstream stdout read failed");
                            break;
                        }
                    }
                }
                let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                    Ok(Ok(status)) => status.to_string(),
                    Ok(Err(e)) => format!("wait failed: {e}"),
                    Err(_) => {
                        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        let _ = child.wait().await;
                        "stdout closed; killed".to_owned()
                    }
                };
                reader_exited.store(true, Ordering::SeqCst);
                // Whatever the server left behind in its group goes with it.
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = inbound.send(Inbound::Closed(format!("upstream process exited ({status})"))).await;
            }
            .instrument(span),
        );

        Ok(StdioLink {
            pid,
            stdin: stdin_tx,
            stop,
            exited,
        })
    }

    /// The child's pid (the shim's, when supervised).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Writes one message. A full pipe applies backpressure here; a dead child makes this a
    /// no-op, and the reader reports the exit.
    pub async fn send(&self, value: Value) {
        let bytes = serde_json::to_vec(&value).expect("a Value always serializes");
        let _ = self.stdin.send(bytes).await;
    }

    /// Closes stdin, then kills the process group if the child has not exited shortly after.
    pub fn shutdown(&self) {
        if self.stop.is_cancelled() {
            return;
        }
        self.stop.cancel();
        let (pid, exited) = (self.pid, self.exited.clone());
        tokio::spawn(async move {
            tokio::time::sleep(EXIT_GRACE).await;
            if !exited.load(Ordering::SeqCst) {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        });
    }

    /// Kills the process group at once (gateway shutdown).
    pub fn kill(&self) {
        self.stop.cancel();
        if !self.exited.load(Ordering::SeqCst) {
            let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}
