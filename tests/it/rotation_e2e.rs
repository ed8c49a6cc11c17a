//! Rotations end to end with the real clients: a real OpenBao, the OpenAI and Kubernetes
//! simulators, consumer pods measuring availability. Each test asserts the invariants:
//! I1 (Vault serves a live key, sampled continuously), I2 (the old account dies only after
//! every workload verified the new rollout), I3 (no orphaned account), I4 (no key value in
//! logs, audit, metrics, journal or errors).

use crate::support::{self, Bao};
use openai_key_rotator::app::{self, Services};
use openai_key_rotator::audit::{self, Audit, VerifyOutcome};
use openai_key_rotator::config::{
    Config, DrainConfig, DrainTimeout, DurationStr, SmokeProbe, SyncedSecret, Target, WorkloadKind,
    WorkloadRef,
};
use openai_key_rotator::retry::RetryPolicy;
use openai_key_rotator::rotation::{
    EngineError, EngineOptions, Journal, Observer, RotationControl, RotationEvent, RotationRequest,
    Status, Step, Trigger,
};
use openai_key_rotator::sandbox::consumers::{ConsumerSpec, KeySource};
use openai_key_rotator::sandbox::kube::{rollout_status, RolloutStatus};
use openai_key_rotator::sandbox::openai::Faults;
use openai_key_rotator::sandbox::scenario::{
    consumer_deployment, Sandbox, SandboxOptions, NAMESPACE,
};
use openai_key_rotator::secret::Secret;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Every log line of this test binary, at debug (trace for our crate): the leak scan reads it.
fn captured_logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        #[derive(Clone, Copy)]
        struct W(&'static Mutex<Vec<u8>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let w = W(buf);
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,openai_key_rotator=trace,hyper=info,h2=info,tower=info")
            .with_writer(move || w)
            .with_ansi(false)
            .try_init();
        buf
    })
}

/// Samples I1 every 20 ms: Vault's current key answers the OpenAI data plane.
struct I1Sampler {
    violations: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl I1Sampler {
    fn start(env: &Env) -> I1Sampler {
        let violations = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (v, s) = (violations.clone(), stop.clone());
        let (addr, token) = (env.bao.addr.clone(), env.bao.token.clone());
        let paths: Vec<String> = env
            .config
            .targets
            .iter()
            .map(|t| t.vault_path.clone())
            .collect();
        let sim = env.sb.openai.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !s.is_cancelled() {
                for p in &paths {
                    if let Some(bad) = support::i1_violation(&http, &addr, &token, p, &sim).await {
                        v.lock().unwrap().push(bad);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        I1Sampler { violations, stop }
    }

    fn finish(self) -> Vec<String> {
        self.stop.cancel();
        self.violations.lock().unwrap().clone()
    }
}

/// Checks I2 when an old account is deleted: every workload's Deployment carries the
/// rotation id, its rollout is complete by kubectl's rule, and every ready pod runs it.
struct I2Checker {
    kube: openai_key_rotator::sandbox::kube::KubeSim,
    targets: Vec<Target>,
    violations: Mutex<Vec<String>>,
    old_deleted: Mutex<Vec<String>>,
}

impl Observer for I2Checker {
    fn on_event(&self, j: &Journal, event: &RotationEvent) {
        let RotationEvent::AccountDeleted { account_id, why } = event else {
            return;
        };
        if j.old_account.as_ref().map(|a| &a.id) != Some(account_id) || *why == "revoke_first" {
            return;
        }
        self.old_deleted.lock().unwrap().push(account_id.clone());
        let Some(t) = self.targets.iter().find(|t| t.name == j.target) else {
            return;
        };
        for w in &t.workloads {
            if w.kind == WorkloadKind::Rollout {
                self.check_rollout(j, account_id, w);
                continue;
            }
            let d = self
                .kube
                .deployment(&w.namespace, &w.name)
                .expect("deployment");
            let ann = d
                .spec
                .as_ref()
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get("openai-key-rotator/rotation-id"))
                .cloned();
            let mut problems = Vec::new();
            if ann.as_deref() != Some(j.rollout_id()) {
                problems.push(format!("template carries {ann:?}"));
            }
            if rollout_status(&d) != RolloutStatus::Complete {
                problems.push(format!("rollout {:?}", rollout_status(&d)));
            }
            for p in self.kube.pods(&w.namespace, &format!("app={}", w.name)) {
                let ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let terminating = p.metadata.deletion_timestamp.is_some();
                let pod_id = p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("openai-key-rotator/rotation-id"))
                    .cloned();
                if ready && !terminating && pod_id.as_deref() != Some(j.rollout_id()) {
                    problems.push(format!("ready pod {:?} runs {pod_id:?}", p.metadata.name));
                }
            }
            if !problems.is_empty() {
                self.violations.lock().unwrap().push(format!(
                    "I2: {account_id} deleted while {w}: {}",
                    problems.join(", ")
                ));
            }
        }
    }
}

impl I2Checker {
    /// I2 for an Argo Rollout: it carries the rotation id, Argo's status says done
    /// (Healthy, the restart recorded), and every ready pod was created at or after the
    /// restart's restartAt.
    fn check_rollout(&self, j: &Journal, account_id: &str, w: &WorkloadRef) {
        let ro = self.kube.rollout(&w.namespace, &w.name).expect("rollout");
        let ann = |k: &str| ro["metadata"]["annotations"][k].as_str().map(String::from);
        let mut problems = Vec::new();
        if ann("openai-key-rotator/rotation-id").as_deref() != Some(j.rotation_id.as_str()) {
            problems.push(format!(
                "Rollout carries {:?}",
                ann("openai-key-rotator/rotation-id")
            ));
        }
        if self
            .kube
            .workload_rollout_status(WorkloadKind::Rollout, &w.namespace, &w.name)
            != Some(RolloutStatus::Complete)
        {
            problems.push(format!("rollout status {:?}", ro["status"]));
        }
        let at = ann("openai-key-rotator/restart-at")
            .and_then(|a| chrono::DateTime::parse_from_rfc3339(&a).ok())
            .map(|t| t.timestamp())
            .unwrap_or(i64::MAX);
        for p in self.kube.pods(&w.namespace, &format!("app={}", w.name)) {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let created = p
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_second());
            if ready && p.metadata.deletion_timestamp.is_none() && created < at {
                problems.push(format!(
                    "ready pod {:?} predates the restart",
                    p.metadata.name
                ));
            }
        }
        if !problems.is_empty() {
            self.violations.lock().unwrap().push(format!(
                "I2: {account_id} deleted while {w}: {}",
                problems.join(", ")
            ));
        }
    }
}

struct Env {
    bao: Bao,
    sb: Sandbox,
    config: Config,
    services: Services,
    i2: Arc<I2Checker>,
    dir: tempfile::TempDir,
    _cancel: CancellationToken,
}

fn engine_opts() -> EngineOptions {
    EngineOptions {
        poll_interval: Duration::from_millis(100),
        drain_poll_interval: Duration::from_millis(250),
        delete_retry: RetryPolicy {
            max_retries: 4,
            base: Duration::from_millis(100),
            max_backoff: Duration::from_millis(800),
            ..RetryPolicy::default()
        },
        ..EngineOptions::default()
    }
}

async fn env_with(tweak: impl FnOnce(&mut Config)) -> Env {
    env_with_opts(tweak, engine_opts()).await
}

async fn env_with_opts(tweak: impl FnOnce(&mut Config), engine: EngineOptions) -> Env {
    captured_logs();
    let bao = support::start_bao().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SandboxOptions::for_tests(dir.path());
    opts.external_vault = Some((bao.addr.clone(), Secret::new(bao.token.clone())));
    let sb = Sandbox::start(opts).await.expect("sandbox");
    assert!(
        sb.wait_ready(Duration::from_secs(30)).await,
        "seeded rollouts"
    );
    let mut config = sb.config.clone();
    for t in &mut config.targets {
        t.grace_period = DurationStr(Duration::from_millis(200));
        t.rollout_timeout = DurationStr(Duration::from_secs(30));
    }
    tweak(&mut config);
    let i2 = Arc::new(I2Checker {
        kube: sb.kube.clone(),
        targets: config.targets.clone(),
        violations: Mutex::default(),
        old_deleted: Mutex::default(),
    });
    let cancel = CancellationToken::new();
    let audit = Audit::open(Some(&dir.path().join("audit.jsonl")), false).unwrap();
    let services = app::connect_with(&config, audit, &cancel, engine, vec![i2.clone()])
        .await
        .expect("connect");
    Env {
        bao,
        sb,
        config,
        services,
        i2,
        dir,
        _cancel: cancel,
    }
}

impl Env {
    fn target(&self) -> Target {
        self.config.targets[0].clone()
    }

    async fn rotate(&self, req: RotationRequest) -> Result<Journal, EngineError> {
        self.rotate_on(&self.target(), req, Arc::default()).await
    }

    /// Rotate `t` as the daemon does: read its journal, then rotate from it.
    async fn rotate_on(
        &self,
        t: &Target,
        req: RotationRequest,
        control: Arc<RotationControl>,
    ) -> Result<Journal, EngineError> {
        let engine = &self.services.engine;
        let prior = engine.journal(&t.name).await?;
        engine.rotate(t, req, prior, control).await
    }

    async fn vault_key(&self, path: &str, version: Option<u64>) -> Option<String> {
        let url = match version {
            Some(v) => format!("{}/v1/secret/data/{path}?version={v}", self.bao.addr),
            None => format!("{}/v1/secret/data/{path}", self.bao.addr),
        };
        let body: serde_json::Value = reqwest::Client::new()
            .get(url)
            .header("X-Vault-Token", &self.bao.token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        body.pointer("/data/data/api_key")?
            .as_str()
            .map(String::from)
    }

    async fn vault_version(&self, path: &str) -> u64 {
        let body: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/v1/secret/metadata/{path}", self.bao.addr))
            .header("X-Vault-Token", &self.bao.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body.pointer("/data/current_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    }

    /// Every key value ever published to the targets' paths (all Vault versions).
    async fn all_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for t in &self.config.targets {
            for v in 1..=self.vault_version(&t.vault_path).await {
                keys.extend(self.vault_key(&t.vault_path, Some(v)).await);
            }
        }
        keys
    }

    /// Every version of every journal document, as text.
    async fn journal_text(&self) -> String {
        let http = reqwest::Client::new();
        let mut out = String::new();
        let mut stack = vec![self.config.daemon.state_prefix.clone()];
        while let Some(prefix) = stack.pop() {
            let r = http
                .request(
                    reqwest::Method::from_bytes(b"LIST").unwrap(),
                    format!("{}/v1/secret/metadata/{prefix}", self.bao.addr),
                )
                .header("X-Vault-Token", &self.bao.token)
                .send()
                .await
                .unwrap();
            if !r.status().is_success() {
                continue;
            }
            let body: serde_json::Value = r.json().await.unwrap();
            for k in body
                .pointer("/data/keys")
                .and_then(|k| k.as_array())
                .cloned()
                .unwrap_or_default()
            {
                let k = k.as_str().unwrap();
                let path = format!("{prefix}/{}", k.trim_end_matches('/'));
                if k.ends_with('/') {
                    stack.push(path);
                    continue;
                }
                for v in 1..=self.vault_version(&path).await {
                    let doc = http
                        .get(format!(
                            "{}/v1/secret/data/{path}?version={v}",
                            self.bao.addr
                        ))
                        .header("X-Vault-Token", &self.bao.token)
                        .send()
                        .await
                        .unwrap()
                        .text()
                        .await
                        .unwrap();
                    out.push_str(&doc);
                }
            }
        }
        out
    }

    /// I2 held, no orphans (I3), and no key value anywhere it must not be (I4).
    /// Zero downtime: no consumer call failed.
    fn assert_no_failed_calls(&self) {
        let calls = self.sb.consumers.total();
        assert_eq!(calls.failed, 0, "{calls:?}");
    }

    async fn assert_invariants(&self, errors: &[String]) {
        let v = self.i2.violations.lock().unwrap().clone();
        assert!(v.is_empty(), "{v:#?}");
        // I3: every account left is referenced by Vault's current metadata or a journal.
        let journal = self.journal_text().await;
        assert!(journal.contains("rotation_id"), "the journal was written");
        for a in self.sb.openai.service_accounts(&self.sb.project_id) {
            let current = self
                .services
                .engine
                .journal(&self.target().name)
                .await
                .unwrap();
            let referenced = journal.contains(&a.id)
                || a.name.ends_with("-initial")
                || current.is_some_and(|s| {
                    s.journal
                        .pending_deletions
                        .iter()
                        .any(|p| p.account.id == a.id)
                });
            assert!(referenced, "orphaned account {} ({})", a.id, a.name);
        }
        // I4.
        let keys = self.all_keys().await;
        assert!(!keys.is_empty());
        let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).to_string();
        assert!(logs.contains("step finished"), "logs captured");
        let audit_text = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap();
        let metrics = self.services.metrics.render();
        for k in &keys {
            assert!(!logs.contains(k.as_str()), "a key value is in the logs");
            assert!(
                !audit_text.contains(k.as_str()),
                "a key value is in the audit trail"
            );
            assert!(
                !metrics.contains(k.as_str()),
                "a key value is in the metrics"
            );
            assert!(
                !journal.contains(k.as_str()),
                "a key value is in the journal"
            );
            for e in errors {
                assert!(!e.contains(k.as_str()), "a key value is in an error: {e}");
            }
        }
        assert!(matches!(
            audit::verify(&self.dir.path().join("audit.jsonl")).unwrap(),
            VerifyOutcome::Ok { .. }
        ));
    }
}

fn req() -> RotationRequest {
    RotationRequest::new("chatbot", Trigger::Cli, "test", "e2e", chrono::Utc::now())
}

fn step_outcome(j: &Journal, step: Step) -> String {
    j.steps
        .iter()
        .rev()
        .find(|s| s.step == step)
        .and_then(|s| s.outcome.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_rotation_keeps_every_invariant() {
    let env = env_with(|_| {}).await;
    let t = env.target();
    let seeded = env.vault_key(&t.vault_path, None).await.unwrap();
    let old = env.sb.openai.service_accounts(&env.sb.project_id);
    assert_eq!(old.len(), 1);
    let i1 = I1Sampler::start(&env);
    let j = env.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert_eq!(i1.finish(), Vec::<String>::new());
    // The new key is current, live, and belongs to the account the journal names.
    let current = env.vault_key(&t.vault_path, None).await.unwrap();
    assert_ne!(current, seeded);
    assert!(env.sb.openai.key_is_live(&current));
    assert!(!env.sb.openai.key_is_live(&seeded), "old key retired");
    let accounts = env.sb.openai.service_accounts(&env.sb.project_id);
    assert_eq!(accounts.len(), 1);
    assert_eq!(Some(&accounts[0].id), j.new_account.as_ref().map(|a| &a.id));
    assert_eq!(accounts[0].name, j.new_account_name);
    assert_eq!(*env.i2.old_deleted.lock().unwrap(), vec![old[0].id.clone()]);
    // Consumers never saw a failure, and the new pods use the new key.
    let stats = env.sb.consumers.total();
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert!(
        env.sb
            .openai
            .requests_served(j.new_account.as_ref().unwrap().key_id.as_str())
            > 0
    );
    // Kubernetes Events on both workloads.
    let events = env.sb.kube.events(NAMESPACE);
    for w in &t.workloads {
        for reason in ["RotationStarted", "RotationCompleted"] {
            assert!(
                events.iter().any(|e| e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                        == Some(w.name.as_str())),
                "{reason} on {w}"
            );
        }
    }
    env.assert_invariants(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_never_becomes_ready_rolls_back() {
    let env =
        env_with(|c| c.targets[0].rollout_timeout = DurationStr(Duration::from_secs(3))).await;
    let t = env.target();
    let seeded = env.vault_key(&t.vault_path, None).await.unwrap();
    env.sb
        .kube
        .set_never_ready(NAMESPACE, &t.workloads[1].name, true);
    let i1 = I1Sampler::start(&env);
    let j = env.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    assert_eq!(i1.finish(), Vec::<String>::new());
    assert!(
        j.error.as_deref().unwrap().contains(&t.workloads[1].name),
        "{:?}",
        j.error
    );
    // The old key is current again and live; the new account is gone.
    assert_eq!(env.vault_key(&t.vault_path, None).await.unwrap(), seeded);
    assert!(env.sb.openai.key_is_live(&seeded));
    assert_eq!(env.sb.openai.service_accounts(&env.sb.project_id).len(), 1);
    // No ready pod ever failed: only pods of the never-ready template (which never served)
    // saw the new key die.
    let stats = env.sb.consumers.total();
    let bad_rs: Vec<String> = env
        .sb
        .kube
        .replica_sets(NAMESPACE, &format!("app={}", t.workloads[1].name))
        .into_iter()
        .filter(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .and_then(|t| t.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get("openai-key-rotator/rotation-id"))
                == Some(&j.rotation_id)
        })
        .filter_map(|rs| rs.metadata.name)
        .collect();
    for (pod, n) in &stats.failures_by_pod {
        assert!(
            bad_rs.iter().any(|rs| pod.starts_with(rs.as_str())),
            "ready pod {pod} failed {n} calls: {stats:?}"
        );
    }
    env.assert_invariants(&[j.error.clone().unwrap()]).await;
}

async fn probe_server(status: u16) -> String {
    let app = axum::Router::new().route(
        "/healthz",
        axum::routing::get(
            move || async move { axum::http::StatusCode::from_u16(status).unwrap() },
        ),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/healthz", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_smoke_probe_rolls_back() {
    let url = probe_server(503).await;
    let env = env_with(|c| {
        c.targets[0].rollout_timeout = DurationStr(Duration::from_secs(4));
        c.targets[0].smoke_probes = vec![SmokeProbe {
            url: url.clone(),
            expect_status: 200,
            consecutive_successes: 2,
            interval: DurationStr(Duration::from_millis(100)),
            timeout: DurationStr(Duration::from_secs(1)),
            wave: None,
        }];
    })
    .await;
    let seeded = env.vault_key(&env.target().vault_path, None).await.unwrap();
    let i1 = I1Sampler::start(&env);
    let j = env.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    assert!(
        j.error.as_deref().unwrap().contains("HTTP 503"),
        "{:?}",
        j.error
    );
    assert_eq!(i1.finish(), Vec::<String>::new());
    assert_eq!(
        env.vault_key(&env.target().vault_path, None).await.unwrap(),
        seeded
    );
    assert!(env.sb.openai.key_is_live(&seeded));
    // Every pod that took the new key was rolled back before its account died.
    assert_eq!(
        env.sb.consumers.total().failed,
        0,
        "{:?}",
        env.sb.consumers.total()
    );
    env.assert_invariants(&[j.error.clone().unwrap()]).await;

    // Control: the same rotation with a passing probe completes.
    let ok = probe_server(200).await;
    let mut t = env.target();
    t.smoke_probes[0].url = ok;
    let j = env.rotate_on(&t, req(), Arc::default()).await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
}

/// An External-Secrets-like operator for `env`'s first target: copies the Vault key into
/// Secret `chatbot-openai` 1.5 s after it changes (it ignores nudges, like a slow
/// operator), and a third workload that mounts that Secret instead of reading Vault. Returns
/// the target with the Secret and the workload added, and when the operator last synced.
async fn with_lagging_secret(
    env: &Env,
    stop: &CancellationToken,
) -> (Target, Arc<Mutex<Option<chrono::DateTime<chrono::Utc>>>>) {
    let mut t = env.target();
    let secret_name = "chatbot-openai";
    let put = |value: &str| {
        let s = k8s_openapi::api::core::v1::Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(secret_name.into()),
                namespace: Some(NAMESPACE.into()),
                ..Default::default()
            },
            data: Some(
                [(
                    "api_key".to_string(),
                    k8s_openapi::ByteString(value.as_bytes().to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        env.sb.kube.put_secret(s).unwrap();
    };
    put(&env.vault_key(&t.vault_path, None).await.unwrap());
    let (addr, token, path, kube) = (
        env.bao.addr.clone(),
        env.bao.token.clone(),
        t.vault_path.clone(),
        env.sb.kube.clone(),
    );
    let s2 = stop.clone();
    let synced_at = Arc::new(Mutex::new(None::<chrono::DateTime<chrono::Utc>>));
    let synced = synced_at.clone();
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut seen: Option<String> = None;
        while !s2.is_cancelled() {
            let body: serde_json::Value = http
                .get(format!("{addr}/v1/secret/data/{path}"))
                .header("X-Vault-Token", &token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let k = body
                .pointer("/data/data/api_key")
                .and_then(|x| x.as_str())
                .unwrap()
                .to_string();
            if seen.as_ref().is_some_and(|s| *s != k) {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                // Update the data only, as an operator does (annotations stay).
                let mut s = kube.secret(NAMESPACE, "chatbot-openai").unwrap();
                s.data = Some(
                    [(
                        "api_key".to_string(),
                        k8s_openapi::ByteString(k.as_bytes().to_vec()),
                    )]
                    .into(),
                );
                kube.put_secret(s).unwrap();
                *synced.lock().unwrap() = Some(chrono::Utc::now());
            }
            seen = Some(k);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let deploy = "chatbot-mounted";
    env.sb.consumers.add(
        NAMESPACE,
        deploy,
        ConsumerSpec {
            source: KeySource::Secret {
                name: secret_name.into(),
                key: "api_key".into(),
            },
            openai_base_url: env.sb.openai_url.clone(),
            interval: Duration::from_millis(50),
        },
    );
    env.sb
        .kube
        .create_deployment(consumer_deployment(deploy, 2, &t.vault_path))
        .unwrap();
    assert!(
        env.sb
            .kube
            .wait_rollout_complete(NAMESPACE, deploy, Duration::from_secs(20))
            .await
    );
    t.workloads
        .push(format!("{NAMESPACE}/Deployment/{deploy}").parse().unwrap());
    t.synced_secret = Some(SyncedSecret {
        namespace: NAMESPACE.into(),
        name: secret_name.into(),
        key: "api_key".into(),
        force_sync_annotation: Some("force-sync".into()),
        timeout: DurationStr(Duration::from_secs(20)),
    });
    (t, synced_at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_synced_secret_is_waited_for() {
    let env = env_with(|_| {}).await;
    let stop = CancellationToken::new();
    let (t, synced_at) = with_lagging_secret(&env, &stop).await;
    let j = env.rotate_on(&t, req(), Arc::default()).await.unwrap();
    stop.cancel();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    let sync = j.steps.iter().find(|s| s.step == Step::Sync).unwrap();
    let roll = j.steps.iter().find(|s| s.step == Step::Roll).unwrap();
    let waited = sync.finished_at.unwrap() - sync.started_at;
    assert!(
        waited >= chrono::Duration::milliseconds(1300),
        "sync waited {waited}"
    );
    assert!(
        roll.started_at >= synced_at.lock().unwrap().expect("synced"),
        "rolled only after the Secret held the new key"
    );
    // The nudge annotation was set on the Secret.
    let s = env.sb.kube.secret(NAMESPACE, "chatbot-openai").unwrap();
    assert!(s
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key("force-sync"));
    let stats = env.sb.consumers.stats(NAMESPACE, "chatbot-mounted");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(env.sb.consumers.total().failed, 0);
}

/// Outage scenario 3, end to end: a rollback with a lagging synced Secret. Pods that
/// restarted before the Secret held the old key again would run the new key, whose account
/// the rollback then deleted: every call of theirs would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_waits_for_the_synced_secret_and_no_call_fails() {
    let env = env_with(|_| {}).await;
    let stop = CancellationToken::new();
    let (mut t, synced_at) = with_lagging_secret(&env, &stop).await;
    let seeded = env.vault_key(&t.vault_path, None).await.unwrap();
    t.smoke_probes = vec![SmokeProbe {
        url: probe_server(503).await,
        expect_status: 200,
        consecutive_successes: 1,
        interval: DurationStr(Duration::from_millis(100)),
        timeout: DurationStr(Duration::from_secs(1)),
        wave: None,
    }];
    t.rollout_timeout = DurationStr(Duration::from_secs(20));
    let j = env.rotate_on(&t, req(), Arc::default()).await.unwrap();
    // Let pods settle on what the rollback left and keep calling a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    assert_eq!(env.vault_key(&t.vault_path, None).await.unwrap(), seeded);
    let rollback = j.steps.iter().find(|s| s.step == Step::Rollback).unwrap();
    assert!(
        rollback.finished_at.unwrap() >= synced_at.lock().unwrap().expect("synced back"),
        "the rollback finished before the Secret held the old key again"
    );
    let stats = env.sb.consumers.stats(NAMESPACE, "chatbot-mounted");
    assert_eq!(
        stats.failed, 0,
        "pods on the Secret lost their key: {stats:?}"
    );
    assert_eq!(env.sb.consumers.total().failed, 0);
    env.assert_invariants(&[]).await;
}

/// Outage scenario 6, end to end: the publish write times out and lands late, after the
/// store's read-back saw the old version and its re-send met the check-and-set conflict.
/// Taking that conflict for "nothing published" deleted the new account while Vault served
/// its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_lands_late_is_not_taken_for_unpublished() {
    let proxy = support::LateWriteProxy::start().await;
    let env = env_with(|c| {
        proxy.aim(&c.vault.address, &c.targets[0].vault_path);
        c.vault.address = proxy.url.clone();
        c.vault.request_timeout = DurationStr(Duration::from_secs(1));
    })
    .await;
    let t = env.target();
    let j = env.rotate(req()).await;
    assert_eq!(
        proxy
            .delivered_late
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the first write was held and landed late: {j:?}"
    );
    let served = env.vault_key(&t.vault_path, None).await.unwrap();
    assert!(
        env.sb.openai.key_is_live(&served),
        "I1: Vault serves a dead key after the late write ({j:?})"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.sb.consumers.total().failed,
        0,
        "{:?}",
        env.sb.consumers.total()
    );
    let j = j.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    env.assert_invariants(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_while_the_old_key_still_has_traffic() {
    let env = env_with(|c| {
        c.targets[0].drain = Some(DrainConfig {
            quiet_for: DurationStr(Duration::from_secs(2)),
            max_wait: DurationStr(Duration::from_secs(30)),
            on_timeout: DrainTimeout::Keep,
        });
    })
    .await;
    let t = env.target();
    let old_key = env.vault_key(&t.vault_path, None).await.unwrap();
    // A straggler (a cron job, a laptop) keeps using the old key for 3 s after publish.
    let (url, stop) = (
        format!("{}/chat/completions", env.sb.openai_url),
        CancellationToken::new(),
    );
    let s2 = stop.clone();
    let last_use = Arc::new(Mutex::new(Instant::now()));
    let lu = last_use.clone();
    let (addr, token, path) = (
        env.bao.addr.clone(),
        env.bao.token.clone(),
        t.vault_path.clone(),
    );
    let old2 = old_key.clone();
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        // Wait for the publish, then 3 s of traffic.
        loop {
            let body: serde_json::Value = http
                .get(format!("{addr}/v1/secret/data/{path}"))
                .header("X-Vault-Token", &token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if body.pointer("/data/data/api_key").and_then(|x| x.as_str()) != Some(old2.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end && !s2.is_cancelled() {
            let r = http.post(&url).bearer_auth(&old2).json(&serde_json::json!({"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]})).send().await.unwrap();
            assert!(
                r.status().is_success(),
                "the old key must live while it is used: {}",
                r.status()
            );
            *lu.lock().unwrap() = Instant::now();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let j = env.rotate(req()).await.unwrap();
    stop.cancel();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert!(
        step_outcome(&j, Step::Drain).contains("quiet"),
        "{}",
        step_outcome(&j, Step::Drain)
    );
    let drain = j.steps.iter().find(|s| s.step == Step::Drain).unwrap();
    let waited = drain.finished_at.unwrap() - drain.started_at;
    assert!(
        waited >= chrono::Duration::seconds(3),
        "drain waited only {waited}"
    );
    assert!(last_use.lock().unwrap().elapsed() >= Duration::from_millis(1500));
    assert!(!env.sb.openai.key_is_live(&old_key));
    env.assert_invariants(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_cas_conflict_fails_cleanly_and_loses_nothing() {
    let env = env_with(|_| {}).await;
    let t = env.target();
    let seeded = env.vault_key(&t.vault_path, None).await.unwrap();
    // Slow the create down and write to Vault meanwhile, as another writer would.
    env.sb
        .openai
        .set_faults(Faults::latency(Duration::from_millis(800)).only("service_accounts.create"));
    let (addr, token, path) = (
        env.bao.addr.clone(),
        env.bao.token.clone(),
        t.vault_path.clone(),
    );
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = reqwest::Client::new()
            .post(format!("{addr}/v1/secret/data/{path}"))
            .header("X-Vault-Token", &token)
            .json(&serde_json::json!({"data": {"api_key": "written-by-someone-else", "note": "hand edit"}}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    });
    let j = env.rotate(req()).await.unwrap();
    writer.await.unwrap();
    env.sb.openai.clear_faults();
    assert_eq!(j.status, Status::Failed, "{j:#?}");
    let e = j.error.clone().unwrap();
    assert!(e.contains("check-and-set"), "{e}");
    // The other writer's value stands, our new account is gone, the seeded one lives.
    assert_eq!(
        env.vault_key(&t.vault_path, None).await.unwrap(),
        "written-by-someone-else"
    );
    let accounts = env.sb.openai.service_accounts(&env.sb.project_id);
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert!(env.sb.openai.key_is_live(&seeded));
    assert!(!e.contains(&seeded));
    // The target is free again (no stuck journal).
    assert!(
        matches!(env.services.engine.journal(&t.name).await.unwrap(), Some(s) if s.journal.status.is_terminal())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_slows_the_rotation_but_it_succeeds() {
    let env = env_with(|_| {}).await;
    // The org's admin rate limit is shared: another client hammers it during the rotation.
    env.sb.openai.set_faults(Faults::rate_limit(2));
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    let url = format!("{}/organization/projects?limit=1", env.sb.openai_url);
    let admin = env.sb.admin_key.expose().to_string();
    let noisy = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut limited = 0u32;
        while !s2.is_cancelled() {
            if let Ok(r) = http.get(&url).bearer_auth(&admin).send().await {
                limited += u32::from(r.status() == 429);
            }
            // Fast enough to keep the 2/s bucket empty even on a loaded machine (at 150 ms
            // a starved neighbour let the daemon through without a single 429).
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        limited
    });
    let j = env.rotate(req()).await.unwrap();
    stop.cancel();
    assert!(
        noisy.await.unwrap() > 0,
        "the neighbour was rate limited too"
    );
    env.sb.openai.clear_faults();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    let metrics = env.services.metrics.render();
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("openai_key_rotator_{name}{{backend=\"openai\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    // Felt either way: the pacer held calls to the announced limit (no 429 needed), or a
    // 429 got through and was retried.
    let (retries, waits) = (counter("retries_total"), counter("rate_limit_waits_total"));
    assert!(
        retries + waits >= 1.0,
        "the storm was felt: {retries} retries, {waits} pacer waits"
    );
    if retries >= 1.0 {
        assert!(metrics.contains("status_class=\"429\""), "429s counted");
    }
    assert_eq!(
        env.sb.openai.service_accounts(&env.sb.project_id).len(),
        1,
        "no duplicate account from retries"
    );
    assert_eq!(env.sb.consumers.total().failed, 0);
    env.assert_invariants(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_rotations_without_one_failed_call_and_the_negative_control() {
    let env =
        env_with(|c| c.targets[0].grace_period = DurationStr(Duration::from_millis(100))).await;
    let i1 = I1Sampler::start(&env);
    for n in 0..20 {
        let j = env.rotate(req()).await.unwrap();
        assert_eq!(j.status, Status::Completed, "rotation {n}: {j:#?}");
    }
    assert_eq!(i1.finish(), Vec::<String>::new());
    let stats = env.sb.consumers.total();
    assert_eq!(
        stats.failed, 0,
        "zero downtime over 20 rotations: {stats:?}"
    );
    assert!(stats.ok > 500, "consumers were busy: {stats:?}");
    assert_eq!(env.sb.openai.service_accounts(&env.sb.project_id).len(), 1);
    env.assert_invariants(&[]).await;

    // Negative control: retiring before the roll completes (revoke_first does exactly that)
    // is visible as failed calls, so the zero above is a real measurement.
    let mut r = req();
    r.emergency = true;
    r.revoke_first = true;
    let j = env
        .rotate_on(&env.target(), r, Arc::new(RotationControl::default()))
        .await
        .unwrap();
    assert_eq!(j.status, Status::Completed);
    let stats = env.sb.consumers.total();
    assert!(
        stats.failed > 0,
        "retire-before-roll must fail calls: {stats:?}"
    );
    assert!(stats.last_failure.unwrap().contains("401"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulsets_and_daemonsets_rotate_without_a_failed_call() {
    use openai_key_rotator::sandbox::kube::KubeSim;
    let env = env_with(|_| {}).await;
    let mut t = env.target();
    let spec = || ConsumerSpec {
        source: KeySource::Vault {
            addr: env.bao.addr.clone(),
            token: Secret::new(env.bao.token.clone()),
            mount: "secret".into(),
            path: t.vault_path.clone(),
            field: "api_key".into(),
        },
        openai_base_url: env.sb.openai_url.clone(),
        interval: Duration::from_millis(50),
    };
    // Register before the pods start, then create: a 3-replica StatefulSet and a DaemonSet
    // (one pod per simulated node) that read the same key.
    env.sb.consumers.add(NAMESPACE, "chatbot-db", spec());
    env.sb.consumers.add(NAMESPACE, "chatbot-agent", spec());
    env.sb
        .kube
        .create_statefulset(KubeSim::simple_statefulset(NAMESPACE, "chatbot-db", 3))
        .unwrap();
    env.sb
        .kube
        .create_daemonset(KubeSim::simple_daemonset(NAMESPACE, "chatbot-agent"))
        .unwrap();
    for name in ["chatbot-db", "chatbot-agent"] {
        assert!(
            env.sb
                .kube
                .wait_rollout_complete(NAMESPACE, name, Duration::from_secs(30))
                .await,
            "{name}"
        );
    }
    t.workloads.push(
        format!("{NAMESPACE}/StatefulSet/chatbot-db")
            .parse()
            .unwrap(),
    );
    t.workloads.push(
        format!("{NAMESPACE}/DaemonSet/chatbot-agent")
            .parse()
            .unwrap(),
    );
    let before = env.sb.consumers.stats(NAMESPACE, "chatbot-db").pods_started;
    let j = env.rotate_on(&t, req(), Arc::default()).await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    // Every StatefulSet pod was replaced onto the new template, and no call failed anywhere.
    let sts = env.sb.consumers.stats(NAMESPACE, "chatbot-db");
    assert_eq!(sts.pods_started, before + 3, "{sts:?}");
    let live_pods: Vec<_> = env
        .sb
        .kube
        .pods(NAMESPACE, "app=chatbot-db")
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    assert_eq!(live_pods.len(), 3);
    for p in live_pods {
        let id = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("openai-key-rotator/rotation-id"))
            .cloned();
        if p.metadata.deletion_timestamp.is_none() {
            assert_eq!(
                id.as_deref(),
                Some(j.rotation_id.as_str()),
                "{:?}",
                p.metadata.name
            );
        }
    }
    let ds = env.sb.consumers.stats(NAMESPACE, "chatbot-agent");
    assert!(ds.pods_started >= 4 && ds.ok > 0, "{ds:?}");
    assert_eq!(
        env.sb.consumers.total().failed,
        0,
        "{:?}",
        env.sb.consumers.total()
    );
    env.assert_invariants(&[]).await;
}

fn adoption(
    min_requests: u64,
    timeout_secs: u64,
) -> Option<openai_key_rotator::config::AdoptionConfig> {
    Some(openai_key_rotator::config::AdoptionConfig {
        min_requests,
        timeout: DurationStr(Duration::from_secs(timeout_secs)),
    })
}

/// New-key adoption end to end: the consumer pods call the OpenAI simulator with the key
/// they mount, so the Usage API counts the new key once they run on it; the drain starts
/// only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adoption_is_proven_by_the_usage_api_before_the_drain() {
    let env = env_with(|c| {
        c.targets[0].adoption = adoption(3, 30);
    })
    .await;
    let old_key = env.vault_key(&env.target().vault_path, None).await.unwrap();
    let j = env.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert!(j.new_key_adopted.is_some_and(|n| n >= 3), "{j:#?}");
    assert!(
        step_outcome(&j, Step::Drain).starts_with("new key adopted"),
        "{}",
        step_outcome(&j, Step::Drain)
    );
    assert!(!env.sb.openai.key_is_live(&old_key));
    env.assert_no_failed_calls();
    env.assert_invariants(&[]).await;
}

/// Workloads that do not use the new key within the timeout (here: more requests than the
/// consumers can make): the rotation rolls back, Vault serves the old key again, and no
/// consumer call fails on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_not_adopted_in_time_is_rolled_back() {
    let env = env_with(|c| {
        c.targets[0].adoption = adoption(1_000_000, 2);
    })
    .await;
    let t = env.target();
    let old_key = env.vault_key(&t.vault_path, None).await.unwrap();
    let j = env.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    assert!(
        j.error.as_deref().unwrap_or("").contains("do not use it"),
        "{j:#?}"
    );
    let served = env.vault_key(&t.vault_path, None).await.unwrap();
    assert_eq!(served, old_key, "Vault serves the old key again");
    assert!(env.sb.openai.key_is_live(&old_key));
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.assert_no_failed_calls();
    env.assert_invariants(&[]).await;
}

/// The pod-template rotation id of a Deployment in the simulator.
fn template_rotation_id(env: &Env, name: &str) -> Option<String> {
    env.sb
        .kube
        .deployment(NAMESPACE, name)?
        .spec?
        .template
        .metadata?
        .annotations?
        .get("openai-key-rotator/rotation-id")
        .cloned()
}

/// A probe of `url` gating wave `wave`.
fn wave_probe(url: &str, wave: usize) -> SmokeProbe {
    SmokeProbe {
        url: url.to_string(),
        expect_status: 200,
        consecutive_successes: 1,
        interval: DurationStr(Duration::from_millis(100)),
        timeout: DurationStr(Duration::from_secs(1)),
        wave: Some(wave),
    }
}

/// Staged waves end to end: the api Deployment is wave 1, the worker wave 2; wave 2 starts
/// only once wave 1's rollout is complete and its probe passes, and no consumer call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_roll_in_order_against_the_simulators() {
    let url = probe_server(200).await;
    let env = env_with(|c| {
        let t = &mut c.targets[0];
        t.waves = t.workloads.iter().map(|w| vec![w.clone()]).collect();
        t.smoke_probes = vec![wave_probe(&url, 1)];
    })
    .await;
    let t = env.target();
    let i1 = I1Sampler::start(&env);
    let j = env.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert_eq!(i1.finish(), Vec::<String>::new());
    assert_eq!(j.waves.len(), 2, "{j:#?}");
    let (w1, w2) = (&j.waves[0], &j.waves[1]);
    assert!(
        w1.verified_at.unwrap() <= w2.rolled_at.unwrap(),
        "wave 2 moved before wave 1 was verified: {j:#?}"
    );
    // Wave 2's new ReplicaSet was created after wave 1 was verified.
    let worker = &t.workloads[1].name;
    let created = replica_sets_of(&env, worker, &[j.rollout_id()])
        .into_iter()
        .filter_map(|rs| rs.metadata.creation_timestamp.map(|t| t.0))
        .min()
        .expect("wave 2's ReplicaSet");
    assert!(
        created.as_second() >= w1.verified_at.unwrap().timestamp(),
        "wave 2's ReplicaSet at {created}, wave 1 verified at {:?}",
        w1.verified_at
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.assert_no_failed_calls();
    env.assert_invariants(&[]).await;
}

/// A failing wave-1 probe rolls wave 1 back and leaves wave 2 untouched (its pod template
/// never carries the rotation id); the old key is served again; no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_wave_leaves_later_waves_untouched_against_the_simulators() {
    let url = probe_server(503).await;
    let env = env_with(|c| {
        let t = &mut c.targets[0];
        t.rollout_timeout = DurationStr(Duration::from_secs(4));
        t.waves = t.workloads.iter().map(|w| vec![w.clone()]).collect();
        t.smoke_probes = vec![wave_probe(&url, 1)];
    })
    .await;
    let t = env.target();
    let seeded = env.vault_key(&t.vault_path, None).await.unwrap();
    let worker_before = template_rotation_id(&env, &t.workloads[1].name);
    let j = env.rotate(req()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    assert!(
        j.error
            .as_deref()
            .unwrap_or("")
            .starts_with("wave 1: smoke probe"),
        "{j:#?}"
    );
    assert_eq!(
        template_rotation_id(&env, &t.workloads[1].name),
        worker_before,
        "wave 2 was touched"
    );
    assert_eq!(
        template_rotation_id(&env, &t.workloads[0].name).as_deref(),
        Some(format!("{}-rollback", j.rotation_id).as_str()),
        "wave 1 was rolled back"
    );
    assert_eq!(env.vault_key(&t.vault_path, None).await.unwrap(), seeded);
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.assert_no_failed_calls();
    env.assert_invariants(&[]).await;
}

// ---------------------------------------------------------------------------------------
// Argo Rollouts

/// Add a 3-replica Rollout `chatbot-canary` whose pods are consumers of the target's key,
/// wait until it is Healthy, and return the target with it added to its workloads.
async fn with_rollout(env: &Env) -> Target {
    use openai_key_rotator::sandbox::kube::KubeSim;
    let mut t = env.target();
    env.sb.consumers.add(
        NAMESPACE,
        "chatbot-canary",
        ConsumerSpec {
            source: KeySource::Vault {
                addr: env.bao.addr.clone(),
                token: Secret::new(env.bao.token.clone()),
                mount: "secret".into(),
                path: t.vault_path.clone(),
                field: "api_key".into(),
            },
            openai_base_url: env.sb.openai_url.clone(),
            interval: Duration::from_millis(50),
        },
    );
    env.sb
        .kube
        .create_rollout(KubeSim::simple_rollout(NAMESPACE, "chatbot-canary", 3))
        .unwrap();
    assert!(
        env.sb
            .kube
            .wait_rollout_complete_for(
                WorkloadKind::Rollout,
                NAMESPACE,
                "chatbot-canary",
                Duration::from_secs(30)
            )
            .await
    );
    // Beside the seeded Deployments, which read the same key.
    t.workloads.push(
        format!("{NAMESPACE}/Rollout/chatbot-canary")
            .parse()
            .unwrap(),
    );
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_target_rotates_end_to_end_without_a_failed_call() {
    let env = env_with(|_| {}).await;
    let t = with_rollout(&env).await;
    let seeded = env.vault_key(&t.vault_path, None).await.unwrap();
    let old = env.sb.openai.service_accounts(&env.sb.project_id);
    let before = env.sb.consumers.stats(NAMESPACE, "chatbot-canary");
    assert_eq!(before.pods_started, 3, "{before:?}");
    let i1 = I1Sampler::start(&env);
    let j = env.rotate_on(&t, req(), Arc::default()).await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert_eq!(i1.finish(), Vec::<String>::new());
    let current = env.vault_key(&t.vault_path, None).await.unwrap();
    assert_ne!(current, seeded);
    assert!(!env.sb.openai.key_is_live(&seeded), "old key retired");
    assert_eq!(*env.i2.old_deleted.lock().unwrap(), vec![old[0].id.clone()]);
    // Restarted through restartAt: the template is unchanged (one ReplicaSet), every pod was
    // replaced, and each new pod came up after restartAt.
    let ro = env.sb.kube.rollout(NAMESPACE, "chatbot-canary").unwrap();
    assert_eq!(
        ro["metadata"]["annotations"]["openai-key-rotator/rotation-id"],
        j.rotation_id.as_str()
    );
    assert_eq!(ro["status"]["restartedAt"], ro["spec"]["restartAt"]);
    assert!(ro["spec"]["template"]["metadata"]
        .get("annotations")
        .is_none());
    assert_eq!(
        env.sb
            .kube
            .replica_sets(NAMESPACE, "app=chatbot-canary")
            .len(),
        1
    );
    let after = env.sb.consumers.stats(NAMESPACE, "chatbot-canary");
    assert_eq!(after.pods_started, 6, "{after:?}");
    assert!(
        env.sb
            .openai
            .requests_served(j.new_account.as_ref().unwrap().key_id.as_str())
            > 0,
        "the restarted pods use the new key"
    );
    // Not one consumer call failed.
    let total = env.sb.consumers.total();
    assert_eq!(total.failed, 0, "{total:?}");
    // Events on the Rollout.
    let events = env.sb.kube.events(NAMESPACE);
    assert!(events
        .iter()
        .any(|e| e.reason.as_deref() == Some("RotationCompleted")
            && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Rollout")));
    env.assert_invariants(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_rollout_rolls_back_and_a_paused_one_is_refused_before_minting() {
    let env = env_with(|_| {}).await;
    let t = with_rollout(&env).await;
    let seeded = env.vault_key(&t.vault_path, None).await.unwrap();

    // Paused (spec.paused): refused before anything is minted or written.
    env.sb
        .kube
        .update_rollout(NAMESPACE, "chatbot-canary", |r| {
            r["spec"]["paused"] = serde_json::json!(true)
        })
        .unwrap();
    let version = env.vault_version(&t.vault_path).await;
    let j = env.rotate_on(&t, req(), Arc::default()).await.unwrap();
    assert_eq!(j.status, Status::Failed, "{j:#?}");
    let err = j.error.clone().unwrap();
    assert!(
        err.contains(&format!("{NAMESPACE}/Rollout/chatbot-canary")) && err.contains("paused"),
        "{err}"
    );
    assert!(j.new_account.is_none() && j.steps.is_empty(), "{j:#?}");
    assert_eq!(env.sb.openai.service_accounts(&env.sb.project_id).len(), 1);
    assert_eq!(env.vault_version(&t.vault_path).await, version);
    assert_eq!(env.vault_key(&t.vault_path, None).await.unwrap(), seeded);
    // Paused by its controller (a canary pause step) too.
    env.sb
        .kube
        .update_rollout(NAMESPACE, "chatbot-canary", |r| {
            r["spec"]["paused"] = serde_json::json!(false)
        })
        .unwrap();
    env.sb
        .kube
        .set_rollout_pause_condition(NAMESPACE, "chatbot-canary", Some("CanaryPauseStep"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.sb.kube.rollout(NAMESPACE, "chatbot-canary").unwrap()["status"]["pauseConditions"]
        .is_null()
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let j = env.rotate_on(&t, req(), Arc::default()).await.unwrap();
    assert_eq!(j.status, Status::Failed, "{j:#?}");
    assert!(j.new_account.is_none());
    assert_eq!(env.sb.openai.service_accounts(&env.sb.project_id).len(), 1);
    env.sb
        .kube
        .set_rollout_pause_condition(NAMESPACE, "chatbot-canary", None);
    assert!(
        env.sb
            .kube
            .wait_rollout_complete_for(
                WorkloadKind::Rollout,
                NAMESPACE,
                "chatbot-canary",
                Duration::from_secs(10)
            )
            .await
    );

    // Degraded: the rotation's restart degrades, the rotation rolls back at once.
    env.sb
        .kube
        .degrade_rollout_restarts(NAMESPACE, "chatbot-canary", 1);
    let i1 = I1Sampler::start(&env);
    let started = Instant::now();
    let j = env.rotate_on(&t, req(), Arc::default()).await.unwrap();
    assert_eq!(j.status, Status::RolledBack, "{j:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "rolled back only at rollout_timeout, not when the Rollout degraded"
    );
    assert_eq!(i1.finish(), Vec::<String>::new());
    let err = j.error.clone().unwrap();
    assert!(
        err.contains("Degraded") && err.contains("chatbot-canary"),
        "{err}"
    );
    // The old key is current again and live; the rollback's restart completed; the new
    // account is gone (no ready pod carries the rotation's restart).
    assert_eq!(env.vault_key(&t.vault_path, None).await.unwrap(), seeded);
    assert!(env.sb.openai.key_is_live(&seeded));
    let ro = env.sb.kube.rollout(NAMESPACE, "chatbot-canary").unwrap();
    assert_eq!(
        ro["metadata"]["annotations"]["openai-key-rotator/rotation-id"],
        format!("{}-rollback", j.rotation_id).as_str()
    );
    assert_eq!(ro["status"]["phase"], "Healthy", "{ro:#}");
    assert_eq!(env.sb.openai.service_accounts(&env.sb.project_id).len(), 1);
    assert!(
        env.i2.old_deleted.lock().unwrap().is_empty(),
        "the old account lives"
    );
    let total = env.sb.consumers.total();
    assert_eq!(total.failed, 0, "{total:?}");
    env.assert_invariants(&[err]).await;
}

// ---------------------------------------------------------------------------------------
// Restart coalescing

/// Three targets whose keys the chatbot Deployments all use (two more keys at their own
/// Vault paths), rotated at once as an emergency of every target would: with a coalescing
/// window the Deployments restart once (one new ReplicaSet each), else once per target.
async fn three_targets_at_once(window: Duration) -> (Env, Vec<Journal>) {
    let env = env_with_opts(
        |c| {
            let base = c.targets[0].clone();
            for n in ["embed", "moderate"] {
                let mut t = base.clone();
                t.name = format!("chatbot-{n}");
                t.vault_path = format!("demo/chatbot-{n}/openai");
                c.targets.push(t);
            }
        },
        EngineOptions {
            coalesce_window: window,
            ..engine_opts()
        },
    )
    .await;
    let targets = env.config.targets.clone();
    let engine = &env.services.engine;
    let reqs: Vec<RotationRequest> = targets
        .iter()
        .map(|t| {
            RotationRequest::new(&t.name, Trigger::Api, "oncall", "leak", chrono::Utc::now())
                .emergency(false)
        })
        .collect();
    // As the daemon does when it accepts the triggers.
    let _interest: Vec<_> = targets
        .iter()
        .zip(&reqs)
        .map(|(t, r)| engine.expect_roll(&r.rotation_id, t))
        .collect();
    let runs = targets
        .iter()
        .zip(reqs)
        .map(|(t, r)| env.rotate_on(t, r, Arc::default()));
    let done: Vec<Journal> = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    (env, done)
}

/// ReplicaSets of `workload` whose template carries one of `ids`.
fn replica_sets_of(
    env: &Env,
    workload: &str,
    ids: &[&str],
) -> Vec<k8s_openapi::api::apps::v1::ReplicaSet> {
    env.sb
        .kube
        .replica_sets(NAMESPACE, &format!("app={workload}"))
        .into_iter()
        .filter(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .and_then(|p| p.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get("openai-key-rotator/rotation-id"))
                .is_some_and(|id| ids.contains(&id.as_str()))
        })
        .collect()
}

fn new_replica_sets(env: &Env, workload: &str, ids: &[&str]) -> usize {
    replica_sets_of(env, workload, ids).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emergency_of_three_targets_restarts_the_shared_deployments_once() {
    let (env, done) = three_targets_at_once(Duration::from_secs(5)).await;
    for j in &done {
        assert_eq!(j.status, Status::Completed, "{j:#?}");
    }
    let ids: Vec<&str> = done.iter().map(|j| j.rollout_id()).collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "one rollout id: {ids:?}"
    );
    for w in &env.target().workloads {
        assert_eq!(
            new_replica_sets(&env, &w.name, &ids),
            1,
            "{w} restarted once"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.assert_no_failed_calls();
    env.assert_invariants(&[]).await;
}

/// Negative control: without coalescing each rotation restarts the Deployments again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_coalescing_the_shared_deployments_restart_once_per_target() {
    let (env, done) = three_targets_at_once(Duration::ZERO).await;
    for j in &done {
        assert_eq!(j.status, Status::Completed, "{j:#?}");
    }
    let ids: Vec<&str> = done.iter().map(|j| j.rollout_id()).collect();
    for w in &env.target().workloads {
        assert_eq!(new_replica_sets(&env, &w.name, &ids), 3, "{w}");
    }
    env.assert_no_failed_calls();
}

// ---------------------------------------------------------------------------------------
// Unlisted consumers

/// A Deployment `reports` in namespace `batch` whose pods the Vault Agent injects the
/// chatbot key into (the target does not list it), or another path's key (`path`).
fn agent_injected_deployment(env: &Env, name: &str, path: &str) -> String {
    use openai_key_rotator::sandbox::kube::KubeSim;
    let mut v = serde_json::to_value(KubeSim::simple_deployment("batch", name, 1)).unwrap();
    v["spec"]["template"]["metadata"]["annotations"] = serde_json::json!({
        "vault.hashicorp.com/agent-inject": "true",
        "vault.hashicorp.com/agent-inject-secret-openai": format!("secret/data/{path}"),
    });
    env.sb
        .kube
        .create_deployment(serde_json::from_value(v).unwrap())
        .unwrap();
    format!("batch/Deployment/{name}")
}

fn deployment_rotation_id(env: &Env, ns: &str, name: &str) -> Option<String> {
    env.sb
        .kube
        .deployment(ns, name)?
        .spec?
        .template
        .metadata?
        .annotations?
        .get("openai-key-rotator/rotation-id")
        .cloned()
}

/// `refuse`: a Deployment the Vault Agent feeds the key to, not in the target, stops the
/// rotation before anything is minted. `include`: it is rolled and verified with the
/// target's workloads. The negative control: a Deployment reading another path is no
/// consumer, and the rotation goes on without touching it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_consumers_found_in_the_cluster_are_refused_or_included() {
    use openai_key_rotator::config::UnlistedConsumers;
    let env = env_with(|_| {}).await;
    let mut t = env.target();
    let reports = agent_injected_deployment(&env, "reports", &t.vault_path);
    let other = agent_injected_deployment(&env, "other", "demo/someone-else/openai");
    // The search reads pods: wait until the controller made them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ["reports", "other"]
        .iter()
        .any(|n| env.sb.kube.pods("batch", &format!("app={n}")).is_empty())
    {
        assert!(
            Instant::now() < deadline,
            "the agent-injected pods never appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seeded = env.vault_key(&t.vault_path, None).await.unwrap();
    let accounts = env.sb.openai.service_accounts(&env.sb.project_id).len();

    t.unlisted_consumers = UnlistedConsumers::Refuse;
    let j = env.rotate_on(&t, req(), Arc::default()).await.unwrap();
    assert_eq!(j.status, Status::Failed, "{j:#?}");
    let e = j.error.clone().unwrap_or_default();
    assert!(
        e.contains("Deployment batch/reports") && e.contains("nothing was minted"),
        "{e}"
    );
    assert!(!e.contains("batch/other"), "{e}");
    assert_eq!(env.vault_key(&t.vault_path, None).await.unwrap(), seeded);
    assert_eq!(
        env.sb.openai.service_accounts(&env.sb.project_id).len(),
        accounts
    );

    t.unlisted_consumers = UnlistedConsumers::Include;
    let j = env.rotate_on(&t, req(), Arc::default()).await.unwrap();
    assert_eq!(j.status, Status::Completed, "{j:#?}");
    assert_eq!(
        deployment_rotation_id(&env, "batch", "reports").as_deref(),
        Some(j.rollout_id()),
        "{reports} rolled with the rotation"
    );
    assert_eq!(
        deployment_rotation_id(&env, "batch", "other"),
        None,
        "{other} untouched"
    );
    env.assert_no_failed_calls();
    env.assert_invariants(&[e]).await;
}
