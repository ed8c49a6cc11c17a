//! A rig for reliability tests of the daemon as it runs: the real binary as a child process
//! against a real OpenBao (through a [`HoldProxy`], so a Vault write can be held) and the
//! OpenAI and Kubernetes simulators, with consumer pods calling the OpenAI data plane
//! continuously. Shared by the crash matrix, the fault matrix and the load tests.

#![allow(dead_code)]

use crate::support::{self, Bao, ChildGuard, HoldProxy};
use openai_key_rotator::config::{Config, DurationStr};
use openai_key_rotator::sandbox::scenario::{Sandbox, SandboxOptions};
use openai_key_rotator::secret::Secret;
use openai_key_rotator::vault::meta;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "reliability-token-0123456789";
pub const BIN: &str = env!("CARGO_BIN_EXE_openai-key-rotator");

pub struct Rig {
    pub bao: Bao,
    pub proxy: HoldProxy,
    pub sb: Sandbox,
    pub config: Config,
    pub config_path: PathBuf,
    pub tokens: PathBuf,
    pub audit: PathBuf,
    pub port: u16,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// A rig whose daemon config `tweak` may change (written before any daemon starts).
    pub async fn start(
        opts_tweak: impl FnOnce(&mut SandboxOptions),
        tweak: impl FnOnce(&mut Config),
    ) -> Rig {
        let bao = support::start_bao().await;
        let proxy = HoldProxy::start(&bao.addr).await;
        let dir = tempfile::tempdir().unwrap();
        let mut opts = SandboxOptions::for_tests(dir.path());
        opts.external_vault = Some((bao.addr.clone(), Secret::new(bao.token.clone())));
        // No schedule firing during a test: only the triggered rotations run.
        opts.schedule = "0 0 0 1 1 *".into();
        opts_tweak(&mut opts);
        let sb = Sandbox::start(opts).await.unwrap();
        assert!(
            tokio::time::timeout(
                Duration::from_secs(120),
                sb.wait_ready(Duration::from_secs(110))
            )
            .await
            .unwrap_or(false),
            "sandbox workloads never became ready"
        );
        let mut config = sb.config.clone();
        // The daemon talks to OpenBao through the proxy; consumers and checks read it directly.
        config.vault.address = proxy.url.clone();
        // No periodic inventory: its key listings would take injected Admin API faults
        // meant for the rotation under test.
        config.daemon.inventory_interval = DurationStr(Duration::ZERO);
        for t in &mut config.targets {
            t.grace_period = DurationStr(Duration::from_millis(300));
            t.rollout_timeout = DurationStr::from_secs(20);
        }
        tweak(&mut config);
        let config_path = dir.path().join("daemon.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, format!("oncall:{TOKEN}\n")).unwrap();
        let audit = dir.path().join("audit.jsonl");
        Rig {
            bao,
            proxy,
            sb,
            config,
            config_path,
            tokens,
            audit,
            port: support::free_port(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            dir,
        }
    }

    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Start the daemon and wait until it answers `/healthz`.
    pub async fn spawn(&self) -> ChildGuard {
        self.spawn_replica(&self.config_path, None, self.port, &self.audit)
            .await
    }

    /// Start a daemon with its own config, port and audit file; `name` is its `POD_NAME`
    /// (its Lease identity), and it advertises its API on 127.0.0.1 for forwarding.
    pub async fn spawn_replica(
        &self,
        config: &std::path::Path,
        name: Option<&str>,
        port: u16,
        audit: &std::path::Path,
    ) -> ChildGuard {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(config)
            .arg("--api-tokens-file")
            .arg(&self.tokens)
            .arg("--audit-file")
            .arg(audit)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info");
        if let Some(name) = name {
            cmd.env("POD_NAME", name).env("POD_IP", "127.0.0.1");
        }
        let mut guard = ChildGuard::spawn(cmd);
        support::wait_http(
            &format!("http://127.0.0.1:{port}/healthz"),
            Duration::from_secs(60),
            &mut guard,
        )
        .await;
        guard
    }

    /// `POST /v1/targets/{target}/rotations`; the rotation id.
    pub async fn trigger(&self, target: &str, body: serde_json::Value) -> String {
        let r = self
            .http
            .post(format!("{}/v1/targets/{target}/rotations", self.addr()))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(status, 202, "trigger {target}: {v}");
        v["rotation_id"].as_str().unwrap().to_string()
    }

    /// [`Rig::trigger`], but a 409 ("already rotating") is retried for up to 5 s: the
    /// rotation's view can read `completed` a moment before its target is free again.
    /// Returns the id and how many 409s were seen.
    pub async fn trigger_when_free(&self, target: &str, body: serde_json::Value) -> (String, u32) {
        let start = Instant::now();
        let mut conflicts = 0;
        loop {
            let r = self
                .http
                .post(format!("{}/v1/targets/{target}/rotations", self.addr()))
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v: serde_json::Value = r.json().await.unwrap();
            if status == 409 && start.elapsed() < Duration::from_secs(5) {
                conflicts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            assert_eq!(status, 202, "trigger {target}: {v}");
            return (v["rotation_id"].as_str().unwrap().to_string(), conflicts);
        }
    }

    /// `GET /v1/rotations/{id}`: (HTTP status, body); a transport error is `None`.
    pub async fn rotation(&self, id: &str) -> Option<(u16, serde_json::Value)> {
        let r = self
            .http
            .get(format!("{}/v1/rotations/{id}", self.addr()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?;
        let s = r.status().as_u16();
        Some((s, r.json().await.unwrap_or(serde_json::Value::Null)))
    }

    /// Wait until rotation `id` is terminal (completed, rolled_back, failed); its view.
    /// `Err` with the last view on timeout.
    pub async fn wait_terminal(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        let start = Instant::now();
        let mut last = String::new();
        loop {
            if let Some((s, v)) = self.rotation(id).await {
                if s == 200
                    && matches!(
                        v["status"].as_str(),
                        Some("completed" | "rolled_back" | "failed")
                    )
                {
                    return Ok(v);
                }
                last = format!("HTTP {s}: {v}");
            }
            if start.elapsed() > timeout {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Vault's current value of `path` (read from OpenBao directly) and the service account
    /// its metadata names. A failed read is an error, never skipped.
    pub async fn served(&self, path: &str) -> Result<(String, Option<String>), String> {
        served(&self.http, &self.bao.addr, &self.bao.token, path).await
    }

    /// Wait until the project holds exactly `n` accounts; the accounts at the end.
    pub async fn wait_accounts(&self, n: usize, timeout: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let ids: Vec<String> = self
                .sb
                .project_ids
                .iter()
                .flat_map(|p| self.sb.openai.service_accounts(p))
                .map(|a| a.id)
                .collect();
            if ids.len() == n || start.elapsed() > timeout {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `sweep --min-age 0s` with the daemon's config: (exit code, output).
    pub async fn sweep(&self) -> (i32, String) {
        let mut cmd = Command::new(BIN);
        cmd.args(["sweep", "--min-age", "0s", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "warn");
        run(cmd).await
    }

    /// `audit verify` of the daemon's audit file: (exit code, output).
    pub async fn audit_verify(&self) -> (i32, String) {
        let mut cmd = Command::new(BIN);
        cmd.args(["audit", "verify"]).arg(&self.audit);
        run(cmd).await
    }

    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    /// Start the I1 sampler over every target's Vault path.
    pub fn i1_sampler(&self) -> I1Sampler {
        I1Sampler::start(
            &self.bao,
            self.config
                .targets
                .iter()
                .map(|t| t.vault_path.clone())
                .collect(),
            self.sb.openai.clone(),
        )
    }
}

async fn run(mut cmd: Command) -> (i32, String) {
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the CLI finished within 60 s")
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

/// Read `secret/<path>` from Vault: the value of `api_key` and the service account id in the
/// custom metadata. Any failure (transport, status, shape) is an error.
pub async fn served(
    http: &reqwest::Client,
    addr: &str,
    token: &str,
    path: &str,
) -> Result<(String, Option<String>), String> {
    let get = |url: String| async move {
        let r = http
            .get(url)
            .header("X-Vault-Token", token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("{path}: {}", e.without_url()))?;
        if !r.status().is_success() {
            return Err(format!("{path}: HTTP {}", r.status()));
        }
        r.json::<serde_json::Value>()
            .await
            .map_err(|e| format!("{path}: body: {e}"))
    };
    let data = get(format!("{addr}/v1/secret/data/{path}")).await?;
    let key = data
        .pointer("/data/data/api_key")
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("{path}: no api_key"))?
        .to_string();
    let md = get(format!("{addr}/v1/secret/metadata/{path}")).await?;
    let sa = md
        .pointer(&format!(
            "/data/custom_metadata/{}",
            meta::SERVICE_ACCOUNT_ID
        ))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    Ok((key, sa))
}

/// Samples I1 every 20 ms: the key Vault serves at each path answers the OpenAI data plane.
/// A failed read is recorded as a violation (never skipped): the sampler cannot pass by
/// not looking.
pub struct I1Sampler {
    violations: Arc<Mutex<Vec<String>>>,
    samples: Arc<Mutex<u64>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl I1Sampler {
    pub fn start(
        bao: &Bao,
        paths: Vec<String>,
        sim: openai_key_rotator::sandbox::openai::OpenAiSim,
    ) -> I1Sampler {
        let violations = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(Mutex::new(0u64));
        let stop = CancellationToken::new();
        let (v, n, s) = (violations.clone(), samples.clone(), stop.clone());
        let (addr, token) = (bao.addr.clone(), bao.token.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !s.is_cancelled() {
                for p in &paths {
                    if let Some(bad) = support::i1_violation(&http, &addr, &token, p, &sim).await {
                        v.lock().unwrap().push(bad);
                    }
                    *n.lock().unwrap() += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        I1Sampler {
            violations,
            samples,
            stop,
            task,
        }
    }

    /// Stop; (samples taken, violations).
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let n = *self.samples.lock().unwrap();
        (n, self.violations.lock().unwrap().clone())
    }

    pub fn violations_so_far(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }
}

/// I2 from the audit trail: a rotation's old account is deleted only after that rotation's
/// verify step finished `ok` (revoke_first excepted). Also: every account a rotation deletes
/// is either its old account after verify, its own new account (rollback) or a pending one.
/// Returns (old-account deletions checked, violations).
pub fn i2_violations(events: &[serde_json::Value]) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut old: HashMap<String, String> = HashMap::new();
    let mut verified: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for e in events {
        let rid = e["rotation_id"].as_str().unwrap_or_default().to_string();
        match e["event"].as_str().unwrap_or_default() {
            "rotation_started" => {
                if let Some(sa) = e["old_service_account_id"].as_str() {
                    old.insert(rid, sa.to_string());
                }
            }
            "step_finished" if e["step"] == "verify" && e["outcome"] == "ok" => {
                verified.insert(rid);
            }
            "account_deleted" => {
                let sa = e["service_account_id"].as_str().unwrap_or_default();
                let is_old = old.get(&rid).map(String::as_str) == Some(sa);
                checked += usize::from(is_old);
                if is_old && !verified.contains(&rid) && e["reason"] != "revoke_first" {
                    out.push(format!(
                        "I2: rotation {rid} deleted its old account {sa} before verify passed (seq {})",
                        e["seq"]
                    ));
                }
            }
            _ => {}
        }
    }
    (checked, out)
}

/// Samples the daemon's `/metrics` every `every`: the number of targets with
/// `openai_key_rotator_rotation_in_progress` = 1. A failed scrape or a missing gauge family
/// is recorded as an error, never skipped.
pub struct InProgressSampler {
    pub max_seen: Arc<Mutex<u64>>,
    pub samples: Arc<Mutex<u64>>,
    pub errors: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl InProgressSampler {
    pub fn start(addr: String, every: Duration) -> InProgressSampler {
        let max_seen = Arc::new(Mutex::new(0));
        let samples = Arc::new(Mutex::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (m, n, e, s) = (
            max_seen.clone(),
            samples.clone(),
            errors.clone(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !s.is_cancelled() {
                let r = http
                    .get(format!("{addr}/metrics"))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                let text = match r {
                    Ok(r) if r.status().is_success() => r.text().await.map_err(|x| x.to_string()),
                    Ok(r) => Err(format!("HTTP {}", r.status())),
                    Err(x) => Err(x.to_string()),
                };
                match text {
                    Ok(t) if t.contains("# TYPE openai_key_rotator_rotation_in_progress gauge") => {
                        let running = t
                            .lines()
                            .filter(|l| l.starts_with("openai_key_rotator_rotation_in_progress{"))
                            .filter(|l| {
                                l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
                                    == Some(1.0)
                            })
                            .count() as u64;
                        let mut mx = m.lock().unwrap();
                        *mx = (*mx).max(running);
                        *n.lock().unwrap() += 1;
                    }
                    Ok(_) => e
                        .lock()
                        .unwrap()
                        .push("scrape without the rotation_in_progress family".into()),
                    Err(x) => e.lock().unwrap().push(format!("scrape failed: {x}")),
                }
                tokio::time::sleep(every).await;
            }
        });
        InProgressSampler {
            max_seen,
            samples,
            errors,
            stop,
            task,
        }
    }

    /// Stop; (samples, max in progress seen, errors).
    pub async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let r = (
            *self.samples.lock().unwrap(),
            *self.max_seen.lock().unwrap(),
            self.errors.lock().unwrap().clone(),
        );
        r
    }
}
