//! `check-config` over the corpus under `tests/config/`, as an operator runs it: the real
//! binary, its output and its exit code.
//!
//! Every `invalid/NAME.toml` must be refused (exit 1) with every line of `NAME.expected` in
//! the output (a line starting with `!` must NOT be there: credentials, say); every
//! `valid/NAME.toml` must pass (exit 0, `OK`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = crate::support::repo_root().join("tests/config").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

fn check_config(file: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openai-key-rotator"))
        .arg("check-config")
        .arg(file)
        .output()
        .expect("run openai-key-rotator");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn every_invalid_config_is_refused_with_every_expected_message() {
    let files = corpus("invalid");
    assert!(files.len() >= 10, "corpus too small: {files:?}");
    let mut failures = Vec::new();
    for file in &files {
        let expected_path = file.with_extension("expected");
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        let (code, text) = check_config(file);
        if code != Some(1) {
            failures.push(format!("{}: exit {code:?}\n{text}", file.display()));
        }
        for want in expected
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            match want.strip_prefix('!') {
                Some(banned) if text.contains(banned) => failures.push(format!(
                    "{}: output contains {banned:?}:\n{text}",
                    file.display()
                )),
                Some(_) => {}
                None if !text.contains(want) => failures.push(format!(
                    "{}: output lacks {want:?}:\n{text}",
                    file.display()
                )),
                None => {}
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn near_misses_and_the_example_config_pass() {
    let mut files = corpus("valid");
    assert!(!files.is_empty());
    files.push(crate::support::repo_root().join("config.example.toml"));
    for file in files {
        let (code, text) = check_config(&file);
        assert!(
            code == Some(0) && text.starts_with("OK"),
            "{}: exit {code:?}\n{text}",
            file.display()
        );
    }
}
