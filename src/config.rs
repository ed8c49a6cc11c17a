//! TOML configuration → a validated [`Config`].
//!
//! Parsing is strict (`deny_unknown_fields`) so a typo is an error, not a silently ignored
//! option. Semantic checks that serde cannot express (duplicate targets, workload syntax,
//! drain bounds) run in [`Config::validate`] and every message names the target and the field.

use crate::retry::RetryPolicy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: invalid configuration:\n  - {}", .errors.join("\n  - "))]
    Invalid { path: String, errors: Vec<String> },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub openai: OpenAiConfig,
    pub vault: VaultConfig,
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    #[serde(default)]
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Address of the HTTP server (metrics, health, trigger API).
    pub listen: SocketAddr,
    /// Rotations running at the same time, across all targets.
    pub max_concurrent_rotations: usize,
    /// Vault KV path prefix under which the rotation journal lives.
    pub state_prefix: String,
    /// Name prefix of the service accounts this daemon creates and may sweep.
    pub account_prefix: String,
    /// Managed accounts younger than this are never swept (a rotation may be minting them).
    pub sweep_min_age: DurationStr,
    pub audit: AuditConfig,
    /// Log format: "auto" (JSON unless stderr is a terminal), "json" or "text".
    pub log_format: LogFormat,
    pub leader_election: LeaderElectionConfig,
    /// How often rollouts and synced Secrets are polled during a rotation.
    pub poll_interval: DurationStr,
    /// How often the drain asks the Usage API whether the old key is quiet.
    pub drain_poll_interval: DurationStr,
    /// Retries of a service-account deletion before it is left pending (retried later).
    pub delete_max_retries: u32,
    pub delete_retry_base: DurationStr,
    pub delete_max_backoff: DurationStr,
}

/// With several replicas, a Kubernetes Lease elects the one that rotates.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderElectionConfig {
    pub enabled: bool,
    /// Namespace of the Lease (the daemon's own); env POD_NAMESPACE wins when set.
    pub namespace: String,
    pub lease_name: String,
    /// This replica's name; unset = env POD_NAME, else the host name.
    pub identity: Option<String>,
    pub lease_duration: DurationStr,
    /// A leader that could not renew for this long steps down (must be < lease_duration).
    pub renew_deadline: DurationStr,
    pub retry_period: DurationStr,
    /// This replica's API URL (`http(s)://host:port`) as other replicas reach it: the
    /// leader writes it to the Lease and followers forward API calls there. Unset = from
    /// env POD_IP and the listen port; without either, followers answer 503 instead.
    pub advertise_url: Option<String>,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        LeaderElectionConfig {
            enabled: false,
            namespace: "openai-key-rotator".into(),
            lease_name: "openai-key-rotator".into(),
            identity: None,
            lease_duration: DurationStr::from_secs(15),
            renew_deadline: DurationStr::from_secs(10),
            retry_period: DurationStr::from_secs(2),
            advertise_url: None,
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            max_concurrent_rotations: 2,
            state_prefix: "openai-key-rotator/state".into(),
            account_prefix: "okr".into(),
            sweep_min_age: DurationStr::from_secs(3600),
            audit: AuditConfig::default(),
            log_format: LogFormat::Auto,
            leader_election: LeaderElectionConfig::default(),
            poll_interval: DurationStr::from_secs(1),
            drain_poll_interval: DurationStr::from_secs(30),
            delete_max_retries: 4,
            delete_retry_base: DurationStr::from_secs(2),
            delete_max_backoff: DurationStr::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Append-only JSON-lines file (hash-chained); none = no file sink.
    pub file: Option<PathBuf>,
    /// Also write audit records to stdout.
    pub stdout: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Base URL ending in `/v1`.
    pub base_url: String,
    /// Environment variable holding the admin key (used when `admin_key_file` is unset).
    pub admin_key_env: String,
    /// File holding the admin key (e.g. a mounted Kubernetes Secret); wins over the env var.
    pub admin_key_file: Option<PathBuf>,
    /// Bound on one attempt (connect, send, whole answer).
    pub request_timeout: DurationStr,
    /// Attempts after the first one on 429/5xx/connect errors/timeouts.
    pub max_retries: u32,
    /// Backoff ceiling before the first retry; doubles per retry (full jitter below it).
    pub retry_base: DurationStr,
    /// Cap on one backoff ceiling.
    pub max_backoff: DurationStr,
    /// Longest `Retry-After` waited; a longer one fails the call at once (transient).
    pub max_retry_after: DurationStr,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "https://api.openai.com/v1".into(),
            admin_key_env: "OPENAI_ADMIN_KEY".into(),
            admin_key_file: None,
            request_timeout: DurationStr::from_secs(30),
            max_retries: 5,
            retry_base: DurationStr(Duration::from_millis(200)),
            max_backoff: DurationStr::from_secs(30),
            max_retry_after: DurationStr::from_secs(300),
        }
    }
}

impl OpenAiConfig {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: self.max_retries,
            base: self.retry_base.get(),
            max_backoff: self.max_backoff.get(),
            max_retry_after: self.max_retry_after.get(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    pub address: String,
    /// KV v2 mount holding the keys and the journal.
    #[serde(default = "default_kv_mount")]
    pub kv_mount: String,
    /// PEM CA bundle for Vault's TLS certificate.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// Bound on one attempt.
    #[serde(default = "default_vault_timeout")]
    pub request_timeout: DurationStr,
    /// Attempts after the first one on 429/5xx/connect errors/timeouts (logins included).
    #[serde(default = "default_vault_retries")]
    pub max_retries: u32,
    /// Backoff ceiling before the first retry; doubles per retry (full jitter below it).
    /// Vault's `Retry-After` is not seen (vaultrs drops response headers), so there is no
    /// `max_retry_after` here.
    #[serde(default = "default_retry_base")]
    pub retry_base: DurationStr,
    /// Cap on one backoff ceiling.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: DurationStr,
    #[serde(default)]
    pub auth: VaultAuth,
}

/// An address-less Vault section (the address must be set; `validate` says so).
impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            address: String::new(),
            kv_mount: default_kv_mount(),
            ca_cert: None,
            request_timeout: default_vault_timeout(),
            max_retries: default_vault_retries(),
            retry_base: default_retry_base(),
            max_backoff: default_max_backoff(),
            auth: VaultAuth::default(),
        }
    }
}

impl VaultConfig {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: self.max_retries,
            base: self.retry_base.get(),
            max_backoff: self.max_backoff.get(),
            ..RetryPolicy::default()
        }
    }
}

fn default_kv_mount() -> String {
    "secret".into()
}

fn default_vault_timeout() -> DurationStr {
    DurationStr::from_secs(10)
}

fn default_vault_retries() -> u32 {
    4
}

fn default_retry_base() -> DurationStr {
    DurationStr(Duration::from_millis(200))
}

fn default_max_backoff() -> DurationStr {
    DurationStr::from_secs(30)
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum VaultAuth {
    /// A Vault token from a file (wins) or an environment variable.
    Token {
        #[serde(default = "default_token_env")]
        token_env: String,
        #[serde(default)]
        token_file: Option<PathBuf>,
    },
    /// Kubernetes auth: log in with the pod's service-account JWT.
    Kubernetes {
        role: String,
        #[serde(default = "default_k8s_auth_mount")]
        mount: String,
        #[serde(default = "default_jwt_path")]
        jwt_path: PathBuf,
    },
}

impl Default for VaultAuth {
    fn default() -> Self {
        VaultAuth::Token {
            token_env: default_token_env(),
            token_file: None,
        }
    }
}

fn default_token_env() -> String {
    "VAULT_TOKEN".into()
}
fn default_k8s_auth_mount() -> String {
    "kubernetes".into()
}
fn default_jwt_path() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Kubeconfig file; unset = in-cluster configuration (or the usual inference).
    pub kubeconfig: Option<PathBuf>,
    /// Context in the kubeconfig; unset = its current context.
    pub context: Option<String>,
    /// Bound on one attempt (watches and the leader Lease are not affected).
    pub request_timeout: DurationStr,
    /// Attempts after the first one on 409/429/5xx/transport errors/timeouts.
    pub max_retries: u32,
    /// Backoff ceiling before the first retry; doubles per retry (full jitter below it).
    pub retry_base: DurationStr,
    /// Cap on one backoff ceiling.
    pub max_backoff: DurationStr,
    /// Longest `retryAfterSeconds` waited; a longer one fails the call at once (transient).
    pub max_retry_after: DurationStr,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubeconfig: None,
            context: None,
            request_timeout: DurationStr::from_secs(30),
            max_retries: 5,
            retry_base: default_retry_base(),
            max_backoff: default_max_backoff(),
            max_retry_after: DurationStr::from_secs(300),
        }
    }
}

impl KubernetesConfig {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: self.max_retries,
            base: self.retry_base.get(),
            max_backoff: self.max_backoff.get(),
            max_retry_after: self.max_retry_after.get(),
        }
    }
}

/// One managed key: where it lives and which workloads use it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub name: String,
    /// OpenAI project (`proj_...`) whose service accounts hold the key.
    pub project_id: String,
    /// KV v2 path (under the mount) where the workloads read the key.
    pub vault_path: String,
    #[serde(default = "default_vault_field")]
    pub vault_field: String,
    /// `namespace/kind/name`, kind one of Deployment, StatefulSet, DaemonSet.
    pub workloads: Vec<WorkloadRef>,
    #[serde(default)]
    pub synced_secret: Option<SyncedSecret>,
    /// Cron expression with a seconds field, evaluated in UTC.
    #[serde(default)]
    pub schedule: Option<CronSchedule>,
    /// Rotate earlier when the current key is older than this.
    #[serde(default)]
    pub max_key_age: Option<DurationStr>,
    /// Random delay added to each scheduled start, spreading load.
    #[serde(default)]
    pub jitter: DurationStr,
    /// Wait between a verified rollout and retiring the old account.
    #[serde(default = "default_grace")]
    pub grace_period: DurationStr,
    #[serde(default)]
    pub drain: Option<DrainConfig>,
    #[serde(default)]
    pub smoke_probes: Vec<SmokeProbe>,
    /// Bound on roll + verify for all workloads of this target.
    #[serde(default = "default_rollout_timeout")]
    pub rollout_timeout: DurationStr,
}

fn default_vault_field() -> String {
    "api_key".into()
}
fn default_grace() -> DurationStr {
    DurationStr::from_secs(60)
}
fn default_rollout_timeout() -> DurationStr {
    DurationStr::from_secs(600)
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncedSecret {
    pub namespace: String,
    pub name: String,
    /// Key inside the Secret's data holding the API key.
    #[serde(default = "default_vault_field")]
    pub key: String,
    /// Annotation to set to nudge the syncing operator (e.g. External Secrets'
    /// `force-sync`); unset = just wait.
    #[serde(default)]
    pub force_sync_annotation: Option<String>,
    #[serde(default = "default_sync_timeout")]
    pub timeout: DurationStr,
}

fn default_sync_timeout() -> DurationStr {
    DurationStr::from_secs(300)
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    /// The old key must show no usage for this long.
    pub quiet_for: DurationStr,
    /// Give up waiting after this long.
    pub max_wait: DurationStr,
    /// What to do when `max_wait` passes with the old key still in use.
    #[serde(default)]
    pub on_timeout: DrainTimeout,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DrainTimeout {
    /// Retire anyway (the rollout is verified; stragglers are not ours).
    #[default]
    Retire,
    /// Keep the old account; the rotation completes with it pending deletion.
    Keep,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmokeProbe {
    pub url: String,
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    #[serde(default = "default_consecutive")]
    pub consecutive_successes: u32,
    #[serde(default = "default_probe_interval")]
    pub interval: DurationStr,
    #[serde(default = "default_probe_timeout")]
    pub timeout: DurationStr,
}

fn default_expect_status() -> u16 {
    200
}
fn default_consecutive() -> u32 {
    1
}
fn default_probe_interval() -> DurationStr {
    DurationStr::from_secs(2)
}
fn default_probe_timeout() -> DurationStr {
    DurationStr::from_secs(5)
}

/// A human duration in the file (`"90s"`, `"10m"`, `"30d"`), parsed by humantime.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct DurationStr(pub Duration);

impl DurationStr {
    pub const fn from_secs(s: u64) -> Self {
        DurationStr(Duration::from_secs(s))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Debug for DurationStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for DurationStr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(DurationStr)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?}: {e} (examples: \"90s\", \"10m\", \"30d\")"
                ))
            })
    }
}

impl Serialize for DurationStr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A cron expression with a seconds field (6 or 7 fields), evaluated in UTC.
#[derive(Clone)]
pub struct CronSchedule {
    pub expr: String,
    pub schedule: cron::Schedule,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr
    }
}

impl fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.expr)
    }
}

impl FromStr for CronSchedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let fields = s.split_whitespace().count();
        if !(6..=7).contains(&fields) {
            return Err(format!(
                "invalid cron expression {s:?}: expected 6 or 7 fields (sec min hour day month weekday [year]), got {fields}"
            ));
        }
        cron::Schedule::from_str(s)
            .map(|schedule| CronSchedule {
                expr: s.to_string(),
                schedule,
            })
            .map_err(|e| format!("invalid cron expression {s:?}: {e}"))
    }
}

impl<'de> Deserialize<'de> for CronSchedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for CronSchedule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.expr)
    }
}

/// The workload kinds the roller knows how to restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        }
    }
}

/// `namespace/kind/name` in the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadRef {
    pub namespace: String,
    pub kind: WorkloadKind,
    pub name: String,
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.kind.as_str(), self.name)
    }
}

impl FromStr for WorkloadRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let [namespace, kind, name] = parts.as_slice() else {
            return Err(format!(
                "invalid workload {s:?}: expected namespace/kind/name, e.g. \"prod/Deployment/chatbot\""
            ));
        };
        let kind = match kind.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" => WorkloadKind::Deployment,
            "statefulset" | "statefulsets" | "sts" => WorkloadKind::StatefulSet,
            "daemonset" | "daemonsets" | "ds" => WorkloadKind::DaemonSet,
            _ => {
                return Err(format!(
                    "invalid workload {s:?}: kind {kind:?} is not one of Deployment, StatefulSet, DaemonSet"
                ))
            }
        };
        for (what, v) in [("namespace", namespace), ("name", name)] {
            if !is_dns_label(v) {
                return Err(format!(
                    "invalid workload {s:?}: {what} {v:?} is not a valid Kubernetes name"
                ));
            }
        }
        Ok(WorkloadRef {
            namespace: namespace.to_string(),
            kind,
            name: name.to_string(),
        })
    }
}

impl<'de> Deserialize<'de> for WorkloadRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for WorkloadRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// RFC 1123 subdomain-ish check, enough for namespaces and workload names.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

impl Config {
    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parse and validate TOML text; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: describe_toml_error(text, &e),
        })?;
        let errors = config.validate();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: origin.to_string(),
                errors,
            })
        }
    }

    /// Checks serde cannot express; each message names the target and the field.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let d = &self.daemon;
        if d.max_concurrent_rotations == 0 {
            errors.push("daemon.max_concurrent_rotations: must be at least 1".into());
        }
        if !is_account_prefix(&d.account_prefix) {
            errors.push(format!(
                "daemon.account_prefix: {:?} must be 1-20 characters of a-z, 0-9 and '-'",
                d.account_prefix
            ));
        }
        let le = &d.leader_election;
        if le.enabled {
            if le.renew_deadline >= le.lease_duration {
                errors.push("daemon.leader_election.renew_deadline: must be shorter than lease_duration (or two replicas could both lead)".into());
            }
            if le.retry_period.get().is_zero() || le.retry_period >= le.renew_deadline {
                errors.push("daemon.leader_election.retry_period: must be above zero and shorter than renew_deadline".into());
            }
            if le.lease_name.is_empty() || le.namespace.is_empty() {
                errors.push(
                    "daemon.leader_election: namespace and lease_name must not be empty".into(),
                );
            }
        }
        if let Some(e) = le
            .advertise_url
            .as_deref()
            .and_then(|u| crate::forward::check_api_url(u).err())
        {
            errors.push(format!("daemon.leader_election.advertise_url: {e}"));
        }
        for (field, v) in [
            ("poll_interval", d.poll_interval),
            ("drain_poll_interval", d.drain_poll_interval),
        ] {
            if v.get().is_zero() {
                errors.push(format!(
                    "daemon.{field}: must be greater than zero (it paces a polling loop)"
                ));
            }
        }
        if d.delete_max_backoff < d.delete_retry_base {
            errors.push(
                "daemon.delete_max_backoff: must be at least daemon.delete_retry_base".into(),
            );
        }
        if d.state_prefix.trim_matches('/').is_empty() {
            errors.push("daemon.state_prefix: must not be empty".into());
        }
        if !(self.openai.base_url.starts_with("http://")
            || self.openai.base_url.starts_with("https://"))
        {
            errors.push(format!(
                "openai.base_url: {:?} must be an http(s) URL",
                self.openai.base_url
            ));
        }
        if !(self.vault.address.starts_with("http://")
            || self.vault.address.starts_with("https://"))
        {
            errors.push(format!(
                "vault.address: {:?} must be an http(s) URL",
                self.vault.address
            ));
        }
        let o = &self.openai;
        check_timeout(&mut errors, "openai.request_timeout", o.request_timeout);
        check_backoff(&mut errors, "openai", o.retry_base, o.max_backoff);
        let v = &self.vault;
        check_timeout(&mut errors, "vault.request_timeout", v.request_timeout);
        check_backoff(&mut errors, "vault", v.retry_base, v.max_backoff);
        let k = &self.kubernetes;
        check_timeout(&mut errors, "kubernetes.request_timeout", k.request_timeout);
        check_backoff(&mut errors, "kubernetes", k.retry_base, k.max_backoff);
        if let VaultAuth::Kubernetes { role, .. } = &self.vault.auth {
            if role.is_empty() {
                errors.push("vault.auth.role: must not be empty".into());
            }
        }
        let mut names = BTreeSet::new();
        let mut paths = BTreeSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = format!("targets[{i}] ({:?})", t.name);
            if !is_account_prefix(&t.name) || t.name.len() > 40 {
                errors.push(format!(
                    "{at}.name: must be 1-40 characters of a-z, 0-9 and '-' (it goes into service account names)"
                ));
            }
            if !names.insert(t.name.as_str()) {
                errors.push(format!("{at}.name: duplicate target name {:?}", t.name));
            }
            if !paths.insert((t.vault_path.as_str(), t.vault_field.as_str())) {
                errors.push(format!(
                    "{at}.vault_path: {:?} field {:?} is already managed by another target",
                    t.vault_path, t.vault_field
                ));
            }
            if t.project_id.is_empty() {
                errors.push(format!("{at}.project_id: must not be empty"));
            }
            if t.vault_path.trim_matches('/').is_empty() {
                errors.push(format!("{at}.vault_path: must not be empty"));
            }
            if t.vault_path
                .trim_matches('/')
                .starts_with(d.state_prefix.trim_matches('/'))
            {
                errors.push(format!(
                    "{at}.vault_path: {:?} lies under daemon.state_prefix {:?}",
                    t.vault_path, d.state_prefix
                ));
            }
            if t.workloads.is_empty() {
                errors.push(format!("{at}.workloads: at least one workload is required"));
            }
            let mut seen = BTreeSet::new();
            for (j, w) in t.workloads.iter().enumerate() {
                if !seen.insert(w) {
                    errors.push(format!("{at}.workloads[{j}]: {w} is listed twice"));
                }
            }
            if t.rollout_timeout.get().is_zero() {
                errors.push(format!("{at}.rollout_timeout: must be greater than zero"));
            }
            if let Some(dr) = &t.drain {
                if dr.max_wait < dr.quiet_for {
                    errors.push(format!(
                        "{at}.drain.max_wait: ({:?}) must be at least drain.quiet_for ({:?})",
                        dr.max_wait, dr.quiet_for
                    ));
                }
            }
            if let Some(age) = t.max_key_age {
                if age.get() <= t.grace_period.get() + t.rollout_timeout.get() {
                    errors.push(format!(
                        "{at}.max_key_age: ({age:?}) must exceed grace_period + rollout_timeout, or every key is always too old"
                    ));
                }
            }
            for (j, p) in t.smoke_probes.iter().enumerate() {
                if url::Url::parse(&p.url).is_err() {
                    errors.push(format!(
                        "{at}.smoke_probes[{j}].url: {:?} is not a URL",
                        p.url
                    ));
                }
                if !(100..=599).contains(&p.expect_status) {
                    errors.push(format!(
                        "{at}.smoke_probes[{j}].expect_status: {} is not an HTTP status",
                        p.expect_status
                    ));
                }
                if p.consecutive_successes == 0 {
                    errors.push(format!(
                        "{at}.smoke_probes[{j}].consecutive_successes: must be at least 1"
                    ));
                }
            }
            if let Some(s) = &t.synced_secret {
                if !is_dns_label(&s.namespace) || !is_dns_label(&s.name) {
                    errors.push(format!(
                        "{at}.synced_secret: {}/{} is not a valid namespace/name",
                        s.namespace, s.name
                    ));
                }
            }
        }
        errors
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }
}

fn check_timeout(errors: &mut Vec<String>, field: &str, d: DurationStr) {
    if d.get().is_zero() {
        errors.push(format!("{field}: must be greater than zero"));
    }
}

/// A zero base would retry in a hot loop; a cap below the base makes the base meaningless.
fn check_backoff(errors: &mut Vec<String>, section: &str, base: DurationStr, max: DurationStr) {
    if base.get().is_zero() {
        errors.push(format!("{section}.retry_base: must be greater than zero"));
    } else if max < base {
        errors.push(format!(
            "{section}.max_backoff: ({max:?}) must be at least {section}.retry_base ({base:?})"
        ));
    }
}

fn is_account_prefix(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 20
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// toml's message already names the key path for unknown/missing fields and bad values
/// (e.g. "unknown field `shedule`"); add which `[[targets]]` entry when it is in one.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let mut msg = e.message().to_string();
    if let Some(span) = e.span() {
        let line = text[..span.start.min(text.len())].lines().count().max(1);
        let before = &text[..span.start.min(text.len())];
        if let Some(pos) = before.rfind("[[targets]]") {
            let target_index = before.matches("[[targets]]").count() - 1;
            let name = text[pos..]
                .lines()
                .find_map(|l| {
                    let l = l.trim();
                    l.strip_prefix("name")
                        .and_then(|r| r.trim_start().strip_prefix('='))
                        .map(|v| v.trim().trim_matches('"').to_string())
                })
                .unwrap_or_default();
            msg = format!(
                "targets[{target_index}] ({name:?}){}: {msg}",
                key_on_line(text, span.start)
            );
        } else if let Some(table) = before.rfind("\n[").map(|p| &text[p + 2..]) {
            let table = table.split(']').next().unwrap_or_default();
            msg = format!("{table}{}: {msg}", key_on_line(text, span.start));
        }
        msg = format!("line {line}: {msg}");
    }
    msg
}

/// `.key` when the line holding `offset` reads `key = ...`.
fn key_on_line(text: &str, offset: usize) -> String {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |p| p + 1);
    let line = text[start..].lines().next().unwrap_or_default();
    match line.split_once('=') {
        Some((k, _)) if !k.trim().is_empty() && !k.contains('[') => format!(".{}", k.trim()),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[vault]
address = "http://127.0.0.1:8200"

[[targets]]
name = "chatbot"
project_id = "proj_abc"
vault_path = "apps/chatbot/openai"
workloads = ["demo/Deployment/chatbot"]
schedule = "0 0 3 * * *"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.daemon.max_concurrent_rotations, 2);
        assert_eq!(c.openai.base_url, "https://api.openai.com/v1");
        let t = &c.targets[0];
        assert_eq!(t.vault_field, "api_key");
        assert_eq!(t.workloads[0].kind, WorkloadKind::Deployment);
        assert_eq!(t.rollout_timeout.get(), Duration::from_secs(600));
        assert!(matches!(c.vault.auth, VaultAuth::Token { .. }));
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.targets.is_empty());
    }

    fn err(text: &str) -> String {
        Config::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn bad_cron_names_target_and_field() {
        let e = err(&MINIMAL.replace("0 0 3 * * *", "0 3 * * *"));
        assert!(e.contains("targets[0] (\"chatbot\").schedule"), "{e}");
        assert!(e.contains("cron"), "{e}");
        assert!(e.contains("6 or 7 fields"), "{e}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let e = err(&format!("{MINIMAL}grace_period = \"5 parsecs\"\n"));
        assert!(e.contains("invalid duration \"5 parsecs\""), "{e}");
        assert!(e.contains("targets[0] (\"chatbot\").grace_period"), "{e}");
        let e = err(&MINIMAL.replace("[vault]\n", "[vault]\nrequest_timeout = \"soon\"\n"));
        assert!(e.contains("vault.request_timeout: invalid duration"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = err(&format!("{MINIMAL}shedule = \"0 0 3 * * *\"\n"));
        assert!(e.contains("unknown field `shedule`"), "{e}");
        let e = err(&format!("[daemon]\nlisten_adress = \"x\"\n{MINIMAL}"));
        assert!(e.contains("unknown field `listen_adress`"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = err(&MINIMAL.replace("project_id = \"proj_abc\"\n", ""));
        assert!(e.contains("missing field `project_id`"), "{e}");
    }

    #[test]
    fn duplicate_target_is_rejected() {
        let second = MINIMAL.split("[[targets]]").nth(1).unwrap();
        let e = err(&format!("{MINIMAL}[[targets]]{second}"));
        assert!(
            e.contains("targets[1] (\"chatbot\").name: duplicate"),
            "{e}"
        );
    }

    #[test]
    fn workload_without_namespace_is_rejected() {
        let e = err(&MINIMAL.replace("demo/Deployment/chatbot", "Deployment/chatbot"));
        assert!(e.contains("expected namespace/kind/name"), "{e}");
        assert!(e.contains("chatbot"), "{e}");
        let e = err(&MINIMAL.replace("demo/Deployment/chatbot", "demo/CronJob/chatbot"));
        assert!(e.contains("not one of Deployment"), "{e}");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = MINIMAL.replace("name = \"chatbot\"", "name = \"Chat Bot\"")
            + "[targets.drain]\nquiet_for = \"10m\"\nmax_wait = \"1m\"\n";
        let e = err(&text);
        assert!(e.contains(".name: must be 1-40"), "{e}");
        assert!(e.contains("drain.max_wait"), "{e}");
    }

    #[test]
    fn kubernetes_auth_parses() {
        let text = MINIMAL.replace(
            "[vault]\naddress = \"http://127.0.0.1:8200\"\n",
            "[vault]\naddress = \"http://127.0.0.1:8200\"\n[vault.auth]\nmethod = \"kubernetes\"\nrole = \"okr\"\n",
        );
        let c = Config::parse(&text, "t").unwrap();
        match c.vault.auth {
            VaultAuth::Kubernetes { role, mount, .. } => {
                assert_eq!(role, "okr");
                assert_eq!(mount, "kubernetes");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backend_retry_settings_default_to_the_previous_behaviour() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        let secs = Duration::from_secs;
        let o = c.openai.retry_policy();
        assert_eq!(c.openai.request_timeout.get(), secs(30));
        assert_eq!(
            (o.max_retries, o.base, o.max_backoff, o.max_retry_after),
            (5, Duration::from_millis(200), secs(30), secs(300))
        );
        let v = c.vault.retry_policy();
        assert_eq!(c.vault.request_timeout.get(), secs(10));
        assert_eq!(
            (v.max_retries, v.base, v.max_backoff),
            (4, Duration::from_millis(200), secs(30))
        );
        let k = c.kubernetes.retry_policy();
        assert_eq!(c.kubernetes.request_timeout.get(), secs(30));
        assert_eq!(
            (k.max_retries, k.base, k.max_backoff, k.max_retry_after),
            (5, Duration::from_millis(200), secs(30), secs(300))
        );
    }

    #[test]
    fn backend_retry_settings_parse_and_bad_ones_name_the_field() {
        let text = MINIMAL.replace(
            "[vault]\n",
            "[openai]\nmax_retries = 1\nretry_base = \"1s\"\nmax_backoff = \"4s\"\nmax_retry_after = \"2m\"\n\
             [kubernetes]\nrequest_timeout = \"7s\"\nmax_retries = 2\nmax_retry_after = \"0s\"\n\
             [vault]\nmax_retries = 9\nretry_base = \"50ms\"\n",
        );
        let c = Config::parse(&text, "t").unwrap();
        let o = c.openai.retry_policy();
        assert_eq!(
            (o.max_retries, o.base, o.max_backoff, o.max_retry_after),
            (
                1,
                Duration::from_secs(1),
                Duration::from_secs(4),
                Duration::from_secs(120)
            )
        );
        assert_eq!(c.kubernetes.request_timeout.get(), Duration::from_secs(7));
        assert_eq!(c.kubernetes.retry_policy().max_retry_after, Duration::ZERO);
        assert_eq!(c.vault.retry_policy().max_retries, 9);
        assert_eq!(c.vault.retry_policy().base, Duration::from_millis(50));

        for (section, field, value, needle) in [
            (
                "openai",
                "request_timeout",
                "0s",
                "openai.request_timeout: must be greater than zero",
            ),
            (
                "vault",
                "request_timeout",
                "0s",
                "vault.request_timeout: must be greater than zero",
            ),
            (
                "kubernetes",
                "request_timeout",
                "0s",
                "kubernetes.request_timeout: must be greater than zero",
            ),
            (
                "openai",
                "retry_base",
                "0s",
                "openai.retry_base: must be greater than zero",
            ),
            (
                "vault",
                "retry_base",
                "0s",
                "vault.retry_base: must be greater than zero",
            ),
            (
                "kubernetes",
                "max_backoff",
                "100ms",
                "kubernetes.max_backoff: (100ms) must be at least kubernetes.retry_base (200ms)",
            ),
        ] {
            let line = format!("{field} = \"{value}\"\n");
            let text = if section == "vault" {
                MINIMAL.replace("[vault]\n", &format!("[vault]\n{line}"))
            } else {
                format!("[{section}]\n{line}{MINIMAL}")
            };
            let e = err(&text);
            assert!(e.contains(needle), "{section}.{field}: {e}");
        }
        // Strict as ever: a typo in the new keys is an error.
        let e = err(&MINIMAL.replace("[vault]\n", "[vault]\nmax_retry = 3\n"));
        assert!(e.contains("unknown field `max_retry`"), "{e}");
    }

    #[test]
    fn serialized_config_parses_back_identically() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::parse(&text, "round trip").unwrap(), c);
    }
}
