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
    // Every `tether SUBCOMMAND --flag` and `TETHER_*` variable the two files use (commands,
    // health checks, and the examples in their comments) is one the CLI defines, as clap
    // prints the definition itself.
    let cli = CliPages::new();
    let mut uses = invocations(&dockerfile);
    uses.extend(invocations(&unit));
    for sub in ["serve", "health", "man", "completions", "dashboard"] {
        assert!(
            uses.iter()
                .any(|u| u.first().map(String::as_str) == Some(sub)),
            "the files run `tether {sub}`: {uses:?}"
        );
    }
    // Flags first: the help pages they read are where the variables are looked up.
    let mut problems: Vec<String> = uses.iter().flat_map(|u| cli.check(u)).collect();
    problems.extend(cli.check_env(&dockerfile));
    problems.extend(cli.check_env(&unit));
    assert!(problems.is_empty(), "{problems:#?}");
    // The check itself fails on what does not exist.
    let wrong = invocations(
        "RUN tether serve --no-such-flag --config x\nCMD [\"tether\", \"frobnicate\"]\nENV TETHER_NO_SUCH=1",
    );
    let mut found: Vec<String> = wrong.iter().flat_map(|u| cli.check(u)).collect();
    found.extend(cli.check_env("ENV TETHER_NO_SUCH=1"));
    assert_eq!(found.len(), 3, "{found:?}");
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

/// The CLI's definition as clap prints it: each subcommand's `--help` (flags, and the
/// environment variable each reads), asked for as uses name them.
struct CliPages {
    pages: std::cell::RefCell<std::collections::HashMap<String, Option<String>>>,
}

impl CliPages {
    fn new() -> CliPages {
        CliPages {
            pages: Default::default(),
        }
    }

    fn page(&self, sub: &str) -> Option<String> {
        self.pages
            .borrow_mut()
            .entry(sub.to_owned())
            .or_insert_with(|| {
                let (code, text) = run(&[sub, "--help"]);
                (code == 0).then_some(text)
            })
            .clone()
    }

    /// Problems with one `tether ARGS...` use: an unknown subcommand, or a `--flag` that
    /// subcommand does not define.
    fn check(&self, args: &[String]) -> Vec<String> {
        let Some(sub) = args.first() else {
            return Vec::new();
        };
        let Some(page) = self.page(sub) else {
            return vec![format!("`tether {sub}` is not a subcommand")];
        };
        args[1..]
            .iter()
            .take_while(|a| a.as_str() != "--")
            .filter_map(|a| a.strip_prefix("--"))
            .map(|f| f.split('=').next().unwrap_or(f))
            .filter(|flag| !defines(&page, flag))
            .map(|flag| format!("`tether {sub}` has no --{flag}"))
            .collect()
    }

    /// Problems with the `TETHER_*` variables a file names: each must be one that a flag of
    /// some subcommand reads.
    fn check_env(&self, text: &str) -> Vec<String> {
        let (_, top) = run(&["--help"]);
        let subs: Vec<String> = top
            .lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        assert!(subs.contains(&"serve".to_owned()), "{top}");
        let pages: Vec<String> = subs.iter().filter_map(|s| self.page(s)).collect();
        let mut out = Vec::new();
        for (i, _) in text.match_indices("TETHER_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // `[env: NAME=VALUE]`, or `[env: NAME]` for a secret whose value clap hides.
            let known = |p: &String| {
                p.contains(&format!("[env: {name}=")) || p.contains(&format!("[env: {name}]"))
            };
            if !pages.iter().any(known) {
                out.push(format!("{name} is no flag's environment variable"));
            }
        }
        out
    }
}

/// Whether a help text documents `--flag` (a longer flag that begins with the same name
/// does not count).
fn defines(page: &str, flag: &str) -> bool {
    let needle = format!("--{flag}");
    page.match_indices(&needle).any(|(i, _)| {
        let next = page[i + needle.len()..].chars().next();
        !matches!(next, Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// Every `tether ...` command in a Dockerfile or unit: shell words after a `tether` program
/// (`tether`, `/usr/local/bin/tether`, `./target/release/tether`) up to the end of the
/// command, and the JSON forms (`ENTRYPOINT ["tether"]` followed by `CMD [...]`,
/// `HEALTHCHECK CMD ["tether", ...]`).
fn invocations(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut entrypoint = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(json) = trimmed.find('[').map(|i| &trimmed[i..])
            && let Ok(words) = serde_json::from_str::<Vec<String>>(json)
        {
            if trimmed.starts_with("ENTRYPOINT") {
                entrypoint = words == ["tether"];
                continue;
            }
            if trimmed.starts_with("CMD") && entrypoint {
                out.push(words);
                continue;
            }
            if let Some(i) = words.iter().position(|w| is_tether(w)) {
                out.push(words[i + 1..].to_vec());
                continue;
            }
        }
        let words: Vec<String> = line
            .split_whitespace()
            .map(|w| {
                w.trim_matches(|c| c == '`' || c == '\'' || c == '"')
                    .to_owned()
            })
            .collect();
        for (i, w) in words.iter().enumerate() {
            if !is_tether(w) {
                continue;
            }
            let args: Vec<String> = words[i + 1..]
                .iter()
                .take_while(|a| {
                    !["&&", "||", "|", ";", "\\", "..."].contains(&a.as_str())
                        && !a.starts_with('>')
                        && !a.ends_with(';')
                })
                .cloned()
                .collect();
            // A subcommand is a plain word; `tether` alone (a user, an image) runs nothing.
            if args
                .first()
                .is_some_and(|a| a.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            {
                out.push(args);
            }
        }
    }
    out
}

fn is_tether(word: &str) -> bool {
    word == "tether" || word.ends_with("/bin/tether") || word.ends_with("/release/tether")
}
