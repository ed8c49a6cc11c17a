//! The seeded sandbox: the three simulators wired together with a project, targets whose
//! current keys live in Vault and belong to live service accounts, and consumer workloads.
//!
//! The `sandbox` command, the demo and the integration tests all start from here, so what a
//! user tries by hand is what the tests exercise.

use super::consumers::{ConsumerSpec, Consumers, KeySource};
use super::kube::{KubeSim, KubeSimOptions};
use super::openai::{FaultScope, Faults, OpenAiSim};
use super::vault::VaultSim;
use super::{loopback, Server};
use crate::config::{
    AuditConfig, Config, CronSchedule, DaemonConfig, DurationStr, KubernetesConfig, OpenAiConfig,
    Target, VaultAuth, VaultConfig, WorkloadRef,
};
use crate::secret::Secret;
use crate::vault::meta;
use k8s_openapi::api::apps::v1::RollingUpdateDeployment;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rand::distr::{Alphanumeric, SampleString};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Fixed ports of the `sandbox` command and the demo (tests use 0 = random).
pub const DEFAULT_OPENAI_PORT: u16 = 18300;
pub const DEFAULT_VAULT_PORT: u16 = 18200;
pub const DEFAULT_KUBE_PORT: u16 = 18100;
/// Namespace of the seeded workloads.
pub const NAMESPACE: &str = "demo";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot listen on 127.0.0.1:{port} for the {what} simulator: {source}")]
    Bind {
        what: &'static str,
        port: u16,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("seeding {what}: {message}")]
    Seed { what: String, message: String },
}

#[derive(Clone, Debug)]
pub struct SandboxOptions {
    pub openai_port: u16,
    pub vault_port: u16,
    pub kube_port: u16,
    /// Folder for the generated files (kubeconfig, config, key and token files).
    pub dir: PathBuf,
    /// Where to write the kubeconfig; default `<dir>/kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// Where to write the daemon config; default `<dir>/config.toml`.
    pub config: Option<PathBuf>,
    /// Cron schedule given to the seeded targets.
    pub schedule: String,
    /// Pause between two data-plane calls of one consumer pod.
    pub consumer_interval: Duration,
    /// Time a new pod takes to become ready.
    pub pod_ready_delay: Duration,
    /// Targets to seed; each gets two consumer Deployments `<name>-api` and `<name>-worker`
    /// (2 replicas each) in namespace [`NAMESPACE`].
    pub targets: Vec<String>,
    /// Instead of `targets`: this many generated targets for scale tests, named
    /// [`generated_target_name`] (`app-00001`, ...), each with its own namespace of that
    /// name holding one consumer Deployment `<name>-api` with 1 replica, its own Vault path
    /// `apps/<name>/openai`, spread over `projects` projects.
    pub target_count: Option<usize>,
    /// With `target_count`: how many projects (default [`default_projects`]).
    pub projects: Option<usize>,
    /// Use this Vault (address, token) instead of the simulator, e.g. a real OpenBao in tests.
    pub external_vault: Option<(String, Secret)>,
    /// Added to every request of all three simulators once seeding is done (the OpenAI
    /// one: Admin API and data plane). Zero = none.
    pub latency: Duration,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            openai_port: DEFAULT_OPENAI_PORT,
            vault_port: DEFAULT_VAULT_PORT,
            kube_port: DEFAULT_KUBE_PORT,
            dir: PathBuf::from("okr-sandbox"),
            kubeconfig: None,
            config: None,
            schedule: "0 */5 * * * *".into(),
            consumer_interval: Duration::from_millis(200),
            pod_ready_delay: Duration::from_millis(500),
            targets: vec!["chatbot".into()],
            external_vault: None,
            latency: Duration::ZERO,
            target_count: None,
            projects: None,
        }
    }
}

impl SandboxOptions {
    /// Random ports and a given folder: what tests want.
    pub fn for_tests(dir: &Path) -> Self {
        SandboxOptions {
            openai_port: 0,
            vault_port: 0,
            kube_port: 0,
            dir: dir.to_path_buf(),
            consumer_interval: Duration::from_millis(50),
            pod_ready_delay: Duration::from_millis(100),
            ..Default::default()
        }
    }
}

/// The name of generated target `i` (1-based): `app-00001`.
pub fn generated_target_name(i: usize) -> String {
    format!("app-{i:05}")
}

/// Projects the generated targets spread over by default: a few (2 to 8, one per 250
/// targets), never more than the targets.
pub fn default_projects(targets: usize) -> usize {
    targets.div_ceil(250).clamp(2, 8).min(targets.max(1))
}

/// A consumer call interval for `targets` generated targets: about 50 data-plane calls a
/// second in all (at least 200 ms per pod), so a large sandbox does not saturate the machine.
pub fn default_consumer_interval(targets: usize) -> Duration {
    Duration::from_millis(200)
        .max(Duration::from_millis(20) * u32::try_from(targets).unwrap_or(u32::MAX))
}

/// A running, seeded sandbox. Dropping it stops every simulator and consumer.
pub struct Sandbox {
    pub openai: OpenAiSim,
    /// The Vault simulator, unless an external Vault was given.
    pub vault: Option<VaultSim>,
    pub kube: KubeSim,
    pub consumers: Consumers,
    /// The first project (the only one unless targets were generated).
    pub project_id: String,
    /// Every seeded project, `project_id` first.
    pub project_ids: Vec<String>,
    pub openai_url: String,
    pub vault_url: String,
    pub kube_url: String,
    pub admin_key: Secret,
    pub vault_token: Secret,
    /// The daemon configuration pointing at the simulators (also written to `config_path`).
    pub config: Config,
    pub config_path: PathBuf,
    pub kubeconfig_path: PathBuf,
    cancel: CancellationToken,
    _servers: Vec<Server>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn random_token(prefix: &str) -> Secret {
    Secret::new(format!(
        "{prefix}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 32)
    ))
}

impl Sandbox {
    pub async fn start(opts: SandboxOptions) -> Result<Sandbox, SandboxError> {
        let cancel = CancellationToken::new();
        let admin_key = random_token("sk-admin-");
        let vault_token = match &opts.external_vault {
            Some((_, token)) => token.clone(),
            None => random_token("hvs."),
        };

        let openai = OpenAiSim::new(admin_key.clone());
        let vault = VaultSim::new(vault_token.clone());
        let kube = KubeSim::new(KubeSimOptions {
            pod_ready_delay: opts.pod_ready_delay,
            // Thousands of workloads: reconcile only what changed (each target has its own
            // namespace), and never hold the store long.
            incremental: opts.target_count.is_some(),
            full_resync: Duration::from_secs(600),
            ..Default::default()
        });
        let bind_err = |what, port| move |source| SandboxError::Bind { what, port, source };
        let openai_srv = openai
            .serve(loopback(opts.openai_port), cancel.child_token())
            .await
            .map_err(bind_err("OpenAI", opts.openai_port))?;
        let mut servers = Vec::new();
        let (vault, vault_url) = match &opts.external_vault {
            Some((addr, _)) => (None, addr.trim_end_matches('/').to_string()),
            None => {
                let srv = vault
                    .serve(loopback(opts.vault_port), cancel.child_token())
                    .await
                    .map_err(bind_err("Vault", opts.vault_port))?;
                let url = srv.url();
                servers.push(srv);
                (Some(vault), url)
            }
        };
        // The controller starts once everything is seeded (see below).
        let kube_srv = kube
            .serve_api(loopback(opts.kube_port), cancel.child_token())
            .await
            .map_err(bind_err("Kubernetes", opts.kube_port))?;
        let consumers = Consumers::start(&kube, cancel.child_token());

        let dir = opts.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| SandboxError::Write {
            path: dir.clone(),
            source,
        })?;
        let kubeconfig_path = opts
            .kubeconfig
            .clone()
            .unwrap_or_else(|| dir.join("kubeconfig"));
        let config_path = opts
            .config
            .clone()
            .unwrap_or_else(|| dir.join("config.toml"));
        let files_dir = config_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.clone());
        let admin_key_file = files_dir.join("openai-admin-key");
        let vault_token_file = files_dir.join("vault-token");

        let project_ids: Vec<String> = match opts.target_count {
            None => vec![openai.create_project("Sandbox project")],
            Some(n) => {
                let p = opts.projects.unwrap_or_else(|| default_projects(n)).max(1);
                (1..=p)
                    .map(|i| openai.create_project(&format!("Sandbox project {i}")))
                    .collect()
            }
        };
        let project_id = project_ids[0].clone();
        let mut sandbox = Sandbox {
            openai_url: format!("{}/v1", openai_srv.url()),
            vault_url,
            kube_url: kube_srv.url(),
            openai,
            vault,
            kube,
            consumers,
            project_id,
            project_ids,
            admin_key,
            vault_token,
            config: Config {
                daemon: DaemonConfig::default(),
                openai: OpenAiConfig::default(),
                vault: VaultConfig {
                    address: String::new(),
                    kv_mount: "secret".into(),
                    ca_cert: None,
                    request_timeout: DurationStr::from_secs(5),
                    auth: VaultAuth::default(),
                    ..VaultConfig::default()
                },
                kubernetes: KubernetesConfig::default(),
                notifications: Default::default(),
                targets: Vec::new(),
            },
            config_path: config_path.clone(),
            kubeconfig_path: kubeconfig_path.clone(),
            cancel,
            _servers: {
                servers.extend([openai_srv, kube_srv]);
                servers
            },
        };

        let http = reqwest::Client::new();
        match opts.target_count {
            None => {
                for name in &opts.targets {
                    let spec = TargetSpec {
                        name,
                        project_id: &sandbox.project_id,
                        namespace: NAMESPACE,
                        vault_path: format!("{NAMESPACE}/{name}/openai"),
                        workloads: &[("api", 2), ("worker", 2)],
                        jitter: DurationStr::default(),
                    };
                    let target = sandbox.seed_target(spec, &opts, &http).await?;
                    sandbox.config.targets.push(target);
                }
            }
            Some(n) => {
                for i in 1..=n {
                    let name = generated_target_name(i);
                    let project_id =
                        sandbox.project_ids[(i - 1) % sandbox.project_ids.len()].clone();
                    let spec = TargetSpec {
                        name: &name,
                        project_id: &project_id,
                        namespace: &name,
                        vault_path: format!("apps/{name}/openai"),
                        workloads: &[("api", 1)],
                        // One schedule for thousands of targets: spread their rotations.
                        jitter: DurationStr::from_secs(240),
                    };
                    let target = sandbox.seed_target(spec, &opts, &http).await?;
                    sandbox.config.targets.push(target);
                }
            }
        }

        let c = &mut sandbox.config;
        c.daemon.listen = loopback(8080);
        c.daemon.audit = AuditConfig {
            file: Some(files_dir.join("audit.jsonl")),
            stdout: false,
        };
        c.daemon.sweep_min_age = DurationStr::from_secs(60);
        c.openai = OpenAiConfig {
            base_url: sandbox.openai_url.clone(),
            admin_key_file: Some(admin_key_file.clone()),
            request_timeout: DurationStr::from_secs(5),
            ..OpenAiConfig::default()
        };
        c.vault.address = sandbox.vault_url.clone();
        c.vault.auth = VaultAuth::Token {
            token_env: "VAULT_TOKEN".into(),
            token_file: Some(vault_token_file.clone()),
        };
        c.kubernetes.kubeconfig = Some(kubeconfig_path.clone());

        write_private(&admin_key_file, sandbox.admin_key.expose())?;
        write_private(&vault_token_file, sandbox.vault_token.expose())?;
        write_private(
            &kubeconfig_path,
            &KubeSim::kubeconfig_yaml(&sandbox.kube_url, Some(NAMESPACE)),
        )?;
        let text = format!(
            "# Written by `openai-key-rotator sandbox`: a daemon configuration pointing at the\n\
             # simulators. Admin key and Vault token are in the files beside it.\n{}",
            toml::to_string(&sandbox.config).map_err(|e| SandboxError::Seed {
                what: "config".into(),
                message: e.to_string(),
            })?
        );
        write_private(&config_path, &text)?;
        // What we wrote must be what the daemon accepts.
        Config::load(&config_path).map_err(|e| SandboxError::Seed {
            what: "config".into(),
            message: e.to_string(),
        })?;
        sandbox.kube.start_controller(sandbox.cancel.child_token());
        // Last, so seeding itself is not slowed down.
        if !opts.latency.is_zero() {
            sandbox
                .openai
                .set_faults(Faults::latency(opts.latency).in_scope(FaultScope::Both));
            if let Some(v) = &sandbox.vault {
                v.set_latency(opts.latency);
            }
            sandbox.kube.set_latency(opts.latency);
        }
        Ok(sandbox)
    }

    /// Seed one target: a live service account whose key is current in Vault (with the
    /// metadata the daemon reads), and consumer Deployments reading it.
    async fn seed_target(
        &self,
        spec: TargetSpec<'_>,
        opts: &SandboxOptions,
        http: &reqwest::Client,
    ) -> Result<Target, SandboxError> {
        let name = spec.name;
        let seed_err = |message: String| SandboxError::Seed {
            what: format!("target {name}"),
            message,
        };
        let vault_path = spec.vault_path;
        let (account, key) = self
            .openai
            .create_service_account(spec.project_id, &format!("{name}-initial"))
            .map_err(|e| seed_err(e.to_string()))?;
        let custom: BTreeMap<String, String> = [
            (meta::SERVICE_ACCOUNT_ID, account.id.clone()),
            (meta::KEY_ID, account.key_id.clone().unwrap_or_default()),
            (meta::ROTATION_ID, "seed".to_string()),
            (
                meta::KEY_CREATED_AT,
                chrono::DateTime::from_timestamp(account.created_at, 0)
                    .unwrap_or_default()
                    .to_rfc3339(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        match &self.vault {
            // In process: thousands of targets seed in moments, to the same state.
            Some(sim) => {
                let mut data = serde_json::Map::new();
                data.insert("api_key".into(), key.expose().into());
                sim.put_raw(&vault_path, data);
                sim.put_custom_metadata_raw(&vault_path, custom);
            }
            None => self
                .seed_external_vault(http, &vault_path, &key, &custom)
                .await
                .map_err(seed_err)?,
        }

        let mut workloads = Vec::new();
        for (suffix, replicas) in spec.workloads {
            let deploy = format!("{name}-{suffix}");
            self.consumers.add(
                spec.namespace,
                &deploy,
                ConsumerSpec {
                    source: KeySource::Vault {
                        addr: self.vault_url.clone(),
                        token: self.vault_token.clone(),
                        mount: "secret".into(),
                        path: vault_path.clone(),
                        field: "api_key".into(),
                    },
                    openai_base_url: self.openai_url.clone(),
                    interval: opts.consumer_interval,
                },
            );
            self.kube
                .create_deployment(consumer_deployment_in(
                    spec.namespace,
                    &deploy,
                    *replicas,
                    &vault_path,
                ))
                .map_err(|e| seed_err(format!("deployment {deploy}: {e}")))?;
            workloads.push(WorkloadRef {
                namespace: spec.namespace.into(),
                kind: crate::config::WorkloadKind::Deployment,
                name: deploy,
            });
        }
        Ok(Target {
            name: name.to_string(),
            project_id: spec.project_id.to_string(),
            vault_path,
            vault_field: "api_key".into(),
            workloads,
            waves: Vec::new(),
            synced_secret: None,
            schedule: Some(opts.schedule.parse::<CronSchedule>().map_err(seed_err)?),
            max_key_age: None,
            jitter: spec.jitter,
            grace_period: DurationStr::from_secs(2),
            drain: None,
            adoption: None,
            unlisted_consumers: Default::default(),
            smoke_probes: Vec::new(),
            rollout_timeout: DurationStr::from_secs(60),
            key_expiry: None,
            anomaly: None,
        })
    }

    /// Write a seeded key and its custom metadata to a real Vault over HTTP.
    async fn seed_external_vault(
        &self,
        http: &reqwest::Client,
        vault_path: &str,
        key: &Secret,
        custom: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let resp = http
            .post(format!("{}/v1/secret/data/{vault_path}", self.vault_url))
            .header("X-Vault-Token", self.vault_token.expose())
            .json(&serde_json::json!({ "data": { "api_key": key.expose() } }))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("vault write: {}", e.without_url()))?;
        if !resp.status().is_success() {
            return Err(format!("vault write: HTTP {}", resp.status()));
        }
        let resp = http
            .post(format!(
                "{}/v1/secret/metadata/{vault_path}",
                self.vault_url
            ))
            .header("X-Vault-Token", self.vault_token.expose())
            .json(&serde_json::json!({ "custom_metadata": custom }))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("vault metadata: {}", e.without_url()))?;
        if !resp.status().is_success() {
            return Err(format!("vault metadata: HTTP {}", resp.status()));
        }
        Ok(())
    }

    /// Wait until every seeded Deployment has completed its first rollout.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        for t in &self.config.targets {
            for w in &t.workloads {
                if !self
                    .kube
                    .wait_rollout_complete(&w.namespace, &w.name, timeout)
                    .await
                {
                    return false;
                }
            }
        }
        true
    }

    /// The token that stops every simulator and consumer when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// A Deployment like a real app's: 2 replicas, a rolling update that never drops below the
/// desired count (maxUnavailable 0, maxSurge 1), the key's Vault path as an annotation.
pub fn consumer_deployment(name: &str, replicas: i32, vault_path: &str) -> Deployment {
    consumer_deployment_in(NAMESPACE, name, replicas, vault_path)
}

/// [`consumer_deployment`] in namespace `ns`.
pub fn consumer_deployment_in(ns: &str, name: &str, replicas: i32, vault_path: &str) -> Deployment {
    let labels: BTreeMap<String, String> = [("app".to_string(), name.to_string())].into();
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            progress_deadline_seconds: Some(60),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(
                        [(
                            "sandbox.openai-key-rotator/vault-path".to_string(),
                            vault_path.to_string(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "app".into(),
                        image: Some("example.com/llm-app:1.0".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// What one seeded target consists of.
struct TargetSpec<'a> {
    name: &'a str,
    project_id: &'a str,
    namespace: &'a str,
    vault_path: String,
    /// (suffix, replicas) of its consumer Deployments `<name>-<suffix>`.
    workloads: &'a [(&'static str, i32)],
    jitter: DurationStr,
}

/// Write a file only its owner can read (it may hold a key or token).
fn write_private(path: &Path, contents: &str) -> Result<(), SandboxError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| SandboxError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)
}
