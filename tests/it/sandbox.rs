//! The seeded sandbox end to end: simulators wired together, consumer pods measuring
//! availability, and the `sandbox` command as a user runs it.

use crate::support::{self, ChildGuard};
use openai_key_rotator::config::Config;
use openai_key_rotator::sandbox::scenario::{Sandbox, SandboxOptions};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const PATH: &str = "demo/chatbot/openai";

fn kubectl(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    Command::new(support::tool("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl")
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn current_key(sb: &Sandbox) -> String {
    let (_, data) = sb
        .vault
        .as_ref()
        .unwrap()
        .read_raw(PATH)
        .expect("key in vault");
    data["api_key"].as_str().unwrap().to_string()
}

/// Publish a new key the way a rotation does, retiring `old_id` either after the rollout
/// (right) or before it (wrong). Returns the new account.
async fn manual_rotation(
    sb: &Sandbox,
    old_id: &str,
    name: &str,
    retire_before_roll: bool,
) -> openai_key_rotator::sandbox::openai::ServiceAccountInfo {
    let (acct, key) = sb
        .openai
        .create_service_account(&sb.project_id, name)
        .unwrap();
    let mut data = serde_json::Map::new();
    data.insert("api_key".into(), key.expose().into());
    sb.vault.as_ref().unwrap().put_raw(PATH, data);
    let delete_old = || async {
        let resp = reqwest::Client::new()
            .delete(format!(
                "{}/organization/projects/{}/service_accounts/{}",
                sb.openai_url, sb.project_id, old_id
            ))
            .bearer_auth(sb.admin_key.expose())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
    };
    if retire_before_roll {
        delete_old().await;
    }
    for d in ["chatbot-api", "chatbot-worker"] {
        let out = kubectl(
            &sb.kubeconfig_path,
            &["rollout", "restart", &format!("deployment/{d}")],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for d in ["chatbot-api", "chatbot-worker"] {
        let out = kubectl(
            &sb.kubeconfig_path,
            &[
                "rollout",
                "status",
                &format!("deployment/{d}"),
                "--timeout=60s",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !retire_before_roll {
        delete_old().await;
    }
    acct
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_measure_availability_through_a_manual_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(SandboxOptions::for_tests(dir.path()))
        .await
        .unwrap();
    assert!(
        sb.wait_ready(Duration::from_secs(30)).await,
        "seeded rollouts"
    );

    // The written config is valid and points at the simulators.
    let config = Config::load(&sb.config_path).unwrap();
    assert_eq!(config.openai.base_url, sb.openai_url);
    assert_eq!(config.vault.address, sb.vault_url);
    assert_eq!(config.targets[0].project_id, sb.project_id);
    assert!(sb.openai.key_is_live(&current_key(&sb)), "I1 holds at seed");

    // Four consumer pods call with the seeded key, all successfully.
    wait_for("consumer traffic", Duration::from_secs(10), || {
        sb.consumers.total().ok >= 40
    })
    .await;
    assert_eq!(sb.consumers.running_pods(), 4);
    assert_eq!(sb.consumers.total().failed, 0, "{:?}", sb.consumers.total());

    // The right order (publish, roll, verify, retire) keeps every call green, and the
    // new pods really use the new key.
    let seeded = sb.openai.service_accounts(&sb.project_id);
    assert_eq!(seeded.len(), 1);
    let first = manual_rotation(&sb, &seeded[0].id, "manual-1", false).await;
    let new_key_id = first.key_id.clone().expect("a key");
    let before = sb.consumers.total().ok;
    wait_for("traffic on the new key", Duration::from_secs(10), || {
        sb.openai.requests_served(&new_key_id) >= 20 && sb.consumers.total().ok > before + 20
    })
    .await;
    let stats = sb.consumers.total();
    assert_eq!(
        stats.failed, 0,
        "zero downtime in the right order: {stats:?}"
    );
    assert_eq!(stats.pods_started, 8);

    // Negative control: retiring the old account before the roll is seen as failures.
    manual_rotation(&sb, &first.id, "manual-2", true).await;
    let stats = sb.consumers.total();
    assert!(
        stats.failed > 0,
        "the wrong order must show failed calls: {stats:?}"
    );
    assert!(
        stats.last_failure.as_deref().unwrap_or("").contains("401"),
        "{stats:?}"
    );
    // No key value ever reaches the failure record.
    assert!(!stats.last_failure.unwrap().contains(&current_key(&sb)));
}

const BIN: &str = env!("CARGO_BIN_EXE_openai-key-rotator");

/// `openai-key-rotator sandbox` on random ports writing to `dir`, plus `extra` flags; returns
/// once it printed that it is up.
async fn spawn_sandbox(dir: &Path, extra: &[&str], up_within: Duration) -> ChildGuard {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "sandbox",
        "--openai-port",
        "0",
        "--vault-port",
        "0",
        "--kube-port",
        "0",
        "--dir",
    ])
    .arg(dir)
    .args(extra)
    .env("RUST_LOG", "warn");
    let mut guard = ChildGuard::spawn(cmd);
    let start = Instant::now();
    while !guard.output().contains("Stop with Ctrl-C") {
        if let Ok(Some(status)) = guard.child.try_wait() {
            panic!("sandbox exited early ({status}):\n{}", guard.output());
        }
        assert!(
            start.elapsed() < up_within,
            "sandbox not up:\n{}",
            guard.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    guard
}

/// The fastest of three authenticated requests to each simulator the sandbox in `dir`
/// started: (OpenAI Admin API, Vault, Kubernetes).
async fn probe_simulators(dir: &Path) -> (Duration, Duration, Duration) {
    let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let config = Config::parse(&text, "sandbox config").unwrap();
    let admin = std::fs::read_to_string(dir.join("openai-admin-key")).unwrap();
    let token = std::fs::read_to_string(dir.join("vault-token")).unwrap();
    let kubeconfig = std::fs::read_to_string(dir.join("kubeconfig")).unwrap();
    let kube_url = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("server in kubeconfig")
        .to_string();
    let http = reqwest::Client::new();
    let openai = crate::sim_faults::fastest(3, || async {
        let r = http
            .get(format!("{}/organization/projects", config.openai.base_url))
            .bearer_auth(admin.trim())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    })
    .await;
    let vault = crate::sim_faults::fastest(3, || async {
        let r = http
            .get(format!(
                "{}/v1/auth/token/lookup-self",
                config.vault.address
            ))
            .header("X-Vault-Token", token.trim())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    })
    .await;
    let kube = crate::sim_faults::fastest(3, || async {
        let r = http
            .get(format!(
                "{kube_url}/apis/apps/v1/namespaces/demo/deployments"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    })
    .await;
    (openai, vault, kube)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_latency_flag_slows_all_three_simulators() {
    let dir = tempfile::tempdir().unwrap();
    let ms = crate::sim_faults::LATENCY.as_millis().to_string();
    let guard = spawn_sandbox(
        dir.path(),
        &["--latency-ms", &ms, "--targets", "3", "--projects", "2"],
        Duration::from_secs(30),
    )
    .await;
    // --targets reaches the scenario (the API test below covers what it seeds).
    assert!(
        guard
            .output()
            .contains("seeded                3 target(s) over 2 project(s)"),
        "{}",
        guard.output()
    );
    let (openai, vault, kube) = probe_simulators(dir.path()).await;
    for (what, t) in [("OpenAI", openai), ("Vault", vault), ("Kubernetes", kube)] {
        assert!(
            t >= crate::sim_faults::LATENCY,
            "{what} answered in {t:?} despite --latency-ms {ms}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_command_writes_working_files_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let bin = BIN;
    let mut guard = spawn_sandbox(dir.path(), &[], Duration::from_secs(30)).await;
    // Negative control for `--latency-ms`: without it every simulator answers quickly.
    let (openai, vault, kube) = probe_simulators(dir.path()).await;
    for (what, t) in [("OpenAI", openai), ("Vault", vault), ("Kubernetes", kube)] {
        assert!(
            t < crate::sim_faults::LATENCY / 2,
            "{what} took {t:?} without --latency-ms"
        );
    }

    let check = Command::new(bin)
        .arg("check-config")
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).starts_with("OK"));

    let out = kubectl(
        &dir.path().join("kubeconfig"),
        &["get", "deployments", "-o", "name"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(names.contains("deployment.apps/chatbot-api"), "{names}");
    assert!(names.contains("deployment.apps/chatbot-worker"), "{names}");

    // The admin key file works against the simulator it was written for.
    let text = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    let config = Config::parse(&text, "sandbox config").unwrap();
    let admin = std::fs::read_to_string(dir.path().join("openai-admin-key")).unwrap();
    let resp = reqwest::Client::new()
        .get(format!("{}/organization/projects", config.openai.base_url))
        .bearer_auth(admin.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Key and token files are private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("openai-admin-key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "admin key file mode {mode:o}");
    }
    // The admin key never appears in what the command printed.
    assert!(!guard.output().contains(admin.trim()));

    let pid = guard.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = guard.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}:\n{}", guard.output());
    assert!(guard.output().contains("stopping: consumers made"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_seeds_fifty_generated_targets_with_live_keys_and_workloads() {
    use openai_key_rotator::vault::meta;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let sb = Sandbox::start(SandboxOptions {
        target_count: Some(50),
        consumer_interval: Duration::from_millis(500),
        ..SandboxOptions::for_tests(dir.path())
    })
    .await
    .unwrap();
    eprintln!("seeded 50 targets in {:?}", started.elapsed());

    // The written config is one the daemon accepts, and `check-config` agrees.
    let text = std::fs::read_to_string(&sb.config_path).unwrap();
    let config = Config::parse(&text, "sandbox config").unwrap();
    assert_eq!(config.targets.len(), 50);
    let check = Command::new(BIN)
        .arg("check-config")
        .arg(&sb.config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && stdout.contains("(50 targets)"),
        "{stdout}"
    );

    // Spread over a few projects, each one the OpenAI simulator knows.
    let projects: std::collections::BTreeSet<&str> = config
        .targets
        .iter()
        .map(|t| t.project_id.as_str())
        .collect();
    assert!(projects.len() >= 2, "{projects:?}");
    assert_eq!(projects.len(), sb.project_ids.len());

    let vault = sb.vault.as_ref().unwrap();
    let mut paths = std::collections::BTreeSet::new();
    for t in &config.targets {
        assert!(
            paths.insert(t.vault_path.clone()),
            "shared path {}",
            t.vault_path
        );
        // Its key is live, and the metadata names the account that owns it.
        let (_, data) = vault.read_raw(&t.vault_path).expect("key in vault");
        let key = data[&t.vault_field].as_str().unwrap();
        assert!(sb.openai.key_is_live(key), "{}: key not live", t.name);
        let m = vault_metadata(&sb, &t.vault_path).await;
        let custom = &m["data"]["custom_metadata"];
        let account = custom[meta::SERVICE_ACCOUNT_ID].as_str().unwrap();
        let live = sb.openai.service_accounts(&t.project_id);
        let owner = live
            .iter()
            .find(|a| a.id == account)
            .expect("owner in project");
        assert_eq!(custom[meta::KEY_ID].as_str(), owner.key_id.as_deref());
        assert_eq!(custom[meta::ROTATION_ID], "seed");
        // Its workload exists in the Kubernetes simulator.
        assert_eq!(t.workloads.len(), 1);
        let w = &t.workloads[0];
        assert!(sb.kube.deployment(&w.namespace, &w.name).is_some(), "{w}");
    }
    assert!(sb.wait_ready(Duration::from_secs(60)).await, "rollouts");
    wait_for("a consumer per target", Duration::from_secs(30), || {
        sb.consumers.total().pods_started == 50 && sb.consumers.running_pods() == 50
    })
    .await;

    // Negative control for the liveness check: retire one target's account and its key
    // is no longer live.
    let t = &config.targets[7];
    let (_, data) = vault.read_raw(&t.vault_path).unwrap();
    let key = data[&t.vault_field].as_str().unwrap().to_string();
    let m = vault_metadata(&sb, &t.vault_path).await;
    let account = m["data"]["custom_metadata"][meta::SERVICE_ACCOUNT_ID]
        .as_str()
        .unwrap()
        .to_string();
    let resp = reqwest::Client::new()
        .delete(format!(
            "{}/organization/projects/{}/service_accounts/{account}",
            sb.openai_url, t.project_id
        ))
        .bearer_auth(sb.admin_key.expose())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert!(!sb.openai.key_is_live(&key));
}

/// Negative control for the generated scenario: without `target_count` the sandbox seeds
/// the named targets only.
#[tokio::test]
async fn sandbox_without_a_target_count_seeds_the_named_targets() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(SandboxOptions::for_tests(dir.path()))
        .await
        .unwrap();
    let names: Vec<&str> = sb.config.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["chatbot"]);
    assert_eq!(sb.project_ids, std::slice::from_ref(&sb.project_id));
    assert_eq!(sb.config.targets[0].workloads.len(), 2);
}

async fn vault_metadata(sb: &Sandbox, path: &str) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/secret/metadata/{path}", sb.vault_url))
        .header("X-Vault-Token", sb.vault_token.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}
