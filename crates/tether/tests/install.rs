//! What operators install with: shell completions and man pages generated from the CLI,
//! `tether health` for container and service health checks, and a Dockerfile and systemd
//! unit that use only commands that exist.

mod common;

use std::process::Command;

use common::{BIN, Gateway, state_dir};

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, text) = run(&["completions", shell]);
        assert_eq!(code, 0, "{shell}");
        assert!(
            text.contains("max-sessions"),
            "{shell} completes serve's flags"
        );
    }
    let dir = state_dir();
    let (code, _) = run(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0);
    let serve = std::fs::read_to_string(dir.path().join("tether-serve.1")).unwrap();
    assert!(serve.contains(".TH tether-serve 1"), "{serve}");
    assert!(
        serve.contains("require\\-upstream"),
        "every flag documented"
    );
    assert!(dir.path().join("tether-keys-revoke.1").exists());
    let (code, page) = run(&["man"]);
    assert_eq!(code, 0);
    assert!(
        page.starts_with(".ie") && page.contains(".SH NAME"),
        "{page}"
    );
}

#[tokio::test]
async fn health_exits_by_readiness() {
    let dir = state_dir();
    let gw = Gateway::start(dir.path(), &["--demo"]);
    let (code, out) = run(&["health", "--admin", gw.admin.trim_start_matches("http://")]);
    assert_eq!((code, out.trim()), (0, "ready"));

    let broken_dir = state_dir();
    let broken = Gateway::start(broken_dir.path(), &["--", "/no/such/binary"]);
    let (code, out) = run(&["health", "--admin", &broken.admin]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("upstream") && out.contains("/no/such/binary"),
        "{out}"
    );
    drop(broken);

    let (_reserved, free) = common::refused_addr();
    let (code, out) = run(&["health", "--admin", &free.to_string()]);
    assert_eq!(code, 1);
    assert!(out.contains("not reachable"), "{out}");
}

#[test]
fn dockerfile_and_unit_use_commands_that_exist() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    let unit = std::fs::read_to_string(format!("{root}/docs/tether.service")).unwrap();
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root")),
        "runs as a non-root user"
    );
    assert!(dockerfile.contains("VOLUME [\"/var/lib/tether\"]"));
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("\"health\""));
    assert!(dockerfile.contains("AS build"), "multi-stage");
    assert!(unit.contains("NoNewPrivileges=yes") && unit.contains("ProtectSystem=strict"));
    // Every `tether SUBCOMMAND` the two files run is one the binary knows.
    let used = ["serve", "health", "man", "completions", "dashboard"];
    for sub in used {
        assert!(
            dockerfile.contains(sub) || unit.contains(sub),
            "{sub} is used by one of them"
        );
        let (code, _) = run(&[sub, "--help"]);
        assert_eq!(code, 0, "tether {sub} exists");
    }
    // The unit's ExecStart flags parse (a missing config file is the only complaint).
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/tether "))
        .unwrap();
    let args: Vec<&str> = exec.split_whitespace().collect();
    let out = Command::new(BIN).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read config file"), "{stderr}");
}
