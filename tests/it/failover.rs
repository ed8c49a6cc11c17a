//! High availability: two daemons (the real binary) share a Lease. The leader is killed
//! (SIGKILL, no release) in the middle of a rotation: the other takes over within the lease
//! duration and resumes the rotation from the journal. The leader is stopped (SIGTERM) in
//! the middle of a step: it releases the Lease only after its steps stopped, so the two
//! never lead at once.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_hands_over_only_after_the_leaders_steps_stopped() {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SandboxOptions::for_tests(dir.path());
    opts.external_vault = Some((bao.addr.clone(), Secret::new(bao.token.clone())));
    opts.schedule = "0 0 0 1 1 *".into();
    // Slow pods keep the leader inside its verify step (not between steps) for seconds.
    opts.pod_ready_delay = Duration::from_secs(3);
    let sb = Sandbox::start(opts).await.unwrap();
    assert!(sb.wait_ready(Duration::from_secs(60)).await);
    let mut config = sb.config.clone();
    let le = &mut config.daemon.leader_election;
    le.enabled = true;
    le.namespace = "okr".into();
    le.lease_name = "okr-leader".into();
    le.lease_duration = DurationStr::from_secs(3);
    le.renew_deadline = DurationStr::from_secs(2);
    le.retry_period = DurationStr(Duration::from_millis(250));
    config.targets[0].grace_period = DurationStr(Duration::from_millis(500));
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
    let seeded_accounts = sb.openai.service_accounts(&sb.project_id);
    let r: serde_json::Value = http
        .post(format!(
            "http://127.0.0.1:{pa}/v1/targets/chatbot/rotations"
        ))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"reason": "hand-over test"}))
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
        if j["step"] == "verify" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no verify: {j}\n{}",
            a.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGTERM the leader inside its verify step.
    let term = Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // Watch both: when a's process exits, and when b holds the Lease.
    let (mut exited, mut taken) = (None, None);
    let start = Instant::now();
    while exited.is_none() || taken.is_none() {
        if exited.is_none() && a.child.try_wait().unwrap().is_some() {
            exited = Some(Instant::now());
        }
        if taken.is_none() && holder() == "okr-b" {
            taken = Some(Instant::now());
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "exited {exited:?}, taken over {taken:?}\n{}\n-----\n{}",
            a.output(),
            b.output()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (exited, taken) = (exited.unwrap(), taken.unwrap());
    assert!(
        taken >= exited,
        "okr-b led {:?} before okr-a's steps stopped and it exited: two leaders\n{}",
        exited - taken,
        a.output()
    );
    // okr-b finishes the rotation from the journal.
    let start = Instant::now();
    let j = loop {
        let j: serde_json::Value = http
            .get(format!("http://127.0.0.1:{pb}/v1/rotations/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
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
}
