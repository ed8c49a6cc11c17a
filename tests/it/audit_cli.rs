//! `openai-key-rotator audit verify FILE` as an operator runs it: the real binary, its
//! output and its exit codes (0 intact, 2 broken, 1 unreadable).

use openai_key_rotator::audit::{Audit, AuditEvent, AuditFields};
use std::process::{Command, Output};

fn verify(path: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_openai-key-rotator"))
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .expect("run openai-key-rotator")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn audit_verify_reports_ok_broken_and_unreadable_with_their_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let audit = Audit::open(Some(&path), false).unwrap();
    for target in ["chat", "search", "batch"] {
        audit
            .record(AuditFields {
                target: Some(target.into()),
                actor: Some("ops".into()),
                ..AuditFields::new(AuditEvent::RotationRequested)
            })
            .unwrap();
    }
    drop(audit);

    let ok = verify(&path);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert_eq!(stdout(&ok), "OK: 4 records\n");

    // Edit line 3's target: line 4's prev hash no longer matches.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"search\"", "\"Search\"", 1)).unwrap();
    let broken = verify(&path);
    assert_eq!(broken.status.code(), Some(2), "{broken:?}");
    assert!(
        stdout(&broken).starts_with("BROKEN at line 4: "),
        "{}",
        stdout(&broken)
    );

    let missing = verify(&dir.path().join("missing.jsonl"));
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert!(stdout(&missing).is_empty());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("missing.jsonl"), "{err}");
}
