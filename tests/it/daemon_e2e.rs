//! The daemon as users run it: the real binary against a real OpenBao and the simulators,
//! driven by the CLI, signals and the API; its metrics parsed by the Prometheus client
//! library's parser; its audit trail verified; and a scan for key values in everything it
//! wrote.

use crate::support::{self, ChildGuard};
use chrono::{Datelike, Utc};
use openai_key_rotator::config::DurationStr;
use openai_key_rotator::rotation::{Journal, RotationRequest, Status, Trigger};
use openai_key_rotator::sandbox::scenario::{Sandbox, SandboxOptions, NAMESPACE};
use openai_key_rotator::secret::Secret;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "daemon-e2e-token-0123456789";
const BIN: &str = env!("CARGO_BIN_EXE_openai-key-rotator");

fn cli(addr: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("OKR_ADDR", addr)
        .env("OKR_TOKEN", TOKEN)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn signal(child: &std::process::Child, sig: &str) {
    assert!(Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

/// Samples of the exposition, parsed by `prometheus_client.parser` (a real parser).
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let script = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new(support::tool("python"))
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "parser: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn wait_for(
    what: &str,
    guard: &ChildGuard,
    timeout: Duration,
    mut f: impl FnMut(&str) -> bool,
) {
    let start = Instant::now();
    loop {
        let out = guard.output();
        if f(&out) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn audit_events(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_under_cli_signals_and_scrapes() {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SandboxOptions::for_tests(dir.path());
    opts.external_vault = Some((bao.addr.clone(), Secret::new(bao.token.clone())));
    opts.schedule = "0 0 0 1 1 *".into(); // only triggered rotations during the test
    let sb = Sandbox::start(opts).await.unwrap();
    assert!(sb.wait_ready(Duration::from_secs(30)).await);
    let mut config = sb.config.clone();
    config.targets[0].grace_period = DurationStr(Duration::from_millis(200));
    config.targets[0].rollout_timeout = DurationStr::from_secs(4);
    let config_path = dir.path().join("daemon.toml");
    let config_text = toml::to_string(&config).unwrap();
    std::fs::write(&config_path, &config_text).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("oncall:{TOKEN}\n")).unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let port = support::free_port();
    let addr = format!("http://127.0.0.1:{port}");

    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"])
        .arg(&config_path)
        .arg("--api-tokens-file")
        .arg(&tokens)
        .arg("--audit-file")
        .arg(&audit_path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env(
            "RUST_LOG",
            "debug,hyper=info,h2=info,tower=info,openai_key_rotator=trace",
        );
    let mut daemon = ChildGuard::spawn(cmd);
    support::wait_http(
        &format!("{addr}/healthz"),
        Duration::from_secs(30),
        &mut daemon,
    )
    .await;
    let http = reqwest::Client::new();
    let start = Instant::now();
    while http
        .get(format!("{addr}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never ready:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 0. Before any rotation: the Vault call series exist for what the daemon did so far
    // (its login), and no Vault write was counted yet.
    let scrape = || async {
        let text = reqwest::get(format!("{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        parse_metrics(&text)
    };
    let vault_total = |m: &BTreeMap<String, f64>| -> f64 {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("openai_key_rotator_api_requests_total{")
                    && k.contains("backend=\"vault\"")
            })
            .map(|(_, v)| v)
            .sum()
    };
    let vault_write = "openai_key_rotator_api_requests_total{backend=\"vault\",operation=\"kv.write\",status_class=\"2xx\"}";
    let before = scrape().await;
    assert_eq!(
        before.get("openai_key_rotator_api_requests_total{backend=\"vault\",operation=\"token.lookup_self\",status_class=\"2xx\"}"),
        Some(&1.0),
        "the startup login is counted: {before:#?}"
    );
    assert_eq!(
        before.get(vault_write),
        None,
        "no Vault write before a rotation"
    );
    let vault_before = vault_total(&before);

    // 1. CLI: a rotation followed to completion, a line per step.
    let (code, out) = cli(
        &addr,
        &["rotate", "chatbot", "--wait", "--reason", "cli test"],
    );
    assert_eq!(code, 0, "{out}");
    for step in [
        "mint", "publish", "sync", "roll", "verify", "drain", "retire",
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains(step)
                    && l.trim_start().starts_with(|c: char| c.is_ascii_digit())),
            "{step} missing:\n{out}"
        );
    }
    assert!(out.contains(": completed"), "{out}");
    let completed_id = out
        .lines()
        .find_map(|l| l.strip_prefix("rotation ")?.split(' ').next())
        .unwrap()
        .to_string();
    // The rotation's Vault calls (journal and key writes, reads) are counted.
    let after = scrape().await;
    let writes = after.get(vault_write).copied().unwrap_or(0.0);
    assert!(
        writes >= 2.0,
        "journal + key writes, got {writes}: {after:#?}"
    );
    assert!(vault_total(&after) > vault_before + writes);

    // 2. CLI: a rollout that never becomes ready → rolled back, non-zero exit.
    sb.kube.set_never_ready(NAMESPACE, "chatbot-worker", true);
    let (code, out) = cli(&addr, &["rotate", "chatbot", "--wait"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(": rolled_back"), "{out}");
    sb.kube.set_never_ready(NAMESPACE, "chatbot-worker", false);
    let (code, out) = cli(&addr, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("chatbot") && out.contains("rolled_back"),
        "{out}"
    );
    // A bad token is refused by the CLI with the server's message.
    let bad = Command::new(BIN)
        .args(["status"])
        .env("OKR_ADDR", &addr)
        .env("OKR_TOKEN", "wrong-token-xxxxxxxxxxxx")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("401"));

    // 3. Metrics after one completed and one rolled-back rotation, exactly.
    let text = http
        .get(format!("{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = parse_metrics(&text);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("{k} missing from:\n{text}"))
    };
    let p = "openai_key_rotator_";
    assert_eq!(
        get(&format!(
            "{p}rotations_total{{outcome=\"completed\",target=\"chatbot\",trigger=\"api\"}}"
        )),
        1.0
    );
    assert_eq!(
        get(&format!(
            "{p}rotations_total{{outcome=\"rolled_back\",target=\"chatbot\",trigger=\"api\"}}"
        )),
        1.0
    );
    assert_eq!(
        get(&format!("{p}rotation_in_progress{{target=\"chatbot\"}}")),
        0.0
    );
    assert_eq!(
        get(&format!(
            "{p}rotation_duration_seconds_count{{target=\"chatbot\"}}"
        )),
        2.0
    );
    assert_eq!(
        get(&format!(
            "{p}old_account_pending_deletion{{target=\"chatbot\"}}"
        )),
        0.0
    );
    assert_eq!(get(&format!("{p}leader{{}}")), 1.0);
    assert_eq!(get(&format!("{p}orphans_swept_total{{}}")), 0.0);
    assert_eq!(
        get(&format!(
            "{p}build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert_eq!(get(&format!("{p}api_requests_total{{backend=\"openai\",operation=\"service_accounts.create\",status_class=\"2xx\"}}")), 2.0);
    let now = chrono::Utc::now().timestamp() as f64;
    let last_success = get(&format!(
        "{p}last_success_timestamp_seconds{{target=\"chatbot\"}}"
    ));
    assert!((now - last_success).abs() < 120.0, "{last_success}");
    let created = get(&format!(
        "{p}key_created_timestamp_seconds{{target=\"chatbot\"}}"
    ));
    assert!(created <= now && now - created < 120.0, "{created}");
    let next_year = chrono::NaiveDate::from_ymd_opt(chrono::Utc::now().year() + 1, 1, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp() as f64;
    assert_eq!(
        get(&format!(
            "{p}next_rotation_timestamp_seconds{{target=\"chatbot\"}}"
        )),
        next_year
    );
    for step in [
        "mint", "publish", "sync", "roll", "verify", "drain", "retire", "rollback",
    ] {
        assert_eq!(
            get(&format!(
                "{p}rotation_step{{step=\"{step}\",target=\"chatbot\"}}"
            )),
            0.0,
            "{step}"
        );
    }
    // Only bounded label values: no ids of accounts, keys, projects or rotations.
    for k in m.keys() {
        let labels = k.split_once('{').map_or("", |(_, l)| l);
        for id in ["svc_acct_", "key_", "proj_", &completed_id[..8]] {
            assert!(!labels.contains(id), "unbounded label value in {k}");
        }
    }

    // 4. The audit trail: the completed rotation's events in order, and the chain verifies.
    let events = audit_events(&audit_path);
    let seq: Vec<String> = events
        .iter()
        .filter(|e| e["rotation_id"] == completed_id.as_str())
        .map(|e| match e["step"].as_str() {
            Some(s) => format!("{} {s}", e["event"].as_str().unwrap()),
            None => e["event"].as_str().unwrap().to_string(),
        })
        .collect();
    let mut expected = vec![
        "rotation_requested".to_string(),
        "rotation_started".to_string(),
    ];
    for s in [
        "mint", "publish", "sync", "roll", "verify", "drain", "retire",
    ] {
        expected.push(format!("step_started {s}"));
        expected.push(format!("step_finished {s}"));
    }
    expected.push("rotation_completed".to_string());
    // The old account's deletion is recorded inside retire; compare the rest exactly.
    let without_deletes: Vec<String> = seq
        .iter()
        .filter(|s| !s.starts_with("account_deleted"))
        .cloned()
        .collect();
    assert_eq!(without_deletes, expected, "audit sequence: {seq:#?}");
    assert!(
        seq.iter().any(|s| s.starts_with("account_deleted")),
        "{seq:#?}"
    );
    let requested = events
        .iter()
        .find(|e| e["rotation_id"] == completed_id.as_str())
        .unwrap();
    assert_eq!(requested["actor"], "oncall");
    assert_eq!(requested["reason"], "cli test");
    let (code, out) = cli(&addr, &["audit", "verify", audit_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");

    // 5. SIGUSR1: an emergency rotation of every target.
    let before = events.len();
    signal(&daemon.child, "USR1");
    wait_for("signal rotation", &daemon, Duration::from_secs(60), |_| {
        audit_events(&audit_path)[before..]
            .iter()
            .any(|e| e["event"] == "rotation_completed" && e["trigger"] == "signal")
    })
    .await;
    let signalled: Vec<serde_json::Value> = audit_events(&audit_path)[before..]
        .iter()
        .filter(|e| e["event"] == "rotation_requested")
        .cloned()
        .collect();
    assert_eq!(signalled.len(), 1, "{signalled:?}");
    assert_eq!(signalled[0]["actor"], "signal");
    assert_eq!(signalled[0]["outcome"], "emergency");

    // 6. SIGHUP with a broken file: rejected, the old config keeps running.
    std::fs::write(
        &config_path,
        config_text.replace("[[targets]]", "[[targets]]\nshedule = \"typo\""),
    )
    .unwrap();
    signal(&daemon.child, "HUP");
    wait_for("reload rejected", &daemon, Duration::from_secs(10), |out| {
        out.contains("new configuration rejected")
    })
    .await;
    assert!(daemon.output().contains("unknown field `shedule`"));
    let (code, out) = cli(&addr, &["status"]);
    assert_eq!(code, 0, "{out}");
    // ...and with a valid one: reloaded (the schedule applies at once).
    std::fs::write(
        &config_path,
        config_text.replace("0 0 0 1 1 *", "0 0 0 2 1 *"),
    )
    .unwrap();
    signal(&daemon.child, "HUP");
    wait_for("reloaded", &daemon, Duration::from_secs(10), |out| {
        out.contains("configuration reloaded")
    })
    .await;
    let reloads: Vec<String> = audit_events(&audit_path)
        .iter()
        .filter(|e| e["event"] == "config_reloaded")
        .map(|e| e["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reloads, ["rejected", "reloaded"]);

    // 7. SIGTERM: exit 0, promptly.
    signal(&daemon.child, "TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = daemon.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no exit:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");

    // 8. Leak scan: no key value minted during the run appears in the daemon's logs, the
    // audit trail, the metrics, the journal, or any CLI output.
    let mut keys = Vec::new();
    let path = &config.targets[0].vault_path;
    for v in 1..=20 {
        let r = http
            .get(format!("{}/v1/secret/data/{path}?version={v}", bao.addr))
            .header("X-Vault-Token", &bao.token)
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            continue;
        }
        let body: serde_json::Value = r.json().await.unwrap();
        keys.extend(
            body.pointer("/data/data/api_key")
                .and_then(|k| k.as_str())
                .map(String::from),
        );
    }
    assert!(
        keys.len() >= 4,
        "seeded + completed + rollback + signal: {}",
        keys.len()
    );
    let logs = daemon.output();
    assert!(logs.contains("step finished"), "logs captured");
    let audit_text = std::fs::read_to_string(&audit_path).unwrap();
    let mut journal = String::new();
    for doc in [
        "targets/chatbot".to_string(),
        format!("rotations/{completed_id}"),
    ] {
        let doc = format!("{}/{doc}", config.daemon.state_prefix);
        let meta: serde_json::Value = http
            .get(format!("{}/v1/secret/metadata/{doc}", bao.addr))
            .header("X-Vault-Token", &bao.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let current = meta
            .pointer("/data/current_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        assert!(current > 0, "{doc} was written");
        // Vault keeps the last max_versions (10 by default) versions; read what is left.
        for v in 1..=current {
            let r = http
                .get(format!("{}/v1/secret/data/{doc}?version={v}", bao.addr))
                .header("X-Vault-Token", &bao.token)
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                journal.push_str(&r.text().await.unwrap());
            }
        }
    }
    assert!(journal.contains(&completed_id));
    for k in &keys {
        for (what, hay) in [
            ("logs", &logs),
            ("audit", &audit_text),
            ("metrics", &text),
            ("journal", &journal),
        ] {
            assert!(!hay.contains(k.as_str()), "a key value is in the {what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_rotation_dry_run_and_sweep_from_the_cli() {
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SandboxOptions::for_tests(dir.path());
    opts.external_vault = Some((bao.addr.clone(), Secret::new(bao.token.clone())));
    let sb = Sandbox::start(opts).await.unwrap();
    assert!(sb.wait_ready(Duration::from_secs(30)).await);
    let mut config = sb.config.clone();
    config.targets[0].grace_period = DurationStr(Duration::from_millis(200));
    config.daemon.sweep_min_age = DurationStr::from_secs(3600);
    let path = dir.path().join("once.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let accounts = || sb.openai.service_accounts(&sb.project_id);
    let seeded = accounts();

    // --dry-run prints the plan and touches nothing.
    let (code, out, err) = run(&["rotate", "chatbot", "--once", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("mint: create service account okr-chatbot-<rotation-id>"),
        "{out}"
    );
    assert!(
        out.contains(&format!("retire: delete service account {}", seeded[0].id)),
        "{out}"
    );
    assert_eq!(accounts(), seeded);

    // --once rotates in-process and exits 0 on completion.
    let (code, out, err) = run(&["rotate", "chatbot", "--once"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(": completed"), "{out}");
    let after = accounts();
    assert_eq!(after.len(), 1);
    assert_ne!(after[0].id, seeded[0].id);

    // sweep: an orphan of ours goes (with a zero safety margin): its account is named by the
    // journal of a rotation that failed after a create whose answer was lost. A look-alike
    // name no journal names, an unmanaged account and the current one stay; with the
    // default margin nothing young is touched.
    let (orphan, _) = sb
        .openai
        .create_service_account(&sb.project_id, "okr-chatbot-20260101000000-abcdef")
        .unwrap();
    let mut failed = RotationRequest::new("chatbot", Trigger::Cli, "cli", "crashed", Utc::now());
    failed.rotation_id = "20260101000000-abcdef".into();
    let mut failed = Journal::queued(&failed, "okr");
    failed.status = Status::Failed;
    bao.put_json(
        &format!(
            "{}/rotations/20260101000000-abcdef",
            config.daemon.state_prefix
        ),
        &serde_json::json!({ "doc": failed }),
    )
    .await;
    let (look_alike, _) = sb
        .openai
        .create_service_account(&sb.project_id, "okr-chatbot-20260101000000-fedcba")
        .unwrap();
    let (hand, _) = sb
        .openai
        .create_service_account(&sb.project_id, "made-by-hand")
        .unwrap();
    let (code, out, err) = run(&["sweep"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 deleted"), "{out}");
    let (code, out, err) = run(&["sweep", "--min-age", "0s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("deleted orphaned service account {}", orphan.id)),
        "{out}"
    );
    assert!(out.contains("1 left alone (named like ours"), "{out}");
    let ids: Vec<String> = accounts().into_iter().map(|a| a.id).collect();
    assert!(
        ids.contains(&hand.id)
            && ids.contains(&look_alike.id)
            && ids.contains(&after[0].id)
            && !ids.contains(&orphan.id),
        "{ids:?}"
    );

    // A failing one-shot exits non-zero.
    sb.kube.set_never_ready(NAMESPACE, "chatbot-api", true);
    let mut failing = config.clone();
    failing.targets[0].rollout_timeout = DurationStr::from_secs(2);
    std::fs::write(&path, toml::to_string(&failing).unwrap()).unwrap();
    let (code, out, _) = run(&["rotate", "chatbot", "--once"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(": rolled_back"), "{out}");
}
