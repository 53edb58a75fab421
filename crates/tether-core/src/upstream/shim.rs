//! The stdio child supervisor (`tether __shim -- CMD ARGS`).
//!
//! Children must die with the gateway even when it is killed with SIGKILL, and so must
//! everything they started. Linux offers that through `PR_SET_PDEATHSIG`, but setting it
//! between fork and exec needs `pre_exec`, which is `unsafe`. Instead the gateway starts
//! this small process (its own executable) as the leader of a new process group; the shim
//! asks for SIGTERM when the gateway dies, starts the real server in the same group with
//! the gateway's pipes, and on SIGTERM/SIGINT/SIGHUP kills the whole group. The gateway
//! itself stops a session's upstream the same way: one `killpg`.
//!
//! Must not: outlive its gateway, or leave a process of its group running.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{getpgrp, getppid};

/// Environment variable carrying the gateway's pid, so the shim can detect a gateway that
/// died before the death signal was armed.
pub const PARENT_ENV: &str = "TETHER_SHIM_PARENT";

/// Runs the shim; returns the process exit code.
pub fn run(argv: &[String]) -> i32 {
    if argv.is_empty() {
        eprintln!("tether __shim: no command given");
        return 2;
    }
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        eprintln!("tether __shim: cannot arm parent-death signal: {e}");
    }
    if let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
        && getppid().as_raw() != parent
    {
        // The gateway died before the death signal was armed.
        return 1;
    }
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tether __shim: cannot install signal handlers: {e}");
            return 2;
        }
    };
    let mut child = match std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env_remove(PARENT_ENV)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether __shim: cannot start {:?}: {e}", argv[0]);
            return 127;
        }
    };
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            // Kills the server, anything it started, and this shim.
            let _ = killpg(getpgrp(), Signal::SIGKILL);
        }
    });
    match child.wait() {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        }
        Err(_) => 1,
    }
}
