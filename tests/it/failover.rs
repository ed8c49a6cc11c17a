//! High availability: two daemons (the real binary) share a Lease. The leader is killed
//! (SIGKILL, no release) in the middle of a rotation: the other takes over within the lease
//! duration and resumes the rotation from the journal. The leader is stopped (SIGTERM) in
//! the middle of a step: it releases the Lease only after its steps stopped, so the two
//! never lead at once. API calls sent to the follower are forwarded to the leader (found
//! through the API URL it writes on the Lease), so the CLI works through either replica.

use crate::support::{self, ChildGuard};
use openai_key_rotator::config::DurationStr;
use openai_key_rotator::sandbox::scenario::{Sandbox, SandboxOptions};
use openai_key_rotator::secret::Secret;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "failover-test-token-0123456789";

/// `pod_ip`: the env the chart sets from the downward API; `None` = this replica advertises
/// no API URL (followers cannot forward to it).
fn spawn_daemon(
    config: &Path,
    tokens: &Path,
    name: &str,
    port: u16,
    pod_ip: Option<&str>,
) -> ChildGuard {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openai-key-rotator"));
    match pod_ip {
        Some(ip) => cmd.env("POD_IP", ip),
        None => cmd.env_remove("POD_IP"),
    };
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

/// Wait until the follower on `port` forwards `/v1` calls to `leader` (it has read the
/// Lease and its API URL).
async fn wait_forwarding(http: &reqwest::Client, port: u16, leader: &str, follower: &ChildGuard) {
    let start = Instant::now();
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/v1/targets"))
            .bearer_auth(TOKEN)
            .send()
            .await
        {
            if r.headers().get("x-okr-forwarded-to").map(|v| v.as_bytes())
                == Some(leader.as_bytes())
            {
                assert_eq!(r.status(), 200);
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the follower never forwarded to {leader}:\n{}",
            follower.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The audit records of `event` in a daemon's audit file.
fn audited(path: &Path, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == event)
        .collect()
}

/// The CLI, as an operator runs it against the Service (here: the follower's port).
async fn cli(args: &[&str], port: u16) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openai-key-rotator"));
    cmd.args(args)
        .env("OKR_ADDR", format!("http://127.0.0.1:{port}"))
        .env("OKR_TOKEN", TOKEN)
        .env_remove("OKR_TOKEN_FILE");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the CLI finished within 60 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_forwards_api_calls_to_the_leader_and_the_cli_works_through_it() {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SandboxOptions::for_tests(dir.path());
    opts.external_vault = Some((bao.addr.clone(), Secret::new(bao.token.clone())));
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
    // Long enough to see the rotation running through the follower.
    config.targets[0].grace_period = DurationStr::from_secs(2);
    let config_path = dir.path().join("ha.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("oncall:{TOKEN}\n")).unwrap();
    let (pa, pb) = (support::free_port(), support::free_port());
    // okr-a's URL comes from POD_IP (what the chart sets); okr-b has none, which only
    // matters if it leads.
    let a = spawn_daemon(&config_path, &tokens, "okr-a", pa, Some("127.0.0.1"));
    let kube = sb.kube.clone();
    let lease = move || kube.lease("okr", "okr-leader");
    wait_until("okr-a to lead", Duration::from_secs(30), &[&a], || {
        lease().and_then(|l| l.spec?.holder_identity).as_deref() == Some("okr-a")
    })
    .await;
    let annotations = lease().unwrap().metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations
            .get("openai-key-rotator/api-url")
            .map(String::as_str),
        Some(format!("http://127.0.0.1:{pa}").as_str()),
        "{annotations:?}"
    );
    let b = spawn_daemon(&config_path, &tokens, "okr-b", pb, None);
    let http = reqwest::Client::new();
    wait_forwarding(&http, pb, "okr-a", &b).await;
    let audit_a = config_path.with_file_name("audit-okr-a.jsonl");
    let audit_b = config_path.with_file_name("audit-okr-b.jsonl");

    // A wrong token is refused by the follower itself and never reaches the leader.
    let r = http
        .post(format!(
            "http://127.0.0.1:{pb}/v1/targets/chatbot/rotations"
        ))
        .bearer_auth("wrong-token-0123456789abcdef")
        .json(&serde_json::json!({"reason": "bad token"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(!r.headers().contains_key("x-okr-forwarded-to"));

    // A trigger sent to the follower: 202 with the leader's rotation id.
    let creates = sb.openai.calls("service_accounts.create");
    let r = http
        .post(format!(
            "http://127.0.0.1:{pb}/v1/targets/chatbot/rotations"
        ))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"reason": "via the follower"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-okr-forwarded-to"], "okr-a");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let v: serde_json::Value = r.json().await.unwrap();
    let id = v["rotation_id"].as_str().unwrap().to_string();
    assert_eq!(v["status"], "accepted", "{v}");
    assert_eq!(location, format!("/v1/rotations/{id}"));

    let get = |port: u16, path: String| {
        let http = http.clone();
        async move {
            let r = http
                .get(format!("http://127.0.0.1:{port}{path}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            let forwarded = r
                .headers()
                .get("x-okr-forwarded-to")
                .map(|v| v.to_str().unwrap().to_string());
            (
                r.status(),
                forwarded,
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    // The follower's answers are the leader's: its own view has no running rotation.
    let (s, fwd, targets) = get(pb, "/v1/targets".into()).await;
    assert_eq!((s.as_u16(), fwd.as_deref()), (200, Some("okr-a")));
    assert_eq!(targets["targets"][0]["name"], "chatbot");
    assert_eq!(
        targets["targets"][0]["running_rotation"],
        id.as_str(),
        "{targets}"
    );
    let (s, fwd, via_b) = get(pb, location.clone()).await;
    assert_eq!((s.as_u16(), fwd.as_deref()), (200, Some("okr-a")));
    assert_eq!(via_b["rotation_id"], id.as_str());
    assert_eq!(via_b["actor"], "oncall");
    assert_eq!(via_b["reason"], "via the follower");

    // Followed through the follower to the end; then the whole view is the leader's (while
    // it waits for a slot the view's start time is the request's, so two reads a moment
    // apart may differ in it).
    let start = Instant::now();
    loop {
        let (_, _, j) = get(pb, location.clone()).await;
        if j["status"] == "completed" {
            let (_, _, on_a) = get(pa, location.clone()).await;
            assert_eq!(j, on_a, "the follower's view is not the leader's");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not completed: {j}\n{}",
            a.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Started exactly once, by the leader.
    assert_eq!(sb.openai.calls("service_accounts.create") - creates, 1);
    let requested = audited(&audit_a, "rotation_requested");
    assert_eq!(requested.len(), 1, "{requested:?}");
    assert_eq!(requested[0]["rotation_id"], id.as_str());
    assert!(audited(&audit_b, "rotation_requested").is_empty());
    assert!(audited(&audit_b, "trigger_refused").is_empty());
    // The wrong token was refused on okr-b; okr-a never saw it.
    assert!(
        b.output().contains("missing or unknown bearer token"),
        "{}",
        b.output()
    );
    assert!(
        !a.output().contains("missing or unknown bearer token"),
        "{}",
        a.output()
    );

    // The CLI pointed at the follower: rotate --wait follows to the end, status works.
    let out = cli(
        &[
            "rotate",
            "chatbot",
            "--wait",
            "--reason",
            "cli via the follower",
        ],
        pb,
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "rotate --wait: {:?}\n{stdout}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        a.output()
    );
    let cli_id = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("rotation ")?
                .strip_suffix(" of chatbot started")
        })
        .unwrap_or_else(|| panic!("no rotation id in {stdout}"))
        .to_string();
    assert!(
        stdout.contains(&format!("rotation {cli_id}: completed")),
        "{stdout}"
    );
    let out = cli(&["status"], pb).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "status: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("chatbot"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.contains(&cli_id) && line.contains("completed"),
        "{stdout}"
    );

    assert_eq!(sb.openai.calls("service_accounts.create") - creates, 2);
    let requested = audited(&audit_a, "rotation_requested");
    assert_eq!(requested.len(), 2, "{requested:?}");
    assert_eq!(requested[1]["rotation_id"], cli_id.as_str());
    assert!(audited(&audit_b, "rotation_requested").is_empty());
    let accounts = sb.openai.service_accounts(&sb.project_id);
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(sb.consumers.total().failed, 0, "{:?}", sb.consumers.total());
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
    let mut a = spawn_daemon(&config_path, &tokens, "okr-a", pa, Some("127.0.0.1"));
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
    let b = spawn_daemon(&config_path, &tokens, "okr-b", pb, Some("127.0.0.1"));
    let http = reqwest::Client::new();
    wait_forwarding(&http, pb, "okr-a", &b).await;

    // The rotation is started through the follower, which forwards it to the leader.
    let seeded_accounts = sb.openai.service_accounts(&sb.project_id);
    let r = http
        .post(format!(
            "http://127.0.0.1:{pb}/v1/targets/chatbot/rotations"
        ))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"reason": "failover test, via the follower"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-okr-forwarded-to"], "okr-a");
    let r: serde_json::Value = r.json().await.unwrap();
    let id = r["rotation_id"].as_str().unwrap().to_string();
    // Wait until it sits in its grace period (asking the leader itself).
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
    // Until the Lease expires, the follower still forwards to the dead leader: it answers at
    // once, 503 naming it (nothing was delivered), instead of hanging or answering for it.
    let r = http
        .get(format!("http://127.0.0.1:{pb}/v1/rotations/{id}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["leader"], "okr-a", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("cannot reach"),
        "{body}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "{:?}",
        killed.elapsed()
    );
    wait_until("okr-b to take over", Duration::from_secs(10), &[&b], || {
        holder() == "okr-b"
    })
    .await;
    let takeover = killed.elapsed();
    assert!(
        takeover <= Duration::from_secs(3) + Duration::from_millis(1500),
        "took {takeover:?}"
    );

    // okr-b resumes the journaled rotation to completion, and answers for itself now.
    let start = Instant::now();
    let j = loop {
        let r = http
            .get(format!("http://127.0.0.1:{pb}/v1/rotations/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let forwarded = r.headers().contains_key("x-okr-forwarded-to");
        let j: serde_json::Value = r.json().await.unwrap();
        if j["status"] == "completed" {
            assert!(!forwarded, "the new leader forwarded: {j}");
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
    // No POD_IP and no advertise_url: the leader advertises no API URL.
    let mut a = spawn_daemon(&config_path, &tokens, "okr-a", pa, None);
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
    let b = spawn_daemon(&config_path, &tokens, "okr-b", pb, None);
    let http = reqwest::Client::new();
    let seeded_accounts = sb.openai.service_accounts(&sb.project_id);
    // Negative control of forwarding: without the leader's URL the follower refuses a
    // trigger with 503 naming the leader, and nothing starts.
    let creates = sb.openai.calls("service_accounts.create");
    let start = Instant::now();
    loop {
        let r = http
            .post(format!(
                "http://127.0.0.1:{pb}/v1/targets/chatbot/rotations"
            ))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"reason": "to the follower"}))
            .send()
            .await;
        if let Ok(r) = r {
            assert_eq!(r.status(), 503);
            assert!(!r.headers().contains_key("x-okr-forwarded-to"));
            let body: serde_json::Value = r.json().await.unwrap();
            // Until okr-b has read the Lease once, it knows no leader.
            if body["leader"] == "okr-a" {
                break;
            }
            assert!(body["leader"].is_null(), "{body}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "okr-b never named okr-a:\n{}",
            b.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = sb.kube.lease("okr", "okr-leader").unwrap();
    let annotations = lease.metadata.annotations.unwrap_or_default();
    assert!(
        !annotations.contains_key("openai-key-rotator/api-url"),
        "{annotations:?}"
    );
    assert_eq!(
        sb.openai.calls("service_accounts.create"),
        creates,
        "a refused trigger minted an account"
    );
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
