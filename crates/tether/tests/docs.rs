//! The documents name code that exists: every `Type::member` (or `module::item`) that
//! ARCHITECTURE.md writes in backticks is defined in the workspace's sources, so a rename
//! that leaves the map behind fails here rather than misleading the next reader.

use std::path::{Path, PathBuf};

/// Crates the map names that are not ours.
const EXTERNAL: &[&str] = &[
    "axum",
    "tower",
    "tokio",
    "hyper",
    "serde",
    "serde_json",
    "std",
    "reqwest",
    "rusqlite",
    "redis",
    "tracing",
    "clap",
    "nix",
    "rmcp",
];

fn sources(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            out.push((path, text));
        }
    }
}

/// Whether `text` (the file at `path`) defines `name`: an item of that name, an `impl` of
/// it, or the file or folder of a module of that name.
fn defines(path: &Path, text: &str, name: &str) -> bool {
    let file = path.file_stem().and_then(|s| s.to_str());
    let folder = path
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|s| s.to_str());
    if file == Some(name) || (file == Some("mod") && folder == Some(name)) {
        return true;
    }
    // Methods live in `impl` blocks, often in a file of their own.
    let implements = text.lines().any(|l| {
        l.trim_start().starts_with("impl")
            && l.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|w| w == name)
    });
    implements
        || [
            "struct", "enum", "mod", "trait", "type", "fn", "const", "static",
        ]
        .iter()
        .any(|kw| {
            text.match_indices(&format!("{kw} {name}")).any(|(i, m)| {
                let next = text[i + m.len()..].chars().next();
                !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
        })
}

fn mentions(text: &str, name: &str) -> bool {
    text.match_indices(name).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + name.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !word(before) && !word(after)
    })
}

#[test]
fn architecture_names_code_that_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let map = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    sources(&root.join("crates"), &mut files);
    let mut missing = Vec::new();
    let mut checked = 0;
    for quoted in map.split('`').skip(1).step_by(2) {
        let path = quoted.trim_end_matches("()");
        let parts: Vec<&str> = path.split("::").collect();
        let is_path = parts.len() >= 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'));
        if !is_path || EXTERNAL.contains(&parts[0]) {
            continue;
        }
        checked += 1;
        let (owner, member) = (parts[parts.len() - 2], parts[parts.len() - 1]);
        if !files
            .iter()
            .any(|(p, text)| defines(p, text, owner) && mentions(text, member))
        {
            missing.push(path.to_owned());
        }
    }
    assert!(checked > 50, "the map names code ({checked} paths)");
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names what the code does not define: {missing:?}"
    );
}
