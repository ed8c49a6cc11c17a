//! Deployment artifacts against real tools: the Helm chart (helm-python-sdk, kubernetes-validate,
//! yamllint, through tests/chart/check_chart.py) and the daemon's `check-config` on every
//! rendered ConfigMap; the alert rules (promtool check/test, with a mutation that must make
//! the unit tests fail); and a real Prometheus server scraping the real daemon, whose
//! rolled-back rotation must show up as the OpenAIKeyRotationRolledBack alert.

use crate::support::{self, ChildGuard};
use openai_key_rotator::config::DurationStr;
use openai_key_rotator::sandbox::scenario::{Sandbox, SandboxOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "deploy-test-token-0123456789";

fn rules_file() -> PathBuf {
    support::repo_root().join("deploy/prometheus/rules.yaml")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_chart_renders_lints_validates_and_its_config_passes_check_config() {
    let out = tempfile::tempdir().unwrap();
    let (ok, text) = run(Command::new(support::tool("python"))
        .arg(support::repo_root().join("tests/chart/check_chart.py"))
        .arg(out.path()));
    assert!(ok, "check_chart.py failed:\n{text}");
    let summary: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary in:\n{text}"));
    let configs: Vec<&str> = summary["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(configs.len(), 3, "{summary}");
    for config in configs {
        let (ok, text) = run(Command::new(env!("CARGO_BIN_EXE_openai-key-rotator"))
            .arg("check-config")
            .arg(config));
        assert!(ok && text.starts_with("OK"), "{config}: {text}");
    }
    // The daemon really judges the rendered file: a broken copy is refused.
    let broken = out.path().join("broken.toml");
    let good = std::fs::read_to_string(out.path().join("values-all/config.toml")).unwrap();
    std::fs::write(
        &broken,
        good.replacen("max_key_age = \"7d\"", "max_key_age = \"seven days\"", 1),
    )
    .unwrap();
    let (ok, text) = run(Command::new(env!("CARGO_BIN_EXE_openai-key-rotator"))
        .arg("check-config")
        .arg(&broken));
    assert!(!ok && text.contains("max_key_age"), "{text}");
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests_can_fail() {
    let promtool = support::tool("promtool");
    let (ok, text) = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(rules_file()));
    assert!(ok, "promtool check rules:\n{text}");
    let tests = support::repo_root().join("deploy/prometheus/rules.test.yaml");
    let (ok, text) = run(Command::new(&promtool).args(["test", "rules"]).arg(&tests));
    assert!(ok, "promtool test rules:\n{text}");

    // Every alert: severity, summary, description and a runbook section that exists.
    let runbooks = std::fs::read_to_string(support::repo_root().join("docs/runbooks.md")).unwrap();
    let parsed: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(rules_file()).unwrap()).unwrap();
    let mut alerts = 0;
    for rule in parsed["groups"][0]["rules"].as_array().unwrap() {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        alerts += 1;
        assert!(rule["labels"]["severity"].is_string(), "{name}: severity");
        for field in ["summary", "description"] {
            assert!(rule["annotations"][field].is_string(), "{name}: {field}");
        }
        let url = rule["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = name.to_lowercase();
        assert!(
            url.ends_with(&format!("docs/runbooks.md#{anchor}")),
            "{name}: {url}"
        );
        assert!(
            runbooks.contains(&format!("\n## {name}\n")),
            "{name}: no section in docs/runbooks.md"
        );
    }
    assert!(alerts >= 12, "{alerts} alerts");

    // Mutations of the rules must break the unit tests (they pin the thresholds).
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&tests, dir.path().join("rules.test.yaml")).unwrap();
    let rules = std::fs::read_to_string(rules_file()).unwrap();
    for (from, to, alert) in [
        ("> 0.25", "> 0.5", "OpenAIAdminAPIErrors"),
        ("* 0 + 2592000", "* 0 + 2678400", "OpenAIKeyTooOld"),
        ("for: 45m", "for: 15m", "OpenAIKeyRotationStuck"),
        (
            "- time() < 172800",
            "- time() < 86400",
            "OpenAIKeyExpiringSoon",
        ),
        (
            r#"{state="unmanaged"}) > 0"#,
            r#"{state="unmanaged"}) > 2"#,
            "OpenAIKeyUnmanagedKeys",
        ),
    ] {
        assert!(rules.contains(from), "{from}");
        std::fs::write(dir.path().join("rules.yaml"), rules.replacen(from, to, 1)).unwrap();
        let (ok, text) = run(Command::new(&promtool)
            .args(["test", "rules"])
            .arg(dir.path().join("rules.test.yaml")));
        assert!(
            !ok && text.contains(alert),
            "mutating {from:?} did not fail the tests of {alert}:\n{text}"
        );
    }
}

/// A real Prometheus server scraping `target` every second with the shipped rules.
fn start_prometheus(dir: &Path, target: &str) -> (ChildGuard, String) {
    let port = support::free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: openai-key-rotator\n    static_configs:\n      - targets: ['{target}']\n",
            rules = rules_file().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(support::tool("prometheus"));
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ));
    (ChildGuard::spawn(cmd), format!("http://127.0.0.1:{port}"))
}

async fn get_json(http: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    let r = http
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// Poll until `f` yields a value, or panic after `timeout` with the processes' logs.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, logs: &[&ChildGuard], mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            let logs: Vec<String> = logs.iter().map(|g| g.output()).collect();
            panic!("timed out waiting for {what}:\n{}", logs.join("\n-----\n"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn alerts_named(v: &serde_json::Value, name: &str) -> Vec<serde_json::Value> {
    v["data"]["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["labels"]["alertname"] == name)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_fires_the_rollback_alert_for_a_rolled_back_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SandboxOptions::for_tests(dir.path());
    // No scheduled rotation during the test: only the triggered one runs.
    opts.schedule = "0 0 0 1 1 *".into();
    let sb = Sandbox::start(opts).await.unwrap();
    assert!(
        sb.wait_ready(Duration::from_secs(30)).await,
        "seeded rollouts"
    );
    let mut config = sb.config.clone();
    let target = config.targets[0].name.clone();
    config.targets[0].rollout_timeout = DurationStr::from_secs(3);
    // The inventory's metrics exist once it has run: soon, so the rules' metrics can be
    // checked below.
    config.daemon.inventory_interval = DurationStr::from_secs(2);
    let stuck = config.targets[0].workloads[0].clone();
    let config_path = dir.path().join("daemon.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("oncall:{TOKEN}\n")).unwrap();

    let port = support::free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openai-key-rotator"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config_path)
        .arg("--api-tokens-file")
        .arg(&tokens)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--audit-file")
        .arg(dir.path().join("audit.jsonl"))
        .env("RUST_LOG", "info");
    let mut daemon = ChildGuard::spawn(cmd);
    let daemon_url = format!("http://127.0.0.1:{port}");
    support::wait_http(
        &format!("{daemon_url}/healthz"),
        Duration::from_secs(30),
        &mut daemon,
    )
    .await;

    let prom_dir = tempfile::tempdir().unwrap();
    let (mut prom, prom_url) = start_prometheus(prom_dir.path(), &format!("127.0.0.1:{port}"));
    support::wait_http(
        &format!("{prom_url}/-/ready"),
        Duration::from_secs(30),
        &mut prom,
    )
    .await;
    let http = reqwest::Client::new();

    // Prometheus must have seen the counter at 0 before the rollback, or increase() has
    // nothing to compare with.
    let query = format!(
        "{prom_url}/api/v1/query?query=openai_key_rotator_rotations_total%7Boutcome%3D%22rolled_back%22%2Ctarget%3D%22{target}%22%2Ctrigger%3D%22api%22%7D"
    );
    wait_for(
        "Prometheus to scrape the daemon",
        Duration::from_secs(30),
        &[&daemon, &prom],
        || async {
            let v = get_json(&http, &query).await?;
            let r = v["data"]["result"].as_array()?.first()?.clone();
            (r["value"][1] == "0").then_some(())
        },
    )
    .await;
    // Every metric the rules and the dashboard use is one the daemon exports, and every
    // dashboard query parses and evaluates in this Prometheus.
    let started = std::time::Instant::now();
    let exposition = loop {
        let text = reqwest::get(format!("{daemon_url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("# TYPE openai_key_rotator_inventory_keys ") {
            break text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no inventory within 30 s:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dashboard_path = support::repo_root().join("deploy/grafana/dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            queries.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");
    let rules_text = std::fs::read_to_string(rules_file()).unwrap();
    for text in queries
        .iter()
        .map(String::as_str)
        .chain([rules_text.as_str()])
    {
        for (i, _) in text.match_indices("openai_key_rotator_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                exposition.contains(&format!("# TYPE {base} ")),
                "{name} is not exported by the daemon"
            );
        }
    }
    for q in &queries {
        let q = q
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$job", "openai-key-rotator")
            .replace("$target", ".*");
        let r: serde_json::Value = http
            .get(format!("{prom_url}/api/v1/query"))
            .query(&[("query", q.as_str())])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["status"], "success", "{q}: {r}");
    }

    // The rules are loaded and nothing fires yet.
    let rules = get_json(&http, &format!("{prom_url}/api/v1/rules"))
        .await
        .unwrap();
    assert!(
        rules.to_string().contains("OpenAIKeyRotationRolledBack"),
        "{rules}"
    );
    let before = get_json(&http, &format!("{prom_url}/api/v1/alerts"))
        .await
        .unwrap();
    assert!(
        alerts_named(&before, "OpenAIKeyRotationRolledBack").is_empty(),
        "{before}"
    );

    // A rollout that never becomes ready: verify times out after 3s and the rotation rolls
    // back.
    sb.kube.set_never_ready(&stuck.namespace, &stuck.name, true);
    let r = http
        .post(format!("{daemon_url}/v1/targets/{target}/rotations"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"reason": "alert e2e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["rotation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let status = wait_for(
        "the rotation to finish",
        Duration::from_secs(60),
        &[&daemon],
        || async {
            let r = http
                .get(format!("{daemon_url}/v1/rotations/{id}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?;
            let j: serde_json::Value = r.json().await.ok()?;
            let s = j["status"].as_str()?.to_string();
            (s != "running" && s != "rolling_back").then_some(s)
        },
    )
    .await;
    assert_eq!(status, "rolled_back");

    let alert = wait_for(
        "OpenAIKeyRotationRolledBack to go pending or firing",
        Duration::from_secs(60),
        &[&daemon, &prom],
        || async {
            let v = get_json(&http, &format!("{prom_url}/api/v1/alerts")).await?;
            alerts_named(&v, "OpenAIKeyRotationRolledBack")
                .into_iter()
                .find(|a| a["state"] == "firing" || a["state"] == "pending")
        },
    )
    .await;
    assert_eq!(alert["labels"]["target"], target.as_str(), "{alert}");
    assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
    assert!(
        alert["annotations"]["runbook_url"]
            .as_str()
            .unwrap()
            .ends_with("docs/runbooks.md#openaikeyrotationrolledback"),
        "{alert}"
    );
    // Only the rollback alert: the rotation did not fail and the daemon is up.
    let all = get_json(&http, &format!("{prom_url}/api/v1/alerts"))
        .await
        .unwrap();
    for quiet in ["OpenAIKeyRotationFailed", "OpenAIKeyRotatorDown"] {
        assert!(alerts_named(&all, quiet).is_empty(), "{quiet}: {all}");
    }
}
