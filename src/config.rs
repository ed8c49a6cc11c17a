//! TOML configuration → a validated [`Config`].
//!
//! Parsing is strict (`deny_unknown_fields`) so a typo is an error, not a silently ignored
//! option. Semantic checks that serde cannot express (duplicate targets and Vault paths,
//! workload syntax, drain bounds, zero durations, schedules that never fire) run in
//! [`Config::validate`]. [`Config::parse`] reports every problem of a file at once (see
//! `collect.rs`), each naming its line, the target and the field.

mod collect;
mod governance;

pub use governance::{
    is_webhook_url, webhook_host, AnomalyAction, AnomalyConfig, NotificationsConfig, NotifyEvent,
    WebhookConfig, WebhookFormat,
};

use crate::retry::RetryPolicy;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A TOML syntax error: nothing past it can be read.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// Every problem found, each `line N: <field path>: <what>` (the line when known).
    #[error("{path}: invalid configuration ({}):\n  - {}", count(.errors.len()), .errors.join("\n  - "))]
    Invalid { path: String, errors: Vec<String> },
}

fn count(n: usize) -> String {
    match n {
        1 => "1 error".into(),
        n => format!("{n} errors"),
    }
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
    /// Webhook notices of rotation outcomes, emergencies, usage anomalies, overdue keys.
    #[serde(default)]
    pub notifications: NotificationsConfig,
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
    /// A rotation at its roll step waits up to this long for other running rotations that
    /// need the same workloads, so the workload restarts once for all; "0s" = never.
    pub coalesce_window: DurationStr,
    /// Workloads rolling at once across all rotations; unset = no bound.
    pub max_concurrent_rollouts: Option<usize>,
    /// How often the leader takes the key inventory (metrics); "0s" = never.
    pub inventory_interval: DurationStr,
    /// A key with no use for this long is `unused` in the inventory and its metric.
    pub inventory_unused_after: DurationStr,
    /// A key expiring within this long is `expiring` in the inventory.
    pub inventory_expiring_within: DurationStr,
    /// Service-account names, e.g. "{yy}-{mm}-{target}-{env}-{rotation}"; unset =
    /// "{prefix}-{target}-{rotation}". Must contain {rotation}.
    pub account_name_template: Option<String>,
    /// The environment `{env}` stands for in the name template (one daemon per environment).
    pub env: Option<String>,
    /// How often unfinished rotations and pending deletions (a failed revoke of a leaked
    /// key above all) are tried again.
    pub pending_retry_interval: DurationStr,
    /// Emergency forensics: what an emergency rotation records about the old key.
    pub forensics: ForensicsConfig,
    /// Reconciliation of OpenAI's audit log with our own trail.
    pub reconcile: ReconcileConfig,
}

/// `[daemon.forensics]`: an emergency rotation records the old key's usage and the audit
/// log's events on its account and key over `lookback`, each half bounded by `timeout`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ForensicsConfig {
    pub enabled: bool,
    pub lookback: DurationStr,
    pub timeout: DurationStr,
}

impl Default for ForensicsConfig {
    fn default() -> Self {
        ForensicsConfig {
            enabled: true,
            lookback: DurationStr::from_secs(24 * 3600),
            timeout: DurationStr::from_secs(30),
        }
    }
}

/// `[daemon.reconcile]`: compare OpenAI's audit log with our journals every `interval`
/// (and after each rotation), over the last `lookback`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    pub enabled: bool,
    pub interval: DurationStr,
    pub lookback: DurationStr,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            enabled: true,
            interval: DurationStr::from_secs(900),
            lookback: DurationStr::from_secs(24 * 3600),
        }
    }
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
            coalesce_window: DurationStr::from_secs(3),
            max_concurrent_rollouts: None,
            inventory_interval: DurationStr::from_secs(3600),
            inventory_unused_after: DurationStr::from_secs(30 * 86_400),
            inventory_expiring_within: DurationStr::from_secs(7 * 86_400),
            account_name_template: None,
            env: None,
            pending_retry_interval: DurationStr::from_secs(300),
            forensics: ForensicsConfig::default(),
            reconcile: ReconcileConfig::default(),
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
    /// KV v2 path (under the mount) holding the admin key in field `value`: the daemon
    /// reads it there (not from the file/env) and may rotate it.
    pub admin_key_vault_path: Option<String>,
    /// Rotate the admin key once it is older than this (needs `admin_key_vault_path`).
    pub admin_key_max_age: Option<DurationStr>,
    /// `expires_in_seconds` of each new admin key; unset = it does not expire.
    pub admin_key_expiry: Option<DurationStr>,
    /// How often the admin key's age is checked.
    pub admin_key_check_interval: DurationStr,
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
            admin_key_vault_path: None,
            admin_key_max_age: None,
            admin_key_expiry: None,
            admin_key_check_interval: DurationStr::from_secs(3600),
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
    /// `namespace/kind/name`, kind one of Deployment, StatefulSet, DaemonSet, Rollout
    /// (Argo Rollouts). With `waves`, every wave's workloads in order (filled in at load).
    #[serde(default)]
    pub workloads: Vec<WorkloadRef>,
    /// Staged rollout instead of `workloads`: each wave is rolled and verified before the
    /// next starts; a failure rolls back only the waves that moved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Vec<WorkloadRef>>,
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
    /// Before the drain, wait until the Usage API shows the new key in use.
    #[serde(default)]
    pub adoption: Option<AdoptionConfig>,
    /// What to do about workloads in the cluster that read this key but are not listed.
    #[serde(default)]
    pub unlisted_consumers: UnlistedConsumers,
    #[serde(default)]
    pub smoke_probes: Vec<SmokeProbe>,
    /// Bound on roll + verify for all workloads of this target.
    #[serde(default = "default_rollout_timeout")]
    pub rollout_timeout: DurationStr,
    /// Expiry backstop: each minted key stops working this long after creation
    /// (`expires_in_seconds`), even if every rotation fails. Must exceed `max_key_age` plus
    /// the rotation's worst-case duration plus the expiry alert's margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_expiry: Option<DurationStr>,
    /// Watch the current key's usage for spikes (a leaked key being abused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalyConfig>,
}

impl Target {
    /// The waves in order; without `waves`, one wave of every workload.
    pub fn wave_list(&self) -> Vec<&[WorkloadRef]> {
        if self.waves.is_empty() {
            vec![self.workloads.as_slice()]
        } else {
            self.waves.iter().map(Vec::as_slice).collect()
        }
    }
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

/// Workloads found reading a target's key (Vault Agent annotations, VSO/ESO-synced Secrets
/// they mount) that the target does not list: they would keep the old key until it dies.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnlistedConsumers {
    /// Report them (log, metric, audit, plan) and rotate.
    #[default]
    Warn,
    /// Stop before minting.
    Refuse,
    /// Roll them too (pods without a workload cannot be rolled: reported as with warn).
    Include,
}

impl UnlistedConsumers {
    pub fn as_str(self) -> &'static str {
        match self {
            UnlistedConsumers::Warn => "warn",
            UnlistedConsumers::Refuse => "refuse",
            UnlistedConsumers::Include => "include",
        }
    }
}

/// New-key adoption: a verified rollout whose workloads still do not use the new key (they
/// read it from somewhere else, or cache the old one) is rolled back rather than retired.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdoptionConfig {
    /// Requests the Usage API must count for the new key.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Counted from the start of the drain step (a restart does not extend it).
    pub timeout: DurationStr,
}

fn default_min_requests() -> u64 {
    1
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
    /// With `waves`: the wave (from 1) after which this probe gates the next; every probe
    /// also runs at verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<usize>,
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
    /// An Argo Rollouts `Rollout` (`argoproj.io/v1alpha1`), restarted through
    /// `spec.restartAt` rather than a pod-template change.
    Rollout,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::Rollout => "Rollout",
        }
    }

    /// The API group/version the kind is served under.
    pub fn api_version(self) -> &'static str {
        match self {
            WorkloadKind::Rollout => "argoproj.io/v1alpha1",
            _ => "apps/v1",
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
            "rollout" | "rollouts" | "ro" => WorkloadKind::Rollout,
            _ => {
                return Err(format!(
                    "invalid workload {s:?}: kind {kind:?} is not one of Deployment, StatefulSet, DaemonSet, Rollout"
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
    ///
    /// A syntax error stops at once ([`ConfigError::Parse`], with line and column). Past
    /// that, every problem is reported together ([`ConfigError::Invalid`]): unknown keys,
    /// bad values, missing fields and the semantic checks of [`Config::validate`], each as
    /// `line N: <field path>: <what>`, in file order.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let root = DeTable::parse(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: syntax_message(text, &e),
        })?;
        let doc = Spanned::new(root.span(), DeValue::Table(root.into_inner()));
        let collected = collect::collect::<Config>(text.len(), doc.clone());
        let mut found: Vec<(Option<usize>, String)> = collected
            .problems
            .iter()
            .map(|p| {
                let what = collect::describe(&doc, &p.path);
                let message = if what.is_empty() {
                    p.message.clone()
                } else {
                    format!("{what}: {}", p.message)
                };
                (
                    p.span.as_ref().and_then(|s| line_of(text, s.start)),
                    message,
                )
            })
            .collect();
        if let Some(config) = &collected.value {
            for message in config.validate() {
                if collect::mentions_tainted(&collected.tainted, &message) {
                    continue;
                }
                let span = collect::span_of(&doc, &collect::message_path(&message));
                found.push((span.and_then(|s| line_of(text, s.start)), message));
            }
        }
        match collected.value {
            Some(mut config) if found.is_empty() => {
                for t in &mut config.targets {
                    if !t.waves.is_empty() {
                        t.workloads = t.waves.concat();
                    }
                }
                Ok(config)
            }
            _ => {
                // File order; messages without a line last. The sort is stable.
                found.sort_by_key(|(line, _)| line.unwrap_or(usize::MAX));
                let errors = found
                    .into_iter()
                    .map(|(line, m)| match line {
                        Some(l) => format!("line {l}: {m}"),
                        None => m,
                    })
                    .collect();
                Err(ConfigError::Invalid {
                    path: origin.to_string(),
                    errors,
                })
            }
        }
    }

    /// Checks serde cannot express; each message names the target and the field.
    pub fn validate(&self) -> Vec<String> {
        self.validate_at(chrono::Utc::now())
    }

    /// [`Config::validate`] with `now` for the check that schedules fire.
    pub fn validate_at(&self, now: chrono::DateTime<chrono::Utc>) -> Vec<String> {
        let mut errors = Vec::new();
        let d = &self.daemon;
        if d.max_concurrent_rollouts == Some(0) {
            errors.push(
                "daemon.max_concurrent_rollouts: must be at least 1 (unset = no bound)".into(),
            );
        }
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
        if d.pending_retry_interval.get() < Duration::from_secs(1) {
            errors.push(
                "daemon.pending_retry_interval: must be at least 1s (a leaked key's failed revoke is retried this often)".into(),
            );
        }
        if d.sweep_min_age.get().is_zero() {
            errors.push(
                "daemon.sweep_min_age: must be greater than zero (the sweep could delete an account a running rotation just minted)".into(),
            );
        }
        if d.delete_max_backoff < d.delete_retry_base {
            errors.push(
                "daemon.delete_max_backoff: must be at least daemon.delete_retry_base".into(),
            );
        }
        for (field, v) in [
            ("inventory_unused_after", d.inventory_unused_after),
            ("inventory_expiring_within", d.inventory_expiring_within),
        ] {
            if v.get() < Duration::from_secs(86_400) {
                errors.push(format!(
                    "daemon.{field}: ({v:?}) must be at least 1 day (the inventory counts in days)"
                ));
            }
        }
        if let Some(e) = d.env.as_deref().filter(|e| !crate::naming::valid_env(e)) {
            errors.push(format!(
                "daemon.env: {e:?} must be 1-20 characters of a-z, A-Z, 0-9 and '-'"
            ));
        }
        if let Some(t) = &d.account_name_template {
            match crate::naming::NameTemplate::parse(t) {
                Err(e) => errors.push(format!("daemon.account_name_template: {e}")),
                Ok(tpl) => {
                    if tpl.uses_env() && d.env.is_none() {
                        errors.push(
                            "daemon.env: must be set: daemon.account_name_template uses {env}"
                                .into(),
                        );
                    }
                    for (i, t) in self.targets.iter().enumerate() {
                        let name = tpl.render(&crate::naming::NameVars {
                            prefix: &d.account_prefix,
                            target: &t.name,
                            rotation_id: crate::naming::SAMPLE_ROTATION_ID,
                            env: d.env.as_deref(),
                            at: now,
                        });
                        if name.len() > crate::naming::MAX_NAME_LEN {
                            errors.push(format!(
                                "targets[{i}] ({:?}).name: its service account names (like {name:?}, from daemon.account_name_template) are {} characters; at most {}",
                                t.name,
                                name.len(),
                                crate::naming::MAX_NAME_LEN
                            ));
                        }
                    }
                }
            }
        }
        errors.extend(crate::forensics::validate_config(self));
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
        // Normalized Vault path -> the first target there.
        let mut paths: BTreeMap<String, String> = BTreeMap::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = format!("targets[{i}] ({:?})", t.name);
            if !is_target_name(&t.name) {
                errors.push(format!(
                    "{at}.name: must be 1-40 characters of a-z, 0-9 and '-' (it goes into service account names)"
                ));
            }
            if !names.insert(t.name.as_str()) {
                errors.push(format!("{at}.name: duplicate target name {:?}", t.name));
            }
            let path = normalize_vault_path(&t.vault_path);
            match paths.get(&path) {
                Some(first) if !path.is_empty() => errors.push(format!(
                    "{at}.vault_path: {:?} is the same Vault path as {first}.vault_path; custom metadata is kept per path, so the two targets would overwrite each other's record of the old account",
                    t.vault_path
                )),
                Some(_) => {}
                None => {
                    paths.insert(path, at.clone());
                }
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
            if t.waves.is_empty() {
                if t.workloads.is_empty() {
                    errors.push(format!(
                        "{at}.workloads: at least one workload is required (or waves)"
                    ));
                }
                let mut seen = BTreeSet::new();
                for (j, w) in t.workloads.iter().enumerate() {
                    if !seen.insert(w) {
                        errors.push(format!("{at}.workloads[{j}]: {w} is listed twice"));
                    }
                }
            } else {
                // After load `workloads` is the waves' concatenation; a file sets one.
                if !t.workloads.is_empty() && t.workloads != t.waves.concat() {
                    errors.push(format!(
                        "{at}.waves: set either workloads or waves, not both"
                    ));
                }
                let mut seen = BTreeSet::new();
                for (k, wave) in t.waves.iter().enumerate() {
                    if wave.is_empty() {
                        errors.push(format!(
                            "{at}.waves[{k}]: a wave needs at least one workload"
                        ));
                    }
                    for (j, w) in wave.iter().enumerate() {
                        if !seen.insert(w) {
                            errors.push(format!(
                                "{at}.waves[{k}][{j}]: {w} is listed twice (a workload belongs to one wave)"
                            ));
                        }
                    }
                }
            }
            for (j, p) in t.smoke_probes.iter().enumerate() {
                match p.wave {
                    Some(_) if t.waves.is_empty() => errors.push(format!(
                        "{at}.smoke_probes[{j}].wave: the target has no waves"
                    )),
                    Some(k) if k == 0 || k > t.waves.len() => errors.push(format!(
                        "{at}.smoke_probes[{j}].wave: {k} is not a wave (1 to {})",
                        t.waves.len()
                    )),
                    _ => {}
                }
            }
            if let Some(s) = &t.schedule {
                if !fires_within(&s.schedule, now, SCHEDULE_HORIZON_YEARS) {
                    errors.push(format!(
                        "{at}.schedule: {:?} never fires (no time matches it in the next {SCHEDULE_HORIZON_YEARS} years)",
                        s.expr
                    ));
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
            if let Some(a) = &t.adoption {
                if a.min_requests == 0 {
                    errors.push(format!(
                        "{at}.adoption.min_requests: must be at least 1 (0 would prove nothing)"
                    ));
                }
                if a.timeout.get().is_zero() {
                    errors.push(format!("{at}.adoption.timeout: must be greater than zero"));
                }
            }
            if let Some(age) = t.max_key_age {
                if age.get() <= t.grace_period.get() + t.rollout_timeout.get() {
                    errors.push(format!(
                        "{at}.max_key_age: ({age:?}) must exceed grace_period + rollout_timeout, or every key is always too old"
                    ));
                }
            }
            if let Some(e) = t.key_expiry {
                errors.extend(check_key_expiry(&at, t, e));
            }
            for (j, p) in t.smoke_probes.iter().enumerate() {
                let probe = format!("{at}.smoke_probes[{j}]");
                match url::Url::parse(&p.url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                    Ok(_) => errors.push(format!(
                        "{probe}.url: {:?} must be an http(s) URL",
                        redacted_url(&p.url)
                    )),
                    Err(_) => errors.push(format!(
                        "{probe}.url: {:?} is not a URL",
                        redacted_url(&p.url)
                    )),
                }
                // Zero would poll in a hot loop, or fail every attempt at once.
                check_timeout(&mut errors, &format!("{probe}.interval"), p.interval);
                check_timeout(&mut errors, &format!("{probe}.timeout"), p.timeout);
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
        governance::validate(self, &mut errors);
        errors
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// Warning the `OpenAIKeyExpiringSoon` alert gives before a served key expires: a key must
/// outlive its rotation by more than this, or the alert fires on every healthy cycle.
pub const EXPIRY_ALERT_MARGIN: Duration = Duration::from_secs(2 * 86_400);

/// Longest `expires_in_seconds` the simulator (and we) accept: ten years.
const MAX_KEY_EXPIRY: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The longest a rotation can take before the old key is retired: the schedule's jitter,
/// the sync wait, roll + verify, adoption, the grace period and the drain's bound. A key
/// must outlive `max_key_age` by this much (plus the alert margin) so a slow rotation never
/// runs into the backstop.
pub fn rotation_bound(t: &Target) -> Duration {
    t.jitter.get()
        + t.synced_secret
            .as_ref()
            .map_or(Duration::ZERO, |s| s.timeout.get())
        + t.rollout_timeout.get()
        + t.adoption
            .as_ref()
            .map_or(Duration::ZERO, |a| a.timeout.get())
        + t.grace_period.get()
        + t.drain
            .as_ref()
            .map_or(Duration::ZERO, |d| d.max_wait.get())
}

/// `31d 1h 10m`: days rather than humantime's months, whole seconds.
fn days(d: Duration) -> String {
    let s = d.as_secs();
    let parts = [
        (s / 86_400, "d"),
        (s % 86_400 / 3600, "h"),
        (s % 3600 / 60, "m"),
        (s % 60, "s"),
    ];
    let out: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    if out.is_empty() {
        "0s".into()
    } else {
        out.join(" ")
    }
}

fn check_key_expiry(at: &str, t: &Target, e: DurationStr) -> Vec<String> {
    let mut errors = Vec::new();
    if e.get() < Duration::from_secs(1) || e.get() > MAX_KEY_EXPIRY {
        errors.push(format!(
            "{at}.key_expiry: ({e:?}) must be from 1s to 10 years"
        ));
        return errors;
    }
    if e.get().subsec_nanos() != 0 {
        errors.push(format!(
            "{at}.key_expiry: ({e:?}) must be whole seconds (it is sent as expires_in_seconds)"
        ));
    }
    let Some(age) = t.max_key_age else {
        errors.push(format!(
            "{at}.key_expiry: needs max_key_age (rotations must replace a key before it expires)"
        ));
        return errors;
    };
    let need = age.get() + rotation_bound(t) + EXPIRY_ALERT_MARGIN;
    if e.get() <= need {
        errors.push(format!(
            "{at}.key_expiry: ({}) must exceed max_key_age ({}) + the rotation's worst case ({}: jitter, sync timeout, rollout_timeout, adoption timeout, grace_period, drain max_wait) + the expiry alert's margin ({}) = {}",
            days(e.get()),
            days(age.get()),
            days(rotation_bound(t)),
            days(EXPIRY_ALERT_MARGIN),
            days(need)
        ));
    }
    errors
}

/// How far ahead a schedule must have a fire time (a cron like Feb 30 has none, ever).
const SCHEDULE_HORIZON_YEARS: u32 = 10;

/// Whether `schedule` fires after `now` and within `years`.
fn fires_within(schedule: &cron::Schedule, now: chrono::DateTime<chrono::Utc>, years: u32) -> bool {
    let horizon = now + chrono::Duration::days(366 * i64::from(years));
    // cron's years end at 2100, so looking for the next time always ends.
    schedule.after(&now).next().is_some_and(|t| t <= horizon)
}

/// A Vault KV path as Vault sees it: no leading or trailing `/`, no empty segments, so
/// `a/b`, `/a/b/` and `a//b` are one path.
pub fn normalize_vault_path(path: &str) -> String {
    path.split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// `url` fit for errors, logs and audit: no userinfo (`user:pass@`), query values and
/// fragment replaced by `redacted`. Smoke-probe URLs may carry credentials; this is what
/// may be shown of them. Text that is not a URL is cut the same way, by hand.
pub fn redacted_url(url: &str) -> String {
    const R: &str = "redacted";
    // Without an authority (`user:pass@host` parses as scheme `user`), userinfo would hide
    // in the path: such text is cut by hand.
    match url::Url::parse(url).ok().filter(|u| u.has_host()) {
        Some(mut u) => {
            // Cannot fail: the URL has a host.
            let _ = u.set_username("");
            let _ = u.set_password(None);
            if u.query().is_some() {
                let keys: Vec<String> = u.query_pairs().map(|(k, _)| k.into_owned()).collect();
                if keys.is_empty() {
                    u.set_query(None);
                } else {
                    u.query_pairs_mut()
                        .clear()
                        .extend_pairs(keys.iter().map(|k| (k.as_str(), R)));
                }
            }
            if u.fragment().is_some() {
                u.set_fragment(Some(R));
            }
            u.to_string()
        }
        None => {
            // Not a URL: drop everything from `?` or `#`, and everything up to the last `@`
            // (too much rather than a password), keeping a leading `scheme://`.
            let (head, tail) = match url.split_once(['?', '#']) {
                Some((h, _)) => (h, format!("?{R}")),
                None => (url, String::new()),
            };
            let scheme = head
                .split_once("://")
                .map(|(s, _)| s)
                .filter(|s| {
                    !s.is_empty()
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                })
                .map(|s| format!("{s}://"))
                .unwrap_or_default();
            match head.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}{host}{tail}"),
                None => format!("{head}{tail}"),
            }
        }
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

/// What a target may be called: 1-40 of a-z, 0-9 and `-` (it goes into service-account
/// names). The API checks a name against it before looking the target up.
pub fn is_target_name(s: &str) -> bool {
    is_account_prefix_chars(s) && s.len() <= 40
}

fn is_account_prefix(s: &str) -> bool {
    is_account_prefix_chars(s) && s.len() <= 20
}

fn is_account_prefix_chars(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// 1-based line of byte `offset`; `None` past the end (a placeholder's span).
fn line_of(text: &str, offset: usize) -> Option<usize> {
    let before = text.as_bytes().get(..offset)?;
    Some(before.iter().filter(|&&b| b == b'\n').count() + 1)
}

/// `line 3, column 9: TOML syntax error: ...`.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return format!("TOML syntax error: {}", e.message());
    };
    let start = span.start.min(text.len());
    let line_start = text.as_bytes()[..start]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&text.as_bytes()[line_start..start])
        .chars()
        .count()
        + 1;
    let line = line_of(text, start).unwrap_or(1);
    format!(
        "line {line}, column {column}: TOML syntax error: {}",
        e.message()
    )
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

    /// `err` split into its problems (the lines after the header).
    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, "t.toml").unwrap_err() {
            ConfigError::Invalid { errors, .. } => errors,
            other => panic!("not Invalid: {other}"),
        }
    }

    #[test]
    fn unknown_key_bad_cron_and_bad_duration_are_all_reported_with_lines() {
        // The issue's example: before, only the duration was reported.
        let text = MINIMAL.replace("0 0 3 * * *", "0 3 * * *")
            + "grace_period = \"5 parsecs\"\nrollout_timout = \"10m\"\n";
        let p = problems(&text);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(p[0].starts_with("line 10: targets[0] (\"chatbot\").schedule: invalid cron"));
        assert!(
            p[1].starts_with("line 11: targets[0] (\"chatbot\").grace_period: invalid duration")
        );
        assert!(p[2].starts_with(
            "line 12: targets[0] (\"chatbot\").rollout_timout: unknown field `rollout_timout`"
        ));
    }

    #[test]
    fn parse_errors_and_semantic_errors_come_together_in_file_order() {
        let text = format!(
            "[daemon]\nmax_concurrent_rotations = 0\nbogus = 1\n{}",
            MINIMAL.replace("name = \"chatbot\"", "name = \"Chat Bot\"\njitter = 5")
        );
        let p = problems(&text);
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(
            p[0].starts_with("line 2: daemon.max_concurrent_rotations: must be"),
            "{p:#?}"
        );
        assert!(
            p[1].starts_with("line 3: daemon.bogus: unknown field `bogus`"),
            "{p:#?}"
        );
        assert!(
            p[2].starts_with("line 9: targets[0] (\"Chat Bot\").name: must be 1-40"),
            "{p:#?}"
        );
        assert!(
            p[3].starts_with("line 10: targets[0] (\"Chat Bot\").jitter: invalid type"),
            "{p:#?}"
        );
    }

    #[test]
    fn a_bad_required_field_does_not_hide_the_rest_of_its_target() {
        // workloads is required: taking the bad one out must not stop the collection, nor
        // add a "missing field" or "at least one workload" echo of the same problem.
        let text = MINIMAL.replace("[\"demo/Deployment/chatbot\"]", "[\"chatbot\"]")
            + "jitter = \"soon\"\n[targets.drain]\nquiet_for = \"1m\"\nmax_wait = 3\n";
        let p = problems(&text);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(
            p[0].contains(".workloads[0]: invalid workload \"chatbot\""),
            "{p:#?}"
        );
        assert!(p[1].contains(".jitter: invalid duration"), "{p:#?}");
        assert!(p[2].contains(".drain.max_wait: invalid type"), "{p:#?}");
    }

    #[test]
    fn a_missing_field_is_named_with_its_target_and_line() {
        let p = problems(&MINIMAL.replace("project_id = \"proj_abc\"\n", ""));
        assert_eq!(
            p,
            vec!["line 5: targets[0] (\"chatbot\").project_id: missing field `project_id`"]
        );
    }

    #[test]
    fn a_bad_target_keeps_the_index_of_the_next() {
        let second = MINIMAL
            .split("[[targets]]")
            .nth(1)
            .unwrap()
            .replace("chatbot", "two");
        let text = format!("{MINIMAL}targets = 1\n").replace("targets = 1\n", "");
        let text = text.replace("[[targets]]", "[[targets]]\nname = 5\n[[targets]]");
        let text = format!("{text}[[targets]]{}jitter = 1\n", second);
        let p = problems(&text);
        assert!(
            p.iter()
                .any(|e| e.contains("targets[2] (\"two\").jitter: invalid type")),
            "{p:#?}"
        );
    }

    #[test]
    fn target_names_may_have_40_characters_as_documented() {
        // Before, the 20-character account-prefix rule applied to target names too.
        let forty = "a".repeat(40);
        Config::parse(&MINIMAL.replace("\"chatbot\"", &format!("{forty:?}")), "t").unwrap();
        let e = err(&MINIMAL.replace("\"chatbot\"", &format!("\"{forty}b\"")));
        assert!(e.contains(".name: must be 1-40 characters"), "{e}");
        assert!(is_target_name("chat-2") && !is_target_name("") && !is_target_name("Chat"));
    }

    #[test]
    fn a_syntax_error_names_line_and_column() {
        let e = err("[vault]\naddress = \"http://x\n");
        assert!(
            e.starts_with("t.toml: line 2, column 20: TOML syntax error:"),
            "{e}"
        );
    }

    #[test]
    fn targets_on_one_vault_path_are_rejected_whatever_the_spelling_or_field() {
        let second = MINIMAL.split("[[targets]]").nth(1).unwrap();
        for spelling in [
            "apps/chatbot/openai",
            "/apps/chatbot/openai/",
            "apps//chatbot///openai",
        ] {
            let other = second.replace("chatbot\"", "other\"").replace(
                "\"apps/chatbot/openai\"",
                &format!("{spelling:?}\nvault_field = \"k2\""),
            );
            let e = err(&format!("{MINIMAL}[[targets]]{other}"));
            assert!(
                e.contains(&format!(
                    "targets[1] (\"other\").vault_path: {spelling:?} is the same Vault path as targets[0] (\"chatbot\").vault_path"
                )),
                "{spelling}: {e}"
            );
        }
        // Under or beside it is another path.
        for path in [
            "apps/chatbot/openai/v2",
            "apps/chatbot/openai-2",
            "apps/chatbot",
        ] {
            let other = second
                .replace("chatbot\"", "other\"")
                .replace("apps/chatbot/openai", path);
            Config::parse(&format!("{MINIMAL}[[targets]]{other}"), "t")
                .unwrap_or_else(|e| panic!("{path}: {e}"));
        }
        assert_eq!(normalize_vault_path("//a//b/"), "a/b");
    }

    #[test]
    fn zero_durations_that_pace_loops_are_rejected() {
        let probe = |extra: &str| {
            format!("{MINIMAL}[[targets.smoke_probes]]\nurl = \"http://chat/healthz\"\n{extra}\n")
        };
        Config::parse(&probe(""), "t").unwrap();
        for (text, needle) in [
            (
                probe("interval = \"0s\""),
                "line 13: targets[0] (\"chatbot\").smoke_probes[0].interval: must be greater than zero",
            ),
            (
                probe("timeout = \"0s\""),
                "line 13: targets[0] (\"chatbot\").smoke_probes[0].timeout: must be greater than zero",
            ),
            (
                format!("[daemon]\nsweep_min_age = \"0s\"\n{MINIMAL}"),
                "line 2: daemon.sweep_min_age: must be greater than zero",
            ),
            (
                format!("[daemon]\npending_retry_interval = \"0s\"\n{MINIMAL}"),
                "line 2: daemon.pending_retry_interval: must be at least 1s",
            ),
            (
                MINIMAL.replace("[vault]\n", "[vault]\nrequest_timeout = \"0s\"\n"),
                "line 3: vault.request_timeout: must be greater than zero",
            ),
        ] {
            let e = err(&text);
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn a_schedule_that_never_fires_is_rejected() {
        for never in ["0 0 0 30 2 *", "0 0 0 31 4 *", "0 0 0 1 1 * 2020"] {
            let e = err(&MINIMAL.replace("0 0 3 * * *", never));
            assert!(
                e.contains(&format!(
                    "line 10: targets[0] (\"chatbot\").schedule: {never:?} never fires"
                )),
                "{e}"
            );
        }
        // Rare is not never.
        Config::parse(&MINIMAL.replace("0 0 3 * * *", "0 0 0 29 2 *"), "t").unwrap();
        let feb29: cron::Schedule = "0 0 0 29 2 *".parse().unwrap();
        let y2027 = chrono::DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert!(fires_within(&feb29, y2027, 2));
        assert!(!fires_within(&feb29, y2027, 1));
    }

    #[test]
    fn probe_urls_are_redacted_in_errors() {
        let text = format!(
            "{MINIMAL}[[targets.smoke_probes]]\nurl = \"ftp://u:hunter2@h/p?token=tok-secret\"\n"
        );
        let e = err(&text);
        assert!(
            e.contains("\"ftp://h/p?token=redacted\" must be an http(s) URL"),
            "{e}"
        );
        assert!(!e.contains("hunter2") && !e.contains("tok-secret"), "{e}");
    }

    #[test]
    fn redacted_url_drops_userinfo_query_values_and_fragment() {
        for (url, want) in [
            (
                "http://user:pass@host:8080/p/x?token=abc&q=1#frag",
                "http://host:8080/p/x?token=redacted&q=redacted#redacted",
            ),
            ("https://user@host/", "https://host/"),
            ("http://host/healthz", "http://host/healthz"),
            ("http://host/?", "http://host/"),
            ("user:pass@host/path?k=v", "host/path?redacted"),
            ("http://user:p@ss@host/x", "http://host/x"),
            ("not a url at all", "not a url at all"),
            ("://user:pw@h", "h"),
            ("://http://:pw@.?t=x", ".?redacted"),
            ("x://u:pw@h/a@b c", "x://h/a@b%20c"),
            ("u:pw@h/a@b c", "b c"),
            ("not-a-scheme!://u:pw@h", "h"),
        ] {
            assert_eq!(redacted_url(url), want, "{url}");
        }
    }

    #[test]
    fn serialized_config_parses_back_identically() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::parse(&text, "round trip").unwrap(), c);
    }
}

/// Property tests of the parsers: no input panics them, and what parses round-trips.
/// CI runs proptest's default 256 cases per property; a longer run:
/// `PROPTEST_CASES=100000 cargo test --lib prop_` (README, "Configuration").
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// TOML-ish lines from the config's own vocabulary (sections, keys, plausible and
    /// implausible values), so most inputs get past the syntax and into the collector.
    fn fragment() -> impl Strategy<Value = String> {
        let header = prop::sample::select(vec![
            "[daemon]",
            "[daemon.leader_election]",
            "[daemon.audit]",
            "[openai]",
            "[vault]",
            "[vault.auth]",
            "[kubernetes]",
            "[[targets]]",
            "[targets.drain]",
            "[targets.synced_secret]",
            "[[targets.smoke_probes]]",
            "[bogus]",
            "[[daemon]]",
            "[targets]",
        ])
        .prop_map(str::to_string);
        let key = prop_oneof![
            prop::sample::select(vec![
                "name",
                "project_id",
                "vault_path",
                "vault_field",
                "workloads",
                "schedule",
                "max_key_age",
                "jitter",
                "grace_period",
                "rollout_timeout",
                "address",
                "method",
                "role",
                "url",
                "interval",
                "timeout",
                "quiet_for",
                "max_wait",
                "on_timeout",
                "sweep_min_age",
                "max_concurrent_rotations",
                "listen",
                "request_timeout",
                "retry_base",
                "max_backoff",
                "enabled",
                "lease_duration",
                "renew_deadline",
                "retry_period",
                "namespace",
                "log_format",
                "targets",
                "vault",
                "expect_status",
                "consecutive_successes",
                "state_prefix",
            ])
            .prop_map(str::to_string),
            "[a-z_]{1,12}",
        ];
        let value = prop_oneof![
            prop::sample::select(vec![
                "\"0s\"",
                "\"10m\"",
                "\"1h 30m\"",
                "\"5 parsecs\"",
                "\"\"",
                "\"0 0 3 * * *\"",
                "\"0 0 0 30 2 *\"",
                "\"* * *\"",
                "\"http://127.0.0.1:8200\"",
                "\"http://u:p@h/x?t=1\"",
                "[\"prod/Deployment/chat\"]",
                "[\"x\", 1]",
                "[]",
                "{}",
                "{ quiet_for = \"1m\" }",
                "true",
                "0",
                "-1",
                "4294967296",
                "1.5",
                "1979-05-27T07:32:00Z",
                "\"kubernetes\"",
                "\"token\"",
                "\"apps/a\"",
                "\"/apps//a/\"",
                "\"chat\"",
                "\"proj_x\"",
                "\"0.0.0.0:8080\"",
            ])
            .prop_map(str::to_string),
            "\"[ -~]{0,16}\"".prop_map(|s| s.replace('\\', "")),
            any::<i64>().prop_map(|n| n.to_string()),
        ];
        let line = prop_oneof![
            2 => header,
            6 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
            1 => "[ -~]{0,20}",
        ];
        prop::collection::vec(line, 0..40).prop_map(|l| l.join("\n"))
    }

    /// A valid file (a vault section, up to three targets) with random keys set, replaced or
    /// removed per section: mostly well-formed TOML, some of it valid, some not.
    fn document() -> impl Strategy<Value = String> {
        let key = || {
            prop::sample::select(vec![
                "name",
                "project_id",
                "vault_path",
                "vault_field",
                "workloads",
                "schedule",
                "max_key_age",
                "jitter",
                "grace_period",
                "rollout_timeout",
                "address",
                "request_timeout",
                "sweep_min_age",
                "max_concurrent_rotations",
                "retry_base",
                "max_backoff",
                "bogus",
                "poll_interval",
                "account_prefix",
                "state_prefix",
            ])
        };
        let value = || {
            prop::sample::select(vec![
                "\"0s\"",
                "\"10m\"",
                "\"30d\"",
                "\"5 parsecs\"",
                "\"\"",
                "\"0 0 3 * * *\"",
                "\"0 0 0 30 2 *\"",
                "\"* * *\"",
                "\"http://127.0.0.1:8200\"",
                "\"apps/t0\"",
                "\"/apps//t0/\"",
                "[\"prod/Deployment/t0\"]",
                "[\"Deployment/x\"]",
                "[]",
                "0",
                "3",
                "true",
                "\"t0\"",
                "\"Bad Name\"",
                "\"okr\"",
                "\"proj_x\"",
            ])
        };
        let edits = move || prop::collection::vec((key(), prop::option::of(value())), 0..4);
        (edits(), edits(), prop::collection::vec(edits(), 0..4)).prop_map(
            |(daemon, vault, targets)| {
                let render = |header: &str,
                              mut base: BTreeMap<String, String>,
                              edits: Vec<(&str, Option<&str>)>| {
                    for (k, v) in edits {
                        match v {
                            Some(v) => base.insert(k.to_string(), v.to_string()),
                            None => base.remove(k),
                        };
                    }
                    let body: Vec<String> =
                        base.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                    format!("{header}\n{}\n", body.join("\n"))
                };
                let mut text = render("[daemon]", BTreeMap::new(), daemon);
                let vault_base = BTreeMap::from([(
                    "address".to_string(),
                    "\"http://127.0.0.1:8200\"".to_string(),
                )]);
                text += &render("[vault]", vault_base, vault);
                for (i, edits) in targets.into_iter().enumerate() {
                    let base = BTreeMap::from([
                        ("name".to_string(), format!("\"t{i}\"")),
                        ("project_id".to_string(), "\"proj_x\"".to_string()),
                        ("vault_path".to_string(), format!("\"apps/t{i}\"")),
                        (
                            "workloads".to_string(),
                            format!("[\"prod/Deployment/t{i}\"]"),
                        ),
                    ]);
                    text += &render("[[targets]]", base, edits);
                }
                text
            },
        )
    }

    proptest! {
        #[test]
        fn prop_config_parse_never_panics_on_any_text(text in "\\PC{0,400}") {
            let _ = Config::parse(&text, "p");
        }

        /// Never accepts what serde rejects or validate refuses, never refuses a file both
        /// accept; every reported problem names something, and a parsed file round-trips.
        #[test]
        fn prop_config_parse_agrees_with_serde_and_validate(
            text in prop_oneof![fragment(), document()]
        ) {
            let serde = toml::from_str::<Config>(&text);
            match Config::parse(&text, "p") {
                Ok(c) => {
                    prop_assert!(serde.is_ok());
                    prop_assert!(c.validate().is_empty());
                    let back = toml::to_string(&c).unwrap();
                    prop_assert_eq!(Config::parse(&back, "back").unwrap(), c);
                }
                Err(ConfigError::Invalid { errors, .. }) => {
                    prop_assert!(!errors.is_empty());
                    prop_assert!(errors.iter().all(|e| !e.trim().is_empty()));
                    if let Ok(c) = serde {
                        prop_assert!(!c.validate().is_empty(), "refused a good file: {:?}", errors);
                    }
                }
                Err(ConfigError::Parse { message, .. }) => {
                    prop_assert!(serde.is_err());
                    prop_assert!(message.starts_with("line "), "{}", message);
                }
                Err(e @ ConfigError::Read { .. }) => prop_assert!(false, "{}", e),
            }
        }

        #[test]
        fn prop_duration_parses_without_panic_and_round_trips(
            s in prop_oneof!["\\PC{0,30}", "([0-9]{1,22} ?(ns|us|ms|s|sec|m|min|h|d|w|M|y|years) ?){1,4}"]
        ) {
            if let Ok(d) = toml::Value::String(s.clone()).try_into::<DurationStr>() {
                let shown = toml::Value::try_from(d).unwrap();
                prop_assert_eq!(shown.clone().try_into::<DurationStr>().unwrap(), d, "{} -> {}", s, shown);
            }
        }

        #[test]
        fn prop_cron_parses_without_panic_and_round_trips(
            s in prop_oneof![
                "\\PC{0,40}",
                prop::collection::vec(
                    prop_oneof![
                        prop::sample::select(vec![
                            "*", "0", "*/5", "1-5", "Mon", "L", "?", "60", "30", "2", "1,2",
                            "Mon#2", "5L", "W", "2100", "1970", "Feb", "0-59/7", "31", "29",
                        ]).prop_map(str::to_string),
                        "[0-9*/,#LW?-]{1,6}",
                    ],
                    5..8,
                ).prop_map(|f| f.join(" ")),
            ]
        ) {
            if let Ok(c) = s.parse::<CronSchedule>() {
                prop_assert_eq!(&c.expr, &s);
                let again: CronSchedule = c.expr.parse().unwrap();
                let t0 = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
                    .unwrap()
                    .with_timezone(&chrono::Utc);
                let a: Vec<_> = c.schedule.after(&t0).take(3).collect();
                let b: Vec<_> = again.schedule.after(&t0).take(3).collect();
                prop_assert_eq!(a, b);
                // The never-fires check ends (cron's years stop at 2100).
                let _ = fires_within(&c.schedule, t0, SCHEDULE_HORIZON_YEARS);
            }
        }

        #[test]
        fn prop_workload_parses_without_panic_and_round_trips(
            s in prop_oneof![
                "\\PC{0,40}",
                "[a-z0-9.-]{0,12}/(Deployment|deploy|sts|DaemonSet|ds|Rollout|ro|CronJob|x)/[a-zA-Z0-9.-]{0,12}",
            ]
        ) {
            if let Ok(w) = s.parse::<WorkloadRef>() {
                prop_assert_eq!(w.to_string().parse::<WorkloadRef>(), Ok(w));
            }
        }

        #[test]
        fn prop_redacted_url_never_shows_the_password(
            scheme in "(http|https|ftp|x)", user in "[a-z]{0,6}", host in "[a-z0-9.]{1,12}",
            path in "(/[a-z0-9%@:]{0,8}){0,3}", junk in "\\PC{0,20}",
        ) {
            let url = format!("{scheme}://{user}:Pw-S3cret@{host}{path}?token=Tk-S3cret");
            for u in [url.clone(), format!("{junk}{url}"), url.replace("://", "")] {
                let r = redacted_url(&u);
                prop_assert!(!r.contains("Pw-S3cret") && !r.contains("Tk-S3cret"), "{} -> {}", u, r);
            }
            let _ = redacted_url(&junk);
        }
    }
}
