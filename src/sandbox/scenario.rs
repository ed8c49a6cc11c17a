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
    /// Targets to seed; each gets two consumer Deployments `<name>-api` and `<name>-worker`.
    pub targets: Vec<String>,
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

/// A running, seeded sandbox. Dropping it stops every simulator and consumer.
pub struct Sandbox {
    pub openai: OpenAiSim,
    /// The Vault simulator, unless an external Vault was given.
    pub vault: Option<VaultSim>,
    pub kube: KubeSim,
    pub consumers: Consumers,
    pub project_id: String,
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
        let kube_srv = kube
            .serve(loopback(opts.kube_port), cancel.child_token())
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

        let project_id = openai.create_project("Sandbox project");
        let mut sandbox = Sandbox {
            openai_url: format!("{}/v1", openai_srv.url()),
            vault_url,
            kube_url: kube_srv.url(),
            openai,
            vault,
            kube,
            consumers,
            project_id,
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
                },
                kubernetes: KubernetesConfig::default(),
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

        for name in &opts.targets {
            let target = sandbox.seed_target(name, &opts).await?;
            sandbox.config.targets.push(target);
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
    /// metadata the daemon reads), and two consumer Deployments reading it.
    async fn seed_target(&self, name: &str, opts: &SandboxOptions) -> Result<Target, SandboxError> {
        let seed_err = |message: String| SandboxError::Seed {
            what: format!("target {name}"),
            message,
        };
        let vault_path = format!("{NAMESPACE}/{name}/openai");
        let (account, key) = self
            .openai
            .create_service_account(&self.project_id, &format!("{name}-initial"))
            .map_err(|e| seed_err(e.to_string()))?;
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{}/v1/secret/data/{vault_path}", self.vault_url))
            .header("X-Vault-Token", self.vault_token.expose())
            .json(&serde_json::json!({ "data": { "api_key": key.expose() } }))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| seed_err(format!("vault write: {}", e.without_url())))?;
        if !resp.status().is_success() {
            return Err(seed_err(format!("vault write: HTTP {}", resp.status())));
        }
        let custom = serde_json::json!({
            meta::SERVICE_ACCOUNT_ID: account.id,
            meta::KEY_ID: account.key_id,
            meta::ROTATION_ID: "seed",
            meta::KEY_CREATED_AT: chrono::DateTime::from_timestamp(account.created_at, 0)
                .unwrap_or_default()
                .to_rfc3339(),
        });
        let resp = reqwest::Client::new()
            .post(format!(
                "{}/v1/secret/metadata/{vault_path}",
                self.vault_url
            ))
            .header("X-Vault-Token", self.vault_token.expose())
            .json(&serde_json::json!({ "custom_metadata": custom }))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| seed_err(format!("vault metadata: {e}")))?;
        if !resp.status().is_success() {
            return Err(seed_err(format!("vault metadata: HTTP {}", resp.status())));
        }

        let mut workloads = Vec::new();
        for (suffix, replicas) in [("api", 2), ("worker", 2)] {
            let deploy = format!("{name}-{suffix}");
            self.consumers.add(
                NAMESPACE,
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
                .create_deployment(consumer_deployment(&deploy, replicas, &vault_path))
                .map_err(|e| seed_err(format!("deployment {deploy}: {e}")))?;
            workloads.push(WorkloadRef {
                namespace: NAMESPACE.into(),
                kind: crate::config::WorkloadKind::Deployment,
                name: deploy,
            });
        }
        Ok(Target {
            name: name.to_string(),
            project_id: self.project_id.clone(),
            vault_path,
            vault_field: "api_key".into(),
            workloads,
            synced_secret: None,
            schedule: Some(opts.schedule.parse::<CronSchedule>().map_err(seed_err)?),
            max_key_age: None,
            jitter: DurationStr::default(),
            grace_period: DurationStr::from_secs(2),
            drain: None,
            smoke_probes: Vec::new(),
            rollout_timeout: DurationStr::from_secs(60),
        })
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
    let labels: BTreeMap<String, String> = [("app".to_string(), name.to_string())].into();
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NAMESPACE.into()),
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
