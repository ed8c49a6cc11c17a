//! The README's first command, `demo`, run as a user runs it (bounded, random ports).

use crate::support::ChildGuard;
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_rotates_with_zero_consumer_failures_and_serves_api_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openai-key-rotator"));
    cmd.args([
        "demo",
        "--duration",
        "25s",
        "--every",
        "5",
        "--openai-port",
        "0",
        "--vault-port",
        "0",
        "--kube-port",
        "0",
        "--listen",
    ])
    .arg(format!("127.0.0.1:{port}"))
    .arg("--dir")
    .arg(dir.path().join("demo"))
    .env("RUST_LOG", "info");
    let mut guard = ChildGuard::spawn(cmd);

    // While it runs: the API answers with the printed token, metrics are served.
    let start = Instant::now();
    let token = loop {
        let out = guard.output();
        if let Some(t) = out
            .lines()
            .find_map(|l| l.split("(token: ").nth(1))
            .map(|t| t.trim_end_matches(')').to_string())
        {
            break t;
        }
        if let Ok(Some(s)) = guard.child.try_wait() {
            panic!("demo exited early ({s}):\n{out}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "demo not up:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let api = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let targets: serde_json::Value = http
        .get(format!("{api}/v1/targets"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = targets["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["chatbot", "summarizer"]);
    let r = http
        .post(format!("{api}/v1/targets/chatbot/rotations"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"reason": "demo test", "emergency": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let status = loop {
        if let Some(s) = guard.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "demo did not stop:\n{}",
            guard.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let out = guard.output();
    assert!(status.success(), "{status}:\n{out}");
    let last = out
        .lines()
        .find(|l| l.starts_with("demo stopped:"))
        .unwrap_or_else(|| panic!("{out}"));
    let completed: f64 = last.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(completed >= 1.0, "{last}");
    assert!(last.ends_with(" successful and 0 failed calls"), "{last}");
    assert!(
        out.contains("rotation finished") && out.contains("status=completed"),
        "{out}"
    );
    // The audit trail it wrote verifies.
    let v = Command::new(env!("CARGO_BIN_EXE_openai-key-rotator"))
        .args(["audit", "verify"])
        .arg(dir.path().join("demo/audit.jsonl"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}
