//! A stdio upstream: one child process per session, JSON-RPC as newline-delimited JSON.
//!
//! One task owns stdout (parsing lines into [`Inbound`] messages), one owns stdin (written
//! from a channel so senders never hold a lock across a write), one forwards stderr to the
//! log. When stdout ends the reader reaps the child, kills what is left of its process
//! group, and reports the exit as [`Inbound::Closed`].
//!
//! Nothing the child writes is trusted to be small: a stdout line over the message limit
//! is skipped to its newline and reported as [`Inbound::Oversized`] (the child keeps
//! running); stderr is read in bounded chunks, long lines are cut in the log with their
//! length, and the log lines per second of one upstream are limited.
//!
//! Must not: block on a child (every read and write is bounded and owned by a tracked task), pass `TETHER_*` variables to it, or outlive the session that started it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;

use crate::wire::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{Inbound, UpstreamError, shim};
use crate::log_limit::LogLimiter;
use crate::upstream::EnvPolicy;

/// What to start.
#[derive(Clone, Copy)]
pub struct SpawnSpec<'a> {
    /// Program and arguments.
    pub argv: &'a [String],
    /// Extra environment.
    pub env: &'a BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<&'a Path>,
    /// Which of the gateway's variables the child sees.
    pub env_policy: &'a EnvPolicy,
    /// The `tether` executable to supervise the child through, if available.
    pub shim: Option<&'a Path>,
    /// The upstream's configured name (log prefix).
    pub name: &'a str,
}

/// A running stdio child.
pub struct StdioLink {
    pid: u32,
    tracker: TaskTracker,
    stdin: mpsc::Sender<Vec<u8>>,
    stop: CancellationToken,
    exited: Arc<AtomicBool>,
}

/// How long a child gets to exit by itself after its stdin closes before its group is killed.
const EXIT_GRACE: Duration = Duration::from_millis(300);

/// Longest stderr line written to the log; the rest is counted, not kept.
const STDERR_LINE_MAX: usize = 2048;

/// Bytes of an oversized stdout line kept to find its JSON-RPC id.
const OVERSIZED_HEAD: usize = 4096;

/// One stdout line, or the report of one that was too long.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// A complete line, without its newline.
    Text(BytesMut),
    /// A line over the limit: its first bytes and its full length.
    Oversized {
        /// The first [`OVERSIZED_HEAD`] bytes.
        head: Vec<u8>,
        /// Length of the whole line.
        len: usize,
    },
}

/// Newline framing with a bound that survives an oversized line. Written by hand because
/// `LinesCodec` reports its length error once and `FramedRead` then ends the stream, which
/// used to take the upstream down with a message it only had to refuse.
pub struct BoundedLines {
    max: usize,
    /// Bytes already searched for a newline.
    scanned: usize,
    /// An oversized line being skipped: its head and the length so far.
    skipping: Option<(Vec<u8>, usize)>,
}

impl BoundedLines {
    /// Lines of at most `max` bytes.
    pub fn new(max: usize) -> BoundedLines {
        BoundedLines {
            max,
            scanned: 0,
            skipping: None,
        }
    }
}

impl Decoder for BoundedLines {
    type Item = Line;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        if let Some((_, len)) = &mut self.skipping {
            return Ok(match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    *len += i;
                    buf.advance(i + 1);
                    let (head, len) = self.skipping.take().expect("set above");
                    Some(Line::Oversized { head, len })
                }
                None => {
                    *len += buf.len();
                    buf.clear();
                    None
                }
            });
        }
        match memchr::memchr(b'\n', &buf[self.scanned..]) {
            Some(off) => {
                let end = self.scanned + off;
                self.scanned = 0;
                let mut line = buf.split_to(end + 1);
                line.truncate(end);
                if line.len() > self.max {
                    return Ok(Some(Line::Oversized {
                        head: line[..OVERSIZED_HEAD.min(line.len())].to_vec(),
                        len: line.len(),
                    }));
                }
                Ok(Some(Line::Text(line)))
            }
            None if buf.len() > self.max => {
                self.scanned = 0;
                self.skipping = Some((buf[..OVERSIZED_HEAD.min(buf.len())].to_vec(), buf.len()));
                buf.clear();
                Ok(None)
            }
            None => {
                self.scanned = buf.len();
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        if let Some(line) = self.decode(buf)? {
            return Ok(Some(line));
        }
        if let Some((head, len)) = self.skipping.take() {
            return Ok(Some(Line::Oversized { head, len }));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        self.scanned = 0;
        Ok(Some(Line::Text(buf.split())))
    }
}

/// Finds the top-level `"id"` of a JSON-RPC message from its first bytes, so an answer too
/// large to read can still be matched to its request. Hand-written: a JSON parser needs the
/// whole text, and this one is cut.
pub fn sniff_id(head: &[u8]) -> Option<Value> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < head.len() {
        match head[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while j < head.len() && head[j] != b'"' {
                    j += if head[j] == b'\\' { 2 } else { 1 };
                }
                let key = head.get(start..j)?;
                i = j + 1;
                if depth == 1 && key == b"id" {
                    let rest = head.get(i..)?;
                    let rest = std::str::from_utf8(rest)
                        .unwrap_or_else(|e| {
                            std::str::from_utf8(&rest[..e.valid_up_to()]).unwrap_or("")
                        })
                        .trim_start();
                    let rest = rest.strip_prefix(':')?.trim_start();
                    let end = if let Some(s) = rest.strip_prefix('"') {
                        s.find('"')? + 2
                    } else {
                        rest.find(|c: char| !(c.is_ascii_digit() || c == '-'))?
                    };
                    return serde_json::from_str(&rest[..end]).ok();
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Forwards a child's stderr to the log in bounded pieces: lines past [`STDERR_LINE_MAX`]
/// are cut (their length logged), and lines past the upstream's rate are only counted.
async fn log_stderr(mut stderr: tokio::process::ChildStderr, limiter: Arc<LogLimiter>) {
    let mut chunk = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::with_capacity(256);
    let mut len = 0usize;
    let emit = |line: &mut Vec<u8>, len: &mut usize| {
        if *len > 0 && limiter.admit() {
            let text = String::from_utf8_lossy(line);
            if *len > line.len() {
                tracing::debug!(target: "tether_core::upstream::stderr", bytes = *len, "{text}… (cut: {} bytes in all)", *len);
            } else {
                tracing::debug!(target: "tether_core::upstream::stderr", "{text}");
            }
        }
        line.clear();
        *len = 0;
    };
    loop {
        let n = match stderr.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for piece in chunk[..n].split_inclusive(|b| *b == b'\n') {
            let (body, ends) = match piece.split_last() {
                Some((b'\n', body)) => (body, true),
                _ => (piece, false),
            };
            let room = STDERR_LINE_MAX.saturating_sub(line.len());
            line.extend_from_slice(&body[..room.min(body.len())]);
            len += body.len();
            if ends {
                emit(&mut line, &mut len);
            }
        }
    }
    emit(&mut line, &mut len);
}

impl StdioLink {
    /// Starts the child and its I/O tasks.
    pub fn spawn(
        spec: SpawnSpec<'_>,
        session_id: &str,
        max_line: usize,
        stderr_limiter: Arc<LogLimiter>,
        inbound: mpsc::Sender<Inbound>,
        tracker: &TaskTracker,
    ) -> Result<StdioLink, UpstreamError> {
        if let Some(missing) = missing_program(spec.argv, spec.env, spec.cwd) {
            return Err(UpstreamError::Spawn(missing));
        }
        let mut cmd = match spec.shim {
            Some(shim_exe) => {
                let mut c = Command::new(shim_exe);
                c.arg("__shim").arg("--").args(spec.argv);
                c
            }
            None => {
                let mut c = Command::new(&spec.argv[0]);
                c.args(&spec.argv[1..]);
                c
            }
        };
        // A clean environment (issue: the admin token and store passwords reached every
        // upstream): the policy's variables, then the configured ones.
        cmd.env_clear()
            .envs(spec.env_policy.filter(std::env::vars_os()))
            .envs(spec.env);
        if spec.shim.is_some() {
            cmd.env(shim::PARENT_ENV, std::process::id().to_string());
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = spec.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().map_err(|e| {
            let what = format!("{:?}: {e}", spec.argv[0]);
            if super::gateway_exhausted(&e) {
                UpstreamError::Resources(what)
            } else {
                UpstreamError::Spawn(what)
            }
        })?;
        let pid = child
            .id()
            .ok_or_else(|| UpstreamError::Spawn("child exited at once".into()))?;
        let (stdin_tx, mut stdin_rx) = mpsc::channel::<Vec<u8>>(64);
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let stop = CancellationToken::new();
        let exited = Arc::new(AtomicBool::new(false));
        // A root span with a short prefix: stderr lines are many and long, and the
        // session's span would repeat the full id on each.
        let short: String = session_id.chars().take(8).collect();
        let span = tracing::info_span!(parent: None, "upstream", upstream.name = %spec.name, session = %short, pid);

        let writer_stop = stop.clone();
        tracker.spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = writer_stop.cancelled() => break,
                        msg = stdin_rx.recv() => {
                            let Some(line) = msg else { break };
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

        tracker.spawn(log_stderr(stderr, stderr_limiter).instrument(span.clone()));

        let reader_exited = exited.clone();
        tracker.spawn(
            async move {
                let mut frames = FramedRead::new(stdout, BoundedLines::new(max_line));
                let mut garbage = 0u64;
                while let Some(frame) = frames.next().await {
                    match frame {
                        Ok(Line::Text(line)) => {
                            if line.trim_ascii().is_empty() {
                                continue;
                            }
                            match Message::parse_upstream(&line) {
                                Some(message) => {
                                    if inbound.send(Inbound::Message { message, origin: None }).await.is_err() {
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
                        Ok(Line::Oversized { head, len }) => {
                            let id = sniff_id(&head);
                            if inbound.send(Inbound::Oversized { id, len, limit: max_line }).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
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
            tracker: tracker.clone(),
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
    pub async fn send(&self, message: &Message) {
        let mut line = message.encode();
        line.push('\n');
        let _ = self.stdin.send(line.into_bytes()).await;
    }

    /// Closes stdin, then kills the process group if the child has not exited shortly after.
    pub fn shutdown(&self) {
        if self.stop.is_cancelled() {
            return;
        }
        self.stop.cancel();
        let (pid, exited) = (self.pid, self.exited.clone());
        self.tracker.spawn(async move {
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

/// Why `argv[0]` cannot be started, if it visibly cannot: missing, or not executable. Checked
/// before spawning because the shim would otherwise start, fail, and exit 127, which reads
/// as a crashing server rather than a wrong command.
fn missing_program(
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&Path>,
) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let program = Path::new(&argv[0]);
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if argv[0].contains('/') {
        let full = match cwd {
            Some(dir) if program.is_relative() => dir.join(program),
            _ => program.to_path_buf(),
        };
        return (!runnable(&full))
            .then(|| format!("{:?} does not exist or is not executable", argv[0]));
    }
    let path = env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| runnable(&dir.join(program))) {
        None
    } else {
        Some(format!("command {:?} not found in PATH", argv[0]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(max: usize, input: &[&[u8]]) -> Vec<Line> {
        let mut codec = BoundedLines::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in input {
            buf.extend_from_slice(chunk);
            while let Some(l) = codec.decode(&mut buf).unwrap() {
                out.push(l);
            }
        }
        while let Some(l) = codec.decode_eof(&mut buf).unwrap() {
            out.push(l);
        }
        out
    }

    #[test]
    fn an_oversized_line_is_skipped_and_the_next_one_read() {
        let big = vec![b'x'; 100];
        let out = decode_all(10, &[b"{\"id\":7,", &big, &big, b"}\nok\n"]);
        assert_eq!(out.len(), 2, "{out:?}");
        match &out[0] {
            Line::Oversized { head, len } => {
                assert_eq!(*len, 8 + 200 + 1);
                assert!(head.starts_with(b"{\"id\":7,"));
            }
            other @ Line::Text(_) => panic!("{other:?}"),
        }
        assert_eq!(out[1], Line::Text(BytesMut::from(&b"ok"[..])));
        // Split across reads, within the limit.
        let out = decode_all(10, &[b"ab", b"c\nde", b"f"]);
        assert_eq!(
            out,
            [
                Line::Text(BytesMut::from(&b"abc"[..])),
                Line::Text(BytesMut::from(&b"def"[..]))
            ]
        );
    }

    #[test]
    fn ids_are_found_at_the_top_level_only() {
        assert_eq!(
            sniff_id(br#"{"jsonrpc":"2.0","id":42,"result":{"#),
            Some(42.into())
        );
        assert_eq!(sniff_id(br#"{"id" : "a-1","result""#), Some("a-1".into()));
        assert_eq!(sniff_id(br#"{"result":{"id":5,"x":"#), None);
        assert_eq!(sniff_id(br#"{"result":{"id":5},"id":9}"#), Some(9.into()));
        assert_eq!(
            sniff_id(br#"{"method":"x","params":{"text":"\"id\":3"#),
            None
        );
        assert_eq!(sniff_id(b"garbage"), None);
    }

    #[test]
    fn a_missing_program_is_named() {
        let env = BTreeMap::new();
        assert!(missing_program(&["/no/such/binary".into()], &env, None).is_some());
        assert!(missing_program(&["no-such-command-xyz".into()], &env, None).is_some());
        assert!(missing_program(&["sh".into()], &env, None).is_none());
    }
}
