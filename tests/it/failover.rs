//! High availability: two daemons (the real binary) share a Lease; the leader is killed
//! (SIGKILL, no release) in the middle of a rotation; the other takes over within the lease
//! duration and resumes the rotation from the journal.

use crate::support::{self, ChildGuard};
use openai_key_rotator::config::DurationStr;
use openai_key_rotator::sandbox::scenario::{Sandbox, SandboxOptions};
use openai_key_rotator::secret::Secret;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "failover-test-token-0123456789";

fn spawn_daemon(config: &Path, tokens: &Path, name: &str, port: u16) -> ChildGuard {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openai-key-rotator"));
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--api-tokens-file")
        .arg(tokens)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--audit-file")
        .arg(config.with_file_name(format!("audit-{name}.jsonl")))
        .env("POD_NAME", name)
        .env("RUST_LOG", "info");
    ChildGuard::spawn(cmd)
}

async fn wait_until<F: FnMut() -> bool>(
    what: &str,
    timeout: Duration,
    guards: &[&ChildGuard],
    mut f: F,
) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            let logs: Vec<String> = guards.iter().map(|g| g.output()).collect();
            panic!("timed out waiting for {what}:\n{}", logs.join("\n-----\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_rotation_hands_over_and_the_rotation_completes() {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SandboxOptions::for_tests(dir.path());
    opts.external_vault = Some((bao.addr.clone(), Secret::new(bao.token.clone())));
    // No schedule firing during the test: only the triggered rotation runs.
    opts.schedule = "0 0 0 1 1 *".into();
    let sb = Sandbox::start(opts).await.unwrap();
    assert!(sb.wait_ready(Duration::from_secs(30)).await);
    let mut config = sb.config.clone();
    let le = &mut config.daemon.leader_election;
    le.enabled = true;
    le.namespace = "okr".into();
    le.lease_name = "okr-leader".into();
    le.lease_duration = DurationStr::from_secs(3);
    le.renew_deadline = DurationStr::from_secs(2);
    le.retry_period = DurationStr(Duration::from_millis(250));
    // A long grace period keeps the rotation in its drain step while we kill the leader.
    config.targets[0].grace_period = DurationStr::from_secs(5);
    let config_path = dir.path().join("ha.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("oncall:{TOKEN}\n")).unwrap();

    let (pa, pb) = (support::free_port(), support::free_port());
    let mut a = spawn_daemon(&config_path, &tokens, "okr-a", pa);
    let kube = sb.kube.clone();
    let holder = move || {
        kube.lease("okr", "okr-leader")
            .and_then(|l| l.spec?.holder_identity)
            .unwrap_or_default()
    };
    wait_until("okr-a to lead", Duration::from_secs(30), &[&a], || {
        holder() == "okr-a"
    })
    .await;
    let b = spawn_daemon(&config_path, &tokens, "okr-b", pb);
    let http = reqwest::Client::new();
    // The follower refuses triggers with 503 and names the leader.
    let start = Instant::now();
    let refused = loop {
        if let Ok(r) = http
            .post(format!(
                "http://127.0.0.1:{pb}/v1/targets/chatbot/rotations"
            ))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"reason": "to the follower"}))
            .send()
            .await
        {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "okr-b not up:\n{}",
            b.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["leader"], "okr-a");

    // Start a rotation on the leader and wait until it sits in its grace period.
    let seeded_accounts = sb.openai.service_accounts(&sb.project_id);
    let r: serde_json::Value = http
        .post(format!(
            "http://127.0.0.1:{pa}/v1/targets/chatbot/rotations"
        ))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"reason": "failover test"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = r["rotation_id"].as_str().unwrap().to_string();
    let start = Instant::now();
    loop {
        let j: serde_json::Value = http
            .get(format!("http://127.0.0.1:{pa}/v1/rotations/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if j["step"] == "drain" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no drain: {j}\n{}",
            a.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Kill the leader: no release, no graceful stop.
    let killed = Instant::now();
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    wait_until("okr-b to take over", Duration::from_secs(10), &[&b], || {
        holder() == "okr-b"
    })
    .await;
    let takeover = killed.elapsed();
    assert!(
        takeover <= Duration::from_secs(3) + Duration::from_millis(1500),
        "took {takeover:?}"
    );

    // okr-b resumes the journaled rotation to completion.
    let start = Instant::now();
    let j = loop {
        let r = http
            .get(format!("http://127.0.0.1:{pb}/v1/rotations/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let j: serde_json::Value = r.json().await.unwrap();
        if j["status"] == "completed" {
            break j;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not completed: {j}\n{}",
            b.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(j["old_retired"].as_bool().unwrap(), "{j}");
    let accounts = sb.openai.service_accounts(&sb.project_id);
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_ne!(accounts[0].id, seeded_accounts[0].id);
    assert_eq!(sb.consumers.total().failed, 0, "{:?}", sb.consumers.total());
    assert!(b.output().contains("resuming rotation"), "{}", b.output());
}
