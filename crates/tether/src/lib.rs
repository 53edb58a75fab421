//! The `tether` command's library side: what `tether serve` makes of its arguments and
//! how the commands log. The binary uses it, and so do the tests that run a gateway in
//! their own process from the same arguments.

pub mod logging;
pub mod serve;

use std::process::ExitCode;

/// The commands' multi-threaded runtime, or exit code 1 having said why there is none.
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("tether: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}
